//! The session's answer to each tracer event: signals (guard faults, watch faults, the program's own), new
//! threads, forks, execs and exits.

use anyhow::Result;
use nix::unistd::Pid;
use tracer::Event;

use super::{Outcome, Session};
use crate::install;
use crate::overhead::StopKind;

impl Session {
    /// Answer one tracer event, and count the stop it cost the program (`crate::overhead`).
    pub(super) fn handle_event(&mut self, ev: Event) -> Result<Option<Outcome>> {
        let kind = match ev {
            Event::Signal { .. } => Some(StopKind::Signal),
            Event::NewThread { .. } | Event::Forked { .. } | Event::Exec { .. } => {
                Some(StopKind::Event)
            }
            Event::ThreadExited { .. } | Event::Exited { .. } => None,
        };
        let held = std::time::Instant::now();
        self.guard_stop = false;
        let r = self.dispatch_event(ev);
        if let Some(k) = kind {
            let k = if self.guard_stop {
                StopKind::GuardFault
            } else {
                k
            };
            self.overhead.stop(k, held.elapsed());
        }
        r
    }

    fn dispatch_event(&mut self, ev: Event) -> Result<Option<Outcome>> {
        match ev {
            Event::Signal {
                tid,
                signal,
                siginfo,
            } => {
                if signal == libc::SIGSEGV && self.guard_segv(tid, &siginfo) {
                    // Ours: every thread is stopped, the page invalidated, the signal suppressed.
                    self.guard_stop = true;
                    self.resume_all_quiet();
                    return Ok(None);
                }
                let claimed = signal == libc::SIGSEGV
                    && match self.store.claims_segv(&mut self.tracer, tid, &siginfo) {
                        Ok(c) => c,
                        Err(e) => {
                            // Deliver it: the program's own handler (or default action) is the safe choice.
                            self.warn(format_args!(
                                "cannot classify a SIGSEGV of thread {tid}: {e}"
                            ));
                            false
                        }
                    };
                self.guard_stop = claimed;
                let deliver = if claimed { None } else { Some(signal) };
                if deliver.is_some() && !self.before_handler(tid) {
                    // Gave up specializing: every thread was stopped; resume them all (the signal is still
                    // recorded as pending for `tid` and delivered).
                    self.resume_all_quiet();
                    return Ok(None);
                }
                self.resume_quiet(tid, deliver);
            }
            Event::NewThread { tid, parent } => {
                self.add_threads(&[tid]);
                if self.forwarding_in(parent) {
                    // Both threads are stopped at the event: the new one runs only after the variants that
                    // assume a single writer are gone.
                    self.stop_forwarding();
                    self.resume_all_quiet();
                    return Ok(None);
                }
                self.resume_quiet(tid, None);
                self.resume_quiet(parent, None);
            }
            Event::Forked { parent, child } => {
                let tids = self.tracer.threads(child);
                self.add_threads(&tids);
                self.code.preload(child);
                let parent_pid = self.tracer.tgid(parent).unwrap_or(parent);
                // Only a fork of the watched process inherits its protections; another process' child has a
                // different address space and must not be touched.
                // A vfork child shares the parent's memory: "restoring" its pages would end the parent's watch.
                let watched_parent = !self.tracer.in_vfork(parent);
                let spec_parent = self.rt.as_ref().is_some_and(|r| r.pid == parent_pid)
                    && !self.tracer.in_vfork(parent);
                if spec_parent {
                    self.strip_child(child);
                }
                // A clone that shares the address space without being a thread (CLONE_VM, not vfork, which
                // blocks the parent) is another writer of the memory, like a thread.
                let shared_vm =
                    !self.tracer.in_vfork(parent) && install::shares_vm(parent_pid, child);
                if shared_vm && self.forwarding_in(parent) {
                    self.stop_forwarding();
                    self.resume_all_quiet();
                    return Ok(None);
                }
                if watched_parent {
                    // A child must not inherit pages we write-protected: restore them before it runs.
                    if let Err(e) = self.store.on_fork(&mut self.tracer, parent_pid, child) {
                        self.warn(format_args!(
                            "cannot restore watched pages in child {child}: {e}"
                        ));
                    }
                }
                for t in tids {
                    self.resume_quiet(t, None);
                }
                self.resume_quiet(parent, None);
            }
            Event::Exec { pid } => {
                self.store.on_exec(pid);
                self.on_exec(pid);
                // Samples of the old image first, while its symbols are cached.
                self.ingest();
                self.code.forget(pid);
                self.code.preload(pid);
                self.profiler.forget_process(pid);
                self.recent.forget_process(pid);
                let tids = self.tracer.threads(pid);
                self.add_threads(&tids);
                self.resume_quiet(pid, None);
            }
            Event::ThreadExited { tid } => {
                self.sampling.thread_exited(tid);
            }
            Event::Exited { pid, status } => {
                if pid == self.root {
                    return Ok(Some(Outcome::Exited(status)));
                }
                self.sampling.process_exited(pid);
                // Analyse its last samples while its symbols and mappings are still cached, then forget it.
                self.ingest();
                if self.store.pid() == Some(pid) {
                    self.end_watch_after_exit();
                }
                if self.rt.as_ref().is_some_and(|r| r.pid == pid) {
                    self.retire_runtime(false);
                }
                self.code.forget(pid);
                self.profiler.forget_process(pid);
                self.recent.forget_process(pid);
            }
        }
        Ok(None)
    }

    /// Resume a thread; a thread that vanished meanwhile is not an error (its exit event follows).
    fn resume_quiet(&mut self, tid: Pid, signal: Option<i32>) {
        if let Err(e) = self.tracer.resume(tid, signal) {
            if !matches!(
                e,
                tracer::TracerError::ProcessGone(_) | tracer::TracerError::UnknownThread(_)
            ) && !self.cfg.quiet
            {
                eprintln!("dynspec: warning: cannot resume thread {tid}: {e}");
            }
        }
    }
}
