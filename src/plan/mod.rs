//! Planning: hot regions and their value profiles in, what to specialize out.
//!
//! Every decision here is a pure function of typed inputs (the profile's [`RegionProfile`]s, the pages trusted
//! as constant, a [`Memory`] to read code and data through), so each is unit-tested without a live process. The
//! installer ([`crate::install`]) only carries the chosen plan out.
//!
//! The trigger choice follows the 2003 algorithm (ARCHITECTURE.md, "Planning"): for each candidate trigger and
//! its hottest values, run the specializer and count what it folds; benefit = folded work x sample frequency;
//! the best candidate gets a variant for each of its hot values.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use specializer::analysis::registers_named;
use specializer::constants::{function_constants, FunctionConstants};
use specializer::{Addr, Gpr, KnownState, Memory, Options, Request, Stats, Variant};

use crate::profile::{RegionProfile, TriggerProfile};

mod reason;

pub use reason::{add_stats, explain_untrusted, CandidateNote, Reason, RegionNote};

/// Regions below this share of the samples are not worth a stub.
pub const MIN_SPECIALIZE_SHARE: f64 = 0.05;
/// Hot values specialized per trigger (one variant each).
pub const MAX_VALUES: usize = 24;
/// Trigger candidates scored per region (each costs one specialization per hot value).
pub const MAX_SCORED: usize = 10;
/// Hottest values per candidate specialized to score it (the best candidate then gets all its values).
pub const SCORE_VALUES: usize = 2;
/// Candidates tried for installation per region when the best one cannot be patched.
pub const MAX_INSTALL_TRIES: usize = 3;
/// Installs per region over the whole run: after this many invalidations the region is left alone.
pub const MAX_INSTALLS_PER_REGION: u32 = 4;
/// Triggers of one region measured slower before the region is left alone: the planner's estimate ranks the
/// candidates, the measurement decides, and the runner-up of a lost trigger may well win (a trigger entered at
/// every pass of one handler loses where the bytecode pc beside it, which loops inside its variant, wins).
pub const MAX_LOST_TRIGGERS: usize = 2;
/// A value must cover at least this share of its candidate's samples to get a variant of its own.
pub const MIN_VALUE_SHARE: f64 = 0.01;
/// Samples a value needs to count as hot.
pub const MIN_VALUE_SAMPLES: u64 = 3;
/// The hot values given variants must cover at least this share of a trigger's samples.
pub const MIN_COVERAGE: f64 = 0.5;
/// A variant must fold at least this many instructions to pay for its dispatch stub...
pub const MIN_FOLDED: usize = 12;
/// ...and at least this share of what it visits: entering a variant that folds little costs more than it saves.
pub const MIN_FOLD_RATIO: f64 = 0.25;
/// A variant that does not loop within itself ([`specializer::Variant::loops`]) is entered on every pass through
/// its trigger and leaves by an exit each time: the stub's compare and jumps, the exit's jump and the detour
/// through code far from the original cost every pass. It must fold at least this many instructions. Measured on
/// stock Lua 5.4 (`fib(35)`): a straight-line variant of one handler folding 12 instructions, entered 11 M times,
/// made the whole run 35% slower; variants that loop (every sample's interpreters, filters and packet loops) are
/// entered a few times and are not concerned.
pub const MIN_FOLDED_STRAIGHT: usize = 48;
/// Code size cap per variant.
pub const MAX_VARIANT_BYTES: usize = 16 * 1024;
/// Time one planning round may spend specializing (the program runs meanwhile, but a core is busy).
pub const PLAN_BUDGET: Duration = Duration::from_millis(1000);
/// A register is assumed at a mid-function trigger (known to the specializer, checked by the stub) only when
/// this many samples there saw it, all with one value.
pub const MIN_ASSUMED_SAMPLES: u64 = 20;

/// A candidate trigger: a register read at `address` and its hot values.
#[derive(Clone, Debug, PartialEq)]
pub struct TriggerCandidate {
    pub address: Addr,
    pub register: Gpr,
    /// (value, samples), hottest first.
    pub values: Vec<(u64, u64)>,
    /// Samples of the register there and its distinct values (for the report).
    pub samples: u64,
    pub distinct: u64,
}

