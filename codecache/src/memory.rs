//! `TargetMemory`: the specializer's view of a live target, read through the tracer with original code bytes.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use specializer::{Addr, Memory, MemoryError, PAGE_SIZE};
use tracer::{mapping_at, read_maps, Mapping, Pid, Tracer};

use crate::CacheError;

/// Reads the target through a [`Tracer`]. A page is constant when its mapping is read-only (and not a code
/// arena) or when the caller promised to guard it ([`TargetMemory::allow`]). Bytes under installed patches read
/// as the original code, so re-specializing a patched region sees the program, not dynspec.
pub struct TargetMemory<'a> {
    tr: &'a Tracer,
    pid: Pid,
    maps: Vec<Mapping>,
    guardable: BTreeSet<Addr>,
    /// (address, original bytes) of installed patches.
    overlay: Vec<(Addr, Vec<u8>)>,
    /// Arena code ranges (never constant data for the specializer: dynspec rewrites them).
    arenas: Vec<(u64, u64)>,
    /// Pages invalidated too often ([`crate::Cache::never_guard`]): never constant.
    never: BTreeSet<Addr>,
    /// Contents of constant writable pages as read, for [`crate::Cache::install`] to verify.
    snapshots: RefCell<BTreeMap<Addr, Vec<u8>>>,
}

impl<'a> TargetMemory<'a> {
    /// A view of process `pid`; `cache` (if any) supplies the patch overlay and arena ranges.
    pub fn new(
        tr: &'a Tracer,
        pid: Pid,
        cache: Option<&crate::Cache>,
    ) -> Result<TargetMemory<'a>, CacheError> {
        let maps = read_maps(pid)?;
        let (overlay, arenas, never) = match cache {
            Some(c) => (c.patched_bytes(), c.arena_ranges(), c.never_guard_pages()),
            None => (Vec::new(), Vec::new(), BTreeSet::new()),
        };
        Ok(TargetMemory {
            tr,
            pid,
            maps,
            guardable: BTreeSet::new(),
            overlay,
            arenas,
            never,
            snapshots: RefCell::new(BTreeMap::new()),
        })
    }

    /// Declare writable pages the caller will guard (e.g. the store profile's never-written pages). Pages
    /// the cache gave up on (invalidated too often) are ignored.
    pub fn allow(&mut self, pages: impl IntoIterator<Item = Addr>) {
        let pages: Vec<Addr> = pages.into_iter().map(|p| p.page()).collect();
        self.guardable
            .extend(pages.into_iter().filter(|p| !self.never.contains(p)));
    }

    /// Contents of every guardable (writable) page read as a constant so far.
    pub fn snapshots(&self) -> BTreeMap<Addr, Vec<u8>> {
        self.snapshots.borrow().clone()
    }

    fn in_arena(&self, a: u64) -> bool {
        self.arenas.iter().any(|(s, e)| a >= *s && a < *e)
    }
}

impl Memory for TargetMemory<'_> {
    /// Bytes of a page already taken as constant come from its snapshot, not from the live target: the program
    /// runs while the specializer reads, and the install verifies the snapshot, so every value a variant folds
    /// must be the snapshot's (a byte the program changed and changed back would otherwise pass the check with
    /// the variant holding the value in between).
    fn read(&self, addr: Addr, buf: &mut [u8]) -> Result<(), MemoryError> {
        let end = addr.0.saturating_add(buf.len() as u64);
        // A guardable page read before it was asked about is snapshotted now, so the two agree.
        let mut p = addr.0 & !(PAGE_SIZE - 1);
        while p < end {
            if self.guardable.contains(&Addr(p)) {
                self.is_constant(Addr(p));
            }
            p += PAGE_SIZE;
        }
        self.tr
            .read_memory(self.pid, addr, buf)
            .map_err(|_| MemoryError::Unreadable(addr))?;
        for (page, snap) in self
            .snapshots
            .borrow()
            .range(Addr(addr.0 & !(PAGE_SIZE - 1))..Addr(end))
        {
            let from = page.0.max(addr.0);
            let to = (page.0 + snap.len() as u64).min(end);
            if from < to {
                buf[(from - addr.0) as usize..(to - addr.0) as usize]
                    .copy_from_slice(&snap[(from - page.0) as usize..(to - page.0) as usize]);
            }
        }
        for (at, orig) in &self.overlay {
            for (i, b) in orig.iter().enumerate() {
                let a = at.0 + i as u64;
                if a >= addr.0 && a < end {
                    buf[(a - addr.0) as usize] = *b;
                }
            }
        }
        Ok(())
    }

    fn is_constant(&self, page: Addr) -> bool {
        let page = page.page();
        if self.in_arena(page.0) {
            return false;
        }
        let Some(m) = mapping_at(&self.maps, page) else {
            return false;
        };
        if !m.write {
            // [vvar] and friends change under the program's feet.
            let name = m
                .path
                .as_ref()
                .map(|p| p.as_os_str().as_encoded_bytes().to_vec());
            return !(m.is_pseudo() && name.as_deref() != Some(b"[vdso]"));
        }
        if m.shared || !self.guardable.contains(&page) {
            return false;
        }
        let mut snap = self.snapshots.borrow_mut();
        if let std::collections::btree_map::Entry::Vacant(slot) = snap.entry(page) {
            let mut buf = vec![0u8; PAGE_SIZE as usize];
            if self.tr.read_memory(self.pid, page, &mut buf).is_err() {
                return false;
            }
            slot.insert(buf);
        }
        true
    }
}
