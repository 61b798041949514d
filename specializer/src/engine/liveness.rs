//! Flag liveness: which status flags code from an address may read before writing them, and dropping dead ones from a state.

use super::state::{
    conditional_flag_write, flag_mask, written_flags, AbsState, STATUS, STATUS_FLAGS,
};
use super::Engine;
use crate::Addr;
use iced_x86::{FlowControl, OpKind};
use std::collections::HashMap;

impl Engine<'_> {
    /// Status flags that may be read on some path from `addr` before being
    /// written (conservative: unknown control flow means live).
    pub(super) fn live_flags(&mut self, addr: Addr) -> u8 {
        if let Some(&m) = self.live_cache.get(&addr) {
            return m;
        }
        let mut live = 0u8;
        let mut work = vec![(addr, STATUS)];
        let mut seen: HashMap<Addr, u8> = HashMap::new();
        let mut steps = 0;
        while let Some((a, mut pending)) = work.pop() {
            let mut a = a;
            loop {
                if pending == 0 {
                    break;
                }
                let prev = seen.get(&a).copied().unwrap_or(0);
                if pending & !prev == 0 {
                    break;
                }
                seen.insert(a, prev | pending);
                steps += 1;
                if steps > 400 {
                    live |= pending;
                    break;
                }
                let Some(ins) = self.decode(a) else {
                    live |= pending;
                    break;
                };
                live |= flag_mask(ins.rflags_read()) & pending;
                if !conditional_flag_write(&ins) {
                    pending &= !written_flags(&ins);
                }
                if pending == 0 {
                    break;
                }
                match ins.flow_control() {
                    FlowControl::Next => a = Addr(ins.next_ip()),
                    FlowControl::UnconditionalBranch if ins.op0_kind() == OpKind::NearBranch64 => {
                        a = Addr(ins.near_branch_target())
                    }
                    FlowControl::ConditionalBranch if ins.op0_kind() == OpKind::NearBranch64 => {
                        work.push((Addr(ins.near_branch_target()), pending));
                        a = Addr(ins.next_ip());
                    }
                    _ => {
                        live |= pending;
                        break;
                    }
                }
            }
        }
        self.live_cache.insert(addr, live);
        live
    }

    /// Drop flags that are dead at `addr` so equivalent states compare equal.
    pub(super) fn canonicalize(&mut self, addr: Addr, st: &mut AbsState) {
        let live = self.live_flags(addr);
        for f in STATUS_FLAGS {
            if live & (1 << f as u8) == 0 {
                st.flags[f as usize] = None;
            }
        }
        st.normalize();
    }
}
