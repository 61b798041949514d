//! The specializing half of the session: the code cache's lifetime, planning rounds, guard faults and
//! invalidations, and what must happen to variants when threads, signals, forks and execs come.

use std::time::Instant;

use anyhow::Result;
use nix::unistd::Pid;

use super::{
    Phase, Session, COUNTER_REFRESH, IDLE_MAX, IDLE_MIN, ID_STRIDE, MAX_FRUITLESS_PLANS,
    MAX_RESTARTS, MAX_WATCHED_PAGES, MIN_PLAN_SAMPLES,
};
use crate::install::Installer;
use crate::plan::{self, RegionNote};
use crate::profile::Profiler;
use crate::report::plan::PlanRegionJson;
use crate::report::PlanRoundJson;
use crate::store_profile::TrustInputs;

impl Session {
    /// Stop every thread (through the code cache while one exists: it must see faults during the stop) and
    /// leave them stopped: the caller goes on across several steps and resumes them itself. Operations on the
    /// code cache take their own [`tracer::Stopped`] proof.
    pub(super) fn stop_everything(&mut self) -> Result<()> {
        match self.rt.as_ref() {
            Some(rt) => rt.cache.stop_all(&mut self.tracer)?.keep_stopped(),
            None => self.tracer.stop_all()?,
        }
        Ok(())
    }

    /// Create the code cache for the process the profile points at (threads stopped).
    pub(super) fn start_runtime(&mut self) {
        let alive = |p: Pid| !self.tracer.threads(p).is_empty();
        let pid = match self.store.pid().filter(|p| alive(*p)) {
            Some(p) => p,
            None => self
                .profiler
                .candidate_pages(1)
                .map(|x| x.0)
                .filter(|p| alive(*p))
                .unwrap_or(self.root),
        };
        if !alive(pid) {
            return;
        }
        let base = (self.generations + 1) * ID_STRIDE;
        match Installer::new(&mut self.tracer, pid, base) {
            Ok(mut rt) => {
                rt.set_metric(self.cfg.metric.clone());
                // Attach mode: every change is journaled to the guardian before it reaches the target.
                if self.attach_mode {
                    let watched = match &self.guardian {
                        Some(g) => g.watch(&mut rt.cache),
                        None => Err(anyhow::anyhow!("no guardian")),
                    };
                    if let Err(e) = watched {
                        self.say(format_args!("{e:#}; not specializing"));
                        self.cfg.specialize = false;
                        return;
                    }
                }
                self.generations += 1;
                self.rt = Some(rt);
            }
            Err(e) => self.say(format_args!(
                "cannot set up the code cache, not specializing: {e}"
            )),
        }
    }

    /// Plan, specialize and install for the hot regions that have no live variant (bounded per region); then,
    /// unless another window is due at once, stop sampling until the next periodic look ([`Phase::Idle`]).
    pub(super) fn replan(&mut self) {
        if !self.cfg.specialize {
            return;
        }
        self.plan_round();
        if matches!(self.phase, Phase::Done) {
            self.pause_sampling();
            self.phase = Phase::Idle {
                until: Instant::now() + self.idle_backoff,
            };
            self.idle_backoff = (self.idle_backoff * 2).min(IDLE_MAX);
        }
    }

