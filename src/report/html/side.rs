//! One variant's section of the page: its facts, and its original and specialized code side by side, one row per
//! original address.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{esc, region_name, secs};
use crate::report::code::{CodeKind, OriginalLineJson};
use crate::report::{Report, VariantJson};

/// Rows of the side-by-side table kept per variant, distinct lines shown per row, and emission-order lines shown.
const MAX_ROWS: usize = 1500;
const MAX_PER_ROW: usize = 6;
const MAX_LISTING: usize = 600;

/// Distinct lines in first-seen order, with how often each occurs.
#[derive(Default, Debug)]
struct Counted(Vec<(String, usize)>);

impl Counted {
    fn add(&mut self, s: String) {
        match self.0.iter_mut().find(|(t, _)| *t == s) {
            Some((_, n)) => *n += 1,
            None => self.0.push((s, 1)),
        }
    }
}

/// Everything shown at one original address.
#[derive(Default, Debug)]
struct Row<'a> {
    original: Option<&'a OriginalLineJson>,
    code: Counted,
    join: Counted,
    setup: Counted,
    /// "0x401234 (left the region)" and how many exits.
    exits: Counted,
}

/// How the original instruction fared.
fn row_class(row: &Row, inside: bool) -> &'static str {
    match row.original {
        Some(o) if o.visits > 0 && o.emitted == 0 => "folded",
        Some(o) if o.emitted < o.visits => "partial",
        Some(_) => "kept",
        None if inside => "kept",
        None => "outside",
    }
}

fn rows(v: &VariantJson) -> BTreeMap<u64, Row<'_>> {
    let mut rows: BTreeMap<u64, Row> = BTreeMap::new();
    for o in &v.original {
        rows.entry(o.address.0).or_default().original = Some(o);
    }
    for l in &v.code {
        match l.kind {
            CodeKind::Code => rows.entry(l.orig.0).or_default().code.add(l.asm.clone()),
            CodeKind::Join => rows.entry(l.orig.0).or_default().join.add(l.asm.clone()),
            CodeKind::ExitSetup => rows.entry(l.orig.0).or_default().setup.add(l.asm.clone()),
            CodeKind::Exit => {
                let target = l.exit_target.unwrap_or(l.orig);
                let why = l.exit_reason.as_deref().unwrap_or("exit");
                rows.entry(l.orig.0)
                    .or_default()
                    .exits
                    .add(format!("exit → {target} ({why})"));
            }
            CodeKind::Label | CodeKind::Data => {}
        }
    }
    rows
}

fn counted(o: &mut String, c: &Counted, class: &str, prefix: &str) -> std::fmt::Result {
    for (s, n) in c.0.iter().take(MAX_PER_ROW) {
        let times = if *n > 1 {
            format!(" <span class=\"cnt\">×{n}</span>")
        } else {
            String::new()
        };
        writeln!(o, "<div class=\"{class}\">{prefix}{}{times}</div>", esc(s))?;
    }
    if c.0.len() > MAX_PER_ROW {
        writeln!(
            o,
            "<div class=\"cnt\">… {} more distinct</div>",
            c.0.len() - MAX_PER_ROW
        )?;
    }
    Ok(())
}

