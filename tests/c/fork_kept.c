/* fork() while another thread is inside the kept-scratch allocator: the
 * child must still allocate (no lock left held by a thread it lacks). One
 * thread allocates and frees kept-size blocks nonstop; the main thread forks
 * 200 times, each child allocating once and exiting. Exits 1 when a child
 * hangs (killed after 20 s) or fails. */
#define _DEFAULT_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "diffseg_core.h"

enum { BLOCK = 1 << 20, FORKS = 200 };
static volatile int stop;

static void *churn(void *arg) {
    (void)arg;
    while (!stop) {
        void *p = dseg_alloc(BLOCK);
        dseg_free_sized(p, BLOCK);
    }
    return NULL;
}

/* 0: the child exited 0 within 20 s. */
static int wait_child(pid_t pid) {
    for (int ms = 0; ms < 20000; ms++) {
        int status;
        if (waitpid(pid, &status, WNOHANG) == pid) return !(WIFEXITED(status) && WEXITSTATUS(status) == 0);
        const struct timespec tick = {0, 1000000};
        nanosleep(&tick, NULL);
    }
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
    return 1;
}

int main(void) {
    pthread_t t;
    if (pthread_create(&t, NULL, churn, NULL) != 0) return 1;
    int failed = 0;
    for (int i = 0; i < FORKS && !failed; i++) {
        const pid_t pid = fork();
        if (pid < 0) {
            failed = 1;
            break;
        }
        if (pid == 0) {
            void *p = dseg_alloc(BLOCK);
            dseg_free_sized(p, BLOCK);
            _exit(p ? 0 : 1);
        }
        failed = wait_child(pid);
        if (failed) printf("child %d of %d hung or failed\n", i + 1, FORKS);
    }
    stop = 1;
    pthread_join(t, NULL);
    if (!failed) printf("ok: %d forks\n", FORKS);
    return failed;
}
