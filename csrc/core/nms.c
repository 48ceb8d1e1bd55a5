/* Label map from proposals: bilinear upsampling + argmax (DiffSeg step 4). */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Vertical then horizontal interpolation, each as (1 - f) a + f b in float32:
 * diffseg.reference.nms does the same operations in the same order, so both
 * give bit-identical values (the build disables FMA contraction). */
static void label_row(const float *P, int K, int h, int w, int y0, int y1, float fy,
                      const int *x0, const int *x1, const float *fx, int W, float *tmp,
                      int32_t *out) {
    for (int k = 0; k < K; k++) {
        const float *a = P + ((size_t)k * h + y0) * w, *b = P + ((size_t)k * h + y1) * w;
        float *t = tmp + (size_t)k * w;
        for (int x = 0; x < w; x++) t[x] = (1.0f - fy) * a[x] + fy * b[x];
    }
    for (int X = 0; X < W; X++) {
        int best = 0;
        float best_v = 0.0f;
        for (int k = 0; k < K; k++) {
            const float *t = tmp + (size_t)k * w;
            const float v = (1.0f - fx[X]) * t[x0[X]] + fx[X] * t[x1[X]];
            if (k == 0 || v > best_v) best = k, best_v = v;
        }
        out[X] = best;
    }
}

int dseg_nms(const float *proposals, int K, int h, int w, int H, int W, int32_t *labels,
             int *n_labels, int32_t *winners) {
    const dseg_exec ex = dseg_default_exec();
    return dseg_nms_ex(proposals, K, h, w, H, W, labels, n_labels, winners, &ex);
}

int dseg_nms_ex(const float *proposals, int K, int h, int w, int H, int W, int32_t *labels,
                int *n_labels, int32_t *winners, const dseg_exec *ex) {
    dseg_clear_error();
    if (dseg_check_exec(ex) != DSEG_OK) return DSEG_EINVAL;
    if (!proposals || !labels) return dseg_fail(DSEG_EINVAL, "nms: NULL pointer argument");
    if (K < 1) return dseg_fail(DSEG_EINVAL, "proposals: need at least one proposal");
    if (h < 1 || w < 1) return dseg_fail(DSEG_EINVAL, "proposals: empty maps (%d x %d)", h, w);
    if (H < 1 || W < 1) return dseg_fail(DSEG_EINVAL, "size must be positive, got (%d, %d)", H, W);

    int *iy0 = malloc(sizeof(int) * H), *iy1 = malloc(sizeof(int) * H);
    int *ix0 = malloc(sizeof(int) * W), *ix1 = malloc(sizeof(int) * W);
    float *fy = malloc(sizeof(float) * H), *fx = malloc(sizeof(float) * W);
    int32_t *relabel = malloc(sizeof(int32_t) * K);
    int rc = DSEG_OK, oom = 0;
    if (!iy0 || !iy1 || !ix0 || !ix1 || !fy || !fx || !relabel) {
        rc = dseg_fail(DSEG_ENOMEM, "nms: out of memory");
        goto done;
    }
    dseg_bilinear_table(h, H, iy0, iy1, fy);
    dseg_bilinear_table(w, W, ix0, ix1, fx);

#pragma omp parallel num_threads(dseg_threads_for(ex, (double)H * W * K))
    {
        float *tmp = malloc(sizeof(float) * (size_t)K * w);
        if (!tmp) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(dynamic, 8)
        for (int Y = 0; Y < H; Y++)
            if (tmp)
                label_row(proposals, K, h, w, iy0[Y], iy1[Y], fy[Y], ix0, ix1, fx, W, tmp,
                          labels + (size_t)Y * W);
        free(tmp);
    }
    if (oom) {
        rc = dseg_fail(DSEG_ENOMEM, "nms: out of memory");
        goto done;
    }

    /* Consecutive labels, in proposal order, for the proposals that won. */
    const size_t n = (size_t)H * W;
    for (int k = 0; k < K; k++) relabel[k] = 0;
    for (size_t i = 0; i < n; i++) relabel[labels[i]] = 1;
    int next = 0;
    for (int k = 0; k < K; k++) {
        if (relabel[k] && winners) winners[next] = k;
        relabel[k] = relabel[k] ? next++ : -1;
    }
    for (size_t i = 0; i < n; i++) labels[i] = relabel[labels[i]];
    if (n_labels) *n_labels = next;
done:
    free(iy0), free(iy1), free(ix0), free(ix1), free(fy), free(fx), free(relabel);
    return rc;
}
