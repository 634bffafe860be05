//! Header parsing shared by the eBPF programs and host code.
//!
//! The parser is generic over [`PacketBytes`], so the programs read straight from packet
//! memory while host tests and the fuzz target feed it byte slices: the code that judges
//! live packets is the code that is tested and fuzzed.

use crate::{FAMILY_V4, FAMILY_V6, decide::PortInfo};

/// Bounds-checked reads from a frame.
pub trait PacketBytes {
    /// Reads a `T` at `offset` bytes from the start of the frame; `None` past its end.
    fn load<T: Copy>(&self, offset: usize) -> Option<T>;

    /// `value`, with everything the eBPF verifier knows of it forgotten. Where paths that
    /// carry different facts about a value meet before a long stretch of code, the
    /// verifier would otherwise walk that stretch once per path. On the host, `value`.
    #[inline(always)]
    fn forget(&self, value: u32) -> u32 {
        value
    }
}

impl PacketBytes for [u8] {
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        let end = offset.checked_add(core::mem::size_of::<T>())?;
        if end > self.len() {
            return None;
        }
        // SAFETY: the range was checked against the slice, and T is only ever a byte array
        // or integer (Copy, no invalid bit patterns) here.
        Some(unsafe { core::ptr::read_unaligned(self.as_ptr().add(offset).cast::<T>()) })
    }
}

/// A packet's bytes up to the end of its IP packet. Bytes past the IP length (Ethernet
/// padding, or a trailer a sender appends) are never headers to the kernel's own stack,
/// so they are never read as headers here either.
struct IpBounded<'a, P: ?Sized> {
    pkt: &'a P,
    end: usize,
}

impl<P: PacketBytes + ?Sized> PacketBytes for IpBounded<'_, P> {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        match offset.checked_add(core::mem::size_of::<T>()) {
            Some(end) if end <= self.end => self.pkt.load(offset),
            _ => None,
        }
    }

    #[inline(always)]
    fn forget(&self, value: u32) -> u32 {
        self.pkt.forget(value)
    }
}

/// Where `length` bytes from `start` end, for the length an IP header declares (IPv4's
/// total length from its header, IPv6's payload length after its fixed header). A length
/// of 0 is how the kernel marks a BIG TCP (GSO) packet over 64 KiB, whose length is the
/// skb's: it counts as 64 KiB, past any header the program can see, so the frame's end
/// bounds the reads.
///
/// Arithmetic rather than a branch: the verifier would walk the rest of the parser once
/// for each side of one.
#[inline(always)]
fn ip_end(start: usize, length: u16) -> usize {
    start + usize::from(length.wrapping_sub(1)) + 1
}

pub const ETH_HLEN: usize = 14;
const ETH_TYPE_OFFSET: usize = 12;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88a8;
/// MPLS, unicast and multicast: a label stack, then a packet of a type the stack does not
/// name (Linux routes IP into it with `encap mpls`).
pub const ETH_P_MPLS_UC: u16 = 0x8847;
pub const ETH_P_MPLS_MC: u16 = 0x8848;
/// A PPPoE session's frames: PPP, which carries IP among other protocols.
pub const ETH_P_PPP_SES: u16 = 0x8864;
const MPLS_HLEN: usize = 4;
/// The bit of a label stack entry's third byte that marks the last entry.
const MPLS_BOTTOM_OF_STACK: u8 = 1;
/// Label stack entries read before giving up (the packet counts as malformed); bounds the
/// loop for the verifier. Linux pushes at most 30 by route, real stacks have two or three.
pub const MAX_MPLS_LABELS: usize = 8;
/// PPPoE's version and type (1 and 1), and its code for session data.
const PPPOE_VERSION_TYPE: u8 = 0x11;
const PPPOE_SESSION_DATA: u8 = 0;
/// The PPPoE header and the PPP protocol field after it.
const PPPOE_HLEN: usize = 8;
const PPP_IP: u16 = 0x0021;
const PPP_IPV6: u16 = 0x0057;
/// PPP protocols from here up are PPP's own control (LCP, the NCPs, authentication):
/// RFC 1661's numbering, with no user data in them.
const PPP_FIRST_CONTROL: u16 = 0x8000;
/// Bounds where the IP packet that MPLS or PPPoE carries starts, for the verifier: a
/// mask, not a comparison, so the bound holds in whichever register or stack slot the
/// compiler keeps the offset (Linux 6.1 loses a comparison's bound across a spill). It
/// changes no offset the parser can reach, as the assertion below checks.
const CARRIED_OFFSET_MASK: usize = 0x3ff;
const _: () = assert!(
    MAX_INNER_OFFSET
        + ETH_HLEN
        + VLAN_HLEN * MAX_VLAN_DEPTH
        + MPLS_HLEN * MAX_MPLS_LABELS
        + PPPOE_HLEN
        <= CARRIED_OFFSET_MASK
);
const VLAN_HLEN: usize = 4;
/// VLAN tags parsed, counting one the NIC has offloaded: 802.1ad + 802.1Q (QinQ).
pub const MAX_VLAN_DEPTH: usize = 2;
/// IPv6 extension headers walked before giving up; bounds the loop for the verifier.
/// Real traffic rarely carries more than two.
pub const MAX_IPV6_EXT_HDRS: usize = 8;

pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;
pub const IPPROTO_ICMPV6: u8 = 58;
/// IPsec's encapsulating security payload: encrypted, so a tunnel that cannot be read.
pub const IPPROTO_ESP: u8 = 50;
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const IPPROTO_GRE: u8 = 47;
/// VXLAN's and Geneve's IANA ports: the tunnels whose inner headers are classified.
pub const VXLAN_PORT: u16 = 4789;
pub const GENEVE_PORT: u16 = 6081;
/// VXLAN's port in Linux before IANA assigned one: still the kernel's default for a
/// device made without `dstport`, and the default of Flannel's and Cilium's VXLAN
/// overlays.
pub const LINUX_VXLAN_PORT: u16 = 8472;
/// Transparent Ethernet bridging: a tunnel that carries whole Ethernet frames.
const ETH_P_TEB: u16 = 0x6558;
const UDP_HLEN: usize = 8;
const VXLAN_HLEN: usize = 8;
const GENEVE_HLEN: usize = 8;
const GRE_HLEN: usize = 4;
/// Where a tunnel's header and its inner packet may start at most: the verifier needs a
/// bound. Past it (outer headers of over 500 bytes), the inner headers count as
/// unreadable, which fails closed.
const MAX_INNER_OFFSET: usize = 0x1ff;
const IPPROTO_HOPOPTS: u8 = 0;
const IPPROTO_ROUTING: u8 = 43;
const IPPROTO_FRAGMENT: u8 = 44;
const IPPROTO_AH: u8 = 51;
const IPPROTO_DSTOPTS: u8 = 60;
const IPPROTO_MH: u8 = 135;

const IPV4_MIN_HLEN: usize = 20;
/// IPv4 options fill at most 40 bytes, so no more than 40 of them (each a byte or more).
const IPV4_MAX_OPTIONS: usize = 40;
const IPV4_MAX_HLEN: usize = 60;
const IPOPT_LSRR: u8 = 131;
const IPOPT_SSRR: u8 = 137;
const IPV6_HLEN: usize = 40;
const IPV4_FRAG_OFFSET_MASK: u16 = 0x1fff;
const IPV4_MORE_FRAGMENTS: u16 = 0x2000;
const IPV6_MORE_FRAGMENTS: u8 = 1;

/// Where a packet sits in its datagram: [`ParsedFrame::fragment`]. Numbers rather than an
/// enum so that the parser can compute them without branches: on older kernels, each
/// value a branch wrote would be a path of its own through the rest of the parser.
pub mod fragment {
    /// Not a fragment (an IPv6 atomic fragment, offset 0 with no more to come, included).
    pub const WHOLE: u8 = 0;
    /// Offset 0 with more to come: it carries the transport header.
    pub const FIRST: u8 = 1;
    /// Any later fragment: the middle or the end of the datagram, no headers.
    pub const LATER: u8 = 2;
}

