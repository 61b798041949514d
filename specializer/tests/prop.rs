//! Property test: random instruction sequences from the modelled set run natively before and after specialization must leave identical registers, defined flags and stack memory.
//!
//! Each case: 1-12 random instructions (every width, ah..bh, boundary
//! immediates, loads from a constant buffer through a reserved base register,
//! setcc/cmovcc, forward jcc/jmp, push/pop pairs) followed by a `nop` and the
//! harness exit stub. A random subset of registers and flags is known (with
//! the same values the native runs use). The variant is encoded at an
//! executable buffer and run with the same full inputs; all 16 GPRs, the
//! flags the original leaves defined, and the private stack must match. Every
//! value the specializer claims known at the fall-through exit must match the
//! original run too, and the deopt map must cover every instruction boundary.
//! A failing case is shrunk (instructions removed, known values forgotten)
//! and reported as hex + asm + inputs.
//!
//! Cases: 200 000 by default (`DYNSPEC_PROP_CASES` overrides), seed from
//! `DYNSPEC_PROP_SEED` (default fixed, so CI is deterministic); case n depends
//! only on (seed, n): `DYNSPEC_PROP_ONLY=n` replays one case.
//! `DYNSPEC_PROP_MAX_FAILS` (default 5) distinct failures are collected.
//! The deopt test (`DYNSPEC_DEOPT_CASES`, default 2000) stops each variant
//! before every instruction it executes, applies the deopt entry and resumes
//! the original.

mod common;

use common::rng::Rng;
use common::{hex, Cpu, ExecBuf, Machine, Mapping};
use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Instruction, InstructionBlock, MemoryOperand,
    Register, RflagsBits,
};
use specializer::snippet::SnippetMemory;
use specializer::{Addr, Flag, Gpr, KnownState, Options, Request};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Size of the constant buffer loads read from.
const BUF_LEN: usize = 256;

#[derive(Clone, Debug)]
enum Op {
    Ins(Instruction),
    /// Part of a counted loop's structure: the shrinker keeps it (removing it
    /// could make the loop infinite).
    Fixed(Instruction),
    /// Branch (jcc/jmp near code) to label k.
    Br(Code, usize),
    Label(usize),
}

#[derive(Clone, Debug)]
struct Case {
    ops: Vec<Op>,
    known: KnownState,
    input: Cpu,
    rs: Res,
    options: Options,
    /// Whether the fall-through exit is chained to the second exit stub.
    chained: bool,
}

/// Reserved registers of a case: never written by generated instructions
/// (except the loop counter by its loop), never rax/rdx/rsp (implicit writers).
#[derive(Clone, Copy, Debug)]
struct Res {
    /// Points at the constant buffer.
    base: Gpr,
    /// Points at the scratch (writable, not constant) buffer.
    sbase: Gpr,
    /// Loop counter.
    lc: Gpr,
    /// Index into the constant buffer (0..=15).
    ix: Gpr,
}

impl Res {
    fn has(&self, g: Gpr) -> bool {
        g == self.base || g == self.sbase || g == self.lc || g == self.ix
    }
}

const CONDS: [&str; 16] = [
    "o", "no", "b", "ae", "e", "ne", "be", "a", "s", "ns", "p", "np", "l", "ge", "le", "g",
];
const ALU: [&str; 8] = ["Add", "Or", "Adc", "Sbb", "And", "Sub", "Xor", "Cmp"];
const SHIFTS: [&str; 5] = ["Rol", "Ror", "Shl", "Shr", "Sar"];
const UNARY: [&str; 4] = ["Not", "Neg", "Inc", "Dec"];

struct Gen {
    rng: Rng,
    codes: Arc<HashMap<String, Code>>,
}

/// iced `Code`s by their Debug name, e.g. "Add_rm8_r8".
fn code_map() -> Arc<HashMap<String, Code>> {
    Arc::new(Code::values().map(|c| (format!("{c:?}"), c)).collect())
}

fn reg_of(g: Gpr, width: u32) -> Register {
    use Register as R;
    let i = g.index();
    match width {
        8 => [
            R::AL,
            R::CL,
            R::DL,
            R::BL,
            R::SPL,
            R::BPL,
            R::SIL,
            R::DIL,
            R::R8L,
            R::R9L,
            R::R10L,
            R::R11L,
            R::R12L,
            R::R13L,
            R::R14L,
            R::R15L,
        ][i],
        16 => [
            R::AX,
            R::CX,
            R::DX,
            R::BX,
            R::SP,
            R::BP,
            R::SI,
            R::DI,
            R::R8W,
            R::R9W,
            R::R10W,
            R::R11W,
            R::R12W,
            R::R13W,
            R::R14W,
            R::R15W,
        ][i],
        32 => [
            R::EAX,
            R::ECX,
            R::EDX,
            R::EBX,
            R::ESP,
            R::EBP,
            R::ESI,
            R::EDI,
            R::R8D,
            R::R9D,
            R::R10D,
            R::R11D,
            R::R12D,
            R::R13D,
            R::R14D,
            R::R15D,
        ][i],
        _ => g.to_iced(),
    }
}

impl Gen {
    fn new(seed: u64, codes: Arc<HashMap<String, Code>>) -> Gen {
        Gen {
            rng: Rng::new(seed),
            codes,
        }
    }

