//! `governor run`: the daemon. This module is the event loop: it routes the
//! ring, signals, timers and the control channel to the pure policies of
//! `governor-core` ([`crate::velocity`], the process table) and hands what
//! they decide to the one ordered effect pipeline ([`crate::effects`]):
//! audit entry durable, then alert, then act. Blocking work — the pm2 and
//! systemctl CLIs, hashing, state files — runs off this thread.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use anyhow::{Context, Result};
use governor_alerts::{Alert, AlertSink, DeliveryOutcome, Severity, TelegramSender, Tuning};
use governor_audit::{AuditHandle, AuditLog, Head};

use crate::{
    effects::{Effect, Effects},
    statefile::StateFile,
};
use serde_json::{json, Value};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    config::{config_hash, Config, Limits},
    control::{self, Incoming, Request, Response},
    events::{monotonic_ns, Event},
    probes::{ProbeOptions, Probes},
    proctable::{ProcFs, ProcTable, Process},
    protect::{Implicit, Protector},
    supervisor::{describe_view, supervisor_of, RealSupervisors, SupervisorOps},
    velocity::{Death, Decision, InstanceInfo, Live, Persisted, Supervisor, Velocity},
    watch,
};

/// Logs go to stderr, human-readable or one JSON object per line. The HTTP
/// client logs request URLs — which hold the bot token — at debug level, so
/// its targets are capped at warn whatever RUST_LOG says.
pub fn init_logging(json: bool) {
    let env = env_logger::Env::default().default_filter_or("info");
    let mut b = env_logger::Builder::from_env(env);
    for t in governor_alerts::SECRET_LEAKING_LOG_TARGETS {
        b.filter_module(t, log::LevelFilter::Warn);
    }
    if json {
        b.format(|buf, rec| {
            use std::io::Write;
            let line = json!({
                "ts": crate::events::rfc3339(SystemTime::now()),
                "level": rec.level().to_string().to_lowercase(),
                "target": rec.target(),
                "msg": rec.args().to_string(),
            });
            writeln!(buf, "{line}")
        });
    }
    b.init();
}

mod drift;
mod killswitch;
mod mcp;
mod views;

/// Results of work done off the event loop, coming back to it.
enum Side {
    Delivery(DeliveryOutcome),
    SupervisorView {
        service: String,
        view: std::result::Result<Value, String>,
        for_crash_loop: bool,
    },
    Stopped {
        service: String,
        supervisor: Supervisor,
        result: std::result::Result<String, String>,
    },
    /// A memory restart ran; `killed`: old instances that outlived
    /// `kill_timeout` and got SIGKILL.
    MemRestarted {
        service: String,
        supervisor: Supervisor,
        result: std::result::Result<String, String>,
        killed: Vec<u32>,
    },
    /// After a failed memory restart: the old instances that outlived
    /// `kill_timeout` and got SIGKILL (empty: they ended by themselves).
    MemKilled {
        service: String,
        killed: Vec<u32>,
    },
    /// The kill switch stopped a service (or, `blocked`, a held start's
    /// supervisor was told to stop it again); `ended`: how each process
    /// ended.
    KsStopped {
        service: String,
        supervisor: Supervisor,
        result: std::result::Result<String, String>,
        ended: Vec<(u32, String, u64)>,
        /// What the supervisor says of it afterwards.
        says: String,
        blocked: bool,
    },
    /// Release restarted a service.
    KsRestarted {
        service: String,
        supervisor: Supervisor,
        result: std::result::Result<String, String>,
        /// What the supervisor says of it afterwards.
        says: String,
    },
}

/// Without Telegram, alerts live in the daemon's log only — which
/// [`Daemon::alert`] has already written.
struct LogOnly;

impl AlertSink for LogOnly {
    fn send(&self, _alert: Alert) {}
}

/// Detection latency samples (kernel exit → audit entry durable), in µs.
#[derive(Default)]
struct Latency {
    samples: Vec<u64>,
}

impl Latency {
    fn record(&mut self, us: u64) {
        if self.samples.len() >= 10_000 {
            self.samples.remove(0);
        }
        self.samples.push(us);
    }

    fn summary(&self) -> Value {
        if self.samples.is_empty() {
            return json!({ "count": 0 });
        }
        let mut s = self.samples.clone();
        s.sort_unstable();
        let pct = |p: f64| s[((s.len() - 1) as f64 * p).round() as usize];
        json!({ "count": s.len(), "p50_us": pct(0.5), "p99_us": pct(0.99), "max_us": s[s.len() - 1],
                "last_us": self.samples.last() })
    }
}

/// Everything the event loop owns.
pub struct Daemon {
    config_path: PathBuf,
    config: Config,
    config_hash: String,
    /// Configured service name → index in `config.services`.
    service_index: HashMap<String, usize>,
    table: ProcTable,
    velocity: Velocity,
    velocity_dirty: bool,
    audit: AuditHandle,
    effects: Effects,
    telegram: Option<Arc<TelegramSender>>,
    supervisors: Arc<dyn SupervisorOps>,
    /// `[system] supervisor_timeout` as the real supervisors read it
    /// (milliseconds), set again on reload.
    supervisor_timeout_ms: Arc<std::sync::atomic::AtomicU64>,
    /// A status request's supervisor views are being fetched (one at a
    /// time: a wedged pm2 must not collect a CLI per `status --watch` tick).
    status_views_busy: Arc<std::sync::atomic::AtomicBool>,
    side_tx: mpsc::UnboundedSender<Side>,
    layers: Vec<String>,
    views: HashMap<String, Value>,
    latency: Latency,
    decisions: Vec<(Decision, u64)>,
    /// Set by a successful reload: the protector re-reads `[protect]`.
    reload_protect: bool,
    /// pid → service, shared with the protector to name who tried a write.
    services_by_pid: Arc<std::sync::RwLock<HashMap<u32, String>>>,
    /// Memory budgets: the core's policy state, the statm reader, and when
    /// each configured service is read next (monotonic ns).
    memory: governor_core::memory::Memory,
    flush: governor_core::memory::Flush,
    sampler: crate::memsample::Sampler,
    mem_next: HashMap<String, u64>,
    /// The kernel memory tracker's budgets, or why it isn't running.
    mem_arms: std::result::Result<crate::memwatch::MemArms, String>,
    /// Why the PSI trigger isn't armed.
    psi_problem: Option<String>,
    /// The kill switch, its state file, and a reply waiting for its stops.
    killswitch: governor_core::killswitch::KillSwitch,
    killswitch_file: StateFile,
    ks_pending: Option<killswitch::Pending>,
    /// The kill switch's supervisor actions in flight, per service: a
    /// held start's stop runs once at a time, and a release's restart
    /// waits for it (else pm2 could get the stop after the restart).
    ks_busy: killswitch::Busy,
    /// Uptime drift: the instance of each configured service governor
    /// last saw start.
    uptime: drift::Uptime,
    /// What `/metrics` counts, and the MCP callers' rate limit.
    counters: views::Counters,
    lifecycle_lost: u64,
    mcp_rate: mcp::RateLimit,
    /// `[export] events`.
    export: Option<crate::export::Exporter>,
    clock: crate::events::Clock,
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn wall_ns() -> i128 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0)
}

fn velocity_path(state_dir: &Path) -> PathBuf {
    state_dir.join("velocity.json")
}

/// Loads the persisted restart history; a damaged file is reported and
/// moved aside, never silently dropped.
fn load_velocity(state_dir: &Path) -> (Velocity, Option<String>) {
    let path = velocity_path(state_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Velocity::default(), None),
        Err(e) => {
            return (
                Velocity::default(),
                Some(format!("reading {}: {e}", path.display())),
            )
        }
    };
    match serde_json::from_str::<Persisted>(&text) {
        Ok(p) => (p.into_velocity(wall_ns(), monotonic_ns()), None),
        Err(e) => {
            let aside = path.with_extension(format!("json.bad-{}", wall_ns() / 1_000_000_000));
            let _ = std::fs::rename(&path, &aside);
            (
                Velocity::default(),
                Some(format!(
                    "{} is damaged ({e}); moved to {}",
                    path.display(),
                    aside.display()
                )),
            )
        }
    }
}

/// Writes the restart history off the event loop ([`StateFile`]), and
/// nothing when it didn't change.
struct StateWriter {
    file: StateFile,
    /// SHA-256 of the history last handed over (not the bytes: they can
    /// be hundreds of KiB with many services).
    last: [u8; 32],
    /// Length of the last file written.
    last_len: usize,
}

impl StateWriter {
    fn spawn(state_dir: &Path, effects: Effects) -> Result<Self> {
        let file = StateFile::spawn(velocity_path(state_dir), move |p, e| {
            effects.submit(Effect::alert_only(Alert::new(
                Severity::Critical,
                "state",
                format!("cannot save the restart history to {}: {e:#}", p.display()),
            )));
        })?;
        Ok(StateWriter {
            file,
            last: [0; 32],
            last_len: 0,
        })
    }

    /// Queues `v` to be written, unless it is what was written last.
    fn save(&mut self, v: &Velocity) {
        use sha2::Digest;
        // The history itself decides (the persisted header's clock pair
        // changes on every call), streamed into the hash: no copy of it is
        // made to find out that nothing changed.
        let view = crate::velocity::VelocityView::of(v);
        let mut h = sha2::Sha256::new();
        if let Err(e) = serde_json::to_writer(&mut h, &view) {
            log::error!("serialising restart history: {e}");
            return;
        }
        let digest: [u8; 32] = h.finalize().into();
        if digest == self.last {
            return;
        }
        // Sized from the last save: one buffer, not a doubling chain of
        // them that the allocator then keeps.
        let mut data = Vec::with_capacity(self.last_len + self.last_len / 8 + 256);
        if let Err(e) =
            serde_json::to_writer(&mut data, &Persisted::view(v, wall_ns(), monotonic_ns()))
        {
            log::error!("serialising restart history: {e}");
            return;
        }
        self.last_len = data.len();
        self.last = digest;
        self.file.save(data);
    }

    /// Writes `v` (if changed) and stops the thread (daemon stop).
    fn finish(mut self, v: &Velocity) {
        self.save(v);
        self.file.finish();
    }
}