/// What the parser made of a frame.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// ARP, LLDP and other non-IP frames.
    NotIp = 0,
    /// A complete IPv4 or IPv6 packet (or fragment).
    Ip = 1,
    /// Truncated or malformed: the fields that could be read are filled in, and the
    /// `*_known` flags say which.
    Malformed = 2,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParsedFrame {
    pub kind: FrameKind,
    /// [`FAMILY_V4`], [`FAMILY_V6`], or 0 when the ethertype was unreadable.
    pub family: u8,
    /// Source and DSCP were read.
    pub ip_known: bool,
    /// The transport protocol was read. Not for an IPv6 non-first fragment: the kernel
    /// ignores its fragment header's next-header field, so a sender can put anything there.
    pub protocol_known: bool,
    /// The destination address was read.
    pub dst_known: bool,
    /// More destinations follow the one in the header: an IPv6 routing header with
    /// segments left, or an IPv4 loose or strict source route with addresses left.
    pub routed: bool,
    /// The transport protocol: of the inner packet, for a tunnel whose inner headers were
    /// read ([`read_encapsulated`]).
    pub protocol: u8,
    /// The protocol number in the IPv4 header itself, which names the datagram for
    /// fragment tracking.
    pub ip_protocol: u8,
    pub dscp: u8,
    pub ports: PortInfo,
    /// [`fragment::WHOLE`], [`fragment::FIRST`] or [`fragment::LATER`].
    pub fragment: u8,
    /// How many bytes of options an IPv4 header has (0 without options): for
    /// [`read_ipv4_options`]. They start 20 bytes after `network_at`.
    pub ipv4_options_len: u8,
    pub src_port: u16,
    pub dst_port: u16,
    /// Where the IP packet ends in the frame, by the length its header declares.
    pub ip_end: u32,
    /// Where the IP header starts in the frame.
    pub network_at: u8,
    /// A tunnel's inner headers were looked for: protocol, ports and DSCP are the inner
    /// packet's when it is IP.
    pub encapsulated: bool,
    /// The IP packet was found under an MPLS label stack or in a PPPoE session. Linux
    /// switches MPLS by label, whatever the packet's destination.
    pub carried: bool,
    /// The fragment identification (IPv4's 16 bits, IPv6's 32). Read from every IPv4
    /// header, fragment or not; meaningful only when `fragment` is not `WHOLE`.
    pub fragment_id: u32,
    /// IPv4 addresses sit in the first four bytes.
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

impl ParsedFrame {
    const UNREAD: Self = Self {
        kind: FrameKind::Malformed,
        family: 0,
        ip_known: false,
        protocol_known: false,
        dst_known: false,
        routed: false,
        protocol: 0,
        ip_protocol: 0,
        dscp: 0,
        ports: PortInfo::Unknown,
        fragment: fragment::WHOLE,
        ipv4_options_len: 0,
        src_port: 0,
        dst_port: 0,
        ip_end: 0,
        network_at: 0,
        encapsulated: false,
        carried: false,
        fragment_id: 0,
        src: [0; 16],
        dst: [0; 16],
    };

    pub fn dst_v4(&self) -> [u8; 4] {
        [self.dst[0], self.dst[1], self.dst[2], self.dst[3]]
    }
}

#[inline(always)]
fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Walks Ethernet and VLAN headers. Returns the L3 ethertype and offset.
#[inline(always)]
fn parse_ethernet<P: PacketBytes + ?Sized>(
    pkt: &P,
    offloaded_vlan_tags: usize,
) -> Option<(u16, usize)> {
    let mut ethertype = be16(pkt.load(ETH_TYPE_OFFSET)?);
    let mut off = ETH_HLEN;
    let mut depth = offloaded_vlan_tags;
    let mut i = 0;
    // Bounded by MAX_VLAN_DEPTH: one iteration per tag.
    while i < MAX_VLAN_DEPTH {
        if ethertype != ETH_P_8021Q && ethertype != ETH_P_8021AD {
            break;
        }
        if depth >= MAX_VLAN_DEPTH {
            return None;
        }
        // The tag's TCI sits at `off - 2`; the encapsulated ethertype follows it.
        ethertype = be16(pkt.load(off + 2)?);
        off += VLAN_HLEN;
        depth += 1;
        i += 1;
    }
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        // More tags than we parse: the payload could be IP, so it is malformed, not non-IP.
        return None;
    }
    Some((ethertype, off))
}

/// Reads the ports of TCP, UDP or SCTP; marks other protocols as port-less. A transport
/// header shorter than its fixed part makes the frame malformed.
#[inline(always)]
fn parse_ports<P: PacketBytes + ?Sized>(
    pkt: &P,
    l4: usize,
    first_fragment: bool,
    out: &mut ParsedFrame,
) -> bool {
    let min_len = match out.protocol {
        IPPROTO_TCP => 20,
        IPPROTO_UDP => 8,
        IPPROTO_SCTP => 12,
        _ => {
            out.ports = PortInfo::Absent;
            return true;
        }
    };
    if !first_fragment {
        out.ports = PortInfo::Unknown;
        return true;
    }
    let Some(ports) = pkt.load::<[u8; 4]>(l4) else {
        return false;
    };
    if pkt.load::<u8>(l4 + min_len - 1).is_none() {
        return false;
    }
    out.src_port = be16([ports[0], ports[1]]);
    out.dst_port = be16([ports[2], ports[3]]);
    out.ports = PortInfo::Known;
    true
}

#[inline(always)]
fn parse_ipv4<P: PacketBytes + ?Sized>(pkt: &P, l3: usize, out: &mut ParsedFrame) -> bool {
    out.family = FAMILY_V4;
    let Some(h) = pkt.load::<[u8; IPV4_MIN_HLEN]>(l3) else {
        return false;
    };
    let ihl = ((h[0] & 0x0f) as usize) * 4;
    if h[0] >> 4 != 4 || ihl < IPV4_MIN_HLEN {
        return false;
    }
    out.src[..4].copy_from_slice(&h[12..16]);
    out.dst[..4].copy_from_slice(&h[16..20]);
    out.dst_known = true;
    let total = be16([h[2], h[3]]);
    if total != 0 && usize::from(total) < ihl {
        return false;
    }
    let pkt = IpBounded {
        pkt,
        end: ip_end(l3, total),
    };
    out.ip_end = pkt.end as u32;
    // Options: the whole header must be present.
    if pkt.load::<u8>(l3 + ihl - 1).is_none() {
        return false;
    }
    out.dscp = h[1] >> 2;
    out.protocol = h[9];
    out.ip_protocol = h[9];
    out.ip_known = true;
    out.protocol_known = true;
    let flags_offset = be16([h[6], h[7]]);
    // Without branches (see `fragment`): `later` is 1 for any non-zero offset, and
    // `more` counts only at offset 0.
    let later = ((flags_offset & IPV4_FRAG_OFFSET_MASK) + IPV4_FRAG_OFFSET_MASK) >> 13;
    let more = (flags_offset & IPV4_MORE_FRAGMENTS) >> 13;
    out.fragment = ((later << 1) | (more & (later ^ 1))) as u8;
    out.fragment_id = u32::from(be16([h[4], h[5]]));
    // Walked apart (`read_ipv4_options`).
    out.ipv4_options_len = (ihl - IPV4_MIN_HLEN) as u8;
    let mut l4 = l3 + ihl;
    if out.protocol == IPPROTO_AH && later == 0 {
        // IPsec's AH authenticates the packet and leaves the transport header after it
        // in clear (transport mode): the protocol it names is the one classified, as for
        // IPv6. Its length counts 4-byte words, less two.
        let Some([next, words]) = pkt.load::<[u8; 2]>(l4) else {
            return false;
        };
        if next == IPPROTO_AH {
            // Not walked further: as over IPv6, the transport is then unknown.
            return false;
        }
        out.protocol = next;
        l4 += (usize::from(words) + 2) * 4;
    }
    parse_ports(&pkt, l4, later == 0, out)
}

/// Looks for a source route in the IPv4 options the parser found (`routed`), after
/// [`parse_frame_headers`] or [`parse_ip_packet_headers`]. Options the kernel refuses
/// make the frame malformed. Apart from the header parse so that the eBPF programs can
/// run it in a stage of its own, for frames that have options: a loop over up to 40
/// options inside the parser would multiply its paths for the verifier.
#[inline(always)]
pub fn read_ipv4_options<P: PacketBytes + ?Sized>(pkt: &P, frame: &mut ParsedFrame) {
    if frame.ipv4_options_len == 0 {
        return;
    }
    let pkt = IpBounded {
        pkt,
        end: frame.ip_end as usize,
    };
    let (start, len) = (
        usize::from(frame.network_at) + IPV4_MIN_HLEN,
        usize::from(frame.ipv4_options_len),
    );
    if let Some(routed) = ipv4_source_routed(&pkt, start, len) {
        frame.routed = routed;
    } else {
        mark_malformed(frame);
    }
}

