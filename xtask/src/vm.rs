//! QEMU guests for the kernel matrix: the Debian kernels the kernel tests also run on, the
//! tools that boot them (QEMU, virtme-ng, virtiofsd), how `cargo xtask setup` installs them,
//! and the command that boots one guest to run one script.
//!
//! A guest shares the host's root filesystem read-only over virtiofs, so it runs the very
//! test binaries and `datafence` binary built on the host. Our machines have no usable
//! hardware virtualisation (`/dev/kvm` exists but fails), so QEMU emulates the CPU (TCG).

use std::{
    env, fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::setup::{self, step, tools_dir};
use crate::util::{self, output};

/// A Debian kernel the matrix boots, pinned to one package version.
pub(crate) struct Kernel {
    /// What `cargo xtask test --kernels` calls it.
    pub(crate) name: &'static str,
    package: &'static str,
    /// Exact: `apt-get download` fails rather than fetch another build.
    version: &'static str,
    /// `uname -r` of the kernel, which names its image and modules directory.
    release: &'static str,
}

/// 6.1 is Debian 12's own kernel and attaches with clsact (tcx only exists from 6.6); 6.12,
/// from bookworm-security, attaches with tcx. The host kernel is the third column.
///
/// To move a pin: `apt-get update && apt-cache policy PACKAGE` lists what the archive has.
/// bookworm-security keeps only the newest build of a package, so a pin there can vanish;
/// setup then fails saying so, and the kernels already extracted keep working.
pub(crate) const KERNELS: &[Kernel] = &[
    Kernel {
        name: "6.1",
        package: "linux-image-6.1.0-57-cloud-amd64-unsigned",
        version: "6.1.192-3",
        release: "6.1.0-57-cloud-amd64",
    },
    Kernel {
        name: "6.12",
        package: "linux-image-6.12.117+deb12-cloud-amd64-unsigned",
        version: "6.12.117-1~deb12u1",
        release: "6.12.117+deb12-cloud-amd64",
    },
];

/// virtme-ng and every package it pulls in, installed with `--no-deps` so that nothing
/// floats. 1.42 boots the cloud kernels above in 6-8 s under TCG.
const VIRTME_NG_REQUIREMENTS: &[&str] = &[
    "virtme-ng==1.42",
    "argcomplete==3.7.2",
    "requests==2.34.2",
    "certifi==2026.10.19.post1",
    "charset-normalizer==3.5.3",
    "idna==3.20",
    "urllib3==2.8.0",
];
const VIRTME_NG_VERSION: &str = "1.42";

/// The cloud kernels have no 9p, so the guest's root filesystem needs virtiofs. Debian 12's
/// bundled C virtiofsd refuses the flags virtme-ng passes; the Rust daemon takes them.
const VIRTIOFSD_VERSION: &str = "1.14.0";

/// Host commands the guests need, and their Debian packages. What the tests themselves call
/// (ip, nft, setpriv, ...) is in setup's own list: the guest runs the host's userspace.
const HOST_TOOLS: &[(&str, &str)] = &[
    ("qemu-system-x86_64", "qemu-system-x86"),
    // virtme-ng's guest init runs the host's udevd; without it the guest's exit code is lost.
    ("udevadm", "udev"),
    // The cloud kernels build virtiofs as a module (6.1), so the guest boots through an
    // initramfs that virtme-ng builds around a static busybox.
    ("busybox", "busybox-static"),
    // depmod indexes the extracted modules; modprobe loads veth, sch_ingress and cls_bpf.
    ("depmod", "kmod"),
    ("modprobe", "kmod"),
    // virtme-ng reads a kernel image's version with `file`.
    ("file", "file"),
    ("pkg-config", "pkg-config"),
];

/// Packages with no command to look for: Debian's venv module for virtme-ng's venv, and the
/// libraries virtiofsd builds against.
const HOST_PACKAGES: &[&str] = &["python3-venv", "libseccomp-dev", "libcap-ng-dev"];

/// The interpreter of virtme-ng's venv: Debian's, whatever else is first on PATH.
const PYTHON: &str = "/usr/bin/python3";

/// Makes the host able to boot every kernel of [`KERNELS`]. Called by `cargo xtask setup`;
/// each step checks before it acts.
pub(crate) fn ensure_installed() -> Result<()> {
    setup::ensure_commands("kernel matrix tools", HOST_TOOLS)?;
    setup::ensure_debian_packages("kernel matrix packages", HOST_PACKAGES)?;
    ensure_virtme_ng()?;
    ensure_virtiofsd()?;
    for kernel in KERNELS {
        kernel.ensure_extracted()?;
    }
    Ok(())
}

impl Kernel {
    pub(crate) fn by_name(name: &str) -> Option<&'static Kernel> {
        KERNELS.iter().find(|kernel| kernel.name == name)
    }

    /// Where the package is extracted, named by its exact version so a new pin never finds
    /// the files of an old one.
    fn dir(&self) -> Result<PathBuf> {
        Ok(tools_dir()?
            .join("kernels")
            .join(format!("{}_{}", self.package, self.version)))
    }

    fn image(&self) -> Result<PathBuf> {
        Ok(self
            .dir()?
            .join("boot")
            .join(format!("vmlinuz-{}", self.release)))
    }

    fn modules_dep(dir: &Path, release: &str) -> PathBuf {
        dir.join("lib/modules").join(release).join("modules.dep")
    }

    fn ensure_extracted(&self) -> Result<()> {
        let what = format!("kernel {} ({} {})", self.name, self.package, self.version);
        let dir = self.dir()?;
        if self.image()?.is_file() && Self::modules_dep(&dir, self.release).is_file() {
            step(&what, "present");
            return Ok(());
        }
        step(&what, "downloading and extracting");
        let kernels = dir.parent().context("kernel dir has a parent")?;
        let download = kernels.join("download");
        let partial = kernels.join(format!("{}.partial", self.package));
        for stale in [&download, &partial] {
            if stale.exists() {
                fs::remove_dir_all(stale)
                    .with_context(|| format!("removing {}", stale.display()))?;
            }
        }
        fs::create_dir_all(&download)
            .with_context(|| format!("creating {}", download.display()))?;
        self.download(&download)?;
        let deb = single_deb(&download)?;
        // Extracted only, never installed: the host keeps its own kernel.
        util::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial))?;
        // The package ships no modules.dep (the postinst makes it); the guest's modprobe
        // needs one, and virtme-ng would otherwise write it at every boot.
        util::run(
            Command::new("depmod")
                .arg("-b")
                .arg(&partial)
                .arg(self.release),
        )?;
        fs::rename(&partial, &dir)
            .with_context(|| format!("moving {} to {}", partial.display(), dir.display()))?;
        fs::remove_dir_all(&download).with_context(|| format!("removing {}", download.display()))
    }

    fn download(&self, into: &Path) -> Result<()> {
        let pinned = format!("{}={}", self.package, self.version);
        let mut get = Command::new("apt-get");
        get.args(["download", &pinned]).current_dir(into);
        if util::run(&mut get).is_ok() {
            return Ok(());
        }
        // A machine whose package lists predate the pin knows nothing of it yet.
        util::run(Command::new("apt-get").arg("update"))?;
        util::run(&mut get).with_context(|| {
            format!(
                "{pinned} is not in the Debian archive this machine uses (bookworm and \
                 bookworm-security in its apt sources); if the archive moved on, pin a \
                 version that `apt-cache policy {}` lists, in xtask/src/vm.rs",
                self.package
            )
        })
    }

    /// A command that boots this kernel with `cpus` emulated CPUs and runs `script` (a shell
    /// script on the host's filesystem) as root in the guest. Its exit code is the script's.
    pub(crate) fn boot(&self, cpus: u32, script: &Path) -> Result<Command> {
        let image = self.image()?;
        if !image.is_file() {
            bail!(
                "kernel {} is not extracted ({} missing): run `cargo xtask setup`",
                self.name,
                image.display()
            );
        }
        let venv = virtme_ng_dir()?;
        let virtiofsd = virtiofsd_root()?.join("bin");
        // vng runs virtme-run, and virtme-run finds virtiofsd, both through PATH.
        let path = env::join_paths(
            [venv.join("bin"), virtiofsd]
                .into_iter()
                .chain(env::split_paths(&env::var_os("PATH").unwrap_or_default())),
        )
        .context("joining PATH")?;
        let mut cmd = Command::new(venv.join("bin").join("vng"));
        cmd.arg("--run")
            .arg(&image)
            .args([
                "--disable-kvm",
                "--cpus",
                &cpus.to_string(),
                "--memory",
                "4G",
            ])
            .arg("--exec")
            .arg(format!("sh {}", util::quote(script.as_os_str())))
            .env("PATH", path)
            .current_dir(util::workspace_root())
            .stdin(Stdio::null());
        Ok(cmd)
    }
}

