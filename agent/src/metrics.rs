//! Prometheus metrics and the health endpoint.
//!
//! Packet counters live in the kernel's per-CPU maps, keyed by numeric class and region
//! ids. A reload can give a name a different id, so exported series are kept in a ledger
//! keyed by label *names*: at every scrape, and just before every policy switch, the
//! kernel's growth since the last read is credited to the names in force. Exported
//! counters therefore never go backwards, across reloads included.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
};

use datafence_common::{CLASS_NONE, CounterKey, CounterValue, Hook, REGION_NONE, Reason, Verdict};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
    registry::Registry,
};

/// Labels of the per-verdict packet and byte counters. Low cardinality by design: no
/// addresses, no ports.
#[derive(
    Clone,
    Debug,
    Hash,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    EncodeLabelSet,
    serde::Serialize,
    serde::Deserialize,
)]
pub struct VerdictLabels {
    pub interface: String,
    pub hook: String,
    pub class: String,
    pub region: String,
    pub verdict: String,
    pub reason: String,
}

/// Running totals by label names; see the module docs.
#[derive(Debug, Default)]
pub struct CounterLedger {
    totals: HashMap<VerdictLabels, CounterValue>,
    last_seen: HashMap<CounterKey, CounterValue>,
}

impl CounterLedger {
    /// Credits the kernel counters' growth since the last sync to the labels `label`
    /// gives each key now.
    pub fn sync(
        &mut self,
        kernel: &[(CounterKey, CounterValue)],
        label: impl Fn(&CounterKey) -> VerdictLabels,
    ) {
        for (key, value) in kernel {
            let before = self.last_seen.get(key).copied().unwrap_or_default();
            // A kernel counter only shrinks if its map was recreated; count it afresh.
            let (packets, bytes) = if value.packets >= before.packets {
                (
                    value.packets - before.packets,
                    value.bytes.saturating_sub(before.bytes),
                )
            } else {
                (value.packets, value.bytes)
            };
            if packets > 0 || bytes > 0 {
                let total = self.totals.entry(label(key)).or_default();
                total.packets += packets;
                total.bytes += bytes;
            }
            self.last_seen.insert(*key, *value);
        }
    }

    pub fn totals(&self) -> impl Iterator<Item = (&VerdictLabels, &CounterValue)> {
        self.totals.iter()
    }
}

/// Builds the labels for a kernel counter key with the names of the policy in force.
pub fn verdict_labels(
    key: &CounterKey,
    interface: impl Fn(u32) -> String,
    class: impl Fn(u8) -> Option<String>,
    region: impl Fn(u16) -> Option<String>,
) -> VerdictLabels {
    VerdictLabels {
        interface: interface(key.ifindex),
        hook: Hook::from_u8(key.hook)
            .map_or("unknown", Hook::as_str)
            .to_owned(),
        class: if key.class == CLASS_NONE {
            "none".to_owned()
        } else {
            class(key.class).unwrap_or_else(|| "unknown".to_owned())
        },
        region: if key.region == REGION_NONE {
            "none".to_owned()
        } else {
            region(key.region).unwrap_or_else(|| "unknown".to_owned())
        },
        verdict: Verdict::from_u8(key.verdict)
            .map_or("unknown", Verdict::as_str)
            .to_owned(),
        reason: Reason::from_u8(key.reason)
            .map_or("unknown", Reason::as_str)
            .to_owned(),
    }
}

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
struct AttachLabels {
    interface: String,
    hook: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    abi: String,
}

/// Counts kept by the agent itself (not read from the kernel).
#[derive(Debug, Default)]
pub struct AgentCounters {
    pub reload_success: AtomicU64,
    pub reload_failure: AtomicU64,
    pub reattached: AtomicU64,
    /// Violation reports by (class, region, verdict), as received from the kernel.
    pub violations: std::sync::Mutex<HashMap<(String, String, String), u64>>,
    pub report_lines: AtomicU64,
}

