//! perf_event sampling of traced threads: task-clock samples with IP, TID and user registers.
//!
//! One software `PERF_COUNT_SW_TASK_CLOCK` event per thread (pid = tid, cpu = -1, no inherit: the kernel refuses
//! `inherit` together with a ring buffer for per-task events), in frequency mode. Each event has its own ring
//! buffer (1 + 2^n pages, mapped with memmap2) drained by a background reader thread into a shared buffer that the
//! session empties with [`Sampler::take_samples`]. Sampling never stops or single-steps the target: a sample costs
//! the target one timer interrupt.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use memmap2::{MmapOptions, MmapRaw};
use nix::unistd::Pid;

use crate::Addr;

/// Why sampling could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SamplerError {
    /// perf_event_open said EACCES/EPERM.
    #[error(
        "perf_event_open: permission denied for thread {tid}: lower kernel.perf_event_paranoid \
         (sysctl kernel.perf_event_paranoid=1) or run with CAP_PERFMON (or as root)"
    )]
    PermissionDenied { tid: i32 },
    /// The thread is gone (exited before we could open its event).
    #[error("perf_event_open: thread {tid} no longer exists")]
    ThreadGone { tid: i32 },
    /// The kernel has no perf events, or no software task clock.
    #[error("perf_event_open: perf events are not supported by this kernel ({source}); dynspec needs CONFIG_PERF_EVENTS")]
    Unsupported { source: std::io::Error },
    /// The requested rate is not allowed.
    #[error(
        "sampling rate {rate_hz} Hz is not allowed: it must be between 1 and kernel.perf_event_max_sample_rate ({max_hz} Hz)"
    )]
    InvalidRate { rate_hz: u64, max_hz: u64 },
    /// The ring buffers of all sampled threads exceed the locked-memory allowance of this user.
    #[error(
        "perf ring buffer of {kb} KiB for thread {tid} exceeds the locked-memory limit: raise \
         kernel.perf_event_mlock_kb (sysctl kernel.perf_event_mlock_kb=4096) or RLIMIT_MEMLOCK (ulimit -l), \
         lower --rate, or run as root"
    )]
    RingLimit { tid: i32, kb: u64 },
    /// Any other failure of a system call.
    #[error("{op} for thread {tid}: {source}")]
    Io {
        op: &'static str,
        tid: i32,
        source: std::io::Error,
    },
    /// The reader thread could not be started.
    #[error("cannot start the perf reader thread: {0}")]
    Thread(std::io::Error),
}

/// How to sample.
#[derive(Clone, Debug)]
pub struct SamplerConfig {
    /// Samples per second per thread of CPU time (perf frequency mode).
    pub rate_hz: u64,
    /// Data pages per ring buffer, a power of two (the metadata page comes on top).
    pub ring_data_pages: usize,
    /// How often the reader thread drains the rings.
    pub drain_interval: Duration,
    /// At most this many samples are buffered between two `take_samples` calls; more are counted as lost.
    pub max_buffered: usize,
}

impl SamplerConfig {
    /// A configuration for `rate_hz` whose rings hold ~100 ms of samples (8 to 128 data pages per thread).
    pub fn for_rate(rate_hz: u64) -> SamplerConfig {
        // One sample record with 18 registers is 8 + 8 + 8 + 8 + 18 * 8 = 176 bytes.
        let bytes = rate_hz.saturating_mul(176) / 10;
        let pages = (bytes / page_size() as u64 + 1)
            .next_power_of_two()
            .clamp(8, 128) as usize;
        SamplerConfig {
            rate_hz,
            ring_data_pages: pages,
            ..Default::default()
        }
    }
}

impl Default for SamplerConfig {
    fn default() -> Self {
        SamplerConfig {
            rate_hz: 1999,
            ring_data_pages: 16,
            drain_interval: Duration::from_millis(10),
            max_buffered: 1 << 20,
        }
    }
}

/// One sample of one thread, taken in user mode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Process (tgid) of the sampled thread.
    pub pid: Pid,
    /// The sampled thread.
    pub tid: Pid,
    /// Instruction pointer: the next instruction the thread would execute.
    pub ip: Addr,
    /// General-purpose registers in x86 encoding order (the order of `specializer::Gpr`):
    /// rax, rcx, rdx, rbx, rsp, rbp, rsi, rdi, r8, r9, r10, r11, r12, r13, r14, r15.
    pub regs: [u64; 16],
    /// RFLAGS.
    pub flags: u64,
}

