//! Builds the range tables of both families (`datafence_common::v4`, `v6`) from a
//! policy's prefixes: where the regions change, in address order, and each chunk's run
//! of ranges. The entry format and the layout of a run are the family's; the rest is
//! shared.
#![forbid(unsafe_code)]

use std::ops::Range;

use datafence_common::{REGION_NONE, RegionId};
use ipnetwork::{Ipv4Network, Ipv6Network};
use rayon::slice::ParallelSliceMut as _;

/// An address as a number: `u32` for IPv4, `u128` for IPv6.
pub trait Address: Copy + Ord + Into<u128> {
    const BITS: u32;
    /// Range entries in a node of the family's search: a chunk's run is a whole number
    /// of nodes. 1 for IPv4's sorted runs, a cache line for IPv6's B-trees.
    const NODE_ENTRIES: usize;
    /// About how many ranges a chunk should hold, as a power of two: a few for a binary
    /// search in one cache line, more where a B-tree makes a long run cheap and every
    /// chunk in a region costs a whole node.
    const CHUNK_RANGES_LOG2: u32;
    /// Whether the family's search finds no region in a chunk of no entries (its index
    /// entry and the next one equal): a chunk wholly in no region then takes no room.
    /// IPv6's B-tree search counts only the nodes between the bounds; IPv4's binary
    /// search always reads the entry at the lower bound, so each of its chunks needs one.
    const EMPTY_CHUNK_IS_NONE: bool;
    /// The address `value`, which fits.
    fn narrow(value: u128) -> Self;
}

impl Address for u32 {
    const BITS: u32 = 32;
    const NODE_ENTRIES: usize = 1;
    const CHUNK_RANGES_LOG2: u32 = 2;
    const EMPTY_CHUNK_IS_NONE: bool = false;
    fn narrow(value: u128) -> Self {
        value as u32
    }
}

impl Address for u128 {
    const BITS: u32 = 128;
    const NODE_ENTRIES: usize = datafence_common::v6::V6_NODE_ENTRIES as usize;
    const CHUNK_RANGES_LOG2: u32 = 4;
    // Most of the 128-bit space is in no region: at a million real-mix prefixes, 7 of
    // every 8 chunks lie outside 2000::/3, and a node each made 3.5 MiB of every slot.
    const EMPTY_CHUNK_IS_NONE: bool = true;
    fn narrow(value: u128) -> Self {
        value
    }
}

/// A prefix of one family.
pub trait Network: Copy {
    type Addr: Address;
    /// First address and prefix length.
    fn start_and_len(&self) -> (u128, u32);
}

impl Network for Ipv4Network {
    type Addr = u32;
    fn start_and_len(&self) -> (u128, u32) {
        (u32::from(self.network()).into(), self.prefix().into())
    }
}

impl Network for Ipv6Network {
    type Addr = u128;
    fn start_and_len(&self) -> (u128, u32) {
        (u128::from(self.network()), self.prefix().into())
    }
}

/// The last address of the family.
fn last_address<A: Address>() -> u128 {
    u128::MAX >> (128 - A::BITS)
}

/// Where the regions change, in address order: each boundary's first address and the
/// region from there to the next boundary. The first starts at address 0; no two
/// neighbours share a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boundaries<A>(Vec<(A, RegionId)>);

/// The table needs more range entries than the datapath has room for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangesExhausted {
    pub needed: usize,
    pub capacity: usize,
}

impl<A: Address> Boundaries<A> {
    /// The boundaries the longest-prefix match of `prefixes` draws. Prefixes may nest
    /// and come in any order; one listed twice keeps its last region.
    pub fn of<N: Network<Addr = A>>(prefixes: &[(N, RegionId)]) -> Self {
        let span = |&(net, region): &(N, RegionId)| {
            let (start, len) = net.start_and_len();
            let hosts = last_address::<A>().checked_shr(len).unwrap_or(0);
            (start, start | hosts, region)
        };
        // A compiled policy's lists are in this order already, each prefix once: the
        // sort below would cost a million-prefix policy more than drawing its tables.
        if prefixes.is_sorted_by(|(a, _), (b, _)| a.start_and_len() < b.start_and_len()) {
            return Self::draw(prefixes.iter().map(span));
        }
        let mut sorted: Vec<(u128, u128, usize, RegionId)> = prefixes
            .iter()
            .enumerate()
            .map(|(at, prefix)| {
                let (start, end, region) = span(prefix);
                (start, end, at, region)
            })
            .collect();
        // Outer prefixes first where starts tie, so inner ones open after them; a prefix
        // listed twice in the order listed. Every key differs, so an unstable sort gives
        // the one order, on every core.
        sorted.par_sort_unstable_by_key(|&(start, end, at, _)| (start, std::cmp::Reverse(end), at));
        Self::draw(
            sorted
                .into_iter()
                .map(|(start, end, _, region)| (start, end, region)),
        )
    }

