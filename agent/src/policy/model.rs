//! A validated policy, and the summary `datafence check` and `status` print.
#![forbid(unsafe_code)]

use std::fmt;
use std::path::PathBuf;

use datafence_common::{ClassSpec, MODE_AUDIT, MODE_ENFORCE, MarkMatch, PortRange, set_bit};
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde::Serialize;

/// Whether a denial drops the packet or only reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Denied packets are dropped. The default.
    #[default]
    Enforce,
    /// Denied packets pass and are reported as audit hits.
    Audit,
}

impl Mode {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Audit => "audit",
        }
    }

    /// The datapath's `MODE_*` value.
    pub const fn as_u8(self) -> u8 {
        match self {
            Self::Enforce => MODE_ENFORCE,
            Self::Audit => MODE_AUDIT,
        }
    }
}

/// What a class may do with a destination that lies in no region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownRule {
    /// Refused. The default: an address missing from the region lists must not become a
    /// way out (fail closed).
    #[default]
    Deny,
    Allow,
}

impl UnknownRule {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Deny => "deny",
            Self::Allow => "allow",
        }
    }
}

/// A named set of destination prefixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub name: String,
    /// 1-based, in file order; 0 is `REGION_NONE`.
    pub id: u8,
    /// Inline `cidrs` then each file's entries, in order, without duplicates.
    pub v4: Vec<Ipv4Network>,
    pub v6: Vec<Ipv6Network>,
}

/// A data class with its selectors resolved. An empty selector list means the selector
/// is not used (validation refuses a listed-but-empty selector).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Class {
    pub name: String,
    /// 0-based, in file order: the first class that matches a packet wins.
    pub id: u8,
    /// The class's own mode if it sets one, else the policy's.
    pub mode: Mode,
    pub unknown: UnknownRule,
    /// Ids of the regions this class may reach, in the order listed, without duplicates.
    pub allow: Vec<u8>,
    pub selectors: Selectors,
}

/// Which traffic is a class's, resolved. An empty list is a selector the class does not
/// use (validation refuses a listed-but-empty one).
///
/// Everything that shows, compares or compiles selectors goes through
/// [`Selectors::listed`] and [`Selectors::fill_spec`]: the summary, `check`, the diff and
/// the "lists no selectors" message follow from the fields here.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selectors {
    /// Each cgroup as written (trailing `/` removed) and its id (the directory's inode
    /// number), which is what the datapath sees for a socket's cgroup and its ancestors;
    /// [`CGROUP_NOT_YET`] while the directory does not exist.
    pub cgroups: Vec<(String, u64)>,
    pub marks: Vec<MarkMatch>,
    /// Sorted, without duplicates.
    pub dscp: Vec<u8>,
    /// Sorted, without duplicates.
    pub protocols: Vec<u8>,
    /// Inclusive ranges, sorted, with adjacent and overlapping ranges merged.
    pub port_ranges: Vec<(u16, u16)>,
    pub src_cidrs: Vec<IpNetwork>,
}

/// The id of a cgroup a class names that does not exist yet. No cgroup has inode 0, and
/// the compiled policy leaves these out: the datapath reports 0 for a packet with no
/// socket, which must not match.
pub const CGROUP_NOT_YET: u64 = 0;

/// One selector as people read it: its policy key, its datapath bit and its values as
/// written. Cgroups show their paths, not their ids, so a service restarted under a new
/// cgroup id is the same selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub key: &'static str,
    pub bit: u32,
    pub values: Vec<Written>,
}

/// A selector value as written. Numbers stay numbers in JSON (`"dscp": [10]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Written {
    Number(u32),
    Text(String),
}

impl fmt::Display for Written {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Number(n) => write!(f, "{n}"),
            Self::Text(t) => f.write_str(t),
        }
    }
}

