//! Attaching the programs: TC egress as a tcx link or a clsact filter, XDP on gateway
//! interfaces. With pinning, what an earlier agent left is adopted (its program swapped
//! atomically) rather than attached twice.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use aya::programs::{
    LinkOrder, ProgramError, TcAttachType, XdpMode,
    links::{FdLink, LinkError},
    tc::{self, NlOptions, TcAttachOptions, TcError},
};
use datafence_common::{Hook, program_names};

use super::{
    Attached, Datapath, DatapathError, Result, pins,
    sys::{self, if_index, tcx_egress_program_ids},
};
use crate::clsact;

/// Switches the link an earlier agent pinned at `path` to this agent's program with
/// `swap`. A link detached by someone else, or not ours, is unpinned so that a fresh one
/// can take its place.
fn adopt_pinned<L: TryFrom<FdLink>>(path: &Path, swap: impl FnOnce(L) -> bool) -> bool {
    let Some(old) = pins::adopt_link(path) else {
        return false;
    };
    if let Ok(link) = L::try_from(old)
        && swap(link)
    {
        return true;
    }
    let _ = std::fs::remove_file(path);
    false
}

/// Pins a new link: the pin keeps the link (and so the enforcement) alive after this
/// process exits. The links' directory is made again if someone removed it: removing a
/// pin detaches its link, and a link that cannot be pinned would go with this call.
fn pin_link<L: TryInto<FdLink, Error = LinkError>>(
    link: L,
    path: PathBuf,
    interface: &str,
) -> Result<()> {
    let fd: FdLink = link.try_into().map_err(|source| DatapathError::Link {
        interface: interface.to_owned(),
        source,
    })?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| DatapathError::PinDir {
            path: dir.to_owned(),
            source,
        })?;
    }
    fd.pin(&path)
        .map_err(|source| DatapathError::Pin { path, source })?;
    Ok(())
}

fn attach_err(interface: &str) -> impl Fn(ProgramError) -> DatapathError + '_ {
    move |source| DatapathError::Attach {
        interface: interface.to_owned(),
        source,
    }
}

impl Datapath {
    /// Attaches the TC egress program to `interface` the way [`Self::tc_kind`] says, then
    /// retires any other datafence attachment on that hook (of the other kind, or a clsact
    /// filter outside datafence's place), once the new one enforces.
    pub fn attach_tc(&mut self, interface: &str) -> Result<Attached> {
        ensure_interface(interface)?;
        self.record_framing(interface)?;
        let how = match self.tc_kind {
            TcKind::Tcx => self.attach_tcx(interface)?,
            TcKind::Clsact => self.attach_clsact(interface)?,
        };
        self.retire_other_tc_attachments(interface);
        Ok(how)
    }

    /// tcx: with pinning, a link pinned by an earlier agent is switched to this program
    /// atomically instead of attaching a second time; the pin keeps the link (and so the
    /// enforcement) alive after this process exits.
    fn attach_tcx(&mut self, interface: &str) -> Result<Attached> {
        let pin = self
            .pins
            .as_ref()
            .map(|p| p.link(Hook::TcEgress, interface));
        if let Some(path) = &pin
            && let Some(old) = pins::adopt_link(path)
        {
            // An adopted link keeps its place in the chain, and agents before
            // datafence linked itself first appended theirs last.
            let old_program = old.info().ok().map(|info| info.program_id());
            let ahead = old_program
                .map(|id| tcx_programs_ahead_of(interface, id))
                .unwrap_or_default();
            if !ahead.is_empty() {
                return self.move_ahead(interface, path, old, old_program, &ahead);
            }
            let prog = self.tc_entry_mut()?;
            if let Ok(link) = tc::SchedClassifierLink::try_from(old)
                && prog.attach_to_link(link).is_ok()
            {
                return Ok(Attached::Adopted);
            }
            // Detached by someone else, or not ours: a fresh link takes the pin's place.
            let _ = std::fs::remove_file(path);
        }
        let prog = self.tc_entry_mut()?;
        let id = link_first(prog, interface)?;
        if let Some(path) = pin {
            let link = prog.take_link(id).map_err(attach_err(interface))?;
            pin_link(link, path, interface)?;
        }
        Ok(Attached::New)
    }

