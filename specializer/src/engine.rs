//! The specialization engine: worklist over (address, abstract state), folding and emission.

use crate::sem::{self, AluOp, Flags, ShiftOp};
use crate::variant::{Emitted, Variant, LABEL_BASE};
use crate::{
    Addr, Exit, ExitReason, Flag, Gpr, KnownState, Memory, Options, Request, SpecializeError,
    Stats, PAGE_SIZE,
};
use iced_x86::{
    Code, ConditionCode, Decoder, DecoderOptions, FlowControl, Instruction, InstructionInfoFactory,
    Mnemonic, OpAccess, OpKind, Register, RflagsBits,
};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::OnceLock;

/// The six status flags (everything but DF), as a bit mask over `Flag as usize`.
const STATUS: u8 = 0b101_1111;
const STATUS_FLAGS: [Flag; 6] = [Flag::Cf, Flag::Pf, Flag::Af, Flag::Zf, Flag::Sf, Flag::Of];
/// Copies of the code at one address and state that differ only in store-forwarding facts (see `link_target`).
const MAX_FACT_COPIES: u32 = 2;

/// Abstract state: each GPR unknown or known (with a bit telling whether the
/// real register holds the value), the flags likewise. `fmat == false` means
/// the known status flags are folded (the real flags are stale) and unknown
/// status flags are don't-care (undefined or dead).
#[derive(Clone, Debug, Default)]
pub(crate) struct AbsState {
    regs: [Option<u64>; 16],
    rmat: u16,
    flags: Flags,
    fmat: bool,
    /// Store forwarding: each (base, disp, reg) says the real qword at
    /// `[base + disp]` equals the real register `reg`. Only real writes
    /// (emitted code) invalidate them; folded writes leave real registers alone.
    /// A `None` base is an absolute address (`disp` alone).
    facts: Vec<(Option<Gpr>, i64, Gpr)>,
    /// Widening hint, not part of the state's identity: registers whose
    /// value came from constant memory or the entry state (directly or by
    /// folded arithmetic on such values). These take finitely many values.
    stat: u16,
}

impl PartialEq for AbsState {
    fn eq(&self, o: &AbsState) -> bool {
        self.regs == o.regs
            && self.rmat == o.rmat
            && self.flags == o.flags
            && self.fmat == o.fmat
            && self.facts == o.facts
    }
}

impl Eq for AbsState {}

impl std::hash::Hash for AbsState {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.regs.hash(h);
        self.rmat.hash(h);
        self.flags.hash(h);
        self.fmat.hash(h);
        self.facts.hash(h);
    }
}

impl AbsState {
    fn from_known(k: &KnownState) -> AbsState {
        let mut s = AbsState {
            regs: k.regs,
            rmat: 0xffff,
            flags: k.flags,
            fmat: true,
            facts: Vec::new(),
            stat: 0,
        };
        for g in Gpr::ALL {
            if s.get(g).is_some() {
                s.stat |= 1 << g.index();
            }
        }
        s.normalize();
        s
    }

    /// Unknown registers carry no materialized bit, so equal states hash equal.
    fn normalize(&mut self) {
        for i in 0..16 {
            if self.regs[i].is_none() {
                self.rmat &= !(1 << i);
            }
        }
        if (0..7).all(|i| i == Flag::Df as usize || self.flags[i].is_none()) {
            self.fmat = true;
        }
        self.facts.sort();
        self.facts.dedup();
    }

    fn get(&self, g: Gpr) -> Option<u64> {
        self.regs[g.index()]
    }

    fn is_mat(&self, g: Gpr) -> bool {
        self.rmat & (1 << g.index()) != 0
    }

    fn set(&mut self, g: Gpr, v: Option<u64>, mat: bool) {
        self.regs[g.index()] = v;
        self.stat &= !(1 << g.index());
        if v.is_some() && mat {
            self.rmat |= 1 << g.index();
        } else {
            self.rmat &= !(1 << g.index());
        }
    }

    /// What the deopt map must restore at this point: folded registers and flags.
    fn folded(&self) -> KnownState {
        let mut k = KnownState::default();
        for g in Gpr::ALL {
            if let Some(v) = self.get(g) {
                if !self.is_mat(g) {
                    k.set_reg(g, Some(v));
                }
            }
        }
        if !self.fmat {
            for f in STATUS_FLAGS {
                k.set_flag(f, self.flags[f as usize]);
            }
        }
        k
    }

    /// A real write to `g`: forget facts that mention it.
    fn real_write(&mut self, g: Gpr) {
        self.facts.retain(|f| f.0 != Some(g) && f.2 != g);
    }

    /// A real memory write of `size` bytes at `[base + disp]` (base `None`: the absolute address `disp`; `at`
    /// `None`: anywhere). Facts on another base may alias it and are dropped.
    fn mem_write(&mut self, at: Option<(Option<Gpr>, i64, u64)>) {
        match at {
            None => self.facts.clear(),
            Some((b, d, size)) => self.facts.retain(|f| {
                f.0 == b && (f.1.wrapping_add(8) <= d || d.wrapping_add(size as i64) <= f.1)
            }),
        }
    }

    /// Whether the real register holds what the abstract state says.
    fn is_real(&self, g: Gpr) -> bool {
        self.get(g).is_none() || self.is_mat(g)
    }

    fn known(&self) -> KnownState {
        KnownState {
            regs: self.regs,
            flags: self.flags,
        }
    }

    fn all_unknown(&mut self) {
        *self = AbsState {
            fmat: true,
            ..AbsState::default()
        };
    }
}

/// Map an iced RflagsBits mask to our `Flag` bit mask.
fn flag_mask(bits: u32) -> u8 {
    let mut m = 0u8;
    for (b, f) in [
        (RflagsBits::CF, Flag::Cf),
        (RflagsBits::PF, Flag::Pf),
        (RflagsBits::AF, Flag::Af),
        (RflagsBits::ZF, Flag::Zf),
        (RflagsBits::SF, Flag::Sf),
        (RflagsBits::DF, Flag::Df),
        (RflagsBits::OF, Flag::Of),
    ] {
        if bits & b != 0 {
            m |= 1 << (f as u8);
        }
    }
    m
}

fn written_flags(ins: &Instruction) -> u8 {
    flag_mask(ins.rflags_modified())
}

/// Whether the instruction may leave the flags it "modifies" unchanged
/// (shift/rotate by a count that may be zero).
fn conditional_flag_write(ins: &Instruction) -> bool {
    use Mnemonic as M;
    matches!(
        ins.mnemonic(),
        M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shld | M::Shrd
    ) && ins.op_count() > 0
        && match ins.try_immediate(ins.op_count() - 1) {
            Ok(v) => v & 31 == 0,
            // A register count may be zero.
            Err(_) => true,
        }
}

/// Lookup table: for (known-mask, values) over the 6 status flags, an 8-bit
/// `cmp a, b` pair producing them.
fn cmp_table() -> &'static Vec<Option<(u8, u8)>> {
    static T: OnceLock<Vec<Option<(u8, u8)>>> = OnceLock::new();
    T.get_or_init(|| {
        let mut t = vec![None; 64 * 64];
        for a in 0..=255u8 {
            for b in 0..=255u8 {
                let f = sem::cmp8_flags(a, b);
                let mut v = 0usize;
                for (i, fl) in STATUS_FLAGS.iter().enumerate() {
                    if f[*fl as usize] == Some(true) {
                        v |= 1 << i;
                    }
                }
                for m in 0..64usize {
                    let k = m * 64 + (v & m);
                    if t[k].is_none() {
                        t[k] = Some((a, b));
                    }
                }
            }
        }
        t
    })
}

/// An 8-bit compare producing every known flag of `want` (unknown ones free).
pub(crate) fn cmp_for(want: &Flags) -> Option<(u8, u8)> {
    let mut m = 0usize;
    let mut v = 0usize;
    for (i, fl) in STATUS_FLAGS.iter().enumerate() {
        if let Some(b) = want[*fl as usize] {
            m |= 1 << i;
            if b {
                v |= 1 << i;
            }
        }
    }
    cmp_table()[m * 64 + v]
}

/// Whether [`Engine::mat_flags`] can rebuild these flags (cmp, then stc/clc).
fn flags_rebuildable(want: &Flags) -> bool {
    let mut no_cf = *want;
    no_cf[Flag::Cf as usize] = None;
    cmp_for(want).is_some() || cmp_for(&no_cf).is_some()
}

/// After a residual conditional branch the real flags satisfy (or fail)
/// its condition; record what that pins down exactly.
fn refine_flags(cc: ConditionCode, taken: bool, st: &mut AbsState) {
    use ConditionCode as C;
    if !st.fmat {
        return;
    }
    let mut set = |f: Flag, v: bool| st.flags[f as usize] = Some(v);
    match (cc, taken) {
        (C::e, t) | (C::ne, t) => set(Flag::Zf, t == (cc == C::e)),
        (C::b, t) | (C::ae, t) => set(Flag::Cf, t == (cc == C::b)),
        (C::s, t) | (C::ns, t) => set(Flag::Sf, t == (cc == C::s)),
        (C::o, t) | (C::no, t) => set(Flag::Of, t == (cc == C::o)),
        (C::p, t) | (C::np, t) => set(Flag::Pf, t == (cc == C::p)),
        // a: CF=0 and ZF=0
        (C::a, true) | (C::be, false) => {
            set(Flag::Cf, false);
            set(Flag::Zf, false);
        }
        // g: ZF=0 and SF=OF
        (C::g, true) | (C::le, false) => set(Flag::Zf, false),
        _ => {}
    }
}

fn is_setcc(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Seto
            | M::Setno
            | M::Setb
            | M::Setae
            | M::Sete
            | M::Setne
            | M::Setbe
            | M::Seta
            | M::Sets
            | M::Setns
            | M::Setp
            | M::Setnp
            | M::Setl
            | M::Setge
            | M::Setle
            | M::Setg
    )
}

fn is_cmovcc(m: Mnemonic) -> bool {
    use Mnemonic as M;
    matches!(
        m,
        M::Cmovo
            | M::Cmovno
            | M::Cmovb
            | M::Cmovae
            | M::Cmove
            | M::Cmovne
            | M::Cmovbe
            | M::Cmova
            | M::Cmovs
            | M::Cmovns
            | M::Cmovp
            | M::Cmovnp
            | M::Cmovl
            | M::Cmovge
            | M::Cmovle
            | M::Cmovg
    )
}

