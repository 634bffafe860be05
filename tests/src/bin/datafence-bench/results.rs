//! The results file (`results.json`): what every phase measured, as the report prints it
//! and as later runs compare against it. Field names are the file's keys; a failed
//! measurement keeps its row, with the error in place of the figures.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Summary;

#[derive(Serialize, Deserialize)]
pub(crate) struct Report {
    pub(crate) machine: Machine,
    pub(crate) commit: Option<String>,
    pub(crate) quick: bool,
    pub(crate) sizes: Vec<usize>,
    pub(crate) spread: String,
    pub(crate) memory_cgroup: String,
    pub(crate) datapath: Vec<DatapathRow>,
    pub(crate) e2e: Vec<E2eRow>,
    pub(crate) control_plane_other: Vec<ControlRow>,
    pub(crate) agent: Vec<AgentRow>,
    /// `None` when the phase did not get to it.
    pub(crate) catalogue_reload: Option<Outcome<CatalogueReload>>,
    pub(crate) scrape_interference: Option<Outcome<ScrapeInterference>>,
    /// The socket ring's cost to a process's calls; `None` when the phase did not run.
    #[serde(default)]
    pub(crate) sockets: Option<Outcome<super::SocketFigures>>,
    /// The "Tables compared" section: per size of the real mix, each implementation's
    /// kernel memory and cost, from the figures above. Empty in older files.
    #[serde(default)]
    pub(crate) tables_compared: Vec<TablesComparedRow>,
    pub(crate) targets: Vec<Goal>,
    pub(crate) skipped: Vec<String>,
    pub(crate) elapsed_s: f64,
    pub(crate) loadavg_start: String,
    pub(crate) loadavg_end: String,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct Machine {
    pub(crate) cpu: String,
    pub(crate) cores: usize,
    pub(crate) kernel: String,
    pub(crate) memory_gib: f64,
    pub(crate) nft: String,
    pub(crate) ipset: String,
    pub(crate) iptables: String,
}

/// A measurement that may have failed as a whole.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum Outcome<T> {
    Measured(T),
    Failed { error: String },
}

/// A target of the issue, and whether this run met it.
#[derive(Serialize, Deserialize)]
pub(crate) struct Goal {
    pub(crate) target: String,
    pub(crate) value: Option<f64>,
    pub(crate) limit: f64,
    /// Absent for a ratio.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) unit: Option<String>,
    pub(crate) pass: Option<bool>,
}

/// Phase 1, one shape and size.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum DatapathRow {
    Measured(Box<DatapathFigures>),
    Failed {
        shape: String,
        size: usize,
        error: String,
    },
}

impl DatapathRow {
    pub(crate) fn figures(&self) -> Option<&DatapathFigures> {
        match self {
            Self::Measured(f) => Some(f),
            Self::Failed { .. } => None,
        }
    }
}

#[derive(Serialize, Deserialize)]
pub(crate) struct DatapathFigures {
    pub(crate) shape: String,
    pub(crate) size: usize,
    pub(crate) prefixes_v4: usize,
    pub(crate) prefixes_v6: usize,
    pub(crate) v4_table: String,
    pub(crate) frames: usize,
    pub(crate) repeat: u32,
    pub(crate) rounds: usize,
    pub(crate) hot: PerFamily<HotFigures>,
    pub(crate) cold: ColdFigures,
    pub(crate) control: ControlFigures,
}

#[derive(Default, Serialize, Deserialize)]
pub(crate) struct PerFamily<T> {
    pub(crate) ipv4: T,
    pub(crate) ipv6: T,
}

