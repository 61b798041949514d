//! Shared helpers for the tracer integration tests: compile tiny C programs, run a session-like event loop.
#![allow(dead_code)]

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use tracer::{Event, ExitStatus, Pid, Tracer};

pub use tempfile::TempDir;

/// A fresh, unique temporary directory (its name starts with `tracer-test-TAG`), removed on drop.
pub fn temp_dir(tag: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("tracer-test-{tag}-"))
        .tempdir()
        .expect("create temp dir")
}

/// Compile C source `src` into `dir/name` with extra gcc flags.
pub fn compile(dir: &TempDir, name: &str, src: &str, flags: &[&str]) -> PathBuf {
    let c = dir.path().join(format!("{name}.c"));
    std::fs::write(&c, src).expect("write C source");
    let out = dir.path().join(name);
    let st = Command::new("gcc")
        .args(["-O1", "-g", "-pthread", "-o"])
        .arg(&out)
        .arg(&c)
        .args(flags)
        .status()
        .expect("run gcc");
    assert!(st.success(), "gcc failed for {name}");
    out
}

pub fn argv(items: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<OsString> {
    items.iter().map(|s| s.as_ref().to_os_string()).collect()
}

/// A child process started without the tracer, killed and reaped on drop.
pub struct KillOnDrop(pub Child);

impl KillOnDrop {
    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.0.id() as i32)
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a session-like loop saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub events: Vec<Event>,
    pub status: Option<ExitStatus>,
}

impl Seen {
    pub fn count(&self, f: impl Fn(&Event) -> bool) -> usize {
        self.events.iter().filter(|e| f(e)).count()
    }
    pub fn signals(&self) -> Vec<i32> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Event::Signal { signal, .. } => Some(*signal),
                _ => None,
            })
            .collect()
    }
}

/// Resume, tolerating a thread that exited meanwhile (its exit event follows), as the session does.
pub fn resume_ok(tr: &mut Tracer, tid: Pid, sig: Option<i32>) {
    match tr.resume(tid, sig) {
        Ok(()) | Err(tracer::TracerError::UnknownThread(_)) => {}
        Err(e) => panic!("resume {tid}: {e}"),
    }
}

/// Drive the tracer like the session does until the root exits: deliver every program signal, resume
/// everything else. `on_event` may inspect/act first; returning Some(x) overrides the signal to deliver
/// (Some(None) suppresses).
pub fn run_loop(
    tr: &mut Tracer,
    mut on_event: impl FnMut(&mut Tracer, &Event) -> Option<Option<i32>>,
) -> Seen {
    let mut seen = Seen::default();
    tr.resume_all().expect("resume_all");
    for _ in 0..100_000 {
        let ev = tr
            .next_event(Some(Duration::from_secs(60)))
            .expect("next_event")
            .expect("the program did not finish (waited 60 s)");
        let choice = on_event(tr, &ev);
        seen.events.push(ev.clone());
        match ev {
            Event::Signal { tid, signal, .. } => {
                let sig = choice.unwrap_or(Some(signal));
                resume_ok(tr, tid, sig);
            }
            Event::NewThread { tid, parent } => {
                resume_ok(tr, tid, None);
                resume_ok(tr, parent, None);
            }
            Event::Forked { parent, child } => {
                resume_ok(tr, child, None);
                resume_ok(tr, parent, None);
            }
            Event::Exec { pid } => resume_ok(tr, pid, None),
            Event::ThreadExited { .. } => {}
            Event::Exited { pid, status } => {
                if pid == tr.root() {
                    seen.status = Some(status);
                    return seen;
                }
            }
        }
    }
    panic!("too many events");
}

/// Wait until `path` holds at least `n` lines (the program under test reports progress there).
pub fn wait_lines(path: &Path, n: usize) -> String {
    for _ in 0..6000 {
        if let Ok(s) = std::fs::read_to_string(path) {
            if s.lines().count() >= n {
                return s;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{} never reached {n} lines", path.display());
}
