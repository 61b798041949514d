//! ARCHITECTURE.md invariant 5, in-process: a dispatch stub (hit and fall-back paths) leaves every register, the flags, rsp and
//! the red zone exactly as the original instructions do.

use codecache::stub::{build_stub, jmp_rel32, plan_patch, StubTarget};
use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, Instruction, InstructionBlock, MemoryOperand, Register,
};
use specializer::{Addr, Gpr};

const PAGE: usize = 4096;
/// State layout: regs[16] in Gpr order, flags at 128, red zone qwords at 136 (16 of them), rsp slot at 264.
const FLAGS: i64 = 128;
const RED: i64 = 136;
const SLOT: usize = 264;

/// An RW anonymous mapping made RX once filled (W^X in the test process too).
struct Buf {
    ptr: *mut u8,
    len: usize,
}

impl Buf {
    fn new(len: usize) -> Buf {
        // SAFETY: anonymous private mapping; checked for MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Buf {
            ptr: p as *mut u8,
            len,
        }
    }
    fn addr(&self) -> u64 {
        self.ptr as u64
    }
    fn write(&self, off: usize, bytes: &[u8]) {
        assert!(off + bytes.len() <= self.len);
        // SAFETY: in bounds of our RW mapping (checked above).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(off), bytes.len()) };
    }
    fn read_u64(&self, off: usize) -> u64 {
        let mut b = [0u8; 8];
        // SAFETY: in bounds of our mapping, which stays readable.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(off), b.as_mut_ptr(), 8) };
        u64::from_le_bytes(b)
    }
    fn protect_code(&self, code_len: usize) {
        // SAFETY: the first `code_len` bytes of our own mapping become r-x.
        let r = unsafe {
            libc::mprotect(
                self.ptr as *mut libc::c_void,
                code_len,
                libc::PROT_READ | libc::PROT_EXEC,
            )
        };
        assert_eq!(r, 0);
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mapping.
        unsafe { libc::munmap(self.ptr as *mut libc::c_void, self.len) };
    }
}

fn enc(ins: &[Instruction], ip: u64) -> Vec<u8> {
    BlockEncoder::encode(
        64,
        InstructionBlock::new(ins, ip),
        BlockEncoderOptions::NONE,
    )
    .expect("encode")
    .code_buffer
}

fn mem(base: Register, d: i64) -> MemoryOperand {
    MemoryOperand::with_base_displ(base, d)
}

fn marker(k: i64) -> u64 {
    0x5eed_0000_0000_0000 | (k as u64 * 0x1111)
}

/// The two displaced instructions at the trigger (7 bytes): `lea r11,[r10+1]; mov r9,r8`.
fn site_body() -> Vec<Instruction> {
    vec![
        Instruction::with2(Code::Lea_r64_m, Register::R11, mem(Register::R10, 1)).unwrap(),
        Instruction::with2(Code::Mov_r64_rm64, Register::R9, Register::R8).unwrap(),
    ]
}

