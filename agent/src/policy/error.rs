//! Validation errors: where a mistake is, and what it is.
#![forbid(unsafe_code)]

use std::fmt;
use std::io;
use std::path::PathBuf;

use datafence_common::{MAX_CLASSES, MAX_MARKS_PER_CLASS, MAX_PORT_RANGES_PER_CLASS, MAX_REGIONS};

/// One mistake in a policy, at a position in the policy file or a region file.
///
/// Displays as `FILE:LINE:COLUMN: message`, the form editors and CI logs turn into links.
/// `line` and `column` are 1-based; both are 0 when the mistake concerns a whole file (it
/// cannot be read, say), and the position is then left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    pub line: u64,
    pub column: u64,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            let file = self.file.display();
            write!(f, "{file}:{}:{}: {}", self.line, self.column, self.message)
        }
    }
}

impl std::error::Error for PolicyError {}

/// Every mistake found in a policy, in the order they were found (file order, mostly).
///
/// Displays one error per line. Never empty when returned by
/// [`load_policy`](super::load_policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, err) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{err}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// What is wrong with a CIDR, wherever it was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum CidrProblem {
    #[error("invalid CIDR `{0}`: expected ADDRESS/LENGTH such as 192.0.2.0/24 or 2001:db8::/32")]
    Syntax(String),
    #[error("invalid CIDR `{text}`: prefix length {len} is longer than {max}")]
    PrefixTooLong { text: String, len: u32, max: u8 },
    #[error("`{text}` has host bits set; did you mean {suggestion}?")]
    HostBits { text: String, suggestion: String },
}

