//! Write watch for the store profile: userfaultfd write-protect (kernel and user writes) with an mprotect fallback.
//!
//! The userfaultfd is created *inside* the target by an injected system call (so it is bound to the target's
//! memory), then duplicated into dynspec with `pidfd_getfd` and closed in the target. A background thread reads
//! its write-protect faults: it records the page and removes the protection of that page, which wakes the faulting
//! thread — this resolves kernel writes (`read(2)` into a watched buffer) as well as user writes, so the program
//! never sees `EFAULT` (ARCHITECTURE.md invariant 7).
//!
//! Mappings synchronous uffd cannot register (file-backed private `.data` of a binary, shared memory) use a
//! second userfaultfd in asynchronous write-protect mode (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7+): the kernel
//! resolves every write itself — user or kernel, never blocking, never `EFAULT` — and clears the page's uffd-wp
//! bit, which `/proc/PID/pagemap` (bit 57) shows; `written()` reads it back.
//!
//! Where neither works (older kernels, uffd not permitted) the watch falls back to a remote `mprotect` that
//! removes write permission from the watched pages; a write then raises SIGSEGV, which the session passes to
//! [`WriteWatch::handle_segv`]. Limits of that fallback: a *kernel* write into such a page fails with `EFAULT`
//! instead of faulting. Writes by other processes sharing memory are never seen (uffd and mprotect alike).
//!
//! Fork: uffd state is not inherited (no `UFFD_FEATURE_EVENT_FORK`: the kernel clears the registration and the
//! write-protect bits in the child), but mprotect'ed pages are — [`WriteWatch::on_fork`] restores them in the child.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use nix::unistd::Pid;

use crate::addr::PAGE_SIZE;
use crate::maps::{mapping_at, read_maps, Mapping};
use crate::process::Tracer;
use crate::remote::remote_mprotect;
use crate::uffd::UffdUnavailable;
use crate::uffd::{
    self, Message, Reader, Registrations, Uffd as UserFaultFd, UFFD_FEATURE_PAGEFAULT_FLAG_WP,
    UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_UNPOPULATED, UFFD_PAGEFAULT_FLAG_WP,
};
use crate::{Addr, TracerError};

/// What `watch` did per page.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchSummary {
    /// Watched with userfaultfd write-protect (kernel writes included).
    pub uffd: Vec<Addr>,
    /// The subset of `uffd` watched in asynchronous mode (file-backed private or shared memory): writes are
    /// never blocked and are read back from /proc/PID/pagemap.
    pub uffd_async: Vec<Addr>,
    /// Watched by removing write permission (SIGSEGV on write, see `handle_segv`).
    pub mprotect: Vec<Addr>,
    /// In a read-only mapping: constant without a watch.
    pub read_only: Vec<Addr>,
    /// Not mapped, or in a mapping that cannot be watched (`[vvar]`, `[vsyscall]`, protection failed).
    pub skipped: Vec<Addr>,
}

/// Which mechanisms a [`WriteWatch`] may use; both default to true. The mprotect fallback is always allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchOptions {
    /// Synchronous uffd write-protect for anonymous private memory.
    pub uffd: bool,
    /// Asynchronous uffd write-protect for other writable memory (file-backed private, shared).
    pub uffd_async: bool,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            uffd: true,
            uffd_async: true,
        }
    }
}

/// Final result of a watch window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WatchResult {
    /// Every page that was watched (uffd or mprotect).
    pub watched: BTreeSet<Addr>,
    /// Watched pages written during the window.
    pub written: BTreeSet<Addr>,
    /// Pages found in read-only mappings.
    pub read_only: BTreeSet<Addr>,
}

/// `si_code` of a SIGSEGV on a present page without the needed permission.
const SEGV_ACCERR: i32 = 2;
/// /proc/PID/pagemap: "pte is uffd-wp write-protected".
const PM_UFFD_WP: u64 = 1 << 57;

/// The userfaultfd side: fd, features, and the reader thread.
struct Uffd {
    fd: Arc<UserFaultFd>,
    reader: Reader,
    features: u64,
    /// Created with UFFD_USER_MODE_ONLY (no privilege for more): kernel writes into protected pages fail with
    /// EFAULT instead of waiting, so asynchronous mode is preferred when available.
    user_mode_only: bool,
}

impl Uffd {
    fn shutdown(&mut self) {
        self.reader.stop();
    }
}

/// The reader thread's part: resolve write-protect faults by recording and unprotecting the page.
struct ResolveFaults {
    written: Arc<Mutex<BTreeSet<Addr>>>,
}

