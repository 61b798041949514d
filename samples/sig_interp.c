/*
 * sig_interp.c — a switch interpreter whose SIGSEGV handler rewrites env slots in the middle of a bytecode.
 *
 * What it exercises: store forwarding safety across signal handlers.  A
 * variant that forwards stores keeps env[] values it just stored or loaded
 * in registers instead of reloading them.  Here the bytecode stores env[2]
 * (a) and loads env[7] (p), then loads through p into a page that is
 * PROT_NONE.  The SIGSEGV handler makes that page readable and rewrites
 * env[7] (p moves to the same offset one page on, also PROT_NONE, so the
 * next iteration faults again) and env[2]; the interrupted load restarts
 * with the old p still in its register, as it does natively.  The next
 * bytecodes read env[7] and env[2] again and must see the handler's values.
 * A thread must therefore be moved out of any forwarding variant before its
 * handler runs: a variant that kept p or a in a register computes another
 * checksum.
 *
 * main calls sig_run once per round of 10000 iterations; before each round
 * it writes new values into the pages and makes the first 4 of them
 * PROT_NONE, so exactly 4 faults happen per round (in its first 4
 * iterations), all through the run.  Only offsets from the page base enter
 * the arithmetic: no address reaches the output.
 *
 * Usage:  sig_interp [SIZE]     (SIZE = total loop iterations, in rounds of 10000)
 *   small size (tests):     20000000   -> stdout in sig_interp.expected (8000 faults)
 *   bench size:            100000000
 *   default when omitted:   the small size
 *
 * Hot function (exact C signature; same ABI and opcodes as interp_switch.c plus OP_LOADP):
 *
 *   struct insn { int32_t op, res, op1, op2; };          // 16 bytes
 *   long sig_run(const struct insn *code, long *env);
 *
 *   OP_LOADP   12    env[res] = *(const long *)env[op1]   (a load through a pointer held in env)
 *
 *   The program reads its iteration count from env[1], its state from
 *   env[5], the page base from env[6] and its pointer from env[7] (the
 *   caller sets them); it returns env[0] and leaves the state in env[5].
 */
#define _GNU_SOURCE
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

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
    OP_LOADP = 12,
};

enum { ENV_SLOTS = 9 };

__attribute__((noinline)) long sig_run(const struct insn *code, long *env)
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
        case OP_LOADP:
            /* volatile: the load may fault and be restarted after the handler; it must stay a real load. */
            env[i->res] = *(const volatile long *)env[i->op1];
            break;
        default:
            return -1;
        }
    }
}

#ifndef DYNSPEC_NO_MAIN
enum { PAGE = 4096, ROUND = 10000, FAULTING = 4 };

static struct insn *sig_program(size_t *n_insns)
{
    const struct insn prog[] = {
        /*  0 */ {OP_MOVI, 0, 0, 0},        /* acc = 0 */
        /*  1 */ {OP_JMP, 0, 0, 13},        /* goto check */
        /*  2 */ {OP_ADDI, 2, 5, 7},        /* body: a = x + 7          (stored to env[2]) */
        /*  3 */ {OP_LOADP, 3, 7, 0},       /* b = *p                   (may fault: the handler moves p on) */
        /*  4 */ {OP_ADD, 4, 3, 7},         /* c = b + p                (p reloaded after the fault) */
        /*  5 */ {OP_SUB, 4, 4, 6},         /* c -= base                (an offset: no address in the output) */
        /*  6 */ {OP_ADD, 4, 4, 2},         /* c += a                   (a reloaded after the fault) */
        /*  7 */ {OP_ADD, 0, 0, 4},         /* acc += c */
        /*  8 */ {OP_SHRI, 8, 0, 5},        /* t = acc >> 5 */
        /*  9 */ {OP_XOR, 5, 5, 8},         /* x ^= t */
        /* 10 */ {OP_ADD, 5, 5, 3},         /* x += b */
        /* 11 */ {OP_ANDI, 5, 5, 0xffffff}, /* x &= 0xffffff */
        /* 12 */ {OP_ADDI, 1, 1, -1},       /* i-- */
        /* 13 */ {OP_BNEQ, 0, 1, 2},        /* check: if i goto body */
        /* 14 */ {OP_HALT, 0, 0, 0},
    };
    /* A page of its own: the bytecode must not share a page with data written while it runs. */
    void *mem = NULL;
    if (posix_memalign(&mem, PAGE, PAGE) != 0)
        return NULL;
    memset(mem, 0, PAGE);
    memcpy(mem, prog, sizeof prog);
    *n_insns = sizeof prog / sizeof prog[0];
    return mem;
}

