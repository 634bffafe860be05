//! Where datafence keeps things on a host. One place, so the unit file, the packaging and
//! the code agree.
#![forbid(unsafe_code)]

/// Default policy file, as installed by the package.
pub const DEFAULT_POLICY: &str = "/etc/datafence/policy.yaml";
/// Runtime state: the control socket.
pub const RUNTIME_DIR: &str = "/run/datafence";
pub const CONTROL_SOCKET: &str = "control.sock";
/// In the pin directory: a symlink to the runtime directory of the agent that owns the
/// pins, so commands given `--pin-dir` find that agent and its state.
pub const PINS_OWNER: &str = "agent";
/// In the pin directory: the prefix of the entry program's pin that `explain --datapath`
/// makes for its test-run child, removed when the answer is given. One left by an agent
/// that died meanwhile is removed by the next agent of the directory, or by `detach`.
pub const EXPLAIN_TEST_RUN_PREFIX: &str = "explain-test-run-";
/// bpffs directory for pinned programs, links and maps.
pub const PIN_DIR: &str = "/sys/fs/bpf/datafence";
/// cgroup v2 mount that policy cgroup paths are relative to.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Exit status for a bad policy or bad arguments (sysexits EX_USAGE).
pub const EXIT_USAGE: i32 = 64;
