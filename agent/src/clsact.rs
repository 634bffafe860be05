//! datafence's TC egress filter on kernels without tcx (before 6.6): a `cls_bpf` filter
//! on the interface's clsact qdisc, found and removed through netlink.
//!
//! Such a filter is not a BPF link: it cannot be pinned, and it does not need to be. The
//! qdisc holds the filter and the filter holds the program, so it keeps enforcing after
//! the process that attached it exits or crashes. What lets a later agent find it again
//! is its fixed place: priority [`PRIORITY`], handle [`HANDLE`] on the egress hook. A
//! new agent replaces the program in that place in one netlink request (the kernel's
//! `cls_bpf_change`, what `tc filter replace` does), so the hook is never empty.
//!
//! Attaching and replacing go through aya; aya cannot list filters, so the dumps here
//! use the rust-netlink crates.
#![forbid(unsafe_code)]

use std::io;

use netlink_packet_route::{
    RouteNetlinkMessage,
    tc::{TcAttribute, TcFilterBpfOption, TcHandle, TcMessage, TcOption},
};
use netlink_sys::protocols::NETLINK_ROUTE;

/// The priority of datafence's filter on the egress hook: 1, the first the kernel runs. A
/// direct-action filter that returns a verdict ends the walk, so a filter ahead of
/// datafence could decide for it; datafence itself passes with `TC_ACT_UNSPEC`, which
/// lets the walk go on to the filters after it. (Earlier agents used priority 0xdf; their
/// filter there is retired as any datafence filter outside this place is.)
pub const PRIORITY: u16 = 1;

/// The handle of datafence's filter at [`PRIORITY`] (`tc` shows it as `handle 0xdf`).
pub const HANDLE: u32 = 0xdf;

/// The clsact qdisc's egress parent (`ffff:fff3`).
const EGRESS_PARENT: TcHandle = TcHandle {
    major: TcHandle::CLSACT.major,
    minor: TcHandle::MIN_EGRESS,
};

/// One BPF filter on an interface's clsact egress hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EgressFilter {
    pub ifindex: u32,
    pub interface: String,
    pub priority: u16,
    pub handle: u32,
    /// The name the attaching process gave (aya gives the program's name).
    pub name: Option<String>,
    pub program_id: Option<u32>,
}

impl EgressFilter {
    /// Whether this is datafence's filter in its fixed place.
    pub fn in_datafence_place(&self) -> bool {
        self.priority == PRIORITY && self.handle == HANDLE
    }

    /// Whether datafence attached it: its fixed place, or its program's name (a filter an
    /// agent from before the fixed place attached wherever the kernel put it).
    pub fn is_datafence(&self) -> bool {
        self.in_datafence_place()
            || self.name.as_deref() == Some(datafence_common::program_names::TC_EGRESS)
    }
}

/// Sends one rtnetlink dump request and collects every message of the answer.
pub(crate) fn dump(request: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
    crate::netlink::dump(NETLINK_ROUTE, request)
}

/// The BPF filters on an interface's clsact egress hook; none when it has no clsact
/// qdisc.
pub fn egress_filters(ifindex: u32, interface: &str) -> io::Result<Vec<EgressFilter>> {
    let mut request = TcMessage::default();
    request.header.index = ifindex as i32;
    request.header.parent = EGRESS_PARENT;
    let answer = match dump(RouteNetlinkMessage::GetTrafficFilter(request)) {
        Ok(a) => a,
        // No clsact qdisc: no hook, so no filters.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    Ok(answer
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewTrafficFilter(f) => filter_of(f, ifindex, interface),
            _ => None,
        })
        .collect())
}

/// The BPF filter a dump message describes. A dump also sends one message per priority
/// with handle 0 (the classifier itself), which is no filter.
fn filter_of(msg: TcMessage, ifindex: u32, interface: &str) -> Option<EgressFilter> {
    let handle = u32::from(msg.header.handle);
    let is_bpf = msg
        .attributes
        .iter()
        .any(|a| matches!(a, TcAttribute::Kind(k) if k == "bpf"));
    if handle == 0 || !is_bpf {
        return None;
    }
    let mut filter = EgressFilter {
        ifindex,
        interface: interface.to_owned(),
        // tcm_info: the priority in the upper 16 bits, the protocol in the lower.
        priority: (msg.header.info >> 16) as u16,
        handle,
        name: None,
        program_id: None,
    };
    for attr in &msg.attributes {
        let TcAttribute::Options(options) = attr else {
            continue;
        };
        for option in options {
            match option {
                TcOption::Bpf(TcFilterBpfOption::ProgName(n)) => filter.name = Some(n.clone()),
                TcOption::Bpf(TcFilterBpfOption::ProgId(id)) => filter.program_id = Some(*id),
                _ => {}
            }
        }
    }
    Some(filter)
}

/// The filters datafence attached on one interface (see [`EgressFilter::is_datafence`]).
pub fn datafence_filters_on(interface: &str) -> io::Result<Vec<EgressFilter>> {
    let Some(index) = crate::datapath::if_index(interface) else {
        return Ok(Vec::new());
    };
    Ok(egress_filters(index, interface)?
        .into_iter()
        .filter(EgressFilter::is_datafence)
        .collect())
}

/// The filters datafence attached on every interface of this network namespace.
pub fn datafence_filters() -> io::Result<Vec<EgressFilter>> {
    let mut all = Vec::new();
    for link in crate::links::all()? {
        all.extend(
            egress_filters(link.index, &link.name)?
                .into_iter()
                .filter(EgressFilter::is_datafence),
        );
    }
    Ok(all)
}

/// Deletes one filter. Deleting a filter that is already gone is not an error.
pub fn remove(filter: &EgressFilter) -> Result<(), aya::programs::ProgramError> {
    use aya::programs::links::Link as _;
    let Ok(link) = aya::programs::tc::SchedClassifierLink::attached(
        &filter.interface,
        aya::programs::TcAttachType::Egress,
        filter.priority,
        filter.handle.into(),
        None,
    ) else {
        // The interface went away, and its filters with it.
        return Ok(());
    };
    match link.detach() {
        Err(aya::programs::ProgramError::NetlinkError(e))
            if e.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Removes every filter datafence attached in this network namespace; returns them as
/// `tc_egress-<interface>`, as the pinned links are named.
pub fn remove_all() -> io::Result<Vec<String>> {
    let mut removed = Vec::new();
    for filter in datafence_filters()? {
        remove(&filter).map_err(|e| {
            io::Error::other(format!(
                "interface {}: removing datafence's clsact filter (priority {}, handle {:#x}): {e}",
                filter.interface, filter.priority, filter.handle
            ))
        })?;
        removed.push(attachment_name(&filter.interface));
    }
    removed.sort();
    removed.dedup();
    Ok(removed)
}

/// How `status` and `detach` name a TC egress attachment.
pub fn attachment_name(interface: &str) -> String {
    format!("{}-{interface}", datafence_common::Hook::TcEgress.as_str())
}
