/*
 * Iterative KL merging (DiffSeg step 3).
 *
 * The symmetric KL between rows p and q expands to
 *     D = 1/2 (h_p + h_q - p.log(q) - log(p).q),   h_x = sum x log x,
 * so all cross terms of a block are two float32 GEMMs. A float32 GEMM over
 * 2 * H*W terms carries rounding error, so a pair whose fast estimate lies
 * within a bound of the threshold is recomputed in float64 from the float32
 * logs (a few ulp from exact), and the rare pair still within that tier's
 * bound exactly from scratch. Every merge decision is therefore that of the
 * exact float64 distance, whatever GEMM ran and however many threads it used,
 * and no structure of the attention makes the rechecks dominate. The
 * built-in GEMM takes log A as it packs A (log A is never stored); the pairs
 * left open are then re-decided row by row of A, each row's logs taken once.
 *
 * Each anchor's mean of its selected rows is summed in float64 by additions
 * only, from subset tables shared along a tree of alike selections (see
 * "Subset-table sums").
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

typedef struct {
    double h;      /* sum x log x */
    double mass;   /* sum x */
    double maxlog; /* max |log x| over x > 0 */
    double maxpos; /* max(0, max log x): 0 when every x <= 1 */
    int has_zero;
    uint64_t zeros; /* hash of the set of zero positions (0 when none) */
    int overflow;   /* a pooled bin beyond float range: no bound from this row */
    int bad;        /* a NaN, infinite or negative value (from the spans) */
} row_stats;

/* A row's statistics from its spans, in order. */
static void row_from_spans(const dseg_span_stats *sp, int n_spans, row_stats *st) {
    double h = 0.0, mass = 0.0;
    float maxlog = 0.0f, maxpos = 0.0f, minx = sp[0].minx;
    uint64_t zeros = 0;
    for (int s = 0; s < n_spans; s++) {
        h += sp[s].h, mass += sp[s].mass, zeros += sp[s].zeros;
        maxlog = sp[s].maxlog > maxlog ? sp[s].maxlog : maxlog;
        maxpos = sp[s].maxpos > maxpos ? sp[s].maxpos : maxpos;
        minx = sp[s].minx < minx ? sp[s].minx : minx;
    }
    st->h = h, st->mass = mass, st->maxlog = maxlog, st->maxpos = maxpos;
    st->has_zero = !(minx > 0.0f);
    st->zeros = zeros;
    st->overflow = 0;
    /* NaN, +-inf and negatives show in the min or the float64 mass (finite
     * for any finite floats) */
    st->bad = !(minx >= 0.0f) || !(mass <= DBL_MAX);
}

