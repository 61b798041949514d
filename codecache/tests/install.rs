//! Integration tests on real processes: install a specialized `run`, count entries, invalidate on user and
//! kernel writes, deoptimize threads.

mod common;

use common::*;
use tracer::ExitStatus;

const ITERS: u64 = 200_000;

#[test]
fn installed_variant_gives_native_output_and_counts_entries() {
    let d = temp_dir("plain");
    let exe = build_interp(&d, &[]);
    let native = run_native(&exe, &d, Mode::Plain, ITERS);
    let t = run_traced(&exe, &d, Mode::Plain, ITERS, Site::Entry);
    assert_eq!(t.status, ExitStatus::Code(0));
    assert_eq!(t.output, native);
    assert_eq!(t.installed.len(), 1);
    assert!(t.entries > 0, "the variant was never entered");
    assert!(t.invalidations.is_empty());
    assert_eq!(t.variants_alive_at_end, 1);
}

#[test]
fn dispatch_trigger_with_many_values_pie_and_non_pie() {
    for (tag, flags) in [("pie", &[][..]), ("nopie", &["-no-pie", "-fno-pie"][..])] {
        let d = temp_dir(tag);
        let exe = build_interp(&d, flags);
        for mode in [Mode::Plain, Mode::UserWrite] {
            let native = run_native(&exe, &d, mode, ITERS);
            let t = run_traced(&exe, &d, mode, ITERS, Site::Dispatch { values: 10 });
            assert_eq!(t.status, ExitStatus::Code(0), "{tag} mode {mode:?}");
            assert_eq!(t.output, native, "{tag} mode {mode:?}");
            assert!(t.entries > 0, "{tag} mode {mode:?}: never entered");
            assert_eq!(
                !t.invalidations.is_empty(),
                mode == Mode::UserWrite,
                "{tag} mode {mode:?}"
            );
        }
    }
}

#[test]
fn dispatch_stub_checks_assumed_registers() {
    let d = temp_dir("assumed");
    let exe = build_interp(&d, &[]);
    let native = run_native(&exe, &d, Mode::Plain, ITERS);
    for matching in [true, false] {
        let t = run_traced(
            &exe,
            &d,
            Mode::Plain,
            ITERS,
            Site::DispatchAssumed {
                values: 10,
                matching,
            },
        );
        assert_eq!(t.status, ExitStatus::Code(0), "matching {matching}");
        assert_eq!(t.output, native, "matching {matching}");
        assert_eq!(t.installed.len(), 1, "matching {matching}");
        if matching {
            assert!(t.entries > 0, "never entered with the assumed value right");
        } else {
            // The wrong assumed value (specialized on, too) must never be entered: the original code runs.
            assert_eq!(t.entries, 0, "entered with the assumed register different");
            assert!(t.fallbacks > 0, "the stub was never reached");
        }
    }
}

#[test]
fn entry_patch_refused_when_a_branch_targets_the_displaced_bytes() {
    // Non-PIE -O2 `run` (gcc 12) loops back to its second instruction: the entry patch must be refused with a
    // typed error and the program must run unchanged. Other code generation may make the entry patchable.
    let d = temp_dir("refuse");
    let exe = build_interp(&d, &["-no-pie", "-fno-pie"]);
    let native = run_native(&exe, &d, Mode::Plain, 1000);
    let t = run_traced(&exe, &d, Mode::Plain, 1000, Site::Entry);
    assert_eq!(t.output, native);
    match &t.install_error {
        None => assert_eq!(t.installed.len(), 1),
        Some(e) => {
            assert!(e.contains("targets the displaced bytes"), "{e}");
            assert_eq!(t.entries, 0);
        }
    }
}

#[test]
fn user_write_to_guarded_page_invalidates() {
    let d = temp_dir("selfmod");
    let exe = build_interp(&d, &[]);
    let native = run_native(&exe, &d, Mode::UserWrite, ITERS);
    let t = run_traced(&exe, &d, Mode::UserWrite, ITERS, Site::Entry);
    assert_eq!(t.status, ExitStatus::Code(0));
    assert_eq!(t.output, native);
    assert!(!t.invalidations.is_empty(), "no invalidation");
    assert_eq!(t.invalidations[0].variants.len(), 1);
    assert_eq!(t.variants_alive_at_end, 0);
    assert!(t.entries > 0);
}

