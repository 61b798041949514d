//! Typed errors of the tracer; every message names the cause and, where there is one, the fix.

use std::path::PathBuf;

use nix::errno::Errno;
use nix::unistd::Pid;

/// Everything that can go wrong talking to a live process.
#[derive(Debug, thiserror::Error)]
pub enum TracerError {
    /// ptrace (seize/attach) refused by the kernel.
    #[error(
        "ptrace: permission denied attaching to PID {pid}: set kernel.yama.ptrace_scope to 0 \
         (sysctl kernel.yama.ptrace_scope=0) or run with CAP_SYS_PTRACE (e.g. as root); a process \
         that is already traced (by gdb or strace) must be released first"
    )]
    PermissionDenied { pid: Pid },
    /// The PID does not exist (or exited meanwhile).
    #[error(
        "no such process: PID {0} does not exist (it may have exited; check with `ps -p {0}`)"
    )]
    NoSuchProcess(Pid),
    /// The program to run was not found.
    #[error(
        "program not found: {0} (give a path to an existing file, or a command name found in PATH)"
    )]
    ProgramNotFound(PathBuf),
    /// The program exists but cannot be executed.
    #[error("{0} is not executable (it is a directory or lacks execute permission: chmod +x it)")]
    NotExecutable(PathBuf),
    /// The program is not an ELF file (a script, a text file...).
    #[error(
        "{0} is not an ELF executable (scripts are not supported: run the interpreter binary instead, \
         e.g. `python3 script.py`)"
    )]
    NotElf(PathBuf),
    /// The program is ELF but not x86-64.
    #[error("{path} is a {machine} binary; only 64-bit x86-64 ELF programs are supported")]
    WrongArch { path: PathBuf, machine: String },
    /// An empty command line was given.
    #[error("no program given: the command line is empty")]
    EmptyCommand,
    /// The spawned program could not be started.
    #[error("could not start {path}: {reason}")]
    SpawnFailed { path: PathBuf, reason: String },
    /// An I/O error (files in /proc, the program file...).
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A system call made by the tracer failed.
    #[error("{op} failed: {errno}")]
    Errno { op: String, errno: Errno },
    /// A system call executed inside the target returned an error.
    #[error("remote system call {nr} inside the target failed: {}", Errno::from_raw(*.errno))]
    RemoteSyscall { nr: i64, errno: i32 },
    /// A memory access hit an unmapped or too-short range.
    #[error(
        "memory access at {addr:#x} in PID {pid}: only {done} of {len} bytes could be transferred"
    )]
    ShortAccess {
        pid: Pid,
        addr: u64,
        len: usize,
        done: usize,
    },
    /// The traced process (or thread) no longer exists.
    #[error("the traced process {0} is gone (it exited or was killed)")]
    ProcessGone(Pid),
    /// The thread is not one of the traced threads.
    #[error("thread {0} is not traced by this session")]
    UnknownThread(Pid),
    /// The operation needs the thread stopped, but it is running.
    #[error("thread {0} is running; stop it first (internal ordering error)")]
    NotStopped(Pid),
    /// No `syscall` instruction could be found in the target's executable memory.
    #[error("no `syscall` instruction found in the executable memory of PID {0}; cannot inject system calls")]
    NoSyscallGadget(Pid),
    /// A thread stopped in an unexpected way during an injected system call.
    #[error("thread {tid} stopped unexpectedly during an injected system call (wait status {status:#x})")]
    UnexpectedStop { tid: Pid, status: i32 },
    /// The tracer is used from a thread other than the one that created it.
    #[error("ptrace requests must come from the thread that attached the target (tracer used from another thread)")]
    WrongThread,
    /// The operation is not supported in the current state.
    #[error("{0}")]
    Unsupported(String),
}

impl TracerError {
    /// Wrap an `io::Error` with what was being done.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> TracerError {
        TracerError::Io {
            context: context.into(),
            source,
        }
    }

    /// Wrap a failed local system call.
    pub fn errno(op: impl Into<String>, errno: Errno) -> TracerError {
        TracerError::Errno {
            op: op.into(),
            errno,
        }
    }
}
