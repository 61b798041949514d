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
use tracer::maps::{mapping_at, read_maps, Mapping};
use tracer::sampler::{Sampler, SamplerConfig, SamplerError};
use tracer::symbols::{modules, symbolize, Module};
use tracer::watch::WriteWatch;
use tracer::Addr;
use tracer::{Event, ExitStatus, Tracer};

use crate::profile::{Location, ProfileEnv, Profiler};
use crate::report::{
    ExitStatusJson, Hex, InvalidationJson, MethodCounts, Report, StoreProfileJson, Timings,
    VariantJson, REPORT_VERSION,
};
use crate::runtime::{self, RegionPlan, Runtime};
use crate::signals;

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
/// A written page counts as rarely written when at most 1 in this many samples stores into it.
const OPTIMISTIC_STORE_SHARE: u64 = 200;
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
/// Module lists are re-read at most this often per process when an address is not found in them.
const MODULE_REFRESH: Duration = Duration::from_millis(10);

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

/// Symbols and mappings of the target, cached per process and refreshed when an address is not covered.
#[derive(Default)]
struct CodeMap {
    modules: HashMap<Pid, (Vec<Module>, Instant)>,
    maps: HashMap<Pid, (Vec<Mapping>, Instant)>,
}

impl CodeMap {
    fn forget(&mut self, pid: Pid) {
        self.modules.remove(&pid);
        self.maps.remove(&pid);
    }

    /// Re-read the modules of `pid`; if that fails (the process is gone) keep what we had.
    fn refresh_modules(&mut self, pid: Pid) {
        match modules(pid) {
            Ok(mods) => {
                self.modules.insert(pid, (mods, Instant::now()));
            }
            Err(_) => {
                self.modules
                    .entry(pid)
                    .or_insert_with(|| (Vec::new(), Instant::now()))
                    .1 = Instant::now();
            }
        }
    }

    /// Re-read the mappings of `pid`; if that fails keep what we had.
    fn refresh_maps(&mut self, pid: Pid) {
        match read_maps(pid) {
            Ok(maps) => {
                self.maps.insert(pid, (maps, Instant::now()));
            }
            Err(_) => {
                self.maps
                    .entry(pid)
                    .or_insert_with(|| (Vec::new(), Instant::now()))
                    .1 = Instant::now();
            }
        }
    }

    /// Read symbols and mappings now, while the process is stopped and alive: a short-lived program may be gone
    /// before its first samples are analysed.
    fn preload(&mut self, pid: Pid) {
        self.refresh_modules(pid);
        self.refresh_maps(pid);
    }
}

/// [`ProfileEnv`] over the live target.
struct LiveEnv<'a> {
    tracer: &'a Tracer,
    code: &'a mut CodeMap,
}

impl LiveEnv<'_> {
    fn ensure_modules(&mut self, pid: Pid, a: Addr) {
        let stale = match self.code.modules.get(&pid) {
            None => true,
            Some((mods, at)) => symbolize(mods, a).is_none() && at.elapsed() >= MODULE_REFRESH,
        };
        if stale {
            self.code.refresh_modules(pid);
        }
    }

    fn ensure_maps(&mut self, pid: Pid, a: Addr) {
        let stale = match self.code.maps.get(&pid) {
            None => true,
            Some((maps, at)) => mapping_at(maps, a).is_none() && at.elapsed() >= MODULE_REFRESH,
        };
        if stale {
            self.code.refresh_maps(pid);
        }
    }

    /// Code of a process that is gone (or memory we cannot read): the bytes of a read-only file mapping are the
    /// file's bytes at the mapping's offset.
    fn read_from_file(&mut self, pid: Pid, addr: Addr, buf: &mut [u8]) -> usize {
        use std::os::unix::fs::FileExt as _;
        let Some((maps, _)) = self.code.maps.get(&pid) else {
            return 0;
        };
        let Some(m) = mapping_at(maps, addr) else {
            return 0;
        };
        if m.write || !m.is_file() || m.is_pseudo() {
            return 0;
        }
        let Some(path) = &m.path else { return 0 };
        let avail = (m.end.0 - addr.0).min(buf.len() as u64) as usize;
        let off = m.offset + (addr.0 - m.start.0);
        let Ok(f) = std::fs::File::open(path) else {
            return 0;
        };
        let mut done = 0;
        while done < avail {
            match f.read_at(&mut buf[done..avail], off + done as u64) {
                Ok(0) | Err(_) => break,
                Ok(n) => done += n,
            }
        }
        done
    }
}

