//! Memory readings for the memory-budget policy (`governor_core::memory`):
//! a service's memory is its instances' RSS plus the private resident
//! memory (resident − shared) of the helpers they spawned, so a
//! single-process node app reads as pm2 reads it and its children count
//! too. Each process is read through a `/proc/PID` directory descriptor
//! opened once and kept: once that process is gone every read through it
//! fails, so a reused pid is never read as the service.

use std::{collections::HashMap, os::fd::OwnedFd};

use rustix::fs::{Mode, OFlags};

use crate::proctable::ProcTable;

/// A service's memory at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reading {
    pub bytes: u64,
    /// Live instances read (pid, start).
    pub instances: Vec<(u32, u64)>,
    /// Helpers whose private memory counted.
    pub helpers: usize,
    /// Every process read (instances and helpers): the ones the kernel
    /// tracker counts for the service.
    pub pids: Vec<u32>,
    /// `bytes` is the processes' summed Pss (`smaps_rollup`), not statm's
    /// figures: the confirming reading of a multi-process service.
    pub by_pss: bool,
}

impl Reading {
    /// Start of the oldest instance: the run the reading belongs to.
    pub fn run_start_ns(&self) -> u64 {
        self.instances.iter().map(|&(_, s)| s).min().unwrap_or(0)
    }
}

/// Reads `/proc/PID/statm` through kept directory descriptors.
pub struct Sampler {
    dirs: HashMap<u32, OwnedFd>,
    page: u64,
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler {
            dirs: HashMap::new(),
            page: rustix::param::page_size() as u64,
        }
    }
}

/// `resident shared` (pages) from a statm line: `size resident shared …`.
pub fn parse_statm(s: &str) -> Option<(u64, u64)> {
    let mut f = s.split_ascii_whitespace().skip(1);
    let resident = f.next()?.parse().ok()?;
    let shared = f.next()?.parse().ok()?;
    Some((resident, shared))
}

impl Sampler {
    /// (resident, shared) bytes of `pid`, or `None` once it is gone.
    fn statm(&mut self, pid: u32) -> Option<(u64, u64)> {
        let dir = match self.dirs.entry(pid) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let fd = rustix::fs::open(
                    format!("/proc/{pid}"),
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .ok()?;
                v.insert(fd)
            }
        };
        let read = || -> Option<(u64, u64)> {
            let f = rustix::fs::openat(
                &*dir,
                "statm",
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .ok()?;
            let mut buf = [0u8; 128];
            let n = rustix::io::read(&f, &mut buf).ok()?;
            parse_statm(std::str::from_utf8(&buf[..n]).ok()?)
        };
        match read() {
            Some((r, s)) => Some((r * self.page, s * self.page)),
            None => {
                self.dirs.remove(&pid);
                None
            }
        }
    }

    /// Reads every service in `services` (by name) in one pass over the
    /// table.
    pub fn read(&mut self, table: &ProcTable, services: &[&str]) -> HashMap<String, Reading> {
        let mut out: HashMap<String, Reading> = HashMap::new();
        for p in table.iter() {
            if !services.contains(&p.service.as_str()) {
                continue;
            }
            let Some((resident, shared)) = self.statm(p.pid) else {
                continue;
            };
            let r = out.entry(p.service.clone()).or_insert(Reading {
                bytes: 0,
                instances: Vec::new(),
                helpers: 0,
                pids: Vec::new(),
                by_pss: false,
            });
            r.pids.push(p.pid);
            if p.instance {
                r.bytes += resident;
                r.instances.push((p.pid, p.start_ns));
            } else {
                r.bytes += resident.saturating_sub(shared);
                r.helpers += 1;
            }
        }
        // A service whose instances are all gone has no reading.
        out.retain(|_, r| !r.instances.is_empty());
        out
    }