/// The 32-bit register of a GPR.
fn gpr32(g: Gpr) -> Register {
    use Register as R;
    [
        R::EAX,
        R::ECX,
        R::EDX,
        R::EBX,
        R::ESP,
        R::EBP,
        R::ESI,
        R::EDI,
        R::R8D,
        R::R9D,
        R::R10D,
        R::R11D,
        R::R12D,
        R::R13D,
        R::R14D,
        R::R15D,
    ][g.index()]
}

fn is_high8(r: Register) -> bool {
    matches!(r, Register::AH | Register::CH | Register::DH | Register::BH)
}

fn fits_i32(v: i64) -> bool {
    v >= i32::MIN as i64 && v <= i32::MAX as i64
}

/// Every mnemonic whose semantics is modelled exactly.
pub fn modelled_mnemonics() -> &'static [Mnemonic] {
    use Mnemonic as M;
    &[
        M::Mov,
        M::Movzx,
        M::Movsx,
        M::Movsxd,
        M::Lea,
        M::Add,
        M::Sub,
        M::Adc,
        M::Sbb,
        M::And,
        M::Or,
        M::Xor,
        M::Not,
        M::Neg,
        M::Inc,
        M::Dec,
        M::Shl,
        M::Shr,
        M::Sar,
        M::Rol,
        M::Ror,
        M::Imul,
        M::Cmp,
        M::Test,
        M::Seto,
        M::Setno,
        M::Setb,
        M::Setae,
        M::Sete,
        M::Setne,
        M::Setbe,
        M::Seta,
        M::Sets,
        M::Setns,
        M::Setp,
        M::Setnp,
        M::Setl,
        M::Setge,
        M::Setle,
        M::Setg,
        M::Cmovo,
        M::Cmovno,
        M::Cmovb,
        M::Cmovae,
        M::Cmove,
        M::Cmovne,
        M::Cmovbe,
        M::Cmova,
        M::Cmovs,
        M::Cmovns,
        M::Cmovp,
        M::Cmovnp,
        M::Cmovl,
        M::Cmovge,
        M::Cmovle,
        M::Cmovg,
        M::Jo,
        M::Jno,
        M::Jb,
        M::Jae,
        M::Je,
        M::Jne,
        M::Jbe,
        M::Ja,
        M::Js,
        M::Jns,
        M::Jp,
        M::Jnp,
        M::Jl,
        M::Jge,
        M::Jle,
        M::Jg,
        M::Jmp,
        M::Call,
        M::Ret,
        M::Push,
        M::Pop,
        M::Nop,
        M::Endbr64,
    ]
}

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

impl<'a> Engine<'a> {
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

    // ----- emission -------------------------------------------------------

    fn emit(&mut self, ins: Instruction, orig: Addr, st: &mut AbsState) {
        let folded = st.folded();
        self.emit_folded(ins, orig, folded, st);
    }

    /// Emit with an explicit deopt state; update store-forwarding facts for
    /// what the instruction really writes.
    fn emit_folded(&mut self, ins: Instruction, orig: Addr, folded: KnownState, st: &mut AbsState) {
        let mut ins = ins;
        ins.set_ip(0);
        self.est_bytes += if ins.len() > 0 { ins.len() + 2 } else { 10 };
        if self.est_bytes > self.opts().max_code_bytes {
            self.budget_hit = true;
        }
        self.stats.residual += 1;
        self.items.push(Emitted {
            ins,
            orig,
            folded,
            is_data: false,
        });
        if st.facts.is_empty() {
            return;
        }
        // String instructions write a whole range iced reports as one element.
        if ins.has_rep_prefix() || ins.has_repne_prefix() {
            st.facts.clear();
            return;
        }
        let info = self.info.info(&ins);
        for u in info.used_registers() {
            if matches!(
                u.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            ) {
                if let Some(g) = Gpr::containing(u.register()) {
                    st.real_write(g);
                }
            }
        }
        let bit_test_reg = matches!(
            ins.mnemonic(),
            Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc
        ) && ins.op_count() == 2
            && ins.op1_kind() == OpKind::Register;
        let writes: Vec<Option<(Option<Gpr>, i64, u64)>> = info
            .used_memory()
            .iter()
            .filter(|m| {
                matches!(
                    m.access(),
                    OpAccess::Write
                        | OpAccess::CondWrite
                        | OpAccess::ReadWrite
                        | OpAccess::ReadCondWrite
                )
            })
            .map(|m| {
                // Writes whose extent iced does not give exactly are writes anywhere: bit tests with a register
                // offset (bit r of the string at m), xsave and friends (size 0), 32-bit addressing (a wrapped
                // address iced reports as a 64-bit base).
                let plain = m.index() == Register::None
                    && !matches!(m.segment(), Register::FS | Register::GS)
                    && m.base() != Register::RIP
                    && m.memory_size().size() > 0
                    && !(bit_test_reg && m.access() != OpAccess::Read);
                let base = match m.base() {
                    Register::None => None,
                    b if b.is_gpr64() => Some(Gpr::containing(b)?),
                    _ => return None,
                };
                plain.then(|| (base, m.displacement() as i64, m.memory_size().size() as u64))
            })
            .collect();
        for w in writes {
            st.mem_write(w);
        }
        // Control transfers to unknown code (calls, returns, interrupts)
        // may write anything.
        if !matches!(
            ins.flow_control(),
            FlowControl::Next | FlowControl::UnconditionalBranch | FlowControl::ConditionalBranch
        ) {
            st.facts.clear();
        }
    }

    fn mov_imm(g: Gpr, v: u64) -> Instruction {
        let r = g.to_iced();
        let res = if v <= u32::MAX as u64 {
            let r32 = gpr32(g);
            Instruction::with2(Code::Mov_r32_imm32, r32, v as u32)
        } else if fits_i32(v as i64) {
            Instruction::with2(Code::Mov_rm64_imm32, r, v as i64 as i32)
        } else {
            Instruction::with2(Code::Mov_r64_imm64, r, v)
        };
        // The operands above always match their codes.
        res.unwrap_or_default()
    }

    fn mat_reg(&mut self, g: Gpr, orig: Addr, st: &mut AbsState) {
        if let Some(v) = st.get(g) {
            if !st.is_mat(g) {
                self.emit(Self::mov_imm(g, v), orig, st);
                st.set(g, Some(v), true);
            }
        }
    }

    fn mat_all_regs(&mut self, orig: Addr, st: &mut AbsState) {
        for g in Gpr::ALL {
            self.mat_reg(g, orig, st);
        }
    }

    fn data_label(&mut self, b: u8) -> u32 {
        if let Some(&l) = self.data_labels.get(&b) {
            return l;
        }
        let l = self.new_label();
        self.data_labels.insert(b, l);
        l
    }

    /// Make the real flags hold every known folded status flag in `live`.
    fn mat_flags(
        &mut self,
        live: u8,
        orig: Addr,
        st: &mut AbsState,
    ) -> Result<(), SpecializeError> {
        if st.fmat {
            return Ok(());
        }
        let mut want = [None; 7];
        let mut any = false;
        for f in STATUS_FLAGS {
            if live & (1 << f as u8) != 0 {
                want[f as usize] = st.flags[f as usize];
                any |= want[f as usize].is_some();
            }
        }
        if any {
            // One `cmp byte [data], imm8` when it can produce the flags, else
            // a compare for the other five followed by `stc`/`clc` for CF.
            let (pair, fix_cf) = match cmp_for(&want) {
                Some(p) => (p, None),
                None => {
                    let mut no_cf = want;
                    no_cf[Flag::Cf as usize] = None;
                    let p = cmp_for(&no_cf).ok_or_else(|| {
                        SpecializeError::NoGain(format!(
                            "cannot rebuild the folded flags at {orig}"
                        ))
                    })?;
                    (p, want[Flag::Cf as usize])
                }
            };
            let (a, b) = pair;
            let l = self.data_label(a);
            let mem =
                iced_x86::MemoryOperand::with_base_displ(Register::RIP, Self::label_ip(l) as i64);
            let ins = Instruction::with2(Code::Cmp_rm8_imm8, mem, b as u32)
                .map_err(|e| SpecializeError::Encode(e.to_string()))?;
            self.emit(ins, orig, st);
            if let Some(cf) = fix_cf {
                let code = if cf { Code::Stc } else { Code::Clc };
                self.emit(Instruction::with(code), orig, st);
            }
        }
        // Only what was wanted is known now; the rest holds whatever the
        // compare left, which the abstract state does not claim.
        for fl in STATUS_FLAGS {
            st.flags[fl as usize] = want[fl as usize];
        }
        st.fmat = true;
        Ok(())
    }

    fn jump_label(&mut self, l: u32, orig: Addr, st: &mut AbsState) {
        let ins =
            Instruction::with_branch(Code::Jmp_rel32_64, Self::label_ip(l)).unwrap_or_default();
        self.emit(ins, orig, st);
    }

    /// The label for (addr, state), queueing it for emission when new.
    /// Branch targets carry no store-forwarding facts (a taken branch may be
    /// a loop's back edge; see `link_target`): facts live only along the
    /// path being walked, and paths that join share the code after the join.
    fn label_for(&mut self, addr: Addr, st: &AbsState) -> u32 {
        let mut st = st.clone();
        st.facts.clear();
        self.canonicalize(addr, &mut st);
        if let Some(l) = self.link_target(addr, &mut st) {
            return l;
        }
        let l = self.new_label();
        self.remember(addr, &st, l, true);
        self.pending.push_back((l, addr, st));
        l
    }

    /// Record the label of (addr, st); `replace`: over an earlier one.
    fn remember(&mut self, addr: Addr, st: &AbsState, l: u32, replace: bool) {
        if replace {
            self.key_label.insert((addr, st.clone()), l);
        } else {
            self.key_label.entry((addr, st.clone())).or_insert(l);
        }
        if !st.facts.is_empty() {
            let mut bare = st.clone();
            bare.facts.clear();
            *self.fact_copies.entry((addr, bare)).or_default() += 1;
        }
    }

