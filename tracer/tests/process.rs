//! Integration tests of process control: spawn, exit status, threads, fork/exec, attach/detach, signals,
//! job control, memory and registers, remote system calls.

mod common;

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use tracer::{
    mapping_at, read_maps, remote_mmap, remote_mprotect, remote_munmap, Addr, Event, ExitStatus,
    Pid, Tracer, TracerError,
};

const EXIT_ARG: &str = r#"
#include <stdlib.h>
int main(int c, char **v) { return c > 1 ? atoi(v[1]) : 42; }
"#;

#[test]
fn spawn_passes_exit_code_through() {
    let d = temp_dir("exit");
    let exe = compile(&d, "exit", EXIT_ARG, &[]);
    let mut tr = Tracer::spawn(&argv(&[&exe])).unwrap();
    assert!(tr.is_stopped(tr.root()));
    assert_eq!(tr.processes(), vec![tr.root()]);
    assert_eq!(tr.threads(tr.root()), vec![tr.root()]);
    let seen = run_loop(&mut tr, |_, _| None);
    assert_eq!(seen.status, Some(ExitStatus::Code(42)));

    let mut tr = Tracer::spawn(&argv(&[&exe, &"0"])).unwrap();
    assert_eq!(
        run_loop(&mut tr, |_, _| None).status,
        Some(ExitStatus::Code(0))
    );
    let mut tr = Tracer::spawn(&argv(&[&exe, &"255"])).unwrap();
    assert_eq!(
        run_loop(&mut tr, |_, _| None).status,
        Some(ExitStatus::Code(255))
    );
}

#[test]
fn spawn_finds_programs_in_path() {
    let mut tr = Tracer::spawn(&[OsString::from("true")]).unwrap();
    assert_eq!(
        run_loop(&mut tr, |_, _| None).status,
        Some(ExitStatus::Code(0))
    );
    let mut tr = Tracer::spawn(&[OsString::from("false")]).unwrap();
    assert_eq!(
        run_loop(&mut tr, |_, _| None).status,
        Some(ExitStatus::Code(1))
    );
}

#[test]
fn killed_by_signal_status_is_exact() {
    let d = temp_dir("sigterm");
    let exe = compile(
        &d,
        "sigterm",
        "#include <signal.h>\n#include <unistd.h>\nint main(void){ kill(getpid(), SIGTERM); return 0; }\n",
        &[],
    );
    let mut tr = Tracer::spawn(&argv(&[&exe])).unwrap();
    let seen = run_loop(&mut tr, |_, _| None);
    assert_eq!(seen.signals(), vec![libc::SIGTERM]);
    assert_eq!(
        seen.status,
        Some(ExitStatus::Signaled {
            signal: libc::SIGTERM,
            core_dumped: false
        })
    );
}

