//! The run report: a versioned JSON document (written atomically) and its rendering for people.

pub mod code;
pub mod html;
pub mod plan;
pub mod schema;

pub use code::{CodeLineJson, OriginalLineJson};
pub use plan::PlanRoundJson;

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
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

impl JsonSchema for Hex {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Hex".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^0[xX][0-9a-fA-F]{1,16}$",
            "description": "An address or value in the target, hexadecimal with a 0x prefix (JSON numbers lose \
                            precision above 2^53)."
        })
    }
}

/// The schema of a key that is always written and may be null (`schemars(required)` alone drops the null).
pub(crate) fn nullable<T: JsonSchema>(g: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let inner = g.subschema_for::<T>();
    schemars::json_schema!({ "anyOf": [inner, { "type": "null" }] })
}

impl std::fmt::Display for Hex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// How the target ended: `{"code": n}` or `{"signal": n}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ExitStatusJson {
    Code(i32),
    Signal(i32),
}

/// One trigger candidate: a register read by an instruction, with its value profile.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TriggerJson {
    pub address: Hex,
    pub register: String,
    pub samples: u64,
    pub distinct: u64,
    pub coverage: f64,
    pub top_values: Vec<TopValueJson>,
}

/// One frequent value and the share of the candidate's samples it accounts for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TopValueJson {
    pub value: Hex,
    pub share: f64,
}

/// A hot region of code.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
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
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct MethodCounts {
    pub uffd: u64,
    pub mprotect: u64,
}

/// Result of the write-watch window over the pages hot loads read.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct StoreProfileJson {
    pub pages_watched: u64,
    pub pages_written: u64,
    pub pages_read_only: u64,
    pub watched: Vec<Hex>,
    pub written: Vec<Hex>,
    pub method: MethodCounts,
}

/// Where the time went.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Timings {
    pub profile_ms: u64,
    /// Time spent scoring triggers and specializing (the program keeps running meanwhile).
    pub specialize_ms: u64,
    /// Time the program was stopped for installs.
    pub install_ms: u64,
    /// From the first sample to the first installed variant; null when nothing was installed.
    #[schemars(required, schema_with = "nullable::<u64>")]
    pub first_install_ms: Option<u64>,
}

/// The region a variant specializes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RegionRefJson {
    pub start: Hex,
    pub end: Hex,
    pub symbol: Option<String>,
}

/// The dispatch trigger of a variant: the register compared at the patched address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct TriggerRefJson {
    pub address: Hex,
    pub register: String,
}

/// One installed variant.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VariantJson {
    /// Unique within the report (invalidations refer to it).
    pub id: u64,
    pub region: RegionRefJson,
    /// null: entered unconditionally.
    #[schemars(required, schema_with = "nullable::<TriggerRefJson>")]
    pub trigger: Option<TriggerRefJson>,
    /// The trigger value the variant was specialized for (null without a trigger).
    #[schemars(required, schema_with = "nullable::<Hex>")]
    pub value: Option<Hex>,
    pub code_bytes: u64,
    /// Where the variant's code is in the target (in dynspec's code arena).
    #[schemars(required, schema_with = "nullable::<Hex>")]
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
    pub forwards_stores: bool,
    /// The variant's code as emitted, one instruction per line (labels `L<n>:`), at most [`MAX_ASM_LINES`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub asm: Vec<String>,
    /// The same code line by line with the original address each line stands for, exits with their targets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub code: Vec<CodeLineJson>,
    /// The original instructions the variant covers (those the specializer walked), by address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub original: Vec<OriginalLineJson>,
    /// When it was installed, since the session started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed_ms: Option<u64>,
    /// What measuring its stub on and off found (shared by the variants of one stub); null before any verdict.
    #[serde(default)]
    #[schemars(required, schema_with = "nullable::<EffectJson>")]
    pub effect: Option<EffectJson>,
}

