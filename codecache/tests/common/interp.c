/* Test target for codecache: a small bytecode interpreter whose bytecode lives in its own heap page.
 * Usage: interp MODE ITERS OUT PTRFILE   (the tests name each MODE: `Mode` in tests/common/mod.rs)
 *   MODE 0: plain; 1: the program rewrites one bytecode operand half-way (user write into the guarded page);
 *   2: half-way, read() from a pipe fills the bytecode page (kernel write); 3: two worker threads run the
 *   interpreter while the main thread rewrites the bytecode; each result is checked against a reference;
 *   4: half-way, the rewrite happens inside hook(), called by bytecode op 7 from inside run() (a residual
 *   call of the variant is under way when its page is written); 5: bytecode op 8 stores into the bytecode page
 *   from inside run() itself (the writing thread is inside the variant); 6: like 1 with the bytecode in .data
 *   (file-backed: guarded with mprotect, the write arrives as SIGSEGV); 7: half-way the program forks, the
 *   child rewrites the bytecode and runs the rest, the parent prints the child's sum too; 8: like 0 with an
 *   extra SIGUSR1 half-way; 9: half-way, vfork + exec of /bin/true (the child shares the parent's memory);
 *   11: like 5 (op 8 stores into the bytecode page); a SIGUSR2 handler (the test sends the signal) replaces
 *   bytecode 2 (the call right after the store); the program reports whether the run() call interrupted by the handler saw the change
 *   ("mid=new"), did not ("mid=old"), or neither; 12: the bytecode is rewritten at 1/4, 2/4 and 3/4, each
 *   time followed by SIGUSR1; 13: the bytecode has a mapping of its own, discarded half-way with
 *   madvise(MADV_DONTNEED) (it reads as zeros afterwards: no write ever happens); 14: like 6 (mprotect
 *   guard), and half-way the program takes a SIGSEGV of its own (a store into a read-only page, caught by its
 *   handler), which must reach it unchanged; 15: like 3, but the main thread rewrites the bytecode with
 *   read() from a pipe (a kernel write while the workers run); 16: like 3 with the bytecode in .data (mprotect
 *   guard), and half-way four more threads write unused words of the bytecode page at the same instant (one
 *   fault invalidates; the others are already under way and must complete too); 17: like 4, but before hook()
 *   writes, another thread calls vfork() (its child sleeps 0.3 s, then _exits) and hook() waits until that
 *   thread waits in vfork (state 'D'; at most 2 s): the write is handled while a thread cannot be stopped.
 * Raises SIGUSR1 once the bytecode is ready (the test installs there) and once before exiting (counters). */
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

struct insn { int op, a, b, pad; };

static struct insn data_code[256] __attribute__((aligned(4096))) = {{1, 1, 1, 1}};

static struct insn *code;
static long hook_calls, hook_at = -1;
static int vfork_before_write;
static pthread_t vforker;
static volatile pid_t vforker_tid;

static void *vforker_main(void *arg)
{
    (void)arg;
    vforker_tid = (pid_t)syscall(SYS_gettid);
    pid_t c = vfork();
    if (c == 0) {
        struct timespec ts = {0, 300 * 1000 * 1000};
        while (nanosleep(&ts, &ts) != 0)
            ;
        _exit(0);
    }
    int st = 0;
    waitpid(c, &st, 0);
    return NULL;
}

/* The scheduling state of thread `tid` of this process ('D' while it waits in vfork). */
static char thread_state(pid_t tid)
{
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/self/task/%d/stat", (int)tid);
    FILE *f = fopen(path, "r");
    if (!f) return '?';
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = '\0';
    char *close = strrchr(buf, ')');
    return close && close[1] == ' ' ? close[2] : '?';
}

__attribute__((noinline)) long hook(long x)
{
    if (hook_calls++ == hook_at) {
        if (vfork_before_write) {
            pthread_create(&vforker, NULL, vforker_main, NULL);
            while (vforker_tid == 0)
                ;
            for (int k = 0; k < 2000 && thread_state(vforker_tid) != 'D'; k++) {
                struct timespec ms = {0, 1000 * 1000};
                nanosleep(&ms, NULL);
            }
        }
        code[1].a = 9;
    }
    return x * 3 + 1;
}

