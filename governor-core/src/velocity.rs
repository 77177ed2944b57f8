//! Restart velocity: the pure policy that turns process deaths into
//! crash-loop decisions. No I/O here — the daemon feeds it kernel events and
//! ticks and carries out what it returns — so every rule is unit-tested
//! without root.
//!
//! Rules (documented in the README):
//! - Every death of a service instance counts as a restart, whatever its
//!   uptime: an uptime gate (pm2's `min_uptime`) is exactly the blind spot
//!   this exists for. For unmanaged processes grouped only by fingerprint,
//!   only failed deaths (non-zero status or a signal) count, so a cron job
//!   that exits 0 every minute is not a crash loop.
//! - Deaths the governor planned (its own restarts) or that fall inside a
//!   deploy's grace period are shown but not counted.
//! - More than `max_restarts` counted restarts inside `window` is a crash
//!   loop. It ends when an instance has run `stable_after` with no death
//!   (like Kubernetes resetting CrashLoopBackOff after 10 clean minutes), or
//!   when the service has been quiet — no death and nothing running — for
//!   `window + stable_after`.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::limits::{CrashLoopAction, Limits};

/// How a service's instances are supervised: where `stop` and the
/// supervisor's own view come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Supervisor {
    Pm2 {
        name: String,
        pm_id: Option<u32>,
        /// pid of pm2's verified God daemon (the instance's parent).
        god_pid: u32,
        /// The God's owner (kernel uid): pm2 commands run as this user.
        #[serde(default)]
        god_uid: u32,
        /// The God daemon's `lib/Daemon.js`, which locates pm2's CLI.
        #[serde(default)]
        daemon_js: Option<String>,
    },
    Systemd {
        unit: String,
    },
    #[default]
    None,
}

/// One death of a service instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Death {
    /// CLOCK_MONOTONIC ns of the exit.
    pub ts_ns: u64,
    pub pid: u32,
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub uptime_ns: u64,
    /// Planned (deploy, or a restart the governor made): shown, not counted.
    pub planned: bool,
}

impl Death {
    pub fn failed(&self) -> bool {
        self.code != Some(0)
    }
}

/// A crash-loop episode in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Episode {
    pub started_ns: u64,
    /// Counted deaths since the loop was entered.
    pub crashes_since: u32,
    pub stop_issued: bool,
    /// Stops issued in this episode (a failed one is retried at the next
    /// crash, up to [`STOP_ATTEMPTS`]).
    #[serde(default)]
    pub stop_attempts: u32,
}

/// Stops tried per crash-loop episode: a supervisor that fails (wedged,
/// killed, timing out) gets this many chances, one per further crash.
pub const STOP_ATTEMPTS: u32 = 3;

/// What the policy decided; the daemon audits, alerts and acts on each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    EnteredCrashLoop {
        service: String,
        restarts: u32,
        max_restarts: u32,
        window_s: u64,
        last: Death,
        supervisor: Supervisor,
    },
    /// Another crash inside an episode (alerts group these into reminders).
    StillCrashing {
        service: String,
        restarts: u32,
        crashes_since: u32,
        last: Death,
    },
    /// `crash_loop_action = "stop"` and `stop_after` more crashes happened.
    Stop {
        service: String,
        supervisor: Supervisor,
        crashes_since: u32,
    },
    Recovered {
        service: String,
        /// Clean uptime that ended the loop, or 0 when it went quiet.
        clean_uptime_ns: u64,
        episode_ns: u64,
        quiet: bool,
    },
}

/// The state of a service, as `governor status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Stable,
    Restarting,
    CrashLoop,
    Down,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Stable => "stable",
            State::Restarting => "restarting",
            State::CrashLoop => "crash-loop",
            State::Down => "down",
        }
    }
}

