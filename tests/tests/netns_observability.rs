//! What operators see: exact counters on /metrics, violation lines, folding under a flood,
//! and /healthz following the programs' attachment.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use integration_tests::{
    Scratch,
    agent::{RunningAgent, test_pin_dir},
    detach_tc_from_outside,
    foreign::{Foreign, Place, TC_ACT_OK, TC_NEXT},
    netns::{NetNs, Sandbox, addr, udp_delivered_marked},
    patience, require_root, tc_program_ids,
};

const METRICS: &str = "127.0.0.1:9477";

const POLICY: &str = integration_tests::MARKED_CLASS_POLICY;

/// GET over plain HTTP/1.0 from inside the namespace; returns (status, body).
fn http_get(ns: &NetNs, path: &'static str) -> (u16, String) {
    ns.run(move || {
        let addr: SocketAddr = METRICS.parse().expect("addr");
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("send");
        let mut text = String::new();
        s.read_to_string(&mut text).expect("read");
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map_or("", |(_, b)| b)
            .to_owned();
        (status, body)
    })
}

/// The value of the first series whose line starts with `prefix`.
fn metric(body: &str, prefix: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

fn start(sandbox: &Sandbox, scratch: &Scratch, extra: &[&str]) -> RunningAgent {
    let policy = scratch.write("policy.yaml", POLICY);
    let mut args = vec!["--metrics-addr", METRICS];
    args.extend_from_slice(extra);
    let agent = RunningAgent::start(&sandbox.host, &policy, &args);
    // The agent binds its metrics listener before it loads anything, so by the time it
    // reports ready a scrape connects (it once came up a moment later, and the first GET
    // of a fresh-clone CI run was refused).
    assert!(
        sandbox.host.run(|| {
            let addr: SocketAddr = METRICS.parse().expect("addr");
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        }),
        "the metrics listener is not up when the agent reports ready"
    );
    agent
}

#[test]
fn metrics_count_exactly_what_was_sent() {
    require_root();
    let sandbox = Sandbox::new("mx");
    let scratch = Scratch::new("metrics");
    let agent = start(&sandbox, &scratch, &[]);
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7000, 37, 0x42),
        0
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::EU_V4, 7000, 23, 0x42),
        23
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V6, 7000, 11, 0x42),
        0
    );

    let (status, body) = http_get(&sandbox.host, "/metrics");
    assert_eq!(status, 200, "{body}");
    let series = |region: &str, verdict: &str, reason: &str| {
        format!(
            "datafence_packets_total{{interface=\"up0\",hook=\"tc_egress\",class=\"user-data\",region=\"{region}\",verdict=\"{verdict}\",reason=\"{reason}\"}}"
        )
    };
    assert_eq!(
        metric(&body, &series("us-east", "deny", "region_denied")),
        Some(48.0),
        "{body}"
    );
    assert_eq!(
        metric(&body, &series("eu-west", "allow", "region_allowed")),
        Some(23.0),
        "{body}"
    );
    // Each UDP datagram here is 4 bytes of payload: 14 + 20 + 8 + 4 bytes for IPv4 and
    // 14 + 40 + 8 + 4 for IPv6.
    let bytes = series("us-east", "deny", "region_denied").replace("packets_total", "bytes_total");
    assert_eq!(
        metric(&body, &bytes),
        Some(f64::from(37 * 46 + 11 * 66)),
        "{body}"
    );
    for name in [
        "datafence_events_lost_total",
        "datafence_events_suppressed_total",
        "datafence_policy_info{",
        "datafence_policy_prefixes{family=\"ipv4\"} 2",
        "datafence_policy_last_reload_timestamp_seconds",
        "datafence_policy_reload_total{result=\"success\"} 0",
        "datafence_map_entries{map=\"V4_RANGES\"}",
        "datafence_map_capacity{map=\"V4_RANGES\"}",
        "datafence_map_entries{map=\"V6_RANGES\"}",
        "datafence_programs_attached{interface=\"up0\",hook=\"tc_egress\"} 1",
        "datafence_build_info{",
        "datafence_map_memory_bytes{map=\"V4_INDEX\"}",
        "datafence_violations_total{class=\"user-data\",region=\"us-east\",verdict=\"deny\"} 48",
    ] {
        assert!(body.contains(name), "{name} missing from\n{body}");
    }
    assert!(!body.contains("198.51.100"), "no addresses in labels");

    // A reload keeps counters where they were.
    let out = agent.cli(&["reload"]);
    assert!(out.status.success());
    let (_, body) = http_get(&sandbox.host, "/metrics");
    assert_eq!(
        metric(&body, &series("us-east", "deny", "region_denied")),
        Some(48.0)
    );
    assert!(body.contains("datafence_policy_reload_total{result=\"success\"} 1"));
    agent.stop();
}

