//! End-to-end tests: every sample behaves byte-for-byte the same natively and under `dynspec run` / `dynspec attach`.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{
    children_of, died_of, dynspec, expected, is_alive, output_of, run_dynspec, run_native, sample,
    send_signal, text, tracer_pid, ChildGuard, TempDir,
};

/// One sample at its small size, as documented at the top of its .c file and in samples/README.md.
struct Case {
    /// Binary name in samples/build/.
    bin: &'static str,
    /// Name of the `.expected` file (the -nopie/-stripped builds share interp_switch's).
    expected: &'static str,
    size: &'static str,
    code: i32,
    stderr: &'static str,
    /// The documented hot functions (exported when built with -DDYNSPEC_NO_MAIN -shared -fPIC).
    hot: &'static [&'static str],
}

const fn case(bin: &'static str, size: &'static str, hot: &'static [&'static str]) -> Case {
    Case {
        bin,
        expected: bin,
        size,
        code: 0,
        stderr: "",
        hot,
    }
}

const INTERP_SWITCH: Case = case(
    "interp_switch",
    "1000000",
    &["interp_run", "interp_demo_program"],
);
const INTERP_SWITCH_NOPIE: Case = Case {
    bin: "interp_switch-nopie",
    expected: "interp_switch",
    ..INTERP_SWITCH
};
const INTERP_SWITCH_STRIPPED: Case = Case {
    bin: "interp_switch-stripped",
    expected: "interp_switch",
    ..INTERP_SWITCH
};
const BPF_FILTER: Case = case(
    "bpf_filter",
    "5000000",
    &["bpf_run", "bpf_demo_filter", "bpf_demo_packet"],
);
const CONFIG_LOOP: Case = case("config_loop", "60000", &["process"]);
const SELFMOD_INTERP: Case = case("selfmod_interp", "800000", &["selfmod_run"]);
const MT_INTERP: Case = case("mt_interp", "300000", &["mt_interp_run"]);
const FORK_EXEC: Case = case("fork_exec", "10000000", &["fork_work"]);
const SIGNALS: Case = Case {
    code: 3,
    stderr: "signals: done, exiting with status 3 on purpose\n",
    ..case("signals", "25000", &["sig_work"])
};
const NOTHING: Case = case("nothing", "300", &["nothing_sort", "nothing_chase"]);
const KERNEL_READ: Case = case("kernel_read", "40000", &["kr_scan"]);
const LATE_THREAD: Case = case("late_thread", "8000000", &["late_run"]);
const SIG_INTERP: Case = case("sig_interp", "20000000", &["sig_run"]);
const LATE_START: Case = case("late_start", "1000000", &["late_hash", "late_interp_run"]);
const VFORK_GUARD: Case = case("vfork_guard", "6000000", &["vfork_guard_run"]);
const PATCH_ONCE: Case = case("patch_once", "20000", &["patch_run", "patch_program"]);
const SERVE_LOOP: Case = case("serve_loop", "50", &["serve_run"]);
const LOSING_VARIANT: Case = case("losing_variant", "150000000", &["step"]);
const INTERP_GOTO: Case = case("interp_goto", "1000000", &["goto_run"]);
const INTERP_THREADED: Case = case("interp_threaded", "1000000", &["threaded_run"]);
const INTERP_DL: Case = case("interp_dl", "1000000", &["dl_run", "dl_demo"]);
const INTERP_SPILL: Case = case("interp_spill", "1000000", &["spill_run"]);
const SERVE_PATCH: Case = case("serve_patch", "50", &["serve_run"]);
const METRIC_INTERP: Case = case(
    "metric_interp",
    "5000000",
    &["metric_run", "metric_builtin"],
);

/// Every built sample (the -nopie/-stripped variants are builds of interp_switch.c).
const ALL: &[&Case] = &[
    &INTERP_SWITCH,
    &INTERP_SWITCH_NOPIE,
    &INTERP_SWITCH_STRIPPED,
    &BPF_FILTER,
    &CONFIG_LOOP,
    &SELFMOD_INTERP,
    &MT_INTERP,
    &FORK_EXEC,
    &SIGNALS,
    &NOTHING,
    &KERNEL_READ,
    &LATE_THREAD,
    &SIG_INTERP,
    &LATE_START,
    &VFORK_GUARD,
    &PATCH_ONCE,
    &SERVE_LOOP,
    &LOSING_VARIANT,
    &INTERP_GOTO,
    &INTERP_THREADED,
    &INTERP_DL,
    &INTERP_SPILL,
    &SERVE_PATCH,
    &METRIC_INTERP,
];

