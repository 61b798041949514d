//! The store profile: write-watch the pages hot loads read for a window, and decide which pages to trust as
//! constant when planning.
//!
//! [`StoreProfile`] owns the live write watch (its start, its end, the SIGSEGVs of its mprotect fallback,
//! forks and execs of the watched process). [`PageTrust`] is the decision, a pure function of what the watch
//! saw and what the samples say, with the memory of pages that were trusted and then written.

use std::collections::BTreeSet;

use anyhow::Result;
use nix::unistd::Pid;
use tracer::maps::{mapping_at, read_maps};
use tracer::watch::WriteWatch;
use tracer::{Addr, Tracer};

use crate::report::{Hex, MethodCounts, StoreProfileJson};

/// A written page counts as rarely written when at most 1 in this many samples stores into it.
pub const OPTIMISTIC_STORE_SHARE: u64 = 200;
/// A page trusted optimistically is distrusted once it was written this many times behind a guard: a page
/// written once (a configuration changed, a bytecode constant patched) is trusted again with its new contents.
pub const DISTRUST_AFTER_WRITES: u32 = 2;

/// The write watch and what it saw.
#[derive(Default)]
pub struct StoreProfile {
    watch: Option<WriteWatch>,
    /// The process the watch is (or was) on.
    pid: Option<Pid>,
    /// Pages watched and pages written during the window.
    watched: BTreeSet<Addr>,
    written: BTreeSet<Addr>,
    read_only: u64,
    method: MethodCounts,
    /// Pages the running watch protects with mprotect.
    mprotect_pages: BTreeSet<Addr>,
    /// Pages whose protection was just removed: one queued access fault on each is ours, not the program's.
    grace_pages: BTreeSet<Addr>,
    /// (page, thread) pairs already forgiven a late fault ([`StoreProfile::late_fault`]).
    graced: BTreeSet<(Addr, Pid)>,
}

impl StoreProfile {
    /// Whether the watch is running.
    pub fn is_watching(&self) -> bool {
        self.watch.is_some()
    }

    /// The process the watch is (or was) on.
    pub fn pid(&self) -> Option<Pid> {
        self.pid
    }

    /// Pages watched and pages written (empty before the watch ended).
    pub fn watched(&self) -> &BTreeSet<Addr> {
        &self.watched
    }

    pub fn written(&self) -> &BTreeSet<Addr> {
        &self.written
    }

    /// Write-watch `pages` of process `pid` (threads stopped by the caller).
    pub fn start(&mut self, tr: &mut Tracer, pid: Pid, pages: &[Addr]) -> Result<()> {
        let tid = *tr
            .threads(pid)
            .first()
            .ok_or_else(|| anyhow::anyhow!("process {pid} has no threads left"))?;
        let mut w = WriteWatch::new(tr, pid, tid)?;
        let summary = w.watch(tr, pages)?;
        self.method = MethodCounts {
            uffd: summary.uffd.len() as u64,
            mprotect: summary.mprotect.len() as u64,
        };
        self.mprotect_pages = summary.mprotect.iter().copied().collect();
        self.read_only = summary.read_only.len() as u64;
        self.watch = Some(w);
        self.pid = Some(pid);
        Ok(())
    }

    /// End the watch and record what it saw (threads stopped). A failure to remove the protection cleanly is
    /// returned after the results are recorded.
    pub fn end(&mut self, tr: &mut Tracer) -> Result<()> {
        let Some(w) = self.watch.take() else {
            return Ok(());
        };
        // A write fault on a page we protected may already be queued (seen while stopping the threads); once the
        // protection is gone it must not reach the program. See `late_fault`.
        self.grace_pages = std::mem::take(&mut self.mprotect_pages);
        let watched = w.watched();
        let written = w.written();
        match w.finish(tr) {
            Ok(res) => {
                self.record(res.watched, res.written, res.read_only.len() as u64);
                Ok(())
            }
            Err(e) => {
                self.record(watched, written, self.read_only);
                Err(e.into())
            }
        }
    }

    /// The watched process is gone: no protection to remove, only results to keep.
    pub fn end_after_exit(&mut self) {
        let Some(w) = self.watch.take() else { return };
        let watched = w.watched();
        let written = w.written();
        // Dropping the watch closes its fds and joins its thread; the process' memory is gone with it.
        drop(w);
        self.record(watched, written, self.read_only);
    }

    fn record(&mut self, watched: BTreeSet<Addr>, written: BTreeSet<Addr>, read_only: u64) {
        self.watched = watched;
        self.written = written;
        self.read_only = read_only;
    }

    /// A SIGSEGV of `tid`: whether it was the watch's (a write to a watched page, or a fault queued before the
    /// protection was removed) and is handled; then it must not be delivered.
    pub fn claims_segv(
        &mut self,
        tr: &mut Tracer,
        tid: Pid,
        siginfo: &libc::siginfo_t,
    ) -> Result<bool> {
        match self.watch.as_mut() {
            Some(w) => Ok(w.handle_segv(tr, tid, siginfo)?),
            None => Ok(self.late_fault(tr, tid, siginfo)),
        }
    }

