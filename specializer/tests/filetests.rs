//! Filetests: every `tests/filetests/*.fold` case is specialized through `specializer::snippet` (the `dynspec fold` code path), checked against its expectations, and cross-checked by running the snippet natively.
//!
//! Format (one case per file; `;` starts a comment anywhere on a line):
//! ```text
//! ; test: what this checks
//! at: 0x1000000                       ; optional, default snippet::DEFAULT_AT
//! code: b8 ff ff ff ff                ; mov eax, 0xffffffff   (repeatable, concatenated)
//! set: rcx=5 rdx=-1                   ; registers known at entry
//! flag: cf=1 df=0                     ; flags known at entry
//! mem: 0x200000 = 01 02 03 04         ; constant memory (repeatable)
//! expect rax: 0x100000000             ; fall-through state (join of fall-through exits)
//! expect zf: 1
//! expect rbx: unknown
//! expect residual has: add rax, rcx   ; some residual line equals this (whitespace-normalized)
//! expect residual lacks: add          ; no residual line has this mnemonic
//! expect residual:                    ; exact listing: the indented lines that follow
//!   add rax, rcx
//! expect exits: 1                     ; number of exits
//! expect exit 0x1000040: rax=0x5 zf=1 ; an exit to this target with these known values
//! expect no-fallthrough               ; no exit falls off the end
//! native: no                          ; skip native cross-check (default: auto)
//! ```
//! `code:` lines are produced from `asm:` lines by `assemble.py` (GNU as);
//! expected values are written by hand and cross-checked natively: the snippet
//! runs at its address (pages mapped with MAP_FIXED_NOREPLACE) from the known
//! entry values (unknown ones random, three seeds) and every register/flag the
//! specializer claims known at the fall-through exit — and every `expect` value
//! — must match the CPU. Native runs are automatic when all branches are
//! direct, forward and stay inside the snippet.

mod common;

use common::{Cpu, Machine, Mapping};
use iced_x86::{Decoder, DecoderOptions, FlowControl, Mnemonic};
use specializer::snippet::{self, Folded, Snippet, DEFAULT_AT};
use specializer::{Addr, Flag, Gpr, KnownState, PAGE_SIZE};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug)]
enum Val {
    Known(u64),
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Loc {
    Reg(Gpr),
    Flag(Flag),
}

impl Loc {
    fn parse(s: &str) -> Option<Loc> {
        Gpr::from_name(s)
            .map(Loc::Reg)
            .or_else(|| Flag::from_name(s).map(Loc::Flag))
    }
    fn name(self) -> &'static str {
        match self {
            Loc::Reg(g) => g.name(),
            Loc::Flag(f) => f.name(),
        }
    }
    fn get(self, s: &KnownState) -> Option<u64> {
        match self {
            Loc::Reg(g) => s.reg(g),
            Loc::Flag(f) => s.flag(f).map(u64::from),
        }
    }
    fn get_cpu(self, c: &Cpu) -> u64 {
        match self {
            Loc::Reg(g) => c.regs[g.index()],
            Loc::Flag(f) => c.flag(f) as u64,
        }
    }
}

#[derive(Debug)]
enum Expect {
    Value(Loc, Val),
    Has(String),
    Lacks(String),
    Exact(Vec<String>),
    Exits(usize),
    Exit(Addr, Vec<(Loc, u64)>),
    NoFallthrough,
}

#[derive(Debug)]
struct Case {
    path: PathBuf,
    snippet: Snippet,
    /// (line number, expectation)
    expects: Vec<(usize, Expect)>,
    native: Option<bool>,
}

