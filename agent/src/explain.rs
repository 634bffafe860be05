//! `datafence explain`: what the policy does to a packet to a given address, answered in
//! userspace with the datapath's own decision functions, and optionally by the kernel
//! itself through `BPF_PROG_TEST_RUN` on a crafted frame.
#![forbid(unsafe_code)]

mod in_cgroup;

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use datafence_common::{
    CLASS_NONE, ClassMask, CounterKey, FAMILY_V4, Hook, Policy, REGION_NONE, Reason, RegionId,
    Verdict,
    decide::{Decision, PacketFacts, selects_by_packet_only},
    parse::{IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, ParsedFrame, parse_frame},
    socket::{SocketCall, judge_socket_call},
    verdict::{Lookups, judge_frame},
};
use serde::{Deserialize, Serialize};

use crate::{
    cgroups::CgroupPathError,
    datapath::{Datapath, DatapathError, EventLimits, LoadOptions, RegionTables},
    policy::{CompiledPolicy, LoadedPolicy},
};

pub use in_cgroup::TEST_RUN_COMMAND;

/// The traffic to explain, beyond its destination: the packet's selectors, as
/// `datafence explain` takes them on its command line and the control socket carries them.
#[derive(Clone, Debug, Default, Serialize, Deserialize, clap::Args)]
pub struct Query {
    /// Judge the traffic as this data class, skipping classification.
    #[arg(long, conflicts_with_all = ["mark", "cgroup", "dscp"])]
    pub class: Option<String>,
    /// The packet's mark (SO_MARK / fwmark), decimal or 0x-hex.
    #[arg(long, default_value = "0", value_parser = parse_u32)]
    pub mark: u32,
    /// The sending process's cgroup v2 path (as in the policy), e.g.
    /// /system.slice/user-api.service.
    #[arg(long)]
    pub cgroup: Option<String>,
    /// The packet's DSCP (0-63).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=63))]
    pub dscp: u8,
    /// Transport protocol: tcp, udp, sctp, icmp or a number.
    #[arg(long = "proto", default_value = "tcp", value_parser = parse_protocol)]
    pub protocol: u8,
    /// Destination port.
    #[arg(long = "dport", default_value_t = 443)]
    pub dst_port: u16,
    /// Source address (for src_cidrs selectors); default unspecified.
    #[arg(long)]
    pub src: Option<IpAddr>,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|e| format!("{s:?}: {e}"))
}

/// A protocol name from the one table in `datafence_common::protocols`, in any case, or
/// a number.
fn parse_protocol(s: &str) -> Result<u8, String> {
    match datafence_common::protocols::number(s) {
        Some(number) => Ok(number),
        None => s
            .parse()
            .map_err(|_| format!("{s:?}: expected tcp, udp, sctp, icmp, icmpv6 or 0-255")),
    }
}

impl Query {
    pub fn new() -> Self {
        Self {
            protocol: IPPROTO_TCP,
            dst_port: 443,
            ..Self::default()
        }
    }
}

/// One answer; the JSON form is a contract:
/// `{"address", "region", "class", "verdict", "mode", "reason"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Explanation {
    pub address: IpAddr,
    pub region: Option<String>,
    pub class: Option<String>,
    pub verdict: String,
    pub mode: String,
    pub reason: String,
    /// Which exemption, region or rule decided, in words.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// For a deny or audit verdict, the ring that acts first: `socket` when the call
    /// itself (`connect()`, `sendto()`) is refused, `packet` when only its packets are
    /// judged so (a class by mark, DSCP or source, which a call cannot show). Absent for
    /// an allow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    #[error("no class named {0:?} in the policy")]
    UnknownClass(String),
    #[error(
        "--class cannot be used with --datapath: the kernel classifies by the packet; give its selectors (--mark, --cgroup, --dscp, --proto, --dport, --src) instead"
    )]
    ClassWithDatapath,
    #[error("the source address {src} and destination {dst} are of different families")]
    MixedFamilies { src: IpAddr, dst: IpAddr },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Cgroup(#[from] CgroupPathError),
    #[error("running the test packet in cgroup {cgroup}: {detail}")]
    TestRunInCgroup { cgroup: String, detail: String },
    #[error(
        "the kernel's verdict for {address} ({kernel}) differs from userspace's ({userspace}); please report this"
    )]
    Disagreement {
        address: IpAddr,
        kernel: String,
        userspace: String,
    },
}

/// cgroup ids of `path` and each of its ancestors below the root, as the datapath walks
/// them.
fn cgroup_ancestor_ids(cgroup_root: &Path, path: &str) -> Vec<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let mut ids = Vec::new();
    let mut dir = PathBuf::from(cgroup_root);
    if let Ok(m) = std::fs::metadata(&dir) {
        ids.push(m.ino());
    }
    for part in path.split('/').filter(|p| !p.is_empty()) {
        dir.push(part);
        if let Ok(m) = std::fs::metadata(&dir) {
            ids.push(m.ino());
        }
    }
    ids
}

