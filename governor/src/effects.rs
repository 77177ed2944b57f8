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
//! One exception, for a full disk: when the state directory has no space
//! left (ENOSPC, EDQUOT), entries are held in memory, in order, up to a
//! bound (`[audit] memory_buffer`), and their acts run — enforcement (a
//! kill-switch hold, a restart) must not stop because a disk filled up.
//! The held entries are written, in order, as soon as the disk takes them
//! (retried every second), each marked `written_late` with the time it was
//! decided, followed by `audit.backlog_written` recording how many were
//! held and how many were dropped beyond the bound (their kinds counted),
//! so the chain shows the gap instead of hiding it. Acts of dropped entries
//! are not run. Status, metrics and an alert say so while it lasts.
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
    /// Never held on a full disk: it fails instead (see
    /// [`Effect::durable_only`]).
    durable: bool,
}

/// What became of an effect, once its act (if any) has run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The durable entry (`None` without one, or while it is held in
    /// memory on a full disk); an error when writing it failed, in which
    /// case the act was not run.
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
            durable: false,
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
            durable: false,
        }
    }

    /// Sends `a` once the entry is durable, with the chain's head in it.
    pub fn with_alert(mut self, a: Alert) -> Effect {
        self.alert = Some(a);
        self
    }

    /// An entry whose caller answers someone on the strength of it (an
    /// accepted drift, an opened window): on a full disk it is not held
    /// for later (the answer would be wrong now and the entry true later)
    /// but fails, and the caller says so.
    pub fn durable_only(mut self) -> Effect {
        self.durable = true;
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
            durable: false,
        }
    }
}

/// The submitting side; cheap to clone.
#[derive(Clone)]
pub struct Effects {
    tx: mpsc::UnboundedSender<Effect>,
    /// Effects submitted and not yet carried out.
    backlog: Arc<AtomicUsize>,
    /// Entries held in memory on a full disk (shared with the pipeline).
    held: Arc<std::sync::Mutex<HeldState>>,
}

/// What status and metrics show of entries held on a full disk.
#[derive(Debug, Clone, Default)]
pub struct HeldState {
    /// Entries in memory now, waiting for space.
    pub held: usize,
    /// Dropped beyond the bound since the disk filled (reset once written).
    pub dropped: u64,
    /// When the disk was first found full (RFC 3339), and why.
    pub since: Option<String>,
    pub error: Option<String>,
    /// Entries written late, and dropped, since the daemon started.
    pub written_late_total: u64,
    pub dropped_total: u64,
}

impl HeldState {
    /// The status view: `null` while every entry is durable.
    pub fn json(&self) -> Value {
        if self.since.is_none() {
            return Value::Null;
        }
        serde_json::json!({
            "held": self.held,
            "dropped": self.dropped,
            "since": self.since,
            "error": self.error,
        })
    }
}

impl Effects {
    /// Starts the pipeline on the current tokio runtime.
    pub fn spawn(
        audit: AuditHandle,
        alerts: Arc<dyn AlertSink>,
        held_max: usize,
    ) -> anyhow::Result<Effects> {
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
        let held = Arc::new(std::sync::Mutex::new(HeldState::default()));
        let buffer = Held::new(held_max.max(1), held.clone());
        tokio::spawn(run(rx, audit, alerts, act_tx, backlog.clone(), buffer));
        Ok(Effects { tx, backlog, held })
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

    /// Appends one entry that must be durable before its caller answers
    /// (never held on a full disk); `None` when it could not be written.
    pub async fn audit_durable(&self, kind: &str, service: Option<&str>, d: Value) -> Option<Head> {
        match self
            .commit(Effect::audit(kind, service, d).durable_only())
            .await
            .head
        {
            Ok(h) => h,
            Err(e) => {
                log::error!("audit append of {kind} failed: {e}");
                None
            }
        }
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
            durable: false,
        })
        .await;
    }

    /// Effects submitted and not yet carried out.
    pub fn backlog(&self) -> usize {
        self.backlog.load(Ordering::SeqCst)
    }

    /// Entries held in memory on a full disk, and what was dropped.
    pub fn held(&self) -> HeldState {
        self.held.lock().map(|h| h.clone()).unwrap_or_default()
    }
}

