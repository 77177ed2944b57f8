//! The kill switch's edge (issue 12): engaging stops the scope through
//! each service's verified supervisor and makes sure every process of it
//! ends (SIGTERM, then SIGKILL, through pidfds); while engaged, a new
//! process of a held service is killed as soon as its exec reaches the
//! daemon and its supervisor is told to stop it again; release restarts
//! what the switch stopped. The decisions are `governor_core::killswitch`'s;
//! the state is `<state_dir>/killswitch.json`, re-applied at start before
//! the control socket answers.

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;

use governor_alerts::Severity;
use governor_audit::Head;
use governor_core::killswitch::{self as ks, Action, Candidate, KillSwitch, Scope, Who};
use serde_json::{json, Value};

use super::{alert_of, human_caller, Daemon, Side};
use crate::control::{KillAction, Peer, Response};
use crate::effects::Effect;
use crate::supervisor::supervisor_of;
use crate::velocity::Supervisor;

/// A reply that waits for every stop (or restart) to report.
pub(super) struct Pending {
    since: std::time::Instant,
    reply: std::sync::mpsc::SyncSender<Response>,
    waiting: BTreeSet<String>,
    results: Vec<Value>,
    head: Value,
}

/// Services with a stop after a held start in flight, and the restarts
/// a release deferred until that stop reports.
#[derive(Default)]
pub(super) struct Busy {
    stopping: std::collections::BTreeMap<String, std::time::Instant>,
    deferred: std::collections::BTreeMap<String, Supervisor>,
    /// Held starts killed and not yet seen exit: pid → (service, the
    /// kernel's exec timestamp).
    killing: std::collections::HashMap<u32, (String, u64)>,
    /// The last held starts: service, pid, exec → exit in µs by the
    /// kernel's clock (what `kill-switch status` and the benchmark show).
    held: std::collections::VecDeque<(String, u32, u64)>,
    /// Held starts killed since the daemon started (`/metrics`).
    blocked: u64,
}

impl Busy {
    pub(super) fn blocked_total(&self) -> u64 {
        self.blocked
    }

    /// A process exited: if it was a held start, how long it lived.
    pub(super) fn exited(&mut self, pid: u32, ts_ns: u64) {
        if let Some((service, exec_ns)) = self.killing.remove(&pid) {
            if self.held.len() == 64 {
                self.held.pop_front();
            }
            self.held
                .push_back((service, pid, ts_ns.saturating_sub(exec_ns) / 1000));
        }
    }
}

/// The persisted switch: absent is released; unreadable stops the start
/// (an engaged switch must never be lost silently).
pub(super) fn load(state_dir: &std::path::Path) -> anyhow::Result<KillSwitch> {
    let p = state_dir.join("killswitch.json");
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            anyhow::anyhow!(
                "{} is unreadable ({e}); it may record an engaged kill switch, so governor won't \
                 start without it: fix or remove it by hand",
                p.display()
            )
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KillSwitch::default()),
        Err(e) => Err(anyhow::anyhow!("reading {}: {e}", p.display())),
    }
}

/// What the supervisor says of a service: pm2's status, systemd's
/// ActiveState.
fn supervisor_says(ops: &dyn crate::supervisor::SupervisorOps, sv: &Supervisor) -> String {
    match ops.view(sv) {
        Ok(v) => v["status"]
            .as_str()
            .or(v["ActiveState"].as_str())
            .unwrap_or("unknown")
            .to_string(),
        Err(e) => format!("unknown ({e:#})"),
    }
}

/// Stops through the supervisor while `end` makes sure every process
/// ends (the grace counts from now, not from when a slow supervisor
/// returns), then checks that the supervisor says so: a pm2 stop that
/// timed out on a process the host's init had not reaped yet leaves the
/// app `errored` (down, but not what an operator expects to see); asked
/// again with nothing left running, pm2 marks it `stopped`.
/// How a stop went: the supervisor's answer, how each process ended,
/// what the supervisor says afterwards.
type StopReport = (
    std::result::Result<String, String>,
    crate::memsample::Ended,
    String,
);

