//! The host's own unicast addresses, for the XDP judge: a packet that reaches a gateway
//! interface for one of them is the host's to take in, not to forward, and passes
//! (`local_destination`). What the host sends in reply is judged at TC egress like the
//! rest of its traffic. Judged as forwarded traffic instead, by the host's address,
//! which is usually in no region, such packets were dropped whenever a class could
//! claim them.

#![forbid(unsafe_code)]

use std::{collections::BTreeSet, net::IpAddr};

use aya::maps::HashMap;
use datafence_common::{FAMILY_V4, FAMILY_V6, HostAddress, MAX_HOST_ADDRESSES, map_names};

use super::{Datapath, DatapathError, Result, maps::removed_if_absent};

/// The key of `addr` in `HOST_ADDRESSES`.
fn host_address_key(addr: IpAddr) -> HostAddress {
    match addr {
        IpAddr::V4(a) => {
            let mut bytes = [0; 16];
            bytes[..4].copy_from_slice(&a.octets());
            HostAddress::new(FAMILY_V4, bytes)
        }
        IpAddr::V6(a) => HostAddress::new(FAMILY_V6, a.octets()),
    }
}

/// What [`Datapath::set_host_addresses`] changed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostAddressChanges {
    pub added: usize,
    pub removed: usize,
    /// Addresses left out for want of room: past [`MAX_HOST_ADDRESSES`].
    pub left_out: usize,
}

impl Datapath {
    /// Makes `HOST_ADDRESSES` hold exactly `addresses`, up to its capacity: those gone
    /// first, so that their room is free for the new ones, which come after.
    pub fn set_host_addresses(
        &mut self,
        addresses: &BTreeSet<IpAddr>,
    ) -> Result<HostAddressChanges> {
        let name = map_names::HOST_ADDRESSES;
        let map_err = |source| DatapathError::Map { map: name, source };
        let mut map: HashMap<_, HostAddress, u32> =
            HashMap::try_from(self.map_mut(name)?).map_err(map_err)?;
        let held: BTreeSet<HostAddress> = map
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err)?;
        let wanted: BTreeSet<HostAddress> =
            addresses.iter().map(|a| host_address_key(*a)).collect();
        let mut changes = HostAddressChanges::default();
        let mut len = held.len();
        for key in held.difference(&wanted) {
            removed_if_absent(map.remove(key)).map_err(map_err)?;
            changes.removed += 1;
            len -= 1;
        }
        for key in wanted.difference(&held) {
            if len >= MAX_HOST_ADDRESSES as usize {
                changes.left_out += 1;
                continue;
            }
            map.insert(key, 1, 0).map_err(map_err)?;
            changes.added += 1;
            len += 1;
        }
        Ok(changes)
    }
}
