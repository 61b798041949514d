//! Shared helpers for the codecache integration tests: compile the test interpreter, drive a traced run.
#![allow(dead_code)]

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use codecache::{Cache, InstallId, InstallRequest, Invalidation, TargetMemory};
use specializer::{Addr, Gpr, KnownState, Options, Request, SpecializeError, Variant};
pub use tempfile::TempDir;
use tracer::{Event, ExitStatus, Pid, Tracer};

/// A fresh temporary directory named after `tag`, removed on drop.
pub fn temp_dir(tag: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(&format!("codecache-test-{tag}-"))
        .tempdir()
        .expect("create temp dir")
}

/// What tests/common/interp.c does besides interpreting (its MODE argument; see the top of interp.c).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Nothing else.
    Plain,
    /// Half-way, the program rewrites one bytecode operand (a user write into the guarded page).
    UserWrite,
    /// Half-way, `read()` from a pipe fills the bytecode page (a kernel write).
    KernelWrite,
    /// Two worker threads interpret while the main thread rewrites the bytecode; each result is checked
    /// against a reference (output `bad=0`).
    ThreadsWhileRewritten,
    /// Half-way, `hook()` (bytecode op 7, a residual call of the variant) rewrites the bytecode.
    WriteFromCallee,
    /// Bytecode op 8 stores into the bytecode page from inside `run()` (the writer is inside the variant).
    StoreFromInside,
    /// Like `UserWrite` with the bytecode in `.data` (mprotect guard; the write arrives as SIGSEGV).
    DataSection,
    /// Half-way the program forks; the child rewrites its bytecode and runs the rest.
    Fork,
    /// Like `Plain` with an extra SIGUSR1 half-way.
    ExtraUsr1,
    /// Half-way, vfork + exec of /bin/true (the child shares the parent's memory).
    Vfork,
    /// Like `StoreFromInside`; a SIGUSR2 handler (the test sends the signal) replaces bytecode 2; output says
    /// whether the interrupted `run()` saw the change (`mid=new`).
    SignalDuringStore,
    /// The bytecode is rewritten at 1/4, 2/4 and 3/4, each time followed by SIGUSR1.
    RewrittenThrice,
    /// The bytecode has a mapping of its own, discarded half-way with madvise(MADV_DONTNEED).
    Discarded,
    /// Like `DataSection`, and half-way the program takes a SIGSEGV of its own (caught by its handler).
    OwnSegv,
    /// Like `ThreadsWhileRewritten`, the main thread rewriting with `read()` (a kernel write while workers run).
    ThreadsWhileRead,
    /// Like `ThreadsWhileRewritten` with the bytecode in `.data`; half-way four more threads write unused
    /// words of the page at the same instant.
    SimultaneousWrites,
    /// Like `WriteFromCallee`, while another thread waits in vfork (its child sleeps 0.3 s): the invalidation
    /// cannot stop that thread.
    WriteFromCalleeDuringVfork,
}

impl Mode {
    /// The MODE argument of interp.c.
    pub fn arg(self) -> u32 {
        match self {
            Mode::Plain => 0,
            Mode::UserWrite => 1,
            Mode::KernelWrite => 2,
            Mode::ThreadsWhileRewritten => 3,
            Mode::WriteFromCallee => 4,
            Mode::StoreFromInside => 5,
            Mode::DataSection => 6,
            Mode::Fork => 7,
            Mode::ExtraUsr1 => 8,
            Mode::Vfork => 9,
            Mode::SignalDuringStore => 11,
            Mode::RewrittenThrice => 12,
            Mode::Discarded => 13,
            Mode::OwnSegv => 14,
            Mode::ThreadsWhileRead => 15,
            Mode::SimultaneousWrites => 16,
            Mode::WriteFromCalleeDuringVfork => 17,
        }
    }
}

/// Compile tests/common/interp.c into `dir` with extra flags.
pub fn build_interp(dir: &TempDir, flags: &[&str]) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/interp.c");
    let out = dir.path().join("interp");
    let st = Command::new("gcc")
        .args(["-O2", "-pthread", "-o"])
        .arg(&out)
        .arg(&src)
        .args(flags)
        .status()
        .expect("run gcc");
    assert!(st.success(), "gcc failed");
    out
}

/// Run the interpreter natively; returns its output file contents.
pub fn run_native(exe: &Path, dir: &TempDir, mode: Mode, iters: u64) -> String {
    let out = dir.path().join(format!("native-{}.out", mode.arg()));
    let st = Command::new(exe)
        .arg(mode.arg().to_string())
        .arg(iters.to_string())
        .arg(&out)
        .arg(dir.path().join("native.ptr"))
        .status()
        .expect("run natively");
    assert!(st.success());
    std::fs::read_to_string(out).expect("native output")
}