/// Per-service restart history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Track {
    pub configured: bool,
    /// Counts only failed deaths (unmanaged fingerprints).
    pub failures_only: bool,
    pub supervisor: Supervisor,
    /// Deaths inside the window (planned ones too), oldest first.
    pub deaths: VecDeque<Death>,
    pub last_exit: Option<Death>,
    pub episode: Option<Episode>,
    /// ns of the last counted death.
    pub last_crash_ns: Option<u64>,
    /// Longest uptime of an instance since the last counted death.
    pub longest_clean_ns: u64,
    /// Deaths before this instant are planned (a deploy's grace).
    pub planned_until_ns: u64,
    /// Restarts the governor itself is about to cause.
    pub expected_planned: u32,
    /// Counted restarts since tracking began (kept across daemon
    /// restarts): the counter `/metrics` exports.
    #[serde(default)]
    pub restarts_total: u64,
    #[serde(skip)]
    pub limits: Option<Limits>,
}

/// Identity of a dying or starting instance, from the process table.
#[derive(Debug, Clone)]
pub struct InstanceInfo {
    pub service: String,
    pub configured: bool,
    pub supervisor: Supervisor,
    pub limits: Limits,
}

/// A live instance, for tick and status.
#[derive(Debug, Clone, Copy)]
pub struct Live {
    pub pid: u32,
    pub start_ns: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Velocity {
    pub services: BTreeMap<String, Track>,
    /// Unconfigured services forgotten to stay within `cap`, in all.
    #[serde(default)]
    pub evicted: u64,
    /// Most unconfigured services with history (`daemon.max_unconfigured_services`).
    #[serde(skip, default = "default_cap")]
    pub cap: usize,
}

fn default_cap() -> usize {
    1024
}

impl Default for Velocity {
    fn default() -> Self {
        Velocity {
            services: BTreeMap::new(),
            evicted: 0,
            cap: default_cap(),
        }
    }
}

/// One row of `governor status`.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub state: State,
    pub configured: bool,
    pub restarts_in_window: u32,
    /// Counted restarts since governor began tracking the service.
    pub restarts_total: u64,
    pub planned_in_window: u32,
    pub window_s: u64,
    pub max_restarts: u32,
    /// Counted restarts per minute over the last five minutes.
    pub rate_per_min: f64,
    pub pids: Vec<u32>,
    /// Uptime of the oldest live instance.
    pub uptime_ms: Option<u64>,
    pub longest_clean_uptime_ms: u64,
    pub last_exit: Option<LastExit>,
    pub supervisor: Supervisor,
    pub crash_loop_since_ms_ago: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LastExit {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub uptime_ms: u64,
    pub ago_ms: u64,
    pub planned: bool,
}

const NS: u64 = 1_000_000_000;

impl Track {
    fn new(info: &InstanceInfo) -> Self {
        Track {
            configured: info.configured,
            failures_only: !info.configured && info.supervisor == Supervisor::None,
            supervisor: info.supervisor.clone(),
            // Most tracks (one failed command line) hold one death: no
            // room for four until a second comes.
            deaths: VecDeque::with_capacity(1),
            last_exit: None,
            episode: None,
            last_crash_ns: None,
            longest_clean_ns: 0,
            planned_until_ns: 0,
            expected_planned: 0,
            restarts_total: 0,
            limits: Some(info.limits),
        }
    }

    fn counted(&self, d: &Death) -> bool {
        !d.planned && (!self.failures_only || d.failed())
    }

    fn prune(&mut self, now_ns: u64, window_ns: u64) {
        while self
            .deaths
            .front()
            .is_some_and(|d| now_ns.saturating_sub(d.ts_ns) > window_ns)
        {
            self.deaths.pop_front();
        }
    }

    /// Counted restarts inside the window ending at `now_ns`.
    pub fn restarts(&self, now_ns: u64, window_ns: u64) -> u32 {
        self.deaths
            .iter()
            .filter(|d| now_ns.saturating_sub(d.ts_ns) <= window_ns && self.counted(d))
            .count() as u32
    }
}

impl Velocity {
    /// Updates the limits and identity of a service (config reloads, and
    /// history loaded from the state file, which doesn't store limits).
    pub fn refresh(&mut self, info: &InstanceInfo) {
        if let Some(t) = self.services.get_mut(&info.service) {
            t.limits = Some(info.limits);
            t.configured = info.configured;
            if info.supervisor != Supervisor::None {
                t.supervisor = info.supervisor.clone();
            }
        }
    }

