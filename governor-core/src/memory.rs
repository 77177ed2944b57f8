//! Memory budgets: a ceiling per service (tiers and per-service overrides
//! resolved by the config), confirmed by a second reading before anything
//! is done; a restart through the service's supervisor for a breach, never
//! for a critical service (alerted instead); no more restarts after
//! `max_restarts` of them in the window (`memory-loop`); and drift from
//! each service's own baseline — the median of the settled RSS of its last
//! runs, so a leak never raises its own baseline.
//!
//! Pure: the daemon's edge reads `/proc/PID/statm` and hands the bytes in
//! ([`Memory::on_sample`]); this module says what to do and when to read
//! again ([`next_sample_in`]).

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

const MIB: u64 = 1 << 20;
const MS: u64 = 1_000_000;

/// Runs whose settled RSS the baseline is the median of.
pub const BASELINE_RUNS: usize = 5;

/// A service's memory limits, resolved from defaults, tier and service.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MemLimits {
    /// Bytes; 0: no ceiling.
    pub ceiling: u64,
    /// Memory restarts allowed in `window_ns` before `memory-loop`.
    pub max_restarts: u32,
    pub window_ns: u64,
    /// Alerted, never restarted.
    pub critical: bool,
    /// A run's RSS this long after its start is its settled RSS.
    pub settle_ns: u64,
    /// Drift: above max(ratio × baseline, baseline + min_bytes) for
    /// `sustain_ns`.
    pub drift_ratio: f64,
    pub drift_min_bytes: u64,
    pub drift_sustain_ns: u64,
    /// The start-up allowance: for `startup_grace_ns` after a run starts,
    /// the ceiling is `startup_allowance` × the ceiling (1.0: off).
    pub startup_allowance: f64,
    pub startup_grace_ns: u64,
}

impl MemLimits {
    /// The ceiling that applies to a run `age_ns` old (0: none).
    pub fn ceiling_at(&self, age_ns: u64) -> u64 {
        if self.ceiling > 0 && self.startup_allowance > 1.0 && age_ns < self.startup_grace_ns {
            (self.ceiling as f64 * self.startup_allowance) as u64
        } else {
            self.ceiling
        }
    }

    /// How long until the start-up allowance of a run `age_ns` old ends
    /// (`None`: no allowance in force): the ceiling drops then, so the
    /// service must be read then.
    pub fn allowance_left(&self, age_ns: u64) -> Option<u64> {
        (self.ceiling_at(age_ns) != self.ceiling).then(|| self.startup_grace_ns - age_ns)
    }

    /// How often to read a service that the kernel tracker watches (or
    /// that has no ceiling): only its settled RSS and drift need readings
    /// then. 5 s, or sooner where `memory_settle` or `drift_after` are
    /// shorter (tests use seconds).
    pub fn idle_sample_ns(&self) -> u64 {
        (5000 * MS)
            .min(self.settle_ns / 2)
            .min(self.drift_sustain_ns / 2)
            .max(100 * MS)
    }
}

/// A service's memory state, as `status` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MemState {
    #[default]
    Ok,
    Drift,
    OverCeiling,
    MemoryLoop,
}

/// What the policy decided on a reading.
#[derive(Debug, Clone, PartialEq)]
pub enum MemDecision {
    /// A confirmed reading over the ceiling (two in a row): audited and
    /// alerted; `restart` says whether a restart follows.
    OverCeiling {
        service: String,
        rss: u64,
        ceiling: u64,
        critical: bool,
        restart: bool,
    },
    /// Restart the service through its supervisor.
    Restart {
        service: String,
        rss: u64,
        ceiling: u64,
        /// Memory restarts in the window, this one included.
        restarts_in_window: u32,
    },
    /// Too many memory restarts in the window: no more, critical alert.
    Loop {
        service: String,
        restarts: u32,
        window_ns: u64,
        rss: u64,
        ceiling: u64,
    },
    /// Sustained above its own baseline (warned once per episode).
    Drift {
        service: String,
        rss: u64,
        baseline: u64,
        threshold: u64,
        for_ns: u64,
    },
    /// Back under the ceiling (after over-ceiling or a restart).
    BackUnder { service: String, rss: u64 },
}

