//! From the file as written to a [`LoadedPolicy`], collecting every mistake on the way.
//!
//! The validator reads the policy file's own fields here; [`regions`] reads the regions
//! and their files, and [`selectors`] the values of class selectors.
#![forbid(unsafe_code)]

mod regions;
mod selectors;

#[cfg(test)]
pub(in crate::policy) use regions::PIECE_BYTES;
pub(super) use selectors::RawMatch;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use datafence_common::{
    MAX_CGROUP_ENTRIES, MAX_CLASSES, MAX_EXEMPT_ENTRIES, MAX_NAT64_PREFIXES, MAX_SRC_CIDR_ENTRIES,
    SLOTS,
};
use indexmap::{IndexMap, IndexSet};
use ipnetwork::IpNetwork;
use serde_saphyr::{MessageFormatter, Spanned};
use sha2::{Digest, Sha256};

use super::LoadOptions;
use super::cidr::parse_cidr;
use super::error::{PolicyError, PolicyErrors, Problem};
use super::model::{Class, HostEssentials, LoadedPolicy, Mode, Region, UnknownRule};
use super::raw::{RawClass, RawHostEssentials, RawPolicy};
use super::trusted::{Roots, SizeLimit, read_trusted, trusted_dir};

/// A position in one of the files a policy is read from. Files are numbered so the
/// origin of each of possibly millions of region prefixes costs a few bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pos {
    file: u32,
    line: u32,
    column: u32,
}

const POLICY_FILE: u32 = 0;

/// Lines and columns past u32 are clamped; no policy file comes near.
fn clamp(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

fn at<T>(s: &Spanned<T>) -> Pos {
    Pos {
        file: POLICY_FILE,
        line: clamp(s.referenced.line()),
        column: clamp(s.referenced.column()),
    }
}

/// The parser's limits: its defaults, but for the node limit, which is ours to state
/// (`--max-yaml-nodes`), and those that follow from it and from the file's size limit.
fn yaml_options(opts: &LoadOptions) -> serde_saphyr::Options {
    let mut budget = serde_saphyr::Budget::default();
    budget.max_nodes = opts.max_yaml_nodes;
    // Every node is one event, or two for a list or map: the node limit is the one a
    // user meets, not this one.
    budget.max_events = budget.max_events.max(opts.max_yaml_nodes.saturating_mul(3));
    let file_bytes = usize::try_from(opts.max_policy_bytes).unwrap_or(usize::MAX);
    budget.max_total_scalar_bytes = budget.max_total_scalar_bytes.max(file_bytes);
    let mut options = serde_saphyr::Options::default();
    options.budget = Some(budget);
    options
}

/// The switches as written; one left out is on.
fn host_essentials(raw: &RawHostEssentials) -> HostEssentials {
    let on = HostEssentials::default();
    HostEssentials {
        dhcp: raw.dhcp.unwrap_or(on.dhcp),
        neighbor_discovery: raw.neighbor_discovery.unwrap_or(on.neighbor_discovery),
        link_multicast: raw.link_multicast.unwrap_or(on.link_multicast),
    }
}

/// The directory a policy's region files are relative to, and its trust boundary.
fn policy_dir(path: &Path) -> PathBuf {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_owned)
}

/// Reads the policy file as text, if it may be trusted; [`parse`] does the rest.
pub(super) fn read(path: &Path, opts: &LoadOptions) -> Result<String, PolicyErrors> {
    let whole_file = |problem: Problem| {
        PolicyErrors(vec![PolicyError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            message: problem.to_string(),
        }])
    };
    let limit = SizeLimit {
        bytes: opts.max_policy_bytes,
        flag: "--max-policy-bytes",
    };
    let bytes =
        read_trusted(path, &Roots::of_policy(&policy_dir(path)), limit).map_err(|problem| {
            whole_file(match problem {
                Problem::ReadFile { source, .. } => Problem::ReadPolicy(source),
                other => other,
            })
        })?;
    String::from_utf8(bytes).map_err(|_| whole_file(Problem::NotUtf8("the policy file".to_owned())))
}