    /// Takes the head of `interface`'s tcx chain from programs linked ahead of the link
    /// an earlier agent pinned at `path`: a new link, first, pinned in the old one's place
    /// (a rename: the pin never goes missing), then the old link is let go. Both judge
    /// alike in between. A chain holds a program once, so an adopted entry program that
    /// the old link runs is replaced by this agent's own.
    fn move_ahead(
        &mut self,
        interface: &str,
        path: &Path,
        old: FdLink,
        old_program: Option<u32>,
        ahead: &[u32],
    ) -> Result<Attached> {
        if old_program.is_some() && old_program == self.program_id(program_names::TC_EGRESS) {
            self.load_own_tc_entry()?;
        }
        let prog = self.tc_entry_mut()?;
        let id = link_first(prog, interface)?;
        let link = prog.take_link(id).map_err(attach_err(interface))?;
        // Outside the links directory, which `status` reads (bpffs refuses dots in
        // names, so no `.moving` beside it).
        let moving = path
            .parent()
            .and_then(Path::parent)
            .unwrap_or(path)
            .join("moving_tc_link");
        let _ = std::fs::remove_file(&moving);
        pin_link(link, moving.clone(), interface)?;
        std::fs::rename(&moving, path).map_err(|source| DatapathError::Pin {
            path: path.to_owned(),
            source: aya::pin::PinError::SyscallError(aya::sys::SyscallError {
                call: "rename",
                io_error: source,
            }),
        })?;
        // Its pin is gone: this was the last hold on the old link.
        drop(old);
        tracing::info!(
            interface,
            ?ahead,
            "moved datafence's tcx link ahead of programs linked before it"
        );
        Ok(Attached::Adopted)
    }

    /// Loads the object's TC entry program and makes it this agent's, in place of the one
    /// adopted from an earlier agent.
    fn load_own_tc_entry(&mut self) -> Result<()> {
        let name = program_names::TC_EGRESS;
        super::program_mut::<aya::programs::SchedClassifier>(&mut self.ebpf, name)?
            .load()
            .map_err(super::program_err(name))?;
        if let Some(reused) = self.reused.as_mut() {
            reused.tc = None;
        }
        Ok(())
    }

    /// clsact: a `cls_bpf` filter at datafence's fixed place (see [`crate::clsact`]). When
    /// an earlier agent's filter holds the place, its program is replaced in one request
    /// (`tc filter replace`): the hook is never empty.
    ///
    /// With pinning, this process lets go of the filter: aya removes the filters it owns
    /// when the program is dropped, and enforcement must outlive the agent (a crash
    /// leaves the filter in place anyway, as the kernel owns it). Without pinning, aya
    /// keeps it, so it goes when the agent exits.
    fn attach_clsact(&mut self, interface: &str) -> Result<Attached> {
        let attach_err = &attach_err(interface);
        add_clsact_qdisc(interface)?;
        if self.runs_in_datafence_place(interface) {
            // An adopted program, still in place: replacing it with itself would only
            // rename the filter (a program opened from a pin carries the kernel's
            // 15-character name).
            return Ok(Attached::Adopted);
        }
        let place = || NlOptions {
            priority: clsact::PRIORITY,
            handle: clsact::HANDLE.into(),
            classid: None,
        };
        let pinned = self.pins.is_some();
        let prog = self.tc_entry_mut()?;
        let (id, how) = match prog.attach_with_options(
            interface,
            TcAttachType::Egress,
            TcAttachOptions::Netlink(place()),
        ) {
            Ok(id) => (id, Attached::New),
            Err(e) if is_already_there(&e) => {
                let NlOptions {
                    priority, handle, ..
                } = place();
                let old = aya::programs::tc::SchedClassifierLink::attached(
                    interface,
                    TcAttachType::Egress,
                    priority,
                    handle,
                    None,
                )
                .map_err(|e| attach_err(TcError::IoError(e).into()))?;
                let id = prog.attach_to_link(old).map_err(attach_err)?;
                (id, Attached::Adopted)
            }
            Err(e) => return Err(attach_err(e)),
        };
        if pinned {
            let link = prog.take_link(id).map_err(attach_err)?;
            // Forgetting the handle leaks a few bytes of bookkeeping, not the filter's
            // resources: the kernel holds those, and `datafence detach` removes them.
            std::mem::forget(link);
        }
        Ok(how)
    }

    /// Whether this agent's TC program already runs in the clsact filter at datafence's
    /// place on `interface` (it adopted the program an earlier agent attached there).
    fn runs_in_datafence_place(&self, interface: &str) -> bool {
        // Only an adopted program counts; for any other, asking the kernel is wasted.
        if self.reused.is_none() {
            return false;
        }
        let Some(id) = self.program_info(program_names::TC_EGRESS).map(|i| i.id()) else {
            return false;
        };
        clsact::datafence_filters_on(interface).is_ok_and(|filters| {
            filters
                .iter()
                .any(|f| f.in_datafence_place() && f.program_id == Some(id))
        })
    }

