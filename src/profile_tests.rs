//! Profile analysis on fake targets: hot regions, value profiles, back-attribution, candidate pages.

use super::*;

/// A fake target: one function `f` at 0x1000..0x1100 and stripped code at 0x5000..0x9000.
struct FakeEnv {
    code: HashMap<u64, Vec<u8>>,
}

impl ProfileEnv for FakeEnv {
    fn locate(&mut self, _pid: Pid, ip: Addr) -> Location {
        if (0x1000..0x1100).contains(&ip.0) {
            Location::Symbol {
                module: "/bin/x".into(),
                name: "f".into(),
                start: Addr(0x1000),
                end: Addr(0x1100),
            }
        } else if (0x5000..0x9000).contains(&ip.0) {
            Location::Unsymbolized {
                module: "/bin/y".into(),
                start: Addr(0x5000),
                end: Addr(0x9000),
            }
        } else {
            Location::Unknown
        }
    }
    fn read_code(&mut self, _pid: Pid, ip: Addr, buf: &mut [u8]) -> usize {
        match self.code.get(&ip.0) {
            Some(b) => {
                let n = b.len().min(buf.len());
                buf[..n].copy_from_slice(&b[..n]);
                n
            }
            None => 0,
        }
    }
}

fn sample(ip: u64, set: &[(Gpr, u64)]) -> Sample {
    let mut regs = [0u64; 16];
    regs[Gpr::Rsp.index()] = 0x7fff_0000;
    for &(g, v) in set {
        regs[g.index()] = v;
    }
    Sample {
        pid: Pid::from_raw(10),
        tid: Pid::from_raw(10),
        ip: Addr(ip),
        regs,
        flags: 0x202,
    }
}

fn env() -> FakeEnv {
    let mut code = HashMap::new();
    // mov eax, [rdx]  (dispatch load through the bytecode pointer)
    code.insert(0x1010, vec![0x8b, 0x02]);
    // mov eax, [rsp+8]
    code.insert(0x1020, vec![0x8b, 0x44, 0x24, 0x08]);
    // add eax, ecx
    code.insert(0x5010, vec![0x01, 0xc8]);
    code.insert(0x5400, vec![0x01, 0xc8]);
    FakeEnv { code }
}

#[test]
fn hot_regions_by_symbol_and_span() {
    let mut p = Profiler::new();
    let mut e = env();
    let mut v = Vec::new();
    for i in 0..80u64 {
        v.push(sample(0x1010, &[(Gpr::Rdx, 0x20000 + (i % 8) * 16)]));
    }
    for _ in 0..15 {
        v.push(sample(0x5010, &[]));
    }
    for _ in 0..5 {
        v.push(sample(0x5400, &[]));
    }
    p.ingest(&v, &mut e);
    let r = p.hot_regions();
    assert_eq!(p.total(), 100);
    assert_eq!(r[0].symbol.as_deref(), Some("f"));
    assert!((r[0].share - 0.8).abs() < 1e-9);
    assert_eq!((r[0].start, r[0].end), (Addr(0x1000), Addr(0x1100)));
    // 0x5010 and 0x5400 are 4 granules apart: two spans.
    assert_eq!(r.len(), 3);
    assert_eq!(
        (r[1].start, r[1].end, r[1].samples),
        (Addr(0x5000), Addr(0x5100), 15)
    );
    assert_eq!(r[1].symbol, None);
    assert_eq!(r[1].module, "/bin/y");
}

#[test]
fn stable_registers_need_one_value_and_enough_samples() {
    let mut p = Profiler::new();
    let mut e = env();
    // rdi is constant (not read by `mov eax,[rdx]`), rdx varies, rsi changes once, rsp is never reported.
    let v: Vec<Sample> = (0..30u64)
        .map(|i| {
            sample(
                0x1010,
                &[
                    (Gpr::Rdi, 0x7000),
                    (Gpr::Rdx, 0x20000 + (i % 4) * 16),
                    (Gpr::Rsi, if i == 29 { 1 } else { 0 }),
                ],
            )
        })
        .collect();
    p.ingest(&v, &mut e);
    let st = p.stable_registers(0x1010, 20);
    assert!(st.contains(&(Gpr::Rdi, 0x7000)), "{st:?}");
    assert!(st
        .iter()
        .all(|(g, _)| !matches!(g, Gpr::Rdx | Gpr::Rsi | Gpr::Rsp)));
    assert!(p.stable_registers(0x1010, 31).is_empty());
    assert!(p.stable_registers(0x1234, 1).is_empty());
}