#[test]
fn read_into_guarded_page_succeeds_and_invalidates() {
    let d = temp_dir("kread");
    let exe = build_interp(&d, &[]);
    let native = run_native(&exe, &d, Mode::KernelWrite, ITERS);
    let t = run_traced(&exe, &d, Mode::KernelWrite, ITERS, Site::Entry);
    assert_eq!(t.status, ExitStatus::Code(0));
    assert_eq!(
        t.output, native,
        "read() into the guarded page must succeed"
    );
    assert!(!t.invalidations.is_empty(), "no invalidation");
    assert_eq!(t.variants_alive_at_end, 0);
    assert!(
        t.guard_kinds.contains(&codecache::GuardKind::Uffd),
        "{:?}",
        t.guard_kinds
    );
    assert_eq!(
        t.kernel_releases, 1,
        "the blocked read() was let through during stop_all"
    );
}

#[test]
fn threads_inside_the_variant_are_deoptimized() {
    // Two threads run the interpreter while the main thread rewrites the bytecode. With dispatch triggers the
    // threads spend much of their time in stubs (chain: 5 values; binary search: 10 values), so invalidation
    // often finds them there or inside variants; every result must still match a reference.
    let d = temp_dir("mt");
    let exe = build_interp(&d, &[]);
    for site in [
        Site::Entry,
        Site::Dispatch { values: 5 },
        Site::Dispatch { values: 10 },
    ] {
        let t = run_traced(&exe, &d, Mode::ThreadsWhileRewritten, ITERS, site);
        assert_eq!(t.status, ExitStatus::Code(0), "{site:?}");
        assert_eq!(t.output, "bad=0\n", "{site:?}");
        assert!(!t.invalidations.is_empty(), "no invalidation ({site:?})");
        eprintln!("{site:?}: {:?}", t.invalidations);
        assert!(t.entries > 0, "{site:?}");
    }
}

#[test]
fn write_from_a_callee_of_the_variant_redirects_its_return() {
    let d = temp_dir("callee");
    let exe = build_interp(&d, &[]);
    let native = run_native(&exe, &d, Mode::WriteFromCallee, ITERS);
    let t = run_traced(&exe, &d, Mode::WriteFromCallee, ITERS, Site::Entry);
    assert_eq!(t.status, ExitStatus::Code(0));
    assert_eq!(t.output, native);
    assert_eq!(t.invalidations.len(), 1);
    assert!(
        t.invalidations[0].returns_redirected >= 1,
        "the writer's return address points into the variant: {:?}",
        t.invalidations
    );
}

#[test]
fn write_while_another_thread_waits_in_vfork() {
    // The callee's write is handled while another thread waits in vfork, which no ptrace-stop reaches: the
    // invalidation (return site rewritten in the arena, threads moved) goes ahead without stopping it.
    let d = temp_dir("vforkwait");
    let exe = build_interp(&d, &[]);
    let native = run_native(&exe, &d, Mode::WriteFromCalleeDuringVfork, ITERS);
    let t = run_traced(
        &exe,
        &d,
        Mode::WriteFromCalleeDuringVfork,
        ITERS,
        Site::Entry,
    );
    assert_eq!(t.status, ExitStatus::Code(0));
    assert_eq!(t.output, native);
    assert_eq!(t.invalidations.len(), 1, "{:?}", t.invalidations);
    assert!(
        t.invalidations[0].returns_redirected >= 1,
        "the writer's return address points into the variant: {:?}",
        t.invalidations
    );
}

#[test]
fn writer_inside_the_variant_is_deoptimized() {
    let d = temp_dir("store");
    let exe = build_interp(&d, &[]);
    let native = run_native(&exe, &d, Mode::StoreFromInside, ITERS);
    let t = run_traced(&exe, &d, Mode::StoreFromInside, ITERS, Site::Entry);
    assert_eq!(t.status, ExitStatus::Code(0));
    assert_eq!(t.output, native);
    assert!(!t.invalidations.is_empty());
    assert!(
        t.invalidations[0].threads_moved >= 1,
        "the writing thread is inside the variant: {:?}",
        t.invalidations
    );
}

