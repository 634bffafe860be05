//! The policy file watcher: a reload once the files the policy was read from change
//! and settle.
#![forbid(unsafe_code)]

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use tracing::info;

use crate::policy::LoadedPolicy;

/// The files whose changes trigger a reload: the ones the policy was read from, made
/// absolute the way the watcher reports paths.
pub(super) fn watched_sources(policy: &LoadedPolicy) -> Vec<PathBuf> {
    policy
        .sources
        .iter()
        .map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone()))
        .collect()
}

/// How long the policy files must be quiet before a change is reloaded: editors and
/// `git checkout` write files in several steps, and a half-written file must not even be
/// tried.
const WATCH_DEBOUNCE: std::time::Duration = std::time::Duration::from_millis(500);

/// Watches the policy file's directory tree (region files live beside the policy) and
/// asks for a reload once changes to the files the policy is read from settle. Other
/// files in the tree (logs, editor swap files) are ignored, or a busy log would reload
/// the policy over and over.
pub(super) fn watch_policy(
    policy_path: &Path,
    sources: Arc<Mutex<Vec<PathBuf>>>,
    reload: tokio::sync::mpsc::Sender<&'static str>,
) -> anyhow::Result<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    let dir = policy_path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(e) = event else { return };
        if e.kind.is_access() {
            return;
        }
        let watched = sources
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Editors and `git checkout` often replace a file by renaming a new one over it,
        // so compare file names within the watched tree, not inode identity.
        let relevant = e.paths.iter().any(|p| {
            watched
                .iter()
                .any(|w| w == p || (w.file_name() == p.file_name() && w.parent() == p.parent()))
        });
        if relevant {
            let _ = tx.send(());
        }
    })?;
    watcher
        .watch(&dir, notify::RecursiveMode::Recursive)
        .with_context(|| format!("watching {}", dir.display()))?;
    std::thread::Builder::new()
        .name("policy-watch".into())
        .spawn(move || {
            while rx.recv().is_ok() {
                // Debounce: wait until no event has arrived for a while.
                while rx.recv_timeout(WATCH_DEBOUNCE).is_ok() {}
                if reload.blocking_send("policy file changed").is_err() {
                    break;
                }
            }
        })?;
    info!(dir = %dir.display(), "watching the policy for changes");
    Ok(watcher)
}
