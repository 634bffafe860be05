//! `cargo xtask demo`: datafence enforcing a real policy, end to end, in a sandbox of
//! network namespaces that it builds and removes again.
//!
//! Layout: a "host" namespace, whose egress the agent enforces, has one veth link to each
//! of three region namespaces (eu-west, eu-north, us-east). Each region namespace owns a
//! server address from a documentation range and runs an HTTP server and a UDP echo
//! server. Clients in the host namespace talk to every server, once as user data (in the
//! cgroup that policies/demo.yaml names) and once as other traffic. Nothing is sent
//! outside these namespaces.

use std::{
    env,
    ffi::{CString, OsStr},
    fmt::Write as _,
    fs::{self, File},
    io::{self, BufRead as _, IsTerminal as _, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    os::{
        fd::AsRawFd as _,
        unix::{fs::MetadataExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{setup, util};

#[derive(Args)]
pub(crate) struct Options {
    /// Skip `cargo xtask setup` and the build; use the agent binary already built.
    #[arg(long)]
    no_build: bool,
    /// Build and run the release agent instead of the debug one that `cargo xtask test`
    /// also builds.
    #[arg(long)]
    release: bool,
    /// At the end, leave the sandbox and the agent running until Enter or Ctrl-C, to try
    /// things by hand.
    #[arg(long)]
    keep: bool,
}

/// Every namespace the demo makes starts with this, so a crashed run's leftovers can be
/// found and removed.
const NS_PREFIX: &str = "dfdemo-";
const HOST_NS: &str = "dfdemo-host";
/// The user-data cgroup, relative to the cgroup2 mount, as policies/demo.yaml names it.
const CGROUP: &str = "/datafence-demo/user-api";
const METRICS_ADDR: &str = "127.0.0.1:9477";
const HTTP_PORT: u16 = 80;
const UDP_PORT: u16 = 7007;
/// How long a client waits before calling a destination blocked. Dropped packets give no
/// error, only silence, so this bounds every blocked probe.
const CLIENT_TIMEOUT_SECS: &str = "2";
const POLICY: &str = "policies/demo.yaml";

struct Region {
    name: &'static str,
    netns: &'static str,
    /// The host namespace's interface towards this region; policies/demo.yaml lists these
    /// as the egress interfaces.
    host_if: &'static str,
    server_v4: Ipv4Addr,
    server_v6: Ipv6Addr,
    /// What the host routes through the region's link. Keep these inside the region's
    /// CIDRs in policies/demo.yaml.
    route_v4: &'static str,
    route_v6: &'static str,
}

const REGIONS: [Region; 3] = [
    Region {
        name: "eu-west",
        netns: "dfdemo-eu-west",
        host_if: "to-eu-west",
        server_v4: Ipv4Addr::new(198, 51, 100, 10),
        server_v6: Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10),
        route_v4: "198.51.100.0/24",
        route_v6: "2001:db8:100::/48",
    },
    Region {
        name: "eu-north",
        netns: "dfdemo-eu-north",
        host_if: "to-eu-north",
        server_v4: Ipv4Addr::new(198, 18, 0, 10),
        server_v6: Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0x10),
        route_v4: "198.18.0.0/24",
        route_v6: "2001:db8:200::/48",
    },
    Region {
        name: "us-east",
        netns: "dfdemo-us-east",
        host_if: "to-us-east",
        server_v4: Ipv4Addr::new(203, 0, 113, 10),
        server_v6: Ipv6Addr::new(0x2001, 0xdb8, 0x300, 0, 0, 0, 0, 0x10),
        route_v4: "203.0.113.0/24",
        route_v6: "2001:db8:300::/48",
    },
];

/// The region user data may not reach under policies/demo.yaml.
const FORBIDDEN_REGION: &str = "us-east";

/// The link between the host and region `index`: a /30 and a /64 of documentation
/// space, outside every region, with fixed MACs so neighbours can be static.
struct Link {
    host_v4: String,
    region_v4: String,
    host_v6: String,
    region_v6: String,
    host_mac: String,
    region_mac: String,
}

impl Link {
    fn new(index: usize) -> Self {
        let base = 4 * index;
        let subnet = index + 1;
        Self {
            host_v4: format!("192.0.2.{}", base + 1),
            region_v4: format!("192.0.2.{}", base + 2),
            host_v6: format!("2001:db8:ffff:{subnet}::1"),
            region_v6: format!("2001:db8:ffff:{subnet}::2"),
            host_mac: format!("02:df:de:00:{index:02x}:01"),
            region_mac: format!("02:df:de:00:{index:02x}:02"),
        }
    }
}

pub(crate) fn run(opts: Options) -> Result<()> {
    let result = demo(&opts);
    if interrupted() {
        bail!("interrupted; the demo removed everything it had set up");
    }
    result
}

fn demo(opts: &Options) -> Result<()> {
    let started = Instant::now();
    let privileges = util::Privileges::current()?;
    let capable = [util::CAP_NET_ADMIN, util::CAP_SYS_ADMIN, util::CAP_BPF]
        .into_iter()
        .all(|cap| privileges.has_cap(cap));
    if !capable {
        bail!(
            "the demo creates network namespaces and cgroups and loads eBPF programs: \
             run it as root"
        );
    }
    let style = Style::detect();
    println!(
        "{}",
        style.bold("datafence demo: user data may reach only eu-west and eu-north")
    );
    println!("Everything runs in network namespaces made for the demo and removed at the end.");

    style.heading(1, "Preparing the tools and the agent");
    let agent_bin = prepare(opts)?;
    // Only now: until the sandbox exists there is nothing to clean up, and Ctrl-C should
    // stop setup and cargo the usual way rather than let them carry on after their
    // children were killed.
    install_signal_handlers()?;
    for program in ["ip", "curl", "python3"] {
        if util::find_program(program).is_none() {
            bail!("the demo needs `{program}`; `cargo xtask setup` installs it");
        }
    }
    check_interrupt()?;

    let mut demo = Demo::new(agent_bin, style)?;
    demo.build_sandbox()?;
    check_interrupt()?;
    demo.start_agent()?;
    check_interrupt()?;
    demo.show_enforcement()?;
    check_interrupt()?;
    demo.show_audit_reload()?;
    check_interrupt()?;
    if opts.keep {
        demo.wait_for_enter();
    }

    style.heading(8, "Cleaning up");
    demo.teardown();
    println!(
        "  removed the agent, servers, namespaces {NS_PREFIX}*, cgroup {CGROUP} and {}",
        demo.tmp.display()
    );
    println!();
    if demo.surprises.is_empty() {
        println!(
            "{} in {:.1}s: user data reached eu-west and eu-north only, other traffic went \
             everywhere, and audit mode let everything through while reporting it.",
            style.bold("Demo complete"),
            started.elapsed().as_secs_f64()
        );
        Ok(())
    } else {
        bail!(
            "the demo did not behave as expected:\n  {}",
            demo.surprises.join("\n  ")
        )
    }
}

/// Runs setup and builds the agent, unless told not to; returns the agent binary.
fn prepare(opts: &Options) -> Result<PathBuf> {
    let profile = if opts.release { "release" } else { "debug" };
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| util::workspace_root().join("target"), PathBuf::from);
    let binary = target_dir.join(profile).join("datafence");
    if opts.no_build {
        println!("  --no-build: using {}", binary.display());
    } else {
        println!("  cargo xtask setup (quick when already done):");
        setup::run(setup::Options {})?;
        println!("  building the agent ({profile}):");
        let mut build = util::cargo();
        build.args(["build", "--package", "datafence", "--bin", "datafence"]);
        if opts.release {
            build.arg("--release");
        }
        util::run(&mut build)?;
    }
    if !binary.is_file() {
        bail!(
            "{} does not exist; build it with `cargo build -p datafence{}`",
            binary.display(),
            if opts.release { " --release" } else { "" }
        );
    }
    Ok(binary)
}

// ---------------------------------------------------------------------------------------
// Signals

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    let message = b"\ndemo: interrupted, cleaning up...\n";
    // SAFETY: write(2) is async-signal-safe and the buffer is static.
    unsafe { libc::write(2, message.as_ptr().cast(), message.len()) };
}

