//! What operators see, checked against what happened: `status` with the agent down under
//! the shipped unit's directory settings, violation lines named after the policy
//! generation that judged each packet, commands that address the right agent, and a
//! watchdog that stops when the agent's loops stop.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, UdpSocket},
    os::unix::{fs::PermissionsExt as _, net::UnixDatagram},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use integration_tests::{
    Scratch,
    agent::{Launch, RunningAgent, test_pin_dir},
    agent_binary, http,
    netns::{Sandbox, addr, command_in, udp_delivered_marked},
    patience, require_root, tc_program_ids,
};

const MARK: u32 = 0x42;
const UNIT: &str = "deploy/systemd/datafence.service";

/// A policy whose class and region names carry `tag`, so lines of different policies
/// cannot be mistaken for one another. `swap` lists the regions in the other order,
/// which gives them the other ids.
fn policy(tag: &str, swap: bool) -> String {
    let eu = format!("  eu-{tag}:\n    cidrs: [198.51.100.0/24, \"2001:db8:100::/48\"]\n");
    let us = format!("  us-{tag}:\n    cidrs: [203.0.113.0/24, \"2001:db8:300::/48\"]\n");
    let regions = if swap { us.clone() + &eu } else { eu + &us };
    format!(
        "version: 1\ninterfaces:\n  egress: [up0]\nexempt: [192.0.2.2/32]\nregions:\n{regions}\
         data_classes:\n  user-{tag}:\n    match:\n      marks: [{{value: 0x42}}]\n    allow: [eu-{tag}]\n"
    )
}

fn sha256_of(path: &Path) -> String {
    use std::process::Command;
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_owned()
}

/// The `[Service]` directory settings of the shipped unit, applied the way systemd
/// applies them, with /run moved under a scratch directory.
struct UnitDirs {
    runtime_directory: String,
    mode: u32,
    /// `RuntimeDirectoryPreserve=`: no (the default), yes or restart.
    preserve: String,
}

impl UnitDirs {
    fn read() -> Self {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace")
            .join(UNIT);
        let text = std::fs::read_to_string(&path).expect("read the unit");
        let mut service: BTreeMap<String, String> = BTreeMap::new();
        let mut section = String::new();
        for line in text.lines().map(str::trim) {
            if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
                continue;
            }
            if line.starts_with('[') {
                line.trim_matches(['[', ']']).clone_into(&mut section);
            } else if section == "Service"
                && let Some((k, v)) = line.split_once('=')
            {
                service.insert(k.to_owned(), v.to_owned());
            }
        }
        let dirs = Self {
            runtime_directory: service
                .get("RuntimeDirectory")
                .expect("RuntimeDirectory=")
                .clone(),
            mode: u32::from_str_radix(
                service
                    .get("RuntimeDirectoryMode")
                    .map_or("0755", String::as_str),
                8,
            )
            .expect("octal mode"),
            preserve: service
                .get("RuntimeDirectoryPreserve")
                .cloned()
                .unwrap_or_else(|| "no".to_owned()),
        };
        // The unit runs the agent with the default runtime directory: the one systemd
        // makes for RuntimeDirectory=.
        assert_eq!(
            datafence::dirs::RUNTIME_DIR,
            format!("/run/{}", dirs.runtime_directory),
            "the agent's default runtime directory is the unit's RuntimeDirectory="
        );
        dirs
    }

    /// Start: systemd creates /run/<RuntimeDirectory> with RuntimeDirectoryMode=.
    fn start(&self, run: &Path) -> PathBuf {
        let dir = run.join(&self.runtime_directory);
        std::fs::create_dir_all(&dir).expect("create the runtime directory");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(self.mode)).expect("chmod");
        dir
    }

    /// The service stopped (cleanly, crashed or killed); `restarting` when systemd will
    /// start it again (Restart=on-failure after a crash). systemd removes the directory
    /// unless RuntimeDirectoryPreserve=yes, or =restart and it restarts.
    fn stop(&self, run: &Path, restarting: bool) {
        let keep = match self.preserve.as_str() {
            "yes" | "true" | "1" | "on" => true,
            "restart" => restarting,
            _ => false,
        };
        if !keep {
            let _ = std::fs::remove_dir_all(run.join(&self.runtime_directory));
        }
    }
}

