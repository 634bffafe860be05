//! The kernel side as the agent sees it: loading the eBPF object, writing a compiled
//! policy into the inactive slot and switching to it, attaching to interfaces, reading
//! counters and events, and running crafted frames through `BPF_PROG_TEST_RUN`.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap as BpfHashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuHashMap,
        RingBuf, lpm_trie::Key,
    },
    programs::{
        ProgramError, SchedClassifier, TcAttachType, TestRun, TestRunOptions, Xdp, XdpMode,
        links::FdLink,
        tc::{self, TcError},
    },
};
use datafence_common::{
    COUNTER_CACHE_SLOTS, CachedCounter, CgroupKey, ClassMask, CounterKey, CounterValue,
    DEFAULT_DIR8_GROUPS, DEFAULT_TABLE_CAPACITY, DEFAULT_V6_ENTRIES, DIR8_LANES, DIR24_ENTRIES,
    DIR24_LANES, Hook, LpmDataV4, LpmDataV6, MAX_CGROUP_ENTRIES, MAX_DIR8_GROUPS,
    MAX_EXEMPT_ENTRIES, MAX_SRC_CIDR_ENTRIES, MAX_V6_ENTRIES, Policy, RegionId, SLOT_PREFIX_BITS,
    SLOTS, ViolationEvent, globals, lpm_data_v4, lpm_data_v6, map_names, program_names, stat,
    v6::{V6_EMPTY_NODE, V6_LOAD_DIVISOR, V6_TREE_NODES, V6Entry, V6LengthNode},
};
use ipnetwork::{Ipv4Network, Ipv6Network};

use std::os::fd::AsFd as _;

use crate::{
    dir24,
    policy::CompiledPolicy,
    v6table::{self, V6Table},
};

/// The eBPF object built by agent/build.rs.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datafence-ebpf"));

/// How long the agent waits after switching slots before it may rewrite the old one.
/// A packet reads the active slot once and finishes within microseconds; this leaves a
/// wide margin so no packet can still be walking a slot that is being cleared.
pub const SLOT_GRACE: Duration = Duration::from_millis(20);

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    #[error("map {map} is full: the policy needs {needed} entries, it holds {capacity}")]
    MapFull {
        map: &'static str,
        needed: usize,
        capacity: u32,
    },
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("interface {interface}: {source}")]
    Attach {
        interface: String,
        #[source]
        source: ProgramError,
    },
    #[error("interface {interface}: adding the clsact qdisc: {source}")]
    Clsact {
        interface: String,
        #[source]
        source: TcError,
    },
    #[error("interface {0} does not exist")]
    UnknownInterface(String),
    #[error("map {map}: mapping it into memory: {source}")]
    Mmap {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the IPv4 table needs {needed} groups for /24s that hold longer prefixes; it has {capacity} (raise --dir8-groups, up to {max})"
    )]
    Dir8Full {
        needed: usize,
        capacity: usize,
        max: u32,
    },
    #[error(
        "the IPv6 table needs {needed} entries (prefixes and search markers); it has {capacity} (raise --v6-entries, up to {max})"
    )]
    V6Full {
        needed: usize,
        capacity: u32,
        max: u32,
    },
    #[error(
        "the IPv6 table could not place its {entries} entries in {places} places within the scan limit (raise --v6-entries)"
    )]
    V6Crowded { entries: usize, places: usize },
    #[error("creating the pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("interface {interface}: the link cannot be pinned: {source}")]
    Link {
        interface: String,
        #[source]
        source: aya::programs::links::LinkError,
    },
}

/// Counters summed over CPUs.
/// Every counter, summed over CPUs: the keys each CPU's cache holds and the keys that
/// overflowed into the hash. One key may be in both (its place was taken on one CPU).
fn read_counters(hash: &Map, cache: &Map) -> Result<Vec<(CounterKey, CounterValue)>> {
    let mut sums: std::collections::BTreeMap<CounterKey, CounterValue> = Default::default();
    let mut add = |key: CounterKey, v: &CounterValue| {
        let sum = sums.entry(key).or_default();
        sum.packets += v.packets;
        sum.bytes += v.bytes;
    };
    let name = map_names::COUNTERS;
    let map: PerCpuHashMap<&MapData, CounterKey, CounterValue> =
        PerCpuHashMap::try_from(hash).map_err(map_err(name))?;
    for item in map.iter() {
        let (key, per_cpu) = item.map_err(map_err(name))?;
        for v in per_cpu.iter() {
            add(key, v);
        }
    }
    let name = map_names::COUNTER_CACHE;
    let map: PerCpuArray<&MapData, CachedCounter> =
        PerCpuArray::try_from(cache).map_err(map_err(name))?;
    for slot in 0..COUNTER_CACHE_SLOTS {
        for c in map.get(&slot, 0).map_err(map_err(name))?.iter() {
            // A place being claimed right now may show its claim before its key on a
            // weakly ordered CPU; no real key has interface 0.
            if c.claimed != 0 && c.key.ifindex != 0 {
                add(c.key, &c.value);
            }
        }
    }
    Ok(sums.into_iter().collect())
}

fn read_stats(map: &Map) -> Result<Stats> {
    let name = map_names::STATS;
    let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(map).map_err(map_err(name))?;
    let sum = |i: u32| -> Result<u64> { Ok(map.get(&i, 0).map_err(map_err(name))?.iter().sum()) };
    Ok(Stats {
        events_lost: sum(stat::EVENTS_LOST)?,
        events_suppressed: sum(stat::EVENTS_SUPPRESSED)?,
        counter_map_full: sum(stat::COUNTER_MAP_FULL)?,
    })
}

/// What the kernel keeps enforcing while no agent runs, read from the pinned maps.
pub struct PinnedState {
    pub counters: Vec<(CounterKey, CounterValue)>,
    pub stats: Stats,
    pub generation: u32,
    /// Links pinned, as `<hook>-<interface>`.
    pub links: Vec<String>,
}

