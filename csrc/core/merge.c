/*
 * Iterative KL merging (DiffSeg step 3).
 *
 * The symmetric KL between rows p and q expands to
 *     D = 1/2 (h_p + h_q - p.log(q) - log(p).q),   h_x = sum x log x,
 * so all cross terms of a block are two float32 GEMMs. A float32 GEMM over
 * 2 * R^2 terms carries rounding error, so a pair whose fast estimate lies
 * within a bound of the threshold is recomputed exactly in float64. Every
 * merge decision is therefore that of the exact float64 distance, whatever
 * GEMM ran and however many threads it used.
 *
 * Exact zeros use the usual conventions: 0 log 0 = 0, and D = +inf when one
 * map has zero mass where the other has positive mass (never merged). The
 * official code has no epsilon and gets NaN in both cases, which never merges
 * either; the difference is that a map with a zero still matches itself here
 * (the official code would give its anchor an empty, NaN proposal).
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Relative bound on the float32 GEMM error, times sum |terms|: ~1700 ulp.
 * A dot product of 2 * 4096 terms is far inside it (typical error ~ 50 ulp,
 * see the recheck counts in benchmarks/bench_core.py). */
#define GEMM_REL_ERROR 1e-4
#define ROW_BLOCK 256

typedef struct {
    double h;     /* sum x log x */
    double mass;  /* sum x */
    double maxlog; /* max |log x| over x > 0 */
    int has_zero;
} row_stats;

/* logx[j] = log x[j] (0 where x[j] == 0) and the row's statistics. */
static void log_row(const float *x, int n, float *logx, row_stats *st) {
    double h = 0.0, mass = 0.0;
    float maxlog = 0.0f;
    int has_zero = 0;
    for (int j = 0; j < n; j++) {
        if (x[j] > 0.0f) {
            const float l = logf(x[j]);
            logx[j] = l;
            h += (double)x[j] * l;
            mass += x[j];
            if (fabsf(l) > maxlog) maxlog = fabsf(l);
        } else {
            logx[j] = 0.0f;
            has_zero = 1;
        }
    }
    st->h = h, st->mass = mass, st->maxlog = maxlog, st->has_zero = has_zero;
}

static void log_rows(const float *X, int m, int n, float *logX, row_stats *st) {
#pragma omp parallel for schedule(static) num_threads(dseg_threads())
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
    dseg_clear_error();
    if (m < 0 || k < 0 || n < 1) return dseg_fail(DSEG_EINVAL, "sym_kl: bad sizes");
#pragma omp parallel for schedule(static) num_threads(dseg_threads())
    for (int i = 0; i < m; i++)
        for (int j = 0; j < k; j++)
            D[(size_t)i * k + j] = sym_kl_exact(P + (size_t)i * n, Q + (size_t)j * n, n);
    return DSEG_OK;
}

/* Is D(p, q) < tau? cross = p.log(q) + log(p).q from the float32 GEMM. */
static int below(float cross, const row_stats *sp, const row_stats *sq,
                 const float *p, const float *q, int n, double tau,
                 int64_t *rechecks) {
    if (!sp->has_zero && !sq->has_zero) {
        const double d = 0.5 * (sp->h + sq->h - (double)cross);
        const double bound = GEMM_REL_ERROR * (sp->mass * sq->maxlog + sq->mass * sp->maxlog +
                                               fabs(sp->h) + fabs(sq->h)) + 1e-12;
        if (fabs(d - tau) > bound) return d < tau;
    }
    ++*rechecks;
    return sym_kl_exact(p, q, n) < tau;
}

/* cross (m, n_rows) = X.log(Y)^T + log(X).Y^T */
static void cross_terms(const float *X, const float *logX, int m, const float *Y,
                        const float *logY, int n_rows, int n, float *cross) {
    dseg_gemm_nt(m, n_rows, n, X, n, logY, n, cross, n_rows, 0);
    dseg_gemm_nt(m, n_rows, n, logX, n, Y, n, cross, n_rows, 1);
}

static void mean_into(const double *acc, int64_t count, int n, float *out) {
    const double inv = 1.0 / (double)count;
    for (int j = 0; j < n; j++) out[j] = (float)(acc[j] * inv);
}

