//! Acceptance of the profile-only session: the report finds the interpreter, its dispatch trigger and the
//! store profile of its bytecode (constant for interp_switch, written for selfmod_interp).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output};

use common::{dynspec, output_of, run_native, sample, text, TempDir};
use serde_json::Value;

/// Sizes that keep the sample busy for ~1-2 s: longer than the two 0.3 s profiling windows.
const INTERP_SIZE: &str = "10000000";
const SELFMOD_SIZE: &str = "8000000";

fn profile(dir: &TempDir, bin: &Path, size: &str, extra: &[&str]) -> (Output, Value) {
    let report = dir.join("report.json");
    let mut cmd = Command::new(dynspec());
    cmd.args(["run", "--profile-only", "-q", "--report"])
        .arg(&report)
        .args(extra)
        .arg("--")
        .arg(bin)
        .arg(size);
    let out = output_of(cmd, None);
    assert!(
        out.status.success(),
        "dynspec run failed ({}): {}",
        out.status,
        text(&out.stderr)
    );
    let json = std::fs::read_to_string(&report)
        .unwrap_or_else(|e| panic!("no report at {}: {e}", report.display()));
    let v: Value = serde_json::from_str(&json).expect("report is JSON");
    (out, v)
}

fn hex(v: &Value) -> u64 {
    let s = v
        .as_str()
        .unwrap_or_else(|| panic!("expected a hex string, got {v}"));
    u64::from_str_radix(s.trim_start_matches("0x"), 16)
        .unwrap_or_else(|e| panic!("bad hex {s}: {e}"))
}

fn page_set(v: &Value) -> BTreeSet<u64> {
    v.as_array()
        .unwrap_or_else(|| panic!("expected an array, got {v}"))
        .iter()
        .map(hex)
        .collect()
}

/// The trigger whose top values are pointers into watched pages: the interpreter's bytecode pc at the dispatch.
/// Returns the pages its top values point into.
fn dispatch_trigger_pages(region: &Value, watched: &BTreeSet<u64>) -> (Value, BTreeSet<u64>) {
    let triggers = region["triggers"].as_array().expect("triggers array");
    for t in triggers {
        let distinct = t["distinct"].as_u64().expect("distinct");
        let coverage = t["coverage"].as_f64().expect("coverage");
        if !(2..=64).contains(&distinct) || coverage < 0.9 {
            continue;
        }
        let pages: BTreeSet<u64> = t["top_values"]
            .as_array()
            .expect("top_values")
            .iter()
            .map(|v| hex(&v["value"]) & !0xfff)
            .collect();
        if !pages.is_empty() && pages.iter().all(|p| watched.contains(p)) {
            return (t.clone(), pages);
        }
    }
    panic!(
        "no trigger with 2..=64 distinct values covering >= 0.9 whose values point into watched pages {:x?}; triggers: {}",
        watched,
        serde_json::to_string_pretty(triggers).unwrap_or_default()
    );
}

fn top_region<'a>(r: &'a Value, symbol: &str) -> &'a Value {
    let region = &r["hot_regions"][0];
    assert_eq!(
        region["symbol"].as_str(),
        Some(symbol),
        "top region is not {symbol}: {}",
        serde_json::to_string_pretty(&r["hot_regions"]).unwrap_or_default()
    );
    region
}

