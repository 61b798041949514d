/*
 * interp_switch.c — register-based bytecode interpreter with switch dispatch.
 *
 * What it exercises: the classic specialization target.  A dense `switch`
 * (gcc -O2 emits a jump table in .rodata) dispatches over heap bytecode that
 * is written once at start-up and never again.  Specializing interp_run for
 * a known `code` pointer folds the opcode loads, the jump table and the
 * operand fields, leaving straight-line code per bytecode.
 *
 * Usage:  interp_switch [SIZE]     (SIZE = outer loop iterations)
 *   small size (tests):      1000000   -> stdout in interp_switch.expected
 *   bench size:             20000000
 *   default when omitted:   the small size
 *
 * Hot function (exact C signature, stable ABI for the specializer tests):
 *
 *   struct insn { int32_t op, res, op1, op2; };          // 16 bytes
 *   long interp_run(const struct insn *code, long *env);
 *
 *   Runs from code[0] until OP_HALT and returns env[0].  env registers are
 *   indexed by res/op1/op2 (no bounds checks: the program is trusted).
 *   Arithmetic wraps (done in unsigned long).
 *
 *   op        value  semantics
 *   OP_HALT     0    return env[0]
 *   OP_MOVI     1    env[res] = op1                      (sign-extended imm)
 *   OP_MOV      2    env[res] = env[op1]
 *   OP_ADD      3    env[res] = env[op1] + env[op2]
 *   OP_SUB      4    env[res] = env[op1] - env[op2]
 *   OP_MUL      5    env[res] = env[op1] * env[op2]
 *   OP_ADDI     6    env[res] = env[op1] + op2           (sign-extended imm)
 *   OP_XOR      7    env[res] = env[op1] ^ env[op2]
 *   OP_ANDI     8    env[res] = env[op1] & op2           (sign-extended imm)
 *   OP_SHRI     9    env[res] = (unsigned long)env[op1] >> (op2 & 63)
 *   OP_BNEQ    10    if (env[op1] != 0) pc = op2         (absolute insn index)
 *   OP_JMP     11    pc = op2                            (absolute insn index)
 *   any other        return -1
 *
 * Also exported (not part of the hot path, for in-process tests):
 *   struct insn *interp_demo_program(long size, size_t *n_insns);
 *     builds the program main runs (page-aligned heap buffer, free() it);
 *   enum { INTERP_ENV_SLOTS = 8 } — env slots the demo program uses.
 */
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

enum { INTERP_ENV_SLOTS = 8 };

__attribute__((noinline)) long interp_run(const struct insn *code, long *env)
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
struct insn *interp_demo_program(long size, size_t *n_insns)
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

#ifndef DYNSPEC_NO_MAIN
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
    size_t n = 0;
    struct insn *code = interp_demo_program(size, &n);
    long *env = calloc(INTERP_ENV_SLOTS, sizeof *env);
    if (!code || !env) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    long r = interp_run(code, env);
    printf("program: %zu instructions\n", n);
    printf("result: %ld\n", r);
    printf("x: %ld\n", env[6]);
    free(env);
    free(code);
    return 0;
}
#endif
