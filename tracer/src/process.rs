//! Ptrace control of a traced process tree: spawn/attach, threads, clone/fork/exec, stops, resumes, memory, registers.
//!
//! Every ptrace request must come from the thread that seized the tracee, so a [`Tracer`] is meant to live on one
//! thread (the session's tracer thread). It waits with `__WALL | __WNOTHREAD`, so it only ever sees its own
//! tracees and the children of its own thread: several tracers on several threads of one process do not interfere.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ffi::{CString, OsString};
use std::fs::File;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use nix::errno::Errno;
pub use nix::unistd::Pid;

use crate::{Addr, TracerError};

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

/// The signal a [`WaitTimer`] sends to interrupt a blocking `waitpid` (a no-op handler is installed for it).
fn wake_signal() -> i32 {
    libc::SIGRTMAX() - 1
}

extern "C" fn wake_handler(_: libc::c_int) {}

/// A one-shot POSIX timer aimed at the tracer thread: it interrupts a blocking `waitpid` (EINTR) at a deadline, so
/// `next_event` with a timeout blocks in the kernel instead of polling.
struct WaitTimer {
    id: libc::timer_t,
}

impl WaitTimer {
    fn new() -> Option<WaitTimer> {
        static INSTALL: std::sync::Once = std::sync::Once::new();
        static INSTALLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        INSTALL.call_once(|| {
            // SAFETY: installs a no-op handler (async-signal-safe) without SA_RESTART, so blocking calls return
            // EINTR; the sigaction struct is fully initialised.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = wake_handler as *const () as usize;
                sa.sa_flags = 0;
                libc::sigemptyset(&mut sa.sa_mask);
                let ok = libc::sigaction(wake_signal(), &sa, std::ptr::null_mut()) == 0;
                INSTALLED.store(ok, std::sync::atomic::Ordering::SeqCst);
            }
        });
        if !INSTALLED.load(std::sync::atomic::Ordering::SeqCst) {
            return None;
        }
        // SAFETY: sigevent is plain old data; the fields set select thread-directed delivery to this thread.
        let mut sev: libc::sigevent = unsafe { std::mem::zeroed() };
        sev.sigev_notify = libc::SIGEV_THREAD_ID;
        sev.sigev_signo = wake_signal();
        // SAFETY: gettid has no preconditions.
        sev.sigev_notify_thread_id = unsafe { libc::gettid() };
        let mut id: libc::timer_t = std::ptr::null_mut();
        // SAFETY: valid pointers to a live sigevent and timer id.
        if unsafe { libc::timer_create(libc::CLOCK_MONOTONIC, &mut sev, &mut id) } != 0 {
            return None;
        }
        Some(WaitTimer { id })
    }

    /// Arm for `d` from now (a zero duration disarms).
    fn arm(&self, d: Duration) {
        // SAFETY: itimerspec is plain old data.
        let mut its: libc::itimerspec = unsafe { std::mem::zeroed() };
        its.it_value.tv_sec = d.as_secs() as libc::time_t;
        its.it_value.tv_nsec = d.subsec_nanos() as libc::c_long;
        if d.is_zero() {
            its.it_value.tv_nsec = 0;
        } else {
            // Keep firing after the first expiry: if it lands between arming and the blocking waitpid (the
            // thread was preempted), the signal is spent before the wait begins, and only a later one ends it.
            its.it_interval.tv_nsec = WAIT_TIMER_REPEAT.as_nanos() as libc::c_long;
        }
        // SAFETY: `self.id` is a live timer; `its` is a valid itimerspec.
        unsafe { libc::timer_settime(self.id, 0, &its, std::ptr::null_mut()) };
    }
}

/// Period of the wait timer after its first expiry (see [`WaitTimer::arm`]).
const WAIT_TIMER_REPEAT: Duration = Duration::from_millis(1);

