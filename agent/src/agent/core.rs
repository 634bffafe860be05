//! The running agent's state, and everything it does under its one lock: reloads,
//! attachment repair, following recreated cgroups, status and metrics snapshots.
#![forbid(unsafe_code)]

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use datafence_common::{CounterKey, CounterValue, Hook, map_names, stat};
use ipnetwork::IpNetwork;
use tracing::{error, info, warn};

use super::{
    AgentError, RunOptions, rfc3339,
    start::{
        Desired, attach, desired_attachments, load_policy, record_host_addresses,
        refuse_cutting_ssh_sessions, warn_unjudgeable,
    },
    watch::watched_sources,
};
use crate::{
    control::{
        self as control, AgentState, Attachment, PolicyIdentity, STATE_FILE, SocketRingStatus,
        StatusReport,
    },
    datapath::{Datapath, DatapathError, if_index},
    generations::{GenerationNames, Generations},
    kernel::KernelFeatures,
    metrics::{self, AgentCounters, CounterLedger, HookState, Snapshot},
    policy::{CompiledPolicy, LoadedPolicy},
    sys::release_free_memory,
};

/// Everything the running agent knows, behind one lock.
pub(super) struct Agent {
    pub(super) opts: RunOptions,
    pub(super) datapath: Datapath,
    pub(super) policy: LoadedPolicy,
    pub(super) compiled: CompiledPolicy,
    pub(super) generation: u32,
    pub(super) loaded_at: SystemTime,
    pub(super) attachments: Vec<Attachment>,
    pub(super) ledger: CounterLedger,
    pub(super) counters: Arc<AgentCounters>,
    /// Interfaces found missing, so their absence is logged once, not every check.
    pub(super) missing: std::collections::BTreeSet<String>,
    /// Interfaces left unattached for their link type, so each is logged once.
    pub(super) unjudgeable: std::collections::BTreeSet<String>,
    /// Connected subnets of attached interfaces that a class would deny, as last logged.
    pub(super) local_networks: crate::local_networks::LocalNetworks,
    /// Told when a `detach` request means the agent should exit.
    pub(super) stop: Arc<tokio::sync::Notify>,
    /// The latest violation lines, for `datafence status`.
    pub(super) recent: std::collections::VecDeque<serde_json::Value>,
    /// The files the policy in force was read from, for the file watcher.
    pub(super) sources: Arc<Mutex<Vec<PathBuf>>>,
    /// What the kernel offers, probed at start.
    pub(super) kernel: KernelFeatures,
    /// Names of the latest policy generations, for labelling violations. Shared with the
    /// violation reporter, which labels a batch of events from its own copy rather than
    /// holding the agent's lock while it does (a reload copies on write).
    pub(super) generations: Arc<Generations>,
    /// Whether the socket ring is attached, and if not, why.
    pub(super) socket_ring: crate::control::SocketRingStatus,
}

/// Violation lines `datafence status` shows.
pub(super) const RECENT_VIOLATIONS: usize = 10;

impl Agent {
    /// Re-reads the policy and switches to it with no gap; on any failure the old one
    /// stays in force.
    pub(super) fn reload(&mut self, management: &[IpNetwork]) -> Result<(), AgentError> {
        let result = self.try_reload(management);
        if let Err(AgentError::Policy { errors, .. }) = &result {
            self.watch_refused_files(errors);
        }
        let counter = if result.is_ok() {
            &self.counters.reload_success
        } else {
            &self.counters.reload_failure
        };
        counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        result
    }

    /// Adds the files a refused policy's errors name to the watched ones, until the next
    /// policy loads: a region file only the refused policy reads (a new one with a
    /// mistake in it) is where the fix will land, and the last good policy does not read
    /// it. A region file that cannot be read at all is named by the policy line that
    /// lists it, so its arrival is not seen; `datafence reload` picks it up.
    fn watch_refused_files(&self, errors: &crate::policy::PolicyErrors) {
        let mut sources = self
            .sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for e in &errors.0 {
            let file = std::path::absolute(&e.file).unwrap_or_else(|_| e.file.clone());
            if !sources.contains(&file) {
                sources.push(file);
            }
        }
    }

