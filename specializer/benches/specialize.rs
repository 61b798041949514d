//! Benchmark: the sample interpreters (gcc -O2) original vs specialized for their program, in-process; prints one `bench NAME: original T ms, specialized T ms, speedup Xx` line per case.

#[path = "../tests/common/mod.rs"]
mod common;

use common::native_lib::{specialize_function, SampleLib};
use common::Mapping;
use specializer::Options;
use std::hint::black_box;
use std::time::Instant;

type InterpRun = unsafe extern "C" fn(*const u8, *mut i64) -> i64;
type InterpDemo = unsafe extern "C" fn(i64, *mut usize) -> *mut u8;
type BpfRun = unsafe extern "C" fn(*const u8, *const u8, u32) -> u32;
type BpfDemoFilter = unsafe extern "C" fn(*mut u32) -> *mut u8;
type BpfDemoPacket = unsafe extern "C" fn(*mut u64, *mut u8) -> u32;

/// Rounds per side; original and specialized runs alternate.
const ROUNDS: usize = 15;

/// Copy `bytes` into a read-only page of its own (the constant program page).
fn program_page(bytes: &[u8]) -> Mapping {
    let m = Mapping::anywhere(bytes.len().max(1));
    m.write(0, bytes);
    m.protect(0, m.len, libc::PROT_READ);
    m
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN timings"));
    v[v.len() / 2]
}

/// Alternate `orig` and `spec` ROUNDS times each; return median milliseconds.
fn measure(mut orig: impl FnMut() -> u64, mut spec: impl FnMut() -> u64) -> (f64, f64) {
    // Warm up both and check they agree.
    let (a, b) = (orig(), spec());
    assert_eq!(a, b, "original and specialized disagree");
    let (mut to, mut ts) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let t = Instant::now();
        black_box(orig());
        to.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        black_box(spec());
        ts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    (median(to), median(ts))
}

fn report(name: &str, (o, s): (f64, f64)) {
    println!(
        "bench {name}: original {o:.2} ms, specialized {s:.2} ms, speedup {:.2}x",
        o / s
    );
}

/// `forward_stores` on is what the session uses for single-threaded targets (no other writer of the thread's
/// memory between its own store and reload); off is the general default. The benchmark is single-threaded.
fn configs() -> [(&'static str, Options); 2] {
    [
        ("", Options::default()),
        (
            "+forwarding",
            Options {
                forward_stores: true,
                ..Options::default()
            },
        ),
    ]
}

fn bench_interp(tag: &str, options: Options) {
    let lib = SampleLib::build("interp_switch");
    let func = lib.function("interp_run");
    // SAFETY: documented signatures in samples/interp_switch.c.
    let (orig, demo): (InterpRun, InterpDemo) =
        unsafe { (lib.func("interp_run"), lib.func("interp_demo_program")) };
    let mut n = 0usize;
    // SAFETY: returns a page-aligned buffer of n 16-byte insns (leaked: tiny).
    let p = unsafe { demo(200_000, &mut n) };
    assert!(!p.is_null());
    // SAFETY: p holds n insns of 16 bytes.
    let bytes = unsafe { std::slice::from_raw_parts(p, n * 16) }.to_vec();
    let prog = program_page(&bytes);
    let mem = lib.memory(&[(prog.addr, prog.end())]);
    let s = specialize_function(func, prog.addr, &mem, options).expect("specialize");
    // SAFETY: the variant has interp_run's ABI.
    let var: InterpRun = unsafe { s.func() };
    let code = prog.addr as *const u8;
    let run = |f: InterpRun| {
        move || {
            let mut env = [0i64; 8];
            // SAFETY: valid program and env with the 8 slots it uses.
            unsafe { f(black_box(code), env.as_mut_ptr()) as u64 ^ env[6] as u64 }
        }
    };
    report(&format!("interp_switch{tag}"), measure(run(orig), run(var)));
}

fn bench_bpf(tag: &str, options: Options) {
    let lib = SampleLib::build("bpf_filter");
    let func = lib.function("bpf_run");
    // SAFETY: documented signatures in samples/bpf_filter.c.
    let (orig, demo, packet): (BpfRun, BpfDemoFilter, BpfDemoPacket) = unsafe {
        (
            lib.func("bpf_run"),
            lib.func("bpf_demo_filter"),
            lib.func("bpf_demo_packet"),
        )
    };
    let mut n = 0u32;
    // SAFETY: returns a page-aligned buffer of n 8-byte insns (leaked: tiny).
    let p = unsafe { demo(&mut n) };
    assert!(!p.is_null());
    // SAFETY: p holds n insns of 8 bytes.
    let bytes = unsafe { std::slice::from_raw_parts(p, n as usize * 8) }.to_vec();
    let prog = program_page(&bytes);
    const POOL: usize = 4096;
    let mut pool = vec![0u8; POOL * 128];
    let mut lens = vec![0u32; POOL];
    let mut st = 0x9e37_79b9_7f4a_7c15u64;
    for (k, l) in lens.iter_mut().enumerate() {
        // SAFETY: each slot has 128 bytes (BPF_DEMO_MAX_PKT); st is non-zero.
        *l = unsafe { packet(&mut st, pool.as_mut_ptr().add(k * 128)) };
    }
    let mem = lib.memory(&[(prog.addr, prog.end())]);
    let s = specialize_function(func, prog.addr, &mem, options).expect("specialize");
    // SAFETY: the variant has bpf_run's ABI.
    let var: BpfRun = unsafe { s.func() };
    let code = prog.addr as *const u8;
    let (pool, lens) = (&pool, &lens);
    let run = |f: BpfRun| {
        move || {
            let mut sum = 0u64;
            for _ in 0..100 {
                for (k, len) in lens.iter().enumerate() {
                    // SAFETY: packet k has len <= 128 bytes.
                    sum += unsafe { f(black_box(code), pool.as_ptr().add(k * 128), *len) } as u64;
                }
            }
            sum
        }
    };
    report(&format!("bpf_filter{tag}"), measure(run(orig), run(var)));
}

fn main() {
    for (tag, options) in configs() {
        bench_interp(tag, options.clone());
        bench_bpf(tag, options);
    }
}
