//! What `/metrics` and `/healthz` say about a [`Snapshot`]: every family, with its name,
//! help text and labels.
#![forbid(unsafe_code)]

use std::{fmt::Write as _, sync::atomic::AtomicU64};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
};

use super::{
    Snapshot,
    exposition::{Exposition, Format},
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ViolationLabels {
    class: String,
    region: String,
    verdict: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    sha256: String,
    version: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FamilyLabels {
    family: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttachLabels {
    interface: String,
    hook: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    abi: String,
}

/// Renders a snapshot in `format`.
pub fn render(snapshot: &Snapshot, format: Format) -> Result<String, std::fmt::Error> {
    let mut x = Exposition::new(format);
    traffic(&mut x, snapshot);
    // The datapath's statistics, named in one place: `datafence_common::stat::ALL`.
    for (s, value) in snapshot.stats() {
        x.counter(s.metric, s.help, value);
    }
    x.counter(
        "report_lines",
        "Violation log lines written, after folding repeats of a flow",
        snapshot.agent.report_lines,
    );
    policy(&mut x, snapshot);
    maps(&mut x, snapshot);
    attachments(&mut x, snapshot);
    socket_ring(&mut x, snapshot);
    snapshot.kernel.register_metrics(&mut x.registry);
    x.info(
        "build",
        "datafence build information",
        BuildLabels {
            version: env!("CARGO_PKG_VERSION").into(),
            abi: datafence_common::ABI_VERSION.to_string(),
        },
    );

    x.encode()
}

/// Packets, bytes and violation reports, by their labels.
fn traffic(x: &mut Exposition, snapshot: &Snapshot) {
    let counts = &snapshot.agent;
    x.counters(
        "packets",
        "Packets judged, by interface, hook, class, region, verdict and reason",
        snapshot
            .verdicts
            .iter()
            .map(|(l, v)| (l.clone(), v.packets)),
    );
    x.counters(
        "bytes",
        "Bytes judged, by interface, hook, class, region, verdict and reason",
        snapshot.verdicts.iter().map(|(l, v)| (l.clone(), v.bytes)),
    );
    x.counters(
        "violations",
        "Violation reports (deny and audit verdicts) received from the kernel, after its rate limit",
        counts.violations.iter().map(|((class, region, verdict), n)| {
            (
                ViolationLabels {
                    class: class.clone(),
                    region: region.clone(),
                    verdict: verdict.clone(),
                },
                *n,
            )
        }),
    );
}

/// The policy in force, its size, when it was loaded, and how reloads went.
fn policy(x: &mut Exposition, snapshot: &Snapshot) {
    let counts = &snapshot.agent;
    x.info(
        "policy",
        "The policy in force",
        PolicyLabels {
            sha256: snapshot.policy_sha256.clone(),
            version: snapshot.policy_version.to_string(),
        },
    );
    let prefixes = Family::<FamilyLabels, Gauge>::default();
    prefixes
        .get_or_create(&FamilyLabels {
            family: "ipv4".into(),
        })
        .set(snapshot.prefixes_v4 as i64);
    prefixes
        .get_or_create(&FamilyLabels {
            family: "ipv6".into(),
        })
        .set(snapshot.prefixes_v6 as i64);
    x.registry.register(
        "policy_prefixes",
        "Region prefixes in the policy in force",
        prefixes,
    );
    let last_reload = Gauge::<f64, AtomicU64>::default();
    last_reload.set(snapshot.last_reload_unix);
    x.registry.register(
        "policy_last_reload_timestamp_seconds",
        "When the policy in force was loaded (Unix time)",
        last_reload,
    );
    x.counters(
        "policy_reload",
        "Policy reloads by result",
        [
            ("success", counts.reload_success),
            ("failure", counts.reload_failure),
        ]
        .map(|(result, n)| {
            (
                ResultLabels {
                    result: result.into(),
                },
                n,
            )
        }),
    );
}

/// Each datapath map's entries, capacity and kernel memory.
fn maps(x: &mut Exposition, snapshot: &Snapshot) {
    let entries = Family::<MapLabels, Gauge>::default();
    let capacity = Family::<MapLabels, Gauge>::default();
    for (map, used, cap) in &snapshot.maps {
        let labels = MapLabels { map: map.clone() };
        entries.get_or_create(&labels).set(*used as i64);
        capacity.get_or_create(&labels).set(*cap as i64);
    }
    let memory = Family::<MapLabels, Gauge>::default();
    for (map, bytes) in &snapshot.map_memory {
        memory
            .get_or_create(&MapLabels { map: map.clone() })
            .set(i64::try_from(*bytes).unwrap_or(i64::MAX));
    }
    x.registry.register_with_unit(
        "map_memory",
        "Kernel memory each datapath map holds, from the map's own accounting",
        prometheus_client::registry::Unit::Bytes,
        memory,
    );
    x.registry
        .register("map_entries", "Entries in each datapath map", entries);
    x.registry
        .register("map_capacity", "Capacity of each datapath map", capacity);
}

/// Which programs are attached, and how often one had to be attached again.
fn attachments(x: &mut Exposition, snapshot: &Snapshot) {
    let counts = &snapshot.agent;
    let attached = Family::<AttachLabels, Gauge>::default();
    let ahead = Family::<AttachLabels, Gauge>::default();
    for a in &snapshot.attachments {
        let labels = AttachLabels {
            interface: a.interface.clone(),
            hook: a.hook.clone(),
        };
        attached.get_or_create(&labels).set(i64::from(a.attached));
        ahead
            .get_or_create(&labels)
            .set(i64::try_from(a.programs_ahead.len()).unwrap_or(i64::MAX));
    }
    x.registry.register(
        "programs_attached",
        "1 while the program is attached to the interface's hook",
        attached,
    );
    x.registry.register(
        "programs_ahead",
        "Other programs that run ahead of datafence's on the interface's hook and could \
         decide for a packet before it is judged; anything but 0 is unhealthy",
        ahead,
    );
    x.counter(
        "programs_reattached",
        "Times the agent found a program detached by someone else and attached it again",
        counts.reattached,
    );
}

/// The socket ring's state, one series per state with 1 on the current one.
fn socket_ring(x: &mut Exposition, snapshot: &Snapshot) {
    let states = Family::<StateLabels, Gauge>::default();
    for state in crate::control::SocketRingStatus::STATES {
        states
            .get_or_create(&StateLabels {
                state: state.to_owned(),
            })
            .set(i64::from(snapshot.socket_ring.state == state));
    }
    x.registry.register(
        "socket_ring",
        "1 on the socket ring's state: attached; off (--socket-ring off); degraded when it \
         could not be attached and the packet ring enforces alone (unhealthy)",
        states,
    );
}

/// The `/healthz` answer: healthy only while a policy is loaded, every program is
/// attached, the socket ring is not degraded and every loop of the agent made progress
/// within its limit (the facts the systemd watchdog is pinged on).
pub fn health(snapshot: &Snapshot, loops: &[crate::liveness::LoopState]) -> (bool, String) {
    let mut text = String::new();
    let mut healthy = !snapshot.policy_sha256.is_empty();
    let _ = writeln!(
        text,
        "policy {}",
        if healthy {
            &snapshot.policy_sha256
        } else {
            "none"
        }
    );
    for a in &snapshot.attachments {
        // A program ahead of datafence's could pass packets it never sees.
        healthy &= a.attached && a.programs_ahead.is_empty();
        let state = if a.attached { "attached" } else { "DETACHED" };
        let _ = match a.programs_ahead.as_slice() {
            [] => writeln!(text, "{} {} {state}", a.interface, a.hook),
            ids => writeln!(
                text,
                "{} {} {state}, {} PROGRAM{} AHEAD (ids {})",
                a.interface,
                a.hook,
                ids.len(),
                if ids.len() == 1 { "" } else { "S" },
                ids.iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
    }
    let ring = &snapshot.socket_ring;
    let at = ring.cgroup.as_deref().unwrap_or("");
    let _ = if ring.is_degraded() {
        // Never a silent downgrade: the processes' calls are no longer judged.
        healthy = false;
        writeln!(
            text,
            "socket_ring DEGRADED at cgroup {at}: {}; the packet ring enforces alone",
            ring.error.as_deref().unwrap_or("not attached")
        )
    } else {
        writeln!(text, "socket_ring {} {at}", ring.state)
    };
    for l in loops {
        healthy &= l.ok();
        let _ = writeln!(
            text,
            "{} {} (last progress {:.1}s ago, limit {}s)",
            l.name,
            if l.ok() { "ok" } else { "STALLED" },
            l.since_progress.as_secs_f64(),
            l.limit.as_secs()
        );
    }
    (healthy, text)
}
