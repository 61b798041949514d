//! `dynspec bench` and `dynspec demo`: native and specialized runs side by side, checked equal, timed.

use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::report::Report;

/// The switch interpreter `dynspec demo` builds and runs.
const DEMO_SOURCE: &str = include_str!("../samples/interp_switch.c");
/// Demo size used to calibrate (about 0.1 s natively on a small VM).
const DEMO_PROBE_SIZE: u64 = 1_000_000;
/// Native time the demo aims for.
const DEMO_TARGET: Duration = Duration::from_secs(2);

/// One timed run of a command.
struct Timed {
    out: Output,
    secs: f64,
}

fn timed(mut cmd: Command) -> Result<Timed> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t = Instant::now();
    let out = cmd.output()?;
    Ok(Timed {
        out,
        secs: t.elapsed().as_secs_f64(),
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        0.0
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn describe(o: &Output) -> String {
    match (
        o.status.code(),
        std::os::unix::process::ExitStatusExt::signal(&o.status),
    ) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "unknown status".into(),
    }
}

/// A private temporary directory, removed on drop.
fn scratch(tag: &str) -> Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("dynspec-{tag}-"))
        .tempdir()
        .with_context(|| {
            format!(
                "cannot create a temporary directory in {}",
                std::env::temp_dir().display()
            )
        })
}

/// Medians of `n` alternated native / `dynspec run -q` runs of `argv` (stdout, stderr and exit status checked
/// equal), and what the variants did (from each dynspec run's report).
pub struct BenchResult {
    pub native: f64,
    pub dynspec: f64,
    /// Of the dynspec run with the median count of entries (the report's `variants[].entries`, summed): that
    /// count, the variants it installed and how many of them were entered at least once.
    pub entries: u64,
    pub variants: usize,
    pub variants_entered: usize,
}

impl BenchResult {
    pub fn speedup(&self) -> f64 {
        if self.dynspec > 0.0 {
            self.native / self.dynspec
        } else {
            0.0
        }
    }
}

/// The first difference between a native run and a dynspec run of the same command (stdout, stderr, exit status).
fn difference(run: u32, a: &Output, b: &Output) -> Option<String> {
    if a.stdout != b.stdout {
        return Some(format!(
            "run {run}: stdout differs between the native run ({} bytes) and dynspec run ({} bytes)",
            a.stdout.len(),
            b.stdout.len()
        ));
    }
    if a.status != b.status {
        return Some(format!(
            "run {run}: the native run ended with {}, dynspec run with {} ({})",
            describe(a),
            describe(b),
            String::from_utf8_lossy(&b.stderr).trim()
        ));
    }
    if a.stderr != b.stderr {
        return Some(format!(
            "run {run}: stderr differs between the native run ({} bytes) and dynspec run ({} bytes): {:?} vs {:?}",
            a.stderr.len(),
            b.stderr.len(),
            String::from_utf8_lossy(&a.stderr[..a.stderr.len().min(200)]),
            String::from_utf8_lossy(&b.stderr[..b.stderr.len().min(200)])
        ));
    }
    None
}

