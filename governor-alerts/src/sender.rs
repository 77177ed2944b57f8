//! The Telegram sender: a bounded queue in front of one worker thread per
//! chat.
//!
//! The caller's side ([`TelegramSender::enqueue`], [`AlertSink::send`]) only
//! takes a mutex for a few microseconds to fold or queue an alert; it never
//! waits on the network. The worker owns all waiting: the 1 message/s/chat
//! spacing Telegram asks for, `retry_after` on 429, exponential backoff on
//! 5xx and network errors. Messages are sent strictly in queue order, one at
//! a time, so a retry holds back later messages instead of overtaking them —
//! alerts arrive in the order the daemon raised them.

use std::collections::VecDeque;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::ValidatedTelegram;
use crate::format::{render_alert, render_follow_up};
use crate::group::{FollowUp, Grouper};
use crate::http::{Attempt, Transport};
use crate::{Alert, AlertSink, Severity};

/// How long the worker sleeps when it has nothing to do and no window to
/// close; it is woken by new work anyway.
const IDLE_WAIT: Duration = Duration::from_secs(3600);
/// How long `shutdown` waits past its deadline for an in-flight request
/// (whose own timeout is capped at the deadline) to return.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(250);

/// Timing knobs of the worker. The defaults follow Telegram's published
/// limits; tests and unusual deployments (a local Bot API server) may
/// shorten them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuning {
    /// Minimum time from the end of one request to the start of the next.
    /// Telegram allows about one message per second per chat and counts by
    /// arrival; measuring from our end of the previous exchange keeps
    /// arrivals at least this far apart whatever the network jitter.
    pub min_interval: Duration,
    /// First backoff after a 5xx or network error; doubled each attempt.
    pub backoff_base: Duration,
    /// Cap of the exponential backoff.
    pub backoff_max: Duration,
    /// Attempts per message (including the first) before giving up.
    pub max_attempts: u32,
    /// A message older than this (since it was queued) is not retried: an
    /// alert that arrives half an hour late misleads more than it helps,
    /// and the failure is reported for the audit log instead.
    pub max_age: Duration,
    /// Whole-request timeout. Longer than Telegram's slowest normal replies:
    /// a timed-out request may still have been delivered, and retrying it
    /// would post the alert twice.
    pub request_timeout: Duration,
    /// TCP/TLS connect timeout.
    pub connect_timeout: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            min_interval: Duration::from_secs(1),
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            max_attempts: 10,
            max_age: Duration::from_secs(15 * 60),
            request_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
        }
    }
}

impl Tuning {
    /// Delay before attempt `attempts + 1` after a retryable failure:
    /// base, 2·base, 4·base, … capped at `backoff_max`.
    fn backoff(&self, attempts: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempts.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.backoff_base
            .checked_mul(factor)
            .unwrap_or(self.backoff_max)
            .min(self.backoff_max)
    }
}

/// Counters since the sender was created. `dropped`, `grouped` and
/// `filtered` count alerts; `queued`, `sent` and `failed` count messages
/// (a follow-up message stands for many alerts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Messages waiting or being sent right now.
    pub queued: usize,
    /// Messages Telegram accepted.
    pub sent: u64,
    /// Alerts lost because the queue was full (or the sender shut down).
    pub dropped: u64,
    /// Messages given up on (4xx, retries exhausted, shutdown deadline).
    pub failed: u64,
    /// Alerts folded into a group instead of being sent on their own.
    pub grouped: u64,
    /// Alerts below `min_severity`, not meant for Telegram.
    pub filtered: u64,
}

/// The end of one message's life, for the daemon's audit chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryOutcome {
    /// Grouping key, kind part.
    pub kind: String,
    /// Grouping key, service part.
    pub service: Option<String>,
    /// Severity of the message (the highest folded one for a follow-up).
    pub severity: Severity,
    /// True if Telegram accepted the message.
    pub delivered: bool,
    /// HTTP attempts made (0 if it was never tried).
    pub attempts: u32,
    /// Why it failed, or the last retried error; never contains the token.
    pub error: Option<String>,
    /// How many alerts this message stands for: 1 for a single alert, the
    /// count for a group follow-up.
    pub grouped_count: u64,
    /// True for a group follow-up message.
    pub follow_up: bool,
    /// The audit head carried in the message footer.
    pub audit_head: Option<String>,
}