    /// Tell the policy the next `n` deaths of `service` are the governor's own.
    pub fn expect_planned(&mut self, info: &InstanceInfo, n: u32) {
        if !info.configured && !self.services.contains_key(&info.service) {
            // The newest track: nothing sorts after "now".
            self.make_room(u64::MAX);
        }
        let t = self
            .services
            .entry(info.service.clone())
            .or_insert_with(|| Track::new(info));
        t.expected_planned += n;
    }

    /// A deploy: deaths in the next `grace` are planned.
    pub fn deploy(&mut self, info: &InstanceInfo, now_ns: u64, grace_ns: u64) {
        if !info.configured && !self.services.contains_key(&info.service) {
            self.make_room(now_ns);
        }
        let t = self
            .services
            .entry(info.service.clone())
            .or_insert_with(|| Track::new(info));
        t.planned_until_ns = now_ns + grace_ns;
    }

    /// A death of an instance of `info.service`.
    pub fn on_death(&mut self, info: &InstanceInfo, mut d: Death) -> Vec<Decision> {
        let limits = info.limits;
        let window_ns = limits.window.as_nanos() as u64;
        // Unmanaged clean exits are ordinary (cron, scripts): don't even
        // start tracking a fingerprint for them.
        let unmanaged = !info.configured && info.supervisor == Supervisor::None;
        if unmanaged && !d.failed() && !self.services.contains_key(&info.service) {
            return Vec::new();
        }
        if !info.configured && !self.services.contains_key(&info.service) {
            self.make_room(d.ts_ns);
        }
        let t = self
            .services
            .entry(info.service.clone())
            .or_insert_with(|| Track::new(info));
        t.limits = Some(limits);
        if info.supervisor != Supervisor::None {
            t.supervisor = info.supervisor.clone();
        }
        if t.expected_planned > 0 {
            t.expected_planned -= 1;
            d.planned = true;
        }
        if d.ts_ns < t.planned_until_ns {
            d.planned = true;
        }
        t.prune(d.ts_ns, window_ns);
        t.deaths.push_back(d.clone());
        t.last_exit = Some(d.clone());
        let counted = t.counted(&d);
        if !counted {
            t.longest_clean_ns = t.longest_clean_ns.max(d.uptime_ns);
            return Vec::new();
        }
        t.last_crash_ns = Some(d.ts_ns);
        t.longest_clean_ns = 0;
        t.restarts_total += 1;
        let restarts = t.restarts(d.ts_ns, window_ns);
        let mut out = Vec::new();
        match &mut t.episode {
            None if restarts > limits.max_restarts => {
                t.episode = Some(Episode {
                    started_ns: d.ts_ns,
                    crashes_since: 0,
                    stop_issued: false,
                    stop_attempts: 0,
                });
                out.push(Decision::EnteredCrashLoop {
                    service: info.service.clone(),
                    restarts,
                    max_restarts: limits.max_restarts,
                    window_s: limits.window.as_secs(),
                    last: d,
                    supervisor: t.supervisor.clone(),
                });
            }
            None => {}
            Some(ep) => {
                ep.crashes_since += 1;
                out.push(Decision::StillCrashing {
                    service: info.service.clone(),
                    restarts,
                    crashes_since: ep.crashes_since,
                    last: d,
                });
                // Actions only for what the operator declared: an
                // unconfigured service (another user's pm2 app, a command
                // line) gets alerts, never a stop.
                if limits.action == CrashLoopAction::Stop
                    && t.configured
                    && !ep.stop_issued
                    && ep.stop_attempts < STOP_ATTEMPTS
                    && ep.crashes_since >= limits.stop_after
                    && t.supervisor != Supervisor::None
                {
                    ep.stop_issued = true;
                    ep.stop_attempts += 1;
                    out.push(Decision::Stop {
                        service: info.service.clone(),
                        supervisor: t.supervisor.clone(),
                        crashes_since: ep.crashes_since,
                    });
                }
            }
        }
        out
    }

