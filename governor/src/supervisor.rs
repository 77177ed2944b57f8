//! The edge to process supervisors (pm2, systemd): stopping a service and
//! asking for the supervisor's own view of it. Behind a trait so the policy
//! and daemon are tested without them.
//!
//! No shell is involved: every command is an argv built from validated
//! names. pm2 commands run as the user who owns pm2's God daemon, with that
//! daemon's PM2_HOME, so root never touches another user's pm2 state as root.

use std::{
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use std::collections::HashMap;

use anyhow::{bail, Context, Result};

use crate::{proctable::ProcTable, velocity::Supervisor};

pub use governor_core::status::supervisor_of;

/// Re-verifies, at action time, that a supervisor still is what the
/// decision was made against: the pm2 God is still a verified God in the
/// kernel-fed table, run by the same uid. A supervisor read back from the
/// state file, or a God that died and whose pid was reused, fails here.
pub fn verify(s: &Supervisor, table: &ProcTable) -> Result<()> {
    if let Supervisor::Pm2 {
        god_pid, god_uid, ..
    } = s
    {
        match table.god(*god_pid) {
            Some(g) if g.uid == *god_uid => {}
            Some(g) => bail!(
                "pm2 God daemon pid {god_pid} is now run by uid {} (expected {god_uid})",
                g.uid
            ),
            None => bail!("pid {god_pid} is no longer a verified pm2 God daemon"),
        }
    }
    Ok(())
}

/// Side effects on supervisors.
pub trait SupervisorOps: Send + Sync {
    /// Stops the service through its supervisor; returns what it said.
    fn stop(&self, s: &Supervisor) -> Result<String>;
    /// Restarts the service through its supervisor; returns what it said.
    fn restart(&self, s: &Supervisor) -> Result<String>;
    /// The supervisor's own view of the service (status, its restart count).
    fn view(&self, s: &Supervisor) -> Result<serde_json::Value>;
    /// The views of many services, in order: one `pm2 jlist` per God
    /// (a node start, ~0.3 s, and a few hundred KB of JSON), not one per
    /// service.
    fn views(&self, all: &[&Supervisor]) -> Vec<Result<serde_json::Value>> {
        all.iter().map(|s| self.view(s)).collect()
    }
    /// Stops many services, in order of `all`: one `pm2 stop ID…` per God
    /// (each pm2 command is a node start, ~0.3 s of CPU: twenty at once
    /// would take seconds on a small host), not one per service.
    fn stop_many(&self, all: &[&Supervisor]) -> Vec<Result<String>> {
        all.iter().map(|s| self.stop(s)).collect()
    }
}

/// The real thing: `pm2` and `systemctl`, each command killed after the
/// timeout (`[system] supervisor_timeout`, milliseconds; shared with the
/// daemon so a reload changes it).
pub struct RealSupervisors {
    pub timeout_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl RealSupervisors {
    pub fn new(timeout: Duration) -> RealSupervisors {
        RealSupervisors {
            timeout_ms: std::sync::Arc::new(std::sync::atomic::AtomicU64::new(
                timeout.as_millis() as u64
            )),
        }
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(
            self.timeout_ms
                .load(std::sync::atomic::Ordering::Relaxed)
                .max(1),
        )
    }
}

/// Names we pass to pm2/systemctl: no option injection, no odd bytes.
fn check_name(what: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name.starts_with('-')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@:".contains(c))
    {
        bail!("refusing to pass {what} {name:?} to a supervisor: unexpected characters");
    }
    Ok(())
}

/// How to run pm2 as its God daemon does: the node binary, pm2's CLI next to
/// the Daemon.js it runs, its PM2_HOME and its owner.
struct Pm2Cli {
    node: PathBuf,
    cli: PathBuf,
    home: Option<String>,
    uid: u32,
    gid: u32,
}

/// Finds pm2's CLI: from the God daemon's Daemon.js (seen at its exec),
/// else from the `_` its launching shell left in its environment, else its
/// own PATH, else the usual install locations. (It runs as the God's owner,
/// who set that environment.)
fn locate_cli(daemon_js: Option<&str>, env: &[(String, String)]) -> Result<PathBuf> {
    if let Some(root) = daemon_js.and_then(|js| Path::new(js).parent()?.parent()) {
        let cli = root.join("bin/pm2");
        if cli.is_file() {
            return Ok(cli);
        }
    }
    let launched = env
        .iter()
        .find(|(k, _)| k == "_")
        .map(|(_, v)| PathBuf::from(v))
        .filter(|p| p.file_name().is_some_and(|n| n == "pm2"));
    // A God started before governor has rewritten its title: its
    // Daemon.js is gone from argv. Its own PATH (nvm, npm prefixes) is
    // where `pm2` was found when it was started.
    let on_path: Vec<PathBuf> = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| {
            v.split(':')
                .filter(|d| d.starts_with('/'))
                .map(|d| Path::new(d).join("pm2"))
                .collect()
        })
        .unwrap_or_default();
    launched
        .into_iter()
        .chain(on_path)
        .chain(
            [
                "/usr/local/bin/pm2",
                "/usr/bin/pm2",
                "/usr/local/lib/node_modules/pm2/bin/pm2",
            ]
            .iter()
            .map(PathBuf::from),
        )
        .find(|p| p.is_file())
        .context(
            "can't find pm2's CLI for this God daemon (its exec wasn't seen and pm2 \
             isn't in /usr/local/bin or /usr/bin)",
        )
}

fn pm2_cli(god_pid: u32, god_uid: u32, daemon_js: Option<&str>) -> Result<Pm2Cli> {
    let node = std::fs::read_link(format!("/proc/{god_pid}/exe"))
        .with_context(|| format!("pm2 God daemon (pid {god_pid}) is gone"))?;
    let env: Vec<(String, String)> = std::fs::read(format!("/proc/{god_pid}/environ"))
        .unwrap_or_default()
        .split(|&b| b == 0)
        .filter_map(|v| {
            let v = String::from_utf8_lossy(v);
            v.split_once('=')
                .map(|(k, val)| (k.to_string(), val.to_string()))
        })
        .collect();
    let cli = locate_cli(daemon_js, &env)?;
    let home = env
        .iter()
        .find(|(k, _)| k == "PM2_HOME")
        .map(|(_, v)| v.clone());
    let status = std::fs::read_to_string(format!("/proc/{god_pid}/status"))?;
    let id_of = |key: &str| -> Option<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    // The same process the decision was made against: still run by the
    // verified owner (a reused pid would be another user's, or root's).
    let uid = id_of("Uid:").context("reading the pm2 God daemon's uid")?;
    if uid != god_uid {
        bail!("pm2 God daemon pid {god_pid} runs as uid {uid}, not the verified {god_uid}");
    }
    Ok(Pm2Cli {
        node,
        cli,
        home,
        uid,
        gid: id_of("Gid:").context("reading the pm2 God daemon's gid")?,
    })
}

fn run(mut cmd: Command, what: &str, timeout: Duration) -> Result<String> {
    let out = run_with_timeout(&mut cmd, timeout).map_err(|e| {
        if e.kind() == std::io::ErrorKind::TimedOut {
            anyhow::Error::new(e).context(format!(
                "running {what}: no answer within {timeout:?}, killed it (a supervisor that \
                 is stopped or wedged answers nothing; [system] supervisor_timeout sets the wait)"
            ))
        } else {
            anyhow::Error::new(e).context(format!("running {what}"))
        }
    })?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(text)
}

fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> std::io::Result<std::process::Output> {
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(r) => r,
        Err(_) => {
            // SAFETY: kill(2) on the child we spawned and haven't reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "timed out",
            ))
        }
    }
}