impl PinLayout {
    pub fn read(&self) -> Result<PinnedState> {
        let open = |name: &'static str| -> Result<MapData> {
            MapData::from_pin(self.map(name)).map_err(map_err(name))
        };
        let counters = read_counters(
            &Map::PerCpuHashMap(open(map_names::COUNTERS)?),
            &Map::PerCpuArray(open(map_names::COUNTER_CACHE)?),
        )?;
        let stats = read_stats(&Map::PerCpuArray(open(map_names::STATS)?))?;
        let active = Map::Array(open(map_names::ACTIVE_SLOT)?);
        let active: Array<&MapData, u32> =
            Array::try_from(&active).map_err(map_err(map_names::ACTIVE_SLOT))?;
        let slot = active.get(&0, 0).map_err(map_err(map_names::ACTIVE_SLOT))? & 1;
        let policy = Map::Array(open(map_names::POLICY)?);
        let policy: Array<&MapData, Policy> =
            Array::try_from(&policy).map_err(map_err(map_names::POLICY))?;
        let generation = policy
            .get(&slot, 0)
            .map_err(map_err(map_names::POLICY))?
            .header
            .generation;
        let mut links: Vec<String> = std::fs::read_dir(self.links_dir())
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        links.sort();
        Ok(PinnedState {
            counters,
            stats,
            generation,
            links,
        })
    }
}

/// Array values that hold `entries` table entries, `per_value` to a value (at least one).
fn values(entries: u32, per_value: usize) -> u32 {
    entries.div_ceil(per_value as u32).max(1)
}

/// Where bpffs is normally mounted; systemd does it at boot.
const BPFFS: &str = "/sys/fs/bpf";

/// Makes sure `dir` lies on a bpf filesystem, mounting one at /sys/fs/bpf when a host
/// has none (minimal images and containers). Pins anywhere else must already be bpffs.
fn ensure_bpffs(dir: &Path) -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let on_bpffs = mounts.lines().any(|line| {
        let mut cols = line.split_whitespace();
        let (_, point, fstype) = (cols.next(), cols.next(), cols.next());
        fstype == Some("bpf") && point.is_some_and(|p| dir.starts_with(p))
    });
    if on_bpffs {
        return Ok(());
    }
    let not_bpffs = |source| DatapathError::PinDir {
        path: dir.to_owned(),
        source,
    };
    if !dir.starts_with(BPFFS) {
        return Err(not_bpffs(std::io::Error::other(format!(
            "not on a bpf filesystem; mount one (mount -t bpf bpf {BPFFS}) and pin below it"
        ))));
    }
    let cstr = |s: &str| std::ffi::CString::new(s).expect("no NUL in constant");
    let (source, target, fstype, opts) = (cstr("bpf"), cstr(BPFFS), cstr("bpf"), cstr("mode=0700"));
    // SAFETY: plain mount(2) with valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            opts.as_ptr().cast(),
        )
    };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        return Err(not_bpffs(std::io::Error::other(format!(
            "no bpf filesystem at {BPFFS} and mounting one failed ({e}); mount it with `mount -t bpf bpf {BPFFS}`"
        ))));
    }
    tracing::info!(mount = BPFFS, "mounted the bpf filesystem");
    Ok(())
}

/// Opens the pinned link and detaches it with `BPF_LINK_DETACH`: the program is off its
/// hook when this returns. (aya keeps a link's fd private, hence the bare syscalls.)
fn detach_pinned_link(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_LINK_DETACH: libc::c_long = 34;
    let cpath =
        std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // bpf_attr.obj_get: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut get = [0u64; 2];
    get[0] = cpath.as_ptr() as u64;
    // SAFETY: bpf(2) with a correctly laid out attr pointing at `cpath`, alive for the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, BPF_OBJ_GET, get.as_mut_ptr(), 16) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut detach = [0u32; 4];
    detach[0] = fd as u32;
    // SAFETY: bpf(2) with an attr holding only the link fd opened above.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, BPF_LINK_DETACH, detach.as_mut_ptr(), 16) };
    let result = if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    };
    // SAFETY: closing the fd opened above.
    unsafe { libc::close(fd as i32) };
    result
}

/// Opens a link pinned by an earlier agent, if there is one.
fn adopt_link(path: &Path) -> Option<FdLink> {
    let pinned = aya::programs::links::PinnedLink::from_pin(path).ok()?;
    // The pin stays in place: it is what keeps the link alive after this agent exits.
    Some(FdLink::from(pinned))
}

/// Entries of one slot in an LPM map; 0 when the map is missing.
fn count_lpm<K, V>(map: Option<&Map>, slot: u32) -> usize
where
    K: aya::Pod + AsRef<[u8]>,
    V: aya::Pod,
{
    let Some(map) = map else { return 0 };
    let Ok(trie) = LpmTrie::<&MapData, K, V>::try_from(map) else {
        return 0;
    };
    let slot_bytes = slot.to_be_bytes();
    trie.keys()
        .filter_map(std::result::Result::ok)
        .filter(|k| k.data().as_ref()[..4] == slot_bytes)
        .count()
}

type Result<T, E = DatapathError> = std::result::Result<T, E>;

/// Settings fixed when the object is loaded.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Region prefixes per address family and per slot.
    pub table_capacity: u32,
    /// bpffs directory where maps and links are pinned so that enforcement outlives the
    /// agent; `None` for a private datapath (tests, `explain --datapath`) that vanishes
    /// with the process.
    pub pin_dir: Option<PathBuf>,
    /// How IPv4 regions are looked up.
    pub v4_table: V4Table,
    /// DIR-24-8 groups per slot for /24s holding longer prefixes.
    pub dir8_groups: u32,
    /// IPv6 table entries per slot: prefixes and search markers.
    pub v6_entries: u32,
    /// Also load the benchmark programs (`cargo xtask bench`).
    pub bench: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            table_capacity: DEFAULT_TABLE_CAPACITY,
            pin_dir: None,
            v4_table: V4Table::Dir24,
            dir8_groups: DEFAULT_DIR8_GROUPS,
            v6_entries: DEFAULT_V6_ENTRIES,
            bench: false,
        }
    }
}

/// The IPv4 region table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum V4Table {
    /// DIR-24-8: constant-time lookups; 128 MiB of table (both slots) plus 256 bytes per
    /// group and slot.
    Dir24,
    /// The kernel LPM trie: small for small policies, slower as they grow.
    Trie,
}

/// Baselines and cold-lookup loops for `cargo xtask bench`.
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
}

