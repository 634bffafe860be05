//! `datafence run`: validate, load, attach, then serve reloads, the control socket and
//! violation reports until told to stop.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use datafence_common::{CLASS_NONE, FAMILY_V4, Hook, REGION_NONE, Reason, Verdict, ViolationEvent};
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, unix::AsyncFd},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
};
use tracing::{error, info, warn};

use crate::{
    control::{Attachment, CounterRow, PolicyIdentity, Request, Response, StatusReport, Totals},
    datapath::{Datapath, DatapathError, EventLimits, LoadOptions, if_index, if_name},
    dirs,
    explain::{self, KernelOracle},
    policy::{self, CompiledPolicy, LoadedPolicy, PolicyErrors},
};

#[derive(Clone, Debug)]
pub struct RunOptions {
    pub policy_path: PathBuf,
    /// Overrides the policy's egress interfaces when not empty.
    pub interfaces: Vec<String>,
    pub runtime_dir: PathBuf,
    pub table_capacity: u32,
    pub events: EventLimits,
    pub cgroup_root: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("policy {path} is invalid:\n{errors}")]
    Policy { path: String, errors: PolicyErrors },
    #[error("interface {0} does not exist")]
    UnknownInterface(String),
    #[error(
        "nothing to attach: the policy names no egress or gateway interface and no interface carries a default route; name one with --interface"
    )]
    NoInterfaces,
    #[error(transparent)]
    Datapath(#[from] DatapathError),
}

/// Everything the running agent knows, behind one lock.
struct Agent {
    opts: RunOptions,
    datapath: Datapath,
    policy: LoadedPolicy,
    compiled: CompiledPolicy,
    generation: u32,
    loaded_at: SystemTime,
    attachments: Vec<Attachment>,
}

fn load_policy(opts: &RunOptions) -> Result<LoadedPolicy, AgentError> {
    policy::load_policy(
        &opts.policy_path,
        &policy::LoadOptions {
            cgroup_root: opts.cgroup_root.clone(),
            table_capacity: opts.table_capacity,
        },
    )
    .map_err(|errors| AgentError::Policy {
        path: opts.policy_path.display().to_string(),
        errors,
    })
}