    /// Removes datafence's other attachments on an interface's TC egress hook once this
    /// agent's program enforces there: after a switch between tcx and clsact, and
    /// filters an agent from before the fixed place left wherever the kernel put them.
    /// Failures are logged: the new attachment enforces either way.
    fn retire_other_tc_attachments(&self, interface: &str) {
        let keep_place = self.tc_kind == TcKind::Clsact;
        match clsact::datafence_filters_on(interface) {
            Ok(filters) => {
                for f in filters {
                    if keep_place && f.in_datafence_place() {
                        continue;
                    }
                    match clsact::remove(&f) {
                        Ok(()) => tracing::info!(
                            interface,
                            priority = f.priority,
                            handle = f.handle,
                            "removed an earlier datafence clsact filter"
                        ),
                        Err(e) => {
                            tracing::warn!(interface, error = %e, "cannot remove an earlier datafence clsact filter");
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(interface, error = %e, "cannot list the clsact filters");
            }
        }
        if self.tc_kind == TcKind::Clsact
            && let Some(path) = self
                .pins
                .as_ref()
                .map(|p| p.link(Hook::TcEgress, interface))
            && path.exists()
        {
            // tcx runs before clsact filters: an earlier agent's tcx link would go on
            // deciding with the old program.
            let _ = sys::detach_pinned_link(&path);
            let _ = std::fs::remove_file(&path);
            tracing::info!(interface, "removed the tcx link of an earlier agent");
        }
    }

    /// How TC egress programs are attached.
    pub fn tc_kind(&self) -> TcKind {
        self.tc_kind
    }

    /// Chooses how TC egress programs are attached from now on.
    pub fn set_tc_kind(&mut self, kind: TcKind) {
        self.tc_kind = kind;
    }

    /// Attaches the XDP program to a gateway interface; pinned links are adopted as for
    /// [`Self::attach_tc`].
    pub fn attach_xdp(&mut self, interface: &str) -> Result<Attached> {
        ensure_interface(interface)?;
        self.record_framing(interface)?;
        let pin = self.pins.as_ref().map(|p| p.link(Hook::Xdp, interface));
        let prog = self.xdp_entry_mut()?;
        if let Some(path) = &pin
            && adopt_pinned(path, |link| prog.attach_to_link(link).is_ok())
        {
            return Ok(Attached::Adopted);
        }
        let id = prog
            .attach(interface, XdpMode::Default)
            .map_err(attach_err(interface))?;
        if let Some(path) = pin {
            let link = prog.take_link(id).map_err(attach_err(interface))?;
            pin_link(link, path, interface)?;
        }
        Ok(Attached::New)
    }

    fn program_id(&self, name: &'static str) -> Option<u32> {
        self.program_info(name).map(|i| i.id())
    }

    /// Whether our program is attached to the interface's hook right now, as the kernel
    /// reports it (not as we remember it): someone may have detached it.
    pub fn is_attached(&self, interface: &str, hook: &str) -> bool {
        if hook == Hook::TcEgress.as_str() {
            let Some(id) = self.program_id(program_names::TC_EGRESS) else {
                return false;
            };
            match self.tc_kind {
                TcKind::Tcx => if_index(interface)
                    .and_then(|index| tcx_egress_program_ids(index).ok())
                    .is_some_and(|ids| ids.contains(&id)),
                TcKind::Clsact => clsact::datafence_filters_on(interface).is_ok_and(|filters| {
                    filters
                        .iter()
                        .any(|f| f.in_datafence_place() && f.program_id == Some(id))
                }),
            }
        } else {
            let Some(id) = self.program_id(program_names::XDP_GATEWAY) else {
                return false;
            };
            xdp_program_id(interface) == Some(id)
        }
    }
}

impl Datapath {
    /// The kernel ids of programs that run ahead of datafence's on an interface's TC
    /// egress hook. Any of them that returns a verdict decides for the packet before
    /// datafence judges it, so each is a way around the policy. Empty while datafence's
    /// program is not attached there (that shows as detached), and for XDP, which runs
    /// one program per interface.
    pub fn programs_ahead(&self, interface: &str, hook: &str) -> Vec<u32> {
        if hook != Hook::TcEgress.as_str() {
            return Vec::new();
        }
        let Some(ours) = self.program_id(program_names::TC_EGRESS) else {
            return Vec::new();
        };
        let Some(index) = if_index(interface) else {
            return Vec::new();
        };
        match self.tc_kind {
            TcKind::Tcx => tcx_programs_ahead_of(interface, ours),
            // Lower priorities run first; at datafence's own priority, a filter added
            // later runs first (cls_bpf puts it at the head of the list).
            TcKind::Clsact => clsact::egress_filters(index, interface)
                .unwrap_or_default()
                .iter()
                .filter(|f| f.priority <= clsact::PRIORITY && !f.in_datafence_place())
                .filter_map(|f| f.program_id)
                .collect(),
        }
    }
}

/// Links `prog` at the head of `interface`'s tcx egress chain: a program ahead of
/// datafence that returned a verdict would decide for it.
fn link_first(
    prog: &mut aya::programs::SchedClassifier,
    interface: &str,
) -> Result<tc::SchedClassifierLinkId> {
    prog.attach_with_options(
        interface,
        TcAttachType::Egress,
        TcAttachOptions::TcxOrder(LinkOrder::first()),
    )
    .map_err(attach_err(interface))
}

/// The ids of the programs ahead of `program` in `interface`'s tcx egress chain (the
/// kernel lists a chain in the order it runs it); none when it is not there.
fn tcx_programs_ahead_of(interface: &str, program: u32) -> Vec<u32> {
    if_index(interface)
        .and_then(|index| tcx_egress_program_ids(index).ok())
        .and_then(|ids| {
            let at = ids.iter().position(|id| *id == program)?;
            Some(ids[..at].to_vec())
        })
        .unwrap_or_default()
}

pub(super) fn ensure_interface(interface: &str) -> Result<()> {
    if if_index(interface).is_none() {
        return Err(DatapathError::UnknownInterface(interface.to_owned()));
    }
    Ok(())
}

/// The id of the XDP program on an interface, from `ip -json link show` (iproute2):
/// the kernel reports XDP attachments only through netlink.
fn xdp_program_id(interface: &str) -> Option<u32> {
    let out = std::process::Command::new("ip")
        .args(["-json", "link", "show", "dev", interface])
        .output()
        .ok()?;
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let id = links.get(0)?.get("xdp")?.get("prog")?.get("id")?.as_u64()?;
    u32::try_from(id).ok()
}

/// Adds the clsact qdisc that holds TC filters, unless the interface has one already
/// (an earlier agent's, or another tool's: it is shared).
fn add_clsact_qdisc(interface: &str) -> Result<()> {
    match tc::qdisc_add_clsact(interface) {
        Ok(()) => Ok(()),
        Err(e) if qdisc_exists(&e) => Ok(()),
        Err(source) => Err(DatapathError::Clsact {
            interface: interface.to_owned(),
            source,
        }),
    }
}

/// aya 0.14 reports the kernel's EEXIST ("Exclusivity flag on, cannot modify") as a
/// netlink error, not as `io::ErrorKind::AlreadyExists`.
fn qdisc_exists(e: &TcError) -> bool {
    match e {
        TcError::NetlinkError(n) => n.raw_os_error() == Some(libc::EEXIST),
        TcError::IoError(io) => io.kind() == std::io::ErrorKind::AlreadyExists,
        TcError::AlreadyAttached => true,
        _ => false,
    }
}

/// Whether a create-only filter attach failed because a filter holds the place already.
fn is_already_there(e: &ProgramError) -> bool {
    matches!(e, ProgramError::TcError(TcError::NetlinkError(n)) if n.raw_os_error() == Some(libc::EEXIST))
}

/// How the TC egress program is attached to an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TcKind {
    /// A BPF link on the tcx hook (6.6+), pinned in bpffs to outlive the agent.
    Tcx,
    /// A `cls_bpf` filter on the clsact qdisc, which outlives the agent by itself.
    Clsact,
}

impl TcKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Tcx => "tcx",
            Self::Clsact => "clsact",
        }
    }

    /// What `--tc-attach` asks for on a kernel that has tcx or not: `auto` takes tcx
    /// where the kernel has it.
    pub fn choose(requested: &str, tcx_available: bool) -> Result<Self, String> {
        match requested {
            "auto" | "tcx" if tcx_available => Ok(Self::Tcx),
            "auto" | "clsact" => Ok(Self::Clsact),
            "tcx" => Err(
                "--tc-attach tcx: this kernel has no tcx (Linux 6.6 introduced it); use --tc-attach clsact or auto".to_owned(),
            ),
            other => Err(format!(
                "--tc-attach {other}: expected auto, tcx or clsact"
            )),
        }
    }
}
