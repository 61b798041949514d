//! Shared test harness: run x86-64 code natively in-process with chosen registers and flags, and a `Memory` over this process.
//!
//! Layout of a [`Machine`] (one anonymous mapping):
//! `[ctx page RW][trampoline page RX][private stack RW]`. The prologue saves
//! the callee-saved registers, loads RFLAGS and all 16 GPRs (rsp = the
//! private stack) from the ctx page and jumps to the entry; code under test
//! ends by jumping to the epilogue (see [`Machine::exit_stub`]), which stores
//! all GPRs and RFLAGS back and returns to Rust.
#![allow(dead_code)]

use iced_x86::code_asm::*;
use iced_x86::{BlockEncoderOptions, Code, Instruction, MemoryOperand, Register};
use specializer::{Addr, Flag, Memory, MemoryError, PAGE_SIZE};
use std::cell::RefCell;

/// Mask of the RFLAGS bits the harness lets code see and compares: the six
/// status flags and DF.
pub const FLAGS_MASK: u64 = 0x0cd5;

/// Register file + flags handed to / taken from native code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Cpu {
    pub regs: [u64; 16],
    pub rflags: u64,
}

impl Cpu {
    pub fn flag(&self, f: Flag) -> bool {
        self.rflags >> f.rflags_bit() & 1 != 0
    }
    pub fn set_flag(&mut self, f: Flag, v: bool) {
        let bit = 1u64 << f.rflags_bit();
        if v {
            self.rflags |= bit;
        } else {
            self.rflags &= !bit;
        }
    }
}

/// An anonymous mapping, unmapped on drop.
pub struct Mapping {
    pub addr: u64,
    pub len: usize,
}

impl Mapping {
    /// Map `len` bytes read-write anywhere.
    pub fn anywhere(len: usize) -> Mapping {
        Self::map(0, len, 0).expect("anonymous mmap failed")
    }

    /// Map `len` bytes read-write at exactly `addr` (page aligned); `None` if
    /// something is already mapped there.
    pub fn fixed(addr: u64, len: usize) -> Option<Mapping> {
        Self::map(addr, len, libc::MAP_FIXED_NOREPLACE)
    }

    fn map(addr: u64, len: usize, extra: i32) -> Option<Mapping> {
        let len = len.div_ceil(PAGE_SIZE as usize) * PAGE_SIZE as usize;
        // SAFETY: anonymous private mapping; with MAP_FIXED_NOREPLACE the kernel refuses to
        // replace existing mappings, so no memory of this process is clobbered.
        let p = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | extra,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED || (addr != 0 && p as u64 != addr) {
            return None;
        }
        Some(Mapping {
            addr: p as u64,
            len,
        })
    }

    pub fn end(&self) -> u64 {
        self.addr + self.len as u64
    }

    /// Change protection of `[addr+off, addr+off+len)` (page granular).
    pub fn protect(&self, off: usize, len: usize, prot: i32) {
        let start = off / PAGE_SIZE as usize * PAGE_SIZE as usize;
        let end = (off + len).div_ceil(PAGE_SIZE as usize) * PAGE_SIZE as usize;
        assert!(end <= self.len);
        // SAFETY: the range lies inside this mapping, which we own.
        let r = unsafe {
            libc::mprotect(
                (self.addr + start as u64) as *mut libc::c_void,
                end - start,
                prot,
            )
        };
        assert_eq!(r, 0, "mprotect failed");
    }

    /// Write bytes into a page range that may currently be executable: make
    /// it writable, copy, make it read+exec again (W^X).
    pub fn write_code(&self, off: usize, bytes: &[u8]) {
        self.protect(off, bytes.len().max(1), libc::PROT_READ | libc::PROT_WRITE);
        self.write(off, bytes);
        self.protect(off, bytes.len().max(1), libc::PROT_READ | libc::PROT_EXEC);
    }

    /// Write bytes into a writable part of the mapping.
    pub fn write(&self, off: usize, bytes: &[u8]) {
        assert!(off + bytes.len() <= self.len);
        // SAFETY: in bounds of our own mapping, which is writable at this offset.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                (self.addr + off as u64) as *mut u8,
                bytes.len(),
            )
        }
    }

    /// Read bytes from a readable part of the mapping.
    pub fn read(&self, off: usize, len: usize) -> Vec<u8> {
        assert!(off + len <= self.len);
        let mut v = vec![0u8; len];
        // SAFETY: in bounds of our own mapping, which is readable.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (self.addr + off as u64) as *const u8,
                v.as_mut_ptr(),
                len,
            )
        }
        v
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: we own this mapping and nothing references it after drop.
        unsafe {
            libc::munmap(self.addr as *mut libc::c_void, self.len);
        }
    }
}

