//! Public vocabulary of the specializer: addresses, registers, flags, the
//! memory oracle, requests and variants.

use std::fmt;

pub use addr::{Addr, PAGE_SIZE};

/// Why a read through [`Memory`] failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    #[error("address {0} is not readable")]
    Unreadable(Addr),
}

/// How the specializer sees the target: bytes, and which pages may be folded
/// as constants (read-only mappings, or pages the code cache will guard).
pub trait Memory {
    /// Fill `buf` with the bytes at `addr`, or fail if any byte is unreadable.
    fn read(&self, addr: Addr, buf: &mut [u8]) -> Result<(), MemoryError>;
    /// Whether the page starting at `page` may be read as a constant.
    fn is_constant(&self, page: Addr) -> bool;
}

/// The sixteen general-purpose registers, in x86 encoding order.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Gpr {
    Rax = 0,
    Rcx = 1,
    Rdx = 2,
    Rbx = 3,
    Rsp = 4,
    Rbp = 5,
    Rsi = 6,
    Rdi = 7,
    R8 = 8,
    R9 = 9,
    R10 = 10,
    R11 = 11,
    R12 = 12,
    R13 = 13,
    R14 = 14,
    R15 = 15,
}

impl Gpr {
    pub const ALL: [Gpr; 16] = [
        Gpr::Rax,
        Gpr::Rcx,
        Gpr::Rdx,
        Gpr::Rbx,
        Gpr::Rsp,
        Gpr::Rbp,
        Gpr::Rsi,
        Gpr::Rdi,
        Gpr::R8,
        Gpr::R9,
        Gpr::R10,
        Gpr::R11,
        Gpr::R12,
        Gpr::R13,
        Gpr::R14,
        Gpr::R15,
    ];

    pub fn index(self) -> usize {
        self as usize
    }

    /// Lower-case 64-bit name, e.g. `"rax"`, `"r12"`.
    pub fn name(self) -> &'static str {
        [
            "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11",
            "r12", "r13", "r14", "r15",
        ][self as usize]
    }

    /// Parse a 64-bit register name (case-insensitive).
    pub fn from_name(s: &str) -> Option<Gpr> {
        let s = s.to_ascii_lowercase();
        Gpr::ALL.iter().copied().find(|g| g.name() == s)
    }

    /// The iced 64-bit register.
    pub fn to_iced(self) -> iced_x86::Register {
        use iced_x86::Register as R;
        [
            R::RAX,
            R::RCX,
            R::RDX,
            R::RBX,
            R::RSP,
            R::RBP,
            R::RSI,
            R::RDI,
            R::R8,
            R::R9,
            R::R10,
            R::R11,
            R::R12,
            R::R13,
            R::R14,
            R::R15,
        ][self as usize]
    }

    /// The 64-bit GPR that contains an iced register of any width (`al`,
    /// `ah`, `ax`, `eax`, `rax` all map to `Rax`); `None` for non-GPRs.
    pub fn containing(reg: iced_x86::Register) -> Option<Gpr> {
        if !reg.is_gpr() {
            return None;
        }
        let full = reg.full_register();
        Gpr::ALL.iter().copied().find(|g| g.to_iced() == full)
    }
}

impl fmt::Display for Gpr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The status flags the specializer models (plus DF).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
pub enum Flag {
    Cf = 0,
    Pf = 1,
    Af = 2,
    Zf = 3,
    Sf = 4,
    Df = 5,
    Of = 6,
}

impl Flag {
    pub const ALL: [Flag; 7] = [
        Flag::Cf,
        Flag::Pf,
        Flag::Af,
        Flag::Zf,
        Flag::Sf,
        Flag::Df,
        Flag::Of,
    ];

    pub fn name(self) -> &'static str {
        ["cf", "pf", "af", "zf", "sf", "df", "of"][self as usize]
    }

    pub fn from_name(s: &str) -> Option<Flag> {
        let s = s.to_ascii_lowercase();
        Flag::ALL.iter().copied().find(|f| f.name() == s)
    }

    /// Bit position in RFLAGS.
    pub fn rflags_bit(self) -> u32 {
        [0, 2, 4, 6, 7, 10, 11][self as usize]
    }
}

/// What is known about registers and flags at one point: `None` is unknown.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct KnownState {
    pub regs: [Option<u64>; 16],
    pub flags: [Option<bool>; 7],
}

impl KnownState {
    pub fn reg(&self, r: Gpr) -> Option<u64> {
        self.regs[r.index()]
    }
    pub fn set_reg(&mut self, r: Gpr, v: Option<u64>) {
        self.regs[r.index()] = v;
    }
    pub fn flag(&self, f: Flag) -> Option<bool> {
        self.flags[f as usize]
    }
    pub fn set_flag(&mut self, f: Flag, v: Option<bool>) {
        self.flags[f as usize] = v;
    }
}