    /// The label to link to for (addr, st), if any.
    ///
    /// Store-forwarding facts never survive a loop of the variant: a link
    /// into code already emitted may close a loop, so such a link drops the
    /// facts and targets the fact-free state (forgetting is always correct:
    /// the real memory is unchanged). Every iteration therefore re-reads
    /// memory at least once, and a flag written by a signal handler or
    /// another thread is seen. A state whose fact-free twin already exists
    /// with [`MAX_FACT_COPIES`] fact-carrying copies links to the twin too,
    /// so facts cannot multiply the code.
    fn link_target(&mut self, addr: Addr, st: &mut AbsState) -> Option<u32> {
        if let Some(&l) = self.key_label.get(&(addr, st.clone())) {
            let placed = self.labels.get(l as usize).copied().flatten().is_some();
            if st.facts.is_empty() || !placed {
                return Some(l);
            }
        }
        if st.facts.is_empty() {
            return None;
        }
        let mut bare = st.clone();
        bare.facts.clear();
        let copies = self
            .fact_copies
            .get(&(addr, bare.clone()))
            .copied()
            .unwrap_or(0);
        let l = self.key_label.get(&(addr, bare)).copied();
        if l.is_some() && copies >= MAX_FACT_COPIES {
            st.facts.clear();
            return l;
        }
        // Back edge into placed code with facts: continue fact-free.
        if self.key_label.contains_key(&(addr, st.clone())) {
            st.facts.clear();
            return l;
        }
        None
    }

    fn exit(
        &mut self,
        target: Addr,
        reason: ExitReason,
        st: &mut AbsState,
    ) -> Result<(), SpecializeError> {
        let first = self.items.len();
        let live = self.live_flags(target);
        self.mat_flags(live, target, st)?;
        self.mat_all_regs(target, st);
        let dest = self
            .opts()
            .chain
            .as_ref()
            .and_then(|c| c.get(&target).copied())
            .unwrap_or(target);
        let ins = Instruction::with_branch(Code::Jmp_rel32_64, dest.0)
            .map_err(|e| SpecializeError::Encode(e.to_string()))?;
        self.emit(ins, target, st);
        self.exits.push(Exit {
            target,
            reason,
            state: st.known(),
        });
        self.exit_items.push(first);
        Ok(())
    }

    // ----- liveness -------------------------------------------------------

    /// Status flags that may be read on some path from `addr` before being
    /// written (conservative: unknown control flow means live).
    fn live_flags(&mut self, addr: Addr) -> u8 {
        if let Some(&m) = self.live_cache.get(&addr) {
            return m;
        }
        let mut live = 0u8;
        let mut work = vec![(addr, STATUS)];
        let mut seen: HashMap<Addr, u8> = HashMap::new();
        let mut steps = 0;
        while let Some((a, mut pending)) = work.pop() {
            let mut a = a;
            loop {
                if pending == 0 {
                    break;
                }
                let prev = seen.get(&a).copied().unwrap_or(0);
                if pending & !prev == 0 {
                    break;
                }
                seen.insert(a, prev | pending);
                steps += 1;
                if steps > 400 {
                    live |= pending;
                    break;
                }
                let Some(ins) = self.decode(a) else {
                    live |= pending;
                    break;
                };
                live |= flag_mask(ins.rflags_read()) & pending;
                if !conditional_flag_write(&ins) {
                    pending &= !written_flags(&ins);
                }
                if pending == 0 {
                    break;
                }
                match ins.flow_control() {
                    FlowControl::Next => a = Addr(ins.next_ip()),
                    FlowControl::UnconditionalBranch if ins.op0_kind() == OpKind::NearBranch64 => {
                        a = Addr(ins.near_branch_target())
                    }
                    FlowControl::ConditionalBranch if ins.op0_kind() == OpKind::NearBranch64 => {
                        work.push((Addr(ins.near_branch_target()), pending));
                        a = Addr(ins.next_ip());
                    }
                    _ => {
                        live |= pending;
                        break;
                    }
                }
            }
        }
        self.live_cache.insert(addr, live);
        live
    }

    /// Drop flags that are dead at `addr` so equivalent states compare equal.
    fn canonicalize(&mut self, addr: Addr, st: &mut AbsState) {
        let live = self.live_flags(addr);
        for f in STATUS_FLAGS {
            if live & (1 << f as u8) == 0 {
                st.flags[f as usize] = None;
            }
        }
        st.normalize();
    }

    // ----- the walk -------------------------------------------------------

    fn walk(&mut self, label: u32, addr: Addr, st: AbsState) -> Result<(), SpecializeError> {
        self.place(label);
        let mut ip = addr;
        let mut st = st;
        let mut first = true;
        loop {
            if !self.in_region(ip) {
                return self.exit(ip, ExitReason::LeftRegion, &mut st);
            }
            self.canonicalize(ip, &mut st);
            if !first {
                if let Some(l) = self.link_target(ip, &mut st) {
                    self.jump_label(l, ip, &mut st);
                    return Ok(());
                }
            }
            if self.budget_hit {
                return self.exit(ip, ExitReason::Budget, &mut st);
            }
            if !first {
                self.widen(ip, &mut st)?;
                if let Some(l) = self.link_target(ip, &mut st) {
                    self.jump_label(l, ip, &mut st);
                    return Ok(());
                }
                let l = self.new_label();
                self.place(l);
                self.remember(ip, &st, l, true);
            } else {
                self.remember(ip, &st, label, false);
            }
            let seen = self.seen_at.entry(ip).or_default();
            seen.count += 1;
            for i in 0..16 {
                seen.values[i].insert(st.regs[i]);
            }
            seen.flags.insert((st.flags, st.fmat));
            first = false;
            // Stop before an instruction that would not fit the budget.
            if let Some(ins) = self.decode(ip) {
                if self.est_bytes + ins.len() > self.opts().max_code_bytes {
                    self.budget_hit = true;
                    return self.exit(ip, ExitReason::Budget, &mut st);
                }
            }
            self.stats.visited += 1;
            // Bound the work even when nothing is emitted (fully folded loops).
            if self.stats.visited > 100_000 + 4 * self.opts().max_code_bytes {
                self.budget_hit = true;
            }
            match self.step(ip, &mut st)? {
                Next::Continue(n) => ip = n,
                Next::Stop => return Ok(()),
            }
        }
    }

    /// After too many distinct states at `ip`, forget what differs.
    ///
    /// Registers that served as the address of a folded constant load (an
    /// interpreter's pc, a table index) are what makes specialization pay;
    /// they are kept up to a much higher bound, so a bytecode program
    /// unrolls while a plain loop counter is widened after a few states.
    /// The code budget and the visit limit bound the rest.
    fn widen(&mut self, ip: Addr, st: &mut AbsState) -> Result<(), SpecializeError> {
        let max = self.opts().max_states_per_address.max(1) as usize;
        let hard = max.saturating_mul(32).max(1024);
        let Some(seen) = self.seen_at.get(&ip) else {
            return Ok(());
        };
        if seen.count < max {
            return Ok(());
        }
        let flags_differ = seen.flags.len() > 1 || !seen.flags.contains(&(st.flags, st.fmat));
        let below_hard = seen.count < hard;
        let mut widen_regs = 0u16;
        for g in Gpr::ALL {
            let i = g.index();
            let distinct =
                seen.values[i].len() + usize::from(!seen.values[i].contains(&st.regs[i]));
            if distinct <= 1 {
                continue;
            }
            // Below the hard bound keep registers that address constant
            // loads and registers that only took a few distinct values
            // (they cannot drive an unbounded unrolling on their own).
            // A pointer into constant memory (a bytecode pc, its successor,
            // a table) is what specialization feeds on; keep it too.
            let points_to_constant =
                st.regs[i].is_some_and(|v| self.mem.is_constant(Addr(v).page()));
            let is_static =
                self.static_regs & (1 << i) != 0 || points_to_constant || st.stat & (1 << i) != 0;
            if below_hard && (is_static || distinct <= max) {
                continue;
            }
            widen_regs |= 1 << i;
        }
        for g in Gpr::ALL {
            if widen_regs & (1 << g.index()) != 0 {
                self.mat_reg(g, ip, st);
                st.set(g, None, false);
            }
        }
        if !below_hard {
            st.facts.clear();
        }
        // Flags take finitely many values; widen them only at the hard bound.
        if !below_hard && flags_differ {
            let live = self.live_flags(ip);
            self.mat_flags(live, ip, st)?;
            for f in STATUS_FLAGS {
                st.flags[f as usize] = None;
            }
        }
        st.normalize();
        Ok(())
    }

    // ----- operand access ------------------------------------------------

    fn reg_val(st: &AbsState, r: Register) -> Option<u64> {
        let g = Gpr::containing(r)?;
        let v = st.get(g)?;
        Some(match r.size() {
            8 => v,
            4 => v & 0xffff_ffff,
            2 => v & 0xffff,
            _ if is_high8(r) => (v >> 8) & 0xff,
            _ => v & 0xff,
        })
    }

    /// Whether writing `r` with a known value keeps the full register known.
    fn write_known_possible(st: &AbsState, r: Register) -> bool {
        r.size() >= 4 || Gpr::containing(r).and_then(|g| st.get(g)).is_some()
    }

    fn write_reg(st: &mut AbsState, r: Register, v: Option<u64>, mat: bool) {
        let Some(g) = Gpr::containing(r) else { return };
        let full = match (v, r.size()) {
            (None, _) => None,
            (Some(v), 8) => Some(v),
            (Some(v), 4) => Some(v & 0xffff_ffff),
            (Some(v), 2) => st.get(g).map(|o| (o & !0xffff) | (v & 0xffff)),
            (Some(v), _) if is_high8(r) => st.get(g).map(|o| (o & !0xff00) | ((v & 0xff) << 8)),
            (Some(v), _) => st.get(g).map(|o| (o & !0xff) | (v & 0xff)),
        };
        st.set(g, full, mat);
    }

    /// Effective address of the memory operand when every part is known.
    fn mem_addr(st: &AbsState, ins: &Instruction) -> Option<u64> {
        if matches!(ins.memory_segment(), Register::FS | Register::GS) {
            return None;
        }
        let base = ins.memory_base();
        if base == Register::RIP {
            return Some(ins.ip_rel_memory_address());
        }
        let mut a = ins.memory_displacement64();
        let mut addr32 = false;
        if base != Register::None {
            if base.size() != 8 {
                addr32 = true;
            }
            a = a.wrapping_add(Self::reg_val(st, base)?);
        }
        let index = ins.memory_index();
        if index != Register::None {
            if !index.is_gpr() {
                return None;
            }
            if index.size() != 8 {
                addr32 = true;
            }
            a = a.wrapping_add(
                Self::reg_val(st, index)?.wrapping_mul(ins.memory_index_scale() as u64),
            );
        }
        Some(if addr32 { a & 0xffff_ffff } else { a })
    }