fn stop_and_confirm(
    ops: &dyn crate::supervisor::SupervisorOps,
    sv: &Supervisor,
    end: impl FnOnce() -> crate::memsample::Ended + Send,
) -> StopReport {
    let (result, ended) = std::thread::scope(|s| {
        let ending = s.spawn(end);
        let result = ops.stop(sv).map_err(|e| format!("{e:#}"));
        (result, ending.join().unwrap_or_default())
    });
    let mut says = supervisor_says(ops, sv);
    if !matches!(says.as_str(), "stopped" | "inactive" | "failed") {
        let again = ops.stop(sv).map_err(|e| format!("{e:#}"));
        says = supervisor_says(ops, sv);
        if let Err(e) = again {
            says = format!("{says} (stopping again: {e})");
        }
    }
    (result, ended, says)
}

/// Engage's act: every tree's grace runs (SIGTERM, SIGKILL after it)
/// while the supervisors stop them all (one pm2 command per God), then
/// each supervisor's view is checked, and stopped again where it doesn't
/// say stopped. One `KsStopped` per service.
/// A service to stop: its name, supervisor and a pidfd per process.
type ToStop = (String, Supervisor, Vec<(u32, OwnedFd)>);

fn stop_batch(
    ops: &dyn crate::supervisor::SupervisorOps,
    batch: Vec<ToStop>,
    grace: std::time::Duration,
    tx: &tokio::sync::mpsc::UnboundedSender<Side>,
) {
    let mut names = Vec::new();
    let mut svs = Vec::new();
    let mut fdss = Vec::new();
    for (n, s, f) in batch {
        names.push(n);
        svs.push(s);
        fdss.push(f);
    }
    let (results, ended) = std::thread::scope(|sc| {
        let enders: Vec<_> = fdss
            .into_iter()
            .map(|fds| sc.spawn(move || crate::memsample::end_processes(fds, grace)))
            .collect();
        let refs: Vec<&Supervisor> = svs.iter().collect();
        let results = ops.stop_many(&refs);
        let ended: Vec<crate::memsample::Ended> = enders
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect();
        (results, ended)
    });
    let refs: Vec<&Supervisor> = svs.iter().collect();
    let views = ops.views(&refs);
    for (((name, sv), (result, ended)), view) in names
        .into_iter()
        .zip(svs.iter())
        .zip(results.into_iter().zip(ended))
        .zip(views)
    {
        let mut says = match view {
            Ok(v) => v["status"]
                .as_str()
                .or(v["ActiveState"].as_str())
                .unwrap_or("unknown")
                .to_string(),
            Err(e) => format!("unknown ({e:#})"),
        };
        if !matches!(says.as_str(), "stopped" | "inactive" | "failed") {
            let again = ops.stop(sv);
            says = supervisor_says(ops, sv);
            if let Err(e) = again {
                says = format!("{says} (stopping again: {e:#})");
            }
        }
        let _ = tx.send(Side::KsStopped {
            service: name,
            supervisor: sv.clone(),
            result: result.map_err(|e| format!("{e:#}")),
            ended,
            says,
            blocked: false,
        });
    }
}

fn pidfd(pid: u32) -> Option<OwnedFd> {
    let p = rustix::process::Pid::from_raw(pid as i32)?;
    rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()).ok()
}

impl Daemon {
    fn critical(&self, service: &str) -> bool {
        self.mem_limits_of(service).critical
    }

    fn save_killswitch(&self) {
        match serde_json::to_vec(&self.killswitch) {
            Ok(b) => self.killswitch_file.save(b),
            Err(e) => log::error!("serialising the kill switch: {e}"),
        }
    }

