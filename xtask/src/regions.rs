//! `cargo xtask regions`: region files for policies, built from a cloud-provider range list.
//!
//! The input is a CSV of `cidr,provider,region,service` rows (see
//! `../shared/data/README.md`): one row per (prefix, region, service), so prefixes repeat,
//! nest, and sometimes carry no region at all. The output is one file per bucket, each
//! prefix in exactly one bucket, because the policy validator refuses an exact prefix in
//! two regions:
//!
//! - `eu.txt`: regions in the EU or the EEA, where GDPR applies (see [`EU_EEA`]);
//! - `europe-non-eu.txt`: European regions outside the EU/EEA, the UK, Switzerland and
//!   Serbia (see [`EUROPE_NON_EU`]), kept apart so a policy can decide on them explicitly;
//! - `non-eu.txt`: every other regional prefix, including region names this generator does
//!   not recognise;
//! - `global.txt`: prefixes published with no region or as global (AWS `GLOBAL`, GCP
//!   `global`, Azure and Cloudflare rows without one) and no regional row;
//! - `ambiguous.txt`: prefixes whose rows place them in more than one of the first three.
//!
//! Global and ambiguous prefixes get files of their own, rather than being left out, so a
//! policy can name them as regions: left out, an address in them would fall through to an
//! enclosing prefix, which may well be an EU one, and be allowed.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::{self, Write as _},
    fs,
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::util;

#[derive(Args)]
pub(crate) struct Options {
    /// The range list: CSV with the header `cidr,provider,region,service`. A relative path
    /// is taken from the workspace root.
    #[arg(long, default_value = "../shared/data/cloud-ranges.csv")]
    csv: PathBuf,
    /// Directory the region files are written to, relative to the workspace root.
    #[arg(long, default_value = "policies/regions/cloud")]
    out: PathBuf,
    /// Date of the data, for the file headers. Default: the date after "as of" in the
    /// README.md next to the CSV.
    #[arg(long)]
    as_of: Option<String>,
    /// Compare with the files on disk instead of writing them; fail if any differs.
    #[arg(long)]
    check: bool,
}

/// Provider region names in the EU or EEA, with where they are. Exact names, not a
/// pattern: `eu-west-2` is London and `eu-central-2` Zurich, both outside the EU.
const EU_EEA: &[(&str, &str, &str)] = &[
    ("aws", "eu-central-1", "Frankfurt, DE"),
    ("aws", "eu-north-1", "Stockholm, SE"),
    ("aws", "eu-south-1", "Milan, IT"),
    ("aws", "eu-south-2", "Aragon, ES"),
    ("aws", "eu-west-1", "Dublin, IE"),
    ("aws", "eu-west-3", "Paris, FR"),
    (
        "aws",
        "eusc-de-east-1",
        "Brandenburg, DE (European Sovereign Cloud)",
    ),
    ("azure", "austriaeast", "Vienna, AT"),
    ("azure", "belgiumcentral", "Brussels, BE"),
    ("azure", "centralfrance", "Paris, FR (France Central)"),
    ("azure", "denmarkeast", "Copenhagen, DK"),
    ("azure", "germanyn", "Berlin, DE (Germany North)"),
    ("azure", "germanywc", "Frankfurt, DE (Germany West Central)"),
    ("azure", "italynorth", "Milan, IT"),
    ("azure", "northeurope", "Dublin, IE"),
    ("azure", "norwaye", "Oslo, NO (EEA)"),
    ("azure", "norwayw", "Stavanger, NO (EEA)"),
    ("azure", "polandcentral", "Warsaw, PL"),
    ("azure", "southfrance", "Marseille, FR (France South)"),
    ("azure", "spaincentral", "Madrid, ES"),
    ("azure", "swedencentral", "Gavle, SE"),
    ("azure", "swedensouth", "Malmo, SE"),
    ("azure", "westeurope", "Amsterdam, NL"),
    ("digitalocean", "DE-HE", "Frankfurt, DE (FRA1)"),
    ("digitalocean", "NL-NH", "Amsterdam, NL (AMS2/AMS3)"),
    ("gcp", "europe-central2", "Warsaw, PL"),
    ("gcp", "europe-north1", "Hamina, FI"),
    ("gcp", "europe-north2", "Stockholm, SE"),
    ("gcp", "europe-southwest1", "Madrid, ES"),
    ("gcp", "europe-west1", "St. Ghislain, BE"),
    ("gcp", "europe-west10", "Berlin, DE"),
    ("gcp", "europe-west12", "Turin, IT"),
    ("gcp", "europe-west3", "Frankfurt, DE"),
    ("gcp", "europe-west4", "Eemshaven, NL"),
    ("gcp", "europe-west8", "Milan, IT"),
    ("gcp", "europe-west9", "Paris, FR"),
    ("oracle", "eu-amsterdam-1", "Amsterdam, NL"),
    ("oracle", "eu-dublin-3", "Dublin, IE"),
    ("oracle", "eu-frankfurt-1", "Frankfurt, DE"),
    ("oracle", "eu-madrid-1", "Madrid, ES"),
    ("oracle", "eu-madrid-3", "Madrid, ES"),
    ("oracle", "eu-marseille-1", "Marseille, FR"),
    ("oracle", "eu-milan-1", "Milan, IT"),
    ("oracle", "eu-paris-1", "Paris, FR"),
    ("oracle", "eu-stockholm-1", "Stockholm, SE"),
];

