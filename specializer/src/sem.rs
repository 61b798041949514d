//! Exact value and flag semantics of the modelled integer instructions, on known operands.
//!
//! Every function here is pure: operands in, result and flags out. Flags the
//! CPU leaves undefined are reported as `None` (unknown), never guessed.

use crate::Flag;

/// The six status flags plus DF, as the abstract state stores them (`None` = unknown).
pub type Flags = [Option<bool>; 7];

/// Mask of the low `bits` bits.
pub fn mask(bits: u32) -> u64 {
    if bits >= 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// The sign bit of a `bits`-wide value.
pub fn sign(v: u64, bits: u32) -> bool {
    (v >> (bits - 1)) & 1 == 1
}

/// Sign-extend the low `bits` bits of `v` to 64 bits.
pub fn sext(v: u64, bits: u32) -> u64 {
    if bits >= 64 {
        v
    } else {
        let s = 64 - bits;
        (((v << s) as i64) >> s) as u64
    }
}

/// PF: set when the low byte has an even number of one bits.
pub fn parity(v: u64) -> bool {
    (v as u8).count_ones().is_multiple_of(2)
}

fn set(f: &mut Flags, flag: Flag, v: Option<bool>) {
    f[flag as usize] = v;
}

/// SF, ZF, PF of a result.
fn szp(f: &mut Flags, res: u64, bits: u32) {
    set(f, Flag::Sf, Some(sign(res, bits)));
    set(f, Flag::Zf, Some(res & mask(bits) == 0));
    set(f, Flag::Pf, Some(parity(res)));
}

/// The binary ALU operations with flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AluOp {
    Add,
    Adc,
    Sub,
    Sbb,
    And,
    Or,
    Xor,
}

/// `a op b` at width `bits` (8/16/32/64) with carry-in `cf` (adc/sbb only).
/// Returns the truncated result and the new flags (starting from `old`, DF kept).
pub fn alu(op: AluOp, a: u64, b: u64, cf: bool, bits: u32, old: &Flags) -> (u64, Flags) {
    let m = mask(bits);
    let (a, b) = (a & m, b & m);
    let mut f = *old;
    let res;
    match op {
        AluOp::Add | AluOp::Adc => {
            let cin = (op == AluOp::Adc && cf) as u128;
            let wide = a as u128 + b as u128 + cin;
            res = (wide as u64) & m;
            set(&mut f, Flag::Cf, Some(wide > m as u128));
            set(&mut f, Flag::Of, Some(sign((a ^ res) & (b ^ res), bits)));
            set(&mut f, Flag::Af, Some((a ^ b ^ res) & 0x10 != 0));
            szp(&mut f, res, bits);
        }
        AluOp::Sub | AluOp::Sbb => {
            let bin = (op == AluOp::Sbb && cf) as u128;
            res = (a.wrapping_sub(b).wrapping_sub(bin as u64)) & m;
            set(&mut f, Flag::Cf, Some((a as u128) < b as u128 + bin));
            set(&mut f, Flag::Of, Some(sign((a ^ b) & (a ^ res), bits)));
            set(&mut f, Flag::Af, Some((a ^ b ^ res) & 0x10 != 0));
            szp(&mut f, res, bits);
        }
        AluOp::And | AluOp::Or | AluOp::Xor => {
            res = match op {
                AluOp::And => a & b,
                AluOp::Or => a | b,
                _ => a ^ b,
            };
            set(&mut f, Flag::Cf, Some(false));
            set(&mut f, Flag::Of, Some(false));
            // AF is undefined after logic instructions.
            set(&mut f, Flag::Af, None);
            szp(&mut f, res, bits);
        }
    }
    (res, f)
}

/// `inc`/`dec`: like add/sub 1 but CF is preserved.
pub fn inc_dec(dec: bool, a: u64, bits: u32, old: &Flags) -> (u64, Flags) {
    let op = if dec { AluOp::Sub } else { AluOp::Add };
    let (res, mut f) = alu(op, a, 1, false, bits, old);
    f[Flag::Cf as usize] = old[Flag::Cf as usize];
    (res, f)
}

