//! Deoptimization: moving threads, saved signal contexts and return addresses out of dead code; evacuation
//! before a signal handler.

use std::collections::{BTreeMap, BTreeSet};

use specializer::{Addr, Flag, Gpr, KnownState};
use tracer::{mapping_at, read_maps, Pid, Tracer};

use super::{Cache, InstallId, VariantId, World, STACK_SCAN_LIMIT};
use crate::arena::publish;
use crate::stub::{jmp_rel32, Rollback, PATCH_LEN};
use crate::CacheError;

impl Cache {
    /// Move one stopped thread out of the live variants of `installs` to the matching original instruction
    /// (deoptimize), leaving every variant installed: the thread re-enters at the next trigger. Used before a
    /// signal handler runs on a thread whose variant may hold memory values in registers. Returns whether the
    /// thread was inside one (and moved).
    pub fn evacuate(
        &self,
        tr: &mut Tracer,
        tid: Pid,
        installs: &BTreeSet<InstallId>,
    ) -> Result<bool, CacheError> {
        let variants: BTreeSet<VariantId> = installs
            .iter()
            .filter_map(|i| self.installs.get(i))
            .flat_map(|i| i.variants.iter().copied())
            .filter(|v| self.variants.get(v).is_some_and(|v| v.alive))
            .collect();
        if variants.is_empty() {
            return Ok(false);
        }
        let mut r = tr.regs(tid)?;
        // Stubs never hold memory values: only variants are left (no install is passed for stub rollback).
        let moved = self.relocate(
            tr,
            self.pid,
            tid,
            &mut r,
            &variants,
            &BTreeSet::new(),
            false,
        )?;
        if moved {
            tr.set_regs(tid, &r)?;
        }
        Ok(moved)
    }

    /// Move every thread of `pid` out of `dead` variants (deoptimize) and out of the stubs of `installs`, and
    /// rewrite signal frames whose saved context is there. `child`: `pid` is a stripped fork child, where no
    /// patch is active. Returns how many contexts were changed.
    pub(super) fn move_threads(
        &self,
        tr: &mut Tracer,
        world: &World,
        dead: &BTreeSet<VariantId>,
        installs: &BTreeSet<InstallId>,
        child: bool,
    ) -> Result<usize, CacheError> {
        let pid = world.pid;
        let mut moved = 0;
        for tid in tr.threads(pid) {
            if world.parked(tid).is_some() {
                // Outside generated code (checked by `stopped_world`): nothing to move.
                continue;
            }
            let mut r = tr.regs(tid)?;
            if self.relocate(tr, pid, tid, &mut r, dead, installs, child)? {
                tr.set_regs(tid, &r)?;
                moved += 1;
            }
        }
        moved += self.fix_sigframes(tr, world, dead, installs, child)?;
        Ok(moved)
    }

