/*
 * interp_spill.c — interp_switch's interpreter with its bytecode pc in a stack slot.
 *
 * What it exercises: a pc that lives in memory, not in a register, across the
 * dispatch loop (CPython's frame instruction index, Lua's savedpc).  The pc
 * is an index in a frame on the stack whose address is published in a
 * global before the loop (spill_current), so any store of a long (every
 * env[] write) may write it: gcc -O2 keeps it in its stack slot, and every
 * dispatch loads it from [rsp+N], and stores it back advanced (check with
 * objdump -d: no register holds pc from one dispatch to the next).  Bytecode
 * as in interp_switch: heap, written once, a page of its own.
 *
 * Usage:  interp_spill [SIZE]     (SIZE = outer loop iterations)
 *   small size (tests):      1000000   -> stdout in interp_spill.expected
 *   bench size:             20000000
 *   default when omitted:   the small size
 *
 * Hot function (exact C signature):
 *
 *   struct insn { int32_t op, res, op1, op2; };          // 16 bytes
 *   long spill_run(const struct insn *code, long *env);
 *
 *   interp_switch's interp_run (same instructions and semantics); while it
 *   runs, `struct spill_frame *spill_current` points to its frame
 *   { long pc; const struct insn *code; } (NULL otherwise).
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

enum { SPILL_ENV_SLOTS = 8 };

/* The interpreter's frame, on spill_run's stack: the pc is an instruction index, a long like the VM's
 * registers. */
struct spill_frame {
    long pc;
    const struct insn *code;
};

/* The running frame, for a debugger or a profiler to read (as CPython's and Lua's frames are reachable from
 * their thread state).  spill_enter publishes it and hands back the register file; that is what keeps the pc
 * in memory: gcc cannot tell that the env pointer it returns does not point into the frame, so every store to
 * an env[] register (a long) may be a store to frame.pc, and the pc is reloaded from its stack slot after
 * each one. */
struct spill_frame *spill_current;

__attribute__((noinline)) long *spill_enter(struct spill_frame *f, long *env)
{
    spill_current = f;
    return env;
}

__attribute__((noinline)) long spill_run(const struct insn *code, long *env_in)
{
    struct spill_frame frame = {0, code};
    long *env = spill_enter(&frame, env_in);
    long r;
    for (;;) {
        const struct insn *i = &code[frame.pc];
        frame.pc++;
        switch (i->op) {
        case OP_HALT:
            r = env[0];
            goto out;
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
                frame.pc = i->op2;
            break;
        case OP_JMP:
            frame.pc = i->op2;
            break;
        default:
            r = -1;
            goto out;
        }
    }
out:
    spill_current = NULL;
    return r;
}

/* interp_switch's demo program: a loop nest mixing an accumulator (r0) with a small
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
    long *env = calloc(SPILL_ENV_SLOTS, sizeof *env);
    if (!code || !env) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    long r = spill_run(code, env);
    printf("program: %zu instructions\n", n);
    printf("result: %ld\n", r);
    printf("x: %ld\n", env[6]);
    free(env);
    free(code);
    return 0;
}
#endif
