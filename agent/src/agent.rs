//! `datafence run`: validate, load, attach, then serve reloads, the control socket and
//! violation reports until told to stop.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use datafence_common::{CLASS_NONE, Hook, REGION_NONE, Reason, Verdict, ViolationEvent, map_names};
use ipnetwork::IpNetwork;
use serde::Serialize;
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader, unix::AsyncFd},
    net::{UnixListener, UnixStream},
    signal::unix::{SignalKind, signal},
};
use tracing::{error, info, warn};

use crate::{
    cgroups::CgroupNames,
    control::{
        self as control, AgentState, Attachment, PolicyIdentity, Request, Response, STATE_FILE,
        StatusReport,
    },
    datapath::{Attached, Datapath, DatapathError, EventLimits, LoadOptions, if_index, if_name},
    dirs,
    explain::{self, KernelOracle},
    lockout,
    metrics::{self, AgentCounters, CounterLedger, Snapshot},
    policy::{self, CompiledPolicy, LoadedPolicy, PolicyErrors},
    report::{self, FlowKey, Folder, RotatingFile, ViolationRecord},
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
    /// Serve /metrics and /healthz here.
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub reports: ReportOptions,
    /// bpffs directory for pinned links and maps; `None` makes enforcement end with the
    /// process (for trials only).
    pub pin_dir: Option<PathBuf>,
    /// Networks the host is managed from (plus `SSH_CONNECTION`'s client): a policy that
    /// does not exempt them is refused unless `allow_lockout_risk`.
    pub management: Vec<IpNetwork>,
    pub allow_lockout_risk: bool,
    /// Reload when the policy file or a region file changes.
    pub watch: bool,
    /// How often attachments are verified (and repaired).
    pub monitor_interval: std::time::Duration,
    pub v4_table: crate::datapath::V4Table,
    pub dir8_groups: u32,
    /// IPv6 table entries per slot (prefixes and search markers).
    pub v6_entries: u32,
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
        "nothing to attach: the policy names no egress or gateway interface and no interface carries a default route; name one with --interface"
    )]
    NoInterfaces,
    #[error(
        "policy {path} would lock this host out: its exempt list does not cover the management address {address}; add it to `exempt`, or pass --allow-lockout-risk if you are sure"
    )]
    LockoutRisk { path: String, address: IpNetwork },
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
    ledger: CounterLedger,
    counters: Arc<AgentCounters>,
    /// Interfaces found missing, so their absence is logged once, not every check.
    missing: std::collections::BTreeSet<String>,
    /// Told when a `detach` request means the agent should exit.
    stop: Arc<tokio::sync::Notify>,
    /// The latest violation lines, for `datafence status`.
    recent: std::collections::VecDeque<serde_json::Value>,
    /// The files the policy in force was read from, for the file watcher.
    sources: Arc<Mutex<Vec<PathBuf>>>,
}

/// Violation lines `datafence status` shows.
const RECENT_VIOLATIONS: usize = 10;

fn load_policy(
    opts: &RunOptions,
    extra_management: &[IpNetwork],
) -> Result<LoadedPolicy, AgentError> {
    let policy = read_policy(opts)?;
    if !opts.allow_lockout_risk {
        let management: Vec<IpNetwork> = opts
            .management
            .iter()
            .chain(extra_management)
            .copied()
            .collect();
        if let Some(address) = lockout::uncovered(&policy.exempt, &management).first() {
            return Err(AgentError::LockoutRisk {
                path: opts.policy_path.display().to_string(),
                address: *address,
            });
        }
    }
    Ok(policy)
}

