/* losing_variant: a variant that is slower than the code it replaces.
 *
 * step() is called with one of eight configurations, picked at random per call. Everything it computes from the
 * configuration is constant (the specializer folds more than 48 instructions of it), but that work is cheap
 * and runs in the shadow of a chain of divisions on the running value, which the variant cannot fold. The
 * original code has no branch that depends on which configuration it got; the dispatch stub has to compare
 * the configuration pointer with the variants' values (a binary search: three compares, each a branch the CPU
 * cannot predict, the choice being random), so every call pays mispredictions the original never does. dynspec must measure it slower and remove it.
 *
 * Usage: losing_variant [CALLS]   (default 40000000; small size (tests): 150000000 benchmark size 200000000)
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

struct cfg {
    uint64_t k[32];
};

struct cfg cfgs[8];

__attribute__((noinline)) uint64_t step(const struct cfg *c, uint64_t x) {
    /* Independent of x: a wide tree of operations on the configuration's fields. */
    uint64_t a0 = c->k[0] * 3 + c->k[1], a1 = c->k[2] * 5 + c->k[3], a2 = c->k[4] * 7 + c->k[5];
    uint64_t a3 = c->k[6] * 9 + c->k[7], a4 = c->k[8] * 11 + c->k[9], a5 = c->k[10] * 13 + c->k[11];
    uint64_t a6 = c->k[12] * 15 + c->k[13], a7 = c->k[14] * 17 + c->k[15];
    uint64_t b0 = (c->k[16] ^ a0) + (c->k[17] >> 3), b1 = (c->k[18] ^ a1) + (c->k[19] >> 5);
    uint64_t b2 = (c->k[20] ^ a2) + (c->k[21] >> 7), b3 = (c->k[22] ^ a3) + (c->k[23] >> 9);
    uint64_t b4 = (c->k[24] ^ a4) + (c->k[25] >> 11), b5 = (c->k[26] ^ a5) + (c->k[27] >> 13);
    uint64_t b6 = (c->k[28] ^ a6) + (c->k[29] >> 15), b7 = (c->k[30] ^ a7) + (c->k[31] >> 17);
    uint64_t m = ((b0 + b1) ^ (b2 + b3)) + ((b4 + b5) ^ (b6 + b7));
    uint64_t d = (m & 0xff) | 3, e = ((m >> 8) & 0xff) | 5;
    /* The chain through x: two dependent divisions per call. */
    x = x / d + (x << 7) + m;
    x = x / e + (x >> 3) + (m >> 1);
    return x;
}

#ifndef DYNSPEC_NO_MAIN
int main(int argc, char **argv) {
    long calls = argc > 1 ? atol(argv[1]) : 40000000;
    if (calls <= 0) {
        fprintf(stderr, "usage: losing_variant [CALLS]\n");
        return 2;
    }
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 32; j++)
            cfgs[i].k[j] = (uint64_t)(i + 1) * 0x9e3779b97f4a7c15ULL + (uint64_t)j * 0x632be59bd9b4e019ULL;
    uint64_t x = 12345, r = 88172645463325252ULL;
    for (long n = 0; n < calls; n++) {
        r ^= r << 13;
        r ^= r >> 7;
        r ^= r << 17;
        x = step(&cfgs[r >> 61], x);
    }
    printf("calls: %ld\nchecksum: %016" PRIx64 "\n", calls, x);
    return 0;
}
#endif
