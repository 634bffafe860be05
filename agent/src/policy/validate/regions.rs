//! Regions: their prefixes, written in the policy or in region files, and the rule that
//! a prefix belongs to one region only.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use datafence_common::MAX_REGIONS;
use indexmap::IndexMap;
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use rayon::iter::{
    IndexedParallelIterator as _, IntoParallelIterator as _, IntoParallelRefIterator as _,
    ParallelExtend as _, ParallelIterator as _,
};
use rayon::slice::ParallelSliceMut as _;
use serde_saphyr::Spanned;
use sha2::Digest;

use super::{Pos, Validator, at, clamp};
use crate::policy::{
    cidr::parse_cidr,
    error::{CidrProblem, Problem},
    model::Region,
    raw::RawRegion,
    trusted::{Roots, SizeLimit, read_trusted},
};

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

impl Claim {
    /// The claim of `region` on `net`, the `seq`th prefix read, written at `pos`.
    fn of(net: IpNetwork, region: usize, seq: usize, pos: Pos) -> Self {
        let (bits, kind) = match net {
            IpNetwork::V4(n) => (
                u128::from(u32::from(n.network())),
                256 + u16::from(n.prefix()),
            ),
            IpNetwork::V6(n) => (u128::from(n.network()), u16::from(n.prefix())),
        };
        Claim {
            hi: (bits >> 64) as u64,
            lo: bits as u64,
            kind,
            region: region as u32,
            seq: seq as u32,
            pos,
        }
    }
}

/// Records a parsed region prefix: in its region's list, and as a claim.
fn record_prefix(set: &mut RegionSet, region: usize, net: IpNetwork, pos: Pos) {
    match net {
        IpNetwork::V4(n) => set.regions[region].v4.push(n),
        IpNetwork::V6(n) => set.regions[region].v6.push(n),
    }
    let claim = Claim::of(net, region, set.claims.len(), pos);
    set.claims.push(claim);
}

/// Records a region file's prefixes, as [`record_prefix`] does one by one: a million-line
/// file's claims are made on every core.
fn record_file_prefixes(
    set: &mut RegionSet,
    region: usize,
    prefixes: &[(u32, u32, IpNetwork)],
    pos: impl Fn(u32, u32) -> Pos + Sync,
) {
    let lists = &mut set.regions[region];
    lists
        .v4
        .extend(prefixes.iter().filter_map(|&(_, _, net)| match net {
            IpNetwork::V4(n) => Some(n),
            IpNetwork::V6(_) => None,
        }));
    lists
        .v6
        .extend(prefixes.iter().filter_map(|&(_, _, net)| match net {
            IpNetwork::V6(n) => Some(n),
            IpNetwork::V4(_) => None,
        }));
    let first = set.claims.len();
    set.claims.par_extend(
        prefixes
            .par_iter()
            .enumerate()
            .map(|(i, &(line, column, net))| Claim::of(net, region, first + i, pos(line, column))),
    );
}

/// A region file as read, before it joins the policy.
pub(super) enum RegionFile {
    Read {
        path: PathBuf,
        bytes: Vec<u8>,
        /// (line, column, prefix) for each line that holds one, in file order.
        prefixes: Vec<(u32, u32, IpNetwork)>,
        /// (line, column, problem) for each line that does not, in file order. Apart from
        /// the prefixes: a problem is several times a prefix's size, and a file of a
        /// million prefixes has none.
        problems: Vec<(u32, u32, CidrProblem)>,
    },
    Failed(Problem),
}

/// Bytes of region file text parsed as one piece: large files are cut into pieces at line
/// ends and parsed on every core.
pub(in crate::policy) const PIECE_BYTES: usize = 1 << 20;

/// Reads and parses one region file: one CIDR per line; `#` starts a comment, blank lines
/// are skipped. Needs nothing from the validator, so files are read in parallel.
pub(super) fn read_region_file(path: &Path, roots: &Roots, limit: SizeLimit) -> RegionFile {
    let bytes = match read_trusted(path, roots, limit) {
        Ok(b) => b,
        Err(Problem::ReadFile { source, .. }) => {
            let path = path.display().to_string();
            return RegionFile::Failed(Problem::ReadRegionFile { path, source });
        }
        Err(problem) => return RegionFile::Failed(problem),
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        let what = format!("region file {}", path.display());
        return RegionFile::Failed(Problem::NotUtf8(what));
    };
    let pieces: Vec<_> = pieces(text)
        .collect::<Vec<_>>()
        .into_par_iter()
        .map(|piece| {
            let mut parsed = (Vec::new(), Vec::new());
            for (line, column, entry) in crate::policy::cidr::region_file_entries(piece) {
                let (line, column) = (clamp(line as u64), clamp(column as u64));
                match parse_cidr(entry) {
                    Ok(net) => parsed.0.push((line, column, net)),
                    Err(problem) => parsed.1.push((line, column, problem)),
                }
            }
            let lines = piece.bytes().filter(|&b| b == b'\n').count();
            (parsed, clamp(lines as u64))
        })
        .collect();
    let mut prefixes = Vec::with_capacity(pieces.iter().map(|((p, _), _)| p.len()).sum());
    let mut problems = Vec::new();
    let mut lines_before = 0u32;
    for ((piece_prefixes, piece_problems), lines) in pieces {
        let shift = |line: u32| line.saturating_add(lines_before);
        prefixes.extend(
            piece_prefixes
                .into_iter()
                .map(|(l, c, net)| (shift(l), c, net)),
        );
        problems.extend(piece_problems.into_iter().map(|(l, c, p)| (shift(l), c, p)));
        lines_before = lines_before.saturating_add(lines);
    }
    RegionFile::Read {
        path: path.to_owned(),
        bytes,
        prefixes,
        problems,
    }
}

