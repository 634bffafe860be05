//! "Tables compared": per size of the real prefix mix, the kernel memory and the cost of
//! datafence's region tables, the kernel LPM trie, ipset and nftables, side by side.
//! Nothing is measured here: the rows are put together from what the phases measured.

#![forbid(unsafe_code)]

use super::*;

/// datafence's region tables per family: the maps its cold region lookups read.
const DATAFENCE_V4_TABLES: [&str; 2] = [map_names::V4_INDEX, map_names::V4_RANGES];
const DATAFENCE_V6_TABLES: [&str; 2] = [map_names::V6_INDEX, map_names::V6_RANGES];

/// The end-to-end filters, as `phase_e2e` names them.
const E2E_DATAFENCE: &str = "datafence";
const E2E_IPSET: &str = "iptables+ipset";
const E2E_NFT: &str = "nft-set";

/// The hit rate of the end-to-end cost: with no hits every packet is looked up and then
/// goes the no-filter path, so the difference is the filter's cost alone (dropped
/// packets would skip the rest of the stack and make a filter look cheaper).
const E2E_HIT_RATE: f64 = 0.0;

/// The rows of every size: IPv4, IPv6, and both families together.
pub(crate) fn tables_compared(r: &Report) -> Vec<TablesComparedRow> {
    r.sizes
        .iter()
        .flat_map(|&size| size_rows(r, size))
        .collect()
}

fn size_rows(r: &Report, size: usize) -> [TablesComparedRow; 3] {
    let figures = r
        .datapath
        .iter()
        .filter_map(DatapathRow::figures)
        .find(|f| f.shape == Shape::Real.name() && f.size == size);
    let datafence_bytes = |tables: &[&str]| {
        figures.and_then(|f| sum_of_maps(&f.control.kernel_bytes_per_map, tables))
    };
    let lpm_bytes = figures.map(|f| &f.control.bench_lpm_kernel_bytes);
    let (cold_v4, cold_v6) = (figures.map(|f| &f.cold.ipv4), figures.map(|f| &f.cold.ipv6));

    let df = PerFamily {
        ipv4: datafence_bytes(&DATAFENCE_V4_TABLES),
        ipv6: datafence_bytes(&DATAFENCE_V6_TABLES),
    };
    let lpm = PerFamily {
        ipv4: lpm_bytes.and_then(|b| b.ipv4),
        ipv6: lpm_bytes.and_then(|b| b.ipv6),
    };
    let e2e = |filter: &str| e2e_ns_per_packet(&r.e2e, size, filter);
    let row =
        |family: &str, [datafence, lpm_trie, ipset, nft]: [TableFigures; 4]| TablesComparedRow {
            size,
            family: family.to_owned(),
            datafence,
            lpm_trie,
            ipset,
            nft,
        };
    [
        row(
            "ipv4",
            [
                TableFigures {
                    kernel_bytes: df.ipv4,
                    cold_ns_per_lookup: median(cold_v4.and_then(|c| c.datafence_ns_per_lookup)),
                    e2e_ns_per_packet: e2e(E2E_DATAFENCE),
                },
                TableFigures {
                    kernel_bytes: lpm.ipv4,
                    cold_ns_per_lookup: median(cold_v4.and_then(|c| c.lpm_ns_per_lookup)),
                    ..TableFigures::default()
                },
                TableFigures {
                    e2e_ns_per_packet: e2e(E2E_IPSET),
                    ..TableFigures::default()
                },
                TableFigures {
                    e2e_ns_per_packet: e2e(E2E_NFT),
                    ..TableFigures::default()
                },
            ],
        ),
        row(
            "ipv6",
            [
                TableFigures {
                    kernel_bytes: df.ipv6,
                    cold_ns_per_lookup: median(cold_v6.and_then(|c| c.datafence_ns_per_lookup)),
                    ..TableFigures::default()
                },
                TableFigures {
                    kernel_bytes: lpm.ipv6,
                    cold_ns_per_lookup: median(cold_v6.and_then(|c| c.lpm_ns_per_lookup)),
                    ..TableFigures::default()
                },
                TableFigures::default(),
                TableFigures::default(),
            ],
        ),
        row(
            "ipv4+ipv6",
            [
                memory_only(both(&df)),
                memory_only(both(&lpm)),
                memory_only(ipset_bytes(&r.control_plane_other, size)),
                memory_only(nft_bytes(&r.control_plane_other, size)),
            ],
        ),
    ]
}