impl TriggerCandidate {
    /// The report's note on this candidate, before any decision.
    pub fn note(&self) -> CandidateNote {
        CandidateNote {
            address: self.address,
            register: self.register,
            samples: self.samples,
            distinct: self.distinct,
            values: self.values.clone(),
            folded: None,
            estimate: None,
            reason: None,
        }
    }
}

/// A hot region and its trigger candidates (best first, from the value profile).
#[derive(Clone, Debug, PartialEq)]
pub struct RegionPlan {
    pub start: Addr,
    pub end: Addr,
    pub symbol: Option<String>,
    pub candidates: Vec<TriggerCandidate>,
    /// Per candidate address: registers the profile saw holding one single value there
    /// ([`crate::profile::Profiler::stable_registers`]).
    pub stable: Vec<(Addr, Vec<(Gpr, u64)>)>,
    /// Its share of the samples, and the triggers the profile showed that are no candidates (with why).
    pub share: f64,
    pub rejected: Vec<CandidateNote>,
}

/// Where variants may forward stored values: `None` nowhere, else these address ranges (and `rsp` slots).
pub type Forwarding = Option<Vec<(Addr, Addr)>>;

/// Most triggers that are no candidates a region's note explains (the profile ranks them; the rest are noise).
const MAX_REJECTED_NOTES: usize = 8;

/// A trigger profile as a candidate — hot values as (value, samples), rare values dropped, at most [`MAX_VALUES`],
/// covering at least [`MIN_COVERAGE`] of its samples — or why it is none. Whether a value is hot is judged on its
/// samples pooled over `t`'s family ([`pooled_values`]): skid puts most of a region's samples on a few
/// instructions, so the one that reads a quantity first (a function's argument at its entry) may see each value
/// only once or twice while the instructions after it, reading the same quantity, saw it dozens of times.
fn classify(t: &TriggerProfile, all: &[TriggerProfile]) -> Result<TriggerCandidate, Reason> {
    if t.register == Gpr::Rsp || t.samples == 0 {
        return Err(Reason::NoPredictableValue);
    }
    let (pool, pool_samples) = pooled_values(t, all);
    let hot = |v: u64, own: u64| {
        let c = pool.iter().find(|p| p.0 == v).map_or(own, |p| p.1.max(own));
        let n = pool_samples.max(t.samples);
        c as f64 / n as f64 >= MIN_VALUE_SHARE && c >= MIN_VALUE_SAMPLES
    };
    // A value seen only once or twice is noise (a random number), not a hot value.
    let values: Vec<(u64, u64)> = t
        .top_values
        .iter()
        .filter(|&&(v, c)| hot(v, c))
        .take(MAX_VALUES)
        .copied()
        .collect();
    // The stub falls back for every other value: a trigger whose hot values cover little is not one.
    let covered: f64 = values
        .iter()
        .map(|&(_, c)| c as f64 / t.samples as f64)
        .sum();
    if values.is_empty() {
        return Err(Reason::RareValues {
            hot: 0,
            distinct: t.distinct,
        });
    }
    if covered < MIN_COVERAGE {
        return Err(Reason::LowCoverage { covered });
    }
    Ok(TriggerCandidate {
        address: t.address,
        register: t.register,
        values,
        samples: t.samples,
        distinct: t.distinct,
    })
}

