//! `Cache`: installs variants behind dispatch stubs, guards their pages, invalidates and deoptimizes.
//!
//! This file holds the records, the stopped-threads check and what the session polls; the operations live by
//! seam: [`install`] (checks, guards, code, patch), [`invalidate`] (invalidation and uninstall), [`deopt`]
//! (threads, signal frames and return addresses out of dead code; evacuation) and [`child`] (fork children).

use std::collections::{BTreeMap, BTreeSet};

use specializer::{Addr, DeoptEntry, Gpr, Variant};
use tracer::{Pid, Stopped, Tracer};

use crate::arena::Arena;
use crate::guard::{GuardKind, GuardSet};
use crate::parked::{parked_threads, Parked};
use crate::stub::{PatchSite, Stub};
use crate::CacheError;

mod child;
mod deopt;
mod install;
mod invalidate;
mod journal;
mod release;

pub use journal::{
    ArenaState, CacheState, DeoptState, InstallState, Journal, RollbackState, StubState,
    VariantState,
};
pub use release::{Kept, Released};

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
    /// Bounds of the original function around the trigger (for the branch-target check of ARCHITECTURE.md invariant 6).
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
/// Installing, invalidating, uninstalling, stripping a fork child and [`crate::arena::publish`] need "every
/// thread stopped": each thread of the process is in a ptrace-stop, or is *parked in vfork*.
/// `Tracer::stop_all` leaves a thread that waits in `vfork` (also `posix_spawn`, `system()`: clone with
/// CLONE_VFORK) running, since it cannot reach a ptrace-stop until its child execs or exits. Such a thread
/// counts as stopped because
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
    /// Last values of the counters of unmapped arenas (read just before unmapping them).
    frozen_counters: BTreeMap<Addr, u64>,
    /// Where each change is recorded before it reaches the target ([`Cache::set_journal`]).
    journal: Option<journal::Sink>,
    /// Variants being removed: marked dead here, still alive in the journal until no thread or return
    /// address is left in them.
    dying: BTreeSet<VariantId>,
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
            frozen_counters: BTreeMap::new(),
            journal: None,
            dying: BTreeSet::new(),
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
            .filter(|a| a.is_mapped())
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
        // A parked thread's RIP is never in generated code or displaced bytes (it follows the `syscall` that
        // entered vfork; generated code has none and displaced bytes never hold one): checked because its
        // registers cannot be changed.
        let parked = parked_threads(tr, pid, |rip| {
            self.arenas.iter().any(|a| a.contains_code(Addr(rip), 1))
                || self
                    .installs
                    .values()
                    .any(|i| i.patched && i.patch.strictly_inside(rip))
        })?;
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
        // Journaled before it is mapped: the guardian unmaps it even if dynspec dies in the middle.
        self.arenas.push(Arena::place(self.pid, a)?);
        let i = self.arenas.len() - 1;
        let mapped = match self.journal_now() {
            Ok(()) => self.arenas[i].map(tr, self.pid, tid),
            Err(e) => Err(e),
        };
        if let Err(e) = mapped {
            self.arenas.pop();
            return Err(e);
        }
        Ok(i)
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

    /// One counter's value: read from the target, or its last value once frozen (its arena unmapped).
    fn read_counter(&self, tr: &Tracer, a: Addr) -> Result<u64, CacheError> {
        if let Some(v) = self.frozen_counters.get(&a) {
            return Ok(*v);
        }
        let mut b = [0u8; 8];
        tr.read_memory(self.pid, a, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Entry and fall-back counts, read from the target.
    pub fn counters(&self, tr: &Tracer) -> Result<Counters, CacheError> {
        let mut c = Counters::default();
        let read = |a: Addr| self.read_counter(tr, a);
        for (id, v) in &self.variants {
            c.entries.insert(*id, read(v.counter)?);
        }
        for (id, i) in &self.installs {
            c.fallbacks.insert(*id, read(i.fallback_counter)?);
        }
        Ok(c)
    }

    /// Passes through install `id`'s dispatch site so far: the entries of its variants plus its stub's
    /// fall-backs, which the stub counts the same way whether it is switched on or off
    /// ([`Cache::set_enabled`]). None once the install is no longer patched in.
    pub fn dispatch_passes(&self, tr: &Tracer, id: InstallId) -> Result<Option<u64>, CacheError> {
        let Some(inst) = self.installs.get(&id).filter(|i| i.patched) else {
            return Ok(None);
        };
        let mut n = self.read_counter(tr, inst.fallback_counter)?;
        for v in &inst.variants {
            n = n.wrapping_add(self.read_counter(tr, self.variants[v].counter)?);
        }
        Ok(Some(n))
    }

    /// Switch install `id`'s stub on (its variants are entered) or off (every pass runs the original code),
    /// while the program runs: no patch is rewritten and no thread stopped. A thread already inside a variant
    /// stays until it leaves. Turning on is refused (Ok(false)) while a page the variants rely on may have
    /// changed; see [`GuardSet::set_stub_enabled`].
    pub fn set_enabled(&self, id: InstallId, on: bool) -> Result<bool, CacheError> {
        let Some(word) = self
            .installs
            .get(&id)
            .filter(|i| i.patched)
            .and_then(|i| i.stubs.last())
            .map(|s| s.enabled)
        else {
            return Ok(false);
        };
        self.guards.set_stub_enabled(word, on)
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

    /// Stop every thread and return the proof that install, invalidate and uninstall require (dropping it
    /// resumes the threads). Use instead of `Tracer::stop_world` while a cache exists: see
    /// [`GuardSet::stop_all`].
    pub fn stop_all<'t>(&self, tr: &'t mut Tracer) -> Result<Stopped<'t>, CacheError> {
        self.guards.stop_all(tr)
    }

    /// Whether a uffd guard fault is waiting (cheap; poll it in the session loop, e.g. every 20 ms).
    pub fn has_guard_faults(&self) -> bool {
        self.guards.has_faults()
    }

    /// Handle pending uffd guard faults: invalidate each written page (its writer is woken by the release), in
    /// a world the caller stopped with [`Cache::stop_all`].
    pub fn handle_guard_faults(
        &mut self,
        tr: &mut Stopped<'_>,
    ) -> Result<Vec<Invalidation>, CacheError> {
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

    /// Call on every SIGSEGV signal-delivery-stop of this process. `Some`: the fault was a write to a page guarded
    /// by mprotect; the world was stopped, the page invalidated and un-protected, the signal suppressed, and the
    /// threads resume when this returns (the faulting write re-executes). `None`: the signal is the program's.
    pub fn handle_segv(
        &mut self,
        tr: &mut Tracer,
        tid: Pid,
        si: &libc::siginfo_t,
    ) -> Result<Option<Invalidation>, CacheError> {
        let Some(page) = self.guards.is_guard_segv(tr, tid, si) else {
            return Ok(None);
        };
        let mut world = self.stop_all(tr)?;
        let inv = self.invalidate(&mut world, page)?;
        world.suppress_signal(tid);
        Ok(Some(inv))
    }

    /// A SIGSEGV that is not a guard write ([`Cache::handle_segv`] said `None`) but a write that faulted while an
    /// mprotect guard was still on and is reported after it was lifted: resume the thread without the signal.
    /// See [`GuardSet::is_stale_segv`].
    pub fn is_stale_segv(&mut self, tr: &Tracer, tid: Pid, si: &libc::siginfo_t) -> bool {
        self.guards.is_stale_segv(tr, tid, si)
    }

    /// The process exec'd or exited: its memory is gone. Drops every record (nothing to restore).
    pub fn forget(&mut self) {
        self.guards.forget();
        self.installs.clear();
        self.variants.clear();
        self.arenas.clear();
        // The journal must not name addresses of the old image: a guardian would "restore" them in the new one.
        self.journal_removal();
    }
}
