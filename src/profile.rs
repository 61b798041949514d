//! Profile analysis: hot regions, per-(instruction, register) value profiles and the pages hot loads read.
//!
//! Samples are folded in as they arrive ([`Profiler::ingest`]) because the target may be gone by the time the
//! session ends: instruction bytes and symbols are looked up while it still runs, through [`ProfileEnv`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use nix::unistd::Pid;
use specializer::analysis::LinearFunction;
use specializer::insn_info::{decode_info, InsnInfo};
use specializer::{Addr, Gpr};
use tracer::sampler::Sample;

use crate::report::{Hex, HotRegionJson, TopValueJson, TriggerJson};

/// Distinct values counted exactly per (address, register); beyond this the count saturates.
pub const DISTINCT_CAP: usize = 4096;
/// Values reported per trigger candidate.
pub const TOP_K: usize = 64;
/// A candidate with more distinct values than this is penalised (a dispatch stub handles at most this many).
pub const PREDICTABLE_DISTINCT: u64 = 64;
/// Distinct values remembered over all (address, register) pairs: bounds memory on long runs (~50 MB).
pub const VALUE_BUDGET: usize = 1 << 20;
/// Stripped code is grouped into spans of this granularity.
pub const SPAN_GRANULE: u64 = 256;
/// Regions below this share get no value profile.
pub const MIN_REGION_SHARE: f64 = 0.01;
/// Regions analysed for triggers and candidate pages.
pub const MAX_HOT_REGIONS: usize = 8;
/// Trigger candidates reported per region.
pub const MAX_TRIGGERS: usize = 32;
/// Pages per instruction remembered for the store profile.
const PAGES_PER_IP_CAP: usize = 256;

/// Where an instruction address lies, as far as the module map and symbols tell.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Location {
    /// Inside a known function.
    Symbol {
        module: String,
        name: String,
        start: Addr,
        end: Addr,
    },
    /// Inside an executable mapping without a covering symbol (stripped code, JIT code): `start..end` bounds the
    /// mapping so recovered spans never leave it.
    Unsymbolized {
        module: String,
        start: Addr,
        end: Addr,
    },
    /// Not in any mapping we could read.
    Unknown,
}

/// What the profiler needs from the live target.
pub trait ProfileEnv {
    /// Symbolize `ip` in process `pid`.
    fn locate(&mut self, pid: Pid, ip: Addr) -> Location;
    /// Read code bytes at `addr`; return how many leading bytes of `buf` were filled (0 if none).
    fn read_code(&mut self, pid: Pid, addr: Addr, buf: &mut [u8]) -> usize;
}

/// Instructions looked at before a sampled one (see [`Profiler::ingest`]).
pub const BACK_WINDOW: usize = 6;
/// Functions larger than this are not decoded for back-attribution.
const MAX_FUNCTION_BYTES: u64 = 64 * 1024;

/// Per (address, register) value histogram.
#[derive(Default, Debug)]
struct ValueStats {
    samples: u64,
    counts: HashMap<u64, u64>,
    /// Samples whose value arrived after the distinct cap was reached (not in `counts`).
    overflow: u64,
}

impl ValueStats {
    /// Count one sampled value; a new distinct value uses one unit of the profiler-wide `budget`.
    fn add(&mut self, v: u64, budget: &mut usize) {
        self.samples += 1;
        if let Some(c) = self.counts.get_mut(&v) {
            *c += 1;
        } else if self.counts.len() < DISTINCT_CAP && *budget > 0 {
            *budget -= 1;
            self.counts.insert(v, 1);
        } else {
            self.overflow += 1;
        }
    }

    fn distinct(&self) -> u64 {
        // Saturated profiles report at least cap + 1 so readers know the count is a lower bound.
        self.counts.len() as u64 + u64::from(self.overflow > 0)
    }