/// European regions outside the EU and EEA. Adequacy decisions (UK, Switzerland) make
/// transfers there lawful under conditions, but that is the policy author's call, so they
/// are a region of their own rather than folded into either side.
const EUROPE_NON_EU: &[(&str, &str, &str)] = &[
    ("aws", "eu-central-2", "Zurich, CH"),
    ("aws", "eu-west-2", "London, GB"),
    ("azure", "switzerlandn", "Zurich, CH"),
    ("azure", "switzerlandw", "Geneva, CH"),
    ("azure", "uksouth", "London, GB"),
    ("azure", "ukwest", "Cardiff, GB"),
    ("digitalocean", "GB-SLG", "Slough, GB (LON1)"),
    ("gcp", "europe-west2", "London, GB"),
    ("gcp", "europe-west6", "Zurich, CH"),
    ("oracle", "eu-jovanovac-1", "Jovanovac, RS"),
    ("oracle", "eu-zurich-1", "Zurich, CH"),
    ("oracle", "uk-cardiff-1", "Cardiff, GB"),
    ("oracle", "uk-london-1", "London, GB"),
];

/// Where a prefix goes; the order is the order of the files in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Bucket {
    Eu,
    EuropeNonEu,
    NonEu,
    Global,
    Ambiguous,
}

impl Bucket {
    const ALL: [Self; 5] = [
        Self::Eu,
        Self::EuropeNonEu,
        Self::NonEu,
        Self::Global,
        Self::Ambiguous,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Eu => "eu",
            Self::EuropeNonEu => "europe-non-eu",
            Self::NonEu => "non-eu",
            Self::Global => "global",
            Self::Ambiguous => "ambiguous",
        }
    }

    fn description(self) -> &'static str {
        match self {
            Self::Eu => "cloud-provider ranges in EU/EEA regions",
            Self::EuropeNonEu => {
                "cloud-provider ranges in European regions outside the EU/EEA (UK, CH, RS)"
            }
            Self::NonEu => "cloud-provider ranges in every other region",
            Self::Global => "cloud-provider ranges published with no region, or as global",
            Self::Ambiguous => "cloud-provider ranges published for regions on different sides",
        }
    }
}

/// A prefix with its host bits cleared. Ordered IPv4 first, then by address and length,
/// which is the order the files list them in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Net {
    v6: bool,
    bits: u128,
    len: u8,
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.v6 {
            write!(f, "{}/{}", Ipv6Addr::from(self.bits), self.len)
        } else {
            write!(f, "{}/{}", Ipv4Addr::from(self.bits as u32), self.len)
        }
    }
}

/// Parses `ADDRESS/LENGTH` (or a bare address) and clears host bits; the flag says whether
/// there were any.
fn parse_net(text: &str) -> Option<(Net, bool)> {
    let cidr = datafence_common::cidr::parse(text).ok()?;
    let network = datafence_common::cidr::Cidr {
        addr: cidr.network(),
        ..cidr
    };
    Some((
        Net {
            v6: cidr.addr.is_ipv6(),
            bits: network.bits(),
            len: cidr.len,
        },
        cidr.has_host_bits(),
    ))
}

/// The bucket one row's region puts its prefix in; `None` for rows without a region.
fn bucket_of(provider: &str, region: &str) -> Option<Bucket> {
    if region.is_empty() || region.eq_ignore_ascii_case("global") {
        return None;
    }
    let listed =
        |table: &[(&str, &str, &str)]| table.iter().any(|&(p, r, _)| p == provider && r == region);
    Some(if listed(EU_EEA) {
        Bucket::Eu
    } else if listed(EUROPE_NON_EU) {
        Bucket::EuropeNonEu
    } else {
        Bucket::NonEu
    })
}