    pub(super) fn plan_round(&mut self) {
        self.ingest();
        let Some(rt) = self.rt.as_mut() else { return };
        let recent = &self.recent;
        let (regions, mut notes) = plan::regions_to_plan(recent.region_profiles(), |a| {
            recent.stable_registers(a.0, plan::MIN_ASSUMED_SAMPLES)
        });
        if !rt.wants_any(&regions) {
            notes.extend(regions.iter().filter_map(|r| rt.skipped_note(r)));
            record_round(
                &mut self.plan_log,
                self.time.start,
                recent.total(),
                0,
                notes,
            );
            self.count_round(0);
            return;
        }
        // Pages hot loads read now, for hot code the planner has not specialized before (see PageTrust).
        let new_code = regions.iter().filter(|r| rt.wants(r)).all(|r| rt.is_new(r));
        let new_hot_pages = match self.recent.candidate_pages(MAX_WATCHED_PAGES) {
            Some((pid, pages)) if new_code && pid == rt.pid => pages,
            _ => Vec::new(),
        };
        let pid = rt.pid;
        let (profiler, recent) = (&self.profiler, &self.recent);
        let constant = self.trust.trusted(&TrustInputs {
            // The store profile is about the watched process only.
            store: (self.store.pid() == Some(pid))
                .then(|| (self.store.watched(), self.store.written())),
            ever_watched: self.store.watched(),
            total_samples: profiler.total(),
            store_samples: &|p| profiler.store_samples(pid, p.0),
            recent_store_samples: &|p| recent.store_samples(pid, p.0),
            new_hot_pages: &new_hot_pages,
        });
        let mut out = rt.plan_and_install(&mut self.tracer, &regions, &constant);
        self.plans += 1;
        notes.append(&mut out.notes);
        for n in &mut notes {
            let pages = self.recent.region_pages(pid, n.start, n.end);
            plan::explain_untrusted(n, &pages, &constant, self.store.written());
        }
        record_round(
            &mut self.plan_log,
            self.time.start,
            self.recent.total(),
            out.installed as u64,
            notes,
        );
        let worth_retrying = !out.problems.is_empty() || self.recent.total() < MIN_PLAN_SAMPLES;
        if out.installed == 0
            && worth_retrying
            && self.plans < MAX_FRUITLESS_PLANS
            && matches!(self.phase, Phase::Done)
        {
            // More samples may show better triggers (or the install met a thread inside the patch site).
            let now = Instant::now();
            self.phase = Phase::Resample {
                until: now + self.cfg.window,
                since: now,
                settle: false,
            };
        }
        if let (Some(t), None) = (rt.first_install, self.time.first_install) {
            self.time.first_install = Some(t);
        }
        self.count_round(out.installed);
        if let Some(p) = out.problems.first() {
            self.say(p);
        }
        if out.installed > 0 {
            self.idle_backoff = IDLE_MIN;
        }
    }

    /// Count a planning round towards [`crate::overhead::FRUITLESS_ROUNDS`]: only final rounds (no retry
    /// scheduled, so the next is a periodic look) that installed nothing; an install starts the count over.
    fn count_round(&mut self, installed: usize) {
        if installed > 0 {
            self.fruitless_rounds = 0;
        } else if matches!(self.phase, Phase::Done) {
            self.fruitless_rounds += 1;
        }
    }

    /// Stop sampling (specializing mode, nothing left to plan).
    pub(super) fn pause_sampling(&mut self) {
        if self.sampling.is_paused() {
            return;
        }
        self.ingest();
        self.sampling.pause();
    }

    /// Sample every thread again (a re-profile is due).
    pub(super) fn resume_sampling(&mut self) {
        if !self.sampling.is_paused() {
            return;
        }
        self.sampling.unpause();
        let tids = self.tracer.all_threads();
        self.add_threads(&tids);
    }

    /// Handle pending uffd guard faults and keep the entry counters fresh.
    pub(super) fn poll_guards(&mut self) {
        let Some(rt) = self.rt.as_mut() else { return };
        rt.refresh_counters(&self.tracer, COUNTER_REFRESH);
        if !rt.cache.has_guard_faults() {
            return;
        }
        rt.read_counters(&self.tracer);
        let held = Instant::now();
        let handled = match rt.cache.stop_all(&mut self.tracer) {
            Ok(mut world) => {
                let r = rt.cache.handle_guard_faults(&mut world);
                if r.is_err() {
                    // The give-up path below removes every variant before anything runs again.
                    world.keep_stopped();
                }
                r
            }
            Err(e) => Err(e),
        };
        match handled {
            Ok(invs) => {
                rt.record_invalidations(&invs, self.time.start);
                for i in &invs {
                    self.trust.invalidated(i.page);
                }
                self.overhead
                    .stop(crate::overhead::StopKind::GuardFault, held.elapsed());
                self.after_invalidation();
            }
            Err(e) => {
                self.say(format_args!(
                    "cannot handle a write to a guarded page: {e}; removing every variant"
                ));
                self.give_up_specializing();
            }
        }
        self.resume_all_quiet();
    }

