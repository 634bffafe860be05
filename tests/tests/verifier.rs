//! The programs load, and the verifier's work on them stays within budget. The counts are
//! printed (run with --nocapture) because performance work tracks them.

use datafence::datapath::{Datapath, EBPF_BUILT_WITH, LoadOptions};
use integration_tests::VERIFIER_BUDGET;

/// Every program, the stages included, stays within the budget on the kernel this runs on
/// (`cargo xtask test` runs it on each kernel of the matrix).
#[test]
fn programs_verify_well_within_the_kernel_budget() {
    integration_tests::require_root();
    let mut dp = Datapath::load(&LoadOptions::default()).expect("load");
    dp.load_socket_ring().expect("load the socket ring");
    let counts = dp.verified_instructions();
    assert_eq!(
        counts.len(),
        22,
        "two packet hooks, each with an entry, a parse stage for frames without Ethernet, an IPv4 options stage, a tunnel stage and a judge; and the socket ring's connect and sendmsg programs for each family, each with a judge and a report stage: {counts:?}"
    );
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    for (name, count) in counts {
        // Kernels before 5.16 do not report the count; the matrix's are all newer.
        let count = count.expect("kernel reports verified instruction counts");
        println!(
            "kernel={} toolchain={EBPF_BUILT_WITH} program={name} insns={count}",
            kernel.trim()
        );
        assert!(
            count <= VERIFIER_BUDGET,
            "{name}: {count} > {VERIFIER_BUDGET}"
        );
    }
}

/// `cargo xtask bench` loads its baseline and cold-lookup programs from the bench's object
/// (the same source, built with the `bench` feature); they must keep loading as the
/// lookups they wrap change.
#[test]
fn benchmark_programs_load() {
    integration_tests::require_root();
    Datapath::load(&LoadOptions {
        bench: true,
        ..LoadOptions::default()
    })
    .expect("load with the benchmark programs");
}
