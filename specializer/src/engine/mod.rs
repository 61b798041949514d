//! The specialization engine: worklist over (address, abstract state), folding and emission.
//!
//! [`specialize`] queues the entry, then [`Engine::walk`] (`walk.rs`) runs each pending
//! (label, address, state) down its path: [`Engine::step`] (`transfer.rs`) folds or emits one
//! instruction at a time, residual code goes out through `rewrite.rs` and `emit.rs`, and
//! [`Engine::finish`] (`finish.rs`) assigns label addresses. The other files:
//! - `state.rs`: the abstract state [`AbsState`] and the flag helpers;
//! - `operands.rs`: reading operands (registers, constant memory) from the state;
//! - `liveness.rs`: which status flags may still be read;
//! - `forward.rs`: store forwarding, the one assumption beyond the entry state and the guard pages;
//! - `slots.rs`: stack slots the variant stored a known value to, whose reloads are checked, not assumed.

mod emit;
mod finish;
mod forward;
mod liveness;
mod operands;
mod rewrite;
mod slots;
mod state;
mod transfer;
mod walk;

pub use transfer::modelled_mnemonics;

use crate::sem::Flags;
use crate::variant::{Emitted, Variant, LABEL_BASE};
use crate::{Addr, Exit, Memory, Options, Request, SpecializeError, Stats};
use iced_x86::{Decoder, DecoderOptions, Instruction, InstructionInfoFactory};
use state::AbsState;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

/// Whether `v` fits a sign-extended 32-bit immediate or displacement.
fn fits_i32(v: i64) -> bool {
    v >= i32::MIN as i64 && v <= i32::MAX as i64
}

/// What [`Engine::step`] tells the walk: continue at this address, or the path ended.
enum Next {
    Continue(Addr),
    Stop,
}

/// What widening remembers about the states emitted at one address.
#[derive(Default)]
struct Seen {
    count: usize,
    values: [BTreeSet<Option<u64>>; 16],
    flags: BTreeSet<(Flags, bool)>,
}

/// One specialization run.
struct Engine<'a> {
    req: &'a Request,
    mem: &'a dyn Memory,
    items: Vec<Emitted>,
    /// Label id -> position in `items` of the instruction it names.
    labels: Vec<Option<usize>>,
    key_label: HashMap<(Addr, AbsState), u32>,
    /// Per fact-free state: how many states with facts have a label.
    fact_copies: HashMap<(Addr, AbsState), u32>,
    pending: VecDeque<(u32, Addr, AbsState)>,
    /// Per address: how many distinct states were emitted, the distinct
    /// values each register took and the distinct flag states (for widening).
    seen_at: HashMap<Addr, Seen>,
    exits: Vec<Exit>,
    exit_items: Vec<usize>,
    guard: BTreeSet<Addr>,
    stats: Stats,
    est_bytes: usize,
    budget_hit: bool,
    live_cache: HashMap<Addr, u8>,
    decode_cache: HashMap<Addr, Option<Instruction>>,
    data_labels: HashMap<u8, u32>,
    info: InstructionInfoFactory,
    /// Registers whose value addressed a folded constant load (bit per Gpr).
    static_regs: u16,
    /// Per original address walked: (visits, visits that emitted code), for [`Variant::original`].
    coverage: BTreeMap<Addr, (u32, u32)>,
    /// Inside [`Engine::step`]: the instruction stepped, whose code is emitted now.
    stepping: Option<Addr>,
}

/// Specialize `req` reading the target through `mem`.
pub fn specialize(req: &Request, mem: &dyn Memory) -> Result<Variant, SpecializeError> {
    if req.entry < req.region_start || req.entry >= req.region_end {
        return Err(SpecializeError::EntryOutsideRegion(req.entry));
    }
    let mut e = Engine {
        req,
        mem,
        items: Vec::new(),
        labels: Vec::new(),
        key_label: HashMap::new(),
        fact_copies: HashMap::new(),
        pending: VecDeque::new(),
        seen_at: HashMap::new(),
        exits: Vec::new(),
        exit_items: Vec::new(),
        guard: BTreeSet::new(),
        stats: Stats::default(),
        est_bytes: 0,
        budget_hit: false,
        live_cache: HashMap::new(),
        decode_cache: HashMap::new(),
        data_labels: HashMap::new(),
        info: InstructionInfoFactory::new(),
        static_regs: 0,
        coverage: BTreeMap::new(),
        stepping: None,
    };
    // The entry must decode; anything later that does not becomes an exit.
    if e.decode(req.entry).is_none() {
        let mut b = [0u8; 1];
        return Err(if mem.read(req.entry, &mut b).is_err() {
            SpecializeError::Unreadable(req.entry)
        } else {
            SpecializeError::Undecodable(req.entry)
        });
    }
    let st = AbsState::from_known(&req.known);
    let l = e.new_label();
    e.pending.push_back((l, req.entry, st));
    while let Some((label, addr, st)) = e.pending.pop_front() {
        e.walk(label, addr, st)?;
    }
    e.finish()
}

// Glue used by every part of the engine.
impl Engine<'_> {
    fn opts(&self) -> &Options {
        &self.req.options
    }

    fn new_label(&mut self) -> u32 {
        self.labels.push(None);
        (self.labels.len() - 1) as u32
    }

    fn label_ip(l: u32) -> u64 {
        LABEL_BASE + l as u64
    }

    fn place(&mut self, l: u32) {
        self.labels[l as usize] = Some(self.items.len());
    }

    fn in_region(&self, a: Addr) -> bool {
        a >= self.req.region_start && a < self.req.region_end
    }

    fn decode(&mut self, ip: Addr) -> Option<Instruction> {
        if let Some(d) = self.decode_cache.get(&ip) {
            return *d;
        }
        let mut buf = [0u8; 15];
        let mut n = 15;
        // Near the end of a mapping fewer than 15 bytes may be readable.
        while n > 0 && self.mem.read(ip, &mut buf[..n]).is_err() {
            n -= 1;
        }
        let r = if n == 0 {
            None
        } else {
            let mut d = Decoder::with_ip(64, &buf[..n], ip.0, DecoderOptions::NONE);
            let ins = d.decode();
            if ins.is_invalid() {
                None
            } else {
                Some(ins)
            }
        };
        self.decode_cache.insert(ip, r);
        r
    }
}
