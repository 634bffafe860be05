//! datafence-bench: every performance figure of datafence in one run, side by side.
//!
//! Run through `cargo xtask bench` (which builds it in release mode and runs it as root).
//! Phases, each bounded in time:
//!
//! 1. datapath: `BPF_PROG_TEST_RUN` of the empty TC program (the floor), an LPM-trie-only
//!    program, datafence's full TC and XDP programs over 128 crafted frames (hot), and the
//!    cold-lookup loops (random addresses), at each policy size in two shapes: the real
//!    prefix-length mix of the cloud catalogue and dense host prefixes. Also the control
//!    plane of datafence: parse, compile, load, no-gap reload, kernel memory.
//! 2. e2e: UDP blasted with sendmmsg across a veth pair, through no filter, datafence,
//!    an nftables interval set and iptables + ipset, at several hit rates; and the load and
//!    reload of nft and ipset with the same prefixes.
//! 3. agent: resident memory of `datafence run` at each size, and its CPU while the kernel
//!    raises ~100k violations per second.
//!
//! Every figure is the median over repeated runs, shown with its min–max spread.
//! Everything happens in network namespaces this program creates; nothing is sent
//! anywhere else.

use std::{
    collections::HashSet,
    fmt::Write as _,
    fs::File,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use datafence::{
    datapath::{BenchProgram, COLD_LOOKUPS_PER_RUN, Datapath, EventLimits, LoadOptions, V4Table},
    policy::{self, CompiledPolicy},
};
use datafence_common::{
    DEFAULT_DIR8_GROUPS, DEFAULT_TABLE_CAPACITY, DEFAULT_V6_ENTRIES, Hook, MAX_DIR8_GROUPS,
};
use integration_tests::{
    Scratch,
    frames::{self, Spec},
    netns::{NetNs, Sandbox, command_in},
};
use ipnetwork::{Ipv4Network, Ipv6Network};
use serde_json::{Value, json};

const USAGE: &str = "\
datafence-bench: datafence's performance, side by side (run as root; see `cargo xtask bench`)

Options:
  --quick              small sizes (10,1k), few rounds, short bursts: a smoke test
  --sizes N,...        policy sizes in prefixes per address family (k/m suffixes);
                       default 10,1k,100k,1m
  --phases P,...       datapath, e2e, agent (default all)
  --out PATH           JSON results (default target/bench/results.json)
  --regions DIR        region files giving the real prefix mix (default policies/regions/cloud)
  --agent-bin PATH     the datafence binary (default: next to this program)
  --budget SECONDS     start no new measurement after this (default 360)
  --rounds N           rounds per datapath figure (default 5; quick 3)
  --repeat N           BPF_PROG_TEST_RUN repeat per frame (default 5000; quick 2000)
  --e2e-seconds S      length of one traffic burst (default 0.5; quick 0.3)
  --load-cap SECONDS   give up an nft/ipset load after this (default 120)
  --commit ID          recorded in the results
";

/// Mark of the user-data class (SO_MARK on the sender).
const USER_MARK: u32 = 0x10;
/// Destinations outside the scaled prefixes, in a region the user-data class may reach:
/// the benchmarking ranges of RFC 2544 and RFC 5180.
const ALLOWED_V4: &str = "198.18.0.0/15";
const ALLOWED_V6: &str = "2001:2::/48";
/// Frames per address family in the hot datapath runs.
const FRAMES_PER_FAMILY: usize = 64;
/// Distinct destinations of the end-to-end traffic.
const E2E_DESTINATIONS: usize = 1024;
/// Messages per sendmmsg call.
const BATCH: usize = 64;
/// Fraction of end-to-end packets the filters drop.
const HIT_RATES: [f64; 2] = [0.0, 0.1];
/// Packets per second of denied traffic while the agent's CPU is sampled.
const VIOLATION_RATE: f64 = 100_000.0;

fn main() {
    let args = match Args::parse() {
        Ok(args) => args,
        Err(err) => {
            eprintln!("error: {err:#}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    if let Err(err) = run(&args) {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------
// Arguments

struct Args {
    quick: bool,
    sizes: Vec<usize>,
    phases: Vec<String>,
    out: PathBuf,
    regions: PathBuf,
    agent_bin: PathBuf,
    budget: Duration,
    rounds: usize,
    repeat: u32,
    cold_repeat: u32,
    e2e_seconds: f64,
    e2e_reps: usize,
    cpu_samples: usize,
    cpu_seconds: f64,
    load_cap: Duration,
    commit: Option<String>,
}

fn parse_size(s: &str) -> Result<usize> {
    let s = s.trim().to_ascii_lowercase();
    let (digits, factor) = if let Some(d) = s.strip_suffix('m') {
        (d, 1_000_000)
    } else if let Some(d) = s.strip_suffix('k') {
        (d, 1_000)
    } else {
        (s.as_str(), 1)
    };
    let n: usize = digits
        .parse()
        .with_context(|| format!("size {s:?}: expected e.g. 10, 1k, 100k, 1m"))?;
    if n == 0 {
        bail!("size {s:?} must be positive");
    }
    Ok(n * factor)
}

impl Args {
    fn parse() -> Result<Self> {
        let raw: Vec<String> = std::env::args().skip(1).collect();
        let mut quick = false;
        let mut sizes = None;
        let mut phases = None;
        let mut out = PathBuf::from("target/bench/results.json");
        let mut regions = PathBuf::from("policies/regions/cloud");
        let mut agent_bin = None;
        let mut budget = 360.0;
        let mut rounds = None;
        let mut repeat = None;
        let mut e2e_seconds = None;
        let mut load_cap = 120.0;
        let mut commit = None;
        let mut it = raw.into_iter();
        while let Some(arg) = it.next() {
            let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--quick" => quick = true,
                "--sizes" => {
                    sizes = Some(
                        value()?
                            .split(',')
                            .map(parse_size)
                            .collect::<Result<Vec<_>>>()?,
                    );
                }
                "--phases" => {
                    let list: Vec<String> = value()?.split(',').map(str::to_owned).collect();
                    for p in &list {
                        if !["datapath", "e2e", "agent"].contains(&p.as_str()) {
                            bail!("unknown phase {p:?}");
                        }
                    }
                    phases = Some(list);
                }
                "--out" => out = value()?.into(),
                "--regions" => regions = value()?.into(),
                "--agent-bin" => agent_bin = Some(PathBuf::from(value()?)),
                "--budget" => budget = value()?.parse().context("--budget")?,
                "--rounds" => rounds = Some(value()?.parse().context("--rounds")?),
                "--repeat" => repeat = Some(value()?.parse().context("--repeat")?),
                "--e2e-seconds" => e2e_seconds = Some(value()?.parse().context("--e2e-seconds")?),
                "--load-cap" => load_cap = value()?.parse().context("--load-cap")?,
                "--commit" => commit = Some(value()?),
                "-h" | "--help" => {
                    print!("{USAGE}");
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?}"),
            }
        }
        let agent_bin = match agent_bin {
            Some(p) => p,
            None => std::env::current_exe()?
                .parent()
                .context("no parent of this program")?
                .join("datafence"),
        };
        let default_sizes = if quick {
            vec![10, 1_000]
        } else {
            vec![10, 1_000, 100_000, 1_000_000]
        };
        let repeat: u32 = repeat.unwrap_or(if quick { 2_000 } else { 5_000 });
        Ok(Self {
            quick,
            sizes: sizes.unwrap_or(default_sizes),
            phases: phases.unwrap_or_else(|| vec!["datapath".into(), "e2e".into(), "agent".into()]),
            out,
            regions,
            agent_bin,
            budget: Duration::from_secs_f64(budget),
            rounds: rounds.unwrap_or(if quick { 3 } else { 5 }).max(1),
            repeat: repeat.max(1),
            cold_repeat: (repeat / 5).max(100),
            e2e_seconds: e2e_seconds.unwrap_or(if quick { 0.3 } else { 0.5 }),
            e2e_reps: if quick { 2 } else { 3 },
            cpu_samples: if quick { 2 } else { 3 },
            cpu_seconds: if quick { 1.0 } else { 1.5 },
            load_cap: Duration::from_secs_f64(load_cap),
            commit,
        })
    }

    fn phase(&self, name: &str) -> bool {
        self.phases.iter().any(|p| p == name)
    }
}

// ---------------------------------------------------------------------------------------
// Small tools: random numbers, statistics, time budget, /proc

/// splitmix64: deterministic, so every run measures the same prefixes and frames.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn u128(&mut self) -> u128 {
        (u128::from(self.next()) << 64) | u128::from(self.next())
    }

    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// A median with its min–max spread over `n` runs.
#[derive(Clone, Copy, Debug)]
struct Summary {
    median: f64,
    min: f64,
    max: f64,
    n: usize,
}

fn summarize(values: &[f64]) -> Option<Summary> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        f64::midpoint(v[n / 2 - 1], v[n / 2])
    };
    Some(Summary {
        median,
        min: v[0],
        max: v[n - 1],
        n,
    })
}

impl Summary {
    fn json(self) -> Value {
        json!({"median": self.median, "min": self.min, "max": self.max, "n": self.n})
    }
}

fn sjson(s: Option<Summary>) -> Value {
    s.map_or(Value::Null, Summary::json)
}

/// "12.3 (11.9–13.0)" with `digits` decimals; "–" when missing.
fn show(s: Option<Summary>, digits: usize) -> String {
    match s {
        None => "–".into(),
        Some(s) if s.n == 1 => format!("{:.digits$} (n=1)", s.median),
        Some(s) => format!(
            "{:.digits$} ({:.digits$}–{:.digits$})",
            s.median, s.min, s.max
        ),
    }
}

fn ratio(a: Option<Summary>, b: Option<Summary>) -> Option<f64> {
    let (a, b) = (a?, b?);
    (b.median > 0.0).then(|| a.median / b.median)
}

fn show_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "–".into(), |r| format!("{r:.2}×"))
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

fn human_size(n: usize) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else if n >= 1_000 && n.is_multiple_of(1_000) {
        format!("{}k", n / 1_000)
    } else {
        n.to_string()
    }
}

struct Budget {
    start: Instant,
    limit: Duration,
}

impl Budget {
    fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Whether the part of the budget up to `fraction` is used up.
    fn past(&self, fraction: f64) -> bool {
        self.elapsed() > self.limit.mul_f64(fraction)
    }