    /// The boundaries of `spans` (first address, last address, region), sorted by first
    /// address with the outer of two that start together first.
    fn draw(spans: impl Iterator<Item = (u128, u128, RegionId)>) -> Self {
        let mut out = Self(vec![(A::narrow(0), RegionId::from(REGION_NONE))]);
        // Open prefixes, innermost last: (last address, region).
        let mut open: Vec<(u128, RegionId)> = Vec::new();
        for (start, end, region) in spans {
            out.close_before(&mut open, Some(start));
            out.mark(start, region);
            open.push((end, region));
        }
        out.close_before(&mut open, None);
        out
    }

    /// Closes the open prefixes that end before `at` (all of them for `None`, the end
    /// of the address space), marking where each hands back to the one it nests in.
    fn close_before(&mut self, open: &mut Vec<(u128, RegionId)>, at: Option<u128>) {
        while let Some(&(end, _)) = open.last() {
            if at.is_some_and(|at| end >= at) {
                break;
            }
            open.pop();
            let outer = open.last().map_or(RegionId::from(REGION_NONE), |o| o.1);
            if end < last_address::<A>() {
                self.mark(end + 1, outer);
            }
        }
    }

    /// From `at` on, the region is `region` (until the next mark).
    fn mark(&mut self, at: u128, region: RegionId) {
        let at = A::narrow(at);
        if let Some(last) = self.0.last_mut()
            && last.0 == at
        {
            last.1 = region;
            // The replaced boundary may now repeat the one before it.
            if self.0.len() > 1 && self.0[self.0.len() - 2].1 == region {
                self.0.pop();
            }
            return;
        }
        if self.0.last().is_some_and(|last| last.1 == region) {
            return;
        }
        self.0.push((at, region));
    }

    /// Boundaries drawn: ranges before chunking.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each boundary's first address and region, in address order.
    pub fn iter(&self) -> impl Iterator<Item = (A, RegionId)> + '_ {
        self.0.iter().copied()
    }

    /// Index bits for a datapath sized to these boundaries: about
    /// `2^CHUNK_RANGES_LOG2` ranges to a chunk, within `min..=max`.
    pub fn index_bits(&self, min: u32, max: u32) -> u32 {
        (usize::BITS - self.len().max(1).leading_zeros())
            .saturating_sub(A::CHUNK_RANGES_LOG2)
            .clamp(min, max)
    }

    /// Each chunk's run of ranges, in chunk order: the chunk's first address, and the
    /// boundaries `at..end` of which `at` covers that address and the rest start inside
    /// the chunk. `None` for a chunk that takes no entries: wholly in no region, in a
    /// family whose search reads that from an empty chunk.
    fn chunk_runs(&self, bits: u32) -> impl Iterator<Item = Option<(A, Range<usize>)>> + '_ {
        let low = A::BITS - bits;
        let all = &self.0;
        // The boundary in force at the current chunk's first address.
        let mut at = 0usize;
        (0..1u32 << bits).map(move |chunk| {
            let first = A::narrow(u128::from(chunk) << low);
            // The next chunk's first address; `None` past the last chunk.
            let next = (chunk + 1 < 1 << bits).then(|| A::narrow(u128::from(chunk + 1) << low));
            while at + 1 < all.len() && all[at + 1].0 <= first {
                at += 1;
            }
            let covering = at;
            while at + 1 < all.len() && next.is_none_or(|next| all[at + 1].0 < next) {
                at += 1;
            }
            let quiet_in_none = covering == at && all[at].1 == RegionId::from(REGION_NONE);
            (!(A::EMPTY_CHUNK_IS_NONE && quiet_in_none)).then_some((first, covering..at + 1))
        })
    }

    /// Range entries the table takes with `bits` index bits: each chunk's ranges (the
    /// one covering its first address, and one per boundary inside it), padded to whole
    /// nodes.
    pub fn entries(&self, bits: u32) -> usize {
        self.chunk_runs(bits)
            .flatten()
            .map(|(_, run)| run.len().div_ceil(A::NODE_ENTRIES) * A::NODE_ENTRIES)
            .sum()
    }
}

/// Index entries of one slot's table: one per chunk and one past the last.
pub const fn index_entries(bits: u32) -> usize {
    (1usize << bits) + 1
}