impl<T> PerFamily<T> {
    /// With the short label the tables use.
    pub(crate) fn each(&self) -> [(&'static str, &T); 2] {
        [("v4", &self.ipv4), ("v6", &self.ipv6)]
    }
}

/// Mean ns per packet of each program over the frames, and the ratios between them.
#[derive(Serialize, Deserialize)]
pub(crate) struct HotFigures {
    pub(crate) floor_ns: Option<Summary>,
    pub(crate) lpm_only_ns: Option<Summary>,
    pub(crate) tc_full_ns: Option<Summary>,
    pub(crate) xdp_full_ns: Option<Summary>,
    pub(crate) tc_parse_post_ns: Option<Summary>,
    pub(crate) tc_handoff_ns: Option<Summary>,
    pub(crate) tc_vs_floor: Option<f64>,
    pub(crate) tc_vs_lpm: Option<f64>,
    pub(crate) xdp_vs_floor: Option<f64>,
    pub(crate) xdp_vs_lpm: Option<f64>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct ColdFigures {
    pub(crate) ipv4: ColdFamily,
    pub(crate) ipv6: ColdFamily,
    pub(crate) loop_floor_ns_per_run: Option<Summary>,
    pub(crate) lookups_per_run: u32,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct ColdFamily {
    pub(crate) lpm_ns_per_lookup: Option<Summary>,
    pub(crate) datafence_ns_per_lookup: Option<Summary>,
    pub(crate) lpm_over_datafence: Option<f64>,
}

/// datafence's control plane at one size.
#[derive(Serialize, Deserialize)]
pub(crate) struct ControlFigures {
    pub(crate) parse_validate_s: f64,
    pub(crate) compile_s: f64,
    pub(crate) object_load_ms: Option<Summary>,
    pub(crate) apply_s: Option<Summary>,
    pub(crate) reload_s: Option<Summary>,
    /// After the first apply.
    pub(crate) kernel_bytes_one_slot: Option<Summary>,
    /// Right after a reload, while the slot it left is still held.
    pub(crate) kernel_bytes_both_slots: Option<Summary>,
    /// After a reload, once the slot it left is freed: what a host holds between
    /// reloads. Absent in older files.
    #[serde(default)]
    pub(crate) kernel_bytes_steady: Option<Summary>,
    pub(crate) kernel_bytes_per_map: BTreeMap<String, u64>,
    pub(crate) memcg_bytes: Option<Summary>,
    pub(crate) rss_peak_growth_bytes: Option<Summary>,
    pub(crate) bench_lpm_fill_s: f64,
    /// The LPM baseline tries' kernel memory once filled (`kernel_bytes_per_map` is read
    /// before the fill, when they are empty). Absent in older files.
    #[serde(default)]
    pub(crate) bench_lpm_kernel_bytes: PerFamily<Option<u64>>,
}

/// Phase 2, one size, filter and hit rate.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum E2eRow {
    Measured(E2eFigures),
    /// A filter that could not be set up, or (without `filter`) a whole size.
    Failed {
        size: usize,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        filter: Option<String>,
        error: String,
    },
}

impl E2eRow {
    pub(crate) fn size(&self) -> usize {
        match self {
            Self::Measured(f) => f.size,
            Self::Failed { size, .. } => *size,
        }
    }

