//! Snippets: a few bytes of code plus known registers, flags and constant memory, specialized and rendered as text or JSON (used by `dynspec fold` and the filetests).
//!
//! A [`Snippet`] describes a self-contained experiment: code placed at an
//! address, what is known at entry, and byte ranges of constant memory. The
//! region the specializer may follow is exactly the code, so falling off its
//! end is an exit (the "fall-through" exit). [`Snippet::fold`] runs
//! [`crate::specialize`] over an in-memory [`SnippetMemory`] and returns a
//! [`Folded`] result that renders itself.

use crate::{specialize, Addr, Exit, ExitReason, Flag, Gpr, KnownState, Memory, MemoryError};
use crate::{Options, Request, SpecializeError, Variant, PAGE_SIZE};
use std::fmt::Write as _;

/// Address where snippet code is placed unless told otherwise.
pub const DEFAULT_AT: Addr = Addr(0x100_0000);

/// Why a snippet could not be built or folded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnippetError {
    #[error("bad hex bytes {text:?}: {why}")]
    BadHex { text: String, why: &'static str },
    #[error("bad number {0:?} (expected decimal, -decimal or 0x-hex that fits 64 bits)")]
    BadNumber(String),
    #[error("unknown register {0:?} (expected one of rax..r15)")]
    UnknownRegister(String),
    #[error("unknown flag {0:?} (expected one of cf, pf, af, zf, sf, df, of)")]
    UnknownFlag(String),
    #[error("bad flag value {0:?} (expected 0 or 1)")]
    BadFlagValue(String),
    #[error("expected NAME=VALUE, got {0:?}")]
    BadAssignment(String),
    #[error("the snippet has no code")]
    EmptyCode,
    #[error("{what} at {start}..+{len:#x} wraps around the address space")]
    Wraps {
        what: &'static str,
        start: Addr,
        len: usize,
    },
    #[error("constant memory at {0} is empty")]
    EmptyMemory(Addr),
    #[error("constant memory at {a} overlaps {b}")]
    Overlap { a: Addr, b: String },
    #[error("specialization failed: {0}")]
    Specialize(#[from] SpecializeError),
}

/// Parse hex bytes: pairs of hex digits, optionally separated by whitespace,
/// commas or underscores (`"48 01 c8"`, `"4801c8"`). A `0x` prefix on the
/// whole text is allowed.
pub fn parse_hex_bytes(text: &str) -> Result<Vec<u8>, SnippetError> {
    let bad = |why| SnippetError::BadHex {
        text: text.to_string(),
        why,
    };
    let t = text.trim();
    let t = t
        .strip_prefix("0x")
        .or_else(|| t.strip_prefix("0X"))
        .unwrap_or(t);
    let mut out = Vec::new();
    let mut pending: Option<u8> = None;
    for c in t.chars() {
        if c.is_whitespace() || c == ',' || c == '_' {
            // A separator must not split a byte.
            if pending.is_some() {
                return Err(bad("a byte needs two hex digits"));
            }
            continue;
        }
        let d = c.to_digit(16).ok_or_else(|| bad("not a hex digit"))? as u8;
        match pending.take() {
            Some(hi) => out.push(hi << 4 | d),
            None => pending = Some(d),
        }
    }
    if pending.is_some() {
        return Err(bad("odd number of hex digits"));
    }
    Ok(out)
}

/// Parse a 64-bit value: `0x`-hex, decimal, or negative decimal (two's
/// complement). Underscores are allowed as digit separators.
pub fn parse_u64(text: &str) -> Result<u64, SnippetError> {
    let bad = || SnippetError::BadNumber(text.to_string());
    let t: String = text.trim().chars().filter(|&c| c != '_').collect();
    if t.is_empty() {
        return Err(bad());
    }
    if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(h, 16).map_err(|_| bad());
    }
    if let Some(d) = t.strip_prefix('-') {
        let v: u64 = d.parse().map_err(|_| bad())?;
        if v > 1u64 << 63 {
            return Err(bad());
        }
        return Ok(v.wrapping_neg());
    }
    t.parse().map_err(|_| bad())
}