use crate::perf::{
    perf_event_open, PerfEventAttr, ATTR_FLAG_EXCLUDE_HV, ATTR_FLAG_EXCLUDE_KERNEL, ATTR_FLAG_FREQ,
    PERF_COUNT_SW_TASK_CLOCK, PERF_TYPE_SOFTWARE,
};

const PERF_SAMPLE_IP: u64 = 1 << 0;
const PERF_SAMPLE_TID: u64 = 1 << 1;
const PERF_SAMPLE_REGS_USER: u64 = 1 << 12;
const PERF_RECORD_LOST: u32 = 2;
const PERF_RECORD_SAMPLE: u32 = 9;

// x86 perf_regs indices (arch/x86/include/uapi/asm/perf_regs.h).
const PR_AX: u32 = 0;
const PR_BX: u32 = 1;
const PR_CX: u32 = 2;
const PR_DX: u32 = 3;
const PR_SI: u32 = 4;
const PR_DI: u32 = 5;
const PR_BP: u32 = 6;
const PR_SP: u32 = 7;
const PR_IP: u32 = 8;
const PR_FLAGS: u32 = 9;
const PR_R8: u32 = 16;
const PR_R15: u32 = 23;

/// AX..FLAGS and R8..R15; the kernel rejects DS/ES/FS/GS on x86-64.
const REGS_MASK: u64 =
    ((1u64 << (PR_FLAGS + 1)) - 1) | (((1u64 << (PR_R15 + 1)) - 1) & !((1u64 << PR_R8) - 1));
/// Number of u64 register values in a sample: the set bits of REGS_MASK.
const NREGS: usize = REGS_MASK.count_ones() as usize;

