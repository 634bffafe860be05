//! Random policies and packets, judged three ways: by `explain` in userspace, by the real
//! eBPF program through `BPF_PROG_TEST_RUN`, and by the independent model in
//! `integration_tests::reference`. All three must give the same verdict, reason, class
//! and region.
//!
//! Prefixes are drawn from two small address blocks so that prefixes nest, collide with
//! exemptions and source selectors, and sit next to each other far more often than
//! random addresses ever would.

use std::{
    fmt::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use datafence::{
    datapath::LoadOptions,
    explain::{self, Explanation, KernelOracle, Query},
    policy::{self, LoadedPolicy},
};
use datafence_common::{CLASS_NONE, REGION_NONE, Reason, Verdict};
use integration_tests::{
    Scratch,
    reference::{self, Answer, Packet},
    require_root,
};
use ipnetwork::IpNetwork;
use proptest::{
    collection::vec,
    prelude::*,
    sample::{Index, select, subsequence},
    test_runner::{Config, TestCaseError, TestError, TestRunner},
};

/// 198.18.0.0/15 (benchmarking space): 17 host bits.
const V4_BASE: u32 = 0xc612_0000;
const V4_SPACE_LEN: u8 = 15;
/// 2001:db8::/32 (documentation space): 96 host bits.
const V6_BASE: u128 = 0x2001_0db8 << 96;
const V6_SPACE_LEN: u8 = 32;

/// Directories of the fake cgroup2 tree the userspace test resolves cgroups against.
const CGROUP_PATHS: [&str; 6] = ["/a", "/a/b", "/a/b/c", "/a/d", "/e", "/e/f"];

/// `cases`, unless PROPTEST_CASES says otherwise: the kernel matrix's emulated guests run
/// fewer, since each kernel case loads the programs.
fn config(cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        // Failures are reported with their minimal policy and packet; a regression file
        // would land in the source tree, which other work shares.
        failure_persistence: None,
        ..Config::default()
    }
}

fn host_mask(width: u8, len: u8) -> u128 {
    let host = u32::from(width - len);
    if host == 0 {
        0
    } else {
        u128::MAX >> (128 - host)
    }
}

/// An address in `net` with host part `host`.
fn in_net(net: &IpNetwork, host: u128) -> IpAddr {
    match net {
        IpNetwork::V4(n) => {
            let mask = host_mask(32, n.prefix()) as u32;
            IpAddr::V4(Ipv4Addr::from(
                u32::from(n.network()) | (host as u32 & mask),
            ))
        }
        IpNetwork::V6(n) => {
            let mask = host_mask(128, n.prefix());
            IpAddr::V6(Ipv6Addr::from(u128::from(n.network()) | (host & mask)))
        }
    }
}

fn net(addr: IpAddr, len: u8) -> IpNetwork {
    let n = IpNetwork::new(addr, len).expect("prefix length fits the family");
    IpNetwork::new(n.network(), len).expect("same length")
}

fn v4_space() -> IpNetwork {
    net(IpAddr::V4(Ipv4Addr::from(V4_BASE)), V4_SPACE_LEN)
}

fn v6_space() -> IpNetwork {
    net(IpAddr::V6(Ipv6Addr::from(V6_BASE)), V6_SPACE_LEN)
}

/// Host bits for the small blocks: either fully random, or a few bits at one position,
/// which makes prefixes share leading bits and so nest.
fn host_bits() -> impl Strategy<Value = u128> + Clone {
    prop_oneof![
        any::<u128>(),
        (0u128..8, 0u32..125).prop_map(|(v, shift)| v << shift),
    ]
}

fn v4_prefix(lens: std::ops::RangeInclusive<u8>) -> impl Strategy<Value = IpNetwork> {
    (host_bits(), lens).prop_map(|(h, len)| net(in_net(&v4_space(), h), len))
}

fn v6_prefix(lens: std::ops::RangeInclusive<u8>) -> impl Strategy<Value = IpNetwork> {
    (host_bits(), lens).prop_map(|(h, len)| net(in_net(&v6_space(), h), len))
}

