//! Phase 3: the agent's footprint.

#![forbid(unsafe_code)]

use super::*;

pub(crate) fn agent_size(
    sb: &Sandbox,
    cat: &Catalogue,
    n: usize,
    args: &Args,
    budget: &Budget,
) -> Result<AgentFigures> {
    let set = prefix_set(cat, Shape::Real, n);
    let files = write_policy(cat, &set, &format!("bench-agent-{n}"))?;
    let capacity = table_capacity(n).to_string();
    let compiled = parse_policy(&files.path, n)?.compile();
    let agent = BenchAgent::start(
        sb,
        args,
        &files.path,
        &files.scratch.dir,
        &["--table-capacity", &capacity],
        Duration::from_mins(3).min(budget.left()),
    )?;
    let pid = agent.child.id();
    let ready = agent.ready;
    std::thread::sleep(Duration::from_millis(500));
    let pid_s = pid.to_string();
    let rss = |field: &str| proc_status_kib(&pid_s, field).map_or(0, |k| k * 1024);
    let idle_rss = rss("VmRSS:");
    let anon = rss("RssAnon:");
    let file = rss("RssFile:");
    let shmem = rss("RssShmem:");
    let bpf_mapped = bpf_mapped_rss(&pid_s);
    let hwm = rss("VmHWM:");

    // Denied user data at ~100k packets per second: every packet is a violation.
    let mut rng = Rng(0xa9e ^ n as u64);
    let allowed_index = cat.regions.iter().position(|r| r == "eu").unwrap_or(0);
    let denied = e2e_destinations(
        &set,
        &compiled,
        &[1, allowed_index as u32 + 2],
        1.0,
        &mut rng,
    );
    let mut cpu = Vec::new();
    let mut rates = Vec::new();
    for _ in 0..args.cpu_samples {
        let before = cpu_seconds(pid).context("agent stat")?;
        let d = denied.clone();
        let secs = args.cpu_seconds;
        let s = sb
            .host
            .run(move || blast(&d, Duration::from_secs_f64(secs), Some(VIOLATION_RATE)))?;
        let after = cpu_seconds(pid).context("agent stat")?;
        cpu.push((after - before) / s.elapsed.as_secs_f64() * 100.0);
        rates.push(s.processed as f64 / s.elapsed.as_secs_f64());
    }
    let busy_rss = rss("VmRSS:");
    drop(agent);
    Ok(AgentFigures {
        size: n,
        ready_s: ready.as_secs_f64(),
        v4_table: v4_table(&compiled),
        rss_bytes: idle_rss,
        rss_anon_bytes: anon,
        rss_file_bytes: file,
        rss_shmem_bytes: shmem,
        bpf_mapped_rss_bytes: bpf_mapped,
        rss_minus_bpf_mapped_bytes: idle_rss.saturating_sub(bpf_mapped),
        peak_rss_bytes: hwm,
        rss_after_violations_bytes: busy_rss,
        violations_per_s: summarize(&rates),
        cpu_percent_of_one_core: summarize(&cpu),
    })
}

/// A no-gap reload of the whole cloud catalogue (`policies/eu-cloud.yaml`), end to end:
/// `datafence reload` against a running release agent, which reads, validates and
/// compiles the policy, writes the inactive slot and flips. Each round changes a comment
/// so the policy's hash changes and the agent does the whole reload.
pub(crate) fn catalogue_reload(sb: &Sandbox, args: &Args) -> Result<CatalogueReload> {
    const ROUNDS: usize = 10;
    let policies = args
        .regions
        .parent()
        .and_then(Path::parent)
        .context("--regions is not inside a policies directory")?
        .to_path_buf();
    let original = std::fs::read_to_string(policies.join("eu-cloud.yaml"))
        .context("reading policies/eu-cloud.yaml")?;
    let scratch = Scratch::new("bench-catalogue");
    // Copied, not linked: the agent refuses region files whose real path is outside the
    // policy's directory.
    copy_dir(&policies.join("regions"), &scratch.dir.join("regions"))?;
    let policy = scratch.write("eu-cloud.yaml", &original);
    let agent = BenchAgent::start(sb, args, &policy, &scratch.dir, &[], Duration::from_mins(1))?;
    let compiled = parse_policy(&policy, 0)?.compile();
    let mut times = Vec::new();
    for round in 0..ROUNDS {
        std::fs::write(&policy, format!("{original}\n# bench round {round}\n"))?;
        let (status, t) = timed(|| agent.ctl("reload").status());
        if !status?.success() {
            bail!("datafence reload failed in round {round}");
        }
        times.push(t.as_secs_f64());
    }
    Ok(CatalogueReload {
        policy: "policies/eu-cloud.yaml".to_owned(),
        prefixes_v4: compiled.regions_v4.len(),
        prefixes_v6: compiled.regions_v6.len(),
        reload_s: summarize(&times),
    })
}

/// `datafence run` in the sandbox's host namespace on `up0`, without pinning or file
/// watching, ready once its control socket answers; stopped when dropped.
pub(crate) struct BenchAgent<'a> {
    pub(crate) sb: &'a Sandbox,
    pub(crate) bin: PathBuf,
    pub(crate) run_dir: PathBuf,
    pub(crate) child: std::process::Child,
    /// From spawn to the first answer on the control socket.
    pub(crate) ready: Duration,
}

impl<'a> BenchAgent<'a> {
    /// Starts the agent with its runtime directory and log in `dir`.
    pub(crate) fn start(
        sb: &'a Sandbox,
        args: &Args,
        policy: &Path,
        dir: &Path,
        extra: &[&str],
        deadline: Duration,
    ) -> Result<Self> {
        let log = dir.join("agent.log");
        let run_dir = dir.join("run");
        let mut cmd = command_in(&sb.host.name, &args.agent_bin);
        cmd.arg("--runtime-dir")
            .arg(&run_dir)
            .arg("run")
            .arg("--policy")
            .arg(policy)
            .args(["--no-pin", "--no-watch", "--interface", "up0"])
            .args(extra)
            .env_remove("SSH_CONNECTION")
            .env("DATAFENCE_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?);
        let started = Instant::now();
        let mut agent = Self {
            sb,
            bin: args.agent_bin.clone(),
            run_dir,
            child: cmd.spawn().context("starting datafence run")?,
            ready: Duration::ZERO,
        };
        while !agent.ctl("status").status().is_ok_and(|s| s.success()) {
            let exited = agent.child.try_wait()?;
            if exited.is_some() || started.elapsed() > deadline {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                bail!(
                    "datafence run not ready ({}): {}",
                    exited.map_or_else(
                        || format!("after {:.0}s", deadline.as_secs_f64()),
                        |s| format!("exited with {s}")
                    ),
                    log.chars().take(800).collect::<String>()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        agent.ready = started.elapsed();
        Ok(agent)
    }

    /// A `datafence <verb>` against this agent, output discarded.
    pub(crate) fn ctl(&self, verb: &str) -> Command {
        let mut c = command_in(&self.sb.host.name, &self.bin);
        c.arg("--runtime-dir")
            .arg(&self.run_dir)
            .arg(verb)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        c
    }
}

impl Drop for BenchAgent<'_> {
    fn drop(&mut self) {
        terminate(&self.child);
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies the files and directories under `from` to `to`.
fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}
