//! Planner decisions, from a profile to a plan, without a live process.

use super::*;

/// The candidates among `triggers` (the rest are not).
fn candidates_of(triggers: &[TriggerProfile]) -> Vec<TriggerCandidate> {
    triggers
        .iter()
        .filter_map(|t| classify(t, triggers).ok())
        .collect()
}
use crate::profile::{HotRegion, Location, ProfileEnv, Profiler};
use nix::unistd::Pid;
use specializer::MemoryError;
use tracer::sampler::Sample;

/// Code at 0x1000 and constant data at 0x2000 (64 bytes 0, 1, 2, ...): a target for planner decisions.
struct CodeAndData(Vec<u8>, Vec<u8>);

impl Memory for CodeAndData {
    fn read(&self, addr: Addr, buf: &mut [u8]) -> Result<(), MemoryError> {
        let (base, bytes) = if addr.0 >= 0x2000 {
            (0x2000, &self.1)
        } else {
            (0x1000, &self.0)
        };
        let off = addr.0.wrapping_sub(base) as usize;
        match bytes.get(off..off + buf.len()) {
            Some(b) => {
                buf.copy_from_slice(b);
                Ok(())
            }
            None => Err(MemoryError::Unreadable(addr)),
        }
    }
    fn is_constant(&self, page: Addr) -> bool {
        page.0 == 0x2000
    }
}

impl ProfileEnv for CodeAndData {
    fn locate(&mut self, _pid: Pid, ip: Addr) -> Location {
        if ip.0 >= 0x1000 && ip.0 < 0x1000 + self.0.len() as u64 {
            Location::Symbol {
                module: "/bin/interp".into(),
                name: "run".into(),
                start: Addr(0x1000),
                end: Addr(0x1000 + self.0.len() as u64),
            }
        } else {
            Location::Unknown
        }
    }
    fn read_code(&mut self, _pid: Pid, addr: Addr, buf: &mut [u8]) -> usize {
        let off = addr.0.wrapping_sub(0x1000) as usize;
        let avail = self.0.len().saturating_sub(off).min(buf.len());
        if off < self.0.len() {
            buf[..avail].copy_from_slice(&self.0[off..off + avail]);
        }
        avail
    }
}

/// 32 x (lea rcx, [rdi+8]; mov rdi, rcx), ret (straight-line, folding more than MIN_FOLDED_STRAIGHT): everything folded is register arithmetic on rdi.
fn registers_only() -> Vec<u8> {
    let mut code = Vec::new();
    for _ in 0..32 {
        code.extend([0x48, 0x8d, 0x4f, 0x08]); // lea rcx, [rdi+8]
        code.extend([0x48, 0x89, 0xcf]); // mov rdi, rcx
    }
    code.push(0xc3); // ret
    code
}

/// `mov rax, [rdi]` (a load through the trigger from constant data) in front of [`registers_only`].
fn load_then_registers() -> Vec<u8> {
    let mut code = vec![0x48, 0x8b, 0x07]; // mov rax, [rdi]
    code.extend(registers_only());
    code
}

fn data() -> Vec<u8> {
    (0..64u8).collect()
}

fn region_of(code: &[u8], candidates: Vec<TriggerCandidate>) -> RegionPlan {
    RegionPlan {
        start: Addr(0x1000),
        end: Addr(0x1000 + code.len() as u64),
        symbol: Some("run".into()),
        candidates,
        stable: Vec::new(),
        share: 1.0,
        rejected: Vec::new(),
    }
}

fn rdi_at_entry(values: Vec<(u64, u64)>) -> TriggerCandidate {
    TriggerCandidate {
        address: Addr(0x1000),
        register: Gpr::Rdi,
        samples: values.iter().map(|v| v.1).sum(),
        distinct: values.len() as u64,
        values,
    }
}

fn trigger(register: Gpr, samples: u64, top_values: Vec<(u64, u64)>) -> TriggerProfile {
    TriggerProfile {
        address: Addr(0x1000),
        register,
        samples,
        distinct: top_values.len() as u64,
        coverage: top_values.iter().map(|v| v.1).sum::<u64>() as f64 / samples as f64,
        top_values,
    }
}

