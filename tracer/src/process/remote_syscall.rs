//! System calls executed inside the target on a stopped thread, through a `syscall` instruction of its own.

use super::{
    pt, stop_kind_of, waitpid_raw, Pid, Resume, State, StopKind, Tracer, PTRACE_EVENT_STOP,
    WAIT_FLAGS,
};
use crate::{Addr, TracerError};

/// How a single-step loop ([`Tracer::step_until`]) goes on after one stop of the stepped thread.
enum StepStop<T> {
    /// Stop stepping with this result.
    Done(Result<T, TracerError>),
    /// Hold this signal back (re-raised after the step) and step again.
    Defer(i32),
    /// Step again.
    Again,
}

impl Tracer {
    /// Use `addr` (a `syscall` instruction in executable memory of `pid`, e.g. in a code-cache arena) for later
    /// injected system calls.
    pub fn set_syscall_gadget(&mut self, pid: Pid, addr: Addr) {
        if let Some(tgid) = self.tgid(pid) {
            if let Some(p) = self.procs.get_mut(&tgid) {
                p.gadget = Some(addr);
            }
        }
    }

    /// Stop using the gadget set with [`Tracer::set_syscall_gadget`] (its memory is about to be unmapped): the
    /// next injected system call finds one in the process' own code.
    pub fn clear_syscall_gadget(&mut self, pid: Pid) {
        if let Some(tgid) = self.tgid(pid) {
            if let Some(p) = self.procs.get_mut(&tgid) {
                p.gadget = None;
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

    /// Single-step `tid` until `on_stop` says it is done. `on_stop` sees each stop (the thread already marked
    /// stopped) as (status, signal, event); the signals it defers are returned, in order, for the caller to
    /// re-raise once the step is over. An exit of the thread ends the loop with `ProcessGone` (the normal event
    /// path reports the exit).
    fn step_until<T>(
        &mut self,
        tid: Pid,
        mut on_stop: impl FnMut(&mut Self, i32, i32, i32) -> StepStop<T>,
    ) -> (Result<T, TracerError>, Vec<i32>) {
        let mut deferred = Vec::new();
        if let Err(e) = self.continue_thread(tid, Resume::Step) {
            return (Err(e), deferred);
        }
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
            self.mark_stopped(tid, stop_kind_of(event));
            match on_stop(self, st, sig, event) {
                StepStop::Done(r) => break r,
                StepStop::Defer(s) => deferred.push(s),
                StepStop::Again => {}
            }
            // Event stops (e.g. a pending interrupt) and deferred signals: keep stepping.
            if let Err(e) = self.continue_thread(tid, Resume::Step) {
                break Err(e);
            }
        };
        (out, deferred)
    }

    /// Whatever is at the gadget address of `tid`'s process now is not a working `syscall`: never use it again.
    fn forget_gadget(&mut self, tid: Pid) {
        if let Some(p) = self.tgid(tid).and_then(|t| self.procs.get_mut(&t)) {
            p.gadget = None;
        }
    }

    fn step_syscall(&mut self, tid: Pid, gadget: Addr) -> Result<i64, TracerError> {
        let mut stray = 0;
        let (out, deferred) = self.step_until(tid, |tr, st, sig, event| {
            if event == 0 && sig == libc::SIGTRAP {
                let r = match tr.regs(tid) {
                    Ok(r) => r,
                    Err(e) => return StepStop::Done(Err(e)),
                };
                if r.rip == gadget.0 + 2 {
                    return StepStop::Done(Ok(r.rax as i64));
                }
                // Stopped inside a syscall (exec/clone event stops): the kernel reports the single-step once at
                // that syscall's exit, before our instruction ran. Step again.
                if r.rip != gadget.0 || stray >= 3 {
                    if r.rip != gadget.0 {
                        tr.forget_gadget(tid);
                    }
                    return StepStop::Done(Err(TracerError::UnexpectedStop { tid, status: st }));
                }
                stray += 1;
                StepStop::Again
            } else if event == 0 && sig != (libc::SIGTRAP | 0x80) {
                let at_gadget = tr.regs(tid).map(|r| r.rip == gadget.0).unwrap_or(false);
                if at_gadget && matches!(sig, libc::SIGSEGV | libc::SIGBUS | libc::SIGILL) {
                    // The gadget itself faults (its memory changed): forget it and fail instead of looping.
                    tr.forget_gadget(tid);
                    return StepStop::Done(Err(TracerError::UnexpectedStop { tid, status: st }));
                }
                // Another signal arrived first: hold it back and re-raise it afterwards.
                StepStop::Defer(sig)
            } else {
                StepStop::Again
            }
        });
        if let Some(tgid) = self.tgid(tid) {
            let mut raised = Vec::new();
            for s in deferred {
                // Each signal once: a standard signal arriving twice while held back is one pending signal.
                if raised.contains(&s) {
                    continue;
                }
                raised.push(s);
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
        let (out, deferred) = self.step_until(tid, |_, _, sig, event| {
            if event == 0 && sig == libc::SIGTRAP {
                StepStop::Done(Ok(()))
            } else if event == 0 && sig != (libc::SIGTRAP | 0x80) {
                StepStop::Defer(sig)
            } else {
                StepStop::Again
            }
        });
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

    fn rejoin_group_stop(&mut self, tid: Pid) -> Result<(), TracerError> {
        pt(libc::PTRACE_INTERRUPT, tid, 0, 0)
            .map_err(|e| self.map_ptrace_err(tid, "PTRACE_INTERRUPT", e))?;
        self.continue_thread(tid, Resume::Cont { sig: 0 })?;
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
}
