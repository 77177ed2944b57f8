//! Loads governor's kernel programs and hands out their event stream.
//!
//! The loader computes every offset the programs need from the running
//! kernel (BTF and tracefs formats) and passes them in as a read-only global
//! before load, so the same object is right on every kernel.

use std::os::fd::AsRawFd;

use anyhow::{Context, Result};
use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::{Lsm, RawTracePoint, TracePoint},
    Ebpf,
};
use governor_common::{InodeKey, KernelConfig, DENY_INODES_MAP, DROPS_MAP, EVENTS_MAP};
use tokio::io::unix::AsyncFd;

use crate::events;

pub use governor_common::DEFAULT_RING_BYTES;

pub use crate::layout::kernel_config;

/// Most records handled per wakeup before the event loop serves its other
/// sources again (the rest wait in the ring, which stays readable).
pub const MAX_BATCH: usize = 1024;

/// Options for [`Probes::load`].
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    /// Size of the lifecycle ring in bytes (a power of two, ≥ 4 KiB).
    pub ring_bytes: u32,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        ProbeOptions {
            ring_bytes: DEFAULT_RING_BYTES,
        }
    }
}

/// The loaded, attached lifecycle programs.
pub struct Probes {
    ebpf: Ebpf,
    ring: AsyncFd<RingBuf<MapData>>,
    drops: PerCpuArray<MapData, u64>,
    wake_parents: BpfHashMap<MapData, u32, u8>,
    log: Option<LogForwarder>,
    /// The memory tracker, until taken; or why it isn't running.
    memwatch:
        Option<std::result::Result<(crate::memwatch::MemRing, crate::memwatch::MemArms), String>>,
    pub config: KernelConfig,
}

/// Forwards the programs' aya-log records to the daemon's logger.
pub struct LogForwarder(Option<AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>>);

impl LogForwarder {
    /// Forwards pending eBPF log records, waiting for some when none are
    /// pending. Never resolves when the logger isn't available.
    pub async fn forward(&mut self) {
        match self.0.as_mut() {
            Some(fd) => {
                if let Ok(mut g) = fd.readable_mut().await {
                    g.get_inner_mut().flush();
                    g.clear_ready();
                }
            }
            None => std::future::pending().await,
        }
    }
}

/// Registers an fd-owning value with tokio's reactor.
fn register<T: std::os::fd::AsFd + std::os::fd::AsRawFd>(inner: T) -> Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its file descriptor and moves into the AsyncFd,
    // so the fd stays open for as long as it is registered.
    unsafe { AsyncFd::register(inner) }
        .map_err(|e| anyhow::anyhow!("registering a BPF map fd with tokio: {e}"))
}

fn check_ring_size(bytes: u32) -> Result<()> {
    anyhow::ensure!(
        bytes >= 4096 && bytes.is_power_of_two(),
        "ring size {bytes} must be a power of two of at least 4096 bytes"
    );
    Ok(())
}

/// Loads the object with the kernel config set, without attaching anything.
/// With `memory`, the memory tracker's maps at full size.
fn load_object(_cfg: &KernelConfig, ring_bytes: u32, memory: bool) -> Result<Ebpf> {
    check_ring_size(ring_bytes)?;
    use governor_common::memory as m;
    let mut max_entries = vec![(EVENTS_MAP, ring_bytes)];
    if memory {
        max_entries.extend([
            (m::MEM_EVENTS_MAP, 4096),
            (m::MEM_WATCH_MAP, m::MEM_WATCHED),
            (m::MEM_BUDGET_MAP, m::MEM_SLOTS),
        ]);
    }
    crate::layout::load_object(&crate::layout::LoadSpec {
        max_entries,
        protect: false,
    })
}

impl Probes {
    /// Loads and attaches the exec, exit and fork programs. Must be called
    /// inside a tokio runtime (the ring is registered with its reactor).
    pub fn load(opts: &ProbeOptions) -> Result<Self> {
        let config = kernel_config()?;
        let mut ebpf = load_object(&config, opts.ring_bytes, true)?;

        // Forward the programs' aya-log records to our logger. Optional: a
        // failure here must not stop event collection.
        let log = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => register(l).ok(),
            Err(e) => {
                log::debug!("eBPF logger not initialised: {e}");
                None
            }
        };