/// Normalize an asm line for comparison: lower case, single spaces, no space
/// after commas, no `byte/word/dword/qword ptr` size prefixes.
fn norm(s: &str) -> String {
    let mut t = s.to_ascii_lowercase();
    for p in ["qword ptr ", "dword ptr ", "word ptr ", "byte ptr "] {
        t = t.replace(p, "");
    }
    let t = t
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace(", ", ",");
    // Numbers: decimal and 0x-hex both render as 0x-hex (formatters print small values in decimal).
    let mut out = String::new();
    let mut word = String::new();
    let flush = |w: &mut String, out: &mut String| {
        let n = if let Some(h) = w.strip_prefix("0x") {
            u64::from_str_radix(h, 16).ok()
        } else if !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit()) {
            w.parse().ok()
        } else {
            None
        };
        match n {
            Some(v) => out.push_str(&format!("{v:#x}")),
            None => out.push_str(w),
        }
        w.clear();
    };
    for c in t.chars() {
        if c.is_ascii_alphanumeric() || c == '_' {
            word.push(c);
        } else {
            flush(&mut word, &mut out);
            out.push(c);
        }
    }
    flush(&mut word, &mut out);
    out
}

fn parse_case(path: &Path) -> Result<Case, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut at = DEFAULT_AT;
    let mut code = Vec::new();
    let mut known = KnownState::default();
    let mut memory = Vec::new();
    let mut expects = Vec::new();
    let mut native = None;
    let lines: Vec<&str> = text.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let lno = i + 1;
        let err = |m: String| format!("{}:{lno}: {m}", path.display());
        let line = lines[i].split(';').next().unwrap_or("").trim();
        i += 1;
        if line.is_empty() {
            continue;
        }
        let (key, rest) = line
            .split_once(':')
            .map(|(k, r)| (k.trim(), r.trim()))
            .unwrap_or((line, ""));
        match key {
            "at" => at = Addr(snippet::parse_u64(rest).map_err(|e| err(e.to_string()))?),
            "code" => code.extend(snippet::parse_hex_bytes(rest).map_err(|e| err(e.to_string()))?),
            "set" => {
                for a in rest.split_whitespace() {
                    let (g, v) =
                        snippet::parse_reg_assignment(a).map_err(|e| err(e.to_string()))?;
                    known.set_reg(g, Some(v));
                }
            }
            "flag" => {
                for a in rest.split_whitespace() {
                    let (f, v) =
                        snippet::parse_flag_assignment(a).map_err(|e| err(e.to_string()))?;
                    known.set_flag(f, Some(v));
                }
            }
            "mem" => {
                memory.push(snippet::parse_mem_assignment(rest).map_err(|e| err(e.to_string()))?)
            }
            "native" => {
                native = Some(match rest {
                    "yes" => true,
                    "no" => false,
                    _ => return Err(err(format!("native: expects yes|no, got {rest:?}"))),
                })
            }
            "expect residual" => {
                // Exact listing: following indented lines.
                let mut v = Vec::new();
                while i < lines.len() && lines[i].starts_with([' ', '\t']) {
                    let l = lines[i].split(';').next().unwrap_or("").trim();
                    if !l.is_empty() {
                        v.push(norm(l));
                    }
                    i += 1;
                }
                expects.push((lno, Expect::Exact(v)));
            }
            "expect residual has" => expects.push((lno, Expect::Has(norm(rest)))),
            "expect residual lacks" => expects.push((lno, Expect::Lacks(norm(rest)))),
            "expect exits" => expects.push((
                lno,
                Expect::Exits(
                    rest.parse()
                        .map_err(|_| err(format!("bad count {rest:?}")))?,
                ),
            )),
            "expect no-fallthrough" => expects.push((lno, Expect::NoFallthrough)),
            k if k.starts_with("expect exit ") => {
                let t = snippet::parse_u64(&k["expect exit ".len()..])
                    .map_err(|e| err(e.to_string()))?;
                let mut vals = Vec::new();
                for a in rest.split_whitespace() {
                    let (n, v) = snippet::split_assignment(a).map_err(|e| err(e.to_string()))?;
                    let loc =
                        Loc::parse(n).ok_or_else(|| err(format!("unknown register/flag {n:?}")))?;
                    vals.push((loc, snippet::parse_u64(v).map_err(|e| err(e.to_string()))?));
                }
                expects.push((lno, Expect::Exit(Addr(t), vals)));
            }
            k if k.starts_with("expect ") => {
                let n = k["expect ".len()..].trim();
                let loc =
                    Loc::parse(n).ok_or_else(|| err(format!("unknown register/flag {n:?}")))?;
                let v = if rest == "unknown" {
                    Val::Unknown
                } else {
                    let v = snippet::parse_u64(rest).map_err(|e| err(e.to_string()))?;
                    if matches!(loc, Loc::Flag(_)) && v > 1 {
                        return Err(err(format!("flag value must be 0 or 1, got {rest}")));
                    }
                    Val::Known(v)
                };
                expects.push((lno, Expect::Value(loc, v)));
            }
            _ => return Err(err(format!("unknown directive {key:?}"))),
        }
    }
    if code.is_empty() {
        return Err(format!("{}: no code", path.display()));
    }
    let mut s = Snippet::new(at, code);
    s.known = known;
    s.memory = memory;
    Ok(Case {
        path: path.to_path_buf(),
        snippet: s,
        expects,
        native,
    })
}

