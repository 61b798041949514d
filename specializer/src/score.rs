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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryError;

    /// Code at 0x1000: `cmp rdi, 5; ja +5; mov eax, 1; ret` padded; nothing constant.
    struct Code(Vec<u8>);

    impl Memory for Code {
        fn read(&self, addr: Addr, buf: &mut [u8]) -> Result<(), MemoryError> {
            let off = addr
                .0
                .checked_sub(0x1000)
                .ok_or(MemoryError::Unreadable(addr))? as usize;
            let src = self
                .0
                .get(off..off + buf.len())
                .ok_or(MemoryError::Unreadable(addr))?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn is_constant(&self, _page: Addr) -> bool {
            false
        }
    }

    #[test]
    fn benefit_weighs_folded_work_by_samples() {
        // cmp rdi, 5 ; ja L ; mov eax, 1 ; ret ; L: mov eax, 2 ; ret
        let code = Code(vec![
            0x48, 0x83, 0xff, 0x05, 0x77, 0x06, 0xb8, 0x01, 0, 0, 0, 0xc3, 0xb8, 0x02, 0, 0, 0,
            0xc3,
        ]);
        let cand = TriggerCandidate {
            address: Addr(0x1000),
            register: Gpr::Rdi,
            values: vec![(1, 30), (9, 10)],
        };
        let s = score_trigger(
            Addr(0x1000),
            Addr(0x1012),
            &cand,
            &code,
            &Options::default(),
        );
        assert_eq!(s.per_value.len(), 2);
        assert!(s.per_value.iter().all(|v| v.ok && v.folded >= 2));
        let want: f64 = s
            .per_value
            .iter()
            .map(|v| v.samples as f64 / 40.0 * v.folded as f64)
            .sum();
        assert!((s.benefit - want).abs() < 1e-9);
        // An entry outside the region is a failed value, not a panic.
        let bad = TriggerCandidate {
            address: Addr(0x9000),
            ..cand
        };
        let s = score_trigger(Addr(0x1000), Addr(0x1012), &bad, &code, &Options::default());
        assert!(s.per_value.iter().all(|v| !v.ok));
        assert_eq!(s.benefit, 0.0);
    }
}