#[test]
fn bad_programs_give_clear_errors() {
    let d = temp_dir("bad");
    match Tracer::spawn(&[OsString::from("/nonexistent/dir/prog")]) {
        Err(TracerError::ProgramNotFound(_)) => {}
        other => panic!("expected ProgramNotFound, got {other:?}"),
    }
    match Tracer::spawn(&[OsString::from("surely-no-such-program-xyz")]) {
        Err(TracerError::ProgramNotFound(_)) => {}
        other => panic!("expected ProgramNotFound, got {other:?}"),
    }
    assert!(matches!(Tracer::spawn(&[]), Err(TracerError::EmptyCommand)));

    let noexec = d.path().join("noexec");
    std::fs::write(&noexec, b"\x7fELF").unwrap();
    std::fs::set_permissions(&noexec, std::fs::Permissions::from_mode(0o644)).unwrap();
    match Tracer::spawn(&[noexec.clone().into_os_string()]) {
        Err(TracerError::NotExecutable(p)) => assert_eq!(p, noexec),
        other => panic!("expected NotExecutable, got {other:?}"),
    }
    match Tracer::spawn(&[d.path().as_os_str().to_os_string()]) {
        Err(TracerError::NotExecutable(_)) => {}
        other => panic!("expected NotExecutable for a directory, got {other:?}"),
    }

    // A script whose #! interpreter is plain text is refused; one with a real interpreter is started (below).
    let text = d.path().join("text");
    std::fs::write(&text, "just text\n").unwrap();
    std::fs::set_permissions(&text, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = d.path().join("script.sh");
    std::fs::write(&script, format!("#!{}\nexit 0\n", text.display())).unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    match Tracer::spawn(&[script.into_os_string()]) {
        Err(e @ TracerError::NotElf(_)) => assert!(e.to_string().contains("not an ELF")),
        other => panic!("expected NotElf, got {other:?}"),
    }
    let good = d.path().join("good.sh");
    std::fs::write(&good, "#!/bin/sh\nexit 7\n").unwrap();
    std::fs::set_permissions(&good, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut t =
        Tracer::spawn(&[good.into_os_string()]).expect("a script with a real interpreter starts");
    t.resume_all().unwrap();
    loop {
        match t.next_event(None).unwrap() {
            Some(tracer::Event::Exited { status, .. }) => {
                assert_eq!(status, tracer::ExitStatus::Code(7));
                break;
            }
            Some(tracer::Event::Exec { pid }) => t.resume(pid, None).unwrap(),
            Some(_) => t.resume_all().unwrap(),
            None => {}
        }
    }

    // A 32-bit i386 ELF header.
    let mut hdr = vec![0u8; 64];
    hdr[..4].copy_from_slice(b"\x7fELF");
    hdr[4] = 1;
    hdr[5] = 1;
    hdr[6] = 1;
    hdr[16] = 2;
    hdr[18] = 3;
    let elf32 = d.path().join("elf32");
    std::fs::write(&elf32, &hdr).unwrap();
    std::fs::set_permissions(&elf32, std::fs::Permissions::from_mode(0o755)).unwrap();
    match Tracer::spawn(&[elf32.into_os_string()]) {
        Err(e @ TracerError::WrongArch { .. }) => assert!(e.to_string().contains("i386"), "{e}"),
        other => panic!("expected WrongArch, got {other:?}"),
    }

    // An AArch64 ELF.
    hdr[4] = 2;
    hdr[18] = 183;
    let arm = d.path().join("arm64");
    std::fs::write(&arm, &hdr).unwrap();
    std::fs::set_permissions(&arm, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert!(matches!(
        Tracer::spawn(&[arm.into_os_string()]),
        Err(TracerError::WrongArch { .. })
    ));

    // A process that is already traced (here by another tracer of this process).
    let d2 = temp_dir("traced");
    let exe = compile(&d2, "exit", EXIT_ARG, &[]);
    let first = Tracer::spawn(&argv(&[&exe])).unwrap();
    match Tracer::attach(first.root()) {
        Err(e @ TracerError::PermissionDenied { .. }) => {
            assert!(e.to_string().contains("already traced"), "{e}")
        }
        other => panic!("expected PermissionDenied, got {other:?}"),
    }
    drop(first);
    // PID 2 is kthreadd.
    match Tracer::attach(Pid::from_raw(2)) {
        Err(e @ TracerError::Unsupported(_)) => assert!(e.to_string().contains("kernel thread")),
        other => panic!("expected a kernel-thread error, got {other:?}"),
    }
    match Tracer::attach(Pid::from_raw(i32::MAX - 7)) {
        Err(e @ TracerError::NoSuchProcess(_)) => assert!(e.to_string().contains("does not exist")),
        other => panic!("expected NoSuchProcess, got {other:?}"),
    }
}

const THREADS: &str = r#"
#include <pthread.h>
static void *work(void *a) { volatile long s = 0; for (long i = 0; i < 2000000; i++) s += i; return a; }
int main(void) {
    pthread_t t[3];
    for (int i = 0; i < 3; i++) pthread_create(&t[i], 0, work, 0);
    for (int i = 0; i < 3; i++) pthread_join(t[i], 0);
    return 5;
}
"#;

#[test]
fn threads_are_followed() {
    let d = temp_dir("threads");
    let exe = compile(&d, "threads", THREADS, &[]);
    let mut tr = Tracer::spawn(&argv(&[&exe])).unwrap();
    let root = tr.root();
    let mut max_threads = 0;
    let seen = run_loop(&mut tr, |tr, ev| {
        if let Event::NewThread { tid, parent } = ev {
            assert_eq!(*parent, root);
            assert!(tr.is_stopped(*tid) && tr.is_stopped(*parent));
            assert_eq!(tr.tgid(*tid), Some(root));
            // Registers of a new thread are readable while it is stopped.
            tr.regs(*tid).unwrap();
            max_threads = max_threads.max(tr.threads(root).len());
        }
        None
    });
    assert_eq!(seen.count(|e| matches!(e, Event::NewThread { .. })), 3);
    assert_eq!(seen.count(|e| matches!(e, Event::ThreadExited { .. })), 3);
    assert!(max_threads >= 2);
    assert_eq!(seen.status, Some(ExitStatus::Code(5)));
}

#[test]
fn stop_all_and_resume_all_with_threads() {
    let d = temp_dir("stopall");
    let exe = compile(&d, "threads", THREADS, &[]);
    let mut tr = Tracer::spawn(&argv(&[&exe])).unwrap();
    let root = tr.root();
    let mut stops = 0;
    let seen = run_loop(&mut tr, |tr, ev| {
        if matches!(ev, Event::NewThread { .. }) && stops < 3 {
            // Everything stopped at once: all registers are readable.
            tr.resume_all().unwrap();
            tr.stop_all().unwrap();
            for t in tr.all_threads() {
                assert!(tr.is_stopped(t), "{t} not stopped");
                tr.regs(t).unwrap();
            }
            // Events collected while stopping stay queued (their threads stay stopped); everything else runs.
            tr.resume_all().unwrap();
            stops += 1;
        }
        None
    });
    assert_eq!(seen.status, Some(ExitStatus::Code(5)));
    assert!(tr_root_gone(root));
}

fn tr_root_gone(root: Pid) -> bool {
    // The root has been reaped: its /proc entry is gone (or belongs to a reused pid, which is unlikely here).
    !std::path::Path::new(&format!("/proc/{root}/status")).exists()
        || std::fs::read_to_string(format!("/proc/{root}/status"))
            .map_or(true, |s| s.contains("Z (zombie)"))
}

const FORK_EXEC: &str = r#"
#include <unistd.h>
#include <sys/wait.h>
int main(int c, char **v) {
    if (c > 1) return 17;
    pid_t p = fork();
    if (p == 0) { execl("/proc/self/exe", v[0], "child", (char *)0); _exit(99); }
    int st = 0;
    waitpid(p, &st, 0);
    return WEXITSTATUS(st) + 1;
}
"#;

#[test]
fn fork_and_exec_are_followed() {
    let d = temp_dir("forkexec");
    let exe = compile(&d, "forkexec", FORK_EXEC, &[]);
    let mut tr = Tracer::spawn(&argv(&[&exe])).unwrap();
    let root = tr.root();
    let mut child = None;
    let seen = run_loop(&mut tr, |tr, ev| {
        match ev {
            Event::Forked { parent, child: c } => {
                assert_eq!(*parent, root);
                assert!(tr.processes().contains(c));
                assert!(tr.is_stopped(*c));
                child = Some(*c);
            }
            Event::Exec { pid } => assert_eq!(Some(*pid), child),
            _ => {}
        }
        None
    });
    let child = child.expect("fork seen");
    assert_eq!(
        seen.count(|e| matches!(e, Event::Exec { pid } if *pid == child)),
        1
    );
    assert!(seen.events.iter().any(
        |e| matches!(e, Event::Exited { pid, status: ExitStatus::Code(17) } if *pid == child)
    ));
    assert!(
        seen.signals().contains(&libc::SIGCHLD),
        "SIGCHLD reaches the parent"
    );
    assert_eq!(seen.status, Some(ExitStatus::Code(18)));
}

const SIGNALS: &str = r#"
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/time.h>
#include <unistd.h>
static sigjmp_buf jb;
static volatile int alarms, usr1;
static pthread_t main_thread;
static void on_segv(int s) { (void)s; siglongjmp(jb, 1); }
static void on_alrm(int s) { (void)s; alarms++; }
static void on_usr1(int s) { (void)s; usr1++; }
static void *poke(void *a) { pthread_kill(main_thread, SIGUSR1); return a; }
int main(void) {
    signal(SIGSEGV, on_segv); signal(SIGALRM, on_alrm); signal(SIGUSR1, on_usr1);
    main_thread = pthread_self();
    int caught = 0;
    if (!sigsetjmp(jb, 1)) *(volatile int *)8 = 1; else caught = 1;
    struct itimerval it = {{0, 2000}, {0, 2000}};
    setitimer(ITIMER_REAL, &it, 0);
    while (alarms < 5) pause();
    struct itimerval off = {{0, 0}, {0, 0}};
    setitimer(ITIMER_REAL, &off, 0);
    pthread_t t; pthread_create(&t, 0, poke, 0); pthread_join(t, 0);
    while (!usr1) usleep(1000);
    return caught * 100 + (alarms >= 5) * 10 + usr1;
}
"#;

#[test]
fn program_signals_reach_the_program() {
    let d = temp_dir("signals");
    let exe = compile(&d, "signals", SIGNALS, &[]);
    let mut tr = Tracer::spawn(&argv(&[&exe])).unwrap();
    let seen = run_loop(&mut tr, |_, ev| {
        if let Event::Signal {
            signal: libc::SIGSEGV,
            siginfo,
            ..
        } = ev
        {
            // SAFETY: SIGSEGV siginfo carries the faulting address.
            assert_eq!(unsafe { siginfo.si_addr() } as usize, 8);
        }
        None
    });
    let sigs = seen.signals();
    assert!(sigs.contains(&libc::SIGSEGV));
    assert!(sigs.iter().filter(|s| **s == libc::SIGALRM).count() >= 5);
    assert!(sigs.contains(&libc::SIGUSR1));
    assert_eq!(seen.status, Some(ExitStatus::Code(111)));
}

const GROUP_STOP: &str = r#"
#include <signal.h>
#include <stdio.h>
int main(int c, char **v) {
    FILE *f = fopen(v[1], "w");
    fprintf(f, "before\n"); fflush(f);
    raise(SIGSTOP);
    fprintf(f, "after\n"); fclose(f);
    return 3;
}
"#;

#[test]
fn job_control_stop_and_continue() {
    let d = temp_dir("groupstop");
    let exe = compile(&d, "groupstop", GROUP_STOP, &[]);
    let out = d.path().join("out.txt");
    let mut tr = Tracer::spawn(&argv(&[&exe, &out])).unwrap();
    let pid = tr.root();
    tr.resume_all().unwrap();
    // Drive events until the program is in its job-control stop.
    let mut stopped = false;
    for _ in 0..500 {
        if let Some(ev) = tr.next_event(Some(Duration::from_millis(10))).unwrap() {
            panic!("unexpected event {ev:?}");
        }
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        if std::fs::read_to_string(&out).unwrap_or_default() == "before\n"
            && (st.contains("State:\tt") || st.contains("State:\tT"))
        {
            stopped = true;
            break;
        }
    }
    assert!(stopped, "program should be stopped by its SIGSTOP");
    // stop_all/resume_all must keep it stopped, even after system calls were injected meanwhile.
    tr.stop_all().unwrap();
    let before = tr.regs(pid).unwrap();
    assert_eq!(
        tr.remote_syscall(pid, libc::SYS_getpid, [0; 6]).unwrap(),
        pid.as_raw() as i64
    );
    assert_eq!(
        tr.remote_syscall(pid, libc::SYS_getpid, [0; 6]).unwrap(),
        pid.as_raw() as i64
    );
    assert_eq!(
        format!("{before:?}"),
        format!("{:?}", tr.regs(pid).unwrap())
    );
    tr.resume_all().unwrap();
    assert!(tr
        .next_event(Some(Duration::from_millis(50)))
        .unwrap()
        .is_none());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "before\n");
    // SAFETY: plain kill of our traced child.
    unsafe { libc::kill(pid.as_raw(), libc::SIGCONT) };
    let seen = run_loop(&mut tr, |_, _| None);
    assert_eq!(seen.status, Some(ExitStatus::Code(3)));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "before\nafter\n");
}

const ATTACH_LOOP: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
volatile long counter;
static void *spin(void *a) { for (int i = 0; i < 300; i++) { counter++; usleep(1000); } return a; }
int main(void) {
    pthread_t t; pthread_create(&t, 0, spin, 0);
    for (int i = 0; i < 60; i++) { printf("line %d\n", i); fflush(stdout); usleep(5000); }
    pthread_join(t, 0);
    printf("done\n");
    return 0;
}
"#;

/// Start `exe` untraced with its stdout in `d/out.txt` (killed when the guard drops).
fn spawn_logged(d: &TempDir, exe: &std::path::Path) -> (KillOnDrop, std::path::PathBuf) {
    let out = d.path().join("out.txt");
    let child = std::process::Command::new(exe)
        .stdout(std::fs::File::create(&out).unwrap())
        .spawn()
        .unwrap();
    (KillOnDrop(child), out)
}

#[test]
fn attach_then_detach_leaves_the_program_running() {
    let d = temp_dir("attach");
    let exe = compile(&d, "attach", ATTACH_LOOP, &[]);
    let (mut child, out) = spawn_logged(&d, &exe);
    wait_lines(&out, 3);
    let pid = child.pid();
    let tr = Tracer::attach(pid).unwrap();
    assert_eq!(tr.root(), pid);
    let threads = tr.threads(pid);
    assert_eq!(threads.len(), 2, "both threads seized: {threads:?}");
    for t in &threads {
        assert!(tr.is_stopped(*t));
        tr.regs(*t).unwrap();
    }
    let mut word = [0u8; 8];
    let regs = tr.regs(pid).unwrap();
    tr.read_memory(pid, Addr(regs.rsp), &mut word).unwrap();
    tr.detach().unwrap();
    let status = child.0.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let text = std::fs::read_to_string(&out).unwrap();
    let expected: String = (0..60).map(|i| format!("line {i}\n")).collect::<String>() + "done\n";
    assert_eq!(text, expected);
}

#[test]
fn attach_drop_detaches_and_errors_on_self() {
    let d = temp_dir("attach2");
    let exe = compile(&d, "attach", ATTACH_LOOP, &[]);
    let (mut child, out) = spawn_logged(&d, &exe);
    wait_lines(&out, 2);
    {
        let mut tr = Tracer::attach(child.pid()).unwrap();
        tr.resume_all().unwrap();
        let _ = tr.next_event(Some(Duration::from_millis(20))).unwrap();
        tr.stop_all().unwrap();
        // Dropped here: detached, not killed.
    }
    assert_eq!(child.0.wait().unwrap().code(), Some(0));
    assert!(std::fs::read_to_string(&out).unwrap().ends_with("done\n"));
    assert!(Tracer::attach(nix::unistd::getpid()).is_err());
}

const ANSWER: &str = r#"
__attribute__((noipa)) int answer(void) { return 1; }
int main(void) { return answer(); }
"#;

/// `nm` value of a symbol in an ELF file.
fn nm_value(exe: &std::path::Path, name: &str) -> u64 {
    let out = std::process::Command::new("nm").arg(exe).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.split_whitespace().nth(2) == Some(name))
        .unwrap_or_else(|| panic!("{name} not in nm output"));
    u64::from_str_radix(line.split_whitespace().next().unwrap(), 16).unwrap()
}

