//! The `datafence` command line: `run` is the agent; `check`, `explain`, `status` and
//! `reload` are the tools that operators and scripts use around it.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, bail};
use clap::{Args, Parser, Subcommand};
use datafence::{
    agent::{self, RunOptions},
    control::{self, Request, Response, StatusReport},
    datapath::EventLimits,
    dirs,
    explain::{self, Explanation, KernelOracle, Query},
    policy::{self, LoadedPolicy, PolicyErrors},
};
use datafence_common::{
    DEFAULT_TABLE_CAPACITY,
    parse::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP},
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
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Directory of the running agent's control socket.
    #[arg(long, global = true, env = "DATAFENCE_RUNTIME_DIR", default_value = dirs::RUNTIME_DIR)]
    runtime_dir: PathBuf,
    /// Mount point of the cgroup v2 hierarchy that policy cgroup paths are relative to;
    /// the default is read from /proc/self/mounts.
    #[arg(long, global = true, env = "DATAFENCE_CGROUP_ROOT", default_value_os_t = datafence::cgroups::cgroup2_root())]
    cgroup_root: PathBuf,
    /// Log format for the agent's own messages (violations are always JSON lines).
    #[arg(long, global = true, value_parser = ["text", "json"], default_value = "text")]
    log_format: String,
}

