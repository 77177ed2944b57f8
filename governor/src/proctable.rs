//! The process table: every live process, which service it belongs to, and
//! how it got there. Seeded from /proc at start, then kept current from
//! kernel events alone.

use std::{collections::HashMap, fs, path::Path};

use sha2::Digest;

use crate::{
    config::{Config, Service},
    events::{Exec, Exit, Fork},
};

/// What pm2 tells its apps about themselves through the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pm2App {
    pub name: String,
    pub pm_id: Option<u32>,
}

/// One live process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub ppid: u32,
    pub exe: String,
    pub argv: Vec<String>,
    /// CLOCK_MONOTONIC ns when the process started.
    pub start_ns: u64,
    pub cgroup: Option<String>,
    pub pm2: Option<Pm2App>,
    pub unit: Option<String>,
    /// The service this process counts toward.
    pub service: String,
    /// Whether the service came from the config (not a fingerprint).
    pub configured: bool,
    /// An instance of its service (its parent belongs to another service:
    /// pm2's God daemon, systemd, a shell loop) rather than a helper child
    /// the service spawned. Only instance deaths are restarts.
    pub instance: bool,
}

/// Matches processes to configured services.
#[derive(Debug, Clone, Default)]
pub struct Matcher {
    services: Vec<Service>,
}

impl Matcher {
    pub fn new(cfg: &Config) -> Self {
        Matcher {
            services: cfg.services.clone(),
        }
    }

    /// The configured service a process belongs to, if any. First match wins,
    /// in config order.
    pub fn configured(&self, p: &Process) -> Option<&str> {
        self.services
            .iter()
            .find(|s| matches(s, p))
            .map(|s| s.name.get_ref().as_str())
    }

    /// The service name for a process: configured, else pm2 app, else
    /// systemd unit, else a fingerprint of exe + argv (so an unmanaged crash
    /// loop restarted by a shell loop or cron is still one service).
    pub fn resolve(&self, p: &Process) -> (String, bool) {
        if let Some(name) = self.configured(p) {
            return (name.to_string(), true);
        }
        if let Some(app) = &p.pm2 {
            return (format!("pm2:{}", app.name), false);
        }
        if let Some(unit) = &p.unit {
            return (format!("unit:{unit}"), false);
        }
        (fingerprint(&p.exe, &p.argv), false)
    }
}

fn matches(s: &Service, p: &Process) -> bool {
    if let Some(name) = &s.pm2 {
        return p.pm2.as_ref().is_some_and(|a| &a.name == name);
    }
    if let Some(unit) = &s.unit {
        return p.unit.as_deref() == Some(unit.as_str());
    }
    if let Some(cg) = &s.cgroup {
        return p
            .cgroup
            .as_deref()
            .is_some_and(|c| c.starts_with(cg.as_str()));
    }
    if let Some(exe) = &s.exe {
        let exe_ok = if exe.contains('/') {
            &p.exe == exe
        } else {
            Path::new(&p.exe)
                .file_name()
                .is_some_and(|b| b == exe.as_str())
        };
        return exe_ok
            && s.args
                .as_ref()
                .is_none_or(|r| r.0.is_match(&p.argv.join(" ")));
    }
    false
}

/// `fp:<exe basename>-<8 hex digits of sha256(exe, argv)>`: stable across
/// restarts of the same command line.
pub fn fingerprint(exe: &str, argv: &[String]) -> String {
    let mut h = sha2::Sha256::new();
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
    format!("fp:{base}-{:02x}{:02x}{:02x}{:02x}", d[0], d[1], d[2], d[3])
}

/// Reads what only /proc knows about a live process: cgroup, pm2 identity
/// (from its environment) and systemd unit. Missing files (the process
/// already exited) give `None`s, not errors.
pub fn proc_details(pid: u32) -> (Option<String>, Option<Pm2App>, Option<String>) {
    let cgroup = fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|s| parse_cgroup(&s));
    let pm2 = fs::read(format!("/proc/{pid}/environ"))
        .ok()
        .and_then(|b| parse_pm2_env(&b));
    let unit = cgroup.as_deref().and_then(unit_from_cgroup);
    (cgroup, pm2, unit)
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

/// The systemd service unit a cgroup path belongs to (deepest `.service`
/// component, skipping `user@N.service` which holds a user's whole session).
pub fn unit_from_cgroup(cg: &str) -> Option<String> {
    cg.split('/')
        .rev()
        .find(|c| c.ends_with(".service") && !c.starts_with("user@"))
        .map(str::to_string)
}

