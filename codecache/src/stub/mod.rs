//! Dispatch stubs: the code that compares the trigger register without disturbing anything (ARCHITECTURE.md invariant 5), and
//! (in the `patch` submodule, re-exported here) the patch sites whose original instructions a 5-byte `jmp`
//! displaces (ARCHITECTURE.md invariant 6).

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Instruction, InstructionBlock, MemoryOperand, Register,
};
use specializer::{Addr, Gpr};

use crate::error::BadRequestReason;
use crate::CacheError;

/// Bytes of the red zone the stub steps over before pushing anything.
const RED_ZONE: i64 = 128;
/// Non-canonical addresses used as labels inside a stub (never a real branch target).
const LABEL_BASE: u64 = 0xdead_5000_0000_0000;

pub mod calibrate;
mod patch;
pub use patch::{jmp_rel32, plan_patch, PatchSite, PATCH_LEN};

/// How to move a thread stopped *before* a given stub instruction back to equivalent original state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rollback {
    /// Back to the trigger: restore the saved registers and flags from the stack (offsets from the current
    /// rsp), add `rsp_adj` to rsp, RIP := trigger. Re-dispatching is equivalent to what was under way (at most
    /// a counter is incremented twice).
    ToTrigger {
        rsp_adj: u64,
        rax_at: Option<u64>,
        rcx_at: Option<u64>,
        /// A full RFLAGS image (pushfq).
        flags_at: Option<u64>,
        /// Flags saved by `lahf; seto al`: AH = SF ZF AF PF CF, AL = OF.
        lahf_at: Option<u64>,
    },
    /// In the fall-back path (original code relocated): continue at this original address.
    At(Addr),
}

/// One dispatch target of a stub.
#[derive(Debug, Clone, Copy)]
pub struct StubTarget {
    /// Trigger value (None: unconditional entry).
    pub value: Option<u64>,
    pub entry: Addr,
    pub counter: Addr,
}

/// An encoded dispatch stub.
#[derive(Debug, Clone)]
pub struct Stub {
    pub base: Addr,
    /// Where the patch jumps (after the `jmp fallback` trampoline at `base`).
    pub entry: Addr,
    /// The u64 the stub checks first: zero sends every entry to the fall-back path.
    pub enabled: Addr,
    pub code: Vec<u8>,
    /// (offset, rollback) per instruction, sorted by offset.
    pub rollback: Vec<(u32, Rollback)>,
    /// Original address -> address of its relocated copy in the fall-back path.
    pub relocated: Vec<(Addr, Addr)>,
}

impl Stub {
    /// Whether `a` lies in this stub.
    pub fn contains(&self, a: u64) -> bool {
        a >= self.base.0 && a < self.base.0 + self.code.len() as u64
    }

    /// The rollback for a thread stopped at `rip` (an instruction boundary of this stub).
    pub fn rollback_at(&self, rip: u64) -> Option<Rollback> {
        let off = rip.checked_sub(self.base.0)? as u32;
        self.rollback
            .iter()
            .find(|(o, _)| *o == off)
            .map(|(_, r)| *r)
    }

    /// The relocated copy of original instruction `a` (a displaced instruction), if any.
    pub fn relocated_of(&self, a: Addr) -> Option<Addr> {
        self.relocated
            .iter()
            .find(|(o, _)| *o == a)
            .map(|(_, r)| *r)
    }
}

/// Up to this many values the stub is a flag-free compare chain; beyond, a binary search that saves flags.
pub const CHAIN_MAX: usize = 8;

/// Emits instructions with their rollback state; labels are non-canonical IPs resolved by the block encoder.
struct Builder {
    items: Vec<(Instruction, Rollback)>,
    next_label: u64,
    pending: Option<u64>,
}

impl Builder {
    fn label(&mut self) -> u64 {
        self.next_label += 1;
        LABEL_BASE + self.next_label
    }
    /// Attach `label` to the next instruction emitted.
    fn bind(&mut self, label: u64) {
        debug_assert!(self.pending.is_none(), "two labels on one instruction");
        self.pending = Some(label);
    }
    fn emit(
        &mut self,
        r: Result<Instruction, iced_x86::IcedError>,
        rb: Rollback,
    ) -> Result<(), CacheError> {
        let mut ins = r.map_err(CacheError::Encode)?;
        if let Some(l) = self.pending.take() {
            ins.set_ip(l);
        }
        self.items.push((ins, rb));
        Ok(())
    }
}

