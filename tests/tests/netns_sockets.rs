//! The socket ring, end to end: a "container" (its own network namespace, a veth pair to
//! the host with forwarding and masquerade, a process in a child cgroup of a class's
//! cgroup) whose traffic the packet ring cannot tell apart from any other forwarded
//! traffic. Its calls to a denied region fail with `EPERM`; its calls to an approved one
//! go through; each refusal is reported with the process, its cgroup and its namespace.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use integration_tests::{
    Scratch,
    agent::RunningAgent,
    netns::{NetNs, Sandbox, addr, sh, udp_delivered_with},
    patience, remove_cgroup_when_empty, require_root,
};

const EPERM: i64 = 1;

fn policy(cgroup: &str, mode: &str) -> String {
    format!(
        r"
version: 1
mode: {mode}
exempt: [192.0.2.2/32]
regions:
  eu-west:
    cidrs: [198.51.100.0/24, 2001:db8:100::/48]
  us-east:
    cidrs: [203.0.113.0/24, 2001:db8:300::/48]
data_classes:
  user-data:
    match:
      cgroups: [{cgroup}]
    allow: [eu-west]
"
    )
}

/// A container beside the sandbox's host namespace: namespace `ns`, reached from the
/// host through `ctr0`, its traffic forwarded and masqueraded out of the uplink; its
/// process runs in `cgroup`, a child of the class's cgroup `class_cgroup`.
struct Container {
    ns: NetNs,
    class_cgroup: PathBuf,
    cgroup: PathBuf,
}

impl Container {
    fn new(sandbox: &Sandbox, label: &str) -> Self {
        let ns = NetNs::new(&format!("{label}c"));
        let (host, ctr) = (&sandbox.host.name, &ns.name);
        sh(&[
            "ip", "link", "add", "ctr0", "netns", host, "type", "veth", "peer", "name", "eth0",
            "netns", ctr,
        ]);
        sandbox.host.ip("addr add 10.77.0.1/24 dev ctr0");
        sandbox.host.ip("-6 addr add fd77::1/64 dev ctr0 nodad");
        sandbox.host.ip("link set ctr0 up");
        ns.ip("addr add 10.77.0.2/24 dev eth0");
        ns.ip("-6 addr add fd77::2/64 dev eth0 nodad");
        ns.ip("link set eth0 up");
        ns.ip("route add default via 10.77.0.1");
        ns.ip("-6 route add default via fd77::1");
        sandbox.host.exec(&[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
        ]);
        let nat = "table ip ctr_nat { chain post { type nat hook postrouting priority srcnat; oifname \"up0\" masquerade; }; }\n\
                   table ip6 ctr_nat { chain post { type nat hook postrouting priority srcnat; oifname \"up0\" masquerade; }; }\n";
        let nft = sandbox
            .host
            .command("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write as _;
                child
                    .stdin
                    .take()
                    .expect("stdin")
                    .write_all(nat.as_bytes())?;
                child.wait()
            })
            .expect("nft");
        assert!(nft.success(), "masquerade rules");
        let root = datafence::cgroups::cgroup2_root();
        let class_cgroup = root.join(format!(
            "datafence-test-{label}-{}.slice",
            std::process::id()
        ));
        let cgroup = class_cgroup.join("ctr");
        let _ = std::fs::remove_dir(&cgroup);
        std::fs::create_dir_all(&cgroup).expect("mkdir the container's cgroup");
        Self {
            ns,
            class_cgroup,
            cgroup,
        }
    }

    /// The class's cgroup as a policy names it.
    fn class_written(&self) -> String {
        let root = datafence::cgroups::cgroup2_root();
        let rel = self
            .class_cgroup
            .strip_prefix(&root)
            .expect("under the root");
        format!("/{}", rel.display())
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = self.ns.command(program);
        datafence::cgroups::spawn_in_cgroup(&mut cmd, &self.cgroup.join("cgroup.procs"))
            .expect("cgroup");
        cmd
    }

    /// Runs each call (`tcp_connect`, `udp_connect` or `udp_sendto`, to `host`, `port`)
    /// from one process of the container, in its cgroup; returns that process's pid and
    /// each call's errno (0 when it succeeded).
    fn calls(&self, calls: &[(&str, &str, u16)]) -> (u32, Vec<i64>) {
        let script = "import json,os,socket,sys\n\
            out=[]\n\
            for arg in sys.argv[1:]:\n\
            \x20 kind,host,port=arg.split(',')\n\
            \x20 fam=socket.AF_INET6 if ':' in host else socket.AF_INET\n\
            \x20 s=socket.socket(fam,socket.SOCK_STREAM if kind=='tcp_connect' else socket.SOCK_DGRAM)\n\
            \x20 s.settimeout(2)\n\
            \x20 try:\n\
            \x20\x20  s.sendto(b'x',(host,int(port))) if kind=='udp_sendto' else s.connect((host,int(port)))\n\
            \x20\x20  out.append(0)\n\
            \x20 except OSError as e:\n\
            \x20\x20  out.append(e.errno or -1)\n\
            \x20 s.close()\n\
            print(json.dumps({'pid':os.getpid(),'errnos':out}))\n";
        let out = self
            .command("python3")
            .args(["-c", script])
            .args(calls.iter().map(|(k, h, p)| format!("{k},{h},{p}")))
            .output()
            .expect("run the container's process");
        assert!(
            out.status.success(),
            "container process: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
        let errnos = v["errnos"]
            .as_array()
            .expect("errnos")
            .iter()
            .map(|e| e.as_i64().expect("errno"))
            .collect();
        (v["pid"].as_u64().expect("pid") as u32, errnos)
    }

    /// Datagrams from the container's process to `dst:port` that reached the world, and
    /// the errno of each send.
    fn udp_delivered(
        &self,
        sandbox: &Sandbox,
        dst: &str,
        port: u16,
        count: u32,
    ) -> (u32, Vec<i64>) {
        let mut errnos = Vec::new();
        let delivered = udp_delivered_with(sandbox, dst, port, count, |to| {
            let host = to.ip().to_string();
            let calls = vec![("udp_sendto", host.as_str(), to.port()); count as usize];
            errnos = self.calls(&calls).1;
        });
        (delivered, errnos)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        for dir in [&self.cgroup, &self.class_cgroup] {
            let _ = remove_cgroup_when_empty(dir);
        }
    }
}