    /// Why a process is never held, from the table.
    fn never_held(&self, pid: u32) -> Option<&'static str> {
        let p = self.table.get(pid)?;
        ks::never_held(pid, &p.exe, std::process::id(), p.god.is_some())
    }

    /// Whether the switch holds this (new) process.
    fn held(&self, pid: u32) -> Option<String> {
        let p = self.table.get(pid)?;
        if !self.killswitch.holds(&p.service, self.critical(&p.service)) {
            return None;
        }
        if self.never_held(pid).is_some() {
            return None;
        }
        // Only supervised services are held: a login session's processes
        // never are.
        if matches!(supervisor_of(p, &self.table), Supervisor::None)
            && !self.service_index.contains_key(&p.service)
        {
            return None;
        }
        Some(p.service.clone())
    }

    /// A new process (an exec) of a held service: killed at once through
    /// a pidfd (after its entry is durable), and its supervisor told to
    /// stop it again so it stays down.
    /// `exec_ns`: the kernel's timestamp of the exec (none for processes
    /// found running at start).
    pub(super) fn hold_exec(&mut self, pid: u32, exec_ns: Option<u64>) {
        let Some(service) = self.held(pid) else {
            return;
        };
        let Some(fd) = pidfd(pid) else {
            return;
        };
        let Some(p) = self.table.get(pid) else {
            return;
        };
        let supervisor = supervisor_of(p, &self.table);
        let parent = self.table.get(p.ppid);
        let detail = json!({
            "pid": pid, "exe": p.exe, "uid": p.uid, "start_ns": p.start_ns,
            "started_by": {"pid": p.ppid, "exe": parent.map(|q| q.exe.clone()),
                           "service": parent.map(|q| q.service.clone())},
            "supervisor": supervisor,
            "scope": self.killswitch.engaged.as_ref().map(|e| e.scope.describe()),
        });
        // Only an instance needs its supervisor told (it would respawn
        // it); a helper is just killed.
        let instance = p.instance && !matches!(supervisor, Supervisor::None);
        // One stop at a time per service: pm2 may respawn it several
        // times before the first stop lands; each respawn is killed, and
        // the stop's confirmation catches the last.
        if p.instance {
            // A held start's death is the switch's, not a crash: also for
            // a service restarted by something that is no supervisor (a
            // shell loop), which would otherwise read as a crash loop.
            let info = crate::velocity::InstanceInfo {
                service: service.clone(),
                configured: self.service_index.contains_key(&service),
                supervisor: supervisor.clone(),
                limits: self.limits_of(&service),
            };
            self.velocity.expect_planned(&info, 1);
        }
        let stop = instance
            && self
                .ks_busy
                .stopping
                .insert(service.clone(), std::time::Instant::now())
                .is_none();
        self.ks_busy.blocked += 1;
        if let Some(ns) = exec_ns {
            if self.ks_busy.killing.len() < 4096 {
                self.ks_busy.killing.insert(pid, (service.clone(), ns));
            }
        }
        self.killswitch.stopped_again(&service, &supervisor);
        self.save_killswitch();
        let ops = self.supervisors.clone();
        let tx = self.side_tx.clone();
        let name = service.clone();
        self.effects.submit(
            Effect::audit("killswitch.blocked_start", Some(&service), detail).then(move |_| {
                let _ = rustix::process::pidfd_send_signal(&fd, rustix::process::Signal::KILL);
                crate::memsample::release_memory(&fd);
                if !stop {
                    return;
                }
                let _ = std::thread::Builder::new()
                    .name("ks-stop".into())
                    .spawn(move || {
                        let (result, ended, says) =
                            stop_and_confirm(ops.as_ref(), &supervisor, Vec::new);
                        let _ = tx.send(Side::KsStopped {
                            service: name,
                            supervisor,
                            result,
                            ended,
                            says,
                            blocked: true,
                        });
                    });
            }),
        );
    }

    /// At start, before the socket answers: an engaged switch holds again
    /// (whatever of its scope runs now is ended).
    pub(super) fn reapply_killswitch(&mut self) {
        let Some(e) = &self.killswitch.engaged else {
            return;
        };
        log::warn!(
            "kill switch engaged (scope {}, since {}, by {}): held again",
            e.scope.describe(),
            e.since_ms,
            e.by
        );
        let pids: Vec<u32> = self.table.iter().map(|p| p.pid).collect();
        for pid in pids {
            self.hold_exec(pid, None);
        }
    }

    fn who(&self, peer: &Peer, stdin: Option<&OwnedFd>) -> Who {
        if peer.uid != 0 {
            return Who::Other(format!("uid {}", peer.uid));
        }
        match human_caller(&self.table, peer.pid, stdin) {
            Ok(_) => Who::Human,
            Err(why) => Who::Supervised(why),
        }
    }

    /// `agent`: an MCP caller the daemon has already placed (its own
    /// service, over the MCP socket), engaging for itself.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn on_killswitch(
        &mut self,
        action: KillAction,
        scope: Vec<String>,
        reason: String,
        peer: Peer,
        stdin: Option<OwnedFd>,
        agent: Option<String>,
        reply: std::sync::mpsc::SyncSender<Response>,
    ) {
        let caller = self.caller(peer.pid, peer.uid);
        if let KillAction::Status = action {
            let held: Vec<String> = self
                .service_index
                .keys()
                .filter(|s| self.killswitch.holds(s, self.critical(s)))
                .cloned()
                .collect();
            let kills: Vec<Value> = self
                .ks_busy
                .held
                .iter()
                .map(|(s, pid, us)| json!({"service": s, "pid": pid, "exec_to_exit_us": us}))
                .collect();
            let _ = reply.send(Response::ok(json!({
                "engaged": self.killswitch.engaged, "held_configured_services": held,
                "held_starts": kills,
            })));
            return;
        }
        if self.ks_pending.is_some() {
            let _ = reply.send(Response::err(
                "the kill switch is still carrying out the last request; try again in a moment",
            ));
            return;
        }
        let who = match agent {
            Some(a) => Who::Supervised(a),
            None => self.who(&peer, stdin.as_ref()),
        };
        let act = if matches!(action, KillAction::Engage) {
            Action::Engage
        } else {
            Action::Release
        };
        if let Err(why) = ks::may(&who, act) {
            self.record(
                "killswitch.refused",
                None,
                json!({"action": format!("{act:?}").to_lowercase(), "why": why, "caller": caller}),
                None,
            );
            let _ = reply.send(Response::err(why));
            return;
        }
        let by = format!(
            "{} (pid {}, uid {})",
            match &who {
                Who::Human => "a person at a login terminal".to_string(),
                Who::Supervised(w) | Who::Other(w) => w.clone(),
            },
            peer.pid,
            peer.uid
        );
        match act {
            Action::Engage => self.engage(scope, reason, by, caller, reply).await,
            Action::Release if !scope.is_empty() => {
                self.release_some(scope, reason, by, caller, reply).await
            }
            Action::Release => self.release(reason, by, caller, reply).await,
        }
    }

    async fn engage(
        &mut self,
        words: Vec<String>,
        reason: String,
        by: String,
        caller: Value,
        reply: std::sync::mpsc::SyncSender<Response>,
    ) {
        let scope = match Scope::parse(&words) {
            Ok(s) => s,
            Err(e) => {
                let _ = reply.send(Response::err(e));
                return;
            }
        };
        if let Scope::Services(names) = &scope {
            if let Some(bad) = names.iter().find(|n| {
                !self.service_index.contains_key(*n) && self.table.iter().all(|p| &p.service != *n)
            }) {
                let _ = reply.send(Response::err(format!(
                    "no service {bad:?}: neither configured nor running (see governor status)"
                )));
                return;
            }
        }
        // The running supervised services, each with its supervisor and
        // every process of it (children and orphans included).
        let mut running: Vec<Candidate> = Vec::new();
        let mut passed: Vec<Value> = Vec::new();
        let mut names: Vec<String> = self
            .table
            .iter()
            .filter(|p| p.instance)
            .map(|p| p.service.clone())
            .collect();
        names.sort();
        names.dedup();
        for name in names {
            let all: Vec<&crate::proctable::Process> =
                self.table.iter().filter(|p| p.service == name).collect();
            // A service whose instance is never held (sshd's unit) is
            // passed over; a never-held helper only is left alone.
            if let Some(why) = all
                .iter()
                .filter(|p| p.instance)
                .find_map(|p| self.never_held(p.pid))
            {
                passed.push(json!({"service": name, "why": why}));
                continue;
            }
            let procs: Vec<&crate::proctable::Process> = all
                .into_iter()
                .filter(|p| self.never_held(p.pid).is_none())
                .collect();
            let Some(first) = procs.iter().find(|p| p.instance) else {
                continue;
            };
            let supervisor = supervisor_of(first, &self.table);
            if matches!(supervisor, Supervisor::None) {
                continue;
            }
            running.push(Candidate {
                critical: self.critical(&name),
                service: name,
                supervisor,
                pids: procs.iter().map(|p| p.pid).collect(),
            });
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        let before = self.killswitch.clone();
        let to_stop = match self
            .killswitch
            .engage(scope.clone(), &reason, &by, now_ms, &running)
        {
            Ok(s) => s,
            Err(e) => {
                let _ = reply.send(Response::err(e));
                return;
            }
        };
        // Held before anything runs: the state is durable first.
        self.save_killswitch();
        self.killswitch_file.synced().await;
        let services: Vec<&str> = to_stop.iter().map(|c| c.service.as_str()).collect();
        let alert = alert_of(
            Severity::Critical,
            "kill switch",
            None,
            format!("KILL SWITCH ENGAGED ({}): {reason}", scope.describe()),
            format!("by {by}; stopping {}", services.join(", ")),
        );
        // The engage entry names every service it stops: the stops run on
        // its strength — once it is durable, or held in memory on a full
        // disk (then the per-service entries below may be held or, past
        // the buffer, dropped and counted, without holding up any stop).
        // The alert goes out once the entry is recorded (not with it: an
        // engage that fails to record is rolled back below and must not
        // page anyone as engaged).
        let engaged = self
            .effects
            .commit(Effect::audit(
                "killswitch.engage",
                None,
                json!({"scope": scope, "reason": reason, "caller": caller, "by": by,
                       "stopping": services, "passed_over": passed}),
            ))
            .await
            .head;
        if engaged.is_ok() {
            self.effects.submit(Effect::alert_only(alert));
        }
        let proof = match &engaged {
            Ok(Some(h)) => h.clone(),
            // Held: the chain's head, as the pipeline hands a held entry's act.
            Ok(None) => self.audit.head().unwrap_or_else(Head::genesis),
            Err(e) => {
                // Not recorded, so not done: the switch goes back to what
                // it was (a release must never restart what this engage
                // would have stopped but didn't).
                self.killswitch = before;
                self.save_killswitch();
                self.killswitch_file.synced().await;
                log::error!(
                    "kill switch not engaged ({}): its audit entry could not be recorded ({e})",
                    scope.describe()
                );
                self.effects.submit(Effect::alert_only(alert_of(
                    Severity::Critical,
                    "kill switch",
                    None,
                    format!("kill switch NOT engaged ({}): {reason}", scope.describe()),
                    format!(
                        "by {by}; its audit entry could not be recorded ({e}), so nothing was \
                         stopped. Fix the audit log and engage again."
                    ),
                )));
                let _ = reply.send(Response::err(format!(
                    "the kill switch was not engaged and nothing was stopped: its audit entry \
                     could not be recorded ({e}). Fix the audit log (`governor doctor` says what \
                     is wrong) and engage again; meanwhile stop services through pm2 directly."
                )));
                return;
            }
        };
        let grace = self.config.defaults.kill_timeout.0;
        self.ks_pending = Some(Pending {
            since: std::time::Instant::now(),
            reply,
            waiting: to_stop.iter().map(|c| c.service.clone()).collect(),
            results: Vec::new(),
            head: json!({"engaged": true, "scope": scope,
                         "audit_head": engaged.ok().flatten().map(|h| h.to_string()),
                         "passed_over": passed}),
        });
        // Each service's entry, then one act for them all once those are
        // written (effects are carried out in order): one `pm2 stop ID…`
        // per God while every tree's grace runs.
        let mut batch: Vec<ToStop> = Vec::new();
        for c in to_stop {
            let fds: Vec<(u32, OwnedFd)> = c
                .pids
                .iter()
                .filter_map(|&p| pidfd(p).map(|f| (p, f)))
                .collect();
            // Planned deaths, not a crash loop.
            let info = crate::velocity::InstanceInfo {
                service: c.service.clone(),
                configured: self.service_index.contains_key(&c.service),
                supervisor: c.supervisor.clone(),
                limits: self.limits_of(&c.service),
            };
            self.velocity.expect_planned(&info, c.pids.len() as u32);
            let entry = Effect::audit(
                "killswitch.stop",
                Some(&c.service),
                json!({"supervisor": c.supervisor, "pids": c.pids, "grace_ms": grace.as_millis() as u64}),
            );
            batch.push((c.service, c.supervisor, fds));
            self.effects.submit(entry);
        }
        if !batch.is_empty() {
            let ops = self.supervisors.clone();
            let tx = self.side_tx.clone();
            self.effects.submit(Effect::after(proof, move |_| {
                let _ = std::thread::Builder::new()
                    .name("ks-stop".into())
                    .spawn(move || stop_batch(ops.as_ref(), batch, grace, &tx));
            }));
        }
        self.finish_pending();
    }

    async fn release(
        &mut self,
        reason: String,
        by: String,
        caller: Value,
        reply: std::sync::mpsc::SyncSender<Response>,
    ) {
        let e = match self.killswitch.release(&reason) {
            Ok(e) => e,
            Err(err) => {
                let _ = reply.send(Response::err(err));
                return;
            }
        };
        self.save_killswitch();
        self.killswitch_file.synced().await;
        let services: Vec<&String> = e.stopped.keys().collect();
        let alert = alert_of(
            Severity::Critical,
            "kill switch",
            None,
            format!("kill switch released ({}): {reason}", e.scope.describe()),
            format!(
                "by {by}; restarting {}",
                services
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        let head = self
            .audit_with_alert(
                "killswitch.release",
                json!({"scope": e.scope, "reason": reason, "caller": caller, "by": by,
                       "engaged_since_ms": e.since_ms, "engaged_by": e.by, "restarting": services}),
                alert,
            )
            .await;
        self.ks_pending = Some(Pending {
            since: std::time::Instant::now(),
            reply,
            waiting: e.stopped.keys().cloned().collect(),
            results: Vec::new(),
            head: json!({"engaged": false, "audit_head": head.map(|h| h.to_string())}),
        });
        for (service, stopped) in e.stopped {
            if self.ks_busy.stopping.contains_key(&service) {
                self.ks_busy.deferred.insert(service, stopped.supervisor);
                continue;
            }
            self.restart_released(service, stopped.supervisor);
        }
        self.finish_pending();
    }

    /// `release --scope SERVICE…`: those services only; the switch stays
    /// engaged for the rest.
    async fn release_some(
        &mut self,
        words: Vec<String>,
        reason: String,
        by: String,
        caller: Value,
        reply: std::sync::mpsc::SyncSender<Response>,
    ) {
        let names: BTreeSet<String> = match Scope::parse(&words) {
            Ok(Scope::Services(n)) => n,
            Ok(_) => {
                let _ = reply.send(Response::err(
                    "release --scope takes service names; to release everything, leave --scope out",
                ));
                return;
            }
            Err(e) => {
                let _ = reply.send(Response::err(e));
                return;
            }
        };
        let scope_before = self.killswitch.engaged.as_ref().map(|e| e.scope.describe());
        let back = match self.killswitch.release_some(&names, &reason) {
            Ok(b) => b,
            Err(e) => {
                let _ = reply.send(Response::err(e));
                return;
            }
        };
        self.save_killswitch();
        self.killswitch_file.synced().await;
        let still = self.killswitch.engaged.is_some();
        let services: Vec<&String> = back.keys().collect();
        let alert = alert_of(
            Severity::Critical,
            "kill switch",
            None,
            format!(
                "kill switch partly released ({}): {reason}",
                names.iter().cloned().collect::<Vec<_>>().join(" ")
            ),
            format!(
                "by {by}; restarting {}; {}",
                services
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                if still {
                    "the rest stays held"
                } else {
                    "nothing is held any more"
                }
            ),
        );
        let head = self
            .audit_with_alert(
                "killswitch.release",
                json!({"partial": true, "services": names, "scope_before": scope_before,
                       "still_engaged": still, "reason": reason, "caller": caller, "by": by,
                       "restarting": services}),
                alert,
            )
            .await;
        self.ks_pending = Some(Pending {
            since: std::time::Instant::now(),
            reply,
            waiting: back.keys().cloned().collect(),
            results: Vec::new(),
            head: json!({"engaged": still, "audit_head": head.map(|h| h.to_string())}),
        });
        for (service, stopped) in back {
            if self.ks_busy.stopping.contains_key(&service) {
                self.ks_busy.deferred.insert(service, stopped.supervisor);
                continue;
            }
            self.restart_released(service, stopped.supervisor);
        }
        self.finish_pending();
    }

    /// Release's restart of one service, reported as `KsRestarted`.
    fn restart_released(&self, service: String, sv: Supervisor) {
        {
            let ops = self.supervisors.clone();
            let tx = self.side_tx.clone();
            let _ = std::thread::Builder::new()
                .name("ks-restart".into())
                .spawn(move || {
                    let result = ops.restart(&sv).map_err(|e| format!("{e:#}"));
                    let says = supervisor_says(ops.as_ref(), &sv);
                    let _ = tx.send(Side::KsRestarted {
                        service,
                        supervisor: sv,
                        result,
                        says,
                    });
                });
        }
    }

    /// On the 1 s tick: a stop or restart that never reported (its audit
    /// entry failed, a thread could not start, a supervisor hung past its
    /// own timeout) must not wedge the switch. The reply goes out with
    /// what is known, naming what didn't report.
    pub(super) fn killswitch_timeouts(&mut self) {
        let limit = self.config.defaults.kill_timeout.0 + std::time::Duration::from_secs(90);
        let stale: Vec<String> = self
            .ks_busy
            .stopping
            .iter()
            .filter(|(_, t)| t.elapsed() > limit)
            .map(|(s, _)| s.clone())
            .collect();
        for s in stale {
            self.ks_busy.stopping.remove(&s);
            log::warn!("kill switch: the stop of {s} after a held start never reported");
            if let Some(sv) = self.ks_busy.deferred.remove(&s) {
                self.restart_released(s, sv);
            }
        }
        if self
            .ks_pending
            .as_ref()
            .is_none_or(|p| p.since.elapsed() <= limit)
        {
            return;
        }
        if let Some(p) = self.ks_pending.take() {
            let missing: Vec<String> = p.waiting.into_iter().collect();
            self.record(
                "killswitch.timeout",
                None,
                json!({"no_report_from": missing, "after_s": limit.as_secs()}),
                None,
            );
            let mut data = p.head;
            data["services"] = Value::Array(p.results);
            data["no_report_from"] = json!(missing);
            let _ = p.reply.send(Response::ok(data));
        }
    }

    /// Replies once nothing is waited for.
    fn finish_pending(&mut self) {
        if self
            .ks_pending
            .as_ref()
            .is_some_and(|p| p.waiting.is_empty())
        {
            if let Some(p) = self.ks_pending.take() {
                let mut data = p.head;
                data["services"] = Value::Array(p.results);
                let _ = p.reply.send(Response::ok(data));
            }
        }
    }

    /// A stop or restart reported back.
    /// `blocked`: after a held start, not what a request waits for.
    pub(super) fn on_ks_result(
        &mut self,
        service: String,
        kind: &str,
        result: Value,
        blocked: bool,
    ) {
        self.record(kind, Some(&service), result.clone(), None);
        if blocked {
            self.ks_busy.stopping.remove(&service);
            if let Some(sv) = self.ks_busy.deferred.remove(&service) {
                self.restart_released(service, sv);
            }
            return;
        }
        if let Some(p) = &mut self.ks_pending {
            if p.waiting.remove(&service) {
                let mut r = result;
                r["service"] = json!(service);
                p.results.push(r);
            }
        }
        self.finish_pending();
    }
}