    /// The summed Pss of `pids` (`smaps_rollup`, through the kept
    /// descriptors), or `None` if any of them can't be read. Pss shares
    /// each shared page among the processes mapping it, so a parent and
    /// its helpers are counted once — but reading it takes each target's
    /// mm lock (~0.5 ms), so it is read only to confirm a breach, never
    /// polled.
    pub fn pss(&mut self, pids: &[u32]) -> Option<u64> {
        let mut total: u64 = 0;
        for &pid in pids {
            let dir = self.dirs.get(&pid)?;
            let f = rustix::fs::openat(
                dir,
                "smaps_rollup",
                OFlags::RDONLY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .ok()?;
            let mut buf = [0u8; 2048];
            let n = rustix::io::read(&f, &mut buf).ok()?;
            total =
                total.checked_add(parse_meminfo(std::str::from_utf8(&buf[..n]).ok()?, "Pss:")?)?;
        }
        Some(total)
    }

    /// Drops the descriptor of a process that exited.
    pub fn forget(&mut self, pid: u32) {
        self.dirs.remove(&pid);
    }

    /// Descriptors kept (bounded by the processes of configured services).
    pub fn len(&self) -> usize {
        self.dirs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dirs.is_empty()
    }
}

/// Waits up to `timeout` for the processes behind `pidfds` to exit, then
/// sends SIGKILL through the descriptor to each still alive (a pidfd only
/// ever reaches its own process). Returns the pids killed.
pub fn reap(pidfds: Vec<(u32, OwnedFd)>, timeout: std::time::Duration) -> Vec<u32> {
    use rustix::event::{poll, PollFd, PollFlags};
    let end = std::time::Instant::now() + timeout;
    let mut killed = Vec::new();
    for (pid, fd) in pidfds {
        // A pidfd is readable once its process has exited.
        let left = end.saturating_duration_since(std::time::Instant::now());
        let ts = rustix::event::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: left.subsec_nanos() as i64,
        };
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        let exited = matches!(poll(&mut fds, Some(&ts)), Ok(n) if n > 0);
        if !exited && rustix::process::pidfd_send_signal(&fd, rustix::process::Signal::KILL).is_ok()
        {
            killed.push(pid);
            release_memory(&fd);
        }
    }
    killed
}

/// Each process a stop ended: pid, how, ms after the stop began.
pub type Ended = Vec<(u32, String, u64)>;

/// Makes sure the processes behind `pidfds` end: each gets up to `grace`
/// to exit (its supervisor was asked to stop it), then SIGTERM, then after
/// another second SIGKILL. How each ended ("exited", "SIGTERM", "SIGKILL")
/// and when, in ms from the call (for a SIGKILL: when it was sent).
pub fn end_processes(pidfds: Vec<(u32, OwnedFd)>, grace: std::time::Duration) -> Ended {
    let t0 = std::time::Instant::now();
    let ms = || t0.elapsed().as_millis() as u64;
    use rustix::event::{poll, PollFd, PollFlags};
    use rustix::process::{pidfd_send_signal, Signal};
    let wait = |fd: &OwnedFd, until: std::time::Instant| {
        let left = until.saturating_duration_since(std::time::Instant::now());
        let ts = rustix::event::Timespec {
            tv_sec: left.as_secs() as i64,
            tv_nsec: left.subsec_nanos() as i64,
        };
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        matches!(poll(&mut fds, Some(&ts)), Ok(n) if n > 0)
    };
    let end = std::time::Instant::now() + grace;
    let mut out = Vec::new();
    let mut left = Vec::new();
    for (pid, fd) in pidfds {
        if wait(&fd, end) {
            out.push((pid, "exited".to_string(), ms()));
        } else {
            let _ = pidfd_send_signal(&fd, Signal::TERM);
            left.push((pid, fd));
        }
    }
    let end = std::time::Instant::now() + std::time::Duration::from_secs(1);
    for (pid, fd) in left {
        if wait(&fd, end) {
            out.push((pid, "SIGTERM".to_string(), ms()));
        } else {
            let _ = pidfd_send_signal(&fd, Signal::KILL);
            release_memory(&fd);
            out.push((pid, "SIGKILL".to_string(), ms()));
        }
    }
    out
}