fn read_policy(opts: &RunOptions) -> Result<LoadedPolicy, AgentError> {
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

/// The interfaces and hooks the agent should be attached to now.
fn desired_attachments(
    opts: &RunOptions,
    policy: &LoadedPolicy,
) -> Result<Vec<Attachment>, AgentError> {
    let egress = egress_interfaces(opts, policy)?;
    let tc = egress.into_iter().map(|interface| Attachment {
        interface,
        hook: Hook::TcEgress.as_str().to_owned(),
    });
    let xdp = policy
        .gateway_interfaces
        .iter()
        .map(|interface| Attachment {
            interface: interface.clone(),
            hook: Hook::Xdp.as_str().to_owned(),
        });
    Ok(tc.chain(xdp).collect())
}

fn attach(datapath: &mut Datapath, a: &Attachment) -> Result<Attached, DatapathError> {
    if a.hook == Hook::Xdp.as_str() {
        datapath.attach_xdp(&a.interface)
    } else {
        datapath.attach_tc(&a.interface)
    }
}

/// Makes large allocations (policy files, prefix lists, table builds) come straight from
/// mmap, so freeing them returns the memory. glibc otherwise raises its mmap threshold
/// each time such a block is freed, and later large blocks land in the heap, where a
/// million-prefix reload leaves tens of MiB the agent keeps for its lifetime.
fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator tuning; a fixed threshold is always valid.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
    }
}

