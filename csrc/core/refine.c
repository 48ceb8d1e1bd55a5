/*
 * k-means refinement (the official code's refine=True): scikit-learn's
 * KMeans(init=proposals, n_init=1), i.e. Lloyd's algorithm with
 * scikit-learn's stopping rules and empty-cluster relocation, on the rows of A.
 *
 * Precision. The official code runs scikit-learn on float64 attention. Here
 * centres are kept in float64; distances are estimated with the float32 GEMM
 * (the squared norm of the row is common to all centres, so only
 * |c|^2 - 2 a.c is compared), and a row whose best and second-best estimates
 * are within the GEMM's error bound is decided again in float64. Labels are
 * therefore those of float64 arithmetic, whatever the GEMM backend, ISA or
 * thread count. Sums run in a fixed order (each thread owns whole columns,
 * rows added in index order), so results are bit-identical for any thread
 * count.
 *
 * Cost. Hamerly's bounds (widened for rounding) skip the rows whose label
 * cannot change, and the cluster sums are updated by the rows that changed,
 * so iterations after the first touch little of A.
 */
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

enum {
    CHUNK = 64,         /* rows per E-step task: a (CHUNK, d) slab of A stays in L2 */
    SERIAL_CHUNK = 512, /* rows per GEMM call on one thread: the built-in GEMM wakes
                           its own team at each call (nested regions are inactive
                           only inside a team of several threads) */
};

/* Threads for a region of about `work` operations: one when too little to
 * repay waking a team (the threshold of dseg_threads_for, which reads the
 * process-wide count rather than this call's). */
static int team(int threads, double work) { return work < 262144.0 ? 1 : threads; }

typedef struct {
    const float *A;
    int n, d, K, threads;
    dseg_exec gemm_ex; /* this call's GEMM backend on the calling thread */
    double rel;        /* relative error bound of a float32 GEMM dot product */
    const double *c;   /* (K, d) centres */
    const float *c32;  /* (K, d) centres rounded for the GEMM */
    double *cnorm;     /* (K) |c|^2 */
    float *G;          /* (n, K) GEMM results */
    int32_t *labels;   /* (n) in/out */
    double *row_sq;    /* (n) |a|^2 of each row, filled by the first E-step */
    double *upper;     /* (n) bound above the distance of each row to its centre */
    double *lower;     /* (n) bound below its distance to any other centre */
    const double *delta; /* (K) how far each centre moved since the last E-step */
    int bounded;       /* upper/lower/delta hold (not in the first E-step) */
    int *todo;         /* (n) rows to label */
    int64_t kept;      /* rows the bounds kept, over all E-steps */
    float *gather;     /* rows to label, made contiguous: (threads, CHUNK, d) or
                          (SERIAL_CHUNK, d) */
    int64_t rechecks;
} estep;

/* |c|^2 - 2 a.c in float64 (the row's own |a|^2 left out). */
static double exact_score(const float *a, const double *c, double cnorm, int d) {
    double dot = 0.0;
    for (int f = 0; f < d; f++) dot += (double)a[f] * c[f];
    return cnorm - 2.0 * dot;
}

/* Bound on the error of the estimate |c|^2 - 2 g of a score: for
 * non-negative data the GEMM's dot product g is within rel * g of a.c (this
 * covers rounding the centre to float32 too), plus what underflow can lose
 * (under FLT_MIN per product). */
static double err(const estep *e, float g) {
    return 2.0 * (e->rel * g + (double)e->d * FLT_MIN);
}

/* Rows rows[0..m) (A rows X, leading dimension d) from their GEMM results
 * G (m, K): labels, distance bounds (and squared norms in the first E-step).
 * Returns how many were decided in float64. */