    pub(super) fn try_reload(&mut self, management: &[IpNetwork]) -> Result<(), AgentError> {
        let started = std::time::Instant::now();
        let policy = load_policy(&self.opts, management)?;
        if policy.sha256 == self.policy.sha256 {
            // Nothing changed (a touch, or a watch event for an unrelated file).
            return Ok(());
        }
        let compiled = policy.compile();
        refuse_cutting_ssh_sessions(&self.opts, &policy, &compiled)?;
        // Credit what was counted so far to the names of the policy about to be replaced.
        self.sync_ledger()?;
        let report = self.datapath.apply(&compiled, self.opts.events)?;
        let ms = started.elapsed().as_secs_f64() * 1e3;
        info!(sha256 = %policy.sha256, generation = report.generation, ms = format!("{ms:.1}"), "policy reloaded");
        self.policy = policy;
        self.compiled = compiled;
        self.compiled.release_prefixes();
        release_free_memory();
        self.generation = report.generation;
        Arc::make_mut(&mut self.generations)
            .push(GenerationNames::of(report.generation, &self.policy));
        self.loaded_at = SystemTime::now();
        *self
            .sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = watched_sources(&self.policy);
        self.write_state();
        self.check_local_networks();
        Ok(())
    }

    /// Verifies every attachment against the kernel and repairs what is missing: a
    /// program someone detached is attached again, an interface that came back gets its
    /// program, and, unless a list names the interfaces, new interfaces are attached. A
    /// missing interface is logged once.
    pub(super) fn ensure_attached(&mut self) {
        record_host_addresses(&mut self.datapath);
        let Desired {
            attachments: desired,
            unjudgeable,
        } = match desired_attachments(&self.opts, &self.policy) {
            Ok(d) => d,
            Err(e) => {
                warn!(error = %e, "cannot work out which interfaces to attach to");
                return;
            }
        };
        let now: std::collections::BTreeSet<String> =
            unjudgeable.iter().map(|l| l.name.clone()).collect();
        for link in unjudgeable
            .iter()
            .filter(|l| !self.unjudgeable.contains(&l.name))
        {
            warn_unjudgeable(link);
        }
        self.unjudgeable = now;
        self.detach_undesired(&desired);
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
            let known = self
                .attachments
                .iter()
                .any(|b| b.interface == a.interface && b.hook == a.hook);
            match attach(&mut self.datapath, a) {
                Ok(_) if returned => {
                    info!(interface = %a.interface, hook = %a.hook, "interface is back; attached");
                }
                Ok(_) if !known => {
                    info!(interface = %a.interface, hook = %a.hook, "new interface; attached");
                }
                Ok(_) => {
                    self.counters
                        .reattached
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    warn!(interface = %a.interface, hook = %a.hook, "program was detached from outside datafence; attached it again");
                }
                Err(e) => {
                    error!(interface = %a.interface, hook = %a.hook, error = %e, "cannot attach");
                }
            }
        }
        self.attachments = desired;
        self.ensure_socket_ring();
        if let Some(pins) = self.datapath.pins() {
            let removed = pins.remove_defunct_links();
            if !removed.is_empty() {
                info!(?removed, "unpinned the links of interfaces that are gone");
            }
        }
        self.check_local_networks();
    }

    /// Takes datafence's programs off the hooks it no longer should hold: an interface
    /// the policy stopped naming, or now excludes. Left on, they would go on enforcing
    /// where the operator removed enforcement, unlisted in `status`, and an upgrade would
    /// later empty the stage arrays they jump through. Pinned links and clsact filters
    /// only: without pins (`--no-pin`) a link lives as long as this process.
    ///
    /// A hook is kept if a second look at the interfaces desires it too: without a
    /// list, `desired` comes from a dump of every interface, and a dump that missed one
    /// (a device deleted mid-dump, a rename in between) must not take enforcement off a
    /// live interface.
    fn detach_undesired(&self, desired: &[Attachment]) {
        let again = desired_attachments(&self.opts, &self.policy)
            .map(|d| d.attachments)
            .unwrap_or_default();
        let keep = |hook: &str, interface: &str| {
            desired
                .iter()
                .chain(&again)
                .any(|a| a.hook == hook && a.interface == interface)
        };
        let mut removed = self
            .datapath
            .pins()
            .map(|pins| pins.remove_links_unless(keep))
            .unwrap_or_default();
        // A sweep of every interface's filters: only where this agent makes them.
        let filters = if self.datapath.tc_kind() == crate::datapath::TcKind::Clsact {
            crate::clsact::datafence_filters()
        } else {
            Ok(Vec::new())
        };
        match filters {
            Ok(filters) => {
                for f in filters
                    .iter()
                    .filter(|f| f.is_datafence() && !keep(Hook::TcEgress.as_str(), &f.interface))
                {
                    match crate::clsact::remove(f) {
                        Ok(()) => removed.push(crate::clsact::attachment_name(&f.interface)),
                        Err(e) => {
                            warn!(interface = %f.interface, error = %e, "cannot remove datafence's clsact filter from an interface the policy no longer names");
                        }
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot list clsact filters"),
        }
        if !removed.is_empty() {
            info!(
                ?removed,
                "detached from interfaces the policy no longer names"
            );
        }
    }

    /// Attaches the socket ring again if someone detached it. A degraded ring stays so
    /// until the agent restarts: what kept it from attaching (no cgroup2 hierarchy, a
    /// verifier that refuses the programs) is not retried every check.
    fn ensure_socket_ring(&mut self) {
        let Some(cgroup) = self.opts.socket_ring.clone() else {
            return;
        };
        if self.socket_ring.state != SocketRingStatus::ATTACHED
            || self.datapath.socket_ring_attached(&cgroup)
        {
            return;
        }
        let now = super::start::attach_socket_ring(&mut self.datapath, Some(&cgroup), &self.kernel);
        if now.state == SocketRingStatus::ATTACHED {
            self.counters
                .reattached
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            warn!(cgroup = %cgroup.display(), "the socket ring was detached from outside datafence; attached it again");
        }
        self.socket_ring = now;
    }

    /// Logs each connected subnet of an attached interface that a class would deny:
    /// on a bridge or veth toward local containers that is a false drop waiting to
    /// happen. Logged once per subnet, and again after a policy change.
    pub(super) fn check_local_networks(&mut self) {
        let interfaces: Vec<String> = self
            .attachments
            .iter()
            .filter(|a| a.hook == Hook::TcEgress.as_str())
            .map(|a| a.interface.clone())
            .collect();
        let subnets = match crate::local_networks::connected_subnets_of(&interfaces) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot list the connected subnets of the attached interfaces");
                return;
            }
        };
        for d in self.local_networks.update(&self.policy, subnets) {
            warn!(
                interface = %d.interface,
                subnet = %d.subnet,
                region = d.region.as_deref().unwrap_or("(none)"),
                classes = ?d.classes,
                "a connected subnet of an attached interface is one these classes may not reach: their traffic to it is dropped (reported, in audit mode); if it is local, exempt the subnet or exclude the interface"
            );
        }
    }

    /// Removes all enforcement: every pinned link (the programs detach) and every
    /// pinned map. Returns what was detached.
    pub(super) fn detach_all(&mut self) -> Result<Vec<String>, AgentError> {
        let Some(pins) = self.datapath.pins().cloned() else {
            return Ok(Vec::new());
        };
        // clsact filters first: they hold programs that read the pinned maps.
        let mut removed = crate::clsact::remove_all().map_err(|source| {
            AgentError::Datapath(DatapathError::PinDir {
                path: pins.root.clone(),
                source,
            })
        })?;
        removed.extend(pins.remove_all().map_err(|source| {
            AgentError::Datapath(DatapathError::PinDir {
                path: pins.root.clone(),
                source,
            })
        })?);
        removed.sort();
        removed.dedup();
        Ok(removed)
    }

    /// The attachments with how each is made.
    pub(super) fn attachments_with_kind(&self) -> Vec<Attachment> {
        self.attachments
            .iter()
            .map(|a| Attachment {
                kind: if a.hook == Hook::Xdp.as_str() {
                    "xdp".to_owned()
                } else {
                    self.datapath.tc_kind().as_str().to_owned()
                },
                programs_ahead: self.datapath.programs_ahead(&a.interface, &a.hook),
                ..a.clone()
            })
            .collect()
    }

    /// Frees the policy slot the last reload left, once no packet can still read it, so
    /// that between reloads the kernel holds one policy's tables.
    pub(super) fn release_retired_slot(&mut self) {
        match self.datapath.release_retired_slot() {
            Ok(true) => tracing::debug!("freed the slot the last reload left"),
            Ok(false) => {}
            Err(e) => {
                warn!(error = %e, "cannot free the slot the last reload left; the next reload clears it");
            }
        }
    }

    /// Brings the name-keyed counter totals up to date with the kernel's counters.
    /// Returns how many counter keys the kernel holds.
    pub(super) fn sync_ledger(&mut self) -> Result<usize, AgentError> {
        let kernel = self.datapath.counters()?;
        credit(&mut self.ledger, &kernel, &self.policy);
        Ok(kernel.len())
    }

    /// The policy in force, as status and the state file name it.
    fn identity(&self) -> PolicyIdentity {
        PolicyIdentity {
            path: self.policy.path.display().to_string(),
            version: self.policy.version,
            sha256: self.policy.sha256.clone(),
            loaded_at: rfc3339(self.loaded_at),
            generation: self.generation,
        }
    }

    pub(super) fn status(&mut self) -> Result<StatusReport, AgentError> {
        self.sync_ledger()?;
        let (rows, totals) =
            control::counter_table(self.ledger.totals().map(|(l, v)| (l.clone(), *v)));
        let stats = self.datapath.stats()?;
        Ok(StatusReport {
            attachments: self.attachments_with_kind(),
            policy: self.identity(),
            counters: rows,
            totals,
            events_lost: stats.get(stat::EVENTS_LOST),
            events_suppressed: stats.get(stat::EVENTS_SUPPRESSED),
            agent_running: true,
            pin_dir: self.datapath.pins().map(|p| p.root.display().to_string()),
            notes: Vec::new(),
            recent_violations: self.recent.iter().cloned().collect(),
            map_memory_bytes: self.datapath.map_memory().into_iter().collect(),
            kernel: self.kernel.clone(),
            socket_ring: self.socket_ring.clone(),
        })
    }

    /// Records what is in force for `datafence status` to read when no agent runs.
    pub(super) fn write_state(&self) {
        let state = AgentState {
            pin_dir: self.datapath.pins().map(|p| p.root.display().to_string()),
            policy: self.identity(),
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
            attachments: self.attachments_with_kind(),
            generations: self.generations.list().cloned().collect(),
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

    /// Keeps the latest violation lines for `status`, already turned into JSON values by
    /// the reporter (outside the lock).
    pub(super) fn remember(&mut self, lines: impl IntoIterator<Item = serde_json::Value>) {
        for line in lines {
            if self.recent.len() == RECENT_VIOLATIONS {
                self.recent.pop_front();
            }
            self.recent.push_back(line);
        }
    }

    /// Ids of the cgroups the policy names change when a cgroup is removed and made
    /// again, as systemd does on every service restart, and a cgroup that did not exist
    /// gets one when it appears. Without this, a restarted service's traffic would
    /// silently stop matching its class. Re-resolves the paths and, when an id changed,
    /// updates the active slot's cgroup entries in place (the policy itself is the same),
    /// or, should that fail, switches to the recompiled policy.
    pub(super) fn refresh_cgroups(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        let root = self.opts.cgroup_root.clone();
        let mut changed = Vec::new();
        let mut policy = self.policy.clone();
        for class in &mut policy.classes {
            for (path, id) in &mut class.selectors.cgroups {
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
        let cgroups = policy.cgroup_classes();
        match self
            .datapath
            .update_cgroups(&self.compiled.cgroups, &cgroups)
        {
            Ok(()) => {
                info!(
                    ?changed,
                    "cgroups were made anew; their new ids are in force"
                );
                self.policy = policy;
                self.compiled.cgroups = cgroups;
                self.write_state();
                return;
            }
            Err(e) => {
                warn!(?changed, error = %e, "cannot update cgroup ids in place; switching to the recompiled policy");
            }
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
                Arc::make_mut(&mut self.generations)
                    .push(GenerationNames::of(report.generation, &self.policy));
                self.write_state();
            }
            Err(e) => {
                error!(?changed, error = %e, "cgroups were recreated but the policy could not be updated");
            }
        }
    }

    /// What a scrape of /metrics or /healthz reports.
    pub(super) fn snapshot(&mut self) -> Result<Snapshot, AgentError> {
        let counter_keys = self.sync_ledger()? as u64;
        let stats = self.datapath.stats()?;
        let mut maps = self.datapath.map_usage();
        maps.push((
            map_names::COUNTERS.to_owned(),
            counter_keys,
            u64::from(datafence_common::MAX_COUNTER_KEYS),
        ));
        let attachments = self
            .attachments
            .iter()
            .map(|a| HookState {
                interface: a.interface.clone(),
                hook: a.hook.clone(),
                attached: self.datapath.is_attached(&a.interface, &a.hook),
                programs_ahead: self.datapath.programs_ahead(&a.interface, &a.hook),
            })
            .collect();
        let (prefixes_v4, prefixes_v6) = self.policy.prefix_counts();
        Ok(Snapshot {
            verdicts: self.ledger.totals().map(|(l, v)| (l.clone(), *v)).collect(),
            kernel_stats: stats,
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
            kernel: self.kernel.clone(),
            agent: self.counters.read(),
            socket_ring: self.socket_ring.clone(),
        })
    }
}

/// Credits the kernel's counters to the names `policy` gives their interface, class and
/// region ids.
pub(super) fn credit(
    ledger: &mut CounterLedger,
    kernel: &[(CounterKey, CounterValue)],
    policy: &LoadedPolicy,
) {
    ledger.sync(kernel, |key| {
        metrics::verdict_labels(
            key,
            metrics::interface_label,
            |c| policy.class_name(c).map(str::to_owned),
            |r| policy.region_name(r).map(str::to_owned),
        )
    });
}
