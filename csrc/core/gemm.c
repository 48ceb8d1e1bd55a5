/*
 * C = X Y^T for the merge's cross terms. Built with FMA contraction allowed
 * (setup.py): its results only feed distance estimates that merge.c re-checks
 * near a threshold, so neither contraction nor the ISA clone chosen at run
 * time changes any output.
 */
#include <float.h>
#include <stddef.h>

#include "internal.h"

static dseg_sgemm_fn default_sgemm = NULL; /* process default; calls get theirs in dseg_exec */

void dseg_set_sgemm(dseg_sgemm_fn fn) { default_sgemm = fn; }

dseg_sgemm_fn dseg_get_sgemm(void) { return default_sgemm; }

enum {
    TILE = 4,    /* 4 x 4 dot products per micro-kernel call */
    KBLOCK = 1024, /* reduction slice */
    JBLOCK = 64,   /* rows of Y per thread task: a JBLOCK x KBLOCK slab stays in L2 */
};

/* acc[a][b] = sum over k in [0, len) of x[a][k] * y[b][k], b = 0, 1. Eight
 * vector accumulators and six loads per k step: no register spills with 16
 * vector registers (AVX2), where a 4 x 4 tile spilled. */
DSEG_CLONES
static void dot_tile_4x2(const float *const x[TILE], const float *y0, const float *y1, int len,
                         float acc[TILE][2]) {
    float c00 = 0, c01 = 0, c10 = 0, c11 = 0, c20 = 0, c21 = 0, c30 = 0, c31 = 0;
    const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
#pragma omp simd reduction(+ : c00, c01, c10, c11, c20, c21, c30, c31)
    for (int k = 0; k < len; k++) {
        c00 += x0[k] * y0[k]; c01 += x0[k] * y1[k];
        c10 += x1[k] * y0[k]; c11 += x1[k] * y1[k];
        c20 += x2[k] * y0[k]; c21 += x2[k] * y1[k];
        c30 += x3[k] * y0[k]; c31 += x3[k] * y1[k];
    }
    acc[0][0] = c00; acc[0][1] = c01; acc[1][0] = c10; acc[1][1] = c11;
    acc[2][0] = c20; acc[2][1] = c21; acc[3][0] = c30; acc[3][1] = c31;
}

/* acc[a][b] = sum over k in [0, len) of x[a][k] * y[b][k]. */
static void dot_tile(const float *const x[TILE], const float *const y[TILE], int len,
                     float acc[TILE][TILE]) {
    float half[TILE][2];
    for (int b = 0; b < TILE; b += 2) {
        dot_tile_4x2(x, y[b], y[b + 1], len, half);
        for (int a = 0; a < TILE; a++) acc[a][b] = half[a][0], acc[a][b + 1] = half[a][1];
    }
}

/* Rows r..r+TILE-1 of M (clamped to the last row: results past the edge are
 * computed and dropped), starting at column k0. */
static void tile_rows(const float *M, int rows, int ld, int r, int k0, const float *out[TILE]) {
    for (int a = 0; a < TILE; a++)
        out[a] = M + (size_t)(r + a < rows ? r + a : rows - 1) * ld + k0;
}

/* Does the tile at (i, j) hold an entry marked in need? */
static int tile_needed(const unsigned char *need, int m, int n, int ld, int i, int j) {
    if (!need) return 1;
    for (int a = i; a < i + TILE && a < m; a++)
        for (int b = j; b < j + TILE && b < n; b++)
            if (need[(size_t)a * ld + b]) return 1;
    return 0;
}

static void builtin_gemm_nt(const dseg_exec *ex DSEG_OMP_ONLY, int m, int n, int k, const float *X, int ldx, const float *Y,
                            int ldy, float *C, int ldc, int accumulate,
                            const unsigned char *need) {
    const int jblocks = (n + JBLOCK - 1) / JBLOCK;
    /* A thread owns whole column blocks of C, and each entry sums its k
     * slices in order: the result does not depend on the thread count. */
#pragma omp parallel for schedule(dynamic, 1) num_threads(dseg_threads_for(ex, (double)m * n * k))
    for (int jb = 0; jb < jblocks; jb++) {
        const int j_end = (jb + 1) * JBLOCK < n ? (jb + 1) * JBLOCK : n;
        for (int k0 = 0; k0 < k; k0 += KBLOCK) {
            const int len = k - k0 < KBLOCK ? k - k0 : KBLOCK;
            const int add = accumulate || k0 > 0;
            for (int i = 0; i < m; i += TILE) {
                const float *xr[TILE];
                tile_rows(X, m, ldx, i, k0, xr);
                for (int j = jb * JBLOCK; j < j_end; j += TILE) {
                    if (!tile_needed(need, m, n, ldc, i, j)) continue;
                    const float *yr[TILE];
                    float acc[TILE][TILE];
                    tile_rows(Y, n, ldy, j, k0, yr);
                    dot_tile(xr, yr, len, acc);
                    for (int a = 0; a < TILE && i + a < m; a++)
                        for (int b = 0; b < TILE && j + b < j_end; b++) {
                            float *c = C + (size_t)(i + a) * ldc + (j + b);
                            *c = add ? *c + acc[a][b] : acc[a][b];
                        }
                }
            }
        }
    }
}

/*
 * Bound on |error| / sum |x_i y_i| of a cross term (two k-term GEMMs summed).
 * Built-in kernel: each entry is a sum of KBLOCK-term slices added in order,
 * so no chain of float additions is longer than KBLOCK + 2k / KBLOCK (fewer
 * with SIMD lanes); gamma_n = n u / (1 - n u) is about 6.2e-5 for R = 64.
 * 1e-4 covers that with room for the log approximation (~2 ulp of each log)
 * and the rounding of the double sums. An external sgemm may sum all 2k
 * terms in one chain: gamma_2k, with the same 1e-4 floor.
 */
double dseg_gemm_rel_error(const dseg_exec *ex, int k) {
    const double u = FLT_EPSILON / 2;
    const double chain = ex->sgemm ? 2.0 * k + 2 : KBLOCK + 2.0 * k / KBLOCK + 2;
    const double gamma = chain * u / (1 - chain * u);
    return gamma * 1.6 > 1e-4 ? gamma * 1.6 : 1e-4;
}

void dseg_gemm_nt(const dseg_exec *ex, int m, int n, int k, const float *X, int ldx,
                  const float *Y, int ldy, float *C, int ldc, int accumulate,
                  const unsigned char *need) {
    if (m <= 0 || n <= 0) return;
    if (ex->sgemm) {
        /* Row-major C = X Y^T is column-major C^T = Y X^T. */
        const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
        ex->sgemm("T", "N", &n, &m, &k, &one, Y, &ldy, X, &ldx, &beta, C, &ldc);
        return;
    }
    builtin_gemm_nt(ex, m, n, k, X, ldx, Y, ldy, C, ldc, accumulate, need);
}
