//! Alert delivery for the governor daemon.
//!
//! The daemon's policy code decides *that* something is worth telling a human
//! (a crash loop, a memory violation, a tamper attempt); this crate decides
//! *how* that reaches Telegram without ever hurting the daemon:
//!
//! * [`AlertSink::send`] never blocks. The daemon's event loop must keep
//!   reading the kernel's ring buffer even while Telegram is down, slow or
//!   rate-limiting us, so alerts go into a bounded queue and overflow is
//!   dropped and *counted* rather than waited on.
//! * One [`TelegramSender`] owns one chat and one worker thread. Telegram
//!   allows about one message per second per chat, so the worker spaces
//!   requests, honours `retry_after` on HTTP 429 and backs off on 5xx and
//!   network errors.
//! * Alerts with the same `(kind, service)` inside the group window become one
//!   immediate message plus one follow-up per window with a count, so a crash
//!   loop that fires 100 times arrives as a couple of messages, not 100.
//! * Every delivery or final failure is reported as a [`DeliveryOutcome`] so
//!   the daemon can record it in its audit chain.
//!
//! The bot token is a secret: it is read from a `chmod 600` file, never
//! logged, and redacted from every `Debug` output and error string produced
//! here. **Note for the daemon's logger:** the HTTP client (`ureq`) logs
//! request URLs — which contain the token — at `debug` level; filter the
//! targets in [`SECRET_LEAKING_LOG_TARGETS`] to `warn` or above.
//!
//! ```no_run
//! use governor_alerts::{Alert, AlertSink, Severity, TelegramConfig, TelegramSender};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let cfg = TelegramConfig::new("/etc/governor/telegram.token", "-1001234567890");
//! let valid = cfg.validate()?; // ConfigProblem: "bot_token_file: … run `chmod 600 …`"
//! let (tx, outcomes) = std::sync::mpsc::channel();
//! let sender = TelegramSender::new(valid, tx)?;
//! sender.send(
//!     Alert::new(Severity::Critical, "crash loop", "lily restarted 12 times in 60s")
//!         .with_service("lily")
//!         .with_audit_head("1042:9f3ab1c2"),
//! );
//! // The daemon records each outcome in its audit chain.
//! let outcome = outcomes.recv()?;
//! # let _ = outcome;
//! sender.shutdown(std::time::Duration::from_secs(5));
//! # Ok(()) }
//! ```

pub mod approval;
mod config;
mod format;
mod group;
mod http;
mod sender;

use std::fmt;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

pub use config::{parse_duration, ConfigProblem, TelegramConfig, ValidatedTelegram};
pub use format::{escape_html, truncate_escaped, MAX_MESSAGE_CHARS};
pub use sender::{DeliveryOutcome, Enqueued, ShutdownReport, Stats, TelegramSender, Tuning};

/// Log targets of our dependencies that may print the request URL (and with
/// it the bot token) at `debug`/`trace` level. The daemon's logger should cap
/// these at `warn`.
pub const SECRET_LEAKING_LOG_TARGETS: &[&str] = &["ureq", "rustls"];

/// How urgent an alert is. Ordered: `Info < Warning < Critical`, so a
/// `min_severity` threshold is a plain comparison.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Worth knowing, not worth waking anyone for.
    Info,
    /// Something drifted or crossed a soft limit (the default threshold).
    #[default]
    Warning,
    /// The host or a protected resource is in danger.
    Critical,
}

impl Severity {
    /// The lowercase name used in config files and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Severity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "info" => Ok(Severity::Info),
            "warning" => Ok(Severity::Warning),
            "critical" => Ok(Severity::Critical),
            other => Err(format!(
                "unknown severity {other:?}; expected info, warning or critical"
            )),
        }
    }
}

/// One thing the daemon wants a human to know.
///
/// `kind` and `service` form the grouping key: alerts that share both inside
/// the group window are folded into one follow-up message with a count.
/// `title` and `body` are plain text (they are HTML-escaped here, so callers
/// never need to think about Telegram's markup).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alert {
    /// How urgent; alerts below the configured `min_severity` are not sent.
    pub severity: Severity,
    /// A short machine-ish category, e.g. `crash loop` or `memory ceiling`.
    pub kind: String,
    /// The service concerned, if any.
    pub service: Option<String>,
    /// One line, shown in bold.
    pub title: String,
    /// Details; cut to fit Telegram's message limit if needed.
    pub body: String,
    /// The audit chain head (`seq:hash` prefix) at the time of the alert.
    /// Printed as the last line of every message so that a reader can tell
    /// whether the audit log was truncated after the alert was sent.
    pub audit_head: Option<String>,
}

