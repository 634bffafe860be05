//! Loading the object: sizing its maps (or learning the sizes of adopted ones), pinning
//! them, loading the programs and putting the judge stages in their arrays.

#![forbid(unsafe_code)]

use std::os::fd::AsFd as _;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData},
    programs::{ProgramError, SchedClassifier, Xdp},
};
use datafence_common::{
    DIR8_LANES, DIR24_ENTRIES, DIR24_LANES, LpmDataV4, LpmDataV6, MAX_DIR8_GROUPS, MAX_V6_ENTRIES,
    SLOTS, globals, map_names, program_names, stage,
    v6::{V6_LOAD_DIVISOR, V6Entry},
};

use super::{
    Datapath, DatapathError, EBPF_OBJECT, LoadOptions, PinLayout, Result, TcKind, V4Table, map_err,
    maps::{self, Kind, Pin, SlotContents, Slots},
    object_digest,
    pin_lock::PinLock,
    pins, program_err, program_mut,
    reuse::{self, Reused},
    sys,
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

/// Array values that hold `entries` table entries, `per_value` to a value (at least one).
fn values(entries: u32, per_value: usize) -> u32 {
    entries.div_ceil(per_value as u32).max(1)
}

/// The sizes of the region tables: from the options, or from maps an earlier agent
/// pinned (adopted maps keep the sizes and layout they were made with; the programs
/// must be told the same).
struct Sizes {
    v4_table: V4Table,
    /// The `V4_DIR24` global: 1 when the DIR-24-8 table serves IPv4.
    v4_dir24: u8,
    dir8_groups: u32,
    v6_bits: u32,
    /// DIR24 and DIR8 entries, all slots.
    top_entries: u32,
    group_entries: u32,
}

impl Sizes {
    fn of(opts: &LoadOptions, pins: Option<&PinLayout>) -> Self {
        let adopted = |name: &str| {
            pins.and_then(|p| aya::maps::MapInfo::from_pin(p.map(name)).ok())
                .map(|i| i.max_entries())
        };
        let v4_table = match adopted(map_names::DIR24) {
            Some(1) => V4Table::Trie,
            Some(_) => V4Table::Dir24,
            None => opts.v4_table,
        };
        let dir8_groups = match adopted(map_names::DIR8) {
            Some(n) if v4_table == V4Table::Dir24 => n * DIR8_LANES as u32 / (SLOTS * 256),
            _ => opts.dir8_groups.min(MAX_DIR8_GROUPS),
        };
        let v6_bits = match adopted(map_names::REGIONS_V6) {
            Some(n) => (n / SLOTS).trailing_zeros(),
            None => (opts.v6_entries.clamp(8, MAX_V6_ENTRIES) * V6_LOAD_DIVISOR)
                .next_power_of_two()
                .trailing_zeros(),
        };
        let (top_entries, group_entries) = match v4_table {
            V4Table::Dir24 => (SLOTS * DIR24_ENTRIES, SLOTS * dir8_groups * 256),
            // The trie serves IPv4; the arrays shrink to nothing.
            V4Table::Trie => (1, 1),
        };
        Self {
            v4_table,
            v4_dir24: u8::from(v4_table == V4Table::Dir24),
            dir8_groups,
            v6_bits,
            top_entries,
            group_entries,
        }
    }

    /// A loader with the maps sized and the load-time globals set.
    fn loader(&self, opts: &LoadOptions) -> EbpfLoader<'_> {
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(
                map_names::REGIONS_V4,
                SLOTS.saturating_mul(opts.table_capacity),
            )
            .map_max_entries(map_names::REGIONS_V6, SLOTS << self.v6_bits)
            .map_max_entries(map_names::DIR24, values(self.top_entries, DIR24_LANES))
            .map_max_entries(map_names::DIR8, values(self.group_entries, DIR8_LANES))
            .override_global(globals::V4_DIR24, &self.v4_dir24, true)
            .override_global(globals::DIR8_GROUPS, &self.dir8_groups, true)
            .override_global(globals::V6_TABLE_BITS, &self.v6_bits, true);
        loader
    }
}

