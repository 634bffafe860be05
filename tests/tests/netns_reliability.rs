//! Enforcement that holds: through kill -9 and restarts, reload storms, bad reloads and
//! detaches from outside; never a host locked out of its management network.

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use datafence_test_support::output_within;
use integration_tests::{
    Scratch,
    agent::{RunningAgent, test_pin_dir},
    agent_binary, datafence_clsact_filters, detach_pins, detach_tc_from_outside,
    netns::{Sandbox, addr, udp_delivered_marked},
    patience, require_root, tc_program_ids, tcx_program_ids,
};

const MARK: u32 = 0x42;

integration_tests::for_each_tc_attach!(
    kill_9_and_restart_repeatedly_without_a_leak_or_a_false_drop,
    reload_storm_never_yields_a_verdict_neither_policy_gives,
    a_program_detached_from_outside_is_attached_again,
    links_whose_pins_were_removed_are_attached_and_pinned_again,
    interfaces_the_policy_stops_naming_are_detached,
    sigterm_leaves_enforcement_in_place_and_only_detach_removes_it,
    status_reads_the_pinned_state_while_the_agent_is_stopped,
);

/// Checks that `up0`'s egress hook holds exactly one datafence program, attached the
/// way `tc_attach` says, and returns its id.
fn one_program_attached_as(sandbox: &Sandbox, tc_attach: &str) -> u32 {
    let tcx = tcx_program_ids(&sandbox.host, "up0");
    let filters = datafence_clsact_filters(&sandbox.host, "up0");
    match tc_attach {
        "tcx" => {
            assert!(
                filters.is_empty(),
                "no clsact filter in tcx mode: {filters:?}"
            );
            assert_eq!(tcx.len(), 1, "one tcx program: {tcx:?}");
            tcx[0]
        }
        "clsact" => {
            assert!(tcx.is_empty(), "no tcx program in clsact mode: {tcx:?}");
            assert_eq!(filters.len(), 1, "one clsact filter: {filters:?}");
            let f = &filters[0];
            assert_eq!(
                (f.priority, f.handle),
                (datafence::clsact::PRIORITY, datafence::clsact::HANDLE),
                "in datafence's place"
            );
            f.program_id.expect("the filter names its program")
        }
        other => panic!("unknown attach kind {other}"),
    }
}

/// Removes the programs an agent pinned beside its stage arrays (`<pins>/v*/stages-*/`),
/// leaving the arrays, maps and links: the next agent finds nothing to adopt.
fn remove_program_pins(pins: &Path) {
    let mut removed = 0;
    for version in std::fs::read_dir(pins).expect("pin dir").flatten() {
        for stages in std::fs::read_dir(version.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if !stages.file_name().to_string_lossy().starts_with("stages-") {
                continue;
            }
            for pin in std::fs::read_dir(stages.path()).expect("stages").flatten() {
                if pin.file_name().to_string_lossy().starts_with("datafence_") {
                    std::fs::remove_file(pin.path()).expect("unpin");
                    removed += 1;
                }
            }
        }
    }
    assert_eq!(removed, 10, "ten programs were pinned beside the stages");
}

fn policy(extra_allow: &str, exempt: &str) -> String {
    format!(
        r"
version: 1
interfaces:
  egress: [up0]
exempt: [{exempt}]
regions:
  eu-west:
    files: [regions/eu-west.txt]
  us-east:
    cidrs: [203.0.113.0/24]
  elsewhere:
    cidrs: [198.18.0.0/15]
data_classes:
  user-data:
    match:
      marks: [{{value: 0x42}}]
    allow: [eu-west{extra_allow}]
"
    )
}

fn write_policy(scratch: &Scratch, text: &str) -> PathBuf {
    scratch.write("regions/eu-west.txt", "198.51.100.0/24\n");
    scratch.write("policy.yaml", text)
}

