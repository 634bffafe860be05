//! Phase 1: the datapath under `BPF_PROG_TEST_RUN`, and datafence's control plane.

#![forbid(unsafe_code)]

use super::*;

pub(crate) struct TestFrame {
    pub(crate) bytes: Vec<u8>,
    pub(crate) mark: u32,
}

/// 64 frames per family: user data (TCP/443, marked) and other traffic (UDP/53), to
/// destinations in a region (hits) and in none (misses), half each.
pub(crate) fn make_frames(
    set: &PrefixSet,
    compiled: &CompiledPolicy,
    rng: &mut Rng,
) -> [Vec<TestFrame>; 2] {
    let mut out = [Vec::new(), Vec::new()];
    for (family, list, width) in [(0usize, &set.v4, 32u8), (1, &set.v6, 128)] {
        for i in 0..FRAMES_PER_FAMILY {
            let user = i % 2 == 0;
            let hit = (i / 2) % 2 == 0;
            let dst = if hit && !list.is_empty() {
                let (p, _) = list[rng.below(list.len())];
                inside(p, width, rng)
            } else {
                // A random public address that no region holds.
                let mut addr = 0;
                for _ in 0..1000 {
                    let cand = rng.u128() & mask(width, width);
                    let cand_pfx = Pfx {
                        bits: cand,
                        len: width,
                    };
                    if special(cand_pfx, width) {
                        continue;
                    }
                    addr = cand;
                    if compiled.region_of(to_ip(cand, width)) == 0 {
                        break;
                    }
                }
                addr
            };
            let (src, dst) = if width == 32 {
                (IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), to_ip(dst, width))
            } else {
                (
                    IpAddr::V6("2001:db8:1::1".parse().expect("constant")),
                    to_ip(dst, width),
                )
            };
            let mut spec = Spec::new(src, dst);
            if user {
                spec.protocol = frames::TCP;
                spec.dst_port = 443;
            } else {
                spec.protocol = frames::UDP;
                spec.dst_port = 53;
            }
            spec.src_port = 40000 + i as u16;
            out[family].push(TestFrame {
                bytes: spec.build().bytes,
                mark: if user { USER_MARK } else { 0 },
            });
        }
    }
    out
}