    /// Top values (most frequent first, ties by value) and the share of samples they cover.
    fn top(&self, k: usize) -> (Vec<(u64, u64)>, f64) {
        let mut v: Vec<(u64, u64)> = self.counts.iter().map(|(&val, &c)| (val, c)).collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v.truncate(k);
        let covered: u64 = v.iter().map(|x| x.1).sum();
        let coverage = if self.samples == 0 {
            0.0
        } else {
            covered as f64 / self.samples as f64
        };
        (v, coverage)
    }
}

/// Per register at one address: the single value every sample saw, or that samples disagreed.
#[derive(Default, Debug, Clone, Copy)]
struct Stable {
    samples: u64,
    value: u64,
    mixed: bool,
}

/// Everything known about one sampled instruction address.
struct IpStats {
    samples: u64,
    location: usize,
    info: Option<Arc<InsnInfo>>,
}

/// A hot region as computed from the samples so far.
#[derive(Clone, Debug, PartialEq)]
pub struct HotRegion {
    pub module: String,
    pub symbol: Option<String>,
    pub start: Addr,
    pub end: Addr,
    pub samples: u64,
    pub share: f64,
}

impl HotRegion {
    fn contains(&self, a: u64) -> bool {
        self.start.0 <= a && a < self.end.0
    }
}

/// Samples a register value needs at one instruction for [`Profiler::watch_pages`] to watch the page it points at.
const MIN_POINTED_SAMPLES: u64 = 3;

/// The `cap` pages with the most samples (ties by address), sorted by address.
fn top_pages(counts: HashMap<u64, u64>, cap: usize) -> Vec<Addr> {
    let mut v: Vec<(u64, u64)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    v.truncate(cap);
    let mut pages: Vec<Addr> = v.into_iter().map(|(p, _)| Addr(p)).collect();
    pages.sort();
    pages
}

/// Accumulates samples; see the module docs.
pub struct Profiler {
    total: u64,
    /// Keyed by (code epoch, address): an exec gives a process a new epoch so old bytes/symbols are not reused.
    ips: HashMap<(u64, u64), IpStats>,
    epochs: HashMap<Pid, u64>,
    next_epoch: u64,
    locations: Vec<Location>,
    location_index: HashMap<Location, usize>,
    values: HashMap<(u64, Gpr), ValueStats>,
    /// Per address: whether each register (by [`Gpr::index`]) held one single value in every sample that saw it
    /// there, whether or not the instruction reads it (loop invariants such as a bytecode base).
    stable: HashMap<u64, [Stable; 16]>,
    /// Per (process, instruction address): page -> samples of its loads.
    pages: HashMap<(Pid, u64), HashMap<u64, u64>>,
    /// Per (process, page): samples of stores into it (how busily the program writes a page).
    store_pages: HashMap<(Pid, u64), u64>,
    /// Decoded code per (epoch, symbol start or 4 KiB block, is-symbol); None when unreadable or too large.
    functions: HashMap<(u64, u64, bool), Option<Arc<LinearFunction>>>,
    /// Distinct values that may still be added (see [`VALUE_BUDGET`]).
    value_budget: usize,
}

impl Default for Profiler {
    fn default() -> Self {
        Profiler::new()
    }
}

impl Profiler {
    /// An empty profile.
    pub fn new() -> Profiler {
        Profiler {
            total: 0,
            ips: HashMap::new(),
            epochs: HashMap::new(),
            next_epoch: 0,
            locations: Vec::new(),
            location_index: HashMap::new(),
            values: HashMap::new(),
            stable: HashMap::new(),
            pages: HashMap::new(),
            store_pages: HashMap::new(),
            functions: HashMap::new(),
            value_budget: VALUE_BUDGET,
        }
    }

    /// Total samples ingested.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// `pid` called execve or exited: its addresses now mean other code (or nothing). Samples so far keep
    /// counting for their regions; its data pages are forgotten.
    pub fn forget_process(&mut self, pid: Pid) {
        self.epochs.remove(&pid);
        self.pages.retain(|(p, _), _| *p != pid);
        self.store_pages.retain(|(p, _), _| *p != pid);
    }

