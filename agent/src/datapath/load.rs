//! Loading the object: pinning its maps (the region tables' are made first, see
//! [`tables`](super::tables)), loading the programs and putting the judge stages in
//! their arrays.

#![forbid(unsafe_code)]

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData},
    programs::{ProgramError, SchedClassifier, Xdp},
};
use datafence_common::{LpmDataV4, LpmDataV6, SLOTS, map_names, program_names, stage};

use super::{
    Datapath, DatapathError, EBPF_OBJECT, LoadOptions, PinLayout, Result, TcKind, map_err,
    maps::{self, Kind, Pin, SlotContents, Slots},
    object_digest,
    pin_lock::PinLock,
    pins, program_err, program_mut,
    reuse::{self, Reused},
    tables::{Sizes, TablePins},
};

/// The stages of each hook's program array: (array, index, program).
const STAGES: [(&str, u32, &str); 8] = [
    (map_names::TC_STAGES, stage::JUDGE, program_names::TC_JUDGE),
    (map_names::TC_STAGES, stage::L3_PARSE, program_names::TC_L3),
    (
        map_names::TC_STAGES,
        stage::IPV4_OPTIONS,
        program_names::TC_IPV4_OPTIONS,
    ),
    (
        map_names::TC_STAGES,
        stage::ENCAPSULATED,
        program_names::TC_ENCAPSULATED,
    ),
    (
        map_names::XDP_STAGES,
        stage::JUDGE,
        program_names::XDP_JUDGE,
    ),
    (
        map_names::XDP_STAGES,
        stage::L3_PARSE,
        program_names::XDP_L3,
    ),
    (
        map_names::XDP_STAGES,
        stage::IPV4_OPTIONS,
        program_names::XDP_IPV4_OPTIONS,
    ),
    (
        map_names::XDP_STAGES,
        stage::ENCAPSULATED,
        program_names::XDP_ENCAPSULATED,
    ),
];

/// Loads the stages and puts each in its hook's array, before any entry program can be
/// attached: an entry program whose stage is missing passes packets unjudged.
fn load_stages(ebpf: &mut Ebpf) -> Result<()> {
    for program in [
        program_names::TC_JUDGE,
        program_names::TC_L3,
        program_names::TC_IPV4_OPTIONS,
        program_names::TC_ENCAPSULATED,
    ] {
        program_mut::<SchedClassifier>(ebpf, program)?
            .load()
            .map_err(program_err(program))?;
    }
    for program in [
        program_names::XDP_JUDGE,
        program_names::XDP_L3,
        program_names::XDP_IPV4_OPTIONS,
        program_names::XDP_ENCAPSULATED,
    ] {
        program_mut::<Xdp>(ebpf, program)?
            .load()
            .map_err(program_err(program))?;
    }
    for (array, index, program) in STAGES {
        set_stage_program(ebpf, array, index, program)?;
    }
    Ok(())
}

/// Puts the loaded program `program` in the stage array `array`, at `index`.
pub(super) fn set_stage_program(
    ebpf: &mut Ebpf,
    array: &'static str,
    index: u32,
    program: &'static str,
) -> Result<()> {
    let fd = ebpf
        .program(program)
        .ok_or(DatapathError::MissingProgram(program))?
        .fd()
        .map_err(program_err(program))?
        .try_clone()
        .map_err(|source| DatapathError::Program {
            program,
            source: ProgramError::IOError(source),
        })?;
    set_stage(ebpf, array, index, &fd)
}

/// Puts `program` in the stage array `array`, at `index`.
pub(super) fn set_stage(
    ebpf: &mut Ebpf,
    array: &'static str,
    index: u32,
    program: &aya::programs::ProgramFd,
) -> Result<()> {
    let map = ebpf
        .map_mut(array)
        .ok_or(DatapathError::MissingMap(array))?;
    let mut stages = aya::maps::ProgramArray::try_from(map).map_err(map_err(array))?;
    stages.set(index, program, 0).map_err(map_err(array))
}

/// Takes the pin directory's lock: nothing pinned is opened while another agent holds
/// it. With `retire`, then moves the pinned datapath aside (see [`PinLayout::retire`]),
/// so that this load makes its maps anew.
fn lock_pins(layout: &PinLayout, retire: bool) -> Result<PinLock> {
    pins::ensure_bpffs(&layout.root)?;
    std::fs::create_dir_all(&layout.root).map_err(|source| DatapathError::PinDir {
        path: layout.root.clone(),
        source,
    })?;
    let lock = PinLock::acquire(&layout.root)?;
    let pinned = layout.maps_dir();
    if retire && pinned.exists() {
        let retired = layout.retire().map_err(|source| DatapathError::PinDir {
            path: pinned,
            source,
        })?;
        tracing::info!(
            retired = %retired.display(),
            "moved the outgrown datapath aside; it enforces until every link has moved to the new one"
        );
    }
    Ok(lock)
}

/// Creates the pin directories and tells the loader where each pinned map lives.
/// Pinned maps that exist are reused as they are: the policy in force, its counters
/// and queued events carry over to this agent.
fn pin_maps(loader: &mut EbpfLoader<'_>, layout: &PinLayout) -> Result<()> {
    let stages = layout.stages_dir(object_digest());
    for dir in [layout.maps_dir(), layout.links_dir(), stages.clone()] {
        std::fs::create_dir_all(&dir).map_err(|source| DatapathError::PinDir {
            path: dir.clone(),
            source,
        })?;
    }
    for m in maps::pinned(Pin::Maps) {
        loader.map_pin_path(m.name, layout.map(m.name));
    }
    for m in maps::pinned(Pin::Stages) {
        loader.map_pin_path(m.name, stages.join(m.name));
    }
    Ok(())
}