static int64_t label_rows(const estep *e, const int *rows, int m, const float *X,
                          const float *G) {
    const int d = e->d, K = e->K;
    int64_t rechecks = 0;
    for (int r = 0; r < m; r++) {
        const int i = rows[r];
        const float *a = X + (size_t)r * d, *g = G + (size_t)r * K;
        if (!e->bounded) {
            double sq = 0.0;
            for (int f = 0; f < d; f++) sq += (double)a[f] * a[f];
            e->row_sq[i] = sq;
        }
        /* Rows whose interval [score - err, score + err] overlaps the best
         * one's are decided in float64. */
        int best = 0;
        double best_hi = INFINITY;
        for (int j = 0; j < K; j++) {
            const double hi = e->cnorm[j] - 2.0 * g[j] + err(e, g[j]);
            if (hi < best_hi) {
                best_hi = hi;
                best = j;
            }
        }
        int rivals = 0;
        for (int j = 0; j < K; j++)
            rivals += j != best && e->cnorm[j] - 2.0 * g[j] - err(e, g[j]) <= best_hi;
        if (rivals) {
            double best_s = INFINITY;
            best = 0;
            for (int j = 0; j < K; j++) {
                if (e->cnorm[j] - 2.0 * g[j] - err(e, g[j]) > best_hi) continue;
                const double s = exact_score(a, e->c + (size_t)j * d, e->cnorm[j], d);
                if (s < best_s) {
                    best_s = s;
                    best = j;
                }
            }
            rechecks++;
        }
        e->labels[i] = best;
        /* Distances |a - c|^2 = |a|^2 + score, widened by the score's error
         * bound and the float64 rounding of the sum. */
        double up = 0.0, low = INFINITY;
        for (int j = 0; j < K; j++) {
            const double s = e->row_sq[i] + e->cnorm[j] - 2.0 * g[j];
            const double margin = err(e, g[j]) + 1e-12 * (e->row_sq[i] + e->cnorm[j]);
            if (j == best) up = s + margin;
            else if (s - margin < low) low = s - margin;
        }
        e->upper[i] = sqrt(up > 0.0 ? up : 0.0) * (1 + 1e-12);
        e->lower[i] = sqrt(low > 0.0 ? low : 0.0) * (1 - 1e-12);
    }
    return rechecks;
}

/* Label every row: the centre with the smallest squared distance, the first
 * on ties (as scikit-learn). A row whose distance to its centre, plus how
 * far that centre moved, stays below its distance to any other centre, minus
 * how far those moved, keeps its label without being read (Hamerly's bounds:
 * Lloyd's result, with less work once few rows are near a border). */
static void assign(estep *e) {
    const int n = e->n, d = e->d, K = e->K;
    for (int j = 0; j < K; j++) {
        double s = 0.0;
        const double *c = e->c + (size_t)j * d;
        for (int f = 0; f < d; f++) s += c[f] * c[f];
        e->cnorm[j] = s;
    }
    int m = 0;
    if (e->bounded) {
        int far1 = 0; /* the two largest moves */
        for (int j = 1; j < K; j++) far1 = e->delta[j] > e->delta[far1] ? j : far1;
        double far2 = 0.0;
        for (int j = 0; j < K; j++) far2 = j != far1 && e->delta[j] > far2 ? e->delta[j] : far2;
        for (int i = 0; i < n; i++) {
            const int l = e->labels[i];
            e->upper[i] += e->delta[l];
            e->lower[i] -= l == far1 ? far2 : e->delta[far1];
            if (!(e->upper[i] < e->lower[i])) e->todo[m++] = i;
        }
        e->kept += n - m;
    } else {
        for (int i = 0; i < n; i++) e->todo[m++] = i;
    }
    const int nt = team(e->threads, (double)m * K * d), chunk = nt > 1 ? CHUNK : SERIAL_CHUNK;
    const int chunks = (m + chunk - 1) / chunk;
    int64_t rechecks = 0;
    /* The GEMM of each task runs on its calling thread (nested regions are
     * inactive), so the threads split the rows, not the few centres. */
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : rechecks) num_threads(nt)
    for (int ch = 0; ch < chunks; ch++) {
        const int t0 = ch * chunk, rows = m - t0 < chunk ? m - t0 : chunk;
        const int *idx = e->todo + t0;
        const float *X = e->A + (size_t)idx[0] * d;
        if (idx[rows - 1] - idx[0] != rows - 1) { /* not consecutive rows: gather */
#ifdef _OPENMP
            float *buf = e->gather + (size_t)omp_get_thread_num() * chunk * d;
#else
            float *buf = e->gather;
#endif
            for (int r = 0; r < rows; r++)
                memcpy(buf + (size_t)r * d, e->A + (size_t)idx[r] * d, sizeof(float) * d);
            X = buf;
        }
        float *G = e->G + (size_t)t0 * K;
        dseg_gemm_nt(&e->gemm_ex, rows, K, d, X, d, e->c32, d, G, K, 0, NULL);
        rechecks += label_rows(e, idx, rows, X, G);
    }
    e->rechecks += rechecks;
    e->bounded = 1;
}

