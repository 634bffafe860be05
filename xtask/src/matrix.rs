//! The kernel matrix of `cargo xtask test`: every test on the host kernel, and the kernel
//! tests again in a QEMU guest for each kernel of [`vm::KERNELS`]. Each kernel gets its own
//! line in the closing summary, with the names and first error lines of its failures; one
//! kernel failing does not stop the others.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::util::{self, quote};
use crate::vm::{self, KERNELS};

/// The test binaries of the integration-tests crate (tests/tests/*.rs) that exercise the
/// kernel: BPF_PROG_TEST_RUN, the verifier, and the namespace tests with the real agent.
/// Each guest runs these.
const KERNEL_TESTS: &[&str] = &[
    "capabilities",
    "netns_agent",
    "netns_attach",
    "netns_cgroups",
    "netns_datapath",
    "netns_interfaces",
    "netns_monitoring",
    "netns_observability",
    "netns_prometheus",
    "netns_reliability",
    "netns_sockets",
    "prog_test_run",
    "property",
    "verifier",
];

/// What `--guest-tests smoke` runs: every program loaded and verified within budget on
/// each kernel, and the crafted frames of `BPF_PROG_TEST_RUN` judged there (about 2.5
/// minutes for both guests side by side), for a quick look at one kernel. By default the
/// guests run every binary of [`KERNEL_TESTS`], as CI does.
pub(crate) const GUEST_SMOKE: &[&str] = &["prog_test_run", "verifier"];

/// The binaries the guests run: `names`, `smoke` ([`GUEST_SMOKE`]) or, by default and
/// with `all`, every kernel test binary.
pub(crate) fn guest_binaries(binaries: &[TestBinary], names: &[String]) -> Result<Vec<TestBinary>> {
    if names.is_empty() || names.iter().any(|n| n == "all") {
        return Ok(binaries.to_vec());
    }
    let wanted: Vec<&str> = if names.iter().any(|n| n == "smoke") {
        GUEST_SMOKE.to_vec()
    } else {
        names.iter().map(String::as_str).collect()
    };
    if let Some(unknown) = wanted.iter().find(|n| !KERNEL_TESTS.contains(n)) {
        bail!(
            "--guest-tests: `{unknown}` is not a kernel test binary; there are: {}",
            KERNEL_TESTS.join(", ")
        );
    }
    Ok(binaries
        .iter()
        .filter(|b| wanted.contains(&b.name.as_str()))
        .cloned()
        .collect())
}

/// The agent crate's own integration tests (agent/tests/*.rs): they read files and run the
/// CLI without the kernel's help, need no root, and run under a plain `cargo test`; the
/// host runs them. A test below checks that every file in tests/tests is in
/// [`KERNEL_TESTS`] and every file in agent/tests in this list.
#[cfg_attr(not(test), expect(dead_code, reason = "only the list check reads it"))]
const HOST_ONLY_TESTS: &[&str] = &[
    "cli",
    "deploy_assets",
    "docs",
    "host_services",
    "hostile_files",
    "policies",
];

/// Tests of [`KERNEL_TESTS`] that a guest leaves to the other kernels; the reason is
/// printed with the results.
struct GuestSkip {
    /// The kernels that skip it ([`vm::Kernel::name`]); empty for every guest.
    kernels: &'static [&'static str],
    binary: &'static str,
    /// A libtest `--skip` filter: every test whose name contains it.
    test: &'static str,
    why: &'static str,
}

const GUEST_SKIPS: &[GuestSkip] = &[
    GuestSkip {
        kernels: &[],
        binary: "property",
        test: "userspace_explain_matches_reference",
        why: "userspace only (explain against the reference model, 512 cases): the host runs \
              it, and emulated it takes over ten minutes",
    },
    // The tests written once per attachment kind (`for_each_tc_attach!`) run their clsact
    // variant on 6.1, which has nothing else, and on the host (a tcx-capable kernel,
    // like 6.12); 6.12 runs its own kind, tcx.
    GuestSkip {
        kernels: &["6.12"],
        binary: "netns_reliability",
        test: "::clsact",
        why: "clsact variants run on 6.1 and the host; this kernel runs the tcx ones",
    },
    GuestSkip {
        kernels: &["6.12"],
        binary: "capabilities",
        test: "::clsact",
        why: "clsact variants run on 6.1 and the host; this kernel runs the tcx ones",
    },
];

