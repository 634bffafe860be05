//! The socket ring at a cgroup: its four programs, loaded on demand (a kernel that
//! refuses them leaves the packet ring running alone), and attached as links pinned
//! apart from the interfaces' links. A restart switches the pinned links to its own
//! programs (`BPF_LINK_UPDATE`), so that the ring has no gap.

#![forbid(unsafe_code)]

use std::{
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::Path,
};

use aya::programs::{CgroupAttachMode, CgroupSockAddr, links::FdLink};
use datafence_common::{map_names, program_names, socket_stage};

use super::{
    Attached, Datapath, DatapathError, Result, load::set_stage_program, program_err, program_mut,
    sys,
};

/// The socket ring's entry programs, with the names their links are pinned under.
pub const SOCKET_PROGRAMS: [(&str, &str); 4] = [
    (program_names::SOCK_CONNECT4, "connect4"),
    (program_names::SOCK_CONNECT6, "connect6"),
    (program_names::SOCK_SENDMSG4, "sendmsg4"),
    (program_names::SOCK_SENDMSG6, "sendmsg6"),
];

/// The socket ring's stages: (program, the array its hook's programs jump through, index).
pub const SOCKET_STAGES: [(&str, &str, u32); 8] = [
    (
        program_names::SOCK_CONNECT4_JUDGE,
        map_names::SOCK_CONNECT4_STAGES,
        socket_stage::JUDGE,
    ),
    (
        program_names::SOCK_CONNECT4_REPORT,
        map_names::SOCK_CONNECT4_STAGES,
        socket_stage::REPORT,
    ),
    (
        program_names::SOCK_CONNECT6_JUDGE,
        map_names::SOCK_CONNECT6_STAGES,
        socket_stage::JUDGE,
    ),
    (
        program_names::SOCK_CONNECT6_REPORT,
        map_names::SOCK_CONNECT6_STAGES,
        socket_stage::REPORT,
    ),
    (
        program_names::SOCK_SENDMSG4_JUDGE,
        map_names::SOCK_SENDMSG4_STAGES,
        socket_stage::JUDGE,
    ),
    (
        program_names::SOCK_SENDMSG4_REPORT,
        map_names::SOCK_SENDMSG4_STAGES,
        socket_stage::REPORT,
    ),
    (
        program_names::SOCK_SENDMSG6_JUDGE,
        map_names::SOCK_SENDMSG6_STAGES,
        socket_stage::JUDGE,
    ),
    (
        program_names::SOCK_SENDMSG6_REPORT,
        map_names::SOCK_SENDMSG6_STAGES,
        socket_stage::REPORT,
    ),
];

fn ring_err(cgroup: &Path) -> impl Fn(String) -> DatapathError + '_ {
    move |detail| DatapathError::SocketRing {
        cgroup: cgroup.to_owned(),
        detail,
    }
}

impl Datapath {
    /// Loads the socket ring's programs into the kernel, once: the stages first, each put
    /// in its array before its entry program can be attached.
    pub fn load_socket_ring(&mut self) -> Result<()> {
        for (name, array, index) in SOCKET_STAGES {
            let program = program_mut::<CgroupSockAddr>(&mut self.ebpf, name)?;
            if program.fd().is_ok() {
                continue;
            }
            program.load().map_err(program_err(name))?;
            set_stage_program(&mut self.ebpf, array, index, name)?;
        }
        for (name, _) in SOCKET_PROGRAMS {
            let program = program_mut::<CgroupSockAddr>(&mut self.ebpf, name)?;
            if program.fd().is_err() {
                program.load().map_err(program_err(name))?;
            }
        }
        Ok(())
    }

    /// Attaches the socket ring at `cgroup` (a cgroup v2 directory: the root, for every
    /// process of the host). With pinning, the links an earlier agent pinned are switched
    /// to this agent's programs; a link missing or not switchable is attached anew. Says
    /// `New` if any link was.
    pub fn attach_socket_ring(&mut self, cgroup: &Path) -> Result<Attached> {
        self.load_socket_ring()?;
        let err = ring_err(cgroup);
        let dir = self.pins.as_ref().map(super::PinLayout::socket_links_dir);
        if let Some(dir) = &dir {
            std::fs::create_dir_all(dir).map_err(|source| DatapathError::PinDir {
                path: dir.clone(),
                source,
            })?;
        }
        let target = std::fs::File::open(cgroup).map_err(|e| err(e.to_string()))?;
        let target_id = target.metadata().map_err(|e| err(e.to_string()))?.ino();
        let mut how = Attached::Adopted;
        for (name, pin_name) in SOCKET_PROGRAMS {
            let program = program_mut::<CgroupSockAddr>(&mut self.ebpf, name)?;
            let pin = dir.as_ref().map(|d| d.join(pin_name));
            if let Some(path) = &pin
                && path.exists()
            {
                let fd = program.fd().map_err(program_err(name))?;
                let same_cgroup = matches!(
                    sys::pinned_link_cgroup(path),
                    Ok(Some(link)) if link.cgroup == target_id
                );
                if same_cgroup && sys::update_pinned_link(path, &fd.as_fd()).is_ok() {
                    continue;
                }
                // At another cgroup (the agent was told to move the ring), detached by
                // someone else, or not a link: a fresh one takes its place, and the old
                // one lets go of its cgroup.
                let _ = sys::detach_pinned_link(path);
                let _ = std::fs::remove_file(path);
            }
            // A link (kernel 5.7 and later) runs beside other programs on the hook, and
            // no cgroup below can replace it; the kernel takes no mode flags for one.
            let id = program
                .attach(&target, CgroupAttachMode::Single)
                .map_err(|e| err(format!("attaching {name}: {e}")))?;
            how = Attached::New;
            if let Some(path) = pin {
                let link = program.take_link(id).map_err(program_err(name))?;
                let link = FdLink::try_from(link)
                    .map_err(|e| err(format!("{name}: the link cannot be pinned: {e}")))?;
                link.pin(&path)
                    .map_err(|source| DatapathError::Pin { path, source })?;
            }
        }
        Ok(how)
    }

    /// Whether each of the socket ring's pinned links still runs this agent's program at
    /// `cgroup`, as the kernel reports it: someone with CAP_BPF may have detached one
    /// (`BPF_LINK_DETACH` leaves the link, at cgroup 0). Without pinning the links live in
    /// this process, and are taken as attached.
    pub fn socket_ring_attached(&self, cgroup: &Path) -> bool {
        let Some(dir) = self.pins.as_ref().map(super::PinLayout::socket_links_dir) else {
            return true;
        };
        let Ok(target) = std::fs::metadata(cgroup).map(|m| m.ino()) else {
            return false;
        };
        SOCKET_PROGRAMS.iter().all(|(name, pin_name)| {
            let ours = self
                .ebpf
                .program(name)
                .and_then(|p| p.info().ok())
                .map(|info| info.id());
            matches!(
                sys::pinned_link_cgroup(&dir.join(pin_name)),
                Ok(Some(link)) if link.cgroup == target && Some(link.program) == ours
            )
        })
    }
}
