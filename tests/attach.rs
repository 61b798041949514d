//! `dynspec attach` on a process that must not be harmed: dynspec's death leaves it running, detach leaves
//! nothing behind, what attach cannot handle is refused with the target untouched.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    died_of, dynspec, expected, is_alive, sample, send_signal, text, tracer_pid, ChildGuard,
    TempDir,
};

/// serve_loop (or serve_patch) serving requests until its stdin (a pipe the test holds) closes.
struct Server {
    child: ChildGuard,
    name: &'static str,
}

impl Server {
    fn start() -> Server {
        Server::start_sample("serve_loop")
    }

    fn start_sample(name: &'static str) -> Server {
        let child = Command::new(sample(name))
            .arg("1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start serve_loop");
        Server {
            child: ChildGuard::new(child),
            name,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Close its stdin and check that it ends exactly like a native run.
    fn finish(mut self, what: &str) {
        let stdin = self.child.child_mut().stdin.take();
        drop(stdin);
        let out = self.child.wait_output();
        let name = self.name;
        assert_eq!(text(&out.stderr), "", "{what}: {name}'s stderr");
        assert_eq!(
            text(&out.stdout),
            text(&expected(name)),
            "{what}: {name}'s stdout"
        );
        assert_eq!(out.status.code(), Some(0), "{what}: {}", out.status);
    }

    /// Something on its stdin (it reads and ignores it): proves it still serves requests.
    fn poke(&mut self) {
        self.say(b"x");
    }

    /// Bytes on its stdin (serve_patch rewrites its bytecode on a `p`).
    fn say(&mut self, bytes: &[u8]) {
        let stdin = self.child.child_mut().stdin.as_mut().expect("stdin pipe");
        stdin.write_all(bytes).expect("write to serve_loop");
        stdin.flush().expect("flush serve_loop's stdin");
    }
}

/// `dynspec attach PID ARGS...` started in the background, stdout and stderr captured.
fn start_attach(pid: u32, args: &[&str], tmp: &TempDir) -> ChildGuard {
    let child = Command::new(dynspec())
        .arg("attach")
        .arg(pid.to_string())
        .args(["-q", "--report"])
        .arg(tmp.join("attach.json"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dynspec attach");
    ChildGuard::new(child)
}

fn wait_traced(pid: u32) {
    common::wait_for("dynspec to attach (TracerPid of the target)", || {
        tracer_pid(pid).is_none_or(|t| t != 0)
    });
}

fn wait_untraced(pid: u32) {
    common::wait_for("the target to be untraced", || {
        tracer_pid(pid).is_none_or(|t| t == 0)
    });
}

/// An attached process outlives dynspec: no PTRACE_O_EXITKILL on attach (a spawned one dies with it, see
/// tests/samples.rs `killing_dynspec_kills_its_target`).
#[test]
fn killing_dynspec_attach_profile_only_leaves_the_target_running() {
    let tmp = TempDir::new();
    let mut server = Server::start();
    let pid = server.pid();
    let tracer = start_attach(pid, &["--profile-only"], &tmp);
    wait_traced(pid);
    // Let it sample for a while, so the kill lands in the middle of profiling.
    std::thread::sleep(Duration::from_millis(300));
    send_signal(tracer.id() as i32, libc::SIGKILL);
    let out = tracer.wait_output();
    assert!(
        died_of(&out.status, libc::SIGKILL),
        "dynspec: {}",
        out.status
    );
    wait_untraced(pid);
    assert!(is_alive(pid), "the target died with dynspec attach");
    server.poke();
    std::thread::sleep(Duration::from_millis(50));
    assert!(
        is_alive(pid),
        "the target died after dynspec attach was killed"
    );
    server.finish("after SIGKILL of dynspec attach --profile-only");
}

/// A 32-bit process is refused before anything touches it, with the words `run` uses for its program.
#[test]
fn attach_refuses_a_32_bit_process_leaving_it_untouched() {
    let tmp = TempDir::new();
    let src = tmp.join("spin32.c");
    std::fs::write(
        &src,
        "void _start(void) { for (;;) __asm__ volatile(\"pause\"); }\n",
    )
    .expect("write spin32.c");
    let exe = tmp.join("spin32");
    // No 32-bit libc needed: a static program of its own `_start`.
    let built = Command::new("gcc")
        .args(["-m32", "-nostdlib", "-static", "-O2", "-o"])
        .arg(&exe)
        .arg(&src)
        .output();
    if !built.is_ok_and(|o| o.status.success()) {
        // The ELF-class check itself is unit-tested in tracer/src/program.rs on a crafted header.
        eprintln!("skipped: gcc cannot build a -m32 program here");
        return;
    }
    let target = ChildGuard::new(
        Command::new(&exe)
            .stdin(Stdio::null())
            .spawn()
            .expect("start the 32-bit program"),
    );
    let pid = target.id();
    let out = common::output_of(
        {
            let mut c = Command::new(dynspec());
            c.args(["attach", &pid.to_string(), "--for", "1", "-q"]);
            c
        },
        None,
    );
    assert!(
        !out.status.success(),
        "attach to a 32-bit process succeeded"
    );
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(
        err.contains(&format!(
            "{}: is a 32-bit ELF executable (i386); dynspec supports x86-64 programs only",
            exe.display()
        )),
        "{err}"
    );
    // `run` says the same of the program.
    let run = common::run_dynspec(&["run", "-q"], &exe, &[]);
    assert!(!run.status.success());
    assert!(
        text(&run.stderr)
            .contains("is a 32-bit ELF executable (i386); dynspec supports x86-64 programs only"),
        "{}",
        text(&run.stderr)
    );
    assert_eq!(tracer_pid(pid), Some(0), "the 32-bit process was traced");
    assert!(is_alive(pid), "the 32-bit process died");
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let state = state.rsplit_once(") ").map(|(_, r)| &r[..1]).unwrap_or("?");
    assert!(matches!(state, "R" | "S"), "state {state}: stopped?");
}

/// The memory map and the descriptors of a process (fd number -> what it refers to).
fn maps_and_fds(pid: u32) -> (String, Vec<(String, String)>) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    let mut fds: Vec<(String, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("read fd dir")
        .flatten()
        .map(|e| {
            let target = std::fs::read_link(e.path())
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            (e.file_name().to_string_lossy().into_owned(), target)
        })
        .collect();
    fds.sort();
    (maps, fds)
}

/// Variants installed and their entries, from a report.
fn variants_entered(report: &std::path::Path) -> (usize, u64) {
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(report).expect("read report")).expect("JSON report");
    let vs = v["variants"].as_array().cloned().unwrap_or_default();
    let entries = vs.iter().filter_map(|x| x["entries"].as_u64()).sum();
    (vs.len(), entries)
}

/// Detach leaves nothing behind: after each of 20 attach/specialize/detach cycles on one process, its memory
/// map and its descriptors are those it had before the first attach, and it finishes with a native run's output.
#[test]
fn twenty_attach_specialize_detach_cycles_leave_nothing_behind() {
    let server = Server::start();
    let pid = server.pid();
    // Started up (loader done): two reads of the map agree.
    let mut before = maps_and_fds(pid);
    common::wait_for("serve_loop's memory map to settle", || {
        std::thread::sleep(Duration::from_millis(50));
        let now = maps_and_fds(pid);
        std::mem::replace(&mut before, now) == before
    });
    let mut entered = 0;
    for cycle in 1..=20 {
        let tmp = TempDir::new();
        let report = tmp.join("attach.json");
        let mut cmd = Command::new(dynspec());
        cmd.args(["attach", &pid.to_string(), "--for", "1", "--window", "0.05"])
            .args(["--rate", "1999", "-q", "--report"])
            .arg(&report);
        let out = common::output_of(cmd, None);
        assert!(
            out.status.success(),
            "cycle {cycle}: dynspec attach: {} {}",
            out.status,
            text(&out.stderr)
        );
        assert_eq!(text(&out.stderr), "", "cycle {cycle}: dynspec attach -q");
        let (installed, entries) = variants_entered(&report);
        assert!(installed > 0, "cycle {cycle}: nothing was installed");
        entered += entries;
        wait_untraced(pid);
        let after = maps_and_fds(pid);
        assert_eq!(
            after.0, before.0,
            "cycle {cycle}: /proc/PID/maps after detach differs from before the first attach"
        );
        assert_eq!(
            after.1, before.1,
            "cycle {cycle}: /proc/PID/fd after detach differs from before the first attach"
        );
    }
    assert!(entered > 0, "no variant was ever entered");
    server.finish("after 20 attach/specialize/detach cycles");
}

/// Ctrl-C (SIGINT), SIGTERM and SIGHUP each make `dynspec attach` detach with variants installed: it exits 0
/// and the process keeps running with the memory map and descriptors it had before.
#[test]
fn interrupts_detach_with_variants_installed_leaving_nothing_behind() {
    let server = Server::start();
    let pid = server.pid();
    std::thread::sleep(Duration::from_millis(200));
    let before = maps_and_fds(pid);
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        let tmp = TempDir::new();
        let tracer = start_attach(pid, &["--window", "0.05", "--rate", "1999"], &tmp);
        wait_traced(pid);
        // Long enough to sample, plan and install (the report below says whether it did).
        std::thread::sleep(Duration::from_millis(1500));
        send_signal(tracer.id() as i32, sig);
        let out = tracer.wait_output();
        assert_eq!(
            out.status.code(),
            Some(0),
            "dynspec attach after signal {sig}: {} {}",
            out.status,
            text(&out.stderr)
        );
        let (installed, _) = variants_entered(&tmp.join("attach.json"));
        assert!(installed > 0, "signal {sig}: nothing was installed");
        wait_untraced(pid);
        assert_eq!(maps_and_fds(pid), before, "after signal {sig}");
    }
    server.finish("after SIGINT, SIGTERM and SIGHUP of dynspec attach");
}

/// The one-line error of a refused `dynspec attach`, after checking it is one line, exit status 1.
fn one_line_error(out: &std::process::Output) -> String {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "one line: {err:?}");
    assert!(err.starts_with("dynspec: error: "), "{err}");
    err
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A process that made itself non-dumpable (prctl(PR_SET_DUMPABLE, 0)), running as nobody, attached by nobody:
/// same user, so the message names dumpability (the check that failed), not the owner or Yama.
#[test]
fn permission_error_names_a_non_dumpable_target() {
    use std::os::unix::process::CommandExt;
    if !is_root() {
        eprintln!("skipped: needs root (to run both sides as nobody)");
        return;
    }
    let tmp = TempDir::new();
    let src = tmp.join("undumpable.c");
    std::fs::write(
        &src,
        "#include <sys/prctl.h>\n#include <unistd.h>\n\
         int main(void) { prctl(PR_SET_DUMPABLE, 0); for (;;) pause(); }\n",
    )
    .expect("write undumpable.c");
    let exe = tmp.join("undumpable");
    let built = Command::new("gcc")
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .status()
        .expect("run gcc");
    assert!(built.success(), "gcc failed");
    // nobody must reach the program: the temp dir is private to root.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let target = ChildGuard::new(
        Command::new(&exe)
            .uid(65534)
            .gid(65534)
            .stdin(Stdio::null())
            .spawn()
            .expect("start the non-dumpable program"),
    );
    let pid = target.id();
    // Wait until it has called prctl: the files in /proc/PID then belong to root (as seen by root).
    common::wait_for("the program to become non-dumpable", || {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(format!("/proc/{pid}/status")).is_ok_and(|m| m.uid() == 0)
    });
    let out = Command::new(dynspec())
        .args(["attach", &pid.to_string(), "--for", "1", "-q"])
        .args(["--report", "/tmp/never-written.json"])
        .current_dir("/")
        .uid(65534)
        .gid(65534)
        .stdin(Stdio::null())
        .output()
        .expect("run dynspec as nobody");
    let err = one_line_error(&out);
    assert!(err.contains("it is not dumpable"), "{err}");
    assert!(err.contains("CAP_SYS_PTRACE"), "{err}");
    assert!(!err.contains("belongs to"), "{err}");
    assert_eq!(tracer_pid(pid), Some(0));
}

/// dynspec under a seccomp filter that refuses ptrace (a container's), as root with CAP_SYS_PTRACE: the message
/// names the filter, not Yama or capabilities; the target runs on untouched.
#[test]
fn permission_error_names_a_seccomp_filter() {
    use std::os::unix::process::CommandExt;
    let server = Server::start();
    let pid = server.pid();
    let mut cmd = Command::new(dynspec());
    cmd.args(["attach", &pid.to_string(), "--for", "1", "-q"])
        .args(["--report", "/tmp/never-written.json"])
        .stdin(Stdio::null());
    // SAFETY: the closure runs between fork and exec and only makes prctl system calls on memory it owns (the
    // filter lives on its stack for the duration of the call).
    unsafe {
        cmd.pre_exec(|| {
            // ld [nr]; jeq SYS_ptrace ? ERRNO(EPERM) : ALLOW
            let filter = [
                libc::sock_filter {
                    code: 0x20,
                    jt: 0,
                    jf: 0,
                    k: 0,
                },
                libc::sock_filter {
                    code: 0x15,
                    jt: 0,
                    jf: 1,
                    k: libc::SYS_ptrace as u32,
                },
                libc::sock_filter {
                    code: 0x06,
                    jt: 0,
                    jf: 0,
                    k: 0x0005_0000 | libc::EPERM as u32,
                },
                libc::sock_filter {
                    code: 0x06,
                    jt: 0,
                    jf: 0,
                    k: 0x7fff_0000,
                },
            ];
            let prog = libc::sock_fprog {
                len: filter.len() as u16,
                filter: filter.as_ptr() as *mut libc::sock_filter,
            };
            if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
                || libc::prctl(
                    libc::PR_SET_SECCOMP,
                    libc::SECCOMP_MODE_FILTER,
                    &prog as *const libc::sock_fprog,
                ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = common::output_of(cmd, None);
    let err = one_line_error(&out);
    assert!(err.contains("seccomp filter"), "{err}");
    assert!(err.contains("no_new_privs"), "{err}");
    assert!(!err.contains("yama"), "{err}");
    assert_eq!(tracer_pid(pid), Some(0));
    server.finish("after a refused attach");
}

/// A process another tracer holds: the message names that tracer.
#[test]
fn permission_error_names_another_tracer() {
    let tmp = TempDir::new();
    let server = Server::start();
    let pid = server.pid();
    let first = start_attach(pid, &["--profile-only"], &tmp);
    wait_traced(pid);
    let mut cmd = Command::new(dynspec());
    cmd.args(["attach", &pid.to_string(), "--for", "1", "-q"])
        .args(["--report", "/tmp/never-written.json"]);
    let out = common::output_of(cmd, None);
    let err = one_line_error(&out);
    assert!(
        err.contains(&format!(
            "it is already traced by PID {} (dynspec)",
            first.id()
        )),
        "{err}"
    );
    send_signal(first.id() as i32, libc::SIGTERM);
    let out = first.wait_output();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    wait_untraced(pid);
    server.finish("after a second tracer was refused");
}

/// The code arena in `pid`'s map, if there is one: dynspec's anonymous 4 MiB `r-xp` mapping, and the range of
/// the `rw-p` counters right after it.
fn arena_counters(pid: u32) -> Option<(u64, u64)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let ranges: Vec<(u64, u64, String, bool)> = maps
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (a, b) = f.next()?.split_once('-')?;
            let perms = f.next()?.to_string();
            let anon = f.nth(3).is_none();
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
                perms,
                anon,
            ))
        })
        .collect();
    ranges.iter().find_map(|(s, e, p, anon)| {
        if *anon && p == "r-xp" && e - s == 4 << 20 {
            ranges
                .iter()
                .find(|(s2, _, p2, _)| s2 == e && p2 == "rw-p")
                .map(|(s2, e2, _, _)| (*s2, *e2))
        } else {
            None
        }
    })
}