/// Marked datagrams sent without pause to an approved and an unapproved address, each
/// counted by a receiver that drains continuously: every arrival at us-east is a leak,
/// every datagram to eu-west that does not arrive is a false drop.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent_eu: Arc<AtomicU64>,
    sent_us: Arc<AtomicU64>,
    got_eu: Arc<AtomicU64>,
    got_us: Arc<AtomicU64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Traffic {
    fn start(sandbox: &Sandbox) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let counters: [Arc<AtomicU64>; 4] = Default::default();
        let mut threads = Vec::new();
        for (dst, got) in [
            (addr::EU_V4, counters[2].clone()),
            (addr::US_V4, counters[3].clone()),
        ] {
            let at: SocketAddr = format!("{dst}:7300").parse().expect("addr");
            let sock = sandbox
                .world
                .run(move || UdpSocket::bind(at).expect("bind receiver"));
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            // Room for seconds of traffic: on a loaded machine the receiving thread may
            // not run for a while, and a full socket buffer would drop datagrams the
            // program let through, which this test would count as false drops.
            let bytes: libc::c_int = 64 << 20;
            // SAFETY: setsockopt with a valid fd and an int option.
            let rc = unsafe {
                libc::setsockopt(
                    sock.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&raw const bytes).cast(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
            let stop = stop.clone();
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 16];
                let mut quiet_since: Option<Instant> = None;
                loop {
                    match sock.recv_from(&mut buf) {
                        Ok(_) => {
                            got.fetch_add(1, Ordering::Relaxed);
                            quiet_since = None;
                        }
                        Err(_) if stop.load(Ordering::Relaxed) => {
                            // Drain until the wire has been quiet for a while.
                            let since = *quiet_since.get_or_insert_with(Instant::now);
                            if since.elapsed() > Duration::from_millis(300) {
                                break;
                            }
                        }
                        Err(_) => {}
                    }
                }
            }));
        }
        let (stop2, sent_to_eu, sent_to_us) =
            (stop.clone(), counters[0].clone(), counters[1].clone());
        let host = sandbox.host.name.clone();
        threads.push(std::thread::spawn(move || {
            let path = format!("/run/netns/{host}");
            let ns = std::fs::File::open(&path).expect("netns");
            // SAFETY: setns on a valid netns fd affects only this thread.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0);
            let sock = UdpSocket::bind("0.0.0.0:0").expect("bind sender");
            integration_tests::netns::set_mark(std::os::fd::AsRawFd::as_raw_fd(&sock), MARK);
            let eu: SocketAddr = format!("{}:7300", addr::EU_V4).parse().expect("addr");
            let us: SocketAddr = format!("{}:7300", addr::US_V4).parse().expect("addr");
            while !stop2.load(Ordering::Relaxed) {
                if sock.send_to(b"eu", eu).is_ok() {
                    sent_to_eu.fetch_add(1, Ordering::Relaxed);
                }
                let _ = sock.send_to(b"us", us);
                sent_to_us.fetch_add(1, Ordering::Relaxed);
                // About 2,000 datagrams a second per destination: continuous, but far
                // below what could overflow the receivers' buffers.
                std::thread::sleep(Duration::from_micros(500));
            }
        }));
        let [sent_eu, sent_us, got_eu, got_us] = counters;
        Self {
            stop,
            sent_eu,
            sent_us,
            got_eu,
            got_us,
            threads,
        }
    }

    /// Stops sending, waits for the last datagrams, and returns
    /// (sent to eu, received from eu, sent to us, leaked to us).
    fn finish(self) -> (u64, u64, u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().expect("traffic thread");
        }
        (
            self.sent_eu.load(Ordering::Relaxed),
            self.got_eu.load(Ordering::Relaxed),
            self.sent_us.load(Ordering::Relaxed),
            self.got_us.load(Ordering::Relaxed),
        )
    }
}

/// How many times the kill-and-restart test kills its agent: 20, or
/// `DATAFENCE_TEST_RESTART_ROUNDS`, which the emulated guests set lower because each start
/// there takes tens of seconds. Kept even, so that adopting and swapping rounds alternate in
/// equal numbers.
fn restart_rounds() -> u32 {
    let rounds = std::env::var("DATAFENCE_TEST_RESTART_ROUNDS")
        .ok()
        .and_then(|value| value.parse::<u32>().ok())
        .filter(|rounds| *rounds >= 2)
        .unwrap_or(20);
    rounds & !1
}

fn kill_9_and_restart_repeatedly_without_a_leak_or_a_false_drop(tc_attach: &str) {
    require_root();
    let rounds = restart_rounds();
    let sandbox = Sandbox::new("kl");
    let scratch = Scratch::new("kill");
    let policy = write_policy(&scratch, &policy("", "192.0.2.2/32"));
    let pins = test_pin_dir("kill");
    let args = ["--tc-attach", tc_attach];
    let mut agent = RunningAgent::start_with_pins(&sandbox.host, &policy, &args, pins.clone());
    let mut program = one_program_attached_as(&sandbox, tc_attach);
    let traffic = Traffic::start(&sandbox);
    for round in 0..rounds {
        agent.kill9();
        // Killed: the programs keep enforcing while nothing runs (a tcx link through
        // its pin, a clsact filter by itself).
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            one_program_attached_as(&sandbox, tc_attach),
            program,
            "round {round}: the dead agent's program still attached"
        );
        // Every other round the programs' pins go, as if a new build came up: that agent
        // loads its own programs and swaps them in under traffic. The other rounds, a
        // restart of the same build adopts the programs it finds.
        let swap = round % 2 == 1;
        if swap {
            remove_program_pins(&pins);
        }
        let next = RunningAgent::start_with_pins(&sandbox.host, &policy, &args, pins.clone());
        // The dead agent's handle must not clean up the pins the new one adopted.
        agent.keep_pins = true;
        agent = next;
        let adopted = one_program_attached_as(&sandbox, tc_attach);
        if swap {
            assert_ne!(
                adopted, program,
                "round {round}: the new agent's program replaced the old one in place"
            );
        } else {
            assert_eq!(
                adopted, program,
                "round {round}: a restart of the same build adopts the running program"
            );
            assert!(
                agent
                    .stderr()
                    .contains("adopted the programs an earlier agent"),
                "round {round}: {}",
                agent.stderr()
            );
        }
        program = adopted;
    }
    std::thread::sleep(Duration::from_millis(200));
    let (sent_eu, got_eu, sent_us, leaked) = traffic.finish();
    println!(
        "kill test, {rounds} restarts: {sent_eu} sent to eu-west, {got_eu} arrived; {sent_us} sent to us-east, {leaked} leaked"
    );
    assert!(sent_us > 1000, "traffic flowed throughout ({sent_us})");
    assert_eq!(leaked, 0, "packets that should have been dropped arrived");
    assert_eq!(
        agent.packets(&[("region", "eu-west"), ("verdict", "deny")]),
        0,
        "the programs denied user data to an approved region"
    );
    assert_eq!(
        got_eu,
        sent_eu,
        "false drops: {} of {sent_eu}",
        sent_eu - got_eu
    );
    let status = agent.status_json();
    assert_eq!(
        status["policy"]["generation"],
        u64::from(rounds) + 1,
        "each of {rounds} restarts adopted and switched the policy"
    );
    agent.stop();
}

