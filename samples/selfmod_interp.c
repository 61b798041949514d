/*
 * selfmod_interp.c — switch-dispatch bytecode interpreter whose program rewrites its own bytecode.
 *
 * What it exercises: invalidation.  The bytecode looks like interp_switch's,
 * but an OP_PATCH instruction stores a new immediate into another bytecode
 * instruction on every outer-loop iteration, continuously through the whole
 * run, so any write-watch window over the bytecode page sees a write and a
 * variant that folded the bytecode must be dropped by its guard.
 *
 * Usage:  selfmod_interp [SIZE]     (SIZE = outer loop iterations)
 *   small size (tests):       800000   -> stdout in selfmod_interp.expected
 *   bench size:             15000000
 *   default when omitted:   the small size
 *
 * Hot function (exact C signature):
 *
 *   struct insn { int32_t op, res, op1, op2; };          // 16 bytes
 *   long selfmod_run(struct insn *code, long *env);
 *
 *   Same opcodes and semantics as interp_switch.c's interp_run (0..11), plus
 *   OP_PATCH 12: code[res].op2 = (int32_t)env[op1]   (writes the bytecode).
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
    OP_PATCH = 12,
};

__attribute__((noinline)) long selfmod_run(struct insn *code, long *env)
{
    struct insn *pc = code;
    for (;;) {
        struct insn *i = pc++;
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
        case OP_PATCH:
            code[i->res].op2 = (int32_t)env[i->op1];
            break;
        default:
            return -1;
        }
    }
}

#ifndef DYNSPEC_NO_MAIN
int main(int argc, char **argv)
{
    long size = 800000;
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
        /*  1 */ {OP_MOVI, 1, (int32_t)size, 0}, /* i = size */
        /*  2 */ {OP_MOVI, 5, 1, 0},          /* x = 1 */
        /*  3 */ {OP_JMP, 0, 0, 17},          /* goto check */
        /*  4 */ {OP_ANDI, 7, 1, 255},        /* body: imm = i & 255 */
        /*  5 */ {OP_PATCH, 9, 7, 0},         /* code[9].op2 = imm (self-modification) */
        /*  6 */ {OP_MOVI, 2, 8, 0},          /* j = 8 */
        /*  7 */ {OP_MUL, 3, 5, 2},           /* inner: t = x * j */
        /*  8 */ {OP_ADD, 0, 0, 3},           /* acc += t */
        /*  9 */ {OP_ADDI, 5, 5, 0},          /* x += imm (patched) */
        /* 10 */ {OP_SHRI, 4, 0, 7},          /* u = acc >> 7 */
        /* 11 */ {OP_XOR, 5, 5, 4},           /* x ^= u */
        /* 12 */ {OP_ANDI, 5, 5, 0xffffff},   /* x &= 0xffffff */
        /* 13 */ {OP_ADDI, 2, 2, -1},         /* j-- */
        /* 14 */ {OP_BNEQ, 0, 2, 7},          /* if j goto inner */
        /* 15 */ {OP_SUB, 0, 0, 1},           /* acc -= i */
        /* 16 */ {OP_ADDI, 1, 1, -1},         /* i-- */
        /* 17 */ {OP_BNEQ, 0, 1, 4},          /* check: if i goto body */
        /* 18 */ {OP_MOV, 6, 5, 0},           /* r6 = x */
        /* 19 */ {OP_HALT, 0, 0, 0},
    };
    /* Page of its own: the only writes to it come from OP_PATCH. */
    void *mem = NULL;
    long *env = calloc(8, sizeof *env);
    if (posix_memalign(&mem, 4096, 4096) != 0 || !env) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    memset(mem, 0, 4096);
    memcpy(mem, prog, sizeof prog);
    struct insn *code = mem;
    long r = selfmod_run(code, env);
    printf("program: %zu instructions\n", sizeof prog / sizeof prog[0]);
    printf("result: %ld\n", r);
    printf("x: %ld\n", env[6]);
    printf("last patched immediate: %d\n", code[9].op2);
    free(env);
    free(mem);
    return 0;
}
#endif
