//! The agent needs exactly the capabilities deploy/systemd/datafence.service grants it:
//! CAP_BPF, CAP_NET_ADMIN, CAP_PERFMON and CAP_SYS_RESOURCE, as uid 0 with nothing
//! else (no CAP_SYS_ADMIN, no CAP_DAC_OVERRIDE). The real binary runs under `setpriv`
//! with that bounding, inheritable and ambient set, in a sandbox namespace, and must
//! load, attach, enforce, report, reload, explain and stop without anything more.
//! The unit file itself is checked too: its privileges and sandboxing directives, and
//! `systemd-analyze verify` when systemd-analyze is installed.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    Scratch,
    agent::test_pin_dir,
    agent_binary,
    netns::{Sandbox, addr, command_in, udp_delivered_marked},
    patience, require_root,
};

/// Capability numbers from linux/capability.h.
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYS_RESOURCE: u32 = 24;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// The unit's set: (number, setpriv name, systemd name).
const GRANTED: [(u32, &str, &str); 4] = [
    (CAP_BPF, "bpf", "CAP_BPF"),
    (CAP_NET_ADMIN, "net_admin", "CAP_NET_ADMIN"),
    (CAP_PERFMON, "perfmon", "CAP_PERFMON"),
    (CAP_SYS_RESOURCE, "sys_resource", "CAP_SYS_RESOURCE"),
];

const MARK: u32 = 0x42;
const METRICS: &str = "127.0.0.1:9477";

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

const UNIT: &str = "deploy/systemd/datafence.service";

fn policy(extra_allow: &str) -> String {
    format!(
        r"
version: 1
interfaces:
  egress: [up0]
  gateway: [up0]
exempt: [192.0.2.2/32]
regions:
  eu-west:
    files: [regions/eu-west.txt]
  us-east:
    cidrs: [203.0.113.0/24]
data_classes:
  user-data:
    match:
      marks: [{{value: 0x42}}]
    allow: [eu-west{extra_allow}]
"
    )
}

/// A capability set line of /proc/<pid>/status, e.g. `CapEff:`.
fn cap_line(status: &str, name: &str) -> u64 {
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .unwrap_or_else(|| panic!("no {name} in:\n{status}"))
        .trim();
    u64::from_str_radix(hex, 16).unwrap_or_else(|e| panic!("{name} {hex:?}: {e}"))
}

fn names(mask: u64) -> Vec<u32> {
    (0..64).filter(|bit| mask & (1 << bit) != 0).collect()
}

