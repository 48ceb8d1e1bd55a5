/*
 * C = X Y^T for the merge's cross terms. Built with FMA contraction allowed
 * (setup.py): its results only feed distance estimates that merge.c re-checks
 * near a threshold, so neither contraction nor the kernel chosen at run time
 * (AVX2+FMA or portable) changes any output.
 */
#include <float.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(DSEG_NO_CLONES)
#define DSEG_GEMM_AVX2 1
#include <immintrin.h>
#else
#define DSEG_GEMM_AVX2 0
#endif

static dseg_sgemm_fn default_sgemm = NULL; /* process default; calls get theirs in dseg_exec */

void dseg_set_sgemm(dseg_sgemm_fn fn) { default_sgemm = fn; }

dseg_sgemm_fn dseg_get_sgemm(void) { return default_sgemm; }

/*
 * Built-in kernel: packed, register-blocked outer products.
 *
 * An MR x NR tile of C (MR rows of X, NR rows of Y) is summed in registers
 * over one KC-long slice of k: per k step, NR values of Y (a packed panel,
 * k-major) times each of MR broadcast values of X (a packed panel, k-major).
 * AVX2: 4 x 24 = 12 ymm accumulators, 3 loads of Y and 4 broadcasts per step.
 * Loop nest: MC rows of X at a time; k slices in order; per slice all threads
 * pack the X block (MC x KC, L2) and then take Y panels (NR x KC, L1) and
 * sweep the X block's panels. Each entry of C thus gets, slice after slice,
 * C = acc (first slice, no accumulate) or C = C + acc, acc being one
 * sequential chain over the slice: the same operations in the same order
 * whichever thread does a tile, so the result does not depend on the thread
 * count. need is honoured per MR x NR tile (a tile with no needed entry is
 * skipped: coarser than the 4 x 4 the interface promises, never finer).
 */
enum {
    MR = DSEG_GEMM_MR, /* pack_x4 assumes 4 */
    NR = DSEG_GEMM_NR,
    KC = DSEG_GEMM_KC, /* Y panel NR x KC floats: 24 KiB, stays in L1 */
    MC = 256, /* X block MC x KC floats: 256 KiB, stays in L2 */
};

/* Does the tile at (i, j), rows x cols, hold an entry marked in need? */
static int tile_needed(const unsigned char *need, int ld, int i, int j, int rows, int cols) {
    if (!need) return 1;
    for (int a = 0; a < rows; a++) {
        const unsigned char *r = need + (size_t)(i + a) * ld + j;
        for (int b = 0; b < cols; b++)
            if (r[b]) return 1;
    }
    return 0;
}

/* Store an MR x NR tile: C = acc or C += acc on the rows x cols in range. */
static void store_tile(const float acc[MR][NR], float *C, int ldc, int rows, int cols, int add) {
    for (int a = 0; a < rows; a++) {
        float *c = C + (size_t)a * ldc;
        if (add)
            for (int b = 0; b < cols; b++) c[b] += acc[a][b];
        else
            for (int b = 0; b < cols; b++) c[b] = acc[a][b];
    }
}

/* Portable micro-kernel: same order of operations as the AVX2 one. */
static void kernel_generic(int len, const float *xp, const float *yp, float *C, int ldc,
                           int rows, int cols, int add) {
    float acc[MR][NR];
    memset(acc, 0, sizeof acc);
    for (int k = 0; k < len; k++) {
        const float *x = xp + (size_t)k * MR, *y = yp + (size_t)k * NR;
        for (int a = 0; a < MR; a++)
            for (int b = 0; b < NR; b++) acc[a][b] += x[a] * y[b];
    }
    store_tile((const float(*)[NR])acc, C, ldc, rows, cols, add);
}

static void pack_panel(const float *M, int ld, const int *idx, int r0, int rows, int k0, int len,
                       int w, float *out);

