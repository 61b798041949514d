//! dynspec: the command-line tool. Drives tracer, specializer and codecache.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

use dynspec::report::{html, Report, DEFAULT_REPORT};
use dynspec::session::{Outcome, SessionConfig, Target};
use dynspec::{bench, fold, session, signals};

/// Make unmodified x86-64 Linux programs faster while they run (profiling and specialization).
#[derive(Debug, Parser)]
#[command(name = "dynspec", version, about, disable_help_subcommand = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

/// `--rate` and `--window` defaults with `--profile-only`: sampling lasts the whole run, so it must be cheap.
const PROFILE_RATE_HZ: u64 = 499;
const PROFILE_WINDOW: Duration = Duration::from_millis(300);
/// The same when specializing: sampling stops once variants are installed, so a short dense burst finds the hot
/// code sooner (about 100 samples per window).
const SPECIALIZE_RATE_HZ: u64 = 1999;
const SPECIALIZE_WINDOW: Duration = Duration::from_millis(50);

#[derive(Debug, clap::Args)]
struct ProfileOpts {
    /// Only profile; do not specialize.
    #[arg(long)]
    profile_only: bool,
    /// Where to write the report [default: ./dynspec.report.json, the previous one kept as .old].
    #[arg(
        short = 'o',
        long = "output",
        visible_alias = "report",
        value_name = "PATH"
    )]
    report: Option<PathBuf>,
    /// Samples per second of CPU time, per thread, while sampling (each sample costs the program a timer
    /// interrupt: ~1-2% of its time at 499 on a VM, ~5% at 1999) [default: 1999 when specializing, where
    /// sampling stops once the variants are installed; 499 with --profile-only, which samples the whole run].
    #[arg(short, long, value_name = "HZ", allow_negative_numbers = true, value_parser = parse_rate)]
    rate: Option<u64>,
    /// Seconds of sampling before the write watch, and seconds of write watching [default: 0.05 when
    /// specializing (the sooner variants run, the more they save; guards catch writes the watch missed); 0.3 with
    /// --profile-only].
    #[arg(long, value_name = "SECS", allow_negative_numbers = true, value_parser = parse_secs)]
    window: Option<Duration>,
    /// No messages from dynspec itself (errors still go to stderr).
    #[arg(short, long)]
    quiet: bool,
    /// Percent of the program's time dynspec may cost it in ptrace stops (signals, events, guard faults) before
    /// it backs off: it detaches when nothing is installed, and removes its variants and detaches when the cost
    /// goes on window after window; 100 never backs off for cost.
    #[arg(long, value_name = "PERCENT", default_value_t = dynspec::overhead::DEFAULT_MAX_OVERHEAD * 100.0, value_parser = parse_percent)]
    max_overhead: f64,
    /// The unit of work variants are measured by (keep a variant only when the program does no less of it per
    /// CPU second): `calls:SYMBOL`, `calls:MODULE+0xVADDR` (a function as the report names it) or
    /// `calls:0xADDRESS` [default: passes through each variant's dispatch site, or calls of its function].
    #[arg(long, value_name = "calls:FUNCTION", value_parser = parse_metric)]
    metric: Option<dynspec::metric::Metric>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a program under dynspec.
    Run {
        #[command(flatten)]
        opts: ProfileOpts,
        /// The program and its arguments (put them after `--`).
        #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Attach to a running process; detach leaving it running (on Ctrl-C, SIGTERM, SIGHUP or after --for).
    Attach {
        /// Process ID to attach to.
        #[arg(
            value_name = "PID",
            required_unless_present = "pid_opt",
            conflicts_with = "pid_opt",
            value_parser = parse_pid
        )]
        pid: Option<i32>,
        /// Process ID to attach to (as py-spy and perf spell it).
        #[arg(short = 'p', long = "pid", value_name = "PID", value_parser = parse_pid)]
        pid_opt: Option<i32>,
        /// Detach after this many seconds.
        #[arg(
            short = 'd',
            long = "duration",
            visible_alias = "for",
            value_name = "SECS",
            allow_negative_numbers = true,
            value_parser = parse_secs
        )]
        for_secs: Option<Duration>,
        #[command(flatten)]
        opts: ProfileOpts,
    },
    /// The guardian of an attached process (started by `attach`; see ARCHITECTURE.md, "The guardian").
    #[command(name = "__guardian", hide = true)]
    Guardian {
        /// The attached process.
        pid: i32,
    },
    /// Show a report.
    Report {
        /// Report file [default: ./dynspec.report.json].
        path: Option<PathBuf>,
        /// Print the JSON document instead of the summary.
        #[arg(long)]
        json: bool,
        /// Print the code of every variant instead of the summary.
        #[arg(long, conflicts_with = "json")]
        asm: bool,
        /// Write the report as one self-contained HTML page [default FILE: beside the report, .html].
        #[arg(long, value_name = "FILE", num_args = 0..=1, conflicts_with_all = ["json", "asm"])]
        html: Option<Option<PathBuf>>,
    },
    /// Show what the specializer does to a snippet of code.
    Fold(fold::FoldArgs),
    /// Time a program natively and under `dynspec run`, alternated; check both give the same output.
    Bench {
        /// Runs of each kind.
        #[arg(short = 'n', value_name = "N", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=1000))]
        n: u32,
        /// Print only the result line.
        #[arg(short, long)]
        quiet: bool,
        /// Keep the last dynspec run's report here [default: none is kept].
        #[arg(
            short = 'o',
            long = "output",
            visible_alias = "report",
            value_name = "PATH"
        )]
        report: Option<PathBuf>,
        /// The program and its arguments (put them after `--`).
        #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
        command: Vec<OsString>,
    },
    /// Print the help of dynspec or of one of its commands.
    Help {
        /// The command to explain.
        #[arg(value_name = "COMMAND")]
        topic: Option<String>,
    },
    /// Build the bundled switch interpreter, run it natively and under dynspec, and compare.
    Demo {
        /// Where to write the report [default: ./dynspec.report.json].
        #[arg(
            short = 'o',
            long = "output",
            visible_alias = "report",
            value_name = "PATH"
        )]
        report: Option<PathBuf>,
    },
}