impl Selectors {
    /// Every selector, listed or not, in the order the policy reference gives them.
    pub fn listed(&self) -> [Listed; 6] {
        use datafence_common::selector;
        let text = |v: String| Written::Text(v);
        let number = |v: u8| Written::Number(u32::from(v));
        let entry = |key, bit, values| Listed { key, bit, values };
        [
            entry(
                "cgroups",
                selector::CGROUP,
                self.cgroups.iter().map(|(p, _)| text(p.clone())).collect(),
            ),
            entry(
                "marks",
                selector::MARK,
                self.marks
                    .iter()
                    .map(|m| text(format!("{:#x}/{:#x}", m.value, m.mask)))
                    .collect(),
            ),
            entry(
                "dscp",
                selector::DSCP,
                self.dscp.iter().copied().map(number).collect(),
            ),
            entry(
                "protocols",
                selector::PROTOCOL,
                self.protocols.iter().copied().map(number).collect(),
            ),
            entry(
                "dst_ports",
                selector::DST_PORT,
                self.port_ranges
                    .iter()
                    .map(|&(first, last)| {
                        text(if first == last {
                            first.to_string()
                        } else {
                            format!("{first}-{last}")
                        })
                    })
                    .collect(),
            ),
            entry(
                "src_cidrs",
                selector::SRC_CIDR,
                self.src_cidrs.iter().map(|n| text(n.to_string())).collect(),
            ),
        ]
    }

    /// The policy keys of every selector, for messages.
    pub fn keys() -> Vec<&'static str> {
        Self::default().listed().map(|l| l.key).to_vec()
    }

    /// The datapath's `selector::*` bits for the selectors this class lists.
    pub fn bits(&self) -> u32 {
        self.listed()
            .iter()
            .filter(|l| !l.values.is_empty())
            .fold(0, |acc, l| acc | l.bit)
    }

    /// Whether two classes select the same traffic as written (cgroups by path).
    pub fn same_as_written(&self, other: &Self) -> bool {
        self.listed() == other.listed()
    }

    /// Writes the selectors into a compiled class. Cgroups and source CIDRs are shared
    /// tables, which the compiler builds across classes.
    pub fn fill_spec(&self, spec: &mut ClassSpec) {
        spec.selectors = self.bits();
        for &d in &self.dscp {
            spec.dscp |= u64::checked_shl(1, u32::from(d)).unwrap_or(0);
        }
        for &p in &self.protocols {
            set_bit(&mut spec.protocols, p);
        }
        for (slot, mark) in spec.marks.iter_mut().zip(&self.marks) {
            *slot = *mark;
            spec.n_marks += 1;
        }
        for (slot, &(first, last)) in spec.port_ranges.iter_mut().zip(&self.port_ranges) {
            *slot = PortRange { first, last };
            spec.n_port_ranges += 1;
        }
    }
}

/// `cgroups /a /b; dscp 10; dst_ports 443 9000-9100`: the listed selectors.
impl fmt::Display for Selectors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for listed in self.listed().iter().filter(|l| !l.values.is_empty()) {
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            f.write_str(listed.key)?;
            for value in &listed.values {
                write!(f, " {value}")?;
            }
        }
        Ok(())
    }
}

/// The listed selectors as an object of key to values; a contract of `--json` output.
impl Serialize for Selectors {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap as _;
        let listed = self.listed();
        let used: Vec<&Listed> = listed.iter().filter(|l| !l.values.is_empty()).collect();
        let mut map = serializer.serialize_map(Some(used.len()))?;
        for l in used {
            map.serialize_entry(l.key, &l.values)?;
        }
        map.end()
    }
}

/// A policy that passed validation: every name resolved, every limit respected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedPolicy {
    /// The policy file, as given to [`load_policy`](super::load_policy).
    pub path: PathBuf,
    /// Hex SHA-256 over the policy file's bytes, then each region file's bytes in the
    /// order they are listed: a change to any of them changes this.
    pub sha256: String,
    /// Every file the policy was read from: the policy file, then its region files.
    pub sources: Vec<PathBuf>,
    pub version: u32,
    /// The policy-wide mode; classes may override it (see [`Class::mode`]).
    pub mode: Mode,
    /// `None`: every interface in the namespace but loopback and those matching
    /// [`Self::excluded_interfaces`], including interfaces created later.
    pub egress_interfaces: Option<Vec<String>>,
    pub gateway_interfaces: Vec<String>,
    /// Glob patterns of interfaces left alone when every interface is attached. They do
    /// not apply to an `egress` list, which names its interfaces.
    pub excluded_interfaces: Vec<String>,
    /// Destinations always allowed, without duplicates. Loopback and link-local are
    /// exempt in the datapath itself and need not be listed.
    pub exempt: Vec<IpNetwork>,
    /// NAT64 `/96` prefixes besides the well-known `64:ff9b::/96`: a destination in one
    /// is judged by the IPv4 address in its last four bytes.
    pub nat64_prefixes: Vec<ipnetwork::Ipv6Network>,
    /// Which built-in exemptions for the host's own link traffic are on.
    pub host_essentials: HostEssentials,
    pub regions: Vec<Region>,
    pub classes: Vec<Class>,
}

