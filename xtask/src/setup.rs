//! `cargo xtask setup`: makes this machine able to build and test datafence. Every step checks
//! before it acts, so a second run is a quick no-op.

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::util::{self, find_program, output};

#[derive(Args)]
pub(crate) struct Options {}

/// Where setup puts the tools it builds. agent/build.rs has the same logic (it cannot depend
/// on xtask); keep the two in step.
pub(crate) fn tools_dir() -> Result<PathBuf> {
    if let Some(dir) = env::var_os("DATAFENCE_TOOLS_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .context("neither DATAFENCE_TOOLS_DIR, XDG_CACHE_HOME nor HOME is set")?;
    Ok(cache.join("datafence").join("tools"))
}

/// Commands the integration tests and demos shell out to, and the Debian package of each.
const SYSTEM_TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("nft", "nftables"),
    ("ipset", "ipset"),
    ("iptables", "iptables"),
    ("bpftool", "bpftool"),
    ("curl", "curl"),
    ("python3", "python3"),
    ("promtool", "prometheus"),
    // The server itself: tests/tests/netns_prometheus.rs scrapes the agent with it.
    ("prometheus", "prometheus"),
];

pub(crate) fn run(Options {}: Options) -> Result<()> {
    let start = Instant::now();
    let toolchain = ebpf_toolchain()?;
    ensure_ebpf_toolchain(&toolchain)?;
    ensure_host_components()?;
    ensure_cargo_fuzz()?;
    ensure_system_tools()?;
    crate::vm::ensure_installed()?;
    println!("setup: done in {:.2}s", start.elapsed().as_secs_f64());
    Ok(())
}

pub(crate) fn step(what: &str, outcome: impl std::fmt::Display) {
    println!("setup: {what}: {outcome}");
}

/// Facts about an installed nightly toolchain, from `rustc +<toolchain> -vV`.
pub(crate) struct Nightly {
    /// The rustup name, e.g. `nightly-2026-10-30`.
    pub(crate) name: String,
    sysroot: PathBuf,
    /// e.g. `1.97.0-nightly`
    pub(crate) release: String,
    /// e.g. `22.1.4`
    pub(crate) llvm_version: String,
}

impl Nightly {
    fn query(name: &str) -> Result<Self> {
        let plus = format!("+{name}");
        let mut version = Command::new("rustc");
        // Without this, rustup would quietly install a full-profile toolchain instead of
        // letting us install the minimal one below.
        version
            .args([plus.as_str(), "-vV"])
            .env("RUSTUP_AUTO_INSTALL", "0");
        let version = output(&mut version)?;
        let field = |field: &str| {
            version
                .lines()
                .find_map(|line| line.strip_prefix(field))
                .map(|value| value.trim().to_owned())
                .with_context(|| format!("`rustc {plus} -vV` printed no `{field}` line"))
        };
        let release = field("release:")?;
        let llvm_version = field("LLVM version:")?;
        let sysroot = output(
            Command::new("rustc")
                .args([plus.as_str(), "--print", "sysroot"])
                .env("RUSTUP_AUTO_INSTALL", "0"),
        )?;
        Ok(Self {
            name: name.to_owned(),
            sysroot: PathBuf::from(sysroot.trim()),
            release,
            llvm_version,
        })
    }

    fn llvm_major(&self) -> Result<&str> {
        self.llvm_version
            .split('.')
            .next()
            .filter(|major| !major.is_empty() && major.bytes().all(|b| b.is_ascii_digit()))
            .with_context(|| format!("unexpected LLVM version `{}`", self.llvm_version))
    }

