//! codecache: the target-side half of a specialization — code memory near each module, dispatch stubs, the
//! 5-byte entry patch, guards, invalidation and deoptimization (DESIGN.md, "Code cache").
//!
//! Invariants (asserted, on in release builds): code-cache pages are never writable and executable at once
//! (they are written only by [`arena::publish`] through /proc/PID/mem); a patch site is written only while
//! every thread is stopped and no thread's RIP lies strictly inside the replaced bytes.
//!
//! What the session calls, and when:
//! - after spawn/attach (threads stopped): [`Cache::new`] (finish any `tracer::WriteWatch` of the process first);
//! - after profile + plan + specialize (threads stopped since the [`TargetMemory`] reads, or pass its
//!   snapshots): [`Cache::install`]; then `resume_all`;
//! - while guards exist, stop threads with [`Cache::stop_all`] instead of `Tracer::stop_all`;
//! - in the event loop: if [`Cache::has_guard_faults`], call [`Cache::handle_guard_faults`] then `resume_all`;
//!   on a SIGSEGV `Event::Signal`, call [`Cache::handle_segv`]: `Some` means ours (already handled; resume
//!   without the signal), `None` means deliver it;
//! - `Event::Forked`: [`Cache::strip_child`] on the child before it runs (or keep it watched with a cache of
//!   its own); `Event::Exec` / `Event::Exited` of the process: [`Cache::forget`] and drop;
//! - on detach: [`Cache::stop_all`], [`Cache::uninstall_all`], then detach;
//! - for the report: [`Cache::variants`], [`Cache::counters`].

pub mod arena;
mod cache;
mod error;
pub mod guard;
mod memory;
pub mod stub;

pub use cache::{
    Cache, Counters, InstallId, InstallRequest, Invalidation, VariantId, VariantInfo,
    MAX_INVALIDATIONS_PER_PAGE,
};
pub use error::CacheError;
pub use guard::{GuardKind, GuardSet};
pub use memory::TargetMemory;
