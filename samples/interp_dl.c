/*
 * interp_dl.c — interp_switch's interpreter in a stripped shared library, called by a tiny program.
 *
 * What it exercises: an interpreter that lives in a shared library without
 * symbols for it (jq's libjq, Tcl's libtcl).  The Makefile builds the
 * library part into build/libinterp_dl.so with -fvisibility=hidden (only
 * dl_demo is exported) and strips it, so dl_run's bounds come only from
 * .eh_frame; build/interp_dl is main alone, linked against the library with
 * an rpath of $ORIGIN.  Bytecode as in interp_switch: heap, written once, a
 * page of its own.
 *
 * Usage:  interp_dl [SIZE]     (SIZE = outer loop iterations)
 *   small size (tests):      1000000   -> stdout in interp_dl.expected
 *   bench size:             20000000
 *   default when omitted:   the small size
 *
 * Hot functions (exact C signatures; both exported when built with
 * -DDYNSPEC_NO_MAIN -shared -fPIC and no -fvisibility):
 *
 *   struct insn { int32_t op, res, op1, op2; };          // 16 bytes
 *   long dl_run(const struct insn *code, long *env);   // interp_switch's interp_run
 *   int dl_demo(long size, long *result, long *x);
 *     runs interp_switch's demo program: its instruction count, or -1 out of memory.
 *
 * Built with -DINTERP_DL_MAIN_ONLY, the file is main alone (the library part
 * is left out).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef INTERP_DL_MAIN_ONLY
/* The library's one export; everything else is hidden by -fvisibility=hidden in the Makefile's build. */
#define DL_API __attribute__((visibility("default")))
#define DL_HOT __attribute__((noinline))

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

enum { DL_ENV_SLOTS = 8 };

DL_HOT long dl_run(const struct insn *code, long *env)
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

/* The demo program: a loop nest mixing an accumulator (r0) with a small
 * pseudo-random state (r5); r1 counts the outer loop down from `size`. */
static struct insn *demo_program(long size, size_t *n_insns)
{
    if (size < 0)
        size = 0;
    if (size > INT32_MAX)
        size = INT32_MAX;
    const struct insn prog[] = {
        /*  0 */ {OP_MOVI, 0, 0, 0},          /* acc = 0 */
        /*  1 */ {OP_MOVI, 1, (int32_t)size, 0}, /* i = size */
        /*  2 */ {OP_MOVI, 5, 1, 0},          /* x = 1 */
        /*  3 */ {OP_JMP, 0, 0, 15},          /* goto check */
        /*  4 */ {OP_MOVI, 2, 8, 0},          /* body: j = 8 */
        /*  5 */ {OP_MUL, 3, 5, 2},           /* inner: t = x * j */
        /*  6 */ {OP_ADD, 0, 0, 3},           /* acc += t */
        /*  7 */ {OP_SHRI, 4, 0, 7},          /* u = acc >> 7 */
        /*  8 */ {OP_XOR, 5, 5, 4},           /* x ^= u */
        /*  9 */ {OP_ADDI, 5, 5, 12345},      /* x += 12345 */
        /* 10 */ {OP_ANDI, 5, 5, 0xffffff},   /* x &= 0xffffff */
        /* 11 */ {OP_ADDI, 2, 2, -1},         /* j-- */
        /* 12 */ {OP_BNEQ, 0, 2, 5},          /* if j goto inner */
        /* 13 */ {OP_SUB, 0, 0, 1},           /* acc -= i */
        /* 14 */ {OP_ADDI, 1, 1, -1},         /* i-- */
        /* 15 */ {OP_BNEQ, 0, 1, 4},          /* check: if i goto body */
        /* 16 */ {OP_MOV, 6, 5, 0},           /* r6 = x */
        /* 17 */ {OP_HALT, 0, 0, 0},
    };
    /* A page of its own: the bytecode page must not share a page with data
     * that is written while the interpreter runs (env, stdio buffers). */
    void *mem = NULL;
    if (posix_memalign(&mem, 4096, 4096) != 0)
        return NULL;
    memset(mem, 0, 4096);
    memcpy(mem, prog, sizeof prog);
    if (n_insns)
        *n_insns = sizeof prog / sizeof prog[0];
    return mem;
}

DL_API int dl_demo(long size, long *result, long *x)
{
    size_t n = 0;
    struct insn *code = demo_program(size, &n);
    long *env = calloc(DL_ENV_SLOTS, sizeof *env);
    if (!code || !env) {
        free(code);
        free(env);
        return -1;
    }
    *result = dl_run(code, env);
    *x = env[6];
    free(env);
    free(code);
    return (int)n;
}
#endif /* !INTERP_DL_MAIN_ONLY */

#ifndef DYNSPEC_NO_MAIN
int dl_demo(long size, long *result, long *x);

int main(int argc, char **argv)
{
    long size = 1000000;
    if (argc > 1) {
        char *end = NULL;
        size = strtol(argv[1], &end, 10);
        if (end == argv[1] || *end != '\0' || size < 0) {
            fprintf(stderr, "usage: %s [SIZE]\n", argv[0]);
            return 2;
        }
    }
    long r = 0, x = 0;
    int n = dl_demo(size, &r, &x);
    if (n < 0) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    printf("program: %d instructions\n", n);
    printf("result: %ld\n", r);
    printf("x: %ld\n", x);
    return 0;
}
#endif