/// Harness code at `ip`: loads the input state from *rdi, runs the site, stores the output at `out`.
/// Returns (code, offset of the trigger site).
fn harness(ip: u64, out: u64, slot: u64) -> (Vec<u8>, usize) {
    macro_rules! i2 {
        ($c:expr, $a:expr, $b:expr) => {
            Instruction::with2($c, $a, $b).unwrap()
        };
    }
    let mut pre = Vec::new();
    for r in [
        Register::RBX,
        Register::RBP,
        Register::R12,
        Register::R13,
        Register::R14,
        Register::R15,
    ] {
        pre.push(Instruction::with1(Code::Push_r64, r).unwrap());
    }
    pre.push(i2!(
        Code::Mov_rm64_r64,
        mem(Register::RIP, slot as i64),
        Register::RSP
    ));
    pre.push(Instruction::with1(Code::Push_rm64, mem(Register::RDI, FLAGS)).unwrap());
    pre.push(Instruction::with(Code::Popfq));
    for k in 0..16 {
        pre.push(i2!(Code::Mov_r64_imm64, Register::RAX, marker(k)));
        pre.push(i2!(
            Code::Mov_rm64_r64,
            mem(Register::RSP, -8 - 8 * k),
            Register::RAX
        ));
    }
    for g in Gpr::ALL {
        if g != Gpr::Rsp && g != Gpr::Rdi {
            pre.push(i2!(
                Code::Mov_r64_rm64,
                g.to_iced(),
                mem(Register::RDI, 8 * g.index() as i64)
            ));
        }
    }
    pre.push(i2!(
        Code::Mov_r64_rm64,
        Register::RDI,
        mem(Register::RDI, 8 * Gpr::Rdi.index() as i64)
    ));
    let pre_len = enc(&pre, ip).len();
    let mut post = Vec::new();
    post.push(i2!(
        Code::Mov_rm64_r64,
        mem(Register::RIP, out as i64),
        Register::RAX
    ));
    post.push(i2!(Code::Mov_r64_imm64, Register::RAX, out));
    for g in Gpr::ALL {
        if g != Gpr::Rax {
            post.push(i2!(
                Code::Mov_rm64_r64,
                mem(Register::RAX, 8 * g.index() as i64),
                g.to_iced()
            ));
        }
    }
    for k in 0..16 {
        post.push(i2!(
            Code::Mov_r64_rm64,
            Register::RBX,
            mem(Register::RSP, -8 - 8 * k)
        ));
        post.push(i2!(
            Code::Mov_rm64_r64,
            mem(Register::RAX, RED + 8 * k),
            Register::RBX
        ));
    }
    post.push(Instruction::with(Code::Pushfq));
    post.push(Instruction::with1(Code::Pop_r64, Register::RBX).unwrap());
    post.push(i2!(
        Code::Mov_rm64_r64,
        mem(Register::RAX, FLAGS),
        Register::RBX
    ));
    post.push(i2!(
        Code::Mov_r64_rm64,
        Register::RSP,
        mem(Register::RIP, slot as i64)
    ));
    for r in [
        Register::R15,
        Register::R14,
        Register::R13,
        Register::R12,
        Register::RBP,
        Register::RBX,
    ] {
        post.push(Instruction::with1(Code::Pop_r64, r).unwrap());
    }
    post.push(Instruction::with(Code::Retnq));
    let mut all = pre;
    all.extend(site_body());
    all.extend(post);
    let code = enc(&all, ip);
    (code, pre_len)
}

/// A stub to patch in: trigger register, its values, assumed registers, enabled word.
type Patch<'a> = (Gpr, &'a [u64], &'a [(Gpr, u64)], bool);

/// Run the site once with `input` (optionally patched with a stub dispatching on `reg`); returns the
/// output state and (hit counter, fallback counter).
fn run(input: &[u64; 17], patched: Option<Patch>) -> (Vec<u64>, u64, u64) {
    let buf = Buf::new(4 * PAGE);
    let base = buf.addr();
    let data = base + 3 * PAGE as u64;
    let (out, slot, inp) = (data, data + SLOT as u64, data + 0x200);
    let counters = data + 0x800;
    let (code, site_off) = harness(base, out, slot);
    assert!(code.len() < 0x800);
    buf.write(0, &code);
    let mut input_bytes = Vec::new();
    for v in input {
        input_bytes.extend_from_slice(&v.to_le_bytes());
    }
    buf.write(0x200 + 3 * PAGE, &input_bytes);
    let site = base + site_off as u64;
    if let Some((reg, values, assumed, enabled)) = patched {
        let p = plan_patch(&code, Addr(base), Addr(site), &|_, _| false).expect("patchable");
        assert_eq!(p.len(), 7);
        // The "variant": the same two instructions, then back after the site.
        let variant = base + 0x800;
        let mut v = site_body();
        v.push(Instruction::with_branch(Code::Jmp_rel32_64, site + 7).unwrap());
        buf.write(0x800, &enc(&v, variant));
        let targets: Vec<StubTarget> = values
            .iter()
            .map(|&value| StubTarget {
                value: Some(value),
                entry: Addr(variant),
                counter: Addr(counters),
            })
            .collect();
        let stub_at = base + 0x1000;
        let stub = build_stub(
            Addr(stub_at),
            &p,
            Some(reg),
            assumed,
            &targets,
            Addr(counters + 8),
            Addr(counters + 16),
        )
        .expect("stub");
        buf.write(0x1000, &stub.code);
        buf.write(3 * PAGE + 0x810, &u64::from(enabled).to_le_bytes());
        buf.write(site_off, &jmp_rel32(site, stub.entry.0).expect("reach"));
    }
    buf.protect_code(3 * PAGE);
    // SAFETY: the buffer holds a complete function following the SysV ABI (callee-saved registers restored,
    // DF left as loaded, which the inputs keep clear); it reads its input at `inp`, writes only to the data page.
    let f: extern "C" fn(u64) = unsafe { std::mem::transmute(base as *const u8) };
    f(inp);
    let outv: Vec<u64> = (0..(RED as usize / 8 + 16))
        .map(|i| buf.read_u64(3 * PAGE + 8 * i))
        .collect();
    let rsp_slot = buf.read_u64(3 * PAGE + SLOT);
    assert_eq!(outv[Gpr::Rsp.index()], rsp_slot, "rsp restored");
    (
        outv,
        buf.read_u64(3 * PAGE + 0x800),
        buf.read_u64(3 * PAGE + 0x808),
    )
}

