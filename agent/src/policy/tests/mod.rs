//! Loading policies end to end: the contract fixture, and one test per kind of mistake,
//! each asserting the message and where it points.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use datafence_common::{
    MAX_CGROUP_ENTRIES, MAX_EXEMPT_ENTRIES, MAX_SRC_CIDR_ENTRIES, REGION_NONE, RegionId, SLOTS,
    host_essential,
};
use sha2::{Digest, Sha256};
use tempfile::TempDir;

use super::*;

mod selectors;

/// A policy directory with a cgroup2 root beside it holding a few cgroups.
struct Env {
    dir: TempDir,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        for cg in [
            "system.slice/user-api.service",
            "system.slice/other.service",
        ] {
            fs::create_dir_all(dir.path().join("cgroup").join(cg)).unwrap();
        }
        Self { dir }
    }

    fn write(&self, rel: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(rel);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, text).unwrap();
        path
    }

    fn opts(&self) -> LoadOptions {
        LoadOptions {
            cgroup_root: self.dir.path().join("cgroup"),
            ..LoadOptions::default()
        }
    }

    fn load(&self, yaml: &str) -> Result<LoadedPolicy, PolicyErrors> {
        self.load_with(yaml, &self.opts())
    }

    fn load_with(&self, yaml: &str, opts: &LoadOptions) -> Result<LoadedPolicy, PolicyErrors> {
        load_policy(&self.write("policy.yaml", yaml), opts)
    }

    /// The errors, with paths relative to the policy directory.
    fn errors(&self, yaml: &str) -> Vec<String> {
        self.errors_with(yaml, &self.opts())
    }

    fn errors_with(&self, yaml: &str, opts: &LoadOptions) -> Vec<String> {
        let errors = self
            .load_with(yaml, opts)
            .expect_err("policy should be refused");
        errors
            .0
            .iter()
            .map(|e| {
                let rel = e.file.strip_prefix(self.dir.path()).unwrap_or(&e.file);
                PolicyError {
                    file: rel.to_owned(),
                    ..e.clone()
                }
                .to_string()
            })
            .collect()
    }
}

fn errors(yaml: &str) -> Vec<String> {
    Env::new().errors(yaml)
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/policy/testdata/full")
}

const REGIONS: &str = "regions:\n  eu:\n    cidrs: [192.0.2.0/24]\n";

/// Prefixes as text, in list order.
fn shown<T: ToString>(nets: &[T]) -> Vec<String> {
    nets.iter().map(ToString::to_string).collect()
}

/// The hash covers the policy, then each region file in the order the regions name them,
/// whatever order they are read and parsed in; and each region keeps its prefixes in
/// the order written, file after file.
#[test]
fn the_hash_and_the_prefix_lists_follow_the_order_files_are_named_in() {
    let env = Env::new();
    let files = [
        ("regions/b.txt", "2001:db8:b::/48\n198.51.100.0/25\n"),
        (
            "regions/a.txt",
            "# a comment\n203.0.113.0/24\n2001:db8:a::/48\n",
        ),
        ("regions/c.txt", "192.0.2.0/24\n\n198.51.100.128/25\n"),
    ];
    for (rel, text) in files {
        env.write(rel, text);
    }
    let yaml = "version: 1\nregions:\n  one:\n    files: [regions/b.txt, regions/a.txt]\n  two:\n    files: [regions/c.txt]\ndata_classes: {}\n";
    let p = env.load(yaml).unwrap();
    let mut hash = Sha256::new();
    hash.update(yaml);
    for (_, text) in files {
        hash.update(text);
    }
    assert_eq!(p.sha256, hex::encode(hash.finalize()));
    let v4 = |i: usize| shown(&p.regions[i].v4);
    let v6 = |i: usize| shown(&p.regions[i].v6);
    assert_eq!(v4(0), ["198.51.100.0/25", "203.0.113.0/24"]);
    assert_eq!(v6(0), ["2001:db8:b::/48", "2001:db8:a::/48"]);
    assert_eq!(v4(1), ["192.0.2.0/24", "198.51.100.128/25"]);
    assert!(v6(1).is_empty());
}

