//! The session loop: trace the target, sample it, watch the pages hot loads read, specialize and install variants,
//! handle guard faults, and produce the report.
//!
//! The loop is a small state machine on a clock (`Phase`): sample, write-watch, then (unless `--profile-only`)
//! plan + specialize + install; after an invalidation, sample another window and plan again (bounded per region).

use std::ffi::OsString;
use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use nix::unistd::Pid;
use tracer::sampler::{Sampler, SamplerConfig};
use tracer::Addr;
use tracer::{ExitStatus, Tracer};

use crate::codemap::{CodeMap, LiveEnv};
use crate::install::Installer;

use crate::overhead::{Overhead, StepJson};
use crate::profile::Profiler;
use crate::report::{
    ExitStatusJson, InvalidationJson, MeasurementJson, PlanRoundJson, Report, Timings, VariantJson,
    REPORT_VERSION,
};
use crate::signals;

mod aside;
mod events;
pub mod guardian;
mod measure;
mod sampling;
mod specialize;

use crate::store_profile::{PageTrust, StoreProfile};
use sampling::Sampling;

/// How long one `next_event` wait may block: bounds the latency of phase changes and signal handling.
const EVENT_POLL: Duration = Duration::from_millis(20);
/// The same while variants are guarded: a thread that writes a guarded page waits this long at most for us.
const GUARD_POLL: Duration = Duration::from_millis(3);
/// Shortest wait for an event (a trial's interval that is about to end).
const MIN_POLL: Duration = Duration::from_micros(200);
/// How often the variants' entry counters are read from the target.
const COUNTER_REFRESH: Duration = Duration::from_millis(50);
/// Profiling restarts after an exec (the new image is profiled and specialized again), at most this often.
const MAX_RESTARTS: u32 = 4;
/// Planning rounds that installed nothing before the session stops trying (until an exec starts over).
const MAX_FRUITLESS_PLANS: u32 = 2;
/// A planning round on fewer samples than this that installs nothing is retried after another window; with more,
/// a fruitless round is final (unless an install failed): re-planning costs the program sampling overhead.
const MIN_PLAN_SAMPLES: u64 = 400;
/// Longest a planning round waits for the samples it wants ([`enough_to_plan`]).
const MAX_SETTLE: Duration = Duration::from_millis(500);

/// Samples `span` of one busy thread's CPU time gives at `rate_hz`, less a margin (timer skid, start-up).
fn samples_wanted(rate_hz: u64, span: Duration) -> u64 {
    (rate_hz as f64 * span.as_secs_f64() * 0.8) as u64
}

/// Whether a planning round may start on `samples` after waiting `waited`: once it has `wanted`, or waited
/// [`MAX_SETTLE`] (a program that mostly blocks gives few samples however long one waits). Windows are measured
/// in the program's CPU time this way, not in wall time: under load the program runs less per wall second, and
/// a plan on a few dozen samples flips from run to run.
fn enough_to_plan(samples: u64, wanted: u64, waited: Duration) -> bool {
    samples >= wanted || waited >= MAX_SETTLE
}
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
    /// Run mode: descriptors to close in the program ([`tracer::SpawnOptions::close_fds`]).
    pub close_fds: Vec<i32>,
    /// Share of the program's wall time dynspec may cost it in stops before it backs off (`--max-overhead`).
    pub max_overhead: f64,
    /// The user's unit of work for measuring variants (`--metric`).
    pub metric: Option<crate::metric::Metric>,
}

/// How the session ended.
#[derive(Debug)]
pub enum Outcome {
    /// The root process exited: in run mode pass its status on (in attach mode the session reports `Detached`).
    Exited(ExitStatus),
    /// Attach mode: detached, the process keeps running.
    Detached,
    /// Run mode: the user insisted (second Ctrl-C) and the target was killed; exit with this code.
    Interrupted(i32),
}

