//! Trust, end to end through the real daemon: identities a local user can
//! forge are never a configured service, approvals need a human's login
//! session, and what any user can grow stays bounded.

use std::{
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use governor_tests::{
    botapi::BotServer, cgroup2_root, governor, governor_in_login, governor_on_tty, pm2_runs_here,
    wait_until, workspace_root, DaemonProc, NOBODY,
};
use serde_json::Value;

fn rows(status: &Value) -> Vec<Value> {
    status["services"].as_array().cloned().unwrap_or_default()
}

fn row(status: &Value, name: &str) -> Value {
    rows(status)
        .into_iter()
        .find(|r| r["name"] == name)
        .unwrap_or(Value::Null)
}

/// `fp:nobody/` (or `fp:65534/` where the system has no such name).
fn nobody() -> String {
    governor::users::name_of(NOBODY)
}

/// A directory others can enter (tempdirs are 0700).
fn open_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn as_nobody(script: &str) -> Child {
    Command::new("/bin/sh")
        .args(["-c", script])
        .uid(NOBODY)
        .gid(NOBODY)
        .current_dir("/")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("spawn as nobody")
}

/// Kills a process group we started.
struct Group(Child);

impl Drop for Group {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group we created at spawn.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        self.0.wait().ok();
    }
}

fn no_restarts(s: &Value, name: &str) {
    let r = row(s, name);
    assert!(
        r["restarts_in_window"].as_u64().unwrap_or(0) == 0 && r["state"] != "crash-loop",
        "configured service {name} was charged with someone else's deaths: {r:#}"
    );
}

/// The forgeries an unprivileged user can try without pm2: pm2's
/// environment variables, a cgroup of their own named like a system unit,
/// the configured binary run as themselves, and a copy of it. None counts
/// toward `lily`, `ssh` or `worker`; none triggers an action; each is its
/// own unconfigured service with the user in its name.
#[test]
fn forged_identities_are_not_configured_services() {
    let bins = open_dir();
    let worker = bins.path().join("worker");
    std::fs::copy("/bin/false", &worker).unwrap();
    let copies = open_dir();
    let copy = copies.path().join("worker");
    std::fs::copy("/bin/false", &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    // SAFETY: chown(2) on a path we own, with a valid C string.
    let c = std::ffi::CString::new(copy.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::chown(c.as_ptr(), NOBODY, NOBODY) }, 0);

    let d = DaemonProc::start(&format!(
        "[defaults]\nmax_restarts = 2\ncrash_loop_action = \"stop\"\nstop_after = 1\n\n\
         [[service]]\nname = \"lily\"\npm2 = \"lily\"\n\n\
         [[service]]\nname = \"ssh\"\nunit = \"ssh.service\"\n\n\
         [[service]]\nname = \"worker\"\nexe = \"{}\"\n",
        worker.display()
    ));

    // 1. pm2's environment, forged.
    let _env = Group(as_nobody(
        "for i in 1 2 3 4 5 6; do env name=lily pm_id=0 sh -c 'sleep 0.2; exit 1'; done; sleep 600",
    ));
    // 2. The real worker binary, and a copy, run by nobody.
    let _real = Group(as_nobody(&format!(
        "for i in 1 2 3 4 5 6; do sleep 0.1; '{}'; done; sleep 600",
        worker.display()
    )));
    let _copy = Group(as_nobody(&format!(
        "for i in 1 2 3 4 5 6; do sleep 0.1; '{}'; done; sleep 600",
        copy.display()
    )));
    // 3. A cgroup of nobody's own whose path ends in ssh.service (a
    //    `systemd-run --user --unit=ssh.service`).
    let cg = cgroup2_root().expect("cgroup2 mounted").join(format!(
        "user.slice/user-{NOBODY}.slice/user@{NOBODY}.service/app.slice/ssh.service"
    ));
    std::fs::create_dir_all(&cg).unwrap();
    let looped = Group(as_nobody(
        "sleep 0.5; while true; do sh -c 'sleep 0.2; exit 1'; done",
    ));
    std::fs::write(cg.join("cgroup.procs"), looped.0.id().to_string())
        .expect("move the loop into the user's cgroup");

    // Each forger is a service of nobody's own: the forged environment, the
    // real binary run by nobody, the copy (3 fingerprints with the user in
    // them; busybox in the guest names the first `exe`).
    let mine = format!("fp:{}/", nobody());
    let unit = format!("user-unit:{NOBODY}:ssh.service");
    let mut seen_unit = false;
    let mut s = Value::Null;
    let looping = |all: &Value| {
        rows(all)
            .iter()
            .filter(|r| {
                r["name"].as_str().is_some_and(|n| n.starts_with(&mine))
                    && r["state"] == "crash-loop"
            })
            .count()
    };
    let done = wait_until(Duration::from_secs(40), || {
        s = d.status_all();
        seen_unit |= rows(&s).iter().any(|r| r["name"] == unit.as_str());
        seen_unit && looping(&s) >= 3
    });
    assert!(
        done,
        "the forgers' own services in crash-loop (and {unit} seen: {seen_unit}): {s:#}\n{}",
        d.log()
    );
    let all = d.status_all();
    for name in ["lily", "ssh", "worker"] {
        no_restarts(&s, name);
        no_restarts(&all, name);
    }
    let charged: Vec<Value> = d
        .entries_of("crash_loop.entered")
        .into_iter()
        .filter(|e| ["lily", "ssh", "worker"].contains(&e["service"].as_str().unwrap_or("")))
        .collect();
    assert!(charged.is_empty(), "forged crash loops: {charged:#?}");
    assert!(
        d.entries_of("crash_loop.action").is_empty(),
        "an action ran on a forged identity: {:#?}",
        d.entries_of("crash_loop.action")
    );
    drop(looped);
    std::fs::remove_dir(&cg).ok();
}

