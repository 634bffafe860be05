//! The control socket: one JSON request per line from `datafence status`, `reload`,
//! `detach` and `explain`, each answered under the agent's lock on a blocking thread.
#![forbid(unsafe_code)]

use std::{path::Path, sync::Arc};

use anyhow::Context as _;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
};
use tracing::{error, info, warn};

use super::{Shared, lock};
use crate::{
    control::{Request, Response},
    dirs,
    explain::{self, KernelOracle},
    liveness::{self, Liveness, Loop},
};

async fn handle(shared: Shared, request: Request) -> Response {
    let result = tokio::task::spawn_blocking(move || {
        let mut agent = lock(&shared);
        match request {
            // The caller stops the agent once the answer is sent.
            Request::Detach => match agent.detach_all() {
                Ok(detached) => {
                    info!(?detached, "detached on request; stopping");
                    Ok(Response::Detached { detached })
                }
                Err(e) => Err(e.to_string()),
            },
            Request::Status => agent
                .status()
                .map(|s| Response::Status(Box::new(s)))
                .map_err(|e| e.to_string()),
            Request::Reload { management } => match agent.reload(&management) {
                Ok(()) => Ok(Response::Reloaded {
                    sha256: agent.policy.sha256.clone(),
                    generation: agent.generation,
                }),
                Err(e) => {
                    error!(error = %e, "reload refused; the previous policy stays in force");
                    Err(e.to_string())
                }
            },
            Request::Explain {
                query,
                addresses,
                datapath,
            } => {
                let cgroup_root = agent.opts.cgroup_root.clone();
                let mut oracle = if datapath {
                    // The agent keeps no compiled prefix lists; compile them afresh.
                    match KernelOracle::new(&agent.policy.compile()) {
                        // The caller's cgroup (the CLI sends its own when not told one),
                        // not the agent's: the test frame is classified by the cgroup of
                        // the process that runs it. The pin the child opens goes with the
                        // agent's own, on a bpffs it may write.
                        Ok(o) => Some(o.run_in_query_cgroups(
                            cgroup_root.clone(),
                            agent.datapath.pins().map(|p| p.root.clone()),
                        )),
                        Err(e) => return Err(e.to_string()),
                    }
                } else {
                    None
                };
                let mut explanations = Vec::new();
                for address in addresses {
                    let answer = match oracle.as_mut() {
                        Some(o) => explain::explain_with_kernel(
                            o,
                            &agent.policy,
                            &agent.compiled,
                            &cgroup_root,
                            &query,
                            address,
                        ),
                        None => explain::explain(
                            &agent.policy,
                            &agent.compiled,
                            &cgroup_root,
                            &query,
                            address,
                        ),
                    };
                    explanations.push(answer.map_err(|e| e.to_string())?);
                }
                Ok(Response::Explained { explanations })
            }
        }
    })
    .await;
    match result {
        Ok(Ok(response)) => response,
        Ok(Err(message)) => Response::Error { message },
        Err(e) => Response::Error {
            message: format!("internal error: {e}"),
        },
    }
}

async fn serve_client(
    shared: Shared,
    stream: UnixStream,
    stop: Arc<tokio::sync::Notify>,
) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => handle(shared.clone(), request).await,
            Err(e) => Response::Error {
                message: format!("bad request: {e}"),
            },
        };
        let mut out = serde_json::to_string(&response)?;
        out.push('\n');
        write.write_all(out.as_bytes()).await?;
        if matches!(response, Response::Detached { .. }) {
            // Only now: stopping first would leave `datafence detach` without an answer.
            write.flush().await?;
            stop.notify_one();
        }
    }
    Ok(())
}

pub(super) fn bind_control(runtime_dir: &Path) -> anyhow::Result<UnixListener> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(runtime_dir)
        .with_context(|| format!("creating runtime directory {}", runtime_dir.display()))?;
    let path = runtime_dir.join(dirs::CONTROL_SOCKET);
    // A socket left by a crashed agent would make bind fail.
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accepts control clients until aborted, and proves the request path alive every
/// [`liveness::CONTROL_PROBE`] even when no client calls.
pub(super) async fn serve(
    listener: UnixListener,
    server_state: Shared,
    server_live: Arc<Liveness>,
    stop: Arc<tokio::sync::Notify>,
) {
    let mut probe_tick = tokio::time::interval(liveness::CONTROL_PROBE);
    let mut probe: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (state, live, stop) = (server_state.clone(), server_live.clone(), stop.clone());
                    tokio::spawn(async move {
                        match serve_client(state, stream, stop).await {
                            Ok(()) => live.beat(Loop::Control),
                            Err(e) => warn!(error = %e, "control client"),
                        }
                    });
                }
                Err(e) => warn!(error = %e, "control socket accept"),
            },
            _ = probe_tick.tick() => {
                // The path every request takes: a blocking task that takes the
                // agent's lock. One probe at a time; a stuck one shows as a stall.
                if probe.as_ref().is_none_or(tokio::task::JoinHandle::is_finished) {
                    let (state, live) = (server_state.clone(), server_live.clone());
                    probe = Some(tokio::task::spawn_blocking(move || {
                        drop(lock(&state));
                        live.beat(Loop::Control);
                    }));
                }
            }
        }
    }
}
