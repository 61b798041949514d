//! The command line behaves as perf, py-spy and shell users expect: options as they spell them, unknown options
//! named, the exit codes of `env`/`timeout`, standard streams handed over exactly, a true final status.

mod common;

use std::os::unix::process::CommandExt as _;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{dynspec, read_report, text, ChildGuard, TempDir};

fn run(args: &[&str]) -> Output {
    Command::new(dynspec())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run dynspec")
}

/// A clap usage error (exit 2) whose message names `needle`, with no advice that would change the meaning.
fn assert_usage_error(out: &Output, needle: &str) {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains(needle), "stderr lacks {needle:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn an_unknown_option_is_named_and_nothing_runs() {
    let dir = TempDir::new();
    let marker = dir.join("ran");
    let script = format!("touch '{}'", marker.display());
    let out = run(&["run", "--bogus", "--", "sh", "-c", &script]);
    assert_usage_error(&out, "unexpected argument '--bogus'");
    assert!(!marker.exists(), "the program ran despite the bad option");
    let out = run(&["attach", "--frobnicate", "1"]);
    assert_usage_error(&out, "'--frobnicate'");
}

#[test]
fn output_option_and_report_alias_name_the_report() {
    let dir = TempDir::new();
    for (flag, name) in [
        ("-o", "a.json"),
        ("--output", "b.json"),
        ("--report", "c.json"),
    ] {
        let path = dir.join(name);
        let out = Command::new(dynspec())
            .args(["run", "-q", "--profile-only", flag])
            .arg(&path)
            .args(["--", "true"])
            .output()
            .expect("run dynspec");
        assert!(out.status.success(), "{flag}: {}", text(&out.stderr));
        assert_eq!(read_report(&path)["exit_status"]["code"], 0, "{flag}");
    }
}

