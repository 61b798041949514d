/*
 * signals.c — a program with its own SIGSEGV handling and a profiling timer.
 *
 * What it exercises: the program's own signals must stay the program's.  It
 * touches three PROT_NONE pages (its SIGSEGV handler mprotects each one
 * read/write and the faulting store is restarted), reads a fourth PROT_NONE
 * page twice (the handler siglongjmps out), and computes while an ITIMER_PROF
 * timer delivers SIGPROF.  It prints only deterministic facts, writes one line
 * to stderr, and exits with status 3 on purpose.
 *
 * Usage:  signals [SIZE]     (SIZE = rounds of work over a 4096-word buffer)
 *   small size (tests):        25000   -> stdout in signals.expected
 *   bench size:               400000
 *   default when omitted:   the small size
 *   exit status: 3; stderr: "signals: done, exiting with status 3 on purpose"
 *
 * Hot function (exact C signature):
 *
 *   uint64_t sig_work(uint64_t *buf, size_t n, long rounds);
 *     rounds passes of an in-place mixing step over buf[0..n); returns a hash.
 */
#define _GNU_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <unistd.h>

__attribute__((noinline)) uint64_t sig_work(uint64_t *buf, size_t n, long rounds)
{
    uint64_t h = 1469598103934665603ull;
    for (long r = 0; r < rounds; r++) {
        for (size_t i = 0; i < n; i++) {
            uint64_t v = buf[i] * 6364136223846793005ull + (uint64_t)r;
            buf[i] = v ^ (v >> 29);
            h = (h ^ buf[i]) * 1099511628211ull;
        }
    }
    return h;
}

#ifndef DYNSPEC_NO_MAIN
enum { PAGE = 4096, FIXABLE = 3, JUMPS = 2 };

static char *fixable;   /* FIXABLE pages: the handler makes them read/write */
static char *forbidden; /* one page that stays PROT_NONE: the handler siglongjmps */
static volatile sig_atomic_t fixed_faults, jumped_faults, timer_ticks;
static sigjmp_buf recover;

static void on_segv(int sig, siginfo_t *si, void *ctx)
{
    (void)ctx;
    char *a = si->si_addr;
    if (a >= fixable && a < fixable + FIXABLE * PAGE) {
        char *page = fixable + ((a - fixable) / PAGE) * PAGE;
        if (mprotect(page, PAGE, PROT_READ | PROT_WRITE) == 0) {
            fixed_faults++;
            return; /* the faulting store is restarted and now succeeds */
        }
    } else if (a >= forbidden && a < forbidden + PAGE) {
        jumped_faults++;
        siglongjmp(recover, 1);
    }
    /* Not ours: die of it as if there were no handler. */
    signal(sig, SIG_DFL);
}

static void on_prof(int sig)
{
    (void)sig;
    timer_ticks++;
}

/* Loads from a page that stays PROT_NONE: recovered with siglongjmp.  A
 * function of its own so no local of main lives across sigsetjmp. */
static int touch_forbidden(void)
{
    volatile int recovered = 0;
    for (int j = 0; j < JUMPS; j++) {
        if (sigsetjmp(recover, 1) == 0) {
            volatile char *c = forbidden + 64 * j;
            (void)*c;
            printf("unexpected: read of a PROT_NONE page succeeded\n");
        } else {
            recovered++;
        }
    }
    return recovered;
}

int main(int argc, char **argv)
{
    long size = 25000;
    if (argc > 1) {
        char *end = NULL;
        size = strtol(argv[1], &end, 10);
        if (end == argv[1] || *end != '\0' || size < 0) {
            fprintf(stderr, "usage: %s [SIZE]\n", argv[0]);
            return 2;
        }
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, NULL) != 0) {
        perror("sigaction");
        return 1;
    }
    struct sigaction sp;
    memset(&sp, 0, sizeof sp);
    sp.sa_handler = on_prof;
    sp.sa_flags = SA_RESTART;
    sigemptyset(&sp.sa_mask);
    if (sigaction(SIGPROF, &sp, NULL) != 0) {
        perror("sigaction");
        return 1;
    }

    fixable = mmap(NULL, (FIXABLE + 1) * PAGE, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (fixable == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    forbidden = fixable + FIXABLE * PAGE;

    /* Stores into PROT_NONE pages: each faults once, the handler repairs it. */
    for (int p = 0; p < FIXABLE; p++) {
        volatile char *c = fixable + p * PAGE + 123;
        *c = (char)(p + 1);
    }
    int recovered = touch_forbidden();

    /* 2 ms of CPU time per tick; the work below takes far longer than that. */
    struct itimerval it = {.it_interval = {0, 2000}, .it_value = {0, 2000}};
    if (setitimer(ITIMER_PROF, &it, NULL) != 0) {
        perror("setitimer");
        return 1;
    }
    uint64_t *buf = calloc(PAGE, sizeof *buf);
    if (!buf) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    for (size_t i = 0; i < PAGE; i++)
        buf[i] = i;
    uint64_t h = sig_work(buf, PAGE, size);
    /* Determinism: at tiny sizes keep burning CPU (outside the hash) until the timer has fired. */
    uint64_t scratch[64] = {0};
    while (timer_ticks == 0)
        (void)sig_work(scratch, 64, 100);
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_PROF, &off, NULL);

    int stored_ok = 1;
    for (int p = 0; p < FIXABLE; p++)
        stored_ok &= fixable[p * PAGE + 123] == (char)(p + 1);
    printf("segv handled by mprotect: %d\n", (int)fixed_faults);
    printf("segv handled by siglongjmp: %d (recovered %d)\n", (int)jumped_faults, recovered);
    printf("stores after repair: %s\n", stored_ok ? "ok" : "lost");
    printf("timer fired: %s\n", timer_ticks > 0 ? "yes" : "no");
    printf("work hash: %016llx\n", (unsigned long long)h);
    fflush(stdout);
    fprintf(stderr, "signals: done, exiting with status 3 on purpose\n");
    free(buf);
    munmap(fixable, (FIXABLE + 1) * PAGE);
    return 3;
}
#endif