/// Native run of the case: stdout is the .expected file, stderr and exit status as documented.
fn check_native(c: &Case) -> Output {
    let out = run_native(sample(c.bin), &[c.size]);
    assert_eq!(
        text(&out.stdout),
        text(&expected(c.expected)),
        "{}: native stdout differs from {}.expected",
        c.bin,
        c.expected
    );
    assert_eq!(text(&out.stderr), c.stderr, "{}: native stderr", c.bin);
    assert_eq!(
        out.status.code(),
        Some(c.code),
        "{}: native exit status {}",
        c.bin,
        out.status
    );
    out
}

/// Asserts that the run under dynspec is indistinguishable from the native one (stdout, stderr, exit status).
fn assert_same(what: &str, native: &Output, traced: &Output) {
    assert_eq!(
        text(&traced.stdout),
        text(&native.stdout),
        "{what}: stdout differs from the native run"
    );
    assert_eq!(
        text(&traced.stderr),
        text(&native.stderr),
        "{what}: stderr differs from the native run (dynspec must be silent with -q)"
    );
    assert_eq!(
        (traced.status.code(), traced.status.signal()),
        (native.status.code(), native.status.signal()),
        "{what}: exit status {} differs from native {}",
        traced.status,
        native.status
    );
}

/// The report written by a run exists and is a version-1 dynspec report.
fn check_report(what: &str, path: &Path) -> serde_json::Value {
    let bytes = std::fs::read(path)
        .unwrap_or_else(|e| panic!("{what}: no report at {}: {e}", path.display()));
    let v = common::parse_report(what, &String::from_utf8_lossy(&bytes));
    assert_eq!(v["version"], 1, "{what}: report version");
    v
}

fn check_under_dynspec(c: &Case, mode: &[&str]) {
    let native = check_native(c);
    let tmp = TempDir::new();
    let report = tmp.join("report.json");
    let report_arg = report.to_str().expect("temp paths are UTF-8");
    let mut args = vec!["run"];
    args.extend_from_slice(mode);
    args.extend_from_slice(&["-q", "--report", report_arg]);
    let traced = run_dynspec(&args, sample(c.bin), &[c.size]);
    let what = format!("dynspec {} -- {} {}", args.join(" "), c.bin, c.size);
    assert_same(&what, &native, &traced);
    let v = check_report(&what, &report);
    let status = &v["exit_status"];
    if c.code != 0 || status.get("code").is_some() {
        assert_eq!(status["code"], c.code, "{what}: exit_status in the report");
    }
}

