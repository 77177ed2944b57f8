//! The one ordered effect pipeline: every decision the daemon carries out —
//! an audit entry, an alert, an act (a supervisor stop, a flag lifted) —
//! goes through one queue, in the order it was submitted, and each effect
//! is carried out in a fixed order: its audit entry durable first, then its
//! alert, then its act.
//!
//! "No action without its audit entry first" holds by construction: an
//! [`Act`] is only ever run by the pipeline, after the write that made its
//! entry durable returned, and is handed that entry's [`Head`]. If the
//! entry can't be written, the act is not run.
//!
//! Entries queued together are written as one group (one write, one
//! fdatasync), so a flood of attempt entries costs one fsync per batch,
//! not one per entry. Acts run on one thread of their own, in order, so a
//! slow pm2 or systemctl never delays the next audit entry, and the event
//! loop never runs one.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

use governor_alerts::{Alert, AlertSink};
use governor_audit::{AuditHandle, BatchItem, Detail, Head};
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

/// Most effects committed as one group.
const MAX_GROUP: usize = 256;

/// An act, run after its audit entry is durable, with that entry's head.
/// It runs on the pipeline's act thread: blocking is fine, but it must
/// report its result itself (a channel it captured).
pub type Act = Box<dyn FnOnce(&Head) + Send>;

/// One decision to carry out.
pub struct Effect {
    audit: Option<(String, Option<String>, Detail)>,
    /// The head of an entry already durable (see [`Effect::after`]).
    proof: Option<Head>,
    alert: Option<Alert>,
    act: Option<Act>,
    done: Option<oneshot::Sender<Outcome>>,
}

/// What became of an effect, once its act (if any) has run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The durable entry (`None` without one); an error when writing it
    /// failed, in which case the act was not run.
    pub head: Result<Option<Head>, String>,
    /// Whether the act ran.
    pub acted: bool,
}

fn detail(v: Value) -> Detail {
    match v {
        Value::Object(m) => m,
        other => {
            let mut m = Detail::new();
            m.insert("value".into(), other);
            m
        }
    }
}

impl Effect {
    /// An audit entry.
    pub fn audit(kind: &str, service: Option<&str>, d: Value) -> Effect {
        Effect {
            audit: Some((kind.to_string(), service.map(str::to_string), detail(d))),
            proof: None,
            alert: None,
            act: None,
            done: None,
        }
    }

    /// An alert with no entry of its own.
    pub fn alert_only(a: Alert) -> Effect {
        Effect {
            audit: None,
            proof: None,
            alert: Some(a),
            act: None,
            done: None,
        }
    }

    /// Sends `a` once the entry is durable, with the chain's head in it.
    pub fn with_alert(mut self, a: Alert) -> Effect {
        self.alert = Some(a);
        self
    }

    /// Runs `act` once the entry is durable (and never if it isn't).
    pub fn then(mut self, act: impl FnOnce(&Head) + Send + 'static) -> Effect {
        self.act = Some(Box::new(act));
        self
    }

    /// An act whose entry is already durable: `head` is the one the
    /// pipeline handed back for it. For an act that must wait for
    /// something else after its entry, such as a state file.
    pub fn after(head: Head, act: impl FnOnce(&Head) + Send + 'static) -> Effect {
        Effect {
            audit: None,
            proof: Some(head),
            alert: None,
            act: Some(Box::new(act)),
            done: None,
        }
    }
}

/// The submitting side; cheap to clone.
#[derive(Clone)]
pub struct Effects {
    tx: mpsc::UnboundedSender<Effect>,
    /// Effects submitted and not yet carried out.
    backlog: Arc<AtomicUsize>,
}

impl Effects {
    /// Starts the pipeline on the current tokio runtime.
    pub fn spawn(audit: AuditHandle, alerts: Arc<dyn AlertSink>) -> anyhow::Result<Effects> {
        let (tx, rx) = mpsc::unbounded_channel::<Effect>();
        let (act_tx, act_rx) = std::sync::mpsc::channel::<ActItem>();
        std::thread::Builder::new()
            .name("effects-act".into())
            .spawn(move || {
                // Every effect someone waits for passes here, acted or not,
                // so an answer never overtakes an earlier act.
                while let Ok(item) = act_rx.recv() {
                    let acted = match item.act {
                        Some((act, head)) => {
                            act(&head);
                            true
                        }
                        None => false,
                    };
                    if let Some(d) = item.done {
                        let _ = d.send(Outcome {
                            head: item.head,
                            acted,
                        });
                    }
                }
            })
            .map_err(|e| anyhow::anyhow!("starting the effect pipeline's act thread: {e}"))?;
        let backlog = Arc::new(AtomicUsize::new(0));
        tokio::spawn(run(rx, audit, alerts, act_tx, backlog.clone()));
        Ok(Effects { tx, backlog })
    }

