//! The abstract state ([`AbsState`]) and status-flag helpers: iced flag masks, rebuilding folded flags with a `cmp`, refining them after a branch.

use crate::sem::{self, Flags};
use crate::{Flag, Gpr, KnownState};
use iced_x86::{ConditionCode, Instruction, Mnemonic, RflagsBits};
use std::sync::OnceLock;

/// The six status flags (everything but DF), as a bit mask over `Flag as usize`.
pub(super) const STATUS: u8 = 0b101_1111;
pub(super) const STATUS_FLAGS: [Flag; 6] =
    [Flag::Cf, Flag::Pf, Flag::Af, Flag::Zf, Flag::Sf, Flag::Of];

/// Abstract state: each GPR unknown or known (with a bit telling whether the
/// real register holds the value), the flags likewise. `fmat == false` means
/// the known status flags are folded (the real flags are stale) and unknown
/// status flags are don't-care (undefined or dead).
#[derive(Clone, Debug, Default)]
pub(super) struct AbsState {
    pub(super) regs: [Option<u64>; 16],
    pub(super) rmat: u16,
    pub(super) flags: Flags,
    pub(super) fmat: bool,
    /// Store forwarding: each (base, disp, reg) says the real qword at
    /// `[base + disp]` equals the real register `reg`. Only real writes
    /// (emitted code) invalidate them; folded writes leave real registers alone.
    /// A `None` base is an absolute address (`disp` alone).
    pub(super) facts: Vec<(Option<Gpr>, i64, Gpr)>,
    /// Stack slots (`slots.rs`): each (disp, value, static) says the variant's own code stored `value` to the
    /// qword at `[rsp + disp]` (rsp unchanged since). Not an assumption: a reload compares the real qword with
    /// `value` and leaves the variant when they differ. `static`: the value came from constant memory or the
    /// entry state (widening keeps it, as it keeps such registers).
    pub(super) slots: Vec<(i64, u64, bool)>,
    /// Widening hint, not part of the state's identity: registers whose
    /// value came from constant memory or the entry state (directly or by
    /// folded arithmetic on such values). These take finitely many values.
    pub(super) stat: u16,
}

impl PartialEq for AbsState {
    fn eq(&self, o: &AbsState) -> bool {
        self.regs == o.regs
            && self.rmat == o.rmat
            && self.flags == o.flags
            && self.fmat == o.fmat
            && self.facts == o.facts
            && self.slots == o.slots
    }
}

impl Eq for AbsState {}

impl std::hash::Hash for AbsState {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.regs.hash(h);
        self.rmat.hash(h);
        self.flags.hash(h);
        self.fmat.hash(h);
        self.facts.hash(h);
        self.slots.hash(h);
    }
}

impl AbsState {
    pub(super) fn from_known(k: &KnownState) -> AbsState {
        let mut s = AbsState {
            regs: k.regs,
            rmat: 0xffff,
            flags: k.flags,
            fmat: true,
            facts: Vec::new(),
            slots: Vec::new(),
            stat: 0,
        };
        for g in Gpr::ALL {
            if s.get(g).is_some() {
                s.stat |= 1 << g.index();
            }
        }
        s.normalize();
        s
    }

    /// Unknown registers carry no materialized bit, so equal states hash equal.
    pub(super) fn normalize(&mut self) {
        for i in 0..16 {
            if self.regs[i].is_none() {
                self.rmat &= !(1 << i);
            }
        }
        if (0..7).all(|i| i == Flag::Df as usize || self.flags[i].is_none()) {
            self.fmat = true;
        }
        self.facts.sort();
        self.facts.dedup();
        self.slots.sort();
        self.slots.dedup();
    }

    pub(super) fn get(&self, g: Gpr) -> Option<u64> {
        self.regs[g.index()]
    }

    pub(super) fn is_mat(&self, g: Gpr) -> bool {
        self.rmat & (1 << g.index()) != 0
    }

    pub(super) fn set(&mut self, g: Gpr, v: Option<u64>, mat: bool) {
        self.regs[g.index()] = v;
        self.stat &= !(1 << g.index());
        if v.is_some() && mat {
            self.rmat |= 1 << g.index();
        } else {
            self.rmat &= !(1 << g.index());
        }
    }

    /// What the deopt map must restore at this point: folded registers and flags.
    pub(super) fn folded(&self) -> KnownState {
        let mut k = KnownState::default();
        for g in Gpr::ALL {
            if let Some(v) = self.get(g) {
                if !self.is_mat(g) {
                    k.set_reg(g, Some(v));
                }
            }
        }
        if !self.fmat {
            for f in STATUS_FLAGS {
                k.set_flag(f, self.flags[f as usize]);
            }
        }
        k
    }

    /// A real write to `g`: forget facts that mention it.
    pub(super) fn real_write(&mut self, g: Gpr) {
        self.facts.retain(|f| f.0 != Some(g) && f.2 != g);
    }

