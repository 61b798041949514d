//! addr: the one address type of dynspec.
//!
//! An [`Addr`] is an address in the *target* process (the program dynspec traces), never a local pointer
//! (rr's `remote_ptr`). Every crate (tracer, specializer, codecache, the binary) uses this one newtype, so an
//! address read from a sample, a mapping or a decoded instruction flows through the pipeline without
//! conversions.
//!
//! Invariant: arithmetic on an `Addr` wraps (the target's address space is 64-bit and a computed address is
//! data from the target, which must never make dynspec panic).

use std::fmt;

/// An address in the traced process (never a local pointer).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Addr(pub u64);

/// Page size of the target; guards, watches and constant-memory decisions are per page.
pub const PAGE_SIZE: u64 = 4096;

impl Addr {
    /// The start of the page holding this address.
    pub fn page(self) -> Addr {
        Addr(self.0 & !(PAGE_SIZE - 1))
    }

    /// This address plus `delta` (wrapping).
    pub fn offset(self, delta: u64) -> Addr {
        Addr(self.0.wrapping_add(delta))
    }
}

impl fmt::Debug for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_and_offset() {
        assert_eq!(Addr(0x1fff).page(), Addr(0x1000));
        assert_eq!(Addr(0x1000).page(), Addr(0x1000));
        assert_eq!(Addr(u64::MAX).offset(2), Addr(1));
        assert_eq!(format!("{}", Addr(0xab)), "0xab");
    }
}
