//! `Variant::loops`: whether a variant's code branches back into itself (the planner charges a variant that does
//! not the stub and an exit on every pass).

use specializer::snippet::{Snippet, DEFAULT_AT};

fn fold(code: &[u8], max_states: Option<u32>) -> specializer::Variant {
    let mut s = Snippet::new(DEFAULT_AT, code.to_vec());
    if let Some(m) = max_states {
        s.options.max_states_per_address = m;
    }
    s.fold().expect("folds").variant
}

#[test]
fn a_loop_that_stays_a_loop_is_one() {
    // xor eax, eax; L1: add eax, 3; dec ecx; jnz L1; mov ebx, 1 — ecx unknown: after two unrolled states the
    // widened state branches back to code already emitted.
    let v = fold(
        &[
            0x31, 0xc0, 0x83, 0xc0, 0x03, 0xff, 0xc9, 0x75, 0xf9, 0xbb, 0x01, 0x00, 0x00, 0x00,
        ],
        Some(2),
    );
    assert!(v.loops(), "{:#?}", v.residual_asm());
}

#[test]
fn straight_line_code_is_not() {
    // mov eax, 5; add rax, rcx; cmp rax, 7; je +5; mov ebx, 1; mov ecx, 2 — a forward branch only.
    let v = fold(
        &[
            0xb8, 0x05, 0x00, 0x00, 0x00, 0x48, 0x01, 0xc8, 0x48, 0x83, 0xf8, 0x07, 0x74, 0x05,
            0xbb, 0x01, 0x00, 0x00, 0x00, 0xb9, 0x02, 0x00, 0x00, 0x00,
        ],
        None,
    );
    assert!(!v.loops(), "{:#?}", v.residual_asm());
}

#[test]
fn a_loop_back_to_the_entry_revisits_it_an_inner_loop_does_not() {
    // L0: dec ecx; jnz L0; mov ebx, 1 — the loop head is the entry.
    let v = fold(
        &[0xff, 0xc9, 0x75, 0xfc, 0xbb, 0x01, 0x00, 0x00, 0x00],
        Some(2),
    );
    assert!(v.loops());
    assert!(v.revisits(DEFAULT_AT), "{:#?}", v.residual_asm());
    // The first loop test's variant loops at L1, not at its entry (xor eax, eax runs once per entry).
    let v = fold(
        &[
            0x31, 0xc0, 0x83, 0xc0, 0x03, 0xff, 0xc9, 0x75, 0xf9, 0xbb, 0x01, 0x00, 0x00, 0x00,
        ],
        Some(2),
    );
    assert!(v.loops());
    assert!(!v.revisits(DEFAULT_AT), "{:#?}", v.residual_asm());
}

#[test]
fn back_at_the_dispatch_point_with_the_trigger_unknown_the_variant_redispatches() {
    // L0: add rdi, rsi; dec ecx; jnz L0; ret — entered with rdi known; after one pass rdi is unknown.
    let code = [0x48, 0x01, 0xf7, 0xff, 0xc9, 0x75, 0xf9, 0xc3];
    let mut s = Snippet::new(DEFAULT_AT, code.to_vec());
    s.known.set_reg(specializer::Gpr::Rdi, Some(0x1000));
    let looping = s.fold().expect("folds").variant;
    assert!(looping.loops(), "{:#?}", looping.residual_asm());
    s.options.redispatch_at = Some((DEFAULT_AT, specializer::Gpr::Rdi));
    let v = s.fold().expect("folds").variant;
    assert!(!v.loops(), "{:#?}", v.residual_asm());
    assert!(
        v.exits
            .iter()
            .any(|e| e.target == DEFAULT_AT && e.reason == specializer::ExitReason::Redispatch),
        "{:#?}",
        v.exits
    );
    assert!(!v.revisits(DEFAULT_AT));
}
