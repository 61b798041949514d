//! Stock Debian interpreters under `dynspec run` (issue 9): each runs workloads of benches/stock/ at small sizes
//! (about 0.5-0.8 s natively on an idle 2-core VM) natively and under dynspec, which profiles, plans and installs what it finds; stdout,
//! stderr and exit status must be identical, and the report must match its schema.
//!
//! Needs the packages lua5.3, perl, jq, bc and tcl8.6 (`.ci/run` installs them). Under CI (`CI=true`) a missing
//! interpreter fails its test; elsewhere the test says it is skipping and passes.

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};

use common::{read_report, run_dynspec, run_native, text, TempDir};

/// The interpreter `cmd` (a name looked up in PATH, or an absolute path), or `None` (with a message) when it is
/// not installed and this is not CI. Under CI a missing interpreter is a failure: CI installs them.
fn interpreter(cmd: &str, package: &str) -> Option<PathBuf> {
    let found = if cmd.starts_with('/') {
        Some(PathBuf::from(cmd)).filter(|p| p.is_file())
    } else {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join(cmd))
                .find(|p| p.is_file())
        })
    };
    if found.is_none() {
        let msg =
            format!("{cmd} is not installed (apt-get install {package}; .ci/run installs it)");
        if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
            panic!("{msg}: under CI this test must run");
        }
        // Straight to the process's stderr, not through eprintln! (which the test harness captures and shows only
        // for a failing test): a skipped test should say so.
        let _ = writeln!(std::io::stderr(), "skipping: {msg}");
    }
    found
}

/// benches/stock/WORKLOAD with its size `@N@` set to `size`, written into `dir`.
fn workload(dir: &TempDir, name: &str, size: u64) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("benches/stock")
        .join(name);
    let body = std::fs::read_to_string(&src)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", src.display()));
    assert!(body.contains("@N@"), "{} has no @N@", src.display());
    let path = dir.join(name);
    std::fs::write(&path, body.replace("@N@", &size.to_string()))
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

/// Runs `interp ARGS... WORKLOAD` natively and under `dynspec run -q`, asserts stdout, stderr and exit status are
/// identical and stdout is `expected`, and checks the report; returns the report.
fn same_under_dynspec(
    interp: &Path,
    args: &[&str],
    name: &str,
    size: u64,
    expected: &str,
) -> serde_json::Value {
    let tmp = TempDir::new();
    let file = workload(&tmp, name, size);
    let mut argv: Vec<&str> = args.to_vec();
    argv.push(file.to_str().expect("temp paths are UTF-8"));
    let what = format!("{} {}", interp.display(), argv.join(" "));

    let native = run_native(interp, &argv);
    assert!(
        native.status.success(),
        "{what} natively: {} ({})",
        native.status,
        text(&native.stderr)
    );
    assert_eq!(text(&native.stdout), expected, "{what}: native output");

    let report = tmp.join("report.json");
    let report_arg = report.to_str().expect("temp paths are UTF-8");
    let traced = run_dynspec(&["run", "-q", "--report", report_arg], interp, &argv);
    assert_eq!(
        traced.status.code(),
        native.status.code(),
        "dynspec run -- {what}: exit status (stderr: {})",
        text(&traced.stderr)
    );
    assert!(
        traced.stdout == native.stdout,
        "dynspec run -- {what}: stdout differs from the native run\nnative:\n{}\ndynspec:\n{}",
        text(&native.stdout),
        text(&traced.stdout)
    );
    assert_eq!(
        text(&traced.stderr),
        text(&native.stderr),
        "dynspec run -- {what}: stderr"
    );
    let r = read_report(&report);
    let entries: u64 = r["variants"]
        .as_array()
        .map(|vs| vs.iter().filter_map(|v| v["entries"].as_u64()).sum())
        .unwrap_or(0);
    eprintln!(
        "{name} on {}: identical; {} variants, entered {entries} times",
        interp.display(),
        r["variants"].as_array().map_or(0, Vec::len)
    );
    r
}

#[test]
fn lua53_loop_and_fib_are_identical_under_dynspec() {
    let Some(lua) = interpreter("lua5.3", "lua5.3") else {
        return;
    };
    same_under_dynspec(&lua, &[], "loop.lua", 30_000_000, "28035\n");
    same_under_dynspec(&lua, &[], "fib.lua", 34, "5702887\n");
}

#[test]
fn perl_loop_and_fib_are_identical_under_dynspec() {
    let Some(perl) = interpreter("perl", "perl") else {
        return;
    };
    same_under_dynspec(
        &perl,
        &[],
        "loop.pl",
        10_000_000,
        &format!("{}\n", loop_sum(1..=10_000_000)),
    );
    same_under_dynspec(&perl, &[], "fib.pl", 31, "1346269\n");
}

#[test]
fn jq_loop_and_fib_are_identical_under_dynspec() {
    let Some(jq) = interpreter("jq", "jq") else {
        return;
    };
    same_under_dynspec(&jq, &["-n", "-f"], "loop.jq", 700_000, "405024\n");
    same_under_dynspec(&jq, &["-n", "-f"], "fib.jq", 27, "196418\n");
}

#[test]
fn bc_loop_and_table_are_identical_under_dynspec() {
    let Some(bc) = interpreter("bc", "bc") else {
        return;
    };
    same_under_dynspec(&bc, &["-q"], "loop.bc", 600_000, "120018\n");
    same_under_dynspec(&bc, &["-q"], "table.bc", 25, "56550\n");
}

/// `dynspec run -- bc -q fib.bc` exited 1 in about one run in ten ("cannot remove the installed variants before
/// detaching: no such process": stepping aside met the program already gone; fixed in
/// `Session::uninstall_everything`). The run is repeated to catch the race.
#[test]
fn bc_fib_is_identical_under_dynspec() {
    let Some(bc) = interpreter("bc", "bc") else {
        return;
    };
    for _ in 0..10 {
        same_under_dynspec(&bc, &["-q"], "fib.bc", 29, "514229\n");
    }
}

#[test]
fn tclsh_loop_and_fib_are_identical_under_dynspec() {
    let Some(tclsh) = interpreter("tclsh8.6", "tcl8.6") else {
        return;
    };
    same_under_dynspec(&tclsh, &[], "loop.tcl", 4_000_000, "546\n");
    same_under_dynspec(&tclsh, &[], "fib.tcl", 29, "514229\n");
}

/// What the loop workloads compute: `s = (s + i * 7) % 1000003` over `range`.
fn loop_sum(range: impl Iterator<Item = u64>) -> u64 {
    range.fold(0, |s, i| (s + i * 7) % 1_000_003)
}

#[test]
fn the_expected_outputs_are_the_loops_results() {
    // The constants above, recomputed (lua and perl count from 1, jq, bc and Tcl from 0).
    assert_eq!(loop_sum(1..=30_000_000), 28035);
    assert_eq!(loop_sum(0..700_000), 405024);
    assert_eq!(loop_sum(0..600_000), 120018);
    assert_eq!(loop_sum(0..4_000_000), 546);
}
