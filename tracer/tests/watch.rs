//! Integration tests of the write watch: uffd user and kernel writes, the mprotect fallback, the program's own
//! SIGSEGV, fork.

mod common;

use common::*;
use tracer::{Event, ExitStatus, Pid, RemoteAddr, Tracer, WriteWatch};

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
    (void)c;
    signal(SIGUSR1, h);
    signal(SIGSEGV, on_segv);
    char *heap;
    if (posix_memalign((void **)&heap, 4096, 3 * 4096)) return 20;
    memset(heap, 0, 3 * 4096);
    char *ro = mmap(0, 4096, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int p[2];
    if (pipe(p)) return 21;
    FILE *f = fopen(v[1], "w");
    fprintf(f, "%lx %lx %lx\n", (unsigned long)heap, (unsigned long)data_page, (unsigned long)ro);
    fclose(f);
    raise(SIGUSR1); /* stage 1: the tracer watches */
    heap[10] = 5;                                   /* user write, uffd page 0 */
    if (write(p[1], "xyz", 3) != 3) return 22;
    ssize_t n = read(p[0], heap + 4096 + 100, 3);   /* kernel write, uffd page 1 */
    data_page[4096 + 7] = 9;                        /* user write, mprotect page 1 */
    int caught = 0;
    if (!sigsetjmp(jb, 1)) ro[5] = 1; else caught++;           /* the program's own SEGV_ACCERR */
    if (!sigsetjmp(jb, 1)) *(volatile int *)8 = 1; else caught++; /* the program's own SEGV_MAPERR */
    raise(SIGUSR1); /* stage 2: the tracer checks */
    int ok = n == 3 && memcmp(heap + 4096 + 100, "xyz", 3) == 0 && data_page[4096 + 7] == 9 && heap[10] == 5;
    return ok && caught == 2 ? 0 : 1;
}
"#;

fn read_addrs(path: &std::path::Path) -> Vec<RemoteAddr> {
    std::fs::read_to_string(path)
        .unwrap()
        .split_whitespace()
        .map(|s| RemoteAddr(u64::from_str_radix(s, 16).unwrap()))
        .collect()
}

#[test]
fn uffd_and_mprotect_watch_user_and_kernel_writes() {
    let d = TempDir::new("watch");
    let exe = compile(&d, "watch", WATCH_PROG, &[]);
    let out = d.path("addrs.txt");
    let mut tr = Tracer::spawn(&argv(&[&exe, &out])).unwrap();
    let root = tr.root();
    let mut watch: Option<WriteWatch> = None;
    let mut stage = 0;
    let mut heap = RemoteAddr(0);
    let mut data = RemoteAddr(0);
    let mut result = None;
    let mut own_segvs = 0;
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
                let mut w = WriteWatch::new(tr, root, *tid).unwrap();
                assert!(w.uffd_unavailable().is_none(), "{:?}", w.uffd_unavailable());
                let regs = tr.regs(*tid).unwrap();
                let pages = [
                    heap,
                    heap.offset(4096),
                    heap.offset(8192),
                    data,
                    data.offset(4096),
                    RemoteAddr(regs.rip),
                    RemoteAddr(8),
                ];
                let sum = w.watch(tr, &pages).unwrap();
                assert_eq!(sum.uffd, vec![heap, heap.offset(4096), heap.offset(8192)]);
                assert_eq!(sum.mprotect, vec![data, data.offset(4096)]);
                assert_eq!(sum.read_only, vec![RemoteAddr(regs.rip).page()]);
                assert_eq!(sum.skipped, vec![RemoteAddr(0)]);
                assert_eq!(w.watched().len(), 5);
                assert!(w.written().is_empty());
                watch = Some(w);
                tr.resume_all().unwrap();
            } else if stage == 2 {
                tr.stop_all().unwrap();
                let w = watch.take().unwrap();
                let r = w.finish(tr).unwrap();
                result = Some(r);
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
    let r = result.expect("stage 2 reached");
    let expect_written: std::collections::BTreeSet<RemoteAddr> =
        [heap, heap.offset(4096), data.offset(4096)]
            .into_iter()
            .collect();
    assert_eq!(r.written, expect_written);
    assert_eq!(r.watched.len(), 5);
    assert_eq!(r.read_only.len(), 1);
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
    raise(SIGUSR1);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 99;
}
"#;

#[test]
fn fork_child_does_not_inherit_protection() {
    let d = TempDir::new("watchfork");
    let exe = compile(&d, "watchfork", FORK_PROG, &[]);
    let out = d.path("addrs.txt");
    let mut tr = Tracer::spawn(&argv(&[&exe, &out])).unwrap();
    let root = tr.root();
    let mut watch: Option<WriteWatch> = None;
    let mut child_segv = false;
    let mut child: Option<Pid> = None;
    let mut result = None;
    let mut stage = 0;
    let seen = run_loop(&mut tr, |tr, ev| match ev {
        Event::Signal {
            tid,
            signal: libc::SIGUSR1,
            ..
        } if tr.tgid(*tid) == Some(root) => {
            stage += 1;
            if stage == 1 {
                let a = read_addrs(&out);
                let mut w = WriteWatch::new(tr, root, *tid).unwrap();
                let sum = w.watch(tr, &[a[0], a[1]]).unwrap();
                assert_eq!(sum.uffd, vec![a[0]]);
                assert_eq!(sum.mprotect, vec![a[1]]);
                watch = Some(w);
            } else {
                tr.stop_all().unwrap();
                result = Some(watch.take().unwrap().finish(tr).unwrap());
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
    assert!(result.unwrap().written.is_empty());
}