#[derive(Subcommand, Debug)]
enum Command {
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
    /// interface with a default route) and XDP to its gateway interfaces. Reloads the
    /// policy on SIGHUP or `datafence reload`; a bad policy is refused and the one in
    /// force stays. Violations are written to stdout as JSON lines. Runs until SIGTERM
    /// or SIGINT.
    Run(RunArgs),
    /// Show what the running agent has attached, the policy in force and its counters.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Make the running agent re-read its policy and switch to it with no gap.
    ///
    /// Exits non-zero and prints the reason when the new policy is refused; the policy
    /// in force then stays. The address this command is run from over SSH must be
    /// exempt in the new policy (see `run --allow-lockout-risk`).
    Reload,
    /// Remove all enforcement: detach every program and delete the pinned maps.
    ///
    /// This is the only command that ends enforcement; stopping or killing the agent
    /// leaves the last policy in force. A running agent is told to detach and exit.
    Detach {
        /// bpffs directory of the pinned state.
        #[arg(long, default_value = dirs::PIN_DIR)]
        pin_dir: PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
struct TableArgs {
    /// Region prefixes the datapath holds per address family.
    #[arg(long, default_value_t = DEFAULT_TABLE_CAPACITY)]
    table_capacity: u32,
}

#[derive(Args, Debug)]
struct ExplainArgs {
    /// Destination addresses to explain.
    #[arg(required = true)]
    addresses: Vec<IpAddr>,
    /// Explain against this policy file instead of the running agent's policy.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// One JSON object per address: {"address", "region", "class", "verdict", "mode", "reason"}.
    #[arg(long)]
    json: bool,
    /// Also run the real eBPF program on a crafted packet (BPF_PROG_TEST_RUN, nothing
    /// attached) and fail if the kernel's verdict differs from userspace's.
    #[arg(long)]
    datapath: bool,
    /// Judge the traffic as this data class, skipping classification.
    #[arg(long, conflicts_with_all = ["mark", "cgroup", "dscp"])]
    class: Option<String>,
    /// The packet's mark (SO_MARK / fwmark), decimal or 0x-hex.
    #[arg(long, value_parser = parse_u32)]
    mark: Option<u32>,
    /// The sending process's cgroup v2 path, e.g. /system.slice/user-api.service.
    #[arg(long)]
    cgroup: Option<String>,
    /// The packet's DSCP (0-63).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=63))]
    dscp: Option<u8>,
    /// Transport protocol: tcp, udp, sctp, icmp or a number.
    #[arg(long, default_value = "tcp", value_parser = parse_protocol)]
    proto: u8,
    /// Destination port.
    #[arg(long, default_value_t = 443)]
    dport: u16,
    /// Source address (for src_cidrs selectors); default unspecified.
    #[arg(long)]
    src: Option<IpAddr>,
    #[command(flatten)]
    tables: TableArgs,
}

#[derive(Args, Debug)]
struct RunArgs {
    /// The policy file.
    #[arg(long, default_value = dirs::DEFAULT_POLICY)]
    policy: PathBuf,
    /// TC egress interface; repeat for several. Overrides the policy's egress list.
    #[arg(long = "interface", value_name = "IF")]
    interfaces: Vec<String>,
    /// Serve Prometheus metrics and /healthz on this address, e.g. 127.0.0.1:9477.
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Also append violation lines to this file (rotated by size).
    #[arg(long, value_name = "PATH")]
    violations_file: Option<PathBuf>,
    /// Rotate the violations file when it reaches this many bytes.
    #[arg(long, default_value_t = 64 << 20, value_name = "BYTES")]
    violations_file_max_bytes: u64,
    /// Rotated violations files to keep (PATH.1 ... PATH.N).
    #[arg(long, default_value_t = 3, value_name = "N")]
    violations_file_keep: u32,
    /// Seconds within which repeats of a flow are folded into one violation line.
    #[arg(long, default_value_t = 10, value_name = "SECONDS")]
    fold_interval: u64,
    /// bpffs directory where programs' links and maps are pinned, so enforcement
    /// continues while the agent is stopped, restarted or upgraded.
    #[arg(long, default_value = dirs::PIN_DIR)]
    pin_dir: PathBuf,
    /// Pin nothing: enforcement ends when the agent exits (for trials only).
    #[arg(long)]
    no_pin: bool,
    /// A network this host is managed from; the policy must exempt it. Repeatable.
    /// The client address in SSH_CONNECTION counts too.
    #[arg(long = "management-cidr", value_name = "CIDR")]
    management_cidrs: Vec<ipnetwork::IpNetwork>,
    /// Accept a policy that does not exempt the management addresses.
    #[arg(long)]
    allow_lockout_risk: bool,
    /// Do not reload when the policy file or a region file changes.
    #[arg(long)]
    no_watch: bool,
    /// IPv4 region table: dir24 (constant-time DIR-24-8, 128 MiB plus groups) or trie
    /// (the kernel LPM trie: smaller for small policies, slower as they grow).
    #[arg(long, value_parser = ["dir24", "trie"], default_value = "dir24")]
    v4_table: String,
    /// DIR-24-8 groups per slot: /24s that hold prefixes longer than /24 (256 bytes
    /// each, twice for the two slots). At least 1.25 times what the policy at start needs.
    #[arg(long, default_value_t = datafence_common::DEFAULT_DIR8_GROUPS, value_name = "N")]
    dir8_groups: u32,
    /// IPv6 table entries per slot: the policy's IPv6 prefixes plus the markers its
    /// length search needs (usually under one per prefix). At least 1.25 times what the
    /// policy at start needs.
    #[arg(long, default_value_t = datafence_common::DEFAULT_V6_ENTRIES, value_name = "N")]
    v6_entries: u32,
    /// Seconds between checks that every program is still attached (and repairs).
    #[arg(long, default_value_t = 2, value_name = "SECONDS")]
    monitor_interval: u64,
    /// Violation events per second per CPU that the kernel reports; the rest are counted
    /// as suppressed.
    #[arg(long, default_value_t = 1000)]
    events_per_second: u32,
    /// Violation events a CPU may report in a burst above the rate.
    #[arg(long, default_value_t = 1000)]
    events_burst: u32,
    #[command(flatten)]
    tables: TableArgs,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("{s:?}: {e}"))
}

fn parse_protocol(s: &str) -> Result<u8, String> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(IPPROTO_TCP),
        "udp" => Ok(IPPROTO_UDP),
        "sctp" => Ok(IPPROTO_SCTP),
        "icmp" => Ok(1),
        "icmpv6" | "ipv6-icmp" => Ok(58),
        other => other
            .parse()
            .map_err(|_| format!("{s:?}: expected tcp, udp, sctp, icmp, icmpv6 or 0-255")),
    }
}