/// Whether the `len` bytes of IPv4 options at `start` hold a loose or strict source route
/// with addresses left (RFC 791): the destination in the header is then only the next
/// hop, and whoever receives the packet sends it on to the next address. `None` for
/// options the kernel refuses (a length below 2, or past the header), and when the bytes
/// to read are not there, which includes options that end less than two bytes before the
/// end of the packet.
///
/// The options are walked the way the kernel's `ip_options_compile` walks them, so that
/// padding (NOPs before the route, the route after another option) cannot hide a route.
/// For the verifier, the walk reads every byte at a fixed place and keeps where the next
/// option starts as a number, acting only on the byte where it does; and it has no
/// branches but those that leave the loop. A walk that jumped from option to option, with
/// a branch per kind, gave the verifier a path per mix of kinds: over a million
/// instructions inside the parser.
#[inline(always)]
fn ipv4_source_routed<P: PacketBytes + ?Sized>(pkt: &P, start: usize, len: usize) -> Option<bool> {
    let mut routed = 0;
    let mut refused = 0;
    // Where the next option starts, counted from `start`.
    let mut next = 0;
    let mut at = 0;
    // Bounded by IPV4_MAX_OPTIONS: the options are no longer.
    while at < IPV4_MAX_OPTIONS && at < len {
        // Three bytes at every place, for the one-byte options too: LLVM turns a one-byte
        // read's bounds check into one the verifier cannot use.
        let [kind, length, pointer] = pkt.load::<[u8; 3]>(start + at)?;
        let (kind, length, pointer) =
            (usize::from(kind), usize::from(length), usize::from(pointer));
        let option_here = all_or_nothing(is_zero(at ^ next));
        // End-of-options (0) and NOP (1) are one byte; every other kind has a length.
        let has_length = bit((opaque(kind >> 1) + 0xff) >> 8);
        let step = (length.wrapping_sub(1) & 0xff & all_or_nothing(has_length)) + 1;
        // The kernel refuses a length below 2, and an option that runs past the header.
        let past_the_header = sign(len.wrapping_sub(at + step));
        refused |= option_here & has_length & (is_zero(length >> 1) | past_the_header);
        let source_route =
            is_zero(kind ^ usize::from(IPOPT_LSRR)) | is_zero(kind ^ usize::from(IPOPT_SSRR));
        // The pointer (1-based, from the option's start) names the next address; past
        // the last one, the route is done and the header's destination is final.
        let addresses_left = 1 ^ sign(length.wrapping_sub(pointer));
        routed |= option_here & source_route & addresses_left;
        // End-of-options ends the walk: no option starts past the header.
        let after = at + step + (IPV4_MAX_HLEN & all_or_nothing(is_zero(kind)));
        next = (next & !option_here) | (after & option_here);
        at += 1;
    }
    if refused != 0 {
        return None;
    }
    Some(routed != 0)
}

// Without branches, for `ipv4_source_routed`. Each value goes through `opaque` before it
// is tested: an optimiser that knows a value's range (a byte, a 0 or 1) turns a shift that
// tests a sign or a zero back into a comparison, which is a branch in BPF, and each would
// split the verifier's walk of the options loop in two, every option again.

/// 1 when `value` is 0, else 0, for values below 2^63.
#[inline(always)]
fn is_zero(value: usize) -> usize {
    sign(opaque(value).wrapping_sub(1))
}

/// 1 when `value`, read as signed, is negative.
#[inline(always)]
fn sign(value: usize) -> usize {
    bit(opaque(value) >> (usize::BITS - 1))
}

/// The lowest bit of `value`, as a number the optimiser cannot read as a truth value. The
/// verifier still knows it is 0 or 1: `opaque` goes through an eight-byte stack slot,
/// which every kernel's verifier tracks.
#[inline(always)]
fn bit(value: usize) -> usize {
    opaque(value & 1)
}

/// All ones for 1, zero for 0: a mask that keeps a value or clears it, for where a
/// multiplication by 0 or 1 would do. Linux 6.1's verifier knows nothing of a product
/// with an operand that is not a constant, and the walk's offset would then be unbounded.
#[inline(always)]
fn all_or_nothing(bit: usize) -> usize {
    bit.wrapping_neg()
}

#[inline(always)]
fn opaque(value: usize) -> usize {
    core::hint::black_box(value)
}

#[inline(always)]
fn parse_ipv6<P: PacketBytes + ?Sized>(pkt: &P, l3: usize, out: &mut ParsedFrame) -> bool {
    out.family = FAMILY_V6;
    // Read in parts rather than as one 40-byte array: BPF programs have 512 bytes of stack.
    let Some(h) = pkt.load::<[u8; 8]>(l3) else {
        return false;
    };
    if h[0] >> 4 != 6 {
        return false;
    }
    let (Some(src), Some(dst)) = (pkt.load::<[u8; 16]>(l3 + 8), pkt.load::<[u8; 16]>(l3 + 24))
    else {
        return false;
    };
    out.src = src;
    out.dst = dst;
    out.dst_known = true;
    out.dscp = (((h[0] & 0x0f) << 4) | (h[1] >> 4)) >> 2;
    let payload = be16([h[4], h[5]]);
    let pkt = IpBounded {
        pkt,
        end: ip_end(l3 + IPV6_HLEN, payload),
    };
    out.ip_end = pkt.end as u32;
    let mut next = h[6];
    let mut off = l3 + IPV6_HLEN;
    // A fragment header straight after the IPv6 header, where Linux puts it when no
    // other extension header comes first, names a first fragment's datagram (`fragment`).
    // Deeper in, the walk below still stops at a later fragment, but a first fragment is
    // taken for a whole packet, so its later ones fail closed as unseen: recording it
    // there would make each header of the walk a path of its own for older verifiers.
    if next == IPPROTO_FRAGMENT {
        let Some(e) = pkt.load::<[u8; 8]>(off) else {
            return false;
        };
        out.fragment_id = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
        out.fragment = e[3] & IPV6_MORE_FRAGMENTS;
    }
    let mut i = 0;
    // Bounded by MAX_IPV6_EXT_HDRS: one iteration per extension header.
    while i < MAX_IPV6_EXT_HDRS {
        match next {
            IPPROTO_HOPOPTS | IPPROTO_DSTOPTS | IPPROTO_ROUTING | IPPROTO_MH => {
                let Some(e) = pkt.load::<[u8; 4]>(off) else {
                    return false;
                };
                if next == IPPROTO_ROUTING && e[3] != 0 {
                    out.routed = true;
                }
                next = e[0];
                off += (e[1] as usize + 1) * 8;
            }
            IPPROTO_AH => {
                let Some(e) = pkt.load::<[u8; 2]>(off) else {
                    return false;
                };
                next = e[0];
                off += (e[1] as usize + 2) * 4;
            }
            IPPROTO_FRAGMENT => {
                let Some(e) = pkt.load::<[u8; 8]>(off) else {
                    return false;
                };
                if be16([e[2], e[3]]) >> 3 != 0 {
                    // The payload of a non-first fragment is the middle of the datagram,
                    // not more headers, and its next-header field is not trusted.
                    out.fragment_id = u32::from_be_bytes([e[4], e[5], e[6], e[7]]);
                    out.fragment = fragment::LATER;
                    out.ip_known = true;
                    out.ports = PortInfo::Unknown;
                    return true;
                }
                next = e[0];
                off += 8;
            }
            _ => break,
        }
        i += 1;
    }
    if matches!(
        next,
        IPPROTO_HOPOPTS
            | IPPROTO_DSTOPTS
            | IPPROTO_ROUTING
            | IPPROTO_MH
            | IPPROTO_AH
            | IPPROTO_FRAGMENT
    ) {
        // More extension headers than we walk: the transport is unknown.
        return false;
    }
    out.protocol = next;
    out.ip_known = true;
    out.protocol_known = true;
    parse_ports(&pkt, off, true, out)
}