__attribute__((noinline)) long run(const struct insn *pc, long x)
{
    for (;;) {
        switch (pc->op) {
        case 0: return x;
        case 1: x += pc->a; break;
        case 2: x *= pc->a; break;
        case 3: x ^= x >> pc->a; break;
        case 4: x -= pc->a; break;
        case 5: if (x & pc->a) pc += pc->b; break;
        case 6: x = (x << pc->a) | ((unsigned long)x >> (64 - pc->a)); break;
        case 7: x = hook(x); break;
        case 8: ((struct insn *)pc)->pad = (int)x; break;
        default: return -1;
        }
        pc++;
    }
}

/* The same semantics, never specialized (different function). */
__attribute__((noinline)) long ref(const struct insn *pc, long x)
{
    for (;;) {
        int op = pc->op;
        if (op == 0) return x;
        else if (op == 1) x += pc->a;
        else if (op == 2) x *= pc->a;
        else if (op == 3) x ^= x >> pc->a;
        else if (op == 4) x -= pc->a;
        else if (op == 5) { if (x & pc->a) pc += pc->b; }
        else if (op == 6) x = (x << pc->a) | ((unsigned long)x >> (64 - pc->a));
        else if (op == 7) x = x * 3 + 1;
        else if (op == 8) ((struct insn *)pc)->pad = (int)x;
        else return -1;
        pc++;
    }
}

static struct insn old_prog[16], new_prog[16];
static long iters;
static atomic_long progress;
static atomic_long bad;

static void on_usr1(int s) { (void)s; }

static sigjmp_buf segv_jmp;
static void on_segv(int s)
{
    (void)s;
    siglongjmp(segv_jmp, 1);
}

static volatile sig_atomic_t handled;
static void on_usr2(int s)
{
    (void)s;
    code[2] = (struct insn){1, 1000000, 0, 0};
    handled = 1;
}

static void fill(struct insn *p)
{
    struct insn prog[] = {
        {1, 7, 0, 0}, {2, 3, 0, 0}, {7, 0, 0, 0}, {3, 5, 0, 0}, {5, 1, 2, 0}, {4, 11, 0, 0}, {6, 13, 0, 0},
        {1, 1000, 0, 0}, {3, 7, 0, 0}, {2, 5, 0, 0}, {0, 0, 0, 0},
    };
    memcpy(p, prog, sizeof prog);
}

static atomic_int go;

static void *writer(void *arg)
{
    long k = (long)arg;
    while (!atomic_load(&go))
        ;
    code[200 + k].pad = 1;
    return NULL;
}