fn tt(rsp_adj: i64, rax_at: Option<u64>, rcx_at: Option<u64>, flags_at: Option<u64>) -> Rollback {
    Rollback::ToTrigger {
        rsp_adj: rsp_adj as u64,
        rax_at,
        rcx_at,
        flags_at,
        lahf_at: None,
    }
}

fn ttl(rsp_adj: i64, rax_at: Option<u64>, rcx_at: Option<u64>, lahf_at: Option<u64>) -> Rollback {
    Rollback::ToTrigger {
        rsp_adj: rsp_adj as u64,
        rax_at,
        rcx_at,
        flags_at: None,
        lahf_at,
    }
}

/// Apply flags saved by `lahf; seto al` (the low 16 bits of `ax`) to an RFLAGS value.
pub fn apply_lahf(eflags: u64, ax: u64) -> u64 {
    let ah = (ax >> 8) & 0xd5;
    let of = if ax & 1 != 0 { 0x800 } else { 0 };
    (eflags & !(0xd5 | 0x800)) | ah | of
}

/// Whether this CPU (the target runs on it too) has LAHF/SAHF in 64-bit mode.
fn has_lahf() -> bool {
    // Leaf 0x8000_0001 exists when the maximum extended leaf says so.
    let max = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    max >= 0x8000_0001 && std::arch::x86_64::__cpuid(0x8000_0001).ecx & 1 != 0
}

/// Chain form: load the program's value of `g` into rcx (after the chain prologue `push rcx; push rax`).
fn chain_load(g: Gpr) -> Result<Instruction, iced_x86::IcedError> {
    match g {
        // rax was overwritten, rcx is the scratch: read the program's value from the stack.
        Gpr::Rax => Instruction::with2(
            Code::Mov_r64_rm64,
            Register::RCX,
            MemoryOperand::with_base_displ(Register::RSP, 0),
        ),
        Gpr::Rcx => Instruction::with2(
            Code::Mov_r64_rm64,
            Register::RCX,
            MemoryOperand::with_base_displ(Register::RSP, 8),
        ),
        g => Instruction::with2(Code::Mov_r64_rm64, Register::RCX, g.to_iced()),
    }
}

fn rip_mem(a: Addr) -> MemoryOperand {
    MemoryOperand::with_base_displ(Register::RIP, a.0 as i64)
}