#[test]
fn full_fixture_loads_as_documented() {
    let env = Env::new();
    let path = fixture_dir().join("policy.yaml");
    let p = load_policy(&path, &env.opts()).unwrap();

    let mut hash = Sha256::new();
    hash.update(fs::read(&path).unwrap());
    hash.update(fs::read(fixture_dir().join("regions/eu-west.txt")).unwrap());
    assert_eq!(p.sha256, hex::encode(hash.finalize()));
    assert_eq!(p.path, path);
    assert_eq!(p.version, 1);
    assert_eq!(p.mode, Mode::Enforce);
    assert_eq!(p.egress_interfaces, Some(vec!["eth0".to_owned()]));
    assert_eq!(p.gateway_interfaces, vec!["eth1".to_owned()]);
    assert_eq!(p.exempt.len(), 2);

    assert_eq!(p.regions.len(), 2);
    let eu = &p.regions[0];
    assert_eq!((eu.name.as_str(), eu.id), ("eu-west", 1));
    let v4: Vec<String> = eu.v4.iter().map(ToString::to_string).collect();
    assert_eq!(
        v4,
        ["198.51.100.0/24", "192.0.2.128/25"],
        "file repeat deduped"
    );
    let v6: Vec<String> = eu.v6.iter().map(ToString::to_string).collect();
    assert_eq!(v6, ["2001:db8:100::/48", "2001:db8:200::/48"]);
    assert_eq!(
        (p.regions[1].name.as_str(), p.regions[1].id),
        ("us-east", 2)
    );

    let user = &p.classes[0];
    assert_eq!((user.name.as_str(), user.id), ("user-data", 0));
    assert_eq!(user.mode, Mode::Audit);
    assert_eq!(user.unknown, UnknownRule::Deny);
    assert_eq!(user.allow, vec![1]);
    let cg = env.dir.path().join("cgroup/system.slice/user-api.service");
    let ino = fs::metadata(cg).unwrap().ino();
    assert_eq!(
        user.selectors.cgroups,
        vec![("/system.slice/user-api.service".to_owned(), ino)]
    );
    assert_eq!(
        user.selectors.marks,
        vec![datafence_common::MarkMatch {
            value: 0x10,
            mask: 0xff
        }]
    );
    assert_eq!(user.selectors.dscp, vec![10]);
    assert_eq!(user.selectors.protocols, vec![6, 17]);
    assert_eq!(
        user.selectors.port_ranges,
        vec![(443, 443), (5432, 5432), (9000, 9100)]
    );
    assert_eq!(
        user.selectors.src_cidrs,
        vec!["192.0.2.0/25".parse().unwrap()]
    );

    let telemetry = &p.classes[1];
    assert_eq!(telemetry.mode, Mode::Enforce, "inherits the policy mode");
    assert_eq!(telemetry.unknown, UnknownRule::Allow);
    assert_eq!(telemetry.allow, vec![1, 2]);
    assert_eq!(p.class_name(1), Some("telemetry"));
    assert_eq!(p.class_name(2), None);
    assert_eq!(p.region_name(2), Some("us-east"));
    assert_eq!(p.region_name(REGION_NONE), None);
    assert_eq!(p.region_name(3), None);

    let compiled = p.compile();
    let at = |s: &str| compiled.region_of(s.parse().unwrap());
    assert_eq!(at("192.0.2.200"), 1);
    assert_eq!(at("203.0.113.9"), 2);
    assert_eq!(at("192.0.2.1"), RegionId::from(REGION_NONE));
    assert_eq!(compiled.cgroups, vec![(ino, 0b1)]);
    assert_eq!(compiled.src_classes("192.0.2.5".parse().unwrap()), 0b1);

    let summary = serde_json::to_value(p.summary()).unwrap();
    assert_eq!(summary["regions"][0]["v4_prefixes"], 2);
    assert_eq!(summary["regions"][0]["v6_prefixes"], 2);
    assert_eq!(summary["classes"][0]["mode"], "audit");
    assert_eq!(summary["classes"][0]["unknown"], "deny");
    assert_eq!(summary["classes"][1]["allow"][1], "us-east");
    assert_eq!(
        summary["classes"][0]["selectors"]["dst_ports"],
        serde_json::json!(["443", "5432", "9000-9100"])
    );
    assert_eq!(
        summary["classes"][0]["selectors"]["marks"],
        serde_json::json!(["0x10/0xff"])
    );
    assert!(summary["classes"][1]["selectors"].get("cgroups").is_none());
    assert_eq!(summary["interfaces"]["egress"], serde_json::json!(["eth0"]));
    assert_eq!(summary["sha256"], p.sha256.as_str());
}

