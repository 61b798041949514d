//! Typed addresses in the target's address space: the workspace's one newtype, re-exported.

pub use addr::{Addr, PAGE_SIZE};
