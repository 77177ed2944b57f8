//! The status snapshot: one view of every service, built here from the
//! process table and the policies' state, and fed to every reader — the
//! control socket's `status` today, metrics and MCP later — so they can't
//! disagree about what is running and in what state.

use std::collections::BTreeSet;

use serde::Serialize;

use crate::{
    identity::{Process, Unit},
    limits::Limits,
    memory::{MemLimits, MemState, Memory},
    table::ProcTable,
    velocity::{Live, ServiceStatus, State, Supervisor, Velocity},
};

/// Every bound on state that local users can grow, and what it cost.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Bounds {
    pub unconfigured_services: usize,
    pub max_unconfigured_services: usize,
    pub unconfigured_evicted: u64,
    pub processes: usize,
}

/// One service: its restart velocity and its memory.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    #[serde(flatten)]
    pub status: ServiceStatus,
    /// Last reading (instances' RSS + helpers' private memory).
    pub rss_bytes: Option<u64>,
    /// `None`: no ceiling.
    pub ceiling_bytes: Option<u64>,
    /// Median settled RSS of its last runs.
    pub baseline_bytes: Option<u64>,
    pub memory_state: MemState,
    pub memory_restarts_in_window: u32,
    /// pm2's own `max_memory_restart` for the app, when set (pm2 samples
    /// it every 30 s, main process only): shown beside ours.
    pub pm2_max_memory_restart_bytes: Option<u64>,
}

/// The services and the bounds, at one instant.
#[derive(Debug, Clone, Serialize)]
pub struct Snapshot {
    pub services: Vec<Row>,
    pub bounds: Bounds,
}

/// What the core needs to know of the config for a snapshot.
pub trait ServiceConfig {
    /// Configured service names.
    fn configured(&self) -> Box<dyn Iterator<Item = &str> + '_>;
    fn is_configured(&self, name: &str) -> bool;
    /// A service's effective limits (the defaults for one not configured).
    fn limits(&self, name: &str) -> Limits;
    fn mem_limits(&self, name: &str) -> MemLimits;
}

/// The supervisor the kernel-fed table says `p` runs under: a verified pm2
/// God's app, or a system unit. Anything else restarts itself, as far as
/// governor can tell.
pub fn supervisor_of(p: &Process, table: &ProcTable) -> Supervisor {
    if let Some(app) = &p.pm2 {
        if let Some(god) = table.god(app.god_pid) {
            return Supervisor::Pm2 {
                name: app.name.clone(),
                pm_id: app.pm_id,
                god_pid: app.god_pid,
                god_uid: god.uid,
                daemon_js: god.daemon_js.clone(),
            };
        }
    }
    if let Some(Unit::System(unit)) = &p.unit {
        return Supervisor::Systemd { unit: unit.clone() };
    }
    Supervisor::None
}

/// Live instances of `service`.
pub fn live(table: &ProcTable, service: &str) -> Vec<Live> {
    table
        .instances_of(service)
        .map(|p| Live {
            pid: p.pid,
            start_ns: p.start_ns,
        })
        .collect()
}

