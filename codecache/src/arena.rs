//! Code arenas: r-x memory within +-2 GB of a module's text, written only through /proc/PID/mem (W^X).

use specializer::Addr;
use tracer::{read_maps, remote_mmap, Mapping, Pid, Tracer};

use crate::cache::ArenaState;
use crate::parked::parked_threads;
use crate::CacheError;

/// Bytes of code per arena (variants are capped at 64 KiB each by the specializer's default options).
pub const CODE_SIZE: u64 = 4 << 20;
/// Bytes of counters per arena (one u64 per variant entry and per stub fall-back).
pub const COUNTER_SIZE: u64 = 64 << 10;
/// Distance between counters (a cache line).
const COUNTER_STRIDE: u64 = 64;
/// Keep arenas this close to the text so RIP-relative data references of relocated code stay reachable too.
const MAX_DISTANCE: u64 = 1 << 30;
/// `syscall; int3`: the gadget for later remote system calls, at the start of every arena.
const GADGET: [u8; 3] = [0x0f, 0x05, 0xcc];
const MAP_FIXED_NOREPLACE: i32 = 0x100000;

/// One arena: `code` (r-x) followed by `counters` (rw-), both anonymous private mappings.
#[derive(Debug, Clone)]
pub struct Arena {
    /// Text range of the module this arena serves (`jmp rel32` must reach it both ways).
    pub text: (Addr, Addr),
    /// `[start, end)` of the r-x code mapping.
    pub code: (Addr, Addr),
    /// `[start, end)` of the rw- counter mapping.
    pub counters: (Addr, Addr),
    next_code: u64,
    next_counter: u64,
    /// False once [`crate::Cache::uninstall_all`] unmapped it: it serves nothing and holds no code any more.
    mapped: bool,
}

fn dist(a: u64, b: u64) -> u64 {
    a.abs_diff(b)
}

/// Choose a start address for `len` bytes in a gap of `maps` within reach of `[ts, te)`.
pub(crate) fn find_gap(maps: &[Mapping], ts: u64, te: u64, len: u64) -> Option<u64> {
    const LOW: u64 = 0x10_0000;
    const HIGH: u64 = 0x7fff_ffff_0000;
    let mut best: Option<(u64, u64)> = None;
    let mut prev_end = LOW;
    let consider = |gs: u64, ge: u64, best: &mut Option<(u64, u64)>| {
        // Leave one page free on each side so the neighbours (a growing stack, a heap) keep some room.
        let gs = gs.saturating_add(0x1000);
        let ge = ge.saturating_sub(0x1000);
        if ge <= gs || ge - gs < len {
            return;
        }
        let place = if ge <= ts {
            (ge - len) & !0xfff
        } else {
            (gs + 0xfff) & !0xfff
        };
        if place < gs || place + len > ge {
            return;
        }
        let d = dist(place, ts)
            .max(dist(place + len, ts))
            .max(dist(place, te))
            .max(dist(place + len, te));
        if d < MAX_DISTANCE && best.is_none_or(|(bd, _)| d < bd) {
            *best = Some((d, place));
        }
    };
    for m in maps {
        if m.start.0 > prev_end {
            consider(prev_end, m.start.0, &mut best);
        }
        prev_end = prev_end.max(m.end.0);
    }
    if prev_end < HIGH {
        consider(prev_end, HIGH, &mut best);
    }
    best.map(|(_, p)| p)
}

impl Arena {
    /// Map a new arena near the executable mapping containing `near` in process `pid`, using stopped thread
    /// `tid` for the remote mmaps. Writes the syscall gadget and registers it with the tracer.
    pub fn create(tr: &mut Tracer, pid: Pid, tid: Pid, near: Addr) -> Result<Arena, CacheError> {
        let mut a = Arena::place(pid, near)?;
        a.map(tr, pid, tid)?;
        Ok(a)
    }

