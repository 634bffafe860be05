//! Phase 2: end to end through a veth pair, through datafence and its competitors.

#![forbid(unsafe_code)]

use super::*;

pub(crate) fn rx_packets(ns: &str, dev: &str) -> Result<u64> {
    let out = in_ns(ns, "ip", &["-s", "-j", "link", "show", "dev", dev])?;
    let v: Value = serde_json::from_str(&out)?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .context("no rx packets in `ip -s -j link`")
}

/// The sandbox of the end-to-end runs: a default route from host to world, where a tc
/// ingress chain (nftables, netdev family) drops everything as cheaply as possible (the receive side shares the
/// sender's CPU over veth, so it must cost little).
pub(crate) fn e2e_sandbox() -> Result<Sandbox> {
    let sb = Sandbox::new("bench");
    sb.host.ip("route add default via 192.0.2.2");
    sb.host.ip("-6 route add default via 2001:db8:1::2");
    let sink =
        std::env::temp_dir().join(format!("datafence-bench-sink-{}.nft", std::process::id()));
    std::fs::write(
        &sink,
        "table netdev dfsink {\n  chain in {\n    type filter hook ingress device \"dn0\" priority 0; policy drop;\n  }\n}\n",
    )?;
    let loaded = in_ns(&sb.world.name, "nft", &["-f", &sink.to_string_lossy()]);
    let _ = std::fs::remove_file(&sink);
    loaded?;
    Ok(sb)
}

/// 1024 destinations, a fraction `hit` of them in prefixes of regions the user-data class
/// may not reach (which every filter drops), the rest in the benchmark range it may.
pub(crate) fn e2e_destinations(
    set: &PrefixSet,
    compiled: &CompiledPolicy,
    allowed_ids: &[u32],
    hit: f64,
    rng: &mut Rng,
) -> Vec<SocketAddrV4> {
    let hits = (E2E_DESTINATIONS as f64 * hit).round() as usize;
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
    let mut out = Vec::with_capacity(E2E_DESTINATIONS);
    let denied: Vec<Pfx> = set
        .v4
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| {
            let region = compiled.region_of(IpAddr::V4(Ipv4Addr::from(p.bits as u32)));
            !allowed_ids.contains(&region)
        })
        .collect();
    for i in 0..E2E_DESTINATIONS {
        let addr = if i < hits && !denied.is_empty() {
            let mut addr = Ipv4Addr::from(denied[rng.below(denied.len())].bits as u32);
            for _ in 0..100 {
                let p = denied[rng.below(denied.len())];
                let cand = Ipv4Addr::from(inside(p, 32, rng) as u32);
                let region = compiled.region_of(IpAddr::V4(cand));
                if !allowed_ids.contains(&region) {
                    addr = cand;
                    break;
                }
            }
            addr
        } else {
            Ipv4Addr::from(base + 1 + rng.below((1 << 17) - 2) as u32)
        };
        out.push(SocketAddrV4::new(addr, 443));
    }
    rng.shuffle(&mut out);
    out
}

/// One burst from the host namespace: packets per second, processed, refused.
pub(crate) fn burst(sb: &Sandbox, dests: &[SocketAddrV4], seconds: f64) -> Result<(f64, u64, u64)> {
    let d = dests.to_vec();
    let s = sb
        .host
        .run(move || blast(&d, Duration::from_secs_f64(seconds), None))?;
    Ok((
        s.processed as f64 / s.elapsed.as_secs_f64(),
        s.processed,
        s.refused,
    ))
}

/// Packets per second through a filter, and through no filter in alternation with it
/// (`toggle(false)` / `toggle(true)` switch it off and on), so that both see the same
/// machine; without a toggle only the filter is measured. The delivered and refused
/// fractions are those of the filter's bursts.
pub(crate) struct Measured {
    pub(crate) pps: Vec<f64>,
    pub(crate) baseline: Vec<f64>,
    pub(crate) delivered: f64,
    pub(crate) refused: f64,
}

