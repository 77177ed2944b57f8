//! The process table: every live process, which service it belongs to, and
//! how it got there. Seeded from /proc at start, then kept current from
//! kernel events alone.
//!
//! Identity is taken only from what no local user can forge:
//! - a **pm2 app** is a child of a *verified* pm2 God daemon (the kernel saw
//!   node exec pm2's `lib/Daemon.js`, or — for one older than governor — a
//!   node process that its owner's `PM2_HOME/pm2.pid` names); its name and
//!   pm_id are read only then. The God's owner (a kernel uid) is part of the
//!   identity: a configured `pm2 = "lily"` matches only apps of a God run by
//!   the service's `pm2_user`, so forging it means already being that user.
//! - a **systemd unit** is a cgroup under `/system.slice/` (only root makes
//!   those); a user manager's units are `user-unit:UID:NAME`.
//! - everything else is a fingerprint of uid + exe + argv: another user's
//!   command line is another service.

use std::{collections::HashMap, fs, os::unix::fs::MetadataExt, path::Path};

use sha2::Digest;

use crate::{
    config::{Config, Service},
    events::{Exec, Exit, Fork},
    users,
};

/// A verified pm2 God daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct God {
    /// Its owner: pm2 apps run as this user unless pm2 was told otherwise,
    /// and pm2 commands for them run as this user.
    pub uid: u32,
    /// `lib/Daemon.js` as the kernel saw it at exec (locates pm2's CLI).
    pub daemon_js: Option<String>,
    /// PM2_HOME, when known (a God verified through its pid file).
    pub home: Option<String>,
}

/// What pm2 tells its apps about themselves, read only for children of a
/// verified God.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pm2App {
    pub name: String,
    pub pm_id: Option<u32>,
    pub god_pid: u32,
    pub god_uid: u32,
}

/// A systemd unit, by the manager that runs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unit {
    /// Under `/system.slice/`: PID 1's.
    System(String),
    /// Under `user@UID.service`: that user's own manager's.
    User { uid: u32, unit: String },
}

impl std::fmt::Display for Unit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unit::System(u) => write!(f, "{u}"),
            Unit::User { uid, unit } => write!(f, "user-unit:{uid}:{unit}"),
        }
    }
}

/// One live process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    /// Real uid, from the kernel.
    pub uid: u32,
    pub exe: String,
    pub argv: Vec<String>,
    /// CLOCK_MONOTONIC ns when the process started.
    pub start_ns: u64,
    pub cgroup: Option<String>,
    /// Set when this process is a verified pm2 God daemon.
    pub god: Option<God>,
    pub pm2: Option<Pm2App>,
    pub unit: Option<Unit>,
    /// The service this process counts toward.
    pub service: String,
    /// Whether the service came from the config (not a fingerprint).
    pub configured: bool,
    /// An instance of its service (its parent belongs to another service:
    /// pm2's God daemon, systemd, a shell loop) rather than a helper child
    /// the service spawned. Only instance deaths are restarts.
    pub instance: bool,
}

/// A configured service with its owners resolved to uids.
#[derive(Debug, Clone)]
struct Rule {
    service: Service,
    /// pm2: the God's owner; exe: the process's uid. `None` only when the
    /// user is unknown, which config validation refuses.
    uid: Option<u32>,
}

/// Matches processes to configured services.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    rules: Vec<Rule>,
}

impl Matcher {
    pub fn new(cfg: &Config) -> Self {
        Matcher {
            rules: cfg
                .services
                .iter()
                .map(|s| Rule {
                    uid: cfg.owner_of(s).and_then(|u| users::uid_of(&u)),
                    service: s.clone(),
                })
                .collect(),
        }
    }

    /// The configured service a process belongs to, if any. First match wins,
    /// in config order.
    pub fn configured(&self, p: &Process) -> Option<&str> {
        self.rules
            .iter()
            .find(|r| matches(r, p))
            .map(|r| r.service.name.get_ref().as_str())
    }

