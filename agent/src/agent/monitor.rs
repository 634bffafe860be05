//! The loops that keep enforcement whole while the agent runs: the attachment monitor
//! (repairs detached programs, follows recreated cgroups, frees the slot a reload left)
//! and the systemd watchdog,
//! which is pinged only while every loop makes progress.
#![forbid(unsafe_code)]

use std::sync::Arc;

use tracing::{error, info};

use super::{Shared, lock};
use crate::liveness::{Liveness, Loop};

pub(super) async fn monitor_attachments(
    shared: Shared,
    every: std::time::Duration,
    live: Arc<Liveness>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let state = shared.clone();
        let done = tokio::task::spawn_blocking(move || {
            let mut agent = lock(&state);
            agent.ensure_attached();
            agent.refresh_cgroups();
            agent.release_retired_slot();
        })
        .await;
        if done.is_ok() {
            live.beat(Loop::Reconciler);
        }
    }
}

/// Pings the systemd watchdog twice per interval, as systemd recommends, but only while
/// every loop is making progress; logs the loops that stall, once per stall.
pub(super) async fn watchdog(period: std::time::Duration, live: Arc<Liveness>) {
    let mut tick = tokio::time::interval(period / 2);
    let mut stalled_before = false;
    loop {
        tick.tick().await;
        let states = live.states(std::time::Instant::now());
        let stalled: Vec<&str> = states.iter().filter(|s| !s.ok()).map(|s| s.name).collect();
        if stalled.is_empty() {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            if stalled_before {
                info!("every loop is making progress again; watchdog pings resumed");
            }
        } else if !stalled_before {
            error!(
                ?stalled,
                "no progress within the watchdog interval; not pinging the watchdog"
            );
        }
        stalled_before = !stalled.is_empty();
    }
}