    /// The generator for case `n` of a run: independent of which thread runs it.
    fn for_case(seed: u64, n: u64, codes: Arc<HashMap<String, Code>>) -> Gen {
        let mut x = seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        x = (x ^ (x >> 31)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        Gen::new(x ^ (x >> 29), codes)
    }

    fn code(&self, name: &str) -> Code {
        *self
            .codes
            .get(name)
            .unwrap_or_else(|| panic!("no iced Code named {name}"))
    }

    /// A register of `width` other than rsp and the base; 8-bit may be ah..bh.
    fn reg(&mut self, width: u32, rs: Res) -> Register {
        if width == 8 && self.rng.chance(20) {
            let h = self
                .rng
                .pick(&[Register::AH, Register::CH, Register::DH, Register::BH]);
            // ah..bh alias rax..rbx: never a reserved register.
            if !Gpr::containing(h).is_some_and(|g| rs.has(g)) {
                return h;
            }
        }
        loop {
            let g = self.rng.pick(&Gpr::ALL);
            if g != Gpr::Rsp && !rs.has(g) {
                return reg_of(g, width);
            }
        }
    }

    fn width(&mut self) -> u32 {
        self.rng.pick(&[8, 16, 32, 64])
    }

    fn imm(&mut self, bits: u32) -> i64 {
        let v = self.rng.value() as i64;
        match bits {
            8 => v as i8 as i64,
            16 => v as i16 as i64,
            _ => v as i32 as i64,
        }
    }

    /// A load operand inside the constant buffer: `[base+disp]` or
    /// `[base+ix*scale+disp]` (ix holds 0..=15).
    fn mem(&mut self, rs: Res, size: usize) -> MemoryOperand {
        if self.rng.chance(50) {
            let disp = self.rng.below(BUF_LEN - size + 1) as i64;
            return MemoryOperand::with_base_displ(rs.base.to_iced(), disp);
        }
        let scale = self.rng.pick(&[1u32, 2, 4, 8]);
        let disp = self.rng.below(BUF_LEN - 15 * scale as usize - size + 1) as i64;
        MemoryOperand::with_base_index_scale_displ_size(
            rs.base.to_iced(),
            rs.ix.to_iced(),
            scale,
            disp,
            1,
        )
    }

    /// One random non-branch instruction (may fail to encode: caller retries).
    fn insn(&mut self, rs: Res) -> Result<Instruction, iced_x86::IcedError> {
        if self.rng.chance(15) {
            return self.extra_insn(rs);
        }
        let w = self.width();
        let sz = (w / 8) as usize;
        let r = |g: &mut Gen| g.reg(w, rs);
        let kind = self.rng.below(100);
        match kind {
            0..=24 => {
                let op = self.rng.pick(&ALU);
                match self.rng.below(4) {
                    0 | 1 => {
                        let (a, b) = (r(self), r(self));
                        Instruction::with2(self.code(&format!("{op}_rm{w}_r{w}")), a, b)
                    }
                    2 => {
                        let a = r(self);
                        let m = self.mem(rs, sz);
                        Instruction::with2(self.code(&format!("{op}_r{w}_rm{w}")), a, m)
                    }
                    _ => {
                        let a = r(self);
                        let short = w > 8 && self.rng.chance(50);
                        let (name, bits) = match (w, short) {
                            (8, _) => ("rm8_imm8".to_string(), 8),
                            (_, true) => (format!("rm{w}_imm8"), 8),
                            (16, _) => ("rm16_imm16".to_string(), 16),
                            _ => (format!("rm{w}_imm32"), 32),
                        };
                        let v = self.imm(bits) as i32;
                        Instruction::with2(self.code(&format!("{op}_{name}")), a, v)
                    }
                }
            }
            25..=29 => {
                let a = r(self);
                if self.rng.chance(50) {
                    let b = r(self);
                    Instruction::with2(self.code(&format!("Test_rm{w}_r{w}")), a, b)
                } else {
                    let bits = w.min(32);
                    let v = self.imm(bits) as i32;
                    Instruction::with2(self.code(&format!("Test_rm{w}_imm{bits}")), a, v)
                }
            }
            30..=41 => {
                let a = r(self);
                match self.rng.below(4) {
                    0 => {
                        let b = r(self);
                        Instruction::with2(self.code(&format!("Mov_rm{w}_r{w}")), a, b)
                    }
                    1 => {
                        let m = self.mem(rs, sz);
                        Instruction::with2(self.code(&format!("Mov_r{w}_rm{w}")), a, m)
                    }
                    2 if w == 64 => Instruction::with2(Code::Mov_r64_imm64, a, self.rng.value()),
                    _ => {
                        let bits = w.min(32);
                        let v = self.imm(bits) as i32;
                        if w == 64 {
                            Instruction::with2(Code::Mov_rm64_imm32, a, v)
                        } else {
                            let v = (v as u32) & (u64::MAX >> (64 - w)) as u32;
                            Instruction::with2(self.code(&format!("Mov_r{w}_imm{w}")), a, v)
                        }
                    }
                }
            }
            42..=47 => {
                // movzx / movsx / movsxd
                let which = self.rng.pick(&["Movzx", "Movsx", "Movsxd"]);
                if which == "Movsxd" {
                    let a = self.reg(64, rs);
                    if self.rng.chance(50) {
                        let b = self.reg(32, rs);
                        Instruction::with2(Code::Movsxd_r64_rm32, a, b)
                    } else {
                        let m = self.mem(rs, 4);
                        Instruction::with2(Code::Movsxd_r64_rm32, a, m)
                    }
                } else {
                    let src_w = self.rng.pick(&[8u32, 16]);
                    let dst_w = if src_w == 8 {
                        self.rng.pick(&[16u32, 32, 64])
                    } else {
                        self.rng.pick(&[32u32, 64])
                    };
                    let a = self.reg(dst_w, rs);
                    let c = self.code(&format!("{which}_r{dst_w}_rm{src_w}"));
                    if self.rng.chance(60) {
                        let b = self.reg(src_w, rs);
                        Instruction::with2(c, a, b)
                    } else {
                        let m = self.mem(rs, (src_w / 8) as usize);
                        Instruction::with2(c, a, m)
                    }
                }
            }
            48..=51 => {
                let dw = self.rng.pick(&[16u32, 32, 64]);
                let a = self.reg(dw, rs);
                let b = self.reg(64, rs);
                let i = self.reg(64, rs);
                let scale = self.rng.pick(&[1u32, 2, 4, 8]);
                let disp = self.imm(32);
                let m = if self.rng.chance(50) {
                    MemoryOperand::with_base_index_scale_displ_size(b, i, scale, disp, 4)
                } else {
                    MemoryOperand::with_base_displ(b, disp)
                };
                Instruction::with2(self.code(&format!("Lea_r{dw}_m")), a, m)
            }
            52..=59 => {
                let op = self.rng.pick(&UNARY);
                let a = r(self);
                Instruction::with1(self.code(&format!("{op}_rm{w}")), a)
            }
            60..=71 => {
                let op = self.rng.pick(&SHIFTS);
                let a = r(self);
                match self.rng.below(3) {
                    0 => Instruction::with2(self.code(&format!("{op}_rm{w}_1")), a, 1i32),
                    1 => Instruction::with2(self.code(&format!("{op}_rm{w}_CL")), a, Register::CL),
                    _ => {
                        let c = self
                            .rng
                            .pick(&[0u32, 1, 2, 7, 8, 15, 16, 31, 32, 33, 63, 64, 65]);
                        Instruction::with2(self.code(&format!("{op}_rm{w}_imm8")), a, c)
                    }
                }
            }
            72..=79 => match self.rng.below(3) {
                0 => {
                    let a = r(self);
                    Instruction::with1(self.code(&format!("Imul_rm{w}")), a)
                }
                1 => {
                    let w = self.rng.pick(&[16u32, 32, 64]);
                    let a = self.reg(w, rs);
                    if self.rng.chance(70) {
                        let b = self.reg(w, rs);
                        Instruction::with2(self.code(&format!("Imul_r{w}_rm{w}")), a, b)
                    } else {
                        let m = self.mem(rs, (w / 8) as usize);
                        Instruction::with2(self.code(&format!("Imul_r{w}_rm{w}")), a, m)
                    }
                }
                _ => {
                    let w = self.rng.pick(&[16u32, 32, 64]);
                    let a = self.reg(w, rs);
                    let b = self.reg(w, rs);
                    if self.rng.chance(50) {
                        let v = self.imm(8) as i32;
                        Instruction::with3(self.code(&format!("Imul_r{w}_rm{w}_imm8")), a, b, v)
                    } else {
                        let bits = w.min(32);
                        let v = self.imm(bits) as i32;
                        Instruction::with3(
                            self.code(&format!("Imul_r{w}_rm{w}_imm{bits}")),
                            a,
                            b,
                            v,
                        )
                    }
                }
            },
            80..=87 => {
                let c = self.rng.pick(&CONDS);
                let a = self.reg(8, rs);
                Instruction::with1(self.code(&format!("Set{c}_rm8")), a)
            }
            88..=95 => {
                let c = self.rng.pick(&CONDS);
                let w = self.rng.pick(&[16u32, 32, 64]);
                let a = self.reg(w, rs);
                let name = format!("Cmov{c}_r{w}_rm{w}");
                if self.rng.chance(75) {
                    let b = self.reg(w, rs);
                    Instruction::with2(self.code(&name), a, b)
                } else {
                    let m = self.mem(rs, (w / 8) as usize);
                    Instruction::with2(self.code(&name), a, m)
                }
            }
            _ => Ok(match self.rng.below(3) {
                0 => Instruction::with(Code::Nopd),
                1 => Instruction::with1(
                    Code::Nop_rm32,
                    MemoryOperand::with_base_displ(Register::RAX, 0),
                )?,
                _ => Instruction::with(Code::Endbr64),
            }),
        }
    }

    /// Scratch-memory stores/RMW/loads and instructions the specializer does
    /// not model (they must stay residual with their outputs unknown).
    fn extra_insn(&mut self, rs: Res) -> Result<Instruction, iced_x86::IcedError> {
        let w = self.width();
        let sz = (w / 8) as usize;
        let smem = |g: &mut Gen| {
            let d = g.rng.below(SCRATCH_LEN - sz + 1) as i64;
            MemoryOperand::with_base_displ(rs.sbase.to_iced(), d)
        };
        match self.rng.below(14) {
            0 | 1 => {
                let (m, r) = (smem(self), self.reg(w, rs));
                Instruction::with2(self.code(&format!("Mov_rm{w}_r{w}")), m, r)
            }
            2 => {
                let m = smem(self);
                let bits = w.min(32);
                let v = self.imm(bits) as i32;
                Instruction::with2(self.code(&format!("Mov_rm{w}_imm{bits}")), m, v)
            }
            3 | 4 => {
                let op = self.rng.pick(&ALU);
                let (m, r) = (smem(self), self.reg(w, rs));
                Instruction::with2(self.code(&format!("{op}_rm{w}_r{w}")), m, r)
            }
            5 => {
                let op = self.rng.pick(&UNARY);
                let m = smem(self);
                Instruction::with1(self.code(&format!("{op}_rm{w}")), m)
            }
            6 => {
                let (r, m) = (self.reg(w, rs), smem(self));
                Instruction::with2(self.code(&format!("Mov_r{w}_rm{w}")), r, m)
            }
            7 => {
                let c = self.rng.pick(&CONDS);
                let m = smem(self);
                Instruction::with1(self.code(&format!("Set{c}_rm8")), m)
            }
            8 => {
                let w = self.rng.pick(&[32u32, 64]);
                let r = self.reg(w, rs);
                Instruction::with1(self.code(&format!("Bswap_r{w}")), r)
            }
            9 => {
                let (a, b) = (self.reg(w, rs), self.reg(w, rs));
                Instruction::with2(self.code(&format!("Xchg_rm{w}_r{w}")), a, b)
            }
            10 => Ok(Instruction::with(self.rng.pick(&[
                Code::Cdq,
                Code::Cqo,
                Code::Cwd,
                Code::Stc,
                Code::Clc,
                Code::Cmc,
            ]))),
            11 => {
                let w = self.rng.pick(&[16u32, 32, 64]);
                let a = self.reg(w, rs);
                if self.rng.chance(50) {
                    let b = self.reg(w, rs);
                    Instruction::with2(self.code(&format!("Bt_rm{w}_r{w}")), a, b)
                } else {
                    let c = self.rng.below(64) as u32;
                    Instruction::with2(self.code(&format!("Bt_rm{w}_imm8")), a, c)
                }
            }
            12 => {
                let w = self.rng.pick(&[16u32, 32, 64]);
                let (a, b) = (self.reg(w, rs), self.reg(w, rs));
                Instruction::with2(self.code(&format!("Popcnt_r{w}_rm{w}")), a, b)
            }
            _ => {
                let op = self.rng.pick(&SHIFTS);
                let m = smem(self);
                Instruction::with2(self.code(&format!("{op}_rm{w}_1")), m, 1i32)
            }
        }
    }

    fn ok_insn(&mut self, rs: Res) -> Instruction {
        let mut enc = iced_x86::Encoder::new(64);
        loop {
            if let Ok(i) = self.insn(rs) {
                if enc.encode(&i, 0x1000).is_ok() {
                    return i;
                }
            }
        }
    }

    fn case(&mut self, stack_top: u64, buf_addr: u64, scratch: u64) -> Case {
        loop {
            if let Some(c) = self.try_case(stack_top, buf_addr, scratch) {
                return c;
            }
        }
    }

    fn try_case(&mut self, stack_top: u64, buf_addr: u64, scratch: u64) -> Option<Case> {
        let n = 1 + self.rng.below(12);
        // Reserved registers: not rax/rdx (one-operand imul, cdq/cqo write them implicitly).
        let mut pool: Vec<Gpr> = Gpr::ALL
            .iter()
            .copied()
            .filter(|g| !matches!(g, Gpr::Rsp | Gpr::Rax | Gpr::Rdx))
            .collect();
        let mut take = |g: &mut Gen| pool.remove(g.rng.below(pool.len()));
        let rs = Res {
            base: take(self),
            sbase: take(self),
            lc: take(self),
            ix: take(self),
        };
        let mut items: Vec<Vec<Op>> = Vec::new();
        let mut labels_at: Vec<Vec<usize>> = vec![Vec::new(); n + 1];
        let mut next_label = 0;
        for i in 0..n {
            let k = self.rng.below(100);
            if k < 12 {
                let cond = self.rng.pick(&CONDS);
                let code = if self.rng.chance(85) {
                    self.code(&format!("J{cond}_rel32_64"))
                } else {
                    Code::Jmp_rel32_64
                };
                let pos = i + 1 + self.rng.below(n - i);
                labels_at[pos].push(next_label);
                items.push(vec![Op::Br(code, next_label)]);
                next_label += 1;
            } else if k < 16 {
                // Counted loop: lc = (lc & 3) + 1, body, dec lc, jnz back.
                let l = next_label;
                next_label += 1;
                let lc32 = reg_of(rs.lc, 32);
                let mut v = vec![
                    Op::Fixed(Instruction::with2(Code::And_rm32_imm8, lc32, 3i32).unwrap()),
                    Op::Fixed(Instruction::with1(Code::Inc_rm32, lc32).unwrap()),
                    Op::Label(l),
                ];
                for _ in 0..1 + self.rng.below(3) {
                    v.push(Op::Ins(self.ok_insn(rs)));
                }
                v.push(Op::Fixed(Instruction::with1(Code::Dec_rm32, lc32).unwrap()));
                v.push(Op::Br(Code::Jne_rel32_64, l));
                items.push(v);
            } else if k < 20 {
                // push/pop pair with maybe one instruction between.
                let a = self.reg(64, rs);
                let b = self.reg(64, rs);
                let mut v = vec![Op::Ins(Instruction::with1(Code::Push_r64, a).unwrap())];
                if self.rng.chance(50) {
                    v.push(Op::Ins(self.ok_insn(rs)));
                }
                v.push(Op::Ins(Instruction::with1(Code::Pop_r64, b).unwrap()));
                items.push(v);
            } else {
                items.push(vec![Op::Ins(self.ok_insn(rs))]);
            }
        }
        let mut ops = Vec::new();
        for (i, it) in items.into_iter().enumerate() {
            ops.extend(labels_at[i].iter().map(|l| Op::Label(*l)));
            ops.extend(it);
        }
        ops.extend(labels_at[n].iter().map(|l| Op::Label(*l)));
        if flag_dataflow(&ops).1 {
            // Reads a flag an earlier instruction left undefined: meaningless, try again.
            return None;
        }
        // Inputs: everything random; a random subset known.
        let mut input = Cpu::default();
        let mut known = KnownState::default();
        let p_known = self.rng.pick(&[0u64, 30, 60, 90, 100]);
        for g in Gpr::ALL {
            let v = match g {
                Gpr::Rsp => stack_top,
                g if g == rs.base => buf_addr,
                g if g == rs.sbase => scratch,
                g if g == rs.ix => self.rng.below(16) as u64,
                _ => self.rng.value(),
            };
            input.regs[g.index()] = v;
            if self.rng.chance(p_known) {
                known.set_reg(g, Some(v));
            }
        }
        for f in Flag::ALL {
            let v = if f == Flag::Df {
                self.rng.chance(10)
            } else {
                self.rng.chance(50)
            };
            input.set_flag(f, v);
            if self.rng.chance(p_known) {
                known.set_flag(f, Some(v));
            }
        }
        let mut options = Options::default();
        if self.rng.chance(20) {
            options.max_states_per_address = self.rng.pick(&[1u32, 2, 3]);
        }
        if self.rng.chance(10) {
            options.max_code_bytes = self.rng.pick(&[16usize, 64, 200]);
        }
        options.scratch_registers = self.rng.chance(70);
        options.forward_stores = self.rng.chance(70);
        if self.rng.chance(30) {
            // The session's setting: forward only within the (private) scratch buffer and the stack.
            options.forward_within =
                Some(vec![(Addr(scratch), Addr(scratch + SCRATCH_LEN as u64))]);
        }
        let chained = self.rng.chance(20);
        Some(Case {
            ops,
            known,
            input,
            rs,
            options,
            chained,
        })
    }
}

/// Encode the ops at `ip` (labels resolved; a final `nop` is the target of end labels).
fn assemble(ops: &[Op], ip: u64) -> Vec<u8> {
    // Pseudo-IPs: BlockEncoder resolves branch targets that are IPs of block instructions.
    let mut instrs = Vec::new();
    let mut label_ip = HashMap::new();
    let mut pending_labels = Vec::new();
    let pseudo = |k: usize| 0x1_0000 + 16 * k as u64;
    let mut count = 0;
    for op in ops {
        match op {
            Op::Label(l) => pending_labels.push(*l),
            Op::Ins(_) | Op::Fixed(_) | Op::Br(..) => {
                for l in pending_labels.drain(..) {
                    label_ip.insert(l, pseudo(count));
                }
                count += 1;
            }
        }
    }
    for l in pending_labels.drain(..) {
        label_ip.insert(l, pseudo(count));
    }
    let mut k = 0;
    for op in ops {
        let mut ins = match op {
            Op::Label(_) => continue,
            Op::Ins(i) | Op::Fixed(i) => *i,
            Op::Br(c, l) => Instruction::with_branch(*c, label_ip[l]).unwrap(),
        };
        ins.set_ip(pseudo(k));
        instrs.push(ins);
        k += 1;
    }
    let mut nop = Instruction::with(Code::Nopd);
    nop.set_ip(pseudo(k));
    instrs.push(nop);
    let r = BlockEncoder::encode(
        64,
        InstructionBlock::new(&instrs, ip),
        BlockEncoderOptions::NONE,
    )
    .expect("block encode");
    r.code_buffer
}

/// Flags (as a Flag bitmask over Flag::ALL indices) that may be undefined after
/// the original runs to its end, following every forward path.
fn undefined_flags(ops: &[Op]) -> u32 {
    flag_dataflow(ops).0
}

/// (flags possibly undefined at the end, whether some instruction reads a
/// possibly-undefined flag — such a program has no defined meaning).
fn flag_dataflow(ops: &[Op]) -> (u32, bool) {
    let mut reads_undefined = false;
    fn to_mask(rf: u32) -> u32 {
        let mut m = 0;
        for (bit, f) in [
            (RflagsBits::CF, Flag::Cf),
            (RflagsBits::PF, Flag::Pf),
            (RflagsBits::AF, Flag::Af),
            (RflagsBits::ZF, Flag::Zf),
            (RflagsBits::SF, Flag::Sf),
            (RflagsBits::DF, Flag::Df),
            (RflagsBits::OF, Flag::Of),
        ] {
            if rf & bit != 0 {
                m |= 1 << f as u32;
            }
        }
        m
    }
    // Flags possibly undefined on entry to each label; iterated to a fixpoint
    // because loops branch backward.
    let mut pending: HashMap<usize, u32> = HashMap::new();
    let mut cur: Option<u32>;
    loop {
        let before = pending.clone();
        cur = Some(0);
        for op in ops {
            match op {
                Op::Label(l) => {
                    if let Some(p) = pending.get(l).copied() {
                        cur = Some(cur.unwrap_or(0) | p);
                    }
                }
                Op::Br(c, l) => {
                    if let Some(u) = cur {
                        let reads =
                            to_mask(Instruction::with_branch(*c, 0).map_or(0, |i| i.rflags_read()));
                        reads_undefined |= reads & u != 0;
                        *pending.entry(*l).or_insert(0) |= u;
                    }
                    if *c == Code::Jmp_rel32_64 {
                        cur = None;
                    }
                }
                Op::Ins(i) | Op::Fixed(i) => {
                    let Some(u) = cur else { continue };
                    reads_undefined |= to_mask(i.rflags_read()) & u != 0;
                    let und = to_mask(i.rflags_undefined());
                    let modified = to_mask(i.rflags_modified());
                    let m = i.mnemonic();
                    use iced_x86::Mnemonic as M;
                    let is_shift = matches!(m, M::Shl | M::Shr | M::Sar | M::Rol | M::Ror);
                    let width = i.op0_register().size() as u32 * 8;
                    let count = if !is_shift {
                        None
                    } else if i.op_count() > 1 && i.op1_kind() != iced_x86::OpKind::Register {
                        Some(i.immediate(1) as u32 & if width == 64 { 63 } else { 31 })
                    } else if i.op_count() > 1 {
                        None // cl: unknown statically
                    } else {
                        Some(1)
                    };
                    let next = if is_shift {
                        match count {
                            Some(0) => u,
                            Some(c) => {
                                let mut n = (u & !modified) | und;
                                // SHL/SHR by >= width (8/16-bit): CF undefined; OF undefined for counts > 1.
                                if matches!(m, M::Shl | M::Shr) && c >= width {
                                    n |= 1 << Flag::Cf as u32;
                                }
                                if c != 1 {
                                    n |= 1 << Flag::Of as u32;
                                }
                                n
                            }
                            None => {
                                let mut n = u | und | 1 << Flag::Of as u32;
                                if matches!(m, M::Shl | M::Shr) && width < 32 {
                                    n |= 1 << Flag::Cf as u32;
                                }
                                n
                            }
                        }
                    } else {
                        (u & !modified) | und
                    };
                    cur = Some(next);
                }
            }
        }
        if pending == before {
            break;
        }
    }
    (cur.unwrap_or(0), reads_undefined)
}

struct World {
    m: Machine,
    code: ExecBuf,
    variant: ExecBuf,
    /// Constant buffer (read-only for the code; declared constant).
    buf: Mapping,
    /// Scratch buffer the code may write (not constant).
    scratch: Mapping,
    /// Also stop the variant at every instruction boundary, deoptimize with
    /// the deopt map and resume the original there.
    deopt_steps: bool,
}

const CODE_LEN: usize = 4096;
/// Offset in the code buffer of a second exit stub, the chain target of chained cases.
const CHAIN_OFF: usize = 3072;
/// Preferred address of the scratch buffer.
const LOW_SCRATCH: u64 = 0x3b00_0000;
/// Size of the scratch buffer.
const SCRATCH_LEN: usize = 256;

#[derive(Debug)]
enum Outcome {
    Pass,
    Skipped,
    Fail(String),
}

fn flags_str(c: &Cpu) -> String {
    Flag::ALL
        .iter()
        .map(|f| format!("{}={}", f.name(), c.flag(*f) as u8))
        .collect::<Vec<_>>()
        .join(" ")
}

impl World {
    fn new() -> World {
        let buf = Mapping::anywhere(BUF_LEN);
        let mut r = Rng(0x1234_5678_9abc_def1);
        let data: Vec<u8> = (0..BUF_LEN).map(|_| r.next() as u8).collect();
        buf.write(0, &data);
        buf.protect(0, BUF_LEN, libc::PROT_READ);
        World {
            deopt_steps: false,
            // Below 2 GiB (where free): with its base register known, scratch accesses become absolute `[disp32]`
            // operands, so forwarding on absolute addresses is exercised as well as on based ones.
            scratch: Mapping::fixed(LOW_SCRATCH, SCRATCH_LEN)
                .unwrap_or_else(|| Mapping::anywhere(SCRATCH_LEN)),
            m: Machine::new(),
            code: ExecBuf::anywhere(CODE_LEN),
            variant: ExecBuf::anywhere(64 * 1024),
            buf,
        }
    }

