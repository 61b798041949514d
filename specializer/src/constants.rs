//! Registers proven to hold a constant at each instruction of a function: a forward must-analysis over its code.
//!
//! Compilers hoist jump-table bases and other addresses into registers (`lea r9, [rip+d]`), and where a call
//! clobbers a caller-saved one they set it again after the call, to the same value. At a trigger in the middle
//! of a function the specializer may take such a register as known without a check when every path from the
//! function's entry to the trigger set it to that one value and nothing changed it since: this module computes
//! exactly that, per instruction.
//!
//! The analysis: the function is decoded front to back (nothing when a byte does not decode, a branch lands
//! inside a decoded instruction, a call targets the function's own middle, or it is larger than
//! [`MAX_SCAN_BYTES`]); at the entry every register holds the caller's value (unknown). A `lea reg, [rip+d]` or
//! `mov reg, imm` makes `reg` that constant, every other write (partial ones included), every call (for the
//! caller-saved registers) and every `int n` (for all) makes it unknown. Flow follows fall-through and direct
//! branches inside the function. Every instruction may also be reached other than by that flow, and joins what
//! those entries may bring: an indirect jump's state (a jump table's case), a jump out of the function's state
//! (a thunk or split-off part that comes back), and a landing pad's (the unwinder enters it from a call with
//! the callee-saved registers as at the call and the others unknown: so in a function that calls anything, only
//! callee-saved registers can be proven). Two paths agree on a register only with the same constant.
//!
//! Limit (as for any reasoning about a function in isolation): code outside the function that jumps into its
//! middle without being jumped to from it (a `.cold` part entered from a branch the function does not show) is
//! not seen. The planner also drops a proven constant the profile saw contradicted at the trigger.

use crate::analysis::{written_gprs, MAX_SCAN_BYTES};
use crate::{Addr, Gpr, Memory};
use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind};
use std::collections::{HashMap, VecDeque};

/// The registers a call may clobber (System V ABI).
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

/// What one register holds before an instruction, over every path that reaches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Held {
    /// No path seen yet.
    Unreached,
    Const(u64),
    Unknown,
}

impl Held {
    fn join(self, other: Held) -> Held {
        match (self, other) {
            (Held::Unreached, x) | (x, Held::Unreached) => x,
            (Held::Const(a), Held::Const(b)) if a == b => Held::Const(a),
            _ => Held::Unknown,
        }
    }
}

type State = [Held; 16];

/// Join `from` into `into`; whether `into` changed.
fn join_into(into: &mut State, from: &State) -> bool {
    let mut changed = false;
    for (a, b) in into.iter_mut().zip(from) {
        let j = a.join(*b);
        changed |= j != *a;
        *a = j;
    }
    changed
}

/// The constants of a function, per instruction (see the module doc).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FunctionConstants {
    at: HashMap<u64, Vec<(Gpr, u64)>>,
}

impl FunctionConstants {
    /// No constants anywhere (an unknown function).
    pub fn none() -> FunctionConstants {
        FunctionConstants::default()
    }

    /// These constants at `a` as well (what a caller knows by other means; tests).
    pub fn with(mut self, a: Addr, consts: Vec<(Gpr, u64)>) -> FunctionConstants {
        self.at.insert(a.0, consts);
        self
    }

    /// The registers proven constant right before the instruction at `a` (empty when `a` is not an
    /// instruction boundary of the decoded function, or nothing is), by register index.
    pub fn at(&self, a: Addr) -> &[(Gpr, u64)] {
        self.at.get(&a.0).map_or(&[], |v| v.as_slice())
    }
}

/// The constant `ins` sets its destination register to (its full 64-bit register and value), if it is one of
/// the forms the module doc names.
fn constant_def(ins: &Instruction) -> Option<(Gpr, u64)> {
    if ins.op_count() < 1 || ins.op0_kind() != OpKind::Register {
        return None;
    }
    let r = ins.op0_register();
    let g = Gpr::containing(r)?;
    let v = match ins.mnemonic() {
        Mnemonic::Lea if r.is_gpr64() && ins.is_ip_rel_memory_operand() => {
            ins.ip_rel_memory_address()
        }
        Mnemonic::Mov if r.is_gpr64() && ins.op1_kind() == OpKind::Immediate64 => ins.immediate64(),
        Mnemonic::Mov if r.is_gpr64() && ins.op1_kind() == OpKind::Immediate32to64 => {
            ins.immediate32to64() as u64
        }
        // A 32-bit write zero-extends.
        Mnemonic::Mov if r.is_gpr32() && ins.op1_kind() == OpKind::Immediate32 => {
            u64::from(ins.immediate32())
        }
        _ => return None,
    };
    Some((g, v))
}