impl GuestSkip {
    fn applies(&self, kernel: &str, binary: &str) -> bool {
        self.binary == binary && (self.kernels.is_empty() || self.kernels.contains(&kernel))
    }
}

/// Settings of the guests' test runs that differ from the host's, as `(variable, value,
/// why)`; the reason is printed with the results.
const GUEST_ENV: &[(&str, &str, &str)] = &[
    (
        "PROPTEST_CASES",
        "8",
        "property tests run 8 cases (24 on the host): each case compiles and applies a \
         policy and runs its frames, which takes seconds emulated",
    ),
    (
        "DATAFENCE_TEST_RESTART_ROUNDS",
        "6",
        "the kill -9 test restarts its agent 6 times (20 on the host): each start loads and \
         verifies the programs, which takes half a minute emulated, and this test was the \
         last of its binary to finish on both kernels",
    ),
];

/// `DATAFENCE_TEST_SLOWDOWN` in the guests: the tests stretch their waits (for an agent to
/// start, a reload to land) by this factor. Emulated, with the verifier's work and the maps'
/// allocation, an agent takes 30 s and more to start where the host needs one or two.
const GUEST_SLOWDOWN: u32 = 10;

/// Emulated CPUs per guest: as many as the machines have cores.
const GUEST_CPUS: u32 = 2;

/// A guest that runs longer than this is killed and its kernel counted as failed, so that a
/// hung test cannot eat CI's 90 minutes: setup and builds (15 minutes on a fresh clone),
/// the host's tests (4), the guests side by side at their limit and fuzzing (6) still end
/// inside them. The whole set took 46 minutes on 6.12 and 50 on 6.1 (December 2026), so
/// 50 minutes no longer left 6.1 room. On a slower day (2026-12-03) 6.12 took 59 minutes
/// and 6.1 was killed at 62 in its last binary, about three minutes short, with the run
/// as a whole at 79 minutes; 68 keeps a hung guest's run under 90.
const GUEST_TIMEOUT: Duration = Duration::from_mins(68);

/// Lines the guest's script prints around the test binaries' own output.
const MARK: &str = "datafence-matrix:";

/// A kernel the tests run on.
#[derive(Clone, Copy)]
pub(crate) enum Target {
    Host,
    Guest(&'static vm::Kernel),
}

impl Target {
    /// Every kernel, as `cargo xtask test` runs them when not told otherwise.
    pub(crate) fn all() -> Vec<Target> {
        std::iter::once(Target::Host)
            .chain(KERNELS.iter().map(Target::Guest))
            .collect()
    }

    /// For clap: `host` or the name of a kernel of [`KERNELS`].
    pub(crate) fn parse(name: &str) -> Result<Target, String> {
        if name == "host" {
            return Ok(Target::Host);
        }
        vm::Kernel::by_name(name).map(Target::Guest).ok_or_else(|| {
            let names: Vec<&str> = Target::all().iter().copied().map(Target::name).collect();
            format!(
                "unknown kernel `{name}`: expected one of {}",
                names.join(", ")
            )
        })
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Target::Host => "host",
            Target::Guest(kernel) => kernel.name,
        }
    }
}

/// A kernel test binary built on the host.
#[derive(Clone)]
pub(crate) struct TestBinary {
    name: String,
    path: PathBuf,
    /// Its package's directory, where `cargo test` would run it.
    dir: PathBuf,
}

