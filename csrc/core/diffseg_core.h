/*
 * diffseg core: DiffSeg post-processing on float32 buffers.
 *
 * Plain C99 (+ optional OpenMP). No Python, no torch: a C program can include
 * this header and link the core directly.
 *
 * Conventions
 *   - Matrices are dense, row-major, C-contiguous float32.
 *   - Every function returns DSEG_OK (0) or an error code; the message is
 *     available from dseg_last_error() (thread-local). Nothing exits or aborts.
 *   - Results are bit-identical for any thread count.
 */
#ifndef DIFFSEG_CORE_H
#define DIFFSEG_CORE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    DSEG_OK = 0,
    DSEG_EINVAL = 1, /* invalid argument (message names it) */
    DSEG_ENOMEM = 2, /* allocation failed */
};

/* Message of the last failed call on this thread ("" if none). */
const char *dseg_last_error(void);

/* Memory for large buffers (64-byte aligned; huge pages where the OS allows),
 * e.g. the (R^2, R^2) output of dseg_aggregate. Free with dseg_free, or with
 * dseg_free_sized (bytes: the size asked for) to let the core keep it for a
 * later call: the core keeps up to 64 MiB of its freed scratch (blocks of
 * 256 KiB or more), since the OS zeroes fresh pages on first touch.
 * dseg_release_memory frees what is kept and returns its size in bytes. */
void *dseg_alloc(size_t bytes);
void dseg_free(void *p);
void dseg_free_sized(void *p, size_t bytes);
size_t dseg_release_memory(void);

/* Process-default thread count of the core's parallel loops (n < 1:
 * OpenMP's default, i.e. OMP_NUM_THREADS or all cores; n is clamped to
 * DSEG_MAX_THREADS). */
#define DSEG_MAX_THREADS 1024
void dseg_set_num_threads(int n);
int dseg_get_num_threads(void);
/* 1 when the core was compiled with OpenMP. */
int dseg_has_openmp(void);

/*
 * Optional external single-precision GEMM with the Fortran BLAS ABI (for
 * example the sgemm that SciPy exports). NULL restores the built-in kernel.
 * Merge decisions do not depend on which GEMM runs: pairs whose fast distance
 * is close to a threshold are recomputed exactly (see merge.c).
 */
typedef void (*dseg_sgemm_fn)(const char *transa, const char *transb,
                              const int *m, const int *n, const int *k,
                              const float *alpha, const float *a, const int *lda,
                              const float *b, const int *ldb,
                              const float *beta, float *c, const int *ldc);
void dseg_set_sgemm(dseg_sgemm_fn fn);
dseg_sgemm_fn dseg_get_sgemm(void);

/*
 * Settings of one call. The *_ex functions take them as arguments and never
 * read the process defaults, so another thread changing those defaults while
 * a call runs cannot affect it. The plain functions snapshot the defaults
 * once at entry (dseg_default_exec).
 */
typedef struct {
    int threads;         /* 1..DSEG_MAX_THREADS (ignored without OpenMP) */
    dseg_sgemm_fn sgemm; /* NULL: the built-in kernel */
} dseg_exec;
dseg_exec dseg_default_exec(void);

/* Largest H * W of an aggregated grid: (H*W)^2 entries of A must fit an int
 * index (215 x 215 for a square grid). */
#define DSEG_MAX_POSITIONS 46225

/*
 * Aggregate attention of several resolutions into one (H*W, H*W) matrix.
 *
 * maps[i] is a row-stochastic (h[i]*w[i], h[i]*w[i]) matrix (query rows,
 * keys in row-major h[i] x w[i] order). Each query's key map is bilinearly
 * upsampled h[i] x w[i] -> H x W (half-pixel centres, edge clamp, per axis),
 * normalised to sum 1, duplicated over the H/h[i] x W/w[i] queries it
 * covers, and added with weight weights[i]. h[i] must divide H and w[i]
 * divide W; a map at H x W must come first. H * W <= DSEG_MAX_POSITIONS.
 * out: (H*W, H*W), overwritten.
 * dseg_aggregate and dseg_aggregate_ex are the square case (h = w = res,
 * H = W = out_res).
 */
int dseg_aggregate(int n_maps, const int *res, const float *const *maps,
                   const float *weights, int out_res, float *out);
int dseg_aggregate_ex(int n_maps, const int *res, const float *const *maps,
                      const float *weights, int out_res, float *out, const dseg_exec *exec);
int dseg_aggregate_hw(int n_maps, const int *h, const int *w, const float *const *maps,
                      const float *weights, int H, int W, float *out, const dseg_exec *exec);

/* Anchor coordinates along one axis, as the official code: grid values. */
int dseg_anchor_coords(int R, int grid, int *coords);

/*
 * Anchor grid of an H x W map: grid anchors along the short side; along the
 * long side round(grid * long / short) anchors (halves round up), at least 1
 * and at most long. Each axis is placed by dseg_anchor_coords; anchors are
 * row-major (row coordinate slowest). 1 <= grid <= min(H, W). A square map
 * gets grid x grid anchors, as the official code.
 */
