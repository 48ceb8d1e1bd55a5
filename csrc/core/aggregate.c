/* Attention aggregation: many resolutions -> one (R^2, R^2) matrix. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

typedef struct {
    int s;        /* resolution */
    float weight;
    const float *map; /* (s^2, s^2) */
    int *i0, *i1; /* bilinear table s -> R */
    float *frac;
} level;

/* Upsample one s x s key map to R x R (bilinear, half-pixel) into dst and
 * normalise it to sum 1. Returns 0 if the map has no mass. */
static int upsample_normalised(const float *src, const level *l, int R, float *row_tmp,
                               float *dst) {
    const int s = l->s;
    double total = 0.0;
    for (int y = 0; y < R; y++) {
        const float *a = src + (size_t)l->i0[y] * s, *b = src + (size_t)l->i1[y] * s;
        const float fy = l->frac[y];
        for (int x = 0; x < s; x++) row_tmp[x] = (1.0f - fy) * a[x] + fy * b[x];
        float *d = dst + (size_t)y * R;
        for (int x = 0; x < R; x++) {
            const float fx = l->frac[x];
            d[x] = (1.0f - fx) * row_tmp[l->i0[x]] + fx * row_tmp[l->i1[x]];
            total += d[x];
        }
    }
    if (!(total > 0.0)) return 0;
    const double inv = 1.0 / total; /* in double: finite even for subnormal mass */
    for (size_t i = 0; i < (size_t)R * R; i++) dst[i] = (float)(dst[i] * inv);
    return 1;
}

/* dst = weight * src / sum(src) for a map at full resolution (no
 * interpolation needed), as upsample_normalised + scaling would compute it. */
static int scaled_copy(const float *src, size_t n, float weight, float *dst) {
    double total = 0.0;
    for (size_t i = 0; i < n; i++) total += src[i];
    if (!(total > 0.0)) return 0;
    const double inv = 1.0 / total;
    for (size_t i = 0; i < n; i++) dst[i] = weight * (float)(src[i] * inv);
    return 1;
}

static int gcd(int a, int b) {
    while (b) {
        const int t = a % b;
        a = b, b = t;
    }
    return a;
}

/*
 * One block of B x B output queries, B = R / gcd(resolutions): every
 * lower-resolution query map it needs is upsampled once into `maps`, then
 * each output row is summed over the resolutions in order and written once.
 * Returns the first empty query found (as q * 1024 + level) or -1.
 */
static long aggregate_block(const level *levels, int n_levels, int R, int B, int bi, int bj,
                            float *maps, float *row_tmp, float *out) {
    const size_t n = (size_t)R * R;
    float *next = maps;
    const float *level_maps[64];
    for (int k = 0; k < n_levels; k++) { /* upsampled maps of this block's queries */
        const level *l = levels + k;
        const int r = R / l->s, side = B / r; /* side x side queries of level k */
        level_maps[k] = next;
        if (l->s == R) continue; /* read directly below */
        for (int a = 0; a < side; a++)
            for (int b = 0; b < side; b++, next += n) {
                const int q = (bi * side + a) * l->s + (bj * side + b);
                if (!upsample_normalised(l->map + (size_t)q * l->s * l->s, l, R, row_tmp, next))
                    return (long)q * 1024 + k;
            }
    }
    for (int di = 0; di < B; di++)
        for (int dj = 0; dj < B; dj++) {
            float *o = out + ((size_t)(bi * B + di) * R + (bj * B + dj)) * n;
            for (int k = 0; k < n_levels; k++) {
                const int r = R / levels[k].s, side = B / r;
                const float w = levels[k].weight;
                if (levels[k].s == R) { /* only possible as level 0: the largest */
                    const size_t q = (size_t)(bi * B + di) * R + (bj * B + dj);
                    if (!scaled_copy(levels[k].map + q * n, n, w, o)) return (long)q * 1024 + k;
                    continue;
                }
                const float *m = level_maps[k] + ((size_t)(di / r) * side + dj / r) * n;
                if (k == 0)
                    for (size_t i = 0; i < n; i++) o[i] = w * m[i];
                else
                    for (size_t i = 0; i < n; i++) o[i] += w * m[i];
            }
        }
    return -1;
}

