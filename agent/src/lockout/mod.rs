//! Never lock the host out: the addresses it is managed from must stay reachable, and
//! so must the SSH sessions established right now.
//!
//! Two checks, both run at start and at every reload (`datafence reload`, SIGHUP, the
//! file watcher):
//! - [`uncovered`]: the management networks (`--management-cidr`) a policy does not
//!   exempt;
//! - [`first_cut_session`]: the inbound SSH sessions ([`sessions::established`]) whose
//!   replies the policy would deny, judged by the same decision `datafence explain`
//!   gives. Their incoming packets go to the host's own address, which a gateway
//!   interface's XDP program lets through (`local_destination`).
#![forbid(unsafe_code)]

pub mod proc_net;
pub mod processes;
pub mod sessions;
pub mod sock_diag;

use std::{fmt, net::IpAddr, path::Path};

use datafence_common::{
    FAMILY_V4, FAMILY_V6, Verdict,
    parse::{IPPROTO_TCP, is_builtin_exempt},
};
use ipnetwork::IpNetwork;

pub use self::{
    processes::Procfs,
    sessions::{DEFAULT_SSH_PORT, SshSession},
};
use crate::{
    explain::{Explanation, Query, explain},
    policy::{CompiledPolicy, LoadedPolicy},
};

fn builtin_exempt(addr: IpAddr) -> bool {
    let mut bytes = [0u8; 16];
    let family = match addr {
        IpAddr::V4(a) => {
            bytes[..4].copy_from_slice(&a.octets());
            FAMILY_V4
        }
        IpAddr::V6(a) => {
            bytes = a.octets();
            FAMILY_V6
        }
    };
    is_builtin_exempt(family, &bytes)
}

/// The management networks that `exempt` does not cover in full.
pub fn uncovered(exempt: &[IpNetwork], management: &[IpNetwork]) -> Vec<IpNetwork> {
    management
        .iter()
        .filter(|m| {
            let covered = exempt
                .iter()
                .any(|e| e.prefix() <= m.prefix() && e.contains(m.network()));
            let host = m.prefix() == if m.is_ipv4() { 32 } else { 128 };
            let always_reachable = host && builtin_exempt(m.ip());
            !covered && !always_reachable
        })
        .copied()
        .collect()
}

/// What a refused policy would have cut off.
#[derive(Debug)]
pub enum AtRisk {
    /// A `--management-cidr` network the policy does not exempt.
    ManagementNetwork(IpNetwork),
    /// An SSH session established when the policy was checked.
    SshSession(Box<CutSession>),
}

/// An SSH session a policy would cut, and the policy's answer.
#[derive(Debug)]
pub struct CutSession {
    pub session: SshSession,
    pub explanation: Explanation,
}

/// "from 198.51.100.7:51234 to 192.0.2.10:22 (sshd pid 812, class user-data, region
/// none: unknown_denied)".
impl fmt::Display for CutSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.explanation;
        write!(f, "{} (", self.session)?;
        match &self.session.owner {
            Some(o) => write!(f, "{} pid {}", o.comm, o.pid)?,
            None => write!(f, "holder unknown")?,
        }
        write!(
            f,
            ", class {}, region {}: {})",
            e.class.as_deref().unwrap_or("none"),
            e.region.as_deref().unwrap_or("none"),
            e.reason
        )
    }
}

/// The DSCP values a session's packets may carry: none; OpenSSH's default `IPQoS` (af21
/// for interactive sessions, cs1 for bulk transfers), ef for interactive sessions from
/// OpenSSH 10.1 on; and before 7.8, the TOS bits lowdelay and throughput, DSCP 4 and 2.
const SSH_DSCP: [u8; 6] = [0, 18, 8, 46, 4, 2];

