//! A specialized variant: emitted instructions, exits, deopt map; encoding and text rendering.

use crate::{Addr, DeoptEntry, Exit, ExitReason, KnownState, SpecializeError, Stats};
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
    /// The original instruction whose folding or re-emission emitted this (None: glue where paths join code
    /// already emitted or values are widened). Not always `orig`: code emitted after a store resumes after it.
    pub source: Option<Addr>,
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
    /// The original instructions walked, sorted by address.
    pub(crate) original: Vec<Original>,
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

    /// Whether the variant loops within itself: some branch of its code goes back to code emitted at or before
    /// it. A variant that does not runs once per entry, from its stub to one of its exits, so every pass through
    /// the trigger pays for the stub and the exit.
    pub fn loops(&self) -> bool {
        let mut defined: std::collections::HashSet<u64> = std::collections::HashSet::new();
        for e in &self.items {
            let ip = e.ins.ip();
            if is_label(ip) {
                defined.insert(ip);
            }
            if !e.is_data
                && e.ins.op_count() > 0
                && e.ins.op0_kind() == OpKind::NearBranch64
                && defined.contains(&e.ins.near_branch_target())
            {
                return true;
            }
        }
        false
    }

    /// Whether the specializer walked the original instruction at `addr` (the variant's code covers it).
    pub fn covers(&self, addr: Addr) -> bool {
        self.original.iter().any(|o| o.ins.ip() == addr.0)
    }

    /// Whether the variant's own code reaches `addr` again after entering there: the specializer walked `addr`
    /// in more than one state (passes inlined one after another), or a branch inside the variant goes back to
    /// its code for `addr` or to its entry. Such passes do not go through a dispatch stub at `addr`.
    pub fn revisits(&self, addr: Addr) -> bool {
        if self
            .original
            .iter()
            .any(|o| o.ins.ip() == addr.0 && o.visits > 1)
        {
            return true;
        }
        // Code for `addr` that is an exit back to it (through the stub there) is not a revisit.
        let exits: std::collections::HashSet<usize> = self.exit_items.iter().copied().collect();
        let mut at: std::collections::HashSet<u64> = self
            .items
            .iter()
            .enumerate()
            .filter(|(i, e)| {
                !e.is_data && is_label(e.ins.ip()) && e.orig == addr && !exits.contains(i)
            })
            .map(|(_, e)| e.ins.ip())
            .collect();
        if let Some(first) = self.items.first().filter(|e| is_label(e.ins.ip())) {
            at.insert(first.ins.ip());
        }
        self.items.iter().any(|e| {
            !e.is_data
                && e.ins.op_count() > 0
                && e.ins.op0_kind() == OpKind::NearBranch64
                && at.contains(&e.ins.near_branch_target())
        })
    }

    /// Residual code as Intel-syntax lines, one per emitted instruction;
    /// labels as `L3:` lines (numbered in emission order), branches to
    /// emitted code as `L3`, exits as `jmp 0x401234`.
    pub fn residual_asm(&self) -> Vec<String> {
        self.listing().into_iter().map(|l| l.asm).collect()
    }

    /// The residual code as [`Variant::residual_asm`] prints it, each line with the original address it stands
    /// for and what it is (a label, code, the set-up and jump of an exit, data).
    pub fn listing(&self) -> Vec<ListingLine> {
        let mut names: HashMap<u64, String> = HashMap::new();
        for e in &self.items {
            let ip = e.ins.ip();
            if is_label(ip) && !names.contains_key(&ip) {
                let n = names.len();
                names.insert(ip, format!("L{n}"));
            }
        }
        // Each exit's items: from its first (materialization) to its jump, the first branch out of the variant.
        let mut exit_of: HashMap<usize, Option<usize>> = HashMap::new();
        for (k, &first) in self.exit_items.iter().enumerate() {
            let jump = (first..self.items.len()).find(|&i| {
                let ins = &self.items[i].ins;
                !self.items[i].is_data
                    && ins.op_count() > 0
                    && ins.op0_kind() == OpKind::NearBranch64
                    && !is_label(ins.near_branch_target())
            });
            let Some(jump) = jump else { continue };
            for i in first..jump {
                exit_of.insert(i, None);
            }
            exit_of.insert(jump, Some(k));
        }
        let mut fmt = formatter(Some(Box::new(Labels {
            names: names.clone(),
        })));
        let mut out = Vec::new();
        for (i, e) in self.items.iter().enumerate() {
            let ip = e.ins.ip();
            if let Some(n) = names.get(&ip) {
                out.push(ListingLine {
                    orig: e.orig,
                    asm: format!("{n}:"),
                    kind: LineKind::Label,
                });
            }
            let mut s = String::new();
            if e.is_data && e.ins.op0_kind() != OpKind::Register {
                s = format!("db {:#x}", e.ins.get_declare_byte_value(0));
            } else {
                fmt.format(&e.ins, &mut s);
            }
            let (kind, orig) = if e.is_data {
                (LineKind::Data, e.orig)
            } else {
                match (exit_of.get(&i), e.source) {
                    (Some(Some(k)), _) => (
                        LineKind::Exit {
                            target: self.exits[*k].target,
                            reason: self.exits[*k].reason,
                        },
                        e.orig,
                    ),
                    (Some(None), _) => (LineKind::ExitSetup, e.orig),
                    (None, Some(source)) => (LineKind::Code, source),
                    (None, None) => (LineKind::Join, e.orig),
                }
            };
            out.push(ListingLine { orig, asm: s, kind });
        }
        out
    }

    /// The original instructions the specializer walked, by address, in Intel syntax, with how often each was
    /// walked and how many of those walks emitted code (none: folded away everywhere).
    pub fn original_listing(&self) -> Vec<OriginalLine> {
        let mut fmt = formatter(None);
        self.original
            .iter()
            .map(|o| {
                let mut s = String::new();
                fmt.format(&o.ins, &mut s);
                OriginalLine {
                    address: Addr(o.ins.ip()),
                    asm: s,
                    visits: o.visits,
                    emitted: o.emitted,
                }
            })
            .collect()
    }

    /// Number of emitted instructions (materialization included, data excluded).
    pub fn instruction_count(&self) -> usize {
        self.items.iter().filter(|e| !e.is_data).count()
    }
}

