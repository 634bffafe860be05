//! datafence-bench: every performance figure of datafence in one run, side by side.
//!
//! Run through `cargo xtask bench` (which builds it in release mode and runs it as root).
//! Phases, each bounded in time:
//!
//! 1. datapath: `BPF_PROG_TEST_RUN` of the empty TC program (the floor), an LPM-trie-only
//!    program, datafence's full TC and XDP programs over 128 crafted frames (hot), and the
//!    cold-lookup loops (random addresses), at each policy size in two shapes: the real
//!    prefix-length mix of the cloud catalogue and dense host prefixes. Also the control
//!    plane of datafence: parse, compile, load, no-gap reload, kernel memory.
//! 2. e2e: UDP blasted with sendmmsg across a veth pair, through no filter, datafence,
//!    an nftables interval set and iptables + ipset, at several hit rates; and the load and
//!    reload of nft and ipset with the same prefixes.
//! 3. agent: resident memory of `datafence run` at each size, and its CPU while the kernel
//!    raises ~100k violations per second.
//!
//! Every figure is the median over repeated runs, shown with its min–max spread.
//! Everything happens in network namespaces this program creates; nothing is sent
//! anywhere else.
#![allow(
    clippy::wildcard_imports,
    reason = "one program split into files by phase: its modules share one namespace"
)]

