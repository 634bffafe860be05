//! The kernel side as the agent sees it: loading the eBPF object, writing a compiled
//! policy into the inactive slot and switching to it, attaching to interfaces, reading
//! counters and events, and running crafted frames through `BPF_PROG_TEST_RUN`.
//!
//! - [`maps`]: the one table of the object's maps (name, kind, pinning, per-slot sizing)
//!   that loading, pinning, capacity checks, usage, slot clearing and metrics read;
//! - [`load`]: loading the object and its stages;
//! - [`tables`]: the region tables' sizes and arrays of maps, made before the load;
//! - [`range_arrays`]: one region table's per-slot arrays, made, filled and freed;
//! - [`pins`]: where pins live in bpffs, and what they hold while no agent runs;
//! - [`reuse`]: a restart adopts the programs an earlier agent of the same build left;
//! - [`slots`]: the two-slot switch: writing, checking and clearing a slot;
//! - [`attach`]: TC (tcx or clsact) and XDP attachment, adopted or new;
//! - [`socket_ring`]: the socket ring's programs at a cgroup, adopted or new;
//! - [`framing`]: whether an interface's frames start with Ethernet or at the IP header;
//! - [`host_addresses`]: the host's own addresses, which a gateway's XDP judge passes;
//! - [`readout`]: counters, statistics, events, memory and `BPF_PROG_TEST_RUN`;
//! - [`bench`]: the benchmark programs `cargo xtask bench` loads (the `bench` feature);
//! - [`sys`]: the raw system calls aya does not offer (all of this module's `unsafe`).

mod attach;
#[cfg(feature = "bench")]
mod bench;
mod error;
mod framing;
mod host_addresses;
mod load;
pub mod maps;
mod pin_lock;
mod pins;
mod range_arrays;
mod readout;
mod reuse;
mod slots;
mod socket_ring;
#[allow(
    unsafe_code,
    reason = "the datapath's unsafe calls live here and only here"
)]
mod sys;
mod tables;

use std::{path::PathBuf, time::Duration};

use aya::{Ebpf, maps::MapError, programs::ProgramError};
use datafence_common::{
    DEFAULT_V4_SLOT_RANGES, DEFAULT_V6_SLOT_RANGES, MAX_V4_SLOT_RANGES, MAX_V6_SLOT_RANGES, stat,
    v4::{V4_LANES, V4_MIN_INDEX_BITS},
    v6::{V6_MIN_INDEX_BITS, V6_NODE_ENTRIES, V6Range},
};

pub use attach::TcKind;
#[cfg(feature = "bench")]
pub use bench::{BenchProgram, COLD_LOOKUPS_PER_RUN};
pub use error::DatapathError;
pub use framing::Framing;
pub use host_addresses::HostAddressChanges;
pub use pin_lock::PinLock;
pub use pins::{PinLayout, PinnedState, link_name, parse_link_name};
pub use slots::{lpm_key_v4, lpm_key_v6};
pub use socket_ring::{SOCKET_PROGRAMS, SOCKET_STAGES};
pub(crate) use sys::tcx_egress_program_ids;
pub use sys::{if_index, if_name};
pub use tables::{Misfit, pinned_tables_misfit};

use crate::{policy::CompiledPolicy, v4table, v6table};

/// The eBPF object built by agent/build.rs.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datafence-ebpf"));

/// The bench's object, built by agent/build.rs from the same source with the benchmark
/// programs and maps added; [`LoadOptions::bench`] loads it instead of [`EBPF_OBJECT`].
#[cfg(feature = "bench")]
pub static EBPF_BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datafence-ebpf-bench"));

/// The rustup toolchain that built [`EBPF_OBJECT`] (agent-ebpf/rust-toolchain.toml, unless
/// overridden for `cargo xtask verifier --toolchain`).
pub const EBPF_BUILT_WITH: &str = env!("DATAFENCE_EBPF_BUILT_WITH");

/// The object's SHA-256, shortened: names the pin directory of its stage arrays.
pub fn object_digest() -> &'static str {
    static DIGEST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DIGEST.get_or_init(|| {
        use sha2::Digest as _;
        hex::encode(&sha2::Sha256::digest(EBPF_OBJECT)[..8])
    })
}

/// How long after a slot switch the old slot stays untouched. A packet reads the active
/// slot once and finishes within microseconds; this leaves a wide margin so no packet can
/// still be walking a slot that is being cleared. The wait falls on the next reload, not
/// on the one that switched: a reload returns as soon as the new policy is in force.
pub const SLOT_GRACE: Duration = Duration::from_millis(20);

