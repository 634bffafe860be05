//! A validated policy, and the summary `datafence check` and `status` print.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use datafence_common::{MODE_AUDIT, MODE_ENFORCE, MarkMatch};
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
    /// Each cgroup as written (trailing `/` removed) and its id (the directory's inode
    /// number), which is what the datapath sees for a socket's cgroup and its ancestors.
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

impl Class {
    /// The datapath's `selector::*` bits for the selectors this class lists.
    pub fn selectors(&self) -> u32 {
        use datafence_common::selector;
        [
            (!self.cgroups.is_empty(), selector::CGROUP),
            (!self.marks.is_empty(), selector::MARK),
            (!self.dscp.is_empty(), selector::DSCP),
            (!self.port_ranges.is_empty(), selector::DST_PORT),
            (!self.protocols.is_empty(), selector::PROTOCOL),
            (!self.src_cidrs.is_empty(), selector::SRC_CIDR),
        ]
        .into_iter()
        .filter(|(used, _)| *used)
        .fold(0, |acc, (_, bit)| acc | bit)
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
    /// `None`: every interface that carries a default route.
    pub egress_interfaces: Option<Vec<String>>,
    pub gateway_interfaces: Vec<String>,
    /// Destinations always allowed, without duplicates. Loopback and link-local are
    /// exempt in the datapath itself and need not be listed.
    pub exempt: Vec<IpNetwork>,
    pub regions: Vec<Region>,
    pub classes: Vec<Class>,
}

impl LoadedPolicy {
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
            },
            exempt: self.exempt.iter().map(ToString::to_string).collect(),
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
                    selectors: SelectorSummary {
                        cgroups: c.cgroups.iter().map(|(p, _)| p.clone()).collect(),
                        marks: c
                            .marks
                            .iter()
                            .map(|m| format!("{:#x}/{:#x}", m.value, m.mask))
                            .collect(),
                        dscp: c.dscp.clone(),
                        protocols: c.protocols.clone(),
                        dst_ports: c
                            .port_ranges
                            .iter()
                            .map(|&(first, last)| {
                                if first == last {
                                    first.to_string()
                                } else {
                                    format!("{first}-{last}")
                                }
                            })
                            .collect(),
                        src_cidrs: c.src_cidrs.iter().map(ToString::to_string).collect(),
                    },
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
    pub regions: Vec<RegionSummary>,
    pub classes: Vec<ClassSummary>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InterfacesSummary {
    /// `null`: every interface that carries a default route.
    pub egress: Option<Vec<String>>,
    pub gateway: Vec<String>,
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
    pub selectors: SelectorSummary,
}

/// The selectors a class lists; empty lists are unused selectors and are left out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SelectorSummary {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cgroups: Vec<String>,
    /// `VALUE/MASK` in hex.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub marks: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dscp: Vec<u8>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub protocols: Vec<u8>,
    /// `N` or `N-M`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub dst_ports: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub src_cidrs: Vec<String>,
}
