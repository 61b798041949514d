//! The perf_event ABI (linux/perf_event.h) that libc does not carry, and the one call that opens an event.

use std::os::fd::{FromRawFd, OwnedFd};

use nix::unistd::Pid;

pub(crate) const PERF_TYPE_SOFTWARE: u32 = 1;
pub(crate) const PERF_COUNT_SW_TASK_CLOCK: u64 = 1;
pub(crate) const ATTR_FLAG_EXCLUDE_KERNEL: u64 = 1 << 5;
pub(crate) const ATTR_FLAG_EXCLUDE_HV: u64 = 1 << 6;
pub(crate) const ATTR_FLAG_FREQ: u64 = 1 << 10;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;

/// `struct perf_event_attr`, PERF_ATTR_SIZE_VER8 (136 bytes). Bit fields are folded into `flags`.
#[repr(C)]
#[derive(Default)]
pub(crate) struct PerfEventAttr {
    pub type_: u32,
    pub size: u32,
    pub config: u64,
    pub sample_freq: u64,
    pub sample_type: u64,
    pub read_format: u64,
    pub flags: u64,
    pub wakeup_events: u32,
    pub bp_type: u32,
    pub config1: u64,
    pub config2: u64,
    pub branch_sample_type: u64,
    pub sample_regs_user: u64,
    pub sample_stack_user: u32,
    pub clockid: i32,
    pub sample_regs_intr: u64,
    pub aux_watermark: u32,
    pub sample_max_stack: u16,
    pub reserved_2: u16,
    pub aux_sample_size: u32,
    pub reserved_3: u32,
    pub sig_data: u64,
    pub config3: u64,
}

/// Open `attr` on thread `tid` (any CPU, no group), close-on-exec. `attr.size` is set here.
pub(crate) fn perf_event_open(attr: &PerfEventAttr, tid: Pid) -> std::io::Result<OwnedFd> {
    let attr = PerfEventAttr {
        size: std::mem::size_of::<PerfEventAttr>() as u32,
        ..*attr
    };
    // SAFETY: `attr` is a fully initialised perf_event_attr of the size it declares and outlives the call; the
    // remaining arguments are plain integers.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttr,
            tid.as_raw() as libc::pid_t,
            -1 as libc::c_int,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: perf_event_open returned a fresh file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attr_has_the_size_of_abi_version_8() {
        assert_eq!(std::mem::size_of::<PerfEventAttr>(), 136);
    }
}
