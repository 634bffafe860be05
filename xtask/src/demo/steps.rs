//! The demo's steps: the sandbox and agent it owns, and what it shows at each step.

use super::*;

pub(super) struct Demo {
    /// Held for the whole run: the names are fixed, so a second demo must not start until
    /// this one has removed them.
    pub(super) lock: Option<DemoLock>,
    pub(super) style: Style,
    pub(super) agent_bin: PathBuf,
    pub(super) cgroup_root: PathBuf,
    /// Scratch directory: the policy copy the agent runs with, its runtime dir and logs.
    pub(super) tmp: PathBuf,
    pub(super) policy: PathBuf,
    pub(super) runtime_dir: PathBuf,
    pub(super) violations_log: PathBuf,
    pub(super) agent_log: PathBuf,
    pub(super) agent: Option<Child>,
    pub(super) stop_servers: Arc<AtomicBool>,
    pub(super) servers: Vec<JoinHandle<()>>,
    /// Violation lines already shown, so each step shows only what it caused.
    pub(super) violations_seen: usize,
    /// Results that contradict the policy; the demo fails if there are any.
    pub(super) surprises: Vec<String>,
    pub(super) torn_down: bool,
}

impl Demo {
    /// Removes what a crashed earlier run may have left, then takes ownership of the fixed
    /// names: from here on, dropping `Demo` removes them whatever happens.
    pub(super) fn new(agent_bin: PathBuf, style: Style) -> Result<Self> {
        let lock = DemoLock::acquire()?;
        let tmp = env::temp_dir().join("datafence-demo");
        let demo = Self {
            lock: Some(lock),
            style,
            agent_bin,
            cgroup_root: cgroup2_root(),
            policy: tmp.join("policy.yaml"),
            runtime_dir: tmp.join("run"),
            violations_log: tmp.join("violations.jsonl"),
            agent_log: tmp.join("agent.log"),
            tmp,
            agent: None,
            stop_servers: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            violations_seen: 0,
            surprises: Vec::new(),
            torn_down: false,
        };
        let stale = remove_sandbox(&demo.cgroup_root, &demo.tmp);
        if !stale.is_empty() {
            println!(
                "  removed leftovers of an earlier run: {}",
                stale.join(", ")
            );
        }
        Ok(demo)
    }

    pub(super) fn cgroup_dir(&self) -> PathBuf {
        self.cgroup_root.join(CGROUP.trim_start_matches('/'))
    }

    pub(super) fn build_sandbox(&mut self) -> Result<()> {
        self.style.heading(2, "Building the sandbox");
        fs::create_dir_all(&self.tmp)
            .with_context(|| format!("creating {}", self.tmp.display()))?;
        // The agent reloads from this copy, which step 7 rewrites; the file in the
        // repository stays as it is.
        let source = util::workspace_root().join(POLICY);
        fs::copy(&source, &self.policy).with_context(|| {
            format!("copying {} to {}", source.display(), self.policy.display())
        })?;

        add_netns(HOST_NS)?;
        for (index, region) in REGIONS.iter().enumerate() {
            add_netns(region.netns)?;
            let link = Link::new(index);
            ip(&format!(
                "link add {} address {} netns {HOST_NS} type veth \
                 peer name to-host address {} netns {}",
                region.host_if, link.host_mac, link.region_mac, region.netns
            ))?;
            let sides = [
                (HOST_NS, region.host_if, &link.host_v4, &link.host_v6),
                (region.netns, "to-host", &link.region_v4, &link.region_v6),
            ];
            for (ns, dev, v4, v6) in sides {
                ip(&format!("-n {ns} addr add {v4}/30 dev {dev}"))?;
                ip(&format!("-n {ns} -6 addr add {v6}/64 dev {dev} nodad"))?;
                ip(&format!("-n {ns} link set {dev} up"))?;
            }
            // Static neighbours: traffic flows from the first packet, with no ARP or
            // neighbour discovery that could make a slow machine look like a blocked one.
            let neighbours = [
                (
                    HOST_NS,
                    region.host_if,
                    &link.region_v4,
                    &link.region_v6,
                    &link.region_mac,
                ),
                (
                    region.netns,
                    "to-host",
                    &link.host_v4,
                    &link.host_v6,
                    &link.host_mac,
                ),
            ];
            for (ns, dev, v4, v6, mac) in neighbours {
                for peer in [v4, v6] {
                    ip(&format!(
                        "-n {ns} neigh replace {peer} lladdr {mac} dev {dev} nud permanent"
                    ))?;
                }
            }
            let (ns, v4, v6) = (region.netns, region.server_v4, region.server_v6);
            ip(&format!("-n {ns} addr add {v4}/32 dev lo"))?;
            ip(&format!("-n {ns} -6 addr add {v6}/128 dev lo nodad"))?;
            ip(&format!(
                "-n {HOST_NS} route add {} via {} dev {}",
                region.route_v4, link.region_v4, region.host_if
            ))?;
            ip(&format!(
                "-n {HOST_NS} -6 route add {} via {} dev {}",
                region.route_v6, link.region_v6, region.host_if
            ))?;
            self.start_servers(region)?;
        }

        let cgroup = self.cgroup_dir();
        // Before the agent starts: it resolves the policy's cgroup path to an id once,
        // when it validates the policy.
        fs::create_dir_all(&cgroup)
            .with_context(|| format!("creating cgroup {}", cgroup.display()))?;

        println!("  {HOST_NS} (the enforced host) has a link to each region's namespace:");
        for region in &REGIONS {
            println!(
                "    {HOST_NS} --{:-<12}> {:<16} server {:<14} {}",
                region.host_if,
                region.netns,
                region.server_v4.to_string(),
                region.server_v6
            );
        }
        println!("  each server answers HTTP on tcp/{HTTP_PORT} and echoes UDP on udp/{UDP_PORT}");
        println!("  user-data cgroup: {}", cgroup.display());
        Ok(())
    }

