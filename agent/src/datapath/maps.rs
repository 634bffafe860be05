//! Every map of the eBPF object, in one table: its name, its kind, whether it is pinned,
//! and how the two policy slots share it. Loading, pinning, capacity checks, usage
//! reporting (and so the `map` labels of the metrics), slot clearing and adoption all
//! read this table; adding a map is one row here (and one `#[map]` in agent-ebpf).

#![forbid(unsafe_code)]

use datafence_common::{
    MAX_CGROUP_ENTRIES, MAX_EXEMPT_ENTRIES, MAX_SRC_CIDR_ENTRIES, map_names as n,
};

use crate::policy::CompiledPolicy;

/// What kind of kernel map it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Array,
    PerCpuArray,
    /// A hash keyed by slot (`CgroupKey`).
    SlotHash,
    PerCpuHash,
    /// A hash keyed by something other than the slot (`L3_LINKS` by ifindex,
    /// `FRAGMENTS` by datagram).
    Hash,
    /// An LPM trie whose keys start with the slot (`LpmDataV4`).
    LpmV4,
    /// An LPM trie whose keys start with the slot (`LpmDataV6`).
    LpmV6,
    RingBuf,
    ProgramArray,
    /// An array of maps: per slot, the slot's array of a region table.
    ArrayOfMaps,
}

/// Where a map is pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pin {
    /// In [`PinLayout::maps_dir`](super::PinLayout::maps_dir): shared by every build of
    /// this ABI, so the policy, counters and events outlive the agent.
    Maps,
    /// In [`PinLayout::stages_dir`](super::PinLayout::stages_dir): one build's tail-call
    /// stages and the jobs its entry programs hand them.
    Stages,
    /// Not pinned: per-CPU scratch, and the bench's maps.
    No,
}

/// How many entries one slot may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PerSlot {
    /// The IPv4 table's range entries, sized to the policy the agent starts with.
    V4Ranges,
    /// The same for IPv6.
    V6Ranges,
    /// A fixed share of the map's entries (which the eBPF object sets).
    Share { total: u32 },
}

/// How the policy slots use a map.
#[derive(Clone, Copy, Debug)]
pub enum Slots {
    /// Not divided into slots.
    Shared,
    /// Each slot owns its part (a range of the array, or its entry of an array of maps),
    /// which the slot writer writes whole.
    Ranged,
    /// As `Ranged`, and a slot's fill is reported as map usage.
    RangedUsage(PerSlot),
    /// Entries are keyed by slot: capacity-checked before writing, counted, and removed
    /// when the slot is cleared. `compiled` counts what a policy puts there.
    Keyed {
        per_slot: PerSlot,
        compiled: fn(&CompiledPolicy) -> usize,
    },
}

/// One map of the object.
#[derive(Clone, Copy, Debug)]
pub struct MapSpec {
    pub name: &'static str,
    pub kind: Kind,
    pub pin: Pin,
    pub slots: Slots,
}

impl MapSpec {
    /// Whether `map_usage` reports this map (and so the metrics label it).
    pub fn reports_usage(&self) -> bool {
        matches!(self.slots, Slots::Keyed { .. } | Slots::RangedUsage(_))
    }
}

const fn spec(name: &'static str, kind: Kind, pin: Pin, slots: Slots) -> MapSpec {
    MapSpec {
        name,
        kind,
        pin,
        slots,
    }
}

const fn keyed(per_slot: PerSlot, compiled: fn(&CompiledPolicy) -> usize) -> Slots {
    Slots::Keyed { per_slot, compiled }
}

const fn share(total: u32) -> PerSlot {
    PerSlot::Share {
        total: total / datafence_common::SLOTS,
    }
}

