/* Attention aggregation: many resolutions -> one (R^2, R^2) matrix. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

typedef struct {
    int *i0, *i1;
    float *frac;
} bilinear_table;

/* Upsample one s x s key map to R x R (bilinear, half-pixel) into dst,
 * normalise it to sum 1. Returns 0 if the map has no mass. */
static int upsample_normalised(const float *src, int s, int R,
                               const bilinear_table *t, float *row_tmp,
                               float *dst) {
    double total = 0.0;
    for (int y = 0; y < R; y++) {
        const float *a = src + (size_t)t->i0[y] * s, *b = src + (size_t)t->i1[y] * s;
        const float fy = t->frac[y];
        for (int x = 0; x < s; x++) row_tmp[x] = (1.0f - fy) * a[x] + fy * b[x];
        float *d = dst + (size_t)y * R;
        for (int x = 0; x < R; x++) {
            const float fx = t->frac[x];
            d[x] = (1.0f - fx) * row_tmp[t->i0[x]] + fx * row_tmp[t->i1[x]];
            total += d[x];
        }
    }
    if (!(total > 0.0)) return 0;
    const float inv = (float)(1.0 / total);
    for (size_t i = 0; i < (size_t)R * R; i++) dst[i] *= inv;
    return 1;
}

/* Add weight * (map of each s-query) to the (R/s)^2 output rows it covers. */
static int add_resolution(const float *map, int s, float weight, int R,
                          int first, float *out) {
    const int r = R / s;
    const size_t n = (size_t)R * R;
    bilinear_table t;
    t.i0 = malloc(sizeof(int) * R);
    t.i1 = malloc(sizeof(int) * R);
    t.frac = malloc(sizeof(float) * R);
    if (!t.i0 || !t.i1 || !t.frac) {
        free(t.i0), free(t.i1), free(t.frac);
        return dseg_fail(DSEG_ENOMEM, "aggregate: out of memory");
    }
    dseg_bilinear_table(s, R, t.i0, t.i1, t.frac);

    int empty_query = -1, oom = 0;
#pragma omp parallel num_threads(dseg_threads_for((double)s * s * n))
    {
        float *buf = dseg_malloc(sizeof(float) * (n + (size_t)s));
        if (!buf) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(static)
        for (int q = 0; q < s * s; q++) {
            if (!buf) continue;
            if (!upsample_normalised(map + (size_t)q * s * s, s, R, &t, buf + n, buf)) {
#pragma omp critical(dseg_aggregate_empty)
                if (empty_query < 0 || q < empty_query) empty_query = q;
                continue;
            }
            const int qi = q / s, qj = q % s;
            for (int di = 0; di < r; di++)
                for (int dj = 0; dj < r; dj++) {
                    float *o = out + ((size_t)(qi * r + di) * R + (qj * r + dj)) * n;
                    if (first)
                        for (size_t i = 0; i < n; i++) o[i] = weight * buf[i];
                    else
                        for (size_t i = 0; i < n; i++) o[i] += weight * buf[i];
                }
        }
        free(buf);
    }
    free(t.i0), free(t.i1), free(t.frac);
    if (oom) return dseg_fail(DSEG_ENOMEM, "aggregate: out of memory");
    if (empty_query >= 0)
        return dseg_fail(DSEG_EINVAL,
                         "attn: the %dx%d map has a query row with no mass (row %d)",
                         s, s, empty_query);
    return DSEG_OK;
}

int dseg_aggregate(int n_maps, const int *res, const float *const *maps,
                   const float *weights, int out_res, float *out) {
    dseg_clear_error();
    if (n_maps < 1) return dseg_fail(DSEG_EINVAL, "attn: no attention maps given");
    if (out_res < 1) return dseg_fail(DSEG_EINVAL, "out_res must be >= 1, got %d", out_res);
    if (!res || !maps || !weights || !out)
        return dseg_fail(DSEG_EINVAL, "aggregate: NULL pointer argument");
    for (int i = 0; i < n_maps; i++) {
        if (res[i] < 1 || out_res % res[i] != 0)
            return dseg_fail(DSEG_EINVAL,
                             "attn: resolution %d does not divide out_res %d", res[i], out_res);
        if (!maps[i]) return dseg_fail(DSEG_EINVAL, "attn: map %d is NULL", i);
    }
    for (int i = 0; i < n_maps; i++) {
        int rc = add_resolution(maps[i], res[i], weights[i], out_res, i == 0, out);
        if (rc != DSEG_OK) return rc;
    }
    return DSEG_OK;
}
