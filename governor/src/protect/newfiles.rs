//! Files created after start that match a protected glob (issue 14):
//! `core/*.py` gets a new file, and it must be flagged at once, not at the
//! next reload. inotify on each glob's directory (`IN_CREATE`,
//! `IN_MOVED_TO`): a name appearing there wakes the protector, which
//! re-expands `[protect]` and flags what is new (within milliseconds of
//! the creation; `tests/protect.rs` measures it).
//!
//! A glob in a directory component (`/srv/bots/*/config.json`) watches the
//! directories it matches at start and at each reload; a directory created
//! later is covered from the next reload.

use std::{
    collections::HashMap,
    mem::MaybeUninit,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
};

use rustix::fs::inotify::{self, CreateFlags, ReadFlags, WatchFlags};
use tokio::io::{unix::AsyncFd, Interest};

use super::glob::{expand, is_glob};

pub struct NewFiles {
    fd: AsyncFd<OwnedFd>,
    /// Watch descriptor → directory.
    dirs: HashMap<i32, PathBuf>,
}

/// The directories to watch for `patterns` (only globs need watching: a
/// plain path that appears later is the reconcile's business).
pub fn dirs_for(patterns: &[String]) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for pat in patterns.iter().filter(|p| is_glob(p)) {
        let Some(parent) = Path::new(pat).parent() else {
            continue;
        };
        let parent = parent.to_string_lossy();
        let dirs = if is_glob(&parent) {
            expand(&parent).unwrap_or_default()
        } else {
            vec![PathBuf::from(parent.as_ref())]
        };
        for d in dirs {
            if d.is_dir() && !out.contains(&d) {
                out.push(d);
            }
        }
    }
    out
}

impl NewFiles {
    /// Watches `dirs`; `None` when there is nothing to watch. Problems
    /// (inotify unavailable, a directory that can't be watched) are
    /// returned for the start report.
    pub fn watch(dirs: &[PathBuf]) -> (Option<NewFiles>, Vec<String>) {
        if dirs.is_empty() {
            return (None, Vec::new());
        }
        let fd = match inotify::init(CreateFlags::CLOEXEC | CreateFlags::NONBLOCK) {
            Ok(fd) => fd,
            Err(e) => {
                return (
                    None,
                    vec![format!(
                    "inotify: {e}: new files matching a glob are flagged at the next reload only"
                )],
                )
            }
        };
        let mut problems = Vec::new();
        let mut map = HashMap::new();
        for d in dirs {
            match inotify::add_watch(
                &fd,
                d.as_path(),
                WatchFlags::CREATE | WatchFlags::MOVED_TO | WatchFlags::ONLYDIR,
            ) {
                Ok(wd) => {
                    map.insert(wd, d.clone());
                }
                Err(e) => problems.push(format!(
                    "{}: can't watch for new files ({e}); they are flagged at the next reload",
                    d.display()
                )),
            }
        }
        // SAFETY: the OwnedFd moves into the AsyncFd, so the descriptor
        // stays open for as long as it is registered.
        match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
            Ok(fd) => (Some(NewFiles { fd, dirs: map }), problems),
            Err(e) => {
                problems.push(format!("inotify: registering with tokio: {e}"));
                (None, problems)
            }
        }
    }

    /// Waits for names created or moved into a watched directory.
    pub async fn next(&mut self) -> Vec<PathBuf> {
        loop {
            let mut guard = match self.fd.readable().await {
                Ok(g) => g,
                Err(_) => return std::future::pending().await,
            };
            let mut buf = [MaybeUninit::<u8>::uninit(); 4096];
            let mut out = Vec::new();
            let mut reader = inotify::Reader::new(self.fd.get_ref(), &mut buf);
            loop {
                match reader.next() {
                    Ok(ev) => {
                        if ev.events().contains(ReadFlags::QUEUE_OVERFLOW) {
                            // Events were lost: have every directory
                            // looked at again.
                            out.extend(self.dirs.values().cloned());
                        }
                        if let (Some(dir), Some(name)) = (self.dirs.get(&ev.wd()), ev.file_name()) {
                            out.push(dir.join(std::ffi::OsStr::new(
                                &String::from_utf8_lossy(name.to_bytes()).into_owned(),
                            )));
                        }
                    }
                    Err(rustix::io::Errno::AGAIN) => {
                        guard.clear_ready();
                        break;
                    }
                    Err(_) => break,
                }
            }
            if !out.is_empty() {
                return out;
            }
        }
    }
}