fn patch_answer(flags: &[&str], pie: bool) {
    let d = temp_dir("answer");
    let exe = compile(&d, "answer", ANSWER, flags);
    let mut tr = Tracer::spawn(&argv(&[&exe])).unwrap();
    let pid = tr.root();
    let mods = tracer::modules(pid).unwrap();
    let exe_canon = std::fs::canonicalize(&exe).unwrap();
    let m = mods
        .iter()
        .find(|m| std::fs::canonicalize(&m.path).ok().as_ref() == Some(&exe_canon))
        .expect("the program is a module");
    assert!(
        mods.iter()
            .any(|m| m.path.to_string_lossy().contains("ld-linux")),
        "{mods:?}"
    );
    let vdso = mods
        .iter()
        .find(|m| m.path == std::path::Path::new("[vdso]"))
        .expect("the vDSO is a module");
    let cg = vdso
        .symbols
        .iter()
        .find(|s| s.name.contains("clock_gettime"))
        .expect("vDSO symbols");
    assert!(cg.start >= vdso.start && cg.end <= vdso.end);
    let sym = m.symbol("answer").expect("answer symbol").clone();
    let value = nm_value(&exe, "answer");
    if pie {
        assert_ne!(m.base.0, 0);
    } else {
        assert_eq!(m.base.0, 0);
    }
    assert_eq!(sym.start.0, m.base.0 + value);
    assert!(sym.end > sym.start);
    let (sm, ss) = tracer::symbolize(&mods, sym.start.offset(1)).unwrap();
    assert_eq!(sm.path, m.path);
    assert_eq!(ss.unwrap().name, "answer");
    // The code page is r-x; /proc/PID/mem writes anyway.
    let maps = read_maps(pid).unwrap();
    let cm = mapping_at(&maps, sym.start).unwrap();
    assert!(cm.exec && !cm.write);
    let patch = [0xb8, 7, 0, 0, 0, 0xc3]; // mov eax, 7; ret
    tr.write_memory(pid, sym.start, &patch).unwrap();
    let mut back = [0u8; 6];
    tr.read_memory(pid, sym.start, &mut back).unwrap();
    assert_eq!(back, patch);
    assert_eq!(
        run_loop(&mut tr, |_, _| None).status,
        Some(ExitStatus::Code(7))
    );
}