#[test]
fn data_section_page_is_guarded_with_mprotect() {
    let d = temp_dir("data");
    let exe = build_interp(&d, &[]);
    let native = run_native(&exe, &d, Mode::DataSection, ITERS);
    let t = run_traced(&exe, &d, Mode::DataSection, ITERS, Site::Entry);
    assert_eq!(t.status, ExitStatus::Code(0));
    assert_eq!(t.output, native);
    assert!(
        t.guard_kinds.contains(&codecache::GuardKind::Mprotect),
        "{:?}",
        t.guard_kinds
    );
    assert_eq!(t.invalidations.len(), 1, "the SIGSEGV of the write is ours");
    assert!(t.entries > 0);
}

#[test]
fn simultaneous_writes_to_an_mprotect_guard_all_complete() {
    // Four threads write the mprotect-guarded page at once: one SIGSEGV invalidates and lifts the guard, the
    // others were raised before that and reach dynspec afterwards; they must be resumed, not delivered.
    let d = temp_dir("mtdata");
    let exe = build_interp(&d, &[]);
    for round in 0..3 {
        let t = run_traced(&exe, &d, Mode::SimultaneousWrites, ITERS, Site::Entry);
        assert_eq!(t.status, ExitStatus::Code(0), "round {round}");
        assert_eq!(t.output, "bad=0\n", "round {round}");
        assert!(
            t.guard_kinds.contains(&codecache::GuardKind::Mprotect),
            "{:?}",
            t.guard_kinds
        );
        assert!(!t.invalidations.is_empty(), "round {round}");
    }
}

#[test]
fn forked_child_is_stripped_and_runs_original_code() {
    let d = temp_dir("fork");
    let exe = build_interp(&d, &[]);
    let native = run_native(&exe, &d, Mode::Fork, ITERS);
    let t = run_traced(&exe, &d, Mode::Fork, ITERS, Site::Entry);
    assert_eq!(t.status, ExitStatus::Code(0));
    assert_eq!(
        t.output, native,
        "the child rewrote its bytecode: it must not run the variant"
    );
    assert_eq!(t.children_stripped, vec![true]);
    assert!(
        t.invalidations.is_empty(),
        "the child's write is not the parent's"
    );
    assert!(t.entries > 0);
}

#[test]
fn uninstall_all_restores_the_original_code() {
    let d = temp_dir("uninstall");
    let exe = build_interp(&d, &[]);
    let native = run_native(&exe, &d, Mode::ExtraUsr1, ITERS);
    let t = run_traced_with(
        &exe,
        &d,
        Mode::ExtraUsr1,
        ITERS,
        Site::Entry,
        RunOpts {
            uninstall_mid: true,
            ..RunOpts::default()
        },
    );
    assert_eq!(t.status, ExitStatus::Code(0));
    assert_eq!(t.output, native);
    assert!(t.entries_mid > 0);
    assert_eq!(t.entries, t.entries_mid, "no entry after uninstall_all");
    assert_eq!(t.variants_alive_at_end, 0);
}

/// A guardian's path: the cache rebuilt from its journal record removes everything the live one installed.
#[test]
fn cache_restored_from_the_journal_uninstalls_everything() {
    let d = temp_dir("journal");
    let exe = build_interp(&d, &[]);
    let native = run_native(&exe, &d, Mode::ExtraUsr1, ITERS);
    let t = run_traced_with(
        &exe,
        &d,
        Mode::ExtraUsr1,
        ITERS,
        Site::Entry,
        RunOpts {
            uninstall_mid: true,
            through_journal: true,
            ..RunOpts::default()
        },
    );
    assert_eq!(t.status, ExitStatus::Code(0));
    assert_eq!(t.output, native);
    assert!(t.entries_mid > 0);
    assert_eq!(t.entries, t.entries_mid, "no entry after uninstall_all");
    assert_eq!(t.variants_alive_at_end, 0);
}

#[test]
fn unconditional_entry_without_trigger() {
    let d = temp_dir("uncond");
    let exe = build_interp(&d, &[]);
    let native = run_native(&exe, &d, Mode::UserWrite, ITERS);
    let t = run_traced(&exe, &d, Mode::UserWrite, ITERS, Site::Unconditional);
    assert_eq!(t.status, ExitStatus::Code(0));
    assert_eq!(t.output, native);
    assert!(t.install_error.is_none(), "{:?}", t.install_error);
    assert_eq!(t.installed.len(), 1);
    assert!(t.entries > 0);
    assert_eq!(t.fallbacks, 0, "no trigger, no fall-back");
}

