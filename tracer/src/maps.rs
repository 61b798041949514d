//! The target's memory map, parsed from /proc/PID/maps.

use std::path::PathBuf;

use nix::unistd::Pid;

use crate::{Addr, TracerError};

/// One line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: Addr,
    pub end: Addr,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub shared: bool,
    pub offset: u64,
    /// File path, or a pseudo name such as `[heap]`, `[stack]`, `[vdso]`; None for anonymous memory.
    pub path: Option<PathBuf>,
    pub inode: u64,
}

impl Mapping {
    /// Whether `a` lies in `[start, end)`.
    pub fn contains(&self, a: Addr) -> bool {
        self.start <= a && a < self.end
    }

    /// Whether the mapping is backed by a file (not anonymous, not a `[pseudo]` region).
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.is_some()
    }

    /// Whether the path is a bracketed pseudo name (`[heap]`, `[stack]`, `[vdso]`...).
    pub fn is_pseudo(&self) -> bool {
        self.path.as_ref().is_some_and(|p| {
            let s = p.as_os_str().as_encoded_bytes();
            s.first() == Some(&b'[') && s.last() == Some(&b']')
        })
    }

    /// Protection bits (PROT_*) of this mapping.
    pub fn prot(&self) -> i32 {
        (if self.read { libc::PROT_READ } else { 0 })
            | (if self.write { libc::PROT_WRITE } else { 0 })
            | (if self.exec { libc::PROT_EXEC } else { 0 })
    }
}

/// Parse one maps line; None if malformed.
pub fn parse_line(line: &str) -> Option<Mapping> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?.as_bytes();
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let _dev = it.next()?;
    let inode: u64 = it.next()?.parse().ok()?;
    let rest = it.next().unwrap_or("").trim_start();
    let (s, e) = range.split_once('-')?;
    if perms.len() < 4 {
        return None;
    }
    let path = if rest.is_empty() {
        None
    } else {
        Some(PathBuf::from(
            rest.strip_suffix(" (deleted)").unwrap_or(rest),
        ))
    };
    Some(Mapping {
        start: Addr(u64::from_str_radix(s, 16).ok()?),
        end: Addr(u64::from_str_radix(e, 16).ok()?),
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        offset,
        path,
        inode,
    })
}

/// The memory map of `pid`, sorted by address.
pub fn read_maps(pid: Pid) -> Result<Vec<Mapping>, TracerError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| {
        match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ESRCH) => TracerError::NoSuchProcess(pid),
            Some(libc::EACCES) | Some(libc::EPERM) => TracerError::permission_denied(pid),
            _ => TracerError::io(format!("reading /proc/{pid}/maps"), e),
        }
    })?;
    Ok(text.lines().filter_map(parse_line).collect())
}

/// The mapping containing `a` (maps must be sorted, as `read_maps` returns them).
pub fn mapping_at(maps: &[Mapping], a: Addr) -> Option<&Mapping> {
    let i = maps.partition_point(|m| m.end <= a);
    maps.get(i).filter(|m| m.contains(a))
}

/// Whether two processes share one address space (`kcmp(KCMP_VM)`): `None` when that cannot be told (kcmp is
/// missing or refused), so each caller picks the answer that is safe for it.
pub fn same_address_space(a: Pid, b: Pid) -> Option<bool> {
    const KCMP_VM: libc::c_long = 1;
    // SAFETY: kcmp takes integer arguments only and reads nothing from our memory.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, a.as_raw(), b.as_raw(), KCMP_VM, 0, 0) };
    match r {
        0 => Some(true),
        1 | 2 => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn same_address_space_tells_self_from_a_child() {
        let me = Pid::this();
        assert_eq!(same_address_space(me, me), Some(true));
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .expect("spawn sleep");
        let pid = Pid::from_raw(child.id() as i32);
        assert_eq!(same_address_space(me, pid), Some(false));
        let _ = child.kill();
        let _ = child.wait();
    }

    use super::*;

    #[test]
    fn parses_lines() {
        let m = parse_line("7f0000001000-7f0000003000 r-xp 00002000 08:01 1234                       /usr/lib/libc.so.6").unwrap();
        assert_eq!(m.start, Addr(0x7f0000001000));
        assert_eq!(m.end, Addr(0x7f0000003000));
        assert!(m.read && !m.write && m.exec && !m.shared);
        assert_eq!(m.offset, 0x2000);
        assert_eq!(m.inode, 1234);
        assert_eq!(
            m.path.as_deref(),
            Some(std::path::Path::new("/usr/lib/libc.so.6"))
        );
        let a = parse_line("00400000-00401000 rw-s 00000000 00:00 0 ").unwrap();
        assert!(a.path.is_none() && a.shared && a.write);
        let h =
            parse_line("01000000-01021000 rw-p 00000000 00:00 0                          [heap]")
                .unwrap();
        assert!(h.is_pseudo() && !h.is_file());
        assert!(parse_line("garbage").is_none());
        let maps = vec![m.clone(), h.clone()];
        let mut sorted = maps;
        sorted.sort_by_key(|m| m.start);
        assert_eq!(mapping_at(&sorted, Addr(0x01000010)), Some(&h));
        assert!(mapping_at(&sorted, Addr(0x5)).is_none());
    }
}
