//! Why the planner decided what it did, in words a user understands: one [`Reason`] per region or candidate
//! left alone, and the notes a planning round keeps for the report's `plan` section.

use std::fmt;

use specializer::{Addr, Gpr, Stats};

/// Why a hot region or a trigger candidate was not specialized.
#[derive(Clone, Debug, PartialEq)]
pub enum Reason {
    /// The region has too small a share of the samples to pay for a dispatch stub.
    Cold { share: f64 },
    /// No register read in the region had a value predictable enough to be a trigger.
    NoPredictableValue,
    /// Variants of the region are installed and alive.
    Live,
    /// The region was invalidated this many times: the program keeps changing what it relies on.
    Exhausted { installs: u32 },
    /// Its variants were measured slower than the original code while the program ran, and removed.
    MeasuredSlower,
    /// The region is dynspec's own code.
    OwnCode,
    /// Too few of the candidate's values were seen often enough to be hot.
    RareValues { hot: usize, distinct: u64 },
    /// The hot values cover too little of the candidate's samples (the stub would fall back most of the time).
    LowCoverage { covered: f64 },
    /// The candidate's address is outside its region.
    OutsideRegion,
    /// The planning round's time budget ran out before the candidate was scored.
    OutOfTime,
    /// Only the best candidates of a region are scored.
    NotScored { better: usize },
    /// Specializing the candidate's hot values folded too little to pay for a stub.
    FoldedTooLittle { folded: usize, visited: usize },
    /// The variant does not loop within itself, so every pass through the trigger enters and leaves it, and it
    /// folds too little per pass to pay for that ([`super::MIN_FOLDED_STRAIGHT`]).
    StraightLine { folded: usize },
    /// The variants fold no memory read: they only re-derive what the registers already say.
    NoFoldedLoad,
    /// The variants fold no memory read because the memory the region reads is not trusted as constant: of its
    /// `pages` pages, `written` were written during the write watch (the rest were not watched, or are
    /// written by the hot code itself).
    UntrustedMemory { pages: usize, written: usize },
    /// The specializer refused every hot value.
    SpecializeFailed(String),
    /// Another candidate of the region promises more.
    LowerBenefit { estimate: f64, best: f64 },
    /// Tied (within sampling noise) with the chosen candidate, which comes first in the code.
    NearTie { estimate: f64, chosen: f64 },
    /// Installing failed (the program's code is unchanged).
    InstallFailed(String),
    /// Better candidates were tried first and the round stopped trying.
    NotTried,
    /// A trigger of the region was measured slower already, and this one's variants would also be entered and
    /// left at every pass ([`super::worth_trying_after_losses`]).
    ExitsEveryPassAfterALoss,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Cold { share } => write!(
                f,
                "only {:.1}% of the samples: not worth a dispatch stub (needs {:.0}%)",
                share * 100.0,
                super::MIN_SPECIALIZE_SHARE * 100.0
            ),
            Reason::NoPredictableValue => {
                f.write_str("no register read there had a few values that cover most samples")
            }
            Reason::Live => f.write_str("its variants are installed"),
            Reason::Exhausted { installs } => write!(
                f,
                "invalidated after {installs} installs: the program keeps changing what it relies on"
            ),
            Reason::OwnCode => f.write_str("it is dynspec's own code"),
            Reason::MeasuredSlower => f.write_str(
                "its variants were measured slower than the original code, and removed",
            ),
            Reason::RareValues { hot, distinct } => write!(
                f,
                "only {hot} of {distinct} values seen {} times",
                super::MIN_VALUE_SAMPLES
            ),
            Reason::LowCoverage { covered } => write!(
                f,
                "its hot values cover only {:.0}% of its samples (needs {:.0}%)",
                covered * 100.0,
                super::MIN_COVERAGE * 100.0
            ),
            Reason::OutsideRegion => f.write_str("it lies outside the region"),
            Reason::OutOfTime => f.write_str("the planning round ran out of time before scoring it"),
            Reason::NotScored { better } => {
                write!(f, "not scored: {better} candidates ranked higher")
            }
            Reason::FoldedTooLittle { folded, visited } => write!(
                f,
                "folded {folded} of {visited} instructions: not worth a dispatch stub"
            ),
            Reason::StraightLine { folded } => write!(
                f,
                "runs once per entry (no loop of its own) and folds only {folded} instructions: every pass would \
                 pay for the dispatch stub and an exit (needs {})",
                super::MIN_FOLDED_STRAIGHT
            ),
            Reason::NoFoldedLoad => f.write_str(
                "folds no memory read (the memory it reads is not trusted as constant, or it reads none)",
            ),
            Reason::UntrustedMemory { pages, written } => write!(
                f,
                "folds no memory read: none of the {pages} page{} its loads read is trusted as constant ({written} \
                 written during the write watch)",
                if *pages == 1 { "" } else { "s" }
            ),
            Reason::SpecializeFailed(e) => write!(f, "cannot specialize: {e}"),
            Reason::LowerBenefit { estimate, best } => write!(
                f,
                "estimated benefit {estimate:.0} below the best candidate's {best:.0}"
            ),
            Reason::NearTie { estimate, chosen } => write!(
                f,
                "estimated benefit {estimate:.0} ties with the chosen candidate's {chosen:.0} (within sampling \
                 noise), which comes first in the code"
            ),
            Reason::InstallFailed(e) => write!(f, "install failed: {e}"),
            Reason::NotTried => f.write_str("better candidates were tried first"),
            Reason::ExitsEveryPassAfterALoss => f.write_str(
                "a trigger of this region was measured slower, and this one's variants would also be entered and \
                 left at every pass: only one that loops inside itself is tried after a loss",
            ),
        }
    }
}

