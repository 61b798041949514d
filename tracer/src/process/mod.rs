//! Ptrace control of a traced process tree: spawn/attach, threads, clone/fork/exec, stops, resumes, memory, registers.
//!
//! Every ptrace request must come from the thread that seized the tracee, so a [`Tracer`] is meant to live on one
//! thread (the session's tracer thread). It waits with `__WALL | __WNOTHREAD`, so it only ever sees its own
//! tracees and the children of its own thread: several tracers on several threads of one process do not interfere.
//!
//! This file holds the types, the per-thread state machine and the one path that sets a thread going
//! (`Tracer::continue_thread`: every PTRACE_CONT, PTRACE_LISTEN and PTRACE_SINGLESTEP, and the state change that
//! goes with it). `spawn` starts tracing, `events` waits and decodes wait statuses, `remote_syscall` runs system
//! calls inside the target, `memory` reads and writes memory and registers, `detach` ends tracing.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ffi::OsString;
use std::fs::File;

use nix::errno::Errno;
pub use nix::unistd::Pid;

use crate::{Addr, TracerError};

mod detach;
mod events;
mod memory;
mod remote_syscall;
mod spawn;

use events::WaitTimer;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// `exit(code)`; code is 0..=255.
    Code(i32),
    /// Killed by a signal.
    Signaled { signal: i32, core_dumped: bool },
}

impl ExitStatus {
    fn from_wait(status: i32) -> ExitStatus {
        if libc::WIFSIGNALED(status) {
            ExitStatus::Signaled {
                signal: libc::WTERMSIG(status),
                core_dumped: libc::WCOREDUMP(status),
            }
        } else {
            ExitStatus::Code(libc::WEXITSTATUS(status))
        }
    }
}

/// Something that happened to the traced processes. Threads named in an event are stopped until resumed.
#[derive(Clone)]
pub enum Event {
    /// A thread received a signal that belongs to the program. The thread is stopped (signal-delivery-stop);
    /// the caller resumes it with `resume(tid, Some(signal))` to deliver it, or `resume(tid, None)` to suppress it.
    /// (`resume_all` delivers it.)
    Signal {
        tid: Pid,
        signal: i32,
        siginfo: libc::siginfo_t,
    },
    /// A new thread appeared; it is registered and stopped; the parent (the creating thread) too.
    NewThread { tid: Pid, parent: Pid },
    /// A fork/vfork child is now traced (its process is registered; its thread stopped); the parent thread too.
    /// `parent` is the thread that forked (equal to its tgid in single-threaded programs); `child` is the new tgid.
    Forked { parent: Pid, child: Pid },
    /// A process called execve successfully (its thread list collapsed to one; pid = tgid). Stopped.
    Exec { pid: Pid },
    /// A thread exited (not the last of its process).
    ThreadExited { tid: Pid },
    /// A whole traced process exited; `pid` is its tgid. If it is the root process, the session is over.
    Exited { pid: Pid, status: ExitStatus },
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::Signal {
                tid,
                signal,
                siginfo,
            } => f
                .debug_struct("Signal")
                .field("tid", tid)
                .field("signal", signal)
                .field("si_code", &siginfo.si_code)
                .finish(),
            Event::NewThread { tid, parent } => f
                .debug_struct("NewThread")
                .field("tid", tid)
                .field("parent", parent)
                .finish(),
            Event::Forked { parent, child } => f
                .debug_struct("Forked")
                .field("parent", parent)
                .field("child", child)
                .finish(),
            Event::Exec { pid } => f.debug_struct("Exec").field("pid", pid).finish(),
            Event::ThreadExited { tid } => {
                f.debug_struct("ThreadExited").field("tid", tid).finish()
            }
            Event::Exited { pid, status } => f
                .debug_struct("Exited")
                .field("pid", pid)
                .field("status", status)
                .finish(),
        }
    }
}

impl Event {
    /// Threads this event leaves stopped.
    fn stopped_threads(&self) -> Vec<Pid> {
        match *self {
            Event::Signal { tid, .. } => vec![tid],
            Event::NewThread { tid, parent } => vec![tid, parent],
            Event::Forked { parent, child } => vec![parent, child],
            Event::Exec { pid } => vec![pid],
            Event::ThreadExited { .. } | Event::Exited { .. } => vec![],
        }
    }
}

