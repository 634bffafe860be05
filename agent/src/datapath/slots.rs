//! The two-slot switch: a policy is written into the inactive slot, checked against
//! each map's per-slot capacity first, then made active in one map write; the old slot
//! is freed no sooner than [`SLOT_GRACE`] after the switch, by
//! [`Datapath::release_retired_slot`] or before it is written again.

#![forbid(unsafe_code)]

use std::net::IpAddr;

use aya::maps::{Array, HashMap as BpfHashMap, LpmTrie, Map, MapData, lpm_trie::Key};
use datafence_common::{
    CgroupKey, ClassMask, LpmDataV4, LpmDataV6, Policy, RegionId, SLOT_PREFIX_BITS, SLOTS,
    lpm_data_v4, lpm_data_v6, map_names,
};
use ipnetwork::{Ipv4Network, Ipv6Network};

use super::{
    ApplyReport, Datapath, DatapathError, EventLimits, RegionTables, Result, SLOT_GRACE, map_err,
    maps::{self, Kind, PerSlot, SlotContents, Slots},
    range_arrays,
};
use crate::{policy::CompiledPolicy, v4table, v6table};

impl Datapath {
    /// The slot the programs read now.
    pub fn active_slot(&self) -> Result<u32> {
        let name = map_names::ACTIVE_SLOT;
        let arr: Array<&MapData, u32> = Array::try_from(self.map(name)?).map_err(map_err(name))?;
        Ok(arr.get(&0, 0).map_err(map_err(name))? & 1)
    }

    /// Brings the active slot's cgroup classes from `old` to `new` (each sorted by id, as
    /// [`CompiledPolicy::cgroups`] is), entry by entry: the new ids first, then the ones
    /// gone. For cgroups made anew under the paths a policy names, whose ids changed while
    /// the policy did not. Every packet sees either an id's old classes or its new ones,
    /// and both are this policy's; a full [`Self::apply`] would rewrite every table to
    /// the same effect, and take as long as a reload.
    pub fn update_cgroups(
        &mut self,
        old: &[(u64, ClassMask)],
        new: &[(u64, ClassMask)],
    ) -> Result<()> {
        let slot = self.active_slot()?;
        let name = map_names::CGROUP_CLASSES;
        let mut cg: BpfHashMap<&mut MapData, CgroupKey, ClassMask> =
            BpfHashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        let key = |cgroup_id| CgroupKey {
            cgroup_id,
            slot,
            _pad: 0,
        };
        for (id, mask) in new {
            if !old.contains(&(*id, *mask)) {
                cg.insert(key(*id), mask, 0).map_err(map_err(name))?;
            }
        }
        for (id, _) in old {
            if !new.iter().any(|(n, _)| n == id) {
                cg.remove(&key(*id)).map_err(map_err(name))?;
            }
        }
        Ok(())
    }

    /// The policy header and classes in a slot.
    pub fn policy_in_slot(&self, slot: u32) -> Result<Policy> {
        let name = map_names::POLICY;
        let arr: Array<&MapData, Policy> =
            Array::try_from(self.map(name)?).map_err(map_err(name))?;
        arr.get(&slot, 0).map_err(map_err(name))
    }

    /// Numbers the next policy after `generation`, the last one a retired datapath held,
    /// so that generations keep counting up across new maps. Only into a slot that holds
    /// no policy, whose header the datapath does not read.
    pub fn continue_generations_after(&mut self, generation: u32) -> Result<()> {
        let active = self.active_slot()?;
        let mut policy = self.policy_in_slot(active)?;
        if policy.header.loaded != 0 {
            return Ok(());
        }
        policy.header.generation = generation;
        let name = map_names::POLICY;
        let mut arr: Array<&mut MapData, Policy> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        arr.set(active, policy, 0).map_err(map_err(name))
    }

    /// Writes `compiled` into the inactive slot, then makes it active in one map write.
    /// On any error the active slot is untouched, so the last good policy stays in force.
    pub fn apply(&mut self, compiled: &CompiledPolicy, events: EventLimits) -> Result<ApplyReport> {
        self.apply_built(compiled, &RegionTables::of(compiled), events)
    }