    fn left(&self) -> Duration {
        self.limit.saturating_sub(self.elapsed())
    }
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn proc_status_kib(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resident bytes of a process's mappings of BPF objects (mmapped maps, ring buffers).
fn bpf_mapped_rss(pid: &str) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut in_bpf = false;
    let mut total = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().next().is_some_and(|c| c.is_ascii_hexdigit()) {
            in_bpf = line.contains("bpf");
        } else if in_bpf && let Some(rest) = line.strip_prefix("Rss:") {
            total += rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
                * 1024;
        }
    }
    total
}

/// utime + stime of a process, in seconds.
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After "pid (comm) ", field 3 (state) is index 0: utime is field 14, stime 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks)
}

/// Resets VmHWM of this process to its current RSS.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}

/// Runs a command with a deadline; stdout and stderr go to files in `dir`. Returns its
/// stdout, or an error that carries stderr (or says it timed out and was killed).
fn run_capped(mut cmd: Command, dir: &Path, cap: Duration) -> Result<(String, Duration)> {
    let shown = format!("{cmd:?}");
    let out_path = dir.join("cmd.stdout");
    let err_path = dir.join("cmd.stderr");
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?);
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawning {shown}"))?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > cap {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "capped: still running after {:.0}s, killed",
                cap.as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    if !status.success() {
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        let stderr: String = stderr.chars().take(600).collect();
        bail!("{shown} failed ({status}): {}", stderr.trim());
    }
    Ok((stdout, elapsed))
}

fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn in_ns(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    let mut cmd = command_in(ns, program);
    cmd.args(args);
    sh(&mut cmd)
}

// ---------------------------------------------------------------------------------------
// Kernel memory through a memory cgroup

/// A memory cgroup that kernel allocations (BPF maps, nftables and ipset elements) are
/// charged to while a thread or a child runs in it. cgroup v2 when its memory controller
/// is available, else the v1 memory hierarchy, which also lets a single thread move.
struct MemCg {
    dir: PathBuf,
    usage_file: &'static str,
    /// v1 only: a thread can join (`tasks`), and return to where it came from.
    thread_join: Option<(PathBuf, PathBuf)>,
    label: &'static str,
}

