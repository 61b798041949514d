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
    // The region is not specialized again after the removal.
    let removed_at = vs
        .iter()
        .filter(|v| removed.contains(&v["id"].as_u64().unwrap_or(0)))
        .filter_map(|v| v["effect"]["time_ms"].as_u64())
        .min()
        .expect("a removed variant's verdict time");
    let later = r["plan"]
        .as_array()
        .expect("plan[]")
        .iter()
        .filter(|round| round["time_ms"].as_u64().is_some_and(|t| t > removed_at));
    for round in later {
        for region in round["regions"].as_array().into_iter().flatten() {
            if region["symbol"] == "step" {
                assert_eq!(region["decision"], "left alone", "{region}");
            }
        }
    }
}

#[test]
fn variants_that_follow_passes_inside_themselves_are_unmeasured_not_removed() {
    // interp_switch's variants follow the bytecode through the dispatch point and loop back to it: the stub
    // sees none of those passes, so its count says nothing about the work done.
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
    for v in vs.iter().filter(|v| !v["effect"].is_null()) {
        assert_eq!(v["effect"]["verdict"], "unmeasured", "{v}");
        assert!(v["effect"]["why"]
            .as_str()
            .is_some_and(|w| w.contains("trigger address")));
    }
    assert!(
        vs.iter().any(|v| !v["effect"].is_null()),
        "no verdict at all: {vs:?}"
    );
    assert!(vs.iter().any(|v| v["entries"].as_u64().unwrap_or(0) > 0));
}