    /// [`Self::apply`] with the policy's region tables already built
    /// ([`RegionTables::of`] `compiled`), for a caller that built them to size the
    /// datapath.
    pub fn apply_built(
        &mut self,
        compiled: &CompiledPolicy,
        tables: &RegionTables,
        events: EventLimits,
    ) -> Result<ApplyReport> {
        let (v4, v6) = (&tables.v4, &tables.v6);
        let active = self.active_slot()?;
        let target = 1 - active;
        let generation = self
            .policy_in_slot(active)?
            .header
            .generation
            .wrapping_add(1);
        self.check_capacity(compiled)?;
        let v4_needed = self.v4.check_room(v4)?;
        let v6_needed = self.v6.check_room(v6)?;
        // The target was active until the last switch: packets may still be reading it.
        std::thread::sleep(SLOT_GRACE.saturating_sub(self.slot_switched.elapsed()));
        // The target's region tables are replaced, not removed first: each removal would
        // wait for a grace period of its own.
        self.clear_keyed_maps(target)?;
        self.slot_contents[target as usize] = SlotContents::default();
        if let Err(err) = self.fill_slot(target, compiled, tables) {
            // Leave nothing half-written behind; the error that matters is the first.
            let _ = self.clear_slot(target);
            return Err(err);
        }
        let mut contents = SlotContents::of(compiled);
        contents.set(map_names::V4_RANGES, v4_needed);
        contents.set(map_names::V6_RANGES, v6_needed);
        self.slot_contents[target as usize] = contents;
        let mut policy = compiled.policy;
        policy.header.loaded = 1;
        policy.header.generation = generation;
        policy.header.events_per_sec = events.per_second;
        policy.header.events_burst = events.burst;
        let name = map_names::POLICY;
        let mut arr: Array<&mut MapData, Policy> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        arr.set(target, policy, 0).map_err(map_err(name))?;
        let name = map_names::ACTIVE_SLOT;
        let mut arr: Array<&mut MapData, u32> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        arr.set(0, target, 0).map_err(map_err(name))?;
        self.slot_switched = std::time::Instant::now();
        Ok(ApplyReport {
            slot: target,
            generation,
            regions_v4: compiled.regions_v4.len(),
            regions_v6: compiled.regions_v6.len(),
        })
    }

    /// Entries one slot of a map may hold.
    fn per_slot(&self, p: PerSlot) -> u32 {
        match p {
            PerSlot::V4Ranges => self.v4.slot_ranges(),
            PerSlot::V6Ranges => self.v6.slot_ranges(),
            PerSlot::Share { total } => total,
        }
    }

    /// Checks that the policy fits each keyed map's share of a slot. The range tables of
    /// both families are checked in `apply_built`, once their entries are counted.
    fn check_capacity(&self, c: &CompiledPolicy) -> Result<()> {
        for m in maps::MAPS {
            if let Slots::Keyed { per_slot, compiled } = m.slots {
                let (needed, capacity) = (compiled(c), self.per_slot(per_slot));
                if needed > capacity as usize {
                    return Err(DatapathError::MapFull {
                        map: m.name,
                        needed,
                        capacity,
                    });
                }
            }
        }
        Ok(())
    }

    /// (map, entries, capacity) for the policy maps, both slots together.
    pub fn map_usage(&self) -> Vec<(String, u64, u64)> {
        let [a, b] = &self.slot_contents;
        maps::MAPS
            .iter()
            .filter_map(|m| {
                let per_slot = match m.slots {
                    Slots::Keyed { per_slot, .. } | Slots::RangedUsage(per_slot) => per_slot,
                    Slots::Shared | Slots::Ranged => return None,
                };
                let used = (a.get(m.name) + b.get(m.name)) as u64;
                let capacity = u64::from(SLOTS * self.per_slot(per_slot));
                Some((m.name.to_owned(), used, capacity))
            })
            .collect()
    }