/// `neg`: 0 - a; CF = (a != 0).
pub fn neg(a: u64, bits: u32, old: &Flags) -> (u64, Flags) {
    let (res, mut f) = alu(AluOp::Sub, 0, a, false, bits, old);
    f[Flag::Cf as usize] = Some(a & mask(bits) != 0);
    (res, f)
}

/// Shift and rotate operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShiftOp {
    Shl,
    Shr,
    Sar,
    Rol,
    Ror,
}

/// Shift/rotate `a` (width `bits`) by the raw `count` operand. Count is
/// masked to 5 bits (6 for 64-bit); a masked count of 0 changes neither the
/// value nor any flag.
pub fn shift(op: ShiftOp, a: u64, count: u64, bits: u32, old: &Flags) -> (u64, Flags) {
    let m = mask(bits);
    let a = a & m;
    let cnt = (count & if bits == 64 { 63 } else { 31 }) as u32;
    if cnt == 0 {
        return (a, *old);
    }
    let mut f = *old;
    let res;
    match op {
        ShiftOp::Shl | ShiftOp::Shr | ShiftOp::Sar => {
            let (r, cf) = match op {
                ShiftOp::Shl => {
                    let r = if cnt >= bits { 0 } else { (a << cnt) & m };
                    let cf = if cnt > bits {
                        None
                    } else {
                        Some((a >> (bits - cnt)) & 1 == 1)
                    };
                    (r, cf)
                }
                ShiftOp::Shr => {
                    let r = if cnt >= bits { 0 } else { a >> cnt };
                    let cf = if cnt > bits {
                        None
                    } else {
                        Some((a >> (cnt - 1)) & 1 == 1)
                    };
                    (r, cf)
                }
                _ => {
                    let s = sext(a, bits) as i64;
                    let r = (s >> cnt.min(63)) as u64 & m;
                    let cf = Some((s >> (cnt - 1).min(63)) & 1 == 1);
                    (r, cf)
                }
            };
            res = r;
            // For counts >= width on 8/16-bit operands Intel leaves CF
            // undefined for SHL/SHR; SAR keeps shifting in the sign bit.
            let cf = if cnt >= bits {
                if op == ShiftOp::Sar {
                    Some(sign(a, bits))
                } else {
                    None
                }
            } else {
                cf
            };
            set(&mut f, Flag::Cf, cf);
            let of = if cnt == 1 {
                match op {
                    ShiftOp::Shl => Some(sign(res, bits) ^ cf.unwrap_or(false)),
                    ShiftOp::Shr => Some(sign(a, bits)),
                    _ => Some(false),
                }
            } else {
                None
            };
            // OF for shl needs CF; if CF is unknown so is OF.
            let of = if op == ShiftOp::Shl && cf.is_none() {
                None
            } else {
                of
            };
            set(&mut f, Flag::Of, of);
            set(&mut f, Flag::Af, None);
            szp(&mut f, res, bits);
        }
        ShiftOp::Rol | ShiftOp::Ror => {
            let r = cnt % bits;
            res = if r == 0 {
                a
            } else if op == ShiftOp::Rol {
                ((a << r) | (a >> (bits - r))) & m
            } else {
                ((a >> r) | (a << (bits - r))) & m
            };
            let cf = if op == ShiftOp::Rol {
                res & 1 == 1
            } else {
                sign(res, bits)
            };
            set(&mut f, Flag::Cf, Some(cf));
            let of = if cnt == 1 {
                if op == ShiftOp::Rol {
                    Some(sign(res, bits) ^ cf)
                } else {
                    Some(sign(res, bits) ^ ((res >> (bits - 2)) & 1 == 1))
                }
            } else {
                None
            };
            set(&mut f, Flag::Of, of);
        }
    }
    (res, f)
}

