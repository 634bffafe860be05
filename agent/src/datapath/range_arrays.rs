//! One family's range table in the datapath: per slot, an index array and a range array
//! that the agent makes for the policy it writes there, fills through memory maps, puts
//! in the slot's place of the table's arrays of maps, and frees when the slot is retired.
//! Between reloads the kernel holds one policy's tables, not two.
//!
//! A pinned datapath pins each slot's arrays too (`<MAP>_slot<N>` beside the maps), and
//! a restarted agent opens them from there: opening a map by the id a lookup in an array
//! of maps gives needs CAP_SYS_ADMIN, which the agent's unit does not grant.

#![forbid(unsafe_code)]

use std::{
    os::fd::{AsFd as _, BorrowedFd},
    path::{Path, PathBuf},
};

use aya::maps::{MapData, MapInfo};
use aya_obj::generated::{BPF_F_MMAPABLE, bpf_map_type::BPF_MAP_TYPE_ARRAY};
use datafence_common::{SLOTS, v4::V4_LANES};

use super::{DatapathError, sys, sys::MappedArray};
use crate::rangetable::{self, Address, Boundaries};

/// What makes a family's table: its name in messages and the most range entries a slot
/// may have.
#[derive(Clone, Copy, Debug)]
pub(super) struct Family {
    pub name: &'static str,
    pub max_ranges: u32,
}

impl Family {
    /// The error for a table that needs `needed` entries and has room for `capacity`:
    /// a restart makes room up to the family's limit, and nothing past it.
    fn full(&self, needed: usize, capacity: usize) -> DatapathError {
        if needed > self.max_ranges as usize {
            return DatapathError::RangesBeyondLimit {
                family: self.name,
                needed,
                max: self.max_ranges,
            };
        }
        DatapathError::RangesFull {
            family: self.name,
            needed,
            capacity,
            max: self.max_ranges,
        }
    }
}

/// The shape of one slot's arrays: the kernel takes as a slot's array only one of the
/// size its table's template has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SlotShape {
    pub index_bits: u32,
    /// Range entries a slot holds.
    pub slot_ranges: u32,
    /// Range entries per array value (IPv4's two-range lanes, IPv6's four-range nodes).
    pub ranges_per_value: u32,
    /// Bytes of one range entry.
    pub range_bytes: u32,
}

impl SlotShape {
    /// Index entries of a slot.
    pub fn index_entries(self) -> usize {
        rangetable::index_entries(self.index_bits)
    }

    /// (values, value bytes) of a slot's index array: lanes of two u32.
    pub fn index_array(self) -> (u32, u32) {
        let lanes = V4_LANES as u32;
        (
            (self.index_entries() as u32).div_ceil(lanes).max(1),
            lanes * size_of::<u32>() as u32,
        )
    }

    /// (values, value bytes) of a slot's range array.
    pub fn ranges_array(self) -> (u32, u32) {
        (
            self.slot_ranges.div_ceil(self.ranges_per_value).max(1),
            self.ranges_per_value * self.range_bytes,
        )
    }

    /// The index bits and range entries of a slot whose arrays have `index_values` and
    /// `range_values` values: the shape of a table an earlier agent made.
    pub fn of_arrays(
        index_values: u32,
        range_values: u32,
        ranges_per_value: u32,
        range_bytes: u32,
    ) -> Self {
        let lanes = V4_LANES as u32;
        // The largest index whose 2^bits + 1 entries fit.
        let index_bits = (index_values * lanes).saturating_sub(1).max(1).ilog2();
        Self {
            index_bits,
            slot_ranges: range_values * ranges_per_value,
            ranges_per_value,
            range_bytes,
        }
    }
}

/// A new array of the range tables' kind: mappable, so the agent fills it with writes.
pub(super) fn create_array(
    name: &str,
    (values, value_bytes): (u32, u32),
) -> std::io::Result<MapData> {
    let def = aya_obj::Map::new_from_params(
        BPF_MAP_TYPE_ARRAY as u32,
        size_of::<u32>() as u32,
        value_bytes,
        values,
        BPF_F_MMAPABLE,
    );
    MapData::create(def, name, None).map_err(std::io::Error::other)
}

