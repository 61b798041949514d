//! Why the kernel refused to let dynspec trace a process: the checks `ptrace(PTRACE_SEIZE)` makes, in its order,
//! read from /proc, so a permission error names the check that failed and its fix.

use nix::unistd::Pid;

/// `CAP_SYS_PTRACE` in a capability mask.
const CAP_SYS_PTRACE: u64 = 1 << 19;

/// Credentials of one process, from `/proc/PID/status`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Creds {
    /// Real, effective, saved and filesystem uid.
    pub uids: [u32; 4],
    /// Real, effective, saved and filesystem gid.
    pub gids: [u32; 4],
    /// Effective capabilities (CapEff).
    pub cap_eff: u64,
    /// Permitted capabilities (CapPrm).
    pub cap_prm: u64,
    /// Seccomp mode: 0 none, 1 strict, 2 filter.
    pub seccomp: u32,
    pub no_new_privs: bool,
    /// TracerPid (0: not traced).
    pub tracer: i32,
}

impl Creds {
    /// Parse the fields of a `/proc/PID/status` text (missing fields stay 0).
    pub fn parse(status: &str) -> Creds {
        let mut c = Creds::default();
        for line in status.lines() {
            let Some((key, val)) = line.split_once(':') else {
                continue;
            };
            let val = val.trim();
            let ids = |v: &str| {
                let mut out = [0u32; 4];
                for (o, x) in out.iter_mut().zip(v.split_whitespace()) {
                    *o = x.parse().unwrap_or(0);
                }
                out
            };
            match key {
                "Uid" => c.uids = ids(val),
                "Gid" => c.gids = ids(val),
                "CapEff" => c.cap_eff = u64::from_str_radix(val, 16).unwrap_or(0),
                "CapPrm" => c.cap_prm = u64::from_str_radix(val, 16).unwrap_or(0),
                "Seccomp" => c.seccomp = val.parse().unwrap_or(0),
                "NoNewPrivs" => c.no_new_privs = val == "1",
                "TracerPid" => c.tracer = val.parse().unwrap_or(0),
                _ => {}
            }
        }
        c
    }

    fn can_ptrace_anything(&self) -> bool {
        self.cap_eff & CAP_SYS_PTRACE != 0
    }
}

/// What the kernel's checks see for one attach (gathered by [`PtraceFacts::gather`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PtraceFacts {
    /// dynspec.
    pub caller: Creds,
    /// The target; `None` when its status cannot be read.
    pub target: Option<Creds>,
    /// Whether dynspec may open `/proc/PID/environ` (a PTRACE_MODE_READ check: same user, dumpable, capability
    /// subset, none of Yama's): when the user and capabilities match, false means the target is not dumpable.
    pub target_readable: bool,
    /// `kernel.yama.ptrace_scope`; `None` without Yama.
    pub yama: Option<u32>,
    /// dynspec is an ancestor of the target (what Yama scope 1 allows).
    pub ancestor: bool,
}

impl PtraceFacts {
    /// Read the facts for attaching to `pid` from /proc.
    pub fn gather(pid: Pid) -> PtraceFacts {
        let read = |p: String| std::fs::read_to_string(p).ok();
        let me = nix::unistd::getpid().as_raw();
        let mut ancestor = false;
        let mut cur = pid.as_raw();
        for _ in 0..4096 {
            let Some(ppid) = read(format!("/proc/{cur}/status")).and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("PPid:"))
                    .and_then(|v| v.trim().parse::<i32>().ok())
            }) else {
                break;
            };
            if ppid == me {
                ancestor = true;
                break;
            }
            if ppid <= 1 {
                break;
            }
            cur = ppid;
        }
        PtraceFacts {
            caller: Creds::parse(&read("/proc/self/status".into()).unwrap_or_default()),
            target: read(format!("/proc/{pid}/status")).map(|s| Creds::parse(&s)),
            target_readable: std::fs::File::open(format!("/proc/{pid}/environ")).is_ok(),
            yama: read("/proc/sys/kernel/yama/ptrace_scope".into())
                .and_then(|s| s.trim().parse().ok()),
            ancestor,
        }
    }
}

/// The check that refused the attach ([`diagnose`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Denial {
    /// The target runs as another user (or group) and dynspec lacks CAP_SYS_PTRACE.
    OtherUser { target_uid: u32, caller_uid: u32 },
    /// The target is not dumpable (setuid/setgid/file capabilities, or prctl(PR_SET_DUMPABLE, 0)).
    NotDumpable,
    /// The target may use capabilities dynspec does not hold.
    MoreCapabilities { target: u64, caller: u64 },
    /// Yama scope 3: no ptrace attach at all.
    YamaDisabled,
    /// Yama scope 2: only with CAP_SYS_PTRACE.
    YamaAdminOnly,
    /// Yama scope 1: only ancestors (or a tracer the target named with PR_SET_PTRACER).
    YamaRelational,
    /// Another tracer (a debugger, strace) holds it.
    AlreadyTraced { tracer: i32 },
    /// Every check above passes, and dynspec runs under a seccomp filter: the filter refused ptrace.
    Seccomp { no_new_privs: bool },
    /// Every check dynspec knows of passes.
    Unknown,
}

