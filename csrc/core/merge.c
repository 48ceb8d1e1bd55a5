/*
 * Iterative KL merging (DiffSeg step 3).
 *
 * The symmetric KL between rows p and q expands to
 *     D = 1/2 (h_p + h_q - p.log(q) - log(p).q),   h_x = sum x log x,
 * so all cross terms of a block are two float32 GEMMs. A float32 GEMM over
 * 2 * H*W terms carries rounding error, so a pair whose fast estimate lies
 * within a bound of the threshold is recomputed in float64 from the cached
 * float32 logs (a few ulp from exact), and the rare pair still within that
 * tier's bound exactly from scratch. Every merge decision is therefore that
 * of the exact float64 distance, whatever GEMM ran and however many threads
 * it used, and no structure of the attention makes the rechecks dominate.
 *
 * Before that, a pass on key maps pooled 4 x 4 (256 bins for 64 x 64) gives a
 * lower bound on every distance of iteration 0 (data-processing inequality);
 * the full-resolution GEMM only computes tiles holding a pair the bound does
 * not rule out. On segment-like attention most pairs are ruled out; where a
 * sample of rows shows that few would be, the pass is skipped.
 *
 * Exact zeros use the usual conventions: 0 log 0 = 0, and D = +inf when one
 * map has zero mass where the other has positive mass (never merged). The
 * official code has no epsilon and gets NaN in both cases, which never merges
 * either; the difference is that a map with a zero still matches itself here
 * (the official code would give its anchor an empty, NaN proposal).
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>

#include "internal.h"

/* Columns per accumulation pass: a (N x COLS) slab of A stays in cache while
 * every anchor adds its selected rows. */
#define COLS 256
/* Rows per block of the selected-row sums: RBLOCK x COLS floats (256 KiB)
 * stay in L2. */
#define RBLOCK 256

typedef struct {
    double h;      /* sum x log x */
    double mass;   /* sum x */
    double maxlog; /* max |log x| over x > 0 */
    double maxpos; /* max(0, max log x): 0 when every x <= 1 */
    int has_zero;
    uint64_t zeros; /* hash of the set of zero positions (0 when none) */
    int overflow;   /* a pooled bin beyond float range: no bound from this row */
} row_stats;

/* Natural log of a positive finite float (normal or subnormal), branch-free so
 * that loops over it vectorise; Cephes' logf polynomial, about 1 ulp. */
static inline float log_positive(float x) {
    const int subnormal = x < 1.17549435e-38f;
    const float xs = x * (subnormal ? 8388608.0f : 1.0f); /* 2^23 */
    int32_t bits;
    memcpy(&bits, &xs, sizeof bits);
    int32_t e = ((bits >> 23) & 0xff) - 126 - 23 * subnormal;
    bits = (bits & 0x007fffff) | 0x3f000000; /* mantissa in [0.5, 1) */
    float m;
    memcpy(&m, &bits, sizeof m);
    const int low = m < 0.707106781f;
    e -= low;
    m = (m + (low ? m : 0.0f)) - 1.0f;
    const float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    const float fe = (float)e;
    y += -2.12194440e-4f * fe;
    y += -0.5f * z;
    return (m + y) + 0.693359375f * fe;
}

/* logx[j] = log x[j] (0 where x[j] == 0) and the row's statistics. */
DSEG_CLONES
static void log_row(const float *x, int n, float *logx, row_stats *st) {
#pragma omp simd
    for (int j = 0; j < n; j++) {
        const float l = log_positive(x[j] > 0.0f ? x[j] : 1.0f);
        logx[j] = x[j] > 0.0f ? l : 0.0f;
    }
    double h = 0.0, mass = 0.0;
    float maxlog = 0.0f, maxpos = 0.0f, minx = x[0];
#pragma omp simd reduction(+ : h, mass) reduction(max : maxlog, maxpos) reduction(min : minx)
    for (int j = 0; j < n; j++) {
        h += (double)x[j] * (double)logx[j];
        mass += (double)x[j];
        const float a = fabsf(logx[j]);
        maxlog = a > maxlog ? a : maxlog;
        maxpos = logx[j] > maxpos ? logx[j] : maxpos;
        minx = x[j] < minx ? x[j] : minx;
    }
    st->h = h, st->mass = mass, st->maxlog = maxlog, st->maxpos = maxpos;
    st->has_zero = !(minx > 0.0f);
    /* Two maps whose zero sets differ are at D = +inf (one has mass where
     * the other has none). Different hashes prove that; equal hashes prove
     * nothing (a collision only costs a recheck). */
    uint64_t zeros = 0;
    if (st->has_zero)
        for (int j = 0; j < n; j++)
            if (x[j] == 0.0f) {
                const uint64_t k = (uint64_t)(j + 1) * 0x9E3779B97F4A7C15ull;
                zeros += k ^ (k >> 29);
            }
    st->zeros = zeros;
    st->overflow = 0;
}

/* Loops over rows use dynamic schedules: when another process holds a core,
 * the thread that still runs takes the remaining rows instead of waiting at
 * the barrier for a static share. */
static void log_rows(const dseg_exec *ex DSEG_OMP_ONLY, const float *X, int m, int n, float *logX, row_stats *st) {
#pragma omp parallel for schedule(dynamic, 16) num_threads(dseg_threads_for(ex, (double)m * n * 8))
    for (int i = 0; i < m; i++) log_row(X + (size_t)i * n, n, logX + (size_t)i * n, st + i);
}

static double sym_kl_exact(const float *p, const float *q, int n) {
    double s = 0.0;
    for (int j = 0; j < n; j++) {
        if (p[j] == q[j]) continue;
        if (p[j] == 0.0f || q[j] == 0.0f) return INFINITY;
        s += ((double)p[j] - (double)q[j]) * (log((double)p[j]) - log((double)q[j]));
    }
    return 0.5 * s;
}

