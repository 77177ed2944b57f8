//! Turns a raw [`AttemptEvent`] into who did what to which path.
//!
//! A refused path-based call leaves no fd behind, so the kernel sends the
//! path as the process gave it plus the inode of the directory it is
//! relative to (cwd or dirfd). Here the path is made absolute — through
//! `/proc/PID/cwd` (or `/proc/PID/fd/N`) when the process is still there and
//! that directory is the same inode, else through the index of directories
//! on the way to protected files — and then confirmed by inode.

use std::{
    collections::HashMap,
    os::unix::fs::MetadataExt,
    path::{Component, Path, PathBuf},
};

use governor_common::{
    protect::{
        AttemptEvent, Op, VALID_BASE0, VALID_BASE1, VALID_EXE_WHOLE, VALID_KEY, VALID_PATH0,
        VALID_PATH1,
    },
    InodeKey,
};

const AT_FDCWD: i32 = -100;
const AT_SYMLINK_NOFOLLOW: u64 = 0x100;
const AT_SYMLINK_FOLLOW: u64 = 0x400;

/// The kernel's identity of the file at `path` (`follow`: stat, else lstat).
pub fn key_of(path: &Path, follow: bool) -> Option<InodeKey> {
    let md = if follow {
        std::fs::metadata(path)
    } else {
        std::fs::symlink_metadata(path)
    }
    .ok()?;
    Some(key_from_md(&md))
}

pub fn key_from_md(md: &std::fs::Metadata) -> InodeKey {
    let dev = md.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    InodeKey {
        dev: (major << 20) | minor,
        _pad: 0,
        ino: md.ino(),
    }
}

/// `dev:ino` as shown to humans: `major:minor:ino`.
pub fn key_string(k: &InodeKey) -> String {
    format!("{}:{}:{}", k.dev >> 20, k.dev & 0xfffff, k.ino)
}

pub fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Removes `.` and resolves `..` lexically.
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    out
}

/// One path argument of an attempt.
#[derive(Debug, Clone)]
pub struct PathArg {
    /// As the process gave it.
    pub given: String,
    /// Absolute, when it could be made so.
    pub absolute: Option<PathBuf>,
    /// Whether the call follows a final symlink.
    pub follow: bool,
}

/// A decoded attempt.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub op: Op,
    pub syscall: String,
    pub pid: u32,
    pub tid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub ret: i64,
    pub ts_ns: u64,
    pub comm: String,
    pub exe: String,
    pub key: Option<InodeKey>,
    pub paths: Vec<PathArg>,
    pub flags: u64,
    pub arg: u64,
}

impl Attempt {
    pub fn allowed(&self) -> bool {
        self.ret >= 0
    }

    pub fn errno_name(&self) -> Option<String> {
        if self.ret >= 0 {
            return None;
        }
        // From the kernel record: any i64, i64::MIN included (found by the
        // event_decode fuzz target), so no plain negation.
        let e = i32::try_from(self.ret.unsigned_abs()).unwrap_or(i32::MAX);
        Some(
            match e {
                libc::EPERM => "EPERM",
                libc::EACCES => "EACCES",
                libc::ENOENT => "ENOENT",
                libc::EEXIST => "EEXIST",
                libc::EROFS => "EROFS",
                libc::ETXTBSY => "ETXTBSY",
                libc::EINVAL => "EINVAL",
                libc::ENOTTY => "ENOTTY",
                libc::EOPNOTSUPP => "EOPNOTSUPP",
                _ => return Some(format!("errno {e}")),
            }
            .to_string(),
        )
    }
}

/// The executable path from its dentry names (leaf first).
fn exe_path(ev: &AttemptEvent) -> String {
    let depth = (ev.exe_depth as usize).min(ev.exe.len());
    let mut comps: Vec<String> = ev.exe[..depth].iter().map(|c| cstr(c)).collect();
    let complete = comps.last().map(|c| c == "/").unwrap_or(false);
    if complete {
        comps.pop();
    }
    comps.reverse();
    let joined = comps.join("/");
    if complete {
        format!("/{joined}")
    } else if joined.is_empty() {
        String::new()
    } else {
        format!("…/{joined}")
    }
}

/// The executable's path. The kernel side walks the dentries up to `/`,
/// across mounts, and says when it got there (`VALID_EXE_WHOLE`): that path
/// is taken as it is. Deeper than the `EXE_DEPTH` names it carries (or on a
/// kernel whose BTF lacks `struct mount`, where the walk stops at the
/// binary's own mount), the live process's `/proc/PID/exe` completes it
/// when it ends with what the kernel saw (a process already gone keeps the
/// kernel's part).
fn exe_of(ev: &AttemptEvent) -> String {
    let seen = exe_path(ev);
    let tail = seen.trim_start_matches('…');
    if tail.is_empty() || ev.valid & VALID_EXE_WHOLE != 0 {
        return seen;
    }
    match std::fs::read_link(format!("/proc/{}/exe", ev.pid)) {
        Ok(p) => {
            let p = p.to_string_lossy();
            let p = p.trim_end_matches(" (deleted)");
            if p.ends_with(tail) {
                p.to_string()
            } else {
                seen
            }
        }
        Err(_) => seen,
    }
}