/* logx = log x (0 where x == 0) and the row's statistics. */
static void log_row(const float *x, int n, float *logx, row_stats *st) {
    dseg_span_stats sp;
    dseg_log_span(x, n, 0, logx, &sp);
    row_from_spans(&sp, 1, st);
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
 * smaller of the two is used. The float32 logs are within DSEG_LOG_REL_ERROR of
 * the float64 ones (relative, same sign), which moves T' and h_x by at most
 * that times S' and sum x |l_x| <= |h_x| + 2 mass_x maxpos_x (same identity
 * as (b)); the float64 sums of h_x and of sym_kl_exact each add at most
 * (n + 4) eps64 relative to those same sums of |terms|. The h_x never pass
 * through the GEMM, so g scales S' alone. With
 *   rho_h = 2 DSEG_LOG_REL_ERROR + 8 (n + 4) eps64,  rho = g + rho_h,
 *   |d - D| <= (rho S' + rho_h (H_p + H_q)) / 2,  H_x = |h_x| + 2 mass_x maxpos_x,
 * plus the rounding of d itself (a few eps64 of |h_p| + |h_q| + |c|). The
 * factors of 2 on the log and double terms, and gemm_err's own 1.6x on its
 * chain bound, cover the (1 + small) products dropped above.
 */
typedef struct {
    double rho;    /* of the cross term: GEMM, logs and float64 sums */
    double rho_h;  /* of the h_x and of sym_kl_exact's sum: logs and float64 sums */
    double shrink; /* 1 / (1 - rho), rounded up: (b) as a product */
} estimate_error;

/* The bound from its pair terms: a and e of (a) and (b), hx = H_p + H_q and
 * habs = |h_p| + |h_q|. Inlined into SIMD loops. */
static inline double bound_from_terms(double a, double e, double hx, double habs, double c,
                                      estimate_error err) {
    const double b = (2.0 * e - c) * err.shrink;
    const double s = b >= 0.0 && b < a ? b : a; /* b < 0: no bound from (b) (never on sound input) */
    return 0.5 * (err.rho * s + err.rho_h * hx) + 8.0 * DBL_EPSILON * (habs + fabs(c)) + 1e-12;
}

static double error_bound(const row_stats *sp, const row_stats *sq, double c, estimate_error err) {
    return bound_from_terms(sp->mass * sq->maxlog + sq->mass * sp->maxlog,
                            sp->mass * sq->maxpos + sq->mass * sp->maxpos,
                            fabs(sp->h) + 2.0 * sp->mass * sp->maxpos + fabs(sq->h) +
                                2.0 * sq->mass * sq->maxpos,
                            fabs(sp->h) + fabs(sq->h), c, err);
}

/* error_bound's rates for k-term GEMMs of ex's backend. */
static estimate_error estimate_rel_error(const dseg_exec *ex, int k) {
    const double rho_h = 2.0 * DSEG_LOG_REL_ERROR + 8.0 * (k + 4) * DBL_EPSILON;
    const double rho = dseg_gemm_chain_error(ex, k) + rho_h;
    const estimate_error err = {rho, rho_h, (1.0 + 4.0 * DBL_EPSILON) / (1.0 - rho)};
    return err;
}

/*
 * D(p, q) from the float32 logs, summed in float64 (same zero conventions as
 * sym_kl_exact). *bound receives a bound on its distance from sym_kl_exact's
 * value: the log error (DSEG_LOG_REL_ERROR per log) plus the rounding of both
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
    *bound = 0.5 * a * (DSEG_LOG_REL_ERROR * 1.01 + 4.0 * (n + 4) * DBL_EPSILON) + 1e-300;
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

/* Statistics of rows as columns, for the first tier in SIMD, and the
 * largest of each over the rows (NaN if one is NaN), for estimate_row's cap. */
typedef struct {
    double *h, *mass, *maxlog, *maxpos, *hx; /* hx = |h| + 2 mass maxpos */
    uint64_t *zeros;
    unsigned char *has_zero;
    double top_habs, top_mass, top_maxlog, top_maxpos, top_hx;
} stat_columns;

/* max(top, x), NaN once either is. */
static double top_of(double top, double x) { return x > top || x != x ? x : top; }

static void stat_columns_free(stat_columns *sc) {
    free(sc->h), free(sc->mass), free(sc->maxlog), free(sc->maxpos), free(sc->hx);
    free(sc->zeros), free(sc->has_zero);
}

static int stat_columns_make(const row_stats *st, int n, stat_columns *sc) {
    sc->h = malloc(sizeof(double) * n), sc->mass = malloc(sizeof(double) * n);
    sc->maxlog = malloc(sizeof(double) * n), sc->maxpos = malloc(sizeof(double) * n);
    sc->hx = malloc(sizeof(double) * n), sc->zeros = malloc(sizeof(uint64_t) * n);
    sc->has_zero = malloc((size_t)n);
    if (!sc->h || !sc->mass || !sc->maxlog || !sc->maxpos || !sc->hx || !sc->zeros || !sc->has_zero)
        return 0;
    sc->top_habs = sc->top_mass = sc->top_maxlog = sc->top_maxpos = sc->top_hx = 0.0;
    for (int p = 0; p < n; p++) {
        sc->h[p] = st[p].h, sc->mass[p] = st[p].mass;
        sc->maxlog[p] = st[p].maxlog, sc->maxpos[p] = st[p].maxpos;
        sc->hx[p] = fabs(st[p].h) + 2.0 * st[p].mass * st[p].maxpos;
        sc->zeros[p] = st[p].zeros, sc->has_zero[p] = (unsigned char)st[p].has_zero;
        sc->top_habs = top_of(sc->top_habs, fabs(sc->h[p]));
        sc->top_mass = top_of(sc->top_mass, sc->mass[p]);
        sc->top_maxlog = top_of(sc->top_maxlog, sc->maxlog[p]);
        sc->top_maxpos = top_of(sc->top_maxpos, sc->maxpos[p]);
        sc->top_hx = top_of(sc->top_hx, sc->hx[p]);
    }
    return 1;
}

/* The first tier, for one row g (an anchor, a proposal) against every row p
 * with m[p] set: m[p] becomes 1 (D < tau) or 0 where the estimate decides,
 * 2 where it cannot. Returns the number of rows p with m[p] set; *open gets
 * the number left open.
 *
 * A first pass (branch-free, in SIMD) decides the pairs whose estimate is
 * farther from tau than a cap on their bound: error_bound with the row
 * statistics of p replaced by their largest values over every row. Each of
 * the bound's terms, and each rounded step on them, only grows with those
 * statistics when c <= 0 (then b >= 0 and s = min(a, b); the sign of c is
 * that of the cross entropies, never positive for maps of values <= 1), so
 * the cap is >= the bound and a pair it decides gets the decision the bound
 * would give. The few pairs left (marked 3) get their own bound. */
DSEG_CLONES
static int64_t estimate_row(const float *cross, const row_stats *sg, const stat_columns *sa, int n,
                            double tau, estimate_error err, unsigned char *m, int64_t *open) {
    const double hxg = fabs(sg->h) + 2.0 * sg->mass * sg->maxpos, habsg = fabs(sg->h);
    const double top_a = sg->mass * sa->top_maxlog + sa->top_mass * sg->maxlog;
    const double top_e = sg->mass * sa->top_maxpos + sa->top_mass * sg->maxpos;
    const double top_hx = hxg + sa->top_hx, top_habs = habsg + sa->top_habs;
    int64_t candidates = 0, capped = 0;
#pragma omp simd reduction(+ : candidates, capped)
    for (int p = 0; p < n; p++) {
        const double c = cross[p];
        const double d = 0.5 * (sg->h + sa->h[p] - c);
        const double cap = bound_from_terms(top_a, top_e, top_hx, top_habs, c, err);
        /* a non-finite estimate (float32 overflow on huge values) is no estimate */
        const int sure = !(sg->has_zero | sa->has_zero[p]) && c <= 0.0 && fabs(d) <= DBL_MAX &&
                         fabs(d - tau) > cap;
        int r = sure ? d < tau : 3;
        r = sa->zeros[p] != sg->zeros ? 0 : r; /* zero sets differ: D = +inf */
        r = m[p] ? r : 0;
        candidates += m[p] != 0;
        capped += r == 3;
        m[p] = (unsigned char)r;
    }
    int64_t undecided = 0;
    for (int p = 0; capped && p < n; p++) {
        if (m[p] != 3) continue;
        capped--;
        const double c = cross[p];
        const double d = 0.5 * (sg->h + sa->h[p] - c);
        const double bound = bound_from_terms(
            sg->mass * sa->maxlog[p] + sa->mass[p] * sg->maxlog,
            sg->mass * sa->maxpos[p] + sa->mass[p] * sg->maxpos, hxg + sa->hx[p],
            habsg + fabs(sa->h[p]), c, err);
        const int sure = !(sg->has_zero | sa->has_zero[p]) && fabs(d) <= DBL_MAX &&
                         bound <= DBL_MAX && fabs(d - tau) > bound;
        m[p] = sure ? d < tau : 2;
        undecided += m[p] == 2;
    }
    *open = undecided;
    return candidates;
}

/* The float64 tiers. */
static int refined_below(const float *p, const float *lp, const float *q, const float *lq, int n,
                         double tau, recheck_counts *counts) {
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
static int surely_not_below(float cross, const row_stats *sp, const row_stats *sq, estimate_error rel,
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

/*
 * Subset-table sums ("Four Russians") along a tree of anchors.
 *
 * Rows are cut into groups of t consecutive ones (t = 1, 2 or 4). For a
 * slab of columns, a group's table holds the sum of every subset of its rows
 * (2^t entries, one addition each), and an anchor's sum takes from each group
 * the entry its selection picks (its code there).
 *
 * Anchors with alike selections pick the same codes in most groups, so the
 * entries are added along a tree: complete linkage on the Hamming distance
 * between selections. A node owns the groups in which all of its anchors
 * agree and its parent's anchors do not; it adds those entries once into its
 * partial sum, and an anchor's sum is the partial sums on its path to the
 * root. Each entry that one table per anchor would add is added at most
 * once: on the attention of a random-weight SD UNet a third as many, on
 * soft segments under a tenth; identical selections share every entry, and
 * rows no anchor selects are never read. The t of least cost is taken.
 *
 * The tables of a chunk of groups (TABLE_CHUNK entries, in L2) are built,
 * then every node adds its entries of the chunk in registers. The order of
 * every sum depends on the selections alone, not on the thread count.
 */
#ifndef TABLE_COLS
#define TABLE_COLS 32 /* columns per slab: two cache lines of A's rows, 8 vectors of doubles */
#endif
#ifndef TABLE_CHUNK
#define TABLE_CHUNK 1024 /* table entries per chunk: 1024 x 32 doubles = 256 KiB */
#endif
#if TABLE_COLS % 16 || TABLE_CHUNK % 256
#error "TABLE_COLS: whole cache lines; TABLE_CHUNK: chunks of whole 64-bit words of rows for t <= 4"
#endif
enum { TABLE_MAX_BITS = 4 };
/* Four doubles; GCC and Clang lower it to the vectors each clone has. */
typedef double dvec __attribute__((vector_size(32)));
#define TABLE_VECS (TABLE_COLS / 4)

/* A node's entries within one chunk of groups: the next n of
 * table_plan.entries. */
typedef struct {
    int32_t node, n;
} table_op;

typedef struct {
    int t;                      /* rows per group: 1, 2 or 4 (fields of a 64-bit word) */
    int n_rows, n_groups;       /* rows of A; groups of t rows (the last may have fewer) */
    int chunk_groups, n_chunks; /* groups whose tables are built together */
    int n_nodes;                /* 2G - 1: anchor g is node g, the root is the last */
    int32_t *parent;            /* per node (-1: the root); above its children's index */
    int64_t *chunk_op;          /* ops of chunk k: [chunk_op[k], chunk_op[k + 1]) */
    int32_t *built;             /* the groups with an entry, in order */
    int32_t *chunk_built;       /* chunk k's built groups: from chunk_built[k] */
    table_op *ops;
    uint16_t *entries; /* per op entry: its index in the chunk's tables */
    double cost;       /* double additions per column */
} table_plan;

static void table_plan_free(table_plan *tp) {
    free(tp->parent), free(tp->chunk_op), free(tp->ops), free(tp->entries), free(tp->built);
    free(tp->chunk_built);
}

/* Rows of group q (fewer in the last). */
static int group_rows(const table_plan *tp, int q) {
    const int left = tp->n_rows - q * tp->t;
    return left < tp->t ? left : tp->t;
}

static void set_groups(table_plan *tp, int t) {
    tp->t = t;
    tp->n_groups = (tp->n_rows + t - 1) / t;
    tp->chunk_groups = TABLE_CHUNK >> t;
    tp->n_chunks = (tp->n_groups + tp->chunk_groups - 1) / tp->chunk_groups;
}

/* Bit i: is byte i of the 8 at m nonzero? Little-endian words: a byte's OR
 * folded into its lowest bit, then the 8 lowest bits gathered by a multiply. */
static uint64_t byte_bits(const unsigned char *m) {
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    uint64_t v;
    memcpy(&v, m, sizeof v);
    v |= v >> 4, v |= v >> 2, v |= v >> 1; /* bits from the next byte stay above bit 0 */
    return ((v & 0x0101010101010101ull) * 0x0102040810204080ull) >> 56;
#else
    uint64_t x = 0;
    for (int i = 0; i < 8; i++) x |= (uint64_t)(m[i] != 0) << i;
    return x;
#endif
}

/* Each anchor's selection as bits (G x words, zero past N). */
static void selection_bits(const dseg_exec *ex DSEG_OMP_ONLY, const unsigned char *mask, int G,
                           int N, int words, uint64_t *bits) {
#pragma omp parallel for schedule(static) num_threads(dseg_threads_for(ex, (double)G * N))
    for (int g = 0; g < G; g++) {
        const unsigned char *m = mask + (size_t)g * N;
        uint64_t *b = bits + (size_t)g * words;
        for (int w = 0; w < words; w++) {
            const int p0 = w * 64, n = N - p0 < 64 ? N - p0 : 64;
            uint64_t x = 0;
            int i = 0;
            for (; i + 8 <= n; i += 8) x |= byte_bits(m + p0 + i) << i;
            for (; i < n; i++) x |= (uint64_t)(m[p0 + i] != 0) << i;
            b[w] = x;
        }
    }
}

/* Hamming distances between every pair of selections into d (G x G); at
 * most N <= 215^2 (the core's bound), so 16 bits hold them. */
DSEG_CLONES
static void selection_distances(const dseg_exec *ex DSEG_OMP_ONLY, const uint64_t *bits, int G,
                                int words, uint16_t *d) {
#pragma omp parallel for schedule(dynamic, 8) \
    num_threads(dseg_threads_for(ex, (double)G * G * words / 2))
    for (int a = 0; a < G; a++) {
        const uint64_t *x = bits + (size_t)a * words;
        d[(size_t)a * G + a] = 0;
        for (int b = 0; b < a; b++) {
            const uint64_t *y = bits + (size_t)b * words;
            int n = 0;
            for (int w = 0; w < words; w++) n += __builtin_popcountll(x[w] ^ y[w]);
            d[(size_t)a * G + b] = d[(size_t)b * G + a] = (uint16_t)n;
        }
    }
}

/* Complete-linkage tree over the anchors (tp->parent), by the nearest-
 * neighbour chain on the distances d (overwritten). Ties go to the chain's
 * previous cluster, then to the lowest slot: the tree depends on the
 * selections alone. 0: out of memory. */
static int linkage_tree(uint16_t *d, int G, table_plan *tp) {
    int *chain = malloc(sizeof(int) * G), *node_of = malloc(sizeof(int) * G);
    unsigned char *active = malloc(G);
    const int ok = chain && node_of && active;
    if (ok) {
        for (int g = 0; g < G; g++) active[g] = 1, node_of[g] = g;
        int len = 0, next = G;
        for (int left = G; left > 1;) {
            if (len == 0) {
                int s = 0;
                while (!active[s]) s++;
                chain[len++] = s;
            }
            const int a = chain[len - 1], prev = len > 1 ? chain[len - 2] : -1;
            const uint16_t *da = d + (size_t)a * G;
            int best = prev;
            unsigned closest = prev >= 0 ? da[prev] : UINT32_MAX;
            for (int k = 0; k < G; k++)
                if (active[k] && k != a && da[k] < closest) best = k, closest = da[k];
            if (best != prev) {
                chain[len++] = best;
                continue;
            }
            len -= 2; /* a and prev are each other's nearest: merge them */
            const int lo = a < prev ? a : prev, hi = a < prev ? prev : a;
            for (int k = 0; k < G; k++)
                if (active[k] && k != lo && k != hi) {
                    const uint16_t x = d[(size_t)lo * G + k], y = d[(size_t)hi * G + k];
                    d[(size_t)lo * G + k] = d[(size_t)k * G + lo] = x > y ? x : y;
                }
            tp->parent[node_of[lo]] = tp->parent[node_of[hi]] = next;
            node_of[lo] = next++;
            active[hi] = 0;
            left--;
        }
        tp->parent[next - 1] = -1;
    }
    free(chain), free(node_of), free(active);
    return ok;
}

/* agree (n_nodes x words): bit p = all anchors under the node select row p
 * alike (all ones on the anchors themselves); rep: an anchor under each node. */
static void node_agreement(const table_plan *tp, int G, int words, const uint64_t *bits,
                           uint64_t *agree, int32_t *rep, int32_t *first_child) {
    for (int n = 0; n < tp->n_nodes; n++) first_child[n] = -1;
    memset(agree, 0xff, sizeof(uint64_t) * (size_t)G * words);
    for (int g = 0; g < G; g++) rep[g] = g;
    for (int n = 0; n < tp->n_nodes - 1; n++) { /* children before parents */
        const int up = tp->parent[n];
        if (first_child[up] < 0) {
            first_child[up] = n;
            continue;
        }
        const int c0 = first_child[up];
        const uint64_t *a0 = agree + (size_t)c0 * words, *a1 = agree + (size_t)n * words;
        const uint64_t *b0 = bits + (size_t)rep[c0] * words, *b1 = bits + (size_t)rep[n] * words;
        uint64_t *out = agree + (size_t)up * words;
        for (int w = 0; w < words; w++) out[w] = a0[w] & a1[w] & ~(b0[w] ^ b1[w]);
        rep[up] = rep[c0];
    }
}

/* Per t-bit field of x (t = 1, 2, 4), at the field's lowest bit: whether
 * all (all = 1) or any of its bits are set. */
static uint64_t fields(uint64_t x, int t, int all) {
    static const uint64_t lowest[5] = {0, ~0ull, 0x5555555555555555ull, 0, 0x1111111111111111ull};
    for (int s = 1; s < t; s <<= 1) x = all ? x & (x >> s) : x | (x >> s);
    return x & lowest[t];
}

/* Fields of word w at whose groups node n adds an entry: all of its anchors
 * agree there, its parent's do not, and the subset is not empty. */
static uint64_t node_adds(const table_plan *tp, int words, const uint64_t *bits,
                          const uint64_t *agree, const int32_t *rep, int n, int w) {
    const int up = tp->parent[n];
    const uint64_t own = fields(agree[(size_t)n * words + w], tp->t, 1);
    const uint64_t shared = up >= 0 ? fields(agree[(size_t)up * words + w], tp->t, 1) : 0;
    return own & ~shared & fields(bits[(size_t)rep[n] * words + w], tp->t, 0);
}

/* The entries each node adds, chunk by chunk: counted into *n_entries and
 * *n_ops, and written into tp's ops and entries when fill. */
static void plan_entries(table_plan *tp, int words, const uint64_t *bits, const uint64_t *agree,
                         const int32_t *rep, int fill, int64_t *n_entries_out, int64_t *n_ops_out,
                         uint64_t *used) {
    const int chunk_words = tp->chunk_groups * tp->t / 64; /* t | 64: whole words */
    const uint64_t low = (1u << tp->t) - 1;
    int64_t n_entries = 0, n_ops = 0;
    for (int k = 0; k < tp->n_chunks; k++) {
        if (fill) tp->chunk_op[k] = n_ops;
        const int w0 = k * chunk_words, w1 = w0 + chunk_words < words ? w0 + chunk_words : words;
        for (int n = 0; n < tp->n_nodes; n++) {
            int32_t m = 0;
            for (int w = w0; w < w1; w++) {
                uint64_t adds = node_adds(tp, words, bits, agree, rep, n, w);
                used[w] |= adds;
                if (!fill) {
                    m += __builtin_popcountll(adds);
                    continue;
                }
                const uint64_t code = bits[(size_t)rep[n] * words + w];
                for (; adds; adds &= adds - 1) {
                    const int bit = __builtin_ctzll(adds);
                    const int q = ((w - w0) * 64 + bit) / tp->t; /* group within the chunk */
                    tp->entries[n_entries + m++] = (uint16_t)((q << tp->t) | ((code >> bit) & low));
                }
            }
            if (m) {
                if (fill) tp->ops[n_ops] = (table_op){n, m};
                n_ops++, n_entries += m;
            }
        }
    }
    if (fill) tp->chunk_op[tp->n_chunks] = n_ops;
    *n_entries_out = n_entries, *n_ops_out = n_ops;
}

/* Cost of a plan in double additions per column: the tables of the groups
 * with an entry (used: a bit at each one's first row), one addition per
 * entry; the entries; per op, its node's sum; per node, clearing its sum
 * and adding its parent's. */
static double plan_cost(const table_plan *tp, int words, const uint64_t *used, int64_t n_entries,
                        int64_t n_ops) {
    double cost = 2.0 * tp->n_nodes + (double)n_entries + (double)n_ops;
    for (int w = 0; w < words; w++)
        for (uint64_t u = used[w]; u; u &= u - 1)
            cost += (1 << group_rows(tp, (w * 64 + __builtin_ctzll(u)) / tp->t)) - 1;
    return cost;
}

/* The groups with an entry, in order, and where each chunk's start. */
static int list_built(table_plan *tp, int words, const uint64_t *used) {
    int n = 0;
    for (int w = 0; w < words; w++) n += __builtin_popcountll(used[w]);
    tp->built = malloc(sizeof(int32_t) * (n + 1));
    tp->chunk_built = malloc(sizeof(int32_t) * (tp->n_chunks + 1));
    if (!tp->built || !tp->chunk_built) return 0;
    n = 0;
    for (int w = 0; w < words; w++)
        for (uint64_t u = used[w]; u; u &= u - 1) tp->built[n++] = (w * 64 + __builtin_ctzll(u)) / tp->t;
    for (int k = 0, i = 0; k <= tp->n_chunks; k++) {
        while (i < n && tp->built[i] < k * tp->chunk_groups) i++;
        tp->chunk_built[k] = i;
    }
    return 1;
}

/* The plan for (G, N) selections, with the t of least cost. Returns 0 when
 * out of memory. */
static int table_plan_make(const dseg_exec *ex, const unsigned char *mask, int G, int N,
                           table_plan *tp) {
    memset(tp, 0, sizeof *tp);
    const int n_nodes = 2 * G - 1, words = (N + 63) / 64;
    tp->n_rows = N, tp->n_nodes = n_nodes;
    tp->parent = malloc(sizeof(int32_t) * n_nodes);
    int32_t *rep = malloc(sizeof(int32_t) * n_nodes), *scratch = malloc(sizeof(int32_t) * n_nodes);
    uint64_t *bits = malloc(sizeof(uint64_t) * (size_t)G * words);
    uint64_t *agree = malloc(sizeof(uint64_t) * (size_t)n_nodes * words);
    uint16_t *d = malloc(sizeof(uint16_t) * (size_t)G * G);
    uint64_t *used = malloc(sizeof(uint64_t) * words), *used_t = malloc(sizeof(uint64_t) * words);
    int ok = tp->parent && rep && scratch && bits && agree && d && used && used_t;
    if (!ok) goto done;
    selection_bits(ex, mask, G, N, words, bits);
    selection_distances(ex, bits, G, words, d);
    ok = linkage_tree(d, G, tp);
    if (!ok) goto done;
    node_agreement(tp, G, words, bits, agree, rep, scratch);

    int64_t n_entries = 0, n_ops = 0; /* of the best t */
    int best_t = 1;
    double best = INFINITY;
    for (int t = 1; t <= TABLE_MAX_BITS; t *= 2) {
        int64_t entries, ops;
        set_groups(tp, t);
        memset(used_t, 0, sizeof(uint64_t) * words);
        plan_entries(tp, words, bits, agree, rep, 0, &entries, &ops, used_t);
        const double cost = plan_cost(tp, words, used_t, entries, ops);
        if (cost < best) {
            best = cost, best_t = t, n_entries = entries, n_ops = ops;
            memcpy(used, used_t, sizeof(uint64_t) * words);
        }
    }
    set_groups(tp, best_t);
    tp->cost = best;
    tp->chunk_op = malloc(sizeof(int64_t) * (tp->n_chunks + 1));
    tp->ops = malloc(sizeof(table_op) * (size_t)(n_ops + 1));
    tp->entries = malloc(sizeof(uint16_t) * (size_t)(n_entries + 1));
    ok = tp->chunk_op && tp->ops && tp->entries && list_built(tp, words, used);
    if (ok) plan_entries(tp, words, bits, agree, rep, 1, &n_entries, &n_ops, used_t);
done:
    free(rep), free(scratch), free(bits), free(agree), free(d), free(used), free(used_t);
    if (!ok) table_plan_free(tp);
    return ok;
}

/* tab[s] = the sum of the rows in subset s of the group (tab[0] = 0) over
 * the slab's w columns (zero past w), each entry its subset without the
 * lowest row plus that row. */
static inline __attribute__((always_inline)) void build_table(const float *rows, int N,
                                                               int n_rows, int c0, int w,
                                                               dvec *tab) {
    dvec row[TABLE_MAX_BITS][TABLE_VECS];
    for (int b = 0; b < n_rows; b++) {
        const float *y = rows + (size_t)b * N + c0;
        double x[TABLE_COLS];
        if (w == TABLE_COLS) {
#pragma omp simd
            for (int c = 0; c < TABLE_COLS; c++) x[c] = y[c];
        } else {
            for (int c = 0; c < TABLE_COLS; c++) x[c] = c < w ? y[c] : 0.0;
        }
        memcpy(row[b], x, sizeof x);
    }
    for (int v = 0; v < TABLE_VECS; v++) tab[v] = (dvec){0.0, 0.0, 0.0, 0.0};
    for (int s = 1; s < 1 << n_rows; s++) {
        const dvec *rest = tab + (size_t)(s & (s - 1)) * TABLE_VECS;
        const dvec *y = row[__builtin_ctz((unsigned)s)];
        dvec *out = tab + (size_t)s * TABLE_VECS;
        for (int v = 0; v < TABLE_VECS; v++) out[v] = rest[v] + y[v];
    }
}

/* sum += the n entries of an op, added in order into registers: each entry
 * is TABLE_VECS independent additions, enough to overlap their latency. */
static inline __attribute__((always_inline)) void add_op(dvec *sum, const dvec *tabs,
                                                          const uint16_t *entry, int n) {
    dvec part[TABLE_VECS];
    for (int v = 0; v < TABLE_VECS; v++) part[v] = tabs[(size_t)entry[0] * TABLE_VECS + v];
    for (int i = 1; i < n; i++) {
        const dvec *x = tabs + (size_t)entry[i] * TABLE_VECS;
        for (int v = 0; v < TABLE_VECS; v++) part[v] += x[v];
    }
    for (int v = 0; v < TABLE_VECS; v++) sum[v] += part[v];
}

/* Ask for the slab's part of the rows of the i-th built group: rows lie N
 * floats apart, too far for the hardware prefetcher. */
static void prefetch_group(const float *A, int N, const table_plan *tp, int i, int c0) {
    if (i >= tp->chunk_built[tp->n_chunks]) return;
    const int q = tp->built[i];
    for (int b = 0; b < group_rows(tp, q); b++)
        for (int c = 0; c < TABLE_COLS; c += 16) /* 64-byte lines */
            __builtin_prefetch(A + ((size_t)q * tp->t + b) * N + c0 + c);
}

/* The means of one slab of columns [c0, c0 + w) into proposals. acc:
 * n_nodes x TABLE_VECS, tabs: TABLE_CHUNK entries. */
DSEG_CLONES
static void table_slab(const table_plan *tp, const float *A, int N, int G, const int32_t *count,
                       int c0, int w, dvec *acc, dvec *tabs, float *proposals) {
    const int root = tp->n_nodes - 1, ahead = 1 + 16 / tp->t; /* groups: about 16 rows */
    memset(acc, 0, sizeof(dvec) * (size_t)tp->n_nodes * TABLE_VECS);
    const uint16_t *entry = tp->entries;
    for (int k = 0; k < tp->n_chunks; k++) {
        const int q0 = k * tp->chunk_groups;
        for (int i = tp->chunk_built[k]; i < tp->chunk_built[k + 1]; i++) {
            const int q = tp->built[i];
            prefetch_group(A, N, tp, i + ahead, c0);
            build_table(A + (size_t)q * tp->t * N, N, group_rows(tp, q), c0, w,
                        tabs + ((size_t)(q - q0) << tp->t) * TABLE_VECS);
        }
        for (int64_t o = tp->chunk_op[k]; o < tp->chunk_op[k + 1]; o++) {
            add_op(acc + (size_t)tp->ops[o].node * TABLE_VECS, tabs, entry, tp->ops[o].n);
            entry += tp->ops[o].n;
        }
    }
    for (int n = root - 1; n >= 0; n--) { /* parents first: their sums are whole */
        dvec *a = acc + (size_t)n * TABLE_VECS;
        const dvec *up = acc + (size_t)tp->parent[n] * TABLE_VECS;
        for (int v = 0; v < TABLE_VECS; v++) a[v] += up[v];
    }
    for (int g = 0; g < G; g++) { /* count >= 1: every anchor matches itself */
        double sum[TABLE_COLS];
        memcpy(sum, acc + (size_t)g * TABLE_VECS, sizeof sum);
        mean_into(sum, count[g], w, proposals + (size_t)g * N + c0);
    }
}

/* Per-anchor means by subset tables; threads take slabs. 0: out of memory. */
static int table_means(const dseg_exec *ex DSEG_OMP_ONLY, const table_plan *tp, const float *A,
                       int N, int G, const int32_t *count, float *proposals) {
    const int slabs = (N + TABLE_COLS - 1) / TABLE_COLS;
    int ok = 1;
#pragma omp parallel num_threads(dseg_threads_for(ex, tp->cost * N))
    {
        dvec *acc = dseg_malloc(sizeof(dvec) * (size_t)tp->n_nodes * TABLE_VECS);
        dvec *tabs = dseg_malloc(sizeof(dvec) * (size_t)TABLE_CHUNK * TABLE_VECS);
#pragma omp for schedule(dynamic, 1)
        for (int sl = 0; sl < slabs; sl++) {
            if (!acc || !tabs) continue;
            const int c0 = sl * TABLE_COLS, w = N - c0 < TABLE_COLS ? N - c0 : TABLE_COLS;
            table_slab(tp, A, N, G, count, c0, w, acc, tabs, proposals);
        }
        if (!acc || !tabs) {
#pragma omp atomic write
            ok = 0;
        }
        dseg_free_sized(acc, sizeof(dvec) * (size_t)tp->n_nodes * TABLE_VECS);
        dseg_free_sized(tabs, sizeof(dvec) * (size_t)TABLE_CHUNK * TABLE_VECS);
    }
    return ok;
}

/* Per-anchor means of the selected rows. */
static int selected_means(const dseg_exec *ex, const float *A, int N, int G,
                          const unsigned char *mask, const int32_t *count, float *proposals) {
    table_plan tp;
    if (!table_plan_make(ex, mask, G, N, &tp)) return 0;
    const int ok = table_means(ex, &tp, A, N, G, count, proposals);
    table_plan_free(&tp);
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

/* pool_row's flags */
enum { POOL_OVERFLOW = 1, POOL_BAD_VALUE = 2 };

/* One H x W map's f x f block sums into o: each band of f rows summed
 * down the columns first (vectorised along the row), then f columns per
 * bin. Flags: POOL_OVERFLOW when a bin is beyond float range (the row then
 * gives no bound; its values are moot), POOL_BAD_VALUE when the map holds a
 * NaN, an infinite or a negative value. */
DSEG_CLONES
static int pool_row(const float *x, int H, int W, int f, double *band, float *o) {
    const int Hp = H / f, Wp = W / f;
    int overflow = 0, bad = 0;
    for (int by = 0; by < Hp; by++) {
        const float *r = x + (size_t)by * f * W;
#pragma omp simd reduction(| : bad)
        for (int c = 0; c < W; c++) {
            band[c] = r[c];
            bad |= !(r[c] >= 0.0f && r[c] <= FLT_MAX);
        }
        for (int y = 1; y < f; y++)
#pragma omp simd reduction(| : bad)
            for (int c = 0; c < W; c++) {
                const float v = r[(size_t)y * W + c];
                band[c] += v;
                bad |= !(v >= 0.0f && v <= FLT_MAX);
            }
        for (int bx = 0; bx < Wp; bx++) {
            double s = 0.0;
            for (int j = 0; j < f; j++) s += band[bx * f + j];
            o[by * Wp + bx] = s <= FLT_MAX ? (float)s : 0.0f;
            overflow |= !(s <= FLT_MAX);
        }
    }
    return (overflow ? POOL_OVERFLOW : 0) | (bad ? POOL_BAD_VALUE : 0);
}

/* Sum f x f blocks of H x W key maps: rows which[i] of X (which NULL: row i),
 * i < rows, -> (rows, (H/f)*(W/f)); flags[i]: pool_row's. */
static int pool_rows(const dseg_exec *ex DSEG_OMP_ONLY, const float *X, const int *which,
                     int rows, int H, int W, int f, float *out, unsigned char *flags) {
    const int Np = (H / f) * (W / f);
    int ok = 1;
#pragma omp parallel num_threads(dseg_threads_for(ex, (double)rows * H * W))
    {
        double *band = malloc(sizeof(double) * W);
#pragma omp for schedule(dynamic, 64)
        for (int i = 0; i < rows; i++)
            if (band)
                flags[i] = (unsigned char)pool_row(X + (size_t)(which ? which[i] : i) * H * W, H,
                                                   W, f, band, out + (size_t)i * Np);
        if (!band) {
#pragma omp atomic write
            ok = 0;
        }
        free(band);
    }
    return ok;
}

/* Pooled rows -> their logs and statistics (a flagged row gives no bound). */
static void pooled_stats(const dseg_exec *ex, const float *P, int rows, int Np,
                         const unsigned char *flags, float *logP, row_stats *st) {
    log_rows(ex, P, rows, Np, logP, st);
    for (int i = 0; i < rows; i++) st[i].overflow = flags[i] != 0;
}

/* need[g * rows + p] = may D(anchor g, row p) be < tau, from pooled rows. */
static void pooled_need(const dseg_exec *ex, const float *pX, const float *logpX,
                        const row_stats *sx, int G, const float *pY, const float *logpY,
                        const row_stats *sy, int rows, int Np, double tau, float *cross,
                        unsigned char *need) {
    cross_terms(ex, pX, logpX, G, pY, logpY, rows, Np, cross, NULL);
    const estimate_error rel = estimate_rel_error(ex, Np);
#pragma omp parallel for schedule(dynamic, 4) num_threads(dseg_threads_for(ex, (double)G * rows))
    for (int g = 0; g < G; g++)
        for (int p = 0; p < rows; p++)
            need[(size_t)g * rows + p] =
                !surely_not_below(cross[(size_t)g * rows + p], sx + g, sy + p, rel, tau);
}

/* The sample that decides whether the pooled pass pays: one panel of
 * rows of A (a GEMM tile's height) in SAMPLE_STRIDE, spread over the image. */
#define SAMPLE_STRIDE 16

/* Rows of the sampled panels into rows (room for N); their count. */
static int sample_panels(int N, int *rows) {
    const int panels = (N + DSEG_GEMM_NR - 1) / DSEG_GEMM_NR;
    const int first = SAMPLE_STRIDE / 2 < panels ? SAMPLE_STRIDE / 2 : panels / 2;
    int n = 0;
    for (int q = first; q < panels; q += SAMPLE_STRIDE)
        for (int r = q * DSEG_GEMM_NR; r < (q + 1) * DSEG_GEMM_NR && r < N; r++) rows[n++] = r;
    return n;
}

/* Of the GEMM tiles (DSEG_GEMM_MR anchors x one sampled panel) in the
 * sample, how many hold a pair the pooled bound keeps. need: (G, S). */
static int64_t needed_tiles(const unsigned char *need, int G, int S, int64_t *tiles) {
    int64_t kept = 0;
    *tiles = 0;
    for (int g0 = 0; g0 < G; g0 += DSEG_GEMM_MR)
        for (int r0 = 0; r0 < S; r0 += DSEG_GEMM_NR) {
            int any = 0;
            for (int g = g0; g < g0 + DSEG_GEMM_MR && g < G; g++)
                for (int r = r0; r < r0 + DSEG_GEMM_NR && r < S; r++) any |= need[(size_t)g * S + r];
            kept += any;
            ++*tiles;
        }
    return kept;
}

/*
 * Pairs that may be closer than tau. Summing bins is a Markov map, so by the
 * data-processing inequality each KL, and so D, can only shrink under
 * pooling: a pair whose pooled distance is surely >= tau is surely >= tau at
 * full resolution. The pooled GEMMs are H*W/f^2 deep instead of H*W.
 * The pass costs about a sixth of the full GEMMs, and saves only the GEMM
 * tiles it clears whole; so it first runs on sampled panels of rows of A
 * against every anchor, and when that would clear under a quarter of the
 * tiles (attention with no segment-like structure, or soft segments), every
 * pair is marked needed without it. Either way the decisions are exact; only
 * which pairs get a full-resolution estimate changes. need: (G, N); *pruned:
 * whether the pass ran, having pooled every row of A: then *bad_value says
 * whether A holds a NaN, an infinite or a negative value (and need is moot).
 * Returns 0 on allocation failure.
 */
static int candidate_pairs(const dseg_exec *ex, const float *A, int H, int W,
                           const int *anchor_rows, int G, double tau, unsigned char *need,
                           int *pruned, int *bad_value) {
    const int N = H * W, f = pool_factor(H, W);
    *pruned = *bad_value = 0;
    if (f == 1) {
        memset(need, 1, (size_t)G * N);
        return 1;
    }
    const int Np = (H / f) * (W / f);
    float *pA = dseg_malloc(sizeof(float) * (size_t)N * Np);
    float *logpA = dseg_malloc(sizeof(float) * (size_t)N * Np);
    float *pX = dseg_malloc(sizeof(float) * (size_t)G * Np);
    float *logpX = dseg_malloc(sizeof(float) * (size_t)G * Np);
    float *cross = dseg_malloc(sizeof(float) * (size_t)G * N);
    row_stats *sa = malloc(sizeof(row_stats) * N), *sx = malloc(sizeof(row_stats) * G);
    unsigned char *flags = malloc(N > G ? N : G);
    int *sample = malloc(sizeof(int) * N);
    int ok = pA && logpA && pX && logpX && cross && sa && sx && flags && sample;
    if (ok) {
        ok = 0; /* until the pass is through */
        const int S = sample_panels(N, sample);
        if (!pool_rows(ex, A, anchor_rows, G, H, W, f, pX, flags)) goto done;
        pooled_stats(ex, pX, G, Np, flags, logpX, sx);
        if (!pool_rows(ex, A, sample, S, H, W, f, pA, flags)) goto done;
        pooled_stats(ex, pA, S, Np, flags, logpA, sa);
        pooled_need(ex, pX, logpX, sx, G, pA, logpA, sa, S, Np, tau, cross, need);
        int64_t tiles;
        const int64_t kept = needed_tiles(need, G, S, &tiles);
        if (4 * (tiles - kept) < tiles) {
            memset(need, 1, (size_t)G * N);
        } else {
            *pruned = 1;
            if (!pool_rows(ex, A, NULL, N, H, W, f, pA, flags)) goto done;
            for (int p = 0; p < N; p++) *bad_value |= (flags[p] & POOL_BAD_VALUE) != 0;
            if (!*bad_value) {
                pooled_stats(ex, pA, N, Np, flags, logpA, sa);
                pooled_need(ex, pX, logpX, sx, G, pA, logpA, sa, N, Np, tau, cross, need);
            }
        }
        ok = 1;
    }
done:
    dseg_free_sized(pA, sizeof(float) * (size_t)N * Np);
    dseg_free_sized(logpA, sizeof(float) * (size_t)N * Np);
    dseg_free_sized(pX, sizeof(float) * (size_t)G * Np);
    dseg_free_sized(logpX, sizeof(float) * (size_t)G * Np);
    dseg_free_sized(cross, sizeof(float) * (size_t)G * N);
    free(sa), free(sx), free(flags), free(sample);
    return ok;
}

/* The log hook of iteration 0's GEMM: logs of a block of A as it is packed,
 * and the block's statistics per row, part[row * slices + slice]. */
typedef struct {
    dseg_span_stats *part;
    unsigned char *done; /* part entries written */
    int slices;
    const int *order; /* position p of the GEMM is row order[p] of A (NULL: row p) */
} log_pack_ctx;

static void log_pack(void *ctx, const float *Y, int ldy, int r0, int rows, int k0, int len,
                     float *dst, int ld_dst) {
    const log_pack_ctx *c = ctx;
    for (int a = 0; a < rows; a++) {
        const size_t i = (size_t)(r0 + a) * c->slices + k0 / DSEG_GEMM_KC;
        dseg_log_span(dseg_row(Y, ldy, c->order, r0 + a) + k0, len, k0,
                      dst + (size_t)a * ld_dst, c->part + i);
        c->done[i] = 1;
    }
}


/* Statistics of the rows of A that some pair needs, from the hook's parts;
 * computed afresh for a needed row the hook did not cover whole (never
 * expected: a needed pair's tile has its row's every slice packed). */
static int stats_from_parts(const dseg_exec *ex DSEG_OMP_ONLY, const float *A, int N, int G,
                            const unsigned char *mask, const log_pack_ctx *c, row_stats *sa) {
    unsigned char *needed = calloc((size_t)N, 1);
    if (!needed) return 0;
    for (int g = 0; g < G; g++) {
        const unsigned char *m = mask + (size_t)g * N;
#pragma omp simd
        for (int p = 0; p < N; p++) needed[p] |= m[p];
    }
    int ok = 1;
#pragma omp parallel num_threads(dseg_threads_for(ex, (double)N * c->slices * 8))
    {
        float *scratch = NULL;
#pragma omp for schedule(dynamic, 64)
        for (int p = 0; p < N; p++) {
            if (!needed[p]) continue;
            int whole = 1;
            for (int sl = 0; sl < c->slices; sl++) whole &= c->done[(size_t)p * c->slices + sl];
            if (whole) {
                row_from_spans(c->part + (size_t)p * c->slices, c->slices, sa + p);
                continue;
            }
            if (!scratch) scratch = dseg_malloc(sizeof(float) * N);
            if (scratch) log_row(dseg_row(A, N, c->order, p), N, scratch, sa + p);
            else {
#pragma omp atomic write
                ok = 0;
            }
        }
        free(scratch);
    }
    free(needed);
    return ok;
}

/*
 * cross = X.log(A)^T + log(X).A^T where mask needs it, and the statistics
 * sa of the rows of A it needs. The built-in GEMM takes log A as it packs A,
 * so log A is never stored (*logA = NULL); otherwise log A is materialised
 * into *logA. With an order (only where dseg_gemm_can_hook), column p of
 * cross and mask and entry p of sa are row order[p] of A. Returns 0 when out
 * of memory.
 */
static int anchor_cross_terms(const dseg_exec *ex, const float *A, int N, const float *X,
                              const float *logX, int G, const unsigned char *mask,
                              const int *order, float *cross, row_stats *sa, float **logA) {
    const int slices = (N + DSEG_GEMM_KC - 1) / DSEG_GEMM_KC;
    const size_t part_bytes = sizeof(dseg_span_stats) * (size_t)N * slices;
    log_pack_ctx ctx = {dseg_malloc(part_bytes), calloc((size_t)N * slices, 1), slices, order};
    const dseg_pack_hook hook = {log_pack, &ctx};
    int ok = 1;
    *logA = NULL;
    if (ctx.part && ctx.done &&
        dseg_gemm_nt_hooked(ex, G, N, N, X, N, A, N, cross, N, 0, mask, &hook)) {
        if (order)
            ok = dseg_gemm_nt_rows(ex, G, N, N, logX, N, A, N, order, cross, N, 1, mask);
        else
            dseg_gemm_nt(ex, G, N, N, logX, N, A, N, cross, N, 1, mask);
        ok = ok && stats_from_parts(ex, A, N, G, mask, &ctx, sa);
    } else if (order) {
        ok = 0; /* the hook was possible: out of memory */
    } else {
        *logA = dseg_malloc(sizeof(float) * (size_t)N * N);
        ok = *logA != NULL;
        if (ok) {
            log_rows(ex, A, N, N, *logA, sa);
            cross_terms(ex, X, logX, G, A, *logA, N, N, cross, mask);
        }
    }
    dseg_free_sized(ctx.part, part_bytes), free(ctx.done);
    return ok;
}

typedef struct {
    int32_t row, anchor;
} pair_ref;

static int by_row(const void *a, const void *b) {
    const pair_ref *x = a, *y = b;
    return x->row != y->row ? (x->row > y->row) - (x->row < y->row)
                            : (x->anchor > y->anchor) - (x->anchor < y->anchor);
}

/*
 * The float64 tiers for the pairs the estimates left open (mask entry 2),
 * row by row of A, so that a row's logs are taken once (logA NULL: they
 * were never stored).
 */
static int refine_open_pairs(const dseg_exec *ex DSEG_OMP_ONLY, const float *A,
                             const float *logA, const int *order, const float *X,
                             const float *logX, int G, int N, double tau, int64_t n_open,
                             unsigned char *mask, recheck_counts *counts) {
    pair_ref *open = malloc(sizeof(pair_ref) * (size_t)(n_open + 1));
    int32_t *run = malloc(sizeof(int32_t) * (size_t)(n_open + 1));
    int ok = open && run;
    if (!ok) goto done;
    int64_t n = 0, runs = 0;
    for (int g = 0; g < G; g++) {
        const unsigned char *m = mask + (size_t)g * N;
        for (int p0 = 0; p0 < N; p0 += 8) {
            /* entries are 0, 1 or 2: a word with no bit 1 set holds no 2 */
            uint64_t word = 0x0202020202020202ull;
            if (p0 + 8 <= N) memcpy(&word, m + p0, 8);
            if (!(word & 0x0202020202020202ull)) continue;
            for (int p = p0; p < p0 + 8 && p < N; p++)
                if (m[p] == 2) open[n].row = p, open[n].anchor = g, n++;
        }
    }
    qsort(open, (size_t)n, sizeof(pair_ref), by_row);
    for (int64_t i = 0; i < n; i++)
        if (i == 0 || open[i].row != open[i - 1].row) run[runs++] = (int32_t)i;
    run[runs] = (int32_t)n;
    int64_t refined = 0, exact = 0;
#pragma omp parallel reduction(+ : refined, exact) num_threads(dseg_threads_for(ex, (double)n * N * 4))
    {
        float *scratch = logA ? NULL : dseg_malloc(sizeof(float) * N);
        recheck_counts c = {0, 0};
#pragma omp for schedule(dynamic, 1)
        for (int64_t r = 0; r < runs; r++) {
            const int p = open[run[r]].row;
            const float *a = dseg_row(A, N, order, p);
            if (!logA && !scratch) continue;
            const float *la = logA ? dseg_row(logA, N, order, p) : scratch;
            if (!logA) dseg_log_only(a, N, scratch);
            for (int32_t i = run[r]; i < run[r + 1]; i++) {
                const int g = open[i].anchor;
                mask[(size_t)g * N + p] = (unsigned char)refined_below(
                    X + (size_t)g * N, logX + (size_t)g * N, a, la, N, tau, &c);
            }
        }
        if (!logA && !scratch) {
#pragma omp atomic write
            ok = 0;
        }
        refined += c.refined, exact += c.exact;
        free(scratch);
    }
    counts->refined = refined, counts->exact = exact;
done:
    free(open), free(run);
    return ok;
}

/*
 * Where the pruning pass leaves pairs out, the GEMM skips a tile only when
 * none of its pairs is needed, and a tile's 24 rows of A are 24 consecutive
 * pixels in row-major order: a strip that often crosses a segment's edge.
 * The GEMM therefore takes the rows in the order of bands of BAND image rows,
 * column by column within a band, so that a tile's rows are a BAND x 6
 * block; on segment-like attention that skips a third more tiles. Only which
 * tiles are computed changes: each entry's sums are the same operations.
 */
enum { BAND = 4 };

/* order[position] = pixel, bands of BAND rows, column-major within a band. */
static int *band_order(int H, int W) {
    int *order = malloc(sizeof(int) * (size_t)H * W);
    if (!order) return NULL;
    int n = 0;
    for (int y0 = 0; y0 < H; y0 += BAND)
        for (int x = 0; x < W; x++)
            for (int y = y0; y < y0 + BAND && y < H; y++) order[n++] = y * W + x;
    return order;
}

/* Each row of the (G, N) mask from pixel order to order (to = 1), or back. */
static int reorder_columns(unsigned char *mask, int G, int N, const int *order, int to) {
    unsigned char *row = malloc((size_t)N);
    if (!row) return 0;
    for (int g = 0; g < G; g++) {
        unsigned char *m = mask + (size_t)g * N;
        memcpy(row, m, (size_t)N);
        if (to)
            for (int p = 0; p < N; p++) m[p] = row[order[p]];
        else
            for (int p = 0; p < N; p++) m[order[p]] = row[p];
    }
    free(row);
    return 1;
}

/* A NaN, infinite or negative value of A fails the merge, named by its first
 * position in memory. The merge checks no value up front: iteration 0 reads
 * every one before it decides anything (the pooled pass when it prunes, the
 * GEMM's row statistics otherwise), so the scan runs only on such input. */
static int bad_value_error(const float *A, int64_t n) {
    for (int64_t i = 0; i < n; i++)
        if (!(A[i] >= 0.0f && A[i] <= FLT_MAX))
            return dseg_fail(DSEG_EINVAL,
                             "A must be finite and non-negative (bad value at flat index %lld)",
                             (long long)i);
    return dseg_fail(DSEG_EINVAL, "A must be finite and non-negative (it changed during the merge)");
}

/* Does a row whose statistics were taken hold a bad value? (sa zeroed) */
static int any_bad_row(const row_stats *sa, int n) {
    int bad = 0;
    for (int p = 0; p < n; p++) bad |= sa[p].bad;
    return bad;
}

/* Iteration 0: each anchor averages every row of A closer than tau. */
static int anchor_step(const dseg_exec *ex, const float *A, int H, int W, const int *anchor_rows,
                       int gh, int gw, double tau, float *proposals, dseg_merge_stats *stats) {
    const int N = H * W, G = gh * gw;
    unsigned char *mask = dseg_malloc((size_t)G * N); /* candidates, then selections */
    const size_t GN = sizeof(float) * (size_t)G * N, NN = sizeof(float) * (size_t)N * N;
    float *X = dseg_malloc(GN);
    float *logX = dseg_malloc(GN);
    float *logA = NULL;
    float *cross = dseg_malloc(GN);
    /* zeroed: rows no pair needs get no statistics, and estimate_row reads them */
    row_stats *sx = malloc(sizeof(row_stats) * G), *sa = calloc((size_t)N, sizeof(row_stats));
    int32_t *count = malloc(sizeof(int32_t) * G);
    stat_columns sc = {0};
    int *order = NULL; /* of the GEMM's rows of A; NULL: pixel order */
    int rc = DSEG_OK, pruned, bad_value;
    if (!mask || !X || !logX || !cross || !sx || !sa || !count) goto oom;
    if (!candidate_pairs(ex, A, H, W, anchor_rows, G, tau, mask, &pruned, &bad_value)) goto oom;
    if (bad_value) goto bad;
    if (pruned && dseg_gemm_can_hook(ex, N)) {
        order = band_order(H, W);
        if (!order || !reorder_columns(mask, G, N, order, 1)) goto oom;
    }
    for (int g = 0; g < G; g++)
        memcpy(X + (size_t)g * N, A + (size_t)anchor_rows[g] * N, sizeof(float) * N);
    log_rows(ex, X, G, N, logX, sx);
    if (!anchor_cross_terms(ex, A, N, X, logX, G, mask, order, cross, sa, &logA)) goto oom;
    if (!pruned && any_bad_row(sa, N)) goto bad; /* unpruned: every row has statistics */

    /* The estimates decide almost every pair; the rest are marked 2. */
    const estimate_error rel = estimate_rel_error(ex, N);
    if (!stat_columns_make(sa, N, &sc)) goto oom;
    int64_t candidates = 0, n_open = 0;
#pragma omp parallel for schedule(dynamic, 4) reduction(+ : candidates, n_open) \
    num_threads(dseg_threads_for(ex, (double)G * N * 8))
    for (int g = 0; g < G; g++) {
        int64_t open;
        candidates += estimate_row(cross + (size_t)g * N, sx + g, &sc, N, tau, rel,
                                   mask + (size_t)g * N, &open);
        n_open += open;
    }
    recheck_counts rechecks = {0, 0};
    if (n_open &&
        !refine_open_pairs(ex, A, logA, order, X, logX, G, N, tau, n_open, mask, &rechecks))
        goto oom;
    if (order && !reorder_columns(mask, G, N, order, 0)) goto oom;
    for (int g = 0; g < G; g++) {
        const unsigned char *m = mask + (size_t)g * N;
        int32_t n_sel = 0;
#pragma omp simd reduction(+ : n_sel)
        for (int p = 0; p < N; p++) n_sel += m[p];
        count[g] = n_sel;
    }
    dseg_free_sized(cross, GN), cross = NULL;
    dseg_free_sized(logA, NN), logA = NULL;
    dseg_free_sized(X, GN), dseg_free_sized(logX, GN), X = logX = NULL;

    if (!selected_means(ex, A, N, gh * gw, mask, count, proposals)) goto oom;
    if (stats) {
        stats->pairs += (int64_t)G * N;
        stats->full_distances += candidates;
        stats->refined += rechecks.refined;
        stats->exact_rechecks += rechecks.exact;
    }
    goto done;
bad:
    rc = bad_value_error(A, (int64_t)N * N);
    goto done;
oom:
    rc = dseg_fail(DSEG_ENOMEM, "merge: out of memory");
done:
    dseg_free_sized(X, GN), dseg_free_sized(logX, GN), dseg_free_sized(logA, NN);
    dseg_free_sized(cross, GN), free(sx), free(sa);
    dseg_free_sized(mask, (size_t)G * N), free(count), free(order);
    stat_columns_free(&sc);
    return rc;
}

/*
 * Iterations >= 1: greedy, non-exclusive merging of K proposals, in place.
 * As the official code: in index order, a proposal not yet matched seeds a
 * group of every proposal close to it, matched or not; matched proposals only
 * stop being seeds. So only the seeds' rows of the distance matrix are read,
 * and which proposals seed is known only once the seeds before them are
 * grouped. Rows are therefore computed for blocks of the next unmatched
 * proposals, the blocks doubling from SEED_BLOCK_MIN up to the GEMM's height:
 * when a few proposals absorb the rest (the usual case) a few rows are
 * computed instead of K^2 / 2 pairs, and when none merge every unordered pair
 * is still computed once (a pair whose other row came first is copied: every
 * decision is the exact, symmetric one). A candidate matched by an earlier
 * one of its own block is the only row computed in vain.
 * Returns the new count in *K.
 */
enum { SEED_BLOCK_MIN = 4, SEED_BLOCK_MAX = 256 };

typedef struct {
    float *logP, *X, *logX, *cross;
    row_stats *st;
    stat_columns cols; /* st as columns */
    unsigned char *close; /* (K, K): row s valid once s's row is computed */
    unsigned char *need;  /* (block, K) */
    int *order;           /* per proposal: place of its row in computing order, -1: none yet */
    int *block;
} seed_rows;

/* Rows of close for the candidate proposals block[0..b), done rows before
 * them; returns the number of distances decided. */
static int64_t compute_seed_rows(const dseg_exec *ex, const float *P, int k, int N, double tau,
                                 estimate_error rel, seed_rows *w, int b, int done,
                                 recheck_counts *counts) {
    int64_t needed = 0;
    for (int r = 0; r < b; r++) w->order[w->block[r]] = done + r;
    for (int r = 0; r < b; r++) {
        unsigned char *need = w->need + (size_t)r * k;
        /* a pair whose other row comes first (or the pair with itself) is not computed */
        for (int j = 0; j < k; j++) needed += need[j] = w->order[j] < 0 || w->order[j] > done + r;
        memcpy(w->X + (size_t)r * N, P + (size_t)w->block[r] * N, sizeof(float) * N);
        memcpy(w->logX + (size_t)r * N, w->logP + (size_t)w->block[r] * N, sizeof(float) * N);
    }
    if (needed) cross_terms(ex, w->X, w->logX, b, P, w->logP, k, N, w->cross, w->need);
    int64_t n_open = 0, refined = 0, exact = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : n_open) \
    num_threads(dseg_threads_for(ex, (double)b * k * 8))
    for (int r = 0; r < b; r++) {
        unsigned char *close = w->close + (size_t)w->block[r] * k;
        memcpy(close, w->need + (size_t)r * k, (size_t)k);
        int64_t open;
        estimate_row(w->cross + (size_t)r * k, w->st + w->block[r], &w->cols, k, tau, rel, close,
                     &open);
        n_open += open;
    }
    if (n_open) {
#pragma omp parallel for schedule(dynamic, 64) reduction(+ : refined, exact) \
    num_threads(dseg_threads_for(ex, (double)n_open * N * 4))
        for (int64_t e = 0; e < (int64_t)b * k; e++) {
            const int r = (int)(e / k), j = (int)(e % k), s = w->block[r];
            unsigned char *close = w->close + (size_t)s * k + j;
            if (*close != 2) continue;
            recheck_counts c = {0, 0};
            *close = (unsigned char)refined_below(P + (size_t)s * N, w->logP + (size_t)s * N,
                                                  P + (size_t)j * N, w->logP + (size_t)j * N, N,
                                                  tau, &c);
            refined += c.refined, exact += c.exact;
        }
    }
    for (int r = 0; r < b; r++) {
        const int s = w->block[r];
        for (int j = 0; j < k; j++)
            if (!w->need[(size_t)r * k + j]) w->close[(size_t)s * k + j] = w->close[(size_t)j * k + s];
        w->close[(size_t)s * k + s] = 1; /* D = 0 < tau */
    }
    counts->refined += refined, counts->exact += exact;
    return needed;
}

static void seed_rows_free(seed_rows *w, int k, int bmax, int N) {
    dseg_free_sized(w->logP, sizeof(float) * (size_t)k * N);
    dseg_free_sized(w->X, sizeof(float) * (size_t)bmax * N);
    dseg_free_sized(w->logX, sizeof(float) * (size_t)bmax * N);
    dseg_free_sized(w->cross, sizeof(float) * (size_t)bmax * k);
    free(w->st), stat_columns_free(&w->cols);
    free(w->close), free(w->need), free(w->order), free(w->block);
}

static int merge_step(const dseg_exec *ex, float *P, int *K, int N, double tau, int *seeds,
                      dseg_merge_stats *stats) {
    const int k = *K, bmax = k < SEED_BLOCK_MAX ? k : SEED_BLOCK_MAX;
    seed_rows w = {.logP = dseg_malloc(sizeof(float) * (size_t)k * N),
                   .X = dseg_malloc(sizeof(float) * (size_t)bmax * N),
                   .logX = dseg_malloc(sizeof(float) * (size_t)bmax * N),
                   .cross = dseg_malloc(sizeof(float) * (size_t)bmax * k),
                   .st = malloc(sizeof(row_stats) * k),
                   .close = malloc((size_t)k * k),
                   .need = malloc((size_t)bmax * k),
                   .order = malloc(sizeof(int) * k),
                   .block = malloc(sizeof(int) * bmax)};
    unsigned char *matched = calloc((size_t)k, 1);
    float *out = dseg_malloc(sizeof(float) * (size_t)k * N);
    double *acc = malloc(sizeof(double) * N);
    int rc = DSEG_OK;
    if (!w.logP || !w.X || !w.logX || !w.cross || !w.st || !w.close || !w.need || !w.order ||
        !w.block || !matched || !out || !acc) {
        rc = dseg_fail(DSEG_ENOMEM, "merge: out of memory");
        goto done;
    }
    log_rows(ex, P, k, N, w.logP, w.st);
    if (!stat_columns_make(w.st, k, &w.cols)) {
        rc = dseg_fail(DSEG_ENOMEM, "merge: out of memory");
        goto done;
    }
    for (int i = 0; i < k; i++) w.order[i] = -1;
    const estimate_error rel = estimate_rel_error(ex, N);
    recheck_counts counts = {0, 0};
    int64_t decided = 0;
    int n_out = 0, done_rows = 0, next = 0, size = SEED_BLOCK_MIN;
    while (next < k) {
        int b = 0;
        while (next < k && b < size && b < bmax) {
            if (!matched[next]) w.block[b++] = next;
            next++;
        }
        if (!b) break;
        decided += compute_seed_rows(ex, P, k, N, tau, rel, &w, b, done_rows, &counts);
        done_rows += b;
        for (int r = 0; r < b; r++) {
            const int s = w.block[r];
            if (matched[s]) continue; /* grouped by an earlier candidate of this block */
            const unsigned char *close = w.close + (size_t)s * k;
            memset(acc, 0, sizeof(double) * N);
            int64_t count = 0;
            for (int j = 0; j < k; j++) {
                if (!close[j]) continue;
                matched[j] = 1;
                const float *y = P + (size_t)j * N;
                for (int c = 0; c < N; c++) acc[c] += y[c];
                count++;
            }
            mean_into(acc, count, N, out + (size_t)n_out * N);
            if (seeds) seeds[n_out] = seeds[s]; /* n_out <= s: in place */
            n_out++;
        }
        size *= 2;
    }
    memcpy(P, out, sizeof(float) * (size_t)n_out * N);
    *K = n_out;
    if (stats) {
        stats->pairs += decided;
        stats->full_distances += decided;
        stats->refined += counts.refined;
        stats->exact_rechecks += counts.exact;
    }
done:
    seed_rows_free(&w, k, bmax, N);
    dseg_free_sized(out, sizeof(float) * (size_t)k * N);
    free(matched), free(acc);
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
