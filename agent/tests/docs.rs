//! The documentation stays true: every `datafence` and `cargo xtask` command the README
//! and docs name exists with the flags shown, and every example policy in them passes
//! `datafence check`.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use datafence_test_support::Scratch;

/// The `datafence` binary cargo built for these tests.
fn agent_binary() -> &'static str {
    env!("CARGO_BIN_EXE_datafence")
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

fn doc_files() -> Vec<PathBuf> {
    let root = workspace();
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// Command lines in code: fenced blocks and inline code spans.
fn code_fragments(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            out.push(line.to_owned());
        } else {
            out.extend(line.split('`').skip(1).step_by(2).map(str::to_owned));
        }
    }
    out
}

/// (subcommand, flags) for each `datafence SUB ...` mention.
fn datafence_invocations(fragment: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let words: Vec<&str> = fragment.split_whitespace().collect();
    for (i, w) in words.iter().enumerate() {
        if *w != "datafence" {
            continue;
        }
        let Some(sub) = words.get(i + 1) else {
            continue;
        };
        if !sub.chars().all(|c| c.is_ascii_lowercase()) || sub.is_empty() {
            continue;
        }
        let flags = words[i + 2..]
            .iter()
            .take_while(|w| **w != "datafence" && **w != "|" && !w.starts_with('#'))
            .filter(|w| w.starts_with("--"))
            .map(|w| {
                w.trim_end_matches([',', ')', ';', '.'])
                    .split('=')
                    .next()
                    .unwrap_or("")
                    .to_owned()
            })
            .filter(|w| w.len() > 2)
            .collect();
        out.push(((*sub).to_owned(), flags));
    }
    out
}

fn help(args: &[&str]) -> String {
    let out = Command::new(agent_binary())
        .args(args)
        .arg("--help")
        .output()
        .expect("run datafence");
    assert!(out.status.success(), "datafence {args:?} --help failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_datafence_command_in_the_docs_exists_with_its_flags() {
    let subcommands = help(&[]);
    let mut checked = BTreeSet::new();
    for file in doc_files() {
        let text = std::fs::read_to_string(&file).expect("read doc");
        for fragment in code_fragments(&text) {
            for (sub, flags) in datafence_invocations(&fragment) {
                // Words after "datafence" that are not subcommands (prose in code spans).
                if !subcommands
                    .lines()
                    .any(|l| l.trim_start().starts_with(&format!("{sub} ")))
                {
                    assert!(
                        !fragment.trim_start().starts_with("datafence "),
                        "{}: `datafence {sub}` is not a command:\n{fragment}",
                        file.display()
                    );
                    continue;
                }
                let sub_help = help(&[&sub]);
                for flag in flags {
                    assert!(
                        sub_help.contains(&flag),
                        "{}: `datafence {sub}` has no flag {flag}:\n{fragment}",
                        file.display()
                    );
                    checked.insert(format!("{sub} {flag}"));
                }
                checked.insert(sub);
            }
        }
    }
    for required in ["check", "explain", "run", "status", "reload", "detach"] {
        assert!(
            checked.contains(required),
            "the docs never show `datafence {required}`"
        );
    }
}

#[test]
fn every_cargo_xtask_command_in_the_docs_exists() {
    let out = Command::new("cargo")
        .args(["run", "--quiet", "--package", "xtask", "--", "--help"])
        .current_dir(workspace())
        .output()
        .expect("cargo xtask --help");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let xtask_help = String::from_utf8_lossy(&out.stdout).into_owned();
    for file in doc_files() {
        let text = std::fs::read_to_string(&file).expect("read doc");
        for fragment in code_fragments(&text) {
            let words: Vec<&str> = fragment.split_whitespace().collect();
            for pair in words.windows(3) {
                if pair[0] == "cargo" && pair[1] == "xtask" {
                    let cmd = pair[2].trim_end_matches([',', ')', '`']);
                    if cmd.starts_with('<') || cmd.starts_with('-') {
                        continue;
                    }
                    assert!(
                        xtask_help
                            .lines()
                            .any(|l| l.trim_start().starts_with(&format!("{cmd} "))),
                        "{}: `cargo xtask {cmd}` does not exist",
                        file.display()
                    );
                }
            }
        }
    }
}

/// YAML blocks that are whole policies.
fn policy_blocks(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        match &mut current {
            None if trimmed.starts_with("```yaml") => current = Some(String::new()),
            Some(block) if trimmed.starts_with("```") => {
                if block.lines().any(|l| l.starts_with("version:")) {
                    out.push(std::mem::take(block));
                }
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    out
}

#[test]
fn every_example_policy_in_the_docs_passes_check() {
    let mut count = 0;
    for file in doc_files() {
        let text = std::fs::read_to_string(&file).expect("read doc");
        for (i, block) in policy_blocks(&text).into_iter().enumerate() {
            let scratch = Scratch::new("doc-policy");
            let cgroups = scratch.dir.join("cgroup");
            std::fs::create_dir_all(&cgroups).expect("cgroup root");
            // Region files and cgroups the example names, made up so the example checks.
            for (n, token) in block.split(['[', ']', ',', ' ', '\n', '"']).enumerate() {
                if Path::new(token).extension().is_some_and(|e| e == "txt") {
                    scratch.write(token, &format!("100.64.{}.0/24\n", n % 256));
                } else if token.starts_with('/') && token.len() > 1 && !token.contains("//") {
                    std::fs::create_dir_all(cgroups.join(token.trim_start_matches('/')))
                        .expect("cgroup dir");
                }
            }
            let path = scratch.write("policy.yaml", &block);
            let out = Command::new(agent_binary())
                .arg("--cgroup-root")
                .arg(&cgroups)
                .arg("check")
                .arg(&path)
                .output()
                .expect("check");
            assert!(
                out.status.success(),
                "{} policy #{i} does not pass check:\n{}\n{block}",
                file.display(),
                String::from_utf8_lossy(&out.stderr)
            );
            count += 1;
        }
    }
    assert!(
        count >= 3,
        "expected example policies in the docs, found {count}"
    );
}