impl Drop for WaitTimer {
    fn drop(&mut self) {
        // SAFETY: `self.id` was returned by timer_create and is deleted once.
        unsafe { libc::timer_delete(self.id) };
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

const TRACE_OPTIONS: libc::c_int = libc::PTRACE_O_EXITKILL
    | libc::PTRACE_O_TRACECLONE
    | libc::PTRACE_O_TRACEFORK
    | libc::PTRACE_O_TRACEVFORK
    | libc::PTRACE_O_TRACEVFORKDONE
    | libc::PTRACE_O_TRACEEXEC
    | libc::PTRACE_O_TRACESYSGOOD;

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

    /// Fork+exec `argv[0]` (PATH lookup like a shell) under ptrace with stdio inherited unchanged.
    /// Returns with the new process stopped right after its execve.
    pub fn spawn(argv: &[OsString]) -> Result<Tracer, TracerError> {
        Tracer::spawn_with(argv, &SpawnOptions::default())
    }

    /// [`Tracer::spawn`] with options.
    pub fn spawn_with(argv: &[OsString], opts: &SpawnOptions) -> Result<Tracer, TracerError> {
        let prog = argv.first().ok_or(TracerError::EmptyCommand)?;
        let path = crate::program::validate(prog)?;

        // Everything the child needs is prepared before fork: between fork and exec only async-signal-safe
        // calls are allowed (the caller may be multi-threaded).
        let bad = |_| TracerError::SpawnFailed {
            path: path.clone(),
            reason: "an argument or environment variable contains a NUL byte".into(),
        };
        let c_path = CString::new(path.as_os_str().as_bytes()).map_err(bad)?;
        let c_args: Vec<CString> = argv
            .iter()
            .map(|a| CString::new(a.as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(bad)?;
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
        for (k, v) in &opts.extra_env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        let c_env: Vec<CString> = env
            .into_iter()
            .map(|(k, v)| {
                let mut b = k.into_vec();
                b.push(b'=');
                b.extend(v.into_vec());
                CString::new(b)
            })
            .collect::<Result<_, _>>()
            .map_err(bad)?;
        let mut argp: Vec<*const libc::c_char> = c_args.iter().map(|c| c.as_ptr()).collect();
        argp.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = c_env.iter().map(|c| c.as_ptr()).collect();
        envp.push(std::ptr::null());
        let disable_aslr = opts.disable_aslr;

        // SAFETY: fork in a possibly multi-threaded process; the child only calls async-signal-safe functions
        // (personality, sigprocmask, signal, getpid, kill, execve, _exit) on memory prepared before the fork.
        let child = unsafe { libc::fork() };
        if child < 0 {
            return Err(TracerError::errno("fork", Errno::last()));
        }
        if child == 0 {
            // SAFETY: see above; all pointers are valid NUL-terminated arrays built before fork.
            unsafe {
                if disable_aslr {
                    libc::personality(libc::ADDR_NO_RANDOMIZE as libc::c_ulong);
                }
                // Start the program in the standard state, as std::process::Command does: the Rust runtime
                // ignores SIGPIPE and the calling thread may block signals; neither belongs to the program.
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                // Stop so the parent can PTRACE_SEIZE us before execve (as strace does).
                libc::kill(libc::getpid(), libc::SIGSTOP);
                libc::execve(c_path.as_ptr(), argp.as_ptr(), envp.as_ptr());
                libc::_exit(127);
            }
        }
        let child = Pid::from_raw(child);
        let mut tr = Tracer::empty(child, true);

        // Wait for the self-stop (the child is not traced yet: WUNTRACED).
        match waitpid_raw(child.as_raw(), libc::WUNTRACED) {
            Ok(Some((_, st))) if libc::WIFSTOPPED(st) => {}
            Ok(Some((_, st))) => {
                return Err(TracerError::SpawnFailed {
                    path,
                    reason: format!("the child ended before exec (wait status {st:#x})"),
                })
            }
            Ok(None) | Err(_) => {
                return Err(TracerError::SpawnFailed {
                    path,
                    reason: "could not wait for the forked child".into(),
                })
            }
        }
        if let Err(e) = pt(libc::PTRACE_SEIZE, child, 0, TRACE_OPTIONS as usize) {
            // SAFETY: plain kill of our own child.
            unsafe { libc::kill(child.as_raw(), libc::SIGKILL) };
            let _ = waitpid_raw(child.as_raw(), 0);
            tr.finished = true;
            return Err(match e {
                Errno::EPERM => TracerError::permission_denied(child),
                e => TracerError::errno("ptrace(PTRACE_SEIZE)", e),
            });
        }
        tr.add_thread(child, child, State::Running, false);
        // SAFETY: plain kill of our own child.
        unsafe { libc::kill(child.as_raw(), libc::SIGCONT) };
        loop {
            let (_, st) = match waitpid_raw(child.as_raw(), WAIT_FLAGS) {
                Ok(Some(x)) => x,
                Ok(None) => continue,
                Err(e) => return Err(TracerError::errno("waitpid", e)),
            };
            if libc::WIFEXITED(st) || libc::WIFSIGNALED(st) {
                tr.threads.clear();
                tr.procs.clear();
                tr.finished = true;
                let reason = if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 127 {
                    "execve failed (exit status 127)".to_string()
                } else {
                    format!("the child ended before exec (wait status {st:#x})")
                };
                return Err(TracerError::SpawnFailed { path, reason });
            }
            let event = st >> 16;
            if event == libc::PTRACE_EVENT_EXEC {
                tr.threads.get_mut(&child).expect("registered above").state =
                    State::Stopped(StopKind::SyscallEvent);
                return Ok(tr);
            }
            // Before exec: the seize trap, our SIGCONT, the SIGSTOP — all are ours; suppress them.
            if let Err(e) = pt(libc::PTRACE_CONT, child, 0, 0) {
                if e != Errno::ESRCH {
                    return Err(TracerError::errno("ptrace(PTRACE_CONT)", e));
                }
            }
        }
    }

    /// PTRACE_SEIZE every thread of `pid` and interrupt them all. Returns with all threads stopped.
    pub fn attach(pid: Pid) -> Result<Tracer, TracerError> {
        let tgid = crate::program::check_pid(pid)?;
        let mut tr = Tracer::empty(tgid, false);
        let me = nix::unistd::getpid().as_raw().to_string();
        loop {
            let mut new = 0;
            let dir = std::fs::read_dir(format!("/proc/{tgid}/task"))
                .map_err(|_| TracerError::NoSuchProcess(pid))?;
            for ent in dir.flatten() {
                let Some(tid) = ent.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                let tid = Pid::from_raw(tid);
                if tr.threads.contains_key(&tid) {
                    continue;
                }
                match pt(libc::PTRACE_SEIZE, tid, 0, TRACE_OPTIONS as usize) {
                    Ok(_) => {
                        tr.add_thread(tid, tgid, State::Running, false);
                        new += 1;
                    }
                    Err(Errno::ESRCH) => {}
                    Err(Errno::EPERM) => {
                        // A thread cloned after we seized its parent is auto-attached to us already.
                        if !tr.threads.is_empty()
                            && proc_status_field(tid, "TracerPid").as_deref() == Some(me.as_str())
                        {
                            tr.add_thread(tid, tgid, State::Running, false);
                            new += 1;
                        } else if tid == tgid && matches!(task_state(tid), Some('Z') | Some('X')) {
                            // The main thread called pthread_exit: a zombie cannot be traced, the others can.
                            tr.add_thread(tid, tgid, State::Zombie, false);
                            tr.procs.entry(tgid).or_default().untraced_leader = true;
                            new += 1;
                        } else if tr.threads.is_empty() {
                            tr.finished = true;
                            return Err(TracerError::permission_denied(tgid));
                        } else {
                            return Err(TracerError::permission_denied(tid));
                        }
                    }
                    Err(e) => {
                        return Err(TracerError::errno(
                            format!("ptrace(PTRACE_SEIZE, {tid})"),
                            e,
                        ))
                    }
                }
            }
            if new == 0 {
                break;
            }
        }
        if tr.threads.is_empty() {
            tr.finished = true;
            return Err(TracerError::NoSuchProcess(pid));
        }
        tr.stop_all()?;
        Ok(tr)
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
        let (req, sig, next) = match kind {
            StopKind::GroupStop => (libc::PTRACE_LISTEN, 0, State::Listening),
            StopKind::Signal => (libc::PTRACE_CONT, signal.unwrap_or(0), State::Running),
            StopKind::Event | StopKind::SyscallEvent => (libc::PTRACE_CONT, 0, State::Running),
        };
        let kind_stop_sig =
            matches!(kind, StopKind::Event | StopKind::SyscallEvent) && signal.is_some();
        match pt(req, tid, 0, sig as usize) {
            Ok(_) => th.state = next,
            // The thread was killed meanwhile (SIGKILL): its exit will be reported by next_event.
            Err(Errno::ESRCH) => th.state = State::Running,
            Err(e) => return Err(TracerError::errno(format!("ptrace(resume {tid})"), e)),
        }
        if kind_stop_sig {
            // A signal cannot be injected from an event stop: send it as a thread-directed signal instead.
            let tgid = th.tgid;
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

    /// Stop every thread of every traced process. Events seen while stopping are queued for `next_event`.
    pub fn stop_all(&mut self) -> Result<(), TracerError> {
        self.check_thread()?;
        let tids: Vec<Pid> = self.threads.keys().copied().collect();
        for tid in tids {
            let Some(th) = self.threads.get(&tid) else {
                continue;
            };
            if matches!(th.state, State::Running | State::Listening) && !th.vfork_wait {
                match pt(libc::PTRACE_INTERRUPT, tid, 0, 0) {
                    Ok(_) | Err(Errno::ESRCH) => {}
                    Err(e) => {
                        return Err(TracerError::errno(
                            format!("ptrace(PTRACE_INTERRUPT, {tid})"),
                            e,
                        ))
                    }
                }
            }
        }
        // The first check for never-stopping zombie leaders comes soon, later ones rarely.
        let mut slice = Duration::from_millis(5);
        loop {
            let waiting: Vec<Pid> = self
                .threads
                .iter()
                .filter(|(_, t)| {
                    matches!(t.state, State::Running | State::Listening) && !t.vfork_wait
                })
                .map(|(tid, _)| *tid)
                .collect();
            if waiting.is_empty() {
                return Ok(());
            }
            match self.wait_any(Some(Instant::now() + slice)) {
                Ok(Some((tid, st))) => {
                    if let Some(ev) = self.handle_status(tid, st, true)? {
                        self.queue.push_back(ev);
                    }
                    continue;
                }
                Ok(None) => {}
                Err(Errno::ECHILD) => {
                    // Nothing left to wait for: every remaining task is gone.
                    for tid in waiting {
                        self.drop_thread_silently(tid);
                    }
                    continue;
                }
                Err(e) => return Err(TracerError::errno("waitpid", e)),
            }
            // A zombie leader (it called pthread_exit) never stops: do not wait for it.
            slice = Duration::from_millis(50);
            for tid in &waiting {
                if matches!(task_state(*tid), Some('Z') | Some('X') | None) {
                    if let Some(th) = self.threads.get_mut(tid) {
                        th.state = State::Zombie;
                    }
                }
            }
        }
    }

    fn drop_thread_silently(&mut self, tid: Pid) {
        if let Some(th) = self.threads.remove(&tid) {
            if let Some(p) = self.procs.get_mut(&th.tgid) {
                p.threads.remove(&tid);
            }
        }
    }

    /// Wait for any wait status of our tasks until `deadline` (None = block). Ok(None) on timeout.
    fn wait_any(&mut self, deadline: Option<Instant>) -> Result<Option<(Pid, i32)>, Errno> {
        let Some(deadline) = deadline else {
            return waitpid_raw(-1, WAIT_FLAGS);
        };
        if let Some(x) = waitpid_raw(-1, WAIT_FLAGS | libc::WNOHANG)? {
            return Ok(Some(x));
        }
        if self.timer.is_none() {
            self.timer = Some(WaitTimer::new());
        }
        let mut backoff = Duration::from_micros(20);
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let Some(Some(timer)) = self.timer.as_ref() else {
                // No timer: poll with a short back-off.
                std::thread::sleep(backoff.min(deadline - now));
                backoff = (backoff * 2).min(Duration::from_millis(1));
                if let Some(x) = waitpid_raw(-1, WAIT_FLAGS | libc::WNOHANG)? {
                    return Ok(Some(x));
                }
                continue;
            };
            timer.arm((deadline - now).max(Duration::from_nanos(1)));
            let mut status = 0;
            // SAFETY: `status` is a valid out-pointer for the duration of the call.
            let r = unsafe { libc::waitpid(-1, &mut status, WAIT_FLAGS) };
            let err = Errno::last();
            timer.arm(Duration::ZERO);
            if r > 0 {
                return Ok(Some((Pid::from_raw(r), status)));
            }
            if err != Errno::EINTR {
                return Err(err);
            }
        }
    }

    /// Wait for the next event, at most `timeout` (None = block). Ok(None) on timeout.
    pub fn next_event(&mut self, timeout: Option<Duration>) -> Result<Option<Event>, TracerError> {
        self.check_thread()?;
        if let Some(ev) = self.queue.pop_front() {
            return Ok(Some(ev));
        }
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if self.threads.is_empty() {
                // Nothing is traced any more: nothing can happen.
                if let Some(d) = deadline {
                    let now = Instant::now();
                    if d > now {
                        std::thread::sleep(d - now);
                    }
                    return Ok(None);
                }
                return Err(TracerError::ProcessGone(self.root));
            }
            match self.wait_any(deadline) {
                Ok(Some((tid, st))) => {
                    if let Some(ev) = self.handle_status(tid, st, false)? {
                        return Ok(Some(ev));
                    }
                    if let Some(ev) = self.queue.pop_front() {
                        return Ok(Some(ev));
                    }
                }
                Ok(None) => return Ok(None),
                Err(Errno::ECHILD) => {
                    let tids: Vec<Pid> = self.threads.keys().copied().collect();
                    for t in tids {
                        self.drop_thread_silently(t);
                    }
                    self.procs.clear();
                    return Err(TracerError::ProcessGone(self.root));
                }
                Err(e) => return Err(TracerError::errno("waitpid", e)),
            }
        }
    }

    /// Wait for the first stop of a freshly auto-attached task and register its state.
    fn take_initial_stop(&mut self, child: Pid, stopping: bool) -> Result<Vec<Event>, TracerError> {
        let status = match self.early.remove(&child) {
            Some(s) => s,
            None => match waitpid_raw(child.as_raw(), WAIT_FLAGS) {
                Ok(Some((_, s))) => s,
                Ok(None) => return Ok(vec![]),
                Err(_) => {
                    self.drop_thread_silently(child);
                    return Ok(vec![]);
                }
            },
        };
        let is_initial = libc::WIFSTOPPED(status)
            && ((status >> 16) == PTRACE_EVENT_STOP
                || ((status >> 16) == 0 && libc::WSTOPSIG(status) == libc::SIGSTOP));
        if is_initial {
            if let Some(th) = self.threads.get_mut(&child) {
                // Seized tracees' children start with PTRACE_EVENT_STOP (the kernel sends no SIGSTOP then, so a
                // later SIGSTOP is the program's); the SIGSTOP form is the legacy attach artefact, swallowed here.
                th.state = State::Stopped(if (status >> 16) == PTRACE_EVENT_STOP {
                    StopKind::Event
                } else {
                    StopKind::Signal
                });
                th.pending = None;
                th.fresh = false;
            }
            return Ok(vec![]);
        }
        // Anything else (an exit, an early signal) is processed normally; the child then counts as stopped or gone.
        Ok(self
            .handle_status(child, status, stopping)?
            .into_iter()
            .collect())
    }

    /// Decode one wait status. Returns an event (its threads left stopped) or None when the stop was handled
    /// internally (the thread is resumed unless `stopping`).
    fn handle_status(
        &mut self,
        tid: Pid,
        status: i32,
        stopping: bool,
    ) -> Result<Option<Event>, TracerError> {
        if libc::WIFEXITED(status) || libc::WIFSIGNALED(status) {
            self.early.remove(&tid);
            let Some(th) = self.threads.remove(&tid) else {
                return Ok(None);
            };
            let tgid = th.tgid;
            if let Some(p) = self.procs.get_mut(&tgid) {
                p.threads.remove(&tid);
            }
            if tid == tgid {
                if let Some(p) = self.procs.remove(&tgid) {
                    for t in p.threads {
                        self.threads.remove(&t);
                    }
                }
                self.mem.borrow_mut().remove(&tgid);
                // A vfork parent waiting for this process is released and reports PTRACE_EVENT_VFORK_DONE.
                return Ok(Some(Event::Exited {
                    pid: tgid,
                    status: ExitStatus::from_wait(status),
                }));
            }
            let last_of_untraced = self
                .procs
                .get(&tgid)
                .is_some_and(|p| p.untraced_leader && p.threads.iter().all(|t| *t == tgid));
            if last_of_untraced {
                self.procs.remove(&tgid);
                self.threads.remove(&tgid);
                self.mem.borrow_mut().remove(&tgid);
                return Ok(Some(Event::Exited {
                    pid: tgid,
                    status: ExitStatus::from_wait(status),
                }));
            }
            return Ok(Some(Event::ThreadExited { tid }));
        }
        if !libc::WIFSTOPPED(status) {
            return Ok(None);
        }
        if !self.threads.contains_key(&tid) {
            // A clone child reporting before its parent's clone event: keep it for then.
            self.early.insert(tid, status);
            return Ok(None);
        }
        let sig = libc::WSTOPSIG(status);
        let event = status >> 16;
        match event {
            libc::PTRACE_EVENT_CLONE | libc::PTRACE_EVENT_FORK | libc::PTRACE_EVENT_VFORK => {
                let mut msg: libc::c_ulong = 0;
                pt(
                    libc::PTRACE_GETEVENTMSG,
                    tid,
                    0,
                    &mut msg as *mut _ as usize,
                )
                .map_err(|e| TracerError::errno("ptrace(PTRACE_GETEVENTMSG)", e))?;
                let child = Pid::from_raw(msg as i32);
                let parent_tgid = self.threads[&tid].tgid;
                let child_tgid = if event == libc::PTRACE_EVENT_CLONE {
                    tgid_of(child).unwrap_or(parent_tgid)
                } else {
                    child
                };
                {
                    let th = self.threads.get_mut(&tid).expect("checked above");
                    th.state = State::Stopped(StopKind::SyscallEvent);
                    th.fresh = false;
                    if event == libc::PTRACE_EVENT_VFORK {
                        th.vfork_wait = true;
                    }
                }
                if !self.threads.contains_key(&child) {
                    self.add_thread(child, child_tgid, State::Running, false);
                }
                let extra = if self
                    .threads
                    .get(&child)
                    .is_some_and(|t| t.state == State::Running)
                {
                    self.take_initial_stop(child, stopping)?
                } else {
                    vec![]
                };
                let ev = if child_tgid == parent_tgid {
                    Event::NewThread {
                        tid: child,
                        parent: tid,
                    }
                } else {
                    Event::Forked { parent: tid, child }
                };
                self.queue.extend(extra);
                Ok(Some(ev))
            }
            libc::PTRACE_EVENT_EXEC => {
                let tgid = self.threads[&tid].tgid;
                let others: Vec<Pid> = self
                    .procs
                    .get(&tgid)
                    .map(|p| p.threads.iter().copied().filter(|t| *t != tid).collect())
                    .unwrap_or_default();
                for t in &others {
                    self.drop_thread_silently(*t);
                    self.queue.push_back(Event::ThreadExited { tid: *t });
                }
                if let Some(p) = self.procs.get_mut(&tgid) {
                    p.gadget = None;
                }
                self.mem.borrow_mut().remove(&tgid);
                let th = self.threads.get_mut(&tid).expect("checked above");
                th.state = State::Stopped(StopKind::SyscallEvent);
                th.pending = None;
                th.fresh = false;
                // The vfork parent (if any) is released by this exec; VFORK_DONE will tell it too.
                Ok(Some(Event::Exec { pid: tid }))
            }
            libc::PTRACE_EVENT_VFORK_DONE => {
                let th = self.threads.get_mut(&tid).expect("checked above");
                th.vfork_wait = false;
                th.state = State::Stopped(StopKind::SyscallEvent);
                if !stopping {
                    self.resume(tid, None)?;
                }
                Ok(None)
            }
            PTRACE_EVENT_STOP => {
                let th = self.threads.get_mut(&tid).expect("checked above");
                th.fresh = false;
                if is_stop_signal(sig) {
                    // Group-stop: the program is stopped by job control. Stay stopped the way it would be
                    // without us (PTRACE_LISTEN), so SIGCONT still resumes it.
                    th.state = State::Stopped(StopKind::GroupStop);
                } else {
                    th.state = State::Stopped(StopKind::Event);
                }
                if !stopping {
                    self.resume(tid, None)?;
                }
                Ok(None)
            }
            0 => {
                let th = self.threads.get_mut(&tid).expect("checked above");
                th.state = State::Stopped(StopKind::Signal);
                if sig == (libc::SIGTRAP | 0x80) {
                    // A syscall stop (never requested): just continue.
                    th.pending = None;
                    if !stopping {
                        self.resume(tid, None)?;
                    }
                    return Ok(None);
                }
                let fresh = std::mem::replace(&mut th.fresh, false);
                if fresh && sig == libc::SIGSTOP {
                    // The kernel's auto-attach SIGSTOP, not the program's.
                    th.pending = None;
                    if !stopping {
                        self.resume(tid, None)?;
                    }
                    return Ok(None);
                }
                th.pending = Some(sig);
                if sig == libc::SIGSTOP {
                    // Job control: deliver it; the resulting group-stop is handled above. SIGTSTP, SIGTTIN and
                    // SIGTTOU may have handlers, so they are reported like any other signal (the caller may have
                    // to prepare the thread before a handler runs) and the caller delivers them.
                    if !stopping {
                        self.resume(tid, Some(sig))?;
                    }
                    return Ok(None);
                }
                let siginfo = self.siginfo(tid)?;
                Ok(Some(Event::Signal {
                    tid,
                    signal: sig,
                    siginfo,
                }))
            }
            _ => {
                // An event we did not ask for: continue.
                let th = self.threads.get_mut(&tid).expect("checked above");
                th.state = State::Stopped(StopKind::Event);
                if !stopping {
                    self.resume(tid, None)?;
                }
                Ok(None)
            }
        }
    }

    /// The siginfo of a thread in signal-delivery-stop.
    pub fn siginfo(&self, tid: Pid) -> Result<libc::siginfo_t, TracerError> {
        // SAFETY: siginfo_t is plain old data; all-zero is a valid value.
        let mut si: libc::siginfo_t = unsafe { std::mem::zeroed() };
        pt(libc::PTRACE_GETSIGINFO, tid, 0, &mut si as *mut _ as usize)
            .map_err(|e| self.map_ptrace_err(tid, "PTRACE_GETSIGINFO", e))?;
        Ok(si)
    }

    pub(crate) fn set_siginfo(&self, tid: Pid, si: &libc::siginfo_t) -> Result<(), TracerError> {
        pt(libc::PTRACE_SETSIGINFO, tid, 0, si as *const _ as usize)
            .map_err(|e| self.map_ptrace_err(tid, "PTRACE_SETSIGINFO", e))?;
        Ok(())
    }

    fn map_ptrace_err(&self, tid: Pid, op: &str, e: Errno) -> TracerError {
        match e {
            Errno::ESRCH if !self.threads.contains_key(&tid) => TracerError::UnknownThread(tid),
            Errno::ESRCH if !self.is_stopped(tid) => TracerError::NotStopped(tid),
            Errno::ESRCH => TracerError::ProcessGone(tid),
            e => TracerError::errno(format!("ptrace({op}, {tid})"), e),
        }
    }

    fn mem_file(&self, pid: Pid) -> Result<Pid, TracerError> {
        let tgid = self.tgid(pid).unwrap_or(pid);
        let mut mem = self.mem.borrow_mut();
        if let std::collections::hash_map::Entry::Vacant(slot) = mem.entry(tgid) {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(format!("/proc/{tgid}/mem"))
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::ENOENT) | Some(libc::ESRCH) => TracerError::ProcessGone(tgid),
                    Some(libc::EACCES) | Some(libc::EPERM) => TracerError::permission_denied(tgid),
                    _ => TracerError::io(format!("opening /proc/{tgid}/mem"), e),
                })?;
            slot.insert(f);
        }
        Ok(tgid)
    }