#[test]
fn program_arguments_that_look_like_options_are_the_programs() {
    let out = run(&[
        "run",
        "-q",
        "-o",
        "/dev/null",
        "--",
        "echo",
        "-n",
        "--bogus",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "--bogus");
    // Without `--`, everything after the program's name is the program's too.
    let out = run(&["run", "-q", "-o", "/dev/null", "echo", "x", "--bogus"]);
    assert_eq!(text(&out.stdout), "x --bogus\n", "{}", text(&out.stderr));
}

#[test]
fn not_found_is_127_and_not_executable_is_126() {
    let out = run(&["run", "--", "/definitely/not/here"]);
    assert_eq!(out.status.code(), Some(127), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("program not found"));
    let dir = TempDir::new();
    let plain = dir.join("plain.txt");
    std::fs::write(&plain, "not a program\n").expect("write");
    let out = run(&["run", "--", plain.to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));
    let out = run(&["run", "--", dir.path().to_str().expect("utf8")]);
    assert_eq!(out.status.code(), Some(126), "{}", text(&out.stderr));
    // The same as the shell says for both.
    let sh = |p: &str| {
        Command::new("sh")
            .args(["-c", &format!("'{p}'")])
            .stderr(Stdio::null())
            .status()
            .expect("sh")
            .code()
    };
    assert_eq!(sh("/definitely/not/here"), Some(127));
    assert_eq!(sh(plain.to_str().expect("utf8")), Some(126));
}

/// `cmd` with its standard stream `fd` closed, natively and under dynspec: same stderr and exit status.
fn same_with_closed_fd(fd: i32, argv: &[&str]) -> (Output, Output) {
    let close = move || {
        // SAFETY: close(2) is async-signal-safe; it runs in the forked child before exec.
        unsafe { libc::close(fd) };
        Ok(())
    };
    let mut native = Command::new(argv[0]);
    native.args(&argv[1..]);
    // SAFETY: the closure only calls close(2).
    unsafe { native.pre_exec(close) };
    let mut traced = Command::new(dynspec());
    traced
        .args(["run", "-q", "-o", "/dev/null", "--"])
        .args(argv);
    // SAFETY: as above.
    unsafe { traced.pre_exec(close) };
    let native = native.output().expect("native run");
    let traced = traced.output().expect("dynspec run");
    assert_eq!(
        traced.status.code(),
        native.status.code(),
        "exit status with fd {fd} closed; dynspec's stderr: {}",
        text(&traced.stderr)
    );
    assert_eq!(
        text(&traced.stderr),
        text(&native.stderr),
        "stderr with fd {fd} closed"
    );
    (native, traced)
}

#[test]
fn closed_standard_streams_stay_closed_in_the_program() {
    // stdout closed: seq fails with EBADF and exit 1, natively and under dynspec.
    let (native, _) = same_with_closed_fd(1, &["seq", "1", "3"]);
    assert_eq!(native.status.code(), Some(1));
    assert!(text(&native.stderr).contains("Bad file descriptor"));
    // stdin closed: the program sees EBADF too, not an empty /dev/null (dash: "read: ... Bad file descriptor").
    let (native, traced) = same_with_closed_fd(0, &["sh", "-c", "read x; echo rc=$?"]);
    assert_eq!(text(&traced.stdout), text(&native.stdout));
    // stderr closed: the program's write fails, as natively (its exit status says so).
    same_with_closed_fd(2, &["sh", "-c", "echo x >&2"]);
    // An open stream is still handed over as it is (the program's output reaches our pipe).
    let out = run(&["run", "-q", "-o", "/dev/null", "--", "echo", "still here"]);
    assert_eq!(text(&out.stdout), "still here\n");
}

#[test]
fn attach_takes_pid_and_duration_as_py_spy_users_spell_them() {
    let mut target = Command::new("sleep");
    target.arg("30");
    let target = ChildGuard::new(target.spawn().expect("start sleep"));
    let pid = target.id().to_string();
    let dir = TempDir::new();
    let report = dir.join("r.json");
    let started = Instant::now();
    let out = Command::new(dynspec())
        .args([
            "attach",
            "-q",
            "--profile-only",
            "-p",
            &pid,
            "-d",
            "0.3",
            "-o",
        ])
        .arg(&report)
        .output()
        .expect("run dynspec");
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "-d did not end the attach"
    );
    let r = read_report(&report);
    assert_eq!(r["pid"].as_i64().map(|p| p.to_string()), Some(pid.clone()));
    // --for stays the long spelling of -d; a PID both ways is refused.
    let out = run(&[
        "attach",
        "-q",
        "--profile-only",
        "--for",
        "0.2",
        "-o",
        "/dev/null",
        &pid,
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = run(&["attach", "-p", &pid, &pid]);
    assert_usage_error(&out, "cannot be used with");
}

#[test]
fn bad_numbers_say_what_is_wrong_and_never_suggest_dash_dash() {
    let out = run(&["attach", "1", "--for", "-1"]);
    assert_usage_error(&out, "'-1' must be a positive number of seconds");
    assert!(
        !text(&out.stderr).contains("'-- -1'"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["run", "--window", "1e9", "--", "true"]);
    assert_usage_error(&out, "'1e9' is too long: at most 1e7 seconds");
    let out = run(&["run", "-r", "0", "--", "true"]);
    assert_usage_error(&out, "'0' must be at least 1 sample per second");
    let out = run(&["run", "--rate", "-5", "--", "true"]);
    assert_usage_error(&out, "'-5' must be at least 1");
    let out = run(&["attach", "-p", "0"]);
    assert_usage_error(&out, "'0' is not a process ID");
}

#[test]
fn help_works_for_itself_and_every_command() {
    let out = run(&["help", "--help"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("Usage: dynspec help"),
        "{}",
        text(&out.stdout)
    );
    for cmd in ["run", "attach", "report", "bench", "fold", "demo"] {
        let out = run(&["help", cmd]);
        assert!(out.status.success(), "help {cmd}: {}", text(&out.stderr));
        assert!(
            text(&out.stdout).contains(&format!("Usage: dynspec {cmd}")),
            "help {cmd}: {}",
            text(&out.stdout)
        );
    }
    let out = run(&["help", "nonsense"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no command 'nonsense'"));
}

#[test]
fn a_second_interrupt_kills_the_program_and_the_report_says_so() {
    let dir = TempDir::new();
    let report = dir.join("r.json");
    // The program ignores SIGINT, so the first interrupt (passed on to it) does not end it.
    let mut c = Command::new(dynspec());
    c.args(["run", "-q", "--profile-only", "-o"])
        .arg(&report)
        .args(["--", "sh", "-c", "trap '' INT; sleep 60"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0);
    let child = ChildGuard::new(c.spawn().expect("start dynspec"));
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    // Let dynspec start the program and begin sampling.
    std::thread::sleep(Duration::from_millis(700));
    for _ in 0..2 {
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
        std::thread::sleep(Duration::from_millis(300));
    }
    let out = child.wait_output();
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGINT),
        "{}",
        text(&out.stderr)
    );
    let r = read_report(&report);
    assert_eq!(r["exit_status"]["signal"], libc::SIGKILL, "{r}");
    assert_eq!(r["killed_by_dynspec"], true);
    let shown = run(&["report", report.to_str().expect("utf8")]);
    let shown = text(&shown.stdout);
    assert!(
        shown.contains(
            "status:    killed by dynspec with signal 9 (SIGKILL) after a second interrupt"
        ),
        "{shown}"
    );
}
