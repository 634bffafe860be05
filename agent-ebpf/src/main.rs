//! The eBPF object. Built for the BPF target by agent/build.rs; on any other target (a
//! host `cargo build --workspace` or clippy run) it compiles to an empty program.
#![cfg_attr(target_arch = "bpf", no_std, no_main)]

#[cfg(target_arch = "bpf")]
mod program;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
