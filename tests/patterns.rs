//! End-to-end tests of the interpreter patterns of issue 9 (samples/interp_goto.c, interp_threaded.c,
//! interp_dl.c, interp_spill.c): each is specialized under `dynspec run` with byte-identical output and a
//! variant that is entered.
//!
//! Sizes are five times the small ones (about 0.6 s natively), so the first install happens well before the
//! program ends even on a loaded machine; nothing here measures time.

mod common;

/// The report's variants of a run of `bin size`, after [`common::run_both`] checked the output is native.
fn variants_of(bin: &str, size: &str) -> (Vec<serde_json::Value>, serde_json::Value) {
    let (_, r, _tmp) = common::run_both(bin, &[size], &[]);
    let vs = r["variants"]
        .as_array()
        .expect("variants[] in the report")
        .clone();
    (vs, r)
}

/// The program's output under dynspec is the native one and some variant was entered.
fn assert_specialized_and_entered(bin: &str, size: &str) -> Vec<serde_json::Value> {
    let (vs, r) = variants_of(bin, size);
    assert!(
        vs.iter().any(|v| v["entries"].as_u64().unwrap_or(0) > 0),
        "{bin} {size}: no variant entered: variants {} plan {}",
        r["variants"],
        r["plan"]
    );
    vs
}

/// Computed goto, the dispatch duplicated into every handler's tail (12 indirect jumps, no single dispatch).
#[test]
fn computed_goto_is_specialized() {
    assert_specialized_and_entered("interp_goto", "5000000");
}

/// Threaded code: the bytecode holds handler addresses, `goto *ip->handler` ends every handler.
#[test]
fn threaded_code_is_specialized() {
    assert_specialized_and_entered("interp_threaded", "5000000");
}

/// The interpreter in a stripped shared library: its function is found through .eh_frame and named
/// `module+0xVADDR` in the report.
#[test]
fn interpreter_in_a_stripped_library_is_specialized() {
    let vs = assert_specialized_and_entered("interp_dl", "5000000");
    assert!(
        vs.iter().any(|v| v["region"]["symbol"]
            .as_str()
            .is_some_and(|r| r.starts_with("libinterp_dl.so+0x"))),
        "no variant in the library's unnamed function: {vs:?}"
    );
}

/// The pc in a stack slot: every handler stores to `[env + 8*res]` (which may alias the slot as far as the
/// specializer can tell) and reloads the pc from `[rsp]`; the variant keeps the pc it stored and checks each
/// reload against it (`cmp`/`jne`), so it follows the bytecode from the loop head (found by back-attribution
/// through the dispatch's `add rdx, 1`).
#[test]
fn pc_in_a_stack_slot_is_specialized() {
    assert_specialized_and_entered("interp_spill", "5000000");
}