/* FAULTING pages that are PROT_NONE at the start of every round, then one that stays readable. */
static char *pages;
static long *volatile handler_env; /* the env the handler writes */
static volatile long faults;       /* handled faults so far */

static void on_segv(int sig, siginfo_t *info, void *uctx)
{
    (void)uctx;
    char *addr = info->si_addr;
    if (addr < pages || addr >= pages + FAULTING * PAGE) {
        /* Not ours: fall back to the default action; returning re-executes the access and the program dies of it. */
        signal(sig, SIG_DFL);
        return;
    }
    char *page = pages + (addr - pages) / PAGE * PAGE;
    if (mprotect(page, PAGE, PROT_READ | PROT_WRITE) != 0) {
        static const char msg[] = "sig_interp: mprotect in the handler failed\n";
        ssize_t w = write(2, msg, sizeof msg - 1);
        (void)w;
        _exit(1);
    }
    faults++;
    /* The interrupted bytecode already holds p in a register and restarts its load from this page; the following
     * bytecodes must see the new p (the same offset one page on) and the new a, which were both in env[] before. */
    handler_env[7] = (long)(addr + PAGE);
    handler_env[2] = 1000003L * faults + 17;
}

int main(int argc, char **argv)
{
    long size = 20000000;
    if (argc > 1) {
        char *end = NULL;
        size = strtol(argv[1], &end, 10);
        if (end == argv[1] || *end != '\0' || size < 0) {
            fprintf(stderr, "usage: %s [SIZE]\n", argv[0]);
            return 2;
        }
    }
    size_t n = 0;
    struct insn *code = sig_program(&n);
    long *env = calloc(ENV_SLOTS, sizeof *env);
    void *map = mmap(NULL, (FAULTING + 1) * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (!code || !env || map == MAP_FAILED) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    pages = map;
    handler_env = env;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_segv;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSEGV, &sa, NULL) != 0) {
        perror("sigaction");
        return 1;
    }

    long rounds = size / ROUND;
    unsigned long sum = 0;
    long state = 1;
    const size_t words = PAGE / sizeof(long);
    for (long r = 0; r < rounds; r++) {
        /* New values behind the pointers each round, then no access to the first pages until the handler allows. */
        size_t off = (size_t)r % words;
        for (int j = 0; j <= FAULTING; j++)
            ((long *)(pages + j * PAGE))[off] = r * 7 + j * 1000;
        if (mprotect(pages, FAULTING * PAGE, PROT_NONE) != 0) {
            perror("mprotect");
            return 1;
        }
        memset(env, 0, ENV_SLOTS * sizeof *env);
        env[1] = ROUND;
        env[5] = state;
        env[6] = (long)pages;
        env[7] = (long)(pages + off * sizeof(long));
        long acc = sig_run(code, env);
        state = env[5];
        sum = sum * 31 + (unsigned long)acc;
    }
    printf("program: %zu instructions\n", n);
    printf("rounds: %ld of %d iterations\n", rounds, ROUND);
    printf("faults: %ld\n", faults);
    printf("state: %ld\n", state);
    printf("checksum: %lu\n", sum);
    munmap(map, (FAULTING + 1) * PAGE);
    free(env);
    free(code);
    return 0;
}
#endif
