//! Clients: every sender against every server, and whether each got through.

use super::*;

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Sender {
    UserData,
    Other,
}

impl Sender {
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::UserData => "user-data",
            Self::Other => "other",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Proto {
    Http,
    Udp,
}

impl Proto {
    pub(super) fn label(self) -> &'static str {
        match self {
            Self::Http => "HTTP/80",
            Self::Udp => "UDP/7007",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Enforce,
    Audit,
}

#[derive(Clone, Copy)]
pub(super) struct Probe {
    pub(super) sender: Sender,
    pub(super) proto: Proto,
    pub(super) region: &'static Region,
    pub(super) addr: IpAddr,
}

impl Probe {
    pub(super) fn expected_to_pass(&self, mode: Mode) -> bool {
        mode == Mode::Audit || self.sender == Sender::Other || self.region.name != FORBIDDEN_REGION
    }
}

pub(super) struct ProbeResult {
    pub(super) probe: Probe,
    pub(super) passed: bool,
    /// Why it failed, for the report when that was not expected.
    pub(super) detail: String,
}

pub(super) const UDP_CLIENT: &str = "\
import socket, sys
host, port, region = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET6 if ':' in host else socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(2)
try:
    s.sendto(b'ping', (host, port))
    reply = s.recv(256)
except OSError as e:
    sys.exit('no echo: %s' % (e,))
sys.exit(0 if region.encode() in reply else 'unexpected echo %r' % (reply,))
";

/// Every sender against every server, IPv4 then IPv6 for each, all at once so blocked
/// probes cost one timeout in total rather than one each.
pub(super) fn run_probes(cgroup: &Path, senders: &[Sender]) -> Vec<ProbeResult> {
    let mut probes = Vec::new();
    for &sender in senders {
        for proto in [Proto::Http, Proto::Udp] {
            for region in &REGIONS {
                for addr in [IpAddr::V4(region.server_v4), IpAddr::V6(region.server_v6)] {
                    probes.push(Probe {
                        sender,
                        proto,
                        region,
                        addr,
                    });
                }
            }
        }
    }
    thread::scope(|scope| {
        let handles: Vec<_> = probes
            .iter()
            .map(|&probe| scope.spawn(move || run_probe(cgroup, probe)))
            .collect();
        handles
            .into_iter()
            .zip(&probes)
            .map(|(handle, &probe)| {
                let (passed, detail) = match handle.join() {
                    Ok(Ok(output)) => judge(probe, &output),
                    Ok(Err(err)) => (false, format!("{err:#}")),
                    Err(_) => (false, "the probe thread panicked".to_owned()),
                };
                ProbeResult {
                    probe,
                    passed,
                    detail,
                }
            })
            .collect()
    })
}

pub(super) fn run_probe(cgroup: &Path, probe: Probe) -> Result<Output> {
    let program = match probe.proto {
        Proto::Http => "curl",
        Proto::Udp => "python3",
    };
    let mut cmd = match probe.sender {
        Sender::UserData => in_netns_and_cgroup(HOST_NS, cgroup, program)?,
        Sender::Other => in_netns(HOST_NS, program)?,
    };
    match probe.proto {
        Proto::Http => {
            let url = match probe.addr {
                IpAddr::V4(a) => format!("http://{a}:{HTTP_PORT}/"),
                IpAddr::V6(a) => format!("http://[{a}]:{HTTP_PORT}/"),
            };
            cmd.args(["--silent", "--show-error", "--globoff", "--max-time"])
                .arg(CLIENT_TIMEOUT_SECS)
                .arg(url);
        }
        Proto::Udp => {
            cmd.args(["-c", UDP_CLIENT])
                .arg(probe.addr.to_string())
                .arg(UDP_PORT.to_string())
                .arg(probe.region.name);
        }
    }
    cmd.stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))
}

/// Whether the client got the right server's answer, and if not, what it said.
pub(super) fn judge(probe: Probe, out: &Output) -> (bool, String) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    if out.status.success() && (probe.proto == Proto::Udp || stdout.contains(probe.region.name)) {
        return (true, String::new());
    }
    let said = combined(out);
    let said = said.lines().last().unwrap_or("").trim();
    (false, format!("{}: {said}", out.status))
}