    /// The libLLVM shared object shipped in the nightly sysroot, which bpf-linker must link
    /// against so that it reads the bitcode this rustc emits.
    fn libllvm(&self) -> Result<PathBuf> {
        let lib_dir = self.sysroot.join("lib");
        let major = self.llvm_major()?;
        let mut parts = self.llvm_version.split('.');
        if let (Some(_), Some(minor)) = (parts.next(), parts.next()) {
            let expected =
                lib_dir.join(format!("libLLVM.so.{major}.{minor}-rust-{}", self.release));
            if expected.is_file() {
                return Ok(expected);
            }
        }
        // The naming scheme has changed before; accept a single library of the right major.
        let entries: Vec<String> = fs::read_dir(&lib_dir)
            .with_context(|| format!("listing {}", lib_dir.display()))?
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter(|name| name.starts_with("libLLVM"))
            .collect();
        let prefix = format!("libLLVM.so.{major}.");
        let matching: Vec<&String> = entries.iter().filter(|n| n.starts_with(&prefix)).collect();
        match matching.as_slice() {
            [only] => Ok(lib_dir.join(only)),
            _ => bail!(
                "cannot tell which libLLVM in {} is LLVM {} (nightly {}): expected \
                 libLLVM.so.<major>.<minor>-rust-<release> or a single {prefix}*; found: [{}]",
                lib_dir.display(),
                self.llvm_version,
                self.release,
                entries.join(", "),
            ),
        }
    }
}

/// The toolchain that builds the eBPF object: the `channel` of agent-ebpf/rust-toolchain.toml,
/// unless `DATAFENCE_EBPF_TOOLCHAIN` names another (as `cargo xtask verifier --toolchain`
/// does). agent/build.rs reads the same file the same way.
pub(crate) fn ebpf_toolchain() -> Result<String> {
    if let Some(name) = env::var_os("DATAFENCE_EBPF_TOOLCHAIN") {
        return name
            .into_string()
            .map_err(|_| anyhow::anyhow!("DATAFENCE_EBPF_TOOLCHAIN is not UTF-8"));
    }
    let path = util::workspace_root().join("agent-ebpf/rust-toolchain.toml");
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    pinned_channel(&text).with_context(|| {
        format!(
            "{}: no `channel = \"nightly-YYYY-MM-DD\"` line in [toolchain]",
            path.display()
        )
    })
}

/// The `channel` value of a rust-toolchain.toml, when it names a dated nightly.
fn pinned_channel(text: &str) -> Option<String> {
    text.lines()
        .map(str::trim)
        .filter_map(|line| line.strip_prefix("channel"))
        .filter_map(|rest| rest.trim_start().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .find(|value| {
            value
                .strip_prefix("nightly-")
                .is_some_and(|date| date.len() == 10 && date.split('-').count() == 3)
        })
}

/// Installs the pinned nightly with rust-src and clippy, its bpf-linker, and nothing else.
pub(crate) fn ensure_ebpf_toolchain(name: &str) -> Result<Nightly> {
    let nightly = ensure_nightly(name)?;
    ensure_nightly_components(&nightly)?;
    ensure_bpf_linker(&nightly)?;
    Ok(nightly)
}

fn ensure_nightly(name: &str) -> Result<Nightly> {
    if let Ok(nightly) = Nightly::query(name) {
        step(
            "eBPF toolchain",
            format_args!(
                "{name} present (rustc {}, LLVM {})",
                nightly.release, nightly.llvm_version
            ),
        );
        return Ok(nightly);
    }
    step("eBPF toolchain", format_args!("installing {name}"));
    util::run(Command::new("rustup").args([
        "toolchain",
        "install",
        name,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
        "--component",
        "clippy",
    ]))?;
    Nightly::query(name)
}

fn ensure_nightly_components(nightly: &Nightly) -> Result<()> {
    let sysroot = &nightly.sysroot;
    let mut missing = Vec::new();
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        missing.push("rust-src");
    }
    if !sysroot.join("bin/cargo-clippy").is_file() {
        missing.push("clippy");
    }
    ensure_components(
        "eBPF toolchain rust-src, clippy",
        Some(&nightly.name),
        &missing,
    )
}

