//! Property tests of the pure policies (the reliability campaign): restart
//! velocity, memory budgets and the memory-floor flush, each driven through
//! its public API by arbitrary sequences of events and checked against what
//! its module and the README document. A property is stated once and
//! checked after every step; where it needs to know what *should* have
//! happened, a small model built from the documented rules says so.
//!
//! Every case starts at monotonic time [`T0`] and only moves forward.
//! Failures print the shrunk case (no regression files are written).

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use governor_core::limits::{CrashLoopAction, Limits};
use governor_core::memory::{
    Candidate, FloorDecision, FloorLimits, Flush, MemDecision, MemLimits, Memory, BASELINE_RUNS,
};
use governor_core::velocity::{Death, Decision, InstanceInfo, Live, Supervisor, Velocity};
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

const S: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
const MIB: u64 = 1 << 20;
/// Where every case's clock starts (so `now - age` never goes below 0).
const T0: u64 = 1_000 * S;

/// 256 cases a property (`PROPTEST_CASES` overrides, for a longer hunt).
fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(256),
        // The shrunk input is printed; no files beside the sources.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn dt_ms() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 0u64..2_000,
        2 => 0u64..20_000,
        1 => 0u64..130_000,
    ]
}

// ---------------------------------------------------------------- velocity

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sup {
    None,
    Pm2,
    Systemd,
}

/// A service as the config and process table would describe it: fixed for
/// the whole case.
#[derive(Debug, Clone)]
struct VSvc {
    configured: bool,
    sup: Sup,
    limits: Limits,
}

#[derive(Debug, Clone, Copy)]
enum Exit {
    Code(i32),
    Signal(i32),
}

#[derive(Debug, Clone)]
enum VOp {
    Death {
        svc: usize,
        dt_ms: u64,
        exit: Exit,
        uptime_ms: u64,
        planned: bool,
    },
    Deploy {
        svc: usize,
        dt_ms: u64,
        grace_ms: u64,
    },
    ExpectPlanned {
        svc: usize,
        n: u32,
    },
    /// A tick with these live instances: (service, age in ms).
    Tick {
        dt_ms: u64,
        live: Vec<(usize, u64)>,
    },
}

#[derive(Debug, Clone)]
struct VCase {
    cap: usize,
    svcs: Vec<VSvc>,
    ops: Vec<VOp>,
}

fn arb_limits() -> impl Strategy<Value = Limits> {
    (
        5u64..=60,
        0u32..=4,
        5u64..=60,
        any::<bool>(),
        0u32..=3,
        any::<bool>(),
    )
        .prop_map(
            |(window_s, max_restarts, stable_s, stop, stop_after, critical)| Limits {
                window: Duration::from_secs(window_s),
                max_restarts,
                memory_ceiling: 0,
                stable_after: Duration::from_secs(stable_s),
                action: if stop {
                    CrashLoopAction::Stop
                } else {
                    CrashLoopAction::Alert
                },
                stop_after,
                critical,
            },
        )
}

fn arb_vsvc() -> impl Strategy<Value = VSvc> {
    (
        any::<bool>(),
        prop_oneof![Just(Sup::None), Just(Sup::Pm2), Just(Sup::Systemd)],
        arb_limits(),
    )
        .prop_map(|(configured, sup, limits)| VSvc {
            configured,
            sup,
            limits,
        })
}

fn arb_exit() -> impl Strategy<Value = Exit> {
    prop_oneof![
        2 => Just(Exit::Code(0)),
        3 => (1i32..=3).prop_map(Exit::Code),
        1 => prop_oneof![Just(9), Just(11), Just(15)].prop_map(Exit::Signal),
    ]
}

fn arb_vop() -> impl Strategy<Value = VOp> {
    let death = (
        0usize..8,
        dt_ms(),
        arb_exit(),
        0u64..120_000,
        prop::bool::weighted(0.15),
    )
        .prop_map(|(svc, dt_ms, exit, uptime_ms, planned)| VOp::Death {
            svc,
            dt_ms,
            exit,
            uptime_ms,
            planned,
        });
    let deploy =
        (0usize..8, dt_ms(), 0u64..60_000).prop_map(|(svc, dt_ms, grace_ms)| VOp::Deploy {
            svc,
            dt_ms,
            grace_ms,
        });
    let expect = (0usize..8, 1u32..=3).prop_map(|(svc, n)| VOp::ExpectPlanned { svc, n });
    let tick = (
        dt_ms(),
        prop::collection::vec((0usize..8, 0u64..130_000), 0..3),
    )
        .prop_map(|(dt_ms, live)| VOp::Tick { dt_ms, live });
    prop_oneof![
        10 => death,
        3 => tick,
        1 => deploy,
        1 => expect,
    ]
}

fn arb_vcase() -> impl Strategy<Value = VCase> {
    (
        1usize..=4,
        prop::collection::vec(arb_vsvc(), 1..=6),
        prop::collection::vec(arb_vop(), 1..80),
    )
        .prop_map(|(cap, svcs, ops)| VCase { cap, svcs, ops })
}

fn vname(i: usize) -> String {
    format!("s{i}")
}

fn supervisor_of(name: &str, sup: Sup) -> Supervisor {
    match sup {
        Sup::None => Supervisor::None,
        Sup::Pm2 => Supervisor::Pm2 {
            name: name.into(),
            pm_id: Some(0),
            god_pid: 1,
            god_uid: 0,
            daemon_js: None,
        },
        Sup::Systemd => Supervisor::Systemd {
            unit: format!("{name}.service"),
        },
    }
}

/// What the documented rules say about one service's history.
#[derive(Debug, Default)]
struct VModel {
    /// Deaths since tracking (re)began: (ts, counted).
    deaths: Vec<(u64, bool)>,
    /// Deaths before this are a deploy's (the latest deploy's grace).
    grace_until: u64,
    /// The next deaths the governor said are its own.
    expected: u32,
    /// From the decisions: an episode is open (EnteredCrashLoop … Recovered).
    episode: bool,
    crashes_since: u32,
    stop_issued: bool,
}

