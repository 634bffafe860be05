//! Helpers for datafence's tests on the real kernel: crafted frames, policies written to
//! temporary files, network-namespace sandboxes, and the agent binary.

pub mod agent;
pub mod foreign;
pub mod frames;
pub mod http;
pub mod netns;
pub mod prometheus;
pub mod reference;
pub mod tun;

pub use datafence_test_support::Scratch;

use std::path::{Path, PathBuf};

use datafence::{
    datapath::{Datapath, EventLimits, LoadOptions},
    policy::{self, LoadedPolicy},
};

/// A policy with one class, `user-data`, selected by mark 0x42 and allowed to reach
/// `eu-west` (the sandbox's EU addresses) only; `us-east` holds the US ones. Egress on
/// the sandbox uplink `up0`.
pub const MARKED_CLASS_POLICY: &str = r#"
version: 1
interfaces:
  egress: [up0]
regions:
  eu-west:
    cidrs: [198.51.100.0/24, "2001:db8:100::/48"]
  us-east:
    cidrs: [203.0.113.0/24, "2001:db8:300::/48"]
data_classes:
  user-data:
    match:
      marks: [{value: 0x42}]
    allow: [eu-west]
"#;

/// `datafence detach` of the pins in `pins`, run in `ns` with `runtime` as the runtime
/// directory, as an operator removes what a stopped agent left enforcing. Asserts that
/// it succeeded and returns what it printed.
pub fn detach_pins(ns: &netns::NetNs, runtime: &Path, pins: &Path) -> String {
    let out = ns
        .command(agent_binary())
        .arg("--runtime-dir")
        .arg(runtime)
        .args(["detach", "--pin-dir"])
        .arg(pins)
        .output()
        .expect("detach");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every test here needs CAP_BPF and CAP_NET_ADMIN; say so plainly instead of failing on
/// an EPERM deep inside a test.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests load eBPF programs and build network namespaces: run them as root"
    );
}

/// The most instructions the verifier may process for any one program, on every kernel and
/// with the pinned toolchain. A quarter of the kernel's hard limit (1,000,000): the work
/// depends on the compiler and the kernel, and this leaves room for both to move and for
/// features to land (docs/architecture.md, "Verifier budget").
pub const VERIFIER_BUDGET: u32 = 250_000;

/// A deadline for something the test waits for, stretched by `DATAFENCE_TEST_SLOWDOWN`
/// (a whole factor, default 1). `cargo xtask test` sets it in the QEMU guests of its kernel
/// matrix, whose CPU is emulated: there an agent takes tens of seconds to load and attach,
/// where the host needs one or two. Only waits scale; what a test measures does not.
pub fn patience(deadline: std::time::Duration) -> std::time::Duration {
    static FACTOR: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    let factor = *FACTOR.get_or_init(|| {
        std::env::var("DATAFENCE_TEST_SLOWDOWN")
            .ok()
            .and_then(|value| value.parse().ok())
            .filter(|factor| *factor >= 1)
            .unwrap_or(1)
    });
    deadline * factor
}

/// Parses and validates a policy given as YAML text.
pub fn policy_from_yaml(yaml: &str) -> LoadedPolicy {
    let scratch = Scratch::new("policy");
    let path = scratch.write("policy.yaml", yaml);
    load_policy_file(&path)
}

pub fn load_policy_file(path: &Path) -> LoadedPolicy {
    let opts = policy::LoadOptions {
        cgroup_root: datafence::cgroups::cgroup2_root(),
        ..Default::default()
    };
    policy::load_policy(path, &opts)
        .unwrap_or_else(|e| panic!("policy {} should be valid:\n{e}", path.display()))
}

/// A loaded (unattached) datapath with `yaml` applied.
pub fn datapath_with(yaml: &str, limits: EventLimits) -> (Datapath, LoadedPolicy) {
    require_root();
    let policy = policy_from_yaml(yaml);
    let mut dp = Datapath::load(&LoadOptions::default()).expect("load datapath");
    dp.apply(&policy.compile(), limits).expect("apply policy");
    (dp, policy)
}

/// The `datafence` binary built alongside the tests.
pub fn agent_binary() -> PathBuf {
    // Integration tests live in target/<profile>/deps; the binary sits one level up.
    let exe = std::env::current_exe().expect("current exe");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target profile dir");
    let bin = profile_dir.join("datafence");
    assert!(
        bin.is_file(),
        "{} not found: build it first (`cargo build -p datafence`); `cargo xtask test` does",
        bin.display()
    );
    bin
}

/// Detaches every BPF link attached with the given program, the way another tool (or
/// an operator with bpftool) would.
///
/// The links are listed before any is detached: an agent that notices the detachment
/// attaches a new link for the same program, and a lazy walk over link ids could reach
/// that new link and detach it too.
pub fn detach_links_of_program(prog_id: u32) -> usize {
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let link_ids: Vec<u32> = aya::programs::loaded_links()
        .flatten()
        .filter(|info| info.program_id() == prog_id)
        .map(|info| info.id())
        .collect();
    let mut detached = 0;
    for link_id in link_ids {
        let mut attr = [0u32; 32];
        attr[0] = link_id;
        // SAFETY: bpf(2) with a zeroed attr buffer larger than the command's fields.
        let fd =
            unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_GET_FD_BY_ID, attr.as_mut_ptr(), 128) };
        assert!(fd >= 0, "link fd: {}", std::io::Error::last_os_error());
        let mut attr = [0u32; 32];
        attr[0] = fd as u32;
        // SAFETY: as above; the fd is ours and closed right after.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, attr.as_mut_ptr(), 128) };
        assert_eq!(rc, 0, "detach: {}", std::io::Error::last_os_error());
        // SAFETY: closing the fd we opened.
        unsafe { libc::close(fd as i32) };
        detached += 1;
    }
    detached
}

