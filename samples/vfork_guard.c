/*
 * vfork_guard.c — a switch interpreter whose bytecode is rewritten while another thread waits in vfork().
 *
 * What it exercises: invalidation while a thread cannot be stopped.  A thread
 * that called vfork() waits in the kernel until its child execs or exits; a
 * tracer cannot bring it to a ptrace-stop meanwhile.  dynspec must still
 * handle a write to a page its variants rely on at that moment (unlink the
 * variants, let the write through) without stopping that thread, and without
 * dying.  Phases (SIZE = outer loop iterations of phase 1):
 *
 *   1. main interprets the bytecode alone for SIZE iterations (long enough
 *      for dynspec to install variants guarded on the bytecode page); a
 *      second thread, started at the beginning, waits on a pipe;
 *   2. main wakes the second thread, which calls vfork(): the child sleeps
 *      0.3 s, then execs /bin/true (or _exits 0 without it).  Once the
 *      second thread waits in vfork (its /proc state is 'D'; main gives up
 *      waiting for that after 2 s), main rewrites one immediate of the
 *      bytecode (the one write to its page after start-up);
 *   3. main interprets the changed bytecode for SIZE/4 iterations, then
 *      joins the second thread, which reaped the child.
 *
 * Every phase starts from a fixed env state, so each result is deterministic
 * whatever the scheduling.
 *
 * Usage:  vfork_guard [SIZE]     (SIZE = outer loop iterations of phase 1)
 *   small size (tests):      6000000   -> stdout in vfork_guard.expected
 *                                        (phase 1 takes ~0.6 s natively)
 *   bench size:             20000000
 *   default when omitted:   the small size
 *
 * Hot function (exact C signature; same ABI and opcodes as interp_switch.c):
 *
 *   struct insn { int32_t op, res, op1, op2; };          // 16 bytes
 *   long vfork_guard_run(const struct insn *code, long *env);
 *
 *   The program reads its outer iteration count from env[1] and its seed
 *   from env[5] (the caller sets both); it returns env[0] and leaves the
 *   final pseudo-random state in env[6].
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct insn {
    int32_t op, res, op1, op2;
};

enum {
    OP_HALT = 0,
    OP_MOVI = 1,
    OP_MOV = 2,
    OP_ADD = 3,
    OP_SUB = 4,
    OP_MUL = 5,
    OP_ADDI = 6,
    OP_XOR = 7,
    OP_ANDI = 8,
    OP_SHRI = 9,
    OP_BNEQ = 10,
    OP_JMP = 11,
};

enum { ENV_SLOTS = 8 };

__attribute__((noinline)) long vfork_guard_run(const struct insn *code, long *env)
{
    const struct insn *pc = code;
    for (;;) {
        const struct insn *i = pc++;
        switch (i->op) {
        case OP_HALT:
            return env[0];
        case OP_MOVI:
            env[i->res] = (long)i->op1;
            break;
        case OP_MOV:
            env[i->res] = env[i->op1];
            break;
        case OP_ADD:
            env[i->res] = (long)((unsigned long)env[i->op1] + (unsigned long)env[i->op2]);
            break;
        case OP_SUB:
            env[i->res] = (long)((unsigned long)env[i->op1] - (unsigned long)env[i->op2]);
            break;
        case OP_MUL:
            env[i->res] = (long)((unsigned long)env[i->op1] * (unsigned long)env[i->op2]);
            break;
        case OP_ADDI:
            env[i->res] = (long)((unsigned long)env[i->op1] + (unsigned long)(long)i->op2);
            break;
        case OP_XOR:
            env[i->res] = env[i->op1] ^ env[i->op2];
            break;
        case OP_ANDI:
            env[i->res] = env[i->op1] & (long)i->op2;
            break;
        case OP_SHRI:
            env[i->res] = (long)((unsigned long)env[i->op1] >> (i->op2 & 63));
            break;
        case OP_BNEQ:
            if (env[i->op1] != 0)
                pc = code + i->op2;
            break;
        case OP_JMP:
            pc = code + i->op2;
            break;
        default:
            return -1;
        }
    }
}

#ifndef DYNSPEC_NO_MAIN
/* The instruction whose immediate main rewrites while the second thread waits in vfork. */
enum { PATCHED = 7 };