/// What a traced run produced.
pub struct Traced {
    pub output: String,
    pub status: ExitStatus,
    pub installed: Vec<InstallId>,
    /// Why the install was refused, if it was (the program then runs its original code).
    pub install_error: Option<String>,
    /// Results of re-installs (RunOpts::reinstall_at_usr1).
    pub reinstalls: Vec<Result<(), String>>,
    pub entries: u64,
    pub fallbacks: u64,
    pub invalidations: Vec<Invalidation>,
    pub variants_alive_at_end: usize,
    pub entries_mid: u64,
    /// How each guard page of the installed variants was protected.
    pub guard_kinds: Vec<codecache::GuardKind>,
    /// GuardSet::kernel_write_releases at the end.
    pub kernel_releases: u64,
    /// For each fork: whether the child's patch sites read as the original bytes after strip_child.
    pub children_stripped: Vec<bool>,
}

/// Where to install: at `run`'s entry (trigger rdi = bytecode pointer), or at its dispatch loop head (the
/// `cmp dword [pc], imm` instruction; trigger = pc register, one variant per bytecode position).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    Entry,
    /// At `run`'s entry with no trigger register: one variant, entered unconditionally.
    Unconditional,
    Dispatch {
        values: u64,
    },
    /// Like `Dispatch`, also assuming the jump-table base register (`lea reg,[rip+table]` before the loop) holds
    /// the table address (`matching`) or another value (every entry must fall back).
    DispatchAssumed {
        values: u64,
        matching: bool,
    },
}

/// The register `run` loads its jump-table base into before the loop head at `head` (`lea reg,[rip+t]`), and t.
fn table_base(tr: &Tracer, pid: Pid, start: Addr, head: Addr) -> (Gpr, u64) {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};
    let mut buf = vec![0u8; (head.0 - start.0) as usize];
    tr.read_memory(pid, start, &mut buf).expect("read run");
    let mut d = Decoder::with_ip(64, &buf, start.0, DecoderOptions::NONE);
    let mut found = None;
    while d.can_decode() {
        let i = d.decode();
        if i.mnemonic() == Mnemonic::Lea && i.is_ip_rel_memory_operand() {
            found = Gpr::containing(i.op0_register()).map(|g| (g, i.ip_rel_memory_address()));
        }
    }
    found.expect("no `lea reg,[rip+table]` before the dispatch head of run")
}

/// The dispatch loop head of `run` and its pc register.
fn dispatch_head(tr: &Tracer, pid: Pid, start: Addr, end: Addr) -> (Addr, Gpr) {
    use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind};
    let mut buf = vec![0u8; (end.0 - start.0) as usize];
    tr.read_memory(pid, start, &mut buf).expect("read run");
    let mut d = Decoder::with_ip(64, &buf, start.0, DecoderOptions::NONE);
    while d.can_decode() {
        let i = d.decode();
        if i.mnemonic() == Mnemonic::Cmp
            && i.op0_kind() == OpKind::Memory
            && i.op1_kind() == OpKind::Immediate8to32
        {
            let g = Gpr::containing(i.memory_base()).expect("pc register");
            return (Addr(i.ip()), g);
        }
    }
    panic!("no dispatch head in run");
}

/// Everything needed to specialize one trigger (what the session gathers from its profile).
#[derive(Clone, Debug)]
pub struct SpecializeRequest {
    /// Patch site = variant entry.
    pub trigger: Addr,
    /// The trigger register; None: one variant specialized on constant memory only, entered unconditionally.
    pub register: Option<Gpr>,
    /// Hot values of the register (ignored without a register).
    pub values: Vec<u64>,
    /// Registers known to hold these exact values at the trigger (besides the trigger register): every
    /// variant is specialized with them known and the stub checks them ([`InstallRequest::assumed`]).
    pub assumed: Vec<(Gpr, u64)>,
    /// The original function around the trigger.
    pub region: (Addr, Addr),
    /// Writable pages the store profile found unwritten (they will be guarded).
    pub constant_pages: Vec<Addr>,
    pub options: Options,
}

