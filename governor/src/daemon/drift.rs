//! Drift (issue 12): what should be happening against what the kernel
//! shows. Four kinds, collected by `governor drift`:
//!
//! - **config**: a watched file (`[drift] watch`) whose content changed
//!   without a governance action — found by the protector's watched tier
//!   (`crate::protect`), with the writer;
//! - **uptime**: a configured service's instance that governor never saw
//!   start (it was restarted while governor was down, or before it ever
//!   ran it): each instance governor sees start is recorded in
//!   `<state_dir>/instances.json`, and one that doesn't match the record
//!   at start is reported once;
//! - **restart** and **memory**: the velocity and memory-budget policies'
//!   own verdicts (a crash loop, a service over its ceiling or drifting
//!   up), taken from the status snapshot.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::Daemon;
use crate::statefile::StateFile;

/// Two start times of one pid closer than this are the same process: a
/// process read from /proc has its start time in clock ticks (10 ms).
const SAME_START_NS: u64 = 50_000_000;

/// The instance governor last saw start, per configured service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Seen {
    pid: u32,
    /// CLOCK_MONOTONIC ns (this boot's).
    start_ns: u64,
    boot_id: String,
    /// When governor saw it (RFC 3339).
    at: String,
}

#[derive(Default, Serialize, Deserialize)]
struct Records {
    #[serde(default)]
    services: BTreeMap<String, Seen>,
    /// Open uptime items (service → detail): kept across restarts until
    /// the service restarts under governor's eyes or is accepted.
    #[serde(default)]
    open: BTreeMap<String, Value>,
}

/// The uptime side of drift.
pub(super) struct Uptime {
    records: Records,
    file: Option<StateFile>,
    boot_id: String,
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

impl Uptime {
    /// Loads `<state_dir>/instances.json`; an unreadable one starts afresh
    /// (returned as a problem: what it held is only a baseline).
    pub(super) fn load(state_dir: &std::path::Path, file: StateFile) -> (Uptime, Option<String>) {
        let p = state_dir.join("instances.json");
        let (records, problem) = match std::fs::read(&p) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(r) => (r, None),
                Err(e) => (
                    Records::default(),
                    Some(format!(
                        "{} is corrupt ({e}); instances start afresh",
                        p.display()
                    )),
                ),
            },
            Err(_) => (Records::default(), None),
        };
        (
            Uptime {
                records,
                file: Some(file),
                boot_id: boot_id(),
            },
            problem,
        )
    }

    fn save(&self) {
        if let (Some(f), Ok(b)) = (&self.file, serde_json::to_vec_pretty(&self.records)) {
            f.save(b);
        }
    }

    pub(super) fn finish(&mut self) {
        if let Some(mut f) = self.file.take() {
            f.finish();
        }
    }

    /// Open uptime items.
    pub(super) fn items(&self) -> impl Iterator<Item = (&String, &Value)> {
        self.records.open.iter()
    }

    pub(super) fn is_open(&self, service: &str) -> bool {
        self.records.open.contains_key(service)
    }

    /// `governor drift accept SERVICE`: closes its uptime item.
    pub(super) fn accept(&mut self, service: &str) -> Option<Value> {
        let item = self.records.open.remove(service);
        self.save();
        item
    }
}

impl Daemon {
    /// The live instances of a configured service, newest last.
    fn current_instances(&self, service: &str) -> Vec<(u32, u64)> {
        let mut v: Vec<(u32, u64)> = self
            .table
            .instances_of(service)
            .map(|p| (p.pid, p.start_ns))
            .collect();
        v.sort_by_key(|&(_, start)| start);
        v
    }

    /// At start: every configured service's running instance against the
    /// one governor last saw start. A different one started while
    /// governor was not watching: `drift.uptime`, once.
    pub(super) fn uptime_at_start(&mut self) {
        let names: Vec<String> = self.service_index.keys().cloned().collect();
        let now = crate::events::rfc3339(std::time::SystemTime::now());
        let mut changed = false;
        for name in names {
            let live = self.current_instances(&name);
            let Some(&(pid, start_ns)) = live.last() else {
                continue;
            };
            let boot = self.uptime.boot_id.clone();
            let rec = self.uptime.records.services.get(&name).cloned();
            // The one governor last saw start is still running (a cluster
            // app has several; governor recorded the newest it saw).
            let same = rec.as_ref().is_some_and(|r| {
                r.boot_id == boot
                    && live
                        .iter()
                        .any(|&(p, s)| r.pid == p && r.start_ns.abs_diff(s) <= SAME_START_NS)
            });
            if same {
                continue;
            }
            if let Some(r) = &rec {
                let up_ms = crate::events::monotonic_ns().saturating_sub(start_ns) / 1_000_000;
                let why = if r.boot_id != boot {
                    "started after a reboot, while governor was not running"
                } else {
                    "restarted while governor was not running (or by something it didn't see)"
                };
                let detail = json!({
                    "kind": "uptime", "pid": pid, "uptime_ms": up_ms, "why": why,
                    "expected": r, "since": now,
                });
                self.record(
                    "drift.uptime",
                    Some(&name),
                    detail.clone(),
                    Some(super::alert_of(
                        governor_alerts::Severity::Warning,
                        "drift",
                        Some(&name),
                        format!("{name}: an instance governor never saw start (pid {pid})"),
                        why.to_string(),
                    )),
                );
                self.uptime.records.open.insert(name.clone(), detail);
            }
            self.uptime.records.services.insert(
                name,
                Seen {
                    pid,
                    start_ns,
                    boot_id: boot,
                    at: now.clone(),
                },
            );
            changed = true;
        }
        if changed {
            self.uptime.save();
        }
    }