/// The built-in exemptions for the host's own link traffic, each on unless the policy
/// turns it off (`host_essentials:`). What each covers: [`datafence_common::host_essential`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HostEssentials {
    pub dhcp: bool,
    pub neighbor_discovery: bool,
    pub link_multicast: bool,
}

impl Default for HostEssentials {
    fn default() -> Self {
        Self {
            dhcp: true,
            neighbor_discovery: true,
            link_multicast: true,
        }
    }
}

impl HostEssentials {
    /// As the datapath reads them: [`datafence_common::PolicyHeader::host_essentials`].
    pub fn bits(self) -> u32 {
        use datafence_common::host_essential::{DHCP, LINK_MULTICAST, NEIGHBOR_DISCOVERY};
        [
            (self.dhcp, DHCP),
            (self.neighbor_discovery, NEIGHBOR_DISCOVERY),
            (self.link_multicast, LINK_MULTICAST),
        ]
        .iter()
        .filter(|(on, _)| *on)
        .fold(0, |bits, (_, bit)| bits | bit)
    }
}

/// Something to know about a cgroup a class names, said by `check` and logged by the
/// agent; neither stops the policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "note", rename_all = "snake_case")]
pub enum CgroupNote {
    /// The cgroup does not exist yet; its traffic is classified once it appears.
    NotYet { class: String, cgroup: String },
    /// A service's own cgroup: systemd makes it anew, with a new id, on every restart,
    /// and until the agent has caught up the service's traffic is not user data.
    Leaf { class: String, cgroup: String },
}

impl fmt::Display for CgroupNote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotYet { class, cgroup } => write!(
                f,
                "class {class}: cgroup {cgroup} does not exist yet; its traffic is user data from the moment it appears"
            ),
            Self::Leaf { class, cgroup } => write!(
                f,
                "class {class}: cgroup {cgroup} is a service's own cgroup, which systemd makes anew on every restart; name a slice the service runs in (Slice=user-data.slice), whose id does not change"
            ),
        }
    }
}

impl LoadedPolicy {
    /// Each class's name with each cgroup path it names, in class order.
    pub fn class_cgroups(&self) -> Vec<(String, String)> {
        self.classes
            .iter()
            .flat_map(|c| {
                c.selectors
                    .cgroups
                    .iter()
                    .map(|(path, _)| (c.name.clone(), path.clone()))
            })
            .collect()
    }

    /// The notes about the cgroups classes name, in class order.
    pub fn cgroup_notes(&self) -> Vec<CgroupNote> {
        let mut notes = Vec::new();
        for class in &self.classes {
            for (path, id) in &class.selectors.cgroups {
                let (class, cgroup) = (class.name.clone(), path.clone());
                if *id == CGROUP_NOT_YET {
                    notes.push(CgroupNote::NotYet { class, cgroup });
                } else if path
                    .split('/')
                    .any(|c| std::path::Path::new(c).extension() == Some("service".as_ref()))
                {
                    notes.push(CgroupNote::Leaf { class, cgroup });
                }
            }
        }
        notes
    }

    /// Whether `interface` matches one of the policy's `interfaces.exclude` patterns.
    pub fn excludes_interface(&self, interface: &str) -> bool {
        // The patterns were checked by validation; one that still fails to build matches
        // nothing, so the interface stays attached.
        self.excluded_interfaces
            .iter()
            .any(|p| globset::Glob::new(p).is_ok_and(|g| g.compile_matcher().is_match(interface)))
    }