/// The product path, as the session takes it: specialize `req.region` for each hot value through a
/// [`TargetMemory`] of the (stopped) process, then [`Cache::install`] the variants with the snapshots of the
/// pages they read. Every value must specialize.
pub fn specialize_and_install(
    tr: &mut Tracer,
    cache: &mut Cache,
    pid: Pid,
    req: &SpecializeRequest,
) -> Result<InstallId, String> {
    let (variants, snapshots) =
        specialize(tr, cache, pid, req).map_err(|e| format!("specialize: {e}"))?;
    install(tr, cache, req, variants, snapshots)
}

/// [`Cache::install`] the variants specialized for `req`.
pub fn install(
    tr: &mut Tracer,
    cache: &mut Cache,
    req: &SpecializeRequest,
    variants: Vec<(Option<u64>, Variant)>,
    snapshots: std::collections::BTreeMap<Addr, Vec<u8>>,
) -> Result<InstallId, String> {
    // The caller stopped the threads and resumes them itself.
    let mut world = cache.stop_all(tr).map_err(|e| e.to_string())?;
    let r = cache
        .install(
            &mut world,
            InstallRequest {
                trigger: req.trigger,
                register: req.register,
                assumed: req.assumed.clone(),
                region: req.region,
                variants,
                snapshots,
            },
        )
        .map_err(|e| e.to_string());
    world.keep_stopped();
    r
}

/// One variant per value of `req` (one unconditional variant without a register), and the snapshots of the
/// writable pages they read as constant.
#[allow(clippy::type_complexity)]
pub fn specialize(
    tr: &Tracer,
    cache: &Cache,
    pid: Pid,
    req: &SpecializeRequest,
) -> Result<
    (
        Vec<(Option<u64>, Variant)>,
        std::collections::BTreeMap<Addr, Vec<u8>>,
    ),
    SpecializeError,
> {
    let values: Vec<Option<u64>> = match req.register {
        Some(_) => req.values.iter().copied().map(Some).collect(),
        None => vec![None],
    };
    let mut mem = TargetMemory::new(tr, pid, Some(cache)).expect("target memory");
    mem.allow(req.constant_pages.iter().copied());
    let mut variants = Vec::new();
    for v in values {
        let mut known = KnownState::default();
        for (g, a) in &req.assumed {
            known.set_reg(*g, Some(*a));
        }
        if let (Some(r), Some(v)) = (req.register, v) {
            known.set_reg(r, Some(v));
        }
        let sreq = Request {
            entry: req.trigger,
            region_start: req.region.0,
            region_end: req.region.1,
            known,
            options: req.options.clone(),
        };
        let var = specializer::specialize(&sreq, &mem)?;
        if std::env::var_os("CODECACHE_TEST_DUMP").is_some() {
            eprintln!("variant for {v:?}:\n{}", var.residual_asm().join("\n"));
        }
        variants.push((v, var));
    }
    Ok((variants, mem.snapshots()))
}

/// Specialize `run` of the traced interpreter for its bytecode pointer and install it at `site`.
pub fn install_run(
    tr: &mut Tracer,
    cache: &mut Cache,
    pid: Pid,
    code: u64,
    site: Site,
) -> Result<InstallId, String> {
    let mods = tracer::modules(pid).expect("modules");
    let sym = mods
        .iter()
        .find_map(|m| m.symbol("run").cloned())
        .expect("symbol run");
    let (start, end) = (sym.start, sym.end);
    let mut assumed = Vec::new();
    let (trigger, register, values) = match site {
        Site::Entry => (start, Some(Gpr::Rdi), vec![code]),
        Site::Unconditional => (start, None, Vec::new()),
        Site::Dispatch { values } => {
            let (a, g) = dispatch_head(tr, pid, start, end);
            (a, Some(g), (0..values).map(|k| code + 16 * k).collect())
        }
        Site::DispatchAssumed { values, matching } => {
            let (a, g) = dispatch_head(tr, pid, start, end);
            let (t, table) = table_base(tr, pid, start, a);
            assumed.push((t, if matching { table } else { table + 8 }));
            (a, Some(g), (0..values).map(|k| code + 16 * k).collect())
        }
    };
    let req = SpecializeRequest {
        trigger,
        register,
        values,
        assumed,
        region: (start, end),
        constant_pages: vec![Addr(code).page()],
        options: Options::default(),
    };
    let (variants, snapshots) =
        specialize(tr, cache, pid, &req).map_err(|e| format!("specialize: {e}"))?;
    // The point of these tests: variants that fold the bytecode, guarded on its page.
    if let Some((_, var)) = variants
        .iter()
        .find(|(_, v)| register.is_some() && !v.guard_pages.contains(&Addr(code).page()))
    {
        return Err(format!(
            "the variant does not rely on the bytecode page: {:?}",
            var.guard_pages
        ));
    }
    install(tr, cache, &req, variants, snapshots)
}

