//! userfaultfd plumbing shared by every write-protection user ([`crate::WriteWatch`], the code cache's guards):
//! the kernel ABI as typed calls, creating a uffd inside a target (so it is bound to the target's memory) that
//! dynspec then owns, registering ranges for write-protect mode, and the reader thread that takes the uffd's
//! messages. What to do about a fault is the user's business (a [`Handler`]).
//!
//! The fd is created by an injected `userfaultfd(2)` in the target, taken over with `pidfd_getfd(2)` and closed
//! in the target again, so the program never sees it.
//!
//! The argument structs and request numbers are those of `linux-raw-sys` (include/uapi/linux/userfaultfd.h);
//! every ioctl has its own function taking its own argument type, and only a [`Uffd`] (a descriptor checked to
//! be a userfaultfd) can be passed to them.

use std::ops::ControlFlow;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use linux_raw_sys::general as uapi;
use linux_raw_sys::ioctl as request;
use nix::errno::Errno;
use nix::unistd::Pid;

use crate::maps::Mapping;
use crate::process::Tracer;
use crate::remote::{remote_close, remote_userfaultfd};
use crate::TracerError;

// The uapi constants, widened to the u64 fields of the ABI structs (u8 for `uffd_msg::event`).
pub const UFFD_API: u64 = uapi::UFFD_API as u64;
pub const UFFD_USER_MODE_ONLY: i32 = uapi::UFFD_USER_MODE_ONLY as i32;
pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = uapi::UFFD_FEATURE_PAGEFAULT_FLAG_WP as u64;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = uapi::UFFD_FEATURE_EVENT_REMAP as u64;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = uapi::UFFD_FEATURE_EVENT_REMOVE as u64;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = uapi::UFFD_FEATURE_EVENT_UNMAP as u64;
pub const UFFD_FEATURE_THREAD_ID: u64 = uapi::UFFD_FEATURE_THREAD_ID as u64;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = uapi::UFFD_FEATURE_WP_UNPOPULATED as u64;
pub const UFFD_FEATURE_WP_ASYNC: u64 = uapi::UFFD_FEATURE_WP_ASYNC as u64;
pub const UFFD_EVENT_PAGEFAULT: u8 = uapi::UFFD_EVENT_PAGEFAULT as u8;
pub const UFFD_EVENT_REMAP: u8 = uapi::UFFD_EVENT_REMAP as u8;
pub const UFFD_EVENT_REMOVE: u8 = uapi::UFFD_EVENT_REMOVE as u8;
pub const UFFD_EVENT_UNMAP: u8 = uapi::UFFD_EVENT_UNMAP as u8;
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = uapi::UFFD_PAGEFAULT_FLAG_WP as u64;
pub const UFFDIO_REGISTER_MODE_WP: u64 = uapi::UFFDIO_REGISTER_MODE_WP as u64;
/// include/uapi/linux/userfaultfd.h: `#define UFFDIO_WRITEPROTECT_MODE_WP ((__u64)1<<0)` (linux-raw-sys 0.12 does
/// not export it).
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// Bit of `uffdio_register::ioctls` saying UFFDIO_WRITEPROTECT is available on the registered range.
pub const UFFDIO_WRITEPROTECT_IOCTL_BIT: u64 = 1 << uapi::_UFFDIO_WRITEPROTECT;

const _: () = assert!(std::mem::size_of::<uapi::uffd_msg>() == 32);

