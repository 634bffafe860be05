//! `cargo xtask package`: the Debian package, built by cargo-deb from
//! `[package.metadata.deb]` in agent/Cargo.toml, then checked with dpkg-deb.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{setup::tools_dir, util};

#[derive(Args)]
pub(crate) struct Options {
    /// Package the release binary already in target/release instead of building it.
    #[arg(long)]
    no_build: bool,
}

/// Paths the package must contain (as `dpkg-deb --contents` lists them, without "./").
const EXPECTED_FILES: &[&str] = &[
    "usr/bin/datafence",
    "usr/lib/systemd/system/datafence.service",
    "etc/datafence/policy.yaml",
    "etc/datafence/regions/eu-west.txt",
    "usr/share/doc/datafence/operations.md",
    "usr/share/doc/datafence/policy.md",
    "usr/share/doc/datafence/metrics.md",
    "usr/share/doc/datafence/copyright",
];

/// Control-archive members and a string each must contain.
const EXPECTED_CONTROL: &[(&str, &str)] = &[
    ("control", "Depends:"),
    ("control", "iproute2"),
    ("control", "Section: net"),
    // The operator's policy survives upgrades.
    ("conffiles", "/etc/datafence/policy.yaml"),
    // A running agent is restarted on upgrade, and only then (the unit ships disabled).
    ("postinst", "try-restart datafence.service"),
    // Removing the package removes enforcement; upgrading does not stop the agent early.
    ("prerm", "datafence detach"),
];

pub(crate) fn run(Options { no_build }: Options) -> Result<()> {
    let cargo_deb = ensure_cargo_deb()?;
    let mut cmd = Command::new(&cargo_deb);
    cmd.current_dir(util::workspace_root())
        .args(["--package", "datafence"]);
    if no_build {
        cmd.arg("--no-build");
    }
    // cargo-deb prints the package path on stdout and its progress on stderr.
    let shown = util::display(&cmd);
    eprintln!("$ {shown}");
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("could not start `{shown}`"))?;
    if !out.status.success() {
        bail!("`{shown}` failed ({})", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let deb = stdout
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| Path::new(l).extension().is_some_and(|e| e == "deb"))
        .map(PathBuf::from)
        .with_context(|| format!("cargo-deb printed no .deb path: {stdout:?}"))?;
    let deb = if deb.is_absolute() {
        deb
    } else {
        util::workspace_root().join(deb)
    };
    verify(&deb)?;
    let size = fs::metadata(&deb)
        .with_context(|| format!("reading {}", deb.display()))?
        .len();
    println!("{} ({} KiB)", deb.display(), size.div_ceil(1024));
    Ok(())
}

/// cargo-deb from the tools folder, installed there on first use.
fn ensure_cargo_deb() -> Result<PathBuf> {
    let tools = tools_dir()?;
    let root = tools.join("cargo-deb");
    let binary = root.join("bin").join("cargo-deb");
    if binary.is_file() {
        return Ok(binary);
    }
    eprintln!(
        "package: installing cargo-deb into {} (about a minute)",
        root.display()
    );
    fs::create_dir_all(&tools).with_context(|| format!("creating {}", tools.display()))?;
    util::run(
        Command::new("cargo")
            .args(["install", "cargo-deb", "--locked", "--root"])
            .arg(&root)
            // Away from the workspace, so its toolchain file and config do not apply.
            .current_dir(&tools),
    )?;
    if !binary.is_file() {
        bail!(
            "`cargo install cargo-deb` succeeded but {} is missing",
            binary.display()
        );
    }
    Ok(binary)
}

/// Checks the package's files and control members with dpkg-deb.
fn verify(deb: &Path) -> Result<()> {
    if util::find_program("dpkg-deb").is_none() {
        eprintln!(
            "package: dpkg-deb not found; skipping the check of {}",
            deb.display()
        );
        return Ok(());
    }
    let contents = util::output(Command::new("dpkg-deb").arg("--contents").arg(deb))?;
    // Lines end with the path, e.g. "-rwxr-xr-x root/root 123 2024-01-01 00:00 ./usr/bin/x".
    let files: Vec<&str> = contents
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(|p| p.trim_start_matches("./"))
        .collect();
    let missing: Vec<&str> = EXPECTED_FILES
        .iter()
        .copied()
        .filter(|want| !files.contains(want))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} lacks {}; it holds:\n{contents}",
            deb.display(),
            missing.join(", ")
        );
    }
    let binary_line = contents
        .lines()
        .find(|l| l.ends_with("./usr/bin/datafence"))
        .unwrap_or_default();
    if !binary_line.starts_with("-rwxr-xr-x") {
        bail!("usr/bin/datafence is not mode 0755: {binary_line}");
    }
    for (member, needle) in EXPECTED_CONTROL {
        let text = util::output(Command::new("dpkg-deb").arg("--info").arg(deb).arg(member))
            .with_context(|| format!("reading the {member} member of {}", deb.display()))?;
        if !text.contains(needle) {
            bail!(
                "{}: {member} does not contain {needle:?}:\n{text}",
                deb.display()
            );
        }
    }
    let info = util::output(Command::new("dpkg-deb").arg("--info").arg(deb))?;
    eprintln!("{info}");
    eprintln!(
        "package: {} checked: {} files, including {}",
        deb.display(),
        files.iter().filter(|f| !f.ends_with('/')).count(),
        EXPECTED_FILES.join(", ")
    );
    Ok(())
}
