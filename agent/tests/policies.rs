//! The example policies under `policies/` are valid and say what their comments claim:
//! every `*.yaml` there goes through the real `datafence check --json`, and the verdicts
//! quoted in the examples go through `datafence explain`. No root needed.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use datafence_test_support::Scratch;
use serde_json::Value;

/// The `datafence` binary cargo built for these tests.
fn agent_binary() -> &'static str {
    env!("CARGO_BIN_EXE_datafence")
}

fn policies_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("agent/ sits in the workspace root")
        .join("policies")
}

fn policy_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(policies_dir())
        .expect("read policies/")
        .map(|e| e.expect("read policies/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    files
}

/// A stand-in cgroup2 tree holding every absolute path the policy text mentions.
///
/// The validator only checks that each `cgroups` entry is a directory under the cgroup
/// root, so rather than parse the YAML, every token that starts with `/` becomes a
/// directory; the extra ones (from comments) are harmless, and a new example with a new
/// cgroup is covered without touching this test.
fn fake_cgroup_root(policy_text: &str) -> Scratch {
    let scratch = Scratch::new("cgroups");
    let separators = |c: char| c.is_whitespace() || matches!(c, ',' | '[' | ']' | '"' | '\'');
    for token in policy_text.split(separators) {
        let Some(relative) = token.strip_prefix('/') else {
            continue;
        };
        if relative.is_empty() || relative.split('/').any(|c| c == "..") {
            continue;
        }
        let dir = scratch.dir.join(relative);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
    }
    scratch
}

fn run(cgroup_root: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(agent_binary())
        .arg("--cgroup-root")
        .arg(cgroup_root)
        .args(args)
        .env_remove("DATAFENCE_CGROUP_ROOT")
        .output()
        .expect("run datafence");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `datafence check --json` on one policy file; its `summary` when valid.
fn check(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("read policy");
    let cgroups = fake_cgroup_root(&text);
    let (ok, stdout, stderr) = run(
        &cgroups.dir,
        &["check", "--json", path.to_str().expect("UTF-8 path")],
    );
    let json: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{}: not JSON ({e}):\n{stdout}\n{stderr}", path.display()));
    assert!(
        ok && json["valid"] == true,
        "{} is not valid:\n{stdout}\n{stderr}",
        path.display()
    );
    json["summary"].clone()
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .expect("array")
        .iter()
        .map(|v| {
            v.as_str()
                .or_else(|| v["name"].as_str())
                .expect("string or named object")
        })
        .collect()
}

fn region<'a>(summary: &'a Value, name: &str) -> &'a Value {
    summary["regions"]
        .as_array()
        .expect("regions")
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no region {name} in {summary:#}"))
}

fn class<'a>(summary: &'a Value, name: &str) -> &'a Value {
    summary["classes"]
        .as_array()
        .expect("classes")
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no class {name} in {summary:#}"))
}

/// What every valid policy summary must look like, whatever the example.
fn assert_consistent(file: &str, s: &Value) {
    assert_eq!(s["version"], 1, "{file}");
    assert!(
        matches!(s["mode"].as_str(), Some("enforce" | "audit")),
        "{file}"
    );
    let regions = names(&s["regions"]);
    for (i, r) in s["regions"].as_array().expect("regions").iter().enumerate() {
        assert_eq!(
            r["id"],
            i + 1,
            "{file}: region ids are 1-based in file order"
        );
    }
    assert!(
        !s["classes"].as_array().expect("classes").is_empty(),
        "{file}: an example with no class enforces nothing"
    );
    for c in s["classes"].as_array().expect("classes") {
        for allowed in names(&c["allow"]) {
            assert!(regions.contains(&allowed), "{file}: {allowed} undefined");
        }
        assert!(
            c["selectors"].as_object().is_some_and(|o| !o.is_empty()),
            "{file}: class {} has no selector",
            c["name"]
        );
    }
}