int dseg_sym_kl(const float *P, int m, const float *Q, int k, int n, double *D) {
    const dseg_exec ex = dseg_default_exec();
    return dseg_sym_kl_ex(P, m, Q, k, n, D, &ex);
}

int dseg_sym_kl_ex(const float *P, int m, const float *Q, int k, int n, double *D,
                   const dseg_exec *ex) {
    dseg_clear_error();
    if (dseg_check_exec(ex) != DSEG_OK) return DSEG_EINVAL;
    if (m < 0 || k < 0 || n < 1) return dseg_fail(DSEG_EINVAL, "sym_kl: bad sizes");
#pragma omp parallel for schedule(dynamic, 1) num_threads(dseg_threads_for(ex, (double)m * k * n))
    for (int i = 0; i < m; i++)
        for (int j = 0; j < k; j++)
            D[(size_t)i * k + j] = sym_kl_exact(P + (size_t)i * n, Q + (size_t)j * n, n);
    return DSEG_OK;
}

/* Relative error of log_positive against the float64 log, measured over
 * every positive finite float: at most 8.2e-8 (1.4 x 2^-24; exact at x = 1).
 * Bounded here with a margin of 3.7x. */
#define LOG_REL_ERROR 3e-7

/*
 * Bound on |d - D|, d = (h_p + h_q - c) / 2 the fast estimate from the GEMM
 * value c of the cross term, D the float64 value of sym_kl_exact.
 *
 * Let l_x be the float32 logs the GEMM and h_x used, T' = sum p_j lq_j +
 * q_j lp_j the cross term they define and S' = sum p_j |lq_j| + q_j |lp_j|
 * its sum of |terms|. The GEMM gives |c - T'| <= g S' (g: gemm_err, see
 * gemm.c). Two bounds on S':
 *   (a) S' <= mass_p max|lq| + mass_q max|lp|;
 *   (b) all x >= 0 and |l| = -l + 2 max(l, 0), so S' = -T' + 2 E' with
 *       E' = sum p_j max(lq_j, 0) + q_j max(lp_j, 0) <= E = mass_p maxpos_q
 *       + mass_q maxpos_p; with T' >= c - g S': S' <= (2E - c) / (1 - g).
 * (b) is the tight one on probability maps (every x <= 1: E = 0, S' = -c,
 * about twice the cross entropy, where (a) can be ten times that); the
 * smaller of the two is used. The float32 logs are within LOG_REL_ERROR of
 * the float64 ones (relative, same sign), which moves T' and h_x by at most
 * that times S' and sum x |l_x| <= |h_x| + 2 mass_x maxpos_x (same identity
 * as (b)); the float64 sums of h_x and of sym_kl_exact each add at most
 * (n + 4) eps64 relative to those same sums of |terms|. So, with
 *   rho = g + 2 LOG_REL_ERROR + 8 (n + 4) eps64,
 *   |d - D| <= rho / 2 (S' + H_p + H_q),  H_x = |h_x| + 2 mass_x maxpos_x,
 * plus the rounding of d itself (a few eps64 of |h_p| + |h_q| + |c|). The
 * factors of 2 on the log and double terms, and gemm_err's own 1.6x on its
 * chain bound, cover the (1 + small) products dropped above.
 */
static double error_bound(const row_stats *sp, const row_stats *sq, double c, double rho) {
    const double a = sp->mass * sq->maxlog + sq->mass * sp->maxlog;
    const double e = sp->mass * sq->maxpos + sq->mass * sp->maxpos;
    const double b = (2.0 * e - c) / (1.0 - rho);
    const double s = b >= 0.0 && b < a ? b : a; /* b < 0: no bound from (b) (never on sound input) */
    const double hp = fabs(sp->h) + 2.0 * sp->mass * sp->maxpos;
    const double hq = fabs(sq->h) + 2.0 * sq->mass * sq->maxpos;
    return 0.5 * rho * (s + hp + hq) + 8.0 * DBL_EPSILON * (fabs(sp->h) + fabs(sq->h) + fabs(c)) +
           1e-12;
}

/* rho of error_bound for k-term GEMMs of ex's backend. */
static double estimate_rel_error(const dseg_exec *ex, int k) {
    return dseg_gemm_chain_error(ex, k) + 2.0 * LOG_REL_ERROR + 8.0 * (k + 4) * DBL_EPSILON;
}

/*
 * D(p, q) from the float32 logs, summed in float64 (same zero conventions as
 * sym_kl_exact). *bound receives a bound on its distance from sym_kl_exact's
 * value: the log error (LOG_REL_ERROR per log) plus the rounding of both
 * float64 sums (n terms, 2^-53 each, doubled for safety), all relative to
 * S = sum |p - q| (|log p| + |log q|).
 */
DSEG_CLONES
static double sym_kl_from_logs(const float *p, const float *lp, const float *q, const float *lq,
                               int n, double *bound) {
    double s = 0.0, a = 0.0;
    int mismatch = 0;
#pragma omp simd reduction(+ : s, a) reduction(| : mismatch)
    for (int j = 0; j < n; j++) {
        const double d = (double)p[j] - (double)q[j];
        s += d * ((double)lp[j] - (double)lq[j]);
        a += fabs(d) * ((double)fabsf(lp[j]) + (double)fabsf(lq[j]));
        mismatch |= (p[j] == 0.0f) != (q[j] == 0.0f);
    }
    if (mismatch) {
        *bound = 0.0;
        return INFINITY;
    }
    *bound = 0.5 * a * (LOG_REL_ERROR * 1.01 + 4.0 * (n + 4) * DBL_EPSILON) + 1e-300;
    return 0.5 * s;
}

