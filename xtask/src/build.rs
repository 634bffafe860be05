//! `cargo xtask build`: the release agent binary.

use std::{env, path::PathBuf};

use anyhow::{Result, bail};
use clap::Args;

use crate::util;

#[derive(Args)]
pub(crate) struct Options {}

pub(crate) fn run(Options {}: Options) -> Result<()> {
    util::run(util::cargo().args([
        "build",
        "--release",
        "--package",
        "datafence",
        "--bin",
        "datafence",
    ]))?;
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| util::workspace_root().join("target"), PathBuf::from);
    let binary = target_dir.join("release").join("datafence");
    if !binary.is_file() {
        bail!(
            "cargo built the agent but {} does not exist (is the target dir set in a cargo config?)",
            binary.display()
        );
    }
    println!("{}", binary.display());
    Ok(())
}
