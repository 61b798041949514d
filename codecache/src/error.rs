//! Typed errors of the code cache; refusing to install is a normal, explained outcome. Callers that branch on
//! an outcome match a variant (e.g. [`CacheError::PageChanged`]: specialize again with the threads stopped),
//! never a message.

use iced_x86::{FlowControl, IcedError, Mnemonic};
use specializer::{Addr, Gpr, SpecializeError};
use tracer::TracerError;

/// Everything that can go wrong installing, guarding or removing variants.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Talking to the target failed.
    #[error(transparent)]
    Tracer(#[from] TracerError),
    /// The journal (the guardian's copy of the records) could not be written: the change was not made.
    #[error("cannot write the journal to the guardian: {0}")]
    Journal(std::io::Error),
    /// A journal record is inconsistent (the guardian cannot rebuild the cache from it).
    #[error("inconsistent journal record: {0}")]
    BadJournal(&'static str),
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
    /// The instructions at the patch site cannot be displaced safely (ARCHITECTURE.md invariant 6).
    #[error("cannot patch at {addr}: {reason}")]
    Unpatchable {
        addr: Addr,
        reason: UnpatchableReason,
    },
    /// A thread is stopped strictly inside the bytes the patch would replace; retry later.
    #[error(
        "thread {tid} is stopped at {rip}, inside the bytes of the patch at {addr}; retry later"
    )]
    ThreadInsidePatch { tid: i32, rip: Addr, addr: Addr },
    /// The request is inconsistent (wrong entry, values without a register, duplicates...).
    #[error("invalid install request: {0}")]
    BadRequest(BadRequestReason),
    /// A trigger address already carries a patch.
    #[error("a dispatch stub is already installed at {0}")]
    AlreadyInstalled(Addr),
    /// A page a variant relies on cannot be write-protected (or was invalidated too often).
    #[error("page {0} cannot be guarded: {1}")]
    Unguardable(Addr, UnguardableReason),
    /// A page the variants were specialized from changed between reading and guarding it (it is being
    /// written right now): worth specializing again with the threads stopped. Nothing was installed.
    #[error("page {page} cannot be guarded: changed since it was specialized on")]
    PageChanged { page: Addr },
    /// Relocating code (stub or displaced instructions) failed.
    #[error("encoding stub code failed: {0}")]
    Encode(#[source] IcedError),
    /// The encoded stub lost its entry instruction (the block encoder rewrote it).
    #[error("encoding stub code failed: stub entry has no offset")]
    StubEntryLost,
    /// A stopped thread's position inside generated code could not be mapped back to the original code.
    #[error("thread {tid} at {rip} inside generated code has no deoptimization point")]
    NoDeoptPoint { tid: i32, rip: Addr },
    /// A thread of the process is running: it is neither in a ptrace-stop nor parked in `vfork` outside
    /// generated code (see [`crate::Cache`], "Stopped threads"). Nothing was changed; stop the threads and retry.
    #[error("thread {tid} is not stopped (every thread must be stopped, or waiting in vfork outside generated code)")]
    NotStopped { tid: i32 },
    /// A local system call (userfaultfd handling) failed.
    #[error("{op} failed: {errno}")]
    Os { op: &'static str, errno: i32 },
}

/// Why the instructions at a patch site cannot be replaced by a `jmp` ([`CacheError::Unpatchable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UnpatchableReason {
    #[error("site outside the given region")]
    OutsideRegion,
    #[error("region ends inside the patch")]
    RegionEndsInsidePatch,
    #[error("undecodable instruction")]
    Undecodable,
    /// A system call, interrupt or trap instruction.
    #[error("{0:?} in the displaced bytes")]
    TrapInDisplaced(Mnemonic),
    /// A call, or a jump/return before the patch length is reached.
    #[error("{0:?} instruction in the displaced bytes")]
    FlowInDisplaced(FlowControl),
    /// The direct branch at this address targets the displaced bytes after the site.
    #[error("the branch at {0} targets the displaced bytes")]
    BranchIntoDisplaced(Addr),
    /// The jump table at this address has an entry in the displaced bytes after the site.
    #[error("a jump table at {0} targets the displaced bytes")]
    JumpTableIntoDisplaced(Addr),
    #[error("an installed variant exits into the displaced bytes")]
    LiveVariantExitsInto,
    /// A new variant exits to this address, inside the displaced bytes of a patch.
    #[error("a variant exits to {0} inside patched bytes")]
    VariantExitsIntoPatch(Addr),
    #[error("stub out of rel32 reach")]
    StubOutOfReach,
}

