//! Prints the verifier's work on every program of the agent's object, then on the benchmark
//! programs of the bench's object, one line each:
//! `kernel=… toolchain=… program=… insns=N`. `cargo xtask verifier` builds and runs it,
//! with the pinned toolchain or a candidate. Exits 1 when a program is over the budget.

use std::process::ExitCode;

use datafence::datapath::{Datapath, EBPF_BUILT_WITH, LoadOptions};
use integration_tests::VERIFIER_BUDGET;

fn main() -> ExitCode {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned());
    let mut over = 0;
    // The agent's object as shipped, then the bench's for its benchmark programs.
    for bench in [false, true] {
        let dp = match Datapath::load(&LoadOptions {
            bench,
            ..LoadOptions::default()
        }) {
            Ok(dp) => dp,
            Err(err) => {
                eprintln!("kernel={kernel} toolchain={EBPF_BUILT_WITH}: loading failed: {err:#}");
                return ExitCode::FAILURE;
            }
        };
        for (program, count) in dp.verified_instructions() {
            // The benchmark programs are not shipped; their counts are shown, not budgeted.
            let shipped = !program.starts_with("bench_");
            if shipped == bench {
                continue;
            }
            let insns = count.map_or_else(|| "unknown".to_owned(), |n| n.to_string());
            let verdict = match count {
                Some(n) if shipped && n > VERIFIER_BUDGET => {
                    over += 1;
                    " OVER BUDGET"
                }
                _ => "",
            };
            println!(
                "kernel={kernel} toolchain={EBPF_BUILT_WITH} program={program} insns={insns}{verdict}"
            );
        }
    }
    if over > 0 {
        eprintln!("{over} program(s) over the budget of {VERIFIER_BUDGET} processed instructions");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