fn cgroup_classes(compiled: &CompiledPolicy, cgroup_root: &Path, path: Option<&str>) -> ClassMask {
    let Some(path) = path else { return 0 };
    let ids = cgroup_ancestor_ids(cgroup_root, path);
    compiled
        .cgroups
        .iter()
        .filter(|(id, _)| ids.contains(id))
        .fold(0, |acc, (_, mask)| acc | mask)
}

/// The userspace answer: the same steps as the datapath's `judge_frame`, on the same
/// compiled policy, with the same decision functions.
pub fn explain(
    policy: &LoadedPolicy,
    compiled: &CompiledPolicy,
    cgroup_root: &Path,
    query: &Query,
    address: IpAddr,
) -> Result<Explanation, ExplainError> {
    let (class, decision, region) = decide(policy, compiled, cgroup_root, query, address)?;
    let ring = (decision.verdict != Verdict::Allow).then(|| {
        let by_socket = socket_ring_stops(policy, compiled, cgroup_root, query, address, class);
        if by_socket { "socket" } else { "packet" }.to_owned()
    });
    let class_name = (class != CLASS_NONE)
        .then(|| policy.class_name(class).map(str::to_owned))
        .flatten();
    let region_name = (region != REGION_NONE)
        .then(|| policy.region_name(region).map(str::to_owned))
        .flatten();
    let mode = policy
        .classes
        .get(usize::from(class))
        .map_or(policy.mode, |c| c.mode);
    let detail = describe(
        policy,
        decision.reason,
        class_name.as_deref(),
        region_name.as_deref(),
        address,
    );
    Ok(Explanation {
        address,
        region: region_name,
        class: class_name,
        verdict: decision.verdict.as_str().to_owned(),
        mode: mode.as_str().to_owned(),
        reason: decision.reason.as_str().to_owned(),
        detail,
        ring,
    })
}

/// Whether the socket ring refuses the call that would send this traffic: judged by the
/// same function as the kernel's socket programs. With `--class`, the class the packet
/// ring judged by (`class`) stands: the socket ring can judge by it unless it selects by
/// what only packets show.
fn socket_ring_stops(
    policy: &LoadedPolicy,
    compiled: &CompiledPolicy,
    cgroup_root: &Path,
    query: &Query,
    address: IpAddr,
    class: u8,
) -> bool {
    if query.class.is_some() {
        return !selects_by_packet_only(&compiled.policy.index, class);
    }
    let call = match address {
        IpAddr::V4(a) => SocketCall::v4(a.octets(), query.protocol, query.dst_port),
        IpAddr::V6(a) => SocketCall::v6(a.octets(), query.protocol, query.dst_port),
    };
    // The packet ring's tables: `judge_socket_call` classifies as a call would.
    let lookups = PolicyLookups {
        policy,
        compiled,
        cgroup_classes: cgroup_classes(compiled, cgroup_root, query.cgroup.as_deref()),
        forced_class: None,
    };
    judge_socket_call(&call, &lookups).decision.verdict != Verdict::Allow
}

/// The policy's own tables for the shared verdict sequence: exemptions and source ranges
/// from the compiled lists, regions scanned from the policy's region lists (not the
/// compiled tables the kernel reads, so that `explain --datapath` checks those).
struct PolicyLookups<'a> {
    policy: &'a LoadedPolicy,
    compiled: &'a CompiledPolicy,
    cgroup_classes: ClassMask,
    /// `--class`: judge as this class, skipping classification.
    forced_class: Option<u8>,
}

fn address_of(family: u8, octets: &[u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::V4(Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(*octets))
    }
}

impl Lookups for PolicyLookups<'_> {
    fn policy(&self) -> Option<(u32, &Policy)> {
        Some((0, &self.compiled.policy))
    }

    fn exempt(&self, _slot: u32, _policy: &Policy, frame: &ParsedFrame) -> bool {
        self.compiled
            .is_exempt(address_of(frame.family, &frame.dst))
    }

    fn cgroup_classes(&self, _slot: u32) -> ClassMask {
        self.cgroup_classes
    }

    fn src_classes(&self, _slot: u32, frame: &ParsedFrame) -> ClassMask {
        self.compiled
            .src_classes(address_of(frame.family, &frame.src))
    }

    fn region(&self, _slot: u32, frame: &ParsedFrame) -> RegionId {
        self.policy.region_of(address_of(frame.family, &frame.dst))
    }

    fn classify(&self, policy: &Policy, facts: &PacketFacts) -> u8 {
        self.forced_class
            .unwrap_or_else(|| datafence_common::decide::classify(policy, facts))
    }
}

