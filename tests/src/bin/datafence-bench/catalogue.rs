//! Prefix sets (the catalogue's real prefix-length mix, scaled, and dense host
//! prefixes) and the policies written for them.

#![forbid(unsafe_code)]

use super::*;

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) struct Pfx {
    pub(crate) bits: u128,
    pub(crate) len: u8,
}

pub(crate) fn mask(width: u8, len: u8) -> u128 {
    let all = if width == 128 {
        u128::MAX
    } else {
        (1u128 << width) - 1
    };
    if len == 0 {
        0
    } else {
        all & !((1u128 << (width - len)) - 1)
    }
}

pub(crate) fn overlaps(a: Pfx, b: Pfx, width: u8) -> bool {
    let len = a.len.min(b.len);
    (a.bits & mask(width, len)) == (b.bits & mask(width, len))
}

/// Space that must stay out of the scaled sets: special-purpose ranges, the sandbox's
/// own link, and the benchmark destinations the user-data class may reach.
pub(crate) fn special(p: Pfx, width: u8) -> bool {
    let list: &[&str] = if width == 32 {
        &[
            "0.0.0.0/8",
            "10.0.0.0/8",
            "100.64.0.0/10",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "172.16.0.0/12",
            "192.0.0.0/24",
            "192.0.2.0/24",
            "192.168.0.0/16",
            ALLOWED_V4,
            "198.51.100.0/24",
            "203.0.113.0/24",
            "224.0.0.0/3",
        ]
    } else {
        &[
            "::/3",
            "2001::/23",
            ALLOWED_V6,
            "2001:db8::/32",
            "2002::/16",
            "4000::/2",
            "8000::/1",
        ]
    };
    list.iter().any(|s| {
        let net: ipnetwork::IpNetwork = s.parse().expect("constant prefix");
        let q = Pfx {
            bits: match net.network() {
                IpAddr::V4(a) => u128::from(u32::from(a)),
                IpAddr::V6(a) => u128::from(a),
            },
            len: net.prefix(),
        };
        overlaps(p, q, width)
    })
}

/// Prefixes with the index of their region.
#[derive(Clone, Default)]
pub(crate) struct PrefixSet {
    pub(crate) v4: Vec<(Pfx, usize)>,
    pub(crate) v6: Vec<(Pfx, usize)>,
}

/// The distinct prefixes of the region files, each with the file it came from.
pub(crate) struct Catalogue {
    pub(crate) regions: Vec<String>,
    pub(crate) base: PrefixSet,
}

pub(crate) fn read_catalogue(dir: &Path) -> Result<Catalogue> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading region files in {}", dir.display()))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no *.txt region files in {}", dir.display());
    }
    let mut regions = Vec::new();
    let mut base = PrefixSet::default();
    let mut seen = HashSet::new();
    for (index, file) in files.iter().enumerate() {
        let stem = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        regions.push(stem);
        let text = std::fs::read_to_string(file)?;
        for (_, _, line) in policy::region_file_entries(&text) {
            // The CIDR parser the agent and `cargo xtask regions` use; a prefix written
            // with host bits counts as its network, as it did with `IpNetwork`.
            let Ok(cidr) = datafence_common::cidr::parse(line) else {
                continue;
            };
            let network = datafence_common::cidr::Cidr {
                addr: cidr.network(),
                ..cidr
            };
            let p = Pfx {
                bits: network.bits(),
                len: cidr.len,
            };
            let width = datafence_common::cidr::width(cidr.addr);
            if special(p, width) || !seen.insert((width, p)) {
                continue;
            }
            if width == 32 {
                base.v4.push((p, index));
            } else {
                base.v6.push((p, index));
            }
        }
    }
    Ok(Catalogue { regions, base })
}

/// `n` prefixes with the base's length mix: a sample when the base is larger, else the
/// base plus translated copies (XOR of high address bits with a copy number, which keeps
/// each prefix's length and the nesting among them), skipping special space.
pub(crate) fn scale(
    base: &[(Pfx, usize)],
    n: usize,
    width: u8,
    rng: &mut Rng,
) -> Vec<(Pfx, usize)> {
    let mut order = base.to_vec();
    rng.shuffle(&mut order);
    if n <= order.len() {
        order.truncate(n);
        return order;
    }
    // v4: the first octet; v6: the low 12 bits of the first 16 (staying within 2000::/4).
    let (shift, copies): (u8, u128) = if width == 32 { (24, 255) } else { (112, 4095) };
    let mut seen: HashSet<Pfx> = order.iter().map(|(p, _)| *p).collect();
    let mut out = order.clone();
    'copies: for k in 1..=copies {
        for &(p, region) in &order {
            let image = Pfx {
                bits: (p.bits ^ (k << shift)) & mask(width, p.len),
                len: p.len,
            };
            if !special(image, width) && seen.insert(image) {
                out.push((image, region));
                if out.len() == n {
                    break 'copies;
                }
            }
        }
    }
    out
}

/// `n` consecutive host prefixes (/32 or /128), regions in turn.
pub(crate) fn dense(n: usize, width: u8, regions: usize) -> Vec<(Pfx, usize)> {
    let start: u128 = if width == 32 {
        u128::from(u32::from(Ipv4Addr::new(11, 0, 0, 0)))
    } else {
        u128::from("2a0f:1000::".parse::<Ipv6Addr>().expect("constant"))
    };
    (0..n)
        .map(|i| {
            (
                Pfx {
                    bits: start + i as u128,
                    len: width,
                },
                i % regions.max(1),
            )
        })
        .collect()
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Shape {
    Real,
    Dense,
}

impl Shape {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Real => "real-mix",
            Self::Dense => "dense-hosts",
        }
    }
}

