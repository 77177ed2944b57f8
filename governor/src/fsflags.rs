//! The kernel's inode flags (`chattr`): immutable and append-only. These are
//! the always-on enforcement layer: once set, the kernel itself refuses
//! writes, for root too, with no daemon in the path.

use std::{fs::File, io, os::fd::AsRawFd};

pub const FS_IMMUTABLE_FL: u32 = 0x0000_0010;
pub const FS_APPEND_FL: u32 = 0x0000_0020;

// _IOR('f', 1, long) and _IOW('f', 2, long) on 64-bit.
const FS_IOC_GETFLAGS: libc::c_ulong = 0x8008_6601;
const FS_IOC_SETFLAGS: libc::c_ulong = 0x4008_6602;

pub fn get_flags(f: &File) -> io::Result<u32> {
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int into `flags`, which we own.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_GETFLAGS, &mut flags) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(flags as u32)
}

/// Sets or clears `flag` on the open file, keeping its other flags.
pub fn set_flag(f: &File, flag: u32, on: bool) -> io::Result<()> {
    let cur = get_flags(f)?;
    let new = if on { cur | flag } else { cur & !flag };
    if new == cur {
        return Ok(());
    }
    let v = new as libc::c_int;
    // SAFETY: FS_IOC_SETFLAGS reads one int from `v`, which outlives the call.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_SETFLAGS, &v) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