    /// Queues `e`; it is carried out after everything submitted before it.
    pub fn submit(&self, e: Effect) {
        self.backlog.fetch_add(1, Ordering::SeqCst);
        if let Err(mpsc::error::SendError(e)) = self.tx.send(e) {
            self.backlog.fetch_sub(1, Ordering::SeqCst);
            if let Some((kind, _, _)) = e.audit {
                log::error!("effect pipeline stopped: audit entry {kind} not written");
            }
        }
    }

    /// Queues `e` and waits until it is carried out: its entry durable and
    /// its act run.
    pub async fn commit(&self, mut e: Effect) -> Outcome {
        let (tx, rx) = oneshot::channel();
        e.done = Some(tx);
        self.submit(e);
        rx.await.unwrap_or(Outcome {
            head: Err("the effect pipeline has stopped".into()),
            acted: false,
        })
    }

    /// Appends one entry and waits until it is durable.
    pub async fn audit(&self, kind: &str, service: Option<&str>, d: Value) -> Option<Head> {
        match self.commit(Effect::audit(kind, service, d)).await.head {
            Ok(h) => h,
            Err(e) => {
                log::error!("audit append of {kind} failed: {e}");
                None
            }
        }
    }

    /// Waits until everything submitted so far is carried out, acts
    /// included.
    pub async fn flush(&self) {
        self.commit(Effect {
            audit: None,
            proof: None,
            alert: None,
            act: None,
            done: None,
        })
        .await;
    }

    /// Effects submitted and not yet carried out.
    pub fn backlog(&self) -> usize {
        self.backlog.load(Ordering::SeqCst)
    }
}

struct ActItem {
    act: Option<(Act, Head)>,
    done: Option<oneshot::Sender<Outcome>>,
    head: Result<Option<Head>, String>,
}

type ActQueue = std::sync::mpsc::Sender<ActItem>;

async fn run(
    mut rx: mpsc::UnboundedReceiver<Effect>,
    audit: AuditHandle,
    alerts: Arc<dyn AlertSink>,
    acts: ActQueue,
    backlog: Arc<AtomicUsize>,
) {
    let mut group: Vec<Effect> = Vec::with_capacity(MAX_GROUP);
    while let Some(first) = rx.recv().await {
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(e) => group.push(e),
                Err(_) => break,
            }
        }
        let n = group.len();
        // Audit first: the whole group in one durable write.
        let had_entry: Vec<bool> = group.iter().map(|e| e.audit.is_some()).collect();
        let items: Vec<BatchItem> = group.iter_mut().filter_map(|e| e.audit.take()).collect();
        let heads: Result<Vec<Head>, String> = if items.is_empty() {
            Ok(Vec::new())
        } else {
            let kinds: Vec<String> = items.iter().map(|(k, _, _)| k.clone()).collect();
            audit.append_batch(items).await.map_err(|e| {
                let e = format!("{e:#}");
                log::error!(
                    "audit append of {} failed: {e}; their acts are not carried out",
                    kinds.join(", ")
                );
                e
            })
        };
        let mut heads = heads.map(Vec::into_iter);
        // Then, effect by effect in order: the alert, then the act.
        for (e, had) in group.drain(..).zip(had_entry) {
            let head: Result<Option<Head>, String> = match (&mut heads, had) {
                (_, false) => Ok(e.proof.clone()),
                (Ok(it), true) => Ok(it.next()),
                (Err(err), true) => Err(err.clone()),
            };
            if let Some(mut a) = e.alert {
                // Its own entry's head, or the chain's for an alert
                // without one.
                if let Some(h) = head
                    .as_ref()
                    .ok()
                    .cloned()
                    .flatten()
                    .or_else(|| audit.head())
                {
                    a = a.with_audit_head(short_head(&h));
                }
                alerts.send(a);
            }
            let item = match (e.act, head) {
                (Some(act), Ok(Some(h))) => ActItem {
                    act: Some((act, h.clone())),
                    done: e.done,
                    head: Ok(Some(h)),
                },
                // An act always comes with an entry (see Effect::then):
                // without one it is never run.
                (Some(_), Ok(None)) => ActItem {
                    act: None,
                    done: e.done,
                    head: Err("an act without an audit entry is not run".into()),
                },
                (_, head) => ActItem {
                    act: None,
                    done: e.done,
                    head,
                },
            };
            if item.act.is_some() || item.done.is_some() {
                if let Err(std::sync::mpsc::SendError(item)) = acts.send(item) {
                    log::error!("the effect pipeline's act thread has stopped");
                    if let Some(d) = item.done {
                        let _ = d.send(Outcome {
                            head: Err("the act thread has stopped".into()),
                            acted: false,
                        });
                    }
                }
            }
        }
        backlog.fetch_sub(n, Ordering::SeqCst);
    }
}

