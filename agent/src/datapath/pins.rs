//! Where the pinned objects of one installation live in bpffs, what they hold while no
//! agent runs, and how they are removed.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};

use aya::maps::{Array, Map, MapData};
use aya::programs::links::FdLink;
use datafence_common::{CounterKey, CounterValue, Hook, Policy, map_names};

use super::{DatapathError, Result, Stats, map_err, readout, sys};

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
        let counters = readout::read_counters(
            &Map::PerCpuHashMap(open(map_names::COUNTERS)?),
            &Map::PerCpuArray(open(map_names::COUNTER_CACHE)?),
        )?;
        let stats = readout::read_stats(&Map::PerCpuArray(open(map_names::STATS)?))?;
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

/// Where bpffs is normally mounted; systemd does it at boot.
pub(super) const BPFFS: &str = "/sys/fs/bpf";

/// Makes sure `dir` lies on a bpf filesystem, mounting one at /sys/fs/bpf when a host
/// has none (minimal images and containers). Pins anywhere else must already be bpffs.
pub(super) fn ensure_bpffs(dir: &Path) -> Result<()> {
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
    if let Err(e) = sys::mount_bpffs(BPFFS) {
        return Err(not_bpffs(std::io::Error::other(format!(
            "no bpf filesystem at {BPFFS} and mounting one failed ({e}); mount it with `mount -t bpf bpf {BPFFS}`"
        ))));
    }
    tracing::info!(mount = BPFFS, "mounted the bpf filesystem");
    Ok(())
}