#[derive(Clone, Debug)]
struct ClassGen {
    /// Empty lists are selectors the class does not use.
    cgroups: Vec<&'static str>,
    marks: Vec<(u32, u32)>,
    dscp: Vec<u8>,
    protocols: Vec<&'static str>,
    ports: Vec<(u16, u16)>,
    src: Vec<IpNetwork>,
    /// Bit `i`: may reach region `i` (when it exists).
    allow: u8,
    unknown: Option<&'static str>,
    mode: Option<&'static str>,
}

#[derive(Clone, Debug)]
struct PolicyGen {
    mode: Option<&'static str>,
    /// `host_essentials` switches (dhcp, neighbor_discovery, link_multicast); `None`
    /// leaves the key out.
    host_essentials: Option<(bool, bool, bool)>,
    exempt: Vec<IpNetwork>,
    regions: Vec<Vec<IpNetwork>>,
    classes: Vec<ClassGen>,
}

fn port_range() -> impl Strategy<Value = (u16, u16)> {
    prop_oneof![
        6 => (0u16..1024, prop_oneof![Just(0u16), 0u16..64]).prop_map(|(f, span)| (f, f + span)),
        1 => Just((0, u16::MAX)),
        1 => (65_000u16..=u16::MAX).prop_map(|f| (f, u16::MAX)),
    ]
}

fn src_prefix() -> impl Strategy<Value = IpNetwork> {
    prop_oneof![
        6 => v4_prefix(V4_SPACE_LEN..=32),
        6 => v6_prefix(V6_SPACE_LEN..=128),
        // Prefixes holding the unspecified address, which is the source when none is
        // given.
        1 => select(vec!["0.0.0.0/0", "0.0.0.0/8", "::/0", "::/1", "::/128"])
            .prop_map(|s| s.parse().expect("valid prefix")),
    ]
}

fn class_gen(with_cgroups: bool) -> impl Strategy<Value = ClassGen> {
    let mut kinds = vec!["marks", "dscp", "protocols", "dst_ports", "src_cidrs"];
    if with_cgroups {
        kinds.push("cgroups");
    }
    let marks = vec(
        (
            select(vec![0xff_u32, 0xf, 0x3, 0xf0, u32::MAX, 0x100]),
            0u32..0x200,
        )
            .prop_map(|(mask, v)| (v & mask, mask)),
        1..=3,
    );
    let dscp = vec(prop_oneof![3 => 0u8..6, 1 => 0u8..64], 1..=3);
    let protocols = subsequence(vec!["tcp", "udp", "icmp", "sctp", "icmpv6"], 1..=3);
    (
        subsequence(kinds, 1..=3),
        subsequence(CGROUP_PATHS.to_vec(), 1..=2),
        marks,
        dscp,
        protocols,
        vec(port_range(), 1..=3),
        vec(src_prefix(), 1..=3),
        any::<u8>(),
        select(vec![None, Some("allow"), Some("deny")]),
        select(vec![None, Some("enforce"), Some("audit")]),
    )
        .prop_map(
            |(kinds, cgroups, marks, dscp, protocols, ports, src, allow, unknown, mode)| {
                // Values for unused selectors are generated anyway and dropped here, so
                // every class draws from one tuple strategy.
                fn keep<T>(kinds: &[&str], kind: &str, v: Vec<T>) -> Vec<T> {
                    if kinds.contains(&kind) { v } else { Vec::new() }
                }
                ClassGen {
                    cgroups: keep(&kinds, "cgroups", cgroups),
                    marks: keep(&kinds, "marks", marks),
                    dscp: keep(&kinds, "dscp", dscp),
                    protocols: keep(&kinds, "protocols", protocols),
                    ports: keep(&kinds, "dst_ports", ports),
                    src: keep(&kinds, "src_cidrs", src),
                    allow,
                    unknown,
                    mode,
                }
            },
        )
}

