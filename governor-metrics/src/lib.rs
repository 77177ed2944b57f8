//! Prometheus `/metrics` for the governor daemon.
//!
//! The daemon already knows everything worth graphing — service states,
//! restarts, memory, ring-buffer losses, audit and alert counters, the kill
//! switch — and hands it over as one JSON snapshot (schema below). This crate
//! only *renders* that snapshot and *serves* it, so that:
//!
//! * it does not depend on the `governor` crate (the daemon's internals can
//!   change without touching the exposition, and this crate builds without an
//!   eBPF toolchain);
//! * every scrape shows the truth: [`render`] builds a fresh registry from
//!   the snapshot each time and caches nothing, so a service that disappears
//!   from the snapshot disappears from `/metrics`;
//! * a malformed or partial snapshot never takes the endpoint down: any field
//!   that is missing, `null` or of the wrong type skips its sample, it never
//!   panics.
//!
//! Rendering goes through the Prometheus project's own `prometheus-client`
//! crate and its Prometheus text encoder (format 0.0.4, content type
//! [`CONTENT_TYPE`]): it escapes label values (`"`, `\`, newlines — service
//! names come from the host) and HELP text, and its output passes
//! `promtool check metrics` cleanly. The crate's OpenMetrics encoder does
//! not: it names counter families without `_total` (`# HELP governor_events`
//! over `governor_events_total` samples), which promtool reports as samples
//! without help text.
//!
//! Serving is plain HTTP/1.1 (`hyper` 1) on an already-bound **loopback**
//! listener: the daemon runs as root, so its endpoint must not be reachable
//! from the network ([`check_listen`] refuses anything else and [`serve`]
//! checks again). Each connection gets its own task and a header read
//! timeout, so one slow or silent client cannot hold up the others, and the
//! number of simultaneous connections is capped.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! let addr: std::net::SocketAddr = "127.0.0.1:9464".parse()?;
//! governor_metrics::check_listen(&addr).map_err(anyhow::Error::msg)?;
//! let listener = tokio::net::TcpListener::bind(addr).await?;
//! governor_metrics::serve(listener, || async {
//!     // Ask the daemon's event loop for a snapshot here.
//!     Ok(serde_json::json!({"memory": {"available_bytes": 1_000_000}}))
//! })
//! .await
//! # }
//! ```
//!
//! # Snapshot schema
//!
//! ```json
//! {
//!   "services": [ {"name":"lily","configured":true,"critical":false,
//!                  "state":"stable|restarting|crash-loop|down","restarts_total":3,"restarts_in_window":1,
//!                  "memory_state":"ok|drift|over-ceiling|memory-loop","rss_bytes":123,
//!                  "ceiling_bytes":209715200,"baseline_bytes":100,
//!                  "killswitch_held": false, "drift": ["uptime","restart","memory","config"]} ],
//!   "memory": {"available_bytes":1,"floor_bytes":1,"psi_some_avg10":0.5,"flush_active":false},
//!   "rings": [{"ring":"lifecycle","events":10,"lost":0}],
//!   "audit": {"entries_total": 12, "head_seq": 11, "held": 0, "dropped_total": 0},
//!   "alerts": {"sent":1,"dropped":0,"queued":0,"failed":0},
//!   "protect_attempts": [{"tier":"untouchable","result":"refused","count":4}],
//!   "kill_switch": {"engaged": false, "held_services": 0, "blocked_starts_total": 0},
//!   "bounds": {"unconfigured_services":5,"max_unconfigured_services":1024,
//!              "unconfigured_evicted":0,"processes":120}
//! }
//! ```
//!
//! The metric names and label values produced from it are a contract: the
//! Grafana dashboard (`examples/grafana-dashboard.json`) and alerting rules
//! depend on them. The full list is in [`METRIC_NAMES`].

mod render;
mod serve;

pub use render::{render, METRIC_NAMES};
pub use serve::serve;

use std::net::SocketAddr;

/// The `Content-Type` of `/metrics`: the Prometheus text exposition format,
/// version 0.0.4 (what [`render`] produces).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Refuses anything but a loopback address (127.0.0.0/8, ::1); the error says why and what to use.
///
/// The daemon runs as root and `/metrics` has no authentication: it names
/// every service and what governor thinks of it, so it must only be reachable
/// from the host itself (a local Prometheus or an SSH tunnel).
pub fn check_listen(addr: &SocketAddr) -> Result<(), String> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    let what = if addr.ip().is_unspecified() {
        "listens on every interface"
    } else {
        "is not a loopback address"
    };
    Err(format!(
        "metrics listen address {addr} {what}: the /metrics endpoint is unauthenticated and \
         the daemon runs as root, so it only listens on loopback; use 127.0.0.1:{port} \
         (or [::1]:{port}) and scrape it from this host or through an SSH tunnel",
        port = addr.port()
    ))
}