#[test]
fn candidates_keep_hot_values_and_drop_noise() {
    // Ten values with 90 samples each and ten seen once: the rare ones are noise.
    let mut top: Vec<(u64, u64)> = (0..10).map(|i| (0x5000 + i, 90)).collect();
    top.extend((10..20).map(|i| (0x5000 + i, 1)));
    let c = candidates_of(&[trigger(Gpr::Rax, 910, top)]);
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].register, Gpr::Rax);
    assert_eq!(c[0].values.len(), 10);
    assert_eq!(c[0].values[0], (0x5000, 90));
    assert!(c[0].values.iter().all(|v| v.1 >= MIN_VALUE_SAMPLES));
}

#[test]
fn values_rare_at_one_instruction_are_hot_when_its_family_saw_them_often() {
    // A pointer argument at the function entry, sampled rarely (skid puts the samples further on), and the same
    // pointers copied to rdx at an instruction sampled often.
    let ptrs = |n: u64| (0..4).map(|i| (0x2000 + 0x100 * i, n)).collect::<Vec<_>>();
    let entry = TriggerProfile {
        address: Addr(0x1000),
        ..trigger(Gpr::Rdi, 8, ptrs(2))
    };
    let later = TriggerProfile {
        address: Addr(0x1040),
        ..trigger(Gpr::Rdx, 80, ptrs(20))
    };
    let c = candidates_of(&[entry.clone(), later.clone()]);
    assert_eq!(c.len(), 2, "{c:?}");
    assert_eq!(c[0].address, Addr(0x1000));
    assert_eq!(
        c[0].values,
        ptrs(2),
        "own samples are kept as the values' weights"
    );
    // Alone, the entry's values are too rare.
    assert!(candidates_of(std::slice::from_ref(&entry)).is_empty());
    // Random numbers copied to three registers at one instruction are one sample each, not three.
    let noise: Vec<(u64, u64)> = (0..40).map(|i| (0x9e37_79b9 * i, 1)).collect();
    let regs: Vec<TriggerProfile> = [Gpr::Rax, Gpr::Rsi, Gpr::Rdi]
        .iter()
        .map(|&r| trigger(r, 40, noise.clone()))
        .collect();
    assert!(candidates_of(&regs).is_empty());
}

#[test]
fn candidates_cap_their_values() {
    let top: Vec<(u64, u64)> = (0..40).map(|i| (i, 25)).collect();
    let c = candidates_of(&[trigger(Gpr::Rcx, 1000, top)]);
    assert_eq!(c[0].values.len(), MAX_VALUES);
}

#[test]
fn triggers_whose_hot_values_cover_little_are_not_candidates() {
    // 4 hot values cover 40% of the samples; the stub would fall back most of the time.
    let top: Vec<(u64, u64)> = (0..4).map(|i| (i, 100)).collect();
    assert!(candidates_of(&[trigger(Gpr::Rcx, 1000, top)]).is_empty());
    // The stack pointer is never a trigger.
    assert!(candidates_of(&[trigger(Gpr::Rsp, 100, vec![(0x7fff_0000, 100)])]).is_empty());
}

#[test]
fn regions_to_plan_need_a_share_and_a_candidate() {
    let region = |start: u64, share: f64| HotRegion {
        module: "/bin/x".into(),
        symbol: None,
        start: Addr(start),
        end: Addr(start + 0x100),
        samples: (share * 1000.0) as u64,
        share,
    };
    let good = trigger(Gpr::Rdi, 100, vec![(0x2000, 100)]);
    let profiles = vec![
        RegionProfile {
            region: region(0x1000, 0.5),
            triggers: vec![good.clone()],
        },
        // Too cold for a stub.
        RegionProfile {
            region: region(0x3000, MIN_SPECIALIZE_SHARE / 2.0),
            triggers: vec![good],
        },
        // Hot, but no predictable value.
        RegionProfile {
            region: region(0x4000, 0.4),
            triggers: Vec::new(),
        },
    ];
    let (plans, left_alone) = regions_to_plan(profiles, |a| vec![(Gpr::Rbx, a.0)]);
    assert_eq!(plans.len(), 1);
    // The regions left alone say why.
    let reasons: Vec<(Addr, Option<Reason>)> = left_alone
        .iter()
        .map(|n| (n.start, n.reason.clone()))
        .collect();
    assert_eq!(
        reasons,
        vec![
            (
                Addr(0x3000),
                Some(Reason::Cold {
                    share: MIN_SPECIALIZE_SHARE / 2.0
                })
            ),
            (Addr(0x4000), Some(Reason::NoPredictableValue)),
        ]
    );
    assert!(left_alone[0]
        .reason
        .as_ref()
        .unwrap()
        .to_string()
        .contains("not worth a dispatch stub"));
    assert_eq!(plans[0].start, Addr(0x1000));
    assert_eq!(plans[0].candidates[0].register, Gpr::Rdi);
    assert_eq!(
        plans[0].stable,
        vec![(Addr(0x1000), vec![(Gpr::Rbx, 0x1000)])]
    );
}

