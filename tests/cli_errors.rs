//! Bad input gets one clear line on stderr and a non-zero exit, never a panic (ARCHITECTURE.md invariant 10).

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

fn dynspec() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_dynspec"))
}

/// A temporary directory removed on drop (the `tempfile` crate's).
struct Tmp(tempfile::TempDir);

impl Tmp {
    fn new(tag: &str) -> Tmp {
        let d = tempfile::Builder::new()
            .prefix(&format!("dynspec-cli-{tag}-"))
            .tempdir()
            .expect("create temp dir");
        Tmp(d)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

/// A child process killed and reaped on drop.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(dynspec())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run dynspec")
}

/// Non-zero exit with exactly one stderr line "dynspec: error: ..." containing every `needles`.
fn assert_one_line_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected failure, got {:?}; stderr: {stderr}",
        out.status
    );
    // 1, or 126/127 for a program that cannot be executed / found (tests/cli.rs checks which).
    assert!(
        matches!(out.status.code(), Some(1 | 126 | 127)),
        "stderr: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("dynspec: error: "), "{stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "stderr lacks {n:?}: {stderr}");
    }
}

/// Clap usage errors: exit code 2, no panic.
fn assert_usage_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
}

#[test]
fn missing_program() {
    let out = run(&["run", "--profile-only", "--", "./no-such-program-here"]);
    assert_one_line_error(
        &out,
        &[
            "program not found: ./no-such-program-here",
            "check the path or PATH",
        ],
    );
    let out = run(&["run", "--", "no-such-program-on-path-4711"]);
    assert_one_line_error(&out, &["program not found: no-such-program-on-path-4711"]);
}

#[test]
fn non_elf_file() {
    let t = Tmp::new("nonelf");
    let p = t.path("text");
    std::fs::write(&p, "this is not a program\n").expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = run(&["run", "--", p.to_str().expect("utf8")]);
    assert_one_line_error(&out, &["not an ELF executable"]);
}

#[test]
fn not_executable_file() {
    let t = Tmp::new("noexec");
    let p = t.path("data");
    std::fs::write(&p, "x").expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = run(&["run", "--", p.to_str().expect("utf8")]);
    assert_one_line_error(&out, &["not executable"]);
}

#[test]
fn directory() {
    let t = Tmp::new("dir");
    let out = run(&["run", "--", t.0.path().to_str().expect("utf8")]);
    assert_one_line_error(&out, &["is a directory"]);
}

#[test]
fn thirty_two_bit_elf() {
    let t = Tmp::new("elf32");
    let p = t.path("prog32");
    // A hand-made ELF32 header (ET_EXEC, EM_386): enough for the check, which runs before anything executes.
    let mut h = vec![0u8; 52];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 1; // ELFCLASS32
    h[5] = 1; // little endian
    h[6] = 1; // EV_CURRENT
    h[16] = 2; // ET_EXEC
    h[18] = 3; // EM_386
    h[20] = 1;
    std::fs::write(&p, &h).expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = run(&["run", "--", p.to_str().expect("utf8")]);
    assert_one_line_error(&out, &["32-bit", "x86-64"]);
}

#[test]
fn foreign_arch_elf() {
    let t = Tmp::new("elfarm");
    let p = t.path("prog-aarch64");
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 2;
    h[5] = 1;
    h[6] = 1;
    h[16] = 2;
    h[18] = 183; // EM_AARCH64
    std::fs::write(&p, &h).expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = run(&["run", "--", p.to_str().expect("utf8")]);
    assert_one_line_error(&out, &["foreign architecture", "AArch64"]);
}

#[test]
fn pid_that_does_not_exist() {
    // A reaped child's PID is free (reuse within the test's lifetime is practically impossible).
    let mut c = Command::new("true").spawn().expect("spawn true");
    let pid = c.id();
    c.wait().expect("wait");
    let out = run(&["attach", &pid.to_string(), "--for", "1"]);
    assert_one_line_error(&out, &["no such process", &pid.to_string()]);
}

#[test]
fn pid_not_a_number() {
    let out = run(&["attach", "12abc"]);
    assert_usage_error(&out, "12abc");
    let out = run(&["attach", "0"]);
    assert_usage_error(&out, "0");
}

#[test]
fn no_command() {
    let out = run(&["run", "--profile-only"]);
    assert_usage_error(&out, "CMD");
    let out = run(&["run", "--"]);
    assert_usage_error(&out, "CMD");
}

