//! Trigger scoring: specialize for each hot value and weigh folded work by sample frequency.

use crate::{specialize, Addr, Gpr, KnownState, Memory, Options, Request};

/// A candidate trigger: a register read at `address` and its hot values.
#[derive(Clone, Debug)]
pub struct TriggerCandidate {
    pub address: Addr,
    pub register: Gpr,
    /// (value, samples)
    pub values: Vec<(u64, u64)>,
}

/// Outcome of specializing for one hot value.
#[derive(Clone, Debug, PartialEq)]
pub struct ValueScore {
    pub value: u64,
    pub samples: u64,
    /// Instructions folded away.
    pub folded: usize,
    /// Instructions emitted.
    pub residual: usize,
    /// Whether specialization succeeded.
    pub ok: bool,
}

/// Benefit of a candidate: sum over values of (sample share x folded instructions).
#[derive(Clone, Debug, PartialEq)]
pub struct TriggerScore {
    pub benefit: f64,
    pub per_value: Vec<ValueScore>,
}

/// Specialize the region at `cand.address` for each hot value of
/// `cand.register` and score the result (DESIGN: "Trigger choice").
pub fn score_trigger(
    region_start: Addr,
    region_end: Addr,
    cand: &TriggerCandidate,
    mem: &dyn Memory,
    opts: &Options,
) -> TriggerScore {
    let total: u64 = cand.values.iter().map(|v| v.1).sum();
    let mut benefit = 0.0;
    let mut per_value = Vec::new();
    for &(value, samples) in &cand.values {
        let mut known = KnownState::default();
        known.set_reg(cand.register, Some(value));
        let req = Request {
            entry: cand.address,
            region_start,
            region_end,
            known,
            options: opts.clone(),
        };
        let vs = match specialize(&req, mem) {
            Ok(v) => ValueScore {
                value,
                samples,
                folded: v.stats.folded,
                residual: v.stats.residual,
                ok: true,
            },
            Err(_) => ValueScore {
                value,
                samples,
                folded: 0,
                residual: 0,
                ok: false,
            },
        };
        if vs.ok && total > 0 {
            benefit += (samples as f64 / total as f64) * vs.folded as f64;
        }
        per_value.push(vs);
    }
    TriggerScore { benefit, per_value }
}