pub(crate) fn to_ip(bits: u128, width: u8) -> IpAddr {
    if width == 32 {
        IpAddr::V4(Ipv4Addr::from(bits as u32))
    } else {
        IpAddr::V6(Ipv6Addr::from(bits))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prog {
    Floor,
    Lpm,
    Tc,
    Xdp,
    /// The TC entry's parse and job post, without the jump.
    ParsePost,
    /// The same and the tail call into a stage that takes the job back: the split's
    /// cost is this less `ParsePost`.
    Handoff,
}

/// The order of each family's figures in [`HotRuns`], which `hot_figures` names.
pub(crate) const PROGS: [Prog; 6] = [
    Prog::Floor,
    Prog::Lpm,
    Prog::Tc,
    Prog::Xdp,
    Prog::ParsePost,
    Prog::Handoff,
];

/// Per family, per program of [`PROGS`]: the mean ns per packet over the frames.
pub(crate) type HotRuns = [[Option<Summary>; PROGS.len()]; 2];

pub(crate) fn ns_per_packet(
    dp: &Datapath,
    prog: Prog,
    family: usize,
    frame: &TestFrame,
    repeat: u32,
) -> Result<f64> {
    let d = match prog {
        Prog::Floor => dp.bench_run(BenchProgram::Empty, &frame.bytes, repeat)?,
        Prog::Lpm => {
            let p = if family == 0 {
                BenchProgram::LpmOnlyV4
            } else {
                BenchProgram::LpmOnlyV6
            };
            dp.bench_run(p, &frame.bytes, repeat)?
        }
        Prog::Tc => {
            dp.test_run_repeat(Hook::TcEgress, &frame.bytes, frame.mark, repeat)?
                .1
        }
        Prog::Xdp => dp.test_run_repeat(Hook::Xdp, &frame.bytes, 0, repeat)?.1,
        Prog::ParsePost => dp.bench_run(BenchProgram::ParsePost, &frame.bytes, repeat)?,
        Prog::Handoff => dp.bench_run(BenchProgram::Handoff, &frame.bytes, repeat)?,
    };
    Ok(d.as_nanos() as f64)
}

/// Hot figures: [family][prog] summaries of the mean ns per packet over the frames.
pub(crate) fn hot_runs(
    dp: &Datapath,
    frames: &[Vec<TestFrame>; 2],
    args: &Args,
) -> Result<HotRuns> {
    let mut samples = vec![vec![Vec::new(); PROGS.len()]; 2];
    for _ in 0..args.rounds {
        for (pi, prog) in PROGS.iter().enumerate() {
            for (family, list) in frames.iter().enumerate() {
                let mut total = 0.0;
                for frame in list {
                    total += ns_per_packet(dp, *prog, family, frame, args.repeat)?;
                }
                samples[family][pi].push(total / list.len() as f64);
            }
        }
    }
    let mut out = [[None; PROGS.len()]; 2];
    for family in 0..2 {
        for pi in 0..PROGS.len() {
            out[family][pi] = summarize(&samples[family][pi]);
        }
    }
    Ok(out)
}

/// Per family [LPM, datafence] ns per lookup, and the empty loop's ns per run.
pub(crate) type ColdRuns = ([[Option<Summary>; 2]; 2], Option<Summary>);

/// Cold figures: ns per lookup beyond the loop's floor, [family][lpm, datafence].
pub(crate) fn cold_runs(
    dp: &Datapath,
    frames: &[Vec<TestFrame>; 2],
    args: &Args,
) -> Result<ColdRuns> {
    let programs = [
        [BenchProgram::ColdLpmV4, BenchProgram::ColdRegionV4],
        [BenchProgram::ColdLpmV6, BenchProgram::ColdRegionV6],
    ];
    let mut samples = vec![vec![Vec::new(); 2]; 2];
    let mut floors = Vec::new();
    let per = f64::from(COLD_LOOKUPS_PER_RUN);
    for _ in 0..args.rounds {
        let frame = &frames[0][0].bytes;
        let floor = dp
            .bench_run(BenchProgram::ColdFloor, frame, args.cold_repeat)?
            .as_nanos() as f64;
        floors.push(floor);
        for (family, pair) in programs.iter().enumerate() {
            for (k, prog) in pair.iter().enumerate() {
                let ns = dp
                    .bench_run(*prog, &frames[family][0].bytes, args.cold_repeat)?
                    .as_nanos() as f64;
                samples[family][k].push((ns - floor) / per);
            }
        }
    }
    let mut out = [[None; 2]; 2];
    for family in 0..2 {
        for k in 0..2 {
            out[family][k] = summarize(&samples[family][k]);
        }
    }
    Ok((out, summarize(&floors)))
}

pub(crate) fn map_memory_figures(mem: &[(String, u64)]) -> (BTreeMap<String, u64>, u64, u64) {
    let total: u64 = mem.iter().map(|(_, b)| b).sum();
    let policy: u64 = mem
        .iter()
        .filter(|(name, _)| !name.to_ascii_uppercase().starts_with("BENCH"))
        .map(|(_, b)| b)
        .sum();
    let per_map = mem.iter().map(|(name, b)| (name.clone(), *b)).collect();
    (per_map, total, policy)
}

/// The LPM baseline tries' kernel memory, per family, from the maps' memory.
fn bench_lpm_kernel_bytes(mem: &[(String, u64)]) -> PerFamily<Option<u64>> {
    let bytes_of = |name: &str| mem.iter().find(|(n, _)| n == name).map(|(_, b)| *b);
    PerFamily {
        ipv4: bytes_of(map_names::BENCH_LPM_V4),
        ipv6: bytes_of(map_names::BENCH_LPM_V6),
    }
}

pub(crate) struct DatapathCase {
    pub(crate) shape: Shape,
    pub(crate) size: usize,
    pub(crate) row: DatapathRow,
}

pub(crate) fn datapath_case(
    cat: &Catalogue,
    shape: Shape,
    n: usize,
    args: &Args,
    memcg: Option<&MemCg>,
) -> Result<(DatapathFigures, Option<Arc<CompiledPolicy>>)> {
    let set = prefix_set(cat, shape, n);
    let files = write_policy(cat, &set, &format!("bench-{}-{n}", shape.name()))?;
    let (loaded, parse_t) = timed(|| parse_policy(&files.path, n));
    let loaded = loaded?;
    let (compiled, compile_t) = timed(|| loaded.compile());
    drop(loaded);
    let compiled = Arc::new(compiled);

    // Control plane: fresh loads; small policies several times, large ones once.
    let reps = match n {
        0..=10_000 => 5,
        10_001..=200_000 => 3,
        _ => 1,
    };
    let (control, mut dp) = control_runs(&compiled, reps, memcg)?;

    // The baseline tries hold the same prefixes and region ids as datafence's tables.
    let (filled, fill_t) = timed(|| dp.fill_bench_lpm(&compiled.regions_v4, &compiled.regions_v6));
    filled.context("filling the LPM baseline tries")?;
    // Read now: the control runs read every map before the fill, with the tries empty.
    let lpm_bytes = bench_lpm_kernel_bytes(&dp.map_memory());

    let mut rng = Rng(0x00f4_a3e5 ^ n as u64);
    let frames = make_frames(&set, &compiled, &mut rng);
    let (runs, run_t) = timed(|| -> Result<_> {
        let hot = hot_runs(&dp, &frames, args)?;
        let cold = cold_runs(&dp, &frames, args)?;
        Ok((hot, cold))
    });
    let (hot, (cold, cold_floor)) = runs?;
    drop(dp);
    eprintln!(
        "         parse {:.2}s, compile {:.2}s, {reps}× load+apply+reload {:.1}s, LPM fill {:.1}s, runs {:.1}s",
        parse_t.as_secs_f64(),
        compile_t.as_secs_f64(),
        control.object_t.iter().sum::<f64>() / 1e3
            + control.apply_t.iter().sum::<f64>()
            + control.reload_t.iter().sum::<f64>(),
        fill_t.as_secs_f64(),
        run_t.as_secs_f64(),
    );

    let figures = DatapathFigures {
        shape: shape.name().to_owned(),
        size: n,
        prefixes_v4: compiled.regions_v4.len(),
        prefixes_v6: compiled.regions_v6.len(),
        v4_table: v4_table(&compiled),
        frames: FRAMES_PER_FAMILY * 2,
        repeat: args.repeat,
        rounds: args.rounds,
        hot: hot_figures(&hot),
        cold: cold_figures(&cold, cold_floor),
        control: ControlFigures {
            parse_validate_s: parse_t.as_secs_f64(),
            compile_s: compile_t.as_secs_f64(),
            object_load_ms: summarize(&control.object_t),
            apply_s: summarize(&control.apply_t),
            reload_s: summarize(&control.reload_t),
            kernel_bytes_one_slot: summarize(&control.kernel_one),
            kernel_bytes_both_slots: summarize(&control.kernel_two),
            kernel_bytes_steady: summarize(&control.kernel_steady),
            kernel_bytes_per_map: control.per_map,
            memcg_bytes: summarize(&control.memcg_delta),
            rss_peak_growth_bytes: summarize(&control.rss_peak),
            bench_lpm_fill_s: fill_t.as_secs_f64(),
            bench_lpm_kernel_bytes: lpm_bytes,
        },
    };
    drop(files.scratch);
    let keep = (shape == Shape::Real).then_some(compiled);
    Ok((figures, keep))
}

/// The control plane's figures over `reps` fresh loads: times, kernel and process memory.
struct ControlRuns {
    object_t: Vec<f64>,
    apply_t: Vec<f64>,
    reload_t: Vec<f64>,
    kernel_one: Vec<f64>,
    kernel_two: Vec<f64>,
    kernel_steady: Vec<f64>,
    memcg_delta: Vec<f64>,
    rss_peak: Vec<f64>,
    per_map: BTreeMap<String, u64>,
}

/// Loads the datapath `reps` times, applying and reloading the policy each time, and
/// returns the figures and the last datapath.
fn control_runs(
    compiled: &Arc<CompiledPolicy>,
    reps: usize,
    memcg: Option<&MemCg>,
) -> Result<(ControlRuns, Datapath)> {
    let limits = EventLimits::default();
    let mut object_t = Vec::new();
    let mut apply_t = Vec::new();
    let mut reload_t = Vec::new();
    let mut kernel_one = Vec::new();
    let mut kernel_two = Vec::new();
    let mut kernel_steady = Vec::new();
    let mut memcg_delta = Vec::new();
    let mut rss_peak = Vec::new();
    let mut per_map = BTreeMap::new();
    let mut dp = None;
    for rep in 0..reps {
        drop(dp.take()); // free the previous datapath first
        std::thread::sleep(Duration::from_millis(50));
        let joined = memcg.is_some_and(MemCg::enter_thread);
        let before = memcg.and_then(MemCg::usage);
        let rss_before = proc_status_kib("self", "VmRSS:").unwrap_or(0);
        reset_peak_rss();
        let (loaded, t) = timed(|| Datapath::load(&load_options(compiled, true)));
        let mut d = loaded.context("loading the datapath")?;
        object_t.push(t.as_secs_f64() * 1e3);
        let (applied, t) = timed(|| d.apply(compiled, limits));
        applied.context("applying the policy")?;
        apply_t.push(t.as_secs_f64());
        let mem = d.map_memory();
        let (maps, _, policy_bytes) = map_memory_figures(&mem);
        kernel_one.push(policy_bytes as f64);
        if joined && let (Some(b), Some(a)) = (before, memcg.and_then(MemCg::usage)) {
            memcg_delta.push(a.saturating_sub(b) as f64);
        }
        let peak = proc_status_kib("self", "VmHWM:").unwrap_or(0);
        rss_peak.push(peak.saturating_sub(rss_before) as f64 * 1024.0);
        if joined && let Some(m) = memcg {
            m.leave_thread();
        }
        let (reloaded, t) = timed(|| d.apply(compiled, limits));
        reloaded.context("reloading the policy")?;
        reload_t.push(t.as_secs_f64());
        let (_, _, both) = map_memory_figures(&d.map_memory());
        kernel_two.push(both as f64);
        // Once no packet can read the slot the reload left, the agent frees it.
        std::thread::sleep(datafence::datapath::SLOT_GRACE);
        d.release_retired_slot()
            .context("releasing the retired slot")?;
        let (_, _, steady) = map_memory_figures(&d.map_memory());
        kernel_steady.push(steady as f64);
        if rep + 1 == reps {
            per_map = maps;
        }
        dp = Some(d);
    }
    let dp = dp.context("no datapath")?;
    let control = ControlRuns {
        object_t,
        apply_t,
        reload_t,
        kernel_one,
        kernel_two,
        kernel_steady,
        memcg_delta,
        rss_peak,
        per_map,
    };
    Ok((control, dp))
}

/// The hot figures per family: each program's ns and the ratios between them.
fn hot_figures(hot: &HotRuns) -> PerFamily<HotFigures> {
    let family = |h: [Option<Summary>; PROGS.len()]| {
        let [floor, lpm, tc, xdp, parse_post, handoff] = h;
        HotFigures {
            floor_ns: floor,
            lpm_only_ns: lpm,
            tc_full_ns: tc,
            xdp_full_ns: xdp,
            tc_parse_post_ns: parse_post,
            tc_handoff_ns: handoff,
            tc_vs_floor: ratio(tc, floor),
            tc_vs_lpm: ratio(tc, lpm),
            xdp_vs_floor: ratio(xdp, floor),
            xdp_vs_lpm: ratio(xdp, lpm),
        }
    };
    PerFamily {
        ipv4: family(hot[0]),
        ipv6: family(hot[1]),
    }
}

/// The cold figures per family, with the loop's floor.
fn cold_figures(cold: &[[Option<Summary>; 2]; 2], cold_floor: Option<Summary>) -> ColdFigures {
    let family = |[lpm, datafence]: [Option<Summary>; 2]| ColdFamily {
        lpm_ns_per_lookup: lpm,
        datafence_ns_per_lookup: datafence,
        lpm_over_datafence: ratio(lpm, datafence),
    };
    ColdFigures {
        ipv4: family(cold[0]),
        ipv6: family(cold[1]),
        loop_floor_ns_per_run: cold_floor,
        lookups_per_run: COLD_LOOKUPS_PER_RUN,
    }
}