/// Parses and validates policy `text` as if read from `path`, whose directory region files
/// are relative to.
pub(super) fn parse(
    text: &str,
    path: &Path,
    opts: &LoadOptions,
) -> Result<LoadedPolicy, PolicyErrors> {
    let raw: RawPolicy =
        serde_saphyr::from_str_with_options(text, yaml_options(opts)).map_err(|e| {
            let location = e.location();
            let problem = match e.without_snippet() {
                serde_saphyr::Error::Budget {
                    breach: serde_saphyr::budget::BudgetBreach::Nodes { .. },
                    ..
                } => Problem::TooManyYamlNodes {
                    limit: opts.max_yaml_nodes,
                },
                serde_saphyr::Error::Budget { breach, .. } => {
                    Problem::YamlBudget(format!("{breach:?}"))
                }
                other => Problem::Yaml(
                    serde_saphyr::UserMessageFormatter
                        .format_message(other)
                        .into_owned(),
                ),
            };
            PolicyErrors(vec![PolicyError {
                file: path.to_owned(),
                line: location.map_or(0, |l| l.line()),
                column: location.map_or(0, |l| l.column()),
                message: problem.to_string(),
            }])
        })?;

    let mut hasher = Sha256::new();
    hasher.update(text.as_bytes());
    let dir = policy_dir(path);
    let mut v = Validator {
        opts,
        roots: Roots::of_policy(&dir),
        dir,
        files: vec![path.to_owned()],
        errors: Vec::new(),
        hasher,
    };
    let policy = v.policy(path, &raw);
    if v.errors.is_empty() {
        return Ok(policy);
    }
    // Checks run in an order convenient for validation, not for reading: report by
    // position, the policy file first, then region files in the order they were named.
    v.errors
        .sort_by_key(|(pos, _)| (pos.file, pos.line, pos.column));
    Err(PolicyErrors(v.errors.into_iter().map(|(_, e)| e).collect()))
}

struct Validator<'a> {
    opts: &'a LoadOptions,
    /// Region files are relative to the policy file's directory.
    dir: PathBuf,
    /// Where region files may come from: that directory and the policy's `include_dirs`.
    roots: Roots,
    /// Indexed by [`Pos::file`].
    files: Vec<PathBuf>,
    errors: Vec<(Pos, PolicyError)>,
    hasher: Sha256,
}

