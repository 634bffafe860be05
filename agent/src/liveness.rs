//! Whether the agent's loops are making progress: the systemd watchdog is pinged, and
//! `/healthz` answers 200, only while every loop has moved within its limit.
//!
//! A timer that pings unconditionally proves only that the runtime's timer works. Each
//! loop here marks progress where it really does its work, so a loop stuck on the
//! agent's lock, on a kernel call or in a panic-free dead end stops the pings, and
//! systemd restarts the agent (the pinned enforcement carries on meanwhile).
#![forbid(unsafe_code)]

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

/// The loops whose progress the watchdog vouches for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loop {
    /// Reads violation events from the ring buffer; wakes at least every second to flush
    /// folded lines and read the kernel's statistics.
    Events,
    /// Serves the control socket (`status`, `reload`, `detach`, `explain`); probes
    /// itself every second through the same path a request takes.
    Control,
    /// Verifies and repairs the attachments, and follows recreated cgroups.
    Reconciler,
}

impl Loop {
    pub const ALL: [Self; 3] = [Self::Events, Self::Control, Self::Reconciler];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Events => "event-reader",
            Self::Control => "control",
            Self::Reconciler => "reconciler",
        }
    }
}

/// How often the control loop probes itself.
pub const CONTROL_PROBE: Duration = Duration::from_secs(1);
/// How often the event reader wakes when no events arrive.
pub const EVENTS_TICK: Duration = Duration::from_secs(1);
/// Stall limit when systemd runs no watchdog: the shipped unit's `WatchdogSec=`.
pub const DEFAULT_LIMIT: Duration = Duration::from_secs(30);

/// Last progress of each loop, in milliseconds since the agent started.
#[derive(Debug)]
pub struct Liveness {
    started: Instant,
    last: [AtomicU64; 3],
    /// The stall limit of each loop.
    limits: [Duration; 3],
}

/// One loop's state, as `/healthz` reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct LoopState {
    pub name: &'static str,
    pub since_progress: Duration,
    pub limit: Duration,
}

impl LoopState {
    pub fn ok(&self) -> bool {
        self.since_progress <= self.limit
    }
}

impl Liveness {
    /// `watchdog`: the systemd watchdog interval, when there is one. Each loop must make
    /// progress within it, or within twice its own period when that is longer (a
    /// reconciler that checks every 20 s cannot vouch for itself every 10 s).
    pub fn new(watchdog: Option<Duration>, reconcile_every: Duration) -> Self {
        let limit = watchdog.unwrap_or(DEFAULT_LIMIT);
        let period = |l: Loop| match l {
            Loop::Events => EVENTS_TICK,
            Loop::Control => CONTROL_PROBE,
            Loop::Reconciler => reconcile_every,
        };
        Self {
            started: Instant::now(),
            last: Default::default(),
            limits: Loop::ALL.map(|l| limit.max(period(l) * 2)),
        }
    }

    /// Marks that `which` made progress now.
    pub fn beat(&self, which: Loop) {
        self.beat_at(which, Instant::now());
    }

    fn beat_at(&self, which: Loop, at: Instant) {
        let ms = at.saturating_duration_since(self.started).as_millis() as u64;
        self.last[which as usize].store(ms, Ordering::Relaxed);
    }

    /// Every loop's state at `now`.
    pub fn states(&self, now: Instant) -> Vec<LoopState> {
        let now_ms = now.saturating_duration_since(self.started).as_millis() as u64;
        Loop::ALL
            .iter()
            .map(|&l| LoopState {
                name: l.as_str(),
                since_progress: Duration::from_millis(
                    now_ms.saturating_sub(self.last[l as usize].load(Ordering::Relaxed)),
                ),
                limit: self.limits[l as usize],
            })
            .collect()
    }

    /// Whether every loop made progress within its limit.
    pub fn all_ok(&self, now: Instant) -> bool {
        self.states(now).iter().all(LoopState::ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_stalled_loop_fails_the_whole() {
        let live = Liveness::new(Some(Duration::from_secs(2)), Duration::from_secs(1));
        let t0 = Instant::now();
        for l in Loop::ALL {
            live.beat_at(l, t0);
        }
        assert!(live.all_ok(t0));
        let t3 = t0 + Duration::from_secs(3);
        live.beat_at(Loop::Events, t3);
        live.beat_at(Loop::Reconciler, t3);
        // The control loop has not moved for 3 s, past its 2 s limit.
        let states = live.states(t3);
        let stalled: Vec<&str> = states.iter().filter(|s| !s.ok()).map(|s| s.name).collect();
        assert_eq!(stalled, ["control"], "{states:?}");
        assert!(!live.all_ok(t3));
        live.beat_at(Loop::Control, t3);
        assert!(live.all_ok(t3));
    }

    #[test]
    fn a_slow_reconciler_gets_twice_its_period() {
        let live = Liveness::new(Some(Duration::from_secs(2)), Duration::from_secs(10));
        let limits: Vec<Duration> = live
            .states(Instant::now())
            .iter()
            .map(|s| s.limit)
            .collect();
        assert_eq!(
            limits,
            [2, 2, 20].map(Duration::from_secs).to_vec(),
            "event reader, control, reconciler"
        );
    }
}
