//! Arbitrary text as a policy file, through the same parse-and-validate pipeline as
//! `load_policy`, then compilation.
//!
//! Region files and cgroups resolve inside a scratch directory that holds a few of each,
//! so the fuzzer reaches their success and error paths without touching the system.

#![no_main]

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use datafence::policy::{LoadOptions, parse_policy_str};
use datafence_common::{MAX_CLASSES, MAX_REGIONS};
use libfuzzer_sys::fuzz_target;

/// Region files, relative to the policy's directory, named as in policies/*.yaml and
/// agent/src/policy/testdata so those seeds find them.
const REGION_FILES: &[(&str, &[u8])] = &[
    (
        "regions/eu-west.txt",
        b"# eu-west\n192.0.2.128/25\n  198.51.100.0/25 # inline comment\n\n2001:db8:200::/48\n",
    ),
    (
        "regions/cloud/eu.txt",
        b"203.0.113.0/26\n2001:db8:300::/48\n",
    ),
    ("regions/cloud/europe-non-eu.txt", b"203.0.113.64/26\n"),
    ("regions/cloud/non-eu.txt", b"203.0.113.128/26\n0.0.0.0/0\n"),
    ("regions/cloud/global.txt", b"::/0\n"),
    (
        "regions/cloud/ambiguous.txt",
        b"203.0.113.0/26\nnot-a-cidr\n10.0.0.1/8\n",
    ),
    ("regions/empty.txt", b""),
    ("regions/not-utf8.txt", b"192.0.2.0/24\n\xff\n"),
];

/// Directories under the scratch cgroup root.
const CGROUPS: &[&str] = &[
    "system.slice/user-api.service",
    "datafence-demo/user-api",
    "a/b/c",
];

/// Text that could make a region file path leave the scratch directory for something that
/// never ends (/dev/zero) or blocks (a FIFO, a tty). Escapes and tags could spell such a
/// path without these bytes, so inputs with `\` or `!` are skipped too.
const REFUSED: &[&str] = &["\\", "!", "/dev", "/proc", "/sys", "/run"];

struct Scratch {
    policy: PathBuf,
    opts: LoadOptions,
}

/// Writes `contents` to `path` unless it already holds them; via a rename, so a parallel
/// fuzzing job never reads a half-written file.
fn put(path: &Path, contents: &[u8]) {
    if fs::read(path).is_ok_and(|c| c == contents) {
        return;
    }
    fs::create_dir_all(path.parent().expect("has a parent")).expect("creating fuzz scratch dir");
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    fs::write(&tmp, contents).expect("writing fuzz scratch file");
    fs::rename(&tmp, path).expect("renaming fuzz scratch file");
}

fn scratch() -> &'static Scratch {
    static SCRATCH: OnceLock<Scratch> = OnceLock::new();
    SCRATCH.get_or_init(|| {
        let dir = std::env::temp_dir().join("datafence-fuzz-policy");
        for (name, contents) in REGION_FILES {
            put(&dir.join(name), contents);
        }
        let cgroup_root = dir.join("cgroup");
        for cgroup in CGROUPS {
            fs::create_dir_all(cgroup_root.join(cgroup)).expect("creating fuzz cgroup dir");
        }
        put(&cgroup_root.join("a/file"), b"");
        Scratch {
            policy: dir.join("policy.yaml"),
            opts: LoadOptions {
                cgroup_root,
                // Small, so the "region table full" check is reachable too.
                table_capacity: 16,
                ..LoadOptions::default()
            },
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if REFUSED.iter().any(|r| text.contains(r)) {
        return;
    }
    let s = scratch();
    let result = parse_policy_str(text, &s.policy, &s.opts);
    // Same input, same answer: nothing depends on hash order or the clock.
    assert_eq!(result, parse_policy_str(text, &s.policy, &s.opts));
    match result {
        Err(errors) => {
            assert!(!errors.0.is_empty(), "an error result lists no errors");
            for e in &errors.0 {
                assert!(!e.message.trim().is_empty(), "empty message: {e:?}");
                assert!(e.line > 0 || e.column == 0, "column without a line: {e:?}");
            }
            let shown = errors.to_string();
            assert!(shown.lines().count() >= errors.0.len());
        }
        Ok(policy) => {
            assert!(policy.regions.len() <= MAX_REGIONS);
            assert!(policy.classes.len() <= MAX_CLASSES);
            let compiled = policy.compile();
            assert_eq!(
                compiled.policy.header.n_classes as usize,
                policy.classes.len()
            );
            let prefixes: usize = policy.regions.iter().map(|r| r.v4.len() + r.v6.len()).sum();
            assert_eq!(
                prefixes,
                compiled.regions_v4.len() + compiled.regions_v6.len()
            );
            serde_json::to_string(&policy.summary()).expect("the summary serializes");
        }
    }
});