/// Names that look European but are in neither table: new regions that someone should
/// place by hand. Until then they count as non-EU, which fails closed.
fn looks_european(region: &str) -> bool {
    let r = region.to_ascii_lowercase();
    r.starts_with("eu")
        || r.contains("europe")
        || [
            "uk",
            "gb",
            "france",
            "germany",
            "switzerland",
            "norway",
            "sweden",
            "poland",
            "spain",
            "italy",
            "austria",
            "belgium",
            "denmark",
            "finland",
            "netherlands",
            "ireland",
        ]
        .iter()
        .any(|country| r.starts_with(country))
}

#[derive(Default)]
struct Placement {
    /// Buckets named by the prefix's regional rows.
    buckets: BTreeSet<Bucket>,
    /// (provider, region) of every row, for the headers.
    sources: BTreeSet<(String, String)>,
}

#[derive(Default)]
struct Catalogue {
    rows: usize,
    host_bits_fixed: usize,
    /// Prefixes with both a regional and a region-less row.
    regional_and_global: usize,
    dropped: Vec<String>,
    prefixes: BTreeMap<Net, Placement>,
}

fn read_csv(path: &Path) -> Result<Catalogue> {
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut lines = text.lines().enumerate();
    match lines.next() {
        Some((_, header)) if header.trim() == "cidr,provider,region,service" => {}
        other => bail!(
            "{}: expected the header `cidr,provider,region,service`, found {:?}",
            path.display(),
            other.map(|(_, l)| l)
        ),
    }
    let mut cat = Catalogue::default();
    for (index, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        cat.rows += 1;
        // The service column may itself contain commas (Oracle's `OSN,OBJECT_STORAGE`),
        // so only the first three fields are split off; nothing in the file is quoted.
        let mut fields = line.splitn(4, ',');
        let (Some(cidr), Some(provider), Some(region)) =
            (fields.next(), fields.next(), fields.next())
        else {
            cat.dropped
                .push(format!("line {}: too few fields: {line:?}", index + 1));
            continue;
        };
        if [cidr, provider, region].iter().any(|f| f.contains('"')) {
            bail!(
                "{}:{}: quoted CSV fields are not supported: {line:?}",
                path.display(),
                index + 1
            );
        }
        let Some((net, fixed)) = parse_net(cidr.trim()) else {
            cat.dropped
                .push(format!("line {}: not a CIDR: {cidr:?}", index + 1));
            continue;
        };
        if fixed {
            cat.host_bits_fixed += 1;
        }
        let (provider, region) = (provider.trim(), region.trim());
        let placement = cat.prefixes.entry(net).or_default();
        placement.buckets.extend(bucket_of(provider, region));
        placement
            .sources
            .insert((provider.to_owned(), region.to_owned()));
    }
    cat.regional_and_global = cat
        .prefixes
        .values()
        .filter(|p| {
            !p.buckets.is_empty() && p.sources.iter().any(|(p, r)| bucket_of(p, r).is_none())
        })
        .count();
    Ok(cat)
}

/// A regional row decides over a region-less one for the same prefix: the provider has
/// said where it is.
fn final_bucket(p: &Placement) -> Bucket {
    let mut buckets = p.buckets.iter();
    match (buckets.next(), buckets.next()) {
        (None, _) => Bucket::Global,
        (Some(&only), None) => only,
        (Some(_), Some(_)) => Bucket::Ambiguous,
    }
}

/// The date after "as of" in the README beside the CSV, e.g. "as of\n2026-10-26".
fn date_from_readme(csv: &Path) -> Option<String> {
    let readme = fs::read_to_string(csv.parent()?.join("README.md")).ok()?;
    let words: Vec<&str> = readme.split_whitespace().collect();
    words.windows(3).find_map(|w| {
        (w[0] == "as" && w[1] == "of").then(|| {
            w[2].trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_owned()
        })
    })
}

fn region_list(table: &[(&str, &str, &str)]) -> String {
    table.iter().fold(String::new(), |mut list, (p, r, at)| {
        let _ = writeln!(list, "#   {p:<13} {r:<18} {at}");
        list
    })
}

struct FileStats {
    v4: usize,
    v6: usize,
}