// Offsets in `struct perf_event_mmap_page`.
const MMAP_DATA_HEAD: usize = 1024;
const MMAP_DATA_TAIL: usize = 1032;
const MMAP_DATA_OFFSET: usize = 1040;
const MMAP_DATA_SIZE: usize = 1048;

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// The kernel's current upper bound for frequency-mode rates (it may lower it at run time).
pub fn max_sample_rate() -> Option<u64> {
    std::fs::read_to_string("/proc/sys/kernel/perf_event_max_sample_rate")
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// One thread's event and its ring buffer.
struct Ring {
    /// Kept open for the lifetime of the mapping; closing it ends the event.
    _fd: OwnedFd,
    map: MmapRaw,
    data_offset: usize,
    data_size: usize,
}

impl Ring {
    fn open(tid: Pid, rate_hz: u64, data_pages: usize) -> Result<Ring, SamplerError> {
        let tid_raw = tid.as_raw();
        let attr = PerfEventAttr {
            type_: PERF_TYPE_SOFTWARE,
            config: PERF_COUNT_SW_TASK_CLOCK,
            sample_freq: rate_hz,
            sample_type: PERF_SAMPLE_IP | PERF_SAMPLE_TID | PERF_SAMPLE_REGS_USER,
            flags: ATTR_FLAG_EXCLUDE_KERNEL | ATTR_FLAG_EXCLUDE_HV | ATTR_FLAG_FREQ,
            sample_regs_user: REGS_MASK,
            ..Default::default()
        };
        let fd = perf_event_open(&attr, tid).map_err(|err| match err.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) => {
                SamplerError::PermissionDenied { tid: tid_raw }
            }
            Some(libc::ESRCH) => SamplerError::ThreadGone { tid: tid_raw },
            Some(libc::ENOENT)
            | Some(libc::ENODEV)
            | Some(libc::EOPNOTSUPP)
            | Some(libc::ENOSYS) => SamplerError::Unsupported { source: err },
            _ => SamplerError::Io {
                op: "perf_event_open",
                tid: tid_raw,
                source: err,
            },
        })?;
        let page = page_size();
        let len = page * (1 + data_pages);
        let map = MmapOptions::new()
            .len(len)
            .map_raw(fd.as_raw_fd())
            .map_err(|source| match source.raw_os_error() {
                Some(libc::EPERM) | Some(libc::ENOMEM) => SamplerError::RingLimit {
                    tid: tid_raw,
                    kb: (len / 1024) as u64,
                },
                _ => SamplerError::Io {
                    op: "mmap of the perf ring buffer",
                    tid: tid_raw,
                    source,
                },
            })?;
        // Older kernels leave data_offset/data_size zero: the data area then starts right after the first page.
        let data_offset = match read_u64(&map, MMAP_DATA_OFFSET) as usize {
            0 => page,
            o => o,
        };
        let data_size = match read_u64(&map, MMAP_DATA_SIZE) as usize {
            0 => len - page,
            s => s,
        };
        if data_offset
            .checked_add(data_size)
            .is_none_or(|end| end > len)
            || !data_size.is_power_of_two()
        {
            return Err(SamplerError::Io {
                op: "perf ring buffer layout",
                tid: tid_raw,
                source: std::io::Error::other("kernel reported an inconsistent ring buffer layout"),
            });
        }
        Ok(Ring {
            _fd: fd,
            map,
            data_offset,
            data_size,
        })
    }

    /// Move every complete record out of the ring, advancing data_tail.
    fn drain(&self, out: &mut Vec<Sample>, lost: &AtomicU64, max_buffered: usize) {
        let base = self.map.as_mut_ptr();
        // SAFETY: data_head/data_tail are naturally aligned u64 fields inside the mapped metadata page; the kernel
        // updates data_head concurrently, so it is read atomically with acquire ordering as perf_event.h requires
        // (pairs with the kernel's smp_store_release).
        let head =
            unsafe { (*(base.add(MMAP_DATA_HEAD) as *const AtomicU64)).load(Ordering::Acquire) };
        // SAFETY: as above; only this reader writes data_tail.
        let tail_ref = unsafe { &*(base.add(MMAP_DATA_TAIL) as *const AtomicU64) };
        let mut tail = tail_ref.load(Ordering::Relaxed);
        let avail = head.wrapping_sub(tail) as usize;
        if avail == 0 {
            return;
        }
        if avail > self.data_size {
            // Cannot happen while we own data_tail; resynchronise rather than parse garbage.
            tail_ref.store(head, Ordering::Release);
            return;
        }
        let mut bytes = vec![0u8; avail];
        let start = (tail as usize) & (self.data_size - 1);
        let first = avail.min(self.data_size - start);
        // SAFETY: start + first <= data_size and start/0 index into the data area [data_offset, data_offset+data_size)
        // of the live mapping; `bytes` has room for `avail` = first + (avail - first) bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                base.add(self.data_offset + start),
                bytes.as_mut_ptr(),
                first,
            );
            std::ptr::copy_nonoverlapping(
                base.add(self.data_offset),
                bytes.as_mut_ptr().add(first),
                avail - first,
            );
        }
        let mut pos = 0usize;
        while pos + 8 <= bytes.len() {
            let ty = u32::from_ne_bytes(bytes[pos..pos + 4].try_into().unwrap_or_default());
            let size =
                u16::from_ne_bytes(bytes[pos + 6..pos + 8].try_into().unwrap_or_default()) as usize;
            if size < 8 || pos + size > bytes.len() {
                break; // a record is being written or the ring is inconsistent: stop here
            }
            let rec = &bytes[pos + 8..pos + size];
            match ty {
                PERF_RECORD_SAMPLE => {
                    if let Some(s) = parse_sample(rec) {
                        if out.len() < max_buffered {
                            out.push(s);
                        } else {
                            lost.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                PERF_RECORD_LOST if rec.len() >= 16 => {
                    let n = u64::from_ne_bytes(rec[8..16].try_into().unwrap_or_default());
                    lost.fetch_add(n, Ordering::Relaxed);
                }
                _ => {}
            }
            pos += size;
        }
        tail = tail.wrapping_add(pos as u64);
        // Release: our reads of the records happen before the kernel may overwrite them.
        tail_ref.store(tail, Ordering::Release);
    }
}

fn read_u64(map: &MmapRaw, off: usize) -> u64 {
    // SAFETY: callers pass offsets of u64 fields of the metadata page, which is inside the mapping.
    unsafe { std::ptr::read_volatile(map.as_ptr().add(off) as *const u64) }
}

fn rd_u64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// Parse the body of a PERF_RECORD_SAMPLE with sample_type IP | TID | REGS_USER.
fn parse_sample(b: &[u8]) -> Option<Sample> {
    let ip = rd_u64(b, 0)?;
    let pid = u32::from_ne_bytes(b.get(8..12)?.try_into().ok()?) as i32;
    let tid = u32::from_ne_bytes(b.get(12..16)?.try_into().ok()?) as i32;
    let abi = rd_u64(b, 16)?;
    if abi == 0 {
        return None; // no user registers (sample not in user mode)
    }
    let mut v = [0u64; NREGS];
    for (i, slot) in v.iter_mut().enumerate() {
        *slot = rd_u64(b, 24 + 8 * i)?;
    }
    // Values come in increasing perf_regs bit order: AX BX CX DX SI DI BP SP IP FLAGS R8..R15.
    let at = |bit: u32| -> u64 {
        let idx = (REGS_MASK & ((1u64 << bit) - 1)).count_ones() as usize;
        v[idx]
    };
    let mut regs = [0u64; 16];
    regs[0] = at(PR_AX);
    regs[1] = at(PR_CX);
    regs[2] = at(PR_DX);
    regs[3] = at(PR_BX);
    regs[4] = at(PR_SP);
    regs[5] = at(PR_BP);
    regs[6] = at(PR_SI);
    regs[7] = at(PR_DI);
    for (k, slot) in regs[8..16].iter_mut().enumerate() {
        *slot = at(PR_R8 + k as u32);
    }
    let _ = at(PR_IP); // same as the sample IP
    Some(Sample {
        pid: Pid::from_raw(pid),
        tid: Pid::from_raw(tid),
        ip: Addr(ip),
        regs,
        flags: at(PR_FLAGS),
    })
}

struct Shared {
    rings: Mutex<HashMap<i32, Ring>>,
    samples: Mutex<Vec<Sample>>,
    lost: AtomicU64,
    stop: AtomicBool,
    max_buffered: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked while holding it; the data (rings, samples) is still
    // structurally valid, so keep going rather than propagate the panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn drain_all(&self) {
        let rings = lock(&self.rings);
        let mut local = Vec::new();
        for r in rings.values() {
            r.drain(&mut local, &self.lost, self.max_buffered);
        }
        drop(rings);
        if !local.is_empty() {
            let mut s = lock(&self.samples);
            let room = self.max_buffered.saturating_sub(s.len());
            if local.len() > room {
                self.lost
                    .fetch_add((local.len() - room) as u64, Ordering::Relaxed);
                local.truncate(room);
            }
            s.append(&mut local);
        }
    }
}

