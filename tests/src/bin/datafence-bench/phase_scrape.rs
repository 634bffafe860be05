//! Whether scraping /metrics delays the agent's event reader.

use super::*;

/// Probes per round of the event reader's delay, and rounds of each condition
/// (interleaved, so that other work on the machine weighs on both alike).
pub(crate) const READER_PROBES: u32 = 100;
pub(crate) const READER_ROUNDS: u16 = 3;
/// Scrapes per second of /metrics while the reader is measured, by this many clients.
const SCRAPES_PER_S: u32 = 100;
const SCRAPERS: u32 = 20;
/// Where the agent serves /metrics in this phase.
const METRICS: &str = "127.0.0.1:9477";

/// Whether scraping /metrics delays the event reader: the time from sending a denied
/// packet (a new flow each, so each gets a line at once) to the time the agent's
/// reader stamps on its violation line, with no scrapes and with 100 scrapes per
/// second. Scrapes render a published snapshot and never take the agent's lock, so the
/// two should match. Milliseconds, to the millisecond of the line's time stamp.
pub(crate) fn scrape_interference(sb: &Sandbox, args: &Args) -> Result<ScrapeInterference> {
    let scratch = Scratch::new("bench-scrape");
    let policy = scratch.write(
        "policy.yaml",
        "version: 1\nregions:\n  eu-west:\n    cidrs: [198.51.100.0/24]\n  us-east:\n    cidrs: [203.0.113.0/24]\n\
         data_classes:\n  user-data:\n    match:\n      marks: [{value: 0x42}]\n    allow: [eu-west]\n",
    );
    let lines = scratch.dir.join("violations.jsonl");
    let lines_arg = lines.to_string_lossy().into_owned();
    let agent = BenchAgent::start(
        sb,
        args,
        &policy,
        &scratch.dir,
        &["--metrics-addr", METRICS, "--violations-file", &lines_arg],
        Duration::from_mins(1),
    )?;
    let ns = sb.host.name.clone();
    // Let the agent's start-up work (first attachment check, freeing the policy build)
    // finish before measuring.
    std::thread::sleep(Duration::from_secs(2));
    // Per condition: delays (ms), scrape times (ms), seconds measured.
    let mut pooled: [(Vec<f64>, Vec<f64>, f64); 2] = Default::default();
    for (round, scrape) in (0..READER_ROUNDS).flat_map(|r| [(r, false), (r, true)]) {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Twenty scrapers at five scrapes a second each, staggered: 100 a second. (A
        // scrape waits up to 100 ms for a snapshot taken after it asked.)
        let scrapers = spawn_scrapers(&ns, &stop, if scrape { SCRAPERS } else { 0 });
        let window = Instant::now();
        std::thread::sleep(Duration::from_millis(300));
        let base_port: u16 = 20_000 + (round * 2 + u16::from(scrape)) * 1000;
        let sent = sb
            .host
            .run(move || -> Result<Vec<(u16, std::time::SystemTime)>> {
                let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
                set_mark(&sock, 0x42)?;
                let mut sent = Vec::new();
                for i in 0..READER_PROBES as u16 {
                    let port = base_port + i;
                    sent.push((port, std::time::SystemTime::now()));
                    let _ = sock.send_to(b"probe", ("203.0.113.10", port));
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(sent)
            })?;
        std::thread::sleep(Duration::from_millis(500));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let window = window.elapsed().as_secs_f64();
        let mut scrape_ms = Vec::new();
        for t in scrapers {
            scrape_ms.extend(t.join().map_err(|_| anyhow!("scraper panicked"))?);
        }
        let delays = reader_delays(&lines, &sent)?;
        let acc = &mut pooled[usize::from(scrape)];
        acc.0.extend(delays);
        acc.1.extend(scrape_ms);
        acc.2 += window;
    }
    let [idle, scraped] =
        pooled.map(|(delays, scrape_ms, window)| condition_row(&delays, &scrape_ms, window));
    drop(agent);
    Ok(ScrapeInterference { idle, scraped })
}

/// Starts `n` scraper threads in namespace `ns`, staggered so that together they scrape
/// /metrics `SCRAPES_PER_S` times a second until `stop`; each returns its scrape times
/// (ms).
fn spawn_scrapers(
    ns: &str,
    stop: &Arc<std::sync::atomic::AtomicBool>,
    n: u32,
) -> Vec<std::thread::JoinHandle<Vec<f64>>> {
    (0..n)
        .map(|k| {
            let (ns, stop) = (ns.to_owned(), stop.clone());
            std::thread::spawn(move || {
                integration_tests::netns::run_in(&ns, move || {
                    let mut times = Vec::new();
                    let every = Duration::from_secs(u64::from(SCRAPERS)) / SCRAPES_PER_S;
                    let mut next = Instant::now() + every * k / SCRAPERS;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::thread::sleep(next.saturating_duration_since(Instant::now()));
                        next += every;
                        let (answer, t) = timed(|| {
                            integration_tests::http::get_here(
                                METRICS.parse().expect("addr"),
                                "/metrics",
                                &[("Accept", "application/openmetrics-text")],
                            )
                        });
                        if answer.is_ok_and(|a| a.status == 200) {
                            times.push(t.as_secs_f64() * 1e3);
                        }
                    }
                    times
                })
            })
        })
        .collect()
}

/// The reader's delay (ms) for each sent probe that has a violation line: from sending
/// to the line's `time`.
fn reader_delays(
    lines: &std::path::Path,
    sent: &[(u16, std::time::SystemTime)],
) -> Result<Vec<f64>> {
    // The line's `time` is when the reader handled the event (UTC, milliseconds).
    let text = std::fs::read_to_string(lines).context("violations file")?;
    let stamped: std::collections::HashMap<u64, String> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Some((v["dst_port"].as_u64()?, v["time"].as_str()?.to_owned())))
        .collect();
    let delays: Vec<f64> = sent
        .iter()
        .filter_map(|(port, at)| {
            let line = humantime_ms(stamped.get(&u64::from(*port))?)?;
            let sent_ms = at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as f64;
            Some(line - sent_ms)
        })
        .collect();
    Ok(delays)
}