/// Parses a frame that starts with an Ethernet header. `offloaded_vlan_tags` is 1 when
/// the NIC has already stripped a tag into the skb (TC only), so it counts toward
/// [`MAX_VLAN_DEPTH`].
#[inline(always)]
pub fn parse_frame<P: PacketBytes + ?Sized>(pkt: &P, offloaded_vlan_tags: usize) -> ParsedFrame {
    let mut frame = parse_frame_headers(pkt, offloaded_vlan_tags);
    read_ipv4_options(pkt, &mut frame);
    read_encapsulated(pkt, &mut frame);
    frame
}

/// Parses a packet that starts at its IP header, as frames do on devices without a
/// link-layer header: tun, WireGuard, ipip, sit, GRE, PPP.
#[inline(always)]
pub fn parse_ip_packet<P: PacketBytes + ?Sized>(pkt: &P) -> ParsedFrame {
    let mut frame = parse_ip_packet_headers(pkt);
    read_ipv4_options(pkt, &mut frame);
    read_encapsulated(pkt, &mut frame);
    frame
}

/// [`parse_frame`] but for the IPv4 options, which [`read_ipv4_options`] reads.
#[inline(always)]
pub fn parse_frame_headers<P: PacketBytes + ?Sized>(
    pkt: &P,
    offloaded_vlan_tags: usize,
) -> ParsedFrame {
    let Some((ethertype, l3)) = parse_ethernet(pkt, offloaded_vlan_tags) else {
        return ParsedFrame::UNREAD;
    };
    parse_network(pkt, ethertype, l3)
}

/// [`parse_ip_packet_headers`] for a packet that the kernel says is of `protocol` (an
/// skb's, in host order): an MPLS packet on a device without a link-layer header starts
/// at its label stack, whose first bytes say nothing of the family.
#[inline(always)]
pub fn parse_l3_packet_headers<P: PacketBytes + ?Sized>(pkt: &P, protocol: u16) -> ParsedFrame {
    if protocol == ETH_P_MPLS_UC || protocol == ETH_P_MPLS_MC {
        return parse_network(pkt, protocol, 0);
    }
    parse_ip_packet_headers(pkt)
}

/// [`parse_ip_packet`] but for the IPv4 options. The version field says the family, as it
/// does for whoever receives the packet at the other end; anything else is not IP.
#[inline(always)]
pub fn parse_ip_packet_headers<P: PacketBytes + ?Sized>(pkt: &P) -> ParsedFrame {
    // Two bytes, not one: LLVM turns a one-byte bounds check into `data >= data_end`,
    // which the verifier cannot use. Every IP header is longer.
    let Some([first, _]) = pkt.load::<[u8; 2]>(0) else {
        return ParsedFrame::UNREAD;
    };
    let ethertype = match first >> 4 {
        4 => ETH_P_IP,
        6 => ETH_P_IPV6,
        _ => 0,
    };
    parse_network(pkt, ethertype, 0)
}

/// Whether the frame may be a tunnel whose inner headers [`read_encapsulated`] has yet to
/// read: IP in IP (4), IPv6 in IP (41), GRE (47), or UDP to VXLAN's ports or Geneve's.
/// Later fragments carry no headers; they take their first fragment's verdict.
#[inline(always)]
pub fn may_be_tunnel(frame: &ParsedFrame) -> bool {
    TunnelFacts {
        kind: frame.kind,
        fragment: frame.fragment,
        encapsulated: frame.encapsulated,
        protocol: frame.protocol,
        ports: frame.ports,
        dst_port: frame.dst_port,
    }
    .may_be_tunnel()
}

/// The fields of a [`ParsedFrame`] that say whether it may be a tunnel, for a caller that
/// reads them its own way.
pub struct TunnelFacts {
    pub kind: FrameKind,
    pub fragment: u8,
    pub encapsulated: bool,
    pub protocol: u8,
    pub ports: PortInfo,
    pub dst_port: u16,
}

impl TunnelFacts {
    /// See [`may_be_tunnel`].
    #[inline(always)]
    pub fn may_be_tunnel(&self) -> bool {
        let tunnel_protocol = matches!(self.protocol, IPPROTO_IPIP | IPPROTO_IPV6 | IPPROTO_GRE);
        let tunnel_port = self.protocol == IPPROTO_UDP
            && self.ports == PortInfo::Known
            && matches!(self.dst_port, VXLAN_PORT | LINUX_VXLAN_PORT | GENEVE_PORT);
        !self.encapsulated
            && self.kind == FrameKind::Ip
            && self.fragment != fragment::LATER
            && (tunnel_protocol || tunnel_port)
    }
}

/// Classifies a tunnel by its inner headers, one level deep (after
/// [`parse_frame_headers`] or [`parse_ip_packet_headers`]): the inner packet's protocol,
/// ports and DSCP replace the outer ones, so that user data in a tunnel is recognised as
/// it is outside one. The outer addresses stay: the destination a packet leaves the host
/// for is the outer one, and its region decides. Inner headers that cannot be read make
/// the frame malformed (fail closed); an inner frame that is not IP (ARP over VXLAN)
/// leaves the outer classification as it was.
///
/// Apart from the header parse so that the eBPF programs run it in a stage of their own,
/// for frames that may be tunnels.
#[inline(always)]
pub fn read_encapsulated<P: PacketBytes + ?Sized>(pkt: &P, frame: &mut ParsedFrame) {
    if !may_be_tunnel(frame) {
        return;
    }
    frame.encapsulated = true;
    let outer = IpBounded {
        pkt,
        end: frame.ip_end as usize,
    };
    let Some(at) = tunnel_header_at(&outer, frame) else {
        mark_inner_malformed(frame);
        return;
    };
    let Some((link, start)) = tunnel_payload(&outer, frame, at) else {
        mark_inner_malformed(frame);
        return;
    };
    // Every tunnel kind reaches here with different facts about `start`; forgotten, and
    // bounded again, they meet as one for the inner parse.
    let start = outer.forget(start as u32) as usize;
    if start > MAX_INNER_OFFSET {
        mark_inner_malformed(frame);
        return;
    }
    let link = outer.forget(u32::from(link)) as u16;
    let (ethertype, l3) = if link == ETH_P_TEB {
        let inner_frame = Shifted {
            pkt: &outer,
            base: start,
        };
        let Some((ethertype, l3)) = parse_ethernet(&inner_frame, 0) else {
            mark_inner_malformed(frame);
            return;
        };
        (ethertype, start + l3)
    } else {
        (link, start)
    };
    let inner = parse_network(&outer, ethertype, l3);
    match inner.kind {
        FrameKind::NotIp => {}
        FrameKind::Malformed => mark_inner_malformed(frame),
        FrameKind::Ip => {
            frame.protocol = inner.protocol;
            frame.protocol_known = inner.protocol_known;
            frame.ports = inner.ports;
            frame.src_port = inner.src_port;
            frame.dst_port = inner.dst_port;
            frame.dscp = inner.dscp;
        }
    }
}

/// Where the tunnel's header (the outer transport) starts: after the IPv4 header and its
/// options, or after the IPv6 header and at most one destination options header. Not
/// recorded by the parser: an offset per path through it would keep those paths apart
/// for the verifier to the end of the program, which took the TC entry program from
/// 95,657 to 629,326 instructions. `None` for an IPv6 tunnel behind other extension
/// headers, which fails closed.
#[inline(always)]
fn tunnel_header_at<P: PacketBytes + ?Sized>(pkt: &P, frame: &ParsedFrame) -> Option<usize> {
    let at = if frame.family == FAMILY_V4 {
        if frame.protocol != frame.ip_protocol {
            // A tunnel behind an AH header: not read, so it fails closed.
            return None;
        }
        // At most 40 bytes of options; the mask tells the verifier so, and with it that
        // the offset is always within bounds.
        usize::from(frame.network_at) + IPV4_MIN_HLEN + usize::from(frame.ipv4_options_len & 0x3f)
    } else {
        let l3 = usize::from(frame.network_at);
        let [_, next_header] = pkt.load::<[u8; 2]>(l3 + 5)?;
        let after = l3 + IPV6_HLEN;
        if next_header == frame.protocol {
            after
        } else if next_header == IPPROTO_DSTOPTS {
            // Linux's ip6tnl and ip6gre devices put one there, holding the tunnel
            // encapsulation limit (RFC 2473), unless made with `encaplimit none`.
            let [next, units] = pkt.load::<[u8; 2]>(after)?;
            if next != frame.protocol {
                return None;
            }
            after + (usize::from(units) + 1) * 8
        } else {
            return None;
        }
    };
    (at <= MAX_INNER_OFFSET).then_some(at)
}

