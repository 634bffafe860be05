//! What operators see: exact counters on /metrics, violation lines, folding under a flood,
//! and /healthz following the programs' attachment.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use integration_tests::{
    Scratch,
    agent::RunningAgent,
    detach_links_of_program,
    netns::{NetNs, Sandbox, addr, udp_delivered_marked},
    require_root,
};

const METRICS: &str = "127.0.0.1:9477";

const POLICY: &str = r#"
version: 1
interfaces:
  egress: [up0]
regions:
  eu-west:
    cidrs: [198.51.100.0/24, "2001:db8:100::/48"]
  us-east:
    cidrs: [203.0.113.0/24, "2001:db8:300::/48"]
data_classes:
  user-data:
    match:
      marks: [{value: 0x42}]
    allow: [eu-west]
"#;

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
    RunningAgent::start(&sandbox.host, &policy, &args)
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
        Some((37 * 46 + 11 * 66) as f64),
        "{body}"
    );
    for name in [
        "datafence_events_lost_total",
        "datafence_events_suppressed_total",
        "datafence_policy_info{",
        "datafence_policy_prefixes{family=\"ipv4\"} 2",
        "datafence_policy_last_reload_timestamp_seconds",
        "datafence_policy_reload_total{result=\"success\"} 0",
        "datafence_map_entries{map=\"REGIONS_V4\"} 2",
        "datafence_map_capacity{map=\"REGIONS_V4\"}",
        "datafence_programs_attached{interface=\"up0\",hook=\"tc_egress\"} 1",
        "datafence_build_info{",
        "datafence_map_memory_bytes{map=\"DIR24\"}",
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
    const FLOOD: u64 = 100_000;
    let dst: SocketAddr = format!("{}:7000", addr::US_V4).parse().expect("addr");
    sandbox.host.run(move || {
        let sock = UdpSocket::bind("0.0.0.0:0").expect("bind");
        // SAFETY: setsockopt with a valid fd and a u32 option.
        let mark = 0x42u32;
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&sock),
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&mark as *const u32).cast(),
                4,
            )
        };
        assert_eq!(rc, 0);
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

    let prog_ids: Vec<u32> = sandbox.host.run(|| {
        aya::programs::SchedClassifier::query_tcx("up0", aya::programs::TcAttachType::Egress)
            .expect("query tcx")
            .1
            .iter()
            .map(|p| p.id())
            .collect()
    });
    assert_eq!(prog_ids.len(), 1);
    assert_eq!(detach_links_of_program(prog_ids[0]), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
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
