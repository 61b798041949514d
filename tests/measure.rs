//! Measuring installed stubs on and off while the program runs (`dynspec::abtest`): a variant slower than the
//! code it replaces is found slower and removed, with identical output; variants whose passes the stub cannot
//! count are reported unmeasured, never removed for it.

mod common;

use common::run_both;
use serde_json::Value;

fn variants(r: &Value) -> &[Value] {
    r["variants"]
        .as_array()
        .map(Vec::as_slice)
        .expect("variants[]")
}

#[test]
fn a_losing_variant_is_measured_slower_and_removed() {
    // losing_variant: every call's dispatch stub pays a branch the CPU cannot predict, for nothing the variant
    // saves (run_both checks stdout, stderr and exit status against the native run).
    // What is measured here is the measurement: a run whose plan installed nothing (its store profile did not
    // trust the configuration page, which happens under load) is run again, up to three times.
    let mut tries = 0;
    let (r, _tmp) = loop {
        tries += 1;
        let (_, r, tmp) = run_both("losing_variant", &["150000000"], &[]);
        if !variants(&r).is_empty() || tries == 3 {
            break (r, tmp);
        }
    };
    let vs = variants(&r);
    assert!(!vs.is_empty(), "nothing installed in 3 runs: {}", r["plan"]);
    let m = &r["measurement"];
    let removed: Vec<u64> = m["removed"]
        .as_array()
        .expect("measurement.removed[]")
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert!(!removed.is_empty(), "no variant removed: {m}\n{vs:?}");
    assert!(m["trials"].as_u64().unwrap_or(0) >= 1, "{m}");
    assert!(m["stub_off_ns"].as_f64().is_some_and(|ns| ns > 0.0), "{m}");
    for v in vs
        .iter()
        .filter(|v| removed.contains(&v["id"].as_u64().unwrap_or(0)))
    {
        let e = &v["effect"];
        assert_eq!(e["verdict"], "slower", "{v}");
        assert!(e["ratio"].as_f64().is_some_and(|x| x < 1.0), "{e}");
        assert!(e["high"].as_f64().is_some_and(|x| x < 1.0), "{e}");
        assert!(
            v["entries"].as_u64().unwrap_or(0) > 0,
            "measured without entries: {v}"
        );
        assert_eq!(
            v["invalidated"], true,
            "a removed variant is no longer live: {v}"
        );
    }
    // The lost trigger is not tried again after the removal, nor a candidate seeing its values (the same
    // quantity in another register): the region is left alone or a runner-up with other values is tried.
    let removed_vs: Vec<&Value> = vs
        .iter()
        .filter(|v| removed.contains(&v["id"].as_u64().unwrap_or(0)))
        .collect();
    // (value, time of its verdict) of every removed variant.
    let lost: Vec<(&Value, u64)> = removed_vs
        .iter()
        .filter_map(|v| Some((&v["value"], v["effect"]["time_ms"].as_u64()?)))
        .collect();
    assert!(!lost.is_empty(), "no removed variant's verdict time");
    let later = r["plan"].as_array().expect("plan[]").iter();
    for round in later {
        let at = round["time_ms"].as_u64().unwrap_or(0);
        let lost_values: Vec<&Value> = lost
            .iter()
            .filter(|(_, t)| *t < at)
            .map(|(v, _)| *v)
            .collect();
        for region in round["regions"].as_array().into_iter().flatten() {
            if region["symbol"] != "step" {
                continue;
            }
            for c in region["candidates"].as_array().into_iter().flatten() {
                if c["decision"] != "installed" {
                    continue;
                }
                let values: Vec<&Value> = c["values"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|v| &v["value"])
                    .collect();
                assert!(
                    !values.iter().any(|v| lost_values.contains(v)),
                    "a lost trigger's values installed again: {c}"
                );
            }
        }
    }
}