/// Split `NAME=VALUE` (spaces around `=` allowed).
pub fn split_assignment(text: &str) -> Result<(&str, &str), SnippetError> {
    let (n, v) = text
        .split_once('=')
        .ok_or_else(|| SnippetError::BadAssignment(text.to_string()))?;
    let (n, v) = (n.trim(), v.trim());
    if n.is_empty() || v.is_empty() {
        return Err(SnippetError::BadAssignment(text.to_string()));
    }
    Ok((n, v))
}

/// Parse `REG=VALUE` (64-bit register names only).
pub fn parse_reg_assignment(text: &str) -> Result<(Gpr, u64), SnippetError> {
    let (n, v) = split_assignment(text)?;
    let g = Gpr::from_name(n).ok_or_else(|| SnippetError::UnknownRegister(n.to_string()))?;
    Ok((g, parse_u64(v)?))
}

/// Parse a flag value `0` or `1`.
pub fn parse_flag_value(text: &str) -> Result<bool, SnippetError> {
    match text.trim() {
        "0" => Ok(false),
        "1" => Ok(true),
        other => Err(SnippetError::BadFlagValue(other.to_string())),
    }
}

/// Parse `FLAG=0|1`.
pub fn parse_flag_assignment(text: &str) -> Result<(Flag, bool), SnippetError> {
    let (n, v) = split_assignment(text)?;
    let f = Flag::from_name(n).ok_or_else(|| SnippetError::UnknownFlag(n.to_string()))?;
    Ok((f, parse_flag_value(v)?))
}

/// Parse `ADDR=HEXBYTES`.
pub fn parse_mem_assignment(text: &str) -> Result<(Addr, Vec<u8>), SnippetError> {
    let (a, b) = split_assignment(text)?;
    Ok((Addr(parse_u64(a)?), parse_hex_bytes(b)?))
}

/// Byte ranges of a snippet's address space: the code (readable) and the
/// constant ranges (readable; every page they touch is constant). Nothing
/// else is readable.
#[derive(Clone, Debug)]
pub struct SnippetMemory {
    /// Sorted by start, non-overlapping.
    ranges: Vec<(Addr, Vec<u8>)>,
    /// Sorted, deduplicated constant pages.
    constant_pages: Vec<Addr>,
}

impl SnippetMemory {
    /// Build from the code and the constant ranges; ranges must not be empty,
    /// wrap around, or overlap each other or the code.
    pub fn new(
        code_at: Addr,
        code: &[u8],
        constant: &[(Addr, Vec<u8>)],
    ) -> Result<SnippetMemory, SnippetError> {
        check_range("code", code_at, code.len())?;
        let mut ranges: Vec<(Addr, Vec<u8>)> = vec![(code_at, code.to_vec())];
        let mut constant_pages = Vec::new();
        for (a, bytes) in constant {
            if bytes.is_empty() {
                return Err(SnippetError::EmptyMemory(*a));
            }
            check_range("constant memory", *a, bytes.len())?;
            let end = a.0 + bytes.len() as u64;
            for (i, (b, other)) in ranges.iter().enumerate() {
                let oend = b.0 + other.len() as u64;
                if a.0 < oend && b.0 < end {
                    let what = if i == 0 {
                        format!("the code at {b}")
                    } else {
                        format!("constant memory at {b}")
                    };
                    return Err(SnippetError::Overlap { a: *a, b: what });
                }
            }
            ranges.push((*a, bytes.clone()));
            let mut p = a.page().0;
            while p < end {
                constant_pages.push(Addr(p));
                p += PAGE_SIZE;
            }
        }
        ranges.sort_by_key(|r| r.0);
        constant_pages.sort();
        constant_pages.dedup();
        Ok(SnippetMemory {
            ranges,
            constant_pages,
        })
    }

