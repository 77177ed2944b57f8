//! The kernel half of memory sampling: the `kmem/rss_stat` program keeps a
//! budget per service (the bytes left before its ceiling, set from each
//! `/proc` reading) and reports when a service's processes have grown
//! through it (see `governor_common::memory`). With it the daemon reads
//! `/proc` every few seconds instead of several times a second, and still
//! sees a crossing within milliseconds.
//!
//! Two halves, so the event loop can wait on the ring while the daemon
//! arms budgets: [`MemRing`] (the crossings) and [`MemArms`] (the maps).

use std::collections::HashMap;

use anyhow::{Context, Result};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, RingBuf},
    programs::TracePoint,
    Ebpf,
};
use governor_common::memory::{
    MemBudget, MemCrossing, MemWatch, MEM_BUDGET_MAP, MEM_EVENTS_MAP, MEM_SLOTS, MEM_WATCH_MAP,
};
use tokio::io::unix::AsyncFd;

/// `doctor`: whether the `rss_stat` program loads and attaches here (in a
/// copy of the object that is dropped again).
pub fn probe() -> Result<()> {
    let cfg = crate::layout::kernel_config()?;
    let mut ebpf = crate::layout::load_object(&crate::layout::LoadSpec {
        max_entries: vec![],
        protect: false,
    })?;
    load_program(&mut ebpf, &cfg)
}

fn load_program(ebpf: &mut Ebpf, cfg: &governor_common::KernelConfig) -> Result<()> {
    anyhow::ensure!(
        cfg.tp_rss_size != governor_common::NO_FIELD
            && cfg.tp_rss_curr != governor_common::NO_FIELD
            && cfg.tp_rss_member != governor_common::NO_FIELD,
        "the kernel has no kmem/rss_stat tracepoint with curr, member and size fields"
    );
    let p: &mut TracePoint = ebpf
        .program_mut("rss_stat")
        .context("program rss_stat missing from the eBPF object")?
        .try_into()?;
    p.load().context("loading rss_stat")?;
    p.attach("kmem", "rss_stat")
        .context("attaching rss_stat to tracepoint kmem/rss_stat")?;
    Ok(())
}

/// Loads and attaches the `rss_stat` program from `ebpf` (the lifecycle
/// object, loaded with the memory maps at full size) and takes its maps.
pub fn attach(ebpf: &mut Ebpf, cfg: &governor_common::KernelConfig) -> Result<(MemRing, MemArms)> {
    load_program(ebpf, cfg)?;
    let ring = RingBuf::try_from(
        ebpf.take_map(MEM_EVENTS_MAP)
            .context("MEM_EVENTS map missing")?,
    )?;
    // SAFETY: the ring owns its fd and moves into the AsyncFd, so the fd
    // stays open for as long as it is registered.
    let ring = unsafe { AsyncFd::register(ring) }
        .map_err(|e| anyhow::anyhow!("registering the memory ring with tokio: {e}"))?;
    let watch = BpfHashMap::try_from(
        ebpf.take_map(MEM_WATCH_MAP)
            .context("MEM_WATCH map missing")?,
    )?;
    let budget = Array::try_from(
        ebpf.take_map(MEM_BUDGET_MAP)
            .context("MEM_BUDGET map missing")?,
    )?;
    Ok((
        MemRing { ring },
        MemArms {
            watch,
            budget,
            slots: HashMap::new(),
            names: Vec::new(),
            generations: Vec::new(),
            watched: HashMap::new(),
            arms: 0,
            crossings: 0,
        },
    ))
}

/// Crossings reported by the kernel.
pub struct MemRing {
    ring: AsyncFd<RingBuf<MapData>>,
}

impl MemRing {
    /// Waits for crossings and returns those queued.
    pub async fn next(&mut self) -> Vec<MemCrossing> {
        let Ok(mut guard) = self.ring.readable_mut().await else {
            return std::future::pending().await;
        };
        let ring = guard.get_inner_mut();
        let mut out = Vec::new();
        // At most one per armed slot is in flight.
        while out.len() < MEM_SLOTS as usize {
            let Some(item) = ring.next() else {
                guard.clear_ready();
                break;
            };
            if item.len() >= std::mem::size_of::<MemCrossing>() {
                // SAFETY: the record is at least the struct's size, and
                // MemCrossing is plain integers: any bytes are a value.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr() as *const MemCrossing) });
            }
        }
        out
    }
}

/// The budgets and the processes they count.
pub struct MemArms {
    watch: BpfHashMap<MapData, u32, MemWatch>,
    budget: Array<MapData, MemBudget>,
    slots: HashMap<String, u32>,
    /// Slot → service.
    names: Vec<String>,
    /// Slot → the generation of its last arming.
    generations: Vec<u32>,
    /// Watched tgid → slot.
    watched: HashMap<u32, u32>,
    /// Armings and crossings so far (for `status` and the benchmark).
    pub arms: u64,
    pub crossings: u64,
}

impl MemArms {
    fn slot_of(&mut self, service: &str) -> Option<u32> {
        if let Some(&s) = self.slots.get(service) {
            return Some(s);
        }
        let s = self.names.len() as u32;
        if s >= MEM_SLOTS {
            return None;
        }
        self.names.push(service.to_string());
        self.generations.push(0);
        self.slots.insert(service.to_string(), s);
        Some(s)
    }

    /// Counts `pids` (every process of `service`) against a budget of
    /// `left` bytes. False when it couldn't be armed (no slot, a full map):
    /// the caller reads `/proc` as often as without the tracker.
    pub fn arm(&mut self, service: &str, pids: &[u32], left: u64) -> bool {
        let Some(slot) = self.slot_of(service) else {
            return false;
        };
        for &pid in pids {
            if self.watched.get(&pid) == Some(&slot) {
                continue;
            }
            if let Err(e) = self.watch.insert(pid, MemWatch::new(slot), 0) {
                log::debug!("memory tracker: watching pid {pid} of {service}: {e}");
                self.disarm(service);
                return false;
            }
            self.watched.insert(pid, slot);
        }
        let g = &mut self.generations[slot as usize];
        *g = g.wrapping_add(1);
        let b = MemBudget {
            left: left.min(i64::MAX as u64) as i64,
            armed: 1,
            generation: *g,
        };
        if let Err(e) = self.budget.set(slot, b, 0) {
            log::debug!("memory tracker: arming {service}: {e}");
            return false;
        }
        self.arms += 1;
        true
    }

    /// Stops counting for `service` until armed again.
    pub fn disarm(&mut self, service: &str) {
        if let Some(&slot) = self.slots.get(service) {
            let g = &mut self.generations[slot as usize];
            *g = g.wrapping_add(1);
            let _ = self.budget.set(
                slot,
                MemBudget {
                    left: 0,
                    armed: 0,
                    generation: *g,
                },
                0,
            );
        }
    }

    /// A process exited: no longer watched.
    pub fn forget(&mut self, pid: u32) {
        if self.watched.remove(&pid).is_some() {
            // Absent already is fine: nothing else removes entries.
            let _ = self.watch.remove(&pid);
        }
    }

    /// The service a crossing is about, unless it belongs to an earlier
    /// arming (the daemon has read `/proc` since).
    pub fn service_of(&mut self, c: &MemCrossing) -> Option<&str> {
        let slot = c.slot as usize;
        if self.generations.get(slot) != Some(&c.generation) {
            return None;
        }
        self.crossings += 1;
        self.names.get(slot).map(String::as_str)
    }

    /// Processes watched now.
    pub fn watched(&self) -> usize {
        self.watched.len()
    }
}
