//! The datapath attached to a real veth in a namespace sandbox, with real UDP and TCP
//! traffic over IPv4 and IPv6.

use datafence::datapath::{Datapath, EventLimits, LoadOptions};
use integration_tests::{
    netns::{Sandbox, addr, tcp_connects, udp_delivered},
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

#[test]
fn attached_tc_egress_blocks_unapproved_regions_over_v4_and_v6() {
    require_root();
    let sandbox = Sandbox::new("dp");
    let compiled = policy_from_yaml(POLICY).compile();
    let dp = sandbox.host.run(move || {
        let mut dp = Datapath::load(&LoadOptions {
            table_capacity: 1024,
            ..Default::default()
        })
        .expect("load");
        dp.apply(&compiled, EventLimits::default()).expect("apply");
        dp.attach_tc("up0").expect("attach");
        dp
    });

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
