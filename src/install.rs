//! Installing: carry a plan out in the target. Compile the chosen candidates' variants, install them behind a
//! dispatch stub with the world stopped, and keep the records (variants, invalidations, timings) the report shows.
//!
//! What to specialize is decided in [`crate::plan`]; this module owns the code cache of the specialized process
//! and everything that touches it.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use codecache::{Cache, CacheError, Counters, InstallRequest, Invalidation, TargetMemory};
use nix::unistd::Pid;
use specializer::Addr;
use tracer::{Stopped, Tracer};

use crate::metric::{Metric, Site};
use crate::plan::{
    self, Forwarding, Reason, RegionHistory, RegionNote, RegionPlan, Scored, Specialized,
    TriggerCandidate,
};
use crate::report::{
    code, CodeLineJson, EffectJson, Hex, InvalidationJson, OriginalLineJson, RegionRefJson,
    TriggerRefJson, VariantJson, MAX_ASM_LINES,
};

/// What one planning round did.
#[derive(Debug, Default)]
pub struct PlanOutcome {
    pub installed: usize,
    /// One line per thing that went wrong (the code is left alone in each case).
    pub problems: Vec<String>,
    /// What was decided for each region, and why.
    pub notes: Vec<RegionNote>,
}

/// Whether two processes may share one address space: yes when kcmp cannot tell, so forwarding stays off.
pub fn shares_vm(a: Pid, b: Pid) -> bool {
    tracer::same_address_space(a, b) != Some(false)
}

/// Per-region bookkeeping.
#[derive(Debug, Default)]
struct RegionState {
    installs: u32,
    live: Option<codecache::InstallId>,
    /// The trigger of the live install.
    live_trigger: Option<TriggerCandidate>,
    /// Triggers whose variants were measured slower and removed.
    lost: Vec<TriggerCandidate>,
}

impl RegionState {
    fn history(&self) -> RegionHistory {
        RegionHistory {
            installs: self.installs,
            live: self.live.is_some(),
            lost: self.lost.len() >= plan::MAX_LOST_TRIGGERS,
        }
    }
}

/// The code cache of the specialized process and everything the report needs from it.
pub struct Installer {
    pub cache: Cache,
    pub pid: Pid,
    regions: HashMap<(Addr, Addr), RegionState>,
    symbols: HashMap<(Addr, Addr), Option<String>>,
    /// Invalidations so far, with their time since the session started.
    invalidations: Vec<InvalidationJson>,
    /// Last counters read from the target (the process may be gone when the report is written).
    counters: Counters,
    last_counters: Option<Instant>,
    pub specialize_time: Duration,
    /// Candidates rejected in earlier rounds (not specialized again on the same inputs).
    rejections: plan::Rejections,
    pub install_time: Duration,
    pub first_install: Option<Instant>,
    /// Added to the cache's variant ids in the report, so ids stay unique across processes and execs.
    id_base: u64,
    /// Variants may forward stored values (see [`Installer::forwarding`]); false for good once a second thread
    /// appeared.
    forwarding_allowed: bool,
    /// Live installs whose variants forward stored values.
    forwarding_installs: BTreeSet<codecache::InstallId>,
    /// Every install that forwarded stored values (for the report).
    forwarding_ever: BTreeSet<codecache::InstallId>,
    /// Each installed variant's code listings (for the report).
    listings: HashMap<codecache::VariantId, Listings>,
    /// When each variant was installed.
    installed_at: HashMap<codecache::VariantId, Instant>,
    /// How each install's work is counted when it is measured (see [`Unit`]).
    units: HashMap<codecache::InstallId, Unit>,
    /// What measuring each install found (the latest verdict).
    effects: HashMap<codecache::InstallId, EffectJson>,
    /// The user's unit of work (`--metric`), and where it was last found (or why not).
    metric: Option<Metric>,
    metric_site: Option<Result<Site, String>>,
}

/// A variant's code as the report shows it, each list at most [`MAX_ASM_LINES`] long.
#[derive(Clone, Debug, Default)]
struct Listings {
    asm: Vec<String>,
    code: Vec<CodeLineJson>,
    original: Vec<OriginalLineJson>,
}