    /// A SIGSEGV of the specialized process: true when it was a write to a page guarded with mprotect (handled).
    pub(super) fn guard_segv(&mut self, tid: Pid, siginfo: &libc::siginfo_t) -> bool {
        let Some(rt) = self.rt.as_mut() else {
            return false;
        };
        if self.tracer.tgid(tid) != Some(rt.pid) {
            return false;
        }
        // Entry counts of variants an invalidation may kill, at most COUNTER_REFRESH old: a program that takes
        // SIGSEGVs of its own by the thousand must not pay a read of every counter for each.
        rt.refresh_counters(&self.tracer, COUNTER_REFRESH);
        match rt.cache.handle_segv(&mut self.tracer, tid, siginfo) {
            Ok(Some(inv)) => {
                self.trust.invalidated(inv.page);
                rt.record_invalidations(&[inv], self.time.start);
                self.after_invalidation();
                true
            }
            Ok(None) => {
                // A write that faulted on a guard another thread's fault lifted meanwhile: it runs again.
                if rt.cache.is_stale_segv(&self.tracer, tid, siginfo) {
                    self.tracer.suppress_signal(tid);
                    return true;
                }
                false
            }
            Err(e) => {
                self.say(format_args!(
                    "cannot classify a SIGSEGV of thread {tid}: {e}"
                ));
                false
            }
        }
    }

    /// Whether `tid`'s process runs variants that forward stored values.
    pub(super) fn forwarding_in(&self, tid: Pid) -> bool {
        let pid = self.tracer.tgid(tid).unwrap_or(tid);
        self.rt
            .as_ref()
            .is_some_and(|rt| rt.pid == pid && rt.forwards())
    }

    /// A second writer of the specialized process's memory appeared: remove the variants that forward stored
    /// values (every thread stopped; the caller resumes them) and plan again without forwarding.
    pub(super) fn stop_forwarding(&mut self) {
        let Some(rt) = self.rt.as_mut() else { return };
        let dropped = match rt.cache.stop_all(&mut self.tracer) {
            Ok(mut world) => {
                rt.read_counters(&world);
                let r = rt
                    .drop_forwarding(&mut world)
                    .map_err(|e| format!("cannot remove variants for a new thread: {e}"));
                // The new thread (or process) runs only after this: the caller resumes every thread.
                world.keep_stopped();
                r
            }
            Err(e) => Err(format!("cannot stop the target: {e}")),
        };
        match dropped {
            Ok(_) => self.after_invalidation(),
            Err(msg) => {
                self.say(format_args!("{msg}; removing every variant"));
                self.give_up_specializing();
            }
        }
    }

    /// A signal is about to be delivered to `tid` (stopped): its handler may write memory a variant holds in a
    /// register, so the thread leaves such a variant first (it re-enters at the next trigger). False when that
    /// failed and every variant was removed instead (every thread is then stopped).
    pub(super) fn before_handler(&mut self, tid: Pid) -> bool {
        let Some(rt) = self.rt.as_ref() else {
            return true;
        };
        match rt.evacuate(&mut self.tracer, tid) {
            Ok(_) => true,
            Err(e) => {
                self.say(format_args!(
                    "cannot move thread {tid} out of a variant before its signal handler: {e}; removing every variant"
                ));
                self.give_up_specializing();
                false
            }
        }
    }

    /// Sample a fresh window before specializing the invalidated regions again.
    pub(super) fn after_invalidation(&mut self) {
        // The program changed: its new behaviour gets fresh planning rounds before dynspec gives up on it.
        self.fruitless_rounds = 0;
        self.recent = Profiler::new();
        self.resume_sampling();
        self.idle_backoff = IDLE_MIN;
        if matches!(self.phase, Phase::Done | Phase::Idle { .. }) {
            let now = Instant::now();
            self.phase = Phase::Resample {
                until: now + self.cfg.window,
                since: now,
                settle: true,
            };
        }
    }

    /// Something went wrong while variants were live: remove them all (threads stopped by the caller or here)
    /// and specialize no more.
    pub(super) fn give_up_specializing(&mut self) {
        if let Err(e) = self.stop_everything() {
            self.say(format_args!("cannot stop the target: {e}"));
        }
        if let Err(e) = self.uninstall_everything() {
            self.say(format_args!("cannot remove the variants: {e}"));
        }
        self.retire_runtime(false);
        self.cfg.specialize = false;
    }