use std::{
    collections::{BTreeMap, HashSet},
    fmt::Write as _,
    fs::File,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use datafence::{
    datapath::{BenchProgram, COLD_LOOKUPS_PER_RUN, Datapath, EventLimits, LoadOptions},
    policy::{self, CompiledPolicy},
};
use datafence_common::{DEFAULT_TABLE_CAPACITY, Hook, map_names};
use integration_tests::{
    Scratch,
    frames::{self, Spec},
    netns::{NetNs, Sandbox, command_in},
};
use ipnetwork::{Ipv4Network, Ipv6Network};
use serde_json::Value;

mod args;
mod catalogue;
mod competitors;
mod phase_agent;
mod phase_datapath;
mod phase_e2e;
mod phase_scrape;
mod phase_socket;
mod report;
mod results;
mod stats;
mod sys;
mod tables_compared;

use args::*;
use catalogue::*;
use competitors::*;
use phase_agent::*;
use phase_datapath::*;
use phase_e2e::*;
use phase_scrape::*;
use phase_socket::*;
use report::*;
use results::*;
use stats::*;
use sys::*;
use tables_compared::*;

pub(crate) const USAGE: &str = "\
datafence-bench: datafence's performance, side by side (run as root; see `cargo xtask bench`)

Options:
  --quick              small sizes (10,1k), few rounds, short bursts: a smoke test
  --sizes N,...        policy sizes in prefixes per address family (k/m suffixes);
                       default 10,1k,100k,1m
  --phases P,...       datapath, e2e, agent (default all)
  --out PATH           JSON results (default target/bench/results.json)
  --regions DIR        region files giving the real prefix mix (default policies/regions/cloud)
  --agent-bin PATH     the datafence binary (default: next to this program)
  --budget SECONDS     start no new measurement after this (default 360)
  --rounds N           rounds per datapath figure (default 5; quick 3)
  --repeat N           BPF_PROG_TEST_RUN repeat per frame (default 5000; quick 2000)
  --e2e-seconds S      length of one traffic burst (default 0.5; quick 0.3)
  --load-cap SECONDS   give up an nft/ipset load after this (default 120)
  --commit ID          recorded in the results
";

/// Mark of the user-data class (SO_MARK on the sender).
pub(crate) const USER_MARK: u32 = 0x10;
/// Destinations outside the scaled prefixes, in a region the user-data class may reach:
/// the benchmarking ranges of RFC 2544 and RFC 5180.
pub(crate) const ALLOWED_V4: &str = "198.18.0.0/15";
pub(crate) const ALLOWED_V6: &str = "2001:2::/48";
/// Frames per address family in the hot datapath runs.
pub(crate) const FRAMES_PER_FAMILY: usize = 64;
/// Distinct destinations of the end-to-end traffic.
pub(crate) const E2E_DESTINATIONS: usize = 1024;
/// Messages per sendmmsg call.
pub(crate) const BATCH: usize = 64;
/// Fraction of end-to-end packets the filters drop.
pub(crate) const HIT_RATES: [f64; 2] = [0.0, 0.1];
/// Packets per second of denied traffic while the agent's CPU is sampled.
pub(crate) const VIOLATION_RATE: f64 = 100_000.0;

fn main() {
    if let Ok(kind) = std::env::var(SOCKET_CHILD) {
        if let Err(err) = socket_child(&kind) {
            eprintln!("error: {err:#}");
            std::process::exit(1);
        }
        return;
    }
    let args = match Args::parse() {
        Ok(args) => args,
        Err(err) => {
            eprintln!("error: {err:#}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(err) = run(&args) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

pub(crate) fn run(args: &Args) -> Result<()> {
    if !is_root() {
        bail!("run as root: the benchmark loads eBPF programs and builds network namespaces");
    }
    let budget = Budget {
        start: Instant::now(),
        limit: args.budget,
    };
    let machine = machine();
    println!(
        "datafence-bench  {}\nmachine: {} × {} cores, kernel {}, {:.1} GiB{}",
        if args.quick { "(quick)" } else { "" },
        machine.cpu,
        machine.cores,
        machine.kernel,
        machine.memory_gib,
        args.commit
            .as_ref()
            .map(|c| format!(", commit {c}"))
            .unwrap_or_default(),
    );
    println!(
        "figures: median (min–max) over repeated runs; sizes are prefixes per address family: {}",
        args.sizes
            .iter()
            .map(|n| human_size(*n))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let load_start = loadavg();
    println!("load average at start: {load_start} (other work on the machine skews every figure)");
    let cat = read_catalogue(&args.regions)?;
    let memcg = MemCg::create();
    let mut skipped: Vec<String> = Vec::new();
    let (datapath_rows, kept) = if args.phase("datapath") {
        datapath_phase(&cat, args, &budget, memcg.as_ref(), &mut skipped)
    } else {
        (Vec::new(), Vec::new())
    };

    let sandbox = if args.phase("e2e") || args.phase("agent") {
        Some(e2e_sandbox()?)
    } else {
        None
    };
    let (e2e_rows, control_rows) = match &sandbox {
        Some(sb) if args.phase("e2e") => {
            let setting = E2eSetting {
                sb,
                cat: &cat,
                args,
                budget: &budget,
                memcg: memcg.as_ref(),
            };
            e2e_phase(setting, &kept, &mut skipped)
        }
        _ => (Vec::new(), Vec::new()),
    };
    drop(kept);
    let (agent_rows, catalogue, scraping) = match &sandbox {
        Some(sb) if args.phase("agent") => agent_phase(sb, &cat, args, &budget, &mut skipped),
        _ => (Vec::new(), None, None),
    };
    drop(sandbox);
    let sockets = args.phase("sockets").then(|| {
        eprintln!("[{:>5.0}s] sockets", budget.elapsed().as_secs_f64());
        outcome(socket_phase(&cat, args))
    });

    let mut targets = targets(&datapath_rows);
    targets.extend(other_targets(&datapath_rows, &e2e_rows, &agent_rows));
    if let Some(Outcome::Measured(CatalogueReload {
        reload_s: Some(reload),
        ..
    })) = &catalogue
    {
        let t = reload.median * 1e3;
        targets.push(below(
            "no-gap reload of the cloud catalogue (eu-cloud.yaml) < 200 ms".into(),
            t,
            200.0,
            "ms",
        ));
        targets.push(below(
            "compact tables: no-gap reload of the cloud catalogue < 60 ms".into(),
            t,
            60.0,
            "ms",
        ));
    }
    targets.extend(compact_table_targets(&datapath_rows, &agent_rows));
    let memcg_label = memcg.as_ref().map_or("unavailable", |m| m.label);
    let mut report = Report {
        machine,
        commit: args.commit.clone(),
        quick: args.quick,
        sizes: args.sizes.clone(),
        spread: "min-max over repeated runs; every figure is the median".into(),
        memory_cgroup: memcg_label.into(),
        datapath: datapath_rows.into_iter().map(|c| c.row).collect(),
        e2e: e2e_rows,
        control_plane_other: control_rows,
        agent: agent_rows,
        catalogue_reload: catalogue,
        scrape_interference: scraping,
        sockets,
        tables_compared: Vec::new(),
        targets,
        skipped,
        elapsed_s: budget.elapsed().as_secs_f64(),
        loadavg_start: load_start,
        loadavg_end: loadavg(),
    };
    // Put together from the figures above, so built once they are all in the report.
    report.tables_compared = tables_compared(&report);
    print_report(&report);
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // Through a `Value`, whose keys are sorted: the file stays comparable, line by line,
    // with those of earlier runs.
    let sorted = serde_json::to_value(&report)?;
    std::fs::write(&args.out, serde_json::to_string_pretty(&sorted)?)?;
    println!(
        "\nresults: {} ({:.0}s)",
        args.out.display(),
        budget.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Phase 1 at every shape and size: the rows, and the compiled real-mix policies the
/// end-to-end phase reuses.
fn datapath_phase(
    cat: &Catalogue,
    args: &Args,
    budget: &Budget,
    memcg: Option<&MemCg>,
    skipped: &mut Vec<String>,
) -> (Vec<DatapathCase>, Vec<(usize, Arc<CompiledPolicy>)>) {
    let mut datapath_rows: Vec<DatapathCase> = Vec::new();
    let mut kept: Vec<(usize, Arc<CompiledPolicy>)> = Vec::new();
    for shape in [Shape::Real, Shape::Dense] {
        for &n in &args.sizes {
            if budget.past(0.45) {
                skipped.push(format!(
                    "datapath {} {}: time budget",
                    shape.name(),
                    human_size(n)
                ));
                continue;
            }
            eprintln!(
                "[{:>5.0}s] datapath {} {}",
                budget.elapsed().as_secs_f64(),
                shape.name(),
                human_size(n)
            );
            let row = match datapath_case(cat, shape, n, args, memcg) {
                Ok((figures, keep)) => {
                    if let Some(c) = keep {
                        kept.push((n, c));
                    }
                    DatapathRow::Measured(Box::new(figures))
                }
                Err(e) => DatapathRow::Failed {
                    shape: shape.name().to_owned(),
                    size: n,
                    error: format!("{e:#}"),
                },
            };
            datapath_rows.push(DatapathCase {
                shape,
                size: n,
                row,
            });
        }
    }
    (datapath_rows, kept)
}

/// Phase 2 at every size: the rows per filter, and the competitors' control-plane rows.
fn e2e_phase(
    setting: E2eSetting<'_>,
    kept: &[(usize, Arc<CompiledPolicy>)],
    skipped: &mut Vec<String>,
) -> (Vec<E2eRow>, Vec<ControlRow>) {
    let mut e2e_rows = Vec::new();
    let mut control_rows = Vec::new();
    for &n in &setting.args.sizes {
        if setting.budget.past(0.82) {
            skipped.push(format!("e2e {}: time budget", human_size(n)));
            continue;
        }
        eprintln!(
            "[{:>5.0}s] e2e {}",
            setting.budget.elapsed().as_secs_f64(),
            human_size(n)
        );
        let compiled = kept.iter().find(|(k, _)| *k == n).map(|(_, c)| c.clone());
        let out = E2eRows {
            rows: &mut e2e_rows,
            control: &mut control_rows,
        };
        if let Err(e) = e2e_size(setting, n, compiled, out) {
            e2e_rows.push(E2eRow::Failed {
                size: n,
                filter: None,
                error: format!("{e:#}"),
            });
        }
    }
    (e2e_rows, control_rows)
}

/// Phase 3: the agent at every size, then the catalogue reload and the event reader
/// under scrapes.
fn agent_phase(
    sb: &Sandbox,
    cat: &Catalogue,
    args: &Args,
    budget: &Budget,
    skipped: &mut Vec<String>,
) -> (
    Vec<AgentRow>,
    Option<Outcome<CatalogueReload>>,
    Option<Outcome<ScrapeInterference>>,
) {
    let mut agent_rows = Vec::new();
    let mut catalogue = None;
    let mut scraping = None;
    if args.agent_bin.is_file() {
        for &n in &args.sizes {
            if budget.past(0.97) {
                skipped.push(format!("agent {}: time budget", human_size(n)));
                continue;
            }
            eprintln!(
                "[{:>5.0}s] agent {}",
                budget.elapsed().as_secs_f64(),
                human_size(n)
            );
            agent_rows.push(match agent_size(sb, cat, n, args, budget) {
                Ok(figures) => AgentRow::Measured(figures),
                Err(e) => AgentRow::Failed {
                    size: n,
                    error: format!("{e:#}"),
                },
            });
        }
        if budget.past(0.97) {
            skipped.push("catalogue reload: time budget".into());
        } else {
            eprintln!(
                "[{:>5.0}s] catalogue reload",
                budget.elapsed().as_secs_f64()
            );
            catalogue = Some(outcome(catalogue_reload(sb, args)));
        }
        eprintln!(
            "[{:>5.0}s] event reader under scrapes",
            budget.elapsed().as_secs_f64()
        );
        scraping = Some(outcome(scrape_interference(sb, args)));
    } else {
        skipped.push(format!("agent: no binary at {}", args.agent_bin.display()));
    }
    (agent_rows, catalogue, scraping)
}

fn outcome<T>(result: Result<T>) -> Outcome<T> {
    result.map_or_else(
        |e| Outcome::Failed {
            error: format!("{e:#}"),
        },
        Outcome::Measured,
    )
}
