//! The guardian: a small process that outlives dynspec and undoes its changes to an attached process.
//!
//! At `dynspec attach` the session starts `dynspec __guardian PID` (a fresh single-threaded process, in a
//! process group of its own so a terminal's Ctrl-C reaches only dynspec) connected by a Unix socket on its
//! stdin. The code cache journals its state on that socket before each change reaches the target
//! ([`codecache::Journal`]), and the guards' userfaultfd is passed with SCM_RIGHTS, so that a write blocked on
//! a guard stays blocked until the guardian has removed the variants that rely on the page. EOF without a
//! `detached` record means dynspec died: the guardian seizes every thread once the kernel has dropped
//! dynspec's ptrace link, rebuilds the cache from the last record ([`codecache::Cache::restore`]) and runs the
//! session's own undo path, [`codecache::Cache::uninstall_all`], then detaches. After a clean detach it exits
//! without touching the target. `run` mode has no guardian: the program dies with dynspec (EXITKILL).

use std::io::Write as _;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use codecache::{Cache, CacheState, Journal, Released};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tracer::uffd::Uffd;
use tracer::Tracer;

/// The hidden subcommand that runs a guardian.
pub const SUBCOMMAND: &str = "__guardian";
/// How long one journal record may take to reach the guardian.
const SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the guardian waits for the kernel to drop dead dynspec's ptrace link before seizing.
const UNTRACED_WAIT: Duration = Duration::from_secs(10);

/// One message on the socket (one JSON line each).
#[derive(Debug, Serialize, Deserialize)]
enum Record {
    /// The code cache's state, before the change it describes.
    State(CacheState),
    /// The guards' userfaultfd rides on this message (SCM_RIGHTS).
    Uffd,
    /// dynspec removed everything and detaches: exit without touching the target.
    Detached,
}

/// dynspec's end: the guardian process and the socket to it.
pub struct Guardian {
    sock: std::sync::Arc<UnixStream>,
    child: Option<Child>,
}

/// Send all of `bytes` (MSG_NOSIGNAL: a dead guardian is an error, not a SIGPIPE), with `fd` attached to the
/// first byte when given.
fn send(sock: &UnixStream, bytes: &[u8], fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
    let mut off = 0;
    let mut fd = fd.map(|f| f.as_raw_fd());
    while off < bytes.len() {
        let rest = &bytes[off..];
        let mut iov = libc::iovec {
            iov_base: rest.as_ptr() as *mut libc::c_void,
            iov_len: rest.len(),
        };
        // Room for one descriptor, aligned as cmsghdr wants it.
        let mut cbuf = [0u64; 8];
        // SAFETY: an all-zero msghdr is a valid empty header; its pointers are set below to live buffers.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        if let Some(raw) = fd {
            // SAFETY: CMSG_SPACE is a pure size computation.
            let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) } as usize;
            msg.msg_control = cbuf.as_mut_ptr().cast();
            msg.msg_controllen = space;
            // SAFETY: msg_control points to `cbuf` (64 bytes, 8-aligned), larger than `space`, so the first
            // header and its data lie inside it.
            unsafe {
                let c = libc::CMSG_FIRSTHDR(&msg);
                (*c).cmsg_level = libc::SOL_SOCKET;
                (*c).cmsg_type = libc::SCM_RIGHTS;
                (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as usize;
                std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), raw);
            }
        }
        // SAFETY: `msg` refers to `iov` (over `rest`) and `cbuf`, both live for the call.
        let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        fd = None;
        off += n as usize;
    }
    Ok(())
}

fn send_record(sock: &UnixStream, r: &Record, fd: Option<BorrowedFd<'_>>) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r)?;
    line.push(b'\n');
    send(sock, &line, fd)
}

/// The journal the code cache writes to.
struct SocketJournal(std::sync::Arc<UnixStream>);

impl Journal for SocketJournal {
    fn record(&mut self, state: &CacheState) -> std::io::Result<()> {
        send_record(&self.0, &Record::State(state.clone()), None)
    }
}

impl Guardian {
    /// Start the guardian of attached process `pid`.
    pub fn start(pid: Pid) -> Result<Guardian> {
        let (ours, theirs) = UnixStream::pair().context("cannot create the guardian's socket")?;
        // A guardian that stopped reading (stopped, hung) must not keep the target stopped for ever: the record
        // fails, and with it the change it was written for.
        ours.set_write_timeout(Some(SEND_TIMEOUT))
            .context("cannot set up the guardian's socket")?;
        let exe = std::env::current_exe().context("cannot find dynspec's executable")?;
        use std::os::unix::process::CommandExt as _;
        let child = Command::new(exe)
            .arg(SUBCOMMAND)
            .arg(pid.as_raw().to_string())
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()
            .context("cannot start the guardian")?;
        Ok(Guardian {
            sock: std::sync::Arc::new(ours),
            child: Some(child),
        })
    }

    /// Hand the code cache's userfaultfd to the guardian and journal every change of `cache` from now on.
    pub fn watch(&self, cache: &mut Cache) -> Result<()> {
        if let Some(fd) = cache.uffd() {
            send_record(&self.sock, &Record::Uffd, Some(fd))
                .context("cannot hand the userfaultfd to the guardian")?;
        }
        cache
            .set_journal(Box::new(SocketJournal(self.sock.clone())))
            .context("cannot journal to the guardian")?;
        Ok(())
    }

    /// Everything is removed from the target: tell the guardian to exit without touching it, and reap it.
    pub fn detached(mut self) {
        let _ = send_record(&self.sock, &Record::Detached, None);
        let _ = self.sock.shutdown(std::net::Shutdown::Write);
        if let Some(mut c) = self.child.take() {
            let _ = c.wait();
        }
    }
}