/// One service's memory history.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MemTrack {
    /// Last reading (bytes) and when (monotonic ns).
    pub rss: u64,
    #[serde(skip)]
    pub sampled_ns: u64,
    #[serde(skip)]
    pub state: MemState,
    /// First reading over the ceiling, waiting for its confirmation.
    #[serde(skip)]
    pending_over: bool,
    /// Monotonic ns of the memory restarts still in the window.
    #[serde(skip)]
    pub restarts: VecDeque<u64>,
    /// A restart is in flight: no new decision until the instance that
    /// was over the ceiling is gone.
    #[serde(skip)]
    pub restarting: bool,
    /// Settled RSS of the last runs, oldest first (persisted).
    pub runs: VecDeque<u64>,
    /// Start of the run being watched and whether its settled RSS is in.
    #[serde(skip)]
    run_start_ns: u64,
    #[serde(skip)]
    run_settled: bool,
    #[serde(skip)]
    drift_since: Option<u64>,
    #[serde(skip)]
    drift_warned: bool,
    /// The over-ceiling alert of a critical service went out (once per
    /// episode).
    #[serde(skip)]
    critical_alerted: bool,
}

impl MemTrack {
    /// The median settled RSS of the last runs (`None` before one settled).
    pub fn baseline(&self) -> Option<u64> {
        if self.runs.is_empty() {
            return None;
        }
        let mut v: Vec<u64> = self.runs.iter().copied().collect();
        v.sort_unstable();
        Some(v[v.len() / 2])
    }

    fn restarts_in(&mut self, now: u64, window: u64) -> u32 {
        while self
            .restarts
            .front()
            .is_some_and(|&t| now.saturating_sub(t) > window)
        {
            self.restarts.pop_front();
        }
        self.restarts.len() as u32
    }
}

/// Every service's memory history, by service name.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Memory {
    pub services: BTreeMap<String, MemTrack>,
    /// A baseline changed since last taken (the daemon persists them).
    #[serde(skip)]
    pub dirty: bool,
}

/// How soon to read a service again. Waiting for a confirmation: 20 ms.
/// Watched by the kernel tracker (`tracked`: it reports the crossing of
/// `ceiling` itself), or without a ceiling: [`MemLimits::idle_sample_ns`].
/// Otherwise the closer to its ceiling, the sooner (headroom ÷ an assumed
/// 200 MiB/s growth), clamped to 100 ms–1 s.
pub fn next_sample_in(
    rss: u64,
    ceiling: u64,
    confirming: bool,
    tracked: bool,
    lim: &MemLimits,
) -> u64 {
    if confirming {
        return 20 * MS;
    }
    if ceiling == 0 || tracked {
        return lim.idle_sample_ns();
    }
    let headroom = ceiling.saturating_sub(rss);
    // bytes ÷ (200 MiB/s) in ns.
    let ns = (headroom as u128 * 1_000_000_000 / (200 * MIB) as u128) as u64;
    ns.clamp(100 * MS, 1000 * MS)
}

impl Memory {
    /// Whether `service` has a first reading over its ceiling that waits
    /// for confirmation.
    pub fn confirming(&self, service: &str) -> bool {
        self.services.get(service).is_some_and(|t| t.pending_over)
    }

    /// The service's state now.
    pub fn state(&self, service: &str) -> MemState {
        self.services
            .get(service)
            .map(|t| t.state)
            .unwrap_or_default()
    }

