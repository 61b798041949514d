//! Ending a trace: detaching (the processes run on as they were) or killing spawned processes.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::{pt, waitpid_raw, Event, ExitStatus, Pid, Resume, State, StopKind, Tracer, WAIT_FLAGS};
use crate::TracerError;

impl Tracer {
    /// Leave every process running, untraced, exactly as it was (pending signals delivered, job-control stops kept).
    /// Returns the exit statuses of traced processes that ended before they could be let go (reaped here, or
    /// queued and not yet taken with [`Tracer::next_event`]): nobody can wait for them any more.
    pub fn detach(mut self) -> Result<Vec<(Pid, ExitStatus)>, TracerError> {
        self.detach_inner()
    }

    fn detach_inner(&mut self) -> Result<Vec<(Pid, ExitStatus)>, TracerError> {
        self.check_thread()?;
        if self.finished {
            return Ok(Vec::new());
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
        let exited = self
            .queue
            .drain(..)
            .filter_map(|e| match e {
                Event::Exited { pid, status } => Some((pid, status)),
                _ => None,
            })
            .collect();
        self.threads.clear();
        self.procs.clear();
        match first_err {
            Some(e) => Err(e),
            None => Ok(exited),
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
                        let _ = self.continue_thread(tid, Resume::Cont { sig: 0 });
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
