//! Pure x86-64 analysis shared by the engine and the planner: which registers an instruction writes, functions decoded front to back, registers a function names (its constants: [`crate::constants`]).
//!
//! Nothing here specializes or reads anything but the bytes handed in (or read through [`Memory`]).

use crate::insn_info::{decode_info, InsnInfo};
use crate::{Addr, Gpr, Memory};
use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfo, InstructionInfoFactory,
    OpAccess, OpKind,
};
use std::collections::HashSet;
use std::sync::Arc;

/// Functions larger than this are not scanned by [`registers_named`] and [`crate::constants::function_constants`].
pub const MAX_SCAN_BYTES: u64 = 64 * 1024;

/// The GPRs `ins` may write, as a bit set by [`Gpr::index`].
///
/// What counts is every register iced reports with a write access (`Write`, `CondWrite`, `ReadWrite`,
/// `ReadCondWrite`), explicit or implicit, mapped to its full 64-bit register: a partial write (`mov al, 1`, `mov
/// ax, 1`) counts as a write of `rax`; a conditional one (`cmovcc`) counts too; `push`/`pop`/`call`/`ret` write
/// `rsp`. Not included: what a called function may clobber (the `call` itself writes only `rsp`; see
/// [`crate::constants`] for clobbers), the `rax` a `syscall` returns in (iced reports its `rcx` and `r11` only),
/// flags, and registers used only to address memory.
///
/// The engine uses the same notion (via [`written_gprs_of`]) for what a residual instruction leaves unknown and
/// for the store-forwarding facts it kills; the planner for what kills a sampled value.
pub fn written_gprs(ins: &Instruction) -> u16 {
    let mut fac = InstructionInfoFactory::new();
    written_gprs_of(fac.info(ins))
}