type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// Settings fixed when the object is loaded.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// bpffs directory where maps and links are pinned so that enforcement outlives the
    /// agent; `None` for a private datapath (tests, `explain --datapath`) that vanishes
    /// with the process.
    pub pin_dir: Option<PathBuf>,
    /// Index bits of the IPv4 range table (see `datafence_common::v4`).
    pub v4_index_bits: u32,
    /// IPv4 range entries per slot.
    pub v4_slot_ranges: u32,
    /// Index bits of the IPv6 range table (see `datafence_common::v6`).
    pub v6_index_bits: u32,
    /// IPv6 range entries per slot.
    pub v6_slot_ranges: u32,
    /// Make the pinned maps anew instead of reusing them (see
    /// [`pinned_tables_misfit`]): the ones pinned now are moved aside, and go once
    /// the new programs hold every link.
    pub retire_pinned: bool,
    /// Load the bench's object ([`EBPF_BENCH_OBJECT`]) and its benchmark programs as well
    /// (`cargo xtask bench`); only for a private datapath (no `pin_dir`).
    #[cfg(feature = "bench")]
    pub bench: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            pin_dir: None,
            v4_index_bits: V4_MIN_INDEX_BITS,
            v4_slot_ranges: DEFAULT_V4_SLOT_RANGES,
            v6_index_bits: V6_MIN_INDEX_BITS,
            v6_slot_ranges: DEFAULT_V6_SLOT_RANGES,
            retire_pinned: false,
            #[cfg(feature = "bench")]
            bench: false,
        }
    }
}

/// A policy's region tables as the slot writer takes them: where each family's regions
/// change. Built once, they size the datapath at start and are what
/// [`Datapath::apply_built`] writes.
pub struct RegionTables {
    pub v4: v4table::Boundaries,
    pub v6: v6table::Boundaries,
}

impl RegionTables {
    pub fn of(compiled: &CompiledPolicy) -> Self {
        let (v4, v6) = rayon::join(
            || v4table::Boundaries::of(&compiled.regions_v4),
            || v6table::Boundaries::of(&compiled.regions_v6),
        );
        Self { v4, v6 }
    }
}

impl LoadOptions {
    /// Options with the region tables sized for `tables`, and room to grow before a
    /// restart is needed: a quarter more IPv4 ranges (4 bytes each), a sixteenth more
    /// IPv6 ranges (16 bytes each). A slot holds whole array values (IPv4's two-range
    /// lanes, IPv6's four-range nodes), so its size is what the loader will build.
    pub fn sized_for(tables: &RegionTables) -> Self {
        let v4_bits = v4table::index_bits(&tables.v4);
        let v6_bits = v6table::index_bits(&tables.v6);
        Self {
            v4_index_bits: v4_bits,
            v4_slot_ranges: (tables.v4.entries(v4_bits) * 5 / 4)
                .max(DEFAULT_V4_SLOT_RANGES as usize)
                .min(MAX_V4_SLOT_RANGES as usize)
                .next_multiple_of(V4_LANES) as u32,
            v6_index_bits: v6_bits,
            v6_slot_ranges: (tables.v6.entries(v6_bits) * 17 / 16)
                .max(DEFAULT_V6_SLOT_RANGES as usize)
                .min(MAX_V6_SLOT_RANGES as usize)
                .next_multiple_of(V6_NODE_ENTRIES as usize) as u32,
            ..Self::default()
        }
    }
}

/// How an attachment came about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A new link.
    New,
    /// A pinned link, or the clsact filter in datafence's place, from an earlier run now
    /// runs this agent's program: swapped atomically, so enforcement never paused.
    Adopted,
}

/// Violation-event rate limit, per CPU.
#[derive(Clone, Copy, Debug)]
pub struct EventLimits {
    pub per_second: u32,
    pub burst: u32,
}

impl Default for EventLimits {
    fn default() -> Self {
        Self {
            per_second: 1000,
            burst: 1000,
        }
    }
}

/// What a policy switch wrote.
#[derive(Clone, Debug, Default)]
pub struct ApplyReport {
    pub slot: u32,
    pub generation: u32,
    pub regions_v4: usize,
    pub regions_v6: usize,
}

/// The kernel statistics, summed over CPUs: each by its index in [`stat::ALL`], which
/// names it. A statistic added there is read, exported and documented without a field of
/// its own anywhere.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub all: [u64; stat::COUNT as usize],
}