    fn run_case(&self, case: &Case) -> Outcome {
        let s = self.code.addr();
        let bytes = assemble(&case.ops, s);
        let end = s + bytes.len() as u64;
        if bytes.len() + 14 > CHAIN_OFF {
            return Outcome::Skipped;
        }
        let mut full = vec![0xccu8; CODE_LEN];
        full[..bytes.len()].copy_from_slice(&bytes);
        let stub = self.m.exit_stub();
        full[bytes.len()..bytes.len() + stub.len()].copy_from_slice(&stub);
        full[CHAIN_OFF..CHAIN_OFF + stub.len()].copy_from_slice(&stub);
        self.code.write(0, &full);
        // Original.
        self.m.fill_stack(0xa5);
        self.scratch.write(0, &[0x5a; SCRATCH_LEN]);
        // SAFETY: generated code only branches forward inside itself, reads the constant
        // buffer via the base register, pushes/pops on the private stack, and falls through
        // to the exit stub.
        let want = unsafe { self.m.run(s, &case.input) };
        let want_stack = self.m.stack_bytes();
        let want_scratch = self.scratch.read(0, SCRATCH_LEN);
        // Specialize.
        let buf_bytes = self.buf.read(0, BUF_LEN);
        let mem = SnippetMemory::new(Addr(s), &bytes, &[(Addr(self.buf.addr), buf_bytes)])
            .expect("snippet memory");
        let req = Request {
            entry: Addr(s),
            region_start: Addr(s),
            region_end: Addr(end),
            known: case.known.clone(),
            options: {
                let mut o = case.options.clone();
                if case.chained {
                    o.chain = Some(
                        [(Addr(end), Addr(s + CHAIN_OFF as u64))]
                            .into_iter()
                            .collect(),
                    );
                }
                o
            },
        };
        let v = match specializer::specialize(&req, &mem) {
            Ok(v) => v,
            Err(specializer::SpecializeError::NoGain(_)) => return Outcome::Skipped,
            Err(e) => return Outcome::Fail(format!("specialize failed: {e}")),
        };
        let enc = match v.encode(Addr(self.variant.addr())) {
            Ok(e) => e,
            Err(e) => return Outcome::Fail(format!("encode failed: {e}")),
        };
        if enc.code.len() > 64 * 1024 {
            return Outcome::Fail(format!("variant too large: {} bytes", enc.code.len()));
        }
        let mut why = Vec::new();
        // Deopt map covers every instruction boundary.
        for off in common::reachable_boundaries(&enc.code, self.variant.addr()) {
            if !enc.deopt.iter().any(|e| e.offset as u64 == off) {
                why.push(format!("no deopt entry at variant offset {off:#x}"));
                break;
            }
        }
        self.variant.write(0, &enc.code);
        self.m.fill_stack(0xa5);
        self.scratch.write(0, &[0x5a; SCRATCH_LEN]);
        // SAFETY: the variant's exits jump into the original code or its end, which falls
        // through to the exit stub; it touches the same memory as the original.
        let got = unsafe { self.m.run(self.variant.addr(), &case.input) };
        let got_stack = self.m.stack_bytes();
        let got_scratch = self.scratch.read(0, SCRATCH_LEN);
        if want_scratch != got_scratch {
            let off = want_scratch
                .iter()
                .zip(&got_scratch)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            why.push(format!(
                "scratch memory differs at offset {off:#x}: original {:02x}, variant {:02x}",
                want_scratch[off], got_scratch[off]
            ));
        }
        let undef = undefined_flags(&case.ops);
        for g in Gpr::ALL {
            let (a, b) = (want.regs[g.index()], got.regs[g.index()]);
            if a != b {
                why.push(format!("{g}: original {a:#x}, variant {b:#x}"));
            }
        }
        for f in Flag::ALL {
            if undef & (1 << f as u32) != 0 {
                continue;
            }
            if want.flag(f) != got.flag(f) {
                why.push(format!(
                    "{}: original {}, variant {}",
                    f.name(),
                    want.flag(f) as u8,
                    got.flag(f) as u8
                ));
            }
        }
        if want_stack != got_stack {
            let off = want_stack
                .iter()
                .zip(&got_stack)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            why.push(format!("stack memory differs at stack offset {off:#x}"));
        }
        // Claimed-known values at the fall-through exit.
        // Claimed-known values: only when every exit falls through to the end (other exits
        // re-enter the original, which may then reach the end on another path), using what
        // all of them agree on.
        if !v.exits.is_empty() && v.exits.iter().all(|e| e.target == Addr(end)) {
            let mut st = v.exits[0].state.clone();
            for e in &v.exits[1..] {
                for (a, b) in st.regs.iter_mut().zip(&e.state.regs) {
                    if a != b {
                        *a = None;
                    }
                }
                for (a, b) in st.flags.iter_mut().zip(&e.state.flags) {
                    if a != b {
                        *a = None;
                    }
                }
            }
            for g in Gpr::ALL {
                if let Some(val) = st.reg(g) {
                    if val != want.regs[g.index()] {
                        why.push(format!(
                            "exit state claims {g}={val:#x}, original computed {:#x}",
                            want.regs[g.index()]
                        ));
                    }
                }
            }
            for f in Flag::ALL {
                if let Some(val) = st.flag(f) {
                    if undef & (1 << f as u32) == 0 && val != want.flag(f) {
                        why.push(format!(
                            "exit state claims {}={}, original computed {}",
                            f.name(),
                            val as u8,
                            want.flag(f) as u8
                        ));
                    }
                }
            }
        }
        if why.is_empty() && self.deopt_steps {
            self.check_deopt(
                case,
                &enc,
                undef,
                (&want, &want_stack, &want_scratch),
                &mut why,
            );
        }
        if why.is_empty() {
            Outcome::Pass
        } else {
            why.push(format!(
                "variant:\n    {}",
                common::disasm(&enc.code, self.variant.addr()).join("\n    ")
            ));
            why.push(format!("residual: {:?}", v.residual_asm()));
            why.push(format!(
                "original out flags: {}; variant out flags: {}",
                flags_str(&want),
                flags_str(&got)
            ));
            Outcome::Fail(why.join("\n  "))
        }
    }

