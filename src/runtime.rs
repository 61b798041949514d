//! The specializing half of a session: plan triggers from the profile, specialize, install, and keep the records
//! (variants, invalidations, timings) the report shows.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use codecache::{Cache, CacheError, Counters, InstallRequest, Invalidation, TargetMemory};
use nix::unistd::Pid;
use specializer::{score_trigger, Addr, Gpr, KnownState, Options, Request, TriggerCandidate};
use tracer::Tracer;

use crate::report::{Hex, InvalidationJson, RegionRefJson, TriggerRefJson, VariantJson};

/// Regions below this share of the samples are not worth a stub.
pub const MIN_SPECIALIZE_SHARE: f64 = 0.05;
/// Hot values specialized per trigger (one variant each).
pub const MAX_VALUES: usize = 8;
/// Trigger candidates scored per region (each costs one specialization per hot value).
const MAX_SCORED: usize = 6;
/// Candidates tried for installation per region when the best one cannot be patched.
const MAX_INSTALL_TRIES: usize = 3;
/// Installs per region over the whole run: after this many invalidations the region is left alone.
pub const MAX_INSTALLS_PER_REGION: u32 = 4;
/// A value must cover at least this share of its candidate's samples to get a variant of its own.
const MIN_VALUE_SHARE: f64 = 0.01;

/// A hot region and its trigger candidates (best first, from the value profile).
#[derive(Clone, Debug)]
pub struct RegionPlan {
    pub start: Addr,
    pub end: Addr,
    pub symbol: Option<String>,
    pub candidates: Vec<TriggerCandidate>,
}

/// What one planning round did.
#[derive(Debug, Default)]
pub struct PlanOutcome {
    pub installed: usize,
    /// One line per thing that went wrong (the code is left alone in each case).
    pub problems: Vec<String>,
}

/// Per-region bookkeeping.
#[derive(Debug, Default)]
struct RegionState {
    installs: u32,
    live: Option<codecache::InstallId>,
}

/// The code cache of the specialized process and everything the report needs from it.
pub struct Runtime {
    pub cache: Cache,
    pub pid: Pid,
    regions: HashMap<(u64, u64), RegionState>,
    symbols: HashMap<(u64, u64), Option<String>>,
    /// Invalidations so far, with their time since the session started.
    invalidations: Vec<InvalidationJson>,
    /// Last counters read from the target (the process may be gone when the report is written).
    counters: Counters,
    last_counters: Option<Instant>,
    pub specialize_time: Duration,
    pub install_time: Duration,
    pub first_install: Option<Instant>,
    /// Added to the cache's variant ids in the report, so ids stay unique across processes and execs.
    id_base: u64,
}

impl Runtime {
    /// A runtime for `pid`; its threads must be stopped (the guard set is created inside the target).
    pub fn new(tr: &mut Tracer, pid: Pid, id_base: u64) -> Result<Runtime, CacheError> {
        let cache = Cache::new(tr, pid)?;
        Ok(Runtime {
            pid: cache.pid(),
            cache,
            regions: HashMap::new(),
            symbols: HashMap::new(),
            invalidations: Vec::new(),
            counters: Counters::default(),
            last_counters: None,
            specialize_time: Duration::ZERO,
            install_time: Duration::ZERO,
            first_install: None,
            id_base,
        })
    }

    /// Whether any variant is installed and alive.
    pub fn has_live(&self) -> bool {
        self.regions.values().any(|r| r.live.is_some())
    }

    /// Regions that may still be (re)specialized.
    fn wants(&self, r: &RegionPlan) -> bool {
        match self.regions.get(&(r.start.0, r.end.0)) {
            None => true,
            Some(st) => st.live.is_none() && st.installs < MAX_INSTALLS_PER_REGION,
        }
    }

    /// Whether a planning round could install anything for these regions.
    pub fn wants_any(&self, regions: &[RegionPlan]) -> bool {
        regions.iter().any(|r| self.wants(r))
    }

    /// Score the candidates of every region that wants a stub, specialize the best trigger's hot values and
    /// install them. Threads run while specializing (the install compares page snapshots); they are stopped only
    /// for the install. Failures are reported in the outcome and leave the program's code unchanged.
    pub fn plan_and_install(
        &mut self,
        tr: &mut Tracer,
        regions: &[RegionPlan],
        constant: &BTreeSet<Addr>,
    ) -> PlanOutcome {
        let mut out = PlanOutcome::default();
        for r in regions {
            if !self.wants(r) {
                continue;
            }
            self.symbols.insert((r.start.0, r.end.0), r.symbol.clone());
            match self.plan_region(tr, r, constant) {
                Ok(true) => out.installed += 1,
                Ok(false) => {}
                Err(e) => out.problems.push(format!(
                    "not specializing {}: {e}",
                    r.symbol.clone().unwrap_or_else(|| r.start.to_string())
                )),
            }
        }
        out
    }