#[test]
fn vfork_child_shares_the_patched_memory() {
    let d = temp_dir("vfork");
    let exe = build_interp(&d, &[]);
    let native = run_native(&exe, &d, Mode::Vfork, ITERS);
    let t = run_traced(&exe, &d, Mode::Vfork, ITERS, Site::Entry);
    assert_eq!(t.status, ExitStatus::Code(0));
    assert_eq!(t.output, native);
    assert_eq!(
        t.entries, ITERS,
        "the parent must stay patched after its vfork child"
    );
}

#[test]
fn signal_frame_inside_a_dead_variant_is_deoptimized() {
    // The write of bytecode op 8 (inside the variant) faults; before it is handled, SIGUSR2 interrupts the
    // thread there, and its handler rewrites a later bytecode (blocking on the same guarded page). After the
    // invalidation, sigreturn must resume in the original code, so that run() sees the handler's change.
    let d = temp_dir("sigframe");
    let exe = build_interp(&d, &[]);
    let t = run_traced_with(
        &exe,
        &d,
        Mode::SignalDuringStore,
        ITERS,
        Site::Entry,
        RunOpts {
            signal_on_first_fault: Some(libc::SIGUSR2),
            ..RunOpts::default()
        },
    );
    assert_eq!(t.status, ExitStatus::Code(0));
    assert!(t.output.starts_with("mid=new "), "{}", t.output);
    assert!(!t.invalidations.is_empty());
    assert!(
        t.invalidations[0].threads_moved >= 1,
        "{:?}",
        t.invalidations
    );
}

#[test]
fn page_invalidated_too_often_is_given_up() {
    // The program rewrites its bytecode three times (SIGUSR1 after each write); the test re-specializes and
    // re-installs after each. The third invalidation gives the page up: the next specialization cannot rely
    // on it any more.
    let d = temp_dir("giveup");
    let exe = build_interp(&d, &[]);
    let native = run_native(&exe, &d, Mode::RewrittenThrice, ITERS);
    let t = run_traced_with(
        &exe,
        &d,
        Mode::RewrittenThrice,
        ITERS,
        Site::Entry,
        RunOpts {
            reinstall_at_usr1: true,
            ..RunOpts::default()
        },
    );
    assert_eq!(t.status, ExitStatus::Code(0));
    assert_eq!(t.output, native);
    let never: Vec<bool> = t.invalidations.iter().map(|i| i.never_again).collect();
    assert_eq!(never, vec![false, false, true], "{:?}", t.invalidations);
    let ok: Vec<bool> = t.reinstalls.iter().map(|r| r.is_ok()).collect();
    assert_eq!(ok, vec![true, true, false, false], "{:?}", t.reinstalls);
}