#[test]
fn minimal_policy_takes_the_defaults() {
    let p = Env::new()
        .load("version: 1\nregions: {}\ndata_classes: {}\n")
        .unwrap();
    assert_eq!(p.mode, Mode::Enforce);
    assert_eq!(p.egress_interfaces, None);
    assert!(p.gateway_interfaces.is_empty() && p.exempt.is_empty());
    assert!(p.regions.is_empty() && p.classes.is_empty());
    let compiled = p.compile();
    assert_eq!(compiled.policy.header.loaded, 1);
    assert_eq!(compiled.policy.header.n_classes, 0);
}

#[test]
fn class_defaults_fail_closed() {
    let p = Env::new()
        .load(&format!(
            "version: 1\nmode: audit\n{REGIONS}data_classes:\n  c:\n    match: {{dscp: [1]}}\n"
        ))
        .unwrap();
    assert_eq!(p.classes[0].mode, Mode::Audit);
    assert_eq!(p.classes[0].unknown, UnknownRule::Deny);
    assert!(p.classes[0].allow.is_empty());
}

#[test]
fn host_essentials_are_on_unless_switched_off_one_by_one() {
    let on = Env::new()
        .load(&format!("version: 1\n{REGIONS}data_classes: {{}}\n"))
        .unwrap();
    assert_eq!(on.host_essentials, HostEssentials::default());
    assert_eq!(
        on.compile().policy.header.host_essentials,
        host_essential::ALL
    );
    let off = Env::new()
        .load(&format!(
            "version: 1\nhost_essentials: {{dhcp: false, link_multicast: false}}\n{REGIONS}data_classes: {{}}\n"
        ))
        .unwrap();
    assert_eq!(
        off.host_essentials,
        HostEssentials {
            dhcp: false,
            neighbor_discovery: true,
            link_multicast: false
        }
    );
    assert_eq!(
        off.compile().policy.header.host_essentials,
        host_essential::NEIGHBOR_DISCOVERY
    );
    assert_eq!(
        errors("version: 1\nhost_essentials: {ntp: false}\nregions: {}\ndata_classes: {}\n"),
        [
            "policy.yaml:2:19: unknown field `ntp`, expected one of dhcp, neighbor_discovery, link_multicast"
        ]
    );
}

#[test]
fn unknown_key_at_top_level() {
    assert_eq!(
        errors("version: 1\nregions: {}\ndata_classes: {}\nexmept: []\n"),
        [
            "policy.yaml:4:1: unknown field `exmept`, expected one of version, mode, interfaces, \
          exempt, nat64, include_dirs, host_essentials, regions, data_classes"
        ]
    );
}

#[test]
fn unknown_key_in_match() {
    assert_eq!(
        errors(&format!(
            "version: 1\n{REGIONS}data_classes:\n  c:\n    match:\n      port: [443]\n"
        )),
        [
            "policy.yaml:8:7: unknown field `port`, expected one of cgroups, marks, dscp, \
          protocols, dst_ports, src_cidrs"
        ]
    );
}

#[test]
fn unknown_key_in_region() {
    assert_eq!(
        errors("version: 1\nregions:\n  eu:\n    cidr: [192.0.2.0/24]\ndata_classes: {}\n"),
        ["policy.yaml:4:5: unknown field `cidr`, expected one of cidrs, files"]
    );
}

#[test]
fn syntax_error_points_at_the_problem() {
    assert_eq!(
        errors("version: 1\nregions: [\n"),
        ["policy.yaml:2:10: expected mapping start"]
    );
}

