//! Following the cgroups a policy names as systemd makes and removes them. A service
//! gets a new cgroup, with a new id, on every restart, and a service that starts after
//! the agent (at boot) has none yet: until the compiled policy holds the new id, that
//! service's traffic matches no class. inotify on each named cgroup's parent tells the
//! agent within milliseconds; the periodic check stays as the backstop.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::mpsc::{RecvTimeoutError, channel},
    time::Duration,
};

use notify::{EventKind, Watcher as _};

/// How often the set of watched directories follows a reloaded policy when no cgroup
/// event comes.
const RESCAN: Duration = Duration::from_secs(1);

/// Watches the parents of the cgroups `named` returns (paths relative to `root`, as a
/// policy writes them) and calls `changed` after a cgroup is made, removed or renamed
/// there. A parent that does not exist either is watched through its nearest existing
/// ancestor, and watched itself once it appears.
pub fn watch(
    root: PathBuf,
    named: impl Fn() -> Vec<String> + Send + 'static,
    mut changed: impl FnMut() + Send + 'static,
) -> notify::Result<()> {
    let (tx, rx) = channel::<()>();
    let mut watcher = notify::INotifyWatcher::new(
        move |event: notify::Result<notify::Event>| {
            let relevant = event.is_ok_and(|e| {
                matches!(
                    e.kind,
                    EventKind::Create(_)
                        | EventKind::Remove(_)
                        | EventKind::Modify(notify::event::ModifyKind::Name(_))
                )
            });
            if relevant {
                let _ = tx.send(());
            }
        },
        notify::Config::default(),
    )?;
    std::thread::Builder::new()
        .name("cgroup-watch".into())
        .spawn(move || {
            let mut watched = BTreeSet::new();
            let mut event = false;
            loop {
                let wanted: BTreeSet<PathBuf> = named()
                    .iter()
                    .map(|path| watch_point(&root, path))
                    .collect();
                if event || wanted != watched {
                    for dir in watched.difference(&wanted) {
                        let _ = watcher.unwatch(dir);
                    }
                    for dir in &wanted {
                        // Again for the ones already watched: a directory removed and
                        // made again lost its watch with its inode.
                        let _ = watcher.watch(dir, notify::RecursiveMode::NonRecursive);
                    }
                    watched = wanted;
                    // Watch first, then look: whatever changes after the look makes an
                    // event, and whatever changed before it, the look sees.
                    changed();
                }
                event = match rx.recv_timeout(RESCAN) {
                    Ok(()) => {
                        while rx.try_recv().is_ok() {}
                        true
                    }
                    Err(RecvTimeoutError::Timeout) => false,
                    Err(RecvTimeoutError::Disconnected) => break,
                };
            }
        })?;
    Ok(())
}

/// The directory whose events announce `path`: its parent, or the nearest ancestor of
/// it that exists, down to `root`.
fn watch_point(root: &Path, path: &str) -> PathBuf {
    let mut dir = root.join(path.trim_start_matches('/'));
    while dir.pop() && dir.starts_with(root) {
        if dir.is_dir() {
            return dir;
        }
    }
    root.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_point_is_the_nearest_existing_parent() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("a.slice/b.service")).unwrap();
        assert_eq!(
            watch_point(root.path(), "/a.slice/b.service"),
            root.path().join("a.slice")
        );
        assert_eq!(
            watch_point(root.path(), "/a.slice/x.slice/y.service"),
            root.path().join("a.slice")
        );
        assert_eq!(watch_point(root.path(), "/late.slice"), root.path());
        assert_eq!(watch_point(root.path(), "/no/such/thing"), root.path());
    }
}