/// One slot's arrays, mapped into memory.
struct SlotArrays<E> {
    index_map: MapData,
    ranges_map: MapData,
    index: MappedArray<u32>,
    ranges: MappedArray<E>,
}

/// Where slot `slot`'s array of the table map `name` is pinned in `maps_dir` (bpffs
/// refuses dots in names).
pub(super) fn slot_pin(maps_dir: &Path, name: &str, slot: u32) -> PathBuf {
    maps_dir.join(format!("{name}_slot{slot}"))
}

/// The values of the index and range arrays pinned for a slot of the table whose maps
/// are `names`, if a slot has both: the size of a table an earlier agent made.
pub(super) fn pinned_slot_values(maps_dir: &Path, names: [&str; 2]) -> Option<(u32, u32)> {
    (0..SLOTS).find_map(|slot| {
        let values =
            |name| MapInfo::from_pin(slot_pin(maps_dir, name, slot)).map(|i| i.max_entries());
        Some((values(names[0]).ok()?, values(names[1]).ok()?))
    })
}

/// Removes a pin; one that is not there is no error.
pub(super) fn unpin(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// One write into a table's array of maps: a slot's array in its place, or the place
/// emptied.
pub(super) struct SlotWrite<'a> {
    map: &'static str,
    outer: BorrowedFd<'a>,
    slot: u32,
    inner: Option<BorrowedFd<'a>>,
}

impl SlotWrite<'_> {
    fn run(&self) -> Result<(), DatapathError> {
        match self.inner {
            Some(inner) => sys::set_inner_map(self.outer, self.slot, inner),
            None => sys::clear_inner_map(self.outer, self.slot),
        }
        .map_err(|source| DatapathError::TableArray {
            map: self.map,
            source,
        })
    }
}

