//! Typed errors of the tracer; every message names the cause and, where there is one, the fix.

use std::path::PathBuf;

use nix::errno::Errno;
use nix::unistd::Pid;

/// Everything that can go wrong talking to a live process.
#[derive(Debug, thiserror::Error)]
pub enum TracerError {
    /// ptrace (seize/attach) refused by the kernel; `fix` names the cause and what to do.
    #[error("ptrace: permission denied attaching to PID {pid}: {fix}")]
    PermissionDenied { pid: Pid, fix: String },
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
    /// The program is not an ELF file (a text file, data...), nor a script whose `#!` interpreter is one.
    #[error("{0} is not an ELF executable (nor a script with a `#!` interpreter line)")]
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

/// Why ptrace may be refused for `pid` here, and the fix.
fn ptrace_fix(pid: Pid) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let tracer = status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse::<i32>().ok())
        .unwrap_or(0);
    if tracer != 0 {
        return format!(
            "it is already traced by PID {tracer} (a debugger or strace); detach that first"
        );
    }
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    match scope {
        Some(2) => "kernel.yama.ptrace_scope is 2 (admin only): run with CAP_SYS_PTRACE (e.g. as root), or set \
                    it to 0 (sysctl kernel.yama.ptrace_scope=0)"
            .into(),
        Some(3) => "kernel.yama.ptrace_scope is 3: ptrace is disabled on this machine until reboot".into(),
        Some(0) => "run as the target's user or with CAP_SYS_PTRACE (e.g. as root); setuid or non-dumpable \
                    programs need CAP_SYS_PTRACE"
            .into(),
        _ => "set kernel.yama.ptrace_scope to 0 (sysctl kernel.yama.ptrace_scope=0) or run with CAP_SYS_PTRACE"
            .into(),
    }
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
        // The fix for a live process is one of the known texts.
        let me = nix::unistd::getpid();
        let TracerError::PermissionDenied { fix, .. } = TracerError::permission_denied(me) else {
            unreachable!()
        };
        assert!(
            fix.contains("ptrace") || fix.contains("CAP_SYS_PTRACE"),
            "{fix}"
        );
        assert!(TracerError::NoSuchProcess(Pid::from_raw(7))
            .to_string()
            .contains("PID 7"));
        let w = TracerError::WrongArch {
            path: "/bin/x".into(),
            machine: "AArch64".into(),
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