pub(crate) fn measure(
    sb: &Sandbox,
    dests: &[SocketAddrV4],
    args: &Args,
    toggle: Option<&dyn Fn(bool) -> Result<()>>,
) -> Result<Measured> {
    // A short warm-up burst (caches, neighbour entries), not counted.
    burst(sb, dests, 0.1)?;
    let mut m = Measured {
        pps: Vec::new(),
        baseline: Vec::new(),
        delivered: 0.0,
        refused: 0.0,
    };
    let (mut processed, mut refused, mut received) = (0u64, 0u64, 0u64);
    for _ in 0..args.e2e_reps {
        if let Some(toggle) = toggle {
            toggle(false)?;
            m.baseline.push(burst(sb, dests, args.e2e_seconds)?.0);
            toggle(true)?;
        }
        let rx0 = rx_packets(&sb.world.name, "dn0")?;
        let (pps, p, r) = burst(sb, dests, args.e2e_seconds)?;
        received += rx_packets(&sb.world.name, "dn0")?.saturating_sub(rx0);
        m.pps.push(pps);
        processed += p;
        refused += r;
    }
    m.delivered = received as f64 / processed.max(1) as f64;
    m.refused = refused as f64 / processed.max(1) as f64;
    Ok(m)
}

/// Keeps a datafence datapath attached to `up0` in the host namespace until dropped.
pub(crate) struct Attached {
    pub(crate) stop: Option<mpsc::Sender<()>>,
    pub(crate) thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Attached {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What `attach` puts on the sender's uplink.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum TcProgram {
    /// datafence's TC egress program with the policy applied.
    Datafence,
    /// The empty program: the cost of the hook itself.
    Empty,
}

pub(crate) fn attach_datafence(ns: &NetNs, compiled: Arc<CompiledPolicy>) -> Result<Attached> {
    attach(ns, compiled, TcProgram::Datafence)
}

pub(crate) fn attach(
    ns: &NetNs,
    compiled: Arc<CompiledPolicy>,
    program: TcProgram,
) -> Result<Attached> {
    let path = format!("/run/netns/{}", ns.name);
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
    let (stop_tx, stop_rx) = mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        let setup = || -> Result<Datapath> {
            let file = File::open(&path)?;
            datafence_sandbox::enter(&file).context("setns")?;
            let empty = program == TcProgram::Empty;
            let mut dp = Datapath::load(&load_options(&compiled, empty))?;
            dp.apply(&compiled, EventLimits::default())?;
            if empty {
                dp.attach_bench_empty("up0")?;
            } else {
                dp.attach_tc("up0")?;
            }
            Ok(dp)
        };
        match setup() {
            Ok(dp) => {
                let _ = ready_tx.send(Ok(()));
                let _ = stop_rx.recv();
                drop(dp);
            }
            Err(e) => {
                let _ = ready_tx.send(Err(format!("{e:#}")));
            }
        }
    });
    let attached = Attached {
        stop: Some(stop_tx),
        thread: Some(thread),
    };
    ready_rx
        .recv()
        .context("datapath thread")?
        .map_err(|e| anyhow!(e))?;
    Ok(attached)
}
/// What every size of the end-to-end phase measures against.
#[derive(Clone, Copy)]
pub(crate) struct E2eSetting<'a> {
    pub(crate) sb: &'a Sandbox,
    pub(crate) cat: &'a Catalogue,
    pub(crate) args: &'a Args,
    pub(crate) budget: &'a Budget,
    pub(crate) memcg: Option<&'a MemCg>,
}

/// Where the end-to-end phase's rows go: one per filter and size, and the control-plane
/// figures (load and reload times, memory) of the competitors.
pub(crate) struct E2eRows<'a> {
    pub(crate) rows: &'a mut Vec<E2eRow>,
    pub(crate) control: &'a mut Vec<ControlRow>,
}

/// One size of the end-to-end phase: the destinations per hit rate, and what measuring a
/// filter and timing its control plane need.
struct E2eRun<'a> {
    sb: &'a Sandbox,
    args: &'a Args,
    n: usize,
    /// Per hit rate.
    dests: Vec<Vec<SocketAddrV4>>,
    host: String,
    dir: &'a Path,
    cap: Duration,
    memcg: Option<&'a MemCg>,
}

