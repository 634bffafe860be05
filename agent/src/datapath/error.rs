//! What can go wrong between the agent and the kernel.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use aya::{
    maps::MapError,
    programs::{ProgramError, tc::TcError},
};

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
    #[error("interface {interface}: {detail}")]
    LinkType { interface: String, detail: String },
    #[error("interface {0} does not exist")]
    UnknownInterface(String),
    #[error("map {map}: a slot's array: {source}")]
    TableArray {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("map {map}: mapping it into memory: {source}")]
    Mmap {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the {family} table needs {needed} range entries; the loaded datapath has room for {capacity}, sized to the policy it started with and some more. Restart the agent (`systemctl restart datafence`) to make the tables anew at this policy's size, with no gap in enforcement (up to {max} entries)"
    )]
    RangesFull {
        family: &'static str,
        needed: usize,
        capacity: usize,
        max: u32,
    },
    #[error(
        "the {family} table needs {needed} range entries, past the datapath's limit of {max} per slot (a range is a stretch of addresses in one region): list fewer or wider prefixes"
    )]
    RangesBeyondLimit {
        family: &'static str,
        needed: usize,
        max: u32,
    },
    #[error("counting the possible CPUs: {0}")]
    Cpus(#[source] std::io::Error),
    #[error(
        "{holder} is running datafence on pin directory {path}: one agent per pin directory; stop it first (`systemctl stop datafence`)"
    )]
    PinsInUse { path: PathBuf, holder: String },
    #[error("locking the pin directory {path}: {source}")]
    PinLock {
        path: PathBuf,
        source: std::io::Error,
    },
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
    #[error("hook {} judges socket calls: the kernel cannot test-run a frame through it", .0.as_str())]
    NoTestRun(datafence_common::Hook),
    #[error("the socket ring at cgroup {cgroup}: {detail}")]
    SocketRing { cgroup: PathBuf, detail: String },
}