    /// Map one register context (a stopped thread's, or a saved signal context) out of dead code: inside a dead
    /// variant -> its deopt entry (folded registers and flags written, RIP := original); inside a stub ->
    /// rolled back to the trigger, or (fall-back path) left in the relocated original code while the patch
    /// exists. Memory the context refers to (saved registers) is read at its rsp. Returns whether it changed.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn relocate(
        &self,
        tr: &Tracer,
        pid: Pid,
        tid: Pid,
        r: &mut libc::user_regs_struct,
        dead: &BTreeSet<VariantId>,
        installs: &BTreeSet<InstallId>,
        child: bool,
    ) -> Result<bool, CacheError> {
        let rip = r.rip;
        let no_point = || CacheError::NoDeoptPoint {
            tid: tid.as_raw(),
            rip: Addr(rip),
        };
        if let Some(v) = dead
            .iter()
            .map(|d| &self.variants[d])
            .find(|v| v.contains(rip))
        {
            let off = (rip - v.base.0) as u32;
            let e = v
                .deopt
                .iter()
                .find(|d| d.offset == off)
                .ok_or_else(no_point)?;
            apply_state(r, &e.state);
            r.rip = if child {
                e.original.0
            } else {
                self.map_original(e.original)
            };
            return Ok(true);
        }
        let Some(inst) = installs
            .iter()
            .filter_map(|i| self.installs.get(i))
            .find(|i| i.stubs.iter().any(|s| s.contains(rip)))
        else {
            return Ok(false);
        };
        let stub = inst
            .stubs
            .iter()
            .find(|s| s.contains(rip))
            .ok_or_else(no_point)?;
        match stub.rollback_at(rip).ok_or_else(no_point)? {
            Rollback::ToTrigger {
                rsp_adj,
                rax_at,
                rcx_at,
                flags_at,
                lahf_at,
            } => {
                let mut q = [0u8; 8];
                if let Some(o) = rax_at {
                    tr.read_memory(pid, Addr(r.rsp + o), &mut q)?;
                    r.rax = u64::from_le_bytes(q);
                }
                if let Some(o) = rcx_at {
                    tr.read_memory(pid, Addr(r.rsp + o), &mut q)?;
                    r.rcx = u64::from_le_bytes(q);
                }
                if let Some(o) = flags_at {
                    tr.read_memory(pid, Addr(r.rsp + o), &mut q)?;
                    r.eflags = u64::from_le_bytes(q);
                }
                if let Some(o) = lahf_at {
                    tr.read_memory(pid, Addr(r.rsp + o), &mut q)?;
                    r.eflags = crate::stub::apply_lahf(r.eflags, u64::from_le_bytes(q));
                }
                r.rsp += rsp_adj;
                r.rip = inst.trigger.0;
                Ok(true)
            }
            // Old stub code is never overwritten: a context in a fall-back path stays there while the patch
            // exists; without the patch the original bytes are back and it goes home.
            Rollback::At(a) if child || !inst.patched => {
                r.rip = a.0;
                Ok(true)
            }
            Rollback::At(_) => Ok(false),
        }
    }

    /// Signal frames (`struct rt_sigframe`) on each thread's stack whose saved RIP lies in dead code: the saved
    /// context gets the same treatment as a stopped thread, so `sigreturn` resumes in correct code. A frame is
    /// recognised by its saved RIP (in a dead variant or an affected stub), the saved user code segment (0x33)
    /// and the always-set bits of the saved RFLAGS (bit 1 and IF) around it.
    pub(super) fn fix_sigframes(
        &self,
        tr: &mut Tracer,
        world: &World,
        dead: &BTreeSet<VariantId>,
        installs: &BTreeSet<InstallId>,
        child: bool,
    ) -> Result<usize, CacheError> {
        // Offsets in mcontext gregs (REG_R8 = 0 ... REG_CSGSFS = 18).
        const GREGS: usize = 19;
        const REG_RIP: usize = 16;
        let ranges: Vec<(u64, u64)> = dead
            .iter()
            .map(|d| &self.variants[d])
            .map(|v| (v.base.0, v.base.0 + v.len as u64))
            .chain(
                installs
                    .iter()
                    .filter_map(|i| self.installs.get(i))
                    .flat_map(|i| i.stubs.iter())
                    .map(|s| (s.base.0, s.base.0 + s.code.len() as u64)),
            )
            .collect();
        if ranges.is_empty() {
            return Ok(0);
        }
        let in_dead = |a: u64| ranges.iter().any(|(s, e)| a >= *s && a < *e);
        let pid = world.pid;
        let maps = read_maps(pid)?;
        let mut fixed = 0;
        for (tid, _, rsp) in world.positions(tr)? {
            let rsp = rsp & !7;
            let Some(m) = mapping_at(&maps, Addr(rsp)) else {
                continue;
            };
            let end = m.end.0.min(rsp.saturating_add(STACK_SCAN_LIMIT));
            let mut buf = vec![0u8; (end - rsp) as usize];
            if tr.read_memory(pid, Addr(rsp), &mut buf).is_err() {
                continue;
            }
            let q = |i: usize| -> u64 {
                u64::from_le_bytes(buf[8 * i..8 * i + 8].try_into().expect("8 bytes"))
            };
            let n = buf.len() / 8;
            for i in REG_RIP..n.saturating_sub(GREGS - REG_RIP) {
                if !in_dead(q(i)) {
                    continue;
                }
                let (efl, csgsfs) = (q(i + 1), q(i + 2));
                if efl & 0x202 != 0x202 || csgsfs & 0xffff != 0x33 {
                    continue;
                }
                let g = i - REG_RIP;
                let gregs: Vec<u64> = (0..GREGS).map(|k| q(g + k)).collect();
                // SAFETY: user_regs_struct is plain old data; all-zero is valid.
                let mut r: libc::user_regs_struct = unsafe { std::mem::zeroed() };
                (r.r8, r.r9, r.r10, r.r11) = (gregs[0], gregs[1], gregs[2], gregs[3]);
                (r.r12, r.r13, r.r14, r.r15) = (gregs[4], gregs[5], gregs[6], gregs[7]);
                (r.rdi, r.rsi, r.rbp, r.rbx) = (gregs[8], gregs[9], gregs[10], gregs[11]);
                (r.rdx, r.rax, r.rcx, r.rsp) = (gregs[12], gregs[13], gregs[14], gregs[15]);
                (r.rip, r.eflags) = (gregs[16], gregs[17]);
                if !self.relocate(tr, pid, tid, &mut r, dead, installs, child)? {
                    continue;
                }
                let out = [
                    r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rdi, r.rsi, r.rbp,
                    r.rbx, r.rdx, r.rax, r.rcx, r.rsp, r.rip, r.eflags,
                ];
                let bytes: Vec<u8> = out.iter().flat_map(|v| v.to_le_bytes()).collect();
                tr.write_memory(pid, Addr(rsp + 8 * g as u64), &bytes)?;
                fixed += 1;
            }
        }
        Ok(fixed)
    }

    /// Make every residual call of `dead` variants return to the original code: a `jmp` written at the return
    /// site when 5 bytes fit before the next site, else the return addresses on every thread's stack (from rsp
    /// to the end of its stack mapping, at most 8 MiB) are rewritten. Limit: a return address saved elsewhere
    /// (copied off the stack) is only covered by the jmp.
    pub(super) fn redirect_returns(
        &self,
        tr: &mut Tracer,
        world: &World,
        dead: &BTreeSet<VariantId>,
    ) -> Result<usize, CacheError> {
        let pid = world.pid;
        let mut count = 0;
        let mut scan: BTreeMap<u64, u64> = BTreeMap::new();
        for d in dead {
            let v = &self.variants[d];
            for (k, (site, orig)) in v.ret_sites.iter().enumerate() {
                let room = v
                    .ret_sites
                    .get(k + 1)
                    .map(|(n, _)| n.0)
                    .unwrap_or(v.base.0 + v.len as u64)
                    - site.0;
                match jmp_rel32(site.0, orig.0) {
                    Some(j) if room >= PATCH_LEN as u64 => {
                        publish(tr, pid, &self.arenas, *site, &j)?;
                        count += 1;
                    }
                    _ => {
                        scan.insert(site.0, orig.0);
                    }
                }
            }
        }
        if scan.is_empty() {
            return Ok(count);
        }
        let maps = read_maps(pid)?;
        for (_, _, rsp) in world.positions(tr)? {
            let rsp = rsp & !7;
            let Some(m) = mapping_at(&maps, Addr(rsp)) else {
                continue;
            };
            let end = m.end.0.min(rsp.saturating_add(STACK_SCAN_LIMIT));
            let mut at = rsp;
            while at < end {
                let n = (end - at).min(64 << 10) as usize;
                let mut buf = vec![0u8; n];
                tr.read_memory(pid, Addr(at), &mut buf)?;
                for (i, q) in buf.chunks_exact(8).enumerate() {
                    let val = u64::from_le_bytes(q.try_into().expect("8 bytes"));
                    if let Some(orig) = scan.get(&val) {
                        tr.write_memory(pid, Addr(at + 8 * i as u64), &orig.to_le_bytes())?;
                        count += 1;
                    }
                }
                at += n as u64;
            }
        }
        Ok(count)
    }
}

