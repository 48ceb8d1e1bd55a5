/* Errors, thread control, allocation and bilinear tables. */
#define _DEFAULT_SOURCE /* posix_memalign, madvise */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>

#include "internal.h"

static __thread char last_error[512];

const char *dseg_last_error(void) { return last_error; }

void dseg_clear_error(void) { last_error[0] = '\0'; }

int dseg_fail(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return code;
}

/*
 * Freed scratch of KEEP_MIN bytes or more is kept for the next calls, up to
 * KEEP_SLOTS blocks and KEEP_MAX bytes in all: the kernel zeroes a fresh page
 * on its first touch, and a merge at R = 64 touches ~30 MiB of scratch per
 * call, which cost ~5% of its time on a 2-core machine. A kept block serves a
 * request of between half its size and its size; when full, the oldest go.
 * dseg_release_memory() frees them all. Under AddressSanitizer nothing is
 * kept, so that a use after free is still caught.
 */
enum { HUGE = 2 << 20, KEEP_SLOTS = 16 };
#define KEEP_MIN ((size_t)256 << 10)
#if defined(__SANITIZE_ADDRESS__)
#define KEEP_MAX ((size_t)0)
#else
#define KEEP_MAX ((size_t)64 << 20)
#endif

static struct {
    void *p;
    size_t bytes;
    unsigned long stamp; /* when it was kept: the oldest are evicted first */
} kept[KEEP_SLOTS];
static size_t kept_bytes;
static unsigned long kept_stamp;
static pthread_mutex_t kept_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t fork_handlers_once = PTHREAD_ONCE_INIT;

/* A fork while another thread holds kept_lock would leave the child a lock
 * that nobody will release: the fork waits for the lock instead, and both
 * processes release it after. (The child's kept blocks are its copies.) */
static void kept_lock_acquire(void) { pthread_mutex_lock(&kept_lock); }
static void kept_lock_release(void) { pthread_mutex_unlock(&kept_lock); }
static void install_fork_handlers(void) {
    pthread_atfork(kept_lock_acquire, kept_lock_release, kept_lock_release);
}

static void lock_kept(void) {
    pthread_once(&fork_handlers_once, install_fork_handlers);
    pthread_mutex_lock(&kept_lock);
}

static void *take_kept(size_t bytes) {
    void *p = NULL;
    lock_kept();
    int best = -1;
    for (int i = 0; i < KEEP_SLOTS; i++)
        if (kept[i].p && kept[i].bytes >= bytes && kept[i].bytes / 2 <= bytes &&
            (best < 0 || kept[i].bytes < kept[best].bytes))
            best = i;
    if (best >= 0) {
        p = kept[best].p, kept[best].p = NULL;
        kept_bytes -= kept[best].bytes;
    }
    pthread_mutex_unlock(&kept_lock);
    return p;
}

void *dseg_malloc(size_t bytes) {
    if (bytes >= KEEP_MIN) {
        void *p = take_kept(bytes);
        if (p) return p;
    }
    /* 64-byte alignment keeps vector loads aligned for the kernels. Large
     * buffers (A, log A: 64 MiB each at R = 64) are 2 MiB aligned and asked
     * to use huge pages: first touch then costs 32 page faults, not 16384. */
    void *p = NULL;
    const size_t align = bytes >= HUGE ? HUGE : 64;
    if (posix_memalign(&p, align, bytes ? bytes : 1) != 0) return NULL;
#ifdef MADV_HUGEPAGE
    if (bytes >= HUGE) madvise(p, bytes - bytes % HUGE, MADV_HUGEPAGE);
#endif
    return p;
}

void dseg_free_sized(void *p, size_t bytes) {
    if (!p) return;
    if (bytes < KEEP_MIN || bytes > KEEP_MAX) {
        free(p);
        return;
    }
    void *evicted[KEEP_SLOTS];
    int n_evicted = 0;
    lock_kept();
    for (;;) {
        int free_slot = -1, oldest = -1;
        for (int i = 0; i < KEEP_SLOTS; i++) {
            if (!kept[i].p) free_slot = free_slot < 0 ? i : free_slot;
            else if (oldest < 0 || kept[i].stamp < kept[oldest].stamp) oldest = i;
        }
        if (free_slot >= 0 && kept_bytes + bytes <= KEEP_MAX) {
            kept[free_slot].p = p, kept[free_slot].bytes = bytes;
            kept[free_slot].stamp = ++kept_stamp;
            kept_bytes += bytes;
            break;
        }
        evicted[n_evicted++] = kept[oldest].p, kept[oldest].p = NULL;
        kept_bytes -= kept[oldest].bytes;
    }
    pthread_mutex_unlock(&kept_lock);
    for (int i = 0; i < n_evicted; i++) free(evicted[i]);
}

size_t dseg_release_memory(void) {
    void *all[KEEP_SLOTS];
    int n = 0;
    lock_kept();
    const size_t bytes = kept_bytes;
    for (int i = 0; i < KEEP_SLOTS; i++)
        if (kept[i].p) all[n++] = kept[i].p, kept[i].p = NULL;
    kept_bytes = 0;
    pthread_mutex_unlock(&kept_lock);
    for (int i = 0; i < n; i++) free(all[i]);
    return bytes;
}

void *dseg_alloc(size_t bytes) { return dseg_malloc(bytes); }

void dseg_free(void *p) { free(p); }

/* ---- threads ---------------------------------------------------------- */

static int requested_threads = 0; /* 0: all cores */

void dseg_set_num_threads(int n) {
    requested_threads = n < 1 ? 0 : n > DSEG_MAX_THREADS ? DSEG_MAX_THREADS : n;
}

int dseg_get_num_threads(void) {
#ifdef _OPENMP
    /* unset: OpenMP's default, which honours OMP_NUM_THREADS */
    const int n = requested_threads > 0 ? requested_threads : omp_get_max_threads();
    return n > DSEG_MAX_THREADS ? DSEG_MAX_THREADS : n;
#else
    return 1;
#endif
}

dseg_exec dseg_default_exec(void) {
    dseg_exec ex = {dseg_get_num_threads(), dseg_get_sgemm()};
    return ex;
}

int dseg_check_exec(const dseg_exec *ex) {
    if (!ex) return dseg_fail(DSEG_EINVAL, "exec: NULL pointer");
    if (ex->threads < 1 || ex->threads > DSEG_MAX_THREADS)
        return dseg_fail(DSEG_EINVAL, "exec: threads must be in [1, %d], got %d",
                         DSEG_MAX_THREADS, ex->threads);
    return DSEG_OK;
}

int dseg_threads_for(const dseg_exec *ex, double work) {
#ifdef _OPENMP
    return work < 262144.0 ? 1 : ex->threads;
#else
    (void)ex, (void)work;
    return 1;
#endif
}

int dseg_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* ---- bilinear ------------------------------------------------------------ */

void dseg_bilinear_table(int in, int out, int *i0, int *i1, float *frac) {
    const double scale = (double)in / (double)out;
    for (int d = 0; d < out; d++) {
        double src = (d + 0.5) * scale - 0.5;
        if (src < 0) src = 0;
        int lo = (int)floor(src);
        if (lo > in - 1) lo = in - 1;
        i0[d] = lo;
        i1[d] = lo < in - 1 ? lo + 1 : lo;
        frac[d] = (float)(src - lo);
    }
}