pub(crate) fn run(opts: Options) -> Result<()> {
    let root = util::workspace_root();
    let csv = root.join(&opts.csv);
    let out = root.join(&opts.out);
    let cat = read_csv(&csv)?;
    let as_of = opts
        .as_of
        .clone()
        .or_else(|| date_from_readme(&csv))
        .unwrap_or_else(|| "unknown".to_owned());

    let Sorted {
        files,
        unrecognised,
        global_sources,
    } = sort_prefixes(&cat);

    let command = format!(
        "cargo xtask regions --csv {} --out {}",
        opts.csv.display(),
        opts.out.display()
    );
    let mut stats = BTreeMap::new();
    let mut stale = Vec::new();
    for (&bucket, nets) in &files {
        let v4 = nets.iter().filter(|n| !n.v6).count();
        let file_stats = FileStats {
            v4,
            v6: nets.len() - v4,
        };
        let mut text = header(bucket, &cat, &file_stats, &as_of, &opts.csv, &command);
        push_notes(&mut text, bucket, &cat, &unrecognised, &global_sources);
        text.push('\n');
        for net in nets {
            let _ = writeln!(text, "{net}");
        }
        let path = out.join(format!("{}.txt", bucket.name()));
        if opts.check {
            if fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                stale.push(path.display().to_string());
            }
        } else {
            fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            fs::write(&path, &text).with_context(|| format!("writing {}", path.display()))?;
        }
        stats.insert(bucket, file_stats);
    }

    print_summary(&csv, &cat, &stats, &unrecognised);
    if !stale.is_empty() {
        bail!(
            "out of date, re-run `cargo xtask regions`: {}",
            stale.join(", ")
        );
    }
    if !opts.check {
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

/// The prefixes sorted into the files of their buckets, with what the notes of the
/// non-eu and global files list.
struct Sorted {
    files: BTreeMap<Bucket, Vec<Net>>,
    /// European-looking region names no list of the generator knows.
    unrecognised: BTreeSet<(String, String)>,
    /// Prefixes of the global file per (provider, region) row.
    global_sources: BTreeMap<(String, String), usize>,
}

fn sort_prefixes(cat: &Catalogue) -> Sorted {
    let mut files: BTreeMap<Bucket, Vec<Net>> = Bucket::ALL.iter().map(|&b| (b, vec![])).collect();
    let mut unrecognised: BTreeSet<(String, String)> = BTreeSet::new();
    let mut global_sources: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (net, placement) in &cat.prefixes {
        let bucket = final_bucket(placement);
        files.get_mut(&bucket).expect("every bucket").push(*net);
        for (provider, region) in &placement.sources {
            if bucket == Bucket::Global {
                *global_sources
                    .entry((provider.clone(), region.clone()))
                    .or_default() += 1;
            }
            if bucket_of(provider, region) == Some(Bucket::NonEu) && looks_european(region) {
                unrecognised.insert((provider.clone(), region.clone()));
            }
        }
    }
    Sorted {
        files,
        unrecognised,
        global_sources,
    }
}

/// The notes at the head of a bucket's file, after the common header: which regions it
/// holds and why.
fn push_notes(
    text: &mut String,
    bucket: Bucket,
    cat: &Catalogue,
    unrecognised: &BTreeSet<(String, String)>,
    global_sources: &BTreeMap<(String, String), usize>,
) {
    match bucket {
        Bucket::Eu => {
            text.push_str("# Regions included (EU member states, plus Norway for the EEA):\n");
            text.push_str(&region_list(EU_EEA));
        }
        Bucket::EuropeNonEu => {
            text.push_str("# Regions included:\n");
            text.push_str(&region_list(EUROPE_NON_EU));
        }
        Bucket::NonEu => {
            text.push_str(
                "# Every regional range whose region is in neither the EU/EEA list (eu.txt) nor\n\
                 # the European non-EU list (europe-non-eu.txt).\n",
            );
            if !unrecognised.is_empty() {
                text.push_str(
                    "# European-looking region names the generator does not recognise; they stay\n\
                     # here, denied to EU data, until someone adds them to a list in the generator:\n",
                );
                for (p, r) in unrecognised {
                    let _ = writeln!(text, "#   {p:<13} {r}");
                }
            }
        }
        Bucket::Global => {
            let _ = writeln!(
                text,
                "# Prefixes whose rows carry no region (or `GLOBAL`/`global`) and that no row\n\
                 # places in a region. A regional row wins over a region-less one: {} prefixes\n\
                 # with both kinds of row are in the file of their region instead.\n\
                 # Prefixes by source (a prefix with rows from several counts for each):",
                cat.regional_and_global
            );
            for ((p, r), n) in global_sources {
                let r = if r.is_empty() { "(no region)" } else { r };
                let _ = writeln!(text, "#   {p:<13} {r:<12} {n}");
            }
        }
        Bucket::Ambiguous => text.push_str(
            "# Exact prefixes that rows place in more than one of eu, europe-non-eu and\n\
             # non-eu. They are in none of those files (the policy validator refuses one\n\
             # prefix in two regions) but here, so a policy can deny them explicitly\n\
             # instead of letting them fall through to an enclosing prefix.\n",
        ),
    }
}

/// What was read, dropped and written, and the region names that need a look.
fn print_summary(
    csv: &Path,
    cat: &Catalogue,
    stats: &BTreeMap<Bucket, FileStats>,
    unrecognised: &BTreeSet<(String, String)>,
) {
    eprintln!(
        "{}: {} rows, {} distinct prefixes, {} with host bits fixed, {} dropped",
        csv.display(),
        cat.rows,
        cat.prefixes.len(),
        cat.host_bits_fixed,
        cat.dropped.len()
    );
    for line in cat.dropped.iter().take(10) {
        eprintln!("  dropped {line}");
    }
    for (bucket, s) in stats {
        eprintln!("  {:<14} {:>6} IPv4  {:>6} IPv6", bucket.name(), s.v4, s.v6);
    }
    for (p, r) in unrecognised {
        eprintln!("warning: {p} region {r:?} looks European but is not mapped; placed in non-eu");
    }
}

fn header(
    bucket: Bucket,
    cat: &Catalogue,
    stats: &FileStats,
    as_of: &str,
    csv: &Path,
    command: &str,
) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "# Region `{}`: {}.",
        bucket.name(),
        bucket.description()
    );
    let _ = writeln!(
        text,
        "# Generated by xtask/src/regions.rs, do not edit; regenerate with\n#   {command}"
    );
    let _ = writeln!(
        text,
        "# Source: {} (columns cidr,provider,region,service), data as of {as_of}.",
        csv.display()
    );
    let _ = writeln!(
        text,
        "# Source rows: {} read, {} distinct prefixes after clearing host bits, {} with host\n\
         # bits set (cleared, kept), {} unparseable (dropped).",
        cat.rows,
        cat.prefixes.len(),
        cat.host_bits_fixed,
        cat.dropped.len()
    );
    let _ = writeln!(
        text,
        "# This file: {} prefixes, {} IPv4 and {} IPv6, each listed once; every prefix is in\n\
         # exactly one of eu, europe-non-eu, non-eu, global and ambiguous.",
        stats.v4 + stats.v6,
        stats.v4,
        stats.v6
    );
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nets_are_normalised() {
        let p = |s: &str| parse_net(s).map(|(n, fixed)| (n.to_string(), fixed));
        assert_eq!(p("10.1.2.3/8"), Some(("10.0.0.0/8".to_owned(), true)));
        assert_eq!(p("10.0.0.0/8"), Some(("10.0.0.0/8".to_owned(), false)));
        assert_eq!(p("0.0.0.0/0"), Some(("0.0.0.0/0".to_owned(), false)));
        assert_eq!(p("192.0.2.7"), Some(("192.0.2.7/32".to_owned(), false)));
        assert_eq!(
            p("2001:db8::1/32"),
            Some(("2001:db8::/32".to_owned(), true))
        );
        assert_eq!(p("::/0"), Some(("::/0".to_owned(), false)));
        assert_eq!(p("10.0.0.0/33"), None);
        assert_eq!(p("10.0.0.0/"), None);
        assert_eq!(p("nonsense"), None);
    }

    #[test]
    fn buckets_follow_the_tables() {
        assert_eq!(bucket_of("aws", "eu-central-1"), Some(Bucket::Eu));
        assert_eq!(bucket_of("aws", "eu-west-2"), Some(Bucket::EuropeNonEu));
        assert_eq!(bucket_of("aws", "us-east-1"), Some(Bucket::NonEu));
        assert_eq!(bucket_of("aws", "GLOBAL"), None);
        assert_eq!(bucket_of("azure", ""), None);
        // The same name means different places at different providers.
        assert_eq!(bucket_of("gcp", "eu-central-1"), Some(Bucket::NonEu));
    }

    #[test]
    fn conflicting_rows_make_a_prefix_ambiguous() {
        let mut p = Placement::default();
        assert_eq!(final_bucket(&p), Bucket::Global);
        p.buckets.insert(Bucket::Eu);
        assert_eq!(final_bucket(&p), Bucket::Eu);
        p.buckets.insert(Bucket::NonEu);
        assert_eq!(final_bucket(&p), Bucket::Ambiguous);
    }
}