#if DSEG_GEMM_AVX2
__attribute__((target("avx2,fma")))
static void kernel_avx2(int len, const float *xp, const float *yp, float *C, int ldc,
                        int rows, int cols, int add) {
    __m256 c00 = _mm256_setzero_ps(), c01 = c00, c02 = c00, c10 = c00, c11 = c00, c12 = c00,
           c20 = c00, c21 = c00, c22 = c00, c30 = c00, c31 = c00, c32 = c00;
    for (int k = 0; k < len; k++) {
        const float *x = xp + (size_t)k * MR, *y = yp + (size_t)k * NR;
        const __m256 y0 = _mm256_loadu_ps(y), y1 = _mm256_loadu_ps(y + 8),
                     y2 = _mm256_loadu_ps(y + 16);
        __m256 b = _mm256_broadcast_ss(x);
        c00 = _mm256_fmadd_ps(b, y0, c00); c01 = _mm256_fmadd_ps(b, y1, c01);
        c02 = _mm256_fmadd_ps(b, y2, c02);
        b = _mm256_broadcast_ss(x + 1);
        c10 = _mm256_fmadd_ps(b, y0, c10); c11 = _mm256_fmadd_ps(b, y1, c11);
        c12 = _mm256_fmadd_ps(b, y2, c12);
        b = _mm256_broadcast_ss(x + 2);
        c20 = _mm256_fmadd_ps(b, y0, c20); c21 = _mm256_fmadd_ps(b, y1, c21);
        c22 = _mm256_fmadd_ps(b, y2, c22);
        b = _mm256_broadcast_ss(x + 3);
        c30 = _mm256_fmadd_ps(b, y0, c30); c31 = _mm256_fmadd_ps(b, y1, c31);
        c32 = _mm256_fmadd_ps(b, y2, c32);
    }
    if (rows == MR && cols == NR) {
        const __m256 acc[MR][3] = {{c00, c01, c02}, {c10, c11, c12}, {c20, c21, c22},
                                   {c30, c31, c32}};
        for (int a = 0; a < MR; a++) {
            float *c = C + (size_t)a * ldc;
            for (int v = 0; v < 3; v++) {
                __m256 r = acc[a][v];
                if (add) r = _mm256_add_ps(_mm256_loadu_ps(c + 8 * v), r);
                _mm256_storeu_ps(c + 8 * v, r);
            }
        }
        return;
    }
    float acc[MR][NR];
    _mm256_storeu_ps(acc[0], c00); _mm256_storeu_ps(acc[0] + 8, c01); _mm256_storeu_ps(acc[0] + 16, c02);
    _mm256_storeu_ps(acc[1], c10); _mm256_storeu_ps(acc[1] + 8, c11); _mm256_storeu_ps(acc[1] + 16, c12);
    _mm256_storeu_ps(acc[2], c20); _mm256_storeu_ps(acc[2] + 8, c21); _mm256_storeu_ps(acc[2] + 16, c22);
    _mm256_storeu_ps(acc[3], c30); _mm256_storeu_ps(acc[3] + 8, c31); _mm256_storeu_ps(acc[3] + 16, c32);
    store_tile((const float(*)[NR])acc, C, ldc, rows, cols, add);
}
/* pack_panel for a full NR-wide panel of Y: 8 x 8 transposes. */
__attribute__((target("avx2,fma")))
static void pack_y_avx2(const float *M, int ld, const int *idx, int r0, int rows, int k0, int len,
                        float *out) {
    if (rows < NR) {
        pack_panel(M, ld, idx, r0, rows, k0, len, NR, out);
        return;
    }
    const int len8 = len / 8 * 8;
    for (int g = 0; g < NR; g += 8) {
        const float *src[8];
        for (int a = 0; a < 8; a++) src[a] = dseg_row(M, ld, idx, r0 + g + a) + k0;
        for (int k = 0; k < len8; k += 8) {
            __m256 r0v = _mm256_loadu_ps(src[0] + k), r1 = _mm256_loadu_ps(src[1] + k),
                   r2 = _mm256_loadu_ps(src[2] + k), r3 = _mm256_loadu_ps(src[3] + k),
                   r4 = _mm256_loadu_ps(src[4] + k), r5 = _mm256_loadu_ps(src[5] + k),
                   r6 = _mm256_loadu_ps(src[6] + k), r7 = _mm256_loadu_ps(src[7] + k);
            const __m256 t0 = _mm256_unpacklo_ps(r0v, r1), t1 = _mm256_unpackhi_ps(r0v, r1),
                         t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3),
                         t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
                         t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
            const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
                         u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
                         u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
                         u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
            float *o = out + (size_t)k * NR + g;
            _mm256_storeu_ps(o + 0 * NR, _mm256_permute2f128_ps(u0, u4, 0x20));
            _mm256_storeu_ps(o + 1 * NR, _mm256_permute2f128_ps(u1, u5, 0x20));
            _mm256_storeu_ps(o + 2 * NR, _mm256_permute2f128_ps(u2, u6, 0x20));
            _mm256_storeu_ps(o + 3 * NR, _mm256_permute2f128_ps(u3, u7, 0x20));
            _mm256_storeu_ps(o + 4 * NR, _mm256_permute2f128_ps(u0, u4, 0x31));
            _mm256_storeu_ps(o + 5 * NR, _mm256_permute2f128_ps(u1, u5, 0x31));
            _mm256_storeu_ps(o + 6 * NR, _mm256_permute2f128_ps(u2, u6, 0x31));
            _mm256_storeu_ps(o + 7 * NR, _mm256_permute2f128_ps(u3, u7, 0x31));
        }
        for (int a = 0; a < 8; a++)
            for (int k = len8; k < len; k++) out[(size_t)k * NR + g + a] = src[a][k];
    }
}
#endif

