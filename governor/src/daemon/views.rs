//! What every reader sees: one service row, the host's memory, and the
//! counters `/metrics` exports — built from the same snapshot the control
//! socket's `status` uses, so `status --json`, `/metrics` and MCP can't
//! disagree.

use governor_core::{memory::MemState, status::Row, velocity::State};
use serde_json::{json, Value};

use super::Daemon;
use crate::protect::Protector;

/// Counters the daemon keeps for `/metrics` (since it started).
#[derive(Debug, Default)]
pub(super) struct Counters {
    /// Lifecycle records read from the kernel ring.
    pub lifecycle_events: u64,
    /// Memory-tracker records (crossings) read.
    pub memory_events: u64,
    /// MCP calls answered, and refused by the rate limit.
    pub mcp_calls: u64,
    pub mcp_rate_limited: u64,
}

impl Daemon {
    /// One service as `status --json`, `/metrics` and MCP show it: the
    /// core's row, which kinds of drift it shows, whether it is critical and
    /// held by the kill switch.
    pub(super) fn service_json(&self, r: &Row) -> Value {
        let name = &r.status.name;
        let mut v = serde_json::to_value(r).unwrap_or(Value::Null);
        let mut drift = Vec::new();
        if self.uptime.is_open(name) {
            drift.push("uptime");
        }
        if matches!(r.status.state, State::CrashLoop | State::Restarting) {
            drift.push("restart");
        }
        if !matches!(r.memory_state, MemState::Ok) {
            drift.push("memory");
        }
        let critical = r.status.configured && self.mem_limits_of(name).critical;
        v["drift"] = json!(drift);
        v["critical"] = json!(critical);
        v["killswitch_held"] = json!(self.killswitch.holds(name, critical));
        v
    }

    /// The host's memory against the floor (status, metrics, MCP).
    pub(super) fn memory_json(&self) -> Value {
        json!({
            "available_bytes": crate::memsample::mem_available(),
            "floor_bytes": self.config.system.memory_floor.0,
            "psi_some_avg10": crate::psi::some_avg10(),
            "pressure_trigger": match &self.psi_problem {
                None => json!("armed"),
                Some(e) => json!(format!("not armed: {e}")),
            },
            "tracker": match &self.mem_arms {
                Ok(a) => json!({"kind": "kernel (kmem/rss_stat)", "watched_pids": a.watched(),
                                "armings": a.arms, "crossings": a.crossings}),
                Err(e) => json!({"kind": "/proc only", "why": e}),
            },
            "flush_active": self.flush.active(),
        })
    }

    /// What `/metrics` renders (`governor_metrics::render`'s schema).
    pub(super) fn metrics_data(&self, protector: &Protector, lifecycle_lost: u64) -> Value {
        let snap = self.snapshot(false);
        let services: Vec<Value> = snap.services.iter().map(|r| self.service_json(r)).collect();
        let audit_held = self.effects.held();
        let alerts = self
            .telegram
            .as_ref()
            .map(|t| t.stats())
            .unwrap_or_default();
        let attempts: Vec<Value> = protector
            .attempt_counts
            .iter()
            .map(|((tier, result), n)| json!({"tier": tier, "result": result, "count": n}))
            .collect();
        let held = self
            .service_index
            .keys()
            .filter(|s| self.killswitch.holds(s, self.mem_limits_of(s).critical))
            .count();
        let head = self.audit.head();
        json!({
            "services": services,
            "memory": self.memory_json(),
            "rings": [
                {"ring": "lifecycle", "events": self.counters.lifecycle_events, "lost": lifecycle_lost},
                {"ring": "attempts", "events": protector.attempt_events, "lost": protector.dropped()},
                {"ring": "memory", "events": self.counters.memory_events, "lost": 0},
            ],
            "audit": {
                // The chain's length: seq counts from 0 across rotations.
                "entries_total": head.as_ref().map(|h| h.seq + 1).unwrap_or(0),
                "head_seq": head.as_ref().map(|h| h.seq),
                "held": audit_held.held,
                "dropped_total": audit_held.dropped_total,
            },
            "alerts": {"sent": alerts.sent, "dropped": alerts.dropped, "queued": alerts.queued,
                       "failed": alerts.failed},
            "protect_attempts": attempts,
            "kill_switch": {
                "engaged": self.killswitch.engaged.is_some(),
                "held_services": held,
                "blocked_starts_total": self.ks_busy.blocked_total(),
            },
            "mcp": {"calls": self.counters.mcp_calls, "rate_limited": self.counters.mcp_rate_limited},
            "bounds": snap.bounds,
        })
    }
}