/// The pm2 CLI, run as `uid` with its own PM2_HOME.
struct UserPm2 {
    home: tempfile::TempDir,
    uid: u32,
}

impl UserPm2 {
    fn new(uid: u32) -> Self {
        let home = open_dir();
        let c = std::ffi::CString::new(home.path().to_str().unwrap()).unwrap();
        // SAFETY: chown(2) on our own tempdir, valid C string.
        assert_eq!(unsafe { libc::chown(c.as_ptr(), uid, uid) }, 0);
        UserPm2 { home, uid }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(workspace_root().join("target/pm2/node_modules/.bin/pm2"));
        c.args(args)
            .env("PM2_HOME", self.home.path().join(".pm2"))
            .env("HOME", self.home.path())
            .uid(self.uid)
            .gid(self.uid)
            .current_dir(self.home.path());
        c
    }

    fn run(&self, args: &[&str]) {
        let out = self.cmd(args).output().expect("run pm2");
        assert!(
            out.status.success(),
            "pm2 {args:?} as uid {}: {}{}",
            self.uid,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Writes an app script owned by the pm2 user.
    fn app(&self, name: &str, body: &str) -> PathBuf {
        let p = self.home.path().join(name);
        std::fs::write(&p, body).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }
}

impl Drop for UserPm2 {
    fn drop(&mut self) {
        self.cmd(&["kill"]).output().ok();
    }
}

/// pm2 started by an unprivileged user with an app named like the
/// configured one: its crash loop is `pm2:nobody/lily`, never `lily`, and
/// the stop action never runs pm2 for it.
#[test]
fn user_owned_pm2_is_not_the_configured_app() {
    if !pm2_runs_here() {
        return;
    }
    let d = DaemonProc::start(
        "[defaults]\nmax_restarts = 2\ncrash_loop_action = \"stop\"\nstop_after = 1\n\n\
         [[service]]\nname = \"lily\"\npm2 = \"lily\"\n",
    );
    let pm2 = UserPm2::new(NOBODY);
    let app = pm2.app("lily.js", "setTimeout(() => process.exit(1), 200);\n");
    pm2.run(&["start", app.to_str().unwrap(), "--name", "lily"]);
    let theirs = format!("pm2:{}/lily", nobody());
    let s = d.wait_status(
        "the user's pm2 app in crash-loop",
        Duration::from_secs(60),
        |s| row(s, &theirs)["state"] == "crash-loop",
    );
    no_restarts(&s, "lily");
    assert!(
        d.entries_of("crash_loop.action").is_empty(),
        "an action on another user's pm2: {:#?}",
        d.entries_of("crash_loop.action")
    );
}

fn protected_config(file: &Path) -> String {
    format!("[protect]\nprotected = [\"{}\"]\n", file.display())
}

/// A write window opens for a human at a login session only: not for a
/// pseudo-terminal a root process opened (script(1), as in the incident),
/// and it does open from a real login(1) session.
#[test]
fn approval_needs_a_login_session() {
    if !Path::new("/bin/login").exists() || governor_tests::in_vm() {
        // The guest has no login(1); the ancestry rule itself is the same
        // code on every kernel.
        return;
    }
    let dir = open_dir();
    let file = dir.path().join("prompt.md");
    std::fs::write(&file, "v1\n").unwrap();
    let d = DaemonProc::start(&protected_config(&file));
    let f = file.to_str().unwrap();
    let sock = d.socket.to_str().unwrap();
    let args = [
        "approve", f, "--for", "1m", "--reason", "edit", "--socket", sock,
    ];

    // A pty of our own (we are root, descended from no login).
    let (code, out) = governor_on_tty(&args, f);
    assert_ne!(code, 0, "a pty without a login opened a window: {out}");
    assert!(out.contains("no login"), "names why: {out}");
    // script(1), exactly as in the incident.
    let cmd = args
        .iter()
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new("script")
        .args([
            "-qec",
            &format!("'{}' {cmd}", governor_tests::governor_bin().display()),
            "/dev/null",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin
                .take()
                .unwrap()
                .write_all(format!("{f}\n").as_bytes())?;
            c.wait_with_output()
        })
        .expect("script(1)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("no login"),
        "script -qc refused, naming why: {text}"
    );
    assert!(
        std::fs::write(&file, "forged\n").is_err(),
        "still immutable"
    );
    let refused = d.entries_of("protect.approve_refused");
    assert!(refused.len() >= 2, "both refusals audited: {refused:#?}");

    // A real login session.
    let (code, out) = governor_in_login(&args, f);
    assert_eq!(code, 0, "login session refused: {out}\n{}", d.log());
    let opened = d.wait_entries_of("protect.window_open", 1, Duration::from_secs(10));
    assert_eq!(opened.len(), 1, "{opened:#?}");
    assert!(
        opened[0]["detail"].to_string().contains("login"),
        "the window names the login it came from: {:#}",
        opened[0]
    );
    std::fs::write(&file, "v2\n").expect("write inside the window");
    let (code, o, e) = governor(&["approve", "--end", f, "--socket", sock]);
    assert_eq!(code, 0, "{o}{e}");
}

/// From under pm2, even at a pty with the path typed back: refused, naming
/// the pm2 app.
#[test]
fn approval_from_a_pm2_app_is_refused() {
    if !pm2_runs_here() {
        return;
    }
    let dir = open_dir();
    let file = dir.path().join("prompt.md");
    std::fs::write(&file, "v1\n").unwrap();
    let d = DaemonProc::start(&protected_config(&file));
    let out = dir.path().join("agent.out");
    let agent = dir.path().join("agent.sh");
    std::fs::write(
        &agent,
        format!(
            "#!/bin/sh\necho '{f}' | script -qec \"'{gov}' approve '{f}' --for 1m --reason agent --socket '{sock}'\" /dev/null > '{out}' 2>&1\necho DONE >> '{out}'\nsleep 600\n",
            f = file.display(),
            gov = governor_tests::governor_bin().display(),
            sock = d.socket.display(),
            out = out.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let pm2 = governor_tests::Pm2::isolated();
    pm2.run(&["start", agent.to_str().unwrap(), "--name", "govtest-agent"]);
    let done = wait_until(Duration::from_secs(30), || {
        std::fs::read_to_string(&out).is_ok_and(|t| t.contains("DONE"))
    });
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(done, "the agent finished: {text}");
    assert!(
        text.contains("descends from pm2 app govtest-agent"),
        "refused, naming the app: {text}\n{}",
        d.log()
    );
    assert!(std::fs::write(&file, "agent\n").is_err(), "still immutable");
    pm2.run(&["delete", "govtest-agent"]);
}

fn telegram(bot: &BotServer) -> (tempfile::TempDir, String) {
    let (dir, token) = governor_tests::botapi::token_file();
    (
        dir,
        format!(
            "[alerts.telegram]\nbot_token_file = \"{}\"\nchat_id = \"-1001234567890\"\napi_url = \"{}\"\n",
            token.display(),
            bot.url()
        ),
    )
}

/// `deploy --grace` is capped by `defaults.max_grace`; a deploy is a
/// warning that names its caller, and reaches Telegram.
#[test]
fn deploy_grace_is_capped_and_alerted() {
    let bot = BotServer::start(vec![]);
    let (_t, section) = telegram(&bot);
    let d = DaemonProc::start(&format!(
        "[[service]]\nname = \"web\"\nexe = \"/bin/true\"\n\n{section}"
    ));
    let sock = d.socket.to_str().unwrap();
    let (code, out, err) = governor(&[
        "deploy", "web", "--grace", "100000h", "--reason", "x", "--socket", sock,
    ]);
    assert_ne!(code, 0, "accepted: {out}");
    assert!(err.contains("max_grace"), "names the cap: {err}");
    let (code, out, err) = governor(&[
        "deploy",
        "web",
        "--grace",
        "2m",
        "--reason",
        "release 42",
        "--socket",
        sock,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let mut text = String::new();
    let sent = wait_until(Duration::from_secs(15), || {
        text = bot
            .requests()
            .iter()
            .map(|r| r.text().to_string())
            .collect::<Vec<_>>()
            .join("\n---\n");
        text.contains("deploy: web")
    });
    assert!(sent, "the deploy alert reached the stand-in: {text}");
    assert!(
        text.contains("release 42") && text.contains("uid 0"),
        "reason and caller: {text}"
    );
    let e = d.entries_of("service.deploy");
    assert_eq!(e.len(), 1, "only the capped-in deploy is recorded: {e:#?}");
    assert!(e[0]["detail"]["caller"]["exe"]
        .as_str()
        .is_some_and(|x| x.ends_with("governor")));
}

/// A ring too small for an exec storm loses events: the loss is audited
/// and alerted with its count, and the process table is swept against
/// /proc, so no dead pid stays in `status`.
#[test]
fn lost_events_are_swept_and_alerted() {
    let bot = BotServer::start(vec![]);
    let (_t, section) = telegram(&bot);
    // The smallest ring there is.
    let d = DaemonProc::start_with_daemon_keys("ring_size = \"4KiB\"\n", &section);
    let storm = Command::new("/bin/sh")
        .args([
            "-c",
            "i=0; while [ $i -lt 400 ]; do /bin/sleep 0.5 & i=$((i+1)); done; wait",
        ])
        .status()
        .unwrap();
    assert!(storm.success());
    let lost = d.wait_entries_of("events.lost", 1, Duration::from_secs(20));
    assert!(!lost.is_empty(), "no events.lost entry:\n{}", d.log());
    assert!(lost[0]["detail"]["lost"].as_u64().unwrap_or(0) > 0);
    let alerted = wait_until(Duration::from_secs(15), || {
        bot.requests()
            .iter()
            .any(|r| r.text().contains("events lost"))
    });
    assert!(alerted, "the loss reached Telegram");
    // Every pid governor still shows is alive.
    let mut ghosts = Vec::new();
    let clean = wait_until(Duration::from_secs(20), || {
        ghosts = rows(&d.status_all())
            .iter()
            // The `governor status` clients themselves are gone by now.
            .filter(|r| !r["name"].as_str().unwrap_or("").starts_with("fp:governor-"))
            .flat_map(|r| r["pids"].as_array().cloned().unwrap_or_default())
            .filter_map(|p| p.as_u64())
            .filter(|p| !Path::new(&format!("/proc/{p}")).exists())
            .collect();
        ghosts.is_empty()
    });
    assert!(clean, "dead pids in status: {ghosts:?}\n{}", d.log());
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// 10,000 distinct failing command lines from one unprivileged user: the
/// daemon keeps at most `max_unconfigured_services` of them, reports the
/// evictions, and its RSS stays within 1 MiB.
#[test]
fn distinct_failing_command_lines_stay_bounded() {
    if governor_tests::in_vm() {
        return; // 10,000 execs under emulation; nothing kernel-specific.
    }
    let d = DaemonProc::start("");
    let pid = d.pid();
    let tracked = |d: &DaemonProc| {
        let b = d.status()["bounds"].clone();
        b["unconfigured_services"].as_u64().unwrap_or(0)
            + b["unconfigured_evicted"].as_u64().unwrap_or(0)
    };
    // Warmed up on a few, so "before" is a daemon that has tracked some.
    let mut warm = as_nobody("i=0; while [ $i -lt 50 ]; do sh -c 'exit 1' w$i; i=$((i+1)); done");
    assert!(warm.wait().unwrap().success());
    assert!(wait_until(Duration::from_secs(10), || tracked(&d) >= 50));
    let before = rss_kib(pid);
    let mut flood =
        as_nobody("i=0; while [ $i -lt 10000 ]; do sh -c 'exit 1' x$i; i=$((i+1)); done");
    assert!(flood.wait().unwrap().success());
    let mut bounds = Value::Null;
    let settled = wait_until(Duration::from_secs(30), || {
        bounds = d.status()["bounds"].clone();
        bounds["unconfigured_services"].as_u64().unwrap_or(0)
            + bounds["unconfigured_evicted"].as_u64().unwrap_or(0)
            >= 10_050
    });
    assert!(settled, "bounds: {bounds:#}\n{}", d.log());
    assert_eq!(bounds["max_unconfigured_services"], 1024);
    assert!(
        bounds["unconfigured_services"].as_u64().unwrap() <= 1024,
        "{bounds:#}"
    );
    assert!(
        bounds["unconfigured_evicted"].as_u64().unwrap() >= 10_000 - 1024,
        "{bounds:#}"
    );
    let after = rss_kib(pid);
    println!("daemon RSS {before} KiB before, {after} KiB after 10,000 distinct failing commands");
    assert!(
        after <= before + 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
}