pub(crate) fn prefix_set(cat: &Catalogue, shape: Shape, n: usize) -> PrefixSet {
    let mut rng = Rng(0x00da_7afe_4ce0 ^ n as u64);
    match shape {
        Shape::Real => PrefixSet {
            v4: scale(&cat.base.v4, n, 32, &mut rng),
            v6: scale(&cat.base.v6, n, 128, &mut rng),
        },
        Shape::Dense => PrefixSet {
            v4: dense(n, 32, cat.regions.len()),
            v6: dense(n, 128, cat.regions.len()),
        },
    }
}

pub(crate) fn v4net(p: Pfx) -> Ipv4Network {
    Ipv4Network::new(Ipv4Addr::from(p.bits as u32), p.len).expect("valid prefix")
}

pub(crate) fn v6net(p: Pfx) -> Ipv6Network {
    Ipv6Network::new(Ipv6Addr::from(p.bits), p.len).expect("valid prefix")
}

pub(crate) fn show_pfx(p: Pfx, width: u8) -> String {
    if width == 32 {
        v4net(p).to_string()
    } else {
        v6net(p).to_string()
    }
}

/// A random address inside `p`.
pub(crate) fn inside(p: Pfx, width: u8, rng: &mut Rng) -> u128 {
    let host = rng.u128() & !mask(width, p.len) & mask(width, width);
    p.bits | host
}

/// A policy directory (policy.yaml + regions/*.txt) for a prefix set. Region 1 holds the
/// benchmark destinations the user-data class may reach; the catalogue's regions follow,
/// and the class may also reach `eu` (or the first one).
pub(crate) struct PolicyFiles {
    pub(crate) scratch: Scratch,
    pub(crate) path: PathBuf,
}

pub(crate) fn write_policy(cat: &Catalogue, set: &PrefixSet, label: &str) -> Result<PolicyFiles> {
    let scratch = Scratch::new(label);
    let allowed = cat
        .regions
        .iter()
        .find(|r| *r == "eu")
        .unwrap_or(&cat.regions[0])
        .clone();
    let mut yaml = String::new();
    writeln!(
        yaml,
        "version: 1\nmode: enforce\ninterfaces:\n  egress: [up0]\nregions:\n  bench-allowed:\n    cidrs: [\"{ALLOWED_V4}\", \"{ALLOWED_V6}\"]"
    )?;
    for (index, name) in cat.regions.iter().enumerate() {
        let mut text = String::new();
        for (p, _) in set.v4.iter().filter(|(_, r)| *r == index) {
            writeln!(text, "{}", show_pfx(*p, 32))?;
        }
        for (p, _) in set.v6.iter().filter(|(_, r)| *r == index) {
            writeln!(text, "{}", show_pfx(*p, 128))?;
        }
        std::fs::create_dir_all(scratch.dir.join("regions"))?;
        std::fs::write(scratch.dir.join(format!("regions/{name}.txt")), text)?;
        writeln!(yaml, "  {name}:\n    files: [regions/{name}.txt]")?;
    }
    // Marked TCP/UDP to 443 is user data (the TC hook sees marks); forwarded TCP/443 is
    // too (XDP sees no marks). Anything else, e.g. UDP/53, is in no class.
    writeln!(
        yaml,
        "data_classes:\n  user-data:\n    match:\n      protocols: [tcp, udp]\n      dst_ports: [443]\n      marks: [{{value: {USER_MARK:#x}}}]\n    allow: [bench-allowed, {allowed}]\n    unknown: deny\n  forwarded-user-data:\n    match:\n      protocols: [tcp]\n      dst_ports: [443]\n    allow: [bench-allowed, {allowed}]\n    unknown: deny"
    )?;
    let path = scratch.write("policy.yaml", &yaml);
    Ok(PolicyFiles { scratch, path })
}

pub(crate) fn table_capacity(n: usize) -> u32 {
    DEFAULT_TABLE_CAPACITY.max((n + 16).next_power_of_two() as u32)
}

/// Options sized for a compiled policy, as the agent sizes its datapath at start.
pub(crate) fn load_options(compiled: &CompiledPolicy, bench: bool) -> LoadOptions {
    LoadOptions {
        bench,
        ..LoadOptions::sized_for(&datafence::datapath::RegionTables::of(compiled))
    }
}

/// How the range tables are laid out for a policy: range entries and index bits of each.
pub(crate) fn v4_table(compiled: &CompiledPolicy) -> String {
    let v4 = datafence::v4table::Boundaries::of(&compiled.regions_v4);
    let v6 = datafence::v6table::Boundaries::of(&compiled.regions_v6);
    let (b4, b6) = (
        datafence::v4table::index_bits(&v4),
        datafence::v6table::index_bits(&v6),
    );
    format!(
        "ranges (v4 {} entries, {b4} index bits; v6 {} entries, {b6} index bits)",
        v4.entries(b4),
        v6.entries(b6)
    )
}

pub(crate) fn parse_policy(path: &Path, n: usize) -> Result<policy::LoadedPolicy> {
    policy::load_policy(
        path,
        &policy::LoadOptions {
            cgroup_root: datafence::cgroups::cgroup2_root(),
            table_capacity: table_capacity(n),
            ..Default::default()
        },
    )
    .map_err(|e| anyhow!("policy {}: {e}", path.display()))
}