/// The snapshot at `now_ns`. Rows: configured services, anything with
/// history, pm2 apps (every running service with `all`). One failed
/// `grep` is not news: an unmanaged command line is listed once it repeats
/// or loops (all of them with `all`).
pub fn snapshot(
    table: &ProcTable,
    velocity: &Velocity,
    memory: &Memory,
    cfg: &dyn ServiceConfig,
    all: bool,
    now_ns: u64,
) -> Snapshot {
    let mut names: BTreeSet<&str> = cfg.configured().collect();
    names.extend(velocity.services.keys().map(String::as_str));
    for p in table.iter() {
        if p.instance && (all || p.pm2.is_some()) {
            names.insert(p.service.as_str());
        }
    }
    let services = names
        .into_iter()
        .map(|name| {
            let sup = table
                .instances_of(name)
                .next()
                .map(|p| supervisor_of(p, table))
                .unwrap_or_default();
            velocity.status(
                name,
                &cfg.limits(name),
                cfg.is_configured(name),
                &sup,
                &live(table, name),
                now_ns,
            )
        })
        .filter(|r| {
            all || r.configured
                || r.supervisor != Supervisor::None
                || r.state == State::CrashLoop
                || r.restarts_in_window >= 2
        })
        .map(|status| {
            // Memory is governed for configured services only.
            let configured = status.configured;
            let lim = cfg.mem_limits(&status.name);
            let t = memory.services.get(&status.name).filter(|_| configured);
            let restarts = t
                .map(|t| {
                    t.restarts
                        .iter()
                        .filter(|&&at| now_ns.saturating_sub(at) <= lim.window_ns)
                        .count() as u32
                })
                .unwrap_or(0);
            let pm2_max = table
                .instances_of(&status.name)
                .find_map(|p| p.pm2.as_ref()?.max_memory_restart);
            Row {
                rss_bytes: t.filter(|_| !status.pids.is_empty()).map(|t| t.rss),
                ceiling_bytes: (configured && lim.ceiling > 0).then_some(lim.ceiling),
                baseline_bytes: t.and_then(|t| t.baseline()),
                memory_state: t.map(|t| t.state).unwrap_or_default(),
                memory_restarts_in_window: restarts,
                pm2_max_memory_restart_bytes: pm2_max,
                status,
            }
        })
        .collect();
    Snapshot {
        services,
        bounds: Bounds {
            unconfigured_services: velocity.unconfigured(),
            max_unconfigured_services: velocity.cap,
            unconfigured_evicted: velocity.evicted,
            processes: table.len(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        testutil::{exec, table, DAEMON_JS},
        velocity::{Death, InstanceInfo},
    };

    struct Cfg;

    fn lim() -> Limits {
        Limits {
            window: std::time::Duration::from_secs(600),
            max_restarts: 2,
            memory_ceiling: 200 << 20,
            stable_after: std::time::Duration::from_secs(600),
            action: crate::limits::CrashLoopAction::Alert,
            stop_after: 3,
            critical: false,
        }
    }

    impl ServiceConfig for Cfg {
        fn configured(&self) -> Box<dyn Iterator<Item = &str> + '_> {
            Box::new(["lily", "ssh"].into_iter())
        }
        fn is_configured(&self, name: &str) -> bool {
            name == "lily" || name == "ssh"
        }
        fn limits(&self, _: &str) -> Limits {
            lim()
        }
        fn mem_limits(&self, _: &str) -> MemLimits {
            MemLimits {
                ceiling: 200 << 20,
                max_restarts: 3,
                window_ns: 600_000_000_000,
                critical: false,
                settle_ns: 1,
                drift_ratio: 1.5,
                drift_min_bytes: 32 << 20,
                drift_sustain_ns: 1,
                startup_allowance: 1.0,
                startup_grace_ns: 0,
            }
        }
    }

    #[test]
    fn rows_states_supervisors_and_bounds() {
        let mut t = table();
        t.apply_exec(
            &exec(10, 1, 0, "/usr/bin/node", &["node", DAEMON_JS]),
            None,
            &mut |_| None,
        );
        t.apply_exec(
            &exec(11, 10, 0, "/usr/bin/node", &["node", "app.js"]),
            None,
            &mut |_| {
                Some(crate::identity::Pm2Env {
                    name: "lily".into(),
                    pm_id: Some(3),
                    max_memory_restart: Some(300 << 20),
                })
            },
        );
        // An unprivileged one-off failure, and a repeated one.
        t.apply_exec(
            &exec(20, 1, 65534, "/bin/sh", &["sh", "-c", "once"]),
            None,
            &mut |_| None,
        );
        let mut v = Velocity {
            cap: 8,
            ..Velocity::default()
        };
        let repeated = t
            .apply_exec(
                &exec(30, 1, 65534, "/bin/false", &["false"]),
                None,
                &mut |_| None,
            )
            .service
            .clone();
        for i in 0..3u64 {
            v.on_death(
                &InstanceInfo {
                    service: repeated.clone(),
                    configured: false,
                    supervisor: Supervisor::None,
                    limits: lim(),
                },
                Death {
                    ts_ns: 1_000 + i,
                    pid: 30,
                    code: Some(1),
                    signal: None,
                    uptime_ns: 10,
                    planned: false,
                },
            );
        }
        let mut mem = Memory::default();
        mem.on_sample("lily", 70 << 20, 11, 1_000, &Cfg.mem_limits("lily"));
        let s = snapshot(&t, &v, &mem, &Cfg, false, 2_000);
        let names: Vec<&str> = s.services.iter().map(|r| r.status.name.as_str()).collect();
        assert_eq!(names, vec![repeated.as_str(), "lily", "ssh"]);
        let lily = &s.services[1];
        assert_eq!(lily.rss_bytes, Some(70 << 20));
        assert_eq!(lily.ceiling_bytes, Some(200 << 20));
        assert_eq!(lily.baseline_bytes, Some(70 << 20));
        assert_eq!(lily.memory_state, MemState::Ok);
        // pm2's own limit, from the app's environment, beside ours.
        assert_eq!(lily.pm2_max_memory_restart_bytes, Some(300 << 20));
        // An unconfigured service has no memory budget.
        assert_eq!(s.services[0].ceiling_bytes, None);
        let lily = &lily.status;
        assert_eq!(lily.pids, vec![11]);
        assert!(matches!(
            &lily.supervisor,
            Supervisor::Pm2 {
                pm_id: Some(3),
                god_pid: 10,
                god_uid: 0,
                ..
            }
        ));
        // Configured and not running: down.
        assert_eq!(s.services[2].status.state, State::Down);
        assert_eq!(s.services[2].rss_bytes, None);
        assert_eq!(s.services[0].status.restarts_in_window, 3);
        assert_eq!(
            s.bounds,
            Bounds {
                unconfigured_services: 1,
                max_unconfigured_services: 8,
                unconfigured_evicted: 0,
                processes: t.len(),
            }
        );
        // `all` adds every running service, the one-off shell included.
        let all = snapshot(&t, &v, &mem, &Cfg, true, 2_000);
        assert!(all
            .services
            .iter()
            .any(|r| r.status.name.starts_with("fp:u65534/sh-")));
        assert!(all.services.len() > s.services.len());
    }
}
