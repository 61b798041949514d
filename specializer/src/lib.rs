//! specializer: machine code in, faster machine code out.
//!
//! Given a region of x86-64 code read through [`Memory`], an entry address and
//! what is known at entry (registers, flags), it decodes, abstractly
//! interprets, folds what is known (including loads from pages the caller
//! declares constant) and emits a [`Variant`]: residual code, its exits, a
//! deopt map for every instruction boundary and the pages it relied on.
//!
//! Invariants:
//! - **No system calls.** The target is read only through [`Memory`]; every
//!   test runs in-process. This crate depends on iced-x86 (and thiserror) only.
//! - **Never wrong.** An instruction whose effect is not modelled exactly is
//!   emitted as is and everything it writes becomes unknown. The only
//!   assumptions of a variant are the entry state and the contents of
//!   [`Variant::guard_pages`].
//! - Failing to specialize is a typed [`SpecializeError`], never a panic on
//!   target data.
//! - With [`Options::forward_stores`] (off by default) a reload of a qword
//!   the variant just stored or loaded through the same base register reads
//!   the register holding it, within one loop iteration of the variant; this
//!   assumes no concurrent writer to that memory in between.
//!
//! How (see `engine/`): a worklist over (original address, abstract
//! state). The state holds each GPR as unknown or known (and whether the
//! real register holds it), the status flags likewise (folded flags are
//! rebuilt with `cmp byte [data], imm8` plus `stc`/`clc` when needed), and
//! store-forwarding facts. Known branches fold, jump tables in constant
//! memory become direct, a pair already emitted is reused by a jump to its
//! label (an interpreter loop becomes straight-line code per bytecode,
//! linked into loops). Widening forgets values that vary without bound;
//! values from constant memory (an interpreter's pc, its operands) are kept
//! up to a hard bound. Residual instructions get known operands as
//! immediates/displacements and are re-encoded with iced's `BlockEncoder`.

pub mod analysis;
pub mod constants;
mod engine;
pub mod insn_info;
#[cfg(test)]
mod native_tests;
mod sem;
pub mod snippet;
#[cfg(test)]
mod test_memory;
mod types;
mod variant;

pub use engine::{modelled_mnemonics, specialize};
pub use types::*;
pub use variant::{Encoded, LineKind, ListingLine, OriginalLine, Variant};