impl VModel {
    fn counted_in_window(&self, now: u64, window_ns: u64) -> u32 {
        self.deaths
            .iter()
            .filter(|(ts, counted)| *counted && now - ts <= window_ns)
            .count() as u32
    }

    /// The track was evicted: its history, graces and episode are gone.
    fn forget(&mut self) {
        *self = VModel::default();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VCheck {
    /// 1(a): restarts in the window are exactly the counted deaths in it
    /// (never more), and crossing `max_restarts` enters a loop.
    Counting,
    /// 1(b): EnteredCrashLoop once per episode, only above `max_restarts`.
    Episodes,
    /// 1(c): unconfigured tracks within `cap`, evictions counted.
    Cap,
    /// 1(d): Stop only for configured, supervised services, once per episode.
    Stop,
    /// 4: what the audit entry needs is in the decision.
    Audit,
}

/// Which services deploys and the governor's own restarts are announced
/// for. The daemon announces them for unconfigured services too (`governor
/// deploy pm2:bob/app`, a kill switch's held starts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Announced {
    Any,
    /// Deploy / expect_planned of unconfigured services are left out.
    ConfiguredOnly,
}

fn run_velocity(case: &VCase, check: VCheck, announced: Announced) -> Result<(), TestCaseError> {
    let n = case.svcs.len();
    let names: Vec<String> = (0..n).map(vname).collect();
    let index: BTreeMap<&str, usize> = names
        .iter()
        .enumerate()
        .map(|(i, s)| (s.as_str(), i))
        .collect();
    let sups: Vec<Supervisor> = case
        .svcs
        .iter()
        .enumerate()
        .map(|(i, s)| supervisor_of(&names[i], s.sup))
        .collect();
    let infos: Vec<InstanceInfo> = case
        .svcs
        .iter()
        .enumerate()
        .map(|(i, s)| InstanceInfo {
            service: names[i].clone(),
            configured: s.configured,
            supervisor: sups[i].clone(),
            limits: s.limits,
        })
        .collect();
    let mut v = Velocity {
        cap: case.cap,
        ..Velocity::default()
    };
    let mut model: Vec<VModel> = (0..n).map(|_| VModel::default()).collect();
    let mut now = T0;
    let mut pid = 10_000u32;

    for (step, op) in case.ops.iter().enumerate() {
        let before: BTreeSet<String> = v.services.keys().cloned().collect();
        let evicted_before = v.evicted;
        // (service, the death, counted by the rules, in an episode before)
        let mut dying: Option<(usize, Death, bool, bool)> = None;
        let decisions = match op {
            VOp::Death {
                svc,
                dt_ms,
                exit,
                uptime_ms,
                planned,
            } => {
                let i = svc % n;
                now += dt_ms * MS;
                pid += 1;
                let (code, signal) = match *exit {
                    Exit::Code(c) => (Some(c), None),
                    Exit::Signal(s) => (None, Some(s)),
                };
                let d = Death {
                    ts_ns: now,
                    pid,
                    code,
                    signal,
                    uptime_ns: uptime_ms * MS,
                    planned: *planned,
                };
                // The rules: every death of an instance counts, whatever its
                // uptime; unmanaged fingerprints count only failed deaths
                // (status ≠ 0 or a signal); planned deaths (the flag, the
                // governor's announced ones, a deploy's grace) don't.
                let spec = &case.svcs[i];
                let m = &mut model[i];
                let unmanaged = !spec.configured && spec.sup == Sup::None;
                let failed = signal.is_some() || code.is_some_and(|c| c != 0);
                let mut is_planned = *planned;
                if m.expected > 0 {
                    m.expected -= 1;
                    is_planned = true;
                }
                if now < m.grace_until {
                    is_planned = true;
                }
                let counted = !is_planned && (!unmanaged || failed);
                m.deaths.push((now, counted));
                dying = Some((i, d.clone(), counted, m.episode));
                v.on_death(&infos[i], d)
            }
            VOp::Deploy { svc, .. } | VOp::ExpectPlanned { svc, .. }
                if announced == Announced::ConfiguredOnly && !case.svcs[svc % n].configured =>
            {
                Vec::new()
            }
            VOp::Deploy {
                svc,
                dt_ms,
                grace_ms,
            } => {
                let i = svc % n;
                now += dt_ms * MS;
                v.deploy(&infos[i], now, grace_ms * MS);
                model[i].grace_until = now + grace_ms * MS;
                Vec::new()
            }
            VOp::ExpectPlanned { svc, n: k } => {
                let i = svc % n;
                v.expect_planned(&infos[i], *k);
                model[i].expected += k;
                Vec::new()
            }
            VOp::Tick { dt_ms, live } => {
                now += dt_ms * MS;
                let mut lives: BTreeMap<String, Vec<Live>> = BTreeMap::new();
                for (j, (svc, age_ms)) in live.iter().enumerate() {
                    lives.entry(names[svc % n].clone()).or_default().push(Live {
                        pid: 1 + j as u32,
                        start_ns: now.saturating_sub(age_ms * MS),
                    });
                }
                v.tick(now, |s| lives.get(s).cloned().unwrap_or_default())
            }
        };
        let after: BTreeSet<String> = v.services.keys().cloned().collect();
        let vanished: Vec<usize> = before
            .difference(&after)
            .map(|s| index[s.as_str()])
            .collect();
        let is_death = matches!(op, VOp::Death { .. });
        // Only a tick forgets (what has nothing left to remember); anything
        // else that makes a track vanish evicted it for the cap.
        let is_tick = matches!(op, VOp::Tick { .. });

        // 1(c): the cap and its evictions.
        if check == VCheck::Cap {
            prop_assert!(
                v.unconfigured() <= case.cap,
                "step {step} ({op:?}): {} unconfigured services tracked, cap {}: {:?}",
                v.unconfigured(),
                case.cap,
                after
            );
            for &i in &vanished {
                prop_assert!(
                    !case.svcs[i].configured,
                    "step {step}: configured service {} forgotten",
                    names[i]
                );
            }
            if is_tick {
                prop_assert!(
                    v.evicted == evicted_before,
                    "step {step} ({op:?}): a tick counted an eviction"
                );
            } else {
                prop_assert_eq!(
                    v.evicted - evicted_before,
                    vanished.len() as u64,
                    "step {}: every eviction counted",
                    step
                );
            }
        }
        if !is_tick {
            // Evicted: the track and all it knew are gone.
            for &i in &vanished {
                model[i].forget();
            }
        }

        let mut entered = 0;
        for dec in &decisions {
            match dec {
                Decision::EnteredCrashLoop {
                    service,
                    restarts,
                    max_restarts,
                    window_s,
                    last,
                    supervisor,
                } => {
                    let i = index[service.as_str()];
                    let spec = &case.svcs[i];
                    entered += 1;
                    if check == VCheck::Episodes {
                        prop_assert!(is_death, "step {step}: entered on a tick");
                        prop_assert!(
                            !model[i].episode,
                            "step {step}: {service} entered a crash loop twice in one episode"
                        );
                        prop_assert!(
                            *restarts > *max_restarts,
                            "step {step}: entered with {restarts} ≤ max {max_restarts}"
                        );
                        prop_assert_eq!(*max_restarts, spec.limits.max_restarts);
                        let st =
                            v.status(service, &spec.limits, spec.configured, &sups[i], &[], now);
                        prop_assert_eq!(
                            st.restarts_in_window,
                            *restarts,
                            "step {}: the decision's restarts are status's",
                            step
                        );
                    }
                    if check == VCheck::Audit {
                        let (di, d, _, _) = dying.as_ref().expect("entered on a death");
                        prop_assert_eq!(*di, i, "step {}: entered for another service", step);
                        prop_assert_eq!(last, d, "step {}: the death that crossed the line", step);
                        prop_assert_eq!(supervisor, &sups[i]);
                        prop_assert_eq!(*window_s, spec.limits.window.as_secs());
                    }
                    let m = &mut model[i];
                    m.episode = true;
                    m.crashes_since = 0;
                    m.stop_issued = false;
                }
                Decision::StillCrashing {
                    service,
                    crashes_since,
                    ..
                } => {
                    let i = index[service.as_str()];
                    if check == VCheck::Episodes || check == VCheck::Stop {
                        prop_assert!(
                            model[i].episode,
                            "step {step}: {service} still crashing outside an episode"
                        );
                        prop_assert_eq!(*crashes_since, model[i].crashes_since + 1);
                    }
                    model[i].crashes_since = *crashes_since;
                }
                Decision::Stop {
                    service,
                    supervisor,
                    crashes_since,
                } => {
                    let i = index[service.as_str()];
                    let spec = &case.svcs[i];
                    if check == VCheck::Stop {
                        prop_assert!(
                            spec.configured,
                            "step {step}: stop for unconfigured {service}"
                        );
                        prop_assert!(
                            spec.sup != Sup::None,
                            "step {step}: stop for unsupervised {service}"
                        );
                        prop_assert_eq!(spec.limits.action, CrashLoopAction::Stop);
                        prop_assert!(model[i].episode, "step {step}: stop outside an episode");
                        prop_assert!(
                            !model[i].stop_issued,
                            "step {step}: a second stop for {service} in one episode"
                        );
                        prop_assert!(
                            *crashes_since >= spec.limits.stop_after,
                            "step {step}: stop after {crashes_since} < stop_after {}",
                            spec.limits.stop_after
                        );
                        prop_assert_eq!(*crashes_since, model[i].crashes_since);
                    }
                    if check == VCheck::Audit {
                        let (di, _, _, _) = dying.as_ref().expect("stop on a death");
                        prop_assert_eq!(*di, i, "step {}: stop for another service", step);
                        prop_assert!(
                            *supervisor != Supervisor::None,
                            "step {step}: a stop with no supervisor to act through"
                        );
                        prop_assert_eq!(supervisor, &sups[i]);
                    }
                    model[i].stop_issued = true;
                }
                Decision::Recovered { service, .. } => {
                    let i = index[service.as_str()];
                    if check == VCheck::Episodes {
                        prop_assert!(!is_death, "step {step}: recovered on a death");
                        prop_assert!(
                            model[i].episode,
                            "step {step}: {service} recovered outside an episode"
                        );
                    }
                    model[i].episode = false;
                }
            }
        }
        if check == VCheck::Episodes {
            prop_assert!(entered <= 1, "step {step}: {entered} loops entered");
            if is_tick {
                // Forgotten by a tick: only services with nothing to
                // remember (a recovery in this tick ended the episode).
                for &i in &vanished {
                    prop_assert!(
                        !model[i].episode,
                        "step {step}: {} forgotten inside a crash loop",
                        names[i]
                    );
                }
            }
        }

        if check == VCheck::Counting {
            for i in 0..n {
                let spec = &case.svcs[i];
                let window_ns = spec.limits.window.as_nanos() as u64;
                let st = v.status(&names[i], &spec.limits, spec.configured, &sups[i], &[], now);
                let want = model[i].counted_in_window(now, window_ns);
                prop_assert!(
                    st.restarts_in_window <= want,
                    "step {step} ({op:?}): {} shows {} restarts in its window, only {want} counted deaths",
                    names[i],
                    st.restarts_in_window
                );
                prop_assert_eq!(
                    st.restarts_in_window,
                    want,
                    "step {}: {} restarts in window vs counted deaths",
                    step,
                    &names[i]
                );
            }
            if let Some((i, _, counted, episode_before)) = &dying {
                let spec = &case.svcs[*i];
                let window_ns = spec.limits.window.as_nanos() as u64;
                let restarts = model[*i].counted_in_window(now, window_ns);
                if !counted {
                    prop_assert!(
                        decisions.is_empty(),
                        "step {step}: an uncounted death decided {decisions:?}"
                    );
                } else if !episode_before && restarts > spec.limits.max_restarts {
                    prop_assert!(
                        entered == 1,
                        "step {step}: {restarts} > max {} restarts and no crash loop: {decisions:?}",
                        spec.limits.max_restarts
                    );
                } else if !episode_before {
                    prop_assert!(
                        decisions.is_empty(),
                        "step {step}: within budget yet {decisions:?}"
                    );
                }
            }
        }

        // 1(d), the other way: the stop comes once `stop_after` further
        // crashes happened in an episode of a configured, supervised
        // service whose action is stop.
        if check == VCheck::Stop {
            if let Some((i, _, _, true)) = &dying {
                let spec = &case.svcs[*i];
                let m = &model[*i];
                if m.episode
                    && spec.configured
                    && spec.sup != Sup::None
                    && spec.limits.action == CrashLoopAction::Stop
                    && m.crashes_since >= spec.limits.stop_after.max(1)
                {
                    prop_assert!(
                        m.stop_issued,
                        "step {step}: {} crashes into the loop of {} and no stop",
                        m.crashes_since,
                        names[*i]
                    );
                }
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ memory

#[derive(Debug, Clone)]
enum MOp {
    /// A reading; `new_run`: the service's oldest live instance is a new
    /// one, started now.
    Sample {
        svc: usize,
        dt_ms: u64,
        rss_mib: u64,
        new_run: bool,
    },
    RestartFailed {
        svc: usize,
    },
}

#[derive(Debug, Clone)]
struct MCase {
    svcs: Vec<MemLimits>,
    ops: Vec<MOp>,
}

fn arb_memlimits() -> impl Strategy<Value = MemLimits> {
    (
        prop_oneof![1 => Just(0u64), 4 => prop_oneof![Just(64u64), Just(100), Just(128)]],
        0u32..=3,
        1u64..=30,
        prop::bool::weighted(0.3),
        0u64..=5_000,
        (1.2f64..2.0, 0u64..=32, 0u64..=10_000),
        (prop_oneof![Just(1.0f64), Just(1.5)], 0u64..=10_000),
    )
        .prop_map(
            |(
                ceiling_mib,
                max_restarts,
                window_s,
                critical,
                settle_ms,
                (drift_ratio, drift_min_mib, sustain_ms),
                (startup_allowance, grace_ms),
            )| MemLimits {
                ceiling: ceiling_mib * MIB,
                max_restarts,
                window_ns: window_s * S,
                critical,
                settle_ns: settle_ms * MS,
                drift_ratio,
                drift_min_bytes: drift_min_mib * MIB,
                drift_sustain_ns: sustain_ms * MS,
                startup_allowance,
                startup_grace_ns: grace_ms * MS,
            },
        )
}

fn arb_mop() -> impl Strategy<Value = MOp> {
    prop_oneof![
        12 => (
            0usize..4,
            prop_oneof![Just(20u64), 0u64..1_000, 0u64..15_000],
            0u64..=200,
            prop::bool::weighted(0.15),
        )
            .prop_map(|(svc, dt_ms, rss_mib, new_run)| MOp::Sample {
                svc,
                dt_ms,
                rss_mib,
                new_run
            }),
        1 => (0usize..4).prop_map(|svc| MOp::RestartFailed { svc }),
    ]
}

fn arb_mcase() -> impl Strategy<Value = MCase> {
    (
        prop::collection::vec(arb_memlimits(), 1..=4),
        prop::collection::vec(arb_mop(), 1..100),
    )
        .prop_map(|(svcs, ops)| MCase { svcs, ops })
}

#[derive(Debug, Default)]
struct MModel {
    readings: u32,
    run_start: u64,
    /// A reading of this run at or after `settle_ns` was seen.
    run_settled: bool,
    /// The previous reading was over the ceiling that applied to it.
    prev_over: bool,
    /// A first reading over waits for its confirmation.
    pending: bool,
    /// A restart was decided; its instance isn't gone yet.
    in_flight: bool,
    /// From the decisions: Loop … BackUnder.
    in_loop: bool,
    /// Times of the Restart decisions.
    restarts: Vec<u64>,
    /// Settled RSS of the last runs, as the docs define them.
    runs: Vec<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MCheck {
    /// 2(a): never a restart of a critical service.
    Critical,
    /// 2(b): at most `max_restarts` restarts in any window, then a loop.
    Budget,
    /// 2(c): a restart only on the second reading in a row over.
    Confirmed,
    /// 2(d): the baseline: settled RSS of runs, never over the ceiling.
    Baseline,
    /// 4: what the audit entry needs is in the decision.
    Audit,
}

fn median(v: &[u64]) -> Option<u64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    Some(s[s.len() / 2])
}

fn run_memory(case: &MCase, check: MCheck) -> Result<(), TestCaseError> {
    let n = case.svcs.len();
    let names: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    let mut mem = Memory::default();
    let mut model: Vec<MModel> = (0..n).map(|_| MModel::default()).collect();
    let mut now = T0;
    for (step, op) in case.ops.iter().enumerate() {
        let (svc, dt_ms, rss_mib, new_run) = match *op {
            MOp::RestartFailed { svc } => {
                let i = svc % n;
                mem.restart_failed(&names[i]);
                model[i].in_flight = false;
                continue;
            }
            MOp::Sample {
                svc,
                dt_ms,
                rss_mib,
                new_run,
            } => (svc, dt_ms, rss_mib, new_run),
        };
        let i = svc % n;
        let lim = case.svcs[i];
        let name = &names[i];
        now += dt_ms * MS;
        let rss = rss_mib * MIB;
        let m = &mut model[i];
        let start = if new_run || m.readings == 0 {
            now
        } else {
            m.run_start
        };
        let is_new_run = m.readings == 0 || start != m.run_start;
        let age = now - start;
        let ceiling = lim.ceiling_at(age);
        let over = ceiling > 0 && rss > ceiling;
        let runs_before: Vec<u64> = mem
            .services
            .get(name)
            .map(|t| t.runs.iter().copied().collect())
            .unwrap_or_default();
        if is_new_run {
            m.run_start = start;
            m.run_settled = false;
            m.in_flight = false;
        }
        let settled_before = m.run_settled;
        // The baseline: a run's settled RSS is its first reading at least
        // `settle_ns` after its start; a run over the ceiling then is no
        // baseline; the last BASELINE_RUNS count.
        if !m.run_settled && age >= lim.settle_ns {
            m.run_settled = true;
            if lim.ceiling == 0 || rss <= lim.ceiling {
                m.runs.push(rss);
                if m.runs.len() > BASELINE_RUNS {
                    m.runs.remove(0);
                }
            }
        }
        // A breach is a reading over confirmed by the next one; readings
        // while a restart is in flight or in a memory loop start none.
        let confirmed = if !over {
            m.pending = false;
            false
        } else if m.in_flight || m.in_loop {
            false
        } else if !m.pending {
            m.pending = true;
            false
        } else {
            m.pending = false;
            true
        };
        let in_window_before = m
            .restarts
            .iter()
            .filter(|&&t| now - t <= lim.window_ns)
            .count() as u32;

        let decisions = mem.on_sample(name, rss, start, now, &lim);

        let mut restarted = false;
        let mut looped = false;
        for (k, dec) in decisions.iter().enumerate() {
            match dec {
                MemDecision::Restart {
                    service,
                    rss: r,
                    ceiling: c,
                    restarts_in_window,
                } => {
                    restarted = true;
                    if check == MCheck::Critical {
                        prop_assert!(!lim.critical, "step {step}: restart of critical {service}");
                    }
                    if check == MCheck::Budget {
                        prop_assert!(
                            in_window_before < lim.max_restarts,
                            "step {step}: restart #{} in the window, max {}",
                            in_window_before + 1,
                            lim.max_restarts
                        );
                        prop_assert_eq!(*restarts_in_window, in_window_before + 1);
                    }
                    if check == MCheck::Confirmed {
                        prop_assert!(over, "step {step}: restart on a reading under");
                        prop_assert!(
                            m.readings > 0 && m.prev_over,
                            "step {step}: restart on a single reading over (previous: over={}, readings={})",
                            m.prev_over,
                            m.readings
                        );
                    }
                    if check == MCheck::Audit {
                        prop_assert_eq!(service, name);
                        prop_assert_eq!(*r, rss);
                        prop_assert_eq!(*c, ceiling);
                        prop_assert!(*c > 0 && *r > *c, "step {step}: restart without a breach");
                        let prev = k.checked_sub(1).map(|p| &decisions[p]);
                        prop_assert!(
                            matches!(prev, Some(MemDecision::OverCeiling { service: s, rss: pr, ceiling: pc, critical: false, restart: true })
                                if s == name && pr == r && pc == c),
                            "step {step}: restart not announced by its over-ceiling entry: {decisions:?}"
                        );
                    }
                }
                MemDecision::OverCeiling {
                    service,
                    rss: r,
                    ceiling: c,
                    critical,
                    restart,
                } => {
                    if check == MCheck::Critical {
                        prop_assert_eq!(*critical, lim.critical);
                        prop_assert!(
                            !(lim.critical && *restart),
                            "step {step}: critical {service} over its ceiling with restart"
                        );
                    }
                    if check == MCheck::Confirmed {
                        prop_assert!(
                            over && m.readings > 0 && m.prev_over,
                            "step {step}: over-ceiling decided on a single reading"
                        );
                    }
                    if check == MCheck::Audit {
                        prop_assert_eq!(service, name);
                        prop_assert!(*r == rss && *c == ceiling && *r > *c);
                    }
                }
                MemDecision::Loop {
                    service,
                    restarts,
                    window_ns,
                    ..
                } => {
                    looped = true;
                    if check == MCheck::Critical {
                        prop_assert!(!lim.critical, "step {step}: memory loop of critical");
                    }
                    if check == MCheck::Budget {
                        prop_assert_eq!(*restarts, in_window_before);
                        prop_assert!(
                            *restarts >= lim.max_restarts,
                            "step {step}: loop after {restarts} < {} restarts",
                            lim.max_restarts
                        );
                        prop_assert_eq!(*window_ns, lim.window_ns);
                    }
                    if check == MCheck::Confirmed {
                        prop_assert!(over && m.prev_over, "step {step}: loop on one reading");
                    }
                    if check == MCheck::Audit {
                        prop_assert_eq!(service, name);
                    }
                    m.in_loop = true;
                }
                MemDecision::BackUnder { .. } => {
                    m.in_loop = false;
                }
                MemDecision::Drift {
                    rss: r,
                    baseline,
                    threshold,
                    for_ns,
                    ..
                } => {
                    if check == MCheck::Baseline {
                        prop_assert_eq!(Some(*baseline), median(&m.runs));
                        prop_assert!(*threshold >= *baseline + lim.drift_min_bytes);
                        prop_assert!(*r == rss && *r > *threshold);
                        prop_assert!(*for_ns >= lim.drift_sustain_ns);
                    }
                }
            }
        }

        // 2(b), the other way: a confirmed breach of a non-critical service
        // with no restart in flight is acted on: a restart within the
        // budget, a memory loop at it.
        if check == MCheck::Budget {
            if confirmed && !lim.critical {
                if in_window_before < lim.max_restarts {
                    prop_assert!(
                        restarted,
                        "step {step}: confirmed breach, {in_window_before} < {} restarts, no restart: {decisions:?}",
                        lim.max_restarts
                    );
                } else {
                    prop_assert!(
                        looped,
                        "step {step}: confirmed breach at the budget, no loop: {decisions:?}"
                    );
                }
            } else {
                prop_assert!(
                    !restarted && !looped,
                    "step {step}: acted without a confirmed breach: {decisions:?}"
                );
            }
        }

        if check == MCheck::Baseline {
            let t = &mem.services[name];
            let runs: Vec<u64> = t.runs.iter().copied().collect();
            prop_assert!(runs.len() <= BASELINE_RUNS);
            if lim.ceiling > 0 {
                prop_assert!(
                    runs.iter().all(|&r| r <= lim.ceiling),
                    "step {step}: a run over the ceiling in the baseline: {runs:?}"
                );
                if rss > lim.ceiling {
                    prop_assert_eq!(
                        &runs,
                        &runs_before,
                        "step {}: a reading over the ceiling changed the baseline",
                        step
                    );
                }
            }
            if settled_before {
                prop_assert_eq!(
                    &runs,
                    &runs_before,
                    "step {}: a reading after the run settled changed the baseline",
                    step
                );
            }
            prop_assert_eq!(&runs, &m.runs);
            prop_assert_eq!(t.baseline(), median(&m.runs));
        }

        if restarted {
            m.restarts.push(now);
            m.in_flight = true;
        }
        m.prev_over = over;
        m.readings += 1;
    }
    Ok(())
}

// ------------------------------------------------------------------- flush

#[derive(Debug, Clone)]
enum FOp {
    /// A MemAvailable reading; per pool entry: (listed, rss MiB, baseline MiB).
    Available {
        dt_ms: u64,
        avail_mib: u64,
        cands: Vec<(bool, u64, Option<u64>)>,
    },
    /// `victim_gone` for the pool entry, or (None) the last victim.
    Gone { dt_ms: u64, which: Option<usize> },
}

#[derive(Debug, Clone)]
struct FCase {
    fl: FloorLimits,
    /// Per candidate: why it may never be chosen.
    pool: Vec<Option<&'static str>>,
    ops: Vec<FOp>,
}

fn arb_fcase() -> impl Strategy<Value = FCase> {
    let fl = (
        100u64..=500,
        0u64..=100,
        0u64..=100,
        0u32..=4,
        0u64..=10_000,
    )
        .prop_map(
            |(floor_mib, hyst_mib, emergency_pct, flush_max, cooldown_ms)| FloorLimits {
                floor: floor_mib * MIB,
                hysteresis: hyst_mib * MIB,
                emergency: floor_mib * MIB * emergency_pct / 100,
                flush_max,
                cooldown_ns: cooldown_ms * MS,
            },
        );
    let never = prop_oneof![
        5 => Just(None),
        1 => Just(Some("critical")),
        1 => Just(Some("PID 1")),
        1 => Just(Some("sshd")),
        1 => Just(Some("governor")),
        1 => Just(Some("pm2 God")),
    ];
    let op = prop_oneof![
        4 => (
            dt_ms(),
            0u64..=700,
            prop::collection::vec(
                (
                    prop::bool::weighted(0.85),
                    0u64..=1024,
                    prop::option::of(0u64..=512)
                ),
                6
            ),
        )
            .prop_map(|(dt_ms, avail_mib, cands)| FOp::Available {
                dt_ms,
                avail_mib,
                cands
            }),
        1 => (dt_ms(), prop::option::weighted(0.2, 0usize..6))
            .prop_map(|(dt_ms, which)| FOp::Gone { dt_ms, which }),
    ];
    (
        fl,
        prop::collection::vec(never, 1..=6),
        prop::collection::vec(op, 1..80),
    )
        .prop_map(|(fl, pool, ops)| FCase { fl, pool, ops })
}

#[derive(Debug, Default)]
struct FModel {
    /// Below … Done.
    active: bool,
    /// The last cycle ended below: none until MemAvailable was above the floor.
    spent: bool,
    /// Victims of this cycle, in order.
    victims: Vec<String>,
    /// The last victim's old instances aren't gone yet.
    pending: Option<String>,
    /// No reading acted on before this (cooldown).
    wait_until: u64,
    /// The last cycle ran out of restarts or victims between the floor and
    /// floor + hysteresis: whether that makes it spent, the docs don't say
    /// (only under [`SpentRule::Either`]).
    spent_unsure: bool,
}

/// When a cycle that ran out of restarts or victims blocks the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SpentRule {
    /// `Flush::spent`: "After a cycle that ended below the floor: none
    /// until MemAvailable has been above the floor again."
    AsDocumented,
    /// As documented where the cycle ended below the floor; either way
    /// where it ended between the floor and floor + hysteresis.
    Either,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FCheck {
    /// 3(a): never a `never` candidate, nor one restarted in this cycle.
    Never,
    /// 3(b): at most `flush_max` victims per cycle.
    Max,
    /// 3(c): one at a time: none while the last is pending or cooling down.
    OneAtATime,
    /// 3(d): the victim frees the most among the eligible.
    FreesMost,
    /// The documented cycle: Below when it should, a victim whenever one
    /// is allowed, Done when it should.
    Cycle,
    /// 4: what the audit entry needs is in the decision.
    Audit,
}

fn run_flush(case: &FCase, check: FCheck, rule: SpentRule) -> Result<(), TestCaseError> {
    let fl = case.fl;
    let names: Vec<String> = (0..case.pool.len()).map(|i| format!("c{i}")).collect();
    let mut f = Flush::default();
    let mut m = FModel::default();
    let mut now = T0;
    for (step, op) in case.ops.iter().enumerate() {
        let (dt_ms, avail_mib, cands) = match op {
            FOp::Gone { dt_ms, which } => {
                now += dt_ms * MS;
                let name = match which {
                    Some(j) => names[j % names.len()].clone(),
                    None => match m.victims.last() {
                        Some(v) => v.clone(),
                        None => continue,
                    },
                };
                f.victim_gone(&name, now, &fl);
                if m.active && m.pending.as_deref() == Some(name.as_str()) {
                    m.pending = None;
                    m.wait_until = now + fl.cooldown_ns;
                }
                continue;
            }
            FOp::Available {
                dt_ms,
                avail_mib,
                cands,
            } => (dt_ms, avail_mib, cands),
        };
        now += dt_ms * MS;
        let available = avail_mib * MIB;
        let candidates: Vec<Candidate> = case
            .pool
            .iter()
            .enumerate()
            .filter(|(j, _)| cands[*j].0)
            .map(|(j, never)| Candidate {
                service: names[j].clone(),
                rss: cands[j].1 * MIB,
                baseline: cands[j].2.map(|b| b * MIB),
                never: never.map(str::to_string),
            })
            .collect();
        // Who may be chosen, given this cycle's victims so far.
        let eligible = |victims: &[String]| -> Vec<&Candidate> {
            candidates
                .iter()
                .filter(|c| c.never.is_none() && !victims.contains(&c.service))
                .collect()
        };
        let was_active = m.active;
        let spent_before = m.spent;
        let unsure_before = m.spent_unsure;
        let waiting = m.pending.is_some() || now < m.wait_until;

        let out = f.on_available(available, now, &fl, &candidates);

        let mut below = false;
        let mut flushed = false;
        let mut done = false;
        for dec in &out {
            match dec {
                FloorDecision::Below {
                    available: a,
                    floor,
                } => {
                    below = true;
                    if check == FCheck::Cycle {
                        prop_assert!(!m.active, "step {step}: below inside a cycle");
                        prop_assert!(
                            !m.spent,
                            "step {step}: a new cycle before MemAvailable was above the floor"
                        );
                    }
                    if check == FCheck::Audit {
                        prop_assert!(*a == available && *floor == fl.floor && *a < *floor);
                    }
                    m.active = true;
                    m.spent_unsure = false;
                    m.victims.clear();
                    m.pending = None;
                    m.wait_until = 0;
                }
                FloorDecision::Flush {
                    victim,
                    kill,
                    available: a,
                    passed_over,
                    nth,
                } => {
                    flushed = true;
                    if check == FCheck::Never {
                        prop_assert!(
                            victim.never.is_none(),
                            "step {step}: flushed {} ({:?})",
                            victim.service,
                            victim.never
                        );
                        prop_assert!(
                            !m.victims.contains(&victim.service),
                            "step {step}: {} flushed twice in a cycle",
                            victim.service
                        );
                    }
                    if check == FCheck::Max {
                        prop_assert!(m.active, "step {step}: a flush outside a cycle");
                        prop_assert!(
                            (m.victims.len() as u32) < fl.flush_max,
                            "step {step}: victim #{} of a cycle, flush_max {}",
                            m.victims.len() + 1,
                            fl.flush_max
                        );
                    }
                    if check == FCheck::OneAtATime {
                        prop_assert!(
                            m.pending.is_none(),
                            "step {step}: {} flushed while {:?}'s old instances remain",
                            victim.service,
                            m.pending
                        );
                        prop_assert!(
                            now >= m.wait_until,
                            "step {step}: {} flushed {} ms into the cooldown",
                            victim.service,
                            (m.wait_until - now) / MS
                        );
                    }
                    if check == FCheck::FreesMost {
                        let most = eligible(&m.victims).iter().map(|c| c.frees()).max();
                        prop_assert_eq!(
                            Some(victim.frees()),
                            most,
                            "step {}: {} frees {} MiB; the eligible most {:?}",
                            step,
                            &victim.service,
                            victim.frees() >> 20,
                            most.map(|b| b >> 20)
                        );
                    }
                    if check == FCheck::Audit {
                        prop_assert!(
                            candidates.contains(victim),
                            "step {step}: the victim is no candidate"
                        );
                        prop_assert_eq!(*a, available);
                        prop_assert_eq!(*kill, available < fl.emergency);
                        prop_assert_eq!(*nth as usize, m.victims.len() + 1);
                        // Why each other service wasn't chosen: each once.
                        let mut others: Vec<&str> = candidates
                            .iter()
                            .filter(|c| c.service != victim.service)
                            .map(|c| c.service.as_str())
                            .collect();
                        let mut passed: Vec<&str> =
                            passed_over.iter().map(|(s, _)| s.as_str()).collect();
                        others.sort_unstable();
                        passed.sort_unstable();
                        prop_assert_eq!(passed, others, "step {}: passed over", step);
                        for (s, why) in passed_over {
                            prop_assert!(
                                !why.is_empty(),
                                "step {step}: {s} passed over, no reason"
                            );
                            let c = candidates.iter().find(|c| &c.service == s).unwrap();
                            if let Some(never) = &c.never {
                                prop_assert_eq!(why, never);
                            }
                        }
                    }
                    m.victims.push(victim.service.clone());
                    m.pending = Some(victim.service.clone());
                    m.wait_until = now + fl.cooldown_ns;
                }
                FloorDecision::Done {
                    available: a,
                    restarted,
                    left,
                } => {
                    done = true;
                    if check == FCheck::Audit || check == FCheck::Cycle {
                        prop_assert_eq!(*a, available);
                        prop_assert_eq!(restarted, &m.victims);
                        prop_assert_eq!(*left, available < fl.floor.saturating_add(fl.hysteresis));
                    }
                    if check == FCheck::OneAtATime {
                        prop_assert!(
                            m.pending.is_none(),
                            "step {step}: the cycle ended with a victim's instances left"
                        );
                    }
                    m.active = false;
                    // "After a cycle that ended below the floor: none until
                    // MemAvailable has been above the floor again."
                    m.spent = *left && available < fl.floor;
                    m.spent_unsure = rule == SpentRule::Either && *left && available >= fl.floor;
                    m.pending = None;
                }
            }
        }
        // Above the floor again: a reading after the cycle ended.
        if !was_active && available >= fl.floor {
            m.spent = false;
            m.spent_unsure = false;
        }
        // Undocumented either way: follow what the policy did.
        let either = unsure_before && !was_active && available < fl.floor;
        if either && !below {
            m.spent = true;
        }

        // The cycle as documented, decision by decision.
        if check == FCheck::Cycle {
            let want_below = !was_active && available < fl.floor && !spent_before;
            if !either {
                prop_assert_eq!(
                    below,
                    want_below,
                    "step {}: below (spent: {})",
                    step,
                    spent_before
                );
            }
            let acting = (was_active && !waiting) || below;
            if !acting {
                prop_assert!(
                    !flushed && !done,
                    "step {step}: decided while idle or waiting: {out:?}"
                );
            } else if available >= fl.floor.saturating_add(fl.hysteresis) {
                prop_assert!(
                    done && !flushed,
                    "step {step}: above floor + hysteresis: {out:?}"
                );
            } else {
                let victims_before = &m.victims[..m.victims.len() - usize::from(flushed)];
                let eligible = eligible(victims_before);
                let can = !eligible.is_empty() && (victims_before.len() as u32) < fl.flush_max;
                prop_assert_eq!(
                    flushed,
                    can,
                    "step {}: eligible {:?}, {} of {} flushed: {:?}",
                    step,
                    eligible.iter().map(|c| &c.service).collect::<Vec<_>>(),
                    victims_before.len(),
                    fl.flush_max,
                    &out
                );
                prop_assert_eq!(done, !can, "step {}: done", step);
            }
        }
    }
    Ok(())
}

// -------------------------------------------------------------- properties

proptest! {
    #![proptest_config(config())]

    /// 1(a): restarts in the window never exceed (and are exactly) the
    /// counted deaths in it; a counted death crossing `max_restarts`
    /// enters a crash loop, an uncounted one decides nothing.
    #[test]
    fn velocity_restarts_are_the_counted_deaths(case in arb_vcase()) {
        run_velocity(&case, VCheck::Counting, Announced::ConfiguredOnly)?;
    }

    /// FINDING: 1(a) with deploys announced for unconfigured services too
    /// (the daemon allows `governor deploy` of a running unconfigured
    /// service): a tick forgets an unconfigured track whose deploy grace is
    /// still running, and the deaths in the rest of the grace count.
    #[test]
    fn velocity_restarts_are_the_counted_deaths_with_unconfigured_deploys(case in arb_vcase()) {
        run_velocity(&case, VCheck::Counting, Announced::Any)?;
    }

    /// 1(b): EnteredCrashLoop at most once per episode, and only when
    /// restarts > max_restarts.
    #[test]
    fn velocity_enters_a_crash_loop_once_per_episode(case in arb_vcase()) {
        run_velocity(&case, VCheck::Episodes, Announced::Any)?;
    }

    /// 1(c): never more unconfigured services tracked than the cap; each
    /// eviction counted, configured services never forgotten.
    #[test]
    fn velocity_unconfigured_services_stay_within_the_cap(case in arb_vcase()) {
        run_velocity(&case, VCheck::Cap, Announced::ConfiguredOnly)?;
    }

    /// FINDING: 1(c) with deploys and the governor's own restarts announced
    /// for unconfigured services too (the kill switch does, for other
    /// users' pm2 apps and units): `deploy` and `expect_planned` add
    /// unconfigured tracks without making room.
    #[test]
    fn velocity_unconfigured_services_stay_within_the_cap_with_announcements(case in arb_vcase()) {
        run_velocity(&case, VCheck::Cap, Announced::Any)?;
    }

    /// 1(d): Stop only for a configured, supervised service whose action
    /// is stop, once per episode, after `stop_after` further crashes.
    #[test]
    fn velocity_stops_only_configured_supervised_services_once(case in arb_vcase()) {
        run_velocity(&case, VCheck::Stop, Announced::Any)?;
    }

    /// 4 (velocity): a loop names its service, the death, the supervisor;
    /// a stop names a supervisor to act through.
    #[test]
    fn velocity_decisions_carry_their_audit_facts(case in arb_vcase()) {
        run_velocity(&case, VCheck::Audit, Announced::Any)?;
    }

    /// 2(a): a critical service is never restarted for its memory.
    #[test]
    fn memory_never_restarts_a_critical_service(case in arb_mcase()) {
        run_memory(&case, MCheck::Critical)?;
    }

    /// 2(b): at most `max_restarts` memory restarts in any window; a
    /// confirmed breach past that is a memory loop.
    #[test]
    fn memory_restarts_stay_within_the_budget_then_loop(case in arb_mcase()) {
        run_memory(&case, MCheck::Budget)?;
    }

    /// 2(c): a restart only on the second reading in a row over the ceiling.
    #[test]
    fn memory_restarts_only_on_a_confirmed_breach(case in arb_mcase()) {
        run_memory(&case, MCheck::Confirmed)?;
    }

    /// 2(d): the baseline is the median settled RSS of the last runs; a
    /// reading over the ceiling, or one after the run settled (a leak),
    /// never changes it.
    #[test]
    fn memory_baseline_never_learns_a_breach_or_a_leak(case in arb_mcase()) {
        run_memory(&case, MCheck::Baseline)?;
    }

    /// 4 (memory): a restart says which service, its reading and the
    /// ceiling it broke, announced by its over-ceiling entry.
    #[test]
    fn memory_decisions_carry_their_audit_facts(case in arb_mcase()) {
        run_memory(&case, MCheck::Audit)?;
    }

    /// 3(a): the flush never picks what must never be touched (critical,
    /// PID 1, sshd, governor, pm2's God), nor one twice in a cycle.
    #[test]
    fn flush_never_picks_the_untouchable(case in arb_fcase()) {
        run_flush(&case, FCheck::Never, SpentRule::Either)?;
    }

    /// 3(b): at most `flush_max` victims per cycle.
    #[test]
    fn flush_picks_at_most_flush_max_per_cycle(case in arb_fcase()) {
        run_flush(&case, FCheck::Max, SpentRule::Either)?;
    }

    /// 3(c): one at a time: no new victim until the last one's old
    /// instances are gone and the cooldown since has passed.
    #[test]
    fn flush_picks_one_at_a_time(case in arb_fcase()) {
        run_flush(&case, FCheck::OneAtATime, SpentRule::Either)?;
    }

    /// 3(d): the victim frees the most (current − baseline) of the eligible.
    #[test]
    fn flush_picks_what_frees_most(case in arb_fcase()) {
        run_flush(&case, FCheck::FreesMost, SpentRule::Either)?;
    }

    /// The cycle as documented: it starts below the floor (not again after
    /// one that ended below until MemAvailable was above it), picks a
    /// victim whenever one is allowed, ends above floor + hysteresis or
    /// out of victims or restarts.
    #[test]
    fn flush_follows_its_documented_cycle(case in arb_fcase()) {
        run_flush(&case, FCheck::Cycle, SpentRule::Either)?;
    }

    /// FINDING (see the report of the reliability campaign): the cycle as
    /// `Flush::spent` documents it — only a cycle that *ended below the
    /// floor* blocks the next one. The policy also blocks after a cycle
    /// that ran out of restarts between the floor and floor + hysteresis.
    #[test]
    fn flush_is_spent_only_after_a_cycle_that_ended_below_the_floor(case in arb_fcase()) {
        run_flush(&case, FCheck::Cycle, SpentRule::AsDocumented)?;
    }

    /// 4 (flush): a victim is one of the candidates, with the reading,
    /// kill-or-restart, its rank, and why each other one wasn't chosen.
    #[test]
    fn flush_decisions_carry_their_audit_facts(case in arb_fcase()) {
        run_flush(&case, FCheck::Audit, SpentRule::Either)?;
    }
}
