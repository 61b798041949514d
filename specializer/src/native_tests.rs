//! In-process tests: specialize real compiled code and run original and variant side by side.

use crate::*;
use iced_x86::code_asm::*;
use std::path::{Path, PathBuf};

/// Readable ranges of this process (from /proc/self/maps) with their constness.
pub(crate) struct SelfMemory {
    ranges: Vec<(u64, u64, bool)>,
}

impl SelfMemory {
    /// `extra_const`: page-aligned ranges (e.g. a bytecode buffer) to treat as constant.
    pub(crate) fn new(extra_const: &[(u64, u64)]) -> SelfMemory {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        let mut ranges = Vec::new();
        for line in maps.lines() {
            let mut it = line.split_whitespace();
            let (Some(r), Some(perm)) = (it.next(), it.next()) else {
                continue;
            };
            let Some((a, b)) = r.split_once('-') else {
                continue;
            };
            let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
                continue;
            };
            if !perm.starts_with('r') {
                continue;
            }
            let cst = !perm.contains('w');
            ranges.push((a, b, cst));
        }
        for &(a, b) in extra_const {
            ranges.push((a, b, true));
        }
        SelfMemory { ranges }
    }
}

impl Memory for SelfMemory {
    fn read(&self, addr: Addr, buf: &mut [u8]) -> Result<(), MemoryError> {
        let end = addr.0 + buf.len() as u64;
        let ok = self.ranges.iter().any(|&(a, b, _)| addr.0 >= a && end <= b);
        if !ok {
            return Err(MemoryError::Unreadable(addr));
        }
        // SAFETY: the range lies inside a readable mapping of this process.
        unsafe { std::ptr::copy_nonoverlapping(addr.0 as *const u8, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }
    fn is_constant(&self, page: Addr) -> bool {
        // Later entries (explicit constant ranges) win over the maps.
        self.ranges
            .iter()
            .rev()
            .find(|&&(a, b, _)| page.0 >= a && page.0 < b)
            .map(|r| r.2)
            .unwrap_or(false)
    }
}

/// Executable copy of encoded code.
pub(crate) struct ExecCode {
    map: memmap2::Mmap,
}

impl ExecCode {
    /// Map `size` bytes, let `f` produce code for the mapping's address, make it executable.
    pub(crate) fn build(size: usize, f: impl FnOnce(u64) -> Vec<u8>) -> ExecCode {
        let mut m = memmap2::MmapMut::map_anon(size.max(4096)).expect("mmap");
        let base = m.as_ptr() as u64;
        let code = f(base);
        assert!(code.len() <= m.len());
        m[..code.len()].copy_from_slice(&code);
        ExecCode {
            map: m.make_exec().expect("mprotect"),
        }
    }
    pub(crate) fn addr(&self) -> u64 {
        self.map.as_ptr() as u64
    }
}

/// Assemble a function with code_asm into executable memory.
fn asm_fn(f: impl Fn(&mut CodeAssembler)) -> ExecCode {
    ExecCode::build(4096, |base| {
        let mut a = CodeAssembler::new(64).unwrap();
        f(&mut a);
        a.assemble(base).unwrap()
    })
}

fn specialize_fn(
    code: &ExecCode,
    len: u64,
    known: &[(Gpr, u64)],
    consts: &[(u64, u64)],
) -> (Variant, ExecCode) {
    let options = Options {
        forward_stores: true,
        ..Options::default()
    };
    specialize_fn_with(code, len, known, consts, options)
}

fn specialize_fn_with(
    code: &ExecCode,
    len: u64,
    known: &[(Gpr, u64)],
    consts: &[(u64, u64)],
    options: Options,
) -> (Variant, ExecCode) {
    let mut k = KnownState::default();
    for &(g, v) in known {
        k.set_reg(g, Some(v));
    }
    let req = Request {
        entry: Addr(code.addr()),
        region_start: Addr(code.addr()),
        region_end: Addr(code.addr() + len),
        known: k,
        options,
    };
    let mem = SelfMemory::new(consts);
    let v = specialize(&req, &mem).expect("specialize");
    let exec = ExecCode::build(1 << 20, |base| v.encode(Addr(base)).expect("encode").code);
    (v, exec)
}

type Fn2 = extern "C" fn(u64, u64) -> u64;

fn call2(addr: u64, a: u64, b: u64) -> u64 {
    // SAFETY: addr points at executable code following the SysV ABI for two integer args.
    let f: Fn2 = unsafe { std::mem::transmute(addr as *const u8) };
    f(a, b)
}

#[test]
fn folds_arith_and_flags() {
    // rax = rdi * 3 + rsi; if rdi > 5 then rax += 100
    let code = asm_fn(|a| {
        let mut big = a.create_label();
        let mut out = a.create_label();
        a.lea(rax, ptr(rdi + rdi * 2)).unwrap();
        a.add(rax, rsi).unwrap();
        a.cmp(rdi, 5).unwrap();
        a.ja(big).unwrap();
        a.jmp(out).unwrap();
        a.set_label(&mut big).unwrap();
        a.add(rax, 100).unwrap();
        a.set_label(&mut out).unwrap();
        a.ret().unwrap();
    });
    for x in [1u64, 7] {
        let (v, var) = specialize_fn(&code, 64, &[(Gpr::Rdi, x)], &[]);
        for y in [0u64, 5, u64::MAX] {
            assert_eq!(call2(var.addr(), x, y), call2(code.addr(), x, y));
        }
        let asm = v.residual_asm();
        assert!(!asm.iter().any(|l| l.starts_with("cmp rdi")), "{asm:?}");
    }
}

#[test]
fn carry_chain_and_setcc() {
    // rax = (rdi + 0xffffffff) as u32 carry -> setc; plus sub-register merges
    let code = asm_fn(|a| {
        a.mov(eax, edi).unwrap();
        a.add(eax, -1i32).unwrap();
        a.setc(cl).unwrap();
        a.movzx(ecx, cl).unwrap();
        a.mov(ah, 0x12).unwrap();
        a.adc(rax, rsi).unwrap();
        a.shl(rax, 3).unwrap();
        a.add(rax, rcx).unwrap();
        a.ret().unwrap();
    });
    for x in [0u64, 1, 0x1_0000_0000] {
        let (_, var) = specialize_fn(&code, 64, &[(Gpr::Rdi, x)], &[]);
        for y in [0u64, 3, u64::MAX] {
            assert_eq!(
                call2(var.addr(), x, y),
                call2(code.addr(), x, y),
                "x={x} y={y}"
            );
        }
    }
}

#[test]
fn loop_with_unknown_bound_terminates() {
    // for (i = 0; i < rsi; i++) rax += i * rdi
    let code = asm_fn(|a| {
        let mut top = a.create_label();
        let mut done = a.create_label();
        a.xor(eax, eax).unwrap();
        a.xor(ecx, ecx).unwrap();
        a.set_label(&mut top).unwrap();
        a.cmp(rcx, rsi).unwrap();
        a.jae(done).unwrap();
        a.mov(rdx, rcx).unwrap();
        a.imul_2(rdx, rdi).unwrap();
        a.add(rax, rdx).unwrap();
        a.inc(rcx).unwrap();
        a.jmp(top).unwrap();
        a.set_label(&mut done).unwrap();
        a.ret().unwrap();
    });
    let (v, var) = specialize_fn(&code, 64, &[(Gpr::Rdi, 3)], &[]);
    for y in [0u64, 1, 5, 100] {
        assert_eq!(call2(var.addr(), 3, y), call2(code.addr(), 3, y));
    }
    assert!(v.instruction_count() < 400, "{}", v.instruction_count());
}

/// Compile a sample as a shared object into a temp dir of its own (tests run in parallel and must not dlopen
/// a library another test is rewriting); `None` without gcc. The library stays mapped after its file is gone:
/// drop the directory once it is loaded.
fn build_sample(name: &str) -> Option<(tempfile::TempDir, PathBuf)> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../samples")
        .join(format!("{name}.c"));
    let dir = tempfile::Builder::new()
        .prefix("specializer-native-")
        .tempdir()
        .ok()?;
    let out = dir.path().join(format!("{name}.so"));
    let st = std::process::Command::new("gcc")
        .args(["-O2", "-DDYNSPEC_NO_MAIN", "-shared", "-fPIC", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .ok()?;
    st.success().then_some((dir, out))
}

/// Symbol size from `nm -S`.
fn symbol_size(so: &Path, sym: &str) -> u64 {
    let out = std::process::Command::new("nm")
        .arg("-S")
        .arg(so)
        .output()
        .expect("nm");
    let text = String::from_utf8_lossy(&out.stdout);
    for l in text.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() == 4 && f[3] == sym {
            return u64::from_str_radix(f[1], 16).expect("size");
        }
    }
    panic!("no symbol {sym}");
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    op: i32,
    res: i32,
    op1: i32,
    op2: i32,
}

type InterpRun = extern "C" fn(*const Insn, *mut i64) -> i64;
type DemoProgram = extern "C" fn(i64, *mut usize) -> *mut Insn;

fn time<T>(f: impl FnOnce() -> T) -> (T, f64) {
    let t = std::time::Instant::now();
    let r = f();
    (r, t.elapsed().as_secs_f64())
}

#[test]
fn interp_switch_differential() {
    let Some((dir, so)) = build_sample("interp_switch") else {
        eprintln!("gcc not available; skipping");
        return;
    };
    let size = symbol_size(&so, "interp_run");
    // SAFETY: loading a sample library we just compiled; it has no constructors.
    let lib = unsafe { libloading::Library::new(&so) }.expect("dlopen");
    drop(dir);
    // SAFETY: symbol types match the C declarations in samples/interp_switch.c.
    let run: libloading::Symbol<InterpRun> = unsafe { lib.get(b"interp_run") }.expect("sym");
    // SAFETY: as above.
    let demo: libloading::Symbol<DemoProgram> =
        unsafe { lib.get(b"interp_demo_program") }.expect("sym");
    let mut n = 0usize;
    let iterations: i64 = std::env::var("INTERP_SIZE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let prog = demo(iterations, &mut n);
    assert!(!prog.is_null());
    let entry = *run as usize as u64;
    let page = prog as u64;
    let mut known = KnownState::default();
    known.set_reg(Gpr::Rdi, Some(page));
    let req = Request {
        entry: Addr(entry),
        region_start: Addr(entry),
        region_end: Addr(entry + size),
        known,
        // A whole function entered at its start: scratch registers are fine.
        options: Options {
            scratch_registers: true,
            // Private env / packet memory, single thread: safe to forward.
            forward_stores: std::env::var("FORWARD").map(|v| v != "0").unwrap_or(true),
            ..Options::default()
        },
    };
    let mem = SelfMemory::new(&[(page, page + 4096)]);
    let v = specialize(&req, &mem).expect("specialize");
    if std::env::var("SHOW_ASM").is_ok() {
        for l in v.residual_asm() {
            eprintln!("{l}");
        }
    }
    eprintln!("stats {:?} exits {}", v.stats, v.exits.len());
    let exec = ExecCode::build(1 << 20, |base| v.encode(Addr(base)).expect("encode").code);
    // SAFETY: the variant follows the same ABI as interp_run.
    let var: InterpRun = unsafe { std::mem::transmute(exec.addr() as *const u8) };
    let mut env1 = [0i64; 8];
    let mut env2 = [0i64; 8];
    let reps = if iterations > 10_000 { 5 } else { 1 };
    let (mut r1, mut t1, mut r2, mut t2) = (0, f64::MAX, 0, f64::MAX);
    for _ in 0..reps {
        env1 = [0; 8];
        env2 = [0; 8];
        let (a, ta) = time(|| run(prog, env1.as_mut_ptr()));
        let (b, tb) = time(|| var(prog, env2.as_mut_ptr()));
        (r1, r2, t1, t2) = (a, b, t1.min(ta), t2.min(tb));
    }
    eprintln!("native {t1:.4}s variant {t2:.4}s ratio {:.2}", t1 / t2);
    assert_eq!(r1, r2);
    assert_eq!(env1, env2);
    assert!(v.guard_pages.contains(&Addr(page)));
}

type BpfRun = extern "C" fn(*const u8, *const u8, u32) -> u32;
type BpfFilter = extern "C" fn(*mut u32) -> *mut u8;
type BpfPacket = extern "C" fn(*mut u64, *mut u8) -> u32;

#[test]
fn bpf_filter_differential() {
    let Some((dir, so)) = build_sample("bpf_filter") else {
        eprintln!("gcc not available; skipping");
        return;
    };
    let size = symbol_size(&so, "bpf_run");
    // SAFETY: loading a sample library we just compiled.
    let lib = unsafe { libloading::Library::new(&so) }.expect("dlopen");
    drop(dir);
    // SAFETY: symbol types match samples/bpf_filter.c.
    let run: libloading::Symbol<BpfRun> = unsafe { lib.get(b"bpf_run") }.expect("sym");
    // SAFETY: as above.
    let filt: libloading::Symbol<BpfFilter> = unsafe { lib.get(b"bpf_demo_filter") }.expect("sym");
    // SAFETY: as above.
    let pkt: libloading::Symbol<BpfPacket> = unsafe { lib.get(b"bpf_demo_packet") }.expect("sym");
    let mut n = 0u32;
    let prog = filt(&mut n);
    let entry = *run as usize as u64;
    let page = prog as u64;
    let mut known = KnownState::default();
    known.set_reg(Gpr::Rdi, Some(page));
    let req = Request {
        entry: Addr(entry),
        region_start: Addr(entry),
        region_end: Addr(entry + size),
        known,
        // A whole function entered at its start: scratch registers are fine.
        options: Options {
            scratch_registers: true,
            // Private env / packet memory, single thread: safe to forward.
            forward_stores: std::env::var("FORWARD").map(|v| v != "0").unwrap_or(true),
            ..Options::default()
        },
    };
    let mem = SelfMemory::new(&[(page, page + 4096)]);
    let v = specialize(&req, &mem).expect("specialize");
    if std::env::var("SHOW_ASM").is_ok() {
        for l in v.residual_asm() {
            eprintln!("{l}");
        }
    }
    eprintln!("stats {:?} exits {}", v.stats, v.exits.len());
    let exec = ExecCode::build(1 << 20, |base| v.encode(Addr(base)).expect("encode").code);
    // SAFETY: the variant follows the same ABI as bpf_run.
    let var: BpfRun = unsafe { std::mem::transmute(exec.addr() as *const u8) };
    // Seed of the sample's own xorshift64 (bpf_demo_packet, in C), not a Rust-side generator: the
    // tests' one Rng is tests/common/rng.rs, which this unit-test module does not need.
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut pool = vec![[0u8; 128]; 512];
    let mut lens = vec![0u32; 512];
    for i in 0..512 {
        lens[i] = pkt(&mut rng, pool[i].as_mut_ptr());
    }
    let rounds: usize = std::env::var("BPF_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let mut best = (f64::MAX, f64::MAX);
    let (mut s1, mut s2) = (0, 0);
    for _ in 0..if rounds > 10 { 5 } else { 1 } {
        let (a, t1) = time(|| {
            let mut s = 0u64;
            for _ in 0..rounds {
                for i in 0..512 {
                    s += run(prog, pool[i].as_ptr(), lens[i]) as u64;
                }
            }
            s
        });
        let (b, t2) = time(|| {
            let mut s = 0u64;
            for _ in 0..rounds {
                for i in 0..512 {
                    s += var(prog, pool[i].as_ptr(), lens[i]) as u64;
                }
            }
            s
        });
        s1 = a;
        s2 = b;
        best = (best.0.min(t1), best.1.min(t2));
    }
    let (t1, t2) = best;
    eprintln!("native {t1:.4}s variant {t2:.4}s ratio {:.2}", t1 / t2);
    for i in 0..512 {
        assert_eq!(
            run(prog, pool[i].as_ptr(), lens[i]),
            var(prog, pool[i].as_ptr(), lens[i]),
            "packet {i}"
        );
    }
    assert_eq!(s1, s2);
}

#[test]
fn known_index_becomes_displacement() {
    // rax = byte [rsi + rdi] + qword [rsi + rdi*8 + 8], rdi known
    let code = asm_fn(|a| {
        a.movzx(eax, byte_ptr(rsi + rdi)).unwrap();
        a.add(rax, qword_ptr(rsi + rdi * 8 + 8)).unwrap();
        a.ret().unwrap();
    });
    let buf: Vec<u8> = (0..0x4000u32).map(|i| (i * 7) as u8).collect();
    for x in [0u64, 0x7f, 0x80, 0x1ff] {
        let (v, var) = specialize_fn(&code, 32, &[(Gpr::Rdi, x)], &[]);
        let p = buf.as_ptr() as u64;
        assert_eq!(
            call2(var.addr(), x, p),
            call2(code.addr(), x, p),
            "x={x:#x}"
        );
        assert!(
            v.residual_asm().iter().all(|l| !l.contains("rdi")),
            "{:?}",
            v.residual_asm()
        );
    }
}

/// env[1] = env[0] * 3; env[2] = env[1] + env[0]; env[0] ^= env[2]; return env[1]  (env in rsi): stores and
/// reloads of the same slots, what store forwarding is for.
fn env_code() -> ExecCode {
    asm_fn(|a| {
        a.mov(rax, qword_ptr(rsi)).unwrap();
        a.imul_3(rax, rax, 3).unwrap();
        a.mov(qword_ptr(rsi + 8), rax).unwrap();
        a.mov(rdx, qword_ptr(rsi + 8)).unwrap();
        a.add(rdx, qword_ptr(rsi)).unwrap();
        a.mov(qword_ptr(rsi + 16), rdx).unwrap();
        a.mov(rcx, qword_ptr(rsi + 16)).unwrap();
        a.xor(qword_ptr(rsi), rcx).unwrap();
        a.mov(rax, qword_ptr(rsi + 8)).unwrap();
        a.ret().unwrap();
    })
}

#[test]
fn store_forwarding_keeps_memory_exact() {
    let code = env_code();
    let (v, var) = specialize_fn(&code, 64, &[(Gpr::Rdi, 0)], &[]);
    for x in [0u64, 5, u64::MAX] {
        let mut e1 = [x, 0, 0];
        let mut e2 = [x, 0, 0];
        let r1 = call2(code.addr(), 0, e1.as_mut_ptr() as u64);
        let r2 = call2(var.addr(), 0, e2.as_mut_ptr() as u64);
        assert_eq!((r1, e1), (r2, e2));
    }
    // The reloads of just-stored slots are gone.
    let loads = v
        .residual_asm()
        .iter()
        .filter(|l| l.contains(", [rsi+"))
        .count();
    assert!(loads <= 2, "{:?}", v.residual_asm());
}

#[test]
fn forward_within_limits_forwarding_to_known_private_slots() {
    // The same env[] code as above, with env's address known (an assumed register).
    let code = env_code();
    // env lives at a fixed heap address the variant is specialized for; only raw pointers touch it.
    let env: *mut [u64; 3] = Box::into_raw(Box::new([7u64, 0, 0]));
    let at = env as u64;
    let loads = |v: &Variant| {
        v.residual_asm()
            .iter()
            .filter(|l| l.contains(", [rsi") || l.contains(",[rsi"))
            .count()
    };
    let run = |within: Option<Vec<(Addr, Addr)>>, known: &[(Gpr, u64)]| {
        let options = Options {
            forward_stores: true,
            forward_within: within,
            ..Options::default()
        };
        specialize_fn_with(&code, 64, known, &[], options)
    };
    let private = vec![(Addr(at), Addr(at + 24))];
    let elsewhere = vec![(Addr(at + 4096), Addr(at + 8192))];
    let cases = [
        // Known address inside a private range: reloads are forwarded.
        (Some(private.clone()), vec![(Gpr::Rsi, at)], true),
        // Known address outside every range (e.g. a MAP_SHARED page): every load stays.
        (Some(elsewhere), vec![(Gpr::Rsi, at)], false),
        // Unknown base: where it points is unknown, so nothing is forwarded.
        (Some(private), vec![], false),
    ];
    for (within, known, forwards) in cases {
        let (v, var) = run(within.clone(), &known);
        let n = loads(&v);
        if forwards {
            assert!(n <= 2, "{within:?}: {:?}", v.residual_asm());
        } else {
            assert_eq!(n, 5, "{within:?}: {:?}", v.residual_asm());
        }
        let mut e1 = [7u64, 0, 0];
        let r1 = call2(code.addr(), 0, e1.as_mut_ptr() as u64);
        // SAFETY: env is a live, exclusively owned allocation; the variant only accesses it during the call.
        let e2 = unsafe {
            env.write([7, 0, 0]);
            let r2 = call2(var.addr(), 0, at);
            (r2, env.read())
        };
        assert_eq!((r1, e1), e2, "{within:?}");
    }
    // SAFETY: allocated by Box::into_raw above, not used afterwards.
    drop(unsafe { Box::from_raw(env) });
}

#[test]
fn forwarding_works_on_absolute_addresses() {
    // With env's address known and below 2 GiB (a non-PIE program's data), `[rsi + d]` becomes the absolute
    // `[d']`; forwarding must still apply, and respect forward_within.
    let code = env_code();
    // SAFETY: a fresh anonymous mapping at a hint address nobody else uses; MAP_FIXED_NOREPLACE never replaces
    // an existing mapping (the test is skipped if the address is taken).
    let page = unsafe {
        libc::mmap(
            0x3a00_0000 as *mut libc::c_void,
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        )
    };
    if page == libc::MAP_FAILED {
        eprintln!("skipped: cannot map the low page");
        return;
    }
    let at = page as u64;
    let env = at as *mut [u64; 3];
    for (within, forwards) in [
        (None, true),
        (Some(vec![(Addr(at), Addr(at + 4096))]), true),
        (Some(vec![(Addr(at + 4096), Addr(at + 8192))]), false),
    ] {
        let options = Options {
            forward_stores: true,
            forward_within: within.clone(),
            ..Options::default()
        };
        let (v, var) = specialize_fn_with(&code, 64, &[(Gpr::Rsi, at)], &[], options);
        let asm = v.residual_asm();
        let loads = asm
            .iter()
            .filter(|l| l.contains(&format!(", [{:#x}", at)) || l.contains(", [0x3a00"))
            .count();
        assert!(asm.iter().all(|l| !l.contains("rsi")), "{asm:?}");
        if forwards {
            assert!(loads <= 2, "{within:?}: {asm:?}");
        } else {
            assert_eq!(loads, 5, "{within:?}: {asm:?}");
        }
        let mut e1 = [7u64, 0, 0];
        let r1 = call2(code.addr(), 0, e1.as_mut_ptr() as u64);
        // SAFETY: env is the live page mapped above; the variant only touches it during the call.
        let e2 = unsafe {
            env.write([7, 0, 0]);
            let r2 = call2(var.addr(), 0, at);
            (r2, env.read())
        };
        assert_eq!((r1, e1), e2, "{within:?}");
    }
    // SAFETY: unmapping the page mapped above, no longer used.
    unsafe { libc::munmap(page, 4096) };
}

/// Cases where forwarding must not apply, with env's address unknown (any slot) and known (the session's
/// `forward_within`). Each runs `code(rdi, env)` natively and specialized and compares result and env.
fn check_forwarding_cases(code: &ExecCode, arg: u64, init: [u64; 3]) {
    let env: *mut [u64; 3] = Box::into_raw(Box::new(init));
    let at = env as u64;
    for (within, known) in [
        (None, vec![]),
        (Some(vec![(Addr(at), Addr(at + 24))]), vec![(Gpr::Rsi, at)]),
    ] {
        let options = Options {
            forward_stores: true,
            forward_within: within.clone(),
            ..Options::default()
        };
        let (v, var) = specialize_fn_with(code, 64, &known, &[], options);
        let mut e1 = init;
        let r1 = call2(code.addr(), arg, e1.as_mut_ptr() as u64);
        // SAFETY: env is a live, exclusively owned allocation; the variant only accesses it during the call.
        let e2 = unsafe {
            env.write(init);
            let r2 = call2(var.addr(), arg, at);
            (r2, env.read())
        };
        assert_eq!((r1, e1), e2, "{within:?}: {:?}", v.residual_asm());
    }
    // SAFETY: allocated by Box::into_raw above, not used afterwards.
    drop(unsafe { Box::from_raw(env) });
}

#[test]
fn bit_test_with_register_offset_writes_beyond_its_qword() {
    // bts qword [rsi], rdi with rdi = 67 sets bit 3 of [rsi + 8]: the fact for [rsi + 8] must die.
    let code = asm_fn(|a| {
        a.mov(rax, qword_ptr(rsi + 8)).unwrap();
        a.bts(qword_ptr(rsi), rdi).unwrap();
        a.mov(rax, qword_ptr(rsi + 8)).unwrap();
        a.ret().unwrap();
    });
    check_forwarding_cases(&code, 67, [0, 0, 0]);
}

#[test]
fn bit_test_with_register_offset_keeps_its_memory_form() {
    // bt qword [rsi + 8], rdi with rdi = 64 tests bit 0 of [rsi + 16]; `bt reg, rdi` would test bit 0 of reg.
    let code = asm_fn(|a| {
        a.mov(rax, qword_ptr(rsi + 8)).unwrap();
        a.bt(qword_ptr(rsi + 8), rdi).unwrap();
        a.setb(al).unwrap();
        a.movzx(eax, al).unwrap();
        a.ret().unwrap();
    });
    check_forwarding_cases(&code, 64, [0, 0, 1]);
}

#[test]
fn forwarded_load_into_its_own_base() {
    // p = p->next; return p->next (next at +8): after `mov rsi, [rsi + 8]`, [rsi + 8] is another slot.
    let code = asm_fn(|a| {
        a.mov(rax, qword_ptr(rsi + 8)).unwrap();
        a.mov(rsi, qword_ptr(rsi + 8)).unwrap();
        a.mov(rax, qword_ptr(rsi + 8)).unwrap();
        a.ret().unwrap();
    });
    let mut n1 = [0u64, 0x1234];
    let n0 = [0u64, n1.as_mut_ptr() as u64];
    let (v, var) = specialize_fn(&code, 64, &[], &[]);
    let r1 = call2(code.addr(), 0, n0.as_ptr() as u64);
    let r2 = call2(var.addr(), 0, n0.as_ptr() as u64);
    assert_eq!(r1, 0x1234);
    assert_eq!(r1, r2, "{:?}", v.residual_asm());
}

#[test]
fn scratch_copy_after_a_store_deopts_after_the_store() {
    // A thread stopped between the store and its scratch copy must not run the store again (a signal handler
    // may have written the slot in between).
    let code = asm_fn(|a| {
        a.mov(rcx, 7u64).unwrap(); // folded: rcx known, not materialized -> a scratch candidate
        a.mov(qword_ptr(rsi), rdx).unwrap();
        a.mov(rax, qword_ptr(rsi)).unwrap();
        a.add(rax, rcx).unwrap();
        a.ret().unwrap();
    });
    let (v, _var) = specialize_fn(&code, 64, &[], &[]);
    let enc = v.encode(Addr(0x10_0000)).expect("encode");
    let mut d =
        iced_x86::Decoder::with_ip(64, &enc.code, 0x10_0000, iced_x86::DecoderOptions::NONE);
    let mut store: Option<u64> = None;
    let mut copies = 0;
    for ins in &mut d {
        let off = (ins.ip() - 0x10_0000) as u32;
        let e = enc
            .deopt
            .iter()
            .find(|e| e.offset == off)
            .expect("deopt entry");
        let text = ins.to_string();
        if text.starts_with("mov [rsi]") {
            store = Some(e.original.0);
        } else if let Some(s) = store.filter(|_| text.starts_with("mov rcx,rdx")) {
            assert!(e.original.0 > s, "{text} resumes at the store {s:#x}");
            copies += 1;
        }
    }
    assert!(store.is_some() && copies == 1, "{:?}", v.residual_asm());
}

/// Debug helper: `SNIPPET_HEX="41 83 e0 03 ..." SNIPPET_KNOWN="rax=0x1,r8=2"` prints the residual code.
#[test]
#[ignore]
fn show_snippet() {
    let hex = std::env::var("SNIPPET_HEX").unwrap_or_default();
    let bytes: Vec<u8> = hex
        .split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    let code = ExecCode::build(4096, |_| {
        let mut v = bytes.clone();
        v.push(0xc3);
        v
    });
    let mut k = KnownState::default();
    for kv in std::env::var("SNIPPET_KNOWN")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
    {
        let (n, v) = kv.split_once('=').unwrap();
        let v = u64::from_str_radix(v.trim_start_matches("0x"), 16).unwrap();
        if let Some(g) = Gpr::from_name(n) {
            k.set_reg(g, Some(v));
        } else if let Some(f) = Flag::from_name(n) {
            k.set_flag(f, Some(v != 0));
        }
    }
    let req = Request {
        entry: Addr(code.addr()),
        region_start: Addr(code.addr()),
        region_end: Addr(code.addr() + bytes.len() as u64),
        known: k,
        options: Options::default(),
    };
    let v = specialize(&req, &SelfMemory::new(&[])).expect("specialize");
    for l in v.residual_asm() {
        eprintln!("{l}");
    }
}

/// Every function of every sample, nothing known: specialization and
/// encoding must succeed or fail with a typed error, never panic.
#[test]
fn all_sample_functions_specialize_without_panic() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return;
    };
    let mut names: Vec<String> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix(".c").map(str::to_string))
        .collect();
    names.sort();
    let mut checked = 0;
    for name in names {
        let Some((dir, so)) = build_sample(&name) else {
            continue;
        };
        // SAFETY: a sample library we just compiled (no constructors with side effects).
        let Ok(lib) = (unsafe { libloading::Library::new(&so) }) else {
            continue;
        };
        let out = std::process::Command::new("nm")
            .arg("-S")
            .arg("--defined-only")
            .arg(&so)
            .output();
        drop(dir);
        let Ok(out) = out else { return };
        for l in String::from_utf8_lossy(&out.stdout).lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() != 4 || !matches!(f[2], "T" | "t") {
                continue;
            }
            let Ok(size) = u64::from_str_radix(f[1], 16) else {
                continue;
            };
            // SAFETY: only the address of the symbol is used, never called.
            let Ok(sym) = (unsafe { lib.get::<*const u8>(f[3].as_bytes()) }) else {
                continue;
            };
            let entry = *sym as u64;
            if size == 0 {
                continue;
            }
            for known in [KnownState::default(), {
                let mut k = KnownState::default();
                k.set_reg(Gpr::Rdi, Some(0x1000));
                k
            }] {
                let req = Request {
                    entry: Addr(entry),
                    region_start: Addr(entry),
                    region_end: Addr(entry + size),
                    known,
                    options: Options::default(),
                };
                if let Ok(v) = specialize(&req, &SelfMemory::new(&[])) {
                    v.encode(Addr(entry + 0x10_0000)).expect("encode");
                    let _ = v.residual_asm();
                }
                checked += 1;
            }
        }
    }
    eprintln!("checked {checked} specializations");
}