    /// A SIGSEGV that arrives after the watch ended: if it is an access fault on a page we had write-protected
    /// with mprotect (queued before the protection was removed), swallow it: the faulting write re-executes and
    /// succeeds. Each thread gets that grace once per page, only while the page is writable and the fault is not
    /// an instruction fetch, so a fault of the program's own is delivered.
    fn late_fault(&mut self, tr: &Tracer, tid: Pid, siginfo: &libc::siginfo_t) -> bool {
        const SEGV_ACCERR: i32 = 2;
        if siginfo.si_code != SEGV_ACCERR || self.grace_pages.is_empty() {
            return false;
        }
        // SAFETY: for SIGSEGV the kernel fills the si_addr member of the fault union; reading it is what the
        // accessor is for.
        let page = Addr(unsafe { siginfo.si_addr() } as u64).page();
        if !self.grace_pages.contains(&page) || !self.graced.insert((page, tid)) {
            return false;
        }
        let fetch = tr
            .regs(tid)
            .map(|r| Addr(r.rip).page() == page)
            .unwrap_or(true);
        let pid = tr.tgid(tid).unwrap_or(tid);
        let writable = read_maps(pid)
            .ok()
            .and_then(|maps| mapping_at(&maps, page).map(|m| m.write))
            .unwrap_or(false);
        !fetch && writable
    }

    /// `child` was forked by `parent_pid` (not a vfork): a child of the watched process must not inherit pages
    /// we write-protected; restore them before it runs.
    pub fn on_fork(&mut self, tr: &mut Tracer, parent_pid: Pid, child: Pid) -> Result<()> {
        if self.pid != Some(parent_pid) {
            return Ok(());
        }
        match self.watch.as_mut() {
            Some(w) => Ok(w.on_fork(tr, child)?),
            None => Ok(()),
        }
    }

    /// `pid` exec'd: its pages are gone.
    pub fn on_exec(&mut self, pid: Pid) {
        if let Some(w) = self.watch.as_mut() {
            w.on_exec(pid);
        }
    }

    /// The report's view.
    pub fn to_json(&self) -> StoreProfileJson {
        StoreProfileJson {
            pages_watched: self.watched.len() as u64,
            pages_written: self.written.len() as u64,
            pages_read_only: self.read_only,
            watched: self.watched.iter().map(|a| Hex(a.0)).collect(),
            written: self.written.iter().map(|a| Hex(a.0)).collect(),
            method: self.method.clone(),
        }
    }
}

/// What page trust is decided from (all about the process being specialized).
pub struct TrustInputs<'a> {
    /// The store profile, when it was taken on this process: pages watched and written in the window.
    pub store: Option<(&'a BTreeSet<Addr>, &'a BTreeSet<Addr>)>,
    /// The pages the (last) store profile watched, of whichever process: such a page is not "never watched".
    pub ever_watched: &'a BTreeSet<Addr>,
    /// Samples over the whole run, and samples of stores into a page over the whole run.
    pub total_samples: u64,
    pub store_samples: &'a dyn Fn(Addr) -> u64,
    /// Samples of stores into a page since the last invalidation.
    pub recent_store_samples: &'a dyn Fn(Addr) -> u64,
    /// Pages the hot loads read now, when every region to plan is new to the planner (else empty: a region
    /// planned again after an invalidation keeps to what the store profile and its guards taught).
    pub new_hot_pages: &'a [Addr],
}

/// Which pages planning trusts as constant, and the pages that betrayed that trust.
#[derive(Debug, Default)]
pub struct PageTrust {
    /// Pages specialized on although the store profile saw them written or never watched them.
    optimistic: BTreeSet<Addr>,
    /// Optimistic pages and how often they were written behind a guard since.
    written: std::collections::BTreeMap<Addr, u32>,
    /// Optimistic pages written [`DISTRUST_AFTER_WRITES`] times: never trusted again.
    distrusted: BTreeSet<Addr>,
}

impl PageTrust {
    /// The pages to trust as constant (behind guards) for one planning round:
    /// - watched and never written in the window;
    /// - optimism: written in the window, but the hot code hardly ever stores into them (a bytecode patched now
    ///   and then, a configuration changed once);
    /// - pages hot loads read now that the store profile never watched (hot code that started after it), unless
    ///   the samples saw stores into them; only for hot code new to the planner.
    ///
    /// Optimistic pages written [`DISTRUST_AFTER_WRITES`] times since ([`PageTrust::invalidated`]) are never
    /// trusted again.
    pub fn trusted(&mut self, inp: &TrustInputs) -> BTreeSet<Addr> {
        let mut constant = BTreeSet::new();
        if let Some((watched, written)) = inp.store {
            constant = crate::plan::constant_pages(watched, written);
            for &p in written {
                let stores = (inp.store_samples)(p);
                if stores * OPTIMISTIC_STORE_SHARE <= inp.total_samples
                    && !self.distrusted.contains(&p)
                {
                    constant.insert(p);
                    self.optimistic.insert(p);
                }
            }
        }
        for &p in inp.new_hot_pages {
            if !inp.ever_watched.contains(&p)
                && (inp.recent_store_samples)(p) == 0
                && (inp.store_samples)(p) == 0
                && !self.distrusted.contains(&p)
            {
                constant.insert(p);
                self.optimistic.insert(p);
            }
        }
        constant
    }

