//! Which interfaces the agent attaches to when no list names them: every interface in
//! its namespace but loopback and the excluded ones, including interfaces created while
//! it runs, judged from their first packet.

use std::time::{Duration, Instant};

use integration_tests::{
    Scratch,
    agent::RunningAgent,
    netns::{Sandbox, addr, sh, udp_delivered_marked},
    require_root,
};

const MARK: u32 = 0x42;

/// No `interfaces.egress`: every interface is attached, but those named `skip*`.
const EVERY_INTERFACE_POLICY: &str = r#"
version: 1
interfaces:
  exclude: ["skip*"]
exempt: [192.0.2.2/32]
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

fn start(sandbox: &Sandbox, scratch: &Scratch) -> RunningAgent {
    let policy = scratch.write("policy.yaml", EVERY_INTERFACE_POLICY);
    RunningAgent::start(&sandbox.host, &policy, &[])
}

/// The interfaces the agent reports TC egress attached to.
fn tc_attached(agent: &RunningAgent) -> Vec<String> {
    let status = agent.status_json();
    let mut names: Vec<String> = status["attachments"]
        .as_array()
        .expect("attachments")
        .iter()
        .filter(|a| a["hook"] == "tc_egress" && a["attached"] != false)
        .map(|a| a["interface"].as_str().expect("interface").to_owned())
        .collect();
    names.sort();
    names
}

/// Packets the kernel counted as denied for the user-data class, so far.
fn denied(agent: &RunningAgent) -> u64 {
    agent.packets(&[("class", "user-data"), ("verdict", "deny")])
}

/// Whether the agent reported a denied packet on `interface` within 10 s (violations are
/// reported shortly after the kernel counts them; repeats are folded into later lines).
fn reported_on(agent: &RunningAgent, interface: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = agent
            .violations()
            .iter()
            .any(|v| v["interface"] == interface && v["verdict"] == "deny");
        if seen || Instant::now() > deadline {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A veth pair from the sandbox's host to its world, `host_dev` with `.1` and `world_dev`
/// with `.2` of `subnet` (`10.77.0`), up, with a static neighbour so traffic flows from
/// the first packet.
fn second_link(sandbox: &Sandbox, host_dev: &str, world_dev: &str, subnet: &str) {
    let (h, w) = (&sandbox.host.name, &sandbox.world.name);
    let out = sh(&[
        "ip",
        "link",
        "add",
        host_dev,
        "netns",
        h,
        "type",
        "veth",
        "peer",
        "name",
        world_dev,
        "address",
        "02:df:00:00:01:02",
        "netns",
        w,
    ]);
    assert!(out.status.success(), "{out:?}");
    sandbox
        .host
        .ip(&format!("addr add {subnet}.1/24 dev {host_dev}"));
    sandbox
        .world
        .ip(&format!("addr add {subnet}.2/24 dev {world_dev}"));
    sandbox.world.ip(&format!("link set {world_dev} up"));
    sandbox.host.ip(&format!("link set {host_dev} up"));
    sandbox.host.ip(&format!(
        "neigh replace {subnet}.2 lladdr 02:df:00:00:01:02 dev {host_dev} nud permanent"
    ));
}

#[test]
fn without_a_list_every_interface_but_loopback_is_attached() {
    require_root();
    let sandbox = Sandbox::new("ea");
    let scratch = Scratch::new("every");
    let agent = start(&sandbox, &scratch);
    assert_eq!(tc_attached(&agent), ["up0"]);
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7401, 5, MARK),
        0
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::EU_V4, 7402, 5, MARK),
        5
    );
    agent.stop();
}

