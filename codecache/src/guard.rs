//! Guards: write protection of the pages variants rely on, with a fault reported BEFORE the write completes.
//!
//! userfaultfd write-protect is the main mechanism (kernel writes such as `read(2)` into a guarded page are
//! resolved too, ARCHITECTURE.md invariant 7). Unlike `tracer::WriteWatch`, whose reader thread un-protects a page as soon as it
//! is written, the reader thread here only records the fault: the writer stays blocked until the tracer thread
//! has unlinked the dependent variants and calls [`GuardSet::release`] (which wakes it). The uffd plumbing
//! (the uffd made inside the target, registration, the reader thread) is `tracer::uffd`.
//!
//! A *kernel* write (copy_to_user inside a system call) cannot be interrupted by ptrace: the writer loops in the
//! kernel until the page is released, so `Tracer::stop_all` would wait for it forever. [`GuardSet::stop_all`]
//! therefore lets the reader thread release such a page early, once every other thread of the process is in a
//! ptrace stop: the write completes, the writer stops at the system call's return before running any user code,
//! and the invalidation that follows happens before any thread can observe the new contents.
//!
//! Where uffd cannot register a mapping (file-backed `.data`, shared memory), the page loses its write permission
//! (remote `mprotect`); the write then raises SIGSEGV, which the session passes to [`GuardSet::is_guard_segv`].
//! Limit of that fallback: a kernel write into such a page fails with `EFAULT`.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use specializer::Addr;
use tracer::uffd::{
    self, Message, Reader, Registrations, Uffd, UFFD_FEATURE_EVENT_REMAP,
    UFFD_FEATURE_EVENT_REMOVE, UFFD_FEATURE_EVENT_UNMAP, UFFD_FEATURE_PAGEFAULT_FLAG_WP,
    UFFD_FEATURE_THREAD_ID, UFFD_FEATURE_WP_UNPOPULATED, UFFD_PAGEFAULT_FLAG_WP,
};
use tracer::{mapping_at, read_maps, remote_mprotect, Pid, Tracer, TracerError};

use crate::error::UnguardableReason;
use crate::CacheError;

const PAGE: u64 = 4096;
const SEGV_ACCERR: i32 = 2;
/// Mapping changes that replace a page's contents without a write: mremap, madvise(DONTNEED/REMOVE), munmap.
const EVENTS: u64 = UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP;
/// How long every other thread must have been stopped before a blocked kernel write is let through.
const KERNEL_WRITE_GRACE: Duration = Duration::from_millis(5);

/// State shared with the reader thread.
#[derive(Default)]
struct Shared {
    /// Pages currently protected with uffd.
    guarded: BTreeSet<u64>,
    /// Pages written (fault seen) and not yet handled by the tracer thread.
    faulted: BTreeSet<u64>,
    /// Guarded pages unmapped, moved or discarded (uffd events), not yet handled; nobody blocks on them.
    removed: BTreeSet<u64>,
    /// Threads that faulted on a guarded page (with UFFD_FEATURE_THREAD_ID), not yet handled.
    blocked: BTreeSet<i32>,
    /// Set while [`GuardSet::stop_all`] runs, with its start time.
    stopping: Option<Instant>,
    /// Pages released early for a blocked kernel write.
    kernel_releases: u64,
    /// Enabled words of live stubs (target addresses) and the guarded pages their variants rely on.
    stub_flags: BTreeMap<u64, BTreeSet<u64>>,
    /// Enabled words switched off by the session's A/B measurement ([`GuardSet::set_stub_enabled`]): the reader
    /// never turns them back on.
    ab_off: BTreeSet<u64>,
    /// Between `before_read` (every word zeroed) and `after_read`: a word may not be turned on meanwhile, since
    /// the event being read may concern its pages.
    reading: bool,
}

impl Shared {
    /// Whether a stub's word may be 1: registered, its pages neither written nor removed, no event being read,
    /// and not switched off for A/B.
    fn may_enable(&self, word: u64) -> bool {
        !self.reading
            && !self.ab_off.contains(&word)
            && self.stub_flags.get(&word).is_some_and(|pages| {
                pages
                    .iter()
                    .all(|p| !self.faulted.contains(p) && !self.removed.contains(p))
            })
    }
}

