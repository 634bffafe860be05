//! `cargo xtask bench`: builds the release agent and the benchmark program
//! (tests/src/bin/datafence-bench/), then runs the benchmark as root. Everything is
//! measured in one run, side by side: the datapath under `BPF_PROG_TEST_RUN` (hot and cold),
//! end-to-end packet rates through a veth pair against nftables and ipset, control-plane
//! load and reload, and the agent's own footprint. The table goes to stdout, the figures to
//! `target/bench/results.json`.

use std::{env, ffi::OsString, path::PathBuf, process::Command, time::Instant};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::util::{self, Privileges};

#[derive(Args)]
pub(crate) struct Options {
    /// Smoke test: small policy sizes (10, 1k), few rounds and short traffic bursts.
    #[arg(long)]
    quick: bool,
    /// Policy sizes in prefixes per address family, comma-separated, with k/m suffixes
    /// (default 10,1k,100k,1m; with --quick 10,1k).
    #[arg(long, value_name = "N,...")]
    sizes: Option<String>,
    /// Phases to run, comma-separated: datapath, e2e, agent (default all).
    #[arg(long, value_name = "PHASE,...")]
    phases: Option<String>,
    /// Where the JSON results go (default target/bench/results.json).
    #[arg(long, value_name = "PATH")]
    out: Option<PathBuf>,
    /// Seconds after which no new measurement starts; what is left is reported as skipped
    /// (default 360, so that build and run end within 10 minutes on two cores).
    #[arg(long, value_name = "SECONDS")]
    budget: Option<u64>,
    /// Directory of region files whose prefixes give the real prefix-length mix
    /// (default policies/regions/cloud, generated from cloud-ranges.csv).
    #[arg(long, value_name = "DIR")]
    regions: Option<PathBuf>,
    /// Skip the build (use the binaries already in target/release).
    #[arg(long)]
    no_build: bool,
    /// Further arguments for the benchmark program (see `datafence-bench --help`).
    #[arg(last = true, value_name = "BENCH_ARGS")]
    extra: Vec<OsString>,
}

pub(crate) fn run(opts: Options) -> Result<()> {
    let root = util::workspace_root();
    if !opts.no_build {
        // Two builds: in one, cargo would unify the agent's features with the bench's and
        // the agent measured would carry the bench's object, which the shipped one does not.
        util::run(util::cargo().args([
            "build",
            "--release",
            "--package",
            "datafence",
            "--bin",
            "datafence",
        ]))?;
        util::run(util::cargo().args([
            "build",
            "--release",
            "--package",
            "integration-tests",
            "--bin",
            "datafence-bench",
        ]))?;
    }
    let target_dir =
        env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from);
    let release = target_dir.join("release");
    let bench = release.join("datafence-bench");
    let agent = release.join("datafence");
    for binary in [&bench, &agent] {
        if !binary.is_file() {
            bail!(
                "{} does not exist; build it (drop --no-build) or set CARGO_TARGET_DIR",
                binary.display()
            );
        }
    }
    let out = opts
        .out
        .unwrap_or_else(|| target_dir.join("bench").join("results.json"));
    let out = if out.is_absolute() {
        out
    } else {
        env::current_dir().context("current directory")?.join(out)
    };
    let regions = opts
        .regions
        .unwrap_or_else(|| root.join("policies").join("regions").join("cloud"));

    // The benchmark loads eBPF programs and builds network namespaces: it needs root.
    let mut cmd = if Privileges::current()?.euid == 0 {
        Command::new(&bench)
    } else {
        eprintln!("not root: running the benchmark through sudo");
        let mut sudo = Command::new("sudo");
        sudo.arg(&bench);
        sudo
    };
    cmd.current_dir(root)
        .arg("--out")
        .arg(&out)
        .arg("--agent-bin")
        .arg(&agent)
        .arg("--regions")
        .arg(&regions);
    if opts.quick {
        cmd.arg("--quick");
    }
    if let Some(sizes) = &opts.sizes {
        cmd.args(["--sizes", sizes]);
    }
    if let Some(phases) = &opts.phases {
        cmd.args(["--phases", phases]);
    }
    if let Some(budget) = opts.budget {
        cmd.args(["--budget", &budget.to_string()]);
    }
    if let Ok(commit) =
        util::output(
            Command::new("git")
                .current_dir(root)
                .args(["rev-parse", "--short", "HEAD"]),
        )
    {
        cmd.args(["--commit", commit.trim()]);
    }
    cmd.args(&opts.extra);
    let start = Instant::now();
    util::run(&mut cmd)?;
    eprintln!(
        "benchmark finished in {:.0}s; results in {}",
        start.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}
