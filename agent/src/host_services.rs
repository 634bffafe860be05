//! The addresses the host itself depends on (its DNS resolvers, its time servers, its
//! cloud's metadata and resolver endpoints) and whether a class would deny traffic to
//! them. A broad class (eu-cloud's `user-data` takes all TCP, UDP and SCTP) judges an
//! application's own DNS lookups, which the libc resolver sends from the application's
//! cgroup; a class that selects by protocol alone judges chronyd's NTP too. A resolver in
//! no region the class may reach, such as the AWS VPC resolver at 172.31.0.2, is then
//! denied and the host stops resolving names. `datafence check --host` warns about each
//! such address before the policy is deployed.
//!
//! Nothing here resolves a name or sends a packet: a time server given as a name is a
//! note, to be checked with `datafence explain`. Every verdict comes from
//! [`crate::explain::explain`], the datapath's own decision.
#![forbid(unsafe_code)]

use std::{
    collections::HashSet,
    fmt,
    fs::OpenOptions,
    io::Read as _,
    net::IpAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use datafence_common::parse::{IPPROTO_TCP, IPPROTO_UDP};
use serde::Serialize;

use crate::{
    explain::{ExplainError, Query, explain},
    policy::{Class, CompiledPolicy, LoadedPolicy},
};

/// Traffic the host sends, as the datapath sees it: protocol and destination port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Service {
    /// What the traffic is, in words: "DNS", "NTP".
    pub name: &'static str,
    pub protocol: u8,
    pub port: u16,
}

impl Service {
    const fn udp(name: &'static str, port: u16) -> Self {
        Self {
            name,
            protocol: IPPROTO_UDP,
            port,
        }
    }

    const fn tcp(name: &'static str, port: u16) -> Self {
        Self {
            name,
            protocol: IPPROTO_TCP,
            port,
        }
    }

    /// `udp/53`.
    pub fn port_label(&self) -> String {
        let protocol = match self.protocol {
            IPPROTO_UDP => "udp",
            IPPROTO_TCP => "tcp",
            _ => "ip",
        };
        format!("{protocol}/{}", self.port)
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.port_label())
    }
}

/// DNS goes over TCP when an answer is truncated, so both.
const DNS: &[Service] = &[Service::udp("DNS", 53), Service::tcp("DNS", 53)];
const NTP_PORT: u16 = 123;
/// NTS key exchange (RFC 8915), before NTP itself, for a chrony source marked `nts`.
const NTS_KE_PORT: u16 = 4460;
const METADATA: &[Service] = &[Service::tcp("metadata", 80)];

/// Where the host learned of an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// A line of a configuration file; the path is as on the host.
    File { path: PathBuf, line: usize },
    /// The built-in list of cloud endpoints: `detected` is the file that showed the host
    /// runs in that cloud, if one did.
    Cloud {
        cloud: &'static str,
        detected: Option<PathBuf>,
    },
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::File { path, line } => write!(f, "{} line {line}", path.display()),
            Self::Cloud {
                cloud,
                detected: Some(by),
            } => write!(
                f,
                "built in; this host runs in {cloud}, as {} shows",
                by.display()
            ),
            Self::Cloud {
                cloud,
                detected: None,
            } => write!(f, "built in; if this host runs in {cloud}"),
        }
    }
}

/// An address the host sends to, what for, and where that came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostAddress {
    pub address: IpAddr,
    /// What the address is to the host: "the resolver", "the Azure wireserver".
    pub role: String,
    pub services: Vec<Service>,
    pub source: Source,
}

impl HostAddress {
    /// "the resolver in /etc/resolv.conf line 3", "the Azure wireserver (built in; if this
    /// host runs in Azure)".
    pub fn described(&self) -> String {
        match &self.source {
            Source::File { .. } => format!("{} in {}", self.role, self.source),
            Source::Cloud { .. } => format!("{} ({})", self.role, self.source),
        }
    }
}

/// What [`discover`] found: the addresses, and what it could not judge, each note naming
/// its file (a time server given as a name, a file it could not read).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Discovery {
    pub addresses: Vec<HostAddress>,
    pub notes: Vec<String>,
}

