//! Typed lifecycle events decoded from the ring buffer.
//!
//! Kernel events cross a trust boundary like any other input: every length
//! is checked against the record before it is used, and a malformed record
//! is an error, never a panic.

use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Result};
use governor_common::{
    EventHeader, EventKind, ExecEvent, ExitEvent, ForkEvent, ARGV_MAX, FILENAME_MAX,
};

pub use governor_core::events::{Event, Exec, Exit, Fork};

/// Splits the `wait(2)`-style `task_struct.exit_code` into (code, signal, core).
pub fn split_exit_code(raw: u32) -> (Option<i32>, Option<i32>, bool) {
    let sig = (raw & 0x7f) as i32;
    if sig == 0 {
        (Some(((raw >> 8) & 0xff) as i32), None, false)
    } else {
        (None, Some(sig), raw & 0x80 != 0)
    }
}

fn cstr(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Reads a `T` from the start of `buf` after checking its size.
fn read<T: Copy>(buf: &[u8]) -> Result<T> {
    ensure!(
        buf.len() >= std::mem::size_of::<T>(),
        "event record too short: {} bytes, need {}",
        buf.len(),
        std::mem::size_of::<T>()
    );
    // SAFETY: the length was checked above, `T` is one of the #[repr(C)]
    // plain-data event structs (any bit pattern valid), and read_unaligned
    // copes with the ring's 8-byte alignment not matching T's.
    Ok(unsafe { std::ptr::read_unaligned(buf.as_ptr().cast::<T>()) })
}

/// Decodes one ring-buffer record.
pub fn decode(buf: &[u8]) -> Result<Event> {
    let hdr: EventHeader = read(buf)?;
    match EventKind::from_u32(hdr.kind) {
        Some(EventKind::Exec) => {
            let e: ExecEvent = read(buf)?;
            let flen = (e.filename_len as usize).min(FILENAME_MAX);
            let alen = e.argv_len as usize;
            ensure!(alen <= ARGV_MAX, "exec event argv_len {alen} > {ARGV_MAX}");
            let argv = e.argv[..alen]
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect::<Vec<_>>();
            // The block ends with a NUL, which leaves one empty tail item.
            let argv = match argv.split_last() {
                Some((last, rest)) if last.is_empty() => rest.to_vec(),
                _ => argv,
            };
            Ok(Event::Exec(Exec {
                pid: hdr.pid,
                ppid: hdr.ppid,
                uid: hdr.uid,
                ts_ns: hdr.ts_ns,
                start_ns: hdr.start_ns,
                comm: cstr(&e.comm),
                filename: cstr(&e.filename[..flen]),
                argv,
                argv_truncated: e.argv_truncated != 0,
            }))
        }
        Some(EventKind::Exit) => {
            let e: ExitEvent = read(buf)?;
            let (code, signal, core_dumped) = split_exit_code(e.exit_code);
            Ok(Event::Exit(Exit {
                pid: hdr.pid,
                ppid: hdr.ppid,
                uid: hdr.uid,
                ts_ns: hdr.ts_ns,
                start_ns: hdr.start_ns,
                comm: cstr(&e.comm),
                code,
                signal,
                core_dumped,
            }))
        }
        Some(EventKind::Fork) => {
            let e: ForkEvent = read(buf)?;
            Ok(Event::Fork(Fork {
                pid: hdr.pid,
                ppid: hdr.ppid,
                uid: hdr.uid,
                ts_ns: hdr.ts_ns,
                start_ns: hdr.start_ns,
                comm: cstr(&e.comm),
            }))
        }
        None => bail!("unknown event kind {}", hdr.kind),
    }
}

/// Converts kernel CLOCK_MONOTONIC nanoseconds to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// Wall-clock time minus monotonic time, in ns, sampled once.
    offset_ns: i128,
}

impl Clock {
    pub fn new() -> Self {
        let mono = monotonic_ns() as i128;
        let wall = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(0);
        Clock {
            offset_ns: wall - mono,
        }
    }

    /// Wall-clock time of a kernel timestamp.
    pub fn wall(&self, mono_ns: u64) -> SystemTime {
        let ns = (mono_ns as i128 + self.offset_ns).max(0) as u128;
        SystemTime::UNIX_EPOCH + Duration::from_nanos(ns as u64)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

/// CLOCK_MONOTONIC now, in ns: the clock `bpf_ktime_get_ns` and
/// `task_struct.start_time` use.
pub fn monotonic_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Formats a wall-clock time as RFC 3339 UTC with milliseconds (the audit
/// log's own format, one implementation).
pub fn rfc3339(t: SystemTime) -> String {
    governor_audit::time::format_rfc3339_millis(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_wait_status() {
        assert_eq!(split_exit_code(0), (Some(0), None, false));
        assert_eq!(split_exit_code(3 << 8), (Some(3), None, false));
        assert_eq!(split_exit_code(9), (None, Some(9), false));
        assert_eq!(split_exit_code(11 | 0x80), (None, Some(11), true));
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        assert!(decode(&[0u8; 4]).is_err());
        let mut buf = [0u8; 64];
        buf[0] = 77;
        assert!(decode(&buf).is_err());
    }

    #[test]
    fn decodes_exec_argv() {
        // SAFETY (test): ExecEvent is plain #[repr(C)] data; all zeroes is valid.
        let mut e: ExecEvent = unsafe { std::mem::zeroed() };
        e.hdr.kind = EventKind::Exec as u32;
        e.hdr.pid = 42;
        let args = b"/bin/sh\0-c\0exit 3\0";
        e.argv[..args.len()].copy_from_slice(args);
        e.argv_len = args.len() as u32;
        e.filename[..7].copy_from_slice(b"/bin/sh");
        e.filename_len = 7;
        // SAFETY (test): viewing a plain-data struct as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&e as *const ExecEvent).cast::<u8>(),
                std::mem::size_of::<ExecEvent>(),
            )
        };
        let Event::Exec(x) = decode(bytes).unwrap() else {
            panic!("not exec")
        };
        assert_eq!(x.pid, 42);
        assert_eq!(x.filename, "/bin/sh");
        assert_eq!(x.argv, vec!["/bin/sh", "-c", "exit 3"]);
        e.argv_len = 9999;
        // SAFETY (test): as above.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&e as *const ExecEvent).cast::<u8>(),
                std::mem::size_of::<ExecEvent>(),
            )
        };
        assert!(decode(bytes).is_err());
    }

    #[test]
    fn formats_rfc3339() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_824_000_123);
        assert_eq!(rfc3339(t), "2026-11-28T00:00:00.123Z");
    }
}
