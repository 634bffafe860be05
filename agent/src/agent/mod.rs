//! `datafence run`: validate, load, attach, then serve reloads, the control socket and
//! violation reports until told to stop.
//!
//! The agent is one [`Agent`](core::Agent) behind one lock, and a few loops around it:
//! - [`start`]: validation, loading and attachment, before anything runs;
//! - [`core`]: the agent's state and everything done under its lock (reload, repair,
//!   status, snapshots);
//! - [`control_server`]: the control socket that `status`, `reload`, `detach` and
//!   `explain` talk to;
//! - [`reporter`]: violation events from the kernel's ring buffer to JSON lines;
//! - [`watch`]: the policy file watcher;
//! - [`monitor`]: attachment repair and the systemd watchdog.
//!
//! The metrics HTTP server is [`crate::metrics::http`]; it reads snapshots the agent
//! publishes and never holds the agent's lock.
#![forbid(unsafe_code)]

mod control_server;
mod core;
mod monitor;
mod reporter;
mod start;
mod watch;

use std::{path::PathBuf, sync::Arc, time::SystemTime};

use anyhow::Context as _;
use ipnetwork::IpNetwork;
use parking_lot::FairMutex;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    control::{self as control},
    datapath::{DatapathError, EventLimits},
    dirs,
    liveness::{Liveness, Loop},
    metrics,
    policy::PolicyErrors,
    report,
};

use self::core::Agent;

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub policy_path: PathBuf,
    /// Overrides the policy's egress interfaces when not empty.
    pub interfaces: Vec<String>,
    pub runtime_dir: PathBuf,
    pub table_capacity: u32,
    /// Size limits of the policy file and region files, and the policy's YAML node limit.
    pub max_policy_bytes: u64,
    pub max_region_file_bytes: u64,
    pub max_yaml_nodes: usize,
    pub events: EventLimits,
    pub cgroup_root: PathBuf,
    /// Serve /metrics and /healthz here.
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub reports: ReportOptions,
    /// bpffs directory for pinned links and maps; `None` makes enforcement end with the
    /// process (for trials only).
    pub pin_dir: Option<PathBuf>,
    /// Networks the host is managed from: a policy that does not exempt them is refused
    /// unless `allow_lockout_risk`.
    pub management: Vec<IpNetwork>,
    /// The ports SSH sessions are on (`--ssh-port`); empty: the ports sshd listens on,
    /// and 22. A policy that would cut a session established on one of them (deny its
    /// replies) is refused unless `allow_lockout_risk`.
    pub ssh_ports: Vec<u16>,
    pub allow_lockout_risk: bool,
    /// Reload when the policy file or a region file changes.
    pub watch: bool,
    /// How often attachments are verified (and repaired).
    pub monitor_interval: std::time::Duration,
    /// How TC egress programs are attached: "auto" (tcx where the kernel has it, else
    /// clsact), "tcx" or "clsact".
    pub tc_attach: String,
    /// The cgroup v2 directory the socket ring attaches at; `None` runs the packet ring
    /// alone.
    pub socket_ring: Option<PathBuf>,
}

/// Where and how violations are reported.
#[derive(Clone, Debug)]
pub struct ReportOptions {
    /// Repeats of a flow within this interval are folded into one line.
    pub fold_interval: std::time::Duration,
    /// Also append the lines to this file, rotated by size.
    pub file: Option<PathBuf>,
    pub file_max_bytes: u64,
    pub file_keep: u32,
}