/// Writes the table into one slot: `index` holds at least [`index_entries`] entries and
/// `ranges` is the slot's room for range entries. `entry(start, chunk_start, region)`
/// makes the family's range entry. Returns the range entries used.
pub fn fill<A: Address, E: Copy>(
    index: &mut [u32],
    ranges: &mut [E],
    boundaries: &Boundaries<A>,
    bits: u32,
    entry: impl Fn(A, A, RegionId) -> E,
) -> Result<usize, RangesExhausted> {
    let needed = boundaries.entries(bits);
    if needed > ranges.len() || index.len() < index_entries(bits) {
        return Err(RangesExhausted {
            needed,
            capacity: ranges.len(),
        });
    }
    let all = &boundaries.0;
    let mut used = 0usize;
    // One chunk's entries in address order.
    let mut run: Vec<E> = Vec::new();
    for (chunk, covered) in boundaries.chunk_runs(bits).enumerate() {
        index[chunk] = used as u32;
        let Some((first, at)) = covered else {
            continue;
        };
        run.clear();
        run.push(entry(first, first, all[at.start].1));
        run.extend(
            all[at.start + 1..at.end]
                .iter()
                .map(|&(start, region)| entry(start, first, region)),
        );
        let len = run.len().div_ceil(A::NODE_ENTRIES) * A::NODE_ENTRIES;
        lay_out(&run, &mut ranges[used..used + len], A::NODE_ENTRIES);
        used += len;
    }
    index[1 << bits] = used as u32;
    Ok(used)
}

/// Lays a chunk's run of entries, in address order, out as its search reads them:
/// sorted for nodes of one entry, else a static B-tree of `node`-entry nodes in which
/// node `k`'s children are `k * (node + 1) + 1 ..`, filled in order. `out` is the run
/// padded to whole nodes; the padding repeats the last entry, so the order holds and a
/// search that ends on a copy finds the same range.
fn lay_out<E: Copy>(run: &[E], out: &mut [E], node: usize) {
    if node == 1 {
        out.copy_from_slice(run);
        return;
    }
    let last = run[run.len() - 1];
    let mut sorted = run.iter().copied().chain(std::iter::repeat(last));
    place(out, node, 0, &mut sorted);
}

/// Places node `k`'s subtree in order: each entry after the child left of it. The
/// recursion is as deep as the tree, at most `V6_MAX_LEVELS`.
fn place<E: Copy>(out: &mut [E], node: usize, k: usize, sorted: &mut impl Iterator<Item = E>) {
    if k >= out.len() / node {
        return;
    }
    for i in 0..node {
        place(out, node, k * (node + 1) + i + 1, sorted);
        out[k * node + i] = sorted.next().expect("the padding never ends");
    }
    place(out, node, k * (node + 1) + node + 1, sorted);
}

#[cfg(test)]
mod tests {
    use super::lay_out;

    /// Searches a laid-out tree of `node`-entry nodes the plain way: per node, count
    /// the entries at or below `key`, remember the last of them, go to that child.
    fn search(tree: &[u32], node: usize, key: u32) -> Option<u32> {
        let (mut k, mut best) = (0, None);
        while k < tree.len() / node {
            let entries = &tree[k * node..(k + 1) * node];
            let count = entries.iter().take_while(|e| **e <= key).count();
            if count > 0 {
                best = Some(entries[count - 1]);
            }
            k = k * (node + 1) + count + 1;
        }
        best
    }

    #[test]
    fn every_key_finds_its_predecessor_in_trees_of_every_shape() {
        const NODE: usize = 4;
        // Up to 61 nodes: full and partial second, third and fourth levels.
        for len in 1..=242usize {
            let run: Vec<u32> = (0..len as u32).map(|i| 10 + 3 * i).collect();
            let mut tree = vec![0; len.div_ceil(NODE) * NODE];
            lay_out(&run, &mut tree, NODE);
            let mut held = tree.clone();
            held.sort_unstable();
            let padding = tree.len() - len;
            let mut want = run.clone();
            want.extend(std::iter::repeat_n(run[len - 1], padding));
            assert_eq!(
                held, want,
                "{len} ranges: the tree holds the run and its padding"
            );
            for key in 0..=run[len - 1] + 3 {
                let predecessor = run.iter().copied().take_while(|e| *e <= key).last();
                assert_eq!(
                    search(&tree, NODE, key),
                    predecessor,
                    "{len} ranges, key {key}"
                );
            }
        }
    }

    #[test]
    fn nodes_of_one_entry_keep_the_run_sorted() {
        let run = [1u32, 5, 9];
        let mut out = [0; 3];
        lay_out(&run, &mut out, 1);
        assert_eq!(out, run);
    }
}