/// What the planner saw and decided for one trigger candidate.
#[derive(Clone, Debug, PartialEq)]
pub struct CandidateNote {
    pub address: Addr,
    pub register: Gpr,
    /// Samples of the register there, and its distinct values.
    pub samples: u64,
    pub distinct: u64,
    /// (value, samples) the planner considered (hot values), hottest first.
    pub values: Vec<(u64, u64)>,
    /// What specializing them folded, summed over the values specialized (None: not specialized).
    pub folded: Option<Stats>,
    /// Estimated benefit (folded instructions x samples), when scored.
    pub estimate: Option<f64>,
    /// None: installed.
    pub reason: Option<Reason>,
}

/// What the planner saw and decided for one hot region.
#[derive(Clone, Debug, PartialEq)]
pub struct RegionNote {
    pub start: Addr,
    pub end: Addr,
    pub symbol: Option<String>,
    pub share: f64,
    pub candidates: Vec<CandidateNote>,
    /// None: variants were installed.
    pub reason: Option<Reason>,
}

/// Add `b`'s counts to `a`.
pub fn add_stats(a: &mut Stats, b: &Stats) {
    a.visited += b.visited;
    a.folded += b.folded;
    a.folded_loads += b.folded_loads;
    a.folded_branches += b.folded_branches;
    a.residual += b.residual;
    a.code_bytes += b.code_bytes;
}

/// Say *why* a region folds no memory read where the pages tell: none of the pages its loads read (`pages`) is
/// trusted as constant (`constant`), and `written` are those the write watch saw written.
pub fn explain_untrusted(
    note: &mut RegionNote,
    pages: &[Addr],
    constant: &std::collections::BTreeSet<Addr>,
    written: &std::collections::BTreeSet<Addr>,
) {
    if pages.is_empty() || pages.iter().any(|p| constant.contains(p)) {
        return;
    }
    let why = Reason::UntrustedMemory {
        pages: pages.len(),
        written: pages.iter().filter(|p| written.contains(p)).count(),
    };
    for r in
        std::iter::once(&mut note.reason).chain(note.candidates.iter_mut().map(|c| &mut c.reason))
    {
        if *r == Some(Reason::NoFoldedLoad) {
            *r = Some(why.clone());
        }
    }
}
