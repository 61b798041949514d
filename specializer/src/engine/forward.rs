//! Store forwarding ([`Options::forward_stores`](crate::Options::forward_stores)): a reload of a qword the variant just stored or loaded reads the register holding it.
//!
//! **The one non-local assumption.** Every other fold rests only on the entry state and on the guard pages
//! ([`Variant::guard_pages`](crate::Variant::guard_pages)). A forwarded reload also assumes that nothing else — another
//! thread, a signal handler, another process sharing the page — writes that qword between the store or load that
//! made the fact and the reload that uses it.
//!
//! What bounds it:
//! - facts ([`AbsState::facts`]: "the real qword at `[base + disp]` equals the real register `reg`") come only from
//!   residual loads and stores ([`Engine::record_facts`], and the copies [`Engine::forward`] makes) and die when
//!   the variant's own code may write that register or memory, and at calls and returns ([`Engine::forget_facts`]);
//! - they never cross a link into code already emitted, nor a branch target (`walk.rs`: `label_for`,
//!   `link_target`), so every loop iteration of the variant re-reads memory at least once: a flag written
//!   concurrently is seen, one iteration late at most;
//! - [`Options::forward_within`](crate::Options::forward_within) limits forwarding to slots inside known private
//!   ranges (or `rsp`-relative), so memory another process may share is always re-read.
//!
//! With `forward_stores` off (the default) no fact is ever recorded and [`Engine::forward`] never fires.

use super::state::{flag_mask, AbsState};
use super::{fits_i32, Engine};
use crate::{analysis, Addr, Gpr, SpecializeError};
use iced_x86::{Code, FlowControl, Instruction, Mnemonic, OpAccess, OpKind, Register};