fn policy_gen(with_cgroups: bool) -> impl Strategy<Value = PolicyGen> {
    let region = (
        vec(v4_prefix(V4_SPACE_LEN..=32), 1..=6),
        vec(v6_prefix(V6_SPACE_LEN..=128), 1..=6),
    );
    let exempt = vec(prop_oneof![v4_prefix(20..=32), v6_prefix(48..=128)], 0..=2);
    (
        select(vec![None, Some("enforce"), Some("audit")]),
        proptest::option::of(any::<(bool, bool, bool)>()),
        exempt,
        vec(region, 1..=5),
        vec(class_gen(with_cgroups), 1..=4),
    )
        .prop_map(|(mode, host_essentials, exempt, regions, classes)| {
            // Validation refuses one exact prefix in two regions, so the first keeps it.
            let mut seen = std::collections::HashSet::new();
            let regions = regions
                .into_iter()
                .map(|(v4, v6)| {
                    v4.into_iter()
                        .chain(v6)
                        .filter(|n| seen.insert(*n))
                        .collect()
                })
                .collect();
            PolicyGen {
                mode,
                host_essentials,
                exempt,
                regions,
                classes,
            }
        })
}

fn quoted(nets: &[IpNetwork]) -> String {
    let items: Vec<String> = nets.iter().map(|n| format!("\"{n}\"")).collect();
    format!("[{}]", items.join(", "))
}

impl PolicyGen {
    fn to_yaml(&self) -> String {
        let mut y = String::from("version: 1\n");
        if let Some(mode) = self.mode {
            writeln!(y, "mode: {mode}").unwrap();
        }
        if let Some((dhcp, nd, link)) = self.host_essentials {
            writeln!(
                y,
                "host_essentials: {{dhcp: {dhcp}, neighbor_discovery: {nd}, link_multicast: {link}}}"
            )
            .unwrap();
        }
        if !self.exempt.is_empty() {
            writeln!(y, "exempt: {}", quoted(&self.exempt)).unwrap();
        }
        y.push_str("regions:\n");
        for (i, prefixes) in self.regions.iter().enumerate() {
            writeln!(y, "  r{i}:\n    cidrs: {}", quoted(prefixes)).unwrap();
        }
        y.push_str("data_classes:\n");
        for (i, c) in self.classes.iter().enumerate() {
            writeln!(y, "  c{i}:\n    match:").unwrap();
            if !c.cgroups.is_empty() {
                writeln!(y, "      cgroups: [{}]", c.cgroups.join(", ")).unwrap();
            }
            if !c.marks.is_empty() {
                let marks: Vec<String> = c
                    .marks
                    .iter()
                    .map(|(value, mask)| format!("{{value: {value:#x}, mask: {mask:#x}}}"))
                    .collect();
                writeln!(y, "      marks: [{}]", marks.join(", ")).unwrap();
            }
            if !c.dscp.is_empty() {
                writeln!(y, "      dscp: {:?}", c.dscp).unwrap();
            }
            if !c.protocols.is_empty() {
                writeln!(y, "      protocols: [{}]", c.protocols.join(", ")).unwrap();
            }
            if !c.ports.is_empty() {
                let ports: Vec<String> = c
                    .ports
                    .iter()
                    .map(|&(f, l)| {
                        if f == l {
                            f.to_string()
                        } else {
                            format!("\"{f}-{l}\"")
                        }
                    })
                    .collect();
                writeln!(y, "      dst_ports: [{}]", ports.join(", ")).unwrap();
            }
            if !c.src.is_empty() {
                writeln!(y, "      src_cidrs: {}", quoted(&c.src)).unwrap();
            }
            let allow: Vec<String> = (0..self.regions.len())
                .filter(|r| c.allow & (1 << r) != 0)
                .map(|r| format!("r{r}"))
                .collect();
            writeln!(y, "    allow: [{}]", allow.join(", ")).unwrap();
            if let Some(unknown) = c.unknown {
                writeln!(y, "    unknown: {unknown}").unwrap();
            }
            if let Some(mode) = c.mode {
                writeln!(y, "    mode: {mode}").unwrap();
            }
        }
        y
    }

