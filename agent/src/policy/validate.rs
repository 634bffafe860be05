//! From the file as written to a [`LoadedPolicy`], collecting every mistake on the way.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use datafence_common::{
    MAX_CGROUP_ENTRIES, MAX_CLASSES, MAX_EXEMPT_ENTRIES, MAX_MARKS_PER_CLASS,
    MAX_PORT_RANGES_PER_CLASS, MAX_REGIONS, MAX_SRC_CIDR_ENTRIES, MarkMatch, SLOTS,
};
use indexmap::{IndexMap, IndexSet};
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use rayon::iter::{IntoParallelIterator as _, ParallelIterator as _};
use rayon::slice::ParallelSliceMut as _;
use serde_saphyr::{MessageFormatter, Spanned};
use sha2::{Digest, Sha256};

use super::LoadOptions;
use super::cidr::parse_cidr;
use super::error::{PolicyError, PolicyErrors, Problem};
use super::model::{Class, LoadedPolicy, Mode, Region, UnknownRule};
use super::raw::{Int, IntOrStr, RawClass, RawMark, RawMatch, RawPolicy, RawRegion};

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

/// One region prefix as read. Claims are sorted once all are read, which finds a prefix
/// written twice in far less memory than a hash of millions of prefixes.
#[derive(Clone, Copy)]
struct Claim {
    /// The address bits, split so the claim needs 8-byte alignment, not 16.
    hi: u64,
    lo: u64,
    /// The prefix length, plus 256 for IPv4 so the families never collide.
    kind: u16,
    region: u32,
    /// Reading order, so the first claim of a prefix is known.
    seq: u32,
    pos: Pos,
}

impl Claim {
    fn key(&self) -> (u64, u64, u16, u32) {
        (self.hi, self.lo, self.kind, self.seq)
    }
}

/// Reads the policy file as text; [`parse`] does the rest.
pub(super) fn read(path: &Path) -> Result<String, PolicyErrors> {
    let whole_file = |problem: Problem| {
        PolicyErrors(vec![PolicyError {
            file: path.to_owned(),
            line: 0,
            column: 0,
            message: problem.to_string(),
        }])
    };
    let bytes = fs::read(path).map_err(|e| whole_file(Problem::ReadPolicy(e)))?;
    String::from_utf8(bytes).map_err(|_| whole_file(Problem::NotUtf8("the policy file".to_owned())))
}

/// Parses and validates policy `text` as if read from `path`, whose directory region files
/// are relative to.
pub(super) fn parse(
    text: &str,
    path: &Path,
    opts: &LoadOptions,
) -> Result<LoadedPolicy, PolicyErrors> {
    let raw: RawPolicy = serde_saphyr::from_str(text).map_err(|e| {
        let location = e.location();
        let message = serde_saphyr::UserMessageFormatter.format_message(e.without_snippet());
        PolicyErrors(vec![PolicyError {
            file: path.to_owned(),
            line: location.map_or(0, |l| l.line()),
            column: location.map_or(0, |l| l.column()),
            message: Problem::Yaml(message.into_owned()).to_string(),
        }])
    })?;

    let mut hasher = Sha256::new();
    hasher.update(text.as_bytes());
    let mut v = Validator {
        opts,
        dir: path.parent().map(Path::to_owned).unwrap_or_default(),
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
    /// Indexed by [`Pos::file`].
    files: Vec<PathBuf>,
    errors: Vec<(Pos, PolicyError)>,
    hasher: Sha256,
}

/// Records a parsed region prefix: in its region's list, and as a claim.
fn record_prefix(set: &mut RegionSet, region: usize, net: IpNetwork, pos: Pos) {
    let (bits, kind) = match net {
        IpNetwork::V4(n) => {
            set.regions[region].v4.push(n);
            (
                u128::from(u32::from(n.network())),
                256 + u16::from(n.prefix()),
            )
        }
        IpNetwork::V6(n) => {
            set.regions[region].v6.push(n);
            (u128::from(n.network()), u16::from(n.prefix()))
        }
    };
    set.claims.push(Claim {
        hi: (bits >> 64) as u64,
        lo: bits as u64,
        kind,
        region: region as u32,
        seq: set.claims.len() as u32,
        pos,
    });
}

/// A region file as read, before it joins the policy.
enum RegionFile {
    Read {
        path: PathBuf,
        bytes: Vec<u8>,
        /// (line, column, prefix) for each line that holds one.
        lines: Vec<(u32, u32, Result<IpNetwork, super::error::CidrProblem>)>,
    },
    Failed(Problem),
}

/// Reads and parses one region file: one CIDR per line; `#` starts a comment, blank lines
/// are skipped. Needs nothing from the validator, so files are read in parallel.
fn read_region_file(path: &Path) -> RegionFile {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(source) => {
            let path = path.display().to_string();
            return RegionFile::Failed(Problem::ReadRegionFile { path, source });
        }
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        let what = format!("region file {}", path.display());
        return RegionFile::Failed(Problem::NotUtf8(what));
    };
    let mut lines = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let content = line.split('#').next().unwrap_or_default();
        let entry = content.trim();
        if entry.is_empty() {
            continue;
        }
        let indent = &content[..content.len() - content.trim_start().len()];
        lines.push((
            clamp(n as u64 + 1),
            clamp(indent.chars().count() as u64 + 1),
            parse_cidr(entry),
        ));
    }
    RegionFile::Read {
        path: path.to_owned(),
        bytes,
        lines,
    }
}