/// Ctrl-C (and SIGTERM, SIGHUP) only sets a flag, which the demo checks between steps:
/// every step is bounded in time, and unwinding through `Demo`'s drop is what removes the
/// namespaces, the cgroup and the agent.
fn install_signal_handlers() -> Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is a valid starting point; the handler only touches
        // an atomic and calls write(2).
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("installing a signal handler");
        }
    }
    Ok(())
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupt() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The sandbox and the agent

struct Demo {
    /// Held for the whole run: the names are fixed, so a second demo must not start until
    /// this one has removed them.
    lock: Option<DemoLock>,
    style: Style,
    agent_bin: PathBuf,
    cgroup_root: PathBuf,
    /// Scratch directory: the policy copy the agent runs with, its runtime dir and logs.
    tmp: PathBuf,
    policy: PathBuf,
    runtime_dir: PathBuf,
    violations_log: PathBuf,
    agent_log: PathBuf,
    agent: Option<Child>,
    stop_servers: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    /// Violation lines already shown, so each step shows only what it caused.
    violations_seen: usize,
    /// Results that contradict the policy; the demo fails if there are any.
    surprises: Vec<String>,
    torn_down: bool,
}

impl Demo {
    /// Removes what a crashed earlier run may have left, then takes ownership of the fixed
    /// names: from here on, dropping `Demo` removes them whatever happens.
    fn new(agent_bin: PathBuf, style: Style) -> Result<Self> {
        let lock = DemoLock::acquire()?;
        let tmp = env::temp_dir().join("datafence-demo");
        let demo = Self {
            lock: Some(lock),
            style,
            agent_bin,
            cgroup_root: cgroup2_root(),
            policy: tmp.join("policy.yaml"),
            runtime_dir: tmp.join("run"),
            violations_log: tmp.join("violations.jsonl"),
            agent_log: tmp.join("agent.log"),
            tmp,
            agent: None,
            stop_servers: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            violations_seen: 0,
            surprises: Vec::new(),
            torn_down: false,
        };
        let stale = remove_sandbox(&demo.cgroup_root, &demo.tmp);
        if !stale.is_empty() {
            println!(
                "  removed leftovers of an earlier run: {}",
                stale.join(", ")
            );
        }
        Ok(demo)
    }