/// What the policy does to a session's replies: TCP from this host's end to the
/// client's, sent from the cgroup sshd's sockets are charged to, with each DSCP sshd may
/// set. Where that cgroup could not be seen (the agent may not read sshd's `/proc`
/// entries), the replies are judged as from no class's cgroup and from each cgroup a
/// class names, so a class that could be sshd's is never missed. The first judgement
/// that denies, else the last; `None` if none could be made, which is logged.
pub fn judge_replies(
    policy: &LoadedPolicy,
    compiled: &CompiledPolicy,
    cgroup_root: &Path,
    session: &SshSession,
) -> Option<Explanation> {
    let cgroups: Vec<Option<String>> = match &session.cgroup {
        Some(cgroup) => vec![Some(cgroup.clone())],
        None => std::iter::once(None)
            .chain(policy.classes.iter().flat_map(|c| {
                c.selectors
                    .cgroups
                    .iter()
                    .map(|(path, _)| Some(path.clone()))
            }))
            .collect(),
    };
    let queries = cgroups.into_iter().flat_map(|cgroup| {
        SSH_DSCP.map(|dscp| Query {
            protocol: IPPROTO_TCP,
            dst_port: session.remote.port(),
            src: Some(session.local.ip()),
            cgroup: cgroup.clone(),
            mark: 0,
            dscp,
            class: None,
        })
    });
    first_denial(policy, compiled, cgroup_root, queries, session)
}

/// Each query's judgement of `session`'s replies: the first that denies, else the last;
/// `None` if none could be made, which is logged.
fn first_denial(
    policy: &LoadedPolicy,
    compiled: &CompiledPolicy,
    cgroup_root: &Path,
    queries: impl IntoIterator<Item = Query>,
    session: &SshSession,
) -> Option<Explanation> {
    let mut last = None;
    for query in queries {
        match explain(policy, compiled, cgroup_root, &query, session.remote.ip()) {
            Ok(e) if e.verdict == Verdict::Deny.as_str() => return Some(e),
            Ok(e) => last = Some(e),
            Err(e) => {
                tracing::warn!(%session, error = %e, "cannot judge the replies of an SSH session");
            }
        }
    }
    last
}

