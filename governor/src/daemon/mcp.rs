//! MCP tool calls (`governor mcp`, issue 13): an agent asks before it
//! touches. The caller is who the kernel says it is — SO_PEERCRED's pid,
//! looked up in the daemon's own kernel-fed process table — so "my status"
//! is the caller's service, never a name it claims. On the MCP socket
//! (non-root agents) every answer is about the caller's own service, and
//! the only calls that change anything are `request_approval` (a person
//! still decides) and `kill_switch_engage` (its own service only).
//!
//! Every call is audited (`mcp.call`, durable before it is answered or
//! acted on) with the caller; a caller is held to `RATE` calls per
//! `RATE_WINDOW` so an agent stuck in a loop can't flood the chain.

use std::{
    collections::HashMap,
    path::Path,
    sync::mpsc::SyncSender,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use super::Daemon;
use crate::{
    control::{KillAction, McpCall, Peer, Response, Via},
    effects::Effect,
    protect::Protector,
};

/// Calls per caller uid per window, and from everyone together (a user
/// with subordinate uids could otherwise be many callers).
const RATE: u32 = 60;
const RATE_ALL: u32 = 300;
const RATE_WINDOW: Duration = Duration::from_secs(10);
/// Argument sizes: every call is audited whole, so an agent must not be
/// able to write megabytes into the append-only chain.
const MAX_PATH: usize = 4096;
const MAX_REASON: usize = 1000;
const MAX_APPROVAL_REASON: usize = 200;
const MAX_SCOPE: usize = 64;
const MAX_NAME: usize = 128;
/// Most audit entries one `audit_tail` returns.
const MAX_TAIL: u32 = 200;

/// Per-uid call counts in the current window.
#[derive(Default)]
pub(super) struct RateLimit {
    windows: HashMap<u32, (Instant, u32)>,
    all: Option<(Instant, u32)>,
}

impl RateLimit {
    /// Whether `uid` may make one more call now; `Some(n)` is the first
    /// refusal in a window (audited once), `None` the others.
    fn admit(&mut self, uid: u32, now: Instant) -> Result<(), bool> {
        if self.windows.len() > 4096 {
            self.windows
                .retain(|_, (t, _)| now.duration_since(*t) < RATE_WINDOW);
        }
        let all = self.all.get_or_insert((now, 0));
        if now.duration_since(all.0) >= RATE_WINDOW {
            *all = (now, 0);
        }
        all.1 += 1;
        let w = self.windows.entry(uid).or_insert((now, 0));
        if now.duration_since(w.0) >= RATE_WINDOW {
            *w = (now, 0);
        }
        w.1 += 1;
        if w.1 <= RATE && all.1 <= RATE_ALL {
            Ok(())
        } else {
            Err(w.1 == RATE + 1 || all.1 == RATE_ALL + 1)
        }
    }
}

impl Daemon {
    /// The service a caller belongs to: its own, or the first ancestor's
    /// that is a configured or supervised service (an agent's MCP client is
    /// a helper of the agent; a shell between them is a fingerprint).
    ///
    /// The walk never trusts a parent that started after its child (the
    /// parent died and its pid was reused), and for a non-root caller
    /// (`same_uid`) it stops where the uid changes: an SSH user's shell is
    /// not part of `ssh.service`, a user's cron job not part of `cron`.
    pub(super) fn caller_service(&self, pid: i32, same_uid: Option<u32>) -> Option<String> {
        let mut pid = u32::try_from(pid).ok()?;
        let mut child_start = u64::MAX;
        for _ in 0..32 {
            let p = self.table.get(pid)?;
            if p.start_ns > child_start || same_uid.is_some_and(|u| u != p.uid) {
                return None;
            }
            if p.configured || p.pm2.is_some() || p.unit.is_some() {
                return Some(p.service.clone());
            }
            if p.ppid <= 1 {
                return None;
            }
            child_start = p.start_ns;
            pid = p.ppid;
        }
        None
    }

    /// Processes of `service` that are jobs: helpers (not instances),
    /// outside the caller's own ancestry (its MCP client and the agent
    /// itself aren't jobs).
    fn jobs_of(&self, service: &str, caller: i32) -> Vec<u32> {
        let mut mine = std::collections::HashSet::new();
        let mut pid = u32::try_from(caller).unwrap_or(0);
        let mut child_start = u64::MAX;
        for _ in 0..32 {
            let Some(p) = self.table.get(pid) else { break };
            if p.start_ns > child_start {
                break;
            }
            mine.insert(pid);
            child_start = p.start_ns;
            pid = p.ppid;
        }
        self.table
            .iter()
            .filter(|p| p.service == service && !p.instance && !mine.contains(&p.pid))
            .map(|p| p.pid)
            .collect()
    }

    pub(super) async fn on_mcp(
        &mut self,
        call: McpCall,
        peer: Peer,
        via: Via,
        protector: &mut Protector,
        reply: SyncSender<Response>,
    ) {
        let tool = call.tool();
        match self.mcp_rate.admit(peer.uid, Instant::now()) {
            Ok(()) => {}
            Err(first) => {
                self.counters.mcp_rate_limited += 1;
                if first {
                    self.record(
                        "mcp.rate_limited",
                        None,
                        json!({"caller": self.caller(peer.pid, peer.uid), "limit": RATE,
                               "window_s": RATE_WINDOW.as_secs()}),
                        None,
                    );
                }
                let _ = reply.send(Response::err(format!(
                    "too many calls: at most {RATE} every {} s per user; slow down",
                    RATE_WINDOW.as_secs()
                )));
                return;
            }
        }
        self.counters.mcp_calls += 1;
        let restricted = via == Via::Mcp;
        if let Err(why) = check_sizes(&call) {
            let _ = reply.send(Response::err(why));
            return;
        }
        // The table's view of the caller must be the kernel's: a non-root
        // caller whose pid the table holds for another uid (reused, not
        // seen yet) is nobody.
        let known = u32::try_from(peer.pid)
            .ok()
            .and_then(|p| self.table.get(p))
            .is_some_and(|p| p.uid == peer.uid);
        let own = if restricted && peer.uid != 0 {
            known
                .then(|| self.caller_service(peer.pid, Some(peer.uid)))
                .flatten()
        } else {
            self.caller_service(peer.pid, None)
        };
        let mut caller = self.caller(peer.pid, peer.uid);
        caller["own_service"] = json!(own);
        let via_name = match via {
            Via::Control => "control",
            Via::Mcp => "mcp-socket",
        };
        // Queued before anything the call does (the pipeline keeps order:
        // it is durable before any act that follows); read-only answers go
        // out once it is durable, and never without it. The loop doesn't
        // wait for the pipeline.
        let entry = Effect::audit(
            "mcp.call",
            own.as_deref(),
            json!({"tool": tool, "call": call, "caller": caller, "via": via_name}),
        );
        fn answer_after_entry(
            fx: &crate::effects::Effects,
            entry: Effect,
            r: Result<Value, String>,
            reply: SyncSender<Response>,
        ) {
            fx.submit(entry.then(move |_| {
                let _ = reply.send(match r {
                    Ok(v) => Response::ok(v),
                    Err(e) => Response::err(e),
                });
            }));
        }
        let r: Result<Value, String> = match call {
            McpCall::Status { service } => {
                let r = self.mcp_status(service, own.as_deref(), restricted);
                return answer_after_entry(&self.effects, entry, r, reply);
            }
            McpCall::ProtectCheck { path } => {
                let r = absolute(&path).map(|p| protector.check(p, restricted));
                return answer_after_entry(&self.effects, entry, r, reply);
            }
            McpCall::MemoryHeadroom {} => {
                let r = Ok(self.mcp_headroom(own.as_deref()));
                return answer_after_entry(&self.effects, entry, r, reply);
            }
            McpCall::MayStartJob { expected_bytes } => {
                let r = Ok(self.mcp_may_start(expected_bytes, own.as_deref(), peer.pid));
                return answer_after_entry(&self.effects, entry, r, reply);
            }
            McpCall::AuditTail { n } => {
                // A non-root agent reads its own service's entries only,
                // and fewer of them (each is found among 20× as many).
                let cap = if restricted { MAX_TAIL / 4 } else { MAX_TAIL };
                let n = n.unwrap_or(20).min(cap) as usize;
                let log = self.audit.log_path().to_path_buf();
                let only = if restricted { Some(own.clone()) } else { None };
                // Read off the loop, after the entry: the act thread hands
                // the file read to a thread of its own.
                self.effects.submit(entry.then(move |_| {
                    let _ = std::thread::Builder::new()
                        .name("mcp-audit-tail".into())
                        .spawn(move || {
                            let _ = reply.send(match audit_tail(&log, n, only) {
                                Ok(v) => Response::ok(v),
                                Err(e) => Response::err(e),
                            });
                        });
                }));
                return;
            }
            McpCall::RequestApproval {
                path,
                reason,
                duration,
            } => {
                self.effects.submit(entry);
                let r = async {
                    let p = absolute(&path)?;
                    if reason.contains(['\n', '\r']) || reason.len() > MAX_APPROVAL_REASON {
                        return Err(format!(
                            "the reason must be one line of at most {MAX_APPROVAL_REASON} bytes: the approver reads it"
                        ));
                    }
                    let dur = governor_alerts::parse_duration(&duration)
                        .map_err(|e| format!("duration \"{duration}\": {e} (like 10m)"))?;
                    let agent = format!(
                        "{} pid {} uid {}",
                        own.as_deref().unwrap_or("an unsupervised process"),
                        peer.pid,
                        peer.uid
                    );
                    protector
                        .request_for_agent(p, dur, &reason, peer.uid, &agent)
                        .await
                        .map_err(|e| format!("{e:#}"))
                };
                r.await
            }
            McpCall::KillSwitchEngage { scope, reason } => {
                self.effects.submit(entry);
                if reason.trim().is_empty() {
                    let _ = reply.send(Response::err(
                        "the reason must say why the switch is pulled",
                    ));
                    return;
                }
                if restricted && peer.uid != 0 {
                    // Least privilege: an unprivileged agent may stop
                    // itself, nothing else.
                    let Some(own) = own.clone().filter(|s| self.service_index.contains_key(s))
                    else {
                        let _ = reply.send(Response::err(
                            "the kill switch over the MCP socket stops the caller's own configured service only, and this caller is part of none",
                        ));
                        return;
                    };
                    if !(scope.is_empty() || scope == [own.clone()]) {
                        let _ = reply.send(Response::err(format!(
                            "over the MCP socket an agent may engage the kill switch for its own service only (scope [\"{own}\"])"
                        )));
                        return;
                    }
                    let who = format!("an agent of {own} via MCP");
                    self.on_killswitch(
                        KillAction::Engage,
                        vec![own],
                        reason,
                        peer,
                        None,
                        Some(who),
                        reply,
                    )
                    .await;
                } else {
                    self.on_killswitch(KillAction::Engage, scope, reason, peer, None, None, reply)
                        .await;
                }
                return;
            }
        };
        let _ = reply.send(match r {
            Ok(v) => Response::ok(v),
            Err(e) => Response::err(e),
        });
    }

    fn mcp_status(
        &self,
        service: Option<String>,
        own: Option<&str>,
        restricted: bool,
    ) -> Result<Value, String> {
        let want = match (service, own, restricted) {
            (Some(s), Some(o), true) if s != o => {
                return Err(format!(
                    "over the MCP socket an agent sees its own service only ({o}), not {s}"
                ))
            }
            (_, None, true) => {
                return Err("this caller is part of no service governor knows (a pm2 app, a unit, a configured exe)".into())
            }
            (Some(s), _, _) => Some(s),
            (None, Some(o), _) => Some(o.to_string()),
            (None, None, _) => None,
        };
        let snap = self.snapshot(true);
        let rows: Vec<Value> = snap
            .services
            .iter()
            .filter(|r| want.as_deref().is_none_or(|w| r.status.name == w))
            .filter(|r| {
                want.is_some()
                    || r.status.configured
                    || r.status.state != governor_core::velocity::State::Stable
            })
            .map(|r| self.service_json(r))
            .collect();
        if let Some(w) = &want {
            if rows.is_empty() {
                return Err(format!(
                    "no service named {w} (see `status` without a service)"
                ));
            }
        }
        Ok(json!({
            "caller_service": own,
            "services": rows,
            "memory": self.memory_json(),
            "kill_switch_engaged": self.killswitch.engaged.is_some(),
        }))
    }

    fn own_row(&self, own: Option<&str>) -> Option<governor_core::status::Row> {
        let own = own?;
        self.snapshot(true)
            .services
            .into_iter()
            .find(|r| r.status.name == own)
    }

    fn mcp_headroom(&self, own: Option<&str>) -> Value {
        let available = crate::memsample::mem_available();
        let floor = self.config.system.memory_floor.0;
        let row = self.own_row(own);
        let service = row.map(|r| {
            json!({
                "service": r.status.name,
                "rss_bytes": r.rss_bytes,
                "ceiling_bytes": r.ceiling_bytes,
                "headroom_bytes": match (r.rss_bytes, r.ceiling_bytes) {
                    (Some(rss), Some(c)) => Some(c as i64 - rss as i64),
                    _ => None,
                },
                "memory_state": r.memory_state,
            })
        });
        json!({
            "available_bytes": available,
            "floor_bytes": floor,
            "above_floor_bytes": available.map(|a| a as i64 - floor as i64),
            "psi_some_avg10": crate::psi::some_avg10(),
            "flush_active": self.flush.active(),
            "caller": service,
        })
    }

    fn mcp_may_start(&self, expected: u64, own: Option<&str>, caller: i32) -> Value {
        let floor = self.config.system.memory_floor.0;
        let margin = self.config.dispatch.margin.0;
        let max = self.config.dispatch.max_concurrent;
        let available = crate::memsample::mem_available();
        // i128: no `expected_bytes` an agent sends can wrap this.
        let after = available.map(|a| a as i128 - expected as i128);
        let need = floor as i128 + margin as i128;
        let jobs = own.map(|s| self.jobs_of(s, caller));
        let row = self.own_row(own);
        let running = jobs.as_ref().map(|j| j.len() as u32).unwrap_or(0);
        let mut reasons = Vec::new();
        match after {
            None => reasons.push("MemAvailable could not be read".to_string()),
            Some(a) if a < need => reasons.push(format!(
                "MemAvailable would be {} MiB after {} MiB, below the floor {} MiB + margin {} MiB",
                a >> 20,
                expected >> 20,
                floor >> 20,
                margin >> 20
            )),
            Some(_) => {}
        }
        // The job counts toward the service's own ceiling too (its helpers'
        // memory is the service's): one that would push it over gets the
        // service restarted.
        if let Some((rss, ceiling)) = row
            .as_ref()
            .and_then(|r| Some((r.rss_bytes?, r.ceiling_bytes?)))
        {
            if rss as u128 + expected as u128 > ceiling as u128 {
                reasons.push(format!(
                    "{} uses {} MiB of its {} MiB ceiling: {} MiB more would cross it",
                    own.unwrap_or("?"),
                    rss >> 20,
                    ceiling >> 20,
                    expected >> 20
                ));
            }
        }
        if running >= max {
            reasons.push(format!(
                "{running} jobs of {} already run (dispatch.max_concurrent = {max})",
                own.unwrap_or("?")
            ));
        }
        if self.flush.active() {
            reasons.push("a memory flush is in progress".into());
        }
        json!({
            "allowed": reasons.is_empty(),
            "reasons": reasons,
            "expected_bytes": expected,
            "available_bytes": available,
            "available_after_bytes": after.map(|a| a.clamp(i64::MIN as i128, i64::MAX as i128) as i64),
            "floor_bytes": floor,
            "margin_bytes": margin,
            "service": own,
            "jobs_running": running,
            "job_pids": jobs,
            "max_concurrent": max,
        })
    }
}

/// Refuses arguments too large to audit whole.
fn check_sizes(call: &McpCall) -> Result<(), String> {
    let long = |what: &str, v: &str, max: usize| {
        if v.len() > max {
            Err(format!("{what} is {} bytes; at most {max}", v.len()))
        } else {
            Ok(())
        }
    };
    match call {
        McpCall::Status { service } => long("service", service.as_deref().unwrap_or(""), MAX_NAME),
        McpCall::ProtectCheck { path } => long("path", path, MAX_PATH),
        McpCall::RequestApproval {
            path,
            reason,
            duration,
        } => {
            long("path", path, MAX_PATH)?;
            long("reason", reason, MAX_REASON)?;
            long("duration", duration, 32)
        }
        McpCall::KillSwitchEngage { scope, reason } => {
            if scope.len() > MAX_SCOPE {
                return Err(format!(
                    "scope names {} services; at most {MAX_SCOPE}",
                    scope.len()
                ));
            }
            for s in scope {
                long("a scope entry", s, MAX_NAME)?;
            }
            long("reason", reason, MAX_REASON)
        }
        McpCall::MemoryHeadroom {} | McpCall::MayStartJob { .. } | McpCall::AuditTail { .. } => {
            Ok(())
        }
    }
}

fn absolute(path: &str) -> Result<&Path, String> {
    let p = Path::new(path);
    if path.is_empty() || !p.is_absolute() || path.contains('\0') {
        return Err(format!("path \"{path}\" must be absolute"));
    }
    // `..` would let a caller probe directories it can't read (the daemon
    // resolves as root).
    if p.components().any(|c| c == std::path::Component::ParentDir) {
        return Err(format!("path \"{path}\" must not contain `..`"));
    }
    Ok(p)
}

/// The last `n` entries, or (`only`: a non-root agent's view) the last
/// `n` of its own service.
fn audit_tail(log: &Path, n: usize, only: Option<Option<String>>) -> Result<Value, String> {
    let scan = if only.is_some() { n * 20 } else { n };
    let entries = governor_audit::tail(log, scan).map_err(|e| format!("{e:#}"))?;
    let mut out: Vec<Value> = entries
        .iter()
        .filter(|e| match &only {
            None => true,
            Some(own) => own.is_some() && e.service == *own,
        })
        .filter_map(|e| serde_json::to_value(e).ok())
        .collect();
    let skip = out.len().saturating_sub(n);
    out.drain(..skip);
    Ok(json!({"entries": out}))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_refuses_past_the_rate_and_audits_once_per_window() {
        let mut r = RateLimit::default();
        let t = Instant::now();
        for _ in 0..RATE {
            assert_eq!(r.admit(7, t), Ok(()));
        }
        assert_eq!(r.admit(7, t), Err(true));
        assert_eq!(r.admit(7, t), Err(false));
        // Another uid has its own budget; the window ends.
        assert_eq!(r.admit(8, t), Ok(()));
        assert_eq!(r.admit(7, t + RATE_WINDOW), Ok(()));
    }

    #[test]
    fn paths_must_be_absolute() {
        assert!(absolute("/etc/x").is_ok());
        assert!(absolute("etc/x").is_err());
        assert!(absolute("").is_err());
    }
}