/// Memory baselines kept across daemon restarts; a damaged file is
/// reported and the baselines start afresh.
fn load_memory(state_dir: &Path) -> governor_core::memory::Memory {
    let path = state_dir.join("memory.json");
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            log::warn!(
                "{} is damaged ({e}); memory baselines start afresh",
                path.display()
            );
            Default::default()
        }),
        Err(_) => Default::default(),
    }
}

fn state_dir_secure(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(p)
        .with_context(|| format!("creating state directory {}", p.display()))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("restricting {} to root", p.display()))
}

impl Daemon {
    fn index_services(cfg: &Config) -> HashMap<String, usize> {
        cfg.services
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.get_ref().clone(), i))
            .collect()
    }

    fn limits_of(&self, service: &str) -> Limits {
        let svc = self
            .service_index
            .get(service)
            .map(|&i| &self.config.services[i]);
        self.config.limits_for(svc)
    }

    /// Applies the current config's limits (and configured-ness) to every
    /// service with history: after loading it from disk and after a reload.
    fn refresh_history_limits(&mut self) {
        let infos: Vec<InstanceInfo> = self
            .velocity
            .services
            .iter()
            .map(|(n, t)| InstanceInfo {
                service: n.clone(),
                configured: self.service_index.contains_key(n),
                supervisor: t.supervisor.clone(),
                limits: self.limits_of(n),
            })
            .collect();
        for i in &infos {
            self.velocity.refresh(i);
        }
    }

    fn instance_info(&self, p: &Process) -> InstanceInfo {
        InstanceInfo {
            service: p.service.clone(),
            configured: p.configured,
            supervisor: supervisor_of(p, &self.table),
            limits: self.limits_of(&p.service),
        }
    }

    fn live(&self, service: &str) -> Vec<Live> {
        governor_core::status::live(&self.table, service)
    }

    fn head_str(&self) -> String {
        match self.audit.head() {
            Some(Head { seq, hash }) => format!("{seq}:{}", &hash[..hash.len().min(16)]),
            None => "empty".into(),
        }
    }

    /// Who a control-socket caller is, from the kernel-fed table.
    fn caller(&self, pid: i32, uid: u32) -> Value {
        let p = u32::try_from(pid).ok().and_then(|p| self.table.get(p));
        json!({
            "pid": pid,
            "uid": uid,
            "exe": p.map(|p| p.exe.clone()),
            "service": p.map(|p| p.service.clone()),
        })
    }

    /// Queues an alert (after everything queued before it).
    fn alert(
        &self,
        severity: Severity,
        kind: &str,
        service: Option<&str>,
        title: String,
        body: String,
    ) {
        self.effects.submit(Effect::alert_only(alert_of(
            severity, kind, service, title, body,
        )));
    }

    /// Queues an entry and its alert: the alert goes out once the entry is
    /// durable.
    fn record(&self, kind: &str, service: Option<&str>, detail: Value, alert: Option<Alert>) {
        let mut e = Effect::audit(kind, service, detail);
        if let Some(a) = alert {
            e = e.with_alert(a);
        }
        self.effects.submit(e);
    }

    /// Appends to the audit chain and waits until it is durable.
    async fn audit(&self, kind: &str, service: Option<&str>, detail: Value) -> Option<Head> {
        self.effects.audit(kind, service, detail).await
    }

    /// Appends one entry with its alert and waits until it is durable.
    async fn audit_with_alert(&self, kind: &str, detail: Value, alert: Alert) -> Option<Head> {
        match self
            .effects
            .commit(Effect::audit(kind, None, detail).with_alert(alert))
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

    /// Applies one kernel event; decisions are collected and carried out
    /// after the batch (they await the audit writer).
    fn on_event(&mut self, ev: Event) {
        self.counters.lifecycle_events += 1;
        match &ev {
            Event::Exit(e) => {
                self.ks_busy.exited(e.pid, e.ts_ns);
                if let Ok(mut m) = self.services_by_pid.write() {
                    m.remove(&e.pid);
                }
                self.sampler.forget(e.pid);
                if let Ok(a) = &mut self.mem_arms {
                    a.forget(e.pid);
                }
                if self.export.is_some() {
                    let service = self
                        .table
                        .get(e.pid)
                        .map(|p| p.service.clone())
                        .unwrap_or_else(|| self.table.resolve_unknown(e.uid, &e.comm));
                    self.export_event(&ev, &service);
                }
                let Some(p) = self.table.on_exit(e) else {
                    return;
                };
                // Governor's own commands (pm2's CLI, systemctl) are not
                // services: one killed at supervisor_timeout is no crash.
                if !p.instance || p.ppid == std::process::id() {
                    return;
                }
                let info = self.instance_info(&p);
                let d = Death {
                    ts_ns: e.ts_ns,
                    pid: e.pid,
                    code: e.code,
                    signal: e.signal,
                    uptime_ns: e.ts_ns.saturating_sub(e.start_ns),
                    planned: false,
                };
                let out = self.velocity.on_death(&info, d);
                if self.velocity.services.contains_key(&info.service) {
                    self.velocity_dirty = true;
                }
                for dec in out {
                    self.decisions.push((dec, e.ts_ns));
                }
            }
            _ => {
                let service = watch::track(&mut self.table, &ev);
                self.export_event(&ev, &service);
                // A new process of a configured service (a new instance, a
                // helper): read the service soon, which also has the kernel
                // tracker count the newcomer.
                if self.service_index.contains_key(&service) {
                    let soon = monotonic_ns() + 100_000_000;
                    let next = self.mem_next.entry(service.clone()).or_insert(soon);
                    *next = (*next).min(soon);
                }
                if let Ok(mut m) = self.services_by_pid.write() {
                    m.insert(ev.pid(), service);
                }
                if matches!(ev, Event::Exec(_)) {
                    if self.killswitch.engaged.is_some() {
                        self.hold_exec(ev.pid(), Some(ev.ts_ns()));
                    }
                    self.uptime_seen(ev.pid());
                }
            }
        }
    }

    /// `[export] events`: the event as `governor watch --json` prints it.
    fn export_event(&self, ev: &Event, service: &str) {
        let Some(x) = &self.export else { return };
        if let Some(v) = watch::event_json(ev, &self.table, service, &self.clock) {
            x.send(v.to_string());
        }
    }

    async fn carry_out(&mut self) {
        let decisions = std::mem::take(&mut self.decisions);
        for (dec, exit_ns) in decisions {
            self.decide(dec, exit_ns).await;
        }
    }

    async fn decide(&mut self, dec: Decision, exit_ns: u64) {
        match dec {
            Decision::EnteredCrashLoop {
                service,
                restarts,
                max_restarts,
                window_s,
                last,
                supervisor,
            } => {
                let how = match (last.code, last.signal) {
                    (Some(c), _) => format!("exit code {c}"),
                    (_, Some(s)) => format!("signal {s}"),
                    _ => "unknown".into(),
                };
                let detail = json!({
                    "restarts_in_window": restarts,
                    "max_restarts": max_restarts,
                    "window_s": window_s,
                    "last_exit": {"pid": last.pid, "code": last.code, "signal": last.signal, "uptime_ms": last.uptime_ns / 1_000_000},
                    "supervisor": supervisor,
                    "action": self.limits_of(&service).action,
                });
                let sup = match &supervisor {
                    Supervisor::Pm2 { name, pm_id, .. } => format!(
                        "pm2 app {name} (id {})",
                        pm_id.map(|i| i.to_string()).unwrap_or("?".into())
                    ),
                    Supervisor::Systemd { unit } => format!("systemd unit {unit}"),
                    Supervisor::None => "no supervisor (restarted by something else)".into(),
                };
                // A service someone runs on purpose is critical; a command
                // line we only know by fingerprint is a warning.
                let severity = if self.service_index.contains_key(&service)
                    || supervisor != Supervisor::None
                {
                    Severity::Critical
                } else {
                    Severity::Warning
                };
                let alert = alert_of(
                    severity,
                    "crash loop",
                    Some(&service),
                    format!("crash loop: {service} — {restarts} restarts in {}", human_secs(window_s)),
                    format!(
                        "allowed {max_restarts}; last exit: {how} after {} ms (pid {}); supervised by {sup}",
                        last.uptime_ns / 1_000_000,
                        last.pid
                    ),
                );
                // Waited for: the detection latency is measured to the
                // entry being durable.
                let out = self
                    .effects
                    .commit(
                        Effect::audit("crash_loop.entered", Some(&service), detail)
                            .with_alert(alert),
                    )
                    .await;
                if let Ok(Some(_)) = out.head {
                    let us = monotonic_ns().saturating_sub(exit_ns) / 1000;
                    self.latency.record(us);
                    log::debug!("crash loop of {service} durable {us} µs after the exit");
                }
                self.fetch_view(&service, supervisor, true);
            }
            Decision::StillCrashing {
                service,
                restarts,
                crashes_since,
                last,
            } => {
                // Grouped by the alert sender into periodic reminders.
                self.alert(
                    Severity::Critical,
                    "crash loop",
                    Some(&service),
                    format!("crash loop: {service} — {restarts} restarts in window"),
                    format!(
                        "{crashes_since} crashes since the loop began; last exit code {:?} signal {:?} after {} ms",
                        last.code,
                        last.signal,
                        last.uptime_ns / 1_000_000
                    ),
                );
            }
            Decision::Stop {
                service,
                supervisor,
                crashes_since,
            } => {
                // The supervisor is re-verified against the kernel-fed
                // table now, not trusted from when it was first seen.
                if let Err(e) = crate::supervisor::verify(&supervisor, &self.table) {
                    let why = format!("{e:#}");
                    let alert = alert_of(
                        Severity::Critical,
                        "crash loop action",
                        Some(&service),
                        format!("stop {service}: refused"),
                        why.clone(),
                    );
                    self.record(
                        "crash_loop.action",
                        Some(&service),
                        json!({"action": "stop", "supervisor": supervisor, "crashes_since": crashes_since, "state": "refused", "why": why}),
                        Some(alert),
                    );
                    return;
                }
                // The stop runs on the pipeline's act thread once this
                // entry is durable; its outcome comes back as Side::Stopped.
                let ops = self.supervisors.clone();
                let tx = self.side_tx.clone();
                let sv = supervisor.clone();
                let name = service.clone();
                self.effects.submit(
                    Effect::audit(
                        "crash_loop.action",
                        Some(&service),
                        json!({"action": "stop", "supervisor": supervisor, "crashes_since": crashes_since, "state": "requested"}),
                    )
                    .then(move |_| {
                        let result = ops.stop(&sv).map_err(|e| format!("{e:#}"));
                        let _ = tx.send(Side::Stopped {
                            service: name,
                            supervisor: sv,
                            result,
                        });
                    }),
                );
            }
            Decision::Recovered {
                service,
                clean_uptime_ns,
                episode_ns,
                quiet,
            } => {
                self.velocity_dirty = true;
                let why = if quiet {
                    "no deaths and nothing running since".to_string()
                } else {
                    format!("clean for {}", human_secs(clean_uptime_ns / 1_000_000_000))
                };
                let alert = alert_of(
                    Severity::Warning,
                    "crash loop recovered",
                    Some(&service),
                    format!("recovered: {service} — {why}"),
                    format!(
                        "the crash loop lasted {}",
                        human_secs(episode_ns / 1_000_000_000)
                    ),
                );
                self.record(
                    "crash_loop.recovered",
                    Some(&service),
                    json!({"clean_uptime_ms": clean_uptime_ns / 1_000_000, "episode_ms": episode_ns / 1_000_000, "quiet": quiet}),
                    Some(alert),
                );
            }
        }
    }

    /// Asks the supervisor for its view off the event loop.
    fn fetch_view(&self, service: &str, supervisor: Supervisor, for_crash_loop: bool) {
        if supervisor == Supervisor::None {
            return;
        }
        let ops = self.supervisors.clone();
        let tx = self.side_tx.clone();
        let service = service.to_string();
        tokio::task::spawn_blocking(move || {
            let view = ops.view(&supervisor).map_err(|e| format!("{e:#}"));
            let _ = tx.send(Side::SupervisorView {
                service,
                view,
                for_crash_loop,
            });
        });
    }

    fn on_side(&mut self, s: Side) {
        match s {
            Side::Delivery(o) => {
                let kind = if o.delivered {
                    "alert.delivered"
                } else {
                    "alert.failed"
                };
                if !o.delivered {
                    log::error!(
                        "alert {:?} for {:?} could not be delivered: {:?}",
                        o.kind,
                        o.service,
                        o.error
                    );
                }
                self.record(
                    kind,
                    o.service.as_deref(),
                    json!({"alert_kind": o.kind, "attempts": o.attempts, "grouped_count": o.grouped_count, "follow_up": o.follow_up, "error": o.error}),
                    None,
                );
            }
            Side::SupervisorView {
                service,
                view,
                for_crash_loop,
            } => match view {
                Ok(v) => {
                    if for_crash_loop {
                        let alert = alert_of(
                            Severity::Warning,
                            "supervisor view",
                            Some(&service),
                            format!("{service}: {}", describe_view(&v)),
                            "while governor counts a crash loop from the kernel's exit events"
                                .into(),
                        );
                        self.record(
                            "crash_loop.supervisor_view",
                            Some(&service),
                            v.clone(),
                            Some(alert),
                        );
                    }
                    self.views.insert(service, v);
                }
                Err(e) => log::warn!("supervisor view of {service}: {e}"),
            },
            Side::MemRestarted {
                service,
                supervisor,
                result,
                killed,
            } => {
                let (state, msg) = match &result {
                    Ok(out) => ("done", out.trim().chars().take(500).collect::<String>()),
                    Err(e) => ("failed", e.clone()),
                };
                // A flush waits for its victim's old instances to be gone.
                // After a failed restart that is when the reaper is done
                // (Side::MemKilled), and only then may the policy try again:
                // a retry before it would credit the same deaths twice as
                // planned and pile supervisor calls on a wedged pm2.
                if result.is_ok() {
                    self.flush.victim_gone(
                        &service,
                        monotonic_ns(),
                        &self.config.system.floor_limits(),
                    );
                }
                let alert = (result.is_err() || !killed.is_empty()).then(|| {
                    alert_of(
                        Severity::Critical,
                        "memory restart",
                        Some(&service),
                        format!("memory restart of {service}: {state}"),
                        if killed.is_empty() {
                            msg.clone()
                        } else {
                            format!("{msg}; SIGKILL for pid(s) {killed:?}, still alive after the kill timeout")
                        },
                    )
                });
                self.record(
                    "memory.restart_result",
                    Some(&service),
                    json!({"state": state, "supervisor": supervisor, "output": msg, "killed": killed}),
                    alert,
                );
            }
            Side::MemKilled { service, killed } => {
                self.memory.restart_failed(&service);
                self.flush.victim_gone(
                    &service,
                    monotonic_ns(),
                    &self.config.system.floor_limits(),
                );
                if killed.is_empty() {
                    return;
                }
                let alert = alert_of(
                    Severity::Critical,
                    "memory restart",
                    Some(&service),
                    format!("{service}: SIGKILL after a failed memory restart"),
                    format!(
                        "pid(s) {killed:?} still alive {} after the supervisor's restart \
                         failed; the supervisor brings it back once it answers",
                        human_secs(self.config.defaults.kill_timeout.0.as_secs())
                    ),
                );
                self.record(
                    "memory.killed",
                    Some(&service),
                    json!({"killed": killed, "why": "the supervisor's restart failed and the \
                           old instances outlived kill_timeout"}),
                    Some(alert),
                );
            }
            Side::KsStopped {
                service,
                supervisor,
                result,
                ended,
                says,
                blocked,
            } => {
                let (state, msg) = match &result {
                    Ok(out) => ("done", out.trim().chars().take(500).collect::<String>()),
                    Err(e) => ("failed", e.clone()),
                };
                let ended: Vec<Value> = ended
                    .iter()
                    .map(|(pid, how, ms)| json!({"pid": pid, "how": how, "after_ms": ms}))
                    .collect();
                self.on_ks_result(
                    service,
                    "killswitch.stopped",
                    json!({"state": state, "supervisor": supervisor, "output": msg,
                           "ended": ended, "supervisor_says": says,
                           "after_blocked_start": blocked}),
                    blocked,
                );
            }
            Side::KsRestarted {
                service,
                supervisor,
                result,
                says,
            } => {
                let (state, msg) = match &result {
                    Ok(out) => ("done", out.trim().chars().take(500).collect::<String>()),
                    Err(e) => ("failed", e.clone()),
                };
                self.on_ks_result(
                    service,
                    "killswitch.restarted",
                    json!({"state": state, "supervisor": supervisor, "output": msg,
                           "supervisor_says": says}),
                    false,
                );
            }
            Side::Stopped {
                service,
                supervisor,
                result,
            } => {
                let (state, msg) = match &result {
                    Ok(out) => ("done", out.trim().chars().take(500).collect::<String>()),
                    Err(e) => ("failed", e.clone()),
                };
                let sev = if result.is_ok() {
                    Severity::Warning
                } else {
                    Severity::Critical
                };
                let alert = alert_of(
                    sev,
                    "crash loop action",
                    Some(&service),
                    format!("stop {service}: {state}"),
                    msg.clone(),
                );
                // A failed stop is retried at the next crash of the episode
                // (the policy's bound), and the entry says so.
                let retry = match &result {
                    Ok(_) => Value::Null,
                    Err(_) => match self.velocity.stop_failed(&service) {
                        Some(n) if n < governor_core::velocity::STOP_ATTEMPTS => {
                            self.velocity_dirty = true;
                            json!(format!(
                                "at the next crash (attempt {} of {})",
                                n + 1,
                                governor_core::velocity::STOP_ATTEMPTS
                            ))
                        }
                        Some(n) => json!(format!("no: {n} attempts made, the most per episode")),
                        None => json!("no: the crash loop is over"),
                    },
                };
                self.record(
                    "crash_loop.action",
                    Some(&service),
                    json!({"action": "stop", "supervisor": supervisor, "state": state,
                           "output": msg, "retry": retry}),
                    Some(alert),
                );
            }
        }
    }

    fn mem_limits_of(&self, service: &str) -> governor_core::memory::MemLimits {
        let svc = self
            .service_index
            .get(service)
            .map(|&i| &self.config.services[i]);
        self.config.mem_limits_for(svc)
    }

    /// When the next memory reading is due (monotonic ns).
    fn memory_due(&self) -> u64 {
        let now = monotonic_ns();
        self.service_index
            .keys()
            .map(|n| self.mem_next.get(n).copied().unwrap_or(now))
            .min()
            .unwrap_or(now + 1_000_000_000)
    }

    /// Reads the configured services that are due, in one pass over the
    /// table, and carries out what the memory policy decides.
    fn sample_memory(&mut self) {
        let now = monotonic_ns();
        // Services due within the next 200 ms are read now too: one wake
        // and one pass over the table for all of them, not one each.
        let soon = now + 200_000_000;
        let due: Vec<String> = self
            .service_index
            .keys()
            .filter(|n| self.mem_next.get(*n).is_none_or(|&t| t <= soon))
            .cloned()
            .collect();
        if due.is_empty() {
            return;
        }
        let names: Vec<&str> = due.iter().map(String::as_str).collect();
        let mut readings = self.sampler.read(&self.table, &names);
        // A multi-process service's confirming reading is its Pss: shared
        // pages counted once among the parent and its helpers.
        for name in &due {
            if !self.memory.confirming(name) {
                continue;
            }
            if let Some(r) = readings.get_mut(name).filter(|r| r.helpers > 0) {
                if let Some(pss) = self.sampler.pss(&r.pids) {
                    r.bytes = pss;
                    r.by_pss = true;
                }
            }
        }
        for name in due {
            let lim = self.mem_limits_of(&name);
            let Some(r) = readings.get(&name) else {
                // Not running: look again in a second.
                self.mem_next.insert(name, now + 1_000_000_000);
                continue;
            };
            let decisions = self
                .memory
                .on_sample(&name, r.bytes, r.run_start_ns(), now, &lim);
            let ceiling = lim.ceiling_at(now.saturating_sub(r.run_start_ns()));
            let confirming = self.memory.confirming(&name);
            // Under its ceiling and not being restarted: the kernel tracker
            // counts its growth from this reading and reports the crossing.
            let tracked = match &mut self.mem_arms {
                Ok(arms) if ceiling > 0 => {
                    let quiet = !confirming
                        && r.bytes < ceiling
                        && self.memory.state(&name) != governor_core::memory::MemState::OverCeiling;
                    if quiet {
                        arms.arm(&name, &r.pids, ceiling - r.bytes)
                    } else {
                        arms.disarm(&name);
                        false
                    }
                }
                _ => false,
            };
            let mut next =
                governor_core::memory::next_sample_in(r.bytes, ceiling, confirming, tracked, &lim);
            // The ceiling drops when the start-up allowance ends: read then.
            if let Some(left) = lim.allowance_left(now.saturating_sub(r.run_start_ns())) {
                next = next.min(left + 1_000_000);
            }
            self.mem_next.insert(name.clone(), now + next);
            for dec in decisions {
                self.on_memory(dec, r, &lim);
            }
        }
    }

    /// The kernel tracker saw services grow through their budgets: read
    /// them now (the decision is made on `/proc`'s numbers).
    fn on_crossings(&mut self, crossed: Vec<governor_common::memory::MemCrossing>) {
        let Ok(arms) = &mut self.mem_arms else {
            return;
        };
        self.counters.memory_events += crossed.len() as u64;
        for c in crossed {
            if let Some(service) = arms.service_of(&c) {
                log::debug!("memory: {service} crossed its budget (pid {})", c.tgid);
                self.mem_next.insert(service.to_string(), 0);
            }
        }
        self.sample_memory();
    }

    fn on_memory(
        &mut self,
        dec: governor_core::memory::MemDecision,
        r: &crate::memsample::Reading,
        lim: &governor_core::memory::MemLimits,
    ) {
        use governor_core::memory::MemDecision as M;
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
        let pids: Vec<u32> = r.instances.iter().map(|&(p, _)| p).collect();
        match dec {
            M::OverCeiling {
                service,
                rss,
                ceiling,
                critical,
                restart,
            } => {
                let detail = json!({"rss_bytes": rss, "ceiling_bytes": ceiling, "critical": critical,
                                    "restart": restart, "pids": pids, "helpers": r.helpers,
                                    "measure": if r.by_pss { "pss" } else { "rss" },
                                    "mem_available_bytes": crate::memsample::mem_available()});
                let alert = critical.then(|| {
                    alert_of(
                        Severity::Critical,
                        "memory",
                        Some(&service),
                        format!(
                            "memory: {service} at {} over its {} ceiling",
                            mib(rss),
                            mib(ceiling)
                        ),
                        "a critical service: alerted, not restarted".into(),
                    )
                });
                self.record("memory.over_ceiling", Some(&service), detail, alert);
            }
            M::Restart {
                service,
                rss,
                ceiling,
                restarts_in_window,
            } => self.memory_restart(&service, rss, ceiling, restarts_in_window, r, lim),
            M::Loop {
                service,
                restarts,
                window_ns,
                rss,
                ceiling,
            } => {
                let alert = alert_of(
                    Severity::Critical,
                    "memory loop",
                    Some(&service),
                    format!(
                        "memory loop: {service} — {restarts} memory restarts in {}, over its ceiling again",
                        human_secs(window_ns / 1_000_000_000)
                    ),
                    format!(
                        "{} over the {} ceiling; governor stops restarting it until the window clears",
                        mib(rss),
                        mib(ceiling)
                    ),
                );
                self.record(
                    "memory.loop",
                    Some(&service),
                    json!({"restarts_in_window": restarts, "window_s": window_ns / 1_000_000_000,
                           "rss_bytes": rss, "ceiling_bytes": ceiling, "pids": pids}),
                    Some(alert),
                );
            }
            M::Drift {
                service,
                rss,
                baseline,
                threshold,
                for_ns,
            } => {
                let alert = alert_of(
                    Severity::Warning,
                    "memory drift",
                    Some(&service),
                    format!(
                        "memory drift: {service} at {}, its baseline is {}",
                        mib(rss),
                        mib(baseline)
                    ),
                    format!(
                        "above {} for {}",
                        mib(threshold),
                        human_secs(for_ns / 1_000_000_000)
                    ),
                );
                self.record(
                    "memory.drift",
                    Some(&service),
                    json!({"rss_bytes": rss, "baseline_bytes": baseline, "threshold_bytes": threshold,
                           "for_s": for_ns / 1_000_000_000, "pids": pids}),
                    Some(alert),
                );
            }
            M::BackUnder { service, rss } => {
                log::info!("memory: {service} back under its ceiling at {}", mib(rss));
            }
        }
    }

    /// A confirmed breach: restart through the verified supervisor, then
    /// make sure the old instances die (SIGKILL through pidfds after
    /// `kill_timeout`).
    fn memory_restart(
        &mut self,
        service: &str,
        rss: u64,
        ceiling: u64,
        restarts_in_window: u32,
        r: &crate::memsample::Reading,
        lim: &governor_core::memory::MemLimits,
    ) {
        let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
        let alert = alert_of(
            Severity::Warning,
            "memory restart",
            Some(service),
            format!(
                "memory restart: {service} at {} over its {} ceiling",
                mib(rss),
                mib(ceiling)
            ),
            format!(
                "memory restart {restarts_in_window} of {} allowed in the window",
                lim.max_restarts
            ),
        );
        let detail = json!({"rss_bytes": rss, "ceiling_bytes": ceiling,
                            "restarts_in_window": restarts_in_window, "max_restarts": lim.max_restarts,
                            "helpers": r.helpers, "measure": if r.by_pss { "pss" } else { "rss" },
                            "mem_available_bytes": crate::memsample::mem_available()});
        if !self.restart_service(service, "memory.restart", detail, alert, false) {
            self.memory.restart_failed(service);
        }
    }

    /// Restarts `service` through its verified supervisor (or, with
    /// `kill`, SIGKILLs its instances and lets the supervisor bring them
    /// back), its entry `kind` durable first; the old instances get SIGKILL
    /// through pidfds if they outlive `kill_timeout`. False when refused.
    fn restart_service(
        &mut self,
        service: &str,
        kind: &str,
        mut detail: Value,
        alert: Alert,
        kill: bool,
    ) -> bool {
        let pids: Vec<u32> = self.table.instances_of(service).map(|p| p.pid).collect();
        let supervisor = self
            .table
            .instances_of(service)
            .next()
            .map(|p| supervisor_of(p, &self.table))
            .unwrap_or_default();
        let verified = match supervisor {
            Supervisor::None => {
                Err("no supervisor restarts it (not pm2, not a system unit)".to_string())
            }
            ref s => crate::supervisor::verify(s, &self.table).map_err(|e| format!("{e:#}")),
        };
        detail["pids"] = json!(pids);
        detail["supervisor"] = json!(supervisor);
        if let Err(why) = verified {
            detail["state"] = json!("refused");
            detail["why"] = json!(why);
            let alert = alert_of(
                Severity::Critical,
                "memory restart",
                Some(service),
                format!("{service}: restart refused"),
                why,
            );
            self.record(kind, Some(service), detail, Some(alert));
            return false;
        }
        // Descriptors of the instances now: a kill can only reach these
        // processes, never a reused pid.
        let pidfds: Vec<(u32, std::os::fd::OwnedFd)> = pids
            .iter()
            .filter_map(|&p| {
                let pid = rustix::process::Pid::from_raw(p as i32)?;
                rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty())
                    .ok()
                    .map(|fd| (p, fd))
            })
            .collect();
        // The deaths this causes are governor's, not crashes.
        let info = InstanceInfo {
            service: service.to_string(),
            configured: self.service_index.contains_key(service),
            supervisor: supervisor.clone(),
            limits: self.limits_of(service),
        };
        self.velocity.expect_planned(&info, pids.len() as u32);
        self.velocity_dirty = true;
        let ops = self.supervisors.clone();
        let tx = self.side_tx.clone();
        let (name, sv) = (service.to_string(), supervisor.clone());
        let kill_timeout = if kill {
            Duration::ZERO
        } else {
            self.config.defaults.kill_timeout.0
        };
        detail["state"] = json!("requested");
        detail["how"] = json!(if kill {
            "SIGKILL (emergency floor)"
        } else {
            "supervisor restart"
        });
        detail["kill_timeout_ms"] = json!(kill_timeout.as_millis() as u64);
        self.effects.submit(
            Effect::audit(kind, Some(service), detail)
                .with_alert(alert)
                .then(move |_| {
                    let result = if kill {
                        Ok("killed; the supervisor brings it back".to_string())
                    } else {
                        ops.restart(&sv).map_err(|e| format!("{e:#}"))
                    };
                    // A failed restart (pm2 wedged, gone, refusing) is
                    // reported now, so it is audited and retried at once;
                    // the old instances are still reaped below, so the
                    // budget holds while the supervisor is out.
                    let failed = result.is_err();
                    if failed {
                        let _ = tx.send(Side::MemRestarted {
                            service: name.clone(),
                            supervisor: sv.clone(),
                            result: result.clone(),
                            killed: Vec::new(),
                        });
                    }
                    // Waiting for the old instances is not the act thread's job.
                    let spawned =
                        std::thread::Builder::new()
                            .name("mem-reap".into())
                            .spawn(move || {
                                let killed = crate::memsample::reap(pidfds, kill_timeout);
                                let _ = tx.send(if failed {
                                    Side::MemKilled {
                                        service: name,
                                        killed,
                                    }
                                } else {
                                    Side::MemRestarted {
                                        service: name,
                                        supervisor: sv,
                                        result,
                                        killed,
                                    }
                                });
                            });
                    if let Err(e) = spawned {
                        log::error!("memory restart: starting the reaper thread: {e}");
                    }
                }),
        );
        true
    }

    /// MemAvailable against the system floor: the flush cycle.
    fn floor_check(&mut self, now: u64) {
        use governor_core::memory::{Candidate, FloorDecision as F};
        let Some(available) = crate::memsample::mem_available() else {
            return;
        };
        let fl = self.config.system.floor_limits();
        if available < fl.floor || self.flush.active() {
            // Choose from fresh readings, not ones up to seconds old.
            for n in self.service_index.keys() {
                self.mem_next.insert(n.clone(), 0);
            }
            self.sample_memory();
        }
        let me = std::process::id();
        let candidates: Vec<Candidate> = self
            .service_index
            .keys()
            .filter_map(|name| {
                let t = self.memory.services.get(name)?;
                let procs: Vec<&Process> = self.table.instances_of(name).collect();
                if procs.is_empty() {
                    return None;
                }
                let never = if self.mem_limits_of(name).critical {
                    Some("critical")
                } else if procs.iter().any(|p| p.pid == 1) {
                    Some("PID 1")
                } else if procs.iter().any(|p| p.pid == me) {
                    Some("governor itself")
                } else if procs
                    .iter()
                    .any(|p| p.exe.rsplit('/').next() == Some("sshd"))
                {
                    Some("sshd")
                } else {
                    None
                };
                Some(Candidate {
                    service: name.clone(),
                    rss: t.rss,
                    baseline: t.baseline(),
                    never: never.map(str::to_string),
                })
            })
            .collect();
        let mib = |b: u64| format!("{} MiB", b >> 20);
        for dec in self.flush.on_available(available, now, &fl, &candidates) {
            match dec {
                F::Below { available, floor } => {
                    let alert = alert_of(
                        Severity::Critical,
                        "memory floor",
                        None,
                        format!("memory floor: {} available, below the {} floor", mib(available), mib(floor)),
                        "a flush cycle restarts the non-critical services that free the most, one at a time".into(),
                    );
                    self.record(
                        "memory.floor",
                        None,
                        json!({"available_bytes": available, "floor_bytes": floor,
                               "hysteresis_bytes": fl.hysteresis, "emergency_bytes": fl.emergency,
                               "candidates": candidates.iter().map(|c| json!({"service": c.service, "rss_bytes": c.rss,
                                   "baseline_bytes": c.baseline, "frees_bytes": c.frees(), "never": c.never})).collect::<Vec<_>>()}),
                        Some(alert),
                    );
                }
                F::Flush {
                    victim,
                    kill,
                    available,
                    passed_over,
                    nth,
                } => {
                    let alert = alert_of(
                        Severity::Critical,
                        "memory flush",
                        Some(&victim.service),
                        format!(
                            "memory flush {nth}/{}: {} {} ({} over its baseline)",
                            fl.flush_max,
                            if kill { "killing" } else { "restarting" },
                            victim.service,
                            mib(victim.frees())
                        ),
                        format!("{} available, floor {}", mib(available), mib(fl.floor)),
                    );
                    let detail = json!({"available_bytes": available, "floor_bytes": fl.floor,
                        "rss_bytes": victim.rss, "baseline_bytes": victim.baseline, "frees_bytes": victim.frees(),
                        "nth": nth, "flush_max": fl.flush_max, "kill": kill,
                        "passed_over": passed_over.iter().map(|(s, w)| json!({"service": s, "why": w})).collect::<Vec<_>>()});
                    self.restart_service(&victim.service, "memory.flush", detail, alert, kill);
                }
                F::Done {
                    available,
                    restarted,
                    left,
                } => {
                    let alert = alert_of(
                        if left {
                            Severity::Critical
                        } else {
                            Severity::Warning
                        },
                        "memory flush",
                        None,
                        format!(
                            "memory flush done: {} available{}",
                            mib(available),
                            if left { ", still below the floor" } else { "" }
                        ),
                        format!(
                            "restarted: {}",
                            if restarted.is_empty() {
                                "nothing".into()
                            } else {
                                restarted.join(", ")
                            }
                        ),
                    );
                    self.record(
                        "memory.flush_done",
                        None,
                        json!({"available_bytes": available, "floor_bytes": fl.floor,
                               "hysteresis_bytes": fl.hysteresis, "restarted": restarted, "below_floor": left}),
                        Some(alert),
                    );
                }
            }
        }
    }

    fn reload(&mut self) -> std::result::Result<String, String> {
        let src = std::fs::read_to_string(&self.config_path).unwrap_or_default();
        match Config::load(&self.config_path) {
            Ok(cfg) if start_only_keys(&cfg) != start_only_keys(&self.config) => Err(
                "[metrics], [mcp], [export] and audit.memory_buffer take effect at start only \
                 (a listener, a socket and its group, a file, a buffer): restart governor to \
                 change them"
                    .into(),
            ),
            Ok(cfg) => {
                self.table.set_matcher(crate::proctable::matcher(&cfg));
                self.service_index = Self::index_services(&cfg);
                // Re-walk the protected files only when [protect] changed:
                // it re-hashes every file and reloads kernel state.
                self.reload_protect = cfg.protect != self.config.protect;
                self.config = cfg;
                self.config_hash = config_hash(&src);
                self.supervisor_timeout_ms.store(
                    self.config.system.supervisor_timeout.0.as_millis() as u64,
                    std::sync::atomic::Ordering::Relaxed,
                );
                // New limits apply to the history too.
                self.velocity.cap = self.config.daemon.max_unconfigured_services;
                self.refresh_history_limits();
                Ok(self.config_hash.clone())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// The core's status snapshot, on the current table.
    fn snapshot(&self, all: bool) -> governor_core::status::Snapshot {
        governor_core::status::snapshot(
            &self.table,
            &self.velocity,
            &self.memory,
            &ConfiguredServices {
                config: &self.config,
                index: &self.service_index,
            },
            all,
            monotonic_ns(),
        )
    }

    async fn on_request(&mut self, inc: Incoming, protector: &mut Protector) {
        let Incoming {
            req,
            peer,
            reply,
            stdin,
            via,
        } = inc;
        match req {
            Request::Mcp { call } => self.on_mcp(call, peer, via, protector, reply).await,
            Request::Metrics => {
                let _ = reply.send(Response::ok(
                    self.metrics_data(protector, self.lifecycle_lost),
                ));
            }
            Request::Status { all } => {
                let snap = self.snapshot(all);
                let latency = self.latency.summary();
                let head = self.audit.head().map(|h| h.to_string());
                let layers = self.layers.clone();
                let memory = self.memory_json();
                let ops = self.supervisors.clone();
                let cached = self.views.clone();
                let rows: Vec<Value> = snap.services.iter().map(|r| self.service_json(r)).collect();
                let kill_switch = json!({
                    "engaged": self.killswitch.engaged.is_some(),
                    "scope": self.killswitch.engaged.as_ref().map(|e| &e.scope),
                    "since_ms": self.killswitch.engaged.as_ref().map(|e| e.since_ms),
                });
                let drift_files = protector.drift_items().len();
                let busy = self.status_views_busy.clone();
                let audit_held = self.effects.held().json();
                // Supervisor views take a pm2/systemctl round trip: off the loop.
                tokio::task::spawn_blocking(move || {
                    let mut services = Vec::new();
                    let supervised: Vec<&Supervisor> = snap
                        .services
                        .iter()
                        .map(|r| &r.status.supervisor)
                        .filter(|s| !matches!(s, Supervisor::None))
                        .collect();
                    let (fetched, views_note) = fetch_views_bounded(ops, &supervised, &busy);
                    let mut fetched = fetched.into_iter();
                    for (r, mut v) in snap.services.iter().zip(rows) {
                        let view = match &r.status.supervisor {
                            Supervisor::None => None,
                            _ => fetched
                                .next()
                                .and_then(|v| v.ok())
                                .or_else(|| cached.get(&r.status.name).cloned()),
                        };
                        if let Some(view) = view {
                            v["supervisor_view"] = json!(describe_view(&view));
                            v["supervisor_raw"] = view;
                        }
                        services.push(v);
                    }
                    let _ = reply.send(Response::ok(json!({
                        "services": services,
                        "audit_head": head,
                        "layers": layers,
                        "detection_latency": latency,
                        "bounds": snap.bounds,
                        "memory": memory,
                        "kill_switch": kill_switch,
                        "drift_files": drift_files,
                        "supervisor_views": views_note,
                        "audit_held": audit_held,
                    })));
                    // The reply (pm2's list, every row as JSON) was this
                    // request's peak; what it freed goes back now, not at
                    // the next trim glibc decides on.
                    trim_heap();
                });
            }
            Request::Deploy {
                service,
                grace_s,
                reason,
                files,
                finish,
            } => {
                let paths: Vec<std::path::PathBuf> =
                    files.iter().map(std::path::PathBuf::from).collect();
                if finish {
                    let closed = match protector.deploy_close(&paths, &service).await {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = reply.send(Response::err(format!("{e:#}")));
                            return;
                        }
                    };
                    let head = self
                        .audit(
                            "deploy.files",
                            Some(&service),
                            json!({"files": closed, "reason": reason,
                                   "caller": self.caller(peer.pid, peer.uid)}),
                        )
                        .await;
                    let _ = reply.send(Response::ok(json!({"service": service, "files": closed,
                        "audit": head.map(|h| h.to_string())})));
                    return;
                }
                let max = self.config.defaults.max_grace.0.as_secs();
                if grace_s > max {
                    let _ = reply.send(Response::err(format!(
                        "--grace {} is longer than defaults.max_grace ({}): a deploy switches \
                         crash-loop detection off for its service, so it is capped",
                        human_secs(grace_s),
                        human_secs(max)
                    )));
                    return;
                }
                let known = self.service_index.contains_key(&service)
                    || self.velocity.services.contains_key(&service)
                    || self.table.instances_of(&service).next().is_some();
                if !known {
                    let _ = reply.send(Response::err(format!(
                        "unknown service {service:?}: not configured and not running (see governor status --all)"
                    )));
                    return;
                }
                let deploying = match protector.deploy_open(
                    &paths,
                    &service,
                    &reason,
                    peer.uid,
                    // Long enough for a deploy command; `--finish` (or the
                    // command's end) closes it sooner.
                    Duration::from_secs(grace_s.max(600)),
                ) {
                    Ok(k) => k,
                    Err(e) => {
                        let _ = reply.send(Response::err(format!("{e:#}; nothing changed")));
                        return;
                    }
                };
                let info = InstanceInfo {
                    service: service.clone(),
                    configured: self.service_index.contains_key(&service),
                    supervisor: self
                        .table
                        .instances_of(&service)
                        .next()
                        .map(|p| supervisor_of(p, &self.table))
                        .unwrap_or_default(),
                    limits: self.limits_of(&service),
                };
                let caller = self.caller(peer.pid, peer.uid);
                // Crash-loop detection is off for the grace: worth a look.
                let alert = alert_of(
                    Severity::Warning,
                    "deploy",
                    Some(&service),
                    format!("deploy: {service}"),
                    format!(
                        "restarts in the next {} are planned: {reason}; by pid {} ({}) uid {}{}",
                        human_secs(grace_s),
                        peer.pid,
                        caller["exe"].as_str().unwrap_or("?"),
                        peer.uid,
                        caller["service"]
                            .as_str()
                            .map(|s| format!(", service {s}"))
                            .unwrap_or_default()
                    ),
                );
                // The entry first; the grace takes effect once it is durable.
                let out = self
                    .effects
                    .commit(
                        Effect::audit(
                            "service.deploy",
                            Some(&service),
                            json!({"grace_s": grace_s, "reason": reason, "by_uid": peer.uid, "by_pid": peer.pid, "caller": caller,
                                   "files": deploying}),
                        )
                        .with_alert(alert),
                    )
                    .await;
                let head = match out.head {
                    Ok(h) => h,
                    Err(e) => {
                        let _ = protector.deploy_close(&deploying, &service).await;
                        let _ = reply.send(Response::err(format!(
                            "deploy not recorded: the audit entry could not be written ({e}); nothing changed"
                        )));
                        return;
                    }
                };
                self.velocity
                    .deploy(&info, monotonic_ns(), grace_s.saturating_mul(1_000_000_000));
                self.velocity_dirty = true;
                let _ = reply.send(Response::ok(json!({"service": service, "grace_s": grace_s, "audit": head.map(|h| h.to_string())})));
            }
            Request::Drift { accept, reason } => {
                self.on_drift(accept, reason, peer, stdin, protector, reply)
                    .await
            }
            Request::ProtectList => {
                let _ = reply.send(Response::ok(protector.list()));
            }
            Request::Approve {
                path,
                for_s,
                reason,
                confirm,
            } => {
                // Who asks, from the kernel-fed table; the terminal from the
                // descriptor the client passed, checked against the
                // caller's own controlling terminal.
                let human = human_caller(&self.table, peer.pid, stdin.as_ref());
                let r = protector
                    .approve(
                        Path::new(&path),
                        Duration::from_secs(for_s),
                        &reason,
                        crate::protect::Caller {
                            uid: peer.uid,
                            session: u32::try_from(peer.pid).ok().and_then(session_of),
                            human,
                        },
                        confirm,
                    )
                    .await;
                let _ = reply.send(match r {
                    Ok(v) => Response::ok(v),
                    Err(e) => Response::err(format!("{e:#}")),
                });
            }
            Request::KillSwitch {
                action,
                scope,
                reason,
            } => {
                self.on_killswitch(action, scope, reason, peer, stdin, None, reply)
                    .await
            }
            Request::ApproveEnd { path } => {
                let r = protector.approve_end(Path::new(&path)).await;
                let _ = reply.send(match r {
                    Ok(v) => Response::ok(v),
                    Err(e) => Response::err(format!("{e:#}")),
                });
            }
        }
    }
}

/// How long `status` waits for the supervisors' own views before it
/// answers with the last ones seen.
const STATUS_VIEWS_WAIT: Duration = Duration::from_millis(1500);

/// The supervisors' views for a status answer, waited for at most
/// [`STATUS_VIEWS_WAIT`]: a wedged pm2 answers nothing until
/// `supervisor_timeout`, and status must answer anyway. One fetch at a time
/// (`busy`); a status asked while one runs gets no fresh views. The note
/// says which (`null`: fresh).
fn fetch_views_bounded(
    ops: Arc<dyn SupervisorOps>,
    supervised: &[&Supervisor],
    busy: &Arc<std::sync::atomic::AtomicBool>,
) -> (Vec<anyhow::Result<Value>>, Value) {
    use std::sync::atomic::Ordering;
    if supervised.is_empty() {
        return (Vec::new(), Value::Null);
    }
    if busy.swap(true, Ordering::SeqCst) {
        return (
            Vec::new(),
            json!("an earlier fetch of the supervisors' views has not finished: last views shown"),
        );
    }
    let owned: Vec<Supervisor> = supervised.iter().map(|s| (*s).clone()).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    let flag = busy.clone();
    let spawned = std::thread::Builder::new()
        .name("status-views".into())
        .spawn(move || {
            // Cleared however the fetch ends (a panic in it included).
            struct Done(Arc<std::sync::atomic::AtomicBool>);
            impl Drop for Done {
                fn drop(&mut self) {
                    self.0.store(false, std::sync::atomic::Ordering::SeqCst);
                }
            }
            let _done = Done(flag);
            let refs: Vec<&Supervisor> = owned.iter().collect();
            let _ = tx.send(ops.views(&refs));
        });
    if let Err(e) = spawned {
        busy.store(false, Ordering::SeqCst);
        return (Vec::new(), json!(format!("starting the views fetch: {e}")));
    }
    match rx.recv_timeout(STATUS_VIEWS_WAIT) {
        Ok(v) => (v, Value::Null),
        Err(_) => (
            Vec::new(),
            json!(format!(
                "the supervisors did not answer within {} ms (wedged or stopped?): last views shown",
                STATUS_VIEWS_WAIT.as_millis()
            )),
        ),
    }
}

/// What a reload can't change (set up once at start): compared, so a
/// reload that would change them is refused rather than ignored.
fn start_only_keys(c: &Config) -> String {
    format!(
        "{:?}|{:?}|{:?}|{:?}|{}|{}|{}",
        c.metrics.listen.as_ref().map(|l| l.get_ref()),
        c.mcp.socket,
        c.mcp.group.as_ref().map(|g| g.get_ref()),
        c.export.events,
        c.export.rotate_size.0,
        c.export.keep,
        c.audit.memory_buffer
    )
}

/// The config as the core's snapshot sees it.
struct ConfiguredServices<'a> {
    config: &'a Config,
    index: &'a HashMap<String, usize>,
}

