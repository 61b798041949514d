//! `Cache`: installs variants behind dispatch stubs, guards their pages, invalidates and deoptimizes.

use std::collections::{BTreeMap, BTreeSet};

use iced_x86::{Decoder, DecoderOptions, FlowControl};
use specializer::{Addr, DeoptEntry, Flag, Gpr, KnownState, Variant};
use tracer::{mapping_at, read_maps, Pid, Tracer};

use crate::arena::{publish, Arena};
use crate::error::{BadRequestReason, UnguardableReason, UnpatchableReason};
use crate::guard::{GuardKind, GuardSet};
use crate::stub::{
    build_stub, jmp_rel32, plan_patch, PatchSite, Rollback, Stub, StubTarget, PATCH_LEN,
};
use crate::CacheError;

/// A page invalidated this many times is never guarded again (the session should stop specializing on it).
pub const MAX_INVALIDATIONS_PER_PAGE: u32 = 3;
/// Free code bytes an arena must have to take another install (several variants of the default 64 KiB cap).
const ARENA_HEADROOM: u64 = 512 << 10;
/// Bytes of stack scanned above rsp for return addresses into dead variants (see [`Cache::invalidate`]).
const STACK_SCAN_LIMIT: u64 = 8 << 20;

/// Identifies one installed dispatch stub (one trigger address).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstallId(pub u64);

/// Identifies one installed variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VariantId(pub u64);

/// What to install at one trigger address.
#[derive(Clone, Debug)]
pub struct InstallRequest {
    /// Patch site = entry of every variant (the trigger instruction, or the region entry).
    pub trigger: Addr,
    /// The register the stub compares; None: one variant, entered unconditionally.
    pub register: Option<Gpr>,
    /// Registers whose exact values every variant was specialized for, besides the trigger register: the stub
    /// enters a variant only when each of them holds its value (else the original code runs). Never rsp, never
    /// the trigger register, each at most once.
    pub assumed: Vec<(Gpr, u64)>,
    /// Bounds of the original function around the trigger (for the branch-target check of invariant 6).
    pub region: (Addr, Addr),
    /// One variant per hot value (`Some(value)` with a register, `None` without).
    pub variants: Vec<(Option<u64>, Variant)>,
    /// Page contents the variants were specialized from ([`crate::TargetMemory::snapshots`]); after the
    /// pages are guarded they are compared with the target, and a page that changed meanwhile refuses the
    /// install. Empty: the caller guarantees the threads stayed stopped since specialization.
    pub snapshots: BTreeMap<Addr, Vec<u8>>,
}

/// One variant as the report sees it.
#[derive(Clone, Debug)]
pub struct VariantInfo {
    pub id: VariantId,
    pub install: InstallId,
    /// The original function (region) the variant specializes.
    pub region: (Addr, Addr),
    pub trigger: Addr,
    pub register: Option<Gpr>,
    pub value: Option<u64>,
    /// Where its code lives in the target.
    pub base: Addr,
    pub code_bytes: usize,
    pub folded: usize,
    pub residual: usize,
    pub guard_pages: Vec<Addr>,
    /// Pages guarded with userfaultfd / mprotect / not at all (read-only mappings).
    pub guard_kinds: Vec<(Addr, GuardKind)>,
    pub alive: bool,
}

/// Entry counts read from the target.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Entries per variant (dead variants keep their last count).
    pub entries: BTreeMap<VariantId, u64>,
    /// Stub fall-backs (trigger value not among the hot values) per install.
    pub fallbacks: BTreeMap<InstallId, u64>,
}

/// What one invalidation did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalidation {
    pub page: Addr,
    pub variants: Vec<VariantId>,
    /// The page reached [`MAX_INVALIDATIONS_PER_PAGE`] and will not be guarded again.
    pub never_again: bool,
    /// Threads moved out of dead variants or stubs (deoptimized).
    pub threads_moved: usize,
    /// Return addresses into dead variants redirected (return sites patched + stack slots rewritten).
    pub returns_redirected: usize,
}

#[derive(Debug)]
struct LiveVariant {
    install: InstallId,
    value: Option<u64>,
    base: Addr,
    len: usize,
    deopt: Vec<DeoptEntry>,
    /// (return site in the variant, original return address) of residual calls.
    ret_sites: Vec<(Addr, Addr)>,
    exit_targets: Vec<Addr>,
    guard_pages: Vec<Addr>,
    guard_kinds: Vec<(Addr, GuardKind)>,
    counter: Addr,
    folded: usize,
    residual: usize,
    alive: bool,
}

impl LiveVariant {
    fn contains(&self, a: u64) -> bool {
        a >= self.base.0 && a < self.base.0 + self.len as u64
    }
}

#[derive(Debug)]
struct Installed {
    trigger: Addr,
    region: (Addr, Addr),
    register: Option<Gpr>,
    /// Registers the stub checks besides the trigger register (kept for rebuilt stubs).
    assumed: Vec<(Gpr, u64)>,
    patch: PatchSite,
    arena: usize,
    /// Every stub built for this install; the last one is current. Old stubs stay in the arena untouched, so
    /// a thread in their fall-back path keeps running correct code.
    stubs: Vec<Stub>,
    patched: bool,
    variants: Vec<VariantId>,
    fallback_counter: Addr,
}

/// The code cache of one process.
///
/// # Stopped threads
/// Installing, invalidating, uninstalling and stripping a fork child need "every thread stopped": each thread
/// of the process is in a ptrace-stop, or is *parked in vfork*. `Tracer::stop_all` leaves a thread that waits
/// in `vfork` (also `posix_spawn`, `system()`: clone with CLONE_VFORK) running, since it cannot reach a
/// ptrace-stop until its child execs or exits. Such a thread counts as stopped because
/// - it is in the kernel and cannot run user code: when its child lets it go it reports
///   `PTRACE_EVENT_VFORK_DONE` (a ptrace-stop) before returning to user space, and stays there until resumed;
/// - its user RIP (read from /proc/PID/task/TID/syscall) follows the `syscall` instruction that entered vfork,
///   which is never strictly inside a patch's displaced bytes (`plan_patch` refuses system calls there) nor in
///   generated code (variants exit before a system call; stubs have none);
/// - the only thing that cannot be done to it is changing its registers, and it is never where that is needed.
///
/// Its stack (RSP from the same file) is scanned for return addresses into dead variants and signal frames like
/// every other thread's. Any other running thread, a parked thread whose position cannot be read, or one found
/// inside generated code or displaced bytes makes the operation fail with [`CacheError::NotStopped`] before it
/// changes anything. Limit: the threads of a vfork *child* (they run in this process's memory until they exec
/// or exit) are not examined, as before.
#[derive(Debug)]
pub struct Cache {
    pid: Pid,
    arenas: Vec<Arena>,
    installs: BTreeMap<InstallId, Installed>,
    variants: BTreeMap<VariantId, LiveVariant>,
    guards: GuardSet,
    invalidations: BTreeMap<Addr, u32>,
    never_guard: BTreeSet<Addr>,
    next_id: u64,
}