/// The message of a [`PolicyError`], before it is given a position.
#[derive(Debug, thiserror::Error)]
pub(super) enum Problem {
    #[error("cannot read policy file: {0}")]
    ReadPolicy(io::Error),
    #[error("{0} is not valid UTF-8")]
    NotUtf8(String),
    /// Syntax and shape errors as the YAML parser words them for users.
    #[error("{0}")]
    Yaml(String),
    #[error(
        "the policy has more than {limit} YAML nodes (scalars, lists and maps); raise the limit with --max-yaml-nodes, or move long prefix lists into region files (`files:`), which are not YAML"
    )]
    TooManyYamlNodes { limit: usize },
    #[error(
        "the policy's YAML is over a limit of the parser's: {0}; a policy file is meant to be small, with long prefix lists in region files (`files:`)"
    )]
    YamlBudget(String),
    #[error("unsupported policy version {0}; this agent understands version 1")]
    Version(i128),
    #[error("invalid mode `{0}`: expected `enforce` or `audit`")]
    Mode(String),
    #[error("invalid unknown rule `{0}`: expected `deny` or `allow`")]
    Unknown(String),
    #[error("invalid {kind} name `{name}`: use only letters, digits, `-`, `_` and `.`")]
    Name { kind: &'static str, name: String },
    #[error("invalid interface name `{0}`: expected 1 to 15 bytes without `/`, `:` or whitespace")]
    Interface(String),
    #[error("invalid NAT64 prefix `{prefix}`: {detail}")]
    Nat64 { prefix: String, detail: String },
    #[error("invalid interface pattern `{pattern}`: {detail}")]
    InterfacePattern { pattern: String, detail: String },
    #[error(transparent)]
    Cidr(#[from] CidrProblem),
    #[error(
        "{prefix} is assigned to both region `{first}` and region `{second}` (first at \
         {first_at}); an exact prefix may belong to one region only"
    )]
    DuplicatePrefix {
        prefix: String,
        first: String,
        second: String,
        first_at: String,
    },
    #[error("cannot read region file {path}: {source}")]
    ReadRegionFile { path: String, source: io::Error },
    #[error(
        "{path} is outside the policy's directory {dir}; list the directory that holds it in `include_dirs` to read it"
    )]
    OutsidePolicyDirs { path: String, dir: String },
    #[error("and {0} more lines of this file are not CIDRs either; is it a region file?")]
    MoreUnreadableLines(usize),
    #[error("cannot read {path}: {source}")]
    ReadFile { path: String, source: io::Error },
    #[error("{path} is {kind}, not a regular file; only regular files are read")]
    NotRegularFile { path: String, kind: &'static str },
    #[error(
        "{path} is {size} bytes, over the limit of {limit} bytes; raise the limit with {flag} if the file is meant to be this large"
    )]
    FileTooLarge {
        path: String,
        size: u64,
        limit: u64,
        flag: &'static str,
    },
    #[error(
        "refusing {what} {path}: it {detail}. Files a policy is read from, and every directory above them up to the policy's directory, must be owned by root (or the agent's user) and writable by no one else, or whoever can write them changes what the host enforces"
    )]
    UntrustedFile {
        path: String,
        what: &'static str,
        detail: String,
    },
    #[error("region `{name}` is not defined ({defined})")]
    UndefinedRegion { name: String, defined: String },
    #[error(
        "`match` lists no selectors; list at least one of {}",
        crate::policy::Selectors::keys().join(", ")
    )]
    EmptyMatch,
    #[error("`{0}` is empty; list at least one value or remove the selector")]
    EmptySelector(&'static str),
    #[error("port {0} is out of range 0-65535")]
    PortOutOfRange(i128),
    #[error("invalid port range `{0}`: expected N or N-M, with N and M in 0-65535")]
    PortSyntax(String),
    #[error("port range {first}-{last} is reversed; did you mean {last}-{first}?")]
    PortReversed { first: u16, last: u16 },
    #[error(
        "`dst_ports` has {0} ranges after merging adjacent and overlapping ones; at most \
         {MAX_PORT_RANGES_PER_CLASS} are supported per class"
    )]
    TooManyPortRanges(usize),
    #[error("DSCP value {0} is out of range 0-63")]
    Dscp(i128),
    #[error("unknown protocol `{0}`: expected tcp, udp, sctp, icmp, icmpv6 or a number 0-255")]
    ProtocolName(String),
    #[error("protocol number {0} is out of range 0-255")]
    ProtocolNumber(i128),
    #[error("mark {field} {value} is out of range 0-0xffffffff")]
    MarkRange { field: &'static str, value: i128 },
    #[error("mark value {value:#x} has bits outside mask {mask:#x}, so it can never match")]
    MarkOutsideMask { value: u32, mask: u32 },
    #[error("{0} distinct marks listed; at most {MAX_MARKS_PER_CLASS} are supported per class")]
    TooManyMarks(usize),
    #[error("cgroup path `{0}` must be absolute (start with `/`), relative to the cgroup2 root")]
    CgroupRelative(String),
    #[error("cgroup path `{0}` must not contain `.` or `..` components")]
    CgroupDots(String),
    #[error(
        "cgroup path `/` is the root cgroup, which holds every process; remove the cgroups \
         selector to match regardless of cgroup"
    )]
    CgroupRoot,
    #[error("cgroup `{path}` under {root} is not a directory")]
    CgroupNotDir { path: String, root: String },
    #[error("cannot inspect cgroup `{path}` under {root}: {source}")]
    CgroupUnreadable {
        path: String,
        root: String,
        source: io::Error,
    },
    #[error("too many regions: {0} defined, at most {MAX_REGIONS} are supported")]
    TooManyRegions(usize),
    #[error("too many data classes: {0} defined, at most {MAX_CLASSES} are supported")]
    TooManyClasses(usize),
    #[error(
        "regions hold {count} distinct {family} prefixes, more than the table capacity of \
         {capacity} (raise --table-capacity)"
    )]
    RegionTableFull {
        family: &'static str,
        count: usize,
        capacity: u32,
    },
    #[error("`exempt` holds {count} distinct {family} prefixes, at most {limit} are supported")]
    ExemptFull {
        family: &'static str,
        count: usize,
        limit: u32,
    },
    #[error(
        "data classes list {count} distinct {family} source prefixes, at most {limit} are \
         supported"
    )]
    SrcCidrFull {
        family: &'static str,
        count: usize,
        limit: u32,
    },
    #[error("data classes list {count} distinct cgroups, at most {limit} are supported")]
    CgroupTableFull { count: usize, limit: u32 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_with_and_without_position() {
        let e = PolicyError {
            file: "p.yaml".into(),
            line: 3,
            column: 7,
            message: "bad".into(),
        };
        assert_eq!(e.to_string(), "p.yaml:3:7: bad");
        let whole = PolicyError {
            line: 0,
            column: 0,
            ..e.clone()
        };
        assert_eq!(whole.to_string(), "p.yaml: bad");
        assert_eq!(
            PolicyErrors(vec![e, whole]).to_string(),
            "p.yaml:3:7: bad\np.yaml: bad"
        );
    }
}