impl governor_core::status::ServiceConfig for ConfiguredServices<'_> {
    fn configured(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        Box::new(self.index.keys().map(String::as_str))
    }

    fn is_configured(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn limits(&self, name: &str) -> Limits {
        self.config
            .limits_for(self.index.get(name).map(|&i| &self.config.services[i]))
    }

    fn mem_limits(&self, name: &str) -> governor_core::memory::MemLimits {
        self.config
            .mem_limits_for(self.index.get(name).map(|&i| &self.config.services[i]))
    }
}

/// An alert, also written to the daemon's log. The effect pipeline adds
/// the audit head when it sends it.
fn alert_of(
    severity: Severity,
    kind: &str,
    service: Option<&str>,
    title: String,
    body: String,
) -> Alert {
    let level = match severity {
        Severity::Info => log::Level::Info,
        Severity::Warning => log::Level::Warn,
        Severity::Critical => log::Level::Error,
    };
    log::log!(
        level,
        "alert [{kind}] {title}{}{body}",
        if body.is_empty() { "" } else { " — " }
    );
    let mut a = Alert::new(severity, kind, title).with_body(body);
    if let Some(s) = service {
        a = a.with_service(s);
    }
    a
}

/// Whether an approval comes from a human at a login terminal: the
/// caller's ancestry holds a login and nothing supervised
/// ([`crate::proctable::login_ancestry`]), and the descriptor it passed is
/// its own controlling terminal (a terminal the caller doesn't control
/// proves nothing).
fn human_caller(
    table: &ProcTable,
    pid: i32,
    stdin: Option<&std::os::fd::OwnedFd>,
) -> std::result::Result<String, String> {
    let pid = u32::try_from(pid).map_err(|_| "the caller's pid is unknown".to_string())?;
    let login = crate::proctable::login_ancestry(table, pid)?;
    let tty = stdin
        .and_then(control::terminal_of)
        .ok_or("its stdin is not a terminal")?;
    match control::controlling_terminal(pid) {
        Some(ctty) if ctty == tty => Ok(format!("{login}, tty {}:{}", tty.0, tty.1)),
        Some(ctty) => Err(format!(
            "the terminal it passed ({}:{}) is not its controlling terminal ({}:{})",
            tty.0, tty.1, ctty.0, ctty.1
        )),
        None => Err("it has no controlling terminal".into()),
    }
}

