//! The run report: a versioned JSON document (written atomically) and its rendering for people.

pub mod plan;

pub use plan::PlanRoundJson;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Schema version written by this build; `dynspec report` reads only this version.
pub const REPORT_VERSION: u32 = 1;

/// Default report file name, in the current directory (like perf's perf.data).
pub const DEFAULT_REPORT: &str = "dynspec.report.json";

/// A target address, serialised as a `"0x..."` string (JSON numbers lose precision above 2^53).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hex(pub u64);

impl Serialize for Hex {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:#x}", self.0))
    }
}

impl<'de> Deserialize<'de> for Hex {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let digits = s
            .strip_prefix("0x")
            .or_else(|| s.strip_prefix("0X"))
            .ok_or_else(|| {
                serde::de::Error::custom(format!("expected a \"0x...\" hex string, got {s:?}"))
            })?;
        u64::from_str_radix(digits, 16)
            .map(Hex)
            .map_err(|e| serde::de::Error::custom(format!("bad hex number {s:?}: {e}")))
    }
}

impl std::fmt::Display for Hex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// How the target ended: `{"code": n}` or `{"signal": n}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExitStatusJson {
    Code(i32),
    Signal(i32),
}

/// One trigger candidate: a register read by an instruction, with its value profile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TriggerJson {
    pub address: Hex,
    pub register: String,
    pub samples: u64,
    pub distinct: u64,
    pub coverage: f64,
    pub top_values: Vec<TopValueJson>,
}

/// One frequent value and the share of the candidate's samples it accounts for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TopValueJson {
    pub value: Hex,
    pub share: f64,
}

/// A hot region of code.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HotRegionJson {
    pub module: String,
    pub symbol: Option<String>,
    pub start: Hex,
    pub end: Hex,
    pub samples: u64,
    pub share: f64,
    pub triggers: Vec<TriggerJson>,
}

/// How many pages each protection method watched.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MethodCounts {
    pub uffd: u64,
    pub mprotect: u64,
}

/// Result of the write-watch window over the pages hot loads read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreProfileJson {
    pub pages_watched: u64,
    pub pages_written: u64,
    pub pages_read_only: u64,
    pub watched: Vec<Hex>,
    pub written: Vec<Hex>,
    pub method: MethodCounts,
}

/// Where the time went.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timings {
    pub profile_ms: u64,
    /// Time spent scoring triggers and specializing (the program keeps running meanwhile).
    #[serde(default)]
    pub specialize_ms: u64,
    /// Time the program was stopped for installs.
    #[serde(default)]
    pub install_ms: u64,
    /// From the first sample to the first installed variant; null when nothing was installed.
    #[serde(default)]
    pub first_install_ms: Option<u64>,
}

/// The region a variant specializes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionRefJson {
    pub start: Hex,
    pub end: Hex,
    pub symbol: Option<String>,
}

/// The dispatch trigger of a variant: the register compared at the patched address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerRefJson {
    pub address: Hex,
    pub register: String,
}

/// One installed variant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VariantJson {
    /// Unique within the report (invalidations refer to it).
    pub id: u64,
    pub region: RegionRefJson,
    /// null: entered unconditionally.
    pub trigger: Option<TriggerRefJson>,
    /// The trigger value the variant was specialized for (null without a trigger).
    pub value: Option<Hex>,
    pub code_bytes: u64,
    /// Where the variant's code is in the target (in dynspec's code arena).
    #[serde(default)]
    pub code_address: Option<Hex>,
    /// Original instructions folded away / emitted.
    pub folded: u64,
    pub residual: u64,
    /// Pages whose contents the variant relies on (write-protected while it lives).
    pub guard_pages: Vec<Hex>,
    /// Times the variant was entered (as last read from the target).
    pub entries: u64,
    /// Thrown away: a write to one of its guard pages, its process exec'd, or dynspec detached.
    pub invalidated: bool,
    /// Reloads of memory the variant itself just stored or loaded come from registers: only while the
    /// process has a single thread (a second one removes such variants) and only for private memory.
    #[serde(default)]
    pub forwards_stores: bool,
    /// The variant's code as emitted, one instruction per line (labels `L<n>:`), at most [`MAX_ASM_LINES`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub asm: Vec<String>,
}

/// Lines of variant code kept in the report per variant.
pub const MAX_ASM_LINES: usize = 2000;