/// Samples of each of `t`'s values summed over its family — the triggers of `all` (`t` among them) whose values
/// are mostly `t`'s ([`overlaps`]), in any register — and the family's samples. One sample reads every register
/// at its instruction: several registers holding the value there count once (the largest of them).
fn pooled_values(t: &TriggerProfile, all: &[TriggerProfile]) -> (Vec<(u64, u64)>, u64) {
    let family: Vec<&TriggerProfile> = all
        .iter()
        .filter(|o| o.register != Gpr::Rsp && overlaps(&t.top_values, &o.top_values))
        .collect();
    let mut addresses: Vec<Addr> = family.iter().map(|o| o.address).collect();
    addresses.sort();
    addresses.dedup();
    let at = |a: Addr| family.iter().filter(move |o| o.address == a);
    let values = t
        .top_values
        .iter()
        .map(|&(v, _)| {
            let n = addresses
                .iter()
                .map(|&a| {
                    at(a)
                        .flat_map(|o| o.top_values.iter())
                        .filter(|w| w.0 == v)
                        .map(|w| w.1)
                        .max()
                        .unwrap_or(0)
                })
                .sum();
            (v, n)
        })
        .collect();
    let samples = addresses
        .iter()
        .map(|&a| at(a).map(|o| o.samples).max().unwrap_or(0))
        .sum();
    (values, samples)
}

/// Whether two sets of (value, samples) share at least half of the smaller one's values.
fn overlaps(a: &[(u64, u64)], b: &[(u64, u64)]) -> bool {
    let shared = a
        .iter()
        .filter(|(v, _)| b.iter().any(|(w, _)| w == v))
        .count();
    let smaller = a.len().min(b.len());
    smaller > 0 && shared * 2 >= smaller
}

/// The regions worth planning: at least [`MIN_SPECIALIZE_SHARE`] of the samples and one trigger candidate.
/// `stable(address)` gives the registers the profile saw holding one value at a candidate's address. The
/// regions left alone come back as notes saying why.
pub fn regions_to_plan(
    profiles: Vec<RegionProfile>,
    stable: impl Fn(Addr) -> Vec<(Gpr, u64)>,
) -> (Vec<RegionPlan>, Vec<RegionNote>) {
    let mut plans = Vec::new();
    let mut notes = Vec::new();
    for p in profiles {
        let mut candidates = Vec::new();
        let mut rejected = Vec::new();
        for t in &p.triggers {
            match classify(t, &p.triggers) {
                Ok(c) => candidates.push(c),
                Err(reason) if rejected.len() < MAX_REJECTED_NOTES && t.register != Gpr::Rsp => {
                    rejected.push(CandidateNote {
                        address: t.address,
                        register: t.register,
                        samples: t.samples,
                        distinct: t.distinct,
                        values: t.top_values.iter().take(MAX_VALUES).copied().collect(),
                        folded: None,
                        estimate: None,
                        reason: Some(reason),
                    })
                }
                Err(_) => {}
            }
        }
        let region = p.region;
        let reason = if region.share < MIN_SPECIALIZE_SHARE {
            Some(Reason::Cold {
                share: region.share,
            })
        } else if candidates.is_empty() {
            Some(Reason::NoPredictableValue)
        } else {
            None
        };
        if let Some(reason) = reason {
            notes.push(RegionNote {
                start: region.start,
                end: region.end,
                symbol: region.symbol,
                share: region.share,
                candidates: rejected,
                reason: Some(reason),
            });
            continue;
        }
        let stable = candidates
            .iter()
            .map(|c| (c.address, stable(c.address)))
            .collect();
        plans.push(RegionPlan {
            start: region.start,
            end: region.end,
            symbol: region.symbol,
            candidates,
            stable,
            share: region.share,
            rejected,
        });
    }
    (plans, notes)
}

impl RegionPlan {
    /// The registers the profile saw holding one value at `a` (empty when it saw none, or `a` is no
    /// candidate's address).
    pub fn stable_at(&self, a: Addr) -> &[(Gpr, u64)] {
        self.stable
            .iter()
            .find(|(at, _)| *at == a)
            .map_or(&[], |(_, regs)| regs.as_slice())
    }

    /// The report's note on this region with `candidates` and `reason` (None: installed).
    pub fn note(&self, candidates: Vec<CandidateNote>, reason: Option<Reason>) -> RegionNote {
        RegionNote {
            start: self.start,
            end: self.end,
            symbol: self.symbol.clone(),
            share: self.share,
            candidates,
            reason,
        }
    }
}

