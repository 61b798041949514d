//! Per-instruction semantics: what each modelled instruction does to the abstract state, folded when known, residual otherwise.

use super::state::{flag_mask, flags_rebuildable, refine_flags, AbsState, STATUS, STATUS_FLAGS};
use super::{fits_i32, Engine, Next};
use crate::sem::{self, AluOp, Flags, ShiftOp};
use crate::{Addr, ExitReason, Flag, Gpr, SpecializeError};
use iced_x86::{Code, FlowControl, Instruction, Mnemonic, OpKind, Register};

/// Every mnemonic whose semantics is modelled exactly.
pub fn modelled_mnemonics() -> &'static [Mnemonic] {
    use Mnemonic as M;
    &[
        M::Mov,
        M::Movzx,
        M::Movsx,
        M::Movsxd,
        M::Lea,
        M::Add,
        M::Sub,
        M::Adc,
        M::Sbb,
        M::And,
        M::Or,
        M::Xor,
        M::Not,
        M::Neg,
        M::Inc,
        M::Dec,
        M::Shl,
        M::Shr,
        M::Sar,
        M::Rol,
        M::Ror,
        M::Imul,
        M::Cmp,
        M::Test,
        M::Seto,
        M::Setno,
        M::Setb,
        M::Setae,
        M::Sete,
        M::Setne,
        M::Setbe,
        M::Seta,
        M::Sets,
        M::Setns,
        M::Setp,
        M::Setnp,
        M::Setl,
        M::Setge,
        M::Setle,
        M::Setg,
        M::Cmovo,
        M::Cmovno,
        M::Cmovb,
        M::Cmovae,
        M::Cmove,
        M::Cmovne,
        M::Cmovbe,
        M::Cmova,
        M::Cmovs,
        M::Cmovns,
        M::Cmovp,
        M::Cmovnp,
        M::Cmovl,
        M::Cmovge,
        M::Cmovle,
        M::Cmovg,
        M::Jo,
        M::Jno,
        M::Jb,
        M::Jae,
        M::Je,
        M::Jne,
        M::Jbe,
        M::Ja,
        M::Js,
        M::Jns,
        M::Jp,
        M::Jnp,
        M::Jl,
        M::Jge,
        M::Jle,
        M::Jg,
        M::Jmp,
        M::Call,
        M::Ret,
        M::Push,
        M::Pop,
        M::Nop,
        M::Endbr64,
    ]
}

fn is_setcc(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Seto
            | M::Setno
            | M::Setb
            | M::Setae
            | M::Sete
            | M::Setne
            | M::Setbe
            | M::Seta
            | M::Sets
            | M::Setns
            | M::Setp
            | M::Setnp
            | M::Setl
            | M::Setge
            | M::Setle
            | M::Setg
    )
}

/// The near conditional jump taken exactly when a `cmovcc`/`jcc` with condition `cc` moves/jumps.
fn jcc_of(cc: iced_x86::ConditionCode) -> Option<Code> {
    use iced_x86::ConditionCode as C;
    Some(match cc {
        C::o => Code::Jo_rel32_64,
        C::no => Code::Jno_rel32_64,
        C::b => Code::Jb_rel32_64,
        C::ae => Code::Jae_rel32_64,
        C::e => Code::Je_rel32_64,
        C::ne => Code::Jne_rel32_64,
        C::be => Code::Jbe_rel32_64,
        C::a => Code::Ja_rel32_64,
        C::s => Code::Js_rel32_64,
        C::ns => Code::Jns_rel32_64,
        C::p => Code::Jp_rel32_64,
        C::np => Code::Jnp_rel32_64,
        C::l => Code::Jl_rel32_64,
        C::ge => Code::Jge_rel32_64,
        C::le => Code::Jle_rel32_64,
        C::g => Code::Jg_rel32_64,
        C::None => return None,
    })
}

