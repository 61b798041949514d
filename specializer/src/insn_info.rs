//! What one instruction reads: the registers (for value profiles) and the
//! memory operands with their effective-address recipe (for store profiles).

use crate::{Addr, Gpr};
use iced_x86::{Decoder, DecoderOptions, Instruction, InstructionInfoFactory, OpAccess, Register};

/// A memory operand of a decoded instruction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemOperand {
    pub base: Option<Gpr>,
    pub index: Option<Gpr>,
    pub scale: u32,
    /// Displacement; for RIP-relative operands already the absolute address.
    pub displacement: u64,
    /// Bytes accessed.
    pub size: usize,
    pub is_read: bool,
    pub is_write: bool,
}

impl MemOperand {
    /// The effective address given register values, or `None` when the
    /// operand uses a segment base we cannot see (fs/gs) — such operands are
    /// filtered out by [`decode_info`] already.
    pub fn effective_address(&self, reg: impl Fn(Gpr) -> u64) -> Addr {
        let mut a = self.displacement;
        if let Some(b) = self.base {
            a = a.wrapping_add(reg(b));
        }
        if let Some(i) = self.index {
            a = a.wrapping_add(reg(i).wrapping_mul(self.scale as u64));
        }
        Addr(a)
    }
}

/// What an instruction reads.
#[derive(Clone, Debug)]
pub struct InsnInfo {
    pub len: usize,
    /// General-purpose registers read (by full 64-bit register, no duplicates;
    /// `rsp` only when read explicitly, not for implicit stack use).
    pub regs_read: Vec<Gpr>,
    /// Memory operands with fs/gs segments and vector-SIB forms left out.
    pub mem: Vec<MemOperand>,
    /// The decoded instruction, for callers that need more.
    pub instruction: Instruction,
}

/// Decode the instruction at `ip` from `bytes` (which start at `ip`).
/// Returns `None` for invalid encodings.
pub fn decode_info(bytes: &[u8], ip: Addr) -> Option<InsnInfo> {
    let mut dec = Decoder::with_ip(64, bytes, ip.0, DecoderOptions::NONE);
    let ins = dec.decode();
    if ins.is_invalid() {
        return None;
    }
    let mut fac = InstructionInfoFactory::new();
    let info = fac.info(&ins);
    let mut regs_read: Vec<Gpr> = Vec::new();
    for u in info.used_registers() {
        let reads = matches!(
            u.access(),
            OpAccess::Read | OpAccess::CondRead | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        );
        if !reads {
            continue;
        }
        if let Some(g) = Gpr::containing(u.register()) {
            if !regs_read.contains(&g) {
                regs_read.push(g);
            }
        }
    }
    let mut mem = Vec::new();
    for m in info.used_memory() {
        if matches!(m.segment(), Register::FS | Register::GS) || m.vsib_size() != 0 {
            continue;
        }
        let base = if m.base() == Register::RIP {
            None
        } else {
            Gpr::containing(m.base())
        };
        let index = Gpr::containing(m.index());
        let access = m.access();
        let is_read = matches!(
            access,
            OpAccess::Read | OpAccess::CondRead | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        );
        let is_write = matches!(
            access,
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        );
        if !is_read && !is_write {
            continue; // lea, nop with memory operand
        }
        mem.push(MemOperand {
            base,
            index,
            scale: m.scale(),
            displacement: m.displacement(),
            size: m.memory_size().size(),
            is_read,
            is_write,
        });
    }
    Some(InsnInfo {
        len: ins.len(),
        regs_read,
        mem,
        instruction: ins,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_with_index() {
        // mov eax, [rdi+rcx*8+0x10]
        let info = decode_info(&[0x8b, 0x44, 0xcf, 0x10], Addr(0x1000)).unwrap();
        assert_eq!(info.len, 4);
        assert_eq!(info.regs_read, vec![Gpr::Rdi, Gpr::Rcx]);
        assert_eq!(info.mem.len(), 1);
        let m = &info.mem[0];
        assert!(m.is_read && !m.is_write);
        let ea = m.effective_address(|g| match g {
            Gpr::Rdi => 0x5000,
            Gpr::Rcx => 2,
            _ => 0,
        });
        assert_eq!(ea, Addr(0x5020));
    }

    #[test]
    fn rip_relative_is_absolute() {
        // mov rax, [rip+0x100]  at 0x2000, len 7 -> 0x2107
        let info = decode_info(&[0x48, 0x8b, 0x05, 0x00, 0x01, 0x00, 0x00], Addr(0x2000)).unwrap();
        assert_eq!(info.mem[0].base, None);
        assert_eq!(info.mem[0].effective_address(|_| 0), Addr(0x2107));
    }
}
