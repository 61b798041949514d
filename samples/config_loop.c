/*
 * config_loop.c — hot loop whose per-element work branches on heap configuration flags.
 *
 * What it exercises: a region with no bytecode pc at all.  The behaviour is
 * decided by a malloc'd `struct config` that is written once at start-up and
 * once more half-way through the run (at pass SIZE/2), so a variant that
 * folds the configuration must be invalidated by its page guard exactly once.
 * The output array is uint32_t, which may alias the int32_t config fields,
 * so gcc reloads the flags on every element (as real code often does).
 *
 * Usage:  config_loop [SIZE]     (SIZE = passes over a 1024-element array)
 *   small size (tests):        60000   -> stdout in config_loop.expected
 *   bench size:             1000000
 *   default when omitted:   the small size
 *
 * Hot function (exact C signature):
 *
 *   struct config { int32_t mode, scale, shift, use_xor, clamp, bias; };  // 24 bytes
 *   uint64_t process(const struct config *cfg, const uint32_t *data, uint32_t *out, size_t n);
 *
 *   For each i < n: v = data[i] (64-bit); v ^= bias if use_xor else v += bias;
 *   mode 0: v *= scale; mode 1: v = rotl32(v, shift & 31); mode 2: v *= v;
 *   other: v = ~v; if clamp and v > 0xffffff then v = 0xffffff;
 *   out[i] = (uint32_t)v; acc = acc * 31 + v.  Returns acc (wrapping).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct config {
    int32_t mode, scale, shift, use_xor, clamp, bias;
};

__attribute__((noinline)) uint64_t process(const struct config *cfg, const uint32_t *data,
                                           uint32_t *out, size_t n)
{
    uint64_t acc = 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t v = data[i];
        if (cfg->use_xor)
            v ^= (uint64_t)(int64_t)cfg->bias;
        else
            v += (uint64_t)(int64_t)cfg->bias;
        switch (cfg->mode) {
        case 0:
            v *= (uint64_t)(int64_t)cfg->scale;
            break;
        case 1: {
            uint32_t w = (uint32_t)v, s = (uint32_t)cfg->shift & 31;
            v = s ? (w << s | w >> (32 - s)) : w;
            break;
        }
        case 2:
            v *= v;
            break;
        default:
            v = ~v;
            break;
        }
        if (cfg->clamp && v > 0xffffff)
            v = 0xffffff;
        out[i] = (uint32_t)v;
        acc = acc * 31 + v;
    }
    return acc;
}

#ifndef DYNSPEC_NO_MAIN
enum { N = 1024 };

int main(int argc, char **argv)
{
    long size = 60000;
    if (argc > 1) {
        char *end = NULL;
        size = strtol(argv[1], &end, 10);
        if (end == argv[1] || *end != '\0' || size < 0) {
            fprintf(stderr, "usage: %s [SIZE]\n", argv[0]);
            return 2;
        }
    }
    /* The configuration gets a page of its own, so the only writes to that
     * page are the two deliberate configuration changes. */
    void *page = NULL;
    if (posix_memalign(&page, 4096, 4096) != 0) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    memset(page, 0, 4096);
    struct config *cfg = page;
    uint32_t *data = malloc(N * sizeof *data);
    uint32_t *out = malloc(N * sizeof *out);
    if (!data || !out) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    uint32_t s = 2463534242u;
    for (int i = 0; i < N; i++) {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        data[i] = s;
    }
    *cfg = (struct config){.mode = 1, .scale = 3, .shift = 7, .use_xor = 0, .clamp = 1, .bias = 17};
    uint64_t sum = 0;
    for (long p = 0; p < size; p++) {
        if (p == size / 2) {
            cfg->mode = 0;
            cfg->use_xor = 1;
            cfg->clamp = 0;
        }
        sum = sum * 1000003 + process(cfg, data, out, N);
        data[p % N] ^= out[(p * 7) % N]; /* keep the data (not the config) changing */
    }
    printf("passes: %ld\n", size);
    printf("checksum: %016llx\n", (unsigned long long)sum);
    free(out);
    free(data);
    free(page);
    return 0;
}
#endif
