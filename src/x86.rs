//! Pure x86 analysis the planner needs (temporary home until it moves into `specializer::analysis`).

use specializer::{Addr, Gpr, Memory};

/// Functions larger than this are not scanned for entry constants.
pub const MAX_SCAN_BYTES: u64 = 64 * 1024;

pub fn written_gprs(ins: &iced_x86::Instruction) -> u16 {
    use iced_x86::{InstructionInfoFactory, OpAccess};
    let mut fac = InstructionInfoFactory::new();
    let mut mask = 0u16;
    for u in fac.info(ins).used_registers() {
        if matches!(
            u.access(),
            OpAccess::Write | OpAccess::CondWrite | OpAccess::ReadWrite | OpAccess::ReadCondWrite
        ) {
            if let Some(g) = Gpr::containing(u.register()) {
                mask |= 1 << g.index();
            }
        }
    }
    mask
}

/// Bit set (by [`Gpr::index`]) of the registers named explicitly (as an operand, base or index) by some
/// instruction in `[start, end)`; 0 when the code cannot be read or is larger than [`MAX_SCAN_BYTES`].
pub fn registers_named(mem: &dyn Memory, start: Addr, end: Addr) -> u16 {
    use iced_x86::{Decoder, DecoderOptions, OpKind};
    let len = end.0.saturating_sub(start.0);
    if len == 0 || len > MAX_SCAN_BYTES {
        return 0;
    }
    let mut buf = vec![0u8; len as usize];
    if mem.read(start, &mut buf).is_err() {
        return 0;
    }
    let mut named = 0u16;
    let mut d = Decoder::with_ip(64, &buf, start.0, DecoderOptions::NONE);
    while d.can_decode() {
        let i = d.decode();
        let mut regs = vec![i.memory_base(), i.memory_index()];
        for k in 0..i.op_count() {
            if i.op_kind(k) == OpKind::Register {
                regs.push(i.op_register(k));
            }
        }
        for g in regs.into_iter().filter_map(Gpr::containing) {
            named |= 1 << g.index();
        }
    }
    named
}

/// Registers a function sets to a constant before anything else can happen and never changes afterwards:
/// `lea reg, [rip+d]` or `mov reg, imm` in the straight-line code at its entry, and no other write to `reg`
/// anywhere in the function (calls and system calls count as writes of the registers they clobber). Compilers hoist
/// jump-table bases like this; knowing them lets the specializer fold a `switch` entered in the middle of the loop.
/// Returns (register, value, address after the defining instruction). Empty when the function cannot be decoded.
/// Limit: a function entered other than at its symbol (e.g. from a `.cold` part that writes the register) would
/// break the assumption; compilers do not generate such code for hoisted constants.
pub fn entry_constants(mem: &dyn Memory, start: Addr, end: Addr) -> Vec<(Gpr, u64, Addr)> {
    use iced_x86::{Decoder, DecoderOptions, FlowControl, Mnemonic, OpKind};
    let len = end.0.saturating_sub(start.0);
    if len == 0 || len > MAX_SCAN_BYTES {
        return Vec::new();
    }
    let mut buf = vec![0u8; len as usize];
    if mem.read(start, &mut buf).is_err() {
        return Vec::new();
    }
    let mut d = Decoder::with_ip(64, &buf, start.0, DecoderOptions::NONE);
    let mut insns = Vec::new();
    while d.can_decode() {
        let i = d.decode();
        if i.is_invalid() {
            return Vec::new();
        }
        insns.push(i);
    }
    const CALLER_SAVED: [Gpr; 9] = [
        Gpr::Rax,
        Gpr::Rcx,
        Gpr::Rdx,
        Gpr::Rsi,
        Gpr::Rdi,
        Gpr::R8,
        Gpr::R9,
        Gpr::R10,
        Gpr::R11,
    ];
    let mut consts: Vec<(Gpr, u64, Addr)> = Vec::new();
    let mut defs: Vec<u64> = Vec::new();
    for i in &insns {
        if i.flow_control() != FlowControl::Next {
            break;
        }
        let dst = (i.op_count() >= 1 && i.op0_kind() == OpKind::Register)
            .then(|| i.op0_register())
            .filter(|r| r.is_gpr64() || r.is_gpr32());
        let value = match (i.mnemonic(), dst) {
            (Mnemonic::Lea, Some(r)) if r.is_gpr64() && i.is_ip_rel_memory_operand() => {
                Some(i.ip_rel_memory_address())
            }
            (Mnemonic::Mov, Some(_)) if i.op1_kind() == OpKind::Immediate64 => {
                Some(i.immediate64())
            }
            (Mnemonic::Mov, Some(r)) if r.is_gpr32() && i.op1_kind() == OpKind::Immediate32 => {
                Some(i.immediate32() as u64)
            }
            (Mnemonic::Mov, Some(r)) if r.is_gpr64() && i.op1_kind() == OpKind::Immediate32to64 => {
                Some(i.immediate32to64() as u64)
            }
            _ => None,
        };
        if let (Some(v), Some(g)) = (value, dst.and_then(Gpr::containing)) {
            consts.retain(|c| c.0 != g);
            consts.push((g, v, Addr(i.next_ip())));
            defs.push(i.ip());
        }
    }
    consts.retain(|(g, _, _)| {
        insns.iter().all(|i| {
            if defs.contains(&i.ip()) {
                return true;
            }
            let clobbers = match i.flow_control() {
                FlowControl::Call | FlowControl::IndirectCall => CALLER_SAVED.contains(g),
                _ if i.mnemonic() == Mnemonic::Syscall => {
                    matches!(g, Gpr::Rax | Gpr::Rcx | Gpr::R11)
                }
                _ => false,
            };
            !clobbers && written_gprs(i) & (1 << g.index()) == 0
        })
    });
    consts
}
