//! Violation reports: one JSON line per deny or audit verdict, with repeats of a flow
//! folded so that a flood costs a few lines per second rather than one per packet.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    time::{Duration, Instant},
};

use datafence_common::{FAMILY_V4, Hook, ViolationEvent};
use serde::Serialize;

/// Repeats of a flow within this interval are folded into one line with a count.
pub const DEFAULT_FOLD_INTERVAL: Duration = Duration::from_secs(10);
/// Flows tracked for folding. Past this, new flows are still reported at once but their
/// repeats are not folded, so memory stays bounded under a scan.
const MAX_TRACKED_FLOWS: usize = 65_536;

/// A violation, as one JSON log line. Field names are a contract (docs/metrics.md).
#[derive(Clone, Debug, Serialize)]
pub struct ViolationRecord {
    pub time: String,
    pub host: String,
    pub interface: String,
    pub hook: &'static str,
    pub class: String,
    pub region: String,
    pub verdict: &'static str,
    pub mode: &'static str,
    pub reason: &'static str,
    pub protocol: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    /// The sending process's cgroup path, or its id when the path is unknown; empty for
    /// forwarded traffic, which has no socket.
    pub cgroup: String,
    pub cgroup_id: u64,
    pub packet_len: u32,
    /// The policy that judged the packet: its SHA-256 and generation. `class` and
    /// `region` are that policy's names.
    pub policy_sha256: String,
    pub policy_generation: u32,
    /// The datapath's numbers for the class and region.
    pub class_id: u8,
    pub region_id: u16,
    /// Set when the generation is no longer known to the agent: `class`, `region` and
    /// `policy_sha256` are then `unknown`, and only the numbers tell.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Packets this line stands for: 1 for the first packet of a flow, more for a line
    /// that folds the repeats seen since.
    pub count: u64,
    /// Bytes of the packets this line stands for.
    pub bytes: u64,
    /// Set on lines that fold repeats.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub repeat: bool,
    /// The process whose call the socket ring judged (its pid and name); absent for
    /// packets, which no process is known to have sent.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub caller: Option<Caller>,
}

/// The process behind a socket-ring verdict.
#[derive(Clone, Debug, Serialize)]
pub struct Caller {
    pub pid: u32,
    pub comm: String,
    /// `host` when the socket is in the agent's network namespace, else `container`.
    pub netns: &'static str,
    pub netns_cookie: u64,
}

impl Caller {
    /// The caller an event names, if it is a socket-ring event (only those programs
    /// write these fields); `host_netns` is the agent's own namespace cookie.
    pub fn of(ev: &ViolationEvent, host_netns: Option<u64>) -> Option<Self> {
        if !matches!(
            Hook::from_u8(ev.hook),
            Some(Hook::SockConnect | Hook::SockSendmsg)
        ) {
            return None;
        }
        let end = ev
            .comm
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(ev.comm.len());
        Some(Self {
            pid: ev.pid,
            comm: String::from_utf8_lossy(&ev.comm[..end]).into_owned(),
            netns: if host_netns == Some(ev.netns_cookie) {
                "host"
            } else {
                "container"
            },
            netns_cookie: ev.netns_cookie,
        })
    }
}

pub fn protocol_name(protocol: u8) -> String {
    datafence_common::protocols::name(protocol).map_or_else(|| protocol.to_string(), Into::into)
}

pub fn event_addr(family: u8, bytes: &[u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    }
}

/// What makes two events "the same flow". The policy generation is part of it: class
/// and region ids mean different things in different generations, and a folded line
/// carries the names of the generation that judged its packets.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct FlowKey {
    generation: u32,
    ifindex: u32,
    hook: u8,
    class: u8,
    region: u16,
    verdict: u8,
    reason: u8,
    protocol: u8,
    src: [u8; 16],
    dst: [u8; 16],
    src_port: u16,
    dst_port: u16,
    cgroup_id: u64,
    pid: u32,
    netns_cookie: u64,
}

impl FlowKey {
    pub fn of(ev: &ViolationEvent) -> Self {
        Self {
            generation: ev.policy_generation,
            ifindex: ev.ifindex,
            hook: ev.hook,
            class: ev.class,
            region: ev.region,
            verdict: ev.verdict,
            reason: ev.reason,
            protocol: ev.protocol,
            src: ev.src_addr,
            dst: ev.dst_addr,
            src_port: ev.src_port,
            dst_port: ev.dst_port,
            cgroup_id: ev.cgroup_id,
            pid: ev.pid,
            netns_cookie: ev.netns_cookie,
        }
    }
}

struct Folded {
    /// The record of the flow's first packet, reused for its repeat lines.
    record: ViolationRecord,
    repeats: u64,
    repeat_bytes: u64,
    last_seen: Instant,
}

/// Folds repeats of a flow. `observe` says whether an event must be written now;
/// `flush` yields the folded lines that are due.
pub struct Folder {
    interval: Duration,
    flows: HashMap<FlowKey, Folded>,
}