fn filetest_paths() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/filetests");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("filetests dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "fold"))
        .collect();
    v.sort();
    v
}

fn show(v: Option<u64>) -> String {
    v.map(|v| format!("{v:#x}"))
        .unwrap_or_else(|| "unknown".into())
}

fn check_expectations(case: &Case, f: &Folded, fails: &mut Vec<String>) {
    let p = case.path.display();
    let ft = f.fallthrough_state();
    for (lno, e) in &case.expects {
        let fail = |m: String| format!("{p}:{lno}: {m}");
        match e {
            Expect::Value(loc, want) => {
                let got = loc.get(&ft);
                let ok = match want {
                    Val::Known(w) => got == Some(*w),
                    Val::Unknown => got.is_none(),
                };
                if !ok {
                    let w = match want {
                        Val::Known(w) => format!("{w:#x}"),
                        Val::Unknown => "unknown".into(),
                    };
                    fails.push(fail(format!(
                        "{}: expected {w}, got {}",
                        loc.name(),
                        show(got)
                    )));
                }
            }
            Expect::Has(l) => {
                if !f.residual.iter().any(|r| norm(r) == *l) {
                    fails.push(fail(format!(
                        "expected residual line {l:?}, got {:?}",
                        f.residual
                    )));
                }
            }
            Expect::Lacks(m) => {
                if let Some(r) = f.residual.iter().find(|r| {
                    let n = norm(r);
                    n == *m || n.starts_with(&format!("{m} "))
                }) {
                    fails.push(fail(format!("expected no {m:?} in residual, got {r:?}")));
                }
            }
            Expect::Exact(want) => {
                let got: Vec<String> = f.residual.iter().map(|r| norm(r)).collect();
                if &got != want {
                    fails.push(fail(format!("expected residual {want:?}, got {got:?}")));
                }
            }
            Expect::Exits(n) => {
                if f.variant.exits.len() != *n {
                    fails.push(fail(format!(
                        "expected {n} exits, got {}: {:?}",
                        f.variant.exits.len(),
                        f.variant.exits.iter().map(|e| e.target).collect::<Vec<_>>()
                    )));
                }
            }
            Expect::Exit(t, vals) => {
                let ok = f.variant.exits.iter().any(|e| {
                    e.target == *t && vals.iter().all(|(l, v)| l.get(&e.state) == Some(*v))
                });
                if !ok {
                    fails.push(fail(format!(
                        "expected an exit to {t} with {vals:?}, got {:?}",
                        f.variant
                            .exits
                            .iter()
                            .map(|e| format!("{} {}", e.target, snippet::state_text(&e.state)))
                            .collect::<Vec<_>>()
                    )));
                }
            }
            Expect::NoFallthrough => {
                if f.fallthrough_exits().next().is_some() {
                    fails.push(fail("expected no fall-through exit".into()));
                }
            }
        }
    }
}

