//! The metrics HTTP server: `/metrics` (Prometheus text or OpenMetrics) and `/healthz`.
//!
//! Scrapes never take the agent's lock: a publisher task takes a [`Snapshot`] whenever
//! one is wanted, at most every [`SNAPSHOT_MIN_INTERVAL`], and scrapes render the
//! published copy.
#![forbid(unsafe_code)]

use std::sync::Arc;

use anyhow::Context as _;
use tracing::{info, warn};

use super::Snapshot;
use crate::{liveness::Liveness, metrics};

/// Takes a snapshot of the agent, under its lock; called on a blocking thread.
pub type TakeSnapshot = Arc<dyn Fn() -> Result<Snapshot, String> + Send + Sync>;

/// The latest [`Snapshot`], published by [`publish_snapshots`], with the last request
/// ticket it answers: it was taken after every request up to that one was made.
type Published = Option<(u64, Arc<Snapshot>)>;

/// How scrapes ask for a snapshot: they take a ticket and wake the publisher.
#[derive(Default)]
struct SnapshotRequests {
    tickets: std::sync::atomic::AtomicU64,
    wanted: tokio::sync::Notify,
}

/// Fewest milliseconds between two snapshots: however often /metrics and /healthz are
/// asked, the agent's lock is taken for them at most this often. Concurrent scrapes
/// share a snapshot.
const SNAPSHOT_MIN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);
/// How long a scrape waits for a fresh snapshot before it serves the last one (a long
/// reload holds the lock).
const SNAPSHOT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Builds a snapshot under the agent's lock whenever one is wanted (at most every
/// [`SNAPSHOT_MIN_INTERVAL`]) and publishes it. Scrapes read the published copy, so no
/// number of them holds the lock that reloads and the event reader need.
async fn publish_snapshots(
    take: TakeSnapshot,
    published: tokio::sync::watch::Sender<Published>,
    requests: Arc<SnapshotRequests>,
) {
    let mut last = tokio::time::Instant::now() - SNAPSHOT_MIN_INTERVAL;
    loop {
        requests.wanted.notified().await;
        tokio::time::sleep_until(last + SNAPSHOT_MIN_INTERVAL).await;
        last = tokio::time::Instant::now();
        // Every request with a ticket up to this one was made before the lock is taken.
        let serves = requests.tickets.load(std::sync::atomic::Ordering::SeqCst);
        let take = take.clone();
        match tokio::task::spawn_blocking(move || take()).await {
            Ok(Ok(snapshot)) => {
                published.send_replace(Some((serves, Arc::new(snapshot))));
            }
            Ok(Err(e)) => warn!(error = %e, "cannot read the datapath for metrics"),
            Err(e) => warn!(error = %e, "metrics snapshot task failed"),
        }
    }
}

/// A snapshot taken after this call began, so a scrape sees everything that happened
/// before it: asks for one and waits for it, or serves the last one after
/// [`SNAPSHOT_WAIT`] (a long reload holds the lock).
async fn fresh_snapshot(
    mut published: tokio::sync::watch::Receiver<Published>,
    requests: &SnapshotRequests,
) -> Option<Arc<Snapshot>> {
    let ticket = requests
        .tickets
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        + 1;
    requests.wanted.notify_one();
    let answered = |p: &Published| p.as_ref().is_some_and(|(serves, _)| *serves >= ticket);
    let _ = tokio::time::timeout(SNAPSHOT_WAIT, published.wait_for(answered)).await;
    published.borrow().as_ref().map(|(_, s)| s.clone())
}

/// Serves `/metrics` and `/healthz` on `listener` until the task is aborted.
pub async fn serve(
    take: TakeSnapshot,
    listener: std::net::TcpListener,
    live: Arc<Liveness>,
) -> anyhow::Result<()> {
    use axum::{
        Router,
        http::{HeaderMap, StatusCode, header},
        routing::get,
    };
    let (tx, rx) = tokio::sync::watch::channel::<Published>(None);
    let requests = Arc::new(SnapshotRequests::default());
    tokio::spawn(publish_snapshots(take, tx, requests.clone()));
    let (metrics_rx, metrics_requests) = (rx.clone(), requests.clone());
    let app = Router::new()
        .route(
            "/metrics",
            get(move |headers: HeaderMap| {
                let (rx, requests) = (metrics_rx.clone(), metrics_requests.clone());
                async move {
                    let format = metrics::Format::negotiate(
                        headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()),
                    );
                    let rendered = match fresh_snapshot(rx, &requests).await {
                        Some(s) => metrics::render(&s, format).map_err(|e| e.to_string()),
                        None => Err("no metrics snapshot yet".to_owned()),
                    };
                    match rendered {
                        Ok(text) => (
                            StatusCode::OK,
                            [(header::CONTENT_TYPE, format.content_type())],
                            text,
                        ),
                        Err(e) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                            e,
                        ),
                    }
                }
            }),
        )
        .route(
            "/healthz",
            get(move || {
                let (rx, requests, live) = (rx.clone(), requests.clone(), live.clone());
                async move {
                    let snapshot = fresh_snapshot(rx, &requests).await.unwrap_or_default();
                    let loops = live.states(std::time::Instant::now());
                    let (healthy, text) = metrics::health(&snapshot, &loops);
                    let code = if healthy {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (code, text)
                }
            }),
        );
    let addr = listener
        .local_addr()
        .context("the metrics listener's address")?;
    listener
        .set_nonblocking(true)
        .context("the metrics listener")?;
    let listener = tokio::net::TcpListener::from_std(listener).context("the metrics listener")?;
    info!(%addr, "serving /metrics and /healthz");
    axum::serve(listener, app).await?;
    Ok(())
}