    fn intern(&mut self, loc: Location) -> usize {
        if let Some(&i) = self.location_index.get(&loc) {
            return i;
        }
        self.locations.push(loc.clone());
        self.location_index.insert(loc, self.locations.len() - 1);
        self.locations.len() - 1
    }

    /// Fold samples in.
    pub fn ingest(&mut self, samples: &[Sample], env: &mut dyn ProfileEnv) {
        for s in samples {
            self.total += 1;
            let ip = s.ip.0;
            let next = &mut self.next_epoch;
            let epoch = *self.epochs.entry(s.pid).or_insert_with(|| {
                *next += 1;
                *next
            });
            let key = (epoch, ip);
            if !self.ips.contains_key(&key) {
                let loc = env.locate(s.pid, s.ip);
                let location = self.intern(loc);
                let mut buf = [0u8; 16];
                let n = env.read_code(s.pid, s.ip, &mut buf);
                let info = decode_info(&buf[..n.min(buf.len())], Addr(ip)).map(Arc::new);
                self.ips.insert(
                    key,
                    IpStats {
                        samples: 0,
                        location,
                        info,
                    },
                );
            }
            let Some(st) = self.ips.get_mut(&key) else {
                continue;
            };
            st.samples += 1;
            let location = st.location;
            if let Some(info) = st.info.clone() {
                self.record(s, ip, &info, 0);
            }
            self.back_attribute(s, epoch, location, env);
        }
    }

    /// A sample at A is also a sample of the few instructions that ran just before A in straight-line code, for the
    /// registers they read that nothing in between overwrote. Timer samples land after slow instructions (a stalled
    /// load retires, then the interrupt is taken), so an interpreter's dispatch load is rarely the sampled IP itself
    /// but almost always one of the instructions right before it. The walk stops at direct branch targets and at
    /// anything that does not fall through. This is only a profile: the dispatch stub checks the value at run time.
    fn back_attribute(
        &mut self,
        s: &Sample,
        epoch: u64,
        location: usize,
        env: &mut dyn ProfileEnv,
    ) {
        let key = match &self.locations[location] {
            Location::Symbol { start, .. } => (epoch, start.0, true),
            // Without symbols: a window around the 4 KiB block of the sample.
            Location::Unsymbolized { .. } => (epoch, s.ip.0 & !0xfff, false),
            Location::Unknown => return,
        };
        let func = match self.functions.get(&key) {
            Some(f) => f.clone(),
            None => {
                let f = match self.locations[location].clone() {
                    Location::Symbol { start, end, .. } => {
                        let len = end.0.saturating_sub(start.0);
                        if len == 0 || len > MAX_FUNCTION_BYTES {
                            None
                        } else {
                            let mut buf = vec![0u8; len as usize];
                            let n = env.read_code(s.pid, start, &mut buf);
                            buf.truncate(n);
                            Some(Arc::new(LinearFunction::decode(&buf, start.0)))
                        }
                    }
                    Location::Unsymbolized { start, end, .. } => {
                        decode_window(env, s.pid, s.ip, start, end).map(Arc::new)
                    }
                    Location::Unknown => None,
                };
                self.functions.insert(key, f.clone());
                f
            }
        };
        let Some(func) = func else { return };
        let Ok(i) = func.insns.binary_search_by_key(&s.ip.0, |x| x.addr) else {
            return; // not an instruction boundary of the linear decode
        };
        let mut killed = 0u16;
        // The registers as they were before the instructions walked back over (see `register_shift`).
        let mut before: Option<Sample> = None;
        let mut cur = i;
        for _ in 0..BACK_WINDOW {
            if cur == 0 || func.insns[cur].is_target {
                break;
            }
            let prev = &func.insns[cur - 1];
            if !prev.falls_through {
                break;
            }
            // prev's own writes count too: it read its inputs before overwriting them, except a register it only
            // shifts by a constant (`add rdx, 1`: an interpreter's pc advanced at its dispatch), whose earlier
            // value is known.
            match register_shift(&prev.info.instruction) {
                Some((g, delta)) if killed & (1 << g.index()) == 0 => {
                    let b = before.get_or_insert_with(|| s.clone());
                    b.regs[g.index()] = b.regs[g.index()].wrapping_sub(delta);
                    killed |= prev.writes & !(1 << g.index());
                }
                _ => killed |= prev.writes,
            }
            self.record(before.as_ref().unwrap_or(s), prev.addr, &prev.info, killed);
            cur -= 1;
        }
    }

