//! The machine: /proc, child processes, memory cgroups, and the machine's facts.

use super::*;

/// The 1, 5 and 15 minute load averages.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

pub(crate) fn proc_status_kib(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resident bytes of a process's mappings of BPF objects (mmapped maps, ring buffers).
pub(crate) fn bpf_mapped_rss(pid: &str) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut in_bpf = false;
    let mut total = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().next().is_some_and(|c| c.is_ascii_hexdigit()) {
            in_bpf = line.contains("bpf");
        } else if in_bpf && let Some(rest) = line.strip_prefix("Rss:") {
            total += rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0)
                * 1024;
        }
    }
    total
}

/// utime + stime of a process, in seconds.
pub(crate) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After "pid (comm) ", field 3 (state) is index 0: utime is field 14, stime 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some((utime + stime) / ticks)
}

/// Resets VmHWM of this process to its current RSS.
pub(crate) fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

pub(crate) fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}

/// Runs a command with a deadline; stdout and stderr go to files in `dir`. Returns its
/// stdout, or an error that carries stderr (or says it timed out and was killed).
pub(crate) fn run_capped(
    mut cmd: Command,
    dir: &Path,
    cap: Duration,
) -> Result<(String, Duration)> {
    let shown = format!("{cmd:?}");
    let out_path = dir.join("cmd.stdout");
    let err_path = dir.join("cmd.stderr");
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?);
    let start = Instant::now();
    let mut child = cmd.spawn().with_context(|| format!("spawning {shown}"))?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if start.elapsed() > cap {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "capped: still running after {:.0}s, killed",
                cap.as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let elapsed = start.elapsed();
    let stdout = std::fs::read_to_string(&out_path).unwrap_or_default();
    if !status.success() {
        let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
        let stderr: String = stderr.chars().take(600).collect();
        bail!("{shown} failed ({status}): {}", stderr.trim());
    }
    Ok((stdout, elapsed))
}

