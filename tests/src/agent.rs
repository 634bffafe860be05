//! The real `datafence` binary, run inside a sandbox namespace.

use std::{
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{Scratch, agent_binary, netns::NetNs, patience};

/// A running `datafence run`, stopped (SIGTERM, then SIGKILL) on drop.
pub struct RunningAgent {
    pub child: Child,
    pub runtime_dir: PathBuf,
    pub netns: String,
    pub stdout_path: PathBuf,
    pub stderr_path: PathBuf,
    /// bpffs directory of this agent's pinned state, removed on drop unless
    /// `keep_pins` (a successor agent adopted it, or the test inspects what stays).
    pub pin_dir: PathBuf,
    pub keep_pins: bool,
    scratch: Option<Scratch>,
}

/// Where an agent keeps its state, and what it finds in its environment.
pub struct Launch {
    pub pin_dir: PathBuf,
    /// Default: a fresh directory in the agent's scratch space.
    pub runtime_dir: Option<PathBuf>,
    pub env: Vec<(String, String)>,
}

impl Launch {
    pub fn pins(pin_dir: PathBuf) -> Self {
        Self {
            pin_dir,
            runtime_dir: None,
            env: Vec::new(),
        }
    }
}

/// A cgroup of its own for the socket ring of an agent of `pin_dir`, named after the
/// pin directory so that an agent restarted on the same pins adopts its predecessor's
/// ring. At the root, every agent a test starts would judge the calls of every other
/// test's processes by its own policy.
pub fn test_socket_cgroup(pin_dir: &Path) -> PathBuf {
    let name = pin_dir.file_name().expect("a pin directory has a name");
    let dir = datafence::cgroups::cgroup2_root().join(name);
    std::fs::create_dir_all(&dir).expect("create the socket ring's test cgroup");
    dir
}

/// A bpffs directory private to one test.
pub fn test_pin_dir(label: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    PathBuf::from(format!(
        "/sys/fs/bpf/datafence-test-{label}-{}-{n}",
        std::process::id()
    ))
}

impl RunningAgent {
    /// Starts the agent in `ns` with `policy` and `extra` arguments, and waits until its
    /// control socket answers.
    pub fn start(ns: &NetNs, policy: &Path, extra: &[&str]) -> Self {
        Self::start_with_pins(ns, policy, extra, test_pin_dir("agent"))
    }

    /// As [`Self::start`], with a given pin directory: a restarted agent passes the one
    /// its predecessor used, to adopt its state.
    pub fn start_with_pins(ns: &NetNs, policy: &Path, extra: &[&str], pin_dir: PathBuf) -> Self {
        Self::launch(ns, policy, extra, Launch::pins(pin_dir))
    }

    /// As [`Self::start`], with the pin and runtime directories and the environment
    /// given.
    pub fn launch(ns: &NetNs, policy: &Path, extra: &[&str], how: Launch) -> Self {
        let scratch = Scratch::new("agent");
        let runtime_dir = how.runtime_dir.unwrap_or_else(|| scratch.dir.join("run"));
        let pin_dir = how.pin_dir;
        let stdout_path = scratch.dir.join("stdout.log");
        let stderr_path = scratch.dir.join("stderr.log");
        let bin = agent_binary();
        // Off unless a test asks for it: the socket ring costs every agent start four more
        // programs to verify, seconds under emulation, and the tests about it ask.
        let ring_chosen = extra.iter().any(|a| a.starts_with("--socket-ring"));
        let ring_args = if ring_chosen {
            &[][..]
        } else {
            &["--socket-ring", "off"][..]
        };
        let child = ns
            .command(&bin)
            .arg("--runtime-dir")
            .arg(&runtime_dir)
            .arg("run")
            .arg("--policy")
            .arg(policy)
            .arg("--pin-dir")
            .arg(&pin_dir)
            .args(ring_args)
            .args(extra)
            .envs(how.env)
            .stdout(std::fs::File::create(&stdout_path).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn datafence run");
        let mut agent = Self {
            child,
            runtime_dir,
            netns: ns.name.clone(),
            stdout_path,
            stderr_path,
            pin_dir,
            keep_pins: false,
            scratch: Some(scratch),
        };
        let deadline = Instant::now() + patience(Duration::from_secs(30));
        loop {
            if let Some(status) = agent.child.try_wait().expect("wait") {
                panic!(
                    "datafence run exited early with {status}:\n{}",
                    agent.stderr()
                );
            }
            // `status` also answers from the pinned state while no agent runs: wait for
            // this agent's own answer.
            let out = agent.cli(&["status", "--json"]);
            if out.status.success()
                && serde_json::from_slice::<serde_json::Value>(&out.stdout)
                    .is_ok_and(|s| s["agent_running"] == true)
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready:\n{}",
                agent.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        agent
    }

    /// Runs a `datafence` subcommand against this agent, in its namespace.
    pub fn cli(&self, args: &[&str]) -> Output {
        crate::netns::command_in(&self.netns, agent_binary())
            .arg("--runtime-dir")
            .arg(&self.runtime_dir)
            .args(args)
            .output()
            .expect("run datafence")
    }

    pub fn status_json(&self) -> serde_json::Value {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status json")
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// What the agent has written to stdout so far (its violation lines), as text.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout_path).unwrap_or_default()
    }

    /// Violation lines the agent has written so far.
    pub fn violations(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.stdout_path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Sum of packets over counter rows matching every given (field, value).
    pub fn packets(&self, filters: &[(&str, &str)]) -> u64 {
        self.status_json()["counters"]
            .as_array()
            .expect("counters")
            .iter()
            .filter(|row| filters.iter().all(|(k, v)| row[*k] == *v))
            .map(|row| row["packets"].as_u64().unwrap_or(0))
            .sum()
    }

    /// Freezes the agent, with its events unread, and returns once every one of its
    /// threads has stopped. `kill` alone returns before that: the kernel wakes one thread
    /// to begin the group stop, and until it runs the others (the event reader among
    /// them) go on.
    pub fn freeze(&self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill with our child's pid and a valid signal.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0, "SIGSTOP");
        let mut status = 0;
        // SAFETY: waitpid on our own child, with a valid status pointer. WUNTRACED reports
        // the stop once the whole thread group has stopped; the child is not reaped.
        let waited = unsafe { libc::waitpid(pid, &raw mut status, libc::WUNTRACED) };
        assert!(
            waited == pid && libc::WIFSTOPPED(status),
            "the agent did not stop: waitpid {waited}, status {status:#x}"
        );
    }

    /// Lets a frozen agent run again.
    pub fn thaw(&self) {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: kill with our child's pid and a valid signal.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGCONT) }, 0, "SIGCONT");
    }

    /// SIGKILL, as a crash would: nothing is cleaned up, pinned state stays.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, leaving the pinned enforcement in place for the test to inspect. Also
    /// hands back the agent's scratch directory (runtime dir, logs), which the test then
    /// owns.
    pub fn stop_leaving_enforcement(mut self) -> (std::process::ExitStatus, Scratch) {
        self.keep_pins = true;
        let scratch = self.scratch.take().expect("scratch");
        (self.stop(), scratch)
    }

    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: kill with a valid pid and signal.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + patience(Duration::from_secs(10));
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        // Enforcement outlives the agent by design; tests must not leave it behind.
        if !self.keep_pins {
            let _ = datafence::datapath::PinLayout::new(&self.pin_dir).remove_all();
        }
    }
}