/// `datafence status` run the way an operator would, in the agent's namespace.
fn status(ns: &str, args: &[&str]) -> (serde_json::Value, String) {
    let json = command_in(ns, agent_binary())
        .args(["status", "--json"])
        .args(args)
        .output()
        .expect("status");
    assert!(
        json.status.success(),
        "status {args:?}: {}",
        String::from_utf8_lossy(&json.stderr)
    );
    let text = command_in(ns, agent_binary())
        .arg("status")
        .args(args)
        .output()
        .expect("status");
    (
        serde_json::from_slice(&json.stdout).expect("status json"),
        String::from_utf8_lossy(&text.stdout).into_owned(),
    )
}

fn denied(status: &serde_json::Value, class: &str, region: &str) -> u64 {
    status["counters"]
        .as_array()
        .expect("counters")
        .iter()
        .filter(|r| r["class"] == class && r["region"] == region && r["verdict"] == "deny")
        .map(|r| r["packets"].as_u64().unwrap_or(0))
        .sum()
}

#[test]
fn status_works_with_the_agent_killed_or_stopped_under_the_units_directory_settings() {
    require_root();
    let unit = UnitDirs::read();
    let sandbox = Sandbox::new("us");
    let scratch = Scratch::new("unit-status");
    let run = scratch.dir.join("run");
    let path = scratch.write("policy.yaml", &policy("a", false));
    let pins = test_pin_dir("unit-status");
    let runtime = unit.start(&run);
    let launch = || Launch {
        pin_dir: pins.clone(),
        runtime_dir: Some(runtime.clone()),
        env: Vec::new(),
    };
    let mut agent = RunningAgent::launch(&sandbox.host, &path, &[], launch());
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7100, 7, MARK),
        0
    );
    let runtime_arg = runtime.to_str().expect("utf-8").to_owned();

    // Killed (a crash, or the watchdog): Restart=on-failure will start it again.
    agent.kill9();
    agent.keep_pins = true;
    unit.stop(&run, true);
    let (down, text) = status(&sandbox.host.name, &["--runtime-dir", &runtime_arg]);
    eprintln!("status with the agent killed:\n{text}");
    assert_eq!(down["agent_running"], false, "{down}");
    assert_eq!(denied(&down, "user-a", "us-a"), 7, "{down}");
    assert!(text.starts_with("AGENT NOT RUNNING"), "{text}");
    assert!(text.contains("user-a"), "{text}");

    // Started again, then stopped for good (systemctl stop: SIGTERM).
    let runtime = unit.start(&run);
    let agent = RunningAgent::launch(&sandbox.host, &path, &[], launch());
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7100, 3, MARK),
        0
    );
    let (_, _files) = agent.stop_leaving_enforcement();
    unit.stop(&run, false);
    // By pin directory too: the pins name their agent's runtime directory.
    let pins_arg = pins.to_str().expect("utf-8").to_owned();
    for args in [
        vec!["--runtime-dir", runtime_arg.as_str()],
        vec!["--pin-dir", pins_arg.as_str()],
    ] {
        let (down, text) = status(&sandbox.host.name, &args);
        assert_eq!(down["agent_running"], false, "{args:?}: {down}");
        assert_eq!(
            down["policy"]["sha256"],
            sha256_of(&path),
            "{args:?}: {down}"
        );
        assert_eq!(denied(&down, "user-a", "us-a"), 10, "{args:?}: {text}");
    }
    assert!(runtime.join("state.json").exists());

    // Without the preserved directory the names are gone: status still reads the pins,
    // by number, and says so. (This is what the unit's setting prevents.)
    std::fs::remove_dir_all(&runtime).expect("remove the runtime directory");
    let (lost, text) = status(&sandbox.host.name, &["--pin-dir", &pins_arg]);
    assert_eq!(lost["agent_running"], false);
    assert!(text.contains("note: no agent state"), "{text}");
    assert_eq!(denied(&lost, "#0", "#2"), 10, "{lost}");
    let _ = datafence::datapath::PinLayout::new(&pins).remove_all();
}