/// Every map in the object (the bench's maps only in the bench's object, built with the
/// `bench` feature). Usage is reported in this order.
pub const MAPS: &[MapSpec] = &{
    use Kind::{
        Array, ArrayOfMaps, Hash, LpmV4, LpmV6, PerCpuArray, PerCpuHash, ProgramArray, RingBuf,
        SlotHash,
    };
    use Pin::{Maps, No, Stages};
    use Slots::{Ranged, RangedUsage, Shared};
    [
        spec(n::ACTIVE_SLOT, Array, Maps, Shared),
        spec(n::POLICY, Array, Maps, Ranged),
        spec(
            n::EXEMPT_V4,
            LpmV4,
            Maps,
            keyed(share(MAX_EXEMPT_ENTRIES), |c| c.exempt_v4.len()),
        ),
        spec(
            n::EXEMPT_V6,
            LpmV6,
            Maps,
            keyed(share(MAX_EXEMPT_ENTRIES), |c| c.exempt_v6.len()),
        ),
        spec(
            n::SRC_V4,
            LpmV4,
            Maps,
            keyed(share(MAX_SRC_CIDR_ENTRIES), |c| c.src_v4.len()),
        ),
        spec(
            n::SRC_V6,
            LpmV6,
            Maps,
            keyed(share(MAX_SRC_CIDR_ENTRIES), |c| c.src_v6.len()),
        ),
        spec(
            n::CGROUP_CLASSES,
            SlotHash,
            Maps,
            keyed(share(MAX_CGROUP_ENTRIES), |c| c.cgroups.len()),
        ),
        spec(n::V4_INDEX, ArrayOfMaps, Maps, Ranged),
        spec(
            n::V4_RANGES,
            ArrayOfMaps,
            Maps,
            RangedUsage(PerSlot::V4Ranges),
        ),
        spec(n::V6_INDEX, ArrayOfMaps, Maps, Ranged),
        spec(
            n::V6_RANGES,
            ArrayOfMaps,
            Maps,
            RangedUsage(PerSlot::V6Ranges),
        ),
        spec(n::COUNTERS, PerCpuHash, Maps, Shared),
        spec(n::COUNTER_CACHE, PerCpuArray, Maps, Shared),
        spec(n::STATS, PerCpuArray, Maps, Shared),
        spec(n::EVENTS, RingBuf, Maps, Shared),
        spec(n::RATE_LIMIT, PerCpuArray, Maps, Shared),
        spec(n::L3_LINKS, Hash, Maps, Shared),
        spec(n::HOST_ADDRESSES, Hash, Maps, Shared),
        spec(n::TC_STAGES, ProgramArray, Stages, Shared),
        spec(n::XDP_STAGES, ProgramArray, Stages, Shared),
        spec(n::TC_JOB, PerCpuArray, Stages, Shared),
        spec(n::XDP_JOB, PerCpuArray, Stages, Shared),
        spec(n::FRAGMENTS, Hash, Stages, Shared),
        spec(n::SCRATCH, PerCpuArray, No, Shared),
        spec(n::SOCKET_CALL, PerCpuArray, Stages, Shared),
        spec(n::SOCK_CONNECT4_STAGES, ProgramArray, Stages, Shared),
        spec(n::SOCK_CONNECT6_STAGES, ProgramArray, Stages, Shared),
        spec(n::SOCK_SENDMSG4_STAGES, ProgramArray, Stages, Shared),
        spec(n::SOCK_SENDMSG6_STAGES, ProgramArray, Stages, Shared),
        #[cfg(feature = "bench")]
        spec(n::BENCH_LPM_V4, LpmV4, No, Shared),
        #[cfg(feature = "bench")]
        spec(n::BENCH_LPM_V6, LpmV6, No, Shared),
        #[cfg(feature = "bench")]
        spec(n::BENCH_ADDRS_V4, Array, No, Shared),
        #[cfg(feature = "bench")]
        spec(n::BENCH_ADDRS_V6, Array, No, Shared),
        #[cfg(feature = "bench")]
        spec(n::BENCH_STAGES, ProgramArray, No, Shared),
    ]
};

/// A removal's result, with a key that was not there counted as removed: the kernel
/// answers ENOENT, which aya reports either way.
pub(super) fn removed_if_absent(
    result: Result<(), aya::maps::MapError>,
) -> Result<(), aya::maps::MapError> {
    match result {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        other => other,
    }
}

/// Maps of a pin kind.
pub fn pinned(pin: Pin) -> impl Iterator<Item = &'static MapSpec> {
    MAPS.iter().filter(move |m| m.pin == pin)
}

/// The row of a map.
pub fn spec_of(name: &str) -> Option<&'static MapSpec> {
    MAPS.iter().find(|m| m.name == name)
}

/// Entries one policy slot holds in each map, by its row in [`MAPS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlotContents([usize; MAPS.len()]);

// `derive(Default)` stops at arrays of 32.
impl Default for SlotContents {
    fn default() -> Self {
        Self([0; MAPS.len()])
    }
}

impl SlotContents {
    /// What `compiled` puts in the keyed maps.
    pub fn of(c: &CompiledPolicy) -> Self {
        let mut out = Self::default();
        for (i, m) in MAPS.iter().enumerate() {
            if let Slots::Keyed { compiled, .. } = m.slots {
                out.0[i] = compiled(c);
            }
        }
        out
    }

    pub fn get(&self, name: &str) -> usize {
        MAPS.iter()
            .position(|m| m.name == name)
            .map_or(0, |i| self.0[i])
    }

    pub fn set(&mut self, name: &str, entries: usize) {
        if let Some(i) = MAPS.iter().position(|m| m.name == name) {
            self.0[i] = entries;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique() {
        for (i, m) in MAPS.iter().enumerate() {
            assert!(
                MAPS[i + 1..].iter().all(|o| o.name != m.name),
                "{} twice",
                m.name
            );
        }
    }

    #[test]
    fn keyed_maps_are_keyed_by_slot() {
        for m in MAPS
            .iter()
            .filter(|m| matches!(m.slots, Slots::Keyed { .. }))
        {
            assert!(
                matches!(m.kind, Kind::LpmV4 | Kind::LpmV6 | Kind::SlotHash),
                "{}",
                m.name
            );
        }
    }
}