#[test]
fn symbols_and_code_patch_pie() {
    patch_answer(&["-pie", "-fPIE"], true);
}

#[test]
fn symbols_and_code_patch_non_pie() {
    patch_answer(&["-no-pie", "-fno-pie"], false);
}

#[test]
fn stripped_binary_has_a_module_without_symbols() {
    let d = temp_dir("stripped");
    let exe = compile(&d, "answer", ANSWER, &["-s"]);
    let mut tr = Tracer::spawn(&argv(&[&exe])).unwrap();
    let mods = tracer::modules(tr.root()).unwrap();
    let exe_canon = std::fs::canonicalize(&exe).unwrap();
    let m = mods
        .iter()
        .find(|m| std::fs::canonicalize(&m.path).ok().as_ref() == Some(&exe_canon))
        .expect("the program is a module");
    assert!(m.symbols.iter().all(|s| s.name != "answer"));
    let regs = tr.regs(tr.root()).unwrap();
    // The entry point of a stripped program still belongs to some module (ld.so at exec time).
    assert!(tracer::symbolize(&mods, Addr(regs.rip)).is_some());
    assert_eq!(
        run_loop(&mut tr, |_, _| None).status,
        Some(ExitStatus::Code(1))
    );
}

#[test]
fn memory_errors_are_typed() {
    let d = temp_dir("memerr");
    let exe = compile(&d, "exit", EXIT_ARG, &[]);
    let tr = Tracer::spawn(&argv(&[&exe])).unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(
        tr.read_memory(tr.root(), Addr(8), &mut buf),
        Err(TracerError::ShortAccess { done: 0, .. })
    ));
    assert!(tr.write_memory(tr.root(), Addr(8), &buf).is_err());
}