/// How a page is guarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardKind {
    /// userfaultfd write-protect (kernel writes included).
    Uffd,
    /// Write permission removed; writes arrive as SIGSEGV.
    Mprotect,
    /// In a read-only mapping: constant without a guard.
    ReadOnly,
}

/// The write-protected pages of one process.
pub struct GuardSet {
    pid: Pid,
    fd: Option<Arc<Uffd>>,
    reader: Option<Reader>,
    shared: Arc<Mutex<Shared>>,
    pending_flag: Arc<AtomicBool>,
    registered: Registrations,
    /// Pages protected by mprotect, with their original protection.
    mprotected: BTreeMap<u64, i32>,
    /// Pages whose mprotect guard was lifted, with the threads that already had a stale fault there forgiven
    /// ([`GuardSet::is_stale_segv`]).
    lifted: BTreeMap<u64, BTreeSet<i32>>,
    /// Why uffd is unavailable, if it is.
    uffd_unavailable: Option<String>,
    /// dynspec's handle on the target's memory for [`GuardSet::set_stub_enabled`] (any thread may call it; none
    /// in a guardian's restored set, which never measures).
    mem: Option<std::fs::File>,
}

impl std::fmt::Debug for GuardSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardSet")
            .field("pid", &self.pid)
            .field("uffd", &self.fd.is_some())
            .field("mprotected", &self.mprotected.len())
            .finish()
    }
}

/// Thread states of a process from /proc (tid, state char).
fn thread_states(pid: Pid) -> Vec<(i32, char)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for e in rd.flatten() {
        let Some(tid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")) else {
            continue;
        };
        // The state follows the last ')' (the command name may contain anything).
        let st = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].trim_start().chars().next())
            .unwrap_or('?');
        out.push((tid, st));
    }
    out
}

/// Write `value` into every enabled word of `words` (through the reader's own /proc/PID/mem).
fn set_words(mem: &std::fs::File, words: &[u64], value: u64) {
    use std::os::unix::fs::FileExt;
    for w in words {
        // A failed write means the process is gone: nothing left to protect.
        let _ = mem.write_at(&value.to_le_bytes(), *w);
    }
}

/// The reader thread's part: record faults on guarded pages and keep their writers blocked (the tracer thread
/// releases them), follow mapping changes, and let blocked kernel writes through during a stop.
struct HoldFaults {
    pid: Pid,
    shared: Arc<Mutex<Shared>>,
    flag: Arc<AtomicBool>,
    /// The reader's own handle on the target's memory, for the stubs' enabled words.
    mem: Option<std::fs::File>,
    /// When every other thread has been seen stopped (for the kernel-write case).
    others_stopped_since: Option<Instant>,
}

impl uffd::Handler for HoldFaults {
    fn timeout(&mut self) -> Option<Duration> {
        let has_pending = self
            .shared
            .lock()
            .map(|s| !s.faulted.is_empty() && s.stopping.is_some())
            .unwrap_or(false);
        has_pending.then_some(Duration::from_millis(1))
    }

    fn before_read(&mut self, _uffd: &Uffd) {
        // Something happened to a registered mapping: before reading (which releases a thread blocked in
        // munmap/madvise/mremap), turn every stub off so nobody enters a variant that may be stale; the
        // stubs not concerned are turned back on in `after_read`.
        if let (Some(m), Ok(mut s)) = (&self.mem, self.shared.lock()) {
            s.reading = true;
            let words: Vec<u64> = s.stub_flags.keys().copied().collect();
            set_words(m, &words, 0);
        }
    }