/// Limits that keep specialization bounded.
#[derive(Clone, Debug)]
pub struct Options {
    /// Stop emitting new code (and exit to the original) beyond this many bytes.
    pub max_code_bytes: usize,
    /// After this many distinct states at one original address, widen
    /// (forget known values) so the worklist terminates.
    pub max_states_per_address: u32,
    /// Where exits that return to the original code should jump for a given
    /// original address; `None` means the original address itself. The code
    /// cache uses this to chain into a dispatch stub.
    pub chain: Option<std::collections::BTreeMap<Addr, Addr>>,
    /// Let the variant keep copies of stored values in registers whose
    /// real content is dead at that point (known values it folded away and
    /// rewrites before any real use; the deopt map restores them), so later
    /// loads of those slots become register reads.
    pub scratch_registers: bool,
    /// Forward stored and loaded qwords: a later load of the same
    /// `[base + disp]` (same base register, unchanged) reads the register
    /// that holds the value instead of memory. Facts never survive a loop
    /// back-edge of the variant, so every iteration re-reads memory at least
    /// once; within one iteration the variant assumes no other thread or
    /// signal handler writes that memory between the store/load and the
    /// reuse (a `volatile` flag polled in a loop is still seen, once per
    /// iteration). Off by default: the planner turns it on where it knows
    /// the memory is private (e.g. an interpreter's register file).
    pub forward_stores: bool,
    /// Where `forward_stores` applies. `None`: every plain `[base + disp]`
    /// qword. `Some(ranges)`: only a slot whose address is known (its base
    /// register holds a known value) and lies inside one of `ranges`, or a
    /// slot relative to `rsp` (the thread's own stack). A planner passes the
    /// target's private writable mappings here, so memory another process
    /// may share (`MAP_SHARED`) is always re-read.
    pub forward_within: Option<Vec<(Addr, Addr)>>,
    /// The dispatch point the variant is entered from (its trigger address and register): when the walk
    /// reaches that address again with the register unknown, the variant exits there
    /// ([`ExitReason::Redispatch`]) instead of running on into code it cannot specialize, so the next pass
    /// goes through the dispatch stub (which counts it, and may enter the variant for the value it finds).
    pub redispatch_at: Option<(Addr, Gpr)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_code_bytes: 64 * 1024,
            max_states_per_address: 8,
            chain: None,
            scratch_registers: true,
            forward_stores: false,
            forward_within: None,
            redispatch_at: None,
        }
    }
}

/// One specialization job.
#[derive(Clone, Debug)]
pub struct Request {
    /// Original address where the variant is entered.
    pub entry: Addr,
    /// Original code the specializer may follow: `[start, end)`. Control
    /// leaving it is an exit.
    pub region_start: Addr,
    pub region_end: Addr,
    /// Registers and flags known at entry (a trigger is one known register).
    pub known: KnownState,
    pub options: Options,
}

/// Why a variant leaves to the original code at one of its exits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// Control reached an address outside the region (including falling off its end).
    LeftRegion,
    /// An indirect branch whose target is not known.
    UnknownTarget,
    /// The code-size budget was spent.
    Budget,
    /// An instruction the specializer will not re-emit (e.g. `syscall` boundaries).
    Unsupported,
    /// Back at the dispatch point with the trigger register unknown ([`Options::redispatch_at`]).
    Redispatch,
}

/// An exit of a variant: where it continues in the original code and the
/// values it materializes first (the folded registers and flags).
#[derive(Clone, Debug)]
pub struct Exit {
    pub target: Addr,
    pub reason: ExitReason,
    /// The abstract state at the exit; every known register/flag is
    /// materialized before jumping to `target`.
    pub state: KnownState,
}

/// One instruction boundary of the encoded variant and how to map a thread
/// stopped there back to the original code.
#[derive(Clone, Debug)]
pub struct DeoptEntry {
    /// Offset in the encoded variant.
    pub offset: u32,
    /// Original address the thread continues at.
    pub original: Addr,
    /// Register and flag values the variant folded away at this point; they
    /// must be written into the thread before it resumes at `original`.
    pub state: KnownState,
}

/// Counts that tell how much a variant folded.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Original instructions visited (with repetition across states).
    pub visited: usize,
    /// Instructions folded away completely.
    pub folded: usize,
    /// Of those: reads of memory (constant data, the trigger's bytecode) replaced by their values.
    pub folded_loads: usize,
    /// Of those: conditional and indirect branches whose outcome or target became known.
    pub folded_branches: usize,
    /// Instructions emitted (residual, rewritten or materialization).
    pub residual: usize,
    /// Size of the encoded code in bytes (at the last `encode`).
    pub code_bytes: usize,
}

/// Why specialization failed; a normal outcome.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecializeError {
    #[error("cannot read code at {0}")]
    Unreadable(Addr),
    #[error("undecodable instruction at {0}")]
    Undecodable(Addr),
    #[error("entry {0} is outside the region")]
    EntryOutsideRegion(Addr),
    #[error("encoding the variant failed: {0}")]
    Encode(String),
    #[error("nothing to gain: {0}")]
    NoGain(String),
}