/* How one pair was decided (for the statistics). */
typedef struct {
    int64_t refined; /* recomputed from float32 logs in float64 */
    int64_t exact;   /* recomputed from scratch in float64 */
} recheck_counts;

/*
 * Is D(p, q) < tau? cross = p.log(q) + log(p).q from the float32 GEMM.
 * Three tiers, each used only when the one before cannot decide: the GEMM
 * estimate, the float64 sum over the cached float32 logs (a few ulp from the
 * exact value, so it decides all but pairs within ~1e-6 of tau), and the
 * exact float64 distance.
 */
static int below(float cross, const row_stats *sp, const row_stats *sq, const float *p,
                 const float *lp, const float *q, const float *lq, int n, double tau, double rel,
                 recheck_counts *counts) {
    if (sp->zeros != sq->zeros) return 0; /* zero sets differ: D = +inf */
    if (!sp->has_zero && !sq->has_zero) {
        const double d = 0.5 * (sp->h + sq->h - (double)cross);
        const double bound = error_bound(sp, sq, (double)cross, rel);
        /* a non-finite estimate (float32 overflow on huge values) is no estimate */
        if (isfinite(d) && isfinite(bound) && fabs(d - tau) > bound) return d < tau;
    }
    counts->refined++;
    double bound;
    const double d = sym_kl_from_logs(p, lp, q, lq, n, &bound);
    if (!isfinite(d)) {
        if (d == INFINITY && bound == 0.0) return 0; /* zero-mass mismatch: exactly +inf */
    } else if (isfinite(bound) && fabs(d - tau) > bound) {
        return d < tau;
    }
    counts->exact++;
    return sym_kl_exact(p, q, n) < tau;
}

/* cross (m, n_rows) = X.log(Y)^T + log(X).Y^T, where need says (NULL: all) */
static void cross_terms(const dseg_exec *ex, const float *X, const float *logX, int m, const float *Y,
                        const float *logY, int n_rows, int n, float *cross,
                        const unsigned char *need) {
    dseg_gemm_nt(ex, m, n_rows, n, X, n, logY, n, cross, n_rows, 0, need);
    dseg_gemm_nt(ex, m, n_rows, n, logX, n, Y, n, cross, n_rows, 1, need);
}

/* Is D(p, q) >= tau certain from its fast estimate or its zero sets? */
static int surely_not_below(float cross, const row_stats *sp, const row_stats *sq, double rel,
                            double tau) {
    if (sp->overflow || sq->overflow) return 0;
    if (sp->zeros != sq->zeros) return 1; /* D = +inf */
    if (sp->has_zero || sq->has_zero) return 0;
    const double d = 0.5 * (sp->h + sq->h - (double)cross);
    const double bound = error_bound(sp, sq, (double)cross, rel);
    return isfinite(d) && isfinite(bound) && d - bound >= tau;
}

static void mean_into(const double *acc, int64_t count, int n, float *out) {
    const double inv = 1.0 / (double)count;
    for (int j = 0; j < n; j++) out[j] = (float)(acc[j] * inv);
}

/* Does selection b hold a row that selection a does not? */
static int has_extra_row(const unsigned char *a, const unsigned char *b, int N) {
    for (int p0 = 0; p0 < N; p0 += 1024) {
        const int p1 = p0 + 1024 < N ? p0 + 1024 : N;
        int extra = 0;
#pragma omp simd reduction(| : extra)
        for (int p = p0; p < p1; p++) extra |= b[p] & !a[p];
        if (extra) return 1;
    }
    return 0;
}

/*
 * Per-anchor sums of the selected rows are built from additions only:
 * removing rows would cancel the small entries of the rows kept. A sum starts
 * from a "base" whose rows are a subset of its own and adds the rest:
 *   - an earlier anchor (among the `window` before it: the left and upper
 *     grid neighbours included) whose selection is a subset (neighbours in
 *     one segment select nearly the same rows);
 *   - a node of a quadtree over the anchor grid: the intersection of the
 *     selections of an aligned 2^l x 2^l block of anchors, itself its
 *     parent's sum plus the rows the parent lacks. When all maps are alike
 *     (near-uniform attention, every anchor selecting nearly every row) the
 *     root holds most rows and they are summed once, not once per anchor.
 * Each anchor takes the base that leaves it fewest rows to add; the nodes
 * on the way to a chosen one are summed. A job is one such sum.
 */
typedef struct {
    int base; /* job whose sum this one starts from; -1: zero */
    const unsigned char *now, *base_rows; /* selections of this job and its base */
    int32_t n; /* rows to add */
    int32_t *rows;
    double *acc; /* N sums */
} sum_job;

/* Rows in `now` and not in `base` (NULL: none) into list; their count. */
static int32_t rows_missing(const unsigned char *now, const unsigned char *base, int N,
                            int32_t *list) {
    int32_t n = 0;
    for (int p = 0; p < N; p++)
        if (now[p] && !(base && base[p])) list[n++] = p;
    return n;
}

/* The largest selection among the `window` anchors before g that is a subset
 * of g's: its index (-1: none) and size in *size. */
static int subset_predecessor(const unsigned char *mask, const int32_t *count, int N, int g,
                              int window, int32_t *size) {
    const unsigned char *now = mask + (size_t)g * N;
    int pred = -1;
    *size = 0;
    for (int h = g - 1; h >= 0 && h >= g - window; h--)
        if (count[h] > *size && count[h] <= count[g] && !has_extra_row(now, mask + (size_t)h * N, N))
            *size = count[h], pred = h;
    return pred;
}

