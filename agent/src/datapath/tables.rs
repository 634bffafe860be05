//! The region tables' maps before the object is loaded: their sizes (from the options,
//! or from the tables an earlier agent pinned), and their arrays of maps, which the agent
//! makes itself with a template of the policy's size (aya would make the template from
//! the object, at the size written there), pins, and gives the loader to adopt.

#![forbid(unsafe_code)]

use std::{
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, MapData},
};
use datafence_common::{
    MAX_V4_SLOT_RANGES, MAX_V6_SLOT_RANGES, SLOTS, globals, map_names,
    v4::{V4_LANES, V4_MAX_INDEX_BITS, V4_MIN_INDEX_BITS},
    v6::{V6_MAX_INDEX_BITS, V6_MIN_INDEX_BITS, V6_NODE_ENTRIES, V6Range},
};

use super::{
    DatapathError, LoadOptions, PinLayout, Result, pins,
    range_arrays::{self, Family, RangeArrays, SlotShape},
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

/// The sizes of one slot of a range table: from the options, or from the tables an
/// earlier agent pinned (adopted maps keep the sizes and layout they were made with; the
/// programs must be told the same).
#[derive(Clone, Copy)]
pub(super) struct TableSize {
    index_bits: u32,
    slot_ranges: u32,
}

/// What sizes one family's table: its maps and global, and the bounds.
pub(super) struct TableSpec {
    family: Family,
    index_map: &'static str,
    ranges_map: &'static str,
    index_bits_global: &'static str,
    /// Range entries per array value.
    ranges_per_value: u32,
    /// Range entries per search node: a chunk takes at least one node, and a slot starts
    /// on a node, so a node stays in one cache line.
    node_entries: u32,
    min_bits: u32,
    max_bits: u32,
    /// Bytes of one range entry.
    entry_bytes: u32,
}

pub(super) const V4_SPEC: TableSpec = TableSpec {
    family: V4_FAMILY,
    index_map: map_names::V4_INDEX,
    ranges_map: map_names::V4_RANGES,
    index_bits_global: globals::V4_INDEX_BITS,
    ranges_per_value: V4_LANES as u32,
    node_entries: 1,
    min_bits: V4_MIN_INDEX_BITS,
    max_bits: V4_MAX_INDEX_BITS,
    entry_bytes: size_of::<u32>() as u32,
};

pub(super) const V6_SPEC: TableSpec = TableSpec {
    family: V6_FAMILY,
    index_map: map_names::V6_INDEX,
    ranges_map: map_names::V6_RANGES,
    index_bits_global: globals::V6_INDEX_BITS,
    ranges_per_value: V6_NODE_ENTRIES,
    node_entries: V6_NODE_ENTRIES,
    min_bits: V6_MIN_INDEX_BITS,
    max_bits: V6_MAX_INDEX_BITS,
    entry_bytes: size_of::<V6Range>() as u32,
};

impl TableSpec {
    /// The size of the table pinned in `layout`, read from the arrays pinned for one of
    /// its slots; none if no slot's are (no policy was written into it).
    fn adopted(&self, layout: &PinLayout) -> Option<TableSize> {
        let (index_values, range_values) = range_arrays::pinned_slot_values(
            &layout.maps_dir(),
            [self.index_map, self.ranges_map],
        )?;
        let shape = SlotShape::of_arrays(
            index_values,
            range_values,
            self.ranges_per_value,
            self.entry_bytes,
        );
        Some(TableSize {
            index_bits: shape.index_bits,
            slot_ranges: shape.slot_ranges,
        })
    }

    fn size(&self, bits: u32, ranges: u32, pins: Option<&PinLayout>) -> TableSize {
        if let Some(size) = pins.and_then(|p| self.adopted(p)) {
            return size;
        }
        let index_bits = bits.clamp(self.min_bits, self.max_bits);
        TableSize {
            index_bits,
            slot_ranges: ranges
                .clamp(self.node_entries << index_bits, self.family.max_ranges)
                .next_multiple_of(self.ranges_per_value)
                .next_multiple_of(self.node_entries),
        }
    }

    fn shape(&self, size: TableSize) -> SlotShape {
        SlotShape {
            index_bits: size.index_bits,
            slot_ranges: size.slot_ranges,
            ranges_per_value: self.ranges_per_value,
            range_bytes: self.entry_bytes,
        }
    }

    /// Makes and pins the table's arrays of maps, with templates of `size`, unless the
    /// pinned ones hold a policy (`adopted`): those the loader adopts as they are. Pinned
    /// ones that hold none (an agent stopped before its first policy, or between pinning
    /// the two) go: their size is not known, and no program enforces through them.
    fn make_outer_maps(&self, size: TableSize, pins: &TablePins) -> Result<()> {
        if let TablePins::Pinned(layout) = pins
            && self.adopted(layout).is_some()
        {
            return Ok(());
        }
        let shape = self.shape(size);
        for (name, array) in [
            (self.index_map, shape.index_array()),
            (self.ranges_map, shape.ranges_array()),
        ] {
            let path = pins.path(name);
            let mut stale = vec![path.clone()];
            if let TablePins::Pinned(layout) = pins {
                stale.extend(
                    (0..SLOTS).map(|s| range_arrays::slot_pin(&layout.maps_dir(), name, s)),
                );
            }
            for path in stale {
                range_arrays::unpin(&path)
                    .map_err(|source| DatapathError::PinDir { path, source })?;
            }
            let err = |source| DatapathError::TableArray { map: name, source };
            let template = range_arrays::create_array(name, array).map_err(err)?;
            let outer =
                sys::create_array_of_maps(name, SLOTS, template.fd().as_fd()).map_err(err)?;
            MapData::from_fd(outer)
                .map_err(|e| err(std::io::Error::other(e)))?
                .pin(&path)
                .map_err(|source| DatapathError::Pin {
                    path: path.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    /// The table as the loaded object holds it, with the slots' arrays an earlier agent
    /// left mapped.
    fn open<E: Copy>(
        &self,
        ebpf: &Ebpf,
        size: TableSize,
        pins: Option<&PinLayout>,
    ) -> Result<RangeArrays<E>> {
        let outer = |name: &'static str| -> Result<MapData> {
            let Some(Map::ArrayOfMaps(data)) = ebpf.map(name) else {
                return Err(DatapathError::MissingMap(name));
            };
            let fd = data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| DatapathError::TableArray { map: name, source })?;
            MapData::from_fd(fd).map_err(|e| DatapathError::TableArray {
                map: name,
                source: std::io::Error::other(e),
            })
        };
        let mut table = RangeArrays::new(
            self.family,
            self.shape(size),
            [self.index_map, self.ranges_map],
            [outer(self.index_map)?, outer(self.ranges_map)?],
            pins.map(PinLayout::maps_dir),
        );
        table.adopt()?;
        Ok(table)
    }

    /// Kernel memory of one slot's arrays.
    fn bytes(&self, size: TableSize) -> u64 {
        let index = (crate::rangetable::index_entries(size.index_bits) * size_of::<u32>()) as u64;
        index + u64::from(size.slot_ranges) * u64::from(self.entry_bytes)
    }

    /// How the table pinned in `layout` misfits a policy that needs `entries(bits)` range
    /// entries with `bits` index bits, and for which the agent would make `wanted`.
    fn misfit(
        &self,
        layout: &PinLayout,
        wanted: TableSize,
        entries: impl Fn(u32) -> usize,
    ) -> Option<Misfit> {
        let family = self.family.name;
        let size = self.adopted(layout)?;
        let needed = entries(size.index_bits);
        if needed > size.slot_ranges as usize {
            return Some(Misfit::Outgrown {
                family,
                needed,
                room: size.slot_ranges,
            });
        }
        let (pinned_bytes, wanted_bytes) = (self.bytes(size), self.bytes(wanted));
        (pinned_bytes > 4 * wanted_bytes && pinned_bytes - wanted_bytes >= 1 << 20).then_some(
            Misfit::Oversized {
                family,
                pinned_bytes,
                wanted_bytes,
            },
        )
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

/// How the region tables pinned under `pin_dir` misfit `tables`, the first family
/// that does; `None` when both suit it or nothing is pinned. Pinned maps keep their
/// size, so such a policy gets new ones ([`LoadOptions::retire_pinned`]).
pub fn pinned_tables_misfit(pin_dir: &Path, tables: &super::RegionTables) -> Option<Misfit> {
    let layout = PinLayout::new(pin_dir);
    let wanted = Sizes::of(&LoadOptions::sized_for(tables), None);
    V4_SPEC
        .misfit(&layout, wanted.v4, |bits| tables.v4.entries(bits))
        .or_else(|| V6_SPEC.misfit(&layout, wanted.v6, |bits| tables.v6.entries(bits)))
}

/// The sizes of both region tables.
pub(super) struct Sizes {
    pub v4: TableSize,
    pub v6: TableSize,
}

impl Sizes {
    pub fn of(opts: &LoadOptions, pins: Option<&PinLayout>) -> Self {
        Self {
            v4: V4_SPEC.size(opts.v4_index_bits, opts.v4_slot_ranges, pins),
            v6: V6_SPEC.size(opts.v6_index_bits, opts.v6_slot_ranges, pins),
        }
    }

    /// A loader with the load-time globals set.
    pub fn loader(&self) -> EbpfLoader<'_> {
        let mut loader = EbpfLoader::new();
        loader
            .override_global(V4_SPEC.index_bits_global, &self.v4.index_bits, true)
            .override_global(V6_SPEC.index_bits_global, &self.v6.index_bits, true);
        loader
    }

    /// Makes the tables' arrays of maps where `pins` has none, and tells the loader to
    /// adopt them from there.
    pub fn make_outer_maps(&self, loader: &mut EbpfLoader<'_>, pins: &TablePins) -> Result<()> {
        V4_SPEC.make_outer_maps(self.v4, pins)?;
        V6_SPEC.make_outer_maps(self.v6, pins)?;
        for name in [
            V4_SPEC.index_map,
            V4_SPEC.ranges_map,
            V6_SPEC.index_map,
            V6_SPEC.ranges_map,
        ] {
            loader.map_pin_path(name, pins.path(name));
        }
        Ok(())
    }

    /// Both tables of the loaded object, with the slots' arrays pinned in `pins`.
    pub fn open(
        &self,
        ebpf: &Ebpf,
        pins: Option<&PinLayout>,
    ) -> Result<(RangeArrays<u32>, RangeArrays<V6Range>)> {
        Ok((
            V4_SPEC.open(ebpf, self.v4, pins)?,
            V6_SPEC.open(ebpf, self.v6, pins)?,
        ))
    }
}

/// Where the tables' arrays of maps are pinned for the loader to adopt: with the other
/// pinned maps, or, for a private datapath, in a directory of this load's own that goes
/// once the object is loaded (the loaded object holds them from then on).
pub(super) enum TablePins {
    Pinned(PinLayout),
    Private(PathBuf),
}

impl TablePins {
    pub fn new(pins: Option<&PinLayout>) -> Result<Self> {
        static LOADS: AtomicU32 = AtomicU32::new(0);
        if let Some(layout) = pins {
            return Ok(Self::Pinned(layout.clone()));
        }
        let dir = Path::new(pins::BPFFS).join(format!(
            "{PRIVATE_PREFIX}{}-{}",
            std::process::id(),
            LOADS.fetch_add(1, Ordering::Relaxed)
        ));
        pins::ensure_bpffs(&dir)?;
        remove_private_pins_of_dead_processes();
        std::fs::create_dir_all(&dir).map_err(|source| DatapathError::PinDir {
            path: dir.clone(),
            source,
        })?;
        Ok(Self::Private(dir))
    }

    fn path(&self, name: &str) -> PathBuf {
        match self {
            Self::Pinned(layout) => layout.map(name),
            Self::Private(dir) => dir.join(name),
        }
    }
}

/// The name of a private load's pin directory in bpffs, before `<pid>-<load>`.
const PRIVATE_PREFIX: &str = "datafence-private-";

/// Removes what a process that died while loading a private datapath left pinned.
fn remove_private_pins_of_dead_processes() {
    let Ok(entries) = std::fs::read_dir(pins::BPFFS) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PRIVATE_PREFIX))
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl Drop for TablePins {
    fn drop(&mut self) {
        if let Self::Private(dir) = self {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
