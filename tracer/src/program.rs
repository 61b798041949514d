//! Checks made before anything is forked or attached, so that errors are clear: finding a program like a shell
//! does, checking it is something dynspec can run (an x86-64 ELF executable, or a script whose `#!` interpreter
//! in turn is one), and checking a PID is a user process that may be attached.
//!
//! [`crate::Tracer::spawn`] and [`crate::Tracer::attach`] make these checks; the command-line tool makes them
//! too, up front, and prints the errors' messages.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::unistd::Pid;

use crate::error::{arch_message, FileKind, ProgramFile, NOT_ELF};
use crate::process::tgid_of;
use crate::TracerError;

/// Levels of `#!` interpreters the kernel follows (BINPRM_MAX_RECURSION).
pub const MAX_INTERPRETER_DEPTH: u32 = 4;
/// The kernel reads this much of a file for its `#!` line (BINPRM_BUF_SIZE).
const HEAD_SIZE: usize = 256;
/// PATH when the environment has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Why an ELF header is refused ([`check_elf_header`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ElfError {
    /// Too short, or no ELF magic.
    #[error("{NOT_ELF}")]
    NotElf,
    /// ELF, but not 64-bit little-endian x86-64.
    #[error("{}", arch_message(*elf32, machine))]
    WrongArch {
        /// [`machine_name`] of `e_machine`.
        machine: String,
        /// ELFCLASS32.
        elf32: bool,
    },
}

