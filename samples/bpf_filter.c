/*
 * bpf_filter.c — classic-BPF-style packet filter interpreter.
 *
 * What it exercises: a second interpreter shape.  The filter program (heap,
 * written once) is the predictable value; opcodes are sparse kernel-style
 * codes dispatched by a switch, loads from the packet are bounds-checked,
 * conditional jumps carry jt/jf offsets.  Specializing bpf_run for a known
 * `prog` folds dispatch, offsets and constants, leaving only packet loads,
 * compares and the bounds checks that depend on `len`.
 *
 * Usage:  bpf_filter [SIZE]     (SIZE = number of packets filtered)
 *   small size (tests):      5000000   -> stdout in bpf_filter.expected
 *   bench size:            100000000
 *   default when omitted:   the small size
 *
 * Hot function (exact C signature, stable ABI for the specializer tests):
 *
 *   struct bpf_insn { uint16_t code; uint8_t jt, jf; uint32_t k; };  // 8 bytes
 *   uint32_t bpf_run(const struct bpf_insn *prog, const uint8_t *pkt, uint32_t len);
 *
 *   Semantics follow Linux classic BPF (linux/filter.h, linux/bpf_common.h
 *   codes): accumulator A, index X, scratch M[16], all uint32_t, initially 0.
 *   Packet loads are big-endian; a load with any byte outside [0, len)
 *   ends the filter with return value 0, as the kernel does.  Jumps are
 *   relative: pc += 1 + (cond ? jt : jf) (JA: pc += 1 + k).  Shift counts
 *   are masked to 0..31; division by zero returns 0.  The program is
 *   trusted (no verifier): an unknown code returns 0, and so does running
 *   off the end (there is none if the program ends in RET).
 *
 *   code   name                 semantics
 *   0x20   LD  W ABS            A = be32(pkt[k])
 *   0x28   LD  H ABS            A = be16(pkt[k])
 *   0x30   LD  B ABS            A = pkt[k]
 *   0x40   LD  W IND            A = be32(pkt[X+k])
 *   0x48   LD  H IND            A = be16(pkt[X+k])
 *   0x50   LD  B IND            A = pkt[X+k]
 *   0x80   LD  W LEN            A = len
 *   0x00   LD  IMM              A = k
 *   0x60   LD  MEM              A = M[k & 15]
 *   0x01   LDX IMM              X = k
 *   0x61   LDX MEM              X = M[k & 15]
 *   0x81   LDX LEN              X = len
 *   0xb1   LDX B MSH            X = 4 * (pkt[k] & 0xf)
 *   0x02   ST                   M[k & 15] = A
 *   0x03   STX                  M[k & 15] = X
 *   0x04 / 0x0c   ALU ADD K / X   A += k / X
 *   0x14 / 0x1c   ALU SUB K / X   A -= k / X
 *   0x24 / 0x2c   ALU MUL K / X   A *= k / X
 *   0x34 / 0x3c   ALU DIV K / X   A /= k / X  (0 divisor: return 0)
 *   0x54 / 0x5c   ALU AND K / X   A &= k / X
 *   0x44 / 0x4c   ALU OR  K / X   A |= k / X
 *   0xa4 / 0xac   ALU XOR K / X   A ^= k / X
 *   0x64 / 0x6c   ALU LSH K / X   A <<= (k / X) & 31
 *   0x74 / 0x7c   ALU RSH K / X   A >>= (k / X) & 31
 *   0x84          ALU NEG         A = -A
 *   0x05   JMP JA               pc += k
 *   0x15 / 0x1d   JEQ K / X     A == k / X
 *   0x25 / 0x2d   JGT K / X     A >  k / X
 *   0x35 / 0x3d   JGE K / X     A >= k / X
 *   0x45 / 0x4d   JSET K / X    A & k / X
 *   0x06   RET K                return k
 *   0x16   RET A                return A
 *   0x07   MISC TAX             X = A
 *   0x87   MISC TXA             A = X
 *
 * Also exported (not part of the hot path, for in-process tests):
 *   struct bpf_insn *bpf_demo_filter(uint32_t *n_insns);
 *     the filter main runs (page-aligned heap buffer, free() it);
 *   uint32_t bpf_demo_packet(uint64_t *rng_state, uint8_t *buf);
 *     writes one synthetic Ethernet frame (<= BPF_DEMO_MAX_PKT = 128 bytes)
 *     into buf, returns its length; rng_state must start non-zero.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct bpf_insn {
    uint16_t code;
    uint8_t jt, jf;
    uint32_t k;
};

enum { BPF_DEMO_MAX_PKT = 128 };

/* Opcode values, named like linux/filter.h combinations. */
enum {
    LD_W_ABS = 0x20, LD_H_ABS = 0x28, LD_B_ABS = 0x30,
    LD_W_IND = 0x40, LD_H_IND = 0x48, LD_B_IND = 0x50,
    LD_W_LEN = 0x80, LD_IMM = 0x00, LD_MEM = 0x60,
    LDX_IMM = 0x01, LDX_MEM = 0x61, LDX_LEN = 0x81, LDX_B_MSH = 0xb1,
    ST = 0x02, STX = 0x03,
    ALU_ADD_K = 0x04, ALU_ADD_X = 0x0c, ALU_SUB_K = 0x14, ALU_SUB_X = 0x1c,
    ALU_MUL_K = 0x24, ALU_MUL_X = 0x2c, ALU_DIV_K = 0x34, ALU_DIV_X = 0x3c,
    ALU_AND_K = 0x54, ALU_AND_X = 0x5c, ALU_OR_K = 0x44, ALU_OR_X = 0x4c,
    ALU_XOR_K = 0xa4, ALU_XOR_X = 0xac, ALU_LSH_K = 0x64, ALU_LSH_X = 0x6c,
    ALU_RSH_K = 0x74, ALU_RSH_X = 0x7c, ALU_NEG = 0x84,
    JMP_JA = 0x05, JMP_JEQ_K = 0x15, JMP_JEQ_X = 0x1d, JMP_JGT_K = 0x25,
    JMP_JGT_X = 0x2d, JMP_JGE_K = 0x35, JMP_JGE_X = 0x3d, JMP_JSET_K = 0x45,
    JMP_JSET_X = 0x4d,
    RET_K = 0x06, RET_A = 0x16,
    MISC_TAX = 0x07, MISC_TXA = 0x87,
};