#[test]
fn remote_mmap_mprotect_munmap() {
    let d = temp_dir("remote");
    let exe = compile(&d, "exit", EXIT_ARG, &[]);
    let mut tr = Tracer::spawn(&argv(&[&exe, &"9"])).unwrap();
    let pid = tr.root();
    let at_exec = tr.regs(pid).unwrap();
    assert_eq!(
        tr.remote_syscall(pid, libc::SYS_getpid, [0; 6]).unwrap(),
        pid.as_raw() as i64
    );
    // The first injection lets execve return (rax = 0) without running any program code.
    let before = tr.regs(pid).unwrap();
    assert_eq!(before.rip, at_exec.rip);
    assert_eq!(before.rsp, at_exec.rsp);
    assert_eq!(before.rax, 0);
    let a = remote_mmap(
        &mut tr,
        pid,
        Addr(0),
        8192,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    )
    .unwrap();
    assert_eq!(a.0 % 4096, 0);
    tr.write_memory(pid, a.offset(100), b"hello").unwrap();
    let mut b = [0u8; 5];
    tr.read_memory(pid, a.offset(100), &mut b).unwrap();
    assert_eq!(&b, b"hello");
    let m = mapping_at(&read_maps(pid).unwrap(), a).unwrap().clone();
    assert!(m.read && m.write && !m.exec && m.start == a);
    remote_mprotect(&mut tr, pid, a, 4096, libc::PROT_READ).unwrap();
    let maps = read_maps(pid).unwrap();
    assert!(!mapping_at(&maps, a).unwrap().write);
    assert!(mapping_at(&maps, a.offset(4096)).unwrap().write);
    match remote_munmap(&mut tr, pid, a.offset(1), 4096) {
        Err(TracerError::RemoteSyscall { errno, .. }) => assert_eq!(errno, libc::EINVAL),
        other => panic!("expected EINVAL, got {other:?}"),
    }
    remote_munmap(&mut tr, pid, a, 8192).unwrap();
    assert!(mapping_at(&read_maps(pid).unwrap(), a).is_none());
    // A stale gadget (its memory is gone, or it is not a syscall any more) is replaced transparently.
    tr.set_syscall_gadget(pid, a);
    assert_eq!(
        tr.remote_syscall(pid, libc::SYS_getpid, [0; 6]).unwrap(),
        pid.as_raw() as i64
    );
    let code = Addr(before.rip); // the entry point: not a syscall instruction
    tr.set_syscall_gadget(pid, code);
    assert_eq!(
        tr.remote_syscall(pid, libc::SYS_getpid, [0; 6]).unwrap(),
        pid.as_raw() as i64
    );
    // Registers are exactly as before.
    let after = tr.regs(pid).unwrap();
    assert_eq!(format!("{before:?}"), format!("{after:?}"));
    assert_eq!(
        run_loop(&mut tr, |_, _| None).status,
        Some(ExitStatus::Code(9))
    );
}

