//! The `datafence` subcommands: their arguments, and one module per command family.
#![forbid(unsafe_code)]

pub(crate) mod check;
pub(crate) mod detach;
pub(crate) mod explain;
pub(crate) mod reload;
pub(crate) mod run;
pub(crate) mod status;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Args, Parser, Subcommand};
use datafence::{
    dirs,
    policy::{self, LoadedPolicy, PolicyErrors},
};
use datafence_common::DEFAULT_TABLE_CAPACITY;

pub(crate) use self::{
    explain::{ExplainArgs, TestRunArgs},
    run::RunArgs,
};

/// Keeps user-data packets inside the regions a policy approves, enforced in the kernel
/// with eBPF on every egress interface.
///
/// Typical use: `datafence check policy.yaml`, then `datafence run --policy policy.yaml`
/// (as a systemd service), and `datafence explain 203.0.113.10` to ask why a packet
/// would be dropped.
#[derive(Parser, Debug)]
#[command(
    name = "datafence",
    version,
    propagate_version = true,
    max_term_width = 100
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
    /// Directory of the agent's control socket and state [default: /run/datafence].
    /// `status`, `reload` and `detach` given only --pin-dir address the agent that owns
    /// those pins, never this default.
    #[arg(long, global = true, env = "DATAFENCE_RUNTIME_DIR")]
    pub(crate) runtime_dir: Option<PathBuf>,
    /// Mount point of the cgroup v2 hierarchy that policy cgroup paths are relative to;
    /// the default is read from /proc/self/mounts.
    #[arg(long, global = true, env = "DATAFENCE_CGROUP_ROOT", default_value_os_t = datafence::cgroups::cgroup2_root())]
    pub(crate) cgroup_root: PathBuf,
    /// Log format for the agent's own messages (violations are always JSON lines).
    #[arg(long, global = true, value_parser = ["text", "json"], default_value = "text")]
    pub(crate) log_format: String,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Validate a policy file and summarise it.
    ///
    /// Prints every mistake as FILE:LINE:COLUMN: message and exits 64 when there is any;
    /// otherwise prints the regions (with IPv4/IPv6 prefix counts), the classes in match
    /// order and what each may reach, and exits 0. Nothing on the host is changed.
    Check {
        /// The policy file (YAML).
        #[arg(required_unless_present = "diff")]
        policy: Option<PathBuf>,
        /// Validate two policies and show what replacing OLD with NEW would change:
        /// regions and prefixes added or removed, and classes whose reach changes.
        #[arg(long, num_args = 2, value_names = ["OLD", "NEW"], conflicts_with = "policy")]
        diff: Option<Vec<PathBuf>>,
        /// Machine-readable output: {"valid": bool, "summary"|"errors": ...}, or the diff.
        #[arg(long)]
        json: bool,
        /// Also look at this host's interfaces (in this network namespace): list each
        /// connected subnet of an interface the policy attaches to that a class would
        /// deny. On a bridge or veth toward local containers that is a false drop. And
        /// warn when a class would deny the host's own DNS resolvers, time servers, or
        /// cloud metadata and resolver addresses.
        #[arg(long, conflicts_with = "diff")]
        host: bool,
        #[command(flatten)]
        tables: TableArgs,
    },
    /// Explain the verdict for traffic to one or more addresses.
    ///
    /// For each address: its region, the data class the traffic falls in, the verdict
    /// (allow, deny or audit), the mode and the reason. Describe the traffic with the
    /// selector options; by default it is TCP to port 443 with no mark, DSCP 0 and the
    /// cgroup of this command. Without --policy, the running agent answers from the
    /// policy it has in force.
    Explain(ExplainArgs),
    /// Run the agent: validate the policy, load the eBPF programs, attach them, enforce.
    ///
    /// Attaches TC egress to the policy's egress interfaces (or --interface, or every
    /// interface but loopback and the excluded, including interfaces created later) and
    /// XDP to its gateway interfaces. Reloads the
    /// policy on SIGHUP or `datafence reload`; a bad policy is refused and the one in
    /// force stays. Violations are written to stdout as JSON lines. Runs until SIGTERM
    /// or SIGINT.
    Run(RunArgs),
    /// Show what the running agent has attached, the policy in force and its counters.
    ///
    /// With the agent stopped, crashed or killed, reads the enforcement the kernel keeps
    /// from the pinned maps, with the names the agent recorded in its runtime directory.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// The agent that owns these pins (bpffs directory), or their state if none runs.
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Make the running agent re-read its policy and switch to it with no gap.
    ///
    /// Exits non-zero and prints the reason when the new policy is refused; the policy
    /// in force then stays, as it does when the new policy would cut an SSH session
    /// established to this host (see `run --ssh-port` and `--allow-lockout-risk`).
    Reload {
        /// Reload the agent that owns these pins (bpffs directory).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Remove all enforcement: detach every program and delete the pinned maps.
    ///
    /// This is the only command that ends enforcement; stopping or killing the agent
    /// leaves the last policy in force. The agent addressed (by --runtime-dir, or the
    /// owner --pin-dir names) is told to detach and exit. Without a running agent the
    /// pins are removed here; if another agent that is running owns them, this refuses
    /// (exit 1, naming that agent's socket) unless --force.
    Detach {
        /// bpffs directory of the pinned state [default: the addressed agent's, else
        /// /sys/fs/bpf/datafence].
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        /// Remove the pins even though a running agent owns them.
        #[arg(long)]
        force: bool,
    },
    /// Internal: runs the frame on stdin through a pinned TC program, in this process's
    /// cgroup, and prints the program's return value. The agent starts it in the cgroup
    /// `explain --datapath --cgroup` names.
    #[command(name = datafence::explain::TEST_RUN_COMMAND, hide = true)]
    TestRunInCgroup(TestRunArgs),
}