/// The two ways round a default-route-only attach that leaked before: a default route
/// in another routing table chosen by `ip rule` (as wg-quick sets up), and a device
/// with nothing but a specific route. Each device is created, addressed, routed and
/// used at once, without waiting for the agent: the agent attaches on the kernel's
/// link notification, before the device has an address.
#[test]
fn an_interface_created_while_the_agent_runs_is_judged_from_its_first_packet() {
    require_root();
    let sandbox = Sandbox::new("eb");
    let scratch = Scratch::new("created");
    let agent = start(&sandbox, &scratch);

    // Marked traffic goes out through wg0 by a rule and another table's default route.
    second_link(&sandbox, "wg0", "wgw0", "10.77.0");
    sandbox.host.ip("rule add fwmark 0x42 lookup 100");
    sandbox
        .host
        .ip("route add default via 10.77.0.2 dev wg0 table 100");
    let before = denied(&agent);
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7411, 20, MARK),
        0,
        "user data to the denied region through a device created a moment ago"
    );
    assert_eq!(denied(&agent) - before, 20, "each packet judged and denied");
    assert!(reported_on(&agent, "wg0"), "judged on wg0");
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::EU_V4, 7412, 20, MARK),
        20,
        "user data to the approved region through it arrives"
    );
    sandbox.host.ip("rule del fwmark 0x42 lookup 100");

    // A specific route to one denied address, and no default route at all.
    let far = "203.0.113.77";
    sandbox.world.ip(&format!("addr add {far}/32 dev lo"));
    second_link(&sandbox, "wg1", "wgw1", "10.78.0");
    sandbox
        .host
        .ip(&format!("route add {far}/32 via 10.78.0.2 dev wg1"));
    let before = denied(&agent);
    assert_eq!(udp_delivered_marked(&sandbox, far, 7413, 20, MARK), 0);
    assert_eq!(denied(&agent) - before, 20, "each packet judged and denied");
    assert!(reported_on(&agent, "wg1"), "judged on wg1");

    assert_eq!(tc_attached(&agent), ["up0", "wg0", "wg1"]);
    agent.stop();
}

/// An interface whose only route is its connected subnet, which lies in a denied region:
/// a default-route-only attach never looked at it, and user data to that subnet left
/// unjudged. Attached like every interface, it is judged from the first packet, and
/// the agent names the subnet as a possible false drop in its log.
#[test]
fn an_interface_whose_connected_subnet_is_in_a_denied_region_is_judged() {
    require_root();
    let sandbox = Sandbox::new("ef");
    let scratch = Scratch::new("connected");
    let agent = start(&sandbox, &scratch);
    second_link(&sandbox, "lan0", "lanw0", "203.0.113");
    let peer = "203.0.113.2";
    let before = denied(&agent);
    assert_eq!(
        udp_delivered_marked(&sandbox, peer, 7441, 20, MARK),
        0,
        "user data to the denied subnet"
    );
    assert_eq!(denied(&agent) - before, 20, "each packet judged and denied");
    assert!(reported_on(&agent, "lan0"), "judged on lan0");
    assert_eq!(
        udp_delivered_marked(&sandbox, peer, 7442, 20, 0),
        20,
        "other traffic to it passes"
    );
    agent.stop();
}

/// A VXLAN overlay over the attached uplink: its outer packets go to an exempt address
/// and pass, so only the overlay device's own hook sees the inner destination. An
/// overlay the policy excludes is left alone, and its inner packets pass unjudged, which
/// is what excluding it asks for.
#[test]
fn a_vxlan_overlay_is_judged_by_its_inner_packets_unless_excluded() {
    require_root();
    let sandbox = Sandbox::new("ec");
    let scratch = Scratch::new("vxlan");
    let agent = start(&sandbox, &scratch);
    for (vni, host_dev, subnet) in [(42, "vx0", "10.79.0"), (43, "skipvx0", "10.80.0")] {
        let world_dev = format!("vxw{vni}");
        for (ns, dev, local, remote, under, mac) in [
            (
                &sandbox.host,
                host_dev,
                addr::HOST_V4,
                addr::WORLD_V4,
                "up0",
                "02:df:00:00:02:01",
            ),
            (
                &sandbox.world,
                world_dev.as_str(),
                addr::WORLD_V4,
                addr::HOST_V4,
                "dn0",
                "02:df:00:00:02:02",
            ),
        ] {
            ns.ip(&format!(
                "link add {dev} address {mac} type vxlan id {vni} local {local} remote {remote} dstport 4789 dev {under}"
            ));
            let host_part = if ns.name == sandbox.host.name { 1 } else { 2 };
            ns.ip(&format!("addr add {subnet}.{host_part}/24 dev {dev}"));
            ns.ip(&format!("link set {dev} up"));
        }
        sandbox.host.ip(&format!(
            "neigh replace {subnet}.2 lladdr 02:df:00:00:02:02 dev {host_dev} nud permanent"
        ));
    }
    let (refused, approved, unjudged) = ("203.0.113.79", "198.51.100.79", "203.0.113.80");
    for a in [refused, approved, unjudged] {
        sandbox.world.ip(&format!("addr add {a}/32 dev lo"));
    }
    sandbox
        .host
        .ip(&format!("route add {refused}/32 via 10.79.0.2 dev vx0"));
    sandbox
        .host
        .ip(&format!("route add {approved}/32 via 10.79.0.2 dev vx0"));
    sandbox.host.ip(&format!(
        "route add {unjudged}/32 via 10.80.0.2 dev skipvx0"
    ));

    let before = denied(&agent);
    assert_eq!(udp_delivered_marked(&sandbox, refused, 7421, 20, MARK), 0);
    assert_eq!(denied(&agent) - before, 20, "each packet judged and denied");
    assert!(reported_on(&agent, "vx0"), "judged on the overlay");
    assert_eq!(
        udp_delivered_marked(&sandbox, approved, 7422, 20, MARK),
        20,
        "the overlay carries approved user data"
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, unjudged, 7423, 20, MARK),
        20,
        "an excluded overlay is left alone"
    );
    assert_eq!(tc_attached(&agent), ["up0", "vx0"]);
    agent.stop();
}