    /// A stop failed (the supervisor timed out, was gone or refused): the
    /// next crash of the same episode issues it again, up to
    /// [`STOP_ATTEMPTS`] per episode. Returns the attempts made so far, or
    /// `None` when no episode is in progress.
    pub fn stop_failed(&mut self, service: &str) -> Option<u32> {
        let ep = self.services.get_mut(service)?.episode.as_mut()?;
        ep.stop_issued = false;
        Some(ep.stop_attempts)
    }

    /// Unconfigured services with history, now.
    pub fn unconfigured(&self) -> usize {
        self.services.values().filter(|t| !t.configured).count()
    }

    /// Keeps unconfigured services below the cap before one more is added:
    /// the least recently seen (last death) goes, and is counted. Configured
    /// services are never evicted.
    fn make_room(&mut self, now_ns: u64) {
        while self.unconfigured() >= self.cap.max(1) {
            let oldest = self
                .services
                .iter()
                .filter(|(_, t)| !t.configured)
                .min_by_key(|(_, t)| t.last_exit.as_ref().map(|d| d.ts_ns).unwrap_or(now_ns))
                .map(|(n, _)| n.clone());
            match oldest {
                Some(n) => {
                    self.services.remove(&n);
                    self.evicted += 1;
                }
                None => break,
            }
        }
    }

    /// Periodic evaluation: ends episodes, forgets old history.
    /// `live(service)` lists the live instances of a service.
    pub fn tick(&mut self, now_ns: u64, live: impl Fn(&str) -> Vec<Live>) -> Vec<Decision> {
        let mut out = Vec::new();
        let mut forget = Vec::new();
        for (name, t) in self.services.iter_mut() {
            let Some(limits) = t.limits else { continue };
            let window_ns = limits.window.as_nanos() as u64;
            let stable_ns = limits.stable_after.as_nanos() as u64;
            t.prune(now_ns, window_ns);
            let instances = live(name);
            let since_crash = t.last_crash_ns.unwrap_or(0);
            // Longest current clean run: instances started after the last crash.
            let clean = instances
                .iter()
                .filter(|l| l.start_ns >= since_crash)
                .map(|l| now_ns.saturating_sub(l.start_ns))
                .max()
                .unwrap_or(0);
            t.longest_clean_ns = t.longest_clean_ns.max(clean);
            if let Some(ep) = &t.episode {
                let quiet = instances.is_empty()
                    && now_ns.saturating_sub(since_crash) >= window_ns + stable_ns;
                if clean >= stable_ns || quiet {
                    out.push(Decision::Recovered {
                        service: name.clone(),
                        clean_uptime_ns: if quiet { 0 } else { clean },
                        episode_ns: now_ns.saturating_sub(ep.started_ns),
                        quiet,
                    });
                    t.episode = None;
                }
            }
            if t.episode.is_none()
                && t.deaths.is_empty()
                && !t.configured
                && t.expected_planned == 0
                && t.planned_until_ns <= now_ns
                && instances.is_empty()
            {
                forget.push(name.clone());
            }
        }
        for n in forget {
            self.services.remove(&n);
        }
        out
    }

