//! Memory pressure (PSI, `/proc/pressure/memory`): a trigger that wakes the
//! daemon as soon as tasks stall on memory, so the system floor is checked
//! then rather than at the next second's tick; and the `avg10` figure that
//! `status` shows.
//!
//! A trigger is a write of `some <stall µs> <window µs>` to the file, kept
//! open; the kernel then signals `POLLPRI` on it whenever tasks stalled on
//! memory for that long within a window. Writing one needs CAP_SYS_RESOURCE
//! on 6.1 (later kernels let anyone arm windows in multiples of 2 s).

use std::{fs::File, io::Write, os::unix::fs::OpenOptionsExt, path::Path};

use anyhow::{Context, Result};
use tokio::io::{unix::AsyncFd, Interest};

/// Where the kernel reports memory pressure.
pub const PRESSURE_MEMORY: &str = "/proc/pressure/memory";

/// Stalls of 200 ms within 2 s: well before the host thrashes, seldom
/// enough to cost nothing when it doesn't. A 2 s window because kernels
/// from 6.5 on accept only multiples of 2 s from a process they don't
/// count as privileged (measured here: a 1 s window is EINVAL for a root
/// shell of this sandbox, whose bounding set lacks CAP_SYS_RESOURCE).
pub const STALL_US: u64 = 200_000;
pub const WINDOW_US: u64 = 2_000_000;

/// An armed PSI trigger.
pub struct PsiTrigger {
    fd: AsyncFd<File>,
}

impl PsiTrigger {
    /// Arms a trigger on `some` memory stalls of `stall_us` within
    /// `window_us`. Must be called inside a tokio runtime.
    pub fn arm(stall_us: u64, window_us: u64) -> Result<Self> {
        let f = open_armed(stall_us, window_us)?;
        // SAFETY: the File owns its fd and moves into the AsyncFd, so the
        // fd stays open for as long as it is registered.
        let fd = unsafe { AsyncFd::register_with_interest(f, Interest::PRIORITY) }
            .context("registering the PSI trigger with tokio")?;
        Ok(PsiTrigger { fd })
    }
}

fn open_armed(stall_us: u64, window_us: u64) -> Result<File> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(PRESSURE_MEMORY)
        .with_context(|| {
            format!(
                "opening {PRESSURE_MEMORY} (a kernel without PSI, or psi=0 on its command line)"
            )
        })?;
    // One write, NUL-terminated, as the kernel's parser expects.
    f.write_all(format!("some {stall_us} {window_us}\0").as_bytes())
            .with_context(|| {
                format!(
                    "arming a PSI trigger ({stall_us} µs in {window_us} µs) on {PRESSURE_MEMORY} (needs CAP_SYS_RESOURCE on 6.1)"
                )
            })?;
    Ok(f)
}

impl PsiTrigger {
    /// `doctor`: whether a trigger can be armed here (then dropped).
    pub fn probe() -> Result<()> {
        open_armed(STALL_US, WINDOW_US).map(drop)
    }

    /// Waits until the trigger fires.
    pub async fn fired(&mut self) {
        match self.fd.ready(Interest::PRIORITY).await {
            Ok(mut g) => g.clear_ready(),
            // Broken registration: never fires again (the 1 s tick still
            // checks the floor).
            Err(_) => std::future::pending().await,
        }
    }
}

/// `some avg10` of memory pressure (percent of the last 10 s that some
/// task stalled on memory), or `None` without PSI.
pub fn some_avg10() -> Option<f64> {
    parse_some_avg10(&std::fs::read_to_string(Path::new(PRESSURE_MEMORY)).ok()?)
}

/// `avg10` of the `some` line of a pressure file.
pub fn parse_some_avg10(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    line.split_ascii_whitespace()
        .find_map(|f| f.strip_prefix("avg10="))?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_some_line() {
        let t = "some avg10=1.25 avg60=0.30 avg300=0.00 total=12345\n\
                 full avg10=0.50 avg60=0.00 avg300=0.00 total=100\n";
        assert_eq!(parse_some_avg10(t), Some(1.25));
        assert_eq!(parse_some_avg10("full avg10=0.50\n"), None);
        assert_eq!(parse_some_avg10(""), None);
    }
}