/* Iteration 0: each anchor averages every row of A closer than tau. */
static int anchor_step(const float *A, int N, const int *anchor_rows, int G,
                       double tau, float *proposals, dseg_merge_stats *stats) {
    const int B = N < ROW_BLOCK ? N : ROW_BLOCK;
    float *X = dseg_malloc(sizeof(float) * (size_t)G * N);
    float *logX = dseg_malloc(sizeof(float) * (size_t)G * N);
    float *logY = dseg_malloc(sizeof(float) * (size_t)B * N);
    float *cross = dseg_malloc(sizeof(float) * (size_t)G * B);
    double *acc = calloc((size_t)G * N, sizeof(double));
    int64_t *count = calloc((size_t)G, sizeof(int64_t));
    row_stats *sx = malloc(sizeof(row_stats) * G), *sy = malloc(sizeof(row_stats) * B);
    int rc = DSEG_OK;
    if (!X || !logX || !logY || !cross || !acc || !count || !sx || !sy) {
        rc = dseg_fail(DSEG_ENOMEM, "merge: out of memory");
        goto done;
    }
    for (int g = 0; g < G; g++)
        memcpy(X + (size_t)g * N, A + (size_t)anchor_rows[g] * N, sizeof(float) * N);
    log_rows(X, G, N, logX, sx);

    int64_t rechecks = 0;
    for (int p0 = 0; p0 < N; p0 += B) {
        const int nb = N - p0 < B ? N - p0 : B;
        const float *Y = A + (size_t)p0 * N;
        log_rows(Y, nb, N, logY, sy);
        cross_terms(X, logX, G, Y, logY, nb, N, cross);
        /* Each anchor's accumulator is owned by one thread and rows are added
         * in index order: deterministic for any thread count. */
#pragma omp parallel for schedule(dynamic, 4) reduction(+ : rechecks) num_threads(dseg_threads())
        for (int g = 0; g < G; g++) {
            const float *x = X + (size_t)g * N;
            double *a = acc + (size_t)g * N;
            for (int p = 0; p < nb; p++) {
                if (!below(cross[(size_t)g * B + p], sx + g, sy + p, x, Y + (size_t)p * N, N,
                           tau, &rechecks))
                    continue;
                const float *y = Y + (size_t)p * N;
                for (int j = 0; j < N; j++) a[j] += y[j];
                count[g]++;
            }
        }
    }
    for (int g = 0; g < G; g++) /* count >= 1: every anchor matches itself */
        mean_into(acc + (size_t)g * N, count[g], N, proposals + (size_t)g * N);
    if (stats) {
        stats->pairs += (int64_t)G * N;
        stats->exact_rechecks += rechecks;
    }
done:
    free(X), free(logX), free(logY), free(cross), free(acc), free(count), free(sx), free(sy);
    return rc;
}

/* Iterations >= 1: greedy, non-exclusive merging of K proposals, in place.
 * Returns the new count in *K. */
static int merge_step(float *P, int *K, int N, double tau, dseg_merge_stats *stats) {
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
    log_rows(P, k, N, logP, st);
    cross_terms(P, logP, k, P, logP, k, N, cross);
    int64_t rechecks = 0;
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : rechecks) num_threads(dseg_threads())
    for (int i = 0; i < k; i++)
        for (int j = 0; j < k; j++)
            close[(size_t)i * k + j] =
                (unsigned char)below(cross[(size_t)i * k + j], st + i, st + j, P + (size_t)i * N,
                                     P + (size_t)j * N, N, tau, &rechecks);

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
        n_out++;
    }
    memcpy(P, out, sizeof(float) * (size_t)n_out * N);
    *K = n_out;
    if (stats) {
        stats->pairs += (int64_t)k * k;
        stats->exact_rechecks += rechecks;
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

int dseg_merge(const float *A, int R, int grid, const double *thresholds, int n_iter,
               float *proposals, int *n_proposals, dseg_merge_stats *stats) {
    dseg_clear_error();
    if (!A || !thresholds || !proposals || !n_proposals)
        return dseg_fail(DSEG_EINVAL, "merge: NULL pointer argument");
    if (R < 1 || R > 215) /* R^4 must fit an int index */
        return dseg_fail(DSEG_EINVAL, "A: resolution %d out of range", R);
    if (n_iter < 1) return dseg_fail(DSEG_EINVAL, "kl_threshold: at least one iteration needed");
    for (int i = 0; i < n_iter; i++)
        if (!(thresholds[i] > 0.0) || isinf(thresholds[i]))
            return dseg_fail(DSEG_EINVAL, "kl_threshold[%d] must be finite and > 0, got %g", i,
                             thresholds[i]);
    int coords[256]; /* grid <= R <= 215 */
    int rc = dseg_anchor_coords(R, grid, coords);
    if (rc != DSEG_OK) return rc;
    if (stats) stats->pairs = stats->exact_rechecks = 0;

    const int N = R * R, G = grid * grid;
    int *anchor_rows = malloc(sizeof(int) * G);
    if (!anchor_rows) return dseg_fail(DSEG_ENOMEM, "merge: out of memory");
    for (int a = 0; a < grid; a++) /* row-major, first coordinate slowest */
        for (int b = 0; b < grid; b++) anchor_rows[a * grid + b] = coords[a] * R + coords[b];
    rc = anchor_step(A, N, anchor_rows, G, thresholds[0], proposals, stats);
    free(anchor_rows);
    int K = G;
    for (int it = 1; rc == DSEG_OK && it < n_iter; it++)
        rc = merge_step(proposals, &K, N, thresholds[it], stats);
    if (rc == DSEG_OK) *n_proposals = K;
    return rc;
}