    fn message(&mut self, uffd: &Uffd, msg: Message) {
        let removed = match msg {
            Message::Remap { from, len, .. } => Some((from, from.saturating_add(len))),
            Message::Remove { start, end } | Message::Unmap { start, end } => Some((start, end)),
            Message::PageFault { .. } | Message::Other { .. } => None,
        };
        if let Some((start, end)) = removed {
            let hit = self
                .shared
                .lock()
                .map(|mut s| {
                    let pages: Vec<u64> = s.guarded.range(start..end).copied().collect();
                    for p in &pages {
                        s.guarded.remove(p);
                        s.removed.insert(*p);
                    }
                    !pages.is_empty()
                })
                .unwrap_or(false);
            if hit {
                self.flag.store(true, Ordering::SeqCst);
            }
            return;
        }
        let Message::PageFault {
            address,
            flags,
            tid,
        } = msg
        else {
            return;
        };
        let page = address & !(PAGE - 1);
        let wp = flags & UFFD_PAGEFAULT_FLAG_WP != 0;
        // Decided and acted on under the lock: a fault whose page was released meanwhile clears the protection,
        // and that must not land after the page was guarded again (the tracer thread guards under the same
        // lock), or a new variant's page would be left writable while counted as guarded.
        let ours = self
            .shared
            .lock()
            .map(|mut s| {
                if wp && s.guarded.contains(&page) {
                    s.faulted.insert(page);
                    if let Some(t) = tid {
                        s.blocked.insert(t.as_raw());
                    }
                    true
                } else {
                    if wp {
                        let _ = uffd.writeprotect(page, PAGE, false);
                    }
                    false
                }
            })
            .unwrap_or(false);
        if ours {
            // The writer stays blocked until the tracer thread releases the page.
            self.flag.store(true, Ordering::SeqCst);
        } else {
            // Released meanwhile (or not a write-protect fault): woken.
            let _ = uffd.wake(page, PAGE);
        }
    }

    fn after_read(&mut self, _uffd: &Uffd) {
        if let (Some(m), Ok(mut s)) = (&self.mem, self.shared.lock()) {
            s.reading = false;
            let on: Vec<u64> = s
                .stub_flags
                .keys()
                .copied()
                .filter(|w| s.may_enable(*w))
                .collect();
            set_words(m, &on, 1);
        }
    }

    fn after_wait(&mut self, uffd: &Uffd) -> ControlFlow<()> {
        // Kernel writes: see the module documentation.
        let Ok(mut s) = self.shared.lock() else {
            return ControlFlow::Break(());
        };
        if s.faulted.is_empty() || s.stopping.is_none() {
            self.others_stopped_since = None;
            return ControlFlow::Continue(());
        }
        let states = thread_states(self.pid);
        let running: Vec<i32> = states
            .iter()
            .filter(|(_, c)| !matches!(c, 't' | 'T' | 'Z' | 'X'))
            .map(|(t, _)| *t)
            .collect();
        // With thread ids: every running thread must be one blocked on a guarded page. Without: no more
        // running threads than faulted pages.
        let only_blocked = if s.blocked.is_empty() {
            running.len() <= s.faulted.len()
        } else {
            running.iter().all(|t| s.blocked.contains(t))
        };
        if !only_blocked || states.is_empty() {
            self.others_stopped_since = None;
            return ControlFlow::Continue(());
        }
        let since = *self.others_stopped_since.get_or_insert_with(Instant::now);
        if since.elapsed() < KERNEL_WRITE_GRACE {
            return ControlFlow::Continue(());
        }
        if running.is_empty() {
            // Everyone stopped: the faulting writes were user writes, retried after the release.
            return ControlFlow::Continue(());
        }
        // Pages still protected (a page released earlier in this stop is not released twice).
        let pages: Vec<u64> = s.faulted.intersection(&s.guarded).copied().collect();
        for p in pages {
            if uffd.writeprotect(p, PAGE, false).is_ok() {
                s.guarded.remove(&p);
                s.kernel_releases += 1;
            }
        }
        self.others_stopped_since = None;
        ControlFlow::Continue(())
    }
}