    /// A real memory write of `size` bytes at `[base + disp]` (base `None`: the absolute address `disp`; `at`
    /// `None`: anywhere). Facts on another base may alias it and are dropped.
    pub(super) fn mem_write(&mut self, at: Option<(Option<Gpr>, i64, u64)>) {
        match at {
            None => self.facts.clear(),
            Some((b, d, size)) => self.facts.retain(|f| {
                f.0 == b && (f.1.wrapping_add(8) <= d || d.wrapping_add(size as i64) <= f.1)
            }),
        }
    }

    /// Whether the real register holds what the abstract state says.
    pub(super) fn is_real(&self, g: Gpr) -> bool {
        self.get(g).is_none() || self.is_mat(g)
    }

    pub(super) fn known(&self) -> KnownState {
        KnownState {
            regs: self.regs,
            flags: self.flags,
        }
    }

    pub(super) fn all_unknown(&mut self) {
        *self = AbsState {
            fmat: true,
            ..AbsState::default()
        };
    }
}

/// Map an iced RflagsBits mask to our `Flag` bit mask.
pub(super) fn flag_mask(bits: u32) -> u8 {
    let mut m = 0u8;
    for (b, f) in [
        (RflagsBits::CF, Flag::Cf),
        (RflagsBits::PF, Flag::Pf),
        (RflagsBits::AF, Flag::Af),
        (RflagsBits::ZF, Flag::Zf),
        (RflagsBits::SF, Flag::Sf),
        (RflagsBits::DF, Flag::Df),
        (RflagsBits::OF, Flag::Of),
    ] {
        if bits & b != 0 {
            m |= 1 << (f as u8);
        }
    }
    m
}

pub(super) fn written_flags(ins: &Instruction) -> u8 {
    flag_mask(ins.rflags_modified())
}

/// Whether the instruction may leave the flags it "modifies" unchanged
/// (shift/rotate by a count that may be zero).
pub(super) fn conditional_flag_write(ins: &Instruction) -> bool {
    use Mnemonic as M;
    matches!(
        ins.mnemonic(),
        M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shld | M::Shrd
    ) && ins.op_count() > 0
        && match ins.try_immediate(ins.op_count() - 1) {
            Ok(v) => v & 31 == 0,
            // A register count may be zero.
            Err(_) => true,
        }
}

/// Lookup table: for (known-mask, values) over the 6 status flags, an 8-bit
/// `cmp a, b` pair producing them.
fn cmp_table() -> &'static Vec<Option<(u8, u8)>> {
    static T: OnceLock<Vec<Option<(u8, u8)>>> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = vec![None; 64 * 64];
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                let f = sem::cmp8_flags(a, b);
                let mut v = 0usize;
                for (i, fl) in STATUS_FLAGS.iter().enumerate() {
                    if f[*fl as usize] == Some(true) {
                        v |= 1 << i;
                    }
                }
                for m in 0..64usize {
                    let k = m * 64 + (v & m);
                    if t[k].is_none() {
                        t[k] = Some((a, b));
                    }
                }
            }
        }
        t
    })
}

/// An 8-bit compare producing every known flag of `want` (unknown ones free).
pub(super) fn cmp_for(want: &Flags) -> Option<(u8, u8)> {
    let mut m = 0usize;
    let mut v = 0usize;
    for (i, fl) in STATUS_FLAGS.iter().enumerate() {
        if let Some(b) = want[*fl as usize] {
            m |= 1 << i;
            if b {
                v |= 1 << i;
            }
        }
    }
    cmp_table()[m * 64 + v]
}

/// Whether [`Engine::mat_flags`] can rebuild these flags (cmp, then stc/clc).
pub(super) fn flags_rebuildable(want: &Flags) -> bool {
    let mut no_cf = *want;
    no_cf[Flag::Cf as usize] = None;
    cmp_for(want).is_some() || cmp_for(&no_cf).is_some()
}

/// After a residual conditional branch the real flags satisfy (or fail)
/// its condition; record what that pins down exactly.
pub(super) fn refine_flags(cc: ConditionCode, taken: bool, st: &mut AbsState) {
    use ConditionCode as C;
    if !st.fmat {
        return;
    }
    let mut set = |f: Flag, v: bool| st.flags[f as usize] = Some(v);
    match (cc, taken) {
        (C::e, t) | (C::ne, t) => set(Flag::Zf, t == (cc == C::e)),
        (C::b, t) | (C::ae, t) => set(Flag::Cf, t == (cc == C::b)),
        (C::s, t) | (C::ns, t) => set(Flag::Sf, t == (cc == C::s)),
        (C::o, t) | (C::no, t) => set(Flag::Of, t == (cc == C::o)),
        (C::p, t) | (C::np, t) => set(Flag::Pf, t == (cc == C::p)),
        // a: CF=0 and ZF=0
        (C::a, true) | (C::be, false) => {
            set(Flag::Cf, false);
            set(Flag::Zf, false);
        }
        // g: ZF=0 and SF=OF
        (C::g, true) | (C::le, false) => set(Flag::Zf, false),
        _ => {}
    }
}