#[derive(Args, Debug, Clone)]
pub(crate) struct TableArgs {
    /// Region prefixes a policy may list per address family; a larger policy is
    /// refused. The datapath's tables are sized to the policy itself.
    #[arg(long, default_value_t = DEFAULT_TABLE_CAPACITY)]
    pub(crate) table_capacity: u32,
    /// The largest policy file read, in bytes; a larger one is refused.
    #[arg(long, default_value_t = policy::DEFAULT_MAX_POLICY_BYTES)]
    pub(crate) max_policy_bytes: u64,
    /// The largest region file read, in bytes; a larger one is refused.
    #[arg(long, default_value_t = policy::DEFAULT_MAX_REGION_FILE_BYTES)]
    pub(crate) max_region_file_bytes: u64,
    /// The most YAML nodes (scalars, lists and maps) a policy file may hold; region files
    /// are not YAML and do not count.
    #[arg(long, default_value_t = policy::DEFAULT_MAX_YAML_NODES)]
    pub(crate) max_yaml_nodes: usize,
}

impl TableArgs {
    pub(crate) fn load_options(&self, cgroup_root: &Path) -> policy::LoadOptions {
        policy::LoadOptions {
            cgroup_root: cgroup_root.to_owned(),
            table_capacity: self.table_capacity,
            max_policy_bytes: self.max_policy_bytes,
            max_region_file_bytes: self.max_region_file_bytes,
            max_yaml_nodes: self.max_yaml_nodes,
        }
    }
}

pub(crate) fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DATAFENCE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub(crate) fn load(
    path: &Path,
    cgroup_root: &Path,
    tables: &TableArgs,
) -> Result<LoadedPolicy, PolicyErrors> {
    policy::load_policy(path, &tables.load_options(cgroup_root))
}

/// A bad policy or bad arguments: sysexits' EX_USAGE.
pub(crate) fn usage_error() -> ExitCode {
    ExitCode::from(dirs::EXIT_USAGE as u8)
}
