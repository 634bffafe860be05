//! nftables interval sets and iptables + ipset: their rule files and control planes.

#![forbid(unsafe_code)]

use super::*;

pub(crate) fn nft_elements(list: &[(Pfx, usize)], width: u8) -> String {
    let mut s = String::with_capacity(list.len() * 20);
    for (i, (p, _)) in list.iter().enumerate() {
        if i > 0 {
            s.push_str(",\n");
        }
        s.push_str(&show_pfx(*p, width));
    }
    s
}

/// Files for nft: the full ruleset, and a reload that replaces both sets' contents in one
/// transaction (atomic: no gap).
pub(crate) fn nft_files(dir: &Path, set: &PrefixSet) -> Result<(PathBuf, PathBuf)> {
    let v4 = nft_elements(&set.v4, 32);
    let v6 = nft_elements(&set.v6, 128);
    let load = dir.join("nft-load.nft");
    let mut f = std::io::BufWriter::new(File::create(&load)?);
    writeln!(f, "table inet dfbench {{")?;
    for (name, kind, elements) in [("deny4", "ipv4_addr", &v4), ("deny6", "ipv6_addr", &v6)] {
        writeln!(f, "  set {name} {{")?;
        writeln!(f, "    type {kind}")?;
        writeln!(f, "    flags interval")?;
        writeln!(f, "    auto-merge")?;
        writeln!(f, "    elements = {{ {elements} }}")?;
        writeln!(f, "  }}")?;
    }
    writeln!(f, "  chain out {{")?;
    writeln!(f, "    type filter hook output priority 0; policy accept;")?;
    writeln!(f, "    ip daddr @deny4 drop")?;
    writeln!(f, "    ip6 daddr @deny6 drop")?;
    writeln!(f, "  }}")?;
    writeln!(f, "}}")?;
    f.flush()?;
    let reload = dir.join("nft-reload.nft");
    let mut f = std::io::BufWriter::new(File::create(&reload)?);
    writeln!(f, "flush set inet dfbench deny4")?;
    writeln!(f, "flush set inet dfbench deny6")?;
    writeln!(f, "add element inet dfbench deny4 {{ {v4} }}")?;
    writeln!(f, "add element inet dfbench deny6 {{ {v6} }}")?;
    f.flush()?;
    Ok((load, reload))
}

pub(crate) fn ipset_files(dir: &Path, set: &PrefixSet) -> Result<(PathBuf, PathBuf)> {
    let n = set.v4.len().max(set.v6.len());
    let hashsize = (n / 4).max(1024).next_power_of_two();
    let maxelem = (n * 2).max(65_536);
    let write = |path: &Path, suffix: &str| -> Result<()> {
        let mut f = std::io::BufWriter::new(File::create(path)?);
        for (name, family, list, width) in [
            ("deny4", "inet", &set.v4, 32u8),
            ("deny6", "inet6", &set.v6, 128),
        ] {
            writeln!(
                f,
                "create {name}{suffix} hash:net family {family} hashsize {hashsize} maxelem {maxelem}"
            )?;
            for (p, _) in list {
                writeln!(f, "add {name}{suffix} {}", show_pfx(*p, width))?;
            }
        }
        if !suffix.is_empty() {
            for name in ["deny4", "deny6"] {
                writeln!(f, "swap {name}{suffix} {name}")?;
                writeln!(f, "destroy {name}{suffix}")?;
            }
        }
        f.flush()?;
        Ok(())
    };
    let load = dir.join("ipset-load.txt");
    let reload = dir.join("ipset-reload.txt");
    write(&load, "")?;
    write(&reload, "-new")?;
    Ok((load, reload))
}

/// One control-plane operation of nft or ipset, run in `ns` (and in the memory cgroup).
pub(crate) fn control_op(
    ns: &str,
    program: &str,
    args: &[&str],
    dir: &Path,
    cap: Duration,
    memcg: Option<&MemCg>,
) -> Result<(Duration, Option<i64>)> {
    let mut cmd = command_in(ns, program);
    cmd.args(args);
    if let Some(m) = memcg {
        m.adopt(&mut cmd);
    }
    let before = memcg.and_then(MemCg::usage);
    let (_, t) = run_capped(cmd, dir, cap)?;
    let after = memcg.and_then(MemCg::usage);
    let delta = match (before, after) {
        (Some(b), Some(a)) => Some(a as i64 - b as i64),
        _ => None,
    };
    Ok((t, delta))
}

pub(crate) fn ipset_memory(ns: &str) -> Option<u64> {
    let out = in_ns(ns, "ipset", &["list", "-t"]).ok()?;
    Some(
        out.lines()
            .filter_map(|l| l.strip_prefix("Size in memory:"))
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .sum(),
    )
}