/// The Intel-syntax formatter of every listing: lower-case hex with `0x`, no size hints on branches.
fn formatter(labels: Option<Box<dyn SymbolResolver>>) -> IntelFormatter {
    let mut fmt = IntelFormatter::with_options(labels, None);
    let o = fmt.options_mut();
    o.set_uppercase_hex(false);
    o.set_hex_prefix("0x");
    o.set_hex_suffix("");
    o.set_space_after_operand_separator(true);
    o.set_show_branch_size(false);
    o.set_rip_relative_addresses(false);
    o.set_branch_leading_zeros(false);
    o.set_leading_zeros(false);
    fmt
}

/// What a line of [`Variant::listing`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineKind {
    /// `L3:`, a branch target inside the variant.
    Label,
    /// Residual code of the original instruction at `orig`.
    Code,
    /// Code before the instruction at `orig`, not its own: a jump where the path joins code already emitted, or
    /// folded values written back where they are widened.
    Join,
    /// Materialization of folded values before an exit (`orig` is the exit's target).
    ExitSetup,
    /// The jump of an exit back to the original code.
    Exit { target: Addr, reason: ExitReason },
    /// Data bytes (flag materialization operands).
    Data,
}

/// One line of [`Variant::listing`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListingLine {
    /// The original address the line stands for: for code, the instruction it comes from; for an exit and its
    /// set-up, the exit's target; for a join, where the paths join; for a label, what it labels.
    pub orig: Addr,
    pub asm: String,
    pub kind: LineKind,
}

/// One line of [`Variant::original_listing`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OriginalLine {
    pub address: Addr,
    pub asm: String,
    /// Times the specializer walked it (once per abstract state), and how many of those emitted code.
    pub visits: u32,
    pub emitted: u32,
}

/// An original instruction the specializer walked.
#[derive(Clone, Debug)]
pub(crate) struct Original {
    pub ins: Instruction,
    pub visits: u32,
    pub emitted: u32,
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

#[cfg(test)]
mod tests {
    use crate::snippet::Snippet;
    use crate::{Addr, ExitReason, Gpr, LineKind};

    #[test]
    fn listings_pair_residual_lines_with_original_addresses() {
        // 0x1000: mov rax, rcx (rcx known: folded); 0x1003: add rax, rdx (kept); 0x1006: mov esi, 7 (folded);
        // falls off the end at 0x100b.
        let code = vec![0x48, 0x89, 0xc8, 0x48, 0x01, 0xd0, 0xbe, 7, 0, 0, 0];
        let mut s = Snippet::new(Addr(0x1000), code);
        s.known.set_reg(Gpr::Rcx, Some(5));
        let f = s.fold().expect("folds");
        let orig = f.variant.original_listing();
        let addrs: Vec<u64> = orig.iter().map(|o| o.address.0).collect();
        assert_eq!(addrs, [0x1000, 0x1003, 0x1006]);
        assert_eq!(orig[0].asm, "mov rax, rcx");
        assert_eq!((orig[0].visits, orig[0].emitted), (1, 0), "{orig:?}");
        assert_eq!((orig[1].visits, orig[1].emitted), (1, 1), "{orig:?}");
        assert_eq!((orig[2].visits, orig[2].emitted), (1, 0), "{orig:?}");
        let lines = f.variant.listing();
        assert_eq!(
            lines.iter().map(|l| l.asm.clone()).collect::<Vec<_>>(),
            f.residual
        );
        let code: Vec<_> = lines.iter().filter(|l| l.kind == LineKind::Code).collect();
        assert!(code.iter().all(|l| l.orig == Addr(0x1003)), "{lines:?}");
        let last = lines.last().expect("an exit");
        assert_eq!(
            last.kind,
            LineKind::Exit {
                target: Addr(0x100b),
                reason: ExitReason::LeftRegion
            }
        );
        // The folded esi is materialized before the exit, for the exit's target.
        assert!(
            lines.iter().any(|l| l.kind == LineKind::ExitSetup
                && l.asm == "mov esi, 7"
                && l.orig == Addr(0x100b)),
            "{lines:?}"
        );
    }
}
