//! The control socket: how `datafence status`, `reload` and `explain` (without
//! `--policy`) talk to the running agent. One JSON request line, one JSON response line.
#![forbid(unsafe_code)]

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

use datafence_common::CounterValue;

use crate::{
    dirs,
    explain::{Explanation, Query},
    generations::GenerationNames,
    metrics::VerdictLabels,
};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// `management`: networks the new policy must exempt, beyond `--management-cidr`.
    /// Earlier CLIs sent their SSH client's address here; today's send none, since the
    /// agent finds the established SSH sessions itself at every reload. Still honoured,
    /// so an older CLI loses no protection.
    Reload {
        #[serde(default)]
        management: Vec<ipnetwork::IpNetwork>,
    },
    /// Remove all enforcement and stop.
    Detach,
    Explain {
        query: Query,
        addresses: Vec<IpAddr>,
        datapath: bool,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Box<StatusReport>),
    Reloaded { sha256: String, generation: u32 },
    Explained { explanations: Vec<Explanation> },
    Detached { detached: Vec<String> },
    Error { message: String },
}

/// `datafence status --json`: a stable shape for scripts.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatusReport {
    /// False when the agent is not running and this was read from the pinned state the
    /// kernel keeps enforcing.
    #[serde(default = "yes")]
    pub agent_running: bool,
    /// The bpffs directory of the enforcement described; none when nothing is pinned.
    #[serde(default)]
    pub pin_dir: Option<String>,
    /// What a reader should know about where this came from (e.g. names that could not
    /// be recovered).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    pub attachments: Vec<Attachment>,
    pub policy: PolicyIdentity,
    pub counters: Vec<CounterRow>,
    pub totals: Totals,
    pub events_lost: u64,
    pub events_suppressed: u64,
    /// The latest violation lines, newest last.
    #[serde(default)]
    pub recent_violations: Vec<serde_json::Value>,
    /// Kernel memory of each datapath map, in bytes.
    #[serde(default)]
    pub map_memory_bytes: std::collections::BTreeMap<String, u64>,
    /// What the kernel offers, as probed by the agent at start (or by `status` itself
    /// while no agent runs).
    #[serde(default)]
    pub kernel: crate::kernel::KernelFeatures,
    /// The socket ring: attached, off or degraded.
    #[serde(default)]
    pub socket_ring: SocketRingStatus,
}

fn yes() -> bool {
    true
}