/// A write to a guarded page and the variants it killed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvalidationJson {
    pub page: Hex,
    /// Since the session started.
    pub time_ms: u64,
    /// Ids of the variants dropped.
    pub variants: Vec<u64>,
}

/// The whole report (schema version 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub version: u32,
    /// argv of a `dynspec run`; absent in attach mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// PID of a `dynspec attach`; absent in run mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// null in attach mode (the process keeps running).
    pub exit_status: Option<ExitStatusJson>,
    pub samples: u64,
    pub lost_samples: u64,
    pub rate_hz: u64,
    pub duration_ms: u64,
    pub hot_regions: Vec<HotRegionJson>,
    pub store_profile: StoreProfileJson,
    pub timings: Timings,
    /// Installed variants (empty with --profile-only).
    #[serde(default)]
    pub variants: Vec<VariantJson>,
    #[serde(default)]
    pub invalidations: Vec<InvalidationJson>,
    /// Every planning round: regions and trigger candidates considered, what was decided and why.
    #[serde(default)]
    pub plan: Vec<PlanRoundJson>,
    /// Why nothing was planned at all (no round happened), when that is so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_planned: Option<String>,
    /// What the program lost to dynspec itself, and what dynspec did about it.
    #[serde(default)]
    pub overhead: crate::overhead::OverheadJson,
}

/// Why a report could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot read report {path}: {source} — run `dynspec run` first")]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("report {path} is not a dynspec report (bad JSON at line {line}: {msg})")]
    BadJson {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("report {path} is not a dynspec report (no \"version\" field)")]
    NoVersion { path: PathBuf },
    #[error(
        "report {path} has version {version}, this dynspec reads version {REPORT_VERSION} — re-run `dynspec run` \
         with this build"
    )]
    UnsupportedVersion { path: PathBuf, version: u64 },
    #[error("cannot write report {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn bad_json(path: &Path, e: &serde_json::Error) -> ReportError {
    // serde_json's Display appends " at line L column C"; we state the line ourselves.
    let full = e.to_string();
    let msg = match full.rfind(" at line ") {
        Some(i) => full[..i].to_string(),
        None => full,
    };
    ReportError::BadJson {
        path: path.to_path_buf(),
        line: e.line(),
        msg,
    }
}