impl Folder {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            flows: HashMap::new(),
        }
    }

    /// Returns the record to write now (the flow's first packet), or `None` when the
    /// event was folded into a later line.
    pub fn observe(
        &mut self,
        key: FlowKey,
        now: Instant,
        make: impl FnOnce() -> ViolationRecord,
    ) -> Option<ViolationRecord> {
        if let Some(f) = self.flows.get_mut(&key) {
            f.repeats += 1;
            f.repeat_bytes += u64::from(f.record.packet_len);
            f.last_seen = now;
            return None;
        }
        let record = make();
        if self.flows.len() < MAX_TRACKED_FLOWS {
            self.flows.insert(
                key,
                Folded {
                    record: record.clone(),
                    repeats: 0,
                    repeat_bytes: 0,
                    last_seen: now,
                },
            );
        }
        Some(record)
    }

    /// Lines for flows with repeats since their last line; forgets flows quiet for a
    /// whole interval, so their next packet is reported at once again.
    pub fn flush(&mut self, now: Instant, time: &str) -> Vec<ViolationRecord> {
        let mut out = Vec::new();
        let interval = self.interval;
        self.flows.retain(|_, f| {
            if f.repeats > 0 {
                let mut line = f.record.clone();
                time.clone_into(&mut line.time);
                line.count = f.repeats;
                line.bytes = f.repeat_bytes;
                line.repeat = true;
                out.push(line);
                f.repeats = 0;
                f.repeat_bytes = 0;
            }
            now.duration_since(f.last_seen) < interval
        });
        out
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }
}

/// Appends lines to a file, rotating it when it passes a size: `PATH` → `PATH.1` → ...
/// → `PATH.<keep>`, the oldest dropped.
pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: File,
    written: u64,
}

