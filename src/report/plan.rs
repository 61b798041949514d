//! The report's `plan` section: every planning round, each hot region it considered and each trigger candidate,
//! what specializing folded, what was decided and why; and its rendering as "why" lines.

use std::fmt::Write as _;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::Hex;
use crate::plan::{CandidateNote, RegionNote};

/// One planning round (the first, a re-plan after an invalidation or a periodic look).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PlanRoundJson {
    /// Since the session started.
    pub time_ms: u64,
    /// Samples the round planned on (since the last invalidation).
    pub samples: u64,
    /// Regions that got variants in this round.
    pub installed: u64,
    pub regions: Vec<PlanRegionJson>,
}

/// A hot region as one planning round saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PlanRegionJson {
    pub start: Hex,
    pub end: Hex,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub symbol: Option<String>,
    pub share: f64,
    /// "installed" or "left alone".
    pub decision: String,
    /// Why it was left alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub candidates: Vec<PlanCandidateJson>,
}

/// A trigger candidate as one planning round saw it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PlanCandidateJson {
    /// The instruction that reads the trigger register.
    pub address: Hex,
    pub register: String,
    pub samples: u64,
    pub distinct: u64,
    /// The hot values considered, hottest first.
    pub values: Vec<PlanValueJson>,
    /// What specializing its values folded (absent when it was not specialized).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folded: Option<FoldedJson>,
    /// Estimated benefit: folded instructions x samples of each value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<f64>,
    /// "installed" or "not installed".
    pub decision: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A hot value and its samples.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PlanValueJson {
    pub value: Hex,
    pub samples: u64,
}

/// What specializing folded, summed over the values specialized.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FoldedJson {
    /// Instructions visited (with repetition across states), folded away, and emitted.
    pub visited: u64,
    pub instructions: u64,
    pub loads: u64,
    pub branches: u64,
    pub residual: u64,
}

impl PlanRegionJson {
    /// The report's view of a region's note.
    pub fn from_note(n: &RegionNote) -> PlanRegionJson {
        PlanRegionJson {
            start: Hex(n.start.0),
            end: Hex(n.end.0),
            symbol: n.symbol.clone(),
            share: n.share,
            decision: if n.reason.is_none() {
                "installed"
            } else {
                "left alone"
            }
            .into(),
            reason: n.reason.as_ref().map(|r| r.to_string()),
            candidates: n.candidates.iter().map(candidate_json).collect(),
        }
    }
}

fn candidate_json(c: &CandidateNote) -> PlanCandidateJson {
    PlanCandidateJson {
        address: Hex(c.address.0),
        register: c.register.name().to_string(),
        samples: c.samples,
        distinct: c.distinct,
        values: c
            .values
            .iter()
            .map(|&(v, s)| PlanValueJson {
                value: Hex(v),
                samples: s,
            })
            .collect(),
        folded: c.folded.as_ref().map(|s| FoldedJson {
            visited: s.visited as u64,
            instructions: s.folded as u64,
            loads: s.folded_loads as u64,
            branches: s.folded_branches as u64,
            residual: s.residual as u64,
        }),
        estimate: c.estimate,
        decision: if c.reason.is_none() {
            "installed"
        } else {
            "not installed"
        }
        .into(),
        reason: c.reason.as_ref().map(|r| r.to_string()),
    }
}

/// The latest decision about the region `[start, end)` in the plan, if any round considered it.
pub fn latest_decision(plan: &[PlanRoundJson], start: Hex, end: Hex) -> Option<&PlanRegionJson> {
    plan.iter()
        .rev()
        .flat_map(|round| round.regions.iter())
        .find(|r| r.start == start && r.end == end)
}

/// The `plan` section as text: one line per round, one per region, the candidates of regions left alone.
pub fn render(plan: &[PlanRoundJson], o: &mut String) -> std::fmt::Result {
    if plan.is_empty() {
        return Ok(());
    }
    writeln!(o)?;
    writeln!(o, "plan:")?;
    for round in plan {
        writeln!(
            o,
            "  at {:.3} s on {}: {} installed",
            round.time_ms as f64 / 1000.0,
            super::count(round.samples, "sample", "samples"),
            super::count(round.installed, "region", "regions"),
        )?;
        for r in &round.regions {
            let name = r
                .symbol
                .clone()
                .unwrap_or_else(|| format!("[{}..{})", r.start, r.end));
            match &r.reason {
                None => writeln!(o, "    {name}: installed")?,
                Some(why) => writeln!(o, "    {name}: left alone: {why}")?,
            }
            for c in r.candidates.iter().take(4) {
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
                let why = c
                    .reason
                    .as_ref()
                    .map(|w| format!(": {w}"))
                    .unwrap_or_else(|| ": installed".into());
                // Candidates rejected before specializing list their top values, not hot ones.
                let values = if c.folded.is_some() || c.reason.is_none() {
                    let n = c.values.len();
                    format!("{n} hot value{}", if n == 1 { "" } else { "s" })
                } else {
                    super::count(c.distinct, "distinct value", "distinct values")
                };
                writeln!(
                    o,
                    "      {} at {}, {values}{folded}{why}",
                    c.register, c.address
                )?;
            }
        }
    }
    Ok(())
}