/// rustfmt and clippy for the toolchain running xtask, which `cargo xtask test` uses.
fn ensure_host_components() -> Result<()> {
    let sysroot = output(Command::new("rustc").args(["--print", "sysroot"]))?;
    let bin = Path::new(sysroot.trim()).join("bin");
    let mut missing = Vec::new();
    if !bin.join("cargo-fmt").is_file() {
        missing.push("rustfmt");
    }
    if !bin.join("cargo-clippy").is_file() {
        missing.push("clippy");
    }
    ensure_components("host rustfmt, clippy", None, &missing)
}

fn ensure_components(what: &str, toolchain: Option<&str>, missing: &[&str]) -> Result<()> {
    if missing.is_empty() {
        step(what, "present");
        return Ok(());
    }
    step(what, format_args!("adding {}", missing.join(", ")));
    let mut cmd = Command::new("rustup");
    cmd.args(["component", "add"]).args(missing);
    if let Some(toolchain) = toolchain {
        cmd.args(["--toolchain", toolchain]);
    }
    util::run(&mut cmd)
}

/// bpf-linker's release, pinned like the toolchain so every machine links the same way.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where the bpf-linker for one eBPF toolchain lives: `<tools>/bpf-linker/<toolchain>`. One
/// per toolchain, so `cargo xtask verifier --toolchain` can build with a candidate nightly
/// without rebuilding the pinned one's linker. agent/build.rs looks in the same place.
pub(crate) fn bpf_linker_root(toolchain: &str) -> Result<PathBuf> {
    Ok(tools_dir()?.join("bpf-linker").join(toolchain))
}

/// Builds bpf-linker against the nightly's own libLLVM. A stamp records what it was built
/// against, so it is rebuilt only when that changes or the binary is broken.
fn ensure_bpf_linker(nightly: &Nightly) -> Result<()> {
    let tools = tools_dir()?;
    let root = bpf_linker_root(&nightly.name)?;
    let llvm_prefix = root.join("llvm");
    let llvm_lib_dir = llvm_prefix.join("lib");
    let binary = root.join("bin").join("bpf-linker");
    let stamp_path = root.join(".datafence-llvm-stamp");

    let libllvm = nightly.libllvm()?;
    let libllvm_name = libllvm
        .file_name()
        .and_then(|n| n.to_str())
        .context("libLLVM path has no UTF-8 file name")?;
    let stamp = format!(
        "bpf-linker {BPF_LINKER_VERSION}, LLVM {} ({libllvm_name}, rustc {})\n",
        nightly.llvm_version, nightly.release
    );
    link_libllvm(&llvm_lib_dir, &libllvm, libllvm_name)?;

    let works = binary_works(&binary);
    match fs::read_to_string(&stamp_path).ok() {
        Some(recorded) if recorded == stamp && works => {
            step(
                "bpf-linker",
                format_args!(
                    "{BPF_LINKER_VERSION} up to date (LLVM {})",
                    nightly.llvm_version
                ),
            );
            return Ok(());
        }
        Some(recorded) if works => step(
            "bpf-linker",
            format_args!("rebuilding: was built as {}", recorded.trim()),
        ),
        _ if binary.exists() => step("bpf-linker", "rebuilding: existing binary does not run"),
        _ => step(
            "bpf-linker",
            format_args!(
                "building {BPF_LINKER_VERSION} against LLVM {} (a minute or two)",
                nightly.llvm_version
            ),
        ),
    }

    fs::create_dir_all(&tools).with_context(|| format!("creating {}", tools.display()))?;
    let mut install = Command::new("cargo");
    install
        .args(["install", "bpf-linker", "--locked", "--version"])
        .arg(format!("={BPF_LINKER_VERSION}"))
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{}", nightly.llvm_major()?))
        // Same version but a different LLVM still needs a rebuild, which cargo would skip.
        .arg("--force")
        .arg("--root")
        .arg(&root)
        .env("LLVM_PREFIX", &llvm_prefix)
        // Away from the workspace so its rust-toolchain.toml and .cargo/config.toml cannot
        // affect the install.
        .current_dir(&tools);
    util::run(&mut install)?;
    if !binary_works(&binary) {
        bail!(
            "bpf-linker was installed at {} but `bpf-linker --version` fails",
            binary.display()
        );
    }
    fs::write(&stamp_path, &stamp).with_context(|| format!("writing {}", stamp_path.display()))?;
    step("bpf-linker", format_args!("built at {}", binary.display()));
    Ok(())
}

