//! Memory (through /proc/PID/mem), registers and siginfo of traced threads.

use std::os::unix::fs::FileExt;

use nix::errno::Errno;

use super::{pt, Pid, Tracer};
use crate::{Addr, TracerError};

impl Tracer {
    /// The siginfo of a thread in signal-delivery-stop.
    pub fn siginfo(&self, tid: Pid) -> Result<libc::siginfo_t, TracerError> {
        // SAFETY: siginfo_t is plain old data; all-zero is a valid value.
        let mut si: libc::siginfo_t = unsafe { std::mem::zeroed() };
        pt(libc::PTRACE_GETSIGINFO, tid, 0, &mut si as *mut _ as usize)
            .map_err(|e| self.map_ptrace_err(tid, "PTRACE_GETSIGINFO", e))?;
        Ok(si)
    }

    pub(crate) fn set_siginfo(&self, tid: Pid, si: &libc::siginfo_t) -> Result<(), TracerError> {
        pt(libc::PTRACE_SETSIGINFO, tid, 0, si as *const _ as usize)
            .map_err(|e| self.map_ptrace_err(tid, "PTRACE_SETSIGINFO", e))?;
        Ok(())
    }

    pub(super) fn map_ptrace_err(&self, tid: Pid, op: &str, e: Errno) -> TracerError {
        match e {
            Errno::ESRCH if !self.threads.contains_key(&tid) => TracerError::UnknownThread(tid),
            Errno::ESRCH if !self.is_stopped(tid) => TracerError::NotStopped(tid),
            Errno::ESRCH => TracerError::ProcessGone(tid),
            e => TracerError::errno(format!("ptrace({op}, {tid})"), e),
        }
    }

    fn mem_file(&self, pid: Pid) -> Result<Pid, TracerError> {
        let tgid = self.tgid(pid).unwrap_or(pid);
        let mut mem = self.mem.borrow_mut();
        if let std::collections::hash_map::Entry::Vacant(slot) = mem.entry(tgid) {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(format!("/proc/{tgid}/mem"))
                .map_err(|e| match e.raw_os_error() {
                    Some(libc::ENOENT) | Some(libc::ESRCH) => TracerError::ProcessGone(tgid),
                    Some(libc::EACCES) | Some(libc::EPERM) => TracerError::permission_denied(tgid),
                    _ => TracerError::io(format!("opening /proc/{tgid}/mem"), e),
                })?;
            slot.insert(f);
        }
        Ok(tgid)
    }

    /// Read target memory through /proc/PID/mem. Short reads are errors.
    pub fn read_memory(&self, pid: Pid, addr: Addr, buf: &mut [u8]) -> Result<(), TracerError> {
        let tgid = self.mem_file(pid)?;
        let mem = self.mem.borrow();
        let f = &mem[&tgid];
        let mut done = 0;
        while done < buf.len() {
            match f.read_at(&mut buf[done..], addr.0.wrapping_add(done as u64)) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        if done < buf.len() {
            return Err(TracerError::ShortAccess {
                pid: tgid,
                addr: addr.0,
                len: buf.len(),
                done,
            });
        }
        Ok(())
    }

    /// Write target memory through /proc/PID/mem (works on read-only code pages).
    pub fn write_memory(&self, pid: Pid, addr: Addr, data: &[u8]) -> Result<(), TracerError> {
        let tgid = self.mem_file(pid)?;
        let mem = self.mem.borrow();
        let f = &mem[&tgid];
        let mut done = 0;
        while done < data.len() {
            match f.write_at(&data[done..], addr.0.wrapping_add(done as u64)) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        if done < data.len() {
            return Err(TracerError::ShortAccess {
                pid: tgid,
                addr: addr.0,
                len: data.len(),
                done,
            });
        }
        Ok(())
    }

    /// General-purpose registers of a stopped thread.
    pub fn regs(&self, tid: Pid) -> Result<libc::user_regs_struct, TracerError> {
        // SAFETY: user_regs_struct is plain old data; all-zero is valid.
        let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        pt(libc::PTRACE_GETREGS, tid, 0, &mut regs as *mut _ as usize)
            .map_err(|e| self.map_ptrace_err(tid, "PTRACE_GETREGS", e))?;
        Ok(regs)
    }

    /// Set the general-purpose registers of a stopped thread.
    pub fn set_regs(&mut self, tid: Pid, regs: &libc::user_regs_struct) -> Result<(), TracerError> {
        self.check_thread()?;
        pt(libc::PTRACE_SETREGS, tid, 0, regs as *const _ as usize)
            .map_err(|e| self.map_ptrace_err(tid, "PTRACE_SETREGS", e))?;
        Ok(())
    }
}
