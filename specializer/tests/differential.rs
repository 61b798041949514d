//! Differential tests: the sample interpreters (samples/interp_switch.c, samples/bpf_filter.c) compiled with gcc -O2, specialized in-process for a known program, must compute exactly what the original computes on many inputs.
//!
//! Each test compiles the sample as a shared library, dlopens it, declares the
//! program buffer and the library's read-only mappings constant, specializes
//! the hot function from its entry with `rdi` = the program, encodes the
//! variant into an executable buffer and calls original and variant through
//! function pointers with identical inputs, comparing return values and the
//! memory they write. It also checks the deopt map covers every instruction
//! boundary and the guard pages are constant pages.

mod common;

use common::native_lib::{specialize_function, specialize_request, SampleLib, Specialized};
use common::rng::Rng;
use common::{Cpu, Machine, Mapping, SelfMemory};
use specializer::{Addr, Flag, Gpr, KnownState, Memory, Options, Request};

type InterpRun = unsafe extern "C" fn(*const Insn, *mut i64) -> i64;
type InterpDemo = unsafe extern "C" fn(i64, *mut usize) -> *mut Insn;
type BpfRun = unsafe extern "C" fn(*const BpfInsn, *const u8, u32) -> u32;
type BpfDemoFilter = unsafe extern "C" fn(*mut u32) -> *mut BpfInsn;
type BpfDemoPacket = unsafe extern "C" fn(*mut u64, *mut u8) -> u32;

/// `struct insn { int32_t op, res, op1, op2; }` from interp_switch.c.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Insn {
    op: i32,
    res: i32,
    op1: i32,
    op2: i32,
}

/// `struct bpf_insn { uint16_t code; uint8_t jt, jf; uint32_t k; }` from bpf_filter.c.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BpfInsn {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

const fn i(op: i32, res: i32, op1: i32, op2: i32) -> Insn {
    Insn { op, res, op1, op2 }
}

const fn b(code: u16, jt: u8, jf: u8, k: u32) -> BpfInsn {
    BpfInsn { code, jt, jf, k }
}

const HALT: i32 = 0;
const MOVI: i32 = 1;
const MOV: i32 = 2;
const ADD: i32 = 3;
const SUB: i32 = 4;
const MUL: i32 = 5;
const ADDI: i32 = 6;
const XOR: i32 = 7;
const ANDI: i32 = 8;
const SHRI: i32 = 9;
const BNEQ: i32 = 10;
const JMP: i32 = 11;

/// A program in a page of its own (so the constant page holds nothing else).
#[derive(Clone)]
struct Program {
    map: std::rc::Rc<Mapping>,
}

impl Program {
    fn new<T: Copy>(items: &[T]) -> Program {
        let bytes = std::mem::size_of_val(items);
        let map = Mapping::anywhere(bytes.max(1));
        // SAFETY: `items` is a slice of plain-old-data repr(C) structs.
        let raw = unsafe { std::slice::from_raw_parts(items.as_ptr() as *const u8, bytes) };
        map.write(0, raw);
        map.protect(0, map.len, libc::PROT_READ);
        Program {
            map: std::rc::Rc::new(map),
        }
    }
    fn addr(&self) -> u64 {
        self.map.addr
    }
    fn range(&self) -> (u64, u64) {
        (self.map.addr, self.map.end())
    }
}