/// The largest configuration file read; these are a few lines each.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// `path` (as on the host) under `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// The text of `path` (as on the host) under `root`: `None` when it does not exist, and
/// a note when it cannot be read. Opened without blocking and only if a regular file, so
/// a FIFO in its place never holds up `check`.
fn read_config(root: &Path, path: &Path, notes: &mut Vec<String>) -> Option<String> {
    let shown = path.display();
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(under(root, path))
    {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            notes.push(format!(
                "cannot read {shown}: {e}; the servers it names are not checked"
            ));
            return None;
        }
    };
    match file.metadata() {
        Ok(m) if m.is_file() => {}
        Ok(_) => {
            notes.push(format!(
                "{shown} is not a regular file; the servers it names are not checked"
            ));
            return None;
        }
        Err(e) => {
            notes.push(format!(
                "cannot read {shown}: {e}; the servers it names are not checked"
            ));
            return None;
        }
    }
    let mut bytes = Vec::new();
    if let Err(e) = file.take(MAX_CONFIG_BYTES + 1).read_to_end(&mut bytes) {
        notes.push(format!(
            "cannot read {shown}: {e}; the servers it names are not checked"
        ));
        return None;
    }
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        notes.push(format!(
            "{shown} is larger than {MAX_CONFIG_BYTES} bytes; only its start is checked"
        ));
        bytes.truncate(MAX_CONFIG_BYTES as usize);
    }
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

/// The files in `dir` (as on the host) whose names end in `suffix`, in name order, the
/// order chrony and systemd read them in.
fn config_dir(root: &Path, dir: &Path, suffix: &str, notes: &mut Vec<String>) -> Vec<PathBuf> {
    let entries = match std::fs::read_dir(under(root, dir)) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => {
            notes.push(format!(
                "cannot list {}: {e}; the servers its files name are not checked",
                dir.display()
            ));
            return Vec::new();
        }
    };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(suffix) && !n.starts_with('.'))
        .collect();
    names.sort();
    names.into_iter().map(|n| dir.join(n)).collect()
}

/// An address as configuration files write it: an IPv6 one may carry a zone
/// (`fe80::1%eth0`) or brackets. `None` for a name.
fn literal_address(token: &str) -> Option<IpAddr> {
    let bare = token
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(token);
    let without_zone = bare.split_once('%').map_or(bare, |(a, _)| a);
    without_zone.parse().ok()
}

/// The lines of a configuration file with their 1-based numbers, comments dropped: lines
/// starting with one of `comment` (after blanks) and blank lines.
fn config_lines<'a>(
    text: &'a str,
    comment: &'a [char],
) -> impl Iterator<Item = (usize, &'a str)> + 'a {
    text.lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l.trim()))
        .filter(move |(_, l)| !l.is_empty() && !l.starts_with(comment))
}

/// Everything the host is found to use under `root` ("/" on a real host): resolvers,
/// time servers and cloud endpoints, in that order. Missing files are skipped.
pub fn discover(root: &Path) -> Discovery {
    let mut found = Discovery::default();
    resolvers(root, &mut found);
    chrony_servers(root, &mut found);
    timesyncd_servers(root, &mut found);
    ntpd_servers(root, &mut found);
    cloud_endpoints(root, &mut found);
    found
}

const RESOLV_CONF: &str = "/etc/resolv.conf";
/// systemd-resolved's list of its upstream servers, for when resolv.conf names its stub.
const RESOLVED_UPSTREAM: &str = "/run/systemd/resolve/resolv.conf";
/// systemd-resolved's stub listeners: a resolv.conf naming only these says nothing of
/// where queries go.
const RESOLVED_STUBS: [IpAddr; 2] = [
    IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 53)),
    IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 54)),
];

fn resolvers(root: &Path, found: &mut Discovery) {
    let listed = resolv_conf(root, Path::new(RESOLV_CONF), found);
    if !listed.is_empty() && listed.iter().all(|a| RESOLVED_STUBS.contains(a)) {
        resolv_conf(root, Path::new(RESOLVED_UPSTREAM), found);
    }
}

/// The `nameserver` lines of a resolv.conf file; returns their addresses.
fn resolv_conf(root: &Path, path: &Path, found: &mut Discovery) -> Vec<IpAddr> {
    let Some(text) = read_config(root, path, &mut found.notes) else {
        return Vec::new();
    };
    let mut listed = Vec::new();
    for (line, content) in config_lines(&text, &['#', ';']) {
        let mut words = content.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(word) = words.next() else { continue };
        match literal_address(word) {
            Some(address) => {
                listed.push(address);
                found.addresses.push(HostAddress {
                    address,
                    role: "the resolver".to_owned(),
                    services: DNS.to_vec(),
                    source: Source::File {
                        path: path.to_owned(),
                        line,
                    },
                });
            }
            None => found.notes.push(format!(
                "nameserver {word} in {} line {line} is not an address; the resolver ignores it",
                path.display()
            )),
        }
    }
    listed
}

/// A time server named in a file, and the traffic it is sent.
fn time_server(
    found: &mut Discovery,
    word: &str,
    services: Vec<Service>,
    path: &Path,
    line: usize,
) {
    let source = Source::File {
        path: path.to_owned(),
        line,
    };
    match literal_address(word) {
        Some(address) => found.addresses.push(HostAddress {
            address,
            role: "the time server".to_owned(),
            services,
            source,
        }),
        None => found.notes.push(format!(
            "time server {word} in {source} is a name; check its addresses with `datafence explain --proto udp --dport {NTP_PORT} ADDRESS`"
        )),
    }
}

