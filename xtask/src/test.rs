//! `cargo xtask test`: every check CI runs, in order, stopping at the first failure; except
//! that the tests run on every kernel of the matrix (see `matrix`) before a failure on any of
//! them fails the run.

use std::{
    env,
    ffi::OsString,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use clap::Args;

use crate::fuzz;
use crate::matrix::{self, KernelReport, Target};
use crate::util::{self, CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN, Privileges};
use crate::vm;

#[derive(Args)]
pub(crate) struct Options {
    /// Skip rustfmt, clippy and fuzzing; only run the tests.
    #[arg(long)]
    quick: bool,
    /// The kernels to test on, comma-separated: `host` runs every test on this machine's
    /// kernel; `6.1` and `6.12` run the kernel tests in a QEMU guest booted with that Debian
    /// kernel (installed by `cargo xtask setup`). Default: all three.
    #[arg(long, value_delimiter = ',', value_parser = Target::parse, value_name = "KERNELS")]
    kernels: Vec<Target>,
    /// Which kernel test binaries the QEMU guests run, comma-separated (e.g.
    /// `verifier,prog_test_run`), `smoke` (those two: a few minutes) or `all`. Default:
    /// all, as CI runs them (about 20 minutes emulated, both guests side by side).
    #[arg(long, value_delimiter = ',', value_name = "BINARIES")]
    guest_tests: Vec<String>,
    /// Arguments after `--` go to the test binaries, e.g. a name filter or `--test-threads=1`.
    #[arg(last = true, value_name = "TEST_ARGS")]
    test_args: Vec<OsString>,
}

/// Builds only for the BPF target; excluded from the host steps.
const EBPF_PACKAGE: &str = "datafence-ebpf";

struct Step {
    name: String,
    action: Action,
    command: Command,
}

enum Action {
    /// Run the command; a failure stops everything.
    Check,
    /// Build the tests with the command and keep the kernel test binaries.
    BuildTests,
    /// The tests on one kernel (the command is `cargo test`, for the host); a failure here
    /// lets the other kernels run first.
    Tests(Target),
}

enum Outcome {
    Passed(Duration),
    Failed(Duration),
    Skipped,
    NotRun,
}

pub(crate) fn run(opts: Options) -> Result<()> {
    // Checked first: finding out after ten minutes of clippy that the tests cannot run at all
    // helps nobody.
    require_privileges()?;

    let mut steps = check_steps()?;
    steps.extend(test_steps(&opts));
    if !opts.quick {
        steps.extend(fuzz_steps()?);
    }

    let mut outcomes: Vec<Outcome> = steps
        .iter()
        .map(|step| {
            if opts.quick && matches!(step.action, Action::Check) && step.name != "build agent" {
                Outcome::Skipped
            } else {
                Outcome::NotRun
            }
        })
        .collect();

    let count = steps.len();
    let total = Instant::now();
    let mut binaries = Vec::new();
    let mut reports: Vec<KernelReport> = Vec::new();
    for index in 0..count {
        // Skipped, or a guest already run alongside an earlier one.
        if !matches!(outcomes[index], Outcome::NotRun) {
            continue;
        }
        let name = steps[index].name.clone();
        eprintln!("\n==> [{}/{count}] {name}", index + 1);
        let start = Instant::now();
        let step = &mut steps[index];
        let result = match step.action {
            Action::Check => util::run(&mut step.command),
            Action::BuildTests => matrix::build_tests(&mut step.command).map(|built| {
                binaries = built;
            }),
            Action::Tests(Target::Host) => {
                let report = matrix::run_on_host(&mut step.command);
                outcomes[index] = Outcome::tests(&report);
                reports.push(report);
                continue;
            }
            Action::Tests(Target::Guest(_)) => {
                // This step and the guest steps after it, all at once.
                let guests: Vec<(usize, &'static vm::Kernel)> = steps
                    .iter()
                    .enumerate()
                    .skip(index)
                    .filter_map(|(i, step)| match step.action {
                        Action::Tests(Target::Guest(kernel)) => Some((i, kernel)),
                        _ => None,
                    })
                    .collect();
                if guests.len() > 1 {
                    let names: Vec<&str> = guests.iter().map(|(_, k)| k.name).collect();
                    eprintln!("    with {} alongside", names[1..].join(", "));
                }
                let kernels: Vec<&'static vm::Kernel> = guests.iter().map(|(_, k)| *k).collect();
                let chosen = matrix::guest_binaries(&binaries, &opts.guest_tests)?;
                let guest_reports = matrix::run_in_guests(&kernels, &chosen, &opts.test_args);
                for ((i, _), report) in guests.into_iter().zip(guest_reports) {
                    outcomes[i] = Outcome::tests(&report);
                    reports.push(report);
                }
                continue;
            }
        };
        let elapsed = start.elapsed();
        match result {
            Ok(()) => outcomes[index] = Outcome::Passed(elapsed),
            Err(err) => {
                outcomes[index] = Outcome::Failed(elapsed);
                close(&steps, &outcomes, &reports, total.elapsed());
                bail!("{name} failed: {err:#}");
            }
        }
    }
    close(&steps, &outcomes, &reports, total.elapsed());
    let failed: Vec<&str> = steps
        .iter()
        .zip(&outcomes)
        .filter(|(_, outcome)| matches!(outcome, Outcome::Failed(_)))
        .map(|(step, _)| step.name.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}

/// The checks before the tests: formatting, the lints, and the agent binary.
fn check_steps() -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    let mut fmt = util::cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    steps.push(Step::check("rustfmt", fmt));

    // Also builds the eBPF object, through agent/build.rs. The eBPF crate itself is left out:
    // `--workspace` would check it for the host with features unified across the workspace,
    // so it would see datafence-common's `user` feature, hence aya and std, and fail on a
    // duplicate `panic_impl`. The next step lints it for the BPF target instead.
    let mut clippy = util::cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--exclude",
        EBPF_PACKAGE,
        "--all-targets",
    ]);
    clippy.args(["--", "-D", "warnings"]);
    steps.push(Step::check("clippy (host)", clippy));

    // aya-build compiles the eBPF crate without clippy, so lint it here, for the target it
    // really runs on. From the workspace root, where `-p` can find it despite default-members.
    // Twice: as shipped, and with the benchmark programs of the bench's object.
    let ebpf_toolchain = crate::setup::ebpf_toolchain()?;
    for (name, features) in [
        ("clippy (eBPF)", None),
        ("clippy (eBPF, bench)", Some("bench")),
    ] {
        let mut clippy_ebpf = util::cargo();
        clippy_ebpf.arg(format!("+{ebpf_toolchain}"));
        clippy_ebpf.args([
            "clippy",
            "--package",
            EBPF_PACKAGE,
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
        ]);
        if let Some(features) = features {
            clippy_ebpf.args(["--features", features]);
        }
        clippy_ebpf.args(["--", "-D", "warnings"]);
        steps.push(Step::check(name, clippy_ebpf));
    }

    // The namespace tests run the real `datafence` binary, which `cargo test` only builds
    // for the agent crate's own integration tests: build it explicitly.
    let mut agent = util::cargo();
    agent.args(["build", "--package", "datafence", "--bin", "datafence"]);
    steps.push(Step::check("build agent", agent));
    Ok(steps)
}