fn reload_storm_never_yields_a_verdict_neither_policy_gives(tc_attach: &str) {
    require_root();
    let sandbox = Sandbox::new("st");
    let scratch = Scratch::new("storm");
    let a = policy("", "192.0.2.2/32");
    // B differs in reach and exemptions, but agrees on eu-west (allow) and us-east (deny).
    let b = policy(", elsewhere", "192.0.2.2/32, 10.0.0.0/8");
    let path = write_policy(&scratch, &a);
    let agent = RunningAgent::start(
        &sandbox.host,
        &path,
        &["--no-watch", "--tc-attach", tc_attach],
    );
    one_program_attached_as(&sandbox, tc_attach);
    let traffic = Traffic::start(&sandbox);
    let started = Instant::now();
    for i in 0..100 {
        std::fs::write(&path, if i % 2 == 0 { &b } else { &a }).expect("write");
        let out = agent.cli(&["reload"]);
        assert!(
            out.status.success(),
            "reload {i}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let took = started.elapsed();
    let (sent_eu, got_eu, sent_us, leaked) = traffic.finish();
    println!(
        "reload storm: 100 reloads in {took:?}; {sent_eu} to eu-west, {got_eu} arrived; {sent_us} to us-east, {leaked} leaked"
    );
    assert_eq!(leaked, 0);
    assert_eq!(got_eu, sent_eu);
    assert_eq!(agent.status_json()["policy"]["generation"], 101);
    agent.stop();
}

#[test]
fn bad_reloads_are_refused_and_the_old_verdicts_hold() {
    require_root();
    let sandbox = Sandbox::new("bd");
    let scratch = Scratch::new("bad");
    let good = policy("", "192.0.2.2/32");
    let path = write_policy(&scratch, &good);
    let agent = RunningAgent::start(&sandbox.host, &path, &["--table-capacity", "64"]);
    let traffic = Traffic::start(&sandbox);
    let oversized = {
        let many: Vec<String> = (0..100).map(|i| format!("198.18.{i}.0/24")).collect();
        good.replace("[198.18.0.0/15]", &format!("[{}]", many.join(", ")))
    };
    let cases: [(&str, String, &str); 4] = [
        (
            "corrupt YAML",
            "version: 1\nregions: {eu-west: [unclosed\n".into(),
            "policy.yaml:",
        ),
        (
            "missing region file",
            good.replace("regions/eu-west.txt", "regions/gone.txt"),
            "gone.txt",
        ),
        ("oversized", oversized, "64"),
        (
            "truncated mid-write",
            good[..good.len() / 2].to_owned(),
            "policy.yaml:",
        ),
    ];
    for (what, text, needle) in &cases {
        std::fs::write(&path, text).expect("write");
        let out = agent.cli(&["reload"]);
        // Keep traffic flowing under the refused policy for a while.
        std::thread::sleep(Duration::from_millis(300));
        assert!(!out.status.success(), "{what}: accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{what}: {err}");
        assert!(
            err.contains("previous policy stays in force"),
            "{what}: {err}"
        );
    }
    std::fs::write(&path, &good).expect("restore");
    let (sent_eu, got_eu, sent_us, leaked) = traffic.finish();
    println!(
        "bad reloads: {sent_eu} to eu-west, {got_eu} arrived; {sent_us} to us-east, {leaked} leaked"
    );
    assert_eq!(leaked, 0);
    assert_eq!(got_eu, sent_eu);
    assert_eq!(
        agent.status_json()["policy"]["generation"],
        1,
        "no bad policy was ever applied"
    );
    agent.stop();
}

fn a_program_detached_from_outside_is_attached_again(tc_attach: &str) {
    require_root();
    let sandbox = Sandbox::new("dt");
    let scratch = Scratch::new("detach");
    let path = write_policy(&scratch, &policy("", "192.0.2.2/32"));
    let agent = RunningAgent::start(
        &sandbox.host,
        &path,
        &["--monitor-interval", "1", "--tc-attach", tc_attach],
    );
    one_program_attached_as(&sandbox, tc_attach);
    // Frozen, the agent cannot put the program back before the test has seen it gone;
    // emulated, `tc` is slower than the agent's one-second monitor.
    agent.freeze();
    assert_eq!(detach_tc_from_outside(&sandbox.host, "up0"), 1);
    assert!(tc_program_ids(&sandbox.host, "up0").is_empty(), "detached");
    agent.thaw();
    let deadline = Instant::now() + patience(Duration::from_secs(5));
    while tc_program_ids(&sandbox.host, "up0").is_empty() {
        assert!(
            Instant::now() < deadline,
            "not reattached:\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7400, 5, MARK),
        0,
        "enforcing again"
    );
    assert!(
        agent.stderr().contains("attached it again"),
        "{}",
        agent.stderr()
    );
    one_program_attached_as(&sandbox, tc_attach);
    agent.stop();
}

/// Whether `up0` has an XDP program.
fn xdp_attached(sandbox: &Sandbox) -> bool {
    let out = sandbox.host.ip("-j link show up0");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
    links[0].get("xdp").is_some()
}

/// Someone removes the links' pins while the agent runs (`rm -rf` of the directory). A
/// link whose only holder was its pin goes with it: the XDP link always, the TC link in
/// tcx mode. The agent attaches both again and pins them, making the directory anew;
/// until this was fixed, pinning failed for want of the directory, the new link went
/// with the failed call, and enforcement stayed off until a restart.
fn links_whose_pins_were_removed_are_attached_and_pinned_again(tc_attach: &str) {
    require_root();
    let sandbox = Sandbox::new("rp");
    let scratch = Scratch::new("unpinned");
    let text =
        policy("", "192.0.2.2/32").replace("egress: [up0]", "egress: [up0]\n  gateway: [up0]");
    let path = write_policy(&scratch, &text);
    let pins = test_pin_dir("unpinned");
    let agent = RunningAgent::start_with_pins(
        &sandbox.host,
        &path,
        &["--monitor-interval", "1", "--tc-attach", tc_attach],
        pins.clone(),
    );
    let links = pins.join("links");
    // A clsact filter is no link and has no pin.
    let mut pinned = vec![links.join(datafence::datapath::link_name("xdp", "up0"))];
    if tc_attach == "tcx" {
        pinned.push(links.join(datafence::datapath::link_name("tc_egress", "up0")));
    }
    assert!(pinned.iter().all(|p| p.exists()), "pinned at start");
    assert!(xdp_attached(&sandbox), "XDP attached");
    // Frozen, the agent cannot put the links back before the test has seen them gone.
    agent.freeze();
    std::fs::remove_dir_all(&links).expect("remove the links' pins");
    // The kernel lets go of an unpinned link after an RCU grace period.
    let deadline = Instant::now() + patience(Duration::from_secs(5));
    while xdp_attached(&sandbox) {
        assert!(Instant::now() < deadline, "XDP link outlived its pin");
        std::thread::sleep(Duration::from_millis(50));
    }
    if tc_attach == "tcx" {
        while !tcx_program_ids(&sandbox.host, "up0").is_empty() {
            assert!(Instant::now() < deadline, "tcx link outlived its pin");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    agent.thaw();
    let deadline = Instant::now() + patience(Duration::from_secs(5));
    while !(pinned.iter().all(|p| p.exists()) && xdp_attached(&sandbox)) {
        assert!(
            Instant::now() < deadline,
            "not attached and pinned again:\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    one_program_attached_as(&sandbox, tc_attach);
    // Still attached a monitor tick later: the links are held by their pins, not by the
    // call that made them.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(xdp_attached(&sandbox), "XDP still attached");
    one_program_attached_as(&sandbox, tc_attach);
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7400, 5, MARK),
        0,
        "enforcing again"
    );
    agent.stop();
}

/// Whether `interface` in the host namespace has a datafence TC program or an XDP
/// program.
fn hooks_held(sandbox: &Sandbox, interface: &'static str) -> (bool, bool) {
    let tc = !tcx_program_ids(&sandbox.host, interface).is_empty()
        || !datafence_clsact_filters(&sandbox.host, interface).is_empty();
    let out = sandbox.host.ip(&format!("-j link show {interface}"));
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
    (tc, links[0].get("xdp").is_some())
}

/// An interface the policy stops naming (in `egress` or `gateway`) loses datafence's
/// programs at the next check. Left attached, they went on enforcing where the operator
/// had removed enforcement, unlisted in `status`.
fn interfaces_the_policy_stops_naming_are_detached(tc_attach: &str) {
    require_root();
    let sandbox = Sandbox::new("nd");
    sandbox.host.ip("link add up1 type veth peer name up1p");
    sandbox.host.ip("link set up1 up");
    sandbox.host.ip("link set up1p up");
    let scratch = Scratch::new("unnamed");
    let both =
        policy("", "192.0.2.2/32").replace("egress: [up0]", "egress: [up0, up1]\n  gateway: [up1]");
    let path = write_policy(&scratch, &both);
    let agent = RunningAgent::start(
        &sandbox.host,
        &path,
        &["--monitor-interval", "1", "--tc-attach", tc_attach],
    );
    assert_eq!(
        hooks_held(&sandbox, "up1"),
        (true, true),
        "attached at start"
    );
    scratch.write("policy.yaml", &policy("", "192.0.2.2/32"));
    let out = agent.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + patience(Duration::from_secs(5));
    while hooks_held(&sandbox, "up1") != (false, false) {
        assert!(
            Instant::now() < deadline,
            "still on up1: {:?}\n{}",
            hooks_held(&sandbox, "up1"),
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        agent
            .stderr()
            .contains("detached from interfaces the policy no longer names"),
        "{}",
        agent.stderr()
    );
    let attachments = agent.status_json()["attachments"].to_string();
    assert!(!attachments.contains("up1"), "{attachments}");
    // The interface it still names keeps its program, and enforcement.
    one_program_attached_as(&sandbox, tc_attach);
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7400, 5, MARK),
        0,
        "up0 still enforcing"
    );
    agent.stop();
}

fn sigterm_leaves_enforcement_in_place_and_only_detach_removes_it(tc_attach: &str) {
    require_root();
    let sandbox = Sandbox::new("tm");
    let scratch = Scratch::new("term");
    let path = write_policy(&scratch, &policy("", "192.0.2.2/32"));
    let pins = test_pin_dir("term");
    let agent = RunningAgent::start_with_pins(
        &sandbox.host,
        &path,
        &["--tc-attach", tc_attach],
        pins.clone(),
    );
    let runtime = agent.runtime_dir.clone();
    let program = one_program_attached_as(&sandbox, tc_attach);
    let (status, _agent_files) = agent.stop_leaving_enforcement();
    assert!(status.success(), "{status}");
    assert_eq!(
        one_program_attached_as(&sandbox, tc_attach),
        program,
        "the stopped agent's program stays attached"
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7500, 5, MARK),
        0,
        "still enforced"
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::EU_V4, 7500, 5, MARK),
        5
    );
    let printed = detach_pins(&sandbox.host, &runtime, &pins);
    assert!(printed.contains("tc_egress-up0"), "{printed}");
    assert!(tc_program_ids(&sandbox.host, "up0").is_empty());
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7500, 5, MARK),
        5,
        "enforcement removed"
    );
    assert!(!pins.exists(), "pinned state removed");
}

