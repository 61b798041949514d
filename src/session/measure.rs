//! Measuring the installed stubs while the program runs (the decisions are `crate::abtest`'s): one stub at a
//! time is switched on and off, its passes and the process's CPU time read between intervals; a stub measured
//! slower is removed, a kept one is measured again when its pass rate moves (a phase change).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use codecache::InstallId;
use nix::unistd::Pid;
use tracer::CpuClock;

use super::{Phase, Session, IDLE_MIN};
use crate::abtest::{self, Reading, Step, Trial, Verdict};
use crate::install::Unit;
use crate::report::{EffectJson, MeasurementJson};

/// How often a kept stub's pass rate is looked at for a phase change.
const PHASE_CHECK: Duration = Duration::from_secs(1);
/// Stub passes per CPU millisecond from which an install whose variants loop past their trigger, but whose
/// function is called too rarely to be the unit, is measured by those passes instead: its variants are entered
/// all the time (a stock gforth's, 45 a microsecond, made the run 0.77x), and a pass counted in both modes can
/// only favour the original (the passes inside the variants go uncounted). One entered now and then (an
/// interpreter run by one call, its variants looping for the whole call) keeps its "too few passes".
const BUSY_STUB_RATE: f64 = 1000.0;

/// The trial under way: the install measured, the counting stub that counts its unit (for [`Unit::Calls`]).
struct Current {
    id: InstallId,
    counter: Option<InstallId>,
    /// The unit in words, for the report.
    unit: String,
    /// Counted by calls of the function around it (not the user's metric): when those come too rarely, the
    /// install is measured again by its own passes.
    by_calls: bool,
    trial: Trial,
}

/// The session's measuring state (per code cache: reset when the process execs).
#[derive(Default)]
pub(super) struct Measuring {
    /// CPU cost of a switched-off stub per pass (measured once, on the first trial).
    stub_off_ns: Option<Option<f64>>,
    current: Option<Current>,
    /// Installs with a verdict (or that cannot be measured), with the pass rate measured with the stub on.
    judged: BTreeMap<InstallId, Option<f64>>,
    /// The last phase check per kept install: when, and its reading then.
    checked: BTreeMap<InstallId, Reading>,
    trials: u64,
    off: Duration,
    removed: Vec<u64>,
    /// Installs asked to be measured again (phase change).
    again: BTreeSet<InstallId>,
    /// When the kept installs' pass rates were last looked at.
    phase_checked_at: Option<Duration>,
    /// The process's CPU time, one counting event per thread; None: the process CPU clock is read instead
    /// (perf events refused at the first reading), decided once so readings are never mixed.
    clock: Option<Option<CpuClock>>,
    /// Why the user's `--metric` is not used (said once).
    metric_problem: Option<String>,
    /// Installs measured by their own passes because the calls of their function came too rarely.
    by_passes: BTreeSet<InstallId>,
}

impl Measuring {
    /// The code cache is gone (exec, exit): its installs are forgotten, the totals kept.
    pub(super) fn forget_installs(&mut self) {
        // The counting stub went with the code cache.
        if let Some(c) = self.current.take() {
            self.off += c.trial.off_time;
        }
        self.judged.clear();
        self.checked.clear();
        self.again.clear();
        self.by_passes.clear();
    }

    pub(super) fn to_json(&self) -> MeasurementJson {
        let off = self.off
            + self
                .current
                .as_ref()
                .map_or(Duration::ZERO, |c| c.trial.off_time);
        MeasurementJson {
            stub_off_ns: self.stub_off_ns.flatten(),
            trials: self.trials,
            off_ms: off.as_millis() as u64,
            removed: self.removed.clone(),
            metric: None,
            metric_problem: self.metric_problem.clone(),
        }
    }

    /// The CPU time of process `pid`'s threads, in ns: precise from per-thread events where perf allows them
    /// ([`CpuClock`]: the process clock of another process lags by up to a scheduler tick), else the process
    /// clock.
    fn cpu_ns(&mut self, pid: Pid, tracer: &tracer::Tracer) -> Option<u64> {
        let threads = &tracer.threads(pid);
        let clock = self.clock.get_or_insert_with(|| {
            let mut c = CpuClock::new();
            c.sync(threads).then_some(c)
        });
        match clock {
            Some(c) => {
                c.sync(threads);
                c.read_ns()
            }
            None => process_cpu_ns(pid),
        }
    }
}

