//! `datafence status`: what the running agent reports, or, with none running, what the
//! kernel keeps enforcing from the pins.
#![forbid(unsafe_code)]

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, bail};
use datafence::{
    control::{self, SocketRingStatus, StatusReport},
    dirs,
};
use datafence_common::stat;

use super::Cli;

/// Prints the addressed agent's status, or the pinned enforcement's when none runs.
pub(crate) fn status(cli: &Cli, json: bool, pin_dir: Option<&Path>) -> anyhow::Result<ExitCode> {
    let address = control::Address::resolve(cli.runtime_dir.as_deref(), pin_dir);
    let status = match address.live_agent()? {
        Some((_, status)) => status,
        None => status_from_pins(&address)?,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&status)?);
    } else {
        print_status(&status);
    }
    Ok(ExitCode::SUCCESS)
}

/// A clsact filter needs no pin: an agent without pins that crashed leaves it attached.
/// Its judge stage does not survive (the stage array had no pin, and the kernel empties a
/// program array when its last holder goes), so status must not claim it enforces, nor
/// that nothing is there.
fn bail_on_unpinned_filters() -> anyhow::Result<()> {
    let filters = datafence::clsact::datafence_filters().unwrap_or_default();
    if !filters.is_empty() {
        let on: Vec<&str> = filters.iter().map(|f| f.interface.as_str()).collect();
        bail!(
            "the agent is not running and pinned nothing; datafence's clsact filter is still attached on {} but judges nothing (an agent without pins cannot keep its judge stage past its exit); `datafence detach` removes it",
            on.join(", ")
        );
    }
    Ok(())
}

/// The status of the enforcement the kernel keeps while no agent runs, from the pinned
/// maps and the names the last agent recorded in its runtime directory.
fn status_from_pins(address: &control::Address) -> anyhow::Result<StatusReport> {
    let state = address
        .runtime_dir
        .as_deref()
        .and_then(|r| control::read_state(r).ok());
    let pin_dir = match (&address.pin_dir, &state) {
        (Some(p), _) => p.clone(),
        (None, Some(s)) => {
            let Some(p) = &s.pin_dir else {
                bail_on_unpinned_filters()?;
                bail!("the agent is not running, and it pinned nothing: nothing is enforced")
            };
            PathBuf::from(p)
        }
        (None, None) => PathBuf::from(dirs::PIN_DIR),
    };
    let layout = datafence::datapath::PinLayout::new(&pin_dir);
    if !layout.exists() {
        bail_on_unpinned_filters()?;
        bail!(
            "no agent is running and nothing is pinned under {}: nothing is enforced",
            pin_dir.display()
        );
    }
    let state = state.filter(|s| {
        s.pin_dir
            .as_deref()
            .is_some_and(|p| control::same_path(Path::new(p), &pin_dir))
    });
    let mut notes = Vec::new();
    if state.is_none() {
        notes.push(format!(
            "no agent state for these pins{}: classes and regions are shown by number",
            address
                .runtime_dir
                .as_ref()
                .map(|r| format!(" in {}", r.display()))
                .unwrap_or_default()
        ));
    }
    let state = state.unwrap_or_default();
    let pinned = layout.read()?;
    let by_number = !notes.is_empty();
    let class = |id: u8| {
        let name = state.classes.iter().find(|(i, _)| *i == id);
        name.map(|(_, n)| n.clone())
            .or_else(|| by_number.then(|| format!("#{id}")))
    };
    let region = |id: u16| {
        let name = state.regions.iter().find(|(i, _)| *i == id);
        name.map(|(_, n)| n.clone())
            .or_else(|| by_number.then(|| format!("#{id}")))
    };
    let mut report = StatusReport {
        agent_running: false,
        pin_dir: Some(pin_dir.display().to_string()),
        notes,
        attachments: attachments_in_kernel(&pinned.links)?,
        kernel: datafence::kernel::KernelFeatures::probe(),
        policy: state.policy.clone(),
        events_lost: pinned.stats.get(stat::EVENTS_LOST),
        events_suppressed: pinned.stats.get(stat::EVENTS_SUPPRESSED),
        socket_ring: pinned_socket_ring(&layout),
        ..Default::default()
    };
    report.policy.generation = pinned.generation;
    let labelled = pinned.counters.iter().map(|(key, value)| {
        let labels = datafence::metrics::verdict_labels(
            key,
            datafence::metrics::interface_label,
            class,
            region,
        );
        (labels, *value)
    });
    (report.counters, report.totals) = control::counter_table(labelled);
    Ok(report)
}

/// The attachments that enforce while no agent runs, as the kernel has them: the tcx and
/// XDP links pinned under the pin directory (named `<hook>-<interface>`), and the clsact
/// filters datafence attached in this network namespace.
fn attachments_in_kernel(pinned_links: &[String]) -> anyhow::Result<Vec<control::Attachment>> {
    let tc = datafence_common::Hook::TcEgress.as_str();
    let mut out: Vec<control::Attachment> = pinned_links
        .iter()
        .filter_map(|name| {
            let (hook, interface) = datafence::datapath::parse_link_name(name)?;
            Some(control::Attachment {
                interface,
                hook: hook.to_owned(),
                kind: if hook == tc { "tcx" } else { "xdp" }.to_owned(),
                programs_ahead: Vec::new(),
            })
        })
        .collect();
    let filters = datafence::clsact::datafence_filters().context("listing clsact filters")?;
    for f in filters {
        out.push(control::Attachment {
            interface: f.interface,
            hook: tc.to_owned(),
            kind: datafence::datapath::TcKind::Clsact.as_str().to_owned(),
            programs_ahead: Vec::new(),
        });
    }
    out.sort_by(|a, b| (&a.interface, &a.hook).cmp(&(&b.interface, &b.hook)));
    out.dedup_by(|a, b| a.interface == b.interface && a.hook == b.hook && a.kind == b.kind);
    Ok(out)
}

