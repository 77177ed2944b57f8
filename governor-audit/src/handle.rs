//! An async-friendly front for the single writer.
//!
//! Appends fsync, which blocks; doing that on an async runtime's worker would
//! stall unrelated tasks. So one dedicated std::thread owns the [`AuditLog`]
//! and every clone of [`AuditHandle`] sends it requests over a bounded channel
//! (backpressure instead of unbounded memory if the disk stalls); each reply
//! comes back on a oneshot once the entry is on disk.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{anyhow, Context, Result};
use tokio::sync::{mpsc, oneshot};

use crate::entry::{validate_kind, Detail, Head};
use crate::writer::AuditLog;

/// How many requests may wait for the writer before senders wait too.
pub const CHANNEL_CAPACITY: usize = 1024;

/// One entry of a batch: (kind, service, detail).
pub type BatchItem = (String, Option<String>, Detail);

enum Cmd {
    Append {
        kind: String,
        service: Option<String>,
        detail: Detail,
        reply: oneshot::Sender<Result<Head>>,
    },
    Batch {
        items: Vec<BatchItem>,
        reply: oneshot::Sender<Result<Vec<Head>>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// Cloneable, `Send + Sync` handle to the writer thread started by
/// [`spawn_writer`]. The thread stops (closing the log and releasing its
/// lock) when every handle is dropped or [`shutdown`](Self::shutdown) is called.
#[derive(Clone, Debug)]
pub struct AuditHandle {
    tx: mpsc::Sender<Cmd>,
    head: Arc<Mutex<Option<Head>>>,
    log_path: Arc<PathBuf>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Cmd::Append { .. } => "Append",
            Cmd::Batch { .. } => "Batch",
            Cmd::Shutdown { .. } => "Shutdown",
        })
    }
}

/// Most appends committed with one fdatasync.
const MAX_GROUP: usize = 256;

fn stopped() -> anyhow::Error {
    anyhow!("the audit writer thread has stopped")
}

/// Moves `log` onto a dedicated thread named `audit-writer` and returns a
/// handle to it. Fails only if the thread cannot be spawned.
pub fn spawn_writer(log: AuditLog) -> Result<AuditHandle> {
    let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
    let head = Arc::new(Mutex::new(log.head()));
    let log_path = Arc::new(log.log_path().to_path_buf());
    let shared = Arc::clone(&head);
    std::thread::Builder::new()
        .name("audit-writer".into())
        .spawn(move || run(log, rx, shared))
        .context("spawning the audit writer thread")?;
    Ok(AuditHandle { tx, head, log_path })
}

