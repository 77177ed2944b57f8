//! The BPF LSM layer: governor's `file_open` program refuses write opens of
//! one inode while reads keep working. Only kernels that allow BPF LSM can
//! run it: on our 6.18 host the kernel refuses it (EPERM) and the test says
//! so; inside the qemu guest it must run and deny.

use std::{fs, io::Write};

use governor::probes::LsmGuard;
use governor_tests::{in_vm, require_root};

#[test]
fn lsm_denies_writes_to_one_inode() {
    require_root();
    let guard = LsmGuard::load();
    let mut guard = match guard {
        Ok(g) => g,
        Err(e) if !in_vm() => {
            // The host kernel refuses BPF LSM; the guest run covers it.
            println!(
                "BPF LSM unavailable on this kernel ({}): {e:#}",
                governor::doctor::kernel_release()
            );
            assert!(
                format!("{e:#}").contains("LSM"),
                "the refusal must say it is about BPF LSM: {e:#}"
            );
            return;
        }
        Err(e) => panic!("in the guest BPF LSM must load and attach: {e:#}"),
    };
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let protected = dir.path().join("protected.txt");
    let other = dir.path().join("other.txt");
    fs::write(&protected, b"original\n").unwrap();
    fs::write(&other, b"x\n").unwrap();
    guard.deny_writes(&protected).unwrap();

    let err = fs::OpenOptions::new()
        .append(true)
        .open(&protected)
        .unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EPERM), "append open: {err}");
    let err = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&protected)
        .unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EPERM),
        "truncating open: {err}"
    );
    // Through a hard link: same inode, same refusal.
    let link = dir.path().join("link.txt");
    fs::hard_link(&protected, &link).unwrap();
    let err = fs::OpenOptions::new().write(true).open(&link).unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EPERM),
        "write via hard link: {err}"
    );

    assert_eq!(
        fs::read(&protected).unwrap(),
        b"original\n",
        "reads still work"
    );
    fs::OpenOptions::new()
        .append(true)
        .open(&other)
        .unwrap()
        .write_all(b"y\n")
        .unwrap();

    guard.allow_writes(&protected).unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(&protected)
        .unwrap()
        .write_all(b"more\n")
        .unwrap();
    println!(
        "BPF LSM denied write opens with EPERM on {}",
        governor::doctor::kernel_release()
    );
}
