//! Drift (issue 12): a watched file changed without a governance action
//! is `drift.config` naming the writer and both hashes (sed -i, a python
//! open('w'), an editor's temp file + rename); a change through
//! `governor deploy --files` is not; a change while the daemon is down is
//! found at start. A pm2 app restarted while the daemon is down is
//! `drift.uptime` at the next start.

use std::process::Command;
use std::time::Duration;

use governor_tests::{governor, governor_in_login, host_pm2, wait_until, DaemonProc};
use serde_json::Value;

fn sha256(p: &std::path::Path) -> String {
    let out = Command::new("sha256sum")
        .arg(p)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

fn pm2_pid(pm2: &governor_tests::Pm2, name: &str) -> u64 {
    pm2.jlist()
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == name).cloned())
        .and_then(|a| a["pid"].as_u64())
        .unwrap_or(0)
}

fn python(code: &str) {
    let st = Command::new("python3").args(["-c", code]).status().unwrap();
    assert!(st.success());
}

/// Waits for the n-th `drift.config` and returns it.
fn nth_drift(d: &DaemonProc, n: usize) -> Value {
    let all = d.wait_entries_of("drift.config", n, Duration::from_secs(10));
    assert!(
        all.len() >= n,
        "drift.config #{n} missing: {all:#?}\n{}",
        d.log()
    );
    all[n - 1].clone()
}

