//! Patch sites: which original instructions a 5-byte `jmp` displaces and whether that is safe (ARCHITECTURE.md invariant 6).

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind, Register};
use specializer::Addr;

use crate::error::UnpatchableReason;
use crate::CacheError;

/// Length of the patch: `jmp rel32`.
pub const PATCH_LEN: usize = 5;

/// Encode `jmp rel32` at `from` to `to`, or None when out of reach.
pub fn jmp_rel32(from: u64, to: u64) -> Option<[u8; 5]> {
    let rel = (to as i64).wrapping_sub(from.wrapping_add(5) as i64);
    let rel = i32::try_from(rel).ok()?;
    let mut b = [0xe9, 0, 0, 0, 0];
    b[1..].copy_from_slice(&rel.to_le_bytes());
    Some(b)
}

/// The original instructions a patch at `site` displaces.
#[derive(Debug, Clone)]
pub struct PatchSite {
    pub site: Addr,
    /// Decoded original instructions (with their original IPs), covering at least [`PATCH_LEN`] bytes.
    pub displaced: Vec<Instruction>,
    /// Exact original bytes of the displaced instructions (what unpatching restores).
    pub original: Vec<u8>,
}

impl PatchSite {
    pub fn len(&self) -> usize {
        self.original.len()
    }
    pub fn is_empty(&self) -> bool {
        self.original.is_empty()
    }
    /// Whether `a` lies strictly inside the displaced bytes (not at their first byte).
    pub fn strictly_inside(&self, a: u64) -> bool {
        a > self.site.0 && a < self.site.0 + self.len() as u64
    }
}

