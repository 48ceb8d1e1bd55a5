/* The merge's float32 log against the float64 one over every positive finite
 * float: prints the largest relative error; exits 1 when it is above the
 * 1e-7 that DSEG_LOG_REL_ERROR (3e-7) is the bound of with margin, or when
 * log 0 or log 1 is not exactly 0. Built by tests/test_c_api.py with and
 * without the run-time clones (FMA and not). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

enum { BLOCK = 1 << 16 };

/* Largest relative error over the floats with bit patterns [first, first + BLOCK). */
static double block_error(uint32_t first, float *x, float *l) {
    for (uint32_t i = 0; i < BLOCK; i++) {
        const uint32_t u = first + i;
        memcpy(&x[i], &u, sizeof u);
    }
    dseg_log_only(x, BLOCK, l);
    double worst = 0.0;
    for (uint32_t i = 0; i < BLOCK; i++) {
        if (!(x[i] > 0.0f) || isinf(x[i])) continue;
        const double t = log((double)x[i]);
        const double err = t == 0.0 ? fabs((double)l[i]) : fabs((double)l[i] - t) / fabs(t);
        if (err > worst) worst = err;
    }
    return worst;
}

int main(void) {
    const float special[2] = {0.0f, 1.0f};
    float special_log[2] = {-1.0f, -1.0f};
    dseg_log_only(special, 2, special_log);
    if (special_log[0] != 0.0f || special_log[1] != 0.0f) {
        printf("log 0 -> %g, log 1 -> %g (want 0 and 0)\n", special_log[0], special_log[1]);
        return 1;
    }
    const uint32_t blocks = 0x7f800000u / BLOCK; /* up to +inf, excluded */
    double worst = 0.0;
    int failed = 0;
#pragma omp parallel reduction(max : worst) reduction(| : failed)
    {
        float *x = malloc(sizeof(float) * BLOCK), *l = malloc(sizeof(float) * BLOCK);
        failed |= !x || !l;
#pragma omp for schedule(dynamic, 16)
        for (uint32_t b = 0; b < blocks; b++) {
            if (!x || !l) continue;
            const double e = block_error(b * BLOCK, x, l);
            worst = e > worst ? e : worst;
        }
        free(x), free(l);
    }
    if (failed) {
        printf("out of memory\n");
        return 1;
    }
    printf("max relative error %.3g\n", worst);
    return worst <= 1e-7 ? 0 : 1;
}