/// The sum of the arena's counters (variant entries, stub fall-backs and each stub's enabled word).
fn counters_sum(pid: u32, (start, end): (u64, u64)) -> u64 {
    use std::os::unix::fs::FileExt as _;
    let Ok(mem) = std::fs::File::open(format!("/proc/{pid}/mem")) else {
        return 0;
    };
    let mut buf = vec![0u8; (end - start) as usize];
    if mem.read_exact_at(&mut buf, start).is_err() {
        return 0;
    }
    buf.chunks_exact(8)
        .map(|q| u64::from_le_bytes(q.try_into().expect("8 bytes")))
        .fold(0u64, u64::saturating_add)
}

/// Every executable file mapping of `pid` holds exactly its file's bytes (no patch left).
fn assert_code_is_the_files(pid: u32, what: &str) {
    use std::os::unix::fs::FileExt as _;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open /proc/PID/mem");
    let mut checked = 0;
    for l in maps.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 6 || !f[1].contains('x') || !f[5].starts_with('/') {
            continue;
        }
        let (a, b) = f[0].split_once('-').expect("range");
        let (start, end) = (
            u64::from_str_radix(a, 16).expect("start"),
            u64::from_str_radix(b, 16).expect("end"),
        );
        let offset = u64::from_str_radix(f[2], 16).expect("offset");
        let file = std::fs::File::open(f[5]).expect("open mapped file");
        let len = file.metadata().expect("stat").len();
        let n = (end - start).min(len.saturating_sub(offset)) as usize;
        let (mut want, mut got) = (vec![0u8; n], vec![0u8; n]);
        file.read_exact_at(&mut want, offset).expect("read file");
        mem.read_exact_at(&mut got, start)
            .expect("read target code");
        let diff = want.iter().zip(&got).position(|(x, y)| x != y);
        assert!(
            diff.is_none(),
            "{what}: {} differs from its file at {:#x}",
            f[5],
            start + diff.unwrap_or(0) as u64
        );
        checked += 1;
    }
    assert!(checked > 0, "{what}: no executable file mapping checked");
}