/// Building the tests, then the tests on each kernel asked for.
fn test_steps(opts: &Options) -> Vec<Step> {
    let mut steps = Vec::new();
    // The eBPF crate has no host tests, and building it for the host fails (see above).
    let test = || {
        let mut test = util::cargo();
        test.args(["test", "--workspace", "--exclude", EBPF_PACKAGE]);
        test
    };
    // Built once: the host's `cargo test` finds them up to date, and the guests run the
    // kernel test binaries as they are, over their read-only view of this filesystem.
    steps.push(Step {
        name: "build tests".into(),
        action: Action::BuildTests,
        command: test(),
    });
    let kernels = if opts.kernels.is_empty() {
        Target::all()
    } else {
        opts.kernels.clone()
    };
    for target in kernels {
        let mut command = test();
        // Every failing test binary, not only the first, so the summary names them all.
        command.arg("--no-fail-fast");
        if !opts.test_args.is_empty() {
            command.arg("--").args(&opts.test_args);
        }
        steps.push(Step {
            name: format!("tests ({})", target.name()),
            action: Action::Tests(target),
            command,
        });
    }
    steps
}

/// A short run of each fuzz target (DATAFENCE_FUZZ_SECONDS each, default 20): enough to
/// catch a parser change that panics on the seeds or their near neighbours. Longer runs
/// are `cargo xtask fuzz <target> --seconds N`.
fn fuzz_steps() -> Result<Vec<Step>> {
    let mut steps = Vec::new();
    let seconds = fuzz::brief_seconds()?;
    for (name, target) in [
        ("fuzz packets", "packet_parse"),
        ("fuzz policy", "policy_parse"),
    ] {
        debug_assert!(fuzz::TARGETS.contains(&target));
        steps.push(Step::check(name, fuzz::command(target, Some(seconds))?));
    }
    Ok(steps)
}