/// The directory a relative path was resolved from.
fn base_dir(
    pid: u32,
    dirfd: i32,
    base: Option<InodeKey>,
    dirs: &HashMap<InodeKey, PathBuf>,
) -> Option<PathBuf> {
    let proc_link = if dirfd == AT_FDCWD {
        PathBuf::from(format!("/proc/{pid}/cwd"))
    } else {
        PathBuf::from(format!("/proc/{pid}/fd/{dirfd}"))
    };
    if let Ok(target) = std::fs::read_link(&proc_link) {
        // Same directory the kernel saw (the process may have moved on, or
        // the pid been reused)?
        let same = match base {
            Some(b) => key_of(&proc_link, true) == Some(b),
            None => true,
        };
        if same && target.is_absolute() {
            return Some(target);
        }
    }
    base.and_then(|b| dirs.get(&b).cloned())
}

/// Decodes `ev`, making its paths absolute.
pub fn decode(
    ev: &AttemptEvent,
    syscall: &str,
    kind: u8,
    nofollow: bool,
    dirs: &HashMap<InodeKey, PathBuf>,
) -> Option<Attempt> {
    let op = Op::from_u8(ev.op as u8)?;
    let mut paths = Vec::new();
    // Whether the final component is followed.
    let mut follow = !nofollow;
    if ev.flags & AT_SYMLINK_NOFOLLOW != 0 && kind != governor_common::protect::KIND_OPEN {
        follow = false;
    }
    if op == Op::Link && ev.flags & AT_SYMLINK_FOLLOW != 0 {
        follow = true;
    }
    for (valid_path, valid_base, buf, dirfd, base) in [
        (VALID_PATH0, VALID_BASE0, &ev.path0, ev.dirfd0, ev.base0),
        (VALID_PATH1, VALID_BASE1, &ev.path1, ev.dirfd1, ev.base1),
    ] {
        if ev.valid & valid_path == 0 {
            continue;
        }
        let given = cstr(buf);
        let absolute = if given.starts_with('/') {
            Some(normalize(Path::new(&given)))
        } else {
            let base = (ev.valid & valid_base != 0).then_some(base);
            base_dir(ev.pid, dirfd, base, dirs).map(|b| normalize(&b.join(&given)))
        };
        paths.push(PathArg {
            given,
            absolute,
            // The second path (rename/link target) is never followed.
            follow: follow && paths.is_empty(),
        });
    }
    Some(Attempt {
        op,
        syscall: syscall.to_string(),
        pid: ev.pid,
        tid: ev.tid,
        ppid: ev.ppid,
        uid: ev.uid,
        ret: ev.ret,
        ts_ns: ev.ts_ns,
        comm: cstr(&ev.comm),
        exe: exe_of(ev),
        key: (ev.valid & VALID_KEY != 0).then_some(ev.key),
        paths,
        flags: ev.flags,
        arg: ev.arg,
    })
}

#[cfg(test)]
mod tests {
    /// A kernel walk that reached `/` across mounts is taken as it is; one
    /// that didn't is completed from the live process's /proc/PID/exe.
    #[test]
    fn a_whole_exe_path_is_the_kernels() {
        // SAFETY: AttemptEvent is plain old data (repr(C) integers and byte
        // arrays): all zeroes is a valid value.
        let mut ev: super::AttemptEvent = unsafe { std::mem::zeroed() };
        let own = std::fs::read_link("/proc/self/exe").unwrap();
        let leaf = own.file_name().unwrap().to_str().unwrap();
        for (slot, name) in ev.exe.iter_mut().zip([leaf, "/"]) {
            slot[..name.len()].copy_from_slice(name.as_bytes());
        }
        ev.exe_depth = 2;
        ev.pid = std::process::id();
        // Mount-relative as far as user space can tell: /proc completes it.
        assert_eq!(super::exe_of(&ev), own.to_str().unwrap());
        ev.valid |= super::VALID_EXE_WHOLE;
        assert_eq!(super::exe_of(&ev), format!("/{leaf}"));
    }

    /// Found by the event_decode fuzz target (fuzz/regressions/event_decode/
    /// ret-i64-min): a record whose result is i64::MIN made errno_name
    /// negate with overflow (a panic in debug builds).
    #[test]
    fn errno_name_of_any_result() {
        let mut a = Attempt {
            op: Op::Open,
            syscall: "openat".into(),
            pid: 1,
            tid: 1,
            ppid: 0,
            uid: 0,
            ret: i64::MIN,
            ts_ns: 0,
            comm: String::new(),
            exe: String::new(),
            key: None,
            paths: Vec::new(),
            flags: 0,
            arg: 0,
        };
        assert_eq!(a.errno_name().as_deref(), Some("errno 2147483647"));
        a.ret = -i64::from(libc::EPERM);
        assert_eq!(a.errno_name().as_deref(), Some("EPERM"));
        a.ret = 3;
        assert_eq!(a.errno_name(), None);
    }
    use super::*;

    #[test]
    fn normalizes() {
        assert_eq!(normalize(Path::new("/a/./b/../c")), PathBuf::from("/a/c"));
        assert_eq!(normalize(Path::new("/../x")), PathBuf::from("/x"));
    }
}