    fn listed_prefixes(&self) -> Vec<IpNetwork> {
        let mut all: Vec<IpNetwork> = self.regions.iter().flatten().copied().collect();
        all.extend(&self.exempt);
        all.extend(self.classes.iter().flat_map(|c| c.src.iter().copied()));
        all
    }
}

#[derive(Clone, Debug)]
enum DstSeed {
    /// Inside one of the policy's prefixes; `edge` 0 and 1 pick its first and last
    /// address, anything else a random one.
    Listed(Index, u128, u8),
    /// Anywhere in the small blocks.
    Space(bool, u128),
    /// Loopback or link-local; or link-scope multicast, the limited broadcast, or a
    /// multicast group of wider scope (the host essentials and their near misses).
    Builtin(Index, u128),
    /// Anywhere at all, mostly far outside every region.
    Anywhere(bool, u128),
}

/// A field of the packet: taken from one of the target class's selector values (by
/// index, so it stays valid while the policy shrinks), or arbitrary.
#[derive(Clone, Debug)]
enum Pick<T> {
    Listed(Index, T),
    Any(T),
}

#[derive(Clone, Debug)]
struct PacketSeed {
    dst: DstSeed,
    /// The class whose selectors the other fields aim at. Aiming at one class makes
    /// matches (and near misses) common; picking each field from the whole policy would
    /// leave most packets unclassified.
    target: Index,
    /// `None`: no source, i.e. the unspecified address.
    src: Option<Pick<u128>>,
    protocol: Pick<u8>,
    /// Listed: an edge of a range, first, last, first - 1 or last + 1.
    port: Pick<u16>,
    /// Listed: satisfies a listed mark; the value is the noise outside its mask.
    mark: Pick<u32>,
    dscp: Pick<u8>,
    /// `None`: no cgroup. Any: an index into `/` and [`CGROUP_PATHS`].
    cgroup: Option<Pick<usize>>,
}

fn pick<T: std::fmt::Debug + Clone>(
    value: impl Strategy<Value = T> + Clone,
) -> impl Strategy<Value = Pick<T>> {
    prop_oneof![
        3 => (any::<Index>(), value.clone()).prop_map(|(i, v)| Pick::Listed(i, v)),
        1 => value.prop_map(Pick::Any),
    ]
}

fn packet_seed() -> impl Strategy<Value = PacketSeed> {
    let dst = prop_oneof![
        8 => (any::<Index>(), host_bits(), 0u8..4).prop_map(|(i, h, e)| DstSeed::Listed(i, h, e)),
        3 => (any::<bool>(), host_bits()).prop_map(|(v6, h)| DstSeed::Space(v6, h)),
        1 => (any::<Index>(), any::<u128>()).prop_map(|(i, h)| DstSeed::Builtin(i, h)),
        1 => (any::<bool>(), any::<u128>()).prop_map(|(v6, h)| DstSeed::Anywhere(v6, h)),
    ];
    (
        dst,
        any::<Index>(),
        proptest::option::weighted(0.7, pick(host_bits())),
        pick(select(vec![6u8, 17, 1, 132, 58])),
        pick(prop_oneof![0u16..1024, any::<u16>()]),
        pick(0u32..0x400),
        pick(prop_oneof![3 => 0u8..6, 1 => 0u8..64]),
        proptest::option::weighted(0.7, pick(0..=CGROUP_PATHS.len())),
    )
        .prop_map(
            |(dst, target, src, protocol, port, mark, dscp, cgroup)| PacketSeed {
                dst,
                target,
                src,
                protocol,
                port,
                mark,
                dscp,
                cgroup,
            },
        )
}

/// A cgroup2 hierarchy stand-in: explain and validation only stat the directories.
struct FakeCgroups {
    scratch: Scratch,
}