impl uffd::Handler for ResolveFaults {
    fn message(&mut self, uffd: &UserFaultFd, msg: Message) {
        let Message::PageFault { address, flags, .. } = msg else {
            return;
        };
        let page = address & !(PAGE_SIZE - 1);
        if flags & UFFD_PAGEFAULT_FLAG_WP != 0 {
            if let Ok(mut w) = self.written.lock() {
                w.insert(Addr(page));
            }
            // Unprotect the page: this also wakes the faulting thread (user or kernel write).
            if uffd.writeprotect(page, PAGE_SIZE, false).is_err() {
                let _ = uffd.wake(page, PAGE_SIZE);
            }
        } else {
            // Not ours (we register write-protect mode only): just wake the thread.
            let _ = uffd.wake(page, PAGE_SIZE);
        }
    }
}

/// Whether the mapping is the main thread's stack.
fn is_stack(m: &Mapping) -> bool {
    m.path
        .as_ref()
        .is_some_and(|p| p.as_os_str().as_encoded_bytes().starts_with(b"[stack"))
}

/// Watches pages of one process for writes.
pub struct WriteWatch {
    pid: Pid,
    tid: Pid,
    uffd: Option<Uffd>,
    /// Why uffd is not used, if it is not.
    uffd_unavailable: Option<String>,
    /// VMAs registered with uffd (or refused).
    registered: Registrations,
    uffd_pages: BTreeSet<Addr>,
    /// Asynchronous-mode uffd for memory sync uffd cannot register (file-backed private `.data`, shared memory):
    /// the kernel resolves every write itself (never EFAULT, never blocks) and clears the page's uffd-wp bit,
    /// which /proc/PID/pagemap shows.
    async_fd: Option<UserFaultFd>,
    async_registered: Registrations,
    async_pages: BTreeSet<Addr>,
    /// Last async-mode written set read from pagemap (kept for when the process is gone).
    async_written: Mutex<BTreeSet<Addr>>,
    /// Pages currently write-protected by mprotect, with their original protection.
    mprotected: BTreeMap<Addr, i32>,
    /// Every page ever watched with mprotect.
    mprotect_pages: BTreeSet<Addr>,
    read_only: BTreeSet<Addr>,
    written: Arc<Mutex<BTreeSet<Addr>>>,
    /// False once the process exec'd or exited: its memory (and our protections) are gone.
    alive: bool,
}

impl std::fmt::Debug for WriteWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteWatch")
            .field("pid", &self.pid)
            .field("uffd", &self.uffd.is_some())
            .field("uffd_pages", &self.uffd_pages.len())
            .field("mprotect_pages", &self.mprotect_pages.len())
            .finish()
    }
}

impl WriteWatch {
    /// Create a userfaultfd inside target `pid` via remote_syscall on stopped thread `tid`, take it with
    /// pidfd_open+pidfd_getfd, close it in the target, enable write-protect faults. If uffd is unavailable, the
    /// watch still works with the mprotect fallback only (see [`WriteWatch::uffd_unavailable`]).
    pub fn new(tr: &mut Tracer, pid: Pid, tid: Pid) -> Result<WriteWatch, TracerError> {
        WriteWatch::with_options(tr, pid, tid, WatchOptions::default())
    }