/// The session id of a live process (`/proc/PID/stat`, field 6): the
/// session an UNTOUCHABLE window admits. The caller is blocked on the
/// socket while it is read, so the pid is still its own.
fn session_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the comm (which may hold spaces and parens): state, ppid,
    // pgrp, session.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(3)?.parse().ok()
}

/// What governor protects without being told: its own config, and its
/// binary when installed (not one cargo rebuilds in place under target/);
/// the state directory is guarded by the eBPF/LSM layers, the audit log is
/// append-only.
fn implicit_protection(config_path: &Path, cfg: &Config) -> Implicit {
    let binary = std::env::current_exe()
        .ok()
        .filter(|p| !p.components().any(|c| c.as_os_str() == "target"));
    Implicit {
        config_path: std::fs::canonicalize(config_path).ok(),
        binary_path: binary,
        state_dir: cfg.daemon.state_dir.clone(),
        audit_log: Some(cfg.daemon.state_dir.join("audit.jsonl")),
        telegram: cfg.alerts.telegram.clone(),
    }
}

/// Logs what protection found, and alerts loudly about what it couldn't do.
fn report_protection(r: &crate::protect::StartReport, effects: &Effects) {
    log::info!(
        "protection: {} files ({} untouchable, {} protected), {} flagged in {:.1} ms; layers {}",
        r.files,
        r.untouchable,
        r.protected,
        r.flagged,
        r.flags_ms,
        r.layers.join(", ")
    );
    if let Some(b) = &r.attempt_backend {
        log::info!("attempt logging: {}", b.describe());
    }
    for (layer, why) in &r.layer_errors {
        log::warn!("protection layer {layer} not running: {why}");
    }
    let mut loud = Vec::new();
    for (what, list) in [
        (
            "cannot hold the immutable flag (logged and LSM-guarded only)",
            &r.unflaggable,
        ),
        ("missing", &r.missing),
        ("changed while governor was not watching", &r.changed),
        ("config problem", &r.problems),
    ] {
        for f in list {
            log::warn!("protected file {what}: {f}");
            loud.push(format!("{what}: {f}"));
        }
    }
    if !loud.is_empty() {
        log::warn!("protection problems: {}", loud.len());
        effects.submit(Effect::alert_only(
            Alert::new(
                Severity::Critical,
                "protection",
                "protected files need attention",
            )
            .with_body(loud.join("\n")),
        ));
    }
}