/// [`written_gprs`] from an [`InstructionInfo`] already computed (with a reused [`InstructionInfoFactory`]).
pub fn written_gprs_of(info: &InstructionInfo) -> u16 {
    let mut mask = 0u16;
    for u in info.used_registers() {
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

/// One instruction of a [`LinearFunction`].
#[derive(Clone, Debug)]
pub struct LinearInsn {
    pub addr: u64,
    pub info: Arc<InsnInfo>,
    /// GPRs this instruction may write (bit per `Gpr` index, see [`written_gprs`]).
    pub writes: u16,
    /// Control may continue to the next instruction (not jmp/ret/call/int).
    pub falls_through: bool,
    /// Some direct branch of the function targets this instruction.
    pub is_target: bool,
}

/// A function decoded once, front to back, so samples can be attributed to the instructions just before them.
#[derive(Clone, Debug, Default)]
pub struct LinearFunction {
    /// In address order, contiguous from the start.
    pub insns: Vec<LinearInsn>,
}

impl LinearFunction {
    /// Decode `bytes` (which start at address `start`) instruction after instruction, up to the end or the first
    /// bytes that do not decode (data or padding: the rest is left out). `is_target` is set for instructions a
    /// direct `jmp`/`jcc` among the decoded ones targets.
    pub fn decode(bytes: &[u8], start: u64) -> LinearFunction {
        let mut insns = Vec::new();
        let mut targets = HashSet::new();
        let mut off = 0usize;
        while off < bytes.len() {
            let Some(info) = decode_info(&bytes[off..], Addr(start + off as u64)) else {
                break; // data or padding we cannot decode: the rest is not attributed
            };
            if info.len == 0 {
                break;
            }
            let ins = &info.instruction;
            let fc = ins.flow_control();
            if matches!(
                fc,
                FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
            ) && ins.op_count() > 0
                && matches!(ins.op0_kind(), OpKind::NearBranch64)
            {
                targets.insert(ins.near_branch_target());
            }
            let falls_through = matches!(fc, FlowControl::Next | FlowControl::ConditionalBranch);
            let writes = written_gprs(ins);
            let len = info.len;
            insns.push(LinearInsn {
                addr: start + off as u64,
                info: Arc::new(info),
                writes,
                falls_through,
                is_target: false,
            });
            off += len;
        }
        for i in &mut insns {
            i.is_target = targets.contains(&i.addr);
        }
        LinearFunction { insns }
    }
}

/// The bytes of `[start, end)`, or `None` when empty, larger than [`MAX_SCAN_BYTES`] or not readable.
fn read_function(mem: &dyn Memory, start: Addr, end: Addr) -> Option<Vec<u8>> {
    let len = end.0.saturating_sub(start.0);
    if len == 0 || len > MAX_SCAN_BYTES {
        return None;
    }
    let mut buf = vec![0u8; len as usize];
    mem.read(start, &mut buf).ok()?;
    Some(buf)
}

/// Bit set (by [`Gpr::index`]) of the registers named explicitly (as an operand, base or index) by some
/// instruction in `[start, end)`; 0 when the code cannot be read or is larger than [`MAX_SCAN_BYTES`].
/// Bytes that do not decode name nothing; decoding goes on after them.
pub fn registers_named(mem: &dyn Memory, start: Addr, end: Addr) -> u16 {
    let Some(buf) = read_function(mem, start, end) else {
        return 0;
    };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_memory::Code;
    use iced_x86::Mnemonic;

    fn one(bytes: &[u8]) -> Instruction {
        let mut d = Decoder::with_ip(64, bytes, 0x1000, DecoderOptions::NONE);
        let i = d.decode();
        assert!(!i.is_invalid(), "{bytes:02x?} does not decode");
        assert_eq!(i.len(), bytes.len(), "{bytes:02x?} is not one instruction");
        i
    }

    fn mask(gs: &[Gpr]) -> u16 {
        gs.iter().fold(0, |m, g| m | 1 << g.index())
    }

    #[test]
    fn written_gprs_of_common_instructions() {
        use Gpr::*;
        let cases: &[(&[u8], &[Gpr], &str)] = &[
            (&[0x48, 0x89, 0xd8], &[Rax], "mov rax, rbx"),
            (&[0x89, 0xd8], &[Rax], "mov eax, ebx"),
            (&[0x88, 0xd8], &[Rax], "mov al, bl (partial write)"),
            (&[0x88, 0xfc], &[Rax], "mov ah, bh (partial write)"),
            (&[0x66, 0x89, 0xd8], &[Rax], "mov ax, bx (partial write)"),
            (&[0x48, 0x91], &[Rax, Rcx], "xchg rcx, rax"),
            (&[0x0f, 0xa2], &[Rax, Rbx, Rcx, Rdx], "cpuid"),
            (&[0x53], &[Rsp], "push rbx"),
            (&[0x5b], &[Rbx, Rsp], "pop rbx"),
            (&[0x48, 0x39, 0xd8], &[], "cmp rax, rbx"),
            (&[0x48, 0x89, 0x18], &[], "mov [rax], rbx"),
            (&[0x48, 0xf7, 0xe1], &[Rax, Rdx], "mul rcx"),
            (&[0x48, 0x0f, 0x44, 0xc3], &[Rax], "cmove rax, rbx"),
            (
                &[0x48, 0x8d, 0x44, 0x8b, 0x08],
                &[Rax],
                "lea rax, [rbx+rcx*4+8]",
            ),
            (
                &[0xe8, 0x00, 0x00, 0x00, 0x00],
                &[Rsp],
                "call (callee clobbers not included)",
            ),
            (&[0xc3], &[Rsp], "ret"),
            (&[0xf3, 0xa4], &[Rcx, Rsi, Rdi], "rep movsb"),
            (&[0x0f, 0x05], &[Rcx, R11], "syscall (iced: rcx, r11)"),
            (&[0x90], &[], "nop"),
        ];
        for (bytes, want, what) in cases {
            assert_eq!(
                written_gprs(&one(bytes)),
                mask(want),
                "{what} ({bytes:02x?})"
            );
        }
    }

    #[test]
    fn written_gprs_of_agrees_with_a_reused_factory() {
        let mut fac = InstructionInfoFactory::new();
        for bytes in [&[0x0f, 0xa2][..], &[0x5b], &[0x48, 0x91], &[0x90]] {
            let i = one(bytes);
            assert_eq!(written_gprs_of(fac.info(&i)), written_gprs(&i));
        }
    }

    #[test]
    fn linear_function_decodes_front_to_back() {
        let code = [
            0xb8, 0x01, 0x00, 0x00, 0x00, // 1000: mov eax, 1
            0x85, 0xff, // 1005: test edi, edi
            0x74, 0x03, // 1007: je 100c
            0x83, 0xc0, 0x02, // 1009: add eax, 2
            0xc3, // 100c: ret
            0xe8, 0x00, 0x00, 0x00, 0x00, // 100d: call 1012
            0x06, // 1012: (invalid in 64-bit mode): decoding stops
            0x90, // 1013: nop, not decoded
        ];
        let f = LinearFunction::decode(&code, 0x1000);
        let rows: Vec<(u64, u16, bool, bool)> = f
            .insns
            .iter()
            .map(|i| (i.addr, i.writes, i.falls_through, i.is_target))
            .collect();
        let (rax, rsp) = (mask(&[Gpr::Rax]), mask(&[Gpr::Rsp]));
        assert_eq!(
            rows,
            vec![
                (0x1000, rax, true, false),
                (0x1005, 0, true, false),
                (0x1007, 0, true, false),
                (0x1009, rax, true, false),
                (0x100c, rsp, false, true),
                (0x100d, rsp, false, false),
            ]
        );
        assert_eq!(f.insns[3].info.len, 3);
        assert_eq!(f.insns[3].info.regs_read, vec![Gpr::Rax]);
        assert_eq!(f.insns[3].info.instruction.mnemonic(), Mnemonic::Add);
        // A truncated last instruction is left out too; nothing at all decodes from nothing.
        assert_eq!(LinearFunction::decode(&code[..3], 0x1000).insns.len(), 0);
        assert_eq!(LinearFunction::decode(&[], 0x1000).insns.len(), 0);
        // A backward branch marks its target as well.
        let lp = [0xff, 0xc9, 0x75, 0xfc, 0xc3]; // 2000: dec ecx; 2002: jne 2000; 2004: ret
        let f = LinearFunction::decode(&lp, 0x2000);
        let targets: Vec<u64> = f
            .insns
            .iter()
            .filter(|i| i.is_target)
            .map(|i| i.addr)
            .collect();
        assert_eq!(targets, vec![0x2000]);
    }

    #[test]
    fn registers_named_counts_operands_bases_and_indexes() {
        let code = vec![
            0x48, 0x8b, 0x04, 0x8b, // 1000: mov rax, [rbx+rcx*4]
            0x41, 0x88, 0xf8, // 1004: mov r8b, dil
            0x06, // 1007: invalid, skipped
            0x0f, 0xa2, // 1008: cpuid (implicit registers are not named)
            0x53, // 100a: push rbx (rsp is implicit)
        ];
        let end = Addr(0x1000 + code.len() as u64);
        let named = registers_named(&Code(code), Addr(0x1000), end);
        assert_eq!(
            named,
            mask(&[Gpr::Rax, Gpr::Rbx, Gpr::Rcx, Gpr::R8, Gpr::Rdi])
        );
        assert_eq!(
            registers_named(&Code(Vec::new()), Addr(0x1000), Addr(0x1010)),
            0
        );
        assert_eq!(
            registers_named(&Code(vec![0x90]), Addr(0x1000), Addr(0x1000)),
            0
        );
    }
}
