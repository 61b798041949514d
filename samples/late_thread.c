/*
 * late_thread.c — a switch interpreter that runs single-threaded first and starts a second thread late.
 *
 * What it exercises: store forwarding safety.  While a process has one
 * thread, dynspec may install variants that reuse a value they just stored
 * to env[] from a register instead of reloading it.  This program runs its
 * hot loop alone for the first half of the run (long enough for such
 * variants to be installed), then calls pthread_create: from then on
 * another thread exists and the forwarding variants must be gone before it
 * runs.  Phases (SIZE = total outer loop iterations):
 *
 *   1. main alone:                         SIZE/2 iterations on env A
 *   2. a worker thread on its own env B    SIZE/4 iterations
 *      and, at the same time, main on A    SIZE/4 iterations; main joins
 *   3. main alone again on env A           SIZE/4 iterations
 *
 * Every phase starts from a fixed env state (count and seed), so each
 * result is deterministic whatever the scheduling; they are printed in
 * phase order.
 *
 * Usage:  late_thread [SIZE]     (SIZE = total outer loop iterations)
 *   small size (tests):      8000000   -> stdout in late_thread.expected
 *                                        (phase 1 alone takes ~0.45 s natively)
 *   bench size:             20000000
 *   default when omitted:   the small size
 *
 * Hot function (exact C signature; same ABI and opcodes as interp_switch.c):
 *
 *   struct insn { int32_t op, res, op1, op2; };          // 16 bytes
 *   long late_run(const struct insn *code, long *env);
 *
 *   The program reads its outer iteration count from env[1] and its seed
 *   from env[5] (the caller sets both); it returns env[0] and leaves the
 *   final pseudo-random state in env[6].
 */
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

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

__attribute__((noinline)) long late_run(const struct insn *code, long *env)
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
/* interp_switch's loop nest, with the outer count (r1) and the seed (r5) supplied by the caller so that every
 * phase and thread runs the same bytecode (the same trigger values) on its own numbers. */
static struct insn *late_program(size_t *n_insns)
{
    const struct insn prog[] = {
        /*  0 */ {OP_MOVI, 0, 0, 0},        /* acc = 0 */
        /*  1 */ {OP_JMP, 0, 0, 13},        /* goto check */
        /*  2 */ {OP_MOVI, 2, 8, 0},        /* body: j = 8 */
        /*  3 */ {OP_MUL, 3, 5, 2},         /* inner: t = x * j */
        /*  4 */ {OP_ADD, 0, 0, 3},         /* acc += t */
        /*  5 */ {OP_SHRI, 4, 0, 7},        /* u = acc >> 7 */
        /*  6 */ {OP_XOR, 5, 5, 4},         /* x ^= u */
        /*  7 */ {OP_ADDI, 5, 5, 12345},    /* x += 12345 */
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
    const struct insn *code;
    long *env;
    long count, seed;
    long result, x;
};

static void run_phase(struct phase *p)
{
    memset(p->env, 0, ENV_SLOTS * sizeof *p->env);
    p->env[1] = p->count;
    p->env[5] = p->seed;
    p->result = late_run(p->code, p->env);
    p->x = p->env[6];
}

static void *worker_main(void *arg)
{
    run_phase(arg);
    return NULL;
}

int main(int argc, char **argv)
{
    long size = 8000000;
    if (argc > 1) {
        char *end = NULL;
        size = strtol(argv[1], &end, 10);
        if (end == argv[1] || *end != '\0' || size < 0) {
            fprintf(stderr, "usage: %s [SIZE]\n", argv[0]);
            return 2;
        }
    }
    size_t n = 0;
    struct insn *code = late_program(&n);
    long *env_a = calloc(ENV_SLOTS, sizeof *env_a);
    long *env_b = calloc(ENV_SLOTS, sizeof *env_b);
    if (!code || !env_a || !env_b) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    long quarter = size / 4;
    struct phase p1 = {code, env_a, size - 2 * quarter, 1, 0, 0};
    struct phase p2_main = {code, env_a, quarter, 2, 0, 0};
    struct phase p2_worker = {code, env_b, quarter, 3, 0, 0};
    struct phase p3 = {code, env_a, quarter, 4, 0, 0};

    run_phase(&p1);
    pthread_t worker;
    int rc = pthread_create(&worker, NULL, worker_main, &p2_worker);
    if (rc != 0) {
        fprintf(stderr, "pthread_create: %s\n", strerror(rc));
        return 1;
    }
    run_phase(&p2_main);
    rc = pthread_join(worker, NULL);
    if (rc != 0) {
        fprintf(stderr, "pthread_join: %s\n", strerror(rc));
        return 1;
    }
    run_phase(&p3);

    printf("program: %zu instructions\n", n);
    const struct phase *all[] = {&p1, &p2_main, &p2_worker, &p3};
    const char *names[] = {"phase 1 (alone)", "phase 2 (main)", "phase 2 (worker)", "phase 3 (alone)"};
    unsigned long sum = 0;
    for (size_t k = 0; k < 4; k++) {
        printf("%s: %ld iterations, result %ld, x %ld\n", names[k], all[k]->count, all[k]->result, all[k]->x);
        sum = sum * 1000003ul + (unsigned long)all[k]->result + (unsigned long)all[k]->x;
    }
    printf("checksum: %lu\n", sum);
    free(env_b);
    free(env_a);
    free(code);
    return 0;
}
#endif