#[test]
fn a_policy_that_would_lock_the_host_out_is_refused() {
    require_root();
    let sandbox = Sandbox::new("lo");
    let scratch = Scratch::new("lockout");
    // The host is managed from 192.0.2.2; this policy exempts only 10.0.0.0/8.
    let path = write_policy(&scratch, &policy("", "10.0.0.0/8"));
    let out = sandbox
        .host
        .command(agent_binary())
        .arg("--runtime-dir")
        .arg(scratch.dir.join("run"))
        .args(["run", "--no-pin", "--policy"])
        .arg(&path)
        .args(["--management-cidr", "192.0.2.0/28"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("would lock this host out"), "{err}");
    assert!(err.contains("192.0.2."), "{err}");
    // Accepted when the risk is acknowledged, and when the exemption covers it.
    let agent = RunningAgent::start(
        &sandbox.host,
        &path,
        &["--management-cidr", "192.0.2.0/28", "--allow-lockout-risk"],
    );
    agent.stop();
    let covered = write_policy(&scratch, &policy("", "192.0.2.0/24"));
    let agent = RunningAgent::start(
        &sandbox.host,
        &covered,
        &["--management-cidr", "192.0.2.0/28"],
    );
    // A reload to a policy that no longer exempts the management network is refused;
    // the sessions established right now are judged too, by
    // netns_agent's a_policy_that_would_cut_an_established_ssh_session_is_refused_at_every_reload.
    std::fs::write(&covered, policy("", "10.0.0.0/8")).expect("write");
    let out = integration_tests::netns::command_in(&sandbox.host.name, agent_binary())
        .arg("--runtime-dir")
        .arg(&agent.runtime_dir)
        .arg("reload")
        .output()
        .expect("reload");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("would lock this host out"));
    agent.stop();
}

