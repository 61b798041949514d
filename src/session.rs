//! The session loop: trace the target, sample it, watch the pages hot loads read, specialize and install variants,
//! handle guard faults, and produce the report.
//!
//! The loop is a small state machine on a clock (`Phase`): sample, write-watch, then (unless `--profile-only`)
//! plan + specialize + install; after an invalidation, sample another window and plan again (bounded per region).

use std::collections::HashMap;
use std::ffi::OsString;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use nix::unistd::Pid;
use tracer::sampler::{Sampler, SamplerConfig, SamplerError};
use tracer::Addr;
use tracer::{Event, ExitStatus, Tracer};

use crate::codemap::{CodeMap, LiveEnv};
use crate::install::{self, Installer};
use crate::plan;
use crate::profile::Profiler;
use crate::report::{
    ExitStatusJson, InvalidationJson, Report, Timings, VariantJson, REPORT_VERSION,
};
use crate::signals;
use crate::store_profile::{PageTrust, StoreProfile, TrustInputs};

/// How long one `next_event` wait may block: bounds the latency of phase changes and signal handling.
const EVENT_POLL: Duration = Duration::from_millis(20);
/// The same while variants are guarded: a thread that writes a guarded page waits this long at most for us.
const GUARD_POLL: Duration = Duration::from_millis(3);
/// How often the variants' entry counters are read from the target.
const COUNTER_REFRESH: Duration = Duration::from_millis(50);
/// Profiling restarts after an exec (the new image is profiled and specialized again), at most this often.
const MAX_RESTARTS: u32 = 4;
/// Planning rounds that installed nothing before the session stops trying (until an exec starts over).
const MAX_FRUITLESS_PLANS: u32 = 2;
/// A planning round on fewer samples than this that installs nothing is retried after another window; with more,
/// a fruitless round is final (unless an install failed): re-planning costs the program sampling overhead.
const MIN_PLAN_SAMPLES: u64 = 400;
/// First and longest pause of sampling between planning rounds ([`Phase::Idle`]).
const IDLE_MIN: Duration = Duration::from_secs(1);
const IDLE_MAX: Duration = Duration::from_secs(8);
/// Variant ids of the n-th code cache of the session start at n times this (ids stay unique in the report).
const ID_STRIDE: u64 = 1_000_000;
/// Most pages the store profile watches.
const MAX_WATCHED_PAGES: usize = 256;
/// Sampling windows added while no hot load has been seen (then the store profile is skipped): at least this
/// many, and as many as fit in [`MAX_SAMPLING_EXTENSION_TIME`].
const MIN_SAMPLING_EXTENSIONS: u32 = 20;
const MAX_SAMPLING_EXTENSION_TIME: Duration = Duration::from_secs(6);

/// What to trace.
pub enum Target {
    /// Spawn this command line (argv[0] looked up in PATH like a shell; the program gets argv unchanged).
    Run(Vec<OsString>),
    /// Attach to a running process.
    Attach(Pid),
}

/// Session settings from the command line.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub rate_hz: u64,
    pub window: Duration,
    pub quiet: bool,
    pub report_path: PathBuf,
    /// Attach mode: detach after this long.
    pub attach_for: Option<Duration>,
    /// Specialize and install variants (not `--profile-only`).
    pub specialize: bool,
}

/// How the session ended.
#[derive(Debug)]
pub enum Outcome {
    /// The root process exited (run mode): pass its status on.
    Exited(ExitStatus),
    /// Attach mode: detached, the process keeps running.
    Detached,
    /// Run mode: the user insisted (second Ctrl-C) and the target was killed; exit with this code.
    Interrupted(i32),
}

/// Where the store profile is.
enum Phase {
    /// Sampling only, until the first window elapses.
    Sampling { until: Instant },
    /// Write-watching the candidate pages, until the second window elapses.
    Watching { until: Instant },
    /// After an invalidation: sample another window, then plan again.
    Resample { until: Instant },
    /// Profile complete, planning under way.
    Done,
    /// Sampling paused until `until`; then a fresh window and another planning round (hot code that starts
    /// late, or moves, is found; the pause doubles up to [`IDLE_MAX`] so the cost stays small).
    Idle { until: Instant },
}