    /// The service name for a process: configured, else pm2 app, else
    /// systemd unit, else a fingerprint of uid + exe + argv (so an unmanaged
    /// crash loop restarted by a shell loop or cron is still one service).
    pub fn resolve(&self, p: &Process) -> (String, bool) {
        if let Some(name) = self.configured(p) {
            return (name.to_string(), true);
        }
        if let Some(app) = &p.pm2 {
            return (
                if app.god_uid == 0 {
                    format!("pm2:{}", app.name)
                } else {
                    format!("pm2:{}/{}", users::name_of(app.god_uid), app.name)
                },
                false,
            );
        }
        match &p.unit {
            Some(Unit::System(u)) => return (format!("unit:{u}"), false),
            Some(u @ Unit::User { .. }) => return (u.to_string(), false),
            None => {}
        }
        (fingerprint(p.uid, &p.exe, &p.argv), false)
    }
}

fn matches(r: &Rule, p: &Process) -> bool {
    let s = &r.service;
    if let Some(name) = &s.pm2 {
        return p
            .pm2
            .as_ref()
            .is_some_and(|a| &a.name == name && Some(a.god_uid) == r.uid);
    }
    if let Some(unit) = &s.unit {
        return p.unit.as_ref() == Some(&Unit::System(unit.clone()));
    }
    if let Some(cg) = &s.cgroup {
        return p.cgroup.as_deref().is_some_and(|c| cgroup_within(c, cg));
    }
    if let Some(exe) = &s.exe {
        // Config validation requires an absolute path: a bare name would
        // match any copy of the binary, anywhere, by anyone.
        return &p.exe == exe
            && Some(p.uid) == r.uid
            && s.args
                .as_ref()
                .is_none_or(|re| re.0.is_match(&p.argv.join(" ")));
    }
    false
}

/// Whether cgroup path `c` is `prefix` or inside it, by whole components
/// (`/system.slice/a.service` is not inside `/system.slice/a`).
pub fn cgroup_within(c: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    c == prefix
        || c.strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// `fp:[USER/]<exe basename>-<8 hex digits of sha256(uid, exe, argv)>`:
/// stable across restarts of the same command line by the same user; the
/// user is named unless it is root.
pub fn fingerprint(uid: u32, exe: &str, argv: &[String]) -> String {
    let mut h = sha2::Sha256::new();
    h.update(uid.to_le_bytes());
    h.update(exe.as_bytes());
    for a in argv.iter().skip(1) {
        h.update([0u8]);
        h.update(a.as_bytes());
    }
    let d = h.finalize();
    let base = Path::new(exe)
        .file_name()
        .map(|b| b.to_string_lossy().into_owned())
        .unwrap_or_else(|| "unknown".into());
    let user = if uid == 0 {
        String::new()
    } else {
        format!("{}/", users::name_of(uid))
    };
    format!(
        "fp:{user}{base}-{:02x}{:02x}{:02x}{:02x}",
        d[0], d[1], d[2], d[3]
    )
}

/// The cgroup of a live process; `None` when it is gone.
pub fn read_cgroup(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|s| parse_cgroup(&s))
}

/// pm2's app identity from the environment of a child of a verified God.
fn read_pm2_app(pid: u32, god_pid: u32, god: &God) -> Option<Pm2App> {
    let env = fs::read(format!("/proc/{pid}/environ")).ok()?;
    let (name, pm_id) = parse_pm2_env(&env)?;
    Some(Pm2App {
        name,
        pm_id,
        god_pid,
        god_uid: god.uid,
    })
}

/// The cgroup v2 path (`0::/system.slice/x.service`), or the systemd
/// hierarchy's on v1.
pub fn parse_cgroup(s: &str) -> Option<String> {
    let mut v1 = None;
    for line in s.lines() {
        if let Some(p) = line.strip_prefix("0::") {
            return Some(p.to_string());
        }
        if let Some(p) = line.split_once(":name=systemd:").map(|(_, p)| p) {
            v1 = Some(p.to_string());
        }
    }
    v1
}