#[test]
fn every_example_policy_is_valid() {
    let files = policy_files();
    let mut summaries = BTreeMap::new();
    for path in &files {
        let summary = check(path);
        let name = path.file_name().expect("file name").to_string_lossy();
        assert_consistent(&name, &summary);
        summaries.insert(name.into_owned(), summary);
    }
    for expected in [
        "example.yaml",
        "eu-cloud.yaml",
        "audit-rollout.yaml",
        "cgroup-class.yaml",
        "mark-class.yaml",
    ] {
        assert!(
            summaries.contains_key(expected),
            "policies/{expected} is missing (docs/policy.md links it)"
        );
    }

    let s = &summaries["eu-cloud.yaml"];
    assert_eq!(
        names(&s["regions"]),
        ["eu", "europe-non-eu", "non-eu", "global", "ambiguous"]
    );
    for name in ["eu", "europe-non-eu", "non-eu", "global"] {
        let r = region(s, name);
        assert!(
            r["v4_prefixes"].as_u64() > Some(1000) && r["v6_prefixes"].as_u64() > Some(1000),
            "region {name} should hold thousands of provider prefixes: {r}"
        );
    }
    assert_eq!(s["mode"], "enforce");
    let user_data = class(s, "user-data");
    assert_eq!(names(&user_data["allow"]), ["eu"]);
    assert_eq!(user_data["unknown"], "deny");
    assert_eq!(user_data["mode"], "enforce");

    let s = &summaries["example.yaml"];
    assert_eq!(s["interfaces"]["egress"], serde_json::json!(["eth0"]));
    assert_eq!(s["interfaces"]["gateway"], serde_json::json!(["eth1"]));
    assert!(!names(&s["exempt"]).is_empty());
    assert_eq!(
        names(&s["classes"]),
        ["user-data", "payments", "analytics", "telemetry"]
    );
    // The full example is meant to show every selector at least once.
    for selector in [
        "cgroups",
        "marks",
        "dscp",
        "protocols",
        "dst_ports",
        "src_cidrs",
    ] {
        assert!(
            s["classes"]
                .as_array()
                .expect("classes")
                .iter()
                .any(|c| c["selectors"].get(selector).is_some()),
            "example.yaml uses no {selector} selector"
        );
    }
    // Inline cidrs and the region file together.
    assert_eq!(region(s, "eu-west")["v4_prefixes"], 3);
    assert_eq!(region(s, "eu-west")["v6_prefixes"], 2);
    assert_eq!(class(s, "analytics")["mode"], "audit");
    assert_eq!(class(s, "telemetry")["unknown"], "allow");

    let s = &summaries["audit-rollout.yaml"];
    assert_eq!(s["mode"], "audit");
    assert_eq!(class(s, "replication")["mode"], "enforce");
    assert_eq!(class(s, "user-data")["mode"], "audit");

    let s = &summaries["cgroup-class.yaml"];
    assert_eq!(
        class(s, "user-data")["selectors"]["cgroups"],
        serde_json::json!(["/user-data.slice"])
    );

    let s = &summaries["mark-class.yaml"];
    assert_eq!(
        class(s, "user-data")["selectors"]["marks"],
        serde_json::json!(["0x100/0xf00"])
    );
}

/// `datafence explain --json` against a file under policies/: (address, verdict, region,
/// reason) per line.
fn explain(
    policy: &str,
    extra: &[&str],
    addresses: &[&str],
) -> Vec<(String, String, String, String)> {
    let path = policies_dir().join(policy);
    let text = std::fs::read_to_string(&path).expect("read policy");
    let cgroups = fake_cgroup_root(&text);
    let mut args = vec![
        "explain",
        "--json",
        "--policy",
        path.to_str().expect("UTF-8 path"),
    ];
    args.extend_from_slice(extra);
    args.extend_from_slice(addresses);
    let (ok, stdout, stderr) = run(&cgroups.dir, &args);
    assert!(ok, "explain {policy} failed:\n{stdout}\n{stderr}");
    stdout
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line).expect("one JSON object per line");
            let s = |k: &str| v[k].as_str().unwrap_or("").to_owned();
            (s("address"), s("verdict"), s("region"), s("reason"))
        })
        .collect()
}