    /// Record the value samples and load pages of the instruction at `addr` as seen by sample `s`, ignoring the
    /// registers in `killed` (overwritten between `addr` and the sampled IP).
    fn record(&mut self, s: &Sample, addr: u64, info: &InsnInfo, killed: u16) {
        let live = |g: Gpr| killed & (1 << g.index()) == 0;
        let stable = self.stable.entry(addr).or_default();
        for g in Gpr::ALL {
            let st = &mut stable[g.index()];
            if g == Gpr::Rsp || !live(g) || st.mixed {
                continue;
            }
            let v = s.regs[g.index()];
            if st.samples == 0 {
                st.value = v;
            } else if st.value != v {
                st.mixed = true;
            }
            st.samples += 1;
        }
        for &g in &info.regs_read {
            // The stack pointer differs per call depth and thread: never a useful trigger.
            if g == Gpr::Rsp || !live(g) {
                continue;
            }
            self.values
                .entry((addr, g))
                .or_default()
                .add(s.regs[g.index()], &mut self.value_budget);
        }
        for m in info.mem.iter().filter(|m| m.is_write) {
            if matches!(m.base, Some(Gpr::Rsp) | Some(Gpr::Rbp)) {
                continue;
            }
            if m.base.is_some_and(|g| !live(g)) || m.index.is_some_and(|g| !live(g)) {
                continue;
            }
            let ea = m.effective_address(|g| s.regs[g.index()]);
            *self.store_pages.entry((s.pid, ea.page().0)).or_default() += 1;
        }
        for m in info.mem.iter().filter(|m| m.is_read) {
            // Stack accesses say nothing about constant data and the stack is always written.
            if matches!(m.base, Some(Gpr::Rsp) | Some(Gpr::Rbp)) {
                continue;
            }
            if m.base.is_some_and(|g| !live(g)) {
                continue;
            }
            let ea = if m.index.is_some_and(|g| !live(g)) {
                // The index was overwritten since (typically by this very load: `movzx ecx, [rdi+rcx]`), the base
                // still holds the array's start: its page is the best guess of what the loop reads. A wrong guess
                // only costs watching one more page.
                match m.base {
                    Some(b) => Addr(m.displacement.wrapping_add(s.regs[b.index()])),
                    None => continue,
                }
            } else {
                m.effective_address(|g| s.regs[g.index()])
            };
            let pages = self.pages.entry((s.pid, addr)).or_default();
            let page = ea.page().0;
            if let Some(c) = pages.get_mut(&page) {
                *c += 1;
            } else if pages.len() < PAGES_PER_IP_CAP {
                pages.insert(page, 1);
            }
        }
    }

    /// Registers (never rsp) that held one single value in every one of at least `min_samples` samples at
    /// instruction `addr` (sampled there or attributed to it), with that value.
    pub fn stable_registers(&self, addr: u64, min_samples: u64) -> Vec<(Gpr, u64)> {
        let Some(stable) = self.stable.get(&addr) else {
            return Vec::new();
        };
        Gpr::ALL
            .into_iter()
            .filter(|g| *g != Gpr::Rsp)
            .filter_map(|g| {
                let st = stable[g.index()];
                (!st.mixed && st.samples >= min_samples.max(1)).then_some((g, st.value))
            })
            .collect()
    }

    /// Samples of stores into `page` of process `pid` (0 when none was sampled).
    pub fn store_samples(&self, pid: Pid, page: u64) -> u64 {
        self.store_pages.get(&(pid, page)).copied().unwrap_or(0)
    }