impl MemCg {
    fn create() -> Option<Self> {
        let name = format!("datafence-bench-{}", std::process::id());
        for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
            let root = Path::new(root);
            let controllers =
                std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            if controllers.split_whitespace().any(|c| c == "memory") {
                let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
                let dir = root.join(&name);
                let _ = std::fs::create_dir(&dir);
                if dir.join("memory.current").exists() {
                    return Some(Self {
                        dir,
                        usage_file: "memory.current",
                        thread_join: None,
                        label: "cgroup v2 memory.current",
                    });
                }
                let _ = std::fs::remove_dir(&dir);
            }
        }
        let v1 = Path::new("/sys/fs/cgroup/memory");
        if v1.join("memory.usage_in_bytes").exists() {
            let dir = v1.join(&name);
            std::fs::create_dir(&dir).ok()?;
            let own = std::fs::read_to_string("/proc/self/cgroup")
                .unwrap_or_default()
                .lines()
                .find_map(|l| {
                    let mut parts = l.splitn(3, ':');
                    let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
                    ctrl.split(',')
                        .any(|c| c == "memory")
                        .then(|| path.to_owned())
                })
                .unwrap_or_else(|| "/".into());
            let home = v1.join(own.trim_start_matches('/')).join("tasks");
            return Some(Self {
                thread_join: Some((dir.join("tasks"), home)),
                dir,
                usage_file: "memory.usage_in_bytes",
                label: "cgroup v1 memory.usage_in_bytes",
            });
        }
        None
    }

    fn usage(&self) -> Option<u64> {
        std::fs::read_to_string(self.dir.join(self.usage_file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Moves the calling thread in (v1 only); false when it cannot.
    fn enter_thread(&self) -> bool {
        self.thread_join
            .as_ref()
            .is_some_and(|(tasks, _)| std::fs::write(tasks, "0").is_ok())
    }

    fn leave_thread(&self) {
        if let Some((_, home)) = &self.thread_join {
            let _ = std::fs::write(home, "0");
        }
    }

    /// Makes `cmd` run in this cgroup.
    fn adopt(&self, cmd: &mut Command) {
        datafence::cgroups::spawn_in_cgroup(cmd, &self.dir.join("cgroup.procs"))
            .expect("no NUL in a cgroup path");
    }
}

impl Drop for MemCg {
    fn drop(&mut self) {
        self.leave_thread();
        // Charges still held (freed lazily) do not stop rmdir; tasks would.
        for _ in 0..20 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Prefix sets: the real prefix-length mix, scaled, and dense host prefixes

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
struct Pfx {
    bits: u128,
    len: u8,
}

fn mask(width: u8, len: u8) -> u128 {
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

fn overlaps(a: Pfx, b: Pfx, width: u8) -> bool {
    let len = a.len.min(b.len);
    (a.bits & mask(width, len)) == (b.bits & mask(width, len))
}

/// Space that must stay out of the scaled sets: special-purpose ranges, the sandbox's
/// own link, and the benchmark destinations the user-data class may reach.
fn special(p: Pfx, width: u8) -> bool {
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
struct PrefixSet {
    v4: Vec<(Pfx, usize)>,
    v6: Vec<(Pfx, usize)>,
}

/// The distinct prefixes of the region files, each with the file it came from.
struct Catalogue {
    regions: Vec<String>,
    base: PrefixSet,
}

fn read_catalogue(dir: &Path) -> Result<Catalogue> {
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
        for line in text.lines() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let Ok(net) = line.parse::<ipnetwork::IpNetwork>() else {
                continue;
            };
            let (p, width) = match net.network() {
                IpAddr::V4(a) => (
                    Pfx {
                        bits: u128::from(u32::from(a)),
                        len: net.prefix(),
                    },
                    32,
                ),
                IpAddr::V6(a) => (
                    Pfx {
                        bits: u128::from(a),
                        len: net.prefix(),
                    },
                    128,
                ),
            };
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
fn scale(base: &[(Pfx, usize)], n: usize, width: u8, rng: &mut Rng) -> Vec<(Pfx, usize)> {
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
fn dense(n: usize, width: u8, regions: usize) -> Vec<(Pfx, usize)> {
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
enum Shape {
    Real,
    Dense,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Self::Real => "real-mix",
            Self::Dense => "dense-hosts",
        }
    }
}

fn prefix_set(cat: &Catalogue, shape: Shape, n: usize) -> PrefixSet {
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

fn v4net(p: Pfx) -> Ipv4Network {
    Ipv4Network::new(Ipv4Addr::from(p.bits as u32), p.len).expect("valid prefix")
}

fn v6net(p: Pfx) -> Ipv6Network {
    Ipv6Network::new(Ipv6Addr::from(p.bits), p.len).expect("valid prefix")
}

fn show_pfx(p: Pfx, width: u8) -> String {
    if width == 32 {
        v4net(p).to_string()
    } else {
        v6net(p).to_string()
    }
}

/// A random address inside `p`.
fn inside(p: Pfx, width: u8, rng: &mut Rng) -> u128 {
    let host = rng.u128() & !mask(width, p.len) & mask(width, width);
    p.bits | host
}

// ---------------------------------------------------------------------------------------
// Policies

/// A policy directory (policy.yaml + regions/*.txt) for a prefix set. Region 1 holds the
/// benchmark destinations the user-data class may reach; the catalogue's regions follow,
/// and the class may also reach `eu` (or the first one).
struct PolicyFiles {
    scratch: Scratch,
    path: PathBuf,
}

fn write_policy(cat: &Catalogue, set: &PrefixSet, label: &str) -> Result<PolicyFiles> {
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

fn table_capacity(n: usize) -> u32 {
    DEFAULT_TABLE_CAPACITY.max((n + 16).next_power_of_two() as u32)
}

/// Options sized for a compiled policy: the region table capacity, and DIR-24-8 groups for
/// every /24 that holds longer prefixes.
/// When the IPv4 prefixes need more DIR-24-8 groups than the table can address, the
/// datapath is measured with its other IPv4 table, the LPM trie, and the reason recorded.
fn load_options(n: usize, compiled: &CompiledPolicy, bench: bool) -> LoadOptions {
    LoadOptions {
        table_capacity: table_capacity(n),
        dir8_groups: dir8_groups(compiled),
        v6_entries: v6_entries(compiled),
        v4_table: v4_table(compiled).0,
        bench,
        ..Default::default()
    }
}

fn v6_entries(compiled: &CompiledPolicy) -> u32 {
    let needed = datafence::v6table::build(&compiled.regions_v6).entries() as u32;
    DEFAULT_V6_ENTRIES.max(needed + 16)
}

fn dir8_groups(compiled: &CompiledPolicy) -> u32 {
    let needed = datafence::dir24::count_groups(&compiled.regions_v4) as u32;
    DEFAULT_DIR8_GROUPS.max(needed + 16).min(MAX_DIR8_GROUPS)
}

fn v4_table(compiled: &CompiledPolicy) -> (V4Table, String) {
    let needed = datafence::dir24::count_groups(&compiled.regions_v4);
    if needed > MAX_DIR8_GROUPS as usize {
        (
            V4Table::Trie,
            format!(
                "trie: DIR-24-8 cannot hold it ({needed} /24s with longer prefixes, at most {MAX_DIR8_GROUPS} groups)"
            ),
        )
    } else {
        (V4Table::Dir24, format!("dir24 ({needed} groups)"))
    }
}

fn parse_policy(path: &Path, n: usize) -> Result<policy::LoadedPolicy> {
    policy::load_policy(
        path,
        &policy::LoadOptions {
            cgroup_root: datafence::cgroups::cgroup2_root(),
            table_capacity: table_capacity(n),
        },
    )
    .map_err(|e| anyhow!("policy {}: {e}", path.display()))
}

// ---------------------------------------------------------------------------------------
// Machine facts

fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, m)| m.trim())
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    let version = |prog: &str, arg: &str| {
        Command::new(prog)
            .arg(arg)
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default()
    };
    json!({
        "cpu": model,
        "cores": cores,
        "kernel": kernel,
        "memory_gib": mem_kib as f64 / 1024.0 / 1024.0,
        "nft": version("nft", "--version"),
        "ipset": version("ipset", "--version"),
        "iptables": version("iptables", "-V"),
    })
}

// ---------------------------------------------------------------------------------------
// Phase 1: the datapath under BPF_PROG_TEST_RUN, and datafence's control plane

struct TestFrame {
    bytes: Vec<u8>,
    mark: u32,
}

/// 64 frames per family: user data (TCP/443, marked) and other traffic (UDP/53), to
/// destinations in a region (hits) and in none (misses), half each.
fn make_frames(set: &PrefixSet, compiled: &CompiledPolicy, rng: &mut Rng) -> [Vec<TestFrame>; 2] {
    let mut out = [Vec::new(), Vec::new()];
    for (family, list, width) in [(0usize, &set.v4, 32u8), (1, &set.v6, 128)] {
        for i in 0..FRAMES_PER_FAMILY {
            let user = i % 2 == 0;
            let hit = (i / 2) % 2 == 0;
            let dst = if hit && !list.is_empty() {
                let (p, _) = list[rng.below(list.len())];
                inside(p, width, rng)
            } else {
                // A random public address that no region holds.
                let mut addr = 0;
                for _ in 0..1000 {
                    let cand = rng.u128() & mask(width, width);
                    let cand_pfx = Pfx {
                        bits: cand,
                        len: width,
                    };
                    if special(cand_pfx, width) {
                        continue;
                    }
                    addr = cand;
                    if compiled.region_of(to_ip(cand, width)) == 0 {
                        break;
                    }
                }
                addr
            };
            let (src, dst) = if width == 32 {
                (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), to_ip(dst, width))
            } else {
                (
                    IpAddr::V6("2001:db8:1::1".parse().expect("constant")),
                    to_ip(dst, width),
                )
            };
            let mut spec = Spec::new(src, dst);
            if user {
                spec.protocol = frames::TCP;
                spec.dst_port = 443;
            } else {
                spec.protocol = frames::UDP;
                spec.dst_port = 53;
            }
            spec.src_port = 40000 + i as u16;
            out[family].push(TestFrame {
                bytes: spec.build().bytes,
                mark: if user { USER_MARK } else { 0 },
            });
        }
    }
    out
}

fn to_ip(bits: u128, width: u8) -> IpAddr {
    if width == 32 {
        IpAddr::V4(Ipv4Addr::from(bits as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(bits))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Prog {
    Floor,
    Lpm,
    Tc,
    Xdp,
}

const PROGS: [(Prog, &str); 4] = [
    (Prog::Floor, "floor"),
    (Prog::Lpm, "lpm_only"),
    (Prog::Tc, "tc_full"),
    (Prog::Xdp, "xdp_full"),
];

fn ns_per_packet(
    dp: &Datapath,
    prog: Prog,
    family: usize,
    frame: &TestFrame,
    repeat: u32,
) -> Result<f64> {
    let d = match prog {
        Prog::Floor => dp.bench_run(BenchProgram::Empty, &frame.bytes, repeat)?,
        Prog::Lpm => {
            let p = if family == 0 {
                BenchProgram::LpmOnlyV4
            } else {
                BenchProgram::LpmOnlyV6
            };
            dp.bench_run(p, &frame.bytes, repeat)?
        }
        Prog::Tc => {
            dp.test_run_repeat(Hook::TcEgress, &frame.bytes, frame.mark, repeat)?
                .1
        }
        Prog::Xdp => dp.test_run_repeat(Hook::Xdp, &frame.bytes, 0, repeat)?.1,
    };
    Ok(d.as_nanos() as f64)
}

/// Hot figures: [family][prog] summaries of the mean ns per packet over the frames.
fn hot_runs(
    dp: &Datapath,
    frames: &[Vec<TestFrame>; 2],
    args: &Args,
) -> Result<[[Option<Summary>; 4]; 2]> {
    let mut samples = vec![vec![Vec::new(); PROGS.len()]; 2];
    for _ in 0..args.rounds {
        for (pi, (prog, _)) in PROGS.iter().enumerate() {
            for (family, list) in frames.iter().enumerate() {
                let mut total = 0.0;
                for frame in list {
                    total += ns_per_packet(dp, *prog, family, frame, args.repeat)?;
                }
                samples[family][pi].push(total / list.len() as f64);
            }
        }
    }
    let mut out = [[None; 4]; 2];
    for family in 0..2 {
        for pi in 0..PROGS.len() {
            out[family][pi] = summarize(&samples[family][pi]);
        }
    }
    Ok(out)
}

/// Per family [LPM, datafence] ns per lookup, and the empty loop's ns per run.
type ColdFigures = ([[Option<Summary>; 2]; 2], Option<Summary>);

/// Cold figures: ns per lookup beyond the loop's floor, [family][lpm, datafence].
fn cold_runs(dp: &Datapath, frames: &[Vec<TestFrame>; 2], args: &Args) -> Result<ColdFigures> {
    let programs = [
        [BenchProgram::ColdLpmV4, BenchProgram::ColdRegionV4],
        [BenchProgram::ColdLpmV6, BenchProgram::ColdRegionV6],
    ];
    let mut samples = vec![vec![Vec::new(); 2]; 2];
    let mut floors = Vec::new();
    let per = f64::from(COLD_LOOKUPS_PER_RUN);
    for _ in 0..args.rounds {
        let frame = &frames[0][0].bytes;
        let floor = dp
            .bench_run(BenchProgram::ColdFloor, frame, args.cold_repeat)?
            .as_nanos() as f64;
        floors.push(floor);
        for (family, pair) in programs.iter().enumerate() {
            for (k, prog) in pair.iter().enumerate() {
                let ns = dp
                    .bench_run(*prog, &frames[family][0].bytes, args.cold_repeat)?
                    .as_nanos() as f64;
                samples[family][k].push((ns - floor) / per);
            }
        }
    }
    let mut out = [[None; 2]; 2];
    for family in 0..2 {
        for k in 0..2 {
            out[family][k] = summarize(&samples[family][k]);
        }
    }
    Ok((out, summarize(&floors)))
}

fn map_memory_json(mem: &[(String, u64)]) -> (Value, u64, u64) {
    let total: u64 = mem.iter().map(|(_, b)| b).sum();
    let policy: u64 = mem
        .iter()
        .filter(|(name, _)| !name.to_ascii_uppercase().starts_with("BENCH"))
        .map(|(_, b)| b)
        .sum();
    let per_map: serde_json::Map<String, Value> = mem
        .iter()
        .map(|(name, b)| (name.clone(), json!(b)))
        .collect();
    (Value::Object(per_map), total, policy)
}

struct DatapathCase {
    shape: Shape,
    size: usize,
    json: Value,
}

fn datapath_case(
    cat: &Catalogue,
    shape: Shape,
    n: usize,
    args: &Args,
    memcg: Option<&MemCg>,
) -> Result<(Value, Option<Arc<CompiledPolicy>>)> {
    let set = prefix_set(cat, shape, n);
    let files = write_policy(cat, &set, &format!("bench-{}-{n}", shape.name()))?;
    let (loaded, parse_t) = timed(|| parse_policy(&files.path, n));
    let loaded = loaded?;
    let (compiled, compile_t) = timed(|| loaded.compile());
    drop(loaded);
    let compiled = Arc::new(compiled);

    // Control plane: fresh loads; small policies several times, large ones once.
    let reps = match n {
        0..=10_000 => 5,
        10_001..=200_000 => 3,
        _ => 1,
    };
    let limits = EventLimits::default();
    let mut object_t = Vec::new();
    let mut apply_t = Vec::new();
    let mut reload_t = Vec::new();
    let mut kernel_one = Vec::new();
    let mut kernel_two = Vec::new();
    let mut memcg_delta = Vec::new();
    let mut rss_peak = Vec::new();
    let mut per_map = Value::Null;
    let mut dp = None;
    for rep in 0..reps {
        drop(dp.take()); // free the previous datapath first
        std::thread::sleep(Duration::from_millis(50));
        let joined = memcg.is_some_and(MemCg::enter_thread);
        let before = memcg.and_then(MemCg::usage);
        let rss_before = proc_status_kib("self", "VmRSS:").unwrap_or(0);
        reset_peak_rss();
        let (loaded, t) = timed(|| Datapath::load(&load_options(n, &compiled, true)));
        let mut d = loaded.context("loading the datapath")?;
        object_t.push(t.as_secs_f64() * 1e3);
        let (applied, t) = timed(|| d.apply(&compiled, limits));
        applied.context("applying the policy")?;
        apply_t.push(t.as_secs_f64());
        let mem = d.map_memory();
        let (maps, _, policy_bytes) = map_memory_json(&mem);
        kernel_one.push(policy_bytes as f64);
        if joined && let (Some(b), Some(a)) = (before, memcg.and_then(MemCg::usage)) {
            memcg_delta.push(a.saturating_sub(b) as f64);
        }
        let peak = proc_status_kib("self", "VmHWM:").unwrap_or(0);
        rss_peak.push(peak.saturating_sub(rss_before) as f64 * 1024.0);
        if joined && let Some(m) = memcg {
            m.leave_thread();
        }
        let (reloaded, t) = timed(|| d.apply(&compiled, limits));
        reloaded.context("reloading the policy")?;
        reload_t.push(t.as_secs_f64());
        let (_, _, both) = map_memory_json(&d.map_memory());
        kernel_two.push(both as f64);
        if rep + 1 == reps {
            per_map = maps;
        }
        dp = Some(d);
    }
    let mut dp = dp.context("no datapath")?;

    // The baseline tries hold the same prefixes and region ids as datafence's tables.
    let (filled, fill_t) = timed(|| dp.fill_bench_lpm(&compiled.regions_v4, &compiled.regions_v6));
    filled.context("filling the LPM baseline tries")?;

    let mut rng = Rng(0xf4a3e5 ^ n as u64);
    let frames = make_frames(&set, &compiled, &mut rng);
    let (runs, run_t) = timed(|| -> Result<_> {
        let hot = hot_runs(&dp, &frames, args)?;
        let cold = cold_runs(&dp, &frames, args)?;
        Ok((hot, cold))
    });
    let (hot, (cold, cold_floor)) = runs?;
    drop(dp);
    eprintln!(
        "         parse {:.2}s, compile {:.2}s, {reps}× load+apply+reload {:.1}s, LPM fill {:.1}s, runs {:.1}s",
        parse_t.as_secs_f64(),
        compile_t.as_secs_f64(),
        object_t.iter().sum::<f64>() / 1e3
            + apply_t.iter().sum::<f64>()
            + reload_t.iter().sum::<f64>(),
        fill_t.as_secs_f64(),
        run_t.as_secs_f64(),
    );

    let mut hot_json = serde_json::Map::new();
    for (family, name) in [(0, "ipv4"), (1, "ipv6")] {
        let h = hot[family];
        let mut entry = serde_json::Map::new();
        for (pi, (_, pname)) in PROGS.iter().enumerate() {
            entry.insert(format!("{pname}_ns"), sjson(h[pi]));
        }
        entry.insert("tc_vs_floor".into(), json!(ratio(h[2], h[0])));
        entry.insert("tc_vs_lpm".into(), json!(ratio(h[2], h[1])));
        entry.insert("xdp_vs_floor".into(), json!(ratio(h[3], h[0])));
        entry.insert("xdp_vs_lpm".into(), json!(ratio(h[3], h[1])));
        hot_json.insert(name.into(), Value::Object(entry));
    }
    let mut cold_json = serde_json::Map::new();
    for (family, name) in [(0, "ipv4"), (1, "ipv6")] {
        let c = cold[family];
        cold_json.insert(
            name.into(),
            json!({
                "lpm_ns_per_lookup": sjson(c[0]),
                "datafence_ns_per_lookup": sjson(c[1]),
                "lpm_over_datafence": ratio(c[0], c[1]),
            }),
        );
    }
    cold_json.insert("loop_floor_ns_per_run".into(), sjson(cold_floor));
    cold_json.insert("lookups_per_run".into(), json!(COLD_LOOKUPS_PER_RUN));
    let json = json!({
        "shape": shape.name(),
        "size": n,
        "prefixes_v4": compiled.regions_v4.len(),
        "prefixes_v6": compiled.regions_v6.len(),
        "v4_table": v4_table(&compiled).1,
        "frames": FRAMES_PER_FAMILY * 2,
        "repeat": args.repeat,
        "rounds": args.rounds,
        "hot": Value::Object(hot_json),
        "cold": Value::Object(cold_json),
        "control": {
            "parse_validate_s": parse_t.as_secs_f64(),
            "compile_s": compile_t.as_secs_f64(),
            "object_load_ms": sjson(summarize(&object_t)),
            "apply_s": sjson(summarize(&apply_t)),
            "reload_s": sjson(summarize(&reload_t)),
            "kernel_bytes_one_slot": sjson(summarize(&kernel_one)),
            "kernel_bytes_both_slots": sjson(summarize(&kernel_two)),
            "kernel_bytes_per_map": per_map,
            "memcg_bytes": sjson(summarize(&memcg_delta)),
            "rss_peak_growth_bytes": sjson(summarize(&rss_peak)),
            "bench_lpm_fill_s": fill_t.as_secs_f64(),
        },
    });
    drop(files.scratch);
    let keep = (shape == Shape::Real).then_some(compiled);
    Ok((json, keep))
}

// ---------------------------------------------------------------------------------------
// Phase 2: end to end through a veth pair, and nft / ipset control planes

struct BlastStats {
    processed: u64,
    refused: u64,
    elapsed: Duration,
}

/// Sends UDP datagrams with sendmmsg to `dests` in turn, from the calling thread's
/// namespace, for `duration` (and at most `rate` per second). A datagram the kernel
/// refuses (netfilter's EPERM) counts as processed and the next one is sent.
fn blast(dests: &[SocketAddrV4], duration: Duration, rate: Option<f64>) -> Result<BlastStats> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: we own fd; OwnedFd closes it.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let mark = USER_MARK;
    // SAFETY: setsockopt with a valid fd and a u32 option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            owned.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&raw const mark).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("SO_MARK: {}", std::io::Error::last_os_error());
    }
    let addrs: Vec<libc::sockaddr_in> = dests
        .iter()
        .map(|d| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: d.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*d.ip()).to_be(),
            },
            sin_zero: [0; 8],
        })
        .collect();
    let payload = [0x5au8; 32];
    let iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    let mut msgs: Vec<libc::mmsghdr> = addrs
        .iter()
        .map(|a| {
            // SAFETY: mmsghdr is plain data; all-zero is a valid value.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = (a as *const libc::sockaddr_in).cast_mut().cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            m.msg_hdr.msg_iov = (&raw const iov).cast_mut();
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let len = msgs.len();
    let mut pos = 0;
    let mut processed = 0u64;
    let mut refused = 0u64;
    let start = Instant::now();
    let mut calls = 0u32;
    loop {
        let batch = BATCH.min(len - pos);
        // SAFETY: msgs[pos..pos + batch] are initialised mmsghdrs whose pointers (addrs,
        // iov, payload) outlive the call.
        let r = unsafe {
            libc::sendmmsg(
                owned.as_raw_fd(),
                msgs.as_mut_ptr().add(pos),
                batch as libc::c_uint,
                0,
            )
        };
        if r < 0 {
            refused += 1;
            processed += 1;
            pos += 1;
        } else {
            processed += r as u64;
            pos += r as usize;
        }
        if pos >= len {
            pos = 0;
        }
        calls += 1;
        if calls.is_multiple_of(8) {
            let elapsed = start.elapsed();
            if elapsed >= duration {
                break;
            }
            if let Some(rate) = rate {
                let ahead = processed as f64 / rate - elapsed.as_secs_f64();
                if ahead > 0.0 {
                    std::thread::sleep(Duration::from_secs_f64(ahead));
                }
            }
        }
    }
    Ok(BlastStats {
        processed,
        refused,
        elapsed: start.elapsed(),
    })
}

fn rx_packets(ns: &str, dev: &str) -> Result<u64> {
    let out = in_ns(ns, "ip", &["-s", "-j", "link", "show", "dev", dev])?;
    let v: Value = serde_json::from_str(&out)?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .context("no rx packets in `ip -s -j link`")
}

/// The sandbox of the end-to-end runs: a default route from host to world, where a tc
/// ingress chain (nftables, netdev family) drops everything as cheaply as possible (the receive side shares the
/// sender's CPU over veth, so it must cost little).
fn e2e_sandbox() -> Result<Sandbox> {
    let sb = Sandbox::new("bench");
    sb.host.ip("route add default via 192.0.2.2");
    sb.host.ip("-6 route add default via 2001:db8:1::2");
    let sink =
        std::env::temp_dir().join(format!("datafence-bench-sink-{}.nft", std::process::id()));
    std::fs::write(
        &sink,
        "table netdev dfsink {\n  chain in {\n    type filter hook ingress device \"dn0\" priority 0; policy drop;\n  }\n}\n",
    )?;
    let loaded = in_ns(&sb.world.name, "nft", &["-f", &sink.to_string_lossy()]);
    let _ = std::fs::remove_file(&sink);
    loaded?;
    Ok(sb)
}

/// 1024 destinations, a fraction `hit` of them in prefixes of regions the user-data class
/// may not reach (which every filter drops), the rest in the benchmark range it may.
fn e2e_destinations(
    set: &PrefixSet,
    compiled: &CompiledPolicy,
    allowed_ids: &[u32],
    hit: f64,
    rng: &mut Rng,
) -> Vec<SocketAddrV4> {
    let hits = (E2E_DESTINATIONS as f64 * hit).round() as usize;
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
    let mut out = Vec::with_capacity(E2E_DESTINATIONS);
    let denied: Vec<Pfx> = set
        .v4
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| {
            let region = compiled.region_of(IpAddr::V4(Ipv4Addr::from(p.bits as u32)));
            !allowed_ids.contains(&region)
        })
        .collect();
    for i in 0..E2E_DESTINATIONS {
        let addr = if i < hits && !denied.is_empty() {
            let mut addr = Ipv4Addr::from(denied[rng.below(denied.len())].bits as u32);
            for _ in 0..100 {
                let p = denied[rng.below(denied.len())];
                let cand = Ipv4Addr::from(inside(p, 32, rng) as u32);
                let region = compiled.region_of(IpAddr::V4(cand));
                if !allowed_ids.contains(&region) {
                    addr = cand;
                    break;
                }
            }
            addr
        } else {
            Ipv4Addr::from(base + 1 + rng.below((1 << 17) - 2) as u32)
        };
        out.push(SocketAddrV4::new(addr, 443));
    }
    rng.shuffle(&mut out);
    out
}

/// One burst from the host namespace: packets per second, processed, refused.
fn burst(sb: &Sandbox, dests: &[SocketAddrV4], seconds: f64) -> Result<(f64, u64, u64)> {
    let d = dests.to_vec();
    let s = sb
        .host
        .run(move || blast(&d, Duration::from_secs_f64(seconds), None))?;
    Ok((
        s.processed as f64 / s.elapsed.as_secs_f64(),
        s.processed,
        s.refused,
    ))
}

/// Packets per second through a filter, and through no filter in alternation with it
/// (`toggle(false)` / `toggle(true)` switch it off and on), so that both see the same
/// machine; without a toggle only the filter is measured. The delivered and refused
/// fractions are those of the filter's bursts.
struct Measured {
    pps: Vec<f64>,
    baseline: Vec<f64>,
    delivered: f64,
    refused: f64,
}

fn measure(
    sb: &Sandbox,
    dests: &[SocketAddrV4],
    args: &Args,
    toggle: Option<&dyn Fn(bool) -> Result<()>>,
) -> Result<Measured> {
    // A short warm-up burst (caches, neighbour entries), not counted.
    burst(sb, dests, 0.1)?;
    let mut m = Measured {
        pps: Vec::new(),
        baseline: Vec::new(),
        delivered: 0.0,
        refused: 0.0,
    };
    let (mut processed, mut refused, mut received) = (0u64, 0u64, 0u64);
    for _ in 0..args.e2e_reps {
        if let Some(toggle) = toggle {
            toggle(false)?;
            m.baseline.push(burst(sb, dests, args.e2e_seconds)?.0);
            toggle(true)?;
        }
        let rx0 = rx_packets(&sb.world.name, "dn0")?;
        let (pps, p, r) = burst(sb, dests, args.e2e_seconds)?;
        received += rx_packets(&sb.world.name, "dn0")?.saturating_sub(rx0);
        m.pps.push(pps);
        processed += p;
        refused += r;
    }
    m.delivered = received as f64 / processed.max(1) as f64;
    m.refused = refused as f64 / processed.max(1) as f64;
    Ok(m)
}

/// Keeps a datafence datapath attached to `up0` in the host namespace until dropped.
struct Attached {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What `attach` puts on the sender's uplink.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TcProgram {
    /// datafence's TC egress program with the policy applied.
    Datafence,
    /// The empty program: the cost of the hook itself.
    Empty,
}

fn attach_datafence(ns: &NetNs, compiled: Arc<CompiledPolicy>, n: usize) -> Result<Attached> {
    attach(ns, compiled, n, TcProgram::Datafence)
}

fn attach(
    ns: &NetNs,
    compiled: Arc<CompiledPolicy>,
    n: usize,
    program: TcProgram,
) -> Result<Attached> {
    let path = format!("/run/netns/{}", ns.name);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let setup = || -> Result<Datapath> {
            let file = File::open(&path)?;
            // SAFETY: setns on a valid namespace fd changes only this thread's namespace.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            let empty = program == TcProgram::Empty;
            let mut dp = Datapath::load(&load_options(n, &compiled, empty))?;
            dp.apply(&compiled, EventLimits::default())?;
            if empty {
                dp.attach_bench_empty("up0")?;
            } else {
                dp.attach_tc("up0")?;
            }
            Ok(dp)
        };
        match setup() {
            Ok(dp) => {
                let _ = ready_tx.send(Ok(()));
                let _ = stop_rx.recv();
                drop(dp);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(format!("{e:#}")));
            }
        }
    });
    let attached = Attached {
        stop: Some(stop_tx),
        thread: Some(thread),
    };
    ready_rx
        .recv()
        .context("datapath thread")?
        .map_err(|e| anyhow!(e))?;
    Ok(attached)
}

fn nft_elements(list: &[(Pfx, usize)], width: u8) -> String {
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
fn nft_files(dir: &Path, set: &PrefixSet) -> Result<(PathBuf, PathBuf)> {
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

fn ipset_files(dir: &Path, set: &PrefixSet) -> Result<(PathBuf, PathBuf)> {
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
fn control_op(
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

fn ipset_memory(ns: &str) -> Option<u64> {
    let out = in_ns(ns, "ipset", &["list", "-t"]).ok()?;
    Some(
        out.lines()
            .filter_map(|l| l.strip_prefix("Size in memory:"))
            .filter_map(|v| v.trim().parse::<u64>().ok())
            .sum(),
    )
}

#[allow(clippy::too_many_lines, clippy::too_many_arguments)]
fn e2e_size(
    sb: &Sandbox,
    cat: &Catalogue,
    n: usize,
    compiled: Option<Arc<CompiledPolicy>>,
    args: &Args,
    budget: &Budget,
    memcg: Option<&MemCg>,
    rows: &mut Vec<Value>,
    control: &mut Vec<Value>,
) -> Result<()> {
    let set = prefix_set(cat, Shape::Real, n);
    let compiled = match compiled {
        Some(c) => c,
        None => {
            let files = write_policy(cat, &set, &format!("bench-e2e-{n}"))?;
            Arc::new(parse_policy(&files.path, n)?.compile())
        }
    };
    let allowed_name = if cat.regions.iter().any(|r| r == "eu") {
        "eu"
    } else {
        cat.regions[0].as_str()
    };
    let allowed_index = cat
        .regions
        .iter()
        .position(|r| r == allowed_name)
        .unwrap_or(0);
    // Region ids: bench-allowed is 1, the catalogue's regions follow.
    let allowed_ids = [1u32, allowed_index as u32 + 2];
    let mut rng = Rng(0xe2e ^ n as u64);
    let dests: Vec<Vec<SocketAddrV4>> = HIT_RATES
        .iter()
        .map(|&h| e2e_destinations(&set, &compiled, &allowed_ids, h, &mut rng))
        .collect();
    let scratch = Scratch::new(&format!("bench-e2e-{n}"));
    let host = sb.host.name.clone();
    let cap = args.load_cap.min(budget.left().mul_f64(0.5));

    // Each filter's rows; `baselines` are no-filter bursts measured just before, for a
    // filter that cannot be switched off and on cheaply.
    let record = |filter: &str,
                  extra: Value,
                  toggle: Option<&dyn Fn(bool) -> Result<()>>,
                  baselines: Option<&[Vec<f64>]>,
                  rows: &mut Vec<Value>|
     -> Result<()> {
        for (i, hit) in HIT_RATES.iter().enumerate() {
            let m = measure(sb, &dests[i], args, toggle)?;
            let baseline = match baselines {
                Some(b) => summarize(&b[i]),
                None => summarize(&m.baseline),
            };
            let pps = summarize(&m.pps);
            rows.push(json!({
                "size": n, "filter": filter, "hit_rate": hit,
                "pps": sjson(pps), "paired_no_filter_pps": sjson(baseline),
                "vs_paired_no_filter": ratio(pps, baseline),
                "delivered_fraction": m.delivered,
                "refused_by_sendmmsg_fraction": m.refused, "setup": extra,
            }));
        }
        Ok(())
    };

    record("none", Value::Null, None, None, rows)?;

    // No-filter bursts per hit rate, for a filter that cannot be switched off and on
    // cheaply: they run right before it is attached.
    let paired_baselines = || -> Result<Vec<Vec<f64>>> {
        dests
            .iter()
            .map(|d| {
                (0..args.e2e_reps)
                    .map(|_| Ok(burst(sb, d, args.e2e_seconds)?.0))
                    .collect()
            })
            .collect()
    };

    // The empty program: how much of any TC filter's cost is the hook itself.
    let baselines = paired_baselines()?;
    match attach(&sb.host, compiled.clone(), n, TcProgram::Empty) {
        Ok(attached) => {
            record("empty-tc", Value::Null, None, Some(&baselines), rows)?;
            drop(attached);
        }
        Err(e) => rows.push(json!({"size": n, "filter": "empty-tc", "error": format!("{e:#}")})),
    }

    let baselines = paired_baselines()?;
    match timed(|| attach_datafence(&sb.host, compiled.clone(), n)) {
        (Ok(attached), t) => {
            record(
                "datafence",
                json!({"load_apply_attach_s": t.as_secs_f64(), "v4_table": v4_table(&compiled).1}),
                None,
                Some(&baselines),
                rows,
            )?;
            drop(attached);
        }
        (Err(e), _) => {
            rows.push(json!({"size": n, "filter": "datafence", "error": format!("{e:#}")}));
        }
    }

    // nftables: an interval set per family, dropped in an output chain.
    let (nft_load, nft_reload) = nft_files(&scratch.dir, &set)?;
    let load_arg = nft_load.to_string_lossy().into_owned();
    let reload_arg = nft_reload.to_string_lossy().into_owned();
    let mut loads = Vec::new();
    let mut reloads = Vec::new();
    let mut mem = Vec::new();
    let mut nft_error = None;
    let mut nft_loaded = false;
    for rep in 0..3 {
        if rep > 0 {
            let _ = in_ns(&host, "nft", &["delete", "table", "inet", "dfbench"]);
            std::thread::sleep(Duration::from_millis(50));
        }
        match control_op(&host, "nft", &["-f", &load_arg], &scratch.dir, cap, memcg) {
            Ok((t, m)) => {
                loads.push(t.as_secs_f64());
                if let Some(m) = m {
                    mem.push(m as f64);
                }
                nft_loaded = true;
            }
            Err(e) => {
                nft_error = Some(format!("load: {e:#}"));
                nft_loaded = false;
                break;
            }
        }
        match control_op(&host, "nft", &["-f", &reload_arg], &scratch.dir, cap, memcg) {
            Ok((t, _)) => reloads.push(t.as_secs_f64()),
            Err(e) => {
                nft_error = Some(format!("reload: {e:#}"));
                break;
            }
        }
        // Large sets are loaded once: the rest of the budget is worth more.
        if loads.iter().sum::<f64>() + reloads.iter().sum::<f64>() > 3.0 {
            break;
        }
    }
    let elements = in_ns(
        &host,
        "nft",
        &["-j", "list", "set", "inet", "dfbench", "deny4"],
    )
    .ok()
    .and_then(|s| serde_json::from_str::<Value>(&s).ok())
    .and_then(|v| {
        v["nftables"]
            .as_array()?
            .iter()
            .find_map(|o| o["set"]["elem"].as_array().map(Vec::len))
    });
    control.push(json!({
        "size": n, "tool": "nft", "load_s": sjson(summarize(&loads)),
        "reload_s": sjson(summarize(&reloads)), "memcg_bytes": sjson(summarize(&mem)),
        "v4_elements_after_auto_merge": elements, "error": nft_error,
    }));
    if nft_loaded {
        let toggle = |on: bool| -> Result<()> {
            if on {
                in_ns(
                    &host,
                    "nft",
                    &[
                        "add", "rule", "inet", "dfbench", "out", "ip", "daddr", "@deny4", "drop",
                    ],
                )?;
                in_ns(
                    &host,
                    "nft",
                    &[
                        "add", "rule", "inet", "dfbench", "out", "ip6", "daddr", "@deny6", "drop",
                    ],
                )?;
            } else {
                in_ns(&host, "nft", &["flush", "chain", "inet", "dfbench", "out"])?;
            }
            Ok(())
        };
        record("nft-set", Value::Null, Some(&toggle), None, rows)?;
    } else {
        rows.push(json!({"size": n, "filter": "nft-set", "error": nft_error}));
    }
    let _ = in_ns(&host, "nft", &["delete", "table", "inet", "dfbench"]);

    // iptables + ipset hash:net.
    let (ips_load, ips_reload) = ipset_files(&scratch.dir, &set)?;
    let load_arg = ips_load.to_string_lossy().into_owned();
    let reload_arg = ips_reload.to_string_lossy().into_owned();
    let mut loads = Vec::new();
    let mut reloads = Vec::new();
    let mut mem = Vec::new();
    let mut ipset_error = None;
    let mut ipset_loaded = false;
    let rules = |op: &str| -> Result<()> {
        in_ns(
            &host,
            "iptables",
            &[
                op,
                "OUTPUT",
                "-m",
                "set",
                "--match-set",
                "deny4",
                "dst",
                "-j",
                "DROP",
            ],
        )?;
        in_ns(
            &host,
            "ip6tables",
            &[
                op,
                "OUTPUT",
                "-m",
                "set",
                "--match-set",
                "deny6",
                "dst",
                "-j",
                "DROP",
            ],
        )?;
        Ok(())
    };
    for rep in 0..3 {
        if rep > 0 {
            let _ = rules("-D");
            let _ = in_ns(&host, "ipset", &["destroy"]);
            std::thread::sleep(Duration::from_millis(50));
        }
        let start = Instant::now();
        match control_op(
            &host,
            "ipset",
            &["restore", "-file", &load_arg],
            &scratch.dir,
            cap,
            memcg,
        )
        .and_then(|(_, m)| rules("-A").map(|()| m))
        {
            Ok(m) => {
                loads.push(start.elapsed().as_secs_f64());
                if let Some(m) = m {
                    mem.push(m as f64);
                }
                ipset_loaded = true;
            }
            Err(e) => {
                ipset_error = Some(format!("load: {e:#}"));
                ipset_loaded = false;
                break;
            }
        }
        match control_op(
            &host,
            "ipset",
            &["restore", "-file", &reload_arg],
            &scratch.dir,
            cap,
            memcg,
        ) {
            Ok((t, _)) => reloads.push(t.as_secs_f64()),
            Err(e) => {
                ipset_error = Some(format!("reload: {e:#}"));
                break;
            }
        }
        if loads.iter().sum::<f64>() + reloads.iter().sum::<f64>() > 3.0 {
            break;
        }
    }
    control.push(json!({
        "size": n, "tool": "ipset", "load_s": sjson(summarize(&loads)),
        "reload_s": sjson(summarize(&reloads)), "memcg_bytes": sjson(summarize(&mem)),
        "ipset_size_in_memory_bytes": ipset_memory(&host), "error": ipset_error,
    }));
    if ipset_loaded {
        let toggle = |on: bool| rules(if on { "-A" } else { "-D" });
        record("iptables+ipset", Value::Null, Some(&toggle), None, rows)?;
    } else {
        rows.push(json!({"size": n, "filter": "iptables+ipset", "error": ipset_error}));
    }
    let _ = rules("-D");
    let _ = in_ns(&host, "ipset", &["destroy"]);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Phase 3: the agent's footprint

fn agent_size(
    sb: &Sandbox,
    cat: &Catalogue,
    n: usize,
    args: &Args,
    budget: &Budget,
) -> Result<Value> {
    let set = prefix_set(cat, Shape::Real, n);
    let files = write_policy(cat, &set, &format!("bench-agent-{n}"))?;
    let capacity = table_capacity(n).to_string();
    let compiled = parse_policy(&files.path, n)?.compile();
    let groups = dir8_groups(&compiled).to_string();
    let v4 = if v4_table(&compiled).0 == V4Table::Trie {
        "trie"
    } else {
        "dir24"
    };
    let agent = BenchAgent::start(
        sb,
        args,
        &files.path,
        &files.scratch.dir,
        &[
            "--table-capacity",
            &capacity,
            "--dir8-groups",
            &groups,
            "--v4-table",
            v4,
        ],
        Duration::from_secs(180).min(budget.left()),
    )?;
    let pid = agent.child.id();
    let ready = agent.ready;
    std::thread::sleep(Duration::from_millis(500));
    let pid_s = pid.to_string();
    let rss = |field: &str| proc_status_kib(&pid_s, field).map_or(0, |k| k * 1024);
    let idle_rss = rss("VmRSS:");
    let anon = rss("RssAnon:");
    let file = rss("RssFile:");
    let shmem = rss("RssShmem:");
    let bpf_mapped = bpf_mapped_rss(&pid_s);
    let hwm = rss("VmHWM:");

    // Denied user data at ~100k packets per second: every packet is a violation.
    let mut rng = Rng(0xa9e ^ n as u64);
    let allowed_index = cat.regions.iter().position(|r| r == "eu").unwrap_or(0);
    let denied = e2e_destinations(
        &set,
        &compiled,
        &[1, allowed_index as u32 + 2],
        1.0,
        &mut rng,
    );
    let mut cpu = Vec::new();
    let mut rates = Vec::new();
    for _ in 0..args.cpu_samples {
        let before = cpu_seconds(pid).context("agent stat")?;
        let d = denied.clone();
        let secs = args.cpu_seconds;
        let s = sb
            .host
            .run(move || blast(&d, Duration::from_secs_f64(secs), Some(VIOLATION_RATE)))?;
        let after = cpu_seconds(pid).context("agent stat")?;
        cpu.push((after - before) / s.elapsed.as_secs_f64() * 100.0);
        rates.push(s.processed as f64 / s.elapsed.as_secs_f64());
    }
    let busy_rss = rss("VmRSS:");
    drop(agent);
    Ok(json!({
        "size": n,
        "ready_s": ready.as_secs_f64(),
        "v4_table": v4_table(&compiled).1,
        "rss_bytes": idle_rss,
        "rss_anon_bytes": anon,
        "rss_file_bytes": file,
        "rss_shmem_bytes": shmem,
        "bpf_mapped_rss_bytes": bpf_mapped,
        "rss_minus_bpf_mapped_bytes": idle_rss.saturating_sub(bpf_mapped),
        "peak_rss_bytes": hwm,
        "rss_after_violations_bytes": busy_rss,
        "violations_per_s": sjson(summarize(&rates)),
        "cpu_percent_of_one_core": sjson(summarize(&cpu)),
    }))
}

/// A no-gap reload of the whole cloud catalogue (`policies/eu-cloud.yaml`), end to end:
/// `datafence reload` against a running release agent, which reads, validates and
/// compiles the policy, writes the inactive slot and flips. Each round changes a comment
/// so the policy's hash changes and the agent does the whole reload.
fn catalogue_reload(sb: &Sandbox, args: &Args) -> Result<Value> {
    const ROUNDS: usize = 10;
    let policies = args
        .regions
        .parent()
        .and_then(Path::parent)
        .context("--regions is not inside a policies directory")?
        .to_path_buf();
    let original = std::fs::read_to_string(policies.join("eu-cloud.yaml"))
        .context("reading policies/eu-cloud.yaml")?;
    let scratch = Scratch::new("bench-catalogue");
    std::os::unix::fs::symlink(policies.join("regions"), scratch.dir.join("regions"))?;
    let policy = scratch.write("eu-cloud.yaml", &original);
    let agent = BenchAgent::start(
        sb,
        args,
        &policy,
        &scratch.dir,
        &[],
        Duration::from_secs(60),
    )?;
    let compiled = parse_policy(&policy, 0)?.compile();
    let mut times = Vec::new();
    for round in 0..ROUNDS {
        std::fs::write(&policy, format!("{original}\n# bench round {round}\n"))?;
        let (status, t) = timed(|| agent.ctl("reload").status());
        if !status?.success() {
            bail!("datafence reload failed in round {round}");
        }
        times.push(t.as_secs_f64());
    }
    Ok(json!({
        "policy": "policies/eu-cloud.yaml",
        "prefixes_v4": compiled.regions_v4.len(),
        "prefixes_v6": compiled.regions_v6.len(),
        "reload_s": sjson(summarize(&times)),
    }))
}

/// `datafence run` in the sandbox's host namespace on `up0`, without pinning or file
/// watching, ready once its control socket answers; stopped when dropped.
struct BenchAgent<'a> {
    sb: &'a Sandbox,
    bin: PathBuf,
    run_dir: PathBuf,
    child: std::process::Child,
    /// From spawn to the first answer on the control socket.
    ready: Duration,
}

impl<'a> BenchAgent<'a> {
    /// Starts the agent with its runtime directory and log in `dir`.
    fn start(
        sb: &'a Sandbox,
        args: &Args,
        policy: &Path,
        dir: &Path,
        extra: &[&str],
        deadline: Duration,
    ) -> Result<Self> {
        let log = dir.join("agent.log");
        let run_dir = dir.join("run");
        let mut cmd = command_in(&sb.host.name, &args.agent_bin);
        cmd.arg("--runtime-dir")
            .arg(&run_dir)
            .arg("run")
            .arg("--policy")
            .arg(policy)
            .args(["--no-pin", "--no-watch", "--interface", "up0"])
            .args(extra)
            .env_remove("SSH_CONNECTION")
            .env("DATAFENCE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        let started = Instant::now();
        let mut agent = Self {
            sb,
            bin: args.agent_bin.clone(),
            run_dir,
            child: cmd.spawn().context("starting datafence run")?,
            ready: Duration::ZERO,
        };
        while !agent.ctl("status").status().is_ok_and(|s| s.success()) {
            let exited = agent.child.try_wait()?;
            if exited.is_some() || started.elapsed() > deadline {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                bail!(
                    "datafence run not ready ({}): {}",
                    exited.map_or_else(
                        || format!("after {:.0}s", deadline.as_secs_f64()),
                        |s| format!("exited with {s}")
                    ),
                    log.chars().take(800).collect::<String>()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        agent.ready = started.elapsed();
        Ok(agent)
    }

    /// A `datafence <verb>` against this agent, output discarded.
    fn ctl(&self, verb: &str) -> Command {
        let mut c = command_in(&self.sb.host.name, &self.bin);
        c.arg("--runtime-dir")
            .arg(&self.run_dir)
            .arg(verb)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    }
}

impl Drop for BenchAgent<'_> {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------
// The run, and the report

#[allow(clippy::too_many_lines)]
fn run(args: &Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root: the benchmark loads eBPF programs and builds network namespaces");
    }
    let budget = Budget {
        start: Instant::now(),
        limit: args.budget,
    };
    let machine = machine();
    println!(
        "datafence-bench  {}\nmachine: {} × {} cores, kernel {}, {:.1} GiB{}",
        if args.quick { "(quick)" } else { "" },
        machine["cpu"].as_str().unwrap_or(""),
        machine["cores"],
        machine["kernel"].as_str().unwrap_or(""),
        machine["memory_gib"].as_f64().unwrap_or(0.0),
        args.commit
            .as_ref()
            .map(|c| format!(", commit {c}"))
            .unwrap_or_default(),
    );
    println!(
        "figures: median (min–max) over repeated runs; sizes are prefixes per address family: {}",
        args.sizes
            .iter()
            .map(|n| human_size(*n))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let load_start = loadavg();
    println!("load average at start: {load_start} (other work on the machine skews every figure)");
    let cat = read_catalogue(&args.regions)?;
    let memcg = MemCg::create();
    let mut skipped: Vec<String> = Vec::new();
    let mut datapath_rows: Vec<DatapathCase> = Vec::new();
    let mut kept: Vec<(usize, Arc<CompiledPolicy>)> = Vec::new();

    if args.phase("datapath") {
        for shape in [Shape::Real, Shape::Dense] {
            for &n in &args.sizes {
                if budget.past(0.45) {
                    skipped.push(format!(
                        "datapath {} {}: time budget",
                        shape.name(),
                        human_size(n)
                    ));
                    continue;
                }
                eprintln!(
                    "[{:>5.0}s] datapath {} {}",
                    budget.elapsed().as_secs_f64(),
                    shape.name(),
                    human_size(n)
                );
                match datapath_case(&cat, shape, n, args, memcg.as_ref()) {
                    Ok((json, keep)) => {
                        if let Some(c) = keep {
                            kept.push((n, c));
                        }
                        datapath_rows.push(DatapathCase {
                            shape,
                            size: n,
                            json,
                        });
                    }
                    Err(e) => datapath_rows.push(DatapathCase {
                        shape,
                        size: n,
                        json: json!({"shape": shape.name(), "size": n, "error": format!("{e:#}")}),
                    }),
                }
            }
        }
    }

    let mut e2e_rows = Vec::new();
    let mut control_rows = Vec::new();
    let mut agent_rows = Vec::new();
    let mut catalogue = Value::Null;
    let sandbox = if args.phase("e2e") || args.phase("agent") {
        Some(e2e_sandbox()?)
    } else {
        None
    };
    if args.phase("e2e")
        && let Some(sb) = &sandbox
    {
        for &n in &args.sizes {
            if budget.past(0.82) {
                skipped.push(format!("e2e {}: time budget", human_size(n)));
                continue;
            }
            eprintln!(
                "[{:>5.0}s] e2e {}",
                budget.elapsed().as_secs_f64(),
                human_size(n)
            );
            let compiled = kept.iter().find(|(k, _)| *k == n).map(|(_, c)| c.clone());
            if let Err(e) = e2e_size(
                sb,
                &cat,
                n,
                compiled,
                args,
                &budget,
                memcg.as_ref(),
                &mut e2e_rows,
                &mut control_rows,
            ) {
                e2e_rows.push(json!({"size": n, "error": format!("{e:#}")}));
            }
        }
    }
    drop(kept);
    if args.phase("agent")
        && let Some(sb) = &sandbox
    {
        if args.agent_bin.is_file() {
            for &n in &args.sizes {
                if budget.past(0.97) {
                    skipped.push(format!("agent {}: time budget", human_size(n)));
                    continue;
                }
                eprintln!(
                    "[{:>5.0}s] agent {}",
                    budget.elapsed().as_secs_f64(),
                    human_size(n)
                );
                match agent_size(sb, &cat, n, args, &budget) {
                    Ok(v) => agent_rows.push(v),
                    Err(e) => agent_rows.push(json!({"size": n, "error": format!("{e:#}")})),
                }
            }
            if budget.past(0.97) {
                skipped.push("catalogue reload: time budget".into());
            } else {
                eprintln!(
                    "[{:>5.0}s] catalogue reload",
                    budget.elapsed().as_secs_f64()
                );
                catalogue = catalogue_reload(sb, args)
                    .unwrap_or_else(|e| json!({"error": format!("{e:#}")}));
            }
        } else {
            skipped.push(format!("agent: no binary at {}", args.agent_bin.display()));
        }
    }
    drop(sandbox);

    let datapath_json: Vec<Value> = datapath_rows.iter().map(|c| c.json.clone()).collect();
    let mut targets = targets(&datapath_rows);
    targets.extend(other_targets(&datapath_rows, &e2e_rows, &agent_rows));
    if let Some(t) = get_summary(&catalogue["reload_s"]).map(|s| s.median * 1e3) {
        targets.push(json!({
            "target": "no-gap reload of the cloud catalogue (eu-cloud.yaml) < 200 ms",
            "value": t, "limit": 200.0, "unit": "ms", "pass": t < 200.0,
        }));
    }
    let memcg_label = memcg.as_ref().map_or("unavailable", |m| m.label);
    let report = json!({
        "machine": machine,
        "commit": args.commit,
        "quick": args.quick,
        "sizes": args.sizes,
        "spread": "min-max over repeated runs; every figure is the median",
        "memory_cgroup": memcg_label,
        "datapath": datapath_json,
        "e2e": e2e_rows,
        "control_plane_other": control_rows,
        "agent": agent_rows,
        "catalogue_reload": catalogue,
        "targets": targets,
        "skipped": skipped,
        "elapsed_s": budget.elapsed().as_secs_f64(),
        "loadavg_start": load_start,
        "loadavg_end": loadavg(),
    });
    print_report(&report);
    if let Some(parent) = args.out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&report)?)?;
    println!(
        "\nresults: {} ({:.0}s)",
        args.out.display(),
        budget.elapsed().as_secs_f64()
    );
    Ok(())
}

fn get_summary(v: &Value) -> Option<Summary> {
    Some(Summary {
        median: v.get("median")?.as_f64()?,
        min: v.get("min")?.as_f64()?,
        max: v.get("max")?.as_f64()?,
        n: v.get("n")?.as_u64()? as usize,
    })
}

fn targets(rows: &[DatapathCase]) -> Vec<Value> {
    let mut out = Vec::new();
    let largest = rows.iter().map(|r| r.size).max().unwrap_or(0);
    for row in rows.iter().filter(|r| r.size == largest) {
        let j = &row.json;
        let label = format!("{} {}", row.shape.name(), human_size(row.size));
        let hot = ratio(
            get_summary(&j["hot"]["ipv4"]["tc_full_ns"]),
            get_summary(&j["hot"]["ipv4"]["floor_ns"]),
        );
        out.push(json!({
            "target": format!("hot {label} IPv4: full TC ≤ 1.5× floor"),
            "value": hot, "limit": 1.5, "pass": hot.map(|r| r <= 1.5),
        }));
        for (family, limit) in [("ipv4", 5.0), ("ipv6", 3.0)] {
            let r = j["cold"][family]["lpm_over_datafence"].as_f64();
            out.push(json!({
                "target": format!("cold {label} {family}: datafence lookup ≥ {limit}× cheaper than LPM"),
                "value": r, "limit": limit, "pass": r.map(|r| r >= limit),
            }));
        }
    }
    out
}

/// The end-to-end, control-plane and footprint targets, at the largest size each
/// phase measured.
fn other_targets(datapath: &[DatapathCase], e2e: &[Value], agent: &[Value]) -> Vec<Value> {
    let mut out = Vec::new();
    let size_of = |v: &Value| v["size"].as_u64().unwrap_or(0);
    if let Some(largest) = e2e.iter().map(size_of).max() {
        let label = human_size(largest as usize);
        let pps = |filter: &str, hit: f64| {
            e2e.iter()
                .find(|r| {
                    size_of(r) == largest
                        && r["filter"] == filter
                        && r["hit_rate"].as_f64() == Some(hit)
                })
                .and_then(|r| get_summary(&r["pps"]).map(|s| (s.median, r.clone())))
        };
        for hit in HIT_RATES {
            let Some((df, row)) = pps("datafence", hit) else {
                continue;
            };
            let share = row["vs_paired_no_filter"].as_f64();
            out.push(json!({
                "target": format!("e2e {label}, {:.0}% hits: datafence ≥ 0.95× no filter", hit * 100.0),
                "value": share, "limit": 0.95, "pass": share.map(|r| r >= 0.95),
            }));
            for other in ["nft-set", "iptables+ipset"] {
                if let Some((o, _)) = pps(other, hit) {
                    let r = df / o;
                    out.push(json!({
                        "target": format!("e2e {label}, {:.0}% hits: datafence ahead of {other}", hit * 100.0),
                        "value": r, "limit": 1.0, "pass": r > 1.0,
                    }));
                }
            }
        }
    }
    if let Some(row) = datapath
        .iter()
        .filter(|r| r.shape == Shape::Real)
        .max_by_key(|r| r.size)
    {
        let c = &row.json["control"];
        let total = c["parse_validate_s"]
            .as_f64()
            .zip(c["compile_s"].as_f64())
            .zip(get_summary(&c["apply_s"]).map(|s| s.median));
        if let Some(((parse, compile), apply)) = total {
            let t = parse + compile + apply;
            out.push(json!({
                "target": format!("{} real-mix policy: read, compile and load < 1 s", human_size(row.size)),
                "value": t, "limit": 1.0, "unit": "s", "pass": t < 1.0,
            }));
        }
    }
    if let Some(row) = agent
        .iter()
        .filter(|r| r["rss_minus_bpf_mapped_bytes"].is_u64())
        .max_by_key(|r| size_of(r))
    {
        let mib = mib(row["rss_minus_bpf_mapped_bytes"].as_u64().unwrap_or(0) as f64);
        out.push(json!({
            "target": format!("agent at {}: RSS less mapped BPF tables < 64 MiB", human_size(size_of(row) as usize)),
            "value": mib, "limit": 64.0, "unit": "MiB", "pass": mib < 64.0,
        }));
    }
    out
}

fn cell(s: &str, width: usize) -> String {
    format!("{s:>width$}")
}

#[allow(clippy::too_many_lines)]
fn print_report(r: &Value) {
    let rows = r["datapath"].as_array().cloned().unwrap_or_default();
    println!(
        "\n== 1. Datapath, hot: ns per packet under BPF_PROG_TEST_RUN (64 frames per family, mean per round)"
    );
    println!(
        "{:<12} {:>5} {:<5} {:>19} {:>19} {:>19} {:>19} {:>8} {:>8} {:>8} {:>8}",
        "shape",
        "size",
        "fam",
        "floor",
        "lpm-only",
        "tc full",
        "xdp full",
        "tc/flr",
        "tc/lpm",
        "xdp/flr",
        "xdp/lpm"
    );
    for row in &rows {
        let size = human_size(row["size"].as_u64().unwrap_or(0) as usize);
        let shape = row["shape"].as_str().unwrap_or("");
        if let Some(e) = row.get("error") {
            println!("{shape:<12} {size:>5} error: {}", e.as_str().unwrap_or(""));
            continue;
        }
        for fam in ["ipv4", "ipv6"] {
            let h = &row["hot"][fam];
            let s = |k: &str| get_summary(&h[k]);
            let rt = |k: &str| show_ratio(h[k].as_f64());
            println!(
                "{shape:<12} {size:>5} {:<5} {} {} {} {} {} {} {} {}",
                if fam == "ipv4" { "v4" } else { "v6" },
                cell(&show(s("floor_ns"), 1), 19),
                cell(&show(s("lpm_only_ns"), 1), 19),
                cell(&show(s("tc_full_ns"), 1), 19),
                cell(&show(s("xdp_full_ns"), 1), 19),
                cell(&rt("tc_vs_floor"), 8),
                cell(&rt("tc_vs_lpm"), 8),
                cell(&rt("xdp_vs_floor"), 8),
                cell(&rt("xdp_vs_lpm"), 8),
            );
        }
    }
    for row in &rows {
        if let Some(t) = row["v4_table"].as_str().filter(|t| t.starts_with("trie")) {
            println!(
                "  note: {} {}: IPv4 table {t}",
                row["shape"].as_str().unwrap_or(""),
                human_size(row["size"].as_u64().unwrap_or(0) as usize)
            );
        }
    }
    println!(
        "\n== 1b. Datapath, cold: ns per lookup of a random address ((loop − empty loop) / lookups per run)"
    );
    println!(
        "{:<12} {:>5} {:>19} {:>19} {:>8} {:>19} {:>19} {:>8}",
        "shape", "size", "v4 lpm", "v4 datafence", "lpm/df", "v6 lpm", "v6 datafence", "lpm/df"
    );
    for row in rows.iter().filter(|r| r.get("error").is_none()) {
        let size = human_size(row["size"].as_u64().unwrap_or(0) as usize);
        let c = &row["cold"];
        let s = |f: &str, k: &str| show(get_summary(&c[f][k]), 1);
        println!(
            "{:<12} {size:>5} {} {} {} {} {} {}",
            row["shape"].as_str().unwrap_or(""),
            cell(&s("ipv4", "lpm_ns_per_lookup"), 19),
            cell(&s("ipv4", "datafence_ns_per_lookup"), 19),
            cell(&show_ratio(c["ipv4"]["lpm_over_datafence"].as_f64()), 8),
            cell(&s("ipv6", "lpm_ns_per_lookup"), 19),
            cell(&s("ipv6", "datafence_ns_per_lookup"), 19),
            cell(&show_ratio(c["ipv6"]["lpm_over_datafence"].as_f64()), 8),
        );
    }
    println!("\n== Targets");
    for t in r["targets"].as_array().cloned().unwrap_or_default() {
        let verdict = match t["pass"].as_bool() {
            Some(true) => "PASS",
            Some(false) => "MISS",
            None => "n/a ",
        };
        let measured = match t["unit"].as_str() {
            Some(unit) => t["value"]
                .as_f64()
                .map_or_else(|| "–".into(), |v| format!("{v:.2} {unit}")),
            None => show_ratio(t["value"].as_f64()),
        };
        println!(
            "  {verdict}  {}  (measured {measured})",
            t["target"].as_str().unwrap_or("")
        );
    }

    println!(
        "\n== 2. End to end: UDP packets/s through the host's egress (sendmmsg ×{BATCH}, {E2E_DESTINATIONS} IPv4 destinations, 1 sender thread)"
    );
    println!(
        "{:>5} {:<15} {:>5} {:>24} {:>24} {:>8} {:>8} {:>9} {:>7}",
        "size",
        "filter",
        "hit",
        "kpps",
        "kpps no filter, paired",
        "paired",
        "vs none",
        "delivered",
        "EPERM"
    );
    let kpps = |v: &Value| {
        get_summary(v).map(|s| Summary {
            median: s.median / 1e3,
            min: s.min / 1e3,
            max: s.max / 1e3,
            n: s.n,
        })
    };
    let e2e = r["e2e"].as_array().cloned().unwrap_or_default();
    for row in &e2e {
        let size = human_size(row["size"].as_u64().unwrap_or(0) as usize);
        let filter = row["filter"].as_str().unwrap_or("");
        if let Some(e) = row.get("error").filter(|e| !e.is_null()) {
            println!("{size:>5} {filter:<15} error: {}", e.as_str().unwrap_or(""));
            continue;
        }
        let hit = row["hit_rate"].as_f64().unwrap_or(0.0);
        let none = e2e.iter().find(|o| {
            o["size"] == row["size"] && o["filter"] == "none" && o["hit_rate"] == row["hit_rate"]
        });
        let vs = none.and_then(|o| ratio(get_summary(&row["pps"]), get_summary(&o["pps"])));
        println!(
            "{size:>5} {filter:<15} {:>4.0}% {} {} {} {} {:>8.1}% {:>6.1}%",
            hit * 100.0,
            cell(&show(kpps(&row["pps"]), 1), 24),
            cell(&show(kpps(&row["paired_no_filter_pps"]), 1), 24),
            cell(&show_ratio(row["vs_paired_no_filter"].as_f64()), 8),
            cell(&show_ratio(vs), 8),
            row["delivered_fraction"].as_f64().unwrap_or(0.0) * 100.0,
            row["refused_by_sendmmsg_fraction"].as_f64().unwrap_or(0.0) * 100.0,
        );
    }

    println!(
        "\n== 3. Control plane: load and no-gap reload of the same prefixes (v4 and v6)\n   \
         kernel MiB: datafence = the maps' own accounting (fdinfo memlock), ipset = its \"Size in memory\";\n   \
         memcg MiB: charged to a memory cgroup the load ran in ({}), which also sees what memlock\n   \
         leaves out (LPM-trie intermediate nodes, allocator rounding)",
        r["memory_cgroup"].as_str().unwrap_or("")
    );
    println!(
        "{:>5} {:<22} {:>22} {:>22} {:>12} {:>12} {:>12}",
        "size", "tool", "load s", "reload s", "kernel MiB", "memcg MiB", "notes"
    );
    for row in rows.iter().filter(|r| r["shape"] == "real-mix") {
        let size = human_size(row["size"].as_u64().unwrap_or(0) as usize);
        if row.get("error").is_some() {
            continue;
        }
        let c = &row["control"];
        let kernel = get_summary(&c["kernel_bytes_one_slot"]).map(|s| mib(s.median));
        let memcg = get_summary(&c["memcg_bytes"]).map(|s| mib(s.median));
        println!(
            "{size:>5} {:<22} {} {} {} {} parse {:.2}s, compile {:.2}s, peak RSS +{:.0} MiB",
            "datafence (apply)",
            cell(&show(get_summary(&c["apply_s"]), 3), 22),
            cell(&show(get_summary(&c["reload_s"]), 3), 22),
            cell(&kernel.map_or("–".into(), |m| format!("{m:.1}")), 12),
            cell(&memcg.map_or("–".into(), |m| format!("{m:.1}")), 12),
            c["parse_validate_s"].as_f64().unwrap_or(0.0),
            c["compile_s"].as_f64().unwrap_or(0.0),
            get_summary(&c["rss_peak_growth_bytes"]).map_or(0.0, |s| mib(s.median)),
        );
    }
    for row in r["control_plane_other"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let size = human_size(row["size"].as_u64().unwrap_or(0) as usize);
        let memcg = get_summary(&row["memcg_bytes"]).map(|s| mib(s.median));
        let kernel = row["ipset_size_in_memory_bytes"].as_f64().map(mib);
        let mut notes = String::new();
        if let Some(e) = row["v4_elements_after_auto_merge"].as_u64() {
            let _ = write!(notes, "{e} v4 elements after auto-merge ");
        }
        if let Some(e) = row["error"].as_str() {
            let _ = write!(notes, "error: {e}");
        }
        println!(
            "{size:>5} {:<22} {} {} {} {} {}",
            match row["tool"].as_str() {
                Some("nft") => "nft -f (interval sets)",
                _ => "ipset restore (+rule)",
            },
            cell(&show(get_summary(&row["load_s"]), 3), 22),
            cell(&show(get_summary(&row["reload_s"]), 3), 22),
            cell(&kernel.map_or("–".into(), |m| format!("{m:.1}")), 12),
            cell(&memcg.map_or("–".into(), |m| format!("{m:.1}")), 12),
            notes.trim(),
        );
    }

    println!(
        "\n== 4. Agent footprint: `datafence run`, and its CPU while the kernel raises violations"
    );
    println!(
        "{:>5} {:>8} {:>9} {:>9} {:>10} {:>9} {:>24} {:>22}",
        "size",
        "ready s",
        "RSS MiB",
        "anon MiB",
        "bpf-mmap",
        "peak MiB",
        "violations/s",
        "CPU % of a core"
    );
    for row in r["agent"].as_array().cloned().unwrap_or_default() {
        let size = human_size(row["size"].as_u64().unwrap_or(0) as usize);
        if let Some(e) = row.get("error") {
            println!("{size:>5} error: {}", e.as_str().unwrap_or(""));
            continue;
        }
        let b = |k: &str| mib(row[k].as_f64().unwrap_or(0.0));
        println!(
            "{size:>5} {:>8.2} {:>9.1} {:>9.1} {:>10.1} {:>9.1} {} {}",
            row["ready_s"].as_f64().unwrap_or(0.0),
            b("rss_bytes"),
            b("rss_anon_bytes"),
            b("bpf_mapped_rss_bytes"),
            b("peak_rss_bytes"),
            cell(&show(get_summary(&row["violations_per_s"]), 0), 24),
            cell(&show(get_summary(&row["cpu_percent_of_one_core"]), 1), 22),
        );
    }
    let c = &r["catalogue_reload"];
    if let Some(t) = get_summary(&c["reload_s"]) {
        println!(
            "\n== 5. No-gap reload of the cloud catalogue ({}: {} IPv4 and {} IPv6 prefixes), `datafence reload` end to end: {:.0} ms ({:.0}–{:.0}, n={})",
            c["policy"].as_str().unwrap_or(""),
            c["prefixes_v4"],
            c["prefixes_v6"],
            t.median * 1e3,
            t.min * 1e3,
            t.max * 1e3,
            t.n
        );
    } else if let Some(e) = c["error"].as_str() {
        println!("\n== 5. No-gap reload of the cloud catalogue: error: {e}");
    }
    let skipped = r["skipped"].as_array().cloned().unwrap_or_default();
    if !skipped.is_empty() {
        println!("\nskipped:");
        for s in skipped {
            println!("  {}", s.as_str().unwrap_or(""));
        }
    }
}