/// Build the dispatch stub at `base`.
///
/// Nothing below `rsp-128` is touched before the red zone is skipped, and every register and flag is restored
/// before leaving (ARCHITECTURE.md invariant 5). Counters are incremented without `lock` (a lost increment under contention
/// only makes a report count approximate, a locked one would serialize every entry).
///
/// Every stub starts with `off: jmp fallback` (a trampoline; the patch jumps to `entry` right after it) and,
/// after saving its scratch registers, checks its enabled word: `mov rcx,[enabled]; jrcxz off`. The guard
/// reader thread zeroes that word the moment a page the variants rely on may change, so no thread enters a
/// stale variant while the tracer thread is still on its way.
///
/// Up to [`CHAIN_MAX`] values, a flag-free chain (R = trigger register):
/// ```text
/// entry: lea rsp,[rsp-128]; push rcx; push rax; mov rcx,[enabled]; jrcxz off
///   per value v: mov rax,-v; mov rcx,R; lea rcx,[rcx+rax]; jrcxz hit_v; jmp next
/// fallback:  mov rax,[fc]; lea rax,[rax+1]; mov [fc],rax; pop rax; pop rcx; lea rsp,[rsp+128];
///            <displaced>; jmp site+len
/// hit_v:     mov rax,[c_v]; lea rax,[rax+1]; mov [c_v],rax; pop rax; pop rcx; lea rsp,[rsp+128]; jmp entry_v
/// ```
/// (R = rax or rcx is read back from its stack slot.) More values (when the CPU has LAHF in 64-bit mode): a
/// binary search with `cmp`/`je`/`ja`/`jb` after saving the flags cheaply (`push rax; lahf; seto al; push rax;
/// push rcx`), restored on the way out with `add al,0x7f; sahf` (OF, then the rest) — much cheaper than
/// `pushfq`/`popfq`. With no register the single
/// target is entered unconditionally (unless disabled).
///
/// `assumed` registers (values every variant was specialized for, besides the trigger value) are checked once,
/// right after the enabled word and before any trigger compare; a mismatch goes to the fall-back path. Chain
/// form, flag-free: `mov rax,-v; mov rcx,A; lea rcx,[rcx+rax]; jrcxz ok; jmp fallback; ok:`. Binary-search
/// form (flags already saved): `mov rcx,v; cmp A,rcx; jne fallback`.
///
/// In emission order (methods of the private `StubGen`): trampoline, `prologue`, `enabled_check`,
/// `assumed_checks`, the dispatch (`enter` / `compare_chain` / `binary_search`), `fallback_path`, the binary
/// search's hit paths, then `encode`.
pub fn build_stub(
    base: Addr,
    patch: &PatchSite,
    reg: Option<Gpr>,
    assumed: &[(Gpr, u64)],
    targets: &[StubTarget],
    fallback_counter: Addr,
    enabled: Addr,
) -> Result<Stub, CacheError> {
    check_stub_request(reg, assumed, targets)?;
    let mut g = StubGen::new(targets.len());
    // Trampoline for the rel8 `jrcxz` of the enabled check (a thread is "inside" when it gets here).
    let off_label = g.b.label();
    g.b.bind(off_label);
    g.b.emit(
        Instruction::with_branch(Code::Jmp_rel32_64, g.fallback),
        g.inside,
    )?;
    let entry_index = g.b.items.len();
    g.prologue()?;
    g.enabled_check(enabled, off_label)?;
    g.assumed_checks(assumed)?;
    match reg {
        None => {
            if let Some(t) = targets.first() {
                g.enter(t, None)?
            }
        }
        Some(r) if !g.tree => g.compare_chain(r, targets)?,
        Some(r) => g.binary_search(r, targets)?,
    }
    let first_displaced = g.fallback_path(patch, fallback_counter)?;
    if g.tree {
        for (i, t) in targets.iter().enumerate() {
            g.enter(t, Some(g.hits[i]))?;
        }
    }
    g.encode(base, patch, entry_index, first_displaced, enabled)
}

/// Refuse what the stub cannot express: rsp as a compared register, a register checked twice, values that do
/// not match the presence of a trigger register.
fn check_stub_request(
    reg: Option<Gpr>,
    assumed: &[(Gpr, u64)],
    targets: &[StubTarget],
) -> Result<(), CacheError> {
    if reg == Some(Gpr::Rsp) {
        return Err(CacheError::BadRequest(BadRequestReason::RspTrigger));
    }
    for (i, (g, _)) in assumed.iter().enumerate() {
        if *g == Gpr::Rsp {
            return Err(CacheError::BadRequest(BadRequestReason::RspAssumed));
        }
        if Some(*g) == reg || assumed[..i].iter().any(|(h, _)| h == g) {
            return Err(CacheError::BadRequest(BadRequestReason::AssumedTwice(*g)));
        }
    }
    // No register and no target: a counting stub (every pass takes the fall-back path and counts there).
    if reg.is_none() && (targets.len() > 1 || targets.iter().any(|t| t.value.is_some())) {
        return Err(CacheError::BadRequest(
            BadRequestReason::UnconditionalNotSingle,
        ));
    }
    if reg.is_some() && targets.iter().any(|t| t.value.is_none()) {
        return Err(CacheError::BadRequest(BadRequestReason::ValueMissing));
    }
    Ok(())
}