    pub(crate) fn figures(&self) -> Option<&E2eFigures> {
        match self {
            Self::Measured(f) => Some(f),
            Self::Failed { .. } => None,
        }
    }
}

#[derive(Serialize, Deserialize)]
pub(crate) struct E2eFigures {
    pub(crate) size: usize,
    pub(crate) filter: String,
    pub(crate) hit_rate: f64,
    pub(crate) pps: Option<Summary>,
    pub(crate) paired_no_filter_pps: Option<Summary>,
    pub(crate) vs_paired_no_filter: Option<f64>,
    pub(crate) delivered_fraction: f64,
    pub(crate) refused_by_sendmmsg_fraction: f64,
    /// datafence's own set-up; none for the others.
    pub(crate) setup: Option<DatafenceSetup>,
}

#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct DatafenceSetup {
    pub(crate) load_apply_attach_s: f64,
    pub(crate) v4_table: String,
}

/// The load and reload of a competitor, with the same prefixes as datafence.
#[derive(Serialize, Deserialize)]
#[serde(tag = "tool")]
pub(crate) enum ControlRow {
    #[serde(rename = "nft")]
    Nft {
        #[serde(flatten)]
        common: CompetitorControl,
        v4_elements_after_auto_merge: Option<usize>,
    },
    #[serde(rename = "ipset")]
    Ipset {
        #[serde(flatten)]
        common: CompetitorControl,
        ipset_size_in_memory_bytes: Option<u64>,
    },
}

#[derive(Serialize, Deserialize)]
pub(crate) struct CompetitorControl {
    pub(crate) size: usize,
    pub(crate) load_s: Option<Summary>,
    pub(crate) reload_s: Option<Summary>,
    pub(crate) memcg_bytes: Option<Summary>,
    pub(crate) error: Option<String>,
}

/// Phase 3, one size.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
pub(crate) enum AgentRow {
    Measured(AgentFigures),
    Failed { size: usize, error: String },
}

impl AgentRow {
    pub(crate) fn figures(&self) -> Option<&AgentFigures> {
        match self {
            Self::Measured(f) => Some(f),
            Self::Failed { .. } => None,
        }
    }
}

#[derive(Serialize, Deserialize)]
pub(crate) struct AgentFigures {
    pub(crate) size: usize,
    pub(crate) ready_s: f64,
    pub(crate) v4_table: String,
    pub(crate) rss_bytes: u64,
    pub(crate) rss_anon_bytes: u64,
    pub(crate) rss_file_bytes: u64,
    pub(crate) rss_shmem_bytes: u64,
    pub(crate) bpf_mapped_rss_bytes: u64,
    pub(crate) rss_minus_bpf_mapped_bytes: u64,
    pub(crate) peak_rss_bytes: u64,
    pub(crate) rss_after_violations_bytes: u64,
    pub(crate) violations_per_s: Option<Summary>,
    pub(crate) cpu_percent_of_one_core: Option<Summary>,
}

/// One row of "Tables compared": one size of the real mix and one family, or both
/// families together for the memory that is only measured over both.
#[derive(Serialize, Deserialize)]
pub(crate) struct TablesComparedRow {
    pub(crate) size: usize,
    /// "ipv4", "ipv6", or "ipv4+ipv6": the sum over both families, the only row with
    /// ipset's and nft's memory, which the run measures over both of their sets at once.
    pub(crate) family: String,
    pub(crate) datafence: TableFigures,
    pub(crate) lpm_trie: TableFigures,
    pub(crate) ipset: TableFigures,
    pub(crate) nft: TableFigures,
}

/// One implementation's figures in a row of "Tables compared"; `None` where the run has
/// no such figure (not measured for this implementation or family, failed, or skipped).
#[derive(Default, Serialize, Deserialize)]
pub(crate) struct TableFigures {
    /// Kernel memory of the table(s). datafence and the LPM trie: the maps' memlock
    /// (datafence's: the region arrays of the policy in force, after its first load); ipset: its "Size in memory";
    /// nft: the memory cgroup's growth over the load.
    pub(crate) kernel_bytes: Option<u64>,
    /// Median ns per lookup of a random address inside the prefixes, in a
    /// `BPF_PROG_TEST_RUN` loop less the empty loop: datafence and the LPM trie only.
    pub(crate) cold_ns_per_lookup: Option<f64>,
    /// ns a packet costs end to end over the paired no-filter bursts, from the medians
    /// (1e9/pps − 1e9/pps no filter), IPv4 traffic at 0% hits: not a lookup in isolation.
    pub(crate) e2e_ns_per_packet: Option<f64>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct CatalogueReload {
    pub(crate) policy: String,
    pub(crate) prefixes_v4: usize,
    pub(crate) prefixes_v6: usize,
    pub(crate) reload_s: Option<Summary>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct ScrapeInterference {
    pub(crate) idle: ReaderFigures,
    pub(crate) scraped: ReaderFigures,
}

/// The event reader's delays under one condition, and the scrapes made meanwhile.
#[derive(Serialize, Deserialize)]
pub(crate) struct ReaderFigures {
    pub(crate) probes: u32,
    pub(crate) lines: usize,
    pub(crate) reader_delay_ms: Option<Summary>,
    pub(crate) reader_delay_p99_ms: Option<f64>,
    pub(crate) scrapes: usize,
    pub(crate) scrapes_per_s: f64,
    pub(crate) scrape_ms: Option<Summary>,
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn round_trip<T: Serialize + for<'de> Deserialize<'de>>(row: &T) -> (Value, Value) {
        let value = serde_json::to_value(row).expect("serialize");
        let back: T = serde_json::from_value(value.clone()).expect("deserialize");
        (value, serde_json::to_value(&back).expect("serialize again"))
    }

    /// A failed measurement keeps the row the untyped results had, and reads back as one.
    #[test]
    fn failed_rows_keep_their_keys() {
        let error = || "it broke".to_owned();
        let rows = [
            (
                round_trip(&DatapathRow::Failed {
                    shape: "real-mix".into(),
                    size: 10,
                    error: error(),
                }),
                json!({"shape": "real-mix", "size": 10, "error": "it broke"}),
            ),
            (
                round_trip(&E2eRow::Failed {
                    size: 10,
                    filter: Some("nft-set".into()),
                    error: error(),
                }),
                json!({"size": 10, "filter": "nft-set", "error": "it broke"}),
            ),
            (
                round_trip(&E2eRow::Failed {
                    size: 10,
                    filter: None,
                    error: error(),
                }),
                json!({"size": 10, "error": "it broke"}),
            ),
            (
                round_trip(&AgentRow::Failed {
                    size: 10,
                    error: error(),
                }),
                json!({"size": 10, "error": "it broke"}),
            ),
            (
                round_trip(&Outcome::<CatalogueReload>::Failed { error: error() }),
                json!({"error": "it broke"}),
            ),
        ];
        for ((written, reread), expected) in rows {
            assert_eq!(written, expected);
            assert_eq!(reread, expected);
        }
    }

    #[test]
    fn a_competitors_row_is_tagged_with_its_tool_and_a_ratio_has_no_unit() {
        let common = || CompetitorControl {
            size: 10,
            load_s: None,
            reload_s: None,
            memcg_bytes: None,
            error: None,
        };
        let (nft, nft_again) = round_trip(&ControlRow::Nft {
            common: common(),
            v4_elements_after_auto_merge: None,
        });
        let expected = json!({
            "size": 10, "tool": "nft", "load_s": null, "reload_s": null, "memcg_bytes": null,
            "v4_elements_after_auto_merge": null, "error": null,
        });
        assert_eq!((nft, nft_again), (expected.clone(), expected));
        let (ipset, _) = round_trip(&ControlRow::Ipset {
            common: common(),
            ipset_size_in_memory_bytes: Some(4096),
        });
        assert_eq!(ipset["tool"], "ipset");
        assert_eq!(ipset["ipset_size_in_memory_bytes"], 4096);
        let (goal, _) = round_trip(&Goal {
            target: "t".into(),
            value: None,
            limit: 1.5,
            unit: None,
            pass: None,
        });
        assert_eq!(
            goal,
            json!({"target": "t", "value": null, "limit": 1.5, "pass": null})
        );
    }
}
