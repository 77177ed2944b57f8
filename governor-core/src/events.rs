//! Process lifecycle events, as the kernel reports them (decoded from the
//! ring by the daemon's kernel edge).

use std::time::Duration;

/// A process lifecycle event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Exec(Exec),
    Exit(Exit),
    Fork(Fork),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exec {
    pub pid: u32,
    pub ppid: u32,
    /// Real uid, from the kernel.
    pub uid: u32,
    pub ts_ns: u64,
    pub start_ns: u64,
    pub comm: String,
    pub filename: String,
    pub argv: Vec<String>,
    pub argv_truncated: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub ts_ns: u64,
    pub start_ns: u64,
    pub comm: String,
    /// The exit status when the process exited, `None` when a signal killed it.
    pub code: Option<i32>,
    /// The terminating signal, `None` when the process exited.
    pub signal: Option<i32>,
    pub core_dumped: bool,
}

impl Exit {
    /// How long the process lived, from the kernel's own start time.
    pub fn uptime(&self) -> Duration {
        Duration::from_nanos(self.ts_ns.saturating_sub(self.start_ns))
    }

    /// Whether this death is a clean exit (status 0).
    pub fn is_clean(&self) -> bool {
        self.code == Some(0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fork {
    pub pid: u32,
    pub ppid: u32,
    /// The parent's real uid (the child's too, at fork).
    pub uid: u32,
    pub ts_ns: u64,
    pub start_ns: u64,
    pub comm: String,
}

impl Event {
    pub fn pid(&self) -> u32 {
        match self {
            Event::Exec(e) => e.pid,
            Event::Exit(e) => e.pid,
            Event::Fork(e) => e.pid,
        }
    }

    pub fn ts_ns(&self) -> u64 {
        match self {
            Event::Exec(e) => e.ts_ns,
            Event::Exit(e) => e.ts_ns,
            Event::Fork(e) => e.ts_ns,
        }
    }
}
