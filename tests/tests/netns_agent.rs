//! The real `datafence` binary enforcing in a namespace sandbox: classes chosen by mark,
//! port and cgroup; audit mode; reload under live traffic; the CLI against the agent.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::Duration,
};

use integration_tests::{
    Scratch, TestCgroup,
    agent::RunningAgent,
    netns::{
        Sandbox, addr, tcp_connects, udp_delivered, udp_delivered_from_cgroup, udp_delivered_marked,
    },
    patience, require_root,
};

fn policy_text(mode: &str, cgroup: &str, us_allowed: bool) -> String {
    let allow = if us_allowed {
        "[eu-west, us-east]"
    } else {
        "[eu-west]"
    };
    format!(
        r#"
version: 1
mode: {mode}
interfaces:
  egress: [up0]
exempt: [192.0.2.2/32]
regions:
  eu-west:
    cidrs: ["2001:db8:100::/48"]
    files: [regions/eu-west.txt]
  us-east:
    cidrs: [203.0.113.0/24, "2001:db8:300::/48"]
data_classes:
  marked:
    match:
      marks: [{{value: 0x42}}]
    allow: {allow}
  database:
    match:
      protocols: [tcp]
      dst_ports: [5432]
    allow: {allow}
  api-service:
    match:
      cgroups: [{cgroup}]
    allow: {allow}
"#
    )
}

fn write_policy(scratch: &Scratch, mode: &str, cgroup: &str, us_allowed: bool) -> PathBuf {
    scratch.write(
        "regions/eu-west.txt",
        "# EU data centres\n198.51.100.0/24\n",
    );
    scratch.write("policy.yaml", &policy_text(mode, cgroup, us_allowed))
}

#[test]
fn agent_separates_user_data_by_mark_port_and_cgroup() {
    require_root();
    let sandbox = Sandbox::new("ag");
    let cgroup = TestCgroup::new("sep");
    let scratch = Scratch::new("sep");
    let policy = write_policy(&scratch, "enforce", &cgroup.path, false);
    let agent = RunningAgent::start(&sandbox.host, &policy, &[]);

    for (us, eu) in [(addr::US_V4, addr::EU_V4), (addr::US_V6, addr::EU_V6)] {
        // Marked traffic is user data: blocked to us-east, allowed to eu-west.
        assert_eq!(
            udp_delivered_marked(&sandbox, us, 7000, 10, 0x42),
            0,
            "marked to {us}"
        );
        assert_eq!(
            udp_delivered_marked(&sandbox, eu, 7000, 10, 0x42),
            10,
            "marked to {eu}"
        );
        // Unmarked UDP is not user data and flows anywhere.
        assert_eq!(
            udp_delivered(&sandbox, us, 7000, 10),
            10,
            "unmarked to {us}"
        );
        // The database port is user data.
        assert!(!tcp_connects(&sandbox, us, 5432), "tcp/5432 to {us}");
        assert!(tcp_connects(&sandbox, eu, 5432), "tcp/5432 to {eu}");
        assert!(tcp_connects(&sandbox, us, 8080), "tcp/8080 to {us}");
        // A process in the api-service cgroup sends user data.
        assert_eq!(
            udp_delivered_from_cgroup(&sandbox, &cgroup.procs(), us, 7001, 10),
            0
        );
        assert_eq!(
            udp_delivered_from_cgroup(&sandbox, &cgroup.procs(), eu, 7001, 10),
            10
        );
    }

    let denied_marked = agent.packets(&[
        ("class", "marked"),
        ("region", "us-east"),
        ("verdict", "deny"),
    ]);
    assert_eq!(
        denied_marked, 20,
        "10 marked datagrams per family were dropped"
    );
    let denied_cgroup = agent.packets(&[
        ("class", "api-service"),
        ("region", "us-east"),
        ("verdict", "deny"),
    ]);
    assert_eq!(denied_cgroup, 20);
    let status = agent.status_json();
    assert_eq!(status["attachments"][0]["interface"], "up0");
    assert_eq!(status["attachments"][0]["hook"], "tc_egress");
    assert_eq!(status["policy"]["version"], 1);
    assert_eq!(status["policy"]["sha256"].as_str().map(str::len), Some(64));

    // Violations are reported with who, where and why.
    std::thread::sleep(Duration::from_millis(300));
    let lines = agent.violations();
    let from_cgroup = lines
        .iter()
        .find(|l| l["class"] == "api-service")
        .unwrap_or_else(|| panic!("no api-service violation in {lines:?}"));
    assert_eq!(from_cgroup["cgroup"], cgroup.path.as_str());
    assert_eq!(from_cgroup["region"], "us-east");
    assert_eq!(from_cgroup["verdict"], "deny");
    assert_eq!(from_cgroup["reason"], "region_denied");
    assert_eq!(from_cgroup["interface"], "up0");
    assert_eq!(from_cgroup["dst_port"], 7001);
    agent.stop();
}