pub(super) fn variant(r: &Report, v: &VariantJson, o: &mut String) -> std::fmt::Result {
    let name = region_name(v);
    let when = match (&v.trigger, v.value) {
        (Some(t), Some(val)) => format!("at {} when {} = {}", t.address, t.register, val),
        (Some(t), None) => format!("at {} ({})", t.address, t.register),
        (None, _) => "entered unconditionally".into(),
    };
    let state = if v.invalidated {
        "<span class=\"tag dead\">invalidated</span>"
    } else {
        "<span class=\"tag live\">alive at the end</span>"
    };
    writeln!(
        o,
        "<section class=\"variant\" id=\"variant-{}\" data-variant=\"{}\"><h3>#{} <code>{}</code> {}{state}</h3>",
        v.id,
        v.id,
        v.id,
        esc(&name),
        esc(&when)
    )?;
    let hot = r
        .hot_regions
        .iter()
        .find(|h| h.start == v.region.start)
        .map(|h| format!(" (region: {:.1}% of the samples)", h.share * 100.0))
        .unwrap_or_default();
    let installed = v
        .installed_ms
        .map(|t| format!(", installed at {}", secs(t)))
        .unwrap_or_default();
    let dropped = r
        .invalidations
        .iter()
        .find(|i| i.variants.contains(&v.id))
        .map(|i| {
            format!(
                ", invalidated at {} (page {} written)",
                secs(i.time_ms),
                i.page
            )
        })
        .unwrap_or_default();
    let at = v
        .code_address
        .map(|a| format!(" at {a}"))
        .unwrap_or_default();
    writeln!(
        o,
        "<p class=\"facts\">region [{}..{}){hot}; <b>{}</b> code bytes{at}; <b>{}</b> original instructions folded \
         away, <b>{}</b> emitted; entered <b>{}</b> time{}{installed}{dropped}{}</p>",
        v.region.start,
        v.region.end,
        v.code_bytes,
        v.folded,
        v.residual,
        v.entries,
        if v.entries == 1 { "" } else { "s" },
        if v.forwards_stores {
            "; forwards stored values"
        } else {
            ""
        }
    )?;
    if v.guard_pages.is_empty() {
        writeln!(o, "<p class=\"facts\">guard pages: none</p>")?;
    } else {
        let pages: Vec<String> = v
            .guard_pages
            .iter()
            .take(32)
            .map(|p| p.to_string())
            .collect();
        let more = if v.guard_pages.len() > 32 {
            format!(" … ({} more)", v.guard_pages.len() - 32)
        } else {
            String::new()
        };
        writeln!(
            o,
            "<p class=\"facts\">guard pages (contents relied on, write-protected while it lives): <code>{}</code>{more}</p>",
            pages.join(" ")
        )?;
    }
    writeln!(
        o,
        "<table class=\"side\"><colgroup><col class=\"a\"><col class=\"o\"><col></colgroup>\
         <tr><th>address</th><th>original code</th><th>specialized code (variant #{})</th></tr>",
        v.id
    )?;
    if v.original.is_empty() && v.code.is_empty() {
        // A report from a dynspec that kept only the residual listing.
        let mut spec = Counted::default();
        for l in &v.asm {
            spec.add(l.clone());
        }
        writeln!(
            o,
            "<tr class=\"outside\"><td class=\"addr\"></td><td class=\"orig\">(original code not recorded in this \
             report)</td><td class=\"spec\">"
        )?;
        if v.asm.is_empty() {
            writeln!(o, "<div class=\"gone\">(code not recorded)</div>")?;
        }
        counted(o, &spec, "", "")?;
        writeln!(o, "</td></tr></table></section>")?;
        return Ok(());
    }
    let entry = v.trigger.as_ref().map(|t| t.address.0);
    let rows = rows(v);
    for (addr, row) in rows.iter().take(MAX_ROWS) {
        let inside = (v.region.start.0..v.region.end.0).contains(addr);
        let mut class = row_class(row, inside).to_string();
        if entry == Some(*addr) {
            class.push_str(" entry");
        }
        let (left, tip) = match row.original {
            Some(ol) => (
                esc(&ol.asm),
                format!("walked {}×, emitted code in {}", ol.visits, ol.emitted),
            ),
            None if inside => ("(not listed)".into(), String::new()),
            None => ("(outside the region)".into(), String::new()),
        };
        writeln!(
            o,
            "<tr class=\"{class}\"><td class=\"addr\">{:#x}</td><td class=\"orig\" title=\"{}\">{left}</td><td class=\"spec\">",
            addr,
            esc(&tip)
        )?;
        counted(o, &row.join, "cnt", "(join) ")?;
        counted(o, &row.code, "", "")?;
        counted(o, &row.setup, "cnt", "(before exit) ")?;
        counted(o, &row.exits, "exit", "⇥ ")?;
        if row.code.0.is_empty() && row.exits.0.is_empty() && row.setup.0.is_empty() {
            // Folded: what joins here (if anything) is listed above.
            writeln!(o, "<div class=\"gone\">— folded away</div>")?;
        }
        writeln!(o, "</td></tr>")?;
    }
    if rows.len() > MAX_ROWS {
        writeln!(
            o,
            "<tr><td></td><td class=\"orig\">… {} more addresses</td><td class=\"spec\"></td></tr>",
            rows.len() - MAX_ROWS
        )?;
    }
    writeln!(o, "</table>")?;
    listing(v, o)?;
    writeln!(o, "</section>")
}

/// The specialized code in emission order, each line with the original address it stands for.
fn listing(v: &VariantJson, o: &mut String) -> std::fmt::Result {
    writeln!(
        o,
        "<details><summary>specialized code in emission order ({} lines)</summary><table class=\"listing\">",
        v.code.len()
    )?;
    for l in v.code.iter().take(MAX_LISTING) {
        let class = match l.kind {
            CodeKind::Label => "label",
            CodeKind::Exit => "exit",
            _ => "",
        };
        let indent = if l.kind == CodeKind::Label { "" } else { "  " };
        writeln!(
            o,
            "<tr class=\"{class}\"><td class=\"addr\">{}</td><td class=\"mono\">{indent}{}</td></tr>",
            l.orig,
            esc(&l.asm)
        )?;
    }
    if v.code.len() > MAX_LISTING {
        writeln!(
            o,
            "<tr><td></td><td>… {} more lines (in the JSON report)</td></tr>",
            v.code.len() - MAX_LISTING
        )?;
    }
    writeln!(o, "</table></details>")
}
