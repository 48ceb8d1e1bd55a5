/* Errors, thread control, allocation and the GEMM used by merging. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

static __thread char last_error[512];

const char *dseg_last_error(void) { return last_error; }

void dseg_clear_error(void) { last_error[0] = '\0'; }

int dseg_fail(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return code;
}

void *dseg_malloc(size_t bytes) {
    /* 64-byte alignment keeps vector loads aligned for the kernels. */
    void *p = NULL;
    if (posix_memalign(&p, 64, bytes ? bytes : 1) != 0) return NULL;
    return p;
}

/* ---- threads ---------------------------------------------------------- */

static int requested_threads = 0; /* 0: all cores */

void dseg_set_num_threads(int n) { requested_threads = n < 1 ? 0 : n; }

int dseg_threads(void) {
#ifdef _OPENMP
    return requested_threads > 0 ? requested_threads : omp_get_num_procs();
#else
    return 1;
#endif
}

int dseg_get_num_threads(void) { return dseg_threads(); }

int dseg_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* ---- GEMM --------------------------------------------------------------- */

static dseg_sgemm_fn external_sgemm = NULL;

void dseg_set_sgemm(dseg_sgemm_fn fn) { external_sgemm = fn; }

dseg_sgemm_fn dseg_get_sgemm(void) { return external_sgemm; }

enum { TILE = 4, KBLOCK = 512 };

/* One TILE x TILE block of dot products over k in [k0, k1). Rows beyond the
 * matrix edge are clamped to the last row and their results discarded. */
static void dot_tile(const float *const x[TILE], const float *const y[TILE],
                     int k0, int k1, float acc[TILE][TILE]) {
    float c00 = 0, c01 = 0, c02 = 0, c03 = 0, c10 = 0, c11 = 0, c12 = 0, c13 = 0;
    float c20 = 0, c21 = 0, c22 = 0, c23 = 0, c30 = 0, c31 = 0, c32 = 0, c33 = 0;
    const float *x0 = x[0], *x1 = x[1], *x2 = x[2], *x3 = x[3];
    const float *y0 = y[0], *y1 = y[1], *y2 = y[2], *y3 = y[3];
#pragma omp simd reduction(+ : c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, \
                               c22, c23, c30, c31, c32, c33)
    for (int k = k0; k < k1; k++) {
        c00 += x0[k] * y0[k]; c01 += x0[k] * y1[k]; c02 += x0[k] * y2[k]; c03 += x0[k] * y3[k];
        c10 += x1[k] * y0[k]; c11 += x1[k] * y1[k]; c12 += x1[k] * y2[k]; c13 += x1[k] * y3[k];
        c20 += x2[k] * y0[k]; c21 += x2[k] * y1[k]; c22 += x2[k] * y2[k]; c23 += x2[k] * y3[k];
        c30 += x3[k] * y0[k]; c31 += x3[k] * y1[k]; c32 += x3[k] * y2[k]; c33 += x3[k] * y3[k];
    }
    acc[0][0] += c00; acc[0][1] += c01; acc[0][2] += c02; acc[0][3] += c03;
    acc[1][0] += c10; acc[1][1] += c11; acc[1][2] += c12; acc[1][3] += c13;
    acc[2][0] += c20; acc[2][1] += c21; acc[2][2] += c22; acc[2][3] += c23;
    acc[3][0] += c30; acc[3][1] += c31; acc[3][2] += c32; acc[3][3] += c33;
}

static void builtin_gemm_nt(int m, int n, int k, const float *X, int ldx,
                            const float *Y, int ldy, float *C, int ldc,
                            int accumulate) {
    const int mt = (m + TILE - 1) / TILE, nt = (n + TILE - 1) / TILE;
    const long tiles = (long)mt * nt;
    /* Each output tile is owned by one thread and summed in a fixed order,
     * so the result does not depend on the thread count. */
#pragma omp parallel for schedule(static) num_threads(dseg_threads())
    for (long t = 0; t < tiles; t++) {
        const int i = (int)(t / nt) * TILE, j = (int)(t % nt) * TILE;
        const float *xr[TILE], *yr[TILE];
        float acc[TILE][TILE] = {{0}};
        for (int a = 0; a < TILE; a++) {
            xr[a] = X + (size_t)(i + a < m ? i + a : m - 1) * ldx;
            yr[a] = Y + (size_t)(j + a < n ? j + a : n - 1) * ldy;
        }
        for (int k0 = 0; k0 < k; k0 += KBLOCK)
            dot_tile(xr, yr, k0, k0 + KBLOCK < k ? k0 + KBLOCK : k, acc);
        for (int a = 0; a < TILE && i + a < m; a++)
            for (int b = 0; b < TILE && j + b < n; b++) {
                float *c = C + (size_t)(i + a) * ldc + (j + b);
                *c = accumulate ? *c + acc[a][b] : acc[a][b];
            }
    }
}

void dseg_gemm_nt(int m, int n, int k, const float *X, int ldx, const float *Y,
                  int ldy, float *C, int ldc, int accumulate) {
    if (m <= 0 || n <= 0) return;
    if (external_sgemm) {
        /* Row-major C = X Y^T is column-major C^T = Y X^T. */
        const float one = 1.0f, beta = accumulate ? 1.0f : 0.0f;
        external_sgemm("T", "N", &n, &m, &k, &one, Y, &ldy, X, &ldx, &beta, C, &ldc);
        return;
    }
    builtin_gemm_nt(m, n, k, X, ldx, Y, ldy, C, ldc, accumulate);
}

/* ---- bilinear ------------------------------------------------------------ */

void dseg_bilinear_table(int in, int out, int *i0, int *i1, float *frac) {
    const double scale = (double)in / (double)out;
    for (int d = 0; d < out; d++) {
        double src = (d + 0.5) * scale - 0.5;
        if (src < 0) src = 0;
        int lo = (int)floor(src);
        if (lo > in - 1) lo = in - 1;
        i0[d] = lo;
        i1[d] = lo < in - 1 ? lo + 1 : lo;
        frac[d] = (float)(src - lo);
    }
}