    /// HTTP and UDP echo servers for `region`, on threads that live in its namespace; the
    /// replies name the region, so a client can tell it reached the right one.
    pub(super) fn start_servers(&mut self, region: &'static Region) -> Result<()> {
        let netns = File::open(datafence_sandbox::netns_path(region.netns))
            .with_context(|| format!("opening namespace {}", region.netns))?;
        let addrs = [IpAddr::V4(region.server_v4), IpAddr::V6(region.server_v6)];
        for addr in addrs {
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let netns = netns.try_clone()?;
            let stop = self.stop_servers.clone();
            let handle = thread::spawn(move || {
                let bound = enter_netns(&netns).and_then(|()| {
                    let tcp = TcpListener::bind(SocketAddr::new(addr, HTTP_PORT))?;
                    tcp.set_nonblocking(true)?;
                    let udp = UdpSocket::bind(SocketAddr::new(addr, UDP_PORT))?;
                    udp.set_read_timeout(Some(Duration::from_millis(50)))?;
                    Ok((tcp, udp))
                });
                match bound {
                    Ok((tcp, udp)) => {
                        let _ = ready_tx.send(Ok(()));
                        serve(region.name, &tcp, &udp, &stop);
                    }
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                    }
                }
            });
            self.servers.push(handle);
            ready_rx
                .recv()
                .context("a server thread died while starting")?
                .with_context(|| format!("starting the {} servers on {addr}", region.name))?;
        }
        Ok(())
    }

    pub(super) fn start_agent(&mut self) -> Result<()> {
        self.style
            .heading(3, "Starting the agent in the host namespace");
        println!("  the policy ({POLICY}), as datafence sees it:");
        let check = self.datafence(&["check", &self.policy.display().to_string()])?;
        print_indented(&check, 4);

        let policy = self.policy.display().to_string();
        let mut args = vec!["run", "--policy", &policy, "--metrics-addr", METRICS_ADDR];
        // Flags of newer agents, passed only when this build has them. --no-pin: the
        // demo's enforcement must end with the demo, and must not touch the pins of an
        // agent that protects this machine. --no-watch: the switch to audit should happen
        // at the `datafence reload` shown, not whenever the file watcher notices.
        let help = self.datafence(&["run", "--help"])?;
        for flag in ["--no-pin", "--no-watch"] {
            if help.contains(flag) {
                args.push(flag);
            }
        }
        println!("  $ datafence {}", args.join(" "));
        let mut cmd = self.datafence_command(&args)?;
        let stdout = File::create(&self.violations_log)?;
        let stderr = File::create(&self.agent_log)?;
        cmd.stdout(stdout).stderr(stderr).stdin(Stdio::null());
        // Ctrl-C in the terminal reaches only the demo, which then stops the agent in
        // order; and if the demo dies without cleaning up, so does the agent.
        cmd.process_group(0);
        // SAFETY: prctl is a plain syscall, safe between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        self.agent = Some(cmd.spawn().context("starting datafence run")?);

        let deadline = started + Duration::from_secs(30);
        loop {
            check_interrupt()?;
            if let Some(status) = self
                .agent
                .as_mut()
                .and_then(|a| a.try_wait().ok().flatten())
            {
                bail!(
                    "datafence run exited early ({status}); its log:\n{}",
                    fs::read_to_string(&self.agent_log).unwrap_or_default()
                );
            }
            if self
                .datafence_command(&["status"])?
                .output()
                .is_ok_and(|o| o.status.success())
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "datafence run did not answer `datafence status` within 30s; its log:\n{}",
                    fs::read_to_string(&self.agent_log).unwrap_or_default()
                );
            }
            thread::sleep(Duration::from_millis(100));
        }
        println!(
            "  ready after {:.1}s: enforcing on {}",
            started.elapsed().as_secs_f64(),
            REGIONS.map(|r| r.host_if).join(", ")
        );
        println!(
            "  (its control socket is in {}; the commands below pass --runtime-dir there)",
            self.runtime_dir.display()
        );
        Ok(())
    }

    pub(super) fn show_enforcement(&mut self) -> Result<()> {
        self.style
            .heading(4, "Traffic from the host, with the policy enforced");
        println!(
            "  user-data = clients run in cgroup {CGROUP}; other = the same clients outside it"
        );
        println!(
            "  HTTP = curl --max-time {CLIENT_TIMEOUT_SECS}; UDP = one datagram, waiting for \
             the echo"
        );
        let results = run_probes(&self.cgroup_dir(), &[Sender::UserData, Sender::Other]);
        // Ctrl-C also kills the clients, which would read as blocked traffic.
        check_interrupt()?;
        self.print_results(&results, Mode::Enforce);

        self.style.heading(5, "What the agent reported");
        let violations = self.new_violations();
        println!("  violations: the agent writes one JSON line per violating flow to stdout");
        print_violations(&violations, self.style);
        if !parse_all(&violations)
            .iter()
            .any(|v| v.verdict == "deny" && v.region == FORBIDDEN_REGION && v.class == "user-data")
        {
            self.surprises
                .push("no deny violation for user data to us-east was reported".to_owned());
        }
        println!();
        Self::show_metrics()?;
        println!();
        println!("  $ datafence status");
        let status = self.datafence(&["status"])?;
        print_indented(&status, 4);
        check_interrupt()?;

        self.style.heading(6, "Asking the agent why");
        let (us, eu) = (
            REGIONS[2].server_v4.to_string(),
            REGIONS[0].server_v4.to_string(),
        );
        let port = HTTP_PORT.to_string();
        for args in [
            vec!["explain", "--cgroup", CGROUP, "--dport", &port, &us, &eu],
            vec!["explain", "--dport", &port, &us],
        ] {
            println!("  $ datafence {}", args.join(" "));
            print_indented(&self.datafence(&args)?, 4);
        }
        Ok(())
    }

    fn show_metrics() -> Result<()> {
        const SHOWN: usize = 12;
        let url = format!("http://{METRICS_ADDR}/metrics");
        println!("  $ curl {url}   (in {HOST_NS}; lines of datafence_packets_total)");
        let out = in_netns(HOST_NS, "curl")?
            .args([
                "--silent",
                "--fail",
                "--max-time",
                CLIENT_TIMEOUT_SECS,
                &url,
            ])
            .stdin(Stdio::null())
            .output()
            .context("running curl")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mut lines: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("datafence_packets_total"))
            .collect();
        lines.sort_unstable();
        if !out.status.success() || lines.is_empty() {
            println!("    (metrics endpoint not available)");
            return Ok(());
        }
        for line in lines.iter().take(SHOWN) {
            println!("    {line}");
        }
        if lines.len() > SHOWN {
            println!("    ... and {} more", lines.len() - SHOWN);
        }
        Ok(())
    }

    pub(super) fn show_audit_reload(&mut self) -> Result<()> {
        self.style
            .heading(7, "Switching to audit mode with a live reload");
        let text = fs::read_to_string(&self.policy)?;
        let audit = text.replacen("\nmode: enforce", "\nmode: audit", 1);
        if audit == text {
            bail!("{POLICY} has no top-level `mode: enforce` line for the demo to change");
        }
        // Replaced in one step, so nothing ever reads a half-written policy.
        let staged = self.policy.with_extension("yaml.new");
        fs::write(&staged, audit)?;
        fs::rename(&staged, &self.policy)?;
        println!(
            "  in {}: mode: enforce -> mode: audit",
            self.policy.display()
        );
        println!("  $ datafence reload");
        print_indented(&self.datafence(&["reload"])?, 4);
        check_interrupt()?;

        println!(
            "  user data again: everything passes now, and what enforce mode would drop is \
             reported"
        );
        let results = run_probes(&self.cgroup_dir(), &[Sender::UserData]);
        check_interrupt()?;
        self.print_results(&results, Mode::Audit);
        let violations = self.new_violations();
        println!("  violations since the reload (audit hits):");
        print_violations(&violations, self.style);
        if !parse_all(&violations)
            .iter()
            .any(|v| v.verdict == "audit" && v.region == FORBIDDEN_REGION)
        {
            self.surprises
                .push("no audit hit for user data to us-east was reported".to_owned());
        }
        Ok(())
    }

    pub(super) fn print_results(&mut self, results: &[ProbeResult], mode: Mode) {
        let style = self.style;
        println!(
            "  {}",
            style.bold(&format!(
                "{:<10} {:<9} {:<9} {:<15} {:<9}   {:<18} {}",
                "SENDER", "PROTO", "REGION", "IPv4 SERVER", "RESULT", "IPv6 SERVER", "RESULT"
            ))
        );
        // Probes come in IPv4/IPv6 pairs; show a pair per row.
        for pair in results.chunks(2) {
            let [v4, v6] = pair else { continue };
            let mut line = format!(
                "  {:<10} {:<9} {:<9}",
                v4.probe.sender.label(),
                v4.probe.proto.label(),
                v4.probe.region.name
            );
            for (result, gap) in [(v4, ""), (v6, "  ")] {
                let expected = result.probe.expected_to_pass(mode);
                let width = if result.probe.addr.is_ipv4() { 15 } else { 18 };
                let _ = write!(
                    line,
                    "{gap} {:<width$} {}",
                    result.probe.addr.to_string(),
                    style.outcome(result.passed)
                );
                if result.passed != expected {
                    let _ = write!(line, " {}", style.yellow("(unexpected!)"));
                    self.surprises.push(format!(
                        "{} {} to {} {}: {} ({})",
                        result.probe.sender.label(),
                        result.probe.proto.label(),
                        result.probe.region.name,
                        result.probe.addr,
                        if result.passed {
                            "passed"
                        } else {
                            "was blocked"
                        },
                        result.detail
                    ));
                }
            }
            println!("{line}");
        }
    }

    /// Violation lines the agent has written since the last call.
    pub(super) fn new_violations(&mut self) -> Vec<String> {
        // The agent reads its event ring as packets are dropped; give the last ones time to
        // be written.
        thread::sleep(Duration::from_millis(300));
        let text = fs::read_to_string(&self.violations_log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let fresh = lines.get(self.violations_seen..).unwrap_or_default();
        self.violations_seen = lines.len();
        fresh.iter().map(|&l| l.to_owned()).collect()
    }

    pub(super) fn wait_for_enter(&self) {
        println!();
        println!(
            "{}",
            self.style
                .bold("--keep: the sandbox stays up until you press Enter (or Ctrl-C)")
        );
        println!("  try, in another terminal:");
        let bin = self.agent_bin.display();
        let rt = self.runtime_dir.display();
        println!("    {bin} --runtime-dir {rt} status");
        println!("    ip netns exec {HOST_NS} curl -m 2 http://203.0.113.10/");
        println!(
            "    {bin} --runtime-dir {rt} explain --cgroup {CGROUP} 2001:db8:300::10 198.18.0.10"
        );
        let mut stdin = libc::pollfd {
            fd: 0,
            events: libc::POLLIN,
            revents: 0,
        };
        while !interrupted() {
            // SAFETY: one valid pollfd; a signal makes poll return early, which the loop
            // condition then sees.
            let ready = unsafe { libc::poll(&raw mut stdin, 1, 200) };
            if ready > 0 {
                let _ = io::stdin().lock().read_line(&mut String::new());
                break;
            }
        }
    }

    /// `datafence` with the agent's runtime dir and cgroup root, in the host namespace.
    pub(super) fn datafence_command(&self, args: &[&str]) -> Result<Command> {
        let mut cmd = in_netns(HOST_NS, &self.agent_bin)?;
        cmd.arg("--runtime-dir")
            .arg(&self.runtime_dir)
            .arg("--cgroup-root")
            .arg(&self.cgroup_root)
            .args(args)
            // The sandbox is not the machine you are logged in to: the agent's guard
            // against locking out the SSH client would judge the demo policy by an
            // address that the sandbox cannot even reach.
            .env_remove("SSH_CONNECTION");
        Ok(cmd)
    }

    /// Runs a `datafence` command and returns what it printed, stdout then stderr.
    pub(super) fn datafence(&self, args: &[&str]) -> Result<String> {
        let out = self
            .datafence_command(args)?
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running datafence {}", args.join(" ")))?;
        let text = combined(&out);
        if !out.status.success() {
            bail!(
                "`datafence {}` failed ({}):\n{text}",
                args.join(" "),
                out.status
            );
        }
        Ok(text)
    }

    pub(super) fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        if let Some(mut agent) = self.agent.take() {
            stop_child(&mut agent);
        }
        self.stop_servers.store(true, Ordering::SeqCst);
        for server in self.servers.drain(..) {
            let _ = server.join();
        }
        // Once the servers' sockets are closed nothing holds the namespaces, so deleting
        // them frees the veth pairs at once.
        remove_sandbox(&self.cgroup_root, &self.tmp);
        if let Some(lock) = self.lock.take() {
            lock.release();
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.teardown();
    }
}