/// The longest duration accepted (about 115 days): longer is a typo, not a plan.
const MAX_SECS: f64 = 1e7;

/// `--max-overhead`: a percentage from 0 to 100.
fn parse_metric(s: &str) -> Result<dynspec::metric::Metric, String> {
    s.parse()
        .map_err(|e: dynspec::metric::MetricError| e.to_string())
}

fn parse_percent(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a percentage"))?;
    if !v.is_finite() || !(0.0..=100.0).contains(&v) {
        return Err(format!("'{s}' must be a percentage from 0 to 100"));
    }
    Ok(v)
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !v.is_finite() || v <= 0.0 {
        return Err(format!("'{s}' must be a positive number of seconds"));
    }
    if v > MAX_SECS {
        return Err(format!("'{s}' is too long: at most {MAX_SECS:e} seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// The highest sampling rate accepted; perf itself caps it lower (`kernel.perf_event_max_sample_rate`).
const MAX_RATE_HZ: u64 = 1_000_000;

fn parse_rate(s: &str) -> Result<u64, String> {
    let v: i128 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a whole number of samples per second"))?;
    if v < 1 {
        return Err(format!("'{s}' must be at least 1 sample per second"));
    }
    if v > MAX_RATE_HZ as i128 {
        return Err(format!("'{s}' is too high: at most {MAX_RATE_HZ}"));
    }
    Ok(v as u64)
}

fn parse_pid(s: &str) -> Result<i32, String> {
    let v: i64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a process ID"))?;
    if v < 1 || v > i32::MAX as i64 {
        return Err(format!(
            "'{s}' is not a process ID (a positive number, as `ps` shows)"
        ));
    }
    Ok(v as i32)
}

/// Bit `fd` set: standard stream `fd` was closed when dynspec started. Recorded by [`probe_stdio`].
static CLOSED_STDIO: AtomicU8 = AtomicU8::new(0);

/// Runs from `.init_array`, before the Rust runtime's start-up reopens closed standard streams on /dev/null, so
/// the program can be handed its streams exactly as dynspec received them (`seq 10 >&-` must fail as natively).
extern "C" fn probe_stdio() {
    for fd in 0..3 {
        // SAFETY: F_GETFD on a small integer only queries the descriptor table.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } == -1 {
            CLOSED_STDIO.fetch_or(1 << fd, Ordering::Relaxed);
        }
    }
}

#[used]
#[link_section = ".init_array"]
static PROBE_STDIO: extern "C" fn() = probe_stdio;

/// The standard streams dynspec was started without (dynspec itself now has /dev/null there).
fn closed_stdio() -> Vec<i32> {
    let bits = CLOSED_STDIO.load(Ordering::Relaxed);
    (0..3).filter(|fd| bits & (1 << fd) != 0).collect()
}

fn main() {
    // The Rust runtime ignores SIGPIPE; restore the default so the traced program inherits the disposition it
    // would have natively (and `dynspec report | head` ends quietly like any Unix tool).
    // SAFETY: setting a default disposition has no memory-safety preconditions; no other thread exists yet.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = Cli::parse();
    let code = match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("dynspec: error: {}", one_line(&e));
            exit_code_of(&e)
        }
    };
    // process::exit skips destructors: flush what `dynspec report` printed.
    let _ = std::io::Write::flush(&mut std::io::stdout());
    std::process::exit(code);
}

/// The exit status for an error: 127 and 126 for a program that cannot be found or executed, as shells, `env`
/// and `timeout` use them; 1 otherwise.
fn exit_code_of(e: &anyhow::Error) -> i32 {
    use tracer::TracerError as T;
    match e.chain().find_map(|c| c.downcast_ref::<T>()) {
        Some(T::ProgramNotFound(_)) => 127,
        Some(
            T::NotExecutable(_)
            | T::NotElf(_)
            | T::WrongArch { .. }
            | T::NoInterpreter(_)
            | T::TooManyInterpreters(_),
        ) => 126,
        _ => 1,
    }
}

/// The cause chain joined by ": " on one line (messages with newlines are folded).
fn one_line(e: &anyhow::Error) -> String {
    let parts: Vec<String> = e
        .chain()
        .map(|c| c.to_string().replace('\n', " "))
        .collect();
    // Some errors already repeat their source's text; do not print it twice.
    let mut out: Vec<String> = Vec::new();
    for p in parts {
        if out.last().is_some_and(|l: &String| l.ends_with(&p)) {
            continue;
        }
        out.push(p);
    }
    out.join(": ")
}

fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    match cli.cmd {
        Command::Guardian { pid } => dynspec::session::guardian::main(pid),
        Command::Run { opts, command } => {
            // Checked here for clear messages; the tracer resolves PATH the same way and the program gets argv
            // exactly as typed (argv[0] included, as a shell would pass it).
            validate_program(&command[0])?;
            let cfg = session_config(&opts, None);
            check_report_path(&cfg.report_path)?;
            let target = Target::Run(command);
            let outcome = session::run(target, &cfg)?;
            Ok(finish(outcome, &cfg))
        }
        Command::Attach {
            pid,
            pid_opt,
            for_secs,
            opts,
        } => {
            let Some(pid) = pid.or(pid_opt) else {
                bail!("name the process to attach to: dynspec attach PID");
            };
            validate_pid(pid)?;
            let cfg = session_config(&opts, for_secs);
            check_report_path(&cfg.report_path)?;
            let outcome = session::run(Target::Attach(nix::unistd::Pid::from_raw(pid)), &cfg)?;
            Ok(finish(outcome, &cfg))
        }
        Command::Report {
            path,
            json,
            asm,
            html,
        } => {
            let path = path.unwrap_or_else(|| PathBuf::from(DEFAULT_REPORT));
            let r = Report::load(&path)?;
            if let Some(file) = html {
                let file = file.unwrap_or_else(|| html::default_html_path(&path));
                std::fs::write(&file, html::render_html(&r))
                    .with_context(|| format!("cannot write {}", file.display()))?;
                println!("report page written to {}", file.display());
            } else if json {
                println!("{}", r.to_json());
            } else if asm {
                print!("{}", r.render_asm());
            } else {
                print!("{}", r.render());
            }
            Ok(0)
        }
        Command::Fold(args) => {
            fold::run(args)?;
            Ok(0)
        }
        Command::Bench {
            n,
            quiet,
            report,
            command,
        } => {
            validate_program(&command[0])?;
            if let Some(r) = &report {
                check_report_path(r)?;
            }
            bench::run_bench(&command, n, quiet, report.as_deref())?;
            Ok(0)
        }
        Command::Help { topic } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            // Building propagates the binary name, so a command's usage reads `dynspec run ...`.
            cmd.build();
            match topic {
                None => cmd.print_help()?,
                Some(t) => match cmd.find_subcommand_mut(&t) {
                    Some(sub) => sub.print_help()?,
                    None => bail!("no command '{t}': `dynspec --help` lists them"),
                },
            }
            Ok(0)
        }
        Command::Demo { report } => {
            let report = report.unwrap_or_else(|| PathBuf::from(DEFAULT_REPORT));
            check_report_path(&report)?;
            bench::run_demo(&report)?;
            Ok(0)
        }
    }
}