/// Options for [`Tracer::spawn_with`]. The environment is passed through and stdio inherited by default.
#[derive(Debug, Clone, Default)]
pub struct SpawnOptions {
    /// Variables added to (or overriding) the inherited environment.
    pub extra_env: Vec<(OsString, OsString)>,
    /// Run the program with ASLR disabled (`personality(ADDR_NO_RANDOMIZE)`), for reproducible addresses.
    pub disable_aslr: bool,
    /// Descriptors closed in the program before it starts: the standard streams the caller itself was started
    /// without (the Rust runtime put /dev/null there; the program must see them closed, as it would natively).
    pub close_fds: Vec<i32>,
}

/// What kind of ptrace-stop a stopped thread is in (it decides how it can be resumed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopKind {
    /// signal-delivery-stop: resuming with a signal delivers it (with the siginfo the kernel holds).
    Signal,
    /// Interrupt trap or the first stop of a new task: resumed with PTRACE_CONT, no signal can be injected.
    Event,
    /// ptrace-event stop inside a system call (exec, clone/fork/vfork): like `Event`, but the syscall has not
    /// returned yet, so its return value will still be written to rax.
    SyscallEvent,
    /// group-stop (job control) of a seized task: resumed with PTRACE_LISTEN so it stays stopped like without us.
    GroupStop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Running,
    /// Restarted with PTRACE_LISTEN: stopped by job control, but not in a ptrace-stop.
    Listening,
    Stopped(StopKind),
    /// A thread-group leader that exited while other threads run: it never stops again.
    Zombie,
}

/// How a stopped thread is set going again ([`Tracer::continue_thread`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resume {
    /// PTRACE_CONT, delivering `sig` (0: none; only a signal-delivery-stop can deliver one).
    Cont { sig: i32 },
    /// PTRACE_LISTEN: out of a group-stop, staying stopped by job control.
    Listen,
    /// PTRACE_SINGLESTEP.
    Step,
}

#[derive(Debug, Clone)]
struct Thread {
    tgid: Pid,
    state: State,
    /// Signal to deliver when this thread is resumed without an explicit choice.
    pending: Option<i32>,
    /// Just auto-attached: a SIGSTOP as first signal is the kernel's attach artefact and is swallowed.
    fresh: bool,
    /// Blocked in vfork until its child execs or exits: it cannot reach a ptrace-stop meanwhile.
    vfork_wait: bool,
}

#[derive(Debug, Clone, Default)]
struct Proc {
    threads: BTreeSet<Pid>,
    /// Address of a `syscall` instruction used to inject system calls.
    gadget: Option<Addr>,
    /// The leader had already exited (zombie) when we attached, so it is not traced: the process' exit is
    /// reported when its last traced thread exits, with that thread's status (the group exit status).
    untraced_leader: bool,
}

const PTRACE_EVENT_STOP: i32 = 128;
const WAIT_FLAGS: i32 = libc::__WALL | libc::__WNOTHREAD;

/// Issue a raw ptrace request.
fn pt(req: libc::c_uint, tid: Pid, addr: usize, data: usize) -> Result<libc::c_long, Errno> {
    Errno::clear();
    // SAFETY: the requests issued by this module pass either integers or pointers to live, correctly sized
    // buffers owned by the caller for the duration of the call.
    let r = unsafe {
        libc::ptrace(
            req,
            tid.as_raw(),
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    };
    if r == -1 {
        let e = Errno::last();
        // PEEK* requests may legitimately return -1; none are used here, so -1 is always an error.
        return Err(e);
    }
    Ok(r)
}

/// The stop kind of a ptrace-stop with wait-status event `event` (`status >> 16`) outside a system call.
fn stop_kind_of(event: i32) -> StopKind {
    if event == 0 {
        StopKind::Signal
    } else {
        StopKind::Event
    }
}

fn is_stop_signal(sig: i32) -> bool {
    matches!(
        sig,
        libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
    )
}

/// Raw `waitpid`, retrying on EINTR.
fn waitpid_raw(pid: i32, flags: i32) -> Result<Option<(Pid, i32)>, Errno> {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out-pointer for the duration of the call.
        let r = unsafe { libc::waitpid(pid, &mut status, flags) };
        if r > 0 {
            return Ok(Some((Pid::from_raw(r), status)));
        }
        if r == 0 {
            return Ok(None);
        }
        match Errno::last() {
            Errno::EINTR => continue,
            e => return Err(e),
        }
    }
}