#[test]
fn an_interface_that_goes_away_and_comes_back_is_enforced_again() {
    require_root();
    let sandbox = Sandbox::new("hp");
    let scratch = Scratch::new("hotplug");
    let path = write_policy(&scratch, &policy("", "192.0.2.2/32"));
    let agent = RunningAgent::start(&sandbox.host, &path, &["--monitor-interval", "1"]);
    sandbox.disconnect();
    std::thread::sleep(Duration::from_millis(2500));
    sandbox.connect();
    let deadline = Instant::now() + patience(Duration::from_secs(5));
    while tc_program_ids(&sandbox.host, "up0").is_empty() {
        assert!(
            Instant::now() < deadline,
            "not attached again:\n{}",
            agent.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7600, 5, MARK),
        0
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::EU_V4, 7600, 5, MARK),
        5
    );
    let log = agent.stderr();
    assert_eq!(
        log.matches("interface is gone").count(),
        1,
        "logged once, not every check:\n{log}"
    );
    assert!(log.contains("interface is back"), "{log}");
    agent.stop();
}

fn status_reads_the_pinned_state_while_the_agent_is_stopped(tc_attach: &str) {
    require_root();
    let sandbox = Sandbox::new("ps");
    let scratch = Scratch::new("pinned-status");
    let path = write_policy(&scratch, &policy("", "192.0.2.2/32"));
    let pins = test_pin_dir("pinned-status");
    let agent = RunningAgent::start_with_pins(
        &sandbox.host,
        &path,
        &["--tc-attach", tc_attach],
        pins.clone(),
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7700, 7, MARK),
        0
    );
    std::thread::sleep(Duration::from_millis(300));
    let live = agent.status_json();
    let recent = live["recent_violations"]
        .as_array()
        .expect("recent violations");
    assert!(
        recent
            .iter()
            .any(|v| v["dst"] == addr::US_V4 && v["verdict"] == "deny"),
        "{live}"
    );
    let runtime = agent.runtime_dir.clone();
    let (_, _agent_files) = agent.stop_leaving_enforcement();
    // The agent is gone; the kernel still enforces, and status says so.
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7700, 3, MARK),
        0
    );
    let out = sandbox
        .host
        .command(agent_binary())
        .arg("--runtime-dir")
        .arg(&runtime)
        .args(["status", "--json"])
        .output()
        .expect("status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stopped: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(stopped["agent_running"], false);
    let denied: u64 = stopped["counters"]
        .as_array()
        .expect("counters")
        .iter()
        .filter(|r| r["class"] == "user-data" && r["region"] == "us-east" && r["verdict"] == "deny")
        .map(|r| r["packets"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(denied, 10, "counted while running and after: {stopped}");
    // The attachment as the kernel has it, not as the agent remembered it.
    let attachments = stopped["attachments"].as_array().expect("attachments");
    assert_eq!(attachments.len(), 1, "{stopped}");
    assert_eq!(attachments[0]["interface"], "up0", "{stopped}");
    assert_eq!(attachments[0]["hook"], "tc_egress", "{stopped}");
    assert_eq!(attachments[0]["kind"], tc_attach, "{stopped}");
    let _ = datafence::datapath::PinLayout::new(&pins).remove_all();
}

#[test]
fn a_recreated_cgroup_keeps_its_class() {
    require_root();
    let sandbox = Sandbox::new("cg");
    let scratch = Scratch::new("cgroup-recreate");
    let root = datafence::cgroups::cgroup2_root();
    let name = format!("datafence-test-recreate-{}", std::process::id());
    let dir = root.join(&name);
    let _ = std::fs::remove_dir(&dir);
    std::fs::create_dir(&dir).expect("mkdir cgroup");
    let text = policy("", "192.0.2.2/32").replace(
        "data_classes:",
        &format!(
            "data_classes:\n  api:\n    match:\n      cgroups: [/{name}]\n    allow: [eu-west]"
        ),
    );
    let path = write_policy(&scratch, &text);
    let agent = RunningAgent::start(&sandbox.host, &path, &["--monitor-interval", "1"]);
    let procs = dir.join("cgroup.procs");
    let from_cgroup = |port| {
        integration_tests::netns::udp_delivered_from_cgroup(&sandbox, &procs, addr::US_V4, port, 5)
    };
    assert_eq!(from_cgroup(7800), 0);
    // A service restart: systemd removes the cgroup and makes it again, with a new id.
    std::fs::remove_dir(&dir).expect("rmdir cgroup");
    std::fs::create_dir(&dir).expect("mkdir cgroup again");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        from_cgroup(7801),
        0,
        "the new cgroup's traffic is still user data:\n{}",
        agent.stderr()
    );
    assert!(agent.stderr().contains("their new ids are in force"));
    agent.stop();
    let _ = std::fs::remove_dir(&dir);
}

/// An agent of a newer datapath ABI takes over the pinned links and unpins the maps an
/// older one left, so an upgrade does not leave old tables in kernel memory.
#[test]
fn an_upgrade_unpins_the_maps_of_the_old_datapath_version() {
    require_root();
    let sandbox = Sandbox::new("abi");
    let scratch = Scratch::new("abi-upgrade");
    let path = write_policy(&scratch, &policy("", "192.0.2.2/32"));
    let pins = test_pin_dir("abi-upgrade");
    // What an agent of ABI 1 leaves behind: a directory of pinned maps.
    let old = pins.join("v1").join("maps");
    std::fs::create_dir_all(&old).expect("old ABI directory");
    let old_map = old.join("POLICY");
    let created = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&old_map)
        .args([
            "type", "array", "key", "4", "value", "4", "entries", "1", "name", "POLICY",
        ])
        .status()
        .expect("bpftool");
    assert!(created.success(), "bpftool map create");
    assert!(old_map.exists());
    let agent = RunningAgent::start_with_pins(&sandbox.host, &path, &[], pins.clone());
    assert!(!pins.join("v1").exists(), "the old ABI's maps are unpinned");
    assert!(
        pins.join(format!("v{}", datafence_common::ABI_VERSION))
            .join("maps")
            .join("POLICY")
            .exists()
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7700, 3, MARK),
        0,
        "enforcing"
    );
    drop(agent);
}

