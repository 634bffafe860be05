//! Class selectors: the `match` block as written, checked and turned into
//! [`Selectors`]. A new selector is a field of [`RawMatch`], its check here, a field of
//! [`Selectors`] and its match in the datapath.
#![forbid(unsafe_code)]

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use std::collections::BTreeSet;

use datafence_common::{MAX_MARKS_PER_CLASS, MAX_PORT_RANGES_PER_CLASS, MarkMatch};
use indexmap::{IndexMap, IndexSet};
use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{Validator, at};
use crate::policy::{
    cidr::parse_cidr,
    error::Problem,
    model::{CGROUP_NOT_YET, Selectors},
    raw::{Int, IntOrStr},
};

/// A selector that is absent is `None`; one that is present but empty is `Some([])`, a
/// mistake that validation reports.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(in crate::policy) struct RawMatch {
    #[serde(default)]
    pub cgroups: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub marks: Option<Spanned<Vec<Spanned<RawMark>>>>,
    #[serde(default)]
    pub dscp: Option<Spanned<Vec<Spanned<Int>>>>,
    #[serde(default)]
    pub protocols: Option<Spanned<Vec<Spanned<IntOrStr>>>>,
    #[serde(default)]
    pub dst_ports: Option<Spanned<Vec<Spanned<IntOrStr>>>>,
    #[serde(default)]
    pub src_cidrs: Option<Spanned<Vec<Spanned<String>>>>,
}

impl RawMatch {
    fn lists_any(&self) -> bool {
        self.cgroups.is_some()
            || self.marks.is_some()
            || self.dscp.is_some()
            || self.protocols.is_some()
            || self.dst_ports.is_some()
            || self.src_cidrs.is_some()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(in crate::policy) struct RawMark {
    pub value: Int,
    #[serde(default)]
    pub mask: Option<Int>,
}

impl Validator<'_> {
    /// Every selector of a class's `match` block; errors are collected, and a selector
    /// with errors keeps its valid values so later checks still run.
    pub(super) fn selectors(&mut self, raw: &Spanned<RawMatch>) -> Selectors {
        let m = &raw.value;
        if !m.lists_any() {
            self.error(at(raw), Problem::EmptyMatch);
        }
        Selectors {
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
        IntOrStr::Str(s) => {
            datafence_common::protocols::number(s).ok_or_else(|| Problem::ProtocolName(s.clone()))
        }
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
fn merge_ranges(mut ranges: Vec<(u16, u16)>) -> Vec<(u16, u16)> {
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
/// `bpf_skb_ancestor_cgroup_id` report. A cgroup that does not exist yet (a service
/// that starts after the agent, at boot) gets [`CGROUP_NOT_YET`]: the agent classifies it
/// when it appears.
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
            Ok((format!("/{relative}"), CGROUP_NOT_YET))
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