/// Which check refused the attach, in the kernel's order (`__ptrace_may_access`: same user or CAP_SYS_PTRACE,
/// dumpable or CAP_SYS_PTRACE, capability subset or CAP_SYS_PTRACE; then Yama; then "already traced"). A seccomp
/// filter acts before all of them but cannot be read, so it is named when nothing else explains the refusal.
pub fn diagnose(f: &PtraceFacts) -> Denial {
    let cap = f.caller.can_ptrace_anything();
    if let Some(t) = &f.target {
        let uid = f.caller.uids[0];
        let gid = f.caller.gids[0];
        let same_user =
            t.uids[..3].iter().all(|u| *u == uid) && t.gids[..3].iter().all(|g| *g == gid);
        if !same_user && !cap {
            return Denial::OtherUser {
                target_uid: t.uids[1],
                caller_uid: uid,
            };
        }
        if !cap && t.cap_prm & !f.caller.cap_prm != 0 {
            return Denial::MoreCapabilities {
                target: t.cap_prm,
                caller: f.caller.cap_prm,
            };
        }
        if !cap && !f.target_readable {
            return Denial::NotDumpable;
        }
    }
    match f.yama {
        Some(s) if s >= 3 => return Denial::YamaDisabled,
        Some(2) if !cap => return Denial::YamaAdminOnly,
        Some(1) if !cap && !f.ancestor => return Denial::YamaRelational,
        _ => {}
    }
    if let Some(tracer) = f.target.as_ref().map(|t| t.tracer).filter(|t| *t != 0) {
        return Denial::AlreadyTraced { tracer };
    }
    if f.caller.seccomp != 0 {
        return Denial::Seccomp {
            no_new_privs: f.caller.no_new_privs,
        };
    }
    Denial::Unknown
}

/// The user name of `uid` from /etc/passwd, as `name (uid N)`, or `uid N`.
fn user(uid: u32) -> String {
    let name = std::fs::read_to_string("/etc/passwd").ok().and_then(|p| {
        p.lines().find_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            (f.nth(1)?.parse::<u32>().ok()? == uid).then(|| name.to_string())
        })
    });
    match name {
        Some(n) => format!("{n} (uid {uid})"),
        None => format!("uid {uid}"),
    }
}

