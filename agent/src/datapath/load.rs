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
    LpmDataV4, LpmDataV6, MAX_V4_SLOT_RANGES, MAX_V6_SLOT_RANGES, SLOTS, globals, map_names,
    program_names, stage,
    v4::{V4_LANES, V4_MAX_INDEX_BITS, V4_MIN_INDEX_BITS},
    v6::{V6_MAX_INDEX_BITS, V6_MIN_INDEX_BITS, V6_NODE_ENTRIES, V6Range},
};

use super::{
    Datapath, DatapathError, EBPF_OBJECT, LoadOptions, PinLayout, Result, TcKind, map_err,
    maps::{self, Kind, Pin, SlotContents, Slots},
    object_digest,
    pin_lock::PinLock,
    pins, program_err, program_mut,
    range_arrays::{Family, RangeArrays},
    reuse::{self, Reused},
    sys,
};

/// The IPv4 and IPv6 range tables, as named in messages.
const V4_FAMILY: Family = Family {
    name: "IPv4",
    max_ranges: MAX_V4_SLOT_RANGES,
};
const V6_FAMILY: Family = Family {
    name: "IPv6",
    max_ranges: MAX_V6_SLOT_RANGES,
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

/// The sizes of one range table: from the options, or from maps an earlier agent pinned
/// (adopted maps keep the sizes and layout they were made with; the programs must be
/// told the same).
#[derive(Clone, Copy)]
struct TableSize {
    index_bits: u32,
    slot_ranges: u32,
}

/// What sizes one family's table: its maps and globals, and the bounds.
struct TableSpec {
    index_map: &'static str,
    ranges_map: &'static str,
    index_bits_global: &'static str,
    slot_ranges_global: &'static str,
    /// Range entries per array value.
    ranges_per_value: u32,
    /// Range entries per search node: a chunk takes at least one node, and a slot starts
    /// on a node, so a node stays in one cache line.
    node_entries: u32,
    min_bits: u32,
    max_bits: u32,
    max_ranges: u32,
    /// Bytes of one range entry.
    entry_bytes: u32,
}

const V4_SPEC: TableSpec = TableSpec {
    index_map: map_names::V4_INDEX,
    ranges_map: map_names::V4_RANGES,
    index_bits_global: globals::V4_INDEX_BITS,
    slot_ranges_global: globals::V4_SLOT_RANGES,
    ranges_per_value: V4_LANES as u32,
    node_entries: 1,
    min_bits: V4_MIN_INDEX_BITS,
    max_bits: V4_MAX_INDEX_BITS,
    max_ranges: MAX_V4_SLOT_RANGES,
    entry_bytes: size_of::<u32>() as u32,
};

const V6_SPEC: TableSpec = TableSpec {
    index_map: map_names::V6_INDEX,
    ranges_map: map_names::V6_RANGES,
    index_bits_global: globals::V6_INDEX_BITS,
    slot_ranges_global: globals::V6_SLOT_RANGES,
    ranges_per_value: V6_NODE_ENTRIES,
    node_entries: V6_NODE_ENTRIES,
    min_bits: V6_MIN_INDEX_BITS,
    max_bits: V6_MAX_INDEX_BITS,
    max_ranges: MAX_V6_SLOT_RANGES,
    entry_bytes: size_of::<V6Range>() as u32,
};

impl TableSpec {
    fn size(&self, bits: u32, ranges: u32, pins: Option<&PinLayout>) -> TableSize {
        let adopted = |name: &str| {
            pins.and_then(|p| aya::maps::MapInfo::from_pin(p.map(name)).ok())
                .map(|i| i.max_entries())
        };
        let lanes = V4_LANES as u32;
        let index_bits = match adopted(self.index_map) {
            // The largest index whose slots fit: SLOTS × (2^bits + 1) entries.
            Some(values) => ((values * lanes / SLOTS).saturating_sub(1).max(1)).ilog2(),
            None => bits,
        }
        .clamp(self.min_bits, self.max_bits);
        let slot_ranges = match adopted(self.ranges_map) {
            Some(values) => values * self.ranges_per_value / SLOTS,
            None => ranges
                .clamp(self.node_entries << index_bits, self.max_ranges)
                .next_multiple_of(self.ranges_per_value)
                .next_multiple_of(self.node_entries),
        };
        TableSize {
            index_bits,
            slot_ranges,
        }
    }

    /// Sizes the maps and sets the globals for `size`.
    fn configure(&self, loader: &mut EbpfLoader<'_>, size: TableSize) {
        loader
            .map_max_entries(
                self.index_map,
                values(size.index_entries(), V4_LANES as u32),
            )
            .map_max_entries(
                self.ranges_map,
                values(SLOTS * size.slot_ranges, self.ranges_per_value),
            );
    }

    /// Maps the table's arrays into memory.
    fn map<E: Copy>(&self, ebpf: &Ebpf, family: Family, size: TableSize) -> Result<RangeArrays<E>> {
        Ok(RangeArrays::new(
            family,
            size.index_bits,
            size.slot_ranges,
            mapped::<u32>(ebpf, self.index_map, size.index_entries())?,
            mapped::<E>(ebpf, self.ranges_map, SLOTS * size.slot_ranges)?,
        ))
    }
}

impl TableSize {
    /// Index entries of all slots.
    fn index_entries(self) -> u32 {
        SLOTS * ((1 << self.index_bits) + 1)
    }
}

/// Why the region tables pinned now do not suit a policy, in one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misfit {
    /// The policy needs more range entries than the pinned table has per slot (with the
    /// pinned table's index).
    Outgrown {
        family: &'static str,
        needed: usize,
        room: u32,
    },
    /// The pinned table takes more than four times the kernel memory, and at least
    /// 1 MiB more, than the one the agent would make for the policy: what is left of
    /// a policy that shrank.
    Oversized {
        family: &'static str,
        pinned_bytes: u64,
        wanted_bytes: u64,
    },
}

