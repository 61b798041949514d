//! userfaultfd plumbing shared by every write-protection user: the kernel ABI, ioctls, and creating a uffd inside
//! a target (so it is bound to the target's memory) that dynspec then owns.
//!
//! The fd is created by an injected `userfaultfd(2)` in the target, taken over with `pidfd_getfd(2)` and closed
//! in the target again, so the program never sees it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::errno::Errno;
use nix::unistd::Pid;

use crate::process::Tracer;
use crate::remote::{remote_close, remote_userfaultfd};
use crate::TracerError;

pub const UFFD_API: u64 = 0xAA;
pub const UFFD_USER_MODE_ONLY: i32 = 1;
pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_EVENT_REMAP: u8 = 0x14;
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
pub const UFFD_EVENT_UNMAP: u8 = 0x16;
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
pub const UFFDIO_API: libc::c_ulong = 0xC018_AA3F;
pub const UFFDIO_REGISTER: libc::c_ulong = 0xC020_AA00;
pub const UFFDIO_UNREGISTER: libc::c_ulong = 0x8010_AA01;
pub const UFFDIO_WAKE: libc::c_ulong = 0x8010_AA02;
pub const UFFDIO_WRITEPROTECT: libc::c_ulong = 0xC018_AA06;
/// Bit of `UffdioRegister::ioctls` saying UFFDIO_WRITEPROTECT is available on the registered range.
pub const UFFDIO_WRITEPROTECT_IOCTL_BIT: u64 = 1 << 0x06;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Default)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Default)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Default)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

/// `struct uffd_msg` (packed, 32 bytes): the page-fault view (`ptid` with UFFD_FEATURE_THREAD_ID); for the
/// remap/remove/unmap events `flags` and `address` hold the first two u64 arguments.
#[repr(C)]
#[derive(Default, Clone, Copy)]
pub struct UffdMsg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub flags: u64,
    pub address: u64,
    pub ptid: u64,
}

/// A userfaultfd ioctl, retried while the target's memory map is changing (EAGAIN) or on EINTR.
pub fn ioctl<T>(fd: RawFd, req: libc::c_ulong, arg: &mut T) -> Result<(), Errno> {
    loop {
        // SAFETY: `arg` is a live, correctly sized #[repr(C)] struct matching the ioctl's ABI.
        let r = unsafe { libc::ioctl(fd, req, arg as *mut T) };
        if r == 0 {
            return Ok(());
        }
        match Errno::last() {
            Errno::EINTR | Errno::EAGAIN => continue,
            e => return Err(e),
        }
    }
}

/// Set or clear uffd write protection of `[start, start+len)` (clearing wakes threads blocked on it).
pub fn writeprotect(fd: RawFd, start: u64, len: u64, protect: bool) -> Result<(), Errno> {
    let mut wp = UffdioWriteprotect {
        range: UffdioRange { start, len },
        mode: if protect {
            UFFDIO_WRITEPROTECT_MODE_WP
        } else {
            0
        },
    };
    ioctl(fd, UFFDIO_WRITEPROTECT, &mut wp)
}

/// A userfaultfd of the target, owned by dynspec.
pub struct TargetUffd {
    pub fd: OwnedFd,
    /// The feature set UFFDIO_API accepted.
    pub features: u64,
    /// Created with UFFD_USER_MODE_ONLY (kernel writes then fail with EFAULT instead of faulting).
    pub user_mode_only: bool,
}

/// Create a userfaultfd inside `pid` (on stopped thread `tid`), take it over and enable the first of
/// `feature_sets` the kernel accepts. `allow_user_mode_only`: on EPERM, retry with UFFD_USER_MODE_ONLY.
/// `Ok(Err(reason))` when uffd is unavailable (the caller falls back); `Err` when the target itself failed.
pub fn open_in_target(
    tr: &mut Tracer,
    pid: Pid,
    tid: Pid,
    feature_sets: &[u64],
    allow_user_mode_only: bool,
) -> Result<Result<TargetUffd, String>, TracerError> {
    let base = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let mut user_mode_only = false;
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
                    return Ok(Err(format!("userfaultfd: {}", Errno::from_raw(errno))))
                }
                Err(e) => return Err(e),
            }
        }
        Err(TracerError::RemoteSyscall { errno, .. }) => {
            return Ok(Err(format!("userfaultfd: {}", Errno::from_raw(errno))))
        }
        Err(e) => return Err(e),
    };
    // SAFETY: pidfd_open with integer arguments.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    let taken = if pidfd < 0 {
        Err(format!("pidfd_open: {}", Errno::last()))
    } else {
        // SAFETY: pidfd is a fresh fd we own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
        // SAFETY: pidfd_getfd with integer arguments.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), remote_fd, 0) };
        if fd < 0 {
            Err(format!("pidfd_getfd: {}", Errno::last()))
        } else {
            // SAFETY: fd is a fresh fd we own.
            Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
        }
    };
    // The target must not keep (or see) the descriptor.
    remote_close(tr, tid, remote_fd)?;
    let fd = match taken {
        Ok(fd) => fd,
        Err(why) => return Ok(Err(why)),
    };
    for &features in feature_sets {
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        if ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api).is_ok() {
            return Ok(Ok(TargetUffd {
                fd,
                features,
                user_mode_only,
            }));
        }
    }
    Ok(Err(
        "UFFDIO_API: write-protect faults not supported by this kernel".into(),
    ))
}