/* acc[c0:c1] += the listed rows of A over columns c0..c1. Rows are added
 * four at a time, ((y0 + y1) + (y2 + y3)), in list order: a fixed order
 * (the caller cuts lists only at fixed row-block boundaries). Two groups of
 * four share one load and store of acc. */
DSEG_CLONES
static void add_listed_rows(double *acc, const float *A, int N, const int32_t *list, int32_t n,
                            int c0, int c1) {
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const float *y0 = A + (size_t)list[i] * N, *y1 = A + (size_t)list[i + 1] * N;
        const float *y2 = A + (size_t)list[i + 2] * N, *y3 = A + (size_t)list[i + 3] * N;
        const float *y4 = A + (size_t)list[i + 4] * N, *y5 = A + (size_t)list[i + 5] * N;
        const float *y6 = A + (size_t)list[i + 6] * N, *y7 = A + (size_t)list[i + 7] * N;
#pragma omp simd
        for (int c = c0; c < c1; c++)
            acc[c] = (acc[c] + (((double)y0[c] + (double)y1[c]) + ((double)y2[c] + (double)y3[c]))) +
                     (((double)y4[c] + (double)y5[c]) + ((double)y6[c] + (double)y7[c]));
    }
    for (; i + 4 <= n; i += 4) {
        const float *y0 = A + (size_t)list[i] * N, *y1 = A + (size_t)list[i + 1] * N;
        const float *y2 = A + (size_t)list[i + 2] * N, *y3 = A + (size_t)list[i + 3] * N;
#pragma omp simd
        for (int c = c0; c < c1; c++)
            acc[c] += ((double)y0[c] + (double)y1[c]) + ((double)y2[c] + (double)y3[c]);
    }
    for (; i < n; i++) {
        const float *y = A + (size_t)list[i] * N;
#pragma omp simd
        for (int c = c0; c < c1; c++) acc[c] += y[c];
    }
}

/* Quadtree levels over a gh x gw anchor grid: level l (1..levels) has
 * side(gh, l) x side(gw, l) nodes, each the anchors (a, b) with the same
 * (a >> l, b >> l). */
static int tree_levels(int gh, int gw) {
    int l = 0;
    while ((1 << l) < gh || (1 << l) < gw) l++;
    return l;
}

static int level_side(int grid, int l) { return (grid + (1 << l) - 1) >> l; }

/* Mean of the selected rows of A for each anchor, accumulated in float64.
 * Threads split the columns; every sum follows a fixed order, so the result
 * does not depend on the thread count. */