#[test]
fn audit_mode_lets_traffic_pass_and_counts_it() {
    require_root();
    let sandbox = Sandbox::new("au");
    let scratch = Scratch::new("audit");
    let cgroup = TestCgroup::new("audit");
    let policy = write_policy(&scratch, "audit", &cgroup.path, false);
    let agent = RunningAgent::start(&sandbox.host, &policy, &[]);
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7000, 15, 0x42),
        15
    );
    assert_eq!(
        agent.packets(&[
            ("class", "marked"),
            ("region", "us-east"),
            ("verdict", "audit")
        ]),
        15
    );
    assert_eq!(agent.packets(&[("verdict", "deny")]), 0);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        agent
            .violations()
            .iter()
            .any(|l| l["verdict"] == "audit" && l["class"] == "marked"),
        "an audit hit is reported"
    );
    agent.stop();
}

#[test]
fn reload_switches_behaviour_under_live_traffic_and_refuses_bad_policies() {
    require_root();
    let sandbox = Arc::new(Sandbox::new("rl"));
    let scratch = Scratch::new("reload");
    let cgroup = TestCgroup::new("reload");
    let policy = write_policy(&scratch, "enforce", &cgroup.path, false);
    let agent = RunningAgent::start(&sandbox.host, &policy, &[]);

    // Live traffic throughout: marked datagrams to us-east, counted by the receiver.
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU32::new(0));
    let traffic = {
        let (sandbox, stop, received) = (sandbox.clone(), stop.clone(), received.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let got = udp_delivered_marked(&sandbox, addr::US_V4, 7100, 5, 0x42);
                received.fetch_add(got, Ordering::Relaxed);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        received.load(Ordering::Relaxed),
        0,
        "blocked before the reload"
    );

    // A bad policy is refused and changes nothing.
    std::fs::write(&policy, "version: 1\nregions: [not a map\n").expect("write");
    let out = agent.cli(&["reload"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("policy.yaml:"), "error names the file: {err}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        received.load(Ordering::Relaxed),
        0,
        "still blocked after a refused reload"
    );

    // A good policy that approves us-east takes effect at once.
    std::fs::write(&policy, policy_text("enforce", &cgroup.path, true)).expect("write");
    let out = agent.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::thread::sleep(patience(Duration::from_millis(800)));
    let after_open = received.load(Ordering::Relaxed);
    assert!(after_open > 0, "traffic flows after the reload");

    // SIGHUP reloads too: back to the strict policy.
    std::fs::write(&policy, policy_text("enforce", &cgroup.path, false)).expect("write");
    // SAFETY: kill with a valid pid and signal.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGHUP) };
    // Time for the reload to land; the next 800 ms then measure that nothing gets through.
    std::thread::sleep(patience(Duration::from_millis(800)));
    let settled = received.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        received.load(Ordering::Relaxed),
        settled,
        "blocked again after SIGHUP"
    );
    stop.store(true, Ordering::Relaxed);
    traffic.join().expect("traffic thread");
    let generation = agent.status_json()["policy"]["generation"].as_u64();
    assert_eq!(
        generation,
        Some(3),
        "initial load plus two accepted reloads"
    );
    agent.stop();
}

