//! Starting the agent: validate the policy and the interfaces, probe the kernel, then
//! load, adopt what an earlier agent pinned, and attach. Nothing touches the kernel
//! until everything that can be checked has been.
#![forbid(unsafe_code)]

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use datafence_common::Hook;
use ipnetwork::IpNetwork;
use tracing::{info, warn};

use super::{AgentError, RunOptions, core::Agent, watch::watched_sources};
use crate::{
    control::{self as control, Attachment, SocketRingStatus},
    datapath::{
        Attached, Datapath, DatapathError, Framing, LoadOptions, Misfit, PinLayout, RegionTables,
        TcKind, if_index,
    },
    generations::{GenerationNames, Generations},
    kernel::KernelFeatures,
    links::Link,
    lockout,
    metrics::CounterLedger,
    policy::{self, CompiledPolicy, LoadedPolicy},
    sys::{release_free_memory, tune_allocator},
};

pub(super) fn load_policy(
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
                at_risk: lockout::AtRisk::ManagementNetwork(*address),
            });
        }
    }
    for note in policy.cgroup_notes() {
        warn!("{note}");
    }
    Ok(policy)
}

/// Refuses a policy that would cut an SSH session established right now (deny its
/// replies), judged on the compiled policy about to be applied. With --allow-lockout-risk
/// the policy is accepted and the session named in a warning. A host whose socket
/// tables cannot be read is checked against the management networks only: refusing
/// every policy there would leave it with none.
pub(super) fn refuse_cutting_ssh_sessions(
    opts: &RunOptions,
    policy: &LoadedPolicy,
    compiled: &CompiledPolicy,
) -> Result<(), AgentError> {
    let procfs = lockout::Procfs::new("/proc");
    let sessions = match lockout::sessions::established(&opts.ssh_ports, &procfs) {
        Ok(sessions) => sessions,
        Err(e) => {
            warn!(error = %e, "cannot list the SSH sessions; the policy is checked against the management networks only");
            return Ok(());
        }
    };
    let Some(cut) = lockout::first_cut_session(policy, compiled, &opts.cgroup_root, sessions)
    else {
        return Ok(());
    };
    if opts.allow_lockout_risk {
        warn!(policy = %opts.policy_path.display(), session = %cut, "accepted with --allow-lockout-risk: this policy cuts an SSH session");
        return Ok(());
    }
    Err(AgentError::LockoutRisk {
        path: opts.policy_path.display().to_string(),
        at_risk: lockout::AtRisk::SshSession(Box::new(cut)),
    })
}

fn read_policy(opts: &RunOptions) -> Result<LoadedPolicy, AgentError> {
    stall_for_tests();
    policy::load_policy(
        &opts.policy_path,
        &policy::LoadOptions {
            cgroup_root: opts.cgroup_root.clone(),
            table_capacity: opts.table_capacity,
            max_policy_bytes: opts.max_policy_bytes,
            max_region_file_bytes: opts.max_region_file_bytes,
            max_yaml_nodes: opts.max_yaml_nodes,
        },
    )
    .map_err(|errors| AgentError::Policy {
        path: opts.policy_path.display().to_string(),
        errors,
    })
}

/// What the agent should be attached to now, and the interfaces it leaves unjudged
/// because their frames are neither Ethernet nor IP (found only when every interface is
/// attached; a named interface of such a type is an error at attach).
pub(super) struct Desired {
    pub(super) attachments: Vec<Attachment>,
    pub(super) unjudgeable: Vec<crate::links::Link>,
}

/// The interfaces and hooks the agent should be attached to now.
pub(super) fn desired_attachments(
    opts: &RunOptions,
    policy: &LoadedPolicy,
) -> Result<Desired, AgentError> {
    let (egress, unjudgeable) = if !opts.interfaces.is_empty() {
        (opts.interfaces.clone(), Vec::new())
    } else if let Some(list) = &policy.egress_interfaces {
        // `egress: []` in a policy means a gateway-only host: XDP and no TC egress hook.
        if list.is_empty() && policy.gateway_interfaces.is_empty() {
            return Err(AgentError::NoInterfaces);
        }
        (list.clone(), Vec::new())
    } else {
        crate::links::every_interface(policy).map_err(AgentError::ListInterfaces)?
    };
    let tc = egress.into_iter().map(|interface| Attachment {
        interface,
        hook: Hook::TcEgress.as_str().to_owned(),
        kind: String::new(),
        programs_ahead: Vec::new(),
    });
    let xdp = policy
        .gateway_interfaces
        .iter()
        .map(|interface| Attachment {
            interface: interface.clone(),
            hook: Hook::Xdp.as_str().to_owned(),
            kind: String::new(),
            programs_ahead: Vec::new(),
        });
    Ok(Desired {
        attachments: tc.chain(xdp).collect(),
        unjudgeable,
    })
}

