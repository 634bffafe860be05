//! Builds the eBPF object (agent-ebpf) with the pinned nightly (agent-ebpf/rust-toolchain.toml)
//! and the bpf-linker built against it, so a plain `cargo build` yields a `datafence` binary
//! with the programs embedded.
//!
//! With the agent's `bench` feature it also builds the bench's object: the same source with
//! datafence-ebpf's `bench` feature, which adds the benchmark programs and maps. The shipped
//! object never carries them.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// Where `cargo xtask setup` puts the tools it builds; keep in step with xtask/src/setup.rs.
fn tools_dir() -> Option<PathBuf> {
    if let Some(dir) = env::var_os("DATAFENCE_TOOLS_DIR") {
        return Some(PathBuf::from(dir));
    }
    let cache = env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(cache.join("datafence").join("tools"))
}

fn on_path(program: &str) -> bool {
    env::var_os("PATH")
        .is_some_and(|paths| env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// The toolchain that builds the eBPF object; xtask/src/setup.rs reads it the same way.
fn ebpf_toolchain(workspace: &Path) -> anyhow::Result<String> {
    if let Some(name) = env::var_os("DATAFENCE_EBPF_TOOLCHAIN") {
        return name
            .into_string()
            .map_err(|_| anyhow::anyhow!("DATAFENCE_EBPF_TOOLCHAIN is not UTF-8"));
    }
    let path = workspace.join("agent-ebpf/rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", path.display());
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .map(str::trim)
        .filter_map(|line| line.strip_prefix("channel"))
        .filter_map(|rest| rest.trim_start().strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').to_owned())
        .find(|value| value.starts_with("nightly-"))
        .with_context(|| format!("{}: no dated nightly `channel`", path.display()))
}

fn check_prerequisites(toolchain: &str) -> anyhow::Result<Option<PathBuf>> {
    const FIX: &str = "run `cargo xtask setup` once on this machine, then build again";
    let sysroot = Command::new("rustup")
        .args(["run", toolchain, "rustc", "--print", "sysroot"])
        .env("RUSTUP_AUTO_INSTALL", "0")
        .output()
        .with_context(|| format!("running `rustup run {toolchain} rustc --print sysroot`"))?;
    if !sysroot.status.success() {
        bail!("the eBPF toolchain {toolchain} is not installed; {FIX}");
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        bail!("rust-src is not installed for {toolchain}; {FIX}");
    }
    let bundled = tools_dir().map(|d| d.join("bpf-linker").join(toolchain).join("bin"));
    match bundled {
        Some(bin) if bin.join("bpf-linker").is_file() => Ok(Some(bin)),
        // A linker on PATH is used only on request: it may be built for another LLVM.
        _ if env::var_os("DATAFENCE_BPF_LINKER_FROM_PATH").is_some() && on_path("bpf-linker") => {
            Ok(None)
        }
        _ => bail!("no bpf-linker built for {toolchain} in the datafence tools folder; {FIX}"),
    }
}

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("no manifest dir")?);
    let workspace = manifest_dir.parent().context("agent/ has no parent")?;
    // Declared before any early return: a build that skipped the eBPF object must rerun
    // once the skip is lifted, and the object depends on the shared crate as well as on
    // its own.
    println!("cargo:rerun-if-env-changed=DATAFENCE_TOOLS_DIR");
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    println!("cargo:rerun-if-env-changed=DATAFENCE_EBPF_TOOLCHAIN");
    println!("cargo:rerun-if-env-changed=DATAFENCE_BPF_LINKER_FROM_PATH");
    for dir in ["agent-ebpf", "agent-common"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join("datafence-ebpf");
    let bench_object = env::var_os("CARGO_FEATURE_BENCH").map(|_| out_dir.join(BENCH_OBJECT));
    if env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        println!("cargo:rustc-env=DATAFENCE_EBPF_BUILT_WITH=none (AYA_BUILD_SKIP)");
        // Metadata-only builds (clippy, fuzzing the parsers): embed an empty object, never
        // a stale one, so a binary built this way cannot enforce an outdated datapath.
        for path in std::iter::once(&object).chain(&bench_object) {
            std::fs::write(path, [])?;
        }
        return Ok(());
    }
    let toolchain = ebpf_toolchain(workspace)?;
    // The agent reports which compiler built its programs: the verifier's work depends on it.
    println!("cargo:rustc-env=DATAFENCE_EBPF_BUILT_WITH={toolchain}");
    let linker_dir = match check_prerequisites(&toolchain) {
        Ok(dir) => dir,
        Err(err) => {
            println!("cargo:warning=datafence: cannot build the eBPF programs: {err:#}");
            return Err(err);
        }
    };
    if let Some(dir) = &linker_dir {
        println!(
            "cargo:rerun-if-changed={}",
            dir.join("bpf-linker").display()
        );
        let path = env::var_os("PATH").unwrap_or_default();
        let joined = env::join_paths(std::iter::once(dir.clone()).chain(env::split_paths(&path)))?;
        // SAFETY: build scripts are single-threaded; the variable is read by the child
        // cargo that aya-build spawns.
        unsafe { env::set_var("PATH", joined) };
    }
    let ebpf_dir = Some(workspace.join("agent-ebpf"))
        .filter(|p| Path::new(p).is_dir())
        .context("agent-ebpf not found beside agent/")?;
    let ebpf_dir = ebpf_dir.to_str().context("non-UTF-8 path")?;
    let build = |features: &[&str]| {
        aya_build::build_ebpf(
            [aya_build::Package {
                name: "datafence-ebpf",
                root_dir: ebpf_dir,
                features,
                ..Default::default()
            }],
            aya_build::Toolchain::Custom(&toolchain),
        )
    };
    // aya-build leaves each build at OUT_DIR/datafence-ebpf (the binary's name), so the
    // bench's object is built first and moved aside. Both builds share aya-build's target
    // directory, where cargo keeps each feature set's artifacts: switching costs a link.
    if let Some(bench_object) = &bench_object {
        build(&["bench"])?;
        std::fs::rename(&object, bench_object)
            .with_context(|| format!("moving the bench object to {}", bench_object.display()))?;
        expect_bench_programs(bench_object, true)?;
    }
    build(&[])?;
    expect_bench_programs(&object, false)
}

/// The bench's object, beside the agent's in OUT_DIR; `datapath::EBPF_BENCH_OBJECT`.
const BENCH_OBJECT: &str = "datafence-ebpf-bench";

/// Checks that an object carries the benchmark programs, or does not: the shipped object
/// must not, and a mix-up between the two builds must not go unnoticed.
fn expect_bench_programs(object: &Path, expected: bool) -> anyhow::Result<()> {
    // The name of one benchmark program (datafence_common::program_names::BENCH_EMPTY).
    const NEEDLE: &[u8] = b"bench_empty";
    let bytes = std::fs::read(object).with_context(|| format!("reading {}", object.display()))?;
    let found = bytes.windows(NEEDLE.len()).any(|w| w == NEEDLE);
    if found != expected {
        bail!(
            "{}: benchmark programs {}, expected {}",
            object.display(),
            if found { "present" } else { "absent" },
            if expected { "present" } else { "absent" },
        );
    }
    Ok(())
}