/// `process_mrelease(2)` (5.15+) after a SIGKILL: the victim's memory is
/// freed now, by us, rather than whenever its exit gets to it (a process
/// stuck in the kernel may take long). Best effort: an older kernel
/// (ENOSYS) or a process already gone changes nothing.
pub fn release_memory(pidfd: &OwnedFd) {
    use std::os::fd::AsRawFd;
    // SAFETY: process_mrelease takes a pidfd and flags (0) and touches no
    // memory of ours; the fd is open for the duration of the call.
    let r = unsafe { libc::syscall(libc::SYS_process_mrelease, pidfd.as_raw_fd(), 0) };
    if r != 0 {
        log::debug!("process_mrelease: {}", std::io::Error::last_os_error());
    }
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
pub fn mem_available() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&s, "MemAvailable:")
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
pub fn mem_total() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&s, "MemTotal:")
}

/// A `/proc/meminfo` field in bytes (the file says kB).
pub fn parse_meminfo(s: &str, key: &str) -> Option<u64> {
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        // Checked: a value past u64 in bytes is no reading (found by the
        // proc_parsers fuzzer).
        .and_then(|kb| kb.checked_mul(1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statm_and_meminfo_parse() {
        assert_eq!(parse_statm("1000 250 40 1 0 300 0\n"), Some((250, 40)));
        assert_eq!(parse_statm("1000"), None);
        assert_eq!(
            parse_meminfo(
                "MemTotal: 100 kB\nMemAvailable:    2048 kB\n",
                "MemAvailable:"
            ),
            Some(2 << 20)
        );
        // fuzz/regressions/proc_parsers/meminfo-kb-overflow
        assert_eq!(
            parse_meminfo("MemTotal: 18014398509481984 kB\n", "MemTotal:"),
            None
        );
    }

    /// Our own process through a kept descriptor: a plausible RSS that
    /// grows when we touch 32 MiB.
    #[test]
    fn reads_a_live_process_and_sees_it_grow() {
        let mut s = Sampler::default();
        let me = std::process::id();
        let (before, _) = s.statm(me).expect("our own statm");
        let v = vec![1u8; 32 << 20];
        let (after, _) = s.statm(me).expect("our own statm");
        assert!(v.iter().map(|&b| b as u64).sum::<u64>() == 32 << 20);
        assert!(after >= before + (30 << 20), "{before} → {after}");
        assert_eq!(s.len(), 1);
    }

    /// A process that is gone reads as gone, and its descriptor is
    /// dropped: a new process with the same pid would not be read.
    #[test]
    fn a_dead_process_is_never_read_again() {
        let mut s = Sampler::default();
        let mut c = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .unwrap();
        let pid = c.id();
        assert!(s.statm(pid).is_some());
        c.kill().unwrap();
        c.wait().unwrap();
        assert!(s.statm(pid).is_none());
        assert!(s.is_empty());
    }

    /// One process that exits in time, one that ignores SIGTERM: only the
    /// second is killed, after the timeout.
    #[test]
    fn reap_kills_what_outlives_the_timeout() {
        use rustix::process::{pidfd_open, Pid, PidfdFlags};
        let mut quick = std::process::Command::new("sh")
            .args(["-c", "sleep 0.1"])
            .spawn()
            .unwrap();
        let mut stubborn = std::process::Command::new("sh")
            .args(["-c", "trap '' TERM; sleep 30"])
            .spawn()
            .unwrap();
        let fd = |c: &std::process::Child| {
            pidfd_open(Pid::from_raw(c.id() as i32).unwrap(), PidfdFlags::empty()).unwrap()
        };
        let fds = vec![(quick.id(), fd(&quick)), (stubborn.id(), fd(&stubborn))];
        let t0 = std::time::Instant::now();
        let killed = reap(fds, std::time::Duration::from_millis(700));
        assert_eq!(killed, vec![stubborn.id()]);
        assert!(t0.elapsed() >= std::time::Duration::from_millis(650));
        quick.wait().unwrap();
        let st = stubborn.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(st.signal(), Some(9));
    }
}