impl GuardSet {
    /// Create the guard set of process `pid`: a userfaultfd made inside the target on stopped thread `tid`.
    /// Without uffd the mprotect fallback is used for every page ([`GuardSet::uffd_unavailable`] says why).
    /// A `tracer::WriteWatch` of the same process must be finished first (a mapping registers with one uffd).
    pub fn new(tr: &mut Tracer, pid: Pid, tid: Pid) -> Result<GuardSet, CacheError> {
        let pid = tr.tgid(pid).ok_or(TracerError::UnknownThread(pid))?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let pending_flag = Arc::new(AtomicBool::new(false));
        let mut gs = GuardSet {
            pid,
            fd: None,
            reader: None,
            shared: shared.clone(),
            pending_flag: pending_flag.clone(),
            registered: Registrations::default(),
            mprotected: BTreeMap::new(),
            lifted: BTreeMap::new(),
            uffd_unavailable: None,
            mem: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(format!("/proc/{pid}/mem"))
                .map(Some)
                .map_err(|e| TracerError::io(format!("cannot open /proc/{pid}/mem"), e))?,
        };
        match open_uffd(tr, pid, tid) {
            Ok(fd) => gs.start_reader(fd)?,
            Err(TracerError::UffdUnavailable(why)) => gs.uffd_unavailable = Some(why.to_string()),
            Err(e) => return Err(e.into()),
        }
        Ok(gs)
    }

    /// The guard set a guardian rebuilds from the journal: the handed-over userfaultfd (if any) with `uffd_pages`
    /// still protected by it, and `mprotected` pages with their original protection. No ptrace needed.
    pub fn restore(
        pid: Pid,
        uffd: Option<Uffd>,
        uffd_pages: Vec<Addr>,
        mprotected: Vec<(Addr, i32)>,
    ) -> Result<GuardSet, CacheError> {
        let shared = Shared {
            guarded: uffd_pages.iter().map(|p| p.0).collect(),
            ..Shared::default()
        };
        let mut gs = GuardSet {
            pid,
            fd: None,
            reader: None,
            shared: Arc::new(Mutex::new(shared)),
            pending_flag: Arc::new(AtomicBool::new(false)),
            registered: Registrations::default(),
            mprotected: mprotected.into_iter().map(|(p, o)| (p.0, o)).collect(),
            lifted: BTreeMap::new(),
            uffd_unavailable: None,
            mem: None,
        };
        match uffd {
            Some(fd) => gs.start_reader(fd)?,
            None => gs.uffd_unavailable = Some("not handed over".into()),
        }
        Ok(gs)
    }

    fn start_reader(&mut self, fd: Uffd) -> Result<(), CacheError> {
        let fd = Arc::new(fd);
        let pid = self.pid;
        // The reader's own handle on the target's memory, for the stubs' enabled words (the tracer's handle
        // belongs to the tracer thread). Without it stubs are only unlinked by the tracer thread.
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .ok();
        let handler = HoldFaults {
            pid,
            shared: self.shared.clone(),
            flag: self.pending_flag.clone(),
            mem,
            others_stopped_since: None,
        };
        self.reader = Some(Reader::spawn("dynspec-guards", fd.clone(), handler)?);
        self.fd = Some(fd);
        Ok(())
    }

