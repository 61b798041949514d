//! Measuring: each installed stub is switched on and off in short alternating intervals while the program runs,
//! and kept only when the program is not measurably slower with it (do not predict, measure).
//!
//! The unit of work is a pass through the stub's dispatch site. The stub counts every pass the same way in both
//! modes (a variant entry or a fall-back), so CPU time per pass compares like with like. The off mode still pays
//! for the switched-off stub, which the program without dynspec does not: that cost, measured on this CPU
//! (`codecache::stub::calibrate`), is taken off the off mode's time per pass to stand for the native program.
//!
//! A variant whose own code passes its trigger address again (it loops back there, or follows several passes in
//! a row, as an interpreter's variant following the bytecode does) makes those passes where no stub counts
//! them. Its unit is then a call of the function around it, counted by a counting stub at the function's entry
//! for the length of the trial (the same cost in both modes); the switched-off stub's cost per call is its cost
//! per pass times the passes per call the off intervals saw. Where neither unit applies the stub is not
//! measured (the report says so).
//!
//! Everything here is pure: the session feeds readings (time, CPU time, passes) and toggles the stub as told.

use std::time::Duration;

/// Length of an interval with the stub on, and off (wall time; the readings are CPU time, so load only makes
/// them noisier). Time per unit compares intervals of any length. What measuring costs the program is a winner
/// switched off and a loser switched on: off intervals are short for the first, on intervals not much longer for
/// the second (a loser needs at least 7 pairs to be found slower, a winner 4 to be found faster).
pub const INTERVAL: Duration = Duration::from_millis(10);
pub const INTERVAL_OFF: Duration = Duration::from_millis(5);
/// Shortest intervals: a site that sees [`WANTED_PASSES`] in less gets these (a loser on at 0.6x costs the
/// program 40% of every on interval, a winner off its win in every off interval). Readings are exact per-thread
/// CPU counters, so a short interval is no less precise, only its share of scheduler noise larger: the sign test
/// discounts that.
pub const SHORT_INTERVAL: Duration = Duration::from_millis(3);
pub const SHORT_INTERVAL_OFF: Duration = Duration::from_millis(2);
/// Passes an interval should see for its time per pass to be trusted.
pub const WANTED_PASSES: u64 = 20_000;
/// Pairs of intervals before any verdict, and at most (then the variant is not measurably slower).
pub const MIN_PAIRS: usize = 4;
pub const MAX_PAIRS: usize = 24;
/// Chance, when a variant is in truth no slower, that measuring calls it slower (a one-sided sign test): a
/// removal is final for its region, so it needs strong evidence.
pub const SLOWER_ALPHA: f64 = 0.01;
/// The same for calling a variant faster, which only ends its trial early (it is kept either way): four pairs
/// out of four in its favour (1/16) are enough.
pub const FASTER_ALPHA: f64 = 0.07;
/// Passes an interval must see to count: fewer, and the time per pass is dominated by what is not the region.
pub const MIN_PASSES: u64 = 100;
/// Intervals that saw too few passes before the trial gives up (the site is no longer hot).
pub const MAX_EMPTY: usize = 12;
/// A kept stub is measured again when its passes per CPU second move this far (a phase change).
pub const PHASE_CHANGE: f64 = 0.5;

/// One reading of the target: when (since any fixed origin), its CPU time, units of work so far, and passes
/// through the measured stub so far (the same as `passes` when the unit is a pass).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reading {
    pub at: Duration,
    pub cpu_ns: u64,
    pub passes: u64,
    pub stub_passes: u64,
}

/// What measuring found.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    /// Faster than native with confidence.
    Faster(Effect),
    /// Not measurably slower after [`MAX_PAIRS`] pairs: kept.
    NotSlower(Effect),
    /// Slower than native with confidence: remove it.
    Slower(Effect),
    /// The site saw too few passes to measure anything.
    TooFewPasses,
}

impl Verdict {
    pub fn keeps(&self) -> bool {
        !matches!(self, Verdict::Slower(_))
    }

    pub fn effect(&self) -> Option<Effect> {
        match self {
            Verdict::Faster(e) | Verdict::NotSlower(e) | Verdict::Slower(e) => Some(*e),
            Verdict::TooFewPasses => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Verdict::Faster(_) => "faster",
            Verdict::NotSlower(_) => "not_measurably_slower",
            Verdict::Slower(_) => "slower",
            Verdict::TooFewPasses => "too_few_passes",
        }
    }
}

