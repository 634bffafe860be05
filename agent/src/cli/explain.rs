//! `datafence explain`: the verdict for traffic to some addresses, from a policy file or
//! the running agent, optionally checked against the kernel's own program.
#![forbid(unsafe_code)]

use std::{
    io::Read as _,
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, bail};
use clap::Args;
use datafence::{
    control::{self, Request, Response},
    datapath::Datapath,
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
    #[command(flatten)]
    pub(crate) query: Query,
    #[command(flatten)]
    pub(crate) tables: TableArgs,
}

/// The hidden command the agent runs in another cgroup for `explain --datapath --cgroup`
/// (`datafence::explain::TEST_RUN_COMMAND`).
#[derive(Args, Debug)]
pub(crate) struct TestRunArgs {
    /// The TC entry program, pinned on bpffs by the agent.
    #[arg(long)]
    pub(crate) program: PathBuf,
    /// The packet's mark.
    #[arg(long, default_value_t = 0)]
    pub(crate) mark: u32,
}

/// The largest frame read from stdin: an Ethernet frame the kernel would test-run.
const MAX_TEST_FRAME: u64 = 64 * 1024;

/// Runs the frame on stdin through the pinned program, in this process's cgroup, and
/// prints the program's return value (a TC action) for the agent that started it.
pub(crate) fn test_run_in_cgroup(args: &TestRunArgs) -> anyhow::Result<ExitCode> {
    let mut frame = Vec::new();
    std::io::stdin()
        .take(MAX_TEST_FRAME)
        .read_to_end(&mut frame)
        .context("reading the frame from stdin")?;
    let action = Datapath::test_run_pinned_tc(&args.program, &frame, args.mark)
        .with_context(|| format!("test-running {}", args.program.display()))?;
    println!("{action}");
    Ok(ExitCode::SUCCESS)
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
/// kernel about another cgroup with `--policy` this command re-runs itself inside that
/// cgroup. (The agent places a process of its own there for its answers.)
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
            let by = match e.ring.as_deref() {
                Some("socket") => " (the socket ring refuses the call: EPERM)",
                Some(_) => " (the packet ring; a call cannot show what selects its class)",
                None => "",
            };
            println!(
                "{}: {} (class {}, region {}, mode {}) - {}: {}{by}",
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
    let mut query = args.query.clone();
    if args.datapath && query.class.is_some() {
        eprintln!("error: {}", explain::ExplainError::ClassWithDatapath);
        return Ok(usage_error());
    }
    if args.datapath {
        let own = own_cgroup();
        match &args.query.cgroup {
            // With a policy file this process asks the kernel itself, so it must be in the
            // cgroup; the agent runs the test packet in the cgroup it is sent.
            Some(wanted)
                if args.policy.is_some()
                    && own.as_deref() != Some(wanted.as_str())
                    && std::env::var_os(IN_CGROUP_ENV).is_none() =>
            {
                return rerun_in_cgroup(&cli.cgroup_root, wanted);
            }
            Some(_) => {}
            // The caller's cgroup, this command's: the agent's own is not the caller's.
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