/// bpffs must be mounted by the host: the agent, lacking CAP_SYS_ADMIN, cannot mount it
/// (systemd does at boot).
fn ensure_bpffs() {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    let mounted = mounts.lines().any(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.get(1) == Some(&"/sys/fs/bpf") && cols.get(2) == Some(&"bpf")
    });
    if !mounted {
        let out = Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .output()
            .expect("spawn mount");
        assert!(
            out.status.success(),
            "mounting bpffs: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The capabilities of the unit's set that this test process can hand on (its own
/// bounding set may lack some, e.g. CAP_SYS_RESOURCE in some containers), as a mask and
/// as a setpriv list. The three the agent cannot work without must all be there.
fn grantable() -> (u64, String) {
    let own = std::fs::read_to_string("/proc/self/status").expect("own status");
    let bounding = cap_line(&own, "CapBnd:");
    let mut mask = 0u64;
    let mut list = String::from("-all");
    for (bit, setpriv_name, name) in GRANTED {
        if bounding & (1 << bit) == 0 {
            assert_ne!(
                bit, CAP_BPF,
                "this test process lacks {name}: it cannot test the agent"
            );
            assert_ne!(bit, CAP_NET_ADMIN, "this test process lacks {name}");
            assert_ne!(bit, CAP_PERFMON, "this test process lacks {name}");
            eprintln!(
                "note: this test process has no {name} in its bounding set; the agent runs without it (so it is shown not to need it here)"
            );
            continue;
        }
        mask |= 1 << bit;
        list.push_str(",+");
        list.push_str(setpriv_name);
    }
    (mask, list)
}

fn setpriv() -> PathBuf {
    ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("setpriv (util-linux) is needed to run the agent with restricted capabilities")
}

/// `datafence run` as uid 0 with only the capabilities in `caps` (a setpriv list):
/// bounding, inheritable and ambient sets, and no_new_privs, as the unit sets them.
struct RestrictedAgent {
    child: Child,
    runtime_dir: PathBuf,
    netns: String,
    stderr_path: PathBuf,
    pin_dir: PathBuf,
    /// Leave the pins when dropped, for a restart to adopt.
    keep_pins: bool,
    _scratch: Scratch,
}

impl RestrictedAgent {
    fn spawn(sandbox: &Sandbox, caps: &str, policy: &Path, label: &str, tc_attach: &str) -> Self {
        Self::spawn_at(sandbox, caps, policy, label, tc_attach, test_pin_dir(label))
    }

    fn spawn_at(
        sandbox: &Sandbox,
        caps: &str,
        policy: &Path,
        label: &str,
        tc_attach: &str,
        pin_dir: PathBuf,
    ) -> Self {
        let scratch = Scratch::new(&format!("caps-{label}"));
        let runtime_dir = scratch.dir.join("run");
        let stderr_path = scratch.dir.join("stderr.log");
        let child = sandbox
            .host
            .command(setpriv())
            .args(["--nnp", "--bounding-set", caps, "--inh-caps", caps])
            .args(["--ambient-caps", caps, "--"])
            .arg(agent_binary())
            .arg("--runtime-dir")
            .arg(&runtime_dir)
            .arg("run")
            .arg("--policy")
            .arg(policy)
            .arg("--pin-dir")
            .arg(&pin_dir)
            .arg("--socket-ring")
            .arg(integration_tests::agent::test_socket_cgroup(&pin_dir))
            .args([
                "--metrics-addr",
                METRICS,
                "--monitor-interval",
                "1",
                "--no-watch",
                "--tc-attach",
                tc_attach,
            ])
            // The lockout check would count the SSH client this test may run under.
            .env_remove("SSH_CONNECTION")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
            .spawn()
            .expect("spawn setpriv datafence run");
        Self {
            child,
            runtime_dir,
            netns: sandbox.host.name.clone(),
            stderr_path,
            pin_dir,
            keep_pins: false,
            _scratch: scratch,
        }
    }

    /// Starts the agent and waits until its control socket answers.
    fn start(sandbox: &Sandbox, caps: &str, policy: &Path, label: &str, tc_attach: &str) -> Self {
        Self::start_at(sandbox, caps, policy, label, tc_attach, test_pin_dir(label))
    }

    /// Starts the agent on the pins in `pin_dir`, as a restart does.
    fn start_at(
        sandbox: &Sandbox,
        caps: &str,
        policy: &Path,
        label: &str,
        tc_attach: &str,
        pin_dir: PathBuf,
    ) -> Self {
        let mut agent = Self::spawn_at(sandbox, caps, policy, label, tc_attach, pin_dir);
        let deadline = Instant::now() + patience(Duration::from_secs(30));
        loop {
            if let Some(status) = agent.child.try_wait().expect("wait") {
                panic!(
                    "datafence run with only {caps} exited early with {status}:\n{}",
                    agent.stderr()
                );
            }
            if agent.cli(&["status", "--json"]).status.success() {
                return agent;
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready:\n{}",
                agent.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A `datafence` command against this agent, run by the test (fully privileged, as
    /// an operator's would be): only the agent itself is restricted.
    fn cli(&self, args: &[&str]) -> Output {
        command_in(&self.netns, agent_binary())
            .arg("--runtime-dir")
            .arg(&self.runtime_dir)
            .args(args)
            .env_remove("SSH_CONNECTION")
            .output()
            .expect("run datafence")
    }

    fn proc_status(&self) -> String {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("agent's /proc status")
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// SIGTERM, as `systemctl stop` sends; returns the exit status.
    fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill with the pid of our own child and a valid signal.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + patience(Duration::from_secs(10));
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "agent ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RestrictedAgent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if self.keep_pins {
            return;
        }
        let _ = datafence::datapath::PinLayout::new(&self.pin_dir).remove_all();
        let _ = integration_tests::remove_cgroup_when_empty(
            &integration_tests::agent::test_socket_cgroup(&self.pin_dir),
        );
    }
}

/// GET `path` from the agent's metrics listener inside the host namespace; returns
/// (status code, body).
fn http_get(sandbox: &Sandbox, path: &'static str) -> (u16, String) {
    sandbox.host.run(move || {
        let mut stream = TcpStream::connect(METRICS).expect("connect to the metrics address");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .expect("send request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read response");
        let code = response
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("bad HTTP response: {response:?}"));
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (code, body)
    })
}

/// Agent log lines that show it was refused something, or failed at something.
fn trouble(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| {
            let lower = l.to_ascii_lowercase();
            l.contains("ERROR")
                || lower.contains("operation not permitted")
                || lower.contains("permission denied")
                || lower.contains("eperm")
        })
        .collect()
}

integration_tests::for_each_tc_attach!(
    the_agent_runs_enforces_and_reloads_with_only_its_four_capabilities,
    the_attachment_self_check_works_without_cap_sys_admin,
);

fn the_agent_runs_enforces_and_reloads_with_only_its_four_capabilities(tc_attach: &str) {
    require_root();
    ensure_bpffs();
    let (mask, caps) = grantable();
    let sandbox = Sandbox::new("cap");
    let scratch = Scratch::new("caps-policy");
    scratch.write("regions/eu-west.txt", "198.51.100.0/24\n");
    let policy_path = scratch.write("policy.yaml", &policy(""));
    let mut agent = RestrictedAgent::start(&sandbox, &caps, &policy_path, "caps", tc_attach);

    // Exactly the granted set, in every set, as uid 0 with no_new_privs.
    let status = agent.proc_status();
    for set in ["CapEff:", "CapPrm:", "CapBnd:", "CapAmb:", "CapInh:"] {
        assert_eq!(
            cap_line(&status, set),
            mask,
            "{set} of the agent is {:?}, want {:?}",
            names(cap_line(&status, set)),
            names(mask)
        );
    }
    assert_eq!(
        cap_line(&status, "CapEff:") & (1 << CAP_SYS_ADMIN),
        0,
        "no CAP_SYS_ADMIN"
    );
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .expect("Uid line");
    assert_eq!(
        uid.split_whitespace().collect::<Vec<_>>(),
        ["0"; 4],
        "runs as uid 0"
    );
    assert!(
        status.lines().any(|l| l == "NoNewPrivs:\t1"),
        "no_new_privs set, as NoNewPrivileges=yes does"
    );

    // Enforcement: marked user data reaches eu-west, never us-east; unmarked traffic is
    // not user data and passes.
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7401, 20, MARK),
        0,
        "marked UDP to us-east must be dropped"
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::EU_V4, 7402, 20, MARK),
        20,
        "marked UDP to eu-west must be delivered"
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7403, 20, 0),
        20,
        "unmarked UDP is not user data"
    );

    // status: the agent reads its maps and reports what it attached.
    let out = agent.cli(&["status", "--json"]);
    assert!(
        out.status.success(),
        "status: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status json");
    let hooks: Vec<String> = s["attachments"]
        .as_array()
        .expect("attachments")
        .iter()
        .map(|a| {
            let kind = a["kind"].as_str().unwrap_or("?");
            if a["hook"] == "tc_egress" {
                assert_eq!(kind, tc_attach, "attached as asked: {a}");
            }
            format!(
                "{}/{}",
                a["interface"].as_str().unwrap_or("?"),
                a["hook"].as_str().unwrap_or("?")
            )
        })
        .collect();
    assert!(hooks.contains(&"up0/tc_egress".to_owned()), "{hooks:?}");
    assert!(hooks.contains(&"up0/xdp".to_owned()), "{hooks:?}");
    // The socket ring's cgroup programs load and attach with the same four.
    assert_eq!(
        s["socket_ring"]["state"], "attached",
        "{:#}",
        s["socket_ring"]
    );
    let denied: u64 = s["counters"]
        .as_array()
        .expect("counters")
        .iter()
        .filter(|r| r["verdict"] == "deny")
        .map(|r| r["packets"].as_u64().unwrap_or(0))
        .sum();
    assert!(denied >= 20, "the drops were counted: {denied}");
    let generation = s["policy"]["generation"].as_u64().expect("generation");

    // explain --datapath: the agent loads a fresh program and runs a crafted packet
    // through it (BPF_PROG_TEST_RUN), with the same capabilities.
    let out = agent.cli(&[
        "explain",
        "--datapath",
        "--json",
        "--mark",
        "0x42",
        "--proto",
        "udp",
        addr::US_V4,
    ]);
    assert!(
        out.status.success(),
        "explain --datapath: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e: serde_json::Value = serde_json::from_slice(&out.stdout).expect("explain json");
    assert_eq!(e["verdict"], "deny", "{e}");

    // `datafence reload`: the new policy allows us-east.
    scratch.write("policy.yaml", &policy(", us-east"));
    let out = agent.cli(&["reload"]);
    assert!(
        out.status.success(),
        "reload: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.stderr()
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7404, 20, MARK),
        20,
        "after the reload us-east is allowed"
    );

    // SIGHUP (the unit's ExecReload): back to the first policy.
    scratch.write("policy.yaml", &policy(""));
    // SAFETY: kill with our child's pid and a valid signal.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGHUP) };
    let deadline = Instant::now() + patience(Duration::from_secs(10));
    loop {
        let out = agent.cli(&["status", "--json"]);
        let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if s["policy"]["generation"].as_u64() == Some(generation + 2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP did not reload:\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7405, 20, MARK),
        0,
        "after SIGHUP us-east is denied again"
    );

    // Nothing was refused along the way.
    let log = agent.stderr();
    let bad = trouble(&log);
    assert!(
        bad.is_empty(),
        "the agent hit errors with only {caps}:\n{}",
        bad.join("\n")
    );

    // SIGTERM (systemctl stop): a clean exit, and enforcement stays pinned.
    let exit = agent.terminate();
    assert!(exit.success(), "exit status {exit}:\n{}", agent.stderr());
    assert!(
        datafence::datapath::PinLayout::new(&agent.pin_dir).exists(),
        "pins stay after SIGTERM"
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7406, 20, MARK),
        0,
        "enforcement outlives the stopped agent"
    );

    // A restart with the same capabilities adopts the pinned region tables: their slots'
    // arrays are opened from their pins (opening them by id needs CAP_SYS_ADMIN), so the
    // tables' arrays of maps, which the programs hold, stay the same kernel objects.
    let table = datafence::datapath::PinLayout::new(&agent.pin_dir)
        .map(datafence_common::map_names::V4_RANGES);
    let table_id = || {
        aya::maps::MapInfo::from_pin(&table)
            .expect("the pinned IPv4 range table")
            .id()
    };
    let before = table_id();
    agent.keep_pins = true;
    let pin_dir = agent.pin_dir.clone();
    drop(agent);
    let mut agent = RestrictedAgent::start_at(
        &sandbox,
        &caps,
        &policy_path,
        "caps-again",
        tc_attach,
        pin_dir,
    );
    assert_eq!(table_id(), before, "the restart adopted the tables");
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7407, 20, MARK),
        0,
        "the restarted agent enforces"
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::EU_V4, 7408, 20, MARK),
        20,
        "and lets user data reach eu-west"
    );
    let log = agent.stderr();
    let bad = trouble(&log);
    assert!(
        bad.is_empty(),
        "the restarted agent hit errors with only {caps}:\n{}",
        bad.join("\n")
    );
    assert!(agent.terminate().success(), "{}", agent.stderr());
}