impl Report {
    /// Parse a report from text (`path` is only used in messages).
    pub fn parse(path: &Path, text: &str) -> Result<Report, ReportError> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| bad_json(path, &e))?;
        let version = value
            .get("version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| ReportError::NoVersion {
                path: path.to_path_buf(),
            })?;
        if version != REPORT_VERSION as u64 {
            return Err(ReportError::UnsupportedVersion {
                path: path.to_path_buf(),
                version,
            });
        }
        // Parse again from the text (not the Value) so shape errors keep their line numbers.
        serde_json::from_str(text).map_err(|e| bad_json(path, &e))
    }

    /// Read and check a report file.
    pub fn load(path: &Path) -> Result<Report, ReportError> {
        let text = std::fs::read_to_string(path).map_err(|source| ReportError::Unreadable {
            path: path.to_path_buf(),
            source,
        })?;
        Report::parse(path, &text)
    }

    /// Pretty JSON text.
    pub fn to_json(&self) -> String {
        // Serialising plain structs of numbers/strings cannot fail; fall back to an empty object rather than panic.
        serde_json::to_string_pretty(self).unwrap_or_else(|_| "{}".to_string())
    }

    /// Write atomically: temp file in the same directory, fsync, keep the previous report as `PATH.old`, rename.
    pub fn write(&self, path: &Path) -> Result<(), ReportError> {
        let werr = |source| ReportError::Write {
            path: path.to_path_buf(),
            source,
        };
        // Not a regular file (/dev/stdout, a FIFO): write straight into it, never rename it away.
        if let Ok(md) = std::fs::metadata(path) {
            if !md.is_file() {
                if md.is_dir() {
                    return Err(werr(std::io::Error::other("it is a directory")));
                }
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(path)
                    .map_err(werr)?;
                return f
                    .write_all(self.to_json().as_bytes())
                    .and_then(|()| f.write_all(b"\n"))
                    .map_err(werr);
            }
        }
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dir.join(format!(".{name}.tmp.{}", std::process::id()));
        let result = (|| {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(self.to_json().as_bytes())?;
            f.write_all(b"\n")?;
            f.sync_all()?;
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file()) {
                let mut old = path.as_os_str().to_owned();
                old.push(".old");
                std::fs::rename(path, PathBuf::from(old))?;
            }
            std::fs::rename(&tmp, path)
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result.map_err(werr)
    }

    /// Human-readable rendering for `dynspec report`.
    pub fn render(&self) -> String {
        let mut o = String::new();
        let _ = self.render_into(&mut o);
        o
    }

    /// The code of every variant (`dynspec report --asm`).
    pub fn render_asm(&self) -> String {
        let mut o = String::new();
        if self.variants.is_empty() {
            o.push_str("no variants\n");
        }
        for v in &self.variants {
            let region = v
                .region
                .symbol
                .clone()
                .unwrap_or_else(|| v.region.start.to_string());
            let code = v
                .code_address
                .map(|a| format!(" (code at {a})"))
                .unwrap_or_default();
            let _ = match (&v.trigger, v.value) {
                (Some(t), Some(val)) => writeln!(
                    o,
                    "variant #{} {region} at {} when {} = {}{code}:",
                    v.id, t.address, t.register, val
                ),
                _ => writeln!(o, "variant #{} {region}{code}:", v.id),
            };
            if v.asm.is_empty() {
                o.push_str("  (code not recorded)\n");
            }
            for l in &v.asm {
                let indent = if l.ends_with(':') { "" } else { "  " };
                let _ = writeln!(o, "{indent}{l}");
            }
        }
        o
    }

    fn render_into(&self, o: &mut String) -> std::fmt::Result {
        match (&self.command, self.pid) {
            (Some(argv), _) => writeln!(o, "command:   {}", shell_join(argv))?,
            (None, Some(pid)) => writeln!(o, "attached:  pid {pid}")?,
            (None, None) => writeln!(o, "command:   (unknown)")?,
        }
        let status = match self.exit_status {
            Some(ExitStatusJson::Code(c)) => format!("exited with code {c}"),
            Some(ExitStatusJson::Signal(s)) => format!("killed by signal {s} ({})", signal_name(s)),
            None => "still running (detached)".to_string(),
        };
        writeln!(o, "status:    {status}")?;
        writeln!(
            o,
            "samples:   {} at {} Hz ({} lost) over {:.3} s; profiling took {} ms",
            self.samples,
            self.rate_hz,
            self.lost_samples,
            self.duration_ms as f64 / 1000.0,
            self.timings.profile_ms
        )?;
        writeln!(o)?;
        if self.hot_regions.is_empty() {
            writeln!(o, "hot regions: none (no samples in user code)")?;
        } else {
            writeln!(o, "hot regions:")?;
        }
        for r in &self.hot_regions {
            let sym = r.symbol.as_deref().unwrap_or("[no symbol]");
            writeln!(
                o,
                "  {:5.1}%  {:<28} {}  [{}..{})  {} samples",
                r.share * 100.0,
                sym,
                r.module,
                r.start,
                r.end,
                r.samples
            )?;
            for t in r.triggers.iter().take(3) {
                let tops: Vec<String> = t
                    .top_values
                    .iter()
                    .take(4)
                    .map(|v| format!("{} ({:.0}%)", v.value, v.share * 100.0))
                    .collect();
                let more = if t.top_values.len() > 4 { ", ..." } else { "" };
                writeln!(
                    o,
                    "           trigger {} {:<4} {} distinct, top values cover {:.0}% of {} samples: {}{}",
                    t.address,
                    t.register,
                    t.distinct,
                    t.coverage * 100.0,
                    t.samples,
                    tops.join(", "),
                    more
                )?;
            }
            if let Some(why) = self.why_not_specialized(r) {
                writeln!(o, "           why: {why}")?;
            }
        }
        writeln!(o)?;
        let sp = &self.store_profile;
        writeln!(
            o,
            "store profile: {} pages watched ({} uffd, {} mprotect), {} written, {} read-only (constant)",
            sp.pages_watched, sp.method.uffd, sp.method.mprotect, sp.pages_written, sp.pages_read_only
        )?;
        let list = |v: &[Hex]| -> String {
            let mut s: Vec<String> = v.iter().take(16).map(|h| h.to_string()).collect();
            if v.len() > 16 {
                s.push(format!("... ({} more)", v.len() - 16));
            }
            s.join(" ")
        };
        if !sp.watched.is_empty() {
            writeln!(o, "  watched: {}", list(&sp.watched))?;
        }
        if !sp.written.is_empty() {
            writeln!(o, "  written: {}", list(&sp.written))?;
        }
        self.render_specialization(o)?;
        plan::render(&self.plan, o)
    }

    /// Why a hot region got no variant (None when it has one, or with --profile-only where nothing is planned).
    fn why_not_specialized(&self, r: &HotRegionJson) -> Option<String> {
        if self.variants.iter().any(|v| v.region.start == r.start) {
            return None;
        }
        match plan::latest_decision(&self.plan, r.start, r.end) {
            Some(d) => d.reason.clone(),
            None if !self.plan.is_empty() => Some(
                "the planner never considered it (it was hot only outside its sampling windows)"
                    .into(),
            ),
            None => self.not_planned.clone(),
        }
    }

    fn render_specialization(&self, o: &mut String) -> std::fmt::Result {
        let t = &self.timings;
        writeln!(o)?;
        if self.variants.is_empty() {
            writeln!(o, "variants: none installed")?;
        } else {
            let alive = self.variants.iter().filter(|v| !v.invalidated).count();
            writeln!(
                o,
                "variants: {} installed ({} alive at the end)",
                self.variants.len(),
                alive
            )?;
        }
        for v in self.variants.iter().take(32) {
            let region = v
                .region
                .symbol
                .clone()
                .unwrap_or_else(|| format!("[{}..{})", v.region.start, v.region.end));
            let trig = match (&v.trigger, v.value) {
                (Some(t), Some(val)) => format!("at {} when {} = {}", t.address, t.register, val),
                (Some(t), None) => format!("at {} ({})", t.address, t.register),
                (None, _) => "unconditional".to_string(),
            };
            writeln!(
                o,
                "  #{:<3} {} {}: {} bytes, {} folded / {} residual, {} guard page(s), {} entries{}{}",
                v.id,
                region,
                trig,
                v.code_bytes,
                v.folded,
                v.residual,
                v.guard_pages.len(),
                v.entries,
                if v.forwards_stores { ", forwards stores" } else { "" },
                if v.invalidated { ", invalidated" } else { "" }
            )?;
        }
        if self.variants.len() > 32 {
            writeln!(o, "  ... ({} more)", self.variants.len() - 32)?;
        }
        if !self.invalidations.is_empty() {
            writeln!(o, "invalidations: {}", self.invalidations.len())?;
            for i in self.invalidations.iter().take(16) {
                let ids: Vec<String> = i.variants.iter().map(|v| format!("#{v}")).collect();
                writeln!(
                    o,
                    "  {:>8} ms  page {} written: dropped {}",
                    i.time_ms,
                    i.page,
                    if ids.is_empty() {
                        "nothing".to_string()
                    } else {
                        ids.join(" ")
                    }
                )?;
            }
            if self.invalidations.len() > 16 {
                writeln!(o, "  ... ({} more)", self.invalidations.len() - 16)?;
            }
        }
        let first = match t.first_install_ms {
            Some(ms) => format!("{ms} ms"),
            None => "-".to_string(),
        };
        writeln!(
            o,
            "timings: profile {} ms, specialize {} ms, install {} ms, first sample to first install {}",
            t.profile_ms, t.specialize_ms, t.install_ms, first
        )?;
        self.overhead.render(o)
    }
}

fn shell_join(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn signal_name(sig: i32) -> String {
    nix::sys::signal::Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("SIG{sig}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_report() -> Report {
        Report {
            version: REPORT_VERSION,
            command: Some(vec!["samples/build/interp".into(), "100".into()]),
            pid: None,
            exit_status: Some(ExitStatusJson::Code(3)),
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
        assert!(matches!(err, ReportError::BadJson { .. }), "{err}");
        let err = Report::parse(Path::new("r.json"), "[1,2]").unwrap_err();
        assert!(matches!(err, ReportError::NoVersion { .. }), "{err}");
    }

    #[test]
    fn unknown_version_is_refused() {
        let mut v: serde_json::Value =
            serde_json::from_str(&sample_report().to_json()).expect("json");
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
        assert!(
            msg.starts_with("cannot read report /nonexistent/dir/r.json: "),
            "{msg}"
        );
        assert!(msg.contains("run `dynspec run` first"));
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
}
