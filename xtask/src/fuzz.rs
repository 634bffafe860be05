//! `cargo xtask fuzz`: the cargo-fuzz targets in fuzz/, seeded from the repository's
//! policies and a few crafted frames. `cargo xtask test` runs each briefly; run one for
//! longer by hand with `cargo xtask fuzz <target> --seconds N`.

use std::{env, fs, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{setup, util};

/// The targets in fuzz/fuzz_targets.
pub(crate) const TARGETS: &[&str] = &["packet_parse", "policy_parse"];

/// Seconds per target in `cargo xtask test`, unless DATAFENCE_FUZZ_SECONDS says otherwise.
const BRIEF_SECONDS: u64 = 20;

#[derive(Args)]
pub(crate) struct Options {
    /// packet_parse or policy_parse.
    #[arg(value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    target: String,
    /// How long to fuzz; until stopped (Ctrl-C) or a crash when not given.
    #[arg(long)]
    seconds: Option<u64>,
    /// Arguments after `--` go to libFuzzer, e.g. `-jobs=4` or `-only_ascii=1`.
    #[arg(last = true, value_name = "LIBFUZZER_ARGS")]
    libfuzzer_args: Vec<String>,
}

pub(crate) fn run(opts: Options) -> Result<()> {
    let mut cmd = command(&opts.target, opts.seconds)?;
    cmd.args(&opts.libfuzzer_args);
    util::run(&mut cmd)
}

/// Seconds per target for the brief run of `cargo xtask test`.
pub(crate) fn brief_seconds() -> Result<u64> {
    match env::var("DATAFENCE_FUZZ_SECONDS") {
        Ok(s) => s
            .trim()
            .parse()
            .with_context(|| format!("DATAFENCE_FUZZ_SECONDS=`{s}` is not a whole number")),
        Err(_) => Ok(BRIEF_SECONDS),
    }
}

/// `cargo +<eBPF toolchain> fuzz run <target>` (cargo-fuzz needs a nightly; the pinned one) with the corpus seeded and cargo-fuzz on PATH. A
/// crash leaves its input in fuzz/artifacts/<target>/ and fails the command.
pub(crate) fn command(target: &str, seconds: Option<u64>) -> Result<Command> {
    let root = util::workspace_root();
    let fuzz_bin = setup::tools_dir()?.join("cargo-fuzz").join("bin");
    if !fuzz_bin.join("cargo-fuzz").is_file() {
        bail!(
            "cargo-fuzz is not in {}; run `cargo xtask setup`",
            fuzz_bin.display()
        );
    }
    seed(root, target)?;
    let path = env::var_os("PATH").unwrap_or_default();
    let path = env::join_paths(std::iter::once(fuzz_bin).chain(env::split_paths(&path)))?;
    let mut cmd = util::cargo();
    cmd.env("PATH", path)
        // The agent's build script would build the eBPF object, which the targets never
        // use, and with the fuzzer's compiler flags.
        .env("AYA_BUILD_SKIP", "1")
        .arg(format!("+{}", setup::ebpf_toolchain()?))
        .args(["fuzz", "run", target, "--fuzz-dir", "fuzz", "--"]);
    if let Some(seconds) = seconds {
        cmd.arg(format!("-max_total_time={seconds}"));
    }
    // A hang is a bug too; libFuzzer's default (20 minutes) outlasts any brief run.
    cmd.arg("-timeout=10");
    Ok(cmd)
}

/// Writes the seeds into fuzz/corpus/<target>/ (ignored by git), where cargo-fuzz looks.
/// Rewritten on every run, so they follow the policies; what the fuzzer added stays.
fn seed(root: &Path, target: &str) -> Result<()> {
    let dir = root.join("fuzz").join("corpus").join(target);
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let seeds = match target {
        "packet_parse" => frames(),
        "policy_parse" => policies(root)?,
        _ => bail!(
            "no fuzz target `{target}`; there are: {}",
            TARGETS.join(", ")
        ),
    };
    for (name, bytes) in seeds {
        let path = dir.join(format!("seed-{name}"));
        fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// policies/*.yaml and the policy module's test fixtures.
fn policies(root: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut seeds = Vec::new();
    let testdata = root.join("agent/src/policy/testdata");
    let mut dirs = vec![root.join("policies"), testdata.clone()];
    if let Ok(entries) = fs::read_dir(&testdata) {
        dirs.extend(entries.filter_map(|e| e.ok().map(|e| e.path())));
    }
    for dir in dirs {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let relative = path.strip_prefix(root).unwrap_or(&path);
            let name = relative.to_string_lossy().replace('/', "_");
            let text =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            // The target skips inputs with `\` or `!` (see REFUSED in policy_parse.rs);
            // keep the seeds usable by dropping comments that have them.
            let kept: Vec<&str> = text
                .lines()
                .filter(|l| !(l.trim_start().starts_with('#') && l.contains(['\\', '!'])))
                .collect();
            seeds.push((name, (kept.join("\n") + "\n").into_bytes()));
        }
    }
    // Small ones that reach corners the real policies do not.
    let crafted: [(&str, &str); 4] = [
        ("empty", "version: 1\nregions: {}\ndata_classes: {}\n"),
        (
            "files",
            "version: 1\nregions:\n  a: {files: [regions/eu-west.txt, regions/cloud/ambiguous.txt]}\n  \
             b: {files: [regions/not-utf8.txt, regions/missing.txt], cidrs: [192.0.2.128/25]}\n\
             data_classes:\n  c:\n    match: {cgroups: [/a/b/c, /a/file, /missing, a, /a/../b]}\n    \
             allow: [a, z]\n",
        ),
        (
            "limits",
            "version: 2\nmode: shout\ninterfaces: {egress: [], gateway: [eth0, \"a/b\", \
             abcdefghijklmnopq]}\nexempt: [::1, 10.0.0.1/8]\nregions: {r: {cidrs: [0.0.0.0/0]}}\n\
             data_classes:\n  x:\n    match: {marks: [{value: 0x1, mask: 0x0}, {value: -1}], \
             dscp: [64], protocols: [tcp, 300, quic], dst_ports: [\"9-1\", 70000, \"1-2-3\"]}\n    \
             unknown: maybe\n  y: {match: {}}\n  z: {match: {src_cidrs: []}}\n",
        ),
        (
            "syntax",
            "version: 1\nregions: [\ndata_classes: {a: {match: {dscp: [x]}}}\n",
        ),
    ];
    for (name, text) in crafted {
        seeds.push((format!("crafted-{name}"), text.as_bytes().to_vec()));
    }
    Ok(seeds)
}

const MAC: [u8; 12] = [2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2];

fn ethernet(ethertype: u16, vlans: &[u16], l3: &[u8]) -> Vec<u8> {
    let mut f = MAC.to_vec();
    for &tpid in vlans {
        f.extend(tpid.to_be_bytes());
        f.extend(100u16.to_be_bytes());
    }
    f.extend(ethertype.to_be_bytes());
    f.extend(l3);
    f
}

fn ipv4(protocol: u8, options: usize, fragment_offset: u16, l4: &[u8]) -> Vec<u8> {
    let ihl = 5 + options / 4;
    let total = (ihl * 4 + l4.len()) as u16;
    let mut h = vec![0x40 | ihl as u8, 10 << 2];
    h.extend(total.to_be_bytes());
    h.extend([0, 0]);
    h.extend(fragment_offset.to_be_bytes());
    h.extend([64, protocol, 0, 0, 192, 0, 2, 1, 198, 51, 100, 7]);
    h.extend(vec![1; options]);
    h.extend(l4);
    h
}

fn ipv6(next: u8, ext: &[u8], l4: &[u8]) -> Vec<u8> {
    let payload = (ext.len() + l4.len()) as u16;
    let mut h = vec![0x60, 0, 0, 0];
    h.extend(payload.to_be_bytes());
    h.extend([next, 64]);
    h.extend([0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    h.extend([0x20, 0x01, 0x0d, 0xb8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    h.extend(ext);
    h.extend(l4);
    h
}

fn ports(src: u16, dst: u16, len: usize) -> Vec<u8> {
    let mut p = src.to_be_bytes().to_vec();
    p.extend(dst.to_be_bytes());
    p.resize(len, 0);
    p
}

/// One of each frame shape the parser distinguishes.
fn frames() -> Vec<(String, Vec<u8>)> {
    let tcp = ports(40000, 443, 20);
    let udp = ports(5353, 53, 8);
    let sctp = ports(1, 2, 12);
    // Hop-by-hop (8 bytes), routing with segments left (24 bytes), fragment (first), then TCP.
    let mut ext = vec![43, 0, 0, 0, 0, 0, 0, 0];
    ext.extend([44, 2, 0, 1, 0, 0, 0, 0]);
    ext.extend([0; 16]);
    ext.extend([6, 0, 0, 1, 0, 0, 0, 1]);
    // A UDP header past the declared IP length (header only), and a first IPv6 fragment
    // that ends at its fragment header with UDP after it.
    let mut v4_trailer = ipv4(17, 0, 0, &udp);
    v4_trailer[2..4].copy_from_slice(&20u16.to_be_bytes());
    let mut v6_trailer = ipv6(44, &[17, 0, 0, 1, 0, 0, 0, 1], &udp);
    v6_trailer[4..6].copy_from_slice(&8u16.to_be_bytes());
    // A non-first IPv6 fragment whose header claims ICMPv6.
    let v6_later_fragment = ipv6(44, &[58, 0, 0x03, 0x20, 0, 0, 0, 1], &[0xab; 64]);
    let seeds: Vec<(&str, Vec<u8>)> = vec![
        ("v4-trailer", ethernet(0x0800, &[], &v4_trailer)),
        ("v6-trailer", ethernet(0x86dd, &[], &v6_trailer)),
        (
            "v6-later-fragment",
            ethernet(0x86dd, &[], &v6_later_fragment),
        ),
        ("v4-tcp", ethernet(0x0800, &[], &ipv4(6, 0, 0, &tcp))),
        (
            "v4-udp-options",
            ethernet(0x0800, &[], &ipv4(17, 8, 0, &udp)),
        ),
        ("v4-sctp", ethernet(0x0800, &[], &ipv4(132, 0, 0, &sctp))),
        (
            "v4-icmp",
            ethernet(0x0800, &[], &ipv4(1, 0, 0, &[8, 0, 0, 0])),
        ),
        ("v4-fragment", ethernet(0x0800, &[], &ipv4(6, 0, 185, &[]))),
        (
            "v4-short-tcp",
            ethernet(0x0800, &[], &ipv4(6, 0, 0, &tcp[..10])),
        ),
        (
            "v4-vlan",
            ethernet(0x0800, &[0x8100], &ipv4(17, 0, 0, &udp)),
        ),
        (
            "v6-qinq",
            ethernet(0x86dd, &[0x88a8, 0x8100], &ipv6(6, &[], &tcp)),
        ),
        ("v6-tcp", ethernet(0x86dd, &[], &ipv6(6, &[], &tcp))),
        ("v6-ext", ethernet(0x86dd, &[], &ipv6(0, &ext, &tcp))),
        (
            "v6-ah-udp",
            ethernet(
                0x86dd,
                &[],
                &ipv6(51, &[17, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], &udp),
            ),
        ),
        (
            "v6-icmp",
            ethernet(0x86dd, &[], &ipv6(58, &[], &[128, 0, 0, 0])),
        ),
        ("arp", ethernet(0x0806, &[], &[0, 1, 8, 0, 6, 4, 0, 1])),
        (
            "triple-vlan",
            ethernet(0x0800, &[0x8100, 0x8100, 0x8100], &[]),
        ),
        ("runt", MAC[..10].to_vec()),
    ];
    seeds.into_iter().map(|(n, f)| (n.to_owned(), f)).collect()
}