__attribute__((noinline)) uint32_t bpf_run(const struct bpf_insn *prog, const uint8_t *pkt,
                                           uint32_t len)
{
    uint32_t A = 0, X = 0, M[16] = {0};
    const struct bpf_insn *pc = prog;
    for (;;) {
        const struct bpf_insn *i = pc++;
        uint32_t k = i->k, off;
        switch (i->code) {
        case LD_W_ABS:
            off = k;
            goto ld_w;
        case LD_W_IND:
            off = X + k;
        ld_w:
            /* Written so that off near UINT32_MAX cannot wrap past the check. */
            if (off >= len || len - off < 4)
                return 0;
            A = (uint32_t)pkt[off] << 24 | (uint32_t)pkt[off + 1] << 16 |
                (uint32_t)pkt[off + 2] << 8 | pkt[off + 3];
            break;
        case LD_H_ABS:
            off = k;
            goto ld_h;
        case LD_H_IND:
            off = X + k;
        ld_h:
            if (off >= len || len - off < 2)
                return 0;
            A = (uint32_t)pkt[off] << 8 | pkt[off + 1];
            break;
        case LD_B_ABS:
            off = k;
            goto ld_b;
        case LD_B_IND:
            off = X + k;
        ld_b:
            if (off >= len)
                return 0;
            A = pkt[off];
            break;
        case LD_W_LEN: A = len; break;
        case LD_IMM: A = k; break;
        case LD_MEM: A = M[k & 15]; break;
        case LDX_IMM: X = k; break;
        case LDX_MEM: X = M[k & 15]; break;
        case LDX_LEN: X = len; break;
        case LDX_B_MSH:
            if (k >= len)
                return 0;
            X = 4u * (pkt[k] & 0xfu);
            break;
        case ST: M[k & 15] = A; break;
        case STX: M[k & 15] = X; break;
        case ALU_ADD_K: A += k; break;
        case ALU_ADD_X: A += X; break;
        case ALU_SUB_K: A -= k; break;
        case ALU_SUB_X: A -= X; break;
        case ALU_MUL_K: A *= k; break;
        case ALU_MUL_X: A *= X; break;
        case ALU_DIV_K:
            if (k == 0)
                return 0;
            A /= k;
            break;
        case ALU_DIV_X:
            if (X == 0)
                return 0;
            A /= X;
            break;
        case ALU_AND_K: A &= k; break;
        case ALU_AND_X: A &= X; break;
        case ALU_OR_K: A |= k; break;
        case ALU_OR_X: A |= X; break;
        case ALU_XOR_K: A ^= k; break;
        case ALU_XOR_X: A ^= X; break;
        case ALU_LSH_K: A <<= (k & 31); break;
        case ALU_LSH_X: A <<= (X & 31); break;
        case ALU_RSH_K: A >>= (k & 31); break;
        case ALU_RSH_X: A >>= (X & 31); break;
        case ALU_NEG: A = 0u - A; break;
        case JMP_JA: pc += k; break;
        case JMP_JEQ_K: pc += (A == k) ? i->jt : i->jf; break;
        case JMP_JEQ_X: pc += (A == X) ? i->jt : i->jf; break;
        case JMP_JGT_K: pc += (A > k) ? i->jt : i->jf; break;
        case JMP_JGT_X: pc += (A > X) ? i->jt : i->jf; break;
        case JMP_JGE_K: pc += (A >= k) ? i->jt : i->jf; break;
        case JMP_JGE_X: pc += (A >= X) ? i->jt : i->jf; break;
        case JMP_JSET_K: pc += (A & k) ? i->jt : i->jf; break;
        case JMP_JSET_X: pc += (A & X) ? i->jt : i->jf; break;
        case RET_K: return k;
        case RET_A: return A;
        case MISC_TAX: X = A; break;
        case MISC_TXA: A = X; break;
        default:
            return 0;
        }
    }
}

