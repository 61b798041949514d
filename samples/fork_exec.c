/*
 * fork_exec.c — forks computing children; one of them re-executes this binary in "child" mode.
 *
 * What it exercises: fork and exec under a tracer.  Two forked children
 * compute and report through their exit status only; a third forks and
 * execs this same binary (/proc/self/exe, argv[0] kept) with the argument
 * "child", which prints one line and exits with a status of its own.  The
 * parent prints only after each child has been reaped, in a fixed order, so
 * the output is deterministic.
 *
 * Usage:  fork_exec [SIZE]           (SIZE = work per child)
 *         fork_exec child SIZE       (the exec'd mode; also usable directly)
 *   small size (tests):      10000000   -> stdout in fork_exec.expected
 *   bench size:            200000000
 *   default when omitted:   the small size
 *
 * Hot function (exact C signature):
 *
 *   uint64_t fork_work(uint64_t seed, long n);
 *     n rounds of a 64-bit mixing step starting from seed; returns the state.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

__attribute__((noinline)) uint64_t fork_work(uint64_t seed, long n)
{
    uint64_t s = seed;
    for (long i = 0; i < n; i++) {
        s ^= s >> 33;
        s *= 0xff51afd7ed558ccdull;
        s += (uint64_t)i;
    }
    return s;
}

#ifndef DYNSPEC_NO_MAIN
static long parse_size(const char *arg, const char *prog)
{
    char *end = NULL;
    long size = strtol(arg, &end, 10);
    if (end == arg || *end != '\0' || size < 0) {
        fprintf(stderr, "usage: %s [SIZE] | %s child SIZE\n", prog, prog);
        exit(2);
    }
    return size;
}

/* Exit statuses are 0..255; keep them in 10..137 so none collides with 0/1/2. */
static int status_of(uint64_t v)
{
    return 10 + (int)(v % 128);
}

int main(int argc, char **argv)
{
    if (argc > 1 && strcmp(argv[1], "child") == 0) {
        long size = argc > 2 ? parse_size(argv[2], argv[0]) : 10000000;
        uint64_t v = fork_work(3, size);
        printf("exec child: work %016llx\n", (unsigned long long)v);
        return status_of(v);
    }
    long size = argc > 1 ? parse_size(argv[1], argv[0]) : 10000000;
    printf("parent: starting 3 children\n");
    /* Flush before forking so buffered output is not duplicated in children. */
    fflush(stdout);
    pid_t pids[3];
    for (int c = 0; c < 3; c++) {
        pid_t pid = fork();
        if (pid < 0) {
            perror("fork");
            return 1;
        }
        if (pid == 0) {
            if (c == 2) {
                char arg[32];
                snprintf(arg, sizeof arg, "%ld", size);
                char *const args[] = {argv[0], "child", arg, NULL};
                execv("/proc/self/exe", args);
                perror("execv");
                _exit(127);
            }
            _exit(status_of(fork_work((uint64_t)c + 1, size)));
        }
        pids[c] = pid;
        /* The exec'd child prints; wait for it before the parent prints again. */
    }
    int codes[3];
    for (int c = 0; c < 3; c++) {
        int st = 0;
        if (waitpid(pids[c], &st, 0) < 0) {
            perror("waitpid");
            return 1;
        }
        codes[c] = WIFEXITED(st) ? WEXITSTATUS(st) : -WTERMSIG(st);
    }
    for (int c = 0; c < 3; c++) {
        uint64_t expect = fork_work((uint64_t)c + 1, size);
        printf("child %d (%s): exit status %d, expected %d\n", c, c == 2 ? "exec" : "fork",
               codes[c], status_of(expect));
    }
    return 0;
}
#endif
