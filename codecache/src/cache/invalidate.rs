//! Removing variants: invalidation of a written page (unlink dependent variants), uninstall.

use std::collections::BTreeSet;

use specializer::Addr;
use tracer::{Stopped, Tracer};

use super::{
    stopped_thread, Cache, InstallId, Invalidation, Released, VariantId, World,
    MAX_INVALIDATIONS_PER_PAGE,
};
use crate::stub::StubTarget;
use crate::CacheError;

impl Cache {
    /// A guarded page was (or is being) written: unlink every variant that depends on it (unpatch the stub, or
    /// rebuild it without them), deoptimize threads inside them, redirect return addresses into them, then
    /// release the guard (which lets a blocked write complete). Every thread must be stopped
    /// ([`Cache::stop_all`]). A page invalidated [`MAX_INVALIDATIONS_PER_PAGE`] times is never guarded again.
    pub fn invalidate(
        &mut self,
        tr: &mut Stopped<'_>,
        page: Addr,
    ) -> Result<Invalidation, CacheError> {
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
        self.journal_removal();
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
    pub(super) fn unlink(
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
                let entry = stub.entry;
                // Journaled before the patch points at it (a thread may be inside it when dynspec dies).
                if let Some(i) = self.installs.get_mut(id) {
                    i.stubs.push(stub);
                }
                self.journal_removal();
                self.write_patch(tr, world, &patch, entry)?;
                if let Some(w) = old {
                    self.guards.unregister_stub_flag(w);
                }
            }
        }
        self.mark_dead(dead);
        let moved = self.move_threads(tr, world, dead, &affected, false)?;
        let redirected = self.redirect_returns(tr, world, dead)?;
        self.dying.clear();
        Ok((moved, redirected))
    }

    /// Remove one install completely (patch restored, threads moved out, guards released when unused).
    pub fn uninstall(
        &mut self,
        tr: &mut Stopped<'_>,
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
        self.mark_dead(&dead);
        self.move_threads(tr, &world, &dead, &BTreeSet::from([id]), false)?;
        self.redirect_returns(tr, &world, &dead)?;
        self.dying.clear();
        let pages: Vec<Addr> = dead
            .iter()
            .flat_map(|d| self.variants[d].guard_pages.clone())
            .collect();
        self.release_unused(tr, tid, &pages)?;
        self.journal_removal();
        Ok(dead.into_iter().collect())
    }

    /// Restore every patch site, move threads out of variants and stubs, release every guard, then unmap every
    /// arena no thread can still reach (threads stopped). Used on detach and before giving up on a process, so
    /// that the process is left with nothing of dynspec's. An arena a thread may still return into (a residual
    /// call of a variant still running, a pointer into it on a stack) stays mapped: [`Released`] says which.
    pub fn uninstall_all(&mut self, tr: &mut Stopped<'_>) -> Result<Released, CacheError> {
        // Checked before the first uninstall, so that a running thread changes nothing.
        self.stopped_world(tr, self.pid)?;
        let ids: Vec<InstallId> = self.installs.keys().copied().collect();
        for id in ids {
            self.uninstall(tr, id)?;
        }
        let tid = stopped_thread(tr, self.pid)?;
        self.guards.release_all(tr, tid)?;
        let released = self.release_arenas(tr)?;
        self.journal_removal();
        Ok(released)
    }

    /// Mark `dead` variants dead; the journal keeps them alive until the threads are out ([`Cache::state`]).
    fn mark_dead(&mut self, dead: &BTreeSet<VariantId>) {
        for d in dead {
            if let Some(v) = self.variants.get_mut(d) {
                v.alive = false;
                self.dying.insert(*d);
            }
        }
    }
}
