//! Shared helpers for the end-to-end tests: building the C samples, running them natively and under dynspec.
//!
//! Use from a test file in `tests/` with `mod common;`. Every helper panics with a clear message on a
//! setup failure (a test cannot proceed without its sample), never on the behaviour under test.
#![allow(dead_code)] // each test binary uses a different subset of these helpers

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

/// A run that takes longer than this is hung: it is killed and the test fails (a watchdog, not a timing assertion).
pub const HANG_LIMIT: Duration = Duration::from_secs(300);

/// The repository's `samples/` directory (found upwards from this crate, so other workspace crates can include this
/// module with `#[path]`).
pub fn samples_dir() -> PathBuf {
    let start = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    start
        .ancestors()
        .map(|d| d.join("samples"))
        .find(|d| d.join("Makefile").is_file())
        .unwrap_or_else(|| panic!("no samples/Makefile above {}", start.display()))
}

/// Path of the built sample `samples/build/NAME`, building all samples first (once per test binary).
///
/// `make` runs under an exclusive `flock` on `samples/build/.make.lock`, so concurrently running test binaries
/// never build over each other; the Makefile also renames finished binaries into place atomically.
pub fn sample(name: &str) -> PathBuf {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let dir = samples_dir();
    if let Err(e) = BUILT.get_or_init(|| build_samples(&dir)) {
        panic!("building the samples failed: {e}");
    }
    let path = dir.join("build").join(name);
    assert!(
        path.is_file(),
        "sample {name} was not built: {} is missing",
        path.display()
    );
    path
}

fn build_samples(dir: &Path) -> Result<(), String> {
    let build = dir.join("build");
    fs::create_dir_all(&build).map_err(|e| format!("create {}: {e}", build.display()))?;
    let lock_path = build.join(".make.lock");
    let lock =
        File::create(&lock_path).map_err(|e| format!("create {}: {e}", lock_path.display()))?;
    lock.lock()
        .map_err(|e| format!("flock {}: {e}", lock_path.display()))?;
    let out = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(dir)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run make (is it installed?): {e}"))?;
    // The lock is released when `lock` is dropped (also on the error paths above).
    drop(lock);
    if !out.status.success() {
        return Err(format!(
            "make -C {} failed ({}):\n{}{}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

/// The exact expected stdout of sample NAME at its small size (`samples/NAME.expected`).
pub fn expected(name: &str) -> Vec<u8> {
    let p = samples_dir().join(format!("{name}.expected"));
    fs::read(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

/// The dynspec binary under test.
pub fn dynspec() -> PathBuf {
    // Integration tests and benches of the root package get the path from cargo; anything else including this
    // module falls back to the workspace target directory.
    if let Some(p) = option_env!("CARGO_BIN_EXE_dynspec") {
        return PathBuf::from(p);
    }
    let root = samples_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    ["release", "debug"]
        .iter()
        .map(|p| root.join("target").join(p).join("dynspec"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("dynspec binary not found under {}/target", root.display()))
}

/// Runs `path args...` with stdin from /dev/null and captures stdout/stderr.
pub fn run_native(path: impl AsRef<Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(path.as_ref());
    cmd.args(args);
    output_of(cmd, None)
}

/// Runs `dynspec DYNSPEC_ARGS... -- path args...` with stdin from /dev/null and captures stdout/stderr.
///
/// `dynspec_args` is everything before `--`, subcommand included, e.g. `&["run", "--profile-only", "-q"]`.
pub fn run_dynspec(dynspec_args: &[&str], path: impl AsRef<Path>, args: &[&str]) -> Output {
    let mut cmd = Command::new(dynspec());
    cmd.args(dynspec_args)
        .arg("--")
        .arg(path.as_ref())
        .args(args);
    output_of(cmd, None)
}

/// Runs `cmd` (its stdout/stderr captured), feeding it `stdin` (or /dev/null when `None`), and waits for it.
///
/// Kills it and panics if it is still running after [`HANG_LIMIT`].
pub fn output_of(mut cmd: Command, stdin: Option<Vec<u8>>) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let what = format!("{cmd:?}");
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let mut guard = ChildGuard::new(child);
    let child = guard.child_mut();
    let feeder = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => Some(thread::spawn(move || {
            use std::io::Write;
            // A reader that exits early closes the pipe; that is its business, not an error here.
            let _ = pipe.write_all(&data);
        })),
        _ => None,
    };
    let out_reader = reader(child.stdout.take());
    let err_reader = reader(child.stderr.take());
    let status = wait_with_limit(child, HANG_LIMIT).unwrap_or_else(|| {
        panic!("{what} still running after {HANG_LIMIT:?}: killed (hung?)");
    });
    if let Some(f) = feeder {
        let _ = f.join();
    }
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    guard.disarm();
    Output {
        status,
        stdout,
        stderr,
    }
}

fn reader<R: Read + Send + 'static>(src: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut s) = src {
            let _ = s.read_to_end(&mut buf);
        }
        buf
    })
}

/// Waits for `child` up to `limit`; `None` if it is still running then (the caller decides what to do).
pub fn wait_with_limit(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return Some(st),
            Ok(None) if start.elapsed() < limit => thread::sleep(Duration::from_millis(10)),
            Ok(None) => return None,
            Err(e) => panic!("waiting for child {}: {e}", child.id()),
        }
    }
}

