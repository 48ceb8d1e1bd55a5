/*
 * DiffSeg from plain C: the libtorch shim (attention maps) + the C core
 * (aggregate, merge, nms). No Python.
 *
 *   example BUNDLE [THREADS [OUT_PREFIX [KL_THRESHOLD]]]
 *
 * Runs the bundle on a synthetic image (a deterministic pattern, exactly
 * representable in float32), segments the attention, and prints a summary.
 * With OUT_PREFIX it writes OUT_PREFIX.attn (the maps, float32, in the
 * bundle's output order) and OUT_PREFIX.labels (int32, image_size^2).
 * KL_THRESHOLD (default 1.1) is used in each of the 3 merge iterations.
 *
 * Build: see csrc/torch/build.py (example_commands) or tests/test_shim.py.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "diffseg_core.h"
#include "diffseg_torch.h"

static int write_file(const char *prefix, const char *suffix, const void *data, size_t bytes) {
    char path[4096];
    snprintf(path, sizeof path, "%s%s", prefix, suffix);
    FILE *f = fopen(path, "wb");
    if (!f) {
        fprintf(stderr, "cannot write %s\n", path);
        return 1;
    }
    size_t n = fwrite(data, 1, bytes, f);
    fclose(f);
    return n == bytes ? 0 : 1;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s BUNDLE [THREADS [OUT_PREFIX [KL_THRESHOLD]]]\n", argv[0]);
        return 2;
    }
    const int threads = argc > 2 ? atoi(argv[2]) : 0;
    const char *prefix = argc > 3 ? argv[3] : NULL;
    const double kl = argc > 4 ? atof(argv[4]) : 1.1;
    if (!(kl > 0)) {
        fprintf(stderr, "KL_THRESHOLD must be a positive number, not %s\n", argv[4]);
        return 2;
    }
    int status = 1;
    float *image = NULL, *maps_data = NULL, *A = NULL, *proposals = NULL;
    int32_t *labels = NULL;
    dseg_torch_model *model = NULL;
    dseg_torch_result *result = NULL;

    if (dseg_torch_open(argv[1], "cpu", threads, &model) != DSEG_TORCH_OK) {
        fprintf(stderr, "open failed: %s\n", dseg_torch_last_error());
        return 1;
    }
    if (threads > 0) dseg_set_num_threads(threads);
    dseg_torch_info info;
    if (dseg_torch_info_get(model, &info) != DSEG_TORCH_OK) goto done;
    printf("bundle: image %d px, %d maps:", info.image_size, info.n_maps);
    for (int i = 0; i < info.n_maps; i++) printf(" %d", info.map_res[i]);
    printf("\n");

    /* Synthetic image (channels, size, size) in [-1, 1]. */
    const int S = info.image_size, C = info.image_channels;
    image = malloc(sizeof(float) * (size_t)C * S * S);
    size_t total = 0;
    for (int i = 0; i < info.n_maps; i++) total += (size_t)info.map_res[i] * info.map_res[i] * info.map_res[i] * info.map_res[i];
    maps_data = malloc(sizeof(float) * total);
    if (!image || !maps_data) goto done;
    for (int c = 0; c < C; c++)
        for (int y = 0; y < S; y++)
            for (int x = 0; x < S; x++)
                image[((size_t)c * S + y) * S + x] = (float)((x * 7 + y * 13 + c * 29 + (x / 16) * (y / 16) * 5) % 64) / 32.0f - 1.0f;

    /* forward(image (1, C, S, S) float32, t (1,) int64) -> [eps, map_0, map_1, ...] */
    const int64_t t = info.default_timestep;
    dseg_torch_tensor inputs[2] = {
        {DSEG_TORCH_FLOAT32, 4, {1, C, S, S}, image},
        {DSEG_TORCH_INT64, 1, {1}, &t},
    };
    if (dseg_torch_call(model, "forward", 2, inputs, &result) != DSEG_TORCH_OK) {
        fprintf(stderr, "call failed: %s\n", dseg_torch_last_error());
        goto done;
    }
    if (dseg_torch_result_count(result) != info.n_maps + 1) {
        fprintf(stderr, "expected %d outputs, got %d\n", info.n_maps + 1, dseg_torch_result_count(result));
        goto done;
    }
    float *maps[DSEG_TORCH_MAX_MAPS];
    size_t offset = 0;
    for (int i = 0; i < info.n_maps; i++) {
        const size_t n = (size_t)info.map_res[i] * info.map_res[i];
        int64_t shape[DSEG_TORCH_MAX_DIMS];
        if (dseg_torch_result_shape(result, i + 1, shape) != 3 || shape[0] != 1 || (size_t)shape[1] != n ||
            (size_t)shape[2] != n || dseg_torch_result_dtype(result, i + 1) != DSEG_TORCH_FLOAT32) {
            fprintf(stderr, "map %d: unexpected shape or dtype\n", i);
            goto done;
        }
        maps[i] = maps_data + offset;
        memcpy(maps[i], dseg_torch_result_data(result, i + 1), sizeof(float) * n * n);
        offset += n * n;
    }
    /* Row sums of the highest-resolution map. */
    {
        const int n = info.map_res[0] * info.map_res[0];
        double worst = 0;
        for (int r = 0; r < n; r++) {
            double s = 0;
            for (int k = 0; k < n; k++) s += maps[0][(size_t)r * n + k];
            double d = s > 1 ? s - 1 : 1 - s;
            if (d > worst) worst = d;
        }
        printf("attention: max |row sum - 1| = %.2e\n", worst);
    }

    /* The core: weights proportional to resolution (default of diffseg.aggregate). */
    int R = 0;
    float weights[DSEG_TORCH_MAX_MAPS];
    double wsum = 0;
    for (int i = 0; i < info.n_maps; i++) {
        if (info.map_res[i] > R) R = info.map_res[i];
        wsum += info.map_res[i];
    }
    for (int i = 0; i < info.n_maps; i++) weights[i] = (float)(info.map_res[i] / wsum);
    A = malloc(sizeof(float) * (size_t)R * R * R * R);
    const int grid = R < 16 ? R : 16;
    proposals = malloc(sizeof(float) * (size_t)grid * grid * R * R);
    labels = malloc(sizeof(int32_t) * (size_t)S * S);
    if (!A || !proposals || !labels) goto done;
    const float *const *cmaps = (const float *const *)maps;
    if (dseg_aggregate(info.n_maps, info.map_res, cmaps, weights, R, A) != DSEG_OK) {
        fprintf(stderr, "aggregate failed: %s\n", dseg_last_error());
        goto done;
    }
    const double thresholds[3] = {kl, kl, kl};
    int n_proposals = 0, n_labels = 0;
    if (dseg_merge(A, R, grid, thresholds, 3, proposals, &n_proposals, NULL) != DSEG_OK) {
        fprintf(stderr, "merge failed: %s\n", dseg_last_error());
        goto done;
    }
    if (dseg_nms(proposals, n_proposals, R, R, S, S, labels, &n_labels, NULL) != DSEG_OK) {
        fprintf(stderr, "nms failed: %s\n", dseg_last_error());
        goto done;
    }
    printf("segments: %d proposals, %d labels on %dx%d\n", n_proposals, n_labels, S, S);

    /* An error is reported, not fatal: a method the bundle does not have. */
    dseg_torch_result *none = NULL;
    if (dseg_torch_call(model, "no_such_method", 2, inputs, &none) == DSEG_TORCH_OK || none != NULL) {
        fprintf(stderr, "expected an error\n");
        goto done;
    }
    printf("call error: %s\n", dseg_torch_last_error());

    if (prefix && (write_file(prefix, ".attn", maps_data, sizeof(float) * total) ||
                   write_file(prefix, ".labels", labels, sizeof(int32_t) * (size_t)S * S)))
        goto done;
    status = 0;
done:
    dseg_torch_result_free(result);
    dseg_torch_close(model);
    free(image);
    free(maps_data);
    free(A);
    free(proposals);
    free(labels);
    return status;
}
