//! The journal: the cache's records as plain data, sent to a guardian before each change reaches the target,
//! and the cache rebuilt from them (ARCHITECTURE.md, "The guardian").
//!
//! Each record is the whole state the undo path ([`Cache::uninstall_all`]) needs, written *before* the change
//! it describes: an arena before it is mapped, an install (its variants, stub and patch site) before the
//! patch is written, a rebuilt stub before the patch points at it, a page's original protection before it
//! is guarded. Undoing something the journal names but that never happened is harmless (writing a patch
//! site's original bytes again, unmapping an address range nothing was mapped at while the threads were
//! stopped, restoring a protection only where it is still ours), so a record that runs ahead of the target
//! is safe; one that lags behind would not be. Variants stay alive in the journal until every thread was
//! moved out of them and every return address redirected.

use std::collections::{BTreeMap, BTreeSet};

use iced_x86::{Decoder, DecoderOptions};
use serde::{Deserialize, Serialize};
use specializer::{Addr, DeoptEntry, Gpr, KnownState};
use tracer::uffd::Uffd;
use tracer::Pid;

use super::{Cache, InstallId, Installed, LiveVariant, VariantId};
use crate::arena::Arena;
use crate::guard::{GuardKind, GuardSet};
use crate::stub::{PatchSite, Rollback, Stub};
use crate::CacheError;

/// Where journal records go (the session's end of the guardian's socket). A failed record stops the change
/// it was written for: nothing reaches the target that the guardian could not undo.
pub trait Journal: Send {
    /// Keep `state` (replacing the previous record) before the change it describes is made.
    fn record(&mut self, state: &CacheState) -> std::io::Result<()>;
}

/// The journal sink of a cache (a wrapper so the cache stays `Debug`), and whether a record failed.
pub(super) struct Sink(pub(super) Box<dyn Journal>, pub(super) bool);

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Journal")
    }
}

/// Everything [`Cache::uninstall_all`] needs, as plain data (addresses as u64).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CacheState {
    pub pid: i32,
    pub arenas: Vec<ArenaState>,
    pub installs: Vec<InstallState>,
    pub variants: Vec<VariantState>,
    /// Pages write-protected with the userfaultfd (closing every copy of it un-protects them too).
    pub uffd_pages: Vec<u64>,
    /// Pages guarded with mprotect, or about to be, with their original protection.
    pub mprotected: Vec<(u64, i32)>,
}

impl CacheState {
    /// Whether nothing of the cache is left in the target (no arena mapped, no patch, no guard).
    pub fn is_empty(&self) -> bool {
        self.arenas.iter().all(|a| !a.mapped)
            && self.installs.iter().all(|i| !i.patched)
            && self.variants.iter().all(|v| !v.alive)
            && self.uffd_pages.is_empty()
            && self.mprotected.is_empty()
    }
}

/// One arena (`crate::arena::Arena`) as plain data.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ArenaState {
    pub text: (u64, u64),
    pub code: (u64, u64),
    pub counters: (u64, u64),
    pub next_code: u64,
    pub next_counter: u64,
    pub mapped: bool,
}

/// One install (its patch site, stubs and variants) as plain data.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstallState {
    pub id: u64,
    pub trigger: u64,
    pub region: (u64, u64),
    /// Register index (x86 encoding order).
    pub register: Option<u8>,
    pub assumed: Vec<(u8, u64)>,
    pub patch_site: u64,
    /// The exact bytes the patch displaced (the displaced instructions are decoded from them again).
    pub patch_original: Vec<u8>,
    pub arena: usize,
    pub stubs: Vec<StubState>,
    pub patched: bool,
    pub variants: Vec<u64>,
    pub fallback_counter: u64,
}

/// One dispatch stub ([`Stub`]) as plain data.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StubState {
    pub base: u64,
    pub entry: u64,
    pub enabled: u64,
    pub code: Vec<u8>,
    pub rollback: Vec<(u32, RollbackState)>,
    pub relocated: Vec<(u64, u64)>,
}