/// A frame a later stage found unreadable: malformed, with no ports to go by.
#[inline(always)]
fn mark_malformed(frame: &mut ParsedFrame) {
    frame.kind = FrameKind::Malformed;
    frame.ports = PortInfo::Unknown;
    frame.src_port = 0;
    frame.dst_port = 0;
}

/// A tunnel whose inner headers cannot be read: its protocol is not known either.
#[inline(always)]
fn mark_inner_malformed(frame: &mut ParsedFrame) {
    mark_malformed(frame);
    frame.protocol_known = false;
}

/// What a tunnel header at `at` carries, and where: an ethertype ([`ETH_P_IP`],
/// [`ETH_P_IPV6`], or [`ETH_P_TEB`] for an Ethernet frame) and the offset of the inner
/// packet. `None` when the tunnel header is cut short or carries something else.
#[inline(always)]
fn tunnel_payload<P: PacketBytes + ?Sized>(
    pkt: &P,
    frame: &ParsedFrame,
    at: usize,
) -> Option<(u16, usize)> {
    match frame.protocol {
        IPPROTO_IPIP => Some((ETH_P_IP, at)),
        IPPROTO_IPV6 => Some((ETH_P_IPV6, at)),
        IPPROTO_GRE => {
            // RFC 2784 and 2890: flags and version, then the protocol; a checksum, key and
            // sequence number follow when their flags say so.
            let [flags, version, proto_hi, proto_lo] = pkt.load::<[u8; 4]>(at)?;
            if version & 0x07 != 0 {
                // Version 1 is PPTP's enhanced GRE, which carries PPP.
                return None;
            }
            let checksum = usize::from(flags >> 7);
            let key = usize::from((flags >> 5) & 1);
            let sequence = usize::from((flags >> 4) & 1);
            let len = GRE_HLEN + 4 * (checksum + key + sequence);
            Some((be16([proto_hi, proto_lo]), at + len))
        }
        _ if matches!(frame.dst_port, VXLAN_PORT | LINUX_VXLAN_PORT) => {
            Some((ETH_P_TEB, at + UDP_HLEN + VXLAN_HLEN))
        }
        _ => {
            // Geneve: the option length (in 4-byte words) and the protocol of the payload.
            let geneve = at + UDP_HLEN;
            let [version_options, _, proto_hi, proto_lo] = pkt.load::<[u8; 4]>(geneve)?;
            let options = usize::from(version_options & 0x3f) * 4;
            Some((be16([proto_hi, proto_lo]), geneve + GENEVE_HLEN + options))
        }
    }
}

/// A frame's bytes from `base` on: a tunnel's inner Ethernet frame, for the Ethernet
/// parser, which reads from offset 0.
struct Shifted<'a, P: ?Sized> {
    pkt: &'a P,
    base: usize,
}

impl<P: PacketBytes + ?Sized> PacketBytes for Shifted<'_, P> {
    #[inline(always)]
    fn load<T: Copy>(&self, offset: usize) -> Option<T> {
        self.pkt.load(self.base + offset)
    }

    #[inline(always)]
    fn forget(&self, value: u32) -> u32 {
        self.pkt.forget(value)
    }
}

/// The network packet that an MPLS label stack or a PPPoE session frame at `at` carries:
/// [`ETH_P_IP`] or [`ETH_P_IPV6`] and its offset, or a non-IP ethertype for PPP's own
/// control. `None` when the payload cannot be read: it may be IP in a form not parsed
/// (past [`MAX_MPLS_LABELS`], an MPLS pseudowire, compressed or multilink PPP).
#[inline(always)]
fn carried_network<P: PacketBytes + ?Sized>(
    pkt: &P,
    ethertype: u16,
    at: usize,
) -> Option<(u16, usize)> {
    if ethertype == ETH_P_PPP_SES {
        return ppp_payload(pkt, at);
    }
    let mut off = at;
    let mut i = 0;
    while i < MAX_MPLS_LABELS {
        let [_, _, class_bottom, _] = pkt.load::<[u8; MPLS_HLEN]>(off)?;
        off += MPLS_HLEN;
        if class_bottom & MPLS_BOTTOM_OF_STACK != 0 {
            return ip_by_version(pkt, off);
        }
        i += 1;
    }
    None
}

/// The IP packet at `at` by its version field, as Linux's MPLS receiver takes it.
#[inline(always)]
fn ip_by_version<P: PacketBytes + ?Sized>(pkt: &P, at: usize) -> Option<(u16, usize)> {
    // Two bytes, not one: see `parse_ip_packet_headers`.
    let [first, _] = pkt.load::<[u8; 2]>(at)?;
    match first >> 4 {
        4 => Some((ETH_P_IP, at)),
        6 => Some((ETH_P_IPV6, at)),
        _ => None,
    }
}

/// What a PPPoE session frame at `at` carries (see [`carried_network`]).
#[inline(always)]
fn ppp_payload<P: PacketBytes + ?Sized>(pkt: &P, at: usize) -> Option<(u16, usize)> {
    let [version_type, code, _, _, _, _, hi, lo] = pkt.load::<[u8; PPPOE_HLEN]>(at)?;
    if version_type != PPPOE_VERSION_TYPE || code != PPPOE_SESSION_DATA {
        return None;
    }
    match be16([hi, lo]) {
        PPP_IP => Some((ETH_P_IP, at + PPPOE_HLEN)),
        PPP_IPV6 => Some((ETH_P_IPV6, at + PPPOE_HLEN)),
        control if control >= PPP_FIRST_CONTROL => Some((0, at)),
        // Header-compressed, multilink or encrypted IP, or another network protocol.
        _ => None,
    }
}

/// Parses the network header at `l3` and what follows it.
#[inline(always)]
fn parse_network<P: PacketBytes + ?Sized>(pkt: &P, ethertype: u16, l3: usize) -> ParsedFrame {
    let mut out = ParsedFrame::UNREAD;
    let carried = matches!(ethertype, ETH_P_MPLS_UC | ETH_P_MPLS_MC | ETH_P_PPP_SES);
    let (ethertype, l3) = match ethertype {
        ETH_P_MPLS_UC | ETH_P_MPLS_MC | ETH_P_PPP_SES => {
            // Fails closed: a label stack or PPP frame whose payload cannot be read may
            // carry IP all the same.
            let Some((ethertype, l3)) = carried_network(pkt, ethertype, l3) else {
                return out;
            };
            // Each label depth reaches here with a different offset; forgotten, and
            // bounded again, they meet as one for the IP parse.
            (
                ethertype,
                pkt.forget(l3 as u32) as usize & CARRIED_OFFSET_MASK,
            )
        }
        _ => (ethertype, l3),
    };
    // Never past two VLAN tags and a label stack, or a tunnel's bound for its inner
    // packet, whose offset is not used.
    out.network_at = l3 as u8;
    out.carried = carried;
    let complete = match ethertype {
        ETH_P_IP => parse_ipv4(pkt, l3, &mut out),
        ETH_P_IPV6 => parse_ipv6(pkt, l3, &mut out),
        _ => {
            out.kind = FrameKind::NotIp;
            return out;
        }
    };
    if complete {
        out.kind = FrameKind::Ip;
    } else {
        // Whatever was read stays; the ports, if any were expected, are unknown.
        out.ports = PortInfo::Unknown;
    }
    out
}

/// Whether a destination is loopback or link-local, which are always exempt.
#[inline(always)]
pub fn is_builtin_exempt(family: u8, dst: &[u8; 16]) -> bool {
    match family {
        FAMILY_V4 => dst[0] == 127 || (dst[0] == 169 && dst[1] == 254),
        FAMILY_V6 => {
            let loopback = dst[..15].iter().all(|b| *b == 0) && dst[15] == 1;
            let link_local = dst[0] == 0xfe && dst[1] & 0xc0 == 0x80;
            loopback || link_local
        }
        _ => false,
    }
}