#[test]
fn value_profile_of_dispatch_pointer() {
    let mut p = Profiler::new();
    let mut e = env();
    let v: Vec<Sample> = (0..64u64)
        .map(|i| sample(0x1010, &[(Gpr::Rdx, 0x20000 + (i % 4) * 16)]))
        .collect();
    p.ingest(&v, &mut e);
    let regs = p.report_regions();
    let t = &regs[0].triggers;
    assert_eq!(t.len(), 1);
    assert_eq!(t[0].register, "rdx");
    assert_eq!(t[0].distinct, 4);
    assert!((t[0].coverage - 1.0).abs() < 1e-9);
    assert_eq!(t[0].top_values.len(), 4);
    assert!((t[0].top_values[0].share - 0.25).abs() < 1e-9);
    assert_eq!(
        p.candidate_pages(256),
        Some((Pid::from_raw(10), vec![Addr(0x20000)]))
    );
}

#[test]
fn stack_loads_and_rsp_are_ignored() {
    let mut p = Profiler::new();
    let mut e = env();
    let v: Vec<Sample> = (0..10).map(|_| sample(0x1020, &[])).collect();
    p.ingest(&v, &mut e);
    assert!(p.candidate_pages(256).is_none());
    assert!(p.report_regions()[0].triggers.is_empty());
}

#[test]
fn unreadable_code_and_unknown_locations_never_fail() {
    let mut p = Profiler::new();
    let mut e = env();
    let v: Vec<Sample> = (0..10).map(|i| sample(0xdead_0000 + i, &[])).collect();
    p.ingest(&v, &mut e);
    let r = p.hot_regions();
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].module, "[unknown]");
    assert!(p.report_regions()[0].triggers.is_empty());
}

#[test]
fn distinct_saturates_and_is_penalised() {
    let mut vs = ValueStats::default();
    let mut budget = usize::MAX;
    for v in 0..(DISTINCT_CAP as u64 + 10) {
        vs.add(v, &mut budget);
    }
    assert_eq!(vs.distinct(), DISTINCT_CAP as u64 + 1);
    let (top, cov) = vs.top(TOP_K);
    assert_eq!(top.len(), TOP_K);
    assert!(cov < 0.02);
    // An exhausted budget keeps counting samples without remembering new values.
    let mut vs = ValueStats::default();
    let mut budget = 2;
    for v in [1, 2, 3, 1, 4] {
        vs.add(v, &mut budget);
    }
    assert_eq!((vs.samples, vs.counts.len(), vs.distinct()), (5, 2, 3));
}

#[test]
fn candidate_pages_are_of_the_busiest_process() {
    let mut p = Profiler::new();
    let mut e = env();
    let mut v: Vec<Sample> = (0..10)
        .map(|_| sample(0x1010, &[(Gpr::Rdx, 0x30000)]))
        .collect();
    // A child (pid 11) runs the same hot code on other data, more often.
    for _ in 0..20 {
        let mut s = sample(0x1010, &[(Gpr::Rdx, 0x50000)]);
        s.pid = Pid::from_raw(11);
        s.tid = Pid::from_raw(11);
        v.push(s);
    }
    p.ingest(&v, &mut e);
    assert_eq!(
        p.candidate_pages(256),
        Some((Pid::from_raw(11), vec![Addr(0x50000)]))
    );
    p.forget_process(Pid::from_raw(11));
    assert_eq!(
        p.candidate_pages(256),
        Some((Pid::from_raw(10), vec![Addr(0x30000)]))
    );
}

#[test]
fn back_attribution_reaches_the_dispatch_load() {
    let mut e = env();
    // f at 0x1000: cmp dword [rax],0xb; mov edx,[rax]; movsxd rdx,[r8+rdx*4]; add rdx,r8; jmp rdx
    let code: Vec<u8> = vec![
        0x83, 0x38, 0x0b, 0x8b, 0x10, 0x49, 0x63, 0x14, 0x90, 0x4c, 0x01, 0xc2, 0xff, 0xe2,
    ];
    let mut f = code.clone();
    f.resize(0x100, 0xcc);
    e.code.insert(0x1000, f);
    e.code.insert(0x1009, code[9..].to_vec());
    let mut p = Profiler::new();
    let v: Vec<Sample> = (0..30u64)
        .map(|i| {
            sample(
                0x1009,
                &[
                    (Gpr::Rax, 0x40000 + (i % 3) * 16),
                    (Gpr::R8, 0x2000),
                    (Gpr::Rdx, 99 + i),
                ],
            )
        })
        .collect();
    p.ingest(&v, &mut e);
    let regions = p.report_regions();
    let t = &regions[0].triggers;
    let find = |a: u64, r: &str| t.iter().find(|x| x.address == Hex(a) && x.register == r);
    // The dispatch load at 0x1003 sees rax (pc) although no sample landed on it.
    let d = find(0x1003, "rax").expect("dispatch trigger");
    assert_eq!((d.samples, d.distinct), (30, 3));
    assert!(find(0x1000, "rax").is_some());
    // rdx was overwritten by the movsxd at 0x1005 itself: not attributed there.
    assert!(find(0x1005, "rdx").is_none());
    assert_eq!(find(0x1005, "r8").map(|x| x.distinct), Some(1), "{t:#?}");
    // The bytecode page is a candidate through the back-attributed loads.
    assert!(p
        .candidate_pages(16)
        .is_some_and(|(_, v)| v.contains(&Addr(0x40000))));
}

