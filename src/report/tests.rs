//! Tests of the report: round trips, rendering, loading errors.

use super::*;

fn sample_report() -> Report {
    Report {
        version: REPORT_VERSION,
        command: Some(vec!["samples/build/interp".into(), "100".into()]),
        pid: None,
        exit_status: Some(ExitStatusJson::Code(3)),
        killed_by_dynspec: false,
        samples: 1234,
        lost_samples: 2,
        rate_hz: 4999,
        duration_ms: 1500,
        hot_regions: vec![HotRegionJson {
            module: "/bin/interp".into(),
            symbol: Some("interp_run".into()),
            start: Hex(0x401000),
            end: Hex(0x401200),
            samples: 1200,
            share: 0.97,
            triggers: vec![TriggerJson {
                address: Hex(0x401040),
                register: "rbx".into(),
                samples: 300,
                distinct: 12,
                coverage: 1.0,
                top_values: vec![TopValueJson {
                    value: Hex(0x5555_0000_1000),
                    share: 0.25,
                }],
            }],
        }],
        store_profile: StoreProfileJson {
            pages_watched: 2,
            pages_written: 1,
            pages_read_only: 1,
            watched: vec![Hex(0x5555_0000_1000), Hex(0x5555_0000_2000)],
            written: vec![Hex(0x5555_0000_2000)],
            method: MethodCounts {
                uffd: 2,
                mprotect: 0,
            },
        },
        timings: Timings {
            profile_ms: 600,
            ..Timings::default()
        },
        variants: Vec::new(),
        invalidations: Vec::new(),
        plan: vec![PlanRoundJson {
            time_ms: 110,
            samples: 200,
            installed: 0,
            regions: vec![plan::PlanRegionJson {
                start: Hex(0x401000),
                end: Hex(0x401200),
                symbol: Some("interp_run".into()),
                share: 0.97,
                decision: "left alone".into(),
                reason: Some("folds no memory read".into()),
                candidates: vec![plan::PlanCandidateJson {
                    address: Hex(0x401040),
                    register: "rbx".into(),
                    samples: 300,
                    distinct: 12,
                    values: vec![plan::PlanValueJson {
                        value: Hex(0x5555_0000_1000),
                        samples: 75,
                    }],
                    folded: Some(plan::FoldedJson {
                        visited: 40,
                        instructions: 10,
                        loads: 0,
                        branches: 2,
                        residual: 30,
                    }),
                    estimate: None,
                    decision: "not installed".into(),
                    reason: Some("folds no memory read".into()),
                }],
            }],
        }],
        not_planned: None,
        overhead: crate::overhead::OverheadJson::default(),
        measurement: Default::default(),
    }
}

#[test]
fn regions_without_variants_say_why() {
    let mut r = sample_report();
    let text = r.render();
    assert!(text.contains("why: folds no memory read"), "{text}");
    assert!(
        text.contains("plan:\n  at 0.110 s on 200 samples: 0 regions installed"),
        "{text}"
    );
    assert!(
        text.contains("interp_run: left alone: folds no memory read"),
        "{text}"
    );
    // No planning round at all: the report's own reason.
    r.plan.clear();
    r.not_planned = Some("the program ended before the first planning round".into());
    let text = r.render();
    assert!(
        text.contains("why: the program ended before the first planning round"),
        "{text}"
    );
    assert!(!text.contains("plan:"));
}

#[test]
fn json_round_trip_and_exact_keys() {
    let r = sample_report();
    let text = r.to_json();
    assert_eq!(Report::parse(Path::new("x"), &text).expect("parses"), r);
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    let keys: Vec<&str> = v
        .as_object()
        .expect("object")
        .keys()
        .map(|k| k.as_str())
        .collect();
    for k in [
        "version",
        "command",
        "exit_status",
        "samples",
        "lost_samples",
        "rate_hz",
        "duration_ms",
        "hot_regions",
        "store_profile",
        "timings",
    ] {
        assert!(keys.contains(&k), "missing key {k}");
    }
    assert!(!keys.contains(&"pid"));
    assert_eq!(v["exit_status"]["code"], 3);
    assert_eq!(v["hot_regions"][0]["start"], "0x401000");
    assert_eq!(
        v["hot_regions"][0]["triggers"][0]["top_values"][0]["value"],
        "0x555500001000"
    );
    assert_eq!(v["store_profile"]["method"]["uffd"], 2);
    assert_eq!(v["timings"]["profile_ms"], 600);
}

