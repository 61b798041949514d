//! dynspec: make unmodified native x86-64 Linux programs faster while they run.
//!
//! This library is the pipeline the `dynspec` binary drives; each stage is a module named after it
//! (ARCHITECTURE.md has the map and the invariants):
//!
//! - [`profile`]: perf samples in, hot regions and per-(instruction, register) value profiles out.
//! - [`store_profile`]: the write watch over the pages hot loads read, and which pages to trust as constant.
//! - [`plan`]: hot regions + profiles + trusted pages in, what to specialize out (pure, unit-tested).
//! - [`install`]: carry a plan out in the target through the code cache; keep its records.
//! - [`abtest`]: measure each installed stub on and off while the program runs; keep only what is not slower.
//! - [`session`]: the event loop that drives the stages over a live process.
//! - [`report`]: the JSON report and its rendering.
//!
//! Invariant: nothing in this crate panics on target data or on bad input; library errors are typed, the binary
//! adds context with `anyhow`.

pub mod abtest;
pub mod bench;
pub mod codemap;
pub mod fold;
pub mod install;
pub mod metric;
pub mod overhead;
pub mod plan;
pub mod profile;
pub mod report;
pub mod session;
pub mod signals;
pub mod store_profile;
