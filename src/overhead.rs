//! dynspec's own cost to the program (ptrace stops, guard faults, sampling) and the decision to step aside.
//!
//! Every stop of a tracee is time the program does not run: a signal-delivery stop, a clone/fork/exec event, a
//! write to a guarded page. [`Overhead`] adds them up (counts, and the time dynspec held the thread, plus an
//! estimate of the kernel's part of each stop) over the whole run and per measurement window. [`decide`] is the
//! pure rule that turns the session's standing into "stay", "detach" or "remove everything and detach": ptrace
//! cannot choose which signals stop a tracee, so the only way to stop intercepting them is to let go.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// The kernel's part of one ptrace stop (the tracee stops, the tracer is woken, and back again: two context
/// switches, longer on a VM), which dynspec cannot time from its side, until `tracer::calibrate` measured it
/// (it starts after 20 stops and takes some 30 ms of a second CPU). Until then: the low end of what it measured
/// on the VMs tried (60-100 µs); 15 µs, the first guess, let a program stopped 3500 times a second (sig_interp)
/// lose 3% of its run before the measurement showed it.
pub const STOP_KERNEL_COST: Duration = Duration::from_micros(60);
/// What one perf sample costs the program (a timer interrupt and a copy of its registers; ~5% at 1999 Hz on a
/// VM): an estimate, used only in the report's totals.
pub const SAMPLE_COST: Duration = Duration::from_micros(25);
/// Shortest window whose cost share [`decide`] trusts.
pub const MIN_WINDOW: Duration = Duration::from_millis(250);
/// A window closes this early when it is already [`SEVERE`] times over budget from at least [`FAST_MIN_STOPS`]
/// stops: a signal-heavy program loses most of its time to stops (sig_interp: 7000 stops a second, 60% of its
/// time), and waiting out a whole window cost it more than the 2% the budget allows.
pub const FAST_WINDOW: Duration = Duration::from_millis(20);
/// Stops a window needs to close early: one invalidation (a world stop of a few ms) is a one-time cost.
pub const FAST_MIN_STOPS: u32 = 20;
/// Default share of the program's wall time dynspec may take in stops before it backs off (`--max-overhead`).
pub const DEFAULT_MAX_OVERHEAD: f64 = 0.02;
/// Final planning rounds in a row that installed nothing (the first final one and the periodic looks after it,
/// 1, 2 and 4 s apart) before the session concludes nothing will be installed and detaches: hot code that starts
/// seconds into the run (samples/late_start.c) is still found.
pub const FRUITLESS_ROUNDS: u32 = 4;
/// Windows in a row over budget before live variants are removed for dynspec's cost: one invalidation (a stop
/// of the world and a re-plan) is a one-time cost, a signal-heavy program pays in every window.
pub const COSTLY_WINDOWS: u32 = 2;
/// A window this many times over the budget removes live variants at once: an invalidation costs a few
/// milliseconds, a program losing a fifth of its time to stops should not lose it for another window.
pub const SEVERE: f64 = 10.0;
/// Share of the budget stops may cost once a planning round found nothing to install: with no variant they buy
/// nothing, and a run that pays its whole budget in stops is measurably slower than native (`samples/signals`:
/// 1.3% of its time in stops for SIGPROFs, the budget being 2%).
pub const IDLE_SHARE: f64 = 0.25;

/// Which kind of stop the program paid for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopKind {
    /// A signal of the program's own, delivered through a ptrace signal-delivery stop.
    Signal,
    /// A clone, fork, vfork or exec event.
    Event,
    /// A write to a page guarded for a variant (uffd or SIGSEGV), or to a watched page.
    GuardFault,
}

/// What the program lost to dynspec so far, and in the current window.
#[derive(Debug)]
pub struct Overhead {
    signal_stops: u64,
    event_stops: u64,
    guard_faults: u64,
    /// Time dynspec held stopped threads (timed on its side), all stops.
    held: Duration,
    window_start: Instant,
    /// Time dynspec held stopped threads in the current window, and the stops there.
    window_held: Duration,
    window_stops: u32,
    /// The part of those that guard faults took (a write watch's, an invalidation's: one-time costs).
    window_fault_held: Duration,
    window_faults: u32,
    /// Share of wall time lost in the last completed window.
    last_share: Option<f64>,
    /// The same without guard faults: what signals and events, which recur, cost.
    last_recurrent_share: Option<f64>,
    /// Completed windows in a row whose share was over the budget.
    costly_windows: u32,
    /// The kernel's part of one stop: [`STOP_KERNEL_COST`] until measured ([`Overhead::set_stop_cost`]).
    stop_cost: Duration,
    /// Whether `stop_cost` was measured on this machine.
    stop_cost_measured: bool,
}

