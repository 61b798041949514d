/*
 * nothing.c — data-dependent work with nothing worth specializing.
 *
 * What it exercises: the profiling overhead baseline.  Every round sorts
 * fresh pseudo-random data (heap sort) and chases pointers through a fresh
 * random cyclic permutation; no value that steers control flow repeats, so
 * dynspec should find no predictable trigger and must just get out of the way.
 *
 * Usage:  nothing [SIZE]     (SIZE = rounds over 4096 elements)
 *   small size (tests):          300   -> stdout in nothing.expected
 *   bench size:                 3200   (about 1 s natively; used by benches/overhead.rs)
 *   default when omitted:   the small size
 *
 * Hot functions (exact C signatures):
 *
 *   void nothing_sort(uint32_t *a, size_t n);                  // ascending heap sort
 *   uint64_t nothing_chase(const uint32_t *next, size_t n, size_t steps);
 *     walks i = next[i] from 0 for `steps` steps, hashing the visited indices.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static void sift_down(uint32_t *a, size_t root, size_t n)
{
    for (;;) {
        size_t child = 2 * root + 1;
        if (child >= n)
            return;
        if (child + 1 < n && a[child + 1] > a[child])
            child++;
        if (a[root] >= a[child])
            return;
        uint32_t t = a[root];
        a[root] = a[child];
        a[child] = t;
        root = child;
    }
}

__attribute__((noinline)) void nothing_sort(uint32_t *a, size_t n)
{
    if (n < 2)
        return;
    for (size_t i = n / 2; i-- > 0;)
        sift_down(a, i, n);
    for (size_t end = n - 1; end > 0; end--) {
        uint32_t t = a[0];
        a[0] = a[end];
        a[end] = t;
        sift_down(a, 0, end);
    }
}

__attribute__((noinline)) uint64_t nothing_chase(const uint32_t *next, size_t n, size_t steps)
{
    uint64_t h = 0;
    size_t i = 0;
    for (size_t s = 0; s < steps && n > 0; s++) {
        i = next[i] % n;
        h = (h ^ i) * 0x100000001b3ull;
    }
    return h;
}

#ifndef DYNSPEC_NO_MAIN
enum { N = 4096 };

static uint64_t xorshift64(uint64_t *s)
{
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *s = x;
    return x;
}

int main(int argc, char **argv)
{
    long size = 300;
    if (argc > 1) {
        char *end = NULL;
        size = strtol(argv[1], &end, 10);
        if (end == argv[1] || *end != '\0' || size < 0) {
            fprintf(stderr, "usage: %s [SIZE]\n", argv[0]);
            return 2;
        }
    }
    uint32_t *a = malloc(N * sizeof *a);
    uint32_t *next = malloc(N * sizeof *next);
    if (!a || !next) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    uint64_t rng = 88172645463325252ull, total = 0;
    for (long r = 0; r < size; r++) {
        for (size_t i = 0; i < N; i++)
            a[i] = (uint32_t)xorshift64(&rng);
        nothing_sort(a, N);
        uint64_t h = 0;
        for (size_t i = 0; i < N; i++)
            h = (h ^ a[i]) * 0x100000001b3ull;
        /* Sattolo's algorithm: a single random cycle through all N slots. */
        for (size_t i = 0; i < N; i++)
            next[i] = (uint32_t)i;
        for (size_t i = N - 1; i > 0; i--) {
            size_t j = xorshift64(&rng) % i;
            uint32_t t = next[i];
            next[i] = next[j];
            next[j] = t;
        }
        h ^= nothing_chase(next, N, 4 * N);
        total = total * 31 + h;
    }
    printf("rounds: %ld\n", size);
    printf("hash: %016llx\n", (unsigned long long)total);
    free(next);
    free(a);
    return 0;
}
#endif
