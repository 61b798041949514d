//! `dynspec report --html` in a real browser: real runs of two samples (one invalidated and specialized again),
//! their pages opened in headless Chromium, which must run the page's script without errors and show every
//! variant's original and specialized code side by side; a screenshot of each page is taken.
//!
//! Needs Debian's `chromium` (`apt-get install chromium`); without it the test fails saying so. Set
//! `DYNSPEC_SCREENSHOT=PATH` to keep the screenshot of the run with invalidations (docs/report-html.png is one).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{output_of, run_both, text, TempDir};

/// The browser: `DYNSPEC_CHROMIUM` or Debian's /usr/bin/chromium.
fn chromium() -> PathBuf {
    let p = std::env::var_os("DYNSPEC_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        p.is_file(),
        "{} not found: the HTML report's browser test needs Chromium; install it (apt-get install chromium) or \
         point DYNSPEC_CHROMIUM at it",
        p.display()
    );
    p
}

/// Headless Chromium on `page` with `args` (root needs --no-sandbox); its stdout.
fn browse(page: &Path, profile: &Path, args: &[String]) -> String {
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(args)
    .arg(format!("file://{}", page.display()))
    .env("HOME", profile);
    let out = output_of(cmd, None);
    assert!(
        out.status.success(),
        "chromium {args:?} failed ({}): {}",
        out.status,
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// The markup of variant `id`'s section in the rendered DOM.
fn section(dom: &str, id: u64) -> Option<&str> {
    let start = dom.find(&format!("id=\"variant-{id}\""))?;
    let len = dom[start..].find("</section>")?;
    Some(&dom[start..start + len])
}

/// Write the page of `report` with `dynspec report --html`, open it, check it, screenshot it; the screenshot's path.
fn check_page(report: &Path, r: &serde_json::Value, tmp: &TempDir) -> PathBuf {
    let out = output_of(
        {
            let mut c = Command::new(common::dynspec());
            c.arg("report").arg(report).arg("--html");
            c
        },
        None,
    );
    assert!(out.status.success(), "report --html: {}", text(&out.stderr));
    let page = report.with_extension("html");
    assert!(
        text(&out.stdout).contains(&page.display().to_string()),
        "report --html does not say where it wrote the page: {}",
        text(&out.stdout)
    );
    assert!(page.is_file(), "no page at {}", page.display());
    // An explicit FILE gets the same page; an unwritable one is a one-line error naming it.
    let explicit = tmp.join("explicit.html");
    let out = output_of(
        {
            let mut c = Command::new(common::dynspec());
            c.arg("report").arg(report).arg("--html").arg(&explicit);
            c
        },
        None,
    );
    assert!(
        out.status.success(),
        "report --html FILE: {}",
        text(&out.stderr)
    );
    assert_eq!(std::fs::read(&explicit).ok(), std::fs::read(&page).ok());
    let out = output_of(
        {
            let mut c = Command::new(common::dynspec());
            c.arg("report")
                .arg(report)
                .arg("--html")
                .arg("/nonexistent-dir/p.html");
            c
        },
        None,
    );
    let err = text(&out.stderr);
    assert!(
        !out.status.success()
            && err.starts_with("dynspec: error: cannot write /nonexistent-dir/p.html: ")
            && err.lines().count() == 1,
        "{err}"
    );
    let profile = tmp.join("chromium-profile");
    let dom = browse(&page, &profile, &["--dump-dom".into()]);
    assert!(
        !dom.contains("id=\"errors\""),
        "script errors in the page: {}",
        dom.find("id=\"errors\"")
            .map(|i| &dom[i..(i + 400).min(dom.len())])
            .unwrap_or("")
    );
    assert!(
        dom.contains("data-rendered=\"yes\""),
        "the page's script did not finish (no data-rendered marker); DOM starts: {}",
        &dom[..dom.len().min(400)]
    );
    let variants = r["variants"].as_array().expect("variants[]");
    assert!(
        dom.contains(&format!(
            "data-variants-shown=\"{}/{}\"",
            variants.len(),
            variants.len()
        )),
        "the page's script did not find both columns in every variant section"
    );
    for v in variants {
        let id = v["id"].as_u64().expect("variant id");
        let s = section(&dom, id).unwrap_or_else(|| panic!("variant #{id} is not on the page"));
        assert!(
            s.contains("<td class=\"orig\"") && s.contains("<td class=\"spec\""),
            "variant #{id} lacks a column: {}",
            &s[..s.len().min(600)]
        );
        // Both columns hold the variant's code: its first original instruction and its first residual line.
        let first_orig = v["original"][0]["asm"]
            .as_str()
            .expect("original code in the report");
        let first_code = v["code"]
            .as_array()
            .and_then(|c| c.iter().find(|l| l["kind"] == "code"))
            .and_then(|l| l["asm"].as_str())
            .expect("residual code in the report");
        for needle in [first_orig, first_code] {
            let shown = needle
                .replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;");
            assert!(s.contains(&shown), "variant #{id}: {needle:?} is not shown");
        }
    }
    let png = tmp.join("page.png");
    browse(
        &page,
        &profile,
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1400,2200".into(),
        ],
    );
    let bytes =
        std::fs::read(&png).unwrap_or_else(|e| panic!("no screenshot {}: {e}", png.display()));
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "the screenshot is not a PNG of a rendered page ({} bytes)",
        bytes.len()
    );
    png
}

/// A real run of `bin` (outputs compared with native) with variants, and with invalidations when `invalidated`;
/// one retry at `longer` when a loaded machine installed too late.
fn run(bin: &str, size: &str, longer: &str, invalidated: bool) -> (serde_json::Value, TempDir) {
    let ok = |r: &serde_json::Value| {
        let n = |k: &str| r[k].as_array().map_or(0, |a| a.len());
        n("variants") > 0 && (!invalidated || n("invalidations") > 0)
    };
    let (_, r, tmp) = run_both(bin, &[size], &[]);
    if ok(&r) {
        return (r, tmp);
    }
    eprintln!("{bin} {size}: not the run wanted; trying {longer}");
    let (_, r, tmp) = run_both(bin, &[longer], &[]);
    assert!(
        ok(&r),
        "{bin} {longer}: variants {} invalidations {}",
        r["variants"],
        r["invalidations"]
    );
    (r, tmp)
}

#[test]
fn report_pages_open_in_chromium_and_show_every_variant_side_by_side() {
    chromium();
    let (r, tmp) = run("interp_switch", "5000000", "20000000", false);
    check_page(&tmp.join("report.json"), &r, &tmp);
    let (r, tmp) = run("patch_once", "200000", "800000", true);
    let png = check_page(&tmp.join("report.json"), &r, &tmp);
    if let Some(keep) = std::env::var_os("DYNSPEC_SCREENSHOT") {
        std::fs::copy(&png, &keep).unwrap_or_else(|e| panic!("copy the screenshot: {e}"));
    }
}
