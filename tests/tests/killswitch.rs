//! The kill switch (issue 12) with real pm2: engage `non-critical`, held
//! across a daemon restart and against `pm2 start`, release by a person
//! at a login terminal only. Host only: the guest has no node.

use std::time::{Duration, Instant};

use governor_tests::{governor, governor_in_login, host_pm2, wait_until, DaemonProc};
use serde_json::Value;

fn of<'a>(entries: &'a [Value], service: &str) -> Vec<&'a Value> {
    entries.iter().filter(|e| e["service"] == service).collect()
}

fn alive(pid: u64) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

fn pm2_status(pm2: &governor_tests::Pm2, name: &str) -> (String, u64) {
    let jl = pm2.jlist();
    let a = jl
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == name).cloned())
        .unwrap_or(Value::Null);
    (
        a["pm2_env"]["status"].as_str().unwrap_or("?").to_string(),
        a["pid"].as_u64().unwrap_or(0),
    )
}

/// `non-critical` covers every running supervised service on the host,
/// another test's pm2 apps too: these tests take turns.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn svc(s: &Value, n: &str) -> Value {
    s["services"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == n).cloned())
        .unwrap_or(Value::Null)
}

const APPS: [&str; 4] = ["bot", "api", "web", "proxy"];

/// Five pm2 apps, one critical and one with two children that ignore
/// SIGINT and SIGTERM: engage `non-critical`, kill -9 the daemon and
/// restart it, `pm2 start` while engaged, release.
#[test]
fn engage_holds_across_restarts_and_only_a_person_releases() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(pm2) = host_pm2() else { return };
    let dir = pm2.home.path().to_path_buf();
    let mut config = String::new();
    for a in APPS {
        config += &format!("[[service]]\nname = \"{a}\"\npm2 = \"ks-{a}\"\n");
    }
    config += "[[service]]\nname = \"db\"\npm2 = \"ks-db\"\ncritical = true\n";
    let mut d = DaemonProc::start(&config);
    let idle = dir.join("idle.js");
    std::fs::write(&idle, "setInterval(() => {}, 1000);\n").unwrap();
    let bot = dir.join("bot.js");
    std::fs::write(
        &bot,
        "const { spawn } = require('child_process');\n\
         for (let i = 0; i < 2; i++) spawn('sh', ['-c', \"trap '' INT TERM; while :; do sleep 1; done\"], { stdio: 'ignore' });\n\
         setInterval(() => {}, 1000);\n",
    )
    .unwrap();
    pm2.run(&["start", bot.to_str().unwrap(), "--name", "ks-bot"]);
    for a in ["api", "web", "proxy", "db"] {
        pm2.run(&[
            "start",
            idle.to_str().unwrap(),
            "--name",
            &format!("ks-{a}"),
        ]);
    }
    d.wait_status("five apps", Duration::from_secs(30), |s| {
        ["bot", "api", "web", "proxy", "db"]
            .iter()
            .all(|n| svc(s, n)["pids"].as_array().is_some_and(|p| !p.is_empty()))
    });
    let children: Vec<u64> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .unwrap_or_default()
                .contains("trap '' INT TERM")
        })
        .collect();
    assert_eq!(children.len(), 2, "bot's children");
    let instances: Vec<u64> = APPS
        .iter()
        .map(|a| pm2_status(&pm2, &format!("ks-{a}")).1)
        .collect();
    let (_, db_pid) = pm2_status(&pm2, "ks-db");
    let sock = d.socket.to_str().unwrap().to_string();

    // A root process that is no person at a terminal (this test) may
    // engage: the agent's brake.
    let t0 = Instant::now();
    let (code, out, err) = governor(&[
        "kill-switch",
        "engage",
        "--scope",
        "non-critical",
        "--reason",
        "runaway agents",
        "--socket",
        &sock,
    ]);
    assert_eq!(code, 0, "{out}{err}\n{}", d.log());
    println!(
        "engage non-critical: replied after {} ms\n{out}",
        t0.elapsed().as_millis()
    );
    assert!(out.contains("ENGAGED"), "{out}");
    for p in children.iter().chain(&instances) {
        assert!(!alive(*p), "{p} outlived the switch\n{out}");
    }
    for a in APPS {
        assert_eq!(
            pm2_status(&pm2, &format!("ks-{a}")).0,
            "stopped",
            "{a}\n{out}"
        );
    }
    assert_eq!(pm2_status(&pm2, "ks-db"), ("online".to_string(), db_pid));
    let stopped: Vec<Value> = d
        .entries_of("killswitch.stopped")
        .into_iter()
        .filter(|e| e["detail"]["after_blocked_start"] == false)
        .collect();
    assert_eq!(stopped.len(), 4, "{stopped:#?}");
    // Every process of each tree is reported, with how and when it ended:
    // within the grace (5 s) + 1 s.
    for e in &stopped {
        assert_eq!(e["detail"]["supervisor_says"], "stopped", "{e:#}");
        for x in e["detail"]["ended"].as_array().unwrap() {
            assert!(x["after_ms"].as_u64().unwrap() <= 6000, "{e:#}");
        }
    }
    let ended = of(&stopped, "bot")[0]["detail"]["ended"]
        .as_array()
        .unwrap()
        .clone();
    for c in &children {
        assert!(ended.iter().any(|e| e["pid"] == *c), "{ended:#?}");
    }
    assert_eq!(d.entries_of("killswitch.engage").len(), 1);

    // Held across kill -9 of the daemon, and against `pm2 start`.
    d.kill9();
    d.spawn();
    let (code, out, _) = governor(&["kill-switch", "status", "--socket", &sock]);
    assert_eq!(code, 0);
    assert!(out.contains("ENGAGED"), "{out}");
    pm2.run(&["start", "ks-api"]);
    let blocked = wait_until(Duration::from_secs(10), || {
        !of(&d.entries_of("killswitch.blocked_start"), "api").is_empty()
    });
    assert!(blocked, "{}", d.log());
    let b = of(&d.entries_of("killswitch.blocked_start"), "api")[0].clone();
    let pid = b["detail"]["pid"].as_u64().unwrap();
    assert!(b["detail"]["started_by"]["exe"].as_str().is_some(), "{b:#}");
    assert!(
        wait_until(Duration::from_secs(2), || !alive(pid)),
        "the blocked start {pid} is dead"
    );
    // Dead within 100 ms of its exec, by the kernel's timestamps.
    let (_, out, _) = governor(&["kill-switch", "status", "--json", "--socket", &sock]);
    let st: Value = serde_json::from_str(&out).unwrap();
    let held = st["held_starts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["pid"] == pid)
        .cloned()
        .unwrap_or_else(|| panic!("{st:#}"));
    let us = held["exec_to_exit_us"].as_u64().unwrap();
    println!("blocked start: exec → exit {us} µs");
    assert!(us <= 100_000, "{held}");
    // Every held start since the restart (pm2's respawns of it too) died
    // within 100 ms of its exec.
    let all = st["held_starts"].as_array().unwrap();
    assert!(all.len() > 1, "{st:#}");
    for h in all {
        assert!(h["exec_to_exit_us"].as_u64().unwrap() <= 100_000, "{h}");
    }
    // pm2 is told to stop it again: it stays down.
    let down = wait_until(Duration::from_secs(15), || {
        pm2_status(&pm2, "ks-api").0 == "stopped"
    });
    assert!(down, "{:?}", pm2_status(&pm2, "ks-api"));

    // Release: refused without a person at a terminal, naming why.
    let (code, _, err) = governor(&[
        "kill-switch",
        "release",
        "--reason",
        "fixed",
        "--socket",
        &sock,
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("login terminal"), "{err}");
    assert_eq!(
        d.wait_entries_of("killswitch.refused", 1, Duration::from_secs(5))
            .len(),
        1
    );
    // A person at a login terminal releases; what was stopped comes back.
    let (code, out) = governor_in_login(
        &[
            "kill-switch",
            "release",
            "--reason",
            "fixed",
            "--socket",
            &sock,
        ],
        "",
    );
    assert_eq!(code, 0, "{out}\n{}", d.log());
    let back = wait_until(Duration::from_secs(20), || {
        APPS.iter()
            .all(|a| pm2_status(&pm2, &format!("ks-{a}")).0 == "online")
    });
    assert!(back, "{out}\n{:#?}", d.entries_of("killswitch.restarted"));
    let jl = pm2.jlist();
    let db = jl
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == "ks-db"))
        .unwrap();
    assert_eq!(db["pid"].as_u64(), Some(db_pid), "db never touched");
    assert_eq!(
        db["pm2_env"]["restart_time"].as_u64(),
        Some(0),
        "db never restarted"
    );
    assert_eq!(d.entries_of("killswitch.release").len(), 1);
    assert_eq!(d.entries_of("killswitch.restarted").len(), 4);
    d.stop();
}

