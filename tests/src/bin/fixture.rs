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
//! `governor-fixture renames SECS DIR NAME`: renames DIR/a to DIR/NAME and
//! back (as whoever runs it) until its stdin is closed, or SECS seconds at
//! most, then prints how many renames it made: successful calls on a name
//! a protected file also has — what a program renaming its own
//! `audit.jsonl` does.
//!
//! `governor-fixture storm UID SECS WORKERS`: as UID, WORKERS threads run
//! /bin/true back to back for SECS seconds; prints how many ran.
//!
//! `governor-fixture open-via uring|int80|syscall PATH`: opens PATH for
//! writing through io_uring (IORING_OP_OPENAT), the 32-bit `int 0x80`
//! ABI, or plain openat(2), and prints the result (an fd, or -errno):
//! the paths a write attempt can take into the kernel.
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
        Some("renames") => {
            let secs = num(2, "seconds");
            let dir = std::path::PathBuf::from(arg(3).expect("governor-fixture renames: DIR"));
            let name = arg(4).expect("governor-fixture renames: NAME");
            let (a, b) = (dir.join("a"), dir.join(&name));
            std::fs::write(&a, "x").expect("governor-fixture renames: creating DIR/a");
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let stopper = stop.clone();
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
                stopper.store(true, std::sync::atomic::Ordering::Relaxed);
            });
            let end = std::time::Instant::now() + Duration::from_secs(secs);
            let mut made: u64 = 0;
            while std::time::Instant::now() < end
                && !stop.load(std::sync::atomic::Ordering::Relaxed)
            {
                std::fs::rename(&a, &b).expect("governor-fixture renames: a to NAME");
                std::fs::rename(&b, &a).expect("governor-fixture renames: NAME to a");
                made += 2;
            }
            println!("{made}");
        }
        Some("storm") => {
            // A fork/exec storm as `uid`: `workers` threads each running
            // /bin/true back to back for `secs`; prints how many ran.
            let uid = num(2, "uid") as u32;
            let secs = num(3, "seconds");
            let workers = num(4, "workers").max(1);
            // SAFETY: plain system calls dropping privileges for good.
            let dropped = unsafe {
                libc::setgroups(0, std::ptr::null()) == 0
                    && libc::setgid(uid) == 0
                    && libc::setuid(uid) == 0
            };
            assert!(dropped, "governor-fixture storm: cannot become uid {uid}");
            let end = std::time::Instant::now() + Duration::from_secs(secs);
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    std::thread::spawn(move || {
                        let mut n = 0u64;
                        while std::time::Instant::now() < end {
                            if std::process::Command::new("/bin/true").status().is_ok() {
                                n += 1;
                            }
                        }
                        n
                    })
                })
                .collect();
            let made: u64 = handles.into_iter().map(|h| h.join().unwrap_or(0)).sum();
            println!("{made}");
        }
        Some("open-via") => {
            let how = arg(2).unwrap_or_default();
            let path = std::ffi::CString::new(arg(3).expect("governor-fixture open-via: PATH"))
                .expect("no NUL in a path");
            let r = match how.as_str() {
                "uring" => open_uring(&path),
                "int80" => open_int80(&path),
                "syscall" => {
                    // SAFETY: a NUL-terminated path; the fd (if any) is ours.
                    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY) };
                    if fd < 0 {
                        -std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
                    } else {
                        fd
                    }
                }
                other => panic!("governor-fixture open-via: unknown way {other:?}"),
            };
            println!("{r}");
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
            eprintln!(
                "usage: governor-fixture leader-exits MS CODE | threads N | grow RATE MAX \
                 | flood UID SECS PATH… | storm UID SECS WORKERS"
            );
            std::process::exit(2);
        }
    }
}

/// openat(AT_FDCWD, path, O_WRONLY) submitted through an io_uring: the
/// kernel's io_uring worker opens it, no open syscall is made.
fn open_uring(path: &std::ffi::CStr) -> i32 {
    let mut ring = io_uring::IoUring::new(2).expect("io_uring_setup");
    let sqe = io_uring::opcode::OpenAt::new(io_uring::types::Fd(libc::AT_FDCWD), path.as_ptr())
        .flags(libc::O_WRONLY)
        .build();
    // SAFETY: the path outlives the submission (we wait for completion).
    unsafe { ring.submission().push(&sqe).expect("submission queue full") };
    ring.submit_and_wait(1).expect("io_uring_enter");
    let cqe = ring.completion().next().expect("a completion");
    cqe.result()
}

/// open(path, O_WRONLY) through the 32-bit ABI (`int 0x80`, syscall 5),
/// which 64-bit syscall hooks don't see. The path must sit below 4 GiB.
#[cfg(target_arch = "x86_64")]
fn open_int80(path: &std::ffi::CStr) -> i32 {
    let bytes = path.to_bytes_with_nul();
    assert!(bytes.len() < 4096, "path too long for one page");
    // SAFETY: a fresh private anonymous page below 4 GiB (MAP_32BIT).
    let page = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_32BIT,
            -1,
            0,
        )
    };
    assert_ne!(page, libc::MAP_FAILED, "mmap MAP_32BIT");
    // SAFETY: the page is ours and larger than the path.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), page.cast::<u8>(), bytes.len()) };
    let addr = page as usize as u32;
    let ret: i32;
    // SAFETY: the i386 open syscall (eax 5) with ebx = the path (below
    // 4 GiB), ecx = flags, edx = mode; rbx is LLVM's, so it is saved and
    // restored around the call. int 0x80 clobbers only eax (the result).
    unsafe {
        std::arch::asm!(
            "push rbx",
            "mov ebx, {p:e}",
            "int 0x80",
            "pop rbx",
            p = in(reg) addr,
            inlateout("eax") 5i32 => ret,
            in("ecx") libc::O_WRONLY,
            in("edx") 0i32,
        );
    }
    ret
}

#[cfg(not(target_arch = "x86_64"))]
fn open_int80(_path: &std::ffi::CStr) -> i32 {
    panic!("int 0x80 is x86_64 only")
}