#[test]
fn a_flood_of_violations_yields_a_bounded_number_of_lines_that_add_up() {
    const FLOOD: u64 = 100_000;
    require_root();
    let sandbox = Sandbox::new("fl");
    let scratch = Scratch::new("flood");
    let file = scratch.dir.join("violations.jsonl");
    let file_arg = file.to_str().expect("utf-8").to_owned();
    let agent = start(
        &sandbox,
        &scratch,
        &["--fold-interval", "1", "--violations-file", &file_arg],
    );
    let dst: SocketAddr = format!("{}:7000", addr::US_V4).parse().expect("addr");
    sandbox.host.run(move || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        integration_tests::netns::set_mark(std::os::fd::AsRawFd::as_raw_fd(&sock), 0x42);
        for _ in 0..FLOOD {
            let _ = sock.send_to(b"flood", dst);
        }
    });
    // Let the folded lines and the unreported-events line be written.
    std::thread::sleep(Duration::from_millis(3500));
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&file)
        .expect("violations file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let flow: Vec<&serde_json::Value> = lines.iter().filter(|l| l["dst"] == addr::US_V4).collect();
    assert!(
        !flow.is_empty() && flow.len() <= 20,
        "{} lines for one flooding flow",
        flow.len()
    );
    assert_eq!(flow[0]["count"], 1, "the first packet is reported at once");
    let reported: u64 = flow.iter().map(|l| l["count"].as_u64().unwrap_or(0)).sum();
    let unreported: u64 = lines
        .iter()
        .filter(|l| l["event"] == "violations_unreported")
        .map(|l| l["suppressed"].as_u64().unwrap_or(0) + l["lost"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        reported + unreported,
        FLOOD,
        "{reported} reported + {unreported} not"
    );
    let (_, body) = http_get(&sandbox.host, "/metrics");
    let denied = metric(
        &body,
        "datafence_packets_total{interface=\"up0\",hook=\"tc_egress\",class=\"user-data\",region=\"us-east\",verdict=\"deny\"",
    );
    assert_eq!(denied, Some(FLOOD as f64));
    // The same lines went to stdout (journald under systemd).
    let stdout_lines = agent.violations().len();
    assert_eq!(stdout_lines, lines.len());
    agent.stop();
}

#[test]
fn healthz_follows_the_attachment() {
    require_root();
    let sandbox = Sandbox::new("hz");
    let scratch = Scratch::new("healthz");
    let agent = start(&sandbox, &scratch, &[]);
    let (status, body) = http_get(&sandbox.host, "/healthz");
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("up0 tc_egress attached"), "{body}");

    // As another tool or an operator would: the tcx link, or the clsact filter on a
    // kernel without tcx.
    assert_eq!(tc_program_ids(&sandbox.host, "up0").len(), 1);
    assert_eq!(detach_tc_from_outside(&sandbox.host, "up0"), 1);
    let deadline = Instant::now() + patience(Duration::from_secs(5));
    loop {
        let (status, body) = http_get(&sandbox.host, "/healthz");
        if status == 503 {
            assert!(body.contains("up0 tc_egress DETACHED"), "{body}");
            break;
        }
        // The agent may already have noticed and reattached; then healthz is 200 again
        // and the reattach counter shows it.
        let (_, metrics) = http_get(&sandbox.host, "/metrics");
        if metric(&metrics, "datafence_programs_reattached_total").unwrap_or(0.0) >= 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "healthz stayed {status}: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    agent.stop();
}

integration_tests::for_each_tc_attach!(
    programs_after_datafence_still_see_the_packets_it_allows,
    a_program_ahead_of_datafence_is_reported_and_unhealthy,
);

/// datafence passes what it allows on to the next program (tcx's "next", clsact's
/// `TC_ACT_UNSPEC`) instead of ending the chain: Cilium, Calico or a site's own program
/// after it still runs. What it drops, nothing after it sees.
fn programs_after_datafence_still_see_the_packets_it_allows(kind: &str) {
    const SENT: u32 = 10;
    require_root();
    let sandbox = Sandbox::new("af");
    let scratch = Scratch::new("after");
    let agent = start(&sandbox, &scratch, &["--tc-attach", kind]);
    let place = if kind == "tcx" {
        Place::TcxLast
    } else {
        Place::Clsact { priority: 100 }
    };
    let after = Foreign::attach(&sandbox.host, "up0", TC_NEXT, place, &test_pin_dir("after"));
    let before = after.packets();
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::EU_V4, 7301, SENT, 0x42),
        SENT
    );
    let allowed = after.packets() - before;
    assert!(
        allowed >= u64::from(SENT),
        "the program after datafence saw {allowed} of {SENT} allowed packets"
    );
    let before = after.packets();
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7302, SENT, 0x42),
        0
    );
    let denied = after.packets() - before;
    assert!(
        denied < u64::from(SENT),
        "the program after datafence saw {denied} packets while {SENT} were dropped"
    );
    agent.stop();
}