impl Listings {
    fn of(v: &specializer::Variant) -> Listings {
        let lines = v.listing();
        Listings {
            asm: lines
                .iter()
                .take(MAX_ASM_LINES)
                .map(|l| l.asm.clone())
                .collect(),
            code: code::code_json(&lines, MAX_ASM_LINES),
            original: code::original_json(&v.original_listing(), MAX_ASM_LINES),
        }
    }
}

impl Installer {
    /// A runtime for `pid`; its threads must be stopped (the guard set is created inside the target).
    pub fn new(tr: &mut Tracer, pid: Pid, id_base: u64) -> Result<Installer, CacheError> {
        let cache = Cache::new(tr, pid)?;
        Ok(Installer {
            pid: cache.pid(),
            cache,
            regions: HashMap::new(),
            symbols: HashMap::new(),
            invalidations: Vec::new(),
            counters: Counters::default(),
            last_counters: None,
            specialize_time: Duration::ZERO,
            rejections: plan::Rejections::default(),
            install_time: Duration::ZERO,
            first_install: None,
            id_base,
            forwarding_allowed: true,
            forwarding_installs: BTreeSet::new(),
            forwarding_ever: BTreeSet::new(),
            listings: HashMap::new(),
            installed_at: HashMap::new(),
            units: HashMap::new(),
            effects: HashMap::new(),
            metric: None,
            metric_site: None,
        })
    }

    /// Measure installs by the user's unit of work from now on.
    pub fn set_metric(&mut self, metric: Option<Metric>) {
        self.metric = metric;
        self.metric_site = None;
    }

    /// Where the user's metric counts: looked up in the program's modules until found (a library it names may
    /// be loaded later).
    fn metric_site(&mut self) -> Option<Site> {
        let metric = self.metric.as_ref()?;
        if !matches!(self.metric_site, Some(Ok(_))) {
            let found = tracer::symbols::modules(self.pid)
                .map_err(|e| e.to_string())
                .and_then(|mods| metric.resolve(&mods));
            self.metric_site = Some(found);
        }
        self.metric_site.as_ref()?.as_ref().ok().copied()
    }

    /// Why the user's metric is not used, once an install looked for it and did not find it.
    pub fn metric_problem(&self) -> Option<String> {
        self.metric.as_ref()?;
        match self.metric_site.as_ref()? {
            Ok(_) => None,
            Err(e) => Some(e.clone()),
        }
    }

    /// Whether any variant is installed and alive.
    pub fn has_live(&self) -> bool {
        self.regions.values().any(|r| r.live.is_some())
    }

    /// Regions with live variants.
    pub fn live_regions(&self) -> usize {
        self.regions.values().filter(|r| r.live.is_some()).count()
    }

    /// Regions that may still be (re)specialized.
    pub fn wants(&self, r: &RegionPlan) -> bool {
        plan::wants(
            self.regions
                .get(&(r.start, r.end))
                .map(RegionState::history)
                .as_ref(),
        )
    }

    /// Whether the region never had variants installed (hot code new to the planner).
    pub fn is_new(&self, r: &RegionPlan) -> bool {
        !self.regions.contains_key(&(r.start, r.end))
    }