fn single_deb(dir: &Path) -> Result<PathBuf> {
    let debs: Vec<PathBuf> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| Some(entry.ok()?.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .collect();
    match debs.as_slice() {
        [deb] => Ok(deb.clone()),
        _ => bail!(
            "expected one .deb in {}, found {}",
            dir.display(),
            debs.len()
        ),
    }
}

fn virtme_ng_dir() -> Result<PathBuf> {
    Ok(tools_dir()?.join(format!("virtme-ng-{VIRTME_NG_VERSION}")))
}

fn virtiofsd_root() -> Result<PathBuf> {
    Ok(tools_dir()?.join(format!("virtiofsd-{VIRTIOFSD_VERSION}")))
}

/// `PROGRAM --version` prints `expected` (e.g. "virtme-ng 1.42").
fn reports_version(program: &Path, expected: &str) -> bool {
    program.is_file()
        && output(Command::new(program).arg("--version")).is_ok_and(|out| out.trim() == expected)
}

fn ensure_virtme_ng() -> Result<()> {
    let what = format!("virtme-ng {VIRTME_NG_VERSION}");
    let venv = virtme_ng_dir()?;
    if reports_version(
        &venv.join("bin/vng"),
        &format!("virtme-ng {VIRTME_NG_VERSION}"),
    ) {
        step(&what, "present");
        return Ok(());
    }
    step(&what, format_args!("installing into {}", venv.display()));
    if venv.exists() {
        fs::remove_dir_all(&venv).with_context(|| format!("removing {}", venv.display()))?;
    }
    util::run(Command::new(PYTHON).args(["-m", "venv"]).arg(&venv))?;
    util::run(
        Command::new(venv.join("bin/pip"))
            .args([
                "install",
                "--disable-pip-version-check",
                "--no-input",
                "--no-deps",
                "--only-binary",
                ":all:",
            ])
            .args(VIRTME_NG_REQUIREMENTS),
    )
}

fn ensure_virtiofsd() -> Result<()> {
    let what = format!("virtiofsd {VIRTIOFSD_VERSION}");
    let root = virtiofsd_root()?;
    if reports_version(
        &root.join("bin/virtiofsd"),
        &format!("virtiofsd {VIRTIOFSD_VERSION}"),
    ) {
        step(&what, "present");
        return Ok(());
    }
    step(&what, "installing (about a minute)");
    // From the workspace root, so the toolchain is the one rust-toolchain.toml pins there.
    util::run(
        util::cargo()
            .args(["install", "virtiofsd", "--locked", "--version"])
            .arg(format!("={VIRTIOFSD_VERSION}"))
            .arg("--root")
            .arg(&root),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_are_unique_and_not_host() {
        for (i, kernel) in KERNELS.iter().enumerate() {
            assert_ne!(kernel.name, "host");
            assert!(KERNELS[i + 1..].iter().all(|k| k.name != kernel.name));
            assert!(kernel.package.contains(kernel.release));
        }
    }

    #[test]
    fn virtme_ng_pin_is_in_the_requirements() {
        let pin = format!("virtme-ng=={VIRTME_NG_VERSION}");
        assert!(VIRTME_NG_REQUIREMENTS.contains(&pin.as_str()));
    }
}