#[test]
fn missing_required_key() {
    assert_eq!(
        errors("version: 1\nregions: {}\n"),
        ["policy.yaml:2:1: missing field `data_classes`"]
    );
}

#[test]
fn missing_policy_file() {
    let env = Env::new();
    let errors = load_policy(&env.dir.path().join("nope.yaml"), &env.opts()).unwrap_err();
    assert_eq!(errors.0.len(), 1);
    assert_eq!(errors.0[0].line, 0);
    assert!(
        errors.0[0]
            .message
            .starts_with("cannot read policy file: No such file"),
        "{errors}"
    );
}

#[test]
fn wrong_version() {
    assert_eq!(
        errors("version: 2\nregions: {}\ndata_classes: {}\n"),
        ["policy.yaml:1:10: unsupported policy version 2; this agent understands version 1"]
    );
}

#[test]
fn invalid_mode_and_unknown_rule() {
    assert_eq!(
        errors(&format!(
            "version: 1\nmode: enforcing\n{REGIONS}data_classes:\n  c:\n    match: {{dscp: [1]}}\n    unknown: maybe\n    mode: audits\n"
        )),
        [
            "policy.yaml:2:7: invalid mode `enforcing`: expected `enforce` or `audit`",
            "policy.yaml:9:14: invalid unknown rule `maybe`: expected `deny` or `allow`",
            "policy.yaml:10:11: invalid mode `audits`: expected `enforce` or `audit`",
        ]
    );
}

#[test]
fn invalid_cidr() {
    assert_eq!(
        errors("version: 1\nregions:\n  eu:\n    cidrs: [192.0.2.0/24, 10/8]\ndata_classes: {}\n"),
        [
            "policy.yaml:4:27: invalid CIDR `10/8`: expected ADDRESS/LENGTH such as 192.0.2.0/24 \
          or 2001:db8::/32"
        ]
    );
}

#[test]
fn cidr_with_host_bits_set() {
    assert_eq!(
        errors(&format!(
            "version: 1\nexempt:\n  - 10.0.0.1/8\n{REGIONS}data_classes:\n  c:\n    match:\n      src_cidrs: [\"2001:db8::1/32\"]\n"
        )),
        [
            "policy.yaml:3:5: `10.0.0.1/8` has host bits set; did you mean 10.0.0.0/8?",
            "policy.yaml:10:19: `2001:db8::1/32` has host bits set; did you mean 2001:db8::/32?",
        ]
    );
}

#[test]
fn undefined_region() {
    assert_eq!(
        errors(&format!(
            "version: 1\n{REGIONS}  us:\n    cidrs: []\ndata_classes:\n  c:\n    match: {{dscp: [1]}}\n    allow: [eu, eu-west]\n"
        )),
        ["policy.yaml:10:17: region `eu-west` is not defined (defined: eu, us)"]
    );
    assert_eq!(
        errors(
            "version: 1\nregions: {}\ndata_classes:\n  c:\n    match: {dscp: [1]}\n    allow: [eu]\n"
        ),
        ["policy.yaml:6:13: region `eu` is not defined (no regions are defined)"]
    );
}

#[test]
fn prefix_in_two_regions() {
    let env = Env::new();
    assert_eq!(
        env.errors(
            "version: 1\nregions:\n  eu:\n    cidrs: [192.0.2.0/24]\n  us:\n    cidrs: [192.0.2.0/24]\ndata_classes: {}\n"
        ),
        ["policy.yaml:6:13: 192.0.2.0/24 is assigned to both region `eu` and region `us` \
          (first at POLICY:4:13); an exact prefix may belong to one region only"
            .replace("POLICY", &env.dir.path().join("policy.yaml").display().to_string())]
    );
}

#[test]
fn prefix_repeated_in_one_region_or_nested_across_regions_is_fine() {
    let p = Env::new()
        .load(
            "version: 1\nregions:\n  eu:\n    cidrs: [192.0.2.0/24, 192.0.2.0/24]\n  us:\n    cidrs: [192.0.2.0/25]\ndata_classes: {}\n",
        )
        .unwrap();
    assert_eq!(p.regions[0].v4.len(), 1);
    let compiled = p.compile();
    assert_eq!(compiled.region_of("192.0.2.1".parse().unwrap()), 2);
    assert_eq!(compiled.region_of("192.0.2.200".parse().unwrap()), 1);
}

