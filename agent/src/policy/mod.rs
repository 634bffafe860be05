//! The policy file: parsing, validation and compilation into datapath map contents.
//!
//! The file format is a contract, documented here with the defaults this module applies:
//!
//! ```yaml
//! version: 1                     # required; only 1 exists
//! mode: enforce                  # enforce | audit; default enforce; a class may override
//! interfaces:                    # optional
//!   egress: [eth0]               # TC egress; omitted = every interface with a default
//!                                # route; [] = no TC egress hook at all
//!   gateway: [eth1]              # XDP on forwarded traffic; default none
//! exempt: [10.0.0.0/8]           # optional; always allowed (loopback and link-local
//!                                # always are, without being listed)
//! regions:                       # required, may be empty
//!   eu-west:                     # ids are 1-based, in file order
//!     cidrs: [198.51.100.0/24, "2001:db8:100::/48"]
//!     files: [regions/eu-west.txt]  # one CIDR per line, `#` comments; relative to the
//!                                   # policy file's directory
//! data_classes:                  # required, may be empty (then nothing is enforced);
//!   user-data:                   # first match wins, in file order
//!     match:                     # every listed selector must match; at least one
//!       cgroups: [/system.slice/user-api.service]  # cgroup2 path, descendants included
//!       marks: [{value: 0x10, mask: 0xff}]         # mask defaults to 0xffffffff
//!       dscp: [10]                                 # 0-63
//!       protocols: [tcp, udp]    # tcp, udp, sctp, icmp, icmpv6 (ipv6-icmp) or 0-255
//!       dst_ports: [443, "5432", "9000-9100"]      # 0-65535, ranges inclusive
//!       src_cidrs: [192.0.2.0/25]
//!     allow: [eu-west]           # regions this class may reach; default none
//!     unknown: deny              # destinations in no region: deny (default) | allow
//!     mode: audit                # optional override of the policy's mode
//! ```
//!
//! A CIDR may be a bare address (a /32 or /128), but never have host bits set. An exact
//! prefix belongs to at most one region; overlapping prefixes in different regions are
//! fine, the most specific one decides. Region and class names use letters, digits,
//! `-`, `_` and `.`.
//!
//! [`load_policy`] reads and validates, reporting every mistake it can find as
//! `FILE:LINE:COLUMN: message`; [`LoadedPolicy::compile`] produces what the datapath maps
//! hold.
#![forbid(unsafe_code)]

mod cidr;
mod compile;
mod error;
mod model;
mod raw;
mod trusted;
mod validate;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

pub use cidr::region_file_entries;
pub use compile::CompiledPolicy;
pub use datafence_common::DEFAULT_TABLE_CAPACITY;
pub use error::{PolicyError, PolicyErrors};
pub use model::{
    CGROUP_NOT_YET, CgroupNote, Class, ClassSummary, HostEssentials, InterfacesSummary, Listed,
    LoadedPolicy, Mode, Region, RegionSummary, Selectors, Summary, UnknownRule, Written,
};
pub use trusted::{DEFAULT_MAX_POLICY_BYTES, DEFAULT_MAX_REGION_FILE_BYTES};

/// Where the policy is checked against the running system and the datapath's sizes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// Mount point of the cgroup2 hierarchy that `cgroups` paths are resolved against.
    /// Default `/sys/fs/cgroup`.
    pub cgroup_root: PathBuf,
    /// Region prefixes allowed per address family, the size of one slot of the region
    /// tries. Default [`DEFAULT_TABLE_CAPACITY`].
    pub table_capacity: u32,
    /// The largest policy file read (`--max-policy-bytes`).
    pub max_policy_bytes: u64,
    /// The largest region file read (`--max-region-file-bytes`).
    pub max_region_file_bytes: u64,
    /// The most YAML nodes (scalars, lists and maps) a policy file may hold
    /// (`--max-yaml-nodes`). Region files are not YAML and do not count.
    pub max_yaml_nodes: usize,
}

/// Default of [`LoadOptions::max_yaml_nodes`]: serde-saphyr's own default, which bounds
/// the memory a hostile file can make the parser use. A policy of 16 classes and inline
/// prefix lists stays far below it; prefixes by the hundred thousand belong in region
/// files.
pub const DEFAULT_MAX_YAML_NODES: usize = 250_000;

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            table_capacity: DEFAULT_TABLE_CAPACITY,
            max_policy_bytes: DEFAULT_MAX_POLICY_BYTES,
            max_region_file_bytes: DEFAULT_MAX_REGION_FILE_BYTES,
            max_yaml_nodes: DEFAULT_MAX_YAML_NODES,
        }
    }
}

/// Reads the policy at `path` and the region files it names, and validates them.
///
/// A YAML syntax or shape error (unknown key, wrong type, missing key) stops at the first
/// one; past that every mistake is collected. Region files and cgroups are read while
/// validating, so the result describes the system at the time of the call.
pub fn load_policy(path: &Path, opts: &LoadOptions) -> Result<LoadedPolicy, PolicyErrors> {
    let text = validate::read(path, opts)?;
    parse_policy_str(&text, path, opts)
}

/// [`load_policy`] for a policy already in memory: `path` is only what errors and the
/// result name, and the directory that region files are relative to. The fuzz target
/// (fuzz/fuzz_targets/policy_parse.rs) drives this.
pub fn parse_policy_str(
    text: &str,
    path: &Path,
    opts: &LoadOptions,
) -> Result<LoadedPolicy, PolicyErrors> {
    validate::parse(text, path, opts)
}
