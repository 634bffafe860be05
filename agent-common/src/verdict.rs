//! The one sequence of verdict steps, shared by the kernel and `explain`.
//!
//! [`judge_frame`] is generic over [`Lookups`], the way `parse_frame` is generic over
//! `PacketBytes`: the eBPF judge stage gives it the kernel's maps, `explain` gives it the
//! policy's own lists. The order of the steps, and so the answer to "which rule decided",
//! is written here once.

use crate::{
    CLASS_NONE, ClassMask, FAMILY_V4, FAMILY_V6, FragmentKey, Hook, MAX_CLASSES,
    MAX_NAT64_PREFIXES, Policy, PolicyHeader, REGION_NONE, Reason, RegionId, Verdict,
    decide::{Decision, PacketFacts, classify, judge, judge_malformed},
    parse::{
        FrameKind, IPPROTO_ESP, ParsedFrame, TunnelFacts, fragment, host_essential_kinds,
        is_builtin_exempt,
    },
    selector,
};

/// The tables a judgement reads. `slot` is whatever [`Lookups::policy`] returned with the
/// policy; implementations without slots ignore it.
pub trait Lookups {
    /// The policy in force and its slot, or `None` before one is loaded.
    fn policy(&self) -> Option<(u32, &Policy)>;
    /// Whether the policy's `exempt` list covers the destination.
    fn exempt(&self, slot: u32, policy: &Policy, frame: &ParsedFrame) -> bool;
    /// Whether these are a gateway interface's XDP hook's lookups: there a packet may be
    /// forwarded or taken in, and the host's own addresses tell which.
    const AT_GATEWAY: bool = false;
    /// Whether the host takes the frame in: [`taken_in_if_local`], to one of the host's
    /// own addresses. Asked only [`Self::AT_GATEWAY`].
    #[inline(always)]
    fn taken_in(&self, _frame: &ParsedFrame) -> bool {
        false
    }
    /// Classes whose cgroup selector names the sender's cgroup or an ancestor.
    fn cgroup_classes(&self, slot: u32) -> ClassMask;
    /// Classes whose source-CIDR selector holds the source address.
    fn src_classes(&self, slot: u32, frame: &ParsedFrame) -> ClassMask;
    /// The destination's region, or [`REGION_NONE`].
    fn region(&self, slot: u32, frame: &ParsedFrame) -> RegionId;
    /// The class of a packet with these facts; `explain --class` overrides it.
    #[inline(always)]
    fn classify(&self, policy: &Policy, facts: &PacketFacts) -> u8 {
        classify(policy, facts)
    }
    /// The judgement of the first fragment of `frame`'s datagram from the same sender
    /// ([`fragment_key`]), if it was seen. `explain` judges whole packets, so it has none.
    #[inline(always)]
    fn first_fragment(&self, _frame: &ParsedFrame) -> Option<Judgement> {
        None
    }
    /// Keeps a first fragment's judgement for the later fragments of its datagram.
    #[inline(always)]
    fn record_first_fragment(&self, _frame: &ParsedFrame, _judgement: &Judgement) {}
    /// Returns the value unchanged. The kernel's version makes the verifier forget what it
    /// knows of it, so that the steps after a lookup with many exits are checked once.
    #[inline(always)]
    fn opaque(&self, value: u32) -> u32 {
        value
    }
}

/// The judgement of one frame, with what the counters and events need.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Judgement {
    pub decision: Decision,
    /// The deciding class, or [`CLASS_NONE`].
    pub class: u8,
    /// The destination's region when one was looked up, else [`REGION_NONE`].
    pub region: RegionId,
    /// The generation of the policy that judged, 0 when none was loaded.
    pub generation: u32,
}

impl Judgement {
    const fn allow(reason: Reason, generation: u32) -> Self {
        Self {
            decision: Decision::allow(reason),
            class: CLASS_NONE,
            region: REGION_NONE as RegionId,
            generation,
        }
    }
}

/// The NAT64 well-known prefix, `64:ff9b::/96` (RFC 6052): a translator sends a packet
/// to one of its addresses on to the IPv4 address in the last four bytes.
pub const NAT64_PREFIX: [u8; 12] = [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0];