#[test]
fn missing_region_file() {
    let errors = errors(
        "version: 1\nregions:\n  eu:\n    files:\n      - regions/eu.txt\ndata_classes: {}\n",
    );
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].starts_with("policy.yaml:5:9: cannot read region file "),
        "{errors:?}"
    );
    assert!(
        errors[0].ends_with("regions/eu.txt: No such file or directory (os error 2)"),
        "{errors:?}"
    );
}

#[test]
fn bad_entries_in_region_file() {
    let env = Env::new();
    env.write(
        "regions/eu.txt",
        "# comment\n192.0.2.0/24\n\n   10.0.0.1/8  # typo\n2001:db8::/32\nnonsense\n",
    );
    assert_eq!(
        env.errors("version: 1\nregions:\n  eu:\n    files: [regions/eu.txt]\ndata_classes: {}\n"),
        [
            "regions/eu.txt:4:4: `10.0.0.1/8` has host bits set; did you mean 10.0.0.0/8?",
            "regions/eu.txt:6:1: invalid CIDR `nonsense`: expected ADDRESS/LENGTH such as \
             192.0.2.0/24 or 2001:db8::/32",
        ]
    );
}

/// A region file of several megabytes is parsed in pieces; a line's number counts every
/// line before it, in every piece, comments and blank lines included.
#[test]
fn bad_entries_past_the_first_megabyte_are_named_by_their_own_line() {
    let env = Env::new();
    let mut text = String::new();
    for i in 0..300_000u32 {
        match i % 3 {
            0 => writeln!(text, "# block {i}").unwrap(),
            1 => writeln!(text, "10.{}.{}.0/24", (i >> 16) & 0xff, (i >> 8) & 0xff).unwrap(),
            _ => text.push('\n'),
        }
    }
    // Lines 300,001 and 300,003.
    text.push_str("  10.255.255.1/24\n\nnonsense\n");
    assert!(
        text.len() > 2 * super::validate::PIECE_BYTES,
        "{}",
        text.len()
    );
    env.write("regions/big.txt", &text);
    let errors =
        env.errors("version: 1\nregions:\n  eu:\n    files: [regions/big.txt]\ndata_classes: {}\n");
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].starts_with("regions/big.txt:300001:3: `10.255.255.1/24` has host bits"),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with("regions/big.txt:300003:1: invalid CIDR `nonsense`"),
        "{errors:?}"
    );
}

#[test]
fn region_file_prefix_clashing_with_another_region() {
    let env = Env::new();
    env.write("us.txt", "198.51.100.0/24\n");
    assert_eq!(
        env.errors(
            "version: 1\nregions:\n  eu:\n    cidrs: [198.51.100.0/24]\n  us:\n    files: [us.txt]\ndata_classes: {}\n"
        ),
        ["us.txt:1:1: 198.51.100.0/24 is assigned to both region `eu` and region `us` (first \
          at POLICY:4:13); an exact prefix may belong to one region only"
            .replace("POLICY", &env.dir.path().join("policy.yaml").display().to_string())]
    );
}

#[test]
fn too_many_regions() {
    let mut yaml = "version: 1\nregions:\n".to_owned();
    for i in 0..256 {
        writeln!(yaml, "  r{i}: {{}}").unwrap();
    }
    yaml.push_str("data_classes: {}\n");
    assert_eq!(
        errors(&yaml),
        ["policy.yaml:258:3: too many regions: 256 defined, at most 255 are supported"]
    );
}

#[test]
fn too_many_classes() {
    let mut yaml = format!("version: 1\n{REGIONS}data_classes:\n");
    for i in 0..17 {
        writeln!(yaml, "  c{i}:\n    match: {{dscp: [1]}}").unwrap();
    }
    assert_eq!(
        errors(&yaml),
        ["policy.yaml:38:3: too many data classes: 17 defined, at most 16 are supported"]
    );
}

