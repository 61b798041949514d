//! Self-test of the native execution harness used by filetests, property and differential tests.

mod common;

use common::{Cpu, ExecBuf, Machine, SelfMemory};
use specializer::{Addr, Flag, Gpr, Memory};

#[test]
fn runs_code_with_given_registers_and_flags() {
    let m = Machine::new();
    let buf = ExecBuf::anywhere(4096);
    // add rax, rcx ; adc rdx, 0 ; push rdx ; pop rbx ; std
    let mut code = vec![0x48, 0x01, 0xc8, 0x48, 0x83, 0xd2, 0x00, 0x52, 0x5b, 0xfd];
    code.extend(m.exit_stub());
    buf.write(0, &code);
    let mut input = Cpu::default();
    for (i, r) in input.regs.iter_mut().enumerate() {
        *r = 0x1111 * i as u64;
    }
    input.regs[Gpr::Rax.index()] = u64::MAX;
    input.regs[Gpr::Rcx.index()] = 2;
    input.regs[Gpr::Rdx.index()] = 7;
    input.regs[Gpr::Rsp.index()] = m.stack_top();
    // SAFETY: the code falls through to the exit stub.
    let out = unsafe { m.run(buf.addr(), &input) };
    assert_eq!(out.regs[Gpr::Rax.index()], 1);
    assert_eq!(out.regs[Gpr::Rdx.index()], 8);
    assert_eq!(out.regs[Gpr::Rbx.index()], 8);
    assert_eq!(out.regs[Gpr::Rsp.index()], m.stack_top());
    assert_eq!(out.regs[Gpr::R15.index()], 0x1111 * 15);
    assert!(out.flag(Flag::Df));
    assert!(!out.flag(Flag::Cf));
    // Flags in: cf=1 -> adc picks it up.
    let mut input2 = input;
    input2.regs[Gpr::Rax.index()] = 0;
    input2.set_flag(Flag::Cf, true);
    // SAFETY: as above.
    let out2 = unsafe { m.run(buf.addr() + 3, &input2) };
    assert_eq!(out2.regs[Gpr::Rdx.index()], 8);
    assert_eq!(out2.regs[Gpr::Rax.index()], 0);
}

#[test]
fn self_memory_reads_own_process() {
    let data: Vec<u8> = (0..64).collect();
    let mut mem = SelfMemory::new();
    let a = data.as_ptr() as u64;
    mem.add_constant(a, a + 64);
    let mut b = [0u8; 4];
    mem.read(Addr(a + 10), &mut b).unwrap();
    assert_eq!(b, [10, 11, 12, 13]);
    assert!(mem.is_constant(Addr(a).page()));
    assert!(mem.read(Addr(8), &mut b).is_err());
}
