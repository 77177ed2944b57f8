//! Processes for the tests that a shell can't make.
//!
//! `governor-fixture leader-exits MS CODE`: the main (leader) thread ends
//! with the kernel's thread exit — what `pthread_exit` does at its end —
//! while a worker thread runs on for MS milliseconds and then exits the
//! process with CODE. The process dies once, with CODE, after MS.
//!
//! `governor-fixture threads N`: N threads that sleep until killed.
//!
//! `governor-fixture flood UID SECS PATH…`: as UID, opens the PATHs for
//! writing round-robin for SECS seconds (each refused by the immutable
//! flag), then prints how many opens it made: an unprivileged flood of
//! attempts.
//!
//! `governor-fixture grow RATE MAX`: touches RATE MiB/s of new memory (in
//! 1 MiB steps) up to MAX MiB, then holds it until killed — a leak without
//! node, for the guest.

use std::time::Duration;

fn arg(n: usize) -> Option<String> {
    std::env::args().nth(n)
}

fn num(n: usize, what: &str) -> u64 {
    arg(n)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("governor-fixture: argument {n} ({what}) must be a number"))
}

fn main() {
    match arg(1).as_deref() {
        Some("leader-exits") => {
            let ms = num(2, "milliseconds");
            let code = num(3, "exit code") as i32;
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(ms));
                std::process::exit(code);
            });
            // SAFETY: SYS_exit ends only the calling thread; nothing of it is
            // used afterwards (the call does not return).
            unsafe { libc::syscall(libc::SYS_exit, 0) };
            unreachable!("SYS_exit returned");
        }
        Some("grow") => {
            let rate = num(2, "MiB per second").max(1);
            let max = num(3, "MiB");
            let mut held: Vec<Vec<u8>> = Vec::new();
            for _ in 0..max {
                // Written, so every page is resident.
                held.push(vec![1u8; 1 << 20]);
                std::thread::sleep(Duration::from_micros(1_000_000 / rate));
            }
            loop {
                std::thread::sleep(Duration::from_secs(3600));
                held[0][0] = held[0][0].wrapping_add(1);
            }
        }
        Some("flood") => {
            let uid = num(2, "uid") as u32;
            let secs = num(3, "seconds");
            let paths: Vec<std::ffi::CString> = std::env::args()
                .skip(4)
                .map(|p| std::ffi::CString::new(p).expect("no NUL in a path"))
                .collect();
            assert!(!paths.is_empty(), "governor-fixture flood: no paths");
            // SAFETY: plain system calls dropping privileges for good.
            let dropped = unsafe {
                libc::setgroups(0, std::ptr::null()) == 0
                    && libc::setgid(uid) == 0
                    && libc::setuid(uid) == 0
            };
            assert!(dropped, "governor-fixture flood: cannot become uid {uid}");
            let end = std::time::Instant::now() + Duration::from_secs(secs);
            let mut made: u64 = 0;
            while std::time::Instant::now() < end {
                for p in &paths {
                    // SAFETY: a NUL-terminated path; the fd (if any) is closed.
                    let fd = unsafe { libc::open(p.as_ptr(), libc::O_WRONLY) };
                    if fd >= 0 {
                        // SAFETY: our own descriptor.
                        unsafe { libc::close(fd) };
                    }
                    made += 1;
                }
            }
            println!("{made}");
        }
        Some("threads") => {
            for _ in 1..num(2, "threads") {
                std::thread::spawn(|| loop {
                    std::thread::sleep(Duration::from_secs(3600));
                });
            }
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        _ => {
            eprintln!("usage: governor-fixture leader-exits MS CODE | threads N");
            std::process::exit(2);
        }
    }
}