    /// The note for a region this round does not plan (its variants are live, or it was invalidated too often);
    /// None when it is planned.
    pub fn skipped_note(&self, r: &RegionPlan) -> Option<RegionNote> {
        let history = self
            .regions
            .get(&(r.start, r.end))
            .map(RegionState::history)?;
        if plan::wants(Some(&history)) {
            return None;
        }
        let reason = if history.live {
            Reason::Live
        } else if history.lost {
            Reason::MeasuredSlower
        } else {
            Reason::Exhausted {
                installs: history.installs,
            }
        };
        Some(r.note(r.rejected.clone(), Some(reason)))
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
            if let Some(note) = self.skipped_note(r) {
                out.notes.push(note);
                continue;
            }
            self.symbols.insert((r.start, r.end), r.symbol.clone());
            let (result, note) = self.plan_region(tr, r, constant);
            match result {
                Ok(true) => out.installed += 1,
                Ok(false) => {}
                Err(e) => out.problems.push(format!(
                    "not specializing {}: {e}",
                    r.symbol.clone().unwrap_or_else(|| r.start.to_string())
                )),
            }
            out.notes.push(note);
        }
        out
    }

    /// Where the variants planned now may forward stored values (`Options::forward_within`): the process's
    /// private writable mappings, while it has exactly one thread and has never had another since forwarding
    /// was first used; `None` otherwise. Another thread (or a process sharing the memory) could write a slot
    /// between the variant's store and its reuse; signal handlers are covered by [`Installer::evacuate`].
    fn forwarding(&self, tr: &Tracer) -> Forwarding {
        if !self.forwarding_allowed || tr.threads(self.pid).len() != 1 {
            return None;
        }
        // A process created with CLONE_VM (not a thread, so not counted above) writes the same memory.
        if tr
            .processes()
            .into_iter()
            .any(|p| p != self.pid && shares_vm(self.pid, p))
        {
            return None;
        }
        let maps = tracer::maps::read_maps(self.pid).ok()?;
        let ranges: Vec<(Addr, Addr)> = maps
            .iter()
            .filter(|m| m.write && !m.shared)
            .map(|m| (m.start, m.end))
            .collect();
        Some(ranges)
    }

    /// Whether variants that forward stored values are installed.
    pub fn forwards(&self) -> bool {
        !self.forwarding_installs.is_empty()
    }

    /// Before a signal handler runs on `tid` (stopped): move it out of variants that forward stored values, so
    /// what the handler writes is seen when the thread continues. Returns whether it was moved.
    pub fn evacuate(&self, tr: &mut Tracer, tid: Pid) -> Result<bool, CacheError> {
        if self.forwarding_installs.is_empty() || tr.tgid(tid) != Some(self.pid) {
            return Ok(false);
        }
        self.cache.evacuate(tr, tid, &self.forwarding_installs)
    }

    /// The process got a second thread (or shares its memory with another process): remove every install whose
    /// variants forward stored values (threads stopped) and never forward again in this process. The regions
    /// are planned again without forwarding. Returns how many installs were removed.
    pub fn drop_forwarding(&mut self, tr: &mut Stopped<'_>) -> Result<usize, CacheError> {
        self.forwarding_allowed = false;
        let ids = std::mem::take(&mut self.forwarding_installs);
        for id in &ids {
            self.cache.uninstall(tr, *id)?;
        }
        for st in self.regions.values_mut() {
            if st.live.is_some_and(|l| ids.contains(&l)) {
                st.live = None;
            }
        }
        Ok(ids.len())
    }

    /// Returns Ok(true) when something was installed, Ok(false) when nothing was worth it; and the region's note
    /// for the report (what each candidate folded, what was decided and why).
    fn plan_region(
        &mut self,
        tr: &mut Tracer,
        r: &RegionPlan,
        constant: &BTreeSet<Addr>,
    ) -> (Result<bool, InstallError>, RegionNote) {
        let t0 = Instant::now();
        // Triggers measured slower before are not tried again; the runners-up are.
        let lost = self
            .regions
            .get(&(r.start, r.end))
            .map(|st| st.lost.clone())
            .unwrap_or_default();
        let (kept, lost_notes) = plan::without_lost(r, &lost);
        let r = &kept;
        let forward = self.forwarding(tr);
        let arenas = self.cache.arena_ranges();
        if arenas.iter().any(|(s, e)| r.start.0 < *e && *s < r.end.0) {
            // Our own code: never specialize a variant.
            return (Ok(false), r.note(Vec::new(), Some(Reason::OwnCode)));
        }
        let mem = TargetMemory::new(tr, self.pid, Some(&self.cache));
        let (scored, mut notes, snapshots) = match mem {
            Ok(mut mem) => {
                mem.allow(constant.iter().copied());
                self.rejections.trust(constant);
                let (scored, notes) =
                    plan::score_region(&mem, r, &forward, t0, &mut self.rejections);
                (scored, notes, mem.snapshots())
            }
            Err(e) => {
                let reason = Reason::InstallFailed(e.to_string());
                return (
                    Err(InstallError::Memory(e)),
                    r.note(r.rejected.clone(), Some(reason)),
                );
            }
        };
        self.specialize_time += t0.elapsed();
        notes.extend(lost_notes);
        let (best, best_samples) = scored
            .first()
            .map(|s| (s.estimate, s.candidate.samples))
            .unwrap_or((0.0, 0));
        let mut installed: Option<(Addr, specializer::Gpr)> = None;
        let mut last_err = None;
        let mut tried: Vec<(Addr, specializer::Gpr, Reason)> = Vec::new();
        for Scored {
            candidate: cand,
            specialized: variants,
            ..
        } in scored.into_iter().take(plan::MAX_INSTALL_TRIES)
        {
            let loops = variants
                .variants
                .iter()
                .any(|(_, v)| v.revisits(cand.address));
            if !plan::worth_trying_after_losses(loops, lost.len()) {
                tried.push((
                    cand.address,
                    cand.register,
                    Reason::ExitsEveryPassAfterALoss,
                ));
                continue;
            }
            let took = variants.took;
            let result = match self.install_candidate(tr, r, &cand, variants, snapshots.clone()) {
                Err(e) if e.page_changed() => {
                    // A page changed between reading and guarding it (it is being written right now): specialize
                    // again, so the guard covers exactly what was read. With the threads stopped only when that
                    // costs the program little: the stopped world is the program's time (an 11 KB variant of a
                    // stock Lua's interpreter loop took 200 ms to specialize, 8-12% of the run).
                    let retry = if took <= STOPPED_SPECIALIZE_MAX {
                        self.install_stopped(tr, r, &cand, constant)
                    } else {
                        self.install_respecialized(tr, r, &cand, constant)
                    };
                    retry.map_err(|retry| InstallError::Retried {
                        first: Box::new(e),
                        retry: Box::new(retry),
                    })
                }
                other => other,
            };
            match result {
                Ok(()) => {
                    installed = Some((cand.address, cand.register));
                    break;
                }
                Err(e) => {
                    tried.push((
                        cand.address,
                        cand.register,
                        Reason::InstallFailed(e.to_string()),
                    ));
                    last_err = Some(e);
                }
            }
        }
        // Every scored candidate's decision: installed, install failed, or a better one won.
        for n in notes.iter_mut().filter(|n| n.reason.is_none()) {
            let key = (n.address, n.register);
            n.reason = if installed == Some(key) {
                None
            } else if let Some((_, _, why)) = tried.iter().find(|t| (t.0, t.1) == key) {
                Some(why.clone())
            } else if installed.is_some() {
                let estimate = n.estimate.unwrap_or(0.0);
                Some(
                    if plan::within_noise(estimate, n.samples, best, best_samples) {
                        Reason::NearTie {
                            estimate,
                            chosen: best,
                        }
                    } else {
                        Reason::LowerBenefit { estimate, best }
                    },
                )
            } else {
                Some(Reason::NotTried)
            };
        }
        let region_reason = if installed.is_some() {
            None
        } else {
            // The best-ranked candidate's reason speaks for the region.
            let best_note = notes
                .iter()
                .filter(|n| n.estimate.is_some())
                .chain(notes.iter())
                .next();
            Some(
                best_note
                    .and_then(|n| n.reason.clone())
                    .unwrap_or(Reason::NoPredictableValue),
            )
        };
        notes.extend(r.rejected.iter().cloned());
        let note = r.note(notes, region_reason);
        let result = match (installed, last_err) {
            (Some(_), _) => Ok(true),
            (None, Some(e)) => Err(e),
            (None, None) => Ok(false),
        };
        (result, note)
    }

    /// Stop the threads, specialize `cand` and install it before they run again. The snapshots still go with
    /// the request: when the install must let the threads run on and stop them again (one stopped inside the
    /// patch site), what they wrote meanwhile must fail the install, not be covered by a guard set too late
    /// (selfmod_interp: variants folding an immediate its program had rewritten 28 times since, 1 run in 8).
    /// Values left when [`STOPPED_SPECIALIZE_MAX`] has passed are not specialized (the threads wait meanwhile).
    fn install_stopped(
        &mut self,
        tr: &mut Tracer,
        r: &RegionPlan,
        cand: &TriggerCandidate,
        constant: &BTreeSet<Addr>,
    ) -> Result<(), InstallError> {
        let t0 = Instant::now();
        let world = self.cache.stop_all(tr).map_err(InstallError::Stop)?;
        let specialized =
            self.specialize_one(&world, r, cand, constant, t0 + STOPPED_SPECIALIZE_MAX);
        // The program waited for this specialization as it waits for an install.
        self.install_time += t0.elapsed();
        // Dropping the world on this return resumes the threads.
        let (variants, snapshots) = specialized?;
        // The threads stay stopped into the install (which finds them stopped), so what was read is what is
        // guarded; the install resumes them.
        world.keep_stopped();
        self.install_candidate(tr, r, cand, variants, snapshots)
    }

    /// Specialize `cand` again while the program runs, and install it if what it read is still what the
    /// program's memory holds: for a candidate too costly to specialize with the threads stopped.
    fn install_respecialized(
        &mut self,
        tr: &mut Tracer,
        r: &RegionPlan,
        cand: &TriggerCandidate,
        constant: &BTreeSet<Addr>,
    ) -> Result<(), InstallError> {
        let (variants, snapshots) =
            self.specialize_one(tr, r, cand, constant, Instant::now() + plan::PLAN_BUDGET)?;
        self.install_candidate(tr, r, cand, variants, snapshots)
    }

    /// Specialize every hot value of `cand` (none started after `deadline`) on the target's memory as it is
    /// now, with the snapshots of the pages read.
    fn specialize_one(
        &mut self,
        tr: &Tracer,
        r: &RegionPlan,
        cand: &TriggerCandidate,
        constant: &BTreeSet<Addr>,
        deadline: Instant,
    ) -> Result<(Specialized, Snapshots), InstallError> {
        let t0 = Instant::now();
        let forward = self.forwarding(tr);
        let specialized = TargetMemory::new(tr, self.pid, Some(&self.cache)).map(|mut mem| {
            mem.allow(constant.iter().copied());
            let consts = plan::region_constants(&mem, r);
            let v = plan::specialize_candidate(&mem, r, cand, &consts, &forward, deadline).1;
            (v, mem.snapshots())
        });
        self.specialize_time += t0.elapsed();
        match specialized {
            Ok((v, s)) if !v.variants.is_empty() => Ok((v, s)),
            Ok(_) => Err(InstallError::NothingWorthIt),
            Err(e) => Err(InstallError::Memory(e)),
        }
    }

    /// Install `variants` of `cand` with the world stopped, and record the install.
    fn install_candidate(
        &mut self,
        tr: &mut Tracer,
        r: &RegionPlan,
        cand: &TriggerCandidate,
        variants: Specialized,
        snapshots: Snapshots,
    ) -> Result<(), InstallError> {
        let t1 = Instant::now();
        let result = self.install_stopped_world(tr, r, cand, variants, snapshots);
        self.install_time += t1.elapsed();
        let id = result?;
        let st = self.regions.entry((r.start, r.end)).or_default();
        st.installs += 1;
        st.live = Some(id);
        st.live_trigger = Some(cand.clone());
        self.first_install.get_or_insert_with(Instant::now);
        Ok(())
    }

    /// Stop the world, install, resume whatever happened (the program must go on).
    fn install_stopped_world(
        &mut self,
        tr: &mut Tracer,
        r: &RegionPlan,
        cand: &TriggerCandidate,
        variants: Specialized,
        snapshots: Snapshots,
    ) -> Result<codecache::InstallId, InstallError> {
        let forwards = variants.forwards;
        let metric = self.metric_site();
        let unit = unit_of(r, cand.address, &variants.variants, metric);
        // Formatted before the world stops: the program should not wait for the report's listings.
        let listings: Vec<(Option<u64>, Listings)> = variants
            .variants
            .iter()
            .map(|(value, v)| (*value, Listings::of(v)))
            .collect();
        let mut tries = 0;
        let (id, world) = loop {
            let mut world = self.cache.stop_all(tr).map_err(InstallError::Stop)?;
            // A thread that is not stopped (one exiting may slip through stop_all) makes Cache::install fail with
            // CacheError::NotStopped before it changes anything (ARCHITECTURE.md invariant 6).
            let threads = world.threads(self.pid).len();
            if threads == 0 {
                return Err(InstallError::Exited);
            }
            if forwards && threads != 1 {
                // A thread appeared since planning: its event (handled next) would remove the install anyway.
                return Err(InstallError::ThreadAppeared);
            }
            let request = InstallRequest {
                trigger: cand.address,
                register: Some(cand.register),
                assumed: variants.assumed.clone(),
                region: (r.start, r.end),
                variants: variants.variants.clone(),
                snapshots: snapshots.clone(),
            };
            match self.cache.install(&mut world, request) {
                Ok(id) => break (id, world),
                // A thread stopped between the instructions the patch replaces (the hotter the site, the likelier,
                // and several threads running it make it likelier still): let it run on and stop again, rather
                // than give the site up for a worse candidate.
                Err(CacheError::ThreadInsidePatch { .. }) if tries < MAX_PATCH_TRIES => {
                    tries += 1;
                    world.resume().map_err(InstallError::Resume)?;
                    std::thread::sleep(PATCH_RETRY_PAUSE);
                }
                Err(source) => {
                    return Err(InstallError::Install {
                        at: cand.address,
                        source,
                    })
                }
            }
        };
        for info in self
            .cache
            .variants()
            .into_iter()
            .filter(|i| i.install == id)
        {
            if let Some((_, l)) = listings.iter().find(|(v, _)| *v == info.value) {
                self.listings.insert(info.id, l.clone());
            }
            self.installed_at.insert(info.id, Instant::now());
        }
        self.units.insert(id, unit);
        if forwards {
            self.forwarding_installs.insert(id);
            self.forwarding_ever.insert(id);
        }
        world.resume().map_err(InstallError::Resume)?;
        Ok(id)
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

    /// The report's view of every variant installed so far (`since`: the session's start).
    pub fn variants_json(&self, since: Instant) -> Vec<VariantJson> {
        self.cache
            .variants()
            .into_iter()
            .map(|v| (self.listing(v.id), v))
            .map(|(l, v)| VariantJson {
                id: self.id_base + v.id.0,
                region: RegionRefJson {
                    start: Hex(v.region.0 .0),
                    end: Hex(v.region.1 .0),
                    symbol: self.symbols.get(&v.region).cloned().flatten(),
                },
                trigger: v.register.map(|g| TriggerRefJson {
                    address: Hex(v.trigger.0),
                    register: g.name().to_string(),
                }),
                value: v.value.map(Hex),
                code_bytes: v.code_bytes as u64,
                code_address: Some(Hex(v.base.0)),
                folded: v.folded as u64,
                residual: v.residual as u64,
                guard_pages: v.guard_pages.iter().map(|p| Hex(p.0)).collect(),
                entries: self.counters.entries.get(&v.id).copied().unwrap_or(0),
                invalidated: !v.alive,
                forwards_stores: self.forwarding_ever.contains(&v.install),
                asm: l.asm,
                code: l.code,
                original: l.original,
                effect: self.effects.get(&v.install).cloned(),
                installed_ms: self
                    .installed_at
                    .get(&v.id)
                    .map(|t| t.saturating_duration_since(since).as_millis() as u64),
            })
            .collect()
    }

    fn listing(&self, id: codecache::VariantId) -> Listings {
        self.listings.get(&id).cloned().unwrap_or_default()
    }

    /// Live installs, each with how its work is counted.
    pub fn live_installs(&self) -> Vec<(codecache::InstallId, Unit)> {
        self.regions
            .values()
            .filter_map(|r| r.live)
            .map(|id| (id, self.units.get(&id).copied().unwrap_or(Unit::None)))
            .collect()
    }

    /// Install a counting stub at `site` for a measurement (threads stopped here; a thread caught inside the
    /// bytes the patch replaces is let run on and the install retried, as for variants).
    pub fn install_counter(
        &mut self,
        tr: &mut Tracer,
        site: Addr,
        region: (Addr, Addr),
    ) -> Result<codecache::InstallId, CacheError> {
        let mut tries = 0;
        loop {
            let mut world = self.cache.stop_all(tr)?;
            match self.cache.install_counter(&mut world, site, region) {
                Err(CacheError::ThreadInsidePatch { .. }) if tries < MAX_PATCH_TRIES => {
                    tries += 1;
                    drop(world);
                    std::thread::sleep(PATCH_RETRY_PAUSE);
                }
                other => return other,
            }
        }
    }

    /// Remove a counting stub (threads stopped here).
    pub fn remove_counter(
        &mut self,
        tr: &mut Tracer,
        id: codecache::InstallId,
    ) -> Result<(), CacheError> {
        let mut world = self.cache.stop_all(tr)?;
        self.cache.uninstall(&mut world, id).map(|_| ())
    }

    /// Record what measuring install `id` found.
    pub fn record_effect(&mut self, id: codecache::InstallId, effect: EffectJson) {
        self.effects.insert(id, effect);
    }

    /// Remove install `id`, measured slower than the original code (threads stopped here, moved out of its
    /// variants); its trigger is not planned again. Returns the report ids of the variants removed, and whether
    /// its region may still be planned with another trigger.
    pub fn remove_measured(
        &mut self,
        tr: &mut Tracer,
        id: codecache::InstallId,
    ) -> Result<(Vec<u64>, bool), CacheError> {
        self.read_counters(tr);
        let mut world = self.cache.stop_all(tr)?;
        let dead = self.cache.uninstall(&mut world, id);
        drop(world);
        let dead = dead?;
        self.forwarding_installs.remove(&id);
        let mut again = false;
        for st in self.regions.values_mut() {
            if st.live == Some(id) {
                st.live = None;
                st.lost.extend(st.live_trigger.take());
                again |= plan::wants(Some(&st.history()));
            }
        }
        Ok((dead.iter().map(|v| self.id_base + v.0).collect(), again))
    }

    /// Invalidations so far.
    pub fn invalidations_json(&self) -> Vec<InvalidationJson> {
        self.invalidations.clone()
    }
}