/// [`Rollback`] as plain data.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum RollbackState {
    ToTrigger {
        rsp_adj: u64,
        rax_at: Option<u64>,
        rcx_at: Option<u64>,
        flags_at: Option<u64>,
        lahf_at: Option<u64>,
    },
    At(u64),
}

/// One variant (range, deopt entries, return sites, guards, counter) as plain data.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct VariantState {
    pub id: u64,
    pub install: u64,
    pub value: Option<u64>,
    pub base: u64,
    pub len: usize,
    pub deopt: Vec<DeoptState>,
    pub ret_sites: Vec<(u64, u64)>,
    pub guard_pages: Vec<u64>,
    pub counter: u64,
    pub alive: bool,
}

/// One [`DeoptEntry`] as plain data.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeoptState {
    pub offset: u32,
    pub original: u64,
    /// Known registers (index, value) and flags (index, value): most are unknown, so only these are sent.
    pub regs: Vec<(u8, u64)>,
    pub flags: Vec<(u8, bool)>,
}

fn known<T: Copy>(xs: &[Option<T>]) -> Vec<(u8, T)> {
    xs.iter()
        .enumerate()
        .filter_map(|(i, x)| x.map(|x| (i as u8, x)))
        .collect()
}

fn unknown_but<T: Copy, const N: usize>(xs: &[(u8, T)]) -> Result<[Option<T>; N], CacheError> {
    let mut out = [None; N];
    for (i, x) in xs {
        *out.get_mut(*i as usize).ok_or(CacheError::BadJournal(
            "register or flag index out of range",
        ))? = Some(*x);
    }
    Ok(out)
}

fn gpr(i: u8) -> Result<Gpr, CacheError> {
    Gpr::ALL
        .get(i as usize)
        .copied()
        .ok_or(CacheError::BadJournal("register index out of range"))
}

fn stub_state(s: &Stub) -> StubState {
    StubState {
        base: s.base.0,
        entry: s.entry.0,
        enabled: s.enabled.0,
        code: s.code.clone(),
        rollback: s
            .rollback
            .iter()
            .map(|(o, r)| {
                let r = match *r {
                    Rollback::ToTrigger {
                        rsp_adj,
                        rax_at,
                        rcx_at,
                        flags_at,
                        lahf_at,
                    } => RollbackState::ToTrigger {
                        rsp_adj,
                        rax_at,
                        rcx_at,
                        flags_at,
                        lahf_at,
                    },
                    Rollback::At(a) => RollbackState::At(a.0),
                };
                (*o, r)
            })
            .collect(),
        relocated: s.relocated.iter().map(|(o, r)| (o.0, r.0)).collect(),
    }
}

fn stub_from(s: &StubState) -> Stub {
    Stub {
        base: Addr(s.base),
        entry: Addr(s.entry),
        enabled: Addr(s.enabled),
        code: s.code.clone(),
        rollback: s
            .rollback
            .iter()
            .map(|(o, r)| {
                let r = match *r {
                    RollbackState::ToTrigger {
                        rsp_adj,
                        rax_at,
                        rcx_at,
                        flags_at,
                        lahf_at,
                    } => Rollback::ToTrigger {
                        rsp_adj,
                        rax_at,
                        rcx_at,
                        flags_at,
                        lahf_at,
                    },
                    RollbackState::At(a) => Rollback::At(Addr(a)),
                };
                (*o, r)
            })
            .collect(),
        relocated: s
            .relocated
            .iter()
            .map(|(o, r)| (Addr(*o), Addr(*r)))
            .collect(),
    }
}

/// The patch site again: its displaced instructions decoded from the original bytes.
fn patch_from(site: u64, original: &[u8]) -> Result<PatchSite, CacheError> {
    let mut dec = Decoder::with_ip(64, original, site, DecoderOptions::NONE);
    let mut displaced = Vec::new();
    while dec.can_decode() {
        let ins = dec.decode();
        if ins.is_invalid() {
            return Err(CacheError::BadJournal("undecodable patch bytes"));
        }
        displaced.push(ins);
    }
    Ok(PatchSite {
        site: Addr(site),
        displaced,
        original: original.to_vec(),
    })
}