#[test]
fn a_region_is_planned_again_only_while_it_has_installs_left() {
    assert!(wants(None));
    let live = RegionHistory {
        installs: 1,
        live: true,
        lost: false,
    };
    assert!(!wants(Some(&live)), "live variants are not replaced");
    let invalidated = RegionHistory {
        installs: 1,
        live: false,
        lost: false,
    };
    assert!(wants(Some(&invalidated)));
    let lost = RegionHistory {
        lost: true,
        ..invalidated
    };
    assert!(!wants(Some(&lost)), "measured slower: not tried again");
    let exhausted = RegionHistory {
        installs: MAX_INSTALLS_PER_REGION,
        live: false,
        lost: false,
    };
    assert!(!wants(Some(&exhausted)));
}

#[test]
fn after_a_loss_only_variants_that_loop_are_tried() {
    assert!(worth_trying_after_losses(false, 0));
    assert!(worth_trying_after_losses(true, 0));
    assert!(worth_trying_after_losses(true, 1));
    assert!(!worth_trying_after_losses(false, 1));
}

#[test]
fn a_trigger_measured_slower_and_its_values_elsewhere_leave_the_runners_up() {
    let code = load_then_registers();
    // Pointers (a bytecode pc, say), and a small value (an opcode) the lost trigger also saw.
    const P: u64 = 0x7f00_0000_2000;
    let lost = rdi_at_entry(vec![(P, 50), (P + 0x10, 40), (7, 5)]);
    // The same trigger seen again with other values: still the trigger that lost.
    let again = rdi_at_entry(vec![(P + 0x3000, 50)]);
    // The same quantity at the next instruction: keeps only the values that did not lose.
    let sibling = TriggerCandidate {
        address: Addr(0x1003),
        values: vec![(P, 30), (P + 0x10, 20), (P + 0x20, 5), (7, 3)],
        ..lost.clone()
    };
    // The same pointers copied to another register: nothing left.
    let copy = TriggerCandidate {
        address: Addr(0x1005),
        register: Gpr::Rcx,
        values: vec![(P, 50), (P + 0x10, 40)],
        ..lost.clone()
    };
    // Another register with other values, or with a value too small to be the same quantity: untouched.
    let other = TriggerCandidate {
        register: Gpr::Rcx,
        values: vec![(P + 0x4000, 30), (7, 10)],
        ..lost.clone()
    };
    let r = region_of(
        &code,
        vec![again.clone(), sibling.clone(), copy.clone(), other.clone()],
    );
    let (kept, notes) = without_lost(&r, std::slice::from_ref(&lost));
    let sibling_rest = TriggerCandidate {
        values: vec![(P + 0x20, 5)],
        ..sibling
    };
    assert_eq!(kept.candidates, vec![sibling_rest, other]);
    assert_eq!(notes.len(), 2);
    for (n, c) in notes.iter().zip([&again, &copy]) {
        assert_eq!((n.address, n.register), (c.address, c.register));
        assert_eq!(n.reason, Some(Reason::MeasuredSlower));
    }
    // Nothing lost: the region as it is.
    let (same, none) = without_lost(&r, &[]);
    assert_eq!(same.candidates, r.candidates);
    assert!(none.is_empty());
}

#[test]
fn variants_that_fold_no_memory_read_are_not_worth_installing() {
    let planned = |code: Vec<u8>| {
        let c = rdi_at_entry(vec![(0x2000, 100)]);
        let r = region_of(&code, vec![c.clone()]);
        let mem = CodeAndData(code, data());
        specialize_candidate(
            &mem,
            &r,
            &c,
            &FunctionConstants::none(),
            &None,
            Instant::now() + PLAN_BUDGET,
        )
        .1
        .variants
        .len()
    };
    assert_eq!(planned(registers_only()), 0);
    // The same with a read of the constant data through the trigger register in front: worth it.
    assert_eq!(planned(load_then_registers()), 1);
}