/// The first 12 bytes of an IPv6 address as the three words NAT64 prefixes are compared
/// in ([`PolicyHeader::nat64`]).
#[inline(always)]
pub fn nat64_words(address: &[u8; 16]) -> [u32; 3] {
    let word =
        |i: usize| u32::from_ne_bytes([address[i], address[i + 1], address[i + 2], address[i + 3]]);
    [word(0), word(4), word(8)]
}

/// Whether an IPv6 destination lies in the well-known NAT64 prefix or one the policy
/// declares. Computed without a branch per prefix: each would be a path of its own for
/// the verifier.
#[inline(always)]
pub fn is_nat64(dst: &[u8; 16], header: &PolicyHeader) -> bool {
    let words = nat64_words(dst);
    let well_known = nat64_words(&{
        let mut a = [0u8; 16];
        a[..12].copy_from_slice(&NAT64_PREFIX);
        a
    });
    let differs = |p: &[u32; 3]| (words[0] ^ p[0]) | (words[1] ^ p[1]) | (words[2] ^ p[2]);
    let mut hit = u32::from(differs(&well_known) == 0);
    let mut i = 0;
    while i < MAX_NAT64_PREFIXES {
        let in_use = u32::from((i as u32) < header.n_nat64);
        hit |= in_use & u32::from(differs(&header.nat64[i]) == 0);
        i += 1;
    }
    hit != 0
}

/// The frame as its destination's judge sees it: an IPv6 frame to a NAT64 address
/// ([`is_nat64`], passed in as `nat64`) becomes one to the embedded IPv4 address; any
/// other frame is itself.
#[inline(always)]
pub fn nat64_target(frame: &ParsedFrame, nat64: bool) -> ParsedFrame {
    let mut target = *frame;
    if frame.family == FAMILY_V6 && nat64 {
        target.family = FAMILY_V4;
        target.dst = [0; 16];
        target.dst[..4].copy_from_slice(&frame.dst[12..]);
    }
    target
}

/// What a fragment's key holds of its sender, besides the source address: what the
/// kernel copies from a datagram to each of its fragments, and the hook that judged it.
#[derive(Clone, Copy, Debug)]
pub struct Sender {
    /// The sending socket's cgroup id; 0 with no socket (XDP, forwarded packets).
    pub cgroup: u64,
    pub mark: u32,
    pub dscp: u8,
    pub hook: Hook,
}

/// The datagram a fragment belongs to, as `sender` sent it.
#[inline(always)]
pub fn fragment_key(frame: &ParsedFrame, sender: Sender) -> FragmentKey {
    FragmentKey {
        src: frame.src,
        dst: frame.dst,
        sender_cgroup: sender.cgroup,
        id: frame.fragment_id,
        mark: sender.mark,
        family: frame.family,
        protocol: if frame.family == FAMILY_V4 {
            frame.ip_protocol
        } else {
            0
        },
        hook: sender.hook as u8,
        dscp: sender.dscp,
        _pad: [0; 4],
    }
}

/// Whether the host takes a frame in, not sends it on, when it is addressed to one of the
/// host's own addresses: a plain IP packet. Not a tunnel, IPsec's ESP or anything under
/// MPLS labels, which a host that ends them decapsulates, decrypts or switches and may
/// send on; those are judged as before. Nor a malformed frame, which fails closed. From
/// the frame's [`TunnelFacts`] and `carried`, which the kernel reads apart from the
/// judge's own reads (see `tunnel_first` there).
#[inline(always)]
pub fn taken_in_if_local(facts: &TunnelFacts, carried: bool) -> bool {
    facts.kind == FrameKind::Ip
        && !facts.encapsulated
        && !carried
        && !facts.may_be_tunnel()
        && facts.protocol != IPPROTO_ESP
}

/// Judges one frame against the policy in force. The steps, in order (docs/architecture.md,
/// "The decision"): non-IP frames pass; loopback and link-local pass; at a gateway's XDP
/// hook, packets to the host's own addresses pass; with no policy
/// loaded, everything passes; the host's own link traffic the policy leaves exempt
/// passes; the policy's exemptions pass; a later fragment takes the
/// verdict of its datagram's first fragment; the packet is classified, and unclassified
/// traffic passes; a malformed frame a class claims is judged as malformed; a routed
/// packet (its destination is only the next hop) by that hop's region and the class's
/// unknown rule, with no exemption for the hop; any other by its destination's region.
/// A first fragment's judgement is kept for the later ones.
#[inline(always)]
pub fn judge_frame<L: Lookups>(frame: &ParsedFrame, mark: u32, lookups: &L) -> Judgement {
    let j = judge_packet(frame, mark, lookups);
    if frame.fragment == fragment::FIRST {
        lookups.record_first_fragment(frame, &j);
    }
    j
}