/// What the report keeps of code caches whose process exec'd or exited (or that dynspec gave up on).
#[derive(Default)]
struct Retired {
    variants: Vec<VariantJson>,
    invalidations: Vec<InvalidationJson>,
    specialize_time: Duration,
    install_time: Duration,
}

/// The state of one session.
struct Session {
    cfg: SessionConfig,
    tracer: Tracer,
    sampler: Sampler,
    profiler: Profiler,
    /// Samples since the last invalidation (or since the start): what planning looks at, so a re-plan sees the
    /// program's current behaviour, not the one that just changed.
    recent: Profiler,
    code: CodeMap,
    root: Pid,
    phase: Phase,
    /// The write watch and what it saw.
    store: StoreProfile,
    /// Which pages planning trusts as constant.
    trust: PageTrust,
    start: Instant,
    profile_done: Option<Instant>,
    attach_mode: bool,
    warned_sampler: bool,
    progress: Option<Instant>,
    handled_interrupts: u32,
    /// Sampled threads per process, to release their rings when the process exits.
    threads_of: HashMap<Pid, std::collections::BTreeSet<Pid>>,
    /// How often the sampling phase was extended for lack of candidate pages.
    sampling_extensions: u32,
    /// The code cache of the specialized process (none with --profile-only or before the first plan).
    rt: Option<Installer>,
    /// Records of code caches whose process exec'd or exited.
    retired: Retired,
    /// Code caches created so far (for unique variant ids).
    generations: u64,
    /// Profiling restarts after exec.
    restarts: u32,
    /// When the first sample arrived.
    first_sample_at: Option<Instant>,
    /// When the first variant was installed.
    first_install_at: Option<Instant>,
    /// Planning rounds so far.
    plans: u32,
    /// The next [`Phase::Idle`] pause.
    idle_backoff: Duration,
    /// Specializing, with nothing left to plan: sampling is off (it costs the program a few percent) until an
    /// invalidation or exec calls for a fresh profile.
    sampling_paused: bool,
}

