//! What the demo prints: violation reports, and colour on a terminal.

use super::*;

/// The fields of a violation line the demo shows. Read leniently: a field the agent
/// stops writing shows as `?` rather than hiding the line.
pub(super) struct Violation {
    pub(super) verdict: String,
    pub(super) class: String,
    pub(super) region: String,
    pub(super) reason: String,
    pub(super) interface: String,
    pub(super) protocol: String,
    pub(super) src: String,
    pub(super) src_port: u64,
    pub(super) dst: String,
    pub(super) dst_port: u64,
    pub(super) cgroup: String,
    /// Packets the line stands for; the agent folds repeats of a flow into one line.
    pub(super) packets: u64,
}

impl Violation {
    pub(super) fn parse(line: &str) -> Option<Self> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let text = |key: &str| v[key].as_str().unwrap_or("?").to_owned();
        let number = |key: &str| v[key].as_u64().unwrap_or(0);
        let protocol = match &v["protocol"] {
            serde_json::Value::String(name) => name.clone(),
            serde_json::Value::Number(n) => match n.as_u64() {
                Some(6) => "tcp".to_owned(),
                Some(17) => "udp".to_owned(),
                _ => format!("protocol {n}"),
            },
            _ => "?".to_owned(),
        };
        Some(Self {
            verdict: text("verdict"),
            class: text("class"),
            region: text("region"),
            reason: text("reason"),
            interface: text("interface"),
            protocol,
            src: text("src"),
            src_port: number("src_port"),
            dst: text("dst"),
            dst_port: number("dst_port"),
            cgroup: text("cgroup"),
            packets: v["count"].as_u64().unwrap_or(1),
        })
    }

    pub(super) fn endpoint(addr: &str, port: u64) -> String {
        if addr.contains(':') {
            format!("[{addr}]:{port}")
        } else {
            format!("{addr}:{port}")
        }
    }

    /// Everything shown but the packet count, which is what lines of one flow share.
    pub(super) fn summary(&self) -> String {
        format!(
            "{:<5} {} {} -> {}  {} to {}: {} (cgroup {}, on {})",
            self.verdict,
            self.protocol,
            Self::endpoint(&self.src, self.src_port),
            Self::endpoint(&self.dst, self.dst_port),
            self.class,
            self.region,
            self.reason,
            self.cgroup,
            self.interface
        )
    }
}

/// Shows the first line as the agent wrote it, then one line per flow.
pub(super) fn parse_all(lines: &[String]) -> Vec<Violation> {
    lines.iter().filter_map(|l| Violation::parse(l)).collect()
}

pub(super) fn print_violations(lines: &[String], style: Style) {
    const SHOWN: usize = 8;
    let violations = parse_all(lines);
    let Some(first) = lines.first() else {
        println!("    (none)");
        return;
    };
    println!("    the first, as written: {first}");
    println!("    all {}, one line per flow:", lines.len());
    let mut flows: Vec<(String, u64)> = Vec::new();
    for v in &violations {
        let summary = v.summary();
        match flows.iter_mut().find(|(s, _)| *s == summary) {
            Some((_, packets)) => *packets += v.packets,
            None => flows.push((summary, v.packets)),
        }
    }
    for (summary, packets) in flows.iter().take(SHOWN) {
        let painted = if summary.starts_with("deny") {
            style.red(summary)
        } else {
            style.yellow(summary)
        };
        // The agent reports a flow's first packet at once and folds its repeats into a
        // later line, so most flows show as one packet here.
        if *packets > 1 {
            println!("      {painted} [{packets} packets]");
        } else {
            println!("      {painted}");
        }
    }
    if flows.len() > SHOWN {
        println!("      ... and {} more flows", flows.len() - SHOWN);
    }
}

pub(super) fn combined(out: &Output) -> String {
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    text
}

pub(super) fn print_indented(text: &str, indent: usize) {
    for line in text.lines() {
        println!("{:indent$}{line}", "");
    }
}

/// Colour only on a terminal, so a piped or logged run stays plain text.
#[derive(Clone, Copy)]
pub(super) struct Style {
    pub(super) color: bool,
}

impl Style {
    pub(super) fn detect() -> Self {
        Self {
            color: io::stdout().is_terminal() && env::var_os("NO_COLOR").is_none(),
        }
    }

    pub(super) fn paint(self, code: &str, text: &str) -> String {
        if self.color {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_owned()
        }
    }

    pub(super) fn bold(self, text: &str) -> String {
        self.paint("1", text)
    }

    pub(super) fn red(self, text: &str) -> String {
        self.paint("31", text)
    }

    pub(super) fn yellow(self, text: &str) -> String {
        self.paint("33", text)
    }

    pub(super) fn outcome(self, passed: bool) -> String {
        if passed {
            self.paint("32", "✔ allowed")
        } else {
            self.paint("31", "✘ blocked")
        }
    }

    pub(super) fn heading(self, step: u32, text: &str) {
        println!();
        println!("{}", self.bold(&format!("[{step}/8] {text}")));
    }
}