int dseg_anchor_counts(int H, int W, int grid, int *rows, int *cols);

/* Optional statistics of one dseg_merge call. */
typedef struct {
    int64_t pairs;           /* distances decided (later iterations: each
                                unordered pair once) */
    int64_t full_distances;  /* of those, not ruled out by the pooled lower bound */
    int64_t refined;         /* of those, too close to a threshold for the float32
                                GEMM: recomputed in float64 from float32 logs */
    int64_t exact_rechecks;  /* of those, still too close: recomputed exactly */
} dseg_merge_stats;

/*
 * Iterative KL merging.
 *
 * A: (H*W, H*W) aggregated attention (row i = attention map of query i,
 * i = y*W + x; each row an H x W key map). Iteration 0 averages, for each of
 * the G = rows x cols anchors of dseg_anchor_counts(H, W, grid), every row of
 * A whose symmetric KL to the anchor is < thresholds[0]. Iterations
 * 1..n_iter-1 greedily merge the proposals (non-exclusive, in index order).
 * proposals: caller buffer of G*H*W floats; the first *n_proposals rows hold
 * the result. stats may be NULL. seeds (NULL, or G ints) receives the row of
 * A of the anchor that seeded each proposal (the greedy chain back to
 * iteration 0). dseg_merge and dseg_merge_ex are the square case
 * (H = W = R, grid x grid anchors). A NaN, infinite or negative value in A
 * gives DSEG_EINVAL naming the first one's flat index (checked as iteration 0
 * reads A, not by a pass of its own).
 */
int dseg_merge(const float *A, int R, int grid, const double *thresholds,
               int n_iter, float *proposals, int *n_proposals,
               dseg_merge_stats *stats);
int dseg_merge_ex(const float *A, int R, int grid, const double *thresholds,
                  int n_iter, float *proposals, int *n_proposals, int *seeds,
                  dseg_merge_stats *stats, const dseg_exec *exec);
int dseg_merge_hw(const float *A, int H, int W, int grid, const double *thresholds,
                  int n_iter, float *proposals, int *n_proposals, int *seeds,
                  dseg_merge_stats *stats, const dseg_exec *exec);

/*
 * Symmetric KL D(p, q) = 1/2 sum (p - q)(log p - log q) between every row of
 * P (m, n) and every row of Q (k, n) into D (m, k), in float64 with the
 * conventions 0 log 0 = 0 and D = +inf when one has zero mass where the
 * other has positive mass.
 */
int dseg_sym_kl(const float *P, int m, const float *Q, int k, int n, double *D);
int dseg_sym_kl_ex(const float *P, int m, const float *Q, int k, int n, double *D,
                   const dseg_exec *exec);

/*
 * Label map: bilinearly upsample each of the K (h, w) proposals to (H, W)
 * (half-pixel centres, edge clamp) and take the argmax (first index on ties).
 * Labels are renumbered to 0..n-1 in proposal order. labels: (H, W) int32.
 * n_labels may be NULL; so may winners (K entries): winners[l] is the
 * proposal that label l came from, for l < n_labels.
 */
int dseg_nms(const float *proposals, int K, int h, int w, int H, int W,
             int32_t *labels, int *n_labels, int32_t *winners);
int dseg_nms_ex(const float *proposals, int K, int h, int w, int H, int W,
                int32_t *labels, int *n_labels, int32_t *winners, const dseg_exec *exec);

/* Optional statistics of one dseg_refine call. */
typedef struct {
    int iterations;         /* Lloyd iterations run (scikit-learn's n_iter_) */
    int strict_convergence; /* 1: stopped because the labels did not change */
    int relocated;          /* empty clusters moved to far rows, all iterations */
    int64_t rechecks;       /* row assignments decided in float64 (near ties) */
    int64_t kept;           /* row assignments kept by the distance bounds, unread */
} dseg_refine_stats;

/*
 * k-means refinement, as the official code's refine=True (scikit-learn
 * KMeans(init=proposals, n_init=1): Lloyd, its tolerance, its stopping rules
 * and its relocation of empty clusters).
 *
 * A: (n, d) rows to cluster (non-negative, e.g. the (R*R, R*R) aggregated
 * attention); init: (K, d) initial centres, 1 <= K <= n. Stops after max_iter
 * (>= 1) iterations, when the labels stop changing, or when the squared
 * Frobenius norm of the centre shift is <= tol (>= 0) x the mean column
 * variance of A. out: (K, d) buffer; its first *n_out rows are the means of
 * the rows of A in each cluster that the final labels leave non-empty, in
 * cluster order. labels (n entries, the final cluster of each row) and stats
 * may be NULL.
 */
int dseg_refine(const float *A, int n, int d, const float *init, int K, int max_iter,
                double tol, float *out, int *n_out, int32_t *labels, dseg_refine_stats *stats);
int dseg_refine_ex(const float *A, int n, int d, const float *init, int K, int max_iter,
                   double tol, float *out, int *n_out, int32_t *labels, dseg_refine_stats *stats,
                   const dseg_exec *exec);

#ifdef __cplusplus
}
#endif
#endif
