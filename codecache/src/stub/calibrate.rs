//! What a switched-off stub costs per pass on this CPU, measured in dynspec's own process.
//!
//! The A/B measurement of a variant compares its stub switched on with the same stub switched off; the off mode
//! still pays the jump into the stub, the enabled check and the fall-back path, which the program without dynspec
//! does not. To judge a variant against the program as it runs natively, that cost is subtracted: it is measured
//! here by running a real stub (built by [`build_stub`], switched off) in a loop beside the same loop unpatched.

use std::time::Instant;

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Instruction, InstructionBlock, MemoryOperand, Register,
};
use specializer::Addr;

use super::{build_stub, jmp_rel32, plan_patch, StubTarget};

const PAGE: usize = 4096;
/// Offsets in the code page: the unpatched loop, the patched loop, the stub.
const PLAIN: usize = 0;
const PATCHED: usize = 64;
const STUB: usize = 256;
/// Loop iterations per timing, and timings per loop (the fastest counts: interruptions only add).
const ITERATIONS: u64 = 2_000_000;
const REPEATS: usize = 5;

/// Two pages: code (r-x once written) and the stub's counters and enabled word (rw-).
struct Scratch {
    ptr: *mut u8,
}

impl Scratch {
    fn new() -> Option<Scratch> {
        // SAFETY: an anonymous private mapping of our own; checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                2 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then(|| Scratch { ptr: p as *mut u8 })
    }

    fn addr(&self, off: usize) -> u64 {
        self.ptr as u64 + off as u64
    }

    fn write(&self, off: usize, bytes: &[u8]) -> Option<()> {
        if off + bytes.len() > 2 * PAGE {
            return None;
        }
        // SAFETY: in bounds of our mapping (checked above), which is writable until `seal`.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(off), bytes.len()) };
        Some(())
    }

    /// W^X: the code page becomes r-x before anything runs in it.
    fn seal(&self) -> Option<()> {
        // SAFETY: the first page of our own mapping.
        let r = unsafe {
            libc::mprotect(
                self.ptr as *mut libc::c_void,
                PAGE,
                libc::PROT_READ | libc::PROT_EXEC,
            )
        };
        (r == 0).then_some(())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping, nothing runs in it any more.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, 2 * PAGE) };
    }
}

/// `L: lea r11,[r10+1]; mov r9,r8; dec rdi; jnz L; ret` at `ip`: the first two instructions (7 bytes) are what
/// the patch displaces; only caller-saved registers are touched, so it is an `extern "C" fn(u64)`.
fn loop_code(ip: u64) -> Option<Vec<u8>> {
    let site = ip;
    let ins = [
        Instruction::with2(
            Code::Lea_r64_m,
            Register::R11,
            MemoryOperand::with_base_displ(Register::R10, 1),
        )
        .ok()?,
        Instruction::with2(Code::Mov_r64_rm64, Register::R9, Register::R8).ok()?,
        Instruction::with1(Code::Dec_rm64, Register::RDI).ok()?,
        Instruction::with_branch(Code::Jne_rel8_64, site).ok()?,
        Instruction::with(Code::Retnq),
    ];
    BlockEncoder::encode(
        64,
        InstructionBlock::new(&ins, ip),
        BlockEncoderOptions::NONE,
    )
    .ok()
    .map(|r| r.code_buffer)
}

/// Fastest of [`REPEATS`] timings of `f(ITERATIONS)`, in ns per iteration.
fn time(f: extern "C" fn(u64)) -> f64 {
    (0..REPEATS)
        .map(|_| {
            let t = Instant::now();
            f(ITERATIONS);
            t.elapsed().as_nanos() as f64 / ITERATIONS as f64
        })
        .fold(f64::INFINITY, f64::min)
}

/// Nanoseconds one pass through a switched-off stub adds to the code it patches (at least 0); None when the
/// measurement cannot be made (no executable memory, e.g. under a policy that forbids it).
pub fn disabled_stub_ns() -> Option<f64> {
    let s = Scratch::new()?;
    let plain = loop_code(s.addr(PLAIN))?;
    let patched = loop_code(s.addr(PATCHED))?;
    s.write(PLAIN, &plain)?;
    s.write(PATCHED, &patched)?;
    let site = Addr(s.addr(PATCHED));
    let patch = plan_patch(&patched, site, site, &|_, _| false).ok()?;
    let (fallback, counter, enabled) = (s.addr(PAGE), s.addr(PAGE + 8), s.addr(PAGE + 16));
    // The enabled word stays 0 (the mapping is zero-filled): the target below is never entered.
    let target = StubTarget {
        value: None,
        entry: Addr(s.addr(PLAIN)),
        counter: Addr(counter),
    };
    let stub = build_stub(
        Addr(s.addr(STUB)),
        &patch,
        None,
        &[],
        &[target],
        Addr(fallback),
        Addr(enabled),
    )
    .ok()?;
    s.write(STUB, &stub.code)?;
    s.write(PATCHED, &jmp_rel32(site.0, stub.entry.0)?)?;
    s.seal()?;
    // SAFETY: both addresses hold the complete functions written above (the code page is now r-x); they
    // touch only rdi, r8-r11 and the flags (caller-saved), and the stub its own red-zone-skipped stack and the
    // counters page, which stays mapped rw- until `s` drops after the calls.
    let (f_plain, f_patched): (extern "C" fn(u64), extern "C" fn(u64)) = unsafe {
        (
            std::mem::transmute::<u64, extern "C" fn(u64)>(s.addr(PLAIN)),
            std::mem::transmute::<u64, extern "C" fn(u64)>(s.addr(PATCHED)),
        )
    };
    // Alternated, so that a slower stretch of the machine hits both.
    let (mut best_plain, mut best_patched) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..2 {
        best_plain = best_plain.min(time(f_plain));
        best_patched = best_patched.min(time(f_patched));
    }
    Some((best_patched - best_plain).max(0.0))
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_switched_off_stub_costs_something_and_not_much() {
        let ns = super::disabled_stub_ns().expect("measured");
        // A jump there and back and a dozen instructions: more than nothing, far less than a system call.
        eprintln!("switched-off stub: {ns:.2} ns per pass");
        assert!(ns > 0.05 && ns < 200.0, "{ns} ns");
    }
}