/// The option sets every fixed program is specialized with: store forwarding on (as dynspec specializes
/// private memory; off by default) with register scratch copies, and both off.
fn option_sets() -> [(&'static str, Options); 2] {
    [
        (
            "store forwarding",
            Options {
                forward_stores: true,
                ..Options::default()
            },
        ),
        (
            "no scratch registers, no store forwarding",
            Options {
                scratch_registers: false,
                forward_stores: false,
                ..Options::default()
            },
        ),
    ]
}

/// Every instruction boundary of the variant has a deopt entry; guard pages are constant.
fn check_variant(name: &str, s: &Specialized, mem: &SelfMemory) {
    let offs = common::reachable_boundaries(&s.encoded.code, s.addr());
    assert!(!offs.is_empty(), "{name}: empty variant");
    let missing: Vec<u64> = offs
        .iter()
        .copied()
        .filter(|o| !s.encoded.deopt.iter().any(|d| d.offset as u64 == *o))
        .collect();
    assert!(
        missing.is_empty(),
        "{name}: {} of {} instruction boundaries have no deopt entry (first offsets {:x?})",
        missing.len(),
        offs.len(),
        &missing[..missing.len().min(8)]
    );
    assert!(
        s.encoded
            .deopt
            .windows(2)
            .all(|w| w[0].offset <= w[1].offset),
        "{name}: deopt map not sorted by offset"
    );
    for g in &s.variant.guard_pages {
        assert!(
            mem.is_constant(*g),
            "{name}: guard page {g} is not constant"
        );
    }
    assert_eq!(
        s.encoded.exit_offsets.len(),
        s.variant.exits.len(),
        "{name}: exit_offsets must match exits"
    );
}

fn interp_programs(lib: &SampleLib) -> Vec<(&'static str, Program)> {
    let mut v = Vec::new();
    // The demo program from the sample, with a small outer count.
    // SAFETY: the documented signature of interp_demo_program.
    let demo: InterpDemo = unsafe { lib.func("interp_demo_program") };
    let mut n = 0usize;
    // SAFETY: returns a malloc'ed page with n insns (we copy them and leak the original).
    let p = unsafe { demo(37, &mut n) };
    assert!(!p.is_null() && n > 0);
    // SAFETY: p points to n initialized insns.
    let prog = unsafe { std::slice::from_raw_parts(p, n) }.to_vec();
    v.push(("demo", Program::new(&prog)));
    v.push((
        "all_ops",
        Program::new(&[
            i(MOVI, 2, 7, 0),
            i(MOV, 3, 1, 0),
            i(ADD, 4, 3, 2),
            i(SUB, 5, 4, 0),
            i(MUL, 6, 5, 3),
            i(ADDI, 7, 6, -100),
            i(XOR, 0, 7, 1),
            i(ANDI, 0, 0, 0x7fff_0f0f),
            i(SHRI, 2, 6, 3),
            i(ADD, 0, 0, 2),
            i(SHRI, 3, 6, 70), // count masked to 6
            i(XOR, 0, 0, 3),
            i(HALT, 0, 0, 0),
        ]),
    ));
    v.push((
        "env_loop",
        Program::new(&[
            i(ANDI, 1, 1, 15),
            i(BNEQ, 0, 1, 3),
            i(JMP, 0, 0, 8),
            i(ADD, 0, 0, 2),
            i(XOR, 2, 2, 0),
            i(ADDI, 1, 1, -1),
            i(SHRI, 3, 0, 1),
            i(BNEQ, 0, 1, 3),
            i(HALT, 0, 0, 0),
        ]),
    ));
    v.push((
        "bad_opcode",
        Program::new(&[
            i(MOVI, 0, 5, 0),
            i(ADD, 0, 0, 1),
            i(BNEQ, 0, 2, 4),
            i(HALT, 0, 0, 0),
            i(99, 0, 0, 0),
        ]),
    ));
    v
}

#[test]
fn interp_switch_variant_matches_original() {
    let lib = SampleLib::build("interp_switch");
    let func = lib.function("interp_run");
    // SAFETY: the documented signature of interp_run.
    let orig: InterpRun = unsafe { lib.func("interp_run") };
    let mut rng = Rng(0x1234_5678_9abc_def1);
    for ((name, prog), (oname, opts)) in interp_programs(&lib)
        .into_iter()
        .flat_map(|p| option_sets().into_iter().map(move |o| (p.clone(), o)))
    {
        let mem = lib.memory(&[prog.range()]);
        let s = specialize_function(func, prog.addr(), &mem, opts)
            .unwrap_or_else(|e| panic!("program {name} ({oname}): {e}"));
        check_variant(name, &s, &mem);
        // SAFETY: the variant has interp_run's ABI.
        let var: InterpRun = unsafe { s.func() };
        for round in 0..300 {
            let mut env = [0i64; 8];
            for e in env.iter_mut() {
                let r = rng.next();
                *e = if r & 3 == 0 {
                    (r >> 8) as i64 % 20
                } else {
                    r as i64
                };
            }
            let (mut e1, mut e2) = (env, env);
            // SAFETY: the program is valid for interp_run and env has the slots it uses.
            let r1 = unsafe { orig(prog.addr() as *const Insn, e1.as_mut_ptr()) };
            // SAFETY: same inputs, same ABI.
            let r2 = unsafe { var(prog.addr() as *const Insn, e2.as_mut_ptr()) };
            assert_eq!(
                (r1, e1),
                (r2, e2),
                "interp program {name} ({oname}), round {round}, env {env:?}: original vs variant"
            );
        }
        eprintln!(
            "interp {name}: variant {} bytes, {} exits, stats {:?}",
            s.encoded.code.len(),
            s.variant.exits.len(),
            s.variant.stats
        );
    }
}

const LD_W_ABS: u16 = 0x20;
const LD_H_ABS: u16 = 0x28;
const LD_B_ABS: u16 = 0x30;
const LD_W_IND: u16 = 0x40;
const LD_H_IND: u16 = 0x48;
const LD_B_IND: u16 = 0x50;
const LD_W_LEN: u16 = 0x80;
const LD_IMM: u16 = 0x00;
const LD_MEM: u16 = 0x60;
const LDX_IMM: u16 = 0x01;
const LDX_MEM: u16 = 0x61;
const LDX_LEN: u16 = 0x81;
const LDX_B_MSH: u16 = 0xb1;
const ST: u16 = 0x02;
const STX: u16 = 0x03;
const ALU_ADD_K: u16 = 0x04;
const ALU_ADD_X: u16 = 0x0c;
const ALU_SUB_K: u16 = 0x14;
const ALU_SUB_X: u16 = 0x1c;
const ALU_MUL_K: u16 = 0x24;
const ALU_MUL_X: u16 = 0x2c;
const ALU_DIV_K: u16 = 0x34;
const ALU_DIV_X: u16 = 0x3c;
const ALU_AND_K: u16 = 0x54;
const ALU_AND_X: u16 = 0x5c;
const ALU_OR_K: u16 = 0x44;
const ALU_OR_X: u16 = 0x4c;
const ALU_XOR_K: u16 = 0xa4;
const ALU_XOR_X: u16 = 0xac;
const ALU_LSH_K: u16 = 0x64;
const ALU_LSH_X: u16 = 0x6c;
const ALU_RSH_K: u16 = 0x74;
const ALU_RSH_X: u16 = 0x7c;
const ALU_NEG: u16 = 0x84;
const JMP_JA: u16 = 0x05;
const JMP_JEQ_K: u16 = 0x15;
const JMP_JEQ_X: u16 = 0x1d;
const JMP_JGT_K: u16 = 0x25;
const JMP_JGT_X: u16 = 0x2d;
const JMP_JGE_K: u16 = 0x35;
const JMP_JGE_X: u16 = 0x3d;
const JMP_JSET_K: u16 = 0x45;
const JMP_JSET_X: u16 = 0x4d;
const RET_K: u16 = 0x06;
const RET_A: u16 = 0x16;
const MISC_TAX: u16 = 0x07;
const MISC_TXA: u16 = 0x87;

fn bpf_filters(lib: &SampleLib) -> Vec<(&'static str, Program)> {
    let mut v = Vec::new();
    // SAFETY: the documented signature of bpf_demo_filter.
    let demo: BpfDemoFilter = unsafe { lib.func("bpf_demo_filter") };
    let mut n = 0u32;
    // SAFETY: returns a malloc'ed page with n insns (copied; the original is leaked).
    let p = unsafe { demo(&mut n) };
    assert!(!p.is_null() && n > 0);
    // SAFETY: p points to n initialized insns.
    let prog = unsafe { std::slice::from_raw_parts(p, n as usize) }.to_vec();
    v.push(("demo", Program::new(&prog)));
    v.push((
        "alu",
        Program::new(&[
            b(LD_W_LEN, 0, 0, 0),
            b(ST, 0, 0, 2),
            b(LDX_IMM, 0, 0, 3),
            b(LD_B_ABS, 0, 0, 14),
            b(ALU_AND_K, 0, 0, 0xf),
            b(ALU_LSH_K, 0, 0, 2),
            b(MISC_TAX, 0, 0, 0),
            b(LD_B_IND, 0, 0, 0),
            b(ALU_ADD_X, 0, 0, 0),
            b(ALU_MUL_K, 0, 0, 31),
            b(ALU_XOR_K, 0, 0, 0x5a5a),
            b(ALU_OR_K, 0, 0, 1),
            b(ALU_DIV_K, 0, 0, 3),
            b(ALU_NEG, 0, 0, 0),
            b(ALU_RSH_K, 0, 0, 20),
            b(ST, 0, 0, 3),
            b(LD_MEM, 0, 0, 2),
            b(ALU_SUB_K, 0, 0, 1),
            b(JMP_JSET_K, 1, 0, 1),
            b(RET_K, 0, 0, 7),
            b(LDX_MEM, 0, 0, 3),
            b(MISC_TXA, 0, 0, 0),
            b(ALU_AND_K, 0, 0, 0xff),
            b(JMP_JGE_K, 0, 1, 0x80),
            b(RET_A, 0, 0, 0),
            b(LD_H_IND, 0, 0, 2),
            b(ALU_DIV_X, 0, 0, 0),
            b(RET_A, 0, 0, 0),
        ]),
    ));
    v.push((
        "x_ops",
        Program::new(&[
            b(LDX_LEN, 0, 0, 0),
            b(LD_IMM, 0, 0, 40),
            b(JMP_JGT_X, 0, 1, 0),
            b(RET_K, 0, 0, 1),
            b(LDX_B_MSH, 0, 0, 14),
            b(LD_W_IND, 0, 0, 0),
            b(JMP_JEQ_X, 3, 0, 0),
            b(ALU_ADD_X, 0, 0, 0),
            b(JMP_JGE_X, 0, 1, 0),
            b(JMP_JA, 0, 0, 1),
            b(RET_K, 0, 0, 2),
            b(ALU_SUB_X, 0, 0, 0),
            b(JMP_JSET_X, 0, 1, 0),
            b(RET_A, 0, 0, 0),
            b(ALU_LSH_X, 0, 0, 0),
            b(ALU_RSH_X, 0, 0, 0),
            b(ALU_MUL_X, 0, 0, 0),
            b(ALU_OR_X, 0, 0, 0),
            b(ALU_XOR_X, 0, 0, 0),
            b(ALU_AND_X, 0, 0, 0),
            b(LD_W_ABS, 0, 0, 30),
            b(ALU_SUB_X, 0, 0, 0),
            b(JMP_JGT_K, 1, 0, 1000),
            b(LD_H_ABS, 0, 0, 6),
            b(JMP_JEQ_K, 0, 1, 0),
            b(RET_K, 0, 0, 9),
            b(ALU_ADD_K, 0, 0, 5),
            b(STX, 0, 0, 4),
            b(LDX_MEM, 0, 0, 4),
            b(RET_A, 0, 0, 0),
        ]),
    ));
    v.push((
        "unknown_code",
        Program::new(&[b(LD_IMM, 0, 0, 1), b(0x99, 0, 0, 0)]),
    ));
    v
}

#[test]
fn bpf_filter_variant_matches_original() {
    let lib = SampleLib::build("bpf_filter");
    let func = lib.function("bpf_run");
    // SAFETY: documented signatures.
    let orig: BpfRun = unsafe { lib.func("bpf_run") };
    // SAFETY: documented signature.
    let packet: BpfDemoPacket = unsafe { lib.func("bpf_demo_packet") };
    // Packets: synthetic frames from the sample's generator, then random bytes and lengths.
    let mut pkts: Vec<(Vec<u8>, u32)> = Vec::new();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..3000 {
        let mut buf = vec![0u8; 128];
        // SAFETY: buf has BPF_DEMO_MAX_PKT (128) bytes; state is non-zero.
        let len = unsafe { packet(&mut state, buf.as_mut_ptr()) };
        pkts.push((buf, len));
    }
    let mut rng = Rng(0xdead_beef_cafe_f00d);
    for _ in 0..1000 {
        let buf: Vec<u8> = (0..128).map(|_| rng.next() as u8).collect();
        let len = (rng.next() % 129) as u32;
        pkts.push((buf, len));
    }
    let mut accepted = 0;
    for ((name, prog), (oname, opts)) in bpf_filters(&lib)
        .into_iter()
        .flat_map(|p| option_sets().into_iter().map(move |o| (p.clone(), o)))
    {
        let mem = lib.memory(&[prog.range()]);
        let s = specialize_function(func, prog.addr(), &mem, opts)
            .unwrap_or_else(|e| panic!("program {name} ({oname}): {e}"));
        check_variant(name, &s, &mem);
        // SAFETY: the variant has bpf_run's ABI.
        let var: BpfRun = unsafe { s.func() };
        for (k, (buf, len)) in pkts.iter().enumerate() {
            // SAFETY: pkt has at least len bytes (len <= 128 = buf.len()).
            let r1 = unsafe { orig(prog.addr() as *const BpfInsn, buf.as_ptr(), *len) };
            // SAFETY: same inputs, same ABI.
            let r2 = unsafe { var(prog.addr() as *const BpfInsn, buf.as_ptr(), *len) };
            assert_eq!(
                r1, r2,
                "bpf filter {name} ({oname}), packet {k} (len {len}): original {r1}, variant {r2}"
            );
            if name == "demo" && oname == "store forwarding" && r1 != 0 {
                accepted += 1;
            }
        }
        eprintln!(
            "bpf {name}: variant {} bytes, {} exits, stats {:?}",
            s.encoded.code.len(),
            s.variant.exits.len(),
            s.variant.stats
        );
    }
    // The demo filter must accept some packets and drop others, or the comparison is weak.
    assert!(
        accepted > 0 && accepted < 3000,
        "demo filter accepted {accepted}"
    );
}

/// A random interp program: straight-line ops over env[0..7], forward BNEQ/JMP,
/// sometimes a counted backward loop on r7 (the body never writes r7), ending in HALT.
fn random_interp_program(rng: &mut Rng) -> Vec<Insn> {
    let n = 3 + (rng.next() % 20) as usize;
    let mut p: Vec<Insn> = Vec::new();
    let looped = rng.next().is_multiple_of(2);
    if looped {
        p.push(i(MOVI, 7, 1 + (rng.next() % 5) as i32, 0));
    }
    let body_start = p.len() as i32;
    let reg = |rng: &mut Rng| (rng.next() % 7) as i32; // r0..r6: never r7
    for k in 0..n {
        let here = p.len() as i32;
        let end_guess = body_start + n as i32; // forward targets stay inside the body
        let op = rng.next() % 12;
        let ins = match op {
            0 => i(MOVI, reg(rng), rng.next() as i32 >> (rng.next() % 32), 0),
            1 => i(MOV, reg(rng), reg(rng), 0),
            2 => i(ADD, reg(rng), reg(rng), reg(rng)),
            3 => i(SUB, reg(rng), reg(rng), reg(rng)),
            4 => i(MUL, reg(rng), reg(rng), reg(rng)),
            5 => i(
                ADDI,
                reg(rng),
                reg(rng),
                rng.next() as i32 >> (rng.next() % 32),
            ),
            6 => i(XOR, reg(rng), reg(rng), reg(rng)),
            7 => i(ANDI, reg(rng), reg(rng), rng.next() as i32),
            8 => i(SHRI, reg(rng), reg(rng), (rng.next() % 80) as i32),
            9 if k + 1 < n => {
                let t = here + 1 + (rng.next() % (end_guess - here) as u64) as i32;
                i(BNEQ, 0, reg(rng), t)
            }
            10 if k + 1 < n => {
                let t = here + 1 + (rng.next() % (end_guess - here) as u64) as i32;
                i(JMP, 0, 0, t)
            }
            _ => i(ADDI, reg(rng), reg(rng), 1),
        };
        p.push(ins);
    }
    if looped {
        p.push(i(ADDI, 7, 7, -1));
        p.push(i(BNEQ, 0, 7, body_start));
    }
    p.push(i(HALT, 0, 0, 0));
    p
}

#[test]
fn interp_switch_random_programs() {
    let lib = SampleLib::build("interp_switch");
    let func = lib.function("interp_run");
    // SAFETY: the documented signature of interp_run.
    let orig: InterpRun = unsafe { lib.func("interp_run") };
    let mut rng = Rng(0x0bad_5eed_0000_0001);
    let programs = std::env::var("DYNSPEC_DIFF_PROGRAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    for pno in 0..programs {
        let code = random_interp_program(&mut rng);
        let prog = Program::new(&code);
        let mem = lib.memory(&[prog.range()]);
        let (oname, opts) = option_sets()[pno % 2].clone();
        let s = specialize_function(func, prog.addr(), &mem, opts)
            .unwrap_or_else(|e| panic!("random interp program {pno} ({oname}): {e}\n{code:?}"));
        check_variant("random interp", &s, &mem);
        // SAFETY: the variant has interp_run's ABI.
        let var: InterpRun = unsafe { s.func() };
        for round in 0..40 {
            let mut env = [0i64; 8];
            for e in env.iter_mut() {
                let r = rng.next();
                *e = if r & 1 == 0 {
                    (r >> 8) as i64 % 4
                } else {
                    r as i64
                };
            }
            let (mut e1, mut e2) = (env, env);
            // SAFETY: the program only uses env[0..8] and terminates (forward branches and
            // one counted loop).
            let r1 = unsafe { orig(prog.addr() as *const Insn, e1.as_mut_ptr()) };
            // SAFETY: same inputs, same ABI.
            let r2 = unsafe { var(prog.addr() as *const Insn, e2.as_mut_ptr()) };
            assert_eq!(
                (r1, e1),
                (r2, e2),
                "random interp program {pno} round {round}: {code:?}\nenv {env:?}"
            );
        }
    }
}

const BPF_CODES: [u16; 47] = [
    LD_W_ABS, LD_H_ABS, LD_B_ABS, LD_W_IND, LD_H_IND, LD_B_IND, LD_W_LEN, LD_IMM, LD_MEM, LDX_IMM,
    LDX_MEM, LDX_LEN, LDX_B_MSH, ST, STX, ALU_ADD_K, ALU_ADD_X, ALU_SUB_K, ALU_SUB_X, ALU_MUL_K,
    ALU_MUL_X, ALU_DIV_K, ALU_DIV_X, ALU_AND_K, ALU_AND_X, ALU_OR_K, ALU_OR_X, ALU_XOR_K,
    ALU_XOR_X, ALU_LSH_K, ALU_LSH_X, ALU_RSH_K, ALU_RSH_X, ALU_NEG, JMP_JA, JMP_JEQ_K, JMP_JEQ_X,
    JMP_JGT_K, JMP_JGT_X, JMP_JGE_K, JMP_JGE_X, JMP_JSET_K, JMP_JSET_X, RET_K, RET_A, MISC_TAX,
    MISC_TXA,
];

/// A random classic-BPF program: every jump forward and inside, ends with RET A.
fn random_bpf_program(rng: &mut Rng) -> Vec<BpfInsn> {
    let n = 2 + (rng.next() % 30) as usize;
    let mut p = Vec::new();
    for k in 0..n {
        let code = BPF_CODES[(rng.next() % BPF_CODES.len() as u64) as usize];
        let left = (n - k) as u64; // instructions after this one, including the final RET
        let kk = match code {
            LD_W_ABS | LD_H_ABS | LD_B_ABS | LD_W_IND | LD_H_IND | LD_B_IND | LDX_B_MSH => {
                (rng.next() % 140) as u32
            }
            JMP_JA => (rng.next() % left) as u32,
            _ => {
                if rng.next().is_multiple_of(2) {
                    (rng.next() % 40) as u32
                } else {
                    rng.next() as u32
                }
            }
        };
        let (jt, jf) = (
            (rng.next() % left.min(256)) as u8,
            (rng.next() % left.min(256)) as u8,
        );
        p.push(b(code, jt, jf, kk));
    }
    p.push(b(RET_A, 0, 0, 0));
    p
}

#[test]
fn bpf_filter_random_programs() {
    let lib = SampleLib::build("bpf_filter");
    let func = lib.function("bpf_run");
    // SAFETY: documented signature.
    let orig: BpfRun = unsafe { lib.func("bpf_run") };
    // SAFETY: documented signature.
    let packet: BpfDemoPacket = unsafe { lib.func("bpf_demo_packet") };
    let mut state = 0x1234_5678_9abc_def1u64;
    let mut pkts: Vec<(Vec<u8>, u32)> = Vec::new();
    for _ in 0..100 {
        let mut buf = vec![0u8; 128];
        // SAFETY: buf has 128 bytes; state is non-zero.
        let len = unsafe { packet(&mut state, buf.as_mut_ptr()) };
        pkts.push((buf, len));
    }
    let mut rng = Rng(0x0bad_5eed_0000_0002);
    for _ in 0..50 {
        let buf: Vec<u8> = (0..128).map(|_| rng.next() as u8).collect();
        let len = (rng.next() % 129) as u32;
        pkts.push((buf, len));
    }
    let programs = std::env::var("DYNSPEC_DIFF_PROGRAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(150);
    for pno in 0..programs {
        let code = random_bpf_program(&mut rng);
        let prog = Program::new(&code);
        let mem = lib.memory(&[prog.range()]);
        let (oname, opts) = option_sets()[pno % 2].clone();
        let s = specialize_function(func, prog.addr(), &mem, opts)
            .unwrap_or_else(|e| panic!("random bpf program {pno} ({oname}): {e}\n{code:?}"));
        check_variant("random bpf", &s, &mem);
        // SAFETY: the variant has bpf_run's ABI.
        let var: BpfRun = unsafe { s.func() };
        for (k, (buf, len)) in pkts.iter().enumerate() {
            // SAFETY: the packet has at least len bytes; the program is valid (forward jumps).
            let r1 = unsafe { orig(prog.addr() as *const BpfInsn, buf.as_ptr(), *len) };
            // SAFETY: same inputs, same ABI.
            let r2 = unsafe { var(prog.addr() as *const BpfInsn, buf.as_ptr(), *len) };
            assert_eq!(
                r1, r2,
                "random bpf program {pno}, packet {k} (len {len}): original {r1}, variant {r2}\n{code:?}"
            );
        }
    }
}

/// Stop the variant before its k-th instruction for a spread of k, apply the
/// deopt entry there and resume the original function: the result and the
/// memory it writes must be what the original computes alone.
fn deopt_resume_check(
    name: &str,
    m: &Machine,
    s: &Specialized,
    func: (Addr, u64),
    input: &Cpu,
    reset: &dyn Fn(),
    observe: &dyn Fn() -> Vec<u8>,
) -> usize {
    let spread = |k: u64| if k < 40 { k + 1 } else { k + k / 3 };
    deopt_resume(
        name,
        m,
        s,
        func,
        func.0 .0,
        input,
        reset,
        observe,
        &spread,
        &|_| false,
    )
    .0
}

/// Stop the variant `s` (entered with `input`) before its k-th instruction for k = 1, `next(1)`, ..., apply the
/// deopt entry there and resume the original function `func`: result and memory (`observe`) must be what the
/// original computes from `input` at `start` alone. Stops after the first stop whose original instruction
/// `last` accepts. Returns the stops checked and whether `last` was reached.
#[allow(clippy::too_many_arguments)]
fn deopt_resume(
    name: &str,
    m: &Machine,
    s: &Specialized,
    func: (Addr, u64),
    start: u64,
    input: &Cpu,
    reset: &dyn Fn(),
    observe: &dyn Fn() -> Vec<u8>,
    next: &dyn Fn(u64) -> u64,
    last: &dyn Fn(Addr) -> bool,
) -> (usize, bool) {
    let mut inp = *input;
    inp.regs[Gpr::Rsp.index()] = m.call_frame();
    reset();
    // SAFETY: the function returns into the harness epilogue through the call frame.
    let want = unsafe { m.run(start, &inp) };
    let want_mem = observe();
    let range = (s.addr(), s.addr() + s.encoded.code.len() as u64);
    let also = (func.0 .0, func.0 .0 + func.1);
    let mut checked = 0;
    let mut k = 1u64;
    loop {
        reset();
        inp.regs[Gpr::Rsp.index()] = m.call_frame();
        // SAFETY: as above; stepping stops inside the variant.
        let (mut cpu, stopped) = unsafe { m.run_stepped(s.addr(), &inp, range, also, k) };
        let Some(rip) = stopped else {
            return (checked, false);
        };
        let off = rip - s.addr();
        let e = s
            .encoded
            .deopt
            .iter()
            .find(|e| e.offset as u64 == off)
            .unwrap_or_else(|| {
                panic!("{name}: variant offset {off:#x} executes without a deopt entry")
            });
        for g in Gpr::ALL {
            if let Some(v) = e.state.reg(g) {
                cpu.regs[g.index()] = v;
            }
        }
        for f in Flag::ALL {
            if let Some(v) = e.state.flag(f) {
                cpu.set_flag(f, v);
            }
        }
        // SAFETY: resuming the original function; it returns into the epilogue.
        let got = unsafe { m.run(e.original.0, &cpu) };
        assert_eq!(
            (got.regs[Gpr::Rax.index()], observe()),
            (want.regs[Gpr::Rax.index()], want_mem.clone()),
            "{name}: stopped at variant offset {off:#x} (instruction {k}), resumed the original at {} with folded {}",
            e.original,
            specializer::snippet::state_text(&e.state)
        );
        checked += 1;
        if last(e.original) {
            return (checked, true);
        }
        k = next(k);
    }
}

#[test]
fn deopt_resumes_the_interpreters() {
    let m = Machine::new();
    common::on_crash(|| "deopt_resumes_the_interpreters".into());
    let mut total = 0;
    // interp_switch, every program with one env.
    let lib = SampleLib::build("interp_switch");
    let func = lib.function("interp_run");
    let env = std::cell::RefCell::new([0i64; 8]);
    let forwarding = Options {
        forward_stores: true,
        ..Options::default()
    };
    for ((name, prog), opts) in interp_programs(&lib)
        .into_iter()
        .flat_map(|p| [Options::default(), forwarding.clone()].map(|o| (p.clone(), o)))
    {
        let mem = lib.memory(&[prog.range()]);
        let s = specialize_function(func, prog.addr(), &mem, opts)
            .unwrap_or_else(|e| panic!("program {name}: {e}"));
        let mut input = Cpu::default();
        input.regs[Gpr::Rdi.index()] = prog.addr();
        input.regs[Gpr::Rsi.index()] = env.as_ptr() as u64;
        let init = [3i64, 5, 7, -1, 0, 2, 9, 4];
        let reset = || *env.borrow_mut() = init;
        let observe = || {
            env.borrow()
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect::<Vec<u8>>()
        };
        total += deopt_resume_check(name, &m, &s, func, &input, &reset, &observe);
    }
    // bpf_filter, every filter with a few packets.
    let lib = SampleLib::build("bpf_filter");
    let func = lib.function("bpf_run");
    // SAFETY: documented signature.
    let packet: BpfDemoPacket = unsafe { lib.func("bpf_demo_packet") };
    let mut state = 0x5555_aaaa_1234_5678u64;
    let mut pkts = Vec::new();
    for _ in 0..6 {
        let mut buf = vec![0u8; 128];
        // SAFETY: 128-byte buffer, non-zero state.
        let len = unsafe { packet(&mut state, buf.as_mut_ptr()) };
        pkts.push((buf, len));
    }
    for (name, prog) in bpf_filters(&lib) {
        let mem = lib.memory(&[prog.range()]);
        let s = specialize_function(func, prog.addr(), &mem, Options::default())
            .unwrap_or_else(|e| panic!("filter {name}: {e}"));
        for (buf, len) in &pkts {
            let mut input = Cpu::default();
            input.regs[Gpr::Rdi.index()] = prog.addr();
            input.regs[Gpr::Rsi.index()] = buf.as_ptr() as u64;
            input.regs[Gpr::Rdx.index()] = *len as u64;
            total += deopt_resume_check(name, &m, &s, func, &input, &|| {}, &Vec::new);
        }
    }
    assert!(total > 100, "only {total} deopt points checked");
    eprintln!("deopt: {total} stop points checked");
}

/// Deterministic performance guard (instruction counts, not time): the
/// specialized interpreters must execute far fewer instructions than the
/// originals on the demo programs. Thresholds are well below the speedups the
/// benchmark targets (interp >= 3x, bpf >= 2x in time).
#[test]
fn variants_execute_fewer_instructions() {
    let m = Machine::new();
    common::on_crash(|| "variants_execute_fewer_instructions".into());
    let lib = SampleLib::build("interp_switch");
    let func = lib.function("interp_run");
    let frange = (func.0 .0, func.0 .0 + func.1);
    let prog = interp_programs(&lib).swap_remove(0).1; // the demo program
    let mem = lib.memory(&[prog.range()]);
    let s = specialize_function(func, prog.addr(), &mem, Options::default()).expect("specialize");
    let mut env = [0i64; 8];
    let mut input = Cpu::default();
    input.regs[Gpr::Rdi.index()] = prog.addr();
    input.regs[Gpr::Rsi.index()] = env.as_mut_ptr() as u64;
    input.regs[Gpr::Rsp.index()] = m.call_frame();
    // SAFETY: interp_run on a valid program returns into the harness through the call frame.
    let (o1, orig, _) = unsafe { m.count_instructions(func.0 .0, &input, frange, (0, 0)) };
    env = [0; 8];
    input.regs[Gpr::Rsp.index()] = m.call_frame();
    let vrange = (s.addr(), s.addr() + s.encoded.code.len() as u64);
    // SAFETY: the variant has the same ABI; its exits run in the original function.
    let (o2, var, var_orig) = unsafe { m.count_instructions(s.addr(), &input, vrange, frange) };
    let _ = env;
    assert_eq!(o1.regs[Gpr::Rax.index()], o2.regs[Gpr::Rax.index()]);
    let spec = var + var_orig;
    eprintln!("interp demo: original {orig} instructions, variant {spec} ({var} in the variant)");
    assert!(
        spec * 2 <= orig,
        "interp demo: the variant executes {spec} instructions, the original {orig} (want at most half)"
    );

    let lib = SampleLib::build("bpf_filter");
    let func = lib.function("bpf_run");
    let frange = (func.0 .0, func.0 .0 + func.1);
    // SAFETY: documented signature.
    let packet: BpfDemoPacket = unsafe { lib.func("bpf_demo_packet") };
    let prog = bpf_filters(&lib).swap_remove(0).1; // the demo filter
    let mem = lib.memory(&[prog.range()]);
    let s = specialize_function(func, prog.addr(), &mem, Options::default()).expect("specialize");
    let vrange = (s.addr(), s.addr() + s.encoded.code.len() as u64);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let (mut orig, mut spec) = (0, 0);
    for _ in 0..64 {
        let mut buf = vec![0u8; 128];
        // SAFETY: 128-byte buffer, non-zero state.
        let len = unsafe { packet(&mut state, buf.as_mut_ptr()) };
        let mut input = Cpu::default();
        input.regs[Gpr::Rdi.index()] = prog.addr();
        input.regs[Gpr::Rsi.index()] = buf.as_ptr() as u64;
        input.regs[Gpr::Rdx.index()] = len as u64;
        input.regs[Gpr::Rsp.index()] = m.call_frame();
        // SAFETY: as above.
        let (o1, n1, _) = unsafe { m.count_instructions(func.0 .0, &input, frange, (0, 0)) };
        input.regs[Gpr::Rsp.index()] = m.call_frame();
        // SAFETY: as above.
        let (o2, v, vo) = unsafe { m.count_instructions(s.addr(), &input, vrange, frange) };
        assert_eq!(
            o1.regs[Gpr::Rax.index()] as u32,
            o2.regs[Gpr::Rax.index()] as u32
        );
        orig += n1;
        spec += v + vo;
    }
    eprintln!("bpf demo (64 packets): original {orig} instructions, variant {spec}");
    assert!(
        spec * 3 <= orig * 2,
        "bpf demo: the variant executes {spec} instructions, the original {orig} (want at most 2/3)"
    );
}

/// selfmod_interp's program (`OP_PATCH 12: code[res].op2 = env[op1]` rewrites its own bytecode), with an outer
/// count of `size`.
fn selfmod_program(size: i32) -> Vec<u8> {
    const PATCH: i32 = 12;
    let prog = [
        i(MOVI, 0, 0, 0),
        i(MOVI, 1, size, 0),
        i(MOVI, 5, 1, 0),
        i(JMP, 0, 0, 17),
        i(ANDI, 7, 1, 255),
        i(PATCH, 9, 7, 0),
        i(MOVI, 2, 8, 0),
        i(MUL, 3, 5, 2),
        i(ADD, 0, 0, 3),
        i(ADDI, 5, 5, 0),
        i(SHRI, 4, 0, 7),
        i(XOR, 5, 5, 4),
        i(ANDI, 5, 5, 0xffffff),
        i(ADDI, 2, 2, -1),
        i(BNEQ, 0, 2, 7),
        i(SUB, 0, 0, 1),
        i(ADDI, 1, 1, -1),
        i(BNEQ, 0, 1, 4),
        i(MOV, 6, 5, 0),
        i(HALT, 0, 0, 0),
    ];
    // SAFETY: Insn is plain-old-data repr(C).
    unsafe { std::slice::from_raw_parts(prog.as_ptr() as *const u8, std::mem::size_of_val(&prog)) }
        .to_vec()
}

/// [`deopt_resume`] at every instruction of the variant `s` up to and including the first whose original
/// instruction writes the bytecode (a store through rdi: there its guard stops it in a live process). Returns
/// whether that store was reached.
#[allow(clippy::too_many_arguments)]
fn deopt_resume_until_code_write(
    name: &str,
    m: &Machine,
    s: &Specialized,
    mem: &SelfMemory,
    func: (Addr, u64),
    start: u64,
    input: &Cpu,
    reset: &dyn Fn(),
    observe: &dyn Fn() -> Vec<u8>,
) -> bool {
    let writes_code = |a: Addr| {
        let mut b = [0u8; 16];
        mem.read(a, &mut b).expect("original code");
        let ins = iced_x86::Decoder::with_ip(64, &b, a.0, 0).decode();
        ins.op_count() == 2
            && ins.op0_kind() == iced_x86::OpKind::Memory
            && ins.memory_base() == iced_x86::Register::RDI
    };
    deopt_resume(
        name,
        m,
        s,
        func,
        start,
        input,
        reset,
        observe,
        &|k| k + 1,
        &writes_code,
    )
    .1
}

/// A variant that folded the bytecode is stopped by its guard at the program's first bytecode write and resumed
/// in the original code through its deopt entry there. With store forwarding the value stored comes from a
/// register that held an earlier store (env[op1]): every stop point up to that store must resume correctly.
#[test]
fn deopt_resumes_the_self_modifying_interpreter_up_to_its_first_bytecode_write() {
    let m = Machine::new();
    common::on_crash(|| "deopt_resumes_the_self_modifying_interpreter".into());
    let lib = SampleLib::build("selfmod_interp");
    let func = lib.function("selfmod_run");
    let bytes = selfmod_program(3);
    let page = Mapping::anywhere(4096);
    let code = page.addr;
    let env = std::cell::RefCell::new([0i64; 8]);
    let reset = || {
        *env.borrow_mut() = [0; 8];
        page.write(0, &bytes);
    };
    let observe = || {
        let mut out: Vec<u8> = env.borrow().iter().flat_map(|v| v.to_le_bytes()).collect();
        // SAFETY: the page is mapped and holds the program's bytes.
        out.extend_from_slice(unsafe {
            std::slice::from_raw_parts(code as *const u8, bytes.len())
        });
        out
    };
    for (oname, opts) in option_sets() {
        reset();
        let mem = lib.memory(&[(code, code + 4096)]);
        let s = specialize_function(func, code, &mem, opts)
            .unwrap_or_else(|e| panic!("selfmod ({oname}): {e}"));
        let mut input = Cpu::default();
        input.regs[Gpr::Rdi.index()] = code;
        input.regs[Gpr::Rsi.index()] = env.as_ptr() as u64;
        let reached = deopt_resume_until_code_write(
            &format!("selfmod from the entry ({oname})"),
            &m,
            &s,
            &mem,
            func,
            func.0 .0,
            &input,
            &reset,
            &observe,
        );
        assert!(reached, "{oname}: no stop at the bytecode write");
    }
}

/// The same for the variants dynspec installs: entered at the dispatch with the bytecode pc in rax (one
/// variant per bytecode instruction), the registers the profile saw constant there assumed (code, env, the jump
/// table), store forwarding within the program's writable memory, exits back to the dispatch when the pc is
/// unknown.
#[test]
fn deopt_resumes_the_self_modifying_interpreter_entered_at_its_dispatch() {
    let m = Machine::new();
    common::on_crash(|| "deopt_resumes_the_self_modifying_interpreter_at_its_dispatch".into());
    let lib = SampleLib::build("selfmod_interp");
    let func = lib.function("selfmod_run");
    let bytes = selfmod_program(3);
    let page = Mapping::anywhere(4096);
    let code = page.addr;
    let env = std::cell::RefCell::new([0i64; 8]);
    let env_at = env.as_ptr() as u64;
    // An environment from the middle of a run: outer count 3, inner count 3 (every loop ends).
    let start_env = [5i64, 3, 3, 0, 0, 7, 0, 0];
    let reset = || {
        *env.borrow_mut() = start_env;
        page.write(0, &bytes);
    };
    let observe = || {
        let mut out: Vec<u8> = env.borrow().iter().flat_map(|v| v.to_le_bytes()).collect();
        // SAFETY: the page is mapped and holds the program's bytes.
        out.extend_from_slice(unsafe {
            std::slice::from_raw_parts(code as *const u8, bytes.len())
        });
        out
    };
    let mem = lib.memory(&[(code, code + 4096)]);
    // The dispatch is the instruction after `lea r8, [rip + table]` (the jump table's base).
    let mut fcode = vec![0u8; func.1 as usize];
    mem.read(func.0, &mut fcode).expect("function code");
    let mut dec = iced_x86::Decoder::with_ip(64, &fcode, func.0 .0, 0);
    let (dispatch, table) = loop {
        let ins = dec.decode();
        assert!(!ins.is_invalid(), "no lea r8 in selfmod_run");
        if ins.mnemonic() == iced_x86::Mnemonic::Lea && ins.op0_register() == iced_x86::Register::R8
        {
            break (ins.next_ip(), ins.memory_displacement64());
        }
    };
    let mut reached = 0;
    // With the environment's address assumed or not (it is a register the profile may see constant or not).
    for (pc, env_known) in (4..=17u64).flat_map(|pc| [(pc, true), (pc, false)]) {
        let mut known = KnownState::default();
        known.set_reg(Gpr::Rax, Some(code + 16 * pc));
        known.set_reg(Gpr::Rdi, Some(code));
        if env_known {
            known.set_reg(Gpr::Rsi, Some(env_at));
        }
        known.set_reg(Gpr::R8, Some(table));
        let req = Request {
            entry: Addr(dispatch),
            region_start: func.0,
            region_end: func.0.offset(func.1),
            known,
            options: Options {
                forward_stores: true,
                forward_within: Some(vec![
                    (Addr(code), Addr(code + 4096)),
                    (Addr(env_at), Addr(env_at + 64)),
                ]),
                redispatch_at: Some((Addr(dispatch), Gpr::Rax)),
                ..Options::default()
            },
        };
        reset();
        let s =
            specialize_request(&req, &mem).unwrap_or_else(|e| panic!("selfmod at pc {pc}: {e}"));
        let mut input = Cpu::default();
        input.regs[Gpr::Rax.index()] = code + 16 * pc;
        input.regs[Gpr::Rdi.index()] = code;
        input.regs[Gpr::Rsi.index()] = env_at;
        input.regs[Gpr::R8.index()] = table;
        if deopt_resume_until_code_write(
            &format!("selfmod at pc {pc} (env known: {env_known})"),
            &m,
            &s,
            &mem,
            func,
            dispatch,
            &input,
            &reset,
            &observe,
        ) {
            reached += 1;
        }
    }
    assert!(
        reached >= 20,
        "only {reached} variants reached the bytecode write"
    );
}
