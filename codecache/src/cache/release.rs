//! Giving the target its memory back: once nothing is installed, unmap every arena no thread can still reach.

use std::collections::BTreeMap;

use specializer::Addr;
use tracer::{mapping_at, read_maps, Pid, Tracer};

use super::{stopped_thread, Cache, STACK_SCAN_LIMIT};
use crate::CacheError;

/// What [`Cache::uninstall_all`] gave back to the process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Arenas unmapped (their code and their counters).
    pub unmapped: usize,
    /// Arenas left mapped (the start of their code) and why.
    pub kept: Vec<(Addr, Kept)>,
    /// Return addresses into residual calls of variants rewritten on stacks to their original return address.
    pub returns_redirected: usize,
}

/// Why an arena stayed mapped ([`Released::kept`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Kept {
    /// A thread is stopped inside it (it could not be moved out).
    #[error("thread {tid} is stopped inside it")]
    ThreadInside { tid: i32 },
    /// A thread's stack holds an address inside it that is not a known return site (a signal frame saved
    /// there, or a copy of a return address): the thread may still jump there.
    #[error("the stack of thread {tid} refers to it at {at}")]
    Referenced { tid: i32, at: Addr },
    /// A thread waits in `vfork`: its child runs in this memory and is not examined.
    #[error("a vfork child of thread {tid} shares the memory")]
    SharedWithVforkChild { tid: i32 },
}

impl Cache {
    /// Unmap every mapped arena that no thread can reach: no thread stopped inside it and no stack (from rsp to
    /// the end of its mapping, at most 8 MiB) holding an address inside it, once the return addresses of every
    /// variant's residual calls found there were rewritten to their original return addresses. Counters are
    /// read before they go ([`Cache::counters`] keeps answering). Every thread must be stopped, and nothing
    /// installed (called by [`Cache::uninstall_all`]).
    pub(super) fn release_arenas(&mut self, tr: &mut Tracer) -> Result<Released, CacheError> {
        let mut out = Released::default();
        let mapped: Vec<usize> = (0..self.arenas.len())
            .filter(|i| self.arenas[*i].is_mapped())
            .collect();
        if mapped.is_empty() {
            return Ok(out);
        }
        let world = self.stopped_world(tr, self.pid)?;
        let mut kept: BTreeMap<usize, Kept> = BTreeMap::new();
        if let Some(t) = tr.threads(self.pid).into_iter().find(|t| tr.in_vfork(*t)) {
            for i in &mapped {
                kept.insert(*i, Kept::SharedWithVforkChild { tid: t.as_raw() });
            }
        }
        let arena_of = |a: u64| -> Option<usize> {
            mapped.iter().copied().find(|i| {
                let x = &self.arenas[*i];
                (x.code.0 .0..x.code.1 .0).contains(&a)
                    || (x.counters.0 .0..x.counters.1 .0).contains(&a)
            })
        };
        let returns: BTreeMap<u64, u64> = self
            .variants
            .values()
            .flat_map(|v| v.ret_sites.iter().map(|(site, orig)| (site.0, orig.0)))
            .collect();
        if kept.is_empty() {
            let maps = read_maps(self.pid)?;
            for (tid, rip, rsp) in world.positions(tr)? {
                if let Some(i) = arena_of(rip) {
                    kept.entry(i)
                        .or_insert(Kept::ThreadInside { tid: tid.as_raw() });
                }
                let (redirected, refs) = scan_stack(tr, self.pid, &maps, rsp, &returns, &arena_of)?;
                out.returns_redirected += redirected;
                for (i, at) in refs {
                    kept.entry(i).or_insert(Kept::Referenced {
                        tid: tid.as_raw(),
                        at,
                    });
                }
            }
        }
        let going: Vec<usize> = mapped
            .iter()
            .copied()
            .filter(|i| !kept.contains_key(i))
            .collect();
        if !going.is_empty() {
            // The last counts, before the counters disappear.
            let counters: Vec<Addr> = self
                .variants
                .values()
                .map(|v| v.counter)
                .chain(self.installs.values().map(|i| i.fallback_counter))
                .filter(|c| arena_of(c.0).is_some_and(|i| going.contains(&i)))
                .collect();
            for c in counters {
                let mut b = [0u8; 8];
                // Unreadable only for an arena a guardian rebuilt from a record written just before the mmap.
                if tr.read_memory(self.pid, c, &mut b).is_ok() {
                    self.frozen_counters.insert(c, u64::from_le_bytes(b));
                }
            }
            let tid = stopped_thread(tr, self.pid)?;
            // Out of the journal before they go: at worst a guardian leaves an unreachable mapping behind,
            // never unmaps memory the program may have mapped there since.
            for i in &going {
                self.arenas[*i].forget_mapping();
            }
            self.journal_removal();
            for i in going {
                self.arenas[i].unmap(tr, tid)?;
                out.unmapped += 1;
            }
        }
        out.kept = kept
            .into_iter()
            .map(|(i, why)| (self.arenas[i].code.0, why))
            .collect();
        Ok(out)
    }
}

/// Scan one thread's stack from `rsp`: rewrite return addresses into variants (`returns`: return site ->
/// original return address) and list the other slots that point into an arena (`arena_of`). Returns (slots
/// rewritten, (arena index, slot address) of each other reference).
fn scan_stack(
    tr: &Tracer,
    pid: Pid,
    maps: &[tracer::Mapping],
    rsp: u64,
    returns: &BTreeMap<u64, u64>,
    arena_of: &impl Fn(u64) -> Option<usize>,
) -> Result<(usize, Vec<(usize, Addr)>), CacheError> {
    let rsp = rsp & !7;
    let Some(m) = mapping_at(maps, Addr(rsp)) else {
        return Ok((0, Vec::new()));
    };
    let end = m.end.0.min(rsp.saturating_add(STACK_SCAN_LIMIT));
    let (mut redirected, mut refs) = (0, Vec::new());
    let mut at = rsp;
    while at < end {
        let n = (end - at).min(64 << 10) as usize;
        let mut buf = vec![0u8; n];
        tr.read_memory(pid, Addr(at), &mut buf)?;
        for (k, q) in buf.chunks_exact(8).enumerate() {
            let val = u64::from_le_bytes(q.try_into().expect("8 bytes"));
            let slot = Addr(at + 8 * k as u64);
            if let Some(orig) = returns.get(&val) {
                tr.write_memory(pid, slot, &orig.to_le_bytes())?;
                redirected += 1;
            } else if let Some(i) = arena_of(val) {
                refs.push((i, slot));
            }
        }
        at += n as u64;
    }
    Ok((redirected, refs))
}
