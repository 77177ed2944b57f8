//! Restart velocity end to end: real processes, real pm2, the real daemon,
//! a real HTTP stand-in of the Telegram Bot API.

use std::{os::unix::process::CommandExt, process::Command, time::Duration};

use governor_tests::{
    botapi::BotServer, governor, pm2_runs_here, row, wait_until, DaemonProc, Pm2, ShellLoop,
};
use serde_json::Value;

fn state_of(status: &Value, name: &str) -> Option<String> {
    status["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["state"].as_str().map(str::to_string))
}

/// The service name the daemon gives an unmanaged script: found by its exe.
fn fingerprint_named(d: &DaemonProc, prefix: &str) -> Option<String> {
    d.status()["services"]
        .as_array()?
        .iter()
        .filter_map(|s| s["name"].as_str())
        .find(|n| n.starts_with(prefix))
        .map(str::to_string)
}

fn wait_fingerprint(d: &DaemonProc, prefix: &str) -> String {
    let mut name = None;
    let found = wait_until(Duration::from_secs(30), || {
        name = fingerprint_named(d, prefix);
        name.is_some()
    });
    assert!(found, "no service {prefix}* in status:\n{}", d.log());
    name.unwrap_or_default()
}

fn token_and_bot() -> (BotServer, tempfile::TempDir, String) {
    let bot = BotServer::start(vec![]);
    let (dir, token) = governor_tests::botapi::token_file();
    let section = format!(
        "[alerts.telegram]\nbot_token_file = \"{}\"\nchat_id = \"-1001234567890\"\napi_url = \"{}\"\n",
        token.display(),
        bot.url()
    );
    (bot, dir, section)
}

/// The incident this project exists for: an app that exits 1 after 1.5 s
/// under pm2 is a crash loop to governor while pm2 shows it `online`.
#[test]
fn pm2_crash_loop_flagged_while_pm2_says_online() {
    if !pm2_runs_here() {
        return;
    }
    let (bot, _tdir, telegram) = token_and_bot();
    let d = DaemonProc::start(&format!(
        "[defaults]\nmax_restarts = 2\nwindow = \"10m\"\n\n\
         [[service]]\nname = \"crashy\"\npm2 = \"govtest-crashy\"\n\n\
         [[service]]\nname = \"steady\"\npm2 = \"govtest-steady\"\n\n{telegram}"
    ));
    let pm2 = Pm2::isolated();
    let crash = pm2.home.path().join("crash.js");
    std::fs::write(&crash, "setTimeout(() => process.exit(1), 1500);\n").unwrap();
    let steady = pm2.home.path().join("steady.js");
    std::fs::write(&steady, "setInterval(() => {}, 1000);\n").unwrap();
    pm2.run(&[
        "start",
        steady.to_str().unwrap(),
        "--name",
        "govtest-steady",
    ]);
    pm2.run(&["start", crash.to_str().unwrap(), "--name", "govtest-crashy"]);

    let s = d.wait_status("crashy in crash-loop", Duration::from_secs(40), |s| {
        state_of(s, "crashy").as_deref() == Some("crash-loop")
    });
    // pm2's view at the same moment: online, unstable_restarts 0.
    let jl = pm2.jlist();
    let app = jl
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "govtest-crashy")
        .unwrap();
    let pm2_status = app["pm2_env"]["status"].as_str().unwrap_or("?").to_string();
    let crashy = row(&s, "crashy");
    let restarts = crashy["restarts_in_window"].as_u64().unwrap();
    println!(
        "governor: crashy {} with {restarts} restarts; pm2 says {pm2_status}, unstable_restarts {}",
        crashy["state"], app["pm2_env"]["unstable_restarts"]
    );
    assert!(
        (3..=4).contains(&restarts),
        "within one restart of crossing 2: {restarts}"
    );
    assert_eq!(crashy["max_restarts"], 2);
    assert_eq!(crashy["last_exit"]["code"], 1);
    let up = crashy["last_exit"]["uptime_ms"].as_u64().unwrap();
    assert!((1400..3000).contains(&up), "uptime of a 1.5 s app: {up} ms");
    assert!(
        pm2_status == "online" || pm2_status == "launching",
        "pm2 still shows it running: {pm2_status}"
    );
    assert_eq!(
        app["pm2_env"]["unstable_restarts"], 0,
        "pm2's own counter misses it"
    );
    assert_eq!(state_of(&s, "steady").as_deref(), Some("stable"), "{s:#}");

    // Exactly one crash-loop alert for the episode, carrying the facts.
    std::thread::sleep(Duration::from_secs(4));
    let texts: Vec<String> = bot
        .requests()
        .iter()
        .map(|r| r.text().to_string())
        .collect();
    let loops: Vec<&String> = texts
        .iter()
        .filter(|t| t.contains("crash loop: crashy"))
        .collect();
    assert_eq!(
        loops.len(),
        1,
        "one crash-loop alert per episode: {texts:#?}"
    );
    assert!(
        loops[0].contains("restarts in 10 min") && loops[0].contains("exit code 1"),
        "{}",
        loops[0]
    );
    // Other tests' pm2 apps may loop meanwhile: this daemon sees them too.
    let entered: Vec<_> = d
        .entries_of("crash_loop.entered")
        .into_iter()
        .filter(|e| e["service"] == "crashy")
        .collect();
    assert_eq!(entered.len(), 1, "{entered:#?}");
    let e = &entered[0];
    assert_eq!(e["service"], "crashy");
    assert_eq!(e["detail"]["supervisor"]["kind"], "pm2");
    // The supervisor's view, fetched off the event loop, is audited too.
    let views = d.wait_entries_of("crash_loop.supervisor_view", 1, Duration::from_secs(15));
    assert_eq!(views.len(), 1, "{}", d.log());
    assert_eq!(views[0]["detail"]["supervisor"], "pm2");
}

