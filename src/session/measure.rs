//! Measuring the installed stubs while the program runs (the decisions are `crate::abtest`'s): one stub at a
//! time is switched on and off, its passes and the process's CPU time read between intervals; a stub measured
//! slower is removed, a kept one is measured again when its pass rate moves (a phase change).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use codecache::InstallId;
use nix::unistd::Pid;

use super::Session;
use crate::abtest::{self, Reading, Step, Trial, Verdict};
use crate::report::{EffectJson, MeasurementJson};

/// How often a kept stub's pass rate is looked at for a phase change.
const PHASE_CHECK: Duration = Duration::from_secs(1);

/// The session's measuring state (per code cache: reset when the process execs).
#[derive(Default)]
pub(super) struct Measuring {
    /// CPU cost of a switched-off stub per pass (measured once, on the first trial).
    stub_off_ns: Option<Option<f64>>,
    current: Option<(InstallId, Trial)>,
    /// Installs with a verdict (or that cannot be measured), with the pass rate measured with the stub on.
    judged: BTreeMap<InstallId, Option<f64>>,
    /// The last phase check per kept install: when, and its reading then.
    checked: BTreeMap<InstallId, Reading>,
    trials: u64,
    off: Duration,
    removed: Vec<u64>,
    /// Installs asked to be measured again (phase change).
    again: BTreeSet<InstallId>,
}

impl Measuring {
    /// The code cache is gone (exec, exit): its installs are forgotten, the totals kept.
    pub(super) fn forget_installs(&mut self) {
        if let Some((_, t)) = self.current.take() {
            self.off += t.off_time;
        }
        self.judged.clear();
        self.checked.clear();
        self.again.clear();
    }

    pub(super) fn to_json(&self) -> MeasurementJson {
        let off = self.off
            + self
                .current
                .as_ref()
                .map_or(Duration::ZERO, |(_, t)| t.off_time);
        MeasurementJson {
            stub_off_ns: self.stub_off_ns.flatten(),
            trials: self.trials,
            off_ms: off.as_millis() as u64,
            removed: self.removed.clone(),
        }
    }
}

/// The process's CPU time (all its threads), in ns.
fn cpu_ns(pid: Pid) -> Option<u64> {
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

fn effect_json(v: &Verdict, time_ms: u64) -> EffectJson {
    let e = v.effect();
    let why = match (v, e) {
        (Verdict::TooFewPasses, _) => {
            "the dispatch site saw too few passes while it was measured".to_string()
        }
        (_, Some(e)) => format!(
            "{:.2}x native CPU time per pass ({:.2}..{:.2}), {} pairs of {} ms intervals{}",
            e.ratio,
            e.low,
            e.high,
            e.pairs,
            abtest::INTERVAL.as_millis(),
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
        why,
    }
}

fn unmeasured(time_ms: u64) -> EffectJson {
    EffectJson {
        verdict: "unmeasured".to_string(),
        ratio: None,
        low: None,
        high: None,
        pairs: 0,
        time_ms,
        why: "a variant passes its trigger address again inside itself (it loops back there, or follows several \
              passes in a row): those passes never reach the stub, so its count is no measure of the work done"
            .to_string(),
    }
}

impl Session {
    /// One step of measuring (called every event-loop turn; cheap when nothing is due).
    pub(super) fn measure(&mut self) {
        if !self.cfg.specialize {
            return;
        }
        let Some(rt) = self.rt.as_ref() else {
            return;
        };
        let pid = rt.pid;
        let now = Instant::now();
        let at = now.duration_since(self.time.start);
        let time_ms = at.as_millis() as u64;
        let Some(cpu) = cpu_ns(pid) else {
            return;
        };
        let reading = |passes: u64| Reading {
            at,
            cpu_ns: cpu,
            passes,
        };
        if let Some((id, mut trial)) = self.measuring.current.take() {
            let passes = match rt.cache.dispatch_passes(&self.tracer, id) {
                Ok(Some(p)) => p,
                // Invalidated or removed meanwhile: nothing left to measure.
                _ => {
                    self.measuring.off += trial.off_time;
                    return;
                }
            };
            let stub_off = self.measuring.stub_off_ns.flatten().unwrap_or(0.0);
            match trial.step(reading(passes), stub_off) {
                Step::Wait => self.measuring.current = Some((id, trial)),
                Step::Switch(on) => {
                    match rt.cache.set_enabled(id, on) {
                        Ok(true) => self.measuring.current = Some((id, trial)),
                        // Not switched on: a page its variants rely on may have changed (an invalidation is on
                        // its way); the trial ends and the stub is left to the guards.
                        _ => self.measuring.off += trial.off_time,
                    }
                }
                Step::Done(v) => {
                    self.measuring.off += trial.off_time;
                    self.finish_trial(id, &v, trial.on_rate(), time_ms);
                }
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
        let Some((id, revisits)) = next else {
            self.check_phases(&live, reading);
            return;
        };
        self.measuring.again.remove(&id);
        if revisits {
            self.measuring.judged.insert(id, None);
            if let Some(rt) = self.rt.as_mut() {
                rt.record_effect(id, unmeasured(time_ms));
            }
            return;
        }
        let Ok(Some(passes)) = rt.cache.dispatch_passes(&self.tracer, id) else {
            return;
        };
        if self.measuring.stub_off_ns.is_none() {
            self.measuring.stub_off_ns = Some(codecache::stub::calibrate::disabled_stub_ns());
        }
        self.measuring.trials += 1;
        self.measuring.current = Some((id, Trial::start(reading(passes))));
    }

    /// Record a verdict; remove the install when it loses.
    fn finish_trial(&mut self, id: InstallId, v: &Verdict, on_rate: Option<f64>, time_ms: u64) {
        let Some(rt) = self.rt.as_mut() else {
            return;
        };
        rt.record_effect(id, effect_json(v, time_ms));
        self.measuring.judged.insert(id, on_rate);
        if v.keeps() {
            // Switched on again (a refusal means an invalidation is under way: the guards decide).
            let _ = rt.cache.set_enabled(id, true);
            return;
        }
        match rt.remove_measured(&mut self.tracer, id) {
            Ok(ids) => {
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
            }
            // Left switched off (the stub only falls back) until the next try.
            Err(e) => {
                self.warn(format_args!("cannot remove a variant measured slower: {e}"));
                self.measuring.judged.remove(&id);
            }
        }
    }

    /// Now and then, compare each kept install's pass rate with the one it was measured at.
    fn check_phases(&mut self, live: &[(InstallId, bool)], reading: impl Fn(u64) -> Reading) {
        let Some(rt) = self.rt.as_ref() else {
            return;
        };
        for (id, _) in live {
            let Some(Some(measured)) = self.measuring.judged.get(id).copied() else {
                continue;
            };
            let Ok(Some(passes)) = rt.cache.dispatch_passes(&self.tracer, *id) else {
                continue;
            };
            let now = reading(passes);
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