    fn cgroup_dir(&self) -> PathBuf {
        self.cgroup_root.join(CGROUP.trim_start_matches('/'))
    }

    fn build_sandbox(&mut self) -> Result<()> {
        self.style.heading(2, "Building the sandbox");
        fs::create_dir_all(&self.tmp)
            .with_context(|| format!("creating {}", self.tmp.display()))?;
        // The agent reloads from this copy, which step 7 rewrites; the file in the
        // repository stays as it is.
        let source = util::workspace_root().join(POLICY);
        fs::copy(&source, &self.policy).with_context(|| {
            format!("copying {} to {}", source.display(), self.policy.display())
        })?;

        add_netns(HOST_NS)?;
        for (index, region) in REGIONS.iter().enumerate() {
            add_netns(region.netns)?;
            let link = Link::new(index);
            ip(&format!(
                "link add {} address {} netns {HOST_NS} type veth \
                 peer name to-host address {} netns {}",
                region.host_if, link.host_mac, link.region_mac, region.netns
            ))?;
            let sides = [
                (HOST_NS, region.host_if, &link.host_v4, &link.host_v6),
                (region.netns, "to-host", &link.region_v4, &link.region_v6),
            ];
            for (ns, dev, v4, v6) in sides {
                ip(&format!("-n {ns} addr add {v4}/30 dev {dev}"))?;
                ip(&format!("-n {ns} -6 addr add {v6}/64 dev {dev} nodad"))?;
                ip(&format!("-n {ns} link set {dev} up"))?;
            }
            // Static neighbours: traffic flows from the first packet, with no ARP or
            // neighbour discovery that could make a slow machine look like a blocked one.
            let neighbours = [
                (
                    HOST_NS,
                    region.host_if,
                    &link.region_v4,
                    &link.region_v6,
                    &link.region_mac,
                ),
                (
                    region.netns,
                    "to-host",
                    &link.host_v4,
                    &link.host_v6,
                    &link.host_mac,
                ),
            ];
            for (ns, dev, v4, v6, mac) in neighbours {
                for peer in [v4, v6] {
                    ip(&format!(
                        "-n {ns} neigh replace {peer} lladdr {mac} dev {dev} nud permanent"
                    ))?;
                }
            }
            let (ns, v4, v6) = (region.netns, region.server_v4, region.server_v6);
            ip(&format!("-n {ns} addr add {v4}/32 dev lo"))?;
            ip(&format!("-n {ns} -6 addr add {v6}/128 dev lo nodad"))?;
            ip(&format!(
                "-n {HOST_NS} route add {} via {} dev {}",
                region.route_v4, link.region_v4, region.host_if
            ))?;
            ip(&format!(
                "-n {HOST_NS} -6 route add {} via {} dev {}",
                region.route_v6, link.region_v6, region.host_if
            ))?;
            self.start_servers(region)?;
        }

        let cgroup = self.cgroup_dir();
        // Before the agent starts: it resolves the policy's cgroup path to an id once,
        // when it validates the policy.
        fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;

        println!("  {HOST_NS} (the enforced host) has a link to each region's namespace:");
        for region in &REGIONS {
            println!(
                "    {HOST_NS} --{:-<12}> {:<16} server {:<14} {}",
                region.host_if,
                region.netns,
                region.server_v4.to_string(),
                region.server_v6
            );
        }
        println!("  each server answers HTTP on tcp/{HTTP_PORT} and echoes UDP on udp/{UDP_PORT}");
        println!("  user-data cgroup: {}", cgroup.display());
        Ok(())
    }