fn init_logging(format: &str) {
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

fn load(path: &Path, cgroup_root: &Path, tables: &TableArgs) -> Result<LoadedPolicy, PolicyErrors> {
    policy::load_policy(
        path,
        &policy::LoadOptions {
            cgroup_root: cgroup_root.to_owned(),
            table_capacity: tables.table_capacity,
        },
    )
}

/// A bad policy or bad arguments: sysexits' EX_USAGE.
fn usage_error() -> ExitCode {
    ExitCode::from(dirs::EXIT_USAGE as u8)
}

fn check(cli: &Cli, path: &Path, json: bool, tables: &TableArgs) -> anyhow::Result<ExitCode> {
    match load(path, &cli.cgroup_root, tables) {
        Ok(p) => {
            if json {
                let out = serde_json::json!({"valid": true, "summary": p.summary()});
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print_summary(&p);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            if json {
                let list: Vec<_> = errors
                    .0
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "file": e.file.display().to_string(),
                            "line": e.line,
                            "column": e.column,
                            "message": e.message,
                        })
                    })
                    .collect();
                let out = serde_json::json!({"valid": false, "errors": list});
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                eprintln!("{errors}");
                eprintln!("{}: invalid ({} error(s))", path.display(), errors.0.len());
            }
            Ok(usage_error())
        }
    }
}

fn check_diff(
    cli: &Cli,
    old: &Path,
    new: &Path,
    json: bool,
    tables: &TableArgs,
) -> anyhow::Result<ExitCode> {
    let mut loaded = Vec::new();
    let mut failed = false;
    for path in [old, new] {
        match load(path, &cli.cgroup_root, tables) {
            Ok(p) => loaded.push(p),
            Err(errors) => {
                eprintln!("{errors}");
                failed = true;
            }
        }
    }
    if failed {
        return Ok(usage_error());
    }
    let d = datafence::diff::diff(&loaded[0], &loaded[1]);
    if json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        print!("{}", datafence::diff::render(&d));
    }
    Ok(ExitCode::SUCCESS)
}

