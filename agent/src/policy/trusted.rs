//! Reading the files a policy is made of as files the agent may trust, after sshd's
//! StrictModes: only regular files, opened without blocking (a FIFO or a device named as
//! a region file never holds up `check` or a reload), no larger than a stated limit, and
//! owned by root or the agent's user and writable by no one else, like each directory
//! above them up to the policy's directory. Anyone who can change such a file changes
//! what the host enforces: the agent reloads watched files by itself.
#![forbid(unsafe_code)]

use std::{
    fs::{File, Metadata, OpenOptions},
    io::Read as _,
    os::unix::fs::{FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _},
    path::{Path, PathBuf},
};

use crate::policy::error::Problem;

/// Default size limits; `--max-policy-bytes` and `--max-region-file-bytes` raise them.
pub const DEFAULT_MAX_POLICY_BYTES: u64 = 16 << 20;
pub const DEFAULT_MAX_REGION_FILE_BYTES: u64 = 256 << 20;

/// The limit a file is read under, and how to raise it.
#[derive(Clone, Copy, Debug)]
pub(super) struct SizeLimit {
    pub bytes: u64,
    pub flag: &'static str,
}

/// The directories a policy's files may come from: the policy file's own, then those its
/// `include_dirs` lists; all canonical.
#[derive(Clone, Debug)]
pub(super) struct Roots(pub Vec<PathBuf>);

impl Roots {
    /// The policy file's directory alone.
    pub fn of_policy(policy_dir: &Path) -> Self {
        Self(vec![
            std::fs::canonicalize(policy_dir).unwrap_or_else(|_| policy_dir.to_owned()),
        ])
    }

    /// The root `target` (canonical) lies under, if any.
    fn containing(&self, target: &Path) -> Option<&Path> {
        self.0
            .iter()
            .find(|r| target.starts_with(r))
            .map(PathBuf::as_path)
    }
}

/// Checks a directory `include_dirs` names, and returns it canonical.
pub(super) fn trusted_dir(path: &Path) -> Result<PathBuf, Problem> {
    let io = |source| Problem::ReadFile {
        path: path.display().to_string(),
        source,
    };
    let dir = std::fs::canonicalize(path).map_err(io)?;
    let meta = std::fs::metadata(&dir).map_err(io)?;
    if !meta.is_dir() {
        return Err(Problem::NotRegularFile {
            path: path.display().to_string(),
            kind: "not a directory",
        });
    }
    check_owner_and_mode(&dir.display().to_string(), &meta, "directory")?;
    Ok(dir)
}

/// Reads `path`, a file of a policy whose files may come from `roots`, if it may be
/// trusted; else says why not, naming the path.
pub(super) fn read_trusted(
    path: &Path,
    roots: &Roots,
    limit: SizeLimit,
) -> Result<Vec<u8>, Problem> {
    let shown = || path.display().to_string();
    let io = |source| Problem::ReadFile {
        path: shown(),
        source,
    };
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(Problem::NotRegularFile {
            path: shown(),
            kind: kind_of(&meta),
        });
    }
    if meta.len() > limit.bytes {
        return Err(too_large(path, meta.len(), limit));
    }
    let target = std::fs::canonicalize(path).map_err(io)?;
    let Some(root) = roots.containing(&target) else {
        return Err(Problem::OutsidePolicyDirs {
            path: shown_with_target(path, &target),
            dir: roots.0[0].display().to_string(),
        });
    };
    check_owner_and_mode(&shown_with_target(path, &target), &meta, "file")?;
    check_directories(path, &target, root)?;
    read_bounded(file, path, limit)
}

/// Reads at most one byte past the limit: the file may have grown since it was checked.
fn read_bounded(file: File, path: &Path, limit: SizeLimit) -> Result<Vec<u8>, Problem> {
    let mut bytes = Vec::new();
    file.take(limit.bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| Problem::ReadFile {
            path: path.display().to_string(),
            source,
        })?;
    if bytes.len() as u64 > limit.bytes {
        return Err(too_large(path, bytes.len() as u64, limit));
    }
    Ok(bytes)
}

fn too_large(path: &Path, size: u64, limit: SizeLimit) -> Problem {
    Problem::FileTooLarge {
        path: path.display().to_string(),
        size,
        limit: limit.bytes,
        flag: limit.flag,
    }
}

/// The directories from the file's target (`target`, canonical) up to the root it lies
/// under.
fn check_directories(path: &Path, target: &Path, root: &Path) -> Result<(), Problem> {
    let io = |source| Problem::ReadFile {
        path: path.display().to_string(),
        source,
    };
    let mut dir = target.parent();
    while let Some(d) = dir {
        let meta = std::fs::metadata(d).map_err(io)?;
        check_owner_and_mode(&d.display().to_string(), &meta, "directory")?;
        if d == root || !d.starts_with(root) {
            break;
        }
        dir = d.parent();
    }
    Ok(())
}

/// `path`, with `target` (its canonical path) when a symlink leads there.
fn shown_with_target(path: &Path, target: &Path) -> String {
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_symlink()) {
        format!("{} (a symlink to {})", path.display(), target.display())
    } else {
        path.display().to_string()
    }
}

