//! The report's view of a variant's code: its residual lines paired with original addresses, and the original
//! instructions it covers (what `dynspec report --html` shows side by side).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use specializer::{ExitReason, LineKind, ListingLine, OriginalLine};

use super::Hex;

/// What a line of residual code is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CodeKind {
    /// `L3:`, a branch target inside the variant.
    Label,
    /// Residual code of the original instruction at `orig`.
    Code,
    /// Code placed before the instruction at `orig`, not its own: a jump where the path joins code already
    /// emitted, or folded values written back where they are widened.
    Join,
    /// Folded values written back before an exit (`orig` is the exit's target).
    ExitSetup,
    /// The jump of an exit back to the original code at `exit_target`.
    Exit,
    /// Data bytes (operands of flag materialization).
    Data,
}

/// One line of a variant's residual code.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct CodeLineJson {
    /// The original address the line stands for: for code, the instruction it comes from; for an exit and its
    /// set-up, the exit's target; for a join, where paths join.
    pub orig: Hex,
    pub asm: String,
    pub kind: CodeKind,
    /// For an exit: where it continues in the original code, and why the variant leaves there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_target: Option<Hex>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_reason: Option<String>,
}

/// One original instruction a variant covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct OriginalLineJson {
    pub address: Hex,
    pub asm: String,
    /// Times the specializer walked it (once per abstract state), and how many of those emitted code
    /// (0: folded away in every copy).
    pub visits: u32,
    pub emitted: u32,
}

/// Why an exit leaves, in words.
pub fn exit_reason_text(r: ExitReason) -> &'static str {
    match r {
        ExitReason::LeftRegion => "left the region",
        ExitReason::UnknownTarget => "indirect branch to an unknown target",
        ExitReason::Budget => "code budget spent",
        ExitReason::Unsupported => "instruction not re-emitted",
        ExitReason::Redispatch => "back at the dispatch point, trigger value unknown",
    }
}

/// The report's lines of a variant's residual code, at most `max`.
pub fn code_json(lines: &[ListingLine], max: usize) -> Vec<CodeLineJson> {
    lines
        .iter()
        .take(max)
        .map(|l| {
            let (kind, exit) = match l.kind {
                LineKind::Label => (CodeKind::Label, None),
                LineKind::Code => (CodeKind::Code, None),
                LineKind::Join => (CodeKind::Join, None),
                LineKind::ExitSetup => (CodeKind::ExitSetup, None),
                LineKind::Exit { target, reason } => (CodeKind::Exit, Some((target, reason))),
                LineKind::Data => (CodeKind::Data, None),
            };
            CodeLineJson {
                orig: Hex(l.orig.0),
                asm: l.asm.clone(),
                kind,
                exit_target: exit.map(|(t, _)| Hex(t.0)),
                exit_reason: exit.map(|(_, r)| exit_reason_text(r).to_string()),
            }
        })
        .collect()
}

/// The report's lines of the original instructions a variant covers, at most `max` (lowest addresses first).
pub fn original_json(lines: &[OriginalLine], max: usize) -> Vec<OriginalLineJson> {
    lines
        .iter()
        .take(max)
        .map(|l| OriginalLineJson {
            address: Hex(l.address.0),
            asm: l.asm.clone(),
            visits: l.visits,
            emitted: l.emitted,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use specializer::Addr;

    #[test]
    fn exits_carry_target_and_reason_and_sizes_are_bounded() {
        let lines = vec![
            ListingLine {
                orig: Addr(0x10),
                asm: "add rax, rdx".into(),
                kind: LineKind::Code,
            },
            ListingLine {
                orig: Addr(0x20),
                asm: "jmp 0x20".into(),
                kind: LineKind::Exit {
                    target: Addr(0x20),
                    reason: ExitReason::LeftRegion,
                },
            },
        ];
        let j = code_json(&lines, 10);
        assert_eq!(j[0].kind, CodeKind::Code);
        assert_eq!(j[0].exit_target, None);
        assert_eq!(j[1].kind, CodeKind::Exit);
        assert_eq!(j[1].exit_target, Some(Hex(0x20)));
        assert_eq!(j[1].exit_reason.as_deref(), Some("left the region"));
        assert_eq!(code_json(&lines, 1).len(), 1);
        let v = serde_json::to_value(&j[1]).expect("json");
        assert_eq!(v["kind"], "exit");
        assert_eq!(v["orig"], "0x20");
        let o = original_json(
            &[OriginalLine {
                address: Addr(0x10),
                asm: "mov rax, rcx".into(),
                visits: 3,
                emitted: 0,
            }],
            0,
        );
        assert!(o.is_empty());
    }
}
