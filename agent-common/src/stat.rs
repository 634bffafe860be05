//! The datapath's own statistics: indexes into the per-CPU `STATS` array, with the names
//! and help text every consumer (the datapath readout, metrics, docs) takes from
//! [`ALL`]. Adding a statistic is a constant and a row here.

/// One statistic: its index in `STATS`, its name, and the counter it is exported as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub index: u32,
    /// The statistic's own name (status, logs, tests).
    pub name: &'static str,
    /// The Prometheus counter family, without the `datafence_` prefix and the
    /// `_total` suffix.
    pub metric: &'static str,
    /// The counter's help text.
    pub help: &'static str,
}

/// A violation event could not be reserved on the ring buffer (agent too slow).
pub const EVENTS_LOST: u32 = 0;
/// A violation event was not emitted because the per-CPU rate limit was exhausted.
pub const EVENTS_SUPPRESSED: u32 = 1;
/// A counter key could not be inserted because the counter map was full; the
/// packet was still judged normally.
pub const COUNTER_MAP_FULL: u32 = 2;
/// An entry program found no judge stage in its program array and let the packet
/// pass unjudged. Never expected while the agent's pins are in place.
pub const STAGE_MISSING: u32 = 3;
pub const COUNT: u32 = 4;

pub const ALL: [Stat; COUNT as usize] = [
    Stat {
        index: EVENTS_LOST,
        name: "events_lost",
        metric: "events_lost",
        help: "Violation events the kernel could not queue because the ring buffer was full",
    },
    Stat {
        index: EVENTS_SUPPRESSED,
        name: "events_suppressed",
        metric: "events_suppressed",
        help: "Violation events the kernel's per-CPU rate limit held back (the packets are still counted)",
    },
    Stat {
        index: COUNTER_MAP_FULL,
        name: "counter_map_full",
        metric: "packets_uncounted",
        help: "Packets judged but not counted because the COUNTERS map was full (verdicts are unaffected)",
    },
    Stat {
        index: STAGE_MISSING,
        name: "stage_missing",
        metric: "packets_unjudged",
        help: "Packets passed without a verdict because an entry program found no judge stage (never expected: its pinned stage array was emptied)",
    },
];

const _: () = {
    let mut i = 0;
    while i < ALL.len() {
        assert!(ALL[i].index as usize == i, "stat::ALL is in index order");
        i += 1;
    }
};
