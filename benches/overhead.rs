//! Profiling-overhead benchmark: samples/nothing natively vs under `dynspec run --profile-only`, alternated.
//!
//! `cargo bench --bench overhead` builds dynspec in the bench (release) profile and the samples, then prints
//! `bench overhead: native T ms, profiled T ms (median of N), overhead X%`.
//! Environment: DYNSPEC_BENCH_N (runs of each kind, default 10), DYNSPEC_BENCH_SIZE (nothing's SIZE, default 3200,
//! about 1 s natively on the 2-core CI machine).

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{dynspec, output_of, sample, text, TempDir};

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("bench overhead: {name}={v:?} is not a number; using {default}");
            default
        }),
        Err(_) => default,
    }
}

fn timed(cmd: Command) -> (Duration, Output) {
    let start = Instant::now();
    let out = output_of(cmd, None);
    (start.elapsed(), out)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    // `cargo bench -- FILTER` passes FILTER (and `--bench`); run only when the filter, if any, names this bench.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if !filter.is_empty() && !filter.iter().any(|f| "overhead".contains(f.as_str())) {
        return;
    }
    let n = env_number("DYNSPEC_BENCH_N", 10).max(1);
    let size = env_number("DYNSPEC_BENCH_SIZE", 3200).to_string();
    let nothing = sample("nothing");
    let dynspec = dynspec();
    let tmp = TempDir::new();
    let report = tmp.join("overhead.report.json");

    let mut native = Vec::new();
    let mut profiled = Vec::new();
    for i in 0..n {
        let mut plain = Command::new(&nothing);
        plain.arg(&size).stdin(Stdio::null());
        let (t_native, out_native) = timed(plain);

        let mut traced = Command::new(&dynspec);
        traced
            .args(["run", "--profile-only", "-q", "--report"])
            .arg(&report)
            .arg("--")
            .arg(&nothing)
            .arg(&size);
        let (t_profiled, out_profiled) = timed(traced);

        if out_native.stdout != out_profiled.stdout
            || out_native.status.code() != out_profiled.status.code()
        {
            eprintln!(
                "bench overhead: run {i}: outputs differ\nnative ({}): {}\nprofiled ({}): {}{}",
                out_native.status,
                text(&out_native.stdout),
                out_profiled.status,
                text(&out_profiled.stdout),
                text(&out_profiled.stderr)
            );
            std::process::exit(1);
        }
        native.push(t_native);
        profiled.push(t_profiled);
    }
    let (tn, tp) = (median(native), median(profiled));
    let overhead = (ms(tp) / ms(tn) - 1.0) * 100.0;
    println!(
        "bench overhead: native {:.1} ms, profiled {:.1} ms (median of {n}), overhead {overhead:.1}%",
        ms(tn),
        ms(tp)
    );
}
