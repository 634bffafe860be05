//! The datafence agent as a library: the binary (`src/main.rs`) and the integration tests
//! both build on it.

pub mod agent;
pub mod cgroups;
pub mod control;
pub mod datapath;
pub mod diff;
pub mod dir24;
pub mod dirs;
pub mod explain;
pub mod lockout;
pub mod metrics;
pub mod policy;
pub mod report;
pub mod v6table;
