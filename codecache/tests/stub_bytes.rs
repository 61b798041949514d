//! The exact bytes, rollback table and relocation map of dispatch stubs for a few configurations, pinned in
//! tests/data/stub_bytes.txt: a refactoring of `build_stub` must not change what it emits. After an intended
//! change of the stub code, regenerate with `UPDATE_STUB_GOLDEN=1 cargo test -p codecache --test stub_bytes`
//! (and run tests/stub_native.rs, which checks that the stubs behave).

use std::fmt::Write as _;
use std::path::PathBuf;

use codecache::stub::{build_stub, plan_patch, PatchSite, StubTarget, CHAIN_MAX};
use specializer::{Addr, Gpr};

/// Original code at SITE: `mov rax,[rdi]; add rdi,4` (7 bytes displaced), then nops.
const PLAIN: &[u8] = &[0x48, 0x8b, 0x07, 0x48, 0x83, 0xc7, 0x04];
/// `mov eax,[rip+0x100]; jne +0x10` (8 bytes displaced: a RIP-relative load and a conditional branch to
/// relocate), then nops.
const RELOCATED: &[u8] = &[0x8b, 0x05, 0x00, 0x01, 0x00, 0x00, 0x75, 0x10];
const SITE: u64 = 0x40_1000;

struct Config {
    name: &'static str,
    code: &'static [u8],
    base: u64,
    reg: Option<Gpr>,
    values: usize,
    assumed: &'static [(Gpr, u64)],
}

const fn cfg(
    name: &'static str,
    reg: Option<Gpr>,
    values: usize,
    assumed: &'static [(Gpr, u64)],
) -> Config {
    Config {
        name,
        code: PLAIN,
        base: 0x50_8000,
        reg,
        values,
        assumed,
    }
}

fn configs() -> Vec<Config> {
    vec![
        cfg("unconditional", None, 1, &[]),
        cfg(
            "unconditional-assumed",
            None,
            1,
            &[(Gpr::Rsi, 7), (Gpr::Rax, 9)],
        ),
        cfg("chain-1-rdi", Some(Gpr::Rdi), 1, &[]),
        cfg("chain-3-rax-assumed", Some(Gpr::Rax), 3, &[(Gpr::Rsi, 7)]),
        cfg(
            "chain-max-rcx-assumed",
            Some(Gpr::Rcx),
            CHAIN_MAX,
            &[(Gpr::Rax, 9), (Gpr::R8, 1)],
        ),
        cfg(
            "tree-9-r10-assumed",
            Some(Gpr::R10),
            CHAIN_MAX + 1,
            &[(Gpr::Rcx, 5), (Gpr::Rax, 9), (Gpr::R15, 3)],
        ),
        cfg("tree-12-rax", Some(Gpr::Rax), 12, &[]),
        cfg("tree-20-rdi", Some(Gpr::Rdi), 20, &[]),
        Config {
            code: RELOCATED,
            ..cfg("chain-2-relocated", Some(Gpr::Rdx), 2, &[])
        },
        Config {
            code: RELOCATED,
            ..cfg("tree-10-relocated", Some(Gpr::Rdx), 10, &[(Gpr::Rsi, 1)])
        },
        // More than 2 GB from the site: the relocated branch and the jumps back are rewritten into longer forms.
        Config {
            code: RELOCATED,
            base: 0x1_8000_0000,
            ..cfg("chain-1-far", Some(Gpr::Rdx), 1, &[])
        },
        Config {
            base: 0x1_8000_0000,
            ..cfg("tree-9-far", Some(Gpr::R9), 9, &[])
        },
        // Refused requests are part of the contract too.
        cfg("refused-rsp-trigger", Some(Gpr::Rsp), 1, &[]),
        cfg(
            "refused-assumed-trigger",
            Some(Gpr::Rdi),
            1,
            &[(Gpr::Rdi, 1)],
        ),
        cfg("refused-unconditional-two", None, 2, &[]),
    ]
}

/// Whether this CPU has LAHF/SAHF in 64-bit mode (the binary-search form needs it).
fn has_lahf() -> bool {
    let max = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    max >= 0x8000_0001 && std::arch::x86_64::__cpuid(0x8000_0001).ecx & 1 != 0
}

fn patch(code: &[u8]) -> PatchSite {
    let mut region = code.to_vec();
    region.resize(64, 0x90);
    plan_patch(&region, Addr(SITE), Addr(SITE), &|_, _| false).expect("patchable")
}

fn describe(c: &Config) -> String {
    let p = patch(c.code);
    let targets: Vec<StubTarget> = (0..c.values as u64)
        .map(|i| StubTarget {
            value: c.reg.map(|_| 0x7f00_0000_1000 + i * 16),
            entry: Addr(c.base + 0x1_0000 + i * 0x100),
            counter: Addr(0x60_0000 + i * 64),
        })
        .collect();
    let mut out = format!("== {}\n", c.name);
    match build_stub(
        Addr(c.base),
        &p,
        c.reg,
        c.assumed,
        &targets,
        Addr(0x60_f000),
        Addr(0x60_f040),
    ) {
        Err(e) => writeln!(out, "error: {e}").unwrap(),
        Ok(s) => {
            writeln!(
                out,
                "entry +{:#x} enabled {}",
                s.entry.0 - s.base.0,
                s.enabled
            )
            .unwrap();
            for chunk in s.code.chunks(32) {
                let hex: String = chunk.iter().map(|b| format!("{b:02x}")).collect();
                writeln!(out, "code {hex}").unwrap();
            }
            for (off, rb) in &s.rollback {
                writeln!(out, "rollback +{off:#x} {rb:?}").unwrap();
            }
            for (orig, copy) in &s.relocated {
                writeln!(out, "relocated {orig} -> {copy}").unwrap();
            }
        }
    }
    out
}

#[test]
fn stub_bytes_are_pinned() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/stub_bytes.txt");
    let lahf = has_lahf();
    // The binary-search form exists only with LAHF; without it those configurations are not compared.
    let skip = |c: &Config| !lahf && c.values > CHAIN_MAX;
    let all = configs();
    if std::env::var_os("UPDATE_STUB_GOLDEN").is_some() {
        assert!(lahf, "regenerate on a CPU with LAHF in 64-bit mode");
        let text: String = all.iter().map(describe).collect();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        return;
    }
    let golden = std::fs::read_to_string(&path).expect("tests/data/stub_bytes.txt");
    let sections: Vec<&str> = golden.split_inclusive('\n').collect();
    let mut expected: Vec<(String, String)> = Vec::new();
    for line in sections {
        match line.strip_prefix("== ") {
            Some(name) => expected.push((name.trim().to_string(), line.to_string())),
            None => expected.last_mut().expect("a section").1.push_str(line),
        }
    }
    assert_eq!(
        expected.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        all.iter().map(|c| c.name).collect::<Vec<_>>(),
        "the configurations changed: regenerate the golden file"
    );
    for (c, (_, want)) in all.iter().zip(&expected) {
        if skip(c) {
            continue;
        }
        let got = describe(c);
        assert!(
            &got == want,
            "stub {} differs from tests/data/stub_bytes.txt\n--- expected\n{want}--- got\n{got}",
            c.name
        );
    }
}