    /// Read `size` bytes at `a` when every byte lies in constant pages.
    fn load(&mut self, a: u64, size: usize) -> Option<u64> {
        if size == 0 || size > 8 {
            return None;
        }
        let end = a.checked_add(size as u64 - 1)?;
        let mut p = Addr(a).page();
        let mut pages = Vec::new();
        while p.0 <= end {
            if !self.mem.is_constant(p) {
                return None;
            }
            pages.push(p);
            p = Addr(p.0.checked_add(PAGE_SIZE)?);
        }
        let mut buf = [0u8; 8];
        self.mem.read(Addr(a), &mut buf[..size]).ok()?;
        self.guard.extend(pages);
        Some(u64::from_le_bytes(buf))
    }

    /// Value of operand `i` (`bits` wide) if known.
    fn op_val(&mut self, st: &AbsState, ins: &Instruction, i: u32, bits: u32) -> Option<u64> {
        let v = match ins.op_kind(i) {
            OpKind::Register => Self::reg_val(st, ins.op_register(i))?,
            OpKind::Memory => {
                let a = Self::mem_addr(st, ins)?;
                let v = self.load(a, ins.memory_size().size())?;
                for r in [ins.memory_base(), ins.memory_index()] {
                    if let Some(g) = Gpr::containing(r) {
                        self.static_regs |= 1 << g.index();
                    }
                }
                v
            }
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => ins.immediate(i),
            _ => return None,
        };
        Some(v & sem::mask(bits))
    }

    /// Operand width in bits of operand `i`.
    fn op_bits(ins: &Instruction, i: u32) -> u32 {
        match ins.op_kind(i) {
            OpKind::Register => ins.op_register(i).size() as u32 * 8,
            OpKind::Memory => ins.memory_size().size() as u32 * 8,
            _ => 64,
        }
    }

    /// Plain integer operands only (GPRs, memory without vsib, immediates).
    fn plain(ins: &Instruction) -> bool {
        (0..ins.op_count()).all(|i| match ins.op_kind(i) {
            OpKind::Register => ins.op_register(i).is_gpr(),
            OpKind::Memory => {
                !ins.memory_index().is_vector_register()
                    && (ins.mnemonic() == Mnemonic::Lea
                        || matches!(ins.memory_size().size(), 1 | 2 | 4 | 8))
            }
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate64
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32
            | OpKind::Immediate8to64
            | OpKind::Immediate32to64 => true,
            _ => false,
        }) && !ins.has_lock_prefix()
    }

    // ----- residual emission --------------------------------------------

    /// Rewrite known address parts and known register sources into
    /// displacements and immediates where encodable.
    fn rewrite(st: &AbsState, ins: &Instruction) -> Instruction {
        use Mnemonic as M;
        let mut out = *ins;
        let has_mem = (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Memory);
        let mnem = ins.mnemonic();
        if has_mem
            && !matches!(mnem, M::Bndldx | M::Bndstx)
            && !ins.memory_index().is_vector_register()
            && ins.memory_base() != Register::RIP
        {
            let base = ins.memory_base();
            let index = ins.memory_index();
            let ok64 = |r: Register| r == Register::None || (r.is_gpr() && r.size() == 8);
            if ok64(base) && ok64(index) {
                let bv = if base != Register::None {
                    Self::reg_val(st, base)
                } else {
                    None
                };
                let iv = if index != Register::None {
                    Self::reg_val(st, index)
                } else {
                    None
                };
                let disp = ins.memory_displacement64() as i64;
                let scale = ins.memory_index_scale() as i64;
                let tries: [(bool, bool); 3] = [(true, true), (false, true), (true, false)];
                for (fb, fi) in tries {
                    let fold_b = fb && bv.is_some();
                    let fold_i = fi && iv.is_some();
                    if !fold_b && !fold_i {
                        continue;
                    }
                    let mut d = disp;
                    if fold_b {
                        d = d.wrapping_add(bv.unwrap_or(0) as i64);
                    }
                    if fold_i {
                        d = d.wrapping_add((iv.unwrap_or(0) as i64).wrapping_mul(scale));
                    }
                    if !fits_i32(d) {
                        continue;
                    }
                    let nb = if fold_b { Register::None } else { base };
                    let ni = if fold_i { Register::None } else { index };
                    // rsp cannot be an index; fold only into valid forms.
                    out.set_memory_base(nb);
                    out.set_memory_index(ni);
                    if ni == Register::None {
                        out.set_memory_index_scale(1);
                    }
                    out.set_memory_displacement64(d as u64);
                    // iced: 8 means a 32-bit displacement with 64-bit
                    // addressing; 0 is only valid for a zero displacement.
                    out.set_memory_displ_size(if nb == Register::None {
                        8
                    } else if d == 0 {
                        0
                    } else if d as i8 as i64 == d {
                        1
                    } else {
                        8
                    });
                    break;
                }
            }
        }
        // Register source -> immediate.
        if ins.op_count() == 2 && ins.op_kind(1) == OpKind::Register && ins.op_register(1).is_gpr()
        {
            let src = ins.op_register(1);
            if let Some(v) = Self::reg_val(st, src) {
                let bits = src.size() as u32 * 8;
                let dst_is_reg = ins.op_kind(0) == OpKind::Register;
                let code = match (mnem, src.size()) {
                    (M::Add, 1) => Some(Code::Add_rm8_imm8),
                    (M::Add, 2) => Some(Code::Add_rm16_imm16),
                    (M::Add, 4) => Some(Code::Add_rm32_imm32),
                    (M::Add, 8) => Some(Code::Add_rm64_imm32),
                    (M::Sub, 1) => Some(Code::Sub_rm8_imm8),
                    (M::Sub, 2) => Some(Code::Sub_rm16_imm16),
                    (M::Sub, 4) => Some(Code::Sub_rm32_imm32),
                    (M::Sub, 8) => Some(Code::Sub_rm64_imm32),
                    (M::And, 1) => Some(Code::And_rm8_imm8),
                    (M::And, 2) => Some(Code::And_rm16_imm16),
                    (M::And, 4) => Some(Code::And_rm32_imm32),
                    (M::And, 8) => Some(Code::And_rm64_imm32),
                    (M::Or, 1) => Some(Code::Or_rm8_imm8),
                    (M::Or, 2) => Some(Code::Or_rm16_imm16),
                    (M::Or, 4) => Some(Code::Or_rm32_imm32),
                    (M::Or, 8) => Some(Code::Or_rm64_imm32),
                    (M::Xor, 1) => Some(Code::Xor_rm8_imm8),
                    (M::Xor, 2) => Some(Code::Xor_rm16_imm16),
                    (M::Xor, 4) => Some(Code::Xor_rm32_imm32),
                    (M::Xor, 8) => Some(Code::Xor_rm64_imm32),
                    (M::Adc, 1) => Some(Code::Adc_rm8_imm8),
                    (M::Adc, 2) => Some(Code::Adc_rm16_imm16),
                    (M::Adc, 4) => Some(Code::Adc_rm32_imm32),
                    (M::Adc, 8) => Some(Code::Adc_rm64_imm32),
                    (M::Sbb, 1) => Some(Code::Sbb_rm8_imm8),
                    (M::Sbb, 2) => Some(Code::Sbb_rm16_imm16),
                    (M::Sbb, 4) => Some(Code::Sbb_rm32_imm32),
                    (M::Sbb, 8) => Some(Code::Sbb_rm64_imm32),
                    (M::Cmp, 1) => Some(Code::Cmp_rm8_imm8),
                    (M::Cmp, 2) => Some(Code::Cmp_rm16_imm16),
                    (M::Cmp, 4) => Some(Code::Cmp_rm32_imm32),
                    (M::Cmp, 8) => Some(Code::Cmp_rm64_imm32),
                    (M::Test, 1) => Some(Code::Test_rm8_imm8),
                    (M::Test, 2) => Some(Code::Test_rm16_imm16),
                    (M::Test, 4) => Some(Code::Test_rm32_imm32),
                    (M::Test, 8) => Some(Code::Test_rm64_imm32),
                    (M::Mov, 1) if dst_is_reg => Some(Code::Mov_r8_imm8),
                    (M::Mov, 2) if dst_is_reg => Some(Code::Mov_r16_imm16),
                    (M::Mov, 4) if dst_is_reg => Some(Code::Mov_r32_imm32),
                    (M::Mov, 8) if dst_is_reg => Some(Code::Mov_r64_imm64),
                    (M::Mov, 1) => Some(Code::Mov_rm8_imm8),
                    (M::Mov, 2) => Some(Code::Mov_rm16_imm16),
                    (M::Mov, 4) => Some(Code::Mov_rm32_imm32),
                    (M::Mov, 8) => Some(Code::Mov_rm64_imm32),
                    _ => None,
                };
                // `test r/m, r` is symmetric in iced's operand order; the
                // destination being a high-byte register with REX is not an issue
                // for imm forms. imm32 forms of 64-bit ops sign-extend.
                if let Some(code) = code {
                    let kind = match bits {
                        8 => Some(OpKind::Immediate8),
                        16 => Some(OpKind::Immediate16),
                        32 => Some(OpKind::Immediate32),
                        _ if code == Code::Mov_r64_imm64 => Some(OpKind::Immediate64),
                        _ if fits_i32(v as i64) => Some(OpKind::Immediate32to64),
                        _ => None,
                    };
                    // A memory destination must not use a register we are
                    // replacing (it stays as is; only op1 changes).
                    if let Some(kind) = kind {
                        let mut n = out;
                        n.set_code(code);
                        n.set_op1_kind(kind);
                        match kind {
                            OpKind::Immediate8 => n.set_immediate8(v as u8),
                            OpKind::Immediate16 => n.set_immediate16(v as u16),
                            OpKind::Immediate32 => n.set_immediate32(v as u32),
                            OpKind::Immediate64 => n.set_immediate64(v),
                            _ => n.set_immediate32to64(v as i64),
                        }
                        out = n;
                    }
                }
            }
        }
        if mnem == M::Push && ins.op_count() == 1 && ins.op_kind(0) == OpKind::Register {
            let r = ins.op_register(0);
            if r.size() == 8 {
                if let Some(v) = Self::reg_val(st, r) {
                    if fits_i32(v as i64) {
                        if let Ok(n) = Instruction::with1(Code::Pushq_imm32, v as i64 as i32) {
                            out = n;
                        }
                    }
                }
            }
        }
        out
    }

