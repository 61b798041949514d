//! The specializing half of a session: plan triggers from the profile, specialize, install, and keep the records
//! (variants, invalidations, timings) the report shows.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use codecache::{Cache, CacheError, Counters, InstallRequest, Invalidation, TargetMemory};
use nix::unistd::Pid;
use specializer::{Addr, Gpr, KnownState, Memory, Options, Request, TriggerCandidate, Variant};
use tracer::Tracer;

use crate::report::{
    Hex, InvalidationJson, RegionRefJson, TriggerRefJson, VariantJson, MAX_ASM_LINES,
};

/// Regions below this share of the samples are not worth a stub.
pub const MIN_SPECIALIZE_SHARE: f64 = 0.05;
/// Hot values specialized per trigger (one variant each).
pub const MAX_VALUES: usize = 24;
/// Trigger candidates scored per region (each costs one specialization per hot value).
const MAX_SCORED: usize = 10;
/// Hottest values per candidate specialized to score it (the best candidate then gets all its values).
const SCORE_VALUES: usize = 2;
/// Candidates tried for installation per region when the best one cannot be patched.
const MAX_INSTALL_TRIES: usize = 3;
/// Installs per region over the whole run: after this many invalidations the region is left alone.
pub const MAX_INSTALLS_PER_REGION: u32 = 4;
/// A value must cover at least this share of its candidate's samples to get a variant of its own.
const MIN_VALUE_SHARE: f64 = 0.01;
/// Samples a value needs to count as hot.
const MIN_VALUE_SAMPLES: u64 = 3;
/// The hot values given variants must cover at least this share of a trigger's samples.
const MIN_COVERAGE: f64 = 0.5;
/// A variant must fold at least this many instructions to pay for its dispatch stub...
const MIN_FOLDED: usize = 12;
/// ...and at least this share of what it visits: entering a variant that folds little costs more than it saves.
const MIN_FOLD_RATIO: f64 = 0.25;
/// Code size cap per variant.
const MAX_VARIANT_BYTES: usize = 16 * 1024;
/// Time one planning round may spend specializing (the program runs meanwhile, but a core is busy).
const PLAN_BUDGET: Duration = Duration::from_millis(1000);
/// A register is assumed at a mid-function trigger (known to the specializer, checked by the stub) only when
/// this many samples there saw it, all with one value.
pub const MIN_ASSUMED_SAMPLES: u64 = 20;
/// Functions larger than this are not scanned for entry constants.
const MAX_SCAN_BYTES: u64 = 64 * 1024;

/// A hot region and its trigger candidates (best first, from the value profile).
#[derive(Clone, Debug)]
pub struct RegionPlan {
    pub start: Addr,
    pub end: Addr,
    pub symbol: Option<String>,
    pub candidates: Vec<TriggerCandidate>,
    /// Per candidate address: registers the profile saw holding one single value there
    /// ([`crate::profile::Profiler::stable_registers`]).
    pub stable: Vec<(Addr, Vec<(Gpr, u64)>)>,
}

/// What one planning round did.
#[derive(Debug, Default)]
pub struct PlanOutcome {
    pub installed: usize,
    /// One line per thing that went wrong (the code is left alone in each case).
    pub problems: Vec<String>,
}

/// Whether two processes may share one address space: yes when kcmp cannot tell, so forwarding stays off.
pub fn shares_vm(a: Pid, b: Pid) -> bool {
    tracer::same_address_space(a, b) != Some(false)
}