static int selected_means(const dseg_exec *ex DSEG_OMP_ONLY, const float *A, int N, int gh,
                          int gw, const unsigned char *mask, const int32_t *count, double *acc,
                          float *proposals) {
    const int G = gh * gw, levels = tree_levels(gh, gw);
    int first[32], n_nodes = 0; /* first node of each level (1-based levels) */
    for (int l = 1; l <= levels; l++)
        first[l] = n_nodes, n_nodes += level_side(gh, l) * level_side(gw, l);
    const int J = n_nodes + G; /* jobs: nodes top-down, then the anchors */
    sum_job *jobs = calloc((size_t)J, sizeof(sum_job));
    int32_t *rows = malloc(sizeof(int32_t) * (size_t)J * N);
    int32_t *isize = calloc(n_nodes + 1, sizeof(int32_t));
    unsigned char *inter = malloc((size_t)n_nodes * N + 1), *used = calloc(n_nodes + 1, 1);
    double *node_acc = dseg_malloc(sizeof(double) * ((size_t)n_nodes * N + 1));
    int *anchor_pred = malloc(sizeof(int) * G), *job_of_node = malloc(sizeof(int) * (n_nodes + 1));
    int ok = jobs && rows && isize && inter && used && node_acc && anchor_pred && job_of_node;
    if (!ok) goto done;

    /* Node intersections, bottom-up (level 1 from anchors, then children). */
    for (int l = 1; l <= levels; l++) {
        const int side_y = level_side(gh, l), side_x = level_side(gw, l);
        const int child_y = level_side(gh, l - 1), child_x = level_side(gw, l - 1);
#pragma omp parallel for schedule(dynamic, 1) num_threads(dseg_threads_for(ex, (double)side_y * side_x * N * 4))
        for (int node = 0; node < side_y * side_x; node++) {
            unsigned char *I = inter + (size_t)(first[l] + node) * N;
            memset(I, 1, N);
            const int a = node / side_x, b = node % side_x;
            for (int ca = 2 * a; ca < 2 * a + 2 && ca < child_y; ca++)
                for (int cb = 2 * b; cb < 2 * b + 2 && cb < child_x; cb++) {
                    const unsigned char *c =
                        l == 1 ? mask + (size_t)(ca * gw + cb) * N
                               : inter + (size_t)(first[l - 1] + ca * child_x + cb) * N;
#pragma omp simd
                    for (int p = 0; p < N; p++) I[p] &= c[p];
                }
            int32_t n = 0;
#pragma omp simd reduction(+ : n)
            for (int p = 0; p < N; p++) n += I[p];
            isize[first[l] + node] = n;
        }
    }
    /* Each anchor's base: the subset predecessor or its level-1 node. */
    for (int g = 0; g < G; g++) {
        int32_t pred_size;
        const int pred = subset_predecessor(mask, count, N, g, gw + 1, &pred_size);
        const int node = levels ? first[1] + (g / gw >> 1) * level_side(gw, 1) + (g % gw >> 1)
                                : -1;
        if (node >= 0 && isize[node] > pred_size) {
            anchor_pred[g] = -2 - node; /* a node */
            used[node] = 1;
        } else {
            anchor_pred[g] = pred;
        }
    }
    /* A used node makes its non-empty parent worth summing: the parent's
     * rows are then added once for all its children. */
    for (int l = 1; l < levels; l++) {
        const int side_x = level_side(gw, l), up_x = level_side(gw, l + 1);
        for (int node = 0; node < level_side(gh, l) * side_x; node++)
            if (used[first[l] + node]) {
                const int parent = first[l + 1] + (node / side_x >> 1) * up_x + (node % side_x >> 1);
                if (isize[parent] > 0) used[parent] = 1;
            }
    }
    /* Jobs: nodes from the root down (a parent before its children), then
     * the anchors in index order (a predecessor before its successor). */
    int j = 0;
    for (int l = levels; l >= 1; l--) {
        const int side_x = level_side(gw, l), up_x = level_side(gw, l + 1);
        for (int node = 0; node < level_side(gh, l) * side_x; node++) {
            const int id = first[l] + node;
            job_of_node[id] = -1;
            if (!used[id]) continue;
            const int parent =
                l < levels ? first[l + 1] + (node / side_x >> 1) * up_x + (node % side_x >> 1) : -1;
            const int from_parent = parent >= 0 && used[parent];
            jobs[j].base = from_parent ? job_of_node[parent] : -1;
            jobs[j].now = inter + (size_t)id * N;
            jobs[j].base_rows = from_parent ? inter + (size_t)parent * N : NULL;
            jobs[j].acc = node_acc + (size_t)id * N;
            jobs[j].rows = rows + (size_t)j * N;
            job_of_node[id] = j++;
        }
    }
    const int anchor_job0 = j;
    for (int g = 0; g < G; g++, j++) {
        const int pred = anchor_pred[g], node = -2 - pred;
        jobs[j].base = pred >= 0 ? anchor_job0 + pred : pred <= -2 ? job_of_node[node] : -1;
        jobs[j].now = mask + (size_t)g * N;
        jobs[j].base_rows = pred >= 0    ? mask + (size_t)pred * N
                            : pred <= -2 ? inter + (size_t)node * N
                                         : NULL;
        jobs[j].acc = acc + (size_t)g * N;
        jobs[j].rows = rows + (size_t)j * N;
    }
    const int n_jobs = j;
#pragma omp parallel for schedule(dynamic, 4) num_threads(dseg_threads_for(ex, (double)n_jobs * N * 2))
    for (int k = 0; k < n_jobs; k++)
        jobs[k].n = rows_missing(jobs[k].now, jobs[k].base_rows, N, jobs[k].rows);

    /* Rows are scattered over A: a thread takes a slab of columns and walks
     * it in blocks of RBLOCK rows (kept in L2 while every job adds its rows
     * of the block), then adds each job's base, whose sum is complete by
     * then (bases come first in job order). */
    const int slabs = (N + COLS - 1) / COLS;
#pragma omp parallel num_threads(dseg_threads_for(ex, (double)n_jobs * N * 4))
    {
        int32_t *cursor = malloc(sizeof(int32_t) * n_jobs);
#pragma omp for schedule(dynamic, 1)
        for (int sl = 0; sl < slabs; sl++) {
            if (!cursor) continue;
            const int c0 = sl * COLS, c1 = c0 + COLS < N ? c0 + COLS : N;
            for (int k = 0; k < n_jobs; k++) {
                memset(jobs[k].acc + c0, 0, sizeof(double) * (c1 - c0));
                cursor[k] = 0;
            }
            for (int r1 = RBLOCK; r1 < N + RBLOCK; r1 += RBLOCK)
                for (int k = 0; k < n_jobs; k++) {
                    int32_t end = cursor[k];
                    while (end < jobs[k].n && jobs[k].rows[end] < r1) end++;
                    add_listed_rows(jobs[k].acc, A, N, jobs[k].rows + cursor[k], end - cursor[k],
                                    c0, c1);
                    cursor[k] = end;
                }
            for (int k = 0; k < n_jobs; k++)
                if (jobs[k].base >= 0) {
                    double *a = jobs[k].acc;
                    const double *b = jobs[jobs[k].base].acc;
                    for (int c = c0; c < c1; c++) a[c] += b[c];
                }
        }
        if (!cursor) {
#pragma omp atomic write
            ok = 0;
        }
        free(cursor);
    }
    if (!ok) goto done;
    for (int g = 0; g < G; g++) /* count >= 1: every anchor matches itself */
        mean_into(acc + (size_t)g * N, count[g], N, proposals + (size_t)g * N);
done:
    free(jobs), free(rows), free(isize), free(inter), free(used), free(node_acc), free(anchor_pred);
    free(job_of_node);
    return ok;
}

/* Key-map pooling factor for the pruning pass: f x f blocks of keys are
 * summed, leaving (H/f) x (W/f) bins (256 for 64 x 64); f divides both sides
 * and leaves at least 4 bins on the short one. 1: no pruning pass. */
static int pool_factor(int H, int W) {
    const int short_side = H < W ? H : W;
    for (int f = 4; f >= 2; f /= 2)
        if (H % f == 0 && W % f == 0 && short_side / f >= 4) return f;
    return 1;
}

/* Sum f x f blocks of H x W key maps: rows which[i] of X (which NULL: row i),
 * i < rows, -> (rows, (H/f)*(W/f)). */