    /// A new instance of a configured service started, and governor saw
    /// it: the expected instance from now on.
    pub(super) fn uptime_seen(&mut self, pid: u32) {
        let Some(p) = self.table.get(pid) else {
            return;
        };
        if !p.instance || !self.service_index.contains_key(&p.service) {
            return;
        }
        let (service, start_ns) = (p.service.clone(), p.start_ns);
        self.uptime.records.open.remove(&service);
        self.uptime.records.services.insert(
            service,
            Seen {
                pid,
                start_ns,
                boot_id: self.uptime.boot_id.clone(),
                at: crate::events::rfc3339(std::time::SystemTime::now()),
            },
        );
        self.uptime.save();
    }

    /// Every open drift item: config (from the protector), uptime, and the
    /// restart and memory policies' verdicts.
    pub(super) fn drift_report(&self, config: Vec<crate::protect::DriftItem>) -> Value {
        let mut items: Vec<Value> = config
            .into_iter()
            .map(|c| {
                json!({"kind": "config", "path": c.path, "since": c.since, "detail": c.why,
                       "declared_sha256": c.declared_sha256, "sha256": c.sha256, "who": c.writer})
            })
            .collect();
        for (service, d) in self.uptime.items() {
            items.push(
                json!({"kind": "uptime", "service": service, "since": d["since"],
                              "detail": d["why"], "pid": d["pid"], "expected": d["expected"]}),
            );
        }
        for r in self.snapshot(false).services {
            use governor_core::memory::MemState;
            use governor_core::velocity::State;
            if matches!(r.status.state, State::CrashLoop | State::Restarting) {
                items.push(json!({
                    "kind": "restart", "service": r.status.name,
                    "detail": format!("{}: {} restarts in {} s (max {})", r.status.state.as_str(),
                                      r.status.restarts_in_window, r.status.window_s, r.status.max_restarts),
                    "since_ms_ago": r.status.crash_loop_since_ms_ago,
                }));
            }
            if !matches!(r.memory_state, MemState::Ok) {
                items.push(json!({
                    "kind": "memory", "service": r.status.name,
                    "detail": format!("{:?}: {} MiB of a {} MiB ceiling (baseline {} MiB)",
                        r.memory_state,
                        r.rss_bytes.unwrap_or(0) >> 20,
                        r.ceiling_bytes.unwrap_or(0) >> 20,
                        r.baseline_bytes.unwrap_or(0) >> 20),
                }));
            }
        }
        json!({"items": items})
    }
}

impl Daemon {
    /// `governor drift [accept TARGET --reason]`. Accepting is a
    /// governance action: a person at a login terminal only (an agent
    /// must not wave its own drift away), audited before the reply.
    pub(super) async fn on_drift(
        &mut self,
        accept: Option<String>,
        reason: String,
        peer: crate::control::Peer,
        stdin: Option<std::os::fd::OwnedFd>,
        protector: &mut crate::protect::Protector,
        reply: std::sync::mpsc::SyncSender<crate::control::Response>,
    ) {
        use crate::control::Response;
        let Some(target) = accept else {
            let _ = reply.send(Response::ok(self.drift_report(protector.drift_items())));
            return;
        };
        let caller = self.caller(peer.pid, peer.uid);
        if reason.trim().is_empty() {
            let _ = reply.send(Response::err(
                "--reason is required: say why this drift is accepted",
            ));
            return;
        }
        if let Err(why) = super::human_caller(&self.table, peer.pid, stdin.as_ref()) {
            self.record(
                "drift.refused",
                None,
                json!({"target": target, "why": why, "caller": caller}),
                None,
            );
            let _ = reply.send(Response::err(format!(
                "drift accept needs a person at a login terminal: {why}"
            )));
            return;
        }
        if target.contains('/') {
            let r = protector
                .drift_accept(std::path::Path::new(&target), &reason, caller)
                .await;
            let _ = reply.send(match r {
                Ok(v) => Response::ok(v),
                Err(e) => Response::err(format!("{e:#}")),
            });
            return;
        }
        let Some(item) = self.uptime.accept(&target) else {
            let _ = reply.send(Response::err(format!(
                "no open drift for {target:?}: give a watched file's absolute path or a service \
                 with uptime drift (see governor drift)"
            )));
            return;
        };
        let d = json!({"service": target, "kind": "uptime", "reason": reason, "by": caller,
                       "item": item});
        match self
            .effects
            .audit_durable("drift.accept", Some(&target), d.clone())
            .await
        {
            Some(_) => {
                let _ = reply.send(Response::ok(d));
            }
            None => {
                self.uptime.records.open.insert(target, item);
                self.uptime.save();
                let _ = reply.send(Response::err(
                    "not accepted: the audit entry could not be written",
                ));
            }
        }
    }
}