/// Where variants may forward stored values: `None` nowhere, else these address ranges (and `rsp` slots).
type Forwarding = Option<Vec<(Addr, Addr)>>;

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
    /// Variants may forward stored values (see [`Runtime::forwarding`]); false for good once a second thread
    /// appeared.
    forwarding_allowed: bool,
    /// Live installs whose variants forward stored values.
    forwarding_installs: BTreeSet<codecache::InstallId>,
    /// Every install that forwarded stored values (for the report).
    forwarding_ever: BTreeSet<codecache::InstallId>,
    /// Each installed variant's code listing (for the report).
    asm: HashMap<codecache::VariantId, Vec<String>>,
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
            forwarding_allowed: true,
            forwarding_installs: BTreeSet::new(),
            forwarding_ever: BTreeSet::new(),
            asm: HashMap::new(),
        })
    }

    /// Whether any variant is installed and alive.
    pub fn has_live(&self) -> bool {
        self.regions.values().any(|r| r.live.is_some())
    }

    /// Regions that may still be (re)specialized.
    pub fn wants(&self, r: &RegionPlan) -> bool {
        match self.regions.get(&(r.start.0, r.end.0)) {
            None => true,
            Some(st) => st.live.is_none() && st.installs < MAX_INSTALLS_PER_REGION,
        }
    }

    /// Whether the region never had variants installed (hot code new to the planner).
    pub fn is_new(&self, r: &RegionPlan) -> bool {
        !self.regions.contains_key(&(r.start.0, r.end.0))
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

    fn options(forward: &Forwarding) -> Options {
        Options {
            // Bounds the time one specialization takes (the planner runs several); hot loops fit easily.
            max_code_bytes: MAX_VARIANT_BYTES,
            forward_stores: forward.is_some(),
            forward_within: forward.clone(),
            ..Options::default()
        }
    }

    /// Where the variants planned now may forward stored values (`Options::forward_within`): the process's
    /// private writable mappings, while it has exactly one thread and has never had another since forwarding
    /// was first used; `None` otherwise. Another thread (or a process sharing the memory) could write a slot
    /// between the variant's store and its reuse; signal handlers are covered by [`Runtime::evacuate`].
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
    pub fn drop_forwarding(&mut self, tr: &mut Tracer) -> Result<usize, CacheError> {
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

    /// Returns Ok(true) when something was installed, Ok(false) when nothing was worth it.
    fn plan_region(
        &mut self,
        tr: &mut Tracer,
        r: &RegionPlan,
        constant: &BTreeSet<Addr>,
    ) -> Result<bool, String> {
        let t0 = Instant::now();
        let forward = self.forwarding(tr);
        let arenas = self.cache.arena_ranges();
        if arenas.iter().any(|(s, e)| r.start.0 < *e && *s < r.end.0) {
            // Our own code: never specialize a variant.
            return Ok(false);
        }
        // (benefit, candidate, variants, snapshots)
        type Scored = (f64, TriggerCandidate, Specialized, Snapshots);
        let mut scored: Vec<Scored> = Vec::new();
        {
            let mut mem =
                TargetMemory::new(tr, self.pid, Some(&self.cache)).map_err(|e| e.to_string())?;
            mem.allow(constant.iter().copied());
            let consts = if r.symbol.is_some() {
                entry_constants(&mem, r.start, r.end)
            } else {
                Vec::new()
            };
            // Score each candidate on its hottest values only, then specialize every hot value of the best one:
            // most of a planning round's time is specialization, and losers need not be compiled in full.
            let mut estimates: Vec<(f64, &TriggerCandidate, Specialized)> = Vec::new();
            for c in r.candidates.iter().take(MAX_SCORED) {
                if t0.elapsed() > PLAN_BUDGET {
                    break;
                }
                if c.address < r.start || c.address >= r.end {
                    continue;
                }
                let probe = TriggerCandidate {
                    values: c.values.iter().take(SCORE_VALUES).copied().collect(),
                    ..c.clone()
                };
                let (benefit, variants) =
                    specialize_candidate(&mem, r, &probe, &consts, &forward, t0);
                if benefit <= 0.0 || variants.variants.is_empty() {
                    continue;
                }
                // Extrapolate to all its values by their samples.
                let probed: u64 = probe.values.iter().map(|v| v.1).sum();
                let all: u64 = c.values.iter().map(|v| v.1).sum();
                let estimate = benefit * all as f64 / probed.max(1) as f64;
                estimates.push((estimate, c, variants));
            }
            estimates.sort_by(|a, b| b.0.total_cmp(&a.0));
            for (i, (estimate, c, mut variants)) in estimates.into_iter().enumerate() {
                if i == 0 && c.values.len() > SCORE_VALUES {
                    let rest = TriggerCandidate {
                        values: c.values.iter().skip(SCORE_VALUES).copied().collect(),
                        ..c.clone()
                    };
                    let (_, more) = specialize_candidate(&mem, r, &rest, &consts, &forward, t0);
                    variants.variants.extend(more.variants);
                }
                // Others keep their probed variants only: a fallback when the best one cannot be installed.
                scored.push((estimate, c.clone(), variants, mem.snapshots()));
            }
        }
        self.specialize_time += t0.elapsed();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        if scored.is_empty() {
            return Ok(false);
        }
        let mut last_err = String::new();
        for (_, cand, variants, snapshots) in scored.into_iter().take(MAX_INSTALL_TRIES) {
            match self.install_candidate(tr, r, &cand, variants, snapshots) {
                Ok(()) => return Ok(true),
                Err(InstallFailure::Changed(e)) => {
                    // A page changed between reading and guarding it (it is being written right now): specialize
                    // again with the threads stopped, so the guard covers exactly what was read.
                    match self.install_stopped(tr, r, &cand, constant) {
                        Ok(()) => return Ok(true),
                        Err(e2) => last_err = format!("{e}; stopped retry: {e2}"),
                    }
                }
                Err(InstallFailure::Other(e)) => last_err = e,
            }
        }
        Err(last_err)
    }

    /// Stop the threads, specialize `cand` and install it before they run again (no snapshot needed).
    fn install_stopped(
        &mut self,
        tr: &mut Tracer,
        r: &RegionPlan,
        cand: &TriggerCandidate,
        constant: &BTreeSet<Addr>,
    ) -> Result<(), String> {
        let t0 = Instant::now();
        self.cache
            .stop_all(tr)
            .map_err(|e| format!("cannot stop the target: {e}"))?;
        let forward = self.forwarding(tr);
        let specialized = (|| -> Result<Specialized, String> {
            let mut mem =
                TargetMemory::new(tr, self.pid, Some(&self.cache)).map_err(|e| e.to_string())?;
            mem.allow(constant.iter().copied());
            let consts = if r.symbol.is_some() {
                entry_constants(&mem, r.start, r.end)
            } else {
                Vec::new()
            };
            Ok(specialize_candidate(&mem, r, cand, &consts, &forward, t0).1)
        })();
        self.specialize_time += t0.elapsed();
        let variants = match specialized {
            Ok(v) if !v.variants.is_empty() => v,
            Ok(_) => {
                let _ = tr.resume_all();
                return Err("nothing worth installing".into());
            }
            Err(e) => {
                let _ = tr.resume_all();
                return Err(e);
            }
        };
        self.install_candidate(tr, r, cand, variants, Snapshots::new())
            .map_err(|e| match e {
                InstallFailure::Changed(s) | InstallFailure::Other(s) => s,
            })
    }

    fn install_candidate(
        &mut self,
        tr: &mut Tracer,
        r: &RegionPlan,
        cand: &TriggerCandidate,
        variants: Specialized,
        snapshots: Snapshots,
    ) -> Result<(), InstallFailure> {
        let t1 = Instant::now();
        let result = (|| -> Result<codecache::InstallId, InstallFailure> {
            self.cache
                .stop_all(tr)
                .map_err(|e| InstallFailure::Other(format!("cannot stop the target: {e}")))?;
            // Cache::install asserts this (invariant 6); a thread that is exiting may slip through stop_all.
            let pid = self.pid;
            if !tr.threads(pid).iter().all(|t| tr.is_stopped(*t)) {
                let _ = tr.resume_all();
                return Err(InstallFailure::Other(
                    "a thread could not be stopped; not installing".into(),
                ));
            }
            if variants.forwards && tr.threads(pid).len() != 1 {
                // A thread appeared since planning: its event (handled next) would remove the install anyway.
                let _ = tr.resume_all();
                return Err(InstallFailure::Other(
                    "a thread appeared while specializing; not installing".into(),
                ));
            }
            let forwards = variants.forwards;
            let listings: Vec<(Option<u64>, Vec<String>)> = variants
                .variants
                .iter()
                .map(|(value, v)| {
                    let mut l = v.residual_asm();
                    l.truncate(MAX_ASM_LINES);
                    (*value, l)
                })
                .collect();
            let res = self
                .cache
                .install(
                    tr,
                    InstallRequest {
                        trigger: cand.address,
                        register: Some(cand.register),
                        assumed: variants.assumed,
                        region: (r.start, r.end),
                        variants: variants.variants,
                        snapshots,
                    },
                )
                .map_err(|e| {
                    let msg = format!("install at {}: {e}", cand.address);
                    match e {
                        CacheError::PageChanged { .. } => InstallFailure::Changed(msg),
                        _ => InstallFailure::Other(msg),
                    }
                });
            // Resume whatever happened: the program must go on.
            let resumed = tr.resume_all();
            let id = res?;
            for info in self
                .cache
                .variants()
                .into_iter()
                .filter(|i| i.install == id)
            {
                if let Some((_, l)) = listings.iter().find(|(v, _)| *v == info.value) {
                    self.asm.insert(info.id, l.clone());
                }
            }
            if forwards {
                self.forwarding_installs.insert(id);
                self.forwarding_ever.insert(id);
            }
            resumed.map_err(|e| InstallFailure::Other(format!("cannot resume the target: {e}")))?;
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
                code_address: Some(Hex(v.base.0)),
                folded: v.folded as u64,
                residual: v.residual as u64,
                guard_pages: v.guard_pages.iter().map(|p| Hex(p.0)).collect(),
                entries: self.counters.entries.get(&v.id).copied().unwrap_or(0),
                invalidated: !v.alive,
                forwards_stores: self.forwarding_ever.contains(&v.install),
                asm: self.asm.get(&v.id).cloned().unwrap_or_default(),
            })
            .collect()
    }

    /// Invalidations so far.
    pub fn invalidations_json(&self) -> Vec<InvalidationJson> {
        self.invalidations.clone()
    }
}

type Snapshots = std::collections::BTreeMap<Addr, Vec<u8>>;

/// Why an install did not happen.
enum InstallFailure {
    /// A page changed between specializing and guarding: worth retrying with the threads stopped.
    Changed(String),
    Other(String),
}

/// The variants of one trigger and the registers (besides the trigger register) they assume.
struct Specialized {
    variants: Vec<(Option<u64>, Variant)>,
    assumed: Vec<(Gpr, u64)>,
    /// Specialized with store forwarding on.
    forwards: bool,
}

/// Registers to assume at a mid-function trigger: those the profile saw holding one value there (e.g. an
/// interpreter's bytecode base, which bytecode jump targets are computed from) and that some instruction of the
/// region names as an operand (a caller's callee-saved register the region never touches cannot help folding,
/// and every assumed register costs a compare on each entry), except the trigger register and entry constants
/// (known without a check). At a function entry the arguments change per call: none.
fn assumed_for(
    mem: &dyn Memory,
    r: &RegionPlan,
    c: &TriggerCandidate,
    consts: &[(Gpr, u64, Addr)],
) -> Vec<(Gpr, u64)> {
    if c.address == r.start {
        return Vec::new();
    }
    let named = registers_named(mem, r.start, r.end);
    let mut out: Vec<(Gpr, u64)> = Vec::new();
    let regs = r
        .stable
        .iter()
        .filter(|(a, _)| *a == c.address)
        .flat_map(|(_, regs)| regs.iter().copied());
    for (g, v) in regs {
        let constant = consts
            .iter()
            .any(|(k, _, after)| *k == g && c.address >= *after);
        let wanted = named & (1 << g.index()) != 0;
        if wanted
            && g != Gpr::Rsp
            && g != c.register
            && !constant
            && !out.iter().any(|(h, _)| *h == g)
        {
            out.push((g, v));
        }
    }
    out
}

/// Specialize the region at `c` for each hot value of its register (plus the entry constants where they hold,
/// and the registers assumed there); returns the benefit (folded instructions weighted by value frequency) and
/// the variants worth a stub.
fn specialize_candidate(
    mem: &dyn Memory,
    r: &RegionPlan,
    c: &TriggerCandidate,
    consts: &[(Gpr, u64, Addr)],
    forward: &Forwarding,
    t0: Instant,
) -> (f64, Specialized) {
    let opts = Runtime::options(forward);
    let assumed = assumed_for(mem, r, c, consts);
    let mut benefit = 0.0;
    let mut variants = Vec::new();
    for &(value, samples) in &c.values {
        if t0.elapsed() > PLAN_BUDGET {
            break;
        }
        let mut known = KnownState::default();
        for (g, v, after) in consts {
            // Only where every path from the entry has executed the defining instruction.
            if c.address >= *after && *g != c.register {
                known.set_reg(*g, Some(*v));
            }
        }
        for (g, v) in &assumed {
            known.set_reg(*g, Some(*v));
        }
        known.set_reg(c.register, Some(value));
        let req = Request {
            entry: c.address,
            region_start: r.start,
            region_end: r.end,
            known,
            options: opts.clone(),
        };
        let Ok(var) = specializer::specialize(&req, mem) else {
            continue;
        };
        let st = &var.stats;
        let ratio = st.folded as f64 / (st.folded + st.residual).max(1) as f64;
        // A variant that folds no memory read only re-derives what the registers already say (the CPU's
        // predictors do that well); it pays for its stub and its exits with nothing to show.
        if st.folded < MIN_FOLDED || ratio < MIN_FOLD_RATIO || st.folded_loads == 0 {
            continue;
        }
        // Folded work x how often the trigger runs with this value (DESIGN: "Trigger choice"): a trigger on
        // the loop head beats one on a rarely taken path that folds as much.
        benefit += samples as f64 * st.folded as f64;
        variants.push((Some(value), var));
    }
    (
        benefit,
        Specialized {
            variants,
            assumed,
            forwards: forward.is_some(),
        },
    )
}

/// Bit set (by [`Gpr::index`]) of the registers named explicitly (as an operand, base or index) by some
/// instruction in `[start, end)`; 0 when the code cannot be read or is larger than [`MAX_SCAN_BYTES`].
fn registers_named(mem: &dyn Memory, start: Addr, end: Addr) -> u16 {
    use iced_x86::{Decoder, DecoderOptions, OpKind};
    let len = end.0.saturating_sub(start.0);
    if len == 0 || len > MAX_SCAN_BYTES {
        return 0;
    }
    let mut buf = vec![0u8; len as usize];
    if mem.read(start, &mut buf).is_err() {
        return 0;
    }
    let mut named = 0u16;
    let mut d = Decoder::with_ip(64, &buf, start.0, DecoderOptions::NONE);
    while d.can_decode() {
        let i = d.decode();
        let mut regs = vec![i.memory_base(), i.memory_index()];
        for k in 0..i.op_count() {
            if i.op_kind(k) == OpKind::Register {
                regs.push(i.op_register(k));
            }
        }
        for g in regs.into_iter().filter_map(Gpr::containing) {
            named |= 1 << g.index();
        }
    }
    named
}

/// Registers a function sets to a constant before anything else can happen and never changes afterwards:
/// `lea reg, [rip+d]` or `mov reg, imm` in the straight-line code at its entry, and no other write to `reg`
/// anywhere in the function (calls and system calls count as writes of the registers they clobber). Compilers hoist
/// jump-table bases like this; knowing them lets the specializer fold a `switch` entered in the middle of the loop.
/// Returns (register, value, address after the defining instruction). Empty when the function cannot be decoded.
/// Limit: a function entered other than at its symbol (e.g. from a `.cold` part that writes the register) would
/// break the assumption; compilers do not generate such code for hoisted constants.
pub fn entry_constants(mem: &dyn Memory, start: Addr, end: Addr) -> Vec<(Gpr, u64, Addr)> {
    use iced_x86::{Decoder, DecoderOptions, FlowControl, Mnemonic, OpKind};
    let len = end.0.saturating_sub(start.0);
    if len == 0 || len > MAX_SCAN_BYTES {
        return Vec::new();
    }
    let mut buf = vec![0u8; len as usize];
    if mem.read(start, &mut buf).is_err() {
        return Vec::new();
    }
    let mut d = Decoder::with_ip(64, &buf, start.0, DecoderOptions::NONE);
    let mut insns = Vec::new();
    while d.can_decode() {
        let i = d.decode();
        if i.is_invalid() {
            return Vec::new();
        }
        insns.push(i);
    }
    const CALLER_SAVED: [Gpr; 9] = [
        Gpr::Rax,
        Gpr::Rcx,
        Gpr::Rdx,
        Gpr::Rsi,
        Gpr::Rdi,
        Gpr::R8,
        Gpr::R9,
        Gpr::R10,
        Gpr::R11,
    ];
    let mut consts: Vec<(Gpr, u64, Addr)> = Vec::new();
    let mut defs: Vec<u64> = Vec::new();
    for i in &insns {
        if i.flow_control() != FlowControl::Next {
            break;
        }
        let dst = (i.op_count() >= 1 && i.op0_kind() == OpKind::Register)
            .then(|| i.op0_register())
            .filter(|r| r.is_gpr64() || r.is_gpr32());
        let value = match (i.mnemonic(), dst) {
            (Mnemonic::Lea, Some(r)) if r.is_gpr64() && i.is_ip_rel_memory_operand() => {
                Some(i.ip_rel_memory_address())
            }
            (Mnemonic::Mov, Some(_)) if i.op1_kind() == OpKind::Immediate64 => {
                Some(i.immediate64())
            }
            (Mnemonic::Mov, Some(r)) if r.is_gpr32() && i.op1_kind() == OpKind::Immediate32 => {
                Some(i.immediate32() as u64)
            }
            (Mnemonic::Mov, Some(r)) if r.is_gpr64() && i.op1_kind() == OpKind::Immediate32to64 => {
                Some(i.immediate32to64() as u64)
            }
            _ => None,
        };
        if let (Some(v), Some(g)) = (value, dst.and_then(Gpr::containing)) {
            consts.retain(|c| c.0 != g);
            consts.push((g, v, Addr(i.next_ip())));
            defs.push(i.ip());
        }
    }
    consts.retain(|(g, _, _)| {
        insns.iter().all(|i| {
            if defs.contains(&i.ip()) {
                return true;
            }
            let clobbers = match i.flow_control() {
                FlowControl::Call | FlowControl::IndirectCall => CALLER_SAVED.contains(g),
                _ if i.mnemonic() == Mnemonic::Syscall => {
                    matches!(g, Gpr::Rax | Gpr::Rcx | Gpr::R11)
                }
                _ => false,
            };
            !clobbers && crate::profile::written_gprs(i) & (1 << g.index()) == 0
        })
    });
    consts
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
            // A value seen only once or twice is noise (a random number), not a hot value.
            let count = |share: f64| (share * t.samples as f64).round() as u64;
            let hot: Vec<&crate::report::TopValueJson> = t
                .top_values
                .iter()
                .filter(|v| v.share >= MIN_VALUE_SHARE && count(v.share) >= MIN_VALUE_SAMPLES)
                .take(MAX_VALUES)
                .collect();
            let values: Vec<(u64, u64)> = hot.iter().map(|v| (v.value.0, count(v.share))).collect();
            // The stub falls back for every other value: a trigger whose hot values cover little is not one.
            let covered: f64 = hot.iter().map(|v| v.share).sum();
            if values.is_empty() || covered < MIN_COVERAGE {
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
        // The ten frequent values, capped; the rare ones (one sample each) are noise.
        assert_eq!(c[0].values.len(), MAX_VALUES.min(10));
        assert_eq!(c[0].values[0], (0x5000, 90));
        assert!(c[0].values.iter().all(|v| v.1 >= MIN_VALUE_SAMPLES));
    }

    /// Code at 0x1000 and constant data at 0x2000, for planner decisions.
    struct CodeAndData(Vec<u8>, Vec<u8>);

    impl Memory for CodeAndData {
        fn read(&self, addr: Addr, buf: &mut [u8]) -> Result<(), specializer::MemoryError> {
            let (base, bytes) = if addr.0 >= 0x2000 {
                (0x2000, &self.1)
            } else {
                (0x1000, &self.0)
            };
            let off = addr.0.wrapping_sub(base) as usize;
            match bytes.get(off..off + buf.len()) {
                Some(b) => {
                    buf.copy_from_slice(b);
                    Ok(())
                }
                None => Err(specializer::MemoryError::Unreadable(addr)),
            }
        }
        fn is_constant(&self, page: Addr) -> bool {
            page.0 == 0x2000
        }
    }

    /// Specialize `code` for rdi = 0x2000 the way the planner does; how many variants it would install.
    fn planned_variants(code: Vec<u8>) -> usize {
        let len = code.len() as u64;
        let mem = CodeAndData(code, (0..64u8).collect());
        let c = TriggerCandidate {
            address: Addr(0x1000),
            register: Gpr::Rdi,
            values: vec![(0x2000, 100)],
        };
        let r = RegionPlan {
            start: Addr(0x1000),
            end: Addr(0x1000 + len),
            symbol: None,
            candidates: vec![c.clone()],
            stable: Vec::new(),
        };
        specialize_candidate(&mem, &r, &c, &[], &None, Instant::now())
            .1
            .variants
            .len()
    }

    #[test]
    fn variants_that_fold_no_memory_read_are_not_worth_installing() {
        // 16 x (lea rcx, [rdi+8]; mov rdi, rcx), ret: everything folded is register arithmetic on the trigger.
        let mut regs_only = Vec::new();
        for _ in 0..16 {
            regs_only.extend([0x48, 0x8d, 0x4f, 0x08]); // lea rcx, [rdi+8]
            regs_only.extend([0x48, 0x89, 0xcf]); // mov rdi, rcx
        }
        regs_only.push(0xc3); // ret
        assert_eq!(planned_variants(regs_only.clone()), 0);
        // The same with a read of the constant data through the trigger register in front: worth it.
        let mut with_load = vec![0x48, 0x8b, 0x07]; // mov rax, [rdi]
        with_load.extend(regs_only);
        assert_eq!(planned_variants(with_load), 1);
    }

    /// Code at 0x1000 for [`entry_constants`].
    struct Code(Vec<u8>);

    impl Memory for Code {
        fn read(&self, addr: Addr, buf: &mut [u8]) -> Result<(), specializer::MemoryError> {
            let off = addr.0.wrapping_sub(0x1000) as usize;
            match self.0.get(off..off + buf.len()) {
                Some(b) => {
                    buf.copy_from_slice(b);
                    Ok(())
                }
                None => Err(specializer::MemoryError::Unreadable(addr)),
            }
        }
        fn is_constant(&self, _page: Addr) -> bool {
            false
        }
    }

    #[test]
    fn entry_constants_are_hoisted_and_never_rewritten() {
        let code = vec![
            0x4c, 0x8d, 0x05, 0x00, 0x01, 0x00, 0x00, // 1000: lea r8, [rip+0x100]
            0xb8, 0x05, 0x00, 0x00, 0x00, // 1007: mov eax, 5
            0xb9, 0x07, 0x00, 0x00, 0x00, // 100c: mov ecx, 7
            0x39, 0xc8, // 1011: cmp eax, ecx
            0x74, 0x02, // 1013: je 1017
            0xff, 0xc0, // 1015: inc eax (eax is not constant after all)
            0xc3, // 1017: ret
        ];
        let end = Addr(0x1000 + code.len() as u64);
        let c = entry_constants(&Code(code.clone()), Addr(0x1000), end);
        assert_eq!(
            c,
            vec![(Gpr::R8, 0x1107, Addr(0x1007)), (Gpr::Rcx, 7, Addr(0x1011))]
        );
        // A call clobbers the caller-saved registers: nothing stays constant.
        let mut with_call = code;
        with_call.splice(21..23, [0xe8, 0x00, 0x00, 0x00, 0x00]); // call next
        let end = Addr(0x1000 + with_call.len() as u64);
        assert!(entry_constants(&Code(with_call), Addr(0x1000), end).is_empty());
        // Unreadable or empty code: nothing.
        assert!(entry_constants(&Code(Vec::new()), Addr(0x1000), Addr(0x1010)).is_empty());
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