impl FakeCgroups {
    fn new() -> Self {
        let scratch = Scratch::new("cgroups");
        for path in CGROUP_PATHS {
            std::fs::create_dir_all(scratch.dir.join(&path[1..])).expect("create cgroup dir");
        }
        Self { scratch }
    }

    fn root(&self) -> &Path {
        &self.scratch.dir
    }

    /// Ids (inode numbers) of `path` and its ancestors, the root included.
    fn ancestry(&self, path: &str) -> Vec<u64> {
        let mut dir = self.root().to_path_buf();
        let mut ids = vec![std::fs::metadata(&dir).expect("cgroup root").ino()];
        for part in path.split('/').filter(|p| !p.is_empty()) {
            dir.push(part);
            ids.push(std::fs::metadata(&dir).expect("cgroup dir").ino());
        }
        ids
    }
}

fn protocol_number(name: &str) -> u8 {
    match name {
        "tcp" => 6,
        "udp" => 17,
        "icmp" => 1,
        "sctp" => 132,
        "icmpv6" => 58,
        other => panic!("no number for protocol {other}"),
    }
}

/// The query for `explain` and the same packet for the reference model.
fn materialize(
    spec: &PolicyGen,
    seed: &PacketSeed,
    cgroups: Option<&FakeCgroups>,
) -> (Query, Packet) {
    let listed = spec.listed_prefixes();
    let space = |v6: bool| if v6 { v6_space() } else { v4_space() };
    let dst = match &seed.dst {
        DstSeed::Listed(i, h, edge) if !listed.is_empty() => {
            let n = &listed[i.index(listed.len())];
            let host = match edge {
                0 => 0,
                1 => u128::MAX,
                _ => *h,
            };
            in_net(n, host)
        }
        DstSeed::Listed(_, h, _) => in_net(&v4_space(), *h),
        DstSeed::Space(v6, h) => in_net(&space(*v6), *h),
        DstSeed::Builtin(i, h) => {
            let builtin = [
                "127.0.0.0/8",
                "169.254.0.0/16",
                "::1/128",
                "fe80::/10",
                "224.0.0.0/23",
                "255.255.255.255/32",
                "ff02::1:2/128",
                "ff00::/12",
                "ff12::/16",
            ];
            let n: IpNetwork = builtin[i.index(builtin.len())].parse().expect("prefix");
            in_net(&n, *h)
        }
        DstSeed::Anywhere(false, h) => IpAddr::V4(Ipv4Addr::from(*h as u32)),
        DstSeed::Anywhere(true, h) => IpAddr::V6(Ipv6Addr::from(*h)),
    };
    let v6 = dst.is_ipv6();
    let class = &spec.classes[seed.target.index(spec.classes.len())];
    let srcs: Vec<IpNetwork> = class
        .src
        .iter()
        .copied()
        .filter(|n| n.is_ipv6() == v6)
        .collect();
    let src = seed.src.as_ref().map(|p| match p {
        Pick::Listed(i, h) if !srcs.is_empty() => in_net(&srcs[i.index(srcs.len())], *h),
        Pick::Listed(_, h) | Pick::Any(h) => in_net(&space(v6), *h),
    });
    let protocol = match seed.protocol {
        Pick::Listed(ref i, _) if !class.protocols.is_empty() => {
            protocol_number(class.protocols[i.index(class.protocols.len())])
        }
        Pick::Listed(_, p) | Pick::Any(p) => p,
    };
    let dst_port = match seed.port {
        Pick::Listed(ref i, edge) if !class.ports.is_empty() => {
            let (first, last) = class.ports[i.index(class.ports.len())];
            match edge % 4 {
                0 => first,
                1 => last,
                2 => first.saturating_sub(1),
                _ => last.saturating_add(1),
            }
        }
        Pick::Listed(_, p) | Pick::Any(p) => p,
    };
    let mark = match seed.mark {
        Pick::Listed(ref i, noise) if !class.marks.is_empty() => {
            let (value, mask) = class.marks[i.index(class.marks.len())];
            value | (noise & !mask)
        }
        Pick::Listed(_, m) | Pick::Any(m) => m,
    };
    let dscp = match seed.dscp {
        Pick::Listed(ref i, _) if !class.dscp.is_empty() => class.dscp[i.index(class.dscp.len())],
        Pick::Listed(_, d) | Pick::Any(d) => d,
    };
    let cgroup = cgroups.zip(seed.cgroup.as_ref()).map(|(fake, p)| {
        let path = match p {
            Pick::Listed(i, _) if !class.cgroups.is_empty() => {
                class.cgroups[i.index(class.cgroups.len())]
            }
            Pick::Listed(_, n) | Pick::Any(n) => {
                let paths: Vec<&str> = std::iter::once("/").chain(CGROUP_PATHS).collect();
                paths[n % paths.len()]
            }
        };
        (path.to_owned(), fake.ancestry(path))
    });
    let query = Query {
        class: None,
        mark,
        cgroup: cgroup.as_ref().map(|(path, _)| path.clone()),
        dscp,
        protocol,
        dst_port,
        src,
    };
    let packet = Packet {
        dst,
        src,
        protocol,
        dst_port,
        mark,
        dscp,
        cgroup_ids: cgroup.map(|(_, ids)| ids).unwrap_or_default(),
    };
    (query, packet)
}