impl Pm2Cli {
    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.node);
        c.arg(&self.cli).args(args);
        c.env_clear();
        c.env("PATH", "/usr/local/bin:/usr/bin:/bin");
        if let Some(h) = &self.home {
            c.env("PM2_HOME", h);
        }
        // Least privilege: act as pm2's owner, not as root.
        c.uid(self.uid).gid(self.gid);
        reset_oom_score(&mut c);
        c
    }
}

/// The daemon runs with oom_score_adj -1000 (systemd's OOMScoreAdjust):
/// pm2's CLI — and a God it may start, and that God's apps — must not
/// inherit it and become the processes the OOM killer can't take.
fn reset_oom_score(c: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and calls
    // only async-signal-safe functions (open, write, close) on a static
    // path and buffer; it allocates nothing and touches no lock. It runs
    // after the uid change, and raising one's own score needs no
    // privilege.
    unsafe {
        c.pre_exec(|| {
            let fd = libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                libc::write(fd, b"0".as_ptr().cast(), 1);
                libc::close(fd);
            }
            Ok(())
        });
    }
}

/// What governor asks a supervisor to do.
#[derive(Clone, Copy)]
enum Verb {
    Stop,
    Restart,
}

impl Verb {
    fn word(self) -> &'static str {
        match self {
            Verb::Stop => "stop",
            Verb::Restart => "restart",
        }
    }
}