typedef void (*pack_fn)(const float *, int, const int *, int, int, int, int, float *);

static void pack_y_generic(const float *M, int ld, const int *idx, int r0, int rows, int k0,
                           int len, float *out) {
    pack_panel(M, ld, idx, r0, rows, k0, len, NR, out);
}

static pack_fn pick_pack(void) {
#if DSEG_GEMM_AVX2
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return pack_y_avx2;
#endif
    return pack_y_generic;
}

typedef void (*kernel_fn)(int, const float *, const float *, float *, int, int, int, int);

static kernel_fn pick_kernel(void) {
#if DSEG_GEMM_AVX2
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return kernel_avx2;
#endif
    return kernel_generic;
}

#if DSEG_GEMM_AVX2
/* An MR-wide panel of X (MR = 4): 4 x 4 transposes (SSE, baseline x86-64). */
static void pack_x4(const float *M, int ld, int r0, int rows, int k0, int len, float *out) {
    const float *s0 = M + (size_t)r0 * ld + k0, *s1 = s0 + (size_t)(rows > 1) * ld,
                *s2 = s0 + (size_t)(rows > 2 ? 2 : 0) * ld, *s3 = s0 + (size_t)(rows > 3 ? 3 : 0) * ld;
    const int len4 = len / 4 * 4;
    for (int k = 0; k < len4; k += 4) {
        __m128 a = _mm_loadu_ps(s0 + k), b = _mm_loadu_ps(s1 + k), c = _mm_loadu_ps(s2 + k),
               d = _mm_loadu_ps(s3 + k);
        if (rows < 4) {
            const __m128 z = _mm_setzero_ps();
            if (rows < 2) b = z;
            if (rows < 3) c = z;
            d = z;
        }
        _MM_TRANSPOSE4_PS(a, b, c, d);
        _mm_storeu_ps(out + (size_t)k * 4, a);
        _mm_storeu_ps(out + (size_t)k * 4 + 4, b);
        _mm_storeu_ps(out + (size_t)k * 4 + 8, c);
        _mm_storeu_ps(out + (size_t)k * 4 + 12, d);
    }
    const float *src[4] = {s0, s1, s2, s3};
    for (int k = len4; k < len; k++)
        for (int a = 0; a < 4; a++) out[(size_t)k * 4 + a] = a < rows ? src[a][k] : 0.0f;
}
#endif

/* Pack rows [r0, r0 + rows) of M (rows idx[r0], ... when idx), columns
 * [k0, k0 + len), into MR- or NR-wide k-major panels (width w); rows past the
 * end are zero. */
static void pack_panel(const float *M, int ld, const int *idx, int r0, int rows, int k0, int len,
                       int w, float *out) {
    for (int a = 0; a < w; a++) {
        if (a < rows) {
            const float *src = dseg_row(M, ld, idx, r0 + a) + k0;
            for (int k = 0; k < len; k++) out[(size_t)k * w + a] = src[k];
        } else {
            for (int k = 0; k < len; k++) out[(size_t)k * w + a] = 0.0f;
        }
    }
}