/// An upgrade to another build of the same ABI: the new agent's entry programs jump to
/// stages of their own build, and once it holds every link the earlier build's stage
/// arrays are unpinned (they would otherwise keep its programs in kernel memory).
#[test]
fn an_upgrade_unpins_the_stages_of_the_old_build() {
    require_root();
    let sandbox = Sandbox::new("stg");
    let scratch = Scratch::new("stage-upgrade");
    let path = write_policy(&scratch, &policy("", "192.0.2.2/32"));
    let pins = test_pin_dir("stage-upgrade");
    let abi = pins.join(format!("v{}", datafence_common::ABI_VERSION));
    // What an earlier build leaves behind: its stage array, pinned under its digest.
    let old = abi.join("stages-0123456789abcdef");
    std::fs::create_dir_all(&old).expect("old stages directory");
    let old_array = old.join("TC_STAGES");
    let created = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&old_array)
        .args([
            "type",
            "prog_array",
            "key",
            "4",
            "value",
            "4",
            "entries",
            "1",
            "name",
            "TC_STAGES",
        ])
        .status()
        .expect("bpftool");
    assert!(created.success(), "bpftool map create");
    let agent = RunningAgent::start_with_pins(&sandbox.host, &path, &[], pins.clone());
    assert!(!old.exists(), "the earlier build's stages are unpinned");
    let ours = abi.join(format!("stages-{}", datafence::datapath::object_digest()));
    for name in ["TC_STAGES", "XDP_STAGES", "TC_JOB", "XDP_JOB"] {
        assert!(
            ours.join(name).exists(),
            "{name} is pinned with this build's stages"
        );
    }
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7701, 3, MARK),
        0,
        "enforcing through this build's judge"
    );
    drop(agent);
}