/// One stub being emitted: the instructions so far, its shared labels, and which form it takes.
struct StubGen {
    b: Builder,
    /// Binary search (flags saved) rather than the flag-free chain.
    tree: bool,
    /// Label of the fall-back path.
    fallback: u64,
    /// Label of each target's hit path (the leave sequence and jump to its entry).
    hits: Vec<u64>,
    /// Rollback of a thread anywhere between the prologue and the leave sequences. Stack after the prologue:
    /// chain/unconditional `[rsp]` = rax, `[rsp+8]` = rcx; tree `[rsp]` = rcx, `[rsp+8]` = flags (lahf/seto),
    /// `[rsp+16]` = rax.
    inside: Rollback,
}

impl StubGen {
    /// Labels in a fixed order (fall-back, then one per target), so that the emitted code is reproducible.
    fn new(n_targets: usize) -> StubGen {
        let mut b = Builder {
            items: Vec::new(),
            next_label: 0,
            pending: None,
        };
        let fallback = b.label();
        let hits: Vec<u64> = (0..n_targets).map(|_| b.label()).collect();
        let tree = n_targets > CHAIN_MAX && has_lahf();
        let rz = RED_ZONE;
        let inside = if tree {
            ttl(rz + 24, Some(16), Some(0), Some(8))
        } else {
            tt(rz + 16, Some(0), Some(8), None)
        };
        StubGen {
            b,
            tree,
            fallback,
            hits,
            inside,
        }
    }

    /// Step over the red zone, then save the scratch registers (and, for the binary search, the flags the
    /// cheap way: `push rax; lahf; seto al; push rax; push rcx`), so nothing of the program's is disturbed.
    fn prologue(&mut self) -> Result<(), CacheError> {
        let rz = RED_ZONE;
        let b = &mut self.b;
        b.emit(
            Instruction::with2(
                Code::Lea_r64_m,
                Register::RSP,
                MemoryOperand::with_base_displ(Register::RSP, -rz),
            ),
            tt(0, None, None, None),
        )?;
        if self.tree {
            b.emit(
                Instruction::with1(Code::Push_r64, Register::RAX),
                tt(rz, None, None, None),
            )?;
            b.emit(
                Ok(Instruction::with(Code::Lahf)),
                tt(rz + 8, Some(0), None, None),
            )?;
            b.emit(
                Instruction::with1(Code::Seto_rm8, Register::AL),
                tt(rz + 8, Some(0), None, None),
            )?;
            b.emit(
                Instruction::with1(Code::Push_r64, Register::RAX),
                tt(rz + 8, Some(0), None, None),
            )?;
            b.emit(
                Instruction::with1(Code::Push_r64, Register::RCX),
                tt(rz + 16, Some(8), None, None),
            )?;
        } else {
            b.emit(
                Instruction::with1(Code::Push_r64, Register::RCX),
                tt(rz, None, None, None),
            )?;
            b.emit(
                Instruction::with1(Code::Push_r64, Register::RAX),
                tt(rz + 8, None, Some(0), None),
            )?;
        }
        Ok(())
    }

    /// A zero enabled word (written by the guard reader thread the moment a guarded page may change) sends
    /// every new entry to the original code, before the tracer thread has unlinked anything.
    fn enabled_check(&mut self, enabled: Addr, off_label: u64) -> Result<(), CacheError> {
        self.b.emit(
            Instruction::with2(Code::Mov_r64_rm64, Register::RCX, rip_mem(enabled)),
            self.inside,
        )?;
        self.b.emit(
            Instruction::with_branch(Code::Jrcxz_rel8_64, off_label),
            self.inside,
        )
    }

    /// Assumed registers hold for every variant: checked once, before the trigger value; a mismatch falls back.
    fn assumed_checks(&mut self, assumed: &[(Gpr, u64)]) -> Result<(), CacheError> {
        for (g, v) in assumed {
            if self.tree {
                self.b.emit(
                    Instruction::with2(Code::Mov_r64_imm64, Register::RCX, *v),
                    self.inside,
                )?;
                self.b.emit(tree_cmp(*g), self.inside)?;
                self.b.emit(
                    Instruction::with_branch(Code::Jne_rel32_64, self.fallback),
                    self.inside,
                )?;
            } else {
                let ok = self.b.label();
                self.chain_compare(*g, *v, ok)?;
                self.b.emit(
                    Instruction::with_branch(Code::Jmp_rel32_64, self.fallback),
                    self.inside,
                )?;
                self.b.bind(ok);
            }
        }
        Ok(())
    }

