//! Typed addresses in the target's address space.

use std::fmt;

/// An address in the traced process (never a local pointer).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct RemoteAddr(pub u64);

/// Page size of the target.
pub const PAGE_SIZE: u64 = 4096;

impl RemoteAddr {
    pub fn page(self) -> RemoteAddr {
        RemoteAddr(self.0 & !(PAGE_SIZE - 1))
    }
    pub fn offset(self, delta: u64) -> RemoteAddr {
        RemoteAddr(self.0.wrapping_add(delta))
    }
}

impl fmt::Debug for RemoteAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for RemoteAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}
