//! governor: an eBPF-powered root daemon that keeps a small Linux host
//! honest. See DESIGN.md for the architecture; data flows one way:
//!
//! kernel ─ringbuf→ [`probes`]/[`events`] → [`proctable`] → tracker/policy →
//! actions, audit, alerts.

pub mod btf;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod doctor;
pub mod effects;
pub mod events;
pub mod export;
pub mod fsflags;
pub mod install;
pub mod layout;
pub mod memsample;
pub mod memwatch;
pub mod notify;
pub mod probes;
pub mod proctable;
pub mod protect;
pub mod psi;
pub mod statefile;
pub mod supervisor;
pub mod tracefs;
pub mod units;
pub mod users;
pub mod watch;

/// Restart velocity: the pure policy, from the core.
pub use governor_core::velocity;