fn memory_only(kernel_bytes: Option<u64>) -> TableFigures {
    TableFigures {
        kernel_bytes,
        ..TableFigures::default()
    }
}

fn median(s: Option<Summary>) -> Option<f64> {
    s.map(|s| s.median)
}

/// The sum over both families, when both were measured.
fn both(bytes: &PerFamily<Option<u64>>) -> Option<u64> {
    Some(bytes.ipv4? + bytes.ipv6?)
}

/// The memory of `maps` together; none when one is missing (a renamed map shows as a
/// gap, not as a smaller table).
fn sum_of_maps(per_map: &BTreeMap<String, u64>, maps: &[&str]) -> Option<u64> {
    maps.iter().map(|name| per_map.get(*name).copied()).sum()
}

/// What a filter adds to a packet end to end, from the medians of its bursts and of the
/// paired no-filter bursts: 1e9/pps − 1e9/pps no filter. Noise can make it negative.
fn e2e_ns_per_packet(e2e: &[E2eRow], size: usize, filter: &str) -> Option<f64> {
    let row = e2e.iter().filter_map(E2eRow::figures).find(|f| {
        f.size == size && f.filter == filter && same_hit_rate(f.hit_rate, E2E_HIT_RATE)
    })?;
    let (pps, no_filter) = (row.pps?.median, row.paired_no_filter_pps?.median);
    (pps > 0.0 && no_filter > 0.0).then(|| 1e9 / pps - 1e9 / no_filter)
}

/// ipset's own figure for both sets, read after the last reload. None when its load or
/// reload failed: the sets left behind are not the policy's.
fn ipset_bytes(control: &[ControlRow], size: usize) -> Option<u64> {
    control.iter().find_map(|row| match row {
        ControlRow::Ipset {
            common,
            ipset_size_in_memory_bytes,
        } if common.size == size && common.error.is_none() => *ipset_size_in_memory_bytes,
        _ => None,
    })
}

/// The memory cgroup's median growth over nft's load of both sets. None when its load or
/// reload failed (as for ipset), or when the median shrank (other memory was freed
/// meanwhile: no figure).
fn nft_bytes(control: &[ControlRow], size: usize) -> Option<u64> {
    control.iter().find_map(|row| match row {
        ControlRow::Nft { common, .. } if common.size == size && common.error.is_none() => {
            let grown = common.memcg_bytes?.median;
            (grown >= 0.0).then(|| grown.round() as u64)
        }
        _ => None,
    })
}

/// The section: one line per size and family.
pub(crate) fn print_tables_compared(r: &Report) {
    println!(
        "\n== 7. Tables compared: the real prefix mix, per size and family (medians; – = no figure)\n   \
         kernel: datafence = its region tables' memlock (v4 {}, v6 {}: the arrays of the\n   \
         policy in force, after its first load); LPM trie = its memlock once filled (leaves only: intermediate\n   \
         nodes are not counted); ipset = its \"Size in memory\", nft = the memory cgroup's\n   \
         growth over its load ({}): both over their v4 and v6 sets at once, so on v4+v6 lines only\n   \
         ns/lookup: cold, random addresses inside the prefixes (section 1b); none exists for ipset or nft\n   \
         e2e ns/pkt: end to end per packet, not per lookup: 1e9/pps − 1e9/pps of the paired\n   \
         no-filter bursts at {:.0}% hits (section 2), IPv4 traffic only; datafence's no-filter\n   \
         bursts run without its TC program, nft's and ipset's keep their hook and lose only the rule",
        DATAFENCE_V4_TABLES.join("+"),
        DATAFENCE_V6_TABLES.join("+"),
        r.memory_cgroup,
        E2E_HIT_RATE * 100.0,
    );
    println!(
        "{:>5} {:<5} | {:<31} | {:<20} | {:<21} | {:<21}",
        "", "", "datafence region tables", "kernel LPM trie", "iptables + ipset", "nftables set"
    );
    println!(
        "{:>5} {:<5} | {:>10} {:>9} {:>10} | {:>10} {:>9} | {:>10} {:>10} | {:>10} {:>10}",
        "size",
        "fam",
        "kernel",
        "ns/lookup",
        "e2e ns/pkt",
        "kernel",
        "ns/lookup",
        "kernel",
        "e2e ns/pkt",
        "kernel",
        "e2e ns/pkt"
    );
    for row in &r.tables_compared {
        let family = match row.family.as_str() {
            "ipv4" => "v4",
            "ipv6" => "v6",
            _ => "v4+v6",
        };
        println!(
            "{:>5} {family:<5} | {:>10} {:>9} {:>10} | {:>10} {:>9} | {:>10} {:>10} | {:>10} {:>10}",
            human_size(row.size),
            show_bytes(row.datafence.kernel_bytes),
            show_ns(row.datafence.cold_ns_per_lookup),
            show_ns(row.datafence.e2e_ns_per_packet),
            show_bytes(row.lpm_trie.kernel_bytes),
            show_ns(row.lpm_trie.cold_ns_per_lookup),
            show_bytes(row.ipset.kernel_bytes),
            show_ns(row.ipset.e2e_ns_per_packet),
            show_bytes(row.nft.kernel_bytes),
            show_ns(row.nft.e2e_ns_per_packet),
        );
    }
}