/// Makes `<tools>/llvm/lib` hold `libLLVM.so` and `<soname>` pointing at the nightly's libLLVM,
/// and nothing older: a leftover link to a previous nightly's library would let a stale
/// bpf-linker keep loading and pass `binary_works`.
fn link_libllvm(lib_dir: &Path, libllvm: &Path, soname: &str) -> Result<()> {
    fs::create_dir_all(lib_dir).with_context(|| format!("creating {}", lib_dir.display()))?;
    for entry in fs::read_dir(lib_dir).with_context(|| format!("listing {}", lib_dir.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("libLLVM") && name != "libLLVM.so" && name != soname {
            fs::remove_file(entry.path())
                .with_context(|| format!("removing stale {}", entry.path().display()))?;
        }
    }
    for name in ["libLLVM.so", soname] {
        let link = lib_dir.join(name);
        if fs::read_link(&link).is_ok_and(|target| target == libllvm) {
            continue;
        }
        if fs::symlink_metadata(&link).is_ok() {
            fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
        }
        symlink(libllvm, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), libllvm.display()))?;
    }
    Ok(())
}

/// Whether the binary starts, which proves the dynamic loader finds the libLLVM it needs.
fn binary_works(binary: &Path) -> bool {
    binary.is_file()
        && Command::new(binary)
            .arg("--version")
            // `cargo run` points this at the stable toolchain's libraries; the check must see
            // what other processes see.
            .env_remove("LD_LIBRARY_PATH")
            .output()
            .is_ok_and(|out| out.status.success())
}

/// cargo-fuzz, for `cargo xtask fuzz` and the brief fuzzing in `cargo xtask test`.
fn ensure_cargo_fuzz() -> Result<()> {
    let root = tools_dir()?.join("cargo-fuzz");
    let binary = root.join("bin").join("cargo-fuzz");
    if binary.is_file() {
        step("cargo-fuzz", "present");
        return Ok(());
    }
    step("cargo-fuzz", "installing (about a minute)");
    let tools = tools_dir()?;
    fs::create_dir_all(&tools).with_context(|| format!("creating {}", tools.display()))?;
    util::run(
        Command::new("cargo")
            .args([
                "install",
                "cargo-fuzz",
                "--locked",
                "--version",
                "=0.13.2",
                "--root",
            ])
            .arg(&root)
            // Away from the workspace, as for bpf-linker.
            .current_dir(&tools),
    )
}

fn ensure_system_tools() -> Result<()> {
    ensure_commands("system tools", SYSTEM_TOOLS)
}

/// Installs, with apt, the Debian package of each `(command, package)` whose command is not
/// on PATH, then checks that the commands are there.
pub(crate) fn ensure_commands(what: &str, tools: &[(&str, &str)]) -> Result<()> {
    let missing: Vec<(&str, &str)> = tools
        .iter()
        .copied()
        .filter(|(command, _)| find_program(command).is_none())
        .collect();
    if missing.is_empty() {
        step(what, "present");
        return Ok(());
    }
    let commands: Vec<&str> = missing.iter().map(|(command, _)| *command).collect();
    let mut packages: Vec<&str> = missing.iter().map(|(_, package)| *package).collect();
    packages.sort_unstable();
    packages.dedup();
    step(
        what,
        format_args!(
            "installing {} (for {})",
            packages.join(" "),
            commands.join(", ")
        ),
    );
    apt_install(&packages).with_context(|| format!("missing commands: {}", commands.join(", ")))?;
    let still_missing: Vec<&str> = commands
        .into_iter()
        .filter(|command| find_program(command).is_none())
        .collect();
    if !still_missing.is_empty() {
        bail!(
            "after installing {}, still missing: {}",
            packages.join(" "),
            still_missing.join(", ")
        );
    }
    Ok(())
}