    /// Restore every patch and release every guard. The threads are left stopped: detaching or retiring the
    /// code cache follows, and the caller resumes them.
    pub(super) fn uninstall_everything(&mut self) -> Result<()> {
        let Some(rt) = self.rt.as_ref() else {
            return Ok(());
        };
        if self.tracer.threads(rt.pid).is_empty() {
            // The specialized process is gone (e.g. a child that exited): nothing of it is left to restore.
            self.retire_runtime(false);
            return Ok(());
        }
        let Some(rt) = self.rt.as_mut() else {
            return Ok(());
        };
        let pid = rt.pid;
        let r = rt.cache.stop_all(&mut self.tracer).and_then(|mut world| {
            rt.read_counters(&world);
            // A thread that is not stopped (a thread waiting in vfork counts as stopped) is a typed error,
            // before anything changes.
            let r = rt.cache.uninstall_all(&mut world);
            world.keep_stopped();
            r
        });
        let released = match r {
            Ok(released) => released,
            Err(_) if exited(pid) => {
                // It exited meanwhile (its exit event is still queued): nothing of it is left to restore.
                self.retire_runtime(false);
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        for (arena, why) in released.kept {
            // Left mapped on purpose: unmapping it could crash a thread that still returns into it.
            self.say(format_args!(
                "the code arena at {arena} stays mapped in the target: {why}"
            ));
        }
        Ok(())
    }

    /// A fork child of the specialized process: restore the original code in it before it runs.
    pub(super) fn strip_child(&mut self, child: Pid) {
        let Some(rt) = self.rt.as_ref() else { return };
        if let Err(e) = rt.cache.strip_child(&mut self.tracer, child) {
            // The child would run variants nobody guards: end it rather than let it compute wrong results.
            self.say(format_args!(
                "cannot remove the variants from child {child}: {e}; killing it"
            ));
            let _ = nix::sys::signal::kill(child, nix::sys::signal::Signal::SIGKILL);
        }
    }

    /// `pid` exec'd: its address space is new. Drop its code cache and profile it from the start.
    pub(super) fn on_exec(&mut self, pid: Pid) {
        let ours = self.rt.as_ref().is_some_and(|r| r.pid == pid);
        if ours {
            self.retire_runtime(true);
        }
        let restart = self.cfg.specialize
            && self.rt.is_none()
            && matches!(
                self.phase,
                Phase::Done | Phase::Resample { .. } | Phase::Idle { .. }
            )
            && self.restarts < MAX_RESTARTS;
        if restart {
            self.restarts += 1;
            self.plans = 0;
            self.resume_sampling();
            self.sampling_extensions = 0;
            self.phase = Phase::Sampling {
                until: Instant::now() + self.cfg.window,
            };
        }
    }

    /// Keep the records of the code cache and drop it (its process exec'd, exited, or we gave up).
    pub(super) fn retire_runtime(&mut self, exec: bool) {
        let Some(mut rt) = self.rt.take() else { return };
        self.measuring.forget_installs();
        let mut vs = rt.variants_json(self.time.start);
        if exec {
            for v in &mut vs {
                v.invalidated = true;
            }
        }
        self.retired.variants.extend(vs);
        self.retired.invalidations.extend(rt.invalidations_json());
        self.retired.specialize_time += rt.specialize_time;
        self.retired.install_time += rt.install_time;
        if let (Some(t), None) = (rt.first_install, self.time.first_install) {
            self.time.first_install = Some(t);
        }
        rt.cache.forget();
    }

    pub(super) fn resume_all_quiet(&mut self) {
        if let Err(e) = self.tracer.resume_all() {
            if !self.cfg.quiet {
                eprintln!("dynspec: warning: cannot resume the target: {e}");
            }
        }
    }
}

/// Planning rounds the report keeps: the first, and the latest ones (a long run looks again every 8 s).
const MAX_PLAN_ROUNDS: usize = 64;

/// Append a planning round to the report's `plan`, regions hottest first.
fn record_round(
    log: &mut Vec<PlanRoundJson>,
    start: Instant,
    samples: u64,
    installed: u64,
    mut notes: Vec<RegionNote>,
) {
    notes.sort_by(|a, b| b.share.total_cmp(&a.share).then(a.start.cmp(&b.start)));
    if log.len() >= MAX_PLAN_ROUNDS {
        log.remove(1);
    }
    log.push(PlanRoundJson {
        time_ms: start.elapsed().as_millis() as u64,
        samples,
        installed,
        regions: notes.iter().map(PlanRegionJson::from_note).collect(),
    });
}

/// Whether process `pid` has exited (gone, or a zombie waiting to be reaped).
fn exited(pid: Pid) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        // The state follows the last ')' (the command name may contain anything).
        stat.rfind(')')
            .and_then(|i| stat[i + 1..].trim_start().chars().next())
            .is_none_or(|c| matches!(c, 'Z' | 'X'))
    })
}