/// Regions as they are built: each prefix remembers its region and where it was written,
/// so a prefix claimed by a second region can name both.
#[derive(Default)]
struct RegionSet {
    regions: Vec<Region>,
    claims: Vec<Claim>,
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
        let (egress_interfaces, gateway_interfaces) = match &raw.interfaces {
            Some(i) => (
                i.egress.as_ref().map(|e| self.interfaces(e)),
                self.interfaces(&i.gateway),
            ),
            None => (None, Vec::new()),
        };
        let exempt = self.exempt(raw.exempt.as_ref());
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
            exempt,
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

    fn regions(&mut self, raw: &Spanned<IndexMap<Spanned<String>, RawRegion>>) -> Vec<Region> {
        if raw.value.len() > MAX_REGIONS {
            let (name, _) = raw.value.get_index(MAX_REGIONS).expect("length checked");
            self.error(at(name), Problem::TooManyRegions(raw.value.len()));
        }
        // Region files hold nearly all of a large policy: read and parse them on every
        // core, then record them in order.
        let dir = self.dir.clone();
        let mut read: std::collections::VecDeque<RegionFile> = raw
            .value
            .values()
            .flat_map(|r| r.files.iter())
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|f| read_region_file(&dir.join(&f.value)))
            .collect::<Vec<_>>()
            .into();
        let mut set = RegionSet::default();
        for (index, (name, region)) in raw.value.iter().enumerate() {
            self.name("region", name);
            set.regions.push(Region {
                name: name.value.clone(),
                // Past MAX_REGIONS the policy is refused anyway; the id only has to exist.
                id: u8::try_from(index + 1).unwrap_or(u8::MAX),
                v4: Vec::new(),
                v6: Vec::new(),
            });
            for cidr in &region.cidrs {
                self.region_prefix(&mut set, index, &cidr.value, at(cidr));
            }
            for file in &region.files {
                let contents = read.pop_front().expect("one read per file");
                self.region_file(&mut set, index, file, contents);
            }
        }
        self.settle_claims(&mut set);
        let capacity = self.opts.table_capacity;
        let v4: usize = set.regions.iter().map(|r| r.v4.len()).sum();
        let v6: usize = set.regions.iter().map(|r| r.v6.len()).sum();
        for (family, count) in [("IPv4", v4), ("IPv6", v6)] {
            if count > capacity as usize {
                self.error(
                    at(raw),
                    Problem::RegionTableFull {
                        family,
                        count,
                        capacity,
                    },
                );
            }
        }
        set.regions
    }

    fn region_prefix(&mut self, set: &mut RegionSet, region: usize, text: &str, pos: Pos) {
        match parse_cidr(text) {
            Ok(net) => record_prefix(set, region, net, pos),
            Err(p) => self.error(pos, p.into()),
        }
    }

    /// Refuses a prefix claimed by two regions, naming both. A prefix written again, in
    /// the same region (harmless repetition) or another (an error), is kept only where
    /// it was first written.
    fn settle_claims(&mut self, set: &mut RegionSet) {
        let mut claims = std::mem::take(&mut set.claims);
        // Millions of claims at GeoIP scale: sort on every core.
        claims.par_sort_unstable_by_key(Claim::key);
        let mut repeats: Vec<u32> = Vec::new();
        for run in claims.chunk_by(|a, b| (a.hi, a.lo, a.kind) == (b.hi, b.lo, b.kind)) {
            let first = run[0];
            for later in &run[1..] {
                repeats.push(later.seq);
                if later.region == first.region {
                    continue;
                }
                let bits = (u128::from(first.hi) << 64) | u128::from(first.lo);
                let prefix = if first.kind >= 256 {
                    format!(
                        "{}/{}",
                        std::net::Ipv4Addr::from(bits as u32),
                        first.kind - 256
                    )
                } else {
                    format!("{}/{}", std::net::Ipv6Addr::from(bits), first.kind)
                };
                let problem = Problem::DuplicatePrefix {
                    prefix,
                    first: set.regions[first.region as usize].name.clone(),
                    second: set.regions[later.region as usize].name.clone(),
                    first_at: self.describe(first.pos),
                };
                self.error(later.pos, problem);
            }
        }
        if repeats.is_empty() {
            return;
        }
        // Rare: rebuild the regions' lists in reading order without the repeats.
        repeats.sort_unstable();
        claims.sort_unstable_by_key(|c| c.seq);
        for r in &mut set.regions {
            r.v4.clear();
            r.v6.clear();
        }
        for c in claims
            .iter()
            .filter(|c| repeats.binary_search(&c.seq).is_err())
        {
            let region = &mut set.regions[c.region as usize];
            let bits = (u128::from(c.hi) << 64) | u128::from(c.lo);
            if c.kind >= 256 {
                let addr = std::net::Ipv4Addr::from(bits as u32);
                region
                    .v4
                    .extend(Ipv4Network::new(addr, (c.kind - 256) as u8));
            } else {
                let addr = std::net::Ipv6Addr::from(bits);
                region.v6.extend(Ipv6Network::new(addr, c.kind as u8));
            }
        }
    }

    /// Records a region file read by [`read_region_file`]: its bytes join the policy's
    /// hash and its prefixes their region, in reading order.
    fn region_file(
        &mut self,
        set: &mut RegionSet,
        region: usize,
        file: &Spanned<String>,
        read: RegionFile,
    ) {
        let (path, bytes, lines) = match read {
            RegionFile::Read { path, bytes, lines } => (path, bytes, lines),
            RegionFile::Failed(problem) => return self.error(at(file), problem),
        };
        self.hasher.update(&bytes);
        drop(bytes);
        self.files.push(path);
        let file_index = clamp(self.files.len() as u64 - 1);
        for (line, column, parsed) in lines {
            let pos = Pos {
                file: file_index,
                line,
                column,
            };
            match parsed {
                Ok(net) => record_prefix(set, region, net, pos),
                Err(p) => self.error(pos, p.into()),
            }
        }
    }

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

        let cgroups: HashSet<u64> = classes
            .iter()
            .flat_map(|c| c.cgroups.iter().map(|&(_, id)| id))
            .collect();
        let limit = MAX_CGROUP_ENTRIES / SLOTS;
        if cgroups.len() > limit as usize {
            let count = cgroups.len();
            self.error(at(raw), Problem::CgroupTableFull { count, limit });
        }
        let src: HashSet<IpNetwork> = classes
            .iter()
            .flat_map(|c| c.src_cidrs.iter().copied())
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
            match region_ids.get(region.value.as_str()) {
                Some(&id) => {
                    allow.insert(id);
                }
                None => {
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
        }
        let m: &RawMatch = &raw.selectors.value;
        let any_selector = m.cgroups.is_some()
            || m.marks.is_some()
            || m.dscp.is_some()
            || m.protocols.is_some()
            || m.dst_ports.is_some()
            || m.src_cidrs.is_some();
        if !any_selector {
            self.error(at(&raw.selectors), Problem::EmptyMatch);
        }
        Class {
            name: name.value.clone(),
            id: u8::try_from(index).unwrap_or(u8::MAX),
            mode,
            unknown,
            allow: allow.into_iter().collect(),
            cgroups: self.selector("cgroups", m.cgroups.as_ref(), |v, items| {
                let mut out = IndexMap::new();
                for item in &items.value {
                    if let Some((path, id)) = v.cgroup(item) {
                        out.insert(path, id);
                    }
                }
                out.into_iter().collect()
            }),
            marks: self.selector("marks", m.marks.as_ref(), Self::marks),
            dscp: self.selector("dscp", m.dscp.as_ref(), |v, items| {
                let mut out = BTreeSet::new();
                for item in &items.value {
                    match u8::try_from(item.value.0) {
                        Ok(d) if d < 64 => {
                            out.insert(d);
                        }
                        _ => v.error(at(item), Problem::Dscp(item.value.0)),
                    }
                }
                out.into_iter().collect()
            }),
            protocols: self.selector("protocols", m.protocols.as_ref(), |v, items| {
                let mut out = BTreeSet::new();
                for item in &items.value {
                    match protocol(&item.value) {
                        Ok(p) => {
                            out.insert(p);
                        }
                        Err(problem) => v.error(at(item), problem),
                    }
                }
                out.into_iter().collect()
            }),
            port_ranges: self.selector("dst_ports", m.dst_ports.as_ref(), Self::ports),
            src_cidrs: self.selector("src_cidrs", m.src_cidrs.as_ref(), |v, items| {
                let mut out = IndexSet::new();
                for item in &items.value {
                    match parse_cidr(&item.value) {
                        Ok(net) => {
                            out.insert(net);
                        }
                        Err(p) => v.error(at(item), p.into()),
                    }
                }
                out.into_iter().collect()
            }),
        }
    }

    /// Runs `check` on a listed selector; an absent one yields an empty list, and so does
    /// an empty one, after reporting it: a selector listed with no values could never
    /// match, which is never what was meant.
    fn selector<T, R>(
        &mut self,
        key: &'static str,
        raw: Option<&Spanned<Vec<T>>>,
        check: impl FnOnce(&mut Self, &Spanned<Vec<T>>) -> Vec<R>,
    ) -> Vec<R> {
        let Some(raw) = raw else {
            return Vec::new();
        };
        if raw.value.is_empty() {
            self.error(at(raw), Problem::EmptySelector(key));
            return Vec::new();
        }
        check(self, raw)
    }

    fn cgroup(&mut self, raw: &Spanned<String>) -> Option<(String, u64)> {
        match resolve_cgroup(&self.opts.cgroup_root, &raw.value) {
            Ok(found) => Some(found),
            Err(problem) => {
                self.error(at(raw), problem);
                None
            }
        }
    }

    fn marks(&mut self, raw: &Spanned<Vec<Spanned<RawMark>>>) -> Vec<MarkMatch> {
        let mut out = IndexSet::new();
        for item in &raw.value {
            let RawMark { value, mask } = item.value;
            let mut field = |field: &'static str, Int(n): Int| {
                u32::try_from(n).map_err(|_| {
                    self.error(at(item), Problem::MarkRange { field, value: n });
                })
            };
            let value = field("value", value);
            let mask = field("mask", mask.unwrap_or(Int(u32::MAX.into())));
            let (Ok(value), Ok(mask)) = (value, mask) else {
                continue;
            };
            if value & !mask != 0 {
                self.error(at(item), Problem::MarkOutsideMask { value, mask });
                continue;
            }
            out.insert((value, mask));
        }
        if out.len() > MAX_MARKS_PER_CLASS {
            self.error(at(raw), Problem::TooManyMarks(out.len()));
        }
        out.into_iter()
            .map(|(value, mask)| MarkMatch { value, mask })
            .collect()
    }

    fn ports(&mut self, raw: &Spanned<Vec<Spanned<IntOrStr>>>) -> Vec<(u16, u16)> {
        let mut ranges = Vec::new();
        for item in &raw.value {
            match port_range(&item.value) {
                Ok(r) => ranges.push(r),
                Err(problem) => self.error(at(item), problem),
            }
        }
        let merged = merge_ranges(ranges);
        if merged.len() > MAX_PORT_RANGES_PER_CLASS {
            self.error(at(raw), Problem::TooManyPortRanges(merged.len()));
        }
        merged
    }
}

