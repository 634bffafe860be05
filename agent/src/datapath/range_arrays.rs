//! One family's range table in the datapath: the memory-mapped index and range arrays
//! of both slots, and the sizes they were made with.

#![forbid(unsafe_code)]

use std::ops::Range;

use super::{DatapathError, sys::MappedArray};
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

pub(super) struct RangeArrays<E> {
    pub family: Family,
    pub index_bits: u32,
    pub slot_ranges: u32,
    index: MappedArray<u32>,
    ranges: MappedArray<E>,
}

impl<E: Copy> RangeArrays<E> {
    pub fn new(
        family: Family,
        index_bits: u32,
        slot_ranges: u32,
        index: MappedArray<u32>,
        ranges: MappedArray<E>,
    ) -> Self {
        Self {
            family,
            index_bits,
            slot_ranges,
            index,
            ranges,
        }
    }

    /// The spans of one slot's index and range entries.
    fn spans(&self, slot: u32) -> (Range<usize>, Range<usize>) {
        let per_index = rangetable::index_entries(self.index_bits);
        let per_ranges = self.slot_ranges as usize;
        let s = slot as usize;
        (
            s * per_index..(s + 1) * per_index,
            s * per_ranges..(s + 1) * per_ranges,
        )
    }

    /// One slot's index and range entries.
    pub fn slot(&self, slot: u32) -> (&[u32], &[E]) {
        let (index, ranges) = self.spans(slot);
        (
            &self.index.as_slice()[index],
            &self.ranges.as_slice()[ranges],
        )
    }

    /// Range entries a slot's table uses: its index's last entry.
    pub fn used(&self, slot: u32) -> usize {
        self.slot(slot).0.last().map_or(0, |&n| n as usize)
    }

    /// Refuses `boundaries` before anything is written when the slot lacks room.
    pub fn check_room<A: Address>(
        &self,
        boundaries: &Boundaries<A>,
    ) -> Result<usize, DatapathError> {
        let needed = boundaries.entries(self.index_bits);
        if needed > self.slot_ranges as usize {
            return Err(self.full(needed));
        }
        Ok(needed)
    }

    fn full(&self, needed: usize) -> DatapathError {
        self.family.full(needed, self.slot_ranges as usize)
    }

    /// Writes `boundaries` into a slot with `fill` (the family's `fill`).
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
        let (index, ranges) = self.spans(slot);
        let bits = self.index_bits;
        fill(
            &mut self.index.as_mut_slice()[index],
            &mut self.ranges.as_mut_slice()[ranges],
            boundaries,
            bits,
        )
        .map_err(|e| self.full(e.needed))
    }

    /// Empties a slot: an index of zeros is an empty table (the ranges it pointed at are
    /// unreachable), and counts no ranges.
    pub fn clear(&mut self, slot: u32) {
        let (index, _) = self.spans(slot);
        self.index.as_mut_slice()[index].fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::Family;

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
}