static void pool_rows(const dseg_exec *ex DSEG_OMP_ONLY, const float *X, const int *which,
                      int rows, int H, int W, int f, float *out, unsigned char *overflow) {
    const int Hp = H / f, Wp = W / f, Np = Hp * Wp;
#pragma omp parallel for schedule(dynamic, 64) num_threads(dseg_threads_for(ex, (double)rows * H * W))
    for (int i = 0; i < rows; i++) {
        const float *x = X + (size_t)(which ? which[i] : i) * H * W;
        float *o = out + (size_t)i * Np;
        overflow[i] = 0;
        for (int by = 0; by < Hp; by++)
            for (int bx = 0; bx < Wp; bx++) {
                double s = 0.0;
                for (int y = by * f; y < by * f + f; y++)
                    for (int xx = bx * f; xx < bx * f + f; xx++) s += x[(size_t)y * W + xx];
                /* beyond float range: the row gives no bound (its value is moot) */
                o[by * Wp + bx] = s <= FLT_MAX ? (float)s : 0.0f;
                overflow[i] |= !(s <= FLT_MAX);
            }
    }
}

/* Pooled rows -> their logs and statistics (overflow flags included). */
static void pooled_stats(const dseg_exec *ex, const float *P, int rows, int Np,
                         const unsigned char *overflow, float *logP, row_stats *st) {
    log_rows(ex, P, rows, Np, logP, st);
    for (int i = 0; i < rows; i++) st[i].overflow = overflow[i];
}

/* need[g * rows + p] = may D(anchor g, row p) be < tau, from pooled rows. */
static void pooled_need(const dseg_exec *ex, const float *pX, const float *logpX,
                        const row_stats *sx, int G, const float *pY, const float *logpY,
                        const row_stats *sy, int rows, int Np, double tau, float *cross,
                        unsigned char *need) {
    cross_terms(ex, pX, logpX, G, pY, logpY, rows, Np, cross, NULL);
    const double rel = estimate_rel_error(ex, Np);
#pragma omp parallel for schedule(dynamic, 4) num_threads(dseg_threads_for(ex, (double)G * rows))
    for (int g = 0; g < G; g++)
        for (int p = 0; p < rows; p++)
            need[(size_t)g * rows + p] =
                !surely_not_below(cross[(size_t)g * rows + p], sx + g, sy + p, rel, tau);
}

/* Rows of A in the sample that decides whether the pooled pass pays: one in
 * SAMPLE_STRIDE, spread over the image. */
#define SAMPLE_STRIDE 16

/*
 * Pairs that may be closer than tau. Summing bins is a Markov map, so by the
 * data-processing inequality each KL, and so D, can only shrink under
 * pooling: a pair whose pooled distance is surely >= tau is surely >= tau at
 * full resolution. The pooled GEMMs are H*W/f^2 deep instead of H*W.
 * The pass costs about a quarter of the full GEMMs it may save, so it first
 * runs on a sample of rows of A against every anchor, and when that rules
 * out under a quarter of the sampled pairs (attention with no segment-like
 * structure), every pair is marked needed without it. Either way the
 * decisions are exact; only which pairs get a full-resolution estimate
 * changes. need: (G, N). Returns 0 on allocation failure.
 */
static int candidate_pairs(const dseg_exec *ex, const float *A, int H, int W,
                           const int *anchor_rows, int G, double tau, unsigned char *need) {
    const int N = H * W, f = pool_factor(H, W);
    if (f == 1) {
        memset(need, 1, (size_t)G * N);
        return 1;
    }
    const int Np = (H / f) * (W / f), S = (N + SAMPLE_STRIDE - 1) / SAMPLE_STRIDE;
    float *pA = dseg_malloc(sizeof(float) * (size_t)N * Np);
    float *logpA = dseg_malloc(sizeof(float) * (size_t)N * Np);
    float *pX = dseg_malloc(sizeof(float) * (size_t)G * Np);
    float *logpX = dseg_malloc(sizeof(float) * (size_t)G * Np);
    float *cross = dseg_malloc(sizeof(float) * (size_t)G * N);
    row_stats *sa = malloc(sizeof(row_stats) * N), *sx = malloc(sizeof(row_stats) * G);
    unsigned char *overflow = malloc(N > G ? N : G);
    int *sample = malloc(sizeof(int) * S);
    const int ok = pA && logpA && pX && logpX && cross && sa && sx && overflow && sample;
    if (ok) {
        pool_rows(ex, A, anchor_rows, G, H, W, f, pX, overflow);
        pooled_stats(ex, pX, G, Np, overflow, logpX, sx);
        for (int i = 0; i < S; i++) /* the middle row of each stride: 8, 24, ... */
            sample[i] = i * SAMPLE_STRIDE + SAMPLE_STRIDE / 2 < N ? i * SAMPLE_STRIDE + SAMPLE_STRIDE / 2
                                                                 : N - 1;
        pool_rows(ex, A, sample, S, H, W, f, pA, overflow);
        pooled_stats(ex, pA, S, Np, overflow, logpA, sa);
        pooled_need(ex, pX, logpX, sx, G, pA, logpA, sa, S, Np, tau, cross, need);
        int64_t kept = 0;
        for (size_t i = 0; i < (size_t)G * S; i++) kept += need[i];
        if (4 * ((int64_t)G * S - kept) < (int64_t)G * S) {
            memset(need, 1, (size_t)G * N);
        } else {
            pool_rows(ex, A, NULL, N, H, W, f, pA, overflow);
            pooled_stats(ex, pA, N, Np, overflow, logpA, sa);
            pooled_need(ex, pX, logpX, sx, G, pA, logpA, sa, N, Np, tau, cross, need);
        }
    }
    free(pA), free(logpA), free(pX), free(logpX), free(cross), free(sa), free(sx), free(overflow);
    free(sample);
    return ok;
}