#[test]
fn uninstall_then_detach_leaves_a_correct_program() {
    // Attach-mode shutdown: at the half-way SIGUSR1 (Mode::ExtraUsr1) uninstall everything, drop the cache, detach;
    // the program finishes on its own with the native output.
    use codecache::Cache;
    use std::time::Duration;
    use tracer::{Event, Tracer};
    let d = temp_dir("detach");
    let exe = build_interp(&d, &[]);
    let native = run_native(&exe, &d, Mode::ExtraUsr1, ITERS);
    let out = d.path().join("detach.out");
    let ptr = d.path().join("detach.ptr");
    let argv: Vec<std::ffi::OsString> = vec![
        exe.clone().into(),
        Mode::ExtraUsr1.arg().to_string().into(),
        ITERS.to_string().into(),
        out.clone().into(),
        ptr.clone().into(),
    ];
    let mut tr = Tracer::spawn(&argv).expect("spawn");
    let pid = tr.root();
    let mut cache: Option<Cache> = None;
    tr.resume_all().expect("resume");
    let mut usr1 = 0;
    loop {
        let Some(ev) = tr
            .next_event(Some(Duration::from_millis(5)))
            .expect("next_event")
        else {
            continue;
        };
        match ev {
            Event::Signal { signal, .. } if signal == libc::SIGUSR1 => {
                usr1 += 1;
                tr.stop_all().expect("stop");
                if usr1 == 1 {
                    let code =
                        u64::from_str_radix(std::fs::read_to_string(&ptr).expect("ptr").trim(), 16)
                            .expect("pointer");
                    let mut c = Cache::new(&mut tr, pid).expect("cache");
                    install_run(&mut tr, &mut c, pid, code, Site::Entry).expect("install");
                    cache = Some(c);
                    tr.resume_all().expect("resume");
                } else {
                    let mut c = cache.take().expect("cache");
                    let entries: u64 = c.counters(&tr).expect("counters").entries.values().sum();
                    assert!(entries > 0);
                    let arenas = c.arena_ranges();
                    assert!(!arenas.is_empty());
                    let mut world = c.stop_all(&mut tr).expect("stop");
                    let released = c.uninstall_all(&mut world).expect("uninstall_all");
                    world.keep_stopped();
                    // Nothing of the code cache is left in the target: every arena is unmapped.
                    assert_eq!(released.kept, vec![], "arenas kept");
                    assert_eq!(released.unmapped * 2, arenas.len());
                    let maps = tracer::read_maps(pid).expect("maps");
                    for (s, e) in arenas {
                        assert!(
                            maps.iter().all(|m| m.end.0 <= s || m.start.0 >= e),
                            "arena {s:#x}..{e:#x} still mapped"
                        );
                    }
                    assert!(c.counters(&tr).is_ok(), "counters after the unmap");
                    drop(c);
                    break;
                }
            }
            Event::Signal { tid, signal, .. } => tr.resume(tid, Some(signal)).expect("resume"),
            Event::Exited { .. } => panic!("exited before the detach"),
            _ => tr.resume_all().expect("resume"),
        }
    }
    tr.detach().expect("detach");
    let mut status = 0;
    // SAFETY: waitpid on our own (now untraced) child with a valid out-pointer.
    let r = unsafe { libc::waitpid(pid.as_raw(), &mut status, 0) };
    assert_eq!(r, pid.as_raw());
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "status {status:#x}"
    );
    assert_eq!(std::fs::read_to_string(&out).expect("output"), native);
}

#[test]
fn discarded_guarded_page_invalidates() {
    // madvise(MADV_DONTNEED) changes the page's contents without a write: the uffd remove event must
    // invalidate the variant as a write would.
    let d = temp_dir("dontneed");
    let exe = build_interp(&d, &[]);
    let native = run_native(&exe, &d, Mode::Discarded, ITERS);
    let t = run_traced(&exe, &d, Mode::Discarded, ITERS, Site::Entry);
    assert_eq!(t.status, ExitStatus::Code(0));
    // The stub is disabled the moment the event is read, so the output is right even if the program ends
    // before the invalidation itself runs (nobody waits on a discarded page).
    assert_eq!(t.output, native);
    assert!(t.invalidations.len() <= 1, "{:?}", t.invalidations);
}

#[test]
fn programs_own_segv_is_delivered() {
    // With a page guarded by mprotect, a SIGSEGV of the program's own (another page) reaches its handler.
    let d = temp_dir("ownsegv");
    let exe = build_interp(&d, &[]);
    let native = run_native(&exe, &d, Mode::OwnSegv, ITERS);
    assert!(native.starts_with("caught=1"), "{native}");
    let t = run_traced(&exe, &d, Mode::OwnSegv, ITERS, Site::Entry);
    assert_eq!(t.status, ExitStatus::Code(0));
    assert_eq!(t.output, native);
    assert!(
        t.guard_kinds.contains(&codecache::GuardKind::Mprotect),
        "{:?}",
        t.guard_kinds
    );
    assert!(t.invalidations.is_empty(), "{:?}", t.invalidations);
    assert!(t.entries > 0);
}

#[test]
fn kernel_write_while_other_threads_run() {
    // Workers keep running the interpreter while the main thread read()s new bytecode into the guarded
    // page: stop_all must stop the workers, let the blocked read complete, and every result stays correct.
    let d = temp_dir("mtread");
    let exe = build_interp(&d, &[]);
    for site in [Site::Entry, Site::Dispatch { values: 5 }] {
        let t = run_traced(&exe, &d, Mode::ThreadsWhileRead, ITERS, site);
        assert_eq!(t.status, ExitStatus::Code(0), "{site:?}");
        assert_eq!(t.output, "bad=0\n", "{site:?}");
        assert!(!t.invalidations.is_empty(), "{site:?}");
        assert_eq!(t.kernel_releases, 1, "{site:?}");
    }
}
