//! `datafence check --host` warns when a class would deny the host's own resolver: the
//! real binary, with /etc/resolv.conf replaced in a private mount namespace by one naming
//! the AWS VPC resolver, 172.31.0.2. Needs root, or unprivileged user namespaces, for the
//! namespace; nothing is sent anywhere and no name is resolved.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use datafence_test_support::{Scratch, output_within};
use serde_json::Value;

fn agent_binary() -> &'static str {
    env!("CARGO_BIN_EXE_datafence")
}

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("agent/ sits in the workspace root")
        .join("policies")
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .expect("/proc/self/status")
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

/// `datafence check --host ARGS POLICY` with `resolv_conf` bind-mounted over
/// /etc/resolv.conf in a mount namespace of its own, so the host's file is untouched.
fn check_host(resolv_conf: &Path, policy: &Path, args: &[&str]) -> Output {
    let mut unshare = Command::new("unshare");
    if !running_as_root() {
        unshare.arg("--map-root-user");
    }
    unshare
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$1" /etc/resolv.conf && shift && exec "$@""#)
        .arg("sh")
        .arg(resolv_conf)
        .arg(agent_binary())
        .args(["check", "--host"])
        .args(args)
        .arg(policy)
        .env_remove("DATAFENCE_CGROUP_ROOT");
    let out = output_within(&mut unshare, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "check --host failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn vpc_resolver(scratch: &Scratch) -> PathBuf {
    scratch.write(
        "resolv.conf",
        "# as on an EC2 instance\nsearch ec2.internal\nnameserver 172.31.0.2\noptions edns0\n",
    )
}

/// The findings for 172.31.0.2.
fn resolver_findings(json: &Value) -> Vec<&Value> {
    json["host_services"]
        .as_array()
        .unwrap_or_else(|| panic!("no host_services in {json:#}"))
        .iter()
        .filter(|f| f["address"] == "172.31.0.2")
        .collect()
}

#[test]
fn eu_cloud_denies_the_vpc_resolver() {
    let scratch = Scratch::new("host-services");
    let resolv_conf = vpc_resolver(&scratch);
    let policy = policies_dir().join("eu-cloud.yaml");

    let out = check_host(&resolv_conf, &policy, &["--json"]);
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["valid"], true);
    let found = resolver_findings(&json);
    let udp = found
        .iter()
        .find(|f| f["service"] == "udp/53")
        .unwrap_or_else(|| panic!("no udp/53 warning for 172.31.0.2 in {json:#}"));
    assert_eq!(udp["class"], "user-data");
    assert_eq!(udp["verdict"], "deny");
    assert_eq!(udp["region"], Value::Null);
    assert_eq!(udp["reason"], "unknown_denied");
    assert_eq!(udp["source"], "/etc/resolv.conf line 3");
    assert!(found.iter().any(|f| f["service"] == "tcp/53"), "{json:#}");

    // The text form warns on stderr and still exits 0.
    let out = check_host(&resolv_conf, &policy, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(
            "warning: class user-data would deny DNS (udp/53) to 172.31.0.2, the resolver in /etc/resolv.conf line 3 (region none: unknown_denied"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("add it to exempt: or to a region the class may reach"),
        "{stderr}"
    );
}

#[test]
fn exempting_the_resolver_ends_the_warning() {
    let scratch = Scratch::new("host-services-exempt");
    let resolv_conf = vpc_resolver(&scratch);
    // eu-cloud with the resolver exempt, next to copies of its region files.
    let text = std::fs::read_to_string(policies_dir().join("eu-cloud.yaml")).expect("eu-cloud");
    let exempting = text.replace("  - 10.0.0.0/8\n", "  - 10.0.0.0/8\n  - 172.31.0.2/32\n");
    assert_ne!(exempting, text, "eu-cloud.yaml's exempt list has moved");
    let policy = scratch.write("eu-cloud.yaml", &exempting);
    let regions = policies_dir().join("regions/cloud");
    for entry in std::fs::read_dir(&regions).expect("regions/cloud") {
        let path = entry.expect("entry").path();
        let name = path.file_name().expect("name").to_string_lossy();
        let copy = scratch.dir.join("regions/cloud").join(&*name);
        std::fs::create_dir_all(copy.parent().expect("parent")).expect("mkdir");
        std::fs::copy(&path, &copy).expect("copy region file");
    }

    let out = check_host(&resolv_conf, &policy, &["--json"]);
    let json: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(json["valid"], true);
    assert!(resolver_findings(&json).is_empty(), "{json:#}");
}
