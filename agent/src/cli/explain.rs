//! `datafence explain`: the verdict for traffic to some addresses, from a policy file or
//! the running agent, optionally checked against the kernel's own program.
#![forbid(unsafe_code)]

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, bail};
use clap::Args;
use datafence::{
    control::{self, Request, Response},
    dirs,
    explain::{self, Explanation, KernelOracle, Query},
};

use super::{Cli, TableArgs, load, usage_error};

#[derive(Args, Debug)]
pub(crate) struct ExplainArgs {
    /// Destination addresses to explain.
    #[arg(required = true)]
    pub(crate) addresses: Vec<IpAddr>,
    /// Explain against this policy file instead of the running agent's policy.
    #[arg(long)]
    pub(crate) policy: Option<PathBuf>,
    /// One JSON object per address: {"address", "region", "class", "verdict", "mode", "reason"}.
    #[arg(long)]
    pub(crate) json: bool,
    /// Also run the real eBPF program on a crafted packet (BPF_PROG_TEST_RUN, nothing
    /// attached) and fail if the kernel's verdict differs from userspace's.
    #[arg(long)]
    pub(crate) datapath: bool,
    /// Judge the traffic as this data class, skipping classification.
    #[arg(long, conflicts_with_all = ["mark", "cgroup", "dscp"])]
    pub(crate) class: Option<String>,
    /// The packet's mark (SO_MARK / fwmark), decimal or 0x-hex.
    #[arg(long, value_parser = parse_u32)]
    pub(crate) mark: Option<u32>,
    /// The sending process's cgroup v2 path, e.g. /system.slice/user-api.service.
    #[arg(long)]
    pub(crate) cgroup: Option<String>,
    /// The packet's DSCP (0-63).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=63))]
    pub(crate) dscp: Option<u8>,
    /// Transport protocol: tcp, udp, sctp, icmp or a number.
    #[arg(long, default_value = "tcp", value_parser = parse_protocol)]
    pub(crate) proto: u8,
    /// Destination port.
    #[arg(long, default_value_t = 443)]
    pub(crate) dport: u16,
    /// Source address (for src_cidrs selectors); default unspecified.
    #[arg(long)]
    pub(crate) src: Option<IpAddr>,
    #[command(flatten)]
    pub(crate) tables: TableArgs,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("{s:?}: {e}"))
}

/// A protocol name from the one table in `datafence_common::protocols`, in any case, or
/// a number.
fn parse_protocol(s: &str) -> Result<u8, String> {
    match datafence_common::protocols::number(s) {
        Some(number) => Ok(number),
        None => s
            .parse()
            .map_err(|_| format!("{s:?}: expected tcp, udp, sctp, icmp, icmpv6 or 0-255")),
    }
}

/// This process's cgroup v2 path.
pub(crate) fn own_cgroup() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::to_owned)
}

const IN_CGROUP_ENV: &str = "DATAFENCE_EXPLAIN_IN_CGROUP";

/// `BPF_PROG_TEST_RUN` gives the test packet the calling process's cgroup, so to ask the
/// kernel about another cgroup this command re-runs itself inside that cgroup.
pub(crate) fn rerun_in_cgroup(cgroup_root: &Path, cgroup: &str) -> anyhow::Result<ExitCode> {
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

pub(crate) fn print_explanations(list: &[Explanation], json: bool) -> anyhow::Result<()> {
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

pub(crate) fn explain_cmd(cli: &Cli, args: &ExplainArgs) -> anyhow::Result<ExitCode> {
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
            &cli.runtime_dir
                .as_deref()
                .unwrap_or(Path::new(dirs::RUNTIME_DIR))
                .join(dirs::CONTROL_SOCKET),
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
