//! `datafence check`: validate a policy and summarise it, or show what replacing one
//! policy with another would change.
#![forbid(unsafe_code)]

use std::{path::Path, process::ExitCode};

use datafence::policy::LoadedPolicy;

use super::{Cli, TableArgs, load, usage_error};

pub(crate) fn check(
    cli: &Cli,
    path: &Path,
    json: bool,
    tables: &TableArgs,
) -> anyhow::Result<ExitCode> {
    match load(path, &cli.cgroup_root, tables) {
        Ok(p) => {
            if json {
                let out = serde_json::json!({"valid": true, "summary": p.summary()});
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print_summary(&p);
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            if json {
                let list: Vec<_> = errors
                    .0
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "file": e.file.display().to_string(),
                            "line": e.line,
                            "column": e.column,
                            "message": e.message,
                        })
                    })
                    .collect();
                let out = serde_json::json!({"valid": false, "errors": list});
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                eprintln!("{errors}");
                eprintln!("{}: invalid ({} error(s))", path.display(), errors.0.len());
            }
            Ok(usage_error())
        }
    }
}

pub(crate) fn check_diff(
    cli: &Cli,
    old: &Path,
    new: &Path,
    json: bool,
    tables: &TableArgs,
) -> anyhow::Result<ExitCode> {
    let mut loaded = Vec::new();
    let mut failed = false;
    for path in [old, new] {
        match load(path, &cli.cgroup_root, tables) {
            Ok(p) => loaded.push(p),
            Err(errors) => {
                eprintln!("{errors}");
                failed = true;
            }
        }
    }
    if failed {
        return Ok(usage_error());
    }
    let d = datafence::diff::diff(&loaded[0], &loaded[1]);
    if json {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        print!("{}", datafence::diff::render(&d));
    }
    Ok(ExitCode::SUCCESS)
}

fn print_summary(p: &LoadedPolicy) {
    let s = p.summary();
    println!("{}: valid", s.path);
    println!("  sha256   {}", s.sha256);
    println!("  mode     {}", s.mode.as_str());
    let egress = s.interfaces.egress.as_ref().map_or_else(
        || "every interface with a default route".to_owned(),
        |l| l.join(", "),
    );
    println!("  egress   {egress}");
    if !s.interfaces.gateway.is_empty() {
        println!("  gateway  {}", s.interfaces.gateway.join(", "));
    }
    println!(
        "  exempt   {}",
        if s.exempt.is_empty() {
            "(none; loopback and link-local always are)".to_owned()
        } else {
            s.exempt.join(", ")
        }
    );
    println!("regions:");
    let width = s.regions.iter().map(|r| r.name.len()).max().unwrap_or(0);
    for r in &s.regions {
        println!(
            "  {:width$}  {:>7} IPv4  {:>7} IPv6 prefixes",
            r.name, r.v4_prefixes, r.v6_prefixes
        );
    }
    println!("data classes (first match wins):");
    for c in &s.classes {
        let reach = if c.allow.is_empty() {
            "no region".to_owned()
        } else {
            c.allow.join(", ")
        };
        println!(
            "  {}  [{}] may reach {}; unknown destinations: {}",
            c.name,
            c.mode.as_str(),
            reach,
            c.unknown.as_str()
        );
        println!("      match: {}", c.selectors);
    }
}