/// The socket ring's state, as `status`, `/healthz` and the `socket_ring` metric say it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketRingStatus {
    /// `attached`; `off` when the agent was told to run without it
    /// (`--socket-ring off`); `degraded` when it could not attach it, and the packet ring
    /// enforces alone; `unknown` from a state file of an agent that did not say.
    pub state: String,
    /// The cgroup it is attached at, or was to be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
    /// Why it is degraded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl SocketRingStatus {
    pub const ATTACHED: &str = "attached";
    pub const OFF: &str = "off";
    pub const DEGRADED: &str = "degraded";
    pub const STATES: [&str; 3] = [Self::ATTACHED, Self::OFF, Self::DEGRADED];

    pub fn is_degraded(&self) -> bool {
        self.state == Self::DEGRADED
    }

    pub fn off() -> Self {
        Self {
            state: Self::OFF.to_owned(),
            cgroup: None,
            error: None,
        }
    }

    pub fn attached(cgroup: Option<&Path>) -> Self {
        Self {
            state: Self::ATTACHED.to_owned(),
            cgroup: cgroup.map(|c| c.display().to_string()),
            error: None,
        }
    }

    pub fn degraded(cgroup: &Path, error: String) -> Self {
        Self {
            state: Self::DEGRADED.to_owned(),
            cgroup: Some(cgroup.display().to_string()),
            error: Some(error),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Attachment {
    pub interface: String,
    pub hook: String,
    /// How the program is attached: "tcx" or "clsact" for TC egress, "xdp" for XDP;
    /// empty in a state file written before the kinds were told apart.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// Kernel ids of other programs that run ahead of datafence's on this hook (and so
    /// could decide for a packet before datafence judges it). Only a running agent
    /// looks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub programs_ahead: Vec<u32>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PolicyIdentity {
    pub path: String,
    pub version: u32,
    pub sha256: String,
    /// RFC 3339, UTC.
    pub loaded_at: String,
    pub generation: u32,
}

/// One counter: its labels (interface, hook, class, region, verdict, reason) at the top
/// level of the JSON object, then packets and bytes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CounterRow {
    #[serde(flatten)]
    pub labels: VerdictLabels,
    pub packets: u64,
    pub bytes: u64,
}

/// The counter table of `status`, sorted, and its totals by verdict.
pub fn counter_table(
    counters: impl IntoIterator<Item = (VerdictLabels, CounterValue)>,
) -> (Vec<CounterRow>, Totals) {
    let mut totals = Totals::default();
    // One row per labels: a counter carried over from a retired datapath
    // (`CounterKey::CARRIED`) has the labels of the one that goes on counting.
    let mut merged = std::collections::BTreeMap::<VerdictLabels, CounterValue>::new();
    for (labels, value) in counters {
        *merged.entry(labels).or_default() += value;
    }
    let mut rows: Vec<CounterRow> = merged
        .into_iter()
        .map(|(labels, value)| {
            match labels.verdict.as_str() {
                "allow" => totals.allow += value.packets,
                "deny" => totals.deny += value.packets,
                "audit" => totals.audit += value.packets,
                _ => {}
            }
            CounterRow {
                labels,
                packets: value.packets,
                bytes: value.bytes,
            }
        })
        .collect();
    rows.sort_by(|a, b| a.labels.cmp(&b.labels));
    (rows, totals)
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Totals {
    pub allow: u64,
    pub deny: u64,
    pub audit: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(
        "cannot reach the datafence agent at {path}: {source} (is `datafence run` running? see --runtime-dir)"
    )]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent: {0}")]
    Io(#[from] std::io::Error),
    #[error("the agent sent an unreadable answer: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("the agent says: {0}")]
    Agent(String),
}

/// Sends one request and waits for its answer.
pub fn call(socket: &Path, request: &Request) -> Result<Response, ControlError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    // Explain with --datapath loads programs; a reload can write a large policy.
    stream.set_read_timeout(Some(Duration::from_mins(2)))?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    Ok(serde_json::from_str(&answer)?)
}

/// What the running agent writes to `<runtime dir>/state.json` so that `datafence status`
/// can describe the pinned enforcement while no agent runs.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AgentState {
    pub pin_dir: Option<String>,
    pub policy: PolicyIdentity,
    pub classes: Vec<(u8, String)>,
    pub regions: Vec<(u16, String)>,
    pub attachments: Vec<Attachment>,
    /// The latest policy generations' names, so a successor agent names the events it
    /// finds in the pinned ring buffer after the policy that judged them.
    #[serde(default)]
    pub generations: Vec<GenerationNames>,
}

pub const STATE_FILE: &str = "state.json";

/// The state an agent left in `runtime_dir`.
pub fn read_state(runtime_dir: &Path) -> Result<AgentState, ControlError> {
    let bytes = std::fs::read(runtime_dir.join(STATE_FILE))?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// Whether two paths name the same place (compared canonically when both exist).
pub fn same_path(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| {
        std::fs::canonicalize(p)
            .or_else(|_| std::path::absolute(p))
            .unwrap_or_else(|_| p.to_owned())
    };
    canon(a) == canon(b)
}

/// The runtime directory of the agent that owns the enforcement pinned in `pin_dir`,
/// from the symlink [`dirs::PINS_OWNER`] it keeps there. bpffs holds no regular files,
/// but it holds symlinks, and a symlink outlives the agent like the pins do.
pub fn pins_owner(pin_dir: &Path) -> Option<PathBuf> {
    std::fs::read_link(pin_dir.join(dirs::PINS_OWNER)).ok()
}

/// Records `runtime_dir` as the owner of the pins in `pin_dir`.
pub fn claim_pins(pin_dir: &Path, runtime_dir: &Path) -> std::io::Result<()> {
    let link = pin_dir.join(dirs::PINS_OWNER);
    let target = std::fs::canonicalize(runtime_dir)?;
    match std::fs::remove_file(&link) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::os::unix::fs::symlink(target, link)
}

/// The agent a command addresses, from its `--runtime-dir` and `--pin-dir`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Address {
    /// Where the agent's control socket and state are; `None` when no agent is
    /// addressed (a pin directory that names no owner).
    pub runtime_dir: Option<PathBuf>,
    /// The pins the command is about; `None`: those of the addressed agent, else the
    /// default.
    pub pin_dir: Option<PathBuf>,
}

