/* The core used from plain C, without Python: planted two-segment attention
 * -> aggregate -> merge -> nms and refine, plus error reporting. Prints "ok" on success. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "diffseg_core.h"

#define R 8
#define N (R * R)

static int fail(const char *what) {
    printf("FAIL %s: %s\n", what, dseg_last_error());
    return 1;
}

int main(void) {
    static float a8[N * N], a4[(N / 4) * (N / 4)], A[N * N], proposals[16 * N];
    const float *maps[2] = {a8, a4};
    const int res[2] = {8, 4};
    const float weights[2] = {2.0f / 3, 1.0f / 3};
    /* Left half of the image attends to the left half, right to right. */
    for (int s = 8, k = 0; k < 2; k++, s /= 2) {
        float *m = k == 0 ? a8 : a4;
        for (int q = 0; q < s * s; q++) {
            double total = 0;
            for (int p = 0; p < s * s; p++) {
                const int same = (q % s < s / 2) == (p % s < s / 2);
                m[q * s * s + p] = same ? 10.0f : 0.1f;
                total += m[q * s * s + p];
            }
            for (int p = 0; p < s * s; p++) m[q * s * s + p] /= (float)total;
        }
    }
    if (dseg_aggregate(2, res, maps, weights, R, A) != DSEG_OK) return fail("aggregate");
    const double tau[3] = {1.1, 1.1, 1.1};
    int K = 0;
    dseg_merge_stats stats;
    if (dseg_merge(A, R, 4, tau, 3, proposals, &K, &stats) != DSEG_OK) return fail("merge");
    int32_t labels[16 * 16], winners[16];
    int n_labels = 0;
    if (dseg_nms(proposals, K, R, R, 16, 16, labels, &n_labels, winners) != DSEG_OK)
        return fail("nms");
    if (K != 2 || n_labels != 2 || winners[0] != 0 || winners[1] != 1) {
        printf("FAIL expected 2 segments, got K=%d labels=%d\n", K, n_labels);
        return 1;
    }
    for (int y = 0; y < 16; y++)
        for (int x = 0; x < 16; x++)
            if (labels[y * 16 + x] != (x < 8 ? 0 : 1)) {
                printf("FAIL label at (%d, %d)\n", y, x);
                return 1;
            }
    /* k-means refinement keeps the two halves; proposals become their means. */
    float refined[2 * 8 * 8 * 8 * 8];
    int32_t rows[8 * 8];
    int kept = 0;
    dseg_refine_stats rstats;
    if (dseg_refine(A, R * R, R * R, proposals, K, 300, 1e-4, refined, &kept, rows, &rstats) !=
        DSEG_OK)
        return fail("refine");
    for (int i = 0; i < R * R; i++)
        if (rows[i] != (i % R < R / 2 ? 0 : 1)) {
            printf("FAIL refine label of row %d\n", i);
            return 1;
        }
    /* the proposals already are the means: the first shift is within tol */
    if (kept != 2 || rstats.iterations != 1 || rstats.strict_convergence) return fail("refine result");
    if (dseg_refine(A, R * R, R * R, proposals, K, 0, 1e-4, refined, &kept, NULL, NULL) !=
        DSEG_EINVAL)
        return fail("max_iter 0");
    /* Per-call settings: explicit threads and the built-in GEMM give the
     * same proposals; a thread count out of range is refused. */
    static float again[16 * N];
    int K2 = 0;
    const dseg_exec one = {1, NULL}, none = {0, NULL};
    if (dseg_merge_ex(A, R, 4, tau, 3, again, &K2, NULL, NULL, &one) != DSEG_OK) return fail("merge_ex");
    if (K2 != K || memcmp(again, proposals, sizeof(float) * (size_t)K * N) != 0) {
        printf("FAIL merge_ex differs from merge\n");
        return 1;
    }
    if (dseg_merge_ex(A, R, 4, tau, 3, again, &K2, NULL, NULL, &none) != DSEG_EINVAL)
        return fail("threads 0");
    printf("error message: %s\n", dseg_last_error());
    /* Errors come back as codes with a message, never an exit. */
    if (dseg_merge(A, R, 0, tau, 3, proposals, &K, NULL) != DSEG_EINVAL) return fail("grid 0");
    printf("error message: %s\n", dseg_last_error());
    /* A NaN in A is refused, named by its flat index; A is left as it was. */
    const float sound = A[5 * N + 7];
    A[5 * N + 7] = NAN;
    if (dseg_merge(A, R, 4, tau, 3, proposals, &K, NULL) != DSEG_EINVAL) return fail("NaN in A");
    if (!strstr(dseg_last_error(), "flat index 327)")) return fail("NaN's index");
    printf("error message: %s\n", dseg_last_error());
    A[5 * N + 7] = sound;
    const int bad_res[1] = {3};
    if (dseg_aggregate(1, bad_res, maps, weights, R, A) != DSEG_EINVAL) return fail("res 3");
    printf("error message: %s\n", dseg_last_error());
    /* Rectangular grids: a 4 x 8 map and its 2 x 4 halving, the same
     * left/right halves; the square entry points are the h = w case. */
    static float r48[32 * 32], r24[8 * 8], Ar[32 * 32], Ar_sq[N * N], rprop[8 * 32];
    for (int k = 0; k < 2; k++) {
        const int h = k ? 2 : 4, w = k ? 4 : 8, n = h * w;
        float *m = k ? r24 : r48;
        for (int q = 0; q < n; q++) {
            double total = 0;
            for (int p = 0; p < n; p++) {
                m[q * n + p] = ((q % w < w / 2) == (p % w < w / 2)) ? 10.0f : 0.1f;
                total += m[q * n + p];
            }
            for (int p = 0; p < n; p++) m[q * n + p] /= (float)total;
        }
    }
    const int hs[2] = {4, 2}, ws[2] = {8, 4};
    const float *rmaps[2] = {r48, r24};
    if (dseg_aggregate_hw(2, hs, ws, rmaps, weights, 4, 8, Ar, &one) != DSEG_OK)
        return fail("aggregate_hw");
    if (dseg_aggregate_hw(2, res, res, maps, weights, R, R, Ar_sq, &one) != DSEG_OK ||
        memcmp(Ar_sq, A, sizeof(float) * N * N) != 0) {
        printf("FAIL aggregate_hw (square) differs from aggregate\n");
        return 1;
    }
    int gh = 0, gw = 0;
    if (dseg_anchor_counts(64, 96, 16, &gh, &gw) != DSEG_OK || gh != 16 || gw != 24)
        return fail("anchor_counts 64x96");
    if (dseg_anchor_counts(96, 64, 16, &gh, &gw) != DSEG_OK || gh != 24 || gw != 16)
        return fail("anchor_counts 96x64");
    if (dseg_anchor_counts(4, 8, 2, &gh, &gw) != DSEG_OK || gh != 2 || gw != 4)
        return fail("anchor_counts 4x8");
    int seeds_r[8], Kr = 0;
    if (dseg_merge_hw(Ar, 4, 8, 2, tau, 3, rprop, &Kr, seeds_r, NULL, &one) != DSEG_OK)
        return fail("merge_hw");
    /* anchors: rows {0, 3} x columns {0, 2, 4, 6}; the first left and the
     * first right anchor seed the two segments */
    if (Kr != 2 || seeds_r[0] != 0 || seeds_r[1] != 4) {
        printf("FAIL merge_hw: K=%d seeds %d %d\n", Kr, seeds_r[0], seeds_r[1]);
        return 1;
    }
    int32_t rlabels[6 * 10];
    if (dseg_nms(rprop, Kr, 4, 8, 6, 10, rlabels, &n_labels, NULL) != DSEG_OK) return fail("nms 4x8");
    for (int i = 0; i < 60; i++)
        if (rlabels[i] != (i % 10 < 5 ? 0 : 1)) {
            printf("FAIL rectangular label at %d\n", i);
            return 1;
        }
    if (dseg_merge_hw(Ar, 4, 8, 5, tau, 3, rprop, &Kr, NULL, NULL, &one) != DSEG_EINVAL)
        return fail("grid 5 on 4x8");
    printf("error message: %s\n", dseg_last_error());
    const int h_bad[1] = {3};
    if (dseg_aggregate_hw(1, h_bad, ws, rmaps, weights, 4, 8, Ar, &one) != DSEG_EINVAL)
        return fail("3x8 map of a 4x8 call");
    printf("error message: %s\n", dseg_last_error());
    /* a block freed with its size is kept for later calls until released */
    dseg_release_memory();
    void *block = dseg_alloc((size_t)1 << 20);
    if (!block) return fail("alloc");
    memset(block, 1, (size_t)1 << 20);
    dseg_free_sized(block, (size_t)1 << 20);
#if defined(__SANITIZE_ADDRESS__)
    const size_t expect_kept = 0; /* nothing is kept under AddressSanitizer */
#else
    const size_t expect_kept = (size_t)1 << 20;
#endif
    if (dseg_release_memory() != expect_kept) return fail("release_memory after one kept block");
    if (dseg_release_memory() != 0) return fail("release_memory twice");
    printf("ok (openmp=%d, threads=%d, pairs=%lld)\n", dseg_has_openmp(), dseg_get_num_threads(),
           (long long)stats.pairs);
    return 0;
}
