//! Waiting: wait statuses decoded into events and thread states, stopping everything, and the timer that ends
//! a timed wait.

use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::{
    is_stop_signal, pt, task_state, tgid_of, waitpid_raw, Event, ExitStatus, Pid, State, StopKind,
    Tracer, PTRACE_EVENT_STOP, WAIT_FLAGS,
};
use crate::TracerError;

/// The signal a [`WaitTimer`] sends to interrupt a blocking `waitpid` (a no-op handler is installed for it).
fn wake_signal() -> i32 {
    libc::SIGRTMAX() - 1
}

extern "C" fn wake_handler(_: libc::c_int) {}

/// A one-shot POSIX timer aimed at the tracer thread: it interrupts a blocking `waitpid` (EINTR) at a deadline, so
/// `next_event` with a timeout blocks in the kernel instead of polling.
pub(super) struct WaitTimer {
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

impl Tracer {
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

    pub(super) fn drop_thread_silently(&mut self, tid: Pid) {
        if let Some(th) = self.threads.remove(&tid) {
            if let Some(p) = self.procs.get_mut(&th.tgid) {
                p.threads.remove(&tid);
            }
        }
    }

    /// Wait for any wait status of our tasks until `deadline` (None = block). Ok(None) on timeout.
    pub(super) fn wait_any(
        &mut self,
        deadline: Option<Instant>,
    ) -> Result<Option<(Pid, i32)>, Errno> {
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
    pub(super) fn handle_status(
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

    pub(super) fn queue_exit(&mut self, tid: Pid, status: i32) {
        if let Ok(Some(ev)) = self.handle_status(tid, status, true) {
            self.queue.push_back(ev);
        }
    }
}
