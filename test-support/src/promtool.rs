//! promtool from Debian's `prometheus` package (`cargo xtask setup` installs it), checking
//! exposition bodies in both formats. A missing promtool fails the test.

use std::{
    io::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
};

/// A program from the `prometheus` package, which must be on PATH.
pub fn program(name: &str) -> PathBuf {
    std::env::var_os("PATH")
        .and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "{name} is not on PATH: install Debian's `prometheus` package (`cargo xtask setup` does)"
            )
        })
}

/// `promtool check metrics`: the text format's parser and linter. Err with its output.
pub fn text_format_problems(body: &str) -> Result<(), String> {
    let mut child = Command::new(program("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(body.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && said.trim().is_empty() {
        Ok(())
    } else {
        Err(format!("promtool check metrics: {}\n{said}", out.status))
    }
}

/// Prometheus's OpenMetrics parser, through the one promtool command that reads
/// OpenMetrics (`tsdb create-blocks-from openmetrics`, which wants a timestamp on every
/// sample, so each gets one). Strict: `# EOF`, types and suffixes. Err with its output.
pub fn openmetrics_problems(body: &str) -> Result<(), String> {
    let dir = crate::Scratch::new("openmetrics");
    let stamped: String = body
        .lines()
        .map(|l| {
            if l.starts_with('#') || l.is_empty() {
                format!("{l}\n")
            } else {
                format!("{l} 1700000000\n")
            }
        })
        .collect();
    let input = dir.write("body.om", &stamped);
    let out = Command::new(program("promtool"))
        .args(["tsdb", "create-blocks-from", "openmetrics"])
        .arg(&input)
        .arg(dir.dir.join("blocks"))
        .output()
        .expect("run promtool");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "promtool tsdb create-blocks-from openmetrics: {}\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

pub fn check_text_format(body: &str) {
    if let Err(e) = text_format_problems(body) {
        panic!("{e}\nbody:\n{body}");
    }
}

pub fn check_openmetrics(body: &str) {
    if let Err(e) = openmetrics_problems(body) {
        panic!("{e}\nbody:\n{body}");
    }
}