/// Which kinds of the host's own link traffic ([`host_essential`](crate::host_essential)
/// bits) a frame is, judged by its destination, protocol and port alone. Each kind is
/// addressed so that no router forwards it: it reaches the link and goes no further.
/// Two exceptions are made for what a relay on the link does forward: the limited
/// broadcast passes only as DHCP, and `ff02::1:2`, which DHCPv6 relays listen on, only as
/// DHCPv6. (A DHCPv4 renewal unicast to its server is not among the kinds: it is judged
/// like any packet, and a client that gets no answer rebinds by broadcast, which is.)
#[inline(always)]
pub fn host_essential_kinds(frame: &ParsedFrame) -> u32 {
    use crate::host_essential::{DHCP, LINK_MULTICAST, NEIGHBOR_DISCOVERY};
    // Real DHCP, neighbour discovery and link protocols are never tunnelled, and a
    // tunnel's protocol and ports here are its inner packet's, which an endpoint on the
    // link would send on anywhere.
    if frame.encapsulated {
        return 0;
    }
    let dst = &frame.dst;
    let udp_port = if frame.protocol_known
        && frame.protocol == IPPROTO_UDP
        && frame.ports == PortInfo::Known
    {
        frame.dst_port
    } else {
        0
    };
    match frame.family {
        FAMILY_V4 => {
            let dst = u32::from_be_bytes([dst[0], dst[1], dst[2], dst[3]]);
            if dst >> 8 == 0x00e0_0000 {
                LINK_MULTICAST
            } else if dst == u32::MAX && udp_port == 67 {
                DHCP
            } else {
                0
            }
        }
        // Scope is the low nibble of the second byte: 1 interface-local, 2 link-local.
        FAMILY_V6 if dst[0] == 0xff && matches!(dst[1] & 0x0f, 1 | 2) => {
            let icmpv6 = frame.protocol_known && frame.protocol == IPPROTO_ICMPV6;
            let relay_group = *dst == ALL_DHCP_RELAY_AGENTS_AND_SERVERS;
            let link = match (relay_group, udp_port) {
                (false, _) => LINK_MULTICAST,
                (true, 547) => DHCP,
                (true, _) => 0,
            };
            link | if icmpv6 { NEIGHBOR_DISCOVERY } else { 0 }
        }
        _ => 0,
    }
}