fn drift_items(d: &DaemonProc) -> Vec<Value> {
    let (code, out, err) = governor(&["drift", "--json", "--socket", d.socket.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    v["items"].as_array().cloned().unwrap_or_default()
}

#[test]
fn watched_files_drift_with_who_unless_deployed() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("bot-config.json");
    std::fs::write(&f, "{\"model\": \"a\"}\n").unwrap();
    let first = sha256(&f);
    let mut d = DaemonProc::start(&format!(
        "[[service]]\nname = \"bot\"\npm2 = \"drift-bot\"\n[drift]\nwatch = [\"{}\"]\n",
        f.display()
    ));
    let fs = f.to_str().unwrap();

    // 1. sed -i (a temp file renamed over it).
    let st = Command::new("sed")
        .args(["-i", "s/a/b/", fs])
        .status()
        .unwrap();
    assert!(st.success());
    let e = nth_drift(&d, 1);
    let after_sed = sha256(&f);
    assert_eq!(e["detail"]["declared_sha256"], first, "{e:#}");
    assert_eq!(e["detail"]["sha256"], after_sed, "{e:#}");
    assert_eq!(e["detail"]["writer"]["comm"], "sed", "{e:#}");
    assert!(e["detail"]["writer"]["pid"].as_u64().unwrap() > 0);

    // 2. python open('w') (truncate and write in place).
    python(&format!(
        "open({fs:?}, 'w').write('{{\"model\": \"c\"}}\\n')"
    ));
    let e = nth_drift(&d, 2);
    assert_eq!(e["detail"]["writer"]["comm"], "python3", "{e:#}");
    assert_eq!(e["detail"]["sha256"], sha256(&f), "{e:#}");
    assert_eq!(
        e["detail"]["declared_sha256"], first,
        "still the declared one"
    );

    // 3. An editor: write a temp file, rename it over.
    python(&format!(
        "import os; t = {fs:?} + '.swp'; open(t, 'w').write('{{\"model\": \"d\"}}\\n'); os.rename(t, {fs:?})"
    ));
    let e = nth_drift(&d, 3);
    assert_eq!(e["detail"]["writer"]["comm"], "python3", "{e:#}");
    assert_eq!(e["detail"]["writer"]["op"], "rename", "{e:#}");
    assert_eq!(e["detail"]["sha256"], sha256(&f), "{e:#}");

    // The open item, with who.
    let items = drift_items(&d);
    let c: Vec<&Value> = items.iter().filter(|i| i["kind"] == "config").collect();
    assert_eq!(c.len(), 1, "{items:#?}");
    assert_eq!(c[0]["who"]["op"], "rename");

    // Accepting: a person at a login terminal only.
    let sock = d.socket.to_str().unwrap().to_string();
    let (code, _, err) = governor(&["drift", "accept", fs, "--reason", "ok", "--socket", &sock]);
    assert_ne!(code, 0);
    assert!(err.contains("login terminal"), "{err}");
    let (code, out) = governor_in_login(
        &[
            "drift",
            "accept",
            fs,
            "--reason",
            "model d is right",
            "--socket",
            &sock,
        ],
        "",
    );
    assert_eq!(code, 0, "{out}");
    assert!(drift_items(&d).iter().all(|i| i["kind"] != "config"));
    let acc = d.entries_of("drift.accept");
    assert_eq!(acc.len(), 1);
    assert_eq!(acc[0]["detail"]["new_sha256"], sha256(&f));

    // 4. Through a deploy: no drift.
    let new = dir.path().join("new.json");
    std::fs::write(&new, "{\"model\": \"e\"}\n").unwrap();
    let (code, out, err) = governor(&[
        "deploy",
        "bot",
        "--reason",
        "model e",
        "--files",
        fs,
        "--socket",
        &sock,
        "--",
        "cp",
        new.to_str().unwrap(),
        fs,
    ]);
    assert_eq!(code, 0, "{out}{err}\n{}", d.log());
    assert!(out.contains("changed, declared"), "{out}");
    let files = d.wait_entries_of("deploy.files", 1, Duration::from_secs(5));
    assert_eq!(files[0]["detail"]["files"][0]["new_sha256"], sha256(&f));
    // A later write by someone else would be drift #4 within 2.5 s; the
    // deploy's write must not be.
    python(&format!("import os; os.utime({fs:?})"));
    assert!(!wait_until(Duration::from_secs(3), || d
        .entries_of("drift.config")
        .len()
        > 3));

    // 5. Changed while the daemon was stopped: reported at start.
    d.stop();
    std::fs::write(&f, "{\"model\": \"while down\"}\n").unwrap();
    d.spawn();
    let e = nth_drift(&d, 4);
    assert!(
        e["detail"]["why"].as_str().unwrap().contains("unobserved"),
        "{e:#}"
    );
    assert_eq!(e["detail"]["sha256"], sha256(&f));
    // ...once: another restart doesn't report it again.
    d.stop();
    d.spawn();
    assert_eq!(d.entries_of("drift.config").len(), 4);
    assert!(drift_items(&d).iter().any(|i| i["kind"] == "config"));

    // 6. Removed: drift with no new hash, naming the unlink; still open
    // (and not reported again) after a restart.
    std::fs::remove_file(&f).unwrap();
    let e = nth_drift(&d, 5);
    assert!(e["detail"]["sha256"].is_null(), "{e:#}");
    assert_eq!(e["detail"]["writer"]["op"], "unlink", "{e:#}");
    d.stop();
    d.spawn();
    assert_eq!(d.entries_of("drift.config").len(), 5, "{}", d.log());
    assert!(
        drift_items(&d)
            .iter()
            .any(|i| i["kind"] == "config" && i["sha256"].is_null()),
        "{}\n{}",
        std::fs::read_to_string(d.state.join("protect.json")).unwrap_or_default(),
        d.log()
    );
    d.stop();
}

/// A pm2 app restarted while the daemon is stopped is `drift.uptime` at
/// the next start; one restarted while it runs is not.
#[test]
fn an_instance_restarted_while_governor_was_down_is_uptime_drift() {
    let Some(pm2) = host_pm2() else { return };
    let idle = pm2.home.path().join("idle.js");
    std::fs::write(&idle, "setInterval(() => {}, 1000);\n").unwrap();
    pm2.run(&["start", idle.to_str().unwrap(), "--name", "up-api"]);
    let mut d = DaemonProc::start("[[service]]\nname = \"api\"\npm2 = \"up-api\"\n");
    let has_pid = |s: &Value| {
        s["services"].as_array().is_some_and(|a| {
            a.iter()
                .any(|x| x["name"] == "api" && x["pids"].as_array().is_some_and(|p| !p.is_empty()))
        })
    };
    d.wait_status("api", Duration::from_secs(30), has_pid);
    // Restarted while governor watches: seen, not drift.
    pm2.run(&["restart", "up-api"]);
    let pid = pm2_pid(&pm2, "up-api");
    d.wait_status("api's new instance", Duration::from_secs(20), |s| {
        s["services"].as_array().is_some_and(|a| {
            a.iter().any(|x| {
                x["name"] == "api"
                    && x["pids"]
                        .as_array()
                        .is_some_and(|p| p.contains(&pid.into()))
            })
        })
    });
    d.stop();
    d.spawn();
    assert!(d.entries_of("drift.uptime").is_empty(), "{}", d.log());

    // Restarted while governor is down: drift at the next start.
    d.stop();
    pm2.run(&["restart", "up-api"]);
    d.spawn();
    let e = d.wait_entries_of("drift.uptime", 1, Duration::from_secs(5));
    assert_eq!(e.len(), 1, "{}", d.log());
    assert_eq!(e[0]["service"], "api");
    assert!(e[0]["detail"]["why"]
        .as_str()
        .unwrap()
        .contains("not running"));
    let items = drift_items(&d);
    assert!(
        items
            .iter()
            .any(|i| i["kind"] == "uptime" && i["service"] == "api"),
        "{items:#?}"
    );
    let s = d.status();
    let api = s["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "api")
        .unwrap()
        .clone();
    assert_eq!(api["drift"][0], "uptime", "{api:#}");
    // Reported once per instance.
    d.stop();
    d.spawn();
    assert_eq!(d.entries_of("drift.uptime").len(), 1);
    d.stop();
}