    /// Hot regions, hottest first: functions where symbols exist, recovered spans elsewhere.
    pub fn hot_regions(&self) -> Vec<HotRegion> {
        if self.total == 0 {
            return Vec::new();
        }
        // Group per location; unsymbolized locations are split into spans below.
        let mut by_loc: HashMap<usize, Vec<(u64, u64)>> = HashMap::new();
        for (&(_, ip), st) in &self.ips {
            by_loc
                .entry(st.location)
                .or_default()
                .push((ip, st.samples));
        }
        let mut regions = Vec::new();
        for (loc, mut ips) in by_loc {
            ips.sort_unstable();
            match &self.locations[loc] {
                Location::Symbol {
                    module,
                    name,
                    start,
                    end,
                } => regions.push(HotRegion {
                    module: module.clone(),
                    symbol: Some(name.clone()),
                    start: *start,
                    end: (*end).max(start.offset(1)),
                    samples: ips.iter().map(|x| x.1).sum(),
                    share: 0.0,
                }),
                Location::Unsymbolized { module, start, end } => {
                    for (s, e, n) in spans(&ips, *start, *end) {
                        regions.push(HotRegion {
                            module: module.clone(),
                            symbol: None,
                            start: s,
                            end: e,
                            samples: n,
                            share: 0.0,
                        });
                    }
                }
                Location::Unknown => {
                    for (s, e, n) in spans(&ips, Addr(0), Addr(u64::MAX)) {
                        regions.push(HotRegion {
                            module: "[unknown]".into(),
                            symbol: None,
                            start: s,
                            end: e,
                            samples: n,
                            share: 0.0,
                        });
                    }
                }
            }
        }
        for r in &mut regions {
            r.share = r.samples as f64 / self.total as f64;
        }
        regions.sort_by(|a, b| b.samples.cmp(&a.samples).then(a.start.cmp(&b.start)));
        regions
    }

    /// The regions worth analysing: the hottest few with at least [`MIN_REGION_SHARE`].
    pub fn analysed_regions(&self) -> Vec<HotRegion> {
        self.hot_regions()
            .into_iter()
            .filter(|r| r.share >= MIN_REGION_SHARE)
            .take(MAX_HOT_REGIONS)
            .collect()
    }

    /// The process whose hot loads were sampled most (the root's children count too: `sh -c prog` runs the work
    /// in a child) and the pages those loads read, most sampled first, at most `cap`, sorted. None if no hot load
    /// was sampled.
    pub fn candidate_pages(&self, cap: usize) -> Option<(Pid, Vec<Addr>)> {
        let (pid, counts) = self.load_page_counts()?;
        Some((pid, top_pages(counts, cap)))
    }

    /// The pages the sampled loads of `[start, end)` in process `pid` read, sorted.
    pub fn region_pages(&self, pid: Pid, start: Addr, end: Addr) -> Vec<Addr> {
        let mut pages: Vec<Addr> = self
            .pages
            .iter()
            .filter(|((p, ip), _)| *p == pid && start.0 <= *ip && *ip < end.0)
            .flat_map(|(_, pages)| pages.keys().map(|&p| Addr(p)))
            .collect();
        pages.sort_unstable();
        pages.dedup();
        pages
    }

    /// The pages for the store profile to watch: [`Profiler::candidate_pages`], and the pages that hot register
    /// values of the analysed regions point at (each value seen [`MIN_POINTED_SAMPLES`] times there, weighted by
    /// its samples). An interpreter's pc is such a value: the bytecode (threaded code) it points at is read by a
    /// load the timer samples rarely land near (the dispatch right before an indirect jump), so the loads alone
    /// may never name its page. A value that is no address names a page the watch finds unmapped and skips.
    pub fn watch_pages(&self, cap: usize) -> Option<(Pid, Vec<Addr>)> {
        let (pid, mut counts) = self.load_page_counts()?;
        let regions = self.analysed_regions();
        for (&(ip, reg), vs) in &self.values {
            if reg == Gpr::Rsp || !regions.iter().any(|r| r.contains(ip)) {
                continue;
            }
            for (&v, &c) in &vs.counts {
                if c >= MIN_POINTED_SAMPLES {
                    *counts.entry(Addr(v).page().0).or_default() += c;
                }
            }
        }
        Some((pid, top_pages(counts, cap)))
    }