static void *worker(void *arg)
{
    long id = (long)arg, sum = 0;
    for (long i = 0; i < iters; i++) {
        long r = run(code, i * 2 + id);
        long a = ref(old_prog, i * 2 + id), b = ref(new_prog, i * 2 + id);
        if (r != a && r != b)
            atomic_fetch_add(&bad, 1);
        sum += r;
        atomic_fetch_add(&progress, 1);
    }
    (void)sum;
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 5) return 2;
    int mode = atoi(argv[1]);
    iters = atol(argv[2]);
    signal(SIGUSR1, on_usr1);
    if (mode == 13) {
        code = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (code == MAP_FAILED) return 9;
    } else {
        code = (mode == 6 || mode == 14 || mode == 16) ? data_code : aligned_alloc(4096, 4096);
    }
    memset(code, 0, 4096);
    fill(code);
    if (mode == 5 || mode == 11)
        code[1] = (struct insn){8, 0, 0, 0};
    signal(SIGUSR2, on_usr2);
    fill(old_prog);
    fill(new_prog);
    new_prog[1].a = 9;
    FILE *pf = fopen(argv[4], "w");
    fprintf(pf, "%lx\n", (unsigned long)code);
    fclose(pf);
    raise(SIGUSR1);
    FILE *out = fopen(argv[3], "w");
    if (mode == 4 || mode == 17)
        hook_at = iters / 2;
    vfork_before_write = mode == 17;
    if (mode == 11) {
        struct insn o[16], n[16];
        memcpy(o, code, sizeof o);
        memcpy(n, code, sizeof n);
        n[2] = (struct insn){1, 1000000, 0, 0};
        const char *mid = "none";
        long sum = 0;
        for (long i = 0; i < iters; i++) {
            int before = handled;
            long r = run(code, i);
            if (!before && handled)
                mid = r == ref(n, i) ? "new" : r == ref(o, i) ? "old" : "bad";
            sum += r;
        }
        fprintf(out, "mid=%s sum=%ld\n", mid, sum);
    } else if (mode == 16) {
        pthread_t t[2], w[4];
        for (long k = 0; k < 2; k++)
            pthread_create(&t[k], NULL, worker, (void *)k);
        while (atomic_load(&progress) < iters / 2)
            ;
        for (long k = 0; k < 4; k++)
            pthread_create(&w[k], NULL, writer, (void *)k);
        atomic_store(&go, 1);
        for (int k = 0; k < 4; k++)
            pthread_join(w[k], NULL);
        for (int k = 0; k < 2; k++)
            pthread_join(t[k], NULL);
        fprintf(out, "bad=%ld\n", atomic_load(&bad));
    } else if (mode == 3 || mode == 15) {
        pthread_t t[2];
        for (long k = 0; k < 2; k++)
            pthread_create(&t[k], NULL, worker, (void *)k);
        while (atomic_load(&progress) < iters / 2)
            ;
        if (mode == 15) {
            int fds[2];
            struct insn tmp[16];
            if (pipe(fds)) return 3;
            memcpy(tmp, code, sizeof tmp);
            tmp[1].a = 9;
            if (write(fds[1], tmp, sizeof tmp) != sizeof tmp) return 4;
            if (read(fds[0], code, sizeof tmp) != sizeof tmp) return 5;
        } else {
            code[1].a = 9;
        }
        for (int k = 0; k < 2; k++)
            pthread_join(t[k], NULL);
        fprintf(out, "bad=%ld\n", atomic_load(&bad));
    } else {
        int fds[2];
        if (pipe(fds)) return 3;
        long sum = 0;
        for (long i = 0; i < iters; i++) {
            if (i == iters / 2 && (mode == 1 || mode == 6))
                code[1].a = 9;
            if (i == iters / 2 && mode == 8)
                raise(SIGUSR1);
            if (i == iters / 2 && mode == 13)
                madvise(code, 4096, MADV_DONTNEED);
            if (i == iters / 2 && mode == 14) {
                char *ro = mmap(NULL, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                signal(SIGSEGV, on_segv);
                int caught = 0;
                if (!sigsetjmp(segv_jmp, 1))
                    *(volatile char *)ro = 1;
                else
                    caught = 1;
                signal(SIGSEGV, SIG_DFL);
                fprintf(out, "caught=%d\n", caught);
            }
            if (mode == 12 && i > 0 && i % (iters / 4) == 0 && i / (iters / 4) <= 3) {
                code[1].a = 9 + (int)(i / (iters / 4));
                raise(SIGUSR1);
            }
            if (i == iters / 2 && mode == 9) {
                pid_t c = vfork();
                if (c == 0) {
                    execl("/bin/true", "true", (char *)NULL);
                    _exit(127);
                }
                int st = 0;
                waitpid(c, &st, 0);
                fprintf(out, "true=%d\n", st);
            }
            if (i == iters / 2 && mode == 7) {
                int cp[2];
                if (pipe(cp)) return 6;
                pid_t c = fork();
                if (c == 0) {
                    code[1].a = 9;
                    long csum = 0;
                    for (long k = i; k < iters; k++)
                        csum += run(code, k);
                    if (write(cp[1], &csum, sizeof csum) != sizeof csum) _exit(7);
                    _exit(0);
                }
                long csum = 0;
                int st = 0;
                if (read(cp[0], &csum, sizeof csum) != sizeof csum) return 8;
                waitpid(c, &st, 0);
                fprintf(out, "child=%ld status=%d\n", csum, st);
            }
            if (i == iters / 2 && mode == 2) {
                struct insn tmp[16];
                memcpy(tmp, code, sizeof tmp);
                tmp[1].a = 9;
                if (write(fds[1], tmp, sizeof tmp) != sizeof tmp) return 4;
                if (read(fds[0], code, sizeof tmp) != sizeof tmp) { fprintf(out, "read failed\n"); return 5; }
            }
            sum += run(code, i);
        }
        if (vfork_before_write)
            pthread_join(vforker, NULL);
        fprintf(out, "sum=%ld\n", sum);
    }
    fclose(out);
    raise(SIGUSR1);
    return 0;
}