impl AgentCounters {
    pub fn count_violation(&self, class: &str, region: &str, verdict: &str) {
        let mut map = self
            .violations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *map.entry((class.to_owned(), region.to_owned(), verdict.to_owned()))
            .or_default() += 1;
    }
}

/// Everything a scrape reports, gathered under the agent's lock.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub verdicts: Vec<(VerdictLabels, CounterValue)>,
    pub events_lost: u64,
    pub events_suppressed: u64,
    pub policy_sha256: String,
    pub policy_version: u32,
    pub prefixes_v4: usize,
    pub prefixes_v6: usize,
    pub last_reload_unix: f64,
    /// (map, entries, capacity)
    pub maps: Vec<(String, u64, u64)>,
    /// (map, bytes of kernel memory), from each map's own accounting.
    pub map_memory: Vec<(String, u64)>,
    /// (interface, hook, attached)
    pub attachments: Vec<(String, String, bool)>,
}

fn counter(value: u64) -> Counter {
    let c = Counter::default();
    c.inc_by(value);
    c
}

/// Renders a snapshot in the Prometheus text format.
pub fn render(
    snapshot: &Snapshot,
    counters: &Arc<AgentCounters>,
) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("datafence");

    let packets = Family::<VerdictLabels, Counter>::default();
    let bytes = Family::<VerdictLabels, Counter>::default();
    for (labels, value) in &snapshot.verdicts {
        packets.get_or_create(labels).inc_by(value.packets);
        bytes.get_or_create(labels).inc_by(value.bytes);
    }
    registry.register(
        "packets",
        "Packets judged, by interface, hook, class, region, verdict and reason",
        packets,
    );
    registry.register(
        "bytes",
        "Bytes judged, by interface, hook, class, region, verdict and reason",
        bytes,
    );

    let violations = Family::<ViolationLabels, Counter>::default();
    for ((class, region, verdict), n) in counters
        .violations
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
    {
        violations
            .get_or_create(&ViolationLabels {
                class: class.clone(),
                region: region.clone(),
                verdict: verdict.clone(),
            })
            .inc_by(*n);
    }
    registry.register(
        "violations",
        "Violation reports (deny and audit verdicts) received from the kernel, after its rate limit",
        violations,
    );
    registry.register(
        "events_lost",
        "Violation events the kernel could not queue because the ring buffer was full",
        counter(snapshot.events_lost),
    );
    registry.register(
        "events_suppressed",
        "Violation events the kernel's per-CPU rate limit held back (the packets are still counted)",
        counter(snapshot.events_suppressed),
    );
    registry.register(
        "report_lines",
        "Violation log lines written, after folding repeats of a flow",
        counter(counters.report_lines.load(Ordering::Relaxed)),
    );

    registry.register(
        "policy",
        "The policy in force",
        Info::new(PolicyLabels {
            sha256: snapshot.policy_sha256.clone(),
            version: snapshot.policy_version.to_string(),
        }),
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
    registry.register(
        "policy_prefixes",
        "Region prefixes in the policy in force",
        prefixes,
    );
    let last_reload = Gauge::<f64, AtomicU64>::default();
    last_reload.set(snapshot.last_reload_unix);
    registry.register(
        "policy_last_reload_timestamp_seconds",
        "When the policy in force was loaded (Unix time)",
        last_reload,
    );
    let reloads = Family::<ResultLabels, Counter>::default();
    reloads
        .get_or_create(&ResultLabels {
            result: "success".into(),
        })
        .inc_by(counters.reload_success.load(Ordering::Relaxed));
    reloads
        .get_or_create(&ResultLabels {
            result: "failure".into(),
        })
        .inc_by(counters.reload_failure.load(Ordering::Relaxed));
    registry.register("policy_reload", "Policy reloads by result", reloads);

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
    registry.register_with_unit(
        "map_memory",
        "Kernel memory each datapath map holds, from the map's own accounting",
        prometheus_client::registry::Unit::Bytes,
        memory,
    );
    registry.register("map_entries", "Entries in each datapath map", entries);
    registry.register("map_capacity", "Capacity of each datapath map", capacity);

    let attached = Family::<AttachLabels, Gauge>::default();
    for (interface, hook, up) in &snapshot.attachments {
        attached
            .get_or_create(&AttachLabels {
                interface: interface.clone(),
                hook: hook.clone(),
            })
            .set(i64::from(*up));
    }
    registry.register(
        "programs_attached",
        "1 while the program is attached to the interface's hook",
        attached,
    );
    registry.register(
        "programs_reattached",
        "Times the agent found a program detached by someone else and attached it again",
        counter(counters.reattached.load(Ordering::Relaxed)),
    );

    registry.register(
        "build",
        "datafence build information",
        Info::new(BuildLabels {
            version: env!("CARGO_PKG_VERSION").into(),
            abi: datafence_common::ABI_VERSION.to_string(),
        }),
    );

    let mut out = String::new();
    encode(&mut out, &registry)?;
    Ok(out)
}