/// Run a whole session and write its report.
pub fn run(target: Target, cfg: &SessionConfig) -> Result<Outcome> {
    signals::install().context("cannot install dynspec's signal handlers")?;
    // Before touching the target, so a bad rate never leaves a half-started program behind.
    let sampler = Sampler::new(SamplerConfig::for_rate(cfg.rate_hz))
        .context("cannot set up perf_event sampling")?;
    let (tracer, command, attach_pid) = match &target {
        Target::Run(argv) => {
            let t = Tracer::spawn(argv)
                .with_context(|| format!("cannot start {}", argv[0].to_string_lossy()))?;
            let shown: Vec<String> = argv
                .iter()
                .map(|a| a.to_string_lossy().into_owned())
                .collect();
            (t, Some(shown), None)
        }
        Target::Attach(pid) => {
            let t = Tracer::attach(*pid).with_context(|| format!("cannot attach to PID {pid}"))?;
            (t, None, Some(pid.as_raw()))
        }
    };
    let root = tracer.root();
    let mut code = CodeMap::default();
    code.preload(root);
    let start = Instant::now();
    let mut s = Session {
        cfg: cfg.clone(),
        tracer,
        sampler,
        profiler: Profiler::new(),
        recent: Profiler::new(),
        code,
        root,
        phase: Phase::Sampling {
            until: start + cfg.window,
        },
        store: StoreProfile::default(),
        trust: PageTrust::default(),
        start,
        profile_done: None,
        attach_mode: attach_pid.is_some(),
        warned_sampler: false,
        // A live progress line needs a terminal; in run mode the program shares it, so only draw when its stdout
        // goes elsewhere (its output would otherwise land in the middle of our line).
        progress: if !cfg.quiet
            && std::io::stderr().is_terminal()
            && (attach_pid.is_some() || !std::io::stdout().is_terminal())
        {
            Some(start)
        } else {
            None
        },
        handled_interrupts: 0,
        threads_of: HashMap::new(),
        sampling_extensions: 0,
        rt: None,
        retired: Retired::default(),
        generations: 0,
        restarts: 0,
        first_sample_at: None,
        first_install_at: None,
        plans: 0,
        idle_backoff: IDLE_MIN,
        sampling_paused: false,
    };
    for tid in s.tracer.all_threads() {
        match s.sampler.add_thread(tid) {
            Ok(()) => {
                s.threads_of.entry(root).or_default().insert(tid);
            }
            Err(SamplerError::ThreadGone { .. }) => {}
            // At the start a refusal is fatal and explained (perf_event_paranoid, CAP_PERFMON, mlock limits).
            Err(e) => return Err(e).with_context(|| format!("cannot sample PID {root}")),
        }
    }
    s.tracer.resume_all().context("cannot resume the target")?;
    let end = s.event_loop()?;
    s.ingest();
    let exit_status = match &end {
        Outcome::Exited(ExitStatus::Code(c)) => Some(ExitStatusJson::Code(*c)),
        Outcome::Exited(ExitStatus::Signaled { signal, .. }) => {
            Some(ExitStatusJson::Signal(*signal))
        }
        Outcome::Detached | Outcome::Interrupted(_) => None,
    };
    let outcome = match end {
        Outcome::Exited(st) if !s.tracer.processes().is_empty() => {
            // Descendants outlive the program (a daemon, a background job): natively they keep running, so they
            // do here too, untraced and with everything dynspec changed in them undone.
            let outcome = if s.attach_mode {
                Outcome::Detached
            } else {
                Outcome::Exited(st)
            };
            if let Err(e) = s.stop_everything() {
                s.say(format_args!("cannot stop the remaining processes: {e}"));
            }
            let alive = |s: &Session, pid: Pid| !s.tracer.threads(pid).is_empty();
            if s.rt.as_ref().is_some_and(|rt| alive(&s, rt.pid)) {
                if let Err(e) = s.uninstall_everything() {
                    s.say(format_args!("cannot remove the installed variants: {e}"));
                }
            }
            s.retire_runtime(false);
            if s.store.pid().is_some_and(|p| alive(&s, p)) {
                s.end_watch();
            } else {
                s.end_watch_after_exit();
            }
            let report = s.build_report(command, attach_pid, exit_status);
            let Session { tracer, cfg, .. } = s;
            tracer
                .detach()
                .context("cannot detach from the remaining processes")?;
            report.write(&cfg.report_path)?;
            return Ok(outcome);
        }
        Outcome::Exited(st) => {
            // The watch's process is gone: just collect what it saw.
            s.end_watch_after_exit();
            s.retire_runtime(false);
            if s.attach_mode {
                Outcome::Detached
            } else {
                Outcome::Exited(st)
            }
        }
        Outcome::Detached => {
            match s.rt.as_ref() {
                Some(rt) => rt
                    .cache
                    .stop_all(&mut s.tracer)
                    .map_err(anyhow::Error::from),
                None => s.tracer.stop_all().map_err(anyhow::Error::from),
            }
            .context("cannot stop the target to detach")?;
            s.uninstall_everything()
                .context("cannot remove the installed variants before detaching")?;
            s.end_watch();
            let report = s.build_report(command, attach_pid, exit_status);
            let Session { tracer, cfg, .. } = s;
            tracer.detach().context("cannot detach from the target")?;
            report.write(&cfg.report_path)?;
            return Ok(Outcome::Detached);
        }
        Outcome::Interrupted(code) => {
            // Stop it now; dropping the tracer at the end reaps it (spawned targets are killed on drop).
            for pid in s.tracer.processes() {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
            s.retire_runtime(false);
            Outcome::Interrupted(code)
        }
    };
    s.build_report(command, attach_pid, exit_status)
        .write(&s.cfg.report_path)?;
    Ok(outcome)
}

impl Session {
    fn ingest(&mut self) {
        let samples = self.sampler.take_samples();
        if samples.is_empty() {
            return;
        }
        self.first_sample_at.get_or_insert_with(Instant::now);
        let mut env = LiveEnv {
            tracer: &self.tracer,
            code: &mut self.code,
        };
        self.profiler.ingest(&samples, &mut env);
        if self.cfg.specialize {
            self.recent.ingest(&samples, &mut env);
        }
    }

    fn add_threads(&mut self, tids: &[Pid]) {
        if self.sampling_paused {
            return;
        }
        for &tid in tids {
            match self.sampler.add_thread(tid) {
                Ok(()) => {
                    let tgid = self.tracer.tgid(tid).unwrap_or(tid);
                    self.threads_of.entry(tgid).or_default().insert(tid);
                }
                Err(SamplerError::ThreadGone { .. }) => {}
                Err(e) => {
                    // Losing one thread's samples is not worth stopping the program for; say it once.
                    if !self.warned_sampler && !self.cfg.quiet {
                        eprintln!("dynspec: warning: cannot sample thread {tid}: {e}");
                    }
                    self.warned_sampler = true;
                }
            }
        }
    }

    fn event_loop(&mut self) -> Result<Outcome> {
        loop {
            if let Some(end) = self.check_interrupts()? {
                return Ok(end);
            }
            if let Some(limit) = self.cfg.attach_for {
                if self.attach_mode && self.start.elapsed() >= limit {
                    return Ok(Outcome::Detached);
                }
            }
            self.poll_guards();
            let poll = if self.rt.as_ref().is_some_and(|r| r.has_live()) {
                GUARD_POLL
            } else {
                EVENT_POLL
            };
            let ev = self
                .tracer
                .next_event(Some(poll))
                .context("lost control of the target")?;
            if let Some(ev) = ev {
                if let Some(end) = self.handle_event(ev)? {
                    return Ok(end);
                }
            }
            self.ingest();
            self.advance_phase();
            self.show_progress();
        }
    }

    fn handle_event(&mut self, ev: Event) -> Result<Option<Outcome>> {
        match ev {
            Event::Signal {
                tid,
                signal,
                siginfo,
            } => {
                if signal == libc::SIGSEGV && self.guard_segv(tid, &siginfo) {
                    // Ours: every thread is stopped, the page invalidated, the signal suppressed.
                    self.resume_all_quiet();
                    return Ok(None);
                }
                let claimed = signal == libc::SIGSEGV
                    && match self.store.claims_segv(&mut self.tracer, tid, &siginfo) {
                        Ok(c) => c,
                        Err(e) => {
                            // Deliver it: the program's own handler (or default action) is the safe choice.
                            self.warn(format_args!(
                                "cannot classify a SIGSEGV of thread {tid}: {e:#}"
                            ));
                            false
                        }
                    };
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
                            "cannot restore watched pages in child {child}: {e:#}"
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
                self.sampler.remove_thread(tid);
                for set in self.threads_of.values_mut() {
                    set.remove(&tid);
                }
            }
            Event::Exited { pid, status } => {
                if pid == self.root {
                    return Ok(Some(Outcome::Exited(status)));
                }
                // Release the rings (fds, memory) of a finished child: fork-heavy programs would pile them up.
                for tid in self.threads_of.remove(&pid).unwrap_or_default() {
                    self.sampler.remove_thread(tid);
                }
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

    fn check_interrupts(&mut self) -> Result<Option<Outcome>> {
        let irq = signals::interrupts();
        if irq.count == self.handled_interrupts {
            return Ok(None);
        }
        self.handled_interrupts = irq.count;
        if self.attach_mode {
            return Ok(Some(Outcome::Detached));
        }
        // Run mode: the terminal's Ctrl-C reached the target too. A signal sent to dynspec alone (kill) is
        // passed on, as a wrapper would. A second request ends profiling and kills the target.
        if irq.count >= 2 {
            if !self.cfg.quiet {
                eprintln!("dynspec: interrupted again; killing the target");
            }
            return Ok(Some(Outcome::Interrupted(128 + irq.last_signal)));
        }
        if irq.last_from_user || irq.last_signal == libc::SIGTERM {
            let _ = nix::sys::signal::kill(
                self.root,
                nix::sys::signal::Signal::try_from(irq.last_signal).ok(),
            );
        }
        Ok(None)
    }

    fn advance_phase(&mut self) {
        let now = Instant::now();
        match self.phase {
            Phase::Sampling { until } if now >= until => {
                let candidates = self.profiler.candidate_pages(MAX_WATCHED_PAGES);
                let max_extensions = (MAX_SAMPLING_EXTENSION_TIME.as_secs_f64()
                    / self.cfg.window.as_secs_f64().max(1e-3))
                    as u32;
                if candidates.is_none()
                    && self.sampling_extensions < max_extensions.max(MIN_SAMPLING_EXTENSIONS)
                {
                    // Nothing hot reads memory yet (start-up, or the program was blocked): sample another window
                    // rather than give up on the store profile.
                    self.sampling_extensions += 1;
                    self.phase = Phase::Sampling {
                        until: now + self.cfg.window,
                    };
                    return;
                }
                // A second userfaultfd user next to the code cache's guards is not worth the risk: once a cache
                // exists, later plans rely on read-only memory and the earlier store profile only.
                if let (Some((pid, pages)), None) = (candidates, self.rt.as_ref()) {
                    self.start_watch(pid, &pages);
                }
                self.phase = Phase::Watching {
                    until: now + self.cfg.window,
                };
            }
            Phase::Watching { until } if now >= until => {
                let watched = self.store.is_watching();
                let wants_cache = self.cfg.specialize && self.rt.is_none();
                if watched || wants_cache {
                    match self.stop_everything() {
                        Ok(()) => {
                            self.end_watch();
                            if wants_cache {
                                self.start_runtime();
                            }
                            self.resume_all_quiet();
                        }
                        Err(e) => {
                            if !self.cfg.quiet {
                                eprintln!("dynspec: warning: cannot stop the target to end the write watch: {e}");
                            }
                        }
                    }
                }
                self.profile_done = Some(Instant::now());
                self.phase = Phase::Done;
                self.replan();
            }
            Phase::Resample { until } if now >= until => {
                self.phase = Phase::Done;
                self.replan();
            }
            Phase::Idle { until } if now >= until => {
                self.recent = Profiler::new();
                self.resume_sampling();
                self.phase = Phase::Resample {
                    until: now + self.cfg.window,
                };
            }
            _ => {}
        }
    }

    fn say(&self, msg: impl std::fmt::Display) {
        if !self.cfg.quiet {
            eprintln!("dynspec: {msg}");
        }
    }

    fn warn(&self, msg: impl std::fmt::Display) {
        self.say(format_args!("warning: {msg}"));
    }

    /// Stop every thread (through the code cache while one exists: it must see faults during the stop).
    fn stop_everything(&mut self) -> Result<()> {
        match self.rt.as_ref() {
            Some(rt) => rt.cache.stop_all(&mut self.tracer)?,
            None => self.tracer.stop_all()?,
        }
        Ok(())
    }

    /// Create the code cache for the process the profile points at (threads stopped).
    fn start_runtime(&mut self) {
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
            Ok(rt) => {
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
    fn replan(&mut self) {
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

    fn plan_round(&mut self) {
        self.ingest();
        let Some(rt) = self.rt.as_mut() else { return };
        let recent = &self.recent;
        let regions = plan::regions_to_plan(recent.region_profiles(), |a| {
            recent.stable_registers(a.0, plan::MIN_ASSUMED_SAMPLES)
        });
        if !rt.wants_any(&regions) {
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
        let out = rt.plan_and_install(&mut self.tracer, &regions, &constant);
        self.plans += 1;
        let worth_retrying = !out.problems.is_empty() || self.recent.total() < MIN_PLAN_SAMPLES;
        if out.installed == 0
            && worth_retrying
            && self.plans < MAX_FRUITLESS_PLANS
            && matches!(self.phase, Phase::Done)
        {
            // More samples may show better triggers (or the install met a thread inside the patch site).
            self.phase = Phase::Resample {
                until: Instant::now() + self.cfg.window,
            };
        }
        if let (Some(t), None) = (rt.first_install, self.first_install_at) {
            self.first_install_at = Some(t);
        }
        if let Some(p) = out.problems.first() {
            self.say(p);
        }
        if out.installed > 0 {
            self.idle_backoff = IDLE_MIN;
        }
    }

    /// Stop sampling (specializing mode, nothing left to plan).
    fn pause_sampling(&mut self) {
        if self.sampling_paused {
            return;
        }
        self.ingest();
        for tid in self.sampler.threads() {
            self.sampler.remove_thread(tid);
        }
        self.sampling_paused = true;
    }

    /// Sample every thread again (a re-profile is due).
    fn resume_sampling(&mut self) {
        if !self.sampling_paused {
            return;
        }
        self.sampling_paused = false;
        let tids = self.tracer.all_threads();
        self.add_threads(&tids);
    }

    /// Handle pending uffd guard faults and keep the entry counters fresh.
    fn poll_guards(&mut self) {
        let Some(rt) = self.rt.as_mut() else { return };
        rt.refresh_counters(&self.tracer, COUNTER_REFRESH);
        if !rt.cache.has_guard_faults() {
            return;
        }
        rt.read_counters(&self.tracer);
        match rt.cache.handle_guard_faults(&mut self.tracer) {
            Ok(invs) => {
                rt.record_invalidations(&invs, self.start);
                for i in &invs {
                    self.trust.invalidated(i.page);
                }
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
    fn guard_segv(&mut self, tid: Pid, siginfo: &libc::siginfo_t) -> bool {
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
                rt.record_invalidations(&[inv], self.start);
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
    fn forwarding_in(&self, tid: Pid) -> bool {
        let pid = self.tracer.tgid(tid).unwrap_or(tid);
        self.rt
            .as_ref()
            .is_some_and(|rt| rt.pid == pid && rt.forwards())
    }

    /// A second writer of the specialized process's memory appeared: remove the variants that forward stored
    /// values (every thread stopped; the caller resumes them) and plan again without forwarding.
    fn stop_forwarding(&mut self) {
        if let Err(e) = self.stop_everything() {
            self.say(format_args!("cannot stop the target: {e}"));
            self.give_up_specializing();
            return;
        }
        let Some(rt) = self.rt.as_mut() else { return };
        rt.read_counters(&self.tracer);
        match rt.drop_forwarding(&mut self.tracer) {
            Ok(_) => self.after_invalidation(),
            Err(e) => {
                self.say(format_args!(
                    "cannot remove variants for a new thread: {e}; removing every variant"
                ));
                self.give_up_specializing();
            }
        }
    }

    /// A signal is about to be delivered to `tid` (stopped): its handler may write memory a variant holds in a
    /// register, so the thread leaves such a variant first (it re-enters at the next trigger). False when that
    /// failed and every variant was removed instead (every thread is then stopped).
    fn before_handler(&mut self, tid: Pid) -> bool {
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
    fn after_invalidation(&mut self) {
        self.recent = Profiler::new();
        self.resume_sampling();
        self.idle_backoff = IDLE_MIN;
        if matches!(self.phase, Phase::Done | Phase::Idle { .. }) {
            self.phase = Phase::Resample {
                until: Instant::now() + self.cfg.window,
            };
        }
    }

    /// Something went wrong while variants were live: remove them all (threads stopped by the caller or here)
    /// and specialize no more.
    fn give_up_specializing(&mut self) {
        if let Err(e) = self.stop_everything() {
            self.say(format_args!("cannot stop the target: {e}"));
        }
        if let Err(e) = self.uninstall_everything() {
            self.say(format_args!("cannot remove the variants: {e}"));
        }
        self.retire_runtime(false);
        self.cfg.specialize = false;
    }

    /// Restore every patch and release every guard (threads stopped).
    fn uninstall_everything(&mut self) -> Result<()> {
        let Some(rt) = self.rt.as_mut() else {
            return Ok(());
        };
        rt.read_counters(&self.tracer);
        // uninstall_all asserts that every thread is stopped: check first rather than panic.
        let pid = rt.pid;
        if !self
            .tracer
            .threads(pid)
            .iter()
            .all(|t| self.tracer.is_stopped(*t))
        {
            anyhow::bail!("a thread of {pid} could not be stopped");
        }
        rt.cache.uninstall_all(&mut self.tracer)?;
        Ok(())
    }

    /// A fork child of the specialized process: restore the original code in it before it runs.
    fn strip_child(&mut self, child: Pid) {
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
    fn on_exec(&mut self, pid: Pid) {
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
    fn retire_runtime(&mut self, exec: bool) {
        let Some(mut rt) = self.rt.take() else { return };
        let mut vs = rt.variants_json();
        if exec {
            for v in &mut vs {
                v.invalidated = true;
            }
        }
        self.retired.variants.extend(vs);
        self.retired.invalidations.extend(rt.invalidations_json());
        self.retired.specialize_time += rt.specialize_time;
        self.retired.install_time += rt.install_time;
        if let (Some(t), None) = (rt.first_install, self.first_install_at) {
            self.first_install_at = Some(t);
        }
        rt.cache.forget();
    }

    fn resume_all_quiet(&mut self) {
        if let Err(e) = self.tracer.resume_all() {
            if !self.cfg.quiet {
                eprintln!("dynspec: warning: cannot resume the target: {e}");
            }
        }
    }

    /// Write-watch `pages` of process `pid` (the one whose hot loads read them).
    fn start_watch(&mut self, pid: Pid, pages: &[Addr]) {
        if pages.is_empty() {
            return;
        }
        if let Err(e) = self.tracer.stop_all() {
            self.warn(format_args!(
                "cannot stop the target for the write watch: {e}"
            ));
            return;
        }
        if let Err(e) = self.store.start(&mut self.tracer, pid, pages) {
            self.warn(format_args!(
                "write watch unavailable, no store profile: {e:#}"
            ));
        }
        self.resume_all_quiet();
    }

    /// Threads must be stopped.
    fn end_watch(&mut self) {
        if !self.store.is_watching() {
            return;
        }
        if let Err(e) = self.store.end(&mut self.tracer) {
            self.warn(format_args!("cannot remove the write watch cleanly: {e:#}"));
        }
        self.profile_done.get_or_insert_with(Instant::now);
    }

    /// The watched process is gone: no protection to remove, only results to keep.
    fn end_watch_after_exit(&mut self) {
        if !self.store.is_watching() {
            return;
        }
        self.store.end_after_exit();
        self.profile_done.get_or_insert_with(Instant::now);
    }

    fn show_progress(&mut self) {
        let Some(last) = self.progress else { return };
        if last.elapsed() >= Duration::from_millis(250) {
            eprint!("\rdynspec: {} samples\x1b[K", self.profiler.total());
            self.progress = Some(Instant::now());
        }
    }

    fn build_report(
        &mut self,
        command: Option<Vec<String>>,
        pid: Option<i32>,
        exit_status: Option<ExitStatusJson>,
    ) -> Report {
        if self.progress.is_some() {
            eprint!("\r\x1b[K");
        }
        let duration = self.start.elapsed();
        let profile_ms = self
            .profile_done
            .map(|t| t - self.start)
            .unwrap_or(duration)
            .as_millis() as u64;
        let mut variants = self.retired.variants.clone();
        let mut invalidations = self.retired.invalidations.clone();
        let (mut spec, mut inst) = (self.retired.specialize_time, self.retired.install_time);
        if let Some(rt) = self.rt.as_ref() {
            variants.extend(rt.variants_json());
            invalidations.extend(rt.invalidations_json());
            spec += rt.specialize_time;
            inst += rt.install_time;
        }
        invalidations.sort_by_key(|i| i.time_ms);
        let first_install_ms = match (self.first_sample_at, self.first_install_at) {
            (Some(a), Some(b)) => Some(b.saturating_duration_since(a).as_millis() as u64),
            _ => None,
        };
        Report {
            version: REPORT_VERSION,
            command,
            pid,
            exit_status,
            samples: self.profiler.total(),
            lost_samples: self.sampler.lost(),
            rate_hz: self.sampler.rate_hz(),
            duration_ms: duration.as_millis() as u64,
            hot_regions: self.profiler.report_regions(),
            store_profile: self.store.to_json(),
            timings: Timings {
                profile_ms,
                specialize_ms: spec.as_millis() as u64,
                install_ms: inst.as_millis() as u64,
                first_install_ms,
            },
            variants,
            invalidations,
        }
    }
}