    /// A guarded page was written and its variants invalidated: if it was trusted optimistically, count it;
    /// after [`DISTRUST_AFTER_WRITES`] such writes it is never trusted again.
    pub fn invalidated(&mut self, page: Addr) {
        if !self.optimistic.contains(&page) {
            return;
        }
        let n = self.written.entry(page).or_insert(0);
        *n += 1;
        if *n >= DISTRUST_AFTER_WRITES {
            self.distrusted.insert(page);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(pages: &[u64]) -> BTreeSet<Addr> {
        pages.iter().map(|&p| Addr(p)).collect()
    }

    fn none(_: Addr) -> u64 {
        0
    }

    #[test]
    fn watched_and_never_written_pages_are_trusted() {
        let (watched, written) = (set(&[0x1000, 0x2000, 0x3000]), set(&[0x2000]));
        // Stores into 0x2000 in 1 of 10 samples: busily written, not trusted.
        let stores = |p: Addr| if p == Addr(0x2000) { 100 } else { 0 };
        let mut t = PageTrust::default();
        let c = t.trusted(&TrustInputs {
            store: Some((&watched, &written)),
            ever_watched: &watched,
            total_samples: 1000,
            store_samples: &stores,
            recent_store_samples: &none,
            new_hot_pages: &[],
        });
        assert_eq!(c, set(&[0x1000, 0x3000]));
    }

    #[test]
    fn a_rarely_written_page_is_trusted_until_it_is_written_twice() {
        let (watched, written) = (set(&[0x1000, 0x2000]), set(&[0x2000]));
        // 1 store sample in 1000: a bytecode patched once.
        let stores = |p: Addr| u64::from(p == Addr(0x2000));
        let mut t = PageTrust::default();
        let inp = TrustInputs {
            store: Some((&watched, &written)),
            ever_watched: &watched,
            total_samples: 1000,
            store_samples: &stores,
            recent_store_samples: &none,
            new_hot_pages: &[],
        };
        assert_eq!(t.trusted(&inp), set(&[0x1000, 0x2000]));
        // A write came: once is a one-time change, trusted again with its new contents.
        t.invalidated(Addr(0x2000));
        assert_eq!(t.trusted(&inp), set(&[0x1000, 0x2000]));
        // Written again: the optimistic page is distrusted, the page the watch saw unwritten is not.
        t.invalidated(Addr(0x2000));
        t.invalidated(Addr(0x1000));
        t.invalidated(Addr(0x1000));
        assert_eq!(t.trusted(&inp), set(&[0x1000]));
    }

    #[test]
    fn pages_of_late_hot_code_are_trusted_only_when_new_and_never_stored_into() {
        let watched = set(&[0x1000]);
        let written = BTreeSet::new();
        let recent = |p: Addr| u64::from(p == Addr(0x5000));
        let mut t = PageTrust::default();
        let hot = [Addr(0x1000), Addr(0x4000), Addr(0x5000)];
        let c = t.trusted(&TrustInputs {
            store: Some((&watched, &written)),
            ever_watched: &watched,
            total_samples: 1000,
            store_samples: &none,
            recent_store_samples: &recent,
            new_hot_pages: &hot,
        });
        // 0x1000: watched and clean; 0x4000: never watched, never stored into; 0x5000: the samples saw a store.
        assert_eq!(c, set(&[0x1000, 0x4000]));
        // Not new code (a re-plan after an invalidation): keep to the store profile.
        let c = t.trusted(&TrustInputs {
            store: Some((&watched, &written)),
            ever_watched: &watched,
            total_samples: 1000,
            store_samples: &none,
            recent_store_samples: &recent,
            new_hot_pages: &[],
        });
        assert_eq!(c, set(&[0x1000]));
    }

    #[test]
    fn a_store_profile_of_another_process_trusts_nothing_it_saw() {
        let watched = set(&[0x1000]);
        let mut t = PageTrust::default();
        let c = t.trusted(&TrustInputs {
            store: None,
            ever_watched: &watched,
            total_samples: 1000,
            store_samples: &none,
            recent_store_samples: &none,
            new_hot_pages: &[Addr(0x1000)],
        });
        // 0x1000 was watched (in the other process): not "never watched", so not trusted without a profile.
        assert!(c.is_empty());
    }
}
