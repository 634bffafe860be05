//! The real Prometheus tools from Debian's `prometheus` package (`cargo xtask setup`
//! installs it): promtool to check exposition bodies, and the server to scrape the
//! agent and evaluate the rules and dashboard queries. Missing tools fail the test.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    http,
    netns::{NetNs, run_in},
};

pub use datafence_test_support::promtool::{
    check_openmetrics, check_text_format, openmetrics_problems, program, text_format_problems,
};

/// Where the test's Prometheus listens, on loopback inside the test's namespace.
pub const LISTEN: &str = "127.0.0.1:9090";

/// A Prometheus server in a namespace, scraping one target every second and evaluating
/// rule files every second; killed on drop.
pub struct Prometheus {
    child: Child,
    netns: String,
    pub log: PathBuf,
}

impl Prometheus {
    pub fn start(ns: &NetNs, dir: &Path, job: &str, target: &str, rule_files: &[PathBuf]) -> Self {
        std::fs::create_dir_all(dir).expect("prometheus dir");
        let rules: Vec<String> = rule_files
            .iter()
            .map(|p| format!("  - {:?}\n", p.display().to_string()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n{}\
             scrape_configs:\n  - job_name: {job}\n    static_configs:\n      - targets: [\"{target}\"]\n",
            rules.concat()
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, &config).expect("write prometheus.yml");
        let log = dir.join("prometheus.log");
        let child = ns
            .command(program("prometheus"))
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={LISTEN}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawn prometheus");
        let mut prometheus = Self {
            child,
            netns: ns.name.clone(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = prometheus.child.try_wait().expect("wait") {
                panic!(
                    "prometheus exited with {status}:\n{}",
                    prometheus.log_text()
                );
            }
            let ready = run_in(&prometheus.netns, || {
                std::net::TcpStream::connect(LISTEN).is_ok()
            }) && prometheus.get("/-/ready").status == 200;
            if ready {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready:\n{}",
                prometheus.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> http::Answer {
        let addr: SocketAddr = LISTEN.parse().expect("addr");
        http::get(&self.netns, addr, path, &[])
    }

    /// An API call: the `data` of a successful answer, or Err with the error.
    pub fn api(&self, path: &str) -> Result<Value, String> {
        let answer = self.get(path);
        let v: Value = serde_json::from_str(&answer.body)
            .map_err(|e| format!("{path}: HTTP {} {e}: {}", answer.status, answer.body))?;
        if v["status"] == "success" {
            Ok(v["data"].clone())
        } else {
            Err(format!(
                "{path}: {}: {}",
                v["errorType"].as_str().unwrap_or("?"),
                v["error"].as_str().unwrap_or("?")
            ))
        }
    }

    /// An instant query: the result vector, or Err with Prometheus's error.
    pub fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.api(&format!("/api/v1/query?query={}", http::encode(expr)))?;
        match data["result"].as_array() {
            Some(v) => Ok(v.clone()),
            // Scalars and strings: one value.
            None => Ok(vec![data["result"].clone()]),
        }
    }

    /// The single value an instant query returns, if it returns exactly one sample.
    pub fn value(&self, expr: &str) -> Option<f64> {
        let result = self.query(expr).ok()?;
        match result.as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// Waits until `expr` has exactly the value `want`, and returns the last value seen.
    pub fn wait_for_value(&self, expr: &str, want: f64, within: Duration) -> Option<f64> {
        let deadline = Instant::now() + within;
        loop {
            let v = self.value(expr);
            if v == Some(want) || Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // Never panic here: this may run while a failed test is already unwinding.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