/// Whether an append failed for want of space (the chain of an
/// `anyhow::Error` holds the `io::Error`).
fn no_space(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::raw_os_error)
            .is_some_and(|code| code == libc::ENOSPC || code == libc::EDQUOT)
    })
}

/// Whether an append failed in the filesystem (rather than the writer
/// refusing the entry itself).
fn is_io(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<std::io::Error>().is_some())
}

/// What became of one entry of a group.
enum Fate {
    Durable(Head),
    /// Held in memory until the disk takes it; its act runs.
    Held,
    /// Beyond the bound: counted, its act not run.
    Dropped,
    /// A durable-only entry on a full disk: not written, not held.
    Refused,
}

/// Entries held in memory while the state directory is full.
struct Held {
    items: std::collections::VecDeque<BatchItem>,
    max: usize,
    dropped_kinds: std::collections::BTreeMap<String, u64>,
    /// Held entries written but not yet summed up in an
    /// `audit.backlog_written` (its own write may fail).
    written_unsummarised: u64,
    /// The last write attempt of the held entries (one a second at most).
    last_try: Option<std::time::Instant>,
    shared: Arc<std::sync::Mutex<HeldState>>,
}

/// How often held entries are tried again.
const HELD_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

impl Held {
    fn new(max: usize, shared: Arc<std::sync::Mutex<HeldState>>) -> Held {
        Held {
            items: Default::default(),
            max,
            dropped_kinds: Default::default(),
            written_unsummarised: 0,
            last_try: None,
            shared,
        }
    }

    /// Whether the disk was found full and not yet written since.
    fn active(&self) -> bool {
        self.shared
            .lock()
            .map(|h| h.since.is_some())
            .unwrap_or(false)
    }

    /// Whether a write attempt is due (throttled: each retry re-hashes
    /// every held entry).
    fn due(&self) -> bool {
        self.last_try.is_none_or(|t| t.elapsed() >= HELD_RETRY)
    }

    fn update(&self, f: impl FnOnce(&mut HeldState)) {
        if let Ok(mut h) = self.shared.lock() {
            f(&mut h);
            h.held = self.items.len();
        }
    }

    /// The disk is full: starts holding (the first time, with an alert).
    fn start(&mut self, error: &str, alerts: &dyn AlertSink) {
        self.last_try = Some(std::time::Instant::now());
        if self.active() {
            return;
        }
        let now = governor_audit::time::format_rfc3339_millis(std::time::SystemTime::now());
        log::error!(
            "audit log: the state directory is full ({error}); entries are held in memory \
             (up to {}; each also logged here) and written when space returns; enforcement \
             continues",
            self.max
        );
        alerts.send(Alert::new(
            governor_alerts::Severity::Critical,
            "audit log not writable",
            format!(
                "the state directory is full ({error}): audit entries are held in memory (up \
                 to {}) and written when space returns; enforcement continues. Free space \
                 there.",
                self.max
            ),
        ));
        let error = error.to_string();
        self.update(|h| {
            h.since = Some(now);
            h.error = Some(error);
            h.dropped = 0;
        });
    }

    fn count_dropped(&mut self, kind: String) {
        *self.dropped_kinds.entry(kind).or_default() += 1;
        self.update(|h| {
            h.dropped += 1;
            h.dropped_total += 1;
        });
    }

    /// Holds `item` (marked as written late) or counts it as dropped. Each
    /// held entry also goes to the log at once: a crash or a stop before
    /// the disk has space loses none of them without a trace.
    fn hold(&mut self, mut item: BatchItem) -> Fate {
        if self.items.len() >= self.max {
            self.count_dropped(item.0);
            return Fate::Dropped;
        }
        let now = governor_audit::time::format_rfc3339_millis(std::time::SystemTime::now());
        item.2.insert("written_late".into(), Value::Bool(true));
        item.2.insert("decided_at".into(), Value::String(now));
        log::warn!(
            "audit entry held (state directory full): {}",
            serde_json::json!({"kind": item.0, "service": item.1, "detail": item.2})
        );
        self.items.push_back(item);
        self.update(|_| {});
        Fate::Held
    }