/// Opens a link pinned by an earlier agent, if there is one.
pub(super) fn adopt_link(path: &Path) -> Option<FdLink> {
    let pinned = aya::programs::links::PinnedLink::from_pin(path).ok()?;
    // The pin stays in place: it is what keeps the link alive after this agent exits.
    Some(FdLink::from(pinned))
}

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

    /// Removes the test-run pins `explain --datapath` left (see
    /// [`EXPLAIN_TEST_RUN_PREFIX`](crate::dirs::EXPLAIN_TEST_RUN_PREFIX)): each holds a
    /// whole private copy of the datapath in kernel memory. Only for the agent that holds
    /// the directory's lock, or `detach`.
    pub fn remove_explain_test_runs(&self) {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name
                .to_string_lossy()
                .starts_with(crate::dirs::EXPLAIN_TEST_RUN_PREFIX)
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
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

    /// Where the socket ring's links are pinned: they attach to a cgroup, not an
    /// interface, and `status` lists the links directory as interfaces.
    pub fn socket_links_dir(&self) -> PathBuf {
        self.root.join("socket_links")
    }

    pub fn link(&self, hook: Hook, interface: &str) -> PathBuf {
        self.links_dir().join(link_name(hook.as_str(), interface))
    }

    /// Where one build's tail-call stage arrays are pinned. Keyed by the object's digest:
    /// an entry program must only ever jump to stages built with it, so an upgrade gets
    /// arrays of its own while the links it has not yet switched keep the old ones.
    pub fn stages_dir(&self, object_digest: &str) -> PathBuf {
        self.root
            .join(format!("v{}", datafence_common::ABI_VERSION))
            .join(format!("stages-{object_digest}"))
    }

    /// Unpins the stage arrays of other builds. Called once this agent's programs hold
    /// every link: a program array loses its entries when its last pin or descriptor goes,
    /// so an entry program still attached and using one would pass packets unjudged.
    pub fn remove_other_stages(&self, object_digest: &str) -> std::io::Result<Vec<PathBuf>> {
        let keep = self.stages_dir(object_digest);
        let mut removed = Vec::new();
        let Some(dir) = keep.parent() else {
            return Ok(removed);
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Ok(removed);
        };
        for entry in entries.flatten() {
            let is_stages = entry.file_name().to_string_lossy().starts_with("stages-");
            if is_stages && entry.path() != keep {
                std::fs::remove_dir_all(entry.path())?;
                removed.push(entry.path());
            }
        }
        Ok(removed)
    }

    /// Unpins the links whose interface is gone. The kernel keeps such a link, and the
    /// program and maps it holds, for as long as its pin lasts, and interface names
    /// like a container's veth are rarely used again. A link is judged by the interface
    /// it holds, not by its pin's name, which a rename leaves behind.
    pub fn remove_defunct_links(&self) -> Vec<String> {
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.links_dir()) else {
            return removed;
        };
        for entry in entries.flatten() {
            if matches!(sys::pinned_link_ifindex(&entry.path()), Ok(Some(0)))
                && std::fs::remove_file(entry.path()).is_ok()
            {
                removed.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        removed.sort();
        removed
    }

    /// Detaches and unpins each link whose (hook, interface) `keep` refuses, judged by the
    /// interface the link holds now: a rename leaves the pin's name behind. Links of
    /// interfaces that are gone are left to [`Self::remove_defunct_links`]. Returns the
    /// links removed, as `status` names attachments.
    pub fn remove_links_unless(&self, keep: impl Fn(&str, &str) -> bool) -> Vec<String> {
        let mut removed = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.links_dir()) else {
            return removed;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((hook, _)) = parse_link_name(&name) else {
                continue;
            };
            let Ok(Some(ifindex)) = sys::pinned_link_ifindex(&entry.path()) else {
                continue;
            };
            let Some(interface) = sys::if_name(ifindex) else {
                continue;
            };
            if keep(hook, &interface) {
                continue;
            }
            // Detach first, as in `remove_all`.
            let _ = sys::detach_pinned_link(&entry.path());
            if std::fs::remove_file(entry.path()).is_ok() {
                removed.push(format!("{hook}-{interface}"));
            }
        }
        removed.sort();
        removed
    }

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
                let _ = sys::detach_pinned_link(&entry.path());
                std::fs::remove_file(entry.path())?;
                let name = entry.file_name().to_string_lossy().into_owned();
                detached.push(match parse_link_name(&name) {
                    Some((hook, interface)) => format!("{hook}-{interface}"),
                    None => name,
                });
            }
        }
        let _ = std::fs::remove_dir(self.links_dir());
        if let Ok(entries) = std::fs::read_dir(self.socket_links_dir()) {
            for entry in entries.flatten() {
                let _ = sys::detach_pinned_link(&entry.path());
                std::fs::remove_file(entry.path())?;
                detached.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        let _ = std::fs::remove_dir(self.socket_links_dir());
        if let Ok(entries) = std::fs::read_dir(self.maps_dir()) {
            for entry in entries.flatten() {
                std::fs::remove_file(entry.path())?;
            }
        }
        let _ = std::fs::remove_dir(self.maps_dir());
        let _ = self.remove_other_stages("");
        if let Some(parent) = self.maps_dir().parent() {
            let _ = std::fs::remove_dir(parent);
        }
        let _ = std::fs::remove_file(self.root.join(crate::dirs::PINS_OWNER));
        // The links are gone, so nothing jumps through a retired stage array any more.
        self.remove_retired()?;
        self.remove_explain_test_runs();
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

/// Where [`PinLayout::retire`] moves an outgrown datapath: `outgrown-<n>/` beside the
/// live one, each a pin root of its own for [`PinLayout::read`].
const RETIRED_PREFIX: &str = "outgrown-";

impl PinLayout {
    /// Moves this ABI's pinned maps and stage arrays aside, to a pin root of their own,
    /// so that the next load makes new ones. Programs still attached keep what they hold
    /// (a rename moves a pin, not the object), so they enforce the old policy until their
    /// links move to programs bound to the new maps. Returns the retired root.
    pub fn retire(&self) -> std::io::Result<PathBuf> {
        let abi = format!("v{}", datafence_common::ABI_VERSION);
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        let retired = self.root.join(format!("{RETIRED_PREFIX}{stamp}"));
        std::fs::create_dir(&retired)?;
        std::fs::rename(self.root.join(&abi), retired.join(&abi))?;
        Ok(retired)
    }

    /// The pin roots [`Self::retire`] made, oldest first.
    pub fn retired(&self) -> Vec<PinLayout> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(&self.root)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with(RETIRED_PREFIX))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        found.into_iter().map(PinLayout::new).collect()
    }

    /// Unpins the retired datapaths. Only once this agent's programs hold every link:
    /// a stage array that loses its last pin loses its entries, and an entry program
    /// still jumping through it would pass packets unjudged.
    pub fn remove_retired(&self) -> std::io::Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for retired in self.retired() {
            std::fs::remove_dir_all(&retired.root)?;
            removed.push(retired.root);
        }
        Ok(removed)
    }
}

/// The name of an interface's link pin, `<hook>-<interface>`, with the dots of the
/// interface's name (a VLAN's `eth0.100`) written as colons: bpffs refuses names with a
/// dot, and Linux refuses interface names with a colon, so the name reads back.
pub fn link_name(hook: &str, interface: &str) -> String {
    format!("{hook}-{}", interface.replace('.', ":"))
}

/// The hook and interface a link pin's name ([`link_name`]) stands for.
pub fn parse_link_name(name: &str) -> Option<(&str, String)> {
    let (hook, interface) = name.split_once('-')?;
    Some((hook, interface.replace(':', ".")))
}

#[cfg(test)]
mod tests {
    use super::{link_name, parse_link_name};

    #[test]
    fn link_pin_names_have_no_dots_and_read_back() {
        for interface in ["eth0", "eth0.100", "bond0.42.7", "up-link"] {
            let name = link_name("tc_egress", interface);
            assert!(!name.contains('.'), "{name}");
            assert_eq!(
                parse_link_name(&name),
                Some(("tc_egress", interface.to_owned()))
            );
        }
    }
}