#[repr(C)]
struct Ctx {
    in_regs: [u64; 16],
    in_rflags: u64,
    out_regs: [u64; 16],
    out_rflags: u64,
    host_rsp: u64,
    entry: u64,
}

const CTX_OFF: usize = 0;
const TRAMP_OFF: usize = PAGE_SIZE as usize;
const STACK_OFF: usize = 2 * PAGE_SIZE as usize;
/// Size of the private stack.
pub const STACK_SIZE: usize = 16 * PAGE_SIZE as usize;
/// How much of the stack top is filled and compared.
const STACK_WINDOW: usize = 2 * PAGE_SIZE as usize;

/// Runs code natively with a given register file.
pub struct Machine {
    map: Mapping,
    epilogue: u64,
}

fn rip_mem(abs: u64) -> MemoryOperand {
    MemoryOperand::with_base_displ(Register::RIP, abs as i64)
}

impl Default for Machine {
    fn default() -> Self {
        Self::new()
    }
}

impl Machine {
    pub fn new() -> Machine {
        let map = Mapping::anywhere(STACK_OFF + STACK_SIZE);
        let ctx = map.addr + CTX_OFF as u64;
        let field = |i: usize| ctx + 8 * i as u64;
        let in_reg = |i: usize| field(i);
        let in_rflags = field(16);
        let out_reg = |i: usize| field(17 + i);
        let out_rflags = field(33);
        let host_rsp = field(34);
        let entry = field(35);
        let tramp = map.addr + TRAMP_OFF as u64;
        let gprs = specializer::Gpr::ALL;

        let mut a = CodeAssembler::new(64).unwrap();
        // Prologue.
        for r in [rbx, rbp, r12, r13, r14, r15] {
            a.push(r).unwrap();
        }
        let ins =
            |code, op0: MemoryOperand, reg: Register| Instruction::with2(code, op0, reg).unwrap();
        let load = |reg: Register, abs: u64| {
            Instruction::with2(Code::Mov_r64_rm64, reg, rip_mem(abs)).unwrap()
        };
        a.add_instruction(ins(Code::Mov_rm64_r64, rip_mem(host_rsp), Register::RSP))
            .unwrap();
        a.add_instruction(Instruction::with1(Code::Push_rm64, rip_mem(in_rflags)).unwrap())
            .unwrap();
        a.popfq().unwrap();
        for g in gprs.iter().rev() {
            // rax last; rsp switches to the private stack (no more host stack use after this).
            let i = g.index();
            a.add_instruction(load(g.to_iced(), in_reg(i))).unwrap();
        }
        a.add_instruction(Instruction::with1(Code::Jmp_rm64, rip_mem(entry)).unwrap())
            .unwrap();
        let mut epi = a.create_label();
        a.set_label(&mut epi).unwrap();
        a.nop().unwrap();
        // Epilogue: store everything without touching flags, then restore the host stack.
        for g in gprs {
            a.add_instruction(ins(
                Code::Mov_rm64_r64,
                rip_mem(out_reg(g.index())),
                g.to_iced(),
            ))
            .unwrap();
        }
        a.add_instruction(load(Register::RSP, host_rsp)).unwrap();
        a.pushfq().unwrap();
        a.add_instruction(Instruction::with1(Code::Pop_rm64, rip_mem(out_rflags)).unwrap())
            .unwrap();
        a.cld().unwrap(); // the ABI requires DF=0 on return
        for r in [r15, r14, r13, r12, rbp, rbx] {
            a.pop(r).unwrap();
        }
        a.ret().unwrap();
        let res = a
            .assemble_options(tramp, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)
            .unwrap();
        let epilogue = res.label_ip(&epi).unwrap();
        let bytes = res.inner.code_buffer;
        assert!(bytes.len() < PAGE_SIZE as usize);
        map.write_code(TRAMP_OFF, &bytes);
        Machine { map, epilogue }
    }