#[test]
fn region_table_capacity() {
    let env = Env::new();
    let opts = LoadOptions {
        table_capacity: 2,
        ..env.opts()
    };
    let yaml = "version: 1\nregions:\n  eu:\n    cidrs: [192.0.2.0/24, 198.51.100.0/24, \"2001:db8::/32\"]\n  us:\n    cidrs: [203.0.113.0/24, 192.0.2.0/24]\ndata_classes: {}\n";
    assert_eq!(
        env.errors_with(yaml, &opts),
        [
            "policy.yaml:3:3: regions hold 3 distinct IPv4 prefixes, more than the table \
             capacity of 2 (raise --table-capacity)"
                .to_owned(),
            "policy.yaml:6:29: 192.0.2.0/24 is assigned to both region `eu` and region `us` \
             (first at POLICY:4:13); an exact prefix may belong to one region only"
                .replace(
                    "POLICY",
                    &env.dir.path().join("policy.yaml").display().to_string()
                ),
        ]
    );
    let at_limit = LoadOptions {
        table_capacity: 3,
        ..env.opts()
    };
    assert_eq!(env.errors_with(yaml, &at_limit).len(), 1);
}

/// A YAML flow list of `n` IPv4 host prefixes, the `start`th onwards.
fn many_hosts(start: u32, n: u32) -> String {
    let mut out = String::from("[");
    for i in start..start + n {
        if i > start {
            out.push_str(", ");
        }
        write!(out, "{}", std::net::Ipv4Addr::from(0x0a00_0000 + i)).unwrap();
    }
    out.push(']');
    out
}

#[test]
fn exempt_capacity() {
    let limit = MAX_EXEMPT_ENTRIES / SLOTS;
    let yaml = |n| {
        format!(
            "version: 1\nexempt: {}\nregions: {{}}\ndata_classes: {{}}\n",
            many_hosts(0, n)
        )
    };
    assert_eq!(
        errors(&yaml(limit + 1)),
        [format!(
            "policy.yaml:2:9: `exempt` holds {} distinct IPv4 prefixes, at most {limit} are \
             supported",
            limit + 1
        )]
    );
    assert!(Env::new().load(&yaml(limit)).is_ok());
}

#[test]
fn src_cidr_capacity() {
    let limit = MAX_SRC_CIDR_ENTRIES / SLOTS;
    let half = limit / 2 + 1;
    let yaml = format!(
        "version: 1\nregions: {{}}\ndata_classes:\n  a:\n    match:\n      src_cidrs: {}\n  b:\n    match:\n      src_cidrs: {}\n",
        many_hosts(0, half),
        many_hosts(half - 1, half),
    );
    assert_eq!(
        errors(&yaml),
        [format!(
            "policy.yaml:4:3: data classes list {} distinct IPv4 source prefixes, at most \
             {limit} are supported",
            2 * half - 1
        )]
    );
}

#[test]
fn cgroup_capacity() {
    let env = Env::new();
    let limit = MAX_CGROUP_ENTRIES / SLOTS;
    let mut list = String::new();
    for i in 0..=limit {
        fs::create_dir(env.dir.path().join(format!("cgroup/g{i}"))).unwrap();
        write!(list, "/g{i}, ").unwrap();
    }
    assert_eq!(
        env.errors(&format!(
            "version: 1\nregions: {{}}\ndata_classes:\n  a:\n    match:\n      cgroups: [{list}]\n"
        )),
        [format!(
            "policy.yaml:4:3: data classes list {} distinct cgroups, at most {limit} are \
             supported",
            limit + 1
        )]
    );
}

#[test]
fn bad_names_and_interfaces() {
    assert_eq!(
        errors(
            "version: 1\ninterfaces:\n  egress: [eth0, \"a/b\", averyveryverylongname]\nregions:\n  \"eu west\": {}\ndata_classes:\n  \"c:1\":\n    match: {dscp: [1]}\n"
        ),
        [
            "policy.yaml:3:18: invalid interface name `a/b`: expected 1 to 15 bytes without \
             `/`, `:` or whitespace",
            "policy.yaml:3:25: invalid interface name `averyveryverylongname`: expected 1 to \
             15 bytes without `/`, `:` or whitespace",
            "policy.yaml:5:3: invalid region name `eu west`: use only letters, digits, `-`, \
             `_` and `.`",
            "policy.yaml:7:3: invalid data class name `c:1`: use only letters, digits, `-`, \
             `_` and `.`",
        ]
    );
}