impl SupervisorOps for RealSupervisors {
    fn stop(&self, s: &Supervisor) -> Result<String> {
        control(s, Verb::Stop, self.timeout())
    }

    fn restart(&self, s: &Supervisor) -> Result<String> {
        control(s, Verb::Restart, self.timeout())
    }

    fn view(&self, s: &Supervisor) -> Result<serde_json::Value> {
        view(s, self.timeout())
    }

    fn stop_many(&self, all: &[&Supervisor]) -> Vec<Result<String>> {
        // (God pid, God uid, Daemon.js) → the ids to stop through it.
        let mut groups: std::collections::BTreeMap<(u32, u32, Option<String>), Vec<String>> =
            Default::default();
        for s in all {
            if let Supervisor::Pm2 {
                name,
                pm_id: Some(id),
                god_pid,
                god_uid,
                daemon_js,
            } = s
            {
                if check_name("pm2 app", name).is_ok() {
                    groups
                        .entry((*god_pid, *god_uid, daemon_js.clone()))
                        .or_default()
                        .push(id.to_string());
                }
            }
        }
        let mut outcome: HashMap<(u32, u32, Option<String>), std::result::Result<String, String>> =
            HashMap::new();
        for ((god_pid, god_uid, daemon_js), ids) in groups {
            let r = pm2_cli(god_pid, god_uid, daemon_js.as_deref()).and_then(|pm2| {
                let mut args = vec!["stop"];
                args.extend(ids.iter().map(String::as_str));
                run(
                    pm2.command(&args),
                    &format!("pm2 stop {}", ids.join(" ")),
                    self.timeout(),
                )
            });
            outcome.insert(
                (god_pid, god_uid, daemon_js),
                r.map_err(|e| format!("{e:#}")),
            );
        }
        all.iter()
            .map(|s| match s {
                Supervisor::Pm2 {
                    pm_id: Some(_),
                    god_pid,
                    god_uid,
                    name,
                    daemon_js,
                } if check_name("pm2 app", name).is_ok() => {
                    match outcome.get(&(*god_pid, *god_uid, daemon_js.clone())) {
                        Some(Ok(out)) => Ok(out.clone()),
                        Some(Err(e)) => Err(anyhow::anyhow!("{e}")),
                        None => self.stop(s),
                    }
                }
                other => self.stop(other),
            })
            .collect()
    }

    fn views(&self, all: &[&Supervisor]) -> Vec<Result<serde_json::Value>> {
        // (God pid, God uid) → its jlist, fetched once.
        let mut lists: HashMap<(u32, u32), std::result::Result<serde_json::Value, String>> =
            HashMap::new();
        all.iter()
            .map(|s| match s {
                Supervisor::Pm2 {
                    name,
                    god_pid,
                    god_uid,
                    daemon_js,
                    ..
                } => {
                    check_name("pm2 app", name)?;
                    let list = lists.entry((*god_pid, *god_uid)).or_insert_with(|| {
                        pm2_jlist(*god_pid, *god_uid, daemon_js.as_deref(), self.timeout())
                            .map_err(|e| format!("{e:#}"))
                    });
                    match list {
                        Ok(l) => pm2_app_view(l, name),
                        Err(e) => Err(anyhow::anyhow!("{e}")),
                    }
                }
                other => view(other, self.timeout()),
            })
            .collect()
    }
}

/// `pm2 stop|restart <pm_id>` as pm2's owner, `systemctl stop|restart UNIT`.
fn control(s: &Supervisor, verb: Verb, timeout: Duration) -> Result<String> {
    {
        match s {
            Supervisor::Pm2 {
                name,
                pm_id,
                god_pid,
                god_uid,
                daemon_js,
            } => {
                check_name("pm2 app", name)?;
                // By id: a name stops every cluster instance of that name.
                let id = pm_id
                    .with_context(|| {
                        format!("pm2 app {name} has no pm_id to {} it by", verb.word())
                    })?
                    .to_string();
                let pm2 = pm2_cli(*god_pid, *god_uid, daemon_js.as_deref())?;
                run(
                    pm2.command(&[verb.word(), &id]),
                    &format!("pm2 {} {id} ({name})", verb.word()),
                    timeout,
                )
            }
            Supervisor::Systemd { unit } => {
                check_name("unit", unit)?;
                let mut c = Command::new("systemctl");
                c.args([verb.word(), "--no-block", "--", unit]);
                run(c, &format!("systemctl {} {unit}", verb.word()), timeout)
            }
            Supervisor::None => bail!("no supervisor to {} this service through", verb.word()),
        }
    }
}