    /// The region of a destination by a plain scan of every region's prefixes: the
    /// longest containing prefix wins. Independent of the compiled tables (so `explain`
    /// checks them rather than repeats them) and linear in the policy's size, which is a
    /// few milliseconds at a million prefixes.
    pub fn region_of(&self, addr: std::net::IpAddr) -> datafence_common::RegionId {
        let mut best: Option<(u8, u8)> = None;
        for r in &self.regions {
            let longest = match addr {
                std::net::IpAddr::V4(a) => {
                    r.v4.iter()
                        .filter(|n| n.contains(a))
                        .map(|n| n.prefix())
                        .max()
                }
                std::net::IpAddr::V6(a) => {
                    r.v6.iter()
                        .filter(|n| n.contains(a))
                        .map(Ipv6Network::prefix)
                        .max()
                }
            };
            if let Some(len) = longest
                && best.is_none_or(|(l, _)| len > l)
            {
                best = Some((len, r.id));
            }
        }
        best.map_or(datafence_common::REGION_NONE.into(), |(_, id)| id.into())
    }

    /// Prefixes of each family across all regions.
    pub fn prefix_counts(&self) -> (usize, usize) {
        self.regions
            .iter()
            .fold((0, 0), |(v4, v6), r| (v4 + r.v4.len(), v6 + r.v6.len()))
    }

    pub fn region_name(&self, id: u16) -> Option<&str> {
        let index = usize::from(id).checked_sub(1)?;
        self.regions.get(index).map(|r| r.name.as_str())
    }

    pub fn class_name(&self, id: u8) -> Option<&str> {
        self.classes.get(usize::from(id)).map(|c| c.name.as_str())
    }

    /// What the policy says, for people: counts rather than prefix lists.
    pub fn summary(&self) -> Summary {
        Summary {
            path: self.path.display().to_string(),
            sha256: self.sha256.clone(),
            version: self.version,
            mode: self.mode,
            interfaces: InterfacesSummary {
                egress: self.egress_interfaces.clone(),
                gateway: self.gateway_interfaces.clone(),
                exclude: self.excluded_interfaces.clone(),
            },
            exempt: self.exempt.iter().map(ToString::to_string).collect(),
            nat64: self
                .nat64_prefixes
                .iter()
                .map(ToString::to_string)
                .collect(),
            host_essentials: self.host_essentials,
            regions: self
                .regions
                .iter()
                .map(|r| RegionSummary {
                    name: r.name.clone(),
                    id: r.id,
                    v4_prefixes: r.v4.len(),
                    v6_prefixes: r.v6.len(),
                })
                .collect(),
            classes: self
                .classes
                .iter()
                .map(|c| ClassSummary {
                    name: c.name.clone(),
                    id: c.id,
                    mode: c.mode,
                    unknown: c.unknown,
                    allow: c
                        .allow
                        .iter()
                        .filter_map(|&id| self.region_name(u16::from(id)))
                        .map(str::to_owned)
                        .collect(),
                    selectors: c.selectors.clone(),
                })
                .collect(),
        }
    }
}

/// See [`LoadedPolicy::summary`]. Field names are part of `--json` output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub path: String,
    pub sha256: String,
    pub version: u32,
    pub mode: Mode,
    pub interfaces: InterfacesSummary,
    pub exempt: Vec<String>,
    /// Declared NAT64 prefixes (the well-known one is always in force).
    pub nat64: Vec<String>,
    /// The built-in exemptions for the host's own link traffic that are on.
    pub host_essentials: HostEssentials,
    pub regions: Vec<RegionSummary>,
    pub classes: Vec<ClassSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InterfacesSummary {
    /// `null`: every interface but loopback and the excluded ones.
    pub egress: Option<Vec<String>>,
    pub gateway: Vec<String>,
    pub exclude: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegionSummary {
    pub name: String,
    pub id: u8,
    pub v4_prefixes: usize,
    pub v6_prefixes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClassSummary {
    pub name: String,
    pub id: u8,
    pub mode: Mode,
    pub unknown: UnknownRule,
    /// Region names.
    pub allow: Vec<String>,
    pub selectors: Selectors,
}
