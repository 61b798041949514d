//! Integration tests of the write watch: uffd user and kernel writes, the mprotect fallback, the program's own
//! SIGSEGV, fork.

mod common;

use common::*;
use tracer::{Addr, Event, ExitStatus, Pid, Tracer, WatchOptions, WriteWatch};

const WATCH_PROG: &str = r#"
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
static void h(int s) { (void)s; }
static sigjmp_buf jb;
static void on_segv(int s) { (void)s; siglongjmp(jb, 1); }
char data_page[8192] __attribute__((aligned(4096))) = {1};
int main(int c, char **v) {
    const char *flags = c > 2 ? v[2] : "";
    signal(SIGUSR1, h);
    signal(SIGSEGV, on_segv);
    char *heap;
    if (posix_memalign((void **)&heap, 4096, 3 * 4096)) return 20;
    memset(heap, 0, 3 * 4096);
    char *ro = mmap(0, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    char *fresh = mmap(0, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0); /* never touched */
    int p[2];
    if (pipe(p)) return 21;
    FILE *f = fopen(v[1], "w");
    fprintf(f, "%lx %lx %lx %lx\n", (unsigned long)heap, (unsigned long)data_page, (unsigned long)ro,
            (unsigned long)fresh);
    fclose(f);
    raise(SIGUSR1); /* stage 1: the tracer watches */
    int ok = 1;
    heap[10] = 5;                                   /* user write, heap page 0 */
    if (strchr(flags, 'h')) {                       /* kernel write, heap page 1 */
        if (write(p[1], "xyz", 3) != 3) return 22;
        ok &= read(p[0], heap + 4096 + 100, 3) == 3 && memcmp(heap + 4096 + 100, "xyz", 3) == 0;
    }
    if (strchr(flags, 'k')) {                       /* kernel write, data page 0 */
        if (write(p[1], "uvw", 3) != 3) return 23;
        ok &= read(p[0], data_page + 100, 3) == 3 && memcmp(data_page + 100, "uvw", 3) == 0;
    }
    data_page[4096 + 7] = 9;                        /* user write, data page 1 */
    fresh[1] = 1;                                   /* first touch of an unpopulated page is a write */
    int caught = 0;
    if (!sigsetjmp(jb, 1)) ro[5] = 1; else caught++;              /* the program's own SEGV_ACCERR */
    if (!sigsetjmp(jb, 1)) *(volatile int *)8 = 1; else caught++; /* the program's own SEGV_MAPERR */
    raise(SIGUSR1); /* stage 2: the tracer checks */
    ok &= data_page[4096 + 7] == 9 && heap[10] == 5;
    return ok && caught == 2 ? 0 : 1;
}
"#;

fn read_addrs(path: &std::path::Path) -> Vec<Addr> {
    std::fs::read_to_string(path)
        .unwrap()
        .split_whitespace()
        .map(|s| Addr(u64::from_str_radix(s, 16).unwrap()))
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Via {
    Uffd,
    Async,
    Mprotect,
}

/// Watch 3 heap pages, 2 .data pages, a code page and an unmapped page; the program writes some of them.
fn scenario(opts: WatchOptions, flags: &str, heap_via: Via, data_via: Via) {
    let d = temp_dir("watch");
    let exe = compile(&d, "watch", WATCH_PROG, &[]);
    let out = d.path().join("addrs.txt");
    let mut tr = Tracer::spawn(&argv(&[&exe, &out, &flags])).unwrap();
    let root = tr.root();
    let mut watch: Option<WriteWatch> = None;
    let mut stage = 0;
    let mut heap = Addr(0);
    let mut data = Addr(0);
    let mut fresh = Addr(0);
    let mut stack = Addr(0);
    let mut result = None;
    let mut own_segvs = 0;
    let mut handled_segvs = 0;
    let seen = run_loop(&mut tr, |tr, ev| match ev {
        Event::Signal {
            tid,
            signal: libc::SIGUSR1,
            ..
        } => {
            stage += 1;
            if stage == 1 {
                tr.stop_all().unwrap();
                let a = read_addrs(&out);
                heap = a[0];
                data = a[1];
                fresh = a[3];
                let mut w = WriteWatch::with_options(tr, root, *tid, opts).unwrap();
                assert_eq!(w.uffd_unavailable().is_none(), opts.uffd);
                let regs = tr.regs(*tid).unwrap();
                let heap_pages = vec![heap, heap.offset(4096), heap.offset(8192), fresh];
                let data_pages = vec![data, data.offset(4096)];
                let pages: Vec<Addr> = heap_pages
                    .iter()
                    .chain(&data_pages)
                    .copied()
                    .chain([Addr(regs.rip), Addr(8), Addr(regs.rsp)])
                    .collect();
                stack = Addr(regs.rsp).page();
                let sum = w.watch(tr, &pages).unwrap();
                let mut want_uffd = Vec::new();
                let mut want_async = Vec::new();
                let mut want_mprotect = Vec::new();
                for (via, pages) in [(heap_via, &heap_pages), (data_via, &data_pages)] {
                    match via {
                        Via::Uffd => want_uffd.extend(pages),
                        Via::Async => {
                            want_uffd.extend(pages);
                            want_async.extend(pages);
                        }
                        Via::Mprotect => want_mprotect.extend(pages),
                    }
                }
                // The stack: sync uffd resolves the kernel's signal-frame writes; mprotect would kill the program.
                let mut want_skipped = vec![Addr(0)];
                if heap_via == Via::Mprotect {
                    want_skipped.push(stack);
                } else {
                    want_uffd.push(stack);
                }
                assert_eq!(sum.uffd, want_uffd);
                assert_eq!(sum.uffd_async, want_async);
                assert_eq!(sum.mprotect, want_mprotect);
                assert_eq!(sum.read_only, vec![Addr(regs.rip).page()]);
                assert_eq!(sum.skipped, want_skipped);
                let n_watched = if heap_via == Via::Mprotect { 6 } else { 7 };
                assert_eq!(w.watched().len(), n_watched);
                assert!(w.written().is_empty());
                // Watching again is idempotent.
                let again = w.watch(tr, &pages).unwrap();
                assert_eq!(again.uffd, want_uffd);
                assert_eq!(again.mprotect, want_mprotect);
                watch = Some(w);
                tr.resume_all().unwrap();
            } else if stage == 2 {
                tr.stop_all().unwrap();
                let w = watch.take().unwrap();
                result = Some(w.finish(tr).unwrap());
                tr.resume_all().unwrap();
            }
            None
        }
        Event::Signal {
            tid,
            signal: libc::SIGSEGV,
            siginfo,
        } => {
            let w = watch.as_mut().expect("watch active");
            if w.handle_segv(tr, *tid, siginfo).unwrap() {
                handled_segvs += 1;
                Some(None)
            } else {
                own_segvs += 1;
                None
            }
        }
        _ => None,
    });
    assert_eq!(seen.status, Some(ExitStatus::Code(0)), "{:?}", seen.events);
    assert_eq!(own_segvs, 2, "the program's own SIGSEGVs are delivered");
    // Written mprotect pages fault once each: heap page 0 and the fresh page (heap_via), data page 1.
    let mprotect_writes = [heap_via, heap_via, data_via]
        .iter()
        .filter(|v| **v == Via::Mprotect)
        .count();
    assert_eq!(
        handled_segvs, mprotect_writes,
        "one fault per written mprotect page"
    );
    let r = result.expect("stage 2 reached");
    let mut expect_written = vec![heap, data.offset(4096), fresh];
    if heap_via != Via::Mprotect {
        expect_written.push(stack);
    }
    if flags.contains('h') {
        expect_written.push(heap.offset(4096));
    }
    if flags.contains('k') {
        expect_written.push(data);
    }
    let expect_written: std::collections::BTreeSet<Addr> = expect_written.into_iter().collect();
    assert_eq!(r.written, expect_written);
    assert_eq!(
        r.watched.len(),
        if heap_via == Via::Mprotect { 6 } else { 7 }
    );
    assert_eq!(r.read_only.len(), 1);
}

#[test]
fn uffd_sync_heap_and_async_data_see_user_and_kernel_writes() {
    scenario(WatchOptions::default(), "hk", Via::Uffd, Via::Async);
}

#[test]
fn mprotect_fallback_for_data_pages() {
    let opts = WatchOptions {
        uffd: true,
        uffd_async: false,
    };
    scenario(opts, "h", Via::Uffd, Via::Mprotect);
}

#[test]
fn mprotect_only_when_uffd_is_unavailable() {
    let opts = WatchOptions {
        uffd: false,
        uffd_async: false,
    };
    scenario(opts, "", Via::Mprotect, Via::Mprotect);
}

const FORK_PROG: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>
static void h(int s) { (void)s; }
char data_page[4096] __attribute__((aligned(4096))) = {1};
int main(int c, char **v) {
    (void)c;
    signal(SIGUSR1, h);
    char *heap;
    if (posix_memalign((void **)&heap, 4096, 4096)) return 20;
    memset(heap, 0, 4096);
    FILE *f = fopen(v[1], "w");
    fprintf(f, "%lx %lx\n", (unsigned long)heap, (unsigned long)data_page);
    fclose(f);
    raise(SIGUSR1);
    pid_t pid = fork();
    if (pid == 0) {
        int fd[2];
        if (pipe(fd)) _exit(30);
        if (write(fd[1], "q", 1) != 1) _exit(31);
        heap[1] = 2;                                   /* uffd page: not inherited */
        if (read(fd[0], heap + 2, 1) != 1) _exit(32);  /* kernel write in the child */
        data_page[3] = 4;                              /* mprotect page: restored by on_fork */
        _exit(heap[1] + heap[2] + data_page[3] == 2 + 'q' + 4 ? 7 : 8);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    raise(SIGUSR1); /* stage 2: nothing written by the parent yet */
    heap[5] = 1;          /* the parent's writes after the fork (pages now copy-on-write) are seen */
    data_page[9] = 1;
    raise(SIGUSR1); /* stage 3 */
    return WIFEXITED(st) ? WEXITSTATUS(st) : 99;
}
"#;

#[test]
fn fork_child_does_not_inherit_protection() {
    fork_scenario(false);
    fork_scenario(true);
}

/// The parent watches a heap page (uffd) and a .data page (mprotect, or async uffd), then forks; the child
/// writes both (user and kernel writes) and must neither fault nor block; the parent's later writes (to pages
/// now shared copy-on-write) are still seen.
fn fork_scenario(async_mode: bool) {
    let d = temp_dir("watchfork");
    let exe = compile(&d, "watchfork", FORK_PROG, &[]);
    let out = d.path().join("addrs.txt");
    let mut tr = Tracer::spawn(&argv(&[&exe, &out])).unwrap();
    let root = tr.root();
    let mut watch: Option<WriteWatch> = None;
    let mut child_segv = false;
    let mut child: Option<Pid> = None;
    let mut result = None;
    let mut stage = 0;
    let mut addrs = Vec::new();
    let mut after_child = std::collections::BTreeSet::new();
    let seen = run_loop(&mut tr, |tr, ev| match ev {
        Event::Signal {
            tid,
            signal: libc::SIGUSR1,
            ..
        } if tr.tgid(*tid) == Some(root) => {
            stage += 1;
            if stage == 1 {
                let a = read_addrs(&out);
                let opts = WatchOptions {
                    uffd: true,
                    uffd_async: async_mode,
                };
                let mut w = WriteWatch::with_options(tr, root, *tid, opts).unwrap();
                let sum = w.watch(tr, &[a[0], a[1]]).unwrap();
                if async_mode {
                    assert_eq!(sum.uffd, vec![a[0], a[1]]);
                    assert_eq!(sum.uffd_async, vec![a[1]]);
                } else {
                    assert_eq!(sum.uffd, vec![a[0]]);
                    assert_eq!(sum.mprotect, vec![a[1]]);
                }
                watch = Some(w);
                addrs = vec![a[0], a[1]];
            } else if stage == 2 {
                after_child = watch.as_ref().unwrap().written();
            } else {
                tr.stop_all().unwrap();
                result = Some((
                    after_child.clone(),
                    watch.take().unwrap().finish(tr).unwrap().written,
                ));
                tr.resume_all().unwrap();
            }
            None
        }
        Event::Forked { child: c, .. } => {
            child = Some(*c);
            watch.as_mut().unwrap().on_fork(tr, *c).unwrap();
            None
        }
        Event::Signal {
            tid,
            signal: libc::SIGSEGV,
            siginfo,
        } => {
            if Some(*tid) == child {
                child_segv = true;
            }
            if let Some(w) = watch.as_mut() {
                if w.handle_segv(tr, *tid, siginfo).unwrap() {
                    return Some(None);
                }
            }
            None
        }
        _ => None,
    });
    assert!(
        !child_segv,
        "the child must not fault on inherited protection"
    );
    assert!(child.is_some());
    assert!(seen.events.iter().any(
        |e| matches!(e, Event::Exited { pid, status: ExitStatus::Code(7) } if Some(*pid) == child)
    ));
    assert_eq!(seen.status, Some(ExitStatus::Code(7)));
    // The parent never wrote the pages after the watch began; the child's writes are its own memory.
    let (after_child, after_parent) = result.unwrap();
    assert!(after_child.is_empty(), "{after_child:?}");
    assert_eq!(after_parent, addrs.into_iter().collect());
}

#[test]
fn async_untouched_data_page_is_not_written() {
    scenario(WatchOptions::default(), "h", Via::Uffd, Via::Async);
}

const EXEC_PROG: &str = r#"
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
static void h(int s) { (void)s; }
char data_page[4096] __attribute__((aligned(4096))) = {1};
int main(int c, char **v) {
    if (c > 2) return 3;
    signal(SIGUSR1, h);
    char *heap;
    if (posix_memalign((void **)&heap, 4096, 4096)) return 20;
    memset(heap, 0, 4096);
    FILE *f = fopen(v[1], "w");
    fprintf(f, "%lx %lx\n", (unsigned long)heap, (unsigned long)data_page);
    fclose(f);
    raise(SIGUSR1);
    heap[0] = 1;
    execl(v[0], v[0], v[1], "again", (char *)0);
    return 99;
}
"#;

#[test]
fn exec_drops_the_watch() {
    for opts in [
        WatchOptions::default(),
        WatchOptions {
            uffd: true,
            uffd_async: false,
        },
    ] {
        let d = temp_dir("watchexec");
        let exe = compile(&d, "watchexec", EXEC_PROG, &[]);
        let out = d.path().join("addrs.txt");
        let mut tr = Tracer::spawn(&argv(&[&exe, &out])).unwrap();
        let root = tr.root();
        let mut watch: Option<WriteWatch> = None;
        let mut result = None;
        let seen = run_loop(&mut tr, |tr, ev| {
            match ev {
                Event::Signal {
                    tid,
                    signal: libc::SIGUSR1,
                    ..
                } => {
                    let a = read_addrs(&out);
                    let mut w = WriteWatch::with_options(tr, root, *tid, opts).unwrap();
                    let sum = w.watch(tr, &[a[0], a[1]]).unwrap();
                    assert_eq!(sum.uffd.len() + sum.mprotect.len(), 2);
                    watch = Some(w);
                }
                Event::Exec { pid } => {
                    let mut w = watch.take().unwrap();
                    w.on_exec(*pid);
                    // Nothing to watch in the new program, nothing to restore.
                    assert!(w.watch(tr, &[Addr(0x1000)]).unwrap().skipped.len() == 1);
                    result = Some(w.finish(tr).unwrap());
                }
                _ => {}
            }
            None
        });
        assert_eq!(seen.status, Some(ExitStatus::Code(3)));
        let r = result.expect("exec seen");
        assert_eq!(r.watched.len(), 2);
        assert!(
            r.written.iter().any(|p| p.0 != 0),
            "the heap write before exec is recorded"
        );
    }
}

const MT_WRITERS: &str = r#"
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
static void h(int s) { (void)s; }
volatile char data_page[4096] __attribute__((aligned(4096))) = {1};
static pthread_barrier_t bar;
static void *writer(void *a) {
    pthread_barrier_wait(&bar);
    data_page[(long)a * 8] = 1;
    return a;
}
int main(int c, char **v) {
    (void)c;
    signal(SIGUSR1, h);
    pthread_barrier_init(&bar, 0, 4);
    pthread_t t[4];
    for (long i = 1; i < 4; i++) pthread_create(&t[i], 0, writer, (void *)i);
    FILE *f = fopen(v[1], "w");
    fprintf(f, "%lx\n", (unsigned long)data_page);
    fclose(f);
    raise(SIGUSR1);
    writer(0);
    for (int i = 1; i < 4; i++) pthread_join(t[i], 0);
    return data_page[8] + data_page[16] + data_page[24] == 3 ? 0 : 1;
}
"#;

#[test]
fn mprotect_fallback_with_threads_faulting_at_once() {
    let d = temp_dir("mtwriters");
    let exe = compile(&d, "mtwriters", MT_WRITERS, &[]);
    let out = d.path().join("addrs.txt");
    let mut tr = Tracer::spawn(&argv(&[&exe, &out])).unwrap();
    let root = tr.root();
    let mut watch: Option<WriteWatch> = None;
    let mut claimed = 0;
    let mut delivered_segv = 0;
    let seen = run_loop(&mut tr, |tr, ev| match ev {
        Event::Signal {
            tid,
            signal: libc::SIGUSR1,
            ..
        } => {
            tr.stop_all().unwrap();
            let a = read_addrs(&out);
            let opts = WatchOptions {
                uffd: false,
                uffd_async: false,
            };
            let mut w = WriteWatch::with_options(tr, root, *tid, opts).unwrap();
            assert_eq!(w.watch(tr, &a).unwrap().mprotect, a);
            watch = Some(w);
            tr.resume_all().unwrap();
            None
        }
        Event::Signal {
            tid,
            signal: libc::SIGSEGV,
            siginfo,
        } => {
            if watch
                .as_mut()
                .unwrap()
                .handle_segv(tr, *tid, siginfo)
                .unwrap()
            {
                claimed += 1;
                Some(None)
            } else {
                delivered_segv += 1;
                None
            }
        }
        _ => None,
    });
    assert_eq!(seen.status, Some(ExitStatus::Code(0)));
    assert_eq!(delivered_segv, 0);
    assert!(claimed >= 1);
    assert_eq!(watch.unwrap().written().len(), 1);
}
