/*
 * interp_goto.c — the interp_switch bytecode run by computed goto with duplicated dispatch.
 *
 * What it exercises: the pattern of CPython's and many other interpreters'
 * fast paths.  `goto *labels[pc->op]` (a table of absolute label addresses in
 * .data.rel.ro) ends every handler, so gcc -O2 duplicates the indirect jump
 * into each handler's tail: there is no single dispatch point, and the pc
 * stays in a register across the loop.  The Makefile builds it with
 * -fno-crossjumping (as interpreters built for speed are), which keeps gcc
 * from merging the duplicated tails again: 12 indirect jumps, one per handler.  The bytecode is heap memory written
 * once at start-up on a page of its own.
 *
 * Usage:  interp_goto [SIZE]     (SIZE = outer loop iterations)
 *   small size (tests):      1000000   -> stdout in interp_goto.expected
 *   bench size:             20000000
 *   default when omitted:   the small size
 *
 * Hot function (exact C signature):
 *
 *   struct insn { int32_t op, res, op1, op2; };          // 16 bytes
 *   long goto_run(const struct insn *code, long *env);
 *
 *   Same instruction set and semantics as interp_switch.c's interp_run.
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
    OP_HALT, OP_MOVI, OP_MOV, OP_ADD, OP_SUB, OP_MUL, OP_ADDI, OP_XOR, OP_ANDI, OP_SHRI, OP_BNEQ, OP_JMP,
    OP_COUNT
};

enum { GOTO_ENV_SLOTS = 8 };

__attribute__((noinline)) long goto_run(const struct insn *code, long *env)
{
    static const void *const labels[OP_COUNT] = {
        &&op_halt, &&op_movi, &&op_mov,  &&op_add,  &&op_sub,  &&op_mul,
        &&op_addi, &&op_xor,  &&op_andi, &&op_shri, &&op_bneq, &&op_jmp,
    };
    const struct insn *pc = code;
    const struct insn *i;
/* Bounds-checked like a switch, so a bad opcode returns -1. */
#define DISPATCH()                                                                                           \
    do {                                                                                                     \
        i = pc++;                                                                                            \
        if ((uint32_t)i->op >= OP_COUNT)                                                                     \
            goto op_bad;                                                                                     \
        goto *labels[i->op];                                                                                 \
    } while (0)
    DISPATCH();
op_halt:
    return env[0];
op_movi:
    env[i->res] = (long)i->op1;
    DISPATCH();
op_mov:
    env[i->res] = env[i->op1];
    DISPATCH();
op_add:
    env[i->res] = (long)((unsigned long)env[i->op1] + (unsigned long)env[i->op2]);
    DISPATCH();
op_sub:
    env[i->res] = (long)((unsigned long)env[i->op1] - (unsigned long)env[i->op2]);
    DISPATCH();
op_mul:
    env[i->res] = (long)((unsigned long)env[i->op1] * (unsigned long)env[i->op2]);
    DISPATCH();
op_addi:
    env[i->res] = (long)((unsigned long)env[i->op1] + (unsigned long)(long)i->op2);
    DISPATCH();
op_xor:
    env[i->res] = env[i->op1] ^ env[i->op2];
    DISPATCH();
op_andi:
    env[i->res] = env[i->op1] & (long)i->op2;
    DISPATCH();
op_shri:
    env[i->res] = (long)((unsigned long)env[i->op1] >> (i->op2 & 63));
    DISPATCH();
op_bneq:
    if (env[i->op1] != 0)
        pc = code + i->op2;
    DISPATCH();
op_jmp:
    pc = code + i->op2;
    DISPATCH();
op_bad:
    return -1;
#undef DISPATCH
}

/* interp_switch's demo program (same loop nest, same result). */
static struct insn *demo_program(long size, size_t *n_insns)
{
    if (size < 0)
        size = 0;
    if (size > INT32_MAX)
        size = INT32_MAX;
    const struct insn prog[] = {
        {OP_MOVI, 0, 0, 0},  {OP_MOVI, 1, (int32_t)size, 0}, {OP_MOVI, 5, 1, 0},  {OP_JMP, 0, 0, 15},
        {OP_MOVI, 2, 8, 0},  {OP_MUL, 3, 5, 2},   {OP_ADD, 0, 0, 3},    {OP_SHRI, 4, 0, 7},
        {OP_XOR, 5, 5, 4},   {OP_ADDI, 5, 5, 12345}, {OP_ANDI, 5, 5, 0xffffff}, {OP_ADDI, 2, 2, -1},
        {OP_BNEQ, 0, 2, 5},  {OP_SUB, 0, 0, 1},   {OP_ADDI, 1, 1, -1},  {OP_BNEQ, 0, 1, 4},
        {OP_MOV, 6, 5, 0},   {OP_HALT, 0, 0, 0},
    };
    /* A page of its own, never written after this. */
    void *mem = NULL;
    if (posix_memalign(&mem, 4096, 4096) != 0)
        return NULL;
    memset(mem, 0, 4096);
    memcpy(mem, prog, sizeof prog);
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
    struct insn *code = demo_program(size, &n);
    long *env = calloc(GOTO_ENV_SLOTS, sizeof *env);
    if (!code || !env) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    long r = goto_run(code, env);
    printf("program: %zu instructions\n", n);
    printf("result: %ld\n", r);
    printf("x: %ld\n", env[6]);
    free(env);
    free(code);
    return 0;
}
#endif
