//! Fork children: stripping the patches and variants a child inherited.

use std::collections::BTreeSet;

use tracer::{Pid, Tracer};

use super::{stopped_thread, Cache, InstallId, VariantId};
use crate::CacheError;

impl Cache {
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
}