/// What the installer remembers about a region across planning rounds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RegionHistory {
    /// Installs so far (each one was later invalidated, unless it is `live`).
    pub installs: u32,
    /// Whether variants of the region are installed and alive.
    pub live: bool,
    /// Its variants were measured slower than the original code and removed ([`crate::abtest`]), for
    /// [`MAX_LOST_TRIGGERS`] triggers: no trigger is tried again.
    pub lost: bool,
}

/// Whether a candidate is worth installing in a region where `lost` triggers were measured slower: after a loss
/// only one whose variants loop inside themselves (`loops`), the kind a per-pass loser's runner-up can win as (a
/// stock Lua 5.3's handler-sized variants lost at its dispatch, and so did the next trigger's, each loss costing
/// the program about 1% in its trial).
pub fn worth_trying_after_losses(loops: bool, lost: usize) -> bool {
    lost == 0 || loops
}

/// Values up to this are too common to mean one quantity in different registers (counts, opcodes, flags).
const AMBIGUOUS_VALUE_MAX: u64 = 0xffff;

/// `r` without the triggers already measured slower (`lost`) and without their values elsewhere: a candidate
/// that sees a lost trigger's value (the same quantity at a neighbouring instruction, or copied to another
/// register) would give that value the same variant, so it keeps its other values only, and is dropped when
/// none is left. The notes say which were dropped.
pub fn without_lost(r: &RegionPlan, lost: &[TriggerCandidate]) -> (RegionPlan, Vec<CandidateNote>) {
    let mut kept = r.clone();
    let mut notes = Vec::new();
    kept.candidates.retain_mut(|c| {
        let same_trigger = lost
            .iter()
            .any(|l| l.address == c.address && l.register == c.register);
        if !same_trigger {
            // In another register only a value too large to be a count or an opcode is the same quantity.
            let lost_value = |v: u64| {
                lost.iter().any(|l| {
                    (l.register == c.register || v > AMBIGUOUS_VALUE_MAX)
                        && l.values.iter().any(|(w, _)| *w == v)
                })
            };
            c.values.retain(|(v, _)| !lost_value(*v));
        }
        let gone = same_trigger || c.values.is_empty();
        if gone {
            let mut n = c.note();
            n.reason = Some(Reason::MeasuredSlower);
            notes.push(n);
        }
        !gone
    });
    (kept, notes)
}

/// Whether a region may be (re)specialized: never specialized, or its variants died and it has installs left.
pub fn wants(history: Option<&RegionHistory>) -> bool {
    match history {
        None => true,
        Some(h) => !h.live && !h.lost && h.installs < MAX_INSTALLS_PER_REGION,
    }
}

/// Specializer options for a variant planned now.
pub fn options(forward: &Forwarding) -> Options {
    Options {
        // Bounds the time one specialization takes (the planner runs several); hot loops fit easily.
        max_code_bytes: MAX_VARIANT_BYTES,
        forward_stores: forward.is_some(),
        forward_within: forward.clone(),
        ..Options::default()
    }
}

/// Why a variant with these statistics does not pay for its stub and its exits (None: it does). One that folds no
/// memory read only re-derives what the registers already say (the CPU's predictors do that well).
pub fn why_not_worth_a_stub(st: &Stats, loops: bool) -> Option<Reason> {
    let visited = st.folded + st.residual;
    let ratio = st.folded as f64 / visited.max(1) as f64;
    if st.folded_loads == 0 {
        Some(Reason::NoFoldedLoad)
    } else if !loops && st.folded < MIN_FOLDED_STRAIGHT {
        Some(Reason::StraightLine { folded: st.folded })
    } else if st.folded < MIN_FOLDED || ratio < MIN_FOLD_RATIO {
        Some(Reason::FoldedTooLittle {
            folded: st.folded,
            visited,
        })
    } else {
        None
    }
}

/// The variants of one trigger and the registers (besides the trigger register) they assume.
#[derive(Debug)]
pub struct Specialized {
    pub variants: Vec<(Option<u64>, Variant)>,
    pub assumed: Vec<(Gpr, u64)>,
    /// Specialized with store forwarding on.
    pub forwards: bool,
    /// What specializing folded, summed over every value specialized (kept or not).
    pub stats: Stats,
    /// Why the values that got no variant got none (the first such reason).
    pub rejected: Option<Reason>,
    /// Time spent specializing these values: what specializing them again would cost (with the threads stopped,
    /// the program's time).
    pub took: Duration,
}