#[test]
fn attach_mode_has_pid_and_null_status() {
    let mut r = sample_report();
    r.command = None;
    r.pid = Some(42);
    r.exit_status = None;
    let v: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
    assert_eq!(v["pid"], 42);
    assert!(v["exit_status"].is_null());
    assert!(v.get("command").is_none());
    assert!(r.render().contains("pid 42"));
}

#[test]
fn rendering_names_the_key_facts() {
    let text = sample_report().render();
    for needle in [
        "samples/build/interp 100",
        "exited with code 3",
        "1234",
        "97.0%",
        "interp_run",
        "/bin/interp",
        "0x401040",
        "rbx",
        "12 distinct",
        "100%",
        "0x555500001000",
        "2 pages watched",
        "1 written",
    ] {
        assert!(text.contains(needle), "rendering lacks {needle:?}:\n{text}");
    }
}

#[test]
fn corrupt_report_names_the_line() {
    let err = Report::parse(Path::new("r.json"), "{\n\"version\": 1,\n oops").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ReportError::BadJson { line: 3, .. }), "{msg}");
    assert!(
        msg.starts_with("report r.json is not a dynspec report (bad JSON at line 3:"),
        "{msg}"
    );
}

#[test]
fn wrong_shape_and_missing_version_are_errors() {
    let err = Report::parse(Path::new("r.json"), "{\"version\": 1}").unwrap_err();
    assert!(matches!(err, ReportError::Schema { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("\"exit_status\" is a required property (and 10 more)"),
        "{err}"
    );
    let err = Report::parse(Path::new("r.json"), "[1,2]").unwrap_err();
    assert!(matches!(err, ReportError::NoVersion { .. }), "{err}");
}

#[test]
fn unknown_version_is_refused() {
    let mut v: serde_json::Value = serde_json::from_str(&sample_report().to_json()).expect("json");
    v["version"] = serde_json::json!(7);
    let err = Report::parse(Path::new("r.json"), &v.to_string()).unwrap_err();
    assert!(matches!(
        err,
        ReportError::UnsupportedVersion { version: 7, .. }
    ));
    assert!(err.to_string().contains("version 7"));
}

#[test]
fn missing_report_says_run_first() {
    let err = Report::load(Path::new("/nonexistent/dir/r.json")).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ReportError::Missing { .. }), "{msg}");
    assert!(
        msg.starts_with("no report at /nonexistent/dir/r.json"),
        "{msg}"
    );
    assert!(msg.contains("run `dynspec run -- PROGRAM` first"), "{msg}");
}

#[test]
fn unreadable_report_names_the_cause_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = Report::load(dir.path()).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, ReportError::Unreadable { .. }), "{msg}");
    // The cause is in the message and not a source too (the binary prints the chain: it would repeat).
    assert!(std::error::Error::source(&err).is_none(), "{msg}");
    assert!(
        !msg.contains("dynspec run"),
        "not missing, so not 'run first': {msg}"
    );
}