    /// Writes what is held, in order, then `audit.backlog_written`; false
    /// while the disk still refuses. An entry the writer rejects for
    /// itself (not for the disk) is dropped and counted, so one bad entry
    /// can't hold up the rest for good.
    async fn flush(&mut self, audit: &AuditHandle, alerts: &dyn AlertSink) -> bool {
        if !self.active() {
            return true;
        }
        self.last_try = Some(std::time::Instant::now());
        if !self.items.is_empty() {
            let batch: Vec<BatchItem> = self.items.iter().cloned().collect();
            match audit.append_batch(batch).await {
                Ok(_) => {
                    self.written_unsummarised += self.items.len() as u64;
                    self.items.clear();
                    self.update(|_| {});
                }
                Err(e) if is_io(&e) => {
                    self.note_error(&e);
                    return false;
                }
                Err(_) => {
                    // One by one: the writer refuses some entry itself.
                    while let Some(item) = self.items.pop_front() {
                        let kind = item.0.clone();
                        match audit.append_batch(vec![item.clone()]).await {
                            Ok(_) => self.written_unsummarised += 1,
                            Err(e) if is_io(&e) => {
                                self.items.push_front(item);
                                self.note_error(&e);
                                self.update(|_| {});
                                return false;
                            }
                            Err(e) => {
                                log::error!("audit: a held {kind} entry is refused: {e:#}");
                                self.count_dropped(kind);
                            }
                        }
                    }
                    self.update(|_| {});
                }
            }
        }
        let (since, dropped, error) = self
            .shared
            .lock()
            .map(|h| (h.since.clone(), h.dropped, h.error.clone()))
            .unwrap_or_default();
        let n = self.written_unsummarised;
        let until = governor_audit::time::format_rfc3339_millis(std::time::SystemTime::now());
        let mut d = Detail::new();
        d.insert("written_late".into(), Value::from(n));
        d.insert("dropped".into(), Value::from(dropped));
        d.insert(
            "dropped_kinds".into(),
            serde_json::to_value(&self.dropped_kinds).unwrap_or(Value::Null),
        );
        d.insert("full_since".into(), Value::from(since));
        d.insert("until".into(), Value::from(until));
        d.insert("error".into(), Value::from(error));
        let recorded = audit
            .append_batch(vec![("audit.backlog_written".to_string(), None, d)])
            .await;
        if let Err(e) = recorded {
            // The held entries are in; the summary waits for the next try.
            self.note_error(&e);
            return false;
        }
        log::warn!(
            "audit log writable again: {n} held entries written late, {dropped} dropped (counted \
             in audit.backlog_written)"
        );
        alerts.send(Alert::new(
            if dropped > 0 {
                governor_alerts::Severity::Critical
            } else {
                governor_alerts::Severity::Warning
            },
            "audit log writable again",
            format!(
                "{n} held entries written late, {dropped} dropped while the state directory \
                 was full (recorded in audit.backlog_written)"
            ),
        ));
        self.dropped_kinds.clear();
        self.written_unsummarised = 0;
        self.update(|h| {
            h.written_late_total += n;
            h.since = None;
            h.error = None;
            h.dropped = 0;
        });
        true
    }

    fn note_error(&self, e: &anyhow::Error) {
        if !no_space(e) {
            log::error!("audit log: writing held entries failed: {e:#}");
        }
        let msg = format!("{e:#}");
        self.update(|h| h.error = Some(msg));
    }