#[test]
fn the_best_candidate_comes_first_and_gets_all_its_hot_values() {
    let code = load_then_registers();
    // rdi folds the load and everything after it; rax is overwritten by the first instruction: folds nothing.
    let rdi = rdi_at_entry(vec![(0x2000, 50), (0x2008, 30), (0x2010, 20)]);
    let rax = TriggerCandidate {
        register: Gpr::Rax,
        ..rdi_at_entry(vec![(7, 90), (8, 10)])
    };
    // A candidate outside the region is ignored.
    let outside = TriggerCandidate {
        address: Addr(0x9000),
        ..rdi.clone()
    };
    let r = region_of(&code, vec![rax, outside, rdi.clone()]);
    let mem = CodeAndData(code, data());
    let (scored, notes) = score_region(&mem, &r, &None, Instant::now(), &mut Rejections::default());
    assert_eq!(scored.len(), 1, "only rdi folds anything worth a stub");
    // Every candidate has its note: rax folded no memory read, the stray one lies outside, rdi awaits the
    // installer's decision with what it folded.
    let why: Vec<(Gpr, Option<Reason>)> = notes
        .iter()
        .map(|n| (n.register, n.reason.clone()))
        .collect();
    assert_eq!(
        why,
        vec![
            (Gpr::Rax, Some(Reason::NoFoldedLoad)),
            (Gpr::Rdi, Some(Reason::OutsideRegion)),
            (Gpr::Rdi, None),
        ]
    );
    let rdi_note = &notes[2];
    assert!(rdi_note
        .folded
        .as_ref()
        .is_some_and(|s| s.folded_loads == 3));
    assert!(rdi_note.estimate.is_some());
    assert_eq!(scored[0].candidate, rdi);
    // Scored on its two hottest values, then specialized for all three.
    let values: Vec<Option<u64>> = scored[0].specialized.variants.iter().map(|v| v.0).collect();
    assert_eq!(values, vec![Some(0x2000), Some(0x2008), Some(0x2010)]);
    assert!(scored[0].estimate > 0.0);
    // A later round on the same inputs reuses the rejection (rax, only) and reaches the same plan.
    let mut memo = Rejections::default();
    let first = score_region(&mem, &r, &None, Instant::now(), &mut memo);
    assert_eq!(memo.len(), 1, "only the rejected candidate is remembered");
    let again = score_region(&mem, &r, &None, Instant::now(), &mut memo);
    assert_eq!(again.1, first.1);
    assert_eq!(again.0.len(), 1);
    // Other trusted pages are other inputs: specialized again.
    memo.trust(&[Addr(0x2000)].into_iter().collect());
    score_region(&mem, &r, &None, Instant::now(), &mut memo);
    assert_eq!(memo.len(), 2);
}

#[test]
fn nothing_is_assumed_at_a_function_entry_and_only_named_registers_mid_function() {
    let code = load_then_registers();
    let mem = CodeAndData(code.clone(), data());
    let entry = rdi_at_entry(vec![(0x2000, 100)]);
    let mid = TriggerCandidate {
        address: Addr(0x1003),
        ..entry.clone()
    };
    let mut r = region_of(&code, vec![entry.clone(), mid.clone()]);
    // rbx is never named by the region; rcx is; rdi is the trigger itself.
    let stable = vec![(Gpr::Rbx, 1), (Gpr::Rcx, 2), (Gpr::Rdi, 0x2000)];
    r.stable = vec![(Addr(0x1000), stable.clone()), (Addr(0x1003), stable)];
    let none = FunctionConstants::none();
    assert!(assumed_for(&mem, &r, &entry, &none).is_empty());
    assert_eq!(assumed_for(&mem, &r, &mid, &none), vec![(Gpr::Rcx, 2)]);
    // A register proven constant there is known without a check: not assumed.
    let consts = FunctionConstants::none().with(Addr(0x1003), vec![(Gpr::Rcx, 2)]);
    assert!(assumed_for(&mem, &r, &mid, &consts).is_empty());
}

#[test]
fn constant_pages_are_watched_minus_written() {
    let set = |v: &[u64]| v.iter().map(|&p| Addr(p)).collect::<BTreeSet<Addr>>();
    let c = constant_pages(&set(&[0x1000, 0x2000, 0x3000]), &set(&[0x2000]));
    assert_eq!(c, set(&[0x1000, 0x3000]));
}