impl Overhead {
    pub fn new(now: Instant) -> Overhead {
        Overhead {
            signal_stops: 0,
            event_stops: 0,
            guard_faults: 0,
            held: Duration::ZERO,
            window_start: now,
            window_held: Duration::ZERO,
            window_stops: 0,
            window_fault_held: Duration::ZERO,
            window_faults: 0,
            last_share: None,
            last_recurrent_share: None,
            costly_windows: 0,
            stop_cost: STOP_KERNEL_COST,
            stop_cost_measured: false,
        }
    }

    /// The kernel's part of one stop as measured on this machine (`tracer::calibrate::signal_stop_cost`): every
    /// stop, the earlier ones too, is charged at it.
    pub fn set_stop_cost(&mut self, cost: Duration) {
        self.stop_cost = cost;
        self.stop_cost_measured = true;
    }

    /// One stop of a thread, held `held` by dynspec.
    pub fn stop(&mut self, kind: StopKind, held: Duration) {
        match kind {
            StopKind::Signal => self.signal_stops += 1,
            StopKind::Event => self.event_stops += 1,
            StopKind::GuardFault => self.guard_faults += 1,
        }
        self.held += held;
        self.window_held += held;
        self.window_stops = self.window_stops.saturating_add(1);
        if kind == StopKind::GuardFault {
            self.window_fault_held += held;
            self.window_faults = self.window_faults.saturating_add(1);
        }
    }

    /// Close the window once it is [`MIN_WINDOW`] long (or [`FAST_WINDOW`], when it is already severely over
    /// budget from many stops): its share of wall time lost becomes the last share, and the count of costly
    /// windows in a row is updated against `budget`.
    pub fn roll(&mut self, now: Instant, budget: f64) {
        let len = now.saturating_duration_since(self.window_start);
        // Charged at the stop cost known now: the measurement may come in during the window.
        let lost = self.window_held + self.stop_cost * self.window_stops;
        let share = cost_share(lost, len);
        let recurrent_stops = self.window_stops - self.window_faults;
        let recurrent = cost_share(
            self.window_held.saturating_sub(self.window_fault_held)
                + self.stop_cost * recurrent_stops,
            len,
        );
        // Only stops that recur close a window early: one invalidation (a few ms) is a one-time cost.
        let severe_early = len >= FAST_WINDOW
            && recurrent_stops >= FAST_MIN_STOPS
            && budget < 1.0
            && recurrent > budget * SEVERE;
        if len < MIN_WINDOW && !severe_early {
            return;
        }
        self.last_share = Some(share);
        self.last_recurrent_share = Some(recurrent);
        self.costly_windows = if share > budget {
            self.costly_windows + 1
        } else {
            0
        };
        self.window_start = now;
        self.window_held = Duration::ZERO;
        self.window_stops = 0;
        self.window_fault_held = Duration::ZERO;
        self.window_faults = 0;
    }

    /// Share of wall time lost in the last completed window (None before the first).
    pub fn last_share(&self) -> Option<f64> {
        self.last_share
    }

    /// [`Overhead::last_share`] without guard faults.
    pub fn last_recurrent_share(&self) -> Option<f64> {
        self.last_recurrent_share
    }

    pub fn costly_windows(&self) -> u32 {
        self.costly_windows
    }

    pub fn stops(&self) -> u64 {
        self.signal_stops + self.event_stops + self.guard_faults
    }

    /// Total time lost to stops: dynspec's handling plus the kernel's estimated part of each.
    pub fn stop_time(&self) -> Duration {
        self.held + self.stop_cost * u32::try_from(self.stops()).unwrap_or(u32::MAX)
    }