    /// The range containing `addr`, with the offset of `addr` inside it.
    fn find(&self, addr: u64) -> Option<(&[u8], usize)> {
        // Ranges are sorted and disjoint: the candidate is the last one starting at or before addr.
        let i = self.ranges.partition_point(|r| r.0 .0 <= addr);
        let (start, bytes) = self.ranges.get(i.checked_sub(1)?)?;
        let off = addr - start.0;
        (off < bytes.len() as u64).then_some((bytes.as_slice(), off as usize))
    }
}

fn check_range(what: &'static str, start: Addr, len: usize) -> Result<(), SnippetError> {
    if start.0.checked_add(len as u64).is_none() {
        return Err(SnippetError::Wraps { what, start, len });
    }
    Ok(())
}

impl Memory for SnippetMemory {
    fn read(&self, addr: Addr, buf: &mut [u8]) -> Result<(), MemoryError> {
        let mut done = 0;
        // A read may span adjacent ranges (e.g. code followed by data), so copy piecewise.
        while done < buf.len() {
            let a = addr
                .0
                .checked_add(done as u64)
                .ok_or(MemoryError::Unreadable(addr))?;
            let (bytes, off) = self.find(a).ok_or(MemoryError::Unreadable(Addr(a)))?;
            let n = (bytes.len() - off).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&bytes[off..off + n]);
            done += n;
        }
        Ok(())
    }

    fn is_constant(&self, page: Addr) -> bool {
        self.constant_pages.binary_search(&page.page()).is_ok()
    }
}

/// Code at an address plus what is known at entry.
#[derive(Clone, Debug)]
pub struct Snippet {
    pub at: Addr,
    pub code: Vec<u8>,
    /// Registers and flags known at entry; everything else is unknown.
    pub known: KnownState,
    /// Constant memory ranges (address, bytes).
    pub memory: Vec<(Addr, Vec<u8>)>,
    pub options: Options,
}

impl Snippet {
    /// Code at `at`, nothing known, no constant memory, default options.
    pub fn new(at: Addr, code: Vec<u8>) -> Snippet {
        Snippet {
            at,
            code,
            known: KnownState::default(),
            memory: Vec::new(),
            options: Options::default(),
        }
    }

    /// End of the code: the fall-through exit's target.
    pub fn end(&self) -> Addr {
        self.at.offset(self.code.len() as u64)
    }

    /// The memory the specializer sees for this snippet.
    pub fn snippet_memory(&self) -> Result<SnippetMemory, SnippetError> {
        SnippetMemory::new(self.at, &self.code, &self.memory)
    }

    /// The request: entry and region are the code.
    pub fn request(&self) -> Request {
        Request {
            entry: self.at,
            region_start: self.at,
            region_end: self.end(),
            known: self.known.clone(),
            options: self.options.clone(),
        }
    }

    /// Specialize the snippet.
    pub fn fold(&self) -> Result<Folded, SnippetError> {
        if self.code.is_empty() {
            return Err(SnippetError::EmptyCode);
        }
        let mem = self.snippet_memory()?;
        let variant = specialize(&self.request(), &mem)?;
        let residual = variant.residual_asm();
        Ok(Folded {
            variant,
            end: self.end(),
            residual,
        })
    }
}

/// The result of folding a snippet.
#[derive(Debug)]
pub struct Folded {
    pub variant: Variant,
    /// The fall-through target (end of the code).
    pub end: Addr,
    /// `Variant::residual_asm()`.
    pub residual: Vec<String>,
}

impl Folded {
    /// Exits that leave by falling off the end of the code.
    pub fn fallthrough_exits(&self) -> impl Iterator<Item = &Exit> {
        self.variant
            .exits
            .iter()
            .filter(move |e| e.target == self.end)
    }

    /// The state after the code: what every fall-through exit agrees on (a
    /// value is known only if it is known and equal at all of them). All
    /// unknown when no path falls through.
    pub fn fallthrough_state(&self) -> KnownState {
        let mut it = self.fallthrough_exits();
        let Some(first) = it.next() else {
            return KnownState::default();
        };
        let mut s = first.state.clone();
        for e in it {
            for (a, b) in s.regs.iter_mut().zip(e.state.regs.iter()) {
                if *a != *b {
                    *a = None;
                }
            }
            for (a, b) in s.flags.iter_mut().zip(e.state.flags.iter()) {
                if *a != *b {
                    *a = None;
                }
            }
        }
        s
    }