fn sample(ip: u64, rdi: u64, noise: u64) -> Sample {
    let mut regs = [0u64; 16];
    regs[Gpr::Rsp.index()] = 0x7fff_0000;
    regs[Gpr::Rdi.index()] = rdi;
    regs[Gpr::Rax.index()] = noise;
    Sample {
        pid: Pid::from_raw(10),
        tid: Pid::from_raw(10),
        ip: Addr(ip),
        regs,
        flags: 0x202,
    }
}

/// Profile in, plan out: samples of an interpreter-like function whose loads go through rdi (two hot values)
/// become a plan whose best trigger is rdi, with a variant per hot value.
#[test]
fn samples_become_a_plan() {
    let mut mem = CodeAndData(load_then_registers(), data());
    let mut p = Profiler::new();
    let samples: Vec<Sample> = (0..400u64)
        .map(|i| {
            let rdi = if i % 4 == 0 { 0x2008 } else { 0x2000 };
            // rax is overwritten right there: random values.
            sample(0x1000, rdi, i.wrapping_mul(0x9e37_79b9_7f4a_7c15))
        })
        .collect();
    p.ingest(&samples, &mut mem);
    let (plans, _) = regions_to_plan(p.region_profiles(), |a| {
        p.stable_registers(a.0, MIN_ASSUMED_SAMPLES)
    });
    assert_eq!(plans.len(), 1);
    let r = &plans[0];
    assert_eq!((r.start, r.symbol.as_deref()), (Addr(0x1000), Some("run")));
    let (scored, _) = score_region(&mem, r, &None, Instant::now(), &mut Rejections::default());
    let best = &scored[0];
    assert_eq!(best.candidate.register, Gpr::Rdi);
    assert_eq!(best.candidate.values, vec![(0x2000, 300), (0x2008, 100)]);
    assert_eq!(best.specialized.variants.len(), 2);
    // The variants relied on the bytecode page and nothing else.
    for (_, v) in &best.specialized.variants {
        assert_eq!(v.guard_pages, vec![Addr(0x2000)]);
    }
}

#[test]
fn candidates_reading_the_same_values_share_one_frequency() {
    // The bytecode pc in rax at three neighbouring instructions of one dispatch: samples landed unevenly (skid).
    let at = |a: u64, samples: u64| TriggerCandidate {
        address: Addr(a),
        register: Gpr::Rax,
        values: vec![(0x2000, samples * 3 / 4), (0x2010, samples / 4)],
        samples,
        distinct: 2,
    };
    let (a, b, c) = (at(0x1000, 120), at(0x1004, 80), at(0x1008, 40));
    let other_register = TriggerCandidate {
        register: Gpr::Rcx,
        ..at(0x100c, 400)
    };
    let other_values = TriggerCandidate {
        values: vec![(0x9000, 300)],
        ..at(0x1010, 300)
    };
    let all = vec![
        a.clone(),
        b.clone(),
        c.clone(),
        other_register,
        other_values,
    ];
    for t in [&a, &b, &c] {
        assert_eq!(trigger_frequency(t, &all), 120, "{t:?}");
    }
    assert_eq!(trigger_frequency(&all[3], &all), 400);
    assert_eq!(trigger_frequency(&all[4], &all), 300);
}

#[test]
fn the_sampled_instruction_does_not_decide_between_candidates_of_one_dispatch() {
    // nop, then the load through rdi: rdi at either instruction folds the same work. The samples favour the later
    // one (where the timer happened to fire); the plan must not follow them, run after run.
    let mut code = vec![0x90]; // nop
    code.extend(load_then_registers());
    let mem = CodeAndData(code.clone(), data());
    for (early_samples, late_samples) in [(40, 60), (60, 40), (50, 50)] {
        let early = rdi_at_entry(vec![(0x2000, early_samples)]);
        let late = TriggerCandidate {
            address: Addr(0x1001),
            ..rdi_at_entry(vec![(0x2000, late_samples)])
        };
        let r = region_of(&code, vec![late.clone(), early.clone()]);
        let (scored, _) = score_region(&mem, &r, &None, Instant::now(), &mut Rejections::default());
        assert_eq!(scored.len(), 2);
        assert_eq!(
            scored[0].candidate.address,
            Addr(0x1000),
            "samples {early_samples}/{late_samples}"
        );
    }
}

