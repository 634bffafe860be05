//! Violation reports: events from the kernel's ring buffer become JSON lines, folded
//! per flow, written to stdout and optionally a rotated file, and counted for metrics.
#![forbid(unsafe_code)]

use std::{sync::Arc, time::SystemTime};

use anyhow::Context as _;
use aya::maps::{MapData, RingBuf};
use datafence_common::{Hook, Reason, Verdict, ViolationEvent, stat};
use serde::Serialize;
use tracing::warn;

use super::{ReportOptions, Shared, core::RECENT_VIOLATIONS, lock, rfc3339};
use crate::{
    cgroups::CgroupNames,
    generations::Generations,
    liveness::{self, Liveness, Loop},
    report::{self, FlowKey, Folder, RotatingFile, ViolationRecord},
};

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// A violation event as a report line, named after the generation that judged it.
fn record(
    generations: &Generations,
    ev: &ViolationEvent,
    host: &str,
    cgroups: &mut CgroupNames,
    host_netns: Option<u64>,
) -> ViolationRecord {
    let verdict = Verdict::from_u8(ev.verdict).unwrap_or(Verdict::Deny);
    let judged = generations.judge(ev.policy_generation, ev.class, ev.region);
    ViolationRecord {
        time: rfc3339(SystemTime::now()),
        host: host.to_owned(),
        interface: crate::metrics::interface_label(ev.ifindex),
        hook: Hook::from_u8(ev.hook).map_or("unknown", Hook::as_str),
        class: judged.class,
        region: judged.region,
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
        policy_sha256: judged.sha256,
        policy_generation: ev.policy_generation,
        class_id: ev.class,
        region_id: ev.region,
        note: judged.note,
        count: 1,
        bytes: u64::from(ev.packet_len),
        repeat: false,
        caller: report::Caller::of(ev, host_netns),
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

pub(super) async fn report_violations(
    shared: Shared,
    ring: RingBuf<MapData>,
    opts: ReportOptions,
    live: Arc<Liveness>,
) -> anyhow::Result<()> {
    let mut fd = crate::sys::readable_ring(ring).context("watching the event ring buffer")?;
    let host = hostname();
    let host_netns = crate::sys::own_netns_cookie()
        .inspect_err(|e| warn!(error = %e, "cannot read this network namespace's cookie: socket-ring violations will all say `container`"))
        .ok();
    let (cgroup_root, counters) = tokio::task::block_in_place(|| {
        let agent = lock(&shared);
        (agent.opts.cgroup_root.clone(), agent.counters.clone())
    });
    let mut cgroups = CgroupNames::new(cgroup_root);
    let mut folder = Folder::new(opts.fold_interval);
    let writer = ReportWriter::spawn(&opts)?;
    let mut flush = tokio::time::interval(folder.interval().min(liveness::EVENTS_TICK));
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
                // The lock only for a copy of the generations' names: taken after the
                // events were read, it waits out a reload in progress, so every
                // generation the batch carries is named in the copy. A batch can be a
                // whole ring (thousands of events): labelling it under the lock would
                // stall reloads, status and scrapes for as long.
                let generations = tokio::task::block_in_place(|| lock(&shared).generations.clone());
                let mut recent = std::collections::VecDeque::with_capacity(RECENT_VIOLATIONS);
                for ev in &events {
                    let record = folder.observe(FlowKey::of(ev), now, || record(&generations, ev, &host, &mut cgroups, host_netns));
                    let judged = generations.judge(ev.policy_generation, ev.class, ev.region);
                    let verdict = Verdict::from_u8(ev.verdict).map_or("unknown", Verdict::as_str);
                    counters.count_violation(&judged.class, &judged.region, verdict);
                    if let Some(r) = record
                        && let Ok(line) = serde_json::to_string(&r)
                    {
                        if recent.len() == RECENT_VIOLATIONS {
                            recent.pop_front();
                        }
                        recent.push_back(r);
                        counters.report_lines.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        writer.write(line);
                    }
                }
                let recent: Vec<serde_json::Value> =
                    recent.iter().filter_map(|r| serde_json::to_value(r).ok()).collect();
                tokio::task::block_in_place(|| lock(&shared).remember(recent));
                live.beat(Loop::Events);
            }
            _ = flush.tick() => {
                // The agent's lock is what the reader needs for every batch: showing it
                // can be taken is the reader's proof of life when no events come.
                tokio::task::block_in_place(|| drop(lock(&shared)));
                live.beat(Loop::Events);
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
                let stats = tokio::task::block_in_place(|| lock(&shared).datapath.stats());
                let dropped = writer.dropped.load(std::sync::atomic::Ordering::Relaxed);
                if let Ok(stats) = stats
                    && let (suppressed, lost) = (stats.get(stat::EVENTS_SUPPRESSED), stats.get(stat::EVENTS_LOST))
                    && (suppressed, lost, dropped) != (seen_suppressed, seen_lost, seen_dropped)
                {
                    let line = Unreported {
                        time,
                        host: host.clone(),
                        event: "violations_unreported",
                        suppressed: suppressed - seen_suppressed.min(suppressed),
                        lost: lost - seen_lost.min(lost),
                        dropped_lines: dropped - seen_dropped,
                    };
                    (seen_suppressed, seen_lost, seen_dropped) = (suppressed, lost, dropped);
                    if let Ok(line) = serde_json::to_string(&line) {
                        writer.write(line);
                    }
                }
            }
        }
    }
}