/// The `/healthz` answer: healthy only while a policy is loaded and every program is
/// attached.
pub fn health(snapshot: &Snapshot) -> (bool, String) {
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
    for (interface, hook, up) in &snapshot.attachments {
        healthy &= *up;
        let _ = writeln!(
            text,
            "{interface} {hook} {}",
            if *up { "attached" } else { "DETACHED" }
        );
    }
    (healthy, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(class: u8, packets: u64) -> (CounterKey, CounterValue) {
        (
            CounterKey {
                ifindex: 2,
                region: 1,
                class,
                verdict: Verdict::Deny as u8,
                reason: Reason::RegionDenied as u8,
                hook: 0,
                _pad: [0; 2],
            },
            CounterValue {
                packets,
                bytes: packets * 100,
            },
        )
    }

    fn labels(names: &'static [&'static str]) -> impl Fn(&CounterKey) -> VerdictLabels {
        move |k| {
            verdict_labels(
                k,
                |_| "eth0".into(),
                |c| names.get(usize::from(c)).map(|s| (*s).to_owned()),
                |_| Some("us-east".into()),
            )
        }
    }

    #[test]
    fn ledger_credits_growth_to_the_names_in_force() {
        let mut ledger = CounterLedger::default();
        ledger.sync(&[key(0, 5)], labels(&["a", "b"]));
        // After a reload, class id 0 is called "b": its later growth is b's, and a keeps 5.
        ledger.sync(&[key(0, 7)], labels(&["b", "a"]));
        let totals: HashMap<String, u64> = ledger
            .totals()
            .map(|(l, v)| (l.class.clone(), v.packets))
            .collect();
        assert_eq!(totals["a"], 5);
        assert_eq!(totals["b"], 2);
    }

    #[test]
    fn ledger_never_goes_backwards_when_a_map_is_recreated() {
        let mut ledger = CounterLedger::default();
        ledger.sync(&[key(0, 10)], labels(&["a"]));
        ledger.sync(&[key(0, 3)], labels(&["a"]));
        let total: u64 = ledger.totals().map(|(_, v)| v.packets).sum();
        assert_eq!(total, 13);
    }

    #[test]
    fn render_follows_prometheus_naming() {
        let mut snap = Snapshot {
            policy_sha256: "ab".repeat(32),
            policy_version: 1,
            ..Default::default()
        };
        let (k, v) = key(0, 4);
        snap.verdicts.push((labels(&["user-data"])(&k), v));
        snap.attachments
            .push(("eth0".into(), "tc_egress".into(), true));
        let text = render(&snap, &Arc::default()).expect("render");
        assert!(text.contains(
            "datafence_packets_total{interface=\"eth0\",hook=\"tc_egress\",class=\"user-data\",region=\"us-east\",verdict=\"deny\",reason=\"region_denied\"} 4"
        ), "{text}");
        assert!(text.contains("# TYPE datafence_bytes counter"), "{text}");
        assert!(
            text.contains("datafence_programs_attached{interface=\"eth0\",hook=\"tc_egress\"} 1")
        );
        assert!(text.contains("datafence_build_info{"), "{text}");
        assert!(health(&snap).0);
        snap.attachments[0].2 = false;
        assert!(!health(&snap).0);
    }
}
