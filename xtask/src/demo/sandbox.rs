//! The sandbox: namespaces, the cgroup, the servers, and removing them again. Processes
//! enter namespaces and cgroups through the shared `datafence-sandbox` toolkit.

use super::*;

/// An exclusive flock on a file in /run, so that demos on one machine take turns. The
/// kernel drops it when the holder dies, however it dies, which is what lets the next run
/// treat whatever it finds under the fixed names as leftovers.
pub(super) struct DemoLock {
    pub(super) file: File,
}

impl DemoLock {
    const PATH: &str = "/run/datafence-demo.lock";

    pub(super) fn acquire() -> Result<Self> {
        let mut waiting = false;
        loop {
            check_interrupt()?;
            let file = File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .open(Self::PATH)
                .with_context(|| format!("opening {}", Self::PATH))?;
            // SAFETY: flock on an fd we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                // The previous holder unlinks the file as it finishes; a lock on that
                // unlinked file excludes nobody, so make sure ours is still the file at
                // the path.
                let same = match (file.metadata(), fs::metadata(Self::PATH)) {
                    (Ok(held), Ok(named)) => held.ino() == named.ino(),
                    _ => false,
                };
                if same {
                    return Ok(Self { file });
                }
                continue;
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::WouldBlock {
                return Err(err).with_context(|| format!("locking {}", Self::PATH));
            }
            if !waiting {
                println!("  another `cargo xtask demo` is running; waiting for it to finish");
                waiting = true;
            }
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Unlinks the file before unlocking it, so that nothing is left in /run.
    pub(super) fn release(self) {
        let _ = fs::remove_file(Self::PATH);
        drop(self.file);
    }
}

/// Deletes the namespaces, the cgroup and the scratch directory by their fixed names,
/// whoever made them, and returns what it found. Never fails: this also runs while an
/// error is on its way out.
pub(super) fn remove_sandbox(cgroup_root: &Path, tmp: &Path) -> Vec<String> {
    let mut removed = Vec::new();
    let namespaces: Vec<String> = fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(NS_PREFIX))
        .collect();
    for name in namespaces {
        match Command::new("ip").args(["netns", "del", &name]).output() {
            Ok(out) if out.status.success() => removed.push(format!("netns {name}")),
            Ok(out) => eprintln!(
                "warning: could not delete namespace {name}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            Err(err) => eprintln!("warning: could not run `ip netns del {name}`: {err}"),
        }
    }
    let leaf = cgroup_root.join(CGROUP.trim_start_matches('/'));
    for dir in leaf.ancestors().take(2) {
        if !dir.exists() {
            continue;
        }
        // A client that has just exited can keep the cgroup busy for a moment.
        let mut result = fs::remove_dir(dir);
        for _ in 0..20 {
            if result.is_ok() {
                break;
            }
            thread::sleep(Duration::from_millis(50));
            result = fs::remove_dir(dir);
        }
        match result {
            Ok(()) => removed.push(format!("cgroup {}", dir.display())),
            Err(err) => eprintln!("warning: could not remove cgroup {}: {err}", dir.display()),
        }
    }
    if tmp.exists() {
        match fs::remove_dir_all(tmp) {
            Ok(()) => removed.push(tmp.display().to_string()),
            Err(err) => eprintln!("warning: could not remove {}: {err}", tmp.display()),
        }
    }
    removed
}

pub(super) fn stop_child(child: &mut Child) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY: kill(2) on the pid of a child we have not reaped yet, so it cannot have
    // been reused.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Where the cgroup v2 hierarchy is mounted. The agent finds it the same way
/// (`datafence::cgroups::cgroup2_root`); the demo passes it explicitly so both agree.
pub(super) fn cgroup2_root() -> PathBuf {
    datafence_sandbox::cgroup2_root_or(Path::new("/sys/fs/cgroup"))
}

pub(super) fn add_netns(name: &str) -> Result<()> {
    util::output(Command::new("ip").args(["netns", "add", name]))?;
    ip(&format!("-n {name} link set lo up"))?;
    // No duplicate-address detection, so addresses are usable at once rather than
    // tentative for a second or two.
    util::output(Command::new("ip").args([
        "netns",
        "exec",
        name,
        "sysctl",
        "-q",
        "-w",
        "net.ipv6.conf.all.accept_dad=0",
        "net.ipv6.conf.default.accept_dad=0",
    ]))?;
    Ok(())
}

/// Runs `ip ARGS`, ARGS split on whitespace.
pub(super) fn ip(args: &str) -> Result<()> {
    util::output(Command::new("ip").args(args.split_whitespace()))?;
    Ok(())
}

pub(super) fn enter_netns(netns: &File) -> io::Result<()> {
    datafence_sandbox::enter(netns)
}

/// A command that runs in the named network namespace and nothing else; see
/// [`datafence_sandbox::command_in`].
pub(super) fn in_netns(netns: &str, program: impl AsRef<OsStr>) -> Result<Command> {
    datafence_sandbox::command_in(netns, program).with_context(|| format!("namespace {netns}"))
}

/// As [`in_netns`], and the process starts in the cgroup whose directory is given, so
/// every socket it opens is charged to that cgroup.
pub(super) fn in_netns_and_cgroup(netns: &str, cgroup: &Path, program: &str) -> Result<Command> {
    let mut cmd = in_netns(netns, program)?;
    datafence_sandbox::spawn_in_cgroup(&mut cmd, &cgroup.join("cgroup.procs"))?;
    Ok(cmd)
}

pub(super) fn serve(region: &str, tcp: &TcpListener, udp: &UdpSocket, stop: &AtomicBool) {
    let body = format!("hello from {region}\n");
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    );
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::SeqCst) {
        while let Ok((mut conn, _)) = tcp.accept() {
            // Bounded, so a client that never sends its request cannot stall the server.
            let _ = conn.set_nonblocking(false);
            let _ = conn.set_read_timeout(Some(Duration::from_secs(1)));
            let mut request = Vec::new();
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 16_384 {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let _ = conn.write_all(response.as_bytes());
        }
        // The read timeout paces this loop.
        if let Ok((n, from)) = udp.recv_from(&mut buf) {
            let mut reply = format!("{region} echo: ").into_bytes();
            reply.extend_from_slice(&buf[..n]);
            let _ = udp.send_to(&reply, from);
        }
    }
}