    /// The report's `overhead`, given the samples taken, the time the world was stopped for installs, and the
    /// session's length.
    pub fn to_json(
        &self,
        samples: u64,
        install: Duration,
        duration: Duration,
        steps: Vec<StepJson>,
    ) -> OverheadJson {
        let sampling = SAMPLE_COST * u32::try_from(samples).unwrap_or(u32::MAX);
        let lost = self.stop_time() + sampling + install;
        OverheadJson {
            signal_stops: self.signal_stops,
            event_stops: self.event_stops,
            guard_faults: self.guard_faults,
            stop_ms: ms(self.stop_time()),
            stop_cost_us: (self.stop_cost.as_secs_f64() * 1e7).round() / 10.0,
            stop_cost_measured: self.stop_cost_measured,
            held_ms: ms(self.held),
            sampling_ms: ms(sampling),
            install_ms: ms(install),
            lost_ms: ms(lost),
            share: cost_share(lost, duration),
            steps,
        }
    }
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

/// `lost` as a share of `wall` (0 for an empty span).
pub fn cost_share(lost: Duration, wall: Duration) -> f64 {
    if wall.is_zero() {
        return 0.0;
    }
    lost.as_secs_f64() / wall.as_secs_f64()
}

/// What the session knows when it considers stepping aside.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Standing {
    /// `--profile-only`: the profile is the product, sampling lasts the whole run.
    pub profile_only: bool,
    /// Variants installed and alive.
    pub live_variants: usize,
    /// Variants may still be installed: a code cache exists (or will, after the first plan) and specializing
    /// was not given up.
    pub can_install: bool,
    /// The first planning round has happened.
    pub planned: bool,
    /// Planning rounds in a row (since the last install) that installed nothing.
    pub fruitless_rounds: u32,
    /// Between planning rounds (sampling paused until the next periodic look), not in the middle of one.
    pub idle: bool,
    /// Share of wall time lost in the last completed window (None before the first).
    pub last_share: Option<f64>,
    /// The same without guard faults (a write watch's faults end with it; signals and events recur).
    pub last_recurrent_share: Option<f64>,
    /// Completed windows in a row over the budget.
    pub costly_windows: u32,
    /// The budget: `--max-overhead`.
    pub budget: f64,
}

/// Why dynspec stepped aside.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepReason {
    /// Specializing was given up (or the code cache could not be set up) and nothing is installed.
    CannotInstall,
    /// [`FRUITLESS_ROUNDS`] planning rounds in a row installed nothing: the program's hot code has nothing
    /// worth a variant, and watching it longer only costs it.
    NothingToInstall,
    /// Nothing is installed, a plan found nothing, and the stops (signals, events) cost more than the budget.
    CostWithoutVariants,
    /// Variants are live, but the stops cost more than the budget window after window: a ptrace stop for every
    /// signal cannot be avoided while variants need their evacuation, so they go and dynspec with them.
    CostOverBudget,
}

impl StepReason {
    /// One sentence for the report.
    pub fn explain(self) -> &'static str {
        match self {
            StepReason::CannotInstall => "nothing is installed and nothing can be: detached",
            StepReason::NothingToInstall => {
                "planning rounds in a row (the first final one and the periodic looks after it) found nothing to \
                 install: detached, the program runs on untraced"
            }
            StepReason::CostWithoutVariants => {
                "nothing is installed and ptrace stops (signals, events) cost the program more than they can buy \
                 (a quarter of --max-overhead once a planning round found nothing, a fifth of its time before): \
                 detached"
            }
            StepReason::CostOverBudget => {
                "ptrace stops cost the program more than the budget (--max-overhead) window after window, more than \
                 the variants can be trusted to save: every variant removed, then detached"
            }
        }
    }
}

/// What to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Stay,
    /// Nothing is installed: detach (the program runs on untraced, as it was).
    Detach(StepReason),
    /// Remove every variant, then detach.
    RemoveAndDetach(StepReason),
}