#[test]
fn bad_window_value() {
    let out = run(&["run", "--window", "-3", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn missing_report() {
    let t = Tmp::new("norep");
    let p = t.path("absent.json");
    let out = run(&["report", p.to_str().expect("utf8")]);
    assert_one_line_error(
        &out,
        &[
            "no report at",
            "absent.json",
            "run `dynspec run -- PROGRAM` first",
        ],
    );
}

#[test]
fn missing_default_report() {
    let t = Tmp::new("nodefault");
    let out = Command::new(dynspec())
        .arg("report")
        .current_dir(&t.0)
        .output()
        .expect("run dynspec");
    assert_one_line_error(
        &out,
        &[
            "no report at dynspec.report.json",
            "run `dynspec run -- PROGRAM` first",
        ],
    );
}

#[test]
fn corrupt_report() {
    let t = Tmp::new("corrupt");
    let p = t.path("bad.json");
    std::fs::write(&p, "{\n  \"version\": 1,\n  \"samples\": oops\n}\n").expect("write");
    let out = run(&["report", p.to_str().expect("utf8")]);
    assert_one_line_error(&out, &["is not a dynspec report", "bad JSON at line 3"]);
    std::fs::write(&p, "\u{0}\u{1}binary garbage").expect("write");
    let out = run(&["report", "--json", p.to_str().expect("utf8")]);
    assert_one_line_error(&out, &["is not a dynspec report"]);
}

#[test]
fn report_of_unsupported_version() {
    let t = Tmp::new("version");
    let p = t.path("v9.json");
    std::fs::write(&p, "{\"version\": 9}").expect("write");
    let out = run(&["report", p.to_str().expect("utf8")]);
    assert_one_line_error(&out, &["version 9"]);
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Run dynspec as `nobody` (uid/gid 65534): real permission errors without changing system settings.
fn run_as_nobody(args: &[&str]) -> Output {
    let mut cmd = Command::new(dynspec());
    cmd.args(args).current_dir("/").stdin(Stdio::null());
    cmd.gid(65534).uid(65534);
    cmd.output().expect("run dynspec as nobody")
}

fn binary_reachable_by_nobody(p: &Path) -> bool {
    // Every directory on the way must be searchable by others, the binary executable by others.
    let mut cur = p.to_path_buf();
    loop {
        let Ok(md) = std::fs::metadata(&cur) else {
            return false;
        };
        if md.permissions().mode() & 0o001 == 0 {
            return false;
        }
        if !cur.pop() || cur.as_os_str().is_empty() {
            return true;
        }
    }
}

#[test]
fn ptrace_permission_denied() {
    if !is_root() || !binary_reachable_by_nobody(&dynspec()) {
        eprintln!("skipped: needs root and a dynspec binary reachable by uid 65534");
        return;
    }
    // A root-owned process: an unprivileged user may not trace it.
    let victim = Guard(
        Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep"),
    );
    let out = run_as_nobody(&[
        "attach",
        &victim.0.id().to_string(),
        "--for",
        "1",
        "--report",
        "/tmp/never-written.json",
    ]);
    // The check that failed: the owner (not Yama, whatever the machine's setting).
    assert_one_line_error(
        &out,
        &[
            "permission denied",
            "it belongs to root (uid 0)",
            "runs as nobody (uid 65534)",
            "CAP_SYS_PTRACE",
        ],
    );
}

#[test]
fn script_runs_under_its_interpreter() {
    // As with exec: the kernel starts the #! interpreter, which dynspec traces like any program.
    let t = Tmp::new("script");
    let p = t.path("s.sh");
    std::fs::write(&p, "#!/bin/sh\necho hi \"$1\"\nexit 3\n").expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let report = t.path("r.json");
    let out = run(&[
        "run",
        "-q",
        "--report",
        report.to_str().expect("utf8"),
        "--",
        p.to_str().expect("utf8"),
        "there",
    ]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi there\n");
}

#[test]
fn script_with_a_missing_interpreter_is_refused_with_the_fix() {
    let t = Tmp::new("badscript");
    let p = t.path("s.sh");
    std::fs::write(&p, "#!/nonexistent/interp -x\necho hi\n").expect("write");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = run(&["run", "--", p.to_str().expect("utf8")]);
    assert_one_line_error(&out, &["/nonexistent/interp", "does not exist", "#! line"]);
    // An interpreter that is itself not a program dynspec can run: the reason is given for it.
    let q = t.path("t.sh");
    std::fs::write(&q, format!("#!{}\n", t.path("data").display())).expect("write");
    std::fs::write(t.path("data"), "plain text").expect("write");
    std::fs::set_permissions(t.path("data"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    std::fs::set_permissions(&q, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let out = run(&["run", "--", q.to_str().expect("utf8")]);
    assert_one_line_error(&out, &["interpreter", "not an ELF executable"]);
}

#[test]
fn report_path_in_missing_directory() {
    let out = run(&[
        "run",
        "--report",
        "/nonexistent-dir-4711/r.json",
        "--",
        "true",
    ]);
    assert_one_line_error(&out, &["cannot write report", "does not exist"]);
}
