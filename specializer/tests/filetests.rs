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
//! expect residual:                    ; residual lines exactly (normalized): the indented lines that follow
//!   add rax, rcx
//! expect exits: 1                     ; number of exits
//! expect exit 0x1000040: rax=0x5 zf=1 ; an exit to this target with these known values
//! expect exit 0x1000040: reason=budget ; ... and this reason (left_region, unknown_target, budget, unsupported)
//! expect exit any: reason=budget      ; some exit (any target) with this reason
//! chain: 0x1000010 = 0x3000000        ; Options::chain entry (exit target -> where to jump)
//! max-states: 2                       ; Options::max_states_per_address
//! budget: 64                          ; Options::max_code_bytes
//! forward: yes                        ; Options::forward_stores (store forwarding and checked stack slots)
//! expect no-fallthrough               ; no exit falls off the end
//! native: no                          ; skip native cross-check (default: auto)
//! scratch: 0x400000 0x100             ; writable memory for native runs (not constant)
//! input: rbx=0x400000                 ; value for native runs, unknown to the specializer
//! ignore: stack                       ; don't compare the stack after running the variant
//! expect-exact:                       ; the whole listing, exactly (below)
//!     mov eax, 0x5
//!     jmp 0x1000007
//!   exit 0x1000007 left_region fall-through: rax=0x5
//! ```
//! `expect-exact:` pins the whole output: the indented lines after it must equal, line for line
//! (surrounding whitespace trimmed, nothing else: no `;` comments inside the block), the residual
//! code as `Variant::residual_asm` prints it (labels `L0:` at two spaces, data `db`, instructions
//! at four) followed by one `exit TARGET REASON[ fall-through]: STATE` line per exit. Every case
//! must have one, and the runner writes it: `DYNSPEC_BLESS=1 cargo test -p specializer --test
//! filetests` rewrites (or appends) each file's block with the current output instead of failing
//! on it; every other check still applies. A mismatch is reported at the file line of the first
//! differing line, with the lines around it.
//! `code:` lines are produced from `asm:` lines by `assemble.py` (GNU as);
//! expected values are written by hand and cross-checked natively: the snippet
//! runs at its address (pages mapped with MAP_FIXED_NOREPLACE) from the known
//! entry values (unknown ones random, three seeds) and every register/flag the
//! specializer claims known at the fall-through exit — and every `expect` value
//! — must match the CPU. Native runs are automatic when all branches are
//! direct, forward and stay inside the snippet.

mod common;

use common::rng::Rng;
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
    /// An exit to this target, optionally with this reason, with these known values.
    /// (`None` target: any exit.)
    Exit(Option<Addr>, Option<String>, Vec<(Loc, u64)>),
    NoFallthrough,
}

#[derive(Debug)]
struct Case {
    path: PathBuf,
    snippet: Snippet,
    /// (line number, expectation)
    expects: Vec<(usize, Expect)>,
    native: Option<bool>,
    /// Writable memory for native runs (address, length): not constant, not
    /// readable by the specializer.
    scratch: Vec<(u64, usize)>,
    /// Register values used by native runs but unknown to the specializer.
    input: Vec<(Gpr, u64)>,
    /// Skip comparing the stack after running the variant (a residual `call`
    /// pushes the variant's return address, by design).
    ignore_stack: bool,
    /// The `expect-exact:` block, if any.
    exact: Option<ExactBlock>,
}