/// What [`TelegramSender::enqueue`] did with an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// A message was queued for it.
    Queued,
    /// Folded into an open group; it will be counted in a follow-up.
    Grouped,
    /// Lost: the queue was full or the sender is shutting down.
    Dropped,
    /// Below `min_severity`; not for Telegram.
    BelowMinSeverity,
}

/// Result of [`TelegramSender::shutdown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShutdownReport {
    /// True if the worker finished and nothing was abandoned because of the
    /// deadline.
    pub complete: bool,
    /// Counters at the end.
    pub stats: Stats,
}

enum Content {
    Alert(Alert),
    FollowUp(FollowUp),
}

struct Outgoing {
    content: Content,
    enqueued: Instant,
}

impl Outgoing {
    fn outcome(&self, delivered: bool, attempts: u32, error: Option<String>) -> DeliveryOutcome {
        let (alert, severity, count, follow_up) = match &self.content {
            Content::Alert(a) => (a, a.severity, 1, false),
            Content::FollowUp(f) => (&f.last, f.severity, f.count, true),
        };
        DeliveryOutcome {
            kind: alert.kind.clone(),
            service: alert.service.clone(),
            severity,
            delivered,
            attempts,
            error,
            grouped_count: count,
            follow_up,
            audit_head: alert.audit_head.clone(),
        }
    }

    fn render(&self, dropped_before: u64) -> String {
        match &self.content {
            Content::Alert(a) => render_alert(a, dropped_before),
            Content::FollowUp(f) => render_follow_up(f, dropped_before),
        }
    }
}

struct State {
    queue: VecDeque<Outgoing>,
    grouper: Grouper,
    in_flight: bool,
    /// Set by `shutdown`/`drop`: flush until this instant, then abandon.
    deadline: Option<Instant>,
    worker_done: bool,
    stats: Stats,
    /// Drops not yet mentioned in a message, so the chat learns about them.
    dropped_unreported: u64,
    /// Abandoned because of the shutdown deadline.
    abandoned: u64,
    /// True while dropping, so a full queue logs once, not per alert.
    dropping: bool,
}

impl State {
    fn push_follow_ups(&mut self, follow_ups: Vec<FollowUp>, capacity: usize, now: Instant) {
        for f in follow_ups {
            if self.queue.len() < capacity {
                self.queue.push_back(Outgoing {
                    content: Content::FollowUp(f),
                    enqueued: now,
                });
            } else {
                self.note_drop(f.count);
            }
        }
    }

    fn note_drop(&mut self, n: u64) {
        self.stats.dropped += n;
        self.dropped_unreported += n;
        if !self.dropping {
            self.dropping = true;
            log::warn!(
                "telegram alert queue full ({} messages); dropping alerts until it drains",
                self.queue.len()
            );
        }
    }
}

struct Shared {
    state: Mutex<State>,
    /// Wakes the worker: new work, or shutdown.
    work: Condvar,
    /// Wakes `shutdown`: the worker finished.
    done: Condvar,
    capacity: usize,
}

