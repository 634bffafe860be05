//! `datafence check`: validate a policy and summarise it, or show what replacing one
//! policy with another would change.
#![forbid(unsafe_code)]

use std::{path::Path, process::ExitCode};

use anyhow::Context as _;
use datafence::{
    host_services::HostServices, local_networks::DeniedSubnet, packet_bypass::UnitReport,
    policy::LoadedPolicy,
};

use super::{Cli, TableArgs, load, usage_error};

pub(crate) fn check(
    cli: &Cli,
    path: &Path,
    json: bool,
    host: bool,
    tables: &TableArgs,
) -> anyhow::Result<ExitCode> {
    match load(path, &cli.cgroup_root, tables) {
        Ok(p) => {
            let local = host
                .then(|| datafence::local_networks::on_this_host(&p))
                .transpose()
                .context("reading this host's interfaces and addresses")?;
            // The host's own resolvers, time servers and cloud endpoints, read from "/".
            let services = host
                .then(|| {
                    datafence::host_services::check(
                        &p,
                        &p.compile(),
                        &cli.cgroup_root,
                        Path::new("/"),
                    )
                })
                .transpose()
                .context("judging this host's resolvers, time servers and cloud endpoints")?;
            let units = datafence::packet_bypass::check_units(&p, &cli.cgroup_root);
            if json {
                let mut out = serde_json::json!({"valid": true, "summary": p.summary()});
                if let Some(local) = &local {
                    out["denied_local_networks"] = serde_json::to_value(local)?;
                }
                if let Some(services) = &services {
                    out["host_services"] = serde_json::to_value(&services.findings)?;
                    out["host_service_notes"] = serde_json::to_value(&services.notes)?;
                }
                out["packet_socket_units"] = serde_json::to_value(&units)?;
                out["cgroup_notes"] = serde_json::to_value(p.cgroup_notes())?;
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                print_summary(&p);
                if let Some(local) = &local {
                    print_local_networks(local);
                }
                if let Some(services) = &services {
                    print_host_services(services);
                }
                print_unit_report(&units);
                for note in p.cgroup_notes() {
                    eprintln!("warning: {note}");
                }
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

fn print_local_networks(denied: &[DeniedSubnet]) {
    if denied.is_empty() {
        println!(
            "local networks: no connected subnet of an attached interface is denied to a class"
        );
        return;
    }
    println!(
        "local networks denied to a class (a false drop if the subnet is local: exempt it or exclude the interface):"
    );
    let width = denied.iter().map(|d| d.interface.len()).max().unwrap_or(0);
    for d in denied {
        println!(
            "  {:width$}  {}  region {}  denied to {}",
            d.interface,
            d.subnet,
            d.region.as_deref().unwrap_or("(none)"),
            d.classes.join(", ")
        );
    }
}

/// A summary line on stdout; each finding and note on stderr, like the other warnings.
/// None changes the exit code: the policy is valid, the host may need an exemption.
fn print_host_services(services: &HostServices) {
    let denied = services.findings.iter().filter(|f| !f.is_audit()).count();
    println!(
        "host services: {} address(es) of resolvers, time servers and cloud endpoints checked; {}",
        services.addresses,
        match denied {
            0 => "no class denies one".to_owned(),
            n => format!("{n} of their services denied to a class (warnings on stderr)"),
        }
    );
    for f in &services.findings {
        let kind = if f.is_audit() { "note" } else { "warning" };
        eprintln!("{kind}: {}", f.message());
    }
    for note in &services.notes {
        eprintln!("note: {note}");
    }
}

/// Warnings go to stderr, like the agent's, so that scripts reading the summary still can.
fn print_unit_report(report: &UnitReport) {
    match report {
        UnitReport::NoUnits => {}
        UnitReport::CannotTell { why } => println!(
            "packet sockets: cannot tell whether user-data units may bypass TC egress ({why})"
        ),
        UnitReport::Checked { units, exposed } if exposed.is_empty() => println!(
            "packet sockets: all {units} user-data unit(s) restrict AF_PACKET and AF_XDP, or CAP_NET_RAW"
        ),
        UnitReport::Checked { exposed, .. } => {
            for e in exposed {
                eprintln!(
                    "warning: class {}: unit {} may open packet or XDP sockets, which send around TC egress (PACKET_QDISC_BYPASS, AF_XDP); set RestrictAddressFamilies=~AF_PACKET AF_XDP or drop CAP_NET_RAW from CapabilityBoundingSet=",
                    e.class, e.unit
                );
            }
        }
    }
}

fn print_summary(p: &LoadedPolicy) {
    let s = p.summary();
    println!("{}: valid", s.path);
    println!("  sha256   {}", s.sha256);
    println!("  mode     {}", s.mode.as_str());
    let egress = s.interfaces.egress.as_ref().map_or_else(
        || "every interface but loopback".to_owned(),
        |l| l.join(", "),
    );
    println!("  egress   {egress}");
    if !s.interfaces.exclude.is_empty() {
        println!("  exclude  {}", s.interfaces.exclude.join(", "));
    }
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
    if !s.nat64.is_empty() {
        println!("  nat64    64:ff9b::/96 (always), {}", s.nat64.join(", "));
    }
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