/// An app that dies within milliseconds is still attributed to its pm2
/// name: execs of pm2's children wake the daemon at once (the kernel's
/// wake-on-exec map of supervisors), so /proc is read while the app lives.
#[test]
fn instant_pm2_crashes_are_attributed_to_the_app() {
    if !pm2_runs_here() {
        return;
    }
    let d = DaemonProc::start(
        "[[service]]\nname = \"instant\"\npm2 = \"govtest-instant\"\nmax_restarts = 2\n",
    );
    let pm2 = Pm2::isolated();
    let app = pm2.home.path().join("instant.js");
    std::fs::write(&app, "process.exit(3);\n").unwrap();
    pm2.run(&["start", app.to_str().unwrap(), "--name", "govtest-instant"]);
    let s = d.wait_status("instant in crash-loop", Duration::from_secs(40), |s| {
        state_of(s, "instant").as_deref() == Some("crash-loop")
    });
    assert_eq!(row(&s, "instant")["last_exit"]["code"], 3);
    let stray: Vec<&str> = s["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["name"].as_str())
        .filter(|n| n.contains("ProcessContainer") || n.starts_with("fp:node"))
        .collect();
    assert!(
        stray.is_empty(),
        "deaths misattributed to fingerprints: {stray:?}"
    );
}

/// `crash_loop_action = "stop"`: after `stop_after` more crashes the
/// daemon stops the app through pm2 (as pm2's owner), and audits it.
#[test]
fn stop_action_stops_a_pm2_crash_loop() {
    if !pm2_runs_here() {
        return;
    }
    let d = DaemonProc::start(
        "[defaults]\nmax_restarts = 1\ncrash_loop_action = \"stop\"\nstop_after = 1\n\n\
         [[service]]\nname = \"stopme\"\npm2 = \"govtest-stopme\"\n",
    );
    let pm2 = Pm2::isolated();
    let app = pm2.home.path().join("crash.js");
    std::fs::write(&app, "setTimeout(() => process.exit(1), 300);\n").unwrap();
    pm2.run(&["start", app.to_str().unwrap(), "--name", "govtest-stopme"]);
    let mut done: Vec<Value> = Vec::new();
    let stopped = wait_until(Duration::from_secs(60), || {
        done = d
            .entries_of("crash_loop.action")
            .into_iter()
            .filter(|e| e["detail"]["state"] == "done")
            .collect();
        !done.is_empty()
    });
    assert!(stopped, "no stop action:\n{}", d.log());
    assert_eq!(done[0]["service"], "stopme");
    assert_eq!(done[0]["detail"]["supervisor"]["kind"], "pm2");
    let jl = pm2.jlist();
    let app = jl
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "govtest-stopme")
        .unwrap();
    assert_eq!(
        app["pm2_env"]["status"], "stopped",
        "pm2 stopped it: {app:#}"
    );
    let requested = d
        .entries_of("crash_loop.action")
        .into_iter()
        .filter(|e| e["detail"]["state"] == "requested")
        .count();
    assert_eq!(requested, 1, "stop is issued once per episode");
}