impl E2eRun<'_> {
    /// Each filter's rows; `baselines` are no-filter bursts measured just before, for a
    /// filter that cannot be switched off and on cheaply.
    fn record(
        &self,
        filter: &str,
        setup: Option<&DatafenceSetup>,
        toggle: Option<&dyn Fn(bool) -> Result<()>>,
        baselines: Option<&[Vec<f64>]>,
        rows: &mut Vec<E2eRow>,
    ) -> Result<()> {
        let (sb, args, n, dests) = (self.sb, self.args, self.n, &self.dests);
        for (i, hit) in HIT_RATES.iter().enumerate() {
            let m = measure(sb, &dests[i], args, toggle)?;
            let baseline = match baselines {
                Some(b) => summarize(&b[i]),
                None => summarize(&m.baseline),
            };
            let pps = summarize(&m.pps);
            rows.push(E2eRow::Measured(E2eFigures {
                size: n,
                filter: filter.to_owned(),
                hit_rate: *hit,
                pps,
                paired_no_filter_pps: baseline,
                vs_paired_no_filter: ratio(pps, baseline),
                delivered_fraction: m.delivered,
                refused_by_sendmmsg_fraction: m.refused,
                setup: setup.cloned(),
            }));
        }
        Ok(())
    }

    /// The row of a filter that could not be set up.
    fn failed(&self, filter: &str, error: String) -> E2eRow {
        E2eRow::Failed {
            size: self.n,
            filter: Some(filter.to_owned()),
            error,
        }
    }

    /// No-filter bursts per hit rate, for a filter that cannot be switched off and on
    /// cheaply: they run right before it is attached.
    fn paired_baselines(&self) -> Result<Vec<Vec<f64>>> {
        self.dests
            .iter()
            .map(|d| {
                (0..self.args.e2e_reps)
                    .map(|_| Ok(burst(self.sb, d, self.args.e2e_seconds)?.0))
                    .collect()
            })
            .collect()
    }
}

pub(crate) fn e2e_size(
    setting: E2eSetting<'_>,
    n: usize,
    compiled: Option<Arc<CompiledPolicy>>,
    out: E2eRows<'_>,
) -> Result<()> {
    let E2eSetting {
        sb,
        cat,
        args,
        budget,
        memcg,
    } = setting;
    let E2eRows { rows, control } = out;
    let set = prefix_set(cat, Shape::Real, n);
    let compiled = if let Some(c) = compiled {
        c
    } else {
        let files = write_policy(cat, &set, &format!("bench-e2e-{n}"))?;
        Arc::new(parse_policy(&files.path, n)?.compile())
    };
    let dests = e2e_hit_rate_destinations(cat, &set, &compiled, n);
    let scratch = Scratch::new(&format!("bench-e2e-{n}"));
    let run = E2eRun {
        sb,
        args,
        n,
        dests,
        host: sb.host.name.clone(),
        dir: &scratch.dir,
        cap: args.load_cap.min(budget.left().mul_f64(0.5)),
        memcg,
    };

    run.record("none", None, None, None, rows)?;
    e2e_ebpf_filters(&run, &compiled, rows)?;
    e2e_nft(&run, &set, rows, control)?;
    e2e_ipset(&run, &set, rows, control)?;
    Ok(())
}

/// The destinations for each of [`HIT_RATES`]: that share of them in an allowed region.
fn e2e_hit_rate_destinations(
    cat: &Catalogue,
    set: &PrefixSet,
    compiled: &CompiledPolicy,
    n: usize,
) -> Vec<Vec<SocketAddrV4>> {
    let allowed_name = if cat.regions.iter().any(|r| r == "eu") {
        "eu"
    } else {
        cat.regions[0].as_str()
    };
    let allowed_index = cat
        .regions
        .iter()
        .position(|r| r == allowed_name)
        .unwrap_or(0);
    // Region ids: bench-allowed is 1, the catalogue's regions follow.
    let allowed_ids = [1u32, allowed_index as u32 + 2];
    let mut rng = Rng(0xe2e ^ n as u64);
    HIT_RATES
        .iter()
        .map(|&h| e2e_destinations(set, compiled, &allowed_ids, h, &mut rng))
        .collect()
}

