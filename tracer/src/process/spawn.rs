//! Starting to trace: spawning a program under ptrace, or attaching to every thread of a running process.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use nix::errno::Errno;

use super::{
    proc_status_field, pt, task_state, waitpid_raw, Pid, Resume, SpawnOptions, State, StopKind,
    Tracer, WAIT_FLAGS,
};
use crate::TracerError;

/// What every tracee reports: new threads and processes, exec, and syscall stops told apart from SIGTRAP.
const FOLLOW_OPTIONS: libc::c_int = libc::PTRACE_O_TRACECLONE
    | libc::PTRACE_O_TRACEFORK
    | libc::PTRACE_O_TRACEVFORK
    | libc::PTRACE_O_TRACEVFORKDONE
    | libc::PTRACE_O_TRACEEXEC
    | libc::PTRACE_O_TRACESYSGOOD;
/// A spawned program dies with dynspec (`PTRACE_O_EXITKILL`): it was started by dynspec and runs specialized code
/// only while dynspec watches it, which is what a user of `dynspec run` expects.
const SPAWN_OPTIONS: libc::c_int = FOLLOW_OPTIONS | libc::PTRACE_O_EXITKILL;
/// An attached process must outlive dynspec: no `PTRACE_O_EXITKILL` (the kernel detaches it when dynspec dies).
const ATTACH_OPTIONS: libc::c_int = FOLLOW_OPTIONS;

impl Tracer {
    /// Fork+exec `argv[0]` (PATH lookup like a shell) under ptrace with stdio inherited unchanged.
    /// Returns with the new process stopped right after its execve.
    pub fn spawn(argv: &[OsString]) -> Result<Tracer, TracerError> {
        Tracer::spawn_with(argv, &SpawnOptions::default())
    }