/// Read one `Key:\tvalue` field of /proc/TID/status.
pub(crate) fn proc_status_field(tid: Pid, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    text.lines().find_map(|l| {
        l.strip_prefix(key)
            .and_then(|r| r.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    })
}

/// The thread-group id of a task, if it exists.
pub(crate) fn tgid_of(tid: Pid) -> Option<Pid> {
    proc_status_field(tid, "Tgid")?
        .parse()
        .ok()
        .map(Pid::from_raw)
}

/// Scheduler state letter of a task (R, S, D, T, t, Z, X), None if it is gone.
fn task_state(tid: Pid) -> Option<char> {
    proc_status_field(tid, "State")?.chars().next()
}

/// Owns every traced task of the root process and its descendants.
///
/// Not `Send`: the kernel accepts ptrace requests only from the thread that attached, so create the tracer on
/// the thread that will drive it (the session's tracer thread) and keep it there.
pub struct Tracer {
    root: Pid,
    spawned: bool,
    procs: BTreeMap<Pid, Proc>,
    threads: BTreeMap<Pid, Thread>,
    queue: VecDeque<Event>,
    /// Wait statuses of tasks not yet known (a clone child reporting before its parent's clone event).
    early: HashMap<Pid, i32>,
    /// Open /proc/PID/mem per tgid.
    mem: RefCell<HashMap<Pid, File>>,
    owner: std::thread::ThreadId,
    finished: bool,
    /// Interrupts blocking waits at a deadline; created lazily on the owner thread (None: poll instead).
    timer: Option<Option<WaitTimer>>,
    /// ptrace requests are only accepted from the attaching thread: a Tracer never changes threads (!Send).
    _not_send: std::marker::PhantomData<*const ()>,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("root", &self.root)
            .field("spawned", &self.spawned)
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl Tracer {
    fn empty(root: Pid, spawned: bool) -> Tracer {
        Tracer {
            root,
            spawned,
            procs: BTreeMap::new(),
            threads: BTreeMap::new(),
            queue: VecDeque::new(),
            early: HashMap::new(),
            mem: RefCell::new(HashMap::new()),
            owner: std::thread::current().id(),
            finished: false,
            timer: None,
            _not_send: std::marker::PhantomData,
        }
    }

    fn add_thread(&mut self, tid: Pid, tgid: Pid, state: State, fresh: bool) {
        self.threads.insert(
            tid,
            Thread {
                tgid,
                state,
                pending: None,
                fresh,
                vfork_wait: false,
            },
        );
        self.procs.entry(tgid).or_default().threads.insert(tid);
    }

    /// The root process (tgid).
    pub fn root(&self) -> Pid {
        self.root
    }

    /// Tgids currently traced.
    pub fn processes(&self) -> Vec<Pid> {
        self.procs.keys().copied().collect()
    }

    /// Tids of one process (live threads only).
    pub fn threads(&self, pid: Pid) -> Vec<Pid> {
        let Some(tgid) = self.tgid(pid) else {
            return Vec::new();
        };
        self.procs
            .get(&tgid)
            .map(|p| {
                p.threads
                    .iter()
                    .copied()
                    .filter(|t| {
                        self.threads
                            .get(t)
                            .is_some_and(|th| th.state != State::Zombie)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Tids of every traced thread.
    pub fn all_threads(&self) -> Vec<Pid> {
        self.threads
            .iter()
            .filter(|(_, th)| th.state != State::Zombie)
            .map(|(t, _)| *t)
            .collect()
    }

    /// The tgid of a traced thread (or of a traced process given by its tgid).
    pub fn tgid(&self, tid: Pid) -> Option<Pid> {
        if self.procs.contains_key(&tid) {
            return Some(tid);
        }
        self.threads.get(&tid).map(|t| t.tgid)
    }

    /// Whether the thread is stopped in a ptrace-stop (registers and remote syscalls are available).
    pub fn is_stopped(&self, tid: Pid) -> bool {
        matches!(
            self.threads.get(&tid),
            Some(Thread {
                state: State::Stopped(_),
                ..
            })
        )
    }

    /// Whether the thread called vfork and waits for its child to exec or exit (it shares the child's memory).
    pub fn in_vfork(&self, tid: Pid) -> bool {
        self.threads.get(&tid).is_some_and(|t| t.vfork_wait)
    }

    /// Forget the pending signal of a stopped thread, so that `resume_all` does not deliver it.
    pub fn suppress_signal(&mut self, tid: Pid) {
        if let Some(th) = self.threads.get_mut(&tid) {
            th.pending = None;
        }
    }

    fn check_thread(&self) -> Result<(), TracerError> {
        if std::thread::current().id() != self.owner {
            return Err(TracerError::WrongThread);
        }
        Ok(())
    }

    /// Resume one stopped thread, optionally delivering a signal (only possible from a signal-delivery-stop).
    /// Resuming a thread that is not stopped does nothing.
    pub fn resume(&mut self, tid: Pid, signal: Option<i32>) -> Result<(), TracerError> {
        self.check_thread()?;
        let th = self
            .threads
            .get_mut(&tid)
            .ok_or(TracerError::UnknownThread(tid))?;
        let State::Stopped(kind) = th.state else {
            return Ok(());
        };
        th.pending = None;
        let tgid = th.tgid;
        let how = match kind {
            StopKind::GroupStop => Resume::Listen,
            StopKind::Signal => Resume::Cont {
                sig: signal.unwrap_or(0),
            },
            StopKind::Event | StopKind::SyscallEvent => Resume::Cont { sig: 0 },
        };
        let kind_stop_sig =
            matches!(kind, StopKind::Event | StopKind::SyscallEvent) && signal.is_some();
        match self.continue_thread(tid, how) {
            // Killed meanwhile: its exit will be reported by next_event.
            Ok(()) | Err(TracerError::ProcessGone(_)) => {}
            Err(e) => return Err(e),
        }
        if kind_stop_sig {
            // A signal cannot be injected from an event stop: send it as a thread-directed signal instead.
            // SAFETY: plain tgkill syscall with integer arguments.
            unsafe {
                libc::syscall(
                    libc::SYS_tgkill,
                    tgid.as_raw(),
                    tid.as_raw(),
                    signal.unwrap_or(0),
                )
            };
        }
        Ok(())
    }

    /// The one place a traced thread is set going (PTRACE_CONT, PTRACE_LISTEN, PTRACE_SINGLESTEP) and its state
    /// updated to match: running, or listening after PTRACE_LISTEN. ESRCH means the thread was killed meanwhile
    /// (SIGKILL ends any ptrace-stop): it is running to its exit, which a wait reports, and the error is
    /// `ProcessGone`. On any other error the state is left as it was.
    fn continue_thread(&mut self, tid: Pid, how: Resume) -> Result<(), TracerError> {
        let (req, op, data, next) = match how {
            Resume::Cont { sig } => (libc::PTRACE_CONT, "PTRACE_CONT", sig, State::Running),
            Resume::Listen => (libc::PTRACE_LISTEN, "PTRACE_LISTEN", 0, State::Listening),
            Resume::Step => (
                libc::PTRACE_SINGLESTEP,
                "PTRACE_SINGLESTEP",
                0,
                State::Running,
            ),
        };
        let r = pt(req, tid, 0, data as usize);
        let Some(th) = self.threads.get_mut(&tid) else {
            return r.map(|_| ()).map_err(|e| self.map_ptrace_err(tid, op, e));
        };
        match r {
            Ok(_) => {
                th.state = next;
                Ok(())
            }
            Err(Errno::ESRCH) => {
                th.state = State::Running;
                Err(TracerError::ProcessGone(tid))
            }
            Err(e) => Err(self.map_ptrace_err(tid, op, e)),
        }
    }

    /// A wait reported `tid` in a ptrace-stop of `kind` (while it is driven step by step).
    fn mark_stopped(&mut self, tid: Pid, kind: StopKind) {
        if let Some(th) = self.threads.get_mut(&tid) {
            th.state = State::Stopped(kind);
        }
    }

    /// Resume every stopped thread, delivering recorded pending signals. Threads with an event still queued
    /// (not yet returned by `next_event`) stay stopped until that event has been handled.
    pub fn resume_all(&mut self) -> Result<(), TracerError> {
        self.check_thread()?;
        let held: BTreeSet<Pid> = self
            .queue
            .iter()
            .flat_map(|e| e.stopped_threads())
            .collect();
        let tids: Vec<Pid> = self.threads.keys().copied().collect();
        for tid in tids {
            if held.contains(&tid) {
                continue;
            }
            let pending = self.threads.get(&tid).and_then(|t| t.pending);
            self.resume(tid, pending)?;
        }
        Ok(())
    }
}