/// Interfaces that carry a default route, IPv4 or IPv6, from /proc.
pub fn default_route_interfaces() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    if let Ok(routes) = std::fs::read_to_string("/proc/net/route") {
        for line in routes.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() > 2 && cols[1] == "00000000" && cols[7] == "00000000" {
                out.push(cols[0].to_owned());
            }
        }
    }
    if let Ok(routes) = std::fs::read_to_string("/proc/net/ipv6_route") {
        for line in routes.lines() {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() == 10
                && cols[0] == "00000000000000000000000000000000"
                && cols[1] == "00"
                && cols[9] != "lo"
            {
                out.push(cols[9].to_owned());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn egress_interfaces(opts: &RunOptions, policy: &LoadedPolicy) -> Result<Vec<String>, AgentError> {
    let list = if !opts.interfaces.is_empty() {
        opts.interfaces.clone()
    } else if let Some(list) = &policy.egress_interfaces {
        list.clone()
    } else {
        default_route_interfaces()
    };
    // `egress: []` in a policy means a gateway-only host: XDP and no TC egress hook.
    if list.is_empty() && policy.gateway_interfaces.is_empty() {
        return Err(AgentError::NoInterfaces);
    }
    Ok(list)
}

/// Validates everything, then loads and attaches. Nothing touches the kernel until the
/// policy and the interfaces have been checked.
fn start(opts: RunOptions) -> Result<Agent, AgentError> {
    let policy = load_policy(&opts)?;
    let egress = egress_interfaces(&opts, &policy)?;
    for name in egress.iter().chain(&policy.gateway_interfaces) {
        if if_index(name).is_none() {
            return Err(AgentError::UnknownInterface(name.clone()));
        }
    }
    let compiled = policy.compile();
    let mut datapath = Datapath::load(&LoadOptions {
        table_capacity: opts.table_capacity,
    })?;
    let report = datapath.apply(&compiled, opts.events)?;
    let mut attachments = Vec::new();
    for name in &egress {
        datapath.attach_tc(name)?;
        info!(interface = %name, hook = "tc_egress", "attached");
        attachments.push(Attachment {
            interface: name.clone(),
            hook: Hook::TcEgress.as_str().to_owned(),
        });
    }
    for name in &policy.gateway_interfaces {
        datapath.attach_xdp(name)?;
        info!(interface = %name, hook = "xdp", "attached");
        attachments.push(Attachment {
            interface: name.clone(),
            hook: Hook::Xdp.as_str().to_owned(),
        });
    }
    info!(
        policy = %opts.policy_path.display(),
        sha256 = %policy.sha256,
        generation = report.generation,
        regions_v4 = report.regions_v4,
        regions_v6 = report.regions_v6,
        "policy in force"
    );
    Ok(Agent {
        opts,
        datapath,
        policy,
        compiled,
        generation: report.generation,
        loaded_at: SystemTime::now(),
        attachments,
    })
}

impl Agent {
    /// Re-reads the policy and switches to it with no gap; on any failure the old one
    /// stays in force.
    fn reload(&mut self) -> Result<(), AgentError> {
        let policy = load_policy(&self.opts)?;
        let compiled = policy.compile();
        let report = self.datapath.apply(&compiled, self.opts.events)?;
        info!(sha256 = %policy.sha256, generation = report.generation, "policy reloaded");
        self.policy = policy;
        self.compiled = compiled;
        self.generation = report.generation;
        self.loaded_at = SystemTime::now();
        Ok(())
    }

    fn status(&self) -> Result<StatusReport, AgentError> {
        let mut rows = Vec::new();
        let mut totals = Totals::default();
        for (key, value) in self.datapath.counters()? {
            match Verdict::from_u8(key.verdict) {
                Some(Verdict::Allow) => totals.allow += value.packets,
                Some(Verdict::Deny) => totals.deny += value.packets,
                Some(Verdict::Audit) => totals.audit += value.packets,
                None => {}
            }
            rows.push(CounterRow {
                interface: if_name(key.ifindex).unwrap_or_else(|| key.ifindex.to_string()),
                hook: Hook::from_u8(key.hook)
                    .map_or("unknown", Hook::as_str)
                    .to_owned(),
                class: self.class_label(key.class),
                region: self.region_label(key.region),
                verdict: Verdict::from_u8(key.verdict)
                    .map_or("unknown", Verdict::as_str)
                    .to_owned(),
                reason: Reason::from_u8(key.reason)
                    .map_or("unknown", Reason::as_str)
                    .to_owned(),
                packets: value.packets,
                bytes: value.bytes,
            });
        }
        rows.sort_by(|a, b| {
            (&a.interface, &a.class, &a.region, &a.verdict, &a.reason).cmp(&(
                &b.interface,
                &b.class,
                &b.region,
                &b.verdict,
                &b.reason,
            ))
        });
        let stats = self.datapath.stats()?;
        Ok(StatusReport {
            attachments: self.attachments.clone(),
            policy: PolicyIdentity {
                path: self.policy.path.display().to_string(),
                version: self.policy.version,
                sha256: self.policy.sha256.clone(),
                loaded_at: rfc3339(self.loaded_at),
                generation: self.generation,
            },
            counters: rows,
            totals,
            events_lost: stats.events_lost,
            events_suppressed: stats.events_suppressed,
        })
    }

    fn class_label(&self, class: u8) -> String {
        if class == CLASS_NONE {
            return "none".to_owned();
        }
        self.policy
            .class_name(class)
            .unwrap_or("unknown")
            .to_owned()
    }

    fn region_label(&self, region: u16) -> String {
        if region == REGION_NONE {
            return "none".to_owned();
        }
        self.policy
            .region_name(region)
            .unwrap_or("unknown")
            .to_owned()
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

type Shared = Arc<Mutex<Agent>>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Agent> {
    // A panic while holding the lock leaves plain data behind; keep serving.
    shared
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn handle(shared: Shared, request: Request) -> Response {
    let result = tokio::task::spawn_blocking(move || {
        let mut agent = lock(&shared);
        match request {
            Request::Status => agent
                .status()
                .map(|s| Response::Status(Box::new(s)))
                .map_err(|e| e.to_string()),
            Request::Reload => match agent.reload() {
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
                    match KernelOracle::new(&agent.compiled) {
                        Ok(o) => Some(o),
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

async fn serve_client(shared: Shared, stream: UnixStream) -> anyhow::Result<()> {
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
    }
    Ok(())
}

fn bind_control(runtime_dir: &Path) -> anyhow::Result<UnixListener> {
    std::fs::create_dir_all(runtime_dir)
        .with_context(|| format!("creating runtime directory {}", runtime_dir.display()))?;
    let path = runtime_dir.join(dirs::CONTROL_SOCKET);
    // A socket left by a crashed agent would make bind fail.
    let _ = std::fs::remove_file(&path);
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// A violation, as one JSON log line.
#[derive(Serialize)]
pub struct ViolationRecord {
    pub time: String,
    pub host: String,
    pub interface: String,
    pub hook: &'static str,
    pub class: String,
    pub region: String,
    pub verdict: &'static str,
    pub mode: &'static str,
    pub reason: &'static str,
    pub protocol: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub cgroup: String,
    pub cgroup_id: u64,
    pub packet_len: u32,
    pub policy_sha256: String,
}

fn addr_of(family: u8, bytes: &[u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

impl Agent {
    fn record(
        &self,
        ev: &ViolationEvent,
        host: &str,
        cgroups: &mut crate::cgroups::CgroupNames,
    ) -> ViolationRecord {
        let verdict = Verdict::from_u8(ev.verdict).unwrap_or(Verdict::Deny);
        ViolationRecord {
            time: rfc3339(SystemTime::now()),
            host: host.to_owned(),
            interface: if_name(ev.ifindex).unwrap_or_else(|| ev.ifindex.to_string()),
            hook: Hook::from_u8(ev.hook).map_or("unknown", Hook::as_str),
            class: self.class_label(ev.class),
            region: self.region_label(ev.region),
            verdict: verdict.as_str(),
            mode: if verdict == Verdict::Audit {
                "audit"
            } else {
                "enforce"
            },
            reason: Reason::from_u8(ev.reason).map_or("unknown", Reason::as_str),
            protocol: ev.protocol,
            src: addr_of(ev.family, &ev.src_addr),
            dst: addr_of(ev.family, &ev.dst_addr),
            src_port: ev.src_port,
            dst_port: ev.dst_port,
            cgroup: cgroups.name(ev.cgroup_id),
            cgroup_id: ev.cgroup_id,
            packet_len: ev.packet_len,
            policy_sha256: self.policy.sha256.clone(),
        }
    }
}

async fn report_violations(shared: Shared, ring: RingBuf<MapData>) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, for as long
    // as the AsyncFd owns the ring buffer.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("watching the event ring buffer")?;
    let host = hostname();
    let cgroup_root = lock(&shared).opts.cgroup_root.clone();
    let mut cgroups = crate::cgroups::CgroupNames::new(cgroup_root);
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        let mut events = Vec::new();
        while let Some(item) = ring.next() {
            if let Some(ev) = ViolationEvent::from_bytes(&item) {
                events.push(ev);
            }
        }
        guard.clear_ready();
        if events.is_empty() {
            continue;
        }
        let lines: Vec<String> = {
            let agent = lock(&shared);
            events
                .iter()
                .filter_map(|ev| serde_json::to_string(&agent.record(ev, &host, &mut cgroups)).ok())
                .collect()
        };
        let mut out = std::io::stdout().lock();
        for line in lines {
            use std::io::Write as _;
            let _ = writeln!(out, "{line}");
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let runtime_dir = opts.runtime_dir.clone();
    let mut agent = tokio::task::spawn_blocking(move || start(opts)).await??;
    let ring = agent.datapath.take_events()?;
    let listener = bind_control(&runtime_dir)?;
    let shared: Shared = Arc::new(Mutex::new(agent));

    let reporter = tokio::spawn(report_violations(shared.clone(), ring));
    let server_state = shared.clone();
    let server = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let state = server_state.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_client(state, stream).await {
                            warn!(error = %e, "control client");
                        }
                    });
                }
                Err(e) => warn!(error = %e, "control socket accept"),
            }
        }
    });

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    info!(control = %runtime_dir.join(dirs::CONTROL_SOCKET).display(), "running");
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let state = shared.clone();
                let result = tokio::task::spawn_blocking(move || lock(&state).reload()).await?;
                if let Err(e) = result {
                    error!(error = %e, "reload refused; the previous policy stays in force");
                }
            }
            _ = term.recv() => { info!("SIGTERM: stopping"); break; }
            _ = int.recv() => { info!("SIGINT: stopping"); break; }
        }
    }
    server.abort();
    reporter.abort();
    let _ = std::fs::remove_file(runtime_dir.join(dirs::CONTROL_SOCKET));
    Ok(())
}