/// The measured effect: native CPU time per pass over the variant's (above 1: faster), the median over the
/// pairs, with its distribution-free confidence interval (order statistics of the pairs at [`SLOWER_ALPHA`] on
/// each side; the smallest and largest pair while there are too few pairs for one) and the pairs it rests on.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Effect {
    pub ratio: f64,
    pub low: f64,
    pub high: f64,
    pub pairs: usize,
}

/// One interval's result in one mode: CPU ns per unit, and stub passes per unit.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Half {
    on: bool,
    ns_per_pass: f64,
    stub_per_unit: f64,
}

/// At most this share of an off interval's time per unit is put down to the switched-off stub: the calibration
/// runs the stub alone in a tight loop, where its cost shows in full; in a program much of it overlaps other work,
/// and where a unit passes the stub many times (a call whose loop passes it at every iteration) an overestimate
/// would make a winning variant look slower than native.
pub const MAX_STUB_SHARE: f64 = 0.1;
/// The same for a unit that passes the stub about once (a pass through the dispatch site itself): the stub's
/// whole cost is on the unit's path, and capping it at [`MAX_STUB_SHARE`] made a loser look like a winner where
/// a pass costs a few ns (a stock Lua 5.3's dispatch: ~3 ns natively, the switched-off stub 1.3 ns more; capped,
/// its handler-sized variants measured 1.02x faster and made the run 1.25x slower). Only a sanity bound.
pub const MAX_STUB_SHARE_PER_PASS: f64 = 0.9;
/// Stub passes per unit up to which a unit counts as one pass.
const ONE_PASS: f64 = 1.5;

/// How many of `n` pairs the sign test may find on the wrong side and still decide at level `alpha`: the
/// largest k with P(Binomial(n, 1/2) < k) <= alpha (0: no decision possible yet).
fn sign_test_depth(n: usize, alpha: f64) -> usize {
    let mut cdf = 0.0;
    let mut choose = 1.0; // C(n, j)
    let all = 2f64.powi(n as i32);
    for j in 0..=n {
        cdf += choose / all;
        if cdf > alpha {
            return j;
        }
        choose = choose * (n - j) as f64 / (j + 1) as f64;
    }
    n
}

/// The verdict on pairs of (on, off) CPU ns per unit with the off interval's stub passes per unit, given what
/// a switched-off stub costs per pass; None while undecided. Each pair gives log(native / on), native being off
/// less the stub's cost (at most [`MAX_STUB_SHARE`] of off, or [`MAX_STUB_SHARE_PER_PASS`] for a unit that
/// passes the stub once). The pairs are compared by their signs and order,
/// never their mean: on a shared machine an interval now and then runs at a fraction of its speed (another
/// guest on the host, dynspec planning on the other core), and one such pair swung a mean by more than the
/// effects measured.
pub fn judge(pairs: &[(f64, f64, f64)], stub_off_ns: f64) -> Option<Verdict> {
    let mut d: Vec<f64> = pairs
        .iter()
        .filter(|(on, off, _)| *on > 0.0 && *off > 0.0)
        .map(|(on, off, k)| {
            let cap = if *k <= ONE_PASS {
                MAX_STUB_SHARE_PER_PASS
            } else {
                MAX_STUB_SHARE
            };
            ((off - (stub_off_ns * k).min(off * cap)) / on).ln()
        })
        .collect();
    let n = d.len();
    if n < MIN_PAIRS {
        return None;
    }
    d.sort_by(f64::total_cmp);
    let median = if n % 2 == 1 {
        d[n / 2]
    } else {
        (d[n / 2 - 1] + d[n / 2]) / 2.0
    };
    let k = sign_test_depth(n, SLOWER_ALPHA);
    let (low, high) = if k == 0 {
        (d[0], d[n - 1])
    } else {
        (d[k - 1], d[n - k])
    };
    let effect = Effect {
        ratio: median.exp(),
        low: low.exp(),
        high: high.exp(),
        pairs: n,
    };
    let kf = sign_test_depth(n, FASTER_ALPHA);
    if k > 0 && high < 0.0 {
        Some(Verdict::Slower(effect))
    } else if kf > 0 && d[kf - 1] > 0.0 {
        Some(Verdict::Faster(effect))
    } else if n >= MAX_PAIRS {
        Some(Verdict::NotSlower(effect))
    } else {
        None
    }
}