/// The measured effect of a stub's variants ([`crate::abtest`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EffectJson {
    /// `faster`, `not_measurably_slower`, `slower` (removed), `too_few_passes`, or `unmeasured`.
    pub verdict: String,
    /// Native CPU time per pass through the dispatch site over the variants' (above 1: faster); null unmeasured.
    #[schemars(required, schema_with = "nullable::<f64>")]
    pub ratio: Option<f64>,
    /// The ratio's confidence interval.
    #[schemars(required, schema_with = "nullable::<f64>")]
    pub low: Option<f64>,
    #[schemars(required, schema_with = "nullable::<f64>")]
    pub high: Option<f64>,
    /// Pairs of on/off intervals the verdict rests on.
    pub pairs: u64,
    /// When the verdict was reached, since the session started.
    pub time_ms: u64,
    /// The unit of work compared ("pass through the dispatch site", "call of the function at 0x..."); null when
    /// unmeasured.
    #[serde(default)]
    #[schemars(required, schema_with = "nullable::<String>")]
    pub unit: Option<String>,
    /// In words (for `unmeasured`: why no measure applies).
    pub why: String,
}

/// The A/B measurement as a whole: what it cost and what it removed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MeasurementJson {
    /// What a switched-off stub costs per pass on this CPU (calibrated), taken off the off intervals.
    #[schemars(required, schema_with = "nullable::<f64>")]
    pub stub_off_ns: Option<f64>,
    /// Trials run (a stub is measured again after a phase change).
    pub trials: u64,
    /// Time stubs spent switched off for measuring.
    pub off_ms: u64,
    /// Variant ids removed because they were measured slower.
    pub removed: Vec<u64>,
    /// The user's unit of work (`--metric`), as given.
    #[serde(default)]
    #[schemars(required, schema_with = "nullable::<String>")]
    pub metric: Option<String>,
    /// Why the user's metric could not be used (installs were measured by their own unit instead).
    #[serde(default)]
    #[schemars(required, schema_with = "nullable::<String>")]
    pub metric_problem: Option<String>,
}

/// Lines of variant code kept in the report per variant.
pub const MAX_ASM_LINES: usize = 2000;

/// A write to a guarded page and the variants it killed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct InvalidationJson {
    pub page: Hex,
    /// Since the session started.
    pub time_ms: u64,
    /// Ids of the variants dropped.
    pub variants: Vec<u64>,
}

/// The whole report (schema version 1).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Report {
    pub version: u32,
    /// argv of a `dynspec run`; absent in attach mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// PID of a `dynspec attach`; absent in run mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,
    /// null in attach mode (the process keeps running).
    #[schemars(required, schema_with = "nullable::<ExitStatusJson>")]
    pub exit_status: Option<ExitStatusJson>,
    /// The user interrupted `dynspec run` twice and dynspec killed the program (`exit_status` says SIGKILL).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub killed_by_dynspec: bool,
    pub samples: u64,
    pub lost_samples: u64,
    pub rate_hz: u64,
    pub duration_ms: u64,
    pub hot_regions: Vec<HotRegionJson>,
    pub store_profile: StoreProfileJson,
    pub timings: Timings,
    /// Installed variants (empty with --profile-only).
    pub variants: Vec<VariantJson>,
    pub invalidations: Vec<InvalidationJson>,
    /// Every planning round: regions and trigger candidates considered, what was decided and why.
    pub plan: Vec<PlanRoundJson>,
    /// Why nothing was planned at all (no round happened), when that is so.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_planned: Option<String>,
    /// What the program lost to dynspec itself, and what dynspec did about it.
    #[serde(default)]
    pub overhead: crate::overhead::OverheadJson,
    /// Measuring the installed stubs on and off.
    #[serde(default)]
    pub measurement: MeasurementJson,
}

