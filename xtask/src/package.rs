//! `cargo xtask package`: packaging. Placeholder until someone writes it.

use anyhow::{Result, bail};
use clap::Args;

#[derive(Args)]
pub(crate) struct Options {}

pub(crate) fn run(Options {}: Options) -> Result<()> {
    bail!("not implemented yet: cargo xtask package (packaging)")
}