/// Samples every thread it is told about; see the module docs.
pub struct Sampler {
    shared: Arc<Shared>,
    reader: Option<JoinHandle<()>>,
    rate_hz: u64,
    ring_data_pages: usize,
}

impl Sampler {
    /// Check the configuration and start the reader thread. No thread is sampled until [`Sampler::add_thread`].
    pub fn new(config: SamplerConfig) -> Result<Sampler, SamplerError> {
        let max_hz = max_sample_rate().unwrap_or(u64::MAX);
        if config.rate_hz == 0 || config.rate_hz > max_hz {
            return Err(SamplerError::InvalidRate {
                rate_hz: config.rate_hz,
                max_hz,
            });
        }
        let ring_data_pages = config.ring_data_pages.max(1).next_power_of_two();
        let shared = Arc::new(Shared {
            rings: Mutex::new(HashMap::new()),
            samples: Mutex::new(Vec::new()),
            lost: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            max_buffered: config.max_buffered.max(1),
        });
        let sh = shared.clone();
        let interval = config.drain_interval;
        let reader = std::thread::Builder::new()
            .name("dynspec-perf".into())
            .spawn(move || {
                while !sh.stop.load(Ordering::Acquire) {
                    sh.drain_all();
                    std::thread::park_timeout(interval);
                }
            })
            .map_err(SamplerError::Thread)?;
        Ok(Sampler {
            shared,
            reader: Some(reader),
            rate_hz: config.rate_hz,
            ring_data_pages,
        })
    }

    /// The configured rate.
    pub fn rate_hz(&self) -> u64 {
        self.rate_hz
    }

    /// Start sampling thread `tid`. Adding a thread that is already sampled does nothing.
    pub fn add_thread(&self, tid: Pid) -> Result<(), SamplerError> {
        if lock(&self.shared.rings).contains_key(&tid.as_raw()) {
            return Ok(());
        }
        let ring = match Ring::open(tid, self.rate_hz, self.ring_data_pages) {
            Ok(r) => r,
            // The kernel lowers perf_event_max_sample_rate at run time when sampling interrupts take too long;
            // follow it rather than fail for threads that appear later.
            Err(SamplerError::Io { source, .. }) if source.raw_os_error() == Some(libc::EINVAL) => {
                let max = max_sample_rate().unwrap_or(1000).max(1);
                Ring::open(tid, self.rate_hz.min(max), self.ring_data_pages)?
            }
            Err(e) => return Err(e),
        };
        lock(&self.shared.rings).insert(tid.as_raw(), ring);
        Ok(())
    }