/// Builds every test once, with `cmd` (a `cargo test --no-run`), and returns the kernel test
/// binaries among them, for the guests to run.
pub(crate) fn build_tests(cmd: &mut Command) -> Result<Vec<TestBinary>> {
    cmd.args(["--no-run", "--message-format=json-render-diagnostics"]);
    let shown = util::display(cmd);
    eprintln!("$ {shown}");
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("spawning `{shown}`"))?;
    if !out.status.success() {
        bail!("`{shown}` failed ({})", out.status);
    }
    let stdout = String::from_utf8(out.stdout).context("cargo printed non-UTF-8 JSON")?;
    let mut binaries = kernel_test_binaries(&stdout)?;
    // In cargo's build order otherwise, which changes from run to run.
    binaries.sort_by(|a, b| a.name.cmp(&b.name));
    let missing: Vec<&str> = KERNEL_TESTS
        .iter()
        .copied()
        .filter(|name| !binaries.iter().any(|binary| binary.name == *name))
        .collect();
    if !missing.is_empty() {
        bail!(
            "cargo built no test binary for {} (KERNEL_TESTS in xtask/src/matrix.rs)",
            missing.join(", ")
        );
    }
    Ok(binaries)
}

/// The kernel test binaries among cargo's `compiler-artifact` messages.
fn kernel_test_binaries(json_lines: &str) -> Result<Vec<TestBinary>> {
    let mut binaries = Vec::new();
    for line in json_lines.lines().filter(|line| line.starts_with('{')) {
        let message: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("cargo JSON: {line}"))?;
        if message["reason"] != "compiler-artifact" || message["profile"]["test"] != true {
            continue;
        }
        let (Some(name), Some(path), Some(manifest)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
            message["manifest_path"].as_str(),
        ) else {
            continue;
        };
        let is_integration_test = message["target"]["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|kind| kind == "test"));
        if is_integration_test && KERNEL_TESTS.contains(&name) {
            binaries.push(TestBinary {
                name: name.to_owned(),
                path: PathBuf::from(path),
                dir: Path::new(manifest)
                    .parent()
                    .context("manifest path has a parent")?
                    .to_owned(),
            });
        }
    }
    Ok(binaries)
}

/// What one kernel's run came to.
pub(crate) struct KernelReport {
    target: &'static str,
    /// `uname -r`, once known.
    release: Option<String>,
    log: LibtestLog,
    /// Failures outside any test: a binary that crashed, a guest that hung.
    problems: Vec<String>,
    /// Tests left out on this kernel, each with its reason.
    skipped: Vec<String>,
    /// How the run differs from the host's, each with its reason.
    notes: Vec<String>,
    elapsed: Duration,
}

impl KernelReport {
    fn new(target: Target) -> Self {
        Self {
            target: target.name(),
            release: None,
            log: LibtestLog::default(),
            problems: Vec::new(),
            skipped: Vec::new(),
            notes: Vec::new(),
            elapsed: Duration::ZERO,
        }
    }

    pub(crate) fn passed(&self) -> u64 {
        self.log.passed
    }

    /// Tests that failed: as libtest counted them, or as many as were seen failing when a
    /// binary never got to count (a guest killed mid-run).
    pub(crate) fn failed(&self) -> u64 {
        self.log.failed.max(self.log.failures.len() as u64)
    }

    pub(crate) fn elapsed(&self) -> Duration {
        self.elapsed
    }

    pub(crate) fn ok(&self) -> bool {
        self.failed() == 0 && self.problems.is_empty()
    }
}

/// Runs every test on the host kernel with `cargo test` (`cmd`).
pub(crate) fn run_on_host(cmd: &mut Command) -> KernelReport {
    timed(Target::Host, |report| run_host(cmd, report))
}

