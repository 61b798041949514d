//! Unit tests of the HTML page: escaping, every variant shown side by side, reasons when nothing was installed.

use super::*;
use crate::report::code::{CodeKind, CodeLineJson, OriginalLineJson};
use crate::report::plan::{PlanRegionJson, PlanRoundJson};
use crate::report::{
    Hex, HotRegionJson, InvalidationJson, RegionRefJson, StoreProfileJson, Timings, TriggerRefJson,
    REPORT_VERSION,
};

fn line(orig: u64, asm: &str, kind: CodeKind, exit: Option<u64>) -> CodeLineJson {
    CodeLineJson {
        orig: Hex(orig),
        asm: asm.into(),
        kind,
        exit_target: exit.map(Hex),
        exit_reason: exit.map(|_| "left the region".into()),
    }
}

fn orig(address: u64, asm: &str, visits: u32, emitted: u32) -> OriginalLineJson {
    OriginalLineJson {
        address: Hex(address),
        asm: asm.into(),
        visits,
        emitted,
    }
}

fn variant(id: u64, symbol: &str) -> VariantJson {
    VariantJson {
        id,
        region: RegionRefJson {
            start: Hex(0x1000),
            end: Hex(0x1100),
            symbol: Some(symbol.into()),
        },
        trigger: Some(TriggerRefJson {
            address: Hex(0x1000),
            register: "rdi".into(),
        }),
        value: Some(Hex(0x5000 + id)),
        code_bytes: 40,
        code_address: Some(Hex(0x7f00_0000_0000)),
        folded: 1,
        residual: 3,
        guard_pages: vec![Hex(0x5000)],
        entries: 7,
        invalidated: id == 1,
        forwards_stores: false,
        asm: vec!["add rax, rdx".into(), "jmp 0x1100".into()],
        code: vec![
            line(0x1000, "L0:", CodeKind::Label, None),
            line(0x1000, "jmp L0", CodeKind::Join, None),
            line(0x1004, "add rax, rdx", CodeKind::Code, None),
            line(0x1100, "mov esi, 7", CodeKind::ExitSetup, None),
            line(0x1100, "jmp 0x1100", CodeKind::Exit, Some(0x1100)),
        ],
        original: vec![
            orig(0x1000, "mov rax, [rdi]", 2, 0),
            orig(0x1004, "add rax, rdx", 2, 1),
        ],
        effect: None,
        installed_ms: Some(120),
    }
}

fn report() -> Report {
    Report {
        version: REPORT_VERSION,
        command: Some(vec!["prog".into(), "a<b".into()]),
        pid: None,
        exit_status: Some(ExitStatusJson::Code(0)),
        killed_by_dynspec: false,
        samples: 1000,
        lost_samples: 0,
        rate_hz: 1999,
        duration_ms: 2000,
        hot_regions: vec![
            HotRegionJson {
                module: "/bin/prog".into(),
                symbol: Some("run".into()),
                start: Hex(0x1000),
                end: Hex(0x1100),
                samples: 900,
                share: 0.9,
                triggers: Vec::new(),
            },
            HotRegionJson {
                module: "/lib/libc.so.6".into(),
                symbol: Some("memcpy".into()),
                start: Hex(0x9000),
                end: Hex(0x9100),
                samples: 50,
                share: 0.05,
                triggers: Vec::new(),
            },
        ],
        store_profile: StoreProfileJson::default(),
        timings: Timings::default(),
        variants: vec![variant(1, "run"), variant(2, "run")],
        invalidations: vec![InvalidationJson {
            page: Hex(0x5000),
            time_ms: 800,
            variants: vec![1],
        }],
        plan: vec![PlanRoundJson {
            time_ms: 110,
            samples: 200,
            installed: 1,
            regions: vec![
                PlanRegionJson {
                    start: Hex(0x1000),
                    end: Hex(0x1100),
                    symbol: Some("run".into()),
                    share: 0.9,
                    decision: "installed".into(),
                    reason: None,
                    candidates: Vec::new(),
                },
                PlanRegionJson {
                    start: Hex(0x9000),
                    end: Hex(0x9100),
                    symbol: Some("memcpy".into()),
                    share: 0.05,
                    decision: "left alone".into(),
                    reason: Some("folds no memory read".into()),
                    candidates: Vec::new(),
                },
            ],
        }],
        not_planned: None,
        overhead: crate::overhead::OverheadJson::default(),
        measurement: Default::default(),
    }
}

/// The text of the section of variant `id` (up to its closing tag).
fn section(page: &str, id: u64) -> &str {
    let start = page
        .find(&format!("<section class=\"variant\" id=\"variant-{id}\""))
        .unwrap_or_else(|| panic!("no section for variant {id}"));
    let len = page[start..].find("</section>").expect("section closed");
    &page[start..start + len]
}