/// The agent checks every second that its programs are still attached, and /healthz and
/// `datafence_programs_attached` report it. That check must work with the unit's
/// capabilities too: without CAP_SYS_ADMIN the kernel refuses BPF_PROG_GET_FD_BY_ID, so
/// the check must not depend on it.
fn the_attachment_self_check_works_without_cap_sys_admin(tc_attach: &str) {
    require_root();
    ensure_bpffs();
    let (_, caps) = grantable();
    let sandbox = Sandbox::new("cah");
    let scratch = Scratch::new("caps-health");
    scratch.write("regions/eu-west.txt", "198.51.100.0/24\n");
    let policy_path = scratch.write("policy.yaml", &policy(""));
    let agent = RestrictedAgent::start(&sandbox, &caps, &policy_path, "capshealth", tc_attach);
    // Several monitor rounds (--monitor-interval 1).
    std::thread::sleep(Duration::from_millis(3500));
    let (_, metrics) = http_get(&sandbox, "/metrics");
    let sample = |name: &str| -> Option<f64> {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    };
    let (code, health) = http_get(&sandbox, "/healthz");
    let log = agent.stderr();
    let spurious: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("detached from outside"))
        .collect();
    assert_eq!(
        sample(r#"datafence_programs_attached{interface="up0",hook="xdp"}"#),
        Some(1.0),
        "XDP self-check (ip -json link):\n{metrics}"
    );
    assert!(
        spurious.is_empty()
            && sample(r#"datafence_programs_attached{interface="up0",hook="tc_egress"}"#)
                == Some(1.0)
            && sample("datafence_programs_reattached_total") == Some(0.0)
            && code == 200,
        "with only {caps} the agent believes its TC program is detached, and re-attaches \
         it every round: is_attached() uses SchedClassifier::query_tcx, which opens each \
         program by id (BPF_PROG_GET_FD_BY_ID needs CAP_SYS_ADMIN); BPF_PROG_QUERY alone \
         already returns the ids.\n/healthz {code}: {health}\n{}",
        spurious.join("\n")
    );
}

/// Without CAP_BPF the agent cannot start: the restriction above is real.
#[test]
fn without_cap_bpf_the_agent_cannot_start() {
    require_root();
    ensure_bpffs();
    let (_, caps) = grantable();
    let without_bpf = caps.replace(",+bpf", "");
    let sandbox = Sandbox::new("cnb");
    let scratch = Scratch::new("caps-nobpf");
    scratch.write("regions/eu-west.txt", "198.51.100.0/24\n");
    let policy_path = scratch.write("policy.yaml", &policy(""));
    let mut agent =
        RestrictedAgent::spawn(&sandbox, &without_bpf, &policy_path, "capsnobpf", "auto");
    let deadline = Instant::now() + patience(Duration::from_secs(20));
    let status = loop {
        if let Some(status) = agent.child.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "started without CAP_BPF?");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let log = agent.stderr();
    assert!(
        log.contains("Operation not permitted") || log.contains("Permission denied"),
        "{log}"
    );
}

/// The unit grants exactly these capabilities and keeps the sandboxing that the agent
/// is known to work under; systemd-analyze (when installed) accepts it without warnings.
#[test]
fn the_unit_file_grants_exactly_these_capabilities() {
    let path = workspace_root().join(UNIT);
    let text = std::fs::read_to_string(&path).expect("read the unit");
    let mut values = std::collections::BTreeMap::<String, Vec<String>>::new();
    let mut section = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            section = line.trim_matches(['[', ']']).to_owned();
            continue;
        }
        let (key, value) = line.split_once('=').expect("key=value");
        values
            .entry(format!("{section}.{key}"))
            .or_default()
            .push(value.to_owned());
    }
    let one = |key: &str| -> &str {
        let v = values
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing from {UNIT}"));
        assert_eq!(v.len(), 1, "{key} set more than once");
        &v[0]
    };
    let want: Vec<&str> = GRANTED.iter().map(|(_, _, name)| *name).collect();
    for key in [
        "Service.CapabilityBoundingSet",
        "Service.AmbientCapabilities",
    ] {
        let mut got: Vec<&str> = one(key).split_whitespace().collect();
        got.sort_unstable();
        let mut want = want.clone();
        want.sort_unstable();
        assert_eq!(got, want, "{key}");
    }
    for (key, value) in [
        ("Service.Type", "notify"),
        ("Service.NotifyAccess", "main"),
        ("Service.WatchdogSec", "30s"),
        ("Service.Restart", "on-failure"),
        ("Service.User", "root"),
        ("Service.KillMode", "mixed"),
        ("Service.ExecReload", "/bin/kill -HUP $MAINPID"),
        ("Service.NoNewPrivileges", "yes"),
        ("Service.ProtectSystem", "strict"),
        ("Service.ReadWritePaths", "/sys/fs/bpf"),
        ("Service.RuntimeDirectory", "datafence"),
        ("Service.ProtectHome", "yes"),
        ("Service.PrivateTmp", "yes"),
        (
            "Service.RestrictAddressFamilies",
            "AF_UNIX AF_INET AF_INET6 AF_NETLINK",
        ),
        ("Service.SystemCallArchitectures", "native"),
        ("Unit.DefaultDependencies", "no"),
        ("Install.WantedBy", "multi-user.target"),
    ] {
        assert_eq!(one(key), value, "{key}");
    }
    let exec = one("Service.ExecStart");
    assert!(
        exec.starts_with(
            "/usr/bin/datafence run --policy /etc/datafence/policy.yaml --metrics-addr 127.0.0.1:9477"
        ),
        "{exec}"
    );
    assert!(
        one("Unit.Before")
            .split_whitespace()
            .any(|u| u == "network-pre.target"),
        "ordered before network-pre.target"
    );
    assert!(
        one("Unit.Wants")
            .split_whitespace()
            .any(|u| u == "network-pre.target"),
        "pulls in network-pre.target"
    );
    // The system call filter must let bpf(2) through: @system-service does not.
    let filter = one("Service.SystemCallFilter");
    assert!(
        filter.split_whitespace().any(|s| s == "bpf"),
        "SystemCallFilter must allow bpf: {filter}"
    );
    // These would break the agent.
    for key in [
        "Service.PrivateNetwork",
        "Service.PrivateUsers",
        "Service.ProcSubset",
        "Service.DynamicUser",
    ] {
        assert!(!values.contains_key(key), "{key} must not be set");
    }

    let Some(analyze) = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
    else {
        eprintln!("systemd-analyze not installed: skipping `systemd-analyze verify`");
        return;
    };
    // verify insists that ExecStart's binary exists: point it at the built one.
    let scratch = Scratch::new("caps-unit");
    let bin = agent_binary();
    let unit = scratch.write(
        "datafence.service",
        &text.replace("/usr/bin/datafence", &bin.display().to_string()),
    );
    let out = Command::new(&analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .expect("run systemd-analyze");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}",
        out.status
    );
    let out = Command::new(&analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .expect("run systemd-analyze security");
    let report = String::from_utf8_lossy(&out.stdout);
    if let Some(line) = report
        .lines()
        .find(|l| l.contains("Overall exposure level"))
    {
        eprintln!("systemd-analyze security: {}", line.trim());
    }
}
