//! The programs an earlier agent of the same build left loaded. A restart (a crash, a
//! `systemctl restart`, the watchdog) adopts them instead of loading the object's programs
//! again: the kernel verified them once already, and verifying them again costs a second
//! of CPU on a current kernel, several on an old one, on every host of a fleet at once.
//! An upgrade (another build, so another stage directory) loads its own programs.

#![forbid(unsafe_code)]

use std::path::Path;

use aya::{
    maps::MapInfo,
    programs::{ProgramInfo, SchedClassifier, Xdp},
};
use aya_obj::programs::XdpAttachType;
use datafence_common::{map_names, program_names, stage};

use super::{
    DatapathError, PinLayout, Result,
    load::set_stage,
    maps::{self, Pin},
    program_err,
};

/// The programs pinned beside a build's stage arrays, under their own names.
const PINNED: [&str; 10] = [
    program_names::TC_EGRESS,
    program_names::TC_JUDGE,
    program_names::TC_L3,
    program_names::TC_IPV4_OPTIONS,
    program_names::TC_ENCAPSULATED,
    program_names::XDP_GATEWAY,
    program_names::XDP_JUDGE,
    program_names::XDP_L3,
    program_names::XDP_IPV4_OPTIONS,
    program_names::XDP_ENCAPSULATED,
];

/// One build's programs, as an earlier agent loaded and pinned them.
pub(super) struct Reused {
    /// None once this agent loaded its own TC entry program to move its tcx link ahead
    /// of another program (a chain holds a program once, so the move needs a second).
    pub(super) tc: Option<SchedClassifier>,
    pub(super) tc_judge: SchedClassifier,
    pub(super) tc_l3: SchedClassifier,
    pub(super) tc_options: SchedClassifier,
    pub(super) tc_encap: SchedClassifier,
    pub(super) xdp: Xdp,
    pub(super) xdp_judge: Xdp,
    pub(super) xdp_l3: Xdp,
    pub(super) xdp_options: Xdp,
    pub(super) xdp_encap: Xdp,
}

impl Reused {
    /// This build's pinned programs, if all ten are there and use exactly the maps
    /// pinned for this agent now. A program bound to maps that have since been removed
    /// (a partial `detach`, a hand-deleted directory) would judge by a policy nobody
    /// writes any more: such programs are not adopted, and the object is loaded anew.
    pub(super) fn open(layout: &PinLayout, digest: &str) -> Option<Self> {
        let stages = layout.stages_dir(digest);
        let tc = |name| SchedClassifier::from_pin(stages.join(name)).ok();
        let xdp = |name| Xdp::from_pin(stages.join(name), XdpAttachType::Interface).ok();
        let reused = Self {
            tc: Some(tc(program_names::TC_EGRESS)?),
            tc_judge: tc(program_names::TC_JUDGE)?,
            tc_l3: tc(program_names::TC_L3)?,
            tc_options: tc(program_names::TC_IPV4_OPTIONS)?,
            tc_encap: tc(program_names::TC_ENCAPSULATED)?,
            xdp: xdp(program_names::XDP_GATEWAY)?,
            xdp_judge: xdp(program_names::XDP_JUDGE)?,
            xdp_l3: xdp(program_names::XDP_L3)?,
            xdp_options: xdp(program_names::XDP_IPV4_OPTIONS)?,
            xdp_encap: xdp(program_names::XDP_ENCAPSULATED)?,
        };
        let infos = [
            reused.tc.as_ref()?.info(),
            reused.tc_judge.info(),
            reused.tc_l3.info(),
            reused.tc_options.info(),
            reused.tc_encap.info(),
            reused.xdp.info(),
            reused.xdp_judge.info(),
            reused.xdp_l3.info(),
            reused.xdp_options.info(),
            reused.xdp_encap.info(),
        ];
        let bound = infos
            .into_iter()
            .all(|info| info.is_ok_and(|info| uses_pinned_maps(&info, layout, &stages)));
        bound.then_some(reused)
    }