    /// Human-readable rendering: residual code, then every exit with its
    /// known registers and flags (unknown ones are omitted).
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "residual ({} instructions):", self.residual.len());
        for l in &self.residual {
            if l.ends_with(':') {
                let _ = writeln!(out, "{l}");
            } else {
                let _ = writeln!(out, "    {l}");
            }
        }
        let _ = writeln!(out, "exits:");
        for e in &self.variant.exits {
            let ft = if e.target == self.end {
                " fall-through"
            } else {
                ""
            };
            let _ = writeln!(out, "  {} ({}{ft})", e.target, reason_name(e.reason));
            let _ = writeln!(out, "    {}", state_text(&e.state));
        }
        if self.variant.exits.is_empty() {
            let _ = writeln!(out, "  (none)");
        }
        let s = &self.variant.stats;
        let _ = writeln!(
            out,
            "stats: visited {}, folded {}, residual {}",
            s.visited, s.folded, s.residual
        );
        out
    }

    /// JSON rendering: `{"registers": {...}, "flags": {...}, "residual": [...],
    /// "exits": [{"target", "reason", "registers", "flags"}]}`; the top-level
    /// registers and flags are [`Folded::fallthrough_state`].
    pub fn to_json(&self) -> String {
        let mut out = String::from("{");
        let ft = self.fallthrough_state();
        let _ = write!(
            out,
            "\"registers\":{},\"flags\":{},\"residual\":[",
            regs_json(&ft),
            flags_json(&ft)
        );
        for (i, l) in self.residual.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            json_string(&mut out, l);
        }
        out.push_str("],\"exits\":[");
        for (i, e) in self.variant.exits.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(
                out,
                "{{\"target\":\"{:#x}\",\"reason\":\"{}\",\"registers\":{},\"flags\":{}}}",
                e.target.0,
                reason_name(e.reason),
                regs_json(&e.state),
                flags_json(&e.state)
            );
        }
        out.push_str("]}");
        out
    }
}

/// Stable lower-case name of an exit reason.
pub fn reason_name(r: ExitReason) -> &'static str {
    match r {
        ExitReason::LeftRegion => "left_region",
        ExitReason::UnknownTarget => "unknown_target",
        ExitReason::Budget => "budget",
        ExitReason::Unsupported => "unsupported",
        ExitReason::Redispatch => "redispatch",
    }
}

/// `rax=0x1 rcx=0x2 cf=1` for the known values; `(nothing known)` otherwise.
pub fn state_text(s: &KnownState) -> String {
    let mut parts = Vec::new();
    for g in Gpr::ALL {
        if let Some(v) = s.reg(g) {
            parts.push(format!("{g}={v:#x}"));
        }
    }
    for f in Flag::ALL {
        if let Some(v) = s.flag(f) {
            parts.push(format!("{}={}", f.name(), v as u8));
        }
    }
    if parts.is_empty() {
        "(nothing known)".to_string()
    } else {
        parts.join(" ")
    }
}

fn regs_json(s: &KnownState) -> String {
    let mut out = String::from("{");
    for (i, g) in Gpr::ALL.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match s.reg(*g) {
            Some(v) => {
                let _ = write!(out, "\"{g}\":\"{v:#x}\"");
            }
            None => {
                let _ = write!(out, "\"{g}\":null");
            }
        }
    }
    out.push('}');
    out
}

fn flags_json(s: &KnownState) -> String {
    let mut out = String::from("{");
    for (i, f) in Flag::ALL.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match s.flag(*f) {
            Some(v) => {
                let _ = write!(out, "\"{}\":{}", f.name(), v as u8);
            }
            None => {
                let _ = write!(out, "\"{}\":null", f.name());
            }
        }
    }
    out.push('}');
    out
}