#[test]
fn every_mistake_is_reported_at_once() {
    let env = Env::new();
    env.write("r.txt", "bogus\n");
    let errors = env.errors(&format!(
        "version: 3\n{REGIONS}    files: [r.txt]\ndata_classes:\n  c:\n    match:\n      dscp: [99]\n    allow: [nowhere]\n"
    ));
    assert_eq!(errors.len(), 4, "{errors:#?}");
    assert!(errors[0].starts_with("policy.yaml:1:10: unsupported policy version 3"));
    assert!(errors[1].starts_with("policy.yaml:9:14: DSCP value 99"));
    assert!(errors[2].starts_with("policy.yaml:10:13: region `nowhere` is not defined"));
    assert!(errors[3].starts_with("r.txt:1:1: invalid CIDR `bogus`"));
}

#[test]
fn exclusion_patterns_are_globs_checked_where_they_are_written() {
    let p = Env::new().load(
        "version: 1\ninterfaces:\n  exclude: [\"veth*\", \"cali?????\", \"veth*\"]\nregions: {}\ndata_classes: {}\n",
    )
    .expect("valid policy");
    assert_eq!(p.excluded_interfaces, ["veth*", "cali?????"]);
    assert!(p.excludes_interface("veth1a2b") && p.excludes_interface("cali12345"));
    assert!(!p.excludes_interface("eth0") && !p.excludes_interface("cali1"));
    assert_eq!(
        errors(
            "version: 1\ninterfaces:\n  exclude: [\"veth[\", \"\", \"a/*\"]\nregions: {}\ndata_classes: {}\n"
        ),
        [
            "policy.yaml:3:13: invalid interface pattern `veth[`: unclosed character class; missing ']'",
            "policy.yaml:3:22: invalid interface pattern ``: a pattern cannot be empty",
            "policy.yaml:3:26: invalid interface pattern `a/*`: interface names never contain `/`",
        ]
    );
}

#[test]
fn nat64_prefixes_are_ipv6_slash_96_and_at_most_four() {
    let p = Env::new()
        .load(
            "version: 1\nnat64: [\"2001:db8:64::/96\", \"64:ff9b:1::/96\", \"2001:db8:64::/96\"]\nregions: {}\ndata_classes: {}\n",
        )
        .expect("valid policy");
    let listed: Vec<String> = p.nat64_prefixes.iter().map(ToString::to_string).collect();
    assert_eq!(listed, ["2001:db8:64::/96", "64:ff9b:1::/96"]);
    let compiled = p.compile();
    assert_eq!(compiled.policy.header.n_nat64, 2);
    assert_eq!(
        compiled.policy.header.nat64[0],
        datafence_common::verdict::nat64_words(
            &"2001:db8:64::"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        )
    );
    assert_eq!(
        errors(
            "version: 1\nnat64: [\"2001:db8:64::/64\", 192.0.2.0/24, \"bogus\", \"2001:db8:1::/96\", \"2001:db8:2::/96\", \"2001:db8:3::/96\", \"2001:db8:4::/96\", \"2001:db8:5::/96\"]\nregions: {}\ndata_classes: {}\n"
        ),
        [
            "policy.yaml:2:9: invalid NAT64 prefix `2001:db8:64::/64`: only /96 prefixes are supported, which put the IPv4 address in the last four bytes",
            "policy.yaml:2:29: invalid NAT64 prefix `192.0.2.0/24`: a NAT64 prefix is an IPv6 prefix",
            "policy.yaml:2:43: invalid NAT64 prefix `bogus`: invalid CIDR `bogus`: expected \
             ADDRESS/LENGTH such as 192.0.2.0/24 or 2001:db8::/32",
            "policy.yaml:2:128: invalid NAT64 prefix `2001:db8:5::/96`: at most 4 NAT64 prefixes besides 64:ff9b::/96",
        ]
    );
}
