//! codecache: the target-side half of a specialization — code memory near each module, dispatch stubs, the
//! 5-byte entry patch, guards, invalidation and deoptimization (ARCHITECTURE.md).
//!
//! Invariants (asserted, on in release builds): code-cache pages are never writable and executable at once
//! (they are written only by [`arena::publish`] through /proc/PID/mem); a patch site is written only while
//! every thread is stopped and no thread's RIP lies strictly inside the replaced bytes. Install, invalidate and
//! uninstall take a [`tracer::Stopped`] (from [`Cache::stop_all`]): the type says the world is stopped, and
//! dropping it resumes the threads, so no early return forgets to. A thread waiting in
//! `vfork` (which `Tracer::stop_all` leaves running) counts as stopped (see [`Cache`], "Stopped threads"); any
//! other running thread makes an operation fail with [`CacheError::NotStopped`], never panic.
//!
//! What the session calls, and when:
//! - after spawn/attach (threads stopped): [`Cache::new`] (finish any `tracer::WriteWatch` of the process first:
//!   a mapping can be registered with one userfaultfd only);
//! - to specialize: `let mut mem = TargetMemory::new(&tr, pid, Some(&cache))?; mem.allow(constant_pages);`
//!   then `specializer::specialize(&req, &mem)` per hot value (code under patches reads as the original), and
//!   `mem.snapshots()` into the request;
//! - install: `let mut world = cache.stop_all(&mut tr)?;` then [`Cache::install`] with an [`InstallRequest`];
//!   dropping the world resumes the threads;
//! - while guards exist, stop threads with [`Cache::stop_all`] instead of `Tracer::stop_world` (a thread blocked
//!   in a kernel write to a guarded page cannot stop until its page is let go);
//! - in the event loop (e.g. every `next_event` timeout of 20 ms): if [`Cache::has_guard_faults`], stop the
//!   world and call [`Cache::handle_guard_faults`] (it invalidates each written page); on a SIGSEGV
//!   `Event::Signal`, call [`Cache::handle_segv`]: `Some` = a write to an mprotect guard, handled, the signal
//!   suppressed and the threads resumed (the write re-runs); `None` = the program's own signal, deliver it;
//! - pages with [`Cache::never_guard`] are not worth specializing on again (TargetMemory already refuses them);
//! - `Event::Forked`: [`Cache::strip_child`] on the child before it runs (vfork children share the memory and
//!   are left alone); `Event::Exec` / `Event::Exited` of the process: [`Cache::forget`], then drop the cache;
//! - on detach: [`Cache::stop_all`], [`Cache::uninstall_all`] (it also unmaps the arenas no thread can reach),
//!   drop the cache, then detach;
//! - for the report: [`Cache::variants`], [`Cache::counters`], and each [`Invalidation`];
//! - attach mode: [`Cache::set_journal`] right after [`Cache::new`], with the guards' userfaultfd
//!   ([`Cache::uffd`]) handed to the guardian first; a guardian rebuilds the cache with [`Cache::restore`].

pub mod arena;
mod cache;
mod error;
pub mod guard;
mod memory;
mod parked;
pub mod stub;

pub use cache::{
    ArenaState, Cache, CacheState, Counters, DeoptState, InstallId, InstallRequest, InstallState,
    Invalidation, Journal, Kept, Released, RollbackState, StubState, VariantId, VariantInfo,
    VariantState, MAX_INVALIDATIONS_PER_PAGE,
};
pub use error::{BadRequestReason, CacheError, UnguardableReason, UnpatchableReason};
pub use guard::{GuardKind, GuardSet};
pub use memory::TargetMemory;
