//! `explain --datapath --cgroup X` answered by the agent: the kernel gives a test frame
//! the cgroup of the process that runs it (`BPF_PROG_TEST_RUN` allocates the frame's
//! socket as that process), and the program classifies by that cgroup. So the agent
//! pins its private copy's entry program and runs each frame from a short-lived child
//! placed in X ([`TEST_RUN_COMMAND`]), keeping the copy, and reading its counters, itself.
//! The child is started in X by `clone3(CLONE_INTO_CGROUP)` ([`sys::spawn_into_cgroup`]):
//! under systemd's `ProtectControlGroups=` the agent sees the hierarchy read-only, and
//! could not write X's `cgroup.procs`.
#![forbid(unsafe_code)]

use std::{
    ffi::OsString,
    io::{Read as _, Write as _},
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use super::ExplainError;
use crate::{
    cgroups,
    datapath::Datapath,
    sys::{self, CgroupChild},
};

/// The hidden `datafence` subcommand the child runs: it runs the frame on its stdin
/// through the program pinned at `--program`, with `--mark`, and prints the program's
/// return value.
pub const TEST_RUN_COMMAND: &str = "test-run-in-cgroup";

/// How long a child may take; a test run takes microseconds, starting the binary
/// milliseconds.
const CHILD_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the agent's own pins are absent (a trial agent without --pin-dir), the pin goes
/// to the bpf filesystem's usual mount point.
const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf";

/// Runs test frames in other cgroups, from children, through a pin of the entry program.
pub(super) struct CgroupRunner {
    cgroup_root: PathBuf,
    pin_dir: PathBuf,
    /// Made at the first run, removed on drop.
    pin: Option<TestRunPin>,
}

/// The entry program's pin, removed when dropped: it holds the program (and so its maps)
/// in the kernel for as long as it stays.
struct TestRunPin(PathBuf);

impl Drop for TestRunPin {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            tracing::warn!(pin = %self.0.display(), error = %e, "removing the explain test-run pin");
        }
    }
}

impl CgroupRunner {
    /// `pin_dir`: a bpffs directory the pin may go in (the agent's own pin directory).
    pub(super) fn new(cgroup_root: PathBuf, pin_dir: Option<PathBuf>) -> Self {
        Self {
            cgroup_root,
            pin_dir: pin_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_PIN_DIR)),
            pin: None,
        }
    }

    /// Runs `frame` through `datapath`'s TC entry program from a child in `cgroup`; returns
    /// whether the program let it pass.
    pub(super) fn test_run(
        &mut self,
        datapath: &mut Datapath,
        cgroup: &str,
        frame: &[u8],
        mark: u32,
    ) -> Result<bool, ExplainError> {
        let dir = cgroups::cgroup_dir(&self.cgroup_root, cgroup)?;
        let pin = self.pin(datapath)?;
        let failed = |detail: String| ExplainError::TestRunInCgroup {
            cgroup: cgroup.to_owned(),
            detail,
        };
        let args: Vec<OsString> = vec![
            TEST_RUN_COMMAND.into(),
            "--program".into(),
            pin.into(),
            "--mark".into(),
            mark.to_string().into(),
        ];
        // Through /proc/self/exe: the binary this agent runs, even if a newer one has been
        // installed over it since.
        let child =
            sys::spawn_into_cgroup(&dir, Path::new("/proc/self/exe"), &args).map_err(|e| {
                failed(format!(
                    "starting a process in it ({}): {e}{}",
                    dir.display(),
                    placement_hint(&e)
                ))
            })?;
        let output = run_bounded(child, frame).map_err(failed)?;
        let action: i32 = output
            .trim()
            .parse()
            .map_err(|e| failed(format!("the child printed {output:?}: {e}")))?;
        Ok(action == datafence_common::TC_PASS)
    }

    fn pin(&mut self, datapath: &mut Datapath) -> Result<&Path, ExplainError> {
        if self.pin.is_none() {
            // One agent may answer several explains over its life, and agents of other
            // pin directories may share the fallback directory: a name of its own each
            // time. bpffs refuses dots in names.
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let path = self.pin_dir.join(format!(
                "{}{}-{n}",
                crate::dirs::EXPLAIN_TEST_RUN_PREFIX,
                std::process::id()
            ));
            datapath.pin_tc_entry(&path)?;
            self.pin = Some(TestRunPin(path));
        }
        Ok(&self.pin.as_ref().expect("pinned above").0)
    }
}

/// What an operator can do about a process the kernel would not place in a cgroup.
fn placement_hint(error: &std::io::Error) -> &'static str {
    match error.kind() {
        // clone3 with CLONE_INTO_CGROUP came with Linux 5.7.
        std::io::ErrorKind::Unsupported => {
            "; this kernel cannot start a process in a cgroup (clone3 with CLONE_INTO_CGROUP, Linux 5.7)"
        }
        // cgroup v2 keeps processes out of a cgroup that hands controllers to children.
        std::io::ErrorKind::ResourceBusy => {
            "; a cgroup whose controllers are enabled for its children holds no processes: name the leaf cgroup the service runs in"
        }
        _ => "",
    }
}

/// Feeds `frame` to the child, waits at most [`CHILD_TIMEOUT`] for it, and returns what
/// it printed; on failure, why, with what it wrote to stderr.
fn run_bounded(mut child: CgroupChild, frame: &[u8]) -> Result<String, String> {
    // Readers of their own, so a child that writes much cannot block on a full pipe
    // while this waits for it to exit.
    let read_all = |pipe: Option<Box<dyn std::io::Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = read_all(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = read_all(child.stderr.take().map(|p| Box::new(p) as _));
    // Dropping stdin once written is the end of the frame. A child that died first shows
    // in its status and stderr.
    let written = child.stdin.take().map(|mut stdin| stdin.write_all(frame));
    let deadline = Instant::now() + CHILD_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() >= deadline => {
                child.kill_and_reap();
                break Err(format!(
                    "the child took longer than {CHILD_TIMEOUT:?}; killed"
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(2)),
            Err(e) => break Err(format!("waiting for the child: {e}")),
        }
    };
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    let stderr = stderr.trim();
    let status = status.map_err(|e| format!("{e}: {stderr}"))?;
    if !status.success() {
        return Err(format!("the child exited with {status}: {stderr}"));
    }
    if let Some(Err(e)) = written {
        return Err(format!("writing the frame to the child: {e}"));
    }
    Ok(stdout)
}
