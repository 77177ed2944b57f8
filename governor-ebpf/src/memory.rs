//! Memory budgets (issue 11): the `kmem/rss_stat` program.
//!
//! The tracepoint fires each time a process's RSS counter changes (about
//! once per page fault; on 6.1 per 64 faults per thread, when the thread's
//! cached counts are folded into the mm's). For a process the daemon
//! watches, each growth is taken from its service's budget; when that runs
//! out, one record goes to user space and the slot disarms until the daemon
//! reads `/proc` and arms it again. For every other process it costs one
//! hash lookup that misses.
//!
//! Only `curr == 1` events count: the counter belongs to the running task's
//! own mm, so the current tgid names it (`mm_id` is a hash, not a pid).

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::{Array, HashMap, RingBuf},
    programs::TracePointContext,
};
use governor_common::{
    memory::{MemBudget, MemCrossing, MemWatch, MEM_SLOTS, MEM_WATCHED, MM_SWAPENTS, RSS_MEMBERS},
    NO_FIELD,
};

use crate::config;

#[map(name = "MEM_WATCH")]
static MEM_WATCH: HashMap<u32, MemWatch> = HashMap::with_max_entries(MEM_WATCHED, 0);

#[map(name = "MEM_BUDGET")]
static MEM_BUDGET: Array<MemBudget> = Array::with_max_entries(MEM_SLOTS, 0);

/// Crossings: at most one per armed slot is in flight, 32 bytes each; the
/// smallest ring holds 128 (a full one re-arms the slot: see below).
#[map(name = "MEM_EVENTS")]
static MEM_EVENTS: RingBuf = RingBuf::with_byte_size(4096, 0);

/// `BPF_RB_FORCE_WAKEUP`: a crossing is acted on at once.
const BPF_RB_FORCE_WAKEUP: u64 = 2;

#[tracepoint(category = "kmem", name = "rss_stat")]
pub fn rss_stat(ctx: TracePointContext) -> u32 {
    let cfg = config();
    if cfg.configured == 0 || cfg.tp_rss_size == NO_FIELD {
        return 0;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // The common case, any process nobody watches: one lookup, out.
    let Some(w) = MEM_WATCH.get_ptr_mut(&tgid) else {
        return 0;
    };
    // SAFETY: the offsets are the tracepoint format's own, inside the record.
    let curr: u32 = unsafe { ctx.read_at(cfg.tp_rss_curr as usize) }.unwrap_or(0);
    if curr == 0 {
        return 0;
    }
    // Read as u32 (the field is an `int`, 0..=3): one register that the
    // bounds check below bounds for the verifier too.
    // SAFETY: as above.
    let member: u32 = unsafe { ctx.read_at(cfg.tp_rss_member as usize) }.unwrap_or(u32::MAX);
    if member >= RSS_MEMBERS as u32 || member == MM_SWAPENTS as u32 {
        return 0;
    }
    // SAFETY: as above.
    let size: i64 = unsafe { ctx.read_at(cfg.tp_rss_size as usize) }.unwrap_or(0);
    // Threads of one process on two CPUs may race on `last` and `left`:
    // a lost or doubled step only makes a crossing one event late or a
    // reading early, and the decision is always made on `/proc`'s numbers.
    // SAFETY: the pointer comes from the map lookup and stays valid for the
    // program's run; the index is masked to the array's length; `member`
    // is a live local, so reading it volatile is reading it.
    let (slot, delta) = unsafe {
        // A fresh (volatile) load, masked where it is used: the compiler
        // can't drop the mask as redundant with the check above, and the
        // verifier sees the index bounded (the check bounds a copy only).
        let idx = core::ptr::read_volatile(&member) as usize & (RSS_MEMBERS - 1);
        let last = &mut (*w).last[idx];
        let prev = *last;
        *last = size;
        if prev < 0 {
            return 0;
        }
        ((*w).slot, size - prev)
    };
    if delta <= 0 {
        return 0;
    }
    let Some(b) = MEM_BUDGET.get_ptr_mut(slot) else {
        return 0;
    };
    // SAFETY: the pointer comes from the array lookup and stays valid for
    // the program's run.
    let generation = unsafe {
        if (*b).armed == 0 {
            return 0;
        }
        (*b).left -= delta;
        if (*b).left > 0 {
            return 0;
        }
        (*b).armed = 0;
        (*b).generation
    };
    let ev = MemCrossing {
        slot,
        tgid,
        generation,
        _pad: 0,
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
    };
    // A full ring: armed again, so the next growth tries again.
    if MEM_EVENTS
        .output::<MemCrossing>(&ev, BPF_RB_FORCE_WAKEUP)
        .is_err()
    {
        // SAFETY: as above.
        unsafe { (*b).armed = 1 };
    }
    0
}
