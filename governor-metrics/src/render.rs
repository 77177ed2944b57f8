//! Snapshot → Prometheus text exposition.
//!
//! Each scrape builds a fresh [`Registry`] holding constant samples taken
//! from the snapshot: nothing is cached between scrapes, so `/metrics` is
//! exactly the daemon's current view. Samples keep the snapshot's order
//! (services as listed, states in their documented order), so the output is
//! deterministic and diffs well. A family without any sample is left out
//! entirely (no HELP/TYPE for nothing).
//!
//! Robustness rules, because the snapshot comes from another process and may
//! lag behind or run ahead of this crate's schema:
//! * a missing, `null` or mistyped field skips its sample only;
//! * an unknown `state`/`memory_state` skips that service's one-hot family
//!   (a one-hot with no hot state would look like a valid reading);
//! * a service without a non-empty `name` is skipped (it has no label);
//! * a repeated label set (the same service or ring twice) keeps the first,
//!   because duplicate series make Prometheus reject the whole scrape;
//! * counters must be non-negative.

use std::collections::HashSet;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use serde_json::Value;

/// Service lifecycle states, in the order they are exposed.
const SERVICE_STATES: [&str; 4] = ["stable", "restarting", "crash-loop", "down"];
/// Service memory states, in the order they are exposed.
const MEMORY_STATES: [&str; 4] = ["ok", "drift", "over-ceiling", "memory-loop"];
/// Drift kinds, in the order they are exposed.
const DRIFT_KINDS: [&str; 4] = ["uptime", "restart", "memory", "config"];

/// Every metric [`render`] can produce, with its type and HELP text, in
/// output order. Names are as exposed (counters end in `_total`); HELP texts
/// have no final full stop because prometheus-client appends one.
macro_rules! metrics {
    ($($variant:ident => $name:literal, $kind:ident, $help:literal;)*) => {
        #[derive(Clone, Copy)]
        enum M { $($variant),* }

        const DEFS: &[(&str, Kind, &str)] = &[$(($name, Kind::$kind, $help)),*];

        /// The names of every metric family `/metrics` can expose, as exposed
        /// (counters end in `_total`). They are the contract with dashboards
        /// and alerting rules.
        pub const METRIC_NAMES: &[&str] = &[$($name),*];
    };
}