    /// Stop sampling `tid` (after collecting what its ring still holds). Unknown threads are ignored.
    pub fn remove_thread(&self, tid: Pid) {
        let ring = lock(&self.shared.rings).remove(&tid.as_raw());
        if let Some(ring) = ring {
            let mut local = Vec::new();
            ring.drain(&mut local, &self.shared.lost, self.shared.max_buffered);
            lock(&self.shared.samples).append(&mut local);
        }
    }

    /// Threads currently sampled.
    pub fn threads(&self) -> Vec<Pid> {
        let mut v: Vec<Pid> = lock(&self.shared.rings)
            .keys()
            .map(|&t| Pid::from_raw(t))
            .collect();
        v.sort();
        v
    }

    /// Every sample collected since the last call (the rings are drained first).
    pub fn take_samples(&self) -> Vec<Sample> {
        self.shared.drain_all();
        std::mem::take(&mut *lock(&self.shared.samples))
    }

    /// Samples the kernel or this sampler had to drop (ring full, buffer full).
    pub fn lost(&self) -> u64 {
        self.shared.lost.load(Ordering::Relaxed)
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(h) = self.reader.take() {
            h.thread().unpark();
            let _ = h.join();
        }
        // Rings (fds + mappings) are released with `shared`.
        lock(&self.shared.rings).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regs_mask_counts_18_values() {
        assert_eq!(NREGS, 18);
    }

    fn fake_record(ip: u64, pid: u32, tid: u32, vals: &[u64; NREGS]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&ip.to_ne_bytes());
        b.extend_from_slice(&pid.to_ne_bytes());
        b.extend_from_slice(&tid.to_ne_bytes());
        b.extend_from_slice(&2u64.to_ne_bytes());
        for v in vals {
            b.extend_from_slice(&v.to_ne_bytes());
        }
        b
    }

    #[test]
    fn parse_maps_perf_order_to_gpr_order() {
        // perf order: AX BX CX DX SI DI BP SP IP FLAGS R8..R15
        let mut vals = [0u64; NREGS];
        let names = [
            "ax", "bx", "cx", "dx", "si", "di", "bp", "sp", "ip", "fl", "r8", "r9", "r10", "r11",
            "r12", "r13", "r14", "r15",
        ];
        for (i, v) in vals.iter_mut().enumerate() {
            *v = 100 + i as u64;
        }
        let s = parse_sample(&fake_record(0x401000, 7, 8, &vals)).expect("parses");
        assert_eq!(s.ip, Addr(0x401000));
        assert_eq!(s.pid, Pid::from_raw(7));
        assert_eq!(s.tid, Pid::from_raw(8));
        let at = |n: &str| 100 + names.iter().position(|x| *x == n).unwrap() as u64;
        assert_eq!(
            s.regs,
            [
                at("ax"),
                at("cx"),
                at("dx"),
                at("bx"),
                at("sp"),
                at("bp"),
                at("si"),
                at("di"),
                at("r8"),
                at("r9"),
                at("r10"),
                at("r11"),
                at("r12"),
                at("r13"),
                at("r14"),
                at("r15")
            ]
        );
        assert_eq!(s.flags, at("fl"));
    }

    #[test]
    fn parse_rejects_truncated_and_kernel_samples() {
        let vals = [1u64; NREGS];
        let rec = fake_record(1, 2, 3, &vals);
        assert!(parse_sample(&rec[..rec.len() - 1]).is_none());
        let mut no_regs = rec[..24].to_vec();
        no_regs[16..24].copy_from_slice(&0u64.to_ne_bytes());
        assert!(parse_sample(&no_regs).is_none());
    }

    #[test]
    fn zero_rate_is_refused() {
        let cfg = SamplerConfig {
            rate_hz: 0,
            ..Default::default()
        };
        assert!(matches!(
            Sampler::new(cfg),
            Err(SamplerError::InvalidRate { .. })
        ));
    }