/// Fail before running anything if the report could not be written at the end.
fn check_report_path(path: &Path) -> anyhow::Result<()> {
    if path.is_dir() {
        bail!("cannot write report {}: it is a directory", path.display());
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        bail!(
            "cannot write report {}: directory {} does not exist",
            path.display(),
            dir.display()
        );
    }
    use std::os::unix::ffi::OsStrExt as _;
    let writable = std::ffi::CString::new(dir.as_os_str().as_bytes())
        // SAFETY: a valid NUL-terminated path that lives across the call.
        .map(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK) } == 0)
        .unwrap_or(false);
    // A device or FIFO is written in place, so only its own permission matters.
    let special = std::fs::metadata(path).is_ok_and(|m| !m.is_file());
    if !writable && !special {
        bail!(
            "cannot write report {}: directory {} is not writable (use --report PATH)",
            path.display(),
            dir.display()
        );
    }
    Ok(())
}

fn session_config(opts: &ProfileOpts, attach_for: Option<Duration>) -> SessionConfig {
    let (rate, window) = if opts.profile_only {
        (PROFILE_RATE_HZ, PROFILE_WINDOW)
    } else {
        (SPECIALIZE_RATE_HZ, SPECIALIZE_WINDOW)
    };
    SessionConfig {
        rate_hz: opts.rate.unwrap_or(rate),
        window: opts.window.unwrap_or(window),
        quiet: opts.quiet,
        report_path: opts
            .report
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_REPORT)),
        attach_for,
        specialize: !opts.profile_only,
        close_fds: closed_stdio(),
        max_overhead: opts.max_overhead / 100.0,
        metric: opts.metric.clone(),
    }
}

