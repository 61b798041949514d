//! dynspec's own cost, bounded: a program that takes a ptrace stop for every one of its many signals has its
//! variants removed and is let go (it runs on untraced, dynspec still passes its exit status on and writes the
//! report); a program with nothing worth a variant is let go after a few fruitless planning rounds.

mod common;

use std::process::{Command, Stdio};

use common::{
    children_of, dynspec, is_alive, run_both, run_native, sample, text, tracer_pid, ChildGuard,
    TempDir,
};
use serde_json::Value;

fn steps(r: &Value) -> &[Value] {
    r["overhead"]["steps"]
        .as_array()
        .map(Vec::as_slice)
        .expect("overhead.steps[] in the report")
}

#[test]
fn signal_heavy_program_is_let_go_and_keeps_running_untraced() {
    // sig_interp faults 4 times every 10000 iterations all through its run (~12k SIGSEGVs a second, each a ptrace
    // stop): far over the 2% budget, so dynspec detaches mid-run (removing its variant if one is live by then;
    // usually the first fast window, 20 ms and 20 stops in, comes first).
    let size = "100000000";
    let native = run_native(sample("sig_interp"), &[size]);
    let tmp = TempDir::new();
    let report = tmp.join("r.json");
    let mut cmd = Command::new(dynspec());
    cmd.args(["run", "-q", "--report"])
        .arg(&report)
        .arg("--")
        .arg(sample("sig_interp"))
        .arg(size)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let guard = ChildGuard::new(cmd.spawn().expect("start dynspec run"));
    let dpid = guard.id();
    let mut target = 0;
    common::wait_for("dynspec to start and trace its target", || {
        target = children_of(dpid)
            .into_iter()
            .find(|&c| tracer_pid(c).is_some_and(|t| t == dpid))
            .unwrap_or(0);
        target != 0
    });
    // The program is let go while it still runs: untraced, still dynspec's child.
    common::wait_for("the target to be detached while it runs", || {
        tracer_pid(target) == Some(0) || !is_alive(target)
    });
    assert!(
        is_alive(target),
        "the target ended before dynspec let it go (a loaded machine?)"
    );
    let out = guard.wait_output();
    assert_eq!(
        out.status.code(),
        native.status.code(),
        "{}",
        text(&out.stderr)
    );
    assert!(
        out.stdout == native.stdout,
        "stdout differs:\nnative:\n{}\ndynspec:\n{}",
        text(&native.stdout),
        text(&out.stdout)
    );
    assert_eq!(text(&out.stderr), text(&native.stderr));
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&report).expect("report"))
        .expect("report is JSON");
    assert_eq!(
        r["exit_status"]["code"], 0,
        "the exit status after detaching"
    );
    let st = steps(&r);
    assert_eq!(st.len(), 1, "{st:?}");
    assert!(
        ["removed_and_detached", "detached"].contains(&st[0]["action"].as_str().unwrap_or("")),
        "{st:?}"
    );
    assert!(
        st[0]["window_share"].as_f64().unwrap_or(0.0) > 0.02,
        "a step for cost names a share over the budget: {st:?}"
    );
    let o = &r["overhead"];
    // At least the stops a fast window needs to close.
    assert!(o["signal_stops"].as_u64().unwrap_or(0) >= 20, "{o}");
    assert!(o["lost_ms"].as_f64().unwrap_or(0.0) > 0.0, "{o}");
    // Every variant was removed before the detach.
    let vs = r["variants"].as_array().expect("variants[]");
    assert!(vs.iter().all(|v| v["invalidated"] == true), "{vs:?}");
    // The report covers the whole run, not only the traced part.
    let step_ms = st[0]["time_ms"].as_u64().expect("time_ms");
    assert!(r["duration_ms"].as_u64().expect("duration_ms") > step_ms);
}

#[test]
fn no_back_off_with_the_whole_run_as_budget() {
    // --max-overhead 100: the same program keeps dynspec (and whatever it installed) to the end.
    let (_, r, _tmp) = run_both("sig_interp", &["20000000"], &["--max-overhead", "100"]);
    assert!(steps(&r).is_empty(), "{}", r["overhead"]);
    assert!(r["overhead"]["signal_stops"].as_u64().unwrap_or(0) > 1000);
}

#[test]
fn program_with_nothing_to_specialize_is_let_go() {
    // nothing sorts and chases pointers: no trigger is worth a variant. After the first final round and three
    // periodic looks (pauses of 1, 2 and 4 s) that install nothing, dynspec detaches (~7.5 s in); the run (~13 s
    // here) outlasts them with a margin (at ~8 s a fast or differently loaded machine ended it first).
    let (_, r, _tmp) = run_both("nothing", &["24000"], &[]);
    assert!(
        r["variants"].as_array().is_some_and(|v| v.is_empty()),
        "{}",
        r["variants"]
    );
    let st = steps(&r);
    assert_eq!(st.len(), 1, "{}", r["overhead"]);
    assert_eq!(st[0]["action"], "detached");
    assert_eq!(st[0]["reason"], "nothing_to_install");
    assert_eq!(r["exit_status"]["code"], 0);
}