    /// Status of one service (it need not have history).
    pub fn status(
        &self,
        name: &str,
        limits: &Limits,
        configured: bool,
        supervisor: &Supervisor,
        live: &[Live],
        now_ns: u64,
    ) -> ServiceStatus {
        let window_ns = limits.window.as_nanos() as u64;
        let t = self.services.get(name);
        let restarts = t.map(|t| t.restarts(now_ns, window_ns)).unwrap_or(0);
        let planned = t
            .map(|t| {
                t.deaths
                    .iter()
                    .filter(|d| d.planned && now_ns.saturating_sub(d.ts_ns) <= window_ns)
                    .count() as u32
            })
            .unwrap_or(0);
        let recent = t
            .map(|t| t.restarts(now_ns, (5 * 60 * NS).min(window_ns)))
            .unwrap_or(0);
        let rate_window_min =
            ((5 * 60 * NS).min(window_ns) as f64 / (60 * NS) as f64).max(1.0 / 60.0);
        let in_loop = t.and_then(|t| t.episode.as_ref());
        let state = if in_loop.is_some() {
            State::CrashLoop
        } else if live.is_empty() && configured {
            // Only a service that should be running can be "down"; an
            // unmanaged command that failed and isn't running is just over.
            State::Down
        } else if restarts > 0 {
            State::Restarting
        } else {
            State::Stable
        };
        let mut pids: Vec<u32> = live.iter().map(|l| l.pid).collect();
        pids.sort_unstable();
        let clean_now = live
            .iter()
            .filter(|l| l.start_ns >= t.and_then(|t| t.last_crash_ns).unwrap_or(0))
            .map(|l| now_ns.saturating_sub(l.start_ns))
            .max()
            .unwrap_or(0);
        ServiceStatus {
            name: name.to_string(),
            state,
            configured,
            restarts_in_window: restarts,
            restarts_total: t.map(|t| t.restarts_total).unwrap_or(0),
            planned_in_window: planned,
            window_s: limits.window.as_secs(),
            max_restarts: limits.max_restarts,
            rate_per_min: recent as f64 / rate_window_min,
            pids,
            uptime_ms: live
                .iter()
                .map(|l| now_ns.saturating_sub(l.start_ns) / 1_000_000)
                .max(),
            longest_clean_uptime_ms: t.map(|t| t.longest_clean_ns).unwrap_or(0).max(clean_now)
                / 1_000_000,
            last_exit: t.and_then(|t| t.last_exit.as_ref()).map(|d| LastExit {
                code: d.code,
                signal: d.signal,
                uptime_ms: d.uptime_ns / 1_000_000,
                ago_ms: now_ns.saturating_sub(d.ts_ns) / 1_000_000,
                planned: d.planned,
            }),
            supervisor: t
                .map(|t| t.supervisor.clone())
                .filter(|s| *s != Supervisor::None)
                .unwrap_or_else(|| supervisor.clone()),
            crash_loop_since_ms_ago: in_loop
                .map(|e| now_ns.saturating_sub(e.started_ns) / 1_000_000),
        }
    }
}

/// The restart history as persisted in `<state_dir>/velocity.json`, with
/// monotonic times turned into wall-clock ones (monotonic time restarts at
/// boot; wall-clock time doesn't).
#[derive(Debug, Serialize, Deserialize)]
pub struct Persisted {
    pub version: u32,
    /// Wall-clock ns at which `mono_ns` was sampled.
    pub wall_ns: i128,
    pub mono_ns: u64,
    pub velocity: Velocity,
}

/// What is written of a [`Velocity`], borrowed (no copy of the history is
/// made to save it) and without the noise: an unconfigured, unsupervised
/// command line that failed once is not worth a byte on disk (status
/// doesn't list it either), so a flood of distinct failures costs nothing
/// there. Reads back as a [`Persisted`].
#[derive(Debug, Serialize)]
pub struct PersistedView<'a> {
    pub version: u32,
    pub wall_ns: i128,
    pub mono_ns: u64,
    pub velocity: VelocityView<'a>,
}

#[derive(Debug, Serialize)]
pub struct VelocityView<'a> {
    pub services: BTreeMap<&'a str, &'a Track>,
    pub evicted: u64,
}

impl<'a> VelocityView<'a> {
    pub fn of(v: &'a Velocity) -> Self {
        VelocityView {
            services: v
                .services
                .iter()
                .filter(|(_, t)| {
                    t.configured
                        || t.supervisor != Supervisor::None
                        || t.episode.is_some()
                        || t.deaths.len() >= 2
                        || t.planned_until_ns != 0
                        || t.expected_planned != 0
                })
                .map(|(n, t)| (n.as_str(), t))
                .collect(),
            evicted: v.evicted,
        }
    }
}

