//! Memory budgets (issue 11): types shared by the `kmem/rss_stat` program
//! (`governor-ebpf/src/memory.rs`) and the daemon (`governor/src/memwatch.rs`).
//!
//! The daemon reads a service's memory from `/proc` and then *arms* it:
//! every process of the service is listed in [`MEM_WATCH_MAP`] under the
//! service's slot, and the slot's [`MemBudget`] holds the bytes left before
//! the ceiling. The program subtracts each growth of a watched process's
//! RSS counters from its service's budget and, when the budget runs out,
//! sends one [`MemCrossing`] and disarms the slot. So the daemon can read
//! `/proc` rarely while nobody is near a limit and still see a crossing
//! within milliseconds.

/// `u32` tgid → [`MemWatch`].
pub const MEM_WATCH_MAP: &str = "MEM_WATCH";
/// Array of [`MemBudget`], one per service slot.
pub const MEM_BUDGET_MAP: &str = "MEM_BUDGET";
/// Ring buffer of [`MemCrossing`]s.
pub const MEM_EVENTS_MAP: &str = "MEM_EVENTS";
/// Service slots (entries of [`MEM_BUDGET_MAP`]).
pub const MEM_SLOTS: u32 = 1024;
/// Processes that can be watched at once (entries of [`MEM_WATCH_MAP`]).
pub const MEM_WATCHED: u32 = 8192;

/// `enum` members of the `rss_stat` record the budget counts: file, anon
/// and shmem pages (RSS, as statm's `resident`); swap entries don't.
pub const RSS_MEMBERS: usize = 4;
/// `MM_SWAPENTS`: not resident.
pub const MM_SWAPENTS: i32 = 2;

/// A watched process.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemWatch {
    /// Its service's slot in [`MEM_BUDGET_MAP`].
    pub slot: u32,
    pub _pad: u32,
    /// The last size (bytes) the tracepoint reported for each member; −1
    /// until first seen, so the first event only sets it.
    pub last: [i64; RSS_MEMBERS],
}

impl MemWatch {
    pub fn new(slot: u32) -> Self {
        MemWatch {
            slot,
            _pad: 0,
            last: [-1; RSS_MEMBERS],
        }
    }
}

/// A service's budget.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemBudget {
    /// Bytes of growth left before the ceiling.
    pub left: i64,
    /// 1 while armed; the program sets 0 when it reports a crossing.
    pub armed: u32,
    /// Changed by the daemon at each arming: a crossing carries it, so one
    /// from an earlier arming is told apart.
    pub generation: u32,
}

/// The budget of `slot` ran out.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemCrossing {
    pub slot: u32,
    /// The process whose growth used the last of it.
    pub tgid: u32,
    pub generation: u32,
    pub _pad: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub ts_ns: u64,
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)] structs of integers with explicit padding fields:
    // every bit pattern is a valid value.
    unsafe impl aya::Pod for super::MemWatch {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::MemBudget {}
}
