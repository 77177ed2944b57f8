//! State files (`velocity.json`, `protect.json`) written off the event
//! loop: the loop hands over the serialised bytes, a thread of their own
//! writes them atomically (temp file, fsync, rename, fsync of the
//! directory). Only the newest bytes are written: a slow disk merges saves
//! instead of queueing them, and a save is never refused.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::mpsc,
    thread::JoinHandle,
};

use anyhow::{Context, Result};

/// Writes `data` to `path` atomically and durably.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f =
            std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(data)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
    }
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

enum Msg {
    Data(Vec<u8>),
    /// Answered once everything queued before it is on disk.
    Sync(tokio::sync::oneshot::Sender<()>),
}

/// One state file and the thread that writes it.
pub struct StateFile {
    path: PathBuf,
    tx: Option<mpsc::Sender<Msg>>,
    thread: Option<JoinHandle<()>>,
}

impl StateFile {
    /// Starts the writer thread for `path`; `on_error` hears of each
    /// failed write (the loop turns it into an alert).
    pub fn spawn(
        path: PathBuf,
        on_error: impl Fn(&Path, &anyhow::Error) + Send + 'static,
    ) -> Result<StateFile> {
        let (tx, rx) = mpsc::channel::<Msg>();
        let p = path.clone();
        let name = format!(
            "state:{}",
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        );
        let thread = std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    // Newer bytes queued meanwhile supersede these.
                    let mut data = None;
                    let mut waiting = Vec::new();
                    for m in std::iter::once(first).chain(rx.try_iter()) {
                        match m {
                            Msg::Data(d) => data = Some(d),
                            Msg::Sync(s) => waiting.push(s),
                        }
                    }
                    if let Some(data) = data {
                        if let Err(e) = write_atomic(&p, &data) {
                            log::error!("saving {}: {e:#}", p.display());
                            on_error(&p, &e);
                        }
                    }
                    for w in waiting {
                        let _ = w.send(());
                    }
                }
            })
            .with_context(|| format!("starting the writer thread of {}", path.display()))?;
        Ok(StateFile {
            path,
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues `data` to be written; newer saves supersede it.
    pub fn save(&self, data: Vec<u8>) {
        if let Some(tx) = &self.tx {
            if tx.send(Msg::Data(data)).is_err() {
                log::error!(
                    "the writer thread of {} is gone; not saved",
                    self.path.display()
                );
            }
        }
    }

    /// Resolves once everything saved so far is on disk (or failed and
    /// was reported).
    pub async fn synced(&self) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Some(q) = &self.tx {
            if q.send(Msg::Sync(tx)).is_ok() {
                let _ = rx.await;
            }
        }
    }

    /// Writes what is queued and stops the thread.
    pub fn finish(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for StateFile {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_bytes_win_and_finish_writes_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        let mut f = StateFile::spawn(path.clone(), |_, _| {}).unwrap();
        for i in 0..100 {
            f.save(format!("{{\"n\":{i}}}").into_bytes());
        }
        f.finish();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"n\":99}");
        assert!(!dir.path().join("s.json.tmp").exists());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn synced_waits_for_the_write() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        let f = StateFile::spawn(path.clone(), |_, _| {}).unwrap();
        f.save(b"one".to_vec());
        f.save(b"two".to_vec());
        f.synced().await;
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        assert!(!dir.path().join("s.json.tmp").exists());
    }

    #[test]
    fn a_failed_write_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing-dir").join("s.json");
        let (tx, rx) = mpsc::channel();
        let mut f = StateFile::spawn(path, move |p, e| {
            let _ = tx.send(format!("{}: {e:#}", p.display()));
        })
        .unwrap();
        f.save(b"x".to_vec());
        f.finish();
        let msg = rx.recv().unwrap();
        assert!(msg.contains("missing-dir"), "{msg}");
    }
}