    /// The userfaultfd (to hand over to a guardian).
    pub fn uffd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.fd.as_deref().map(|f| f.as_fd())
    }

    /// Pages protected with the userfaultfd.
    pub fn uffd_pages(&self) -> Vec<Addr> {
        self.shared
            .lock()
            .map(|s| s.guarded.iter().map(|p| Addr(*p)).collect())
            .unwrap_or_default()
    }

    /// Of `pages`, those not guarded yet that [`GuardSet::guard`] may protect with mprotect, with their current
    /// protection (what the journal records before guarding them).
    pub(crate) fn may_mprotect(&self, pages: &BTreeSet<Addr>) -> Vec<(Addr, i32)> {
        let Ok(maps) = read_maps(self.pid) else {
            return Vec::new();
        };
        pages
            .iter()
            .filter(|p| !self.is_guarded(**p))
            .filter_map(|p| {
                mapping_at(&maps, *p)
                    .filter(|m| m.write && !m.shared)
                    .map(|m| (*p, m.prot()))
            })
            .collect()
    }

    /// Run `f` (e.g. attaching to the process) as [`GuardSet::stop_all`] runs a stop: a kernel write blocked on
    /// a guarded page is let through once every other thread is stopped.
    pub fn while_stopping<T>(&self, f: impl FnOnce() -> T) -> T {
        if let Ok(mut s) = self.shared.lock() {
            s.stopping = Some(Instant::now());
        }
        let r = f();
        if let Ok(mut s) = self.shared.lock() {
            s.stopping = None;
        }
        r
    }

    /// How many guarded pages were released early so that a blocked kernel write (e.g. `read(2)` into the
    /// page) could complete during [`GuardSet::stop_all`].
    pub fn kernel_write_releases(&self) -> u64 {
        self.shared.lock().map(|s| s.kernel_releases).unwrap_or(0)
    }

    /// Register the enabled word of a stub whose variants rely on `pages` (see [`crate::stub::build_stub`]).
    pub(crate) fn register_stub_flag(&self, word: Addr, pages: &BTreeSet<Addr>) {
        if let Ok(mut s) = self.shared.lock() {
            s.stub_flags
                .insert(word.0, pages.iter().map(|p| p.page().0).collect());
        }
    }

    /// Forget a stub's enabled word (its stub is no longer patched in).
    pub(crate) fn unregister_stub_flag(&self, word: Addr) {
        if let Ok(mut s) = self.shared.lock() {
            s.stub_flags.remove(&word.0);
            s.ab_off.remove(&word.0);
        }
    }

    /// Switch a registered stub on or off for the A/B measurement, without stopping anything: the word is
    /// written under the lock the reader thread holds while it zeroes and restores words, so the two never
    /// interleave. Off is always honoured; on only when the stub's pages are unchanged and no mapping event is
    /// being read (else it stays off until the reader's `after_read`, or the next call). Returns whether the
    /// word now holds the requested state.
    pub(crate) fn set_stub_enabled(&self, word: Addr, on: bool) -> Result<bool, CacheError> {
        let (Some(mem), Ok(mut s)) = (&self.mem, self.shared.lock()) else {
            return Ok(false);
        };
        if !s.stub_flags.contains_key(&word.0) {
            return Ok(false);
        }
        if on {
            s.ab_off.remove(&word.0);
            if !s.may_enable(word.0) {
                return Ok(false);
            }
        } else {
            s.ab_off.insert(word.0);
        }
        use std::os::unix::fs::FileExt;
        let v: u64 = on.into();
        mem.write_at(&v.to_le_bytes(), word.0)
            .map_err(|e| TracerError::io(format!("cannot write the stub flag at {word}"), e))?;
        Ok(true)
    }

    /// Why uffd is not used (None when it is).
    pub fn uffd_unavailable(&self) -> Option<&str> {
        self.uffd_unavailable.as_deref()
    }

    /// Whether a uffd fault is waiting for [`GuardSet::take_faults`] (cheap; callable from any thread).
    pub fn has_faults(&self) -> bool {
        self.pending_flag.load(Ordering::SeqCst)
    }

    /// Pages written since the last call (uffd faults). Their writers are blocked until [`GuardSet::release`].
    pub fn take_faults(&self) -> Vec<Addr> {
        self.pending_flag.store(false, Ordering::SeqCst);
        let Ok(mut s) = self.shared.lock() else {
            return Vec::new();
        };
        let v: Vec<Addr> = s.faulted.union(&s.removed).map(|p| Addr(*p)).collect();
        s.faulted.clear();
        s.removed.clear();
        s.blocked.clear();
        v
    }

    /// `tr.stop_all()`, letting blocked kernel writes into guarded pages complete once everything else is
    /// stopped (see the module documentation). Use this instead of `Tracer::stop_all` while guards exist.
    pub fn stop_all<'t>(&self, tr: &'t mut Tracer) -> Result<tracer::Stopped<'t>, CacheError> {
        Ok(self.while_stopping(|| tr.stop_world())?)
    }

    /// Whether `page` is currently guarded (either way).
    pub fn is_guarded(&self, page: Addr) -> bool {
        self.mprotected.contains_key(&page.0)
            || self
                .shared
                .lock()
                .map(|s| s.guarded.contains(&page.0))
                .unwrap_or(false)
    }

    /// Guard one page (threads stopped; `tid` a stopped thread of the process for the mprotect fallback).
    pub fn guard(
        &mut self,
        tr: &mut Tracer,
        tid: Pid,
        page: Addr,
    ) -> Result<GuardKind, CacheError> {
        let page = page.page();
        if self.is_guarded(page) {
            return Ok(if self.mprotected.contains_key(&page.0) {
                GuardKind::Mprotect
            } else {
                GuardKind::Uffd
            });
        }
        let maps = read_maps(self.pid)?;
        let m = mapping_at(&maps, page)
            .ok_or(CacheError::Unguardable(page, UnguardableReason::NotMapped))?;
        if !m.write {
            if m.is_pseudo()
                && m.path.as_deref() != Some(std::path::Path::new("[vdso]"))
                && !uffd::may_register(m)
            {
                return Err(CacheError::Unguardable(
                    page,
                    UnguardableReason::KernelManaged,
                ));
            }
            return Ok(GuardKind::ReadOnly);
        }
        if let Some(fd) = self.fd.as_ref() {
            if uffd::may_register(m) && self.registered.register_wp(fd, m) {
                // Under the reader's lock, so that it never clears this protection for a stale fault (see
                // `HoldFaults::message`).
                let protected = self.shared.lock().is_ok_and(|mut s| {
                    s.guarded.insert(page.0);
                    let ok = fd.writeprotect(page.0, PAGE, true).is_ok();
                    if !ok {
                        s.guarded.remove(&page.0);
                    }
                    ok
                });
                if protected {
                    return Ok(GuardKind::Uffd);
                }
            }
        }
        if m.shared {
            return Err(CacheError::Unguardable(
                page,
                UnguardableReason::SharedMapping,
            ));
        }
        let orig = m.prot();
        match remote_mprotect(tr, tid, page, PAGE, orig & !libc::PROT_WRITE) {
            Ok(()) => {
                self.mprotected.insert(page.0, orig);
                self.lifted.remove(&page.0);
                Ok(GuardKind::Mprotect)
            }
            Err(TracerError::RemoteSyscall { errno, .. }) => Err(CacheError::Unguardable(
                page,
                UnguardableReason::MprotectFailed(errno),
            )),
            Err(e) => Err(e.into()),
        }
    }

    /// Remove the guard of `page` (waking a writer blocked on it). `tid`: a stopped thread of the process,
    /// needed only for an mprotect guard.
    pub fn release(
        &mut self,
        tr: &mut Tracer,
        tid: Option<Pid>,
        page: Addr,
    ) -> Result<(), CacheError> {
        let page = page.page();
        if self.mprotected.contains_key(&page.0) && tid.is_none() {
            return Err(CacheError::Tracer(TracerError::NotStopped(self.pid)));
        }
        if let (Some(orig), Some(tid)) = (self.mprotected.remove(&page.0), tid) {
            // Only undo our own change: if the program changed the page's protection meanwhile (or unmapped
            // it), its choice stands.
            let ours = read_maps(self.pid)
                .ok()
                .and_then(|maps| {
                    mapping_at(&maps, page).map(|m| m.prot() == orig & !libc::PROT_WRITE)
                })
                .unwrap_or(false);
            if ours {
                match remote_mprotect(tr, tid, page, PAGE, orig) {
                    Ok(()) => {
                        self.lifted.insert(page.0, BTreeSet::new());
                    }
                    Err(TracerError::RemoteSyscall { .. }) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        if let Ok(mut s) = self.shared.lock() {
            if s.guarded.remove(&page.0) {
                if let Some(fd) = &self.fd {
                    // Clearing the protection also wakes a thread blocked on the page.
                    let _ = fd.writeprotect(page.0, PAGE, false);
                }
            }
        }
        Ok(())
    }

    /// For the mprotect fallback: whether this SIGSEGV (signal-delivery-stop of `tid`) is a write to a page
    /// guarded here. If so, returns the page; the caller invalidates it, which releases the guard, then resumes
    /// the thread WITHOUT the signal (the write is re-executed). None: the signal is the program's.
    pub fn is_guard_segv(&self, tr: &Tracer, tid: Pid, si: &libc::siginfo_t) -> Option<Addr> {
        if si.si_signo != libc::SIGSEGV
            || si.si_code != SEGV_ACCERR
            || tr.tgid(tid) != Some(self.pid)
        {
            return None;
        }
        // SAFETY: for SIGSEGV the kernel fills si_addr.
        let addr = unsafe { si.si_addr() } as u64;
        let page = addr & !(PAGE - 1);
        self.mprotected.contains_key(&page).then_some(Addr(page))
    }

    /// A SIGSEGV (signal-delivery-stop of `tid`) that a thread took writing a page while its mprotect guard was
    /// still on, reported only after the guard was lifted (several threads wrote the page at once; one fault
    /// was handled, the others were already queued). True when that is so: the caller resumes the thread
    /// without the signal and the write runs again. Each thread is forgiven once per lifted page, only while
    /// the page is writable and the fault is not an instruction fetch, so a fault of the program's own still
    /// reaches it.
    pub fn is_stale_segv(&mut self, tr: &Tracer, tid: Pid, si: &libc::siginfo_t) -> bool {
        if si.si_signo != libc::SIGSEGV
            || si.si_code != SEGV_ACCERR
            || tr.tgid(tid) != Some(self.pid)
        {
            return false;
        }
        // SAFETY: for SIGSEGV the kernel fills si_addr.
        let page = unsafe { si.si_addr() } as u64 & !(PAGE - 1);
        let Some(forgiven) = self.lifted.get(&page) else {
            return false;
        };
        if forgiven.contains(&tid.as_raw()) || self.mprotected.contains_key(&page) {
            return false;
        }
        let fetch = tr
            .regs(tid)
            .map(|r| r.rip & !(PAGE - 1) == page)
            .unwrap_or(true);
        let writable = read_maps(self.pid)
            .ok()
            .and_then(|maps| mapping_at(&maps, Addr(page)).map(|m| m.write))
            .unwrap_or(false);
        if fetch || !writable {
            return false;
        }
        self.lifted.entry(page).or_default().insert(tid.as_raw());
        true
    }

    /// Every guarded page.
    pub fn pages(&self) -> Vec<Addr> {
        let mut v: BTreeSet<u64> = self.mprotected.keys().copied().collect();
        if let Ok(s) = self.shared.lock() {
            v.extend(s.guarded.iter().copied());
        }
        v.into_iter().map(Addr).collect()
    }

    /// The mprotect'ed pages with their original protection (a forked child inherits them).
    pub(crate) fn mprotected(&self) -> Vec<(Addr, i32)> {
        self.mprotected
            .iter()
            .map(|(p, o)| (Addr(*p), *o))
            .collect()
    }

    /// Release every guard (threads stopped).
    pub fn release_all(&mut self, tr: &mut Tracer, tid: Pid) -> Result<(), CacheError> {
        for p in self.pages() {
            self.release(tr, Some(tid), p)?;
        }
        Ok(())
    }

    /// The process exec'd or exited: its memory and protections are gone; forget them.
    pub fn forget(&mut self) {
        self.mprotected.clear();
        if let Ok(mut s) = self.shared.lock() {
            s.guarded.clear();
            s.faulted.clear();
            s.removed.clear();
            s.stub_flags.clear();
        }
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(mut r) = self.reader.take() {
            r.stop();
        }
        // Closing the uffd clears its write protection and wakes any blocked writer.
        self.fd = None;
    }
}

impl Drop for GuardSet {
    /// Stops the reader and closes the uffd (which un-protects its pages); mprotect'ed pages need the tracer:
    /// call [`GuardSet::release_all`] first.
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Create the userfaultfd inside the target and take it over (`TracerError::UffdUnavailable` when it cannot be
/// had: the guards fall back to mprotect).
fn open_uffd(tr: &mut Tracer, pid: Pid, tid: Pid) -> Result<Uffd, TracerError> {
    let bases = [
        UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED | EVENTS,
        UFFD_FEATURE_PAGEFAULT_FLAG_WP | EVENTS,
        UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED,
        UFFD_FEATURE_PAGEFAULT_FLAG_WP,
    ];
    let sets: Vec<u64> = bases
        .iter()
        .flat_map(|b| [b | UFFD_FEATURE_THREAD_ID, *b])
        .collect();
    // Not UFFD_USER_MODE_ONLY: kernel writes must fault into us too (needs CAP_SYS_PTRACE or the sysctl).
    Ok(uffd::open_in_target(tr, pid, tid, &sets, false)?.uffd)
}
