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

#[cfg(test)]
mod tests {
    use super::*;
    use specializer::{Flag, Gpr};

    fn args(code: &str) -> FoldArgs {
        FoldArgs {
            code: Some(code.to_string()),
            file: None,
            at: "0x1000000".to_string(),
            set: Vec::new(),
            flag: Vec::new(),
            mem: Vec::new(),
            json: false,
        }
    }

    #[test]
    fn builds_snippet_from_arguments() {
        let mut a = args("48 01 c8");
        a.set = vec!["rcx=5".into(), "rax=-1".into()];
        a.flag = vec!["cf=1".into()];
        a.mem = vec!["0x2000=0102".into()];
        let s = build_snippet(&a).unwrap();
        assert_eq!(s.code, vec![0x48, 0x01, 0xc8]);
        assert_eq!(s.known.reg(Gpr::Rcx), Some(5));
        assert_eq!(s.known.reg(Gpr::Rax), Some(u64::MAX));
        assert_eq!(s.known.flag(Flag::Cf), Some(true));
        assert_eq!(s.memory, vec![(Addr(0x2000), vec![1, 2])]);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        for (code, set, flag, mem, at) in [
            ("480", "", "", "", "0x1000"),
            ("90", "eax=1", "", "", "0x1000"),
            ("90", "rax=0x1_0000_0000_0000_0000", "", "", "0x1000"),
            ("90", "", "cf=2", "", "0x1000"),
            ("90", "", "", "0x1000=01", "0x1000"),
            ("90", "", "", "0x2000=", "0x1000"),
            ("90", "", "", "", "zz"),
            ("", "", "", "", "0x1000"),
            ("90", "", "", "", "0xffffffffffffffff"),
        ] {
            let mut a = args(code);
            a.at = at.into();
            for (v, s) in [(&mut a.set, set), (&mut a.flag, flag), (&mut a.mem, mem)] {
                if !s.is_empty() {
                    v.push(s.into());
                }
            }
            let r = build_snippet(&a).and_then(|s| s.fold().map_err(anyhow::Error::from));
            assert!(r.is_err(), "{code} {set} {flag} {mem} {at} should fail");
        }
    }

    #[test]
    fn reads_hex_text_and_raw_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let hex = dir.join("code.hex");
        std::fs::write(&hex, "48 01\nc8\n").unwrap();
        assert_eq!(read_code_file(&hex).unwrap(), vec![0x48, 0x01, 0xc8]);
        let raw = dir.join("code.bin");
        std::fs::write(&raw, [0x48, 0x01, 0xc8]).unwrap();
        assert_eq!(read_code_file(&raw).unwrap(), vec![0x48, 0x01, 0xc8]);
    }

    #[test]
    fn folds_and_renders_json() {
        let mut a = args("b8 ff ff ff ff 83 c0 01");
        a.json = true;
        let f = build_snippet(&a).unwrap().fold().unwrap();
        let v: serde_json::Value = serde_json::from_str(&f.to_json()).unwrap();
        assert_eq!(v["registers"]["rax"], "0x0");
        assert_eq!(v["registers"]["rbx"], serde_json::Value::Null);
        assert_eq!(v["flags"]["cf"], 1);
        assert_eq!(v["flags"]["zf"], 1);
        assert_eq!(v["registers"].as_object().unwrap().len(), 16);
        assert_eq!(v["flags"].as_object().unwrap().len(), 7);
        assert!(v["residual"].is_array());
        assert_eq!(v["exits"][0]["target"], "0x1000008");
        assert_eq!(v["exits"][0]["reason"], "left_region");
    }
}
