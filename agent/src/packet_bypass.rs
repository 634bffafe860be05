//! Warning about user-data services that could send around TC egress. A packet socket
//! (`AF_PACKET`) with `PACKET_QDISC_BYPASS` hands frames straight to the driver, and so
//! does an XDP socket (`AF_XDP`: the driver's zero-copy ring, or `__dev_direct_xmit` in
//! copy mode), so the packet ring never sees them. Opening either needs `CAP_NET_RAW`, so
//! a systemd unit is safe when its `RestrictAddressFamilies=` leaves out both families or
//! its `CapabilityBoundingSet=` leaves out `CAP_NET_RAW`. `datafence check` asks systemd
//! for the units a class's cgroups name and warns about each that restricts neither.
#![forbid(unsafe_code)]

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use serde::Serialize;

use crate::policy::LoadedPolicy;

/// A running unit whose processes are user data and may open packet sockets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExposedUnit {
    pub class: String,
    pub unit: String,
}

/// What `check` could find out about the units that classes name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum UnitReport {
    /// No class names a cgroup that holds a systemd unit on this host.
    NoUnits,
    /// systemd is not this host's service manager, or did not answer.
    CannotTell { why: String },
    /// Every unit named was asked; these restrict neither.
    Checked {
        units: usize,
        exposed: Vec<ExposedUnit>,
    },
}

/// The units named by each class's cgroups, asked of systemd.
pub fn check_units(policy: &LoadedPolicy, cgroup_root: &Path) -> UnitReport {
    check_class_cgroups(&policy.class_cgroups(), cgroup_root)
}

/// [`check_units`] for (class, cgroup path) pairs, from [`LoadedPolicy::class_cgroups`].
pub fn check_class_cgroups(class_cgroups: &[(String, String)], cgroup_root: &Path) -> UnitReport {
    let named: Vec<(String, String)> = class_cgroups
        .iter()
        .flat_map(|(class, path)| {
            units_under(cgroup_root, path)
                .into_iter()
                .map(move |unit| (class.clone(), unit))
        })
        .collect();
    if named.is_empty() {
        return UnitReport::NoUnits;
    }
    // sd_booted(3): systemd is the service manager when this directory exists.
    if !Path::new("/run/systemd/system").is_dir() {
        return UnitReport::CannotTell {
            why: "systemd is not this host's service manager".to_owned(),
        };
    }
    let mut exposed = Vec::new();
    for (class, unit) in &named {
        match unit_properties(unit) {
            Ok(props) if may_open_packet_sockets(&props) => exposed.push(ExposedUnit {
                class: class.clone(),
                unit: unit.clone(),
            }),
            Ok(_) => {}
            Err(why) => return UnitReport::CannotTell { why },
        }
    }
    UnitReport::Checked {
        units: named.len(),
        exposed,
    }
}