impl RotatingFile {
    pub fn open(path: PathBuf, max_bytes: u64, keep: u32) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let written = file.metadata()?.len();
        Ok(Self {
            path,
            max_bytes,
            keep,
            file,
            written,
        })
    }

    pub fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        if self.written > 0 && self.written + line.len() as u64 + 1 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(line.as_bytes())?;
        self.file.write_all(b"\n")?;
        self.written += line.len() as u64 + 1;
        Ok(())
    }

    fn rotated(&self, n: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!(".{n}"));
        PathBuf::from(p)
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        for n in (1..self.keep).rev() {
            let from = self.rotated(n);
            if from.exists() {
                std::fs::rename(&from, self.rotated(n + 1))?;
            }
        }
        if self.keep > 0 {
            std::fs::rename(&self.path, self.rotated(1))?;
        } else {
            std::fs::remove_file(&self.path)?;
        }
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.written = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafence_common::{Reason, Verdict};

    fn event(dst_port: u16) -> ViolationEvent {
        ViolationEvent {
            timestamp_ns: 1,
            cgroup_id: 7,
            src_addr: [192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst_addr: [203, 0, 113, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ifindex: 2,
            packet_len: 100,
            policy_generation: 1,
            region: 3,
            class: 0,
            verdict: Verdict::Deny as u8,
            reason: Reason::RegionDenied as u8,
            hook: 0,
            family: FAMILY_V4,
            protocol: 17,
            src_port: 40000,
            dst_port,
            netns_cookie: 0,
            pid: 0,
            comm: [0; 16],
            _pad: 0,
        }
    }

    fn record(ev: &ViolationEvent) -> ViolationRecord {
        ViolationRecord {
            time: "t0".into(),
            host: "h".into(),
            interface: "eth0".into(),
            hook: "tc_egress",
            class: "user-data".into(),
            region: "us-east".into(),
            verdict: "deny",
            mode: "enforce",
            reason: "region_denied",
            protocol: protocol_name(ev.protocol),
            src: event_addr(ev.family, &ev.src_addr),
            dst: event_addr(ev.family, &ev.dst_addr),
            src_port: ev.src_port,
            dst_port: ev.dst_port,
            cgroup: "/x".into(),
            cgroup_id: ev.cgroup_id,
            packet_len: ev.packet_len,
            policy_sha256: "s".into(),
            policy_generation: ev.policy_generation,
            class_id: ev.class,
            region_id: ev.region,
            note: None,
            count: 1,
            bytes: u64::from(ev.packet_len),
            repeat: false,
            caller: None,
        }
    }

    #[test]
    fn first_packet_is_reported_at_once_and_repeats_are_folded() {
        let mut folder = Folder::new(Duration::from_secs(10));
        let t0 = Instant::now();
        let ev = event(443);
        let mut written = Vec::new();
        for i in 0..1000 {
            let at = t0 + Duration::from_millis(i);
            if let Some(r) = folder.observe(FlowKey::of(&ev), at, || record(&ev)) {
                written.push(r);
            }
        }
        assert_eq!(written.len(), 1, "only the first packet is written at once");
        assert_eq!(written[0].dst, "203.0.113.10".parse::<IpAddr>().unwrap());
        let folded = folder.flush(t0 + Duration::from_secs(1), "t1");
        assert_eq!(folded.len(), 1);
        assert_eq!(folded[0].count, 999);
        assert_eq!(folded[0].bytes, 99_900);
        assert!(folded[0].repeat);
        // Nothing new: nothing to say.
        assert!(folder.flush(t0 + Duration::from_secs(2), "t2").is_empty());
        // Quiet for a whole interval: forgotten, so the next packet is reported at once.
        folder.flush(t0 + Duration::from_secs(12), "t3");
        assert!(
            folder
                .observe(FlowKey::of(&ev), t0 + Duration::from_secs(13), || record(
                    &ev
                ))
                .is_some()
        );
    }

    #[test]
    fn different_flows_are_reported_separately() {
        let mut folder = Folder::new(Duration::from_secs(10));
        let now = Instant::now();
        let (a, b) = (event(443), event(8443));
        assert!(
            folder
                .observe(FlowKey::of(&a), now, || record(&a))
                .is_some()
        );
        assert!(
            folder
                .observe(FlowKey::of(&b), now, || record(&b))
                .is_some()
        );
    }

    #[test]
    fn a_flow_judged_by_two_policy_generations_is_two_flows() {
        let mut folder = Folder::new(Duration::from_secs(10));
        let now = Instant::now();
        let a = event(443);
        let b = ViolationEvent {
            policy_generation: 2,
            ..a
        };
        assert!(
            folder
                .observe(FlowKey::of(&a), now, || record(&a))
                .is_some()
        );
        assert!(
            folder
                .observe(FlowKey::of(&b), now, || record(&b))
                .is_some()
        );
    }

    #[test]
    fn event_record_serialises_with_the_documented_fields() {
        let ev = event(443);
        let v: serde_json::Value = serde_json::to_value(record(&ev)).unwrap();
        for k in [
            "time",
            "host",
            "interface",
            "hook",
            "class",
            "region",
            "verdict",
            "mode",
            "reason",
            "protocol",
            "src",
            "dst",
            "src_port",
            "dst_port",
            "cgroup",
            "cgroup_id",
            "packet_len",
            "policy_sha256",
            "policy_generation",
            "class_id",
            "region_id",
            "count",
            "bytes",
        ] {
            assert!(v.get(k).is_some(), "{k} missing");
        }
        assert_eq!(v["protocol"], "udp");
        assert!(v.get("repeat").is_none());
        assert!(v.get("note").is_none());
    }

    #[test]
    fn event_decoding_rejects_short_records() {
        let ev = event(443);
        let bytes = crate::sys::pod_bytes(&ev);
        assert_eq!(ViolationEvent::from_bytes(bytes), Some(ev));
        assert_eq!(ViolationEvent::from_bytes(&bytes[..10]), None);
    }

    #[test]
    fn a_record_of_a_previous_build_reads_with_no_caller() {
        let ev = ViolationEvent {
            pid: 42,
            comm: *b"python3\0\0\0\0\0\0\0\0\0",
            netns_cookie: 7,
            hook: Hook::SockConnect as u8,
            ..event(443)
        };
        let bytes = crate::sys::pod_bytes(&ev);
        let old = &bytes[..datafence_common::VIOLATION_EVENT_PACKET_BYTES];
        let read = ViolationEvent::from_bytes(old).expect("a packet-ring record");
        assert_eq!((read.pid, read.netns_cookie), (0, 0));
        assert_eq!(read.dst_port, 443);
        // A packet hook's record has no caller, whatever its process fields hold.
        let packet = ViolationEvent {
            hook: Hook::TcEgress as u8,
            ..ev
        };
        assert!(Caller::of(&packet, Some(7)).is_none());
        let caller = Caller::of(&ev, Some(7)).expect("a socket-ring record");
        assert_eq!((caller.pid, caller.comm.as_str()), (42, "python3"));
        assert_eq!(caller.netns, "host");
        assert_eq!(Caller::of(&ev, Some(8)).map(|c| c.netns), Some("container"));
        let line = serde_json::to_value(ViolationRecord {
            caller: Some(caller),
            ..record(&ev)
        })
        .unwrap();
        assert_eq!(line["pid"], 42);
        assert_eq!(line["comm"], "python3");
        assert_eq!(line["netns_cookie"], 7);
    }

    #[test]
    fn file_sink_rotates_by_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("violations.jsonl");
        let mut f = RotatingFile::open(path.clone(), 100, 2).unwrap();
        for i in 0..20 {
            f.write_line(&format!("{{\"n\":{i:>20}}}")).unwrap();
        }
        assert!(path.exists());
        assert!(dir.path().join("violations.jsonl.1").exists());
        assert!(dir.path().join("violations.jsonl.2").exists());
        assert!(!dir.path().join("violations.jsonl.3").exists());
        assert!(std::fs::metadata(&path).unwrap().len() <= 100);
    }
}
