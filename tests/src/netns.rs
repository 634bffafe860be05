//! Network-namespace sandboxes joined by veth pairs. Every address lives in namespaces
//! the test creates; nothing is sent anywhere else.

use std::{
    fmt::Write as _,
    fs::File,
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

static NS_COUNTER: AtomicU32 = AtomicU32::new(0);

fn split(args: &str) -> Vec<String> {
    args.split_whitespace().map(str::to_owned).collect()
}

/// Runs a command and panics with its output when it fails.
pub fn sh(args: &[&str]) -> Output {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("spawning {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A named network namespace, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(label: &str) -> Self {
        let n = NS_COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("df-{label}-{}-{n}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name]);
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        // No duplicate-address detection: links made next start usable at once, instead
        // of after a second or two of tentative link-local addresses during which
        // neighbour discovery does not answer.
        ns.exec(&[
            "sysctl",
            "-q",
            "-w",
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
        ]);
        ns
    }

    /// Runs `ip ARGS` inside the namespace; ARGS is split on whitespace.
    pub fn ip(&self, args: &str) -> Output {
        let mut full = vec!["ip".to_owned()];
        full.extend(split(args));
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        self.exec(&refs)
    }

    /// Runs a command inside the namespace.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["ip", "netns", "exec", &self.name];
        full.extend_from_slice(args);
        sh(&full)
    }

    /// Runs `f` on a thread that has entered the namespace; sockets it creates belong
    /// to the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        run_in(&self.name, f)
    }
}

/// Runs `f` on a thread that has entered the named namespace.
pub fn run_in<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = datafence_sandbox::netns_path(netns);
    std::thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        datafence_sandbox::enter(&file).unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
        f()
    })
    .join()
    .expect("namespace thread panicked")
}

impl NetNs {
    /// A command that runs in this network namespace; see [`command_in`].
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        command_in(&self.name, program)
    }
}

