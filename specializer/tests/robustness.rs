//! Robustness: arbitrary bytes as code (valid or not, any instruction set extension), with random known state, constant memory and budgets, never make the specializer (or encoding its result) panic.

mod common;

use common::rng::Rng;
use specializer::snippet::Snippet;
use specializer::{Addr, Flag, Gpr, Options};

#[test]
fn random_bytes_never_panic() {
    let cases: u64 = std::env::var("DYNSPEC_ROBUST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50_000);
    let mut rng = Rng(0x0dd_ba11_5eed);
    let (mut ok, mut err) = (0, 0);
    for n in 0..cases {
        let len = 1 + (rng.next() % 48) as usize;
        let code: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let at = Addr(0x40_0000 + (rng.next() % 0x1000));
        let mut s = Snippet::new(at, code.clone());
        for g in Gpr::ALL {
            if rng.next().is_multiple_of(3) {
                // Sometimes point registers into the constant memory or the code.
                let v = match rng.next() % 4 {
                    0 => 0x60_0000 + rng.next() % 64,
                    1 => at.0 + rng.next() % len as u64,
                    _ => rng.next(),
                };
                s.known.set_reg(g, Some(v));
            }
        }
        for f in Flag::ALL {
            if rng.next().is_multiple_of(2) {
                s.known.set_flag(f, Some(rng.next().is_multiple_of(2)));
            }
        }
        if rng.next().is_multiple_of(2) {
            let bytes: Vec<u8> = (0..64).map(|_| rng.next() as u8).collect();
            s.memory.push((Addr(0x60_0000), bytes));
        }
        if rng.next().is_multiple_of(4) {
            s.options = Options {
                max_code_bytes: 32 + (rng.next() % 512) as usize,
                max_states_per_address: 1 + (rng.next() % 4) as u32,
                ..Options::default()
            };
        }
        let r = std::panic::catch_unwind(|| {
            s.fold().map(|f| {
                // Near the code, as the code cache places variants (RIP-relative reach).
                let enc = f.variant.encode(Addr(0x50_0000));
                (f.residual.len(), enc.map(|e| e.code.len()))
            })
        });
        match r {
            Ok(Ok((_, Ok(_)))) => ok += 1,
            // A typed error (e.g. a RIP-relative target out of reach) is fine.
            Ok(Ok((_, Err(_)))) => err += 1,
            Ok(Err(_)) => err += 1,
            Err(_) => panic!(
                "case {n}: the specializer panicked on code {:02x?} at {at}, known {:?}, memory {}",
                code,
                s.known,
                !s.memory.is_empty()
            ),
        }
    }
    eprintln!("robustness: {cases} random snippets, {ok} specialized, {err} refused");
    assert!(ok > 0);
}