/* Iteration 0: each anchor averages every row of A closer than tau. */
static int anchor_step(const dseg_exec *ex, const float *A, int H, int W, const int *anchor_rows,
                       int gh, int gw, double tau, float *proposals, dseg_merge_stats *stats) {
    const int N = H * W, G = gh * gw;
    unsigned char *mask = malloc((size_t)G * N); /* candidates, then selections */
    float *X = dseg_malloc(sizeof(float) * (size_t)G * N);
    float *logX = dseg_malloc(sizeof(float) * (size_t)G * N);
    float *logA = dseg_malloc(sizeof(float) * (size_t)N * N);
    float *cross = dseg_malloc(sizeof(float) * (size_t)G * N);
    row_stats *sx = malloc(sizeof(row_stats) * G), *sa = malloc(sizeof(row_stats) * N);
    int32_t *count = malloc(sizeof(int32_t) * G);
    double *acc = NULL;
    int rc = DSEG_OK;
    if (!mask || !X || !logX || !logA || !cross || !sx || !sa || !count) goto oom;
    if (!candidate_pairs(ex, A, H, W, anchor_rows, G, tau, mask)) goto oom;
    for (int g = 0; g < G; g++)
        memcpy(X + (size_t)g * N, A + (size_t)anchor_rows[g] * N, sizeof(float) * N);
    log_rows(ex, X, G, N, logX, sx);
    log_rows(ex, A, N, N, logA, sa);
    cross_terms(ex, X, logX, G, A, logA, N, N, cross, mask);

    const double rel = estimate_rel_error(ex, N);
    int64_t refined = 0, exact = 0, candidates = 0;
#pragma omp parallel for schedule(dynamic, 4) reduction(+ : refined, exact, candidates) \
    num_threads(dseg_threads_for(ex, (double)G * N * 8))
    for (int g = 0; g < G; g++) {
        int32_t n_sel = 0;
        recheck_counts rc_g = {0, 0};
        unsigned char *m = mask + (size_t)g * N;
        const float *x = X + (size_t)g * N, *lx = logX + (size_t)g * N;
        const float *c = cross + (size_t)g * N;
        for (int p = 0; p < N; p++) {
            if (!m[p]) continue;
            candidates++;
            m[p] = (unsigned char)below(c[p], sx + g, sa + p, x, lx, A + (size_t)p * N,
                                        logA + (size_t)p * N, N, tau, rel, &rc_g);
            n_sel += m[p];
        }
        count[g] = n_sel;
        refined += rc_g.refined, exact += rc_g.exact;
    }
    free(cross), cross = NULL;
    free(logA), logA = NULL;
    free(X), free(logX), X = logX = NULL;

    acc = malloc(sizeof(double) * (size_t)G * N);
    if (!acc || !selected_means(ex, A, N, gh, gw, mask, count, acc, proposals)) goto oom;
    if (stats) {
        stats->pairs += (int64_t)G * N;
        stats->full_distances += candidates;
        stats->refined += refined;
        stats->exact_rechecks += exact;
    }
    goto done;
oom:
    rc = dseg_fail(DSEG_ENOMEM, "merge: out of memory");
done:
    free(X), free(logX), free(logA), free(cross), free(sx), free(sa);
    free(mask), free(count), free(acc);
    return rc;
}

/* Iterations >= 1: greedy, non-exclusive merging of K proposals, in place.
 * Returns the new count in *K. */
static int merge_step(const dseg_exec *ex, float *P, int *K, int N, double tau, int *seeds,
                      dseg_merge_stats *stats) {
    const int k = *K;
    float *logP = dseg_malloc(sizeof(float) * (size_t)k * N);
    float *cross = dseg_malloc(sizeof(float) * (size_t)k * k);
    unsigned char *close = malloc((size_t)k * k);
    unsigned char *matched = calloc((size_t)k, 1);
    float *out = dseg_malloc(sizeof(float) * (size_t)k * N);
    double *acc = malloc(sizeof(double) * N);
    row_stats *st = malloc(sizeof(row_stats) * k);
    int rc = DSEG_OK;
    if (!logP || !cross || !close || !matched || !out || !acc || !st) {
        rc = dseg_fail(DSEG_ENOMEM, "merge: out of memory");
        goto done;
    }
    log_rows(ex, P, k, N, logP, st);
    cross_terms(ex, P, logP, k, P, logP, k, N, cross, NULL);
    const double rel = estimate_rel_error(ex, N);
    int64_t refined = 0, exact = 0;
    /* D is symmetric (sym_kl_exact bit for bit too): decide each unordered
     * pair once, from the estimate of (i, j), j > i. A proposal is always
     * within tau of itself (D = 0 < tau). */
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : refined, exact) \
    num_threads(dseg_threads_for(ex, (double)k * k * 4))
    for (int i = 0; i < k; i++) {
        recheck_counts rc_i = {0, 0};
        close[(size_t)i * k + i] = 1;
        for (int j = i + 1; j < k; j++)
            close[(size_t)i * k + j] = (unsigned char)below(
                cross[(size_t)i * k + j], st + i, st + j, P + (size_t)i * N, logP + (size_t)i * N,
                P + (size_t)j * N, logP + (size_t)j * N, N, tau, rel, &rc_i);
        refined += rc_i.refined, exact += rc_i.exact;
    }
    for (int i = 0; i < k; i++)
        for (int j = 0; j < i; j++) close[(size_t)i * k + j] = close[(size_t)j * k + i];

    /* As the official code: a seed selects every proposal close to it,
     * matched or not; matched proposals only stop being seeds. */
    int n_out = 0;
    for (int i = 0; i < k; i++) {
        if (matched[i]) continue;
        memset(acc, 0, sizeof(double) * N);
        int64_t count = 0;
        for (int j = 0; j < k; j++) {
            if (j != i && !close[(size_t)i * k + j]) continue;
            matched[j] = 1;
            const float *y = P + (size_t)j * N;
            for (int c = 0; c < N; c++) acc[c] += y[c];
            count++;
        }
        mean_into(acc, count, N, out + (size_t)n_out * N);
        if (seeds) seeds[n_out] = seeds[i]; /* n_out <= i: in place */
        n_out++;
    }
    memcpy(P, out, sizeof(float) * (size_t)n_out * N);
    *K = n_out;
    if (stats) {
        stats->pairs += (int64_t)k * (k - 1) / 2;
        stats->full_distances += (int64_t)k * (k - 1) / 2;
        stats->refined += refined;
        stats->exact_rechecks += exact;
    }