/// chrony's main file, whichever the distribution uses, then its source and drop-in
/// directories.
fn chrony_files(root: &Path, notes: &mut Vec<String>) -> Vec<PathBuf> {
    let mut files = vec![
        PathBuf::from("/etc/chrony.conf"),
        PathBuf::from("/etc/chrony/chrony.conf"),
    ];
    files.extend(config_dir(
        root,
        Path::new("/etc/chrony/sources.d"),
        ".sources",
        notes,
    ));
    files.extend(config_dir(
        root,
        Path::new("/etc/chrony/conf.d"),
        ".conf",
        notes,
    ));
    files
}

/// `server`, `pool` and `peer` lines of chrony's files, with their `port` and `nts`
/// options.
fn chrony_servers(root: &Path, found: &mut Discovery) {
    for path in chrony_files(root, &mut found.notes) {
        let Some(text) = read_config(root, &path, &mut found.notes) else {
            continue;
        };
        for (line, content) in config_lines(&text, &['#', '!', ';', '%']) {
            let words: Vec<&str> = content.split_whitespace().collect();
            let [directive, server, options @ ..] = words.as_slice() else {
                continue;
            };
            if !matches!(*directive, "server" | "pool" | "peer") {
                continue;
            }
            time_server(found, server, chrony_services(options), &path, line);
        }
    }
}

/// The traffic a chrony source is sent: NTP to its `port` (123 unless set), and NTS key
/// exchange to its `ntsport` (4460) when it is marked `nts`.
fn chrony_services(options: &[&str]) -> Vec<Service> {
    let option = |name: &str| {
        options
            .windows(2)
            .find(|w| w[0] == name)
            .and_then(|w| w[1].parse::<u16>().ok())
    };
    let mut services = vec![Service::udp("NTP", option("port").unwrap_or(NTP_PORT))];
    if options.contains(&"nts") {
        services.push(Service::tcp(
            "NTS key exchange",
            option("ntsport").unwrap_or(NTS_KE_PORT),
        ));
    }
    services
}

/// `NTP=` and `FallbackNTP=` of systemd-timesyncd, main file then drop-ins. An entry adds
/// to the list and an empty one clears it, as timesyncd reads them.
fn timesyncd_servers(root: &Path, found: &mut Discovery) {
    let mut files = vec![PathBuf::from("/etc/systemd/timesyncd.conf")];
    files.extend(config_dir(
        root,
        Path::new("/etc/systemd/timesyncd.conf.d"),
        ".conf",
        &mut found.notes,
    ));
    // (server, file, line) for NTP= and FallbackNTP=.
    let mut lists: [Vec<(String, PathBuf, usize)>; 2] = [Vec::new(), Vec::new()];
    for path in files {
        let Some(text) = read_config(root, &path, &mut found.notes) else {
            continue;
        };
        let mut in_time = false;
        for (line, content) in config_lines(&text, &['#', ';']) {
            if content.starts_with('[') {
                in_time = content == "[Time]";
                continue;
            }
            let Some((key, value)) = content.split_once('=').filter(|_| in_time) else {
                continue;
            };
            let list = match key.trim() {
                "NTP" => &mut lists[0],
                "FallbackNTP" => &mut lists[1],
                _ => continue,
            };
            if value.trim().is_empty() {
                list.clear();
            }
            list.extend(
                value
                    .split_whitespace()
                    .map(|s| (s.to_owned(), path.clone(), line)),
            );
        }
    }
    for (server, path, line) in lists.into_iter().flatten() {
        time_server(
            found,
            &server,
            vec![Service::udp("NTP", NTP_PORT)],
            &path,
            line,
        );
    }
}

/// `server`, `pool` and `peer` lines of ntpd's (and NTPsec's) file. Flags such as `-4`
/// may come before the address.
fn ntpd_servers(root: &Path, found: &mut Discovery) {
    for path in ["/etc/ntp.conf", "/etc/ntpsec/ntp.conf"].map(PathBuf::from) {
        let Some(text) = read_config(root, &path, &mut found.notes) else {
            continue;
        };
        for (line, content) in config_lines(&text, &['#']) {
            let mut words = content.split_whitespace();
            if !matches!(words.next(), Some("server" | "pool" | "peer")) {
                continue;
            }
            if let Some(server) = words.find(|w| !w.starts_with('-')) {
                time_server(
                    found,
                    server,
                    vec![Service::udp("NTP", NTP_PORT)],
                    &path,
                    line,
                );
            }
        }
    }
}

/// A cloud's endpoint that a host there uses without it being in any file.
struct CloudEndpoint {
    address: &'static str,
    role: &'static str,
    services: &'static [Service],
}