    fn fill_slot(&mut self, slot: u32, c: &CompiledPolicy, tables: &RegionTables) -> Result<()> {
        self.v4.write(slot, &tables.v4, v4table::fill)?;
        self.v6.write(slot, &tables.v6, v6table::fill)?;
        let mut installs = self.v4.installs(slot);
        installs.extend(self.v6.installs(slot));
        range_arrays::write_at_once(&installs)?;
        let exempt_v4: Vec<(Ipv4Network, u32)> = c.exempt_v4.iter().map(|n| (*n, 1)).collect();
        let exempt_v6: Vec<(Ipv6Network, u32)> = c.exempt_v6.iter().map(|n| (*n, 1)).collect();
        insert_v4(
            self.map_mut(map_names::EXEMPT_V4)?,
            map_names::EXEMPT_V4,
            slot,
            &exempt_v4,
        )?;
        insert_v6(
            self.map_mut(map_names::EXEMPT_V6)?,
            map_names::EXEMPT_V6,
            slot,
            &exempt_v6,
        )?;
        insert_v4(
            self.map_mut(map_names::SRC_V4)?,
            map_names::SRC_V4,
            slot,
            &c.src_v4,
        )?;
        insert_v6(
            self.map_mut(map_names::SRC_V6)?,
            map_names::SRC_V6,
            slot,
            &c.src_v6,
        )?;
        let name = map_names::CGROUP_CLASSES;
        let mut cg: BpfHashMap<&mut MapData, CgroupKey, ClassMask> =
            BpfHashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for (cgroup_id, mask) in &c.cgroups {
            let key = CgroupKey {
                cgroup_id: *cgroup_id,
                slot,
                _pad: 0,
            };
            cg.insert(key, mask, 0).map_err(map_err(name))?;
        }
        Ok(())
    }

    /// Frees the slot the last switch left, once no packet can still be reading it
    /// ([`SLOT_GRACE`] after the switch): its region tables' arrays, and its entries in
    /// the shared maps. Between reloads the kernel then holds one policy's tables. Before
    /// the grace is over it frees nothing (the next call does, or the next reload).
    /// Returns whether it freed a slot.
    pub fn release_retired_slot(&mut self) -> Result<bool> {
        if self.slot_switched.elapsed() < SLOT_GRACE {
            return Ok(false);
        }
        let retired = 1 - self.active_slot()?;
        let holds = self.v4.holds(retired)
            || self.v6.holds(retired)
            || self.slot_contents[retired as usize] != SlotContents::default();
        if !holds {
            return Ok(false);
        }
        self.clear_slot(retired)?;
        self.slot_contents[retired as usize] = SlotContents::default();
        Ok(true)
    }

    /// The kernel ids of the arrays the region tables' slots hold now, IPv4's and
    /// IPv6's.
    pub fn region_table_array_ids(&self) -> Vec<u32> {
        let mut ids = self.v4.slot_array_ids();
        ids.extend(self.v6.slot_array_ids());
        ids
    }

    /// Removes every entry a slot owns from the shared tables, and frees its region
    /// tables' arrays. `POLICY`, which the slot writer rewrites whole, needs nothing.
    fn clear_slot(&mut self, slot: u32) -> Result<()> {
        let mut removals = self.v4.removals(slot);
        removals.extend(self.v6.removals(slot));
        range_arrays::write_at_once(&removals)?;
        self.v4.forget(slot)?;
        self.v6.forget(slot)?;
        self.clear_keyed_maps(slot)
    }

    /// Removes every entry a slot owns from the shared tables.
    fn clear_keyed_maps(&mut self, slot: u32) -> Result<()> {
        for m in maps::MAPS
            .iter()
            .filter(|m| matches!(m.slots, Slots::Keyed { .. }))
        {
            let map = self.map_mut(m.name)?;
            match m.kind {
                Kind::LpmV4 => clear_lpm::<LpmDataV4>(map, m.name, slot)?,
                Kind::LpmV6 => clear_lpm::<LpmDataV6>(map, m.name, slot)?,
                Kind::SlotHash => clear_cgroups(map, m.name, slot)?,
                _ => unreachable!("a keyed map is keyed by slot: {}", m.name),
            }
        }
        Ok(())
    }
}