/// Runs the kernel test `binaries` with `test_args` in a guest per kernel, all at once.
/// TCG is CPU-bound, but the tests spend much of their time waiting (for an agent to
/// start, for traffic to settle), which the other guest fills; the wall time is the slowest
/// guest's rather than the sum. The host's own tests have already run, on a quiet machine.
pub(crate) fn run_in_guests(
    kernels: &[&'static vm::Kernel],
    binaries: &[TestBinary],
    test_args: &[std::ffi::OsString],
) -> Vec<KernelReport> {
    std::thread::scope(|scope| {
        let guests: Vec<_> = kernels
            .iter()
            .map(|&kernel| {
                scope.spawn(move || {
                    timed(Target::Guest(kernel), |report| {
                        run_guest(kernel, binaries, test_args, report)
                    })
                })
            })
            .collect();
        guests
            .into_iter()
            .zip(kernels)
            .map(|(guest, kernel)| {
                guest.join().unwrap_or_else(|_| {
                    let mut report = KernelReport::new(Target::Guest(kernel));
                    report
                        .problems
                        .push("the thread running the guest panicked".into());
                    report
                })
            })
            .collect()
    })
}

fn timed(target: Target, body: impl FnOnce(&mut KernelReport) -> Result<()>) -> KernelReport {
    let start = Instant::now();
    let mut report = KernelReport::new(target);
    if let Err(err) = body(&mut report) {
        report.problems.push(format!("{err:#}"));
    }
    report.elapsed = start.elapsed();
    report
}

fn run_host(cmd: &mut Command, report: &mut KernelReport) -> Result<()> {
    report.release = fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|release| release.trim().to_owned());
    let shown = util::display(cmd);
    eprintln!("$ {shown}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning `{shown}`"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let mut out = std::io::stdout();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        report.log.add(&line);
        writeln!(out, "{line}")?;
    }
    let status = child.wait()?;
    if !status.success() && report.log.failed == 0 {
        bail!("`{shown}` failed ({status}) with no failed test: see its output above");
    }
    Ok(())
}

fn run_guest(
    kernel: &'static vm::Kernel,
    binaries: &[TestBinary],
    test_args: &[std::ffi::OsString],
    report: &mut KernelReport,
) -> Result<()> {
    let dir = util::workspace_root()
        .join("target")
        .join("matrix")
        .join(kernel.name);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let script = dir.join("run.sh");
    fs::write(&script, guest_script(kernel, binaries, test_args))
        .with_context(|| format!("writing {}", script.display()))?;

    let mut cmd = kernel.boot(GUEST_CPUS, &script)?;
    let shown = util::display(&cmd);
    eprintln!("$ {shown}");
    // Its own process group, so a timeout ends QEMU and virtiofsd along with vng. Both
    // streams through pipes: virtme-ng reopens its stderr for writing, which truncates a log
    // file that `cargo xtask test ... 2>&1 >log` handed down.
    let mut child = cmd
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning `{shown}`"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let stderr = child.stderr.take().context("child stderr")?;
    let prefix = format!("[{}] ", kernel.name);
    let stderr_prefix = prefix.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{stderr_prefix}{}", line.trim_end_matches('\r'));
        }
    });
    let (lines, received) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if lines.send(line).is_err() {
                break;
            }
        }
    });

    let deadline = Instant::now() + GUEST_TIMEOUT;
    let mut guest = GuestLog::default();
    let mut out = std::io::stdout();
    loop {
        let timeout = deadline.saturating_duration_since(Instant::now());
        match received.recv_timeout(timeout) {
            Ok(line) => {
                // The guest's console ends lines with \r\n.
                let line = line?;
                let line = line.trim_end_matches('\r');
                guest.add(line, report);
                writeln!(out, "{prefix}{line}")?;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let group = child.id() as libc::pid_t;
                // SAFETY: kill(2) on the process group we created; no memory is involved.
                unsafe { libc::kill(-group, libc::SIGKILL) };
                report.problems.push(format!(
                    "the guest ran past {} minutes and was killed{}",
                    GUEST_TIMEOUT.as_secs() / 60,
                    guest
                        .running
                        .as_ref()
                        .map(|name| format!(" while running {name}"))
                        .unwrap_or_default()
                ));
                break;
            }
        }
    }
    let status = child.wait()?;
    if !guest.done && report.problems.is_empty() {
        report.problems.push(format!(
            "the guest stopped ({status}) before its script finished{}",
            guest
                .running
                .as_ref()
                .map(|name| format!(", in {name}"))
                .unwrap_or_default()
        ));
    }
    Ok(())
}