/// Exit code for the outcome; re-raises the target's fatal signal on ourselves.
fn finish(outcome: Outcome, cfg: &SessionConfig) -> i32 {
    if !cfg.quiet {
        eprintln!("dynspec: report written to {}", cfg.report_path.display());
    }
    match outcome {
        Outcome::Exited(tracer::ExitStatus::Code(c)) => c,
        Outcome::Exited(tracer::ExitStatus::Signaled { signal, .. }) => signals::die_of(signal),
        Outcome::Detached => 0,
        Outcome::Interrupted(code) => code,
    }
}

/// Resolve a program like a shell does and check it is something we can trace, before forking anything
/// (`tracer::program`; its errors are the messages).
fn validate_program(prog: &OsString) -> anyhow::Result<PathBuf> {
    Ok(tracer::program::validate(prog)?)
}

/// Check a PID can be attached before starting a session (`tracer::program`; its errors are the messages).
fn validate_pid(pid: i32) -> anyhow::Result<()> {
    tracer::program::check_pid(nix::unistd::Pid::from_raw(pid))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_threads_are_refused() {
        let is_kernel_thread =
            |pid: i32| tracer::program::is_kernel_thread(nix::unistd::Pid::from_raw(pid));
        assert!(!is_kernel_thread(std::process::id() as i32));
        // kthreadd, where the machine shows it (not inside a PID namespace).
        let kthreadd = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains("(kthreadd)"))
            });
        if let Some(pid) = kthreadd {
            assert!(is_kernel_thread(pid));
            let e = validate_pid(pid).unwrap_err();
            assert!(one_line(&e).contains("kernel thread"));
        }
    }

    #[test]
    fn secs_parser() {
        assert_eq!(parse_secs("0.5"), Ok(Duration::from_millis(500)));
        assert!(parse_secs("0").is_err());
        assert!(parse_secs("-1").is_err());
        assert!(parse_secs("nan").is_err());
        assert!(parse_secs("abc").is_err());
    }

    #[test]
    fn error_chain_is_one_line() {
        let e = anyhow::anyhow!("inner\ncause").context("outer");
        assert_eq!(one_line(&e), "outer: inner cause");
    }

    #[test]
    fn perf_permission_error_names_the_fix() {
        let e = anyhow::Error::new(tracer::sampler::SamplerError::PermissionDenied { tid: 5 })
            .context("cannot sample PID 5");
        let msg = one_line(&e);
        assert!(msg.contains("kernel.perf_event_paranoid"), "{msg}");
        assert!(msg.contains("CAP_PERFMON"), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn missing_program_message() {
        let e = validate_program(&OsString::from("./definitely-not-here")).unwrap_err();
        assert_eq!(
            one_line(&e),
            "program not found: ./definitely-not-here — check the path or PATH"
        );
        let e = validate_program(&OsString::from("definitely-not-on-path-xyz")).unwrap_err();
        assert!(one_line(&e).starts_with("program not found: definitely-not-on-path-xyz"));
    }

    #[test]
    fn directory_is_refused() {
        let e = validate_program(&OsString::from("/tmp/")).unwrap_err();
        assert!(one_line(&e).contains("is a directory"));
    }
}
