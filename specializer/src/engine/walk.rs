//! The worklist walk: one path per pending (label, address, state), linking to code already emitted, widening, and the (address, state) -> label map.

use super::state::{AbsState, STATUS_FLAGS};
use super::{Engine, Next};
use crate::{Addr, ExitReason, Gpr, SpecializeError};

/// Copies of the code at one address and state that differ only in store-forwarding facts (see `link_target`).
const MAX_FACT_COPIES: u32 = 2;

impl Engine<'_> {
    pub(super) fn walk(
        &mut self,
        label: u32,
        addr: Addr,
        st: AbsState,
    ) -> Result<(), SpecializeError> {
        self.place(label);
        let mut ip = addr;
        let mut st = st;
        let mut first = true;
        loop {
            if !self.in_region(ip) {
                return self.exit(ip, ExitReason::LeftRegion, &mut st);
            }
            if let Some((at, g)) = self.opts().redispatch_at {
                if ip == at && st.regs[g.index()].is_none() {
                    return self.exit(ip, ExitReason::Redispatch, &mut st);
                }
            }
            self.canonicalize(ip, &mut st);
            if !first {
                if let Some(l) = self.link_target(ip, &mut st) {
                    self.jump_label(l, ip, &mut st);
                    return Ok(());
                }
            }
            if self.budget_hit {
                return self.exit(ip, ExitReason::Budget, &mut st);
            }
            if !first {
                self.widen(ip, &mut st)?;
                if let Some(l) = self.link_target(ip, &mut st) {
                    self.jump_label(l, ip, &mut st);
                    return Ok(());
                }
                let l = self.new_label();
                self.place(l);
                self.remember(ip, &st, l, true);
            } else {
                self.remember(ip, &st, label, false);
            }
            let seen = self.seen_at.entry(ip).or_default();
            seen.count += 1;
            for i in 0..16 {
                seen.values[i].insert(st.regs[i]);
            }
            seen.flags.insert((st.flags, st.fmat));
            first = false;
            // Stop before an instruction that would not fit the budget.
            if let Some(ins) = self.decode(ip) {
                if self.est_bytes + ins.len() > self.opts().max_code_bytes {
                    self.budget_hit = true;
                    return self.exit(ip, ExitReason::Budget, &mut st);
                }
            }
            self.stats.visited += 1;
            // Bound the work even when nothing is emitted (fully folded loops).
            if self.stats.visited > 100_000 + 4 * self.opts().max_code_bytes {
                self.budget_hit = true;
            }
            let before = self.items.len();
            self.stepping = Some(ip);
            let next = self.step(ip, &mut st);
            self.stepping = None;
            let next = next?;
            let c = self.coverage.entry(ip).or_default();
            c.0 += 1;
            c.1 += u32::from(self.items.len() > before);
            match next {
                Next::Continue(n) => ip = n,
                Next::Stop => return Ok(()),
            }
        }
    }

    /// After too many distinct states at `ip`, forget what differs.
    ///
    /// Registers that served as the address of a folded constant load (an
    /// interpreter's pc, a table index) are what makes specialization pay;
    /// they are kept up to a much higher bound, so a bytecode program
    /// unrolls while a plain loop counter is widened after a few states.
    /// The code budget and the visit limit bound the rest.
    fn widen(&mut self, ip: Addr, st: &mut AbsState) -> Result<(), SpecializeError> {
        let max = self.opts().max_states_per_address.max(1) as usize;
        let hard = max.saturating_mul(32).max(1024);
        let Some(seen) = self.seen_at.get(&ip) else {
            return Ok(());
        };
        if seen.count < max {
            return Ok(());
        }
        let flags_differ = seen.flags.len() > 1 || !seen.flags.contains(&(st.flags, st.fmat));
        let below_hard = seen.count < hard;
        let mut widen_regs = 0u16;
        for g in Gpr::ALL {
            let i = g.index();
            let distinct =
                seen.values[i].len() + usize::from(!seen.values[i].contains(&st.regs[i]));
            if distinct <= 1 {
                continue;
            }
            // Below the hard bound keep registers that address constant
            // loads and registers that only took a few distinct values
            // (they cannot drive an unbounded unrolling on their own).
            // A pointer into constant memory (a bytecode pc, its successor,
            // a table) is what specialization feeds on; keep it too.
            let points_to_constant =
                st.regs[i].is_some_and(|v| self.mem.is_constant(Addr(v).page()));
            let is_static =
                self.static_regs & (1 << i) != 0 || points_to_constant || st.stat & (1 << i) != 0;
            if below_hard && (is_static || distinct <= max) {
                continue;
            }
            widen_regs |= 1 << i;
        }
        for g in Gpr::ALL {
            if widen_regs & (1 << g.index()) != 0 {
                self.mat_reg(g, ip, st);
                st.set(g, None, false);
            }
        }
        if !below_hard {
            st.facts.clear();
            st.slots.clear();
        } else {
            // Like registers: a slot holding a value of constant memory (a spilled bytecode pc) drives the
            // unrolling; any other (a spilled loop counter) would unroll a plain loop.
            st.slots.retain(|s| s.2);
        }
        // Flags take finitely many values; widen them only at the hard bound.
        if !below_hard && flags_differ {
            let live = self.live_flags(ip);
            self.mat_flags(live, ip, st)?;
            for f in STATUS_FLAGS {
                st.flags[f as usize] = None;
            }
        }
        st.normalize();
        Ok(())
    }

    /// The label for (addr, state), queueing it for emission when new.
    /// Branch targets carry no store-forwarding facts (a taken branch may be
    /// a loop's back edge; see `link_target`): facts live only along the
    /// path being walked, and paths that join share the code after the join.
    pub(super) fn label_for(&mut self, addr: Addr, st: &AbsState) -> u32 {
        let mut st = st.clone();
        st.facts.clear();
        self.canonicalize(addr, &mut st);
        if let Some(l) = self.link_target(addr, &mut st) {
            return l;
        }
        let l = self.new_label();
        self.remember(addr, &st, l, true);
        self.pending.push_back((l, addr, st));
        l
    }

    /// Record the label of (addr, st); `replace`: over an earlier one.
    fn remember(&mut self, addr: Addr, st: &AbsState, l: u32, replace: bool) {
        if replace {
            self.key_label.insert((addr, st.clone()), l);
        } else {
            self.key_label.entry((addr, st.clone())).or_insert(l);
        }
        if !st.facts.is_empty() {
            let mut bare = st.clone();
            bare.facts.clear();
            *self.fact_copies.entry((addr, bare)).or_default() += 1;
        }
    }

    /// The label to link to for (addr, st), if any.
    ///
    /// Store-forwarding facts never survive a loop of the variant: a link
    /// into code already emitted may close a loop, so such a link drops the
    /// facts and targets the fact-free state (forgetting is always correct:
    /// the real memory is unchanged). Every iteration therefore re-reads
    /// memory at least once, and a flag written by a signal handler or
    /// another thread is seen. A state whose fact-free twin already exists
    /// with [`MAX_FACT_COPIES`] fact-carrying copies links to the twin too,
    /// so facts cannot multiply the code.
    fn link_target(&mut self, addr: Addr, st: &mut AbsState) -> Option<u32> {
        if let Some(&l) = self.key_label.get(&(addr, st.clone())) {
            let placed = self.labels.get(l as usize).copied().flatten().is_some();
            if st.facts.is_empty() || !placed {
                return Some(l);
            }
        }
        if st.facts.is_empty() {
            return None;
        }
        let mut bare = st.clone();
        bare.facts.clear();
        let copies = self
            .fact_copies
            .get(&(addr, bare.clone()))
            .copied()
            .unwrap_or(0);
        let l = self.key_label.get(&(addr, bare)).copied();
        if l.is_some() && copies >= MAX_FACT_COPIES {
            st.facts.clear();
            return l;
        }
        // Back edge into placed code with facts: continue fact-free.
        if self.key_label.contains_key(&(addr, st.clone())) {
            st.facts.clear();
            return l;
        }
        None
    }
}
