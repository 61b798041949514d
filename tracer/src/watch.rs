//! Write watch for the store profile: userfaultfd write-protect (kernel and user writes) with an mprotect fallback.
//!
//! The userfaultfd is created *inside* the target by an injected system call (so it is bound to the target's
//! memory), then duplicated into dynspec with `pidfd_getfd` and closed in the target. A background thread reads
//! its write-protect faults: it records the page and removes the protection of that page, which wakes the faulting
//! thread — this resolves kernel writes (`read(2)` into a watched buffer) as well as user writes, so the program
//! never sees `EFAULT` (DESIGN invariant 7).
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
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::unistd::Pid;

use crate::addr::PAGE_SIZE;
use crate::maps::{mapping_at, read_maps, Mapping};
use crate::process::Tracer;
use crate::remote::remote_mprotect;
use crate::uffd::{
    self, writeprotect, UffdMsg, UffdioRange, UffdioRegister, UFFDIO_REGISTER,
    UFFDIO_REGISTER_MODE_WP, UFFDIO_UNREGISTER, UFFDIO_WAKE, UFFDIO_WRITEPROTECT_IOCTL_BIT,
    UFFD_EVENT_PAGEFAULT, UFFD_FEATURE_PAGEFAULT_FLAG_WP, UFFD_FEATURE_WP_ASYNC,
    UFFD_FEATURE_WP_UNPOPULATED, UFFD_PAGEFAULT_FLAG_WP,
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

// userfaultfd ABI (include/uapi/linux/userfaultfd.h).
/// `si_code` of a SIGSEGV on a present page without the needed permission.
const SEGV_ACCERR: i32 = 2;
/// /proc/PID/pagemap: "pte is uffd-wp write-protected".
const PM_UFFD_WP: u64 = 1 << 57;

/// The userfaultfd side: fd, features, and the reader thread.
struct Uffd {
    fd: Arc<OwnedFd>,
    /// eventfd that tells the reader thread to stop.
    stop: OwnedFd,
    reader: Option<JoinHandle<()>>,
    features: u64,
    /// Created with UFFD_USER_MODE_ONLY (no privilege for more): kernel writes into protected pages fail with
    /// EFAULT instead of waiting, so asynchronous mode is preferred when available.
    user_mode_only: bool,
}

impl Uffd {
    fn shutdown(&mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        unsafe {
            libc::write(
                self.stop.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

/// The reader thread: resolve write-protect faults by recording and unprotecting the page.
fn reader_loop(fd: Arc<OwnedFd>, stop: RawFd, written: Arc<Mutex<BTreeSet<Addr>>>) {
    let raw = fd.as_raw_fd();
    loop {
        let mut fds = [
            libc::pollfd {
                fd: raw,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a live array of two pollfd structs.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            if Errno::last() == Errno::EINTR {
                continue;
            }
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
            && fds[0].revents & libc::POLLIN == 0
        {
            // The target's memory is gone (exit/exec): nothing more will fault.
            return;
        }
        loop {
            let mut msg = UffdMsg::default();
            // SAFETY: reads at most size_of::<UffdMsg>() (32) bytes into a live, correctly sized buffer.
            let n = unsafe {
                libc::read(
                    raw,
                    &mut msg as *mut UffdMsg as *mut libc::c_void,
                    std::mem::size_of::<UffdMsg>(),
                )
            };
            if n < 0 {
                match Errno::last() {
                    Errno::EAGAIN => break,
                    Errno::EINTR => continue,
                    _ => return,
                }
            }
            if n == 0 {
                return;
            }
            if n as usize != std::mem::size_of::<UffdMsg>() || msg.event != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let page = msg.address & !(PAGE_SIZE - 1);
            if msg.flags & UFFD_PAGEFAULT_FLAG_WP != 0 {
                if let Ok(mut w) = written.lock() {
                    w.insert(Addr(page));
                }
                // Unprotect the page: this also wakes the faulting thread (user or kernel write).
                if writeprotect(raw, page, PAGE_SIZE, false).is_err() {
                    let mut range = UffdioRange {
                        start: page,
                        len: PAGE_SIZE,
                    };
                    let _ = uffd::ioctl(raw, UFFDIO_WAKE, &mut range);
                }
            } else {
                // Not ours (we register write-protect mode only): just wake the thread.
                let mut range = UffdioRange {
                    start: page,
                    len: PAGE_SIZE,
                };
                let _ = uffd::ioctl(raw, UFFDIO_WAKE, &mut range);
            }
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
    /// VMA ranges registered with uffd.
    registered: Vec<(u64, u64)>,
    /// VMA ranges uffd refused.
    unregistrable: Vec<(u64, u64)>,
    uffd_pages: BTreeSet<Addr>,
    /// Asynchronous-mode uffd for memory sync uffd cannot register (file-backed private `.data`, shared memory):
    /// the kernel resolves every write itself (never EFAULT, never blocks) and clears the page's uffd-wp bit,
    /// which /proc/PID/pagemap shows.
    async_fd: Option<OwnedFd>,
    async_registered: Vec<(u64, u64)>,
    async_unregistrable: Vec<(u64, u64)>,
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
            uffd::open_in_target(tr, pid, tid, &sync_features, true)?
        } else {
            Err("disabled by the caller".to_string())
        };
        let (uffd, uffd_unavailable) = match opened {
            Ok(uffd::TargetUffd {
                fd,
                features,
                user_mode_only,
            }) => {
                // SAFETY: eventfd with integer arguments.
                let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
                if efd < 0 {
                    return Err(TracerError::errno("eventfd", Errno::last()));
                }
                // SAFETY: efd is a fresh fd we own.
                let stop = unsafe { OwnedFd::from_raw_fd(efd) };
                let fd = Arc::new(fd);
                let (f2, w2, s2) = (fd.clone(), written.clone(), stop.as_raw_fd());
                let reader = std::thread::Builder::new()
                    .name("dynspec-uffd".into())
                    .spawn(move || reader_loop(f2, s2, w2))
                    .map_err(|e| TracerError::io("starting the userfaultfd reader thread", e))?;
                (
                    Some(Uffd {
                        fd,
                        stop,
                        reader: Some(reader),
                        features,
                        user_mode_only,
                    }),
                    None,
                )
            }
            Err(why) => (None, Some(why)),
        };
        let async_features = [UFFD_FEATURE_WP_ASYNC
            | UFFD_FEATURE_WP_UNPOPULATED
            | UFFD_FEATURE_PAGEFAULT_FLAG_WP];
        let async_fd = if opts.uffd_async {
            uffd::open_in_target(tr, pid, tid, &async_features, true)?
                .ok()
                .map(|u| u.fd)
        } else {
            None
        };
        Ok(WriteWatch {
            pid,
            tid,
            uffd,
            uffd_unavailable,
            registered: Vec::new(),
            unregistrable: Vec::new(),
            uffd_pages: BTreeSet::new(),
            async_fd,
            async_registered: Vec::new(),
            async_unregistrable: Vec::new(),
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

    fn uffd_can_try(m: &Mapping) -> bool {
        if m.shared {
            return false;
        }
        match &m.path {
            None => true,
            Some(p) => {
                let s = p.as_os_str().as_encoded_bytes();
                s == b"[heap]" || s.starts_with(b"[stack") || s.starts_with(b"[anon")
            }
        }
    }

    /// Register the VMA for uffd write-protect mode (once) on `fd`. False if uffd refuses it.
    fn register_range(
        fd: RawFd,
        m: &Mapping,
        registered: &mut Vec<(u64, u64)>,
        refused: &mut Vec<(u64, u64)>,
    ) -> bool {
        let range = (m.start.0, m.end.0);
        if registered.contains(&range) {
            return true;
        }
        if refused.contains(&range) {
            return false;
        }
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: range.0,
                len: range.1 - range.0,
            },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        if uffd::ioctl(fd, UFFDIO_REGISTER, &mut reg).is_ok()
            && reg.ioctls & UFFDIO_WRITEPROTECT_IOCTL_BIT != 0
        {
            registered.push(range);
            true
        } else {
            refused.push(range);
            false
        }
    }

    fn ensure_registered(&mut self, fd: RawFd, m: &Mapping) -> bool {
        Self::register_range(fd, m, &mut self.registered, &mut self.unregistrable)
    }

    fn ensure_async_registered(&mut self, fd: RawFd, m: &Mapping) -> bool {
        Self::register_range(
            fd,
            m,
            &mut self.async_registered,
            &mut self.async_unregistrable,
        )
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
            if m.is_pseudo() && !Self::uffd_can_try(m) {
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
                .map(|u| (u.fd.as_raw_fd(), u.user_mode_only));
            if let Some((fd, user_mode_only)) = sync_fd {
                if user_mode_only && is_stack(m) {
                    // The kernel writes signal frames there: an EFAULT would kill the program.
                    sum.skipped.push(page);
                    continue;
                }
                if Self::uffd_can_try(m) && !self.wp_unpopulated() {
                    // Without UFFD_FEATURE_WP_UNPOPULATED protecting a never-touched page does nothing and its
                    // first write would go unseen: touch it (a read maps the zero page) first.
                    let mut b = [0u8; 1];
                    let _ = tr.read_memory(self.pid, page, &mut b);
                }
                if Self::uffd_can_try(m)
                    && self.ensure_registered(fd, m)
                    && writeprotect(fd, page.0, PAGE_SIZE, true).is_ok()
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
            if let Some(fd) = self.async_fd.as_ref().map(|f| f.as_raw_fd()) {
                if self.ensure_async_registered(fd, m)
                    && writeprotect(fd, page.0, PAGE_SIZE, true).is_ok()
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
                for (start, end) in &self.async_registered {
                    let _ = writeprotect(fd.as_raw_fd(), *start, end - start, false);
                    let mut range = UffdioRange {
                        start: *start,
                        len: end - start,
                    };
                    let _ = uffd::ioctl(fd.as_raw_fd(), UFFDIO_UNREGISTER, &mut range);
                }
            }
        }
        let Some(mut u) = self.uffd.take() else {
            return;
        };
        if self.alive {
            let fd = u.fd.as_raw_fd();
            for (start, end) in &self.registered {
                // Clearing protection over the whole range also wakes any thread still blocked on it.
                let _ = writeprotect(fd, *start, end - start, false);
                let mut range = UffdioRange {
                    start: *start,
                    len: end - start,
                };
                let _ = uffd::ioctl(fd, UFFDIO_UNREGISTER, &mut range);
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