#[test]
fn an_interpreter_run_by_one_call_is_kept_unmeasured() {
    // interp_switch's variants follow the bytecode through the dispatch point and loop back to it: the stub
    // sees none of those passes, and the function around them (interp_run) is called once, so there is no
    // unit of work to compare: kept, and the report says why.
    let (_, r, _tmp) = run_both("interp_switch", &["20000000"], &[]);
    let vs = variants(&r);
    assert!(!vs.is_empty(), "nothing installed: {}", r["plan"]);
    assert!(
        r["measurement"]["removed"]
            .as_array()
            .is_some_and(|v| v.is_empty()),
        "{}",
        r["measurement"]
    );
    // (A variant installed in the run's last moments may have no verdict yet.)
    let judged: Vec<&Value> = vs.iter().filter(|v| !v["effect"].is_null()).collect();
    assert!(!judged.is_empty(), "no verdict at all: {vs:?}");
    for v in judged {
        let e = &v["effect"];
        assert!(
            ["too_few_passes", "unmeasured"].contains(&e["verdict"].as_str().unwrap_or("")),
            "{v}"
        );
        assert!(e["why"].as_str().is_some_and(|w| !w.is_empty()), "{e}");
    }
    assert!(vs.iter().any(|v| v["entries"].as_u64().unwrap_or(0) > 0));
}

#[test]
fn a_winner_measured_by_calls_of_its_function_is_kept() {
    // bpf_filter's variants pass their trigger (the filter's instruction loop) inside themselves, so the unit is
    // a call of bpf_run, counted at its entry during the trial: measured faster, kept, counting stub removed.
    let (_, r, _tmp) = run_both("bpf_filter", &["100000000"], &[]);
    let vs = variants(&r);
    assert!(!vs.is_empty(), "nothing installed: {}", r["plan"]);
    let m = &r["measurement"];
    assert!(m["removed"].as_array().is_some_and(|v| v.is_empty()), "{m}");
    let measured: Vec<&Value> = vs
        .iter()
        .filter(|v| v["effect"]["verdict"] == "faster")
        .collect();
    assert!(!measured.is_empty(), "no variant measured faster: {vs:?}");
    for v in measured {
        let e = &v["effect"];
        assert!(
            e["unit"].as_str().is_some_and(|u| u.starts_with("call of")),
            "{e}"
        );
        assert!(e["low"].as_f64().is_some_and(|x| x > 1.0), "{e}");
    }
}

#[test]
fn a_variant_entered_once_is_measured_by_the_users_metric() {
    // metric_interp's variants loop inside the interpreter function, which is called once: with no unit of
    // its own the variant would be kept unmeasured. Its bytecode calls a native builtin once per iteration;
    // named as the metric, the builtin's calls are the unit, counted the same way with the variant on and off.
    let extra = ["--metric", "calls:metric_builtin"];
    let (_, r, _tmp) = run_both("metric_interp", &["40000000"], &extra);
    let vs = variants(&r);
    assert!(!vs.is_empty(), "nothing installed: {}", r["plan"]);
    let m = &r["measurement"];
    assert_eq!(m["metric"], "calls:metric_builtin", "{m}");
    assert!(m["metric_problem"].is_null(), "{m}");
    let judged: Vec<&Value> = vs.iter().filter(|v| !v["effect"].is_null()).collect();
    assert!(!judged.is_empty(), "no verdict at all: {vs:?}");
    for v in judged {
        let e = &v["effect"];
        assert!(
            ["faster", "not_measurably_slower", "slower"]
                .contains(&e["verdict"].as_str().unwrap_or("")),
            "measured by the metric, a verdict is reached: {v}"
        );
        assert!(
            e["unit"]
                .as_str()
                .is_some_and(|u| u.contains("--metric calls:metric_builtin")),
            "{e}"
        );
    }
}

#[test]
fn a_metric_the_program_lacks_is_said_and_the_own_unit_used() {
    let extra = ["--metric", "calls:no_such_function"];
    let (_, r, _tmp) = run_both("bpf_filter", &["100000000"], &extra);
    let m = &r["measurement"];
    assert!(
        m["metric_problem"]
            .as_str()
            .is_some_and(|p| p.contains("no_such_function")),
        "{m}"
    );
    let vs = variants(&r);
    assert!(!vs.is_empty(), "nothing installed: {}", r["plan"]);
    assert!(
        vs.iter()
            .filter_map(|v| v["effect"]["unit"].as_str())
            .all(|u| !u.contains("--metric")),
        "{vs:?}"
    );
}
