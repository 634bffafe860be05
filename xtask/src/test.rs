//! `cargo xtask test`: every check CI runs, in order, stopping at the first failure.

use std::{
    env,
    ffi::OsString,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::fuzz;
use crate::util::{self, CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN, Privileges};

#[derive(Args)]
pub(crate) struct Options {
    /// Skip rustfmt, clippy and fuzzing; only run the tests.
    #[arg(long)]
    quick: bool,
    /// Arguments after `--` go to the test binaries, e.g. a name filter or `--test-threads=1`.
    #[arg(last = true, value_name = "TEST_ARGS")]
    test_args: Vec<OsString>,
}

/// Builds only for the BPF target; excluded from the host steps.
const EBPF_PACKAGE: &str = "datafence-ebpf";

struct Step {
    name: &'static str,
    /// Read cargo test's `test result:` lines from this step's stdout and add them up.
    counts_tests: bool,
    command: Command,
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

    let mut steps = Vec::new();
    let mut fmt = util::cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    steps.push(Step {
        counts_tests: false,
        name: "rustfmt",
        command: fmt,
    });

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
    steps.push(Step {
        counts_tests: false,
        name: "clippy (host)",
        command: clippy,
    });

    // aya-build compiles the eBPF crate without clippy, so lint it here, for the target it
    // really runs on. From the workspace root, where `-p` can find it despite default-members.
    let mut clippy_ebpf = util::cargo();
    clippy_ebpf.args([
        "+nightly",
        "clippy",
        "--package",
        EBPF_PACKAGE,
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]);
    steps.push(Step {
        counts_tests: false,
        name: "clippy (eBPF)",
        command: clippy_ebpf,
    });

    // The namespace tests run the real `datafence` binary, which `cargo test` only builds
    // for the agent crate's own integration tests: build it explicitly.
    let mut agent = util::cargo();
    agent.args(["build", "--package", "datafence", "--bin", "datafence"]);
    steps.push(Step {
        counts_tests: false,
        name: "build agent",
        command: agent,
    });

    let mut test = util::cargo();
    // The eBPF crate has no host tests, and building it for the host fails (see above).
    test.args(["test", "--workspace", "--exclude", EBPF_PACKAGE]);
    if !opts.test_args.is_empty() {
        test.arg("--").args(&opts.test_args);
    }
    steps.push(Step {
        counts_tests: true,
        name: "tests",
        command: test,
    });

    // A short run of each fuzz target (DATAFENCE_FUZZ_SECONDS each, default 20): enough to
    // catch a parser change that panics on the seeds or their near neighbours. Longer runs
    // are `cargo xtask fuzz <target> --seconds N`.
    if !opts.quick {
        let seconds = fuzz::brief_seconds()?;
        for (name, target) in [
            ("fuzz packets", "packet_parse"),
            ("fuzz policy", "policy_parse"),
        ] {
            debug_assert!(fuzz::TARGETS.contains(&target));
            steps.push(Step {
                counts_tests: false,
                name,
                command: fuzz::command(target, Some(seconds))?,
            });
        }
    }

    let mut outcomes: Vec<Outcome> = steps
        .iter()
        .map(|step| {
            if opts.quick && !matches!(step.name, "tests" | "build agent") {
                Outcome::Skipped
            } else {
                Outcome::NotRun
            }
        })
        .collect();

    let count = steps.len();
    let total = Instant::now();
    let mut totals = TestTotals::default();
    for index in 0..count {
        if matches!(outcomes[index], Outcome::Skipped) {
            continue;
        }
        let name = steps[index].name;
        eprintln!("\n==> [{}/{count}] {name}", index + 1);
        let start = Instant::now();
        let result = if steps[index].counts_tests {
            run_counting(&mut steps[index].command, &mut totals)
        } else {
            util::run(&mut steps[index].command)
        };
        let elapsed = start.elapsed();
        match result {
            Ok(()) => outcomes[index] = Outcome::Passed(elapsed),
            Err(err) => {
                outcomes[index] = Outcome::Failed(elapsed);
                print_summary(&steps, &outcomes, total.elapsed());
                bail!("{name} failed: {err:#}");
            }
        }
    }
    print_summary(&steps, &outcomes, total.elapsed());
    // One plain closing line for whoever reads only the end of the log.
    println!(
        "datafence: {} passed, {} failed",
        totals.passed, totals.failed
    );
    Ok(())
}

#[derive(Default)]
struct TestTotals {
    passed: u64,
    failed: u64,
}

impl TestTotals {
    /// Adds a libtest summary line: `test result: ok. 18 passed; 0 failed; ...`.
    fn add(&mut self, line: &str) {
        let Some(rest) = line.strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split([';', '.']) {
            let mut words = part.split_whitespace();
            match (
                words.next().and_then(|n| n.parse::<u64>().ok()),
                words.next(),
            ) {
                (Some(n), Some("passed")) => self.passed += n,
                (Some(n), Some("failed")) => self.failed += n,
                _ => {}
            }
        }
    }
}

/// Runs `cmd` like [`util::run`], passing its stdout through while adding up the
/// libtest summary lines in it.
fn run_counting(cmd: &mut std::process::Command, totals: &mut TestTotals) -> Result<()> {
    use std::io::{BufRead as _, Write as _};
    let shown = util::display(cmd);
    eprintln!("$ {shown}");
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning `{shown}`"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut out = std::io::stdout();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line?;
        totals.add(&line);
        writeln!(out, "{line}")?;
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
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
            eprintln!("           rerun: {}", util::display(&step.command));
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