/// Where the session is in its cycle: sampling, write-watching, planning (and installing), idle between
/// periodic looks, or resampling after an invalidation. Each timed phase ends at `until`; `advance_phase` moves on.
enum Phase {
    /// Sampling only, until the first window elapses.
    Sampling { until: Instant },
    /// Write-watching the candidate pages (since `since`), until the second window elapses and the samples for
    /// the first plan came in.
    Watching { until: Instant, since: Instant },
    /// After an invalidation: sample another window, then plan again.
    ///
    /// With `settle` (a re-plan after an invalidation), the window is extended until [`MIN_PLAN_SAMPLES`] samples
    /// came in (at most [`MAX_SETTLE`] after `since`): a plan on a few dozen samples flips from run to run.
    Resample {
        until: Instant,
        since: Instant,
        settle: bool,
    },
    /// Profile complete, planning under way.
    Done,
    /// Sampling paused until `until`; then a fresh window and another planning round (hot code that starts
    /// late, or moves, is found; the pause doubles up to [`IDLE_MAX`] so the cost stays small).
    Idle { until: Instant },
}

/// When things happened in a session, for the report's timings.
struct Timeline {
    start: Instant,
    /// When the store profile ended (the profile was complete).
    profile_done: Option<Instant>,
    first_sample: Option<Instant>,
    first_install: Option<Instant>,
}

impl Timeline {
    fn new(start: Instant) -> Timeline {
        Timeline {
            start,
            profile_done: None,
            first_sample: None,
            first_install: None,
        }
    }

    /// The report's timings at `now` (the session's duration so far), given the time spent specializing and
    /// installing. A profile that never completed lasted the whole session.
    fn timings(&self, now: Duration, specialize: Duration, install: Duration) -> Timings {
        let profile = self.profile_done.map(|t| t - self.start).unwrap_or(now);
        Timings {
            profile_ms: profile.as_millis() as u64,
            specialize_ms: specialize.as_millis() as u64,
            install_ms: install.as_millis() as u64,
            first_install_ms: match (self.first_sample, self.first_install) {
                (Some(a), Some(b)) => Some(b.saturating_duration_since(a).as_millis() as u64),
                _ => None,
            },
        }
    }
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
    sampling: Sampling,
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
    /// When things happened (the report's timings).
    time: Timeline,
    attach_mode: bool,
    progress: Option<Instant>,
    handled_interrupts: u32,
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
    /// Planning rounds so far.
    plans: u32,
    /// The report's `plan`: every planning round's decisions.
    plan_log: Vec<PlanRoundJson>,
    /// The next [`Phase::Idle`] pause.
    idle_backoff: Duration,
    /// `--profile-only` (`cfg.specialize` also goes false when specializing is given up).
    profile_only: bool,
    /// What the program lost to dynspec so far.
    overhead: Overhead,
    /// Final planning rounds in a row that installed nothing (see `overhead::FRUITLESS_ROUNDS`).
    fruitless_rounds: u32,
    /// The event being handled was a guard or watch fault (dynspec's), not a signal of the program's.
    guard_stop: bool,
    /// What the session did about its own cost (the report's `overhead.steps`).
    steps: Vec<StepJson>,
    /// The session ends by stepping aside (detaching; in run mode the program runs on untraced).
    stepped_aside: bool,
    /// Measuring the installed stubs on and off.
    measuring: measure::Measuring,
    /// Attach mode: the process that undoes every change if dynspec dies (none: do not specialize).
    guardian: Option<guardian::Guardian>,
    /// Measuring what a signal stop costs on this machine (`tracer::calibrate`), in a thread of its own, started
    /// once the program has been stopped often enough for the cost to matter (`aside.rs`).
    stop_cost: aside::StopCost,
}