/// `text` in pieces of about [`PIECE_BYTES`], each ending at a line end or the text's
/// end, so every line is whole in one piece.
fn pieces(mut text: &str) -> impl Iterator<Item = &str> {
    std::iter::from_fn(move || {
        if text.is_empty() {
            return None;
        }
        let end = match text.as_bytes().get(PIECE_BYTES..) {
            None => text.len(),
            Some(rest) => rest
                .iter()
                .position(|&b| b == b'\n')
                .map_or(text.len(), |at| PIECE_BYTES + at + 1),
        };
        let (piece, rest) = text.split_at(end);
        text = rest;
        Some(piece)
    })
}

/// Regions as they are built: each prefix remembers its region and where it was written,
/// so a prefix claimed by a second region can name both.
#[derive(Default)]
pub(super) struct RegionSet {
    regions: Vec<Region>,
    claims: Vec<Claim>,
}

impl Validator<'_> {
    pub(super) fn regions(
        &mut self,
        raw: &Spanned<IndexMap<Spanned<String>, RawRegion>>,
    ) -> Vec<Region> {
        if raw.value.len() > MAX_REGIONS {
            let (name, _) = raw.value.get_index(MAX_REGIONS).expect("length checked");
            self.error(at(name), Problem::TooManyRegions(raw.value.len()));
        }
        // Region files hold nearly all of a large policy: read and parse them on every
        // core, then record them in order.
        let (dir, roots) = (self.dir.clone(), self.roots.clone());
        let limit = SizeLimit {
            bytes: self.opts.max_region_file_bytes,
            flag: "--max-region-file-bytes",
        };
        let mut read: std::collections::VecDeque<RegionFile> = raw
            .value
            .values()
            .flat_map(|r| r.files.iter())
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|f| read_region_file(&dir.join(&f.value), &roots, limit))
            .collect::<Vec<_>>()
            .into();
        // The policy's hash covers each region file's bytes, in the order named: hashed
        // on a thread of its own while the prefixes are recorded.
        let texts: Vec<Vec<u8>> = read
            .iter_mut()
            .filter_map(|file| match file {
                RegionFile::Read { bytes, .. } => Some(std::mem::take(bytes)),
                RegionFile::Failed(_) => None,
            })
            .collect();
        let mut hasher = std::mem::take(&mut self.hasher);
        let mut set = std::thread::scope(|scope| {
            scope.spawn(|| {
                for text in &texts {
                    hasher.update(text);
                }
            });
            self.record_regions(raw, read)
        });
        self.hasher = hasher;
        drop(texts);
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

    /// Records each region's prefixes, written in the policy and read from its files,
    /// in the order named.
    fn record_regions(
        &mut self,
        raw: &Spanned<IndexMap<Spanned<String>, RawRegion>>,
        mut read: std::collections::VecDeque<RegionFile>,
    ) -> RegionSet {
        let mut set = RegionSet::default();
        let read_prefixes: usize = read
            .iter()
            .map(|file| match file {
                RegionFile::Read { prefixes, .. } => prefixes.len(),
                RegionFile::Failed(_) => 0,
            })
            .sum();
        set.claims.reserve(read_prefixes);
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
        set
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
        let (path, bytes, prefixes, problems) = match read {
            RegionFile::Read {
                path,
                bytes,
                prefixes,
                problems,
            } => (path, bytes, prefixes, problems),
            RegionFile::Failed(problem) => return self.error(at(file), problem),
        };
        debug_assert!(bytes.is_empty(), "hashed before the prefixes were recorded");
        self.files.push(path);
        let file_index = clamp(self.files.len() as u64 - 1);
        let pos = |line, column| Pos {
            file: file_index,
            line,
            column,
        };
        record_file_prefixes(set, region, &prefixes, pos);
        let mut unreadable: Option<(Pos, usize)> = None;
        for (line, column, problem) in problems {
            match problem {
                // One line that is not a CIDR is quoted; a file of them (not a region
                // file at all) is counted, not printed.
                CidrProblem::Syntax(_) if unreadable.is_some() => {
                    unreadable = unreadable.map(|(at, n)| (at, n + 1));
                }
                p => {
                    if matches!(p, CidrProblem::Syntax(_)) {
                        unreadable = Some((pos(line, column), 0));
                    }
                    self.error(pos(line, column), p.into());
                }
            }
        }
        if let Some((pos, more)) = unreadable
            && more > 0
        {
            self.error(pos, Problem::MoreUnreadableLines(more));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces hold whole lines, end to end, however the lines fall against the piece size.
    #[test]
    fn pieces_cut_only_at_line_ends_and_lose_nothing() {
        let line = "198.51.100.0/24\n";
        for extra in [0, 1, PIECE_BYTES / 2, PIECE_BYTES - 1] {
            let mut text = line.repeat(2 * PIECE_BYTES / line.len() + 3);
            text.push_str(&"x".repeat(extra));
            let cut: Vec<&str> = pieces(&text).collect();
            assert!(cut.len() >= 3, "{}", cut.len());
            assert_eq!(cut.concat(), text);
            assert!(cut[..cut.len() - 1].iter().all(|p| p.ends_with('\n')));
        }
        assert_eq!(pieces("").count(), 0);
        assert_eq!(pieces("10.0.0.0/8").collect::<Vec<_>>(), ["10.0.0.0/8"]);
    }
}