    /// Stop the variant before its k-th instruction (k = 1, 2, ...), write the
    /// folded values of that boundary's deopt entry into the registers, resume
    /// the original at the entry's address and require the original's final state.
    fn check_deopt(
        &self,
        case: &Case,
        enc: &specializer::Encoded,
        undef: u32,
        want: (&Cpu, &Vec<u8>, &Vec<u8>),
        why: &mut Vec<String>,
    ) {
        let vb = self.variant.addr();
        let range = (vb, vb + enc.code.len() as u64);
        let also = (self.code.addr(), self.code.addr() + CODE_LEN as u64);
        for k in 1..=4096u64 {
            self.m.fill_stack(0xa5);
            self.scratch.write(0, &[0x5a; SCRATCH_LEN]);
            // SAFETY: as for the variant run; the stepping stops inside the variant and
            // continues at the epilogue.
            let (mut cpu, stopped) = unsafe { self.m.run_stepped(vb, &case.input, range, also, k) };
            let Some(rip) = stopped else { break };
            let off = rip - vb;
            let Some(e) = enc.deopt.iter().find(|e| e.offset as u64 == off) else {
                why.push(format!(
                    "deopt: the variant executes offset {off:#x}, which has no deopt entry"
                ));
                return;
            };
            for g in Gpr::ALL {
                if let Some(v) = e.state.reg(g) {
                    cpu.regs[g.index()] = v;
                }
            }
            for f in Flag::ALL {
                if let Some(v) = e.state.flag(f) {
                    cpu.set_flag(f, v);
                }
            }
            // SAFETY: resuming the original code (it ends at the exit stub).
            let got = unsafe { self.m.run(e.original.0, &cpu) };
            let mut bad = Vec::new();
            for g in Gpr::ALL {
                if got.regs[g.index()] != want.0.regs[g.index()] {
                    bad.push(format!(
                        "{g}={:#x} (want {:#x})",
                        got.regs[g.index()],
                        want.0.regs[g.index()]
                    ));
                }
            }
            for f in Flag::ALL {
                if undef & (1 << f as u32) == 0 && got.flag(f) != want.0.flag(f) {
                    bad.push(format!(
                        "{}={} (want {})",
                        f.name(),
                        got.flag(f) as u8,
                        want.0.flag(f) as u8
                    ));
                }
            }
            if self.m.stack_bytes() != *want.1 {
                bad.push("stack memory".into());
            }
            if self.scratch.read(0, SCRATCH_LEN) != *want.2 {
                bad.push("scratch memory".into());
            }
            if !bad.is_empty() {
                why.push(format!(
                    "deopt: stopped at variant offset {off:#x} (instruction {k}), resumed the original at {} with folded {}: final {}",
                    e.original,
                    specializer::snippet::state_text(&e.state),
                    bad.join(", ")
                ));
                return;
            }
        }
    }

