//! The benchmark programs `cargo xtask bench` loads (with [`LoadOptions::bench`]): the
//! baselines and cold-lookup loops, their maps, and running them.
//!
//! [`LoadOptions::bench`]: super::LoadOptions::bench

#![forbid(unsafe_code)]

use std::time::Duration;

use aya::{
    maps::{Array, LpmTrie, MapData, lpm_trie::Key},
    programs::{CgroupAttachMode, CgroupSockAddr, SchedClassifier, TcAttachType},
};
use datafence_common::{map_names, program_names};
use ipnetwork::{Ipv4Network, Ipv6Network};

use super::{
    Datapath, DatapathError, Result, attach::ensure_interface, map_err, program_mut, program_ref,
    test_run_program,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchProgram {
    /// An empty TC program: the floor.
    Empty,
    /// Parses the destination and only looks it up in a kernel LPM trie.
    LpmOnlyV4,
    LpmOnlyV6,
    /// The cold loop without lookups.
    ColdFloor,
    /// The cold loop with LPM-trie lookups of random addresses.
    ColdLpmV4,
    ColdLpmV6,
    /// The cold loop with datafence's own region lookup.
    ColdRegionV4,
    ColdRegionV6,
    /// The TC entry's parse and job post, without its jump.
    ParsePost,
    /// The entry's work and the jump into a stage that only takes the job back
    /// (`bench_handoff_stage`, loaded with it).
    Handoff,
}

impl BenchProgram {
    pub const ALL: [Self; 10] = [
        Self::Empty,
        Self::LpmOnlyV4,
        Self::LpmOnlyV6,
        Self::ColdFloor,
        Self::ColdLpmV4,
        Self::ColdLpmV6,
        Self::ColdRegionV4,
        Self::ColdRegionV6,
        Self::ParsePost,
        Self::Handoff,
    ];

    pub const fn program_name(self) -> &'static str {
        match self {
            Self::Empty => program_names::BENCH_EMPTY,
            Self::LpmOnlyV4 => program_names::BENCH_LPM_V4,
            Self::LpmOnlyV6 => program_names::BENCH_LPM_V6,
            Self::ColdFloor => program_names::BENCH_COLD_FLOOR,
            Self::ColdLpmV4 => program_names::BENCH_COLD_LPM_V4,
            Self::ColdLpmV6 => program_names::BENCH_COLD_LPM_V6,
            Self::ColdRegionV4 => program_names::BENCH_COLD_REGION_V4,
            Self::ColdRegionV6 => program_names::BENCH_COLD_REGION_V6,
            Self::ParsePost => program_names::BENCH_PARSE_POST,
            Self::Handoff => program_names::BENCH_HANDOFF,
        }
    }
}

pub use datafence_common::COLD_LOOKUPS_PER_RUN;

impl Datapath {
    /// Attaches the empty benchmark program to an interface's TC egress hook, as the
    /// end-to-end baseline of `cargo xtask bench`: what the hook costs with nothing in it.
    /// Needs [`LoadOptions::bench`].
    pub fn attach_bench_empty(&mut self, interface: &str) -> Result<()> {
        ensure_interface(interface)?;
        let prog = program_mut::<SchedClassifier>(&mut self.ebpf, program_names::BENCH_EMPTY)?;
        prog.attach(interface, TcAttachType::Egress)
            .map_err(|source| DatapathError::Attach {
                interface: interface.to_owned(),
                source,
            })?;
        Ok(())
    }

    /// Fills the LPM-only baseline tries, and the arrays of random addresses the cold
    /// loops draw from with addresses inside these prefixes (so cold lookups hit, as real
    /// traffic to listed regions would).
    pub fn fill_bench_lpm(
        &mut self,
        v4: &[(Ipv4Network, u32)],
        v6: &[(Ipv6Network, u32)],
    ) -> Result<()> {
        let name = map_names::BENCH_LPM_V4;
        let mut trie: LpmTrie<&mut MapData, [u8; 4], u32> =
            LpmTrie::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for (net, region) in v4 {
            trie.insert(
                &Key::new(u32::from(net.prefix()), net.network().octets()),
                region,
                0,
            )
            .map_err(map_err(name))?;
        }
        let name = map_names::BENCH_LPM_V6;
        let mut trie: LpmTrie<&mut MapData, [u8; 16], u32> =
            LpmTrie::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for (net, region) in v6 {
            trie.insert(
                &Key::new(u32::from(net.prefix()), net.network().octets()),
                region,
                0,
            )
            .map_err(map_err(name))?;
        }
        // A small xorshift: reproducible addresses without a dependency.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let name = map_names::BENCH_ADDRS_V4;
        let mut arr: Array<&mut MapData, [u8; 4]> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for i in 0..datafence_common::BENCH_ADDRS {
            let addr = match v4.get(next() as usize % v4.len().max(1)) {
                Some((net, _)) => {
                    let host_bits = 32 - u32::from(net.prefix());
                    let mask = if host_bits == 0 {
                        0
                    } else {
                        u32::MAX >> (32 - host_bits)
                    };
                    u32::from(net.network()) | (next() as u32 & mask)
                }
                None => next() as u32,
            };
            arr.set(i, addr.to_be_bytes(), 0).map_err(map_err(name))?;
        }
        let name = map_names::BENCH_ADDRS_V6;
        let mut arr: Array<&mut MapData, [u8; 16]> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for i in 0..datafence_common::BENCH_ADDRS {
            let random = (u128::from(next()) << 64) | u128::from(next());
            let addr = match v6.get(next() as usize % v6.len().max(1)) {
                Some((net, _)) => {
                    let host_bits = 128 - u32::from(net.prefix());
                    let mask = if host_bits == 0 {
                        0
                    } else {
                        u128::MAX >> (128 - host_bits)
                    };
                    u128::from(net.network()) | (random & mask)
                }
                None => random,
            };
            arr.set(i, addr.to_be_bytes(), 0).map_err(map_err(name))?;
        }
        Ok(())
    }

    /// Attaches the socket ring's floor, programs that allow every IPv4 connect and
    /// sendmsg, at `cgroup`, for as long as this datapath lives.
    pub fn attach_empty_socket_programs(&mut self, cgroup: &std::path::Path) -> Result<()> {
        let target = std::fs::File::open(cgroup).map_err(|e| DatapathError::SocketRing {
            cgroup: cgroup.to_owned(),
            detail: e.to_string(),
        })?;
        for name in [
            program_names::BENCH_SOCK_CONNECT4,
            program_names::BENCH_SOCK_SENDMSG4,
        ] {
            let program = program_mut::<CgroupSockAddr>(&mut self.ebpf, name)?;
            program.load().map_err(super::program_err(name))?;
            program
                .attach(&target, CgroupAttachMode::Single)
                .map_err(super::program_err(name))?;
        }
        Ok(())
    }

    /// Runs a benchmark program `repeat` times on `frame`; the kernel's mean per run.
    /// Needs a datapath loaded with [`LoadOptions::bench`].
    pub fn bench_run(&self, prog: BenchProgram, frame: &[u8], repeat: u32) -> Result<Duration> {
        let name = prog.program_name();
        let p = program_ref::<SchedClassifier>(&self.ebpf, name)?;
        Ok(test_run_program(p, name, frame, None, repeat)?.1)
    }
}