/// Installs the Debian packages that are not installed yet: for libraries and other
/// packages that put no command on PATH.
pub(crate) fn ensure_debian_packages(what: &str, packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !debian_package_installed(package))
        .collect();
    if missing.is_empty() {
        step(what, "present");
        return Ok(());
    }
    step(what, format_args!("installing {}", missing.join(" ")));
    apt_install(&missing)
}

fn debian_package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${db:Status-Abbrev}", package])
        .output()
        .is_ok_and(|out| out.status.success() && out.stdout.starts_with(b"ii"))
}

/// `apt-get update && apt-get install`, or an error that says what to run.
pub(crate) fn apt_install(packages: &[&str]) -> Result<()> {
    let install_line = format!(
        "apt-get update && apt-get install -y --no-install-recommends {}",
        packages.join(" ")
    );
    if util::Privileges::current()?.euid != 0 {
        bail!("not root; as root, run: {install_line}");
    }
    if find_program("apt-get").is_none() {
        bail!(
            "no apt-get; install the packages ({}) by other means",
            packages.join(", ")
        );
    }
    util::run(Command::new("apt-get").arg("update"))?;
    util::run(
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pinned_channel_is_read_from_the_toolchain_file() {
        let text =
            "# a comment\n[toolchain]\nchannel = \"nightly-2026-10-30\"\nprofile = \"minimal\"\n";
        assert_eq!(pinned_channel(text).as_deref(), Some("nightly-2026-10-30"));
        assert_eq!(pinned_channel("channel = \"nightly\""), None, "undated");
        assert_eq!(pinned_channel("channel = \"stable\""), None);
    }

    #[test]
    fn the_repository_pins_a_dated_nightly() {
        let name = ebpf_toolchain().unwrap();
        assert!(name.starts_with("nightly-20"), "{name}");
    }

    fn nightly_with_libs(test: &str, libs: &[&str]) -> Nightly {
        let sysroot = env::temp_dir().join(format!("xtask-{test}-{}", std::process::id()));
        let lib_dir = sysroot.join("lib");
        let _ = fs::remove_dir_all(&sysroot);
        fs::create_dir_all(&lib_dir).unwrap();
        for lib in libs {
            fs::write(lib_dir.join(lib), "").unwrap();
        }
        Nightly {
            name: "nightly-2026-05-20".into(),
            sysroot,
            release: "1.97.0-nightly".into(),
            llvm_version: "22.1.4".into(),
        }
    }

    #[test]
    fn libllvm_name_is_derived_from_the_version() {
        let nightly = nightly_with_libs(
            "derived",
            &[
                "libLLVM-22-rust-1.97.0-nightly.so",
                "libLLVM.so.22.1-rust-1.97.0-nightly",
            ],
        );
        let found = nightly.libllvm().unwrap();
        assert!(found.ends_with("lib/libLLVM.so.22.1-rust-1.97.0-nightly"));
        assert_eq!(nightly.llvm_major().unwrap(), "22");
        fs::remove_dir_all(&nightly.sysroot).unwrap();
    }

    #[test]
    fn libllvm_falls_back_to_a_single_library_of_the_major() {
        let nightly = nightly_with_libs("fallback", &["libLLVM.so.22.2-rust-dev"]);
        assert!(
            nightly
                .libllvm()
                .unwrap()
                .ends_with("lib/libLLVM.so.22.2-rust-dev")
        );
    }

    #[test]
    fn libllvm_error_lists_what_is_there() {
        let nightly = nightly_with_libs("missing", &["libLLVM.so.21.1-rust-1.90.0-nightly"]);
        let err = format!("{:#}", nightly.libllvm().unwrap_err());
        assert!(err.contains("libLLVM.so.21.1-rust-1.90.0-nightly"), "{err}");
        assert!(err.contains("LLVM 22.1.4"), "{err}");
        fs::remove_dir_all(&nightly.sysroot).unwrap();
    }
}