#[test]
fn programs_bound_to_maps_that_are_gone_are_loaded_anew_not_adopted() {
    require_root();
    let sandbox = Sandbox::new("rb");
    let scratch = Scratch::new("rebound");
    let path = write_policy(&scratch, &policy("", "192.0.2.2/32"));
    let pins = test_pin_dir("rebound");
    let kind = if integration_tests::kernel_has_tcx() {
        "tcx"
    } else {
        "clsact"
    };
    let mut agent = RunningAgent::start_with_pins(&sandbox.host, &path, &[], pins.clone());
    let first = one_program_attached_as(&sandbox, kind);
    agent.kill9();
    agent.keep_pins = true;
    // A partial cleanup: the maps' pins go, the links and this build's programs stay. The
    // programs still hold the old maps; adopting them would leave the next agent writing
    // policies into maps nothing reads.
    let maps = pins
        .join(format!("v{}", datafence_common::ABI_VERSION))
        .join("maps");
    std::fs::remove_dir_all(&maps).expect("remove the maps' pins");
    let agent = RunningAgent::start_with_pins(&sandbox.host, &path, &[], pins.clone());
    assert!(
        !agent.stderr().contains("adopted the programs"),
        "{}",
        agent.stderr()
    );
    assert_ne!(
        one_program_attached_as(&sandbox, kind),
        first,
        "programs loaded anew, bound to the new maps"
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7702, 3, MARK),
        0,
        "enforcing the policy written into the new maps"
    );
    assert_eq!(
        agent.packets(&[("region", "us-east"), ("verdict", "deny")]),
        3,
        "counted in the new maps"
    );
    drop(agent);
}

/// The range entries per slot of the IPv4 table pinned under `pins`: the size of the
/// array in its active slot.
fn pinned_v4_ranges(pins: &Path) -> u32 {
    let path = pins
        .join(format!("v{}", datafence_common::ABI_VERSION))
        .join("maps")
        .join(datafence_common::map_names::V4_RANGES);
    let outer = aya::maps::Map::ArrayOfMaps(
        aya::maps::MapData::from_pin(&path).expect("the pinned IPv4 range table"),
    );
    let outer: aya::maps::ArrayOfMaps<_, aya::maps::MapData> =
        aya::maps::ArrayOfMaps::try_from(outer).expect("an array of maps");
    let array = (0..datafence_common::SLOTS)
        .find_map(|slot| outer.get(&slot, 0).ok())
        .expect("a slot's range array");
    let info = array.info().expect("its info");
    info.max_entries() * datafence_common::v4::V4_LANES as u32
}

/// Pinned maps keep their size, so a policy that outgrew them used to be refused until
/// `detach` (a gap). Now the next agent moves the old datapath aside, makes maps of the
/// size the policy needs and moves every link to them: under traffic, nothing leaks and
/// nothing is falsely dropped, and the counters and generations carry on. A policy that
/// shrank far below its tables gets smaller ones the same way.
#[test]
fn a_policy_that_outgrew_the_pinned_tables_gets_new_ones_with_no_gap() {
    require_root();
    let sandbox = Sandbox::new("og");
    let scratch = Scratch::new("outgrow");
    let path = write_policy(&scratch, &policy("", "192.0.2.2/32"));
    let pins = test_pin_dir("outgrow");
    let mut agent = RunningAgent::start_with_pins(&sandbox.host, &path, &[], pins.clone());
    let room = pinned_v4_ranges(&pins);
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7703, 3, MARK),
        0,
        "enforcing"
    );
    let denied = [("region", "us-east"), ("verdict", "deny")];
    assert_eq!(agent.packets(&denied), 3);
    // 200,000 separate host routes draw 400,000 boundaries: past the room the first
    // policy's tables were made with.
    let hosts = (0..200_000u32)
        .map(|i| format!("{}/32\n", std::net::Ipv4Addr::from(0x0a00_0000 + (i << 4))));
    let eu_west: String = std::iter::once("198.51.100.0/24\n".to_owned())
        .chain(hosts)
        .collect();
    assert!(400_000 > room, "the first tables have room for {room}");
    let traffic = Traffic::start(&sandbox);
    std::thread::sleep(Duration::from_secs(1));
    agent.kill9();
    agent.keep_pins = true;
    scratch.write("regions/eu-west.txt", &eu_west);
    let agent = RunningAgent::start_with_pins(&sandbox.host, &path, &[], pins.clone());
    let (sent_eu, got_eu, sent_us, leaked) = traffic.finish();
    println!(
        "outgrown tables: {sent_eu} sent to eu-west, {got_eu} arrived; {sent_us} sent to us-east, {leaked} leaked; room {room} -> {}",
        pinned_v4_ranges(&pins)
    );
    let log = agent.stderr();
    assert!(log.contains("outgrew the pinned region tables"), "{log}");
    assert!(log.contains("unpinned the outgrown datapath"), "{log}");
    assert!(
        pinned_v4_ranges(&pins) >= 400_000,
        "tables made at the policy's size"
    );
    let left: Vec<_> = std::fs::read_dir(&pins)
        .expect("pins")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("outgrown-"))
        .collect();
    assert!(left.is_empty(), "the old datapath is unpinned: {left:?}");
    assert!(sent_us > 1000, "traffic flowed throughout ({sent_us})");
    assert_eq!(leaked, 0, "packets that should have been dropped arrived");
    assert_eq!(got_eu, sent_eu, "false drops: {}", sent_eu - got_eu);
    // The old programs counted the traffic of the second before the restart: without
    // their counters the total would be short by at least that.
    let total = agent.packets(&denied);
    assert!(
        total >= 3 + sent_us * 9 / 10 && total <= 3 + sent_us,
        "denials to us-east: {total}, of 3 + {sent_us} sent"
    );
    assert_eq!(
        agent.status_json()["policy"]["generation"],
        2,
        "the new maps number the policy after the old one's"
    );
    // Shrunk back, the policy would leave the big tables mostly empty: the next start
    // makes them at its size again.
    let mut agent = agent;
    agent.kill9();
    agent.keep_pins = true;
    scratch.write("regions/eu-west.txt", "198.51.100.0/24\n");
    let agent = RunningAgent::start_with_pins(&sandbox.host, &path, &[], pins.clone());
    let log = agent.stderr();
    assert!(log.contains("far larger than the policy needs"), "{log}");
    assert_eq!(
        pinned_v4_ranges(&pins),
        room,
        "tables back at the first size"
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7705, 3, MARK),
        0,
        "enforcing"
    );
    assert_eq!(agent.packets(&denied), total + 3, "the counters carry on");
    assert_eq!(agent.status_json()["policy"]["generation"], 3);
    drop(agent);
}

