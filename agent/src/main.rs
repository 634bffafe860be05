//! The `datafence` command line: `run` is the agent; `check`, `explain`, `status` and
//! `reload` are the tools that operators and scripts use around it. Each command lives
//! in [`cli`].
#![forbid(unsafe_code)]

mod cli;

use std::process::ExitCode;

use clap::Parser as _;
use datafence::agent;

use cli::{Cli, Command, init_logging, usage_error};

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
                | agent::AgentError::TcAttach(_)
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
            host,
            tables,
        } => match (policy, diff) {
            (_, Some(pair)) => cli::check::check_diff(cli, &pair[0], &pair[1], *json, tables),
            (Some(policy), None) => cli::check::check(cli, policy, *json, *host, tables),
            (None, None) => unreachable!("clap requires a policy or --diff"),
        },
        Command::Detach { pin_dir, force } => cli::detach::detach(cli, pin_dir.as_deref(), *force),
        Command::Explain(args) => cli::explain::explain_cmd(cli, args),
        Command::Run(args) => cli::run::run(cli, args),
        Command::Status { json, pin_dir } => cli::status::status(cli, *json, pin_dir.as_deref()),
        Command::Reload { pin_dir } => cli::reload::reload(cli, pin_dir.as_deref()),
        Command::TestRunInCgroup(args) => cli::explain::test_run_in_cgroup(args),
    }
}