    /// A reading of `rss` bytes for `service`, whose oldest live instance
    /// started at `run_start_ns`, at `now`.
    pub fn on_sample(
        &mut self,
        service: &str,
        rss: u64,
        run_start_ns: u64,
        now: u64,
        lim: &MemLimits,
    ) -> Vec<MemDecision> {
        let t = self.services.entry(service.to_string()).or_default();
        let mut out = Vec::new();
        t.rss = rss;
        t.sampled_ns = now;
        // A new run (restart, or the first one seen): its settled RSS
        // counts once it has settled.
        if run_start_ns != t.run_start_ns {
            if t.restarting {
                t.restarting = false;
            }
            t.run_start_ns = run_start_ns;
            t.run_settled = false;
        }
        if !t.run_settled && now.saturating_sub(run_start_ns) >= lim.settle_ns {
            t.run_settled = true;
            // A run already over the ceiling at settling is no baseline.
            if lim.ceiling == 0 || rss <= lim.ceiling {
                t.runs.push_back(rss);
                while t.runs.len() > BASELINE_RUNS {
                    t.runs.pop_front();
                }
                self.dirty = true;
            }
        }
        let restarts = t.restarts_in(now, lim.window_ns);

        let ceiling = lim.ceiling_at(now.saturating_sub(run_start_ns));
        let over = ceiling > 0 && rss > ceiling;
        if !over {
            t.pending_over = false;
            t.critical_alerted = false;
            if matches!(t.state, MemState::OverCeiling)
                || (t.state == MemState::MemoryLoop && restarts == 0)
            {
                t.state = MemState::Ok;
                out.push(MemDecision::BackUnder {
                    service: service.to_string(),
                    rss,
                });
            }
        } else if t.restarting {
            // The restart is under way: the old instance still counts.
        } else if t.state == MemState::MemoryLoop {
            // Looping: no more restarts until the window clears.
        } else if !t.pending_over {
            // First reading over: confirm with a second one.
            t.pending_over = true;
        } else {
            t.pending_over = false;
            if lim.critical {
                t.state = MemState::OverCeiling;
                if !t.critical_alerted {
                    t.critical_alerted = true;
                    out.push(MemDecision::OverCeiling {
                        service: service.to_string(),
                        rss,
                        ceiling,
                        critical: true,
                        restart: false,
                    });
                }
            } else if restarts >= lim.max_restarts {
                t.state = MemState::MemoryLoop;
                out.push(MemDecision::Loop {
                    service: service.to_string(),
                    restarts,
                    window_ns: lim.window_ns,
                    rss,
                    ceiling,
                });
            } else {
                t.state = MemState::OverCeiling;
                t.restarting = true;
                t.restarts.push_back(now);
                out.push(MemDecision::OverCeiling {
                    service: service.to_string(),
                    rss,
                    ceiling,
                    critical: false,
                    restart: true,
                });
                out.push(MemDecision::Restart {
                    service: service.to_string(),
                    rss,
                    ceiling,
                    restarts_in_window: restarts + 1,
                });
            }
        }

        // Drift from its own baseline, below the ceiling's concerns.
        if let Some(base) = t.baseline() {
            let threshold =
                ((base as f64 * lim.drift_ratio) as u64).max(base + lim.drift_min_bytes);
            if rss > threshold {
                let since = *t.drift_since.get_or_insert(now);
                if !t.drift_warned && now.saturating_sub(since) >= lim.drift_sustain_ns {
                    t.drift_warned = true;
                    if t.state == MemState::Ok {
                        t.state = MemState::Drift;
                    }
                    out.push(MemDecision::Drift {
                        service: service.to_string(),
                        rss,
                        baseline: base,
                        threshold,
                        for_ns: now - since,
                    });
                }
            } else {
                t.drift_since = None;
                t.drift_warned = false;
                if t.state == MemState::Drift {
                    t.state = MemState::Ok;
                }
            }
        }
        out
    }

    /// The memory restarts of `service` in the window ending `now`.
    pub fn restarts_in_window(&mut self, service: &str, now: u64, window_ns: u64) -> u32 {
        self.services
            .get_mut(service)
            .map(|t| t.restarts_in(now, window_ns))
            .unwrap_or(0)
    }

    /// A restart failed: the service may be tried again on the next
    /// confirmed breach.
    pub fn restart_failed(&mut self, service: &str) {
        if let Some(t) = self.services.get_mut(service) {
            t.restarting = false;
        }
    }

    /// Forgets services that are neither configured nor running (bounded
    /// by what the config names).
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.services.retain(|n, _| keep(n));
    }
}