/// pm2 puts `name` and `pm_id` in each app's environment.
pub fn parse_pm2_env(environ: &[u8]) -> Option<Pm2App> {
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
        (Some(name), Some(id)) if !name.is_empty() => Some(Pm2App {
            name,
            pm_id: Some(id),
        }),
        _ => None,
    }
}

/// Whether a process supervises services: pm2's God daemon (its argv at
/// exec, or its title once it rewrote it), systemd (PID 1 and user
/// managers). Their children's execs must reach us while the child lives.
pub fn is_supervisor(p: &Process) -> bool {
    p.pid == 1
        || p.exe.ends_with("/systemd")
        || p.argv.iter().any(|a| a.ends_with("pm2/lib/Daemon.js"))
        || p.argv.first().is_some_and(|a| a.contains(": God Daemon"))
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
            let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some((ppid, start_ticks)) = parse_stat(&stat) else {
                continue;
            };
            let argv: Vec<String> = fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| split_nul(&b))
                .unwrap_or_default();
            // Kernel threads have no exe and no argv: not services.
            let Ok(exe) = fs::read_link(format!("/proc/{pid}/exe")) else {
                continue;
            };
            let exe = exe
                .to_string_lossy()
                .trim_end_matches(" (deleted)")
                .to_string();
            let (cgroup, pm2, unit) = proc_details(pid);
            let mut p = Process {
                pid,
                ppid,
                exe,
                argv,
                start_ns: start_ticks.saturating_mul(1_000_000_000) / ticks,
                cgroup,
                pm2,
                unit,
                service: String::new(),
                configured: false,
                instance: true,
            };
            (p.service, p.configured) = self.matcher.resolve(&p);
            if is_supervisor(&p) {
                self.supervisor_changes.push((pid, true));
            }
            self.procs.insert(pid, p);
        }
        self.recompute_instances();
        Ok(self.procs.len())
    }

    /// A process replaced its image: it may now be a different service.
    pub fn on_exec(&mut self, e: &Exec) -> &Process {
        let (cgroup, pm2, unit) = proc_details(e.pid);
        let inherited = self.procs.get(&e.pid);
        let mut p = Process {
            pid: e.pid,
            ppid: e.ppid,
            exe: e.filename.clone(),
            argv: e.argv.clone(),
            start_ns: e.start_ns,
            // A process that exited before we looked keeps what its
            // pre-exec self (a fork of its parent) had.
            cgroup: cgroup.or_else(|| inherited.and_then(|p| p.cgroup.clone())),
            pm2: pm2.or_else(|| inherited.and_then(|p| p.pm2.clone())),
            unit: unit.or_else(|| inherited.and_then(|p| p.unit.clone())),
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

    /// A new process starts as a copy of its parent.
    pub fn on_fork(&mut self, f: &Fork) {
        let p = match self.procs.get(&f.ppid) {
            // Same service as its parent, so a helper child, not an instance.
            Some(parent) => Process {
                pid: f.pid,
                ppid: f.ppid,
                start_ns: f.start_ns,
                instance: false,
                ..parent.clone()
            },
            None => {
                let mut p = Process {
                    pid: f.pid,
                    ppid: f.ppid,
                    exe: String::new(),
                    argv: vec![f.comm.clone()],
                    start_ns: f.start_ns,
                    cgroup: None,
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
    pub fn resolve_unknown(&self, comm: &str) -> String {
        fingerprint(comm, &[])
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
            Some(Pm2App {
                name: "lily".into(),
                pm_id: Some(3)
            })
        );
        assert_eq!(parse_pm2_env(b"name=lily\0"), None);
    }

    #[test]
    fn units_from_cgroups() {
        assert_eq!(
            unit_from_cgroup("/system.slice/lily.service").as_deref(),
            Some("lily.service")
        );
        assert_eq!(
            unit_from_cgroup("/user.slice/user-0.slice/user@0.service/app.slice"),
            None
        );
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
        let a = fingerprint("/usr/bin/python3", &["python3".into(), "bot.py".into()]);
        let b = fingerprint("/usr/bin/python3", &["python3".into(), "bot.py".into()]);
        let c = fingerprint("/usr/bin/python3", &["python3".into(), "api.py".into()]);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.starts_with("fp:python3-"));
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