/// The ids of the programs on `interface`'s TC egress hook in `ns`, whichever way they
/// are attached: tcx links and datafence's clsact filters.
pub fn tc_program_ids(ns: &netns::NetNs, interface: &'static str) -> Vec<u32> {
    let mut ids = tcx_program_ids(ns, interface);
    ids.extend(
        datafence_clsact_filters(ns, interface)
            .iter()
            .filter_map(|f| f.program_id),
    );
    ids
}

/// The ids of the programs attached to `interface`'s tcx egress hook in `ns`.
pub fn tcx_program_ids(ns: &netns::NetNs, interface: &'static str) -> Vec<u32> {
    ns.run(move || {
        aya::programs::SchedClassifier::query_tcx(interface, aya::programs::TcAttachType::Egress)
            .map(|(_, progs)| progs.iter().map(aya::programs::ProgramInfo::id).collect())
            .unwrap_or_default()
    })
}

/// datafence's clsact filters on `interface`'s egress hook in `ns`.
pub fn datafence_clsact_filters(
    ns: &netns::NetNs,
    interface: &'static str,
) -> Vec<datafence::clsact::EgressFilter> {
    ns.run(move || {
        datafence::clsact::datafence_filters_on(interface).expect("list the clsact filters")
    })
}

/// Takes datafence's program off `interface`'s TC egress hook in `ns` the way another
/// tool or an operator would (bpftool for a tcx link, `tc filter del` for a clsact
/// filter); returns how many attachments were removed.
pub fn detach_tc_from_outside(ns: &netns::NetNs, interface: &'static str) -> usize {
    let mut removed = 0;
    for id in tcx_program_ids(ns, interface) {
        removed += detach_links_of_program(id);
    }
    for filter in datafence_clsact_filters(ns, interface) {
        ns.exec(&[
            "tc",
            "filter",
            "del",
            "dev",
            interface,
            "egress",
            "pref",
            &filter.priority.to_string(),
            "handle",
            &format!("{:#x}", filter.handle),
            "bpf",
        ]);
        removed += 1;
    }
    removed
}

/// Whether this kernel has tcx (6.6+), as the agent finds out.
pub fn kernel_has_tcx() -> bool {
    datafence::kernel::tcx_supported()
}

/// On a kernel without tcx (the 6.1 of the kernel matrix), what a tcx variant of a test
/// can check: that the agent refuses `--tc-attach tcx` at once, as a usage error that
/// names the kernel that introduced tcx, before it loads or attaches anything.
pub fn assert_tcx_is_refused() {
    require_root();
    assert!(!kernel_has_tcx(), "only meaningful without tcx");
    let sandbox = netns::Sandbox::new("ntx");
    let scratch = Scratch::new("no-tcx");
    let policy = scratch.write(
        "policy.yaml",
        "version: 1\ninterfaces:\n  egress: [up0]\nexempt: [192.0.2.2/32]\nregions: {}\ndata_classes: {}\n",
    );
    let out = sandbox
        .host
        .command(agent_binary())
        .arg("--runtime-dir")
        .arg(scratch.dir.join("run"))
        .args(["run", "--tc-attach", "tcx", "--no-pin", "--policy"])
        .arg(&policy)
        .output()
        .expect("run datafence");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(datafence::dirs::EXIT_USAGE),
        "{stderr}"
    );
    assert!(
        stderr.contains("no tcx") && stderr.contains("6.6"),
        "{stderr}"
    );
    assert!(
        tc_program_ids(&sandbox.host, "up0").is_empty(),
        "nothing attached"
    );
}

/// Stamps out a test for each way the agent attaches its TC egress program:
/// `<test>::tcx` and `<test>::clsact`, each calling `<test>(kind)`. On a kernel without
/// tcx the tcx variant checks that the agent refuses tcx instead.
#[macro_export]
macro_rules! for_each_tc_attach {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            #[test]
            fn tcx() {
                if $crate::kernel_has_tcx() {
                    super::$test("tcx");
                } else {
                    $crate::assert_tcx_is_refused();
                }
            }
            #[test]
            fn clsact() {
                super::$test("clsact");
            }
        }
    )*};
}

/// Removes a cgroup whose last process has just been waited for; the kernel may take a
/// moment to let go of it.
pub fn remove_cgroup_when_empty(dir: &std::path::Path) -> std::io::Result<()> {
    for _ in 0..200 {
        match std::fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            done => return done,
        }
    }
    Err(std::io::Error::other(format!(
        "{} stayed busy",
        dir.display()
    )))
}

/// A cgroup made for one test, removed on drop.
pub struct TestCgroup {
    dir: PathBuf,
    /// Path relative to the cgroup2 root, as a policy names it.
    pub path: String,
}

impl TestCgroup {
    pub fn new(label: &str) -> Self {
        let root = datafence::cgroups::cgroup2_root();
        let name = format!("datafence-test-{label}-{}", std::process::id());
        let dir = root.join(&name);
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        Self {
            dir,
            path: format!("/{name}"),
        }
    }

    pub fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}
