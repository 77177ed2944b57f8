//! The process table: every live process, which service it belongs to, and
//! how it got there. Kept current from kernel events; the facts only /proc
//! knows (a cgroup, a verified God's child's pm2 name) are handed in by the
//! daemon's procfs edge, so nothing here reads a file.

use std::collections::HashMap;

use crate::{
    events::{Exec, Exit, Fork},
    identity::{
        fingerprint, god_from_exec, is_supervisor, unit_from_cgroup, God, Matcher, Pm2App, Pm2Env,
        Process, UserNames,
    },
};

/// Reads pm2's `(name, pm_id)` of a pid, asked only for children of a
/// verified God (the edge reads `/proc/PID/environ`).
pub type AppReader<'a> = &'a mut dyn FnMut(u32) -> Option<Pm2Env>;

/// The live processes, keyed by pid.
#[derive(Debug)]
pub struct ProcTable {
    procs: HashMap<u32, Process>,
    matcher: Matcher,
    names: UserNames,
    /// Supervisors that appeared (true) or died (false) since last taken.
    supervisor_changes: Vec<(u32, bool)>,
}

fn uid_names(uid: u32) -> String {
    uid.to_string()
}

impl Default for ProcTable {
    fn default() -> Self {
        ProcTable::new(Matcher::default(), uid_names)
    }
}

impl ProcTable {
    pub fn new(matcher: Matcher, names: UserNames) -> Self {
        ProcTable {
            procs: HashMap::new(),
            matcher,
            names,
            supervisor_changes: Vec::new(),
        }
    }

    /// Replaces the matchers (config reload) and re-resolves every process.
    pub fn set_matcher(&mut self, matcher: Matcher) {
        self.matcher = matcher;
        for p in self.procs.values_mut() {
            let (s, c) = self.matcher.resolve(p, self.names);
            p.service = s;
            p.configured = c;
        }
        self.recompute_instances();
    }

    pub fn matcher(&self) -> &Matcher {
        &self.matcher
    }

    fn parent_service(&self, ppid: u32) -> Option<&str> {
        self.procs.get(&ppid).map(|p| p.service.as_str())
    }

    fn recompute_instances(&mut self) {
        let services: HashMap<u32, String> = self
            .procs
            .iter()
            .map(|(pid, p)| (*pid, p.service.clone()))
            .collect();
        for p in self.procs.values_mut() {
            p.instance = services.get(&p.ppid) != Some(&p.service);
        }
    }