/// A cloud, the DMI values that show a host runs in it, and its endpoints that are not
/// link-local. Link-local ones (169.254.169.254 for metadata at every provider,
/// 169.254.169.253 and 169.254.169.123 at AWS) are always allowed and left out, as is
/// a VPC's own resolver (the AWS VPC base + 2), which resolv.conf names.
struct Cloud {
    name: &'static str,
    /// (file under /sys/class/dmi/id, value) pairs, any one of which shows the cloud.
    dmi: &'static [(&'static str, &'static str)],
    endpoints: &'static [CloudEndpoint],
}

const DMI_DIR: &str = "/sys/class/dmi/id";

const CLOUDS: &[Cloud] = &[
    Cloud {
        name: "AWS",
        dmi: &[("sys_vendor", "Amazon EC2"), ("bios_vendor", "Amazon EC2")],
        endpoints: &[
            CloudEndpoint {
                address: "fd00:ec2::254",
                role: "the AWS instance metadata service (IPv6)",
                services: METADATA,
            },
            CloudEndpoint {
                address: "fd00:ec2::253",
                role: "the AWS VPC resolver (IPv6)",
                services: DNS,
            },
            CloudEndpoint {
                address: "fd00:ec2::123",
                role: "the Amazon Time Sync Service (IPv6)",
                services: &[Service::udp("NTP", NTP_PORT)],
            },
        ],
    },
    Cloud {
        name: "Azure",
        // Hyper-V elsewhere reports Microsoft Corporation too; this asset tag is Azure's.
        dmi: &[("chassis_asset_tag", "7783-7084-3265-9085-8269-3286-77")],
        endpoints: &[CloudEndpoint {
            address: "168.63.129.16",
            role: "the Azure wireserver",
            services: &[
                Service::udp("DNS", 53),
                Service::tcp("DNS", 53),
                Service::tcp("wireserver", 80),
                Service::tcp("guest agent", 32526),
            ],
        }],
    },
    Cloud {
        name: "Google Cloud",
        dmi: &[
            ("product_name", "Google Compute Engine"),
            ("sys_vendor", "Google"),
        ],
        endpoints: &[CloudEndpoint {
            address: "fd20:ce::254",
            role: "the Google Cloud metadata server (IPv6)",
            services: METADATA,
        }],
    },
    Cloud {
        name: "Alibaba Cloud",
        dmi: &[("sys_vendor", "Alibaba Cloud")],
        endpoints: &[
            CloudEndpoint {
                address: "100.100.100.200",
                role: "the Alibaba Cloud metadata service",
                services: METADATA,
            },
            CloudEndpoint {
                address: "100.100.2.136",
                role: "an Alibaba Cloud resolver",
                services: DNS,
            },
            CloudEndpoint {
                address: "100.100.2.138",
                role: "an Alibaba Cloud resolver",
                services: DNS,
            },
        ],
    },
    Cloud {
        name: "Oracle Cloud",
        dmi: &[("chassis_asset_tag", "OracleCloud.com")],
        endpoints: &[CloudEndpoint {
            address: "fd00:c1::a9fe:a9fe",
            role: "the Oracle Cloud metadata service (IPv6)",
            services: METADATA,
        }],
    },
];

/// What DMI says of the cloud this host runs in.
enum CloudGuess {
    /// This cloud, shown by this file.
    Detected(&'static Cloud, PathBuf),
    /// DMI is there and names none of [`CLOUDS`]: a machine of its own or another
    /// provider's.
    NoneOfThem,
    /// No DMI (a container, some VMs): any of them.
    CannotTell,
}

/// Reads DMI quietly: most of it is absent outside a VM, which is an answer, not a fault.
fn guess_cloud(root: &Path) -> CloudGuess {
    let dmi = |file: &str| {
        let path = Path::new(DMI_DIR).join(file);
        read_config(root, &path, &mut Vec::new()).map(|text| (text.trim().to_owned(), path))
    };
    let detected = CLOUDS.iter().find_map(|cloud| {
        cloud.dmi.iter().find_map(|(file, value)| {
            dmi(file)
                .filter(|(text, _)| text == value)
                .map(|(_, path)| (cloud, path))
        })
    });
    match detected {
        Some((cloud, path)) => CloudGuess::Detected(cloud, path),
        None if dmi("sys_vendor").is_some() => CloudGuess::NoneOfThem,
        None => CloudGuess::CannotTell,
    }
}

/// The built-in endpoints: the detected cloud's alone, none on a host DMI shows is in
/// none of these clouds, and every cloud's when DMI cannot tell, each marked "if this
/// host runs in" it.
fn cloud_endpoints(root: &Path, found: &mut Discovery) {
    let guess = guess_cloud(root);
    for cloud in CLOUDS {
        let detected = match &guess {
            CloudGuess::Detected(d, by) if d.name == cloud.name => Some(by.clone()),
            CloudGuess::Detected(..) | CloudGuess::NoneOfThem => continue,
            CloudGuess::CannotTell => None,
        };
        for endpoint in cloud.endpoints {
            let address = endpoint.address.parse().expect("built-in address parses");
            found.addresses.push(HostAddress {
                address,
                role: endpoint.role.to_owned(),
                services: endpoint.services.to_vec(),
                source: Source::Cloud {
                    cloud: cloud.name,
                    detected: detected.clone(),
                },
            });
        }
    }
}

/// Traffic the host needs that a class would deny, or in audit mode report. The JSON form
/// is part of `check --host --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub address: IpAddr,
    /// `udp/53`.
    pub service: String,
    /// What the traffic is: "DNS", "NTP", "metadata".
    pub traffic: String,
    /// What the address is to the host: "the resolver".
    pub role: String,
    /// Where the address came from: "/etc/resolv.conf line 3", or "built in; ...".
    pub source: String,
    pub class: String,
    /// `deny`, or `audit` for a class in audit mode.
    pub verdict: String,
    pub region: Option<String>,
    pub reason: String,
    pub detail: String,
    /// Whether the class takes this traffic by its packets alone (no cgroup or mark
    /// needed): then the host's own resolver and time daemons' traffic is the class's too.
    pub by_packet_alone: bool,
    /// The address as the message names it: "the resolver in /etc/resolv.conf line 3".
    #[serde(skip)]
    described: String,
}