    /// Emit `ins` (rewritten) as residual code: materialize what it reads,
    /// then forget what it writes.
    fn residual(
        &mut self,
        ip: Addr,
        ins: &Instruction,
        st: &mut AbsState,
    ) -> Result<(), SpecializeError> {
        let out = Self::rewrite(st, ins);
        if self.forward(ip, &out, st)? {
            return Ok(());
        }
        self.residual_exact(ip, &out, st)?;
        self.record_facts(ip, &out, st);
        Ok(())
    }

    /// The plain `[base + disp]` (or absolute `[disp]`, base `None`) qword operand of `out`, if any:
    /// (operand index, base, disp).
    fn plain_qword_mem(st: &AbsState, out: &Instruction) -> Option<(u32, Option<Gpr>, i64)> {
        let mi = (0..out.op_count()).find(|&i| out.op_kind(i) == OpKind::Memory)?;
        if out.memory_size().size() != 8
            || out.memory_index() != Register::None
            || matches!(out.memory_segment(), Register::FS | Register::GS)
        {
            return None;
        }
        let base = match out.memory_base() {
            Register::None => None,
            b if b.is_gpr64() => {
                let g = Gpr::containing(b)?;
                if !st.is_real(g) {
                    return None;
                }
                Some(g)
            }
            _ => return None,
        };
        Some((mi, base, out.memory_displacement64() as i64))
    }