/// Loading parses the kernel's BTF (several MiB: ours once for the layout,
/// aya's once for its loader and once for attaching) and reads the whole
/// eBPF object. The loader and aya's BTF are dropped here, and glibc keeps
/// freed heap unless asked to give it back: a daemon that stays resident
/// should not carry its start-up peak forever.
/// Each protected file holds an O_PATH descriptor (where it is now, after
/// a rename or a mount over a parent), on top of pidfds, sockets and
/// pipes: the soft limit on open files (often 1024) goes up to the hard
/// one.
fn raise_nofile() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            log::warn!("raising the open-file limit to its hard limit: {e}");
        }
    }
}

fn release_startup_memory() {
    crate::layout::release_setup();
    crate::layout::release_object_pages();
    crate::layout::release_code_pages();
    trim_heap();
}

/// Returns the heap's free pages to the kernel (glibc keeps them
/// otherwise: a freed peak stays in RSS).
fn trim_heap() {
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe { libc::malloc_trim(0) };
}

/// glibc's allocator, set for a daemon that stays resident: measured with
/// 30 pm2 apps, one `governor status` (which parses pm2's `jlist`, a few
/// hundred KB of JSON, on a helper thread) left 1.7 MB more anonymous RSS
/// for good — a second arena for that thread, and a trim threshold that
/// glibc raises by itself after large frees. One arena (the daemon's
/// threads seldom allocate at once), large buffers straight from (and back
/// to) mmap, and a fixed trim threshold keep what the daemon holds what it
/// uses. Before any thread.
pub fn tune_allocator() {
    for (param, value) in [
        (libc::M_ARENA_MAX, 1),
        (libc::M_MMAP_THRESHOLD, 64 << 10),
        (libc::M_TRIM_THRESHOLD, 128 << 10),
    ] {
        // SAFETY: mallopt only changes allocator settings; called before
        // the runtime starts any thread.
        if unsafe { libc::mallopt(param, value) } != 1 {
            log::debug!("mallopt({param}, {value}) refused");
        }
    }
}