    fn describe(&self, case: &Case) -> String {
        describe(case, self.code.addr(), self.buf.addr)
    }

    /// Greedy shrink: drop ops and forget known values while the case still fails.
    fn shrink(&self, mut case: Case) -> (Case, String) {
        let mut last = match self.run_case(&case) {
            Outcome::Fail(w) => w,
            _ => unreachable!("shrinking a passing case"),
        };
        loop {
            let mut progressed = false;
            let mut i = 0;
            while i < case.ops.len() {
                let mut c = case.clone();
                if matches!(c.ops[i], Op::Fixed(_)) {
                    i += 1;
                    continue;
                }
                let removed = c.ops.remove(i);
                if let Op::Label(l) = removed {
                    if c.ops.iter().any(|o| matches!(o, Op::Br(_, k) if *k == l)) {
                        i += 1;
                        continue;
                    }
                }
                if let Op::Br(_, l) = removed {
                    c.ops.retain(|o| !matches!(o, Op::Label(k) if *k == l));
                }
                if let Outcome::Fail(w) = self.run_case(&c) {
                    case = c;
                    last = w;
                    progressed = true;
                } else {
                    i += 1;
                }
            }
            for k in 0..16 + 7 {
                let mut c = case.clone();
                if k < 16 {
                    if c.known.regs[k].is_none() {
                        continue;
                    }
                    c.known.regs[k] = None;
                } else {
                    if c.known.flags[k - 16].is_none() {
                        continue;
                    }
                    c.known.flags[k - 16] = None;
                }
                if let Outcome::Fail(w) = self.run_case(&c) {
                    case = c;
                    last = w;
                    progressed = true;
                }
            }
            if !progressed {
                return (case, last);
            }
        }
    }
}

fn describe(case: &Case, s: u64, buf_addr: u64) -> String {
    let bytes = assemble(&case.ops, s);
    let mut out = format!("code ({} bytes): {}\n", bytes.len(), hex(&bytes));
    for l in common::disasm(&bytes, s) {
        out.push_str(&format!("    {l}\n"));
    }
    out.push_str(&format!(
        "constant buffer {:#x} in {} (index {}), scratch buffer in {}, loop counter {}\noptions: max_states_per_address {}, max_code_bytes {}, scratch_registers {}, forward_stores {}, forward_within {:?}, fall-through chained: {}\nknown: {}\ninputs:",
        buf_addr,
        case.rs.base,
        case.rs.ix,
        case.rs.sbase,
        case.rs.lc,
        case.options.max_states_per_address,
        case.options.max_code_bytes,
        case.options.scratch_registers,
        case.options.forward_stores,
        case.options.forward_within,
        case.chained,
        specializer::snippet::state_text(&case.known)
    ));
    for g in Gpr::ALL {
        out.push_str(&format!(" {g}={:#x}", case.input.regs[g.index()]));
    }
    out.push_str(&format!(" {}\n", flags_str(&case.input)));
    out
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn random_sequences_match_natively() {
    let cases = env_u64("DYNSPEC_PROP_CASES", 200_000);
    let seed = env_u64("DYNSPEC_PROP_SEED", 0x5eed_d15e_a5e5_0001);
    // Collect a few distinct minimal failures (by first symptom) before failing, so one run
    // shows several bugs.
    let max_fails = env_u64("DYNSPEC_PROP_MAX_FAILS", 5) as usize;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(4) as u64;
    let codes = code_map();
    let fails: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
    let pass = AtomicU64::new(0);
    let skipped = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    // Cases are split across threads (each with its own machine and buffers); case n is
    // generated from (seed, n) alone, so a failure reproduces with any thread count.
    std::thread::scope(|sc| {
        for t in 0..threads {
            let (codes, fails, pass, skipped, stop) =
                (codes.clone(), &fails, &pass, &skipped, &stop);
            sc.spawn(move || {
                let w = World::new();
                let mut n = t;
                // DYNSPEC_PROP_ONLY=n replays one case (as numbered in failure reports).
                let only = std::env::var("DYNSPEC_PROP_ONLY").ok().and_then(|v| v.parse::<u64>().ok());
                while n < cases && !stop.load(Ordering::Relaxed) {
                    if only.is_some_and(|o| o != n) {
                        n += threads;
                        continue;
                    }
                    let mut g = Gen::for_case(seed, n, codes.clone());
                    let case = g.case(w.m.stack_top(), w.buf.addr, w.scratch.addr);
                    let (c2, s, b) = (case.clone(), w.code.addr(), w.buf.addr);
                    common::on_crash(move || format!("property case {n}:\n{}", describe(&c2, s, b)));
                    match w.run_case(&case) {
                        Outcome::Pass => {
                            pass.fetch_add(1, Ordering::Relaxed);
                        }
                        Outcome::Skipped => {
                            skipped.fetch_add(1, Ordering::Relaxed);
                        }
                        Outcome::Fail(_) => {
                            let (small, why) = w.shrink(case);
                            let key = why
                                .lines()
                                .next()
                                .unwrap_or("")
                                .split(':')
                                .next()
                                .unwrap_or("")
                                .to_string()
                                + &small.ops.len().to_string();
                            let mut f = fails.lock().unwrap();
                            if !f.iter().any(|(k, _)| *k == key) {
                                f.push((
                                    key,
                                    format!(
                                        "property case {n} (seed {seed:#x}); minimal case:\n{}  {why}",
                                        w.describe(&small)
                                    ),
                                ));
                            }
                            if f.len() >= max_fails {
                                stop.store(true, Ordering::Relaxed);
                            }
                        }
                    }
                    n += threads;
                }
            });
        }
    });
    let fails = fails.into_inner().unwrap();
    let (pass, skipped) = (pass.into_inner(), skipped.into_inner());
    eprintln!(
        "property test: {cases} cases on {threads} threads, {pass} passed, {skipped} skipped, {} distinct failures",
        fails.len()
    );
    if !fails.is_empty() {
        panic!(
            "{} distinct property failures:\n\n{}",
            fails.len(),
            fails
                .iter()
                .map(|f| f.1.as_str())
                .collect::<Vec<_>>()
                .join("\n\n")
        );
    }
    assert!(
        pass >= cases / 2,
        "too many cases skipped: {skipped} of {cases}"
    );
}

/// The deopt map is right at every boundary the variant executes: stopping
/// there and resuming the original with the folded values gives the same
/// result as running the original.
#[test]
fn deopt_map_resumes_the_original() {
    let cases = env_u64("DYNSPEC_DEOPT_CASES", 2000);
    let seed = env_u64("DYNSPEC_PROP_SEED", 0x5eed_d15e_a5e5_0001) ^ 0xde0b;
    let codes = code_map();
    let mut w = World::new();
    w.deopt_steps = true;
    for n in 0..cases {
        let mut g = Gen::for_case(seed, n, codes.clone());
        let case = g.case(w.m.stack_top(), w.buf.addr, w.scratch.addr);
        let (c2, s, b) = (case.clone(), w.code.addr(), w.buf.addr);
        common::on_crash(move || format!("deopt case {n}:\n{}", describe(&c2, s, b)));
        if let Outcome::Fail(_) = w.run_case(&case) {
            let (small, why) = w.shrink(case);
            panic!(
                "deopt case {n} (seed {seed:#x}) fails; minimal case:\n{}  {why}",
                w.describe(&small)
            );
        }
    }
}

/// The generator itself is sane: every case assembles and runs natively.
#[test]
fn generator_cases_run_natively() {
    let w = World::new();
    let mut g = Gen::new(7, code_map());
    for _ in 0..2000 {
        let case = g.case(w.m.stack_top(), w.buf.addr, w.scratch.addr);
        let bytes = assemble(&case.ops, w.code.addr());
        assert!(!bytes.is_empty());
        let mut full = bytes.clone();
        full.extend(w.m.exit_stub());
        w.code.write(0, &full);
        // SAFETY: see run_case.
        let out = unsafe { w.m.run(w.code.addr(), &case.input) };
        let _ = out;
    }
}