    /// Address of the epilogue (code under test ends by jumping here).
    pub fn epilogue(&self) -> u64 {
        self.epilogue
    }

    /// Top of the private stack (16-byte aligned, with 256 bytes of red zone above).
    pub fn stack_top(&self) -> u64 {
        self.map.addr + (STACK_OFF + STACK_SIZE) as u64 - 256
    }

    /// The top of the private stack (the part code under test uses: pushes,
    /// small frames) for comparing what it wrote.
    pub fn stack_bytes(&self) -> Vec<u8> {
        self.map
            .read(STACK_OFF + STACK_SIZE - STACK_WINDOW, STACK_WINDOW)
    }

    /// Fill the top of the private stack (see [`Machine::stack_bytes`]) with a pattern.
    pub fn fill_stack(&self, byte: u8) {
        self.map
            .write(STACK_OFF + STACK_SIZE - STACK_WINDOW, &[byte; STACK_WINDOW]);
    }

    /// Prepare a call frame on the private stack whose return address is the
    /// epilogue, so a function entered with this rsp returns into the harness.
    /// Returns the rsp to pass.
    pub fn call_frame(&self) -> u64 {
        let frame = self.stack_top() - 8;
        let off = (frame - self.map.addr) as usize;
        self.map.write(off, &self.epilogue.to_le_bytes());
        frame
    }

    /// A 14-byte position-independent `jmp [rip+0]; dq epilogue`: append it
    /// after code under test so falling off the end returns to the harness
    /// without touching registers or flags.
    pub fn exit_stub(&self) -> Vec<u8> {
        let mut v = vec![0xff, 0x25, 0, 0, 0, 0];
        v.extend_from_slice(&self.epilogue.to_le_bytes());
        v
    }

    /// Run from `entry` with `input` (its rflags are masked to [`FLAGS_MASK`];
    /// rsp is taken from `input` — use [`Machine::stack_top`]).
    ///
    /// # Safety
    /// `entry` must be code that eventually jumps to [`Machine::epilogue`]
    /// with the stack pointer anywhere, and only touches memory it may.
    pub unsafe fn run(&self, entry: u64, input: &Cpu) -> Cpu {
        let ctx = self.map.addr as *mut Ctx;
        // SAFETY: the ctx page is ours and writable; no other reference to it exists.
        unsafe {
            (*ctx).in_regs = input.regs;
            (*ctx).in_rflags = (input.rflags & FLAGS_MASK) | 2;
            (*ctx).entry = entry;
        }
        let f: extern "sysv64" fn() =
            // SAFETY: the trampoline follows the SysV ABI (callee-saved registers and DF
            // restored); the caller guarantees the code under test returns to the epilogue.
            unsafe { std::mem::transmute::<u64, extern "sysv64" fn()>(self.map.addr + TRAMP_OFF as u64) };
        CRASH.with(|c| c.borrow_mut().active = true);
        f();
        CRASH.with(|c| c.borrow_mut().active = false);
        // SAFETY: as above; the native code wrote the outputs.
        unsafe {
            Cpu {
                regs: (*ctx).out_regs,
                rflags: (*ctx).out_rflags & FLAGS_MASK,
            }
        }
    }

    /// Run like [`Machine::run`] but single-step (trap flag) and stop just
    /// before the `stop_at`-th (1-based) instruction executed inside
    /// `[range.0, range.1)`: the registers there are returned with the address
    /// it stopped at. `None` for the address when the code left normally first.
    /// Code in `also` (the original the variant exits to) is stepped through too.
    ///
    /// # Safety
    /// As for [`Machine::run`].
    pub unsafe fn run_stepped(
        &self,
        entry: u64,
        input: &Cpu,
        range: (u64, u64),
        also: (u64, u64),
        stop_at: u64,
    ) -> (Cpu, Option<u64>) {
        install_step_handler();
        let tramp = (
            self.map.addr + TRAMP_OFF as u64,
            self.map.addr + STACK_OFF as u64,
        );
        STEP.with(|st| {
            st.set(StepState {
                active: true,
                range,
                tramp,
                also,
                count: 0,
                count_also: 0,
                stop_at,
                stopped_at: 0,
                epilogue: self.epilogue,
            })
        });
        let ctx = self.map.addr as *mut Ctx;
        // SAFETY: the ctx page is ours and writable; no other reference to it exists.
        unsafe {
            (*ctx).in_regs = input.regs;
            // TF: trap after every instruction once popfq has loaded it.
            (*ctx).in_rflags = (input.rflags & FLAGS_MASK) | 2 | TRAP_FLAG;
            (*ctx).entry = entry;
        }
        let f: extern "sysv64" fn() =
            // SAFETY: as in `run`; the step handler clears TF before control returns to Rust.
            unsafe { std::mem::transmute::<u64, extern "sysv64" fn()>(self.map.addr + TRAMP_OFF as u64) };
        f();
        let st = STEP.with(|st| {
            let mut v = st.get();
            v.active = false;
            st.set(v);
            v
        });
        // SAFETY: as above; the native code wrote the outputs.
        let out = unsafe {
            Cpu {
                regs: (*ctx).out_regs,
                rflags: (*ctx).out_rflags & FLAGS_MASK,
            }
        };
        STEP_COUNTS.with(|c| c.set((st.count, st.count_also)));
        (out, (st.stopped_at != 0).then_some(st.stopped_at))
    }

