//! The command line.

#![forbid(unsafe_code)]

use super::*;

pub(crate) struct Args {
    pub(crate) quick: bool,
    pub(crate) sizes: Vec<usize>,
    pub(crate) phases: Vec<String>,
    pub(crate) out: PathBuf,
    pub(crate) regions: PathBuf,
    pub(crate) agent_bin: PathBuf,
    pub(crate) budget: Duration,
    pub(crate) rounds: usize,
    pub(crate) repeat: u32,
    pub(crate) cold_repeat: u32,
    pub(crate) e2e_seconds: f64,
    pub(crate) e2e_reps: usize,
    pub(crate) cpu_samples: usize,
    pub(crate) cpu_seconds: f64,
    pub(crate) load_cap: Duration,
    pub(crate) commit: Option<String>,
}

pub(crate) fn parse_size(s: &str) -> Result<usize> {
    let s = s.trim().to_ascii_lowercase();
    let (digits, factor) = if let Some(d) = s.strip_suffix('m') {
        (d, 1_000_000)
    } else if let Some(d) = s.strip_suffix('k') {
        (d, 1_000)
    } else {
        (s.as_str(), 1)
    };
    let n: usize = digits
        .parse()
        .with_context(|| format!("size {s:?}: expected e.g. 10, 1k, 100k, 1m"))?;
    if n == 0 {
        bail!("size {s:?} must be positive");
    }
    Ok(n * factor)
}

impl Args {
    pub(crate) fn parse() -> Result<Self> {
        let raw: Vec<String> = std::env::args().skip(1).collect();
        let mut quick = false;
        let mut sizes = None;
        let mut phases = None;
        let mut out = PathBuf::from("target/bench/results.json");
        let mut regions = PathBuf::from("policies/regions/cloud");
        let mut agent_bin = None;
        let mut budget = 360.0;
        let mut rounds = None;
        let mut repeat = None;
        let mut e2e_seconds = None;
        let mut load_cap = 120.0;
        let mut commit = None;
        let mut it = raw.into_iter();
        while let Some(arg) = it.next() {
            let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--quick" => quick = true,
                "--sizes" => {
                    sizes = Some(
                        value()?
                            .split(',')
                            .map(parse_size)
                            .collect::<Result<Vec<_>>>()?,
                    );
                }
                "--phases" => {
                    let list: Vec<String> = value()?.split(',').map(str::to_owned).collect();
                    for p in &list {
                        if !["datapath", "e2e", "agent", "sockets"].contains(&p.as_str()) {
                            bail!("unknown phase {p:?}");
                        }
                    }
                    phases = Some(list);
                }
                "--out" => out = value()?.into(),
                "--regions" => regions = value()?.into(),
                "--agent-bin" => agent_bin = Some(PathBuf::from(value()?)),
                "--budget" => budget = value()?.parse().context("--budget")?,
                "--rounds" => rounds = Some(value()?.parse().context("--rounds")?),
                "--repeat" => repeat = Some(value()?.parse().context("--repeat")?),
                "--e2e-seconds" => e2e_seconds = Some(value()?.parse().context("--e2e-seconds")?),
                "--load-cap" => load_cap = value()?.parse().context("--load-cap")?,
                "--commit" => commit = Some(value()?),
                "-h" | "--help" => {
                    print!("{USAGE}");
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?}"),
            }
        }
        let agent_bin = match agent_bin {
            Some(p) => p,
            None => std::env::current_exe()?
                .parent()
                .context("no parent of this program")?
                .join("datafence"),
        };
        let default_sizes = if quick {
            vec![10, 1_000]
        } else {
            vec![10, 1_000, 100_000, 1_000_000]
        };
        let repeat: u32 = repeat.unwrap_or(if quick { 2_000 } else { 5_000 });
        Ok(Self {
            quick,
            sizes: sizes.unwrap_or(default_sizes),
            phases: phases.unwrap_or_else(|| {
                vec![
                    "datapath".into(),
                    "e2e".into(),
                    "agent".into(),
                    "sockets".into(),
                ]
            }),
            out,
            regions,
            agent_bin,
            budget: Duration::from_secs_f64(budget),
            rounds: rounds.unwrap_or(if quick { 3 } else { 5 }).max(1),
            repeat: repeat.max(1),
            cold_repeat: (repeat / 5).max(100),
            e2e_seconds: e2e_seconds.unwrap_or(if quick { 0.3 } else { 0.5 }),
            e2e_reps: if quick { 2 } else { 3 },
            cpu_samples: if quick { 2 } else { 3 },
            cpu_seconds: if quick { 1.0 } else { 1.5 },
            load_cap: Duration::from_secs_f64(load_cap),
            commit,
        })
    }

    pub(crate) fn phase(&self, name: &str) -> bool {
        self.phases.iter().any(|p| p == name)
    }
}