    /// [`Tracer::spawn`] with options.
    pub fn spawn_with(argv: &[OsString], opts: &SpawnOptions) -> Result<Tracer, TracerError> {
        let prog = argv.first().ok_or(TracerError::EmptyCommand)?;
        let path = crate::program::validate(prog)?;

        // Everything the child needs is prepared before fork: between fork and exec only async-signal-safe
        // calls are allowed (the caller may be multi-threaded).
        let bad = |_| TracerError::SpawnFailed {
            path: path.clone(),
            reason: "an argument or environment variable contains a NUL byte".into(),
        };
        let c_path = CString::new(path.as_os_str().as_bytes()).map_err(bad)?;
        let c_args: Vec<CString> = argv
            .iter()
            .map(|a| CString::new(a.as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(bad)?;
        let mut env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
        for (k, v) in &opts.extra_env {
            env.retain(|(ek, _)| ek != k);
            env.push((k.clone(), v.clone()));
        }
        let c_env: Vec<CString> = env
            .into_iter()
            .map(|(k, v)| {
                let mut b = k.into_vec();
                b.push(b'=');
                b.extend(v.into_vec());
                CString::new(b)
            })
            .collect::<Result<_, _>>()
            .map_err(bad)?;
        let mut argp: Vec<*const libc::c_char> = c_args.iter().map(|c| c.as_ptr()).collect();
        argp.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = c_env.iter().map(|c| c.as_ptr()).collect();
        envp.push(std::ptr::null());
        let disable_aslr = opts.disable_aslr;
        let close_fds = opts.close_fds.clone();

        // SAFETY: fork in a possibly multi-threaded process; the child only calls async-signal-safe functions
        // (personality, sigprocmask, signal, close, getpid, kill, execve, _exit) on memory prepared before the fork.
        let child = unsafe { libc::fork() };
        if child < 0 {
            return Err(TracerError::errno("fork", Errno::last()));
        }
        if child == 0 {
            // SAFETY: see above; all pointers are valid NUL-terminated arrays built before fork.
            unsafe {
                if disable_aslr {
                    libc::personality(libc::ADDR_NO_RANDOMIZE as libc::c_ulong);
                }
                // Start the program in the standard state, as std::process::Command does: the Rust runtime
                // ignores SIGPIPE and the calling thread may block signals; neither belongs to the program.
                let mut empty: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut empty);
                libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                for &fd in &close_fds {
                    libc::close(fd);
                }
                // Stop so the parent can PTRACE_SEIZE us before execve (as strace does).
                libc::kill(libc::getpid(), libc::SIGSTOP);
                libc::execve(c_path.as_ptr(), argp.as_ptr(), envp.as_ptr());
                libc::_exit(127);
            }
        }
        let child = Pid::from_raw(child);
        let mut tr = Tracer::empty(child, true);

        // Wait for the self-stop (the child is not traced yet: WUNTRACED).
        match waitpid_raw(child.as_raw(), libc::WUNTRACED) {
            Ok(Some((_, st))) if libc::WIFSTOPPED(st) => {}
            Ok(Some((_, st))) => {
                return Err(TracerError::SpawnFailed {
                    path,
                    reason: format!("the child ended before exec (wait status {st:#x})"),
                })
            }
            Ok(None) | Err(_) => {
                return Err(TracerError::SpawnFailed {
                    path,
                    reason: "could not wait for the forked child".into(),
                })
            }
        }
        if let Err(e) = pt(libc::PTRACE_SEIZE, child, 0, SPAWN_OPTIONS as usize) {
            // SAFETY: plain kill of our own child.
            unsafe { libc::kill(child.as_raw(), libc::SIGKILL) };
            let _ = waitpid_raw(child.as_raw(), 0);
            tr.finished = true;
            return Err(match e {
                Errno::EPERM => TracerError::permission_denied(child),
                e => TracerError::errno("ptrace(PTRACE_SEIZE)", e),
            });
        }
        tr.add_thread(child, child, State::Running, false);
        // SAFETY: plain kill of our own child.
        unsafe { libc::kill(child.as_raw(), libc::SIGCONT) };
        loop {
            let (_, st) = match waitpid_raw(child.as_raw(), WAIT_FLAGS) {
                Ok(Some(x)) => x,
                Ok(None) => continue,
                Err(e) => return Err(TracerError::errno("waitpid", e)),
            };
            if libc::WIFEXITED(st) || libc::WIFSIGNALED(st) {
                tr.threads.clear();
                tr.procs.clear();
                tr.finished = true;
                let reason = if libc::WIFEXITED(st) && libc::WEXITSTATUS(st) == 127 {
                    "execve failed (exit status 127)".to_string()
                } else {
                    format!("the child ended before exec (wait status {st:#x})")
                };
                return Err(TracerError::SpawnFailed { path, reason });
            }
            let event = st >> 16;
            if event == libc::PTRACE_EVENT_EXEC {
                tr.threads.get_mut(&child).expect("registered above").state =
                    State::Stopped(StopKind::SyscallEvent);
                return Ok(tr);
            }
            // Before exec: the seize trap, our SIGCONT, the SIGSTOP — all are ours; suppress them.
            match tr.continue_thread(child, Resume::Cont { sig: 0 }) {
                // Killed: its exit is the next status.
                Ok(()) | Err(TracerError::ProcessGone(_)) => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// PTRACE_SEIZE every thread of `pid` and interrupt them all. Returns with all threads stopped.
    pub fn attach(pid: Pid) -> Result<Tracer, TracerError> {
        let tgid = crate::program::check_pid(pid)?;
        let mut tr = Tracer::empty(tgid, false);
        let me = nix::unistd::getpid().as_raw().to_string();
        loop {
            let mut new = 0;
            let dir = std::fs::read_dir(format!("/proc/{tgid}/task"))
                .map_err(|_| TracerError::NoSuchProcess(pid))?;
            for ent in dir.flatten() {
                let Some(tid) = ent.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                let tid = Pid::from_raw(tid);
                if tr.threads.contains_key(&tid) {
                    continue;
                }
                match pt(libc::PTRACE_SEIZE, tid, 0, ATTACH_OPTIONS as usize) {
                    Ok(_) => {
                        tr.add_thread(tid, tgid, State::Running, false);
                        new += 1;
                    }
                    Err(Errno::ESRCH) => {}
                    Err(Errno::EPERM) => {
                        // A thread cloned after we seized its parent is auto-attached to us already.
                        if !tr.threads.is_empty()
                            && proc_status_field(tid, "TracerPid").as_deref() == Some(me.as_str())
                        {
                            tr.add_thread(tid, tgid, State::Running, false);
                            new += 1;
                        } else if tid == tgid && matches!(task_state(tid), Some('Z') | Some('X')) {
                            // The main thread called pthread_exit: a zombie cannot be traced, the others can.
                            tr.add_thread(tid, tgid, State::Zombie, false);
                            tr.procs.entry(tgid).or_default().untraced_leader = true;
                            new += 1;
                        } else if tr.threads.is_empty() {
                            tr.finished = true;
                            return Err(TracerError::permission_denied(tgid));
                        } else {
                            return Err(TracerError::permission_denied(tid));
                        }
                    }
                    Err(e) => {
                        return Err(TracerError::errno(
                            format!("ptrace(PTRACE_SEIZE, {tid})"),
                            e,
                        ))
                    }
                }
            }
            if new == 0 {
                break;
            }
        }
        if tr.threads.is_empty() {
            tr.finished = true;
            return Err(TracerError::NoSuchProcess(pid));
        }
        tr.stop_all()?;
        Ok(tr)
    }
}