/// The TC filters of our own: the empty program, then datafence.
fn e2e_ebpf_filters(
    run: &E2eRun<'_>,
    compiled: &Arc<CompiledPolicy>,
    rows: &mut Vec<E2eRow>,
) -> Result<()> {
    // The empty program: how much of any TC filter's cost is the hook itself.
    let baselines = run.paired_baselines()?;
    match attach(&run.sb.host, compiled.clone(), TcProgram::Empty) {
        Ok(attached) => {
            run.record("empty-tc", None, None, Some(&baselines), rows)?;
            drop(attached);
        }
        Err(e) => rows.push(run.failed("empty-tc", format!("{e:#}"))),
    }

    let baselines = run.paired_baselines()?;
    match timed(|| attach_datafence(&run.sb.host, compiled.clone())) {
        (Ok(attached), t) => {
            let setup = DatafenceSetup {
                load_apply_attach_s: t.as_secs_f64(),
                v4_table: v4_table(compiled),
            };
            run.record("datafence", Some(&setup), None, Some(&baselines), rows)?;
            drop(attached);
        }
        (Err(e), _) => rows.push(run.failed("datafence", format!("{e:#}"))),
    }

    Ok(())
}

/// nftables: an interval set per family, dropped in an output chain.
fn e2e_nft(
    run: &E2eRun<'_>,
    set: &PrefixSet,
    rows: &mut Vec<E2eRow>,
    control: &mut Vec<ControlRow>,
) -> Result<()> {
    let (nft_load, nft_reload) = nft_files(run.dir, set)?;
    let load_arg = nft_load.to_string_lossy().into_owned();
    let reload_arg = nft_reload.to_string_lossy().into_owned();
    let mut loads = Vec::new();
    let mut reloads = Vec::new();
    let mut mem = Vec::new();
    let mut nft_error = None;
    let mut nft_loaded = false;
    for rep in 0..3 {
        if rep > 0 {
            let _ = in_ns(&run.host, "nft", &["delete", "table", "inet", "dfbench"]);
            std::thread::sleep(Duration::from_millis(50));
        }
        match control_op(
            &run.host,
            "nft",
            &["-f", &load_arg],
            run.dir,
            run.cap,
            run.memcg,
        ) {
            Ok((t, m)) => {
                loads.push(t.as_secs_f64());
                if let Some(m) = m {
                    mem.push(m as f64);
                }
                nft_loaded = true;
            }
            Err(e) => {
                nft_error = Some(format!("load: {e:#}"));
                nft_loaded = false;
                break;
            }
        }
        match control_op(
            &run.host,
            "nft",
            &["-f", &reload_arg],
            run.dir,
            run.cap,
            run.memcg,
        ) {
            Ok((t, _)) => reloads.push(t.as_secs_f64()),
            Err(e) => {
                nft_error = Some(format!("reload: {e:#}"));
                break;
            }
        }
        // Large sets are loaded once: the rest of the budget is worth more.
        if loads.iter().sum::<f64>() + reloads.iter().sum::<f64>() > 3.0 {
            break;
        }
    }
    let elements = in_ns(
        &run.host,
        "nft",
        &["-j", "list", "set", "inet", "dfbench", "deny4"],
    )
    .ok()
    .and_then(|s| serde_json::from_str::<Value>(&s).ok())
    .and_then(|v| {
        v["nftables"]
            .as_array()?
            .iter()
            .find_map(|o| o["set"]["elem"].as_array().map(Vec::len))
    });
    control.push(ControlRow::Nft {
        common: CompetitorControl {
            size: run.n,
            load_s: summarize(&loads),
            reload_s: summarize(&reloads),
            memcg_bytes: summarize(&mem),
            error: nft_error.clone(),
        },
        v4_elements_after_auto_merge: elements,
    });
    if nft_loaded {
        let toggle = |on: bool| -> Result<()> {
            if on {
                in_ns(
                    &run.host,
                    "nft",
                    &[
                        "add", "rule", "inet", "dfbench", "out", "ip", "daddr", "@deny4", "drop",
                    ],
                )?;
                in_ns(
                    &run.host,
                    "nft",
                    &[
                        "add", "rule", "inet", "dfbench", "out", "ip6", "daddr", "@deny6", "drop",
                    ],
                )?;
            } else {
                in_ns(
                    &run.host,
                    "nft",
                    &["flush", "chain", "inet", "dfbench", "out"],
                )?;
            }
            Ok(())
        };
        run.record("nft-set", None, Some(&toggle), None, rows)?;
    } else {
        rows.push(run.failed("nft-set", nft_error.unwrap_or_default()));
    }
    let _ = in_ns(&run.host, "nft", &["delete", "table", "inet", "dfbench"]);

    Ok(())
}

