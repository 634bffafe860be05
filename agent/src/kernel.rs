//! What the running kernel offers datafence, found by asking it (probing), not by reading
//! its version: distributions backport features, and a feature can be compiled out.
//!
//! The agent checks these at start, before loading anything: a kernel that lacks what
//! the programs need gets one message naming the feature and the first kernel that has
//! it, never a verifier log. `datafence status` and the `datafence_kernel_feature`
//! metric report the result.
#![forbid(unsafe_code)]

use std::path::Path;

use aya::{maps::MapType, programs::ProgramType};
use serde::{Deserialize, Serialize};

/// One kernel feature and whether this kernel has it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feature {
    /// Stable name: the metric's `feature` label and the key in `status --json`.
    pub name: String,
    pub available: bool,
    /// Whether the programs cannot run without it.
    pub required: bool,
    /// The first mainline kernel that has it, e.g. "5.8".
    pub since: String,
    /// What datafence uses it for.
    pub purpose: String,
    /// Why the kernel could not be asked (typically a missing capability); `available`
    /// is then false without the kernel having said no.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_error: Option<String>,
}

/// A feature to probe for.
struct Probe {
    name: &'static str,
    since: &'static str,
    required: bool,
    purpose: &'static str,
    /// Whether the kernel has it; an error when the kernel could not be asked.
    check: fn() -> Result<bool, String>,
}

/// Everything the programs need (`required`) or use when present. Add a line here when
/// the programs start to use a newer kernel facility (a map type, a helper, a program
/// type), with the kernel that introduced it.
const PROBES: &[Probe] = &[
    Probe {
        name: "sched_cls",
        since: "4.1",
        required: true,
        purpose: "the TC egress program",
        check: || program_type(ProgramType::SchedClassifier),
    },
    Probe {
        name: "xdp",
        since: "4.8",
        required: true,
        purpose: "the gateway program",
        check: || program_type(ProgramType::Xdp),
    },
    Probe {
        name: "lpm_trie",
        since: "4.11",
        required: true,
        purpose: "exemption, source and IPv4 region prefixes",
        check: || map_type(MapType::LpmTrie),
    },
    Probe {
        name: "global_data",
        since: "5.2",
        required: true,
        purpose: "settings fixed at load time (read-only globals)",
        // aya probes this once, for its own loader; it cannot tell "no" from "not
        // permitted", but the probes above fail first when the agent may not ask.
        check: || Ok(aya::features().bpf_global_data()),
    },
    Probe {
        // The programs' arrays are also BPF_F_MMAPABLE (5.5), which 5.8 implies.
        name: "ring_buffer",
        since: "5.8",
        required: true,
        purpose: "violation events",
        check: || map_type(MapType::RingBuf),
    },
    Probe {
        name: "tcx",
        since: "6.6",
        required: false,
        purpose: "TC egress through a pinned BPF link; without it, a clsact filter",
        check: tcx_probe,
    },
    Probe {
        name: "btf",
        since: "5.4",
        required: false,
        purpose: "kernel type information (/sys/kernel/btf/vmlinux), for diagnostics",
        check: || Ok(Path::new("/sys/kernel/btf/vmlinux").exists()),
    },
    Probe {
        name: "cgroup_v2",
        since: "4.5",
        required: false,
        purpose: "cgroup selectors in policies",
        check: cgroup2_mounted,
    },
    Probe {
        name: "socket_ring",
        since: "4.17",
        required: false,
        purpose: "the socket ring (connect and sendmsg programs); without it the packet ring \
                  enforces alone",
        check: || program_type(ProgramType::CgroupSockAddr),
    },
];

fn program_type(t: ProgramType) -> Result<bool, String> {
    aya::sys::is_program_supported(t).map_err(|e| with_sources(&e))
}

fn map_type(t: MapType) -> Result<bool, String> {
    aya::sys::is_map_supported(t).map_err(|e| with_sources(&e))
}

/// An error and its causes on one line: aya's syscall errors keep the OS error (the
/// part that says EPERM) in their source.
fn with_sources(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Whether the kernel has tcx: a `BPF_PROG_QUERY` of the tcx egress hook on the
/// loopback interface succeeds only where tcx exists (6.6+); older kernels reject the
/// attach type with EINVAL.
fn tcx_probe() -> Result<bool, String> {
    const LOOPBACK: u32 = 1;
    match crate::datapath::tcx_egress_program_ids(LOOPBACK) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(false),
        Err(e) => Err(format!("BPF_PROG_QUERY of the tcx egress hook: {e}")),
    }
}

/// Whether tcx can be used here (see [`tcx_probe`]); false when it cannot be asked.
pub fn tcx_supported() -> bool {
    tcx_probe().unwrap_or(false)
}

fn cgroup2_mounted() -> Result<bool, String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")
        .map_err(|e| format!("reading /proc/self/mounts: {e}"))?;
    Ok(mounts
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("cgroup2")))
}