/// A socket ring that cannot be attached leaves the packet ring enforcing, and says so
/// in `status`, `/healthz` and the metrics.
#[test]
fn a_socket_ring_that_cannot_attach_is_reported_degraded() {
    require_root();
    let sandbox = Sandbox::new("skd");
    let scratch = Scratch::new("sockets-degraded");
    let by_port =
        policy("/unused", "enforce").replace("      cgroups: [/unused]", "      dst_ports: [7000]");
    let path = scratch.write("policy.yaml", &by_port);
    let not_a_cgroup = scratch.dir.join("not-a-cgroup");
    std::fs::create_dir_all(&not_a_cgroup).expect("mkdir");
    let metrics = "127.0.0.1:9797";
    let agent = RunningAgent::start(
        &sandbox.host,
        &path,
        &[
            "--socket-ring",
            not_a_cgroup.to_str().expect("a UTF-8 path"),
            "--metrics-addr",
            metrics,
        ],
    );
    let status = agent.status_json();
    assert_eq!(status["socket_ring"]["state"], "degraded", "{status:#}");
    assert!(
        status["socket_ring"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("cgroup v2")),
        "{status:#}"
    );
    let addr = metrics.parse().expect("address");
    let health = integration_tests::http::get(&sandbox.host.name, addr, "/healthz", &[]);
    assert_eq!(health.status, 503, "{}", health.body);
    assert!(
        health.body.contains("socket_ring DEGRADED"),
        "{}",
        health.body
    );
    let scrape = integration_tests::http::get(&sandbox.host.name, addr, "/metrics", &[]);
    assert!(
        scrape
            .body
            .contains("datafence_socket_ring{state=\"degraded\"} 1"),
        "{}",
        scrape.body
    );
    // The packet ring enforces on its own.
    assert_eq!(
        integration_tests::netns::udp_delivered(&sandbox, addr::US_V4, 7000, 5),
        0
    );
    assert_eq!(
        integration_tests::netns::udp_delivered(&sandbox, addr::EU_V4, 7000, 5),
        5
    );
    agent.stop();
}