fn assert_verdicts(policy: &str, extra: &[&str], expected: &[(&str, &str, &str, &str)]) {
    let addresses: Vec<&str> = expected.iter().map(|e| e.0).collect();
    let got = explain(policy, extra, &addresses);
    let got: Vec<(&str, &str, &str, &str)> = got
        .iter()
        .map(|(a, v, r, why)| (a.as_str(), v.as_str(), r.as_str(), why.as_str()))
        .collect();
    assert_eq!(got, expected, "{policy} {extra:?}");
}

#[test]
fn eu_cloud_allows_only_eu_provider_regions() {
    // Addresses inside prefixes from ../shared/data/cloud-ranges.csv (row quoted).
    assert_verdicts(
        "eu-cloud.yaml",
        &[],
        &[
            // 3.5.136.0/22,aws,eu-central-1,S3
            ("3.5.136.1", "allow", "eu", "region_allowed"),
            // 2600:f0f0:6106::/48,aws,eu-central-1,S3
            ("2600:f0f0:6106::1", "allow", "eu", "region_allowed"),
            // 104.155.0.0/17,gcp,europe-west1,GOOGLE_CLOUD
            ("104.155.0.1", "allow", "eu", "region_allowed"),
            // 3.5.0.0/19,aws,us-east-1,S3
            ("3.5.0.1", "deny", "non-eu", "region_denied"),
            // 2600:1f60:8000::/39,aws,us-east-1,S3
            ("2600:1f60:8000::1", "deny", "non-eu", "region_denied"),
            // 16.12.15.0/24,aws,eu-west-2,S3 (London)
            ("16.12.15.1", "deny", "europe-non-eu", "region_denied"),
            // 104.16.0.0/13,cloudflare,, (no region)
            ("104.16.0.1", "deny", "global", "region_denied"),
            // In no provider list.
            ("192.0.2.1", "deny", "", "unknown_denied"),
            // The policy's own exemption, and the built-in one for link-local.
            ("10.1.2.3", "allow", "", "exempt_policy"),
            ("169.254.169.254", "allow", "", "exempt_builtin"),
        ],
    );
    // ICMP is in no class of this policy.
    assert_verdicts(
        "eu-cloud.yaml",
        &["--proto", "icmp"],
        &[("3.5.0.1", "allow", "", "unclassified")],
    );
}

#[test]
fn small_examples_do_what_their_comments_say() {
    assert_verdicts(
        "audit-rollout.yaml",
        &[],
        &[("203.0.113.10", "audit", "us-east", "region_denied")],
    );
    assert_verdicts(
        "audit-rollout.yaml",
        &["--dport", "5432"],
        &[("203.0.113.10", "deny", "us-east", "region_denied")],
    );
    assert_verdicts(
        "cgroup-class.yaml",
        &["--cgroup", "/user-data.slice/user-api.service"],
        &[
            ("203.0.113.10", "deny", "elsewhere", "region_denied"),
            ("198.51.100.10", "allow", "eu", "region_allowed"),
        ],
    );
    assert_verdicts(
        "cgroup-class.yaml",
        &["--cgroup", "/system.slice/cron.service"],
        &[("203.0.113.10", "allow", "", "unclassified")],
    );
    for (mark, verdict, reason) in [
        ("0x100", "deny", "region_denied"),
        ("0x4100", "deny", "region_denied"),
        ("0x200", "allow", "region_allowed"),
    ] {
        assert_verdicts(
            "mark-class.yaml",
            &["--mark", mark],
            &[("203.0.113.10", verdict, "elsewhere", reason)],
        );
    }
    assert_verdicts(
        "example.yaml",
        &["--cgroup", "/system.slice/user-api.service"],
        &[
            // 203.0.113.64/26 (regions/eu-west.txt) inside us-east's 203.0.113.0/24.
            ("203.0.113.65", "allow", "eu-west", "region_allowed"),
            ("203.0.113.1", "deny", "us-east", "region_denied"),
            ("192.0.2.5", "allow", "", "exempt_policy"),
        ],
    );
}
