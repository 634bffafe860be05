//! cgroup ids (as the datapath reports them) back to paths, for violation reports.
#![forbid(unsafe_code)]

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// How often an unknown id may trigger a rescan of the cgroup tree; a flood of events
/// from a vanished cgroup must not turn into a flood of directory walks.
const RESCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Bounds the walk on hosts with pathological trees.
const MAX_CGROUPS: usize = 100_000;

pub struct CgroupNames {
    root: PathBuf,
    by_id: HashMap<u64, String>,
    last_scan: Option<Instant>,
}

impl CgroupNames {
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            by_id: HashMap::new(),
            last_scan: None,
        }
    }

    /// The cgroup's path relative to the cgroup2 root ("/system.slice/x.service"), or
    /// its id when it cannot be found (the id 0 means "no socket": forwarded traffic).
    pub fn name(&mut self, id: u64) -> String {
        if id == 0 {
            return String::new();
        }
        if !self.by_id.contains_key(&id)
            && self
                .last_scan
                .is_none_or(|t| t.elapsed() >= RESCAN_INTERVAL)
        {
            self.rescan();
        }
        self.by_id
            .get(&id)
            .cloned()
            .unwrap_or_else(|| id.to_string())
    }

    fn rescan(&mut self) {
        self.last_scan = Some(Instant::now());
        self.by_id.clear();
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            if self.by_id.len() >= MAX_CGROUPS {
                break;
            }
            let Ok(meta) = std::fs::metadata(&dir) else {
                continue;
            };
            self.by_id.insert(meta.ino(), relative(&self.root, &dir));
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
        }
    }
}

fn relative(root: &Path, dir: &Path) -> String {
    let rel = dir.strip_prefix(root).unwrap_or(dir);
    format!("/{}", rel.display())
}

/// Where the cgroup v2 hierarchy is mounted: `/sys/fs/cgroup` on unified hosts,
/// `/sys/fs/cgroup/unified` on hybrid ones. Read from /proc/self/mounts.
pub fn cgroup2_root() -> PathBuf {
    datafence_sandbox::cgroup2_root_or(Path::new(crate::dirs::CGROUP_ROOT))
}

/// Whether `dir` is a cgroup of a v2 hierarchy: only those have `cgroup.controllers`.
pub fn is_cgroup2(dir: &Path) -> bool {
    dir.join("cgroup.controllers").is_file()
}

pub use datafence_sandbox::spawn_in_cgroup;

/// Why a cgroup path from a request cannot be used to place a process.
#[derive(Debug, thiserror::Error)]
pub enum CgroupPathError {
    #[error("cgroup {cgroup}: a cgroup path may not contain `.` or `..` components")]
    Climbs { cgroup: String },
    #[error("cgroup {cgroup} does not exist ({} is not a cgroup v2 directory)", .dir.display())]
    Missing { cgroup: String, dir: PathBuf },
}

/// The directory of the cgroup `path` (as a policy and `explain --cgroup` write it,
/// relative to the hierarchy mounted at `root`). Refuses `.` and `..` components, which
/// could name a directory outside the hierarchy, and a cgroup that does not exist.
pub fn cgroup_dir(root: &Path, path: &str) -> Result<PathBuf, CgroupPathError> {
    let mut dir = root.to_owned();
    for part in path.split('/').filter(|p| !p.is_empty()) {
        if part == "." || part == ".." {
            return Err(CgroupPathError::Climbs {
                cgroup: path.to_owned(),
            });
        }
        dir.push(part);
    }
    if !is_cgroup2(&dir) {
        return Err(CgroupPathError::Missing {
            cgroup: path.to_owned(),
            dir,
        });
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::{CgroupPathError, cgroup_dir};

    #[test]
    fn cgroup_dirs_stay_in_the_hierarchy_and_must_exist() {
        let root = tempfile::tempdir().expect("tempdir");
        let service = root.path().join("system.slice/api.service");
        std::fs::create_dir_all(&service).expect("mkdir");
        std::fs::write(service.join("cgroup.controllers"), "").expect("write");
        assert_eq!(
            cgroup_dir(root.path(), "/system.slice/api.service").expect("exists"),
            service
        );
        for climbing in ["/system.slice/../..", "/./system.slice", ".."] {
            let err = cgroup_dir(root.path(), climbing).expect_err(climbing);
            assert!(matches!(err, CgroupPathError::Climbs { .. }), "{err}");
            assert!(err.to_string().contains(climbing), "{err}");
        }
        // A plain directory is not a cgroup.
        let err = cgroup_dir(root.path(), "/system.slice").expect_err("no controllers file");
        assert!(
            err.to_string()
                .contains("cgroup /system.slice does not exist"),
            "{err}"
        );
        let err = cgroup_dir(root.path(), "/nope.slice").expect_err("missing");
        assert!(
            err.to_string()
                .contains("cgroup /nope.slice does not exist"),
            "{err}"
        );
    }
}