    /// Samples a busy thread of this very test process.
    #[test]
    fn samples_a_busy_thread() {
        let sampler = Sampler::new(SamplerConfig {
            rate_hz: 1000,
            ..Default::default()
        })
        .expect("sampler");
        let (tid, stop, busy) = busy_thread();
        sampler.add_thread(Pid::from_raw(tid)).expect("add_thread");
        sampler.add_thread(Pid::from_raw(tid)).expect("idempotent");
        let mut got = Vec::new();
        // Wait for work, not for time: stop as soon as enough samples arrived (bounded number of polls).
        for _ in 0..2000 {
            got.extend(sampler.take_samples());
            if got.len() >= 20 {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        let _ = busy.join();
        sampler.remove_thread(Pid::from_raw(tid));
        assert!(got.len() >= 20, "only {} samples", got.len());
        let me = std::process::id() as i32;
        for s in &got {
            assert_eq!(s.tid.as_raw(), tid);
            assert_eq!(s.pid.as_raw(), me);
            assert_ne!(s.ip.0, 0);
            assert_ne!(s.regs[4], 0, "rsp is sampled");
        }
        assert!(sampler.threads().is_empty());
    }

    /// A thread of this test process spinning until the returned flag is set.
    fn busy_thread() -> (i32, Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let h = std::thread::spawn(move || {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
            let _ = tx.send(tid);
            let mut x = 0u64;
            while !st.load(Ordering::Relaxed) {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            x
        });
        (rx.recv().expect("tid"), stop, h)
    }

    /// A one-page ring holds ~23 samples: collecting many more exercises the wrap-around path.
    #[test]
    fn ring_wraps_around_many_times() {
        let sampler = Sampler::new(SamplerConfig {
            rate_hz: 1000,
            ring_data_pages: 1,
            drain_interval: Duration::from_millis(2),
            ..Default::default()
        })
        .expect("sampler");
        let (tid, stop, h) = busy_thread();
        sampler.add_thread(Pid::from_raw(tid)).expect("add_thread");
        let mut got = Vec::new();
        for _ in 0..5000 {
            got.extend(sampler.take_samples());
            if got.len() >= 150 {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        stop.store(true, Ordering::Relaxed);
        let _ = h.join();
        assert!(got.len() >= 150, "only {} samples", got.len());
        // Every record parsed across the wrap is intact.
        for s in &got {
            assert_eq!(s.tid.as_raw(), tid);
            assert_ne!(s.regs[4], 0);
            assert_ne!(s.ip.0, 0);
        }
    }

    /// A ring nobody drains overflows; the kernel's PERF_RECORD_LOST is counted.
    #[test]
    fn overflow_is_counted_as_lost() {
        let sampler = Sampler::new(SamplerConfig {
            rate_hz: 1000,
            ring_data_pages: 1,
            drain_interval: Duration::from_secs(3600),
            ..Default::default()
        })
        .expect("sampler");
        let (tid, stop, h) = busy_thread();
        sampler.add_thread(Pid::from_raw(tid)).expect("add_thread");
        for i in 0..1000 {
            std::thread::sleep(Duration::from_millis(10));
            // Drain only now and then: the ring fills up in between and the kernel reports what it dropped.
            if i % 10 == 9 {
                let _ = sampler.take_samples();
                if sampler.lost() > 0 {
                    break;
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        let _ = h.join();
        assert!(sampler.lost() > 0, "no lost samples counted");
    }

    /// A real EACCES: an unprivileged thread may not sample a root-owned process.
    #[test]
    fn unprivileged_sampling_of_root_process_is_permission_denied() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return; // the scenario needs root to create the root-owned victim and drop privileges
        }
        struct Kill(std::process::Child);
        impl Drop for Kill {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let victim = Kill(
            std::process::Command::new("sleep")
                .arg("30")
                .spawn()
                .expect("spawn sleep"),
        );
        let pid = victim.0.id() as i32;
        let res = std::thread::spawn(move || {
            // SAFETY: the raw syscall (unlike glibc's setresuid) changes the credentials of this thread only,
            // which ends right after; no memory is involved.
            let rc = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
            assert_eq!(rc, 0, "setresuid");
            let sampler = Sampler::new(SamplerConfig {
                rate_hz: 100,
                ..Default::default()
            })
            .expect("sampler");
            sampler.add_thread(Pid::from_raw(pid))
        })
        .join()
        .expect("thread");
        // Dropping privileges made the whole process non-dumpable; undo that for the other tests.
        // SAFETY: prctl(PR_SET_DUMPABLE, 1) has no memory-safety preconditions.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
        let err = res.expect_err("must be refused");
        assert!(
            matches!(err, SamplerError::PermissionDenied { .. }),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("kernel.perf_event_paranoid") && msg.contains("CAP_PERFMON"),
            "{msg}"
        );
    }

    #[test]
    fn gone_thread_is_reported() {
        let sampler = Sampler::new(SamplerConfig::default()).expect("sampler");
        // PID_MAX_LIMIT is 2^22: this tid cannot exist.
        match sampler.add_thread(Pid::from_raw(4_194_304 + 7)) {
            Err(SamplerError::ThreadGone { .. }) | Err(SamplerError::Io { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}
