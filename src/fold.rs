//! `dynspec fold`: show what the specializer does to a snippet (being written).

use clap::Args;

/// Arguments of `dynspec fold`.
#[derive(Debug, Args)]
pub struct FoldArgs {
    /// Code as hex bytes.
    #[arg(long)]
    pub code: Option<String>,
}

pub fn run(_args: FoldArgs) -> anyhow::Result<()> {
    anyhow::bail!("dynspec fold is not built yet")
}