impl Cache {
    /// Send every later change to `journal` before it reaches the target, starting with the current state.
    pub fn set_journal(&mut self, journal: Box<dyn Journal>) -> Result<(), CacheError> {
        self.journal = Some(Sink(journal, false));
        self.journal_now()
    }

    /// The userfaultfd of the guards (to hand over to a guardian, so that a write blocked on a guard stays
    /// blocked until the guardian has removed the variants relying on it, even after dynspec died).
    pub fn uffd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.guards.uffd()
    }

    /// Record the current state (with `pending` pages about to be mprotected) in the journal, if there is one,
    /// before something is *added* to the target: a failure (now or in any earlier record) stops the change.
    pub(super) fn journal_with(&mut self, pending: &[(Addr, i32)]) -> Result<(), CacheError> {
        if self.journal.is_none() {
            return Ok(());
        }
        let mut state = self.state();
        for (p, prot) in pending {
            if !state.mprotected.iter().any(|(q, _)| *q == p.0) {
                state.mprotected.push((p.0, *prot));
            }
        }
        let Some(Sink(j, failed)) = self.journal.as_mut() else {
            return Ok(());
        };
        if *failed {
            return Err(CacheError::Journal(std::io::Error::other(
                "an earlier record failed",
            )));
        }
        j.record(&state).map_err(|e| {
            *failed = true;
            CacheError::Journal(e)
        })
    }

    /// [`Cache::journal_with`] with nothing pending.
    pub(super) fn journal_now(&mut self) -> Result<(), CacheError> {
        self.journal_with(&[])
    }

    /// Record the state while something is *removed* from the target (an invalidation, an uninstall): that must
    /// go on whatever happens to the guardian (a writer may be blocked on a guard), so a failure is only
    /// remembered, and refuses every later addition.
    pub(super) fn journal_removal(&mut self) {
        let _ = self.journal_now();
    }

    /// The records as plain data (what the journal sends).
    pub fn state(&self) -> CacheState {
        let installs = self
            .installs
            .iter()
            .map(|(id, i)| InstallState {
                id: id.0,
                trigger: i.trigger.0,
                region: (i.region.0 .0, i.region.1 .0),
                register: i.register.map(|g| g.index() as u8),
                assumed: i
                    .assumed
                    .iter()
                    .map(|(g, v)| (g.index() as u8, *v))
                    .collect(),
                patch_site: i.patch.site.0,
                patch_original: i.patch.original.clone(),
                arena: i.arena,
                stubs: i.stubs.iter().map(stub_state).collect(),
                patched: i.patched,
                variants: i.variants.iter().map(|v| v.0).collect(),
                fallback_counter: i.fallback_counter.0,
            })
            .collect();
        let variants = self
            .variants
            .iter()
            .map(|(id, v)| VariantState {
                id: id.0,
                install: v.install.0,
                value: v.value,
                base: v.base.0,
                len: v.len,
                deopt: v
                    .deopt
                    .iter()
                    .map(|d| DeoptState {
                        offset: d.offset,
                        original: d.original.0,
                        regs: known(&d.state.regs),
                        flags: known(&d.state.flags),
                    })
                    .collect(),
                ret_sites: v.ret_sites.iter().map(|(s, o)| (s.0, o.0)).collect(),
                guard_pages: v.guard_pages.iter().map(|p| p.0).collect(),
                counter: v.counter.0,
                // A variant being removed stays alive here until threads and returns are out of it.
                alive: v.alive || self.dying.contains(id),
            })
            .collect();
        CacheState {
            pid: self.pid.as_raw(),
            arenas: self.arenas.iter().map(Arena::state).collect(),
            installs,
            variants,
            uffd_pages: self.guards.uffd_pages().iter().map(|p| p.0).collect(),
            mprotected: self
                .guards
                .mprotected()
                .iter()
                .map(|(p, o)| (p.0, *o))
                .collect(),
        }
    }

    /// The cache of `state` (a guardian's, after dynspec died), with the guards' userfaultfd if it was handed
    /// over. No ptrace is needed: attach and stop the process with [`Cache::stop_all`] next, then
    /// [`Cache::uninstall_all`] undoes everything the journal names.
    pub fn restore(state: &CacheState, uffd: Option<Uffd>) -> Result<Cache, CacheError> {
        let pid = Pid::from_raw(state.pid);
        let mut installs = BTreeMap::new();
        for i in &state.installs {
            let register = i.register.map(gpr).transpose()?;
            let assumed = i
                .assumed
                .iter()
                .map(|(g, v)| Ok((gpr(*g)?, *v)))
                .collect::<Result<Vec<_>, CacheError>>()?;
            if i.arena >= state.arenas.len() {
                return Err(CacheError::BadJournal("install in an unknown arena"));
            }
            installs.insert(
                InstallId(i.id),
                Installed {
                    trigger: Addr(i.trigger),
                    region: (Addr(i.region.0), Addr(i.region.1)),
                    register,
                    assumed,
                    patch: patch_from(i.patch_site, &i.patch_original)?,
                    arena: i.arena,
                    stubs: i.stubs.iter().map(stub_from).collect(),
                    patched: i.patched,
                    variants: i.variants.iter().map(|v| VariantId(*v)).collect(),
                    fallback_counter: Addr(i.fallback_counter),
                },
            );
        }
        let mut variants = BTreeMap::new();
        for v in &state.variants {
            if !installs.contains_key(&InstallId(v.install)) {
                return Err(CacheError::BadJournal("variant of an unknown install"));
            }
            let mut deopt = Vec::with_capacity(v.deopt.len());
            for d in &v.deopt {
                deopt.push(DeoptEntry {
                    offset: d.offset,
                    original: Addr(d.original),
                    state: KnownState {
                        regs: unknown_but(&d.regs)?,
                        flags: unknown_but(&d.flags)?,
                    },
                });
            }
            variants.insert(
                VariantId(v.id),
                LiveVariant {
                    install: InstallId(v.install),
                    value: v.value,
                    base: Addr(v.base),
                    len: v.len,
                    deopt,
                    ret_sites: v
                        .ret_sites
                        .iter()
                        .map(|(s, o)| (Addr(*s), Addr(*o)))
                        .collect(),
                    exit_targets: Vec::new(),
                    guard_pages: v.guard_pages.iter().map(|p| Addr(*p)).collect(),
                    guard_kinds: Vec::new(),
                    counter: Addr(v.counter),
                    folded: 0,
                    residual: 0,
                    alive: v.alive,
                },
            );
        }
        for (id, v) in &mut variants {
            v.guard_kinds = v
                .guard_pages
                .iter()
                .map(|p| {
                    let k = if state.mprotected.iter().any(|(q, _)| *q == p.0) {
                        GuardKind::Mprotect
                    } else {
                        GuardKind::Uffd
                    };
                    (*p, k)
                })
                .collect();
            debug_assert!(installs[&v.install].variants.contains(id));
        }
        let stub_flags: Vec<(Addr, BTreeSet<Addr>)> = installs
            .values()
            .filter(|i| i.patched)
            .filter_map(|i| {
                let pages = i
                    .variants
                    .iter()
                    .filter_map(|v| variants.get(v))
                    .filter(|v| v.alive)
                    .flat_map(|v| v.guard_pages.iter().copied())
                    .collect();
                i.stubs.last().map(|s| (s.enabled, pages))
            })
            .collect();
        let guards = GuardSet::restore(
            pid,
            uffd,
            state.uffd_pages.iter().map(|p| Addr(*p)).collect(),
            state
                .mprotected
                .iter()
                .map(|(p, o)| (Addr(*p), *o))
                .collect(),
        )?;
        for (w, pages) in &stub_flags {
            guards.register_stub_flag(*w, pages);
        }
        Ok(Cache {
            pid,
            arenas: state.arenas.iter().map(Arena::from_state).collect(),
            installs,
            variants,
            guards,
            invalidations: BTreeMap::new(),
            never_guard: BTreeSet::new(),
            next_id: state
                .installs
                .iter()
                .map(|i| i.id)
                .chain(state.variants.iter().map(|v| v.id))
                .max()
                .unwrap_or(1),
            frozen_counters: BTreeMap::new(),
            journal: None,
            dying: BTreeSet::new(),
        })
    }
}