/// "812 B", "3.4 KiB", "41.2 MiB"; "–" when missing. The sizes span five orders of
/// magnitude, so one fixed unit would print zeros or long numbers.
fn show_bytes(bytes: Option<u64>) -> String {
    const KIB: f64 = 1024.0;
    match bytes {
        None => "–".into(),
        Some(b) if b < 1024 => format!("{b} B"),
        Some(b) if (b as f64) < KIB * KIB => format!("{:.1} KiB", b as f64 / KIB),
        Some(b) => format!("{:.1} MiB", mib(b as f64)),
    }
}

fn show_ns(ns: Option<f64>) -> String {
    ns.map_or_else(|| "–".into(), |ns| format!("{ns:.1}"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn e2e_row(filter: &str, hit_rate: f64, pps: f64, no_filter: f64) -> E2eRow {
        let summary = |median| Summary {
            median,
            min: median,
            max: median,
            n: 3,
        };
        E2eRow::Measured(E2eFigures {
            size: 10,
            filter: filter.to_owned(),
            hit_rate,
            pps: Some(summary(pps)),
            paired_no_filter_pps: Some(summary(no_filter)),
            vs_paired_no_filter: None,
            delivered_fraction: 1.0,
            refused_by_sendmmsg_fraction: 0.0,
            setup: None,
        })
    }

    /// 1 Mpps against 2 Mpps without the filter: 1000 ns less 500 ns per packet, read at
    /// no hits only.
    #[test]
    fn the_end_to_end_cost_is_the_time_a_packet_takes_beyond_no_filter() {
        let rows = [
            e2e_row(E2E_NFT, 0.1, 4e5, 2e6),
            e2e_row(E2E_NFT, 0.0, 1e6, 2e6),
        ];
        assert_eq!(e2e_ns_per_packet(&rows, 10, E2E_NFT), Some(500.0));
        assert_eq!(e2e_ns_per_packet(&rows, 10, E2E_IPSET), None);
        assert_eq!(e2e_ns_per_packet(&rows, 1000, E2E_NFT), None);
    }

    #[test]
    fn a_missing_map_leaves_a_gap_rather_than_a_smaller_table() {
        let per_map = BTreeMap::from([
            ("V4_INDEX".to_owned(), 4096),
            ("V4_RANGES".to_owned(), 8192),
        ]);
        assert_eq!(sum_of_maps(&per_map, &DATAFENCE_V4_TABLES), Some(12_288));
        assert_eq!(sum_of_maps(&per_map, &DATAFENCE_V6_TABLES), None);
    }

    #[test]
    fn a_row_keeps_every_implementation_and_figure_as_a_key() {
        let row = TablesComparedRow {
            size: 10,
            family: "ipv4".into(),
            datafence: memory_only(Some(4096)),
            lpm_trie: TableFigures::default(),
            ipset: TableFigures::default(),
            nft: TableFigures::default(),
        };
        let none =
            json!({"kernel_bytes": null, "cold_ns_per_lookup": null, "e2e_ns_per_packet": null});
        assert_eq!(
            serde_json::to_value(&row).expect("serialize"),
            json!({
                "size": 10,
                "family": "ipv4",
                "datafence": {"kernel_bytes": 4096, "cold_ns_per_lookup": null, "e2e_ns_per_packet": null},
                "lpm_trie": none,
                "ipset": none,
                "nft": none,
            })
        );
    }
}
