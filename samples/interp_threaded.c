/*
 * interp_threaded.c — the interp_switch program as direct-threaded code.
 *
 * What it exercises: threaded code (gforth's and many Forths' model).  The
 * bytecode holds handler addresses, not opcodes: every handler ends in
 * `goto *(ip++)->handler`, a load through the instruction pointer and an
 * indirect jump, with no table and no bounds check; branch operands are
 * absolute pointers into the code (the next ip is loaded from the code).
 * The threaded code is heap memory written once at start-up, on a page of
 * its own.  The Makefile builds it with -fno-crossjumping (see interp_goto.c).
 *
 * Usage:  interp_threaded [SIZE]     (SIZE = outer loop iterations)
 *   small size (tests):      1000000   -> stdout in interp_threaded.expected
 *   bench size:             20000000
 *   default when omitted:   the small size
 *
 * Hot function (exact C signature):
 *
 *   union cell { const void *handler; long imm; const union cell *target; };
 *   const void *const *threaded_run(const union cell *ip, long *env, long *result);
 *
 *   With ip == NULL returns the handler table (indexed by interp_switch's
 *   opcodes, OP_HALT..OP_JMP) and runs nothing.  Otherwise runs from ip until
 *   HALT, stores env[0] in *result and returns NULL.  Every instruction is 4
 *   cells: handler, res, op1, op2 (as in interp_switch); BNEQ and JMP hold
 *   their target cell pointer in op2.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

union cell {
    const void *handler;
    long imm;
    const union cell *target;
};

enum {
    OP_HALT, OP_MOVI, OP_MOV, OP_ADD, OP_SUB, OP_MUL, OP_ADDI, OP_XOR, OP_ANDI, OP_SHRI, OP_BNEQ, OP_JMP,
    OP_COUNT
};

enum { THREADED_ENV_SLOTS = 8, CELLS_PER_INSN = 4 };

__attribute__((noinline)) const void *const *threaded_run(const union cell *ip, long *env, long *result)
{
    static const void *const handlers[OP_COUNT] = {
        &&op_halt, &&op_movi, &&op_mov,  &&op_add,  &&op_sub,  &&op_mul,
        &&op_addi, &&op_xor,  &&op_andi, &&op_shri, &&op_bneq, &&op_jmp,
    };
    if (!ip)
        return handlers;
    const union cell *i;
/* i: the current instruction's cells; ip moves past them before the handler runs. */
#define NEXT()                                                                                               \
    do {                                                                                                     \
        i = ip;                                                                                              \
        ip += CELLS_PER_INSN;                                                                                \
        goto *i[0].handler;                                                                                  \
    } while (0)
#define RES env[i[1].imm]
#define A env[i[2].imm]
#define B env[i[3].imm]
    NEXT();
op_halt:
    *result = env[0];
    return NULL;
op_movi:
    RES = i[2].imm;
    NEXT();
op_mov:
    RES = A;
    NEXT();
op_add:
    RES = (long)((unsigned long)A + (unsigned long)B);
    NEXT();
op_sub:
    RES = (long)((unsigned long)A - (unsigned long)B);
    NEXT();
op_mul:
    RES = (long)((unsigned long)A * (unsigned long)B);
    NEXT();
op_addi:
    RES = (long)((unsigned long)A + (unsigned long)i[3].imm);
    NEXT();
op_xor:
    RES = A ^ B;
    NEXT();
op_andi:
    RES = A & i[3].imm;
    NEXT();
op_shri:
    RES = (long)((unsigned long)A >> (i[3].imm & 63));
    NEXT();
op_bneq:
    if (A != 0)
        ip = i[3].target;
    NEXT();
op_jmp:
    ip = i[3].target;
    NEXT();
#undef NEXT
#undef RES
#undef A
#undef B
}

/* interp_switch's demo program (same loop nest, same result), threaded: a page of its own, never written
 * after this. */
static union cell *demo_program(long size, size_t *n_insns)
{
    if (size < 0)
        size = 0;
    if (size > INT32_MAX)
        size = INT32_MAX;
    const long prog[][4] = {
        {OP_MOVI, 0, 0, 0},  {OP_MOVI, 1, size, 0}, {OP_MOVI, 5, 1, 0},  {OP_JMP, 0, 0, 15},
        {OP_MOVI, 2, 8, 0},  {OP_MUL, 3, 5, 2},   {OP_ADD, 0, 0, 3},    {OP_SHRI, 4, 0, 7},
        {OP_XOR, 5, 5, 4},   {OP_ADDI, 5, 5, 12345}, {OP_ANDI, 5, 5, 0xffffff}, {OP_ADDI, 2, 2, -1},
        {OP_BNEQ, 0, 2, 5},  {OP_SUB, 0, 0, 1},   {OP_ADDI, 1, 1, -1},  {OP_BNEQ, 0, 1, 4},
        {OP_MOV, 6, 5, 0},   {OP_HALT, 0, 0, 0},
    };
    size_t n = sizeof prog / sizeof prog[0];
    const void *const *handlers = threaded_run(NULL, NULL, NULL);
    void *mem = NULL;
    if (posix_memalign(&mem, 4096, 4096) != 0)
        return NULL;
    memset(mem, 0, 4096);
    union cell *code = mem;
    for (size_t k = 0; k < n; k++) {
        union cell *c = code + k * CELLS_PER_INSN;
        c[0].handler = handlers[prog[k][0]];
        c[1].imm = prog[k][1];
        c[2].imm = prog[k][2];
        if (prog[k][0] == OP_BNEQ || prog[k][0] == OP_JMP)
            c[3].target = code + prog[k][3] * CELLS_PER_INSN;
        else
            c[3].imm = prog[k][3];
    }
    *n_insns = n;
    return code;
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
    union cell *code = demo_program(size, &n);
    long *env = calloc(THREADED_ENV_SLOTS, sizeof *env);
    if (!code || !env) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    long r = 0;
    threaded_run(code, env, &r);
    printf("program: %zu instructions\n", n);
    printf("result: %ld\n", r);
    printf("x: %ld\n", env[6]);
    free(env);
    free(code);
    return 0;
}
#endif
