//! The procfs edge of the process table: what only /proc knows (processes
//! older than the daemon, cgroups, a verified God's children's pm2 names,
//! pid files), read here and handed to the pure table in
//! [`governor_core::table`]. Identity rules themselves are in
//! [`governor_core::identity`].

use std::{collections::HashMap, ffi::OsStr, fs, os::unix::fs::MetadataExt, path::Path};

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

/// What pm2 put in a live process's environment. Only ever asked by the
/// table for children of a verified God.
pub fn read_pm2_env(pid: u32) -> Option<governor_core::identity::Pm2Env> {
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
    let all = procfs::process::all_processes().map_err(std::io::Error::other)?;
    // Processes gone between the listing and their reading are skipped.
    for p in all.flatten().filter_map(|p| read_proc(&p, ticks)) {
        live.insert(p.pid, p);
    }
    Ok(live)
}

/// Reads one live process from /proc; `None` for kernel threads and
/// processes already gone. Every file is read through the one open
/// /proc/PID directory, so they all describe the same process.
fn read_proc(proc: &procfs::process::Process, ticks: u64) -> Option<Process> {
    let pid = u32::try_from(proc.pid()).ok()?;
    let stat = proc.stat().ok()?;
    // The owner of /proc/PID is the process's effective uid; the real
    // uid is in status, as the kernel reports it in events. Read as bytes:
    // a name that is not UTF-8 (any process can set one) must not hide
    // the process from the table.
    let uid = real_uid(proc)?;
    let argv = proc.cmdline().unwrap_or_default();
    // Kernel threads have no exe and no argv: not services.
    let exe = proc.exe().ok()?;
    let exe = exe
        .to_string_lossy()
        .trim_end_matches(" (deleted)")
        .to_string();
    let cgroup = read_cgroup(pid);
    let unit = cgroup.as_deref().and_then(unit_from_cgroup);
    let god = god_from_proc(proc, uid, &exe, &argv);
    Some(Process {
        pid,
        ppid: u32::try_from(stat.ppid).ok()?,
        uid,
        exe,
        argv,
        start_ns: stat.starttime.saturating_mul(1_000_000_000) / ticks,
        cgroup,
        god,
        pm2: None,
        unit,
        service: String::new(),
        configured: false,
        instance: true,
    })
}

/// The real uid from `/proc/PID/status` (`Uid:` real effective saved fs),
/// whatever bytes the process put in its name.
fn real_uid(proc: &procfs::process::Process) -> Option<u32> {
    use std::io::Read;
    let mut raw = Vec::with_capacity(2048);
    proc.open_relative("status")
        .ok()?
        .read_to_end(&mut raw)
        .ok()?;
    parse_real_uid(&raw)
}

fn parse_real_uid(status: &[u8]) -> Option<u32> {
    status
        .split(|&b| b == b'\n')
        .find_map(|l| l.strip_prefix(b"Uid:"))
        .and_then(|rest| std::str::from_utf8(rest).ok())
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// `PM2_HOME` from a live process's environment.
fn pm2_home(proc: &procfs::process::Process) -> Option<String> {
    let env = proc.environ().ok()?;
    env.get(OsStr::new("PM2_HOME"))
        .map(|v| v.to_string_lossy().into_owned())
}

/// A God daemon that predates governor (its title rewritten to
/// `PM2 vX: God Daemon (HOME)`): trusted when its owner's
/// `PM2_HOME/pm2.pid`, a file owned by that uid, names it.
fn god_from_proc(
    proc: &procfs::process::Process,
    uid: u32,
    exe: &str,
    argv: &[String],
) -> Option<God> {
    if !is_node(exe) {
        return None;
    }
    if let Some(g) = god_from_exec(uid, exe, argv) {
        return verify_pid_file(proc, uid, g);
    }
    let title = argv.join(" ");
    if !title.contains("God Daemon") {
        return None;
    }
    let from_title = title
        .rsplit_once('(')
        .and_then(|(_, r)| r.strip_suffix(')'))
        .map(str::to_string);
    let home = pm2_home(proc).or(from_title)?;
    verify_pid_file(
        proc,
        uid,
        God {
            uid,
            daemon_js: None,
            home: Some(home),
        },
    )
}

fn verify_pid_file(proc: &procfs::process::Process, uid: u32, mut g: God) -> Option<God> {
    let home = match &g.home {
        Some(h) => h.clone(),
        // Daemon.js seen in argv (a God started before us whose title
        // was not yet rewritten): its home from the environment.
        None => pm2_home(proc)?,
    };
    let path = Path::new(&home).join("pm2.pid");
    let meta = fs::symlink_metadata(&path).ok()?;
    if !meta.is_file() || meta.uid() != uid {
        return None;
    }
    let named: u32 = fs::read_to_string(&path).ok()?.trim().parse().ok()?;
    if i32::try_from(named).ok() != Some(proc.pid()) {
        return None;
    }
    g.home = Some(home);
    Some(g)
}

fn clock_ticks() -> u64 {
    rustix::param::clock_ticks_per_second().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use procfs::FromRead;

    /// Found by the proc_parsers fuzz target: a name that is not UTF-8
    /// made the whole status unreadable, and the process vanished from
    /// the table. The real uid is read from the bytes.
    #[test]
    fn real_uid_from_a_status_with_a_non_utf8_name() {
        let status = b"Name:\tbad\xff\xfename\nUmask:\t0022\nState:\tS (sleeping)\n\
                       Tgid:\t77\nUid:\t65534\t0\t0\t0\nGid:\t65534\t65534\t65534\t65534\n";
        assert_eq!(parse_real_uid(status), Some(65534));
        assert_eq!(parse_real_uid(b"Name:\tx\nGid:\t1\n"), None);
        // And a live one: this process.
        let me = procfs::process::Process::myself().unwrap();
        assert_eq!(real_uid(&me), Some(rustix::process::getuid().as_raw()));
    }

    #[test]
    fn stat_with_spaces_in_comm() {
        // A full line as a 6.x kernel writes it (52 fields).
        let s = "123 (my (odd) proc) S 45 123 123 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 \
                 9876 1 2 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 \
                 0 0 0 0 0 0 0 0 0\n";
        let st = procfs::process::Stat::from_read(s.as_bytes()).unwrap();
        assert_eq!(st.comm, "my (odd) proc");
        assert_eq!((st.ppid, st.starttime), (45, 9876));
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
