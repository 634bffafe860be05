//! What the datapath tells: counters, statistics, events, kernel memory, verifier
//! figures, and frames run through the programs with `BPF_PROG_TEST_RUN`.

#![forbid(unsafe_code)]

use std::{path::Path, time::Duration};

use aya::maps::{Map, MapData, PerCpuArray, PerCpuHashMap, RingBuf};
use datafence_common::{
    COUNTER_CACHE_SLOTS, CachedCounter, CounterKey, CounterValue, Hook, ViolationEvent, map_names,
    program_names, stat,
};

use super::{Datapath, DatapathError, Result, Stats, map_err, test_run_program};

/// Every counter, summed over CPUs: the keys each CPU's cache holds and the keys that
/// overflowed into the hash. One key may be in both (its place was taken on one CPU).
pub(super) fn read_counters(hash: &Map, cache: &Map) -> Result<Vec<(CounterKey, CounterValue)>> {
    let mut sums = std::collections::BTreeMap::<CounterKey, CounterValue>::new();
    let mut add = |key: CounterKey, v: &CounterValue| *sums.entry(key).or_default() += *v;
    let name = map_names::COUNTERS;
    let map: PerCpuHashMap<&MapData, CounterKey, CounterValue> =
        PerCpuHashMap::try_from(hash).map_err(map_err(name))?;
    for item in &map {
        let (key, per_cpu) = item.map_err(map_err(name))?;
        for v in per_cpu.iter() {
            add(key, v);
        }
    }
    let name = map_names::COUNTER_CACHE;
    let map: PerCpuArray<&MapData, CachedCounter> =
        PerCpuArray::try_from(cache).map_err(map_err(name))?;
    for slot in 0..COUNTER_CACHE_SLOTS {
        for c in map.get(&slot, 0).map_err(map_err(name))?.iter() {
            // A place being claimed right now may show its claim before its key on a
            // weakly ordered CPU; no real key has reason 0 (the socket ring's have
            // interface 0).
            if c.claimed != 0 && c.key.reason != 0 {
                add(c.key, &c.value);
            }
        }
    }
    Ok(sums.into_iter().collect())
}

pub(super) fn read_stats(map: &Map) -> Result<Stats> {
    let name = map_names::STATS;
    let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(map_err(name))?;
    let mut all = [0; stat::COUNT as usize];
    for s in &stat::ALL {
        all[s.index as usize] = map.get(&s.index, 0).map_err(map_err(name))?.iter().sum();
    }
    Ok(Stats { all })
}

/// The `__sk_buff` a test frame runs with. The kernel accepts a partial one; `len` and
/// `pkt_type` must be zero and `mark` is the third u32.
fn skb_ctx(mark: u32) -> [u8; 12] {
    let mut ctx = [0u8; 12];
    ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
    ctx
}

impl Datapath {
    /// Runs one frame through a program with `BPF_PROG_TEST_RUN`; returns whether the
    /// program let it pass.
    pub fn test_run(&self, hook: Hook, frame: &[u8], mark: u32) -> Result<bool> {
        self.test_run_repeat(hook, frame, mark, 1)
            .map(|(pass, _)| pass)
    }

    /// Like [`Self::test_run`], `repeat` times in the kernel; also returns the mean
    /// duration the kernel measured.
    pub fn test_run_repeat(
        &self,
        hook: Hook,
        frame: &[u8],
        mark: u32,
        repeat: u32,
    ) -> Result<(bool, Duration)> {
        let ctx = skb_ctx(mark);
        match hook {
            Hook::TcEgress => {
                let name = program_names::TC_EGRESS;
                let (ret, took) =
                    test_run_program(self.tc_entry()?, name, frame, Some(&ctx), repeat)?;
                // TC_PASS is TC_ACT_UNSPEC (-1); the kernel hands back the raw u32.
                Ok((ret.cast_signed() == datafence_common::TC_PASS, took))
            }
            Hook::Xdp => {
                const XDP_PASS: u32 = 2;
                let name = program_names::XDP_GATEWAY;
                let (ret, took) = test_run_program(self.xdp_entry()?, name, frame, None, repeat)?;
                Ok((ret == XDP_PASS, took))
            }
            // The kernel has no test run for socket programs: they judge calls, not frames.
            Hook::SockConnect | Hook::SockSendmsg => Err(DatapathError::NoTestRun(hook)),
        }
    }