/// The cause and the fix, for the message after "permission denied attaching to PID N: ".
pub fn explain(d: &Denial) -> String {
    match d {
        Denial::OtherUser {
            target_uid,
            caller_uid,
        } => format!(
            "it belongs to {} and dynspec runs as {} without CAP_SYS_PTRACE: run dynspec as that user, or as \
             root (or with CAP_SYS_PTRACE)",
            user(*target_uid),
            user(*caller_uid)
        ),
        Denial::NotDumpable => "it is not dumpable (a setuid, setgid or file-capability program, or it called \
                                prctl(PR_SET_DUMPABLE, 0)) and dynspec lacks CAP_SYS_PTRACE: run dynspec as root \
                                (or with CAP_SYS_PTRACE)"
            .into(),
        Denial::MoreCapabilities { target, caller } => format!(
            "it holds capabilities dynspec does not (CapPrm {target:#x}, dynspec's {caller:#x}) and dynspec \
             lacks CAP_SYS_PTRACE: run dynspec as root (or with CAP_SYS_PTRACE)"
        ),
        Denial::YamaDisabled => {
            "kernel.yama.ptrace_scope is 3: ptrace attach is disabled on this machine until reboot".into()
        }
        Denial::YamaAdminOnly => "kernel.yama.ptrace_scope is 2 (admin only) and dynspec lacks CAP_SYS_PTRACE: \
                                  run dynspec as root (or with CAP_SYS_PTRACE), or set \
                                  sysctl kernel.yama.ptrace_scope=1"
            .into(),
        Denial::YamaRelational => "kernel.yama.ptrace_scope is 1: only a parent may trace its descendants: start \
                                   the program with `dynspec run`, run dynspec with CAP_SYS_PTRACE (e.g. as root), \
                                   or set sysctl kernel.yama.ptrace_scope=0"
            .into(),
        Denial::AlreadyTraced { tracer } => {
            let comm = std::fs::read_to_string(format!("/proc/{tracer}/comm"))
                .map(|c| format!(" ({})", c.trim()))
                .unwrap_or_default();
            format!("it is already traced by PID {tracer}{comm} (a debugger or strace): detach that first")
        }
        Denial::Seccomp { no_new_privs } => format!(
            "dynspec runs under a seccomp filter{} that refuses ptrace (as in a container): allow ptrace, e.g. \
             docker run --cap-add=SYS_PTRACE or --security-opt seccomp=unconfined",
            if *no_new_privs { " (no_new_privs set)" } else { "" }
        ),
        Denial::Unknown => "the user, capability, Yama and tracer checks all pass: a security module (AppArmor, \
                            SELinux) or a user namespace refused it; see the kernel log (dmesg)"
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> Creds {
        Creds {
            cap_eff: u64::MAX >> 23,
            cap_prm: u64::MAX >> 23,
            ..Creds::default()
        }
    }

    fn nobody() -> Creds {
        Creds {
            uids: [65534; 4],
            gids: [65534; 4],
            ..Creds::default()
        }
    }

    #[test]
    fn status_fields_are_parsed() {
        let c = Creds::parse(
            "Name:\tx\nUid:\t1000\t1001\t1002\t1003\nGid:\t5\t6\t7\t8\nCapPrm:\t0000000000080000\n\
             CapEff:\t000001ffffffffff\nTracerPid:\t42\nNoNewPrivs:\t1\nSeccomp:\t2\n",
        );
        assert_eq!(c.uids, [1000, 1001, 1002, 1003]);
        assert_eq!(c.gids, [5, 6, 7, 8]);
        assert_eq!(c.cap_prm, CAP_SYS_PTRACE);
        assert!(c.can_ptrace_anything());
        assert_eq!((c.tracer, c.seccomp, c.no_new_privs), (42, 2, true));
    }

    #[test]
    fn each_check_is_named() {
        // Unprivileged against root: the owner, not Yama.
        let f = PtraceFacts {
            caller: nobody(),
            target: Some(root()),
            target_readable: false,
            yama: Some(1),
            ancestor: false,
        };
        assert_eq!(
            diagnose(&f),
            Denial::OtherUser {
                target_uid: 0,
                caller_uid: 65534
            }
        );
        // Same user, not dumpable (/proc/PID owned by root).
        let same = PtraceFacts {
            caller: nobody(),
            target: Some(nobody()),
            target_readable: true,
            yama: None,
            ancestor: false,
        };
        assert_eq!(diagnose(&same), Denial::Unknown);
        let f = PtraceFacts {
            target_readable: false,
            ..same.clone()
        };
        assert_eq!(diagnose(&f), Denial::NotDumpable);
        // Same user, the target holds a capability.
        let mut t = nobody();
        t.cap_prm = 1 << 10;
        let f = PtraceFacts {
            target: Some(t),
            ..same.clone()
        };
        assert!(matches!(diagnose(&f), Denial::MoreCapabilities { .. }));
        // Yama, by scope; scope 1 allows ancestors.
        for (scope, ancestor, want) in [
            (3, true, Denial::YamaDisabled),
            (2, true, Denial::YamaAdminOnly),
            (1, false, Denial::YamaRelational),
            (1, true, Denial::Unknown),
            (0, false, Denial::Unknown),
        ] {
            let f = PtraceFacts {
                yama: Some(scope),
                ancestor,
                ..same.clone()
            };
            assert_eq!(diagnose(&f), want, "scope {scope} ancestor {ancestor}");
        }
        // Another tracer.
        let mut t = nobody();
        t.tracer = 77;
        let f = PtraceFacts {
            target: Some(t),
            ..same.clone()
        };
        assert_eq!(diagnose(&f), Denial::AlreadyTraced { tracer: 77 });
        // Root with CAP_SYS_PTRACE, no Yama (the case on PID 1): neither Yama nor the capability is the
        // cause; a seccomp filter on dynspec is, when there is one.
        let mut me = root();
        let f = PtraceFacts {
            caller: me.clone(),
            target: Some(root()),
            target_readable: true,
            yama: None,
            ancestor: false,
        };
        assert_eq!(diagnose(&f), Denial::Unknown);
        assert!(!explain(&diagnose(&f)).contains("yama"));
        me.seccomp = 2;
        let f = PtraceFacts {
            caller: me.clone(),
            ..f
        };
        assert_eq!(
            diagnose(&f),
            Denial::Seccomp {
                no_new_privs: false
            }
        );
        // CAP_SYS_PTRACE passes scope 2 and other users' processes.
        let f = PtraceFacts {
            caller: root(),
            target: Some(nobody()),
            target_readable: true,
            yama: Some(2),
            ancestor: false,
        };
        assert_eq!(diagnose(&f), Denial::Unknown);
    }

    #[test]
    fn messages_name_cause_and_fix() {
        let m = explain(&Denial::OtherUser {
            target_uid: 0,
            caller_uid: 65534,
        });
        assert!(m.starts_with("it belongs to "), "{m}");
        assert!(
            m.contains("uid 0") && m.contains("uid 65534") && m.contains("CAP_SYS_PTRACE"),
            "{m}"
        );
        assert!(explain(&Denial::YamaRelational).contains("kernel.yama.ptrace_scope is 1"));
        assert!(explain(&Denial::Seccomp { no_new_privs: true }).contains("seccomp"));
        for d in [
            Denial::NotDumpable,
            Denial::YamaDisabled,
            Denial::YamaAdminOnly,
            Denial::AlreadyTraced { tracer: 1 },
            Denial::Unknown,
        ] {
            assert!(!explain(&d).contains('\n'), "{d:?}");
        }
    }
}