type Snapshots = std::collections::BTreeMap<Addr, Vec<u8>>;

/// What measuring an install counts as its unit of work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Passes through its dispatch site: every pass reaches the stub (the variants never pass the trigger
    /// again inside themselves).
    Passes,
    /// Calls of the function around it, counted by a counting stub at its entry (`site`, in `region`) while it
    /// is measured: its variants pass the trigger inside themselves, but never the function's entry. Or, with
    /// `metric`, passes through the user's `--metric` site.
    Calls {
        site: Addr,
        region: (Addr, Addr),
        metric: bool,
    },
    /// Neither applies.
    None,
}

/// How an install of `variants` at `trigger` in region `r` is measured: by calls at the user's `--metric` site
/// when it has one that no variant covers (the user said what a unit of work is); else by its own passes when
/// no variant passes the trigger again; else by calls of the function when the region is a whole function (from
/// symbols or `.eh_frame`) whose entry is not the trigger and no variant covers it.
fn unit_of(
    r: &RegionPlan,
    trigger: Addr,
    variants: &[(Option<u64>, specializer::Variant)],
    metric: Option<Site>,
) -> Unit {
    let uncovered = |a: Addr| a != trigger && !variants.iter().any(|(_, v)| v.covers(a));
    if let Some(site) = metric.filter(|s| uncovered(s.at)) {
        return Unit::Calls {
            site: site.at,
            region: site.function,
            metric: true,
        };
    }
    if !variants.iter().any(|(_, v)| v.revisits(trigger)) {
        return Unit::Passes;
    }
    if r.symbol.is_some() && uncovered(r.start) {
        return Unit::Calls {
            site: r.start,
            region: (r.start, r.end),
            metric: false,
        };
    }
    Unit::None
}