impl BenchProgram {
    pub const ALL: [Self; 8] = [
        Self::Empty,
        Self::LpmOnlyV4,
        Self::LpmOnlyV6,
        Self::ColdFloor,
        Self::ColdLpmV4,
        Self::ColdLpmV6,
        Self::ColdRegionV4,
        Self::ColdRegionV6,
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
        }
    }
}

pub use datafence_common::COLD_LOOKUPS_PER_RUN;

/// Where the pinned objects of one datafence installation live. The map directory
/// carries the ABI version, so an agent never adopts maps of an incompatible layout.
#[derive(Clone, Debug)]
pub struct PinLayout {
    pub root: PathBuf,
}

impl PinLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.root
            .join(format!("v{}", datafence_common::ABI_VERSION))
            .join("maps")
    }

    pub fn map(&self, name: &str) -> PathBuf {
        self.maps_dir().join(name)
    }

    pub fn links_dir(&self) -> PathBuf {
        self.root.join("links")
    }

    pub fn link(&self, hook: Hook, interface: &str) -> PathBuf {
        self.links_dir()
            .join(format!("{}-{interface}", hook.as_str()))
    }

    /// Maps that are pinned: every map the programs use.
    pub const MAPS: [&'static str; 18] = [
        map_names::COUNTER_CACHE,
        map_names::DIR24,
        map_names::DIR8,
        map_names::V6_LENGTHS,
        map_names::ACTIVE_SLOT,
        map_names::POLICY,
        map_names::REGIONS_V4,
        map_names::REGIONS_V6,
        map_names::EXEMPT_V4,
        map_names::EXEMPT_V6,
        map_names::SRC_V4,
        map_names::SRC_V6,
        map_names::CGROUP_CLASSES,
        map_names::COUNTERS,
        map_names::STATS,
        map_names::EVENTS,
        map_names::RATE_LIMIT,
        "FRAME",
    ];

    /// Whether anything is pinned here (an agent ran, or is running).
    pub fn exists(&self) -> bool {
        self.maps_dir().join(map_names::POLICY).exists()
    }

    /// Removes every pinned link (which detaches the programs) and every pinned map.
    /// Returns the links removed.
    pub fn remove_all(&self) -> std::io::Result<Vec<String>> {
        let mut detached = Vec::new();
        if let Ok(entries) = std::fs::read_dir(self.links_dir()) {
            for entry in entries.flatten() {
                // Detach first, so the program is off the hook when this returns; dropping
                // the last reference (the pin) would detach it only once the kernel gets
                // round to freeing the link.
                let _ = detach_pinned_link(&entry.path());
                std::fs::remove_file(entry.path())?;
                detached.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        let _ = std::fs::remove_dir(self.links_dir());
        if let Ok(entries) = std::fs::read_dir(self.maps_dir()) {
            for entry in entries.flatten() {
                std::fs::remove_file(entry.path())?;
            }
        }
        let _ = std::fs::remove_dir(self.maps_dir());
        if let Some(parent) = self.maps_dir().parent() {
            let _ = std::fs::remove_dir(parent);
        }
        let _ = std::fs::remove_dir(&self.root);
        detached.sort();
        Ok(detached)
    }

    /// Unpins the maps an agent of another datapath ABI left (`v<N>/` other than this
    /// one's). Called once this agent's programs hold the pinned links: the old maps then
    /// serve no program, or only ones still attached, which keep them alive until they
    /// go. Without this an upgrade would leave the old tables in kernel memory until
    /// `datafence detach`. Returns the directories removed.
    pub fn remove_other_abi_versions(&self) -> std::io::Result<Vec<PathBuf>> {
        let current = format!("v{}", datafence_common::ABI_VERSION);
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Ok(removed);
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_abi_dir = name
                .strip_prefix('v')
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
            if !is_abi_dir || name == current {
                continue;
            }
            // bpffs directories hold only pins and directories; removing the pins drops
            // the filesystem's references, not the programs'.
            std::fs::remove_dir_all(entry.path())?;
            removed.push(entry.path());
        }
        Ok(removed)
    }
}

/// How an attachment came about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// A new link.
    New,
    /// A pinned link from an earlier run now runs this agent's program: swapped
    /// atomically, so enforcement never paused.
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

/// Summed counters.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub events_lost: u64,
    pub events_suppressed: u64,
    pub counter_map_full: u64,
}

pub struct Datapath {
    ebpf: Ebpf,
    table_capacity: u32,
    pins: Option<PinLayout>,
    v4_table: V4Table,
    /// The DIR-24-8 arrays, mapped: all slots' top-level entries, and all slots' groups.
    dir24: Option<(dir24::MappedArray<u32>, dir24::MappedArray<u8>)>,
    dir8_groups: u32,
    /// log2 of the `REGIONS_V6` places per slot; the slot holds half as many entries.
    v6_bits: u32,
    /// `REGIONS_V6`, mapped: all slots' places.
    v6_table: dir24::MappedArray<V6Entry>,
    /// What each slot holds, for map-pressure metrics without walking million-entry maps.
    slot_contents: [SlotContents; 2],
}

/// Entries one policy slot holds in the shared maps.
#[derive(Clone, Copy, Debug, Default)]
struct SlotContents {
    regions_v4: usize,
    regions_v6: usize,
    exempt_v4: usize,
    exempt_v6: usize,
    src_v4: usize,
    src_v6: usize,
    cgroups: usize,
    dir8_groups: usize,
}