#[test]
fn stub_paths_are_invisible() {
    // CF PF AF ZF SF OF set / all clear (DF stays clear: Rust code runs right after).
    for flags in [0x8d5u64 | 0x2, 0x2] {
        for (reg, n) in [Gpr::Rax, Gpr::Rcx, Gpr::Rdi, Gpr::R10, Gpr::R15]
            .into_iter()
            .flat_map(|r| [(r, 1u64), (r, 3), (r, 9), (r, 20)])
        {
            let mut input = [0u64; 17];
            for (i, v) in input.iter_mut().enumerate().take(16) {
                *v = 0x1000_0000_0000_0001u64.wrapping_mul(i as u64 + 3) ^ 0xabcdef;
            }
            input[16] = flags;
            // The values contain the register's value (k = n/2): a hit; shifting it by 8 makes a miss.
            let values: Vec<u64> = (0..n)
                .map(|k| {
                    input[reg.index()]
                        .wrapping_add(k * 16)
                        .wrapping_sub(n / 2 * 16)
                })
                .collect();
            // A disabled stub (zero enabled word) always falls back.
            for (hit, delta, enabled) in [(true, 0u64, true), (false, 8, true), (false, 0, false)] {
                let mut inp = input;
                inp[reg.index()] = inp[reg.index()].wrapping_add(delta);
                let (native, _, _) = run(&inp, None);
                let (stubbed, hits, falls) = run(&inp, Some((reg, &values, &[], enabled)));
                let rsp = Gpr::Rsp.index();
                for i in 0..native.len() {
                    if i == rsp {
                        continue;
                    }
                    assert_eq!(
                        native[i], stubbed[i],
                        "slot {i} differs (reg {reg}, {n} values, hit {hit}, flags {flags:#x})"
                    );
                }
                assert_eq!(
                    (hits, falls),
                    if hit { (1, 0) } else { (0, 1) },
                    "reg {reg}, {n} values"
                );
            }
        }
    }
}

#[test]
fn assumed_registers_are_checked_invisibly() {
    for flags in [0x8d5u64 | 0x2, 0x2] {
        for (reg, n) in [Gpr::Rdi, Gpr::Rax, Gpr::Rcx]
            .into_iter()
            .flat_map(|r| [(r, 1u64), (r, 3), (r, 20)])
        {
            let mut input = [0u64; 17];
            for (i, v) in input.iter_mut().enumerate().take(16) {
                *v = 0x1000_0000_0000_0001u64.wrapping_mul(i as u64 + 3) ^ 0xabcdef;
            }
            input[16] = flags;
            let values: Vec<u64> = (0..n)
                .map(|k| input[reg.index()].wrapping_add(k * 16))
                .collect();
            // rax and rcx are the stub's scratch registers (read back from the stack), r8 an ordinary one.
            let assumed: Vec<(Gpr, u64)> = [Gpr::Rax, Gpr::Rcx, Gpr::R8, Gpr::Rsi]
                .into_iter()
                .filter(|g| *g != reg)
                .map(|g| (g, input[g.index()]))
                .collect();
            // (register to disturb, hit?): nothing, the trigger, then each assumed register in turn.
            let mut cases: Vec<(Option<Gpr>, bool)> = vec![(None, true), (Some(reg), false)];
            cases.extend(assumed.iter().map(|(g, _)| (Some(*g), false)));
            for (disturb, hit) in cases {
                let mut inp = input;
                if let Some(g) = disturb {
                    inp[g.index()] = inp[g.index()].wrapping_add(8);
                }
                let (native, _, _) = run(&inp, None);
                let (stubbed, hits, falls) = run(&inp, Some((reg, &values, &assumed, true)));
                for i in 0..native.len() {
                    if i == Gpr::Rsp.index() {
                        continue;
                    }
                    assert_eq!(
                        native[i], stubbed[i],
                        "slot {i} differs (reg {reg}, {n} values, disturbed {disturb:?}, flags {flags:#x})"
                    );
                }
                assert_eq!(
                    (hits, falls),
                    if hit { (1, 0) } else { (0, 1) },
                    "reg {reg}, {n} values, disturbed {disturb:?}"
                );
            }
        }
    }
}