#[test]
fn unmanaged_shell_loop_and_signal_deaths() {
    let d = DaemonProc::start("[defaults]\nmax_restarts = 2\n");
    let dir = tempfile::tempdir().unwrap();
    let (_a, _) = ShellLoop::start(dir.path(), "exits-2.sh", "sleep 0.2\nexit 2");
    let (_b, _) = ShellLoop::start(dir.path(), "killed.sh", "sleep 0.2\nkill -KILL $$");
    let a = wait_fingerprint(&d, "fp:exits-2.sh-");
    let b = wait_fingerprint(&d, "fp:killed.sh-");
    let s = d.wait_status("both loops in crash-loop", Duration::from_secs(30), |s| {
        state_of(s, &a).as_deref() == Some("crash-loop")
            && state_of(s, &b).as_deref() == Some("crash-loop")
    });
    assert_eq!(row(&s, &a)["last_exit"]["code"], 2);
    assert!(row(&s, &a)["last_exit"]["signal"].is_null());
    assert_eq!(row(&s, &b)["last_exit"]["signal"], 9);
    assert!(row(&s, &b)["last_exit"]["code"].is_null());
    let entered = d.entries_of("crash_loop.entered");
    assert_eq!(
        entered
            .iter()
            .filter(|e| e["service"] == a.as_str())
            .count(),
        1
    );
    assert_eq!(
        entered
            .iter()
            .filter(|e| e["service"] == b.as_str())
            .count(),
        1
    );
}

#[test]
fn deploy_then_restarts_is_not_a_crash_loop() {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("deployed.sh");
    let d = DaemonProc::start(&format!(
        "[defaults]\nmax_restarts = 2\n\n[[service]]\nname = \"web\"\nexe = \"{}\"\n",
        app.display()
    ));
    let (code, out, err) = governor(&[
        "deploy",
        "web",
        "--grace",
        "1m",
        "--reason",
        "v2 rollout",
        "--socket",
        d.socket.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let (_l, _) = ShellLoop::start(dir.path(), "deployed.sh", "sleep 0.2\nexit 1");
    let s = d.wait_status("5 planned restarts", Duration::from_secs(30), |s| {
        row(s, "web")["planned_in_window"].as_u64().unwrap_or(0) >= 5
    });
    let web = row(&s, "web");
    assert_ne!(web["state"], "crash-loop", "{web}");
    assert_eq!(
        web["restarts_in_window"], 0,
        "planned restarts are shown, not counted: {web}"
    );
    let entered: Vec<_> = d
        .entries_of("crash_loop.entered")
        .into_iter()
        .filter(|e| e["service"] == "web")
        .collect();
    assert!(entered.is_empty(), "{entered:#?}");
    let deploys = d.entries_of("service.deploy");
    assert_eq!(deploys.len(), 1);
    assert_eq!(deploys[0]["detail"]["reason"], "v2 rollout");
    // Unknown services are refused.
    let (code, _, err) = governor(&["deploy", "nope", "--socket", d.socket.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown service"), "{err}");
}

#[test]
fn restart_count_survives_a_daemon_restart() {
    let mut d = DaemonProc::start("[defaults]\nmax_restarts = 6\n");
    let dir = tempfile::tempdir().unwrap();
    let (lp, _) = ShellLoop::start(dir.path(), "persist.sh", "sleep 0.3\nexit 1");
    let name = wait_fingerprint(&d, "fp:persist.sh-");
    d.wait_status("3 restarts", Duration::from_secs(20), |s| {
        row(s, &name)["restarts_in_window"].as_u64().unwrap_or(0) >= 3
    });
    assert!(d.stop().success());
    drop(lp);
    let before = {
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(d.state.join("velocity.json")).unwrap())
                .unwrap();
        v["velocity"]["services"][&name]["deaths"]
            .as_array()
            .map(Vec::len)
            .unwrap_or(0) as u64
    };
    assert!(before >= 3);
    d.spawn();
    let s = d.status();
    assert_eq!(
        row(&s, &name)["restarts_in_window"].as_u64(),
        Some(before),
        "count carries on: {s:#}"
    );
    let (_lp2, _) = ShellLoop::start(dir.path(), "persist.sh", "sleep 0.3\nexit 1");
    let s = d.wait_status(
        "crash loop after the restart",
        Duration::from_secs(20),
        |s| state_of(s, &name).as_deref() == Some("crash-loop"),
    );
    assert!(row(&s, &name)["restarts_in_window"].as_u64().unwrap() >= 7);
    assert_eq!(d.entries_of("daemon.started").len(), 2);
}

#[test]
fn status_refused_for_non_root() {
    let d = DaemonProc::start("");
    let out = Command::new(governor_tests::governor_bin())
        .args(["status", "--socket"])
        .arg(&d.socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("root only") && err.contains("uid 65534"),
        "the daemon's SO_PEERCRED refusal: {err}"
    );
    // Root gets an answer.
    assert!(d.status()["services"].is_array());
}