    /// At shutdown with the disk still full: the journal gets every held
    /// entry, so none is lost without a trace.
    fn spill_to_log(&mut self) {
        for (kind, service, detail) in self.items.drain(..) {
            log::error!(
                "audit entry not written (state directory full at shutdown): {}",
                serde_json::json!({"kind": kind, "service": service, "detail": detail})
            );
        }
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
    mut held: Held,
) {
    let mut group: Vec<Effect> = Vec::with_capacity(MAX_GROUP);
    loop {
        let first = if held.active() {
            // Held entries are retried every second, effects or not.
            match tokio::time::timeout(std::time::Duration::from_secs(1), rx.recv()).await {
                Ok(x) => x,
                Err(_) => {
                    if held.due() {
                        held.flush(&audit, alerts.as_ref()).await;
                    }
                    continue;
                }
            }
        } else {
            rx.recv().await
        };
        let Some(first) = first else {
            if !held.flush(&audit, alerts.as_ref()).await {
                held.spill_to_log();
            }
            break;
        };
        if held.active() && held.due() {
            // Earlier entries first, if the disk takes them now (also
            // when effects keep coming faster than the retry timer).
            held.flush(&audit, alerts.as_ref()).await;
        }
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
        let durable: Vec<bool> = group
            .iter()
            .filter(|e| e.audit.is_some())
            .map(|e| e.durable)
            .collect();
        let items: Vec<BatchItem> = group.iter_mut().filter_map(|e| e.audit.take()).collect();
        let fates: Result<Vec<Fate>, String> = if items.is_empty() {
            Ok(Vec::new())
        } else {
            if held.active() {
                Ok(items
                    .into_iter()
                    .zip(durable)
                    .map(|(i, d)| if d { Fate::Refused } else { held.hold(i) })
                    .collect())
            } else {
                let kinds: Vec<String> = items.iter().map(|(k, _, _)| k.clone()).collect();
                let copy = items.clone();
                match audit.append_batch(items).await {
                    Ok(heads) => Ok(heads.into_iter().map(Fate::Durable).collect()),
                    Err(e) if no_space(&e) => {
                        held.start(&format!("{e:#}"), alerts.as_ref());
                        Ok(copy
                            .into_iter()
                            .zip(durable)
                            .map(|(i, d)| if d { Fate::Refused } else { held.hold(i) })
                            .collect())
                    }
                    Err(e) => {
                        let e = format!("{e:#}");
                        log::error!(
                            "audit append of {} failed: {e}; their acts are not carried out",
                            kinds.join(", ")
                        );
                        Err(e)
                    }
                }
            }
        };
        let mut fates = fates.map(Vec::into_iter);
        // Then, effect by effect in order: the alert, then the act.
        for (e, had) in group.drain(..).zip(had_entry) {
            // The head reported, and the one the act is handed (a held
            // entry has none yet: the act gets the chain's last head).
            let (head, act_head): (Result<Option<Head>, String>, Option<Head>) =
                match (&mut fates, had) {
                    (_, false) => (Ok(e.proof.clone()), e.proof.clone()),
                    (Ok(it), true) => match it.next() {
                        Some(Fate::Durable(h)) => (Ok(Some(h.clone())), Some(h)),
                        Some(Fate::Held) => {
                            (Ok(None), Some(audit.head().unwrap_or_else(Head::genesis)))
                        }
                        Some(Fate::Refused) => (
                            Err("not written: the state directory is full, and this entry \
                                 must be durable before it is answered"
                                .into()),
                            None,
                        ),
                        Some(Fate::Dropped) | None => (
                            Err("dropped: the state directory is full and so is the audit \
                                 memory buffer"
                                .into()),
                            None,
                        ),
                    },
                    (Err(err), true) => (Err(err.clone()), None),
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
            let item = match (e.act, act_head) {
                (Some(act), Some(h)) => ActItem {
                    act: Some((act, h)),
                    done: e.done,
                    head,
                },
                // An act always comes with an entry (see Effect::then):
                // without one it is never run.
                (Some(_), None) => ActItem {
                    act: None,
                    done: e.done,
                    head: match head {
                        Ok(_) => Err("an act without an audit entry is not run".into()),
                        Err(e) => Err(e),
                    },
                },
                (None, _) => ActItem {
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
        let fx = Effects::spawn(audit.clone(), sink.clone(), 10_000).unwrap();
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