/// A directory under the system temp dir, deleted with its contents on drop (the `tempfile` crate's).
pub struct TempDir(tempfile::TempDir);

impl TempDir {
    /// Creates a fresh, uniquely named directory.
    pub fn new() -> TempDir {
        let d = tempfile::Builder::new()
            .prefix("dynspec-test-")
            .tempdir()
            .unwrap_or_else(|e| panic!("create a temporary directory: {e}"));
        TempDir(d)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }

    /// `self.path()/name`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.path().join(name)
    }
}

impl Default for TempDir {
    fn default() -> Self {
        TempDir::new()
    }
}

/// Owns a child process: kills and reaps it on drop unless it was already waited for (no stray processes when a
/// test fails half-way).
pub struct ChildGuard {
    child: Option<Child>,
}

impl ChildGuard {
    pub fn new(child: Child) -> ChildGuard {
        ChildGuard { child: Some(child) }
    }

    pub fn id(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    pub fn child_mut(&mut self) -> &mut Child {
        self.child.as_mut().expect("ChildGuard used after disarm")
    }

    /// Waits (up to [`HANG_LIMIT`]) and collects the remaining stdout/stderr; the guard no longer kills anything.
    pub fn wait_output(mut self) -> Output {
        let mut child = self.child.take().expect("ChildGuard used after disarm");
        let out_reader = reader(child.stdout.take());
        let err_reader = reader(child.stderr.take());
        let status = match wait_with_limit(&mut child, HANG_LIMIT) {
            Some(st) => st,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "child {} still running after {HANG_LIMIT:?}: killed (hung?)",
                    child.id()
                );
            }
        };
        Output {
            status,
            stdout: out_reader.join().unwrap_or_default(),
            stderr: err_reader.join().unwrap_or_default(),
        }
    }

    /// Gives up ownership: the child is neither killed nor waited for on drop.
    fn disarm(&mut self) {
        self.child = None;
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `true` if the status says "killed by signal `sig`" or "exited with 128 + sig" (how a shell reports it).
pub fn died_of(status: &ExitStatus, sig: i32) -> bool {
    use std::os::unix::process::ExitStatusExt;
    status.signal() == Some(sig) || status.code() == Some(128 + sig)
}

/// Lossy text of a byte buffer, for assertion messages.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `TracerPid` of process `pid` from /proc (0 when not traced); `None` when the process no longer exists.
pub fn tracer_pid(pid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// `true` while `pid` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the parenthesised command name, which may itself contain ") ".
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X')),
        Err(_) => false,
    }
}

/// Child processes of every thread of `pid` (from /proc/PID/task/*/children).
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(s) = fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
    }
    out
}

/// Polls `cond` every few milliseconds until it holds; panics with `what` after [`HANG_LIMIT`].
///
/// This is synchronisation with another process (e.g. "dynspec has attached"), not a timing assertion.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < HANG_LIMIT,
            "gave up waiting after {HANG_LIMIT:?}: {what}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}

/// Sends signal `sig` to process `pid` (or to process group `-pid` when `pid` is negative).
pub fn send_signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) has no memory-safety preconditions; it only takes integers.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

/// Runs `bin args` natively and under `dynspec run -q --rate 1999 --window 0.05 --report F EXTRA`, asserts that
/// stdout, stderr and exit status are byte-identical, and returns (native run, parsed report, the report's dir).
pub fn run_both(bin: &str, args: &[&str], extra: &[&str]) -> (Output, serde_json::Value, TempDir) {
    let native = run_native(sample(bin), args);
    let tmp = TempDir::new();
    let report = tmp.join("report.json");
    let report_arg = report.to_str().expect("temp paths are UTF-8");
    let mut dargs = vec![
        "run", "-q", "--rate", "1999", "--window", "0.05", "--report", report_arg,
    ];
    dargs.extend_from_slice(extra);
    let traced = run_dynspec(&dargs, sample(bin), args);
    let what = format!("dynspec {} -- {bin} {}", dargs.join(" "), args.join(" "));
    assert_eq!(
        traced.status.code(),
        native.status.code(),
        "{what}: exit status (stderr: {})",
        text(&traced.stderr)
    );
    assert!(
        traced.stdout == native.stdout,
        "{what}: stdout differs from the native run (wrong result under dynspec)\nnative:\n{}\ndynspec:\n{}",
        text(&native.stdout),
        text(&traced.stdout)
    );
    assert_eq!(text(&traced.stderr), text(&native.stderr), "{what}: stderr");
    let body =
        fs::read_to_string(&report).unwrap_or_else(|e| panic!("{what}: report not written: {e}"));
    (native, parse_report(&what, &body), tmp)
}

/// A report's text as JSON, checked against the committed report schema (docs/report.schema.json): every report
/// a test reads is one the schema accepts.
pub fn parse_report(what: &str, body: &str) -> serde_json::Value {
    let v: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{what}: report is not JSON: {e}"));
    if let Err(problem) = dynspec::report::schema::check(&v) {
        panic!("{what}: the report does not match docs/report.schema.json: {problem}");
    }
    v
}

/// [`parse_report`] of the file at `path`.
pub fn read_report(path: impl AsRef<std::path::Path>) -> serde_json::Value {
    let path = path.as_ref();
    let body =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("no report at {}: {e}", path.display()));
    parse_report(&path.display().to_string(), &body)
}
