/*
 * mt_interp.c — three threads interpreting ONE shared bytecode program, changed once mid-run.
 *
 * What it exercises: threads.  Every worker runs the same heap bytecode with
 * its own env (seeded with its thread index).  All workers finish phase 1
 * at a barrier; the main thread then patches one immediate of the shared
 * program (the single write to the bytecode page after start-up); a second
 * barrier releases phase 2.  Results are printed in thread order, so the
 * output is deterministic whatever the scheduling.
 *
 * Usage:  mt_interp [SIZE]     (SIZE = outer iterations per thread per phase)
 *   small size (tests):       300000   -> stdout in mt_interp.expected
 *   bench size:              6000000
 *   default when omitted:   the small size
 *
 * Hot function (exact C signature; same ABI and opcodes as interp_switch.c):
 *
 *   struct insn { int32_t op, res, op1, op2; };          // 16 bytes
 *   long mt_interp_run(const struct insn *code, long *env);
 *
 *   The shared program reads env[5] (the thread's seed) and never sets it
 *   before use; it returns env[0].
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

__attribute__((noinline)) long mt_interp_run(const struct insn *code, long *env)
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
enum { NTHREADS = 3, PATCHED = 9 };

static struct insn *shared_code;
static pthread_barrier_t phase_done, phase_go;

struct worker {
    pthread_t thread;
    int index;
    long result[2];
    long x[2];
    long *env;
};

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    for (int phase = 0; phase < 2; phase++) {
        memset(w->env, 0, 8 * sizeof *w->env);
        w->env[5] = w->index + 1;
        w->result[phase] = mt_interp_run(shared_code, w->env);
        w->x[phase] = w->env[6];
        if (phase == 0) {
            pthread_barrier_wait(&phase_done); /* everyone finished phase 1 */
            pthread_barrier_wait(&phase_go);   /* main has patched the program */
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    long size = 300000;
    if (argc > 1) {
        char *end = NULL;
        size = strtol(argv[1], &end, 10);
        if (end == argv[1] || *end != '\0' || size < 0 || size > INT32_MAX) {
            fprintf(stderr, "usage: %s [SIZE]\n", argv[0]);
            return 2;
        }
    }
    const struct insn prog[] = {
        /*  0 */ {OP_MOVI, 0, 0, 0},          /* acc = 0 */
        /*  1 */ {OP_MOVI, 1, (int32_t)size, 0}, /* i = size; x = env[5] (seed) */
        /*  2 */ {OP_JMP, 0, 0, 14},          /* goto check */
        /*  3 */ {OP_MOVI, 2, 8, 0},          /* body: j = 8 */
        /*  4 */ {OP_MUL, 3, 5, 2},           /* inner: t = x * j */
        /*  5 */ {OP_ADD, 0, 0, 3},           /* acc += t */
        /*  6 */ {OP_SHRI, 4, 0, 7},          /* u = acc >> 7 */
        /*  7 */ {OP_XOR, 5, 5, 4},           /* x ^= u */
        /*  8 */ {OP_ANDI, 5, 5, 0xffffff},   /* x &= 0xffffff */
        /*  9 */ {OP_ADDI, 5, 5, 12345},      /* x += K (patched between phases) */
        /* 10 */ {OP_ADDI, 2, 2, -1},         /* j-- */
        /* 11 */ {OP_BNEQ, 0, 2, 4},          /* if j goto inner */
        /* 12 */ {OP_SUB, 0, 0, 1},           /* acc -= i */
        /* 13 */ {OP_ADDI, 1, 1, -1},         /* i-- */
        /* 14 */ {OP_BNEQ, 0, 1, 3},          /* check: if i goto body */
        /* 15 */ {OP_MOV, 6, 5, 0},           /* r6 = x */
        /* 16 */ {OP_HALT, 0, 0, 0},
    };
    void *mem = NULL;
    if (posix_memalign(&mem, 4096, 4096) != 0) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    memset(mem, 0, 4096);
    memcpy(mem, prog, sizeof prog);
    shared_code = mem;
    pthread_barrier_init(&phase_done, NULL, NTHREADS + 1);
    pthread_barrier_init(&phase_go, NULL, NTHREADS + 1);
    struct worker w[NTHREADS];
    for (int t = 0; t < NTHREADS; t++) {
        w[t].index = t;
        w[t].env = calloc(8, sizeof(long));
        if (!w[t].env || pthread_create(&w[t].thread, NULL, worker_main, &w[t]) != 0) {
            fprintf(stderr, "cannot start thread %d\n", t);
            return 1;
        }
    }
    pthread_barrier_wait(&phase_done);
    shared_code[PATCHED].op2 = 777; /* the one change to the shared program */
    pthread_barrier_wait(&phase_go);
    for (int t = 0; t < NTHREADS; t++)
        pthread_join(w[t].thread, NULL);
    printf("threads: %d, iterations per phase: %ld\n", NTHREADS, size);
    for (int t = 0; t < NTHREADS; t++)
        printf("thread %d: phase 1 result %ld x %ld, phase 2 result %ld x %ld\n", t,
               w[t].result[0], w[t].x[0], w[t].result[1], w[t].x[1]);
    for (int t = 0; t < NTHREADS; t++)
        free(w[t].env);
    free(mem);
    return 0;
}
#endif
