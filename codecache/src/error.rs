//! Typed errors of the code cache; refusing to install is a normal, explained outcome.

use specializer::{Addr, SpecializeError};
use tracer::TracerError;

/// Everything that can go wrong installing, guarding or removing variants.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Talking to the target failed.
    #[error(transparent)]
    Tracer(#[from] TracerError),
    /// Encoding a variant failed.
    #[error(transparent)]
    Specialize(#[from] SpecializeError),
    /// No free address range within +-2 GB of the module text.
    #[error("no free address range for a code arena within +-2 GB of {0}")]
    NoArenaSpace(Addr),
    /// The arena of this module is full.
    #[error("the code arena near {0} is full ({1} bytes requested)")]
    ArenaFull(Addr, usize),
    /// The trigger address is not in executable memory of the target.
    #[error("{0} is not in an executable mapping of the target")]
    NotCode(Addr),
    /// The instructions at the patch site cannot be displaced safely (invariant 6).
    #[error("cannot patch at {addr}: {reason}")]
    Unpatchable { addr: Addr, reason: String },
    /// A thread is stopped strictly inside the bytes the patch would replace; retry later.
    #[error(
        "thread {tid} is stopped at {rip}, inside the bytes of the patch at {addr}; retry later"
    )]
    ThreadInsidePatch { tid: i32, rip: Addr, addr: Addr },
    /// The request is inconsistent (wrong entry, values without a register, duplicates...).
    #[error("invalid install request: {0}")]
    BadRequest(String),
    /// A trigger address already carries a patch.
    #[error("a dispatch stub is already installed at {0}")]
    AlreadyInstalled(Addr),
    /// A page a variant relies on cannot be write-protected (or was invalidated too often).
    #[error("page {0} cannot be guarded: {1}")]
    Unguardable(Addr, String),
    /// Relocating code (stub or displaced instructions) failed.
    #[error("encoding stub code failed: {0}")]
    Encode(String),
    /// A stopped thread's position inside generated code could not be mapped back to the original code.
    #[error("thread {tid} at {rip} inside generated code has no deoptimization point")]
    NoDeoptPoint { tid: i32, rip: Addr },
    /// A thread of the process is running: it is neither in a ptrace-stop nor parked in `vfork` outside
    /// generated code (see [`crate::Cache`], "Stopped threads"). Nothing was changed; stop the threads and retry.
    #[error("thread {tid} is not stopped (every thread must be stopped, or waiting in vfork outside generated code)")]
    NotStopped { tid: i32 },
    /// A local system call (userfaultfd handling) failed.
    #[error("{op} failed: {errno}")]
    Os { op: String, errno: i32 },
}

impl CacheError {
    pub(crate) fn unpatchable(addr: Addr, reason: impl Into<String>) -> CacheError {
        CacheError::Unpatchable {
            addr,
            reason: reason.into(),
        }
    }
}