    /// Where a new arena near the executable mapping containing `near` goes (nothing mapped yet: the journal
    /// records it first, then [`Arena::map`] maps it).
    pub(crate) fn place(pid: Pid, near: Addr) -> Result<Arena, CacheError> {
        let maps = read_maps(pid)?;
        let m = tracer::mapping_at(&maps, near)
            .filter(|m| m.exec)
            .ok_or(CacheError::NotCode(near))?;
        // The whole text of the module: every executable mapping of the same file.
        let (mut ts, mut te) = (m.start.0, m.end.0);
        if m.is_file() {
            for o in maps.iter().filter(|o| o.exec && o.path == m.path) {
                ts = ts.min(o.start.0);
                te = te.max(o.end.0);
            }
        }
        let len = CODE_SIZE + COUNTER_SIZE;
        let place = find_gap(&maps, ts, te, len).ok_or(CacheError::NoArenaSpace(near))?;
        Ok(Arena {
            text: (Addr(ts), Addr(te)),
            code: (Addr(place), Addr(place + CODE_SIZE)),
            counters: (
                Addr(place + CODE_SIZE),
                Addr(place + CODE_SIZE + COUNTER_SIZE),
            ),
            next_code: place,
            next_counter: place + CODE_SIZE,
            mapped: true,
        })
    }

    /// Map a placed arena (stopped thread `tid` for the remote mmaps), write its syscall gadget and register
    /// it with the tracer.
    pub(crate) fn map(&mut self, tr: &mut Tracer, pid: Pid, tid: Pid) -> Result<(), CacheError> {
        let near = self.text.0;
        let place = self.code.0 .0;
        let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | MAP_FIXED_NOREPLACE;
        let code = remote_mmap(
            tr,
            tid,
            Addr(place),
            CODE_SIZE,
            libc::PROT_READ | libc::PROT_EXEC,
            flags,
            -1,
            0,
        )?;
        if code.0 != place {
            // An old kernel ignoring MAP_FIXED_NOREPLACE placed it elsewhere: do not use it.
            let _ = tracer::remote_munmap(tr, tid, code, CODE_SIZE);
            return Err(CacheError::NoArenaSpace(near));
        }
        match remote_mmap(
            tr,
            tid,
            Addr(place + CODE_SIZE),
            COUNTER_SIZE,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            -1,
            0,
        ) {
            Ok(c) if c.0 == place + CODE_SIZE => {}
            other => {
                if let Ok(c) = other {
                    let _ = tracer::remote_munmap(tr, tid, c, COUNTER_SIZE);
                }
                let _ = tracer::remote_munmap(tr, tid, code, CODE_SIZE);
                return Err(CacheError::NoArenaSpace(near));
            }
        };
        let g = self.alloc(GADGET.len())?;
        publish(tr, pid, std::slice::from_ref(self), g, &GADGET)?;
        tr.set_syscall_gadget(pid, g);
        Ok(())
    }

    /// The arena as plain data (the journal's record).
    pub(crate) fn state(&self) -> ArenaState {
        ArenaState {
            text: (self.text.0 .0, self.text.1 .0),
            code: (self.code.0 .0, self.code.1 .0),
            counters: (self.counters.0 .0, self.counters.1 .0),
            next_code: self.next_code,
            next_counter: self.next_counter,
            mapped: self.mapped,
        }
    }

    /// The arena of a journal record.
    pub(crate) fn from_state(s: &ArenaState) -> Arena {
        Arena {
            text: (Addr(s.text.0), Addr(s.text.1)),
            code: (Addr(s.code.0), Addr(s.code.1)),
            counters: (Addr(s.counters.0), Addr(s.counters.1)),
            next_code: s.next_code,
            next_counter: s.next_counter,
            mapped: s.mapped,
        }
    }

    /// Mark it unmapped before it is (the journal then never names memory that may be the program's again).
    pub(crate) fn forget_mapping(&mut self) {
        self.mapped = false;
    }

    /// Whether this arena serves code at `a` (same module text).
    pub fn serves(&self, a: Addr) -> bool {
        self.mapped && self.text.0 .0 <= a.0 && a.0 < self.text.1 .0
    }

    /// Whether `[a, a+len)` lies in the code mapping.
    pub fn contains_code(&self, a: Addr, len: u64) -> bool {
        self.mapped && self.code.0 <= a && a.0.saturating_add(len) <= self.code.1 .0
    }

    /// Whether its memory is still mapped in the target.
    pub fn is_mapped(&self) -> bool {
        self.mapped
    }