/// Find `prog` like a shell does: a name with a slash is a path (it must exist), otherwise the first executable
/// regular file of that name in a PATH directory (an empty PATH entry is the current directory).
pub fn resolve(prog: &OsStr) -> Result<PathBuf, TracerError> {
    let p = Path::new(prog);
    let not_found = || TracerError::ProgramNotFound(ProgramFile::new(p, FileKind::Missing));
    if prog.is_empty() {
        return Err(not_found());
    }
    if prog.as_bytes().contains(&b'/') {
        return if p.exists() {
            Ok(p.to_path_buf())
        } else {
            Err(not_found())
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| DEFAULT_PATH.into());
    std::env::split_paths(&path)
        .map(|dir| {
            if dir.as_os_str().is_empty() {
                Path::new(".").join(p)
            } else {
                dir.join(p)
            }
        })
        .find(|c| c.is_file() && is_executable(c))
        .ok_or_else(not_found)
}

/// Check that `path` is an executable x86-64 ELF file, or a script whose `#!` interpreter (in turn) is one; the
/// kernel follows at most [`MAX_INTERPRETER_DEPTH`] levels of interpreters. Errors name the file `path`.
pub fn check(path: &Path) -> Result<(), TracerError> {
    check_file(path, ProgramFile::new(path, FileKind::Regular), 0)
}

/// [`resolve`] then [`check`], with errors naming the program as given (`prog`, not the file found in PATH).
/// Returns the file to execute.
pub fn validate(prog: &OsStr) -> Result<PathBuf, TracerError> {
    let path = resolve(prog)?;
    check_file(
        &path,
        ProgramFile::new(Path::new(prog), FileKind::Regular),
        0,
    )?;
    Ok(path)
}

/// Check the file at `path`, named `name` in errors, reached through `depth` `#!` lines.
fn check_file(path: &Path, name: ProgramFile, depth: u32) -> Result<(), TracerError> {
    let Ok(md) = std::fs::metadata(path) else {
        return Err(TracerError::ProgramNotFound(
            name.with_kind(FileKind::Missing),
        ));
    };
    if md.is_dir() {
        return Err(TracerError::NotExecutable(
            name.with_kind(FileKind::Directory),
        ));
    }
    if !md.is_file() {
        return Err(TracerError::NotExecutable(name.with_kind(FileKind::Other)));
    }
    if !is_executable(path) {
        return Err(TracerError::NotExecutable(name));
    }
    let mut head = [0u8; HEAD_SIZE];
    let n = read_head(path, &mut head)
        .map_err(|e| TracerError::io(format!("cannot read {name}"), e))?;
    let head = &head[..n];
    let Some(line) = head.strip_prefix(b"#!") else {
        return check_elf_header(head).map_err(|e| match e {
            ElfError::NotElf => TracerError::NotElf(name),
            ElfError::WrongArch { machine, elf32 } => TracerError::WrongArch {
                path: name,
                machine,
                elf32,
            },
        });
    };
    if depth >= MAX_INTERPRETER_DEPTH {
        return Err(TracerError::TooManyInterpreters(name));
    }
    let line = line.split(|b| *b == b'\n').next().unwrap_or_default();
    let Some(interp) = line
        .split(|b| *b == b' ' || *b == b'\t')
        .find(|w| !w.is_empty())
    else {
        return Err(TracerError::NoInterpreter(name));
    };
    let interp = Path::new(OsStr::from_bytes(interp));
    check_file(interp, name.interpreter(interp), depth + 1)
}

/// Read up to `buf.len()` bytes from the start of the file.
fn read_head(path: &Path, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut f = File::open(path)?;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Whether this process may execute `p` (`access(X_OK)`).
fn is_executable(p: &Path) -> bool {
    let Ok(c) = CString::new(p.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path that lives across the call.
    unsafe { libc::access(c.as_ptr(), libc::X_OK) == 0 }
}

/// Accept 64-bit little-endian x86-64 ELF headers only (the first 20 bytes of the file are enough).
pub fn check_elf_header(h: &[u8]) -> Result<(), ElfError> {
    if h.len() < 20 || &h[..4] != b"\x7fELF" {
        return Err(ElfError::NotElf);
    }
    let class = h[4];
    let little_endian = h[5] == 1;
    let machine = if little_endian {
        u16::from_le_bytes([h[18], h[19]])
    } else {
        u16::from_be_bytes([h[18], h[19]])
    };
    if class == 2 && machine == 62 && little_endian {
        return Ok(());
    }
    Err(ElfError::WrongArch {
        machine: machine_name(machine),
        elf32: class == 1,
    })
}

/// A readable name for an ELF `e_machine`.
pub fn machine_name(m: u16) -> String {
    match m {
        3 => "i386".into(),
        8 => "MIPS".into(),
        20 | 21 => "PowerPC".into(),
        22 => "S390".into(),
        40 => "ARM".into(),
        62 => "x86-64".into(),
        183 => "AArch64".into(),
        243 => "RISC-V".into(),
        other => format!("e_machine {other}"),
    }
}

/// Check that `pid` is a user process other than this one that exists; returns its thread-group id (`pid` may
/// name any of its threads).
pub fn check_pid(pid: Pid) -> Result<Pid, TracerError> {
    if pid.as_raw() <= 0 || !Path::new(&format!("/proc/{pid}")).exists() {
        return Err(TracerError::NoSuchProcess(pid));
    }
    let tgid = tgid_of(pid).ok_or(TracerError::NoSuchProcess(pid))?;
    if tgid == nix::unistd::getpid() {
        return Err(TracerError::AttachSelf(pid));
    }
    if is_kernel_thread(tgid) {
        return Err(TracerError::Unsupported(format!(
            "PID {tgid} is a kernel thread; only user processes can be attached"
        )));
    }
    check_exe(tgid)?;
    Ok(tgid)
}

/// Refuse a process whose executable is not x86-64 (a 32-bit program), with the message `run` gives for the
/// same file. Reading /proc/PID/exe needs the same access as ptrace: when it cannot be read, the check is left
/// to the attach itself (which then reports the permission problem).
fn check_exe(tgid: Pid) -> Result<(), TracerError> {
    let exe = format!("/proc/{tgid}/exe");
    let mut head = [0u8; 20];
    let Ok(n) = read_head(Path::new(&exe), &mut head) else {
        return Ok(());
    };
    let name = std::fs::read_link(&exe).unwrap_or_else(|_| PathBuf::from(&exe));
    check_exe_header(&head[..n], &name)
}

/// [`check_elf_header`] of a running process' executable `name`, as the error `run` gives for that file.
pub fn check_exe_header(head: &[u8], name: &Path) -> Result<(), TracerError> {
    let file = ProgramFile::new(name, FileKind::Regular);
    check_elf_header(head).map_err(|e| match e {
        ElfError::NotElf => TracerError::NotElf(file),
        ElfError::WrongArch { machine, elf32 } => TracerError::WrongArch {
            path: file,
            machine,
            elf32,
        },
    })
}

/// Whether the task is a kernel thread: PF_KTHREAD in the flags field of /proc/PID/stat (field 9; the command
/// name in field 2 may contain spaces and parentheses).
pub fn is_kernel_thread(pid: Pid) -> bool {
    const PF_KTHREAD: u64 = 0x0020_0000;
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(after_comm) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return false;
    };
    // Fields after the command: state(3) ppid(4) pgrp(5) session(6) tty_nr(7) tpgid(8) flags(9).
    after_comm
        .split_whitespace()
        .nth(6)
        .and_then(|f| f.parse::<u64>().ok())
        .is_some_and(|flags| flags & PF_KTHREAD != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(class: u8, data: u8, machine: u16) -> [u8; 20] {
        let mut h = [0u8; 20];
        h[..4].copy_from_slice(b"\x7fELF");
        h[4] = class;
        h[5] = data;
        let m = if data == 1 {
            machine.to_le_bytes()
        } else {
            machine.to_be_bytes()
        };
        h[18..20].copy_from_slice(&m);
        h
    }

    #[test]
    fn elf_headers() {
        assert_eq!(check_elf_header(&header(2, 1, 62)), Ok(()));
        let e = check_elf_header(&header(1, 1, 3)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "is a 32-bit ELF executable (i386); dynspec supports x86-64 programs only"
        );
        let e = check_elf_header(&header(2, 1, 183)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "is an ELF executable for a foreign architecture (AArch64); dynspec supports x86-64 programs only"
        );
        // Big-endian x86-64 does not exist: refused as foreign.
        assert!(matches!(
            check_elf_header(&header(2, 2, 62)),
            Err(ElfError::WrongArch { elf32: false, .. })
        ));
        // x32 is 32-bit.
        assert!(matches!(
            check_elf_header(&header(1, 1, 62)),
            Err(ElfError::WrongArch { elf32: true, .. })
        ));
        assert_eq!(check_elf_header(b"#!/bin/sh\n"), Err(ElfError::NotElf));
        assert_eq!(
            check_elf_header(&header(2, 1, 62)[..19]),
            Err(ElfError::NotElf)
        );
        assert_eq!(machine_name(999), "e_machine 999");
    }

    #[test]
    fn scripts_name_their_interpreter_chain() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let write = |name: &str, text: &str| {
            use std::os::unix::fs::PermissionsExt;
            let p = d.join(name);
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p
        };
        let data = write("data", "text");
        let inner = write("inner", &format!("#!{}\n", data.display()));
        let outer = write("outer", &format!("#! {} -x\n", inner.display()));
        let e = check(&outer).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "{}'s interpreter {}'s interpreter {}: not an ELF executable",
                outer.display(),
                inner.display(),
                data.display()
            )
        );
        let empty = write("empty", "#!  \n");
        assert!(matches!(check(&empty), Err(TracerError::NoInterpreter(_))));
        // A loop of scripts ends at the kernel's limit.
        let looping = d.join("loop");
        write("loop", &format!("#!{}\n", looping.display()));
        assert!(matches!(
            check(&looping),
            Err(TracerError::TooManyInterpreters(_))
        ));
        let missing = write("missing", "#!/nonexistent/interp\n");
        assert_eq!(
            check(&missing).unwrap_err().to_string(),
            format!(
                "{}'s interpreter /nonexistent/interp does not exist — fix the script's #! line",
                missing.display()
            )
        );
        assert!(check(&write("sh", "#!/bin/sh\n")).is_ok());
    }

    #[test]
    fn programs_are_named_as_given() {
        let e = validate(OsStr::new("")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "program not found: '' — check the path or PATH"
        );
        let e = validate(OsStr::new("/")).unwrap_err();
        assert_eq!(e.to_string(), "/ is a directory, not a program");
        let e = validate(OsStr::new("/dev/null")).unwrap_err();
        assert!(matches!(&e, TracerError::NotExecutable(f) if f.kind == FileKind::Other));
        assert!(validate(OsStr::new("sh")).is_ok());
    }

    #[test]
    fn a_32_bit_process_is_refused_like_its_program() {
        let exe = Path::new("/opt/old/app32");
        let e = check_exe_header(&header(1, 1, 3), exe).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/opt/old/app32: is a 32-bit ELF executable (i386); dynspec supports x86-64 programs only"
        );
        // The same words as `run` on that file.
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("app32");
        std::fs::write(&p, header(1, 1, 3)).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        assert_eq!(
            check(&p).unwrap_err().to_string(),
            check_exe_header(&header(1, 1, 3), &p)
                .unwrap_err()
                .to_string()
        );
        assert!(check_exe_header(&header(2, 1, 62), exe).is_ok());
        assert!(matches!(
            check_exe_header(b"\x7fEL", exe),
            Err(TracerError::NotElf(_))
        ));
        // This process (x86-64) passes.
        assert!(check_exe(nix::unistd::getpid()).is_ok());
    }

    #[test]
    fn pids() {
        let me = nix::unistd::getpid();
        assert!(matches!(check_pid(me), Err(TracerError::AttachSelf(p)) if p == me));
        assert!(!is_kernel_thread(me));
        assert!(matches!(
            check_pid(Pid::from_raw(0)),
            Err(TracerError::NoSuchProcess(_))
        ));
    }
}