#[test]
fn explain_answers_from_the_agent_and_from_a_file_and_the_kernel_agrees() {
    require_root();
    let sandbox = Sandbox::new("ex");
    let scratch = Scratch::new("explain");
    let cgroup = TestCgroup::new("explain");
    let policy = write_policy(&scratch, "enforce", &cgroup.path, false);
    let agent = RunningAgent::start(&sandbox.host, &policy, &[]);
    let policy_arg = policy.to_str().expect("utf-8");
    for source in [vec![], vec!["--policy", policy_arg]] {
        for datapath in [false, true] {
            let mut args = vec!["explain", "--json", "--mark", "0x42", "--proto", "udp"];
            args.extend(source.iter().copied());
            if datapath {
                args.push("--datapath");
            }
            args.extend([addr::US_V4, addr::EU_V6, "192.0.2.2", "192.0.2.77"]);
            let out = agent.cli(&args);
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let answers: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(|l| serde_json::from_str(l).expect("json line"))
                .collect();
            let brief: Vec<(String, String, String, String)> = answers
                .iter()
                .map(|a| {
                    (
                        a["address"].as_str().unwrap_or_default().to_owned(),
                        a["verdict"].as_str().unwrap_or_default().to_owned(),
                        a["region"].as_str().unwrap_or("-").to_owned(),
                        a["reason"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect();
            let expected = [
                (addr::US_V4, "deny", "us-east", "region_denied"),
                (addr::EU_V6, "allow", "eu-west", "region_allowed"),
                ("192.0.2.2", "allow", "-", "exempt_policy"),
                ("192.0.2.77", "deny", "-", "unknown_denied"),
            ];
            let expected: Vec<_> = expected
                .iter()
                .map(|(a, v, r, why)| {
                    (a.to_string(), v.to_string(), r.to_string(), why.to_string())
                })
                .collect();
            assert_eq!(brief, expected, "{args:?}");
            for a in &answers {
                for key in ["address", "region", "class", "verdict", "mode", "reason"] {
                    assert!(a.get(key).is_some(), "{key} missing in {a}");
                }
            }
        }
    }
    agent.stop();
}

/// `explain --datapath` through the agent: the kernel gives a test packet the cgroup of
/// the process that runs it, so the agent runs it in the cgroup asked about (or the
/// caller's), not its own. Before, the kernel judged every such packet in the agent's
/// cgroup and disagreed with userspace about a class selected by cgroup.
#[test]
fn explain_datapath_through_the_agent_runs_the_packet_in_the_cgroup_asked_about() {
    require_root();
    let sandbox = Sandbox::new("ec");
    let scratch = Scratch::new("explain-cgroup");
    let service = TestCgroup::new("explain-svc");
    let agent_home = TestCgroup::new("explain-agent");
    let policy = write_policy(&scratch, "enforce", &service.path, false);
    let agent = RunningAgent::start(&sandbox.host, &policy, &[]);
    // The agent in a cgroup of its own, which selects no class.
    std::fs::write(agent_home.procs(), agent.child.id().to_string()).expect("move the agent");

    let explain = |cgroup: Option<&str>, in_cgroup: Option<&TestCgroup>| {
        let mut cmd =
            integration_tests::netns::command_in(&agent.netns, integration_tests::agent_binary());
        cmd.arg("--runtime-dir").arg(&agent.runtime_dir).args([
            "explain",
            "--json",
            "--datapath",
            "--proto",
            "udp",
        ]);
        if let Some(cgroup) = cgroup {
            cmd.args(["--cgroup", cgroup]);
        }
        cmd.arg(addr::US_V4);
        if let Some(home) = in_cgroup {
            datafence::cgroups::spawn_in_cgroup(&mut cmd, &home.procs()).expect("cgroup");
        }
        let out = cmd.output().expect("run datafence explain");
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let answer = serde_json::from_slice::<serde_json::Value>(&out.stdout).ok();
        (out.status.success(), answer, stderr)
    };
    let brief = |answer: &serde_json::Value| {
        [
            answer["verdict"].as_str().unwrap_or_default().to_owned(),
            answer["class"].as_str().unwrap_or("-").to_owned(),
            answer["reason"].as_str().unwrap_or_default().to_owned(),
        ]
    };
    let denied = ["deny", "api-service", "region_denied"];
    let unclassified = ["allow", "-", "unclassified"];
    let cases = [
        (
            "--cgroup of the class",
            Some(service.path.as_str()),
            None,
            denied,
        ),
        (
            "--cgroup of the agent",
            Some(agent_home.path.as_str()),
            None,
            unclassified,
        ),
        // No --cgroup: the caller's cgroup, whatever the agent's.
        ("the caller's cgroup", None, None, unclassified),
        (
            "the caller's cgroup, the class's",
            None,
            Some(&service),
            denied,
        ),
    ];
    for (what, cgroup, caller_in, want) in cases {
        let (ok, answer, stderr) = explain(cgroup, caller_in);
        assert!(ok, "{what}: the kernel and userspace must agree: {stderr}");
        let answer = answer.unwrap_or_else(|| panic!("{what}: no JSON answer: {stderr}"));
        assert_eq!(brief(&answer), want.map(str::to_owned), "{what}: {answer}");
    }
    // The pin the agent's child opened is gone.
    let left: Vec<_> = std::fs::read_dir(&agent.pin_dir)
        .expect("pin dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("explain-"))
        .collect();
    assert!(left.is_empty(), "test-run pins left behind: {left:?}");

    // A cgroup that does not exist, or a path that climbs out of the hierarchy, is an
    // error that names it.
    let missing = format!("/datafence-test-no-such-cgroup-{}", std::process::id());
    let climbing = format!("{}/../..", service.path);
    for bad in [missing.as_str(), climbing.as_str()] {
        let (ok, _, stderr) = explain(Some(bad), None);
        assert!(!ok, "--cgroup {bad} was accepted");
        assert!(stderr.contains(&format!("cgroup {bad}")), "{bad}: {stderr}");
    }
    agent.stop();
}

/// The cgroup hierarchy mounted read-only at a directory of its own, as systemd's
/// `ProtectControlGroups=yes` shows it to the agent; unmounted on drop.
struct ReadOnlyCgroupView(PathBuf);

impl ReadOnlyCgroupView {
    fn new() -> Self {
        // Not in a scratch directory, which is removed recursively: never recurse into
        // the hierarchy.
        let dir = std::env::temp_dir().join(format!("datafence-ro-cgroup-{}", std::process::id()));
        let _ = std::fs::create_dir(&dir);
        let root = datafence::cgroups::cgroup2_root();
        for args in [
            vec![
                "--bind".to_owned(),
                root.display().to_string(),
                dir.display().to_string(),
            ],
            vec![
                "-o".to_owned(),
                "remount,bind,ro".to_owned(),
                dir.display().to_string(),
            ],
        ] {
            let out = std::process::Command::new("mount")
                .args(&args)
                .output()
                .expect("mount");
            assert!(
                out.status.success(),
                "mount {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Self(dir)
    }
}

impl Drop for ReadOnlyCgroupView {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .output();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Under `ProtectControlGroups=yes` the agent cannot write any `cgroup.procs`; its
/// test-run child still starts in the cgroup asked about, placed there by the kernel at
/// clone (CLONE_INTO_CGROUP), which checks the cgroup and not the mount.
#[test]
fn explain_datapath_through_an_agent_that_sees_cgroups_read_only() {
    require_root();
    let sandbox = Sandbox::new("er");
    let scratch = Scratch::new("explain-ro-cgroup");
    let service = TestCgroup::new("explain-ro-svc");
    let view = ReadOnlyCgroupView::new();
    // Writing into the view is what the agent cannot do.
    let err = std::fs::write(
        view.0
            .join(service.path.trim_start_matches('/'))
            .join("cgroup.procs"),
        "0",
    )
    .expect_err("the view is read-only");
    assert_eq!(err.raw_os_error(), Some(libc::EROFS), "{err}");
    let policy = write_policy(&scratch, "enforce", &service.path, false);
    let root = view.0.display().to_string();
    let agent = RunningAgent::start(&sandbox.host, &policy, &["--cgroup-root", &root]);
    let out = integration_tests::netns::command_in(&agent.netns, integration_tests::agent_binary())
        .arg("--runtime-dir")
        .arg(&agent.runtime_dir)
        .args([
            "explain",
            "--json",
            "--datapath",
            "--proto",
            "udp",
            "--cgroup",
            &service.path,
        ])
        .arg(addr::US_V4)
        .output()
        .expect("run datafence explain");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the kernel and userspace must agree: {stderr}"
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON answer");
    assert_eq!(
        (
            answer["verdict"].as_str(),
            answer["class"].as_str(),
            answer["reason"].as_str()
        ),
        (Some("deny"), Some("api-service"), Some("region_denied")),
        "{answer}"
    );
    agent.stop();
}

#[test]
fn unknown_interface_is_refused_by_name() {
    require_root();
    let sandbox = Sandbox::new("if");
    let scratch = Scratch::new("iface");
    let cgroup = TestCgroup::new("iface");
    let policy = write_policy(&scratch, "enforce", &cgroup.path, false);
    let out = sandbox
        .host
        .command(integration_tests::agent_binary())
        .arg("--runtime-dir")
        .arg(scratch.dir.join("run"))
        .args(["run", "--policy"])
        .arg(&policy)
        .args(["--interface", "nosuch0"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("interface nosuch0 does not exist"), "{err}");
}

#[test]
fn changes_to_the_policy_files_are_reloaded_and_other_files_ignored() {
    require_root();
    let sandbox = Sandbox::new("wt");
    let scratch = Scratch::new("watch");
    let cgroup = TestCgroup::new("watch");
    let policy = write_policy(&scratch, "enforce", &cgroup.path, false);
    let agent = RunningAgent::start(&sandbox.host, &policy, &[]);
    let generation = || agent.status_json()["policy"]["generation"].as_u64();
    let wait_for = |want: u64| {
        let deadline = std::time::Instant::now() + patience(Duration::from_secs(5));
        while generation() != Some(want) {
            assert!(
                std::time::Instant::now() < deadline,
                "generation stayed {:?}, want {want}",
                generation()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    assert_eq!(generation(), Some(1));
    // A log next to the policy changes all the time; it is not part of the policy.
    for i in 0..5 {
        scratch.write("agent.log", &format!("line {i}\n"));
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(generation(), Some(1), "an unrelated file caused a reload");
    // A region file is part of it.
    scratch.write("regions/eu-west.txt", "198.51.100.0/24\n203.0.113.0/25\n");
    wait_for(2);
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7900, 5, 0x42),
        5,
        "us-east is eu-west now"
    );
    // So is the policy file itself, written in two steps as an editor might.
    std::fs::write(&policy, "version: 1\nregions:\n").expect("write");
    std::fs::write(&policy, policy_text("enforce", &cgroup.path, true)).expect("write");
    wait_for(3);
    // A region file outside the policy's directory, in a directory `include_dirs` lists,
    // is watched as well.
    let shared = Scratch::new("watch-shared");
    shared.write("elsewhere.txt", "198.18.0.0/24\n");
    let with_include = policy_text("enforce", &cgroup.path, true)
        .replace(
            "regions:\n",
            &format!("include_dirs: [{}]\nregions:\n", shared.dir.display()),
        )
        .replace(
            "  us-east:\n",
            &format!(
                "  elsewhere:\n    files: [{}]\n  us-east:\n",
                shared.dir.join("elsewhere.txt").display()
            ),
        );
    std::fs::write(&policy, with_include).expect("write");
    wait_for(4);
    let deadline = std::time::Instant::now() + patience(Duration::from_secs(5));
    while !agent
        .stderr()
        .contains("watching an included directory for changes")
    {
        assert!(std::time::Instant::now() < deadline, "{}", agent.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    shared.write("elsewhere.txt", "198.18.0.0/24\n198.18.1.0/24\n");
    wait_for(5);
    // A policy naming a new region file with a mistake in it is refused. The fix lands
    // in that file, which the last good policy does not read: it is reloaded too.
    scratch.write("regions/late.txt", "198.18.2.0/33\n");
    let current = std::fs::read_to_string(&policy).expect("read the policy");
    std::fs::write(
        &policy,
        current.replace(
            "  us-east:\n",
            "  late:\n    files: [regions/late.txt]\n  us-east:\n",
        ),
    )
    .expect("write");
    let deadline = std::time::Instant::now() + patience(Duration::from_secs(5));
    while !agent.stderr().contains("late.txt:1:") {
        assert!(std::time::Instant::now() < deadline, "{}", agent.stderr());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(generation(), Some(5), "the refused policy is not in force");
    scratch.write("regions/late.txt", "198.18.2.0/24\n");
    wait_for(6);
    agent.stop();
}

/// The port the stand-in for sshd listens on, given to the agent with `--ssh-port`.
const SSH_PORT: u16 = 2222;

/// A policy whose one class, `user-data`, takes every TCP segment the host sends from
/// its uplink address (the replies of a session to the host among them) and may reach
/// eu-west only. The sandbox's peer, 192.0.2.2, is in no region: `unknown` decides it.
fn session_policy(unknown: &str, exempt: &str) -> String {
    format!(
        r"
version: 1
interfaces:
  egress: [up0]
exempt: [{exempt}]
regions:
  eu-west:
    cidrs: [198.51.100.0/24]
data_classes:
  user-data:
    match:
      protocols: [tcp]
      src_cidrs: [192.0.2.1/32]
    allow: [eu-west]
    unknown: {unknown}
"
    )
}

/// An established TCP session from the world namespace to a dual-stack listener of the
/// host's (so the host's kernel lists it in `tcp6`, with IPv4-mapped addresses), as an
/// SSH session to sshd would be. Returns the client's and the host's ends.
fn open_session(sandbox: &Sandbox) -> (std::net::TcpStream, std::net::TcpStream) {
    let listener = sandbox
        .host
        .run(|| std::net::TcpListener::bind(("::", SSH_PORT)).expect("bind the stand-in for sshd"));
    let client = sandbox.world.run(|| {
        std::net::TcpStream::connect_timeout(
            &format!("{}:{SSH_PORT}", addr::HOST_V4)
                .parse()
                .expect("addr"),
            Duration::from_secs(2),
        )
        .expect("connect to the stand-in for sshd")
    });
    let (server, _) = listener.accept().expect("accept");
    for end in [&client, &server] {
        end.set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
    }
    (client, server)
}

/// Whether the session still carries a line each way.
fn session_carries_data(
    client: &mut std::net::TcpStream,
    server: &mut std::net::TcpStream,
) -> bool {
    use std::io::{Read as _, Write as _};
    let mut got = [0u8; 4];
    client.write_all(b"ping").is_ok()
        && server.read_exact(&mut got).is_ok()
        && &got == b"ping"
        && server.write_all(b"pong").is_ok()
        && client.read_exact(&mut got).is_ok()
        && &got == b"pong"
}

#[test]
fn a_policy_that_would_cut_an_established_ssh_session_is_refused_at_every_reload() {
    require_root();
    let sandbox = Sandbox::new("ss");
    let scratch = Scratch::new("ssh-session");
    let policy = scratch.write("policy.yaml", &session_policy("allow", ""));
    let agent = RunningAgent::start(
        &sandbox.host,
        &policy,
        &["--ssh-port", &SSH_PORT.to_string()],
    );
    let generation = || agent.status_json()["policy"]["generation"].as_u64();
    assert_eq!(generation(), Some(1));
    let (mut client, mut server) = open_session(&sandbox);
    assert!(session_carries_data(&mut client, &mut server));
    let ends = format!(
        "from {}:{} to {}:{SSH_PORT}",
        addr::WORLD_V4,
        client.local_addr().expect("client address").port(),
        addr::HOST_V4
    );
    let session = format!("SSH session {ends}");
    let named = |text: &str| {
        text.contains("refusing policy")
            && text.contains(&policy.display().to_string())
            && text.contains(&session)
            && text.contains(&format!("pid {}", std::process::id()))
            && text.contains("class user-data, region none: unknown_denied")
    };
    let refusals = || agent.stderr().matches("refusing policy").count();
    let wait_for_refusals = |want: usize| {
        let deadline = std::time::Instant::now() + patience(Duration::from_secs(5));
        while refusals() < want {
            assert!(
                std::time::Instant::now() < deadline,
                "no refusal {want}:\n{}",
                agent.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    // The policy that denies the session's replies: 192.0.2.2 is in no region.
    let cutting = session_policy("deny", "");

    // At start: a second agent on the host with that policy exits at once, naming it.
    let other = scratch.write("other/policy.yaml", &cutting);
    let out = datafence_test_support::output_within(
        sandbox
            .host
            .command(integration_tests::agent_binary())
            .arg("--runtime-dir")
            .arg(scratch.dir.join("other/run"))
            .args(["run", "--no-pin", "--socket-ring", "off", "--policy"])
            .arg(&other)
            .args(["--ssh-port", &SSH_PORT.to_string()]),
        patience(Duration::from_secs(30)),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains(&session), "{err}");

    // The file watcher: the reload is refused and the policy in force stays.
    std::fs::write(&policy, &cutting).expect("write");
    wait_for_refusals(1);
    assert!(named(&agent.stderr()), "{}", agent.stderr());
    assert_eq!(generation(), Some(1));
    assert!(
        session_carries_data(&mut client, &mut server),
        "the session is cut:\n{}",
        agent.stderr()
    );

    // SIGHUP: the same.
    // SAFETY: kill with a valid pid and signal.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGHUP) };
    wait_for_refusals(2);
    assert_eq!(generation(), Some(1));
    assert!(session_carries_data(&mut client, &mut server));

    // `datafence reload`, which sends no address of its own: refused, and told why.
    let out = agent.cli(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(named(&err), "{err}");
    assert_eq!(generation(), Some(1));

    // The same policy with the client's network exempt cuts nothing: accepted.
    std::fs::write(&policy, session_policy("deny", "192.0.2.2/32")).expect("write");
    let deadline = std::time::Instant::now() + patience(Duration::from_secs(5));
    while generation() != Some(2) {
        assert!(
            std::time::Instant::now() < deadline,
            "not reloaded:\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(session_carries_data(&mut client, &mut server));
    agent.stop();

    // --allow-lockout-risk takes the cutting policy anyway, naming the session in a
    // warning; and the session's replies are then dropped, as the refusals said.
    let agent = RunningAgent::start(
        &sandbox.host,
        &other,
        &["--ssh-port", &SSH_PORT.to_string(), "--allow-lockout-risk"],
    );
    let log = agent.stderr();
    assert!(
        log.contains("accepted with --allow-lockout-risk") && log.contains(&ends),
        "{log}"
    );
    assert!(
        !session_carries_data(&mut client, &mut server),
        "the replies still flow"
    );
    agent.stop();
}

/// A gateway policy whose one class takes the client's TCP (192.0.2.2, in no region) and
/// denies destinations in no region, with `{exempt}` exempt. XDP on `up0` judges the
/// client's packets as they arrive, by this host's own address, 192.0.2.1: in no region.
fn gateway_session_policy(exempt: &str) -> String {
    format!(
        r"
version: 1
interfaces:
  egress: [up0]
  gateway: [up0]
exempt: [{exempt}]
regions:
  eu-west:
    cidrs: [198.51.100.0/24]
data_classes:
  clients:
    match:
      protocols: [tcp]
      src_cidrs: [192.0.2.2/32]
    allow: [eu-west]
    unknown: deny
"
    )
}

/// A gateway interface's XDP program judges packets by their destination as they
/// arrive, and an SSH session's packets go to this host's own address, in no region here.
/// A class that takes the client's TCP, with `unknown: deny`, dropped them, so such a
/// policy was refused. Packets to the host's own addresses now pass XDP
/// (`local_destination`): the policy is taken, at start and at a reload, and sessions
/// old and new carry data.
#[test]
fn a_gateway_policy_keeps_ssh_sessions_to_the_host() {
    require_root();
    let sandbox = Sandbox::new("gs");
    let scratch = Scratch::new("gateway-session");
    let (mut client, mut server) = open_session(&sandbox);
    let policy = scratch.write("policy.yaml", &gateway_session_policy(""));
    let agent = RunningAgent::start(
        &sandbox.host,
        &policy,
        &["--no-watch", "--ssh-port", &SSH_PORT.to_string()],
    );
    let status = agent.status_json();
    assert!(
        status["attachments"]
            .as_array()
            .expect("attachments")
            .iter()
            .any(|a| a["interface"] == "up0" && a["hook"] == "xdp"),
        "{status}"
    );
    assert!(
        session_carries_data(&mut client, &mut server),
        "a session established before the agent started"
    );
    let (mut client, mut server) = open_session(&sandbox);
    assert!(
        session_carries_data(&mut client, &mut server),
        "a new session"
    );
    let local = agent.packets(&[("hook", "xdp"), ("reason", "local_destination")]);
    assert!(local >= 4, "packets passed as the host's own: {local}");
    // The lockout check takes the policy at a reload too.
    std::fs::write(&policy, gateway_session_policy("") + "# again\n").expect("write");
    let out = agent.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(session_carries_data(&mut client, &mut server));
    agent.stop();
}