    /// The process whose hot loads were sampled most and, per page, the samples of its hot loads into it.
    fn load_page_counts(&self) -> Option<(Pid, HashMap<u64, u64>)> {
        let regions = self.analysed_regions();
        let mut per_pid: HashMap<Pid, HashMap<u64, u64>> = HashMap::new();
        for (&(pid, ip), pages) in &self.pages {
            if regions.iter().any(|r| r.contains(ip)) {
                let counts = per_pid.entry(pid).or_default();
                for (&p, &c) in pages {
                    *counts.entry(p).or_default() += c;
                }
            }
        }
        per_pid
            .into_iter()
            .max_by_key(|(pid, c)| (c.values().sum::<u64>(), std::cmp::Reverse(*pid)))
    }

    /// Trigger candidates of one region, best first.
    fn triggers(&self, region: &HotRegion) -> Vec<TriggerProfile> {
        let mut cands: Vec<(f64, TriggerProfile)> = Vec::new();
        for (&(ip, reg), vs) in &self.values {
            if !region.contains(ip) || vs.samples < 2 {
                continue;
            }
            let (top, coverage) = vs.top(TOP_K);
            let distinct = vs.distinct();
            let mut score = vs.samples as f64 * coverage;
            if distinct > PREDICTABLE_DISTINCT {
                score *= PREDICTABLE_DISTINCT as f64 / distinct as f64;
            }
            let trig = TriggerProfile {
                address: Addr(ip),
                register: reg,
                samples: vs.samples,
                distinct,
                coverage,
                top_values: top,
            };
            cands.push((score, trig));
        }
        cands.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then(a.1.address.cmp(&b.1.address))
                .then(a.1.register.name().cmp(b.1.register.name()))
        });
        cands.into_iter().take(MAX_TRIGGERS).map(|c| c.1).collect()
    }

    /// The analysed hot regions with their trigger candidates (best first): what the planner reads.
    pub fn region_profiles(&self) -> Vec<RegionProfile> {
        self.analysed_regions()
            .into_iter()
            .map(|r| RegionProfile {
                triggers: self.triggers(&r),
                region: r,
            })
            .collect()
    }

    /// Hot regions for the report, the analysed ones with their trigger candidates.
    pub fn report_regions(&self) -> Vec<HotRegionJson> {
        self.region_profiles()
            .into_iter()
            .map(RegionProfile::to_json)
            .collect()
    }
}

/// The value profile of one (instruction, register) pair: a trigger candidate as the samples show it.
#[derive(Clone, Debug, PartialEq)]
pub struct TriggerProfile {
    pub address: Addr,
    pub register: Gpr,
    /// Samples of the register at the address.
    pub samples: u64,
    /// Distinct values seen (a lower bound once saturated).
    pub distinct: u64,
    /// Share of the samples the top values cover.
    pub coverage: f64,
    /// (value, samples), most frequent first, at most [`TOP_K`].
    pub top_values: Vec<(u64, u64)>,
}

/// A hot region and its trigger candidates, best first.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionProfile {
    pub region: HotRegion,
    pub triggers: Vec<TriggerProfile>,
}

impl RegionProfile {
    /// The report's view.
    pub fn to_json(self) -> HotRegionJson {
        let r = self.region;
        HotRegionJson {
            triggers: self
                .triggers
                .into_iter()
                .map(|t| TriggerJson {
                    address: Hex(t.address.0),
                    register: t.register.name().to_string(),
                    samples: t.samples,
                    distinct: t.distinct,
                    coverage: t.coverage,
                    top_values: t
                        .top_values
                        .iter()
                        .map(|&(v, c)| TopValueJson {
                            value: Hex(v),
                            share: c as f64 / t.samples as f64,
                        })
                        .collect(),
                })
                .collect(),
            module: r.module,
            symbol: r.symbol,
            start: Hex(r.start.0),
            end: Hex(r.end.0),
            samples: r.samples,
            share: r.share,
        }
    }
}

