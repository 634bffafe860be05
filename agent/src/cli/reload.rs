//! `datafence reload`: make the running agent switch to its policy file as it is now.
#![forbid(unsafe_code)]

use std::{path::Path, process::ExitCode};

use anyhow::bail;
use datafence::control::{self, Request, Response};

use super::{Cli, usage_error};

/// Asks the addressed agent to reload; a refused policy exits with EX_USAGE.
pub(crate) fn reload(cli: &Cli, pin_dir: Option<&Path>) -> anyhow::Result<ExitCode> {
    let address = control::Address::resolve(cli.runtime_dir.as_deref(), pin_dir);
    let Some((socket, _)) = address.live_agent()? else {
        match (&address.socket(), pin_dir) {
            (_, Some(p)) => bail!(
                "no running agent owns the pins in {} (none is recorded there, or it does not answer)",
                p.display()
            ),
            (Some(socket), None) => bail!(
                "cannot reach the datafence agent at {} (is `datafence run` running? see --runtime-dir)",
                socket.display()
            ),
            (None, None) => bail!("no agent addressed"),
        }
    };
    // The agent finds the SSH sessions to keep for itself, whichever way a reload
    // comes: this command names none.
    let response = control::call(
        &socket,
        &Request::Reload {
            management: Vec::new(),
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
