//! Finishing: flag-materialization data after the code, one ip per referenced label, branch targets resolved.

use super::Engine;
use crate::variant::{Emitted, Original, Variant, LABEL_BASE};
use crate::{KnownState, SpecializeError};
use iced_x86::{Instruction, OpKind};
use std::collections::{BTreeSet, HashMap};

impl Engine<'_> {
    pub(super) fn finish(mut self) -> Result<Variant, SpecializeError> {
        // Data bytes for flag materialization go after all code.
        let mut data: Vec<(u8, u32)> = self.data_labels.iter().map(|(b, l)| (*b, *l)).collect();
        data.sort();
        for (b, l) in data {
            self.labels[l as usize] = Some(self.items.len());
            self.items.push(Emitted {
                ins: Instruction::with_declare_byte_1(b),
                orig: self.req.entry,
                folded: KnownState::default(),
                is_data: true,
                source: None,
            });
        }
        // Only labels something refers to get an ip; several labels may
        // name one position, so pick one ip per position.
        let mut referenced: BTreeSet<u64> = BTreeSet::new();
        for e in &self.items {
            if e.is_data {
                continue;
            }
            if e.ins.op_count() > 0 && e.ins.op0_kind() == OpKind::NearBranch64 {
                referenced.insert(e.ins.near_branch_target());
            }
            if e.ins.is_ip_rel_memory_operand() {
                referenced.insert(e.ins.memory_displacement64());
            }
        }
        let mut canon: HashMap<usize, u64> = HashMap::new();
        let mut remap: HashMap<u64, u64> = HashMap::new();
        for (l, pos) in self.labels.iter().enumerate() {
            let Some(p) = pos else { continue };
            let lip = LABEL_BASE + l as u64;
            if !referenced.contains(&lip) {
                continue;
            }
            if *p >= self.items.len() {
                return Err(SpecializeError::Encode(format!(
                    "label {l} has no instruction"
                )));
            }
            let ip = *canon.entry(*p).or_insert(lip);
            remap.insert(lip, ip);
        }
        for (p, ip) in &canon {
            self.items[*p].ins.set_ip(*ip);
        }
        for e in &mut self.items {
            if e.is_data {
                continue;
            }
            if e.ins.op_count() > 0 && e.ins.op0_kind() == OpKind::NearBranch64 {
                let t = e.ins.near_branch_target();
                if crate::variant::is_label(t) {
                    let n = remap
                        .get(&t)
                        .copied()
                        .ok_or_else(|| SpecializeError::Encode(format!("unplaced label {t:#x}")))?;
                    e.ins.set_near_branch64(n);
                }
            }
            if e.ins.is_ip_rel_memory_operand() {
                let t = e.ins.memory_displacement64();
                if crate::variant::is_label(t) {
                    let n = remap
                        .get(&t)
                        .copied()
                        .ok_or_else(|| SpecializeError::Encode(format!("unplaced label {t:#x}")))?;
                    e.ins.set_memory_displacement64(n);
                }
            }
        }
        // The original instructions walked, as decoded (they decoded when walked).
        let original = self
            .coverage
            .iter()
            .filter_map(|(&addr, &(visits, emitted))| {
                let ins = self.decode_cache.get(&addr).copied().flatten()?;
                Some(Original {
                    ins,
                    visits,
                    emitted,
                })
            })
            .collect();
        Ok(Variant {
            entry: self.req.entry,
            original,
            exits: self.exits,
            guard_pages: self.guard.into_iter().collect(),
            stats: self.stats,
            items: self.items,
            exit_items: self.exit_items,
        })
    }
}
