//! Acceptance of the profile-only session: the report finds the interpreter, its dispatch trigger and the
//! store profile of its bytecode (constant for interp_switch, written for selfmod_interp).

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{dynspec, output_of, run_native, sample, text, tracer_pid, ChildGuard, TempDir};
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
    (
        out,
        common::parse_report(&report.display().to_string(), &json),
    )
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
fn stripped_binary_gets_whole_functions_from_eh_frame() {
    let bin = sample("interp_switch-stripped");
    let dir = TempDir::new();
    let (_, r) = profile(&dir, &bin, INTERP_SIZE, &[]);
    let region = &r["hot_regions"][0];
    assert!(region["module"]
        .as_str()
        .expect("module")
        .ends_with("interp_switch-stripped"));
    let share = region["share"].as_f64().expect("share");
    assert!(share >= 0.5, "recovered region share {share}");
    // Without symbols the function comes from .eh_frame: the whole of interp_run, named file+0xVADDR after its
    // address in the file (the unstripped build's symbol says where and how long interp_run is).
    let nm = Command::new("nm")
        .arg("-S")
        .arg(sample("interp_switch"))
        .output()
        .expect("nm");
    let line = String::from_utf8_lossy(&nm.stdout)
        .lines()
        .find(|l| l.ends_with(" interp_run"))
        .map(str::to_string)
        .expect("interp_run in nm -S");
    let mut f = line.split_whitespace();
    let vaddr = u64::from_str_radix(f.next().expect("address"), 16).expect("hex");
    let size = u64::from_str_radix(f.next().expect("size"), 16).expect("hex");
    assert_eq!(
        region["symbol"].as_str(),
        Some(format!("interp_switch-stripped+{vaddr:#x}").as_str()),
        "{region}"
    );
    let len = hex(&region["end"]) - hex(&region["start"]);
    assert_eq!(
        len, size,
        "the recovered function is the whole of interp_run: {region}"
    );
    // The dispatch is found without symbols too, and its bytecode page is constant.
    let sp = &r["store_profile"];
    let (trigger, pages) = dispatch_trigger_pages(region, &page_set(&sp["watched"]));
    assert!(
        pages.is_disjoint(&page_set(&sp["written"])),
        "bytecode page reported written: {trigger}"
    );
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

/// Wait (bounded number of polls, not a timing assertion) until `cond` holds.
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if cond() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("gave up waiting until {what}");
}

/// First child process of `pid` (dynspec's traced program), if it has one yet.
fn first_child(pid: u32) -> Option<u32> {
    let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    kids.split_whitespace().next()?.parse().ok()
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions; the pid is a child we own.
    let rc = unsafe { libc::kill(pid as i32, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig})");
}

/// Whether process `pid` ignores `sig` (its `trap '' INT` ran).
fn ignores(pid: u32, sig: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigIgn:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|mask| mask & (1u64 << (sig - 1)) != 0)
}

/// Wait until dynspec `pid` runs a program that already ignores SIGINT; return the program's pid. (Before its
/// `trap` ran, the program would die of the SIGINT dynspec passes on, and dynspec with it: correct, but not what
/// these tests are about.)
fn program_ignoring_sigint(pid: u32) -> u32 {
    let mut child = 0;
    wait_until("the program ignores SIGINT", || {
        child = first_child(pid).unwrap_or(0);
        child != 0 && ignores(child, libc::SIGINT)
    });
    child
}

/// Whether `sig` is pending for process `pid` (shared or per-thread mask in /proc/PID/status).
fn signal_pending(pid: u32, sig: i32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    let bit = 1u64 << (sig - 1);
    status
        .lines()
        .filter(|l| l.starts_with("SigPnd:") || l.starts_with("ShdPnd:"))
        .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
        .any(|mask| mask & bit != 0)
}