/// Decide which instructions at `site` a patch displaces and check the static half of ARCHITECTURE.md invariant 6.
///
/// `region` is the original code of the function around the site (`region_start` is its address); `read`
/// reads other target memory (jump tables). Refuses (typed error) when in doubt:
/// - an instruction in the displaced bytes is a call, a system call/interrupt, undecodable, or ends the flow
///   before the patch length is reached;
/// - a direct branch anywhere in the region targets the displaced bytes strictly after the site;
/// - a jump table found by the heuristic below has an entry there.
///
/// Jump tables: gcc/clang emit `lea reg, [rip+table]` followed by `movsxd reg, [reg+idx*4]` (entries relative
/// to the table) or `jmp [table+idx*8]` (absolute entries). Every RIP-relative `lea` to data outside the region
/// is scanned as 32-bit relative entries and every `[disp+idx*8]` operand as 64-bit absolute entries, until the
/// first entry that points outside the region. Code that computes branch targets some other way is not
/// recognised; that is the documented limit of the check.
pub fn plan_patch(
    region: &[u8],
    region_start: Addr,
    site: Addr,
    read: &dyn Fn(Addr, &mut [u8]) -> bool,
) -> Result<PatchSite, CacheError> {
    let region_end = region_start.0 + region.len() as u64;
    if site.0 < region_start.0 || site.0 >= region_end {
        return Err(CacheError::unpatchable(
            site,
            UnpatchableReason::OutsideRegion,
        ));
    }
    let off = (site.0 - region_start.0) as usize;
    let mut dec = Decoder::with_ip(64, &region[off..], site.0, DecoderOptions::NONE);
    let mut displaced = Vec::new();
    let mut len = 0usize;
    while len < PATCH_LEN {
        if !dec.can_decode() {
            return Err(CacheError::unpatchable(
                site,
                UnpatchableReason::RegionEndsInsidePatch,
            ));
        }
        let ins = dec.decode();
        if ins.is_invalid() {
            return Err(CacheError::unpatchable(
                site,
                UnpatchableReason::Undecodable,
            ));
        }
        match ins.mnemonic() {
            Mnemonic::Syscall
            | Mnemonic::Sysenter
            | Mnemonic::Int
            | Mnemonic::Int1
            | Mnemonic::Int3
            | Mnemonic::Into
            | Mnemonic::Ud2 => {
                return Err(CacheError::unpatchable(
                    site,
                    UnpatchableReason::TrapInDisplaced(ins.mnemonic()),
                ))
            }
            _ => {}
        }
        match ins.flow_control() {
            FlowControl::Next | FlowControl::ConditionalBranch => {}
            FlowControl::UnconditionalBranch
            | FlowControl::IndirectBranch
            | FlowControl::Return
                if len + ins.len() >= PATCH_LEN => {}
            other => {
                return Err(CacheError::unpatchable(
                    site,
                    UnpatchableReason::FlowInDisplaced(other),
                ))
            }
        }
        if ins.is_ip_rel_memory_operand() || ins.op_kinds().any(|k| k == OpKind::NearBranch64) {
            // Relocated by the block encoder; fine as long as it stays within reach (checked at encoding).
        }
        len += ins.len();
        displaced.push(ins);
    }
    let ps = PatchSite {
        site,
        original: region[off..off + len].to_vec(),
        displaced,
    };
    // Direct branches of the whole region.
    let mut dec = Decoder::with_ip(64, region, region_start.0, DecoderOptions::NONE);
    let mut ins = Instruction::default();
    while dec.can_decode() {
        dec.decode_out(&mut ins);
        if ins.is_invalid() {
            continue;
        }
        for i in 0..ins.op_count() {
            if matches!(
                ins.op_kind(i),
                OpKind::NearBranch64 | OpKind::NearBranch32 | OpKind::NearBranch16
            ) && ps.strictly_inside(ins.near_branch_target())
            {
                return Err(CacheError::unpatchable(
                    site,
                    UnpatchableReason::BranchIntoDisplaced(Addr(ins.ip())),
                ));
            }
        }
        let in_region = |a: u64| a >= region_start.0 && a < region_end;
        if ins.mnemonic() == Mnemonic::Lea && ins.is_ip_rel_memory_operand() {
            let table = ins.ip_rel_memory_address();
            if !in_region(table) {
                let mut b = [0u8; 4];
                for k in 0..4096u64 {
                    if !read(Addr(table + 4 * k), &mut b) {
                        break;
                    }
                    let t = table.wrapping_add(i32::from_le_bytes(b) as i64 as u64);
                    if !in_region(t) {
                        break;
                    }
                    if ps.strictly_inside(t) {
                        return Err(CacheError::unpatchable(
                            site,
                            UnpatchableReason::JumpTableIntoDisplaced(Addr(table)),
                        ));
                    }
                }
            }
        }
        let has_mem = (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Memory);
        if has_mem
            && ins.memory_index() != Register::None
            && ins.memory_index_scale() == 8
            && ins.memory_displacement64() != 0
        {
            let table = ins.memory_displacement64();
            let mut b = [0u8; 8];
            for k in 0..4096u64 {
                if !read(Addr(table + 8 * k), &mut b) {
                    break;
                }
                let t = u64::from_le_bytes(b);
                if !in_region(t) {
                    break;
                }
                if ps.strictly_inside(t) {
                    return Err(CacheError::unpatchable(
                        site,
                        UnpatchableReason::JumpTableIntoDisplaced(Addr(table)),
                    ));
                }
            }
        }
    }
    Ok(ps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_read(_: Addr, _: &mut [u8]) -> bool {
        false
    }

    #[test]
    fn displaces_whole_instructions() {
        // mov eax, [rdi] (2) ; add rdi, 4 (4) ; cmp eax, 3 (3) ; jne -> start (2)
        let code = [
            0x8b, 0x07, 0x48, 0x83, 0xc7, 0x04, 0x83, 0xf8, 0x03, 0x75, 0xf5,
        ];
        let p = plan_patch(&code, Addr(0x1000), Addr(0x1000), &no_read).expect("patchable");
        assert_eq!(p.len(), 6);
        assert_eq!(p.displaced.len(), 2);
        assert!(
            p.strictly_inside(0x1002) && !p.strictly_inside(0x1000) && !p.strictly_inside(0x1006)
        );
    }

    #[test]
    fn refuses_branch_into_displaced_bytes() {
        // 0x1000: mov eax,[rdi] ; 0x1002: add rdi,4 ; jne 0x1002
        let code = [0x8b, 0x07, 0x48, 0x83, 0xc7, 0x04, 0x75, 0xfa];
        let e = plan_patch(&code, Addr(0x1000), Addr(0x1000), &no_read).unwrap_err();
        assert!(
            matches!(
                e,
                CacheError::Unpatchable {
                    reason: UnpatchableReason::BranchIntoDisplaced(Addr(0x1006)),
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn refuses_syscall_and_calls() {
        let reason = |code: &[u8]| match plan_patch(code, Addr(0x1000), Addr(0x1000), &no_read) {
            Err(CacheError::Unpatchable { reason, .. }) => Some(reason),
            _ => None,
        };
        assert_eq!(
            reason(&[0x0f, 0x05, 0x90, 0x90, 0x90, 0x90]),
            Some(UnpatchableReason::TrapInDisplaced(Mnemonic::Syscall))
        );
        assert_eq!(
            reason(&[0xe8, 0, 0, 0, 0, 0x90]),
            Some(UnpatchableReason::FlowInDisplaced(FlowControl::Call))
        );
    }
}
