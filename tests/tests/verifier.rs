//! The programs load, and the verifier's work on them stays within budget. The counts are
//! printed (run with --nocapture) because performance work tracks them.

use datafence::datapath::{Datapath, LoadOptions};

/// The kernel's limit is 1,000,000 processed instructions; a program that creeps toward
/// it will fail to load after the next feature, so fail here first. (About 340,000 for
/// the TC program.)
const VERIFIER_BUDGET: u32 = 700_000;

#[test]
fn programs_verify_well_within_the_kernel_budget() {
    integration_tests::require_root();
    let dp = Datapath::load(&LoadOptions::default()).expect("load");
    for (name, count) in dp.verified_instructions() {
        let count = count.expect("kernel reports verified instruction counts");
        println!("{name}: {count} instructions processed by the verifier");
        assert!(count < VERIFIER_BUDGET, "{name}: {count}");
    }
}

/// `cargo xtask bench` loads its baseline and cold-lookup programs from the same object;
/// they must keep loading as the lookups they wrap change.
#[test]
fn benchmark_programs_load() {
    integration_tests::require_root();
    Datapath::load(&LoadOptions {
        bench: true,
        ..LoadOptions::default()
    })
    .expect("load with the benchmark programs");
}