/// Whether dynspec should step aside now.
pub fn decide(s: &Standing) -> Decision {
    if s.profile_only {
        return Decision::Stay;
    }
    // A budget of the whole run (`--max-overhead 100`) never backs off for cost.
    let over = s.budget < 1.0 && s.last_share.is_some_and(|x| x > s.budget);
    if s.live_variants == 0 {
        if !s.can_install {
            return Decision::Detach(StepReason::CannotInstall);
        }
        if s.idle && s.fruitless_rounds >= FRUITLESS_ROUNDS {
            return Decision::Detach(StepReason::NothingToInstall);
        }
        let over_idle = s.budget < 1.0
            && s.last_recurrent_share
                .is_some_and(|x| x > s.budget * IDLE_SHARE);
        if s.planned && s.fruitless_rounds >= 1 && over_idle {
            return Decision::Detach(StepReason::CostWithoutVariants);
        }
        // Losing a fifth of its time to stops before anything is installed: a variant would have to win that
        // back first, under the same stops (each signal also moves a thread out of it).
        if s.budget < 1.0
            && s.last_recurrent_share
                .is_some_and(|x| x > s.budget * SEVERE)
        {
            return Decision::Detach(StepReason::CostWithoutVariants);
        }
        return Decision::Stay;
    }
    let severe = s.budget < 1.0 && s.last_share.is_some_and(|x| x > s.budget * SEVERE);
    if severe || (over && s.costly_windows >= COSTLY_WINDOWS) {
        return Decision::RemoveAndDetach(StepReason::CostOverBudget);
    }
    Decision::Stay
}

/// One thing the session did about its own cost, for the report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StepJson {
    /// Since the session started.
    pub time_ms: u64,
    /// `detached` or `removed_and_detached`.
    pub action: String,
    pub reason: StepReason,
    pub why: String,
    /// Share of wall time lost to stops in the last window (null before the first window).
    #[schemars(required, schema_with = "crate::report::nullable::<f64>")]
    pub window_share: Option<f64>,
}

impl StepJson {
    pub fn new(time_ms: u64, d: Decision, window_share: Option<f64>) -> Option<StepJson> {
        let (action, reason) = match d {
            Decision::Stay => return None,
            Decision::Detach(r) => ("detached", r),
            Decision::RemoveAndDetach(r) => ("removed_and_detached", r),
        };
        Some(StepJson {
            time_ms,
            action: action.to_string(),
            reason,
            why: reason.explain().to_string(),
            window_share,
        })
    }
}

/// The report's `overhead`: what the program lost to dynspec.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OverheadJson {
    /// Signals of the program's own, each a ptrace stop.
    pub signal_stops: u64,
    /// Clone, fork, vfork and exec events.
    pub event_stops: u64,
    /// Writes to guarded (or watched) pages handled by dynspec.
    pub guard_faults: u64,
    /// Time lost to those stops: `held_ms` plus the kernel's part of each (`stop_cost_us`).
    pub stop_ms: f64,
    /// The kernel's part of one stop: measured on this machine at the start (`stop_cost_measured`), else an
    /// estimate.
    #[serde(default)]
    pub stop_cost_us: f64,
    #[serde(default)]
    pub stop_cost_measured: bool,
    /// Time dynspec held stopped threads (timed).
    pub held_ms: f64,
    /// Estimated cost of the perf samples.
    pub sampling_ms: f64,
    /// The world stopped for installs.
    pub install_ms: f64,
    /// All of the above.
    pub lost_ms: f64,
    /// `lost_ms` as a share of the session's length.
    pub share: f64,
    /// What dynspec did about its cost (stepping aside), in order.
    #[serde(default)]
    pub steps: Vec<StepJson>,
}

