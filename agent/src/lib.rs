//! The datafence agent as a library: the binary (`src/main.rs`) and the integration tests
//! both build on it.
//!
//! `unsafe` code is denied in the whole crate. The `sys` modules ([`sys`] here,
//! `datapath::sys`) hold every `unsafe` block, each with its `SAFETY:` comment, and
//! every other module file forbids `unsafe` outright.
#![deny(unsafe_code)]

pub mod agent;
pub mod cgroup_watch;
pub mod cgroups;
pub mod clsact;
pub mod control;
pub mod datapath;
pub mod diff;
pub mod dirs;
pub mod explain;
pub mod generations;
pub mod host_services;
pub mod kernel;
pub mod links;
pub mod liveness;
pub mod local_networks;
pub mod lockout;
pub mod metrics;
mod netlink;
pub mod packet_bypass;
pub mod policy;
pub mod rangetable;
pub mod report;
#[allow(
    unsafe_code,
    reason = "the agent's unsafe calls live here and only here"
)]
mod sys;
pub mod v4table;
pub mod v6table;