/// The systemd units a class's cgroup path holds. Inside a service or scope (the path
/// or one of its parents), that unit; otherwise every service and scope below it, as a
/// slice holds its services. Only what exists on this host now.
fn units_under(cgroup_root: &Path, path: &str) -> Vec<String> {
    let enclosing = path.split('/').rfind(|c| is_unit(c)).map(str::to_owned);
    if let Some(unit) = enclosing {
        return vec![unit];
    }
    let mut found = Vec::new();
    let mut pending: Vec<PathBuf> = vec![cgroup_root.join(path.trim_start_matches('/'))];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            if is_unit(&name) {
                found.push(name);
            } else {
                pending.push(entry.path());
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

/// Units that run processes in their own cgroup. A slice only groups them. Unit type
/// suffixes are case-sensitive in systemd.
fn is_unit(cgroup_name: &str) -> bool {
    matches!(
        Path::new(cgroup_name).extension().and_then(|e| e.to_str()),
        Some("service" | "scope")
    )
}

/// The unit's effective sandboxing, as systemd resolved it from the unit file, its
/// drop-ins and the defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UnitProperties {
    /// `RestrictAddressFamilies=` as `systemctl show` prints it: empty when unrestricted,
    /// a list of allowed families, or `~` and a list of denied ones.
    pub restrict_address_families: String,
    /// `CapabilityBoundingSet=` as `systemctl show` prints it: the capabilities kept.
    pub capability_bounding_set: String,
}

const PROPERTIES: &str = "RestrictAddressFamilies,CapabilityBoundingSet";

fn unit_properties(unit: &str) -> Result<UnitProperties, String> {
    let out = Command::new("systemctl")
        .args(["show", "--property", PROPERTIES, "--", unit])
        .output()
        .map_err(|e| format!("running systemctl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "systemctl show {unit}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(parse_show(&String::from_utf8_lossy(&out.stdout)))
}

/// `KEY=VALUE` lines from `systemctl show`.
pub fn parse_show(text: &str) -> UnitProperties {
    let mut props = UnitProperties::default();
    for line in text.lines() {
        match line.split_once('=') {
            Some(("RestrictAddressFamilies", v)) => props.restrict_address_families = v.into(),
            Some(("CapabilityBoundingSet", v)) => props.capability_bounding_set = v.into(),
            _ => {}
        }
    }
    props
}

/// The address families whose sockets can send around the qdisc layer.
pub const BYPASSING_FAMILIES: [&str; 2] = ["AF_PACKET", "AF_XDP"];

/// Whether a unit with these properties can open a socket of [`BYPASSING_FAMILIES`].
pub fn may_open_packet_sockets(props: &UnitProperties) -> bool {
    let families = props.restrict_address_families.trim();
    let allowed = |family: &str| match families.strip_prefix('~') {
        Some(denied) => !denied.split_whitespace().any(|f| f == family),
        None => families.is_empty() || families.split_whitespace().any(|f| f == family),
    };
    let packet_allowed = BYPASSING_FAMILIES.iter().any(|f| allowed(f));
    let net_raw_kept = props
        .capability_bounding_set
        .split_whitespace()
        .any(|c| c.eq_ignore_ascii_case("cap_net_raw"));
    packet_allowed && net_raw_kept
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What systemd 252 prints for a unit with no sandboxing: every capability kept.
    const DEFAULT_BOUNDING_SET: &str = "cap_chown cap_dac_override cap_dac_read_search \
        cap_fowner cap_fsetid cap_kill cap_setgid cap_setuid cap_setpcap \
        cap_linux_immutable cap_net_bind_service cap_net_broadcast cap_net_admin \
        cap_net_raw cap_ipc_lock cap_ipc_owner cap_sys_module cap_sys_rawio";

    fn unit(families: &str, caps: &str) -> UnitProperties {
        parse_show(&format!(
            "RestrictAddressFamilies={families}\nCapabilityBoundingSet={caps}\n"
        ))
    }

    #[test]
    fn an_unsandboxed_unit_may_open_packet_sockets() {
        assert!(may_open_packet_sockets(&unit("", DEFAULT_BOUNDING_SET)));
    }

    #[test]
    fn an_address_family_allow_list_without_af_packet_is_enough() {
        let props = unit("AF_UNIX AF_INET AF_INET6", DEFAULT_BOUNDING_SET);
        assert!(!may_open_packet_sockets(&props));
        let props = unit("AF_INET AF_PACKET", DEFAULT_BOUNDING_SET);
        assert!(may_open_packet_sockets(&props));
    }

    #[test]
    fn an_address_family_deny_list_must_name_af_packet_and_af_xdp() {
        assert!(!may_open_packet_sockets(&unit(
            "~AF_NETLINK AF_PACKET AF_XDP",
            DEFAULT_BOUNDING_SET
        )));
        for open in ["~AF_NETLINK", "~AF_PACKET", "~AF_XDP"] {
            assert!(
                may_open_packet_sockets(&unit(open, DEFAULT_BOUNDING_SET)),
                "{open}"
            );
        }
    }

    #[test]
    fn an_address_family_allow_list_with_af_xdp_is_exposed() {
        assert!(may_open_packet_sockets(&unit(
            "AF_INET AF_XDP",
            DEFAULT_BOUNDING_SET
        )));
    }

    #[test]
    fn a_bounding_set_without_cap_net_raw_is_enough() {
        assert!(!may_open_packet_sockets(&unit("", "cap_net_bind_service")));
        // An empty bounding set keeps no capability at all.
        assert!(!may_open_packet_sockets(&unit("", "")));
    }

    #[test]
    fn unit_names_come_from_the_enclosing_unit_or_the_units_below_a_slice() {
        let root = tempfile::tempdir().unwrap();
        for dir in [
            "user-data.slice/api.service/worker",
            "user-data.slice/batch.slice/etl.service",
            "user-data.slice/run-u7.scope",
        ] {
            std::fs::create_dir_all(root.path().join(dir)).unwrap();
        }
        assert_eq!(
            units_under(root.path(), "/user-data.slice"),
            ["api.service", "etl.service", "run-u7.scope"]
        );
        assert_eq!(
            units_under(root.path(), "/user-data.slice/api.service/worker"),
            ["api.service"]
        );
        assert!(units_under(root.path(), "/absent.slice").is_empty());
    }
}
