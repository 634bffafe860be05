//! Files the agent trusts, refused as `datafence check` meets them: each refusal names
//! the file and what is wrong with it, and nothing waits on a file that never ends.

use std::{
    fmt::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Command, Output},
    time::Duration,
};

use datafence_test_support::{Scratch, output_within};

fn agent_binary() -> &'static str {
    env!("CARGO_BIN_EXE_datafence")
}

fn policy_with_region_file(file: &str) -> String {
    format!(
        r"
version: 1
regions:
  eu-west:
    files: [{file}]
  us-east:
    cidrs: [203.0.113.0/24]
data_classes:
  user-data:
    match:
      marks: [{{value: 0x10}}]
    allow: [eu-west]
"
    )
}

/// `datafence check` on `policy`, which must exit within `limit`.
fn check(policy: &Path, extra: &[&str], limit: Duration) -> Output {
    output_within(
        Command::new(agent_binary())
            .arg("check")
            .args(extra)
            .arg(policy),
        limit,
    )
}

fn refused(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "not refused:\n{err}");
    err
}

const QUICK: Duration = Duration::from_secs(5);

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn a_world_writable_region_file_is_refused() {
    let scratch = Scratch::new("hostile-mode");
    let region = scratch.write("regions/eu-west.txt", "198.51.100.0/24\n");
    let policy = scratch.write(
        "policy.yaml",
        &policy_with_region_file("regions/eu-west.txt"),
    );
    let out = check(&policy, &[], QUICK);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    chmod(&region, 0o666);
    let err = refused(&check(&policy, &[], QUICK));
    assert!(err.contains("regions/eu-west.txt"), "{err}");
    assert!(err.contains("mode 0666, writable by anyone"), "{err}");
    chmod(&region, 0o644);
    chmod(&scratch.dir.join("regions"), 0o777);
    let err = refused(&check(&policy, &[], QUICK));
    assert!(err.contains("refusing directory"), "{err}");
    assert!(err.contains("mode 0777"), "{err}");
}

#[test]
fn a_symlink_to_an_unsafe_file_is_refused() {
    let scratch = Scratch::new("hostile-symlink");
    let elsewhere = Scratch::new("hostile-symlink-target");
    let target = elsewhere.write("eu-west.txt", "198.51.100.0/24\n");
    chmod(&target, 0o646);
    std::os::unix::fs::symlink(&target, scratch.dir.join("eu-west.txt")).expect("symlink");
    let policy = scratch.write("policy.yaml", &policy_with_region_file("eu-west.txt"));
    // It leads out of the policy's directory,
    let err = refused(&check(&policy, &[], QUICK));
    assert!(err.contains(&target.display().to_string()), "{err}");
    assert!(err.contains("is outside the policy's directory"), "{err}");
    // and where it leads, anyone may write.
    let included = format!(
        "include_dirs: [{}]\n{}",
        elsewhere.dir.display(),
        policy_with_region_file("eu-west.txt")
    );
    let policy = scratch.write("policy.yaml", &included);
    let err = refused(&check(&policy, &[], QUICK));
    assert!(err.contains(&target.display().to_string()), "{err}");
    assert!(err.contains("mode 0646, writable by anyone"), "{err}");
}

#[test]
fn a_fifo_as_a_region_file_is_refused_at_once() {
    let scratch = Scratch::new("hostile-fifo");
    let fifo = scratch.dir.join("eu-west.txt");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(made.success());
    let policy = scratch.write("policy.yaml", &policy_with_region_file("eu-west.txt"));
    let err = refused(&check(&policy, &[], QUICK));
    assert!(err.contains("is a FIFO, not a regular file"), "{err}");
}