/// A userfaultfd owned by dynspec. Only a descriptor checked to be one is wrapped, so the typed ioctls below
/// always reach the userfaultfd driver with the argument layout it expects.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    /// Wrap `fd` if it is a userfaultfd (its /proc/self/fd link says so); gives it back otherwise.
    pub fn new(fd: OwnedFd) -> Result<Uffd, OwnedFd> {
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        match link {
            Ok(l) if l.as_os_str() == "anon_inode:[userfaultfd]" => Ok(Uffd { fd }),
            _ => Err(fd),
        }
    }

    /// A userfaultfd ioctl, retried while the target's memory map is changing (EAGAIN) or on EINTR.
    ///
    /// # Safety
    /// `T` must be the argument struct of `req` in the userfaultfd ABI.
    unsafe fn ioctl<T>(&self, req: u32, arg: &mut T) -> Result<(), Errno> {
        loop {
            // SAFETY: `self.fd` is a userfaultfd (checked in `new`), and the caller guarantees `arg` is the live,
            // exclusively borrowed argument struct `req` reads and writes.
            let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), req as libc::Ioctl, arg as *mut T) };
            if r == 0 {
                return Ok(());
            }
            match Errno::last() {
                Errno::EINTR | Errno::EAGAIN => continue,
                e => return Err(e),
            }
        }
    }

    /// UFFDIO_API: the handshake that enables `features`; returns the ioctls the uffd then supports.
    pub fn api(&self, features: u64) -> Result<u64, Errno> {
        let mut arg = uapi::uffdio_api {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API takes a `struct uffdio_api`.
        unsafe { self.ioctl(request::UFFDIO_API, &mut arg) }?;
        Ok(arg.ioctls)
    }

    /// UFFDIO_REGISTER of `[start, start+len)` (whole VMAs) in `mode` (`UFFDIO_REGISTER_MODE_*`); returns the
    /// ioctls available on the range (`1 << _UFFDIO_*` bits).
    pub fn register(&self, start: u64, len: u64, mode: u64) -> Result<u64, Errno> {
        let mut arg = uapi::uffdio_register {
            range: uapi::uffdio_range { start, len },
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`.
        unsafe { self.ioctl(request::UFFDIO_REGISTER, &mut arg) }?;
        Ok(arg.ioctls)
    }

    /// UFFDIO_UNREGISTER of `[start, start+len)`.
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), Errno> {
        let mut arg = uapi::uffdio_range { start, len };
        // SAFETY: UFFDIO_UNREGISTER takes a `struct uffdio_range`.
        unsafe { self.ioctl(request::UFFDIO_UNREGISTER, &mut arg) }
    }

    /// UFFDIO_WRITEPROTECT: set or clear write protection of `[start, start+len)` (clearing wakes the threads
    /// blocked on it).
    pub fn writeprotect(&self, start: u64, len: u64, protect: bool) -> Result<(), Errno> {
        let mut arg = uapi::uffdio_writeprotect {
            range: uapi::uffdio_range { start, len },
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        // SAFETY: UFFDIO_WRITEPROTECT takes a `struct uffdio_writeprotect`.
        unsafe { self.ioctl(request::UFFDIO_WRITEPROTECT, &mut arg) }
    }

    /// UFFDIO_WAKE: wake the threads blocked on a fault in `[start, start+len)`.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), Errno> {
        let mut arg = uapi::uffdio_range { start, len };
        // SAFETY: UFFDIO_WAKE takes a `struct uffdio_range`.
        unsafe { self.ioctl(request::UFFDIO_WAKE, &mut arg) }
    }

    /// Read one message (the fd is non-blocking).
    fn read_message(&self) -> Read {
        // SAFETY: uffd_msg is plain integers (and unions of them): all-zero is a valid value.
        let mut msg: uapi::uffd_msg = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<uapi::uffd_msg>();
        // SAFETY: reads at most `size` bytes into `msg`, a live buffer of exactly that size.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                &mut msg as *mut uapi::uffd_msg as *mut libc::c_void,
                size,
            )
        };
        if n < 0 {
            return match Errno::last() {
                Errno::EAGAIN => Read::Empty,
                Errno::EINTR => Read::Interrupted,
                _ => Read::Closed,
            };
        }
        if n == 0 {
            return Read::Closed;
        }
        if n as usize != size {
            return Read::Short;
        }
        Read::Message(Message::decode(&msg))
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// One `struct uffd_msg`, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    /// A fault on a registered range: the faulting address, `UFFD_PAGEFAULT_FLAG_*`, and the faulting thread
    /// (with UFFD_FEATURE_THREAD_ID). The faulting thread waits until the page is resolved or woken.
    PageFault {
        address: u64,
        flags: u64,
        tid: Option<Pid>,
    },
    /// mremap of registered memory (UFFD_FEATURE_EVENT_REMAP).
    Remap { from: u64, to: u64, len: u64 },
    /// madvise(DONTNEED/REMOVE) of `[start, end)` (UFFD_FEATURE_EVENT_REMOVE).
    Remove { start: u64, end: u64 },
    /// munmap of `[start, end)` (UFFD_FEATURE_EVENT_UNMAP).
    Unmap { start: u64, end: u64 },
    /// Any other event.
    Other { event: u8 },
}

impl Message {
    fn decode(msg: &uapi::uffd_msg) -> Message {
        // Copied out of the packed struct: no reference to an unaligned field.
        let arg = msg.arg;
        match msg.event {
            UFFD_EVENT_PAGEFAULT => {
                // SAFETY: a page-fault message fills the `pagefault` member; every member is plain integers.
                let pf = unsafe { arg.pagefault };
                // SAFETY: `feat` holds only `ptid`, a u32 (zero without UFFD_FEATURE_THREAD_ID).
                let ptid = unsafe { pf.feat.ptid };
                Message::PageFault {
                    address: pf.address,
                    flags: pf.flags,
                    tid: (ptid != 0).then(|| Pid::from_raw(ptid as i32)),
                }
            }
            UFFD_EVENT_REMAP => {
                // SAFETY: a remap message fills the `remap` member (plain integers).
                let r = unsafe { arg.remap };
                Message::Remap {
                    from: r.from,
                    to: r.to,
                    len: r.len,
                }
            }
            UFFD_EVENT_REMOVE | UFFD_EVENT_UNMAP => {
                // SAFETY: remove and unmap messages fill the `remove` member (plain integers).
                let r = unsafe { arg.remove };
                if msg.event == UFFD_EVENT_REMOVE {
                    Message::Remove {
                        start: r.start,
                        end: r.end,
                    }
                } else {
                    Message::Unmap {
                        start: r.start,
                        end: r.end,
                    }
                }
            }
            event => Message::Other { event },
        }
    }
}

/// What one read of the uffd gave.
enum Read {
    Message(Message),
    /// Nothing queued (EAGAIN).
    Empty,
    Interrupted,
    /// A read of the wrong size: skipped.
    Short,
    /// End of file or an error: the uffd is unusable.
    Closed,
}

/// Whether synchronous uffd write-protect may be tried on the mapping: private anonymous memory, the heap and
/// stacks (file-backed and shared memory need asynchronous mode or mprotect).
pub fn may_register(m: &Mapping) -> bool {
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

/// The mappings (whole VMAs) registered with one uffd for write-protect mode, and those it refused (each is
/// tried once).
#[derive(Debug, Default, Clone)]
pub struct Registrations {
    registered: Vec<(u64, u64)>,
    refused: Vec<(u64, u64)>,
}

impl Registrations {
    /// Register the mapping for write-protect mode (once). True if it is registered and UFFDIO_WRITEPROTECT is
    /// available on it.
    pub fn register_wp(&mut self, uffd: &Uffd, m: &Mapping) -> bool {
        let range = (m.start.0, m.end.0);
        if self.registered.contains(&range) {
            return true;
        }
        if self.refused.contains(&range) {
            return false;
        }
        let ok = uffd
            .register(range.0, range.1 - range.0, UFFDIO_REGISTER_MODE_WP)
            .is_ok_and(|ioctls| ioctls & UFFDIO_WRITEPROTECT_IOCTL_BIT != 0);
        if ok {
            self.registered.push(range);
        } else {
            self.refused.push(range);
        }
        ok
    }

    /// The registered `[start, end)` ranges.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.registered
    }
}

/// A userfaultfd of the target, owned by dynspec.
#[derive(Debug)]
pub struct TargetUffd {
    pub uffd: Uffd,
    /// The feature set UFFDIO_API accepted.
    pub features: u64,
    /// Created with UFFD_USER_MODE_ONLY (kernel writes then fail with EFAULT instead of faulting).
    pub user_mode_only: bool,
}

/// Why userfaultfd cannot be had in a target: the caller falls back (to mprotect), it is not a failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UffdUnavailable {
    #[error("disabled by the caller")]
    Disabled,
    /// The userfaultfd system call failed inside the target (EPERM without privilege, ENOSYS, ...).
    #[error("userfaultfd: {0}")]
    Syscall(Errno),
    /// The descriptor could not be taken over (pidfd_open / pidfd_getfd).
    #[error("{op}: {errno}")]
    TakeFd { op: &'static str, errno: Errno },
    #[error("pidfd_getfd: the descriptor is not a userfaultfd")]
    NotUffd,
    #[error("UFFDIO_API: write-protect faults not supported by this kernel")]
    NoWriteProtect,
}

/// Create a userfaultfd inside `pid` (on stopped thread `tid`), take it over and enable the first of
/// `feature_sets` the kernel accepts. `allow_user_mode_only`: on EPERM, retry with UFFD_USER_MODE_ONLY.
/// [`TracerError::UffdUnavailable`] when uffd cannot be had (the caller falls back); other errors when the target
/// itself failed.
pub fn open_in_target(
    tr: &mut Tracer,
    pid: Pid,
    tid: Pid,
    feature_sets: &[u64],
    allow_user_mode_only: bool,
) -> Result<TargetUffd, TracerError> {
    let base = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let mut user_mode_only = false;
    let unavailable = |why| TracerError::UffdUnavailable(why);
    // Without UFFD_USER_MODE_ONLY kernel writes are resolved too; it needs privilege
    // (CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1).
    let remote_fd = match remote_userfaultfd(tr, tid, base) {
        Ok(fd) => fd,
        Err(TracerError::RemoteSyscall { errno, .. })
            if errno == libc::EPERM && allow_user_mode_only =>
        {
            match remote_userfaultfd(tr, tid, base | UFFD_USER_MODE_ONLY) {
                Ok(fd) => {
                    user_mode_only = true;
                    fd
                }
                Err(TracerError::RemoteSyscall { errno, .. }) => {
                    return Err(unavailable(UffdUnavailable::Syscall(Errno::from_raw(
                        errno,
                    ))))
                }
                Err(e) => return Err(e),
            }
        }
        Err(TracerError::RemoteSyscall { errno, .. }) => {
            return Err(unavailable(UffdUnavailable::Syscall(Errno::from_raw(
                errno,
            ))))
        }
        Err(e) => return Err(e),
    };
    let taken = take_fd(pid, remote_fd);
    // The target must not keep (or see) the descriptor.
    remote_close(tr, tid, remote_fd)?;
    let uffd = Uffd::new(taken.map_err(unavailable)?)
        .map_err(|_| unavailable(UffdUnavailable::NotUffd))?;
    for &features in feature_sets {
        if uffd.api(features).is_ok() {
            return Ok(TargetUffd {
                uffd,
                features,
                user_mode_only,
            });
        }
    }
    Err(unavailable(UffdUnavailable::NoWriteProtect))
}

/// Duplicate descriptor `remote_fd` of process `pid` into dynspec (pidfd_open + pidfd_getfd).
fn take_fd(pid: Pid, remote_fd: i32) -> Result<OwnedFd, UffdUnavailable> {
    // SAFETY: pidfd_open with integer arguments.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if pidfd < 0 {
        return Err(UffdUnavailable::TakeFd {
            op: "pidfd_open",
            errno: Errno::last(),
        });
    }
    // SAFETY: pidfd is a fresh fd we own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
    // SAFETY: pidfd_getfd with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), remote_fd, 0) };
    if fd < 0 {
        return Err(UffdUnavailable::TakeFd {
            op: "pidfd_getfd",
            errno: Errno::last(),
        });
    }
    // SAFETY: fd is a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// What a [`Reader`] thread does with its uffd's messages. Every hook runs on the reader thread, with the uffd
/// (to resolve, wake or re-protect).
pub trait Handler: Send + 'static {
    /// How long the next wait may last before [`Handler::after_wait`] runs anyway (None: until the uffd is
    /// readable or the reader is stopped). Asked before every wait.
    fn timeout(&mut self) -> Option<Duration> {
        None
    }
    /// The uffd is readable; its messages are read next. (Reading one releases a thread blocked in an
    /// munmap/madvise/mremap that produced it.)
    fn before_read(&mut self, _uffd: &Uffd) {}
    /// One message.
    fn message(&mut self, uffd: &Uffd, msg: Message);
    /// Every queued message has been read.
    fn after_read(&mut self, _uffd: &Uffd) {}
    /// After every wake-up of the wait (messages handled, timeout, or an interrupted wait).
    /// `Break` ends the reader thread.
    fn after_wait(&mut self, _uffd: &Uffd) -> ControlFlow<()> {
        ControlFlow::Continue(())
    }
}

/// A thread that waits on a uffd and passes its messages to a [`Handler`], until [`Reader::stop`] (or drop), or
/// until the uffd is unusable (the target's memory is gone: exit or exec).
#[derive(Debug)]
pub struct Reader {
    /// eventfd that tells the thread to stop.
    stop: OwnedFd,
    handle: Option<JoinHandle<()>>,
}

impl Reader {
    /// Start the thread `name`.
    pub fn spawn(
        name: &str,
        uffd: Arc<Uffd>,
        handler: impl Handler,
    ) -> Result<Reader, TracerError> {
        // SAFETY: eventfd with integer arguments.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(TracerError::errno("eventfd", Errno::last()));
        }
        // SAFETY: efd is a fresh fd we own.
        let stop = unsafe { OwnedFd::from_raw_fd(efd) };
        let stop_fd = stop.as_raw_fd();
        let mut handler = handler;
        let handle = std::thread::Builder::new()
            .name(name.into())
            // The eventfd outlives the thread: `stop` joins it before the fd is closed.
            .spawn(move || read_loop(&uffd, stop_fd, &mut handler))
            .map_err(|e| TracerError::io(format!("starting the {name} thread"), e))?;
        Ok(Reader {
            stop,
            handle: Some(handle),
        })
    }

    /// Tell the thread to stop and wait for it.
    pub fn stop(&mut self) {
        let Some(h) = self.handle.take() else {
            return;
        };
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our own eventfd.
        unsafe {
            libc::write(
                self.stop.as_raw_fd(),
                &one as *const u64 as *const libc::c_void,
                8,
            )
        };
        let _ = h.join();
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The reader thread: wait for the uffd or the stop eventfd, read every queued message.
fn read_loop(uffd: &Uffd, stop: RawFd, h: &mut impl Handler) {
    let raw = uffd.as_raw_fd();
    loop {
        let timeout = h
            .timeout()
            .map_or(-1, |d| d.as_millis().min(i32::MAX as u128) as i32);
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
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if r < 0 {
            if Errno::last() != Errno::EINTR {
                return;
            }
            // Interrupted: nothing is ready.
            fds[0].revents = 0;
            fds[1].revents = 0;
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
        if fds[0].revents & libc::POLLIN != 0 {
            h.before_read(uffd);
            loop {
                match uffd.read_message() {
                    Read::Message(msg) => h.message(uffd, msg),
                    Read::Empty => break,
                    Read::Interrupted | Read::Short => continue,
                    Read::Closed => return,
                }
            }
            h.after_read(uffd);
        }
        if h.after_wait(uffd).is_break() {
            return;
        }
    }
}