/// The systemd unit a cgroup path belongs to: the first `.service` under
/// `/system.slice/` (PID 1's units; only root can place a process there),
/// or the first `.service` inside a `user@UID.service` (that user's own
/// manager, whose subtree the user controls).
pub fn unit_from_cgroup(cg: &str) -> Option<Unit> {
    if let Some(rest) = cg.strip_prefix("/system.slice/") {
        return rest
            .split('/')
            .find(|c| c.ends_with(".service"))
            .map(|u| Unit::System(u.to_string()));
    }
    let mut parts = cg.split('/');
    let uid = parts.by_ref().find_map(|c| {
        c.strip_prefix("user@")?
            .strip_suffix(".service")?
            .parse::<u32>()
            .ok()
    })?;
    parts.find(|c| c.ends_with(".service")).map(|u| Unit::User {
        uid,
        unit: u.to_string(),
    })
}

/// pm2 puts `name` and `pm_id` in each app's environment.
pub fn parse_pm2_env(environ: &[u8]) -> Option<(String, Option<u32>)> {
    let mut name = None;
    let mut pm_id = None;
    for var in environ.split(|&b| b == 0) {
        if let Some(v) = var.strip_prefix(b"pm_id=") {
            pm_id = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok());
        } else if let Some(v) = var.strip_prefix(b"name=") {
            name = Some(String::from_utf8_lossy(v).into_owned());
        }
    }
    // `name` alone is too common a variable; pm2 always sets both.
    match (name, pm_id) {
        (Some(name), Some(id)) if !name.is_empty() => Some((name, Some(id))),
        _ => None,
    }
}

fn is_node(exe: &str) -> bool {
    Path::new(exe)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("node"))
}

/// A God daemon as the kernel saw it exec: node running pm2's Daemon.js.
/// Anyone can exec that; what makes its apps a configured service is the
/// uid, which the kernel reports.
fn god_from_exec(uid: u32, exe: &str, argv: &[String]) -> Option<God> {
    if !is_node(exe) {
        return None;
    }
    let js = argv
        .iter()
        .skip(1)
        .find(|a| a.ends_with("/lib/Daemon.js") && a.contains("pm2"))?;
    Some(God {
        uid,
        daemon_js: Some(js.clone()),
        home: None,
    })
}

/// A God daemon that predates governor (its title rewritten to
/// `PM2 vX: God Daemon (HOME)`): trusted when its owner's
/// `PM2_HOME/pm2.pid`, a file owned by that uid, names it.
fn god_from_proc(pid: u32, uid: u32, exe: &str, argv: &[String]) -> Option<God> {
    if !is_node(exe) {
        return None;
    }
    if let Some(g) = god_from_exec(uid, exe, argv) {
        return verify_pid_file(pid, uid, g);
    }
    let title = argv.join(" ");
    if !title.contains("God Daemon") {
        return None;
    }
    let env = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let from_env = env
        .split(|&b| b == 0)
        .find_map(|v| v.strip_prefix(b"PM2_HOME="))
        .map(|v| String::from_utf8_lossy(v).into_owned());
    let from_title = title
        .rsplit_once('(')
        .and_then(|(_, r)| r.strip_suffix(')'))
        .map(str::to_string);
    let home = from_env.or(from_title)?;
    verify_pid_file(
        pid,
        uid,
        God {
            uid,
            daemon_js: None,
            home: Some(home),
        },
    )
}