impl Alert {
    /// An alert with no service, empty body and no audit head; use the
    /// builder methods to fill in the rest.
    pub fn new(severity: Severity, kind: impl Into<String>, title: impl Into<String>) -> Self {
        Alert {
            severity,
            kind: kind.into(),
            service: None,
            title: title.into(),
            body: String::new(),
            audit_head: None,
        }
    }

    /// Sets the service (part of the grouping key).
    pub fn with_service(mut self, service: impl Into<String>) -> Self {
        self.service = Some(service.into());
        self
    }

    /// Sets the body text.
    pub fn with_body(mut self, body: impl Into<String>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets the audit chain head shown in the footer.
    pub fn with_audit_head(mut self, head: impl Into<String>) -> Self {
        self.audit_head = Some(head.into());
        self
    }
}

/// Where the daemon core sends alerts. A trait so that policy and the event
/// loop are tested without HTTP (see [`MemorySink`]) and so that a host
/// without Telegram configured still runs (see [`LogOnlySink`]).
///
/// Implementations must not block: this is called from the daemon's event
/// loop.
pub trait AlertSink: Send + Sync {
    /// Hands an alert over for delivery. Never blocks, never fails: a sink
    /// that cannot take the alert counts it as dropped.
    fn send(&self, alert: Alert);
}

impl<T: AlertSink + ?Sized> AlertSink for Arc<T> {
    fn send(&self, alert: Alert) {
        (**self).send(alert)
    }
}

impl<T: AlertSink + ?Sized> AlertSink for Box<T> {
    fn send(&self, alert: Alert) {
        (**self).send(alert)
    }
}

/// A sink that only writes alerts to the log, for hosts without Telegram.
/// The daemon logs every alert anyway; this exists so the daemon can always
/// hold *some* `AlertSink`.
#[derive(Debug, Default, Clone, Copy)]
pub struct LogOnlySink;

impl AlertSink for LogOnlySink {
    fn send(&self, alert: Alert) {
        let level = match alert.severity {
            Severity::Info => log::Level::Info,
            Severity::Warning => log::Level::Warn,
            Severity::Critical => log::Level::Error,
        };
        log::log!(
            target: "governor_alerts",
            level,
            "alert [{}] {}{}: {}{}",
            alert.kind,
            alert.service.as_deref().unwrap_or("-"),
            alert
                .audit_head
                .as_deref()
                .map(|h| format!(" (audit {h})"))
                .unwrap_or_default(),
            alert.title,
            if alert.body.is_empty() {
                String::new()
            } else {
                format!(" — {}", alert.body)
            },
        );
    }
}

/// A sink that keeps every alert in memory, for the daemon's own tests.
#[derive(Debug, Default)]
pub struct MemorySink {
    alerts: Mutex<Vec<Alert>>,
}

impl MemorySink {
    /// An empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes all alerts received so far, leaving the sink empty.
    pub fn take(&self) -> Vec<Alert> {
        std::mem::take(&mut *self.alerts.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

impl AlertSink for MemorySink {
    fn send(&self, alert: Alert) {
        self.alerts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(alert);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn severity_orders_and_parses() {
        assert!(Severity::Info < Severity::Warning);
        assert!(Severity::Warning < Severity::Critical);
        assert_eq!("critical".parse::<Severity>(), Ok(Severity::Critical));
        assert!("fatal".parse::<Severity>().is_err());
        assert_eq!(Severity::default(), Severity::Warning);
    }

    #[test]
    fn memory_sink_records_through_trait_object() {
        let sink: Arc<dyn AlertSink> = Arc::new(MemorySink::new());
        sink.send(Alert::new(Severity::Info, "k", "t").with_service("s"));
        let mem = MemorySink::new();
        mem.send(Alert::new(Severity::Info, "k", "t"));
        assert_eq!(mem.take().len(), 1);
        assert!(mem.take().is_empty());
        LogOnlySink.send(Alert::new(Severity::Critical, "k", "t").with_body("b"));
    }
}