metrics! {
    ServiceRestarts => "governor_service_restarts_total", Counter,
        "Restarts of the service observed by governor (count)";
    ServiceRestartsInWindow => "governor_service_restarts_in_window", Gauge,
        "Restarts of the service inside the crash-loop detection window (count)";
    ServiceState => "governor_service_state", Gauge,
        "Service lifecycle state, one-hot over label state (stable, restarting, crash-loop, down): 1 for the current state, 0 for the others";
    ServiceMemoryState => "governor_service_memory_state", Gauge,
        "Service memory state, one-hot over label state (ok, drift, over-ceiling, memory-loop): 1 for the current state, 0 for the others";
    ServiceRss => "governor_service_memory_rss_bytes", Gauge,
        "Resident set size of the service's processes (bytes)";
    ServiceCeiling => "governor_service_memory_ceiling_bytes", Gauge,
        "Memory ceiling of the service, from its configuration (bytes)";
    ServiceBaseline => "governor_service_memory_baseline_bytes", Gauge,
        "Memory baseline of the service, against which memory drift is measured (bytes)";
    ServiceCritical => "governor_service_critical", Gauge,
        "1 if the service is marked critical in the configuration, else 0";
    ServiceConfigured => "governor_service_configured", Gauge,
        "1 if the service is declared in governor's configuration, 0 if governor only discovered it";
    ServiceKillswitchHeld => "governor_service_killswitch_held", Gauge,
        "1 if the kill switch holds the service (its starts are blocked), else 0";
    ServiceDrift => "governor_service_drift", Gauge,
        "Open drift on the service by label kind (uptime, restart, memory, config): 1 if open, else 0";
    MemoryAvailable => "governor_memory_available_bytes", Gauge,
        "Host MemAvailable, from /proc/meminfo (bytes)";
    MemoryFloor => "governor_memory_floor_bytes", Gauge,
        "Configured MemAvailable floor: below it governor starts a memory flush (bytes)";
    MemoryPsi => "governor_memory_psi_some_avg10", Gauge,
        "Host memory pressure: PSI some avg10 from /proc/pressure/memory, share of the last 10 s in which some task stalled on memory (percent, 0-100)";
    MemoryFlushActive => "governor_memory_flush_active", Gauge,
        "1 while a memory flush cycle runs (non-critical services restarted one at a time to get MemAvailable back above the floor), else 0";
    Events => "governor_events_total", Counter,
        "Events read from the kernel ring buffer named by label ring (count)";
    EventsLost => "governor_events_lost_total", Counter,
        "Events lost because the kernel ring buffer named by label ring was full (count)";
    AuditEntries => "governor_audit_entries_total", Counter,
        "Entries in the hash-chained audit log, across rotations: its length, head seq + 1 (count)";
    AuditHeadSeq => "governor_audit_head_seq", Gauge,
        "Sequence number of the newest entry in the audit log";
    AuditHeld => "governor_audit_held_entries", Gauge,
        "Audit entries held in memory because the state directory is full, waiting to be written (count)";
    AuditDropped => "governor_audit_dropped_total", Counter,
        "Audit entries dropped beyond the memory buffer while the state directory was full, each counted in audit.backlog_written (count)";
    AlertsSent => "governor_alerts_sent_total", Counter,
        "Alerts delivered to Telegram (count)";
    AlertsDropped => "governor_alerts_dropped_total", Counter,
        "Alerts dropped because the delivery queue was full (count)";
    AlertsFailed => "governor_alerts_failed_total", Counter,
        "Alerts that could not be delivered, retries exhausted (count)";
    AlertsQueued => "governor_alerts_queued", Gauge,
        "Alerts waiting in the delivery queue (count)";
    ProtectAttempts => "governor_protect_attempts_total", Counter,
        "Write attempts on protected files, by protection tier and result (count)";
    KillswitchEngaged => "governor_killswitch_engaged", Gauge,
        "1 if the kill switch is engaged, else 0";
    KillswitchHeld => "governor_killswitch_held_services", Gauge,
        "Services held by the kill switch (count)";
    KillswitchBlocked => "governor_killswitch_blocked_starts_total", Counter,
        "Service starts blocked by the kill switch (count)";
    Unconfigured => "governor_unconfigured_services", Gauge,
        "Unconfigured (discovered) services governor tracks (count)";
    UnconfiguredMax => "governor_unconfigured_services_max", Gauge,
        "Most unconfigured services governor tracks; beyond it the least recently seen is evicted (count)";
    UnconfiguredEvicted => "governor_unconfigured_evicted_total", Counter,
        "Unconfigured services evicted to stay under the limit (count)";
    Processes => "governor_processes", Gauge,
        "Processes governor tracks (count)";
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Counter,
    Gauge,
}

/// A sample value as the snapshot gave it: integers stay integers in the
/// output (`3`, not `3.0`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Num {
    U(u64),
    I(i64),
    F(f64),
}