const BLOCKED_READ: &str = r#"
#include <fcntl.h>
#include <unistd.h>
int main(int c, char **v) {
    int fd = open(v[1], O_RDWR);
    char buf[8];
    ssize_t n = read(fd, buf, sizeof buf);
    return n == 3 && buf[0] == 'a' && buf[2] == 'c' ? 0 : 1;
}
"#;

#[test]
fn remote_syscall_inside_a_blocked_syscall_restarts_it() {
    let d = temp_dir("blocked");
    let exe = compile(&d, "blocked", BLOCKED_READ, &[]);
    let fifo = d.path().join("fifo");
    let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut tr = Tracer::spawn(&argv(&[&exe, &fifo])).unwrap();
    let pid = tr.root();
    tr.resume_all().unwrap();
    // Wait until it blocks in read(2).
    let mut blocked = false;
    for _ in 0..2000 {
        assert!(tr
            .next_event(Some(Duration::from_millis(5)))
            .unwrap()
            .is_none());
        let sc = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        if sc.starts_with("0 ") {
            blocked = true;
            break;
        }
    }
    assert!(blocked);
    tr.stop_all().unwrap();
    let regs = tr.regs(pid).unwrap();
    assert_eq!(regs.orig_rax, 0, "stopped inside read");
    assert_eq!(regs.rax as i64, -512, "-ERESTARTSYS");
    for _ in 0..3 {
        assert_eq!(
            tr.remote_syscall(pid, libc::SYS_getpid, [0; 6]).unwrap(),
            pid.as_raw() as i64
        );
    }
    let a = remote_mmap(
        &mut tr,
        pid,
        Addr(0),
        4096,
        libc::PROT_READ,
        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
        -1,
        0,
    )
    .unwrap();
    remote_munmap(&mut tr, pid, a, 4096).unwrap();
    let after = tr.regs(pid).unwrap();
    assert_eq!(format!("{regs:?}"), format!("{after:?}"));
    tr.resume_all().unwrap();
    std::fs::write(&fifo, b"abc").unwrap();
    assert_eq!(
        run_loop(&mut tr, |_, _| None).status,
        Some(ExitStatus::Code(0))
    );
}

#[test]
fn remote_syscall_at_a_signal_stop_keeps_the_signal() {
    let d = temp_dir("sigstop-remote");
    let exe = compile(&d, "signals", SIGNALS, &[]);
    let mut tr = Tracer::spawn(&argv(&[&exe])).unwrap();
    let mut did = false;
    let seen = run_loop(&mut tr, |tr, ev| {
        if let Event::Signal {
            tid,
            signal: libc::SIGSEGV,
            ..
        } = ev
        {
            tr.remote_syscall(*tid, libc::SYS_getpid, [0; 6]).unwrap();
            let si = tr.siginfo(*tid).unwrap();
            assert_eq!(si.si_signo, libc::SIGSEGV);
            // SAFETY: SIGSEGV siginfo carries the faulting address.
            assert_eq!(unsafe { si.si_addr() } as usize, 8);
            did = true;
        }
        None
    });
    assert!(did);
    assert_eq!(seen.status, Some(ExitStatus::Code(111)));
}

const THREAD_EXEC: &str = r#"
#include <pthread.h>
#include <unistd.h>
static char *self;
static void *run(void *a) { execl(self, self, "again", (char *)0); return a; }
int main(int c, char **v) {
    if (c > 1) return 23;
    self = v[0];
    pthread_t t;
    pthread_create(&t, 0, run, 0);
    for (;;) pause();
}
"#;

#[test]
fn exec_from_a_non_leader_thread() {
    let d = temp_dir("threadexec");
    let exe = compile(&d, "threadexec", THREAD_EXEC, &[]);
    let mut tr = Tracer::spawn(&argv(&[&exe])).unwrap();
    let root = tr.root();
    let mut execs = 0;
    let seen = run_loop(&mut tr, |tr, ev| {
        if let Event::Exec { pid } = ev {
            assert_eq!(*pid, root, "after exec the process keeps its tgid");
            assert_eq!(tr.threads(root), vec![root], "the thread list collapsed");
            assert_eq!(
                tr.remote_syscall(*pid, libc::SYS_gettid, [0; 6]).unwrap(),
                root.as_raw() as i64
            );
            execs += 1;
        }
        None
    });
    assert_eq!(execs, 1);
    assert_eq!(seen.status, Some(ExitStatus::Code(23)));
}

const SPAWNER: &str = r#"
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>
extern char **environ;
int main(int c, char **v) {
    if (c > 1) return 4;
    int total = 0;
    for (int i = 0; i < 3; i++) {
        pid_t p;
        char *args[] = {v[0], "child", 0};
        if (posix_spawn(&p, v[0], 0, 0, args, environ)) return 100;
        int st; waitpid(p, &st, 0);
        total += WEXITSTATUS(st);
        pid_t q = vfork();
        if (q == 0) _exit(1);
        waitpid(q, &st, 0);
        total += WEXITSTATUS(st);
    }
    return total;
}
"#;