/// A scored candidate: its estimated benefit (over all its hot values) and the variants compiled so far.
#[derive(Debug)]
pub struct Scored {
    pub estimate: f64,
    pub candidate: TriggerCandidate,
    pub specialized: Specialized,
}

/// Registers proven constant per instruction of the region's function (see [`function_constants`]); only for
/// real functions (symbols, `.eh_frame`), whose entry is known.
pub fn region_constants(mem: &dyn Memory, r: &RegionPlan) -> FunctionConstants {
    if r.symbol.is_some() {
        function_constants(mem, r.start, r.end)
    } else {
        FunctionConstants::none()
    }
}

/// Candidates rejected in earlier planning rounds, by what decided it: the region, the trigger, the values it was
/// probed on, the pages trusted as constant and whether stores may be forwarded. Planning again on the same
/// inputs reaches the same verdict (specialization is deterministic), so a later round reuses it instead of
/// specializing again: a stock interpreter's rounds re-scored the same dozen candidates, 160-420 ms of CPU per
/// run that, on a machine whose CPUs share cores, the program paid for too.
#[derive(Debug, Default)]
pub struct Rejections {
    /// The trusted pages of the round (set with [`Rejections::trust`]).
    trusted: u64,
    seen: HashMap<RejectionKey, (Stats, Reason)>,
}

type RejectionKey = (Addr, Addr, Addr, Gpr, Vec<u64>, u64, bool);

impl Rejections {
    /// The pages planning trusts as constant this round.
    pub fn trust(&mut self, pages: &BTreeSet<Addr>) {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        pages.hash(&mut h);
        self.trusted = h.finish();
    }

    /// Rejections remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn key(&self, r: &RegionPlan, c: &TriggerCandidate, forward: &Forwarding) -> RejectionKey {
        let mut values: Vec<u64> = c.values.iter().map(|v| v.0).collect();
        values.sort_unstable();
        (
            r.start,
            r.end,
            c.address,
            c.register,
            values,
            self.trusted,
            forward.is_some(),
        )
    }
}

