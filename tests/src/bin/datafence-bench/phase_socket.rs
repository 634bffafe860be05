//! Phase 4: what the socket ring costs a process. One process makes UDP `connect()`
//! calls, then unconnected UDP `sendto()` calls, as fast as it can, with nothing at its
//! cgroup, with programs that allow every call (the floor of any cgroup program), and with
//! datafence's socket ring over the largest real-mix policy: once from a cgroup outside
//! every class (every other process of a host) and once from a class's cgroup, whose
//! calls are classified and looked up. The calls go out of a veth pair inside a namespace
//! of the bench's own, whose other end drops what it is given.

use serde::{Deserialize, Serialize};

use super::*;

/// Set in the environment of the bench's own child, which then only makes the calls.
pub(crate) const SOCKET_CHILD: &str = "DATAFENCE_BENCH_SOCKET_CALLS";
/// The destination of every call: in the bench's allowed region.
const DESTINATION: &str = "198.18.0.10:9";
const CALLS: u32 = 200_000;
const RUNS: usize = 5;

/// The child's work: `CALLS` connects or sends, timed; prints calls per second.
pub(crate) fn socket_child(kind: &str) -> Result<()> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    let to: std::net::SocketAddr = DESTINATION.parse()?;
    let start = Instant::now();
    for _ in 0..CALLS {
        match kind {
            "connect" => socket.connect(to)?,
            _ => {
                socket.send_to(b"x", to)?;
            }
        }
    }
    println!("{}", f64::from(CALLS) / start.elapsed().as_secs_f64());
    Ok(())
}

#[derive(Serialize, Deserialize)]
pub(crate) struct SocketFigures {
    /// The prefixes per family of the policy loaded for the datafence rows.
    pub(crate) policy_size: usize,
    /// Calls per second, by setting: `none`, `empty_program`, `datafence_unclassified`,
    /// `datafence_classified`.
    pub(crate) connect_per_s: BTreeMap<String, Summary>,
    pub(crate) sendto_per_s: BTreeMap<String, Summary>,
}

const SETTINGS: [&str; 4] = [
    "none",
    "empty_program",
    "datafence_unclassified",
    "datafence_classified",
];

/// The cgroups: `top`, where the programs attach, and two children, one that a class
/// names and one that none does.
struct BenchCgroups {
    top: PathBuf,
}

impl BenchCgroups {
    fn new() -> Result<Self> {
        let top = datafence::cgroups::cgroup2_root()
            .join(format!("datafence-bench-sockets-{}", std::process::id()));
        for dir in [top.join("class"), top.join("other")] {
            std::fs::create_dir_all(&dir)?;
        }
        Ok(Self { top })
    }

    fn child(&self, name: &str) -> PathBuf {
        self.top.join(name)
    }
}

impl Drop for BenchCgroups {
    fn drop(&mut self) {
        for dir in [
            self.top.join("class"),
            self.top.join("other"),
            self.top.clone(),
        ] {
            let _ = integration_tests::remove_cgroup_when_empty(&dir);
        }
    }
}