/// `n` with the singular or plural noun ("1 sample", "2 samples").
pub(crate) fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Why a report could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("no report at {path} — run `dynspec run -- PROGRAM` first, or name the report: dynspec report FILE")]
    Missing { path: PathBuf },
    #[error("cannot read report {path}: {cause}")]
    Unreadable {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("report {path} is not a dynspec report (bad JSON at line {line}: {msg})")]
    BadJson {
        path: PathBuf,
        line: usize,
        msg: String,
    },
    #[error("report {path} does not match the report schema: {problem} — was it edited, or written by another tool?")]
    Schema { path: PathBuf, problem: String },
    #[error("report {path} is not a dynspec report (no \"version\" field)")]
    NoVersion { path: PathBuf },
    #[error(
        "report {path} has version {version}, this dynspec reads version {REPORT_VERSION} — re-run `dynspec run` \
         with this build"
    )]
    UnsupportedVersion { path: PathBuf, version: u64 },
    #[error("cannot write report {path}: {cause}")]
    Write {
        path: PathBuf,
        cause: std::io::Error,
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
        // The schema names the key that is missing or wrong (serde would take a missing optional key as null).
        schema::check(&value).map_err(|problem| ReportError::Schema {
            path: path.to_path_buf(),
            problem,
        })?;
        // Parse again from the text (not the Value) so shape errors keep their line numbers.
        serde_json::from_str(text).map_err(|e| bad_json(path, &e))
    }

    /// Read and check a report file.
    pub fn load(path: &Path) -> Result<Report, ReportError> {
        let text = std::fs::read_to_string(path).map_err(|cause| {
            if cause.kind() == std::io::ErrorKind::NotFound {
                ReportError::Missing {
                    path: path.to_path_buf(),
                }
            } else {
                ReportError::Unreadable {
                    path: path.to_path_buf(),
                    cause,
                }
            }
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
        let werr = |cause| ReportError::Write {
            path: path.to_path_buf(),
            cause,
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
            Some(ExitStatusJson::Signal(s)) if self.killed_by_dynspec => format!(
                "killed by dynspec with signal {s} ({}) after a second interrupt",
                signal_name(s)
            ),
            Some(ExitStatusJson::Signal(s)) => format!("killed by signal {s} ({})", signal_name(s)),
            None => "still running (detached)".to_string(),
        };
        writeln!(o, "status:    {status}")?;
        writeln!(
            o,
            "samples:   {} at {} Hz ({} lost) over {:.3} s; profiling took {} ms",
            count(self.samples, "sample", "samples"),
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
                "  {:5.1}%  {:<28} {}  [{}..{})  {}",
                r.share * 100.0,
                sym,
                r.module,
                r.start,
                r.end,
                count(r.samples, "sample", "samples")
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
                    "           trigger {} {:<4} {} distinct, top values cover {:.0}% of {}: {}{}",
                    t.address,
                    t.register,
                    t.distinct,
                    t.coverage * 100.0,
                    count(t.samples, "sample", "samples"),
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
            "store profile: {} watched ({} uffd, {} mprotect), {} written, {} read-only (constant)",
            count(sp.pages_watched, "page", "pages"),
            sp.method.uffd,
            sp.method.mprotect,
            sp.pages_written,
            sp.pages_read_only
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
                "  #{:<3} {} {}: {}, {} folded / {} residual, {}, {}{}{}",
                v.id,
                region,
                trig,
                count(v.code_bytes, "byte", "bytes"),
                v.folded,
                v.residual,
                count(v.guard_pages.len() as u64, "guard page", "guard pages"),
                count(v.entries, "entry", "entries"),
                if v.forwards_stores {
                    ", forwards stores"
                } else {
                    ""
                },
                match (&v.effect, v.invalidated) {
                    (Some(e), true) if e.verdict == "slower" => ", removed: measured slower",
                    (_, true) => ", invalidated",
                    _ => "",
                }
            )?;
            if let Some(e) = &v.effect {
                writeln!(o, "        measured: {}: {}", e.verdict, e.why)?;
            }
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
        self.render_measurement(o)?;
        self.overhead.render(o)
    }

    fn render_measurement(&self, o: &mut String) -> std::fmt::Result {
        let m = &self.measurement;
        if let Some(metric) = &m.metric {
            match &m.metric_problem {
                Some(p) => writeln!(o, "metric:    --metric {metric} not used: {p}")?,
                None => writeln!(o, "metric:    --metric {metric}")?,
            }
        }
        if m.trials == 0 {
            return Ok(());
        }
        writeln!(
            o,
            "measurement: {}, stubs switched off {} ms in all{}{}",
            count(m.trials, "trial", "trials"),
            m.off_ms,
            m.stub_off_ns
                .map(|ns| format!(", a switched-off stub costs {ns:.1} ns per pass"))
                .unwrap_or_default(),
            if m.removed.is_empty() {
                String::new()
            } else {
                let ids: Vec<String> = m.removed.iter().map(|v| format!("#{v}")).collect();
                format!("; removed as slower: {}", ids.join(" "))
            }
        )
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
mod tests;