    /// [`WriteWatch::new`] choosing which mechanisms may be used (the mprotect fallback always may).
    pub fn with_options(
        tr: &mut Tracer,
        pid: Pid,
        tid: Pid,
        opts: WatchOptions,
    ) -> Result<WriteWatch, TracerError> {
        let pid = tr.tgid(pid).ok_or(TracerError::UnknownThread(pid))?;
        let written = Arc::new(Mutex::new(BTreeSet::new()));
        let sync_features = [
            UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_UNPOPULATED,
            UFFD_FEATURE_PAGEFAULT_FLAG_WP,
        ];
        let opened = if opts.uffd {
            uffd::open_in_target(tr, pid, tid, &sync_features, true)
        } else {
            Err(TracerError::UffdUnavailable(UffdUnavailable::Disabled))
        };
        let (uffd, uffd_unavailable) = match opened {
            Ok(uffd::TargetUffd {
                uffd,
                features,
                user_mode_only,
            }) => {
                let fd = Arc::new(uffd);
                let handler = ResolveFaults {
                    written: written.clone(),
                };
                let reader = Reader::spawn("dynspec-uffd", fd.clone(), handler)?;
                (
                    Some(Uffd {
                        fd,
                        reader,
                        features,
                        user_mode_only,
                    }),
                    None,
                )
            }
            Err(TracerError::UffdUnavailable(why)) => (None, Some(why.to_string())),
            Err(e) => return Err(e),
        };
        let async_features = [UFFD_FEATURE_WP_ASYNC
            | UFFD_FEATURE_WP_UNPOPULATED
            | UFFD_FEATURE_PAGEFAULT_FLAG_WP];
        let async_fd = if opts.uffd_async {
            match uffd::open_in_target(tr, pid, tid, &async_features, true) {
                Ok(u) => Some(u.uffd),
                Err(TracerError::UffdUnavailable(_)) => None,
                Err(e) => return Err(e),
            }
        } else {
            None
        };
        Ok(WriteWatch {
            pid,
            tid,
            uffd,
            uffd_unavailable,
            registered: Registrations::default(),
            uffd_pages: BTreeSet::new(),
            async_fd,
            async_registered: Registrations::default(),
            async_pages: BTreeSet::new(),
            async_written: Mutex::new(BTreeSet::new()),
            mprotected: BTreeMap::new(),
            mprotect_pages: BTreeSet::new(),
            read_only: BTreeSet::new(),
            written,
            alive: true,
        })
    }

    /// The watched process (tgid).
    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// Why userfaultfd is not used (None when it is).
    pub fn uffd_unavailable(&self) -> Option<&str> {
        self.uffd_unavailable.as_deref()
    }

    /// Whether asynchronous-mode uffd (for file-backed and shared pages) is in use.
    pub fn has_async_uffd(&self) -> bool {
        self.async_fd.is_some()
    }

    /// Whether unpopulated anonymous pages can be write-protected (UFFD_FEATURE_WP_UNPOPULATED).
    pub fn wp_unpopulated(&self) -> bool {
        self.uffd
            .as_ref()
            .is_some_and(|u| u.features & UFFD_FEATURE_WP_UNPOPULATED != 0)
    }

    /// A stopped thread of the watched process to run remote system calls on.
    fn stopped_thread(&self, tr: &Tracer) -> Result<Pid, TracerError> {
        if tr.is_stopped(self.tid) && tr.tgid(self.tid) == Some(self.pid) {
            return Ok(self.tid);
        }
        tr.threads(self.pid)
            .into_iter()
            .find(|t| tr.is_stopped(*t))
            .ok_or(TracerError::NotStopped(self.pid))
    }

    /// Refresh and return the async-mode pages written so far (from /proc/PID/pagemap's uffd-wp bit).
    fn async_written(&self) -> BTreeSet<Addr> {
        let mut cache = match self.async_written.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        // Only while our protection is in place: once released, every page reads as unprotected.
        if self.alive && self.async_fd.is_some() && !self.async_pages.is_empty() {
            if let Ok(f) = std::fs::File::open(format!("/proc/{}/pagemap", self.pid)) {
                use std::os::unix::fs::FileExt;
                let mut fresh = BTreeSet::new();
                let mut ok = true;
                for page in &self.async_pages {
                    let mut e = [0u8; 8];
                    if f.read_exact_at(&mut e, page.0 / PAGE_SIZE * 8).is_err() {
                        ok = false;
                        break;
                    }
                    if u64::from_le_bytes(e) & PM_UFFD_WP == 0 {
                        fresh.insert(*page);
                    }
                }
                if ok {
                    // Writes are never undone: keep pages seen written before (e.g. re-protected later).
                    cache.extend(fresh);
                }
            }
        }
        cache.clone()
    }