/// Logs an interface left unjudged, once per interface for as long as it stays.
pub(super) fn warn_unjudgeable(link: &Link) {
    warn!(
        interface = %link.name,
        link_type = link.link_type,
        "not attached: frames of this link type have neither an Ethernet header nor the IP header first, so datafence cannot judge them; traffic through this interface is not judged"
    );
}

/// Brings the datapath's copy of the host's own addresses up to date, for the XDP judge.
/// A failure leaves the last copy: an address added since is judged as forwarded traffic
/// until the next try, and one removed passes XDP until then (what the host sends on is
/// judged at TC egress where it leaves).
pub(super) fn record_host_addresses(datapath: &mut Datapath) {
    let addresses = match crate::links::host_addresses() {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "cannot list the host's addresses; gateway interfaces go on with the last list");
            return;
        }
    };
    match datapath.set_host_addresses(&addresses) {
        Ok(changes) => {
            if changes.left_out > 0 {
                warn!(
                    left_out = changes.left_out,
                    max = datafence_common::MAX_HOST_ADDRESSES,
                    "the host has more addresses than the datapath holds; packets to the rest are judged at gateway interfaces as forwarded traffic"
                );
            }
            if changes.added + changes.removed > 0 {
                info!(
                    added = changes.added,
                    removed = changes.removed,
                    "the host's own addresses, which gateway interfaces let through, changed"
                );
            }
        }
        Err(e) => {
            warn!(error = %e, "cannot record the host's addresses; gateway interfaces go on with the last list");
        }
    }
}

pub(super) fn attach(datapath: &mut Datapath, a: &Attachment) -> Result<Attached, DatapathError> {
    if a.hook == Hook::Xdp.as_str() {
        datapath.attach_xdp(&a.interface)
    } else {
        datapath.attach_tc(&a.interface)
    }
}