/// What is inconsistent in an install request or a stub ([`CacheError::BadRequest`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BadRequestReason {
    #[error("no variants")]
    NoVariants,
    #[error("variant entry {entry} is not the trigger {trigger}")]
    EntryNotTrigger { entry: Addr, trigger: Addr },
    #[error("values must be given exactly when a trigger register is")]
    ValuesWithoutRegister,
    #[error("duplicate trigger value")]
    DuplicateValue,
    /// rsp, the trigger register, or given twice.
    #[error("bad assumed register {0:?} (rsp, the trigger register, or given twice)")]
    BadAssumed(Gpr),
    #[error("the region must contain the trigger")]
    RegionWithoutTrigger,
    /// A residual call of a variant does not map to a call of the original code.
    #[error(
        "the call at variant offset {offset:#x} does not map to an original call ({original})"
    )]
    CallNotMapped { offset: usize, original: Addr },
    #[error("rsp cannot be a trigger register")]
    RspTrigger,
    #[error("rsp cannot be an assumed register")]
    RspAssumed,
    #[error("{0:?} is assumed twice or is also the trigger register")]
    AssumedTwice(Gpr),
    #[error("without a trigger register there must be exactly one variant, with no value")]
    UnconditionalNotSingle,
    #[error("with a trigger register every variant needs a value")]
    ValueMissing,
}

/// Why a page cannot be guarded ([`CacheError::Unguardable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UnguardableReason {
    /// It reached [`crate::MAX_INVALIDATIONS_PER_PAGE`].
    #[error("invalidated too often")]
    InvalidatedTooOften,
    #[error("not mapped")]
    NotMapped,
    /// `[vvar]` and other read-only pseudo mappings the kernel changes.
    #[error("kernel-managed mapping")]
    KernelManaged,
    #[error("shared mapping (other processes may write it)")]
    SharedMapping,
    /// The remote mprotect failed with this errno.
    #[error("mprotect failed (errno {0})")]
    MprotectFailed(i32),
}

impl CacheError {
    pub(crate) fn unpatchable(addr: Addr, reason: UnpatchableReason) -> CacheError {
        CacheError::Unpatchable { addr, reason }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_as_before_the_typed_reasons() {
        let cases: [(CacheError, &str); 5] = [
            (
                CacheError::PageChanged { page: Addr(0x5000) },
                "page 0x5000 cannot be guarded: changed since it was specialized on",
            ),
            (
                CacheError::Unguardable(Addr(0x6000), UnguardableReason::MprotectFailed(13)),
                "page 0x6000 cannot be guarded: mprotect failed (errno 13)",
            ),
            (
                CacheError::unpatchable(
                    Addr(0x40_1000),
                    UnpatchableReason::BranchIntoDisplaced(Addr(0x40_1020)),
                ),
                "cannot patch at 0x401000: the branch at 0x401020 targets the displaced bytes",
            ),
            (
                CacheError::unpatchable(
                    Addr(0x40_1000),
                    UnpatchableReason::TrapInDisplaced(Mnemonic::Syscall),
                ),
                "cannot patch at 0x401000: Syscall in the displaced bytes",
            ),
            (
                CacheError::BadRequest(BadRequestReason::CallNotMapped {
                    offset: 0x1c,
                    original: Addr(0x40_1234),
                }),
                "invalid install request: the call at variant offset 0x1c does not map to an original call (0x401234)",
            ),
        ];
        for (e, text) in cases {
            assert_eq!(e.to_string(), text);
        }
    }
}