impl Validator<'_> {
    fn error(&mut self, pos: Pos, problem: Problem) {
        let error = PolicyError {
            file: self.files[pos.file as usize].clone(),
            line: u64::from(pos.line),
            column: u64::from(pos.column),
            message: problem.to_string(),
        };
        self.errors.push((pos, error));
    }

    /// Adds each directory `include_dirs` lists (relative to the policy's directory, or
    /// absolute) to where region files may come from, if it may be trusted.
    fn include_dirs(&mut self, dirs: &[Spanned<String>]) {
        for d in dirs {
            match trusted_dir(&self.dir.join(&d.value)) {
                Ok(dir) => self.roots.0.push(dir),
                Err(problem) => self.error(at(d), problem),
            }
        }
    }

    fn describe(&self, pos: Pos) -> String {
        format!(
            "{}:{}:{}",
            self.files[pos.file as usize].display(),
            pos.line,
            pos.column
        )
    }

    fn policy(&mut self, path: &Path, raw: &RawPolicy) -> LoadedPolicy {
        if raw.version.value.0 != 1 {
            self.error(at(&raw.version), Problem::Version(raw.version.value.0));
        }
        let mode = self.mode(raw.mode.as_ref()).unwrap_or_default();
        let (egress_interfaces, gateway_interfaces, excluded_interfaces) = match &raw.interfaces {
            Some(i) => (
                i.egress.as_ref().map(|e| self.interfaces(e)),
                self.interfaces(&i.gateway),
                self.interface_patterns(&i.exclude),
            ),
            None => (None, Vec::new(), Vec::new()),
        };
        let exempt = self.exempt(raw.exempt.as_ref());
        let nat64_prefixes = self.nat64(&raw.nat64);
        self.include_dirs(&raw.include_dirs);
        let regions = self.regions(&raw.regions);
        let classes = self.classes(&raw.data_classes, mode, &regions);
        let hasher = std::mem::take(&mut self.hasher);
        LoadedPolicy {
            path: path.to_owned(),
            sha256: hex::encode(hasher.finalize()),
            sources: self.files.clone(),
            version: 1,
            mode,
            egress_interfaces,
            gateway_interfaces,
            excluded_interfaces,
            exempt,
            nat64_prefixes,
            host_essentials: host_essentials(&raw.host_essentials),
            regions,
            classes,
        }
    }

    fn mode(&mut self, raw: Option<&Spanned<String>>) -> Option<Mode> {
        let raw = raw?;
        match raw.value.as_str() {
            "enforce" => Some(Mode::Enforce),
            "audit" => Some(Mode::Audit),
            other => {
                self.error(at(raw), Problem::Mode(other.to_owned()));
                None
            }
        }
    }

    fn unknown_rule(&mut self, raw: Option<&Spanned<String>>) -> UnknownRule {
        let Some(raw) = raw else {
            return UnknownRule::Deny;
        };
        match raw.value.as_str() {
            "deny" => UnknownRule::Deny,
            "allow" => UnknownRule::Allow,
            other => {
                self.error(at(raw), Problem::Unknown(other.to_owned()));
                UnknownRule::Deny
            }
        }
    }

    fn name(&mut self, kind: &'static str, raw: &Spanned<String>) {
        let ok = !raw.value.is_empty()
            && raw
                .value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !ok {
            let name = raw.value.clone();
            self.error(at(raw), Problem::Name { kind, name });
        }
    }

    fn interfaces(&mut self, raw: &[Spanned<String>]) -> Vec<String> {
        let mut names = IndexSet::new();
        for name in raw {
            // IFNAMSIZ is 16 with the terminating NUL; the kernel refuses `/`, `:` and
            // whitespace in names.
            let ok = !name.value.is_empty()
                && name.value.len() < 16
                && name.value != "."
                && name.value != ".."
                && !name
                    .value
                    .chars()
                    .any(|c| c == '/' || c == ':' || c.is_whitespace());
            if ok {
                names.insert(name.value.clone());
            } else {
                self.error(at(name), Problem::Interface(name.value.clone()));
            }
        }
        names.into_iter().collect()
    }

    /// Glob patterns (`veth*`, `cali?????`) for interfaces left alone when every
    /// interface is attached.
    fn interface_patterns(&mut self, raw: &[Spanned<String>]) -> Vec<String> {
        let mut patterns = IndexSet::new();
        for pattern in raw {
            let problem = if pattern.value.is_empty() {
                Some("a pattern cannot be empty".to_owned())
            } else if pattern.value.contains('/') {
                Some("interface names never contain `/`".to_owned())
            } else {
                globset::Glob::new(&pattern.value)
                    .err()
                    .map(|e| e.kind().to_string())
            };
            match problem {
                None => {
                    patterns.insert(pattern.value.clone());
                }
                Some(detail) => self.error(
                    at(pattern),
                    Problem::InterfacePattern {
                        pattern: pattern.value.clone(),
                        detail,
                    },
                ),
            }
        }
        patterns.into_iter().collect()
    }

    /// NAT64 prefixes besides the well-known `64:ff9b::/96`: `/96` only, the length
    /// that keeps the IPv4 address in the last four bytes (RFC 6052, section 2.2).
    fn nat64(&mut self, raw: &[Spanned<String>]) -> Vec<ipnetwork::Ipv6Network> {
        let mut prefixes = IndexSet::new();
        for entry in raw {
            let problem = match parse_cidr(&entry.value) {
                Ok(IpNetwork::V6(net)) if net.prefix() == 96 => {
                    if prefixes.len() == MAX_NAT64_PREFIXES && !prefixes.contains(&net) {
                        Some(format!(
                            "at most {MAX_NAT64_PREFIXES} NAT64 prefixes besides 64:ff9b::/96"
                        ))
                    } else {
                        prefixes.insert(net);
                        None
                    }
                }
                Ok(IpNetwork::V6(_)) => Some(
                    "only /96 prefixes are supported, which put the IPv4 address in the last four bytes".to_owned(),
                ),
                Ok(IpNetwork::V4(_)) => Some("a NAT64 prefix is an IPv6 prefix".to_owned()),
                Err(p) => Some(p.to_string()),
            };
            if let Some(detail) = problem {
                self.error(
                    at(entry),
                    Problem::Nat64 {
                        prefix: entry.value.clone(),
                        detail,
                    },
                );
            }
        }
        prefixes.into_iter().collect()
    }

    fn exempt(&mut self, raw: Option<&Spanned<Vec<Spanned<String>>>>) -> Vec<IpNetwork> {
        let Some(raw) = raw else {
            return Vec::new();
        };
        let mut nets = IndexSet::new();
        for entry in &raw.value {
            match parse_cidr(&entry.value) {
                Ok(net) => {
                    nets.insert(net);
                }
                Err(p) => self.error(at(entry), p.into()),
            }
        }
        let limit = MAX_EXEMPT_ENTRIES / SLOTS;
        let v4 = nets.iter().filter(|n| n.is_ipv4()).count();
        for (family, count) in [("IPv4", v4), ("IPv6", nets.len() - v4)] {
            if count > limit as usize {
                self.error(
                    at(raw),
                    Problem::ExemptFull {
                        family,
                        count,
                        limit,
                    },
                );
            }
        }
        nets.into_iter().collect()
    }
}