impl Stats {
    /// One statistic (`stat::EVENTS_LOST`, ...).
    pub fn get(&self, index: u32) -> u64 {
        self.all[index as usize]
    }
}

impl Stats {
    /// Each statistic with its name and help text.
    pub fn iter(&self) -> impl Iterator<Item = (stat::Stat, u64)> + '_ {
        stat::ALL.iter().map(|s| (*s, self.all[s.index as usize]))
    }
}

pub struct Datapath {
    ebpf: Ebpf,
    /// The programs an earlier agent of this build left loaded, adopted instead of the
    /// object's (which then stay unloaded); `None` when this agent loaded its own.
    reused: Option<reuse::Reused>,
    pins: Option<PinLayout>,
    /// The region tables, mapped.
    v4: range_arrays::RangeArrays<u32>,
    v6: range_arrays::RangeArrays<V6Range>,
    /// What each slot holds, for map-pressure metrics without walking million-entry maps.
    slot_contents: [maps::SlotContents; 2],
    /// When the active slot last changed, or when this datapath was made: a predecessor
    /// may have switched just before it died.
    slot_switched: std::time::Instant,
    /// How TC egress programs are attached.
    tc_kind: TcKind,
    /// The pin directory's lock, held while this datapath lives.
    _pin_lock: Option<PinLock>,
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

fn program_err(program: &'static str) -> impl FnOnce(ProgramError) -> DatapathError {
    move |source| DatapathError::Program { program, source }
}

impl Datapath {
    /// The TC entry program: adopted, or this agent's own.
    fn tc_entry(&self) -> Result<&aya::programs::SchedClassifier> {
        match self.reused.as_ref().and_then(|r| r.tc.as_ref()) {
            Some(tc) => Ok(tc),
            None => program_ref(&self.ebpf, datafence_common::program_names::TC_EGRESS),
        }
    }

    fn tc_entry_mut(&mut self) -> Result<&mut aya::programs::SchedClassifier> {
        match self.reused.as_mut().and_then(|r| r.tc.as_mut()) {
            Some(tc) => Ok(tc),
            None => program_mut(&mut self.ebpf, datafence_common::program_names::TC_EGRESS),
        }
    }

    /// The XDP entry program: adopted, or this agent's own.
    fn xdp_entry(&self) -> Result<&aya::programs::Xdp> {
        match &self.reused {
            Some(reused) => Ok(&reused.xdp),
            None => program_ref(&self.ebpf, datafence_common::program_names::XDP_GATEWAY),
        }
    }

    fn xdp_entry_mut(&mut self) -> Result<&mut aya::programs::Xdp> {
        match &mut self.reused {
            Some(reused) => Ok(&mut reused.xdp),
            None => program_mut(&mut self.ebpf, datafence_common::program_names::XDP_GATEWAY),
        }
    }

    /// The kernel's view of one of the four programs, by its name in the object.
    fn program_info(&self, name: &'static str) -> Option<aya::programs::ProgramInfo> {
        self.reused
            .as_ref()
            .and_then(|reused| reused.info(name))
            .or_else(|| self.ebpf.program(name)?.info().ok())
    }

    /// Whether this agent adopted the programs of an earlier agent of the same build.
    pub fn adopted_programs(&self) -> bool {
        self.reused.is_some()
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?;
    prog.try_into().map_err(program_err(name))
}

fn program_ref<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a T>
where
    &'a T: TryFrom<&'a aya::programs::Program, Error = ProgramError>,
{
    let prog = ebpf
        .program(name)
        .ok_or(DatapathError::MissingProgram(name))?;
    prog.try_into().map_err(program_err(name))
}

/// Runs `frame` through a program `repeat` times with `BPF_PROG_TEST_RUN`: its return
/// value and the kernel's mean duration.
fn test_run_program<P>(
    prog: &P,
    name: &'static str,
    frame: &[u8],
    ctx_in: Option<&[u8]>,
    repeat: u32,
) -> Result<(u32, Duration)>
where
    P: for<'a> aya::programs::TestRun<
            Opts<'a> = aya::programs::TestRunOptions<'a>,
            Result = aya::TestRunResult,
        >,
{
    let mut out = vec![0u8; frame.len() + 256];
    let r = prog
        .test_run(aya::programs::TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in,
            repeat,
            ..Default::default()
        })
        .map_err(program_err(name))?;
    Ok((r.return_value, r.duration))
}
