//! Threads parked in vfork: the one kind of running thread the code cache treats as stopped (see
//! [`crate::Cache`], "Stopped threads").

use tracer::{Pid, Tracer};

use crate::CacheError;

/// A thread that `Tracer::stop_all` leaves running because it waits in `vfork` for its child.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Parked {
    pub tid: Pid,
    /// Its user RIP and RSP, from /proc/PID/task/TID/syscall.
    pub rip: u64,
    pub rsp: u64,
}

/// The threads of `pid` that are not in a ptrace-stop, when each of them is parked in vfork at a readable
/// position for which `forbidden(rip)` is false. Else [`CacheError::NotStopped`] names the first thread that
/// is running, or parked where it must not be.
pub(crate) fn parked_threads(
    tr: &Tracer,
    pid: Pid,
    forbidden: impl Fn(u64) -> bool,
) -> Result<Vec<Parked>, CacheError> {
    let mut parked = Vec::new();
    for tid in tr.threads(pid) {
        if tr.is_stopped(tid) {
            continue;
        }
        let not_stopped = CacheError::NotStopped { tid: tid.as_raw() };
        if !tr.in_vfork(tid) {
            return Err(not_stopped);
        }
        match vfork_position(pid, tid) {
            Some((rsp, rip)) if !forbidden(rip) => parked.push(Parked { tid, rip, rsp }),
            _ => return Err(not_stopped),
        }
    }
    Ok(parked)
}

/// The user (rsp, rip) of a thread blocked in a vfork-like system call (vfork, clone, clone3), read from
/// /proc/PID/task/TID/syscall (`nr args... sp pc` while blocked in a system call); None otherwise.
fn vfork_position(pid: Pid, tid: Pid) -> Option<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/syscall")).ok()?;
    parse_vfork_position(&text)
}

/// [`vfork_position`] of the text of a /proc/PID/task/TID/syscall file.
fn parse_vfork_position(text: &str) -> Option<(u64, u64)> {
    let fields: Vec<&str> = text.split_whitespace().collect();
    let nr: i64 = fields.first()?.parse().ok()?;
    if !matches!(nr, libc::SYS_vfork | libc::SYS_clone | libc::SYS_clone3) || fields.len() < 3 {
        return None;
    }
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    Some((
        hex(fields[fields.len() - 2])?,
        hex(fields[fields.len() - 1])?,
    ))
}

#[cfg(test)]
mod tests {
    use super::parse_vfork_position;

    #[test]
    fn vfork_position_only_inside_a_vfork_like_system_call() {
        // As read from a thread waiting in vfork (58): nr, six arguments, sp, pc.
        let waiting = "58 0x56119b69d7b7 0x7fbf719ace9b 0x0 0x7fbf719c4850 0x0 0x0 0x7fbf719ace90 0x7fbf71a853b8\n";
        assert_eq!(
            parse_vfork_position(waiting),
            Some((0x7fbf719ace90, 0x7fbf71a853b8))
        );
        let clone3 = "435 0x7ffd0 0x58 0x0 0x0 0x0 0x0 0x7ffc0 0x7f00123\n";
        assert_eq!(parse_vfork_position(clone3), Some((0x7ffc0, 0x7f00123)));
        // Another system call (read), a thread blocked outside one, a running thread.
        assert_eq!(
            parse_vfork_position("0 0x3 0x7f 0x1 0x0 0x0 0x0 0x7ffe 0x7f01\n"),
            None
        );
        assert_eq!(parse_vfork_position("-1 0x7ffe 0x7f01\n"), None);
        assert_eq!(parse_vfork_position("running\n"), None);
    }
}