/// A stopped thread of `pid` for remote system calls: one not in vfork if there is one (a thread stopped at its
/// vfork event cannot run them), else any stopped thread.
fn stopped_thread(tr: &Tracer, pid: Pid) -> Result<Pid, CacheError> {
    let stopped: Vec<Pid> = tr
        .threads(pid)
        .into_iter()
        .filter(|t| tr.is_stopped(*t))
        .collect();
    stopped
        .iter()
        .find(|t| !tr.in_vfork(**t))
        .or(stopped.first())
        .copied()
        .ok_or(CacheError::Tracer(tracer::TracerError::NotStopped(pid)))
}

/// A thread that `Tracer::stop_all` leaves running because it waits in `vfork` for its child (see [`World`]).
#[derive(Clone, Copy, Debug)]
struct Parked {
    tid: Pid,
    /// Its user RIP and RSP, from /proc/PID/task/TID/syscall.
    rip: u64,
    rsp: u64,
}

/// Proof that every thread of one process is stopped (see the "Stopped threads" section of [`Cache`]): each is
/// in a ptrace-stop, or parked in `vfork` at a known position outside generated code. Every operation that
/// writes a patch site or moves threads takes one, made by [`Cache::stopped_world`] before anything changes.
struct World {
    pid: Pid,
    parked: Vec<Parked>,
}

impl World {
    fn parked(&self, tid: Pid) -> Option<&Parked> {
        self.parked.iter().find(|p| p.tid == tid)
    }

    /// (tid, rip, rsp) of every thread: registers of stopped threads, the /proc position of parked ones.
    fn positions(&self, tr: &Tracer) -> Result<Vec<(Pid, u64, u64)>, CacheError> {
        tr.threads(self.pid)
            .into_iter()
            .map(|tid| match self.parked(tid) {
                Some(p) => Ok((tid, p.rip, p.rsp)),
                None => tr
                    .regs(tid)
                    .map(|r| (tid, r.rip, r.rsp))
                    .map_err(Into::into),
            })
            .collect()
    }
}

/// The user (rsp, rip) of a thread blocked in a vfork-like system call (vfork, clone, clone3), read from
/// /proc/PID/task/TID/syscall (`nr args... sp pc` while blocked in a system call); None otherwise.
fn vfork_position(pid: Pid, tid: Pid) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    parse_vfork_position(&text)
}

/// [`vfork_position`] of the text of a /proc/PID/task/TID/syscall file.
fn parse_vfork_position(text: &str) -> Option<(u64, u64)> {
    let fields: Vec<&str> = text.split_whitespace().collect();
    let nr: i64 = fields.first()?.parse().ok()?;
    if !matches!(nr, libc::SYS_vfork | libc::SYS_clone | libc::SYS_clone3) || fields.len() < 3 {
        return None;
    }
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    Some((
        hex(fields[fields.len() - 2])?,
        hex(fields[fields.len() - 1])?,
    ))
}

fn reg_mut(r: &mut libc::user_regs_struct, g: Gpr) -> &mut u64 {
    match g {
        Gpr::Rax => &mut r.rax,
        Gpr::Rcx => &mut r.rcx,
        Gpr::Rdx => &mut r.rdx,
        Gpr::Rbx => &mut r.rbx,
        Gpr::Rsp => &mut r.rsp,
        Gpr::Rbp => &mut r.rbp,
        Gpr::Rsi => &mut r.rsi,
        Gpr::Rdi => &mut r.rdi,
        Gpr::R8 => &mut r.r8,
        Gpr::R9 => &mut r.r9,
        Gpr::R10 => &mut r.r10,
        Gpr::R11 => &mut r.r11,
        Gpr::R12 => &mut r.r12,
        Gpr::R13 => &mut r.r13,
        Gpr::R14 => &mut r.r14,
        Gpr::R15 => &mut r.r15,
    }
}

/// Write the folded registers and flags of `st` into `r`.
fn apply_state(r: &mut libc::user_regs_struct, st: &KnownState) {
    for g in Gpr::ALL {
        if let Some(v) = st.reg(g) {
            *reg_mut(r, g) = v;
        }
    }
    for f in Flag::ALL {
        if let Some(v) = st.flag(f) {
            let bit = 1u64 << f.rflags_bit();
            if v {
                r.eflags |= bit;
            } else {
                r.eflags &= !bit;
            }
        }
    }
}

impl Cache {
    /// The code cache of process `pid` (threads stopped): creates its guard set (a userfaultfd made in the
    /// target). Arenas are mapped on the first install near each module.
    pub fn new(tr: &mut Tracer, pid: Pid) -> Result<Cache, CacheError> {
        let pid = tr
            .tgid(pid)
            .ok_or(tracer::TracerError::UnknownThread(pid))?;
        let tid = stopped_thread(tr, pid)?;
        let guards = GuardSet::new(tr, pid, tid)?;
        Ok(Cache {
            pid,
            arenas: Vec::new(),
            installs: BTreeMap::new(),
            variants: BTreeMap::new(),
            guards,
            invalidations: BTreeMap::new(),
            never_guard: BTreeSet::new(),
            next_id: 1,
        })
    }

    /// The process (tgid).
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// The guard set (fault polling, uffd availability).
    pub fn guards(&self) -> &GuardSet {
        &self.guards
    }

    /// Whether `page` reached [`MAX_INVALIDATIONS_PER_PAGE`]: do not specialize on it again.
    pub fn never_guard(&self, page: Addr) -> bool {
        self.never_guard.contains(&page.page())
    }

    /// Every page that reached [`MAX_INVALIDATIONS_PER_PAGE`].
    pub fn never_guard_pages(&self) -> BTreeSet<Addr> {
        self.never_guard.clone()
    }

    /// (address, original bytes) of every active patch (what [`crate::TargetMemory`] shows instead).
    pub fn patched_bytes(&self) -> Vec<(Addr, Vec<u8>)> {
        self.installs
            .values()
            .filter(|i| i.patched)
            .map(|i| (i.patch.site, i.patch.original.clone()))
            .collect()
    }

    /// `[start, end)` of every arena's code and counters.
    pub fn arena_ranges(&self) -> Vec<(u64, u64)> {
        self.arenas
            .iter()
            .flat_map(|a| {
                [
                    (a.code.0 .0, a.code.1 .0),
                    (a.counters.0 .0, a.counters.1 .0),
                ]
            })
            .collect()
    }