fn protocol(raw: &IntOrStr) -> Result<u8, Problem> {
    match raw {
        IntOrStr::Int(n) => u8::try_from(*n).map_err(|_| Problem::ProtocolNumber(*n)),
        IntOrStr::Str(s) => Ok(match s.to_ascii_lowercase().as_str() {
            "icmp" => 1,
            "tcp" => 6,
            "udp" => 17,
            "icmpv6" | "ipv6-icmp" => 58,
            "sctp" => 132,
            _ => return Err(Problem::ProtocolName(s.clone())),
        }),
    }
}

/// `443`, `"443"` or `"9000-9100"`.
fn port_range(raw: &IntOrStr) -> Result<(u16, u16), Problem> {
    let text = match raw {
        IntOrStr::Int(n) => {
            let port = u16::try_from(*n).map_err(|_| Problem::PortOutOfRange(*n))?;
            return Ok((port, port));
        }
        IntOrStr::Str(s) => s.as_str(),
    };
    let number = |part: &str| -> Result<u16, Problem> {
        let part = part.trim();
        if part.is_empty() || part.len() > 10 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(Problem::PortSyntax(text.to_owned()));
        }
        let n: i128 = part
            .parse()
            .map_err(|_| Problem::PortSyntax(text.to_owned()))?;
        u16::try_from(n).map_err(|_| Problem::PortOutOfRange(n))
    };
    match text.split_once('-') {
        None => number(text).map(|p| (p, p)),
        Some((first, last)) => {
            let (first, last) = (number(first)?, number(last)?);
            if first > last {
                return Err(Problem::PortReversed { first, last });
            }
            Ok((first, last))
        }
    }
}

