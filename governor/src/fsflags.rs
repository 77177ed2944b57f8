//! The kernel's inode flags (`chattr`): immutable and append-only. These are
//! the always-on enforcement layer: once set, the kernel itself refuses
//! writes, for root too, with no daemon in the path.

use std::{fs::File, io};

use rustix::fs::{ioctl_getflags, ioctl_setflags, IFlags};

pub const FS_IMMUTABLE_FL: u32 = IFlags::IMMUTABLE.bits();
pub const FS_APPEND_FL: u32 = IFlags::APPEND.bits();

pub fn get_flags(f: &File) -> io::Result<u32> {
    Ok(ioctl_getflags(f)?.bits())
}

/// Sets or clears `flag` on the open file, keeping its other flags.
pub fn set_flag(f: &File, flag: u32, on: bool) -> io::Result<()> {
    let cur = get_flags(f)?;
    let new = if on { cur | flag } else { cur & !flag };
    if new == cur {
        return Ok(());
    }
    // Flags this rustix doesn't name are kept as they are.
    Ok(ioctl_setflags(f, IFlags::from_bits_retain(new))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ioctls on a scratch file; setting needs CAP_LINUX_IMMUTABLE and a
    /// filesystem with inode flags, so without them only reading is checked.
    #[test]
    fn sets_and_clears_one_flag() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("f")).unwrap();
        let before = match get_flags(&f) {
            Ok(fl) => fl,
            Err(e) if e.raw_os_error() == Some(libc::ENOTTY) => return,
            Err(e) => panic!("FS_IOC_GETFLAGS: {e}"),
        };
        match set_flag(&f, FS_APPEND_FL, true) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => return,
            Err(e) => panic!("FS_IOC_SETFLAGS: {e}"),
        }
        assert_eq!(get_flags(&f).unwrap(), before | FS_APPEND_FL);
        set_flag(&f, FS_APPEND_FL, false).unwrap();
        assert_eq!(get_flags(&f).unwrap(), before);
    }
}
