//! governor's pure core: state + (event | tick | request) → decisions.
//!
//! No I/O, no async runtime, no /proc: the daemon's edges read the kernel
//! and the files and hand facts in; this crate decides, and every policy is
//! unit-tested without root. One module per policy:
//!
//! - [`identity`]: which service a process is, and who may approve;
//! - [`table`]: the process table those identities live in;
//! - [`velocity`]: restart velocity (crash loops);
//! - [`limits`]: a service's effective limits;
//! - [`memory`]: memory budgets (ceilings, memory loops, drift from a baseline);
//! - [`status`]: the one status snapshot every reader is fed.
//!
//! The coming policies (memory budgets, kill switch, drift) are modules
//! beside these, fed by the same events and ticks.

pub mod events;
pub mod identity;
pub mod killswitch;
pub mod limits;
pub mod memory;
pub mod status;
pub mod table;
pub mod velocity;

#[cfg(test)]
mod testutil;