/// The system floor: MemAvailable below `floor` starts a flush cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FloorLimits {
    pub floor: u64,
    /// The cycle ends once MemAvailable is above floor + hysteresis.
    pub hysteresis: u64,
    /// Below this, the victim is killed (its supervisor brings it back)
    /// instead of restarted.
    pub emergency: u64,
    /// Restarts per cycle at most.
    pub flush_max: u32,
    /// Wait after each restart before reading again.
    pub cooldown_ns: u64,
}

/// A service the flush may restart, with what it would free.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub service: String,
    pub rss: u64,
    pub baseline: Option<u64>,
    /// Critical services, and what must never be touched (pm2's God,
    /// PID 1, sshd, governor), are listed with why and never chosen.
    pub never: Option<String>,
}

impl Candidate {
    /// current − baseline (all of it without a baseline yet).
    pub fn frees(&self) -> u64 {
        self.rss.saturating_sub(self.baseline.unwrap_or(0))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum FloorDecision {
    /// MemAvailable fell below the floor: a cycle starts.
    Below { available: u64, floor: u64 },
    /// Restart (or, below the emergency floor, kill) `victim`.
    Flush {
        victim: Candidate,
        kill: bool,
        available: u64,
        /// Why each other service wasn't chosen.
        passed_over: Vec<(String, String)>,
        nth: u32,
    },
    /// The cycle ended: above floor + hysteresis, or out of restarts or
    /// victims (`left`: still below).
    Done {
        available: u64,
        restarted: Vec<String>,
        left: bool,
    },
}

/// The flush cycle's state.
#[derive(Debug, Clone, Default)]
pub struct Flush {
    active: bool,
    /// After a cycle that ended below the floor: none until MemAvailable
    /// has been above the floor again.
    spent: bool,
    wait_until_ns: u64,
    /// The last victim's old instances aren't gone yet.
    victim_pending: bool,
    restarted: Vec<String>,
}

impl Flush {
    pub fn active(&self) -> bool {
        self.active
    }

    /// The last victim's old instances are gone (or were killed): the
    /// cooldown starts now.
    pub fn victim_gone(&mut self, service: &str, now: u64, fl: &FloorLimits) {
        if self.active
            && self.victim_pending
            && self.restarted.last().map(String::as_str) == Some(service)
        {
            self.victim_pending = false;
            self.wait_until_ns = now + fl.cooldown_ns;
        }
    }

    /// A MemAvailable reading.
    pub fn on_available(
        &mut self,
        available: u64,
        now: u64,
        fl: &FloorLimits,
        candidates: &[Candidate],
    ) -> Vec<FloorDecision> {
        let mut out = Vec::new();
        if !self.active {
            if available >= fl.floor {
                self.spent = false;
                return out;
            }
            if self.spent {
                return out;
            }
            self.active = true;
            self.restarted.clear();
            self.wait_until_ns = 0;
            self.victim_pending = false;
            out.push(FloorDecision::Below {
                available,
                floor: fl.floor,
            });
        }
        if self.victim_pending || now < self.wait_until_ns {
            return out;
        }
        if available >= fl.floor.saturating_add(fl.hysteresis) {
            self.active = false;
            out.push(FloorDecision::Done {
                available,
                restarted: std::mem::take(&mut self.restarted),
                left: false,
            });
            return out;
        }
        let mut passed_over = Vec::new();
        let mut best: Option<&Candidate> = None;
        for c in candidates {
            if let Some(why) = &c.never {
                passed_over.push((c.service.clone(), why.clone()));
            } else if self.restarted.contains(&c.service) {
                passed_over.push((c.service.clone(), "restarted in this cycle already".into()));
            } else if best.is_none_or(|b| c.frees() > b.frees()) {
                if let Some(b) = best {
                    passed_over.push((
                        b.service.clone(),
                        format!("frees less ({} MiB)", b.frees() >> 20),
                    ));
                }
                best = Some(c);
            } else {
                passed_over.push((
                    c.service.clone(),
                    format!("frees less ({} MiB)", c.frees() >> 20),
                ));
            }
        }
        match best {
            Some(v) if (self.restarted.len() as u32) < fl.flush_max => {
                self.restarted.push(v.service.clone());
                self.victim_pending = true;
                self.wait_until_ns = now + fl.cooldown_ns;
                out.push(FloorDecision::Flush {
                    victim: v.clone(),
                    kill: available < fl.emergency,
                    available,
                    passed_over,
                    nth: self.restarted.len() as u32,
                });
            }
            _ => {
                self.active = false;
                // Spent only when it ended below the floor itself (as
                // documented); above the floor, short of the hysteresis,
                // the next fall may start a cycle.
                self.spent = available < fl.floor;
                out.push(FloorDecision::Done {
                    available,
                    restarted: std::mem::take(&mut self.restarted),
                    left: true,
                });
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn lim(ceiling_mib: u64) -> MemLimits {
        MemLimits {
            ceiling: ceiling_mib * MIB,
            max_restarts: 3,
            window_ns: 600 * S,
            critical: false,
            settle_ns: 2 * S,
            drift_ratio: 1.5,
            drift_min_bytes: 32 * MIB,
            drift_sustain_ns: 5 * S,
            startup_allowance: 1.0,
            startup_grace_ns: 0,
        }
    }

    #[test]
    fn a_breach_is_confirmed_then_restarted_once() {
        let mut m = Memory::default();
        let l = lim(150);
        assert!(m.on_sample("bot", 100 * MIB, 0, S, &l).is_empty());
        // First reading over: nothing yet, a quick re-read.
        assert!(m.on_sample("bot", 160 * MIB, 0, 2 * S, &l).is_empty());
        assert!(m.confirming("bot"));
        assert_eq!(
            next_sample_in(160 * MIB, l.ceiling, true, true, &l),
            20 * MS
        );
        let d = m.on_sample("bot", 170 * MIB, 0, 2 * S + 20 * MS, &l);
        assert!(matches!(
            &d[..],
            [
                MemDecision::OverCeiling { restart: true, .. },
                MemDecision::Restart {
                    restarts_in_window: 1,
                    ..
                }
            ]
        ));
        assert_eq!(m.state("bot"), MemState::OverCeiling);
        // The old instance is still there: no second restart.
        assert!(m.on_sample("bot", 180 * MIB, 0, 3 * S, &l).is_empty());
        assert!(m.on_sample("bot", 180 * MIB, 0, 4 * S, &l).is_empty());
        // A new run under the ceiling: back to ok.
        let d = m.on_sample("bot", 60 * MIB, 5 * S, 5 * S, &l);
        assert!(matches!(&d[..], [MemDecision::BackUnder { .. }]));
        assert_eq!(m.state("bot"), MemState::Ok);
    }

    #[test]
    fn one_high_reading_is_not_a_breach() {
        let mut m = Memory::default();
        let l = lim(150);
        assert!(m.on_sample("bot", 160 * MIB, 0, S, &l).is_empty());
        assert!(m.on_sample("bot", 140 * MIB, 0, S + 20 * MS, &l).is_empty());
        assert!(!m.confirming("bot"));
        assert_eq!(m.state("bot"), MemState::Ok);
    }

    #[test]
    fn critical_services_are_alerted_once_and_never_restarted() {
        let mut m = Memory::default();
        let l = MemLimits {
            critical: true,
            ..lim(100)
        };
        let mut all = Vec::new();
        for i in 0..10 {
            all.extend(m.on_sample("db", 200 * MIB, 0, S + i * 100 * MS, &l));
        }
        assert_eq!(all.len(), 1, "{all:?}");
        assert!(matches!(
            all[0],
            MemDecision::OverCeiling {
                critical: true,
                restart: false,
                ..
            }
        ));
    }

    #[test]
    fn too_many_restarts_in_the_window_is_a_memory_loop() {
        let mut m = Memory::default();
        let l = lim(100);
        let mut restarts = 0;
        let mut loops = 0;
        let mut now = S;
        for run in 0..6u64 {
            let start = now;
            for _ in 0..3 {
                for d in m.on_sample("leaky", 150 * MIB, start, now, &l) {
                    match d {
                        MemDecision::Restart { .. } => restarts += 1,
                        MemDecision::Loop { .. } => loops += 1,
                        _ => {}
                    }
                }
                now += 100 * MS;
            }
            let _ = run;
        }
        assert_eq!(restarts, 3, "max_restarts = 3");
        assert_eq!(loops, 1, "one loop decision");
        assert_eq!(m.state("leaky"), MemState::MemoryLoop);
    }

    #[test]
    fn drift_from_its_own_baseline_warns_once() {
        let mut m = Memory::default();
        let l = lim(0);
        // Settles at 60 MiB.
        let mut now = 0;
        while now <= 3 * S {
            m.on_sample("bot", 60 * MIB, 0, now, &l);
            now += S / 2;
        }
        assert_eq!(m.services["bot"].baseline(), Some(60 * MIB));
        // Doubles and stays: one warning after the sustain period.
        let mut drifts = 0;
        while now <= 20 * S {
            drifts += m
                .on_sample("bot", 130 * MIB, 0, now, &l)
                .iter()
                .filter(|d| matches!(d, MemDecision::Drift { .. }))
                .count();
            now += S / 2;
        }
        assert_eq!(drifts, 1);
        assert_eq!(m.state("bot"), MemState::Drift);
        // A flat service never drifts.
        let mut flat = 0;
        for i in 0..40u64 {
            flat += m.on_sample("flat", 70 * MIB, 0, i * S / 2, &l).len();
        }
        assert_eq!(flat, 0);
    }

    #[test]
    fn a_leak_never_raises_its_own_baseline() {
        let mut m = Memory::default();
        let l = lim(0);
        // Five runs that settle at 60 MiB and then leak to 300 MiB.
        for run in 0..5u64 {
            let start = run * 100 * S;
            for i in 0..50u64 {
                let now = start + i * S;
                let rss = if i < 3 { 60 * MIB } else { (60 + 5 * i) * MIB };
                m.on_sample("bot", rss, start, now, &l);
            }
        }
        assert_eq!(m.services["bot"].baseline(), Some(60 * MIB));
    }

    #[test]
    fn sampling_interval_follows_the_headroom() {
        let l = MemLimits {
            settle_ns: 60 * S,
            drift_sustain_ns: 300 * S,
            ..lim(150)
        };
        let n = |rss, ceiling| next_sample_in(rss, ceiling, false, false, &l);
        assert_eq!(n(0, 0), 5000 * MS);
        assert_eq!(n(10 * MIB, 1000 * MIB), 1000 * MS);
        assert_eq!(n(140 * MIB, 150 * MIB), 100 * MS);
        assert_eq!(n(100 * MIB, 200 * MIB), 500 * MS);
        // Tracked by the kernel: read only for baselines and drift.
        assert_eq!(
            next_sample_in(140 * MIB, 150 * MIB, false, true, &l),
            5000 * MS
        );
        // Second-scale settings read sooner.
        assert_eq!(lim(150).idle_sample_ns(), 1000 * MS);
    }

    #[test]
    fn the_startup_allowance_lifts_the_ceiling_for_young_runs_only() {
        let mut m = Memory::default();
        let l = MemLimits {
            startup_allowance: 1.5,
            startup_grace_ns: 60 * S,
            ..lim(100)
        };
        assert_eq!(l.ceiling_at(0), 150 * MIB);
        assert_eq!(l.ceiling_at(60 * S), 100 * MIB);
        assert_eq!(l.allowance_left(10 * S), Some(50 * S));
        assert_eq!(l.allowance_left(60 * S), None);
        // 120 MiB at 10 s and 10.02 s: under the lifted ceiling.
        assert!(m.on_sample("bot", 120 * MIB, 0, 10 * S, &l).is_empty());
        assert!(m
            .on_sample("bot", 120 * MIB, 0, 10 * S + 20 * MS, &l)
            .is_empty());
        assert!(!m.confirming("bot"));
        // The same at 61 s: over the ceiling, confirmed, restarted.
        assert!(m.on_sample("bot", 120 * MIB, 0, 61 * S, &l).is_empty());
        let d = m.on_sample("bot", 120 * MIB, 0, 61 * S + 20 * MS, &l);
        assert!(matches!(
            &d[..],
            [
                MemDecision::OverCeiling { ceiling, .. },
                MemDecision::Restart { .. }
            ] if *ceiling == 100 * MIB
        ));
        // Off by default: 1.0 changes nothing.
        assert_eq!(lim(100).ceiling_at(0), 100 * MIB);
    }

    fn floor() -> FloorLimits {
        FloorLimits {
            floor: 500 * MIB,
            hysteresis: 100 * MIB,
            emergency: 250 * MIB,
            flush_max: 3,
            cooldown_ns: 5 * S,
        }
    }

    fn cand(name: &str, rss: u64, base: Option<u64>, never: Option<&str>) -> Candidate {
        Candidate {
            service: name.into(),
            rss: rss * MIB,
            baseline: base.map(|b| b * MIB),
            never: never.map(str::to_string),
        }
    }

    #[test]
    fn the_flush_restarts_what_frees_most_never_critical_and_stops_above_hysteresis() {
        let mut f = Flush::default();
        let c = vec![
            cand("db", 700, Some(100), Some("critical")),
            cand("big", 600, Some(100), None),
            cand("small", 300, Some(60), None),
        ];
        assert!(f.on_available(800 * MIB, 0, &floor(), &c).is_empty());
        let d = f.on_available(400 * MIB, S, &floor(), &c);
        assert!(matches!(d[0], FloorDecision::Below { .. }));
        let FloorDecision::Flush {
            victim,
            kill,
            passed_over,
            ..
        } = &d[1]
        else {
            panic!("{d:?}")
        };
        assert_eq!(victim.service, "big");
        assert!(!kill);
        assert!(passed_over
            .iter()
            .any(|(s, why)| s == "db" && why == "critical"));
        // The old instance not gone yet: nothing, however long.
        assert!(f.on_available(450 * MIB, 30 * S, &floor(), &c).is_empty());
        f.victim_gone("big", 2 * S, &floor());
        // Cooling down: nothing.
        assert!(f.on_available(450 * MIB, 3 * S, &floor(), &c).is_empty());
        // Above the floor but not the hysteresis: the next one.
        let d = f.on_available(550 * MIB, 7 * S, &floor(), &c);
        assert!(
            matches!(&d[..], [FloorDecision::Flush { victim, nth: 2, .. }] if victim.service == "small")
        );
        f.victim_gone("small", 8 * S, &floor());
        // Above floor + hysteresis: done.
        let d = f.on_available(700 * MIB, 13 * S, &floor(), &c);
        assert!(
            matches!(&d[..], [FloorDecision::Done { left: false, restarted, .. }] if restarted.len() == 2)
        );
        assert!(!f.active());
    }

    #[test]
    fn below_the_emergency_floor_the_victim_is_killed_and_a_spent_cycle_waits() {
        let mut f = Flush::default();
        let c = vec![
            cand("big", 600, None, None),
            cand("db", 900, None, Some("critical")),
        ];
        let d = f.on_available(200 * MIB, 0, &floor(), &c);
        assert!(matches!(&d[1], FloorDecision::Flush { kill: true, .. }));
        f.victim_gone("big", S, &floor());
        // Nothing else to restart: the cycle ends, still below.
        let d = f.on_available(200 * MIB, 6 * S, &floor(), &c);
        assert!(matches!(&d[..], [FloorDecision::Done { left: true, .. }]));
        // No new cycle until MemAvailable was above the floor again.
        assert!(f.on_available(200 * MIB, 20 * S, &floor(), &c).is_empty());
        assert!(f.on_available(600 * MIB, 21 * S, &floor(), &c).is_empty());
        assert!(!f.on_available(300 * MIB, 22 * S, &floor(), &c).is_empty());
    }
}
