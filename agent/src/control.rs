//! The control socket: how `datafence status`, `reload` and `explain` (without
//! `--policy`) talk to the running agent. One JSON request line, one JSON response line.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::IpAddr,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use serde::{Deserialize, Serialize};

use datafence_common::CounterValue;

use crate::{
    explain::{Explanation, Query},
    metrics::VerdictLabels,
};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// `management`: addresses the caller manages the host from (its SSH client), which
    /// the new policy must exempt.
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
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Attachment {
    pub interface: String,
    pub hook: String,
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
    let mut rows: Vec<CounterRow> = counters
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
}

/// Sends one request and waits for its answer.
pub fn call(socket: &Path, request: &Request) -> Result<Response, ControlError> {
    let mut stream = UnixStream::connect(socket).map_err(|source| ControlError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    // Explain with --datapath loads programs; a reload can write a large policy.
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
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
}

pub const STATE_FILE: &str = "state.json";