    /// Check that every thread of `pid` (this process, or a fork child being stripped) is stopped: in a
    /// ptrace-stop, or parked in `vfork` outside generated code and outside every active patch's displaced bytes.
    /// Else [`CacheError::NotStopped`] names the first thread that is not.
    fn stopped_world(&self, tr: &Tracer, pid: Pid) -> Result<World, CacheError> {
        let mut parked = Vec::new();
        for tid in tr.threads(pid) {
            if tr.is_stopped(tid) {
                continue;
            }
            let not_stopped = CacheError::NotStopped { tid: tid.as_raw() };
            if !tr.in_vfork(tid) {
                return Err(not_stopped);
            }
            let Some((rsp, rip)) = vfork_position(pid, tid) else {
                return Err(not_stopped);
            };
            // Never so for a thread that entered vfork with a `syscall` instruction (generated code has none and
            // displaced bytes never hold one); checked because its registers cannot be changed.
            let generated = self
                .arenas
                .iter()
                .any(|a| rip >= a.code.0 .0 && rip < a.code.1 .0);
            let displaced = self
                .installs
                .values()
                .any(|i| i.patched && i.patch.strictly_inside(rip));
            if generated || displaced {
                return Err(not_stopped);
            }
            parked.push(Parked { tid, rip, rsp });
        }
        Ok(World { pid, parked })
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn arena_for(&mut self, tr: &mut Tracer, tid: Pid, a: Addr) -> Result<usize, CacheError> {
        // An arena with room for one more install at the specializer's default size cap (otherwise map another
        // one next to the module: the old one stays, its code may still be running).
        if let Some(i) = self.arenas.iter().rposition(|x| {
            x.serves(a) && x.remaining() >= ARENA_HEADROOM && x.counters_remaining() >= 64
        }) {
            return Ok(i);
        }
        let arena = Arena::create(tr, self.pid, tid, a)?;
        self.arenas.push(arena);
        Ok(self.arenas.len() - 1)
    }

    /// Read original code (patches overlaid with the bytes they replaced).
    fn read_original(&self, tr: &Tracer, a: Addr, buf: &mut [u8]) -> Result<(), CacheError> {
        tr.read_memory(self.pid, a, buf)?;
        let end = a.0 + buf.len() as u64;
        for i in self.installs.values().filter(|i| i.patched) {
            for (k, b) in i.patch.original.iter().enumerate() {
                let x = i.patch.site.0 + k as u64;
                if x >= a.0 && x < end {
                    buf[(x - a.0) as usize] = *b;
                }
            }
        }
        Ok(())
    }

    /// Where a thread that must continue at original address `a` goes: `a`, or the relocated copy of `a` in
    /// the current stub when `a` lies strictly inside an active patch.
    fn map_original(&self, a: Addr) -> u64 {
        for i in self.installs.values().filter(|i| i.patched) {
            if i.patch.strictly_inside(a.0) {
                if let Some(r) = i.stubs.last().and_then(|s| s.relocated_of(a)) {
                    return r.0;
                }
            }
        }
        a.0
    }

    /// Install `req`: encode each variant into the arena near the trigger, guard every page they rely on,
    /// build the dispatch stub and write the 5-byte patch. Every thread of the process must be stopped.
    ///
    /// Refuses (typed error, nothing changed in the program's code) when: the request is inconsistent; a
    /// stub already exists at the trigger; the patch site fails the checks of invariant 6; a variant exits into
    /// the displaced bytes; a page cannot be guarded or was invalidated too often; a snapshot page changed.
    pub fn install(
        &mut self,
        tr: &mut Tracer,
        req: InstallRequest,
    ) -> Result<InstallId, CacheError> {
        let world = self.stopped_world(tr, self.pid)?;
        let tid = stopped_thread(tr, self.pid)?;
        let t = req.trigger;
        if req.variants.is_empty() {
            return Err(CacheError::BadRequest(BadRequestReason::NoVariants));
        }
        let mut seen = BTreeSet::new();
        for (v, var) in &req.variants {
            if var.entry != t {
                return Err(CacheError::BadRequest(BadRequestReason::EntryNotTrigger {
                    entry: var.entry,
                    trigger: t,
                }));
            }
            if v.is_some() != req.register.is_some() {
                return Err(CacheError::BadRequest(
                    BadRequestReason::ValuesWithoutRegister,
                ));
            }
            if !seen.insert(*v) {
                return Err(CacheError::BadRequest(BadRequestReason::DuplicateValue));
            }
        }
        for (i, (g, _)) in req.assumed.iter().enumerate() {
            if *g == Gpr::Rsp
                || Some(*g) == req.register
                || req.assumed[..i].iter().any(|(h, _)| h == g)
            {
                return Err(CacheError::BadRequest(BadRequestReason::BadAssumed(*g)));
            }
        }
        if req.region.0 > t || req.region.1 <= t || req.region.1 .0 - req.region.0 .0 > 16 << 20 {
            return Err(CacheError::BadRequest(
                BadRequestReason::RegionWithoutTrigger,
            ));
        }
        for i in self.installs.values() {
            let overlaps = t.0 < i.patch.site.0 + i.patch.len() as u64
                && i.patch.site.0 < t.0 + PATCH_LEN as u64;
            if i.patched && overlaps {
                return Err(CacheError::AlreadyInstalled(i.patch.site));
            }
        }
        // Patch-site analysis on the original code of the region.
        let mut region = vec![0u8; (req.region.1 .0 - req.region.0 .0) as usize];
        self.read_original(tr, req.region.0, &mut region)?;
        let reader = |a: Addr, b: &mut [u8]| tr.read_memory(self.pid, a, b).is_ok();
        let patch = plan_patch(&region, req.region.0, t, &reader)?;
        // No live variant may exit into the new displaced bytes, and no new variant into any active patch.
        for v in self.variants.values().filter(|v| v.alive) {
            if v.exit_targets.iter().any(|e| patch.strictly_inside(e.0)) {
                return Err(CacheError::unpatchable(
                    t,
                    UnpatchableReason::LiveVariantExitsInto,
                ));
            }
        }
        for (_, var) in &req.variants {
            for e in &var.exits {
                if patch.strictly_inside(e.target.0)
                    || self
                        .installs
                        .values()
                        .any(|i| i.patched && i.patch.strictly_inside(e.target.0))
                {
                    return Err(CacheError::unpatchable(
                        t,
                        UnpatchableReason::VariantExitsIntoPatch(e.target),
                    ));
                }
            }
            for p in &var.guard_pages {
                if self.never_guard(*p) {
                    return Err(CacheError::Unguardable(
                        *p,
                        UnguardableReason::InvalidatedTooOften,
                    ));
                }
            }
        }
        let ai = self.arena_for(tr, tid, t)?;
        // Guards first: from here on a write to a page the variants rely on is seen.
        let mut newly = Vec::new();
        let mut kinds: BTreeMap<Addr, GuardKind> = BTreeMap::new();
        let pages: BTreeSet<Addr> = req
            .variants
            .iter()
            .flat_map(|(_, v)| v.guard_pages.iter().map(|p| p.page()))
            .collect();
        for p in &pages {
            let was = self.guards.is_guarded(*p);
            match self.guards.guard(tr, tid, *p) {
                Ok(k) => {
                    if !was && k != GuardKind::ReadOnly {
                        newly.push(*p);
                    }
                    kinds.insert(*p, k);
                }
                Err(e) => {
                    self.release_unused(tr, Some(tid), &newly)?;
                    return Err(e);
                }
            }
        }
        for (p, snap) in &req.snapshots {
            if !pages.contains(p) {
                continue;
            }
            let mut now = vec![0u8; snap.len()];
            if tr.read_memory(self.pid, *p, &mut now).is_err() || &now != snap {
                self.release_unused(tr, Some(tid), &newly)?;
                return Err(CacheError::PageChanged { page: *p });
            }
        }
        match self.install_code(tr, &world, &req, patch, ai, &kinds) {
            Ok(id) => Ok(id),
            Err(e) => {
                self.release_unused(tr, Some(tid), &newly)?;
                Err(e)
            }
        }
    }

    fn install_code(
        &mut self,
        tr: &mut Tracer,
        world: &World,
        req: &InstallRequest,
        patch: PatchSite,
        ai: usize,
        kinds: &BTreeMap<Addr, GuardKind>,
    ) -> Result<InstallId, CacheError> {
        let t = req.trigger;
        let install = InstallId(self.new_id());
        let mut placed = Vec::new();
        for (value, var) in &req.variants {
            let base = self.arenas[ai].cursor();
            let enc = var.encode(base)?;
            let at = self.arenas[ai].alloc(enc.code.len())?;
            debug_assert_eq!(at, base);
            let ret_sites = self.return_sites(tr, base, &enc.code, &enc.deopt)?;
            let counter = self.arenas[ai].alloc_counter()?;
            placed.push((*value, var, enc, ret_sites, counter));
        }
        let fallback_counter = self.arenas[ai].alloc_counter()?;
        let targets: Vec<StubTarget> = placed
            .iter()
            .map(|(v, _, enc, _, c)| StubTarget {
                value: *v,
                entry: enc.base,
                counter: *c,
            })
            .collect();
        let pages: BTreeSet<Addr> = placed
            .iter()
            .flat_map(|(_, var, _, _, _)| var.guard_pages.iter().map(|p| p.page()))
            .collect();
        let stub = self.place_stub(
            tr,
            ai,
            &patch,
            req.register,
            &req.assumed,
            &targets,
            fallback_counter,
            &pages,
        )?;
        let linked = (|| {
            for (_, _, enc, _, _) in &placed {
                publish(tr, self.pid, &self.arenas, enc.base, &enc.code)?;
            }
            // Invariant 6, dynamic half: no thread strictly inside the bytes being replaced.
            self.check_threads_outside(tr, world, &patch)?;
            self.write_patch(tr, world, &patch, stub.entry)
        })();
        if let Err(e) = linked {
            self.guards.unregister_stub_flag(stub.enabled);
            return Err(e);
        }
        let mut ids = Vec::new();
        for (value, var, enc, ret_sites, counter) in placed {
            let id = VariantId(self.new_id());
            let guard_pages: Vec<Addr> = var.guard_pages.iter().map(|p| p.page()).collect();
            self.variants.insert(
                id,
                LiveVariant {
                    install,
                    value,
                    base: enc.base,
                    len: enc.code.len(),
                    deopt: enc.deopt,
                    ret_sites,
                    exit_targets: var.exits.iter().map(|e| e.target).collect(),
                    guard_kinds: guard_pages
                        .iter()
                        .filter_map(|p| kinds.get(p).map(|k| (*p, *k)))
                        .collect(),
                    guard_pages,
                    counter,
                    folded: enc.stats.folded,
                    residual: enc.stats.residual,
                    alive: true,
                },
            );
            ids.push(id);
        }
        self.installs.insert(
            install,
            Installed {
                trigger: t,
                region: req.region,
                register: req.register,
                assumed: req.assumed.clone(),
                patch,
                arena: ai,
                stubs: vec![stub],
                patched: true,
                variants: ids,
                fallback_counter,
            },
        );
        Ok(install)
    }

    /// Build and publish a stub with a fresh enabled word (set to 1, registered with the guard reader for
    /// `pages`).
    #[allow(clippy::too_many_arguments)]
    fn place_stub(
        &mut self,
        tr: &Tracer,
        ai: usize,
        patch: &PatchSite,
        reg: Option<Gpr>,
        assumed: &[(Gpr, u64)],
        targets: &[StubTarget],
        fallback_counter: Addr,
        pages: &BTreeSet<Addr>,
    ) -> Result<Stub, CacheError> {
        let enabled = self.arenas[ai].alloc_counter()?;
        // The counters mapping is rw- data, not code: a plain write (publish is for code).
        tr.write_memory(self.pid, enabled, &1u64.to_le_bytes())?;
        let base = self.arenas[ai].cursor();
        let stub = build_stub(
            base,
            patch,
            reg,
            assumed,
            targets,
            fallback_counter,
            enabled,
        )?;
        let at = self.arenas[ai].alloc(stub.code.len())?;
        debug_assert_eq!(at, base);
        publish(tr, self.pid, &self.arenas, stub.base, &stub.code)?;
        self.guards.register_stub_flag(enabled, pages);
        Ok(stub)
    }

    fn check_threads_outside(
        &self,
        tr: &Tracer,
        world: &World,
        patch: &PatchSite,
    ) -> Result<(), CacheError> {
        for (tid, rip, _) in world.positions(tr)? {
            if patch.strictly_inside(rip) {
                return Err(CacheError::ThreadInsidePatch {
                    tid: tid.as_raw(),
                    rip: Addr(rip),
                    addr: patch.site,
                });
            }
        }
        Ok(())
    }

    /// Write `jmp stub` at the site (padding the rest of the displaced bytes with int3) in the stopped process.
    fn write_patch(
        &self,
        tr: &Tracer,
        world: &World,
        patch: &PatchSite,
        stub: Addr,
    ) -> Result<(), CacheError> {
        let j = jmp_rel32(patch.site.0, stub.0).ok_or_else(|| {
            CacheError::unpatchable(patch.site, UnpatchableReason::StubOutOfReach)
        })?;
        let mut bytes = vec![0xcc; patch.len()];
        bytes[..PATCH_LEN].copy_from_slice(&j);
        tr.write_memory(world.pid, patch.site, &bytes)?;
        Ok(())
    }

    /// Restore the exact original bytes of a patch in the stopped process.
    fn write_unpatch(
        &self,
        tr: &Tracer,
        world: &World,
        patch: &PatchSite,
    ) -> Result<(), CacheError> {
        tr.write_memory(world.pid, patch.site, &patch.original)?;
        Ok(())
    }

    /// Return sites of residual calls in encoded code: (site, original return address).
    fn return_sites(
        &self,
        tr: &Tracer,
        base: Addr,
        code: &[u8],
        deopt: &[DeoptEntry],
    ) -> Result<Vec<(Addr, Addr)>, CacheError> {
        let mut out = Vec::new();
        for d in deopt {
            let off = d.offset as usize;
            let Some(bytes) = code.get(off..) else {
                continue;
            };
            let mut dec = Decoder::with_ip(64, bytes, base.0 + off as u64, DecoderOptions::NONE);
            let ins = dec.decode();
            if !matches!(
                ins.flow_control(),
                FlowControl::Call | FlowControl::IndirectCall
            ) {
                continue;
            }
            let mut ob = [0u8; 16];
            self.read_original(tr, d.original, &mut ob)?;
            let oi = Decoder::with_ip(64, &ob, d.original.0, DecoderOptions::NONE).decode();
            if !matches!(
                oi.flow_control(),
                FlowControl::Call | FlowControl::IndirectCall
            ) {
                return Err(CacheError::BadRequest(BadRequestReason::CallNotMapped {
                    offset: off,
                    original: d.original,
                }));
            }
            out.push((Addr(ins.next_ip()), Addr(oi.next_ip())));
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// Release guards of `pages` that no live variant uses.
    fn release_unused(
        &mut self,
        tr: &mut Tracer,
        tid: Option<Pid>,
        pages: &[Addr],
    ) -> Result<(), CacheError> {
        for p in pages {
            let used = self
                .variants
                .values()
                .any(|v| v.alive && v.guard_pages.contains(p));
            if !used {
                self.guards.release(tr, tid, *p)?;
            }
        }
        Ok(())
    }

    /// Entry and fall-back counts, read from the target.
    pub fn counters(&self, tr: &Tracer) -> Result<Counters, CacheError> {
        let mut c = Counters::default();
        let mut b = [0u8; 8];
        for (id, v) in &self.variants {
            tr.read_memory(self.pid, v.counter, &mut b)?;
            c.entries.insert(*id, u64::from_le_bytes(b));
        }
        for (id, i) in &self.installs {
            tr.read_memory(self.pid, i.fallback_counter, &mut b)?;
            c.fallbacks.insert(*id, u64::from_le_bytes(b));
        }
        Ok(c)
    }

    /// Every variant ever installed (dead ones with `alive: false`).
    pub fn variants(&self) -> Vec<VariantInfo> {
        self.variants
            .iter()
            .map(|(id, v)| {
                let i = &self.installs[&v.install];
                VariantInfo {
                    id: *id,
                    install: v.install,
                    region: i.region,
                    trigger: i.trigger,
                    register: i.register,
                    value: v.value,
                    base: v.base,
                    code_bytes: v.len,
                    folded: v.folded,
                    residual: v.residual,
                    guard_pages: v.guard_pages.clone(),
                    guard_kinds: v.guard_kinds.clone(),
                    alive: v.alive,
                }
            })
            .collect()
    }

    /// Stop every thread (use instead of `Tracer::stop_all` while a cache exists: see [`GuardSet::stop_all`]).
    pub fn stop_all(&self, tr: &mut Tracer) -> Result<(), CacheError> {
        self.guards.stop_all(tr)
    }

    /// Whether a uffd guard fault is waiting (cheap; poll it in the session loop, e.g. every 20 ms).
    pub fn has_guard_faults(&self) -> bool {
        self.guards.has_faults()
    }

    /// Handle pending uffd guard faults: stop every thread, invalidate each written page (its writer is woken
    /// by the release). The caller resumes the threads afterwards (`resume_all`).
    pub fn handle_guard_faults(
        &mut self,
        tr: &mut Tracer,
    ) -> Result<Vec<Invalidation>, CacheError> {
        self.stop_all(tr)?;
        let pages = self.guards.take_faults();
        if tr.threads(self.pid).is_empty() {
            // The process exited meanwhile (e.g. its exit unmapped a guarded page): nothing left to fix; the
            // session sees `Event::Exited` next.
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for page in pages {
            out.push(self.invalidate(tr, page)?);
        }
        Ok(out)
    }

    /// Call on every SIGSEGV signal-delivery-stop of this process. `Some`: the fault was a write to a page
    /// guarded by mprotect; every thread is now stopped, the page invalidated and un-protected, the signal
    /// suppressed: `resume_all` re-executes the write. `None`: the signal is the program's; deliver it.
    pub fn handle_segv(
        &mut self,
        tr: &mut Tracer,
        tid: Pid,
        si: &libc::siginfo_t,
    ) -> Result<Option<Invalidation>, CacheError> {
        let Some(page) = self.guards.is_guard_segv(tr, tid, si) else {
            return Ok(None);
        };
        self.stop_all(tr)?;
        let inv = self.invalidate(tr, page)?;
        tr.suppress_signal(tid);
        Ok(Some(inv))
    }

    /// A SIGSEGV that is not a guard write ([`Cache::handle_segv`] said `None`) but a write that faulted while an
    /// mprotect guard was still on and is reported after it was lifted: resume the thread without the signal.
    /// See [`GuardSet::is_stale_segv`].
    pub fn is_stale_segv(&mut self, tr: &Tracer, tid: Pid, si: &libc::siginfo_t) -> bool {
        self.guards.is_stale_segv(tr, tid, si)
    }

    /// A guarded page was (or is being) written: unlink every variant that depends on it (unpatch the stub, or
    /// rebuild it without them), deoptimize threads inside them, redirect return addresses into them, then
    /// release the guard (which lets a blocked write complete). Every thread must be stopped
    /// ([`Cache::stop_all`]). A page invalidated [`MAX_INVALIDATIONS_PER_PAGE`] times is never guarded again.
    pub fn invalidate(&mut self, tr: &mut Tracer, page: Addr) -> Result<Invalidation, CacheError> {
        let world = self.stopped_world(tr, self.pid)?;
        let page = page.page();
        // Only an mprotect guard needs a thread (for the remote mprotect); uffd guards do not.
        let tid = stopped_thread(tr, self.pid).ok();
        let dead: BTreeSet<VariantId> = self
            .variants
            .iter()
            .filter(|(_, v)| v.alive && v.guard_pages.contains(&page))
            .map(|(id, _)| *id)
            .collect();
        // A fault on a page no live variant depends on any more (two writers raced) does not count.
        let mut never_again = self.never_guard.contains(&page);
        if !dead.is_empty() {
            let n = self.invalidations.entry(page).or_insert(0);
            *n += 1;
            if *n >= MAX_INVALIDATIONS_PER_PAGE {
                never_again = true;
                self.never_guard.insert(page);
            }
        }
        let (threads_moved, returns_redirected) = self.unlink(tr, &world, &dead)?;
        // The written page and every page only the dead variants needed.
        let mut pages: Vec<Addr> = vec![page];
        for id in &dead {
            pages.extend(self.variants[id].guard_pages.iter().copied());
        }
        pages.sort();
        pages.dedup();
        self.release_unused(tr, tid, &pages)?;
        Ok(Invalidation {
            page,
            variants: dead.into_iter().collect(),
            never_again,
            threads_moved,
            returns_redirected,
        })
    }

    /// Unlink `dead` variants: stubs rebuilt or unpatched, threads moved out, return sites redirected.
    /// Returns (threads moved, return addresses redirected).
    fn unlink(
        &mut self,
        tr: &mut Tracer,
        world: &World,
        dead: &BTreeSet<VariantId>,
    ) -> Result<(usize, usize), CacheError> {
        if dead.is_empty() {
            return Ok((0, 0));
        }
        let affected: BTreeSet<InstallId> = dead.iter().map(|d| self.variants[d].install).collect();
        for id in &affected {
            let remaining: Vec<VariantId> = self.installs[id]
                .variants
                .iter()
                .copied()
                .filter(|v| self.variants[v].alive && !dead.contains(v))
                .collect();
            if remaining.is_empty() {
                let inst = &self.installs[id];
                if inst.patched {
                    self.write_unpatch(tr, world, &inst.patch)?;
                }
                if let Some(w) = inst.stubs.last().map(|s| s.enabled) {
                    self.guards.unregister_stub_flag(w);
                }
                if let Some(i) = self.installs.get_mut(id) {
                    i.patched = false;
                }
            } else {
                let inst = &self.installs[id];
                let targets: Vec<StubTarget> = remaining
                    .iter()
                    .map(|v| {
                        let lv = &self.variants[v];
                        StubTarget {
                            value: lv.value,
                            entry: lv.base,
                            counter: lv.counter,
                        }
                    })
                    .collect();
                let (ai, patch, reg, assumed, fc) = (
                    inst.arena,
                    inst.patch.clone(),
                    inst.register,
                    inst.assumed.clone(),
                    inst.fallback_counter,
                );
                let old = inst.stubs.last().map(|s| s.enabled);
                let pages: BTreeSet<Addr> = remaining
                    .iter()
                    .flat_map(|v| self.variants[v].guard_pages.iter().copied())
                    .collect();
                let stub = self.place_stub(tr, ai, &patch, reg, &assumed, &targets, fc, &pages)?;
                self.write_patch(tr, world, &patch, stub.entry)?;
                if let Some(w) = old {
                    self.guards.unregister_stub_flag(w);
                }
                if let Some(i) = self.installs.get_mut(id) {
                    i.stubs.push(stub);
                }
            }
        }
        for d in dead {
            if let Some(v) = self.variants.get_mut(d) {
                v.alive = false;
            }
        }
        let moved = self.move_threads(tr, world, dead, &affected, false)?;
        let redirected = self.redirect_returns(tr, world, dead)?;
        Ok((moved, redirected))
    }

    /// Move every thread of `pid` out of `dead` variants (deoptimize) and out of the stubs of `installs`, and
    /// rewrite signal frames whose saved context is there. `child`: `pid` is a stripped fork child, where no
    /// patch is active. Returns how many contexts were changed.
    fn move_threads(
        &self,
        tr: &mut Tracer,
        world: &World,
        dead: &BTreeSet<VariantId>,
        installs: &BTreeSet<InstallId>,
        child: bool,
    ) -> Result<usize, CacheError> {
        let pid = world.pid;
        let mut moved = 0;
        for tid in tr.threads(pid) {
            if world.parked(tid).is_some() {
                // Outside generated code (checked by `stopped_world`): nothing to move.
                continue;
            }
            let mut r = tr.regs(tid)?;
            if self.relocate(tr, pid, tid, &mut r, dead, installs, child)? {
                tr.set_regs(tid, &r)?;
                moved += 1;
            }
        }
        moved += self.fix_sigframes(tr, world, dead, installs, child)?;
        Ok(moved)
    }

    /// Map one register context (a stopped thread's, or a saved signal context) out of dead code: inside a dead
    /// variant -> its deopt entry (folded registers and flags written, RIP := original); inside a stub ->
    /// rolled back to the trigger, or (fall-back path) left in the relocated original code while the patch
    /// exists. Memory the context refers to (saved registers) is read at its rsp. Returns whether it changed.
    #[allow(clippy::too_many_arguments)]
    fn relocate(
        &self,
        tr: &Tracer,
        pid: Pid,
        tid: Pid,
        r: &mut libc::user_regs_struct,
        dead: &BTreeSet<VariantId>,
        installs: &BTreeSet<InstallId>,
        child: bool,
    ) -> Result<bool, CacheError> {
        let rip = r.rip;
        let no_point = || CacheError::NoDeoptPoint {
            tid: tid.as_raw(),
            rip: Addr(rip),
        };
        if let Some(v) = dead
            .iter()
            .map(|d| &self.variants[d])
            .find(|v| v.contains(rip))
        {
            let off = (rip - v.base.0) as u32;
            let e = v
                .deopt
                .iter()
                .find(|d| d.offset == off)
                .ok_or_else(no_point)?;
            apply_state(r, &e.state);
            r.rip = if child {
                e.original.0
            } else {
                self.map_original(e.original)
            };
            return Ok(true);
        }
        let Some(inst) = installs
            .iter()
            .filter_map(|i| self.installs.get(i))
            .find(|i| i.stubs.iter().any(|s| s.contains(rip)))
        else {
            return Ok(false);
        };
        let stub = inst
            .stubs
            .iter()
            .find(|s| s.contains(rip))
            .ok_or_else(no_point)?;
        match stub.rollback_at(rip).ok_or_else(no_point)? {
            Rollback::ToTrigger {
                rsp_adj,
                rax_at,
                rcx_at,
                flags_at,
                lahf_at,
            } => {
                let mut q = [0u8; 8];
                if let Some(o) = rax_at {
                    tr.read_memory(pid, Addr(r.rsp + o), &mut q)?;
                    r.rax = u64::from_le_bytes(q);
                }
                if let Some(o) = rcx_at {
                    tr.read_memory(pid, Addr(r.rsp + o), &mut q)?;
                    r.rcx = u64::from_le_bytes(q);
                }
                if let Some(o) = flags_at {
                    tr.read_memory(pid, Addr(r.rsp + o), &mut q)?;
                    r.eflags = u64::from_le_bytes(q);
                }
                if let Some(o) = lahf_at {
                    tr.read_memory(pid, Addr(r.rsp + o), &mut q)?;
                    r.eflags = crate::stub::apply_lahf(r.eflags, u64::from_le_bytes(q));
                }
                r.rsp += rsp_adj;
                r.rip = inst.trigger.0;
                Ok(true)
            }
            // Old stub code is never overwritten: a context in a fall-back path stays there while the patch
            // exists; without the patch the original bytes are back and it goes home.
            Rollback::At(a) if child || !inst.patched => {
                r.rip = a.0;
                Ok(true)
            }
            Rollback::At(_) => Ok(false),
        }
    }

    /// Signal frames (`struct rt_sigframe`) on each thread's stack whose saved RIP lies in dead code: the saved
    /// context gets the same treatment as a stopped thread, so `sigreturn` resumes in correct code. A frame is
    /// recognised by its saved RIP (in a dead variant or an affected stub), the saved user code segment (0x33)
    /// and the always-set bits of the saved RFLAGS (bit 1 and IF) around it.
    fn fix_sigframes(
        &self,
        tr: &mut Tracer,
        world: &World,
        dead: &BTreeSet<VariantId>,
        installs: &BTreeSet<InstallId>,
        child: bool,
    ) -> Result<usize, CacheError> {
        // Offsets in mcontext gregs (REG_R8 = 0 ... REG_CSGSFS = 18).
        const GREGS: usize = 19;
        const REG_RIP: usize = 16;
        let ranges: Vec<(u64, u64)> = dead
            .iter()
            .map(|d| &self.variants[d])
            .map(|v| (v.base.0, v.base.0 + v.len as u64))
            .chain(
                installs
                    .iter()
                    .filter_map(|i| self.installs.get(i))
                    .flat_map(|i| i.stubs.iter())
                    .map(|s| (s.base.0, s.base.0 + s.code.len() as u64)),
            )
            .collect();
        if ranges.is_empty() {
            return Ok(0);
        }
        let in_dead = |a: u64| ranges.iter().any(|(s, e)| a >= *s && a < *e);
        let pid = world.pid;
        let maps = read_maps(pid)?;
        let mut fixed = 0;
        for (tid, _, rsp) in world.positions(tr)? {
            let rsp = rsp & !7;
            let Some(m) = mapping_at(&maps, Addr(rsp)) else {
                continue;
            };
            let end = m.end.0.min(rsp.saturating_add(STACK_SCAN_LIMIT));
            let mut buf = vec![0u8; (end - rsp) as usize];
            if tr.read_memory(pid, Addr(rsp), &mut buf).is_err() {
                continue;
            }
            let q = |i: usize| -> u64 {
                u64::from_le_bytes(buf[8 * i..8 * i + 8].try_into().expect("8 bytes"))
            };
            let n = buf.len() / 8;
            for i in REG_RIP..n.saturating_sub(GREGS - REG_RIP) {
                if !in_dead(q(i)) {
                    continue;
                }
                let (efl, csgsfs) = (q(i + 1), q(i + 2));
                if efl & 0x202 != 0x202 || csgsfs & 0xffff != 0x33 {
                    continue;
                }
                let g = i - REG_RIP;
                let gregs: Vec<u64> = (0..GREGS).map(|k| q(g + k)).collect();
                // SAFETY: user_regs_struct is plain old data; all-zero is valid.
                let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
                (r.r8, r.r9, r.r10, r.r11) = (gregs[0], gregs[1], gregs[2], gregs[3]);
                (r.r12, r.r13, r.r14, r.r15) = (gregs[4], gregs[5], gregs[6], gregs[7]);
                (r.rdi, r.rsi, r.rbp, r.rbx) = (gregs[8], gregs[9], gregs[10], gregs[11]);
                (r.rdx, r.rax, r.rcx, r.rsp) = (gregs[12], gregs[13], gregs[14], gregs[15]);
                (r.rip, r.eflags) = (gregs[16], gregs[17]);
                if !self.relocate(tr, pid, tid, &mut r, dead, installs, child)? {
                    continue;
                }
                let out = [
                    r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rdi, r.rsi, r.rbp,
                    r.rbx, r.rdx, r.rax, r.rcx, r.rsp, r.rip, r.eflags,
                ];
                let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
                tr.write_memory(pid, Addr(rsp + 8 * g as u64), &bytes)?;
                fixed += 1;
            }
        }
        Ok(fixed)
    }

    /// Make every residual call of `dead` variants return to the original code: a `jmp` written at the return
    /// site when 5 bytes fit before the next site, else the return addresses on every thread's stack (from rsp
    /// to the end of its stack mapping, at most 8 MiB) are rewritten. Limit: a return address saved elsewhere
    /// (copied off the stack) is only covered by the jmp.
    fn redirect_returns(
        &self,
        tr: &mut Tracer,
        world: &World,
        dead: &BTreeSet<VariantId>,
    ) -> Result<usize, CacheError> {
        let pid = world.pid;
        let mut count = 0;
        let mut scan: BTreeMap<u64, u64> = BTreeMap::new();
        for d in dead {
            let v = &self.variants[d];
            for (k, (site, orig)) in v.ret_sites.iter().enumerate() {
                let room = v
                    .ret_sites
                    .get(k + 1)
                    .map(|(n, _)| n.0)
                    .unwrap_or(v.base.0 + v.len as u64)
                    - site.0;
                match jmp_rel32(site.0, orig.0) {
                    Some(j) if room >= PATCH_LEN as u64 => {
                        publish(tr, pid, &self.arenas, *site, &j)?;
                        count += 1;
                    }
                    _ => {
                        scan.insert(site.0, orig.0);
                    }
                }
            }
        }
        if scan.is_empty() {
            return Ok(count);
        }
        let maps = read_maps(pid)?;
        for (_, _, rsp) in world.positions(tr)? {
            let rsp = rsp & !7;
            let Some(m) = mapping_at(&maps, Addr(rsp)) else {
                continue;
            };
            let end = m.end.0.min(rsp.saturating_add(STACK_SCAN_LIMIT));
            let mut at = rsp;
            while at < end {
                let n = (end - at).min(64 << 10) as usize;
                let mut buf = vec![0u8; n];
                tr.read_memory(pid, Addr(at), &mut buf)?;
                for (i, q) in buf.chunks_exact(8).enumerate() {
                    let val = u64::from_le_bytes(q.try_into().expect("8 bytes"));
                    if let Some(orig) = scan.get(&val) {
                        tr.write_memory(pid, Addr(at + 8 * i as u64), &orig.to_le_bytes())?;
                        count += 1;
                    }
                }
                at += n as u64;
            }
        }
        Ok(count)
    }

    /// Move one stopped thread out of the live variants of `installs` to the matching original instruction
    /// (deoptimize), leaving every variant installed: the thread re-enters at the next trigger. Used before a
    /// signal handler runs on a thread whose variant may hold memory values in registers. Returns whether the
    /// thread was inside one (and moved).
    pub fn evacuate(
        &self,
        tr: &mut Tracer,
        tid: Pid,
        installs: &BTreeSet<InstallId>,
    ) -> Result<bool, CacheError> {
        let variants: BTreeSet<VariantId> = installs
            .iter()
            .filter_map(|i| self.installs.get(i))
            .flat_map(|i| i.variants.iter().copied())
            .filter(|v| self.variants.get(v).is_some_and(|v| v.alive))
            .collect();
        if variants.is_empty() {
            return Ok(false);
        }
        let mut r = tr.regs(tid)?;
        // Stubs never hold memory values: only variants are left (no install is passed for stub rollback).
        let moved = self.relocate(
            tr,
            self.pid,
            tid,
            &mut r,
            &variants,
            &BTreeSet::new(),
            false,
        )?;
        if moved {
            tr.set_regs(tid, &r)?;
        }
        Ok(moved)
    }

    /// Remove one install completely (patch restored, threads moved out, guards released when unused).
    pub fn uninstall(
        &mut self,
        tr: &mut Tracer,
        id: InstallId,
    ) -> Result<Vec<VariantId>, CacheError> {
        let world = self.stopped_world(tr, self.pid)?;
        // Only an mprotect guard needs a thread (for the remote mprotect); uffd guards do not.
        let tid = stopped_thread(tr, self.pid).ok();
        let Some(inst) = self.installs.get(&id) else {
            return Ok(Vec::new());
        };
        let dead: BTreeSet<VariantId> = inst
            .variants
            .iter()
            .copied()
            .filter(|v| self.variants[v].alive)
            .collect();
        if inst.patched {
            self.write_unpatch(tr, &world, &inst.patch)?;
        }
        if let Some(w) = inst.stubs.last().map(|s| s.enabled) {
            self.guards.unregister_stub_flag(w);
        }
        if let Some(i) = self.installs.get_mut(&id) {
            i.patched = false;
        }
        for d in &dead {
            if let Some(v) = self.variants.get_mut(d) {
                v.alive = false;
            }
        }
        self.move_threads(tr, &world, &dead, &BTreeSet::from([id]), false)?;
        self.redirect_returns(tr, &world, &dead)?;
        let pages: Vec<Addr> = dead
            .iter()
            .flat_map(|d| self.variants[d].guard_pages.clone())
            .collect();
        self.release_unused(tr, tid, &pages)?;
        Ok(dead.into_iter().collect())
    }

    /// Restore every patch site, move threads out of variants and stubs, release every guard (threads
    /// stopped). Used on detach and before giving up on a process. The arenas stay mapped (r-x code nobody
    /// enters, and the syscall gadget the tracer may still use); a return address or signal frame that still
    /// points into a dead variant finds valid code there.
    pub fn uninstall_all(&mut self, tr: &mut Tracer) -> Result<(), CacheError> {
        // Checked before the first uninstall, so that a running thread changes nothing.
        self.stopped_world(tr, self.pid)?;
        let ids: Vec<InstallId> = self.installs.keys().copied().collect();
        for id in ids {
            self.uninstall(tr, id)?;
        }
        let tid = stopped_thread(tr, self.pid)?;
        self.guards.release_all(tr, tid)?;
        Ok(())
    }

    /// A fork child (stopped at `Event::Forked`) inherited the patches, arenas and mprotect'ed pages but not
    /// the uffd guards (a vfork child shares the parent's memory and guards: nothing to do): restore the original bytes at every patch site, move its thread out of variants and
    /// stubs, make residual calls in variants return to the original code, and give the mprotect'ed pages back
    /// their protection. The child then runs only original code and may be detached or left running.
    pub fn strip_child(&self, tr: &mut Tracer, child: Pid) -> Result<(), CacheError> {
        let child = tr
            .tgid(child)
            .ok_or(tracer::TracerError::UnknownThread(child))?;
        let world = self.stopped_world(tr, child)?;
        // Unknown (no kcmp) counts as not shared: stripping a child that shares our memory only unpatches our code
        // too (slower, still correct), whereas leaving patches in a real fork child, which has none of our guards,
        // would not be.
        if tracer::same_address_space(self.pid, child) == Some(true) {
            // vfork (or clone with CLONE_VM): the child runs in our memory, under our guards, until it execs or
            // exits; writing "its" code would unpatch the parent.
            return Ok(());
        }
        let all_installs: BTreeSet<InstallId> = self.installs.keys().copied().collect();
        for i in self.installs.values().filter(|i| i.patched) {
            self.write_unpatch(tr, &world, &i.patch)?;
        }
        let live: BTreeSet<VariantId> = self
            .variants
            .iter()
            .filter(|(_, v)| v.alive)
            .map(|(id, _)| *id)
            .collect();
        // Deoptimize as if every install were gone (in the child, it is).
        self.move_threads(tr, &world, &live, &all_installs, true)?;
        self.redirect_returns(tr, &world, &live)?;
        let tid = stopped_thread(tr, child)?;
        for (p, prot) in self.guards.mprotected() {
            match tracer::remote_mprotect(tr, tid, p, 4096, prot) {
                Ok(()) | Err(tracer::TracerError::RemoteSyscall { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// The process exec'd or exited: its memory is gone. Drops every record (nothing to restore).
    pub fn forget(&mut self) {
        self.guards.forget();
        self.installs.clear();
        self.variants.clear();
        self.arenas.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::parse_vfork_position;

    #[test]
    fn vfork_position_only_inside_a_vfork_like_system_call() {
        // As read from a thread waiting in vfork (58): nr, six arguments, sp, pc.
        let waiting = "58 0x56119b69d7b7 0x7fbf719ace9b 0x0 0x7fbf719c4850 0x0 0x0 0x7fbf719ace90 0x7fbf71a853b8\n";
        assert_eq!(
            parse_vfork_position(waiting),
            Some((0x7fbf719ace90, 0x7fbf71a853b8))
        );
        let clone3 = "435 0x7ffd0 0x58 0x0 0x0 0x0 0x0 0x7ffc0 0x7f00123\n";
        assert_eq!(parse_vfork_position(clone3), Some((0x7ffc0, 0x7f00123)));
        // Another system call (read), a thread blocked outside one, a running thread.
        assert_eq!(
            parse_vfork_position("0 0x3 0x7f 0x1 0x0 0x0 0x0 0x7ffe 0x7f01\n"),
            None
        );
        assert_eq!(parse_vfork_position("-1 0x7ffe 0x7f01\n"), None);
        assert_eq!(parse_vfork_position("running\n"), None);
    }
}
