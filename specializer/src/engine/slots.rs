//! Stack slots the variant stored a known value to (`AbsState::slots`): a reload from one is checked against that value and continues with it known.
//!
//! An interpreter whose pc lives in a stack slot stores it, runs a handler that stores through other pointers
//! (which may alias the slot as far as the specializer can tell), then reloads it. Assuming the slot unchanged
//! would be a guess; instead the reload stays, followed by `cmp x, value; jne <original code after the load,
//! x unknown>`, and the path goes on with `x = value` known. Nothing is assumed: a slot some store did overwrite
//! only takes the slower path. Recorded only with [`Options::forward_stores`](crate::Options::forward_stores)
//! (the session's one-writer processes), so multi-threaded programs see no change.

use super::state::{AbsState, STATUS, STATUS_FLAGS};
use super::{fits_i32, Engine};
use crate::{Addr, Gpr, SpecializeError};
use iced_x86::{Code, FlowControl, Instruction, OpAccess, OpKind, Register};

impl Engine<'_> {
    /// The displacement of `ins`'s `[rsp + disp]` qword operand (no index, no segment override), if it has one.
    fn rsp_qword(ins: &Instruction) -> Option<i64> {
        (0..ins.op_count()).find(|&i| ins.op_kind(i) == OpKind::Memory)?;
        (ins.memory_base() == Register::RSP
            && ins.memory_index() == Register::None
            && !matches!(ins.memory_segment(), Register::FS | Register::GS)
            && ins.memory_size().size() == 8)
            .then(|| ins.memory_displacement64() as i64)
    }

    /// The slot a residual `mov [rsp+d], r64` or `mov qword [rsp+d], imm32` of a known value creates (read
    /// before it is emitted).
    pub(super) fn slot_of_store(
        &self,
        st: &AbsState,
        ins: &Instruction,
    ) -> Option<(i64, u64, bool)> {
        if !self.opts().forward_stores || ins.op_count() != 2 || ins.op_kind(0) != OpKind::Memory {
            return None;
        }
        let d = Self::rsp_qword(ins)?;
        match ins.code() {
            Code::Mov_rm64_r64 => {
                let g = Gpr::containing(ins.op_register(1))?;
                if g == Gpr::Rsp {
                    return None;
                }
                let v = st.get(g)?;
                Some((d, v, st.stat & (1 << g.index()) != 0))
            }
            Code::Mov_rm64_imm32 => Some((d, ins.immediate32to64() as u64, true)),
            _ => None,
        }
    }

    /// After `ins` really runs: a slot is gone when rsp moves, when `ins` may write it through rsp, and at
    /// control transfers to unknown code. Writes through other bases keep slots (reloads are checked).
    pub(super) fn forget_slots(&mut self, ins: &Instruction, st: &mut AbsState) {
        let info = self.info.info(ins);
        let moves_rsp = info
            .used_registers()
            .iter()
            .any(|u| Gpr::containing(u.register()) == Some(Gpr::Rsp) && is_write(u.access()));
        if moves_rsp
            || ins.has_rep_prefix()
            || ins.has_repne_prefix()
            || !matches!(
                ins.flow_control(),
                FlowControl::Next
                    | FlowControl::UnconditionalBranch
                    | FlowControl::ConditionalBranch
            )
        {
            st.slots.clear();
            return;
        }
        for m in info.used_memory() {
            if !is_write(m.access()) || m.base() != Register::RSP {
                continue;
            }
            let size = m.memory_size().size() as i64;
            if m.index() != Register::None || size == 0 {
                st.slots.clear();
                return;
            }
            let d = m.displacement() as i64;
            st.slots
                .retain(|s| s.0.wrapping_add(8) <= d || d.wrapping_add(size) <= s.0);
        }
    }

    /// `mov x, [rsp+d]` from a slot holding `v`: emit the load, `cmp x, v` and `jne` to the rest of the original
    /// code with x unknown (queued like any branch target), then go on with x = v. Only where the flags are dead
    /// after the load (the compare clobbers them); a `v` beyond imm32 needs a dead register to hold it.
    pub(super) fn checked_reload(
        &mut self,
        ip: Addr,
        ins: &Instruction,
        st: &mut AbsState,
    ) -> Result<bool, SpecializeError> {
        if st.slots.is_empty() || ins.code() != Code::Mov_r64_rm64 {
            return Ok(false);
        }
        let Some(d) = Self::rsp_qword(ins) else {
            return Ok(false);
        };
        let Some(x) = Gpr::containing(ins.op_register(0)).filter(|&g| g != Gpr::Rsp) else {
            return Ok(false);
        };
        let Some(&(_, v, stat)) = st.slots.iter().find(|s| s.0 == d) else {
            return Ok(false);
        };
        let after = Addr(ins.next_ip());
        if self.live_flags(after) & STATUS != 0 {
            return Ok(false);
        }
        // A value beyond imm32 (a pointer) is compared through a register whose real content is dead: known
        // but not materialized, its folded value restored by the deopt map (writing it drops the store-
        // forwarding facts it carried).
        let scratch = if fits_i32(v as i64) {
            None
        } else {
            match Gpr::ALL
                .into_iter()
                .find(|&g| g != x && g != Gpr::Rsp && st.get(g).is_some() && !st.is_mat(g))
            {
                Some(g) => Some(g),
                None => return Ok(false),
            }
        };
        let err = |e: iced_x86::IcedError| SpecializeError::Encode(e.to_string());
        self.residual_exact(ip, ins, st)?;
        self.record_facts(ip, ins, st);
        match scratch {
            None => {
                let cmp = Instruction::with2(Code::Cmp_rm64_imm32, x.to_iced(), v as i64 as i32)
                    .map_err(err)?;
                self.residual_exact(after, &cmp, st)?;
            }
            Some(f) => {
                let m = Instruction::with2(Code::Mov_r64_imm64, f.to_iced(), v).map_err(err)?;
                self.emit(m, after, st);
                let cmp = Instruction::with2(Code::Cmp_r64_rm64, x.to_iced(), f.to_iced())
                    .map_err(err)?;
                self.emit(cmp, after, st);
                // The flags are dead here: whatever was folded or real about them is gone.
                for fl in STATUS_FLAGS {
                    st.flags[fl as usize] = None;
                }
                st.fmat = true;
            }
        }
        let l = self.label_for(after, st);
        let j = Instruction::with_branch(Code::Jne_rel32_64, Self::label_ip(l)).map_err(err)?;
        self.emit(j, after, st);
        // Equal: x really holds v.
        st.set(x, Some(v), true);
        if stat {
            st.stat |= 1 << x.index();
        }
        st.normalize();
        Ok(true)
    }
}

fn is_write(a: OpAccess) -> bool {
    matches!(
        a,
        OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
    )
}