impl ProfileEnv for LiveEnv<'_> {
    fn locate(&mut self, pid: Pid, ip: Addr) -> Location {
        self.ensure_modules(pid, ip);
        if let Some((mods, _)) = self.code.modules.get(&pid) {
            if let Some((m, sym)) = symbolize(mods, ip) {
                let module = m.path.display().to_string();
                return match sym {
                    Some(s) => Location::Symbol {
                        module,
                        name: s.name.clone(),
                        start: s.start,
                        end: if s.end > s.start {
                            s.end
                        } else {
                            s.start.offset(1)
                        },
                    },
                    None => Location::Unsymbolized {
                        module,
                        start: m.start,
                        end: m.end,
                    },
                };
            }
        }
        self.ensure_maps(pid, ip);
        if let Some((maps, _)) = self.code.maps.get(&pid) {
            if let Some(m) = mapping_at(maps, ip) {
                let module = match &m.path {
                    Some(p) => p.display().to_string(),
                    None => "[anon]".to_string(),
                };
                return Location::Unsymbolized {
                    module,
                    start: m.start,
                    end: m.end,
                };
            }
        }
        Location::Unknown
    }

    fn read_code(&mut self, pid: Pid, addr: Addr, buf: &mut [u8]) -> usize {
        if self.tracer.read_memory(pid, addr, buf).is_ok() {
            return buf.len();
        }
        // Part of the range is unmapped (an instruction right before a guard page, a symbol size that runs past
        // the mapping): read page by page and keep the readable prefix.
        let page = tracer::addr::PAGE_SIZE as usize;
        let mut done = 0usize;
        while done < buf.len() {
            let at = addr.offset(done as u64);
            let chunk = (page - (at.0 as usize % page)).min(buf.len() - done);
            if self
                .tracer
                .read_memory(pid, at, &mut buf[done..done + chunk])
                .is_err()
            {
                break;
            }
            done += chunk;
        }
        if done == 0 {
            return self.read_from_file(pid, addr, buf);
        }
        done
    }
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
    watch: Option<WriteWatch>,
    store: StoreProfileJson,
    start: Instant,
    profile_done: Option<Instant>,
    attach_mode: bool,
    warned_sampler: bool,
    progress: Option<Instant>,
    handled_interrupts: u32,
    /// Sampled threads per process, to release their rings when the process exits.
    threads_of: HashMap<Pid, std::collections::BTreeSet<Pid>>,
    /// Pages the running watch protects with mprotect.
    mprotect_pages: std::collections::BTreeSet<Addr>,
    /// Pages whose protection was just removed: one queued access fault on each is ours, not the program's.
    grace_pages: std::collections::BTreeSet<Addr>,
    /// (page, thread) pairs already forgiven a late fault ([`Session::late_watch_fault`]).
    graced: std::collections::BTreeSet<(Addr, Pid)>,
    /// How often the sampling phase was extended for lack of candidate pages.
    sampling_extensions: u32,
    /// The process the write watch is on.
    watch_pid: Option<Pid>,
    /// The code cache of the specialized process (none with --profile-only or before the first plan).
    rt: Option<Runtime>,
    /// Variants and invalidations of code caches whose process exec'd or exited.
    retired_variants: Vec<VariantJson>,
    retired_invalidations: Vec<InvalidationJson>,
    /// Specialize / install time of retired caches.
    retired_times: (Duration, Duration),
    /// Code caches created so far (for unique variant ids).
    generations: u64,
    /// Profiling restarts after exec.
    restarts: u32,
    /// When the first sample arrived.
    first_sample_at: Option<Instant>,
    /// When the first variant was installed.
    first_install_at: Option<Instant>,
    /// Pages specialized on although the store profile saw them written (see `replan`).
    optimistic: std::collections::BTreeSet<u64>,
    /// Optimistic pages that were then written: never specialized on again.
    distrusted: std::collections::BTreeSet<u64>,
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
        watch: None,
        store: StoreProfileJson::default(),
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
        mprotect_pages: Default::default(),
        grace_pages: Default::default(),
        graced: Default::default(),
        sampling_extensions: 0,
        watch_pid: None,
        rt: None,
        retired_variants: Vec::new(),
        retired_invalidations: Vec::new(),
        retired_times: (Duration::ZERO, Duration::ZERO),
        generations: 0,
        restarts: 0,
        first_sample_at: None,
        first_install_at: None,
        optimistic: Default::default(),
        distrusted: Default::default(),
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
        End::Exited(ExitStatus::Code(c)) => Some(ExitStatusJson::Code(*c)),
        End::Exited(ExitStatus::Signaled { signal, .. }) => Some(ExitStatusJson::Signal(*signal)),
        End::Detach | End::Kill(_) => None,
    };
    let outcome = match end {
        End::Exited(st) if !s.tracer.processes().is_empty() => {
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
            if s.watch_pid.is_some_and(|p| alive(&s, p)) {
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
        End::Exited(st) => {
            // The watch's process is gone: just collect what it saw.
            s.end_watch_after_exit();
            s.retire_runtime(false);
            if s.attach_mode {
                Outcome::Detached
            } else {
                Outcome::Exited(st)
            }
        }
        End::Detach => {
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
        End::Kill(code) => {
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

/// Why the loop ended.
enum End {
    Exited(ExitStatus),
    Detach,
    /// Kill the target, then exit with this code.
    Kill(i32),
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

    fn event_loop(&mut self) -> Result<End> {
        loop {
            if let Some(end) = self.check_interrupts()? {
                return Ok(end);
            }
            if let Some(limit) = self.cfg.attach_for {
                if self.attach_mode && self.start.elapsed() >= limit {
                    return Ok(End::Detach);
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

    fn handle_event(&mut self, ev: Event) -> Result<Option<End>> {
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
                let mut claimed = false;
                if signal == libc::SIGSEGV && self.watch.is_none() {
                    claimed = self.late_watch_fault(tid, &siginfo);
                }
                if signal == libc::SIGSEGV {
                    if let Some(w) = self.watch.as_mut() {
                        claimed = match w.handle_segv(&mut self.tracer, tid, &siginfo) {
                            Ok(c) => c,
                            Err(e) => {
                                // Deliver it: the program's own handler (or default action) is the safe choice.
                                if !self.cfg.quiet {
                                    eprintln!("dynspec: warning: cannot classify a SIGSEGV of thread {tid}: {e}");
                                }
                                false
                            }
                        };
                    }
                }
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
                let watched_parent =
                    self.watch_pid == Some(parent_pid) && !self.tracer.in_vfork(parent);
                let spec_parent = self.rt.as_ref().is_some_and(|r| r.pid == parent_pid)
                    && !self.tracer.in_vfork(parent);
                if spec_parent {
                    self.strip_child(child);
                }
                // A clone that shares the address space without being a thread (CLONE_VM, not vfork, which
                // blocks the parent) is another writer of the memory, like a thread.
                let shared_vm =
                    !self.tracer.in_vfork(parent) && runtime::shares_vm(parent_pid, child);
                if shared_vm && self.forwarding_in(parent) {
                    self.stop_forwarding();
                    self.resume_all_quiet();
                    return Ok(None);
                }
                if let Some(w) = self.watch.as_mut().filter(|_| watched_parent) {
                    // A child must not inherit pages we write-protected: restore them before it runs.
                    if let Err(e) = w.on_fork(&mut self.tracer, child) {
                        if !self.cfg.quiet {
                            eprintln!("dynspec: warning: cannot restore watched pages in child {child}: {e}");
                        }
                    }
                }
                for t in tids {
                    self.resume_quiet(t, None);
                }
                self.resume_quiet(parent, None);
            }
            Event::Exec { pid } => {
                if let Some(w) = self.watch.as_mut() {
                    w.on_exec(pid);
                }
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
                    return Ok(Some(End::Exited(status)));
                }
                // Release the rings (fds, memory) of a finished child: fork-heavy programs would pile them up.
                for tid in self.threads_of.remove(&pid).unwrap_or_default() {
                    self.sampler.remove_thread(tid);
                }
                // Analyse its last samples while its symbols and mappings are still cached, then forget it.
                self.ingest();
                if self.watch_pid == Some(pid) {
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

    fn check_interrupts(&mut self) -> Result<Option<End>> {
        let irq = signals::interrupts();
        if irq.count == self.handled_interrupts {
            return Ok(None);
        }
        self.handled_interrupts = irq.count;
        if self.attach_mode {
            return Ok(Some(End::Detach));
        }
        // Run mode: the terminal's Ctrl-C reached the target too. A signal sent to dynspec alone (kill) is
        // passed on, as a wrapper would. A second request ends profiling and kills the target.
        if irq.count >= 2 {
            if !self.cfg.quiet {
                eprintln!("dynspec: interrupted again; killing the target");
            }
            return Ok(Some(End::Kill(128 + irq.last_signal)));
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
                let watched = self.watch.is_some();
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

    /// A SIGSEGV that arrives after the watch ended: if it is an access fault on a page we had write-protected
    /// with mprotect (queued before the protection was removed), swallow it: the faulting write re-executes and
    /// succeeds. Each thread gets that grace once per page, only while the page is writable and the fault is not
    /// an instruction fetch, so a fault of the program's own is delivered.
    fn late_watch_fault(&mut self, tid: Pid, siginfo: &libc::siginfo_t) -> bool {
        const SEGV_ACCERR: i32 = 2;
        if siginfo.si_code != SEGV_ACCERR || self.grace_pages.is_empty() {
            return false;
        }
        // SAFETY: for SIGSEGV the kernel fills the si_addr member of the fault union; reading it is what the
        // accessor is for.
        let page = Addr(unsafe { siginfo.si_addr() } as u64).page();
        if !self.grace_pages.contains(&page) || !self.graced.insert((page, tid)) {
            return false;
        }
        let fetch = self
            .tracer
            .regs(tid)
            .map(|r| Addr(r.rip).page() == page)
            .unwrap_or(true);
        let pid = self.tracer.tgid(tid).unwrap_or(tid);
        let writable = read_maps(pid)
            .ok()
            .and_then(|maps| mapping_at(&maps, page).map(|m| m.write))
            .unwrap_or(false);
        !fetch && writable
    }

    fn say(&self, msg: impl std::fmt::Display) {
        if !self.cfg.quiet {
            eprintln!("dynspec: {msg}");
        }
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
        let pid = match self.watch_pid.filter(|p| alive(*p)) {
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
        match Runtime::new(&mut self.tracer, pid, base) {
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
        let regions: Vec<RegionPlan> = self
            .recent
            .report_regions()
            .into_iter()
            .filter(|r| r.share >= runtime::MIN_SPECIALIZE_SHARE)
            .map(|r| {
                let candidates = runtime::candidates_of(&r.triggers);
                let stable = candidates
                    .iter()
                    .map(|c| {
                        let regs = self
                            .recent
                            .stable_registers(c.address.0, runtime::MIN_ASSUMED_SAMPLES);
                        (c.address, regs)
                    })
                    .collect();
                RegionPlan {
                    start: Addr(r.start.0),
                    end: Addr(r.end.0),
                    symbol: r.symbol.clone(),
                    candidates,
                    stable,
                }
            })
            .filter(|r| !r.candidates.is_empty())
            .collect();
        if !rt.wants_any(&regions) {
            return;
        }
        // The store profile is about the watched process only.
        let mut constant = Default::default();
        if self.watch_pid == Some(rt.pid) {
            constant = runtime::constant_pages(&self.store.watched, &self.store.written);
            // Optimism: a page the window saw written, but into which the hot code hardly ever stores (a
            // bytecode patched now and then, configuration changed once), is specialized on behind a guard; the
            // first write throws the variants away and the page is not trusted again.
            let total = self.profiler.total();
            for p in &self.store.written {
                let stores = self.profiler.store_samples(rt.pid, p.0);
                if stores * OPTIMISTIC_STORE_SHARE <= total && !self.distrusted.contains(&p.0) {
                    constant.insert(Addr(p.0));
                    self.optimistic.insert(p.0);
                }
            }
        }
        // Pages hot loads read now that the store profile never watched (hot code that started after it): trusted
        // behind a guard like rarely written pages, unless the samples saw the hot code store into them. The first
        // write invalidates and distrusts the page. Only for hot code the planner has not specialized before: a
        // region planned again after an invalidation keeps to what the store profile and its guards taught.
        let new_code = regions.iter().filter(|r| rt.wants(r)).all(|r| rt.is_new(r));
        if let Some((pid, pages)) = self
            .recent
            .candidate_pages(MAX_WATCHED_PAGES)
            .filter(|_| new_code)
        {
            if pid == rt.pid {
                for p in pages {
                    let watched = self.store.watched.iter().any(|w| w.0 == p.0);
                    if !watched
                        && self.recent.store_samples(pid, p.0) == 0
                        && self.profiler.store_samples(pid, p.0) == 0
                        && !self.distrusted.contains(&p.0)
                    {
                        constant.insert(Addr(p.0));
                        self.optimistic.insert(p.0);
                    }
                }
            }
        }
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
                    if self.optimistic.contains(&i.page.0) {
                        self.distrusted.insert(i.page.0);
                    }
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
                if self.optimistic.contains(&inv.page.0) {
                    self.distrusted.insert(inv.page.0);
                }
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
        self.retired_variants.extend(vs);
        self.retired_invalidations.extend(rt.invalidations_json());
        self.retired_times.0 += rt.specialize_time;
        self.retired_times.1 += rt.install_time;
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
            if !self.cfg.quiet {
                eprintln!("dynspec: warning: cannot stop the target for the write watch: {e}");
            }
            return;
        }
        let result = (|| -> Result<WriteWatch> {
            let tid = *self
                .tracer
                .threads(pid)
                .first()
                .ok_or_else(|| anyhow::anyhow!("process {pid} has no threads left"))?;
            let mut w = WriteWatch::new(&mut self.tracer, pid, tid)?;
            let summary = w.watch(&mut self.tracer, pages)?;
            self.store.method = MethodCounts {
                uffd: summary.uffd.len() as u64,
                mprotect: summary.mprotect.len() as u64,
            };
            self.mprotect_pages = summary.mprotect.iter().copied().collect();
            self.store.pages_read_only = summary.read_only.len() as u64;
            Ok(w)
        })();
        match result {
            Ok(w) => {
                self.watch = Some(w);
                self.watch_pid = Some(pid);
            }
            Err(e) => {
                if !self.cfg.quiet {
                    eprintln!("dynspec: warning: write watch unavailable, no store profile: {e:#}");
                }
            }
        }
        self.resume_all_quiet();
    }

    /// Threads must be stopped.
    fn end_watch(&mut self) {
        let Some(w) = self.watch.take() else { return };
        // A write fault on a page we protected may already be queued (seen while stopping the threads); once the
        // protection is gone it must not reach the program. See `late_watch_fault`.
        self.grace_pages = std::mem::take(&mut self.mprotect_pages);
        let watched = w.watched();
        let written = w.written();
        match w.finish(&mut self.tracer) {
            Ok(res) => self.record_store(&res.watched, &res.written, res.read_only.len()),
            Err(e) => {
                if !self.cfg.quiet {
                    eprintln!("dynspec: warning: cannot remove the write watch cleanly: {e}");
                }
                self.record_store(&watched, &written, self.store.pages_read_only as usize);
            }
        }
    }

    /// The watched process is gone: no protection to remove, only results to keep.
    fn end_watch_after_exit(&mut self) {
        let Some(w) = self.watch.take() else { return };
        let watched = w.watched();
        let written = w.written();
        let ro = self.store.pages_read_only as usize;
        // Dropping the watch closes its fds and joins its thread; the process' memory is gone with it.
        drop(w);
        self.record_store(&watched, &written, ro);
    }

    fn record_store(
        &mut self,
        watched: &std::collections::BTreeSet<Addr>,
        written: &std::collections::BTreeSet<Addr>,
        read_only: usize,
    ) {
        self.store.watched = watched.iter().map(|a| Hex(a.0)).collect();
        self.store.written = written.iter().map(|a| Hex(a.0)).collect();
        self.store.pages_watched = watched.len() as u64;
        self.store.pages_written = written.len() as u64;
        self.store.pages_read_only = read_only as u64;
        if self.profile_done.is_none() {
            self.profile_done = Some(Instant::now());
        }
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
        let mut variants = self.retired_variants.clone();
        let mut invalidations = self.retired_invalidations.clone();
        let (mut spec, mut inst) = self.retired_times;
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
            store_profile: self.store.clone(),
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