/// A valid report's JSON with `edit` applied, parsed.
fn parse_edited(edit: impl FnOnce(&mut serde_json::Value)) -> Result<Report, ReportError> {
    let mut r = sample_report();
    r.variants.push(VariantJson {
        id: 1,
        region: RegionRefJson {
            start: Hex(0x401000),
            end: Hex(0x401200),
            symbol: Some("interp_run".into()),
        },
        trigger: Some(TriggerRefJson {
            address: Hex(0x401040),
            register: "rbx".into(),
        }),
        value: Some(Hex(0x5555_0000_1000)),
        code_bytes: 120,
        code_address: None,
        folded: 30,
        residual: 12,
        guard_pages: vec![Hex(0x5555_0000_1000)],
        entries: 5,
        invalidated: false,
        forwards_stores: false,
        asm: vec!["ret".into()],
        code: Vec::new(),
        original: Vec::new(),
        effect: None,
        installed_ms: Some(110),
    });
    let mut v: serde_json::Value = serde_json::from_str(&r.to_json()).expect("json");
    edit(&mut v);
    Report::parse(Path::new("r.json"), &v.to_string())
}

#[test]
fn the_sample_report_matches_the_schema() {
    parse_edited(|_| {}).expect("a report this build writes is accepted");
}

#[test]
fn a_missing_key_is_refused_by_name() {
    for key in ["samples", "exit_status", "plan", "variants"] {
        let err = parse_edited(|v| {
            v.as_object_mut().expect("object").remove(key);
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, ReportError::Schema { .. }), "{key}: {msg}");
        assert!(
            msg.contains(&format!("\"{key}\" is a required property")),
            "{msg}"
        );
    }
    let err = parse_edited(|v| {
        v["variants"][0]
            .as_object_mut()
            .expect("variant")
            .remove("code_address");
    })
    .unwrap_err();
    assert!(
        err.to_string().contains("at /variants/0: \"code_address\""),
        "{err}"
    );
}

#[test]
fn a_wrong_value_is_refused_with_where_it_is() {
    let err =
        parse_edited(|v| v["variants"][0]["entries"] = serde_json::json!("many")).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("at /variants/0/entries: "), "{msg}");
    let err =
        parse_edited(|v| v["hot_regions"][0]["start"] = serde_json::json!("401000")).unwrap_err();
    assert!(
        err.to_string().contains("at /hot_regions/0/start: "),
        "{err}"
    );
    assert!(!err.to_string().contains('\n'));
}

#[test]
fn write_is_atomic_and_keeps_old() {
    let tmp = tempfile::tempdir().expect("tmpdir");
    let dir = tmp.path();
    let path = dir.join("r.json");
    let mut r = sample_report();
    r.write(&path).expect("write 1");
    r.samples = 99;
    r.write(&path).expect("write 2");
    assert_eq!(Report::load(&path).expect("load").samples, 99);
    assert_eq!(
        Report::load(&dir.join("r.json.old")).expect("old").samples,
        1234
    );
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .expect("readdir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".tmp."))
        .collect();
    assert!(leftovers.is_empty());
}

#[test]
fn write_into_a_device_does_not_rename_it() {
    sample_report()
        .write(Path::new("/dev/null"))
        .expect("write to /dev/null");
    assert!(Path::new("/dev/null").exists());
    assert!(!Path::new("/dev/null.old").exists());
}

#[test]
fn hex_rejects_non_hex() {
    assert!(serde_json::from_str::<Hex>("\"12\"").is_err());
    assert!(serde_json::from_str::<Hex>("\"0xzz\"").is_err());
    assert_eq!(
        serde_json::from_str::<Hex>("\"0xff\"").expect("hex"),
        Hex(255)
    );
}

#[test]
fn counts_of_one_are_singular() {
    let mut r = sample_report();
    r.samples = 1;
    r.hot_regions[0].samples = 1;
    r.hot_regions[0].triggers[0].samples = 1;
    r.store_profile.pages_watched = 1;
    let text = r.render();
    assert!(text.contains("samples:   1 sample at"), "{text}");
    assert!(text.contains(")  1 sample\n"), "{text}");
    assert!(text.contains("% of 1 sample:"), "{text}");
    assert!(text.contains("store profile: 1 page watched"), "{text}");
    assert!(
        !text.contains(" 1 samples") && !text.contains(" 1 entries"),
        "{text}"
    );
    assert_eq!(count(2, "entry", "entries"), "2 entries");
    assert_eq!(count(0, "entry", "entries"), "0 entries");
}