/// Code without symbols: decode the 4 KiB block around `ip` (plus a lead-in), starting at the first of 16
/// candidate offsets whose linear decode passes through `ip` — a sampled IP is a true instruction boundary, and x86
/// decoding resynchronises within a few instructions, so the decode before `ip` is almost surely right.
fn decode_window(
    env: &mut dyn ProfileEnv,
    pid: Pid,
    ip: Addr,
    map_start: Addr,
    map_end: Addr,
) -> Option<LinearFunction> {
    const LEAD_IN: u64 = 256;
    let block = ip.0 & !0xfff;
    let lo = block.saturating_sub(LEAD_IN).max(map_start.0);
    let hi = (block + 0x1000 + 16).min(map_end.0);
    if lo >= hi || ip.0 < lo || ip.0 >= hi {
        return None;
    }
    let mut buf = vec![0u8; (hi - lo) as usize];
    let n = env.read_code(pid, Addr(lo), &mut buf);
    buf.truncate(n);
    (0..16u64)
        .filter(|k| lo + k <= ip.0 && (*k as usize) < buf.len())
        .map(|k| LinearFunction::decode(&buf[k as usize..], lo + k))
        .find(|f| f.insns.binary_search_by_key(&ip.0, |x| x.addr).is_ok())
}

/// Split sorted (ip, samples) of code without symbols into spans: 256-byte granules, merging granules separated by
/// at most one empty granule, clamped to `[lo, hi)`.
fn spans(ips: &[(u64, u64)], lo: Addr, hi: Addr) -> Vec<(Addr, Addr, u64)> {
    let mut granules: BTreeMap<u64, u64> = BTreeMap::new();
    for &(ip, n) in ips {
        *granules.entry(ip & !(SPAN_GRANULE - 1)).or_default() += n;
    }
    let mut out: Vec<(u64, u64, u64)> = Vec::new();
    for (g, n) in granules {
        match out.last_mut() {
            Some(last) if g <= last.1.saturating_add(SPAN_GRANULE) => {
                last.1 = g.saturating_add(SPAN_GRANULE);
                last.2 += n;
            }
            _ => out.push((g, g.saturating_add(SPAN_GRANULE), n)),
        }
    }
    out.into_iter()
        .map(|(s, e, n)| {
            let s = s.max(lo.0);
            let e = e.min(hi.0).max(s + 1);
            (Addr(s), Addr(e), n)
        })
        .collect()
}

/// A register `ins` only moves by a constant, and by how much (after = before + delta): `add`/`sub r64, imm`,
/// `inc`/`dec r64`, `lea r64, [r64 + disp]`. Its value before `ins` is its value after minus delta, which lets
/// back-attribution see through an interpreter's `pc += size` (32-bit forms zero-extend: not a shift).
pub fn register_shift(ins: &iced_x86::Instruction) -> Option<(Gpr, u64)> {
    use iced_x86::{Code, OpKind, Register};
    let reg0 = || {
        (ins.op_kind(0) == OpKind::Register && ins.op_register(0).is_gpr64())
            .then(|| Gpr::containing(ins.op_register(0)))
            .flatten()
    };
    let delta = match ins.code() {
        Code::Add_rm64_imm8 | Code::Add_rm64_imm32 => ins.immediate32to64() as u64,
        Code::Sub_rm64_imm8 | Code::Sub_rm64_imm32 => (ins.immediate32to64() as u64).wrapping_neg(),
        Code::Inc_rm64 => 1,
        Code::Dec_rm64 => u64::MAX,
        Code::Lea_r64_m
            if ins.memory_base() == ins.op_register(0)
                && ins.memory_index() == Register::None
                && ins.segment_prefix() == Register::None =>
        {
            ins.memory_displacement64()
        }
        _ => return None,
    };
    let g = reg0()?;
    (g != Gpr::Rsp).then_some((g, delta))
}

#[cfg(test)]
#[path = "profile_tests.rs"]
mod tests;
