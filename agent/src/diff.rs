//! `datafence check --diff OLD NEW`: what a new policy would change, for review before
//! a rollout.
#![forbid(unsafe_code)]

use std::collections::{BTreeMap, BTreeSet};

use ipnetwork::IpNetwork;
use serde::Serialize;

use crate::policy::LoadedPolicy;

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct PolicyDiff {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<(String, String)>,
    pub exempt_added: Vec<String>,
    pub exempt_removed: Vec<String>,
    /// `host_essentials` switches turned on, and turned off.
    pub host_essentials_on: Vec<String>,
    pub host_essentials_off: Vec<String>,
    pub regions_added: Vec<String>,
    pub regions_removed: Vec<String>,
    /// Regions present in both whose prefixes changed.
    pub regions_changed: Vec<RegionChange>,
    pub classes_added: Vec<String>,
    pub classes_removed: Vec<String>,
    /// Classes present in both whose reach, rules or selectors changed.
    pub classes_changed: Vec<ClassChange>,
}

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct RegionChange {
    pub region: String,
    pub prefixes_added: usize,
    pub prefixes_removed: usize,
    /// Up to a few examples of each, for the reader.
    pub examples_added: Vec<String>,
    pub examples_removed: Vec<String>,
}

#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct ClassChange {
    pub class: String,
    pub may_now_reach: Vec<String>,
    pub may_no_longer_reach: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown: Option<(String, String)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<(String, String)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<(usize, usize)>,
    pub selectors_changed: bool,
}

const EXAMPLES: usize = 5;

