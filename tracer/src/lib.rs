//! tracer: everything about a live process — ptrace control of every thread
//! (spawn, attach, clone/fork/exec), memory and registers, remote system
//! calls, the module map and symbols, perf_event sampling and write watching.
//! It knows nothing of specialization.
//!
//! Invariants:
//! - Every ptrace request is made from the thread that attached (the tracer
//!   thread); other threads talk to it over channels.
//! - A spawned target never outlives dynspec (`PTRACE_O_EXITKILL`); an
//!   attached one is detached, unchanged, when its [`Tracer`] is dropped.
//! - Errors are typed ([`TracerError`]); nothing here panics on target data.

pub mod addr;
pub mod error;
pub mod maps;
pub mod process;
pub mod remote;
pub mod sampler;
pub mod symbols;
pub mod watch;

pub use addr::RemoteAddr;
pub use error::TracerError;
pub use maps::{mapping_at, read_maps, Mapping};
pub use nix::unistd::Pid;
pub use process::{Event, ExitStatus, SpawnOptions, Tracer};
pub use remote::{remote_close, remote_mmap, remote_mprotect, remote_munmap, remote_userfaultfd};
pub use symbols::{modules, symbolize, Module, Symbol};
pub use watch::{WatchOptions, WatchResult, WatchSummary, WriteWatch};