/// Score each candidate of `r` on its hottest values, then specialize every hot value of the best one (most of a
/// planning round's time is specialization, and losers need not be compiled in full). Best first; candidates that
/// fold nothing worth a stub are left out. Stops scoring once `t0` is [`PLAN_BUDGET`] old. The notes say, for
/// every candidate, what it folded and why it was left out (scored candidates have no reason yet: the installer
/// decides).
pub fn score_region(
    mem: &dyn Memory,
    r: &RegionPlan,
    forward: &Forwarding,
    t0: Instant,
    memo: &mut Rejections,
) -> (Vec<Scored>, Vec<CandidateNote>) {
    let consts = region_constants(mem, r);
    let mut notes: Vec<(usize, CandidateNote)> = Vec::new();
    let mut estimates: Vec<(f64, &TriggerCandidate, Specialized)> = Vec::new();
    for (i, at) in scoring_order(&r.candidates).into_iter().enumerate() {
        let c = &r.candidates[at];
        let mut note = c.note();
        if i >= MAX_SCORED {
            note.reason = Some(Reason::NotScored { better: MAX_SCORED });
        } else if t0.elapsed() > PLAN_BUDGET {
            note.reason = Some(Reason::OutOfTime);
        } else if c.address < r.start || c.address >= r.end {
            note.reason = Some(Reason::OutsideRegion);
        }
        if note.reason.is_some() {
            notes.push((at, note));
            continue;
        }
        // Probed on the values its sibling candidates agree are hottest, so siblings are scored on the same work.
        let probe = TriggerCandidate {
            values: probe_values(c, &r.candidates),
            ..c.clone()
        };
        let key = memo.key(r, &probe, forward);
        if let Some((stats, reason)) = memo.seen.get(&key) {
            // Rejected before on the same values and the same trusted memory: not specialized again.
            note.folded = Some(stats.clone());
            note.reason = Some(reason.clone());
            notes.push((at, note));
            continue;
        }
        let (benefit, variants) =
            specialize_candidate(mem, r, &probe, &consts, forward, t0 + PLAN_BUDGET);
        note.folded = Some(variants.stats.clone());
        if benefit <= 0.0 || variants.variants.is_empty() {
            let reason = variants.rejected.clone().unwrap_or(Reason::NoFoldedLoad);
            if !matches!(reason, Reason::SpecializeFailed(_)) && Instant::now() <= t0 + PLAN_BUDGET
            {
                memo.seen
                    .insert(key, (variants.stats.clone(), reason.clone()));
            }
            note.reason = Some(reason);
            notes.push((at, note));
            continue;
        }
        // Folded work per sample of its hottest values, times how often the trigger runs.
        let probed: u64 = probe.values.iter().map(|v| v.1).sum();
        let estimate = benefit * trigger_frequency(c, &r.candidates) as f64 / probed.max(1) as f64;
        note.estimate = Some(estimate);
        notes.push((at, note));
        estimates.push((estimate, c, variants));
    }
    // The report lists candidates in the profile's order, whatever order they were scored in.
    notes.sort_by_key(|(at, _)| *at);
    let mut notes: Vec<CandidateNote> = notes.into_iter().map(|(_, n)| n).collect();
    estimates.sort_by(|a, b| b.0.total_cmp(&a.0));
    // Near-ties are sampling noise: the first of the candidates close to the best (in address order) leads, so
    // the same program gets the same plan run after run.
    if let Some((best, best_samples)) = estimates.first().map(|e| (e.0, e.1.samples)) {
        if let Some(lead) = estimates
            .iter()
            .enumerate()
            .filter(|(_, e)| within_noise(e.0, e.1.samples, best, best_samples))
            .min_by_key(|(_, e)| (e.1.address, e.1.register.index()))
            .map(|(i, _)| i)
        {
            let e = estimates.remove(lead);
            estimates.insert(0, e);
        }
    }
    let mut scored = Vec::new();
    for (i, (estimate, c, mut variants)) in estimates.into_iter().enumerate() {
        if i == 0 && c.values.len() > SCORE_VALUES {
            // Every hot value the probe did not cover (hottest first).
            let probed: Vec<Option<u64>> = variants.variants.iter().map(|v| v.0).collect();
            let tried = probe_values(c, &r.candidates);
            let rest = TriggerCandidate {
                values: c
                    .values
                    .iter()
                    .filter(|(v, _)| {
                        !tried.iter().any(|t| t.0 == *v) && !probed.contains(&Some(*v))
                    })
                    .copied()
                    .collect(),
                ..c.clone()
            };
            let (_, more) = specialize_candidate(mem, r, &rest, &consts, forward, t0 + PLAN_BUDGET);
            variants.variants.extend(more.variants);
            variants.took += more.took;
            add_stats(&mut variants.stats, &more.stats);
            if let Some(n) = notes
                .iter_mut()
                .find(|n| n.address == c.address && n.register == c.register)
            {
                n.folded = Some(variants.stats.clone());
            }
        }
        // Others keep their probed variants only: a fallback when the best one cannot be installed.
        scored.push(Scored {
            estimate,
            candidate: c.clone(),
            specialized: variants,
        });
    }
    (scored, notes)
}