/// Looks up the region the datapath's tables give an address, in the active slot.
pub fn lpm_key_v4(slot: u32, addr: std::net::Ipv4Addr, prefix: u8) -> Key<LpmDataV4> {
    Key::new(
        SLOT_PREFIX_BITS + u32::from(prefix),
        lpm_data_v4(slot, addr.octets()),
    )
}

pub fn lpm_key_v6(slot: u32, addr: std::net::Ipv6Addr, prefix: u8) -> Key<LpmDataV6> {
    Key::new(
        SLOT_PREFIX_BITS + u32::from(prefix),
        lpm_data_v6(slot, addr.octets()),
    )
}

impl Datapath {
    /// The region the kernel's table gives `addr` in the active slot.
    pub fn region_of(&self, addr: IpAddr) -> Result<RegionId> {
        let slot = self.active_slot()?;
        Ok(match addr {
            IpAddr::V4(a) => {
                let (index, ranges) = self.v4.slot(slot);
                v4table::lookup(index, ranges, self.v4.index_bits(), a)
            }
            IpAddr::V6(a) => {
                let (index, ranges) = self.v6.slot(slot);
                v6table::lookup(index, ranges, self.v6.index_bits(), a)
            }
        })
    }
}

fn insert_v4<V: aya::Pod>(
    map: &mut Map,
    name: &'static str,
    slot: u32,
    entries: &[(Ipv4Network, V)],
) -> Result<()> {
    let mut trie: LpmTrie<&mut MapData, LpmDataV4, V> =
        LpmTrie::try_from(map).map_err(map_err(name))?;
    for (net, value) in entries {
        trie.insert(&lpm_key_v4(slot, net.network(), net.prefix()), value, 0)
            .map_err(map_err(name))?;
    }
    Ok(())
}

fn insert_v6<V: aya::Pod>(
    map: &mut Map,
    name: &'static str,
    slot: u32,
    entries: &[(Ipv6Network, V)],
) -> Result<()> {
    let mut trie: LpmTrie<&mut MapData, LpmDataV6, V> =
        LpmTrie::try_from(map).map_err(map_err(name))?;
    for (net, value) in entries {
        trie.insert(&lpm_key_v6(slot, net.network(), net.prefix()), value, 0)
            .map_err(map_err(name))?;
    }
    Ok(())
}

/// Removes a slot's entries from an LPM map (every value is a `u32`).
fn clear_lpm<K>(map: &mut Map, name: &'static str, slot: u32) -> Result<()>
where
    K: aya::Pod + AsRef<[u8]>,
{
    let mut trie: LpmTrie<&mut MapData, K, u32> = LpmTrie::try_from(map).map_err(map_err(name))?;
    let slot_bytes = slot.to_be_bytes();
    let stale: Vec<Key<K>> = trie
        .keys()
        .filter_map(std::result::Result::ok)
        .filter(|k| k.data().as_ref()[..4] == slot_bytes)
        .collect();
    for key in stale {
        trie.remove(&key).map_err(map_err(name))?;
    }
    Ok(())
}

/// Removes a slot's entries from the cgroup map.
fn clear_cgroups(map: &mut Map, name: &'static str, slot: u32) -> Result<()> {
    let mut cg: BpfHashMap<&mut MapData, CgroupKey, ClassMask> =
        BpfHashMap::try_from(map).map_err(map_err(name))?;
    let stale: Vec<CgroupKey> = cg
        .keys()
        .filter_map(std::result::Result::ok)
        .filter(|k| k.slot == slot)
        .collect();
    for key in stale {
        cg.remove(&key).map_err(map_err(name))?;
    }
    Ok(())
}