/// An agent that died after moving an outgrown datapath aside, before unpinning it,
/// leaves it behind; the next one unpins it once its own programs hold every link.
#[test]
fn an_outgrown_datapath_left_by_a_dead_agent_is_unpinned() {
    require_root();
    let sandbox = Sandbox::new("od");
    let scratch = Scratch::new("outgrown-left");
    let path = write_policy(&scratch, &policy("", "192.0.2.2/32"));
    let pins = test_pin_dir("outgrown-left");
    let old = pins
        .join("outgrown-1")
        .join(format!("v{}", datafence_common::ABI_VERSION))
        .join("maps");
    std::fs::create_dir_all(&old).expect("retired directory");
    let created = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(old.join("POLICY"))
        .args([
            "type", "array", "key", "4", "value", "4", "entries", "1", "name", "POLICY",
        ])
        .status()
        .expect("bpftool");
    assert!(created.success(), "bpftool map create");
    let agent = RunningAgent::start_with_pins(&sandbox.host, &path, &[], pins.clone());
    assert!(
        !pins.join("outgrown-1").exists(),
        "the retired datapath is unpinned"
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7704, 3, MARK),
        0,
        "enforcing"
    );
    drop(agent);
}

/// A second agent on the same pin directory would write its own policy into the maps
/// the first one enforces: it exits at once, naming the first.
#[test]
fn a_second_agent_on_the_same_pins_exits_naming_the_first() {
    require_root();
    let sandbox = Sandbox::new("lo");
    let scratch = Scratch::new("pinlock");
    let path = write_policy(&scratch, &policy("", "10.0.0.0/8"));
    let first = RunningAgent::start_with_pins(&sandbox.host, &path, &[], test_pin_dir("pinlock"));
    let generation = first.status_json()["policy"]["generation"].clone();
    let second = Scratch::new("pinlock-second");
    let other_policy = write_policy(&second, &policy(", us-east", "10.0.0.0/8"));
    let holder = format!("process {}", first.child.id());
    let out = output_within(
        sandbox
            .host
            .command(agent_binary())
            .arg("--runtime-dir")
            .arg(scratch.dir.join("second-run"))
            .args(["run", "--socket-ring", "off", "--policy"])
            .arg(&other_policy)
            .arg("--pin-dir")
            .arg(&first.pin_dir),
        patience(Duration::from_secs(10)),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second agent ran:\n{err}");
    assert!(err.contains(&holder), "{err}");
    assert!(err.contains("one agent per pin directory"), "{err}");
    // `detach` asks the owner through its socket, which answers: it refuses.
    let out = output_within(
        sandbox
            .host
            .command(agent_binary())
            .arg("--runtime-dir")
            .arg(scratch.dir.join("second-run"))
            .arg("detach")
            .arg("--pin-dir")
            .arg(&first.pin_dir),
        patience(Duration::from_secs(10)),
    );
    assert!(
        !out.status.success(),
        "detach went ahead:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The first agent enforces its own policy still, from its own pins.
    let status = first.status_json();
    assert_eq!(status["agent_running"], true, "{status:#}");
    assert_eq!(status["policy"]["generation"], generation, "{status:#}");
    let pins = datafence::datapath::PinLayout::new(&first.pin_dir);
    assert!(
        pins.map(datafence_common::map_names::POLICY).exists(),
        "the pins are still there"
    );
    first.stop();
}

/// An offline `detach` leaves alone a pin directory whose lock a process holds without
/// answering on a control socket (a stuck agent, or one with another runtime directory),
/// and names it.
#[test]
fn detach_leaves_pins_whose_lock_is_held() {
    require_root();
    let scratch = Scratch::new("pinlock-detach");
    let pins = test_pin_dir("pinlock-detach");
    let maps = datafence::datapath::PinLayout::new(&pins).maps_dir();
    std::fs::create_dir_all(&maps).expect("create the pin directory");
    let lock = std::fs::File::open(&pins).expect("open the pin directory");
    lock.try_lock().expect("lock it");
    let out = output_within(
        std::process::Command::new(agent_binary())
            .arg("--runtime-dir")
            .arg(scratch.dir.join("run"))
            .arg("detach")
            .arg("--pin-dir")
            .arg(&pins),
        patience(Duration::from_secs(10)),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "detach went ahead:\n{err}");
    assert!(
        err.contains(&format!("process {}", std::process::id())),
        "{err}"
    );
    assert!(maps.is_dir(), "the pins were removed");
    drop(lock);
    let out = std::process::Command::new(agent_binary())
        .arg("--runtime-dir")
        .arg(scratch.dir.join("run"))
        .arg("detach")
        .arg("--pin-dir")
        .arg(&pins)
        .output()
        .expect("detach");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pins.exists(), "detached once the lock is free");
}