/// iptables + ipset hash:net.
fn e2e_ipset(
    run: &E2eRun<'_>,
    set: &PrefixSet,
    rows: &mut Vec<E2eRow>,
    control: &mut Vec<ControlRow>,
) -> Result<()> {
    let (ips_load, ips_reload) = ipset_files(run.dir, set)?;
    let load_arg = ips_load.to_string_lossy().into_owned();
    let reload_arg = ips_reload.to_string_lossy().into_owned();
    let mut loads = Vec::new();
    let mut reloads = Vec::new();
    let mut mem = Vec::new();
    let mut ipset_error = None;
    let mut ipset_loaded = false;
    let rules = |op: &str| -> Result<()> {
        in_ns(
            &run.host,
            "iptables",
            &[
                op,
                "OUTPUT",
                "-m",
                "set",
                "--match-set",
                "deny4",
                "dst",
                "-j",
                "DROP",
            ],
        )?;
        in_ns(
            &run.host,
            "ip6tables",
            &[
                op,
                "OUTPUT",
                "-m",
                "set",
                "--match-set",
                "deny6",
                "dst",
                "-j",
                "DROP",
            ],
        )?;
        Ok(())
    };
    for rep in 0..3 {
        if rep > 0 {
            let _ = rules("-D");
            let _ = in_ns(&run.host, "ipset", &["destroy"]);
            std::thread::sleep(Duration::from_millis(50));
        }
        let start = Instant::now();
        match control_op(
            &run.host,
            "ipset",
            &["restore", "-file", &load_arg],
            run.dir,
            run.cap,
            run.memcg,
        )
        .and_then(|(_, m)| rules("-A").map(|()| m))
        {
            Ok(m) => {
                loads.push(start.elapsed().as_secs_f64());
                if let Some(m) = m {
                    mem.push(m as f64);
                }
                ipset_loaded = true;
            }
            Err(e) => {
                ipset_error = Some(format!("load: {e:#}"));
                ipset_loaded = false;
                break;
            }
        }
        match control_op(
            &run.host,
            "ipset",
            &["restore", "-file", &reload_arg],
            run.dir,
            run.cap,
            run.memcg,
        ) {
            Ok((t, _)) => reloads.push(t.as_secs_f64()),
            Err(e) => {
                ipset_error = Some(format!("reload: {e:#}"));
                break;
            }
        }
        if loads.iter().sum::<f64>() + reloads.iter().sum::<f64>() > 3.0 {
            break;
        }
    }
    control.push(ControlRow::Ipset {
        common: CompetitorControl {
            size: run.n,
            load_s: summarize(&loads),
            reload_s: summarize(&reloads),
            memcg_bytes: summarize(&mem),
            error: ipset_error.clone(),
        },
        ipset_size_in_memory_bytes: ipset_memory(&run.host),
    });
    if ipset_loaded {
        let toggle = |on: bool| rules(if on { "-A" } else { "-D" });
        run.record("iptables+ipset", None, Some(&toggle), None, rows)?;
    } else {
        rows.push(run.failed("iptables+ipset", ipset_error.unwrap_or_default()));
    }
    let _ = rules("-D");
    let _ = in_ns(&run.host, "ipset", &["destroy"]);
    Ok(())
}