impl SlotContents {
    fn of(c: &CompiledPolicy) -> Self {
        Self {
            regions_v4: c.regions_v4.len(),
            regions_v6: c.regions_v6.len(),
            exempt_v4: c.exempt_v4.len(),
            exempt_v6: c.exempt_v6.len(),
            src_v4: c.src_v4.len(),
            src_v6: c.src_v6.len(),
            cgroups: c.cgroups.len(),
            dir8_groups: 0,
        }
    }
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

fn program_err(program: &'static str) -> impl FnOnce(ProgramError) -> DatapathError {
    move |source| DatapathError::Program { program, source }
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

impl Datapath {
    /// Loads the object and both programs into the kernel, without attaching anything.
    pub fn load(opts: &LoadOptions) -> Result<Self> {
        let per_family = SLOTS.saturating_mul(opts.table_capacity);
        let pins = opts.pin_dir.as_ref().map(PinLayout::new);
        // Adopted maps keep the sizes and layout they were made with; the programs must
        // be told the same.
        let adopted = |name: &str| {
            pins.as_ref()
                .and_then(|p| aya::maps::MapInfo::from_pin(p.map(name)).ok())
                .map(|i| i.max_entries())
        };
        let v4_table = match adopted(map_names::DIR24) {
            Some(1) => V4Table::Trie,
            Some(_) => V4Table::Dir24,
            None => opts.v4_table,
        };
        let dir8_groups = match adopted(map_names::DIR8) {
            Some(n) if v4_table == V4Table::Dir24 => n * DIR8_LANES as u32 / (SLOTS * 256),
            _ => opts.dir8_groups.min(MAX_DIR8_GROUPS),
        };
        let v6_bits = match adopted(map_names::REGIONS_V6) {
            Some(n) => (n / SLOTS).trailing_zeros(),
            None => (opts.v6_entries.clamp(8, MAX_V6_ENTRIES) * V6_LOAD_DIVISOR)
                .next_power_of_two()
                .trailing_zeros(),
        };
        let (top_entries, group_entries) = match v4_table {
            V4Table::Dir24 => (SLOTS * DIR24_ENTRIES, SLOTS * dir8_groups * 256),
            // The trie serves IPv4; the arrays shrink to nothing.
            V4Table::Trie => (1, 1),
        };
        let v4_dir24 = u8::from(v4_table == V4Table::Dir24);
        let mut loader = EbpfLoader::new();
        loader
            .map_max_entries(map_names::REGIONS_V4, per_family)
            .map_max_entries(map_names::REGIONS_V6, SLOTS << v6_bits)
            .map_max_entries(map_names::DIR24, values(top_entries, DIR24_LANES))
            .map_max_entries(map_names::DIR8, values(group_entries, DIR8_LANES))
            .override_global(globals::V4_DIR24, &v4_dir24, true)
            .override_global(globals::DIR8_GROUPS, &dir8_groups, true)
            .override_global(globals::V6_TABLE_BITS, &v6_bits, true);
        if !opts.bench {
            // The benchmark maps live in the object but only `cargo xtask bench` uses them.
            for name in [
                "BENCH_LPM_V4",
                "BENCH_LPM_V6",
                "BENCH_ADDRS_V4",
                "BENCH_ADDRS_V6",
            ] {
                loader.map_max_entries(name, 1);
            }
        }
        let map_paths: Vec<(&'static str, PathBuf)> = match &pins {
            Some(layout) => {
                ensure_bpffs(&layout.root)?;
                for dir in [layout.maps_dir(), layout.links_dir()] {
                    std::fs::create_dir_all(&dir).map_err(|source| DatapathError::PinDir {
                        path: dir.clone(),
                        source,
                    })?;
                }
                PinLayout::MAPS
                    .iter()
                    .map(|name| (*name, layout.map(name)))
                    .collect()
            }
            None => Vec::new(),
        };
        // Pinned maps that exist are reused as they are: the policy in force, its counters
        // and queued events carry over to this agent.
        for (name, path) in &map_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        program_mut::<SchedClassifier>(&mut ebpf, program_names::TC_EGRESS)?
            .load()
            .map_err(program_err(program_names::TC_EGRESS))?;
        program_mut::<Xdp>(&mut ebpf, program_names::XDP_GATEWAY)?
            .load()
            .map_err(program_err(program_names::XDP_GATEWAY))?;
        if opts.bench {
            for prog in BenchProgram::ALL {
                let name = prog.program_name();
                program_mut::<SchedClassifier>(&mut ebpf, name)?
                    .load()
                    .map_err(program_err(name))?;
            }
        }
        fn map<T: Copy>(
            ebpf: &Ebpf,
            name: &'static str,
            entries: u32,
        ) -> Result<dir24::MappedArray<T>> {
            match ebpf.map(name) {
                Some(Map::Array(data)) => {
                    dir24::MappedArray::map(&data.fd().as_fd(), entries as usize)
                        .map_err(|source| DatapathError::Mmap { map: name, source })
                }
                _ => Err(DatapathError::MissingMap(name)),
            }
        }
        let v6_table = map::<V6Entry>(&ebpf, map_names::REGIONS_V6, SLOTS << v6_bits)?;
        let dir24 = match v4_table {
            V4Table::Dir24 => Some((
                map::<u32>(&ebpf, map_names::DIR24, top_entries)?,
                map::<u8>(&ebpf, map_names::DIR8, group_entries)?,
            )),
            V4Table::Trie => None,
        };
        let mut dp = Self {
            ebpf,
            table_capacity: opts.table_capacity,
            pins,
            v4_table,
            dir24,
            dir8_groups,
            v6_bits,
            v6_table,
            slot_contents: [SlotContents::default(); 2],
        };
        if dp.pins.is_some() {
            dp.adopt_sizes()?;
        }
        Ok(dp)
    }

    /// Learns the real size and contents of adopted maps, which an earlier agent may have
    /// created with another table capacity.
    fn adopt_sizes(&mut self) -> Result<()> {
        let name = map_names::REGIONS_V4;
        let max = match self.map(name)? {
            Map::LpmTrie(data) => data.info().map_err(map_err(name))?.max_entries(),
            _ => return Err(DatapathError::MissingMap(name)),
        };
        self.table_capacity = max / SLOTS;
        for slot in 0..SLOTS {
            let v6_used = self.v6_slot(slot).iter().filter(|e| e[2] != 0).count();
            let c = &mut self.slot_contents[slot as usize];
            c.regions_v4 =
                count_lpm::<LpmDataV4, RegionId>(self.ebpf.map(map_names::REGIONS_V4), slot);
            c.regions_v6 = v6_used;
            c.exempt_v4 = count_lpm::<LpmDataV4, u32>(self.ebpf.map(map_names::EXEMPT_V4), slot);
            c.exempt_v6 = count_lpm::<LpmDataV6, u32>(self.ebpf.map(map_names::EXEMPT_V6), slot);
            c.src_v4 = count_lpm::<LpmDataV4, ClassMask>(self.ebpf.map(map_names::SRC_V4), slot);
            c.src_v6 = count_lpm::<LpmDataV6, ClassMask>(self.ebpf.map(map_names::SRC_V6), slot);
        }
        Ok(())
    }

    /// How IPv4 regions are looked up (adopted maps decide, not the options).
    pub fn v4_table(&self) -> V4Table {
        self.v4_table
    }

    pub fn pins(&self) -> Option<&PinLayout> {
        self.pins.as_ref()
    }

    fn map(&self, name: &'static str) -> Result<&Map> {
        self.ebpf.map(name).ok_or(DatapathError::MissingMap(name))
    }

    fn map_mut(&mut self, name: &'static str) -> Result<&mut Map> {
        self.ebpf
            .map_mut(name)
            .ok_or(DatapathError::MissingMap(name))
    }

    /// The slot the programs read now.
    pub fn active_slot(&self) -> Result<u32> {
        let name = map_names::ACTIVE_SLOT;
        let arr: Array<&MapData, u32> = Array::try_from(self.map(name)?).map_err(map_err(name))?;
        Ok(arr.get(&0, 0).map_err(map_err(name))? & 1)
    }

    /// The policy header and classes in a slot.
    pub fn policy_in_slot(&self, slot: u32) -> Result<Policy> {
        let name = map_names::POLICY;
        let arr: Array<&MapData, Policy> =
            Array::try_from(self.map(name)?).map_err(map_err(name))?;
        arr.get(&slot, 0).map_err(map_err(name))
    }

    /// Writes `compiled` into the inactive slot, then makes it active in one map write.
    /// On any error the active slot is untouched, so the last good policy stays in force.
    pub fn apply(&mut self, compiled: &CompiledPolicy, events: EventLimits) -> Result<ApplyReport> {
        self.apply_built(compiled, &v6table::build(&compiled.regions_v6), events)
    }

    /// [`Self::apply`] with the policy's IPv6 table already built (`v6table::build` of
    /// `compiled.regions_v6`), for a caller that built it to size the datapath.
    pub fn apply_built(
        &mut self,
        compiled: &CompiledPolicy,
        v6: &V6Table,
        events: EventLimits,
    ) -> Result<ApplyReport> {
        let active = self.active_slot()?;
        let target = 1 - active;
        let generation = self
            .policy_in_slot(active)?
            .header
            .generation
            .wrapping_add(1);
        self.check_capacity(compiled)?;
        if v6.entries() > self.v6_capacity() as usize {
            return Err(DatapathError::V6Full {
                needed: v6.entries(),
                capacity: self.v6_capacity(),
                max: MAX_V6_ENTRIES,
            });
        }
        self.clear_slot(target)?;
        self.slot_contents[target as usize] = SlotContents::default();
        let placement = match self.fill_slot(target, compiled, v6) {
            Ok(p) => p,
            Err(err) => {
                // Leave nothing half-written behind; the error that matters is the first.
                let _ = self.clear_slot(target);
                return Err(err);
            }
        };
        let groups = self.slot_contents[target as usize].dir8_groups;
        self.slot_contents[target as usize] = SlotContents {
            dir8_groups: groups,
            regions_v6: v6.entries(),
            ..SlotContents::of(compiled)
        };
        let mut policy = compiled.policy;
        policy.header.loaded = 1;
        policy.header.generation = generation;
        policy.header.events_per_sec = events.per_second;
        policy.header.events_burst = events.burst;
        policy.header.v6_seed = placement.seed;
        policy.header.v6_scan = placement.scan;
        let name = map_names::POLICY;
        let mut arr: Array<&mut MapData, Policy> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        arr.set(target, policy, 0).map_err(map_err(name))?;
        let name = map_names::ACTIVE_SLOT;
        let mut arr: Array<&mut MapData, u32> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        arr.set(0, target, 0).map_err(map_err(name))?;
        std::thread::sleep(SLOT_GRACE);
        Ok(ApplyReport {
            slot: target,
            generation,
            regions_v4: compiled.regions_v4.len(),
            regions_v6: compiled.regions_v6.len(),
        })
    }

    fn check_capacity(&self, c: &CompiledPolicy) -> Result<()> {
        // The IPv6 table is checked in `apply_built`, with its markers counted.
        let checks: [(&'static str, usize, u32); 6] = [
            (
                map_names::REGIONS_V4,
                c.regions_v4.len(),
                self.table_capacity,
            ),
            (
                map_names::EXEMPT_V4,
                c.exempt_v4.len(),
                MAX_EXEMPT_ENTRIES / SLOTS,
            ),
            (
                map_names::EXEMPT_V6,
                c.exempt_v6.len(),
                MAX_EXEMPT_ENTRIES / SLOTS,
            ),
            (
                map_names::SRC_V4,
                c.src_v4.len(),
                MAX_SRC_CIDR_ENTRIES / SLOTS,
            ),
            (
                map_names::SRC_V6,
                c.src_v6.len(),
                MAX_SRC_CIDR_ENTRIES / SLOTS,
            ),
            (
                map_names::CGROUP_CLASSES,
                c.cgroups.len(),
                MAX_CGROUP_ENTRIES / SLOTS,
            ),
        ];
        for (map, needed, capacity) in checks {
            if needed > capacity as usize {
                return Err(DatapathError::MapFull {
                    map,
                    needed,
                    capacity,
                });
            }
        }
        Ok(())
    }

    /// IPv6 entries a slot can hold.
    fn v6_capacity(&self) -> u32 {
        (1u32 << self.v6_bits) / V6_LOAD_DIVISOR
    }

    /// The range of one slot's places in the IPv6 table.
    fn v6_range(&self, slot: u32) -> std::ops::Range<usize> {
        let places = 1usize << self.v6_bits;
        let s = slot as usize;
        s * places..(s + 1) * places
    }

    fn v6_slot(&self, slot: u32) -> &[V6Entry] {
        &self.v6_table.as_slice()[self.v6_range(slot)]
    }

    fn v6_slot_mut(&mut self, slot: u32) -> &mut [V6Entry] {
        let range = self.v6_range(slot);
        &mut self.v6_table.as_mut_slice()[range]
    }

    fn fill_slot(
        &mut self,
        slot: u32,
        c: &CompiledPolicy,
        v6: &V6Table,
    ) -> Result<v6table::Placement> {
        match &mut self.dir24 {
            Some((top, groups)) => {
                let top_slot = DIR24_ENTRIES as usize;
                let group_slot = self.dir8_groups as usize * 256;
                let s = slot as usize;
                let top = &mut top.as_mut_slice()[s * top_slot..(s + 1) * top_slot];
                let groups = &mut groups.as_mut_slice()[s * group_slot..(s + 1) * group_slot];
                let used = dir24::fill(top, groups, &c.regions_v4).map_err(|e| {
                    DatapathError::Dir8Full {
                        needed: e.needed,
                        capacity: e.capacity,
                        max: MAX_DIR8_GROUPS,
                    }
                })?;
                self.slot_contents[s].dir8_groups = used;
            }
            None => insert_v4(
                self.map_mut(map_names::REGIONS_V4)?,
                map_names::REGIONS_V4,
                slot,
                &c.regions_v4,
            )?,
        }
        let placement =
            v6table::place(self.v6_slot_mut(slot), v6).map_err(|e| DatapathError::V6Crowded {
                entries: e.entries,
                places: e.places,
            })?;
        self.write_v6_nodes(slot, &v6.nodes)?;
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
        Ok(placement)
    }

    /// Writes a slot's IPv6 search tree.
    fn write_v6_nodes(&mut self, slot: u32, nodes: &[V6LengthNode]) -> Result<()> {
        let name = map_names::V6_LENGTHS;
        let mut arr: Array<&mut MapData, V6LengthNode> =
            Array::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        for (i, node) in nodes.iter().enumerate() {
            arr.set(slot * V6_TREE_NODES + i as u32, node, 0)
                .map_err(map_err(name))?;
        }
        Ok(())
    }

    /// Removes every entry a slot owns from the shared tables.
    fn clear_slot(&mut self, slot: u32) -> Result<()> {
        clear_lpm::<LpmDataV4, RegionId>(
            self.map_mut(map_names::REGIONS_V4)?,
            map_names::REGIONS_V4,
            slot,
        )?;
        self.write_v6_nodes(slot, &[V6_EMPTY_NODE; V6_TREE_NODES as usize])?;
        self.v6_slot_mut(slot).fill([0; 3]);
        clear_lpm::<LpmDataV4, u32>(
            self.map_mut(map_names::EXEMPT_V4)?,
            map_names::EXEMPT_V4,
            slot,
        )?;
        clear_lpm::<LpmDataV6, u32>(
            self.map_mut(map_names::EXEMPT_V6)?,
            map_names::EXEMPT_V6,
            slot,
        )?;
        clear_lpm::<LpmDataV4, ClassMask>(
            self.map_mut(map_names::SRC_V4)?,
            map_names::SRC_V4,
            slot,
        )?;
        clear_lpm::<LpmDataV6, ClassMask>(
            self.map_mut(map_names::SRC_V6)?,
            map_names::SRC_V6,
            slot,
        )?;
        let name = map_names::CGROUP_CLASSES;
        let mut cg: BpfHashMap<&mut MapData, CgroupKey, ClassMask> =
            BpfHashMap::try_from(self.map_mut(name)?).map_err(map_err(name))?;
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

    /// Attaches the TC egress program to `interface`: through tcx where the kernel has it,
    /// else through a clsact qdisc. With pinning, a link pinned by an earlier agent is
    /// switched to this program atomically instead of attaching a second time.
    pub fn attach_tc(&mut self, interface: &str) -> Result<Attached> {
        ensure_interface(interface)?;
        let attach_err = |source| DatapathError::Attach {
            interface: interface.to_owned(),
            source,
        };
        let pin = self
            .pins
            .as_ref()
            .map(|p| p.link(Hook::TcEgress, interface));
        let prog = program_mut::<SchedClassifier>(&mut self.ebpf, program_names::TC_EGRESS)?;
        if let Some(path) = &pin
            && let Some(old) = adopt_link(path)
        {
            if let Ok(link) = aya::programs::tc::SchedClassifierLink::try_from(old)
                && prog.attach_to_link(link).is_ok()
            {
                return Ok(Attached::Adopted);
            }
            // Detached by someone else, or not ours: replace it with a fresh link.
            let _ = std::fs::remove_file(path);
        }
        if !tcx_supported() {
            match tc::qdisc_add_clsact(interface) {
                Ok(()) => {}
                Err(TcError::IoError(e)) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(source) => {
                    return Err(DatapathError::Clsact {
                        interface: interface.to_owned(),
                        source,
                    });
                }
            }
        }
        let id = prog
            .attach(interface, TcAttachType::Egress)
            .map_err(attach_err)?;
        if let Some(path) = pin {
            let link = prog.take_link(id).map_err(attach_err)?;
            let fd: FdLink = link.try_into().map_err(|source| DatapathError::Link {
                interface: interface.to_owned(),
                source,
            })?;
            fd.pin(&path)
                .map_err(|source| DatapathError::Pin { path, source })?;
        }
        Ok(Attached::New)
    }

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

    /// Attaches the XDP program to a gateway interface; pinned links are adopted as for
    /// [`Self::attach_tc`].
    pub fn attach_xdp(&mut self, interface: &str) -> Result<Attached> {
        ensure_interface(interface)?;
        let attach_err = |source| DatapathError::Attach {
            interface: interface.to_owned(),
            source,
        };
        let pin = self.pins.as_ref().map(|p| p.link(Hook::Xdp, interface));
        let prog = program_mut::<Xdp>(&mut self.ebpf, program_names::XDP_GATEWAY)?;
        if let Some(path) = &pin
            && let Some(old) = adopt_link(path)
        {
            if let Ok(link) = aya::programs::xdp::XdpLink::try_from(old)
                && prog.attach_to_link(link).is_ok()
            {
                return Ok(Attached::Adopted);
            }
            let _ = std::fs::remove_file(path);
        }
        let id = prog
            .attach(interface, XdpMode::Default)
            .map_err(attach_err)?;
        if let Some(path) = pin {
            let link = prog.take_link(id).map_err(attach_err)?;
            let fd: FdLink = link.try_into().map_err(|source| DatapathError::Link {
                interface: interface.to_owned(),
                source,
            })?;
            fd.pin(&path)
                .map_err(|source| DatapathError::Pin { path, source })?;
        }
        Ok(Attached::New)
    }

    /// Runs one frame through a program with `BPF_PROG_TEST_RUN`; returns whether the
    /// program let it pass.
    pub fn test_run(&self, hook: Hook, frame: &[u8], mark: u32) -> Result<bool> {
        self.test_run_repeat(hook, frame, mark, 1)
            .map(|(pass, _)| pass)
    }

    /// Like [`Self::test_run`], `repeat` times in the kernel; also returns the mean
    /// duration the kernel measured.
    pub fn test_run_repeat(
        &self,
        hook: Hook,
        frame: &[u8],
        mark: u32,
        repeat: u32,
    ) -> Result<(bool, Duration)> {
        // The kernel accepts a partial __sk_buff; `len` and `pkt_type` must be zero and
        // `mark` is the third u32.
        let mut skb_ctx = [0u8; 12];
        skb_ctx[8..12].copy_from_slice(&mark.to_ne_bytes());
        let mut out = vec![0u8; frame.len() + 256];
        match hook {
            Hook::TcEgress => {
                let name = program_names::TC_EGRESS;
                let prog = program_ref::<SchedClassifier>(&self.ebpf, name)?;
                let r = prog
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        data_out: Some(&mut out),
                        ctx_in: Some(&skb_ctx),
                        repeat,
                        ..Default::default()
                    })
                    .map_err(program_err(name))?;
                Ok((r.return_value == 0, r.duration))
            }
            Hook::Xdp => {
                let name = program_names::XDP_GATEWAY;
                let prog = program_ref::<Xdp>(&self.ebpf, name)?;
                let r = prog
                    .test_run(TestRunOptions {
                        data_in: Some(frame),
                        data_out: Some(&mut out),
                        repeat,
                        ..Default::default()
                    })
                    .map_err(program_err(name))?;
                const XDP_PASS: u32 = 2;
                Ok((r.return_value == XDP_PASS, r.duration))
            }
        }
    }

    /// Counters summed over CPUs.
    pub fn counters(&self) -> Result<Vec<(CounterKey, CounterValue)>> {
        read_counters(
            self.map(map_names::COUNTERS)?,
            self.map(map_names::COUNTER_CACHE)?,
        )
    }

    pub fn stats(&self) -> Result<Stats> {
        read_stats(self.map(map_names::STATS)?)
    }

    /// Reads every event waiting on the ring buffer, without blocking.
    pub fn drain_events(&mut self) -> Result<Vec<ViolationEvent>> {
        let name = map_names::EVENTS;
        let mut ring = RingBuf::try_from(self.map_mut(name)?).map_err(map_err(name))?;
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            if let Some(ev) = ViolationEvent::from_bytes(&item) {
                out.push(ev);
            }
        }
        Ok(out)
    }

    /// Hands the ring buffer to an asynchronous reader.
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let name = map_names::EVENTS;
        let map = self
            .ebpf
            .take_map(name)
            .ok_or(DatapathError::MissingMap(name))?;
        RingBuf::try_from(map).map_err(map_err(name))
    }