    fn options(r: &RegionPlan, entry: Addr) -> Options {
        Options {
            // Caller-saved scratch registers are free only when the variant is a whole function entered at its start.
            scratch_registers: entry == r.start && r.symbol.is_some(),
            ..Options::default()
        }
    }

    /// Returns Ok(true) when something was installed, Ok(false) when nothing was worth it.
    fn plan_region(
        &mut self,
        tr: &mut Tracer,
        r: &RegionPlan,
        constant: &BTreeSet<Addr>,
    ) -> Result<bool, String> {
        let t0 = Instant::now();
        let mut scored: Vec<(f64, TriggerCandidate, Vec<u64>)> = Vec::new();
        {
            let mut mem =
                TargetMemory::new(tr, self.pid, Some(&self.cache)).map_err(|e| e.to_string())?;
            mem.allow(constant.iter().copied());
            for c in r.candidates.iter().take(MAX_SCORED) {
                if c.address < r.start || c.address >= r.end {
                    continue;
                }
                let opts = Self::options(r, c.address);
                let s = score_trigger(r.start, r.end, c, &mem, &opts);
                let good: Vec<u64> = s
                    .per_value
                    .iter()
                    .filter(|v| v.ok && v.folded > 0)
                    .map(|v| v.value)
                    .collect();
                if s.benefit > 0.0 && !good.is_empty() {
                    scored.push((s.benefit, c.clone(), good));
                }
            }
        }
        self.specialize_time += t0.elapsed();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        if scored.is_empty() {
            return Ok(false);
        }
        let mut last_err = String::new();
        for (_, cand, values) in scored.into_iter().take(MAX_INSTALL_TRIES) {
            match self.install_candidate(tr, r, constant, &cand, &values) {
                Ok(()) => return Ok(true),
                Err(e) => last_err = e,
            }
        }
        Err(last_err)
    }