fn is_cmovcc(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Cmovo
            | M::Cmovno
            | M::Cmovb
            | M::Cmovae
            | M::Cmove
            | M::Cmovne
            | M::Cmovbe
            | M::Cmova
            | M::Cmovs
            | M::Cmovns
            | M::Cmovp
            | M::Cmovnp
            | M::Cmovl
            | M::Cmovge
            | M::Cmovle
            | M::Cmovg
    )
}

impl Engine<'_> {
    pub(super) fn step(&mut self, ip: Addr, st: &mut AbsState) -> Result<Next, SpecializeError> {
        use Mnemonic as M;
        let Some(ins) = self.decode(ip) else {
            self.exit(ip, ExitReason::Unsupported, st)?;
            return Ok(Next::Stop);
        };
        let next = Addr(ins.next_ip());
        let mnem = ins.mnemonic();
        let plain = Self::plain(&ins);
        match mnem {
            M::Nop | M::Endbr64 | M::Endbr32 => {
                self.stats.folded += 1;
            }
            M::Mov | M::Movzx | M::Movsx | M::Movsxd if plain => self.do_mov(ip, &ins, st)?,
            M::Lea if plain => {
                let r = ins.op_register(0);
                let bits = r.size() as u32 * 8;
                let v = Self::mem_addr(st, &ins).map(|a| a & sem::mask(bits));
                self.conclude(ip, &ins, st, &[(r, v)], false, None)?;
            }
            M::Add | M::Sub | M::Adc | M::Sbb | M::And | M::Or | M::Xor | M::Cmp | M::Test
                if plain =>
            {
                self.do_alu(ip, &ins, st)?
            }
            M::Not | M::Neg | M::Inc | M::Dec if plain => self.do_unary(ip, &ins, st)?,
            M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror if plain => {
                self.do_shift(ip, &ins, st)?
            }
            M::Imul if plain => self.do_imul(ip, &ins, st)?,
            m if is_setcc(m) && plain => self.do_setcc(ip, &ins, st)?,
            m if is_cmovcc(m) && plain => self.do_cmov(ip, &ins, st)?,
            _ if ins.is_jcc_short_or_near() => {
                let taken = Addr(ins.near_branch_target());
                match sem::condition(ins.condition_code(), &st.flags) {
                    Some(true) => {
                        self.stats.folded += 1;
                        self.stats.folded_branches += 1;
                        return Ok(Next::Continue(taken));
                    }
                    Some(false) => {
                        self.stats.folded += 1;
                        self.stats.folded_branches += 1;
                    }
                    None => {
                        let reads = flag_mask(ins.rflags_read());
                        if !st.fmat {
                            let live = self.live_flags(ip) | reads;
                            self.mat_flags(live, ip, st)?;
                        }
                        // Each edge knows the outcome of the condition.
                        let mut on_taken = st.clone();
                        refine_flags(ins.condition_code(), true, &mut on_taken);
                        let l = self.label_for(taken, &on_taken);
                        let mut j = ins;
                        j.set_near_branch64(Self::label_ip(l));
                        // Use the near form; the block encoder picks the shortest.
                        self.emit(j, ip, st);
                        refine_flags(ins.condition_code(), false, st);
                    }
                }
            }
            M::Jmp => match ins.op0_kind() {
                OpKind::NearBranch64 => {
                    self.stats.folded += 1;
                    return Ok(Next::Continue(Addr(ins.near_branch_target())));
                }
                OpKind::Register | OpKind::Memory if plain => {
                    let v = self.op_val(st, &ins, 0, 64);
                    if let Some(t) = v {
                        self.stats.folded += 1;
                        self.stats.folded_branches += 1;
                        return Ok(Next::Continue(Addr(t)));
                    }
                    self.exit(ip, ExitReason::UnknownTarget, st)?;
                    return Ok(Next::Stop);
                }
                _ => {
                    self.exit(ip, ExitReason::Unsupported, st)?;
                    return Ok(Next::Stop);
                }
            },
            M::Call => {
                let target = match ins.op0_kind() {
                    OpKind::NearBranch64 => Some(ins.near_branch_target()),
                    OpKind::Register | OpKind::Memory if plain => self.op_val(st, &ins, 0, 64),
                    _ => {
                        self.exit(ip, ExitReason::Unsupported, st)?;
                        return Ok(Next::Stop);
                    }
                };
                match target {
                    Some(t) => {
                        let live = self.live_flags(Addr(t));
                        self.mat_flags(live, ip, st)?;
                        self.mat_all_regs(ip, st);
                        let c = Instruction::with_branch(Code::Call_rel32_64, t)
                            .map_err(|e| SpecializeError::Encode(e.to_string()))?;
                        self.emit(c, ip, st);
                    }
                    None => {
                        self.mat_flags(STATUS, ip, st)?;
                        self.mat_all_regs(ip, st);
                        let out = Self::rewrite(st, &ins);
                        self.emit(out, ip, st);
                    }
                }
                // Do not trust the ABI: the callee may change anything.
                st.all_unknown();
            }
            M::Ret => {
                self.mat_flags(STATUS, ip, st)?;
                self.mat_all_regs(ip, st);
                self.emit(ins, ip, st);
                return Ok(Next::Stop);
            }
            M::Push | M::Pop if plain => {
                // Stack writes are never folded; rsp itself is tracked when known.
                let rsp = st.get(Gpr::Rsp);
                let bytes = if ins.op_count() == 1 && ins.op_kind(0) == OpKind::Register {
                    ins.op_register(0).size() as u64
                } else if ins.op_count() == 1 && ins.op_kind(0) == OpKind::Memory {
                    ins.memory_size().size() as u64
                } else {
                    8
                };
                self.residual(ip, &ins, st)?;
                if let Some(sp) = rsp {
                    let nsp = if mnem == M::Push {
                        sp.wrapping_sub(bytes)
                    } else {
                        sp.wrapping_add(bytes)
                    };
                    // pop rsp loads rsp from the stack.
                    let pops_rsp = mnem == M::Pop
                        && ins.op_kind(0) == OpKind::Register
                        && Gpr::containing(ins.op_register(0)) == Some(Gpr::Rsp);
                    if !pops_rsp {
                        st.set(Gpr::Rsp, Some(nsp), true);
                    }
                }
            }
            _ => match ins.flow_control() {
                FlowControl::Next => self.residual(ip, &ins, st)?,
                _ => {
                    self.exit(ip, ExitReason::Unsupported, st)?;
                    return Ok(Next::Stop);
                }
            },
        }
        Ok(Next::Continue(next))
    }

    fn do_mov(
        &mut self,
        ip: Addr,
        ins: &Instruction,
        st: &mut AbsState,
    ) -> Result<(), SpecializeError> {
        use Mnemonic as M;
        if ins.op_kind(0) != OpKind::Register {
            // A store: always residual.
            return self.residual(ip, ins, st);
        }
        let dst = ins.op_register(0);
        let dbits = dst.size() as u32 * 8;
        let sbits = Self::op_bits(ins, 1).min(64);
        let src = self.op_val(st, ins, 1, sbits);
        let v = src.map(|s| match ins.mnemonic() {
            M::Movsx | M::Movsxd => sem::sext(s, sbits) & sem::mask(dbits),
            _ => s & sem::mask(dbits),
        });
        self.conclude(ip, ins, st, &[(dst, v)], false, None)
    }

    fn do_alu(
        &mut self,
        ip: Addr,
        ins: &Instruction,
        st: &mut AbsState,
    ) -> Result<(), SpecializeError> {
        use Mnemonic as M;
        let mnem = ins.mnemonic();
        let bits = Self::op_bits(ins, 0);
        let same_reg = ins.op_kind(0) == OpKind::Register
            && ins.op_kind(1) == OpKind::Register
            && ins.op_register(0) == ins.op_register(1);
        let (mut a, mut b) = (self.op_val(st, ins, 0, bits), self.op_val(st, ins, 1, bits));
        if same_reg && matches!(mnem, M::Xor | M::Sub) {
            // xor r,r / sub r,r: zero whatever r holds.
            a = Some(0);
            b = Some(0);
        }
        let cf = st.flags[Flag::Cf as usize];
        let op = match mnem {
            M::Add => AluOp::Add,
            M::Adc => AluOp::Adc,
            M::Sub | M::Cmp => AluOp::Sub,
            M::Sbb => AluOp::Sbb,
            M::And | M::Test => AluOp::And,
            M::Or => AluOp::Or,
            _ => AluOp::Xor,
        };
        let needs_cf = matches!(op, AluOp::Adc | AluOp::Sbb);
        let res = match (a, b) {
            (Some(a), Some(b)) if !needs_cf || cf.is_some() => {
                Some(sem::alu(op, a, b, cf.unwrap_or(false), bits, &st.flags))
            }
            _ => None,
        };
        let written = STATUS;
        let has_dest = !matches!(mnem, M::Cmp | M::Test);
        let dest_is_mem = has_dest && ins.op_kind(0) == OpKind::Memory;
        let dests: Vec<(Register, Option<u64>)> = if has_dest && !dest_is_mem {
            vec![(ins.op_register(0), res.map(|r| r.0))]
        } else {
            vec![]
        };
        self.conclude(
            ip,
            ins,
            st,
            &dests,
            dest_is_mem,
            Some((res.map(|r| r.1), written)),
        )
    }

    fn do_unary(
        &mut self,
        ip: Addr,
        ins: &Instruction,
        st: &mut AbsState,
    ) -> Result<(), SpecializeError> {
        use Mnemonic as M;
        let bits = Self::op_bits(ins, 0);
        let a = self.op_val(st, ins, 0, bits);
        let dest_is_mem = ins.op_kind(0) == OpKind::Memory;
        let (v, flags_out) = match ins.mnemonic() {
            M::Not => (a.map(|a| !a & sem::mask(bits)), None),
            M::Neg => {
                let r = a.map(|a| sem::neg(a, bits, &st.flags));
                (r.map(|r| r.0), Some((r.map(|r| r.1), STATUS)))
            }
            m => {
                let r = a.map(|a| sem::inc_dec(m == M::Dec, a, bits, &st.flags));
                let written = STATUS & !(1 << Flag::Cf as u8);
                (r.map(|r| r.0), Some((r.map(|r| r.1), written)))
            }
        };
        let dests: Vec<(Register, Option<u64>)> = if dest_is_mem {
            vec![]
        } else {
            vec![(ins.op_register(0), v)]
        };
        self.conclude(ip, ins, st, &dests, dest_is_mem, flags_out)
    }

    fn do_shift(
        &mut self,
        ip: Addr,
        ins: &Instruction,
        st: &mut AbsState,
    ) -> Result<(), SpecializeError> {
        use Mnemonic as M;
        let bits = Self::op_bits(ins, 0);
        let count = self.op_val(st, ins, 1, 8);
        let cmask = if bits == 64 { 63 } else { 31 };
        if let Some(c) = count {
            if c & cmask == 0 {
                // A zero count changes no flag; a 32-bit register destination
                // is still zero-extended.
                if bits == 32 && ins.op_kind(0) == OpKind::Register {
                    let r = ins.op_register(0);
                    let v = Self::reg_val(st, r);
                    return match v {
                        Some(v) => {
                            Self::write_reg(st, r, Some(v), false);
                            self.stats.folded += 1;
                            st.normalize();
                            Ok(())
                        }
                        None => {
                            let n = Instruction::with2(Code::Mov_r32_rm32, r, r)
                                .map_err(|e| SpecializeError::Encode(e.to_string()))?;
                            self.residual_exact(ip, &n, st)
                        }
                    };
                }
                self.stats.folded += 1;
                return Ok(());
            }
        }
        let op = match ins.mnemonic() {
            M::Shl | M::Sal => ShiftOp::Shl,
            M::Shr => ShiftOp::Shr,
            M::Sar => ShiftOp::Sar,
            M::Rol => ShiftOp::Rol,
            _ => ShiftOp::Ror,
        };
        let a = self.op_val(st, ins, 0, bits);
        let dest_is_mem = ins.op_kind(0) == OpKind::Memory;
        let written = match op {
            ShiftOp::Rol | ShiftOp::Ror => (1 << Flag::Cf as u8) | (1 << Flag::Of as u8),
            _ => STATUS,
        };
        let res = match (a, count) {
            (Some(a), Some(c)) => Some(sem::shift(op, a, c, bits, &st.flags)),
            _ => None,
        };
        if res.is_none() && count.is_some() && ins.op_kind(1) == OpKind::Register {
            // Known count in cl: shift by an immediate instead.
            if let Some(n) = Self::shift_imm(ins, count.unwrap_or(0) as u8) {
                return self.residual(ip, &n, st);
            }
        }
        let dests: Vec<(Register, Option<u64>)> = if dest_is_mem {
            vec![]
        } else {
            vec![(ins.op_register(0), res.map(|r| r.0))]
        };
        self.conclude(
            ip,
            ins,
            st,
            &dests,
            dest_is_mem,
            Some((res.map(|r| r.1), written)),
        )
    }

    fn shift_imm(ins: &Instruction, c: u8) -> Option<Instruction> {
        use Mnemonic as M;
        let size = match ins.op_kind(0) {
            OpKind::Register => ins.op_register(0).size(),
            _ => ins.memory_size().size(),
        };
        let code = match (ins.mnemonic(), size) {
            (M::Shl | M::Sal, 1) => Code::Shl_rm8_imm8,
            (M::Shl | M::Sal, 2) => Code::Shl_rm16_imm8,
            (M::Shl | M::Sal, 4) => Code::Shl_rm32_imm8,
            (M::Shl | M::Sal, 8) => Code::Shl_rm64_imm8,
            (M::Shr, 1) => Code::Shr_rm8_imm8,
            (M::Shr, 2) => Code::Shr_rm16_imm8,
            (M::Shr, 4) => Code::Shr_rm32_imm8,
            (M::Shr, 8) => Code::Shr_rm64_imm8,
            (M::Sar, 1) => Code::Sar_rm8_imm8,
            (M::Sar, 2) => Code::Sar_rm16_imm8,
            (M::Sar, 4) => Code::Sar_rm32_imm8,
            (M::Sar, 8) => Code::Sar_rm64_imm8,
            (M::Rol, 1) => Code::Rol_rm8_imm8,
            (M::Rol, 2) => Code::Rol_rm16_imm8,
            (M::Rol, 4) => Code::Rol_rm32_imm8,
            (M::Rol, 8) => Code::Rol_rm64_imm8,
            (M::Ror, 1) => Code::Ror_rm8_imm8,
            (M::Ror, 2) => Code::Ror_rm16_imm8,
            (M::Ror, 4) => Code::Ror_rm32_imm8,
            (M::Ror, 8) => Code::Ror_rm64_imm8,
            _ => return None,
        };
        let mut n = *ins;
        n.set_code(code);
        n.set_op1_kind(OpKind::Immediate8);
        n.set_immediate8(c);
        Some(n)
    }

    fn do_imul(
        &mut self,
        ip: Addr,
        ins: &Instruction,
        st: &mut AbsState,
    ) -> Result<(), SpecializeError> {
        match ins.op_count() {
            1 => {
                let bits = Self::op_bits(ins, 0);
                let src = self.op_val(st, ins, 0, bits);
                let acc = Self::reg_val(st, Register::RAX).map(|v| v & sem::mask(bits));
                let r = match (src, acc) {
                    (Some(s), Some(a)) => Some(sem::imul(a, s, bits, &st.flags)),
                    _ => None,
                };
                let dests: Vec<(Register, Option<u64>)> = match bits {
                    8 => vec![(Register::AX, r.map(|r| (r.0 | (r.1 << 8)) & 0xffff))],
                    16 => vec![
                        (Register::AX, r.map(|r| r.0)),
                        (Register::DX, r.map(|r| r.1)),
                    ],
                    32 => vec![
                        (Register::EAX, r.map(|r| r.0)),
                        (Register::EDX, r.map(|r| r.1)),
                    ],
                    _ => vec![
                        (Register::RAX, r.map(|r| r.0)),
                        (Register::RDX, r.map(|r| r.1)),
                    ],
                };
                self.conclude(ip, ins, st, &dests, false, Some((r.map(|r| r.2), STATUS)))
            }
            2 | 3 => {
                let dst = ins.op_register(0);
                let bits = dst.size() as u32 * 8;
                let (a, b) = if ins.op_count() == 2 {
                    (self.op_val(st, ins, 0, bits), self.op_val(st, ins, 1, bits))
                } else {
                    (self.op_val(st, ins, 1, bits), self.op_val(st, ins, 2, bits))
                };
                let r = match (a, b) {
                    (Some(a), Some(b)) => Some(sem::imul(a, b, bits, &st.flags)),
                    _ => None,
                };
                if r.is_none()
                    && ins.op_count() == 2
                    && ins.op_kind(1) == OpKind::Register
                    && bits >= 16
                {
                    // imul r, r_known -> imul r, r, imm
                    if let Some(bv) = b {
                        let code = match bits {
                            16 => Some(Code::Imul_r16_rm16_imm16),
                            32 => Some(Code::Imul_r32_rm32_imm32),
                            _ if fits_i32(bv as i64) => Some(Code::Imul_r64_rm64_imm32),
                            _ => None,
                        };
                        if let Some(code) = code {
                            let n = match bits {
                                16 => Instruction::with3(code, dst, dst, bv as u32),
                                32 => Instruction::with3(code, dst, dst, bv as u32),
                                _ => Instruction::with3(code, dst, dst, bv as i64 as i32),
                            };
                            if let Ok(n) = n {
                                return self.residual(ip, &n, st);
                            }
                        }
                    }
                }
                self.conclude(
                    ip,
                    ins,
                    st,
                    &[(dst, r.map(|r| r.0))],
                    false,
                    Some((r.map(|r| r.2), STATUS)),
                )
            }
            _ => self.residual(ip, ins, st),
        }
    }

    fn do_setcc(
        &mut self,
        ip: Addr,
        ins: &Instruction,
        st: &mut AbsState,
    ) -> Result<(), SpecializeError> {
        let Some(c) = sem::condition(ins.condition_code(), &st.flags) else {
            return self.residual(ip, ins, st);
        };
        let v = c as u64;
        if ins.op_kind(0) == OpKind::Register {
            let r = ins.op_register(0);
            if Self::write_known_possible(st, r) {
                Self::write_reg(st, r, Some(v), false);
                self.stats.folded += 1;
                st.normalize();
                return Ok(());
            }
            let n = Instruction::with2(Code::Mov_r8_imm8, r, v as u32)
                .map_err(|e| SpecializeError::Encode(e.to_string()))?;
            return self.residual_exact(ip, &n, st);
        }
        let mut n = *ins;
        n.set_code(Code::Mov_rm8_imm8);
        n.set_op1_kind(OpKind::Immediate8);
        n.set_immediate8(v as u8);
        self.residual(ip, &n, st)
    }

    fn do_cmov(
        &mut self,
        ip: Addr,
        ins: &Instruction,
        st: &mut AbsState,
    ) -> Result<(), SpecializeError> {
        let Some(c) = sem::condition(ins.condition_code(), &st.flags) else {
            if self.split_cmov(ip, ins, st)? {
                return Ok(());
            }
            return self.residual(ip, ins, st);
        };
        let dst = ins.op_register(0);
        let bits = dst.size() as u32 * 8;
        if c {
            let src = self.op_val(st, ins, 1, bits);
            if let Some(v) = src {
                if Self::write_known_possible(st, dst) {
                    Self::write_reg(st, dst, Some(v), false);
                    self.stats.folded += 1;
                    st.normalize();
                    return Ok(());
                }
            }
            let code = match bits {
                16 => Code::Mov_r16_rm16,
                32 => Code::Mov_r32_rm32,
                _ => Code::Mov_r64_rm64,
            };
            let mut n = *ins;
            n.set_code(code);
            return self.residual(ip, &n, st);
        }
        if bits == 32 {
            // A false 32-bit cmov still zero-extends its destination.
            if let Some(v) = Self::reg_val(st, dst) {
                Self::write_reg(st, dst, Some(v), false);
                self.stats.folded += 1;
                st.normalize();
                return Ok(());
            }
            let n = Instruction::with2(Code::Mov_r32_rm32, dst, dst)
                .map_err(|e| SpecializeError::Encode(e.to_string()))?;
            return self.residual_exact(ip, &n, st);
        }
        self.stats.folded += 1;
        Ok(())
    }

    /// A `cmovcc` whose condition is unknown but whose two outcomes are known pointers into constant memory
    /// becomes a conditional jump, each path going on with its own value: an interpreter's bytecode branch
    /// compiled without a jump (gforth's `(loop)`: the next pc is one of two known addresses), after which each
    /// path can follow its own bytecode. A select between other values stays a cmov: a data-dependent select is
    /// cheaper than a branch that may mispredict. Returns whether it was split.
    fn split_cmov(
        &mut self,
        ip: Addr,
        ins: &Instruction,
        st: &mut AbsState,
    ) -> Result<bool, SpecializeError> {
        let dst = ins.op_register(0);
        let bits = dst.size() as u32 * 8;
        if bits < 32 {
            return Ok(false);
        }
        let (Some(old), Some(new)) = (Self::reg_val(st, dst), self.op_val(st, ins, 1, bits)) else {
            return Ok(false);
        };
        let points_to_constant = |v: u64| self.mem.is_constant(Addr(v).page());
        if old == new || !points_to_constant(old) || !points_to_constant(new) {
            return Ok(false);
        }
        let Some(code) = jcc_of(ins.condition_code()) else {
            return Ok(false);
        };
        if !st.fmat {
            let live = self.live_flags(ip) | flag_mask(ins.rflags_read());
            self.mat_flags(live, ip, st)?;
        }
        let next = Addr(ins.next_ip());
        let mut moved = st.clone();
        refine_flags(ins.condition_code(), true, &mut moved);
        Self::write_reg(&mut moved, dst, Some(new), false);
        moved.normalize();
        let l = self.label_for(next, &moved);
        let j = Instruction::with_branch(code, Self::label_ip(l))
            .map_err(|e| SpecializeError::Encode(e.to_string()))?;
        self.emit(j, ip, st);
        refine_flags(ins.condition_code(), false, st);
        // Not moved: the destination keeps its value (a 32-bit one zero-extended, `old` is already).
        Self::write_reg(st, dst, Some(old), false);
        st.normalize();
        Ok(true)
    }

    /// Whether a folded instruction's result derives only from constant
    /// memory and static registers (see [`AbsState::stat`]).
    fn inputs_static(st: &AbsState, ins: &Instruction) -> bool {
        use Mnemonic as M;
        let mnem = ins.mnemonic();
        let reads_mem =
            mnem != M::Lea && (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Memory);
        if reads_mem {
            return true;
        }
        let write_only0 = matches!(mnem, M::Mov | M::Movzx | M::Movsx | M::Movsxd | M::Lea)
            || (mnem == M::Imul && ins.op_count() == 3);
        let mut regs: Vec<Register> = Vec::new();
        for i in 0..ins.op_count() {
            match ins.op_kind(i) {
                OpKind::Register if !(i == 0 && write_only0) => regs.push(ins.op_register(i)),
                OpKind::Memory => {
                    regs.push(ins.memory_base());
                    regs.push(ins.memory_index());
                }
                _ => {}
            }
        }
        if ins.op_count() == 2
            && ins.op_kind(0) == OpKind::Register
            && ins.op_kind(1) == OpKind::Register
            && ins.op_register(0) == ins.op_register(1)
            && matches!(mnem, M::Xor | M::Sub)
        {
            return false;
        }
        let gprs: Vec<Gpr> = regs.into_iter().filter_map(Gpr::containing).collect();
        !gprs.is_empty() && gprs.iter().all(|g| st.stat & (1 << g.index()) != 0)
    }

    /// Fold the instruction when everything is known and the result can be
    /// rebuilt later, else emit it residually and keep what is computable.
    #[allow(clippy::too_many_arguments)]
    fn conclude(
        &mut self,
        ip: Addr,
        ins: &Instruction,
        st: &mut AbsState,
        dests: &[(Register, Option<u64>)],
        dest_is_mem: bool,
        flags_out: Option<(Option<Flags>, u8)>,
    ) -> Result<(), SpecializeError> {
        let next = Addr(ins.next_ip());
        let mut fold = !dest_is_mem
            && dests
                .iter()
                .all(|(r, v)| v.is_some() && Self::write_known_possible(st, *r));
        if let Some((nf, written)) = flags_out {
            match nf {
                None => fold = false,
                Some(nf) if fold => {
                    let live = self.live_flags(next);
                    let preserved = STATUS & !written;
                    if st.fmat {
                        for f in STATUS_FLAGS {
                            let b = 1 << f as u8;
                            if preserved & b != 0 && live & b != 0 && st.flags[f as usize].is_none()
                            {
                                fold = false;
                            }
                        }
                    }
                    // A flag left undefined has a CPU-specific value we cannot
                    // rebuild: fold only if nothing can read it.
                    for f in STATUS_FLAGS {
                        let b = 1 << f as u8;
                        if written & b != 0 && live & b != 0 && nf[f as usize].is_none() {
                            fold = false;
                        }
                    }
                    let mut want = [None; 7];
                    for f in STATUS_FLAGS {
                        if live & (1 << f as u8) != 0 {
                            want[f as usize] = nf[f as usize];
                        }
                    }
                    if !flags_rebuildable(&want) {
                        fold = false;
                    }
                }
                _ => {}
            }
        }
        if fold {
            let stat = Self::inputs_static(st, ins);
            for (r, v) in dests {
                Self::write_reg(st, *r, *v, false);
                if stat {
                    if let Some(g) = Gpr::containing(*r) {
                        st.stat |= 1 << g.index();
                    }
                }
            }
            if let Some((Some(nf), _)) = flags_out {
                let old = st.flags;
                st.flags = nf;
                st.flags[Flag::Df as usize] = old[Flag::Df as usize];
                st.fmat = false;
            }
            self.stats.folded += 1;
            if (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Memory)
                && ins.mnemonic() != Mnemonic::Lea
            {
                self.stats.folded_loads += 1;
            }
            st.normalize();
            return Ok(());
        }
        // The residual instruction computes what we computed: keep it known
        // (merging sub-registers against the values before it runs).
        let mut after = st.clone();
        let mut full: Vec<(Gpr, Option<u64>)> = Vec::new();
        for (r, v) in dests {
            if v.is_some() && Self::write_known_possible(&after, *r) {
                Self::write_reg(&mut after, *r, *v, true);
                if let Some(g) = Gpr::containing(*r) {
                    full.push((g, after.get(g)));
                }
            }
        }
        self.residual(ip, ins, st)?;
        for (g, v) in full {
            st.set(g, v, true);
        }
        if let Some((Some(nf), written)) = flags_out {
            for f in STATUS_FLAGS {
                if written & (1 << f as u8) != 0 {
                    st.flags[f as usize] = nf[f as usize];
                }
            }
        }
        st.normalize();
        Ok(())
    }
}