/// 0x1000: movzx ecx, byte [rdi+rcx]; 0x1004: imul rcx, r9 (samples land on the imul).
fn table_lookup_env() -> FakeEnv {
    let mut e = env();
    let code: Vec<u8> = vec![0x0f, 0xb6, 0x0c, 0x0f, 0x49, 0x0f, 0xaf, 0xc9];
    let mut f = code.clone();
    f.resize(0x100, 0xcc);
    e.code.insert(0x1000, f);
    e.code.insert(0x1004, code[4..].to_vec());
    e
}

#[test]
fn table_lookup_with_overwritten_index_guesses_the_table_page() {
    let mut e = table_lookup_env();
    let mut p = Profiler::new();
    let v: Vec<Sample> = (0..5u64)
        .map(|i| sample(0x1004, &[(Gpr::Rdi, 0x9000), (Gpr::Rcx, 0x7777_0000 + i)]))
        .collect();
    p.ingest(&v, &mut e);
    assert_eq!(p.candidate_pages(16).map(|x| x.1), Some(vec![Addr(0x9000)]));
}

#[test]
fn the_watch_also_covers_pages_hot_register_values_point_at() {
    // r9: a pointer no sampled load goes through.
    let mut e = table_lookup_env();
    let mut p = Profiler::new();
    let v: Vec<Sample> = (0..5u64)
        .map(|i| {
            sample(
                0x1004,
                &[
                    (Gpr::Rdi, 0x9000),
                    (Gpr::Rcx, 0x7777_0000 + i * 0x1000),
                    (Gpr::R9, 0x30_0040),
                ],
            )
        })
        .collect();
    p.ingest(&v, &mut e);
    assert_eq!(p.candidate_pages(16).map(|x| x.1), Some(vec![Addr(0x9000)]));
    // r9's one value, seen five times, names its page; rcx's values, each seen once, do not.
    assert_eq!(
        p.watch_pages(16).map(|x| x.1),
        Some(vec![Addr(0x9000), Addr(0x30_0000)])
    );
    // The cap keeps the most sampled pages: 0x9000 is read by the load and pointed at by rdi.
    assert_eq!(p.watch_pages(1).map(|x| x.1), Some(vec![Addr(0x9000)]));
}

#[test]
fn back_attribution_without_symbols() {
    let mut e = env();
    // Stripped code at 0x5000..0x9000; the dispatch sequence sits at 0x5200 behind some padding.
    let seq: Vec<u8> = vec![
        0x83, 0x38, 0x0b, 0x8b, 0x10, 0x49, 0x63, 0x14, 0x90, 0x4c, 0x01, 0xc2, 0xff, 0xe2,
    ];
    let mut text = vec![0x90u8; 0x4000]; // nops
    text[0x200..0x200 + seq.len()].copy_from_slice(&seq);
    // FakeEnv reads only at exact keys: offer the window start (0x5000, block 0x5000 - lead-in clamped).
    e.code.insert(0x5000, text.clone());
    e.code.insert(0x5209, seq[9..].to_vec());
    let mut p = Profiler::new();
    let v: Vec<Sample> = (0..8u64)
        .map(|i| {
            sample(
                0x5209,
                &[(Gpr::Rax, 0x60000 + (i % 2) * 16), (Gpr::R8, 0x2000)],
            )
        })
        .collect();
    p.ingest(&v, &mut e);
    let regions = p.report_regions();
    assert_eq!(regions[0].symbol, None);
    let t = &regions[0].triggers;
    assert!(
        t.iter()
            .any(|x| x.address == Hex(0x5203) && x.register == "rax" && x.distinct == 2),
        "{t:#?}"
    );
}

