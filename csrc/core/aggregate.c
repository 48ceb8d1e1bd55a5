/* Attention aggregation: many resolutions -> one (H*W, H*W) matrix. */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

typedef struct {
    int h, w;     /* grid of this level */
    float weight;
    const float *map; /* (h*w, h*w) */
    int *iy0, *iy1, *ix0, *ix1; /* bilinear tables h -> H, w -> W */
    float *fy, *fx;
} level;

/* Upsample one h x w key map to H x W (bilinear, half-pixel) into dst and
 * normalise it to sum 1. Returns 0 if the map has no mass. */
static int upsample_normalised(const float *src, const level *l, int H, int W, float *row_tmp,
                               float *dst) {
    const int w = l->w;
    double total = 0.0;
    for (int y = 0; y < H; y++) {
        const float *a = src + (size_t)l->iy0[y] * w, *b = src + (size_t)l->iy1[y] * w;
        const float fy = l->fy[y];
        for (int x = 0; x < w; x++) row_tmp[x] = (1.0f - fy) * a[x] + fy * b[x];
        float *d = dst + (size_t)y * W;
        for (int x = 0; x < W; x++) {
            const float fx = l->fx[x];
            d[x] = (1.0f - fx) * row_tmp[l->ix0[x]] + fx * row_tmp[l->ix1[x]];
            total += d[x];
        }
    }
    if (!(total > 0.0)) return 0;
    const double inv = 1.0 / total; /* in double: finite even for subnormal mass */
    for (size_t i = 0; i < (size_t)H * W; i++) dst[i] = (float)(dst[i] * inv);
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
 * One block of By x Bx output queries (By = H / gcd of the level heights,
 * Bx likewise): every lower-resolution query map it needs is upsampled once
 * into `maps`, then each output row is summed over the resolutions in order
 * and written once. Returns the first empty query found (as q * 1024 +
 * level) or -1.
 */
static long aggregate_block(const level *levels, int n_levels, int H, int W, int By, int Bx,
                            int bi, int bj, float *maps, float *row_tmp, float *out) {
    const size_t n = (size_t)H * W;
    float *next = maps;
    const float *level_maps[64];
    for (int k = 0; k < n_levels; k++) { /* upsampled maps of this block's queries */
        const level *l = levels + k;
        const int side_y = By / (H / l->h), side_x = Bx / (W / l->w); /* queries of level k */
        level_maps[k] = next;
        if (l->h == H && l->w == W) continue; /* read directly below */
        for (int a = 0; a < side_y; a++)
            for (int b = 0; b < side_x; b++, next += n) {
                const int q = (bi * side_y + a) * l->w + (bj * side_x + b);
                if (!upsample_normalised(l->map + (size_t)q * l->h * l->w, l, H, W, row_tmp, next))
                    return (long)q * 1024 + k;
            }
    }
    for (int di = 0; di < By; di++)
        for (int dj = 0; dj < Bx; dj++) {
            float *o = out + ((size_t)(bi * By + di) * W + (bj * Bx + dj)) * n;
            for (int k = 0; k < n_levels; k++) {
                const int ry = H / levels[k].h, rx = W / levels[k].w, side_x = Bx / rx;
                const float w = levels[k].weight;
                if (levels[k].h == H && levels[k].w == W) { /* only possible as level 0 */
                    const size_t q = (size_t)(bi * By + di) * W + (bj * Bx + dj);
                    if (!scaled_copy(levels[k].map + q * n, n, w, o)) return (long)q * 1024 + k;
                    continue;
                }
                const float *m = level_maps[k] + ((size_t)(di / ry) * side_x + dj / rx) * n;
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
    return dseg_aggregate_hw(n_maps, res, res, maps, weights, out_res, out_res, out, ex);
}

int dseg_aggregate_hw(int n_maps, const int *h, const int *w, const float *const *maps,
                      const float *weights, int H, int W, float *out, const dseg_exec *ex) {
    dseg_clear_error();
    if (dseg_check_exec(ex) != DSEG_OK) return DSEG_EINVAL;
    if (n_maps < 1 || n_maps > 64)
        return dseg_fail(DSEG_EINVAL, "attn: give 1 to 64 attention maps, got %d", n_maps);
    if (H < 1 || W < 1)
        return dseg_fail(DSEG_EINVAL, "out_res must be >= 1, got %dx%d", H, W);
    if ((int64_t)H * W > DSEG_MAX_POSITIONS)
        return dseg_fail(DSEG_EINVAL, "out_res %dx%d is too large (H * W at most %d)", H, W,
                         DSEG_MAX_POSITIONS);
    if (!h || !w || !maps || !weights || !out)
        return dseg_fail(DSEG_EINVAL, "aggregate: NULL pointer argument");
    int gy = 0, gx = 0; /* blocks: a gy x gx grid, each covering whole queries of every level */
    for (int i = 0; i < n_maps; i++) {
        if (h[i] == H && w[i] == W && i != 0)
            return dseg_fail(DSEG_EINVAL, "attn: the map at out_res must come first");
        if (h[i] < 1 || w[i] < 1 || H % h[i] != 0 || W % w[i] != 0) {
            if (h[i] == w[i] && H == W)
                return dseg_fail(DSEG_EINVAL, "attn: resolution %d does not divide out_res %d",
                                 h[i], H);
            return dseg_fail(DSEG_EINVAL, "attn: resolution %dx%d does not divide out_res %dx%d",
                             h[i], w[i], H, W);
        }
        if (!maps[i]) return dseg_fail(DSEG_EINVAL, "attn: map %d is NULL", i);
        gy = gcd(gy, h[i]), gx = gcd(gx, w[i]);
    }
    const int By = H / gy, Bx = W / gx; /* output queries per block side */
    size_t maps_per_block = 0;
    level levels[64];
    for (int k = 0; k < n_maps; k++) {
        if (h[k] != H || w[k] != W)
            maps_per_block += (size_t)(By / (H / h[k])) * (Bx / (W / w[k]));
        levels[k] = (level){h[k], w[k], weights[k], maps[k],
                            malloc(sizeof(int) * H), malloc(sizeof(int) * H),
                            malloc(sizeof(int) * W), malloc(sizeof(int) * W),
                            malloc(sizeof(float) * H), malloc(sizeof(float) * W)};
        if (!levels[k].iy0 || !levels[k].iy1 || !levels[k].ix0 || !levels[k].ix1 ||
            !levels[k].fy || !levels[k].fx) {
            for (int j = 0; j <= k; j++)
                free(levels[j].iy0), free(levels[j].iy1), free(levels[j].ix0),
                    free(levels[j].ix1), free(levels[j].fy), free(levels[j].fx);
            return dseg_fail(DSEG_ENOMEM, "aggregate: out of memory");
        }
        dseg_bilinear_table(h[k], H, levels[k].iy0, levels[k].iy1, levels[k].fy);
        dseg_bilinear_table(w[k], W, levels[k].ix0, levels[k].ix1, levels[k].fx);
    }

    long empty = -1;
    int oom = 0;
    const size_t n = (size_t)H * W;
#pragma omp parallel num_threads(dseg_threads_for(ex, (double)n * n * n_maps))
    {
        float *buf = dseg_malloc(sizeof(float) * (maps_per_block * n + (size_t)W));
        if (!buf) {
#pragma omp atomic write
            oom = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int blk = 0; blk < gy * gx; blk++) {
            if (!buf) continue;
            const long e = aggregate_block(levels, n_maps, H, W, By, Bx, blk / gx, blk % gx,
                                           buf + (size_t)W, buf, out);
            if (e >= 0) {
#pragma omp critical(dseg_aggregate_empty)
                if (empty < 0 || e < empty) empty = e;
            }
        }
        dseg_free_sized(buf, sizeof(float) * (maps_per_block * n + (size_t)W));
    }
    for (int k = 0; k < n_maps; k++)
        free(levels[k].iy0), free(levels[k].iy1), free(levels[k].ix0), free(levels[k].ix1),
            free(levels[k].fy), free(levels[k].fx);
    if (oom) return dseg_fail(DSEG_ENOMEM, "aggregate: out of memory");
    if (empty >= 0) {
        const int k = (int)(empty % 1024);
        return dseg_fail(DSEG_EINVAL, "attn: the %dx%d map has a query row with no mass (row %ld)",
                         h[k], w[k], empty / 1024);
    }
    return DSEG_OK;
}