impl Validator<'_> {
    fn classes(
        &mut self,
        raw: &Spanned<IndexMap<Spanned<String>, RawClass>>,
        policy_mode: Mode,
        regions: &[Region],
    ) -> Vec<Class> {
        if raw.value.len() > MAX_CLASSES {
            let (name, _) = raw.value.get_index(MAX_CLASSES).expect("length checked");
            self.error(at(name), Problem::TooManyClasses(raw.value.len()));
        }
        let region_ids: HashMap<&str, u8> =
            regions.iter().map(|r| (r.name.as_str(), r.id)).collect();
        let classes: Vec<Class> = raw
            .value
            .iter()
            .enumerate()
            .map(|(index, (name, class))| {
                self.class(index, name, class, policy_mode, &region_ids, regions)
            })
            .collect();

        // A cgroup that does not exist yet takes an entry once it does.
        let cgroups: HashSet<&str> = classes
            .iter()
            .flat_map(|c| c.selectors.cgroups.iter().map(|(path, _)| path.as_str()))
            .collect();
        let limit = MAX_CGROUP_ENTRIES / SLOTS;
        if cgroups.len() > limit as usize {
            let count = cgroups.len();
            self.error(at(raw), Problem::CgroupTableFull { count, limit });
        }
        let src: HashSet<IpNetwork> = classes
            .iter()
            .flat_map(|c| c.selectors.src_cidrs.iter().copied())
            .collect();
        let limit = MAX_SRC_CIDR_ENTRIES / SLOTS;
        let v4 = src.iter().filter(|n| n.is_ipv4()).count();
        for (family, count) in [("IPv4", v4), ("IPv6", src.len() - v4)] {
            if count > limit as usize {
                self.error(
                    at(raw),
                    Problem::SrcCidrFull {
                        family,
                        count,
                        limit,
                    },
                );
            }
        }
        classes
    }

    fn class(
        &mut self,
        index: usize,
        name: &Spanned<String>,
        raw: &RawClass,
        policy_mode: Mode,
        region_ids: &HashMap<&str, u8>,
        regions: &[Region],
    ) -> Class {
        self.name("data class", name);
        let mode = self.mode(raw.mode.as_ref()).unwrap_or(policy_mode);
        let unknown = self.unknown_rule(raw.unknown.as_ref());
        let mut allow = IndexSet::new();
        for region in &raw.allow {
            if let Some(&id) = region_ids.get(region.value.as_str()) {
                allow.insert(id);
            } else {
                let defined = if regions.is_empty() {
                    "no regions are defined".to_owned()
                } else {
                    let names: Vec<&str> = regions.iter().map(|r| r.name.as_str()).collect();
                    format!("defined: {}", names.join(", "))
                };
                let name = region.value.clone();
                self.error(at(region), Problem::UndefinedRegion { name, defined });
            }
        }
        Class {
            name: name.value.clone(),
            id: u8::try_from(index).unwrap_or(u8::MAX),
            mode,
            unknown,
            allow: allow.into_iter().collect(),
            selectors: self.selectors(&raw.selectors),
        }
    }
}