    /// The kernel's view of one of the programs, by its name in the object.
    pub(super) fn info(&self, name: &str) -> Option<ProgramInfo> {
        match name {
            program_names::TC_EGRESS => self.tc.as_ref()?.info().ok(),
            program_names::TC_JUDGE => self.tc_judge.info().ok(),
            program_names::TC_L3 => self.tc_l3.info().ok(),
            program_names::TC_IPV4_OPTIONS => self.tc_options.info().ok(),
            program_names::TC_ENCAPSULATED => self.tc_encap.info().ok(),
            program_names::XDP_GATEWAY => self.xdp.info().ok(),
            program_names::XDP_JUDGE => self.xdp_judge.info().ok(),
            program_names::XDP_L3 => self.xdp_l3.info().ok(),
            program_names::XDP_IPV4_OPTIONS => self.xdp_options.info().ok(),
            program_names::XDP_ENCAPSULATED => self.xdp_encap.info().ok(),
            _ => None,
        }
    }
}

/// Whether every map `info`'s program uses that has the name of a pinned map is that
/// pinned map (the same kernel object), and there is at least one. Maps of other names
/// (the object's `.rodata`, which holds the table sizes the program was loaded with) are
/// the program's own.
fn uses_pinned_maps(info: &ProgramInfo, layout: &PinLayout, stages: &Path) -> bool {
    let Ok(Some(ids)) = info.map_ids() else {
        return false;
    };
    let mut pinned_seen = 0;
    for id in ids {
        let Ok(map) = MapInfo::from_id(id) else {
            return false;
        };
        let Some(name) = map.name_as_str() else {
            continue;
        };
        let path = match maps::spec_of(name).map(|spec| spec.pin) {
            Some(Pin::Maps) => layout.map(name),
            Some(Pin::Stages) => stages.join(name),
            _ => continue,
        };
        match MapInfo::from_pin(&path) {
            Ok(ours) if ours.id() == id => pinned_seen += 1,
            _ => return false,
        }
    }
    pinned_seen > 0
}

/// Pins this build's freshly loaded programs beside its stage arrays, for the next agent
/// of the same build to adopt. Called once the stage arrays hold the judges, so an
/// adopted set is always a complete one.
pub(super) fn pin_programs(ebpf: &mut aya::Ebpf, layout: &PinLayout, digest: &str) -> Result<()> {
    let stages = layout.stages_dir(digest);
    for name in PINNED {
        let path = stages.join(name);
        // A set an earlier agent pinned but this one did not adopt (its maps are gone).
        let _ = std::fs::remove_file(&path);
        let program = ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram(name))?;
        program
            .pin(&path)
            .map_err(|source| DatapathError::Pin { path, source })?;
    }
    Ok(())
}

/// Puts adopted stages in their arrays again: they are there already (the arrays are
/// pinned with them), and setting them is cheap insurance that the adopted entry programs
/// find them.
pub(super) fn refill_stages(ebpf: &mut aya::Ebpf, reused: &Reused) -> Result<()> {
    let stages = [
        (
            map_names::TC_STAGES,
            stage::JUDGE,
            program_names::TC_JUDGE,
            reused.tc_judge.fd(),
        ),
        (
            map_names::TC_STAGES,
            stage::L3_PARSE,
            program_names::TC_L3,
            reused.tc_l3.fd(),
        ),
        (
            map_names::XDP_STAGES,
            stage::JUDGE,
            program_names::XDP_JUDGE,
            reused.xdp_judge.fd(),
        ),
        (
            map_names::XDP_STAGES,
            stage::L3_PARSE,
            program_names::XDP_L3,
            reused.xdp_l3.fd(),
        ),
        (
            map_names::TC_STAGES,
            stage::IPV4_OPTIONS,
            program_names::TC_IPV4_OPTIONS,
            reused.tc_options.fd(),
        ),
        (
            map_names::XDP_STAGES,
            stage::IPV4_OPTIONS,
            program_names::XDP_IPV4_OPTIONS,
            reused.xdp_options.fd(),
        ),
        (
            map_names::TC_STAGES,
            stage::ENCAPSULATED,
            program_names::TC_ENCAPSULATED,
            reused.tc_encap.fd(),
        ),
        (
            map_names::XDP_STAGES,
            stage::ENCAPSULATED,
            program_names::XDP_ENCAPSULATED,
            reused.xdp_encap.fd(),
        ),
    ];
    for (array, index, program, fd) in stages {
        set_stage(ebpf, array, index, fd.map_err(program_err(program))?)?;
    }
    Ok(())
}