/// Sends marked UDP to the unapproved region from `sandbox`'s host until `stop`, each
/// datagram to the next port so that each is a new flow with its own line.
fn flood(sandbox: &Sandbox, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let ns = sandbox.host.name.clone();
    std::thread::spawn(move || {
        integration_tests::netns::run_in(&ns, move || {
            let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
            integration_tests::netns::set_mark(std::os::fd::AsRawFd::as_raw_fd(&sock), MARK);
            // About as fast as the host's reporter labels them (20 a millisecond); a
            // hundredth of that where everything is ten times slower (the emulated
            // guests, whose reporter labels under a thousand a second).
            let factor = patience(Duration::from_secs(1)).as_secs();
            let (burst, pause) = if factor == 1 {
                (20, Duration::from_millis(1))
            } else {
                (1, Duration::from_millis(factor / 2))
            };
            let mut sent = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let port = 10_000 + (sent % 50_000) as u16;
                let dst: SocketAddr = format!("{}:{port}", addr::US_V4).parse().expect("addr");
                let _ = sock.send_to(b"x", dst);
                sent += 1;
                if sent.is_multiple_of(burst) {
                    std::thread::sleep(pause);
                }
            }
            sent
        })
    })
}

/// Violation lines from the agent's stdout for the flood's destination.
fn flood_lines(agent: &RunningAgent) -> Vec<serde_json::Value> {
    agent
        .violations()
        .into_iter()
        .filter(|l| l["dst"] == addr::US_V4)
        .collect()
}

