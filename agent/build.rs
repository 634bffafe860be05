//! Builds the eBPF object (agent-ebpf) with the nightly toolchain and bpf-linker, so a
//! plain `cargo build` yields a `datafence` binary with the programs embedded.

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

fn check_prerequisites() -> anyhow::Result<Option<PathBuf>> {
    const FIX: &str = "run `cargo xtask setup` once on this machine, then build again";
    let sysroot = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("running `rustup run nightly rustc --print sysroot`")?;
    if !sysroot.status.success() {
        bail!("the nightly toolchain is missing; {FIX}");
    }
    let sysroot = PathBuf::from(String::from_utf8_lossy(&sysroot.stdout).trim());
    if !sysroot.join("lib/rustlib/src/rust/library/core").is_dir() {
        bail!("rust-src is not installed for the nightly toolchain; {FIX}");
    }
    let bundled = tools_dir().map(|d| d.join("bpf-linker").join("bin"));
    match bundled {
        Some(bin) if bin.join("bpf-linker").is_file() => Ok(Some(bin)),
        _ if on_path("bpf-linker") => Ok(None),
        _ => bail!("bpf-linker was not found on PATH or in the datafence tools folder; {FIX}"),
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
    for dir in ["agent-ebpf", "agent-common"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    let object = out_dir.join("datafence-ebpf");
    if env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        // Metadata-only builds (clippy, fuzzing the parsers): embed an empty object, never
        // a stale one, so a binary built this way cannot enforce an outdated datapath.
        std::fs::write(&object, [])?;
        return Ok(());
    }
    let linker_dir = match check_prerequisites() {
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
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "datafence-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Nightly,
    )
}