/// The process's CPU time (all its threads), in ns, as last accounted by the scheduler.
fn process_cpu_ns(pid: Pid) -> Option<u64> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: writes one clockid_t into `clock`, a local.
    if unsafe { libc::clock_getcpuclockid(pid.as_raw(), &mut clock) } != 0 {
        return None;
    }
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: writes one timespec into `ts`, a local.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

fn effect_json(v: &Verdict, unit: &str, lengths: (Duration, Duration), time_ms: u64) -> EffectJson {
    let e = v.effect();
    let why = match (v, e) {
        (Verdict::TooFewPasses, _) => {
            format!(
                "its unit of work ({unit}) came too rarely while it was measured (fewer than {} per interval)",
                abtest::MIN_PASSES
            )
        }
        (_, Some(e)) => format!(
            "{:.2}x native CPU time per {unit} ({:.2}..{:.2}), {} pairs of {} ms on / {} ms off{}",
            e.ratio,
            e.low,
            e.high,
            e.pairs,
            lengths.0.as_millis(),
            lengths.1.as_millis(),
            if v.keeps() { "" } else { ": removed" }
        ),
        (_, None) => String::new(),
    };
    EffectJson {
        verdict: v.name().to_string(),
        ratio: e.map(|e| e.ratio),
        low: e.map(|e| e.low),
        high: e.map(|e| e.high),
        pairs: e.map_or(0, |e| e.pairs as u64),
        time_ms,
        unit: Some(unit.to_string()),
        why,
    }
}

fn unmeasured(time_ms: u64, why: String) -> EffectJson {
    EffectJson {
        verdict: "unmeasured".to_string(),
        ratio: None,
        low: None,
        high: None,
        pairs: 0,
        time_ms,
        unit: None,
        why,
    }
}

/// Why an install with no unit of work is not measured.
const NO_UNIT: &str = "a variant passes its trigger address again inside itself (it loops back there, or follows \
                       several passes in a row), so the stub does not see every pass, and the code around it is \
                       not a whole function whose calls could be counted instead";

impl Session {
    /// How soon the trial under way wants its next reading (None: no trial), so the event loop wakes for it.
    pub(super) fn measure_due_in(&self) -> Option<Duration> {
        let at = Instant::now().duration_since(self.time.start);
        self.measuring.current.as_ref().map(|c| c.trial.due_in(at))
    }