/// Runs the shared verdict sequence on the frame `explain --datapath` would hand the
/// kernel, parsed by the kernel's own parser.
fn decide(
    policy: &LoadedPolicy,
    compiled: &CompiledPolicy,
    cgroup_root: &Path,
    query: &Query,
    address: IpAddr,
) -> Result<(u8, Decision, u16), ExplainError> {
    let forced_class = match &query.class {
        Some(name) => Some(
            policy
                .classes
                .iter()
                .find(|c| &c.name == name)
                .map(|c| c.id)
                .ok_or_else(|| ExplainError::UnknownClass(name.clone()))?,
        ),
        None => None,
    };
    let bytes = craft_frame(query, address)?;
    let frame = parse_frame(bytes.as_slice(), 0);
    let lookups = PolicyLookups {
        policy,
        compiled,
        cgroup_classes: cgroup_classes(compiled, cgroup_root, query.cgroup.as_deref()),
        forced_class,
    };
    let j = judge_frame(&frame, query.mark, &lookups);
    Ok((j.class, j.decision, j.region as u16))
}

fn has_ports(protocol: u8) -> bool {
    matches!(protocol, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP)
}

fn unspecified_like(addr: &IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

fn describe(
    policy: &LoadedPolicy,
    reason: Reason,
    class: Option<&str>,
    region: Option<&str>,
    address: IpAddr,
) -> String {
    let class = class.unwrap_or("-");
    let region = region.unwrap_or("-");
    match reason {
        Reason::ExemptBuiltin => {
            format!("{address} is loopback or link-local, which is always allowed")
        }
        Reason::ExemptHostEssential => format!(
            "{address} is link-scope multicast, or DHCP's broadcast or multicast address, which the host's own DHCP, neighbour discovery and link protocols use; allowed unless the policy's host_essentials turns that off"
        ),
        Reason::ExemptPolicy => {
            let by = policy
                .exempt
                .iter()
                .filter(|n| n.contains(address))
                .max_by_key(|n| n.prefix())
                .map_or_else(String::new, |n| format!(" ({n})"));
            format!("{address} is in the policy's exempt list{by}")
        }
        Reason::Unclassified => "the traffic matches no data class".to_owned(),
        Reason::RegionAllowed => format!("class {class} may reach region {region}"),
        Reason::RegionDenied => format!("class {class} may not reach region {region}"),
        Reason::UnknownAllowed => {
            format!("{address} is in no region; class {class} has unknown: allow")
        }
        Reason::UnknownDenied => {
            format!("{address} is in no region; class {class} has unknown: deny")
        }
        other => other.as_str().to_owned(),
    }
}

/// Builds the frame the kernel is asked about: Ethernet, IP with the query's DSCP and
/// source, and a transport header with its destination port.
pub fn craft_frame(query: &Query, address: IpAddr) -> Result<Vec<u8>, ExplainError> {
    let src = query.src.unwrap_or(unspecified_like(&address));
    if src.is_ipv4() != address.is_ipv4() {
        return Err(ExplainError::MixedFamilies { src, dst: address });
    }
    let mut transport = Vec::new();
    transport.extend_from_slice(&40000u16.to_be_bytes());
    transport.extend_from_slice(&query.dst_port.to_be_bytes());
    // Long enough for the fixed part of TCP, UDP and SCTP headers.
    transport.extend_from_slice(&[0u8; 16]);
    if !has_ports(query.protocol) {
        transport = vec![8, 0, 0, 0, 0, 0, 0, 0];
    }
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    match (src, address) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.extend_from_slice(&0x0800u16.to_be_bytes());
            let total = (20 + transport.len()) as u16;
            f.extend_from_slice(&[0x45, query.dscp << 2]);
            f.extend_from_slice(&total.to_be_bytes());
            f.extend_from_slice(&[0, 0, 0, 0, 64, query.protocol, 0, 0]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.extend_from_slice(&0x86ddu16.to_be_bytes());
            let tc = query.dscp << 2;
            f.extend_from_slice(&[0x60 | (tc >> 4), tc << 4, 0, 0]);
            f.extend_from_slice(&(transport.len() as u16).to_be_bytes());
            f.extend_from_slice(&[query.protocol, 64]);
            f.extend_from_slice(&s.octets());
            f.extend_from_slice(&d.octets());
        }
        _ => return Err(ExplainError::MixedFamilies { src, dst: address }),
    }
    f.extend_from_slice(&transport);
    Ok(f)
}

/// A private, unattached copy of the datapath with `compiled` applied, for asking the
/// kernel.
pub struct KernelOracle {
    datapath: Datapath,
    /// Set by [`Self::run_in_query_cgroups`]; otherwise test frames run in this process's
    /// cgroup.
    in_cgroups: Option<in_cgroup::CgroupRunner>,
}