#[test]
fn vfork_and_posix_spawn_with_stop_all_and_remote_syscalls() {
    let d = temp_dir("spawner");
    let exe = compile(&d, "spawner", SPAWNER, &[]);
    let mut tr = Tracer::spawn(&argv(&[&exe])).unwrap();
    let mut forks = 0;
    let mut vforks = 0;
    let seen = run_loop(&mut tr, |tr, ev| {
        if let Event::Forked { parent, child } = ev {
            forks += 1;
            // Both are stopped at the fork: system calls can be injected into each.
            assert_eq!(
                tr.remote_syscall(*child, libc::SYS_gettid, [0; 6]).unwrap(),
                child.as_raw() as i64
            );
            if tr.in_vfork(*parent) {
                assert!(matches!(
                    tr.remote_syscall(*parent, libc::SYS_gettid, [0; 6]),
                    Err(TracerError::Unsupported(_))
                ));
                vforks += 1;
            } else {
                assert_eq!(
                    tr.remote_syscall(*parent, libc::SYS_gettid, [0; 6])
                        .unwrap(),
                    parent.as_raw() as i64
                );
            }
        }
        // Stopping everything at every event must never deadlock on a parent blocked in vfork.
        tr.stop_all().unwrap();
        tr.resume_all().unwrap();
        None
    });
    assert_eq!(forks, 6);
    assert_eq!(vforks, 6, "posix_spawn and vfork both use CLONE_VFORK");
    assert_eq!(seen.status, Some(ExitStatus::Code(15)));
}

#[test]
fn remote_syscalls_at_new_thread_events() {
    let d = temp_dir("threads-remote");
    let exe = compile(&d, "threads", THREADS, &[]);
    let mut tr = Tracer::spawn(&argv(&[&exe])).unwrap();
    let mut n = 0;
    let seen = run_loop(&mut tr, |tr, ev| {
        if let Event::NewThread { tid, parent } = ev {
            assert_eq!(
                tr.remote_syscall(*tid, libc::SYS_gettid, [0; 6]).unwrap(),
                tid.as_raw() as i64
            );
            assert_eq!(
                tr.remote_syscall(*parent, libc::SYS_gettid, [0; 6])
                    .unwrap(),
                parent.as_raw() as i64
            );
            n += 1;
        }
        None
    });
    assert_eq!(n, 3);
    assert_eq!(seen.status, Some(ExitStatus::Code(5)));
}

