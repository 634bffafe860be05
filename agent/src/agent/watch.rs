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

/// Watches the policy file's directory tree (region files live beside the policy), and
/// the directory of every other file the policy is read from (`include_dirs`), and asks
/// for a reload once changes to those files settle. Other files (logs, editor swap
/// files) are ignored, or a busy log would reload the policy over and over. The watcher
/// lives on the thread that debounces; that thread also watches the directories of files
/// a reload adds.
pub(super) fn watch_policy(
    policy_path: &Path,
    sources: Arc<Mutex<Vec<PathBuf>>>,
    reload: tokio::sync::mpsc::Sender<&'static str>,
) -> anyhow::Result<()> {
    use notify::Watcher as _;
    let dir = policy_path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let dir = std::path::absolute(&dir).unwrap_or(dir);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let watched_sources = sources.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(e) = event else { return };
        if e.kind.is_access() {
            return;
        }
        let watched = watched_sources
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
    let mut outside = std::collections::HashSet::new();
    watch_outside(&mut watcher, &dir, &sources, &mut outside);
    let shown = dir.display().to_string();
    std::thread::Builder::new()
        .name("policy-watch".into())
        .spawn(move || {
            loop {
                match rx.recv_timeout(RESCAN) {
                    Ok(()) => {
                        // Debounce: wait until no event has arrived for a while.
                        while rx.recv_timeout(WATCH_DEBOUNCE).is_ok() {}
                        if reload.blocking_send("policy file changed").is_err() {
                            break;
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                }
                watch_outside(&mut watcher, &dir, &sources, &mut outside);
            }
        })?;
    info!(dir = %shown, "watching the policy for changes");
    Ok(())
}

/// How often the watcher looks for directories a reload added to the policy's files: a
/// few paths compared, so often.
const RESCAN: std::time::Duration = std::time::Duration::from_millis(200);

/// Watches the directory of each source outside the policy's tree, once.
fn watch_outside(
    watcher: &mut notify::RecommendedWatcher,
    policy_dir: &Path,
    sources: &Mutex<Vec<PathBuf>>,
    outside: &mut std::collections::HashSet<PathBuf>,
) {
    use notify::Watcher as _;
    let dirs: Vec<PathBuf> = sources
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .filter_map(|p| p.parent().map(Path::to_owned))
        .filter(|d| !d.starts_with(policy_dir))
        .collect();
    for d in dirs {
        if outside.contains(&d) {
            continue;
        }
        match watcher.watch(&d, notify::RecursiveMode::NonRecursive) {
            Ok(()) => {
                info!(dir = %d.display(), "watching an included directory for changes");
                outside.insert(d);
            }
            Err(e) => {
                tracing::warn!(dir = %d.display(), error = %e, "cannot watch an included directory; its files are reloaded with the others");
            }
        }
    }
}