pub(crate) fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawning {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn in_ns(ns: &str, program: &str, args: &[&str]) -> Result<String> {
    let mut cmd = command_in(ns, program);
    cmd.args(args);
    sh(&mut cmd)
}

/// A memory cgroup that kernel allocations (BPF maps, nftables and ipset elements) are
/// charged to while a thread or a child runs in it. cgroup v2 when its memory controller
/// is available, else the v1 memory hierarchy, which also lets a single thread move.
pub(crate) struct MemCg {
    pub(crate) dir: PathBuf,
    pub(crate) usage_file: &'static str,
    /// v1 only: a thread can join (`tasks`), and return to where it came from.
    pub(crate) thread_join: Option<(PathBuf, PathBuf)>,
    pub(crate) label: &'static str,
}

impl MemCg {
    pub(crate) fn create() -> Option<Self> {
        let name = format!("datafence-bench-{}", std::process::id());
        for root in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
            let root = Path::new(root);
            let controllers =
                std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            if controllers.split_whitespace().any(|c| c == "memory") {
                let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory");
                let dir = root.join(&name);
                let _ = std::fs::create_dir(&dir);
                if dir.join("memory.current").exists() {
                    return Some(Self {
                        dir,
                        usage_file: "memory.current",
                        thread_join: None,
                        label: "cgroup v2 memory.current",
                    });
                }
                let _ = std::fs::remove_dir(&dir);
            }
        }
        let v1 = Path::new("/sys/fs/cgroup/memory");
        if v1.join("memory.usage_in_bytes").exists() {
            let dir = v1.join(&name);
            std::fs::create_dir(&dir).ok()?;
            let own = std::fs::read_to_string("/proc/self/cgroup")
                .unwrap_or_default()
                .lines()
                .find_map(|l| {
                    let mut parts = l.splitn(3, ':');
                    let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
                    ctrl.split(',')
                        .any(|c| c == "memory")
                        .then(|| path.to_owned())
                })
                .unwrap_or_else(|| "/".into());
            let home = v1.join(own.trim_start_matches('/')).join("tasks");
            return Some(Self {
                thread_join: Some((dir.join("tasks"), home)),
                dir,
                usage_file: "memory.usage_in_bytes",
                label: "cgroup v1 memory.usage_in_bytes",
            });
        }
        None
    }

    pub(crate) fn usage(&self) -> Option<u64> {
        std::fs::read_to_string(self.dir.join(self.usage_file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Moves the calling thread in (v1 only); false when it cannot.
    pub(crate) fn enter_thread(&self) -> bool {
        self.thread_join
            .as_ref()
            .is_some_and(|(tasks, _)| std::fs::write(tasks, "0").is_ok())
    }

    pub(crate) fn leave_thread(&self) {
        if let Some((_, home)) = &self.thread_join {
            let _ = std::fs::write(home, "0");
        }
    }

    /// Makes `cmd` run in this cgroup.
    pub(crate) fn adopt(&self, cmd: &mut Command) {
        datafence::cgroups::spawn_in_cgroup(cmd, &self.dir.join("cgroup.procs"))
            .expect("no NUL in a cgroup path");
    }
}

impl Drop for MemCg {
    fn drop(&mut self) {
        self.leave_thread();
        // Charges still held (freed lazily) do not stop rmdir; tasks would.
        for _ in 0..20 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

pub(crate) fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown", |(_, m)| m.trim())
        .to_owned();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned();
    let mem_kib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    let version = |prog: &str, arg: &str| {
        Command::new(prog)
            .arg(arg)
            .output()
            .ok()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default()
    };
    Machine {
        cpu: model,
        cores,
        kernel,
        memory_gib: mem_kib as f64 / 1024.0 / 1024.0,
        nft: version("nft", "--version"),
        ipset: version("ipset", "--version"),
        iptables: version("iptables", "-V"),
    }
}

/// Whether this process runs as root.
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    euid == 0
}

/// Asks a child to stop (SIGTERM).
pub(crate) fn terminate(child: &std::process::Child) {
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
}

pub(crate) struct BlastStats {
    pub(crate) processed: u64,
    pub(crate) refused: u64,
    pub(crate) elapsed: Duration,
}

/// Sends UDP datagrams with sendmmsg to `dests` in turn, from the calling thread's
/// namespace, for `duration` (and at most `rate` per second). A datagram the kernel
/// refuses (netfilter's EPERM) counts as processed and the next one is sent.
pub(crate) fn blast(
    dests: &[SocketAddrV4],
    duration: Duration,
    rate: Option<f64>,
) -> Result<BlastStats> {
    // SAFETY: plain socket(2).
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: we own fd; OwnedFd closes it.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    set_mark(&owned, USER_MARK)?;
    let addrs: Vec<libc::sockaddr_in> = dests
        .iter()
        .map(|d| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: d.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*d.ip()).to_be(),
            },
            sin_zero: [0; 8],
        })
        .collect();
    let payload = [0x5au8; 32];
    let iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    let mut msgs: Vec<libc::mmsghdr> = addrs
        .iter()
        .map(|a| {
            // SAFETY: mmsghdr is plain data; all-zero is a valid value.
            let mut m: libc::mmsghdr = unsafe { std::mem::zeroed() };
            m.msg_hdr.msg_name = std::ptr::from_ref(a).cast_mut().cast();
            m.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            m.msg_hdr.msg_iov = (&raw const iov).cast_mut();
            m.msg_hdr.msg_iovlen = 1;
            m
        })
        .collect();
    let len = msgs.len();
    let mut pos = 0;
    let mut processed = 0u64;
    let mut refused = 0u64;
    let start = Instant::now();
    let mut calls = 0u32;
    loop {
        let batch = BATCH.min(len - pos);
        // SAFETY: msgs[pos..pos + batch] are initialised mmsghdrs whose pointers (addrs,
        // iov, payload) outlive the call.
        let r = unsafe {
            libc::sendmmsg(
                owned.as_raw_fd(),
                msgs.as_mut_ptr().add(pos),
                batch as libc::c_uint,
                0,
            )
        };
        if r < 0 {
            refused += 1;
            processed += 1;
            pos += 1;
        } else {
            processed += r as u64;
            pos += r as usize;
        }
        if pos >= len {
            pos = 0;
        }
        calls += 1;
        if calls.is_multiple_of(8) {
            let elapsed = start.elapsed();
            if elapsed >= duration {
                break;
            }
            if let Some(rate) = rate {
                let ahead = processed as f64 / rate - elapsed.as_secs_f64();
                if ahead > 0.0 {
                    std::thread::sleep(Duration::from_secs_f64(ahead));
                }
            }
        }
    }
    Ok(BlastStats {
        processed,
        refused,
        elapsed: start.elapsed(),
    })
}

/// Marks what `sock` sends with `mark` (SO_MARK).
pub(crate) fn set_mark(sock: impl std::os::fd::AsFd, mark: u32) -> Result<()> {
    // SAFETY: setsockopt with a valid fd and a u32 option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&raw const mark).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!("SO_MARK: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
