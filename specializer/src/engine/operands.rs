//! Operand access: register and memory operand values from the abstract state, constant-memory loads, partial register writes.

use super::state::AbsState;
use super::Engine;
use crate::{sem, Addr, Gpr, PAGE_SIZE};
use iced_x86::{Instruction, Mnemonic, OpKind, Register};

fn is_high8(r: Register) -> bool {
    matches!(r, Register::AH | Register::CH | Register::DH | Register::BH)
}

impl Engine<'_> {
    pub(super) fn reg_val(st: &AbsState, r: Register) -> Option<u64> {
        let g = Gpr::containing(r)?;
        let v = st.get(g)?;
        Some(match r.size() {
            8 => v,
            4 => v & 0xffff_ffff,
            2 => v & 0xffff,
            _ if is_high8(r) => (v >> 8) & 0xff,
            _ => v & 0xff,
        })
    }

    /// Whether writing `r` with a known value keeps the full register known.
    pub(super) fn write_known_possible(st: &AbsState, r: Register) -> bool {
        r.size() >= 4 || Gpr::containing(r).and_then(|g| st.get(g)).is_some()
    }

    pub(super) fn write_reg(st: &mut AbsState, r: Register, v: Option<u64>, mat: bool) {
        let Some(g) = Gpr::containing(r) else { return };
        let full = match (v, r.size()) {
            (None, _) => None,
            (Some(v), 8) => Some(v),
            (Some(v), 4) => Some(v & 0xffff_ffff),
            (Some(v), 2) => st.get(g).map(|o| (o & !0xffff) | (v & 0xffff)),
            (Some(v), _) if is_high8(r) => st.get(g).map(|o| (o & !0xff00) | ((v & 0xff) << 8)),
            (Some(v), _) => st.get(g).map(|o| (o & !0xff) | (v & 0xff)),
        };
        st.set(g, full, mat);
    }

    /// Effective address of the memory operand when every part is known.
    pub(super) fn mem_addr(st: &AbsState, ins: &Instruction) -> Option<u64> {
        if matches!(ins.memory_segment(), Register::FS | Register::GS) {
            return None;
        }
        let base = ins.memory_base();
        if base == Register::RIP {
            return Some(ins.ip_rel_memory_address());
        }
        let mut a = ins.memory_displacement64();
        let mut addr32 = false;
        if base != Register::None {
            if base.size() != 8 {
                addr32 = true;
            }
            a = a.wrapping_add(Self::reg_val(st, base)?);
        }
        let index = ins.memory_index();
        if index != Register::None {
            if !index.is_gpr() {
                return None;
            }
            if index.size() != 8 {
                addr32 = true;
            }
            a = a.wrapping_add(
                Self::reg_val(st, index)?.wrapping_mul(ins.memory_index_scale() as u64),
            );
        }
        Some(if addr32 { a & 0xffff_ffff } else { a })
    }

    /// Read `size` bytes at `a` when every byte lies in constant pages.
    fn load(&mut self, a: u64, size: usize) -> Option<u64> {
        if size == 0 || size > 8 {
            return None;
        }
        let end = a.checked_add(size as u64 - 1)?;
        let mut p = Addr(a).page();
        let mut pages = Vec::new();
        while p.0 <= end {
            if !self.mem.is_constant(p) {
                return None;
            }
            pages.push(p);
            p = Addr(p.0.checked_add(PAGE_SIZE)?);
        }
        let mut buf = [0u8; 8];
        self.mem.read(Addr(a), &mut buf[..size]).ok()?;
        self.guard.extend(pages);
        Some(u64::from_le_bytes(buf))
    }

    /// Value of operand `i` (`bits` wide) if known.
    pub(super) fn op_val(
        &mut self,
        st: &AbsState,
        ins: &Instruction,
        i: u32,
        bits: u32,
    ) -> Option<u64> {
        let v = match ins.op_kind(i) {
            OpKind::Register => Self::reg_val(st, ins.op_register(i))?,
            OpKind::Memory => {
                let a = Self::mem_addr(st, ins)?;
                let v = self.load(a, ins.memory_size().size())?;
                for r in [ins.memory_base(), ins.memory_index()] {
                    if let Some(g) = Gpr::containing(r) {
                        self.static_regs |= 1 << g.index();
                    }
                }
                v
            }
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => ins.immediate(i),
            _ => return None,
        };
        Some(v & sem::mask(bits))
    }

    /// Operand width in bits of operand `i`.
    pub(super) fn op_bits(ins: &Instruction, i: u32) -> u32 {
        match ins.op_kind(i) {
            OpKind::Register => ins.op_register(i).size() as u32 * 8,
            OpKind::Memory => ins.memory_size().size() as u32 * 8,
            _ => 64,
        }
    }

    /// Plain integer operands only (GPRs, memory without vsib, immediates).
    pub(super) fn plain(ins: &Instruction) -> bool {
        (0..ins.op_count()).all(|i| match ins.op_kind(i) {
            OpKind::Register => ins.op_register(i).is_gpr(),
            OpKind::Memory => {
                !ins.memory_index().is_vector_register()
                    && (ins.mnemonic() == Mnemonic::Lea
                        || matches!(ins.memory_size().size(), 1 | 2 | 4 | 8))
            }
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => true,
            _ => false,
        }) && !ins.has_lock_prefix()
    }
}