/// The object to load: the agent's, or with [`LoadOptions::bench`] the bench's.
fn object(opts: &LoadOptions) -> &'static [u8] {
    #[cfg(feature = "bench")]
    if opts.bench {
        // Stage arrays are pinned under the digest of the agent's object.
        assert!(
            opts.pin_dir.is_none(),
            "the bench's object is loaded only into a private datapath"
        );
        return super::EBPF_BENCH_OBJECT;
    }
    let _ = opts;
    EBPF_OBJECT
}

impl Datapath {
    /// Loads the object and both programs into the kernel, without attaching anything.
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        let pins = opts.pin_dir.as_ref().map(PinLayout::new);
        let pin_lock = match &pins {
            Some(layout) => Some(lock_pins(layout, opts.retire_pinned)?),
            None => None,
        };
        let sizes = Sizes::of(opts, pins.as_ref());
        let mut loader = sizes.loader();
        if let Some(layout) = &pins {
            pin_maps(&mut loader, layout)?;
        }
        let table_pins = TablePins::new(pins.as_ref())?;
        sizes.make_outer_maps(&mut loader, &table_pins)?;
        let mut ebpf = loader.load(object(opts))?;
        drop(table_pins);
        debug_assert!(
            ebpf.maps()
                .all(|(name, _)| name.starts_with('.') || maps::spec_of(name).is_some()),
            "every map of the object has a row in datapath::maps::MAPS"
        );
        let reused = pins
            .as_ref()
            .and_then(|layout| Reused::open(layout, object_digest()));
        if let Some(reused) = &reused {
            reuse::refill_stages(&mut ebpf, reused)?;
            tracing::info!(
                build = object_digest(),
                "adopted the programs an earlier agent of this build left loaded"
            );
        } else {
            program_mut::<SchedClassifier>(&mut ebpf, program_names::TC_EGRESS)?
                .load()
                .map_err(program_err(program_names::TC_EGRESS))?;
            program_mut::<Xdp>(&mut ebpf, program_names::XDP_GATEWAY)?
                .load()
                .map_err(program_err(program_names::XDP_GATEWAY))?;
            load_stages(&mut ebpf)?;
            if let Some(layout) = &pins {
                reuse::pin_programs(&mut ebpf, layout, object_digest())?;
            }
        }
        #[cfg(feature = "bench")]
        if opts.bench {
            for prog in super::BenchProgram::ALL {
                let name = prog.program_name();
                program_mut::<SchedClassifier>(&mut ebpf, name)?
                    .load()
                    .map_err(program_err(name))?;
            }
            let stage = program_names::BENCH_HANDOFF_STAGE;
            program_mut::<SchedClassifier>(&mut ebpf, stage)?
                .load()
                .map_err(program_err(stage))?;
            // The one place of the bench's array, where its entry program jumps.
            set_stage_program(&mut ebpf, map_names::BENCH_STAGES, 0, stage)?;
        }
        let (v4, v6) = sizes.open(&ebpf, pins.as_ref())?;
        let mut dp = Self {
            ebpf,
            reused,
            pins,
            v4,
            v6,
            slot_contents: [SlotContents::default(); 2],
            slot_switched: std::time::Instant::now(),
            _pin_lock: pin_lock,
            tc_kind: if crate::kernel::tcx_supported() {
                TcKind::Tcx
            } else {
                TcKind::Clsact
            },
        };
        if dp.pins.is_some() {
            dp.adopt_contents();
        }
        Ok(dp)
    }

    /// Learns the contents of adopted maps, which an earlier agent wrote.
    fn adopt_contents(&mut self) {
        for slot in 0..SLOTS {
            let mut c = SlotContents::default();
            c.set(map_names::V4_RANGES, self.v4.used(slot));
            c.set(map_names::V6_RANGES, self.v6.used(slot));
            for m in maps::MAPS
                .iter()
                .filter(|m| matches!(m.slots, Slots::Keyed { .. }))
            {
                let map = self.ebpf.map(m.name);
                let entries = match m.kind {
                    Kind::LpmV4 => count_lpm::<LpmDataV4>(map, slot),
                    Kind::LpmV6 => count_lpm::<LpmDataV6>(map, slot),
                    // Cgroups are counted as the policy is applied.
                    _ => continue,
                };
                c.set(m.name, entries);
            }
            self.slot_contents[slot as usize] = c;
        }
    }

    /// The range tables' index bits, IPv4 and IPv6 (adopted maps decide, not the
    /// options).
    pub fn index_bits(&self) -> (u32, u32) {
        (self.v4.index_bits(), self.v6.index_bits())
    }

    pub fn pins(&self) -> Option<&PinLayout> {
        self.pins.as_ref()
    }

    pub(super) fn map(&self, name: &'static str) -> Result<&Map> {
        self.ebpf.map(name).ok_or(DatapathError::MissingMap(name))
    }

    pub(super) fn map_mut(&mut self, name: &'static str) -> Result<&mut Map> {
        self.ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap(name))
    }
}

/// Entries of one slot in an LPM map (every value is a `u32`); 0 when the map is missing.
fn count_lpm<K>(map: Option<&Map>, slot: u32) -> usize
where
    K: aya::Pod + AsRef<[u8]>,
{
    let Some(map) = map else { return 0 };
    let Ok(trie) = aya::maps::LpmTrie::<&MapData, K, u32>::try_from(map) else {
        return 0;
    };
    let slot_bytes = slot.to_be_bytes();
    trie.keys()
        .filter_map(std::result::Result::ok)
        .filter(|k| k.data().as_ref()[..4] == slot_bytes)
        .count()
}