fn check_owner_and_mode(path: &str, meta: &Metadata, what: &'static str) -> Result<(), Problem> {
    let agent = crate::sys::effective_uid();
    let unsafe_because = if meta.uid() != 0 && meta.uid() != agent {
        Some(format!("is owned by uid {}", meta.uid()))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "has mode {:04o}, writable by {}",
            meta.mode() & 0o7777,
            if meta.mode() & 0o002 != 0 {
                "anyone"
            } else {
                "its group"
            }
        ))
    } else {
        None
    };
    match unsafe_because {
        Some(detail) => Err(Problem::UntrustedFile {
            path: path.to_owned(),
            what,
            detail,
        }),
        None => Ok(()),
    }
}

fn kind_of(meta: &Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// At most `MAX` characters of `text`, escaped: a line quoted in a message says what
/// was there without printing a whole file that was never meant to be a policy.
pub(super) fn excerpt(text: &str) -> String {
    const MAX: usize = 40;
    let mut out: String = text
        .chars()
        .take(MAX)
        .flat_map(char::escape_debug)
        .collect();
    if text.chars().nth(MAX).is_some() {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    const LIMIT: SizeLimit = SizeLimit {
        bytes: 1000,
        flag: "--max-test-bytes",
    };

    fn set_mode(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    fn roots_with(policy: &Path, included: &Path) -> Roots {
        let mut roots = Roots::of_policy(policy);
        roots
            .0
            .push(std::fs::canonicalize(included).expect("canonical"));
        roots
    }

    #[test]
    fn a_file_outside_the_policys_directories_is_refused() {
        let dir = policy_dir();
        let elsewhere = policy_dir();
        let file = elsewhere.path().join("eu.txt");
        std::fs::write(&file, "192.0.2.0/24\n").expect("write");
        let e = read_trusted(&file, &Roots::of_policy(dir.path()), LIMIT).expect_err("outside");
        assert!(e.to_string().contains("include_dirs"), "{e}");
        read_trusted(&file, &roots_with(dir.path(), elsewhere.path()), LIMIT)
            .expect("read once its directory is included");
    }

    fn policy_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("tempdir");
        set_mode(dir.path(), 0o755);
        dir
    }

    #[test]
    fn a_world_writable_file_or_directory_is_refused() {
        let dir = policy_dir();
        std::fs::create_dir(dir.path().join("regions")).expect("mkdir");
        let file = dir.path().join("regions/eu.txt");
        std::fs::write(&file, "192.0.2.0/24\n").expect("write");
        set_mode(&file, 0o644);
        read_trusted(&file, &Roots::of_policy(dir.path()), LIMIT).expect("a safe file is read");
        set_mode(&file, 0o666);
        let e =
            read_trusted(&file, &Roots::of_policy(dir.path()), LIMIT).expect_err("world-writable");
        assert!(
            e.to_string().contains("mode 0666, writable by anyone"),
            "{e}"
        );
        assert!(e.to_string().contains("regions/eu.txt"), "{e}");
        set_mode(&file, 0o644);
        set_mode(&dir.path().join("regions"), 0o775);
        let e = read_trusted(&file, &Roots::of_policy(dir.path()), LIMIT)
            .expect_err("group-writable dir");
        assert!(e.to_string().contains("directory"), "{e}");
        assert!(e.to_string().contains("writable by its group"), "{e}");
    }

    #[test]
    fn a_symlink_is_judged_by_its_target() {
        let dir = policy_dir();
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let target = elsewhere.path().join("eu.txt");
        std::fs::write(&target, "192.0.2.0/24\n").expect("write");
        set_mode(&target, 0o666);
        let link = dir.path().join("eu.txt");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");
        let e = read_trusted(&link, &roots_with(dir.path(), elsewhere.path()), LIMIT)
            .expect_err("unsafe target");
        assert!(e.to_string().contains("0666"), "{e}");
    }

    #[test]
    fn a_fifo_is_refused_without_waiting_for_a_writer() {
        let dir = policy_dir();
        let fifo = dir.path().join("fifo");
        let status = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("mkfifo");
        assert!(status.success());
        let e = read_trusted(&fifo, &Roots::of_policy(dir.path()), LIMIT).expect_err("a FIFO");
        assert!(
            e.to_string().contains("is a FIFO, not a regular file"),
            "{e}"
        );
    }

    #[test]
    fn a_file_over_the_limit_is_refused_naming_the_limit_and_the_flag() {
        let dir = policy_dir();
        let file = dir.path().join("big.txt");
        std::fs::write(&file, vec![b'#'; 1001]).expect("write");
        let e = read_trusted(&file, &Roots::of_policy(dir.path()), LIMIT).expect_err("too large");
        let m = e.to_string();
        assert!(m.contains("1001 bytes"), "{m}");
        assert!(m.contains("1000"), "{m}");
        assert!(m.contains("--max-test-bytes"), "{m}");
    }

    #[test]
    fn an_excerpt_is_short_and_escaped() {
        assert_eq!(excerpt("10.0.0.0/33"), "10.0.0.0/33");
        let long = format!(
            "root:x:0:0:root:/root:/bin/bash\u{1b}[2J{}",
            "x".repeat(100)
        );
        let e = excerpt(&long);
        assert!(e.ends_with('…'), "{e}");
        assert!(e.contains("\\u{1b}"), "{e}");
        assert!(!e.contains('\u{1b}'), "{e}");
    }
}