fn spawn_dynspec(args: &[&str], report: &Path, cmd: &[&str]) -> ChildGuard {
    let mut c = Command::new(dynspec());
    c.args(args)
        .arg("--report")
        .arg(report)
        .arg("--")
        .args(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    ChildGuard::new(c.spawn().expect("spawn dynspec"))
}

#[test]
fn run_mode_survives_an_interrupt_sent_to_dynspec() {
    let dir = TempDir::new();
    let report = dir.join("r.json");
    // The program ignores SIGINT; dynspec passes the SIGINT on and keeps tracing until the program exits.
    let script =
        "trap '' INT; i=0; while [ $i -lt 20 ]; do i=$((i+1)); sleep 0.05; done; echo done";
    let d = spawn_dynspec(
        &["run", "--profile-only", "-q"],
        &report,
        &["sh", "-c", script],
    );
    let pid = d.id();
    program_ignoring_sigint(pid);
    signal(pid, libc::SIGINT);
    let out = d.wait_output();
    assert_eq!(
        out.status.code(),
        Some(0),
        "status {:?} stderr: {}",
        out.status,
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "done\n");
    let r: Value = common::read_report(&report);
    assert_eq!(r["exit_status"]["code"], 0);
}

#[test]
fn run_mode_second_interrupt_kills_the_program_and_writes_the_report() {
    let dir = TempDir::new();
    let report = dir.join("r.json");
    let script = "trap '' INT; sleep 60; echo not reached";
    let d = spawn_dynspec(
        &["run", "--profile-only", "-q"],
        &report,
        &["sh", "-c", script],
    );
    let pid = d.id();
    let child = program_ignoring_sigint(pid);
    signal(pid, libc::SIGINT);
    // Standard signals do not queue: send the second only once the first reached dynspec's handler.
    wait_until("the first SIGINT was delivered", || {
        !signal_pending(pid, libc::SIGINT)
    });
    signal(pid, libc::SIGINT);
    let out = d.wait_output();
    assert_eq!(
        out.status.code(),
        Some(128 + libc::SIGINT),
        "stderr: {}",
        text(&out.stderr)
    );
    assert_eq!(text(&out.stdout), "");
    assert!(report.is_file(), "no report after the second interrupt");
    wait_until("the program is gone", || {
        tracer_pid(child).is_none_or(|_| {
            // A zombie still has a /proc entry until its parent (gone too) is reaped by init.
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .map(|s| s.contains(") Z ") || s.contains(") X "))
                .unwrap_or(true)
        })
    });
}

#[test]
fn attach_mode_sigterm_detaches_and_writes_the_report() {
    let bin = sample("interp_switch");
    let native = run_native(&bin, &["30000000"]);
    let mut target = Command::new(&bin);
    target
        .arg("30000000")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let target = ChildGuard::new(target.spawn().expect("spawn target"));
    let tpid = target.id();
    let dir = TempDir::new();
    let report = dir.join("attach.json");
    let mut c = Command::new(dynspec());
    c.args(["attach", &tpid.to_string(), "-q", "--report"])
        .arg(&report)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let d = ChildGuard::new(c.spawn().expect("spawn dynspec attach"));
    let dpid = d.id();
    wait_until("dynspec traces the target", || {
        tracer_pid(tpid) == Some(dpid)
    });
    signal(dpid, libc::SIGTERM);
    let out = d.wait_output();
    assert_eq!(out.status.code(), Some(0), "stderr: {}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "", "-q must be silent");
    // Detached: the program is untraced and finishes exactly as it would have.
    assert_eq!(tracer_pid(tpid), Some(0), "still traced after detach");
    let tout = target.wait_output();
    assert!(tout.status.success());
    assert_eq!(tout.stdout, native.stdout);
    let r: Value = common::read_report(&report);
    assert_eq!(r["pid"], tpid);
    assert!(r["exit_status"].is_null());
    assert!(r.get("command").is_none());
}

#[test]
fn program_inherits_native_signal_dispositions() {
    // What the program sees of ignored/blocked signals must not depend on dynspec (SIGPIPE, SIGINT...).
    let script = "grep -E '^(SigIgn|SigBlk)' /proc/self/status";
    let native = output_of(
        {
            let mut c = Command::new("sh");
            c.args(["-c", script]);
            c
        },
        None,
    );
    let dir = TempDir::new();
    let mut c = Command::new(dynspec());
    c.args(["run", "--profile-only", "-q", "--report"])
        .arg(dir.join("r.json"))
        .args(["--", "sh", "-c", script]);
    let traced = output_of(c, None);
    assert!(traced.status.success(), "{}", text(&traced.stderr));
    // Only the classic signals 1..=31: glibc reserves 32 and 33 for itself and its posix_spawn marks them ignored
    // in children depending on how the parent was started.
    let classic = |o: &Output| -> Vec<(String, u64)> {
        text(&o.stdout)
            .lines()
            .filter_map(|l| {
                let (k, v) = l.split_once(':')?;
                Some((
                    k.to_string(),
                    u64::from_str_radix(v.trim(), 16).ok()? & 0x7fff_ffff,
                ))
            })
            .collect()
    };
    assert_eq!(classic(&traced), classic(&native));
    assert_eq!(classic(&native).len(), 2);
}

#[test]
fn program_gets_argv_exactly_as_typed() {
    // `sh -c 'echo $0'` prints its argv[0]: "sh" natively, so "sh" under dynspec too (not the resolved path).
    let dir = TempDir::new();
    let mut c = Command::new(dynspec());
    c.args(["run", "--profile-only", "-q", "--report"])
        .arg(dir.join("r.json"))
        .args(["--", "sh", "-c", "echo \"$0\" \"$1\"", "sh", "two words"]);
    let out = output_of(c, None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "sh two words\n");
    let r: Value = common::read_report(dir.join("r.json"));
    assert_eq!(r["command"][0], "sh");
    assert_eq!(r["command"][4], "two words");
}

#[test]
fn work_in_a_child_process_is_profiled_and_watched() {
    // `sh -c 'prog; echo after'` forks prog as a child: the hot code and the pages to watch are in the child.
    let bin = sample("interp_switch");
    let dir = TempDir::new();
    let script = format!("'{}' {INTERP_SIZE}; echo after", bin.display());
    let mut c = Command::new(dynspec());
    c.args(["run", "--profile-only", "-q", "--report"])
        .arg(dir.join("r.json"))
        .args(["--", "sh", "-c", &script]);
    let out = output_of(c, None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).ends_with("after\n"));
    let r: Value = common::read_report(dir.join("r.json"));
    let region = top_region(&r, "interp_run");
    let sp = &r["store_profile"];
    let (trigger, pages) = dispatch_trigger_pages(region, &page_set(&sp["watched"]));
    assert!(
        pages.is_disjoint(&page_set(&sp["written"])),
        "bytecode page reported written: {trigger}"
    );
}

#[test]
fn descendants_outliving_the_program_keep_running() {
    // A background job that outlives its parent (as a daemon does): natively it finishes its work after the
    // parent exited; under dynspec it must too (detached, not killed with the session).
    let tmp = TempDir::new();
    let marker = tmp.join("marker");
    let report = tmp.join("r.json");
    let script = format!(
        "(sleep 0.3; echo done > '{}') & echo parent",
        marker.display()
    );
    for mode in [&["run", "-q"][..], &["run", "-q", "--profile-only"][..]] {
        let _ = std::fs::remove_file(&marker);
        let mut args = mode.to_vec();
        args.extend(["--report", report.to_str().expect("UTF-8 temp path")]);
        let out = common::run_dynspec(&args, "/bin/sh", &["-c", &script]);
        assert!(out.status.success(), "{mode:?}: {}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "parent\n", "{mode:?}");
        wait_until("the background job writes its marker", || {
            std::fs::read_to_string(&marker).is_ok_and(|s| s == "done\n")
        });
        assert!(report.exists(), "{mode:?}: no report");
    }
}
