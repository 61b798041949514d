//! codecache: the target-side half of a specialization — code memory near each module, dispatch stubs, the
//! 5-byte entry patch, guards, invalidation and deoptimization (DESIGN.md, "Code cache").
//!
//! Invariants (asserted, on in release builds): code-cache pages are never writable and executable at once
//! (they are written only by [`arena::publish`] through /proc/PID/mem); a patch site is written only while
//! every thread is stopped and no thread's RIP lies strictly inside the replaced bytes. A thread waiting in
//! `vfork` (which `Tracer::stop_all` leaves running) counts as stopped (see [`Cache`], "Stopped threads"); any
//! other running thread makes an operation fail with [`CacheError::NotStopped`], never panic.
//!
//! What the session calls, and when:
//! - after spawn/attach (threads stopped): [`Cache::new`] (finish any `tracer::WriteWatch` of the process first:
//!   a mapping can be registered with one userfaultfd only);
//! - to specialize: `let mut mem = TargetMemory::new(&tr, pid, Some(&cache))?; mem.allow(constant_pages);`
//!   then `specializer::specialize(&req, &mem)` per hot value (code under patches reads as the original), and
//!   `mem.snapshots()` into the request;
//! - install (threads stopped): [`Cache::install`] with an [`InstallRequest`]; then `resume_all`;
//! - while guards exist, stop threads with [`Cache::stop_all`] instead of `Tracer::stop_all` (a thread blocked
//!   in a kernel write to a guarded page cannot stop until its page is let go);
//! - in the event loop (e.g. every `next_event` timeout of 20 ms): if [`Cache::has_guard_faults`], call
//!   [`Cache::handle_guard_faults`] (it stops everything and invalidates), then `resume_all`; on a SIGSEGV
//!   `Event::Signal`, call [`Cache::handle_segv`]: `Some` = a write to an mprotect guard, handled and the
//!   signal suppressed (`resume_all` re-runs the write); `None` = the program's own signal, deliver it;
//! - pages with [`Cache::never_guard`] are not worth specializing on again (TargetMemory already refuses them);
//! - `Event::Forked`: [`Cache::strip_child`] on the child before it runs (vfork children share the memory and
//!   are left alone); `Event::Exec` / `Event::Exited` of the process: [`Cache::forget`], then drop the cache;
//! - on detach: [`Cache::stop_all`], [`Cache::uninstall_all`], drop the cache, then detach;
//! - for the report: [`Cache::variants`], [`Cache::counters`], and each [`Invalidation`].

pub mod arena;
mod cache;
mod error;
pub mod guard;
mod memory;
mod parked;
pub mod stub;

pub use cache::{
    Cache, Counters, InstallId, InstallRequest, Invalidation, VariantId, VariantInfo,
    MAX_INVALIDATIONS_PER_PAGE,
};
pub use error::{BadRequestReason, CacheError, UnguardableReason, UnpatchableReason};
pub use guard::{GuardKind, GuardSet};
pub use memory::TargetMemory;