/*
 * Dot-product kernel, for a C with few columns (n < DOT_MAX_N): no packing
 * (packing X would cost more than it saves when each row of X meets few rows
 * of Y). 4 x 4 tiles of dot products over KC-long slices, the slices added in
 * order; a thread owns whole DJ-wide column blocks of C.
 */
enum { DT = 4, DJ = 64, DOT_MAX_N = 48 };

/* acc[a][b] = sum over k in [0, len) of x[a][k] * y[b][k], b = 0, 1. Eight
 * vector accumulators and six loads per k step: no register spills with 16
 * vector registers (AVX2), where a 4 x 4 tile spilled. */
DSEG_CLONES
static void dot_tile_4x2(const float *const x[DT], const float *y0, const float *y1, int len,
                         float acc[DT][2]) {
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
static void dot_tile(const float *const x[DT], const float *const y[DT], int len,
                     float acc[DT][DT]) {
    float half[DT][2];
    for (int b = 0; b < DT; b += 2) {
        dot_tile_4x2(x, y[b], y[b + 1], len, half);
        for (int a = 0; a < DT; a++) acc[a][b] = half[a][0], acc[a][b + 1] = half[a][1];
    }
}

/* Rows r..r+DT-1 of M (clamped to the last row: results past the edge are
 * computed and dropped), starting at column k0. */
static void tile_rows(const float *M, int rows, int ld, int r, int k0, const float *out[DT]) {
    for (int a = 0; a < DT; a++)
        out[a] = M + (size_t)(r + a < rows ? r + a : rows - 1) * ld + k0;
}

/* Does the tile at (i, j) hold an entry marked in need? */
static int dot_tile_needed(const unsigned char *need, int m, int n, int ld, int i, int j) {
    if (!need) return 1;
    for (int a = i; a < i + DT && a < m; a++)
        for (int b = j; b < j + DT && b < n; b++)
            if (need[(size_t)a * ld + b]) return 1;
    return 0;
}

static void dot_gemm_nt(const dseg_exec *ex DSEG_OMP_ONLY, int m, int n, int k, const float *X, int ldx, const float *Y,
                            int ldy, float *C, int ldc, int accumulate,
                            const unsigned char *need) {
    const int jblocks = (n + DJ - 1) / DJ;
    /* A thread owns whole column blocks of C, and each entry sums its k
     * slices in order: the result does not depend on the thread count. */
#pragma omp parallel for schedule(dynamic, 1) num_threads(dseg_threads_for(ex, (double)m * n * k))
    for (int jb = 0; jb < jblocks; jb++) {
        const int j_end = (jb + 1) * DJ < n ? (jb + 1) * DJ : n;
        for (int k0 = 0; k0 < k; k0 += KC) {
            const int len = k - k0 < KC ? k - k0 : KC;
            const int add = accumulate || k0 > 0;
            for (int i = 0; i < m; i += DT) {
                const float *xr[DT];
                tile_rows(X, m, ldx, i, k0, xr);
                for (int j = jb * DJ; j < j_end; j += DT) {
                    if (!dot_tile_needed(need, m, n, ldc, i, j)) continue;
                    const float *yr[DT];
                    float acc[DT][DT];
                    tile_rows(Y, n, ldy, j, k0, yr);
                    dot_tile(xr, yr, len, acc);
                    for (int a = 0; a < DT && i + a < m; a++)
                        for (int b = 0; b < DT && j + b < j_end; b++) {
                            float *c = C + (size_t)(i + a) * ldc + (j + b);
                            *c = add ? *c + acc[a][b] : acc[a][b];
                        }
                }
            }
        }
    }
}

/* 0 when the packing buffer cannot be had (the caller falls back). */
static int builtin_gemm_nt(const dseg_exec *ex DSEG_OMP_ONLY, int m, int n, int k, const float *X,
                           int ldx, const float *Y, int ldy, const int *yrows, float *C, int ldc,
                           int accumulate, const unsigned char *need, const dseg_pack_hook *hook) {
    const kernel_fn kernel = pick_kernel();
    const pack_fn pack_y = pick_pack();
    const int kk = k > 0 ? k : 1, slices = (kk + KC - 1) / KC;
    /* X is packed up front, slice-major ([slice][panel][k][MR]), a chunk of
     * rows at a time: one parallel loop per chunk and no barrier inside. */
    /* With a hook, chunks of one X block: each Y panel then has one task
     * per chunk, so no two threads transform one block of Y at once. */
    const int chunk_max = !hook && (int)(((size_t)1 << 21) / kk) / MC * MC > MC
                              ? (int)(((size_t)1 << 21) / kk) / MC * MC : MC;
    const int chunk = m < chunk_max ? m : chunk_max;
    const size_t chunk_panels = (size_t)(chunk + MR - 1) / MR;
    const int kc = kk < KC ? kk : KC; /* the longest slice */
    float *xpack = dseg_malloc(sizeof(float) * chunk_panels * MR * (size_t)slices * kc);
    if (!xpack) return 0;
    const int npanels = (n + NR - 1) / NR;
    for (int c0 = 0; c0 < m; c0 += chunk) {
        const int crows = m - c0 < chunk ? m - c0 : chunk;
        const int cpanels = (crows + MR - 1) / MR;
#pragma omp parallel for schedule(static) num_threads(dseg_threads_for(ex, (double)crows * k * 4))
        for (int sp = 0; sp < slices * cpanels; sp++) { /* a copy: any thread, same bytes */
            const int s = sp / cpanels, p = sp % cpanels;
            const int k0 = s * KC, len = k - k0 < KC ? k - k0 : KC;
            const int rows = crows - p * MR < MR ? crows - p * MR : MR;
            float *out = xpack + ((size_t)s * cpanels + p) * MR * kc;
#if DSEG_GEMM_AVX2
            pack_x4(X, ldx, c0 + p * MR, rows, k0, len, out);
#else
            pack_panel(X, ldx, NULL, c0 + p * MR, rows, k0, len, MR, out);
#endif
        }
        /* A task is one NR-wide panel of Y against a block of X panels (at
         * most MC rows; fewer when n has too few panels to share out): each
         * entry of C is summed by one thread, slice after slice. */
        const int per_block = MC / MR, want = 16;
        int blocks = (cpanels + per_block - 1) / per_block;
        if (!hook && npanels * blocks < want) {
            const int more = (want + npanels - 1) / npanels;
            blocks = more < cpanels ? more : cpanels;
        }
        const int bpanels = (cpanels + blocks - 1) / blocks;
        blocks = (cpanels + bpanels - 1) / bpanels;
        const int tasks = npanels * blocks;
#pragma omp parallel for schedule(dynamic, 1) num_threads(dseg_threads_for(ex, (double)crows * n * k))
        for (int t = 0; t < tasks; t++) {
            float ypack[KC * NR], transformed[NR * KC];
            const int q = t / blocks, p0 = t % blocks * bpanels;
            const int p1 = p0 + bpanels < cpanels ? p0 + bpanels : cpanels;
            const int j = q * NR, cols = n - j < NR ? n - j : NR;
            for (int s = 0; s < slices; s++) {
                const int k0 = s * KC, len = k - k0 < KC ? k - k0 : KC;
                const int add = accumulate || k0 > 0;
                int packed = 0;
                for (int p = p0; p < p1; p++) {
                    const int i = c0 + p * MR, rows = m - i < MR ? m - i : MR;
                    if (!tile_needed(need, ldc, i, j, rows, cols)) continue;
                    if (!packed) {
                        if (hook) {
                            hook->transform(hook->ctx, Y, ldy, j, cols, k0, len, transformed, KC);
                            pack_y(transformed, KC, NULL, 0, cols, 0, len, ypack);
                        } else {
                            pack_y(Y, ldy, yrows, j, cols, k0, len, ypack);
                        }
                        packed = 1;
                    }
                    kernel(len, xpack + ((size_t)s * cpanels + p) * MR * kc, ypack,
                           C + (size_t)i * ldc + j, ldc, rows, cols, add);
                }
            }
        }
    }
    dseg_free_sized(xpack, sizeof(float) * chunk_panels * MR * (size_t)slices * kc);
    return 1;
}

/* Without the packing buffer: the same sums, serial and unblocked by tiles. */
static void plain_gemm_nt(int m, int n, int k, const float *X, int ldx, const float *Y, int ldy,
                          float *C, int ldc, int accumulate, const unsigned char *need) {
    for (int i = 0; i < m; i++)
        for (int j = 0; j < n; j++) {
            if (need && !need[(size_t)i * ldc + j]) continue;
            const float *x = X + (size_t)i * ldx, *y = Y + (size_t)j * ldy;
            float *c = C + (size_t)i * ldc + j;
            for (int k0 = 0; k0 < k || (k0 == 0 && k == 0); k0 += KC) {
                const int len = k - k0 < KC ? k - k0 : KC;
                float acc = 0;
                for (int t = k0; t < k0 + len; t++) acc += x[t] * y[t];
                *c = accumulate || k0 > 0 ? *c + acc : acc;
            }
        }
}

/*
 * Bound on |error| / sum |x_i y_i| of a cross term (two k-term GEMMs, the
 * second accumulated onto the first). Built-in kernels (packed, dot-product
 * and the fallback alike): an entry is C = s_1, C += s_2, ..., over the
 * B = ceil(k / KC) slices of each GEMM, each s_b a sum of at most KC products
 * from zero. The packed kernel sums a slice as one chain acc = fma(x, y, acc)
 * (or a rounded product then a rounded add); the dot-product kernel splits it
 * over SIMD lanes and adds the lanes: either way a binary tree of additions,
 * so a product goes through at most KC - 1 additions of its slice and one
 * rounding of its own (an FMA rounds product and sum together). Then at most
 * 2B - 1 slice additions: no term goes through more than
 * KC + 2 ceil(k / KC) roundings, and |error| <= gamma_chain sum |x_i y_i| with
 * gamma_n = n u / (1 - n u) (Higham, Lemma 3.1 and section 3.1). With the + 2
 * of slack kept: chain 290, gamma about 1.7e-5, for k = 4096; the chain grows by
 * 2 per KC of k. An external sgemm may sum all 2k terms in one chain:
 * gamma_2k. dseg_gemm_chain_error is 1.6 gamma_chain (the 1.6: room for the
 * (1 + small) factors its callers drop); dseg_gemm_rel_error floors that at
 * 1e-4, which covers the log approximation (~2 ulp of each log) and the
 * rounding of double sums for callers that do not bound them separately
 * (merge.c bounds them separately and uses the chain error).
 */
double dseg_gemm_chain_error(const dseg_exec *ex, int k) {
    const double u = FLT_EPSILON / 2;
    const double slices = k > 0 ? (double)((k + KC - 1) / KC) : 1.0;
    const double chain = ex->sgemm ? 2.0 * k + 2 : KC + 2.0 * slices + 2;
    return 1.6 * chain * u / (1 - chain * u);
}

double dseg_gemm_rel_error(const dseg_exec *ex, int k) {
    const double g = dseg_gemm_chain_error(ex, k);
    return g > 1e-4 ? g : 1e-4;
}

/* Only the packed built-in kernel has a packing step to hook. */
int dseg_gemm_can_hook(const dseg_exec *ex, int n) { return !ex->sgemm && n >= DOT_MAX_N; }

int dseg_gemm_nt_hooked(const dseg_exec *ex, int m, int n, int k, const float *X, int ldx,
                        const float *Y, int ldy, float *C, int ldc, int accumulate,
                        const unsigned char *need, const dseg_pack_hook *hook) {
    if (!dseg_gemm_can_hook(ex, n) || m <= 0 || k <= 0) return 0;
    return builtin_gemm_nt(ex, m, n, k, X, ldx, Y, ldy, NULL, C, ldc, accumulate, need, hook);
}

int dseg_gemm_nt_rows(const dseg_exec *ex, int m, int n, int k, const float *X, int ldx,
                      const float *Y, int ldy, const int *yrows, float *C, int ldc, int accumulate,
                      const unsigned char *need) {
    if (!dseg_gemm_can_hook(ex, n) || m <= 0 || k <= 0) return 0;
    return builtin_gemm_nt(ex, m, n, k, X, ldx, Y, ldy, yrows, C, ldc, accumulate, need, NULL);
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
    if (n < DOT_MAX_N)
        dot_gemm_nt(ex, m, n, k, X, ldx, Y, ldy, C, ldc, accumulate, need);
    else if (!builtin_gemm_nt(ex, m, n, k, X, ldx, Y, ldy, NULL, C, ldc, accumulate, need, NULL))
        plain_gemm_nt(m, n, k, X, ldx, Y, ldy, C, ldc, accumulate, need);
}