/// Signed multiply truncated to `bits`; CF = OF = the full product does not
/// fit; SF, ZF, AF, PF undefined. Returns (low, high, flags) where `high` is
/// the upper half (for the one-operand form).
pub fn imul(a: u64, b: u64, bits: u32, old: &Flags) -> (u64, u64, Flags) {
    let sa = sext(a & mask(bits), bits) as i64 as i128;
    let sb = sext(b & mask(bits), bits) as i64 as i128;
    let p = sa * sb;
    let low = (p as u64) & mask(bits);
    let high = ((p >> bits) as u64) & mask(bits);
    let fits = sext(low, bits) as i64 as i128 == p;
    let mut f = *old;
    set(&mut f, Flag::Cf, Some(!fits));
    set(&mut f, Flag::Of, Some(!fits));
    for fl in [Flag::Sf, Flag::Zf, Flag::Af, Flag::Pf] {
        set(&mut f, fl, None);
    }
    (low, high, f)
}

/// Evaluate an x86 condition code on the flags; `None` if a flag it needs is unknown.
pub fn condition(cc: iced_x86::ConditionCode, f: &Flags) -> Option<bool> {
    use iced_x86::ConditionCode as C;
    let g = |fl: Flag| f[fl as usize];
    Some(match cc {
        C::None => return None,
        C::o => g(Flag::Of)?,
        C::no => !g(Flag::Of)?,
        C::b => g(Flag::Cf)?,
        C::ae => !g(Flag::Cf)?,
        C::e => g(Flag::Zf)?,
        C::ne => !g(Flag::Zf)?,
        C::be => g(Flag::Cf)? || g(Flag::Zf)?,
        C::a => !g(Flag::Cf)? && !g(Flag::Zf)?,
        C::s => g(Flag::Sf)?,
        C::ns => !g(Flag::Sf)?,
        C::p => g(Flag::Pf)?,
        C::np => !g(Flag::Pf)?,
        C::l => g(Flag::Sf)? != g(Flag::Of)?,
        C::ge => g(Flag::Sf)? == g(Flag::Of)?,
        C::le => g(Flag::Zf)? || (g(Flag::Sf)? != g(Flag::Of)?),
        C::g => !g(Flag::Zf)? && (g(Flag::Sf)? == g(Flag::Of)?),
    })
}

/// The flags an 8-bit `cmp a, b` produces (CF, PF, AF, ZF, SF, OF).
pub fn cmp8_flags(a: u8, b: u8) -> Flags {
    alu(AluOp::Sub, a as u64, b as u64, false, 8, &[None; 7]).1
}