#[test]
fn attach_to_a_stopped_process_keeps_it_stopped() {
    let d = temp_dir("attachstopped");
    let exe = compile(&d, "attach", ATTACH_LOOP, &[]);
    let (mut child, out) = spawn_logged(&d, &exe);
    wait_lines(&out, 2);
    let pid = child.pid();
    // SAFETY: plain kill of our child.
    unsafe { libc::kill(pid.as_raw(), libc::SIGSTOP) };
    let mut stopped = false;
    for _ in 0..1000 {
        let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        if st.contains("State:\tT") {
            stopped = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(stopped);
    let lines_before = std::fs::read_to_string(&out).unwrap().lines().count();
    let mut tr = Tracer::attach(pid).unwrap();
    for t in tr.threads(pid) {
        tr.regs(t).unwrap();
    }
    tr.resume_all().unwrap();
    assert!(tr
        .next_event(Some(Duration::from_millis(30)))
        .unwrap()
        .is_none());
    tr.detach().unwrap();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap().lines().count(),
        lines_before,
        "still stopped"
    );
    // SAFETY: plain kill of our child.
    unsafe { libc::kill(pid.as_raw(), libc::SIGCONT) };
    assert_eq!(child.0.wait().unwrap().code(), Some(0));
    assert!(std::fs::read_to_string(&out).unwrap().ends_with("done\n"));
}

const LEADER_EXIT: &str = r#"
#include <pthread.h>
#include <stdio.h>
#include <unistd.h>
static void *work(void *a) {
    for (int i = 0; i < 40; i++) { printf("tick %d\n", i); fflush(stdout); usleep(5000); }
    _exit(6);
    return a;
}
int main(void) {
    pthread_t t;
    pthread_create(&t, 0, work, 0);
    pthread_exit(0);
}
"#;

#[test]
fn attach_when_the_main_thread_already_exited() {
    let d = temp_dir("leaderexit");
    let exe = compile(&d, "leaderexit", LEADER_EXIT, &[]);
    let (mut child, out) = spawn_logged(&d, &exe);
    wait_lines(&out, 3);
    let pid = child.pid();
    // Make sure the main thread is gone (a zombie) before attaching.
    for _ in 0..5000 {
        let st =
            std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/status")).unwrap_or_default();
        if st.contains("State:\tZ") {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut tr = Tracer::attach(pid).unwrap();
    assert_eq!(tr.processes(), vec![pid]);
    let threads = tr.threads(pid);
    assert_eq!(threads.len(), 1, "only the live thread: {threads:?}");
    assert_ne!(threads[0], pid);
    tr.regs(threads[0]).unwrap();
    let seen = run_loop(&mut tr, |_, _| None);
    assert_eq!(seen.status, Some(ExitStatus::Code(6)));
    drop(tr);
    assert_eq!(child.0.wait().unwrap().code(), Some(6));
}

/// Run a shell command line under the tracer (the shell forks and execs the program), return its stdout file.
fn run_shell(d: &TempDir, cmd: &str) -> (Option<ExitStatus>, String) {
    let out = d.path().join("stdout.txt");
    let line = format!("{cmd} > {}", out.display());
    let mut tr = Tracer::spawn(&argv(&[&"/bin/sh", &"-c", &line])).unwrap();
    let seen = run_loop(&mut tr, |_, _| None);
    (
        seen.status,
        std::fs::read_to_string(&out).unwrap_or_default(),
    )
}

#[test]
fn samples_give_identical_output_under_the_tracer() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples");
    for (name, code) in [
        ("signals", 3),
        ("fork_exec", 0),
        ("kernel_read", 0),
        ("mt_interp", 0),
    ] {
        let src = root.join(format!("{name}.c"));
        let Ok(text) = std::fs::read_to_string(&src) else {
            panic!("sample {name} missing");
        };
        let d = temp_dir(name);
        let exe = compile(&d, name, &text, &["-O2"]);
        let expected = std::fs::read_to_string(root.join(format!("{name}.expected"))).unwrap();
        let (status, out) = run_shell(&d, &exe.display().to_string());
        assert_eq!(out, expected, "stdout of {name}");
        assert_eq!(
            status,
            Some(ExitStatus::Code(code)),
            "exit status of {name}"
        );
    }
}

#[test]
fn symbols_of_a_deleted_binary() {
    let d = temp_dir("deleted");
    let exe = compile(&d, "answer", ANSWER, &[]);
    let mut tr = Tracer::spawn(&argv(&[&exe])).unwrap();
    std::fs::remove_file(&exe).unwrap();
    let mods = tracer::modules(tr.root()).unwrap();
    let m = mods
        .iter()
        .find(|m| m.path.file_name().is_some_and(|n| n == "answer"))
        .expect("the deleted program is still a module");
    assert!(m.symbol("answer").is_some());
    assert_eq!(
        run_loop(&mut tr, |_, _| None).status,
        Some(ExitStatus::Code(1))
    );
}

const CHILD_JOB_CONTROL: &str = r#"
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>
int main(void) {
    pid_t p = fork();
    if (p == 0) { for (;;) pause(); }
    int st = 0, ok = 0;
    kill(p, SIGSTOP);
    if (waitpid(p, &st, WUNTRACED) == p && WIFSTOPPED(st) && WSTOPSIG(st) == SIGSTOP) ok |= 1;
    kill(p, SIGCONT);
    if (waitpid(p, &st, WCONTINUED) == p && WIFCONTINUED(st)) ok |= 2;
    kill(p, SIGTERM);
    if (waitpid(p, &st, 0) == p && WIFSIGNALED(st) && WTERMSIG(st) == SIGTERM) ok |= 4;
    return ok;
}
"#;

#[test]
fn job_control_of_a_traced_child_seen_by_its_parent() {
    let d = temp_dir("childjob");
    let exe = compile(&d, "childjob", CHILD_JOB_CONTROL, &[]);
    let mut tr = Tracer::spawn(&argv(&[&exe])).unwrap();
    let seen = run_loop(&mut tr, |_, _| None);
    assert_eq!(seen.status, Some(ExitStatus::Code(7)), "{:?}", seen.events);
    assert!(seen.events.iter().any(|e| matches!(
        e,
        Event::Exited {
            status: ExitStatus::Signaled {
                signal: libc::SIGTERM,
                ..
            },
            ..
        }
    )));
}

const SIGNAL_STATE: &str = r#"
#define _GNU_SOURCE
#include <signal.h>
int main(void) {
    struct sigaction sa;
    sigaction(SIGPIPE, 0, &sa);
    sigset_t m;
    sigprocmask(SIG_BLOCK, 0, &m);
    return (sa.sa_handler == SIG_DFL ? 0 : 1) + (sigisemptyset(&m) ? 0 : 2);
}
"#;

#[test]
fn spawned_program_starts_with_default_sigpipe_and_empty_mask() {
    let d = temp_dir("sigstate");
    let exe = compile(&d, "sigstate", SIGNAL_STATE, &[]);
    // Block a signal in this (the tracer's) thread: the program must not inherit that.
    // SAFETY: plain sigset manipulation on a local, then pthread_sigmask on this thread.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
    let mut tr = Tracer::spawn(&argv(&[&exe])).unwrap();
    let status = run_loop(&mut tr, |_, _| None).status;
    // SAFETY: as above, unblock again.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR2);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    assert_eq!(status, Some(ExitStatus::Code(0)));
}

#[test]
fn timed_waits_always_end_while_the_target_is_quiet() {
    // A traced process that produces no event (sleeping): every timed wait must come back. With a wait timer
    // that fired once only, an expiry landing between arming and the blocking waitpid (likely with tiny
    // timeouts) was lost and the wait blocked until the next child event: forever, here.
    let mut tr = Tracer::spawn(&[OsString::from("sleep"), OsString::from("30")]).unwrap();
    tr.resume_all().unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watchdog = {
        let done = done.clone();
        std::thread::spawn(move || {
            for _ in 0..600 {
                if done.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            eprintln!("a timed wait never returned (lost timer wake-up)");
            std::process::abort();
        })
    };
    for i in 0..3_000u32 {
        let t = Duration::from_nanos(u64::from(i % 50) * 100 + 1);
        assert!(
            tr.next_event(Some(t)).unwrap().is_none(),
            "an event from a sleeping process"
        );
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    watchdog.join().unwrap();
}