done:
    free(logP), free(cross), free(close), free(matched), free(out), free(acc), free(st);
    return rc;
}

int dseg_anchor_coords(int R, int grid, int *coords) {
    if (R < 1) return dseg_fail(DSEG_EINVAL, "A: resolution must be >= 1, got %d", R);
    if (grid < 1 || grid > R)
        return dseg_fail(DSEG_EINVAL, "grid must be in [1, %d] for resolution %d, got %d", R, R,
                         grid);
    if (grid == 1) { /* the official formula divides by grid - 1 */
        coords[0] = (R - 1) / 2;
        return DSEG_OK;
    }
    const int seg = (R - 1) / (grid - 1);
    const int start = (R - 1 - seg * (grid - 1)) / 2;
    for (int k = 0; k < grid; k++) coords[k] = start + k * seg;
    return DSEG_OK;
}

int dseg_anchor_counts(int H, int W, int grid, int *rows, int *cols) {
    if (H < 1 || W < 1)
        return dseg_fail(DSEG_EINVAL, "A: shape must be >= 1, got %dx%d", H, W);
    const int short_side = H < W ? H : W, long_side = H < W ? W : H;
    if (grid < 1 || grid > short_side)
        return dseg_fail(DSEG_EINVAL, "grid must be in [1, %d] for shape %dx%d, got %d",
                         short_side, H, W, grid);
    /* round(grid * long / short), halves up, in exact integer arithmetic */
    int64_t n = ((int64_t)2 * grid * long_side + short_side) / ((int64_t)2 * short_side);
    if (n < 1) n = 1;
    if (n > long_side) n = long_side;
    *rows = H <= W ? grid : (int)n;
    *cols = H <= W ? (int)n : grid;
    return DSEG_OK;
}

int dseg_merge(const float *A, int R, int grid, const double *thresholds, int n_iter,
               float *proposals, int *n_proposals, dseg_merge_stats *stats) {
    const dseg_exec ex = dseg_default_exec();
    return dseg_merge_hw(A, R, R, grid, thresholds, n_iter, proposals, n_proposals, NULL, stats,
                         &ex);
}

int dseg_merge_ex(const float *A, int R, int grid, const double *thresholds, int n_iter,
                  float *proposals, int *n_proposals, int *seeds, dseg_merge_stats *stats,
                  const dseg_exec *ex) {
    return dseg_merge_hw(A, R, R, grid, thresholds, n_iter, proposals, n_proposals, seeds, stats,
                         ex);
}

int dseg_merge_hw(const float *A, int H, int W, int grid, const double *thresholds, int n_iter,
                  float *proposals, int *n_proposals, int *seeds, dseg_merge_stats *stats,
                  const dseg_exec *ex) {
    dseg_clear_error();
    if (dseg_check_exec(ex) != DSEG_OK) return DSEG_EINVAL;
    if (!A || !thresholds || !proposals || !n_proposals)
        return dseg_fail(DSEG_EINVAL, "merge: NULL pointer argument");
    if (H < 1 || W < 1 || (int64_t)H * W > DSEG_MAX_POSITIONS) /* (H*W)^2 must fit an int index */
        return dseg_fail(DSEG_EINVAL, "A: shape %dx%d out of range (H * W at most %d)", H, W,
                         DSEG_MAX_POSITIONS);
    if (n_iter < 1) return dseg_fail(DSEG_EINVAL, "kl_threshold: at least one iteration needed");
    for (int i = 0; i < n_iter; i++)
        if (!(thresholds[i] > 0.0) || isinf(thresholds[i]))
            return dseg_fail(DSEG_EINVAL, "kl_threshold[%d] must be finite and > 0, got %g", i,
                             thresholds[i]);
    int gh, gw;
    int rc = dseg_anchor_counts(H, W, grid, &gh, &gw);
    if (rc != DSEG_OK) return rc;
    if (stats) stats->pairs = stats->full_distances = stats->refined = stats->exact_rechecks = 0;

    const int N = H * W, G = gh * gw;
    int *anchor_rows = malloc(sizeof(int) * G), *cy = malloc(sizeof(int) * gh);
    int *cx = malloc(sizeof(int) * gw);
    if (!anchor_rows || !cy || !cx) {
        free(anchor_rows), free(cy), free(cx);
        return dseg_fail(DSEG_ENOMEM, "merge: out of memory");
    }
    dseg_anchor_coords(H, gh, cy); /* cannot fail: 1 <= gh <= H, 1 <= gw <= W */
    dseg_anchor_coords(W, gw, cx);
    for (int a = 0; a < gh; a++) /* row-major, first coordinate slowest */
        for (int b = 0; b < gw; b++) anchor_rows[a * gw + b] = cy[a] * W + cx[b];
    free(cy), free(cx);
    rc = anchor_step(ex, A, H, W, anchor_rows, gh, gw, thresholds[0], proposals, stats);
    if (seeds) memcpy(seeds, anchor_rows, sizeof(int) * G); /* proposal a: anchor a's */
    free(anchor_rows);
    int K = G;
    for (int it = 1; rc == DSEG_OK && it < n_iter; it++)
        rc = merge_step(ex, proposals, &K, N, thresholds[it], seeds, stats);
    if (rc == DSEG_OK) *n_proposals = K;
    return rc;
}