impl Address {
    /// An explicit runtime directory wins. A pin directory alone addresses the agent it
    /// names as its owner, and no agent when it names none: never the default agent,
    /// which may be enforcing entirely different pins. With neither, the defaults.
    pub fn resolve(runtime_dir: Option<&Path>, pin_dir: Option<&Path>) -> Self {
        let runtime_dir = match (runtime_dir, pin_dir) {
            (Some(r), _) => Some(r.to_owned()),
            (None, Some(p)) => pins_owner(p),
            (None, None) => Some(PathBuf::from(dirs::RUNTIME_DIR)),
        };
        Self {
            runtime_dir,
            pin_dir: pin_dir.map(Path::to_owned),
        }
    }

    pub fn socket(&self) -> Option<PathBuf> {
        self.runtime_dir
            .as_ref()
            .map(|r| r.join(dirs::CONTROL_SOCKET))
    }

    /// The running agent addressed, with its socket and status: one that answers on the
    /// socket and, when a pin directory was given, enforces from that directory. `None`
    /// when nothing answers there (no socket, or one a killed agent left).
    pub fn live_agent(&self) -> Result<Option<(PathBuf, StatusReport)>, ControlError> {
        let Some(socket) = self.socket() else {
            return Ok(None);
        };
        let status = match call(&socket, &Request::Status) {
            Ok(Response::Status(status)) => status,
            Ok(Response::Error { message }) => return Err(ControlError::Agent(message)),
            Ok(other) => return Err(ControlError::Agent(format!("unexpected answer {other:?}"))),
            Err(ControlError::Connect { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let pins_match = match (&self.pin_dir, &status.pin_dir) {
            (None, _) => true,
            (Some(want), Some(has)) => same_path(want, Path::new(has)),
            (Some(_), None) => false,
        };
        Ok(pins_match.then_some((socket, *status)))
    }

    /// The pin directory the command is about: the one given, else the addressed
    /// agent's (from its state), else the default.
    pub fn pins(&self) -> PathBuf {
        if let Some(p) = &self.pin_dir {
            return p.clone();
        }
        self.runtime_dir
            .as_deref()
            .and_then(|r| read_state(r).ok())
            .and_then(|s| s.pin_dir)
            .map_or_else(|| PathBuf::from(dirs::PIN_DIR), PathBuf::from)
    }
}

/// The running agent that owns the pins in `pin_dir`, if any: the owner the pins name,
/// answering on its socket and reporting this pin directory.
pub fn live_owner(pin_dir: &Path) -> Option<PathBuf> {
    let owner = Address {
        runtime_dir: Some(pins_owner(pin_dir)?),
        pin_dir: Some(pin_dir.to_owned()),
    };
    owner.live_agent().ok().flatten().map(|(socket, _)| socket)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_of_the_same_labels_make_one_row() {
        let labels = |verdict: &str| VerdictLabels {
            interface: "eth0".into(),
            hook: "tc".into(),
            class: "user-data".into(),
            region: "us-east".into(),
            verdict: verdict.into(),
            reason: "region_denied".into(),
        };
        let value = |packets| CounterValue {
            packets,
            bytes: packets * 100,
        };
        // What the programs count, and what was carried over under the same labels.
        let (rows, totals) = counter_table([
            (labels("deny"), value(3)),
            (labels("allow"), value(1)),
            (labels("deny"), value(40)),
        ]);
        assert_eq!(rows.len(), 2, "{rows:?}");
        let deny = rows
            .iter()
            .find(|r| r.labels.verdict == "deny")
            .expect("deny");
        assert_eq!((deny.packets, deny.bytes), (43, 4300));
        assert_eq!((totals.deny, totals.allow), (43, 1));
    }

    #[test]
    fn a_pin_dir_without_an_owner_addresses_no_agent() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = Address::resolve(None, Some(dir.path()));
        assert_eq!(a.runtime_dir, None, "never the default agent");
        assert_eq!(a.socket(), None);
        assert!(a.live_agent().expect("no agent is no error").is_none());
    }

    #[test]
    fn a_pin_dir_addresses_its_owner_and_a_runtime_dir_wins() {
        let pins = tempfile::tempdir().expect("tempdir");
        let run = tempfile::tempdir().expect("tempdir");
        claim_pins(pins.path(), run.path()).expect("claim");
        // Claiming again replaces the link.
        claim_pins(pins.path(), run.path()).expect("claim again");
        let a = Address::resolve(None, Some(pins.path()));
        assert!(same_path(
            a.runtime_dir.as_deref().expect("owner"),
            run.path()
        ));
        let other = Path::new("/run/other");
        let b = Address::resolve(Some(other), Some(pins.path()));
        assert_eq!(b.runtime_dir.as_deref(), Some(other));
        let c = Address::resolve(None, None);
        assert_eq!(c.runtime_dir, Some(PathBuf::from(dirs::RUNTIME_DIR)));
    }
}
