/*
 * kernel_read.c — a hot loop over a heap table that read(2) refills from a pipe now and then.
 *
 * What it exercises: kernel writes to memory a variant may assume constant.
 * The table page is read on every element of the hot loop and written only
 * by the kernel (read(2) from a pipe), 8 times in the whole run, so it looks
 * constant for long stretches.  If dynspec guards that page, the read(2)
 * must still succeed (no EFAULT) and the variant must be invalidated.
 *
 * Usage:  kernel_read [SIZE]     (SIZE = passes over a 4096-byte input)
 *   small size (tests):        40000   -> stdout in kernel_read.expected
 *   bench size:               800000
 *   default when omitted:   the small size
 *
 * Hot function (exact C signature):
 *
 *   uint64_t kr_scan(const uint8_t *table, const uint8_t *input, size_t n);
 *     sum over i < n of table[input[i]] * (i | 1)   (table has 256 entries).
 */
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

__attribute__((noinline)) uint64_t kr_scan(const uint8_t *table, const uint8_t *input, size_t n)
{
    uint64_t sum = 0;
    for (size_t i = 0; i < n; i++)
        sum += (uint64_t)table[input[i]] * (i | 1);
    return sum;
}

#ifndef DYNSPEC_NO_MAIN
enum { PAGE = 4096, N = 4096, REFRESHES = 8 };

/* Writes one page of fresh table bytes into the pipe and reads it back into
 * `table` with read(2), so the kernel is the one writing the table page. */
static int refill(int fds[2], uint8_t *table, unsigned gen)
{
    uint8_t msg[PAGE];
    for (size_t i = 0; i < PAGE; i++)
        msg[i] = (uint8_t)(i * 37 + gen * 101 + (i >> 8));
    if (write(fds[1], msg, PAGE) != PAGE)
        return -1;
    size_t got = 0;
    while (got < PAGE) {
        ssize_t r = read(fds[0], table + got, PAGE - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        got += (size_t)r;
    }
    return 0;
}

int main(int argc, char **argv)
{
    long size = 40000;
    if (argc > 1) {
        char *end = NULL;
        size = strtol(argv[1], &end, 10);
        if (end == argv[1] || *end != '\0' || size < 0) {
            fprintf(stderr, "usage: %s [SIZE]\n", argv[0]);
            return 2;
        }
    }
    int fds[2];
    if (pipe(fds) != 0) {
        perror("pipe");
        return 1;
    }
    void *page = NULL;
    uint8_t *input = malloc(N);
    if (posix_memalign(&page, PAGE, PAGE) != 0 || !input) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    uint8_t *table = page;
    uint32_t s = 2463534242u;
    for (size_t i = 0; i < N; i++) {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        input[i] = (uint8_t)s;
    }
    long every = size / REFRESHES > 0 ? size / REFRESHES : 1;
    unsigned refills = 0;
    uint64_t total = 0;
    for (long p = 0; p < size; p++) {
        if (p % every == 0) {
            if (refill(fds, table, refills) != 0) {
                perror("refill through pipe");
                return 1;
            }
            refills++;
        }
        total = total * 1000003 + kr_scan(table, input, N);
    }
    printf("passes: %ld\n", size);
    printf("refills: %u\n", refills);
    printf("total: %016llx\n", (unsigned long long)total);
    free(input);
    free(page);
    return 0;
}
#endif