fn load(yaml: &str, cgroup_root: &Path) -> Result<LoadedPolicy, TestCaseError> {
    let scratch = Scratch::new("property");
    let path = scratch.write("policy.yaml", yaml);
    let opts = policy::LoadOptions {
        cgroup_root: cgroup_root.to_path_buf(),
        ..Default::default()
    };
    policy::load_policy(&path, &opts)
        .map_err(|e| TestCaseError::fail(format!("generated policy refused:\n{e}\n---\n{yaml}")))
}

/// What the three judges are compared on.
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    verdict: String,
    reason: String,
    class: Option<String>,
    region: Option<String>,
}

impl From<&Answer> for Outcome {
    fn from(a: &Answer) -> Self {
        Self {
            verdict: a.verdict.to_owned(),
            reason: a.reason.to_owned(),
            class: a.class.clone(),
            region: a.region.clone(),
        }
    }
}

impl From<&Explanation> for Outcome {
    fn from(e: &Explanation) -> Self {
        Self {
            verdict: e.verdict.clone(),
            reason: e.reason.clone(),
            class: e.class.clone(),
            region: e.region.clone(),
        }
    }
}

fn mismatch(
    yaml: &str,
    packet: &Packet,
    answers: &[(&str, &dyn std::fmt::Debug)],
) -> TestCaseError {
    let mut msg = format!("judges disagree\npolicy:\n{yaml}\npacket: {packet:?}\n");
    for (judge, answer) in answers {
        writeln!(msg, "{judge}: {answer:?}").unwrap();
    }
    TestCaseError::fail(msg)
}

