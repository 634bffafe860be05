//! `datafence run`: the agent itself, from its command-line options.
#![forbid(unsafe_code)]

use std::{path::PathBuf, process::ExitCode};

use clap::Args;
use datafence::{
    agent::{self, RunOptions},
    datapath::EventLimits,
    dirs,
};

use super::{Cli, TableArgs};

#[derive(Args, Debug)]
pub(crate) struct RunArgs {
    /// The policy file.
    #[arg(long, default_value = dirs::DEFAULT_POLICY)]
    pub(crate) policy: PathBuf,
    /// TC egress interface; repeat for several. Overrides the policy's egress list.
    #[arg(long = "interface", value_name = "IF")]
    pub(crate) interfaces: Vec<String>,
    /// Serve Prometheus metrics and /healthz on this address, e.g. 127.0.0.1:9477.
    #[arg(long)]
    pub(crate) metrics_addr: Option<std::net::SocketAddr>,
    /// Also append violation lines to this file (rotated by size).
    #[arg(long, value_name = "PATH")]
    pub(crate) violations_file: Option<PathBuf>,
    /// Rotate the violations file when it reaches this many bytes.
    #[arg(long, default_value_t = 64 << 20, value_name = "BYTES")]
    pub(crate) violations_file_max_bytes: u64,
    /// Rotated violations files to keep (PATH.1 ... PATH.N).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub(crate) violations_file_keep: u32,
    /// Seconds within which repeats of a flow are folded into one violation line.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    pub(crate) fold_interval: u64,
    /// bpffs directory where programs' links and maps are pinned, so enforcement
    /// continues while the agent is stopped, restarted or upgraded.
    #[arg(long, default_value = dirs::PIN_DIR)]
    pub(crate) pin_dir: PathBuf,
    /// Pin nothing: enforcement ends when the agent exits (for trials only).
    #[arg(long)]
    pub(crate) no_pin: bool,
    /// Where the socket ring (the connect and sendmsg programs) attaches: a cgroup v2
    /// directory, whose every process is judged, or `off` to run the packet ring alone.
    /// Default: the root of the hierarchy, which holds every process of the host,
    /// containers included.
    #[arg(long, value_name = "DIR|off")]
    pub(crate) socket_ring: Option<PathBuf>,
    /// How the TC egress program is attached: tcx (a BPF link, Linux 6.6+), clsact (a
    /// cls_bpf filter at priority 1, handle 0xdf, on the clsact qdisc), or auto: tcx
    /// where the kernel has it, else clsact. Both outlive the agent.
    #[arg(long, env = "DATAFENCE_TC_ATTACH", value_parser = ["auto", "tcx", "clsact"], default_value = "auto")]
    pub(crate) tc_attach: String,
    /// A network this host is managed from; the policy must exempt it. Repeatable.
    #[arg(long = "management-cidr", value_name = "CIDR")]
    pub(crate) management_cidrs: Vec<ipnetwork::IpNetwork>,
    /// A port SSH sessions come in on. Repeatable. At start and at every reload, a
    /// policy that would deny the replies of a session established on one of these
    /// ports is refused. Default: the ports sshd listens on (where the agent can see
    /// them), and 22.
    #[arg(long = "ssh-port", value_name = "PORT")]
    pub(crate) ssh_ports: Vec<u16>,
    /// Accept a policy that does not exempt the management networks or that would cut
    /// an established SSH session (it is named in a warning).
    #[arg(long)]
    pub(crate) allow_lockout_risk: bool,
    /// Do not reload when the policy file or a region file changes.
    #[arg(long)]
    pub(crate) no_watch: bool,
    // `--v4-ranges`, `--v6-ranges` and `--v6-entries` reserved room in the region tables
    // when pinned tables kept their size for good. The agent now sizes them to the policy
    // and makes them anew at start when a policy outgrew them; a unit that still passes
    // one must start, so they are read, and ignored with a warning.
    #[arg(long, hide = true, value_name = "N")]
    pub(crate) v4_ranges: Option<u32>,
    #[arg(long, alias = "v6-entries", hide = true, value_name = "N")]
    pub(crate) v6_ranges: Option<u32>,
    /// Seconds between checks that every program is still attached (and repairs).
    #[arg(long, default_value_t = 2, value_name = "SECONDS")]
    pub(crate) monitor_interval: u64,
    /// Violation events per second per CPU that the kernel reports; the rest are counted
    /// as suppressed.
    #[arg(long, default_value_t = 1000)]
    pub(crate) events_per_second: u32,
    /// Violation events a CPU may report in a burst above the rate.
    #[arg(long, default_value_t = 1000)]
    pub(crate) events_burst: u32,
    #[command(flatten)]
    pub(crate) tables: TableArgs,
}

/// Runs the agent until it is told to stop.
pub(crate) fn run(cli: &Cli, args: &RunArgs) -> anyhow::Result<ExitCode> {
    if args.v4_ranges.is_some() || args.v6_ranges.is_some() {
        tracing::warn!(
            "--v4-ranges and --v6-ranges are ignored: the region tables are sized to the policy, and made anew at start when a policy has outgrown them"
        );
    }
    let opts = RunOptions {
        policy_path: args.policy.clone(),
        interfaces: args.interfaces.clone(),
        runtime_dir: cli
            .runtime_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(dirs::RUNTIME_DIR)),
        table_capacity: args.tables.table_capacity,
        max_policy_bytes: args.tables.max_policy_bytes,
        max_region_file_bytes: args.tables.max_region_file_bytes,
        max_yaml_nodes: args.tables.max_yaml_nodes,
        events: EventLimits {
            per_second: args.events_per_second,
            burst: args.events_burst,
        },
        cgroup_root: cli.cgroup_root.clone(),
        metrics_addr: args.metrics_addr,
        reports: agent::ReportOptions {
            fold_interval: std::time::Duration::from_secs(args.fold_interval.max(1)),
            file: args.violations_file.clone(),
            file_max_bytes: args.violations_file_max_bytes,
            file_keep: args.violations_file_keep,
        },
        pin_dir: (!args.no_pin).then(|| args.pin_dir.clone()),
        management: args.management_cidrs.clone(),
        ssh_ports: args.ssh_ports.clone(),
        allow_lockout_risk: args.allow_lockout_risk,
        watch: !args.no_watch,
        monitor_interval: std::time::Duration::from_secs(args.monitor_interval.max(1)),
        tc_attach: args.tc_attach.clone(),
        socket_ring: match &args.socket_ring {
            Some(off) if off.as_os_str() == "off" => None,
            Some(dir) => Some(dir.clone()),
            None => Some(cli.cgroup_root.clone()),
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(agent::run(opts))?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::super::{Cli, Command};

    #[test]
    fn the_former_table_size_flags_are_still_accepted() {
        for flag in ["--v4-ranges", "--v6-ranges", "--v6-entries"] {
            let cli = Cli::try_parse_from(["datafence", "run", flag, "300000"]).expect(flag);
            let Command::Run(args) = cli.command else {
                panic!("{flag}: not the run command");
            };
            assert_eq!(args.v4_ranges.or(args.v6_ranges), Some(300_000), "{flag}");
        }
        let cli = Cli::try_parse_from(["datafence", "run"]).expect("defaults");
        let Command::Run(args) = cli.command else {
            panic!("not the run command");
        };
        assert_eq!((args.v4_ranges, args.v6_ranges), (None, None));
    }
}