macro_rules! sample_tests {
    ($($name:ident => $case:expr;)*) => {
        mod native {
            $(#[test] fn $name() { super::check_native(&$case); })*
        }
        mod profile_only {
            $(#[test] fn $name() { super::check_under_dynspec(&$case, &["--profile-only"]); })*
        }
        mod full {
            $(#[test] fn $name() { super::check_under_dynspec(&$case, &[]); })*
        }
    };
}

sample_tests! {
    interp_switch => super::INTERP_SWITCH;
    interp_switch_nopie => super::INTERP_SWITCH_NOPIE;
    interp_switch_stripped => super::INTERP_SWITCH_STRIPPED;
    bpf_filter => super::BPF_FILTER;
    config_loop => super::CONFIG_LOOP;
    selfmod_interp => super::SELFMOD_INTERP;
    mt_interp => super::MT_INTERP;
    fork_exec => super::FORK_EXEC;
    signals => super::SIGNALS;
    nothing => super::NOTHING;
    kernel_read => super::KERNEL_READ;
    late_thread => super::LATE_THREAD;
    sig_interp => super::SIG_INTERP;
    late_start => super::LATE_START;
    vfork_guard => super::VFORK_GUARD;
    patch_once => super::PATCH_ONCE;
    serve_loop => super::SERVE_LOOP;
    losing_variant => super::LOSING_VARIANT;
    interp_goto => super::INTERP_GOTO;
    interp_threaded => super::INTERP_THREADED;
    interp_dl => super::INTERP_DL;
    interp_spill => super::INTERP_SPILL;
    serve_patch => super::SERVE_PATCH;
    metric_interp => super::METRIC_INTERP;
}

/// Size for the attach test: about 3-4 s natively, so a 2 s attach window ends well before the program does.
const ATTACH_SIZE: &str = "30000000";
/// interp_switch's stdout at ATTACH_SIZE (regenerate with `samples/build/interp_switch 30000000`).
const ATTACH_STDOUT: &str = "program: 18 instructions\nresult: 8610247303291299\nx: 11165572\n";

#[test]
fn attach_and_detach_leaves_the_program_untouched() {
    let tmp = TempDir::new();
    let report = tmp.join("attach.json");
    let child = Command::new(sample("interp_switch"))
        .arg(ATTACH_SIZE)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start interp_switch");
    // Owns the target: if an assertion below fails, the target is killed rather than left running.
    let target = ChildGuard::new(child);
    let pid = target.id().to_string();
    let mut cmd = Command::new(dynspec());
    cmd.args(["attach", &pid, "--for", "2", "-q", "--report"])
        .arg(&report);
    let attached = output_of(cmd, None);
    assert!(
        attached.status.success(),
        "dynspec attach failed ({}): {}",
        attached.status,
        text(&attached.stderr)
    );
    assert_eq!(
        text(&attached.stderr),
        "",
        "dynspec attach -q must be silent"
    );
    assert!(
        tracer_pid(target.id()).is_none_or(|t| t == 0),
        "target still traced after dynspec attach --for 2 exited"
    );
    let v = check_report("attach", &report);
    assert_eq!(v["pid"].to_string(), pid, "report names the attached pid");
    // Detached: the program runs on to its normal end with the output of an untouched run.
    let out = target.wait_output();
    assert_eq!(
        text(&out.stdout),
        ATTACH_STDOUT,
        "stdout after attach/detach"
    );
    assert_eq!(text(&out.stderr), "");
    assert_eq!(
        out.status.code(),
        Some(0),
        "exit status after attach/detach: {}",
        out.status
    );
}

/// `dynspec run ARGS -- CMD...` in a temp dir with the given stdin; the report goes to the temp dir.
fn run_cmd(mode: &[&str], cmd: &[&str], stdin: Option<Vec<u8>>) -> Output {
    let tmp = TempDir::new();
    let mut c = Command::new(dynspec());
    c.current_dir(tmp.path())
        .arg("run")
        .args(mode)
        .arg("-q")
        .arg("--report")
        .arg(tmp.join("r.json"))
        .arg("--");
    c.args(cmd);
    output_of(c, stdin)
}

#[test]
fn stdin_passes_through() {
    // Large enough to need several pipe buffers, with every byte value.
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
    for mode in [&["--profile-only"][..], &[][..]] {
        let out = run_cmd(mode, &["cat"], Some(data.clone()));
        assert!(
            out.status.success(),
            "dynspec run {mode:?} -- cat: {} {}",
            out.status,
            text(&out.stderr)
        );
        assert!(
            out.stdout == data,
            "dynspec run {mode:?} -- cat: stdout is not stdin ({} of {} bytes)",
            out.stdout.len(),
            data.len()
        );
    }
}

#[test]
fn exit_code_passes_through() {
    for mode in [&["--profile-only"][..], &[][..]] {
        for code in [0, 1, 7, 255] {
            let script = format!("exit {code}");
            let out = run_cmd(mode, &["sh", "-c", &script], None);
            assert_eq!(
                out.status.code(),
                Some(code),
                "dynspec run {mode:?} -- sh -c '{script}': {}",
                out.status
            );
            assert_eq!(text(&out.stderr), "", "dynspec -q must be silent");
        }
    }
}

#[test]
fn death_by_signal_passes_through() {
    for mode in [&["--profile-only"][..], &[][..]] {
        for (sig, name) in [
            (libc::SIGSEGV, "SEGV"),
            (libc::SIGTERM, "TERM"),
            (libc::SIGKILL, "KILL"),
        ] {
            let script = format!("kill -{name} $$");
            let out = run_cmd(mode, &["sh", "-c", &script], None);
            assert!(
                died_of(&out.status, sig),
                "dynspec run {mode:?} -- sh -c '{script}': expected death by signal {sig}, got {}",
                out.status
            );
        }
    }
}

#[test]
fn sample_usage_errors_are_deterministic() {
    // A bad SIZE is a usage error (status 2) with a message on stderr, natively and under dynspec alike.
    let native = run_native(sample("interp_switch"), &["not-a-number"]);
    assert_eq!(native.status.code(), Some(2));
    assert!(native.stdout.is_empty());
    let traced = run_cmd(
        &["--profile-only"],
        &[
            sample("interp_switch").to_str().expect("UTF-8 path"),
            "not-a-number",
        ],
        None,
    );
    assert_same(
        "dynspec run -- interp_switch not-a-number",
        &native,
        &traced,
    );
}

/// Every samples/*.c is in the table above, with the small size its header documents and an .expected file.
#[test]
fn every_sample_is_tested_at_its_documented_size() {
    let dir = common::samples_dir();
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("read samples/") {
        let path = entry.expect("samples/ entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("c") {
            continue;
        }
        seen += 1;
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("UTF-8 sample name");
        let c = ALL
            .iter()
            .find(|c| c.bin == name)
            .unwrap_or_else(|| panic!("samples/{name}.c has no entry in tests/samples.rs"));
        let src = std::fs::read_to_string(&path).expect("read sample source");
        let documented = src
            .lines()
            .find_map(|l| l.split("small size (tests):").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("{name}.c does not document its small size"));
        assert_eq!(
            documented, c.size,
            "{name}: documented small size vs the test's"
        );
        assert!(
            src.contains("#ifndef DYNSPEC_NO_MAIN"),
            "{name}.c: main must be wrapped in #ifndef DYNSPEC_NO_MAIN"
        );
        assert!(
            dir.join(format!("{name}.expected")).is_file(),
            "{name}.expected missing"
        );
    }
    assert!(seen >= 9, "only {seen} samples found in {}", dir.display());
}

/// Each sample builds as a shared library without main, exporting its documented hot functions (what the
/// specializer's in-process tests do with it).
#[test]
fn every_sample_builds_as_a_library_exporting_its_hot_functions() {
    let dir = common::samples_dir();
    let tmp = TempDir::new();
    for c in ALL.iter().filter(|c| c.bin == c.expected) {
        let lib = tmp.join(&format!("lib{}.so", c.bin));
        let mut gcc = Command::new("gcc");
        gcc.args([
            "-O2",
            "-g",
            "-pthread",
            "-DDYNSPEC_NO_MAIN",
            "-shared",
            "-fPIC",
            "-o",
        ])
        .arg(&lib)
        .arg(dir.join(format!("{}.c", c.bin)));
        let out = output_of(gcc, None);
        assert!(
            out.status.success(),
            "{}: gcc failed: {}",
            c.bin,
            text(&out.stderr)
        );
        let mut nm = Command::new("nm");
        nm.args(["-D", "--defined-only"]).arg(&lib);
        let out = output_of(nm, None);
        assert!(
            out.status.success(),
            "nm {}: {}",
            lib.display(),
            text(&out.stderr)
        );
        let symbols: Vec<String> = text(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().nth(2).map(str::to_owned))
            .collect();
        for f in c.hot {
            assert!(
                symbols.iter().any(|s| s == f),
                "{}: {f} not exported: {symbols:?}",
                c.bin
            );
        }
        assert!(
            !symbols.iter().any(|s| s == "main"),
            "{}: main is not compiled out",
            c.bin
        );
    }
}

/// Starts interp_switch at ATTACH_SIZE (about 4 s) natively with stdout/stderr captured.
fn start_long_target() -> ChildGuard {
    let child = Command::new(sample("interp_switch"))
        .arg(ATTACH_SIZE)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start interp_switch");
    ChildGuard::new(child)
}

#[test]
fn sigterm_in_attach_mode_detaches_leaving_the_program_untouched() {
    let tmp = TempDir::new();
    let report = tmp.join("attach-term.json");
    let target = start_long_target();
    let pid = target.id();
    let tracer = Command::new(dynspec())
        .args(["attach", &pid.to_string(), "-q", "--report"])
        .arg(&report)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start dynspec attach");
    let tracer = ChildGuard::new(tracer);
    common::wait_for("dynspec to attach (TracerPid of the target)", || {
        tracer_pid(pid).is_none_or(|t| t != 0)
    });
    assert!(
        is_alive(pid),
        "target ended before the test could signal dynspec (size too small?)"
    );
    send_signal(tracer.id() as i32, libc::SIGTERM);
    let out = tracer.wait_output();
    assert_eq!(
        out.status.code(),
        Some(0),
        "dynspec attach after SIGTERM: {} {}",
        out.status,
        text(&out.stderr)
    );
    assert_eq!(text(&out.stderr), "", "dynspec attach -q must be silent");
    assert!(
        tracer_pid(pid).is_none_or(|t| t == 0),
        "target still traced after dynspec exited"
    );
    check_report("attach + SIGTERM", &report);
    let out = target.wait_output();
    assert_eq!(
        text(&out.stdout),
        ATTACH_STDOUT,
        "stdout after attach/SIGTERM/detach"
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "exit status after attach/detach: {}",
        out.status
    );
}

/// Ctrl-C at a terminal signals the whole foreground process group: the target dies of SIGINT, dynspec does not
/// die first, writes its report and then reports the target's death as its own.
#[test]
fn ctrl_c_in_run_mode_reaches_the_target() {
    use std::os::unix::process::CommandExt;
    let tmp = TempDir::new();
    let report = tmp.join("ctrl-c.json");
    let mut cmd = Command::new(dynspec());
    cmd.args(["run", "--profile-only", "-q", "--report"])
        .arg(&report)
        .arg("--")
        .arg(sample("interp_switch"))
        .arg(ATTACH_SIZE)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let tracer = ChildGuard::new(cmd.spawn().expect("start dynspec run"));
    let dpid = tracer.id();
    let mut target = 0;
    common::wait_for("dynspec to start and trace its target", || {
        target = children_of(dpid)
            .into_iter()
            .find(|&c| tracer_pid(c).is_some_and(|t| t != 0))
            .unwrap_or(0);
        target != 0
    });
    // Like the terminal: the signal goes to the process group (dynspec and its target).
    send_signal(-(dpid as i32), libc::SIGINT);
    let out = tracer.wait_output();
    assert!(
        died_of(&out.status, libc::SIGINT),
        "dynspec run after Ctrl-C: expected the target's death by SIGINT passed through, got {} {}",
        out.status,
        text(&out.stderr)
    );
    let v = check_report("run + Ctrl-C", &report);
    assert_eq!(
        v["exit_status"]["signal"],
        libc::SIGINT,
        "exit_status in the report"
    );
    assert!(
        !is_alive(target),
        "target {target} still alive after dynspec exited"
    );
}

/// If dynspec itself is killed, its target goes with it (PTRACE_O_EXITKILL): no orphan keeps running unwatched.
#[test]
fn killing_dynspec_kills_its_target() {
    let tmp = TempDir::new();
    let mut cmd = Command::new(dynspec());
    cmd.args(["run", "-q", "--report"])
        .arg(tmp.join("killed.json"))
        .arg("--")
        .arg(sample("interp_switch"))
        .arg(ATTACH_SIZE)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let tracer = ChildGuard::new(cmd.spawn().expect("start dynspec run"));
    let dpid = tracer.id();
    let mut target = 0;
    common::wait_for("dynspec to start and trace its target", || {
        target = children_of(dpid)
            .into_iter()
            .find(|&c| tracer_pid(c).is_some_and(|t| t != 0))
            .unwrap_or(0);
        target != 0
    });
    send_signal(dpid as i32, libc::SIGKILL);
    let out = tracer.wait_output();
    assert!(
        died_of(&out.status, libc::SIGKILL),
        "dynspec: {}",
        out.status
    );
    common::wait_for("the target to die with dynspec", || !is_alive(target));
}
