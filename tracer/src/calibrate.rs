//! What one ptrace signal stop costs the tracee on this machine, measured: a child raises signals to itself,
//! once untraced and once traced by the calling thread, and times both.
//!
//! A signal-delivery stop costs the tracee two context switches and the tracer's wake-up, more on a VM; the
//! tracer's own handling comes on top and is timed by whoever handles the stop. The measurement runs in the
//! calling thread's own child (waited for by pid), so it must not be a thread that waits for `-1` without
//! `__WNOTHREAD` (the [`crate::Tracer`] thread waits with `__WNOTHREAD`: its tracees are not disturbed).

use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{fork, pipe, read, ForkResult, Pid};

/// Signals raised per timed run.
const RAISES: u32 = 100;

/// Kill and reap a calibration child on every way out.
struct Child(Pid);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, Signal::SIGKILL);
        let _ = waitpid(self.0, None);
    }
}

extern "C" fn ignore(_: libc::c_int) {}

/// In the child: raise SIGUSR1 [`RAISES`] times and write the nanoseconds it took to `fd`, then exit. Only
/// async-signal-safe calls (the parent may have other threads).
fn child_body(fd: i32, traced: bool, cpu: Option<usize>) -> ! {
    // SAFETY: sched_setaffinity, sigaction, ptrace(TRACEME), raise, clock_gettime, write and _exit are
    // async-signal-safe system calls; every pointer passed refers to this frame's locals.
    unsafe {
        if let Some(c) = cpu {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(c, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = ignore as extern "C" fn(libc::c_int) as usize;
        libc::sigaction(libc::SIGUSR1, &sa, std::ptr::null_mut());
        if traced {
            // Refused (Yama's ptrace_scope 3, seccomp): leave, or the SIGSTOP below would stop us untraced and
            // the parent would wait forever.
            if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) != 0 {
                libc::_exit(1);
            }
            libc::raise(libc::SIGSTOP);
        }
        let mut t0: libc::timespec = std::mem::zeroed();
        let mut t1: libc::timespec = std::mem::zeroed();
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t0);
        for _ in 0..RAISES {
            libc::raise(libc::SIGUSR1);
        }
        libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t1);
        let ns: u64 =
            (t1.tv_sec - t0.tv_sec) as u64 * 1_000_000_000 + t1.tv_nsec as u64 - t0.tv_nsec as u64;
        let b = ns.to_ne_bytes();
        libc::write(fd, b.as_ptr() as *const libc::c_void, 8);
        libc::_exit(0)
    }
}

/// One timed run: the child's nanoseconds for [`RAISES`] signals, traced (each signal a stop this thread
/// resumes at once) or not.
fn timed_run(traced: bool, cpu: Option<usize>) -> Option<u64> {
    let (r, w) = pipe().ok()?;
    use std::os::fd::AsRawFd as _;
    // SAFETY: the child runs only async-signal-safe code (child_body) and exits without returning.
    let child = match unsafe { fork() }.ok()? {
        ForkResult::Child => child_body(w.as_raw_fd(), traced, cpu),
        ForkResult::Parent { child } => Child(child),
    };
    drop(w);
    if traced {
        loop {
            match waitpid(child.0, None).ok()? {
                WaitStatus::Stopped(_, sig) => {
                    let deliver = (sig != Signal::SIGSTOP).then_some(sig);
                    nix::sys::ptrace::cont(child.0, deliver).ok()?;
                }
                WaitStatus::Exited(..) | WaitStatus::Signaled(..) => break,
                _ => {}
            }
        }
    }
    let mut b = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        match read(r.as_raw_fd(), &mut b[got..]) {
            Ok(0) | Err(_) => return None,
            Ok(n) => got += n,
        }
    }
    Some(u64::from_ne_bytes(b))
}

/// The tracee's cost of one signal-delivery stop, beyond what the same signal costs untraced: the least of
/// three pairs of runs. None if a run failed (no fork, ptrace refused).
///
/// The tracer sleeps while its tracee runs, so a stop usually wakes it on another CPU, which costs several times
/// what a switch on one CPU does (5 µs against 60-70 µs on a 2-vCPU VM): the child runs on another CPU than this
/// thread, both pinned for the measurement (this thread's affinity is restored after).
pub fn signal_stop_cost() -> Option<Duration> {
    let here = nix::sched::sched_getaffinity(Pid::from_raw(0)).ok();
    let cpus: Vec<usize> = here
        .as_ref()
        .map(|set| {
            (0..nix::sched::CpuSet::count())
                .filter(|&c| set.is_set(c).unwrap_or(false))
                .collect()
        })
        .unwrap_or_default();
    let child_cpu = match cpus.as_slice() {
        [mine, other, ..] => {
            let mut one = nix::sched::CpuSet::new();
            let _ = one.set(*mine);
            let _ = nix::sched::sched_setaffinity(Pid::from_raw(0), &one);
            Some(*other)
        }
        _ => None,
    };
    let cost = measure(child_cpu);
    if let (Some(set), Some(_)) = (here, child_cpu) {
        let _ = nix::sched::sched_setaffinity(Pid::from_raw(0), &set);
    }
    cost
}

fn measure(cpu: Option<usize>) -> Option<Duration> {
    let mut per: Vec<u64> = Vec::new();
    for _ in 0..3 {
        let plain = timed_run(false, cpu)?;
        let traced = timed_run(true, cpu)?;
        per.push(traced.saturating_sub(plain) / u64::from(RAISES));
    }
    // Load only adds to a run (the child waits for its CPU): the least of the three is the closest to the cost.
    per.iter().min().map(|&ns| Duration::from_nanos(ns))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stop_costs_something_and_not_a_millisecond() {
        let d = signal_stop_cost().expect("calibration runs");
        eprintln!("signal stop: {d:?}");
        assert!(d > Duration::from_nanos(500), "{d:?}");
        assert!(d < Duration::from_millis(1), "{d:?}");
    }
}