/// A pm2 app pulls the brake through the CLI (allowed: it is root, but
/// supervised), then tries to release it (refused, naming why); a
/// non-root caller is refused outright.
#[test]
fn an_agent_may_engage_but_never_release() {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let Some(pm2) = host_pm2() else { return };
    let dir = pm2.home.path().to_path_buf();
    let mut d = DaemonProc::start(
        "[[service]]\nname = \"agent\"\npm2 = \"ks2-agent\"\n\
         [[service]]\nname = \"worker\"\npm2 = \"ks2-worker\"\n\
         [[service]]\nname = \"worker2\"\npm2 = \"ks2-worker2\"\n",
    );
    let sock = d.socket.to_str().unwrap().to_string();
    let idle = dir.join("idle.js");
    std::fs::write(&idle, "setInterval(() => {}, 1000);\n").unwrap();
    let out = dir.join("agent-out.json");
    let agent = dir.join("agent.js");
    std::fs::write(
        &agent,
        format!(
            "const {{ spawnSync }} = require('child_process');\n\
             const fs = require('fs');\n\
             const gov = (a) => {{ const r = spawnSync({gov:?}, a.concat(['--socket', {sock:?}]), {{ encoding: 'utf8' }}); return {{ code: r.status, out: r.stdout, err: r.stderr }}; }};\n\
             const e = gov(['kill-switch', 'engage', '--scope', 'worker', 'worker2', '--reason', 'I see my workers loop']);\n\
             const r = gov(['kill-switch', 'release', '--reason', 'let me go on']);\n\
             fs.writeFileSync({out:?}, JSON.stringify({{ engage: e, release: r }}));\n\
             setInterval(() => {{}}, 1000);\n",
            gov = governor_tests::governor_bin().to_str().unwrap(),
            out = out.to_str().unwrap(),
        ),
    )
    .unwrap();
    pm2.run(&["start", idle.to_str().unwrap(), "--name", "ks2-worker"]);
    pm2.run(&["start", idle.to_str().unwrap(), "--name", "ks2-worker2"]);
    d.wait_status("workers", Duration::from_secs(30), |s| {
        ["worker", "worker2"]
            .iter()
            .all(|n| svc(s, n)["pids"].as_array().is_some_and(|p| !p.is_empty()))
    });
    pm2.run(&["start", agent.to_str().unwrap(), "--name", "ks2-agent"]);
    assert!(
        wait_until(Duration::from_secs(30), || out.exists()),
        "{}",
        d.log()
    );
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(r["engage"]["code"], 0, "{r:#}");
    assert_eq!(r["release"]["code"], 1, "{r:#}");
    let why = r["release"]["err"].as_str().unwrap();
    assert!(why.contains("login terminal"), "{why}");
    assert_eq!(pm2_status(&pm2, "ks2-worker").0, "stopped");
    assert_eq!(pm2_status(&pm2, "ks2-worker2").0, "stopped");
    assert_eq!(pm2_status(&pm2, "ks2-agent").0, "online");
    let engage = d.entries_of("killswitch.engage");
    assert_eq!(engage.len(), 1);
    assert_eq!(
        engage[0]["detail"]["caller"]["service"], "agent",
        "{:#}",
        engage[0]
    );
    let refused = d.wait_entries_of("killswitch.refused", 1, Duration::from_secs(5));
    assert_eq!(
        refused[0]["detail"]["caller"]["service"], "agent",
        "{:#}",
        refused[0]
    );

    // Non-root: refused by the socket before anything is decided.
    use std::os::unix::process::CommandExt;
    let o = std::process::Command::new(governor_tests::governor_bin())
        .args([
            "kill-switch",
            "engage",
            "--scope",
            "all",
            "--reason",
            "x",
            "--socket",
            &sock,
        ])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("root only"));
    assert_eq!(d.entries_of("killswitch.engage").len(), 1);
    // A person releases one worker: it comes back, the other stays held.
    let (code, out) = governor_in_login(
        &[
            "kill-switch",
            "release",
            "--scope",
            "worker",
            "--reason",
            "worker fixed",
            "--socket",
            &sock,
        ],
        "",
    );
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("still ENGAGED"), "{out}");
    assert!(wait_until(Duration::from_secs(20), || pm2_status(
        &pm2,
        "ks2-worker"
    )
    .0 == "online"));
    assert_eq!(pm2_status(&pm2, "ks2-worker2").0, "stopped");
    let (_, out, _) = governor(&["kill-switch", "status", "--json", "--socket", &sock]);
    let st: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        st["engaged"]["scope"]["services"],
        serde_json::json!(["worker2"]),
        "{st:#}"
    );
    let rel = d.entries_of("killswitch.release");
    assert_eq!(rel.len(), 1);
    assert_eq!(rel[0]["detail"]["partial"], true);
    d.stop();
}