impl Shared {
    /// The state lock. A panic while holding it cannot leave the counters
    /// or queue structurally broken, so poisoning is ignored rather than
    /// letting one panic silence all future alerts.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

type Report = Box<dyn Fn(DeliveryOutcome) + Send>;

/// Sends alerts to one Telegram chat. See the module docs of the crate for
/// the guarantees; create one per chat.
pub struct TelegramSender {
    shared: Arc<Shared>,
    min_severity: Severity,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for TelegramSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelegramSender")
            .field("min_severity", &self.min_severity)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl TelegramSender {
    /// Starts the sender with default [`Tuning`]; every delivery and final
    /// failure is sent to `outcomes` (a closed receiver is ignored).
    pub fn new(
        cfg: ValidatedTelegram,
        outcomes: mpsc::Sender<DeliveryOutcome>,
    ) -> io::Result<Self> {
        Self::with_tuning(cfg, Tuning::default(), outcomes)
    }

    /// Like [`Self::new`] with explicit timing.
    pub fn with_tuning(
        cfg: ValidatedTelegram,
        tuning: Tuning,
        outcomes: mpsc::Sender<DeliveryOutcome>,
    ) -> io::Result<Self> {
        Self::with_callback(
            cfg,
            tuning,
            Box::new(move |o| {
                let _ = outcomes.send(o);
            }),
        )
    }

    /// Starts the sender, reporting outcomes through `report`, which runs on
    /// the sender's thread (keep it quick; a panic in it is caught).
    pub fn with_callback(
        cfg: ValidatedTelegram,
        tuning: Tuning,
        report: Box<dyn Fn(DeliveryOutcome) + Send>,
    ) -> io::Result<Self> {
        let capacity = cfg.queue_capacity.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::with_capacity(capacity.min(1024)),
                // Groups outlive their first message by a window, so they
                // get more room than the queue; beyond it alerts are sent
                // ungrouped rather than dropped.
                grouper: Grouper::new(cfg.group_window, capacity.saturating_mul(4).max(64)),
                in_flight: false,
                deadline: None,
                worker_done: false,
                stats: Stats::default(),
                dropped_unreported: 0,
                abandoned: 0,
                dropping: false,
            }),
            work: Condvar::new(),
            done: Condvar::new(),
            capacity,
        });
        let transport = Transport::new(&cfg.api_url, cfg.token.clone(), tuning.connect_timeout);
        let chat_id = match cfg.chat_id.parse::<i64>() {
            Ok(n) => serde_json::Value::from(n),
            Err(_) => serde_json::Value::from(cfg.chat_id.clone()),
        };
        let worker = Worker {
            shared: Arc::clone(&shared),
            transport,
            chat_id,
            tuning,
            report,
            last_attempt: None,
        };
        let handle = std::thread::Builder::new()
            .name("telegram-alerts".into())
            .spawn(move || worker.run())
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("starting the Telegram sender thread: {e}"),
                )
            })?;
        Ok(TelegramSender {
            shared,
            min_severity: cfg.min_severity,
            worker: Mutex::new(Some(handle)),
        })
    }

    /// Hands an alert over without blocking and says what became of it.
    pub fn enqueue(&self, alert: Alert) -> Enqueued {
        let mut st = self.shared.lock();
        if alert.severity < self.min_severity {
            st.stats.filtered += 1;
            return Enqueued::BelowMinSeverity;
        }
        if st.deadline.is_some() {
            st.note_drop(1);
            return Enqueued::Dropped;
        }
        let now = Instant::now();
        // Close windows here too, not only in the worker: the worker may be
        // busy in a request, and an expired window must not swallow alerts.
        let closed = st.grouper.close_expired(now, false);
        let woke = !closed.is_empty();
        st.push_follow_ups(closed, self.shared.capacity, now);
        let result = if st.grouper.try_fold(&alert, now) {
            st.stats.grouped += 1;
            Enqueued::Grouped
        } else if st.queue.len() >= self.shared.capacity {
            st.note_drop(1);
            Enqueued::Dropped
        } else {
            // If too many groups are open (wildly varying kinds/services),
            // the alert still goes out, just without grouping: the queue
            // bound is what protects memory and the chat.
            st.grouper.open(&alert, now);
            st.dropping = false;
            st.queue.push_back(Outgoing {
                content: Content::Alert(alert),
                enqueued: now,
            });
            Enqueued::Queued
        };
        drop(st);
        if woke || result == Enqueued::Queued || result == Enqueued::Grouped {
            // Grouped: the worker may need to shorten its sleep to the new
            // window's end.
            self.shared.work.notify_one();
        }
        result
    }

    /// Counters and current queue length.
    pub fn stats(&self) -> Stats {
        let st = self.shared.lock();
        let mut s = st.stats;
        s.queued = st.queue.len() + usize::from(st.in_flight);
        s
    }

    /// Stops accepting alerts, sends open group follow-ups and what is
    /// queued — still at 1 message/s — until `timeout` passes, then gives up
    /// on the rest (each reported as a failed outcome). Returns after at
    /// most `timeout` plus a short grace for an in-flight request.
    pub fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.lock();
        st.deadline = Some(st.deadline.map_or(deadline, |d| d.min(deadline)));
        self.shared.work.notify_one();
        let give_up = deadline + SHUTDOWN_GRACE;
        while !st.worker_done {
            let now = Instant::now();
            if now >= give_up {
                break;
            }
            st = self
                .shared
                .done
                .wait_timeout(st, give_up - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
        let finished = st.worker_done;
        let complete = finished && st.abandoned == 0;
        let mut stats = st.stats;
        stats.queued = st.queue.len() + usize::from(st.in_flight);
        drop(st);
        if finished {
            let handle = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(h) = handle {
                if h.join().is_err() {
                    log::error!("telegram sender thread panicked");
                }
            }
        }
        ShutdownReport { complete, stats }
    }
}