#[test]
fn interp_switch_profile_finds_the_dispatch_and_constant_bytecode() {
    let bin = sample("interp_switch");
    let native = run_native(&bin, &[INTERP_SIZE]);
    let dir = TempDir::new();
    let (out, r) = profile(&dir, &bin, INTERP_SIZE, &[]);
    assert_eq!(
        out.stdout, native.stdout,
        "stdout differs from the native run"
    );

    assert_eq!(r["version"], 1);
    assert_eq!(r["exit_status"]["code"], 0);
    assert!(
        r["samples"].as_u64().expect("samples") > 100,
        "too few samples: {}",
        r["samples"]
    );
    let region = top_region(&r, "interp_run");
    let share = region["share"].as_f64().expect("share");
    assert!(share >= 0.8, "interp_run share {share}");
    assert!(region["module"]
        .as_str()
        .expect("module")
        .ends_with("interp_switch"));
    assert!(hex(&region["start"]) < hex(&region["end"]));

    let sp = &r["store_profile"];
    let watched = page_set(&sp["watched"]);
    let written = page_set(&sp["written"]);
    let (trigger, pages) = dispatch_trigger_pages(region, &watched);
    assert!(
        pages.is_disjoint(&written),
        "the bytecode page is reported written: trigger {trigger}, written {written:x?}"
    );
    assert_eq!(sp["pages_watched"].as_u64(), Some(watched.len() as u64));

    // The human rendering names the facts.
    let rendered = output_of(
        {
            let mut c = Command::new(dynspec());
            c.arg("report").arg(dir.join("report.json"));
            c
        },
        None,
    );
    assert!(rendered.status.success(), "{}", text(&rendered.stderr));
    let shown = text(&rendered.stdout);
    for needle in [
        "interp_run",
        "exited with code 0",
        "store profile",
        trigger["register"].as_str().unwrap_or("?"),
    ] {
        assert!(
            shown.contains(needle),
            "rendering lacks {needle:?}:\n{shown}"
        );
    }
    // --json gives the document back.
    let json = output_of(
        {
            let mut c = Command::new(dynspec());
            c.args(["report", "--json"]).arg(dir.join("report.json"));
            c
        },
        None,
    );
    let back: Value = serde_json::from_slice(&json.stdout).expect("--json prints JSON");
    assert_eq!(back, r);
}

#[test]
fn selfmod_interp_bytecode_page_is_written() {
    let bin = sample("selfmod_interp");
    let native = run_native(&bin, &[SELFMOD_SIZE]);
    let dir = TempDir::new();
    let (out, r) = profile(&dir, &bin, SELFMOD_SIZE, &[]);
    assert_eq!(
        out.stdout, native.stdout,
        "stdout differs from the native run"
    );
    let region = top_region(&r, "selfmod_run");
    let sp = &r["store_profile"];
    let watched = page_set(&sp["watched"]);
    let written = page_set(&sp["written"]);
    let (trigger, pages) = dispatch_trigger_pages(region, &watched);
    assert!(
        !pages.is_disjoint(&written),
        "the self-modified bytecode page is not reported written: trigger {trigger}, written {written:x?}"
    );
}

#[test]
fn non_pie_binary_is_symbolized() {
    let bin = sample("interp_switch-nopie");
    let dir = TempDir::new();
    let (_, r) = profile(&dir, &bin, INTERP_SIZE, &[]);
    let region = top_region(&r, "interp_run");
    // Non-PIE text is mapped at its link address, below 4 GiB.
    assert!(hex(&region["start"]) < 1 << 32, "{region}");
}

#[test]
fn stripped_binary_gets_a_recovered_region() {
    let bin = sample("interp_switch-stripped");
    let dir = TempDir::new();
    let (_, r) = profile(&dir, &bin, INTERP_SIZE, &[]);
    let region = &r["hot_regions"][0];
    assert!(
        region["symbol"].is_null(),
        "stripped code has no symbol: {region}"
    );
    assert!(region["module"]
        .as_str()
        .expect("module")
        .ends_with("interp_switch-stripped"));
    let share = region["share"].as_f64().expect("share");
    assert!(share >= 0.5, "recovered region share {share}");
    let len = hex(&region["end"]) - hex(&region["start"]);
    assert!(len > 0 && len <= 4096, "recovered span of {len} bytes");
    assert!(!region["triggers"].as_array().expect("triggers").is_empty());
}

#[test]
fn default_report_path_keeps_the_previous_one() {
    let bin = sample("interp_switch");
    let dir = TempDir::new();
    for _ in 0..2 {
        let mut cmd = Command::new(dynspec());
        cmd.current_dir(dir.path())
            .args(["run", "--profile-only", "--"])
            .arg(&bin)
            .arg("200000");
        let out = output_of(cmd, None);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let err = text(&out.stderr);
        assert!(
            err.lines()
                .any(|l| l == "dynspec: report written to dynspec.report.json"),
            "stderr: {err}"
        );
        assert!(
            err.lines().all(|l| l.starts_with("dynspec: ")),
            "stray stderr: {err}"
        );
    }
    assert!(dir.join("dynspec.report.json").is_file());
    assert!(dir.join("dynspec.report.json.old").is_file());
    let mut cmd = Command::new(dynspec());
    cmd.current_dir(dir.path()).arg("report");
    let out = output_of(cmd, None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("interp_run"));
}
