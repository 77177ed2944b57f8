//! The kernel's append-only inode attribute (`chattr +a`, `FS_APPEND_FL`).
//!
//! With it set, even root cannot open the file for writing without O_APPEND,
//! truncate, rename or unlink it — only a holder of CAP_LINUX_IMMUTABLE who
//! first clears the flag can. That turns "edit the log" into "clear a flag,
//! edit, set it back", which the protected-files layer can watch for.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `FS_APPEND_FL` from `<linux/fs.h>` (not exported by the libc crate).
pub const FS_APPEND_FL: libc::c_int = 0x0000_0020;

/// Reads the inode flags (`FS_IOC_GETFLAGS`).
pub fn get_flags(file: &File) -> io::Result<libc::c_int> {
    let mut flags: libc::c_int = 0;
    // SAFETY: the fd is valid for the lifetime of `file`, and FS_IOC_GETFLAGS
    // writes one int (the kernel uses an int despite the `long` in the ioctl
    // number; e2fsprogs passes an int too) into `flags`, which outlives the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut flags) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags)
}

/// Writes the inode flags (`FS_IOC_SETFLAGS`).
pub fn set_flags(file: &File, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: the fd is valid for the lifetime of `file`, and FS_IOC_SETFLAGS
    // only reads one int from the pointer, which points at a live local.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether the file currently has FS_APPEND_FL.
pub fn is_append_only(file: &File) -> io::Result<bool> {
    Ok(get_flags(file)? & FS_APPEND_FL != 0)
}

/// Sets or clears FS_APPEND_FL, leaving the other flags alone. Returns whether
/// the flag was set before. Needs CAP_LINUX_IMMUTABLE (EPERM otherwise); fails
/// with ENOTTY/EOPNOTSUPP/EINVAL where the filesystem has no such flag.
pub fn set_append_only(file: &File, on: bool) -> io::Result<bool> {
    let flags = get_flags(file)?;
    let was = flags & FS_APPEND_FL != 0;
    if was != on {
        let new = if on {
            flags | FS_APPEND_FL
        } else {
            flags & !FS_APPEND_FL
        };
        set_flags(file, new)?;
    }
    Ok(was)
}

/// Runs `f` with FS_APPEND_FL cleared on `file`, restoring it afterwards if it
/// was set (also when `f` fails). A filesystem without inode flags simply runs
/// `f`. Used for the few operations the flag forbids: truncating a torn tail
/// and renaming the file at rotation.
pub fn with_append_cleared<T>(
    file: &File,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let was = match get_flags(file) {
        Ok(flags) => flags & FS_APPEND_FL != 0,
        Err(e) if is_unsupported(&e) => false,
        Err(e) => return Err(anyhow::Error::new(e).context("reading inode flags")),
    };
    if was {
        set_append_only(file, false).map_err(|e| {
            anyhow::Error::new(e)
                .context("clearing the append-only flag (needs CAP_LINUX_IMMUTABLE)")
        })?;
    }
    let r = f();
    if was {
        if let Err(e) = set_append_only(file, true) {
            let restore = anyhow::Error::new(e).context("restoring the append-only flag");
            return match r {
                Ok(_) => Err(restore),
                Err(orig) => Err(orig.context(format!("{restore:#}"))),
            };
        }
    }
    r
}

/// Errors meaning "this filesystem has no inode flags", as opposed to a
/// permission problem.
pub fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTTY) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS)
    )
}