int dseg_aggregate(int n_maps, const int *res, const float *const *maps, const float *weights,
                   int out_res, float *out) {
    const dseg_exec ex = dseg_default_exec();
    return dseg_aggregate_ex(n_maps, res, maps, weights, out_res, out, &ex);
}

int dseg_aggregate_ex(int n_maps, const int *res, const float *const *maps,
                      const float *weights, int out_res, float *out, const dseg_exec *ex) {
    dseg_clear_error();
    if (dseg_check_exec(ex) != DSEG_OK) return DSEG_EINVAL;
    if (n_maps < 1 || n_maps > 64)
        return dseg_fail(DSEG_EINVAL, "attn: give 1 to 64 attention maps, got %d", n_maps);
    if (out_res < 1) return dseg_fail(DSEG_EINVAL, "out_res must be >= 1, got %d", out_res);
    if (!res || !maps || !weights || !out)
        return dseg_fail(DSEG_EINVAL, "aggregate: NULL pointer argument");
    const int R = out_res;
    int g = 0; /* blocks: a g x g grid, each covering whole queries of every level */
    for (int i = 0; i < n_maps; i++) {
        if (res[i] == R && i != 0)
            return dseg_fail(DSEG_EINVAL, "attn: the map at out_res must come first");
        if (res[i] < 1 || R % res[i] != 0)
            return dseg_fail(DSEG_EINVAL, "attn: resolution %d does not divide out_res %d",
                             res[i], R);
        if (!maps[i]) return dseg_fail(DSEG_EINVAL, "attn: map %d is NULL", i);
        g = gcd(g, res[i]);
    }
    const int B = R / g; /* output queries per block side */
    size_t maps_per_block = 0;
    level levels[64];
    int rc = DSEG_OK;
    for (int k = 0; k < n_maps; k++) {
        const int side = B / (R / res[k]);
        if (res[k] != R) maps_per_block += (size_t)side * side;
        levels[k] = (level){res[k], weights[k], maps[k], malloc(sizeof(int) * R),
                            malloc(sizeof(int) * R), malloc(sizeof(float) * R)};
        if (!levels[k].i0 || !levels[k].i1 || !levels[k].frac) {
            for (int j = 0; j <= k; j++) free(levels[j].i0), free(levels[j].i1), free(levels[j].frac);
            return dseg_fail(DSEG_ENOMEM, "aggregate: out of memory");
        }
        dseg_bilinear_table(res[k], R, levels[k].i0, levels[k].i1, levels[k].frac);
    }

    long empty = -1;
    int oom = 0;
    const size_t n = (size_t)R * R;
#pragma omp parallel num_threads(dseg_threads_for(ex, (double)n * n * n_maps))
    {
        float *buf = dseg_malloc(sizeof(float) * (maps_per_block * n + (size_t)R));
        if (!buf) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int blk = 0; blk < g * g; blk++) {
            if (!buf) continue;
            const long e = aggregate_block(levels, n_maps, R, B, blk / g, blk % g,
                                           buf + (size_t)R, buf, out);
            if (e >= 0) {
#pragma omp critical(dseg_aggregate_empty)
                if (empty < 0 || e < empty) empty = e;
            }
        }
        free(buf);
    }
    for (int k = 0; k < n_maps; k++) free(levels[k].i0), free(levels[k].i1), free(levels[k].frac);
    if (oom) return dseg_fail(DSEG_ENOMEM, "aggregate: out of memory");
    if (empty >= 0)
        rc = dseg_fail(DSEG_EINVAL, "attn: the %dx%d map has a query row with no mass (row %ld)",
                       res[empty % 1024], res[empty % 1024], empty / 1024);
    return rc;
}