/// Calls per second of `kind` from a process in `cgroup`, run `RUNS` times.
fn rate(ns: &NetNs, cgroup: &Path, kind: &str) -> Result<Summary> {
    let mut values = Vec::new();
    for _ in 0..RUNS {
        let mut cmd = command_in(&ns.name, std::env::current_exe()?);
        cmd.env(SOCKET_CHILD, kind);
        datafence::cgroups::spawn_in_cgroup(&mut cmd, &cgroup.join("cgroup.procs"))?;
        let out = cmd.output()?;
        if !out.status.success() {
            bail!(
                "{kind} child: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        values.push(String::from_utf8_lossy(&out.stdout).trim().parse::<f64>()?);
    }
    summarize(&values).ok_or_else(|| anyhow!("no {kind} runs"))
}

pub(crate) fn socket_phase(cat: &Catalogue, args: &Args) -> Result<SocketFigures> {
    let n = args.sizes.iter().copied().max().unwrap_or(1000);
    // A veth pair inside the namespace: what is sent leaves by `bs0` to a next hop with
    // a fixed neighbour entry, and `bs1`, with no address, drops it.
    let ns = NetNs::new("bsock");
    ns.ip("link add bs0 type veth peer name bs1");
    ns.ip("addr add 10.98.0.1/24 dev bs0");
    ns.ip("link set bs0 up");
    ns.ip("link set bs1 up");
    ns.ip("neigh replace 10.98.0.2 lladdr 02:df:00:00:00:09 dev bs0 nud permanent");
    ns.ip("route add default via 10.98.0.2");
    let cgroups = BenchCgroups::new()?;
    let root = datafence::cgroups::cgroup2_root();
    let class_path = cgroups
        .child("class")
        .strip_prefix(&root)
        .map(|p| format!("/{}", p.display()))?;
    let set = prefix_set(cat, Shape::Real, n);
    let files = write_policy(cat, &set, &format!("bench-sockets-{n}"))?;
    // The class goes last: the bench policy's classes, by port and mark, do not claim
    // these calls, so the calls from `class` are this class's.
    let mut yaml = std::fs::read_to_string(&files.path)?;
    writeln!(
        yaml,
        "  socket-bench:\n    match:\n      cgroups: [{class_path}]\n    allow: [bench-allowed]\n    unknown: deny"
    )?;
    std::fs::write(&files.path, yaml)?;
    let policy = parse_policy(&files.path, n)?;
    let compiled = policy.compile();

    let mut connect = BTreeMap::new();
    let mut sendto = BTreeMap::new();
    let mut measure = |setting: &str, cgroup: &Path| -> Result<()> {
        eprintln!("  sockets: {setting}");
        connect.insert(setting.to_owned(), rate(&ns, cgroup, "connect")?);
        sendto.insert(setting.to_owned(), rate(&ns, cgroup, "sendto")?);
        Ok(())
    };
    measure(SETTINGS[0], &cgroups.child("other"))?;
    {
        let mut dp = Datapath::load(&load_options(&compiled, true))?;
        dp.attach_empty_socket_programs(&cgroups.top)?;
        measure(SETTINGS[1], &cgroups.child("other"))?;
    }
    let mut dp = Datapath::load(&load_options(&compiled, false))?;
    dp.apply(&compiled, EventLimits::default())?;
    dp.attach_socket_ring(&cgroups.top)?;
    measure(SETTINGS[2], &cgroups.child("other"))?;
    measure(SETTINGS[3], &cgroups.child("class"))?;
    let judged = dp
        .counters()?
        .iter()
        .filter(|(k, _)| {
            k.hook == Hook::SockConnect as u8 && k.class != datafence_common::CLASS_NONE
        })
        .map(|(_, v)| v.packets)
        .sum::<u64>();
    if judged < u64::from(CALLS) {
        bail!("the class's connects were not judged by the class ({judged} counted)");
    }
    drop(dp);
    drop(files);
    Ok(SocketFigures {
        policy_size: n,
        connect_per_s: connect,
        sendto_per_s: sendto,
    })
}

/// The report's table: calls per second by setting, and each as a ratio to `none`.
pub(crate) fn print_socket(figures: &SocketFigures) {
    println!(
        "\nsocket ring: calls per second from one process, policy of {} prefixes per family (ratio to no program)",
        human_size(figures.policy_size)
    );
    println!(
        "{:<24} {:>26} {:>26}",
        "setting", "connect() / s", "sendto() / s"
    );
    let none_c = figures.connect_per_s.get("none").copied();
    let none_s = figures.sendto_per_s.get("none").copied();
    for setting in SETTINGS {
        let c = figures.connect_per_s.get(setting).copied();
        let s = figures.sendto_per_s.get(setting).copied();
        println!(
            "{setting:<24} {:>18} {:>7} {:>18} {:>7}",
            show(c, 0),
            show_ratio(ratio(c, none_c)),
            show(s, 0),
            show_ratio(ratio(s, none_s)),
        );
    }
}
