//! The `match` block: each selector's checks and what it resolves to.

use super::*;

#[test]
fn empty_match() {
    assert_eq!(
        errors(&format!(
            "version: 1\n{REGIONS}data_classes:\n  c:\n    match: {{}}\n    allow: [eu]\n"
        )),
        [
            "policy.yaml:7:12: `match` lists no selectors; list at least one of cgroups, marks, \
          dscp, protocols, dst_ports, src_cidrs"
        ]
    );
}

#[test]
fn empty_selector_list() {
    assert_eq!(
        errors(&format!(
            "version: 1\n{REGIONS}data_classes:\n  c:\n    match:\n      dscp: [1]\n      protocols: []\n"
        )),
        ["policy.yaml:9:18: `protocols` is empty; list at least one value or remove the selector"]
    );
}

#[test]
fn ports_out_of_range_and_bad_syntax() {
    assert_eq!(
        errors(&format!(
            "version: 1\n{REGIONS}data_classes:\n  c:\n    match:\n      dst_ports: [443, 65536, \"70000\", \"80-\", \"100-90\", https, -1]\n"
        )),
        [
            "policy.yaml:8:24: port 65536 is out of range 0-65535",
            "policy.yaml:8:31: port 70000 is out of range 0-65535",
            "policy.yaml:8:40: invalid port range `80-`: expected N or N-M, with N and M in 0-65535",
            "policy.yaml:8:47: port range 100-90 is reversed; did you mean 90-100?",
            "policy.yaml:8:57: invalid port range `https`: expected N or N-M, with N and M in 0-65535",
            "policy.yaml:8:64: port -1 is out of range 0-65535",
        ]
    );
}

#[test]
fn too_many_port_ranges_after_merging() {
    let list: Vec<String> = (0..17).map(|i| (i * 10).to_string()).collect();
    let ok: Vec<String> = (0..17)
        .map(|i| format!("\"{}-{}\"", i * 10, i * 10 + 9))
        .collect();
    let yaml = |ports: &str| {
        format!(
            "version: 1\n{REGIONS}data_classes:\n  c:\n    match:\n      dst_ports: [{ports}]\n"
        )
    };
    assert_eq!(
        errors(&yaml(&list.join(", "))),
        [
            "policy.yaml:8:18: `dst_ports` has 17 ranges after merging adjacent and overlapping \
          ones; at most 16 are supported per class"
        ]
    );
    let p = Env::new().load(&yaml(&ok.join(", "))).unwrap();
    assert_eq!(p.classes[0].selectors.port_ranges, vec![(0, 169)]);
}

#[test]
fn dscp_out_of_range() {
    assert_eq!(
        errors(&format!(
            "version: 1\n{REGIONS}data_classes:\n  c:\n    match:\n      dscp: [63, 64, -1]\n"
        )),
        [
            "policy.yaml:8:18: DSCP value 64 is out of range 0-63",
            "policy.yaml:8:22: DSCP value -1 is out of range 0-63",
        ]
    );
}

#[test]
fn bad_protocols() {
    assert_eq!(
        errors(&format!(
            "version: 1\n{REGIONS}data_classes:\n  c:\n    match:\n      protocols: [tcp, tpc, 256]\n"
        )),
        [
            "policy.yaml:8:24: unknown protocol `tpc`: expected tcp, udp, sctp, icmp, icmpv6 or \
             a number 0-255",
            "policy.yaml:8:29: protocol number 256 is out of range 0-255",
        ]
    );
}

#[test]
fn bad_marks() {
    let marks: Vec<String> = (1..=9).map(|i| format!("{{value: {i}}}")).collect();
    assert_eq!(
        errors(&format!(
            "version: 1\n{REGIONS}data_classes:\n  c:\n    match:\n      marks: [{{value: 0x110, mask: 0xff}}, {{value: 0x100000000}}]\n  d:\n    match:\n      marks: [{}]\n",
            marks.join(", ")
        )),
        [
            "policy.yaml:8:15: mark value 0x110 has bits outside mask 0xff, so it can never match",
            "policy.yaml:8:43: mark value 4294967296 is out of range 0-0xffffffff",
            "policy.yaml:11:14: 9 distinct marks listed; at most 8 are supported per class",
        ]
    );
}