    /// HTTP and UDP echo servers for `region`, on threads that live in its namespace; the
    /// replies name the region, so a client can tell it reached the right one.
    fn start_servers(&mut self, region: &'static Region) -> Result<()> {
        let netns = File::open(netns_path(region.netns))
            .with_context(|| format!("opening namespace {}", region.netns))?;
        let addrs = [IpAddr::V4(region.server_v4), IpAddr::V6(region.server_v6)];
        for addr in addrs {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let netns = netns.try_clone()?;
            let stop = self.stop_servers.clone();
            let handle = thread::spawn(move || {
                let bound = enter_netns(&netns).and_then(|()| {
                    let tcp = TcpListener::bind(SocketAddr::new(addr, HTTP_PORT))?;
                    tcp.set_nonblocking(true)?;
                    let udp = UdpSocket::bind(SocketAddr::new(addr, UDP_PORT))?;
                    udp.set_read_timeout(Some(Duration::from_millis(50)))?;
                    Ok((tcp, udp))
                });
                match bound {
                    Ok((tcp, udp)) => {
                        let _ = ready_tx.send(Ok(()));
                        serve(region.name, &tcp, &udp, &stop);
                    }
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                    }
                }
            });
            self.servers.push(handle);
            ready_rx
                .recv()
                .context("a server thread died while starting")?
                .with_context(|| format!("starting the {} servers on {addr}", region.name))?;
        }
        Ok(())
    }

    fn start_agent(&mut self) -> Result<()> {
        self.style
            .heading(3, "Starting the agent in the host namespace");
        println!("  the policy ({POLICY}), as datafence sees it:");
        let check = self.datafence(&["check", &self.policy.display().to_string()])?;
        print_indented(&check, 4);

        let policy = self.policy.display().to_string();
        let mut args = vec!["run", "--policy", &policy, "--metrics-addr", METRICS_ADDR];
        // Flags of newer agents, passed only when this build has them. --no-pin: the
        // demo's enforcement must end with the demo, and must not touch the pins of an
        // agent that protects this machine. --no-watch: the switch to audit should happen
        // at the `datafence reload` shown, not whenever the file watcher notices.
        let help = self.datafence(&["run", "--help"])?;
        for flag in ["--no-pin", "--no-watch"] {
            if help.contains(flag) {
                args.push(flag);
            }
        }
        println!("  $ datafence {}", args.join(" "));
        let mut cmd = self.datafence_command(&args)?;
        let stdout = File::create(&self.violations_log)?;
        let stderr = File::create(&self.agent_log)?;
        cmd.stdout(stdout).stderr(stderr).stdin(Stdio::null());
        // Ctrl-C in the terminal reaches only the demo, which then stops the agent in
        // order; and if the demo dies without cleaning up, so does the agent.
        cmd.process_group(0);
        // SAFETY: prctl is a plain syscall, safe between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        self.agent = Some(cmd.spawn().context("starting datafence run")?);

        let deadline = started + Duration::from_secs(30);
        loop {
            check_interrupt()?;
            if let Some(status) = self
                .agent
                .as_mut()
                .and_then(|a| a.try_wait().ok().flatten())
            {
                bail!(
                    "datafence run exited early ({status}); its log:\n{}",
                    fs::read_to_string(&self.agent_log).unwrap_or_default()
                );
            }
            if self
                .datafence_command(&["status"])?
                .output()
                .is_ok_and(|o| o.status.success())
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "datafence run did not answer `datafence status` within 30s; its log:\n{}",
                    fs::read_to_string(&self.agent_log).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
        println!(
            "  ready after {:.1}s: enforcing on {}",
            started.elapsed().as_secs_f64(),
            REGIONS.map(|r| r.host_if).join(", ")
        );
        println!(
            "  (its control socket is in {}; the commands below pass --runtime-dir there)",
            self.runtime_dir.display()
        );
        Ok(())
    }

    fn show_enforcement(&mut self) -> Result<()> {
        self.style
            .heading(4, "Traffic from the host, with the policy enforced");
        println!(
            "  user-data = clients run in cgroup {CGROUP}; other = the same clients outside it"
        );
        println!(
            "  HTTP = curl --max-time {CLIENT_TIMEOUT_SECS}; UDP = one datagram, waiting for \
             the echo"
        );
        let results = run_probes(&self.cgroup_dir(), &[Sender::UserData, Sender::Other]);
        // Ctrl-C also kills the clients, which would read as blocked traffic.
        check_interrupt()?;
        self.print_results(&results, Mode::Enforce);

        self.style.heading(5, "What the agent reported");
        let violations = self.new_violations();
        println!("  violations: the agent writes one JSON line per violating flow to stdout");
        print_violations(&violations, self.style);
        if !parse_all(&violations)
            .iter()
            .any(|v| v.verdict == "deny" && v.region == FORBIDDEN_REGION && v.class == "user-data")
        {
            self.surprises
                .push("no deny violation for user data to us-east was reported".to_owned());
        }
        println!();
        self.show_metrics()?;
        println!();
        println!("  $ datafence status");
        let status = self.datafence(&["status"])?;
        print_indented(&status, 4);
        check_interrupt()?;

        self.style.heading(6, "Asking the agent why");
        let (us, eu) = (
            REGIONS[2].server_v4.to_string(),
            REGIONS[0].server_v4.to_string(),
        );
        let port = HTTP_PORT.to_string();
        for args in [
            vec!["explain", "--cgroup", CGROUP, "--dport", &port, &us, &eu],
            vec!["explain", "--dport", &port, &us],
        ] {
            println!("  $ datafence {}", args.join(" "));
            print_indented(&self.datafence(&args)?, 4);
        }
        Ok(())
    }

    fn show_metrics(&self) -> Result<()> {
        let url = format!("http://{METRICS_ADDR}/metrics");
        println!("  $ curl {url}   (in {HOST_NS}; lines of datafence_packets_total)");
        let out = in_netns(HOST_NS, "curl")?
            .args([
                "--silent",
                "--fail",
                "--max-time",
                CLIENT_TIMEOUT_SECS,
                &url,
            ])
            .stdin(Stdio::null())
            .output()
            .context("running curl")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("datafence_packets_total"))
            .collect();
        lines.sort_unstable();
        if !out.status.success() || lines.is_empty() {
            println!("    (metrics endpoint not available)");
            return Ok(());
        }
        const SHOWN: usize = 12;
        for line in lines.iter().take(SHOWN) {
            println!("    {line}");
        }
        if lines.len() > SHOWN {
            println!("    ... and {} more", lines.len() - SHOWN);
        }
        Ok(())
    }

    fn show_audit_reload(&mut self) -> Result<()> {
        self.style
            .heading(7, "Switching to audit mode with a live reload");
        let text = fs::read_to_string(&self.policy)?;
        let audit = text.replacen("\nmode: enforce", "\nmode: audit", 1);
        if audit == text {
            bail!("{POLICY} has no top-level `mode: enforce` line for the demo to change");
        }
        // Replaced in one step, so nothing ever reads a half-written policy.
        let staged = self.policy.with_extension("yaml.new");
        fs::write(&staged, audit)?;
        fs::rename(&staged, &self.policy)?;
        println!(
            "  in {}: mode: enforce -> mode: audit",
            self.policy.display()
        );
        println!("  $ datafence reload");
        print_indented(&self.datafence(&["reload"])?, 4);
        check_interrupt()?;

        println!(
            "  user data again: everything passes now, and what enforce mode would drop is \
             reported"
        );
        let results = run_probes(&self.cgroup_dir(), &[Sender::UserData]);
        check_interrupt()?;
        self.print_results(&results, Mode::Audit);
        let violations = self.new_violations();
        println!("  violations since the reload (audit hits):");
        print_violations(&violations, self.style);
        if !parse_all(&violations)
            .iter()
            .any(|v| v.verdict == "audit" && v.region == FORBIDDEN_REGION)
        {
            self.surprises
                .push("no audit hit for user data to us-east was reported".to_owned());
        }
        Ok(())
    }

    fn print_results(&mut self, results: &[ProbeResult], mode: Mode) {
        let style = self.style;
        println!(
            "  {}",
            style.bold(&format!(
                "{:<10} {:<9} {:<9} {:<15} {:<9}   {:<18} {}",
                "SENDER", "PROTO", "REGION", "IPv4 SERVER", "RESULT", "IPv6 SERVER", "RESULT"
            ))
        );
        // Probes come in IPv4/IPv6 pairs; show a pair per row.
        for pair in results.chunks(2) {
            let [v4, v6] = pair else { continue };
            let mut line = format!(
                "  {:<10} {:<9} {:<9}",
                v4.probe.sender.label(),
                v4.probe.proto.label(),
                v4.probe.region.name
            );
            for (result, gap) in [(v4, ""), (v6, "  ")] {
                let expected = result.probe.expected_to_pass(mode);
                let width = if result.probe.addr.is_ipv4() { 15 } else { 18 };
                let _ = write!(
                    line,
                    "{gap} {:<width$} {}",
                    result.probe.addr.to_string(),
                    style.outcome(result.passed)
                );
                if result.passed != expected {
                    let _ = write!(line, " {}", style.yellow("(unexpected!)"));
                    self.surprises.push(format!(
                        "{} {} to {} {}: {} ({})",
                        result.probe.sender.label(),
                        result.probe.proto.label(),
                        result.probe.region.name,
                        result.probe.addr,
                        if result.passed {
                            "passed"
                        } else {
                            "was blocked"
                        },
                        result.detail
                    ));
                }
            }
            println!("{line}");
        }
    }

    /// Violation lines the agent has written since the last call.
    fn new_violations(&mut self) -> Vec<String> {
        // The agent reads its event ring as packets are dropped; give the last ones time to
        // be written.
        thread::sleep(Duration::from_millis(300));
        let text = fs::read_to_string(&self.violations_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let fresh = lines.get(self.violations_seen..).unwrap_or_default();
        self.violations_seen = lines.len();
        fresh.iter().map(|&l| l.to_owned()).collect()
    }

    fn wait_for_enter(&self) {
        println!();
        println!(
            "{}",
            self.style
                .bold("--keep: the sandbox stays up until you press Enter (or Ctrl-C)")
        );
        println!("  try, in another terminal:");
        let bin = self.agent_bin.display();
        let rt = self.runtime_dir.display();
        println!("    {bin} --runtime-dir {rt} status");
        println!("    ip netns exec {HOST_NS} curl -m 2 http://203.0.113.10/");
        println!(
            "    {bin} --runtime-dir {rt} explain --cgroup {CGROUP} 2001:db8:300::10 198.18.0.10"
        );
        let mut stdin = libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        };
        while !interrupted() {
            // SAFETY: one valid pollfd; a signal makes poll return early, which the loop
            // condition then sees.
            let ready = unsafe { libc::poll(&mut stdin, 1, 200) };
            if ready > 0 {
                let _ = io::stdin().lock().read_line(&mut String::new());
                break;
            }
        }
    }

    /// `datafence` with the agent's runtime dir and cgroup root, in the host namespace.
    fn datafence_command(&self, args: &[&str]) -> Result<Command> {
        let mut cmd = in_netns(HOST_NS, &self.agent_bin)?;
        cmd.arg("--runtime-dir")
            .arg(&self.runtime_dir)
            .arg("--cgroup-root")
            .arg(&self.cgroup_root)
            .args(args)
            // The sandbox is not the machine you are logged in to: the agent's guard
            // against locking out the SSH client would judge the demo policy by an
            // address that the sandbox cannot even reach.
            .env_remove("SSH_CONNECTION");
        Ok(cmd)
    }

    /// Runs a `datafence` command and returns what it printed, stdout then stderr.
    fn datafence(&self, args: &[&str]) -> Result<String> {
        let out = self
            .datafence_command(args)?
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running datafence {}", args.join(" ")))?;
        let text = combined(&out);
        if !out.status.success() {
            bail!(
                "`datafence {}` failed ({}):\n{text}",
                args.join(" "),
                out.status
            );
        }
        Ok(text)
    }

    fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        if let Some(mut agent) = self.agent.take() {
            stop_child(&mut agent);
        }
        self.stop_servers.store(true, Ordering::SeqCst);
        for server in self.servers.drain(..) {
            let _ = server.join();
        }
        // Once the servers' sockets are closed nothing holds the namespaces, so deleting
        // them frees the veth pairs at once.
        remove_sandbox(&self.cgroup_root, &self.tmp);
        if let Some(lock) = self.lock.take() {
            lock.release();
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// An exclusive flock on a file in /run, so that demos on one machine take turns. The
/// kernel drops it when the holder dies, however it dies, which is what lets the next run
/// treat whatever it finds under the fixed names as leftovers.
struct DemoLock {
    file: File,
}

impl DemoLock {
    const PATH: &str = "/run/datafence-demo.lock";

    fn acquire() -> Result<Self> {
        let mut waiting = false;
        loop {
            check_interrupt()?;
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(Self::PATH)
                .with_context(|| format!("opening {}", Self::PATH))?;
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                // The previous holder unlinks the file as it finishes; a lock on that
                // unlinked file excludes nobody, so make sure ours is still the file at
                // the path.
                let same = match (file.metadata(), fs::metadata(Self::PATH)) {
                    (Ok(held), Ok(named)) => held.ino() == named.ino(),
                    _ => false,
                };
                if same {
                    return Ok(Self { file });
                }
                continue;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::WouldBlock {
                return Err(err).with_context(|| format!("locking {}", Self::PATH));
            }
            if !waiting {
                println!("  another `cargo xtask demo` is running; waiting for it to finish");
                waiting = true;
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Unlinks the file before unlocking it, so that nothing is left in /run.
    fn release(self) {
        let _ = fs::remove_file(Self::PATH);
        drop(self.file);
    }
}

/// Deletes the namespaces, the cgroup and the scratch directory by their fixed names,
/// whoever made them, and returns what it found. Never fails: this also runs while an
/// error is on its way out.
fn remove_sandbox(cgroup_root: &Path, tmp: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let namespaces: Vec<String> = fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(NS_PREFIX))
        .collect();
    for name in namespaces {
        match Command::new("ip").args(["netns", "del", &name]).output() {
            Ok(out) if out.status.success() => removed.push(format!("netns {name}")),
            Ok(out) => eprintln!(
                "warning: could not delete namespace {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(err) => eprintln!("warning: could not run `ip netns del {name}`: {err}"),
        }
    }
    let leaf = cgroup_root.join(CGROUP.trim_start_matches('/'));
    for dir in leaf.ancestors().take(2) {
        if !dir.exists() {
            continue;
        }
        // A client that has just exited can keep the cgroup busy for a moment.
        let mut result = fs::remove_dir(dir);
        for _ in 0..20 {
            if result.is_ok() {
                break;
            }
            thread::sleep(Duration::from_millis(50));
            result = fs::remove_dir(dir);
        }
        match result {
            Ok(()) => removed.push(format!("cgroup {}", dir.display())),
            Err(err) => eprintln!("warning: could not remove cgroup {}: {err}", dir.display()),
        }
    }
    if tmp.exists() {
        match fs::remove_dir_all(tmp) {
            Ok(()) => removed.push(tmp.display().to_string()),
            Err(err) => eprintln!("warning: could not remove {}: {err}", tmp.display()),
        }
    }
    removed
}

fn stop_child(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on the pid of a child we have not reaped yet, so it cannot have
    // been reused.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Where the cgroup v2 hierarchy is mounted: /sys/fs/cgroup on unified hosts,
/// /sys/fs/cgroup/unified on hybrid ones. The agent finds it the same way
/// (datafence::cgroups::cgroup2_root); the demo passes it explicitly so both agree.
fn cgroup2_root() -> PathBuf {
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .find_map(|line| {
            let mut cols = line.split_whitespace();
            let (_device, dir, fstype) = (cols.next()?, cols.next()?, cols.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
        .unwrap_or_else(|| PathBuf::from("/sys/fs/cgroup"))
}

fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

fn add_netns(name: &str) -> Result<()> {
    util::output(Command::new("ip").args(["netns", "add", name]))?;
    ip(&format!("-n {name} link set lo up"))?;
    // No duplicate-address detection, so addresses are usable at once rather than
    // tentative for a second or two.
    util::output(Command::new("ip").args([
        "netns",
        "exec",
        name,
        "sysctl",
        "-q",
        "-w",
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
    ]))?;
    Ok(())
}

/// Runs `ip ARGS`, ARGS split on whitespace.
fn ip(args: &str) -> Result<()> {
    util::output(Command::new("ip").args(args.split_whitespace()))?;
    Ok(())
}

fn enter_netns(netns: &File) -> io::Result<()> {
    // SAFETY: setns on a namespace fd changes only the calling thread's namespace.
    if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A command that runs in the named network namespace and nothing else: unlike
/// `ip netns exec` it keeps this process's mounts, and `ip netns exec` remounts /sys,
/// which would hide the cgroup2 hierarchy from the agent.
fn in_netns(netns: &str, program: impl AsRef<OsStr>) -> Result<Command> {
    let file =
        File::open(netns_path(netns)).with_context(|| format!("opening namespace {netns}"))?;
    let mut cmd = Command::new(program);
    // SAFETY: setns is a plain syscall, safe between fork and exec; the closure owns the
    // fd, which therefore stays open until exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// As [`in_netns`], and the process starts in the cgroup whose directory is given, so
/// every socket it opens is charged to that cgroup.
fn in_netns_and_cgroup(netns: &str, cgroup: &Path, program: &str) -> Result<Command> {
    let mut cmd = in_netns(netns, program)?;
    let procs = CString::new(
        cgroup
            .join("cgroup.procs")
            .into_os_string()
            .into_encoded_bytes(),
    )?;
    // SAFETY: only async-signal-safe calls (open, write, close) between fork and exec, on
    // memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(err);
            }
            Ok(())
        });
    }
    Ok(cmd)
}

fn serve(region: &str, tcp: &TcpListener, udp: &UdpSocket, stop: &AtomicBool) {
    let body = format!("hello from {region}\n");
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        while let Ok((mut conn, _)) = tcp.accept() {
            // Bounded, so a client that never sends its request cannot stall the server.
            let _ = conn.set_nonblocking(false);
            let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
            let mut request = Vec::new();
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16_384 {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let _ = conn.write_all(response.as_bytes());
        }
        // The read timeout paces this loop.
        if let Ok((n, from)) = udp.recv_from(&mut buf) {
            let mut reply = format!("{region} echo: ").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = udp.send_to(&reply, from);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Clients

#[derive(Clone, Copy, PartialEq, Eq)]
enum Sender {
    UserData,
    Other,
}

impl Sender {
    fn label(self) -> &'static str {
        match self {
            Self::UserData => "user-data",
            Self::Other => "other",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http,
    Udp,
}

impl Proto {
    fn label(self) -> &'static str {
        match self {
            Self::Http => "HTTP/80",
            Self::Udp => "UDP/7007",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Enforce,
    Audit,
}

#[derive(Clone, Copy)]
struct Probe {
    sender: Sender,
    proto: Proto,
    region: &'static Region,
    addr: IpAddr,
}

impl Probe {
    fn expected_to_pass(&self, mode: Mode) -> bool {
        mode == Mode::Audit || self.sender == Sender::Other || self.region.name != FORBIDDEN_REGION
    }
}

struct ProbeResult {
    probe: Probe,
    passed: bool,
    /// Why it failed, for the report when that was not expected.
    detail: String,
}

const UDP_CLIENT: &str = "\
import socket, sys
host, port, region = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
try:
    s.sendto(b'ping', (host, port))
    reply = s.recv(256)
except OSError as e:
    sys.exit('no echo: %s' % (e,))
sys.exit(0 if region.encode() in reply else 'unexpected echo %r' % (reply,))
";

/// Every sender against every server, IPv4 then IPv6 for each, all at once so blocked
/// probes cost one timeout in total rather than one each.
fn run_probes(cgroup: &Path, senders: &[Sender]) -> Vec<ProbeResult> {
    let mut probes = Vec::new();
    for &sender in senders {
        for proto in [Proto::Http, Proto::Udp] {
            for region in &REGIONS {
                for addr in [IpAddr::V4(region.server_v4), IpAddr::V6(region.server_v6)] {
                    probes.push(Probe {
                        sender,
                        proto,
                        region,
                        addr,
                    });
                }
            }
        }
    }
    thread::scope(|scope| {
        let handles: Vec<_> = probes
            .iter()
            .map(|&probe| scope.spawn(move || run_probe(cgroup, probe)))
            .collect();
        handles
            .into_iter()
            .zip(&probes)
            .map(|(handle, &probe)| {
                let (passed, detail) = match handle.join() {
                    Ok(Ok(output)) => judge(probe, &output),
                    Ok(Err(err)) => (false, format!("{err:#}")),
                    Err(_) => (false, "the probe thread panicked".to_owned()),
                };
                ProbeResult {
                    probe,
                    passed,
                    detail,
                }
            })
            .collect()
    })
}

fn run_probe(cgroup: &Path, probe: Probe) -> Result<Output> {
    let program = match probe.proto {
        Proto::Http => "curl",
        Proto::Udp => "python3",
    };
    let mut cmd = match probe.sender {
        Sender::UserData => in_netns_and_cgroup(HOST_NS, cgroup, program)?,
        Sender::Other => in_netns(HOST_NS, program)?,
    };
    match probe.proto {
        Proto::Http => {
            let url = match probe.addr {
                IpAddr::V4(a) => format!("http://{a}:{HTTP_PORT}/"),
                IpAddr::V6(a) => format!("http://[{a}]:{HTTP_PORT}/"),
            };
            cmd.args(["--silent", "--show-error", "--globoff", "--max-time"])
                .arg(CLIENT_TIMEOUT_SECS)
                .arg(url);
        }
        Proto::Udp => {
            cmd.args(["-c", UDP_CLIENT])
                .arg(probe.addr.to_string())
                .arg(UDP_PORT.to_string())
                .arg(probe.region.name);
        }
    }
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))
}

/// Whether the client got the right server's answer, and if not, what it said.
fn judge(probe: Probe, out: &Output) -> (bool, String) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && (probe.proto == Proto::Udp || stdout.contains(probe.region.name)) {
        return (true, String::new());
    }
    let said = combined(out);
    let said = said.lines().last().unwrap_or("").trim();
    (false, format!("{}: {said}", out.status))
}

// ---------------------------------------------------------------------------------------
// Violation reports

/// The fields of a violation line the demo shows. Read leniently: a field the agent
/// stops writing shows as `?` rather than hiding the line.
struct Violation {
    verdict: String,
    class: String,
    region: String,
    reason: String,
    interface: String,
    protocol: String,
    src: String,
    src_port: u64,
    dst: String,
    dst_port: u64,
    cgroup: String,
    /// Packets the line stands for; the agent folds repeats of a flow into one line.
    packets: u64,
}

impl Violation {
    fn parse(line: &str) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let text = |key: &str| v[key].as_str().unwrap_or("?").to_owned();
        let number = |key: &str| v[key].as_u64().unwrap_or(0);
        let protocol = match &v["protocol"] {
            serde_json::Value::String(name) => name.clone(),
            serde_json::Value::Number(n) => match n.as_u64() {
                Some(6) => "tcp".to_owned(),
                Some(17) => "udp".to_owned(),
                _ => format!("protocol {n}"),
            },
            _ => "?".to_owned(),
        };
        Some(Self {
            verdict: text("verdict"),
            class: text("class"),
            region: text("region"),
            reason: text("reason"),
            interface: text("interface"),
            protocol,
            src: text("src"),
            src_port: number("src_port"),
            dst: text("dst"),
            dst_port: number("dst_port"),
            cgroup: text("cgroup"),
            packets: v["count"].as_u64().unwrap_or(1),
        })
    }

    fn endpoint(addr: &str, port: u64) -> String {
        if addr.contains(':') {
            format!("[{addr}]:{port}")
        } else {
            format!("{addr}:{port}")
        }
    }

    /// Everything shown but the packet count, which is what lines of one flow share.
    fn summary(&self) -> String {
        format!(
            "{:<5} {} {} -> {}  {} to {}: {} (cgroup {}, on {})",
            self.verdict,
            self.protocol,
            Self::endpoint(&self.src, self.src_port),
            Self::endpoint(&self.dst, self.dst_port),
            self.class,
            self.region,
            self.reason,
            self.cgroup,
            self.interface
        )
    }
}

/// Shows the first line as the agent wrote it, then one line per flow.
fn parse_all(lines: &[String]) -> Vec<Violation> {
    lines.iter().filter_map(|l| Violation::parse(l)).collect()
}

fn print_violations(lines: &[String], style: Style) {
    let violations = parse_all(lines);
    let Some(first) = lines.first() else {
        println!("    (none)");
        return;
    };
    println!("    the first, as written: {first}");
    println!("    all {}, one line per flow:", lines.len());
    let mut flows: Vec<(String, u64)> = Vec::new();
    for v in &violations {
        let summary = v.summary();
        match flows.iter_mut().find(|(s, _)| *s == summary) {
            Some((_, packets)) => *packets += v.packets,
            None => flows.push((summary, v.packets)),
        }
    }
    const SHOWN: usize = 8;
    for (summary, packets) in flows.iter().take(SHOWN) {
        let painted = if summary.starts_with("deny") {
            style.red(summary)
        } else {
            style.yellow(summary)
        };
        // The agent reports a flow's first packet at once and folds its repeats into a
        // later line, so most flows show as one packet here.
        if *packets > 1 {
            println!("      {painted} [{packets} packets]");
        } else {
            println!("      {painted}");
        }
    }
    if flows.len() > SHOWN {
        println!("      ... and {} more flows", flows.len() - SHOWN);
    }
}

// ---------------------------------------------------------------------------------------
// Output

fn combined(out: &Output) -> String {
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    text
}

fn print_indented(text: &str, indent: usize) {
    for line in text.lines() {
        println!("{:indent$}{line}", "");
    }
}

/// Colour only on a terminal, so a piped or logged run stays plain text.
#[derive(Clone, Copy)]
struct Style {
    color: bool,
}

impl Style {
    fn detect() -> Self {
        Self {
            color: io::stdout().is_terminal() && env::var_os("NO_COLOR").is_none(),
        }
    }

    fn paint(self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    fn bold(self, text: &str) -> String {
        self.paint("1", text)
    }

    fn red(self, text: &str) -> String {
        self.paint("31", text)
    }

    fn yellow(self, text: &str) -> String {
        self.paint("33", text)
    }

    fn outcome(self, passed: bool) -> String {
        if passed {
            self.paint("32", "✔ allowed")
        } else {
            self.paint("31", "✘ blocked")
        }
    }

    fn heading(self, step: u32, text: &str) {
        println!();
        println!("{}", self.bold(&format!("[{step}/8] {text}")));
    }
}