/// Spawn the interpreter under the tracer, install a variant of `run` at the first SIGUSR1, handle guard
/// faults like the session does, read counters at the second SIGUSR1.
pub fn run_traced(exe: &Path, dir: &TempDir, mode: Mode, iters: u64, site: Site) -> Traced {
    run_traced_with(exe, dir, mode, iters, site, RunOpts::default())
}

/// Extra actions of [`run_traced_with`].
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOpts {
    /// Uninstall every variant at the second of three SIGUSR1s ([`Mode::ExtraUsr1`]); the entry count at that point is kept
    /// in `entries_mid`.
    pub uninstall_mid: bool,
    /// With `uninstall_mid`: uninstall through a cache rebuilt from the journal (`Cache::state`, through JSON,
    /// then `Cache::restore` with a copy of the userfaultfd), as a guardian does, and carry on with that one.
    pub through_journal: bool,
    /// When the first guard fault is seen, first send this signal to the root thread and let its handler start
    /// (the faulting thread is interrupted inside the variant), then handle the faults.
    pub signal_on_first_fault: Option<i32>,
    /// At every SIGUSR1 after the first, specialize and install again (threads stopped).
    pub reinstall_at_usr1: bool,
}

/// [`run_traced`] with extra actions.
pub fn run_traced_with(
    exe: &Path,
    dir: &TempDir,
    mode: Mode,
    iters: u64,
    site: Site,
    opts: RunOpts,
) -> Traced {
    let uninstall_mid = opts.uninstall_mid;
    // 0: armed, 1: signal sent (faults wait until it was delivered), 2: done.
    let mut inject = if opts.signal_on_first_fault.is_some() {
        0
    } else {
        2
    };
    let out = dir.path().join(format!("traced-{}.out", mode.arg()));
    let ptr = dir.path().join("traced.ptr");
    let argv: Vec<OsString> = vec![
        exe.into(),
        mode.arg().to_string().into(),
        iters.to_string().into(),
        out.clone().into(),
        ptr.clone().into(),
    ];
    let mut tr = Tracer::spawn(&argv).expect("spawn");
    let pid = tr.root();
    let mut cache: Option<Cache> = None;
    let mut usr1 = 0;
    let mut installed = Vec::new();
    let mut install_error = None;
    let mut invalidations = Vec::new();
    let (mut entries, mut fallbacks, mut alive, mut entries_mid) = (0, 0, 0, 0);
    let mut children_stripped = Vec::new();
    let mut guard_kinds = Vec::new();
    let mut reinstalls = Vec::new();
    let mut code_ptr = 0u64;
    tr.resume_all().expect("resume");
    let status = loop {
        if let Some(c) = cache.as_mut() {
            if c.has_guard_faults() && inject == 0 {
                let sig = opts.signal_on_first_fault.unwrap_or(0);
                // SAFETY: tgkill with integer arguments, to our own traced child.
                unsafe { libc::syscall(libc::SYS_tgkill, pid.as_raw(), pid.as_raw(), sig) };
                inject = 1;
            } else if c.has_guard_faults() && inject == 2 {
                let mut world = c.stop_all(&mut tr).expect("stop");
                let handled = c.handle_guard_faults(&mut world);
                world.keep_stopped();
                match handled {
                    Ok(v) => invalidations.extend(v),
                    Err(e) => {
                        let threads: Vec<(Pid, bool)> = tr
                            .threads(pid)
                            .into_iter()
                            .map(|t| (t, tr.is_stopped(t)))
                            .collect();
                        let all = tr.all_threads();
                        panic!("guard faults: {e:?}; threads {threads:?}; all {all:?}");
                    }
                }
                tr.resume_all().expect("resume");
            }
        }
        let Some(ev) = tr
            .next_event(Some(Duration::from_millis(5)))
            .expect("next_event")
        else {
            continue;
        };
        match ev {
            Event::Signal {
                tid,
                signal,
                siginfo,
            } if signal == libc::SIGSEGV => {
                let ours = match cache.as_mut() {
                    Some(c) => c.handle_segv(&mut tr, tid, &siginfo).expect("segv"),
                    None => None,
                };
                match ours {
                    Some(inv) => {
                        invalidations.push(inv);
                        tr.resume_all().expect("resume");
                    }
                    // A write that faulted before another thread's fault lifted the guard: it runs again.
                    None if cache
                        .as_mut()
                        .is_some_and(|c| c.is_stale_segv(&tr, tid, &siginfo)) =>
                    {
                        tr.suppress_signal(tid);
                        tr.resume(tid, None).expect("resume");
                    }
                    None => tr.resume(tid, Some(signal)).expect("resume"),
                }
            }
            Event::Signal { .. } if matches!(ev, Event::Signal { signal, .. } if signal == libc::SIGUSR1) =>
            {
                usr1 += 1;
                match cache.as_ref() {
                    Some(c) => c.stop_all(&mut tr).expect("stop").keep_stopped(),
                    None => tr.stop_all().expect("stop"),
                }
                if usr1 == 1 {
                    let text = std::fs::read_to_string(&ptr).expect("ptr file");
                    let code = u64::from_str_radix(text.trim(), 16).expect("pointer");
                    code_ptr = code;
                    let mut c = Cache::new(&mut tr, pid).expect("cache");
                    match install_run(&mut tr, &mut c, pid, code, site) {
                        Ok(id) => {
                            installed.push(id);
                            guard_kinds = c
                                .variants()
                                .iter()
                                .flat_map(|v| v.guard_kinds.iter().map(|(_, k)| *k))
                                .collect();
                        }
                        Err(e) => install_error = Some(e),
                    }
                    cache = Some(c);
                } else if let (true, Some(c)) = (opts.reinstall_at_usr1, cache.as_mut()) {
                    reinstalls.push(install_run(&mut tr, c, pid, code_ptr, site).map(|_| ()));
                    let k = c.counters(&tr).expect("counters");
                    entries = k.entries.values().sum();
                } else if let (true, 2, Some(c)) = (uninstall_mid, usr1, cache.as_mut()) {
                    entries_mid = c.counters(&tr).expect("counters").entries.values().sum();
                    if opts.through_journal {
                        let json = serde_json::to_string(&c.state()).expect("serialize the state");
                        let state: codecache::CacheState =
                            serde_json::from_str(&json).expect("deserialize the state");
                        let fd = c
                            .uffd()
                            .map(|f| f.try_clone_to_owned().expect("dup the userfaultfd"));
                        let uffd = fd.map(|f| tracer::uffd::Uffd::new(f).expect("a userfaultfd"));
                        *c = Cache::restore(&state, uffd).expect("restore");
                    }
                    let mut world = c.stop_all(&mut tr).expect("stop");
                    c.uninstall_all(&mut world).expect("uninstall_all");
                    world.keep_stopped();
                } else if let Some(c) = cache.as_ref() {
                    let k = c.counters(&tr).expect("counters");
                    entries = k.entries.values().sum();
                    fallbacks = k.fallbacks.values().sum();
                    alive = c.variants().iter().filter(|v| v.alive).count();
                }
                // The program's SIGUSR1 is delivered (its handler ignores it).
                tr.resume_all().expect("resume");
            }
            Event::Signal { tid, signal, .. } => {
                if inject == 1 && Some(signal) == opts.signal_on_first_fault {
                    inject = 2;
                }
                tr.resume(tid, Some(signal)).expect("resume")
            }
            Event::NewThread { tid, parent } => {
                let _ = tr.resume(tid, None);
                let _ = tr.resume(parent, None);
            }
            Event::Forked { parent, child } => {
                if let Some(c) = cache.as_ref() {
                    c.strip_child(&mut tr, child).expect("strip_child");
                    let ok = c.patched_bytes().iter().all(|(a, orig)| {
                        let mut b = vec![0u8; orig.len()];
                        tr.read_memory(child, *a, &mut b).is_ok() && &b == orig
                    });
                    children_stripped.push(ok && !c.patched_bytes().is_empty());
                }
                let _ = tr.resume(child, None);
                let _ = tr.resume(parent, None);
            }
            Event::Exec { pid } => {
                let _ = tr.resume(pid, None);
            }
            Event::ThreadExited { .. } => {}
            Event::Exited { pid: p, status } if p == pid => break status,
            Event::Exited { .. } => {}
        }
    };
    let kernel_releases = cache
        .as_ref()
        .map(|c| c.guards().kernel_write_releases())
        .unwrap_or(0);
    if let Some(mut c) = cache {
        c.forget();
    }
    Traced {
        output: std::fs::read_to_string(&out).unwrap_or_default(),
        status,
        installed,
        install_error,
        reinstalls,
        entries,
        fallbacks,
        invalidations,
        variants_alive_at_end: alive,
        entries_mid,
        children_stripped,
        guard_kinds,
        kernel_releases,
    }
}