impl AlertSink for TelegramSender {
    fn send(&self, alert: Alert) {
        self.enqueue(alert);
    }
}

impl Drop for TelegramSender {
    /// Without an explicit `shutdown`, stop at once: dropping must not stall
    /// the daemon, and what is left is reported as failed outcomes.
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        if st.deadline.is_none() {
            st.deadline = Some(Instant::now());
        }
        drop(st);
        self.shared.work.notify_one();
    }
}

struct Worker {
    shared: Arc<Shared>,
    transport: Transport,
    chat_id: serde_json::Value,
    tuning: Tuning,
    report: Report,
    last_attempt: Option<Instant>,
}

/// How one message's delivery ended.
struct Ending {
    delivered: bool,
    attempts: u32,
    error: Option<String>,
    /// Given up because of the shutdown deadline, not for its own reasons.
    abandoned: bool,
}

impl Worker {
    fn run(mut self) {
        while let Some((item, dropped_before)) = self.next_item() {
            let text = item.render(dropped_before);
            let end = self.deliver(&item, &text);
            let outcome = item.outcome(end.delivered, end.attempts, end.error);
            if !outcome.delivered {
                log::warn!(
                    "telegram alert not delivered ({}{}) after {} attempt(s): {}",
                    outcome.kind,
                    outcome
                        .service
                        .as_deref()
                        .map(|s| format!("/{s}"))
                        .unwrap_or_default(),
                    outcome.attempts,
                    outcome.error.as_deref().unwrap_or("unknown error"),
                );
            }
            {
                let mut st = self.shared.lock();
                st.in_flight = false;
                if end.delivered {
                    st.stats.sent += 1;
                } else {
                    st.stats.failed += 1;
                    if end.abandoned {
                        st.abandoned += 1;
                    }
                }
            }
            // After the counters, so a daemon that sees the outcome also
            // sees it counted in `stats()`.
            self.emit(outcome);
        }
        // Deadline passed with messages left: report each as failed.
        let mut st = self.shared.lock();
        let left: Vec<Outgoing> = st.queue.drain(..).collect();
        st.stats.failed += left.len() as u64;
        st.abandoned += left.len() as u64;
        drop(st);
        for item in left {
            self.emit(item.outcome(
                false,
                0,
                Some("not sent: sender shut down before its turn".into()),
            ));
        }
        self.shared.lock().worker_done = true;
        self.shared.done.notify_all();
    }

    fn emit(&self, outcome: DeliveryOutcome) {
        if catch_unwind(AssertUnwindSafe(|| (self.report)(outcome))).is_err() {
            log::error!("telegram delivery outcome callback panicked");
        }
    }