#[test]
fn target_text_is_escaped() {
    let mut r = report();
    r.variants[0].region.symbol = Some("<script>alert('x')</script>".into());
    r.variants[0].original[1].asm = "cmp al, '<' & \"q\"".into();
    r.hot_regions[1].symbol = Some("f<i>".into());
    let page = render_html(&r);
    assert!(!page.contains("<script>alert"), "unescaped symbol");
    assert!(page.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;"));
    assert!(page.contains("cmp al, &#39;&lt;&#39; &amp; &quot;q&quot;"));
    assert!(page.contains("f&lt;i&gt;") && !page.contains("f<i>"));
    assert!(
        page.contains("<code>prog &#39;a&lt;b&#39;</code>"),
        "command"
    );
    assert_eq!(esc("a&b<>\"'"), "a&amp;b&lt;&gt;&quot;&#39;");
}

#[test]
fn every_variant_is_shown_side_by_side() {
    let page = render_html(&report());
    for id in [1, 2] {
        let s = section(&page, id);
        assert!(s.contains("<td class=\"orig\""), "{s}");
        assert!(s.contains("<td class=\"spec\">"), "{s}");
        // 0x1000 was folded in every copy and is the entry; 0x1004 kept in one of two; 0x1100 is an exit.
        assert!(
            s.contains("<tr class=\"folded entry\"><td class=\"addr\">0x1000</td>"),
            "{s}"
        );
        assert!(s.contains("— folded away"), "{s}");
        assert!(s.contains("(join) jmp L0"), "{s}");
        assert!(
            s.contains("<tr class=\"partial\"><td class=\"addr\">0x1004</td>"),
            "{s}"
        );
        assert!(s.contains("(outside the region)"), "{s}");
        assert!(s.contains("⇥ exit → 0x1100 (left the region)"), "{s}");
        assert!(s.contains("(before exit) mov esi, 7"), "{s}");
        assert!(s.contains("0x5000"), "guard page: {s}");
        assert!(s.contains("entered <b>7</b> times"), "{s}");
    }
    assert!(section(&page, 1).contains("invalidated at 0.800 s (page 0x5000 written)"));
    assert!(
        page.contains("<td><a href=\"#variant-2\">#2</a></td>"),
        "index"
    );
    assert!(!section(&page, 2).contains("invalidated at"));
    // Self-contained: no external resources.
    assert!(!page.contains("src=") && !page.contains("<link") && !page.contains("http"));
    assert!(
        page.match_indices("href=\"")
            .all(|(i, _)| page[i + 6..].starts_with('#')),
        "only links within the page"
    );
    assert!(page.contains("data-rendered"), "the done marker");
}

#[test]
fn timeline_orders_rounds_installs_and_invalidations() {
    let ev = events(&report());
    let texts: Vec<(u64, String)> = ev.iter().map(|(t, e)| (*t, event_text(e))).collect();
    assert_eq!(
        texts,
        vec![
            (
                110,
                "plan round on 200 samples: 1 region installed".to_string()
            ),
            (120, "installed #1 #2 (run)".to_string()),
            (800, "page 0x5000 written: dropped #1".to_string()),
        ]
    );
    let page = render_html(&report());
    assert!(page.contains("<svg id=\"timeline\""));
}

#[test]
fn regions_left_alone_say_why() {
    let page = render_html(&report());
    assert!(
        page.contains(
            "<li><code>memcpy</code>: <span class=\"why\">folds no memory read</span></li>"
        ),
        "{page}"
    );
    // Samples by function and by module.
    assert!(page.contains("id=\"by-function\"") && page.contains("id=\"by-module\""));
    assert!(page.contains(">libc.so.6</span>"));
    // Samples in the code arena are the variants' own.
    let mut r = report();
    r.hot_regions[1].start = Hex(0x7f00_0000_0000);
    r.hot_regions[1].end = Hex(0x7f00_0000_1000);
    assert!(render_html(&r).contains("variants' code (dynspec)"));
}

#[test]
fn a_report_without_variants_says_why() {
    let mut r = report();
    r.variants.clear();
    r.invalidations.clear();
    r.plan.clear();
    r.not_planned = Some("--profile-only: nothing is planned".into());
    let page = render_html(&r);
    assert!(
        page.contains("No variants were installed: --profile-only: nothing is planned."),
        "{page}"
    );
    assert!(!page.contains("<section class=\"variant\""));
    assert!(page.contains(
        "<code>run</code>: <span class=\"why\">--profile-only: nothing is planned</span>"
    ));
}

#[test]
fn an_old_report_without_listings_still_shows_both_columns() {
    let mut r = report();
    r.variants[0].code.clear();
    r.variants[0].original.clear();
    let page = render_html(&r);
    let s = section(&page, 1);
    assert!(
        s.contains("(original code not recorded in this report)"),
        "{s}"
    );
    assert!(
        s.contains("<td class=\"spec\">") && s.contains("add rax, rdx"),
        "{s}"
    );
}

#[test]
fn the_page_goes_beside_the_report() {
    assert_eq!(
        default_html_path(Path::new("dir/dynspec.report.json")),
        PathBuf::from("dir/dynspec.report.html")
    );
    assert_eq!(default_html_path(Path::new("r")), PathBuf::from("r.html"));
}