impl Default for ReportOptions {
    fn default() -> Self {
        Self {
            fold_interval: report::DEFAULT_FOLD_INTERVAL,
            file: None,
            file_max_bytes: 64 << 20,
            file_keep: 3,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("policy {path} is invalid:\n{errors}")]
    Policy { path: String, errors: PolicyErrors },
    #[error("interface {0} does not exist")]
    UnknownInterface(String),
    #[error(
        "nothing to attach: the policy's `interfaces.egress` is empty and it names no gateway interface"
    )]
    NoInterfaces,
    #[error("cannot list the network interfaces: {0}")]
    ListInterfaces(std::io::Error),
    #[error("{}", lockout_message(.path, .at_risk))]
    LockoutRisk {
        path: String,
        at_risk: crate::lockout::AtRisk,
    },
    #[error(transparent)]
    Kernel(#[from] crate::kernel::KernelCheck),
    #[error("{0}")]
    TcAttach(String),
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

fn lockout_message(path: &str, at_risk: &crate::lockout::AtRisk) -> String {
    use crate::lockout::AtRisk;
    match at_risk {
        AtRisk::ManagementNetwork(address) => format!(
            "policy {path} would lock this host out: its exempt list does not cover the management address {address}; add it to `exempt`, or pass --allow-lockout-risk if you are sure"
        ),
        AtRisk::SshSession(cut) => format!(
            "refusing policy {path}: it would deny the replies of the SSH session {cut}; exempt the client's network or pass --allow-lockout-risk"
        ),
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// The agent's state, shared by the reload path, the event reader, the control server and
/// the metrics snapshots. A fair lock: under a flood of violations the event reader wants
/// it for every batch, and an unfair lock let it win again and again while a reload
/// waited (minutes, on an emulated 6.1 kernel). Each unlock hands the lock to the longest
/// waiter.
type Shared = Arc<FairMutex<Agent>>;

fn lock(shared: &Shared) -> parking_lot::FairMutexGuard<'_, Agent> {
    shared.lock()
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let runtime_dir = opts.runtime_dir.clone();
    let reports = opts.reports.clone();
    let monitor_interval = opts.monitor_interval;
    let watch = opts.watch;
    let policy_path = opts.policy_path.clone();
    let cgroup_root = opts.cgroup_root.clone();
    let metrics_addr = opts.metrics_addr;
    // Bound before anything else: a taken port fails the start before anything is
    // attached, and the listener is up by the time the agent reports itself ready (a
    // scrape that comes early waits in the backlog rather than being refused).
    let metrics_listener = metrics_addr
        .map(|addr| {
            std::net::TcpListener::bind(addr)
                .with_context(|| format!("the metrics address {addr} is not available"))
        })
        .transpose()?;
    // Caught from here on, not only once the agent runs: a start takes seconds, and
    // SIGHUP's default action would end the agent, as a clean exit that systemd's
    // `Restart=on-failure` does not restart. One that comes during the start reloads
    // once it is done.
    let mut hup = signal(SignalKind::hangup())?;
    let mut agent = tokio::task::spawn_blocking(move || start::start(opts)).await??;
    let ring = agent.datapath.take_events()?;
    let listener = control_server::bind_control(&runtime_dir)?;
    agent.write_state();
    if let Some(pins) = agent.datapath.pins()
        && let Err(e) = control::claim_pins(&pins.root, &runtime_dir)
    {
        warn!(pins = %pins.root.display(), error = %e, "cannot record this agent as the owner of the pins");
    }
    // Taken before the agent goes behind its lock: an async task that waited for the lock
    // would hold a runtime worker while the lock is busy.
    let stop = agent.stop.clone();
    let sources = agent.sources.clone();
    let pinned = agent.datapath.pins().map(|p| p.root.clone());
    let shared: Shared = Arc::new(FairMutex::new(agent));
    let watchdog_period = sd_notify::watchdog_enabled();
    let live = Arc::new(Liveness::new(watchdog_period, monitor_interval));
    for l in Loop::ALL {
        live.beat(l);
    }

    let reporter = tokio::spawn(reporter::report_violations(
        shared.clone(),
        ring,
        reports,
        live.clone(),
    ));
    let metrics = metrics_listener.map(|listener| {
        let (state, live) = (shared.clone(), live.clone());
        let take: metrics::http::TakeSnapshot =
            Arc::new(move || lock(&state).snapshot().map_err(|e| e.to_string()));
        tokio::spawn(async move {
            if let Err(e) = metrics::http::serve(take, listener, live).await {
                error!(error = %e, "metrics server stopped");
            }
        })
    });
    let server = tokio::spawn(control_server::serve(
        listener,
        shared.clone(),
        live.clone(),
        stop.clone(),
    ));

    let monitor = tokio::spawn(monitor::monitor_attachments(
        shared.clone(),
        monitor_interval,
        live.clone(),
    ));
    // A new interface is attached as soon as the kernel announces it, before it can have
    // the addresses and routes that would let it carry traffic; the monitor's periodic
    // check stays as the backstop.
    let on_link_change = {
        let state = shared.clone();
        move || lock(&state).ensure_attached()
    };
    if let Err(e) = crate::links::watch(on_link_change) {
        warn!(error = %e, "cannot watch for new interfaces; they are attached at the periodic check only");
    }
    let named_cgroups = {
        let state = shared.clone();
        move || {
            let named = lock(&state).policy.class_cgroups();
            named.into_iter().map(|(_, path)| path).collect()
        }
    };
    let on_cgroup_change = {
        let state = shared.clone();
        move || lock(&state).refresh_cgroups()
    };
    if let Err(e) = crate::cgroup_watch::watch(cgroup_root, named_cgroups, on_cgroup_change) {
        warn!(error = %e, "cannot watch cgroups; recreated ones are followed at the periodic check only");
    }
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<&'static str>(4);
    if watch {
        watch::watch_policy(&policy_path, sources, reload_tx.clone())?;
    }
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    info!(control = %runtime_dir.join(dirs::CONTROL_SOCKET).display(), "running");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let watchdog =
        watchdog_period.map(|period| tokio::spawn(monitor::watchdog(period, live.clone())));
    loop {
        let cause = tokio::select! {
            _ = hup.recv() => "SIGHUP",
            Some(cause) = reload_rx.recv() => cause,
            _ = term.recv() => { info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { info!("SIGINT: stopping"); break; }
            () = stop.notified() => break,
        };
        let state = shared.clone();
        let result = tokio::task::spawn_blocking(move || lock(&state).reload(&[])).await?;
        match result {
            Ok(()) => info!(cause, "reload done"),
            Err(e) => {
                error!(cause, error = %e, "reload refused; the previous policy stays in force");
            }
        }
    }
    match pinned {
        Some(dir) if dir.exists() => info!(
            pinned = %dir.display(),
            "enforcement stays in place while the agent is stopped, like a firewall's rules; `datafence detach` removes it"
        ),
        _ => info!("enforcement ends with the agent (nothing pinned)"),
    }
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    monitor.abort();
    if let Some(w) = watchdog {
        w.abort();
    }
    server.abort();
    reporter.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    let _ = std::fs::remove_file(runtime_dir.join(dirs::CONTROL_SOCKET));
    Ok(())
}