#[test]
fn folding_no_load_is_explained_by_the_pages_when_none_is_trusted() {
    let note = |reason| RegionNote {
        start: Addr(0x1000),
        end: Addr(0x1100),
        symbol: None,
        share: 0.5,
        candidates: vec![CandidateNote {
            reason: Some(Reason::NoFoldedLoad),
            ..rdi_at_entry(vec![(0x2000, 10)]).note()
        }],
        reason: Some(reason),
    };
    let set = |v: &[u64]| v.iter().map(|&p| Addr(p)).collect::<BTreeSet<Addr>>();
    let pages = [Addr(0x5000), Addr(0x6000)];
    let mut n = note(Reason::NoFoldedLoad);
    explain_untrusted(&mut n, &pages, &set(&[0x9000]), &set(&[0x5000]));
    let why = Reason::UntrustedMemory {
        pages: 2,
        written: 1,
    };
    assert_eq!(n.reason, Some(why.clone()));
    assert_eq!(n.candidates[0].reason, Some(why));
    assert!(n
        .reason
        .unwrap()
        .to_string()
        .contains("1 written during the write watch"));
    // A trusted page among them: the reason stays general (something else kept the loads from folding).
    let mut n = note(Reason::NoFoldedLoad);
    explain_untrusted(&mut n, &pages, &set(&[0x6000]), &set(&[0x5000]));
    assert_eq!(n.reason, Some(Reason::NoFoldedLoad));
    // Other reasons are left alone.
    let mut n = note(Reason::Live);
    explain_untrusted(&mut n, &pages, &set(&[]), &set(&[]));
    assert_eq!(n.reason, Some(Reason::Live));
}

#[test]
fn estimates_tie_within_their_sampling_noise() {
    // 50 samples each: a 30% difference is noise (2 standard errors are 40%).
    assert!(within_noise(700.0, 50, 1000.0, 50));
    assert!(within_noise(1000.0, 50, 700.0, 50), "symmetric");
    // The same difference on 2000 samples each is real.
    assert!(!within_noise(700.0, 2000, 1000.0, 2000));
    // Many samples still tie within NEAR_TIE; few samples never tie below MAX_TIE.
    assert!(within_noise(960.0, 1_000_000, 1000.0, 1_000_000));
    assert!(!within_noise(400.0, 1, 1000.0, 1));
}

#[test]
fn a_variant_without_a_loop_must_fold_enough_per_pass() {
    let st = Stats {
        visited: 36,
        folded: 20,
        folded_loads: 3,
        folded_branches: 1,
        residual: 16,
        code_bytes: 90,
    };
    // Looping within itself, 20 folded of 36 is worth a stub; entered on every pass, it is not.
    assert_eq!(why_not_worth_a_stub(&st, true), None);
    assert_eq!(
        why_not_worth_a_stub(&st, false),
        Some(Reason::StraightLine { folded: 20 })
    );
    let big = Stats {
        folded: MIN_FOLDED_STRAIGHT,
        residual: 40,
        ..st
    };
    assert_eq!(why_not_worth_a_stub(&big, false), None);
}

#[test]
fn each_family_of_candidates_is_scored_first_at_its_earliest_instruction() {
    let at = |address: u64, register: Gpr, values: &[u64]| TriggerCandidate {
        address: Addr(address),
        register,
        values: values.iter().map(|&v| (v, 10)).collect(),
        samples: 10 * values.len() as u64,
        distinct: values.len() as u64,
    };
    // Profile order: a computed value at two instructions, then the configuration pointer copied from rdi (at
    // the entry, sampled least) to rdx.
    let cands = vec![
        at(0x1040, Gpr::R8, &[1, 2, 3, 4]),
        at(0x1030, Gpr::R8, &[1, 2, 3, 4]),
        at(0x1050, Gpr::Rdx, &[0x2000, 0x2100, 0x2200, 0x2300]),
        at(0x1020, Gpr::Rdx, &[0x2000, 0x2100, 0x2200]),
        at(0x1000, Gpr::Rdi, &[0x2000, 0x2100, 0x2300]),
    ];
    // Each family's earliest instruction first (in the order the families appear), then the rest as profiled.
    assert_eq!(scoring_order(&cands), vec![1, 4, 0, 2, 3]);
    // One family alone keeps the profile's order after its earliest member.
    assert_eq!(scoring_order(&cands[2..]), vec![2, 0, 1]);
    assert_eq!(scoring_order(&[]), Vec::<usize>::new());
}