/// A command that runs in the named network namespace, and only that: unlike
/// `ip netns exec` it keeps the caller's mounts, so /sys/fs/cgroup stays visible.
pub fn command_in(netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
    datafence_sandbox::command_in(netns, program).unwrap_or_else(|e| panic!("{e}"))
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Never panic here: this may run while a failed test is already unwinding.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// Addresses of the standard sandbox: a "host" whose egress is enforced and a "world"
/// namespace that owns the addresses of every region.
pub mod addr {
    pub const HOST_V4: &str = "192.0.2.1";
    pub const WORLD_V4: &str = "192.0.2.2";
    pub const HOST_V6: &str = "2001:db8:1::1";
    pub const WORLD_V6: &str = "2001:db8:1::2";
    /// In the approved region (eu-west).
    pub const EU_V4: &str = "198.51.100.10";
    pub const EU_V6: &str = "2001:db8:100::10";
    /// In the unapproved region (us-east).
    pub const US_V4: &str = "203.0.113.10";
    pub const US_V6: &str = "2001:db8:300::10";
}

const HOST_MAC: &str = "02:df:00:00:00:01";
const WORLD_MAC: &str = "02:df:00:00:00:02";

/// Two namespaces joined by a veth pair: `host` (interface `up0`) and `world` (`dn0`).
pub struct Sandbox {
    pub host: NetNs,
    pub world: NetNs,
    pub uplink: &'static str,
}

impl Sandbox {
    pub fn new(label: &str) -> Self {
        let host = NetNs::new(&format!("{label}h"));
        let world = NetNs::new(&format!("{label}w"));
        for a in [addr::EU_V4, addr::US_V4] {
            world.ip(&format!("addr add {a}/32 dev lo"));
        }
        for a in [addr::EU_V6, addr::US_V6] {
            world.ip(&format!("-6 addr add {a}/128 dev lo nodad"));
        }
        let sandbox = Self {
            host,
            world,
            uplink: "up0",
        };
        sandbox.connect();
        sandbox
    }

    /// Makes the veth pair between host and world, with its addresses, static neighbours
    /// and the host's routes to the region servers.
    pub fn connect(&self) {
        let (host, world) = (&self.host, &self.world);
        let (h, w) = (&host.name, &world.name);
        let link = split(&format!(
            "ip link add up0 address {HOST_MAC} netns {h} type veth \
             peer name dn0 address {WORLD_MAC} netns {w}"
        ));
        sh(&link.iter().map(String::as_str).collect::<Vec<_>>());
        for (ns, dev, v4, v6) in [
            (host, "up0", addr::HOST_V4, addr::HOST_V6),
            (world, "dn0", addr::WORLD_V4, addr::WORLD_V6),
        ] {
            ns.ip(&format!("addr add {v4}/24 dev {dev}"));
            ns.ip(&format!("-6 addr add {v6}/64 dev {dev} nodad"));
            ns.ip(&format!("link set {dev} up"));
        }
        // Static neighbours: traffic flows from the first packet, with no ARP or neighbour
        // discovery racing the test.
        for (ns, dev, peer_v4, peer_v6, mac) in [
            (host, "up0", addr::WORLD_V4, addr::WORLD_V6, WORLD_MAC),
            (world, "dn0", addr::HOST_V4, addr::HOST_V6, HOST_MAC),
        ] {
            for peer in [peer_v4, peer_v6] {
                ns.ip(&format!(
                    "neigh replace {peer} lladdr {mac} dev {dev} nud permanent"
                ));
            }
        }
        for a in [addr::EU_V4, addr::US_V4] {
            host.ip(&format!("route add {a}/32 via {}", addr::WORLD_V4));
        }
        for a in [addr::EU_V6, addr::US_V6] {
            host.ip(&format!("-6 route add {a}/128 via {}", addr::WORLD_V6));
        }
    }

    /// Renames the host's uplink (a VLAN-like `up0.7`), and puts back what the kernel
    /// drops while it is down for the rename: its neighbour and the routes through it.
    pub fn rename_uplink(&mut self, name: &'static str) {
        let host = &self.host;
        host.ip(&format!("link set {} down", self.uplink));
        host.ip(&format!("link set {} name {name}", self.uplink));
        host.ip(&format!("link set {name} up"));
        host.ip(&format!(
            "neigh replace {} lladdr {WORLD_MAC} dev {name} nud permanent",
            addr::WORLD_V4
        ));
        for a in [addr::EU_V4, addr::US_V4] {
            host.ip(&format!("route replace {a}/32 via {}", addr::WORLD_V4));
        }
        self.uplink = name;
    }

    /// Removes the veth pair, as an unplugged NIC or a bond going down would.
    pub fn disconnect(&self) {
        self.host.ip("link del up0");
    }
}

/// Sends `count` UDP datagrams from the host namespace to `dst` and returns how many
/// the world namespace received. Bounded in count and time.
pub fn udp_delivered(sandbox: &Sandbox, dst: &str, port: u16, count: u32) -> u32 {
    udp_delivered_marked(sandbox, dst, port, count, 0)
}

/// As [`udp_delivered`], with `SO_MARK` set on the sending socket.
pub fn udp_delivered_marked(sandbox: &Sandbox, dst: &str, port: u16, count: u32, mark: u32) -> u32 {
    udp_delivered_sized(sandbox, dst, port, count, mark, 4)
}

/// As [`udp_delivered_marked`], with datagrams of `size` bytes: past the link's MTU
/// (1500 on the sandbox veths) the kernel sends each as IP fragments, and the receiver
/// counts only datagrams it could reassemble whole.
pub fn udp_delivered_sized(
    sandbox: &Sandbox,
    dst: &str,
    port: u16,
    count: u32,
    mark: u32,
    size: usize,
) -> u32 {
    udp_delivered_with(sandbox, dst, port, count, |dst_addr| {
        send_from_host(sandbox, dst_addr, count, mark, size);
    })
}

/// Sends `count` datagrams of `size` bytes to `dst_addr` from a socket in the host
/// namespace, with `SO_MARK` set to `mark` unless it is zero.
pub fn send_from_host(sandbox: &Sandbox, dst_addr: SocketAddr, count: u32, mark: u32, size: usize) {
    sandbox.host.run(move || {
        let unspecified: SocketAddr = if dst_addr.is_ipv4() {
            "0.0.0.0:0".parse().expect("addr")
        } else {
            "[::]:0".parse().expect("addr")
        };
        let sock = UdpSocket::bind(unspecified).expect("bind sender");
        if mark != 0 {
            set_mark(sock.as_raw_fd(), mark);
        }
        for i in 0..count {
            let mut datagram = i.to_be_bytes().to_vec();
            datagram.resize(size.max(4), 0x5a);
            // A denied datagram may fail at send time: that is the point.
            let _ = sock.send_to(&datagram, dst_addr);
        }
    });
}

/// Sends `count` datagrams from a separate process that runs in the host namespace and
/// in the cgroup whose `cgroup.procs` file is given.
pub fn udp_delivered_from_cgroup(
    sandbox: &Sandbox,
    cgroup_procs: &std::path::Path,
    dst: &str,
    port: u16,
    count: u32,
) -> u32 {
    udp_delivered_with(sandbox, dst, port, count, |dst_addr| {
        let script = "import socket,sys\n\
            host,port,n=sys.argv[1],int(sys.argv[2]),int(sys.argv[3])\n\
            fam=socket.AF_INET6 if ':' in host else socket.AF_INET\n\
            s=socket.socket(fam,socket.SOCK_DGRAM)\n\
            for i in range(n):\n\
            \x20\x20try: s.sendto(b'x',(host,port))\n\
            \x20\x20except OSError: pass\n";
        let mut cmd = sandbox.host.command("python3");
        cmd.args(["-c", script])
            .arg(dst_addr.ip().to_string())
            .arg(dst_addr.port().to_string())
            .arg(count.to_string());
        datafence::cgroups::spawn_in_cgroup(&mut cmd, cgroup_procs).expect("cgroup");
        let out = cmd.output().expect("spawn sender");
        assert!(
            out.status.success(),
            "sender: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    })
}

/// Binds a receiver for `dst:port` in the world namespace, runs `send`, and counts what
/// arrived.
pub fn udp_delivered_with(
    sandbox: &Sandbox,
    dst: &str,
    port: u16,
    count: u32,
    send: impl FnOnce(SocketAddr),
) -> u32 {
    udp_delivered_within(sandbox, dst, port, count, Duration::from_millis(300), send)
}

/// As [`udp_delivered_with`], waiting up to `quiet` for each next datagram: longer than
/// the default where delivery waits on the kernel, such as neighbour discovery, whose
/// solicitations are a second apart.
pub fn udp_delivered_within(
    sandbox: &Sandbox,
    dst: &str,
    port: u16,
    count: u32,
    quiet: Duration,
    send: impl FnOnce(SocketAddr),
) -> u32 {
    let dst_addr: SocketAddr = SocketAddr::new(dst.parse().expect("dst"), port);
    let receiver = sandbox.world.run(move || {
        // The previous receiver on this port may still be going away under load.
        let mut attempt = 0;
        let sock = loop {
            match UdpSocket::bind(dst_addr) {
                Ok(sock) => break sock,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && attempt < 100 => {
                    attempt += 1;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("bind receiver {dst_addr}: {e}"),
            }
        };
        sock.set_read_timeout(Some(quiet)).expect("timeout");
        sock
    });
    send(dst_addr);
    let mut got = 0;
    let mut buf = [0u8; 64];
    while receiver.recv_from(&mut buf).is_ok() {
        got += 1;
        if got == count {
            break;
        }
    }
    got
}

/// A packet socket for every protocol, bound to `interface` of the calling thread's
/// namespace.
fn packet_socket(interface: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd as _;
    let all = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket(2); the fd is owned below.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(all)) };
    assert!(
        fd >= 0,
        "packet socket: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is a new descriptor that nothing else owns.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(interface).expect("interface name");
    // SAFETY: if_nametoindex with a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert!(ifindex != 0, "no interface {interface}");
    // SAFETY: an all-zero sockaddr_ll is valid; the fields that matter are set below.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = all;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: bind(2) with a sockaddr_ll of the size given.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const sll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "bind packet socket: {}",
        std::io::Error::last_os_error()
    );
    fd
}

/// Sends each frame out of the host's uplink from a packet socket, as a process with
/// CAP_NET_RAW can (through the qdisc layer, so TC egress sees it), with the sandbox's
/// MAC addresses put in, and counts how many arrive unchanged at the world's end.
pub fn frames_delivered(sandbox: &Sandbox, frames: &[Vec<u8>]) -> usize {
    frames_delivered_by(sandbox, frames, |frames| send_frames(sandbox, frames))
}

/// As [`frames_delivered`], with `send` sending the frames (their MAC addresses put in).
pub fn frames_delivered_by(
    sandbox: &Sandbox,
    frames: &[Vec<u8>],
    send: impl FnOnce(&[Vec<u8>]),
) -> usize {
    let mac = |text: &str| -> Vec<u8> {
        text.split(':')
            .map(|b| u8::from_str_radix(b, 16).expect("MAC"))
            .collect()
    };
    let frames: Vec<Vec<u8>> = frames
        .iter()
        .map(|f| {
            let mut f = f.clone();
            f[0..6].copy_from_slice(&mac(WORLD_MAC));
            f[6..12].copy_from_slice(&mac(HOST_MAC));
            f
        })
        .collect();
    let receiver = sandbox.world.run(|| packet_socket("dn0"));
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 300_000,
    };
    // SAFETY: setsockopt with a timeval of the size given.
    let rc = unsafe {
        libc::setsockopt(
            receiver.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_RCVTIMEO");
    send(&frames);
    let mut unmatched = frames;
    let mut got = 0;
    let mut buf = vec![0u8; 65536];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        // SAFETY: recv(2) into a buffer of the length given.
        let n = unsafe { libc::recv(receiver.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        let Ok(n) = usize::try_from(n) else { break };
        if let Some(i) = unmatched.iter().position(|f| f[..] == buf[..n]) {
            unmatched.swap_remove(i);
            got += 1;
        }
    }
    got
}

/// Sends frames out of the host's uplink from this process's packet socket. A frame
/// dropped on the way out is not an error.
pub fn send_frames(sandbox: &Sandbox, frames: &[Vec<u8>]) {
    let uplink = sandbox.uplink;
    let to_send = frames.to_vec();
    sandbox.host.run(move || {
        let sender = packet_socket(uplink);
        for f in &to_send {
            // SAFETY: send(2) of a buffer of the length given.
            let n = unsafe { libc::send(sender.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
            // A frame dropped on the way out fails with ENOBUFS: that is the point.
            let error = std::io::Error::last_os_error();
            assert!(
                n == f.len() as isize || error.raw_os_error() == Some(libc::ENOBUFS),
                "send: {error}"
            );
        }
    });
}

/// As [`send_frames`], from a separate process in the host namespace and in the cgroup
/// whose `cgroup.procs` file is given: its packet socket belongs to that cgroup.
pub fn send_frames_from_cgroup(
    sandbox: &Sandbox,
    cgroup_procs: &std::path::Path,
    frames: &[Vec<u8>],
) {
    let script = "import socket,sys\n\
        s=socket.socket(socket.AF_PACKET,socket.SOCK_RAW)\n\
        s.bind((sys.argv[1],0))\n\
        for f in sys.argv[2:]:\n\
        \x20\x20try: s.send(bytes.fromhex(f))\n\
        \x20\x20except OSError: pass\n";
    let mut cmd = sandbox.host.command("python3");
    cmd.args(["-c", script]).arg(sandbox.uplink);
    for f in frames {
        cmd.arg(f.iter().fold(String::new(), |mut hex, b| {
            let _ = write!(hex, "{b:02x}");
            hex
        }));
    }
    datafence::cgroups::spawn_in_cgroup(&mut cmd, cgroup_procs).expect("cgroup");
    let out = cmd.output().expect("spawn sender");
    assert!(
        out.status.success(),
        "sender: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether a TCP connection from the host namespace to `dst` completes.
pub fn tcp_connects(sandbox: &Sandbox, dst: &str, port: u16) -> bool {
    let addr: SocketAddr = SocketAddr::new(dst.parse().expect("dst"), port);
    let listener = sandbox
        .world
        .run(move || TcpListener::bind(addr).expect("bind listener"));
    let ok = sandbox
        .host
        .run(move || TcpStream::connect_timeout(&addr, Duration::from_millis(800)).is_ok());
    drop(listener);
    ok
}

/// Sets `SO_MARK` on a socket, as a service marking its user data would.
pub fn set_mark(fd: i32, mark: u32) {
    // SAFETY: setsockopt with a valid fd and a correctly sized u32 option.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&raw const mark).cast(),
            std::mem::size_of::<u32>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_MARK: {}", std::io::Error::last_os_error());
}
