/*
 * late_start.c — a long hot start-up phase with nothing to specialize, then a switch interpreter.
 *
 * What it exercises: periodic re-profiling.  dynspec profiles and plans early
 * in the run, while only phase 1 is hot; phase 1 gives it nothing worth
 * specializing.  The interpreter of phase 2 starts later and must be found by
 * a later look at the program (after a pause of sampling), then specialized.
 * Phases (SIZE scales both; phase 1 takes ~45% of the run, phase 2 ~55%):
 *
 *   1. SIZE/400 rounds of late_hash over a 4096-word buffer: each round fills
 *      the buffer with fresh xorshift data and hashes it with data-dependent
 *      rotates, branches and loads.  No constant memory is read, no value
 *      that steers control flow repeats, and it is not an interpreter.
 *   2. interp_switch's demo program (SIZE outer iterations) on late_interp_run,
 *      a copy of interp_run.  Its bytecode is built when phase 2 starts, on a
 *      fresh writable page of its own that the first store profile never saw
 *      (a later look must trust it behind a guard to specialize anything).
 *
 * Usage:  late_start [SIZE]     (SIZE = interpreter outer loop iterations)
 *   small size (tests):      1000000   -> stdout in late_start.expected (~0.2 s natively)
 *   bench size:             30000000   (~2 s of phase 1, then ~2.4 s of phase 2 natively; used by
 *                                       tests/specialize.rs)
 *   default when omitted:   the small size
 *
 * Hot functions (exact C signatures):
 *
 *   uint64_t late_hash(uint64_t *buf, size_t n, uint64_t seed);
 *     fills buf[0..n) from seed and returns a hash of it; n must be a power of two.
 *
 *   struct insn { int32_t op, res, op1, op2; };          // 16 bytes
 *   long late_interp_run(const struct insn *code, long *env);
 *     same ABI, opcodes and semantics as interp_run in interp_switch.c.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

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

enum { ENV_SLOTS = 8, HASH_WORDS = 4096, HASH_ROUND_DIVISOR = 400, PAGE = 4096 };

__attribute__((noinline)) uint64_t late_hash(uint64_t *buf, size_t n, uint64_t seed)
{
    uint64_t x = seed | 1; /* xorshift64 must not start at 0 */
    for (size_t i = 0; i < n; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf[i] = x;
    }
    uint64_t h = seed;
    for (size_t i = 0; i < n; i++) {
        uint64_t v = buf[i];
        h = (h ^ v) * 0x9e3779b97f4a7c15ull;
        unsigned r = (unsigned)(v & 63);
        h = (h << r) | (h >> ((64 - r) & 63));
        if (v & 0x100)
            h += v >> 3;
        else
            h ^= v << 5;
        /* A load whose address depends on the data: hot reads, but of memory written every round. */
        h ^= buf[(v ^ h) & (n - 1)];
    }
    return h;
}

__attribute__((noinline)) long late_interp_run(const struct insn *code, long *env)
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
/* interp_switch's demo program: a loop nest mixing an accumulator (r0) with a small pseudo-random state (r5);
 * r1 counts the outer loop down from `size`. */
static struct insn *late_program(long size, size_t *n_insns)
{
    if (size > INT32_MAX)
        size = INT32_MAX;
    const struct insn prog[] = {
        /*  0 */ {OP_MOVI, 0, 0, 0},             /* acc = 0 */
        /*  1 */ {OP_MOVI, 1, (int32_t)size, 0}, /* i = size */
        /*  2 */ {OP_MOVI, 5, 1, 0},             /* x = 1 */
        /*  3 */ {OP_JMP, 0, 0, 15},             /* goto check */
        /*  4 */ {OP_MOVI, 2, 8, 0},             /* body: j = 8 */
        /*  5 */ {OP_MUL, 3, 5, 2},              /* inner: t = x * j */
        /*  6 */ {OP_ADD, 0, 0, 3},              /* acc += t */
        /*  7 */ {OP_SHRI, 4, 0, 7},             /* u = acc >> 7 */
        /*  8 */ {OP_XOR, 5, 5, 4},              /* x ^= u */
        /*  9 */ {OP_ADDI, 5, 5, 12345},         /* x += 12345 */
        /* 10 */ {OP_ANDI, 5, 5, 0xffffff},      /* x &= 0xffffff */
        /* 11 */ {OP_ADDI, 2, 2, -1},            /* j-- */
        /* 12 */ {OP_BNEQ, 0, 2, 5},             /* if j goto inner */
        /* 13 */ {OP_SUB, 0, 0, 1},              /* acc -= i */
        /* 14 */ {OP_ADDI, 1, 1, -1},            /* i-- */
        /* 15 */ {OP_BNEQ, 0, 1, 4},             /* check: if i goto body */
        /* 16 */ {OP_MOV, 6, 5, 0},              /* r6 = x */
        /* 17 */ {OP_HALT, 0, 0, 0},
    };
    /* A fresh writable mapping of its own: it reuses no page the program wrote (or dynspec watched) before. */
    void *mem = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return NULL;
    memcpy(mem, prog, sizeof prog);
    *n_insns = sizeof prog / sizeof prog[0];
    return mem;
}

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

    /* Phase 1: start-up work that is hot but has nothing to specialize. */
    uint64_t *buf = malloc(HASH_WORDS * sizeof *buf);
    if (!buf) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    long rounds = size / HASH_ROUND_DIVISOR;
    uint64_t h = 0;
    for (long r = 0; r < rounds; r++)
        h ^= late_hash(buf, HASH_WORDS, h + (uint64_t)r);
    free(buf);
    printf("phase 1: %ld rounds, hash %016llx\n", rounds, (unsigned long long)h);
    fflush(stdout);

    /* Phase 2: the interpreter, only now. */
    size_t n = 0;
    struct insn *code = late_program(size, &n);
    long *env = calloc(ENV_SLOTS, sizeof *env);
    if (!code || !env) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    long result = late_interp_run(code, env);
    printf("phase 2: %zu instructions, result %ld, x %ld\n", n, result, env[6]);
    free(env);
    munmap(code, PAGE);
    return 0;
}
#endif