/// The state after `ins`, given the state before it.
fn transfer(ins: &Instruction, before: &State) -> State {
    let mut s = *before;
    let mut killed = written_gprs(ins);
    if ins.flow_control() == FlowControl::Interrupt {
        // `int n` (a system call on old ABIs, a trap): iced names no register it writes.
        killed = u16::MAX;
    }
    if matches!(
        ins.flow_control(),
        FlowControl::Call | FlowControl::IndirectCall
    ) || ins.mnemonic() == Mnemonic::Syscall
    {
        // iced gives `syscall` the flow control of a call: every caller-saved register (a superset of the
        // rax, rcx and r11 it really writes).
        for g in CALLER_SAVED {
            killed |= 1 << g.index();
        }
    }
    let def = constant_def(ins);
    for (i, h) in s.iter_mut().enumerate() {
        if killed & (1 << i) != 0 {
            *h = Held::Unknown;
        }
    }
    if let Some((g, v)) = def {
        s[g.index()] = Held::Const(v);
    }
    s
}

/// The constants of the function `[start, end)`; none when it cannot be read or decoded, or is larger than
/// [`MAX_SCAN_BYTES`].
pub fn function_constants(mem: &dyn Memory, start: Addr, end: Addr) -> FunctionConstants {
    let len = end.0.saturating_sub(start.0);
    if len == 0 || len > MAX_SCAN_BYTES {
        return FunctionConstants::none();
    }
    let mut buf = vec![0u8; len as usize];
    if mem.read(start, &mut buf).is_err() {
        return FunctionConstants::none();
    }
    let mut d = Decoder::with_ip(64, &buf, start.0, DecoderOptions::NONE);
    let mut insns = Vec::new();
    while d.can_decode() {
        let i = d.decode();
        if i.is_invalid() {
            return FunctionConstants::none();
        }
        insns.push(i);
    }
    let index: HashMap<u64, usize> = insns.iter().enumerate().map(|(k, i)| (i.ip(), k)).collect();
    let inside = |a: u64| start.0 <= a && a < end.0;
    for ins in &insns {
        let direct = matches!(
            ins.flow_control(),
            FlowControl::UnconditionalBranch
                | FlowControl::ConditionalBranch
                | FlowControl::Call
                | FlowControl::XbeginXabortXend
        ) && ins.op0_kind() == OpKind::NearBranch64;
        if !direct {
            continue;
        }
        let t = ins.near_branch_target();
        // A branch into the middle of a decoded instruction (the decode is not the code's), or a call into
        // the function's own middle (code run as a callee that may write the callee-saved registers): the
        // flow is not what the analysis sees.
        let misaligned = inside(t) && !index.contains_key(&t);
        let called_inside = ins.flow_control() == FlowControl::Call && inside(t) && t != start.0;
        if misaligned || called_inside {
            return FunctionConstants::none();
        }
    }
    let mut before = vec![[Held::Unreached; 16]; insns.len()];
    if let Some(first) = before.first_mut() {
        *first = [Held::Unknown; 16];
    }
    // What an instruction may hold when it is reached other than by the flow seen: after an indirect jump (a
    // jump table's case), after a jump out of the function (a thunk or a tail part that comes back), and at a
    // landing pad the unwinder enters from a call (callee-saved registers as at the call, the others unknown).
    // Every instruction joins it.
    let mut elsewhere = [Held::Unreached; 16];
    let mut queued = vec![false; insns.len()];
    let mut work: VecDeque<usize> = VecDeque::new();
    if !insns.is_empty() {
        work.push_back(0);
        queued[0] = true;
    }
    while let Some(k) = work.pop_front() {
        queued[k] = false;
        let mut here = before[k];
        join_into(&mut here, &elsewhere);
        if here.iter().all(|h| *h == Held::Unreached) {
            continue;
        }
        let ins = &insns[k];
        let after = transfer(ins, &here);
        let next = (k + 1 < insns.len()).then_some(k + 1);
        let target = index.get(&ins.near_branch_target()).copied();
        let mut out_of_flow: Option<State> = None;
        let succs: [Option<usize>; 2] = match ins.flow_control() {
            FlowControl::Next | FlowControl::Interrupt => [next, None],
            FlowControl::Call | FlowControl::IndirectCall => {
                let mut landing = here;
                for g in CALLER_SAVED {
                    landing[g.index()] = Held::Unknown;
                }
                out_of_flow = Some(landing);
                [next, None]
            }
            FlowControl::ConditionalBranch | FlowControl::XbeginXabortXend => {
                if target.is_none() {
                    out_of_flow = Some(after);
                }
                [next, target]
            }
            FlowControl::UnconditionalBranch => {
                if target.is_none() {
                    out_of_flow = Some(after);
                }
                [target, None]
            }
            FlowControl::IndirectBranch => {
                out_of_flow = Some(after);
                [None, None]
            }
            FlowControl::Return | FlowControl::Exception => [None, None],
        };
        if let Some(o) = out_of_flow {
            if join_into(&mut elsewhere, &o) {
                // Every instruction joins it: all of them again (at most twice per register).
                for (j, q) in queued.iter_mut().enumerate() {
                    if !*q {
                        *q = true;
                        work.push_back(j);
                    }
                }
            }
        }
        for s in succs.into_iter().flatten() {
            if join_into(&mut before[s], &after) && !queued[s] {
                queued[s] = true;
                work.push_back(s);
            }
        }
    }
    let mut at = HashMap::new();
    for (k, ins) in insns.iter().enumerate() {
        let mut here = before[k];
        join_into(&mut here, &elsewhere);
        let consts: Vec<(Gpr, u64)> = Gpr::ALL
            .iter()
            .filter(|g| **g != Gpr::Rsp)
            .filter_map(|g| match here[g.index()] {
                Held::Const(v) => Some((*g, v)),
                _ => None,
            })
            .collect();
        if !consts.is_empty() {
            at.insert(ins.ip(), consts);
        }
    }
    FunctionConstants { at }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_memory::Code;

    fn consts(code: &[u8]) -> FunctionConstants {
        let end = Addr(0x1000 + code.len() as u64);
        function_constants(&Code(code.to_vec()), Addr(0x1000), end)
    }

    #[test]
    fn a_constant_set_again_on_every_path_holds_through_a_jump_table() {
        // The shape of a big interpreter loop: the table base hoisted, set again in a handler.
        let code = [
            0x4c, 0x8d, 0x0d, 0x00, 0x01, 0x00, 0x00, // 1000: lea r9, [rip+0x100]   (0x1107)
            0x41, 0xff, 0x24,
            0xc1, // 1007: jmp [r9+rax*8]               (loop head: dispatch)
            0x31, 0xc0, // 100b: xor eax, eax                (a handler)
            0xeb, 0xf8, // 100d: jmp 1007
            0x4c, 0x8d, 0x0d, 0xf1, 0x00, 0x00,
            0x00, // 100f: lea r9, [rip+0xf1] (0x1107 again)
            0xeb, 0xef, // 1016: jmp 1007
        ];
        let c = consts(&code);
        assert_eq!(c.at(Addr(0x1000)), &[]);
        assert_eq!(c.at(Addr(0x1007)), &[(Gpr::R9, 0x1107)]);
        // Reached only through the indirect jump, which had r9 set.
        assert_eq!(c.at(Addr(0x100b)), &[(Gpr::R9, 0x1107)]);
        assert_eq!(c.at(Addr(0x100f)), &[(Gpr::R9, 0x1107)]);
        assert_eq!(c.at(Addr(0x1016)), &[(Gpr::R9, 0x1107)]);
        // Not an instruction boundary.
        assert_eq!(c.at(Addr(0x1008)), &[]);
    }

    #[test]
    fn after_any_call_only_callee_saved_constants_hold_everywhere() {
        // The unwinder may enter a landing pad anywhere after a call, with the caller-saved registers unknown:
        // r9, set again after the call, is not proven; r14, callee-saved, is.
        let code = [
            0x4c, 0x8d, 0x35, 0x00, 0x01, 0x00, 0x00, // 1000: lea r14, [rip+0x100]  (0x1107)
            0x4c, 0x8d, 0x0d, 0x00, 0x02, 0x00, 0x00, // 1007: lea r9, [rip+0x200]   (0x120e)
            0x41, 0xff, 0x24, 0xc6, // 100e: jmp [r14+rax*8]
            0xe8, 0xe9, 0x0f, 0x00, 0x00, // 1012: call 2000 (another function)
            0x4c, 0x8d, 0x0d, 0xf0, 0x01, 0x00,
            0x00, // 1017: lea r9, [rip+0x1f0] (0x120e again)
            0xeb, 0xee, // 101e: jmp 100e
        ];
        let c = consts(&code);
        assert_eq!(c.at(Addr(0x100e)), &[(Gpr::R14, 0x1107)]);
        assert_eq!(c.at(Addr(0x1017)), &[(Gpr::R14, 0x1107)]);
        assert_eq!(c.at(Addr(0x101e)), &[(Gpr::R14, 0x1107)]);
    }

    #[test]
    fn flow_the_decode_cannot_follow_proves_nothing() {
        // mov eax, 5; jmp 1001 (into the middle of the mov): the decode is not the code.
        let misaligned = [0xb8, 0x05, 0x00, 0x00, 0x00, 0xeb, 0xfa];
        assert_eq!(consts(&misaligned), FunctionConstants::none());
        // mov eax, 5; call 1007 (the function's own middle); ret; ret.
        let called = [
            0xb8, 0x05, 0x00, 0x00, 0x00, 0xe8, 0x01, 0x00, 0x00, 0x00, 0xc3, 0xc3,
        ];
        assert_eq!(consts(&called), FunctionConstants::none());
        // mov eax, 5; int 0x80: the kernel's result.
        let int = [0xb8, 0x05, 0x00, 0x00, 0x00, 0xcd, 0x80, 0xc3];
        assert_eq!(consts(&int).at(Addr(0x1005)), &[(Gpr::Rax, 5)]);
        assert_eq!(consts(&int).at(Addr(0x1007)), &[]);
    }

    #[test]
    fn paths_that_disagree_leave_the_register_unknown() {
        let code = [
            0xb8, 0x05, 0x00, 0x00, 0x00, // 1000: mov eax, 5
            0x48, 0xc7, 0xc3, 0xff, 0xff, 0xff, 0xff, // 1005: mov rbx, -1
            0x39, 0xc8, // 100c: cmp eax, ecx
            0x74, 0x07, // 100e: je 1017
            0xb8, 0x06, 0x00, 0x00, 0x00, // 1010: mov eax, 6
            0xff, 0xc3, // 1015: inc ebx
            0xc3, // 1017: ret
        ];
        let c = consts(&code);
        assert_eq!(c.at(Addr(0x100c)), &[(Gpr::Rax, 5), (Gpr::Rbx, u64::MAX)]);
        assert_eq!(c.at(Addr(0x1015)), &[(Gpr::Rax, 6), (Gpr::Rbx, u64::MAX)]);
        // eax 5 on one path, 6 on the other; rbx changed by `inc` on one.
        assert_eq!(c.at(Addr(0x1017)), &[]);
    }

    #[test]
    fn a_register_written_by_anything_else_on_some_path_is_not_constant() {
        // mov r12, imm64; loop: add r12, 1 ... the add reaches the loop head again.
        let code = [
            0x49, 0xbc, 0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22,
            0x11, // 1000: mov r12, imm64
            0x49, 0x83, 0xc4, 0x01, // 100a: add r12, 1
            0x75, 0xfa, // 100e: jne 100a
            0x0f, 0x05, // 1010: syscall (rax, rcx, r11 and the other caller-saved: unknown)
            0xc3, // 1012: ret
        ];
        let c = consts(&code);
        assert_eq!(c.at(Addr(0x100a)), &[]);
        assert_eq!(c.at(Addr(0x1010)), &[]);
    }

    #[test]
    fn undecodable_unreadable_or_huge_code_has_no_constants() {
        let mut bad = vec![0xb8, 0x05, 0x00, 0x00, 0x00];
        bad.push(0x06); // invalid in 64-bit mode
        assert_eq!(consts(&bad), FunctionConstants::none());
        assert_eq!(
            function_constants(&Code(Vec::new()), Addr(0x1000), Addr(0x1010)),
            FunctionConstants::none()
        );
        let big = Code(vec![0x90; MAX_SCAN_BYTES as usize + 1]);
        let end = Addr(0x1000 + MAX_SCAN_BYTES + 1);
        assert_eq!(
            function_constants(&big, Addr(0x1000), end),
            FunctionConstants::none()
        );
    }
}
