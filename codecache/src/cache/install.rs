//! Installing: the request checks, guards, variant and stub code, and the 5-byte patch.

use std::collections::{BTreeMap, BTreeSet};

use iced_x86::{Decoder, DecoderOptions, FlowControl};
use specializer::{Addr, DeoptEntry, Gpr};
use tracer::{Stopped, Tracer};

use super::{
    stopped_thread, Cache, InstallId, InstallRequest, Installed, LiveVariant, VariantId, World,
};
use crate::arena::publish;
use crate::error::{BadRequestReason, UnguardableReason, UnpatchableReason};
use crate::guard::GuardKind;
use crate::stub::{build_stub, jmp_rel32, plan_patch, PatchSite, Stub, StubTarget, PATCH_LEN};
use crate::CacheError;

impl Cache {
    /// Install `req`: encode each variant into the arena near the trigger, guard every page they rely on,
    /// build the dispatch stub and write the 5-byte patch. Every thread of the process must be stopped.
    ///
    /// Refuses (typed error, nothing changed in the program's code) when: the request is inconsistent; a
    /// stub already exists at the trigger; the patch site fails the checks of ARCHITECTURE.md invariant 6; a variant exits into
    /// the displaced bytes; a page cannot be guarded or was invalidated too often; a snapshot page changed.
    pub fn install(
        &mut self,
        tr: &mut Stopped<'_>,
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
        let patch = self.plan_site(tr, t, req.region)?;
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
        // A page that may get an mprotect guard is journaled with its protection first (the guardian gives
        // it back only where the protection is still the one the guard set).
        let pending = self.guards.may_mprotect(&pages);
        self.journal_with(&pending)?;
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

    /// Install a counting stub at `site` (in the function `region`): no variant, every pass runs the original
    /// instructions through the stub's fall-back path, which counts it ([`Cache::dispatch_passes`]). Measuring
    /// uses it to count a unit of work outside the variants' code. Every thread must be stopped; the same
    /// patch-site checks as [`Cache::install`] apply. Remove it with [`Cache::uninstall`].
    pub fn install_counter(
        &mut self,
        tr: &mut Stopped<'_>,
        site: Addr,
        region: (Addr, Addr),
    ) -> Result<InstallId, CacheError> {
        let world = self.stopped_world(tr, self.pid)?;
        let tid = stopped_thread(tr, self.pid)?;
        let patch = self.plan_site(tr, site, region)?;
        let ai = self.arena_for(tr, tid, site)?;
        let req = InstallRequest {
            trigger: site,
            register: None,
            assumed: Vec::new(),
            region,
            variants: Vec::new(),
            snapshots: BTreeMap::new(),
        };
        self.install_code(tr, &world, &req, patch, ai, &BTreeMap::new())
    }

    /// The patch site at `site` in function `region`, checked as every install needs: the region holds the site
    /// and is not absurdly large, no live patch overlaps it, its displaced bytes pass ARCHITECTURE.md invariant 6
    /// on the original code, and no live variant exits into them.
    fn plan_site(
        &self,
        tr: &Stopped<'_>,
        site: Addr,
        region: (Addr, Addr),
    ) -> Result<PatchSite, CacheError> {
        if region.0 > site || region.1 <= site || region.1 .0 - region.0 .0 > 16 << 20 {
            return Err(CacheError::BadRequest(
                BadRequestReason::RegionWithoutTrigger,
            ));
        }
        for i in self.installs.values() {
            let overlaps = site.0 < i.patch.site.0 + i.patch.len() as u64
                && i.patch.site.0 < site.0 + PATCH_LEN as u64;
            if i.patched && overlaps {
                return Err(CacheError::AlreadyInstalled(i.patch.site));
            }
        }
        let mut bytes = vec![0u8; (region.1 .0 - region.0 .0) as usize];
        self.read_original(tr, region.0, &mut bytes)?;
        let reader = |a: Addr, b: &mut [u8]| tr.read_memory(self.pid, a, b).is_ok();
        let patch = plan_patch(&bytes, region.0, site, &reader)?;
        for v in self.variants.values().filter(|v| v.alive) {
            if v.exit_targets.iter().any(|e| patch.strictly_inside(e.0)) {
                return Err(CacheError::unpatchable(
                    site,
                    UnpatchableReason::LiveVariantExitsInto,
                ));
            }
        }
        Ok(patch)
    }

    pub(super) fn install_code(
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
        // The records first, journaled before any of it can run: once the patch is written, a guardian that
        // knows nothing of it could not undo it.
        let enabled = stub.enabled;
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
            ids.push((id, enc.base, enc.code));
        }
        self.installs.insert(
            install,
            Installed {
                trigger: t,
                region: req.region,
                register: req.register,
                assumed: req.assumed.clone(),
                patch: patch.clone(),
                arena: ai,
                stubs: vec![stub.clone()],
                patched: true,
                variants: ids.iter().map(|(id, _, _)| *id).collect(),
                fallback_counter,
            },
        );
        let linked = (|| {
            self.journal_now()?;
            for (_, base, code) in &ids {
                publish(tr, self.pid, &self.arenas, *base, code)?;
            }
            // ARCHITECTURE.md invariant 6, dynamic half: no thread strictly inside the bytes being replaced.
            self.check_threads_outside(tr, world, &patch)?;
            self.write_patch(tr, world, &patch, stub.entry)
        })();
        if let Err(e) = linked {
            self.guards.unregister_stub_flag(enabled);
            self.installs.remove(&install);
            for (id, _, _) in &ids {
                self.variants.remove(id);
            }
            // A stale record only names a patch that was never written (undoing it is harmless).
            self.journal_removal();
            return Err(e);
        }
        Ok(install)
    }

    /// Build and publish a stub with a fresh enabled word (set to 1, registered with the guard reader for
    /// `pages`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn place_stub(
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

    pub(super) fn check_threads_outside(
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
    pub(super) fn write_patch(
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
    pub(super) fn write_unpatch(
        &self,
        tr: &Tracer,
        world: &World,
        patch: &PatchSite,
    ) -> Result<(), CacheError> {
        tr.write_memory(world.pid, patch.site, &patch.original)?;
        Ok(())
    }

    /// Return sites of residual calls in encoded code: (site, original return address).
    pub(super) fn return_sites(
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
}