/// `explain` says which ring stops a flow: the socket ring when the call shows its
/// class, the packet ring when the class selects by what only packets show.
#[test]
fn explain_names_the_ring_that_stops_a_flow() {
    require_root();
    let scratch = Scratch::new("sockets-explain");
    let root = datafence::cgroups::cgroup2_root();
    let cgroup = root.join(format!("datafence-test-skx-{}", std::process::id()));
    std::fs::create_dir_all(&cgroup).expect("mkdir cgroup");
    let written = format!("/{}", cgroup.strip_prefix(&root).expect("under").display());
    let yaml = format!(
        r"
version: 1
regions:
  eu-west:
    cidrs: [198.51.100.0/24]
  us-east:
    cidrs: [203.0.113.0/24]
data_classes:
  service:
    match:
      cgroups: [{written}]
    allow: [eu-west]
  marked:
    match:
      marks: [{{value: 0x42}}]
    allow: [eu-west]
"
    );
    let path = scratch.write("policy.yaml", &yaml);
    let explain = |extra: &[&str], to: &str| -> serde_json::Value {
        let out = Command::new(integration_tests::agent_binary())
            .args(["explain", "--json", "--proto", "udp", "--policy"])
            .arg(&path)
            .args(extra)
            .arg(to)
            .output()
            .expect("explain");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("one json line")
    };
    let by_cgroup = explain(&["--cgroup", &written], addr::US_V4);
    assert_eq!(
        (&by_cgroup["verdict"], &by_cgroup["ring"]),
        (&"deny".into(), &"socket".into()),
        "{by_cgroup}"
    );
    let by_mark = explain(&["--mark", "0x42"], addr::US_V4);
    assert_eq!(
        (&by_mark["verdict"], &by_mark["ring"]),
        (&"deny".into(), &"packet".into()),
        "{by_mark}"
    );
    let allowed = explain(&["--cgroup", &written], addr::EU_V4);
    assert_eq!(allowed["verdict"], "allow");
    assert!(allowed.get("ring").is_none(), "{allowed}");
    let _ = remove_cgroup_when_empty(&cgroup);
}

/// A sandbox with a container, and a policy (in `mode`) whose class names the
/// container's class cgroup.
struct ContainerSetup {
    container: Container,
    sandbox: Sandbox,
    policy: PathBuf,
    _scratch: Scratch,
}

impl ContainerSetup {
    fn new(label: &str, mode: &str) -> Self {
        let sandbox = Sandbox::new(label);
        let container = Container::new(&sandbox, label);
        let scratch = Scratch::new(&format!("sockets-{label}"));
        let policy = scratch.write("policy.yaml", &policy(&container.class_written(), mode));
        Self {
            container,
            sandbox,
            policy,
            _scratch: scratch,
        }
    }

    /// The class's cgroup, for `--socket-ring`: the ring covers the container, and a
    /// link a failed run leaves behind cannot reach other tests' processes.
    fn class_cgroup(&self) -> String {
        self.container
            .class_cgroup
            .to_str()
            .expect("a UTF-8 path")
            .to_owned()
    }
}

/// The cgroup2 root, for `--socket-ring`.
fn cgroup_root() -> String {
    datafence::cgroups::cgroup2_root()
        .to_str()
        .expect("a UTF-8 path")
        .to_owned()
}

/// The tests that need the socket ring attached (every kernel of the matrix runs it).
mod attached {
    use super::*;

    /// The calls a container's process makes to the denied region: TCP and UDP connects
    /// over both families, and one to an IPv4-mapped IPv6 address, which the kernel sends
    /// as IPv4; and unconnected UDP sends over both families.
    const DENIED_CONNECTS: [(&str, &str, u16); 4] = [
        ("tcp_connect", addr::US_V4, 443),
        ("tcp_connect", addr::US_V6, 443),
        ("tcp_connect", "::ffff:203.0.113.10", 443),
        ("udp_connect", addr::US_V4, 7000),
    ];
    const DENIED_SENDS: [(&str, &str, u16); 2] = [
        ("udp_sendto", addr::US_V4, 7000),
        ("udp_sendto", addr::US_V6, 7000),
    ];