/// Find `(a, b)` such that `cmp byte [a], b` produces every known status
/// flag in `want` (DF ignored). `None` if no 8-bit compare can (e.g. ZF=1 with CF=1).
#[cfg(test)]
pub fn find_cmp8(want: &Flags) -> Option<(u8, u8)> {
    // A small deterministic search; results are cached by the caller's table.
    for a in 0..=255u8 {
        for b in 0..=255u8 {
            let f = cmp8_flags(a, b);
            let ok = [Flag::Cf, Flag::Pf, Flag::Af, Flag::Zf, Flag::Sf, Flag::Of]
                .iter()
                .all(|&fl| match want[fl as usize] {
                    None => true,
                    Some(v) => f[fl as usize] == Some(v),
                });
            if ok {
                return Some((a, b));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const NONE: Flags = [None; 7];

    fn fl(f: &Flags, which: Flag) -> Option<bool> {
        f[which as usize]
    }

    #[test]
    fn add_flags_all_widths() {
        let (r, f) = alu(AluOp::Add, 0xff, 1, false, 8, &NONE);
        assert_eq!(r, 0);
        assert_eq!(fl(&f, Flag::Cf), Some(true));
        assert_eq!(fl(&f, Flag::Zf), Some(true));
        assert_eq!(fl(&f, Flag::Af), Some(true));
        assert_eq!(fl(&f, Flag::Of), Some(false));
        assert_eq!(fl(&f, Flag::Pf), Some(true));
        let (r, f) = alu(AluOp::Add, 0x7fff, 1, false, 16, &NONE);
        assert_eq!(r, 0x8000);
        assert_eq!(fl(&f, Flag::Of), Some(true));
        assert_eq!(fl(&f, Flag::Sf), Some(true));
        assert_eq!(fl(&f, Flag::Cf), Some(false));
        let (r, f) = alu(AluOp::Add, 0xffff_ffff, 2, false, 32, &NONE);
        assert_eq!(r, 1);
        assert_eq!(fl(&f, Flag::Cf), Some(true));
        assert_eq!(fl(&f, Flag::Pf), Some(false));
        let (r, f) = alu(AluOp::Add, u64::MAX, u64::MAX, false, 64, &NONE);
        assert_eq!(r, u64::MAX - 1);
        assert_eq!(fl(&f, Flag::Cf), Some(true));
        assert_eq!(fl(&f, Flag::Of), Some(false));
        assert_eq!(fl(&f, Flag::Sf), Some(true));
    }

    #[test]
    fn adc_sbb_use_carry() {
        let (r, f) = alu(AluOp::Adc, 0xfe, 1, true, 8, &NONE);
        assert_eq!(r, 0);
        assert_eq!(fl(&f, Flag::Cf), Some(true));
        let (r, f) = alu(AluOp::Sbb, 0, 0, true, 32, &NONE);
        assert_eq!(r, 0xffff_ffff);
        assert_eq!(fl(&f, Flag::Cf), Some(true));
        assert_eq!(fl(&f, Flag::Sf), Some(true));
        let (r, f) = alu(AluOp::Sbb, 5, 4, true, 64, &NONE);
        assert_eq!(r, 0);
        assert_eq!(fl(&f, Flag::Cf), Some(false));
        assert_eq!(fl(&f, Flag::Zf), Some(true));
    }

    #[test]
    fn sub_flags() {
        let (r, f) = alu(AluOp::Sub, 3, 5, false, 32, &NONE);
        assert_eq!(r, 0xffff_fffe);
        assert_eq!(fl(&f, Flag::Cf), Some(true));
        assert_eq!(fl(&f, Flag::Sf), Some(true));
        assert_eq!(fl(&f, Flag::Of), Some(false));
        assert_eq!(fl(&f, Flag::Af), Some(true));
        let (_, f) = alu(AluOp::Sub, 0x80, 1, false, 8, &NONE);
        assert_eq!(fl(&f, Flag::Of), Some(true));
        assert_eq!(fl(&f, Flag::Af), Some(true));
    }

    #[test]
    fn logic_af_unknown() {
        let (r, f) = alu(AluOp::And, 0xf0, 0x0f, false, 8, &NONE);
        assert_eq!(r, 0);
        assert_eq!(fl(&f, Flag::Af), None);
        assert_eq!(fl(&f, Flag::Zf), Some(true));
        assert_eq!(fl(&f, Flag::Cf), Some(false));
    }

    #[test]
    fn inc_dec_keep_cf() {
        let mut old = NONE;
        old[Flag::Cf as usize] = Some(true);
        let (r, f) = inc_dec(false, 0xff, 8, &old);
        assert_eq!(r, 0);
        assert_eq!(fl(&f, Flag::Cf), Some(true));
        assert_eq!(fl(&f, Flag::Zf), Some(true));
        let (r, f) = inc_dec(true, 0x8000_0000, 32, &NONE);
        assert_eq!(r, 0x7fff_ffff);
        assert_eq!(fl(&f, Flag::Of), Some(true));
        assert_eq!(fl(&f, Flag::Cf), None);
    }

    #[test]
    fn neg_flags() {
        let (r, f) = neg(0, 32, &NONE);
        assert_eq!(r, 0);
        assert_eq!(fl(&f, Flag::Cf), Some(false));
        let (r, f) = neg(0x80, 8, &NONE);
        assert_eq!(r, 0x80);
        assert_eq!(fl(&f, Flag::Of), Some(true));
        assert_eq!(fl(&f, Flag::Cf), Some(true));
    }

    #[test]
    fn shifts() {
        let (r, f) = shift(ShiftOp::Shl, 0x81, 1, 8, &NONE);
        assert_eq!(r, 0x02);
        assert_eq!(fl(&f, Flag::Cf), Some(true));
        assert_eq!(fl(&f, Flag::Of), Some(true));
        let (r, f) = shift(ShiftOp::Shr, 0x81, 1, 8, &NONE);
        assert_eq!(r, 0x40);
        assert_eq!(fl(&f, Flag::Cf), Some(true));
        assert_eq!(fl(&f, Flag::Of), Some(true));
        let (r, f) = shift(ShiftOp::Sar, 0x80, 3, 8, &NONE);
        assert_eq!(r, 0xf0);
        assert_eq!(fl(&f, Flag::Cf), Some(false));
        assert_eq!(fl(&f, Flag::Of), None);
        // count masked: 33 & 31 = 1 for 32-bit
        let (r, _) = shift(ShiftOp::Shl, 1, 33, 32, &NONE);
        assert_eq!(r, 2);
        // count 0 keeps flags
        let mut old = NONE;
        old[Flag::Zf as usize] = Some(true);
        let (r, f) = shift(ShiftOp::Shl, 5, 64, 64, &old);
        assert_eq!(r, 5);
        assert_eq!(f, old);
        let (r, f) = shift(ShiftOp::Shl, 1, 63, 64, &NONE);
        assert_eq!(r, 1 << 63);
        assert_eq!(fl(&f, Flag::Cf), Some(false));
        // 8-bit count larger than width: CF undefined
        let (r, f) = shift(ShiftOp::Shl, 0xff, 9, 8, &NONE);
        assert_eq!(r, 0);
        assert_eq!(fl(&f, Flag::Cf), None);
    }

    #[test]
    fn rotates() {
        let (r, f) = shift(ShiftOp::Rol, 0x81, 1, 8, &NONE);
        assert_eq!(r, 0x03);
        assert_eq!(fl(&f, Flag::Cf), Some(true));
        assert_eq!(fl(&f, Flag::Of), Some(true));
        assert_eq!(fl(&f, Flag::Zf), None); // untouched
        let (r, f) = shift(ShiftOp::Ror, 0x01, 1, 16, &NONE);
        assert_eq!(r, 0x8000);
        assert_eq!(fl(&f, Flag::Cf), Some(true));
        assert_eq!(fl(&f, Flag::Of), Some(true));
        let (r, _) = shift(ShiftOp::Rol, 0x12345678, 8, 32, &NONE);
        assert_eq!(r, 0x34567812);
        // 8-bit rotate by 8: value unchanged, CF = lsb
        let (r, f) = shift(ShiftOp::Rol, 0x81, 8, 8, &NONE);
        assert_eq!(r, 0x81);
        assert_eq!(fl(&f, Flag::Cf), Some(true));
    }

    #[test]
    fn imul_flags() {
        let (lo, hi, f) = imul(0x40, 4, 8, &NONE);
        assert_eq!(lo, 0);
        assert_eq!(hi, 1);
        assert_eq!(fl(&f, Flag::Cf), Some(true));
        assert_eq!(fl(&f, Flag::Zf), None);
        let (lo, _, f) = imul(u64::MAX, 5, 64, &NONE);
        assert_eq!(lo, (-5i64) as u64);
        assert_eq!(fl(&f, Flag::Of), Some(false));
    }

    #[test]
    fn cmp8_table_covers_nonzero_combos() {
        for bits in 0..32u32 {
            let mut want = NONE;
            want[Flag::Zf as usize] = Some(false);
            want[Flag::Cf as usize] = Some(bits & 1 != 0);
            want[Flag::Pf as usize] = Some(bits & 2 != 0);
            want[Flag::Af as usize] = Some(bits & 4 != 0);
            want[Flag::Sf as usize] = Some(bits & 8 != 0);
            want[Flag::Of as usize] = Some(bits & 16 != 0);
            want[Flag::Cf as usize] = None; // CF is fixed with stc/clc
            let (a, b) = find_cmp8(&want).expect("combo");
            let f = cmp8_flags(a, b);
            for fl in [Flag::Pf, Flag::Af, Flag::Zf, Flag::Sf, Flag::Of] {
                assert_eq!(f[fl as usize], want[fl as usize]);
            }
        }
        let mut bad = NONE;
        bad[Flag::Zf as usize] = Some(true);
        bad[Flag::Cf as usize] = Some(true);
        assert_eq!(find_cmp8(&bad), None);
    }
}