/// Runs writes into arrays of maps at once, each on its own thread. The kernel holds
/// every such write until an RCU grace period has passed (8-20 ms here), so that no
/// program still reads what it replaced, and waits that overlap end together: a reload
/// waits about one grace period, not one per write. Returns the first error.
pub(super) fn write_at_once(writes: &[SlotWrite<'_>]) -> Result<(), DatapathError> {
    let Some((first, rest)) = writes.split_first() else {
        return Ok(());
    };
    std::thread::scope(|scope| {
        let others: Vec<_> = rest.iter().map(|w| scope.spawn(|| w.run())).collect();
        others.into_iter().fold(first.run(), |result, other| {
            let other = other
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            result.and(other)
        })
    })
}

pub(super) struct RangeArrays<E> {
    pub family: Family,
    pub shape: SlotShape,
    /// The table's arrays of maps, as the programs read them: slot → the slot's index
    /// array, and its range array.
    index_outer: MapData,
    ranges_outer: MapData,
    /// Their names, for messages and the maps' own names.
    names: [&'static str; 2],
    /// The pinned maps' directory, where the slots' arrays are pinned as well.
    pins: Option<PathBuf>,
    slots: [Option<SlotArrays<E>>; SLOTS as usize],
}

impl<E: Copy> RangeArrays<E> {
    pub fn new(
        family: Family,
        shape: SlotShape,
        names: [&'static str; 2],
        [index_outer, ranges_outer]: [MapData; 2],
        pins: Option<PathBuf>,
    ) -> Self {
        Self {
            family,
            shape,
            index_outer,
            ranges_outer,
            names,
            pins,
            slots: [None, None],
        }
    }

    pub fn index_bits(&self) -> u32 {
        self.shape.index_bits
    }

    pub fn slot_ranges(&self) -> u32 {
        self.shape.slot_ranges
    }

    fn array_err(&self, which: usize) -> impl Fn(std::io::Error) -> DatapathError + use<E> {
        let map = self.names[which];
        move |source| DatapathError::TableArray { map, source }
    }

    /// Opens and maps the arrays an earlier agent pinned for the slots, and puts each
    /// in its slot's place again: the pins say what the slots hold.
    pub fn adopt(&mut self) -> Result<(), DatapathError> {
        let Some(dir) = self.pins.clone() else {
            return Ok(());
        };
        for slot in 0..SLOTS {
            let open = |name| MapData::from_pin(slot_pin(&dir, name, slot)).ok();
            let (Some(index_map), Some(ranges_map)) = (open(self.names[0]), open(self.names[1]))
            else {
                continue;
            };
            self.slots[slot as usize] = Some(self.mapped(index_map, ranges_map)?);
        }
        let writes: Vec<_> = (0..SLOTS).flat_map(|slot| self.installs(slot)).collect();
        write_at_once(&writes)
    }

    fn mapped(
        &self,
        index_map: MapData,
        ranges_map: MapData,
    ) -> Result<SlotArrays<E>, DatapathError> {
        let mmap_err = |which: usize| {
            let map = self.names[which];
            move |source| DatapathError::Mmap { map, source }
        };
        let index = MappedArray::map(&index_map.fd().as_fd(), self.shape.index_entries())
            .map_err(mmap_err(0))?;
        let ranges = MappedArray::map(&ranges_map.fd().as_fd(), self.shape.slot_ranges as usize)
            .map_err(mmap_err(1))?;
        Ok(SlotArrays {
            index_map,
            ranges_map,
            index,
            ranges,
        })
    }

    /// The writes that put a slot's arrays in its place in the arrays of maps; none for
    /// a slot without arrays. A slot is written only while no packet reads it (it is
    /// not active, and [`SLOT_GRACE`](super::SLOT_GRACE) has passed since it was), so the
    /// two may land in either order.
    pub fn installs(&self, slot: u32) -> Vec<SlotWrite<'_>> {
        let Some(arrays) = &self.slots[slot as usize] else {
            return Vec::new();
        };
        vec![
            SlotWrite {
                map: self.names[0],
                outer: self.index_outer.fd().as_fd(),
                slot,
                inner: Some(arrays.index_map.fd().as_fd()),
            },
            SlotWrite {
                map: self.names[1],
                outer: self.ranges_outer.fd().as_fd(),
                slot,
                inner: Some(arrays.ranges_map.fd().as_fd()),
            },
        ]
    }

    /// The writes that empty a slot's place in the arrays of maps; none for a slot
    /// without arrays (an empty place needs none, and on Linux 6.1 each write waits for
    /// a grace period even when it finds nothing). [`Self::forget`] follows them.
    pub fn removals(&self, slot: u32) -> Vec<SlotWrite<'_>> {
        if !self.holds(slot) {
            return Vec::new();
        }
        [
            (self.names[0], &self.index_outer),
            (self.names[1], &self.ranges_outer),
        ]
        .into_iter()
        .map(|(map, outer)| SlotWrite {
            map,
            outer: outer.fd().as_fd(),
            slot,
            inner: None,
        })
        .collect()
    }

    /// Pins a slot's arrays in place of what was pinned for the slot.
    fn pin(&self, slot: u32, arrays: &SlotArrays<E>) -> Result<(), DatapathError> {
        let Some(dir) = &self.pins else {
            return Ok(());
        };
        for (name, map) in [
            (self.names[0], &arrays.index_map),
            (self.names[1], &arrays.ranges_map),
        ] {
            let path = slot_pin(dir, name, slot);
            unpin(&path).map_err(|source| DatapathError::PinDir {
                path: path.clone(),
                source,
            })?;
            map.pin(&path)
                .map_err(|source| DatapathError::Pin { path, source })?;
        }
        Ok(())
    }

    /// One slot's index and range entries; none for a slot without arrays.
    pub fn slot(&self, slot: u32) -> (&[u32], &[E]) {
        match &self.slots[slot as usize] {
            Some(s) => (s.index.as_slice(), s.ranges.as_slice()),
            None => (&[], &[]),
        }
    }

    /// Range entries a slot's table uses: its index's last entry.
    pub fn used(&self, slot: u32) -> usize {
        self.slot(slot).0.last().map_or(0, |&n| n as usize)
    }

    /// Refuses `boundaries` before anything is written when a slot lacks room.
    pub fn check_room<A: Address>(
        &self,
        boundaries: &Boundaries<A>,
    ) -> Result<usize, DatapathError> {
        let needed = boundaries.entries(self.shape.index_bits);
        if needed > self.shape.slot_ranges as usize {
            return Err(self.full(needed));
        }
        Ok(needed)
    }

    fn full(&self, needed: usize) -> DatapathError {
        self.family.full(needed, self.shape.slot_ranges as usize)
    }

    /// Makes a slot's arrays, writes `boundaries` into them with `fill` (the family's
    /// `fill`), and pins them in place of the slot's old ones, which it lets go of; its
    /// [`Self::installs`] then put them in the slot's place, where they replace the old
    /// ones for the kernel too.
    pub fn write<A: Address>(
        &mut self,
        slot: u32,
        boundaries: &Boundaries<A>,
        fill: impl FnOnce(
            &mut [u32],
            &mut [E],
            &Boundaries<A>,
            u32,
        ) -> Result<usize, rangetable::RangesExhausted>,
    ) -> Result<usize, DatapathError> {
        let index_map =
            create_array(self.names[0], self.shape.index_array()).map_err(self.array_err(0))?;
        let ranges_map =
            create_array(self.names[1], self.shape.ranges_array()).map_err(self.array_err(1))?;
        let mut arrays = self.mapped(index_map, ranges_map)?;
        let used = fill(
            arrays.index.as_mut_slice(),
            arrays.ranges.as_mut_slice(),
            boundaries,
            self.shape.index_bits,
        )
        .map_err(|e| self.full(e.needed))?;
        self.pin(slot, &arrays)?;
        self.slots[slot as usize] = Some(arrays);
        Ok(used)
    }

    /// Lets go of a slot's arrays once its [`Self::removals`] are done: their pins go,
    /// and the kernel frees them once no program reads them.
    pub fn forget(&mut self, slot: u32) -> Result<(), DatapathError> {
        if let Some(dir) = &self.pins {
            for name in self.names {
                let path = slot_pin(dir, name, slot);
                unpin(&path).map_err(|source| DatapathError::PinDir { path, source })?;
            }
        }
        self.slots[slot as usize] = None;
        Ok(())
    }

    /// Whether a slot has arrays.
    pub fn holds(&self, slot: u32) -> bool {
        self.slots[slot as usize].is_some()
    }

    /// The kernel ids of the slots' arrays.
    pub fn slot_array_ids(&self) -> Vec<u32> {
        self.slots
            .iter()
            .flatten()
            .flat_map(|s| [&s.index_map, &s.ranges_map])
            .filter_map(|m| m.info().ok().map(|i| i.id()))
            .collect()
    }

    /// The table's kernel objects, by name: its arrays of maps and each slot's arrays.
    pub fn maps(&self) -> Vec<(&'static str, &MapData)> {
        let mut out = vec![
            (self.names[0], &self.index_outer),
            (self.names[1], &self.ranges_outer),
        ];
        for s in self.slots.iter().flatten() {
            out.push((self.names[0], &s.index_map));
            out.push((self.names[1], &s.ranges_map));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::{Family, SlotShape};

    #[test]
    fn a_table_past_the_limit_is_refused_for_good_and_one_within_it_until_a_restart() {
        let family = Family {
            name: "IPv4",
            max_ranges: 1000,
        };
        let within = family.full(1000, 800).to_string();
        assert!(
            within.contains("needs 1000 range entries") && within.contains("Restart the agent"),
            "{within}"
        );
        let past = family.full(1001, 800).to_string();
        assert!(
            past.contains("needs 1001 range entries, past the datapath's limit of 1000")
                && !past.contains("Restart"),
            "{past}"
        );
    }

    #[test]
    fn a_slot_shape_is_read_back_from_the_sizes_of_its_arrays() {
        for (index_bits, slot_ranges, per_value, bytes) in [
            (12, 1 << 16, 2, 4),
            (20, 3 << 20, 2, 4),
            (10, 8192, 4, 16),
            (17, 40_000, 4, 16),
        ] {
            let shape = SlotShape {
                index_bits,
                slot_ranges,
                ranges_per_value: per_value,
                range_bytes: bytes,
            };
            let (index_values, _) = shape.index_array();
            let (range_values, _) = shape.ranges_array();
            assert_eq!(
                SlotShape::of_arrays(index_values, range_values, per_value, bytes),
                shape
            );
        }
    }
}