/// The first of `sessions` whose replies `policy` denies. An audit verdict lets them
/// through, so it does not count. A session's incoming packets need no check: a gateway
/// interface's XDP program lets packets to the host's own addresses through
/// (`local_destination`).
pub fn first_cut_session(
    policy: &LoadedPolicy,
    compiled: &CompiledPolicy,
    cgroup_root: &Path,
    sessions: Vec<SshSession>,
) -> Option<CutSession> {
    sessions.into_iter().find_map(|session| {
        let explanation = judge_replies(policy, compiled, cgroup_root, &session)
            .filter(|e| e.verdict == Verdict::Deny.as_str())?;
        Some(CutSession {
            session,
            explanation,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNetwork> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    const POLICY: &str = r"
version: 1
mode: {mode}
exempt: [{exempt}]
regions:
  eu-west:
    cidrs: [198.51.100.0/24]
data_classes:
  user-data:
    match: {protocols: [tcp], src_cidrs: [192.0.2.10/32, 2001:db8::10/128]}
    allow: [eu-west]
    unknown: deny
";

    fn policy(mode: &str, exempt: &str) -> (LoadedPolicy, CompiledPolicy) {
        let text = POLICY.replace("{mode}", mode).replace("{exempt}", exempt);
        let policy = crate::policy::parse_policy_str(
            &text,
            Path::new("/etc/datafence/policy.yaml"),
            &crate::policy::LoadOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let compiled = policy.compile();
        (policy, compiled)
    }

    fn session(local: &str, remote: &str) -> SshSession {
        SshSession {
            local: local.parse().unwrap(),
            remote: remote.parse().unwrap(),
            owner: Some(processes::Owner {
                pid: 812,
                comm: "sshd".to_owned(),
                cgroup: None,
            }),
            cgroup: None,
        }
    }

    fn cut(policy: &(LoadedPolicy, CompiledPolicy), sessions: Vec<SshSession>) -> Option<String> {
        first_cut_session(&policy.0, &policy.1, Path::new("/nonexistent"), sessions)
            .map(|c| c.to_string())
    }

    #[test]
    fn a_session_whose_replies_are_denied_is_named_with_both_ends() {
        let enforce = policy("enforce", "");
        let sessions = vec![
            // Replies to eu-west are allowed.
            session("192.0.2.10:22", "198.51.100.7:51233"),
            session("192.0.2.10:22", "203.0.113.7:51234"),
        ];
        assert_eq!(
            cut(&enforce, sessions).as_deref(),
            Some(
                "from 203.0.113.7:51234 to 192.0.2.10:22 (sshd pid 812, class user-data, region none: unknown_denied)"
            )
        );
        assert_eq!(
            cut(
                &enforce,
                vec![session("[2001:db8::10]:22", "[2001:db8:9::7]:40000")]
            )
            .as_deref(),
            Some(
                "from [2001:db8:9::7]:40000 to [2001:db8::10]:22 (sshd pid 812, class user-data, region none: unknown_denied)"
            )
        );
    }

    #[test]
    fn exempt_clients_other_sources_and_audit_mode_cut_nothing() {
        let sessions = || vec![session("192.0.2.10:22", "203.0.113.7:51234")];
        assert_eq!(cut(&policy("enforce", "203.0.113.0/24"), sessions()), None);
        assert_eq!(cut(&policy("audit", ""), sessions()), None);
        // Replies from an address no class selects are not user data.
        let other = vec![session("192.0.2.11:22", "203.0.113.7:51234")];
        assert_eq!(cut(&policy("enforce", ""), other), None);
    }

    /// A class by cgroup, or by sshd's DSCP, cuts a session whose cgroup the agent
    /// could not see: judged as every cgroup a class names and every DSCP sshd sets.
    #[test]
    fn a_session_of_unknown_cgroup_is_judged_as_any_class_that_could_be_sshds() {
        let root = crate::cgroups::cgroup2_root();
        // A cgroup of its own for the class to name: a policy may not name the root.
        let name = format!("datafence-test-lockout-{}", std::process::id());
        std::fs::create_dir(root.join(&name)).expect("make a test cgroup (as root)");
        let cgroups = format!("{{cgroups: [/{name}]}}");
        for selector in [cgroups.as_str(), "{dscp: [18]}"] {
            let text = format!(
                "version: 1\nregions: {{}}\ndata_classes:\n  everything:\n    match: {selector}\n    unknown: deny\n"
            );
            let policy = crate::policy::parse_policy_str(
                &text,
                Path::new("/etc/datafence/policy.yaml"),
                &crate::policy::LoadOptions {
                    cgroup_root: root.clone(),
                    ..Default::default()
                },
            )
            .unwrap_or_else(|e| panic!("{e}"));
            let compiled = policy.compile();
            let mut unseen = session("192.0.2.10:22", "203.0.113.7:51234");
            unseen.owner = None;
            let got = first_cut_session(&policy, &compiled, &root, vec![unseen]);
            assert_eq!(
                got.map(|c| c.to_string()).as_deref(),
                Some(
                    "from 203.0.113.7:51234 to 192.0.2.10:22 (holder unknown, class everything, region none: unknown_denied)"
                ),
                "{selector}"
            );
        }
        let _ = std::fs::remove_dir(root.join(&name));
    }

    #[test]
    fn management_inside_an_exemption_is_covered() {
        let exempt = nets(&["10.0.0.0/8", "2001:db8:ffff::/48"]);
        assert!(
            uncovered(
                &exempt,
                &nets(&["10.1.2.3/32", "10.2.0.0/16", "2001:db8:ffff::5/128"])
            )
            .is_empty()
        );
    }

    #[test]
    fn management_outside_or_wider_than_the_exemptions_is_reported() {
        let exempt = nets(&["10.0.0.0/16"]);
        assert_eq!(
            uncovered(&exempt, &nets(&["192.0.2.7/32", "10.0.0.0/8"])),
            nets(&["192.0.2.7/32", "10.0.0.0/8"])
        );
    }

    #[test]
    fn loopback_and_link_local_management_is_always_covered() {
        assert!(uncovered(&[], &nets(&["127.0.0.1/32", "fe80::1/128"])).is_empty());
    }
}