    /// One step of measuring (called every event-loop turn; cheap when nothing is due).
    pub(super) fn measure(&mut self) {
        if !self.cfg.specialize {
            return;
        }
        let Some(rt) = self.rt.as_ref() else {
            return;
        };
        if self.measuring.metric_problem.is_none() {
            if let Some(p) = rt.metric_problem() {
                if let Some(m) = &self.cfg.metric {
                    self.warn(format_args!(
                        "--metric {m}: {p}; measuring by each variant's own unit"
                    ));
                }
                self.measuring.metric_problem = Some(p);
            }
        }
        let pid = rt.pid;
        let at = Instant::now().duration_since(self.time.start);
        let time_ms = at.as_millis() as u64;
        // The clock is read only when a reading is due: reading a running thread's clock interrupts its CPU, and
        // this runs every event-loop turn.
        if let Some(due) = self.measuring.current.as_ref().map(|c| c.trial.due(at)) {
            if !due {
                return;
            }
            let Some(cpu) = self.measuring.cpu_ns(pid, &self.tracer) else {
                return;
            };
            if let Some(cur) = self.measuring.current.take() {
                self.continue_trial(cur, at, cpu);
            }
            return;
        }
        // Nothing under measurement: the first live install without a verdict, or one whose phase changed.
        let live = rt.live_installs();
        let next = live
            .iter()
            .find(|(id, _)| {
                !self.measuring.judged.contains_key(id) || self.measuring.again.contains(id)
            })
            .copied();
        let Some((id, unit)) = next else {
            let phase_due = self
                .measuring
                .phase_checked_at
                .is_none_or(|t| at.saturating_sub(t) >= PHASE_CHECK);
            if phase_due && !self.measuring.judged.is_empty() {
                self.measuring.phase_checked_at = Some(at);
                if let Some(cpu) = self.measuring.cpu_ns(pid, &self.tracer) {
                    self.check_phases(&live, at, cpu);
                }
            }
            return;
        };
        let Some(cpu) = self.measuring.cpu_ns(pid, &self.tracer) else {
            return;
        };
        self.measuring.again.remove(&id);
        // Its variants loop past their trigger, but entered often all the same: measured by the passes through
        // the stub, which leaves the passes inside the variants uncounted and so can only make it look slower.
        let by_passes = self.measuring.by_passes.contains(&id);
        let unit = if by_passes { Unit::Passes } else { unit };
        let counter = match unit {
            Unit::Passes => None,
            Unit::None => {
                self.measuring.judged.insert(id, None);
                if let Some(rt) = self.rt.as_mut() {
                    rt.record_effect(id, unmeasured(time_ms, NO_UNIT.to_string()));
                }
                return;
            }
            Unit::Calls {
                site,
                region,
                metric,
            } => {
                let installed = self
                    .rt
                    .as_mut()
                    .map(|rt| rt.install_counter(&mut self.tracer, site, region));
                match installed {
                    Some(Ok(c)) => Some(c),
                    Some(Err(e)) => {
                        self.measuring.judged.insert(id, None);
                        let why = match (metric, &self.cfg.metric) {
                            (true, Some(m)) => {
                                format!("--metric {m}: its site {site} cannot be counted: {e}")
                            }
                            _ => format!("{NO_UNIT}: its calls cannot be counted at {site}: {e}"),
                        };
                        if let Some(rt) = self.rt.as_mut() {
                            rt.record_effect(id, unmeasured(time_ms, why));
                        }
                        return;
                    }
                    None => return,
                }
            }
        };
        let Some(start) = self.read_units(id, counter, at, cpu) else {
            self.drop_counter(counter);
            return;
        };
        if self.measuring.stub_off_ns.is_none() {
            self.measuring.stub_off_ns = Some(codecache::stub::calibrate::disabled_stub_ns());
        }
        self.measuring.trials += 1;
        let by_calls = matches!(unit, Unit::Calls { metric: false, .. });
        let unit = match (unit, &self.cfg.metric) {
            (Unit::Calls { metric: true, .. }, Some(m)) => format!("unit of --metric {m}"),
            (Unit::Calls { site, .. }, _) => format!("call of the function at {site}"),
            _ if by_passes => {
                "pass through the dispatch site (its function's calls came too rarely)".to_string()
            }
            _ => "pass through the dispatch site".to_string(),
        };
        self.measuring.current = Some(Current {
            id,
            counter,
            unit,
            by_calls,
            trial: Trial::start(start),
        });
    }

    /// A reading of install `id`'s units (its own passes, or the counting stub's) and passes.
    fn read_units(
        &self,
        id: InstallId,
        counter: Option<InstallId>,
        at: Duration,
        cpu: u64,
    ) -> Option<Reading> {
        let rt = self.rt.as_ref()?;
        let stub_passes = rt.cache.dispatch_passes(&self.tracer, id).ok()??;
        let passes = match counter {
            Some(c) => rt.cache.dispatch_passes(&self.tracer, c).ok()??,
            None => stub_passes,
        };
        Some(Reading {
            at,
            cpu_ns: cpu,
            passes,
            stub_passes,
        })
    }

    /// Remove the counting stub of a trial that ended.
    fn drop_counter(&mut self, counter: Option<InstallId>) {
        let (Some(c), Some(rt)) = (counter, self.rt.as_mut()) else {
            return;
        };
        if let Err(e) = rt.remove_counter(&mut self.tracer, c) {
            self.warn(format_args!("cannot remove a counting stub: {e}"));
        }
    }