/// The socket ring as its pins show it while no agent runs: its links keep it attached.
fn pinned_socket_ring(layout: &datafence::datapath::PinLayout) -> SocketRingStatus {
    let links = std::fs::read_dir(layout.socket_links_dir()).map_or(0, Iterator::count);
    if links == 0 {
        SocketRingStatus::off()
    } else {
        SocketRingStatus::attached(None)
    }
}

fn print_status(s: &StatusReport) {
    if !s.agent_running {
        println!(
            "AGENT NOT RUNNING: the kernel keeps enforcing the last policy (read from its pinned state)"
        );
    }
    for note in &s.notes {
        println!("note: {note}");
    }
    println!(
        "policy   {} (version {}, generation {})",
        s.policy.path, s.policy.version, s.policy.generation
    );
    println!("sha256   {}", s.policy.sha256);
    println!("loaded   {}", s.policy.loaded_at);
    println!("attached:");
    for a in &s.attachments {
        match a.programs_ahead.as_slice() {
            [] => println!("  {:<16} {:<10} {}", a.interface, a.hook, a.kind),
            ids => println!(
                "  {:<16} {:<10} {}   WARNING: programs ahead of datafence (ids {}) could pass packets it never judges",
                a.interface,
                a.hook,
                a.kind,
                ids.iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    let ring = &s.socket_ring;
    match (ring.state.as_str(), &ring.cgroup, &ring.error) {
        ("", ..) => {}
        (state, Some(cgroup), Some(error)) => println!(
            "socket ring {} at {cgroup}: {error}; the packet ring enforces alone",
            state.to_uppercase()
        ),
        (state, Some(cgroup), None) => println!("socket ring {state} at {cgroup}"),
        (state, None, _) => println!("socket ring {state}"),
    }
    print_kernel(&s.kernel);
    println!(
        "totals   allow {}  deny {}  audit {}   events lost {}  suppressed {}",
        s.totals.allow, s.totals.deny, s.totals.audit, s.events_lost, s.events_suppressed
    );
    println!(
        "{:<12} {:<9} {:<16} {:<12} {:<7} {:<22} {:>10} {:>12}",
        "INTERFACE", "HOOK", "CLASS", "REGION", "VERDICT", "REASON", "PACKETS", "BYTES"
    );
    for r in &s.counters {
        println!(
            "{:<12} {:<9} {:<16} {:<12} {:<7} {:<22} {:>10} {:>12}",
            r.labels.interface,
            r.labels.hook,
            r.labels.class,
            r.labels.region,
            r.labels.verdict,
            r.labels.reason,
            r.packets,
            r.bytes
        );
    }
    if !s.map_memory_bytes.is_empty() {
        let total: u64 = s.map_memory_bytes.values().sum();
        let mut top: Vec<_> = s.map_memory_bytes.iter().collect();
        top.sort_by_key(|(_, b)| std::cmp::Reverse(**b));
        let parts: Vec<String> = top
            .iter()
            .take(4)
            .map(|(m, b)| format!("{m} {:.1} MiB", **b as f64 / 1_048_576.0))
            .collect();
        println!(
            "kernel memory {:.1} MiB ({})",
            total as f64 / 1_048_576.0,
            parts.join(", ")
        );
    }
    if !s.recent_violations.is_empty() {
        println!("recent violations (newest last):");
        for v in &s.recent_violations {
            let text = |k: &str| v[k].as_str().unwrap_or("-").to_owned();
            println!(
                "  {} {} {} {} -> {}:{} class {} region {} ({}) cgroup {} x{}",
                text("time"),
                text("verdict"),
                text("protocol"),
                text("src"),
                text("dst"),
                v["dst_port"],
                text("class"),
                text("region"),
                text("reason"),
                text("cgroup"),
                v["count"]
            );
        }
    }
}

fn print_kernel(k: &datafence::kernel::KernelFeatures) {
    if k.features.is_empty() {
        return;
    }
    let list = |keep: &dyn Fn(&datafence::kernel::Feature) -> bool| -> Vec<String> {
        k.features
            .iter()
            .filter(|f| keep(f))
            .map(|f| format!("{} ({}+)", f.name, f.since))
            .collect()
    };
    println!("kernel   {}", k.release);
    println!("  has     {}", list(&|f| f.available).join(", "));
    let missing = list(&|f| !f.available && f.probe_error.is_none());
    if !missing.is_empty() {
        println!("  lacks   {}", missing.join(", "));
    }
    let unknown = list(&|f| f.probe_error.is_some());
    if !unknown.is_empty() {
        println!("  unknown {} (not permitted to ask)", unknown.join(", "));
    }
}