fn verify_pid_file(pid: u32, uid: u32, mut g: God) -> Option<God> {
    let home = match &g.home {
        Some(h) => h.clone(),
        None => {
            // Daemon.js seen in argv (a God started before us whose title
            // was not yet rewritten): its home from the environment.
            let env = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            env.split(|&b| b == 0)
                .find_map(|v| v.strip_prefix(b"PM2_HOME="))
                .map(|v| String::from_utf8_lossy(v).into_owned())?
        }
    };
    let path = Path::new(&home).join("pm2.pid");
    let meta = fs::symlink_metadata(&path).ok()?;
    if !meta.is_file() || meta.uid() != uid {
        return None;
    }
    let named: u32 = fs::read_to_string(&path).ok()?.trim().parse().ok()?;
    if named != pid {
        return None;
    }
    g.home = Some(home);
    Some(g)
}

/// Whether a process supervises services: a verified pm2 God, systemd (PID
/// 1 and user managers). Their children's execs must reach us while the
/// child lives.
pub fn is_supervisor(p: &Process) -> bool {
    p.pid == 1 || p.god.is_some() || p.exe.ends_with("/systemd")
}

/// Whether a caller descends from a login session and from nothing
/// automated: `Ok` names the login, `Err` says why not. Walks the whole
/// ancestry in the kernel-fed table, up to PID 1: it must hold a login
/// process (sshd, login, a getty) and no pm2 God or app and no cron; a
/// process in a systemd service is allowed only in the unit of a login
/// process of the chain (sshd's own `ssh.service`, a getty's).
///
/// What this proves: the request was typed under a login session, not
/// spawned by a supervisor. What it doesn't: a root process that starts a
/// `login -f` session of its own, or a person's automation inside their
/// ssh session, looks the same — root can always impersonate a login.
pub fn login_ancestry(table: &ProcTable, pid: u32) -> Result<String, String> {
    let mut chain: Vec<&Process> = Vec::new();
    let mut next = Some(pid);
    while let Some(p) = next {
        let Some(proc_) = table.get(p) else {
            if p == 1 {
                // An init whose /proc entry we can't read (a container's):
                // the top of the tree either way.
                break;
            }
            return Err(format!(
                "the caller's ancestor pid {p} is unknown to governor's process table"
            ));
        };
        chain.push(proc_);
        if chain.len() > 512 {
            return Err("the caller's ancestry is too deep".into());
        }
        next = (proc_.pid > 1 && proc_.ppid != 0).then_some(proc_.ppid);
    }
    let base = |p: &Process| {
        Path::new(&p.exe)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_string()
    };
    for p in &chain {
        if let Some(app) = &p.pm2 {
            return Err(format!(
                "the caller descends from pm2 app {} (pid {})",
                app.name, p.pid
            ));
        }
        if p.god.is_some() {
            return Err(format!(
                "the caller descends from a pm2 God daemon (pid {})",
                p.pid
            ));
        }
        let b = base(p);
        if matches!(b.as_str(), "cron" | "crond" | "anacron" | "atd") {
            return Err(format!("the caller descends from {b} (pid {})", p.pid));
        }
    }
    let Some(login) = chain.iter().find(|p| is_login(&base(p))) else {
        return Err("the caller has no login (sshd, login, getty) among its ancestors".into());
    };
    let login_units: Vec<&Unit> = chain
        .iter()
        .filter(|p| is_login(&base(p)))
        .filter_map(|p| p.unit.as_ref())
        .collect();
    for p in &chain {
        if let Some(u) = &p.unit {
            if !login_units.contains(&u) {
                return Err(format!(
                    "the caller descends from systemd unit {u} (pid {} {}), not a login session",
                    p.pid, p.exe
                ));
            }
        }
    }
    Ok(format!("{} (pid {})", base(login), login.pid))
}

fn is_login(base: &str) -> bool {
    matches!(
        base,
        "sshd" | "sshd-session" | "login" | "agetty" | "getty" | "mingetty"
    )
}

/// The live processes, keyed by pid.
#[derive(Debug, Default)]
pub struct ProcTable {
    procs: HashMap<u32, Process>,
    matcher: Matcher,
    /// Supervisors that appeared (true) or died (false) since last taken.
    supervisor_changes: Vec<(u32, bool)>,
}