    /// Pins the TC entry program at `path`, a file to be on bpffs, so that a process in
    /// another cgroup can run frames through it ([`Self::test_run_pinned_tc`]): the
    /// kernel gives a test frame the cgroup of the process that runs it. The caller
    /// removes the pin; this datapath must live until the run is over, since its maps
    /// hold the stages the entry program jumps to.
    pub fn pin_tc_entry(&mut self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            super::pins::ensure_bpffs(dir)?;
        }
        self.tc_entry_mut()?
            .pin(path)
            .map_err(|source| DatapathError::Pin {
                path: path.to_owned(),
                source,
            })
    }

    /// Runs one frame through the TC entry program pinned at `path` (by
    /// [`Self::pin_tc_entry`], in another process), as this process: its return value,
    /// the TC action.
    pub fn test_run_pinned_tc(path: &Path, frame: &[u8], mark: u32) -> Result<i32> {
        let name = program_names::TC_EGRESS;
        let program = aya::programs::SchedClassifier::from_pin(path).map_err(|source| {
            DatapathError::Program {
                program: name,
                source,
            }
        })?;
        let (ret, _) = test_run_program(&program, name, frame, Some(&skb_ctx(mark)), 1)?;
        // The kernel hands back the raw u32; TC actions are signed (TC_ACT_UNSPEC is -1).
        Ok(ret.cast_signed())
    }

    /// Counters summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(CounterKey, CounterValue)>> {
        read_counters(
            self.map(map_names::COUNTERS)?,
            self.map(map_names::COUNTER_CACHE)?,
        )
    }

    pub fn stats(&self) -> Result<Stats> {
        read_stats(self.map(map_names::STATS)?)
    }

    /// Adds `counters`, what a retired datapath counted, to this one's under keys of
    /// origin [`CounterKey::CARRIED`], so they outlast this agent as the rest do.
    pub fn carry_counters(&mut self, counters: &[(CounterKey, CounterValue)]) -> Result<()> {
        let mut carried = std::collections::BTreeMap::<CounterKey, CounterValue>::new();
        for (key, value) in counters {
            let key = CounterKey {
                origin: CounterKey::CARRIED,
                ..*key
            };
            *carried.entry(key).or_default() += *value;
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, source)| DatapathError::Cpus(source))?;
        let name = map_names::COUNTERS;
        let mut map: PerCpuHashMap<&mut MapData, CounterKey, CounterValue> =
            PerCpuHashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for (key, add) in carried {
            // What an earlier carry left under the key, on whichever CPUs.
            let mut total = add;
            if let Ok(held) = map.get(&key, 0) {
                for v in held.iter() {
                    total += *v;
                }
            }
            let mut values = vec![CounterValue::default(); cpus];
            values[0] = total;
            let values = aya::maps::PerCpuValues::try_from(values).map_err(DatapathError::Cpus)?;
            map.insert(key, values, 0).map_err(map_err(name))?;
        }
        Ok(())
    }

    /// Reads every event waiting on the ring buffer, without blocking.
    pub fn drain_events(&mut self) -> Result<Vec<ViolationEvent>> {
        let name = map_names::EVENTS;
        let mut ring = RingBuf::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            if let Some(ev) = ViolationEvent::from_bytes(&item) {
                out.push(ev);
            }
        }
        Ok(out)
    }

    /// Hands the ring buffer to an asynchronous reader.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let name = map_names::EVENTS;
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(DatapathError::MissingMap(name))?;
        RingBuf::try_from(map).map_err(map_err(name))
    }

    /// Kernel memory of each map, from the map's own accounting (`memlock` in
    /// /proc/self/fdinfo), which counts what tries and hash maps allocate as they fill.
    /// A region table's arrays of maps count with the slots' arrays they hold.
    pub fn map_memory(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = Vec::new();
        for (name, map) in self.ebpf.maps() {
            let (Map::Array(data)
            | Map::PerCpuArray(data)
            | Map::HashMap(data)
            | Map::PerCpuHashMap(data)
            | Map::LpmTrie(data)
            | Map::RingBuf(data)) = map
            else {
                continue;
            };
            out.push((name.to_owned(), memlock(data)));
        }
        let tables = self.v4.maps().into_iter().chain(self.v6.maps());
        for (name, data) in tables {
            match out.iter_mut().find(|(n, _)| n == name) {
                Some((_, bytes)) => *bytes += memlock(data),
                None => out.push((name.to_owned(), memlock(data))),
            }
        }
        out.sort();
        out
    }

    /// Instructions the verifier processed for each program: the complexity figures that
    /// performance work tracks.
    pub fn verified_instructions(&self) -> Vec<(&'static str, Option<u32>)> {
        #[cfg(feature = "bench")]
        let bench = super::BenchProgram::ALL.map(super::BenchProgram::program_name);
        #[cfg(not(feature = "bench"))]
        let bench: [&'static str; 0] = [];
        let socket = super::SOCKET_PROGRAMS
            .map(|(name, _)| name)
            .into_iter()
            .chain(super::SOCKET_STAGES.map(|(name, _, _)| name));
        [
            program_names::TC_EGRESS,
            program_names::TC_L3,
            program_names::TC_IPV4_OPTIONS,
            program_names::TC_ENCAPSULATED,
            program_names::TC_JUDGE,
            program_names::XDP_GATEWAY,
            program_names::XDP_L3,
            program_names::XDP_IPV4_OPTIONS,
            program_names::XDP_ENCAPSULATED,
            program_names::XDP_JUDGE,
        ]
        .into_iter()
        .chain(
            socket
                .chain(bench)
                .filter(|name| self.ebpf.program(name).is_some_and(|p| p.fd().is_ok())),
        )
        .map(|name| {
            let count = self
                .program_info(name)
                .and_then(|i| i.verified_instruction_count());
            (name, count)
        })
        .collect()
    }
}

/// A map's kernel memory, as its own accounting gives it (`memlock` in
/// /proc/self/fdinfo); 0 when it cannot be read.
fn memlock(data: &MapData) -> u64 {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let fd = data.fd().as_fd().as_raw_fd();
    std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}