/* Column ranges for `parts` tasks that each read whole row segments (long
 * contiguous runs; a sum over rows keeps its row order however the columns
 * are split, so results do not depend on the split). */
static int column_width(int d, int parts) { return ((d + parts - 1) / parts + 15) / 16 * 16; }

/*
 * Keep sums[j] = the sum of the rows whose contribution sits in cluster j
 * (owner; -1: none yet) and counts[j] their number: move every row whose
 * label differs from its owner, in row order. Few rows change after the
 * first iterations, so this costs far less than summing every row again; the
 * order of the additions depends only on the labels, not on the threads.
 * moved: n ints of work space.
 */
static void move_rows(const float *A, int n, int d, const int32_t *labels, int32_t *owner,
                      int threads, double *sums, int64_t *counts, int *moved) {
    int m = 0;
    for (int i = 0; i < n; i++)
        if (labels[i] != owner[i]) moved[m++] = i;
    const int parts = team(threads, 2.0 * m * d), width = column_width(d, parts);
#pragma omp parallel for schedule(static, 1) num_threads(parts)
    for (int b = 0; b < parts; b++) {
        const int f0 = b * width, len = d - f0 < width ? d - f0 : width;
        for (int t = 0; t < m && len > 0; t++) {
            const int i = moved[t];
            const float *a = A + (size_t)i * d + f0;
            double *dst = sums + (size_t)labels[i] * d + f0;
            if (owner[i] >= 0) {
                double *src = sums + (size_t)owner[i] * d + f0;
                for (int f = 0; f < len; f++) src[f] -= a[f];
            }
            for (int f = 0; f < len; f++) dst[f] += a[f];
        }
    }
    for (int t = 0; t < m; t++) {
        const int i = moved[t];
        if (owner[i] >= 0) counts[owner[i]]--;
        counts[labels[i]]++;
        owner[i] = labels[i];
    }
}

/* Squared distance of every row to the centre of its label (float64). */
static void distances_to_centres(const float *A, int n, int d, const double *c,
                                 const int32_t *labels, int threads, double *out) {
    (void)threads; /* read only by the OpenMP clause */
#pragma omp parallel for schedule(static) num_threads(team(threads, (double)n * d))
    for (int i = 0; i < n; i++) {
        const float *a = A + (size_t)i * d;
        const double *ci = c + (size_t)labels[i] * d;
        double s = 0.0;
        for (int f = 0; f < d; f++) {
            const double t = a[f] - ci[f];
            s += t * t;
        }
        out[i] = s;
    }
}

/*
 * scikit-learn's rule for clusters left empty by an E-step
 * (_relocate_empty_clusters_dense): unless every row sits exactly on its
 * centre, the e empty clusters (in index order) take the e rows farthest from
 * their centres (farthest first); each such row moves its sum and count from
 * its cluster to the empty one. scikit-learn orders those rows with
 * np.argpartition, which leaves ties and the order among them unspecified;
 * here: decreasing distance, lower row index first on ties.
 */
static int relocate_empty(const float *A, int n, int d, int K, const double *c,
                          const int32_t *labels, int32_t *owner, int threads, double *sums,
                          int64_t *counts) {
    int empty = 0;
    for (int j = 0; j < K; j++) empty += counts[j] == 0;
    if (!empty) return 0;
    double *dist = malloc(sizeof(double) * (size_t)n);
    int *far = malloc(sizeof(int) * (size_t)empty);
    if (!dist || !far) {
        free(dist);
        free(far);
        return -1;
    }
    distances_to_centres(A, n, d, c, labels, threads, dist);
    double top = 0.0;
    for (int i = 0; i < n; i++) top = dist[i] > top ? dist[i] : top;
    int moved = 0;
    if (top > 0.0) {
        /* e passes of a max-scan: e <= K, and this path is rare. */
        for (int t = 0; t < empty; t++) {
            int pick = -1;
            for (int i = 0; i < n; i++) {
                int taken = 0;
                for (int u = 0; u < t && !taken; u++) taken = far[u] == i;
                if (!taken && (pick < 0 || dist[i] > dist[pick])) pick = i;
            }
            far[t] = pick;
        }
        int t = 0;
        for (int j = 0; j < K; j++) {
            if (counts[j] != 0 || t >= empty) continue;
            const int i = far[t++], from = labels[i];
            const float *a = A + (size_t)i * d;
            double *src = sums + (size_t)from * d, *dst = sums + (size_t)j * d;
            for (int f = 0; f < d; f++) {
                src[f] -= a[f];
                dst[f] = a[f];
            }
            counts[j] = 1;
            counts[from]--;
            owner[i] = j;
            moved++;
        }
    }
    free(dist);
    free(far);
    return moved;
}