#[test]
fn back_attribution_stops_at_branch_targets() {
    let mut e = env();
    // 0x1000: mov eax,[rdi]; 0x1002: jmp 0x1004 (eb 00); 0x1004: mov ecx,[rsi]; 0x1006: add eax,ecx
    let code: Vec<u8> = vec![0x8b, 0x07, 0xeb, 0x00, 0x8b, 0x0e, 0x01, 0xc8];
    let mut f = code.clone();
    f.resize(0x100, 0xcc);
    e.code.insert(0x1000, f);
    e.code.insert(0x1006, code[6..].to_vec());
    let mut p = Profiler::new();
    let v: Vec<Sample> = (0..5)
        .map(|_| sample(0x1006, &[(Gpr::Rsi, 0x7000), (Gpr::Rdi, 0x8000)]))
        .collect();
    p.ingest(&v, &mut e);
    let regions = p.report_regions();
    let t = &regions[0].triggers;
    assert!(t
        .iter()
        .any(|x| x.address == Hex(0x1004) && x.register == "rsi"));
    assert!(
        !t.iter().any(|x| x.address == Hex(0x1000)),
        "walked past a branch target"
    );
}

#[test]
fn empty_profile() {
    let p = Profiler::new();
    assert!(p.hot_regions().is_empty());
    assert!(p.report_regions().is_empty());
    assert!(p.candidate_pages(10).is_none());
}

#[test]
fn back_attribution_sees_through_a_register_advanced_by_a_constant() {
    let mut e = env();
    // f at 0x1000: mov rax,rdx; add rdx,1; shl rax,4; mov [rsp],rdx; add rax,r8 (a dispatch advancing its pc)
    let code: Vec<u8> = vec![
        0x48, 0x89, 0xd0, 0x48, 0x83, 0xc2, 0x01, 0x48, 0xc1, 0xe0, 0x04, 0x48, 0x89, 0x14, 0x24,
        0x4c, 0x01, 0xc0,
    ];
    let mut f = code.clone();
    f.resize(0x100, 0xcc);
    e.code.insert(0x1000, f);
    e.code.insert(0x100f, code[15..].to_vec());
    let mut p = Profiler::new();
    let v: Vec<Sample> = (0..30u64)
        .map(|i| sample(0x100f, &[(Gpr::Rdx, 5 + i % 3), (Gpr::R8, 0x2000)]))
        .collect();
    p.ingest(&v, &mut e);
    let regions = p.report_regions();
    let t = &regions[0].triggers;
    let find = |a: u64, r: &str| t.iter().find(|x| x.address == Hex(a) && x.register == r);
    // Before `add rdx, 1`, rdx held one less: the loop head's pc, although no sample landed before the add.
    let head = find(0x1000, "rdx").expect("rdx at the loop head");
    let mut values: Vec<u64> = head.top_values.iter().map(|v| v.value.0).collect();
    values.sort();
    assert_eq!((head.samples, values), (30, vec![4, 5, 6]), "{t:#?}");
    // The add itself reads rdx before it changes it.
    assert!(find(0x1003, "rdx").is_some_and(|x| x.top_values.iter().all(|v| v.value.0 < 7)));
    // rax is written by the shl: not attributed before it.
    assert!(find(0x1000, "rax").is_none());
}

#[test]
fn register_shift_inverts_only_64_bit_constant_moves() {
    use iced_x86::{Decoder, DecoderOptions};
    let dec = |b: &[u8]| Decoder::with_ip(64, b, 0x1000, DecoderOptions::NONE).decode();
    assert_eq!(
        register_shift(&dec(&[0x48, 0x83, 0xc2, 0x01])),
        Some((Gpr::Rdx, 1))
    ); // add rdx,1
    assert_eq!(
        register_shift(&dec(&[0x48, 0x83, 0xee, 0x10])), // sub rsi,16
        Some((Gpr::Rsi, 16u64.wrapping_neg()))
    );
    assert_eq!(
        register_shift(&dec(&[0x48, 0xff, 0xc1])),
        Some((Gpr::Rcx, 1))
    ); // inc rcx
    assert_eq!(
        register_shift(&dec(&[0x48, 0x8d, 0x40, 0x10])),
        Some((Gpr::Rax, 16))
    ); // lea rax,[rax+16]
    assert_eq!(register_shift(&dec(&[0x48, 0x8d, 0x42, 0x10])), None); // lea rax,[rdx+16]
    assert_eq!(register_shift(&dec(&[0x83, 0xc2, 0x01])), None); // add edx,1 (zero-extends)
    assert_eq!(register_shift(&dec(&[0x48, 0x83, 0xc4, 0x08])), None); // add rsp,8
    assert_eq!(register_shift(&dec(&[0x48, 0x01, 0xc2])), None); // add rdx,rax
}