    /// Write-protect these pages (threads stopped). Returns what was done per page.
    pub fn watch(&mut self, tr: &mut Tracer, pages: &[Addr]) -> Result<WatchSummary, TracerError> {
        let mut sum = WatchSummary::default();
        if !self.alive {
            sum.skipped = pages.to_vec();
            return Ok(sum);
        }
        let maps = read_maps(self.pid)?;
        let written_now = self.written();
        let mut seen = BTreeSet::new();
        for &p in pages {
            let page = p.page();
            if !seen.insert(page) {
                continue;
            }
            if self.uffd_pages.contains(&page) && !written_now.contains(&page) {
                sum.uffd.push(page);
                continue;
            }
            if self.mprotected.contains_key(&page) {
                sum.mprotect.push(page);
                continue;
            }
            if self.async_pages.contains(&page) && !written_now.contains(&page) {
                sum.uffd.push(page);
                sum.uffd_async.push(page);
                continue;
            }
            let Some(m) = mapping_at(&maps, page) else {
                sum.skipped.push(page);
                continue;
            };
            if m.is_pseudo() && !uffd::may_register(m) {
                let name = m
                    .path
                    .as_ref()
                    .map(|p| p.as_os_str().as_encoded_bytes().to_vec());
                // [vdso] code is read-only anyway; [vvar]/[vsyscall] are kernel-managed.
                if !m.write && name.as_deref() == Some(b"[vdso]") {
                    self.read_only.insert(page);
                    sum.read_only.push(page);
                } else {
                    sum.skipped.push(page);
                }
                continue;
            }
            if !m.write {
                self.read_only.insert(page);
                sum.read_only.push(page);
                continue;
            }
            // Sync uffd, unless it cannot resolve kernel writes and the async mode can.
            let sync_fd = self
                .uffd
                .as_ref()
                .filter(|u| !u.user_mode_only || self.async_fd.is_none())
                .map(|u| (u.fd.clone(), u.user_mode_only));
            if let Some((fd, user_mode_only)) = sync_fd {
                if user_mode_only && is_stack(m) {
                    // The kernel writes signal frames there: an EFAULT would kill the program.
                    sum.skipped.push(page);
                    continue;
                }
                if uffd::may_register(m) && !self.wp_unpopulated() {
                    // Without UFFD_FEATURE_WP_UNPOPULATED protecting a never-touched page does nothing and its
                    // first write would go unseen: touch it (a read maps the zero page) first.
                    let mut b = [0u8; 1];
                    let _ = tr.read_memory(self.pid, page, &mut b);
                }
                if uffd::may_register(m)
                    && self.registered.register_wp(&fd, m)
                    && fd.writeprotect(page.0, PAGE_SIZE, true).is_ok()
                {
                    // A page written earlier in this window is watched again from now on.
                    if let Ok(mut w) = self.written.lock() {
                        w.remove(&page);
                    }
                    self.uffd_pages.insert(page);
                    sum.uffd.push(page);
                    continue;
                }
            }
            if let Some(fd) = self.async_fd.as_ref() {
                if self.async_registered.register_wp(fd, m)
                    && fd.writeprotect(page.0, PAGE_SIZE, true).is_ok()
                {
                    if let Ok(mut w) = self.async_written.lock() {
                        w.remove(&page);
                    }
                    self.async_pages.insert(page);
                    sum.uffd.push(page);
                    sum.uffd_async.push(page);
                    continue;
                }
            }
            // Fallback: remove write permission of just this page — never on the stack, where the kernel writes
            // signal frames (a fault there would kill the program).
            if is_stack(m) {
                sum.skipped.push(page);
                continue;
            }
            let tid = self.stopped_thread(tr)?;
            let orig = m.prot();
            match remote_mprotect(tr, tid, page, PAGE_SIZE, orig & !libc::PROT_WRITE) {
                Ok(()) => {
                    self.mprotected.insert(page, orig);
                    self.mprotect_pages.insert(page);
                    if let Ok(mut w) = self.written.lock() {
                        w.remove(&page);
                    }
                    sum.mprotect.push(page);
                }
                Err(TracerError::RemoteSyscall { .. }) => sum.skipped.push(page),
                Err(e) => return Err(e),
            }
        }
        Ok(sum)
    }