/// The supervisor's own view of a service.
/// `pm2 jlist` of one God, as its owner, keeping only what a view needs
/// (the full list carries every app's environment).
fn pm2_jlist(
    god_pid: u32,
    god_uid: u32,
    daemon_js: Option<&str>,
    timeout: Duration,
) -> Result<serde_json::Value> {
    let pm2 = pm2_cli(god_pid, god_uid, daemon_js)?;
    let out = run(pm2.command(&["jlist"]), "pm2 jlist", timeout)?;
    let start = out.find('[').context("pm2 jlist printed no JSON")?;
    let list: Vec<serde_json::Value> =
        serde_json::from_str(&out[start..]).context("parsing pm2 jlist")?;
    Ok(serde_json::Value::Array(
        list.into_iter()
            .map(|app| {
                let env = &app["pm2_env"];
                serde_json::json!({
                    "name": app["name"],
                    "supervisor": "pm2",
                    "status": env["status"],
                    "restarts": env["restart_time"],
                    "unstable_restarts": env["unstable_restarts"],
                    "pid": app["pid"],
                })
            })
            .collect(),
    ))
}

/// One app's view from a [`pm2_jlist`].
fn pm2_app_view(list: &serde_json::Value, name: &str) -> Result<serde_json::Value> {
    let mut app = list
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == name))
        .cloned()
        .with_context(|| format!("pm2 doesn't list {name}"))?;
    if let Some(m) = app.as_object_mut() {
        m.remove("name");
    }
    Ok(app)
}

fn view(s: &Supervisor, timeout: Duration) -> Result<serde_json::Value> {
    {
        match s {
            Supervisor::Pm2 {
                name,
                god_pid,
                god_uid,
                daemon_js,
                ..
            } => {
                check_name("pm2 app", name)?;
                pm2_app_view(
                    &pm2_jlist(*god_pid, *god_uid, daemon_js.as_deref(), timeout)?,
                    name,
                )
            }
            Supervisor::Systemd { unit } => {
                check_name("unit", unit)?;
                let mut c = Command::new("systemctl");
                c.args([
                    "show",
                    "-p",
                    "ActiveState,SubState,NRestarts,MainPID",
                    "--",
                    unit,
                ]);
                let out = run(c, &format!("systemctl show {unit}"), timeout)?;
                let mut v = serde_json::Map::new();
                v.insert("supervisor".into(), "systemd".into());
                for line in out.lines() {
                    if let Some((k, val)) = line.split_once('=') {
                        v.insert(k.to_string(), val.into());
                    }
                }
                Ok(v.into())
            }
            Supervisor::None => Ok(serde_json::json!({"supervisor": "none"})),
        }
    }
}

/// One line for tables and alerts: "pm2 says online, 37 restarts (0 unstable)".
pub fn describe_view(v: &serde_json::Value) -> String {
    match v["supervisor"].as_str() {
        Some("pm2") => format!(
            "pm2 says {}, {} restarts ({} unstable)",
            v["status"].as_str().unwrap_or("?"),
            v["restarts"],
            v["unstable_restarts"]
        ),
        Some("systemd") => format!(
            "systemd says {}/{}, NRestarts={}",
            v["ActiveState"].as_str().unwrap_or("?"),
            v["SubState"].as_str().unwrap_or("?"),
            v["NRestarts"].as_str().unwrap_or("?")
        ),
        _ => "no supervisor".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A God started before governor: its CLI from its own PATH.
    #[test]
    fn cli_found_on_the_gods_path() {
        let dir = tempfile::tempdir().unwrap();
        let pm2 = dir.path().join("pm2");
        std::fs::write(&pm2, "#!/bin/sh\n").unwrap();
        let env = vec![(
            "PATH".to_string(),
            format!("relative/bin:/nonexistent:{}", dir.path().display()),
        )];
        assert_eq!(locate_cli(None, &env).unwrap(), pm2);
        // Daemon.js, when seen, wins.
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join("bin")).unwrap();
        std::fs::create_dir_all(root.path().join("lib")).unwrap();
        std::fs::write(root.path().join("bin/pm2"), "").unwrap();
        let js = root.path().join("lib/Daemon.js");
        assert_eq!(
            locate_cli(js.to_str(), &env).unwrap(),
            root.path().join("bin/pm2")
        );
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("x", "lily").is_ok());
        assert!(check_name("x", "lily.service").is_ok());
        assert!(check_name("x", "--all").is_err());
        assert!(check_name("x", "a b").is_err());
        assert!(check_name("x", "a;rm").is_err());
        assert!(check_name("x", "").is_err());
    }
}