fn run(
    runner: &mut TestRunner,
    strategy: impl Strategy<Value = (PolicyGen, Vec<PacketSeed>)>,
    test: impl Fn(&PolicyGen, &[PacketSeed]) -> Result<(), TestCaseError>,
) {
    match runner.run(&strategy, |(spec, seeds)| test(&spec, &seeds)) {
        Ok(()) => {}
        // The message already holds the minimal policy as YAML and the packet; the
        // generator's own form of them would only repeat it, less readably.
        Err(TestError::Fail(why, _)) => panic!("{why}"),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn reference_reasons_are_datapath_reasons() {
    let known: Vec<&str> = (0..=u8::MAX)
        .filter_map(Reason::from_u8)
        .map(Reason::as_str)
        .collect();
    for reason in reference::REASONS {
        assert!(known.contains(&reason), "{reason} is not a datapath reason");
    }
}

#[test]
fn userspace_explain_matches_reference() {
    let cgroups = FakeCgroups::new();
    let mut runner = TestRunner::new(config(512));
    let strategy = (policy_gen(true), vec(packet_seed(), 16));
    run(&mut runner, strategy, |spec, seeds| {
        let yaml = spec.to_yaml();
        let policy = load(&yaml, cgroups.root())?;
        let compiled = policy.compile();
        for seed in seeds {
            let (query, packet) = materialize(spec, seed, Some(&cgroups));
            let expected = reference::evaluate(&policy, &packet);
            let got = explain::explain(&policy, &compiled, cgroups.root(), &query, packet.dst)
                .map_err(|e| TestCaseError::fail(format!("explain failed: {e}")))?;
            if Outcome::from(&got) != Outcome::from(&expected) || got.mode != expected.mode {
                return Err(mismatch(
                    &yaml,
                    &packet,
                    &[("reference", &expected), ("userspace", &got)],
                ));
            }
        }
        Ok(())
    });
}

/// The class, region, verdict and reason the program recorded in its counter, and
/// whether it let the frame through.
fn kernel_judgement(
    oracle: &mut KernelOracle,
    policy: &LoadedPolicy,
    query: &Query,
    dst: IpAddr,
) -> (Outcome, bool) {
    let (key, passed) = oracle
        .judge(query, dst)
        .unwrap_or_else(|e| panic!("one counter moves per frame: {e}"));
    let outcome = Outcome {
        verdict: Verdict::from_u8(key.verdict)
            .expect("verdict")
            .as_str()
            .to_owned(),
        reason: Reason::from_u8(key.reason)
            .expect("reason")
            .as_str()
            .to_owned(),
        class: (key.class != CLASS_NONE)
            .then(|| policy.class_name(key.class).map(str::to_owned))
            .flatten(),
        region: (key.region != REGION_NONE)
            .then(|| policy.region_name(key.region).map(str::to_owned))
            .flatten(),
    };
    (outcome, passed)
}

#[test]
fn kernel_userspace_and_reference_agree() {
    require_root();
    // Cgroup selectors are left out: under BPF_PROG_TEST_RUN the socket's cgroup is the
    // test process's own, which no generated policy could name.
    let mut runner = TestRunner::new(config(24));
    let strategy = (policy_gen(false), vec(packet_seed(), 24));
    let cgroup_root = PathBuf::from("/sys/fs/cgroup");
    // One copy of the datapath, loaded once and given each case's policy as a reload
    // would: loading is the slow part, seconds per load in the kernel matrix's emulated
    // guests. The counter it bumps gives class and region besides verdict and reason.
    let oracle = std::cell::RefCell::new(
        KernelOracle::with_capacity(&LoadOptions::default()).expect("load the datapath"),
    );
    run(&mut runner, strategy, |spec, seeds| {
        let yaml = spec.to_yaml();
        let policy = load(&yaml, &cgroup_root)?;
        let compiled = policy.compile();
        let mut oracle = oracle.borrow_mut();
        oracle.apply(&compiled).expect("apply the policy");
        for seed in seeds {
            let (query, packet) = materialize(spec, seed, None);
            let expected = reference::evaluate(&policy, &packet);
            let userspace = explain::explain(&policy, &compiled, &cgroup_root, &query, packet.dst)
                .map_err(|e| TestCaseError::fail(format!("explain failed: {e}")))?;
            let (kernel, passed) = kernel_judgement(&mut oracle, &policy, &query, packet.dst);
            let checked = explain::explain_with_kernel(
                &mut oracle,
                &policy,
                &compiled,
                &cgroup_root,
                &query,
                packet.dst,
            );
            let want = Outcome::from(&expected);
            let agree = checked.is_ok()
                && Outcome::from(&userspace) == want
                && kernel == want
                && passed == (expected.verdict != "deny");
            if !agree {
                return Err(mismatch(
                    &yaml,
                    &packet,
                    &[
                        ("reference", &expected),
                        ("userspace", &userspace),
                        ("kernel", &(kernel, passed)),
                        ("explain_with_kernel", &checked.map(|e| e.reason)),
                    ],
                ));
            }
        }
        Ok(())
    });
}