/// Hands freed heap pages back to the kernel after a policy switch.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free heap pages; it has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Validates everything, then loads and attaches. Nothing touches the kernel until the
/// policy and the interfaces have been checked. With pinning, whatever an earlier agent
/// left in force is adopted: its maps are reused (the old policy keeps being enforced),
/// the new policy goes into the other slot, and pinned links are switched to the new
/// programs atomically, so a restart or upgrade has no gap.
fn start(opts: RunOptions) -> Result<Agent, AgentError> {
    tune_allocator();
    let policy = load_policy(&opts, &[])?;
    let attachments = desired_attachments(&opts, &policy)?;
    for a in &attachments {
        if if_index(&a.interface).is_none() {
            return Err(AgentError::UnknownInterface(a.interface.clone()));
        }
    }
    let compiled = policy.compile();
    // Built once: it sizes the datapath and is what `apply_built` writes.
    let v6 = crate::v6table::build(&compiled.regions_v6);
    let mut datapath = Datapath::load(&LoadOptions {
        table_capacity: opts.table_capacity,
        pin_dir: opts.pin_dir.clone(),
        v4_table: opts.v4_table,
        // Room for the policy at hand and a quarter more before a restart is needed; each
        // group costs 512 bytes of kernel memory (256 per slot).
        dir8_groups: opts
            .dir8_groups
            .max(crate::dir24::count_groups(&compiled.regions_v4) as u32 * 5 / 4)
            .min(datafence_common::MAX_DIR8_GROUPS),
        // The same margin for the IPv6 table: 48 bytes per entry (24 per slot).
        v6_entries: opts
            .v6_entries
            .max((v6.entries() * 5 / 4) as u32)
            .min(datafence_common::MAX_V6_ENTRIES),
        bench: false,
    })?;
    let adopted_generation = datapath
        .policy_in_slot(datapath.active_slot()?)?
        .header
        .generation;
    let report = datapath.apply_built(&compiled, &v6, opts.events)?;
    drop(v6);
    let mut compiled = compiled;
    compiled.release_prefixes();
    release_free_memory();
    for a in &attachments {
        let how = attach(&mut datapath, a)?;
        info!(interface = %a.interface, hook = %a.hook, adopted = (how == Attached::Adopted), "attached");
    }
    if adopted_generation != 0 {
        info!(
            previous_generation = adopted_generation,
            "adopted the enforcement an earlier agent left in place"
        );
    }
    if let Some(pins) = datapath.pins() {
        match pins.remove_other_abi_versions() {
            Ok(removed) if !removed.is_empty() => {
                info!(?removed, "unpinned the maps of an earlier datapath version");
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not unpin the maps of an earlier datapath version"),
        }
    }
    info!(
        policy = %opts.policy_path.display(),
        sha256 = %policy.sha256,
        generation = report.generation,
        regions_v4 = report.regions_v4,
        regions_v6 = report.regions_v6,
        "policy in force"
    );
    let mut ledger = CounterLedger::default();
    // Counters the kernel kept from an earlier agent carry on from where they were.
    let kernel = datapath.counters()?;
    ledger.sync(&kernel, |key| {
        metrics::verdict_labels(
            key,
            |i| if_name(i).unwrap_or_else(|| i.to_string()),
            |c| policy.class_name(c).map(str::to_owned),
            |r| policy.region_name(r).map(str::to_owned),
        )
    });
    let sources = Arc::new(Mutex::new(watched_sources(&policy)));
    Ok(Agent {
        opts,
        datapath,
        policy,
        compiled,
        generation: report.generation,
        loaded_at: SystemTime::now(),
        attachments,
        ledger,
        counters: Arc::default(),
        missing: std::collections::BTreeSet::new(),
        stop: Arc::default(),
        recent: std::collections::VecDeque::new(),
        sources,
    })
}

impl Agent {
    /// Re-reads the policy and switches to it with no gap; on any failure the old one
    /// stays in force.
    fn reload(&mut self, management: &[IpNetwork]) -> Result<(), AgentError> {
        let result = self.try_reload(management);
        let counter = if result.is_ok() {
            &self.counters.reload_success
        } else {
            &self.counters.reload_failure
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        result
    }

    fn try_reload(&mut self, management: &[IpNetwork]) -> Result<(), AgentError> {
        let policy = load_policy(&self.opts, management)?;
        if policy.sha256 == self.policy.sha256 {
            // Nothing changed (a touch, or a watch event for an unrelated file).
            return Ok(());
        }
        let compiled = policy.compile();
        // Credit what was counted so far to the names of the policy about to be replaced.
        self.sync_ledger()?;
        let report = self.datapath.apply(&compiled, self.opts.events)?;
        info!(sha256 = %policy.sha256, generation = report.generation, "policy reloaded");
        self.policy = policy;
        self.compiled = compiled;
        self.compiled.release_prefixes();
        release_free_memory();
        self.generation = report.generation;
        self.loaded_at = SystemTime::now();
        *self
            .sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = watched_sources(&self.policy);
        self.write_state();
        Ok(())
    }

    /// Verifies every attachment against the kernel and repairs what is missing: a
    /// program someone detached is attached again, an interface that came back gets its
    /// program, and new default-route interfaces are picked up. A missing interface is
    /// logged once.
    fn ensure_attached(&mut self) {
        let desired = match desired_attachments(&self.opts, &self.policy) {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "cannot work out which interfaces to attach to");
                return;
            }
        };
        for a in &desired {
            if if_index(&a.interface).is_none() {
                if self.missing.insert(a.interface.clone()) {
                    warn!(interface = %a.interface, hook = %a.hook, "interface is gone; its program will be attached again when it returns");
                }
                continue;
            }
            let returned = self.missing.remove(&a.interface);
            if !returned && self.datapath.is_attached(&a.interface, &a.hook) {
                continue;
            }
            match attach(&mut self.datapath, a) {
                Ok(_) if returned => {
                    info!(interface = %a.interface, hook = %a.hook, "interface is back; attached")
                }
                Ok(_) => {
                    self.counters
                        .reattached
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    warn!(interface = %a.interface, hook = %a.hook, "program was detached from outside datafence; attached it again");
                }
                Err(e) => {
                    error!(interface = %a.interface, hook = %a.hook, error = %e, "cannot attach")
                }
            }
        }
        self.attachments = desired;
    }

    /// Removes all enforcement: every pinned link (the programs detach) and every
    /// pinned map. Returns what was detached.
    fn detach_all(&mut self) -> Result<Vec<String>, AgentError> {
        let Some(pins) = self.datapath.pins().cloned() else {
            return Ok(Vec::new());
        };
        let removed = pins.remove_all().map_err(|source| {
            AgentError::Datapath(DatapathError::PinDir {
                path: pins.root.clone(),
                source,
            })
        })?;
        Ok(removed)
    }

    /// Brings the name-keyed counter totals up to date with the kernel's counters.
    fn sync_ledger(&mut self) -> Result<(), AgentError> {
        let kernel = self.datapath.counters()?;
        let policy = &self.policy;
        self.ledger.sync(&kernel, |key| {
            metrics::verdict_labels(
                key,
                |i| if_name(i).unwrap_or_else(|| i.to_string()),
                |c| policy.class_name(c).map(str::to_owned),
                |r| policy.region_name(r).map(str::to_owned),
            )
        });
        Ok(())
    }

    fn status(&mut self) -> Result<StatusReport, AgentError> {
        self.sync_ledger()?;
        let (rows, totals) =
            control::counter_table(self.ledger.totals().map(|(l, v)| (l.clone(), *v)));
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
            agent_running: true,
            recent_violations: self.recent.iter().cloned().collect(),
            map_memory_bytes: self.datapath.map_memory().into_iter().collect(),
        })
    }

    /// Records what is in force for `datafence status` to read when no agent runs.
    fn write_state(&self) {
        let state = AgentState {
            pin_dir: self.datapath.pins().map(|p| p.root.display().to_string()),
            policy: PolicyIdentity {
                path: self.policy.path.display().to_string(),
                version: self.policy.version,
                sha256: self.policy.sha256.clone(),
                loaded_at: rfc3339(self.loaded_at),
                generation: self.generation,
            },
            classes: self
                .policy
                .classes
                .iter()
                .map(|c| (c.id, c.name.clone()))
                .collect(),
            regions: self
                .policy
                .regions
                .iter()
                .map(|r| (u16::from(r.id), r.name.clone()))
                .collect(),
            attachments: self.attachments.clone(),
        };
        let path = self.opts.runtime_dir.join(STATE_FILE);
        let tmp = path.with_extension("json.tmp");
        let written = serde_json::to_vec_pretty(&state)
            .map_err(std::io::Error::other)
            .and_then(|bytes| std::fs::write(&tmp, bytes))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            warn!(path = %path.display(), error = %e, "cannot record the agent state");
        }
    }

    fn remember(&mut self, record: &ViolationRecord) {
        if let Ok(v) = serde_json::to_value(record) {
            if self.recent.len() == RECENT_VIOLATIONS {
                self.recent.pop_front();
            }
            self.recent.push_back(v);
        }
    }

    /// Ids of the cgroups the policy names change when a cgroup is removed and made
    /// again, as systemd does on every service restart. Without this, a restarted
    /// service's traffic would silently stop matching its class. Re-resolves the paths
    /// and switches to the recompiled policy (no gap) when an id changed.
    fn refresh_cgroups(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        let root = self.opts.cgroup_root.clone();
        let mut changed = Vec::new();
        let mut policy = self.policy.clone();
        for class in &mut policy.classes {
            for (path, id) in &mut class.cgroups {
                let dir = root.join(path.trim_start_matches('/'));
                if let Ok(meta) = std::fs::metadata(&dir)
                    && meta.ino() != *id
                {
                    *id = meta.ino();
                    changed.push(path.clone());
                }
            }
        }
        if changed.is_empty() {
            return;
        }
        let compiled = policy.compile();
        let _ = self.sync_ledger();
        match self.datapath.apply(&compiled, self.opts.events) {
            Ok(report) => {
                info!(
                    ?changed,
                    generation = report.generation,
                    "cgroups were recreated; their new ids are in force"
                );
                self.policy = policy;
                self.compiled = compiled;
                self.compiled.release_prefixes();
                self.generation = report.generation;
                self.write_state();
            }
            Err(e) => {
                error!(?changed, error = %e, "cgroups were recreated but the policy could not be updated")
            }
        }
    }

    /// What a scrape of /metrics or /healthz reports.
    fn snapshot(&mut self) -> Result<Snapshot, AgentError> {
        self.sync_ledger()?;
        let stats = self.datapath.stats()?;
        let counter_keys = self.datapath.counters()?.len() as u64;
        let mut maps = self.datapath.map_usage();
        maps.push((
            map_names::COUNTERS.to_owned(),
            counter_keys,
            u64::from(datafence_common::MAX_COUNTER_KEYS),
        ));
        let attachments = self
            .attachments
            .iter()
            .map(|a| {
                let up = self.datapath.is_attached(&a.interface, &a.hook);
                (a.interface.clone(), a.hook.clone(), up)
            })
            .collect();
        let (prefixes_v4, prefixes_v6) = self.policy.prefix_counts();
        Ok(Snapshot {
            verdicts: self.ledger.totals().map(|(l, v)| (l.clone(), *v)).collect(),
            events_lost: stats.events_lost,
            events_suppressed: stats.events_suppressed,
            policy_sha256: self.policy.sha256.clone(),
            policy_version: self.policy.version,
            prefixes_v4,
            prefixes_v6,
            last_reload_unix: self
                .loaded_at
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            maps,
            map_memory: self.datapath.map_memory(),
            attachments,
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
        let agent_stop = agent.stop.clone();
        match request {
            Request::Detach => match agent.detach_all() {
                Ok(detached) => {
                    info!(?detached, "detached on request; stopping");
                    agent_stop.notify_one();
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
        cgroups: &mut CgroupNames,
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
            protocol: report::protocol_name(ev.protocol),
            src: report::event_addr(ev.family, &ev.src_addr),
            dst: report::event_addr(ev.family, &ev.dst_addr),
            src_port: ev.src_port,
            dst_port: ev.dst_port,
            cgroup: cgroups.name(ev.cgroup_id),
            cgroup_id: ev.cgroup_id,
            packet_len: ev.packet_len,
            policy_sha256: self.policy.sha256.clone(),
            count: 1,
            bytes: u64::from(ev.packet_len),
            repeat: false,
        }
    }
}

/// Writes report lines to stdout (journald under systemd) and, when configured, to a
/// rotated file. Runs on its own thread so a slow disk never stalls the ring-buffer
/// reader; lines that do not fit its queue are counted and dropped.
struct ReportWriter {
    queue: std::sync::mpsc::SyncSender<String>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl ReportWriter {
    fn spawn(opts: &ReportOptions) -> anyhow::Result<Self> {
        let mut file = match &opts.file {
            Some(path) => Some(
                RotatingFile::open(path.clone(), opts.file_max_bytes, opts.file_keep)
                    .with_context(|| format!("opening violations file {}", path.display()))?,
            ),
            None => None,
        };
        let (queue, lines) = std::sync::mpsc::sync_channel::<String>(16_384);
        std::thread::Builder::new()
            .name("violation-writer".into())
            .spawn(move || {
                use std::io::Write as _;
                for line in lines {
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    drop(out);
                    if let Some(f) = file.as_mut()
                        && let Err(e) = f.write_line(&line)
                    {
                        warn!(error = %e, "writing the violations file");
                    }
                }
            })?;
        Ok(Self {
            queue,
            dropped: Arc::default(),
        })
    }

    fn write(&self, line: String) {
        if self.queue.try_send(line).is_err() {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// A line saying how many violations the kernel did not report, when there are new ones.
#[derive(Serialize)]
struct Unreported {
    time: String,
    host: String,
    event: &'static str,
    suppressed: u64,
    lost: u64,
    dropped_lines: u64,
}

async fn report_violations(
    shared: Shared,
    ring: RingBuf<MapData>,
    opts: ReportOptions,
) -> anyhow::Result<()> {
    // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, for as long
    // as the AsyncFd owns the ring buffer.
    let mut fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("watching the event ring buffer")?;
    let host = hostname();
    let (cgroup_root, counters) = {
        let agent = lock(&shared);
        (agent.opts.cgroup_root.clone(), agent.counters.clone())
    };
    let mut cgroups = CgroupNames::new(cgroup_root);
    let mut folder = Folder::new(opts.fold_interval);
    let writer = ReportWriter::spawn(&opts)?;
    let mut flush = tokio::time::interval(folder.interval().min(std::time::Duration::from_secs(1)));
    let mut last_flush = std::time::Instant::now();
    let (mut seen_suppressed, mut seen_lost, mut seen_dropped) = (0u64, 0u64, 0u64);
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
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
                let now = std::time::Instant::now();
                let mut agent = lock(&shared);
                for ev in &events {
                    let record = folder.observe(FlowKey::of(ev), now, || agent.record(ev, &host, &mut cgroups));
                    let labels = (agent.class_label(ev.class), agent.region_label(ev.region));
                    let verdict = Verdict::from_u8(ev.verdict).map_or("unknown", Verdict::as_str);
                    counters.count_violation(&labels.0, &labels.1, verdict);
                    if let Some(r) = record
                        && let Ok(line) = serde_json::to_string(&r)
                    {
                        agent.remember(&r);
                        counters.report_lines.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        writer.write(line);
                    }
                }
            }
            _ = flush.tick() => {
                let now = std::time::Instant::now();
                if now.duration_since(last_flush) < folder.interval() {
                    continue;
                }
                last_flush = now;
                let time = rfc3339(SystemTime::now());
                for r in folder.flush(now, &time) {
                    if let Ok(line) = serde_json::to_string(&r) {
                        counters.report_lines.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        writer.write(line);
                    }
                }
                let stats = {
                    let agent = lock(&shared);
                    agent.datapath.stats()
                };
                let dropped = writer.dropped.load(std::sync::atomic::Ordering::Relaxed);
                if let Ok(stats) = stats
                    && (stats.events_suppressed, stats.events_lost, dropped) != (seen_suppressed, seen_lost, seen_dropped)
                {
                    let line = Unreported {
                        time,
                        host: host.clone(),
                        event: "violations_unreported",
                        suppressed: stats.events_suppressed - seen_suppressed.min(stats.events_suppressed),
                        lost: stats.events_lost - seen_lost.min(stats.events_lost),
                        dropped_lines: dropped - seen_dropped,
                    };
                    (seen_suppressed, seen_lost, seen_dropped) = (stats.events_suppressed, stats.events_lost, dropped);
                    if let Ok(line) = serde_json::to_string(&line) {
                        writer.write(line);
                    }
                }
            }
        }
    }
}

async fn serve_metrics(shared: Shared, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use axum::{Router, http::StatusCode, http::header, routing::get};
    async fn scrape(shared: Shared) -> Result<Snapshot, String> {
        tokio::task::spawn_blocking(move || {
            let mut agent = lock(&shared);
            agent.snapshot().map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }
    let metrics_state = shared.clone();
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let shared = metrics_state.clone();
                async move {
                    let counters = lock(&shared).counters.clone();
                    match scrape(shared)
                        .await
                        .and_then(|s| metrics::render(&s, &counters).map_err(|e| e.to_string()))
                    {
                        Ok(text) => (
                            StatusCode::OK,
                            [(
                                header::CONTENT_TYPE,
                                "text/plain; version=0.0.4; charset=utf-8",
                            )],
                            text,
                        ),
                        Err(e) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                            e,
                        ),
                    }
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let shared = shared.clone();
                async move {
                    match scrape(shared).await {
                        Ok(s) => {
                            let (healthy, text) = metrics::health(&s);
                            let code = if healthy {
                                StatusCode::OK
                            } else {
                                StatusCode::SERVICE_UNAVAILABLE
                            };
                            (code, text)
                        }
                        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e),
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    info!(%addr, "serving /metrics and /healthz");
    axum::serve(listener, app).await?;
    Ok(())
}

async fn monitor_attachments(shared: Shared, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let state = shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let mut agent = lock(&state);
            agent.ensure_attached();
            agent.refresh_cgroups();
        })
        .await;
    }
}

/// The files whose changes trigger a reload: the ones the policy was read from, made
/// absolute the way the watcher reports paths.
fn watched_sources(policy: &LoadedPolicy) -> Vec<PathBuf> {
    policy
        .sources
        .iter()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
        .collect()
}

/// How long the policy files must be quiet before a change is reloaded: editors and
/// `git checkout` write files in several steps, and a half-written file must not even be
/// tried.
const WATCH_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(500);

/// Watches the policy file's directory tree (region files live beside the policy) and
/// asks for a reload once changes to the files the policy is read from settle. Other
/// files in the tree (logs, editor swap files) are ignored, or a busy log would reload
/// the policy over and over.
fn watch_policy(
    policy_path: &Path,
    sources: Arc<Mutex<Vec<PathBuf>>>,
    reload: tokio::sync::mpsc::Sender<&'static str>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let dir = policy_path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(e) = event else { return };
        if e.kind.is_access() {
            return;
        }
        let watched = sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Editors and `git checkout` often replace a file by renaming a new one over it,
        // so compare file names within the watched tree, not inode identity.
        let relevant = e.paths.iter().any(|p| {
            watched
                .iter()
                .any(|w| w == p || (w.file_name() == p.file_name() && w.parent() == p.parent()))
        });
        if relevant {
            let _ = tx.send(());
        }
    })?;
    watcher
        .watch(&dir, notify::RecursiveMode::Recursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    std::thread::Builder::new()
        .name("policy-watch".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                // Debounce: wait until no event has arrived for a while.
                while rx.recv_timeout(WATCH_DEBOUNCE).is_ok() {}
                if reload.blocking_send("policy file changed").is_err() {
                    break;
                }
            }
        })?;
    info!(dir = %dir.display(), "watching the policy for changes");
    Ok(watcher)
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(opts: RunOptions) -> anyhow::Result<()> {
    let runtime_dir = opts.runtime_dir.clone();
    let reports = opts.reports.clone();
    let monitor_interval = opts.monitor_interval;
    let watch = opts.watch;
    let policy_path = opts.policy_path.clone();
    let metrics_addr = opts.metrics_addr;
    if let Some(addr) = metrics_addr {
        // Bind early so a taken port fails the start, before anything is attached.
        std::net::TcpListener::bind(addr)
            .with_context(|| format!("the metrics address {addr} is not available"))?;
    }
    let mut agent = tokio::task::spawn_blocking(move || start(opts)).await??;
    let ring = agent.datapath.take_events()?;
    let listener = bind_control(&runtime_dir)?;
    agent.write_state();
    let shared: Shared = Arc::new(Mutex::new(agent));

    let reporter = tokio::spawn(report_violations(shared.clone(), ring, reports));
    let metrics = metrics_addr.map(|addr| {
        let state = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_metrics(state, addr).await {
                error!(error = %e, "metrics server stopped");
            }
        })
    });
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

    let monitor = tokio::spawn(monitor_attachments(shared.clone(), monitor_interval));
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<&'static str>(4);
    let _watcher = if watch {
        let sources = lock(&shared).sources.clone();
        Some(watch_policy(&policy_path, sources, reload_tx.clone())?)
    } else {
        None
    };
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = lock(&shared).stop.clone();
    info!(control = %runtime_dir.join(dirs::CONTROL_SOCKET).display(), "running");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let watchdog = sd_notify::watchdog_enabled().map(|period| {
        tokio::spawn(async move {
            // Ping twice per period, as systemd recommends.
            let mut tick = tokio::time::interval(period / 2);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        })
    });
    let pinned = lock(&shared).datapath.pins().map(|p| p.root.clone());
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
                error!(cause, error = %e, "reload refused; the previous policy stays in force")
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