    /// Run to completion single-stepping, and count the instructions
    /// executed inside `range` and inside `also` (a deterministic measure of
    /// work, for tests that must not time things).
    ///
    /// # Safety
    /// As for [`Machine::run`].
    pub unsafe fn count_instructions(
        &self,
        entry: u64,
        input: &Cpu,
        range: (u64, u64),
        also: (u64, u64),
    ) -> (Cpu, u64, u64) {
        // SAFETY: forwarded to the caller.
        let (out, _) = unsafe { self.run_stepped(entry, input, range, also, u64::MAX) };
        let (a, b) = STEP_COUNTS.with(|c| c.get());
        (out, a, b)
    }
}

const TRAP_FLAG: u64 = 0x100;

#[derive(Clone, Copy, Default)]
struct StepState {
    active: bool,
    range: (u64, u64),
    tramp: (u64, u64),
    also: (u64, u64),
    count: u64,
    count_also: u64,
    stop_at: u64,
    stopped_at: u64,
    epilogue: u64,
}

thread_local! {
    static STEP_COUNTS: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
    static STEP: std::cell::Cell<StepState> = const {
        std::cell::Cell::new(StepState {
            active: false,
            range: (0, 0),
            tramp: (0, 0),
            also: (0, 0),
            count: 0,
            count_also: 0,
            stop_at: 0,
            stopped_at: 0,
            epilogue: 0,
        })
    };
}

extern "C" fn step_handler(_sig: i32, _info: *mut libc::siginfo_t, uctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext_t for SA_SIGINFO handlers.
    let uc = unsafe { &mut *(uctx as *mut libc::ucontext_t) };
    let rip = uc.uc_mcontext.gregs[libc::REG_RIP as usize] as u64;
    let gregs = &mut uc.uc_mcontext.gregs;
    let tf_off = |g: &mut [i64; 23]| g[libc::REG_EFL as usize] &= !(TRAP_FLAG as i64);
    let mut st = STEP.with(|s| s.get());
    if !st.active {
        tf_off(gregs);
        return;
    }
    if in_range(rip, st.range) {
        st.count += 1;
        if st.count == st.stop_at && st.stopped_at == 0 {
            // Stop here: registers unchanged, continue at the epilogue which stores them.
            st.stopped_at = rip;
            gregs[libc::REG_RIP as usize] = st.epilogue as i64;
            tf_off(gregs);
            st.active = false;
        }
    } else if in_range(rip, st.also) {
        st.count_also += 1;
    } else if !in_range(rip, st.tramp) {
        // Back in Rust (after the epilogue's ret): stop tracing.
        tf_off(gregs);
    }
    STEP.with(|s| s.set(st));
}

fn in_range(a: u64, r: (u64, u64)) -> bool {
    a >= r.0 && a < r.1
}

fn install_step_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: installing a SIGTRAP handler that only edits the interrupted context.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = step_handler as *const () as usize;
            // On the alternate stack: the code under test owns the stack below its rsp.
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigaction(libc::SIGTRAP, &sa, std::ptr::null_mut());
        }
    });
}

/// What to print when native code under test crashes (set before running).
#[derive(Default)]
pub struct CrashInfo {
    active: bool,
    pub describe: Option<Box<dyn Fn() -> String>>,
}

thread_local! {
    pub static CRASH: RefCell<CrashInfo> = RefCell::new(CrashInfo::default());
}