    #[test]
    fn a_container_process_cannot_reach_a_denied_region_and_is_named() {
        require_root();
        let ContainerSetup {
            container,
            sandbox,
            policy: path,
            ..
        } = &ContainerSetup::new("sk", "enforce");
        let denied: Vec<_> = DENIED_CONNECTS
            .iter()
            .chain(&DENIED_SENDS)
            .copied()
            .collect();

        // Before the agent: no call is refused, and forwarded user data leaves unjudged.
        let (_, before) = container.calls(&denied);
        assert!(!before.contains(&EPERM), "before the agent: {before:?}");
        assert_eq!(
            container.udp_delivered(sandbox, addr::US_V4, 7001, 5),
            (5, vec![0; 5])
        );

        let agent = RunningAgent::start(&sandbox.host, path, &["--socket-ring", &cgroup_root()]);
        assert_eq!(agent.status_json()["socket_ring"]["state"], "attached");
        let (pid, errnos) = container.calls(&denied);
        assert_eq!(
            errnos,
            vec![EPERM; denied.len()],
            "every call to us-east fails with EPERM, the IPv4-mapped one included: {denied:?}\n{}",
            agent.stderr()
        );
        assert_eq!(
            container.udp_delivered(sandbox, addr::US_V4, 7002, 5),
            (0, vec![EPERM; 5])
        );
        // The approved region, over both families.
        assert_eq!(
            container.udp_delivered(sandbox, addr::EU_V4, 7003, 5),
            (5, vec![0; 5])
        );
        assert_eq!(
            container.udp_delivered(sandbox, addr::EU_V6, 7004, 5),
            (5, vec![0; 5])
        );
        let (_, connects) = container.calls(&[("udp_connect", addr::EU_V4, 7005)]);
        assert_eq!(connects, vec![0]);

        // Counted by hook: the four connects and the two sends of the first process, and
        // the five sends after it.
        let deny = |hook| agent.packets(&[("hook", hook), ("verdict", "deny")]);
        assert_eq!(
            deny("sock_connect"),
            4,
            "{:#}",
            agent.status_json()["counters"]
        );
        assert_eq!(deny("sock_sendmsg"), 2 + 5);
        assert_eq!(
            agent.packets(&[("hook", "sock_sendmsg"), ("reason", "region_allowed")]),
            10
        );

        // Each refusal of the first process is reported with who made it.
        let cgroup = format!("{}/ctr", container.class_written());
        let deadline = Instant::now() + patience(Duration::from_secs(10));
        let lines = loop {
            let lines: Vec<serde_json::Value> = agent
                .violations()
                .into_iter()
                .filter(|v| v["pid"] == pid)
                .collect();
            if lines.len() >= denied.len() || Instant::now() > deadline {
                break lines;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(lines.len(), denied.len(), "{lines:#?}\n{}", agent.stdout());
        for line in &lines {
            assert_eq!(line["comm"], "python3", "{line}");
            assert_eq!(line["cgroup"], cgroup.as_str(), "{line}");
            assert_eq!(line["netns"], "container", "{line}");
            assert_eq!(line["region"], "us-east", "{line}");
            assert_eq!(line["verdict"], "deny", "{line}");
            assert!(
                line["netns_cookie"].as_u64().is_some_and(|c| c != 0),
                "{line}"
            );
        }
        let hooks = |hook| lines.iter().filter(|l| l["hook"] == hook).count();
        assert_eq!((hooks("sock_connect"), hooks("sock_sendmsg")), (4, 2));
        let mapped = lines
            .iter()
            .filter(|l| l["hook"] == "sock_connect" && l["dst"] == addr::US_V4)
            .count();
        assert_eq!(
            mapped, 3,
            "the IPv4-mapped connect is reported as IPv4: {lines:#?}"
        );
        agent.stop();
    }

    #[test]
    fn in_audit_mode_the_calls_succeed_and_are_reported() {
        require_root();
        let ContainerSetup {
            container,
            sandbox,
            policy: path,
            ..
        } = &ContainerSetup::new("ska", "audit");
        let agent = RunningAgent::start(&sandbox.host, path, &["--socket-ring", &cgroup_root()]);
        assert_eq!(
            container.udp_delivered(sandbox, addr::US_V4, 7011, 5),
            (5, vec![0; 5]),
            "{}",
            agent.stderr()
        );
        assert_eq!(
            agent.packets(&[("hook", "sock_sendmsg"), ("verdict", "audit")]),
            5
        );
        agent.stop();
    }

    /// A crash leaves the socket ring enforcing, and the next agent adopts its links: every
    /// call in between is refused, and no second set of links is attached.
    #[test]
    fn the_socket_ring_outlives_a_crash_and_is_adopted() {
        require_root();
        let setup = ContainerSetup::new("skr", "enforce");
        let (sandbox, container, path) = (&setup.sandbox, &setup.container, &setup.policy);
        let at = setup.class_cgroup();
        let pins = integration_tests::agent::test_pin_dir("sockets-restart");
        let mut first = RunningAgent::start_with_pins(
            &sandbox.host,
            path,
            &["--socket-ring", &at],
            pins.clone(),
        );
        let denied = [("udp_connect", addr::US_V4, 7000)];
        assert_eq!(container.calls(&denied).1, vec![EPERM]);
        first.keep_pins = true;
        first.kill9();
        assert_eq!(
            container.calls(&denied).1,
            vec![EPERM],
            "with the agent dead, the pinned ring still refuses"
        );
        let socket_links = datafence::datapath::PinLayout::new(&pins).socket_links_dir();
        let links = || std::fs::read_dir(&socket_links).map_or(0, Iterator::count);
        assert_eq!(links(), 4);
        let second =
            RunningAgent::start_with_pins(&sandbox.host, path, &["--socket-ring", &at], pins);
        assert_eq!(second.status_json()["socket_ring"]["state"], "attached");
        let stderr = second.stderr();
        let attached = stderr
            .lines()
            .find(|l| l.contains("socket ring attached"))
            .unwrap_or_else(|| panic!("{stderr}"));
        // The pinned links were switched to the second agent's programs, not attached anew.
        assert!(attached.contains("true"), "{attached}");
        assert_eq!(links(), 4);
        assert_eq!(container.calls(&denied).1, vec![EPERM]);
        let (_, allowed) = container.calls(&[("udp_connect", addr::EU_V4, 7000)]);
        assert_eq!(allowed, vec![0]);
        second.stop();
    }

    /// A socket-ring link detached from outside datafence (as `bpftool link detach` does) is
    /// noticed at the next check and attached again.
    #[test]
    fn a_detached_socket_ring_is_attached_again() {
        require_root();
        let setup = ContainerSetup::new("skt", "enforce");
        let (sandbox, container, path) = (&setup.sandbox, &setup.container, &setup.policy);
        let at = setup.class_cgroup();
        let agent = RunningAgent::start(
            &sandbox.host,
            path,
            &["--socket-ring", &at, "--monitor-interval", "1"],
        );
        let denied = [("udp_connect", addr::US_V4, 7000)];
        assert_eq!(container.calls(&denied).1, vec![EPERM]);
        let pin = datafence::datapath::PinLayout::new(&agent.pin_dir)
            .socket_links_dir()
            .join("connect4");
        let link = aya::programs::links::FdLink::from(
            aya::programs::links::PinnedLink::from_pin(&pin).expect("the pinned connect4 link"),
        );
        let program = link.info().expect("link info").program_id();
        assert_eq!(integration_tests::detach_links_of_program(program), 1);
        let deadline = Instant::now() + patience(Duration::from_secs(10));
        while !agent.stderr().contains("socket ring was detached") {
            assert!(Instant::now() < deadline, "{}", agent.stderr());
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(container.calls(&denied).1, vec![EPERM]);
        assert_eq!(agent.status_json()["socket_ring"]["state"], "attached");
        agent.stop();
    }
}
