//! A specialized variant: emitted instructions, exits, deopt map; encoding and text rendering.

use crate::{Addr, DeoptEntry, Exit, KnownState, SpecializeError, Stats};
use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Decoder, DecoderOptions, Formatter, Instruction,
    InstructionBlock, IntelFormatter, OpKind, SymbolResolver, SymbolResult,
};
use std::collections::HashMap;

/// Label addresses live in a non-canonical range so they can never collide
/// with a real branch target in the original code.
pub(crate) const LABEL_BASE: u64 = 0xdead_0000_0000_0000;

/// Whether `ip` is one of our label addresses.
pub(crate) fn is_label(ip: u64) -> bool {
    (LABEL_BASE..LABEL_BASE + (1 << 40)).contains(&ip)
}

/// One emitted instruction and the deopt information at its start.
#[derive(Clone, Debug)]
pub(crate) struct Emitted {
    /// `ip()` is a label address when something branches here, else 0;
    /// branch targets and RIP-relative operands may name label addresses.
    pub ins: Instruction,
    /// Original address a thread stopped before this instruction continues at.
    pub orig: Addr,
    /// Values folded away (known, not in the real registers/flags) at that point.
    pub folded: KnownState,
    /// Data bytes (flag materialization operands), not an instruction boundary.
    pub is_data: bool,
}

/// A specialization of one region for one entry state.
#[derive(Clone, Debug)]
pub struct Variant {
    /// Original entry address.
    pub entry: Addr,
    /// Every exit with its target and abstract state.
    pub exits: Vec<Exit>,
    /// Sorted, deduplicated pages that folded loads relied on.
    pub guard_pages: Vec<Addr>,
    pub stats: Stats,
    pub(crate) items: Vec<Emitted>,
    /// Index in `items` of the first instruction of each exit (same order as `exits`).
    pub(crate) exit_items: Vec<usize>,
}

/// A variant encoded at a base address.
#[derive(Clone, Debug)]
pub struct Encoded {
    pub base: Addr,
    pub code: Vec<u8>,
    /// Sorted by offset: one entry per instruction boundary.
    pub deopt: Vec<DeoptEntry>,
    /// Offset of each exit's first instruction, same order as [`Variant::exits`].
    pub exit_offsets: Vec<u32>,
    /// Statistics with `code_bytes` filled in.
    pub stats: Stats,
}

impl Variant {
    /// Encode at `base` with iced's BlockEncoder (RIP-relative operands and
    /// branches relocated). Deterministic.
    pub fn encode(&self, base: Addr) -> Result<Encoded, SpecializeError> {
        let instrs: Vec<Instruction> = self.items.iter().map(|e| e.ins).collect();
        let block = InstructionBlock::new(&instrs, base.0);
        let res = BlockEncoder::encode(
            64,
            block,
            BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
        )
        .map_err(|e| SpecializeError::Encode(e.to_string()))?;
        let code = res.code_buffer;
        // Offsets of rewritten instructions (far branches) are reported as
        // u32::MAX; recover them by decoding the previous instruction's length.
        let mut offsets = res.new_instruction_offsets;
        for i in 0..offsets.len() {
            if offsets[i] != u32::MAX {
                continue;
            }
            let start = if i == 0 {
                0
            } else {
                let prev = offsets[i - 1] as usize;
                let len = if self.items[i - 1].is_data {
                    self.items[i - 1].ins.declare_data_len()
                } else {
                    let bytes = code.get(prev..).unwrap_or(&[]);
                    let mut d =
                        Decoder::with_ip(64, bytes, base.0 + prev as u64, DecoderOptions::NONE);
                    d.decode().len()
                };
                prev + len
            };
            offsets[i] = start as u32;
        }
        let mut deopt = Vec::new();
        for (i, e) in self.items.iter().enumerate() {
            if e.is_data {
                continue;
            }
            deopt.push(DeoptEntry {
                offset: offsets[i],
                original: e.orig,
                state: e.folded.clone(),
            });
        }
        deopt.sort_by_key(|d| d.offset);
        let exit_offsets = self.exit_items.iter().map(|&i| offsets[i]).collect();
        let mut stats = self.stats.clone();
        stats.code_bytes = code.len();
        Ok(Encoded {
            base,
            code,
            deopt,
            exit_offsets,
            stats,
        })
    }

    /// Residual code as Intel-syntax lines, one per emitted instruction;
    /// labels as `L3:` lines (numbered in emission order), branches to
    /// emitted code as `L3`, exits as `jmp 0x401234`.
    pub fn residual_asm(&self) -> Vec<String> {
        let mut names: HashMap<u64, String> = HashMap::new();
        for e in &self.items {
            let ip = e.ins.ip();
            if is_label(ip) && !names.contains_key(&ip) {
                let n = names.len();
                names.insert(ip, format!("L{n}"));
            }
        }
        let resolver = Box::new(Labels {
            names: names.clone(),
        });
        let mut fmt = IntelFormatter::with_options(Some(resolver), None);
        let o = fmt.options_mut();
        o.set_uppercase_hex(false);
        o.set_hex_prefix("0x");
        o.set_hex_suffix("");
        o.set_space_after_operand_separator(true);
        o.set_show_branch_size(false);
        o.set_rip_relative_addresses(false);
        o.set_branch_leading_zeros(false);
        o.set_leading_zeros(false);
        let mut out = Vec::new();
        for e in &self.items {
            let ip = e.ins.ip();
            if let Some(n) = names.get(&ip) {
                out.push(format!("{n}:"));
            }
            let mut s = String::new();
            if e.is_data && e.ins.op0_kind() != OpKind::Register {
                s = format!("db {:#x}", e.ins.get_declare_byte_value(0));
            } else {
                fmt.format(&e.ins, &mut s);
            }
            out.push(s);
        }
        out
    }

    /// Number of emitted instructions (materialization included, data excluded).
    pub fn instruction_count(&self) -> usize {
        self.items.iter().filter(|e| !e.is_data).count()
    }
}

struct Labels {
    names: HashMap<u64, String>,
}

impl SymbolResolver for Labels {
    fn symbol(
        &mut self,
        _instruction: &Instruction,
        _operand: u32,
        _instruction_operand: Option<u32>,
        address: u64,
        _address_size: u32,
    ) -> Option<SymbolResult<'_>> {
        self.names
            .get(&address)
            .map(|n| SymbolResult::with_str(address, n.as_str()))
    }
}