/// Creates the pin directories and tells the loader where each pinned map lives.
/// Pinned maps that exist are reused as they are: the policy in force, its counters
/// and queued events carry over to this agent.
/// Takes the pin directory's lock first: nothing pinned is opened while another agent
/// holds it.
fn pin_maps(loader: &mut EbpfLoader<'_>, layout: &PinLayout) -> Result<PinLock> {
    pins::ensure_bpffs(&layout.root)?;
    std::fs::create_dir_all(&layout.root).map_err(|source| DatapathError::PinDir {
        path: layout.root.clone(),
        source,
    })?;
    let lock = PinLock::acquire(&layout.root)?;
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
    Ok(lock)
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

/// Maps an array of the object into memory.
fn mapped<T: Copy>(ebpf: &Ebpf, name: &'static str, entries: u32) -> Result<sys::MappedArray<T>> {
    match ebpf.map(name) {
        Some(Map::Array(data)) => sys::MappedArray::map(&data.fd().as_fd(), entries as usize)
            .map_err(|source| DatapathError::Mmap { map: name, source }),
        _ => Err(DatapathError::MissingMap(name)),
    }
}

impl Datapath {
    /// Loads the object and both programs into the kernel, without attaching anything.
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        let pins = opts.pin_dir.as_ref().map(PinLayout::new);
        let sizes = Sizes::of(opts, pins.as_ref());
        let mut loader = sizes.loader(opts);
        let pin_lock = match &pins {
            Some(layout) => Some(pin_maps(&mut loader, layout)?),
            None => None,
        };
        let mut ebpf = loader.load(object(opts))?;
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
        let v6_table = mapped::<V6Entry>(&ebpf, map_names::REGIONS_V6, SLOTS << sizes.v6_bits)?;
        let dir24 = match sizes.v4_table {
            V4Table::Dir24 => Some((
                mapped::<u32>(&ebpf, map_names::DIR24, sizes.top_entries)?,
                mapped::<u8>(&ebpf, map_names::DIR8, sizes.group_entries)?,
            )),
            V4Table::Trie => None,
        };
        let mut dp = Self {
            ebpf,
            reused,
            table_capacity: opts.table_capacity,
            pins,
            v4_table: sizes.v4_table,
            dir24,
            dir8_groups: sizes.dir8_groups,
            v6_bits: sizes.v6_bits,
            v6_table,
            slot_contents: [SlotContents::default(); 2],
            _pin_lock: pin_lock,
            tc_kind: if crate::kernel::tcx_supported() {
                TcKind::Tcx
            } else {
                TcKind::Clsact
            },
        };
        if dp.pins.is_some() {
            dp.adopt_sizes()?;
        }
        Ok(dp)
    }

    /// Learns the real size and contents of adopted maps, which an earlier agent may have
    /// created with another table capacity.
    fn adopt_sizes(&mut self) -> Result<()> {
        let name = map_names::REGIONS_V4;
        let max = match self.map(name)? {
            Map::LpmTrie(data) => data.info().map_err(map_err(name))?.max_entries(),
            _ => return Err(DatapathError::MissingMap(name)),
        };
        self.table_capacity = max / SLOTS;
        for slot in 0..SLOTS {
            let v6_used = self.v6_slot(slot).iter().filter(|e| e[2] != 0).count();
            let mut c = SlotContents::default();
            c.set(map_names::REGIONS_V6, v6_used);
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
        Ok(())
    }

    /// How IPv4 regions are looked up (adopted maps decide, not the options).
    pub fn v4_table(&self) -> V4Table {
        self.v4_table
    }

    pub fn pins(&self) -> Option<&PinLayout> {
        self.pins.as_ref()
    }

    pub fn table_capacity(&self) -> u32 {
        self.table_capacity
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