    /// Waits for the next message (closing group windows as they end).
    /// None once shutting down and there is nothing left or no time left.
    fn next_item(&self) -> Option<(Outgoing, u64)> {
        let mut st = self.shared.lock();
        loop {
            let now = Instant::now();
            let flushing = st.deadline.is_some();
            let closed = st.grouper.close_expired(now, flushing);
            st.push_follow_ups(closed, self.shared.capacity, now);
            if st.deadline.is_some_and(|d| now >= d) {
                return None;
            }
            if let Some(item) = st.queue.pop_front() {
                st.in_flight = true;
                let dropped_before = std::mem::take(&mut st.dropped_unreported);
                return Some((item, dropped_before));
            }
            if flushing {
                return None;
            }
            let wait = st
                .grouper
                .next_deadline()
                .map_or(IDLE_WAIT, |d| d.saturating_duration_since(now));
            st = self
                .shared
                .work
                .wait_timeout(st, wait)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Sleeps until `target`, waking early only to notice shutdown. False
    /// if the shutdown deadline comes first.
    fn wait_until(&self, target: Instant) -> bool {
        let mut st = self.shared.lock();
        loop {
            let now = Instant::now();
            if now >= target {
                return true;
            }
            if st.deadline.is_some_and(|d| target > d) {
                return false;
            }
            st = self
                .shared
                .work
                .wait_timeout(st, target - now)
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    fn deadline(&self) -> Option<Instant> {
        self.shared.lock().deadline
    }

    fn deliver(&mut self, item: &Outgoing, text: &str) -> Ending {
        let body = serde_json::json!({
            "chat_id": self.chat_id,
            "text": text,
            "parse_mode": "HTML",
            "disable_web_page_preview": true,
        })
        .to_string();
        let mut attempts = 0u32;
        let mut last_error: Option<String> = None;
        let abandon = |attempts: u32, last_error: Option<String>| Ending {
            delivered: false,
            attempts,
            error: Some(match last_error {
                Some(e) => format!("{e}; not retried: sender shut down"),
                None => "not sent: sender shut down".to_owned(),
            }),
            abandoned: true,
        };
        loop {
            if let Some(prev) = self.last_attempt {
                if !self.wait_until(prev + self.tuning.min_interval) {
                    return abandon(attempts, last_error);
                }
            }
            let now = Instant::now();
            let timeout = match self.deadline() {
                Some(d) => self
                    .tuning
                    .request_timeout
                    .min(d.saturating_duration_since(now)),
                None => self.tuning.request_timeout,
            };
            if timeout.is_zero() {
                return abandon(attempts, last_error);
            }
            attempts += 1;
            let attempt = self.transport.send(&body, timeout);
            self.last_attempt = Some(Instant::now());
            let (after, error) = match attempt {
                Attempt::Delivered => {
                    return Ending {
                        delivered: true,
                        attempts,
                        error: None,
                        abandoned: false,
                    }
                }
                Attempt::Final { error } => {
                    return Ending {
                        delivered: false,
                        attempts,
                        error: Some(error),
                        abandoned: false,
                    }
                }
                Attempt::Retry { after, error } => (after, error),
            };
            let wait = after.unwrap_or_else(|| self.tuning.backoff(attempts));
            let retry_at = Instant::now() + wait;
            let give_up = if attempts >= self.tuning.max_attempts {
                Some(format!("{error}; gave up after {attempts} attempts"))
            } else if retry_at.duration_since(item.enqueued) > self.tuning.max_age {
                Some(format!(
                    "{error}; gave up after {attempts} attempts: next retry would exceed the \
                     maximum age of {}s",
                    self.tuning.max_age.as_secs()
                ))
            } else {
                None
            };
            if let Some(error) = give_up {
                return Ending {
                    delivered: false,
                    attempts,
                    error: Some(error),
                    abandoned: false,
                };
            }
            log::info!("telegram send attempt {attempts} failed, retrying in {wait:?}: {error}");
            last_error = Some(error);
            if !self.wait_until(retry_at) {
                return abandon(attempts, last_error);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let t = Tuning::default();
        let secs: Vec<u64> = (1..=9).map(|n| t.backoff(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(t.backoff(200), Duration::from_secs(60));
    }
}
