//! `[export] events`: every kernel lifecycle event (exec, exit) and every
//! protected-file attempt as one JSON object per line, for a log stack
//! (Vector, Promtail, Filebeat) to ship. Written by a thread of its own
//! through a bounded queue, so a slow disk never stalls the event loop; a
//! full queue drops lines and counts them, and the count is written into
//! the file itself (`{"type":"export.dropped",...}`) once there is room —
//! a gap in the export is never silent. The file rotates at `rotate_size`
//! (`events.jsonl` → `.1` … `.keep`), like logrotate's `copytruncate`-free
//! rename scheme, so a shipper following by name sees each file whole.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{sync_channel, SyncSender, TrySendError},
        Arc,
    },
};

use anyhow::{Context, Result};

/// Lines queued before the writer drops new ones.
const QUEUE: usize = 8192;

/// A cheap, cloneable handle: `send` never blocks.
#[derive(Clone)]
pub struct Exporter {
    tx: SyncSender<String>,
    dropped: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
}

impl Exporter {
    /// Opens (creating the directory) and starts the writer thread.
    pub fn spawn(path: &Path, rotate_size: u64, keep: u32) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = open(path)?;
        let (tx, rx) = sync_channel::<String>(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let written = Arc::new(AtomicU64::new(0));
        let mut w = Writer {
            path: path.to_path_buf(),
            size: file.metadata().map(|m| m.len()).unwrap_or(0),
            file,
            rotate_size,
            keep,
        };
        let (d, n) = (dropped.clone(), written.clone());
        std::thread::Builder::new()
            .name("governor-export".into())
            .spawn(move || {
                let mut reported = 0;
                while let Ok(line) = rx.recv() {
                    let lost = d.load(Ordering::Relaxed);
                    if lost > reported {
                        let note = serde_json::json!({
                            "type": "export.dropped",
                            "ts": crate::events::rfc3339(std::time::SystemTime::now()),
                            "dropped": lost - reported, "dropped_total": lost,
                        });
                        if w.write(&note.to_string()).is_ok() {
                            reported = lost;
                        }
                    }
                    match w.write(&line) {
                        Ok(()) => {
                            n.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            d.fetch_add(1, Ordering::Relaxed);
                            log::warn!("export {}: {e:#}", w.path.display());
                        }
                    }
                }
            })
            .context("starting the export thread")?;
        Ok(Exporter {
            tx,
            dropped,
            written,
        })
    }

    /// Queues one line (a JSON object, no newline); drops it, counted,
    /// when the writer is behind.
    pub fn send(&self, line: String) {
        match self.tx.try_send(line) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }
}

fn open(path: &Path) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

struct Writer {
    path: PathBuf,
    file: File,
    size: u64,
    rotate_size: u64,
    keep: u32,
}

impl Writer {
    fn write(&mut self, line: &str) -> Result<()> {
        if self.size > 0 && self.size + line.len() as u64 + 1 > self.rotate_size {
            self.rotate()?;
        }
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.file.write_all(&buf)?;
        self.size += buf.len() as u64;
        Ok(())
    }

    /// events.jsonl.(keep-1) → .keep (the oldest dropped), …, events.jsonl → .1.
    fn rotate(&mut self) -> Result<()> {
        let name = |i: u32| {
            let mut s = self.path.clone().into_os_string();
            s.push(format!(".{i}"));
            PathBuf::from(s)
        };
        for i in (1..self.keep).rev() {
            let from = name(i);
            if from.exists() {
                std::fs::rename(&from, name(i + 1))
                    .with_context(|| format!("rotating {}", from.display()))?;
            }
        }
        std::fs::rename(&self.path, name(1))
            .with_context(|| format!("rotating {}", self.path.display()))?;
        self.file = open(&self.path)?;
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_at_size_and_keeps_n_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let e = Exporter::spawn(&p, 4096, 2).unwrap();
        for i in 0..200 {
            e.send(format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(40)));
        }
        // The writer is asynchronous: wait for it to have written all.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while e.written() < 200 && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(e.written(), 200);
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        let cur = read(&p);
        let one = read(&dir.path().join("events.jsonl.1"));
        let two = read(&dir.path().join("events.jsonl.2"));
        assert!(!dir.path().join("events.jsonl.3").exists());
        for f in [&cur, &one, &two] {
            assert!(f.len() <= 4096, "a file past rotate_size: {}", f.len());
            for l in f.lines() {
                serde_json::from_str::<serde_json::Value>(l).unwrap();
            }
        }
        // The newest lines are in the live file, in order.
        let last: serde_json::Value = serde_json::from_str(cur.lines().last().unwrap()).unwrap();
        assert_eq!(last["i"], 199);
    }
}