/// Longest a candidate's specialization may have taken for it to be specialized again with the threads stopped
/// (and the longest such a stopped specialization runs): the program waits for it.
const STOPPED_SPECIALIZE_MAX: std::time::Duration = std::time::Duration::from_millis(10);
/// Stops of the world an install tries while a thread sits inside the bytes its patch replaces.
const MAX_PATCH_TRIES: u32 = 8;
/// How long the threads run between those tries.
const PATCH_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_micros(300);

/// Why a planned candidate was not installed (the program's code is left as it was).
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("cannot stop the target: {0}")]
    Stop(CacheError),
    #[error("{0}")]
    Memory(CacheError),
    #[error("nothing worth installing")]
    NothingWorthIt,
    #[error("a thread appeared while specializing; not installing")]
    ThreadAppeared,
    #[error("the process exited while it was being specialized")]
    Exited,
    #[error("install at {at}: {source}")]
    Install { at: Addr, source: CacheError },
    #[error("cannot resume the target: {0}")]
    Resume(tracer::TracerError),
    #[error("{first}; retry: {retry}")]
    Retried {
        first: Box<InstallError>,
        retry: Box<InstallError>,
    },
}

impl InstallError {
    /// A page changed between reading and guarding it: worth one retry (specialized again).
    fn page_changed(&self) -> bool {
        matches!(
            self,
            InstallError::Install {
                source: CacheError::PageChanged { .. },
                ..
            }
        )
    }
}