/// The script a guest runs: ready the kernel for the tests, then run each binary between
/// marker lines that carry its exit code.
fn guest_script(
    kernel: &vm::Kernel,
    binaries: &[TestBinary],
    test_args: &[std::ffi::OsString],
) -> String {
    let mut script = String::from(
        "# Written by `cargo xtask test` for one guest of the kernel matrix; runs in the guest.\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n\
         # virtme-ng mounts cgroup2 and a writable /tmp and /run, but not bpffs.\n\
         mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf\n\
         # No fallback tunnel devices (tunl0, gre0...) in the tests' namespaces: loading\n\
         # ipip or ip_gre would otherwise add them to each, and every interface is attached.\n\
         sysctl -qw net.core.fb_tunnels_only_for_init_net=1 || echo \"datafence-matrix: note: no fb_tunnels_only_for_init_net\"\n\
         # Modules in the cloud kernels; loaded up front so a missing one shows here.\n\
         for module in veth sch_ingress cls_bpf tun vxlan ipip ip_gre nf_tables nft_chain_nat nft_masq; do\n\
         \x20   modprobe \"$module\" || echo \"datafence-matrix: note: modprobe $module failed\"\n\
         done\n\
         # virtme-ng's /dev has no tun node; the tun device tests open it.\n\
         [ -e /dev/net/tun ] || { mkdir -p /dev/net && mknod /dev/net/tun c 10 200; }\n",
    );
    let _ = writeln!(script, "export DATAFENCE_TEST_SLOWDOWN={GUEST_SLOWDOWN}");
    for (variable, value, why) in GUEST_ENV {
        let _ = writeln!(script, "export {variable}={value}");
        let line = format!("{MARK} note {variable}={value}: {why}");
        let _ = writeln!(script, "echo {}", quote(line.as_ref()));
    }
    let _ = writeln!(script, "echo \"{MARK} uname $(uname -r)\"");
    let args: Vec<String> = test_args.iter().map(|arg| quote(arg)).collect();
    for binary in binaries {
        let name = &binary.name;
        let mut args = args.clone();
        for skip in GUEST_SKIPS.iter().filter(|s| s.applies(kernel.name, name)) {
            let (test, why) = (skip.test, skip.why);
            // `::clsact` names every test of the binary ending so; a full name joins on.
            let shown = if test.starts_with("::") {
                format!("{name} *{test}")
            } else {
                format!("{name}::{test}")
            };
            let line = format!("{MARK} skip {shown}: {why}");
            let _ = writeln!(script, "echo {}", quote(line.as_ref()));
            args.extend(["--skip".to_owned(), test.to_owned()]);
        }
        let _ = writeln!(script, "echo '{MARK} begin {name}'");
        // As `cargo test` runs it: from its package's directory. A guest's console is a
        // terminal, and colours would hide `... FAILED` from the parser.
        let _ = writeln!(
            script,
            "(cd {} && {} --color never {})",
            quote(binary.dir.as_os_str()),
            quote(binary.path.as_os_str()),
            args.join(" ")
        );
        let _ = writeln!(script, "echo \"{MARK} end {name} $?\"");
    }
    let _ = writeln!(script, "echo '{MARK} done'");
    script
}

/// The guest's marker lines, read along with the tests' output.
#[derive(Default)]
struct GuestLog {
    running: Option<String>,
    done: bool,
}