    /// Unmap its code and counters in the target (stopped thread `tid`): the caller made sure no thread can
    /// reach them any more. The tracer's syscall gadget is moved out first (the munmap must not run from it).
    pub(crate) fn unmap(&mut self, tr: &mut Tracer, tid: Pid) -> Result<(), CacheError> {
        let pid = tr.tgid(tid).unwrap_or(tid);
        tr.clear_syscall_gadget(pid);
        self.mapped = false;
        tracer::remote_munmap(tr, tid, self.code.0, CODE_SIZE)?;
        tracer::remote_munmap(tr, tid, self.counters.0, COUNTER_SIZE)?;
        Ok(())
    }

    /// Where the next allocation (16-byte aligned) would start.
    pub fn cursor(&self) -> Addr {
        Addr((self.next_code + 15) & !15)
    }

    /// Bump-allocate `len` bytes of code at [`Arena::cursor`].
    pub fn alloc(&mut self, len: usize) -> Result<Addr, CacheError> {
        let start = self.cursor().0;
        let end = start.saturating_add(len as u64);
        if end > self.code.1 .0 {
            return Err(CacheError::ArenaFull(self.code.0, len));
        }
        self.next_code = end;
        Ok(Addr(start))
    }

    /// Allocate one zeroed u64 counter, alone on its cache line (threads entering different variants do not
    /// share a line).
    pub fn alloc_counter(&mut self) -> Result<Addr, CacheError> {
        if self.next_counter + COUNTER_STRIDE > self.counters.1 .0 {
            return Err(CacheError::ArenaFull(self.counters.0, 8));
        }
        let c = Addr(self.next_counter);
        self.next_counter += COUNTER_STRIDE;
        Ok(c)
    }

    /// Bytes of code still free.
    pub fn remaining(&self) -> u64 {
        self.code.1 .0.saturating_sub(self.cursor().0)
    }

    /// Counters still free.
    pub fn counters_remaining(&self) -> u64 {
        self.counters.1 .0.saturating_sub(self.next_counter) / COUNTER_STRIDE
    }
}

/// THE one way code gets into an arena: write `bytes` at `addr` through /proc/PID/mem.
///
/// Every thread of `pid` must be stopped (a thread parked in vfork outside the arenas counts as stopped, see
/// [`crate::Cache`], "Stopped threads"), else [`CacheError::NotStopped`] and nothing is written. Asserts (in
/// release builds too) that the range lies inside the code mapping of one of `arenas`, and that the mapping
/// there is not writable (W^X, ARCHITECTURE.md invariant 4).
pub fn publish(
    tr: &Tracer,
    pid: Pid,
    arenas: &[Arena],
    addr: Addr,
    bytes: &[u8],
) -> Result<(), CacheError> {
    parked_threads(tr, pid, |rip| {
        arenas.iter().any(|a| a.contains_code(Addr(rip), 1))
    })?;
    assert!(
        arenas
            .iter()
            .any(|a| a.contains_code(addr, bytes.len() as u64)),
        "publish: {addr}+{} is outside every code arena",
        bytes.len()
    );
    if let Ok(maps) = read_maps(pid) {
        let m = tracer::mapping_at(&maps, addr);
        assert!(
            m.is_none_or(|m| !m.write),
            "publish: {addr} lies in a writable mapping (W^X)"
        );
    }
    tr.write_memory(pid, addr, bytes)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn map(s: u64, e: u64) -> Mapping {
        Mapping {
            start: Addr(s),
            end: Addr(e),
            read: true,
            write: false,
            exec: true,
            shared: false,
            offset: 0,
            path: Some(PathBuf::from("/bin/x")),
            inode: 1,
        }
    }

    #[test]
    fn gap_is_near_the_text_and_free() {
        let maps = vec![
            map(0x40_0000, 0x40_1000),
            map(0x40_1000, 0x45_0000),
            map(0x45_0000, 0x46_0000),
            map(0x7fff_0000_0000, 0x7fff_0002_0000),
        ];
        let len = CODE_SIZE + COUNTER_SIZE;
        let p = find_gap(&maps, 0x40_1000, 0x45_0000, len).expect("a gap");
        assert!(p >= 0x46_1000 || p + len <= 0x3f_f000);
        assert!(p.abs_diff(0x40_1000) < MAX_DISTANCE);
        assert_eq!(p & 0xfff, 0);
        for m in &maps {
            assert!(p + len <= m.start.0 || p >= m.end.0);
        }
        // A text far from every gap within reach: none.
        let full = vec![map(0x10_0000, 0x7fff_ffff_0000)];
        assert!(find_gap(&full, 0x40_0000, 0x40_1000, len).is_none());
    }
}