impl ProcTable {
    pub fn new(matcher: Matcher) -> Self {
        ProcTable {
            procs: HashMap::new(),
            matcher,
            supervisor_changes: Vec::new(),
        }
    }

    /// Replaces the matchers (config reload) and re-resolves every process.
    pub fn set_matcher(&mut self, matcher: Matcher) {
        self.matcher = matcher;
        for p in self.procs.values_mut() {
            let (s, c) = self.matcher.resolve(p);
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

    /// Reads one live process from /proc; `None` for kernel threads and
    /// processes already gone.
    fn read_proc(pid: u32, ticks: u64) -> Option<Process> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (ppid, start_ticks) = parse_stat(&stat)?;
        // The owner of /proc/PID is the process's effective uid; the real
        // uid is in status, as the kernel reports it in events.
        let uid = fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Uid:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })?;
        let argv: Vec<String> = fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| split_nul(&b))
            .unwrap_or_default();
        // Kernel threads have no exe and no argv: not services.
        let exe = fs::read_link(format!("/proc/{pid}/exe")).ok()?;
        let exe = exe
            .to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_string();
        let cgroup = read_cgroup(pid);
        let unit = cgroup.as_deref().and_then(unit_from_cgroup);
        let god = god_from_proc(pid, uid, &exe, &argv);
        Some(Process {
            pid,
            ppid,
            uid,
            exe,
            argv,
            start_ns: start_ticks.saturating_mul(1_000_000_000) / ticks,
            cgroup,
            god,
            pm2: None,
            unit,
            service: String::new(),
            configured: false,
            instance: true,
        })
    }

    /// Seeds the table from /proc (processes that predate the daemon).
    pub fn seed_from_proc(&mut self) -> std::io::Result<usize> {
        let ticks = clock_ticks();
        for entry in fs::read_dir("/proc")? {
            let Ok(entry) = entry else { continue };
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(p) = Self::read_proc(pid, ticks) {
                self.procs.insert(pid, p);
            }
        }
        self.resolve_all();
        Ok(self.procs.len())
    }

    /// pm2 identity for children of verified Gods, then services and
    /// instances for everyone (after seeding or a sweep).
    fn resolve_all(&mut self) {
        let gods: HashMap<u32, God> = self
            .procs
            .values()
            .filter_map(|p| Some((p.pid, p.god.clone()?)))
            .collect();
        for p in self.procs.values_mut() {
            if let Some(g) = gods.get(&p.ppid) {
                if p.pm2.is_none() {
                    p.pm2 = read_pm2_app(p.pid, p.ppid, g);
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
                (p.service, p.configured) = self.matcher.resolve(p);
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

    /// After lost events: drops every process /proc no longer has (or that
    /// is another process under a reused pid) and adds those it missed.
    /// Returns (removed, added).
    pub fn reconcile_with_proc(&mut self) -> (Vec<Process>, usize) {
        let ticks = clock_ticks();
        let mut live: HashMap<u32, Process> = HashMap::new();
        if let Ok(dir) = fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                if let Some(p) = Self::read_proc(pid, ticks) {
                    live.insert(pid, p);
                }
            }
        }
        // /proc's start time has clock-tick resolution: the same process
        // is within two ticks of the kernel's nanoseconds.
        let tolerance = 2 * 1_000_000_000 / ticks;
        let mut removed = Vec::new();
        let known: Vec<u32> = self.procs.keys().copied().collect();
        for pid in known {
            let same = live
                .get(&pid)
                .is_some_and(|l| self.procs[&pid].start_ns.abs_diff(l.start_ns) <= tolerance);
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
        self.resolve_all();
        (removed, added)
    }

    /// A process replaced its image: it may now be a different service.
    pub fn on_exec(&mut self, e: &Exec) -> &Process {
        let cgroup = read_cgroup(e.pid);
        let inherited = self.procs.get(&e.pid);
        // pm2 identity only from a verified God's child, else what the
        // process inherited from an app it was forked from.
        let pm2 = match self.god(e.ppid) {
            Some(g) => read_pm2_app(e.pid, e.ppid, g),
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
        (p.service, p.configured) = self.matcher.resolve(&p);
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
                (p.service, p.configured) = self.matcher.resolve(&p);
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
        fingerprint(uid, comm, &[])
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

fn split_nul(b: &[u8]) -> Vec<String> {
    b.split(|&c| c == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// (ppid, starttime in clock ticks) from /proc/PID/stat. The comm field may
/// contain spaces and parentheses, so parse after the last `)`.
fn parse_stat(stat: &str) -> Option<(u32, u64)> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); ppid is field 4, starttime field 22.
    Some((fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pm2_env_needs_name_and_id() {
        assert_eq!(
            parse_pm2_env(b"PATH=/bin\0name=lily\0pm_id=3\0"),
            Some(("lily".into(), Some(3)))
        );
        assert_eq!(parse_pm2_env(b"name=lily\0"), None);
    }

    #[test]
    fn units_from_cgroups() {
        assert_eq!(
            unit_from_cgroup("/system.slice/lily.service"),
            Some(Unit::System("lily.service".into()))
        );
        assert_eq!(
            unit_from_cgroup("/system.slice/system-getty.slice/getty@tty1.service"),
            Some(Unit::System("getty@tty1.service".into()))
        );
        assert_eq!(
            unit_from_cgroup("/user.slice/user-0.slice/user@0.service/app.slice"),
            None
        );
        // A user's own unit named like a system one is not the system's.
        assert_eq!(
            unit_from_cgroup("/user.slice/user-1000.slice/user@1000.service/app.slice/ssh.service"),
            Some(Unit::User {
                uid: 1000,
                unit: "ssh.service".into()
            })
        );
        assert_eq!(
            unit_from_cgroup("/user.slice/user-1000.slice/session-3.scope"),
            None
        );
        assert_eq!(unit_from_cgroup("/x/ssh.service"), None);
        assert!(cgroup_within(
            "/system.slice/a.service",
            "/system.slice/a.service"
        ));
        assert!(cgroup_within(
            "/system.slice/a.service/x",
            "/system.slice/a.service/"
        ));
        assert!(!cgroup_within(
            "/system.slice/a.servicex",
            "/system.slice/a.service"
        ));
        assert_eq!(
            parse_cgroup("0::/system.slice/x.service\n").as_deref(),
            Some("/system.slice/x.service")
        );
    }

    #[test]
    fn stat_with_spaces_in_comm() {
        let s = "123 (my (odd) proc) S 45 123 123 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 9876 0 0";
        assert_eq!(parse_stat(s), Some((45, 9876)));
    }

    #[test]
    fn fingerprints_are_stable_and_distinct() {
        let a = fingerprint(0, "/usr/bin/python3", &["python3".into(), "bot.py".into()]);
        let b = fingerprint(0, "/usr/bin/python3", &["python3".into(), "bot.py".into()]);
        let c = fingerprint(0, "/usr/bin/python3", &["python3".into(), "api.py".into()]);
        let other = fingerprint(
            4242,
            "/usr/bin/python3",
            &["python3".into(), "bot.py".into()],
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.starts_with("fp:python3-"));
        // Another user's identical command line is another service.
        assert!(other.starts_with("fp:4242/python3-"), "{other}");
        assert_ne!(a[3..], other[8..]);
    }

    #[test]
    fn seeds_from_proc_including_ourselves() {
        let mut t = ProcTable::default();
        t.seed_from_proc().unwrap();
        let me = t.get(std::process::id()).expect("own process in table");
        assert!(me.exe.contains("governor"), "{}", me.exe);
        assert_eq!(me.ppid, std::os::unix::process::parent_id());
    }
}