impl Finding {
    /// The message, without its `warning:` or `note:` prefix.
    pub fn message(&self) -> String {
        let region = self.region.as_deref().unwrap_or("none");
        let everyone = if self.by_packet_alone {
            "; the class takes it by protocol and port alone, from any process"
        } else {
            ""
        };
        let fix = "add it to exempt: or to a region the class may reach";
        let traffic = format!("{} ({})", self.traffic, self.service);
        let to = format!("{}, {}", self.address, self.described);
        if self.verdict == "audit" {
            format!(
                "class {} (audit) would report {traffic} to {to} (region {region}: {}{everyone}); once it enforces that is a drop: {fix}",
                self.class, self.reason
            )
        } else {
            format!(
                "class {} would deny {traffic} to {to} (region {region}: {}{everyone}); {fix}",
                self.class, self.reason
            )
        }
    }

    /// Whether this is only a report (audit mode), not a drop.
    pub fn is_audit(&self) -> bool {
        self.verdict == "audit"
    }
}

/// Whether a class's protocol and port selectors let it take this traffic. Its other
/// selectors (cgroup, mark, DSCP, source) say which process or packet, which the host's
/// configuration cannot tell: any process may look a name up, so they are taken to match.
fn may_take(class: &Class, service: Service) -> bool {
    let s = &class.selectors;
    (s.protocols.is_empty() || s.protocols.contains(&service.protocol))
        && (s.port_ranges.is_empty()
            || s.port_ranges
                .iter()
                .any(|&(first, last)| (first..=last).contains(&service.port)))
}

/// Each class's verdict on each address and service the host uses, keeping those that
/// are not allowed. An address found twice is judged once, under its first source.
pub fn judge(
    policy: &LoadedPolicy,
    compiled: &CompiledPolicy,
    cgroup_root: &Path,
    addresses: &[HostAddress],
) -> Result<Vec<Finding>, ExplainError> {
    let mut seen = HashSet::new();
    let mut findings = Vec::new();
    for host in addresses {
        for &service in &host.services {
            if !seen.insert((host.address, service.protocol, service.port)) {
                continue;
            }
            let traffic = Query {
                protocol: service.protocol,
                dst_port: service.port,
                ..Query::new()
            };
            // Unclassified: the class, if any, that takes it with no cgroup or mark.
            let any = explain(policy, compiled, cgroup_root, &traffic, host.address)?;
            let by_packet = (any.verdict != "allow").then_some(any.class).flatten();
            for class in policy.classes.iter().filter(|c| may_take(c, service)) {
                let query = Query {
                    class: Some(class.name.clone()),
                    ..traffic.clone()
                };
                let e = explain(policy, compiled, cgroup_root, &query, host.address)?;
                if e.verdict == "allow" {
                    continue;
                }
                findings.push(Finding {
                    address: host.address,
                    service: service.port_label(),
                    traffic: service.name.to_owned(),
                    role: host.role.clone(),
                    source: host.source.to_string(),
                    class: class.name.clone(),
                    verdict: e.verdict,
                    region: e.region,
                    reason: e.reason,
                    detail: e.detail,
                    by_packet_alone: by_packet.as_deref() == Some(class.name.as_str()),
                    described: host.described(),
                });
            }
        }
    }
    Ok(findings)
}

/// What `check --host` reports about the host's services.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostServices {
    /// How many addresses were judged.
    pub addresses: usize,
    pub findings: Vec<Finding>,
    pub notes: Vec<String>,
}

