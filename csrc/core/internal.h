/* Private helpers shared by the core's translation units. */
#ifndef DIFFSEG_INTERNAL_H
#define DIFFSEG_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include "diffseg_core.h"

#ifdef _OPENMP
#include <omp.h>
#endif

/* Run-time dispatch of hot loops to AVX-512 / AVX2+FMA clones where the
 * compiler supports it. Only for code whose output does not depend on the
 * clone (estimates, or element-wise work with contraction off). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(DSEG_NO_CLONES)
#define DSEG_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DSEG_CLONES
#endif

/* Record a printf-style message for dseg_last_error(); returns code. */
int dseg_fail(int code, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
void dseg_clear_error(void);

/* Marks a dseg_exec parameter that only num_threads clauses read (unused
 * when built without OpenMP). */
#ifdef _OPENMP
#define DSEG_OMP_ONLY
#else
#define DSEG_OMP_ONLY __attribute__((unused))
#endif

/* Threads for a region of about `work` element operations: one when that is
 * too little to repay waking a team, else ex->threads. */
int dseg_threads_for(const dseg_exec *ex, double work);
/* Is *ex usable? (else fails with EINVAL naming `exec`) */
int dseg_check_exec(const dseg_exec *ex);

/*
 * C (m, n) = X (m, k) * Y (n, k)^T (+ C when accumulate), row-major with
 * leading dimensions ldx, ldy, ldc. Uses ex->sgemm when set, else a
 * packed, register-blocked, OpenMP-parallel kernel (AVX2+FMA when the CPU
 * has it). need (m, n, leading dimension ldc) may mark
 * the entries wanted: the built-in kernel then skips tiles (4 x 24; 4 x 4 for
 * n < 48) with none
 * (entries outside needed tiles are left undefined). NULL: all.
 */
void dseg_gemm_nt(const dseg_exec *ex, int m, int n, int k, const float *X, int ldx,
                  const float *Y, int ldy, float *C, int ldc, int accumulate,
                  const unsigned char *need);

/*
 * A transform of Y applied as the built-in kernel packs it: the GEMM then
 * computes X f(Y)^T without f(Y) ever being stored whole. transform writes
 * dst[a * ld_dst + i] = f(Y[r0 + a][k0 + i]) for a < rows, i < len; it may
 * record per-row data as well. It is called for every block of Y that a
 * needed tile uses, once or more (with identical arguments), from any thread,
 * but never for one block from two threads at once; k0 is a multiple of
 * DSEG_GEMM_KC and len at most DSEG_GEMM_KC.
 */
typedef struct {
    void (*transform)(void *ctx, const float *Y, int ldy, int r0, int rows, int k0, int len,
                      float *dst, int ld_dst);
    void *ctx;
} dseg_pack_hook;
#define DSEG_GEMM_KC 256
/* The built-in kernel's tile: rows of X x rows of Y (the granularity of need). */
#define DSEG_GEMM_MR 4
#define DSEG_GEMM_NR 24

/* Row r of the row-major M (leading dimension ld), or row idx[r] when idx. */
static inline const float *dseg_row(const float *M, int ld, const int *idx, int r) {
    return M + (size_t)(idx ? idx[r] : r) * ld;
}

/* Can ex's backend apply a hook to a GEMM with n rows of Y? (not an
 * external sgemm; not the dot-product kernel of few columns) */
int dseg_gemm_can_hook(const dseg_exec *ex, int n);

/* dseg_gemm_nt with C = X hook(Y)^T. Returns 0, computing nothing, when
 * the backend cannot apply a hook (!dseg_gemm_can_hook) or memory runs
 * out: the caller then transforms Y itself. */
int dseg_gemm_nt_hooked(const dseg_exec *ex, int m, int n, int k, const float *X, int ldx,
                        const float *Y, int ldy, float *C, int ldc, int accumulate,
                        const unsigned char *need, const dseg_pack_hook *hook);

/* dseg_gemm_nt with row p of Y taken from row yrows[p] (the built-in packed
 * kernel gathers them as it packs). Returns 0, computing nothing, where
 * !dseg_gemm_can_hook or memory runs out. */
int dseg_gemm_nt_rows(const dseg_exec *ex, int m, int n, int k, const float *X, int ldx,
                      const float *Y, int ldy, const int *yrows, float *C, int ldc, int accumulate,
                      const unsigned char *need);

/* Relative error bound of a cross term computed by dseg_gemm_nt with k-term
 * GEMMs of ex's backend (see gemm.c). */
double dseg_gemm_rel_error(const dseg_exec *ex, int k);
/* The GEMM rounding part of it alone (no floor): |C - X Y^T| <= this times
 * sum |x_i y_i| for an entry of a cross term (see gemm.c). */
double dseg_gemm_chain_error(const dseg_exec *ex, int k);

/* The merge's float32 logs (logs.c): logx[j] = log x[j], 0 where x[j] == 0,
 * for x[j] >= 0 finite. Relative error at most DSEG_LOG_REL_ERROR against the
 * float64 log (measured at 8.2e-8 over every positive float, with and without
 * FMA: tests/c/log_error.c; exact at x = 1). */
#define DSEG_LOG_REL_ERROR 3e-7
void dseg_log_only(const float *x, int n, float *logx);

/* Statistics of a span of a row (the row's sums are the spans' in order). */
typedef struct {
    double h, mass; /* sum x log x, sum x (float64) */
    float maxlog, maxpos, minx; /* max |log x|, max(0, max log x), min x */
    uint64_t zeros; /* hash of the span's zero positions (0 when none) */
} dseg_span_stats;

/* dseg_log_only over a span of n entries that starts at position j0 of its
 * row, and the span's statistics. */
void dseg_log_span(const float *x, int n, int j0, float *logx, dseg_span_stats *st);

/* Bilinear source index pair and weight of each destination pixel
 * (half-pixel centres, edge clamp: torch align_corners=False). */
void dseg_bilinear_table(int in, int out, int *i0, int *i1, float *frac);

/* dseg_alloc, for the core's own scratch; free() is also fine for it. */
void *dseg_malloc(size_t bytes);

#endif