type Labels = Vec<(&'static str, String)>;

/// One metric family's samples, in insertion order, without repeated label
/// sets.
#[derive(Debug)]
struct Samples {
    kind: Kind,
    rows: Vec<(Labels, Num)>,
    seen: HashSet<Labels>,
}

impl Samples {
    fn push(&mut self, labels: Labels, value: Num) {
        let negative = match value {
            Num::U(_) => false,
            Num::I(v) => v < 0,
            Num::F(v) => v < 0.0,
        };
        if self.kind == Kind::Counter && negative {
            return;
        }
        if self.seen.insert(labels.clone()) {
            self.rows.push((labels, value));
        }
    }
}

fn encode_value(kind: Kind, value: Num, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
    match (kind, value) {
        (Kind::Counter, Num::U(v)) => ConstCounter::new(v).encode(encoder),
        (Kind::Counter, Num::F(v)) => ConstCounter::new(v).encode(encoder),
        // Only negative integers parse as `I`, and `Samples::push` refuses
        // them for counters; nothing to write.
        (Kind::Counter, Num::I(_)) => Ok(()),
        (Kind::Gauge, Num::U(v)) => ConstGauge::new(v).encode(encoder),
        (Kind::Gauge, Num::I(v)) => ConstGauge::new(v).encode(encoder),
        (Kind::Gauge, Num::F(v)) => ConstGauge::new(v).encode(encoder),
    }
}

impl EncodeMetric for Samples {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        for (labels, value) in &self.rows {
            encode_value(self.kind, *value, encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        match self.kind {
            Kind::Counter => MetricType::Counter,
            Kind::Gauge => MetricType::Gauge,
        }
    }

    fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// All families of one scrape, indexed by [`M`].
struct Out(Vec<Samples>);

impl Out {
    fn new() -> Self {
        Out(DEFS
            .iter()
            .map(|&(_, kind, _)| Samples {
                kind,
                rows: Vec::new(),
                seen: HashSet::new(),
            })
            .collect())
    }

    fn add(&mut self, metric: M, labels: Labels, value: Option<Num>) {
        if let (Some(samples), Some(value)) = (self.0.get_mut(metric as usize), value) {
            samples.push(labels, value);
        }
    }

    fn into_registry(self) -> Registry {
        let mut registry = Registry::default();
        for (samples, &(name, kind, help)) in self.0.into_iter().zip(DEFS) {
            // prometheus-client appends `_total` to counters itself.
            let name = match kind {
                Kind::Counter => name.strip_suffix("_total").unwrap_or(name),
                Kind::Gauge => name,
            };
            registry.register(name, help, samples);
        }
        registry
    }
}

/// A number field: unsigned and signed integers as such, other numbers as
/// finite floats; anything else (missing, `null`, a string…) is no sample.
fn num(value: Option<&Value>) -> Option<Num> {
    let value = value?;
    if let Some(v) = value.as_u64() {
        Some(Num::U(v))
    } else if let Some(v) = value.as_i64() {
        Some(Num::I(v))
    } else {
        value.as_f64().filter(|v| v.is_finite()).map(Num::F)
    }
}

/// A boolean field as 0/1.
fn flag(value: Option<&Value>) -> Option<Num> {
    value?.as_bool().map(|b| Num::U(u64::from(b)))
}

/// A non-empty string field, for a label value.
fn text(value: Option<&Value>) -> Option<&str> {
    value?.as_str().filter(|s| !s.is_empty())
}

fn array(value: Option<&Value>) -> &[Value] {
    value.and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

/// Renders the snapshot (schema below) as Prometheus text exposition. Label values escaped (prometheus-client does it).
///
/// The output is the Prometheus text format 0.0.4 (serve it as
/// [`crate::CONTENT_TYPE`]). See the crate documentation for the snapshot
/// schema; anything missing, `null` or mistyped is skipped, never a panic. An
/// empty snapshot renders as an empty string.
pub fn render(snapshot: &Value) -> String {
    let mut out = Out::new();
    services(&mut out, snapshot);
    host(&mut out, snapshot);

    let mut text = String::new();
    if let Err(e) =
        prometheus_client::encoding::prometheus_text::encode(&mut text, &out.into_registry())
    {
        // Writing into a String cannot fail and our metrics return no errors
        // of their own; should it happen anyway, a truncated exposition would
        // be misread, so expose nothing.
        log::error!("encoding /metrics failed: {e}");
        text.clear();
    }
    text
}

fn services(out: &mut Out, snapshot: &Value) {
    let mut names = HashSet::new();
    for service in array(snapshot.get("services")) {
        let Some(name) = text(service.get("name")) else {
            continue;
        };
        if !names.insert(name) {
            continue;
        }
        let labels = || vec![("service", name.to_owned())];
        let with = |key: &'static str, value: &str| {
            vec![("service", name.to_owned()), (key, value.to_owned())]
        };
        let field = |key: &str| service.get(key);

        out.add(M::ServiceRestarts, labels(), num(field("restarts_total")));
        out.add(
            M::ServiceRestartsInWindow,
            labels(),
            num(field("restarts_in_window")),
        );
        one_hot(out, M::ServiceState, &SERVICE_STATES, field("state"), with);
        one_hot(
            out,
            M::ServiceMemoryState,
            &MEMORY_STATES,
            field("memory_state"),
            with,
        );
        out.add(M::ServiceRss, labels(), num(field("rss_bytes")));
        out.add(M::ServiceCeiling, labels(), num(field("ceiling_bytes")));
        out.add(M::ServiceBaseline, labels(), num(field("baseline_bytes")));
        out.add(M::ServiceCritical, labels(), flag(field("critical")));
        out.add(M::ServiceConfigured, labels(), flag(field("configured")));
        out.add(
            M::ServiceKillswitchHeld,
            labels(),
            flag(field("killswitch_held")),
        );
        if let Some(drift) = field("drift").and_then(Value::as_array) {
            for kind in DRIFT_KINDS {
                let open = drift.iter().any(|d| d.as_str() == Some(kind));
                out.add(
                    M::ServiceDrift,
                    with("kind", kind),
                    Some(Num::U(open.into())),
                );
            }
        }
    }
}

/// `state="…"` for every state in `states`: 1 for `current`, 0 for the
/// rest; nothing if `current` is missing or not one of `states`.
fn one_hot(
    out: &mut Out,
    metric: M,
    states: &[&str],
    current: Option<&Value>,
    labels: impl Fn(&'static str, &str) -> Labels,
) {
    let Some(current) = current.and_then(Value::as_str) else {
        return;
    };
    if !states.contains(&current) {
        return;
    }
    for &state in states {
        let hot = state == current;
        out.add(metric, labels("state", state), Some(Num::U(hot.into())));
    }
}

fn host(out: &mut Out, snapshot: &Value) {
    let section = |name: &str, key: &str| snapshot.get(name).and_then(|s| s.get(key));

    let memory = |key| section("memory", key);
    out.add(M::MemoryAvailable, vec![], num(memory("available_bytes")));
    out.add(M::MemoryFloor, vec![], num(memory("floor_bytes")));
    out.add(M::MemoryPsi, vec![], num(memory("psi_some_avg10")));
    out.add(M::MemoryFlushActive, vec![], flag(memory("flush_active")));

    for ring in array(snapshot.get("rings")) {
        let Some(name) = text(ring.get("ring")) else {
            continue;
        };
        let labels = || vec![("ring", name.to_owned())];
        out.add(M::Events, labels(), num(ring.get("events")));
        out.add(M::EventsLost, labels(), num(ring.get("lost")));
    }

    out.add(
        M::AuditEntries,
        vec![],
        num(section("audit", "entries_total")),
    );
    out.add(M::AuditHeadSeq, vec![], num(section("audit", "head_seq")));
    out.add(M::AuditHeld, vec![], num(section("audit", "held")));
    out.add(
        M::AuditDropped,
        vec![],
        num(section("audit", "dropped_total")),
    );

    let alerts = |key| num(section("alerts", key));
    out.add(M::AlertsSent, vec![], alerts("sent"));
    out.add(M::AlertsDropped, vec![], alerts("dropped"));
    out.add(M::AlertsFailed, vec![], alerts("failed"));
    out.add(M::AlertsQueued, vec![], alerts("queued"));

    for attempt in array(snapshot.get("protect_attempts")) {
        let (Some(tier), Some(result)) = (text(attempt.get("tier")), text(attempt.get("result")))
        else {
            continue;
        };
        out.add(
            M::ProtectAttempts,
            vec![("tier", tier.to_owned()), ("result", result.to_owned())],
            num(attempt.get("count")),
        );
    }

    let kill = |key| section("kill_switch", key);
    out.add(M::KillswitchEngaged, vec![], flag(kill("engaged")));
    out.add(M::KillswitchHeld, vec![], num(kill("held_services")));
    out.add(
        M::KillswitchBlocked,
        vec![],
        num(kill("blocked_starts_total")),
    );

    let bounds = |key| num(section("bounds", key));
    out.add(M::Unconfigured, vec![], bounds("unconfigured_services"));
    out.add(
        M::UnconfiguredMax,
        vec![],
        bounds("max_unconfigured_services"),
    );
    out.add(
        M::UnconfiguredEvicted,
        vec![],
        bounds("unconfigured_evicted"),
    );
    out.add(M::Processes, vec![], bounds("processes"));
}
