//! One agent per pin directory. Two agents that adopt the same pinned maps would each
//! write their own policy into them, so the agent holds an exclusive `flock` on the pin
//! directory itself for as long as it runs; the kernel lets go of it when the process
//! ends, however it ends. `detach` takes it too before removing anything.

#![forbid(unsafe_code)]

use std::{
    fs::{File, TryLockError},
    os::unix::fs::MetadataExt as _,
    path::Path,
};

use super::{DatapathError, Result};

/// The exclusive lock on a pin directory, held while this value lives.
#[derive(Debug)]
pub struct PinLock {
    _dir: File,
}

impl PinLock {
    /// Takes the lock on `pin_dir` (which must exist), or says who holds it.
    pub fn acquire(pin_dir: &Path) -> Result<Self> {
        let io_err = |source| DatapathError::PinLock {
            path: pin_dir.to_owned(),
            source,
        };
        let dir = File::open(pin_dir).map_err(io_err)?;
        match dir.try_lock() {
            Ok(()) => Ok(Self { _dir: dir }),
            Err(TryLockError::WouldBlock) => Err(DatapathError::PinsInUse {
                path: pin_dir.to_owned(),
                holder: holder(&dir).map_or_else(
                    || "another process".to_owned(),
                    |pid| format!("process {pid}{}", command_of(pid)),
                ),
            }),
            Err(TryLockError::Error(source)) => Err(io_err(source)),
        }
    }
}

/// The process holding a `flock` on `file`, from `/proc/locks` (which names the holder by
/// pid, device and inode).
fn holder(file: &File) -> Option<u32> {
    let meta = file.metadata().ok()?;
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    holder_in(&locks, meta.dev(), meta.ino())
}

/// `/proc/locks` lines read `1: FLOCK  ADVISORY  WRITE 28158 00:28:1 0 EOF`: the device
/// as hexadecimal major:minor, then the inode.
fn holder_in(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let (major, minor) = (
        ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff),
        (dev & 0xff) | ((dev >> 12) & !0xff),
    );
    let wanted = format!("{major:02x}:{minor:02x}:{ino}");
    locks.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // A blocked waiter's line starts with `->`; only the holder's counts.
        if fields.first()?.starts_with("->") || fields.get(1)? != &"FLOCK" {
            return None;
        }
        (fields.get(5)? == &wanted).then(|| fields.get(4)?.parse().ok())?
    })
}

/// ` (comm)` for a pid, when it can be read.
fn command_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|c| format!(" ({})", c.trim()))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = PinLock::acquire(dir.path()).expect("first lock");
        let err = PinLock::acquire(dir.path()).expect_err("second lock");
        let message = err.to_string();
        assert!(
            message.contains(&format!("process {}", std::process::id())),
            "{message}"
        );
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
        drop(first);
        PinLock::acquire(dir.path()).expect("the lock is free again");
    }

    #[test]
    fn the_holder_is_found_by_device_and_inode() {
        let locks = "1: FLOCK  ADVISORY  WRITE 28158 00:28:1 0 EOF\n\
                     1: -> FLOCK  ADVISORY  WRITE 999 00:28:1 0 EOF\n\
                     2: POSIX  ADVISORY  WRITE 77 00:28:5 0 EOF\n";
        // Device 0:0x28 as the kernel encodes it.
        let dev = 0x28;
        assert_eq!(holder_in(locks, dev, 1), Some(28158));
        assert_eq!(holder_in(locks, dev, 5), None, "a POSIX lock is not ours");
        assert_eq!(holder_in(locks, dev, 2), None);
    }
}
