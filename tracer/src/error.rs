//! Typed errors of the tracer; every message names the cause and, where there is one, the fix.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::unistd::Pid;

/// Everything that can go wrong talking to a live process.
#[derive(Debug, thiserror::Error)]
pub enum TracerError {
    /// userfaultfd cannot be had in the target (the caller falls back to mprotect).
    #[error("userfaultfd unavailable: {0}")]
    UffdUnavailable(crate::uffd::UffdUnavailable),
    /// ptrace (seize/attach) refused by the kernel; `fix` names the cause and what to do.
    #[error("ptrace: permission denied attaching to PID {pid}: {fix}")]
    PermissionDenied { pid: Pid, fix: String },
    /// The PID does not exist (or exited meanwhile).
    #[error(
        "no such process: PID {0} does not exist (it may have exited; check with `ps -p {0}`)"
    )]
    NoSuchProcess(Pid),
    /// dynspec itself was named to be attached (any of its threads).
    #[error("cannot attach to dynspec itself (PID {0})")]
    AttachSelf(Pid),
    /// The program to run (or a script's `#!` interpreter) was not found.
    #[error("{}", not_found_message(.0))]
    ProgramNotFound(ProgramFile),
    /// The program (or interpreter) exists but cannot be executed: a directory, another non-regular file, or a
    /// file without execute permission (`.0.kind` says which).
    #[error("{}", not_executable_message(.0))]
    NotExecutable(ProgramFile),
    /// The program (or interpreter) is not an ELF file (a text file, data...).
    #[error("{0}: {NOT_ELF}")]
    NotElf(ProgramFile),
    /// The program (or interpreter) is ELF but not 64-bit x86-64.
    #[error("{path}: {}", arch_message(*elf32, machine))]
    WrongArch {
        path: ProgramFile,
        /// The `e_machine` name (`tracer::program::machine_name`).
        machine: String,
        /// ELFCLASS32.
        elf32: bool,
    },
    /// A script's `#!` line names no interpreter.
    #[error("{0}: its #! line names no interpreter — fix the script's first line")]
    NoInterpreter(ProgramFile),
    /// More levels of `#!` interpreters than the kernel follows.
    #[error(
        "{0}: too many levels of #! interpreters (the kernel follows {max})",
        max = crate::program::MAX_INTERPRETER_DEPTH
    )]
    TooManyInterpreters(ProgramFile),
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
    /// A ptrace permission error for `pid`, with the fix that applies on this machine.
    pub fn permission_denied(pid: Pid) -> TracerError {
        TracerError::PermissionDenied {
            pid,
            fix: ptrace_fix(pid),
        }
    }

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

/// A file a program check looked at ([`crate::program`]): how messages name it, and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProgramFile {
    /// The program as given, or an interpreter as its script's `#!` line names it.
    pub path: PathBuf,
    /// The scripts whose `#!` lines led to `path`, the program first; empty when `path` is the program itself.
    pub via: Vec<PathBuf>,
    /// What the check found at `path`.
    pub kind: FileKind,
}

/// What is at a [`ProgramFile`]'s path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// Nothing.
    Missing,
    Directory,
    /// A regular file.
    Regular,
    /// A device, FIFO or socket.
    Other,
}

impl ProgramFile {
    pub(crate) fn new(path: &Path, kind: FileKind) -> ProgramFile {
        ProgramFile {
            path: path.to_path_buf(),
            via: Vec::new(),
            kind,
        }
    }

    pub(crate) fn with_kind(self, kind: FileKind) -> ProgramFile {
        ProgramFile { kind, ..self }
    }

    /// The interpreter `interp` named by the `#!` line of this file.
    pub(crate) fn interpreter(mut self, interp: &Path) -> ProgramFile {
        self.via
            .push(std::mem::replace(&mut self.path, interp.to_path_buf()));
        self.kind = FileKind::Regular;
        self
    }

    /// Whether this is the program itself (not an interpreter of it).
    pub fn is_program(&self) -> bool {
        self.via.is_empty()
    }
}

/// Compares the path only.
impl PartialEq<PathBuf> for ProgramFile {
    fn eq(&self, other: &PathBuf) -> bool {
        self.path == *other
    }
}

/// `prog's interpreter interp's interpreter ...`, the way a user reads the chain; an empty name shows as `''`.
impl std::fmt::Display for ProgramFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for script in &self.via {
            write!(f, "{}'s interpreter ", script.display())?;
        }
        if self.path.as_os_str().is_empty() {
            f.write_str("''")
        } else {
            write!(f, "{}", self.path.display())
        }
    }
}

fn not_found_message(file: &ProgramFile) -> String {
    if file.is_program() {
        format!("program not found: {file} — check the path or PATH")
    } else {
        format!("{file} does not exist — fix the script's #! line")
    }
}

fn not_executable_message(file: &ProgramFile) -> String {
    match file.kind {
        FileKind::Directory => format!("{file} is a directory, not a program"),
        FileKind::Other => format!("{file} is not executable (not a regular file)"),
        FileKind::Missing | FileKind::Regular if file.is_program() => {
            format!("{file} is not executable (permission denied; chmod +x?)")
        }
        FileKind::Missing | FileKind::Regular => {
            format!("{file} is not executable (permission denied)")
        }
    }
}

/// What [`TracerError::NotElf`] and `program::ElfError::NotElf` say.
pub(crate) const NOT_ELF: &str = "not an ELF executable";

/// What [`TracerError::WrongArch`] and `program::ElfError::WrongArch` say after the file's name.
pub(crate) fn arch_message(elf32: bool, machine: &str) -> String {
    if elf32 {
        format!("is a 32-bit ELF executable ({machine}); dynspec supports x86-64 programs only")
    } else {
        format!(
            "is an ELF executable for a foreign architecture ({machine}); dynspec supports x86-64 \
             programs only"
        )
    }
}

/// Why ptrace was refused for `pid` here (the check that failed), and the fix.
fn ptrace_fix(pid: Pid) -> String {
    let facts = crate::permission::PtraceFacts::gather(pid);
    crate::permission::explain(&crate::permission::diagnose(&facts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_cause_and_fix() {
        let e = TracerError::PermissionDenied {
            pid: Pid::from_raw(123),
            fix: "set kernel.yama.ptrace_scope to 0 (sysctl kernel.yama.ptrace_scope=0) or run with CAP_SYS_PTRACE"
                .into(),
        };
        assert_eq!(
            e.to_string(),
            "ptrace: permission denied attaching to PID 123: set kernel.yama.ptrace_scope to 0 \
             (sysctl kernel.yama.ptrace_scope=0) or run with CAP_SYS_PTRACE"
        );
        // The fix for a live process is one of the known texts (its causes: `permission` tests).
        let me = nix::unistd::getpid();
        let TracerError::PermissionDenied { fix, .. } = TracerError::permission_denied(me) else {
            unreachable!()
        };
        assert!(!fix.is_empty() && !fix.contains('\n'), "{fix}");
        assert!(TracerError::NoSuchProcess(Pid::from_raw(7))
            .to_string()
            .contains("PID 7"));
        let w = TracerError::WrongArch {
            path: ProgramFile::new(Path::new("/bin/x"), FileKind::Regular),
            machine: "AArch64".into(),
            elf32: false,
        };
        assert!(w.to_string().contains("x86-64"));
        assert!(TracerError::RemoteSyscall {
            nr: 9,
            errno: libc::ENOMEM
        }
        .to_string()
        .contains("ENOMEM"));
    }
}
