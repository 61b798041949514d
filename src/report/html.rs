//! `dynspec report --html`: the report as one self-contained page (inline CSS, a few lines of inline JS, no
//! network): hot regions as bar charts, a timeline, every variant's code side by side with the original, and the
//! planner's reasons.

mod side;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::{ExitStatusJson, Report, VariantJson};

/// The page's file name beside a report: `dynspec.report.json` -> `dynspec.report.html`.
pub fn default_html_path(report: &Path) -> PathBuf {
    match report.extension() {
        Some(e) if e == "json" => report.with_extension("html"),
        _ => {
            let mut s = report.as_os_str().to_owned();
            s.push(".html");
            PathBuf::from(s)
        }
    }
}

/// Text made safe for HTML element content and attribute values (symbols and code come from the target).
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// Milliseconds as seconds with three decimals.
fn secs(ms: u64) -> String {
    format!("{:.3} s", ms as f64 / 1000.0)
}

/// The page for `r`.
pub fn render_html(r: &Report) -> String {
    let mut o = String::new();
    // Writing into a String cannot fail.
    let _ = page(r, &mut o);
    o
}

const STYLE: &str = r#"
body{font:14px/1.4 system-ui,sans-serif;margin:0;padding:16px 24px;color:#1c1c1c;background:#fafafa}
h1{font-size:20px;margin:0 0 4px} h2{font-size:17px;margin:24px 0 8px;border-bottom:1px solid #ccc}
h3{font-size:15px;margin:16px 0 6px}
code,.mono,td.orig,td.spec,td.addr,pre{font-family:ui-monospace,"DejaVu Sans Mono",monospace;font-size:12px}
.facts{color:#444} .facts b{color:#111}
.bars{display:grid;grid-template-columns:minmax(160px,max-content) 1fr max-content;gap:3px 10px;align-items:center;max-width:1100px}
.bar{height:14px;background:#4a7bd0;border-radius:2px;min-width:1px} .bar.mod{background:#7a5bc0}
.bar.spec{background:#2e9e5b}
.why{color:#8a4b00} .none{color:#666;font-style:italic}
table{border-collapse:collapse} td,th{padding:1px 6px;vertical-align:top;text-align:left}
table.side{width:100%;max-width:1400px;table-layout:fixed;background:#fff;border:1px solid #ddd}
table.side th{background:#eee;position:sticky;top:0}
table.side col.a{width:9em} table.side col.o{width:40%}
tr.folded td.orig{color:#999;text-decoration:line-through;background:#f4f4f4}
tr.partial td.orig{background:#fff8e0} tr.kept td.orig{background:#eef8ee}
tr.outside td.orig{color:#777;font-style:italic}
tr.entry td.addr{border-left:4px solid #2060d0;font-weight:bold}
td.spec div{white-space:pre} td.orig{white-space:pre} .cnt{color:#888}
.exit{color:#b04000;font-weight:bold} .gone{color:#999;font-style:italic}
.tag{display:inline-block;padding:0 5px;border-radius:3px;font-size:11px;margin-left:4px;background:#ddd}
.tag.dead{background:#f3c0c0} .tag.live{background:#bfe6c8}
details{margin:4px 0} summary{cursor:pointer}
table.plan td{border-top:1px solid #e4e4e4} table.plan td.cand{padding-left:24px;color:#444}
table.listing td{padding:0 6px;white-space:pre} table.listing tr.label td{color:#2060d0}
table.listing tr.exit td{color:#b04000}
svg text{font-size:11px;font-family:system-ui,sans-serif}
#errors{color:#fff;background:#c00;padding:4px}
"#;

/// Records script errors into the page (read back by the browser test) before anything else runs.
const ERROR_HOOK: &str = r#"window.onerror=function(m,s,l){var e=document.getElementById('errors')||document.createElement('pre');e.id='errors';e.textContent+=m+' (line '+l+')\n';(document.body||document.documentElement).appendChild(e);};"#;

/// Checks every variant section has both columns, then marks the page as rendered (`data-rendered` on body).
const DONE: &str = r#"(function(){var vs=document.querySelectorAll('section.variant'),ok=0;for(var i=0;i<vs.length;i++){if(vs[i].querySelector('td.orig')&&vs[i].querySelector('td.spec'))ok++;}document.body.setAttribute('data-variants-shown',ok+'/'+vs.length);document.body.setAttribute('data-rendered','yes');})();"#;

fn page(r: &Report, o: &mut String) -> std::fmt::Result {
    let title = match (&r.command, r.pid) {
        (Some(argv), _) => super::shell_join(argv),
        (None, Some(pid)) => format!("pid {pid}"),
        (None, None) => "(unknown)".into(),
    };
    writeln!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
    )?;
    writeln!(o, "<title>dynspec report: {}</title>", esc(&title))?;
    writeln!(
        o,
        "<script>{ERROR_HOOK}</script>\n<style>{STYLE}</style></head><body>"
    )?;
    header(r, &title, o)?;
    hot_regions(r, o)?;
    timeline(r, o)?;
    why_not(r, o)?;
    variants(r, o)?;
    plan_rounds(r, o)?;
    writeln!(o, "<script>{DONE}</script>\n</body></html>")
}

fn header(r: &Report, title: &str, o: &mut String) -> std::fmt::Result {
    writeln!(o, "<h1>dynspec report: <code>{}</code></h1>", esc(title))?;
    let status = match r.exit_status {
        Some(ExitStatusJson::Code(c)) => format!("exited with code {c}"),
        Some(ExitStatusJson::Signal(s)) => {
            format!("killed by signal {s} ({})", super::signal_name(s))
        }
        None => "still running (detached)".into(),
    };
    let alive = r.variants.iter().filter(|v| !v.invalidated).count();
    let t = &r.timings;
    writeln!(
        o,
        "<p class=\"facts\">{}; <b>{}</b> samples at {} Hz ({} lost) over <b>{}</b>; <b>{}</b> variant{} \
         installed ({} alive at the end), {} invalidation{}; profile {} ms, specialize {} ms, install {} ms, \
         first sample to first install {}</p>",
        esc(&status),
        r.samples,
        r.rate_hz,
        r.lost_samples,
        secs(r.duration_ms),
        r.variants.len(),
        if r.variants.len() == 1 { "" } else { "s" },
        alive,
        r.invalidations.len(),
        if r.invalidations.len() == 1 { "" } else { "s" },
        t.profile_ms,
        t.specialize_ms,
        t.install_ms,
        t.first_install_ms
            .map(|ms| format!("{ms} ms"))
            .unwrap_or_else(|| "-".into()),
    )
}

/// The last path component of a module (the full path is in the tooltip).
fn short_module(m: &str) -> &str {
    m.rsplit('/').next().unwrap_or(m)
}

fn bar_row(
    o: &mut String,
    label: &str,
    tip: &str,
    share: f64,
    class: &str,
    right: &str,
) -> std::fmt::Result {
    let pct = (share * 100.0).clamp(0.0, 100.0);
    writeln!(
        o,
        "<span title=\"{}\">{}</span><div><div class=\"bar {class}\" style=\"width:{pct:.2}%\"></div></div>\
         <span>{right}</span>",
        esc(tip),
        esc(label)
    )
}

fn hot_regions(r: &Report, o: &mut String) -> std::fmt::Result {
    writeln!(o, "<h2>Hot regions</h2>")?;
    if r.hot_regions.is_empty() {
        return writeln!(o, "<p class=\"none\">none (no samples in user code)</p>");
    }
    writeln!(
        o,
        "<h3>Samples by function</h3><div class=\"bars\" id=\"by-function\">"
    )?;
    for h in r.hot_regions.iter().take(24) {
        let name = h
            .symbol
            .clone()
            .unwrap_or_else(|| format!("[{}..{})", h.start, h.end));
        let spec = r.variants.iter().any(|v| v.region.start == h.start);
        // Samples in the code arena are time spent in variants.
        let arena = r
            .variants
            .iter()
            .any(|v| v.code_address.is_some_and(|a| h.start <= a && a < h.end));
        let tip = format!("{} [{}..{}) in {}", name, h.start, h.end, h.module);
        let right = format!(
            "{:.1}% · {} samples{}",
            h.share * 100.0,
            h.samples,
            if spec {
                " · <span class=\"tag live\">specialized</span>"
            } else if arena {
                " · <span class=\"tag\">variants' code (dynspec)</span>"
            } else {
                ""
            }
        );
        bar_row(
            o,
            &name,
            &tip,
            h.share,
            if spec { "spec" } else { "" },
            &right,
        )?;
    }
    writeln!(o, "</div>")?;
    if r.hot_regions.len() > 24 {
        writeln!(
            o,
            "<p class=\"none\">… {} more regions</p>",
            r.hot_regions.len() - 24
        )?;
    }
    let mut by_module: BTreeMap<&str, u64> = BTreeMap::new();
    for h in &r.hot_regions {
        *by_module.entry(h.module.as_str()).or_default() += h.samples;
    }
    let mut mods: Vec<(&str, u64)> = by_module.into_iter().collect();
    mods.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    writeln!(
        o,
        "<h3>Samples by module (hot regions)</h3><div class=\"bars\" id=\"by-module\">"
    )?;
    let total = r.samples.max(1) as f64;
    for (m, n) in mods {
        let share = n as f64 / total;
        let right = format!("{:.1}% · {n} samples", share * 100.0);
        bar_row(o, short_module(m), m, share, "mod", &right)?;
    }
    writeln!(o, "</div>")
}

/// One event on the timeline.
#[derive(Clone, Debug, PartialEq)]
enum Event {
    Round { samples: u64, installed: u64 },
    Install { ids: Vec<u64>, what: String },
    Invalidation { page: String, ids: Vec<u64> },
}

/// Plan rounds, installs (variants of one region installed at the same time are one event) and invalidations,
/// in time order.
fn events(r: &Report) -> Vec<(u64, Event)> {
    let mut ev: Vec<(u64, Event)> = Vec::new();
    for p in &r.plan {
        ev.push((
            p.time_ms,
            Event::Round {
                samples: p.samples,
                installed: p.installed,
            },
        ));
    }
    let mut installs: BTreeMap<(u64, u64), (Vec<u64>, String)> = BTreeMap::new();
    for v in &r.variants {
        let Some(t) = v.installed_ms else { continue };
        let e = installs
            .entry((t, v.region.start.0))
            .or_insert_with(|| (Vec::new(), region_name(v)));
        e.0.push(v.id);
    }
    for ((t, _), (ids, what)) in installs {
        ev.push((t, Event::Install { ids, what }));
    }
    for i in &r.invalidations {
        ev.push((
            i.time_ms,
            Event::Invalidation {
                page: i.page.to_string(),
                ids: i.variants.clone(),
            },
        ));
    }
    ev.sort_by_key(|(t, e)| {
        let rank = match e {
            Event::Round { .. } => 0,
            Event::Install { .. } => 1,
            Event::Invalidation { .. } => 2,
        };
        (*t, rank)
    });
    ev
}

fn region_name(v: &VariantJson) -> String {
    v.region
        .symbol
        .clone()
        .unwrap_or_else(|| format!("[{}..{})", v.region.start, v.region.end))
}

fn ids_text(ids: &[u64]) -> String {
    if ids.is_empty() {
        return "nothing".into();
    }
    let mut s: Vec<String> = ids.iter().take(12).map(|i| format!("#{i}")).collect();
    if ids.len() > 12 {
        s.push(format!("… ({} more)", ids.len() - 12));
    }
    s.join(" ")
}

fn event_text(e: &Event) -> String {
    match e {
        Event::Round { samples, installed } => format!(
            "plan round on {samples} samples: {installed} region{} installed",
            if *installed == 1 { "" } else { "s" }
        ),
        Event::Install { ids, what } => format!("installed {} ({})", ids_text(ids), what),
        Event::Invalidation { page, ids } => {
            format!("page {page} written: dropped {}", ids_text(ids))
        }
    }
}

fn timeline(r: &Report, o: &mut String) -> std::fmt::Result {
    writeln!(o, "<h2>Timeline</h2>")?;
    let ev = events(r);
    if ev.is_empty() {
        return writeln!(
            o,
            "<p class=\"none\">no plan rounds, installs or invalidations</p>"
        );
    }
    let end = ev
        .iter()
        .map(|(t, _)| *t)
        .chain([r.duration_ms])
        .max()
        .unwrap_or(0)
        .max(1);
    let (w, left) = (1000.0, 90.0);
    let x = |t: u64| left + (w - left - 10.0) * t as f64 / end as f64;
    writeln!(
        o,
        "<svg id=\"timeline\" viewBox=\"0 0 {w} 96\" width=\"100%\" style=\"max-width:1100px;background:#fff;border:1px solid #ddd\">"
    )?;
    for (y, label) in [(18, "plan rounds"), (42, "installs"), (66, "invalidations")] {
        writeln!(o, "<text x=\"4\" y=\"{}\">{label}</text>", y + 4)?;
        writeln!(
            o,
            "<line x1=\"{left}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#eee\"/>",
            w - 10.0
        )?;
    }
    for k in 0..=4u64 {
        let t = end * k / 4;
        writeln!(
            o,
            "<text x=\"{:.1}\" y=\"90\" text-anchor=\"middle\">{}</text>",
            x(t),
            secs(t)
        )?;
    }
    for (t, e) in &ev {
        let tip = esc(&format!("{}: {}", secs(*t), event_text(e)));
        let cx = x(*t);
        match e {
            Event::Round { installed, .. } => writeln!(
                o,
                "<circle cx=\"{cx:.1}\" cy=\"18\" r=\"5\" fill=\"{}\"><title>{tip}</title></circle>",
                if *installed > 0 { "#2060d0" } else { "#9ab" }
            )?,
            Event::Install { .. } => writeln!(
                o,
                "<rect x=\"{:.1}\" y=\"36\" width=\"8\" height=\"12\" fill=\"#2e9e5b\"><title>{tip}</title></rect>",
                cx - 4.0
            )?,
            Event::Invalidation { .. } => writeln!(
                o,
                "<line x1=\"{cx:.1}\" y1=\"58\" x2=\"{cx:.1}\" y2=\"74\" stroke=\"#c03030\" stroke-width=\"3\"><title>{tip}</title></line>"
            )?,
        }
    }
    writeln!(o, "</svg>")?;
    writeln!(
        o,
        "<details><summary>{} events</summary><table id=\"events\">",
        ev.len()
    )?;
    for (t, e) in ev.iter().take(400) {
        writeln!(
            o,
            "<tr><td class=\"mono\">{}</td><td>{}</td></tr>",
            secs(*t),
            esc(&event_text(e))
        )?;
    }
    if ev.len() > 400 {
        writeln!(o, "<tr><td></td><td>… ({} more)</td></tr>", ev.len() - 400)?;
    }
    writeln!(o, "</table></details>")
}

fn why_not(r: &Report, o: &mut String) -> std::fmt::Result {
    let lines: Vec<(String, String)> = r
        .hot_regions
        .iter()
        .filter_map(|h| {
            let why = r.why_not_specialized(h)?;
            let name = h
                .symbol
                .clone()
                .unwrap_or_else(|| format!("[{}..{})", h.start, h.end));
            Some((name, why))
        })
        .collect();
    if lines.is_empty() {
        return Ok(());
    }
    writeln!(o, "<h2>Hot regions left alone, and why</h2><ul id=\"why\">")?;
    for (name, why) in lines.iter().take(64) {
        writeln!(
            o,
            "<li><code>{}</code>: <span class=\"why\">{}</span></li>",
            esc(name),
            esc(why)
        )?;
    }
    writeln!(o, "</ul>")
}

fn variants(r: &Report, o: &mut String) -> std::fmt::Result {
    writeln!(
        o,
        "<h2>Variants: original and specialized code side by side</h2>"
    )?;
    if r.variants.is_empty() {
        let why = match (&r.not_planned, r.plan.is_empty()) {
            (Some(why), _) => why.clone(),
            (None, true) => "no planning round happened".into(),
            (None, false) => "the planner installed nothing (its reasons are below)".into(),
        };
        return writeln!(
            o,
            "<p class=\"none\" id=\"no-variants\">No variants were installed: {}.</p>",
            esc(&why)
        );
    }
    writeln!(
        o,
        "<p class=\"facts\">Rows are original addresses. Left: the original instruction (struck through: folded \
         away in every copy; yellow: kept in some copies; green: kept). Right: the variant's code for it \
         (×N: N copies; \"join\": a jump into code already emitted or values written back before the \
         instruction, not its own code), and its <span class=\"exit\">exits</span> back to the original code. The blue edge is \
         the entry (the dispatch stub).</p>"
    )?;
    // An index first: which variants mattered (entries) and where each one's code is.
    writeln!(
        o,
        "<table class=\"plan\" id=\"variant-index\"><tr><th>variant</th><th>region</th><th>when</th>\
         <th>entries</th><th>folded / emitted</th><th>guard pages</th><th></th></tr>"
    )?;
    for v in &r.variants {
        let when = match (&v.trigger, v.value) {
            (Some(t), Some(val)) => format!("{} = {}", t.register, val),
            _ => "always".into(),
        };
        writeln!(
            o,
            "<tr><td><a href=\"#variant-{}\">#{}</a></td><td><code>{}</code></td><td class=\"mono\">{}</td>\
             <td>{}</td><td>{} / {}</td><td>{}</td><td>{}</td></tr>",
            v.id,
            v.id,
            esc(&region_name(v)),
            esc(&when),
            v.entries,
            v.folded,
            v.residual,
            v.guard_pages.len(),
            if v.invalidated { "invalidated" } else { "alive" }
        )?;
    }
    writeln!(o, "</table>")?;
    for v in &r.variants {
        side::variant(r, v, o)?;
    }
    Ok(())
}

fn plan_rounds(r: &Report, o: &mut String) -> std::fmt::Result {
    writeln!(o, "<h2>Plan rounds</h2>")?;
    if r.plan.is_empty() {
        let why = r
            .not_planned
            .as_deref()
            .unwrap_or("no planning round happened");
        return writeln!(o, "<p class=\"none\">{}</p>", esc(why));
    }
    let last = r.plan.len() - 1;
    for (i, round) in r.plan.iter().enumerate() {
        writeln!(
            o,
            "<details{}><summary>at {} on {} samples: {} region{} installed</summary><table class=\"plan\">",
            if i == last { " open" } else { "" },
            secs(round.time_ms),
            round.samples,
            round.installed,
            if round.installed == 1 { "" } else { "s" }
        )?;
        for reg in &round.regions {
            let name = reg
                .symbol
                .clone()
                .unwrap_or_else(|| format!("[{}..{})", reg.start, reg.end));
            writeln!(
                o,
                "<tr><td><code>{}</code> {:.1}%</td><td>{}</td><td class=\"why\">{}</td></tr>",
                esc(&name),
                reg.share * 100.0,
                esc(&reg.decision),
                esc(reg.reason.as_deref().unwrap_or(""))
            )?;
            for c in reg.candidates.iter().take(8) {
                let folded = c
                    .folded
                    .as_ref()
                    .map(|f| {
                        format!(
                            ", folded {} of {} ({} loads, {} branches)",
                            f.instructions, f.visited, f.loads, f.branches
                        )
                    })
                    .unwrap_or_default();
                writeln!(
                    o,
                    "<tr><td class=\"cand\"><code>{} at {}</code>, {} samples, {} distinct{}</td><td>{}</td>\
                     <td class=\"why\">{}</td></tr>",
                    esc(&c.register),
                    c.address,
                    c.samples,
                    c.distinct,
                    esc(&folded),
                    esc(&c.decision),
                    esc(c.reason.as_deref().unwrap_or(""))
                )?;
            }
        }
        writeln!(o, "</table></details>")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