impl PolicyDiff {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

fn prefixes(p: &LoadedPolicy, region: &str) -> BTreeSet<IpNetwork> {
    p.regions
        .iter()
        .filter(|r| r.name == region)
        .flat_map(|r| {
            r.v4.iter()
                .map(|n| IpNetwork::V4(*n))
                .chain(r.v6.iter().map(|n| IpNetwork::V6(*n)))
        })
        .collect()
}

fn reach(p: &LoadedPolicy, class: &crate::policy::Class) -> BTreeSet<String> {
    class
        .allow
        .iter()
        .filter_map(|id| p.region_name(u16::from(*id)).map(str::to_owned))
        .collect()
}

fn names<T>(items: &[T], name: impl Fn(&T) -> &str) -> BTreeSet<String> {
    items.iter().map(|i| name(i).to_owned()).collect()
}

pub fn diff(old: &LoadedPolicy, new: &LoadedPolicy) -> PolicyDiff {
    let mut d = PolicyDiff::default();
    if old.mode != new.mode {
        d.mode = Some((old.mode.as_str().into(), new.mode.as_str().into()));
    }
    let (oe, ne): (BTreeSet<_>, BTreeSet<_>) = (
        old.exempt.iter().map(ToString::to_string).collect(),
        new.exempt.iter().map(ToString::to_string).collect(),
    );
    d.exempt_added = ne.difference(&oe).cloned().collect();
    d.exempt_removed = oe.difference(&ne).cloned().collect();
    let switches = |p: &LoadedPolicy| {
        let h = p.host_essentials;
        [
            ("dhcp", h.dhcp),
            ("neighbor_discovery", h.neighbor_discovery),
            ("link_multicast", h.link_multicast),
        ]
    };
    for ((name, was), (_, is)) in switches(old).into_iter().zip(switches(new)) {
        match (was, is) {
            (false, true) => d.host_essentials_on.push(name.to_owned()),
            (true, false) => d.host_essentials_off.push(name.to_owned()),
            _ => {}
        }
    }

    let (or, nr) = (
        names(&old.regions, |r| &r.name),
        names(&new.regions, |r| &r.name),
    );
    d.regions_added = nr.difference(&or).cloned().collect();
    d.regions_removed = or.difference(&nr).cloned().collect();
    for region in or.intersection(&nr) {
        let (a, b) = (prefixes(old, region), prefixes(new, region));
        let added: Vec<_> = b.difference(&a).collect();
        let removed: Vec<_> = a.difference(&b).collect();
        if !added.is_empty() || !removed.is_empty() {
            d.regions_changed.push(RegionChange {
                region: region.clone(),
                prefixes_added: added.len(),
                prefixes_removed: removed.len(),
                examples_added: added
                    .iter()
                    .take(EXAMPLES)
                    .map(ToString::to_string)
                    .collect(),
                examples_removed: removed
                    .iter()
                    .take(EXAMPLES)
                    .map(ToString::to_string)
                    .collect(),
            });
        }
    }

    let (oc, nc) = (
        names(&old.classes, |c| &c.name),
        names(&new.classes, |c| &c.name),
    );
    d.classes_added = nc.difference(&oc).cloned().collect();
    d.classes_removed = oc.difference(&nc).cloned().collect();
    let old_by: BTreeMap<&str, &crate::policy::Class> =
        old.classes.iter().map(|c| (c.name.as_str(), c)).collect();
    for c in &new.classes {
        let Some(o) = old_by.get(c.name.as_str()) else {
            continue;
        };
        let (ra, rb) = (reach(old, o), reach(new, c));
        let change = ClassChange {
            class: c.name.clone(),
            may_now_reach: rb.difference(&ra).cloned().collect(),
            may_no_longer_reach: ra.difference(&rb).cloned().collect(),
            unknown: (o.unknown != c.unknown)
                .then(|| (o.unknown.as_str().into(), c.unknown.as_str().into())),
            mode: (o.mode != c.mode).then(|| (o.mode.as_str().into(), c.mode.as_str().into())),
            position: (o.id != c.id).then_some((usize::from(o.id), usize::from(c.id))),
            selectors_changed: !o.selectors.same_as_written(&c.selectors),
        };
        let unchanged = change.may_now_reach.is_empty()
            && change.may_no_longer_reach.is_empty()
            && change.unknown.is_none()
            && change.mode.is_none()
            && change.position.is_none()
            && !change.selectors_changed;
        if !unchanged {
            d.classes_changed.push(change);
        }
    }
    d
}

/// The diff as text for a reviewer.
pub fn render(d: &PolicyDiff) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if d.is_empty() {
        out.push_str("no change in enforcement\n");
        return out;
    }
    if let Some((a, b)) = &d.mode {
        let _ = writeln!(out, "mode: {a} -> {b}");
    }
    for e in &d.exempt_added {
        let _ = writeln!(out, "+ exempt {e}");
    }
    for e in &d.exempt_removed {
        let _ = writeln!(out, "- exempt {e}");
    }
    for s in &d.host_essentials_on {
        let _ = writeln!(out, "+ host essential {s}: passes before any class");
    }
    for s in &d.host_essentials_off {
        let _ = writeln!(out, "- host essential {s}: judged by the classes");
    }
    for r in &d.regions_added {
        let _ = writeln!(out, "+ region {r}");
    }
    for r in &d.regions_removed {
        let _ = writeln!(out, "- region {r}");
    }
    for r in &d.regions_changed {
        let _ = writeln!(
            out,
            "~ region {}: +{} -{} prefixes (e.g. +[{}] -[{}])",
            r.region,
            r.prefixes_added,
            r.prefixes_removed,
            r.examples_added.join(", "),
            r.examples_removed.join(", ")
        );
    }
    for c in &d.classes_added {
        let _ = writeln!(out, "+ class {c}");
    }
    for c in &d.classes_removed {
        let _ = writeln!(out, "- class {c}");
    }
    for c in &d.classes_changed {
        let _ = write!(out, "~ class {}:", c.class);
        if !c.may_now_reach.is_empty() {
            let _ = write!(out, " may now reach {};", c.may_now_reach.join(", "));
        }
        if !c.may_no_longer_reach.is_empty() {
            let _ = write!(
                out,
                " may no longer reach {};",
                c.may_no_longer_reach.join(", ")
            );
        }
        if let Some((a, b)) = &c.unknown {
            let _ = write!(out, " unknown {a} -> {b};");
        }
        if let Some((a, b)) = &c.mode {
            let _ = write!(out, " mode {a} -> {b};");
        }
        if let Some((a, b)) = &c.position {
            let _ = write!(out, " match order {a} -> {b};");
        }
        if c.selectors_changed {
            let _ = write!(out, " selectors changed;");
        }
        out.push('\n');
    }
    out
}