/// How many userfaultfds a process holds (the write watch's two, or the guards').
fn uffds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| {
        d.flatten()
            .filter(|e| {
                std::fs::read_link(e.path())
                    .is_ok_and(|t| t.to_string_lossy().contains("userfaultfd"))
            })
            .count()
    })
}

/// The names of a process's threads.
fn thread_names(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(Vec::new(), |d| {
        d.flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("comm")).ok())
            .map(|n| n.trim().to_string())
            .collect()
    })
}

/// Where in its work `dynspec attach` is SIGKILLed.
#[derive(Clone, Copy, Debug)]
enum Moment {
    Profiling,
    WriteWatch,
    VariantsEntered,
    /// serve_patch told to rewrite its bytecode, then dynspec killed after this many milliseconds.
    Invalidation(u64),
}

/// Attach to a server, SIGKILL dynspec at `moment`, and check the guardian put everything back: the process
/// finishes like a native run, its code is its files' bytes and its map and descriptors are those from before.
fn kill_at(moment: Moment) -> String {
    let what = format!("SIGKILL {moment:?}");
    let mut server = Server::start_sample(match moment {
        Moment::Invalidation(_) => "serve_patch",
        _ => "serve_loop",
    });
    let pid = server.pid();
    let mut before = maps_and_fds(pid);
    common::wait_for("the server's memory map to settle", || {
        std::thread::sleep(Duration::from_millis(50));
        let now = maps_and_fds(pid);
        std::mem::replace(&mut before, now) == before
    });
    let tmp = TempDir::new();
    let window = match moment {
        Moment::Profiling | Moment::WriteWatch => "1",
        _ => "0.05",
    };
    let tracer = start_attach(pid, &["--window", window, "--rate", "1999"], &tmp);
    let dynspec_pid = tracer.id();
    wait_traced(pid);
    common::wait_for("the guardian to start", || {
        !common::children_of(dynspec_pid).is_empty()
    });
    match moment {
        Moment::Profiling => {
            // Sampling lasts a second of the program's CPU time; no watch or cache exists yet.
            std::thread::sleep(Duration::from_millis(100));
            assert!(uffds(dynspec_pid) == 0, "{what}: the watch began already");
        }
        // The watch's reader thread runs, the guards' does not yet, and the watch's userfaultfds (a synchronous
        // and, where the kernel has it, an asynchronous one, each created in the target by injected system
        // calls and closed there once taken) are all dynspec's: the same for 100 ms, so no injection is under
        // way (dynspec dying inside one is a known limit, ARCHITECTURE.md "The guardian").
        Moment::WriteWatch => {
            let watching = || {
                let names = thread_names(dynspec_pid);
                let ok = names.iter().any(|n| n == "dynspec-uffd")
                    && !names.iter().any(|n| n == "dynspec-guards")
                    && uffds(pid) == 0;
                ok.then(|| uffds(dynspec_pid)).filter(|n| *n > 0)
            };
            common::wait_for("the write watch", || {
                let Some(first) = watching() else {
                    return false;
                };
                std::thread::sleep(Duration::from_millis(100));
                watching() == Some(first)
            })
        }
        Moment::VariantsEntered | Moment::Invalidation(_) => {
            common::wait_for("variants installed and entered", || {
                arena_counters(pid).is_some_and(|c| counters_sum(pid, c) > 100)
            })
        }
    }
    if let Moment::Invalidation(ms) = moment {
        server.say(b"p");
        std::thread::sleep(Duration::from_millis(ms));
    }

    send_signal(dynspec_pid as i32, libc::SIGKILL);
    // Returns once the guardian (which shares dynspec's stderr) is done too.
    let out = tracer.wait_output();
    assert!(
        died_of(&out.status, libc::SIGKILL),
        "{what}: {}",
        out.status
    );
    let restored = text(&out.stderr).contains("dynspec guardian: dynspec died");
    assert!(
        !text(&out.stderr).contains("kept"),
        "{what}: an arena stayed: {}",
        text(&out.stderr)
    );
    match moment {
        // Nothing of dynspec's was in the target: the guardian had nothing to do.
        Moment::Profiling => assert!(!restored, "{what}: {}", text(&out.stderr)),
        Moment::WriteWatch => {}
        Moment::VariantsEntered | Moment::Invalidation(_) => {
            assert!(
                restored,
                "{what}: the guardian did not restore: {}",
                text(&out.stderr)
            )
        }
    }
    wait_untraced(pid);
    if !is_alive(pid) {
        let out = server.child.wait_output();
        panic!(
            "{what}: the target died: {} {}",
            out.status,
            text(&out.stderr)
        );
    }
    assert_code_is_the_files(pid, &what);
    let after = maps_and_fds(pid);
    assert_eq!(
        after.0, before.0,
        "{what}: /proc/PID/maps differs from before"
    );
    assert_eq!(
        after.1, before.1,
        "{what}: /proc/PID/fd differs from before"
    );
    server.poke();
    server.finish(&what);
    text(&out.stderr)
}

