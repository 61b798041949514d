//! Typed helpers over [`Tracer::remote_syscall`]: mmap, mprotect, munmap, close, userfaultfd in the target.

use nix::unistd::Pid;

use crate::process::Tracer;
use crate::{Addr, TracerError};

/// `mmap(addr, len, prot, flags, fd, off)` inside the target; returns the mapped address.
#[allow(clippy::too_many_arguments)]
pub fn remote_mmap(
    tr: &mut Tracer,
    tid: Pid,
    addr: Addr,
    len: u64,
    prot: i32,
    flags: i32,
    fd: i32,
    off: u64,
) -> Result<Addr, TracerError> {
    let r = tr.remote_syscall(
        tid,
        libc::SYS_mmap,
        [
            addr.0,
            len,
            prot as u64,
            flags as u64,
            fd as i64 as u64,
            off,
        ],
    )?;
    Ok(Addr(r as u64))
}

/// `mprotect(addr, len, prot)` inside the target.
pub fn remote_mprotect(
    tr: &mut Tracer,
    tid: Pid,
    addr: Addr,
    len: u64,
    prot: i32,
) -> Result<(), TracerError> {
    tr.remote_syscall(tid, libc::SYS_mprotect, [addr.0, len, prot as u64, 0, 0, 0])?;
    Ok(())
}

/// `munmap(addr, len)` inside the target.
pub fn remote_munmap(tr: &mut Tracer, tid: Pid, addr: Addr, len: u64) -> Result<(), TracerError> {
    tr.remote_syscall(tid, libc::SYS_munmap, [addr.0, len, 0, 0, 0, 0])?;
    Ok(())
}

/// `close(fd)` inside the target.
pub fn remote_close(tr: &mut Tracer, tid: Pid, fd: i32) -> Result<(), TracerError> {
    tr.remote_syscall(tid, libc::SYS_close, [fd as i64 as u64, 0, 0, 0, 0, 0])?;
    Ok(())
}

/// `userfaultfd(flags)` inside the target; returns the target-side file descriptor.
pub fn remote_userfaultfd(tr: &mut Tracer, tid: Pid, flags: i32) -> Result<i32, TracerError> {
    let r = tr.remote_syscall(tid, libc::SYS_userfaultfd, [flags as u64, 0, 0, 0, 0, 0])?;
    Ok(r as i32)
}
