/*
 * serve_loop.c — a long-running "server": serves requests until its stdin closes.
 *
 * What it exercises: `dynspec attach` on a process that cannot be restarted.  Each request runs the same
 * bytecode program (heap, a page of its own, written once) through a switch interpreter on a fresh env and
 * checks the answer against the first request's; the server stops once it has served at least SIZE requests
 * and its stdin is at end of file (checked with poll() between requests, so nothing else changes its memory
 * map while it runs).  Its output does not depend on how many requests it served, so a test can attach,
 * specialize and detach many times and still compare the output with a native run.
 *
 * Usage:  serve_loop [SIZE]     (SIZE = minimum number of requests)
 *   small size (tests):      50   -> stdout in serve_loop.expected
 *   bench size:              1000
 *   default when omitted:    the small size
 *   With stdin at /dev/null it serves exactly SIZE requests; with a pipe, until the writer closes it.
 *
 * Hot function (exact C signature):
 *
 *   struct insn { int32_t op, res, op1, op2; };          // 16 bytes
 *   long serve_run(const struct insn *code, long *env);
 *
 *   The interp_switch interpreter (same opcodes, see interp_switch.c): runs from code[0] until OP_HALT and
 *   returns env[0].
 *
 * Exit status 0; 1 (with a line on stderr naming the request) if a request's answer differs from the first's.
 */
#include <errno.h>
#include <poll.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

struct insn {
    int32_t op, res, op1, op2;
};

enum { OP_HALT, OP_MOVI, OP_MOV, OP_ADD, OP_SUB, OP_MUL, OP_ADDI, OP_XOR, OP_ANDI, OP_SHRI, OP_BNEQ, OP_JMP };
enum { ENV_SLOTS = 8, ITERATIONS = 20000 };

__attribute__((noinline)) long serve_run(const struct insn *code, long *env)
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

/* Whether stdin is at end of file (never blocks: poll with timeout 0, then one read of what is there). */
static int stdin_closed(void)
{
    struct pollfd p = {.fd = 0, .events = POLLIN};
    int n = poll(&p, 1, 0);
    if (n < 0)
        return errno != EINTR;
    if (n == 0)
        return 0;
    if (p.revents & POLLIN) {
        char buf[256];
        ssize_t r = read(0, buf, sizeof buf);
        return r == 0 || (r < 0 && errno != EINTR && errno != EAGAIN);
    }
    return (p.revents & (POLLHUP | POLLERR | POLLNVAL)) != 0;
}

#ifndef DYNSPEC_NO_MAIN
int main(int argc, char **argv)
{
    long size = 50;
    if (argc > 1) {
        char *end = NULL;
        size = strtol(argv[1], &end, 10);
        if (end == argv[1] || *end != '\0' || size < 1) {
            fprintf(stderr, "usage: %s [SIZE]\n", argv[0]);
            return 2;
        }
    }
    const struct insn prog[] = {
        {OP_MOVI, 0, 0, 0},          {OP_MOVI, 1, ITERATIONS, 0}, {OP_MOVI, 5, 1, 0},
        {OP_JMP, 0, 0, 15},          {OP_MOVI, 2, 8, 0},          {OP_MUL, 3, 5, 2},
        {OP_ADD, 0, 0, 3},           {OP_SHRI, 4, 0, 7},          {OP_XOR, 5, 5, 4},
        {OP_ADDI, 5, 5, 12345},      {OP_ANDI, 5, 5, 0xffffff},   {OP_ADDI, 2, 2, -1},
        {OP_BNEQ, 0, 2, 5},          {OP_SUB, 0, 0, 1},           {OP_ADDI, 1, 1, -1},
        {OP_BNEQ, 0, 1, 4},          {OP_MOV, 6, 5, 0},           {OP_HALT, 0, 0, 0},
    };
    /* Page-aligned heap memory of their own: the bytecode page is never written after this. */
    struct insn *code = NULL;
    long *env = NULL;
    if (posix_memalign((void **)&code, 4096, 4096) != 0 || posix_memalign((void **)&env, 4096, 4096) != 0) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    memset(code, 0, 4096);
    memcpy(code, prog, sizeof prog);
    long first = 0, first_x = 0;
    int closed = 0;
    for (long n = 0; n < size || !closed; n++) {
        memset(env, 0, ENV_SLOTS * sizeof *env);
        long r = serve_run(code, env);
        if (n == 0) {
            first = r;
            first_x = env[6];
        } else if (r != first || env[6] != first_x) {
            fprintf(stderr, "request %ld: got %ld (x %ld), the first request got %ld (x %ld)\n", n, r, env[6],
                    first, first_x);
            return 1;
        }
        if (!closed)
            closed = stdin_closed();
    }
    printf("result: %ld\nx: %ld\nevery request agreed\n", first, first_x);
    return 0;
}
#endif
