//! The procfs edge of the process table: what only /proc knows (processes
//! older than the daemon, cgroups, a verified God's children's pm2 names,
//! pid files), read here and handed to the pure table in
//! [`governor_core::table`]. Identity rules themselves are in
//! [`governor_core::identity`].

use std::{collections::HashMap, fs, os::unix::fs::MetadataExt, path::Path};

pub use governor_core::identity::{
    cgroup_within, fingerprint, is_supervisor, login_ancestry, parse_cgroup, parse_pm2_env,
    unit_from_cgroup, God, Match, Matcher, Pm2App, Process, Rule, Unit,
};
pub use governor_core::table::ProcTable;

use governor_core::identity::{god_from_exec, is_node};

use crate::{config::Config, events::Exec, users};

/// The matcher for a config: its services, owners resolved to uids.
pub fn matcher(cfg: &Config) -> Matcher {
    Matcher::new(
        cfg.services
            .iter()
            .map(|s| Rule {
                name: s.name.get_ref().clone(),
                matcher: if let Some(app) = &s.pm2 {
                    Match::Pm2 {
                        app: app.clone(),
                        owner: cfg.owner_of(s).and_then(|u| users::uid_of(&u)),
                    }
                } else if let Some(u) = &s.unit {
                    Match::Unit(u.clone())
                } else if let Some(c) = &s.cgroup {
                    Match::Cgroup(c.clone())
                } else {
                    Match::Exe {
                        path: s.exe.clone().unwrap_or_default(),
                        uid: cfg.owner_of(s).and_then(|u| users::uid_of(&u)),
                        args: s.args.as_ref().map(|a| a.0.clone()),
                    }
                },
            })
            .collect(),
    )
}

/// A table for a config, naming other users from /etc/passwd.
pub fn table(matcher: Matcher) -> ProcTable {
    ProcTable::new(matcher, users::name_of)
}

/// The cgroup of a live process; `None` when it is gone.
pub fn read_cgroup(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .ok()
        .and_then(|s| parse_cgroup(&s))
}

/// pm2's `(name, pm_id)` from a live process's environment. Only ever asked
/// by the table for children of a verified God.
pub fn read_pm2_env(pid: u32) -> Option<(String, Option<u32>)> {
    let env = fs::read(format!("/proc/{pid}/environ")).ok()?;
    parse_pm2_env(&env)
}

/// The table's view of /proc, for seeding and after lost events.
pub trait ProcFs {
    /// Seeds the table from /proc (processes that predate the daemon).
    fn seed_from_proc(&mut self) -> std::io::Result<usize>;
    /// After lost events: the table against /proc. (removed, added).
    fn reconcile_with_proc(&mut self) -> (Vec<Process>, usize);
    /// A kernel exec, with the cgroup and pm2 facts read now.
    fn on_exec(&mut self, e: &Exec) -> &Process;
}

impl ProcFs for ProcTable {
    fn seed_from_proc(&mut self) -> std::io::Result<usize> {
        let live = read_all()?;
        self.seed(live.into_values(), &mut read_pm2_env);
        Ok(self.len())
    }

    fn reconcile_with_proc(&mut self) -> (Vec<Process>, usize) {
        let live = read_all().unwrap_or_default();
        // /proc's start time has clock-tick resolution: the same process
        // is within two ticks of the kernel's nanoseconds.
        let tolerance = 2 * 1_000_000_000 / clock_ticks();
        self.reconcile(live, tolerance, &mut read_pm2_env)
    }

    fn on_exec(&mut self, e: &Exec) -> &Process {
        self.apply_exec(e, read_cgroup(e.pid), &mut read_pm2_env)
    }
}

fn read_all() -> std::io::Result<HashMap<u32, Process>> {
    let ticks = clock_ticks();
    let mut live = HashMap::new();
    for entry in fs::read_dir("/proc")?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(p) = read_proc(pid, ticks) {
            live.insert(pid, p);
        }
    }
    Ok(live)
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
    rustix::param::clock_ticks_per_second().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_in_comm() {
        let s = "123 (my (odd) proc) S 45 123 123 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 9876 0 0";
        assert_eq!(parse_stat(s), Some((45, 9876)));
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