/// `dynspec __guardian PID`: read the journal on stdin until EOF; if dynspec died with changes in the target,
/// undo them. Returns the exit status.
pub fn main(pid: i32) -> Result<i32> {
    // SAFETY: fd 0 is the socket the session passed (stdin); nothing else owns it in this fresh process.
    let sock = unsafe { OwnedFd::from_raw_fd(0) };
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // The pidfd pins which process is meant: a recycled PID is never attached to.
    let pidfd = (pidfd >= 0).then(|| {
        // SAFETY: pidfd_open returned a new descriptor we own.
        unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) }
    });
    let (state, uffd, detached) = read_journal(sock.as_fd())?;
    if detached {
        return Ok(0);
    }
    let Some(state) = state.filter(|s| !s.is_empty()) else {
        // Nothing of dynspec's is in the target (a watch's userfaultfd closed with dynspec).
        return Ok(0);
    };
    // The pidfd is the attached process's; the journal may be of another one (a child the profile chose).
    if state.pid == pid && pidfd.as_ref().is_some_and(|p| exited(p.as_fd())) {
        return Ok(0);
    }
    let Some((released, inside)) = restore(&state, uffd)? else {
        return Ok(0);
    };
    let kept = if released.kept.is_empty() {
        String::new()
    } else {
        let why: Vec<String> = released
            .kept
            .iter()
            .map(|(a, k)| format!("{a}: {k}"))
            .collect();
        format!("; kept {} (still reachable: {})", why.len(), why.join(", "))
    };
    eprintln!(
        "dynspec guardian: dynspec died; PID {} is back on its original code ({inside} thread(s) were in \
         generated code, {} code arena(s) unmapped{kept})",
        state.pid, released.unmapped
    );
    Ok(0)
}

/// Whether the process of `pidfd` exited (its pidfd is readable then).
fn exited(pidfd: BorrowedFd<'_>) -> bool {
    let mut p = libc::pollfd {
        fd: pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, no wait.
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}

/// (last state, last userfaultfd, whether a `detached` record came) once the socket reaches EOF.
fn read_journal(sock: BorrowedFd<'_>) -> Result<(Option<CacheState>, Option<Uffd>, bool)> {
    let (mut state, mut uffd, mut buf) = (None, None, Vec::new());
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        let (n, fd) = recv(sock, &mut chunk)?;
        if let Some(fd) = fd {
            uffd = Uffd::new(fd).ok();
        }
        if n == 0 {
            return Ok((state, uffd, false));
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            match serde_json::from_slice::<Record>(&line) {
                Ok(Record::State(s)) => state = Some(s),
                Ok(Record::Uffd) => {}
                Ok(Record::Detached) => return Ok((state, uffd, true)),
                // A torn last line (dynspec died mid-write): the previous record stands, and it was written
                // before the change this one announced.
                Err(_) => {}
            }
        }
    }
}

/// One recvmsg: (bytes read, a descriptor that came with them).
fn recv(sock: BorrowedFd<'_>, buf: &mut [u8]) -> Result<(usize, Option<OwnedFd>)> {
    loop {
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut cbuf = [0u64; 8];
        // SAFETY: an all-zero msghdr is a valid empty header; its pointers are set below to live buffers.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&cbuf);
        // SAFETY: `msg` refers to `iov` (over `buf`) and `cbuf`, both live for the call.
        let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("cannot read the journal");
        }
        let mut fd = None;
        // SAFETY: the kernel filled `msg_control` with `msg_controllen` bytes of well-formed headers; the
        // CMSG_* macros walk only those.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                    let raw = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<RawFd>());
                    // We own every descriptor SCM_RIGHTS gave us.
                    fd = Some(OwnedFd::from_raw_fd(raw));
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        return Ok((n as usize, fd));
    }
}

/// The TracerPid line of /proc/PID/status (None: the process is gone).
fn tracer_pid(pid: i32) -> Option<i32> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Undo everything `state` names in its process: seize it, the code cache's own uninstall, detach. Returns
/// what was given back and how many threads were stopped in generated code (None: the process is gone).
fn restore(state: &CacheState, uffd: Option<Uffd>) -> Result<Option<(Released, usize)>> {
    let pid = state.pid;
    // The kernel drops dead dynspec's ptrace link only after closing its files (our EOF).
    let start = Instant::now();
    loop {
        match tracer_pid(pid) {
            None => return Ok(None),
            Some(0) => break,
            Some(_) if start.elapsed() > UNTRACED_WAIT => {
                bail!("PID {pid} is still traced by someone else")
            }
            Some(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    let mut cache = Cache::restore(state, uffd).context("cannot rebuild the code cache")?;
    // Attaching stops every thread; a kernel write blocked on a guard is let through once the others stopped.
    let mut tr = cache
        .guards()
        .while_stopping(|| Tracer::attach(Pid::from_raw(pid)))
        .with_context(|| format!("cannot attach to PID {pid}"))?;
    let released = {
        let mut world = cache.stop_all(&mut tr)?;
        let code = cache.arena_ranges();
        let inside = world
            .threads(Pid::from_raw(pid))
            .into_iter()
            .filter_map(|t| world.regs(t).ok())
            .filter(|r| code.iter().any(|(s, e)| (*s..*e).contains(&r.rip)))
            .count();
        let r = cache
            .uninstall_all(&mut world)
            .context("cannot remove the variants")?;
        world.keep_stopped();
        (r, inside)
    };
    // Closing our copy of the userfaultfd drops any protection it still had.
    drop(cache);
    tr.detach().context("cannot detach")?;
    let _ = std::io::stderr().flush();
    Ok(Some(released))
}