    /// For the mprotect fallback: call on every SIGSEGV signal-delivery-stop. Returns true if the fault was a write
    /// to a page this watch protected: the page is recorded as written, its protection restored, and the thread's
    /// pending signal is dropped (resume it WITHOUT the signal). False: the signal is the program's — deliver it.
    pub fn handle_segv(
        &mut self,
        tr: &mut Tracer,
        tid: Pid,
        siginfo: &libc::siginfo_t,
    ) -> Result<bool, TracerError> {
        if siginfo.si_signo != libc::SIGSEGV || siginfo.si_code != SEGV_ACCERR || !self.alive {
            return Ok(false);
        }
        if tr.tgid(tid) != Some(self.pid) {
            return Ok(false);
        }
        // SAFETY: for SIGSEGV the kernel fills si_addr.
        let addr = unsafe { siginfo.si_addr() } as u64;
        let page = Addr(addr).page();
        if let Some(orig) = self.mprotected.get(&page).copied() {
            remote_mprotect(tr, tid, page, PAGE_SIZE, orig)?;
            self.mprotected.remove(&page);
            if let Ok(mut w) = self.written.lock() {
                w.insert(page);
            }
            tr.suppress_signal(tid);
            return Ok(true);
        }
        if self.mprotect_pages.contains(&page) {
            // Two threads faulted on the page at once and the other one already restored it: if the page is
            // writable now, re-running the write succeeds; otherwise the program protected it itself.
            let maps = read_maps(self.pid)?;
            if mapping_at(&maps, page).is_some_and(|m| m.write) {
                tr.suppress_signal(tid);
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Pages written so far.
    pub fn written(&self) -> BTreeSet<Addr> {
        let mut w = self.written.lock().map(|w| w.clone()).unwrap_or_default();
        w.extend(self.async_written());
        w
    }

    /// Pages watched so far (uffd, async uffd and mprotect).
    pub fn watched(&self) -> BTreeSet<Addr> {
        let mut w: BTreeSet<Addr> = self
            .uffd_pages
            .union(&self.mprotect_pages)
            .copied()
            .collect();
        w.extend(self.async_pages.iter().copied());
        w
    }

    /// Pages found in read-only mappings.
    pub fn read_only(&self) -> BTreeSet<Addr> {
        self.read_only.clone()
    }

    /// The watched process forked: the child inherited the mprotect'ed pages; give them back their protection
    /// (the child is stopped at its `Event::Forked`). uffd protection is not inherited.
    pub fn on_fork(&mut self, tr: &mut Tracer, child: Pid) -> Result<(), TracerError> {
        if !self.alive {
            return Ok(());
        }
        let pages: Vec<(Addr, i32)> = self.mprotected.iter().map(|(p, o)| (*p, *o)).collect();
        for (page, orig) in pages {
            match remote_mprotect(tr, child, page, PAGE_SIZE, orig) {
                Ok(()) | Err(TracerError::RemoteSyscall { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// A process exec'd (or exited): if it is the watched one, its memory and every protection are gone.
    pub fn on_exec(&mut self, pid: Pid) {
        if pid == self.pid {
            self.alive = false;
            self.mprotected.clear();
            self.async_fd = None;
            if let Some(mut u) = self.uffd.take() {
                u.shutdown();
            }
        }
    }

    /// Remove all remaining protection (threads must be stopped for the mprotect part) and return the result.
    pub fn finish(mut self, tr: &mut Tracer) -> Result<WatchResult, TracerError> {
        // Read the async-mode result while the protection (the uffd-wp bits) is still in place.
        let _ = self.async_written();
        self.release_uffd();
        let mut first_err = None;
        if self.alive && !self.mprotected.is_empty() {
            let maps = read_maps(self.pid);
            let pages: Vec<(Addr, i32)> = self.mprotected.iter().map(|(p, o)| (*p, *o)).collect();
            for (page, orig) in pages {
                // Only undo our own change: if the program re-protected the page meanwhile, leave it.
                let ours = match &maps {
                    Ok(maps) => {
                        mapping_at(maps, page).is_some_and(|m| m.prot() == orig & !libc::PROT_WRITE)
                    }
                    Err(_) => false,
                };
                if !ours {
                    continue;
                }
                let r = self
                    .stopped_thread(tr)
                    .and_then(|tid| remote_mprotect(tr, tid, page, PAGE_SIZE, orig));
                match r {
                    Ok(()) => {
                        self.mprotected.remove(&page);
                    }
                    Err(TracerError::ProcessGone(_)) => break,
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        Ok(WatchResult {
            watched: self.watched(),
            written: self.written(),
            read_only: self.read_only.clone(),
        })
    }

    /// Unprotect every uffd page, unregister, stop the reader thread and close the descriptor.
    fn release_uffd(&mut self) {
        if let Some(fd) = self.async_fd.take() {
            if self.alive {
                for (start, end) in self.async_registered.ranges() {
                    let _ = fd.writeprotect(*start, end - start, false);
                    let _ = fd.unregister(*start, end - start);
                }
            }
        }
        let Some(mut u) = self.uffd.take() else {
            return;
        };
        if self.alive {
            for (start, end) in self.registered.ranges() {
                // Clearing protection over the whole range also wakes any thread still blocked on it.
                let _ = u.fd.writeprotect(*start, end - start, false);
                let _ = u.fd.unregister(*start, end - start);
            }
        }
        u.shutdown();
    }
}

impl Drop for WriteWatch {
    /// Removes the uffd protection; mprotect'ed pages need the tracer, so call [`WriteWatch::finish`].
    fn drop(&mut self) {
        self.release_uffd();
    }
}