    /// Flag-free equality test of `g` against `v` (`mov rax,-v; mov rcx,G; lea rcx,[rcx+rax]; jrcxz equal`).
    fn chain_compare(&mut self, g: Gpr, v: u64, equal: u64) -> Result<(), CacheError> {
        let inside = self.inside;
        self.b.emit(
            Instruction::with2(Code::Mov_r64_imm64, Register::RAX, v.wrapping_neg()),
            inside,
        )?;
        self.b.emit(chain_load(g), inside)?;
        self.b.emit(
            Instruction::with2(
                Code::Lea_r64_m,
                Register::RCX,
                MemoryOperand::with_base_index(Register::RCX, Register::RAX),
            ),
            inside,
        )?;
        self.b
            .emit(Instruction::with_branch(Code::Jrcxz_rel8_64, equal), inside)
    }

    /// Up to [`CHAIN_MAX`] values: one compare per value, each hit path right after its compare so that the
    /// rel8 `jrcxz` always reaches it; the last miss goes to the fall-back path.
    fn compare_chain(&mut self, r: Gpr, targets: &[StubTarget]) -> Result<(), CacheError> {
        let checks: Vec<u64> = (0..targets.len()).map(|_| self.b.label()).collect();
        for (i, t) in targets.iter().enumerate() {
            if i > 0 {
                self.b.bind(checks[i]);
            }
            self.chain_compare(r, t.value.unwrap_or(0), self.hits[i])?;
            let next = checks.get(i + 1).copied().unwrap_or(self.fallback);
            self.b.emit(
                Instruction::with_branch(Code::Jmp_rel32_64, next),
                self.inside,
            )?;
            self.enter(t, Some(self.hits[i]))?;
        }
        Ok(())
    }