/// Set the description printed if native code crashes (SIGSEGV/SIGILL/SIGBUS/SIGFPE).
pub fn on_crash(f: impl Fn() -> String + 'static) {
    install_crash_handler();
    // Native code may leave rsp anywhere: the handler needs its own stack (per thread).
    thread_local! {
        static ALT: Mapping = {
            let m = Mapping::anywhere(256 * 1024);
            let st = libc::stack_t { ss_sp: m.addr as *mut libc::c_void, ss_flags: 0, ss_size: m.len };
            // SAFETY: the mapping lives as long as the thread (thread-local) and is writable.
            unsafe { libc::sigaltstack(&st, std::ptr::null_mut()) };
            m
        };
    }
    ALT.with(|_| {});
    CRASH.with(|c| c.borrow_mut().describe = Some(Box::new(f)));
}

extern "C" fn crash_handler(sig: i32) {
    // The process is going down; printing is best effort (not async-signal-safe, acceptable in tests).
    let msg = CRASH
        .try_with(|c| {
            c.try_borrow()
                .ok()
                .and_then(|c| c.describe.as_ref().map(|d| d()))
        })
        .ok()
        .flatten()
        .unwrap_or_else(|| "(no description)".to_string());
    // Raw write: the test harness captures eprintln! output, which _exit would lose.
    let text = format!("\nnative code crashed with signal {sig} while running:\n{msg}\n");
    // SAFETY: writing a valid buffer to fd 2.
    unsafe {
        libc::write(2, text.as_ptr() as *const libc::c_void, text.len());
    }
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(101) }
}

fn install_crash_handler() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for sig in [libc::SIGSEGV, libc::SIGILL, libc::SIGBUS, libc::SIGFPE] {
            // SAFETY: installing a handler for fatal signals; the handler never returns.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = crash_handler as *const () as usize;
                sa.sa_flags = libc::SA_ONSTACK;
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    });
}

/// Executable buffer for variants or snippets, anywhere or at a fixed address.
pub struct ExecBuf {
    pub map: Mapping,
}

impl ExecBuf {
    pub fn anywhere(len: usize) -> ExecBuf {
        let map = Mapping::anywhere(len);
        map.protect(0, map.len, libc::PROT_READ | libc::PROT_EXEC);
        ExecBuf { map }
    }
    pub fn fixed(addr: u64, len: usize) -> Option<ExecBuf> {
        let map = Mapping::fixed(addr, len)?;
        map.protect(0, map.len, libc::PROT_READ | libc::PROT_EXEC);
        Some(ExecBuf { map })
    }
    pub fn addr(&self) -> u64 {
        self.map.addr
    }
    /// Write code at an offset (W^X toggle).
    pub fn write(&self, off: usize, code: &[u8]) {
        self.map.write_code(off, code);
    }
}

/// One mapping of this process from /proc/self/maps.
#[derive(Clone, Debug)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub path: String,
}

/// Parse /proc/self/maps.
pub fn self_maps() -> Vec<MapEntry> {
    let text = std::fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    text.lines()
        .filter_map(|l| {
            let mut it = l.split_whitespace();
            let range = it.next()?;
            let perms = it.next()?;
            let path = it.nth(3).unwrap_or("").to_string();
            let (s, e) = range.split_once('-')?;
            Some(MapEntry {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                read: perms.starts_with('r'),
                write: perms.as_bytes().get(1) == Some(&b'w'),
                exec: perms.as_bytes().get(2) == Some(&b'x'),
                path,
            })
        })
        .collect()
}

/// A `Memory` reading this process's own memory: readable ranges come from
/// /proc/self/maps (snapshot at construction) plus whatever the test adds;
/// constant ranges are declared by the test.
pub struct SelfMemory {
    readable: Vec<(u64, u64)>,
    constant: Vec<(u64, u64)>,
}

impl SelfMemory {
    /// Snapshot of the readable mappings now.
    pub fn new() -> SelfMemory {
        let readable = self_maps()
            .iter()
            .filter(|m| m.read && m.path != "[vvar]" && m.path != "[vsyscall]")
            .map(|m| (m.start, m.end))
            .collect();
        SelfMemory {
            readable,
            constant: Vec::new(),
        }
    }

