//! `datafence detach`: end enforcement, through the running agent or, with none, by
//! removing the pins and clsact filters here.
#![forbid(unsafe_code)]

use std::{path::Path, process::ExitCode};

use anyhow::{Context as _, bail};
use datafence::control::{self, Request, Response};

use super::Cli;

pub(crate) fn detach(cli: &Cli, pin_dir: Option<&Path>, force: bool) -> anyhow::Result<ExitCode> {
    let address = control::Address::resolve(cli.runtime_dir.as_deref(), pin_dir);
    if let Some((socket, _)) = address.live_agent()? {
        return match control::call(&socket, &Request::Detach)? {
            Response::Detached { detached } => {
                println!(
                    "detached {} (the agent has stopped)",
                    if detached.is_empty() {
                        "nothing".to_owned()
                    } else {
                        detached.join(", ")
                    }
                );
                Ok(ExitCode::SUCCESS)
            }
            Response::Error { message } => bail!("the agent could not detach: {message}"),
            other => bail!("unexpected answer from the agent: {other:?}"),
        };
    }
    // No agent addressed: remove what is pinned, unless a running agent owns it, and the
    // clsact filters the last agent left (they need no pin).
    let pin_dir = address.pins();
    if let Some(owner) = control::live_owner(&pin_dir) {
        if !force {
            eprintln!(
                "error: the agent on control socket {} is running and owns the pins in {}; \
                 detach through it (`datafence --runtime-dir {} detach`), or pass --force",
                owner.display(),
                pin_dir.display(),
                owner.parent().unwrap_or(Path::new("/")).display()
            );
            return Ok(ExitCode::FAILURE);
        }
        eprintln!(
            "warning: removing pins that the running agent on {} owns (--force)",
            owner.display()
        );
    }
    // An agent that holds the pin directory but does not answer (stuck, or started with
    // another runtime directory) still owns what is pinned there.
    let _lock = if pin_dir.is_dir() {
        match datafence::datapath::PinLock::acquire(&pin_dir) {
            Ok(lock) => Some(lock),
            Err(e) if !force => {
                eprintln!("error: {e}; or pass --force");
                return Ok(ExitCode::FAILURE);
            }
            Err(e) => {
                eprintln!("warning: {e}; removing its pins anyway (--force)");
                None
            }
        }
    } else {
        None
    };
    let mut detached =
        datafence::clsact::remove_all().context("removing datafence's clsact filters")?;
    let layout = datafence::datapath::PinLayout::new(&pin_dir);
    detached.extend(
        layout
            .remove_all()
            .with_context(|| format!("removing pinned state under {}", pin_dir.display()))?,
    );
    detached.sort();
    detached.dedup();
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