/// Debug builds only: holds a policy read (and so a reload, with the agent's state
/// locked) while the file `DATAFENCE_TEST_STALL_READ_WHILE` exists, for a minute at
/// most. The watchdog test stalls every loop this way; a FIFO named as a region file did
/// it once, and is now refused at once.
fn stall_for_tests() {
    #[cfg(debug_assertions)]
    if let Some(flag) = std::env::var_os("DATAFENCE_TEST_STALL_READ_WHILE") {
        let until = std::time::Instant::now() + std::time::Duration::from_mins(1);
        while std::path::Path::new(&flag).exists() && std::time::Instant::now() < until {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Validates everything, then loads and attaches. Nothing touches the kernel until the
/// policy and the interfaces have been checked. With pinning, whatever an earlier agent
/// left in force is adopted: its maps are reused (the old policy keeps being enforced),
/// the new policy goes into the other slot, and pinned links are switched to the new
/// programs atomically, so a restart or upgrade has no gap.
pub(super) fn start(opts: RunOptions) -> Result<Agent, AgentError> {
    tune_allocator();
    let policy = load_policy(&opts, &[])?;
    let compiled = policy.compile();
    refuse_cutting_ssh_sessions(&opts, &policy, &compiled)?;
    let Desired {
        attachments,
        unjudgeable,
    } = desired_attachments(&opts, &policy)?;
    for link in &unjudgeable {
        warn_unjudgeable(link);
    }
    if !policy.gateway_interfaces.is_empty()
        && !attachments
            .iter()
            .any(|a| a.hook == Hook::TcEgress.as_str())
    {
        warn!(
            "gateway interfaces without TC egress: what this host takes in at a gateway interface and then sends on itself (DNAT and port forwarding, IPVS, VPN endpoints) is judged nowhere; leave `interfaces.egress` out to judge it where it leaves"
        );
    }
    warn_units_with_packet_sockets(&policy, &opts.cgroup_root);
    for a in &attachments {
        if if_index(&a.interface).is_none() {
            return Err(AgentError::UnknownInterface(a.interface.clone()));
        }
        // A named interface whose frames datafence cannot parse is refused before
        // anything is loaded, not at attach.
        Framing::of_interface(&a.interface)?;
    }
    // Before anything is loaded: a kernel too old for the programs gets one plain
    // message instead of a verifier log.
    let features = KernelFeatures::probe();
    features.require()?;
    let tc_kind =
        TcKind::choose(&opts.tc_attach, features.has("tcx")).map_err(AgentError::TcAttach)?;
    info!(
        kernel = %features.release,
        tc_attach = tc_kind.as_str(),
        features = ?features.features.iter().filter(|f| f.available).map(|f| f.name.as_str()).collect::<Vec<_>>(),
        "kernel features"
    );
    // Built once: they size the datapath and are what `apply_built` writes.
    let tables = RegionTables::of(&compiled);
    // Pinned tables keep their size: a policy that outgrew them, or that they hold with
    // room to waste, gets new ones sized to it; the old datapath enforces until every
    // link has moved to the new one.
    let misfit = opts
        .pin_dir
        .as_deref()
        .and_then(|dir| crate::datapath::pinned_tables_misfit(dir, &tables));
    match misfit {
        Some(Misfit::Outgrown {
            family,
            needed,
            room,
        }) => info!(
            family,
            needed,
            room,
            "the policy outgrew the pinned region tables: making them anew, with no gap in enforcement"
        ),
        Some(Misfit::Oversized {
            family,
            pinned_bytes,
            wanted_bytes,
        }) => info!(
            family,
            pinned_bytes,
            wanted_bytes,
            "the pinned region tables are far larger than the policy needs: making them anew, with no gap in enforcement"
        ),
        None => {}
    }
    let mut datapath = Datapath::load(&LoadOptions {
        pin_dir: opts.pin_dir.clone(),
        retire_pinned: misfit.is_some(),
        ..LoadOptions::sized_for(&tables)
    })?;
    datapath.set_tc_kind(tc_kind);
    if let Some(pins) = datapath.pins() {
        // An earlier agent of these pins that died answering an explain left its copy.
        pins.remove_explain_test_runs();
    }
    // Datapaths moved aside for being outgrown (see `retire_pinned`): their generations
    // and counters carry on in the new maps and in the metrics.
    let retired = datapath.pins().map(PinLayout::retired).unwrap_or_default();
    let retired_generation = retired
        .iter()
        .filter_map(|r| r.read().ok())
        .map(|state| state.generation)
        .max();
    if let Some(last) = retired_generation {
        datapath.continue_generations_after(last)?;
    }
    let adopted_generation = datapath
        .policy_in_slot(datapath.active_slot()?)?
        .header
        .generation;
    let report = datapath.apply_built(&compiled, &tables, opts.events)?;
    drop(tables);
    let mut compiled = compiled;
    compiled.release_prefixes();
    release_free_memory();
    record_host_addresses(&mut datapath);
    for a in &attachments {
        let how = attach(&mut datapath, a)?;
        info!(interface = %a.interface, hook = %a.hook, adopted = (how == Attached::Adopted), "attached");
    }
    let socket_ring = attach_socket_ring(&mut datapath, opts.socket_ring.as_deref(), &features);
    if adopted_generation != 0 {
        info!(
            previous_generation = adopted_generation,
            "adopted the enforcement an earlier agent left in place"
        );
    }
    // Once every link has moved, all the retired programs counted carries on in this
    // datapath's own counters, and so outlasts this agent too.
    for state in retired.iter().filter_map(|r| r.read().ok()) {
        if let Err(e) = datapath.carry_counters(&state.counters) {
            warn!(error = %e, "could not carry the outgrown datapath's counters over: they start again from zero");
        }
    }
    if let Some(pins) = datapath.pins() {
        unpin_earlier_builds(pins);
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
    super::core::credit(&mut ledger, &kernel, &policy);
    let sources = Arc::new(Mutex::new(watched_sources(&policy)));
    let mut generations = Generations::default();
    if let Some(pins) = datapath.pins() {
        // Events of the generation this agent adopted may still be in the pinned ring
        // buffer: name them from the state of the agent that wrote it.
        for g in earlier_generations(&pins.root, &opts.runtime_dir, adopted_generation) {
            generations.push(g);
        }
    }
    generations.push(GenerationNames::of(report.generation, &policy));
    let mut agent = Agent {
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
        unjudgeable: unjudgeable.into_iter().map(|l| l.name).collect(),
        local_networks: crate::local_networks::LocalNetworks::default(),
        stop: Arc::default(),
        recent: std::collections::VecDeque::new(),
        sources,
        kernel: features,
        generations: Arc::new(generations),
        socket_ring,
    };
    agent.check_local_networks();
    Ok(agent)
}

/// Attaches the socket ring at `cgroup`. A kernel or host where it cannot be attached
/// (no cgroup v2 hierarchy, programs the verifier refuses) leaves the packet ring
/// enforcing alone, which the agent says everywhere it reports its health.
pub(super) fn attach_socket_ring(
    datapath: &mut Datapath,
    cgroup: Option<&Path>,
    kernel: &KernelFeatures,
) -> SocketRingStatus {
    let Some(cgroup) = cgroup else {
        info!("the socket ring is off (--socket-ring off): the packet ring enforces alone");
        return SocketRingStatus::off();
    };
    let attached = if !crate::cgroups::is_cgroup2(cgroup) {
        Err("not a directory of a cgroup v2 hierarchy".to_owned())
    } else if !kernel.has("socket_ring") {
        Err(format!(
            "Linux {} has no connect and sendmsg programs (cgroup/sock_addr, Linux 4.17)",
            kernel.release
        ))
    } else {
        datapath
            .attach_socket_ring(cgroup)
            .map_err(|e| e.to_string())
    };
    match attached {
        Ok(how) => {
            info!(cgroup = %cgroup.display(), adopted = (how == Attached::Adopted), "socket ring attached");
            SocketRingStatus::attached(Some(cgroup))
        }
        Err(error) => {
            warn!(cgroup = %cgroup.display(), %error, "the socket ring is DEGRADED: connect() and sendmsg() are not judged, the packet ring enforces alone");
            SocketRingStatus::degraded(cgroup, error)
        }
    }
}

/// Logs, once at start, each user-data unit that may open packet sockets (as `check`
/// warns): the journal is where an operator who never ran `check` looks. systemd is
/// asked on a thread of its own, so that a slow answer never holds up enforcement.
fn warn_units_with_packet_sockets(policy: &LoadedPolicy, cgroup_root: &Path) {
    use crate::packet_bypass::{UnitReport, check_class_cgroups};
    let (named, root) = (policy.class_cgroups(), cgroup_root.to_owned());
    if named.is_empty() {
        return;
    }
    let asked = std::thread::Builder::new()
        .name("unit-check".into())
        .spawn(move || {
            if let UnitReport::Checked { exposed, .. } = check_class_cgroups(&named, &root) {
                for e in exposed {
                    warn!(class = %e.class, unit = %e.unit, "this user-data unit may open packet or XDP sockets, which send around TC egress (PACKET_QDISC_BYPASS, AF_XDP); restrict AF_PACKET and AF_XDP (RestrictAddressFamilies=) or CAP_NET_RAW (CapabilityBoundingSet=) in it");
                }
            }
        });
    if let Err(e) = asked {
        warn!(error = %e, "cannot check user-data units for packet sockets");
    }
}

/// Unpins what an earlier datapath version or build left beside the pins just adopted:
/// maps of another ABI version and judge stages of another build. A failure is logged;
/// it costs kernel memory, not enforcement.
fn unpin_earlier_builds(pins: &PinLayout) {
    match pins.remove_retired() {
        Ok(removed) if !removed.is_empty() => {
            info!(?removed, "unpinned the outgrown datapath");
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "could not unpin the outgrown datapath"),
    }
    match pins.remove_other_abi_versions() {
        Ok(removed) if !removed.is_empty() => {
            info!(?removed, "unpinned the maps of an earlier datapath version");
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "could not unpin the maps of an earlier datapath version"),
    }
    match pins.remove_other_stages(crate::datapath::object_digest()) {
        Ok(removed) if !removed.is_empty() => {
            info!(?removed, "unpinned the stages of an earlier build");
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "could not unpin the stages of an earlier build"),
    }
}

/// The generations an earlier agent on the same pins recorded, up to the one it left in
/// force. Read from the state its pin directory names (or else from this agent's
/// runtime directory), and only when that state is about the same pins.
fn earlier_generations(pin_dir: &Path, runtime_dir: &Path, adopted: u32) -> Vec<GenerationNames> {
    if adopted == 0 {
        return Vec::new();
    }
    let candidates = control::pins_owner(pin_dir)
        .into_iter()
        .chain([runtime_dir.to_owned()]);
    for dir in candidates {
        let Ok(state) = control::read_state(&dir) else {
            continue;
        };
        if state
            .pin_dir
            .as_deref()
            .is_some_and(|p| control::same_path(Path::new(p), pin_dir))
        {
            return state
                .generations
                .into_iter()
                .filter(|g| g.generation <= adopted)
                .collect();
        }
    }
    Vec::new()
}