impl Engine<'_> {
    /// Store-forwarding facts after `ins` really runs: drop every fact about a register it writes or memory it may
    /// write.
    pub(super) fn forget_facts(&mut self, ins: &Instruction, st: &mut AbsState) {
        if !st.slots.is_empty() {
            self.forget_slots(ins, st);
        }
        if st.facts.is_empty() {
            return;
        }
        // String instructions write a whole range iced reports as one element.
        if ins.has_rep_prefix() || ins.has_repne_prefix() {
            st.facts.clear();
            return;
        }
        let info = self.info.info(ins);
        let written = analysis::written_gprs_of(info);
        for g in Gpr::ALL {
            if written & (1 << g.index()) != 0 {
                st.real_write(g);
            }
        }
        let bit_test_reg = matches!(
            ins.mnemonic(),
            Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc
        ) && ins.op_count() == 2
            && ins.op1_kind() == OpKind::Register;
        let writes: Vec<Option<(Option<Gpr>, i64, u64)>> = info
            .used_memory()
            .iter()
            .filter(|m| {
                matches!(
                    m.access(),
                    OpAccess::Write
                        | OpAccess::CondWrite
                        | OpAccess::ReadWrite
                        | OpAccess::ReadCondWrite
                )
            })
            .map(|m| {
                // Writes whose extent iced does not give exactly are writes anywhere: bit tests with a register
                // offset (bit r of the string at m), xsave and friends (size 0), 32-bit addressing (a wrapped
                // address iced reports as a 64-bit base).
                let plain = m.index() == Register::None
                    && !matches!(m.segment(), Register::FS | Register::GS)
                    && m.base() != Register::RIP
                    && m.memory_size().size() > 0
                    && !(bit_test_reg && m.access() != OpAccess::Read);
                let base = match m.base() {
                    Register::None => None,
                    b if b.is_gpr64() => Some(Gpr::containing(b)?),
                    _ => return None,
                };
                plain.then(|| (base, m.displacement() as i64, m.memory_size().size() as u64))
            })
            .collect();
        for w in writes {
            st.mem_write(w);
        }
        // Control transfers to unknown code (calls, returns, interrupts)
        // may write anything.
        if !matches!(
            ins.flow_control(),
            FlowControl::Next | FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
        ) {
            st.facts.clear();
        }
    }

    /// The plain `[base + disp]` (or absolute `[disp]`, base `None`) qword operand of `out`, if any:
    /// (operand index, base, disp).
    fn plain_qword_mem(st: &AbsState, out: &Instruction) -> Option<(u32, Option<Gpr>, i64)> {
        let mi = (0..out.op_count()).find(|&i| out.op_kind(i) == OpKind::Memory)?;
        if out.memory_size().size() != 8
            || out.memory_index() != Register::None
            || matches!(out.memory_segment(), Register::FS | Register::GS)
        {
            return None;
        }
        let base = match out.memory_base() {
            Register::None => None,
            b if b.is_gpr64() => {
                let g = Gpr::containing(b)?;
                if !st.is_real(g) {
                    return None;
                }
                Some(g)
            }
            _ => return None,
        };
        Some((mi, base, out.memory_displacement64() as i64))
    }

    /// Use a register that holds a loaded or stored qword instead of
    /// reloading it from memory.
    pub(super) fn forward(
        &mut self,
        ip: Addr,
        out: &Instruction,
        st: &mut AbsState,
    ) -> Result<bool, SpecializeError> {
        use Mnemonic as M;
        if st.facts.is_empty()
            || out.has_lock_prefix()
            || out.has_rep_prefix()
            || out.has_repne_prefix()
        {
            return Ok(false);
        }
        let Some((mi, base, disp)) = Self::plain_qword_mem(st, out) else {
            return Ok(false);
        };
        if !self.forwardable(st, base, disp) {
            return Ok(false);
        }
        let holders: Vec<Gpr> = st
            .facts
            .iter()
            .filter(|f| f.0 == base && f.1 == disp)
            .map(|f| f.2)
            .collect();
        if holders.is_empty() {
            return Ok(false);
        }
        let real_r = holders.iter().copied().find(|g| st.is_real(*g));
        let read_only = self
            .info
            .info(out)
            .used_memory()
            .iter()
            .all(|m| m.access() == OpAccess::Read);
        if !read_only {
            return Ok(false);
        }
        let err = |e: iced_x86::IcedError| SpecializeError::Encode(e.to_string());
        let mnem = out.mnemonic();
        let x = if out.op_count() >= 1 && out.op_kind(0) == OpKind::Register {
            Gpr::containing(out.op_register(0)).filter(|_| out.op_register(0).is_gpr64())
        } else {
            None
        };
        // mov x, [m]  ->  nothing (x really holds it already), or mov x, r
        if out.code() == Code::Mov_r64_rm64 && mi == 1 {
            let Some(x) = x else { return Ok(false) };
            if holders.contains(&x) {
                // A folded value in x is replaced by what x really holds.
                st.set(x, None, false);
                st.normalize();
                self.stats.folded += 1;
                return Ok(true);
            }
            // Copy from a holder; a folded holder's real content is the
            // memory value, so read it without materializing.
            let r = real_r.unwrap_or(holders[0]);
            let n =
                Instruction::with2(Code::Mov_r64_rm64, x.to_iced(), r.to_iced()).map_err(err)?;
            self.emit(n, ip, st);
            st.set(x, None, false);
            // `mov x, [x + d]` changes the base: x holds the old slot's value, not the new one's.
            if Some(x) != base {
                st.facts.push((base, disp, x));
            }
            st.normalize();
            return Ok(true);
        }
        // op x, [m] with x folded to v: the memory value is in a register, so
        // compute `op mem, v` into x (add/and/or/xor/imul are commutative,
        // flags included).
        if let (Some(x), true, 1) = (x, out.op_count() == 2, mi) {
            let code = match mnem {
                M::Add => Some(Code::Add_rm64_imm32),
                M::And => Some(Code::And_rm64_imm32),
                M::Or => Some(Code::Or_rm64_imm32),
                M::Xor => Some(Code::Xor_rm64_imm32),
                M::Imul => Some(Code::Imul_r64_rm64_imm32),
                _ => None,
            };
            let v = st.get(x).filter(|_| !st.is_mat(x));
            let src = if holders.contains(&x) {
                Some(x)
            } else {
                Some(real_r.unwrap_or(holders[0]))
            };
            if let (Some(code), Some(v), Some(r)) = (code, v, src) {
                if fits_i32(v as i64) {
                    if !st.fmat {
                        let live = self.live_flags(ip) | flag_mask(out.rflags_read());
                        self.mat_flags(live, ip, st)?;
                    }
                    let folded = st.folded();
                    let n = if mnem == M::Imul {
                        Instruction::with3(code, x.to_iced(), r.to_iced(), v as i64 as i32)
                            .map_err(err)?
                    } else {
                        if r != x {
                            let m =
                                Instruction::with2(Code::Mov_r64_rm64, x.to_iced(), r.to_iced())
                                    .map_err(err)?;
                            self.emit_folded(m, ip, folded.clone(), st);
                        }
                        Instruction::with2(code, x.to_iced(), v as i64 as i32).map_err(err)?
                    };
                    // The real x now holds the memory value (or is about to).
                    st.set(x, None, false);
                    self.residual_exact_with(ip, &n, st, Some(folded), Some(r))?;
                    return Ok(true);
                }
            }
        }
        // Any other read of [m] whose operand also accepts a register, from
        // a holder the instruction does not otherwise mention.
        let mentioned: Vec<Gpr> = self
            .info
            .info(out)
            .used_registers()
            .iter()
            .filter_map(|u| Gpr::containing(u.register()))
            .collect();
        let r = real_r
            .filter(|r| !mentioned.contains(r))
            .or_else(|| holders.iter().copied().find(|r| !mentioned.contains(r)));
        // Bit tests with a register offset address memory beyond the qword (`bt [m], r` reads bit r of the
        // string at m, `bt reg, r` bit r mod 64): their register form means something else.
        let bit_test = matches!(mnem, M::Bt | M::Bts | M::Btr | M::Btc);
        if let (Some(r), false) = (r, bit_test) {
            if out.op_code().op_kind(mi) == iced_x86::OpCodeOperandKind::r64_or_mem {
                let mut n = *out;
                n.set_op_kind(mi, OpKind::Register);
                n.set_op_register(mi, r.to_iced());
                self.residual_exact_with(ip, &n, st, None, Some(r))?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// After a residual qword load or store, remember which register holds
    /// the memory value; stores also keep a copy in a free scratch register.
    pub(super) fn record_facts(&mut self, ip: Addr, out: &Instruction, st: &mut AbsState) {
        if !self.opts().forward_stores {
            return;
        }
        let Some((mi, base, disp)) = Self::plain_qword_mem(st, out) else {
            return;
        };
        if !self.forwardable(st, base, disp) {
            return;
        }
        match out.code() {
            Code::Mov_rm64_r64 if mi == 0 => {
                let Some(r) = Gpr::containing(out.op_register(1)) else {
                    return;
                };
                if !st.is_real(r) {
                    return;
                }
                st.facts.push((base, disp, r));
                let avoid: Vec<Gpr> = base.into_iter().chain([r]).collect();
                // The copy runs after the store: a thread stopped at it continues after the store in the
                // original code (resuming at the store would write the slot again, over what a signal handler
                // may have written meanwhile).
                let after = self.decode(ip).map(|i| Addr(i.next_ip()));
                if let (Some(f), Some(after)) = (self.next_scratch(&avoid, st), after) {
                    if let Ok(m) = Instruction::with2(Code::Mov_r64_rm64, f.to_iced(), r.to_iced())
                    {
                        // f stays known-unmaterialized: its real content is free.
                        self.emit(m, after, st);
                        st.facts.push((base, disp, f));
                    }
                }
            }
            Code::Mov_r64_rm64 if mi == 1 => {
                let Some(x) = Gpr::containing(out.op_register(0)) else {
                    return;
                };
                if Some(x) != base {
                    st.facts.push((base, disp, x));
                }
            }
            _ => {}
        }
        st.normalize();
    }

    /// Whether the qword at `[base + disp]` may be forwarded (`Options::forward_within`).
    fn forwardable(&self, st: &AbsState, base: Option<Gpr>, disp: i64) -> bool {
        let Some(ranges) = &self.opts().forward_within else {
            return true;
        };
        let b = match base {
            None => 0,
            Some(Gpr::Rsp) => return true,
            Some(g) => match st.get(g) {
                Some(b) => b,
                None => return false,
            },
        };
        let a = b.wrapping_add(disp as u64);
        let Some(end) = a.checked_add(8) else {
            return false;
        };
        ranges.iter().any(|(s, e)| s.0 <= a && end <= e.0)
    }

    /// A register whose real content is dead: known but not materialized
    /// (the variant rewrites it before any real use, and the deopt map
    /// restores its folded value). Such a register may carry a copy of a
    /// stored value for later loads. Registers that cache nothing yet are
    /// preferred.
    fn next_scratch(&mut self, avoid: &[Gpr], st: &AbsState) -> Option<Gpr> {
        if !self.opts().scratch_registers {
            return None;
        }
        let cands: Vec<Gpr> = Gpr::ALL
            .into_iter()
            .filter(|g| {
                *g != Gpr::Rsp && !avoid.contains(g) && st.get(*g).is_some() && !st.is_mat(*g)
            })
            .collect();
        // The choice depends on the state only, so two walks through the
        // same code from the same state make the same facts and share code.
        // Prefer a register that holds no cached value, then one whose slot
        // another register also holds.
        let holds = |g: Gpr| st.facts.iter().find(|f| f.2 == g).map(|f| (f.0, f.1));
        cands
            .iter()
            .copied()
            .find(|g| holds(*g).is_none())
            .or_else(|| {
                cands.iter().copied().find(|g| {
                    let slot = holds(*g);
                    st.facts
                        .iter()
                        .any(|f| f.2 != *g && Some((f.0, f.1)) == slot)
                })
            })
            .or_else(|| cands.first().copied())
    }
}
