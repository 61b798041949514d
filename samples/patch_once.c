/*
 * patch_once.c — a bytecode interpreter whose program is patched once, halfway.
 *
 * What it exercises: specializing again after a one-time change.  main runs a
 * small bytecode loop (the interp_switch interpreter, on heap bytecode of its
 * own page) over and over; halfway through it rewrites one immediate operand
 * of the bytecode, once.  The variants specialized on the old bytecode must be
 * invalidated at the write, and since the memory is stable again afterwards,
 * the region is worth specializing again on the new contents.
 *
 * Usage:  patch_once [SIZE]     (SIZE = total inner-loop iterations / 1000)
 *   small size (tests):      20000  -> stdout in patch_once.expected
 *   bench size:             400000
 *   default when omitted:   the small size
 *
 * Hot function (exact C signature):
 *
 *   struct insn { int32_t op, res, op1, op2; };          // 16 bytes
 *   long patch_run(const struct insn *code, long *env);
 *
 *   The interp_switch interpreter (same opcodes).  Also exported:
 *   struct insn *patch_program(size_t *n_insns);  the bytecode main runs.
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

enum { PATCH_ENV_SLOTS = 8 };

__attribute__((noinline)) long patch_run(const struct insn *code, long *env)
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

/* The program: 1000 rounds of a mixing loop over r5; the ADDI at index 7 is
 * the constant main patches halfway. */
enum { PATCHED_INSN = 7 };

struct insn *patch_program(size_t *n_insns)
{
    const struct insn prog[] = {
        /*  0 */ {OP_MOVI, 1, 1000, 0},       /* i = 1000 */
        /*  1 */ {OP_JMP, 0, 0, 11},          /* goto check */
        /*  2 */ {OP_MOVI, 2, 4, 0},          /* body: j = 4 */
        /*  3 */ {OP_MUL, 3, 5, 2},           /* inner: t = x * j */
        /*  4 */ {OP_ADD, 0, 0, 3},           /* acc += t */
        /*  5 */ {OP_SHRI, 4, 0, 9},          /* u = acc >> 9 */
        /*  6 */ {OP_XOR, 5, 5, 4},           /* x ^= u */
        /*  7 */ {OP_ADDI, 5, 5, 12345},      /* x += 12345 (patched once) */
        /*  8 */ {OP_ANDI, 5, 5, 0xfffff},    /* x &= 0xfffff */
        /*  9 */ {OP_ADDI, 2, 2, -1},         /* j-- */
        /* 10 */ {OP_BNEQ, 0, 2, 3},          /* if j goto inner */
        /* 11 */ {OP_ADDI, 1, 1, -1},         /* check: i-- */
        /* 12 */ {OP_BNEQ, 0, 1, 2},          /* if i goto body */
        /* 13 */ {OP_HALT, 0, 0, 0},
    };
    /* A page of its own: only the one patch ever writes it. */
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
    long size = 20000;
    if (argc > 1) {
        char *end = NULL;
        size = strtol(argv[1], &end, 10);
        if (end == argv[1] || *end != '\0' || size < 2) {
            fprintf(stderr, "usage: %s [SIZE]  (SIZE >= 2)\n", argv[0]);
            return 2;
        }
    }
    size_t n = 0;
    struct insn *code = patch_program(&n);
    long *env = calloc(PATCH_ENV_SLOTS, sizeof *env);
    if (!code || !env) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    env[5] = 1;
    unsigned long sum = 0;
    long calls = size / 4; /* each call runs 1000 x 4 inner iterations */
    if (calls < 2)
        calls = 2;
    for (long k = 0; k < calls; k++) {
        if (k == calls / 2) {
            /* The one-time change: a new constant, then the memory is stable again. */
            code[PATCHED_INSN].op2 = 54321;
        }
        env[0] = 0;
        sum += (unsigned long)patch_run(code, env);
    }
    printf("program: %zu instructions, patched once\n", n);
    printf("sum: %lu\n", sum);
    printf("x: %ld\n", env[5]);
    free(env);
    free(code);
    return 0;
}
#endif