pub fn human_secs(s: u64) -> String {
    match s {
        s if s >= 3600 && s % 3600 == 0 => format!("{} h", s / 3600),
        s if s >= 60 && s % 60 == 0 => format!("{} min", s / 60),
        s if s >= 60 => format!("{} min {} s", s / 60, s % 60),
        s => format!("{s} s"),
    }
}

pub async fn run(config_path: PathBuf) -> Result<()> {
    let config = Config::load(&config_path).map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    let src = std::fs::read_to_string(&config_path).unwrap_or_default();
    let state_dir = config.daemon.state_dir.clone();
    state_dir_secure(&state_dir)?;
    raise_nofile();

    // The audit chain first: everything after this is recorded.
    let (log, report) = AuditLog::open(
        &state_dir,
        governor_audit::Options {
            rotate_bytes: Some(config.audit.rotate_size.0),
            append_only: true,
        },
    )
    .context("opening the audit log")?;
    log::info!("audit log {}: {report}", log.log_path().display());
    let audit = governor_audit::spawn_writer(log)?;

    let mut probes = Probes::load(&ProbeOptions {
        ring_bytes: config.daemon.ring_size.0 as u32,
    })?;
    let (mut mem_ring, mem_arms) = match probes.take_memwatch() {
        Ok((ring, arms)) => (Some(ring), Ok(arms)),
        Err(e) => (None, Err(e)),
    };
    let mut table = crate::proctable::table(crate::proctable::matcher(&config));
    let seeded = table
        .seed_from_proc()
        .context("seeding the process table from /proc")?;
    probes.sync_supervisors(&mut table);
    let (velocity, velocity_problem) = load_velocity(&state_dir);

    let (side_tx, mut side_rx) = mpsc::unbounded_channel::<Side>();
    let (alerts, telegram): (Arc<dyn AlertSink>, Option<Arc<TelegramSender>>) =
        match &config.alerts.telegram {
            Some(t) => {
                let v = t
                    .validate()
                    .map_err(|p| anyhow::anyhow!("alerts.telegram.{p}"))?;
                let tx = side_tx.clone();
                let sender = Arc::new(TelegramSender::with_callback(
                    v,
                    Tuning::default(),
                    Box::new(move |o| {
                        let _ = tx.send(Side::Delivery(o));
                    }),
                )?);
                (sender.clone(), Some(sender))
            }
            None => (Arc::new(LogOnly), None),
        };

    // One ordered pipeline for every entry, alert and act from here on.
    let effects = Effects::spawn(audit.clone(), alerts, config.audit.memory_buffer)?;
    let fx = effects.clone();
    let killswitch_file = StateFile::spawn(state_dir.join("killswitch.json"), move |p, e| {
        fx.submit(Effect::alert_only(Alert::new(
            Severity::Critical,
            "state",
            format!(
                "cannot save the kill switch state to {}: {e:#}",
                p.display()
            ),
        )));
    })?;

    let fx = effects.clone();
    let uptime_file = StateFile::spawn(state_dir.join("instances.json"), move |p, e| {
        fx.submit(Effect::alert_only(Alert::new(
            Severity::Warning,
            "state",
            format!(
                "cannot save the instances governor saw start to {}: {e:#}",
                p.display()
            ),
        )));
    })?;
    let (uptime, uptime_problem) = drift::Uptime::load(&state_dir, uptime_file);

    // Protected files: flags first, then the kernel layers, reconciled
    // against the declared state.
    let services_by_pid: Arc<std::sync::RwLock<HashMap<u32, String>>> = Arc::new(
        std::sync::RwLock::new(table.iter().map(|p| (p.pid, p.service.clone())).collect()),
    );
    let lookup = services_by_pid.clone();
    let (mut protector, protect_report) = Protector::start(
        &config.protect,
        implicit_protection(&config_path, &config),
        effects.clone(),
        Arc::new(move |pid| lookup.read().ok().and_then(|m| m.get(&pid).cloned())),
    )
    .await
    .context("starting file protection")?;
    report_protection(&protect_report, &effects);
    let export = match &config.export.events {
        Some(p) => {
            let x =
                crate::export::Exporter::spawn(p, config.export.rotate_size.0, config.export.keep)
                    .with_context(|| format!("export.events = {}", p.display()))?;
            protector.export = Some(x.clone());
            Some(x)
        }
        None => None,
    };
    release_startup_memory();
    let mut layers = vec!["ebpf-lifecycle".to_string()];
    layers.extend(protector.layers());
    let real = RealSupervisors::new(config.system.supervisor_timeout.0);
    let real_timeout = real.timeout_ms.clone();
    let real_supervisors: Arc<dyn SupervisorOps> = Arc::new(real);
    let mut d = Daemon {
        service_index: Daemon::index_services(&config),
        config_path: config_path.clone(),
        config_hash: config_hash(&src),
        config,
        table,
        velocity,
        velocity_dirty: false,
        audit,
        effects,
        telegram,
        supervisors: real_supervisors,
        supervisor_timeout_ms: real_timeout,
        status_views_busy: Default::default(),
        side_tx,
        layers,
        views: HashMap::new(),
        latency: Latency::default(),
        decisions: Vec::new(),
        reload_protect: false,
        services_by_pid,
        memory: load_memory(&state_dir),
        flush: Default::default(),
        sampler: crate::memsample::Sampler::default(),
        mem_next: HashMap::new(),
        mem_arms,
        psi_problem: None,
        killswitch: killswitch::load(&state_dir)?,
        killswitch_file,
        ks_pending: None,
        ks_busy: Default::default(),
        uptime,
        counters: Default::default(),
        lifecycle_lost: 0,
        mcp_rate: Default::default(),
        export,
        clock: crate::events::Clock::new(),
    };
    if let Some(p) = uptime_problem {
        log::warn!("uptime drift: {p}");
    }
    // History loaded from the state file carries no limits: apply them.
    d.velocity.cap = d.config.daemon.max_unconfigured_services;
    d.refresh_history_limits();
    let host = host_name();
    let started = d
        .audit(
            "daemon.started",
            None,
            json!({
                "version": env!("CARGO_PKG_VERSION"),
                "config_path": config_path.display().to_string(),
                "config_hash": d.config_hash,
                "layers": d.layers,
                "pid": std::process::id(),
                "host": host,
                "kernel": crate::doctor::kernel_release(),
                "processes": seeded,
                "services_with_history": d.velocity.services.len(),
                "protect": protect_report,
                "history_problem": velocity_problem,
                "approvals": crate::doctor::approval_paths(d.config.protect.approve_via),
                "exit_detection": crate::probes::kernel_config().ok().map(|c| crate::doctor::exit_detection(&c)),
                "max_unconfigured_services": d.velocity.cap,
            }),
        )
        .await;
    if let Some(p) = &velocity_problem {
        log::warn!("restart history: {p}");
    }
    log::info!(
        "governor {} started on {host}: {seeded} processes, {} services configured, {} with restart history, audit head {}",
        env!("CARGO_PKG_VERSION"),
        d.config.services.len(),
        d.velocity.services.len(),
        started.map(|h| h.to_string()).unwrap_or_default()
    );
    d.alert(
        Severity::Warning,
        "daemon started",
        None,
        format!("governor started on {host}"),
        format!(
            "layers: {}; audit head {}",
            d.layers.join(", "),
            d.head_str()
        ),
    );

    // Instances that started while governor was not watching.
    d.uptime_at_start();
    // An engaged kill switch holds again before anyone can ask anything.
    d.reapply_killswitch();
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Incoming>(16);
    let socket = control::serve(&d.config.daemon.socket, ctl_tx.clone())?;
    log::info!("control socket {}", socket.display());
    let mcp_socket = match &d.config.mcp.socket {
        Some(path) => {
            let gid = d
                .config
                .mcp
                .group
                .as_ref()
                .and_then(|g| crate::users::gid_of(g.get_ref()));
            let p = control::serve_mcp(path, gid, ctl_tx.clone())?;
            log::info!(
                "MCP socket {} (group {})",
                p.display(),
                d.config
                    .mcp
                    .group
                    .as_ref()
                    .map(|g| g.get_ref().as_str())
                    .unwrap_or("root only")
            );
            Some(p)
        }
        None => None,
    };
    if let Some(addr) = d.config.metrics.addr() {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("metrics.listen = {addr}: cannot listen"))?;
        log::info!("metrics on http://{addr}/metrics");
        let tx = ctl_tx.clone();
        // Anyone on the host can reach loopback: a snapshot is built at
        // most once a second however often it is scraped.
        let cache: Arc<tokio::sync::Mutex<Option<(tokio::time::Instant, Value)>>> = Arc::default();
        tokio::spawn(async move {
            let fetch = move || {
                let (tx, cache) = (tx.clone(), cache.clone());
                async move {
                    let mut c = cache.lock().await;
                    if let Some((at, v)) = c.as_ref() {
                        if at.elapsed() < Duration::from_secs(1) {
                            return Ok(v.clone());
                        }
                    }
                    let v = control::ask_loop(&tx, Request::Metrics).await?;
                    *c = Some((tokio::time::Instant::now(), v.clone()));
                    Ok(v)
                }
            };
            if let Err(e) = governor_metrics::serve(listener, fetch).await {
                log::error!("metrics server stopped: {e:#}");
            }
        });
    }
    // systemd (Type=notify): ready once the programs are loaded, the flags
    // applied and the socket answers; then the watchdog is fed from this
    // loop, so a wedged loop gets the daemon restarted.
    let mut watchdog = crate::notify::Watchdog::from_env();
    crate::notify::ready(&socket);
    let test_hooks = std::env::var_os("GOVERNOR_TEST_HOOKS").is_some();
    let mut usr1 = signal(SignalKind::user_defined1())?;

    let mut logs = probes.take_log_forwarder();
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // Exec and fork records are queued without waking us (every exit
    // does, with them); this keeps the process table at most 500 ms behind
    // a process that started and hasn't died. Deaths are never delayed.
    // (100 ms doubled the daemon's idle CPU to 0.2% of a core.)
    let mut drain = tokio::time::interval(Duration::from_millis(500));
    drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // While the kill switch is engaged, a held service's new process must
    // die within ~50 ms of its exec even when nothing wakes us (a helper's
    // exec, a cron job's): the queue is read every 20 ms then.
    let mut drain_held = tokio::time::interval(Duration::from_millis(20));
    drain_held.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_drops = 0;
    let mut state_writer = StateWriter::spawn(&state_dir, d.effects.clone())?;
    let fx = d.effects.clone();
    let mut memory_file = StateFile::spawn(state_dir.join("memory.json"), move |p, e| {
        fx.submit(Effect::alert_only(Alert::new(
            Severity::Critical,
            "state",
            format!("cannot save the memory baselines to {}: {e:#}", p.display()),
        )));
    })?;
    // Memory pressure wakes the floor check at once; without it the 1 s
    // tick still does.
    let mut psi = crate::psi::PsiTrigger::arm(crate::psi::STALL_US, crate::psi::WINDOW_US)
        .map_err(|e| format!("{e:#}"));
    if let Err(e) = &psi {
        log::warn!("memory pressure trigger not armed ({e}); the floor is checked every second");
    }
    d.psi_problem = psi.as_ref().err().cloned();
    let stop_reason;
    loop {
        let mem_deadline = tokio::time::Instant::now()
            + Duration::from_nanos(d.memory_due().saturating_sub(monotonic_ns()));
        tokio::select! {
            r = probes.next_batch(|ev| d.on_event(ev), |e| log::warn!("bad event record: {e:#}")) => {
                r?;
                probes.sync_supervisors(&mut d.table);
                d.carry_out().await;
            }
            _ = logs.forward() => {}
            w = protector.wait() => protector.handle(w).await,
            _ = drain.tick() => {
                probes.drain(|ev| d.on_event(ev));
                probes.sync_supervisors(&mut d.table);
                d.carry_out().await;
            }
            _ = drain_held.tick(), if d.killswitch.engaged.is_some() => {
                probes.drain(|ev| d.on_event(ev));
                probes.sync_supervisors(&mut d.table);
                d.carry_out().await;
            }
            Some(s) = side_rx.recv() => d.on_side(s),
            Some(inc) = ctl_rx.recv() => {
                // The caller's own exec may still be queued in the ring:
                // requests are judged on a current table.
                probes.drain(|ev| d.on_event(ev));
                probes.sync_supervisors(&mut d.table);
                d.carry_out().await;
                d.on_request(inc, &mut protector).await
            }
            _ = hup.recv() => {
                match d.reload() {
                    Ok(hash) => {
                        log::info!("config reloaded from {}", d.config_path.display());
                        let protect = if std::mem::take(&mut d.reload_protect) {
                            let r = protector.reload(&d.config.protect).await;
                            crate::layout::release_object_pages();
                            report_protection(&r, &d.effects);
                            Some(r)
                        } else {
                            None
                        };
                        d.audit("config.reloaded", None, json!({"config_hash": hash, "path": d.config_path.display().to_string(), "protect": protect})).await;
                    }
                    Err(e) => {
                        log::error!("config reload rejected, keeping the old config: {e}");
                        d.audit("config.rejected", None, json!({"error": e, "path": d.config_path.display().to_string(), "kept_config_hash": d.config_hash})).await;
                        d.alert(Severity::Warning, "config rejected", None, "config reload rejected; old config kept".into(), e);
                    }
                }
            }
            _ = tokio::time::sleep_until(mem_deadline) => d.sample_memory(),
            crossed = async {
                match mem_ring.as_mut() {
                    Some(r) => r.next().await,
                    None => std::future::pending().await,
                }
            } => d.on_crossings(crossed),
            _ = async {
                match psi.as_mut() {
                    Ok(t) => t.fired().await,
                    Err(_) => std::future::pending().await,
                }
            } => d.floor_check(monotonic_ns()),
            _ = watchdog.tick() => watchdog.ping(),
            _ = usr1.recv() => {
                if test_hooks {
                    // Test hook (GOVERNOR_TEST_HOOKS): wedge the loop, as a
                    // bug would, so the watchdog test sees pings stop.
                    log::warn!("test hook: blocking the event loop for 5 s");
                    std::thread::sleep(Duration::from_secs(5));
                }
            }
            _ = term.recv() => { stop_reason = "SIGTERM"; break; }
            _ = int.recv() => { stop_reason = "SIGINT"; break; }
            _ = tick.tick() => {
                d.killswitch_timeouts();
                let now = monotonic_ns();
                let live: HashMap<String, Vec<Live>> = d
                    .velocity
                    .services
                    .keys()
                    .map(|n| (n.clone(), d.live(n)))
                    .collect();
                d.floor_check(now);
                let out = d.velocity.tick(now, |n| live.get(n).cloned().unwrap_or_default());
                for dec in out {
                    d.decisions.push((dec, now));
                }
                d.carry_out().await;
                if std::mem::take(&mut d.velocity_dirty) {
                    state_writer.save(&d.velocity);
                }
                if std::mem::take(&mut d.memory.dirty) {
                    match serde_json::to_vec(&d.memory) {
                        Ok(b) => memory_file.save(b),
                        Err(e) => log::error!("serialising memory baselines: {e}"),
                    }
                }
                let drops = probes.dropped()?;
                d.lifecycle_lost = drops;
                if drops > last_drops {
                    let lost = drops - last_drops;
                    last_drops = drops;
                    // What is still queued first, then the table against
                    // /proc: a lost exit would leave a ghost forever.
                    probes.drain(|ev| d.on_event(ev));
                    let (gone, added) = d.table.reconcile_with_proc();
                    probes.sync_supervisors(&mut d.table);
                    if let Ok(mut m) = d.services_by_pid.write() {
                        *m = d.table.iter().map(|p| (p.pid, p.service.clone())).collect();
                    }
                    let services: std::collections::BTreeSet<&str> =
                        gone.iter().map(|p| p.service.as_str()).collect();
                    log::warn!("{lost} lifecycle events lost (ring full), {drops} in all; swept {} dead, {added} new", gone.len());
                    d.audit("events.lost", None, json!({"lost": lost, "total": drops, "swept_dead": gone.len(), "swept_new": added, "services": services})).await;
                    d.alert(
                        Severity::Warning,
                        "events lost",
                        None,
                        format!("{lost} kernel lifecycle events lost"),
                        format!(
                            "the ring was full; the process table was re-read from /proc: {} dead process(es) removed, {added} added; restarts in that gap are not counted",
                            gone.len()
                        ),
                    );
                }
            }
        }
    }
    log::info!("governor stopping ({stop_reason})");
    crate::notify::stopping();
    state_writer.finish(&d.velocity);
    if let Ok(b) = serde_json::to_vec(&d.memory) {
        memory_file.save(b);
    }
    memory_file.finish();
    d.killswitch_file.finish();
    d.uptime.finish();
    d.audit("daemon.stopped", None, json!({"reason": stop_reason}))
        .await;
    if let Some(t) = &d.telegram {
        let r = t.shutdown(Duration::from_secs(3));
        log::info!("alerts: {:?}", r.stats);
    }
    while let Ok(s) = side_rx.try_recv() {
        if let Side::Delivery(_) = s {
            d.on_side(s);
        }
    }
    // Delivery entries queued just now are durable before the log closes.
    d.effects.flush().await;
    d.audit.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    if let Some(p) = mcp_socket {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}
