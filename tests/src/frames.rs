//! Crafted Ethernet frames for `BPF_PROG_TEST_RUN`. Hand-built on purpose: the tests need
//! frames that are truncated or malformed at exact header boundaries, which packet
//! libraries refuse to produce.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const ICMP: u8 = 1;

/// A frame under construction, with the offsets of its headers for truncation tests.
#[derive(Clone, Debug)]
pub struct Frame {
    pub bytes: Vec<u8>,
    /// Offsets at which a header starts: Ethernet, each VLAN tag, IP, each extension
    /// header, transport. Cutting the frame anywhere strictly inside [first, end) of a
    /// header truncates it.
    pub boundaries: Vec<usize>,
    /// Where the IP header starts.
    pub ip_start: usize,
}

#[derive(Clone, Debug)]
pub struct Spec {
    pub vlans: Vec<u16>,
    /// 0x8100 tags unless set: the outer tag of QinQ uses 0x88a8.
    pub qinq: bool,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    pub src_port: u16,
    pub dst_port: u16,
    pub dscp: u8,
    /// IPv4 option bytes (padded to a multiple of 4).
    pub ipv4_options: Vec<u8>,
    /// IPv4 fragment offset in 8-byte units (non-zero means a non-first fragment).
    pub fragment_offset: u16,
    /// IPv4's more-fragments flag: with offset 0, a first fragment.
    pub more_fragments: bool,
    /// IPv4's identification, which names the datagram a fragment belongs to.
    pub ipv4_id: u16,
    /// IPv6 extension headers, in order: (next-header number, body after the 2 common
    /// bytes). Routing and fragment headers are built with [`ipv6_routing`] and
    /// [`ipv6_fragment`].
    pub ipv6_ext: Vec<(u8, Vec<u8>)>,
    pub payload: Vec<u8>,
}

impl Spec {
    pub fn new(src: IpAddr, dst: IpAddr) -> Self {
        Self {
            vlans: Vec::new(),
            qinq: false,
            src,
            dst,
            protocol: UDP,
            src_port: 40000,
            dst_port: 443,
            dscp: 0,
            ipv4_options: Vec::new(),
            fragment_offset: 0,
            more_fragments: false,
            ipv4_id: 0x1234,
            ipv6_ext: Vec::new(),
            payload: vec![0xab; 32],
        }
    }

    pub fn udp(src: &str, dst: &str, dst_port: u16) -> Self {
        let mut s = Self::new(src.parse().expect("src"), dst.parse().expect("dst"));
        s.dst_port = dst_port;
        s
    }

    pub fn tcp(src: &str, dst: &str, dst_port: u16) -> Self {
        let mut s = Self::udp(src, dst, dst_port);
        s.protocol = TCP;
        s
    }