/// The probed features of this kernel.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelFeatures {
    /// `uname -r`.
    pub release: String,
    pub features: Vec<Feature>,
}

impl KernelFeatures {
    /// Probes every feature; takes a few milliseconds (each probe creates and closes a
    /// small map or program).
    pub fn probe() -> Self {
        Self {
            release: kernel_release(),
            features: PROBES
                .iter()
                .map(|p| {
                    let probed = (p.check)();
                    Feature {
                        name: p.name.to_owned(),
                        available: probed == Ok(true),
                        required: p.required,
                        since: p.since.to_owned(),
                        purpose: p.purpose.to_owned(),
                        probe_error: probed.err(),
                    }
                })
                .collect(),
        }
    }

    pub fn has(&self, name: &str) -> bool {
        self.features.iter().any(|f| f.name == name && f.available)
    }

    /// The first required feature this kernel lacks, if any.
    pub fn missing(&self) -> Option<&Feature> {
        self.features.iter().find(|f| f.required && !f.available)
    }

    /// Fails with one message naming the missing feature and the minimum kernel, or the
    /// feature the agent was not allowed to ask about.
    pub fn require(&self) -> Result<(), KernelCheck> {
        let Some(f) = self.missing() else {
            return Ok(());
        };
        Err(match &f.probe_error {
            Some(error) => KernelCheck::CannotProbe {
                feature: f.name.clone(),
                error: error.clone(),
            },
            None => KernelCheck::TooOld {
                release: self.release.clone(),
                feature: f.name.clone(),
                since: f.since.clone(),
                purpose: f.purpose.clone(),
            },
        })
    }

    /// The `datafence_kernel_feature{feature="..."}` gauges: 1 when available.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        use prometheus_client::metrics::{family::Family, gauge::Gauge};
        let family = Family::<FeatureLabels, Gauge>::default();
        for f in &self.features {
            family
                .get_or_create(&FeatureLabels {
                    feature: f.name.clone(),
                })
                .set(i64::from(f.available));
        }
        registry.register(
            "kernel_feature",
            "1 when the running kernel offers the feature (probed at agent start)",
            family,
        );
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
struct FeatureLabels {
    feature: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KernelCheck {
    #[error(
        "kernel {release} is too old for datafence: it lacks {feature} ({purpose}), which Linux {since} introduced; run datafence on Linux {since} or later"
    )]
    TooOld {
        release: String,
        feature: String,
        since: String,
        purpose: String,
    },
    #[error(
        "cannot ask the kernel whether it has {feature}: {error} (the agent needs CAP_BPF and CAP_NET_ADMIN)"
    )]
    CannotProbe { feature: String, error: String },
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".to_owned(), |s| s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(available: &[(&str, bool, bool)]) -> KernelFeatures {
        KernelFeatures {
            release: "5.4.0".into(),
            features: available
                .iter()
                .map(|(name, ok, required)| Feature {
                    name: (*name).into(),
                    available: *ok,
                    required: *required,
                    since: "5.8".into(),
                    purpose: "violation events".into(),
                    probe_error: None,
                })
                .collect(),
        }
    }

    #[test]
    fn a_missing_required_feature_names_itself_and_the_minimum_kernel() {
        let k = features(&[("tcx", false, false), ("ring_buffer", false, true)]);
        let err = k
            .require()
            .expect_err("ring_buffer is required")
            .to_string();
        assert!(err.contains("ring_buffer"), "{err}");
        assert!(err.contains("Linux 5.8"), "{err}");
        assert!(err.contains("5.4.0"), "{err}");
    }

    #[test]
    fn a_feature_that_could_not_be_probed_is_not_called_missing_from_the_kernel() {
        let mut k = features(&[("ring_buffer", false, true)]);
        k.features[0].probe_error = Some("Operation not permitted (os error 1)".into());
        let err = k.require().expect_err("not probed").to_string();
        assert!(err.contains("cannot ask"), "{err}");
        assert!(err.contains("Operation not permitted"), "{err}");
        assert!(!err.contains("too old"), "{err}");
    }

    #[test]
    fn a_missing_optional_feature_is_not_an_error() {
        let k = features(&[("tcx", false, false), ("ring_buffer", true, true)]);
        assert!(k.require().is_ok());
        assert!(!k.has("tcx"));
        assert!(k.has("ring_buffer"));
    }

    #[test]
    fn every_feature_becomes_a_gauge() {
        let k = features(&[("tcx", false, false), ("ring_buffer", true, true)]);
        let mut registry = prometheus_client::registry::Registry::with_prefix("datafence");
        k.register_metrics(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(
            text.contains("datafence_kernel_feature{feature=\"tcx\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("datafence_kernel_feature{feature=\"ring_buffer\"} 1"),
            "{text}"
        );
    }
}
