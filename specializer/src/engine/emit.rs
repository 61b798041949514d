//! Emission: appending residual instructions (with their deopt state), materializing folded registers and flags, jumps to labels and exits.

use super::state::{cmp_for, AbsState, STATUS_FLAGS};
use super::{fits_i32, Engine};
use crate::variant::Emitted;
use crate::{Addr, Exit, ExitReason, Flag, Gpr, KnownState, SpecializeError};
use iced_x86::{Code, Instruction, Register};

/// The 32-bit register of a GPR.
fn gpr32(g: Gpr) -> Register {
    use Register as R;
    [
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
    ][g.index()]
}

impl Engine<'_> {
    pub(super) fn emit(&mut self, ins: Instruction, orig: Addr, st: &mut AbsState) {
        let folded = st.folded();
        self.emit_folded(ins, orig, folded, st);
    }

    /// Emit with an explicit deopt state; update store-forwarding facts for
    /// what the instruction really writes (see [`Engine::forget_facts`]).
    pub(super) fn emit_folded(
        &mut self,
        ins: Instruction,
        orig: Addr,
        folded: KnownState,
        st: &mut AbsState,
    ) {
        let mut ins = ins;
        ins.set_ip(0);
        self.est_bytes += if ins.len() > 0 { ins.len() + 2 } else { 10 };
        if self.est_bytes > self.opts().max_code_bytes {
            self.budget_hit = true;
        }
        self.stats.residual += 1;
        self.items.push(Emitted {
            ins,
            orig,
            folded,
            is_data: false,
            source: self.stepping,
        });
        self.forget_facts(&ins, st);
    }

    fn mov_imm(g: Gpr, v: u64) -> Instruction {
        let r = g.to_iced();
        let res = if v <= u32::MAX as u64 {
            let r32 = gpr32(g);
            Instruction::with2(Code::Mov_r32_imm32, r32, v as u32)
        } else if fits_i32(v as i64) {
            Instruction::with2(Code::Mov_rm64_imm32, r, v as i64 as i32)
        } else {
            Instruction::with2(Code::Mov_r64_imm64, r, v)
        };
        // The operands above always match their codes.
        res.unwrap_or_default()
    }

    pub(super) fn mat_reg(&mut self, g: Gpr, orig: Addr, st: &mut AbsState) {
        if let Some(v) = st.get(g) {
            if !st.is_mat(g) {
                self.emit(Self::mov_imm(g, v), orig, st);
                st.set(g, Some(v), true);
            }
        }
    }

    pub(super) fn mat_all_regs(&mut self, orig: Addr, st: &mut AbsState) {
        for g in Gpr::ALL {
            self.mat_reg(g, orig, st);
        }
    }

    fn data_label(&mut self, b: u8) -> u32 {
        if let Some(&l) = self.data_labels.get(&b) {
            return l;
        }
        let l = self.new_label();
        self.data_labels.insert(b, l);
        l
    }

    /// Make the real flags hold every known folded status flag in `live`.
    pub(super) fn mat_flags(
        &mut self,
        live: u8,
        orig: Addr,
        st: &mut AbsState,
    ) -> Result<(), SpecializeError> {
        if st.fmat {
            return Ok(());
        }
        let mut want = [None; 7];
        let mut any = false;
        for f in STATUS_FLAGS {
            if live & (1 << f as u8) != 0 {
                want[f as usize] = st.flags[f as usize];
                any |= want[f as usize].is_some();
            }
        }
        if any {
            // One `cmp byte [data], imm8` when it can produce the flags, else
            // a compare for the other five followed by `stc`/`clc` for CF.
            let (pair, fix_cf) = match cmp_for(&want) {
                Some(p) => (p, None),
                None => {
                    let mut no_cf = want;
                    no_cf[Flag::Cf as usize] = None;
                    let p = cmp_for(&no_cf).ok_or_else(|| {
                        SpecializeError::NoGain(format!(
                            "cannot rebuild the folded flags at {orig}"
                        ))
                    })?;
                    (p, want[Flag::Cf as usize])
                }
            };
            let (a, b) = pair;
            let l = self.data_label(a);
            let mem =
                iced_x86::MemoryOperand::with_base_displ(Register::RIP, Self::label_ip(l) as i64);
            let ins = Instruction::with2(Code::Cmp_rm8_imm8, mem, b as u32)
                .map_err(|e| SpecializeError::Encode(e.to_string()))?;
            self.emit(ins, orig, st);
            if let Some(cf) = fix_cf {
                let code = if cf { Code::Stc } else { Code::Clc };
                self.emit(Instruction::with(code), orig, st);
            }
        }
        // Only what was wanted is known now; the rest holds whatever the
        // compare left, which the abstract state does not claim.
        for fl in STATUS_FLAGS {
            st.flags[fl as usize] = want[fl as usize];
        }
        st.fmat = true;
        Ok(())
    }

    pub(super) fn jump_label(&mut self, l: u32, orig: Addr, st: &mut AbsState) {
        let ins =
            Instruction::with_branch(Code::Jmp_rel32_64, Self::label_ip(l)).unwrap_or_default();
        self.emit(ins, orig, st);
    }

    pub(super) fn exit(
        &mut self,
        target: Addr,
        reason: ExitReason,
        st: &mut AbsState,
    ) -> Result<(), SpecializeError> {
        let first = self.items.len();
        let live = self.live_flags(target);
        self.mat_flags(live, target, st)?;
        self.mat_all_regs(target, st);
        let dest = self
            .opts()
            .chain
            .as_ref()
            .and_then(|c| c.get(&target).copied())
            .unwrap_or(target);
        let ins = Instruction::with_branch(Code::Jmp_rel32_64, dest.0)
            .map_err(|e| SpecializeError::Encode(e.to_string()))?;
        self.emit(ins, target, st);
        self.exits.push(Exit {
            target,
            reason,
            state: st.known(),
        });
        self.exit_items.push(first);
        Ok(())
    }
}