/// ff02::1:2 (RFC 8415, section 7.1).
const ALL_DHCP_RELAY_AGENTS_AND_SERVERS: [u8; 16] =
    [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0, 0x02];

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{vec, vec::Vec};

    const IPOPT_END: u8 = 0;
    const IPOPT_NOOP: u8 = 1;

    use super::*;

    fn udp_v4(dst: [u8; 4], port: u16) -> [u8; 28] {
        let mut p = [0u8; 28];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&28u16.to_be_bytes());
        p[9] = IPPROTO_UDP;
        p[16..20].copy_from_slice(&dst);
        p[22..24].copy_from_slice(&port.to_be_bytes());
        p
    }

    /// A frame as parsed, to `dst` by `protocol` and, for UDP, to `port`.
    fn parsed(dst: &str, protocol: u8, port: u16) -> ParsedFrame {
        let mut f = ParsedFrame::UNREAD;
        f.kind = FrameKind::Ip;
        (f.protocol, f.protocol_known, f.dst_known) = (protocol, true, true);
        if protocol == IPPROTO_UDP {
            (f.ports, f.dst_port) = (PortInfo::Known, port);
        }
        match dst.parse::<core::net::IpAddr>().expect("address") {
            core::net::IpAddr::V4(a) => {
                f.family = FAMILY_V4;
                f.dst[..4].copy_from_slice(&a.octets());
            }
            core::net::IpAddr::V6(a) => {
                f.family = FAMILY_V6;
                f.dst = a.octets();
            }
        }
        f
    }

    #[test]
    fn the_hosts_own_link_traffic_is_recognised_by_destination_protocol_and_port() {
        use crate::host_essential::{DHCP, LINK_MULTICAST as LINK, NEIGHBOR_DISCOVERY as ND};
        const ICMPV6: u8 = IPPROTO_ICMPV6;
        for (dst, protocol, port, kinds) in [
            ("255.255.255.255", IPPROTO_UDP, 67, DHCP),
            // What a relay (an `ip helper-address`) forwards off the link.
            ("255.255.255.255", IPPROTO_UDP, 68, 0),
            ("255.255.255.255", IPPROTO_UDP, 53, 0),
            ("224.0.0.251", IPPROTO_UDP, 5353, LINK),
            ("224.0.0.22", 2, 0, LINK),
            ("ff02::1:2", IPPROTO_UDP, 547, DHCP),
            ("ff02::1:2", IPPROTO_UDP, 548, 0),
            ("ff02::1:ff00:3", ICMPV6, 0, ND | LINK),
            ("ff02::16", ICMPV6, 0, ND | LINK),
            ("ff12::fb", IPPROTO_UDP, 5353, LINK),
            ("ff01::1", ICMPV6, 0, ND | LINK),
            // Wider scopes are routed on, and so judged.
            ("224.0.1.1", IPPROTO_UDP, 123, 0),
            ("239.1.2.3", IPPROTO_UDP, 5353, 0),
            ("ff05::1:3", IPPROTO_UDP, 547, 0),
            ("ff0e::1:2", IPPROTO_UDP, 547, 0),
            // A DHCP server's unicast address, and subnet-directed broadcast.
            ("192.0.2.1", IPPROTO_UDP, 67, 0),
            ("192.0.2.255", IPPROTO_UDP, 67, 0),
            ("2001:db8::1:2", IPPROTO_UDP, 547, 0),
            ("2001:db8::1", ICMPV6, 0, 0),
        ] {
            let f = parsed(dst, protocol, port);
            assert_eq!(
                host_essential_kinds(&f),
                kinds,
                "{dst} protocol {protocol} port {port}"
            );
        }
        // Unknown ports or protocol (a later fragment) are no DHCP.
        let mut f = parsed("255.255.255.255", IPPROTO_UDP, 67);
        f.ports = PortInfo::Unknown;
        assert_eq!(host_essential_kinds(&f), 0);
        let mut f = parsed("ff02::1", ICMPV6, 0);
        f.protocol_known = false;
        assert_eq!(host_essential_kinds(&f), LINK);
        // A tunnel to a link-scope address is no kind at all, whatever it carries.
        for dst in ["224.0.0.251", "255.255.255.255", "ff02::1"] {
            let mut f = parsed(dst, IPPROTO_UDP, 67);
            f.encapsulated = true;
            assert_eq!(host_essential_kinds(&f), 0, "{dst}");
        }
    }

    #[test]
    fn a_packet_without_a_link_layer_header_is_read_from_its_ip_header() {
        let f = parse_ip_packet(&udp_v4([203, 0, 113, 10], 5432)[..]);
        assert_eq!(f.kind, FrameKind::Ip);
        assert_eq!((f.family, f.dst_v4()), (FAMILY_V4, [203, 0, 113, 10]));
        assert_eq!(
            (f.protocol, f.ports, f.dst_port),
            (IPPROTO_UDP, PortInfo::Known, 5432)
        );

        let mut v6 = [0u8; 48];
        v6[0] = 0x60;
        v6[4..6].copy_from_slice(&8u16.to_be_bytes());
        v6[6] = IPPROTO_UDP;
        v6[24] = 0x20;
        v6[42..44].copy_from_slice(&53u16.to_be_bytes());
        let f = parse_ip_packet(&v6[..]);
        assert_eq!(
            (f.kind, f.family, f.dst[0]),
            (FrameKind::Ip, FAMILY_V6, 0x20)
        );
        assert_eq!((f.ports, f.dst_port), (PortInfo::Known, 53));
    }

    #[test]
    fn an_ip_packet_read_as_ethernet_is_not_ip_and_its_own_framing_fixes_that() {
        // What a tun device's packet looked like to the Ethernet parser: its ethertype
        // bytes are the middle of the IPv4 header, so it passed as "not IP".
        let packet = udp_v4([203, 0, 113, 10], 5432);
        assert_eq!(parse_frame(&packet[..], 0).kind, FrameKind::NotIp);
        assert_eq!(parse_ip_packet(&packet[..]).kind, FrameKind::Ip);
    }

    /// A UDP packet to port 5432 whose header carries `options` (padded to whole words).
    fn udp_v4_with_options(options: &[u8]) -> Vec<u8> {
        let mut options = options.to_vec();
        while !options.len().is_multiple_of(4) {
            options.push(IPOPT_END);
        }
        let plain = udp_v4([192, 0, 2, 1], 5432);
        let mut p = plain[..20].to_vec();
        p.extend_from_slice(&options);
        p.extend_from_slice(&plain[20..]);
        p[0] = 0x40 | (5 + options.len() / 4) as u8;
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p
    }

    /// A source-route option of `kind` with `pointer` and two addresses.
    fn source_route(kind: u8, pointer: u8) -> Vec<u8> {
        let mut o = vec![kind, 11, pointer];
        o.extend_from_slice(&[198, 51, 100, 1, 203, 0, 113, 10]);
        o
    }

    #[test]
    fn an_ipv4_source_route_with_addresses_left_is_routed_wherever_it_sits() {
        let lsrr = source_route(IPOPT_LSRR, 4);
        let ssrr = source_route(IPOPT_SSRR, 8);
        let after_nops = [vec![IPOPT_NOOP; 3], lsrr.clone()].concat();
        // A router alert (four bytes) ahead of the route.
        let after_another = [vec![148, 4, 0, 0], ssrr.clone()].concat();
        // A pointer inside the option's own header, which the kernel refuses: routed all
        // the same.
        let odd_pointer = source_route(IPOPT_SSRR, 3);
        for options in [lsrr, ssrr, after_nops, after_another, odd_pointer] {
            let f = parse_ip_packet(&udp_v4_with_options(&options)[..]);
            assert_eq!(f.kind, FrameKind::Ip, "{options:?}");
            assert!(f.routed, "{options:?}");
            assert_eq!((f.ports, f.dst_port), (PortInfo::Known, 5432));
        }
    }

    #[test]
    fn a_finished_source_route_or_other_options_leave_the_destination_final() {
        // The pointer is past the last address: the header's destination is the last stop.
        let done = source_route(IPOPT_LSRR, 12);
        let record_route = [7u8, 7, 4, 0, 0, 0, 0].to_vec();
        // A route after the end-of-options marker is padding, not an option.
        let after_end = [vec![IPOPT_END], source_route(IPOPT_LSRR, 4)].concat();
        for options in [done, record_route, after_end, vec![IPOPT_NOOP; 40]] {
            let f = parse_ip_packet(&udp_v4_with_options(&options)[..]);
            assert_eq!(f.kind, FrameKind::Ip, "{options:?}");
            assert!(!f.routed, "{options:?}");
        }
    }

    #[test]
    fn options_the_kernel_refuses_make_the_frame_malformed() {
        // Every Linux hop drops these, and none may hide a route: each is malformed.
        let too_short = vec![IPOPT_LSRR, 1];
        let past_the_header = vec![IPOPT_LSRR, 40, 4];
        let zero_length_then_route = [vec![7, 0], source_route(IPOPT_LSRR, 4)].concat();
        for options in [too_short, past_the_header, zero_length_then_route] {
            let f = parse_ip_packet(&udp_v4_with_options(&options)[..]);
            assert_eq!(f.kind, FrameKind::Malformed, "{options:?}");
        }
    }

    /// An Ethernet frame around `packet`.
    fn ethernet(packet: &[u8]) -> Vec<u8> {
        framed(ETH_P_IP, packet)
    }

    /// An IPv4 packet to 203.0.113.10 of `protocol`, carrying `payload`.
    fn ipv4(protocol: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = udp_v4([203, 0, 113, 10], 0)[..20].to_vec();
        p[9] = protocol;
        p.extend_from_slice(payload);
        let total = p.len() as u16;
        p[2..4].copy_from_slice(&total.to_be_bytes());
        p
    }

    #[test]
    fn tunnels_take_their_inner_transport_and_keep_their_outer_destination() {
        let inner = udp_v4([198, 51, 100, 10], 5432);
        let vxlan_payload = [&[0x08, 0, 0, 0, 0, 0, 42, 0][..], &ethernet(&inner)].concat();
        let vxlan_to = |port: u16| {
            let mut vxlan = udp_v4([203, 0, 113, 10], port).to_vec();
            vxlan.extend_from_slice(&vxlan_payload);
            let total = vxlan.len() as u16;
            vxlan[2..4].copy_from_slice(&total.to_be_bytes());
            vxlan
        };
        for (packet, case) in [
            (ipv4(IPPROTO_IPIP, &inner), "IP in IP"),
            (
                ipv4(IPPROTO_GRE, &[&[0, 0, 0x08, 0][..], &inner].concat()),
                "GRE",
            ),
            (vxlan_to(VXLAN_PORT), "VXLAN"),
            (vxlan_to(LINUX_VXLAN_PORT), "VXLAN on Linux's default port"),
        ] {
            let f = parse_ip_packet(&packet[..]);
            assert_eq!(f.kind, FrameKind::Ip, "{case}");
            assert!(f.encapsulated, "{case}");
            assert_eq!(
                (f.protocol, f.ports, f.dst_port),
                (IPPROTO_UDP, PortInfo::Known, 5432),
                "{case}"
            );
            assert_eq!(
                f.dst_v4(),
                [203, 0, 113, 10],
                "{case}: the outer destination"
            );
        }
        // Behind the destination options header that Linux's ip6tnl puts in front of the
        // tunnel (the encapsulation limit option, then padding).
        let mut ip6tnl = vec![0x60, 0, 0, 0, 0, 0, IPPROTO_DSTOPTS, 64];
        ip6tnl.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        ip6tnl.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        ip6tnl.extend_from_slice(&[IPPROTO_IPIP, 0, 4, 1, 4, 1, 1, 0]);
        ip6tnl.extend_from_slice(&inner);
        let payload = (ip6tnl.len() - 40) as u16;
        ip6tnl[4..6].copy_from_slice(&payload.to_be_bytes());
        let f = parse_ip_packet(&ip6tnl[..]);
        assert_eq!(
            (f.kind, f.encapsulated, f.protocol, f.dst_port),
            (FrameKind::Ip, true, IPPROTO_UDP, 5432),
            "IP in IPv6 behind the encapsulation limit"
        );
        // Behind a header that claims more than the tunnel stage reads, or behind another
        // kind of extension header: the inner headers are not read, and the frame fails
        // closed.
        for (byte, value, case) in [
            (41, 255, "2,048 bytes of options"),
            (6, 0, "a hop-by-hop header"),
        ] {
            let mut odd = ip6tnl.clone();
            odd[byte] = value;
            let f = parse_ip_packet(&odd[..]);
            assert_eq!(f.kind, FrameKind::Malformed, "{case}");
        }
        // Cut inside the inner header: malformed, with nothing known of its transport.
        let f = parse_ip_packet(&ipv4(IPPROTO_IPIP, &inner[..12])[..]);
        assert_eq!((f.kind, f.ports), (FrameKind::Malformed, PortInfo::Unknown));
        // A later fragment of a tunnel carries no inner headers to read.
        let mut later = ipv4(IPPROTO_IPIP, &inner);
        later[6..8].copy_from_slice(&1u16.to_be_bytes());
        let f = parse_ip_packet(&later[..]);
        assert!(!f.encapsulated);
        assert_eq!(f.fragment, fragment::LATER);
    }

    /// An Ethernet frame of `ethertype` carrying `payload`.
    fn framed(ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A label stack of `depth` entries, the last marked bottom of stack.
    fn labels(depth: usize) -> Vec<u8> {
        (0..depth)
            .flat_map(|i| {
                let bottom = u8::from(i + 1 == depth);
                [0x00, 0x06, 0x40 | bottom, 64]
            })
            .collect()
    }

    /// A PPPoE session frame's header and PPP protocol, for `payload`.
    fn pppoe(protocol: u16, payload: &[u8]) -> Vec<u8> {
        let length = (payload.len() + 2) as u16;
        let mut p = vec![0x11, 0, 0x12, 0x34];
        p.extend_from_slice(&length.to_be_bytes());
        p.extend_from_slice(&protocol.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    #[test]
    fn ip_under_mpls_labels_or_in_pppoe_sessions_is_read_and_what_cannot_be_read_fails_closed() {
        let v4 = udp_v4([203, 0, 113, 10], 5432);
        let mut v6 = vec![0x60, 0, 0, 0, 0, 8, IPPROTO_UDP, 64];
        v6.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        v6.extend_from_slice(&[
            0x20, 0x01, 0x0d, 0xb8, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
        ]);
        v6.extend_from_slice(&[0, 1, 0x15, 0x38, 0, 8, 0, 0]);
        let readable = [
            (
                framed(ETH_P_MPLS_UC, &[&labels(1)[..], &v4].concat()),
                "IPv4 under a label",
            ),
            (
                framed(ETH_P_MPLS_MC, &[&labels(MAX_MPLS_LABELS)[..], &v4].concat()),
                "IPv4 under the deepest stack read",
            ),
            (
                framed(ETH_P_MPLS_UC, &[&labels(3)[..], &v6].concat()),
                "IPv6 under three labels",
            ),
            (framed(ETH_P_PPP_SES, &pppoe(PPP_IP, &v4)), "IPv4 in PPPoE"),
            (
                framed(ETH_P_PPP_SES, &pppoe(PPP_IPV6, &v6)),
                "IPv6 in PPPoE",
            ),
        ];
        for (frame, case) in &readable {
            let f = parse_frame(&frame[..], 0);
            assert_eq!(f.kind, FrameKind::Ip, "{case}");
            assert!(f.carried, "{case}");
            assert_eq!((f.protocol, f.dst_port), (IPPROTO_UDP, 5432), "{case}");
            assert!(f.dst_known, "{case}");
            let want = if f.family == FAMILY_V4 {
                &[203, 0, 113, 10][..]
            } else {
                &v6[24..40]
            };
            assert_eq!(&f.dst[..want.len()], want, "{case}");
        }
        // After VLAN tags, and inside a tunnel: GRE's protocol field names MPLS.
        let mut tagged = framed(ETH_P_8021Q, &[0, 7]);
        tagged.extend_from_slice(&readable[0].0[12..]);
        assert_eq!(parse_frame(&tagged[..], 0).kind, FrameKind::Ip);
        let gre = ipv4(
            IPPROTO_GRE,
            &[&[0, 0, 0x88, 0x47][..], &labels(2), &v4].concat(),
        );
        let f = parse_ip_packet(&gre[..]);
        assert_eq!(
            (f.kind, f.encapsulated, f.dst_port),
            (FrameKind::Ip, true, 5432)
        );
        // Without a link-layer header, by the protocol the kernel gives the packet.
        let bare = [&labels(2)[..], &v4].concat();
        let f = parse_l3_packet_headers(&bare[..], ETH_P_MPLS_UC);
        assert_eq!((f.kind, f.dst_port), (FrameKind::Ip, 5432));
        assert_eq!(parse_l3_packet_headers(&v4[..], ETH_P_IP).dst_port, 5432);

        for (frame, case) in [
            (
                framed(
                    ETH_P_MPLS_UC,
                    &[&labels(MAX_MPLS_LABELS + 1)[..], &v4].concat(),
                ),
                "a stack deeper than is read",
            ),
            (framed(ETH_P_MPLS_UC, &labels(2)), "a stack cut short"),
            (
                framed(
                    ETH_P_MPLS_UC,
                    &[&labels(1)[..], &[0, 0, 0, 0], &ethernet(&v4)].concat(),
                ),
                "an Ethernet pseudowire",
            ),
            (
                framed(ETH_P_MPLS_UC, &[&labels(1)[..], &v4[..12]].concat()),
                "IPv4 cut short",
            ),
            (
                framed(ETH_P_PPP_SES, &pppoe(0x002d, &v4[4..])),
                "header-compressed TCP/IP",
            ),
            (framed(ETH_P_PPP_SES, &pppoe(0x003d, &v4)), "multilink PPP"),
            (
                framed(ETH_P_PPP_SES, &pppoe(0x2145, &v4[2..])),
                "a compressed protocol field",
            ),
            (
                framed(ETH_P_PPP_SES, &[0x11, 0, 0x12]),
                "a PPPoE header cut short",
            ),
        ] {
            assert_eq!(
                parse_frame(&frame[..], 0).kind,
                FrameKind::Malformed,
                "{case}"
            );
        }
        // PPP's own control, and PPPoE's discovery, carry no user data.
        for (frame, case) in [
            (framed(ETH_P_PPP_SES, &pppoe(0xc021, &[1, 1, 0, 4])), "LCP"),
            (
                framed(ETH_P_PPP_SES, &pppoe(0x8057, &[1, 1, 0, 4])),
                "IPv6CP",
            ),
            (framed(0x8863, &[0x11, 0x09, 0, 0, 0, 0]), "PPPoE discovery"),
        ] {
            assert_eq!(parse_frame(&frame[..], 0).kind, FrameKind::NotIp, "{case}");
        }
    }

    #[test]
    fn the_transport_behind_an_ipv4_ah_header_is_read_and_a_tunnel_behind_one_fails_closed() {
        // AH: next header, length (4-byte words less two), reserved, SPI, sequence number
        // and a 12-byte ICV: 24 bytes, so a length of 4.
        let ah = |next: u8| {
            let mut h = vec![next, 4, 0, 0, 0, 0, 0x10, 0, 0, 0, 0, 1];
            h.extend_from_slice(&[0xa5; 12]);
            h
        };
        let udp = udp_v4([198, 51, 100, 10], 5432)[20..].to_vec();
        let f = parse_ip_packet(&ipv4(IPPROTO_AH, &[ah(IPPROTO_UDP), udp.clone()].concat())[..]);
        assert_eq!(
            (f.kind, f.protocol, f.ip_protocol, f.ports, f.dst_port),
            (
                FrameKind::Ip,
                IPPROTO_UDP,
                IPPROTO_AH,
                PortInfo::Known,
                5432
            )
        );
        assert!(!f.encapsulated);
        // Cut inside the AH header, or inside the transport header behind it.
        for cut in [1, 20, 28] {
            let packet = ipv4(IPPROTO_AH, &[ah(IPPROTO_UDP), udp.clone()].concat()[..cut]);
            assert_eq!(
                parse_ip_packet(&packet[..]).kind,
                FrameKind::Malformed,
                "cut {cut}"
            );
        }
        // AH behind AH is not walked: malformed.
        let f = parse_ip_packet(
            &ipv4(
                IPPROTO_AH,
                &[ah(IPPROTO_AH), ah(IPPROTO_UDP), udp.clone()].concat(),
            )[..],
        );
        assert_eq!(f.kind, FrameKind::Malformed);
        // IP in IP behind AH (tunnel mode): not read, so malformed.
        let inner = udp_v4([198, 51, 100, 10], 5432);
        let f =
            parse_ip_packet(&ipv4(IPPROTO_AH, &[ah(IPPROTO_IPIP), inner.to_vec()].concat())[..]);
        assert_eq!((f.kind, f.encapsulated), (FrameKind::Malformed, true));
        // A later fragment's payload is no AH header, whatever its protocol says.
        let mut later = ipv4(IPPROTO_AH, &[ah(IPPROTO_UDP), udp].concat());
        later[6..8].copy_from_slice(&1u16.to_be_bytes());
        let f = parse_ip_packet(&later[..]);
        assert_eq!((f.protocol, f.fragment), (IPPROTO_AH, fragment::LATER));
    }

    #[test]
    fn other_versions_are_not_ip_and_a_cut_header_is_malformed() {
        let mut packet = udp_v4([203, 0, 113, 10], 5432);
        packet[0] = 0x55;
        assert_eq!(parse_ip_packet(&packet[..]).kind, FrameKind::NotIp);
        assert_eq!(parse_ip_packet(&[0x45u8][..]).kind, FrameKind::Malformed);
        assert_eq!(parse_ip_packet(&packet[..0]).kind, FrameKind::Malformed);
        // An IPv4 version with the header cut short: malformed, not passed as non-IP.
        assert_eq!(
            parse_ip_packet(&[0x45u8, 0, 0, 28][..]).kind,
            FrameKind::Malformed
        );
    }
}