/// One condition's row: the reader's delays and the scrapes made meanwhile.
fn condition_row(delays: &[f64], scrape_ms: &[f64], window: f64) -> ReaderFigures {
    let mut sorted = delays.to_vec();
    sorted.sort_by(f64::total_cmp);
    let p99 = sorted
        .get((sorted.len() * 99 / 100).min(sorted.len().saturating_sub(1)))
        .copied();
    ReaderFigures {
        probes: READER_PROBES * u32::from(READER_ROUNDS),
        lines: delays.len(),
        reader_delay_ms: summarize(delays),
        reader_delay_p99_ms: p99,
        scrapes: scrape_ms.len(),
        scrapes_per_s: scrape_ms.len() as f64 / window,
        scrape_ms: summarize(scrape_ms),
    }
}

/// Milliseconds since the epoch of an RFC 3339 UTC time stamp with milliseconds, as the
/// agent writes them (`2026-12-01T15:00:24.592Z`).
fn humantime_ms(stamp: &str) -> Option<f64> {
    let (date, time) = stamp.strip_suffix('Z')?.split_once('T')?;
    let mut ymd = date.split('-').map(str::parse::<i64>);
    let (y, m, day) = (ymd.next()?.ok()?, ymd.next()?.ok()?, ymd.next()?.ok()?);
    let mut hms = time.split(':');
    let (h, min) = (
        hms.next()?.parse::<i64>().ok()?,
        hms.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = hms.next()?.parse().ok()?;
    // Days since the epoch (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * ((m + 9) % 12) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + h * 3600 + min * 60) as f64 + sec) * 1e3)
}
