//! datafence development tasks, run as `cargo xtask <command>` (alias in .cargo/config.toml).

mod bench;
mod build;
mod demo;
mod fuzz;
mod matrix;
mod package;
mod regions;
mod setup;
mod test;
mod util;
mod verifier;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    bin_name = "cargo xtask",
    about = "datafence development tasks",
    after_help = "Run `cargo xtask setup` once per machine, then `cargo xtask test` (as root)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what the build and tests need: nightly + rust-src + clippy, bpf-linker, the
    /// system tools (ip, nft, ipset, iptables, bpftool, curl, python3), and the kernel
    /// matrix's QEMU, virtme-ng, virtiofsd and Debian kernels. Idempotent.
    Setup(setup::Options),
    /// Run every check in order, stopping at the first failure: rustfmt, clippy (host),
    /// clippy (eBPF), then all tests on the host kernel and the kernel tests in QEMU guests
    /// on Debian's 6.1 and 6.12 kernels (`--kernels`). Needs root.
    Test(test::Options),
    /// Build the release agent and print the path of the binary.
    Build(build::Options),
    /// Measure the datapath side by side with an empty program, the kernel LPM trie,
    /// nftables and ipset; tables on stdout and in target/bench/results.json. Needs root.
    Bench(bench::Options),
    /// The demo: a sandbox of network namespaces where the real agent keeps user data in
    /// eu-west and eu-north and blocks it towards us-east. Needs root; leaves nothing behind.
    Demo(demo::Options),
    /// Build the Debian package (cargo-deb) and check its contents.
    Package(package::Options),
    /// Run a cargo-fuzz target (packet_parse, policy_parse), seeded from policies/ and
    /// crafted frames; `--seconds N` to stop after N seconds.
    Fuzz(fuzz::Options),
    /// Generate policies/regions/cloud/*.txt (EU/EEA, European non-EU, other, global,
    /// ambiguous) from a cloud-provider range list (CSV: cidr,provider,region,service).
    Regions(regions::Options),
    /// Load every program and print the verifier's work on each (`insns=N`), built with the
    /// pinned eBPF toolchain or `--toolchain nightly-YYYY-MM-DD`. Needs root.
    Verifier(verifier::Options),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup(opts) => setup::run(opts),
        Command::Test(opts) => test::run(opts),
        Command::Build(opts) => build::run(opts),
        Command::Bench(opts) => bench::run(opts),
        Command::Demo(opts) => demo::run(opts),
        Command::Package(opts) => package::run(opts),
        Command::Fuzz(opts) => fuzz::run(opts),
        Command::Regions(opts) => regions::run(opts),
        Command::Verifier(opts) => verifier::run(opts),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` keeps the whole context chain on one line, which reads better in CI logs
            // than anyhow's multi-line Debug report.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
