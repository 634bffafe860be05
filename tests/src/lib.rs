//! Helpers for datafence's tests on the real kernel: crafted frames, policies written to
//! temporary files, network-namespace sandboxes, and the agent binary.

pub mod agent;
pub mod frames;
pub mod netns;
pub mod reference;

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use datafence::{
    datapath::{Datapath, EventLimits, LoadOptions},
    policy::{self, LoadedPolicy},
};

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

static SCRATCH_COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh directory under the system temp dir, removed on drop.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(label: &str) -> Self {
        let n = SCRATCH_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("datafence-test-{label}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Self { dir }
    }

    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).expect("create parent");
        }
        std::fs::write(&path, contents).expect("write scratch file");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
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
    let mut dp = Datapath::load(&LoadOptions {
        table_capacity: 4096,
        ..Default::default()
    })
    .expect("load datapath");
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
pub fn detach_links_of_program(prog_id: u32) -> usize {
    const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let mut detached = 0;
    for info in aya::programs::loaded_links().flatten() {
        if info.program_id() != prog_id {
            continue;
        }
        let mut attr = [0u32; 32];
        attr[0] = info.id();
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

/// The id of the TC egress program attached to `interface` in `ns` (exactly one).
pub fn tc_program_ids(ns: &netns::NetNs, interface: &'static str) -> Vec<u32> {
    ns.run(move || {
        aya::programs::SchedClassifier::query_tcx(interface, aya::programs::TcAttachType::Egress)
            .map(|(_, progs)| progs.iter().map(aya::programs::ProgramInfo::id).collect())
            .unwrap_or_default()
    })
}
