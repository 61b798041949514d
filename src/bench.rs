//! `dynspec bench` and `dynspec demo`: native and specialized runs side by side, checked equal, timed.

use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

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

/// Medians of `n` alternated native / `dynspec run -q` runs of `argv` (outputs checked equal).
pub struct BenchResult {
    pub native: f64,
    pub dynspec: f64,
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

/// Run the benchmark; `report`: where the dynspec runs write their report (the last one is kept).
pub fn bench(argv: &[OsString], n: u32, report: &Path, progress: bool) -> Result<BenchResult> {
    let me = std::env::current_exe().context("cannot find the dynspec executable")?;
    let mut native = Vec::new();
    let mut spec = Vec::new();
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
        if a.out.stdout != b.out.stdout {
            bail!(
                "run {}: stdout differs between the native run ({} bytes) and dynspec run ({} bytes)",
                i + 1,
                a.out.stdout.len(),
                b.out.stdout.len()
            );
        }
        if a.out.status != b.out.status {
            bail!(
                "run {}: the native run ended with {}, dynspec run with {} ({})",
                i + 1,
                describe(&a.out),
                describe(&b.out),
                String::from_utf8_lossy(&b.out.stderr).trim()
            );
        }
        if progress {
            eprintln!(
                "dynspec: run {}/{n}: native {:.3} s, dynspec {:.3} s",
                i + 1,
                a.secs,
                b.secs
            );
        }
        native.push(a.secs);
        spec.push(b.secs);
    }
    Ok(BenchResult {
        native: median(&mut native),
        dynspec: median(&mut spec),
    })
}

/// `dynspec bench`.
pub fn run_bench(argv: &[OsString], n: u32, quiet: bool) -> Result<()> {
    let dir = scratch("bench")?;
    let r = bench(argv, n, &dir.path().join("report.json"), !quiet)?;
    println!(
        "native median {:.3} s, dynspec median {:.3} s, speedup {:.2}x",
        r.native,
        r.dynspec,
        r.speedup()
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
        };
        assert_eq!(r.speedup(), 2.0);
    }
}