/// One stub's measurement in progress.
#[derive(Clone, Debug)]
pub struct Trial {
    on: bool,
    start: Reading,
    halves: Vec<Half>,
    empty: usize,
    pairs_started_on: bool,
    /// Lengths of the on and off intervals: [`INTERVAL`] and [`INTERVAL_OFF`] until an interval showed the
    /// site's pass rate ([`interval_lengths`]).
    lengths: (Duration, Duration),
    /// Time the stub spent switched off so far.
    pub off_time: Duration,
    /// Stub passes and CPU ns over the intervals with the stub on (empty ones too).
    on_stub: (u64, u64),
}

/// Interval lengths for a site passed `passes` times in `elapsed`: long enough for [`WANTED_PASSES`], between
/// the short and the full intervals.
pub fn interval_lengths(passes: u64, elapsed: Duration) -> (Duration, Duration) {
    if passes == 0 || elapsed.is_zero() {
        return (INTERVAL, INTERVAL_OFF);
    }
    let wanted = elapsed.mul_f64(WANTED_PASSES as f64 / passes as f64);
    (
        wanted.clamp(SHORT_INTERVAL, INTERVAL),
        wanted.clamp(SHORT_INTERVAL_OFF, INTERVAL_OFF),
    )
}

/// What the session must do after a reading.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Step {
    /// Nothing yet.
    Wait,
    /// Switch the stub on (true) or off, then go on.
    Switch(bool),
    /// Done: switch the stub on again unless the verdict removes it.
    Done(Verdict),
}

impl Trial {
    /// Start measuring with the stub on (as installed); the first interval runs from `r`.
    pub fn start(r: Reading) -> Trial {
        Trial {
            on: true,
            start: r,
            halves: Vec::new(),
            empty: 0,
            pairs_started_on: true,
            lengths: (INTERVAL, INTERVAL_OFF),
            off_time: Duration::ZERO,
            on_stub: (0, 0),
        }
    }

    /// The lengths of its on and off intervals.
    pub fn lengths(&self) -> (Duration, Duration) {
        self.lengths
    }

    /// The current interval's length.
    fn length(&self) -> Duration {
        if self.on {
            self.lengths.0
        } else {
            self.lengths.1
        }
    }

    /// How long after `at` the current interval is over (zero: it is).
    pub fn due_in(&self, at: Duration) -> Duration {
        (self.start.at + self.length()).saturating_sub(at)
    }

    /// Whether the stub should be on now.
    pub fn is_on(&self) -> bool {
        self.on
    }

    /// Whether the current interval is over at `at` (a reading before then is only waited on): the session
    /// reads the target's CPU clock only then, each reading of a running thread's clock interrupts its CPU.
    pub fn due(&self, at: Duration) -> bool {
        at.saturating_sub(self.start.at) >= self.length()
    }

    /// Feed a reading; `stub_off_ns` as for [`judge`].
    pub fn step(&mut self, r: Reading, stub_off_ns: f64) -> Step {
        let elapsed = r.at.saturating_sub(self.start.at);
        if !self.due(r.at) {
            return Step::Wait;
        }
        if !self.on {
            self.off_time += elapsed;
        }
        let passes = r.passes.wrapping_sub(self.start.passes);
        let cpu = r.cpu_ns.saturating_sub(self.start.cpu_ns);
        if self.on {
            self.on_stub.0 += r.stub_passes.wrapping_sub(self.start.stub_passes);
            self.on_stub.1 += cpu;
        }
        if passes < MIN_PASSES || cpu == 0 {
            // Too little happened at the site for this interval to say anything; its pair starts again.
            self.empty += 1;
            if !self.halves.len().is_multiple_of(2) {
                self.halves.pop();
            }
            if self.empty >= MAX_EMPTY {
                return Step::Done(Verdict::TooFewPasses);
            }
            self.on = self.pairs_started_on;
            self.start = r;
            return Step::Switch(self.on);
        }
        let stub = r.stub_passes.wrapping_sub(self.start.stub_passes);
        if self.halves.is_empty() {
            // The first interval's pass rate sets the lengths for the whole trial (both modes alike).
            self.lengths = interval_lengths(passes, elapsed);
        }
        self.halves.push(Half {
            on: self.on,
            ns_per_pass: cpu as f64 / passes as f64,
            stub_per_unit: stub as f64 / passes as f64,
        });
        self.start = r;
        if self.halves.len().is_multiple_of(2) {
            if let Some(v) = judge(&self.pairs(), stub_off_ns) {
                return Step::Done(v);
            }
            // The next pair starts with the other mode, so that a drift in the program's speed favours neither.
            self.pairs_started_on = !self.pairs_started_on;
            self.on = self.pairs_started_on;
        } else {
            self.on = !self.on;
        }
        Step::Switch(self.on)
    }