/// An `expect-exact:` block: the listing expected line for line.
#[derive(Debug)]
struct ExactBlock {
    /// 0-based index of the `expect-exact:` line in the file.
    marker: usize,
    /// One past the block's last line (0-based).
    end: usize,
    /// The expected lines, whitespace-trimmed.
    lines: Vec<String>,
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
    let mut scratch = Vec::new();
    let mut chain = std::collections::BTreeMap::new();
    let mut max_states = None;
    let mut budget = None;
    let mut forward = false;
    let mut input = Vec::new();
    let mut ignore_stack = false;
    let mut exact = None;
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
        if line == "expect-exact:" {
            // Verbatim: following indented lines, no comments.
            let marker = i - 1;
            let mut v = Vec::new();
            while i < lines.len()
                && lines[i].starts_with([' ', '\t'])
                && !lines[i].trim().is_empty()
            {
                v.push(lines[i].trim().to_string());
                i += 1;
            }
            if exact.is_some() {
                return Err(err("a second expect-exact: block".into()));
            }
            exact = Some(ExactBlock {
                marker,
                end: i,
                lines: v,
            });
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
            "input" => {
                for a in rest.split_whitespace() {
                    let (g, v) =
                        snippet::parse_reg_assignment(a).map_err(|e| err(e.to_string()))?;
                    input.push((g, v));
                }
            }
            "ignore" => {
                if rest != "stack" {
                    return Err(err(format!("ignore: expects `stack`, got {rest:?}")));
                }
                ignore_stack = true;
            }
            "scratch" => {
                let mut it = rest.split_whitespace();
                let (Some(a), Some(l), None) = (it.next(), it.next(), it.next()) else {
                    return Err(err(format!("scratch: expects ADDR LEN, got {rest:?}")));
                };
                let a = snippet::parse_u64(a).map_err(|e| err(e.to_string()))?;
                let l = snippet::parse_u64(l).map_err(|e| err(e.to_string()))? as usize;
                scratch.push((a, l));
            }
            "chain" => {
                let (a, b) = snippet::split_assignment(rest).map_err(|e| err(e.to_string()))?;
                let a = Addr(snippet::parse_u64(a).map_err(|e| err(e.to_string()))?);
                let b = Addr(snippet::parse_u64(b).map_err(|e| err(e.to_string()))?);
                chain.insert(a, b);
            }
            "max-states" => {
                max_states = Some(
                    rest.parse()
                        .map_err(|_| err(format!("max-states: bad count {rest:?}")))?,
                )
            }
            "budget" => {
                budget = Some(snippet::parse_u64(rest).map_err(|e| err(e.to_string()))? as usize)
            }
            "forward" => {
                forward = match rest {
                    "yes" => true,
                    "no" => false,
                    _ => return Err(err(format!("forward: expects yes|no, got {rest:?}"))),
                }
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
                let t = match k["expect exit ".len()..].trim() {
                    "any" => None,
                    t => Some(Addr(snippet::parse_u64(t).map_err(|e| err(e.to_string()))?)),
                };
                let mut vals = Vec::new();
                let mut reason = None;
                for a in rest.split_whitespace() {
                    let (n, v) = snippet::split_assignment(a).map_err(|e| err(e.to_string()))?;
                    if n == "reason" {
                        reason = Some(v.to_string());
                        continue;
                    }
                    let loc =
                        Loc::parse(n).ok_or_else(|| err(format!("unknown register/flag {n:?}")))?;
                    vals.push((loc, snippet::parse_u64(v).map_err(|e| err(e.to_string()))?));
                }
                expects.push((lno, Expect::Exit(t, reason, vals)));
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
    if !chain.is_empty() {
        s.options.chain = Some(chain);
    }
    if let Some(m) = max_states {
        s.options.max_states_per_address = m;
    }
    if let Some(b) = budget {
        s.options.max_code_bytes = b;
    }
    s.options.forward_stores = forward;
    Ok(Case {
        path: path.to_path_buf(),
        snippet: s,
        expects,
        native,
        scratch,
        input,
        ignore_stack,
        exact,
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
            Expect::Exit(t, reason, vals) => {
                let ok = f.variant.exits.iter().any(|e| {
                    (t.is_none() || *t == Some(e.target))
                        && (reason.is_none()
                            || reason.as_deref() == Some(snippet::reason_name(e.reason)))
                        && vals.iter().all(|(l, v)| l.get(&e.state) == Some(*v))
                });
                if !ok {
                    fails.push(fail(format!(
                        "expected an exit to {t:?} (reason {reason:?}) with {vals:?}, got {:?}",
                        f.variant
                            .exits
                            .iter()
                            .map(|e| format!(
                                "{} {} {}",
                                e.target,
                                snippet::reason_name(e.reason),
                                snippet::state_text(&e.state)
                            ))
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

/// The listing `expect-exact:` pins: the residual code as [`specializer::Variant::residual_asm`]
/// prints it (labels at two spaces, instructions at four), then one line per exit.
fn exact_listing(f: &Folded) -> Vec<String> {
    let mut v: Vec<String> = f
        .residual
        .iter()
        .map(|l| {
            if l.ends_with(':') {
                format!("  {l}")
            } else {
                format!("    {l}")
            }
        })
        .collect();
    for e in &f.variant.exits {
        let ft = if e.target == f.end {
            " fall-through"
        } else {
            ""
        };
        v.push(format!(
            "  exit {} {}{ft}: {}",
            e.target,
            snippet::reason_name(e.reason),
            snippet::state_text(&e.state)
        ));
    }
    v
}

/// Whether `DYNSPEC_BLESS=1`: rewrite `expect-exact:` blocks instead of failing on them.
fn blessing() -> bool {
    std::env::var("DYNSPEC_BLESS").is_ok_and(|v| v == "1")
}

/// Compare the `expect-exact:` block with the listing; report the first mismatch as a small diff
/// at the file line where it is.
fn check_exact(case: &Case, got: &[String], fails: &mut Vec<String>) {
    let p = case.path.display();
    let Some(b) = &case.exact else {
        fails.push(format!(
            "{p}: no expect-exact: block (DYNSPEC_BLESS=1 cargo test -p specializer --test filetests writes it)"
        ));
        return;
    };
    let got: Vec<&str> = got.iter().map(|l| l.trim()).collect();
    let Some(k) = (0..b.lines.len().max(got.len()))
        .find(|&k| b.lines.get(k).map(String::as_str) != got.get(k).copied())
    else {
        return;
    };
    // File line of the first mismatch: the block's k-th line, or the line after the block.
    let lno = b.marker + 2 + k;
    let mut d = format!(
        "{p}:{lno}: expect-exact: listing differs at its line {} (expected {} lines, got {}):",
        k + 1,
        b.lines.len(),
        got.len()
    );
    if k > 0 {
        d.push_str(&format!("\n      {}", got[k - 1]));
    }
    match b.lines.get(k) {
        Some(l) => d.push_str(&format!("\n    - {l}")),
        None => d.push_str("\n    - (end of block)"),
    }
    match got.get(k) {
        Some(l) => d.push_str(&format!("\n    + {l}")),
        None => d.push_str("\n    + (end of listing)"),
    }
    if let Some(l) = got.get(k + 1) {
        d.push_str(&format!("\n      {l}"));
    }
    d.push_str("\n    (DYNSPEC_BLESS=1 cargo test -p specializer --test filetests accepts the current listing)");
    fails.push(d);
}

/// Rewrite (or append) the case's `expect-exact:` block with `got`; whether the file changed.
/// The file is replaced atomically: other tests read the files concurrently.
fn bless(case: &Case, got: &[String]) -> std::io::Result<bool> {
    let text = std::fs::read_to_string(&case.path)?;
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    // The marker line (and a comment on it) stays.
    let marker = case
        .exact
        .as_ref()
        .map_or_else(|| "expect-exact:".to_string(), |b| lines[b.marker].clone());
    let mut block = vec![marker];
    block.extend(got.iter().cloned());
    match &case.exact {
        Some(b) => {
            lines.splice(b.marker..b.end, block);
        }
        None => lines.extend(block),
    }
    let new = lines.join("\n") + "\n";
    if new == text {
        return Ok(false);
    }
    let tmp = case.path.with_extension("fold.bless-tmp");
    std::fs::write(&tmp, new)?;
    std::fs::rename(&tmp, &case.path)?;
    Ok(true)
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

/// One native run: the original's and the variant's outputs from the same inputs.
struct NativePair {
    input: Cpu,
    orig: Cpu,
    var: Cpu,
    /// (what, original bytes, variant bytes) for memory the code may write.
    memory: Vec<(String, Vec<u8>, Vec<u8>)>,
}

/// Map the snippet's code, constant memory and scratch at their addresses,
/// encode the variant next to it, and run both three times with random
/// unknowns. Returns the outputs, or why it could not run.
fn run_native(case: &Case, f: &Folded, m: &Machine) -> Result<Vec<NativePair>, String> {
    let s = &case.snippet;
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
    let mut scratch = Vec::new();
    for (a, l) in &case.scratch {
        let lo = a & !(PAGE_SIZE - 1);
        let map = Mapping::fixed(lo, (a + *l as u64 - lo) as usize)
            .ok_or_else(|| format!("cannot map scratch at {a:#x}"))?;
        scratch.push((map, (*a - lo) as usize, *l));
    }
    // A known rsp needs a stack there.
    let mut stack = None;
    if let Some(rsp) = s.known.reg(Gpr::Rsp) {
        let lo = (rsp & !(PAGE_SIZE - 1)).wrapping_sub(2 * PAGE_SIZE);
        if !pages.iter().any(|p| *p >= lo && *p < lo + 4 * PAGE_SIZE) {
            stack = Some(
                Mapping::fixed(lo, 4 * PAGE_SIZE as usize)
                    .ok_or_else(|| format!("cannot map a stack at {rsp:#x}"))?,
            );
        }
    }
    // The variant, near the code so its exits (rel32 jumps) reach the original.
    let vbase = (s.end().0 + 0x10_0000) & !(PAGE_SIZE - 1);
    let enc = f
        .variant
        .encode(Addr(vbase))
        .map_err(|e| format!("encode: {e}"))?;
    let vbuf = common::ExecBuf::fixed(vbase, enc.code.len().max(1))
        .ok_or_else(|| format!("cannot map the variant at {vbase:#x}"))?;
    vbuf.write(0, &enc.code);
    let reset = |m: &Machine| {
        m.fill_stack(0xa5);
        if let Some(st) = &stack {
            st.write(0, &vec![0xa5; st.len]);
        }
        for (map, off, l) in &scratch {
            map.write(*off, &vec![0x5a; *l]);
        }
    };
    let snapshot = |m: &Machine| {
        let mut v = vec![("stack".to_string(), m.stack_bytes())];
        if let Some(st) = &stack {
            v.push(("stack at rsp".to_string(), st.read(0, st.len)));
        }
        for (map, off, l) in &scratch {
            v.push((
                format!("scratch {:#x}", map.addr + *off as u64),
                map.read(*off, *l),
            ));
        }
        v
    };
    let mut outs = Vec::new();
    let mut rng = Rng(0x9e3779b97f4a7c15u64 ^ s.code.len() as u64);
    for _ in 0..3 {
        let mut input = Cpu::default();
        for g in Gpr::ALL {
            input.regs[g.index()] = s.known.reg(g).unwrap_or_else(|| rng.next());
        }
        for (g, v) in &case.input {
            input.regs[g.index()] = *v;
        }
        if s.known.reg(Gpr::Rsp).is_none() {
            input.regs[Gpr::Rsp.index()] = m.stack_top();
        }
        for f in Flag::ALL {
            let v = s.known.flag(f).unwrap_or(rng.next() & 1 == 1);
            input.set_flag(f, v);
        }
        let desc = format!("{}: {:?}", case.path.display(), s);
        common::on_crash(move || desc.clone());
        reset(m);
        // SAFETY: the snippet's branches are direct, forward and inside the code (or the
        // author said `native: yes`), so it falls through to the exit stub; its memory
        // accesses are to the mapped constant memory, scratch and stack.
        let orig = unsafe { m.run(s.at.0, &input) };
        let mo = snapshot(m);
        reset(m);
        // SAFETY: the variant exits into the original code, which ends at the exit stub.
        let var = unsafe { m.run(vbase, &input) };
        let mv = snapshot(m);
        let memory = mo
            .into_iter()
            .zip(mv)
            .map(|((what, a), (_, b))| (what, a, b))
            .collect();
        outs.push(NativePair {
            input,
            orig,
            var,
            memory,
        });
    }
    Ok(outs)
}

/// Flags that may be architecturally undefined after the snippet
/// (conservative: any instruction that may leave a flag undefined, any
/// shift/rotate for OF/CF).
fn maybe_undefined_flags(s: &Snippet) -> Vec<Flag> {
    use iced_x86::{Mnemonic as M, RflagsBits as R};
    let mut und = 0u32;
    let mut d = Decoder::with_ip(64, &s.code, s.at.0, DecoderOptions::NONE);
    for i in d.iter() {
        und |= i.rflags_undefined();
        if matches!(i.mnemonic(), M::Shl | M::Shr | M::Sar | M::Rol | M::Ror) {
            und |= R::OF | R::CF | R::AF;
        }
    }
    [
        (R::CF, Flag::Cf),
        (R::PF, Flag::Pf),
        (R::AF, Flag::Af),
        (R::ZF, Flag::Zf),
        (R::SF, Flag::Sf),
        (R::DF, Flag::Df),
        (R::OF, Flag::Of),
    ]
    .into_iter()
    .filter(|(b, _)| und & b != 0)
    .map(|(_, f)| f)
    .collect()
}

fn check_native(case: &Case, f: &Folded, m: &Machine, fails: &mut Vec<String>) -> bool {
    let p = case.path.display();
    let run = case.native.unwrap_or_else(|| auto_native(&case.snippet));
    if !run {
        return false;
    }
    let outs = match run_native(case, f, m) {
        Ok(o) => o,
        Err(e) => {
            fails.push(format!("{p}: native run impossible: {e}"));
            return false;
        }
    };
    let ft = f.fallthrough_state();
    // Claimed values are checked only when every exit falls through (another exit would
    // re-enter the original code and could reach the end on a different path).
    let all_fall_through = f.variant.exits.iter().all(|e| e.target == f.end);
    let undefined = maybe_undefined_flags(&case.snippet);
    for pair in &outs {
        let out = &pair.orig;
        // Every value the specializer claims known must be what the CPU computed.
        for loc in Gpr::ALL
            .iter()
            .map(|g| Loc::Reg(*g))
            .chain(Flag::ALL.iter().map(|f| Loc::Flag(*f)))
        {
            if !all_fall_through {
                break;
            }
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
        // The variant must compute what the original computes.
        for g in Gpr::ALL {
            let (a, b) = (pair.orig.regs[g.index()], pair.var.regs[g.index()]);
            if a != b {
                fails.push(format!(
                    "{p}: running the variant: {g} = {b:#x}, the original computes {a:#x} (inputs {:x?})",
                    pair.input.regs
                ));
            }
        }
        for fl in Flag::ALL {
            if undefined.contains(&fl) {
                continue;
            }
            if pair.orig.flag(fl) != pair.var.flag(fl) {
                fails.push(format!(
                    "{p}: running the variant: {} = {}, the original computes {}",
                    fl.name(),
                    pair.var.flag(fl) as u8,
                    pair.orig.flag(fl) as u8
                ));
            }
        }
        for (what, a, b) in &pair.memory {
            if case.ignore_stack && what.starts_with("stack") {
                continue;
            }
            if let Some(off) = a.iter().zip(b).position(|(x, y)| x != y) {
                fails.push(format!(
                    "{p}: running the variant: {what} differs at offset {off:#x}: {:02x}, the original writes {:02x}",
                    b[off], a[off]
                ));
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
    let mut blessed = 0;
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
        let listing = exact_listing(&f);
        if blessing() {
            match bless(&case, &listing) {
                Ok(changed) => blessed += usize::from(changed),
                Err(e) => fails.push(format!("{}: bless failed: {e}", p.display())),
            }
        } else {
            check_exact(&case, &listing, &mut fails);
        }
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
    if blessing() {
        eprintln!("filetests: DYNSPEC_BLESS=1 rewrote the expect-exact: block of {blessed} files");
    }
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