static struct insn *vg_program(size_t *n_insns)
{
    const struct insn prog[] = {
        /*  0 */ {OP_MOVI, 0, 0, 0},        /* acc = 0 */
        /*  1 */ {OP_JMP, 0, 0, 13},        /* goto check */
        /*  2 */ {OP_MOVI, 2, 8, 0},        /* body: j = 8 */
        /*  3 */ {OP_MUL, 3, 5, 2},         /* inner: t = x * j */
        /*  4 */ {OP_ADD, 0, 0, 3},         /* acc += t */
        /*  5 */ {OP_SHRI, 4, 0, 7},        /* u = acc >> 7 */
        /*  6 */ {OP_XOR, 5, 5, 4},         /* x ^= u */
        /*  7 */ {OP_ADDI, 5, 5, 12345},    /* x += K (rewritten during the vfork) */
        /*  8 */ {OP_ANDI, 5, 5, 0xffffff}, /* x &= 0xffffff */
        /*  9 */ {OP_ADDI, 2, 2, -1},       /* j-- */
        /* 10 */ {OP_BNEQ, 0, 2, 3},        /* if j goto inner */
        /* 11 */ {OP_SUB, 0, 0, 1},         /* acc -= i */
        /* 12 */ {OP_ADDI, 1, 1, -1},       /* i-- */
        /* 13 */ {OP_BNEQ, 0, 1, 2},        /* check: if i goto body */
        /* 14 */ {OP_MOV, 6, 5, 0},         /* r6 = x */
        /* 15 */ {OP_HALT, 0, 0, 0},
    };
    /* A page of its own: the bytecode must not share a page with data written while it runs. */
    void *mem = NULL;
    if (posix_memalign(&mem, 4096, 4096) != 0)
        return NULL;
    memset(mem, 0, 4096);
    memcpy(mem, prog, sizeof prog);
    *n_insns = sizeof prog / sizeof prog[0];
    return mem;
}

struct phase {
    long count, seed;
    long result, x;
};

static void run_phase(const struct insn *code, long *env, struct phase *p)
{
    memset(env, 0, ENV_SLOTS * sizeof *env);
    env[1] = p->count;
    env[5] = p->seed;
    p->result = vfork_guard_run(code, env);
    p->x = env[6];
}

/* The second thread: its tid, the pipe that wakes it, and what its vfork child did. */
static volatile pid_t spawner_tid;
static int wake[2];
static int child_status = -1;

static void *spawner_main(void *arg)
{
    (void)arg;
    spawner_tid = (pid_t)syscall(SYS_gettid);
    char c;
    while (read(wake[0], &c, 1) < 0 && errno == EINTR) {
    }
    pid_t child = vfork();
    if (child == 0) {
        /* Only async-signal-safe calls here: the child runs on the parent's memory. */
        struct timespec ts = {0, 300 * 1000 * 1000};
        while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
        }
        char *const argv[] = {"true", NULL};
        execv("/bin/true", argv);
        _exit(0);
    }
    if (child < 0) {
        perror("vfork");
        return NULL;
    }
    int st = 0;
    while (waitpid(child, &st, 0) < 0 && errno == EINTR) {
    }
    child_status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    return NULL;
}

/* The scheduling state of thread `tid` of this process ('D' while it waits in vfork), '?' if unknown. */
static char thread_state(pid_t tid)
{
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/self/task/%d/stat", (int)tid);
    FILE *f = fopen(path, "r");
    if (!f)
        return '?';
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *close = strrchr(buf, ')');
    return close && close[1] == ' ' ? close[2] : '?';
}

int main(int argc, char **argv)
{
    long size = 6000000;
    if (argc > 1) {
        char *end = NULL;
        size = strtol(argv[1], &end, 10);
        if (end == argv[1] || *end != '\0' || size < 0) {
            fprintf(stderr, "usage: %s [SIZE]\n", argv[0]);
            return 2;
        }
    }
    size_t n = 0;
    struct insn *code = vg_program(&n);
    long *env = calloc(ENV_SLOTS, sizeof *env);
    if (!code || !env || pipe(wake) != 0) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    pthread_t spawner;
    int rc = pthread_create(&spawner, NULL, spawner_main, NULL);
    if (rc != 0) {
        fprintf(stderr, "pthread_create: %s\n", strerror(rc));
        return 1;
    }
    struct phase p1 = {size, 1, 0, 0};
    struct phase p3 = {size / 4, 2, 0, 0};

    run_phase(code, env, &p1);

    /* Phase 2: rewrite the bytecode while the spawner waits in vfork. */
    while (spawner_tid == 0) {
        struct timespec ms = {0, 1000 * 1000};
        nanosleep(&ms, NULL);
    }
    if (write(wake[1], "v", 1) != 1) {
        perror("write");
        return 1;
    }
    for (int k = 0; k < 2000 && thread_state(spawner_tid) != 'D'; k++) {
        struct timespec ms = {0, 1000 * 1000};
        nanosleep(&ms, NULL);
    }
    ((volatile struct insn *)code)[PATCHED].op2 = 777;

    run_phase(code, env, &p3);
    rc = pthread_join(spawner, NULL);
    if (rc != 0) {
        fprintf(stderr, "pthread_join: %s\n", strerror(rc));
        return 1;
    }

    printf("program: %zu instructions\n", n);
    printf("phase 1: %ld iterations, result %ld, x %ld\n", p1.count, p1.result, p1.x);
    printf("vfork child: exit status %d\n", child_status);
    printf("phase 3 (rewritten): %ld iterations, result %ld, x %ld\n", p3.count, p3.result, p3.x);
    free(env);
    free(code);
    return 0;
}
#endif