/// The order in which `candidates` (profile order, best first) are scored, as indices. Candidates with mostly the
/// same hot values are one quantity seen at several instructions, often in several registers (a configuration
/// pointer passed in `rdi` and copied to `rdx`); the profile ranks them by samples, so one family can fill every
/// one of the [`MAX_SCORED`] places while another, or the family's own earliest instruction (the one that sees
/// the most of the region and folds the most), is never scored. First each family's earliest instruction, in the
/// order the families first appear; then the rest in profile order.
pub fn scoring_order(candidates: &[TriggerCandidate]) -> Vec<usize> {
    // Family of each candidate: the first earlier candidate it shares its values with leads it.
    let mut leader: Vec<usize> = Vec::with_capacity(candidates.len());
    for (i, c) in candidates.iter().enumerate() {
        let family = (0..i)
            .find(|&j| leader[j] == j && same_values(&candidates[j], c))
            .unwrap_or(i);
        leader.push(family);
    }
    let mut first: Vec<usize> = Vec::new();
    for (i, &l) in leader.iter().enumerate() {
        if l != i {
            continue;
        }
        let earliest = (0..candidates.len())
            .filter(|&k| leader[k] == l)
            .min_by_key(|&k| (candidates[k].address, candidates[k].register.index(), k))
            .unwrap_or(i);
        first.push(earliest);
    }
    let rest = (0..candidates.len()).filter(|k| !first.contains(k));
    first.iter().copied().chain(rest).collect()
}

/// Candidates whose estimates are within this fraction of the best one's are tied, however many samples they have.
pub const NEAR_TIE: f64 = 0.05;
/// Standard errors of sampling noise within which two estimates tie ([`within_noise`]).
pub const NOISE_SIGMAS: f64 = 2.0;
/// Two estimates of which one is below this fraction of the other never tie.
pub const MAX_TIE: f64 = 0.5;

/// Whether estimates `a` (from `na` samples) and `b` (from `nb`) are equal as far as the samples can tell. An
/// estimate counts how often its trigger ran from timer samples, so its relative error is about 1/sqrt(samples)
/// (Poisson); they tie when their difference is under [`NOISE_SIGMAS`] standard errors of the two. On 50 samples
/// each that is 40%: a plan that took the best by a few samples' margin flipped between candidates run to run.
pub fn within_noise(a: f64, na: u64, b: f64, nb: u64) -> bool {
    let rel = (1.0 / na.max(1) as f64 + 1.0 / nb.max(1) as f64).sqrt();
    let tolerance = (NOISE_SIGMAS * rel).clamp(NEAR_TIE, MAX_TIE);
    a.min(b) >= a.max(b) * (1.0 - tolerance)
}

/// How often `c`'s trigger runs, as far as the samples can tell: the samples of its hot values, or those of a
/// sibling candidate when that has more. Timer samples land on whichever instruction of a block the interrupt hit
/// (skid), so candidates that read the same register with the same values — the bytecode pc at neighbouring
/// instructions of one dispatch — run equally often; giving them one frequency leaves their scores to differ in
/// what specializing folds, which does not change from run to run.
pub fn trigger_frequency(c: &TriggerCandidate, all: &[TriggerCandidate]) -> u64 {
    let samples = |t: &TriggerCandidate| t.values.iter().map(|v| v.1).sum::<u64>();
    siblings(c, all)
        .map(samples)
        .max()
        .unwrap_or(0)
        .max(samples(c))
}

/// The [`SCORE_VALUES`] values `c` is scored on, with the weights it is scored with: its values ranked by their
/// samples summed over `c` and its siblings (the candidates [`trigger_frequency`] groups with it), ties by value. The hottest values of one
/// candidate alone change from run to run with the samples; the sum over the group changes much less.
pub fn probe_values(c: &TriggerCandidate, all: &[TriggerCandidate]) -> Vec<(u64, u64)> {
    let siblings: Vec<&TriggerCandidate> = siblings(c, all).collect();
    let mut ranked: Vec<(u64, u64, u64)> = c
        .values
        .iter()
        .map(|&(v, own)| {
            let group: u64 = siblings
                .iter()
                .flat_map(|o| o.values.iter())
                .filter(|(w, _)| *w == v)
                .map(|(_, s)| s)
                .sum();
            (v, own, group.max(own))
        })
        .collect();
    ranked.sort_by(|a, b| b.2.cmp(&a.2).then(a.0.cmp(&b.0)));
    // Weighted by the group's samples too: siblings that fold the same per value then score the same.
    ranked
        .into_iter()
        .take(SCORE_VALUES)
        .map(|(v, _, group)| (v, group))
        .collect()
}