/// How many threads the guardian found in generated code (from its line on dynspec's stderr).
fn threads_inside(stderr: &str) -> usize {
    stderr
        .split_once("back on its original code (")
        .and_then(|(_, r)| r.split_once(' '))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or(0)
}

/// dynspec's death never harms an attached process: SIGKILL while profiling.
#[test]
fn sigkill_while_profiling_leaves_the_target_as_it_was() {
    kill_at(Moment::Profiling);
}

/// SIGKILL during the write watch (its userfaultfd closes with dynspec).
#[test]
fn sigkill_during_the_write_watch_leaves_the_target_as_it_was() {
    kill_at(Moment::WriteWatch);
}

/// SIGKILL with variants installed and the thread running in them: the guardian removes them.
#[test]
fn sigkill_with_variants_entered_leaves_the_target_as_it_was() {
    // The thread is in a variant most of the time, not always: until one run caught it there.
    let caught = (0..6).any(|_| threads_inside(&kill_at(Moment::VariantsEntered)) > 0);
    assert!(caught, "no kill caught the thread inside generated code");
}

/// SIGKILL while a write to a guarded page is being handled (the bytecode is rewritten): the writer stays
/// blocked until the guardian removed the variants, then the program goes on with its new bytecode.
#[test]
fn sigkill_during_an_invalidation_leaves_the_target_as_it_was() {
    for ms in [0, 3, 15] {
        kill_at(Moment::Invalidation(ms));
    }
}