impl KernelOracle {
    pub fn new(compiled: &CompiledPolicy) -> Result<Self, ExplainError> {
        let tables = RegionTables::of(compiled);
        let mut datapath = Datapath::load(&LoadOptions::sized_for(&tables))?;
        datapath.apply_built(compiled, &tables, EventLimits::default())?;
        Ok(Self {
            datapath,
            in_cgroups: None,
        })
    }

    /// Runs each test frame in the cgroup its query names (a path under `cgroup_root`),
    /// from a child process placed there: the kernel gives a test frame the cgroup of the
    /// process that runs it. For the agent, which answers for callers in other cgroups
    /// and cannot move itself. `pin_dir` is a bpffs directory for the entry program's
    /// pin, which the child opens (default /sys/fs/bpf). A query without a cgroup runs in
    /// this process's.
    #[must_use]
    pub fn run_in_query_cgroups(mut self, cgroup_root: PathBuf, pin_dir: Option<PathBuf>) -> Self {
        self.in_cgroups = Some(in_cgroup::CgroupRunner::new(cgroup_root, pin_dir));
        self
    }

    /// A copy loaded once, for asking about many policies in turn ([`Self::apply`]):
    /// loading is the slow part, the verifier's.
    pub fn with_capacity(options: &LoadOptions) -> Result<Self, ExplainError> {
        Ok(Self {
            datapath: Datapath::load(options)?,
            in_cgroups: None,
        })
    }

    /// Puts `compiled` in force in this copy, as a reload would.
    pub fn apply(&mut self, compiled: &CompiledPolicy) -> Result<(), ExplainError> {
        self.datapath.apply(compiled, EventLimits::default())?;
        Ok(())
    }

    /// The kernel's verdict on the crafted frame (`allow`, `deny` or `audit`), read back
    /// from the counter the program bumped.
    pub fn verdict(
        &mut self,
        query: &Query,
        address: IpAddr,
    ) -> Result<(Verdict, Reason), ExplainError> {
        let (key, _) = self.judge(query, address)?;
        let verdict = Verdict::from_u8(key.verdict).unwrap_or(Verdict::Deny);
        let reason = Reason::from_u8(key.reason).unwrap_or(Reason::MalformedDenied);
        Ok((verdict, reason))
    }

    /// The counter the program bumped for the crafted frame (its class, region, verdict
    /// and reason), and whether the program let the frame through.
    pub fn judge(
        &mut self,
        query: &Query,
        address: IpAddr,
    ) -> Result<(CounterKey, bool), ExplainError> {
        let frame = craft_frame(query, address)?;
        let before = self.datapath.counters()?;
        let passed = match (&mut self.in_cgroups, query.cgroup.as_deref()) {
            (Some(runner), Some(cgroup)) => {
                runner.test_run(&mut self.datapath, cgroup, &frame, query.mark)?
            }
            _ => self.datapath.test_run(Hook::TcEgress, &frame, query.mark)?,
        };
        let after = self.datapath.counters()?;
        let _ = self.datapath.drain_events()?;
        let mut moved = after.into_iter().filter(|(k, v)| {
            before
                .iter()
                .find(|(bk, _)| bk == k)
                .is_none_or(|(_, bv)| bv.packets != v.packets)
        });
        let no_counter = || ExplainError::Disagreement {
            address,
            kernel: "no counter moved".to_owned(),
            userspace: String::new(),
        };
        let (key, _) = moved.next().ok_or_else(no_counter)?;
        if moved.next().is_some() {
            return Err(ExplainError::Disagreement {
                address,
                kernel: "more than one counter moved".to_owned(),
                userspace: String::new(),
            });
        }
        Ok((key, passed))
    }
}

/// The userspace answer, checked against the kernel's.
pub fn explain_with_kernel(
    oracle: &mut KernelOracle,
    policy: &LoadedPolicy,
    compiled: &CompiledPolicy,
    cgroup_root: &Path,
    query: &Query,
    address: IpAddr,
) -> Result<Explanation, ExplainError> {
    if query.class.is_some() {
        return Err(ExplainError::ClassWithDatapath);
    }
    let userspace = explain(policy, compiled, cgroup_root, query, address)?;
    let (verdict, reason) = oracle.verdict(query, address)?;
    if verdict.as_str() != userspace.verdict || reason.as_str() != userspace.reason {
        return Err(ExplainError::Disagreement {
            address,
            kernel: format!("{} ({})", verdict.as_str(), reason.as_str()),
            userspace: format!("{} ({})", userspace.verdict, userspace.reason),
        });
    }
    Ok(userspace)
}
