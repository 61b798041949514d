//! A [`Memory`] over code at 0x1000 and nothing else, for the in-crate unit tests of the analyses.

use crate::{Addr, Memory, MemoryError};

/// The bytes of a function at 0x1000; everything else is unreadable and no page is constant.
pub(crate) struct Code(pub Vec<u8>);

impl Memory for Code {
    fn read(&self, addr: Addr, buf: &mut [u8]) -> Result<(), MemoryError> {
        let off = addr.0.wrapping_sub(0x1000) as usize;
        match off
            .checked_add(buf.len())
            .and_then(|end| self.0.get(off..end))
        {
            Some(b) => {
                buf.copy_from_slice(b);
                Ok(())
            }
            None => Err(MemoryError::Unreadable(addr)),
        }
    }
    fn is_constant(&self, _page: Addr) -> bool {
        false
    }
}