#[test]
fn every_violation_line_names_the_policy_generation_that_judged_it() {
    const RELOADS: usize = 40;
    require_root();
    let sandbox = Sandbox::new("rs");
    let scratch = Scratch::new("reload-storm");
    let path = scratch.dir.join("policy.yaml");
    // The expected names of each variant: class, the denied region, and the hash.
    let variants: Vec<(String, String, String)> = [("a", false), ("b", true)]
        .iter()
        .map(|(tag, swap)| {
            std::fs::write(&path, policy(tag, *swap)).expect("write");
            (format!("user-{tag}"), format!("us-{tag}"), sha256_of(&path))
        })
        .collect();
    std::fs::write(&path, policy("a", false)).expect("write");
    let agent = RunningAgent::start(
        &sandbox.host,
        &path,
        &[
            "--no-watch",
            "--fold-interval",
            "1",
            "--events-per-second",
            "5000",
        ],
    );
    let mut by_generation: BTreeMap<u64, usize> = BTreeMap::new();
    let first = agent.status_json()["policy"]["generation"]
        .as_u64()
        .expect("generation");
    by_generation.insert(first, 0);

    let stop = Arc::new(AtomicBool::new(false));
    let sender = flood(&sandbox, stop.clone());
    for i in 1..=RELOADS {
        let v = i % 2;
        std::fs::write(&path, policy(["a", "b"][v], v == 1)).expect("write");
        let out = agent.cli(&["reload"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        let generation: u64 = said
            .trim()
            .rsplit(' ')
            .next()
            .and_then(|g| g.parse().ok())
            .unwrap_or_else(|| panic!("generation in {said:?}"));
        assert!(said.contains(&variants[v].2), "{said}");
        by_generation.insert(generation, v);
        // The agent names the last 16 generations (`generations::KEPT`); lines of one
        // further back get numbers and a note. Emulated, labelling lags the flood by
        // seconds: the next reload waits until the reporter has reached this one.
        let reached = format!("\"policy_generation\":{generation},");
        let deadline = Instant::now() + patience(Duration::from_secs(10));
        while !agent.stdout().contains(&reached) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(30));
    }
    stop.store(true, Ordering::Relaxed);
    let sent = sender.join().expect("flood");
    // Let the last events be read and the folded lines flushed.
    std::thread::sleep(Duration::from_millis(2500));

    let lines = flood_lines(&agent);
    let mut per_generation: BTreeMap<u64, usize> = BTreeMap::new();
    let mut wrong = Vec::new();
    for line in &lines {
        let generation = line["policy_generation"]
            .as_u64()
            .expect("policy_generation");
        *per_generation.entry(generation).or_default() += 1;
        let Some(&v) = by_generation.get(&generation) else {
            wrong.push(format!("generation {generation} never loaded: {line}"));
            continue;
        };
        let (class, region, sha) = &variants[v];
        if line["class"] != class.as_str()
            || line["region"] != region.as_str()
            || line["policy_sha256"] != sha.as_str()
            || line.get("note").is_some()
        {
            wrong.push(format!(
                "generation {generation} is {class}/{region}/{sha}: {line}"
            ));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} lines misnamed:\n{}",
        wrong.len(),
        lines.len(),
        wrong
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        per_generation.len() >= RELOADS / 2,
        "the flood ({sent} packets, {} lines) should straddle most reloads: {per_generation:?}",
        lines.len()
    );
    agent.stop();
}

#[test]
fn events_left_by_an_earlier_agent_get_its_names_or_numbers_and_a_note() {
    require_root();
    let sandbox = Sandbox::new("lg");
    let scratch = Scratch::new("leftover");
    let pins = test_pin_dir("leftover");
    let path_a = scratch.write("a/policy.yaml", &policy("a", false));
    let path_b = scratch.write("b/policy.yaml", &policy("b", true));
    let runtime = scratch.dir.join("run");
    let launch = |runtime: &Path| Launch {
        pin_dir: pins.clone(),
        runtime_dir: Some(runtime.to_owned()),
        env: Vec::new(),
    };
    // Freeze the agent so its events stay in the pinned ring buffer, send, then kill it.
    let leave_events = |mut agent: RunningAgent, port: u16| {
        agent.freeze();
        assert_eq!(
            udp_delivered_marked(&sandbox, addr::US_V4, port, 5, MARK),
            0
        );
        agent.kill9();
        agent.keep_pins = true;
    };
    let a = RunningAgent::launch(&sandbox.host, &path_a, &["--no-watch"], launch(&runtime));
    let gen_a = a.status_json()["policy"]["generation"].clone();
    leave_events(a, 7201);

    // The next agent, with another policy and the same (preserved) runtime directory,
    // names the earlier agent's events after the earlier agent's policy.
    let b = RunningAgent::launch(&sandbox.host, &path_b, &["--no-watch"], launch(&runtime));
    let wait_lines = |agent: &RunningAgent, port: u16| {
        let deadline = Instant::now() + patience(Duration::from_secs(10));
        loop {
            let lines: Vec<serde_json::Value> = flood_lines(agent)
                .into_iter()
                .filter(|l| l["dst_port"] == port)
                .collect();
            if !lines.is_empty() || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let lines = wait_lines(&b, 7201);
    assert_eq!(
        lines.len(),
        1,
        "{lines:?}\n{:?}\n{}",
        b.violations(),
        b.stderr()
    );
    let l = &lines[0];
    assert_eq!(l["policy_generation"], gen_a);
    assert_eq!(
        (&l["class"], &l["region"], &l["policy_sha256"]),
        (
            &serde_json::json!("user-a"),
            &serde_json::json!("us-a"),
            &serde_json::json!(sha256_of(&path_a))
        ),
        "{l}"
    );
    let gen_b = b.status_json()["policy"]["generation"].clone();
    assert_ne!(gen_a, gen_b);
    leave_events(b, 7202);

    // Its runtime directory deleted (as systemd does without RuntimeDirectoryPreserve=),
    // the next agent cannot know that generation: numbers and a note, not its own names.
    std::fs::remove_dir_all(&runtime).expect("remove runtime dir");
    let c = RunningAgent::launch(
        &sandbox.host,
        &path_a,
        &["--no-watch"],
        launch(&scratch.dir.join("run-c")),
    );
    let lines = wait_lines(&c, 7202);
    assert_eq!(lines.len(), 1, "{lines:?}\n{}", c.stderr());
    let l = &lines[0];
    assert_eq!(l["policy_generation"], gen_b, "{l}");
    assert_eq!(
        (&l["class"], &l["region"], &l["policy_sha256"]),
        (
            &serde_json::json!("unknown"),
            &serde_json::json!("unknown"),
            &serde_json::json!("unknown")
        ),
        "{l}"
    );
    // In policy b, us-b is listed first: region id 1.
    assert_eq!(
        (&l["class_id"], &l["region_id"]),
        (&serde_json::json!(0), &serde_json::json!(1))
    );
    assert!(
        l["note"]
            .as_str()
            .is_some_and(|n| n.contains("no longer knows")),
        "{l}"
    );
    c.stop();
}

/// `datafence <args>` from the host's root namespace, as an operator would run it.
fn cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(agent_binary())
        .args(args)
        .output()
        .expect("run datafence")
}

#[test]
fn commands_address_the_agent_of_their_pin_or_runtime_directory() {
    require_root();
    let (sa, sb) = (Sandbox::new("ca"), Sandbox::new("cb"));
    let scratch = Scratch::new("addressing");
    let path_a = scratch.write("a/policy.yaml", &policy("a", false));
    let path_b = scratch.write("b/policy.yaml", &policy("b", false));
    let (pins_a, pins_b) = (test_pin_dir("addr-a"), test_pin_dir("addr-b"));
    let (run_a, run_b) = (scratch.dir.join("run-a"), scratch.dir.join("run-b"));
    let mut a = RunningAgent::launch(
        &sa.host,
        &path_a,
        &["--no-watch"],
        Launch {
            runtime_dir: Some(run_a.clone()),
            ..Launch::pins(pins_a.clone())
        },
    );
    let b = RunningAgent::launch(
        &sb.host,
        &path_b,
        &["--no-watch"],
        Launch {
            runtime_dir: Some(run_b.clone()),
            ..Launch::pins(pins_b.clone())
        },
    );
    let s = |p: &Path| p.to_str().expect("utf-8").to_owned();
    let (pa, pb, ra, rb) = (s(&pins_a), s(&pins_b), s(&run_a), s(&run_b));

    // A pin directory alone addresses its owner.
    let out = cli(&["status", "--json", "--pin-dir", &pa]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(st["agent_running"], true);
    assert_eq!(st["policy"]["sha256"], sha256_of(&path_a));
    let gen_a = a.status_json()["policy"]["generation"].clone();
    let gen_b = b.status_json()["policy"]["generation"]
        .as_u64()
        .expect("gen");
    std::fs::write(&path_b, policy("b", true)).expect("write");
    let out = cli(&["reload", "--pin-dir", &pb]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(b.status_json()["policy"]["generation"], gen_b + 1);
    assert_eq!(
        a.status_json()["policy"]["generation"],
        gen_a,
        "A untouched"
    );

    // A pin directory no agent owns is "no agent", not the default one.
    let nobody = test_pin_dir("addr-nobody");
    let out = cli(&["reload", "--pin-dir", &s(&nobody)]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no running agent owns the pins"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // B's runtime directory with A's pins: B does not own them and A is alive, so detach
    // refuses and names A's socket. Both keep enforcing.
    let out = cli(&["--runtime-dir", &rb, "detach", "--pin-dir", &pa]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "{}/control.sock",
            std::fs::canonicalize(&run_a).expect("canon").display()
        )),
        "{err}"
    );
    assert!(pins_a.exists() && pins_b.exists());
    assert_eq!(tc_program_ids(&sa.host, "up0").len(), 1);
    assert_eq!(tc_program_ids(&sb.host, "up0").len(), 1);
    assert_eq!(
        udp_delivered_marked(&sa, addr::US_V4, 7300, 3, MARK),
        0,
        "A still enforces"
    );

    // A killed: its pins have no live owner any more; status reads them, detach removes
    // them, and B carries on.
    a.kill9();
    a.keep_pins = true;
    let out = cli(&["status", "--json", "--pin-dir", &pa]);
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(st["agent_running"], false, "{st}");
    assert_eq!(denied(&st, "user-a", "us-a"), 3, "{st}");
    // From A's network namespace, as an operator on A's host would: a clsact filter
    // (kernels without tcx) belongs to its namespace, unlike a pinned tcx link.
    let out = a.cli(&["detach", "--pin-dir", &pa]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pins_a.exists());
    assert!(tc_program_ids(&sa.host, "up0").is_empty());
    assert_eq!(udp_delivered_marked(&sa, addr::US_V4, 7300, 3, MARK), 3);
    assert_eq!(b.status_json()["agent_running"], true);

    // B, by its pins: told to detach, it stops.
    let out = cli(&["detach", "--pin-dir", &pb]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("the agent has stopped"),
        "{out:?}"
    );
    assert!(!pins_b.exists());
    let _ = ra;
    b.stop();
}

/// Datagrams an agent sent to its NOTIFY_SOCKET within `window`.
fn notifications(sock: &UnixDatagram, window: Duration) -> Vec<String> {
    let deadline = Instant::now() + window;
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        match sock.recv(&mut buf) {
            Ok(n) => out.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => break,
        }
    }
    out
}

/// Every notification already queued on `sock`, without waiting for more.
fn drain(sock: &UnixDatagram) -> Vec<String> {
    sock.set_nonblocking(true).expect("nonblocking");
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    while let Ok(n) = sock.recv(&mut buf) {
        out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    sock.set_nonblocking(false).expect("blocking");
    out
}

fn pings(messages: &[String]) -> usize {
    messages.iter().filter(|m| m.contains("WATCHDOG=1")).count()
}

#[test]
fn the_watchdog_stops_when_the_agents_loops_stop_and_healthz_says_which() {
    require_root();
    let sandbox = Sandbox::new("wd");
    let scratch = Scratch::new("watchdog");
    let path = scratch.write("policy.yaml", &policy("a", false));
    let notify_path = scratch.dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind notify socket");
    let metrics = "127.0.0.1:9477";
    // While this file exists, a debug build's policy read waits (see the agent's
    // `stall_for_tests`).
    let stall = scratch.dir.join("stall");
    let agent = RunningAgent::launch(
        &sandbox.host,
        &path,
        &[
            "--no-watch",
            "--monitor-interval",
            "1",
            "--metrics-addr",
            metrics,
        ],
        Launch {
            env: vec![
                ("NOTIFY_SOCKET".into(), notify_path.display().to_string()),
                ("WATCHDOG_USEC".into(), "2000000".into()),
                (
                    "DATAFENCE_TEST_STALL_READ_WHILE".into(),
                    stall.display().to_string(),
                ),
            ],
            ..Launch::pins(test_pin_dir("watchdog"))
        },
    );
    let healthz = || {
        http::get(
            &sandbox.host.name,
            metrics.parse().expect("addr"),
            "/healthz",
            &[],
        )
    };
    let before = notifications(&notify, Duration::from_secs(3));
    assert!(before.iter().any(|m| m.contains("READY=1")), "{before:?}");
    assert!(pings(&before) >= 2, "{before:?}");
    let h = healthz();
    assert_eq!(h.status, 200, "{}", h.body);
    for name in ["event-reader ok", "control ok", "reconciler ok"] {
        assert!(h.body.contains(name), "{}", h.body);
    }

    // Stall the agent for real: a reload whose policy read waits, inside the agent,
    // holding the lock every loop needs.
    std::fs::write(&stall, "").expect("create the stall file");
    let (ns, runtime) = (sandbox.host.name.clone(), agent.runtime_dir.clone());
    let reload = std::thread::spawn(move || {
        command_in(&ns, agent_binary())
            .arg("--runtime-dir")
            .arg(&runtime)
            .arg("reload")
            .output()
            .expect("reload")
    });
    // Once every loop is past its limit (2 s), /healthz says so and no ping comes.
    let deadline = Instant::now() + patience(Duration::from_secs(15));
    let stalled = [
        "event-reader STALLED",
        "control STALLED",
        "reconciler STALLED",
    ];
    loop {
        let h = healthz();
        if h.status == 503 && stalled.iter().all(|s| h.body.contains(s)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never stalled: {} {}",
            h.status,
            h.body
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Pings sent before the stall was seen may still be queued (emulated, a few): take
    // them all, without waiting, so that only pings sent from here on count.
    drain(&notify);
    let during = notifications(&notify, Duration::from_secs(3));
    assert_eq!(pings(&during), 0, "pinged while stalled: {during:?}");
    // Scrapes still answer, from the last snapshot.
    let m = http::get(
        &sandbox.host.name,
        metrics.parse().expect("addr"),
        "/metrics",
        &[],
    );
    assert_eq!(m.status, 200);

    // Unblock: the reload finishes and the pings resume.
    std::fs::remove_file(&stall).expect("remove the stall file");
    let out = reload.join().expect("reload thread");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = notifications(&notify, Duration::from_secs(3));
    assert!(pings(&after) >= 2, "{after:?}");
    assert_eq!(healthz().status, 200);
    let log = agent.stderr();
    assert!(log.contains("not pinging the watchdog"), "{log}");
    assert!(log.contains("watchdog pings resumed"), "{log}");
    agent.stop();
}

/// Whether process `pid` catches SIGHUP (its `SigCgt` mask in `/proc`).
fn catches_sighup(pid: u32) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("SigCgt:"))
        .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        .is_some_and(|mask| mask & (1 << (libc::SIGHUP - 1)) != 0)
}

/// A SIGHUP that comes while the agent is still starting (loading and verifying its
/// programs takes seconds, more on old kernels) is a reload once the start is done.
/// Before, its default action ended the agent, as a clean exit that systemd's
/// `Restart=on-failure` does not restart.
#[test]
fn a_sighup_during_the_start_reloads_once_the_agent_runs() {
    require_root();
    let sandbox = Sandbox::new("hs");
    let scratch = Scratch::new("hup-start");
    let path = scratch.write("policy.yaml", &policy("a", false));
    // While this file exists, a debug build's policy read waits (see the agent's
    // `stall_for_tests`): the start stops there.
    let stall = scratch.dir.join("stall");
    std::fs::write(&stall, "").expect("create the stall file");
    let signaller = {
        let (path, stall) = (path.clone(), stall.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + patience(Duration::from_secs(10));
            let pid = loop {
                let out = std::process::Command::new("pgrep")
                    .args(["-n", "-f"])
                    .arg(format!("run --policy {}", path.display()))
                    .output()
                    .expect("pgrep");
                if let Ok(pid) = String::from_utf8_lossy(&out.stdout).trim().parse::<u32>() {
                    break pid;
                }
                assert!(Instant::now() < deadline, "no agent process");
                std::thread::sleep(Duration::from_millis(20));
            };
            // The signal goes once the agent catches it, or after the deadline anyway,
            // so that an agent which never does is caught out.
            while !catches_sighup(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let caught_before = catches_sighup(pid);
            // SAFETY: kill(2) with a pid and a signal number.
            let rc = unsafe { libc::kill(pid as i32, libc::SIGHUP) };
            assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
            std::thread::sleep(Duration::from_millis(200));
            std::fs::remove_file(&stall).expect("end the stall");
            caught_before
        })
    };
    let agent = RunningAgent::launch(
        &sandbox.host,
        &path,
        &["--no-watch"],
        Launch {
            env: vec![(
                "DATAFENCE_TEST_STALL_READ_WHILE".into(),
                stall.display().to_string(),
            )],
            ..Launch::pins(test_pin_dir("hup-start"))
        },
    );
    assert!(
        signaller.join().expect("signaller"),
        "SIGHUP caught during the start"
    );
    let deadline = Instant::now() + patience(Duration::from_secs(5));
    while !agent.stderr().contains("SIGHUP") {
        assert!(
            Instant::now() < deadline,
            "no reload for the SIGHUP:\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7500, 5, MARK),
        0,
        "enforcing"
    );
    agent.stop();
}
