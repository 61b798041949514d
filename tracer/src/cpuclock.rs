//! A process's user CPU time, read precisely while it runs: one counting task-clock event per thread.
//!
//! Why not the process CPU clock (`clock_getcpuclockid`): for a process other than the caller, the kernel adds
//! up its threads' run times as last accounted, at a scheduler tick or a context switch, and does not bring a
//! thread running on another CPU up to date (kernel/sched/cputime.c, `thread_group_cputime`). A reading can lag
//! by a whole tick (4 ms at HZ=250): an error as large as the intervals the A/B measurement compares. Reading a
//! perf event of a running task makes its CPU update the count first, so the reading is exact to the moment.
//!
//! User time only: the target's kernel time is mostly what dynspec makes it spend (ptrace stops, guard faults,
//! injected calls), the same whichever code runs, and it needs no `perf_event_paranoid` below 2 to count.
//!
//! Threads come and go: [`CpuClock::sync`] opens an event for each new thread and folds the final count of a
//! gone one into the total, so the clock never runs backwards.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::OwnedFd;

use nix::unistd::Pid;

use crate::perf::{
    perf_event_open, PerfEventAttr, ATTR_FLAG_EXCLUDE_HV, ATTR_FLAG_EXCLUDE_KERNEL,
    PERF_COUNT_SW_TASK_CLOCK, PERF_TYPE_SOFTWARE,
};

/// The user CPU time of a set of threads, in ns, from one counting event each.
#[derive(Default)]
pub struct CpuClock {
    events: BTreeMap<Pid, OwnedFd>,
    /// The final counts of threads no longer followed.
    retired: u64,
}

/// Read one counting event's value (`read_format` 0: a single u64).
fn read_count(fd: &OwnedFd) -> Option<u64> {
    let mut buf = [0u8; 8];
    let mut file = std::fs::File::from(fd.try_clone().ok()?);
    file.read_exact(&mut buf).ok()?;
    Some(u64::from_ne_bytes(buf))
}

impl CpuClock {
    pub fn new() -> CpuClock {
        CpuClock::default()
    }

    /// Follow exactly `tids`: open an event for each new one, retire the ones not listed (their final count is
    /// kept). Returns false when some thread's event could not be opened (the total then misses it: the caller
    /// should not trust the clock).
    pub fn sync(&mut self, tids: &[Pid]) -> bool {
        let gone: Vec<Pid> = self
            .events
            .keys()
            .filter(|t| !tids.contains(t))
            .copied()
            .collect();
        for t in gone {
            if let Some(fd) = self.events.remove(&t) {
                self.retired += read_count(&fd).unwrap_or(0);
            }
        }
        let mut complete = true;
        for &t in tids {
            if self.events.contains_key(&t) {
                continue;
            }
            match self.open(t) {
                Some(fd) => {
                    self.events.insert(t, fd);
                }
                None => complete = false,
            }
        }
        complete
    }

    fn open(&self, tid: Pid) -> Option<OwnedFd> {
        let attr = |flags| PerfEventAttr {
            type_: PERF_TYPE_SOFTWARE,
            config: PERF_COUNT_SW_TASK_CLOCK,
            flags,
            ..Default::default()
        };
        perf_event_open(&attr(ATTR_FLAG_EXCLUDE_HV | ATTR_FLAG_EXCLUDE_KERNEL), tid).ok()
    }

    /// Threads followed.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// CPU time of every thread followed so far, in ns; None when an event cannot be read.
    pub fn read_ns(&self) -> Option<u64> {
        let mut total = self.retired;
        for fd in self.events.values() {
            total += read_count(fd)?;
        }
        Some(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// A child spinning on a CPU, killed and reaped on drop.
    struct Spinner(std::process::Child);

    impl Drop for Spinner {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    impl Spinner {
        fn new() -> Spinner {
            Spinner(
                std::process::Command::new("sh")
                    .args(["-c", "while :; do :; done"])
                    .spawn()
                    .expect("spawn sh"),
            )
        }

        fn pid(&self) -> Pid {
            Pid::from_raw(self.0.id() as i32)
        }
    }

    #[test]
    fn a_running_thread_is_counted_to_the_moment() {
        let s = Spinner::new();
        let mut clock = CpuClock::new();
        if !clock.sync(&[s.pid()]) {
            eprintln!("perf_event_open refused here; nothing to check");
            return;
        }
        // Readings 2 ms apart advance with the wall clock (the spinner has a CPU of its own or shares one), never
        // backwards, and the sum over the readings is exact to the end (no tick-sized lag).
        let t0 = Instant::now();
        let c0 = clock.read_ns().expect("read");
        let mut last = c0;
        for _ in 0..20 {
            std::thread::sleep(Duration::from_millis(2));
            let c = clock.read_ns().expect("read");
            assert!(c >= last, "the clock ran backwards: {last} -> {c}");
            last = c;
        }
        let wall = t0.elapsed().as_nanos() as u64;
        assert!(
            last - c0 <= wall + 1_000_000,
            "{} ns of CPU in {wall} ns",
            last - c0
        );
        assert!(last > c0, "a spinning thread used no CPU");
        // A thread no longer followed keeps its count in the total.
        clock.sync(&[]);
        assert!(clock.is_empty());
        assert!(clock.read_ns().expect("read") >= last);
    }
}