fn run(mut log: AuditLog, mut rx: mpsc::Receiver<Cmd>, shared: Arc<Mutex<Option<Head>>>) {
    let publish = |log: &AuditLog| {
        *shared.lock().unwrap_or_else(PoisonError::into_inner) = log.head();
    };
    let mut shutdown_reply = None;
    let mut pending: Option<Cmd> = None;
    while let Some(cmd) = pending.take().or_else(|| rx.blocking_recv()) {
        match cmd {
            Cmd::Append {
                kind,
                service,
                detail,
                reply,
            } => {
                // Group commit: every append already queued joins this one,
                // one write and one fdatasync for all of them; each requester
                // hears back once the group is durable.
                let mut items = vec![(kind, service, detail)];
                let mut replies = vec![reply];
                let mut next = None;
                while items.len() < MAX_GROUP {
                    match rx.try_recv() {
                        Ok(Cmd::Append {
                            kind,
                            service,
                            detail,
                            reply,
                        }) => {
                            items.push((kind, service, detail));
                            replies.push(reply);
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                match log.append_group(items) {
                    Ok(heads) => {
                        publish(&log);
                        for (reply, h) in replies.into_iter().zip(heads) {
                            // The requester may have given up (dropped its
                            // future); the entry is logged regardless.
                            let _ = reply.send(Ok(h));
                        }
                    }
                    Err(e) => {
                        publish(&log);
                        let msg = format!("{e:#}");
                        for reply in replies {
                            let _ = reply.send(Err(anyhow!("{msg}")));
                        }
                    }
                }
                if let Some(cmd) = next {
                    // Not an append: handled after the group, in order.
                    pending = Some(cmd);
                }
            }
            Cmd::Batch { items, reply } => {
                // One write and one fdatasync for the whole batch.
                let total = items.len();
                let r = log
                    .append_group(items)
                    .with_context(|| format!("appending a batch of {total} audit entries"));
                publish(&log);
                let _ = reply.send(r);
            }
            Cmd::Shutdown { reply } => {
                shutdown_reply = Some(reply);
                break;
            }
        }
    }
    drop(log);
    if let Some(reply) = shutdown_reply {
        let _ = reply.send(());
    }
}

impl AuditHandle {
    /// Appends one entry; the future resolves after the entry is fsynced.
    /// The returned future does not borrow `self` and is `Send + 'static`.
    pub fn append(
        &self,
        kind: &str,
        service: Option<&str>,
        detail: Detail,
    ) -> impl Future<Output = Result<Head>> + Send + 'static {
        let tx = self.tx.clone();
        let checked = validate_kind(kind).map(|()| (kind.to_owned(), service.map(str::to_owned)));
        async move {
            let (kind, service) = checked?;
            let (reply, rx) = oneshot::channel();
            tx.send(Cmd::Append {
                kind,
                service,
                detail,
                reply,
            })
            .await
            .map_err(|_| stopped())?;
            rx.await.map_err(|_| stopped())?
        }
    }

    /// Blocking [`append`](Self::append), for threads outside any async
    /// runtime (it panics if called from inside one, like tokio's
    /// `blocking_*` functions it uses).
    pub fn append_blocking(
        &self,
        kind: &str,
        service: Option<&str>,
        detail: Detail,
    ) -> Result<Head> {
        validate_kind(kind)?;
        let (reply, rx) = oneshot::channel();
        self.tx
            .blocking_send(Cmd::Append {
                kind: kind.to_owned(),
                service: service.map(str::to_owned),
                detail,
                reply,
            })
            .map_err(|_| stopped())?;
        rx.blocking_recv().map_err(|_| stopped())?
    }

    /// Appends many entries in order with one round trip to the writer and
    /// one fdatasync (group commit); resolves to their heads once all are
    /// durable. On failure none is known durable.
    pub fn append_batch(
        &self,
        items: Vec<BatchItem>,
    ) -> impl Future<Output = Result<Vec<Head>>> + Send + 'static {
        let tx = self.tx.clone();
        async move {
            for (kind, _, _) in &items {
                validate_kind(kind)?;
            }
            let (reply, rx) = oneshot::channel();
            tx.send(Cmd::Batch { items, reply })
                .await
                .map_err(|_| stopped())?;
            rx.await.map_err(|_| stopped())?
        }
    }

    /// Blocking [`append_batch`](Self::append_batch).
    pub fn append_batch_blocking(&self, items: Vec<BatchItem>) -> Result<Vec<Head>> {
        for (kind, _, _) in &items {
            validate_kind(kind)?;
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .blocking_send(Cmd::Batch { items, reply })
            .map_err(|_| stopped())?;
        rx.blocking_recv().map_err(|_| stopped())?
    }

    /// Newest entry as of the last completed append (`None` for an empty
    /// chain); no round trip to the writer.
    pub fn head(&self) -> Option<Head> {
        self.head
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The live log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Stops the writer after the requests queued before this one, closing
    /// the log and releasing its lock; later appends from any clone fail.
    pub fn shutdown(&self) -> impl Future<Output = ()> + Send + 'static {
        let tx = self.tx.clone();
        async move {
            let (reply, rx) = oneshot::channel();
            if tx.send(Cmd::Shutdown { reply }).await.is_ok() {
                let _ = rx.await;
            }
        }
    }

    /// Blocking [`shutdown`](Self::shutdown).
    pub fn shutdown_blocking(&self) {
        let (reply, rx) = oneshot::channel();
        if self.tx.blocking_send(Cmd::Shutdown { reply }).is_ok() {
            let _ = rx.blocking_recv();
        }
    }
}