        for (prog, name) in [
            ("sched_process_exec", "sched_process_exec"),
            ("sched_process_exit", "sched_process_exit"),
        ] {
            let p: &mut TracePoint = ebpf
                .program_mut(prog)
                .with_context(|| format!("program {prog} missing from the eBPF object"))?
                .try_into()?;
            p.load().with_context(|| format!("loading {prog}"))?;
            p.attach("sched", name)
                .with_context(|| format!("attaching {prog} to tracepoint sched/{name}"))?;
        }
        let fork: &mut RawTracePoint = ebpf
            .program_mut("sched_process_fork")
            .context("program sched_process_fork missing from the eBPF object")?
            .try_into()?;
        fork.load().context("loading sched_process_fork")?;
        fork.attach("sched_process_fork")
            .context("attaching sched_process_fork raw tracepoint")?;

        // Optional: without it the daemon reads /proc more often.
        let memwatch = crate::memwatch::attach(&mut ebpf, &config).map_err(|e| format!("{e:#}"));
        if let Err(e) = &memwatch {
            log::warn!("memory tracker not running ({e}); memory is read from /proc only");
        }
        let ring = RingBuf::try_from(ebpf.take_map(EVENTS_MAP).context("EVENTS map missing")?)?;
        let ring = register(ring)?;
        let drops =
            PerCpuArray::try_from(ebpf.take_map(DROPS_MAP).context("DROPPED map missing")?)?;
        let wake_parents = BpfHashMap::try_from(
            ebpf.take_map(governor_common::WAKE_PARENTS_MAP)
                .context("WAKE_PARENTS map missing")?,
        )?;
        Ok(Probes {
            ebpf,
            ring,
            drops,
            wake_parents,
            log: Some(LogForwarder(log)),
            memwatch: Some(memwatch),
            config,
        })
    }

    /// Events lost because the ring was full, summed over CPUs.
    pub fn dropped(&self) -> Result<u64> {
        let per_cpu = self.drops.get(&0, 0).context("reading the drop counter")?;
        Ok(per_cpu.iter().sum())
    }

    /// Waits until events are available, then hands each decoded event to
    /// `f`. Records that fail to decode are reported to `bad`.
    pub async fn next_batch(
        &mut self,
        mut f: impl FnMut(events::Event),
        mut bad: impl FnMut(anyhow::Error),
    ) -> Result<usize> {
        let mut guard = self.ring.readable_mut().await?;
        let ring = guard.get_inner_mut();
        let mut n = 0;
        while n < MAX_BATCH {
            let Some(item) = ring.next() else {
                guard.clear_ready();
                return Ok(n);
            };
            n += 1;
            match events::decode(&item) {
                Ok(ev) => f(ev),
                Err(e) => bad(e),
            }
        }
        // More is queued: the ring stays ready, so the loop comes straight
        // back, after it served whatever else is due (signals, timers, the
        // socket) — a fork storm can't starve them.
        Ok(n)
    }

    /// Drains queued events without waiting (at most [`MAX_BATCH`]): on the daemon's timer (for
    /// records queued without a wakeup), at shutdown, in tests.
    pub fn drain(&mut self, mut f: impl FnMut(events::Event)) -> usize {
        let ring = self.ring.get_mut();
        let mut n = 0;
        while n < MAX_BATCH {
            let Some(item) = ring.next() else { break };
            n += 1;
            match events::decode(&item) {
                Ok(ev) => f(ev),
                Err(e) => log::warn!("bad event record: {e:#}"),
            }
        }
        n
    }

    /// Takes the memory tracker (once), or why it isn't running.
    pub fn take_memwatch(
        &mut self,
    ) -> std::result::Result<(crate::memwatch::MemRing, crate::memwatch::MemArms), String> {
        self.memwatch
            .take()
            .unwrap_or_else(|| Err("already taken".into()))
    }

    /// Takes the eBPF log forwarder, to be polled beside the event ring.
    pub fn take_log_forwarder(&mut self) -> LogForwarder {
        self.log.take().unwrap_or(LogForwarder(None))
    }

    /// Whether the execs of `pid`'s children wake user space at once
    /// (supervisors: pm2 God daemons, systemd), rather than being queued.
    pub fn set_supervisor(&mut self, pid: u32, on: bool) -> Result<()> {
        if on {
            self.wake_parents.insert(pid, 1, 0)?;
        } else if let Err(e) = self.wake_parents.remove(&pid) {
            // Not present is fine; anything else isn't.
            if !matches!(e, aya::maps::MapError::KeyNotFound) {
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Applies the process table's pending supervisor changes.
    pub fn sync_supervisors(&mut self, table: &mut crate::proctable::ProcTable) {
        for (pid, on) in table.take_supervisor_changes() {
            if let Err(e) = self.set_supervisor(pid, on) {
                log::warn!("marking pid {pid} as a supervisor ({on}): {e:#}");
            }
        }
    }

    /// Per-program kernel statistics: (name, runs, total ns). Counted only
    /// while BPF run-time stats are enabled ([`aya::sys::enable_stats`]).
    pub fn program_stats(&self) -> Vec<(String, u64, u64)> {
        self.ebpf
            .programs()
            .filter_map(|(name, p)| {
                let info = p.info().ok()?;
                Some((
                    name.to_string(),
                    info.run_count(),
                    info.run_time().as_nanos() as u64,
                ))
            })
            .collect()
    }

    /// Raw fd of the ring, for diagnostics.
    pub fn ring_fd(&self) -> i32 {
        self.ring.get_ref().as_raw_fd()
    }

    /// The loaded object (for the LSM layer to reuse its maps).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

/// The BPF LSM layer: a `file_open` program that refuses write opens of the
/// inodes in its map. Only available where the kernel lets BPF LSM programs
/// attach (not on our 6.18 host; yes on stock Debian 6.1/6.12 with `bpf` in
/// the LSM list).
pub struct LsmGuard {
    _ebpf: Ebpf,
    inodes: BpfHashMap<MapData, InodeKey, u8>,
}

impl LsmGuard {
    /// Loads and attaches the LSM program, or says why it can't.
    pub fn load() -> Result<Self> {
        let lsms = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
        anyhow::ensure!(
            lsms.split(',').any(|l| l.trim() == "bpf"),
            "BPF LSM is not in the kernel's active LSM list ({}); boot with lsm=...,bpf",
            if lsms.is_empty() {
                "securityfs not readable"
            } else {
                lsms.trim()
            }
        );
        let config = kernel_config()?;
        let mut ebpf = load_object(&config, 4096, false)?;
        let btf = crate::layout::aya_btf().map_err(anyhow::Error::msg)?;
        let prog: &mut Lsm = ebpf
            .program_mut("file_open")
            .context("program file_open missing from the eBPF object")?
            .try_into()?;
        prog.load("file_open", &btf)
            .context("loading the BPF LSM file_open program")?;
        prog.attach()
            .context("attaching the BPF LSM file_open program (the kernel refused BPF LSM)")?;
        let inodes = BpfHashMap::try_from(
            ebpf.take_map(DENY_INODES_MAP)
                .context("DENY_WRITE_INODES map missing")?,
        )?;
        Ok(LsmGuard {
            _ebpf: ebpf,
            inodes,
        })
    }

    /// Refuses write opens of the file at `path` (by device and inode).
    pub fn deny_writes(&mut self, path: &std::path::Path) -> Result<InodeKey> {
        let key = inode_key(path)?;
        self.inodes
            .insert(key, 1, 0)
            .with_context(|| format!("adding {} to the LSM deny map", path.display()))?;
        Ok(key)
    }

    /// Lifts the refusal for `path`.
    pub fn allow_writes(&mut self, path: &std::path::Path) -> Result<()> {
        let key = inode_key(path)?;
        self.inodes
            .remove(&key)
            .with_context(|| format!("removing {} from the LSM deny map", path.display()))
    }
}

/// The kernel's identity of a file: `sb->s_dev` (major<<20|minor, not
/// glibc's major<<8|minor) and the inode number.
pub fn inode_key(path: &std::path::Path) -> Result<InodeKey> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    let dev = md.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    Ok(InodeKey {
        dev: (major << 20) | minor,
        _pad: 0,
        ino: md.ino(),
    })
}