#[test]
fn a_100_mb_policy_is_refused_naming_the_limit_and_the_flag() {
    let scratch = Scratch::new("hostile-size");
    let region = policy_with_region_file("regions/eu-west.txt");
    scratch.write("regions/eu-west.txt", "198.51.100.0/24\n");
    let mut text = region.clone();
    let comment = "# padding\n".repeat(100 * 1024 * 1024 / 10);
    text.push_str(&comment);
    let policy = scratch.write("policy.yaml", &text);
    let err = refused(&check(&policy, &[], QUICK));
    assert!(err.contains("over the limit of 16777216 bytes"), "{err}");
    assert!(err.contains("--max-policy-bytes"), "{err}");
    // The limit is the operator's to raise; a small policy under a lowered one is refused
    // the same way.
    let small = scratch.write("small.yaml", &region);
    let out = check(&small, &["--max-policy-bytes", "64"], QUICK);
    assert!(refused(&out).contains("over the limit of 64 bytes"));
    let out = check(&small, &["--max-region-file-bytes", "8"], QUICK);
    let err = refused(&out);
    assert!(err.contains("regions/eu-west.txt"), "{err}");
    assert!(err.contains("--max-region-file-bytes"), "{err}");
}

/// A policy past the parser's node limit is refused naming the limit, its flag and the
/// way out (region files); raised, the same policy is read.
#[test]
fn a_policy_past_the_yaml_node_limit_is_refused_naming_the_limit_and_the_flag() {
    let scratch = Scratch::new("hostile-nodes");
    let mut cidrs = String::new();
    for i in 0..300_000u32 {
        let [_, a, b, c] = i.to_be_bytes();
        write!(cidrs, "10.{a}.{b}.{c}/32, ").expect("write");
    }
    let text =
        format!("version: 1\nregions:\n  eu-west:\n    cidrs: [{cidrs}]\ndata_classes: {{}}\n");
    let policy = scratch.write("policy.yaml", &text);
    // Parsing up to the limit takes a debug build a few seconds on a loaded machine.
    let err = refused(&check(&policy, &[], Duration::from_mins(1)));
    assert!(err.contains("more than 250000 YAML nodes"), "{err}");
    assert!(err.contains("--max-yaml-nodes"), "{err}");
    assert!(err.contains("region files"), "{err}");
    let out = check(
        &policy,
        &["--max-yaml-nodes", "400000"],
        Duration::from_mins(1),
    );
    let out_text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out_text.contains("300000"), "{out_text}");
}

#[test]
fn a_file_that_is_not_a_region_file_is_quoted_once() {
    let scratch = Scratch::new("hostile-passwd");
    // Like /etc/passwd: lines that are not CIDRs, one with a terminal escape.
    let lines = (0..50).fold(String::new(), |mut text, i| {
        let _ = writeln!(
            text,
            "user{i}:x:{i}:{i}:secret-{i}:/home/user{i}:/bin/sh\u{1b}[2J"
        );
        text
    });
    scratch.write("passwd", &lines);
    let policy = scratch.write("policy.yaml", &policy_with_region_file("passwd"));
    let err = refused(&check(&policy, &[], QUICK));
    assert_eq!(err.matches("secret-").count(), 1, "{err}");
    assert!(
        !err.contains('\u{1b}'),
        "an escape is printed escaped: {err}"
    );
    assert!(
        err.contains("and 49 more lines of this file are not CIDRs"),
        "{err}"
    );
}

#[test]
fn a_region_file_outside_the_policys_directory_needs_include_dirs() {
    let scratch = Scratch::new("hostile-outside");
    let shared = Scratch::new("hostile-outside-shared");
    let outside = shared.write("eu-west.txt", "198.51.100.0/24\n");
    for named in [
        outside.display().to_string(),
        format!(
            "../{}/eu-west.txt",
            shared.dir.file_name().expect("a name").to_string_lossy()
        ),
    ] {
        let policy = scratch.write("policy.yaml", &policy_with_region_file(&named));
        let err = refused(&check(&policy, &[], QUICK));
        assert!(err.contains("is outside the policy's directory"), "{err}");
        assert!(err.contains("include_dirs"), "{err}");
        let included = format!(
            "include_dirs: [{}]\n{}",
            shared.dir.display(),
            policy_with_region_file(&named)
        );
        let policy = scratch.write("policy.yaml", &included);
        let out = check(&policy, &[], QUICK);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