/// `seq:hash-prefix`, as alerts show the chain's head.
pub fn short_head(h: &Head) -> String {
    format!("{}:{}", h.seq, &h.hash[..h.hash.len().min(16)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor_audit::{AuditLog, Options};
    use serde_json::json;
    use std::sync::Mutex;

    /// Collects what the pipeline sends.
    #[derive(Default)]
    struct Sink(Mutex<Vec<Alert>>);

    impl AlertSink for Sink {
        fn send(&self, a: Alert) {
            self.0.lock().unwrap().push(a);
        }
    }

    fn log_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn pipeline(dir: &std::path::Path) -> (Effects, AuditHandle, Arc<Sink>) {
        let (log, _) = AuditLog::open(
            dir,
            Options {
                rotate_bytes: None,
                append_only: false,
            },
        )
        .unwrap();
        let audit = governor_audit::spawn_writer(log).unwrap();
        let sink = Arc::new(Sink::default());
        let fx = Effects::spawn(audit.clone(), sink.clone()).unwrap();
        (fx, audit, sink)
    }

    /// The act reads the log file itself: its own entry is there, durable,
    /// with the head it was handed, before it runs.
    #[tokio::test(flavor = "current_thread")]
    async fn an_act_sees_its_own_entry_in_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (fx, audit, sink) = pipeline(dir.path());
        let path = audit.log_path().to_path_buf();
        let (tx, rx) = oneshot::channel();
        let out = fx
            .commit(
                Effect::audit("test.act", Some("svc"), json!({"n": 1}))
                    .with_alert(Alert::new(governor_alerts::Severity::Warning, "t", "t"))
                    .then(move |head| {
                        let lines = log_lines(&path);
                        let mine = lines
                            .iter()
                            .find(|e| e["seq"] == head.seq)
                            .map(|e| (e["kind"].clone(), e["hash"].clone()));
                        let _ = tx.send(mine);
                    }),
            )
            .await;
        assert!(out.acted);
        let head = out.head.unwrap().unwrap();
        let (kind, hash) = rx.await.unwrap().expect("the act did not find its entry");
        assert_eq!(kind, "test.act");
        assert_eq!(hash, head.hash);
        // The alert went out with the entry's head.
        let alerts = sink.0.lock().unwrap();
        assert_eq!(alerts.len(), 1);
        assert_eq!(
            alerts[0].audit_head.as_deref(),
            Some(short_head(&head).as_str())
        );
    }

    /// An entry that can't be written means no act, and the caller hears why.
    #[tokio::test(flavor = "current_thread")]
    async fn no_entry_no_act() {
        let dir = tempfile::tempdir().unwrap();
        let (fx, audit, _) = pipeline(dir.path());
        audit.shutdown().await;
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        let out = fx
            .commit(Effect::audit("test.act", None, json!({})).then(move |_| {
                r.fetch_add(1, Ordering::SeqCst);
            }))
            .await;
        assert!(!out.acted);
        assert!(out.head.is_err(), "{:?}", out.head);
        assert_eq!(ran.load(Ordering::SeqCst), 0);
    }

    /// Effects submitted from anywhere keep their order: entries in the
    /// log and acts as submitted, many entries sharing a group.
    #[tokio::test(flavor = "current_thread")]
    async fn order_is_submission_order() {
        let dir = tempfile::tempdir().unwrap();
        let (fx, audit, _) = pipeline(dir.path());
        let acted = Arc::new(Mutex::new(Vec::new()));
        for i in 0..500u64 {
            let mut e = Effect::audit("test.order", None, json!({ "i": i }));
            if i % 50 == 0 {
                let a = acted.clone();
                e = e.then(move |h| a.lock().unwrap().push((i, h.seq)));
            }
            fx.submit(e);
        }
        fx.flush().await;
        assert_eq!(fx.backlog(), 0);
        let lines = log_lines(audit.log_path());
        let is: Vec<u64> = lines
            .iter()
            .filter(|e| e["kind"] == "test.order")
            .map(|e| e["detail"]["i"].as_u64().unwrap())
            .collect();
        assert_eq!(is, (0..500).collect::<Vec<_>>());
        let acted = acted.lock().unwrap();
        let order: Vec<u64> = acted.iter().map(|(i, _)| *i).collect();
        assert_eq!(order, (0..500).step_by(50).collect::<Vec<_>>());
        for (i, seq) in acted.iter() {
            let e = lines.iter().find(|e| e["seq"] == *seq).unwrap();
            assert_eq!(e["detail"]["i"], *i);
        }
    }
}