fn json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_bytes() {
        assert_eq!(parse_hex_bytes("48 01 c8").unwrap(), vec![0x48, 0x01, 0xc8]);
        assert_eq!(parse_hex_bytes("4801C8").unwrap(), vec![0x48, 0x01, 0xc8]);
        assert_eq!(parse_hex_bytes("0x4801").unwrap(), vec![0x48, 0x01]);
        assert_eq!(parse_hex_bytes("").unwrap(), Vec::<u8>::new());
        assert!(parse_hex_bytes("480").is_err());
        assert!(parse_hex_bytes("4 801").is_err());
        assert!(parse_hex_bytes("zz").is_err());
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_u64("0x10").unwrap(), 16);
        assert_eq!(parse_u64("10").unwrap(), 10);
        assert_eq!(parse_u64("-1").unwrap(), u64::MAX);
        assert_eq!(parse_u64("-9223372036854775808").unwrap(), 1 << 63);
        assert_eq!(parse_u64("0xffff_ffff_ffff_ffff").unwrap(), u64::MAX);
        assert!(parse_u64("-9223372036854775809").is_err());
        assert!(parse_u64("0x1_0000_0000_0000_0000").is_err());
        assert!(parse_u64("").is_err());
        assert!(parse_u64("rax").is_err());
    }

    #[test]
    fn assignments() {
        assert_eq!(parse_reg_assignment("RCX = 5").unwrap(), (Gpr::Rcx, 5));
        assert!(matches!(
            parse_reg_assignment("eax=5"),
            Err(SnippetError::UnknownRegister(_))
        ));
        assert!(parse_reg_assignment("rax").is_err());
        assert_eq!(parse_flag_assignment("zf=1").unwrap(), (Flag::Zf, true));
        assert!(parse_flag_assignment("zf=2").is_err());
        assert!(parse_flag_assignment("xf=1").is_err());
        assert_eq!(
            parse_mem_assignment("0x2000=0102").unwrap(),
            (Addr(0x2000), vec![1, 2])
        );
    }

    #[test]
    fn memory_ranges() {
        let m = SnippetMemory::new(
            Addr(0x1000),
            &[0x90, 0x90],
            &[(Addr(0x1002), vec![1, 2]), (Addr(0x3ffe), vec![7, 8, 9])],
        )
        .unwrap();
        let mut b = [0u8; 4];
        m.read(Addr(0x1000), &mut b).unwrap();
        assert_eq!(b, [0x90, 0x90, 1, 2]);
        assert!(m.read(Addr(0x1001), &mut b).is_err());
        assert!(m.is_constant(Addr(0x1000)));
        assert!(m.is_constant(Addr(0x3000)));
        assert!(m.is_constant(Addr(0x4000)));
        assert!(!m.is_constant(Addr(0x2000)));
        let mut c = [0u8; 3];
        m.read(Addr(0x3ffe), &mut c).unwrap();
        assert_eq!(c, [7, 8, 9]);
    }

    #[test]
    fn memory_rejects_overlap_and_wrap() {
        let code = [0x90u8; 4];
        assert!(matches!(
            SnippetMemory::new(Addr(0x1000), &code, &[(Addr(0x1003), vec![1])]),
            Err(SnippetError::Overlap { .. })
        ));
        assert!(matches!(
            SnippetMemory::new(
                Addr(0x1000),
                &code,
                &[(Addr(0x2000), vec![1, 2]), (Addr(0x2001), vec![1])]
            ),
            Err(SnippetError::Overlap { .. })
        ));
        assert!(matches!(
            SnippetMemory::new(Addr(u64::MAX - 1), &code, &[]),
            Err(SnippetError::Wraps { .. })
        ));
        assert!(matches!(
            SnippetMemory::new(Addr(0x1000), &code, &[(Addr(0x2000), vec![])]),
            Err(SnippetError::EmptyMemory(_))
        ));
    }

    #[test]
    fn json_escapes() {
        let mut s = String::new();
        json_string(&mut s, "a\"b\\c\n");
        assert_eq!(s, "\"a\\\"b\\\\c\\u000a\"");
    }
}
