//! codecache: the target-side half of a specialization — code memory near each
//! module, dispatch stubs, the 5-byte entry patch, guards, invalidation and
//! deoptimization (DESIGN.md, "Code cache").
//!
//! Invariants (asserted, on in release builds): code-cache pages are never
//! writable and executable at once; a patch site is written only while every
//! thread is stopped and no thread's RIP lies inside the replaced bytes.
//!
//! This crate is filled in by the code-cache issue; it is empty until then so
//! the workspace layout and dependency arrows are fixed from the start.
