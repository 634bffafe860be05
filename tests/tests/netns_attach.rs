//! How the TC egress program is attached: through tcx or as a clsact filter, chosen with
//! `--tc-attach`, sharing a clsact qdisc with other filters, switching between the two
//! kinds without a second program on the hook; and what the agent says about the kernel.

use std::time::Duration;

use integration_tests::{
    Scratch,
    agent::{RunningAgent, test_pin_dir},
    datafence_clsact_filters, detach_pins,
    netns::{Sandbox, addr, udp_delivered_marked},
    require_root, tc_program_ids, tcx_program_ids,
};

const MARK: u32 = 0x42;

fn write_policy(scratch: &Scratch) -> std::path::PathBuf {
    scratch.write(
        "policy.yaml",
        r"
version: 1
interfaces:
  egress: [up0]
exempt: [192.0.2.2/32]
regions:
  eu-west:
    cidrs: [198.51.100.0/24]
  us-east:
    cidrs: [203.0.113.0/24]
data_classes:
  user-data:
    match:
      marks: [{value: 0x42}]
    allow: [eu-west]
",
    )
}

/// The lines `tc filter show dev up0 egress` prints in the host namespace.
fn tc_filters(sandbox: &Sandbox) -> String {
    let out = sandbox
        .host
        .exec(&["tc", "filter", "show", "dev", "up0", "egress"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn enforced(sandbox: &Sandbox, port: u16) {
    assert_eq!(
        udp_delivered_marked(sandbox, addr::US_V4, port, 5, MARK),
        0,
        "user data to a denied region is dropped"
    );
    assert_eq!(
        udp_delivered_marked(sandbox, addr::EU_V4, port, 5, MARK),
        5,
        "user data to an approved region passes"
    );
}

#[test]
fn an_interface_with_a_clsact_qdisc_and_another_filter_is_shared_not_taken() {
    require_root();
    let sandbox = Sandbox::new("qd");
    let scratch = Scratch::new("qdisc");
    let policy = write_policy(&scratch);
    // Another tool's qdisc and filter, there before datafence: a classic BPF filter that
    // matches nothing, ahead of datafence's priority.
    sandbox
        .host
        .exec(&["tc", "qdisc", "add", "dev", "up0", "clsact"]);
    sandbox.host.exec(&[
        "tc",
        "filter",
        "add",
        "dev",
        "up0",
        "egress",
        "pref",
        "100",
        "bpf",
        "bytecode",
        "1,6 0 0 0,",
    ]);
    let pins = test_pin_dir("qdisc");
    let agent = RunningAgent::start_with_pins(
        &sandbox.host,
        &policy,
        &["--tc-attach", "clsact"],
        pins.clone(),
    );
    let filters = datafence_clsact_filters(&sandbox.host, "up0");
    assert_eq!(filters.len(), 1, "{filters:?}");
    assert_eq!(
        (filters[0].priority, filters[0].handle),
        (datafence::clsact::PRIORITY, datafence::clsact::HANDLE)
    );
    enforced(&sandbox, 7800);
    let runtime = agent.runtime_dir.clone();
    let (_, _files) = agent.stop_leaving_enforcement();
    detach_pins(&sandbox.host, &runtime, &pins);
    assert!(
        datafence_clsact_filters(&sandbox.host, "up0").is_empty(),
        "datafence's filter removed"
    );
    let left = tc_filters(&sandbox);
    assert!(
        left.contains("pref 100 bpf chain 0 handle"),
        "the other tool's filter stays:\n{left}"
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7800, 5, MARK),
        5,
        "enforcement removed"
    );
}

#[test]
fn a_filter_an_older_agent_left_at_another_place_is_retired() {
    require_root();
    let sandbox = Sandbox::new("ol");
    let scratch = Scratch::new("older");
    let policy = write_policy(&scratch);
    // What an agent from before the fixed place left on a 6.1 kernel: its filter where
    // the kernel put it (priority 49152 and up), unmanaged.
    let stale = sandbox.host.run(|| {
        let mut ebpf = aya::EbpfLoader::new()
            .load(datafence::datapath::EBPF_OBJECT)
            .expect("load the object");
        let program: &mut aya::programs::SchedClassifier = ebpf
            .program_mut(datafence_common::program_names::TC_EGRESS)
            .expect("program")
            .try_into()
            .expect("classifier");
        program.load().expect("load the program");
        aya::programs::tc::qdisc_add_clsact("up0").expect("qdisc");
        let id =
            program
                .attach_with_options(
                    "up0",
                    aya::programs::TcAttachType::Egress,
                    aya::programs::tc::TcAttachOptions::Netlink(
                        aya::programs::tc::NlOptions::default(),
                    ),
                )
                .expect("attach where the kernel chooses");
        // That agent exited without detaching: the filter holds the program now.
        std::mem::forget(program.take_link(id).expect("link"));
        datafence::clsact::datafence_filters_on("up0").expect("filters")
    });
    assert_eq!(stale.len(), 1, "{stale:?}");
    assert!(!stale[0].in_datafence_place());
    let agent = RunningAgent::start(&sandbox.host, &policy, &["--tc-attach", "clsact"]);
    let filters = datafence_clsact_filters(&sandbox.host, "up0");
    assert_eq!(
        filters.len(),
        1,
        "only datafence's place is left: {filters:?}"
    );
    assert!(filters[0].in_datafence_place());
    enforced(&sandbox, 7810);
    agent.stop();
}

#[test]
fn switching_between_tcx_and_clsact_leaves_one_program_on_the_hook() {
    require_root();
    if !integration_tests::kernel_has_tcx() {
        // Nothing to switch between; the refusal is what there is to check.
        integration_tests::assert_tcx_is_refused();
        return;
    }
    let sandbox = Sandbox::new("sw");
    let scratch = Scratch::new("switch");
    let policy = write_policy(&scratch);
    let pins = test_pin_dir("switch");
    let mut previous = None;
    for kind in ["tcx", "clsact", "tcx"] {
        let agent = RunningAgent::start_with_pins(
            &sandbox.host,
            &policy,
            &["--tc-attach", kind],
            pins.clone(),
        );
        let tcx = tcx_program_ids(&sandbox.host, "up0");
        let clsact = datafence_clsact_filters(&sandbox.host, "up0");
        match kind {
            "tcx" => assert!(tcx.len() == 1 && clsact.is_empty(), "{tcx:?} {clsact:?}"),
            _ => assert!(tcx.is_empty() && clsact.len() == 1, "{tcx:?} {clsact:?}"),
        }
        assert_eq!(agent.status_json()["attachments"][0]["kind"], kind);
        enforced(&sandbox, 7820);
        let (_, files) = agent.stop_leaving_enforcement();
        // Keep the stopped agent's files until the next one has taken over.
        previous = Some(files);
    }
    drop(previous);
    let _ = datafence::datapath::PinLayout::new(&pins).remove_all();
    sandbox
        .host
        .run(|| datafence::clsact::remove_all().expect("remove"));
    assert!(tc_program_ids(&sandbox.host, "up0").is_empty());
}

#[test]
fn status_and_metrics_state_what_the_kernel_offers() {
    require_root();
    let sandbox = Sandbox::new("kf");
    let scratch = Scratch::new("features");
    let policy = write_policy(&scratch);
    let agent = RunningAgent::start(
        &sandbox.host,
        &policy,
        &["--metrics-addr", "127.0.0.1:9481"],
    );
    let status = agent.status_json();
    let features = status["kernel"]["features"].as_array().expect("features");
    let has = |name: &str| {
        features
            .iter()
            .find(|f| f["name"] == name)
            .unwrap_or_else(|| panic!("{name} missing from {status}"))["available"]
            .as_bool()
            .expect("bool")
    };
    // Facts of this kernel, read independently of the agent.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").expect("release");
    assert_eq!(status["kernel"]["release"], release.trim());
    assert_eq!(
        has("btf"),
        std::path::Path::new("/sys/kernel/btf/vmlinux").exists()
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("mounts");
    assert_eq!(
        has("cgroup_v2"),
        mounts.lines().any(|l| l.contains(" cgroup2 "))
    );
    // The agent runs, so every feature the programs need is there; and tcx is reported
    // as what `auto` chose.
    for f in features {
        if f["required"] == true {
            assert_eq!(f["available"], true, "{f}");
        }
    }
    let auto_kind = status["attachments"][0]["kind"].as_str().expect("kind");
    assert_eq!(has("tcx"), auto_kind == "tcx", "{status}");
    let text = String::from_utf8_lossy(&agent.cli(&["status"]).stdout).into_owned();
    assert!(text.contains("ring_buffer (5.8+)"), "{text}");
    let body = sandbox.host.run(|| {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9481").expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").expect("send");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("read");
        body
    });
    let tcx_line = format!(
        "datafence_kernel_feature{{feature=\"tcx\"}} {}",
        u8::from(has("tcx"))
    );
    assert!(body.contains(&tcx_line), "{body}");
    assert!(
        body.contains("datafence_kernel_feature{feature=\"ring_buffer\"} 1"),
        "{body}"
    );
    agent.stop();
}

#[test]
fn asking_for_tcx_where_the_kernel_has_none_is_a_usage_error() {
    let choice = datafence::datapath::TcKind::choose("tcx", false);
    let message = choice.expect_err("no tcx");
    assert!(message.contains("6.6"), "{message}");
    assert_eq!(
        datafence::datapath::TcKind::choose("auto", false),
        Ok(datafence::datapath::TcKind::Clsact)
    );
    assert_eq!(
        datafence::datapath::TcKind::choose("auto", true),
        Ok(datafence::datapath::TcKind::Tcx)
    );
}

#[test]
fn a_clsact_filter_left_by_a_crashed_agent_without_pins_is_reported_and_detachable() {
    require_root();
    let sandbox = Sandbox::new("np");
    let scratch = Scratch::new("nopin");
    let policy = write_policy(&scratch);
    let mut agent = RunningAgent::start(
        &sandbox.host,
        &policy,
        &["--tc-attach", "clsact", "--no-pin"],
    );
    enforced(&sandbox, 7830);
    agent.kill9();
    // The kernel holds the filter, pins or not; but the judge stage lived in a program
    // array only the dead agent referenced, and the kernel empties such an array when its
    // last holder goes. The filter passes everything, counted as `stage_missing`. The
    // kernel empties the array from a workqueue (`prog_array_map_clear`), a moment after
    // the process is reaped, so the test waits for it, bounded.
    assert_eq!(datafence_clsact_filters(&sandbox.host, "up0").len(), 1);
    let deadline = std::time::Instant::now() + integration_tests::patience(Duration::from_secs(5));
    let delivered = loop {
        let delivered = udp_delivered_marked(&sandbox, addr::US_V4, 7830, 5, MARK);
        if delivered == 5 || std::time::Instant::now() > deadline {
            break delivered;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        delivered, 5,
        "without pins nothing judges once the agent is gone"
    );
    let out = agent.cli(&["status"]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("clsact filter is still attached on up0 but judges nothing"),
        "status must say the filter is left and does not enforce: {said}"
    );
    let out = agent.cli(&["detach", "--pin-dir", "/sys/fs/bpf/datafence-test-none"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("tc_egress-up0"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(datafence_clsact_filters(&sandbox.host, "up0").is_empty());
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7830, 5, MARK),
        5,
        "enforcement removed"
    );
}

/// Link pins are named after their interface, and bpffs refuses dots in names: a VLAN's
/// `eth0.100` is pinned as `tc_egress-eth0:100` (Linux refuses colons in interface names,
/// so the name reads back) and enforced like any other.
#[test]
fn an_interface_with_a_dot_in_its_name_is_enforced_and_pinned() {
    require_root();
    let mut sandbox = Sandbox::new("dt");
    sandbox.rename_uplink("up0.7");
    let scratch = Scratch::new("dotted");
    let policy = scratch.write(
        "policy.yaml",
        &std::fs::read_to_string(write_policy(&scratch))
            .expect("policy")
            .replace("egress: [up0]", "egress: [up0.7]"),
    );
    let pins = test_pin_dir("dotted");
    let agent = RunningAgent::start_with_pins(&sandbox.host, &policy, &[], pins.clone());
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::US_V4, 7321, 5, MARK),
        0
    );
    assert_eq!(
        udp_delivered_marked(&sandbox, addr::EU_V4, 7322, 5, MARK),
        5
    );
    let status = agent.status_json();
    assert_eq!(status["attachments"][0]["interface"], "up0.7", "{status}");
    if status["attachments"][0]["kind"] == "tcx" {
        assert!(pins.join("links/tc_egress-up0:7").exists());
    }
    agent.stop();
}