    /// More values (flags saved): a binary search with `cmp`/`je`/`ja`/`jb` over the sorted values, each
    /// subtree ending in an unconditional transfer; the hit paths are emitted after the fall-back path.
    fn binary_search(&mut self, r: Gpr, targets: &[StubTarget]) -> Result<(), CacheError> {
        let (inside, fallback) = (self.inside, self.fallback);
        let mut values: Vec<(u64, usize)> = targets
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.value.map(|v| (v, i)))
            .collect();
        values.sort();
        // Pending subtrees [lo, hi), with the label of their first instruction (None: emitted right here).
        let mut work: Vec<(usize, usize, Option<u64>)> = vec![(0, values.len(), None)];
        let b = &mut self.b;
        while let Some((lo, hi, label)) = work.pop() {
            if let Some(l) = label {
                b.bind(l);
            }
            if lo >= hi {
                b.emit(
                    Instruction::with_branch(Code::Jmp_rel32_64, fallback),
                    inside,
                )?;
                continue;
            }
            let mid = (lo + hi) / 2;
            let (v, ti) = values[mid];
            b.emit(
                Instruction::with2(Code::Mov_r64_imm64, Register::RCX, v),
                inside,
            )?;
            b.emit(tree_cmp(r), inside)?;
            b.emit(
                Instruction::with_branch(Code::Je_rel32_64, self.hits[ti]),
                inside,
            )?;
            match (lo < mid, mid + 1 < hi) {
                (true, true) => {
                    let l_right = b.label();
                    b.emit(Instruction::with_branch(Code::Ja_rel32_64, l_right), inside)?;
                    work.push((mid + 1, hi, Some(l_right)));
                    work.push((lo, mid, None));
                }
                (true, false) => {
                    b.emit(
                        Instruction::with_branch(Code::Ja_rel32_64, fallback),
                        inside,
                    )?;
                    work.push((lo, mid, None));
                }
                (false, true) => {
                    b.emit(
                        Instruction::with_branch(Code::Jb_rel32_64, fallback),
                        inside,
                    )?;
                    work.push((mid + 1, hi, None));
                }
                (false, false) => {
                    b.emit(
                        Instruction::with_branch(Code::Jmp_rel32_64, fallback),
                        inside,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Leaving: count the entry (without `lock`: an approximate count is fine, a locked one serializes), then
    /// restore the scratch registers (and flags: `add al,0x7f; sahf` puts OF back, then the rest) and step back
    /// over the red zone. `inside` holds before the first instruction.
    fn leave(&mut self, counter: Addr) -> Result<(), CacheError> {
        let rz = RED_ZONE;
        let inside = self.inside;
        let b = &mut self.b;
        if self.tree {
            let flags_saved = ttl(rz + 16, Some(8), None, Some(0));
            let rax_saved = tt(rz + 16, Some(8), None, None);
            b.emit(Instruction::with1(Code::Inc_rm64, rip_mem(counter)), inside)?;
            b.emit(Instruction::with1(Code::Pop_r64, Register::RCX), inside)?;
            b.emit(
                Instruction::with2(
                    Code::Mov_r64_rm64,
                    Register::RAX,
                    MemoryOperand::with_base_displ(Register::RSP, 0),
                ),
                flags_saved,
            )?;
            b.emit(
                Instruction::with2(Code::Add_rm8_imm8, Register::AL, 0x7fu32),
                flags_saved,
            )?;
            b.emit(Ok(Instruction::with(Code::Sahf)), flags_saved)?;
            b.emit(
                Instruction::with2(
                    Code::Mov_r64_rm64,
                    Register::RAX,
                    MemoryOperand::with_base_displ(Register::RSP, 8),
                ),
                rax_saved,
            )?;
            b.emit(
                Instruction::with2(
                    Code::Lea_r64_m,
                    Register::RSP,
                    MemoryOperand::with_base_displ(Register::RSP, rz + 16),
                ),
                tt(rz + 16, None, None, None),
            )?;
        } else {
            // Flag-free increment: mov/lea/mov instead of `inc`.
            b.emit(
                Instruction::with2(Code::Mov_r64_rm64, Register::RAX, rip_mem(counter)),
                inside,
            )?;
            b.emit(
                Instruction::with2(
                    Code::Lea_r64_m,
                    Register::RAX,
                    MemoryOperand::with_base_displ(Register::RAX, 1),
                ),
                inside,
            )?;
            b.emit(
                Instruction::with2(Code::Mov_rm64_r64, rip_mem(counter), Register::RAX),
                inside,
            )?;
            b.emit(Instruction::with1(Code::Pop_r64, Register::RAX), inside)?;
            b.emit(
                Instruction::with1(Code::Pop_r64, Register::RCX),
                tt(rz + 8, None, Some(0), None),
            )?;
            b.emit(
                Instruction::with2(
                    Code::Lea_r64_m,
                    Register::RSP,
                    MemoryOperand::with_base_displ(Register::RSP, rz),
                ),
                tt(rz, None, None, None),
            )?;
        }
        Ok(())
    }

    /// A hit path (at `label`, if given): leave through the target's counter, then jump to its variant.
    fn enter(&mut self, t: &StubTarget, label: Option<u64>) -> Result<(), CacheError> {
        if let Some(l) = label {
            self.b.bind(l);
        }
        self.leave(t.counter)?;
        self.b.emit(
            Instruction::with_branch(Code::Jmp_rel32_64, t.entry.0),
            tt(0, None, None, None),
        )
    }

    /// The fall-back path (no value matched, an assumed register differs, or the stub is disabled): leave, run
    /// the displaced original instructions (relocated by the block encoder), jump back after the patch.
    /// Returns the index of the first displaced instruction.
    fn fallback_path(
        &mut self,
        patch: &PatchSite,
        fallback_counter: Addr,
    ) -> Result<usize, CacheError> {
        self.b.bind(self.fallback);
        self.leave(fallback_counter)?;
        let first_displaced = self.b.items.len();
        for ins in &patch.displaced {
            self.b.items.push((*ins, Rollback::At(Addr(ins.ip()))));
        }
        let resume = patch.site.0 + patch.len() as u64;
        self.b.emit(
            Instruction::with_branch(Code::Jmp_rel32_64, resume),
            Rollback::At(Addr(resume)),
        )?;
        Ok(first_displaced)
    }

    /// Encode at `base` and map each instruction's rollback state (and each displaced instruction) to its final
    /// offset: the block encoder may lengthen branches, so offsets are known only now.
    fn encode(
        self,
        base: Addr,
        patch: &PatchSite,
        entry_index: usize,
        first_displaced: usize,
        enabled: Addr,
    ) -> Result<Stub, CacheError> {
        let items = self.b.items;
        let instrs: Vec<Instruction> = items.iter().map(|(i, _)| *i).collect();
        let res = BlockEncoder::encode(
            64,
            InstructionBlock::new(&instrs, base.0),
            BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .map_err(CacheError::Encode)?;
        let mut rollback = Vec::new();
        let mut relocated = Vec::new();
        for (i, (_, rb)) in items.iter().enumerate() {
            let off = res
                .new_instruction_offsets
                .get(i)
                .copied()
                .unwrap_or(u32::MAX);
            if off == u32::MAX {
                // Rewritten into several instructions (target out of rel32 reach): no boundary to map.
                continue;
            }
            rollback.push((off, *rb));
            if (first_displaced..first_displaced + patch.displaced.len()).contains(&i) {
                if let Rollback::At(a) = rb {
                    relocated.push((*a, base.offset(off as u64)));
                }
            }
        }
        rollback.sort_by_key(|(o, _)| *o);
        let entry_off = res
            .new_instruction_offsets
            .get(entry_index)
            .copied()
            .filter(|o| *o != u32::MAX)
            .ok_or(CacheError::StubEntryLost)?;
        Ok(Stub {
            entry: base.offset(entry_off as u64),
            enabled,
            base,
            code: res.code_buffer,
            rollback,
            relocated,
        })
    }
}

/// Binary-search form: `cmp G,rcx` against the program's value of `g`; rax and rcx hold stub values there, so
/// theirs are compared in their stack slots.
fn tree_cmp(g: Gpr) -> Result<Instruction, iced_x86::IcedError> {
    match g {
        Gpr::Rax => Instruction::with2(
            Code::Cmp_rm64_r64,
            MemoryOperand::with_base_displ(Register::RSP, 16),
            Register::RCX,
        ),
        Gpr::Rcx => Instruction::with2(
            Code::Cmp_rm64_r64,
            MemoryOperand::with_base_displ(Register::RSP, 0),
            Register::RCX,
        ),
        g => Instruction::with2(Code::Cmp_rm64_r64, g.to_iced(), Register::RCX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    fn no_read(_: Addr, _: &mut [u8]) -> bool {
        false
    }

    #[test]
    fn stub_has_rollback_for_every_instruction() {
        let code = [0x8b, 0x07, 0x48, 0x83, 0xc7, 0x04, 0x90];
        let p = plan_patch(&code, Addr(0x40_1000), Addr(0x40_1000), &no_read).unwrap();
        for n in [1u64, 7, 12] {
            let targets: Vec<StubTarget> = (0..n)
                .map(|i| StubTarget {
                    value: Some(i * 3),
                    entry: Addr(0x50_0000 + i * 0x100),
                    counter: Addr(0x60_0000 + i * 8),
                })
                .collect();
            let s = build_stub(
                Addr(0x50_8000),
                &p,
                Some(Gpr::Rdi),
                &[(Gpr::Rsi, 7), (Gpr::Rax, 9)],
                &targets,
                Addr(0x60_1000),
                Addr(0x60_1008),
            )
            .unwrap();
            assert!(s.rollback_at(0x50_8000).is_some());
            assert!(s.rollback_at(s.entry.0).is_some());
            assert_eq!(s.relocated.len(), 2);
            // Every boundary decodes and is in the table.
            let mut d = Decoder::with_ip(64, &s.code, 0x50_8000, DecoderOptions::NONE);
            while d.can_decode() {
                let i = d.decode();
                assert!(!i.is_invalid());
                assert!(
                    s.rollback_at(i.ip()).is_some(),
                    "no rollback at {:#x}",
                    i.ip()
                );
            }
        }
    }
}