    /// Declare `[start, end)` constant (whole pages it touches).
    pub fn add_constant(&mut self, start: u64, end: u64) {
        let s = start & !(PAGE_SIZE - 1);
        let e = end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        self.constant.push((s, e));
    }

    /// Declare every read-only mapping whose path ends with `suffix` constant.
    pub fn add_constant_file_mappings(&mut self, suffix: &str) -> usize {
        let mut n = 0;
        for m in self_maps() {
            if m.read && !m.write && m.path.ends_with(suffix) {
                self.constant.push((m.start, m.end));
                n += 1;
            }
        }
        n
    }

    pub fn add_readable(&mut self, start: u64, end: u64) {
        self.readable.push((start, end));
    }

    fn readable(&self, a: u64, len: usize) -> bool {
        let Some(end) = a.checked_add(len as u64) else {
            return false;
        };
        // Every byte must be inside some readable range (ranges may be adjacent).
        let mut p = a;
        while p < end {
            match self.readable.iter().find(|r| r.0 <= p && p < r.1) {
                Some(r) => p = r.1,
                None => return false,
            }
        }
        true
    }
}

impl Default for SelfMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl Memory for SelfMemory {
    fn read(&self, addr: Addr, buf: &mut [u8]) -> Result<(), MemoryError> {
        if !self.readable(addr.0, buf.len()) {
            return Err(MemoryError::Unreadable(addr));
        }
        // SAFETY: every byte lies in a readable mapping of this process (snapshot; tests do not
        // unmap these ranges while specializing).
        unsafe {
            std::ptr::copy_nonoverlapping(addr.0 as *const u8, buf.as_mut_ptr(), buf.len());
        }
        Ok(())
    }

    fn is_constant(&self, page: Addr) -> bool {
        let p = page.page().0;
        self.constant.iter().any(|c| c.0 <= p && p < c.1)
    }
}

/// Disassemble bytes at `ip` as Intel-syntax lines (`addr: bytes  asm`).
pub fn disasm(bytes: &[u8], ip: u64) -> Vec<String> {
    use iced_x86::{Decoder, DecoderOptions, Formatter, IntelFormatter};
    let mut d = Decoder::with_ip(64, bytes, ip, DecoderOptions::NONE);
    let mut f = IntelFormatter::new();
    f.options_mut().set_hex_prefix("0x");
    f.options_mut().set_hex_suffix("");
    f.options_mut().set_uppercase_hex(false);
    f.options_mut().set_space_after_operand_separator(true);
    let mut out = Vec::new();
    let mut s = String::new();
    while d.can_decode() {
        let start = (d.ip() - ip) as usize;
        let i = d.decode();
        s.clear();
        f.format(&i, &mut s);
        let hex: Vec<String> = bytes[start..start + i.len()]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        out.push(format!("{:#x}: {:<30} {}", i.ip(), hex.join(" "), s));
    }
    out
}

/// Bytes as space-separated hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Offsets of the instructions reachable from offset 0 of `code` (encoded at
/// `base`), following fall-through and direct branches inside the code; data
/// the encoder placed after unconditional jumps is not decoded.
pub fn reachable_boundaries(code: &[u8], base: u64) -> Vec<u64> {
    use iced_x86::{Decoder, DecoderOptions, FlowControl};
    let mut seen = std::collections::BTreeSet::new();
    let mut work = vec![0u64];
    while let Some(off) = work.pop() {
        let mut off = off;
        loop {
            if off as usize >= code.len() || !seen.insert(off) {
                break;
            }
            let mut d =
                Decoder::with_ip(64, &code[off as usize..], base + off, DecoderOptions::NONE);
            let i = d.decode();
            if i.is_invalid() {
                break;
            }
            let next = off + i.len() as u64;
            let target = |t: u64| (t >= base && t < base + code.len() as u64).then(|| t - base);
            match i.flow_control() {
                FlowControl::Next | FlowControl::Call | FlowControl::IndirectCall => off = next,
                FlowControl::ConditionalBranch => {
                    if let Some(t) = target(i.near_branch_target()) {
                        work.push(t);
                    }
                    off = next;
                }
                FlowControl::UnconditionalBranch => {
                    if let Some(t) = target(i.near_branch_target()) {
                        work.push(t);
                    }
                    break;
                }
                _ => break,
            }
        }
    }
    seen.into_iter().collect()
}

pub mod native_lib;
pub mod rng;
