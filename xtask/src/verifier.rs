//! `cargo xtask verifier [--toolchain nightly-YYYY-MM-DD]`: builds the eBPF object with the
//! pinned toolchain, or a candidate, loads every program into this kernel and prints the
//! verifier's work on each, one line per program. Moving the pin is a measured decision.

use std::{path::PathBuf, process::Command};

use anyhow::{Result, bail};
use clap::Args;

use crate::{setup, util};

#[derive(Args)]
pub(crate) struct Options {
    /// A dated nightly to build with instead of the pinned one; setup installs it (minimal
    /// profile, rust-src) and builds a bpf-linker against its LLVM.
    #[arg(long, value_name = "nightly-YYYY-MM-DD")]
    toolchain: Option<String>,
}

pub(crate) fn run(Options { toolchain }: Options) -> Result<()> {
    let pinned = setup::ebpf_toolchain()?;
    let toolchain = toolchain.unwrap_or_else(|| pinned.clone());
    if !toolchain.starts_with("nightly-") {
        bail!("--toolchain takes a dated nightly, e.g. nightly-2026-10-30; got `{toolchain}`");
    }
    let nightly = setup::ensure_ebpf_toolchain(&toolchain)?;
    eprintln!(
        "verifier: {toolchain} is rustc {}, LLVM {}",
        nightly.release, nightly.llvm_version
    );
    let mut build = util::cargo();
    build.args([
        "build",
        "--package",
        "integration-tests",
        "--bin",
        "datafence-verifier",
    ]);
    let target_dir = if toolchain == pinned {
        util::workspace_root().join("target")
    } else {
        // A directory per candidate: the pinned build stays as it is.
        let dir = util::workspace_root()
            .join("target")
            .join("verifier")
            .join(&toolchain);
        build
            .env("DATAFENCE_EBPF_TOOLCHAIN", &toolchain)
            .env("CARGO_TARGET_DIR", &dir);
        dir
    };
    util::run(&mut build)?;
    let binary: PathBuf = target_dir.join("debug").join("datafence-verifier");
    util::run(&mut Command::new(binary))
}
