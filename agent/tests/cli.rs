//! The command line's contract, without the kernel: `check --diff` for rollout review.

use std::process::Command;

use datafence_test_support::Scratch;

/// The `datafence` binary cargo built for these tests.
fn agent_binary() -> &'static str {
    env!("CARGO_BIN_EXE_datafence")
}

const OLD: &str = r"
version: 1
exempt: [10.0.0.0/8]
regions:
  eu-west:
    cidrs: [198.51.100.0/24, 198.51.101.0/24]
  us-east:
    cidrs: [203.0.113.0/24]
data_classes:
  user-data:
    match:
      marks: [{value: 0x10}]
    allow: [eu-west]
";

const NEW: &str = r#"
version: 1
mode: audit
host_essentials: {link_multicast: false}
exempt: [10.0.0.0/8, 192.0.2.0/24]
regions:
  eu-west:
    cidrs: [198.51.100.0/24, "2001:db8:100::/48"]
  us-east:
    cidrs: [203.0.113.0/24]
  eu-north:
    cidrs: [198.18.0.0/24]
data_classes:
  user-data:
    match:
      marks: [{value: 0x10}]
    allow: [eu-west, eu-north]
    unknown: allow
  telemetry:
    match:
      dst_ports: [4317]
    allow: [us-east]
"#;

#[test]
fn check_diff_shows_what_a_new_policy_would_change() {
    let scratch = Scratch::new("diff");
    let old = scratch.write("old.yaml", OLD);
    let new = scratch.write("new.yaml", NEW);
    let out = Command::new(agent_binary())
        .args(["check", "--json", "--diff"])
        .arg(&old)
        .arg(&new)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(d["mode"], serde_json::json!(["enforce", "audit"]));
    assert_eq!(d["exempt_added"], serde_json::json!(["192.0.2.0/24"]));
    assert_eq!(
        d["host_essentials_off"],
        serde_json::json!(["link_multicast"])
    );
    assert_eq!(d["host_essentials_on"], serde_json::json!([]));
    assert_eq!(d["regions_added"], serde_json::json!(["eu-north"]));
    let eu = &d["regions_changed"][0];
    assert_eq!(eu["region"], "eu-west");
    assert_eq!(
        (
            eu["prefixes_added"].as_u64(),
            eu["prefixes_removed"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(
        eu["examples_removed"],
        serde_json::json!(["198.51.101.0/24"])
    );
    assert_eq!(d["classes_added"], serde_json::json!(["telemetry"]));
    let user = &d["classes_changed"][0];
    assert_eq!(user["class"], "user-data");
    assert_eq!(user["may_now_reach"], serde_json::json!(["eu-north"]));
    assert_eq!(user["unknown"], serde_json::json!(["deny", "allow"]));

    let text = Command::new(agent_binary())
        .args(["check", "--diff"])
        .arg(&old)
        .arg(&new)
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("~ class user-data: may now reach eu-north;"),
        "{text}"
    );
    assert!(text.contains("+ region eu-north"), "{text}");
    assert!(
        text.contains("- host essential link_multicast: judged by the classes"),
        "{text}"
    );

    let same = Command::new(agent_binary())
        .args(["check", "--diff"])
        .arg(&old)
        .arg(&old)
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&same.stdout).contains("no change in enforcement"));
}

#[test]
fn check_diff_refuses_an_invalid_side_with_its_location() {
    let scratch = Scratch::new("diff-bad");
    let old = scratch.write("old.yaml", OLD);
    let bad = scratch.write("bad.yaml", &NEW.replace("198.18.0.0/24", "198.18.0.1/24"));
    let out = Command::new(agent_binary())
        .args(["check", "--diff"])
        .arg(&old)
        .arg(&bad)
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.yaml:"), "{err}");
    assert!(err.contains("198.18.0.0/24"), "names the fix: {err}");
}

/// A class naming a slice names the services in it: `check` asks systemd whether each
/// restricts packet sockets, and says so plainly when systemd cannot be asked.
#[test]
fn check_asks_about_the_units_a_class_names() {
    let scratch = Scratch::new("units");
    let cgroups = scratch.dir.join("cgroup");
    std::fs::create_dir_all(cgroups.join("user-data.slice/api.service")).expect("cgroup dirs");
    std::fs::create_dir_all(cgroups.join("plain")).expect("cgroup dir");
    let policy = |cgroup: &str| {
        format!(
            "version: 1\nregions:\n  eu-west:\n    cidrs: [198.51.100.0/24]\n\
             data_classes:\n  user-data:\n    match:\n      cgroups: [{cgroup}]\n    allow: [eu-west]\n"
        )
    };
    let check = |file: &std::path::Path| {
        let out = Command::new(agent_binary())
            .arg("--cgroup-root")
            .arg(&cgroups)
            .args(["check", "--json"])
            .arg(file)
            .output()
            .expect("run");
        assert!(out.status.success(), "{out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
        v["packet_socket_units"].clone()
    };

    let no_units = check(&scratch.write("plain.yaml", &policy("/plain")));
    assert_eq!(no_units["status"], "no_units", "{no_units}");

    let slice = check(&scratch.write("slice.yaml", &policy("/user-data.slice")));
    if std::path::Path::new("/run/systemd/system").is_dir() {
        // systemd has no api.service loaded, so it reports the unsandboxed defaults.
        assert_eq!(slice["status"], "checked", "{slice}");
        assert_eq!(slice["exposed"][0]["unit"], "api.service", "{slice}");
    } else {
        assert_eq!(slice["status"], "cannot_tell", "{slice}");
        assert!(
            slice["why"].as_str().unwrap_or("").contains("systemd"),
            "{slice}"
        );
    }
}