impl Outcome {
    fn tests(report: &KernelReport) -> Self {
        if report.ok() {
            Outcome::Passed(report.elapsed())
        } else {
            Outcome::Failed(report.elapsed())
        }
    }
}

impl Step {
    fn check(name: &str, command: Command) -> Self {
        Self {
            name: name.to_owned(),
            action: Action::Check,
            command,
        }
    }
}

/// The summary of steps, the kernel lines, and one plain closing line for whoever reads only
/// the end of the log, adding up every kernel.
fn close(steps: &[Step], outcomes: &[Outcome], reports: &[KernelReport], total: Duration) {
    print_summary(steps, outcomes, total);
    matrix::print_reports(reports);
    let passed: u64 = reports.iter().map(KernelReport::passed).sum();
    let failed: u64 = reports.iter().map(KernelReport::failed).sum();
    println!("datafence: {passed} passed, {failed} failed");
}

fn print_summary(steps: &[Step], outcomes: &[Outcome], total: Duration) {
    eprintln!("\n==> summary");
    for (step, outcome) in steps.iter().zip(outcomes) {
        let (label, time) = match outcome {
            Outcome::Passed(t) => ("ok", format!("{:>7.1}s", t.as_secs_f64())),
            Outcome::Failed(t) => ("FAILED", format!("{:>7.1}s", t.as_secs_f64())),
            Outcome::Skipped => ("skipped", String::new()),
            Outcome::NotRun => ("not run", String::new()),
        };
        eprintln!("  {label:<8} {:<14} {time}", step.name);
        if matches!(outcome, Outcome::Failed(_)) {
            let rerun = match step.action {
                Action::Tests(Target::Guest(kernel)) => {
                    format!("cargo xtask test --quick --kernels {}", kernel.name)
                }
                _ => util::display(&step.command),
            };
            eprintln!("           rerun: {rerun}");
        }
    }
    eprintln!("  total    {:>23.1}s", total.as_secs_f64());
}

/// The integration tests load eBPF programs and build network namespaces.
fn require_privileges() -> Result<()> {
    let privileges = Privileges::current()?;
    let in_ci = env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let context = if in_ci {
        " (CI=true: the CI job must run .ci/run as root, with CAP_BPF and CAP_NET_ADMIN)"
    } else {
        ""
    };
    if privileges.euid != 0 {
        bail!(
            "the test suite must run as root: it needs CAP_BPF and CAP_NET_ADMIN to load eBPF \
             programs and build network namespaces{context}; run it from a root shell, e.g. \
             `sudo -E env \"PATH=$PATH\" cargo xtask test`"
        );
    }
    let mut missing = Vec::new();
    if !privileges.has_cap(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    // Kernels before 5.8 have no CAP_BPF and ask for CAP_SYS_ADMIN instead.
    if !privileges.has_cap(CAP_BPF) && !privileges.has_cap(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !missing.is_empty() {
        bail!(
            "running as root but without {}{context}; an unprivileged container cannot run the \
             test suite (use a VM or a --privileged container)",
            missing.join(" and ")
        );
    }
    Ok(())
}