    pub fn build(&self) -> Frame {
        let mut b = Vec::new();
        let mut boundaries = vec![0];
        b.extend_from_slice(&[0x02, 0, 0, 0, 0, 2]);
        b.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        let ethertype: u16 = match self.dst {
            IpAddr::V4(_) => 0x0800,
            IpAddr::V6(_) => 0x86dd,
        };
        for (i, vid) in self.vlans.iter().enumerate() {
            let tpid: u16 = if self.qinq && i == 0 { 0x88a8 } else { 0x8100 };
            b.extend_from_slice(&tpid.to_be_bytes());
            boundaries.push(b.len());
            b.extend_from_slice(&vid.to_be_bytes());
        }
        b.extend_from_slice(&ethertype.to_be_bytes());
        boundaries.push(b.len());
        let ip_start = b.len();
        let l4 = self.transport();
        match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => self.ipv4(&mut b, s, d, l4.len()),
            (IpAddr::V6(s), IpAddr::V6(d)) => self.ipv6(&mut b, &mut boundaries, s, d, l4.len()),
            _ => panic!("mixed address families"),
        }
        boundaries.push(b.len());
        b.extend_from_slice(&l4);
        Frame {
            bytes: b,
            boundaries,
            ip_start,
        }
    }

    fn transport(&self) -> Vec<u8> {
        let mut t = Vec::new();
        match self.protocol {
            TCP => {
                t.extend_from_slice(&self.src_port.to_be_bytes());
                t.extend_from_slice(&self.dst_port.to_be_bytes());
                t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
            }
            UDP => {
                t.extend_from_slice(&self.src_port.to_be_bytes());
                t.extend_from_slice(&self.dst_port.to_be_bytes());
                let len = (8 + self.payload.len()) as u16;
                t.extend_from_slice(&len.to_be_bytes());
                t.extend_from_slice(&[0, 0]);
            }
            SCTP => {
                t.extend_from_slice(&self.src_port.to_be_bytes());
                t.extend_from_slice(&self.dst_port.to_be_bytes());
                t.extend_from_slice(&[0; 8]);
            }
            // Tunnels (IP in IP, IPv6 in IP, GRE): the payload is the tunnel's own header
            // and inner packet, as given.
            4 | 41 | 47 => {}
            _ => t.extend_from_slice(&[8, 0, 0, 0, 0, 1, 0, 1]),
        }
        t.extend_from_slice(&self.payload);
        t
    }

    fn ipv4(&self, b: &mut Vec<u8>, src: Ipv4Addr, dst: Ipv4Addr, l4_len: usize) {
        let mut opts = self.ipv4_options.clone();
        while !opts.len().is_multiple_of(4) {
            opts.push(0);
        }
        let ihl = 5 + opts.len() / 4;
        let total = (ihl * 4 + l4_len) as u16;
        b.push(0x40 | ihl as u8);
        b.push(self.dscp << 2);
        b.extend_from_slice(&total.to_be_bytes());
        b.extend_from_slice(&self.ipv4_id.to_be_bytes());
        let more = if self.more_fragments { 0x2000 } else { 0 };
        b.extend_from_slice(&((self.fragment_offset & 0x1fff) | more).to_be_bytes());
        b.push(64);
        b.push(self.protocol);
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&src.octets());
        b.extend_from_slice(&dst.octets());
        b.extend_from_slice(&opts);
    }

    fn ipv6(
        &self,
        b: &mut Vec<u8>,
        boundaries: &mut Vec<usize>,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        l4_len: usize,
    ) {
        let tc = self.dscp << 2;
        let ext_len: usize = self.ipv6_ext.iter().map(|(_, body)| body.len() + 2).sum();
        b.push(0x60 | (tc >> 4));
        b.push(tc << 4);
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&((ext_len + l4_len) as u16).to_be_bytes());
        let first_next = self.ipv6_ext.first().map_or(self.protocol, |(n, _)| *n);
        b.push(first_next);
        b.push(64);
        b.extend_from_slice(&src.octets());
        b.extend_from_slice(&dst.octets());
        for (i, (kind, body)) in self.ipv6_ext.iter().enumerate() {
            boundaries.push(b.len());
            let next = self.ipv6_ext.get(i + 1).map_or(self.protocol, |(n, _)| *n);
            b.push(next);
            let total = body.len() + 2;
            let len_field = if *kind == 51 {
                (total / 4 - 2) as u8
            } else {
                (total / 8 - 1) as u8
            };
            b.push(len_field);
            b.extend_from_slice(body);
        }
    }
}

/// Body of an IPv6 hop-by-hop or destination-options header: 6 bytes of PadN.
pub fn ipv6_options_body() -> Vec<u8> {
    vec![1, 4, 0, 0, 0, 0]
}

/// Body of a segment-routing header (type 4) listing `segments`, with `segments_left`.
pub fn ipv6_routing(segments_left: u8, segments: &[Ipv6Addr]) -> Vec<u8> {
    let mut body = vec![
        4,
        segments_left,
        segments.len().saturating_sub(1) as u8,
        0,
        0,
        0,
    ];
    for s in segments {
        body.extend_from_slice(&s.octets());
    }
    body
}

/// Body of an IPv6 fragment header with `offset` in 8-byte units, no more fragments to
/// come, and identification 0.
pub fn ipv6_fragment(offset: u16) -> Vec<u8> {
    ipv6_fragment_of(offset, false, 0)
}

/// Body of an IPv6 fragment header: `offset` in 8-byte units, the more-fragments flag and
/// the identification that names the datagram.
pub fn ipv6_fragment_of(offset: u16, more: bool, id: u32) -> Vec<u8> {
    let mut body = vec![0u8; 6];
    body[0..2].copy_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
    body[2..6].copy_from_slice(&id.to_be_bytes());
    body
}

/// An ARP request frame.
pub fn arp() -> Vec<u8> {
    let mut b = vec![0xff; 6];
    b.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    b.extend_from_slice(&0x0806u16.to_be_bytes());
    b.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    b.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 192, 0, 2, 1]);
    b.extend_from_slice(&[0, 0, 0, 0, 0, 0, 192, 0, 2, 2]);
    b
}

impl Frame {
    /// Sets the length the IP header declares: IPv4's total length, IPv6's payload
    /// length. Bytes past it are a trailer the receiver ignores.
    pub fn declare_ip_length(&mut self, length: u16) {
        let at = self.ip_start
            + if self.bytes[self.ip_start] >> 4 == 4 {
                2
            } else {
                4
            };
        self.bytes[at..at + 2].copy_from_slice(&length.to_be_bytes());
    }

    /// The frame from its IP header on: an inner packet for IP in IP, or a frame on a
    /// device without a link-layer header.
    pub fn ip_packet(&self) -> Vec<u8> {
        self.bytes[self.ip_start..].to_vec()
    }
}