impl TableSpec {
    /// Kernel memory of the table's arrays, both slots.
    fn bytes(&self, size: TableSize) -> u64 {
        let index = u64::from(size.index_entries()) * size_of::<u32>() as u64;
        let ranges = u64::from(SLOTS) * u64::from(size.slot_ranges) * u64::from(self.entry_bytes);
        index + ranges
    }

    /// How the table pinned in `layout` misfits a policy that needs `entries(bits)` range
    /// entries with `bits` index bits, and for which the agent would make `wanted`.
    fn misfit(
        &self,
        family: Family,
        layout: &PinLayout,
        wanted: TableSize,
        entries: impl Fn(u32) -> usize,
    ) -> Option<Misfit> {
        let pinned = [self.index_map, self.ranges_map]
            .iter()
            .all(|name| aya::maps::MapInfo::from_pin(layout.map(name)).is_ok());
        if !pinned {
            return None;
        }
        let size = self.size(self.min_bits, 0, Some(layout));
        let needed = entries(size.index_bits);
        if needed > size.slot_ranges as usize {
            return Some(Misfit::Outgrown {
                family: family.name,
                needed,
                room: size.slot_ranges,
            });
        }
        let (pinned_bytes, wanted_bytes) = (self.bytes(size), self.bytes(wanted));
        (pinned_bytes > 4 * wanted_bytes && pinned_bytes - wanted_bytes >= 1 << 20).then_some(
            Misfit::Oversized {
                family: family.name,
                pinned_bytes,
                wanted_bytes,
            },
        )
    }
}

/// How the region tables pinned under `pin_dir` misfit `tables`, the first family
/// that does; `None` when both suit it or nothing is pinned. Pinned maps keep their
/// size, so such a policy gets new ones ([`LoadOptions::retire_pinned`]).
pub fn pinned_tables_misfit(
    pin_dir: &std::path::Path,
    tables: &super::RegionTables,
) -> Option<Misfit> {
    let layout = PinLayout::new(pin_dir);
    let wanted = LoadOptions::sized_for(tables);
    let wanted = Sizes::of(&wanted, None);
    V4_SPEC
        .misfit(V4_FAMILY, &layout, wanted.v4, |bits| {
            tables.v4.entries(bits)
        })
        .or_else(|| {
            V6_SPEC.misfit(V6_FAMILY, &layout, wanted.v6, |bits| {
                tables.v6.entries(bits)
            })
        })
}

/// Array values that hold `entries` table entries, `per_value` to a value (at least one).
fn values(entries: u32, per_value: u32) -> u32 {
    entries.div_ceil(per_value).max(1)
}

/// The sizes of both region tables.
struct Sizes {
    v4: TableSize,
    v6: TableSize,
}

impl Sizes {
    fn of(opts: &LoadOptions, pins: Option<&PinLayout>) -> Self {
        Self {
            v4: V4_SPEC.size(opts.v4_index_bits, opts.v4_slot_ranges, pins),
            v6: V6_SPEC.size(opts.v6_index_bits, opts.v6_slot_ranges, pins),
        }
    }

    /// A loader with the maps sized and the load-time globals set.
    fn loader(&self) -> EbpfLoader<'_> {
        let mut loader = EbpfLoader::new();
        V4_SPEC.configure(&mut loader, self.v4);
        V6_SPEC.configure(&mut loader, self.v6);
        loader
            .override_global(V4_SPEC.index_bits_global, &self.v4.index_bits, true)
            .override_global(V4_SPEC.slot_ranges_global, &self.v4.slot_ranges, true)
            .override_global(V6_SPEC.index_bits_global, &self.v6.index_bits, true)
            .override_global(V6_SPEC.slot_ranges_global, &self.v6.slot_ranges, true);
        loader
    }
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
        let pin_lock = match &pins {
            Some(layout) => Some(lock_pins(layout, opts.retire_pinned)?),
            None => None,
        };
        let sizes = Sizes::of(opts, pins.as_ref());
        let mut loader = sizes.loader();
        if let Some(layout) = &pins {
            pin_maps(&mut loader, layout)?;
        }
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
        let v4 = V4_SPEC.map::<u32>(&ebpf, V4_FAMILY, sizes.v4)?;
        let v6 = V6_SPEC.map::<V6Range>(&ebpf, V6_FAMILY, sizes.v6)?;
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
        (self.v4.index_bits, self.v6.index_bits)
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