/// A program linked ahead of datafence's decides first: one that returns "ok" lets
/// user data out unjudged. The agent cannot stop a holder of CAP_NET_ADMIN from doing
/// that, but it says so: in `status`, on /metrics, and as a /healthz failure.
fn a_program_ahead_of_datafence_is_reported_and_unhealthy(kind: &str) {
    require_root();
    let sandbox = Sandbox::new("ah");
    let scratch = Scratch::new("ahead");
    let agent = start(&sandbox, &scratch, &["--tc-attach", kind]);
    let (status, body) = http_get(&sandbox.host, "/healthz");
    assert_eq!(status, 200, "{body}");
    let place = if kind == "tcx" {
        Place::TcxFirst
    } else {
        // At datafence's own priority, the filter added later runs first.
        Place::Clsact {
            priority: datafence::clsact::PRIORITY,
        }
    };
    let ahead = Foreign::attach(
        &sandbox.host,
        "up0",
        TC_ACT_OK,
        place,
        &test_pin_dir("ahead"),
    );
    // What it makes possible: user data to a denied region, out unjudged.
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7303, 5, 0x42),
        5
    );
    assert!(ahead.packets() >= 5);
    let status_json = agent.status_json();
    assert_eq!(
        status_json["attachments"][0]["programs_ahead"],
        serde_json::json!([ahead.id()]),
        "{status_json}"
    );
    let out = agent.cli(&["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("programs ahead of datafence (ids {})", ahead.id())),
        "{text}"
    );
    // Scrapes share a snapshot for a moment; wait for one taken after the attach.
    let deadline = Instant::now() + patience(Duration::from_secs(5));
    loop {
        let (status, body) = http_get(&sandbox.host, "/healthz");
        if status == 503 {
            assert!(
                body.contains(&format!(
                    "up0 tc_egress attached, 1 PROGRAM AHEAD (ids {})",
                    ahead.id()
                )),
                "{body}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "healthz stayed {status}: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, metrics) = http_get(&sandbox.host, "/metrics");
    assert_eq!(
        metric(
            &metrics,
            "datafence_programs_ahead{interface=\"up0\",hook=\"tc_egress\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    agent.stop();
}

/// A link an earlier agent pinned keeps its place in the chain when a new agent adopts it.
/// If a program was linked ahead of it meanwhile (or the earlier agent appended its link
/// last, as agents did before datafence linked itself first), the new agent takes the
/// first place back, without a moment in which nothing judges.
#[test]
fn a_restart_moves_datafence_ahead_of_a_program_linked_before_it() {
    require_root();
    if !integration_tests::kernel_has_tcx() {
        integration_tests::assert_tcx_is_refused();
        return;
    }
    let sandbox = Sandbox::new("mv");
    let scratch = Scratch::new("relink");
    let pins = test_pin_dir("relink");
    let policy = scratch.write("policy.yaml", POLICY);
    let args = ["--tc-attach", "tcx"];
    let first = RunningAgent::start_with_pins(&sandbox.host, &policy, &args, pins.clone());
    let ahead = Foreign::attach(
        &sandbox.host,
        "up0",
        TC_ACT_OK,
        Place::TcxFirst,
        &test_pin_dir("relink-foreign"),
    );
    // While it is ahead, it decides: user data leaves for a denied region unjudged.
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7311, 5, 0x42),
        5
    );
    let (_, _first_scratch) = first.stop_leaving_enforcement();

    let second = RunningAgent::start_with_pins(&sandbox.host, &policy, &args, pins);
    let status = second.status_json();
    assert!(
        status["attachments"][0]["programs_ahead"].is_null(),
        "{status}"
    );
    let chain = integration_tests::tcx_program_ids(&sandbox.host, "up0");
    assert_eq!(
        chain.len(),
        2,
        "datafence's link and the other program: {chain:?}"
    );
    assert_eq!(chain[1], ahead.id(), "{chain:?}");
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7312, 5, 0x42),
        0
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::EU_V4, 7313, 5, 0x42),
        5
    );
    assert!(
        second
            .stderr()
            .contains("moved datafence's tcx link ahead of programs linked before it"),
        "{}",
        second.stderr()
    );
    second.stop();
}