    /// Fills the LPM-only baseline tries, and the arrays of random addresses the cold
    /// loops draw from with addresses inside these prefixes (so cold lookups hit, as real
    /// traffic to listed regions would).
    pub fn fill_bench_lpm(
        &mut self,
        v4: &[(Ipv4Network, u32)],
        v6: &[(Ipv6Network, u32)],
    ) -> Result<()> {
        let name = "BENCH_LPM_V4";
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
        let name = "BENCH_LPM_V6";
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
        let name = "BENCH_ADDRS_V4";
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
        let name = "BENCH_ADDRS_V6";
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

    /// Runs a benchmark program `repeat` times on `frame`; the kernel's mean per run.
    /// Needs a datapath loaded with [`LoadOptions::bench`].
    pub fn bench_run(&self, prog: BenchProgram, frame: &[u8], repeat: u32) -> Result<Duration> {
        let name = prog.program_name();
        let p = program_ref::<SchedClassifier>(&self.ebpf, name)?;
        let mut out = vec![0u8; frame.len() + 256];
        let r = p
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                repeat,
                ..Default::default()
            })
            .map_err(program_err(name))?;
        Ok(r.duration)
    }

    /// Kernel memory of each map, from the map's own accounting (`memlock` in
    /// /proc/self/fdinfo), which counts what tries and hash maps allocate as they fill.
    pub fn map_memory(&self) -> Vec<(String, u64)> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let mut out = Vec::new();
        for (name, map) in self.ebpf.maps() {
            let data = match map {
                Map::Array(d)
                | Map::PerCpuArray(d)
                | Map::HashMap(d)
                | Map::PerCpuHashMap(d)
                | Map::LpmTrie(d)
                | Map::RingBuf(d) => d,
                _ => continue,
            };
            let fd = data.fd().as_fd().as_raw_fd();
            let info =
                std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap_or_default();
            let memlock = info
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            out.push((name.to_owned(), memlock));
        }
        out.sort();
        out
    }

    /// Instructions the verifier processed for each program: the complexity figures that
    /// performance work tracks.
    pub fn verified_instructions(&self) -> Vec<(&'static str, Option<u32>)> {
        [program_names::TC_EGRESS, program_names::XDP_GATEWAY]
            .into_iter()
            .map(|name| {
                let count = self
                    .ebpf
                    .program(name)
                    .and_then(|p| p.info().ok())
                    .and_then(|i| i.verified_instruction_count());
                (name, count)
            })
            .collect()
    }

    pub fn table_capacity(&self) -> u32 {
        self.table_capacity
    }

    /// (map, entries, capacity) for the policy maps, both slots together.
    pub fn map_usage(&self) -> Vec<(String, u64, u64)> {
        let [a, b] = self.slot_contents;
        let sum = |f: fn(&SlotContents) -> usize| (f(&a) + f(&b)) as u64;
        let table = u64::from(SLOTS * self.table_capacity);
        vec![
            (map_names::REGIONS_V4.into(), sum(|c| c.regions_v4), table),
            (
                // Entries, markers included.
                map_names::REGIONS_V6.into(),
                sum(|c| c.regions_v6),
                u64::from(SLOTS * self.v6_capacity()),
            ),
            (
                map_names::EXEMPT_V4.into(),
                sum(|c| c.exempt_v4),
                MAX_EXEMPT_ENTRIES.into(),
            ),
            (
                map_names::EXEMPT_V6.into(),
                sum(|c| c.exempt_v6),
                MAX_EXEMPT_ENTRIES.into(),
            ),
            (
                map_names::SRC_V4.into(),
                sum(|c| c.src_v4),
                MAX_SRC_CIDR_ENTRIES.into(),
            ),
            (
                map_names::SRC_V6.into(),
                sum(|c| c.src_v6),
                MAX_SRC_CIDR_ENTRIES.into(),
            ),
            (
                map_names::CGROUP_CLASSES.into(),
                sum(|c| c.cgroups),
                MAX_CGROUP_ENTRIES.into(),
            ),
            (
                // Groups, not entries: each holds 256.
                map_names::DIR8.into(),
                sum(|c| c.dir8_groups),
                u64::from(SLOTS * self.dir8_groups),
            ),
        ]
    }

    fn program_id(&self, name: &'static str) -> Option<u32> {
        self.ebpf.program(name)?.info().ok().map(|i| i.id())
    }

    /// Whether our program is attached to the interface's hook right now, as the kernel
    /// reports it (not as we remember it): someone may have detached it.
    pub fn is_attached(&self, interface: &str, hook: &str) -> bool {
        if hook == Hook::TcEgress.as_str() {
            let Some(id) = self.program_id(program_names::TC_EGRESS) else {
                return false;
            };
            if !tcx_supported() {
                // clsact attachments are not queried; trust the netlink attach.
                return if_index(interface).is_some();
            }
            if_index(interface)
                .and_then(|index| tcx_egress_program_ids(index).ok())
                .is_some_and(|ids| ids.contains(&id))
        } else {
            let Some(id) = self.program_id(program_names::XDP_GATEWAY) else {
                return false;
            };
            xdp_program_id(interface) == Some(id)
        }
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
        let found = match addr {
            IpAddr::V4(a) if self.dir24.is_some() => {
                let Some((top, groups)) = &self.dir24 else {
                    unreachable!()
                };
                let (ts, gs) = (DIR24_ENTRIES as usize, self.dir8_groups as usize * 256);
                let s = slot as usize;
                Ok(dir24::lookup(
                    &top.as_slice()[s * ts..(s + 1) * ts],
                    &groups.as_slice()[s * gs..(s + 1) * gs],
                    a,
                ))
            }
            IpAddr::V4(a) => {
                let name = map_names::REGIONS_V4;
                let t: LpmTrie<&MapData, LpmDataV4, RegionId> =
                    LpmTrie::try_from(self.map(name)?).map_err(map_err(name))?;
                t.get(&lpm_key_v4(slot, a, 32), 0)
            }
            IpAddr::V6(a) => {
                let header = self.policy_in_slot(slot)?.header;
                let name = map_names::V6_LENGTHS;
                let nodes: Array<&MapData, V6LengthNode> =
                    Array::try_from(self.map(name)?).map_err(map_err(name))?;
                let table = self.v6_slot(slot);
                let mask = table.len() as u32 - 1;
                Ok(datafence_common::v6::v6_search(
                    &a.octets(),
                    |i| nodes.get(&(slot * V6_TREE_NODES + i), 0).ok(),
                    |k| {
                        datafence_common::v6::v6_table_get(
                            k,
                            header.v6_seed,
                            mask,
                            header.v6_scan,
                            |i| table.get(i as usize).copied(),
                        )
                    },
                ))
            }
        };
        match found {
            Ok(r) => Ok(r),
            Err(MapError::KeyNotFound) => Ok(0),
            Err(source) => Err(DatapathError::Map {
                map: "REGIONS",
                source,
            }),
        }
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

fn clear_lpm<K, V>(map: &mut Map, name: &'static str, slot: u32) -> Result<()>
where
    K: aya::Pod + AsRef<[u8]>,
    V: aya::Pod,
{
    let mut trie: LpmTrie<&mut MapData, K, V> = LpmTrie::try_from(map).map_err(map_err(name))?;
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

fn ensure_interface(interface: &str) -> Result<()> {
    if if_index(interface).is_none() {
        return Err(DatapathError::UnknownInterface(interface.to_owned()));
    }
    Ok(())
}

/// The interface's index, or `None` when no such interface exists.
pub fn if_index(interface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(interface).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The interface's name, for labelling counters and events by ifindex.
pub fn if_name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: `buf` has IF_NAMESIZE bytes, as if_indextoname requires.
    let ptr = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if ptr.is_null() {
        return None;
    }
    // SAFETY: on success the buffer holds a NUL-terminated name.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Some(name.to_string_lossy().into_owned())
}

/// Ids of the programs attached to an interface's tcx egress hook.
///
/// A bare `BPF_PROG_QUERY`: aya's `query_tcx` also opens each program by id, which needs
/// CAP_SYS_ADMIN, and the agent runs without it.
fn tcx_egress_program_ids(ifindex: u32) -> std::io::Result<Vec<u32>> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_TCX_EGRESS: u32 = 47;
    /// `bpf_attr.query`, as in include/uapi/linux/bpf.h.
    #[repr(C)]
    #[derive(Default)]
    struct QueryAttr {
        target_ifindex: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    let mut ids = [0u32; 64];
    let mut attr = QueryAttr {
        target_ifindex: ifindex,
        attach_type: BPF_TCX_EGRESS,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..QueryAttr::default()
    };
    // SAFETY: bpf(2) with a correctly laid out attr whose pointer fields point at `ids`,
    // which outlives the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_QUERY,
            &mut attr as *mut QueryAttr,
            size_of::<QueryAttr>(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let n = (attr.prog_cnt as usize).min(ids.len());
    Ok(ids[..n].to_vec())
}

/// The id of the XDP program on an interface, from `ip -json link show` (iproute2):
/// the kernel reports XDP attachments only through netlink.
fn xdp_program_id(interface: &str) -> Option<u32> {
    let out = std::process::Command::new("ip")
        .args(["-json", "link", "show", "dev", interface])
        .output()
        .ok()?;
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    let id = links.get(0)?.get("xdp")?.get("prog")?.get("id")?.as_u64()?;
    u32::try_from(id).ok()
}

/// tcx (kernel 6.6+) lets several programs share an egress hook without a qdisc.
fn tcx_supported() -> bool {
    aya::util::KernelVersion::current().is_ok_and(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
}
