//! Residual emission: rewriting known operands into immediates and displacements, then emitting an instruction and forgetting what it writes.

use super::state::{flag_mask, AbsState, STATUS, STATUS_FLAGS};
use super::{fits_i32, Engine};
use crate::{analysis, Addr, Flag, Gpr, KnownState, SpecializeError};
use iced_x86::{Code, Instruction, Mnemonic, OpAccess, OpKind, Register};

impl Engine<'_> {
    /// Rewrite known address parts and known register sources into
    /// displacements and immediates where encodable.
    pub(super) fn rewrite(st: &AbsState, ins: &Instruction) -> Instruction {
        use Mnemonic as M;
        let mut out = *ins;
        let has_mem = (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Memory);
        let mnem = ins.mnemonic();
        if has_mem
            && !matches!(mnem, M::Bndldx | M::Bndstx)
            && !ins.memory_index().is_vector_register()
            && ins.memory_base() != Register::RIP
        {
            let base = ins.memory_base();
            let index = ins.memory_index();
            let ok64 = |r: Register| r == Register::None || (r.is_gpr() && r.size() == 8);
            if ok64(base) && ok64(index) {
                let bv = if base != Register::None {
                    Self::reg_val(st, base)
                } else {
                    None
                };
                let iv = if index != Register::None {
                    Self::reg_val(st, index)
                } else {
                    None
                };
                let disp = ins.memory_displacement64() as i64;
                let scale = ins.memory_index_scale() as i64;
                let tries: [(bool, bool); 3] = [(true, true), (false, true), (true, false)];
                for (fb, fi) in tries {
                    let fold_b = fb && bv.is_some();
                    let fold_i = fi && iv.is_some();
                    if !fold_b && !fold_i {
                        continue;
                    }
                    let mut d = disp;
                    if fold_b {
                        d = d.wrapping_add(bv.unwrap_or(0) as i64);
                    }
                    if fold_i {
                        d = d.wrapping_add((iv.unwrap_or(0) as i64).wrapping_mul(scale));
                    }
                    if !fits_i32(d) {
                        continue;
                    }
                    let nb = if fold_b { Register::None } else { base };
                    let ni = if fold_i { Register::None } else { index };
                    // rsp cannot be an index; fold only into valid forms.
                    out.set_memory_base(nb);
                    out.set_memory_index(ni);
                    if ni == Register::None {
                        out.set_memory_index_scale(1);
                    }
                    out.set_memory_displacement64(d as u64);
                    // iced: 8 means a 32-bit displacement with 64-bit
                    // addressing; 0 is only valid for a zero displacement.
                    out.set_memory_displ_size(if nb == Register::None {
                        8
                    } else if d == 0 {
                        0
                    } else if d as i8 as i64 == d {
                        1
                    } else {
                        8
                    });
                    break;
                }
            }
        }
        // Register source -> immediate.
        if ins.op_count() == 2 && ins.op_kind(1) == OpKind::Register && ins.op_register(1).is_gpr()
        {
            let src = ins.op_register(1);
            if let Some(v) = Self::reg_val(st, src) {
                let bits = src.size() as u32 * 8;
                let dst_is_reg = ins.op_kind(0) == OpKind::Register;
                let code = match (mnem, src.size()) {
                    (M::Add, 1) => Some(Code::Add_rm8_imm8),
                    (M::Add, 2) => Some(Code::Add_rm16_imm16),
                    (M::Add, 4) => Some(Code::Add_rm32_imm32),
                    (M::Add, 8) => Some(Code::Add_rm64_imm32),
                    (M::Sub, 1) => Some(Code::Sub_rm8_imm8),
                    (M::Sub, 2) => Some(Code::Sub_rm16_imm16),
                    (M::Sub, 4) => Some(Code::Sub_rm32_imm32),
                    (M::Sub, 8) => Some(Code::Sub_rm64_imm32),
                    (M::And, 1) => Some(Code::And_rm8_imm8),
                    (M::And, 2) => Some(Code::And_rm16_imm16),
                    (M::And, 4) => Some(Code::And_rm32_imm32),
                    (M::And, 8) => Some(Code::And_rm64_imm32),
                    (M::Or, 1) => Some(Code::Or_rm8_imm8),
                    (M::Or, 2) => Some(Code::Or_rm16_imm16),
                    (M::Or, 4) => Some(Code::Or_rm32_imm32),
                    (M::Or, 8) => Some(Code::Or_rm64_imm32),
                    (M::Xor, 1) => Some(Code::Xor_rm8_imm8),
                    (M::Xor, 2) => Some(Code::Xor_rm16_imm16),
                    (M::Xor, 4) => Some(Code::Xor_rm32_imm32),
                    (M::Xor, 8) => Some(Code::Xor_rm64_imm32),
                    (M::Adc, 1) => Some(Code::Adc_rm8_imm8),
                    (M::Adc, 2) => Some(Code::Adc_rm16_imm16),
                    (M::Adc, 4) => Some(Code::Adc_rm32_imm32),
                    (M::Adc, 8) => Some(Code::Adc_rm64_imm32),
                    (M::Sbb, 1) => Some(Code::Sbb_rm8_imm8),
                    (M::Sbb, 2) => Some(Code::Sbb_rm16_imm16),
                    (M::Sbb, 4) => Some(Code::Sbb_rm32_imm32),
                    (M::Sbb, 8) => Some(Code::Sbb_rm64_imm32),
                    (M::Cmp, 1) => Some(Code::Cmp_rm8_imm8),
                    (M::Cmp, 2) => Some(Code::Cmp_rm16_imm16),
                    (M::Cmp, 4) => Some(Code::Cmp_rm32_imm32),
                    (M::Cmp, 8) => Some(Code::Cmp_rm64_imm32),
                    (M::Test, 1) => Some(Code::Test_rm8_imm8),
                    (M::Test, 2) => Some(Code::Test_rm16_imm16),
                    (M::Test, 4) => Some(Code::Test_rm32_imm32),
                    (M::Test, 8) => Some(Code::Test_rm64_imm32),
                    (M::Mov, 1) if dst_is_reg => Some(Code::Mov_r8_imm8),
                    (M::Mov, 2) if dst_is_reg => Some(Code::Mov_r16_imm16),
                    (M::Mov, 4) if dst_is_reg => Some(Code::Mov_r32_imm32),
                    (M::Mov, 8) if dst_is_reg => Some(Code::Mov_r64_imm64),
                    (M::Mov, 1) => Some(Code::Mov_rm8_imm8),
                    (M::Mov, 2) => Some(Code::Mov_rm16_imm16),
                    (M::Mov, 4) => Some(Code::Mov_rm32_imm32),
                    (M::Mov, 8) => Some(Code::Mov_rm64_imm32),
                    _ => None,
                };
                // `test r/m, r` is symmetric in iced's operand order; the
                // destination being a high-byte register with REX is not an issue
                // for imm forms. imm32 forms of 64-bit ops sign-extend.
                if let Some(code) = code {
                    let kind = match bits {
                        8 => Some(OpKind::Immediate8),
                        16 => Some(OpKind::Immediate16),
                        32 => Some(OpKind::Immediate32),
                        _ if code == Code::Mov_r64_imm64 => Some(OpKind::Immediate64),
                        _ if fits_i32(v as i64) => Some(OpKind::Immediate32to64),
                        _ => None,
                    };
                    // A memory destination must not use a register we are
                    // replacing (it stays as is; only op1 changes).
                    if let Some(kind) = kind {
                        let mut n = out;
                        n.set_code(code);
                        n.set_op1_kind(kind);
                        match kind {
                            OpKind::Immediate8 => n.set_immediate8(v as u8),
                            OpKind::Immediate16 => n.set_immediate16(v as u16),
                            OpKind::Immediate32 => n.set_immediate32(v as u32),
                            OpKind::Immediate64 => n.set_immediate64(v),
                            _ => n.set_immediate32to64(v as i64),
                        }
                        out = n;
                    }
                }
            }
        }
        if mnem == M::Push && ins.op_count() == 1 && ins.op_kind(0) == OpKind::Register {
            let r = ins.op_register(0);
            if r.size() == 8 {
                if let Some(v) = Self::reg_val(st, r) {
                    if fits_i32(v as i64) {
                        if let Ok(n) = Instruction::with1(Code::Pushq_imm32, v as i64 as i32) {
                            out = n;
                        }
                    }
                }
            }
        }
        out
    }

    /// Emit `ins` (rewritten) as residual code: materialize what it reads,
    /// then forget what it writes.
    pub(super) fn residual(
        &mut self,
        ip: Addr,
        ins: &Instruction,
        st: &mut AbsState,
    ) -> Result<(), SpecializeError> {
        if self.checked_reload(ip, ins, st)? {
            return Ok(());
        }
        let slot = self.slot_of_store(st, ins);
        let out = Self::rewrite(st, ins);
        if self.forward(ip, &out, st)? {
            return Ok(());
        }
        self.residual_exact(ip, &out, st)?;
        self.record_facts(ip, &out, st);
        if let Some(s) = slot {
            st.slots.push(s);
            st.normalize();
        }
        Ok(())
    }

    pub(super) fn residual_exact(
        &mut self,
        ip: Addr,
        out: &Instruction,
        st: &mut AbsState,
    ) -> Result<(), SpecializeError> {
        self.residual_exact_with(ip, out, st, None, None)
    }

    pub(super) fn residual_exact_with(
        &mut self,
        ip: Addr,
        out: &Instruction,
        st: &mut AbsState,
        folded: Option<KnownState>,
        keep: Option<Gpr>,
    ) -> Result<(), SpecializeError> {
        let reads_f = flag_mask(out.rflags_read());
        let writes_f = flag_mask(out.rflags_modified());
        if (reads_f | writes_f) & STATUS != 0 && !st.fmat {
            let live = self.live_flags(ip) | reads_f;
            self.mat_flags(live, ip, st)?;
        }
        let info = self.info.info(out);
        let written = analysis::written_gprs_of(info);
        let used: Vec<(Register, OpAccess)> = info
            .used_registers()
            .iter()
            .map(|u| (u.register(), u.access()))
            .collect();
        // Registers it reads or writes only partly (the rest stays) must really hold their values.
        for (r, acc) in used {
            let Some(g) = Gpr::containing(r) else {
                continue;
            };
            let full_write = acc == OpAccess::Write && r.size() >= 4;
            // `keep` is read for the memory value it really holds.
            if !full_write
                && acc != OpAccess::None
                && acc != OpAccess::NoMemAccess
                && keep != Some(g)
            {
                self.mat_reg(g, ip, st);
            }
        }
        match folded {
            Some(f) => self.emit_folded(*out, ip, f, st),
            None => self.emit(*out, ip, st),
        }
        // Whatever it may write (partly or conditionally too) is unknown after it.
        for g in Gpr::ALL {
            if written & (1 << g.index()) != 0 {
                st.set(g, None, false);
            }
        }
        if writes_f & STATUS != 0 {
            if !st.fmat {
                // Nothing folded was live here: the rest is don't-care.
                for f in STATUS_FLAGS {
                    st.flags[f as usize] = None;
                }
                st.fmat = true;
            }
            for f in Flag::ALL {
                if writes_f & (1 << f as u8) != 0 {
                    st.flags[f as usize] = None;
                }
            }
            let set = flag_mask(out.rflags_set());
            let clr = flag_mask(out.rflags_cleared());
            for f in Flag::ALL {
                if set & (1 << f as u8) != 0 {
                    st.flags[f as usize] = Some(true);
                }
                if clr & (1 << f as u8) != 0 {
                    st.flags[f as usize] = Some(false);
                }
            }
        } else if writes_f & (1 << Flag::Df as u8) != 0 {
            st.flags[Flag::Df as usize] = None;
            let set = flag_mask(out.rflags_set());
            let clr = flag_mask(out.rflags_cleared());
            if set & (1 << Flag::Df as u8) != 0 {
                st.flags[Flag::Df as usize] = Some(true);
            }
            if clr & (1 << Flag::Df as u8) != 0 {
                st.flags[Flag::Df as usize] = Some(false);
            }
        }
        st.normalize();
        Ok(())
    }
}