/// With every interface attached, a connected subnet that a class may not reach is a
/// false drop waiting to happen if it is local (a bridge toward containers). The agent
/// logs each one as an interface gets it, and `check --host` lists them up front.
#[test]
fn connected_subnets_a_class_may_not_reach_are_logged_and_listed_by_check() {
    require_root();
    let sandbox = Sandbox::new("ed");
    let scratch = Scratch::new("local");
    let agent = start(&sandbox, &scratch);
    sandbox.host.ip("link add ctr0 type veth peer name ctrp0");
    sandbox.host.ip("addr add 198.51.100.129/25 dev ctr0");
    sandbox.host.ip("addr add 203.0.113.129/25 dev ctr0");
    sandbox.host.ip("link set ctr0 up");
    let warned = |interface: &str, subnet: &str| {
        agent.stderr().lines().any(|l| {
            l.contains("a connected subnet of an attached interface")
                && l.contains(interface)
                && l.contains(subnet)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !warned("ctr0", "203.0.113.128/25") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(warned("ctr0", "203.0.113.128/25"), "{}", agent.stderr());
    // The uplink's own subnets are in no region, and user-data denies unknown ones.
    assert!(warned("up0", "192.0.2.0/24"), "{}", agent.stderr());
    assert!(!warned("ctr0", "198.51.100.128/25"), "eu-west is approved");

    let out = agent.cli(&[
        "check",
        "--host",
        "--json",
        scratch.dir.join("policy.yaml").to_str().expect("path"),
    ]);
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let mut listed: Vec<(String, String, String)> = report["denied_local_networks"]
        .as_array()
        .expect("list")
        .iter()
        .map(|d| {
            (
                d["interface"].as_str().expect("interface").to_owned(),
                d["subnet"].as_str().expect("subnet").to_owned(),
                d["classes"].to_string(),
            )
        })
        .collect();
    listed.sort();
    let expected: Vec<(String, String, String)> = [
        ("ctr0", "203.0.113.128/25"),
        ("up0", "192.0.2.0/24"),
        ("up0", "2001:db8:1::/64"),
    ]
    .iter()
    .map(|(i, s)| {
        (
            (*i).to_owned(),
            (*s).to_owned(),
            r#"["user-data"]"#.to_owned(),
        )
    })
    .collect();
    assert_eq!(listed, expected);
    agent.stop();
}

/// Link pins in the agent's pin directory, as `<hook>-<interface>`.
fn pinned_links(pin_dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(pin_dir.join("links"))
        .expect("links directory")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A link whose interface is deleted stays in the kernel, with the program and maps it
/// holds, for as long as its pin does; container veths come and go under names never
/// used again. The agent unpins it when the interface goes, and only that one.
#[test]
fn the_pinned_link_of_a_deleted_interface_is_released() {
    require_root();
    if !integration_tests::kernel_has_tcx() {
        eprintln!("skipped: no tcx on this kernel; clsact filters are not pinned links");
        return;
    }
    let sandbox = Sandbox::new("ee");
    let scratch = Scratch::new("gone");
    let pin_dir = integration_tests::agent::test_pin_dir("gone");
    let policy = scratch.write("policy.yaml", EVERY_INTERFACE_POLICY);
    let agent = RunningAgent::start_with_pins(&sandbox.host, &policy, &[], pin_dir.clone());
    second_link(&sandbox, "ctr1", "ctrw1", "10.81.0");
    let until = |want: &[&str]| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while pinned_links(&pin_dir) != want && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        pinned_links(&pin_dir)
    };
    assert_eq!(
        until(&["tc_egress-ctr1", "tc_egress-up0"]),
        ["tc_egress-ctr1", "tc_egress-up0"]
    );
    sandbox.host.ip("link del ctr1");
    assert_eq!(
        until(&["tc_egress-up0"]),
        ["tc_egress-up0"],
        "the deleted interface's pin is released"
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7431, 5, MARK),
        0,
        "the uplink still enforces"
    );
    agent.stop();
}