/* centres = sums / counts. A cluster still empty (every row on its centre, or
 * its last row relocated) takes the mean of the largest cluster, which is
 * what scikit-learn's _average_centers means to do (it copies that cluster's
 * row whether or not it is already divided, depending on the index order). */
static void average(const double *sums, const int64_t *counts, int K, int d, double *c) {
    int largest = 0;
    for (int j = 1; j < K; j++) largest = counts[j] > counts[largest] ? j : largest;
    for (int j = 0; j < K; j++) {
        const int src = counts[j] > 0 ? j : largest;
        const double inv = 1.0 / (double)counts[src];
        for (int f = 0; f < d; f++) c[(size_t)j * d + f] = sums[(size_t)src * d + f] * inv;
    }
}

/* Mean over columns of the (population) column variances of A, from the
 * first E-step's by-products: (sum of squares / n - sum of squared column
 * means) / d in float64, the column sums taken from the cluster sums. The
 * cancellation costs a few of 16 digits; this only sets the tolerance.
 * col: d doubles of work space. */
static double mean_column_variance(const double *sums, int K, int n, int d,
                                   const double *row_sq, double *col) {
    double sq = 0.0, mean_sq = 0.0;
    for (int i = 0; i < n; i++) sq += row_sq[i];
    memset(col, 0, sizeof(double) * d);
    for (int j = 0; j < K; j++)
        for (int f = 0; f < d; f++) col[f] += sums[(size_t)j * d + f];
    for (int f = 0; f < d; f++) mean_sq += (col[f] / n) * (col[f] / n);
    const double v = (sq / n - mean_sq) / d;
    return v > 0.0 ? v : 0.0;
}

int dseg_refine(const float *A, int n, int d, const float *init, int K, int max_iter,
                double tol, float *out, int *n_out, int32_t *labels, dseg_refine_stats *stats) {
    const dseg_exec ex = dseg_default_exec();
    return dseg_refine_ex(A, n, d, init, K, max_iter, tol, out, n_out, labels, stats, &ex);
}

