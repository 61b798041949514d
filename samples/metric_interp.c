/*
 * metric_interp.c — a switch interpreter called once, whose bytecode calls a native builtin once per loop
 * iteration (as scripts call their interpreter's library functions).
 *
 * What it exercises: a variant that follows the bytecode loops inside itself and is entered once, so neither
 * its dispatch site's passes nor calls of its function measure it; the user names the unit of work instead
 * (`dynspec run --metric calls:metric_builtin`), and the builtin's calls are counted the same way with the
 * variant on and off.
 *
 * Usage:  metric_interp [SIZE]    (SIZE = outer loop iterations = builtin calls)
 *   small size (tests):      5000000  -> stdout in metric_interp.expected
 *   bench size:             40000000
 *   default when omitted:   the small size
 *
 * Hot functions (exact C signatures):
 *
 *   struct insn { int32_t op, res, op1, op2; };          // 16 bytes
 *   long metric_run(const struct insn *code, long *env);
 *     runs from code[0] until OP_HALT and returns env[0]; ops as interp_switch's, plus
 *     OP_CALL 12: env[res] = metric_builtin(env[op1], env[op2]).
 *   long metric_builtin(long a, long b);
 *     a small mixing function, never inlined.
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
    OP_ADD = 3,
    OP_MUL = 5,
    OP_ADDI = 6,
    OP_XOR = 7,
    OP_ANDI = 8,
    OP_SHRI = 9,
    OP_BNEQ = 10,
    OP_JMP = 11,
    OP_CALL = 12,
};

__attribute__((noinline)) long metric_builtin(long a, long b)
{
    unsigned long x = (unsigned long)a * 0x9e3779b97f4a7c15UL + (unsigned long)b;
    return (long)((x ^ (x >> 29)) & 0xffffffffUL);
}

__attribute__((noinline)) long metric_run(const struct insn *code, long *env)
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
        case OP_ADD:
            env[i->res] = (long)((unsigned long)env[i->op1] + (unsigned long)env[i->op2]);
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
        case OP_CALL:
            env[i->res] = metric_builtin(env[i->op1], env[i->op2]);
            break;
        default:
            return -1;
        }
    }
}

#ifndef DYNSPEC_NO_MAIN
int main(int argc, char **argv)
{
    long size = argc > 1 ? atol(argv[1]) : 5000000;
    if (size <= 0 || size > INT32_MAX) {
        fprintf(stderr, "usage: metric_interp [SIZE]   (1 .. %d)\n", INT32_MAX);
        return 2;
    }
    const struct insn prog[] = {
        /*  0 */ {OP_MOVI, 0, 0, 0},             /* acc = 0 */
        /*  1 */ {OP_MOVI, 1, (int32_t)size, 0}, /* i = size */
        /*  2 */ {OP_MOVI, 5, 7, 0},             /* x = 7 */
        /*  3 */ {OP_CALL, 6, 5, 1},             /* loop: y = builtin(x, i) */
        /*  4 */ {OP_ADD, 0, 0, 6},              /* acc += y */
        /*  5 */ {OP_MUL, 3, 5, 6},              /* t = x * y */
        /*  6 */ {OP_SHRI, 4, 3, 11},            /* u = t >> 11 */
        /*  7 */ {OP_XOR, 5, 5, 4},              /* x ^= u */
        /*  8 */ {OP_ADDI, 5, 5, 12345},         /* x += 12345 */
        /*  9 */ {OP_ANDI, 5, 5, 0xffffff},      /* x &= 0xffffff */
        /* 10 */ {OP_ADDI, 1, 1, -1},            /* i-- */
        /* 11 */ {OP_BNEQ, 0, 1, 3},             /* if i goto loop */
        /* 12 */ {OP_HALT, 0, 0, 0},
    };
    /* The bytecode on a page of its own (the store profile trusts it), as interp_switch's. */
    struct insn *code = aligned_alloc(4096, 4096);
    if (!code)
        return 1;
    memcpy(code, prog, sizeof prog);
    long env[8] = {0};
    long result = metric_run(code, env);
    printf("calls: %ld\nresult: %ld\nx: %ld\n", size, result, env[5]);
    free(code);
    return 0;
}
#endif