pub(super) fn reg_mut(r: &mut libc::user_regs_struct, g: Gpr) -> &mut u64 {
    match g {
        Gpr::Rax => &mut r.rax,
        Gpr::Rcx => &mut r.rcx,
        Gpr::Rdx => &mut r.rdx,
        Gpr::Rbx => &mut r.rbx,
        Gpr::Rsp => &mut r.rsp,
        Gpr::Rbp => &mut r.rbp,
        Gpr::Rsi => &mut r.rsi,
        Gpr::Rdi => &mut r.rdi,
        Gpr::R8 => &mut r.r8,
        Gpr::R9 => &mut r.r9,
        Gpr::R10 => &mut r.r10,
        Gpr::R11 => &mut r.r11,
        Gpr::R12 => &mut r.r12,
        Gpr::R13 => &mut r.r13,
        Gpr::R14 => &mut r.r14,
        Gpr::R15 => &mut r.r15,
    }
}

/// Write the folded registers and flags of `st` into `r`.
pub(super) fn apply_state(r: &mut libc::user_regs_struct, st: &KnownState) {
    for g in Gpr::ALL {
        if let Some(v) = st.reg(g) {
            *reg_mut(r, g) = v;
        }
    }
    for f in Flag::ALL {
        if let Some(v) = st.flag(f) {
            let bit = 1u64 << f.rflags_bit();
            if v {
                r.eflags |= bit;
            } else {
                r.eflags &= !bit;
            }
        }
    }
}
