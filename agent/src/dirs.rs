//! Where datafence keeps things on a host. One place, so the unit file, the packaging and
//! the code agree.

/// Default policy file, as installed by the package.
pub const DEFAULT_POLICY: &str = "/etc/datafence/policy.yaml";
/// Runtime state: the control socket.
pub const RUNTIME_DIR: &str = "/run/datafence";
pub const CONTROL_SOCKET: &str = "control.sock";
/// bpffs directory for pinned programs, links and maps.
pub const PIN_DIR: &str = "/sys/fs/bpf/datafence";
/// cgroup v2 mount that policy cgroup paths are relative to.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";
/// Exit status for a bad policy or bad arguments (sysexits EX_USAGE).
pub const EXIT_USAGE: i32 = 64;