/// The variant encodes (at an address far from the code, so branches and
/// RIP-relative operands are relocated) and its deopt map covers every
/// reachable instruction boundary.
fn check_encoding(case: &Case, f: &Folded, fails: &mut Vec<String>) {
    let p = case.path.display();
    let base = case.snippet.at.0.wrapping_add(0x4000_0000);
    match f.variant.encode(Addr(base)) {
        Ok(enc) => {
            for off in common::reachable_boundaries(&enc.code, base) {
                if !enc.deopt.iter().any(|d| d.offset as u64 == off) {
                    fails.push(format!("{p}: no deopt entry at variant offset {off:#x}"));
                    break;
                }
            }
            if enc.exit_offsets.len() != f.variant.exits.len() {
                fails.push(format!(
                    "{p}: {} exit offsets for {} exits",
                    enc.exit_offsets.len(),
                    f.variant.exits.len()
                ));
            }
        }
        Err(e) => fails.push(format!("{p}: encode failed: {e}")),
    }
}

/// Whether the snippet can run natively to its end: only direct branches,
/// forward, staying inside the code.
fn auto_native(s: &Snippet) -> bool {
    let end = s.end().0;
    let mut d = Decoder::with_ip(64, &s.code, s.at.0, DecoderOptions::NONE);
    for i in d.iter() {
        if i.is_invalid() {
            return false;
        }
        match i.flow_control() {
            FlowControl::Next => {}
            FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch => {
                if !i.is_jmp_short_or_near() && !i.is_jcc_short_or_near() {
                    return false;
                }
                let t = i.near_branch_target();
                if t <= i.ip() || t > end {
                    return false;
                }
            }
            _ => return false,
        }
    }
    true
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Map the snippet's code and constant memory at their addresses and run it
/// three times with random unknowns. Returns the outputs, or why it could not run.
fn run_native(s: &Snippet, m: &Machine) -> Result<Vec<Cpu>, String> {
    // Pages: code + memory ranges (+ the exit stub after the code).
    let stub = m.exit_stub();
    let mut bytes: BTreeMap<u64, u8> = BTreeMap::new();
    for (k, b) in s.code.iter().chain(stub.iter()).enumerate() {
        bytes.insert(s.at.0 + k as u64, *b);
    }
    for (a, v) in &s.memory {
        for (k, b) in v.iter().enumerate() {
            bytes.insert(a.0 + k as u64, *b);
        }
    }
    let pages: BTreeSet<u64> = bytes.keys().map(|a| a & !(PAGE_SIZE - 1)).collect();
    let mut maps = Vec::new();
    for p in &pages {
        let map = Mapping::fixed(*p, PAGE_SIZE as usize)
            .ok_or_else(|| format!("cannot map page {p:#x} natively"))?;
        maps.push(map);
    }
    for (a, b) in &bytes {
        let map = maps
            .iter()
            .find(|m| m.addr <= *a && *a < m.end())
            .expect("mapped");
        map.write((*a - map.addr) as usize, &[*b]);
    }
    for map in &maps {
        map.protect(0, map.len, libc::PROT_READ | libc::PROT_EXEC);
    }
    // A known rsp needs a stack there.
    let mut _stack = None;
    if let Some(rsp) = s.known.reg(Gpr::Rsp) {
        let lo = (rsp & !(PAGE_SIZE - 1)).wrapping_sub(2 * PAGE_SIZE);
        if !pages.iter().any(|p| *p >= lo && *p < lo + 4 * PAGE_SIZE) {
            _stack = Some(
                Mapping::fixed(lo, 4 * PAGE_SIZE as usize)
                    .ok_or_else(|| format!("cannot map a stack at {rsp:#x}"))?,
            );
        }
    }
    let mut outs = Vec::new();
    let mut seed = 0x9e3779b97f4a7c15u64 ^ s.code.len() as u64;
    for _ in 0..3 {
        let mut input = Cpu::default();
        for g in Gpr::ALL {
            input.regs[g.index()] = s.known.reg(g).unwrap_or_else(|| xorshift(&mut seed));
        }
        if s.known.reg(Gpr::Rsp).is_none() {
            input.regs[Gpr::Rsp.index()] = m.stack_top();
        }
        for f in Flag::ALL {
            let v = s.known.flag(f).unwrap_or(xorshift(&mut seed) & 1 == 1);
            input.set_flag(f, v);
        }
        let desc = format!("{:?}", s);
        common::on_crash(move || desc.clone());
        // SAFETY: the snippet's branches are direct, forward and inside the code, so it falls
        // through to the exit stub; its memory accesses are the test author's responsibility.
        outs.push(unsafe { m.run(s.at.0, &input) });
    }
    Ok(outs)
}

fn check_native(case: &Case, f: &Folded, m: &Machine, fails: &mut Vec<String>) -> bool {
    let p = case.path.display();
    let run = case.native.unwrap_or_else(|| auto_native(&case.snippet));
    if !run {
        return false;
    }
    let outs = match run_native(&case.snippet, m) {
        Ok(o) => o,
        Err(e) => {
            fails.push(format!("{p}: native run impossible: {e}"));
            return false;
        }
    };
    let ft = f.fallthrough_state();
    for out in &outs {
        // Every value the specializer claims known must be what the CPU computed.
        for loc in Gpr::ALL
            .iter()
            .map(|g| Loc::Reg(*g))
            .chain(Flag::ALL.iter().map(|f| Loc::Flag(*f)))
        {
            if let Some(v) = loc.get(&ft) {
                let cpu = loc.get_cpu(out);
                if cpu != v {
                    fails.push(format!(
                        "{p}: specializer says {} = {v:#x} at the fall-through exit, CPU computed {cpu:#x}",
                        loc.name()
                    ));
                }
            }
        }
        // Hand-written expectations must agree with the CPU too.
        for (lno, e) in &case.expects {
            if let Expect::Value(loc, Val::Known(w)) = e {
                let cpu = loc.get_cpu(out);
                if cpu != *w {
                    fails.push(format!(
                        "{p}:{lno}: expectation {} = {w:#x} disagrees with the CPU ({cpu:#x})",
                        loc.name()
                    ));
                }
            }
        }
    }
    true
}

#[test]
fn filetests() {
    let m = Machine::new();
    let mut fails = Vec::new();
    let paths = filetest_paths();
    assert!(!paths.is_empty(), "no filetests found");
    let mut native_runs = 0;
    for p in &paths {
        let case = match parse_case(p) {
            Ok(c) => c,
            Err(e) => {
                fails.push(e);
                continue;
            }
        };
        let f = match case.snippet.fold() {
            Ok(f) => f,
            Err(e) => {
                fails.push(format!("{}: fold failed: {e}", p.display()));
                continue;
            }
        };
        let before = fails.len();
        check_expectations(&case, &f, &mut fails);
        check_encoding(&case, &f, &mut fails);
        if check_native(&case, &f, &m, &mut fails) {
            native_runs += 1;
        }
        if fails.len() > before {
            fails.push(format!("    residual of {}: {:?}", p.display(), f.residual));
        }
    }
    eprintln!(
        "filetests: {} cases, {} cross-checked natively",
        paths.len(),
        native_runs
    );
    if !fails.is_empty() {
        panic!("{} filetest failures:\n{}", fails.len(), fails.join("\n"));
    }
}

/// Every mnemonic the specializer claims to model has at least one filetest.
#[test]
fn every_modelled_mnemonic_has_a_filetest() {
    let mut covered = BTreeSet::new();
    for p in filetest_paths() {
        let Ok(case) = parse_case(&p) else { continue };
        let mut d = Decoder::with_ip(
            64,
            &case.snippet.code,
            case.snippet.at.0,
            DecoderOptions::NONE,
        );
        for i in d.iter() {
            covered.insert(i.mnemonic() as u32);
        }
    }
    let missing: Vec<Mnemonic> = specializer::modelled_mnemonics()
        .iter()
        .copied()
        .filter(|m| !covered.contains(&(*m as u32)))
        .collect();
    assert!(
        missing.is_empty(),
        "modelled mnemonics without a filetest: {missing:?}"
    );
}

/// Every filetest parses (reported separately so syntax errors are obvious).
#[test]
fn filetests_parse() {
    let errs: Vec<String> = filetest_paths()
        .iter()
        .filter_map(|p| parse_case(p).err())
        .collect();
    assert!(errs.is_empty(), "{}", errs.join("\n"));
}