/// Run a whole session and write its report.
pub fn run(target: Target, cfg: &SessionConfig) -> Result<Outcome> {
    signals::install().context("cannot install dynspec's signal handlers")?;
    // Before touching the target, so a bad rate never leaves a half-started program behind.
    let sampler = Sampler::new(SamplerConfig::for_rate(cfg.rate_hz))
        .context("cannot set up perf_event sampling")?;
    let (tracer, command, attach_pid) = match &target {
        Target::Run(argv) => {
            let opts = tracer::SpawnOptions {
                close_fds: cfg.close_fds.clone(),
                ..Default::default()
            };
            let t = Tracer::spawn_with(argv, &opts)
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
    // Attach mode changes the process only under a guardian's watch (ARCHITECTURE.md, "The guardian").
    let mut guardian_failed = None;
    let guardian = match attach_pid {
        Some(pid) if cfg.specialize => match guardian::Guardian::start(Pid::from_raw(pid)) {
            Ok(g) => Some(g),
            Err(e) => {
                guardian_failed = Some(e);
                None
            }
        },
        _ => None,
    };
    let root = tracer.root();
    let mut code = CodeMap::default();
    code.preload(root);
    let start = Instant::now();
    let mut s = Session {
        cfg: cfg.clone(),
        tracer,
        sampling: Sampling::new(sampler),
        profiler: Profiler::new(),
        recent: Profiler::new(),
        code,
        root,
        phase: Phase::Sampling {
            until: start + cfg.window,
        },
        store: StoreProfile::default(),
        trust: PageTrust::default(),
        time: Timeline::new(start),
        attach_mode: attach_pid.is_some(),
        // A live progress line needs a terminal, and one the program does not write to: dynspec cannot know when
        // the program writes, so its output would land in the middle of the line (in run mode it always shares
        // dynspec's stderr).
        progress: if !cfg.quiet && std::io::stderr().is_terminal() && !writes_to_our_stderr(root) {
            Some(start)
        } else {
            None
        },
        handled_interrupts: 0,
        sampling_extensions: 0,
        rt: None,
        retired: Retired::default(),
        generations: 0,
        restarts: 0,
        plans: 0,
        plan_log: Vec::new(),
        idle_backoff: IDLE_MIN,
        profile_only: !cfg.specialize,
        overhead: Overhead::new(start),
        fruitless_rounds: 0,
        guard_stop: false,
        steps: Vec::new(),
        stepped_aside: false,
        measuring: measure::Measuring::default(),
        guardian,
        stop_cost: aside::StopCost::NotStarted,
    };
    if let Some(e) = guardian_failed {
        s.say(format_args!("{e:#}; profiling only"));
        s.cfg.specialize = false;
    }
    for tid in s.tracer.all_threads() {
        // At the start a refusal is fatal and explained (perf_event_paranoid, CAP_PERFMON, mlock limits).
        s.sampling
            .add(tid, root)
            .with_context(|| format!("cannot sample PID {root}"))?;
    }
    s.tracer.resume_all().context("cannot resume the target")?;
    let end = s.event_loop()?;
    s.ingest();
    let exit_status = exit_json(&end);
    let killed_by_dynspec = matches!(end, Outcome::Interrupted(_));
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
            // Whether nothing of dynspec's is left (else the guardian undoes the rest once dynspec exits).
            let mut removed = true;
            if s.rt.as_ref().is_some_and(|rt| alive(&s, rt.pid)) {
                if let Err(e) = s.uninstall_everything() {
                    s.say(format_args!("cannot remove the installed variants: {e}"));
                    removed = false;
                }
            }
            s.retire_runtime(false);
            if s.store.pid().is_some_and(|p| alive(&s, p)) {
                s.end_watch();
            } else {
                s.end_watch_after_exit();
            }
            if removed {
                if let Some(g) = s.guardian.take() {
                    g.detached();
                }
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
            if let Some(g) = s.guardian.take() {
                g.detached();
            }
            if s.attach_mode {
                Outcome::Detached
            } else {
                Outcome::Exited(st)
            }
        }
        Outcome::Detached => {
            s.stop_everything()
                .context("cannot stop the target to detach")?;
            s.uninstall_everything()
                .context("cannot remove the installed variants before detaching")?;
            // Nothing of dynspec's is left in the target: the guardian may go (an error above leaves it to
            // undo what is left once dynspec exits).
            if let Some(g) = s.guardian.take() {
                g.detached();
            }
            s.end_watch();
            // Nothing of dynspec may go on costing the program once it is let go.
            s.pause_sampling();
            let mut report = s.build_report(command, attach_pid, exit_status);
            let run_on = s.stepped_aside && !s.attach_mode;
            let Session {
                tracer,
                cfg,
                root,
                time,
                handled_interrupts,
                ..
            } = s;
            let ended = tracer.detach().context("cannot detach from the target")?;
            if run_on {
                // Run mode: the program runs on untraced; its exit status is still ours to pass on. It may have
                // exited while it was being let go, its status then taken by the tracer (bc, 2 runs in 20).
                let out = match ended.iter().find(|(pid, _)| *pid == root) {
                    Some(&(_, st)) => Outcome::Exited(st),
                    None => aside::wait_untraced(root, handled_interrupts, cfg.quiet)?,
                };
                report.exit_status = exit_json(&out);
                report.duration_ms = time.start.elapsed().as_millis() as u64;
                report.overhead.share = if report.duration_ms == 0 {
                    0.0
                } else {
                    report.overhead.lost_ms / report.duration_ms as f64
                };
                report.write(&cfg.report_path)?;
                return Ok(out);
            }
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
    let mut report = s.build_report(command, attach_pid, exit_status);
    report.killed_by_dynspec = killed_by_dynspec;
    report.write(&s.cfg.report_path)?;
    Ok(outcome)
}

/// Whether the process's stdout or stderr is the file dynspec's stderr is (same device and inode).
fn writes_to_our_stderr(pid: Pid) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(ours) = std::fs::metadata("/proc/self/fd/2") else {
        return true;
    };
    [1, 2].iter().any(|fd| {
        // Unknown (the fd closed, /proc unreadable) counts as shared: never risk a garbled line.
        std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
            .map_or(true, |m| m.dev() == ours.dev() && m.ino() == ours.ino())
    })
}

/// The report's exit status for how the session ended (null while the program keeps running).
fn exit_json(end: &Outcome) -> Option<ExitStatusJson> {
    match end {
        Outcome::Exited(ExitStatus::Code(c)) => Some(ExitStatusJson::Code(*c)),
        Outcome::Exited(ExitStatus::Signaled { signal, .. }) => {
            Some(ExitStatusJson::Signal(*signal))
        }
        Outcome::Detached => None,
        // Killed with SIGKILL, which it cannot catch: that is how it ends.
        Outcome::Interrupted(_) => Some(ExitStatusJson::Signal(libc::SIGKILL)),
    }
}

impl Session {
    fn ingest(&mut self) {
        let samples = self.sampling.take_samples();
        if samples.is_empty() {
            return;
        }
        self.time.first_sample.get_or_insert_with(Instant::now);
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
        self.sampling
            .add_threads(&self.tracer, tids, self.cfg.quiet);
    }

    fn event_loop(&mut self) -> Result<Outcome> {
        loop {
            if let Some(end) = self.check_interrupts()? {
                return Ok(end);
            }
            if let Some(limit) = self.cfg.attach_for {
                if self.attach_mode && self.time.start.elapsed() >= limit {
                    return Ok(Outcome::Detached);
                }
            }
            self.poll_guards();
            let poll = if self.rt.as_ref().is_some_and(|r| r.has_live()) {
                GUARD_POLL
            } else {
                EVENT_POLL
            };
            // A trial's interval ends on time (short intervals are what keeps measuring cheap).
            let poll = self
                .measure_due_in()
                .map_or(poll, |d| poll.min(d.max(MIN_POLL)));
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
            self.measure();
            if self.consider_stepping_aside() {
                return Ok(Outcome::Detached);
            }
            self.show_progress();
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
                let candidates = self.profiler.watch_pages(MAX_WATCHED_PAGES);
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
                    since: now,
                };
            }
            Phase::Watching { until, since } if now >= until => {
                // The first plan is made on the samples of both windows: wait until the program has run as long
                // as they take on an idle machine (under load it gets less CPU per wall second).
                let wanted = samples_wanted(self.cfg.rate_hz, 2 * self.cfg.window);
                if self.cfg.specialize && !enough_to_plan(self.recent.total(), wanted, now - since)
                {
                    self.phase = Phase::Watching {
                        until: now + EVENT_POLL,
                        since,
                    };
                    return;
                }
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
                self.time.profile_done = Some(Instant::now());
                self.phase = Phase::Done;
                self.replan();
            }
            Phase::Resample {
                until,
                since,
                settle,
            } if now >= until => {
                let wanted = if settle {
                    MIN_PLAN_SAMPLES
                } else {
                    samples_wanted(self.cfg.rate_hz, self.cfg.window)
                };
                if !enough_to_plan(self.recent.total(), wanted, now.duration_since(since)) {
                    self.phase = Phase::Resample {
                        until: now + self.cfg.window,
                        since,
                        settle,
                    };
                    return;
                }
                self.phase = Phase::Done;
                self.replan();
            }
            Phase::Idle { until } if now >= until => {
                self.recent = Profiler::new();
                self.resume_sampling();
                self.phase = Phase::Resample {
                    until: now + self.cfg.window,
                    since: now,
                    settle: false,
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
            self.warn(format_args!("cannot remove the write watch cleanly: {e}"));
        }
        self.time.profile_done.get_or_insert_with(Instant::now);
    }

    /// The watched process is gone: no protection to remove, only results to keep.
    fn end_watch_after_exit(&mut self) {
        if !self.store.is_watching() {
            return;
        }
        self.store.end_after_exit();
        self.time.profile_done.get_or_insert_with(Instant::now);
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
        let duration = self.time.start.elapsed();
        let mut variants = self.retired.variants.clone();
        let mut invalidations = self.retired.invalidations.clone();
        let (mut spec, mut inst) = (self.retired.specialize_time, self.retired.install_time);
        if let Some(rt) = self.rt.as_ref() {
            variants.extend(rt.variants_json(self.time.start));
            invalidations.extend(rt.invalidations_json());
            spec += rt.specialize_time;
            inst += rt.install_time;
        }
        invalidations.sort_by_key(|i| i.time_ms);
        Report {
            version: REPORT_VERSION,
            command,
            pid,
            exit_status,
            killed_by_dynspec: false,
            samples: self.profiler.total(),
            lost_samples: self.sampling.lost(),
            rate_hz: self.sampling.rate_hz(),
            duration_ms: duration.as_millis() as u64,
            hot_regions: self.profiler.report_regions(),
            store_profile: self.store.to_json(),
            timings: self.time.timings(duration, spec, inst),
            variants,
            invalidations,
            plan: self.plan_log.clone(),
            not_planned: self.not_planned(duration),
            overhead: self.overhead.to_json(
                self.profiler.total(),
                inst,
                duration,
                self.steps.clone(),
            ),
            measurement: MeasurementJson {
                metric: self.cfg.metric.as_ref().map(|m| m.to_string()),
                ..self.measuring.to_json()
            },
        }
    }

    /// Why no planning round happened, when none did (the report says so instead of an empty plan).
    fn not_planned(&self, duration: Duration) -> Option<String> {
        if !self.plan_log.is_empty() {
            return None;
        }
        Some(if !self.cfg.specialize && self.generations == 0 {
            "profiled only (--profile-only): nothing is specialized".to_string()
        } else if self.profiler.total() == 0 {
            "no samples: the program ran no user code while it was sampled".to_string()
        } else if self.rt.is_none() && self.generations == 0 && self.time.profile_done.is_some() {
            "the code cache could not be set up (see dynspec's messages)".to_string()
        } else {
            format!(
                "the program ended after {:.3} s, before the first planning round (which follows a sampling \
                 window and a write-watch window of {:.3} s each: --window)",
                duration.as_secs_f64(),
                self.cfg.window.as_secs_f64()
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_wait_for_the_samples_an_idle_machine_gives() {
        // 1999 Hz over two 50 ms windows: about 200 samples on an idle machine; 80% of that is wanted.
        assert_eq!(samples_wanted(1999, Duration::from_millis(100)), 159);
        let wanted = samples_wanted(1999, Duration::from_millis(100));
        assert!(!enough_to_plan(60, wanted, Duration::from_millis(120)));
        assert!(enough_to_plan(160, wanted, Duration::from_millis(120)));
        // A program that blocks gives few samples: the round goes ahead after MAX_SETTLE.
        assert!(enough_to_plan(3, wanted, MAX_SETTLE));
    }

    #[test]
    fn a_program_sharing_dynspec_stderr_gets_no_progress_line() {
        let inherited = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("sleep");
        let dir = tempfile::tempdir().expect("tempdir");
        let file = || std::fs::File::create(dir.path().join("out")).expect("file");
        let elsewhere = std::process::Command::new("sleep")
            .arg("5")
            .stdout(file())
            .stderr(file())
            .spawn()
            .expect("sleep");
        let pid = |c: &std::process::Child| Pid::from_raw(c.id() as i32);
        let (shares, separate) = (
            writes_to_our_stderr(pid(&inherited)),
            writes_to_our_stderr(pid(&elsewhere)),
        );
        for mut c in [inherited, elsewhere] {
            let _ = c.kill();
            let _ = c.wait();
        }
        assert!(shares, "a child with our stderr shares it");
        assert!(!separate, "a child writing to a file does not");
    }
}