impl Persisted {
    pub fn view(v: &Velocity, wall_ns: i128, mono_ns: u64) -> PersistedView<'_> {
        PersistedView {
            version: 1,
            wall_ns,
            mono_ns,
            velocity: VelocityView::of(v),
        }
    }

    pub fn new(v: &Velocity, wall_ns: i128, mono_ns: u64) -> Self {
        Persisted {
            version: 1,
            wall_ns,
            mono_ns,
            velocity: v.clone(),
        }
    }

    /// Re-bases the saved monotonic times onto this boot's clock.
    pub fn into_velocity(self, wall_now_ns: i128, mono_now_ns: u64) -> Velocity {
        // A saved mono time m happened at wall time wall_ns + (m - mono_ns);
        // in today's monotonic clock that's mono_now - (wall_now - that).
        let shift = |m: u64| -> u64 {
            let wall_then = self.wall_ns + (m as i128 - self.mono_ns as i128);
            let mono = mono_now_ns as i128 - (wall_now_ns - wall_then);
            mono.max(0) as u64
        };
        let mut v = self.velocity;
        for t in v.services.values_mut() {
            for d in t.deaths.iter_mut() {
                d.ts_ns = shift(d.ts_ns);
            }
            if let Some(d) = t.last_exit.as_mut() {
                d.ts_ns = shift(d.ts_ns);
            }
            if let Some(e) = t.episode.as_mut() {
                e.started_ns = shift(e.started_ns);
            }
            t.last_crash_ns = t.last_crash_ns.map(shift);
            t.planned_until_ns = if t.planned_until_ns == 0 {
                0
            } else {
                shift(t.planned_until_ns)
            };
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limits(max: u32) -> Limits {
        Limits {
            window: Duration::from_secs(600),
            max_restarts: max,
            memory_ceiling: 200 << 20,
            stable_after: Duration::from_secs(600),
            action: CrashLoopAction::Alert,
            stop_after: 3,
            critical: false,
        }
    }

    fn pm2(name: &str, max: u32) -> InstanceInfo {
        InstanceInfo {
            service: name.into(),
            configured: true,
            supervisor: Supervisor::Pm2 {
                name: name.into(),
                pm_id: Some(0),
                god_pid: 1,
                god_uid: 0,
                daemon_js: None,
            },
            limits: limits(max),
        }
    }

    fn death(s: u64, code: i32, up_ms: u64) -> Death {
        Death {
            ts_ns: s * NS,
            pid: 100 + s as u32,
            code: Some(code),
            signal: None,
            uptime_ns: up_ms * 1_000_000,
            planned: false,
        }
    }

    #[test]
    fn crossing_the_threshold_enters_once_then_reminds() {
        let mut v = Velocity::default();
        let info = pm2("lily", 2);
        // 1.5 s uptimes: pm2's min_uptime would call these stable.
        assert!(v.on_death(&info, death(10, 1, 1500)).is_empty());
        assert!(v.on_death(&info, death(12, 1, 1500)).is_empty());
        let d = v.on_death(&info, death(14, 1, 1500));
        assert!(
            matches!(
                &d[..],
                [Decision::EnteredCrashLoop {
                    restarts: 3,
                    max_restarts: 2,
                    ..
                }]
            ),
            "{d:?}"
        );
        let d = v.on_death(&info, death(16, 1, 1500));
        assert!(
            matches!(
                &d[..],
                [Decision::StillCrashing {
                    restarts: 4,
                    crashes_since: 1,
                    ..
                }]
            ),
            "{d:?}"
        );
        let s = v.status("lily", &info.limits, true, &info.supervisor, &[], 17 * NS);
        assert_eq!(s.state, State::CrashLoop);
        assert_eq!(s.restarts_in_window, 4);
    }

    #[test]
    fn clean_exits_count_for_services_not_for_unmanaged() {
        let mut v = Velocity::default();
        let info = pm2("api", 1);
        v.on_death(&info, death(1, 0, 5000));
        let d = v.on_death(&info, death(2, 0, 5000));
        assert!(
            matches!(&d[..], [Decision::EnteredCrashLoop { .. }]),
            "exit 0 counts: {d:?}"
        );
        let fp = InstanceInfo {
            service: "fp:true-1234".into(),
            configured: false,
            supervisor: Supervisor::None,
            limits: limits(1),
        };
        for s in 0..10 {
            assert!(v.on_death(&fp, death(s, 0, 1)).is_empty());
        }
        assert!(
            !v.services.contains_key("fp:true-1234"),
            "clean unmanaged exits are not tracked"
        );
        v.on_death(&fp, death(20, 2, 1));
        let d = v.on_death(&fp, death(21, 2, 1));
        assert!(
            matches!(&d[..], [Decision::EnteredCrashLoop { .. }]),
            "{d:?}"
        );
    }

    #[test]
    fn window_slides() {
        let mut v = Velocity::default();
        let info = pm2("slow", 2);
        for s in [0, 300, 700, 1000] {
            assert!(v.on_death(&info, death(s, 1, 100)).is_empty(), "at {s}");
        }
        assert_eq!(v.services["slow"].restarts(1000 * NS, 600 * NS), 2);
    }

    #[test]
    fn planned_deaths_do_not_count() {
        let mut v = Velocity::default();
        let info = pm2("web", 1);
        v.deploy(&info, 100 * NS, 60 * NS);
        for s in 101..110 {
            assert!(v.on_death(&info, death(s, 1, 100)).is_empty());
        }
        let s = v.status("web", &info.limits, true, &info.supervisor, &[], 110 * NS);
        assert_eq!((s.restarts_in_window, s.planned_in_window), (0, 9));
        v.expect_planned(&info, 1);
        assert!(v.on_death(&info, death(200, 0, 100)).is_empty());
        v.on_death(&info, death(201, 1, 100));
        let d = v.on_death(&info, death(202, 1, 100));
        assert!(
            matches!(&d[..], [Decision::EnteredCrashLoop { restarts: 2, .. }]),
            "{d:?}"
        );
    }

    #[test]
    fn stop_action_after_n_more_crashes() {
        let mut v = Velocity::default();
        let mut info = pm2("bot", 1);
        info.limits.action = CrashLoopAction::Stop;
        info.limits.stop_after = 2;
        v.on_death(&info, death(1, 1, 10));
        v.on_death(&info, death(2, 1, 10));
        assert!(v.on_death(&info, death(3, 1, 10)).len() == 1);
        let d = v.on_death(&info, death(4, 1, 10));
        assert!(
            d.iter().any(|x| matches!(
                x,
                Decision::Stop {
                    crashes_since: 2,
                    ..
                }
            )),
            "{d:?}"
        );
        let d = v.on_death(&info, death(5, 1, 10));
        assert!(
            !d.iter().any(|x| matches!(x, Decision::Stop { .. })),
            "stop only once"
        );
    }

    #[test]
    fn a_failed_stop_is_retried_at_the_next_crash_up_to_the_limit() {
        let mut v = Velocity::default();
        let mut info = pm2("bot", 1);
        info.limits.action = CrashLoopAction::Stop;
        info.limits.stop_after = 1;
        let stops = |d: &[Decision]| {
            d.iter()
                .filter(|x| matches!(x, Decision::Stop { .. }))
                .count()
        };
        let mut issued = 0;
        for s in 1..40 {
            let d = v.on_death(&info, death(s, 1, 10));
            if stops(&d) == 1 {
                issued += 1;
                // The supervisor timed out: retried at the next crash.
                assert_eq!(v.stop_failed("bot"), Some(issued));
            }
        }
        assert_eq!(
            issued, STOP_ATTEMPTS,
            "retried until the limit, then no more"
        );
        // No episode: nothing to retry.
        assert_eq!(v.stop_failed("web"), None);
    }

    #[test]
    fn no_action_for_unconfigured_services() {
        let mut v = Velocity::default();
        let mut info = pm2("pm2:nobody/lily", 1);
        info.configured = false;
        info.limits.action = CrashLoopAction::Stop;
        info.limits.stop_after = 1;
        let all: Vec<Decision> = (1..10)
            .flat_map(|s| v.on_death(&info, death(s, 1, 10)))
            .collect();
        assert!(all
            .iter()
            .any(|d| matches!(d, Decision::EnteredCrashLoop { .. })));
        assert!(
            !all.iter().any(|d| matches!(d, Decision::Stop { .. })),
            "{all:?}"
        );
    }

    #[test]
    fn unconfigured_services_are_capped_least_recent_first() {
        let mut v = Velocity {
            cap: 3,
            ..Velocity::default()
        };
        let cfg = pm2("lily", 5);
        v.on_death(&cfg, death(1, 1, 10));
        for (i, s) in (2..8).enumerate() {
            let info = InstanceInfo {
                service: format!("fp:x-{i}"),
                configured: false,
                supervisor: Supervisor::None,
                limits: limits(5),
            };
            v.on_death(&info, death(s, 1, 10));
        }
        assert_eq!(v.unconfigured(), 3);
        assert_eq!(v.evicted, 3);
        // The configured one is never evicted; the newest three remain.
        assert!(v.services.contains_key("lily"));
        let kept: Vec<&String> = v.services.keys().filter(|k| k.starts_with("fp:")).collect();
        assert_eq!(kept, ["fp:x-3", "fp:x-4", "fp:x-5"]);
    }

    #[test]
    fn recovers_after_clean_uptime_or_quiet() {
        let mut v = Velocity::default();
        let info = pm2("lily", 1);
        v.on_death(&info, death(1, 1, 10));
        v.on_death(&info, death(2, 1, 10));
        assert!(v.services["lily"].episode.is_some());
        let live = |_: &str| {
            vec![Live {
                pid: 9,
                start_ns: 3 * NS,
            }]
        };
        assert!(
            v.tick(300 * NS, live).is_empty(),
            "5 clean minutes are not enough"
        );
        let d = v.tick(603 * NS, live);
        assert!(
            matches!(&d[..], [Decision::Recovered { quiet: false, .. }]),
            "{d:?}"
        );
        // Quiet: nothing running, no deaths for window + stable_after.
        v.on_death(&info, death(700, 1, 10));
        v.on_death(&info, death(701, 1, 10));
        assert!(v.tick(1000 * NS, |_| vec![]).is_empty());
        let d = v.tick(1902 * NS, |_| vec![]);
        assert!(
            matches!(&d[..], [Decision::Recovered { quiet: true, .. }]),
            "{d:?}"
        );
    }

    #[test]
    fn history_survives_a_restart_via_persistence() {
        let mut v = Velocity::default();
        let info = pm2("lily", 5);
        for s in 0..3 {
            v.on_death(&info, death(100 + s, 1, 10));
        }
        let json =
            serde_json::to_string(&Persisted::new(&v, 1_000 * NS as i128, 103 * NS)).unwrap();
        // The daemon restarts 10 s later (same boot: both clocks advanced 10 s).
        let p: Persisted = serde_json::from_str(&json).unwrap();
        let mut v2 = p.into_velocity(1_010 * NS as i128, 113 * NS);
        v2.refresh(&info);
        assert_eq!(v2.services["lily"].restarts(113 * NS, 600 * NS), 3);
        v2.on_death(&info, death(114, 1, 10));
        v2.on_death(&info, death(115, 1, 10));
        let d = v2.on_death(&info, death(116, 1, 10));
        assert!(
            matches!(&d[..], [Decision::EnteredCrashLoop { restarts: 6, .. }]),
            "{d:?}"
        );
    }
}
