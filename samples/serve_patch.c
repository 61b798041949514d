/*
 * serve_patch.c — serve_loop (see serve_loop.c) whose bytecode is rewritten once, when told to.
 *
 * What it exercises: `dynspec attach` during an invalidation.  It serves requests like serve_loop until its
 * stdin is at end of file; the first 'p' read on stdin (or end of file, if no 'p' came) rewrites one constant of
 * the bytecode (the outer loop count, ITERATIONS -> ITERATIONS / 2) in the page the interpreter reads, which a
 * variant specialized on the bytecode relies on.  Each request's answer is checked against the first one of its
 * phase (before / after the rewrite); at the end it serves one request more after the rewrite, so the output
 * does not depend on when the rewrite came or how many requests were served.
 *
 * Usage:  serve_patch [SIZE]     (SIZE = minimum number of requests)
 *   small size (tests):      50   -> stdout in serve_patch.expected
 *   bench size:              1000
 *   default when omitted:    the small size
 *
 * Hot function (exact C signature): long serve_run(const struct insn *code, long *env);  as in serve_loop.c.
 *
 * Exit status 0; 1 (with a line on stderr naming the request) if a request's answer differs from its phase's
 * first.
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

/* What stdin says, without blocking: 0 nothing, 1 a 'p' came, 2 end of file. */
static int stdin_says(void)
{
    struct pollfd p = {.fd = 0, .events = POLLIN};
    int n = poll(&p, 1, 0);
    if (n < 0)
        return errno != EINTR ? 2 : 0;
    if (n == 0)
        return 0;
    if (p.revents & POLLIN) {
        char buf[256];
        ssize_t r = read(0, buf, sizeof buf);
        if (r == 0 || (r < 0 && errno != EINTR && errno != EAGAIN))
            return 2;
        return r > 0 && memchr(buf, 'p', (size_t)r) != NULL;
    }
    return (p.revents & (POLLHUP | POLLERR | POLLNVAL)) != 0 ? 2 : 0;
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
    /* Page-aligned heap memory of their own: the bytecode page is written only by the rewrite. */
    struct insn *code = NULL;
    long *env = NULL;
    if (posix_memalign((void **)&code, 4096, 4096) != 0 || posix_memalign((void **)&env, 4096, 4096) != 0) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    memset(code, 0, 4096);
    memcpy(code, prog, sizeof prog);
    long first[2] = {0, 0}, first_x[2] = {0, 0}, served[2] = {0, 0};
    int closed = 0, phase = 0;
    for (long n = 0; n < size || !closed || served[1] == 0; n++) {
        memset(env, 0, ENV_SLOTS * sizeof *env);
        long r = serve_run(code, env);
        if (served[phase] == 0) {
            first[phase] = r;
            first_x[phase] = env[6];
        } else if (r != first[phase] || env[6] != first_x[phase]) {
            fprintf(stderr, "request %ld (phase %d): got %ld (x %ld), the phase's first got %ld (x %ld)\n", n, phase,
                    r, env[6], first[phase], first_x[phase]);
            return 1;
        }
        served[phase]++;
        int says = closed ? 2 : stdin_says();
        if (says == 2)
            closed = 1;
        if (phase == 0 && (says == 1 || (closed && n + 1 >= size))) {
            /* The rewrite: a plain store into the bytecode page. */
            code[1].op1 = ITERATIONS / 2;
            phase = 1;
        }
    }
    printf("before: %ld (x %ld)\nafter: %ld (x %ld)\nevery request agreed\n", first[0], first_x[0], first[1],
           first_x[1]);
    return 0;
}
#endif
