//! `dynspec fold`: specialize a code snippet with some registers, flags and memory known, and show the residual code and exit states.

use anyhow::{bail, Context};
use clap::Args;
use specializer::snippet::{self, Snippet};
use specializer::Addr;
use std::path::PathBuf;

/// Arguments of `dynspec fold`.
#[derive(Debug, Args)]
#[command(after_help = "\
FILE holds the code: if its contents are only hex digits and whitespace (e.g. `48 01 c8`), it is \
read as hex text, otherwise as raw bytes. Numbers are 0x-hex, decimal or -decimal.\n\
The region the specializer follows is [ADDR, ADDR+len); falling off its end is the \
fall-through exit. Registers and flags not given are unknown; memory outside --mem ranges \
(and the code) is unreadable; pages touched by --mem ranges are constant.\n\
Example: dynspec fold --code 'b8 ff ff ff ff 83 c0 01' --json")]
pub struct FoldArgs {
    /// Code as hex bytes, e.g. "48 01 c8" (alternative to FILE).
    #[arg(long, value_name = "HEX", conflicts_with = "file")]
    pub code: Option<String>,

    /// File with the code (raw bytes, or hex text).
    #[arg(value_name = "FILE", required_unless_present = "code")]
    pub file: Option<PathBuf>,

    /// Address of the first code byte.
    #[arg(long, value_name = "ADDR", default_value = "0x1000000")]
    pub at: String,

    /// A register known at entry, e.g. rcx=5 or rax=0xffffffff (repeatable).
    #[arg(long = "set", value_name = "REG=VALUE")]
    pub set: Vec<String>,

    /// A flag known at entry, e.g. cf=1 (repeatable; cf pf af zf sf df of).
    #[arg(long = "flag", value_name = "NAME=0|1")]
    pub flag: Vec<String>,

    /// Constant memory: bytes at an address, e.g. 0x2000=01020304 (repeatable).
    #[arg(long = "mem", value_name = "ADDR=HEXBYTES")]
    pub mem: Vec<String>,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Read a code file: hex text if it is only hex digits and whitespace, raw bytes otherwise.
fn read_code_file(path: &PathBuf) -> anyhow::Result<Vec<u8>> {
    let raw = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let is_hex_text = !raw.is_empty()
        && raw
            .iter()
            .all(|b| b.is_ascii_hexdigit() || b.is_ascii_whitespace())
        && raw.iter().any(|b| b.is_ascii_hexdigit());
    if is_hex_text {
        let text = String::from_utf8_lossy(&raw);
        snippet::parse_hex_bytes(&text)
            .with_context(|| format!("reading hex text from {}", path.display()))
    } else {
        Ok(raw)
    }
}

/// Build the snippet the arguments describe.
pub fn build_snippet(args: &FoldArgs) -> anyhow::Result<Snippet> {
    let code = match (&args.code, &args.file) {
        (Some(hex), None) => snippet::parse_hex_bytes(hex).context("--code")?,
        (None, Some(path)) => read_code_file(path)?,
        _ => bail!("give the code either with --code HEX or as FILE"),
    };
    if code.is_empty() {
        bail!("the code is empty");
    }
    let at = Addr(snippet::parse_u64(&args.at).context("--at")?);
    let mut s = Snippet::new(at, code);
    for a in &args.set {
        let (g, v) = snippet::parse_reg_assignment(a).with_context(|| format!("--set {a}"))?;
        s.known.set_reg(g, Some(v));
    }
    for a in &args.flag {
        let (f, v) = snippet::parse_flag_assignment(a).with_context(|| format!("--flag {a}"))?;
        s.known.set_flag(f, Some(v));
    }
    for a in &args.mem {
        let m = snippet::parse_mem_assignment(a).with_context(|| format!("--mem {a}"))?;
        s.memory.push(m);
    }
    // Validate ranges (overlaps, wrap-around) up front for a clear message.
    s.snippet_memory().context("constant memory")?;
    Ok(s)
}

/// Run `dynspec fold`.
pub fn run(args: FoldArgs) -> anyhow::Result<()> {
    let s = build_snippet(&args)?;
    let folded = s
        .fold()
        .with_context(|| format!("specializing the snippet at {}", s.at))?;
    if args.json {
        println!("{}", folded.to_json());
    } else {
        print!("{}", folded.to_text());
    }
    Ok(())
}