int dseg_refine_ex(const float *A, int n, int d, const float *init, int K, int max_iter,
                   double tol, float *out, int *n_out, int32_t *labels, dseg_refine_stats *stats,
                   const dseg_exec *exec) {
    dseg_clear_error();
    if (dseg_check_exec(exec) != DSEG_OK) return DSEG_EINVAL;
    const int threads = exec->threads;
    if (!A || !init || !out || !n_out) return dseg_fail(DSEG_EINVAL, "refine: NULL buffer");
    if (n < 1 || d < 1) return dseg_fail(DSEG_EINVAL, "A must have at least one row and column");
    if (K < 1 || K > n)
        return dseg_fail(DSEG_EINVAL, "proposals: need 1 to %d (rows of A) proposals, got %d", n, K);
    if (max_iter < 1) return dseg_fail(DSEG_EINVAL, "max_iter must be >= 1, got %d", max_iter);
    if (!(tol >= 0.0 && tol <= 1e300)) return dseg_fail(DSEG_EINVAL, "tol must be finite and >= 0");

    const size_t kd = (size_t)K * d;
    double *c = malloc(sizeof(double) * kd), *c_new = malloc(sizeof(double) * kd);
    double *sums = malloc(sizeof(double) * kd), *cnorm = malloc(sizeof(double) * K);
    double *col = malloc(sizeof(double) * d), *row_sq = malloc(sizeof(double) * n);
    float *c32 = malloc(sizeof(float) * kd), *G = malloc(sizeof(float) * (size_t)n * K);
    int64_t *counts = malloc(sizeof(int64_t) * K);
    int32_t *lab = malloc(sizeof(int32_t) * n), *lab_old = malloc(sizeof(int32_t) * n);
    int32_t *owner = malloc(sizeof(int32_t) * n);
    int *work = malloc(sizeof(int) * n), *todo = malloc(sizeof(int) * n);
    double *upper = malloc(sizeof(double) * n), *lower = malloc(sizeof(double) * n);
    double *delta = malloc(sizeof(double) * K);
    const int chunks = (n + CHUNK - 1) / CHUNK, slots = threads < chunks ? threads : chunks;
    const int gather_rows = slots * CHUNK > SERIAL_CHUNK ? slots * CHUNK : SERIAL_CHUNK;
    float *gather = malloc(sizeof(float) * gather_rows * (size_t)d);
    int rc = DSEG_OK;
    if (!c || !c_new || !sums || !cnorm || !col || !row_sq || !c32 || !G || !counts || !lab ||
        !lab_old || !owner || !work || !todo || !upper || !lower || !delta || !gather) {
        rc = dseg_fail(DSEG_ENOMEM, "refine: out of memory");
        goto done;
    }

    for (size_t t = 0; t < kd; t++) c[t] = init[t];
    estep e = {A, n, d, K, slots, {1, exec->sgemm}, dseg_gemm_rel_error(exec, d), c, c32, cnorm, G, lab, row_sq,
               upper, lower, delta, 0, todo, 0, gather, 0};
    double tol_abs = 0.0;
    for (int i = 0; i < n; i++) lab_old[i] = owner[i] = -1;
    memset(sums, 0, sizeof(double) * kd);
    memset(counts, 0, sizeof(int64_t) * K);
    int iter = 0, strict = 0, relocated = 0;
    for (iter = 0; iter < max_iter; iter++) {
        for (size_t t = 0; t < kd; t++) c32[t] = (float)c[t];
        e.c = c;
        assign(&e);
        move_rows(A, n, d, lab, owner, threads, sums, counts, work);
        if (iter == 0) {
            /* scikit-learn's tolerance: tol x the mean column variance of A */
            tol_abs = tol * mean_column_variance(sums, K, n, d, row_sq, col);
        }
        const int moved = relocate_empty(A, n, d, K, c, lab, owner, threads, sums, counts);
        if (moved < 0) {
            rc = dseg_fail(DSEG_ENOMEM, "refine: out of memory");
            goto done;
        }
        relocated += moved;
        average(sums, counts, K, d, c_new);
        double shift = 0.0;
        for (int j = 0; j < K; j++) {
            double s2 = 0.0;
            for (size_t t = (size_t)j * d; t < (size_t)(j + 1) * d; t++)
                s2 += (c_new[t] - c[t]) * (c_new[t] - c[t]);
            shift += s2;
            delta[j] = sqrt(s2) * (1 + 1e-12); /* widened for rounding */
        }
        double *swap = c;
        c = c_new;
        c_new = swap;
        /* scikit-learn: unchanged labels first ("strict convergence"), then
         * the squared centre shift against the tolerance. */
        if (memcmp(lab, lab_old, sizeof(int32_t) * n) == 0) {
            strict = 1;
            break;
        }
        if (shift <= tol_abs) break;
        memcpy(lab_old, lab, sizeof(int32_t) * n);
    }
    const int iterations = iter < max_iter ? iter + 1 : max_iter;
    if (!strict) { /* final E-step: labels that match the final centres */
        for (size_t t = 0; t < kd; t++) c32[t] = (float)c[t];
        e.c = c;
        assign(&e);
    }

    /* Each proposal becomes the mean of its rows (the official code's loop);
     * clusters the final labels leave empty are dropped. */
    move_rows(A, n, d, lab, owner, threads, sums, counts, work);
    int kept = 0;
    for (int j = 0; j < K; j++) {
        if (!counts[j]) continue;
        const double inv = 1.0 / (double)counts[j];
        for (int f = 0; f < d; f++)
            out[(size_t)kept * d + f] = (float)(sums[(size_t)j * d + f] * inv);
        kept++;
    }
    *n_out = kept;
    if (labels) memcpy(labels, lab, sizeof(int32_t) * n);
    if (stats) {
        stats->iterations = iterations;
        stats->strict_convergence = strict;
        stats->relocated = relocated;
        stats->rechecks = e.rechecks;
        stats->kept = e.kept;
    }

done:
    free(c);
    free(c_new);
    free(sums);
    free(cnorm);
    free(col);
    free(row_sq);
    free(c32);
    free(G);
    free(counts);
    free(lab);
    free(lab_old);
    free(owner);
    free(work);
    free(todo);
    free(upper);
    free(lower);
    free(delta);
    free(gather);
    return rc;
}