fn detach(cli: &Cli, pin_dir: &Path) -> anyhow::Result<ExitCode> {
    let socket = cli.runtime_dir.join(dirs::CONTROL_SOCKET);
    if socket.exists()
        && let Ok(response) = control::call(&socket, &Request::Detach)
    {
        match response {
            Response::Detached { detached } => {
                println!(
                    "detached {} (the agent has stopped)",
                    if detached.is_empty() {
                        "nothing".to_owned()
                    } else {
                        detached.join(", ")
                    }
                );
                return Ok(ExitCode::SUCCESS);
            }
            Response::Error { message } => bail!("the agent could not detach: {message}"),
            other => bail!("unexpected answer from the agent: {other:?}"),
        }
    }
    // No agent running: remove what the last one left pinned.
    let layout = datafence::datapath::PinLayout::new(pin_dir);
    let detached = layout
        .remove_all()
        .with_context(|| format!("removing pinned state under {}", pin_dir.display()))?;
    if detached.is_empty() && !pin_dir.exists() {
        println!("nothing to detach under {}", pin_dir.display());
    } else {
        println!(
            "detached {}",
            if detached.is_empty() {
                "nothing".to_owned()
            } else {
                detached.join(", ")
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_summary(p: &LoadedPolicy) {
    let s = p.summary();
    println!("{}: valid", s.path);
    println!("  sha256   {}", s.sha256);
    println!("  mode     {}", s.mode.as_str());
    let egress = s.interfaces.egress.as_ref().map_or_else(
        || "every interface with a default route".to_owned(),
        |l| l.join(", "),
    );
    println!("  egress   {egress}");
    if !s.interfaces.gateway.is_empty() {
        println!("  gateway  {}", s.interfaces.gateway.join(", "));
    }
    println!(
        "  exempt   {}",
        if s.exempt.is_empty() {
            "(none; loopback and link-local always are)".to_owned()
        } else {
            s.exempt.join(", ")
        }
    );
    println!("regions:");
    let width = s.regions.iter().map(|r| r.name.len()).max().unwrap_or(0);
    for r in &s.regions {
        println!(
            "  {:width$}  {:>7} IPv4  {:>7} IPv6 prefixes",
            r.name, r.v4_prefixes, r.v6_prefixes
        );
    }
    println!("data classes (first match wins):");
    for c in &s.classes {
        let reach = if c.allow.is_empty() {
            "no region".to_owned()
        } else {
            c.allow.join(", ")
        };
        println!(
            "  {}  [{}] may reach {}; unknown destinations: {}",
            c.name,
            c.mode.as_str(),
            reach,
            c.unknown.as_str()
        );
        let sel = &c.selectors;
        let mut parts = Vec::new();
        if !sel.cgroups.is_empty() {
            parts.push(format!("cgroups {}", sel.cgroups.join(" ")));
        }
        if !sel.marks.is_empty() {
            parts.push(format!("marks {}", sel.marks.join(" ")));
        }
        if !sel.dscp.is_empty() {
            parts.push(format!("dscp {:?}", sel.dscp));
        }
        if !sel.protocols.is_empty() {
            parts.push(format!("protocols {:?}", sel.protocols));
        }
        if !sel.dst_ports.is_empty() {
            parts.push(format!("dst_ports {}", sel.dst_ports.join(" ")));
        }
        if !sel.src_cidrs.is_empty() {
            parts.push(format!("src_cidrs {}", sel.src_cidrs.join(" ")));
        }
        println!("      match: {}", parts.join("; "));
    }
}

/// This process's cgroup v2 path.
fn own_cgroup() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

const IN_CGROUP_ENV: &str = "DATAFENCE_EXPLAIN_IN_CGROUP";

/// `BPF_PROG_TEST_RUN` gives the test packet the calling process's cgroup, so to ask the
/// kernel about another cgroup this command re-runs itself inside that cgroup.
fn rerun_in_cgroup(cgroup_root: &Path, cgroup: &str) -> anyhow::Result<ExitCode> {
    let procs = cgroup_root
        .join(cgroup.trim_start_matches('/'))
        .join("cgroup.procs");
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.args(std::env::args_os().skip(1))
        .env(IN_CGROUP_ENV, "1");
    datafence::cgroups::spawn_in_cgroup(&mut cmd, &procs)?;
    let status = cmd.status().with_context(|| {
        format!(
            "running the kernel check inside cgroup {cgroup} ({})",
            procs.display()
        )
    })?;
    Ok(ExitCode::from(status.code().unwrap_or(1) as u8))
}

fn print_explanations(list: &[Explanation], json: bool) -> anyhow::Result<()> {
    for e in list {
        if json {
            println!("{}", serde_json::to_string(e)?);
        } else {
            println!(
                "{}: {} (class {}, region {}, mode {}) - {}: {}",
                e.address,
                e.verdict.to_uppercase(),
                e.class.as_deref().unwrap_or("none"),
                e.region.as_deref().unwrap_or("none"),
                e.mode,
                e.reason,
                e.detail
            );
        }
    }
    Ok(())
}

fn explain_cmd(cli: &Cli, args: &ExplainArgs) -> anyhow::Result<ExitCode> {
    let mut query = Query::new();
    query.class.clone_from(&args.class);
    query.mark = args.mark.unwrap_or(0);
    query.dscp = args.dscp.unwrap_or(0);
    query.protocol = args.proto;
    query.dst_port = args.dport;
    query.src = args.src;
    query.cgroup.clone_from(&args.cgroup);
    if args.datapath && args.class.is_some() {
        eprintln!("error: {}", explain::ExplainError::ClassWithDatapath);
        return Ok(usage_error());
    }
    if args.datapath {
        let own = own_cgroup();
        match &args.cgroup {
            Some(wanted)
                if own.as_deref() != Some(wanted.as_str())
                    && std::env::var_os(IN_CGROUP_ENV).is_none() =>
            {
                return rerun_in_cgroup(&cli.cgroup_root, wanted);
            }
            Some(_) => {}
            None => query.cgroup = own,
        }
    }
    let Some(policy_path) = &args.policy else {
        let response = control::call(
            &cli.runtime_dir.join(dirs::CONTROL_SOCKET),
            &Request::Explain {
                query,
                addresses: args.addresses.clone(),
                datapath: args.datapath,
            },
        )?;
        return match response {
            Response::Explained { explanations } => {
                print_explanations(&explanations, args.json)?;
                Ok(ExitCode::SUCCESS)
            }
            Response::Error { message } => bail!("the agent says: {message}"),
            other => bail!("unexpected answer from the agent: {other:?}"),
        };
    };
    let policy = match load(policy_path, &cli.cgroup_root, &args.tables) {
        Ok(p) => p,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(usage_error());
        }
    };
    let compiled = policy.compile();
    let mut oracle = if args.datapath {
        Some(KernelOracle::new(&compiled)?)
    } else {
        None
    };
    let mut out = Vec::new();
    for address in &args.addresses {
        let e = match oracle.as_mut() {
            Some(o) => explain::explain_with_kernel(
                o,
                &policy,
                &compiled,
                &cli.cgroup_root,
                &query,
                *address,
            )?,
            None => explain::explain(&policy, &compiled, &cli.cgroup_root, &query, *address)?,
        };
        out.push(e);
    }
    print_explanations(&out, args.json)?;
    Ok(ExitCode::SUCCESS)
}

/// The status of the enforcement the kernel keeps while no agent runs, from the pinned
/// maps and the names the last agent recorded.
fn status_from_pins(runtime_dir: &Path) -> anyhow::Result<StatusReport> {
    let state_path = runtime_dir.join(control::STATE_FILE);
    let state: control::AgentState =
        serde_json::from_slice(&std::fs::read(&state_path).with_context(|| {
            format!(
                "the agent is not running and left no state at {}",
                state_path.display()
            )
        })?)
        .with_context(|| format!("reading {}", state_path.display()))?;
    let Some(pin_dir) = &state.pin_dir else {
        bail!("the agent is not running, and it pinned nothing: nothing is enforced");
    };
    let layout = datafence::datapath::PinLayout::new(pin_dir);
    if !layout.exists() {
        bail!(
            "the agent is not running and nothing is pinned under {pin_dir}: nothing is enforced"
        );
    }
    let pinned = layout.read()?;
    let class = |id: u8| {
        state
            .classes
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, n)| n.clone())
    };
    let region = |id: u16| {
        state
            .regions
            .iter()
            .find(|(i, _)| *i == id)
            .map(|(_, n)| n.clone())
    };
    let mut report = StatusReport {
        agent_running: false,
        attachments: state.attachments.clone(),
        policy: state.policy.clone(),
        events_lost: pinned.stats.events_lost,
        events_suppressed: pinned.stats.events_suppressed,
        ..Default::default()
    };
    report.policy.generation = pinned.generation;
    let labelled = pinned.counters.iter().map(|(key, value)| {
        let labels = datafence::metrics::verdict_labels(
            key,
            |i| datafence::datapath::if_name(i).unwrap_or_else(|| i.to_string()),
            class,
            region,
        );
        (labels, *value)
    });
    (report.counters, report.totals) = control::counter_table(labelled);
    Ok(report)
}

fn print_status(s: &StatusReport) {
    if !s.agent_running {
        println!(
            "AGENT NOT RUNNING: the kernel keeps enforcing the last policy (read from its pinned state)"
        );
    }
    println!(
        "policy   {} (version {}, generation {})",
        s.policy.path, s.policy.version, s.policy.generation
    );
    println!("sha256   {}", s.policy.sha256);
    println!("loaded   {}", s.policy.loaded_at);
    println!("attached:");
    for a in &s.attachments {
        println!("  {:<16} {}", a.interface, a.hook);
    }
    println!(
        "totals   allow {}  deny {}  audit {}   events lost {}  suppressed {}",
        s.totals.allow, s.totals.deny, s.totals.audit, s.events_lost, s.events_suppressed
    );
    println!(
        "{:<12} {:<9} {:<16} {:<12} {:<7} {:<22} {:>10} {:>12}",
        "INTERFACE", "HOOK", "CLASS", "REGION", "VERDICT", "REASON", "PACKETS", "BYTES"
    );
    for r in &s.counters {
        println!(
            "{:<12} {:<9} {:<16} {:<12} {:<7} {:<22} {:>10} {:>12}",
            r.labels.interface,
            r.labels.hook,
            r.labels.class,
            r.labels.region,
            r.labels.verdict,
            r.labels.reason,
            r.packets,
            r.bytes
        );
    }
    if !s.map_memory_bytes.is_empty() {
        let total: u64 = s.map_memory_bytes.values().sum();
        let mut top: Vec<_> = s.map_memory_bytes.iter().collect();
        top.sort_by_key(|(_, b)| std::cmp::Reverse(**b));
        let parts: Vec<String> = top
            .iter()
            .take(4)
            .map(|(m, b)| format!("{m} {:.1} MiB", **b as f64 / 1048576.0))
            .collect();
        println!(
            "kernel memory {:.1} MiB ({})",
            total as f64 / 1048576.0,
            parts.join(", ")
        );
    }
    if !s.recent_violations.is_empty() {
        println!("recent violations (newest last):");
        for v in &s.recent_violations {
            let text = |k: &str| v[k].as_str().unwrap_or("-").to_owned();
            println!(
                "  {} {} {} {} -> {}:{} class {} region {} ({}) cgroup {} x{}",
                text("time"),
                text("verdict"),
                text("protocol"),
                text("src"),
                text("dst"),
                v["dst_port"],
                text("class"),
                text("region"),
                text("reason"),
                text("cgroup"),
                v["count"]
            );
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    match real_main(&cli) {
        Ok(code) => code,
        Err(err) => {
            if let Some(
                agent::AgentError::Policy { .. }
                | agent::AgentError::UnknownInterface(_)
                | agent::AgentError::LockoutRisk { .. }
                | agent::AgentError::NoInterfaces,
            ) = err.downcast_ref::<agent::AgentError>()
            {
                eprintln!("error: {err}");
                return usage_error();
            }
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: &Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Check {
            policy,
            diff,
            json,
            tables,
        } => match (policy, diff) {
            (_, Some(pair)) => check_diff(cli, &pair[0], &pair[1], *json, tables),
            (Some(policy), None) => check(cli, policy, *json, tables),
            (None, None) => unreachable!("clap requires a policy or --diff"),
        },
        Command::Detach { pin_dir } => detach(cli, pin_dir),
        Command::Explain(args) => explain_cmd(cli, args),
        Command::Run(args) => {
            let opts = RunOptions {
                policy_path: args.policy.clone(),
                interfaces: args.interfaces.clone(),
                runtime_dir: cli.runtime_dir.clone(),
                table_capacity: args.tables.table_capacity,
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
                management: args
                    .management_cidrs
                    .iter()
                    .copied()
                    .chain(datafence::lockout::ssh_client())
                    .collect(),
                allow_lockout_risk: args.allow_lockout_risk,
                watch: !args.no_watch,
                monitor_interval: std::time::Duration::from_secs(args.monitor_interval.max(1)),
                v4_table: if args.v4_table == "trie" {
                    datafence::datapath::V4Table::Trie
                } else {
                    datafence::datapath::V4Table::Dir24
                },
                dir8_groups: args.dir8_groups,
                v6_entries: args.v6_entries,
            };
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(agent::run(opts))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => {
            let response = match control::call(
                &cli.runtime_dir.join(dirs::CONTROL_SOCKET),
                &Request::Status,
            ) {
                Err(control::ControlError::Connect { .. }) => {
                    Response::Status(Box::new(status_from_pins(&cli.runtime_dir)?))
                }
                other => other?,
            };
            match response {
                Response::Status(s) if *json => println!("{}", serde_json::to_string_pretty(&s)?),
                Response::Status(s) => print_status(&s),
                Response::Error { message } => bail!("the agent says: {message}"),
                other => bail!("unexpected answer from the agent: {other:?}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Reload => {
            let response = control::call(
                &cli.runtime_dir.join(dirs::CONTROL_SOCKET),
                &Request::Reload {
                    management: datafence::lockout::ssh_client().into_iter().collect(),
                },
            )?;
            match response {
                Response::Reloaded { sha256, generation } => {
                    println!("reloaded: sha256 {sha256}, generation {generation}");
                    Ok(ExitCode::SUCCESS)
                }
                Response::Error { message } => {
                    eprintln!("reload refused, the previous policy stays in force:\n{message}");
                    Ok(usage_error())
                }
                other => bail!("unexpected answer from the agent: {other:?}"),
            }
        }
    }
}