#[test]
fn mark_mask_defaults_to_all_bits() {
    let p = Env::new()
        .load(&format!(
            "version: 1\n{REGIONS}data_classes:\n  c:\n    match:\n      marks: [{{value: 0x10}}, {{value: 0x10}}]\n"
        ))
        .unwrap();
    assert_eq!(
        p.classes[0].selectors.marks,
        vec![datafence_common::MarkMatch {
            value: 0x10,
            mask: u32::MAX
        }]
    );
}

#[test]
fn bad_cgroups() {
    let env = Env::new();
    fs::write(env.dir.path().join("cgroup/file"), "").unwrap();
    assert_eq!(
        env.errors(&format!(
            "version: 1\n{REGIONS}data_classes:\n  c:\n    match:\n      cgroups:\n        - system.slice\n        - /\n        - /system.slice/../x\n        - /file\n        - /system.slice/other.service/\n"
        )),
        [
            "policy.yaml:9:11: cgroup path `system.slice` must be absolute (start with `/`), \
             relative to the cgroup2 root"
                .to_owned(),
            "policy.yaml:10:11: cgroup path `/` is the root cgroup, which holds every process; \
             remove the cgroups selector to match regardless of cgroup"
                .to_owned(),
            "policy.yaml:11:11: cgroup path `/system.slice/../x` must not contain `.` or `..` \
             components"
                .to_owned(),
            "policy.yaml:12:11: cgroup `/file` under CGROOT is not a directory"
                .replace("CGROOT", &env.opts().cgroup_root.display().to_string()),
        ]
    );
}

/// At boot the agent may start before the services a class names: a cgroup that does
/// not exist yet is noted, not refused, and takes no entry until it appears (a packet
/// with no socket reports cgroup id 0, which must match nothing).
#[test]
fn a_cgroup_that_does_not_exist_yet_is_noted_and_left_out() {
    let env = Env::new();
    let p = env
        .load(&format!(
            "version: 1\n{REGIONS}data_classes:\n  a:\n    match:\n      cgroups: [/late.slice, /system.slice/other.service]\n"
        ))
        .unwrap();
    assert_eq!(
        p.classes[0].selectors.cgroups[0],
        ("/late.slice".to_owned(), 0)
    );
    let other = fs::metadata(env.dir.path().join("cgroup/system.slice/other.service"))
        .unwrap()
        .ino();
    assert_eq!(p.compile().cgroups, vec![(other, 0b1)]);
    let notes: Vec<String> = p.cgroup_notes().iter().map(ToString::to_string).collect();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(
        notes[0].starts_with("class a: cgroup /late.slice does not exist yet"),
        "{notes:?}"
    );
    assert!(
        notes[1]
            .starts_with("class a: cgroup /system.slice/other.service is a service's own cgroup"),
        "{notes:?}"
    );
}

#[test]
fn cgroup_ids_are_directory_inodes() {
    let env = Env::new();
    let p = env
        .load(&format!(
            "version: 1\n{REGIONS}data_classes:\n  a:\n    match:\n      cgroups: [/system.slice/other.service/, /system.slice]\n  b:\n    match:\n      cgroups: [/system.slice]\n"
        ))
        .unwrap();
    let ino = |rel: &str| {
        fs::metadata(env.dir.path().join("cgroup").join(rel))
            .unwrap()
            .ino()
    };
    let other = ino("system.slice/other.service");
    let slice = ino("system.slice");
    assert_eq!(
        p.classes[0].selectors.cgroups,
        vec![
            ("/system.slice/other.service".to_owned(), other),
            ("/system.slice".to_owned(), slice)
        ]
    );
    let mut expected = vec![(other, 0b01), (slice, 0b11)];
    expected.sort_unstable();
    assert_eq!(p.compile().cgroups, expected);
}