#define I(c, t, f, kk) {(uint16_t)(c), (uint8_t)(t), (uint8_t)(f), (uint32_t)(kk)}

/* "IPv4 TCP from 10.0.0.0/8, unfragmented, to port 80, 443 or 8000-8099,
 * with a non-empty payload": returns the payload length (0 = drop). */
struct bpf_insn *bpf_demo_filter(uint32_t *n_insns)
{
    const struct bpf_insn prog[] = {
        /*  0 */ I(LD_H_ABS, 0, 0, 12),           /* ethertype */
        /*  1 */ I(JMP_JEQ_K, 0, 25, 0x0800),     /* IPv4? else drop(27) */
        /*  2 */ I(LD_W_ABS, 0, 0, 26),           /* source address */
        /*  3 */ I(ALU_RSH_K, 0, 0, 24),
        /*  4 */ I(JMP_JEQ_K, 0, 22, 10),         /* 10.x.x.x? */
        /*  5 */ I(LD_B_ABS, 0, 0, 23),           /* protocol */
        /*  6 */ I(JMP_JEQ_K, 0, 20, 6),          /* TCP? */
        /*  7 */ I(LD_H_ABS, 0, 0, 20),           /* flags + fragment offset */
        /*  8 */ I(JMP_JSET_K, 18, 0, 0x1fff),    /* fragment -> drop */
        /*  9 */ I(LDX_B_MSH, 0, 0, 14),          /* X = IP header length */
        /* 10 */ I(STX, 0, 0, 0),                 /* M[0] = ihl */
        /* 11 */ I(LD_H_IND, 0, 0, 16),           /* TCP destination port */
        /* 12 */ I(ST, 0, 0, 1),                  /* M[1] = port */
        /* 13 */ I(JMP_JEQ_K, 4, 0, 80),          /* -> 18 */
        /* 14 */ I(JMP_JEQ_K, 3, 0, 443),         /* -> 18 */
        /* 15 */ I(JMP_JGE_K, 0, 11, 8000),       /* < 8000 -> drop */
        /* 16 */ I(JMP_JGT_K, 10, 0, 8099),       /* > 8099 -> drop */
        /* 17 */ I(JMP_JA, 0, 0, 0),              /* (falls to 18) */
        /* 18 */ I(LD_B_IND, 0, 0, 26),           /* TCP data offset byte */
        /* 19 */ I(ALU_RSH_K, 0, 0, 4),
        /* 20 */ I(ALU_LSH_K, 0, 0, 2),           /* TCP header length */
        /* 21 */ I(LDX_MEM, 0, 0, 0),             /* X = ihl */
        /* 22 */ I(ALU_ADD_X, 0, 0, 0),
        /* 23 */ I(ALU_ADD_K, 0, 0, 14),          /* A = payload offset */
        /* 24 */ I(MISC_TAX, 0, 0, 0),
        /* 25 */ I(LD_W_LEN, 0, 0, 0),
        /* 26 */ I(JMP_JGT_X, 1, 0, 0),           /* len > offset -> 28 */
        /* 27 */ I(RET_K, 0, 0, 0),               /* drop */
        /* 28 */ I(ALU_SUB_X, 0, 0, 0),           /* payload length */
        /* 29 */ I(RET_A, 0, 0, 0),
    };
    /* A page of its own so no run-time write lands on the filter's page. */
    void *mem = NULL;
    if (posix_memalign(&mem, 4096, 4096) != 0)
        return NULL;
    memset(mem, 0, 4096);
    memcpy(mem, prog, sizeof prog);
    if (n_insns)
        *n_insns = sizeof prog / sizeof prog[0];
    return mem;
}

static uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

static void put16(uint8_t *p, uint32_t v)
{
    p[0] = (uint8_t)(v >> 8);
    p[1] = (uint8_t)v;
}

uint32_t bpf_demo_packet(uint64_t *rng_state, uint8_t *buf)
{
    static const uint16_t ports[] = {80, 443, 8000, 8042, 8099, 8100, 22, 53, 7999, 65535};
    uint64_t r = xorshift64(rng_state);
    memset(buf, 0, BPF_DEMO_MAX_PKT);
    for (int b = 0; b < 12; b++) /* MAC addresses */
        buf[b] = (uint8_t)(xorshift64(rng_state) >> 56);
    put16(buf + 12, (r & 0xf) == 0 ? 0x86dd : 0x0800);    /* 1/16 IPv6 */
    uint32_t ihl = (r >> 4 & 7) == 0 ? 6 + (uint32_t)(r >> 7 & 3) : 5; /* some options */
    buf[14] = (uint8_t)(0x40 | ihl);
    buf[23] = (r >> 9 & 3) == 0 ? 17 : 6;                 /* 1/4 UDP */
    put16(buf + 20, (r >> 11 & 15) == 0 ? 0x2001 : 0x4000); /* 1/16 fragments, else DF */
    buf[26] = (r >> 15 & 1) ? 10 : 192;                   /* half from 10/8 */
    buf[27] = (uint8_t)(r >> 16);
    buf[28] = (uint8_t)(r >> 24);
    buf[29] = (uint8_t)(r >> 32);
    uint32_t l4 = 14 + 4 * ihl;
    put16(buf + l4, 1024 + (uint32_t)(r >> 40 & 0x3fff)); /* source port */
    put16(buf + l4 + 2, ports[(r >> 54) % 10]);
    uint32_t doff = (r >> 58 & 3) == 0 ? 8 : 5;
    buf[l4 + 12] = (uint8_t)(doff << 4);
    uint32_t hdr = l4 + 4 * doff;
    /* Lengths from truncated (inside the headers) to full with payload. */
    uint32_t len = 20 + (uint32_t)(xorshift64(rng_state) % (BPF_DEMO_MAX_PKT - 19));
    for (uint32_t b = hdr; b < len; b++)
        buf[b] = (uint8_t)(b * 7);
    return len;
}

#ifndef DYNSPEC_NO_MAIN
enum { POOL = 4096 };

int main(int argc, char **argv)
{
    long size = 5000000;
    if (argc > 1) {
        char *end = NULL;
        size = strtol(argv[1], &end, 10);
        if (end == argv[1] || *end != '\0' || size < 0) {
            fprintf(stderr, "usage: %s [SIZE]\n", argv[0]);
            return 2;
        }
    }
    uint32_t n = 0;
    struct bpf_insn *prog = bpf_demo_filter(&n);
    uint8_t *pool = malloc((size_t)POOL * BPF_DEMO_MAX_PKT);
    uint32_t *lens = malloc(POOL * sizeof *lens);
    if (!prog || !pool || !lens) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    /* Packets are generated once; the hot loop only filters them. */
    uint64_t rng = 0x9e3779b97f4a7c15ull;
    for (int p = 0; p < POOL; p++)
        lens[p] = bpf_demo_packet(&rng, pool + (size_t)p * BPF_DEMO_MAX_PKT);
    unsigned long accepted = 0, bytes = 0;
    for (long p = 0; p < size; p++) {
        size_t slot = (size_t)p % POOL;
        uint32_t r = bpf_run(prog, pool + slot * BPF_DEMO_MAX_PKT, lens[slot]);
        if (r != 0) {
            accepted++;
            bytes += r;
        }
    }
    printf("filter: %u instructions\n", n);
    printf("packets: %ld\n", size);
    printf("accepted: %lu\n", accepted);
    printf("payload bytes: %lu\n", bytes);
    free(lens);
    free(pool);
    free(prog);
    return 0;
}
#endif