impl OverheadJson {
    /// The report's summary lines: what dynspec cost, and what it did about it.
    pub fn render(&self, o: &mut String) -> std::fmt::Result {
        use std::fmt::Write as _;
        writeln!(
            o,
            "overhead: {:.1} ms lost ({:.2}% of the run): {} signal stops, {} events, {} guard faults ({:.1} ms), \
             sampling ~{:.1} ms, installs {:.1} ms",
            self.lost_ms,
            self.share * 100.0,
            self.signal_stops,
            self.event_stops,
            self.guard_faults,
            self.stop_ms,
            self.sampling_ms,
            self.install_ms
        )?;
        for s in &self.steps {
            writeln!(o, "  {:>8} ms  {}: {}", s.time_ms, s.action, s.why)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standing() -> Standing {
        Standing {
            profile_only: false,
            live_variants: 0,
            can_install: true,
            planned: true,
            fruitless_rounds: 0,
            idle: true,
            last_share: Some(0.0),
            last_recurrent_share: Some(0.0),
            costly_windows: 0,
            budget: DEFAULT_MAX_OVERHEAD,
        }
    }

    #[test]
    fn profile_only_never_steps_aside() {
        let s = Standing {
            profile_only: true,
            can_install: false,
            fruitless_rounds: 10,
            last_share: Some(0.9),
            ..standing()
        };
        assert_eq!(decide(&s), Decision::Stay);
    }

    #[test]
    fn nothing_installable_detaches() {
        let s = Standing {
            can_install: false,
            ..standing()
        };
        assert_eq!(decide(&s), Decision::Detach(StepReason::CannotInstall));
    }

    #[test]
    fn fruitless_rounds_detach_only_when_idle_and_enough() {
        let mut s = Standing {
            fruitless_rounds: FRUITLESS_ROUNDS - 1,
            ..standing()
        };
        assert_eq!(
            decide(&s),
            Decision::Stay,
            "a periodic look may still find late hot code"
        );
        s.fruitless_rounds = FRUITLESS_ROUNDS;
        assert_eq!(decide(&s), Decision::Detach(StepReason::NothingToInstall));
        s.idle = false;
        assert_eq!(decide(&s), Decision::Stay, "in the middle of a round");
    }

    #[test]
    fn costly_stops_without_variants_detach_after_a_fruitless_plan() {
        let mut s = Standing {
            last_share: Some(0.1),
            last_recurrent_share: Some(0.1),
            fruitless_rounds: 0,
            planned: false,
            ..standing()
        };
        assert_eq!(
            decide(&s),
            Decision::Stay,
            "the first plan may find a variant worth its cost"
        );
        s.last_share = Some(0.3);
        s.last_recurrent_share = s.last_share;
        assert_eq!(
            decide(&s),
            Decision::Detach(StepReason::CostWithoutVariants),
            "not when a fifth of the time goes to stops: a variant would have to win that back first"
        );
        s.last_share = Some(0.1);
        s.last_recurrent_share = s.last_share;
        s.planned = true;
        s.fruitless_rounds = 1;
        assert_eq!(
            decide(&s),
            Decision::Detach(StepReason::CostWithoutVariants)
        );
        s.last_share = Some(DEFAULT_MAX_OVERHEAD / 2.0);
        s.last_recurrent_share = s.last_share;
        assert_eq!(
            decide(&s),
            Decision::Detach(StepReason::CostWithoutVariants),
            "with nothing installed, half the budget already buys nothing"
        );
        s.last_share = Some(DEFAULT_MAX_OVERHEAD * IDLE_SHARE / 2.0);
        s.last_recurrent_share = s.last_share;
        assert_eq!(
            decide(&s),
            Decision::Stay,
            "within the idle share of the budget"
        );
        s.last_share = Some(DEFAULT_MAX_OVERHEAD / 2.0);
        s.last_recurrent_share = s.last_share;
        s.fruitless_rounds = 0;
        assert_eq!(
            decide(&s),
            Decision::Stay,
            "before a planning round found nothing, the whole budget"
        );
        // A window whose cost was the write watch's faults (they end with it): no reason to leave.
        s.fruitless_rounds = 1;
        s.last_share = Some(0.3);
        s.last_recurrent_share = Some(0.0);
        assert_eq!(decide(&s), Decision::Stay);
    }

    #[test]
    fn live_variants_go_only_after_costly_windows_in_a_row() {
        let mut s = Standing {
            live_variants: 2,
            fruitless_rounds: 9,
            last_share: Some(0.05),
            costly_windows: 1,
            ..standing()
        };
        assert_eq!(
            decide(&s),
            Decision::Stay,
            "one costly window (an invalidation) is not a trend"
        );
        s.last_share = Some(0.3);
        assert_eq!(
            decide(&s),
            Decision::RemoveAndDetach(StepReason::CostOverBudget),
            "a window far over the budget is enough"
        );
        s.last_share = Some(0.05);
        s.costly_windows = COSTLY_WINDOWS;
        assert_eq!(
            decide(&s),
            Decision::RemoveAndDetach(StepReason::CostOverBudget)
        );
        s.last_share = Some(0.001);
        assert_eq!(decide(&s), Decision::Stay);
        s.last_share = Some(3.0);
        s.budget = 1.0;
        assert_eq!(decide(&s), Decision::Stay, "--max-overhead 100");
    }

    #[test]
    fn windows_count_costly_shares_in_a_row() {
        let t0 = Instant::now();
        let mut o = Overhead::new(t0);
        // 25 stops held 1 ms each in a 250 ms window: (25 ms + 25 x 60 us) / 250 ms, about 10%.
        for _ in 0..25 {
            o.stop(StopKind::Signal, Duration::from_millis(1));
        }
        o.roll(t0 + Duration::from_millis(15), 0.02);
        assert_eq!(
            o.last_share(),
            None,
            "a window shorter than FAST_WINDOW is not closed"
        );
        o.roll(t0 + MIN_WINDOW, 0.02);
        let share = o.last_share().expect("closed");
        assert!((share - 0.106).abs() < 1e-6, "{share}");
        assert_eq!(o.costly_windows(), 1);
        o.stop(StopKind::GuardFault, Duration::from_micros(10));
        o.roll(t0 + MIN_WINDOW * 2, 0.02);
        assert_eq!(o.costly_windows(), 0, "a cheap window ends the streak");
        assert_eq!(o.stops(), 26);
        assert_eq!(
            o.stop_time(),
            Duration::from_millis(25) + Duration::from_micros(10) + STOP_KERNEL_COST * 26
        );
    }

    #[test]
    fn a_window_severely_over_budget_from_many_stops_closes_early() {
        let t0 = Instant::now();
        let mut o = Overhead::new(t0);
        o.set_stop_cost(Duration::from_micros(70));
        // Three invalidations of 4 ms each and 20 more guard faults in 50 ms: one-time costs, the window stays
        // open.
        for _ in 0..3 {
            o.stop(StopKind::GuardFault, Duration::from_millis(4));
        }
        for _ in 0..20 {
            o.stop(StopKind::GuardFault, Duration::from_micros(100));
        }
        o.roll(t0 + Duration::from_millis(50), 0.02);
        assert_eq!(o.last_share(), None);
        // 400 signal stops of 20 us held + 70 us in the kernel by 60 ms: 36 ms lost, far over 20%.
        for _ in 0..400 {
            o.stop(StopKind::Signal, Duration::from_micros(20));
        }
        o.roll(t0 + Duration::from_millis(60), 0.02);
        let share = o.last_share().expect("closed early");
        assert!(share > 0.02 * SEVERE, "{share}");
        assert_eq!(o.costly_windows(), 1);
        // The same at a budget of the whole run: never early.
        let mut o = Overhead::new(t0);
        for _ in 0..400 {
            o.stop(StopKind::Signal, Duration::from_micros(90));
        }
        o.roll(t0 + Duration::from_millis(60), 1.0);
        assert_eq!(o.last_share(), None);
    }

    #[test]
    fn report_totals_add_up() {
        let mut o = Overhead::new(Instant::now());
        // Held 40 us, plus the kernel's part: 0.1 ms.
        o.stop(
            StopKind::Event,
            Duration::from_micros(100) - STOP_KERNEL_COST,
        );
        let j = o.to_json(
            40,
            Duration::from_millis(2),
            Duration::from_secs(1),
            Vec::new(),
        );
        assert_eq!(j.event_stops, 1);
        assert_eq!(j.stop_ms, 0.1);
        assert_eq!(j.sampling_ms, 1.0);
        assert_eq!(j.lost_ms, 3.1);
        assert!((j.share - 0.0031).abs() < 1e-9);
        let mut text = String::new();
        j.render(&mut text).expect("render");
        assert!(text.contains("3.1 ms lost (0.31% of the run)"), "{text}");
        assert!(text.contains("1 events"), "{text}");
    }

    #[test]
    fn steps_say_what_and_why() {
        assert_eq!(StepJson::new(5, Decision::Stay, None), None);
        let s = StepJson::new(
            7,
            Decision::RemoveAndDetach(StepReason::CostOverBudget),
            Some(0.2),
        )
        .expect("a step");
        assert_eq!(s.action, "removed_and_detached");
        assert!(s.why.contains("--max-overhead"));
        let v = serde_json::to_value(&s).expect("json");
        assert_eq!(v["reason"], "cost_over_budget");
    }
}
