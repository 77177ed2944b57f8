//! Identity: which service a process is, from facts no local user can
//! forge. Pure: the daemon's edges read /proc and the kernel; this module
//! only decides.
//!
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

use std::path::Path;

use sha2::Digest;

use crate::table::ProcTable;

/// uid → the name shown in service names (the daemon reads /etc/passwd).
pub type UserNames = fn(u32) -> String;

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
    /// pm2's own `max_memory_restart` for the app (bytes), when set: shown
    /// beside governor's ceiling.
    pub max_memory_restart: Option<u64>,
}

/// What pm2 put in an app's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pm2Env {
    pub name: String,
    pub pm_id: Option<u32>,
    pub max_memory_restart: Option<u64>,
}

impl Pm2Env {
    /// The app, as a child of the verified God `god_pid` owned by `god_uid`.
    pub fn app(self, god_pid: u32, god_uid: u32) -> Pm2App {
        Pm2App {
            name: self.name,
            pm_id: self.pm_id,
            god_pid,
            god_uid,
            max_memory_restart: self.max_memory_restart,
        }
    }
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

/// How a configured service is recognised, owners already resolved to
/// uids by the daemon.
#[derive(Debug, Clone)]
pub enum Match {
    /// An app of a God run by `owner` (`None`: an unknown user, matching
    /// nothing).
    Pm2 { app: String, owner: Option<u32> },
    /// A unit of PID 1's (under `/system.slice/`).
    Unit(String),
    /// A cgroup path prefix, by whole components.
    Cgroup(String),
    /// An absolute executable path, run by `uid`, argv optionally matching.
    Exe {
        path: String,
        uid: Option<u32>,
        args: Option<regex::Regex>,
    },
}

/// One configured service.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    pub matcher: Match,
}

/// Matches processes to configured services.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    rules: Vec<Rule>,
}

impl Matcher {
    pub fn new(rules: Vec<Rule>) -> Self {
        Matcher { rules }
    }

    /// The configured service a process belongs to, if any. First match wins,
    /// in config order.
    pub fn configured(&self, p: &Process) -> Option<&str> {
        self.rules
            .iter()
            .find(|r| matches(&r.matcher, p))
            .map(|r| r.name.as_str())
    }

    /// The service name for a process: configured, else pm2 app, else
    /// systemd unit, else a fingerprint of uid + exe + argv (so an unmanaged
    /// crash loop restarted by a shell loop or cron is still one service).
    pub fn resolve(&self, p: &Process, names: UserNames) -> (String, bool) {
        if let Some(name) = self.configured(p) {
            return (name.to_string(), true);
        }
        if let Some(app) = &p.pm2 {
            return (
                if app.god_uid == 0 {
                    format!("pm2:{}", app.name)
                } else {
                    format!("pm2:{}/{}", names(app.god_uid), app.name)
                },
                false,
            );
        }
        match &p.unit {
            Some(Unit::System(u)) => return (format!("unit:{u}"), false),
            Some(u @ Unit::User { .. }) => return (u.to_string(), false),
            None => {}
        }
        (fingerprint(p.uid, &p.exe, &p.argv, names), false)
    }
}

fn matches(m: &Match, p: &Process) -> bool {
    match m {
        Match::Pm2 { app, owner } => p
            .pm2
            .as_ref()
            .is_some_and(|a| &a.name == app && Some(a.god_uid) == *owner),
        Match::Unit(unit) => p.unit.as_ref() == Some(&Unit::System(unit.clone())),
        Match::Cgroup(cg) => p.cgroup.as_deref().is_some_and(|c| cgroup_within(c, cg)),
        // Config validation requires an absolute path: a bare name would
        // match any copy of the binary, anywhere, by anyone.
        Match::Exe { path, uid, args } => {
            &p.exe == path
                && Some(p.uid) == *uid
                && args
                    .as_ref()
                    .is_none_or(|re| re.is_match(&p.argv.join(" ")))
        }
    }
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
pub fn fingerprint(uid: u32, exe: &str, argv: &[String], names: UserNames) -> String {
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
        format!("{}/", names(uid))
    };
    format!(
        "fp:{user}{base}-{:02x}{:02x}{:02x}{:02x}",
        d[0], d[1], d[2], d[3]
    )
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

/// pm2 puts `name` and `pm_id` in each app's environment, and
/// `max_memory_restart` (bytes) when the app has one.
pub fn parse_pm2_env(environ: &[u8]) -> Option<Pm2Env> {
    let mut name = None;
    let mut pm_id = None;
    let mut max_memory_restart = None;
    for var in environ.split(|&b| b == 0) {
        if let Some(v) = var.strip_prefix(b"pm_id=") {
            pm_id = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok());
        } else if let Some(v) = var.strip_prefix(b"name=") {
            name = Some(String::from_utf8_lossy(v).into_owned());
        } else if let Some(v) = var.strip_prefix(b"max_memory_restart=") {
            max_memory_restart = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse().ok())
                .filter(|&b: &u64| b > 0);
        }
    }
    // `name` alone is too common a variable; pm2 always sets both.
    match (name, pm_id) {
        (Some(name), Some(id)) if !name.is_empty() => Some(Pm2Env {
            name,
            pm_id: Some(id),
            max_memory_restart,
        }),
        _ => None,
    }
}

pub fn is_node(exe: &str) -> bool {
    Path::new(exe)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("node"))
}

/// A God daemon as the kernel saw it exec: node running pm2's Daemon.js.
/// Anyone can exec that; what makes its apps a configured service is the
/// uid, which the kernel reports.
pub fn god_from_exec(uid: u32, exe: &str, argv: &[String]) -> Option<God> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn uid_str(u: u32) -> String {
        u.to_string()
    }

    #[test]
    fn pm2_env_needs_name_and_id() {
        assert_eq!(
            parse_pm2_env(b"PATH=/bin\0name=lily\0pm_id=3\0"),
            Some(Pm2Env {
                name: "lily".into(),
                pm_id: Some(3),
                max_memory_restart: None
            })
        );
        assert_eq!(
            parse_pm2_env(b"name=lily\0pm_id=3\0max_memory_restart=314572800\0")
                .and_then(|e| e.max_memory_restart),
            Some(314572800)
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
    fn fingerprints_are_stable_and_distinct() {
        let a = fingerprint(
            0,
            "/usr/bin/python3",
            &["python3".into(), "bot.py".into()],
            uid_str,
        );
        let b = fingerprint(
            0,
            "/usr/bin/python3",
            &["python3".into(), "bot.py".into()],
            uid_str,
        );
        let c = fingerprint(
            0,
            "/usr/bin/python3",
            &["python3".into(), "api.py".into()],
            uid_str,
        );
        let other = fingerprint(
            4242,
            "/usr/bin/python3",
            &["python3".into(), "bot.py".into()],
            uid_str,
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.starts_with("fp:python3-"));
        // Another user's identical command line is another service.
        assert!(other.starts_with("fp:4242/python3-"), "{other}");
        assert_ne!(a[3..], other[8..]);
    }
}
