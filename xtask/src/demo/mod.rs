//! `cargo xtask demo`: datafence enforcing a real policy, end to end, in a sandbox of
//! network namespaces that it builds and removes again.
//!
//! Layout: a "host" namespace, whose egress the agent enforces, has one veth link to each
//! of three region namespaces (eu-west, eu-north, us-east). Each region namespace owns a
//! server address from a documentation range and runs an HTTP server and a UDP echo
//! server. Clients in the host namespace talk to every server, once as user data (in the
//! cgroup that policies/demo.yaml names) and once as other traffic. Nothing is sent
//! outside these namespaces.
#![allow(
    clippy::wildcard_imports,
    reason = "one command split into files by concern: its modules share one namespace"
)]

use std::{
    env,
    ffi::OsStr,
    fmt::Write as _,
    fs::{self, File},
    io::{self, BufRead as _, IsTerminal as _, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket},
    os::{
        fd::AsRawFd as _,
        unix::{fs::MetadataExt as _, process::CommandExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Args;

use crate::{setup, util};

mod output;
mod probes;
mod sandbox;
mod steps;

use output::*;
use probes::*;
use sandbox::*;
use steps::*;

#[derive(Args)]
pub(crate) struct Options {
    /// Skip `cargo xtask setup` and the build; use the agent binary already built.
    #[arg(long)]
    no_build: bool,
    /// Build and run the release agent instead of the debug one that `cargo xtask test`
    /// also builds.
    #[arg(long)]
    release: bool,
    /// At the end, leave the sandbox and the agent running until Enter or Ctrl-C, to try
    /// things by hand.
    #[arg(long)]
    keep: bool,
}

/// Every namespace the demo makes starts with this, so a crashed run's leftovers can be
/// found and removed.
const NS_PREFIX: &str = "dfdemo-";
const HOST_NS: &str = "dfdemo-host";
/// The user-data cgroup, relative to the cgroup2 mount, as policies/demo.yaml names it.
const CGROUP: &str = "/datafence-demo/user-api";
const METRICS_ADDR: &str = "127.0.0.1:9477";
const HTTP_PORT: u16 = 80;
const UDP_PORT: u16 = 7007;
/// How long a client waits before calling a destination blocked. Dropped packets give no
/// error, only silence, so this bounds every blocked probe.
const CLIENT_TIMEOUT_SECS: &str = "2";
const POLICY: &str = "policies/demo.yaml";

struct Region {
    name: &'static str,
    netns: &'static str,
    /// The host namespace's interface towards this region; policies/demo.yaml lists these
    /// as the egress interfaces.
    host_if: &'static str,
    server_v4: Ipv4Addr,
    server_v6: Ipv6Addr,
    /// What the host routes through the region's link. Keep these inside the region's
    /// CIDRs in policies/demo.yaml.
    route_v4: &'static str,
    route_v6: &'static str,
}

const REGIONS: [Region; 3] = [
    Region {
        name: "eu-west",
        netns: "dfdemo-eu-west",
        host_if: "to-eu-west",
        server_v4: Ipv4Addr::new(198, 51, 100, 10),
        server_v6: Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10),
        route_v4: "198.51.100.0/24",
        route_v6: "2001:db8:100::/48",
    },
    Region {
        name: "eu-north",
        netns: "dfdemo-eu-north",
        host_if: "to-eu-north",
        server_v4: Ipv4Addr::new(198, 18, 0, 10),
        server_v6: Ipv6Addr::new(0x2001, 0xdb8, 0x200, 0, 0, 0, 0, 0x10),
        route_v4: "198.18.0.0/24",
        route_v6: "2001:db8:200::/48",
    },
    Region {
        name: "us-east",
        netns: "dfdemo-us-east",
        host_if: "to-us-east",
        server_v4: Ipv4Addr::new(203, 0, 113, 10),
        server_v6: Ipv6Addr::new(0x2001, 0xdb8, 0x300, 0, 0, 0, 0, 0x10),
        route_v4: "203.0.113.0/24",
        route_v6: "2001:db8:300::/48",
    },
];

/// The region user data may not reach under policies/demo.yaml.
const FORBIDDEN_REGION: &str = "us-east";

/// The link between the host and region `index`: a /30 and a /64 of documentation
/// space, outside every region, with fixed MACs so neighbours can be static.
struct Link {
    host_v4: String,
    region_v4: String,
    host_v6: String,
    region_v6: String,
    host_mac: String,
    region_mac: String,
}

impl Link {
    fn new(index: usize) -> Self {
        let base = 4 * index;
        let subnet = index + 1;
        Self {
            host_v4: format!("192.0.2.{}", base + 1),
            region_v4: format!("192.0.2.{}", base + 2),
            host_v6: format!("2001:db8:ffff:{subnet}::1"),
            region_v6: format!("2001:db8:ffff:{subnet}::2"),
            host_mac: format!("02:df:de:00:{index:02x}:01"),
            region_mac: format!("02:df:de:00:{index:02x}:02"),
        }
    }
}

pub(crate) fn run(opts: Options) -> Result<()> {
    let result = demo(&opts);
    if interrupted() {
        bail!("interrupted; the demo removed everything it had set up");
    }
    result
}

fn demo(opts: &Options) -> Result<()> {
    let started = Instant::now();
    let privileges = util::Privileges::current()?;
    let capable = [util::CAP_NET_ADMIN, util::CAP_SYS_ADMIN, util::CAP_BPF]
        .into_iter()
        .all(|cap| privileges.has_cap(cap));
    if !capable {
        bail!(
            "the demo creates network namespaces and cgroups and loads eBPF programs: \
             run it as root"
        );
    }
    let style = Style::detect();
    println!(
        "{}",
        style.bold("datafence demo: user data may reach only eu-west and eu-north")
    );
    println!("Everything runs in network namespaces made for the demo and removed at the end.");

    style.heading(1, "Preparing the tools and the agent");
    let agent_bin = prepare(opts)?;
    // Only now: until the sandbox exists there is nothing to clean up, and Ctrl-C should
    // stop setup and cargo the usual way rather than let them carry on after their
    // children were killed.
    install_signal_handlers()?;
    for program in ["ip", "curl", "python3"] {
        if util::find_program(program).is_none() {
            bail!("the demo needs `{program}`; `cargo xtask setup` installs it");
        }
    }
    check_interrupt()?;

    let mut demo = Demo::new(agent_bin, style)?;
    demo.build_sandbox()?;
    check_interrupt()?;
    demo.start_agent()?;
    check_interrupt()?;
    demo.show_enforcement()?;
    check_interrupt()?;
    demo.show_audit_reload()?;
    check_interrupt()?;
    if opts.keep {
        demo.wait_for_enter();
    }

    style.heading(8, "Cleaning up");
    demo.teardown();
    println!(
        "  removed the agent, servers, namespaces {NS_PREFIX}*, cgroup {CGROUP} and {}",
        demo.tmp.display()
    );
    println!();
    if demo.surprises.is_empty() {
        println!(
            "{} in {:.1}s: user data reached eu-west and eu-north only, other traffic went \
             everywhere, and audit mode let everything through while reporting it.",
            style.bold("Demo complete"),
            started.elapsed().as_secs_f64()
        );
        Ok(())
    } else {
        bail!(
            "the demo did not behave as expected:\n  {}",
            demo.surprises.join("\n  ")
        )
    }
}

/// Runs setup and builds the agent, unless told not to; returns the agent binary.
fn prepare(opts: &Options) -> Result<PathBuf> {
    let profile = if opts.release { "release" } else { "debug" };
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| util::workspace_root().join("target"), PathBuf::from);
    let binary = target_dir.join(profile).join("datafence");
    if opts.no_build {
        println!("  --no-build: using {}", binary.display());
    } else {
        println!("  cargo xtask setup (quick when already done):");
        setup::run(setup::Options {})?;
        println!("  building the agent ({profile}):");
        let mut build = util::cargo();
        build.args(["build", "--package", "datafence", "--bin", "datafence"]);
        if opts.release {
            build.arg("--release");
        }
        util::run(&mut build)?;
    }
    if !binary.is_file() {
        bail!(
            "{} does not exist; build it with `cargo build -p datafence{}`",
            binary.display(),
            if opts.release { " --release" } else { "" }
        );
    }
    Ok(binary)
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
    let message = b"\ndemo: interrupted, cleaning up...\n";
    // SAFETY: write(2) is async-signal-safe and the buffer is static.
    unsafe { libc::write(2, message.as_ptr().cast(), message.len()) };
}

/// Ctrl-C (and SIGTERM, SIGHUP) only sets a flag, which the demo checks between steps:
/// every step is bounded in time, and unwinding through `Demo`'s drop is what removes the
/// namespaces, the cgroup and the agent.
fn install_signal_handlers() -> Result<()> {
    for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is a valid starting point; the handler only touches
        // an atomic and calls write(2).
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&raw mut action.sa_mask);
            libc::sigaction(signal, &raw const action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error()).context("installing a signal handler");
        }
    }
    Ok(())
}

fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupt() -> Result<()> {
    if interrupted() {
        bail!("interrupted");
    }
    Ok(())
}
