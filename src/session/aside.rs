//! Stepping aside: when the session's own cost is not worth it (see `crate::overhead::decide`), it lets go of the
//! program — removing any variant first — and, in run mode, waits for it to exit without ptrace.

use std::os::fd::{AsFd as _, FromRawFd as _, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tracer::ExitStatus;

use super::{Outcome, Phase, Session};
use crate::overhead::{self, Decision, Standing, StepJson};
use crate::signals;

/// How often the untraced wait looks at dynspec's own interrupts.
const WAIT_POLL: Duration = Duration::from_millis(50);

impl Session {
    /// Close the overhead window if due and decide whether to step aside; true when the session should end by
    /// detaching (the decision is recorded for the report).
    pub(super) fn consider_stepping_aside(&mut self) -> bool {
        self.calibrate_stops();
        let now = Instant::now();
        self.overhead.roll(now, self.cfg.max_overhead);
        let live = self.rt.as_ref().map_or(0, |rt| rt.live_regions());
        // A code cache may still be created while a profile is under way (at the start, or after an exec).
        let cache_pending = self.rt.is_none()
            && matches!(
                self.phase,
                Phase::Sampling { .. } | Phase::Watching { .. } | Phase::Resample { .. }
            );
        let standing = Standing {
            profile_only: self.profile_only,
            live_variants: live,
            can_install: self.cfg.specialize && (self.rt.is_some() || cache_pending),
            planned: !self.plan_log.is_empty(),
            fruitless_rounds: self.fruitless_rounds,
            idle: matches!(self.phase, Phase::Idle { .. }),
            last_share: self.overhead.last_share(),
            last_recurrent_share: self.overhead.last_recurrent_share(),
            costly_windows: self.overhead.costly_windows(),
            budget: self.cfg.max_overhead,
        };
        let decision = overhead::decide(&standing);
        let time_ms = self.time.start.elapsed().as_millis() as u64;
        let Some(step) = StepJson::new(time_ms, decision, self.overhead.last_share()) else {
            return false;
        };
        if matches!(decision, Decision::RemoveAndDetach(_)) {
            // Removed here, where a failure only means staying (the detach path's failure would end the
            // session with an error, and a spawned program with it).
            let removed = self
                .stop_everything()
                .and_then(|()| self.uninstall_everything());
            if let Err(e) = removed {
                self.warn(format_args!(
                    "cannot remove the variants to step aside: {e:#}; staying"
                ));
                self.resume_all_quiet();
                return false;
            }
            self.say(format_args!("{}", step.why));
        }
        self.steps.push(step);
        self.stepped_aside = true;
        true
    }
}

/// The measurement of what one stop costs (`tracer::calibrate::signal_stop_cost`).
pub(super) enum StopCost {
    NotStarted,
    Running(std::thread::JoinHandle<Option<std::time::Duration>>),
    Done,
}

impl Session {
    /// Start measuring the cost of a stop once the program has paid for [`overhead::FAST_MIN_STOPS`] of them (a
    /// program that is rarely stopped never pays for the measurement, ~30 ms of a second CPU), and use the
    /// result once it is in.
    fn calibrate_stops(&mut self) {
        match &self.stop_cost {
            StopCost::NotStarted
                if self.overhead.stops() >= u64::from(overhead::FAST_MIN_STOPS) =>
            {
                // In a thread of its own: its child is traced by that thread, never seen by the tracer
                // thread's waits (`__WNOTHREAD`).
                self.stop_cost = std::thread::Builder::new()
                    .name("dynspec-stopcost".into())
                    .spawn(tracer::calibrate::signal_stop_cost)
                    .map_or(StopCost::Done, StopCost::Running);
            }
            StopCost::Running(h) if h.is_finished() => {
                if let StopCost::Running(h) = std::mem::replace(&mut self.stop_cost, StopCost::Done)
                {
                    if let Ok(Some(cost)) = h.join() {
                        self.overhead.set_stop_cost(cost);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Run mode after detaching: the program is still dynspec's child, so it is reaped like any child (a pidfd
/// tells when it exits; no ptrace). SIGINT/SIGTERM sent to dynspec alone are passed on, as a wrapper would, and
/// a second one kills the program. `handled` is the count of interrupts the session already handled.
pub(super) fn wait_untraced(root: Pid, mut handled: u32, quiet: bool) -> Result<Outcome> {
    // SAFETY: pidfd_open takes a PID and flags and returns a new file descriptor or -1; we own what it returns.
    let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, root.as_raw(), 0) };
    let pidfd = (raw >= 0).then(|| {
        // SAFETY: `raw` is a fresh descriptor returned by pidfd_open, owned by nothing else.
        unsafe { OwnedFd::from_raw_fd(raw as i32) }
    });
    loop {
        let irq = signals::interrupts();
        if irq.count != handled {
            handled = irq.count;
            if irq.count >= 2 {
                if !quiet {
                    eprintln!("dynspec: interrupted again; killing the target");
                }
                let _ = nix::sys::signal::kill(root, nix::sys::signal::Signal::SIGKILL);
                let _ = waitpid(root, Some(WaitPidFlag::__WALL));
                return Ok(Outcome::Interrupted(128 + irq.last_signal));
            }
            if irq.last_from_user || irq.last_signal == libc::SIGTERM {
                let _ = nix::sys::signal::kill(
                    root,
                    nix::sys::signal::Signal::try_from(irq.last_signal).ok(),
                );
            }
        }
        match waitpid(root, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL))
            .with_context(|| format!("cannot wait for PID {root} after detaching"))?
        {
            WaitStatus::Exited(_, code) => return Ok(Outcome::Exited(ExitStatus::Code(code))),
            WaitStatus::Signaled(_, sig, core_dumped) => {
                return Ok(Outcome::Exited(ExitStatus::Signaled {
                    signal: sig as i32,
                    core_dumped,
                }))
            }
            _ => {}
        }
        match pidfd.as_ref() {
            Some(fd) => {
                let mut fds = [nix::poll::PollFd::new(
                    fd.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                // EINTR (our own SIGINT handler) just loops.
                let _ = nix::poll::poll(
                    &mut fds,
                    nix::poll::PollTimeout::from(WAIT_POLL.as_millis() as u16),
                );
            }
            None => std::thread::sleep(WAIT_POLL),
        }
    }
}