    /// Live instances of a service.
    pub fn instances_of<'a>(&'a self, service: &'a str) -> impl Iterator<Item = &'a Process> + 'a {
        self.procs
            .values()
            .filter(move |p| p.instance && p.service == service)
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.procs.is_empty()
    }

    pub fn get(&self, pid: u32) -> Option<&Process> {
        self.procs.get(&pid)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Process> {
        self.procs.values()
    }

    /// The verified God a pid is, if it is one.
    pub fn god(&self, pid: u32) -> Option<&God> {
        self.procs.get(&pid).and_then(|p| p.god.as_ref())
    }

    /// Adds processes read from /proc (at start: those that predate the
    /// daemon), then resolves everyone.
    pub fn seed(&mut self, procs: impl IntoIterator<Item = Process>, read_app: AppReader<'_>) {
        for p in procs {
            self.procs.insert(p.pid, p);
        }
        self.resolve_all(read_app);
    }

    /// pm2 identity for children of verified Gods, then services and
    /// instances for everyone (after seeding or a sweep).
    fn resolve_all(&mut self, read_app: AppReader<'_>) {
        let gods: HashMap<u32, God> = self
            .procs
            .values()
            .filter_map(|p| Some((p.pid, p.god.clone()?)))
            .collect();
        for p in self.procs.values_mut() {
            if let Some(g) = gods.get(&p.ppid) {
                if p.pm2.is_none() {
                    p.pm2 = read_app(p.pid).map(|e| e.app(p.ppid, g.uid));
                }
            }
        }
        let pids: Vec<u32> = self.procs.keys().copied().collect();
        for pid in pids {
            // Helpers of an app (same lineage) carry its identity.
            let inherited = self.lineage_app(pid);
            if let Some(p) = self.procs.get_mut(&pid) {
                if p.pm2.is_none() {
                    p.pm2 = inherited;
                }
                (p.service, p.configured) = self.matcher.resolve(p, self.names);
                if is_supervisor(p) {
                    self.supervisor_changes.push((pid, true));
                }
            }
        }
        self.recompute_instances();
    }

    /// The pm2 app a process descends from, through parents that are not
    /// Gods (a helper an app spawned).
    fn lineage_app(&self, pid: u32) -> Option<Pm2App> {
        let mut cur = self.procs.get(&pid)?;
        for _ in 0..64 {
            let parent = self.procs.get(&cur.ppid)?;
            if parent.god.is_some() {
                return None;
            }
            if let Some(a) = &parent.pm2 {
                return Some(a.clone());
            }
            cur = parent;
        }
        None
    }

    /// After lost events: `live` is what /proc holds now. Drops every
    /// process it no longer has (or that is another process under a reused
    /// pid: start times more than `tolerance_ns` apart) and adds those the
    /// table missed. Returns (removed, added).
    pub fn reconcile(
        &mut self,
        live: HashMap<u32, Process>,
        tolerance_ns: u64,
        read_app: AppReader<'_>,
    ) -> (Vec<Process>, usize) {
        let mut removed = Vec::new();
        let known: Vec<u32> = self.procs.keys().copied().collect();
        for pid in known {
            let same = live
                .get(&pid)
                .is_some_and(|l| self.procs[&pid].start_ns.abs_diff(l.start_ns) <= tolerance_ns);
            if !same {
                if let Some(p) = self.procs.remove(&pid) {
                    if is_supervisor(&p) {
                        self.supervisor_changes.push((pid, false));
                    }
                    removed.push(p);
                }
            }
        }
        let mut added = 0;
        for (pid, p) in live {
            if let std::collections::hash_map::Entry::Vacant(v) = self.procs.entry(pid) {
                v.insert(p);
                added += 1;
            }
        }
        self.resolve_all(read_app);
        (removed, added)
    }

    /// A process replaced its image: it may now be a different service.
    /// `cgroup` is its cgroup now (`None` when it already exited).
    pub fn apply_exec(
        &mut self,
        e: &Exec,
        cgroup: Option<String>,
        read_app: AppReader<'_>,
    ) -> &Process {
        let inherited = self.procs.get(&e.pid);
        // pm2 identity only from a verified God's child, else what the
        // process inherited from an app it was forked from.
        let pm2 = match self.god(e.ppid) {
            Some(g) => read_app(e.pid).map(|env| env.app(e.ppid, g.uid)),
            None => inherited.and_then(|p| p.pm2.clone()),
        };
        // A process that exited before we looked keeps what its pre-exec
        // self (a fork of its parent) had.
        let cgroup = cgroup.or_else(|| inherited.and_then(|p| p.cgroup.clone()));
        let mut p = Process {
            pid: e.pid,
            ppid: e.ppid,
            uid: e.uid,
            exe: e.filename.clone(),
            argv: e.argv.clone(),
            start_ns: e.start_ns,
            unit: cgroup.as_deref().and_then(unit_from_cgroup),
            cgroup,
            god: god_from_exec(e.uid, &e.filename, &e.argv),
            pm2,
            service: String::new(),
            configured: false,
            instance: true,
        };
        (p.service, p.configured) = self.matcher.resolve(&p, self.names);
        p.instance = self.parent_service(p.ppid) != Some(p.service.as_str());
        if is_supervisor(&p) {
            self.supervisor_changes.push((p.pid, true));
        }
        self.procs.insert(e.pid, p);
        &self.procs[&e.pid]
    }

    /// A new process starts as a copy of its parent (but is no God).
    pub fn on_fork(&mut self, f: &Fork) {
        let p = match self.procs.get(&f.ppid) {
            // Same service as its parent, so a helper child, not an instance.
            Some(parent) => Process {
                pid: f.pid,
                ppid: f.ppid,
                uid: f.uid,
                start_ns: f.start_ns,
                god: None,
                instance: false,
                ..parent.clone()
            },
            None => {
                let mut p = Process {
                    pid: f.pid,
                    ppid: f.ppid,
                    uid: f.uid,
                    exe: String::new(),
                    argv: vec![f.comm.clone()],
                    start_ns: f.start_ns,
                    cgroup: None,
                    god: None,
                    pm2: None,
                    unit: None,
                    service: String::new(),
                    configured: false,
                    instance: true,
                };
                (p.service, p.configured) = self.matcher.resolve(&p, self.names);
                p
            }
        };
        self.procs.insert(f.pid, p);
    }

    /// A process died: returns what we knew of it.
    pub fn on_exit(&mut self, e: &Exit) -> Option<Process> {
        let p = self.procs.remove(&e.pid);
        if p.as_ref().is_some_and(is_supervisor) {
            self.supervisor_changes.push((e.pid, false));
        }
        p
    }

    /// Supervisors that appeared or died since the last call, for the
    /// kernel's wake-on-exec map.
    pub fn take_supervisor_changes(&mut self) -> Vec<(u32, bool)> {
        std::mem::take(&mut self.supervisor_changes)
    }

    /// Resolves a process the table doesn't know (e.g. one that died before
    /// its exec was processed) from the event alone.
    pub fn resolve_unknown(&self, uid: u32, comm: &str) -> String {
        fingerprint(uid, comm, &[], self.names)
    }

    /// Live pids of a service, sorted.
    pub fn pids_of(&self, service: &str) -> Vec<u32> {
        let mut v: Vec<u32> = self
            .procs
            .values()
            .filter(|p| p.service == service)
            .map(|p| p.pid)
            .collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{login_ancestry, Unit};
    use crate::testutil::{exec, table, DAEMON_JS};

    fn lily_env(_: u32) -> Option<crate::identity::Pm2Env> {
        Some(crate::identity::Pm2Env {
            name: "lily".into(),
            pm_id: Some(0),
            max_memory_restart: None,
        })
    }

    #[test]
    fn pm2_apps_only_from_a_verified_god_of_the_owner() {
        let mut t = table();
        // Root's God, then its app: lily.
        t.apply_exec(
            &exec(10, 1, 0, "/usr/bin/node", &["node", DAEMON_JS]),
            None,
            &mut |_| None,
        );
        let app = t.apply_exec(
            &exec(11, 10, 0, "/usr/bin/node", &["node", "app.js"]),
            None,
            &mut lily_env,
        );
        assert_eq!(
            (app.service.as_str(), app.configured, app.instance),
            ("lily", true, true)
        );
        // The same environment under a shell is nobody's pm2 app.
        t.apply_exec(&exec(20, 1, 65534, "/bin/sh", &["sh"]), None, &mut |_| None);
        let forged = t.apply_exec(
            &exec(21, 20, 65534, "/bin/sh", &["sh", "-c", "exit 1"]),
            None,
            &mut lily_env,
        );
        assert!(forged.pm2.is_none());
        assert!(
            forged.service.starts_with("fp:u65534/sh-"),
            "{}",
            forged.service
        );
        // A God of another user: its apps are pm2:USER/NAME.
        t.apply_exec(
            &exec(30, 1, 65534, "/usr/bin/node", &["node", DAEMON_JS]),
            None,
            &mut |_| None,
        );
        let theirs = t.apply_exec(
            &exec(31, 30, 65534, "/usr/bin/node", &["node", "a.js"]),
            None,
            &mut lily_env,
        );
        assert_eq!(
            (theirs.service.as_str(), theirs.configured),
            ("pm2:u65534/lily", false)
        );
        // A non-node process with Daemon.js in its argv is no God.
        t.apply_exec(
            &exec(40, 1, 0, "/bin/sh", &["sh", DAEMON_JS]),
            None,
            &mut |_| None,
        );
        assert!(t.god(40).is_none());
        // Helpers an app forks carry its identity, as helpers.
        t.on_fork(&Fork {
            pid: 12,
            ppid: 11,
            uid: 0,
            ts_ns: 2,
            start_ns: 12,
            comm: "node".into(),
        });
        let helper = t.apply_exec(
            &exec(12, 11, 0, "/bin/sh", &["sh", "-c", "x"]),
            None,
            &mut |_| None,
        );
        assert_eq!((helper.service.as_str(), helper.instance), ("lily", false));
    }

    #[test]
    fn units_only_under_system_slice_and_exe_only_for_its_user() {
        let mut t = table();
        let sys = t.apply_exec(
            &exec(5, 1, 0, "/usr/sbin/sshd", &["sshd"]),
            Some("/system.slice/ssh.service".into()),
            &mut |_| None,
        );
        assert_eq!(sys.service, "ssh");
        let user = t.apply_exec(
            &exec(6, 1, 1000, "/bin/sh", &["sh"]),
            Some("/user.slice/user-1000.slice/user@1000.service/app.slice/ssh.service".into()),
            &mut |_| None,
        );
        assert_eq!(
            (user.service.as_str(), user.configured),
            ("user-unit:1000:ssh.service", false)
        );
        assert_eq!(
            user.unit,
            Some(Unit::User {
                uid: 1000,
                unit: "ssh.service".into()
            })
        );
        let w = t.apply_exec(
            &exec(7, 1, 0, "/usr/local/bin/worker", &["worker"]),
            None,
            &mut |_| None,
        );
        assert_eq!(w.service, "worker");
        let w = t.apply_exec(
            &exec(8, 1, 65534, "/usr/local/bin/worker", &["worker"]),
            None,
            &mut |_| None,
        );
        assert!(w.service.starts_with("fp:u65534/worker-"), "{}", w.service);
        let w = t.apply_exec(
            &exec(9, 1, 0, "/tmp/worker", &["worker"]),
            None,
            &mut |_| None,
        );
        assert!(!w.configured);
    }

    #[test]
    fn approvals_need_a_login_and_nothing_supervised() {
        let mut t = table();
        t.apply_exec(
            &exec(100, 1, 0, "/usr/sbin/sshd", &["sshd"]),
            Some("/system.slice/ssh.service".into()),
            &mut |_| None,
        );
        t.apply_exec(
            &exec(101, 100, 0, "/usr/sbin/sshd", &["sshd: root"]),
            Some("/user.slice/user-0.slice/session-1.scope".into()),
            &mut |_| None,
        );
        t.apply_exec(
            &exec(102, 101, 0, "/bin/bash", &["-bash"]),
            Some("/user.slice/user-0.slice/session-1.scope".into()),
            &mut |_| None,
        );
        t.apply_exec(
            &exec(
                103,
                102,
                0,
                "/usr/local/sbin/governor",
                &["governor", "approve"],
            ),
            None,
            &mut |_| None,
        );
        assert!(login_ancestry(&t, 103).unwrap().starts_with("sshd"));
        // Under pm2, even with a pty of its own.
        t.apply_exec(
            &exec(10, 1, 0, "/usr/bin/node", &["node", DAEMON_JS]),
            None,
            &mut |_| None,
        );
        t.apply_exec(
            &exec(11, 10, 0, "/usr/bin/node", &["node", "agent.js"]),
            None,
            &mut lily_env,
        );
        t.apply_exec(
            &exec(
                12,
                11,
                0,
                "/usr/bin/script",
                &["script", "-qc", "governor approve"],
            ),
            None,
            &mut |_| None,
        );
        t.apply_exec(
            &exec(
                13,
                12,
                0,
                "/usr/local/sbin/governor",
                &["governor", "approve"],
            ),
            None,
            &mut |_| None,
        );
        let why = login_ancestry(&t, 13).unwrap_err();
        assert!(why.contains("pm2 app lily"), "{why}");
        // A root service with no login.
        t.apply_exec(
            &exec(50, 1, 0, "/usr/bin/python3", &["python3", "agent.py"]),
            Some("/system.slice/agent.service".into()),
            &mut |_| None,
        );
        t.apply_exec(
            &exec(51, 50, 0, "/usr/local/sbin/governor", &["governor"]),
            Some("/system.slice/agent.service".into()),
            &mut |_| None,
        );
        assert!(login_ancestry(&t, 51).unwrap_err().contains("no login"));
        // A login -f started by that service: its unit is not a login's.
        t.apply_exec(
            &exec(52, 50, 0, "/bin/login", &["login", "-f", "root"]),
            Some("/system.slice/agent.service".into()),
            &mut |_| None,
        );
        t.apply_exec(
            &exec(53, 52, 0, "/usr/local/sbin/governor", &["governor"]),
            Some("/system.slice/agent.service".into()),
            &mut |_| None,
        );
        assert!(
            login_ancestry(&t, 53).is_ok(),
            "documented: root can start a login of its own"
        );
        // cron.
        t.apply_exec(
            &exec(60, 1, 0, "/usr/sbin/cron", &["cron"]),
            None,
            &mut |_| None,
        );
        t.apply_exec(
            &exec(61, 60, 0, "/usr/local/sbin/governor", &["governor"]),
            None,
            &mut |_| None,
        );
        assert!(login_ancestry(&t, 61).unwrap_err().contains("cron"));
    }

    #[test]
    fn reconcile_drops_ghosts_and_reused_pids() {
        let mut t = table();
        t.apply_exec(&exec(70, 1, 0, "/bin/sleep", &["sleep"]), None, &mut |_| {
            None
        });
        t.apply_exec(&exec(71, 1, 0, "/bin/sleep", &["sleep"]), None, &mut |_| {
            None
        });
        let mut live = HashMap::new();
        // 70 is gone; 71 is another process under the same pid; 72 is new.
        let mut reused = t.get(71).unwrap().clone();
        reused.start_ns += 1_000_000_000;
        live.insert(71, reused);
        let mut new = t.get(71).unwrap().clone();
        new.pid = 72;
        live.insert(72, new);
        let (gone, added) = t.reconcile(live, 20_000_000, &mut |_| None);
        let mut gone: Vec<u32> = gone.iter().map(|p| p.pid).collect();
        gone.sort();
        assert_eq!((gone, added), (vec![70, 71], 2));
        assert!(t.get(70).is_none() && t.get(71).is_some() && t.get(72).is_some());
    }
}
