//! Helpers shared by the subcommands: running commands with useful errors, finding programs,
//! and checking privileges.

use std::{
    env,
    ffi::OsStr,
    fs,
    io::ErrorKind,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// The workspace root, so commands behave the same whatever directory `cargo xtask` ran from.
pub(crate) fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
}

/// `cargo` through the rustup proxy, so `+nightly` works, run from the workspace root.
pub(crate) fn cargo() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs `cmd` with inherited stdio, echoing it first; the error names the command.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    eprintln!("$ {shown}");
    let status = cmd.status().map_err(|err| spawn_error(cmd, &shown, err))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` quietly and returns its stdout; on failure the error carries its stderr.
pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let shown = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|err| spawn_error(cmd, &shown, err))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!("`{shown}` failed ({}): {}", out.status, stderr.trim());
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{shown}` printed non-UTF-8 output"))
}

fn spawn_error(cmd: &Command, shown: &str, err: std::io::Error) -> anyhow::Error {
    let program = cmd.get_program().to_string_lossy();
    let hint = if err.kind() == ErrorKind::NotFound {
        format!(" (is `{program}` installed and on PATH?)")
    } else {
        String::new()
    };
    anyhow::Error::new(err).context(format!("could not start `{shown}`{hint}"))
}

/// The command as a shell line, with the environment it sets, for logs and errors.
pub(crate) fn display(cmd: &Command) -> String {
    let envs = cmd
        .get_envs()
        .filter_map(|(key, value)| Some(format!("{}={}", key.display(), quote(value?))));
    let words = std::iter::once(quote(cmd.get_program())).chain(cmd.get_args().map(quote));
    envs.chain(words).collect::<Vec<_>>().join(" ")
}

pub(crate) fn quote(word: &OsStr) -> String {
    let word = word.to_string_lossy();
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-+=:,./@%".contains(c));
    if plain {
        word.into_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// Finds an executable like `which`. Also looks in the sbin directories, which are often
/// missing from a non-root PATH although ip, nft and friends live there.
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| {
            fs::metadata(candidate)
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Capability numbers from linux/capability.h.
pub(crate) const CAP_NET_ADMIN: u32 = 12;
pub(crate) const CAP_SYS_ADMIN: u32 = 21;
pub(crate) const CAP_BPF: u32 = 39;

/// The effective uid and capability set of this process. Read from /proc because std has no
/// geteuid, and the capability set is what the kernel actually checks (root in an
/// unprivileged container has uid 0 but not CAP_BPF).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Privileges {
    pub(crate) euid: u32,
    cap_eff: u64,
}

impl Privileges {
    pub(crate) fn current() -> Result<Self> {
        let status =
            fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .map(str::trim)
                .with_context(|| format!("no `{name}` line in /proc/self/status"))
        };
        // "Uid:  real  effective  saved  filesystem"
        let euid = field("Uid:")?
            .split_whitespace()
            .nth(1)
            .and_then(|uid| uid.parse().ok())
            .context("unparsable Uid line in /proc/self/status")?;
        let cap_eff = u64::from_str_radix(field("CapEff:")?, 16)
            .context("unparsable CapEff line in /proc/self/status")?;
        Ok(Self { euid, cap_eff })
    }

    pub(crate) fn has_cap(self, cap: u32) -> bool {
        self.cap_eff & (1 << cap) != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_only_when_needed() {
        let mut cmd = Command::new("cargo");
        cmd.args(["test", "--", "a b", "it's"])
            .env("LLVM_PREFIX", "/x/llvm");
        assert_eq!(
            display(&cmd),
            r"LLVM_PREFIX=/x/llvm cargo test -- 'a b' 'it'\''s'"
        );
    }

    #[test]
    fn privileges_parse_on_this_machine() {
        Privileges::current().unwrap();
    }
}