#[inline(always)]
fn judge_packet<L: Lookups>(frame: &ParsedFrame, mark: u32, lookups: &L) -> Judgement {
    if frame.kind == FrameKind::NotIp {
        return Judgement::allow(Reason::NotIp, 0);
    }
    // A routed packet's destination is only its next hop: an exemption for that hop is
    // not one for the packet, which travels on.
    let final_dst_known = frame.dst_known && !frame.routed;
    if final_dst_known && is_builtin_exempt(frame.family, &frame.dst) {
        return Judgement::allow(Reason::ExemptBuiltin, 0);
    }
    if L::AT_GATEWAY && final_dst_known && lookups.taken_in(frame) {
        return Judgement::allow(Reason::LocalDestination, 0);
    }
    let Some((slot, policy)) = lookups.policy() else {
        return Judgement::allow(Reason::NoPolicy, 0);
    };
    let generation = policy.header.generation;
    if policy.header.loaded == 0 {
        return Judgement::allow(Reason::NoPolicy, generation);
    }
    // Through `opaque`, as below: one branch, not one for each kind of traffic.
    if final_dst_known
        && lookups.opaque(host_essential_kinds(frame) & policy.header.host_essentials) != 0
    {
        return Judgement::allow(Reason::ExemptHostEssential, generation);
    }
    if final_dst_known && lookups.exempt(slot, policy, frame) {
        return Judgement::allow(Reason::ExemptPolicy, generation);
    }
    // Tested through `opaque`: the test below, after classification, would otherwise
    // split every path in between in two for the verifier.
    if lookups.opaque(u32::from(frame.fragment)) == u32::from(fragment::LATER)
        && let Some(first) = lookups.first_fragment(frame)
    {
        return first;
    }
    let in_use = policy.header.selectors_in_use;
    let facts = PacketFacts {
        mark,
        cgroup_classes: if in_use & selector::CGROUP != 0 {
            lookups.opaque(lookups.cgroup_classes(slot))
        } else {
            0
        },
        src_classes: if in_use & selector::SRC_CIDR != 0 && frame.ip_known {
            lookups.opaque(lookups.src_classes(slot, frame))
        } else {
            0
        },
        dscp: frame.dscp,
        protocol: frame.protocol,
        dst_port: frame.dst_port,
        ports: frame.ports,
        ip_known: frame.ip_known,
        protocol_known: frame.protocol_known,
    };
    let class = lookups.opaque(u32::from(lookups.classify(policy, &facts))) as u8;
    if class == CLASS_NONE {
        let reason = if frame.kind == FrameKind::Malformed {
            Reason::MalformedAllowed
        } else {
            Reason::Unclassified
        };
        return Judgement::allow(reason, generation);
    }
    // `classify` returns an index below MAX_CLASSES (a power of two) or CLASS_NONE; the
    // mask states that bound in a form the verifier tracks.
    let spec = &policy.classes[usize::from(class) & (MAX_CLASSES - 1)];
    let mut j = Judgement {
        decision: Decision::allow(Reason::Unclassified),
        class,
        region: RegionId::from(REGION_NONE),
        generation,
    };
    if frame.kind == FrameKind::Malformed {
        j.decision = judge_malformed(spec);
        return j;
    }
    // The region is where the packet ends up: for a NAT64 address (the well-known prefix
    // or one the policy declares), the IPv4 host the translator sends it on to. (Exemptions are not translated: an IPv4 exemption does
    // not reach through a translator, which fails closed.)
    // Through `opaque`: the prefix comparisons' branches end here instead of each
    // splitting the region lookup after them.
    let nat64 = lookups.opaque(u32::from(is_nat64(&frame.dst, &policy.header))) != 0;
    j.region = lookups.opaque(lookups.region(slot, &nat64_target(frame, nat64)));
    j.decision = judge(spec, j.region, frame.routed);
    if frame.fragment == fragment::LATER && j.decision.verdict != Verdict::Allow {
        j.decision.reason = Reason::FragmentUnseen;
    }
    j
}