    /// Completed pairs as (on, off) ns per unit, with the off half's stub passes per unit.
    fn pairs(&self) -> Vec<(f64, f64, f64)> {
        self.halves
            .chunks_exact(2)
            .map(|p| {
                let (on, off) = if p[0].on { (p[0], p[1]) } else { (p[1], p[0]) };
                (on.ns_per_pass, off.ns_per_pass, off.stub_per_unit)
            })
            .collect()
    }

    /// Passes per CPU second seen with the stub on (for noticing a phase change later).
    /// Passes through the stub per CPU millisecond while it was on: how often its variants are entered (or
    /// fall back), whatever the trial's unit.
    pub fn on_stub_rate(&self) -> f64 {
        if self.on_stub.1 == 0 {
            return 0.0;
        }
        self.on_stub.0 as f64 * 1e6 / self.on_stub.1 as f64
    }

    pub fn on_rate(&self) -> Option<f64> {
        let on: Vec<f64> = self
            .halves
            .iter()
            .filter(|h| h.on)
            .map(|h| 1e9 / h.ns_per_pass)
            .collect();
        (!on.is_empty()).then(|| on.iter().sum::<f64>() / on.len() as f64)
    }
}

/// Whether a kept stub's pass rate moved enough since it was measured to measure it again.
pub fn phase_changed(measured_rate: f64, rate_now: f64) -> bool {
    if measured_rate <= 0.0 || rate_now <= 0.0 {
        return false;
    }
    let ratio = rate_now / measured_rate;
    !(1.0 - PHASE_CHANGE..=1.0 / (1.0 - PHASE_CHANGE)).contains(&ratio)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn reading(at_ms: u64, cpu_ns: u64, passes: u64, stub_passes: u64) -> Reading {
        Reading {
            at: ms(at_ms),
            cpu_ns,
            passes,
            stub_passes,
        }
    }

    /// A trial started at time 0 with every count at 0.
    fn started() -> Trial {
        Trial::start(reading(0, 0, 0, 0))
    }

    /// Drive a trial with a program whose time per pass is `on_ns` / `off_ns` (plus a little deterministic
    /// noise); returns the verdict and the number of intervals it took.
    fn drive(on_ns: f64, off_ns: f64, stub_ns: f64) -> (Verdict, usize) {
        let mut t = started();
        let (mut cpu, mut passes) = (0u64, 0u64);
        for i in 1..200u64 {
            let per = if t.is_on() { on_ns } else { off_ns };
            let noise = 1.0 + 0.02 * (((i * 7919) % 13) as f64 / 13.0 - 0.5);
            let burned = 20_000_000u64;
            cpu += burned;
            passes += (burned as f64 / (per * noise)) as u64;
            match t.step(
                Reading {
                    at: ms(20 * i),
                    cpu_ns: cpu,
                    passes,
                    stub_passes: passes,
                },
                stub_ns,
            ) {
                Step::Done(v) => return (v, i as usize),
                Step::Wait | Step::Switch(_) => {}
            }
        }
        panic!("no verdict");
    }

    #[test]
    fn a_clear_win_is_decided_in_the_fewest_pairs() {
        let (v, intervals) = drive(10.0, 40.0, 2.0);
        assert!(matches!(v, Verdict::Faster(_)), "{v:?}");
        assert_eq!(intervals, 2 * MIN_PAIRS);
        let e = v.effect().expect("effect");
        // Native is 40 - 2 = 38 ns per pass against 10.
        assert!((e.ratio - 3.8).abs() < 0.2, "{e:?}");
        assert!(e.low <= e.ratio && e.ratio <= e.high);
    }

    #[test]
    fn a_loser_is_found_slower_and_removed() {
        let (v, _) = drive(12.0, 11.0, 1.0);
        assert!(matches!(v, Verdict::Slower(_)), "{v:?}");
        assert!(!v.keeps());
        assert!(v.effect().expect("effect").ratio < 0.9);
    }

    #[test]
    fn the_switched_off_stub_cost_counts_against_the_variant() {
        // Same time per pass on and off: without the stub the program would be faster, so the variant loses.
        let (v, _) = drive(10.0, 10.0, 1.5);
        assert!(matches!(v, Verdict::Slower(_)), "{v:?}");
        // No stub cost: no measurable difference, kept after the most pairs.
        let (v, intervals) = drive(10.0, 10.0, 0.0);
        assert!(matches!(v, Verdict::NotSlower(_)), "{v:?}");
        assert!(v.keeps());
        assert_eq!(intervals, 2 * MAX_PAIRS);
    }

    #[test]
    fn per_call_units_charge_the_stub_for_every_pass_of_a_call_up_to_a_tenth() {
        // 10 ns per call on, 10.5 off; off, each call passes the switched-off stub 2 times at 0.4 ns: natively a
        // call costs 9.7 ns, so the variant is slower although on beats off.
        let pairs: Vec<(f64, f64, f64)> = (0..8)
            .map(|i| (10.0 + 0.01 * i as f64, 10.5 - 0.01 * i as f64, 2.0))
            .collect();
        let v = judge(&pairs, 0.4).expect("decided");
        assert!(matches!(v, Verdict::Slower(_)), "{v:?}");
        // A winner (9.5 ns on, 11 off) whose calls pass the stub 100 times: at 0.4 ns a pass that would be 40 ns,
        // more than a call takes; a tenth of off at most is put down to the stub, and it stays a winner.
        let pairs: Vec<(f64, f64, f64)> = (0..8)
            .map(|i| (9.5 + 0.01 * i as f64, 11.0 - 0.01 * i as f64, 100.0))
            .collect();
        let v = judge(&pairs, 0.4).expect("decided");
        assert!(matches!(v, Verdict::Faster(_)), "{v:?}");
    }

    #[test]
    fn the_stub_rate_counts_the_on_intervals_only() {
        let mut t = started();
        assert_eq!(t.on_stub_rate(), 0.0);
        // On: 10 ms of CPU, 5 units but 50000 stub passes (an empty interval for the unit: too few calls).
        let r = reading(10, 10_000_000, 5, 50_000);
        assert_eq!(
            t.step(r, 0.0),
            Step::Switch(true),
            "the empty pair starts again"
        );
        assert_eq!(t.on_stub_rate(), 5000.0);
        // Another on interval with the stub passed 10 times in 10 ms: 50010 in 20 ms.
        let r2 = reading(20, 20_000_000, 10, 50_010);
        t.step(r2, 0.0);
        assert_eq!(t.on_stub_rate(), 2500.5);
    }

    #[test]
    fn a_cheap_pass_is_charged_the_whole_stub() {
        // A stock interpreter's dispatch: 4.3 ns a pass off, 3.8 on, the switched-off stub 1.47 ns: natively a
        // pass costs 2.83 ns, and the variant is slower although on beats off by more than a tenth of off.
        let pairs: Vec<(f64, f64, f64)> = (0..8)
            .map(|i| (3.8 + 0.01 * i as f64, 4.3 - 0.01 * i as f64, 1.0))
            .collect();
        let v = judge(&pairs, 1.47).expect("decided");
        assert!(matches!(v, Verdict::Slower(_)), "{v:?}");
        assert!(v.effect().is_some_and(|e| e.ratio < 0.8), "{v:?}");
    }

    #[test]
    fn intervals_shrink_for_a_busy_site_only() {
        // 1M passes in 10 ms: 20k take 0.2 ms, so the shortest intervals.
        assert_eq!(
            interval_lengths(1_000_000, ms(10)),
            (SHORT_INTERVAL, SHORT_INTERVAL_OFF)
        );
        // 10k passes in 10 ms: 20k take 20 ms, more than the longest.
        assert_eq!(interval_lengths(10_000, ms(10)), (INTERVAL, INTERVAL_OFF));
        // 40k in 10 ms: 5 ms wanted.
        assert_eq!(interval_lengths(40_000, ms(10)), (ms(5), ms(5)));
        assert_eq!(interval_lengths(0, ms(10)), (INTERVAL, INTERVAL_OFF));
        // A trial takes its lengths from its first interval.
        let mut t = started();
        assert_eq!(t.due_in(ms(0)), INTERVAL);
        let r = reading(10, 10_000_000, 1_000_000, 1_000_000);
        assert_eq!(t.step(r, 1.0), Step::Switch(false));
        assert_eq!(t.lengths(), (SHORT_INTERVAL, SHORT_INTERVAL_OFF));
        assert_eq!(t.due_in(ms(10)), SHORT_INTERVAL_OFF);
        assert!(!t.due(ms(11)));
        assert!(t.due(ms(12)));
    }

    #[test]
    fn a_site_that_goes_cold_gives_up() {
        let mut t = started();
        let mut last = Step::Wait;
        for i in 1..=MAX_EMPTY as u64 {
            last = t.step(
                Reading {
                    at: ms(20 * i),
                    cpu_ns: 20_000_000 * i,
                    passes: 5 * i,
                    stub_passes: 5 * i,
                },
                1.0,
            );
        }
        assert_eq!(last, Step::Done(Verdict::TooFewPasses));
    }

    #[test]
    fn nothing_happens_before_an_interval_is_over() {
        let mut t = started();
        let r = Reading {
            at: ms(5),
            cpu_ns: 5_000_000,
            passes: 1_000_000,
            stub_passes: 1_000_000,
        };
        assert!(!t.due(r.at));
        assert_eq!(t.step(r, 1.0), Step::Wait);
        assert!(t.is_on());
        assert!(t.due(ms(10)));
    }

    #[test]
    fn intervals_alternate_and_pairs_swap_their_order() {
        let mut t = started();
        let mut modes = Vec::new();
        for i in 1..=4u64 {
            // Noisy enough that no verdict comes after the first pair.
            let passes = 1_000_000 * i + if i % 2 == 0 { 300_000 } else { 0 };
            if let Step::Switch(on) = t.step(
                Reading {
                    at: ms(20 * i),
                    cpu_ns: 20_000_000 * i,
                    passes,
                    stub_passes: passes,
                },
                0.0,
            ) {
                modes.push(on);
            }
        }
        // on, off | off, on | ...
        assert_eq!(modes, vec![false, false, true, true]);
    }

    #[test]
    fn the_sign_test_depth_follows_the_binomial() {
        // Four pairs: 1/16 = 0.0625; seven: 1/128.
        assert_eq!(sign_test_depth(4, SLOWER_ALPHA), 0);
        assert_eq!(sign_test_depth(4, FASTER_ALPHA), 1);
        assert_eq!(sign_test_depth(6, SLOWER_ALPHA), 0);
        assert_eq!(sign_test_depth(7, SLOWER_ALPHA), 1);
        // 24 pairs: P(B <= 5) = 0.0033, P(B <= 6) = 0.0113.
        assert_eq!(sign_test_depth(24, SLOWER_ALPHA), 6);
    }

    #[test]
    fn one_wild_pair_does_not_decide() {
        // A clear 10% loss, and one pair measured while the program ran at a quarter of its speed with the stub
        // off: a mean of logs would call it a win; the signs do not.
        let mut pairs: Vec<(f64, f64, f64)> = (0..12)
            .map(|i| (11.0 + 0.01 * i as f64, 10.0, 0.0))
            .collect();
        pairs[3] = (11.0, 400.0, 0.0);
        let v = judge(&pairs, 0.0).expect("decided");
        assert!(matches!(v, Verdict::Slower(_)), "{v:?}");
        let e = v.effect().expect("effect");
        assert!((e.ratio - 10.0 / 11.05).abs() < 0.01, "{e:?}");
        assert!(e.high < 1.0 && e.low <= e.ratio, "{e:?}");
    }

    #[test]
    fn phase_changes_are_big_moves_only() {
        assert!(!phase_changed(1e6, 1.2e6));
        assert!(!phase_changed(1e6, 0.6e6));
        assert!(phase_changed(1e6, 0.4e6));
        assert!(phase_changed(1e6, 2.5e6));
        assert!(!phase_changed(0.0, 1e6));
    }
}
