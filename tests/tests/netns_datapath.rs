//! The datapath attached to a real veth in a namespace sandbox, with real UDP and TCP
//! traffic over IPv4 and IPv6.

use datafence::datapath::{Datapath, EventLimits, LoadOptions};
use integration_tests::{
    MARKED_CLASS_POLICY,
    netns::{Sandbox, addr, tcp_connects, udp_delivered, udp_delivered_sized},
    policy_from_yaml, require_root,
};

const POLICY: &str = r#"
version: 1
regions:
  eu-west:
    cidrs: [198.51.100.0/24, "2001:db8:100::/48"]
  us-east:
    cidrs: [203.0.113.0/24, "2001:db8:300::/48"]
data_classes:
  user-data:
    match:
      protocols: [tcp, udp]
    allow: [eu-west]
    unknown: allow
"#;

/// The policy applied to a datapath of its own, attached to the sandbox's uplink.
fn attached(sandbox: &Sandbox, yaml: &str) -> Datapath {
    let compiled = policy_from_yaml(yaml).compile();
    sandbox.host.run(move || {
        let mut dp = Datapath::load(&LoadOptions {
            table_capacity: 1024,
            ..Default::default()
        })
        .expect("load");
        dp.apply(&compiled, EventLimits::default()).expect("apply");
        dp.attach_tc("up0").expect("attach");
        dp
    })
}

#[test]
fn attached_tc_egress_blocks_unapproved_regions_over_v4_and_v6() {
    require_root();
    let sandbox = Sandbox::new("dp");
    let dp = attached(&sandbox, POLICY);

    for (dst, expected) in [
        (addr::EU_V4, 20),
        (addr::US_V4, 0),
        (addr::EU_V6, 20),
        (addr::US_V6, 0),
    ] {
        let got = udp_delivered(&sandbox, dst, 5353, 20);
        assert_eq!(got, expected, "UDP to {dst}");
    }
    assert!(tcp_connects(&sandbox, addr::EU_V4, 8443));
    assert!(!tcp_connects(&sandbox, addr::US_V4, 8443));
    assert!(tcp_connects(&sandbox, addr::EU_V6, 8443));
    assert!(!tcp_connects(&sandbox, addr::US_V6, 8443));

    let denied: u64 = dp
        .counters()
        .expect("counters")
        .iter()
        .filter(|(k, _)| k.verdict == datafence_common::Verdict::Deny as u8)
        .map(|(_, v)| v.packets)
        .sum();
    // 40 datagrams plus at least one SYN per refused connection.
    assert!(denied >= 42, "denied {denied}");
    drop(dp);
    // Detached: traffic to the unapproved region flows again.
    assert_eq!(udp_delivered(&sandbox, addr::US_V4, 5353, 5), 5);
}

/// User data sent as IP fragments (a 3,000-byte datagram on a 1,500-byte MTU): the kernel
/// fragments it before TC egress, so every fragment is judged on its own.
#[test]
fn fragmented_datagrams_are_judged_whole_over_v4_and_v6() {
    require_root();
    let sandbox = Sandbox::new("fr");
    let dp = attached(&sandbox, MARKED_CLASS_POLICY);
    for (dst, mark, expected, case) in [
        (addr::EU_V4, MARK, 10, "user data to the allowed region"),
        (addr::US_V4, MARK, 0, "user data to a denied region"),
        (addr::US_V4, 0, 10, "other traffic to that region"),
        (addr::EU_V6, MARK, 10, "user data to the allowed region"),
        (addr::US_V6, MARK, 0, "user data to a denied region"),
        (addr::US_V6, 0, 10, "other traffic to that region"),
    ] {
        let got = udp_delivered_sized(&sandbox, dst, 7600, 10, mark, SIZE);
        assert_eq!(got, expected, "{case}: {dst}, mark {mark:#x}");
    }
    // Each allowed user-data datagram went out as three fragments (1,480 + 1,480 + 48
    // bytes over IPv4, 1,448 + 1,448 + 112 over IPv6), each judged and counted as the
    // class's.
    let allowed_user_data: u64 = dp
        .counters()
        .expect("counters")
        .iter()
        .filter(|(k, _)| k.class == 0 && k.verdict == datafence_common::Verdict::Allow as u8)
        .map(|(_, v)| v.packets)
        .sum();
    assert_eq!(allowed_user_data, 2 * 10 * 3);
}

const MARK: u32 = 0x42;
/// Twice the sandbox veths' MTU, and then some: three fragments.
const SIZE: usize = 3000;