    /// Read target memory through /proc/PID/mem. Short reads are errors.
    pub fn read_memory(&self, pid: Pid, addr: Addr, buf: &mut [u8]) -> Result<(), TracerError> {
        let tgid = self.mem_file(pid)?;
        let mem = self.mem.borrow();
        let f = &mem[&tgid];
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], addr.0.wrapping_add(done as u64)) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        if done < buf.len() {
            return Err(TracerError::ShortAccess {
                pid: tgid,
                addr: addr.0,
                len: buf.len(),
                done,
            });
        }
        Ok(())
    }

    /// Write target memory through /proc/PID/mem (works on read-only code pages).
    pub fn write_memory(&self, pid: Pid, addr: Addr, data: &[u8]) -> Result<(), TracerError> {
        let tgid = self.mem_file(pid)?;
        let mem = self.mem.borrow();
        let f = &mem[&tgid];
        let mut done = 0;
        while done < data.len() {
            match f.write_at(&data[done..], addr.0.wrapping_add(done as u64)) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        if done < data.len() {
            return Err(TracerError::ShortAccess {
                pid: tgid,
                addr: addr.0,
                len: data.len(),
                done,
            });
        }
        Ok(())
    }

    /// General-purpose registers of a stopped thread.
    pub fn regs(&self, tid: Pid) -> Result<libc::user_regs_struct, TracerError> {
        // SAFETY: user_regs_struct is plain old data; all-zero is valid.
        let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        pt(libc::PTRACE_GETREGS, tid, 0, &mut regs as *mut _ as usize)
            .map_err(|e| self.map_ptrace_err(tid, "PTRACE_GETREGS", e))?;
        Ok(regs)
    }

    /// Set the general-purpose registers of a stopped thread.
    pub fn set_regs(&mut self, tid: Pid, regs: &libc::user_regs_struct) -> Result<(), TracerError> {
        self.check_thread()?;
        pt(libc::PTRACE_SETREGS, tid, 0, regs as *const _ as usize)
            .map_err(|e| self.map_ptrace_err(tid, "PTRACE_SETREGS", e))?;
        Ok(())
    }

    /// Use `addr` (a `syscall` instruction in executable memory of `pid`, e.g. in a code-cache arena) for later
    /// injected system calls.
    pub fn set_syscall_gadget(&mut self, pid: Pid, addr: Addr) {
        if let Some(tgid) = self.tgid(pid) {
            if let Some(p) = self.procs.get_mut(&tgid) {
                p.gadget = Some(addr);
            }
        }
    }

    /// Find (and cache) a `syscall` instruction in the process' executable memory: the vDSO first (the program
    /// never changes it), then any other executable mapping.
    fn gadget(&mut self, tgid: Pid) -> Result<Addr, TracerError> {
        if let Some(g) = self.procs.get(&tgid).and_then(|p| p.gadget) {
            // Cheap check that it still is a `syscall` (the memory may have been unmapped or rewritten).
            let mut b = [0u8; 2];
            if self.read_memory(tgid, g, &mut b).is_ok() && b == [0x0f, 0x05] {
                return Ok(g);
            }
            if let Some(p) = self.procs.get_mut(&tgid) {
                p.gadget = None;
            }
        }
        let maps = crate::maps::read_maps(tgid)?;
        let mut order: Vec<&crate::maps::Mapping> =
            maps.iter().filter(|m| m.exec && m.read).collect();
        order.sort_by_key(|m| {
            let name = m
                .path
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name == "[vdso]" {
                0
            } else if name.contains("libc") {
                1
            } else {
                2
            }
        });
        for m in order {
            let len = (m.end.0 - m.start.0).min(1 << 20) as usize;
            let mut buf = vec![0u8; len];
            if self.read_memory(tgid, m.start, &mut buf).is_err() {
                continue;
            }
            if let Some(i) = buf.windows(2).position(|w| w == [0x0f, 0x05]) {
                let g = m.start.offset(i as u64);
                if let Some(p) = self.procs.get_mut(&tgid) {
                    p.gadget = Some(g);
                }
                return Ok(g);
            }
        }
        Err(TracerError::NoSyscallGadget(tgid))
    }

    /// Execute a system call inside the target on stopped thread `tid` and return its raw result; a negative
    /// errno result is `Err(RemoteSyscall)`. Registers, siginfo and stop kind are restored afterwards.
    pub fn remote_syscall(
        &mut self,
        tid: Pid,
        nr: i64,
        args: [u64; 6],
    ) -> Result<i64, TracerError> {
        self.check_thread()?;
        let th = self
            .threads
            .get(&tid)
            .ok_or(TracerError::UnknownThread(tid))?
            .clone();
        let State::Stopped(kind) = th.state else {
            return Err(TracerError::NotStopped(tid));
        };
        if th.vfork_wait && kind == StopKind::SyscallEvent {
            // Finishing the vfork system call would block this thread until its child execs or exits.
            return Err(TracerError::Unsupported(format!(
                "cannot run a system call in thread {tid}: it is in vfork until its child execs or exits; \
                 use the child (they share memory)"
            )));
        }
        let mut kind = kind;
        if kind == StopKind::SyscallEvent {
            self.leave_syscall(tid)?;
            kind = StopKind::Signal;
        }
        let saved = self.regs(tid)?;
        let saved_si = if kind == StopKind::Signal {
            Some(self.siginfo(tid)?)
        } else {
            None
        };
        let mut attempt = 0;
        let ret = loop {
            let gadget = self.gadget(th.tgid)?;
            let mut r = saved;
            r.rax = nr as u64;
            // orig_rax = -1: no syscall-restart logic may touch our injected rip/rax (the thread may have been
            // stopped inside an interrupted syscall with rax = -ERESTART*); the original values are restored
            // afterwards and the kernel then restarts the original syscall as it would have.
            r.orig_rax = u64::MAX;
            r.rdi = args[0];
            r.rsi = args[1];
            r.rdx = args[2];
            r.r10 = args[3];
            r.r8 = args[4];
            r.r9 = args[5];
            r.rip = gadget.0;
            self.set_regs(tid, &r)?;
            let result = self.step_syscall(tid, gadget);
            // Always restore, even when the step failed (unless the thread is gone).
            let restore = self.set_regs(tid, &saved).and_then(|_| match saved_si {
                Some(si) => self.set_siginfo(tid, &si),
                None => Ok(()),
            });
            let gadget_lost = self.procs.get(&th.tgid).is_some_and(|p| p.gadget.is_none());
            match result {
                // The gadget faulted (its memory was unmapped or changed): find another one, once.
                Err(TracerError::UnexpectedStop { .. }) if gadget_lost && attempt == 0 => {
                    restore?;
                    attempt += 1;
                }
                Err(e) => return Err(e),
                Ok(v) => {
                    restore?;
                    break v;
                }
            }
        };
        if let Some(t) = self.threads.get_mut(&tid) {
            t.state = State::Stopped(match kind {
                StopKind::Signal => StopKind::Signal,
                // We are now in a SIGTRAP signal-delivery-stop; resuming with signal 0 suppresses it.
                StopKind::Event | StopKind::SyscallEvent => StopKind::Signal,
                StopKind::GroupStop => StopKind::Signal,
            });
        }
        if kind == StopKind::GroupStop {
            // Return to a group-stop trap so PTRACE_LISTEN works again: interrupt, continue, wait for the trap.
            self.rejoin_group_stop(tid)?;
        }
        if (-4095..0).contains(&ret) {
            return Err(TracerError::RemoteSyscall {
                nr,
                errno: (-ret) as i32,
            });
        }
        Ok(ret)
    }

    fn step_syscall(&mut self, tid: Pid, gadget: Addr) -> Result<i64, TracerError> {
        let mut deferred: Vec<i32> = Vec::new();
        let mut stray = 0;
        pt(libc::PTRACE_SINGLESTEP, tid, 0, 0)
            .map_err(|e| self.map_ptrace_err(tid, "PTRACE_SINGLESTEP", e))?;
        let out = loop {
            let (_, st) = match waitpid_raw(tid.as_raw(), WAIT_FLAGS) {
                Ok(Some(x)) => x,
                Ok(None) => continue,
                Err(e) => break Err(TracerError::errno("waitpid", e)),
            };
            if libc::WIFEXITED(st) || libc::WIFSIGNALED(st) {
                // Let the normal event path report the exit.
                self.queue_exit(tid, st);
                break Err(TracerError::ProcessGone(tid));
            }
            let sig = libc::WSTOPSIG(st);
            let event = st >> 16;
            if event == 0 && sig == libc::SIGTRAP {
                let r = match self.regs(tid) {
                    Ok(r) => r,
                    Err(e) => break Err(e),
                };
                if r.rip == gadget.0 + 2 {
                    break Ok(r.rax as i64);
                }
                // Stopped inside a syscall (exec/clone event stops): the kernel reports the single-step once at
                // that syscall's exit, before our instruction ran. Step again.
                if r.rip != gadget.0 || stray >= 3 {
                    if r.rip != gadget.0 {
                        // Whatever is at the gadget address now is not a `syscall`: never use it again.
                        if let Some(p) = self.tgid(tid).and_then(|t| self.procs.get_mut(&t)) {
                            p.gadget = None;
                        }
                    }
                    break Err(TracerError::UnexpectedStop { tid, status: st });
                }
                stray += 1;
            } else if event == 0 && sig != (libc::SIGTRAP | 0x80) {
                let at_gadget = self.regs(tid).map(|r| r.rip == gadget.0).unwrap_or(false);
                if at_gadget && matches!(sig, libc::SIGSEGV | libc::SIGBUS | libc::SIGILL) {
                    // The gadget itself faults (its memory changed): forget it and fail instead of looping.
                    if let Some(p) = self.tgid(tid).and_then(|t| self.procs.get_mut(&t)) {
                        p.gadget = None;
                    }
                    break Err(TracerError::UnexpectedStop { tid, status: st });
                }
                // Another signal arrived first: hold it back and re-raise it afterwards.
                if !deferred.contains(&sig) {
                    deferred.push(sig);
                }
            }
            // Event stops (e.g. a pending interrupt) and deferred signals: keep stepping.
            if let Err(e) = pt(libc::PTRACE_SINGLESTEP, tid, 0, 0) {
                break Err(self.map_ptrace_err(tid, "PTRACE_SINGLESTEP", e));
            }
        };
        if let Some(tgid) = self.tgid(tid) {
            for s in deferred {
                // SAFETY: plain tgkill syscall with integer arguments.
                unsafe { libc::syscall(libc::SYS_tgkill, tgid.as_raw(), tid.as_raw(), s) };
            }
        }
        out
    }

    /// Let a thread stopped at a ptrace event inside a system call (exec, clone...) finish that system call
    /// without running any of its code: a single-step is reported at the syscall's exit, before the next
    /// instruction. Afterwards it is in a SIGTRAP signal-delivery-stop that resuming with no signal discards.
    fn leave_syscall(&mut self, tid: Pid) -> Result<(), TracerError> {
        let mut deferred = Vec::new();
        pt(libc::PTRACE_SINGLESTEP, tid, 0, 0)
            .map_err(|e| self.map_ptrace_err(tid, "PTRACE_SINGLESTEP", e))?;
        let out = loop {
            let (_, st) = match waitpid_raw(tid.as_raw(), WAIT_FLAGS) {
                Ok(Some(x)) => x,
                Ok(None) => continue,
                Err(e) => break Err(TracerError::errno("waitpid", e)),
            };
            if libc::WIFEXITED(st) || libc::WIFSIGNALED(st) {
                self.queue_exit(tid, st);
                break Err(TracerError::ProcessGone(tid));
            }
            let sig = libc::WSTOPSIG(st);
            let event = st >> 16;
            if event == 0 && sig == libc::SIGTRAP {
                break Ok(());
            }
            if event == 0 && sig != (libc::SIGTRAP | 0x80) {
                deferred.push(sig);
            }
            if let Err(e) = pt(libc::PTRACE_SINGLESTEP, tid, 0, 0) {
                break Err(self.map_ptrace_err(tid, "PTRACE_SINGLESTEP", e));
            }
        };
        if let Some(th) = self.threads.get_mut(&tid) {
            th.state = State::Stopped(StopKind::Signal);
            th.pending = None;
            let tgid = th.tgid;
            for s in deferred {
                // SAFETY: plain tgkill syscall with integer arguments.
                unsafe { libc::syscall(libc::SYS_tgkill, tgid.as_raw(), tid.as_raw(), s) };
            }
        }
        out
    }

    fn queue_exit(&mut self, tid: Pid, status: i32) {
        if let Ok(Some(ev)) = self.handle_status(tid, status, true) {
            self.queue.push_back(ev);
        }
    }

    fn rejoin_group_stop(&mut self, tid: Pid) -> Result<(), TracerError> {
        pt(libc::PTRACE_INTERRUPT, tid, 0, 0)
            .map_err(|e| self.map_ptrace_err(tid, "PTRACE_INTERRUPT", e))?;
        pt(libc::PTRACE_CONT, tid, 0, 0).map_err(|e| self.map_ptrace_err(tid, "PTRACE_CONT", e))?;
        if let Some(t) = self.threads.get_mut(&tid) {
            t.state = State::Running;
        }
        loop {
            match waitpid_raw(tid.as_raw(), WAIT_FLAGS) {
                Ok(Some((_, st))) => {
                    if libc::WIFSTOPPED(st) && (st >> 16) == PTRACE_EVENT_STOP {
                        let _ = self.handle_status(tid, st, true)?;
                        return Ok(());
                    }
                    if let Some(ev) = self.handle_status(tid, st, true)? {
                        self.queue.push_back(ev);
                    }
                    if !self.threads.contains_key(&tid) || self.is_stopped(tid) {
                        return Ok(());
                    }
                }
                Ok(None) => continue,
                Err(e) => return Err(TracerError::errno("waitpid", e)),
            }
        }
    }

    /// Leave every process running, untraced, exactly as it was (pending signals delivered, job-control stops kept).
    pub fn detach(mut self) -> Result<(), TracerError> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<(), TracerError> {
        self.check_thread()?;
        if self.finished {
            return Ok(());
        }
        self.finished = true;
        self.stop_all()?;
        // Signals collected while stopping are still owed to the program.
        let tids: Vec<Pid> = self.threads.keys().copied().collect();
        let mut first_err = None;
        for tid in tids {
            let th = &self.threads[&tid];
            if !matches!(th.state, State::Stopped(_)) {
                continue;
            }
            let sig = match th.state {
                State::Stopped(StopKind::Signal) => th.pending.unwrap_or(0),
                _ => 0,
            };
            match pt(libc::PTRACE_DETACH, tid, 0, sig as usize) {
                Ok(_) | Err(Errno::ESRCH) => {}
                Err(e) => {
                    first_err.get_or_insert(TracerError::errno(
                        format!("ptrace(PTRACE_DETACH, {tid})"),
                        e,
                    ));
                }
            }
        }
        // A parent blocked in vfork cannot be detached until its (now detached) child execs or exits and the
        // parent reports PTRACE_EVENT_VFORK_DONE; wait for that, bounded.
        let mut vfork: BTreeSet<Pid> = self
            .threads
            .iter()
            .filter(|(_, t)| t.vfork_wait && !matches!(t.state, State::Stopped(_)))
            .map(|(tid, _)| *tid)
            .collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !vfork.is_empty() && Instant::now() < deadline {
            match self.wait_any(Some(deadline)) {
                Ok(Some((tid, st))) if vfork.contains(&tid) => {
                    if libc::WIFSTOPPED(st) {
                        if let Err(e) = pt(libc::PTRACE_DETACH, tid, 0, 0) {
                            if e != Errno::ESRCH {
                                first_err.get_or_insert(TracerError::errno(
                                    format!("ptrace(PTRACE_DETACH, {tid})"),
                                    e,
                                ));
                            }
                        }
                    }
                    vfork.remove(&tid);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        self.threads.clear();
        self.procs.clear();
        self.queue.clear();
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn kill_all(&mut self) {
        self.finished = true;
        for tgid in self.procs.keys() {
            // SAFETY: plain kill syscall with integer arguments on a process we trace.
            unsafe { libc::kill(tgid.as_raw(), libc::SIGKILL) };
        }
        // Reap every task so nothing is left as a zombie of this thread (bounded: SIGKILL acts quickly).
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.threads.is_empty() && Instant::now() < deadline {
            match waitpid_raw(-1, WAIT_FLAGS | libc::WNOHANG) {
                Ok(Some((tid, st))) => {
                    if libc::WIFEXITED(st) || libc::WIFSIGNALED(st) {
                        let _ = self.handle_status(tid, st, true);
                    } else {
                        let _ = pt(libc::PTRACE_CONT, tid, 0, 0);
                    }
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(1)),
                Err(_) => break,
            }
        }
        self.threads.clear();
        self.procs.clear();
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        if self.spawned {
            self.kill_all();
        } else if self.detach_inner().is_err() {
            self.finished = true;
        }
    }
}