impl GuestLog {
    fn add(&mut self, line: &str, report: &mut KernelReport) {
        let Some(mark) = line.strip_prefix(MARK).map(str::trim) else {
            report.log.add(line);
            return;
        };
        let mut words = mark.split_whitespace();
        match (words.next(), words.next(), words.next()) {
            (Some("uname"), Some(release), None) => report.release = Some(release.to_owned()),
            (Some("begin"), Some(name), None) => {
                self.running = Some(name.to_owned());
                report.log.binary = Some(name.to_owned());
                report.log.failed_before = report.log.failed;
            }
            (Some("end"), Some(name), Some(code)) => {
                self.running = None;
                // libtest exits 101 when a test failed, and then it has counted that; any
                // other ending (a crash, an abort) is a failure no count shows.
                let counted = report.log.failed > report.log.failed_before;
                if code != "0" && !counted {
                    report
                        .problems
                        .push(format!("{name} exited with status {code} outside any test"));
                }
            }
            (Some("done"), None, None) => self.done = true,
            (Some("note"), Some(_), _) => {
                let note = mark.trim_start_matches("note").trim();
                report.notes.push(note.to_owned());
            }
            (Some("skip"), Some(_), _) => {
                let skipped = mark.trim_start_matches("skip").trim();
                report.skipped.push(skipped.to_owned());
            }
            _ => {}
        }
    }
}

/// libtest's plain output, read line by line: the counts of its `test result:` lines, and
/// the failed tests with the first lines of what each printed.
#[derive(Default)]
pub(crate) struct LibtestLog {
    passed: u64,
    failed: u64,
    /// The binary being read, when known, to qualify the test names.
    binary: Option<String>,
    failed_before: u64,
    /// Failed tests, by name, and their first error lines.
    failures: BTreeMap<String, Vec<String>>,
    /// The failure whose `---- NAME stdout ----` block is being read.
    reading: Option<String>,
}

/// Error lines kept per failed test.
const ERROR_LINES: usize = 3;

impl LibtestLog {
    pub(crate) fn add(&mut self, line: &str) {
        if let Some(rest) = line.strip_prefix("test result: ") {
            self.reading = None;
            self.add_counts(rest);
        } else if let Some(test) = line
            .strip_prefix("test ")
            .and_then(|rest| rest.strip_suffix(" ... FAILED"))
        {
            let name = self.qualified(test);
            self.failures.entry(name).or_default();
        } else if let Some(test) = line
            .strip_prefix("---- ")
            .and_then(|rest| rest.strip_suffix(" stdout ----"))
        {
            self.reading = Some(self.qualified(test));
        } else if line == "failures:" {
            self.reading = None;
        } else if let Some(name) = &self.reading {
            let kept = self.failures.entry(name.clone()).or_default();
            let noise = line.trim().is_empty()
                || line.starts_with("thread '")
                || line.starts_with("note: run with `RUST_BACKTRACE");
            if !noise && kept.len() < ERROR_LINES {
                kept.push(line.trim().to_owned());
            }
        }
    }

    /// `ok. 18 passed; 0 failed; 0 ignored; ...`
    fn add_counts(&mut self, rest: &str) {
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

    fn qualified(&self, test: &str) -> String {
        match &self.binary {
            Some(binary) => format!("{binary}::{test}"),
            None => test.to_owned(),
        }
    }
}

/// One line per kernel (its name, `uname -r`, counts and time), each followed by its
/// failures.
pub(crate) fn print_reports(reports: &[KernelReport]) {
    if reports.is_empty() {
        return;
    }
    eprintln!("\n==> kernels");
    for report in reports {
        eprintln!(
            "  {:<6} {:<28} {:>4} passed, {:>3} failed {:>8.1}s",
            report.target,
            report.release.as_deref().unwrap_or("(unknown)"),
            report.passed(),
            report.failed(),
            report.elapsed.as_secs_f64()
        );
        for (name, lines) in &report.log.failures {
            eprintln!("         FAILED {name}");
            for line in lines {
                eprintln!("                {line}");
            }
        }
        for problem in &report.problems {
            eprintln!("         FAILED {problem}");
        }
        for skipped in &report.skipped {
            eprintln!("         skipped {skipped}");
        }
        for note in &report.notes {
            eprintln!("         note {note}");
        }
    }
}

#[cfg(test)]
mod tests;