    /// Use a register that holds a loaded or stored qword instead of
    /// reloading it from memory.
    fn forward(
        &mut self,
        ip: Addr,
        out: &Instruction,
        st: &mut AbsState,
    ) -> Result<bool, SpecializeError> {
        use Mnemonic as M;
        if st.facts.is_empty()
            || out.has_lock_prefix()
            || out.has_rep_prefix()
            || out.has_repne_prefix()
        {
            return Ok(false);
        }
        let Some((mi, base, disp)) = Self::plain_qword_mem(st, out) else {
            return Ok(false);
        };
        if !self.forwardable(st, base, disp) {
            return Ok(false);
        }
        let holders: Vec<Gpr> = st
            .facts
            .iter()
            .filter(|f| f.0 == base && f.1 == disp)
            .map(|f| f.2)
            .collect();
        if holders.is_empty() {
            return Ok(false);
        }
        let real_r = holders.iter().copied().find(|g| st.is_real(*g));
        let read_only = self
            .info
            .info(out)
            .used_memory()
            .iter()
            .all(|m| m.access() == OpAccess::Read);
        if !read_only {
            return Ok(false);
        }
        let err = |e: iced_x86::IcedError| SpecializeError::Encode(e.to_string());
        let mnem = out.mnemonic();
        let x = if out.op_count() >= 1 && out.op_kind(0) == OpKind::Register {
            Gpr::containing(out.op_register(0)).filter(|_| out.op_register(0).is_gpr64())
        } else {
            None
        };
        // mov x, [m]  ->  nothing (x really holds it already), or mov x, r
        if out.code() == Code::Mov_r64_rm64 && mi == 1 {
            let Some(x) = x else { return Ok(false) };
            if holders.contains(&x) {
                // A folded value in x is replaced by what x really holds.
                st.set(x, None, false);
                st.normalize();
                self.stats.folded += 1;
                return Ok(true);
            }
            // Copy from a holder; a folded holder's real content is the
            // memory value, so read it without materializing.
            let r = real_r.unwrap_or(holders[0]);
            let n =
                Instruction::with2(Code::Mov_r64_rm64, x.to_iced(), r.to_iced()).map_err(err)?;
            self.emit(n, ip, st);
            st.set(x, None, false);
            // `mov x, [x + d]` changes the base: x holds the old slot's value, not the new one's.
            if Some(x) != base {
                st.facts.push((base, disp, x));
            }
            st.normalize();
            return Ok(true);
        }
        // op x, [m] with x folded to v: the memory value is in a register, so
        // compute `op mem, v` into x (add/and/or/xor/imul are commutative,
        // flags included).
        if let (Some(x), true, 1) = (x, out.op_count() == 2, mi) {
            let code = match mnem {
                M::Add => Some(Code::Add_rm64_imm32),
                M::And => Some(Code::And_rm64_imm32),
                M::Or => Some(Code::Or_rm64_imm32),
                M::Xor => Some(Code::Xor_rm64_imm32),
                M::Imul => Some(Code::Imul_r64_rm64_imm32),
                _ => None,
            };
            let v = st.get(x).filter(|_| !st.is_mat(x));
            let src = if holders.contains(&x) {
                Some(x)
            } else {
                Some(real_r.unwrap_or(holders[0]))
            };
            if let (Some(code), Some(v), Some(r)) = (code, v, src) {
                if fits_i32(v as i64) {
                    if !st.fmat {
                        let live = self.live_flags(ip) | flag_mask(out.rflags_read());
                        self.mat_flags(live, ip, st)?;
                    }
                    let folded = st.folded();
                    let n = if mnem == M::Imul {
                        Instruction::with3(code, x.to_iced(), r.to_iced(), v as i64 as i32)
                            .map_err(err)?
                    } else {
                        if r != x {
                            let m =
                                Instruction::with2(Code::Mov_r64_rm64, x.to_iced(), r.to_iced())
                                    .map_err(err)?;
                            self.emit_folded(m, ip, folded.clone(), st);
                        }
                        Instruction::with2(code, x.to_iced(), v as i64 as i32).map_err(err)?
                    };
                    // The real x now holds the memory value (or is about to).
                    st.set(x, None, false);
                    self.residual_exact_with(ip, &n, st, Some(folded), Some(r))?;
                    return Ok(true);
                }
            }
        }
        // Any other read of [m] whose operand also accepts a register, from
        // a holder the instruction does not otherwise mention.
        let mentioned: Vec<Gpr> = self
            .info
            .info(out)
            .used_registers()
            .iter()
            .filter_map(|u| Gpr::containing(u.register()))
            .collect();
        let r = real_r
            .filter(|r| !mentioned.contains(r))
            .or_else(|| holders.iter().copied().find(|r| !mentioned.contains(r)));
        // Bit tests with a register offset address memory beyond the qword (`bt [m], r` reads bit r of the
        // string at m, `bt reg, r` bit r mod 64): their register form means something else.
        let bit_test = matches!(mnem, M::Bt | M::Bts | M::Btr | M::Btc);
        if let (Some(r), false) = (r, bit_test) {
            if out.op_code().op_kind(mi) == iced_x86::OpCodeOperandKind::r64_or_mem {
                let mut n = *out;
                n.set_op_kind(mi, OpKind::Register);
                n.set_op_register(mi, r.to_iced());
                self.residual_exact_with(ip, &n, st, None, Some(r))?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// After a residual qword load or store, remember which register holds
    /// the memory value; stores also keep a copy in a free scratch register.
    fn record_facts(&mut self, ip: Addr, out: &Instruction, st: &mut AbsState) {
        if !self.opts().forward_stores {
            return;
        }
        let Some((mi, base, disp)) = Self::plain_qword_mem(st, out) else {
            return;
        };
        if !self.forwardable(st, base, disp) {
            return;
        }
        match out.code() {
            Code::Mov_rm64_r64 if mi == 0 => {
                let Some(r) = Gpr::containing(out.op_register(1)) else {
                    return;
                };
                if !st.is_real(r) {
                    return;
                }
                st.facts.push((base, disp, r));
                let avoid: Vec<Gpr> = base.into_iter().chain([r]).collect();
                // The copy runs after the store: a thread stopped at it continues after the store in the
                // original code (resuming at the store would write the slot again, over what a signal handler
                // may have written meanwhile).
                let after = self.decode(ip).map(|i| Addr(i.next_ip()));
                if let (Some(f), Some(after)) = (self.next_scratch(&avoid, st), after) {
                    if let Ok(m) = Instruction::with2(Code::Mov_r64_rm64, f.to_iced(), r.to_iced())
                    {
                        // f stays known-unmaterialized: its real content is free.
                        self.emit(m, after, st);
                        st.facts.push((base, disp, f));
                    }
                }
            }
            Code::Mov_r64_rm64 if mi == 1 => {
                let Some(x) = Gpr::containing(out.op_register(0)) else {
                    return;
                };
                if Some(x) != base {
                    st.facts.push((base, disp, x));
                }
            }
            _ => {}
        }
        st.normalize();
    }

    /// Whether the qword at `[base + disp]` may be forwarded (`Options::forward_within`).
    fn forwardable(&self, st: &AbsState, base: Option<Gpr>, disp: i64) -> bool {
        let Some(ranges) = &self.opts().forward_within else {
            return true;
        };
        let b = match base {
            None => 0,
            Some(Gpr::Rsp) => return true,
            Some(g) => match st.get(g) {
                Some(b) => b,
                None => return false,
            },
        };
        let a = b.wrapping_add(disp as u64);
        let Some(end) = a.checked_add(8) else {
            return false;
        };
        ranges.iter().any(|(s, e)| s.0 <= a && end <= e.0)
    }

    /// A register whose real content is dead: known but not materialized
    /// (the variant rewrites it before any real use, and the deopt map
    /// restores its folded value). Such a register may carry a copy of a
    /// stored value for later loads. Registers that cache nothing yet are
    /// preferred.
    fn next_scratch(&mut self, avoid: &[Gpr], st: &AbsState) -> Option<Gpr> {
        if !self.opts().scratch_registers {
            return None;
        }
        let cands: Vec<Gpr> = Gpr::ALL
            .into_iter()
            .filter(|g| {
                *g != Gpr::Rsp && !avoid.contains(g) && st.get(*g).is_some() && !st.is_mat(*g)
            })
            .collect();
        // The choice depends on the state only, so two walks through the
        // same code from the same state make the same facts and share code.
        // Prefer a register that holds no cached value, then one whose slot
        // another register also holds.
        let holds = |g: Gpr| st.facts.iter().find(|f| f.2 == g).map(|f| (f.0, f.1));
        cands
            .iter()
            .copied()
            .find(|g| holds(*g).is_none())
            .or_else(|| {
                cands.iter().copied().find(|g| {
                    let slot = holds(*g);
                    st.facts
                        .iter()
                        .any(|f| f.2 != *g && Some((f.0, f.1)) == slot)
                })
            })
            .or_else(|| cands.first().copied())
    }

    fn residual_exact(
        &mut self,
        ip: Addr,
        out: &Instruction,
        st: &mut AbsState,
    ) -> Result<(), SpecializeError> {
        self.residual_exact_with(ip, out, st, None, None)
    }

    fn residual_exact_with(
        &mut self,
        ip: Addr,
        out: &Instruction,
        st: &mut AbsState,
        folded: Option<KnownState>,
        keep: Option<Gpr>,
    ) -> Result<(), SpecializeError> {
        let reads_f = flag_mask(out.rflags_read());
        let writes_f = flag_mask(out.rflags_modified());
        if (reads_f | writes_f) & STATUS != 0 && !st.fmat {
            let live = self.live_flags(ip) | reads_f;
            self.mat_flags(live, ip, st)?;
        }
        let mut written: Vec<Gpr> = Vec::new();
        let used: Vec<(Register, OpAccess)> = self
            .info
            .info(out)
            .used_registers()
            .iter()
            .map(|u| (u.register(), u.access()))
            .collect();
        for (r, acc) in used {
            let Some(g) = Gpr::containing(r) else {
                continue;
            };
            let full_write = acc == OpAccess::Write && r.size() >= 4;
            // `keep` is read for the memory value it really holds.
            if !full_write
                && acc != OpAccess::None
                && acc != OpAccess::NoMemAccess
                && keep != Some(g)
            {
                self.mat_reg(g, ip, st);
            }
            if matches!(
                acc,
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            ) {
                written.push(g);
            }
        }
        match folded {
            Some(f) => self.emit_folded(*out, ip, f, st),
            None => self.emit(*out, ip, st),
        }
        for g in written {
            st.set(g, None, false);
        }
        if writes_f & STATUS != 0 {
            if !st.fmat {
                // Nothing folded was live here: the rest is don't-care.
                for f in STATUS_FLAGS {
                    st.flags[f as usize] = None;
                }
                st.fmat = true;
            }
            for f in Flag::ALL {
                if writes_f & (1 << f as u8) != 0 {
                    st.flags[f as usize] = None;
                }
            }
            let set = flag_mask(out.rflags_set());
            let clr = flag_mask(out.rflags_cleared());
            for f in Flag::ALL {
                if set & (1 << f as u8) != 0 {
                    st.flags[f as usize] = Some(true);
                }
                if clr & (1 << f as u8) != 0 {
                    st.flags[f as usize] = Some(false);
                }
            }
        } else if writes_f & (1 << Flag::Df as u8) != 0 {
            st.flags[Flag::Df as usize] = None;
            let set = flag_mask(out.rflags_set());
            let clr = flag_mask(out.rflags_cleared());
            if set & (1 << Flag::Df as u8) != 0 {
                st.flags[Flag::Df as usize] = Some(true);
            }
            if clr & (1 << Flag::Df as u8) != 0 {
                st.flags[Flag::Df as usize] = Some(false);
            }
        }
        st.normalize();
        Ok(())
    }

    /// Whether a folded instruction's result derives only from constant
    /// memory and static registers (see [`AbsState::stat`]).
    fn inputs_static(st: &AbsState, ins: &Instruction) -> bool {
        use Mnemonic as M;
        let mnem = ins.mnemonic();
        let reads_mem =
            mnem != M::Lea && (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Memory);
        if reads_mem {
            return true;
        }
        let write_only0 = matches!(mnem, M::Mov | M::Movzx | M::Movsx | M::Movsxd | M::Lea)
            || (mnem == M::Imul && ins.op_count() == 3);
        let mut regs: Vec<Register> = Vec::new();
        for i in 0..ins.op_count() {
            match ins.op_kind(i) {
                OpKind::Register if !(i == 0 && write_only0) => regs.push(ins.op_register(i)),
                OpKind::Memory => {
                    regs.push(ins.memory_base());
                    regs.push(ins.memory_index());
                }
                _ => {}
            }
        }
        if ins.op_count() == 2
            && ins.op_kind(0) == OpKind::Register
            && ins.op_kind(1) == OpKind::Register
            && ins.op_register(0) == ins.op_register(1)
            && matches!(mnem, M::Xor | M::Sub)
        {
            return false;
        }
        let gprs: Vec<Gpr> = regs.into_iter().filter_map(Gpr::containing).collect();
        !gprs.is_empty() && gprs.iter().all(|g| st.stat & (1 << g.index()) != 0)
    }

    /// Fold the instruction when everything is known and the result can be
    /// rebuilt later, else emit it residually and keep what is computable.
    #[allow(clippy::too_many_arguments)]
    fn conclude(
        &mut self,
        ip: Addr,
        ins: &Instruction,
        st: &mut AbsState,
        dests: &[(Register, Option<u64>)],
        dest_is_mem: bool,
        flags_out: Option<(Option<Flags>, u8)>,
    ) -> Result<(), SpecializeError> {
        let next = Addr(ins.next_ip());
        let mut fold = !dest_is_mem
            && dests
                .iter()
                .all(|(r, v)| v.is_some() && Self::write_known_possible(st, *r));
        if let Some((nf, written)) = flags_out {
            match nf {
                None => fold = false,
                Some(nf) if fold => {
                    let live = self.live_flags(next);
                    let preserved = STATUS & !written;
                    if st.fmat {
                        for f in STATUS_FLAGS {
                            let b = 1 << f as u8;
                            if preserved & b != 0 && live & b != 0 && st.flags[f as usize].is_none()
                            {
                                fold = false;
                            }
                        }
                    }
                    // A flag left undefined has a CPU-specific value we cannot
                    // rebuild: fold only if nothing can read it.
                    for f in STATUS_FLAGS {
                        let b = 1 << f as u8;
                        if written & b != 0 && live & b != 0 && nf[f as usize].is_none() {
                            fold = false;
                        }
                    }
                    let mut want = [None; 7];
                    for f in STATUS_FLAGS {
                        if live & (1 << f as u8) != 0 {
                            want[f as usize] = nf[f as usize];
                        }
                    }
                    if !flags_rebuildable(&want) {
                        fold = false;
                    }
                }
                _ => {}
            }
        }
        if fold {
            let stat = Self::inputs_static(st, ins);
            for (r, v) in dests {
                Self::write_reg(st, *r, *v, false);
                if stat {
                    if let Some(g) = Gpr::containing(*r) {
                        st.stat |= 1 << g.index();
                    }
                }
            }
            if let Some((Some(nf), _)) = flags_out {
                let old = st.flags;
                st.flags = nf;
                st.flags[Flag::Df as usize] = old[Flag::Df as usize];
                st.fmat = false;
            }
            self.stats.folded += 1;
            if (0..ins.op_count()).any(|i| ins.op_kind(i) == OpKind::Memory)
                && ins.mnemonic() != Mnemonic::Lea
            {
                self.stats.folded_loads += 1;
            }
            st.normalize();
            return Ok(());
        }
        // The residual instruction computes what we computed: keep it known
        // (merging sub-registers against the values before it runs).
        let mut after = st.clone();
        let mut full: Vec<(Gpr, Option<u64>)> = Vec::new();
        for (r, v) in dests {
            if v.is_some() && Self::write_known_possible(&after, *r) {
                Self::write_reg(&mut after, *r, *v, true);
                if let Some(g) = Gpr::containing(*r) {
                    full.push((g, after.get(g)));
                }
            }
        }
        self.residual(ip, ins, st)?;
        for (g, v) in full {
            st.set(g, v, true);
        }
        if let Some((Some(nf), written)) = flags_out {
            for f in STATUS_FLAGS {
                if written & (1 << f as u8) != 0 {
                    st.flags[f as usize] = nf[f as usize];
                }
            }
        }
        st.normalize();
        Ok(())
    }

    // ----- per-instruction semantics ------------------------------------

    fn step(&mut self, ip: Addr, st: &mut AbsState) -> Result<Next, SpecializeError> {
        use Mnemonic as M;
        let Some(ins) = self.decode(ip) else {
            self.exit(ip, ExitReason::Unsupported, st)?;
            return Ok(Next::Stop);
        };
        let next = Addr(ins.next_ip());
        let mnem = ins.mnemonic();
        let plain = Self::plain(&ins);
        match mnem {
            M::Nop | M::Endbr64 | M::Endbr32 => {
                self.stats.folded += 1;
            }
            M::Mov | M::Movzx | M::Movsx | M::Movsxd if plain => self.do_mov(ip, &ins, st)?,
            M::Lea if plain => {
                let r = ins.op_register(0);
                let bits = r.size() as u32 * 8;
                let v = Self::mem_addr(st, &ins).map(|a| a & sem::mask(bits));
                self.conclude(ip, &ins, st, &[(r, v)], false, None)?;
            }
            M::Add | M::Sub | M::Adc | M::Sbb | M::And | M::Or | M::Xor | M::Cmp | M::Test
                if plain =>
            {
                self.do_alu(ip, &ins, st)?
            }
            M::Not | M::Neg | M::Inc | M::Dec if plain => self.do_unary(ip, &ins, st)?,
            M::Shl | M::Sal | M::Shr | M::Sar | M::Rol | M::Ror if plain => {
                self.do_shift(ip, &ins, st)?
            }
            M::Imul if plain => self.do_imul(ip, &ins, st)?,
            m if is_setcc(m) && plain => self.do_setcc(ip, &ins, st)?,
            m if is_cmovcc(m) && plain => self.do_cmov(ip, &ins, st)?,
            _ if ins.is_jcc_short_or_near() => {
                let taken = Addr(ins.near_branch_target());
                match sem::condition(ins.condition_code(), &st.flags) {
                    Some(true) => {
                        self.stats.folded += 1;
                        self.stats.folded_branches += 1;
                        return Ok(Next::Continue(taken));
                    }
                    Some(false) => {
                        self.stats.folded += 1;
                        self.stats.folded_branches += 1;
                    }
                    None => {
                        let reads = flag_mask(ins.rflags_read());
                        if !st.fmat {
                            let live = self.live_flags(ip) | reads;
                            self.mat_flags(live, ip, st)?;
                        }
                        // Each edge knows the outcome of the condition.
                        let mut on_taken = st.clone();
                        refine_flags(ins.condition_code(), true, &mut on_taken);
                        let l = self.label_for(taken, &on_taken);
                        let mut j = ins;
                        j.set_near_branch64(Self::label_ip(l));
                        // Use the near form; the block encoder picks the shortest.
                        self.emit(j, ip, st);
                        refine_flags(ins.condition_code(), false, st);
                    }
                }
            }
            M::Jmp => match ins.op0_kind() {
                OpKind::NearBranch64 => {
                    self.stats.folded += 1;
                    return Ok(Next::Continue(Addr(ins.near_branch_target())));
                }
                OpKind::Register | OpKind::Memory if plain => {
                    let v = self.op_val(st, &ins, 0, 64);
                    if let Some(t) = v {
                        self.stats.folded += 1;
                        self.stats.folded_branches += 1;
                        return Ok(Next::Continue(Addr(t)));
                    }
                    self.exit(ip, ExitReason::UnknownTarget, st)?;
                    return Ok(Next::Stop);
                }
                _ => {
                    self.exit(ip, ExitReason::Unsupported, st)?;
                    return Ok(Next::Stop);
                }
            },
            M::Call => {
                let target = match ins.op0_kind() {
                    OpKind::NearBranch64 => Some(ins.near_branch_target()),
                    OpKind::Register | OpKind::Memory if plain => self.op_val(st, &ins, 0, 64),
                    _ => {
                        self.exit(ip, ExitReason::Unsupported, st)?;
                        return Ok(Next::Stop);
                    }
                };
                match target {
                    Some(t) => {
                        let live = self.live_flags(Addr(t));
                        self.mat_flags(live, ip, st)?;
                        self.mat_all_regs(ip, st);
                        let c = Instruction::with_branch(Code::Call_rel32_64, t)
                            .map_err(|e| SpecializeError::Encode(e.to_string()))?;
                        self.emit(c, ip, st);
                    }
                    None => {
                        self.mat_flags(STATUS, ip, st)?;
                        self.mat_all_regs(ip, st);
                        let out = Self::rewrite(st, &ins);
                        self.emit(out, ip, st);
                    }
                }
                // Do not trust the ABI: the callee may change anything.
                st.all_unknown();
            }
            M::Ret => {
                self.mat_flags(STATUS, ip, st)?;
                self.mat_all_regs(ip, st);
                self.emit(ins, ip, st);
                return Ok(Next::Stop);
            }
            M::Push | M::Pop if plain => {
                // Stack writes are never folded; rsp itself is tracked when known.
                let rsp = st.get(Gpr::Rsp);
                let bytes = if ins.op_count() == 1 && ins.op_kind(0) == OpKind::Register {
                    ins.op_register(0).size() as u64
                } else if ins.op_count() == 1 && ins.op_kind(0) == OpKind::Memory {
                    ins.memory_size().size() as u64
                } else {
                    8
                };
                self.residual(ip, &ins, st)?;
                if let Some(sp) = rsp {
                    let nsp = if mnem == M::Push {
                        sp.wrapping_sub(bytes)
                    } else {
                        sp.wrapping_add(bytes)
                    };
                    // pop rsp loads rsp from the stack.
                    let pops_rsp = mnem == M::Pop
                        && ins.op_kind(0) == OpKind::Register
                        && Gpr::containing(ins.op_register(0)) == Some(Gpr::Rsp);
                    if !pops_rsp {
                        st.set(Gpr::Rsp, Some(nsp), true);
                    }
                }
            }
            _ => match ins.flow_control() {
                FlowControl::Next => self.residual(ip, &ins, st)?,
                _ => {
                    self.exit(ip, ExitReason::Unsupported, st)?;
                    return Ok(Next::Stop);
                }
            },
        }
        Ok(Next::Continue(next))
    }

    fn do_mov(
        &mut self,
        ip: Addr,
        ins: &Instruction,
        st: &mut AbsState,
    ) -> Result<(), SpecializeError> {
        use Mnemonic as M;
        if ins.op_kind(0) != OpKind::Register {
            // A store: always residual.
            return self.residual(ip, ins, st);
        }
        let dst = ins.op_register(0);
        let dbits = dst.size() as u32 * 8;
        let sbits = Self::op_bits(ins, 1).min(64);
        let src = self.op_val(st, ins, 1, sbits);
        let v = src.map(|s| match ins.mnemonic() {
            M::Movsx | M::Movsxd => sem::sext(s, sbits) & sem::mask(dbits),
            _ => s & sem::mask(dbits),
        });
        self.conclude(ip, ins, st, &[(dst, v)], false, None)
    }

    fn do_alu(
        &mut self,
        ip: Addr,
        ins: &Instruction,
        st: &mut AbsState,
    ) -> Result<(), SpecializeError> {
        use Mnemonic as M;
        let mnem = ins.mnemonic();
        let bits = Self::op_bits(ins, 0);
        let same_reg = ins.op_kind(0) == OpKind::Register
            && ins.op_kind(1) == OpKind::Register
            && ins.op_register(0) == ins.op_register(1);
        let (mut a, mut b) = (self.op_val(st, ins, 0, bits), self.op_val(st, ins, 1, bits));
        if same_reg && matches!(mnem, M::Xor | M::Sub) {
            // xor r,r / sub r,r: zero whatever r holds.
            a = Some(0);
            b = Some(0);
        }
        let cf = st.flags[Flag::Cf as usize];
        let op = match mnem {
            M::Add => AluOp::Add,
            M::Adc => AluOp::Adc,
            M::Sub | M::Cmp => AluOp::Sub,
            M::Sbb => AluOp::Sbb,
            M::And | M::Test => AluOp::And,
            M::Or => AluOp::Or,
            _ => AluOp::Xor,
        };
        let needs_cf = matches!(op, AluOp::Adc | AluOp::Sbb);
        let res = match (a, b) {
            (Some(a), Some(b)) if !needs_cf || cf.is_some() => {
                Some(sem::alu(op, a, b, cf.unwrap_or(false), bits, &st.flags))
            }
            _ => None,
        };
        let written = STATUS;
        let has_dest = !matches!(mnem, M::Cmp | M::Test);
        let dest_is_mem = has_dest && ins.op_kind(0) == OpKind::Memory;
        let dests: Vec<(Register, Option<u64>)> = if has_dest && !dest_is_mem {
            vec![(ins.op_register(0), res.map(|r| r.0))]
        } else {
            vec![]
        };
        self.conclude(
            ip,
            ins,
            st,
            &dests,
            dest_is_mem,
            Some((res.map(|r| r.1), written)),
        )
    }

    fn do_unary(
        &mut self,
        ip: Addr,
        ins: &Instruction,
        st: &mut AbsState,
    ) -> Result<(), SpecializeError> {
        use Mnemonic as M;
        let bits = Self::op_bits(ins, 0);
        let a = self.op_val(st, ins, 0, bits);
        let dest_is_mem = ins.op_kind(0) == OpKind::Memory;
        let (v, flags_out) = match ins.mnemonic() {
            M::Not => (a.map(|a| !a & sem::mask(bits)), None),
            M::Neg => {
                let r = a.map(|a| sem::neg(a, bits, &st.flags));
                (r.map(|r| r.0), Some((r.map(|r| r.1), STATUS)))
            }
            m => {
                let r = a.map(|a| sem::inc_dec(m == M::Dec, a, bits, &st.flags));
                let written = STATUS & !(1 << Flag::Cf as u8);
                (r.map(|r| r.0), Some((r.map(|r| r.1), written)))
            }
        };
        let dests: Vec<(Register, Option<u64>)> = if dest_is_mem {
            vec![]
        } else {
            vec![(ins.op_register(0), v)]
        };
        self.conclude(ip, ins, st, &dests, dest_is_mem, flags_out)
    }

    fn do_shift(
        &mut self,
        ip: Addr,
        ins: &Instruction,
        st: &mut AbsState,
    ) -> Result<(), SpecializeError> {
        use Mnemonic as M;
        let bits = Self::op_bits(ins, 0);
        let count = self.op_val(st, ins, 1, 8);
        let cmask = if bits == 64 { 63 } else { 31 };
        if let Some(c) = count {
            if c & cmask == 0 {
                // A zero count changes no flag; a 32-bit register destination
                // is still zero-extended.
                if bits == 32 && ins.op_kind(0) == OpKind::Register {
                    let r = ins.op_register(0);
                    let v = Self::reg_val(st, r);
                    return match v {
                        Some(v) => {
                            Self::write_reg(st, r, Some(v), false);
                            self.stats.folded += 1;
                            st.normalize();
                            Ok(())
                        }
                        None => {
                            let n = Instruction::with2(Code::Mov_r32_rm32, r, r)
                                .map_err(|e| SpecializeError::Encode(e.to_string()))?;
                            self.residual_exact(ip, &n, st)
                        }
                    };
                }
                self.stats.folded += 1;
                return Ok(());
            }
        }
        let op = match ins.mnemonic() {
            M::Shl | M::Sal => ShiftOp::Shl,
            M::Shr => ShiftOp::Shr,
            M::Sar => ShiftOp::Sar,
            M::Rol => ShiftOp::Rol,
            _ => ShiftOp::Ror,
        };
        let a = self.op_val(st, ins, 0, bits);
        let dest_is_mem = ins.op_kind(0) == OpKind::Memory;
        let written = match op {
            ShiftOp::Rol | ShiftOp::Ror => (1 << Flag::Cf as u8) | (1 << Flag::Of as u8),
            _ => STATUS,
        };
        let res = match (a, count) {
            (Some(a), Some(c)) => Some(sem::shift(op, a, c, bits, &st.flags)),
            _ => None,
        };
        if res.is_none() && count.is_some() && ins.op_kind(1) == OpKind::Register {
            // Known count in cl: shift by an immediate instead.
            if let Some(n) = Self::shift_imm(ins, count.unwrap_or(0) as u8) {
                return self.residual(ip, &n, st);
            }
        }
        let dests: Vec<(Register, Option<u64>)> = if dest_is_mem {
            vec![]
        } else {
            vec![(ins.op_register(0), res.map(|r| r.0))]
        };
        self.conclude(
            ip,
            ins,
            st,
            &dests,
            dest_is_mem,
            Some((res.map(|r| r.1), written)),
        )
    }

    fn shift_imm(ins: &Instruction, c: u8) -> Option<Instruction> {
        use Mnemonic as M;
        let size = match ins.op_kind(0) {
            OpKind::Register => ins.op_register(0).size(),
            _ => ins.memory_size().size(),
        };
        let code = match (ins.mnemonic(), size) {
            (M::Shl | M::Sal, 1) => Code::Shl_rm8_imm8,
            (M::Shl | M::Sal, 2) => Code::Shl_rm16_imm8,
            (M::Shl | M::Sal, 4) => Code::Shl_rm32_imm8,
            (M::Shl | M::Sal, 8) => Code::Shl_rm64_imm8,
            (M::Shr, 1) => Code::Shr_rm8_imm8,
            (M::Shr, 2) => Code::Shr_rm16_imm8,
            (M::Shr, 4) => Code::Shr_rm32_imm8,
            (M::Shr, 8) => Code::Shr_rm64_imm8,
            (M::Sar, 1) => Code::Sar_rm8_imm8,
            (M::Sar, 2) => Code::Sar_rm16_imm8,
            (M::Sar, 4) => Code::Sar_rm32_imm8,
            (M::Sar, 8) => Code::Sar_rm64_imm8,
            (M::Rol, 1) => Code::Rol_rm8_imm8,
            (M::Rol, 2) => Code::Rol_rm16_imm8,
            (M::Rol, 4) => Code::Rol_rm32_imm8,
            (M::Rol, 8) => Code::Rol_rm64_imm8,
            (M::Ror, 1) => Code::Ror_rm8_imm8,
            (M::Ror, 2) => Code::Ror_rm16_imm8,
            (M::Ror, 4) => Code::Ror_rm32_imm8,
            (M::Ror, 8) => Code::Ror_rm64_imm8,
            _ => return None,
        };
        let mut n = *ins;
        n.set_code(code);
        n.set_op1_kind(OpKind::Immediate8);
        n.set_immediate8(c);
        Some(n)
    }

    fn do_imul(
        &mut self,
        ip: Addr,
        ins: &Instruction,
        st: &mut AbsState,
    ) -> Result<(), SpecializeError> {
        match ins.op_count() {
            1 => {
                let bits = Self::op_bits(ins, 0);
                let src = self.op_val(st, ins, 0, bits);
                let acc = Self::reg_val(st, Register::RAX).map(|v| v & sem::mask(bits));
                let r = match (src, acc) {
                    (Some(s), Some(a)) => Some(sem::imul(a, s, bits, &st.flags)),
                    _ => None,
                };
                let dests: Vec<(Register, Option<u64>)> = match bits {
                    8 => vec![(Register::AX, r.map(|r| (r.0 | (r.1 << 8)) & 0xffff))],
                    16 => vec![
                        (Register::AX, r.map(|r| r.0)),
                        (Register::DX, r.map(|r| r.1)),
                    ],
                    32 => vec![
                        (Register::EAX, r.map(|r| r.0)),
                        (Register::EDX, r.map(|r| r.1)),
                    ],
                    _ => vec![
                        (Register::RAX, r.map(|r| r.0)),
                        (Register::RDX, r.map(|r| r.1)),
                    ],
                };
                self.conclude(ip, ins, st, &dests, false, Some((r.map(|r| r.2), STATUS)))
            }
            2 | 3 => {
                let dst = ins.op_register(0);
                let bits = dst.size() as u32 * 8;
                let (a, b) = if ins.op_count() == 2 {
                    (self.op_val(st, ins, 0, bits), self.op_val(st, ins, 1, bits))
                } else {
                    (self.op_val(st, ins, 1, bits), self.op_val(st, ins, 2, bits))
                };
                let r = match (a, b) {
                    (Some(a), Some(b)) => Some(sem::imul(a, b, bits, &st.flags)),
                    _ => None,
                };
                if r.is_none()
                    && ins.op_count() == 2
                    && ins.op_kind(1) == OpKind::Register
                    && bits >= 16
                {
                    // imul r, r_known -> imul r, r, imm
                    if let Some(bv) = b {
                        let code = match bits {
                            16 => Some(Code::Imul_r16_rm16_imm16),
                            32 => Some(Code::Imul_r32_rm32_imm32),
                            _ if fits_i32(bv as i64) => Some(Code::Imul_r64_rm64_imm32),
                            _ => None,
                        };
                        if let Some(code) = code {
                            let n = match bits {
                                16 => Instruction::with3(code, dst, dst, bv as u32),
                                32 => Instruction::with3(code, dst, dst, bv as u32),
                                _ => Instruction::with3(code, dst, dst, bv as i64 as i32),
                            };
                            if let Ok(n) = n {
                                return self.residual(ip, &n, st);
                            }
                        }
                    }
                }
                self.conclude(
                    ip,
                    ins,
                    st,
                    &[(dst, r.map(|r| r.0))],
                    false,
                    Some((r.map(|r| r.2), STATUS)),
                )
            }
            _ => self.residual(ip, ins, st),
        }
    }

    fn do_setcc(
        &mut self,
        ip: Addr,
        ins: &Instruction,
        st: &mut AbsState,
    ) -> Result<(), SpecializeError> {
        let Some(c) = sem::condition(ins.condition_code(), &st.flags) else {
            return self.residual(ip, ins, st);
        };
        let v = c as u64;
        if ins.op_kind(0) == OpKind::Register {
            let r = ins.op_register(0);
            if Self::write_known_possible(st, r) {
                Self::write_reg(st, r, Some(v), false);
                self.stats.folded += 1;
                st.normalize();
                return Ok(());
            }
            let n = Instruction::with2(Code::Mov_r8_imm8, r, v as u32)
                .map_err(|e| SpecializeError::Encode(e.to_string()))?;
            return self.residual_exact(ip, &n, st);
        }
        let mut n = *ins;
        n.set_code(Code::Mov_rm8_imm8);
        n.set_op1_kind(OpKind::Immediate8);
        n.set_immediate8(v as u8);
        self.residual(ip, &n, st)
    }

    fn do_cmov(
        &mut self,
        ip: Addr,
        ins: &Instruction,
        st: &mut AbsState,
    ) -> Result<(), SpecializeError> {
        let Some(c) = sem::condition(ins.condition_code(), &st.flags) else {
            return self.residual(ip, ins, st);
        };
        let dst = ins.op_register(0);
        let bits = dst.size() as u32 * 8;
        if c {
            let src = self.op_val(st, ins, 1, bits);
            if let Some(v) = src {
                if Self::write_known_possible(st, dst) {
                    Self::write_reg(st, dst, Some(v), false);
                    self.stats.folded += 1;
                    st.normalize();
                    return Ok(());
                }
            }
            let code = match bits {
                16 => Code::Mov_r16_rm16,
                32 => Code::Mov_r32_rm32,
                _ => Code::Mov_r64_rm64,
            };
            let mut n = *ins;
            n.set_code(code);
            return self.residual(ip, &n, st);
        }
        if bits == 32 {
            // A false 32-bit cmov still zero-extends its destination.
            if let Some(v) = Self::reg_val(st, dst) {
                Self::write_reg(st, dst, Some(v), false);
                self.stats.folded += 1;
                st.normalize();
                return Ok(());
            }
            let n = Instruction::with2(Code::Mov_r32_rm32, dst, dst)
                .map_err(|e| SpecializeError::Encode(e.to_string()))?;
            return self.residual_exact(ip, &n, st);
        }
        self.stats.folded += 1;
        Ok(())
    }

    // ----- finishing ----------------------------------------------------

    fn finish(mut self) -> Result<Variant, SpecializeError> {
        // Data bytes for flag materialization go after all code.
        let mut data: Vec<(u8, u32)> = self.data_labels.iter().map(|(b, l)| (*b, *l)).collect();
        data.sort();
        for (b, l) in data {
            self.labels[l as usize] = Some(self.items.len());
            self.items.push(Emitted {
                ins: Instruction::with_declare_byte_1(b),
                orig: self.req.entry,
                folded: KnownState::default(),
                is_data: true,
            });
        }
        // Only labels something refers to get an ip; several labels may
        // name one position, so pick one ip per position.
        let mut referenced: BTreeSet<u64> = BTreeSet::new();
        for e in &self.items {
            if e.is_data {
                continue;
            }
            if e.ins.op_count() > 0 && e.ins.op0_kind() == OpKind::NearBranch64 {
                referenced.insert(e.ins.near_branch_target());
            }
            if e.ins.is_ip_rel_memory_operand() {
                referenced.insert(e.ins.memory_displacement64());
            }
        }
        let mut canon: HashMap<usize, u64> = HashMap::new();
        let mut remap: HashMap<u64, u64> = HashMap::new();
        for (l, pos) in self.labels.iter().enumerate() {
            let Some(p) = pos else { continue };
            let lip = LABEL_BASE + l as u64;
            if !referenced.contains(&lip) {
                continue;
            }
            if *p >= self.items.len() {
                return Err(SpecializeError::Encode(format!(
                    "label {l} has no instruction"
                )));
            }
            let ip = *canon.entry(*p).or_insert(lip);
            remap.insert(lip, ip);
        }
        for (p, ip) in &canon {
            self.items[*p].ins.set_ip(*ip);
        }
        for e in &mut self.items {
            if e.is_data {
                continue;
            }
            if e.ins.op_count() > 0 && e.ins.op0_kind() == OpKind::NearBranch64 {
                let t = e.ins.near_branch_target();
                if crate::variant::is_label(t) {
                    let n = remap
                        .get(&t)
                        .copied()
                        .ok_or_else(|| SpecializeError::Encode(format!("unplaced label {t:#x}")))?;
                    e.ins.set_near_branch64(n);
                }
            }
            if e.ins.is_ip_rel_memory_operand() {
                let t = e.ins.memory_displacement64();
                if crate::variant::is_label(t) {
                    let n = remap
                        .get(&t)
                        .copied()
                        .ok_or_else(|| SpecializeError::Encode(format!("unplaced label {t:#x}")))?;
                    e.ins.set_memory_displacement64(n);
                }
            }
        }
        Ok(Variant {
            entry: self.req.entry,
            exits: self.exits,
            guard_pages: self.guard.into_iter().collect(),
            stats: self.stats,
            items: self.items,
            exit_items: self.exit_items,
        })
    }
}
