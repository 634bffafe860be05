//! A tun device: an interface without a link-layer header, whose packets this process
//! reads as a VPN daemon would. What leaves the namespace through it arrives here.

use std::{
    fs::{File, OpenOptions},
    io::Read as _,
    net::IpAddr,
    os::{fd::AsRawFd as _, unix::fs::OpenOptionsExt as _},
};

use crate::netns::NetNs;

/// `_IOW('T', 202, int)` from linux/if_tun.h; libc does not define it.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

/// A tun device in a namespace, open for reading; the kernel removes it when this drops.
pub struct Tun {
    file: File,
    pub name: &'static str,
}

impl Tun {
    /// Creates tun device `name` in `ns` (IP packets without the packet-information
    /// prefix, as WireGuard-style daemons use it).
    pub fn create(ns: &NetNs, name: &'static str) -> Self {
        let file = ns.run(move || {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open("/dev/net/tun")
                .expect("open /dev/net/tun");
            // SAFETY: an all-zero ifreq is a valid value; the name fits with its NUL.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
                *dst = src as libc::c_char;
            }
            req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes the ifreq, which lives through the call.
            let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &raw mut req) };
            assert_eq!(
                rc,
                0,
                "TUNSETIFF {name}: {}",
                std::io::Error::last_os_error()
            );
            file
        });
        Self { file, name }
    }

    /// Reads every packet queued on the device (they are queued as they are sent) and
    /// counts the UDP datagrams to `dst:port`.
    pub fn udp_received(&mut self, dst: IpAddr, port: u16) -> u32 {
        self.udp_received_behind(0, dst, port)
    }

    /// As [`Self::udp_received`], for IP packets `skip` bytes into each packet (behind an
    /// MPLS label stack).
    pub fn udp_received_behind(&mut self, skip: usize, dst: IpAddr, port: u16) -> u32 {
        let mut buf = [0u8; 2048];
        let mut got = 0;
        loop {
            match self.file.read(&mut buf) {
                Ok(n) => got += u32::from(n > skip && is_udp_to(&buf[skip..n], dst, port)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return got,
                Err(e) => panic!("reading {}: {e}", self.name),
            }
        }
    }
}

fn is_udp_to(packet: &[u8], dst: IpAddr, port: u16) -> bool {
    let (protocol, to, l4) = match packet.first().map(|b| b >> 4) {
        Some(4) if packet.len() >= 20 => {
            let to: [u8; 4] = packet[16..20].try_into().expect("4 bytes");
            (
                packet[9],
                IpAddr::from(to),
                usize::from(packet[0] & 0x0f) * 4,
            )
        }
        Some(6) if packet.len() >= 40 => {
            let to: [u8; 16] = packet[24..40].try_into().expect("16 bytes");
            (packet[6], IpAddr::from(to), 40)
        }
        _ => return false,
    };
    protocol == 17 && to == dst && packet.get(l4 + 2..l4 + 4) == Some(&port.to_be_bytes()[..])
}