/// The candidates of `all` (`c` among them) that read the same register with mostly the same hot values.
fn siblings<'a>(
    c: &'a TriggerCandidate,
    all: &'a [TriggerCandidate],
) -> impl Iterator<Item = &'a TriggerCandidate> {
    all.iter()
        .filter(move |o| o.register == c.register && same_values(c, o))
}

/// Whether two candidates see mostly the same hot values (at least half of the smaller set is in the other).
fn same_values(a: &TriggerCandidate, b: &TriggerCandidate) -> bool {
    overlaps(&a.values, &b.values)
}

/// Registers to assume at a mid-function trigger: those the profile saw holding one value there (e.g. an
/// interpreter's bytecode base, which bytecode jump targets are computed from) and that some instruction of the
/// region names as an operand (a caller's callee-saved register the region never touches cannot help folding,
/// and every assumed register costs a compare on each entry), except the trigger register and the registers proven constant there
/// (known without a check). At a function entry the arguments change per call: none.
pub fn assumed_for(
    mem: &dyn Memory,
    r: &RegionPlan,
    c: &TriggerCandidate,
    consts: &FunctionConstants,
) -> Vec<(Gpr, u64)> {
    if c.address == r.start {
        return Vec::new();
    }
    let named = registers_named(mem, r.start, r.end);
    let mut out: Vec<(Gpr, u64)> = Vec::new();
    for &(g, v) in r.stable_at(c.address) {
        let constant = consts.at(c.address).iter().any(|(k, _)| *k == g);
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

/// Specialize the region at `c` for each hot value of its register (plus the registers proven constant there,
/// and the registers assumed there), starting no value after `deadline`; returns the benefit (folded
/// instructions weighted by value frequency) and the variants worth a stub.
pub fn specialize_candidate(
    mem: &dyn Memory,
    r: &RegionPlan,
    c: &TriggerCandidate,
    consts: &FunctionConstants,
    forward: &Forwarding,
    deadline: Instant,
) -> (f64, Specialized) {
    let started = Instant::now();
    let opts = Options {
        redispatch_at: Some((c.address, c.register)),
        ..options(forward)
    };
    let assumed = assumed_for(mem, r, c, consts);
    // Proven on every path from the function's entry: known without a check (unless the profile saw the
    // register hold something else there: code the analysis does not see).
    let seen = r.stable_at(c.address);
    let proven: Vec<(Gpr, u64)> = consts
        .at(c.address)
        .iter()
        .filter(|(g, v)| *g != c.register && !seen.iter().any(|(h, w)| h == g && w != v))
        .copied()
        .collect();
    let mut benefit = 0.0;
    let mut variants = Vec::new();
    let mut stats = Stats::default();
    let mut rejected = None;
    for &(value, samples) in &c.values {
        if Instant::now() > deadline {
            break;
        }
        let mut known = KnownState::default();
        for (g, v) in proven.iter().chain(&assumed) {
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
        let var = match specializer::specialize(&req, mem) {
            Ok(v) => v,
            Err(e) => {
                rejected.get_or_insert(Reason::SpecializeFailed(e.to_string()));
                continue;
            }
        };
        add_stats(&mut stats, &var.stats);
        if let Some(why) = why_not_worth_a_stub(&var.stats, var.loops()) {
            rejected.get_or_insert(why);
            continue;
        }
        // Folded work x how often the trigger runs with this value (ARCHITECTURE.md, "Planning"): a trigger on
        // the loop head beats one on a rarely taken path that folds as much.
        benefit += samples as f64 * var.stats.folded as f64;
        variants.push((Some(value), var));
    }
    (
        benefit,
        Specialized {
            variants,
            assumed,
            forwards: forward.is_some(),
            stats,
            rejected,
            took: started.elapsed(),
        },
    )
}

/// Pages the store profile saw watched but never written: constant as long as they are guarded.
pub fn constant_pages(watched: &BTreeSet<Addr>, written: &BTreeSet<Addr>) -> BTreeSet<Addr> {
    watched
        .iter()
        .filter(|p| !written.contains(p))
        .map(|p| p.page())
        .collect()
}

#[cfg(test)]
mod tests;
