/*
 * The float32 logs of the merge's first two tiers. Built with FMA
 * contraction allowed (setup.py), like gemm.c: these logs only feed estimates
 * whose error merge.c bounds with DSEG_LOG_REL_ERROR, so neither contraction
 * nor the clone chosen at run time changes any decision.
 */
#include <float.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

#include "internal.h"

/* Natural log of a positive finite float (normal or subnormal), branch-free so
 * that loops over it vectorise. Cephes' logf polynomial, evaluated by Estrin's
 * scheme (a short dependency chain: the loop is latency-bound with Horner's).
 * The mantissa is taken in [sqrt(1/2), sqrt(2)) directly from its bits. The
 * two choices (subnormal, low mantissa) are integer masks, not selects on
 * floats: with selects GCC carried both paths through the bit arithmetic
 * (60 instructions per 8 logs instead of 48; the same values). */
static inline float log_positive(float x) {
    const int32_t subnormal = -(int32_t)(x < FLT_MIN);   /* all ones or 0 */
    const int32_t scale_bits = 0x3f800000 + (subnormal & (23 << 23)); /* 1 or 2^23 */
    float scale;
    memcpy(&scale, &scale_bits, sizeof scale);
    const float xs = x * scale;
    int32_t bits;
    memcpy(&bits, &xs, sizeof bits);
    const int32_t mantissa = bits & 0x007fffff;
    const int32_t low = -(int32_t)(mantissa < 0x003504f3); /* 1.mantissa < sqrt(2) */
    const int32_t e = (bits >> 23) - 126 - (subnormal & 23) + low;
    bits = mantissa | (0x3f000000 + (low & 0x00800000)); /* 1.mantissa, or half: in [sqrt(1/2), sqrt(2)) */
    float m;
    memcpy(&m, &bits, sizeof m);
    m -= 1.0f;
    const float z = m * m, z2 = z * z;
    const float p01 = 3.3333331174e-1f + -2.4999993993e-1f * m;
    const float p23 = 2.0000714765e-1f + -1.6668057665e-1f * m;
    const float p45 = 1.4249322787e-1f + -1.2420140846e-1f * m;
    const float p67 = 1.1676998740e-1f + -1.1514610310e-1f * m;
    float y = (p01 + z * p23) + z2 * ((p45 + z * p67) + z2 * 7.0376836292e-2f);
    y = y * m * z;
    const float fe = (float)e;
    y += -2.12194440e-4f * fe;
    y += -0.5f * z;
    return (m + y) + 0.693359375f * fe;
}

/* logx[j] = log x[j] (0 where x[j] == 0). */
static inline __attribute__((always_inline)) void log_entries(const float *x, int n, float *logx) {
#pragma omp simd
    for (int j = 0; j < n; j++) {
        const float l = log_positive(x[j] > 0.0f ? x[j] : 1.0f);
        logx[j] = x[j] > 0.0f ? l : 0.0f;
    }
}

DSEG_CLONES
void dseg_log_only(const float *x, int n, float *logx) { log_entries(x, n, logx); }

DSEG_CLONES
void dseg_log_span(const float *x, int n, int j0, float *logx, dseg_span_stats *st) {
    log_entries(x, n, logx);
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
    /* Two maps whose zero sets differ are at D = +inf (one has mass where
     * the other has none). Different hashes prove that; equal hashes prove
     * nothing (a collision only costs a recheck). A sum: spans add up. */
    uint64_t zeros = 0;
    if (!(minx > 0.0f))
        for (int j = 0; j < n; j++)
            if (x[j] == 0.0f) {
                const uint64_t k = (uint64_t)(j0 + j + 1) * 0x9E3779B97F4A7C15ull;
                zeros += k ^ (k >> 29);
            }
    st->h = h, st->mass = mass, st->maxlog = maxlog, st->maxpos = maxpos, st->minx = minx;
    st->zeros = zeros;
}