    fn install_candidate(
        &mut self,
        tr: &mut Tracer,
        r: &RegionPlan,
        constant: &BTreeSet<Addr>,
        cand: &TriggerCandidate,
        values: &[u64],
    ) -> Result<(), String> {
        let t0 = Instant::now();
        let opts = Self::options(r, cand.address);
        let (variants, snapshots) = {
            let mut mem =
                TargetMemory::new(tr, self.pid, Some(&self.cache)).map_err(|e| e.to_string())?;
            mem.allow(constant.iter().copied());
            let mut variants = Vec::new();
            for &v in values {
                let mut known = KnownState::default();
                known.set_reg(cand.register, Some(v));
                let req = Request {
                    entry: cand.address,
                    region_start: r.start,
                    region_end: r.end,
                    known,
                    options: opts.clone(),
                };
                if let Ok(var) = specializer::specialize(&req, &mem) {
                    if var.stats.folded > 0 {
                        variants.push((Some(v), var));
                    }
                }
            }
            (variants, mem.snapshots())
        };
        self.specialize_time += t0.elapsed();
        if variants.is_empty() {
            return Err("no hot value specialized".into());
        }
        let t1 = Instant::now();
        let result = (|| -> Result<codecache::InstallId, String> {
            self.cache
                .stop_all(tr)
                .map_err(|e| format!("cannot stop the target: {e}"))?;
            let res = self
                .cache
                .install(
                    tr,
                    InstallRequest {
                        trigger: cand.address,
                        register: Some(cand.register),
                        region: (r.start, r.end),
                        variants,
                        snapshots,
                    },
                )
                .map_err(|e| format!("install at {}: {e}", cand.address));
            // Resume whatever happened: the program must go on.
            let resumed = tr.resume_all();
            let id = res?;
            resumed.map_err(|e| format!("cannot resume the target: {e}"))?;
            Ok(id)
        })();
        self.install_time += t1.elapsed();
        let id = result?;
        let st = self.regions.entry((r.start.0, r.end.0)).or_default();
        st.installs += 1;
        st.live = Some(id);
        self.first_install.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Record invalidations (the regions whose variants all died may be specialized again).
    pub fn record_invalidations(&mut self, invs: &[Invalidation], since: Instant) {
        let ms = since.elapsed().as_millis() as u64;
        for inv in invs {
            self.invalidations.push(InvalidationJson {
                page: Hex(inv.page.0),
                time_ms: ms,
                variants: inv.variants.iter().map(|v| self.id_base + v.0).collect(),
            });
        }
        let infos = self.cache.variants();
        for st in self.regions.values_mut() {
            if let Some(id) = st.live {
                if !infos.iter().any(|v| v.install == id && v.alive) {
                    st.live = None;
                }
            }
        }
    }

    /// Read the entry counters now and then (they are gone with the process).
    pub fn refresh_counters(&mut self, tr: &Tracer, every: Duration) {
        if self.cache.variants().is_empty() {
            return;
        }
        if self.last_counters.is_some_and(|t| t.elapsed() < every) {
            return;
        }
        if let Ok(c) = self.cache.counters(tr) {
            self.counters = c;
        }
        self.last_counters = Some(Instant::now());
    }

    /// Read the counters right away (before uninstalling or forgetting).
    pub fn read_counters(&mut self, tr: &Tracer) {
        self.last_counters = None;
        self.refresh_counters(tr, Duration::ZERO);
    }

    /// The report's view of every variant installed so far.
    pub fn variants_json(&self) -> Vec<VariantJson> {
        self.cache
            .variants()
            .into_iter()
            .map(|v| VariantJson {
                id: self.id_base + v.id.0,
                region: RegionRefJson {
                    start: Hex(v.region.0 .0),
                    end: Hex(v.region.1 .0),
                    symbol: self
                        .symbols
                        .get(&(v.region.0 .0, v.region.1 .0))
                        .cloned()
                        .flatten(),
                },
                trigger: v.register.map(|g| TriggerRefJson {
                    address: Hex(v.trigger.0),
                    register: g.name().to_string(),
                }),
                value: v.value.map(Hex),
                code_bytes: v.code_bytes as u64,
                folded: v.folded as u64,
                residual: v.residual as u64,
                guard_pages: v.guard_pages.iter().map(|p| Hex(p.0)).collect(),
                entries: self.counters.entries.get(&v.id).copied().unwrap_or(0),
                invalidated: !v.alive,
            })
            .collect()
    }

    /// Invalidations so far.
    pub fn invalidations_json(&self) -> Vec<InvalidationJson> {
        self.invalidations.clone()
    }
}

/// Trigger candidates from the profile's report view of a region: register names resolved, hot values as
/// (value, samples), rare values dropped, at most [`MAX_VALUES`].
pub fn candidates_of(triggers: &[crate::report::TriggerJson]) -> Vec<TriggerCandidate> {
    triggers
        .iter()
        .filter_map(|t| {
            let register = Gpr::from_name(&t.register)?;
            if register == Gpr::Rsp {
                return None;
            }
            let values: Vec<(u64, u64)> = t
                .top_values
                .iter()
                .filter(|v| v.share >= MIN_VALUE_SHARE)
                .take(MAX_VALUES)
                .map(|v| {
                    (
                        v.value.0,
                        ((v.share * t.samples as f64).round() as u64).max(1),
                    )
                })
                .collect();
            if values.is_empty() {
                return None;
            }
            Some(TriggerCandidate {
                address: Addr(t.address.0),
                register,
                values,
            })
        })
        .collect()
}

/// Pages the store profile saw watched but never written: constant as long as they are guarded.
pub fn constant_pages(watched: &[Hex], written: &[Hex]) -> BTreeSet<Addr> {
    let written: BTreeSet<u64> = written.iter().map(|h| h.0).collect();
    watched
        .iter()
        .filter(|h| !written.contains(&h.0))
        .map(|h| Addr(h.0).page())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{TopValueJson, TriggerJson};

    #[test]
    fn candidates_resolve_registers_and_cap_values() {
        let t = TriggerJson {
            address: Hex(0x1000),
            register: "rax".into(),
            samples: 1000,
            distinct: 20,
            coverage: 1.0,
            top_values: (0..20)
                .map(|i| TopValueJson {
                    value: Hex(0x5000 + i),
                    share: if i < 10 { 0.09 } else { 0.001 },
                })
                .collect(),
        };
        let bad = TriggerJson {
            register: "xmm0".into(),
            ..t.clone()
        };
        let c = candidates_of(&[t, bad]);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].register, Gpr::Rax);
        assert_eq!(c[0].values.len(), MAX_VALUES);
        assert_eq!(c[0].values[0], (0x5000, 90));
    }

    #[test]
    fn constant_pages_are_watched_minus_written() {
        let c = constant_pages(&[Hex(0x1000), Hex(0x2000), Hex(0x3000)], &[Hex(0x2000)]);
        assert_eq!(
            c.into_iter().collect::<Vec<_>>(),
            vec![Addr(0x1000), Addr(0x3000)]
        );
    }
}