/// Discovers the services of the host whose files are under `root` ("/" on a real host)
/// and judges them under `policy`.
pub fn check(
    policy: &LoadedPolicy,
    compiled: &CompiledPolicy,
    cgroup_root: &Path,
    root: &Path,
) -> Result<HostServices, ExplainError> {
    let found = discover(root);
    let findings = judge(policy, compiled, cgroup_root, &found.addresses)?;
    let addresses = found
        .addresses
        .iter()
        .map(|a| a.address)
        .collect::<HashSet<_>>()
        .len();
    Ok(HostServices {
        addresses,
        findings,
        notes: found.notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host's files under a temporary root.
    struct Host(tempfile::TempDir);

    impl Host {
        fn new() -> Self {
            Self(tempfile::tempdir().expect("tempdir"))
        }

        fn write(&self, path: &str, text: &str) -> &Self {
            let real = under(self.0.path(), Path::new(path));
            std::fs::create_dir_all(real.parent().expect("parent")).expect("mkdir");
            std::fs::write(real, text).expect("write");
            self
        }

        fn discover(&self) -> Discovery {
            discover(self.0.path())
        }

        /// Makes DMI say this is a machine of no known cloud, so no built-in endpoint is
        /// added.
        fn bare_metal(&self) -> &Self {
            self.write("/sys/class/dmi/id/sys_vendor", "Example Computers Inc.\n")
        }
    }

    fn file(path: &str, line: usize) -> Source {
        Source::File {
            path: path.into(),
            line,
        }
    }

    fn addresses(found: &Discovery) -> Vec<(String, Source)> {
        found
            .addresses
            .iter()
            .map(|a| (a.address.to_string(), a.source.clone()))
            .collect()
    }

    #[test]
    fn resolv_conf_nameservers_with_comments_options_and_zones() {
        let host = Host::new();
        host.bare_metal().write(
            "/etc/resolv.conf",
            "# generated by NetworkManager\n; old style comment\nsearch ec2.internal\noptions edns0 trust-ad\nnameserver 172.31.0.2\n  nameserver   2001:db8::53  # trailing words are ignored\nnameserver fe80::1%eth0\nnameserver resolver.example\n#nameserver 192.0.2.99\n",
        );
        let found = host.discover();
        assert_eq!(
            addresses(&found),
            [
                ("172.31.0.2".to_owned(), file("/etc/resolv.conf", 5)),
                ("2001:db8::53".to_owned(), file("/etc/resolv.conf", 6)),
                ("fe80::1".to_owned(), file("/etc/resolv.conf", 7)),
            ]
        );
        assert!(found.addresses.iter().all(|a| a.services == DNS));
        assert_eq!(found.notes.len(), 1, "{:?}", found.notes);
        assert!(found.notes[0].contains("resolver.example in /etc/resolv.conf line 8"));
    }

    #[test]
    fn the_resolved_stub_leads_to_its_upstream_servers() {
        let host = Host::new();
        host.bare_metal()
            .write(
                "/etc/resolv.conf",
                "# This is /run/systemd/resolve/stub-resolv.conf\nnameserver 127.0.0.53\noptions edns0 trust-ad\n",
            )
            .write(
                "/run/systemd/resolve/resolv.conf",
                "# upstream\nnameserver 172.31.0.2\n",
            );
        assert_eq!(
            addresses(&host.discover()),
            [
                ("127.0.0.53".to_owned(), file("/etc/resolv.conf", 2)),
                (
                    "172.31.0.2".to_owned(),
                    file("/run/systemd/resolve/resolv.conf", 2)
                ),
            ]
        );
        // A resolv.conf naming a real server too is read alone.
        host.write(
            "/etc/resolv.conf",
            "nameserver 127.0.0.53\nnameserver 192.0.2.53\n",
        );
        assert_eq!(host.discover().addresses.len(), 2);
    }

    #[test]
    fn chrony_sources_literal_and_named() {
        let host = Host::new();
        host.bare_metal()
            .write(
                "/etc/chrony/chrony.conf",
                "! comment\npool 2.debian.pool.ntp.org iburst maxsources 4\nserver 192.0.2.123 iburst\nsourcedir /etc/chrony/sources.d\nserver 198.51.100.7 nts port 1123\nmakestep 1 3\n",
            )
            .write(
                "/etc/chrony/sources.d/local.sources",
                "peer 2001:db8::123\n",
            )
            .write("/etc/chrony/sources.d/ignored.conf", "server 192.0.2.1\n");
        let found = host.discover();
        assert_eq!(
            addresses(&found),
            [
                ("192.0.2.123".to_owned(), file("/etc/chrony/chrony.conf", 3)),
                (
                    "198.51.100.7".to_owned(),
                    file("/etc/chrony/chrony.conf", 5)
                ),
                (
                    "2001:db8::123".to_owned(),
                    file("/etc/chrony/sources.d/local.sources", 1)
                ),
            ]
        );
        assert_eq!(found.addresses[0].services, [Service::udp("NTP", 123)]);
        assert_eq!(
            found.addresses[1].services,
            [
                Service::udp("NTP", 1123),
                Service::tcp("NTS key exchange", 4460)
            ]
        );
        assert_eq!(
            found.notes,
            [
                "time server 2.debian.pool.ntp.org in /etc/chrony/chrony.conf line 2 is a name; check its addresses with `datafence explain --proto udp --dport 123 ADDRESS`"
            ]
        );
    }

    #[test]
    fn timesyncd_lists_add_up_and_an_empty_entry_clears() {
        let host = Host::new();
        host.bare_metal()
            .write(
                "/etc/systemd/timesyncd.conf",
                "[Time]\n#NTP=192.0.2.1\nNTP=192.0.2.10 time.example.org\nFallbackNTP=192.0.2.20\n",
            )
            .write(
                "/etc/systemd/timesyncd.conf.d/50-site.conf",
                "[Time]\nNTP=\nNTP=198.51.100.10 198.51.100.11\n[Other]\nNTP=192.0.2.99\n",
            );
        let found = host.discover();
        let drop_in = "/etc/systemd/timesyncd.conf.d/50-site.conf";
        assert_eq!(
            addresses(&found),
            [
                ("198.51.100.10".to_owned(), file(drop_in, 3)),
                ("198.51.100.11".to_owned(), file(drop_in, 3)),
                (
                    "192.0.2.20".to_owned(),
                    file("/etc/systemd/timesyncd.conf", 4)
                ),
            ]
        );
        assert!(found.notes.is_empty(), "{:?}", found.notes);
    }

    #[test]
    fn ntpd_servers_after_flags() {
        let host = Host::new();
        host.bare_metal().write(
            "/etc/ntp.conf",
            "driftfile /var/lib/ntp/ntp.drift\nserver -4 192.0.2.5 iburst\npool 0.pool.ntp.org\nserver 127.127.1.0\n",
        );
        let found = host.discover();
        assert_eq!(
            addresses(&found),
            [
                ("192.0.2.5".to_owned(), file("/etc/ntp.conf", 2)),
                ("127.127.1.0".to_owned(), file("/etc/ntp.conf", 4)),
            ]
        );
        assert_eq!(found.notes.len(), 1);
    }

    #[test]
    fn missing_files_are_skipped_and_unreadable_ones_noted() {
        let host = Host::new();
        host.bare_metal();
        assert_eq!(host.discover(), Discovery::default());
        // A directory where a file should be cannot be read as one.
        std::fs::create_dir_all(under(host.0.path(), Path::new("/etc/ntp.conf"))).expect("mkdir");
        let found = host.discover();
        assert!(found.addresses.is_empty());
        assert_eq!(found.notes.len(), 1, "{:?}", found.notes);
        assert!(
            found.notes[0].contains("/etc/ntp.conf"),
            "{:?}",
            found.notes
        );
    }

    #[test]
    fn cloud_endpoints_follow_dmi() {
        let host = Host::new();
        // No DMI: every cloud's, each marked as a condition.
        let found = host.discover();
        assert!(
            found
                .addresses
                .iter()
                .any(|a| a.address.to_string() == "168.63.129.16"
                    && a.described()
                        == "the Azure wireserver (built in; if this host runs in Azure)")
        );
        // Link-local endpoints are always allowed and so left out.
        assert!(found.addresses.iter().all(|a| match a.address {
            IpAddr::V4(v4) => !v4.is_link_local(),
            IpAddr::V6(v6) => !v6.is_unicast_link_local(),
        }));
        // DMI shows Azure: Azure's alone.
        host.write(
            "/sys/class/dmi/id/chassis_asset_tag",
            "7783-7084-3265-9085-8269-3286-77\n",
        )
        .write("/sys/class/dmi/id/sys_vendor", "Microsoft Corporation\n");
        let found = host.discover();
        assert_eq!(found.addresses.len(), 1);
        assert_eq!(
            found.addresses[0].described(),
            "the Azure wireserver (built in; this host runs in Azure, as /sys/class/dmi/id/chassis_asset_tag shows)"
        );
        // DMI shows another machine: none.
        host.write("/sys/class/dmi/id/chassis_asset_tag", "\n");
        assert!(host.discover().addresses.is_empty());
    }

    fn policy(yaml: &str) -> LoadedPolicy {
        crate::policy::parse_policy_str(
            yaml,
            Path::new("policy.yaml"),
            &crate::policy::LoadOptions::default(),
        )
        .expect("valid policy")
    }

    /// eu-cloud's shape: one broad class that may reach `eu` only.
    const BROAD: &str = "version: 1\nexempt: [10.0.0.0/8]\nregions:\n  eu:\n    cidrs: [192.0.2.0/24]\n  non-eu:\n    cidrs: [198.51.100.0/24]\ndata_classes:\n  user-data:\n    match:\n      protocols: [tcp, udp, sctp]\n    allow: [eu]\n    unknown: deny\n";

    fn judged(yaml: &str, host: &Host) -> HostServices {
        let p = policy(yaml);
        check(&p, &p.compile(), Path::new("/nonexistent"), host.0.path()).expect("judged")
    }

    #[test]
    fn a_broad_class_denies_the_vpc_resolver() {
        let host = Host::new();
        host.bare_metal().write(
            "/etc/resolv.conf",
            "search ec2.internal\noptions edns0\nnameserver 172.31.0.2\nnameserver 127.0.0.53\nnameserver 10.0.0.2\n",
        );
        let report = judged(BROAD, &host);
        assert_eq!(report.addresses, 3);
        let services: Vec<_> = report
            .findings
            .iter()
            .map(|f| (f.address.to_string(), f.service.as_str(), f.class.as_str()))
            .collect();
        // Loopback (the stub) and the exempt 10.0.0.2 are allowed.
        assert_eq!(
            services,
            [
                ("172.31.0.2".to_owned(), "udp/53", "user-data"),
                ("172.31.0.2".to_owned(), "tcp/53", "user-data"),
            ]
        );
        let f = &report.findings[0];
        assert_eq!(
            (f.verdict.as_str(), f.region.as_deref(), f.reason.as_str()),
            ("deny", None, "unknown_denied")
        );
        assert!(f.by_packet_alone);
        assert_eq!(
            f.message(),
            "class user-data would deny DNS (udp/53) to 172.31.0.2, the resolver in /etc/resolv.conf line 3 (region none: unknown_denied; the class takes it by protocol and port alone, from any process); add it to exempt: or to a region the class may reach"
        );
        // Exempting it ends the warning.
        let exempting = BROAD.replace("[10.0.0.0/8]", "[10.0.0.0/8, 172.31.0.2/32]");
        assert!(judged(&exempting, &host).findings.is_empty());
    }

    #[test]
    fn a_class_that_cannot_carry_the_traffic_is_not_named() {
        let host = Host::new();
        host.bare_metal()
            .write("/etc/resolv.conf", "nameserver 198.51.100.53\n")
            .write("/etc/chrony.conf", "server 198.51.100.123\n");
        // HTTPS only, by cgroup: neither DNS nor NTP is this class's.
        let https = "version: 1\nregions:\n  eu:\n    cidrs: [192.0.2.0/24]\n  non-eu:\n    cidrs: [198.51.100.0/24]\ndata_classes:\n  web:\n    match:\n      marks: [{value: 1}]\n      dst_ports: [443]\n    allow: [eu]\n  lookups:\n    mode: audit\n    match:\n      marks: [{value: 2}]\n      protocols: [udp]\n    allow: [eu]\n";
        let report = judged(https, &host);
        let named: Vec<_> = report
            .findings
            .iter()
            .map(|f| (f.service.as_str(), f.class.as_str(), f.verdict.as_str()))
            .collect();
        // `lookups` takes UDP by mark: DNS over UDP and NTP, reported (audit), and not
        // by the packet alone.
        assert_eq!(
            named,
            [
                ("udp/53", "lookups", "audit"),
                ("udp/123", "lookups", "audit")
            ]
        );
        let f = &report.findings[0];
        assert!(!f.by_packet_alone);
        assert!(f.is_audit());
        assert_eq!(f.region.as_deref(), Some("non-eu"));
        assert!(
            f.message().starts_with(
                "class lookups (audit) would report DNS (udp/53) to 198.51.100.53, the resolver in /etc/resolv.conf line 1 (region non-eu: region_denied)"
            ),
            "{}",
            f.message()
        );
    }

    #[test]
    fn an_address_found_twice_is_judged_once() {
        let host = Host::new();
        host.write("/etc/resolv.conf", "nameserver 168.63.129.16\n");
        let report = judged(BROAD, &host);
        let wireserver_dns: Vec<_> = report
            .findings
            .iter()
            .filter(|f| f.address.to_string() == "168.63.129.16" && f.traffic == "DNS")
            .collect();
        assert_eq!(wireserver_dns.len(), 2, "{wireserver_dns:?}");
        assert!(
            wireserver_dns
                .iter()
                .all(|f| f.source == "/etc/resolv.conf line 1")
        );
        // Its other services still come from the built-in list.
        assert!(report.findings.iter().any(|f| f.service == "tcp/80"
            && f.address.to_string() == "168.63.129.16"
            && f.source == "built in; if this host runs in Azure"));
    }
}