/// Run the benchmark; `report`: where the dynspec runs write their report (the last one is kept).
pub fn bench(argv: &[OsString], n: u32, report: &Path, progress: bool) -> Result<BenchResult> {
    let me = std::env::current_exe().context("cannot find the dynspec executable")?;
    let mut native = Vec::new();
    let mut spec = Vec::new();
    // (entries, variants, variants entered) of each dynspec run.
    let mut entered = Vec::new();
    for i in 0..n {
        let mut c = Command::new(&argv[0]);
        c.args(&argv[1..]);
        let a = timed(c).with_context(|| format!("cannot run {}", argv[0].to_string_lossy()))?;
        let mut c = Command::new(&me);
        c.args([OsStr::new("run"), OsStr::new("-q"), OsStr::new("--report")])
            .arg(report)
            .arg("--")
            .args(argv);
        let b = timed(c).context("cannot run dynspec")?;
        if let Some(d) = difference(i + 1, &a.out, &b.out) {
            bail!(d);
        }
        let r = Report::load(report)
            .with_context(|| format!("run {}: cannot read the dynspec run's report", i + 1))?;
        let total: u64 = r.variants.iter().map(|v| v.entries).sum();
        let variants = r.variants.len();
        let variants_entered = r.variants.iter().filter(|v| v.entries > 0).count();
        if progress {
            eprintln!(
                "dynspec: run {}/{n}: native {:.3} s, dynspec {:.3} s, variants entered {variants_entered} of \
                 {variants} ({total} entries)",
                i + 1,
                a.secs,
                b.secs
            );
        }
        entered.push((total, variants, variants_entered));
        native.push(a.secs);
        spec.push(b.secs);
    }
    entered.sort_unstable();
    let (entries, variants, variants_entered) =
        entered.get(entered.len() / 2).copied().unwrap_or_default();
    Ok(BenchResult {
        native: median(&mut native),
        dynspec: median(&mut spec),
        entries,
        variants,
        variants_entered,
    })
}

/// `dynspec bench`; `report`: where to keep the last dynspec run's report (by default it is thrown away).
pub fn run_bench(argv: &[OsString], n: u32, quiet: bool, report: Option<&Path>) -> Result<()> {
    let dir = scratch("bench")?;
    let tmp_report = dir.path().join("report.json");
    let r = bench(argv, n, report.unwrap_or(&tmp_report), !quiet)?;
    println!(
        "native median {:.3} s, dynspec median {:.3} s, speedup {:.2}x, variants entered {} of {} ({} entries)",
        r.native,
        r.dynspec,
        r.speedup(),
        r.variants_entered,
        r.variants,
        r.entries
    );
    Ok(())
}

/// `dynspec demo`: build the bundled switch interpreter, run it natively and under dynspec.
pub fn run_demo(report: &Path) -> Result<()> {
    let dir = scratch("demo")?;
    let src = dir.path().join("interp_switch.c");
    std::fs::write(&src, DEMO_SOURCE).context("cannot write the demo source")?;
    let exe = dir.path().join("interp_switch");
    let st = Command::new("gcc")
        .args(["-O2", "-g", "-pthread", "-o"])
        .arg(&exe)
        .arg(&src)
        .stdin(Stdio::null())
        .status();
    match st {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("gcc not found: the demo compiles a C sample (install gcc, e.g. `apt-get install gcc`)")
        }
        Err(e) => return Err(e).context("cannot run gcc"),
        Ok(s) if !s.success() => bail!("gcc failed to compile the demo sample ({s})"),
        Ok(_) => {}
    }
    // Calibrate the size to about DEMO_TARGET natively.
    let mut c = Command::new(&exe);
    c.arg(DEMO_PROBE_SIZE.to_string());
    let probe = timed(c).context("cannot run the demo program")?;
    if !probe.out.status.success() {
        bail!("the demo program failed ({})", describe(&probe.out));
    }
    let scale = DEMO_TARGET.as_secs_f64() / probe.secs.max(0.005);
    let size = ((DEMO_PROBE_SIZE as f64 * scale) as u64).clamp(DEMO_PROBE_SIZE, 200_000_000);
    println!(
        "dynspec demo: a switch-based bytecode interpreter (samples/interp_switch.c), size {size}"
    );
    let argv: Vec<OsString> = vec![exe.clone().into(), size.to_string().into()];
    let r = bench(&argv, 1, report, false)?;
    println!("  native:          {:.3} s", r.native);
    println!("  under dynspec:   {:.3} s", r.dynspec);
    println!("  speedup:         {:.2}x", r.speedup());
    println!("see what dynspec did: dynspec report {}", report.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&mut []), 0.0);
    }

    #[test]
    fn speedup_is_native_over_dynspec() {
        let r = BenchResult {
            native: 2.0,
            dynspec: 1.0,
            entries: 0,
            variants: 0,
            variants_entered: 0,
        };
        assert_eq!(r.speedup(), 2.0);
    }
}
