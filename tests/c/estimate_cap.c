/* merge.c's estimate_row decides most pairs against a cap on their bound
 * (the row statistics of p replaced by their largest values) and only the
 * rest against their own bound. The decisions must be those of the one-pass
 * tier that gives every pair its own bound (estimate_row_own below, the
 * previous estimate_row): checked on random statistics whose estimates lie
 * near tau, with zeros, has_zero rows, positive cross terms, huge and NaN
 * statistics mixed in. Built as merge.c is (setup.py flags); includes it for
 * its static functions. Prints "ok: ..." with how many pairs each pass
 * decided on success. */
#include "../../csrc/core/merge.c"

#include <stdio.h>

static int64_t estimate_row_own(const float *cross, const row_stats *sg, const stat_columns *sa,
                                int n, double tau, estimate_error err, unsigned char *m,
                                int64_t *open) {
    const double hxg = fabs(sg->h) + 2.0 * sg->mass * sg->maxpos, habsg = fabs(sg->h);
    int64_t candidates = 0, undecided = 0;
    for (int p = 0; p < n; p++) {
        const double c = cross[p];
        const double d = 0.5 * (sg->h + sa->h[p] - c);
        const double bound = bound_from_terms(
            sg->mass * sa->maxlog[p] + sa->mass[p] * sg->maxlog,
            sg->mass * sa->maxpos[p] + sa->mass[p] * sg->maxpos, hxg + sa->hx[p],
            habsg + fabs(sa->h[p]), c, err);
        const int sure = !(sg->has_zero | sa->has_zero[p]) && fabs(d) <= DBL_MAX &&
                         bound <= DBL_MAX && fabs(d - tau) > bound;
        int r = sure ? d < tau : 2;
        r = sa->zeros[p] != sg->zeros ? 0 : r;
        r = m[p] ? r : 0;
        candidates += m[p] != 0;
        undecided += r == 2;
        m[p] = (unsigned char)r;
    }
    *open = undecided;
    return candidates;
}

static uint64_t state = 0x9E3779B97F4A7C15ull;
static double uniform(void) { /* [0, 1) */
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return (double)(state >> 11) * 0x1.0p-53;
}

/* Statistics like a probability row's (every x <= 1: maxpos 0), or rarer
 * ones: 1 some x > 1, 2 zeros, 3 huge mass, 4 NaN, 5 infinite, 6 many x > 1
 * (h > 0, so that cross terms near tau are positive). */
static row_stats random_stats(int kind) {
    row_stats s = {0};
    s.mass = kind == 3 ? 1e30 * uniform() : 0.5 + uniform();
    s.maxlog = 5.0 + 25.0 * uniform();
    s.maxpos = kind == 1 ? 3.0 * uniform() : 0.0;
    s.h = -(1.0 + 8.0 * uniform()) + (kind == 1 ? 4.0 * uniform() : 0.0);
    s.has_zero = kind == 2;
    s.zeros = kind == 2 ? 7 : 0;
    if (kind == 4) s.maxlog = NAN;
    if (kind == 5) s.h = INFINITY;
    if (kind == 6) s.maxpos = 1.0 + 3.0 * uniform(), s.h = 10.0 + 10.0 * uniform();
    return s;
}

int main(void) {
    enum { N = 4096, ROWS = 300 };
    row_stats *st = malloc(sizeof(row_stats) * N);
    float *cross = malloc(sizeof(float) * N);
    unsigned char *m1 = malloc(N), *m2 = malloc(N);
    if (!st || !cross || !m1 || !m2) return 1;
    const dseg_exec ex = dseg_default_exec();
    int64_t pairs = 0, left = 0, by_cap = 0, by_own = 0;
    for (int trial = 0; trial < ROWS; trial++) {
        /* some trials mix in rarer rows: x > 1, zeros, huge mass, NaN, inf */
        const int mix = trial % 7;
        for (int p = 0; p < N; p++) st[p] = random_stats(uniform() < 0.05 ? mix : 0);
        stat_columns sc = {0};
        if (!stat_columns_make(st, N, &sc)) return 1;
        const row_stats sg = random_stats(trial % 5 == 0 ? 1 : 0);
        const estimate_error err = estimate_rel_error(&ex, N);
        const double tau = 0.2 + 2.0 * uniform();
        for (int p = 0; p < N; p++) {
            /* an estimate d at tau plus a spread from 1e-9 to 1 (both signs) */
            const double spread = pow(10.0, -9.0 + 9.0 * uniform()) * (uniform() < 0.5 ? -1 : 1);
            const double c = sg.h + st[p].h - 2.0 * (tau + spread);
            cross[p] = (float)c;
            m1[p] = m2[p] = uniform() < 0.9;
        }
        int64_t open1, open2;
        const int64_t c1 = estimate_row(cross, &sg, &sc, N, tau, err, m1, &open1);
        const int64_t c2 = estimate_row_own(cross, &sg, &sc, N, tau, err, m2, &open2);
        if (c1 != c2 || open1 != open2 || memcmp(m1, m2, N)) {
            for (int p = 0; p < N; p++)
                if (m1[p] != m2[p]) {
                    printf("FAIL trial %d pair %d: capped %d, own bound %d\n", trial, p, m1[p], m2[p]);
                    break;
                }
            printf("FAIL trial %d: candidates %lld / %lld, open %lld / %lld\n", trial,
                   (long long)c1, (long long)c2, (long long)open1, (long long)open2);
            return 1;
        }
        /* how many each pass decided: both must be exercised */
        const double hxg = fabs(sg.h) + 2.0 * sg.mass * sg.maxpos;
        const double cap_a = sg.mass * sc.top_maxlog + sc.top_mass * sg.maxlog;
        const double cap_e = sg.mass * sc.top_maxpos + sc.top_mass * sg.maxpos;
        for (int p = 0; p < N; p++) {
            left += m1[p] == 2;
            const double c = cross[p], d = 0.5 * (sg.h + sc.h[p] - c);
            const double cap = bound_from_terms(cap_a, cap_e, hxg + sc.top_hx,
                                                fabs(sg.h) + sc.top_habs, c, err);
            if (m1[p] == 2 || !(m2[p] < 2) || !(sg.zeros == sc.zeros[p])) continue;
            if (c <= 0.0 && fabs(d - tau) > cap) by_cap++;
            else by_own++;
        }
        pairs += N;
        stat_columns_free(&sc);
    }
    if (by_cap == 0 || by_own == 0) {
        printf("FAIL: decided by the cap %lld, by their own bound %lld\n", (long long)by_cap,
               (long long)by_own);
        return 1;
    }
    printf("ok: %lld pairs; decided by the cap %lld, by their own bound %lld; left open %lld\n",
           (long long)pairs, (long long)by_cap, (long long)by_own, (long long)left);
    free(st), free(cross), free(m1), free(m2);
    return 0;
}