    fn continue_trial(&mut self, mut cur: Current, at: Duration, cpu: u64) {
        let time_ms = at.as_millis() as u64;
        let Some(r) = self.read_units(cur.id, cur.counter, at, cpu) else {
            // Invalidated or removed meanwhile: nothing left to measure.
            self.measuring.off += cur.trial.off_time;
            self.drop_counter(cur.counter);
            return;
        };
        let stub_off = self.measuring.stub_off_ns.flatten().unwrap_or(0.0);
        match cur.trial.step(r, stub_off) {
            Step::Wait => self.measuring.current = Some(cur),
            Step::Switch(on) => {
                let switched = self.rt.as_ref().map(|rt| rt.cache.set_enabled(cur.id, on));
                if let Some(Ok(true)) = switched {
                    self.measuring.current = Some(cur);
                } else {
                    // Not switched on: a page its variants rely on may have changed (an invalidation is on its
                    // way); the trial ends and the stub is left to the guards.
                    self.measuring.off += cur.trial.off_time;
                    self.drop_counter(cur.counter);
                }
            }
            Step::Done(v) => {
                self.measuring.off += cur.trial.off_time;
                self.drop_counter(cur.counter);
                if cur.by_calls
                    && matches!(v, Verdict::TooFewPasses)
                    && cur.trial.on_stub_rate() >= BUSY_STUB_RATE
                {
                    // Its function's calls are too rare, but its stub is passed all the time: measured again at
                    // once, by those passes.
                    self.measuring.by_passes.insert(cur.id);
                    return;
                }
                let rate = if cur.counter.is_none() {
                    cur.trial.on_rate()
                } else {
                    None
                };
                self.finish_trial(cur.id, &v, &cur.unit, rate, cur.trial.lengths(), time_ms);
            }
        }
    }

    /// Record a verdict; remove the install when it loses.
    fn finish_trial(
        &mut self,
        id: InstallId,
        v: &Verdict,
        unit: &str,
        on_rate: Option<f64>,
        lengths: (Duration, Duration),
        time_ms: u64,
    ) {
        let Some(rt) = self.rt.as_mut() else {
            return;
        };
        rt.record_effect(id, effect_json(v, unit, lengths, time_ms));
        self.measuring.judged.insert(id, on_rate);
        if v.keeps() {
            // Switched on again (a refusal means an invalidation is under way: the guards decide).
            let _ = rt.cache.set_enabled(id, true);
            return;
        }
        match rt.remove_measured(&mut self.tracer, id) {
            Ok((ids, again)) => {
                if !self.cfg.quiet {
                    eprintln!(
                        "dynspec: removed variant{} {}: measured slower than the original code",
                        if ids.len() == 1 { "" } else { "s" },
                        ids.iter()
                            .map(|i| i.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
                self.measuring.removed.extend(ids);
                // The region's runner-up is tried at the next periodic look, sooner after a loss: a look at
                // once costs a window of samples and a planning round, which a loser's run (samples/losing_variant)
                // paid for with nothing to show.
                if let (true, Phase::Idle { until }) = (again, &mut self.phase) {
                    *until = (*until).min(Instant::now() + IDLE_MIN);
                }
            }
            // Left switched off (the stub only falls back) until the next try.
            Err(e) => {
                self.warn(format_args!("cannot remove a variant measured slower: {e}"));
                self.measuring.judged.remove(&id);
            }
        }
    }

    /// Now and then, compare each kept install's pass rate with the one it was measured at.
    fn check_phases(&mut self, live: &[(InstallId, Unit)], at: Duration, cpu: u64) {
        let Some(rt) = self.rt.as_ref() else {
            return;
        };
        // Only stubs measured by their own passes: the others would need their counting stub back.
        for (id, _) in live.iter().filter(|(_, u)| *u == Unit::Passes) {
            let Some(Some(measured)) = self.measuring.judged.get(id).copied() else {
                continue;
            };
            let Ok(Some(passes)) = rt.cache.dispatch_passes(&self.tracer, *id) else {
                continue;
            };
            let now = Reading {
                at,
                cpu_ns: cpu,
                passes,
                stub_passes: passes,
            };
            match self.measuring.checked.get(id).copied() {
                Some(last) if now.at.saturating_sub(last.at) < PHASE_CHECK => {}
                Some(last) => {
                    let cpu = now.cpu_ns.saturating_sub(last.cpu_ns);
                    let rate =
                        now.passes.wrapping_sub(last.passes) as f64 * 1e9 / cpu.max(1) as f64;
                    if cpu > 0 && abtest::phase_changed(measured, rate) {
                        self.measuring.again.insert(*id);
                    }
                    self.measuring.checked.insert(*id, now);
                }
                None => {
                    self.measuring.checked.insert(*id, now);
                }
            }
        }
    }
}
