//! Prometheus metrics and the health endpoint.
//!
//! Packet counters live in the kernel's per-CPU maps, keyed by numeric class and region
//! ids. A reload can give a name a different id, so exported series are kept in a ledger
//! keyed by label *names*: at every scrape, and just before every policy switch, the
//! kernel's growth since the last read is credited to the names in force. Exported
//! counters therefore never go backwards, across reloads included.
//!
//! [`http`] serves what [`render`] and [`health`] produce.
#![forbid(unsafe_code)]

mod exposition;
pub mod http;
mod render;

pub use self::{
    exposition::Format,
    render::{health, render},
};

use std::{
    collections::HashMap,
    sync::atomic::{AtomicU64, Ordering},
};

use datafence_common::stat;
use datafence_common::{CLASS_NONE, CounterKey, CounterValue, Hook, REGION_NONE, Reason, Verdict};
use prometheus_client::encoding::EncodeLabelSet;

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

/// The interface a counter key or event names: empty for the socket ring's, which judges
/// calls before an interface is chosen.
pub fn interface_label(ifindex: u32) -> String {
    match ifindex {
        0 => String::new(),
        i => crate::datapath::if_name(i).unwrap_or_else(|| i.to_string()),
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

    /// The values now, for a snapshot.
    pub fn read(&self) -> AgentCounts {
        AgentCounts {
            reload_success: self.reload_success.load(Ordering::Relaxed),
            reload_failure: self.reload_failure.load(Ordering::Relaxed),
            reattached: self.reattached.load(Ordering::Relaxed),
            report_lines: self.report_lines.load(Ordering::Relaxed),
            violations: self
                .violations
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
        }
    }
}

/// [`AgentCounters`] read at one moment.
#[derive(Clone, Debug, Default)]
pub struct AgentCounts {
    pub reload_success: u64,
    pub reload_failure: u64,
    pub reattached: u64,
    pub report_lines: u64,
    pub violations: Vec<((String, String, String), u64)>,
}

/// One hook datafence should hold, as the kernel has it now.
#[derive(Debug, Default, Clone)]
pub struct HookState {
    pub interface: String,
    pub hook: String,
    pub attached: bool,
    /// Kernel ids of other programs that run ahead of datafence's there.
    pub programs_ahead: Vec<u32>,
}

/// Everything a scrape reports. The agent builds one under its lock and publishes it;
/// scrapes render the published copy and never take the lock.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub verdicts: Vec<(VerdictLabels, CounterValue)>,
    /// The datapath's own statistics (lost events, uncounted packets, ...).
    pub kernel_stats: crate::datapath::Stats,
    pub policy_sha256: String,
    pub policy_version: u32,
    pub prefixes_v4: usize,
    pub prefixes_v6: usize,
    pub last_reload_unix: f64,
    /// (map, entries, capacity)
    pub maps: Vec<(String, u64, u64)>,
    /// (map, bytes of kernel memory), from each map's own accounting.
    pub map_memory: Vec<(String, u64)>,
    pub attachments: Vec<HookState>,
    pub kernel: crate::kernel::KernelFeatures,
    pub agent: AgentCounts,
    pub socket_ring: crate::control::SocketRingStatus,
}

impl Snapshot {
    /// Each datapath statistic, in [`stat::ALL`]'s order, with its name and help text.
    pub fn stats(&self) -> impl Iterator<Item = (stat::Stat, u64)> + '_ {
        stat::ALL
            .iter()
            .map(|s| (*s, self.kernel_stats.get(s.index)))
    }
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
                origin: [0; 2],
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
        snap.attachments.push(HookState {
            interface: "eth0".into(),
            hook: "tc_egress".into(),
            attached: true,
            programs_ahead: Vec::new(),
        });
        let sample = "{interface=\"eth0\",hook=\"tc_egress\",class=\"user-data\",region=\"us-east\",verdict=\"deny\",reason=\"region_denied\"} 4";
        for format in [Format::OpenMetrics, Format::Text] {
            let text = render(&snap, format).expect("render");
            assert!(
                text.contains(&format!("datafence_packets_total{sample}\n")),
                "{text}"
            );
            assert!(
                text.contains(
                    "datafence_programs_attached{interface=\"eth0\",hook=\"tc_egress\"} 1"
                ),
                "{text}"
            );
            assert!(text.contains("datafence_build_info{"), "{text}");
            assert!(
                text.contains("datafence_packets_uncounted_total 0\n"),
                "{text}"
            );
        }
        let om = render(&snap, Format::OpenMetrics).expect("render");
        assert!(om.contains("# TYPE datafence_bytes counter\n"), "{om}");
        assert!(om.contains("# TYPE datafence_build info\n"), "{om}");
        assert!(om.ends_with("# EOF\n"), "{om}");
        // The text format: counters' families carry `_total`, and there is no info type.
        let text = render(&snap, Format::Text).expect("render");
        assert!(
            text.contains("# TYPE datafence_bytes_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE datafence_build_info gauge\n"),
            "{text}"
        );
        assert!(
            !text.contains(" info\n") && !text.contains("# EOF"),
            "{text}"
        );
        assert!(health(&snap, &[]).0);
        let stalled = crate::liveness::LoopState {
            name: "control",
            since_progress: std::time::Duration::from_secs(40),
            limit: std::time::Duration::from_secs(30),
        };
        let (ok, text) = health(&snap, std::slice::from_ref(&stalled));
        assert!(!ok && text.contains("control STALLED"), "{text}");
        snap.attachments[0].programs_ahead = vec![41];
        let (ok, text) = health(&snap, &[]);
        assert!(
            !ok && text.contains("eth0 tc_egress attached, 1 PROGRAM AHEAD (ids 41)"),
            "{text}"
        );
        let text = render(&snap, Format::Text).expect("render");
        assert!(
            text.contains("datafence_programs_ahead{interface=\"eth0\",hook=\"tc_egress\"} 1\n"),
            "{text}"
        );
        snap.attachments[0].programs_ahead.clear();
        assert!(health(&snap, &[]).0);
        snap.attachments[0].attached = false;
        assert!(!health(&snap, &[]).0);
    }

    #[test]
    fn the_format_follows_the_accept_header() {
        use Format::{OpenMetrics, Text};
        for (accept, want) in [
            // Prometheus 2.x's header.
            (
                Some(
                    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                ),
                OpenMetrics,
            ),
            (
                Some("application/openmetrics-text; version=1.0.0"),
                OpenMetrics,
            ),
            (None, Text),
            (Some("*/*"), Text),
            (Some("text/plain;version=0.0.4"), Text),
            (Some("application/openmetrics-text;q=0.2, text/plain"), Text),
            (Some("application/openmetrics-text;q=0"), Text),
            (Some("application/json"), Text),
        ] {
            assert_eq!(Format::negotiate(accept), want, "{accept:?}");
        }
    }
}
