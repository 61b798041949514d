//! tracer: everything about a live process — ptrace control of every thread
//! (spawn, attach, clone/fork/exec), memory and registers, remote system
//! calls, the module map and symbols, perf_event sampling and write watching.
//! It knows nothing of specialization.
//!
//! Invariants:
//! - Every ptrace request is made from the thread that attached (the tracer
//!   thread); other threads talk to it over channels.
//! - A spawned target never outlives dynspec (`PTRACE_O_EXITKILL`); an
//!   attached one is detached, unchanged, when its [`Tracer`] is dropped,
//!   and outlives dynspec if dynspec dies (no `PTRACE_O_EXITKILL` on attach).
//! - Errors are typed ([`TracerError`]); nothing here panics on target data.
//!
//! Known limits (documented where they apply):
//! - [`Tracer`] waits with `__WALL | __WNOTHREAD`: it sees its own tracees and the children of its own thread,
//!   so the thread driving it must not have other children it waits for with `waitpid(-1)`.
//! - A timed [`Tracer::next_event`] arms a POSIX timer that sends `SIGRTMAX-1` to the tracer thread (a no-op
//!   handler is installed process-wide once) to interrupt a blocking `waitpid`.
//! - A signal that arrives while a system call is being injected is re-raised with `tgkill` afterwards (its
//!   siginfo becomes SI_TKILL). A thread waiting in `vfork` cannot run injected system calls
//!   ([`Tracer::in_vfork`]); it is also not stopped by `stop_all` (it cannot run user code meanwhile).
//! - [`WriteWatch`]: see its module for which memory is watched how; the mprotect fallback cannot see kernel
//!   writes (they fail with EFAULT), and no mechanism sees writes made by other processes to shared memory.

pub mod addr;
pub mod calibrate;
pub mod cpuclock;
pub mod error;
pub mod maps;
mod perf;
pub mod permission;
pub mod process;
pub mod program;
pub mod remote;
pub mod sampler;
pub mod symbols;
pub mod uffd;
pub mod watch;
pub mod world;

pub use addr::Addr;
pub use cpuclock::CpuClock;
pub use error::{FileKind, ProgramFile, TracerError};
pub use maps::{mapping_at, read_maps, same_address_space, Mapping};
pub use nix::unistd::Pid;
pub use process::{Event, ExitStatus, SpawnOptions, Tracer};
pub use remote::{remote_close, remote_mmap, remote_mprotect, remote_munmap, remote_userfaultfd};
pub use symbols::{modules, symbolize, Module, Symbol};
pub use watch::{WatchOptions, WatchResult, WatchSummary, WriteWatch};
pub use world::Stopped;