/// Sorts inclusive ranges and merges those that overlap or touch, so the datapath's
/// bounded loop sees as few as possible.
pub(super) fn merge_ranges(mut ranges: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
    ranges.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
    for (first, last) in ranges {
        match out.last_mut() {
            Some(prev) if u32::from(first) <= u32::from(prev.1) + 1 => {
                prev.1 = prev.1.max(last);
            }
            _ => out.push((first, last)),
        }
    }
    out
}

/// The cgroup's path as written (without a trailing `/`) and its id. cgroup2 ids are the
/// inode numbers of the cgroup directories, which is what `bpf_skb_cgroup_id` and
/// `bpf_skb_ancestor_cgroup_id` report.
fn resolve_cgroup(root: &Path, written: &str) -> Result<(String, u64), Problem> {
    let Some(relative) = written.strip_prefix('/') else {
        return Err(Problem::CgroupRelative(written.to_owned()));
    };
    let relative = relative.trim_end_matches('/');
    if relative.is_empty() {
        return Err(Problem::CgroupRoot);
    }
    if relative.split('/').any(|c| c == "." || c == "..") {
        return Err(Problem::CgroupDots(written.to_owned()));
    }
    let describe = || (format!("/{relative}"), root.display().to_string());
    match fs::metadata(root.join(relative)) {
        Ok(meta) if meta.is_dir() => Ok((format!("/{relative}"), meta.ino())),
        Ok(_) => {
            let (path, root) = describe();
            Err(Problem::CgroupNotDir { path, root })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let (path, root) = describe();
            Err(Problem::CgroupMissing { path, root })
        }
        Err(source) => {
            let (path, root) = describe();
            Err(Problem::CgroupUnreadable { path, root, source })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_when_overlapping_or_adjacent() {
        assert_eq!(
            merge_ranges(vec![
                (443, 443),
                (9000, 9100),
                (80, 80),
                (444, 500),
                (9050, 9200)
            ]),
            vec![(80, 80), (443, 500), (9000, 9200)]
        );
        assert_eq!(
            merge_ranges(vec![(0, 65535), (65535, 65535)]),
            vec![(0, 65535)]
        );
        assert_eq!(
            merge_ranges(vec![(10, 10), (12, 12)]),
            vec![(10, 10), (12, 12)]
        );
    }

    #[test]
    fn port_syntax() {
        let s = |t: &str| port_range(&IntOrStr::Str(t.to_owned()));
        assert_eq!(s("5432").unwrap(), (5432, 5432));
        assert_eq!(s("9000-9100").unwrap(), (9000, 9100));
        assert_eq!(s(" 1 - 2 ").unwrap(), (1, 2));
        assert_eq!(port_range(&IntOrStr::Int(0)).unwrap(), (0, 0));
        assert!(matches!(s("1-2-3"), Err(Problem::PortSyntax(_))));
        assert!(matches!(s("-5"), Err(Problem::PortSyntax(_))));
        assert!(matches!(s("http"), Err(Problem::PortSyntax(_))));
        assert!(matches!(s("70000"), Err(Problem::PortOutOfRange(70000))));
        assert!(matches!(
            port_range(&IntOrStr::Int(-1)),
            Err(Problem::PortOutOfRange(-1))
        ));
    }

    #[test]
    fn protocol_names_and_numbers() {
        let s = |t: &str| protocol(&IntOrStr::Str(t.to_owned()));
        assert_eq!(s("tcp").unwrap(), 6);
        assert_eq!(s("UDP").unwrap(), 17);
        assert_eq!(s("ipv6-icmp").unwrap(), 58);
        assert_eq!(protocol(&IntOrStr::Int(255)).unwrap(), 255);
        assert!(matches!(s("tpc"), Err(Problem::ProtocolName(_))));
        assert!(matches!(
            protocol(&IntOrStr::Int(256)),
            Err(Problem::ProtocolNumber(256))
        ));
    }
}
