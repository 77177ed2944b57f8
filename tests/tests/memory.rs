//! Memory budgets (issue 11) with real pm2 apps that really allocate:
//! a leak restarted through pm2 soon after its own first reading over the
//! ceiling, tiers, a critical service alerted and left alone, helpers'
//! memory counted, a memory loop, and drift from a service's own baseline.
//! Host only: the guest has no node.

use std::time::{Duration, Instant};

use governor_tests::{host_pm2, wait_until, DaemonProc};
use serde_json::Value;

fn row<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .unwrap_or(&Value::Null)
}

fn of<'a>(entries: &'a [Value], service: &str) -> Vec<&'a Value> {
    entries.iter().filter(|e| e["service"] == service).collect()
}

/// A node app that allocates `hold` MiB at once, then `rate` MiB/s up to
/// `max` MiB (only on its first run when `once`), and logs
/// `<unix ms> <rss bytes>` to `log` every 20 ms.
fn app(dir: &std::path::Path, name: &str, hold: u64, rate: u64, max: u64, once: bool) -> String {
    let marker = dir.join(format!("{name}.ran"));
    let log = dir.join(format!("{name}.rss"));
    let js = dir.join(format!("{name}.js"));
    std::fs::write(
        &js,
        format!(
            r#"const fs = require('fs');
const first = !fs.existsSync({marker:?});
fs.writeFileSync({marker:?}, '1');
const held = [Buffer.alloc({hold} << 20, 1)];
let grown = 0;
if (first || !{once}) {{
  setInterval(() => {{
    if (grown < {max}) {{
      held.push(Buffer.alloc(({rate} / 10) << 20, 1)); grown += {rate} / 10;
      // Logged at once too: governor may act on a crossing within the 20 ms
      // between the timer's readings, and the app must see itself over first.
      fs.appendFileSync({log:?}, Date.now() + ' ' + process.memoryUsage.rss() + '\n');
    }}
  }}, 100);
}}
setInterval(() => fs.appendFileSync({log:?}, Date.now() + ' ' + process.memoryUsage.rss() + '\n'), 20);
"#,
            marker = marker.display().to_string(),
            log = log.display().to_string(),
        ),
    )
    .unwrap();
    js.display().to_string()
}

/// The app's own first reading over `ceiling` bytes (unix ms), from its log.
fn first_over(dir: &std::path::Path, name: &str, ceiling: u64) -> Option<u64> {
    let text = std::fs::read_to_string(dir.join(format!("{name}.rss"))).ok()?;
    text.lines().find_map(|l| {
        let (t, rss) = l.split_once(' ')?;
        (rss.trim().parse::<u64>().ok()? > ceiling).then(|| t.parse().ok())?
    })
}

fn unix_ms(rfc3339: &str) -> u64 {
    let ts: jiff::Timestamp = rfc3339.parse().expect("audit ts");
    ts.as_millisecond() as u64
}

#[test]
fn memory_budgets_restart_alert_and_loop() {
    let Some(pm2) = host_pm2() else { return };
    let dir = pm2.home.path().to_path_buf();
    let mut d = DaemonProc::start(
        "[defaults]\nmemory_max_restarts = 2\nkill_timeout = \"3s\"\n\
         [tiers.thin]\nmemory_ceiling = \"65MiB\"\n[tiers.thick]\nmemory_ceiling = \"110MiB\"\n\
         [[service]]\nname = \"leaky\"\npm2 = \"govtest-leaky\"\nmemory_ceiling = \"150MiB\"\n\
         [[service]]\nname = \"fatcrit\"\npm2 = \"govtest-fatcrit\"\nmemory_ceiling = \"80MiB\"\ncritical = true\n\
         [[service]]\nname = \"thin\"\npm2 = \"govtest-thin\"\ntier = \"thin\"\n\
         [[service]]\nname = \"thick\"\npm2 = \"govtest-thick\"\ntier = \"thick\"\n\
         [[service]]\nname = \"family\"\npm2 = \"govtest-family\"\nmemory_ceiling = \"160MiB\"\n\
         [[service]]\nname = \"looper\"\npm2 = \"govtest-looper\"\nmemory_ceiling = \"120MiB\"\n",
    );
    let leaky = app(&dir, "leaky", 0, 20, 400, true);
    let fatcrit = app(&dir, "fatcrit", 120, 0, 0, true);
    let thin = app(&dir, "thin", 40, 0, 0, true);
    let thick = app(&dir, "thick", 40, 0, 0, true);
    let looper = app(&dir, "looper", 0, 60, 400, false);
    // A parent whose two children hold 80 MiB each: under 160 MiB alone,
    // over it with them.
    let family = dir.join("family.js");
    std::fs::write(
        &family,
        "const { spawn } = require('child_process');\n\
         for (let i = 0; i < 2; i++) spawn(process.execPath, ['-e', \
         'const b = Buffer.alloc(80 << 20, 1); setInterval(() => b[0]++, 1000)'], { stdio: 'ignore' });\n\
         setInterval(() => {}, 1000);\n",
    )
    .unwrap();
    for (js, name) in [
        (&leaky, "govtest-leaky"),
        (&fatcrit, "govtest-fatcrit"),
        (&thin, "govtest-thin"),
        (&thick, "govtest-thick"),
        (&family.display().to_string(), "govtest-family"),
        (&looper, "govtest-looper"),
    ] {
        pm2.run(&["start", js, "--name", name]);
    }
    let crit_pid = d.wait_status("fatcrit running", Duration::from_secs(20), |s| {
        row(s, "fatcrit")["pids"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    })["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "fatcrit")
        .unwrap()["pids"][0]
        .clone();

    // The leak: one restart, soon after the app's own first reading over.
    wait_until(Duration::from_secs(30), || {
        !of(&d.entries_of("memory.restart"), "leaky").is_empty()
    });
    let restarts = d.entries_of("memory.restart");
    let leak = of(&restarts, "leaky");
    assert_eq!(leak.len(), 1, "{restarts:#?}\n{}", d.log());
    let e = leak[0];
    assert_eq!(e["detail"]["state"], "requested", "{e}");
    assert!(
        e["detail"]["rss_bytes"].as_u64().unwrap() > 150 << 20,
        "{e}"
    );
    let crossed = first_over(&dir, "leaky", 150 << 20).expect("the app saw itself over");
    let decided = unix_ms(e["ts"].as_str().unwrap());
    let lag = decided as i64 - crossed as i64;
    println!(
        "leaky: governor's restart entry {lag} ms after the app's own first reading over 150 MiB"
    );
    assert!(lag <= 1000, "restart {lag} ms after the crossing");
    // The crossing was seen by the kernel tracker: with the default 60 s
    // settle and 5 m drift, /proc is read only every 5 s otherwise.
    let m = d.status()["memory"].clone();
    assert_eq!(m["tracker"]["kind"], "kernel (kmem/rss_stat)", "{m:#}");
    assert!(
        m["tracker"]["crossings"].as_u64().unwrap_or(0) >= 1,
        "{m:#}"
    );
    assert!(m["available_bytes"].as_u64().is_some(), "{m:#}");
    assert!(m["floor_bytes"].as_u64().is_some(), "{m:#}");
    assert!(m["psi_some_avg10"].as_f64().is_some(), "{m:#}");
    assert_eq!(m["pressure_trigger"], "armed", "{m:#}");
    // pm2 restarted it; it came back under its ceiling.
    let s = d.wait_status("leaky back and ok", Duration::from_secs(20), |s| {
        let r = row(s, "leaky");
        r["memory_state"] == "ok" && r["rss_bytes"].as_u64().is_some_and(|b| b < 150 << 20)
    });
    assert_eq!(row(&s, "leaky")["memory_restarts_in_window"], 1, "{s:#}");
    assert_eq!(row(&s, "leaky")["ceiling_bytes"], 150u64 << 20);
    let jl = pm2.jlist();
    let pm2_restarts = jl
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "govtest-leaky")
        .map(|a| a["pm2_env"]["restart_time"].as_u64().unwrap_or(0))
        .unwrap();
    assert_eq!(pm2_restarts, 1, "pm2 counted the restart");
    let results = d.wait_entries_of("memory.restart_result", 1, Duration::from_secs(10));
    let leak_result = of(&results, "leaky");
    assert!(
        leak_result
            .iter()
            .any(|r| r["detail"]["state"] == "done"
                && r["detail"]["killed"] == serde_json::json!([])),
        "pm2 restarted it (no SIGKILL needed): {results:#?}"
    );
    // The restart's deaths are governor's, not a crash loop.
    assert_ne!(row(&s, "leaky")["state"], "crash-loop");

    // Tiers: thin (65 MiB) at ~80 MiB is restarted, thick (110 MiB) isn't.
    wait_until(Duration::from_secs(20), || {
        !of(&d.entries_of("memory.restart"), "thin").is_empty()
    });
    // (It comes back at 80 MiB, so it is restarted again until its loop.)
    assert!(!of(&d.entries_of("memory.restart"), "thin").is_empty());
    assert!(of(&d.entries_of("memory.restart"), "thick").is_empty());
    assert_eq!(row(&d.status(), "thick")["memory_state"], "ok");

    // Helpers count: family's parent alone is far under 160 MiB.
    wait_until(Duration::from_secs(20), || {
        !of(&d.entries_of("memory.restart"), "family").is_empty()
    });
    let fam = of(&d.entries_of("memory.restart"), "family")
        .first()
        .map(|e| (*e).clone())
        .unwrap_or_else(|| panic!("family not restarted: {:#}", row(&d.status_all(), "family")));
    assert!(fam["detail"]["helpers"].as_u64().unwrap() >= 2, "{fam}");
    // Confirmed with Pss: the parent and its helpers share node's pages.
    assert_eq!(fam["detail"]["measure"], "pss", "{fam}");
    assert_eq!(
        of(&d.entries_of("memory.restart"), "leaky")[0]["detail"]["measure"],
        "rss"
    );

    // Critical: alerted (one entry), never restarted, same pid.
    let over = d.wait_entries_of("memory.over_ceiling", 1, Duration::from_secs(10));
    let crit = of(&over, "fatcrit");
    assert_eq!(crit.len(), 1, "{over:#?}");
    assert_eq!(crit[0]["detail"]["critical"], true);
    assert!(of(&d.entries_of("memory.restart"), "fatcrit").is_empty());
    let s = d.status();
    assert_eq!(row(&s, "fatcrit")["pids"][0], crit_pid);
    assert_eq!(row(&s, "fatcrit")["memory_state"], "over-ceiling");

    // The loop: two restarts allowed in the window, then memory-loop.
    let t0 = Instant::now();
    wait_until(Duration::from_secs(60), || {
        !of(&d.entries_of("memory.loop"), "looper").is_empty()
    });
    assert_eq!(of(&d.entries_of("memory.loop"), "looper").len(), 1);
    let s = d.wait_status("looper in memory-loop", Duration::from_secs(5), |s| {
        row(s, "looper")["memory_state"] == "memory-loop"
    });
    assert_eq!(of(&d.entries_of("memory.restart"), "looper").len(), 2);
    println!(
        "looper: memory-loop after 2 restarts ({:.1} s), now {} MiB",
        t0.elapsed().as_secs_f64(),
        row(&s, "looper")["rss_bytes"].as_u64().unwrap_or(0) >> 20
    );
    let status_text = governor_tests::governor(&["status", "--socket", d.socket.to_str().unwrap()]);
    assert!(status_text.1.contains("MEMORY"), "{}", status_text.1);
    assert!(status_text.1.contains("MEMORY-LOOP"), "{}", status_text.1);
    d.stop();
}

#[test]
fn drift_from_a_services_own_baseline() {
    let Some(pm2) = host_pm2() else { return };
    let dir = pm2.home.path().to_path_buf();
    let mut d = DaemonProc::start(
        "[defaults]\nmemory_settle = \"2s\"\ndrift_after = \"2s\"\ndrift_min = \"16MiB\"\n\
         [[service]]\nname = \"doubler\"\npm2 = \"govtest-doubler\"\n\
         [[service]]\nname = \"flat\"\npm2 = \"govtest-flat\"\n",
    );
    // doubler: ~90 MiB at settling, then another 90 MiB after 4 s.
    let doubler = dir.join("doubler.js");
    std::fs::write(
        &doubler,
        "const held = [Buffer.alloc(50 << 20, 1)];\n\
         setTimeout(() => held.push(Buffer.alloc(90 << 20, 1)), 4000);\n\
         setInterval(() => {}, 1000);\n",
    )
    .unwrap();
    let flat = app(&dir, "flat", 50, 0, 0, true);
    pm2.run(&[
        "start",
        doubler.to_str().unwrap(),
        "--name",
        "govtest-doubler",
    ]);
    pm2.run(&["start", &flat, "--name", "govtest-flat"]);
    let drifts = d.wait_entries_of("memory.drift", 1, Duration::from_secs(30));
    let dd = of(&drifts, "doubler");
    assert_eq!(dd.len(), 1, "{drifts:#?}");
    let base = dd[0]["detail"]["baseline_bytes"].as_u64().unwrap();
    let rss = dd[0]["detail"]["rss_bytes"].as_u64().unwrap();
    println!(
        "doubler: drift at {} MiB over its {} MiB baseline",
        rss >> 20,
        base >> 20
    );
    assert!(rss > base + (80 << 20), "{}", dd[0]);
    // One per episode (the core's unit tests hold it to that), none for
    // the flat one.
    assert_eq!(of(&d.entries_of("memory.drift"), "doubler").len(), 1);
    assert!(of(&d.entries_of("memory.drift"), "flat").is_empty());
    let s = d.status();
    assert_eq!(row(&s, "doubler")["memory_state"], "drift", "{s:#}");
    assert_eq!(row(&s, "flat")["memory_state"], "ok", "{s:#}");
    let flat_base = row(&s, "flat")["baseline_bytes"].as_u64();
    assert!(flat_base.is_some(), "{s:#}");
    // Baselines survive a daemon restart.
    d.stop();
    d.spawn();
    let s = d.status();
    assert_eq!(
        row(&s, "flat")["baseline_bytes"].as_u64(),
        flat_base,
        "{s:#}"
    );
    let m: Value =
        serde_json::from_slice(&std::fs::read(d.state.join("memory.json")).unwrap()).unwrap();
    assert!(
        m["services"]["flat"]["runs"]
            .as_array()
            .is_some_and(|r| !r.is_empty()),
        "{m}"
    );
    d.stop();
}

#[test]
fn startup_allowance_and_pm2s_own_limit() {
    let Some(pm2) = host_pm2() else { return };
    let dir = pm2.home.path().to_path_buf();
    let mut d = DaemonProc::start(
        "[defaults]\nmemory_startup_allowance = 1.5\nmemory_startup_grace = \"4s\"\n\
         [[service]]\nname = \"young\"\npm2 = \"govtest-young\"\nmemory_ceiling = \"80MiB\"\n",
    );
    // ~100 MiB from the start: under 1.5 x 80 MiB while young, over 80 after.
    let young = app(&dir, "young", 60, 0, 0, true);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    pm2.run(&[
        "start",
        &young,
        "--name",
        "govtest-young",
        "--max-memory-restart",
        "500M",
    ]);
    // pm2's own limit is shown beside ours.
    let s = d.wait_status("young read", Duration::from_secs(20), |s| {
        row(s, "young")["rss_bytes"].as_u64().is_some()
    });
    assert_eq!(
        row(&s, "young")["pm2_max_memory_restart_bytes"],
        500u64 << 20,
        "{s:#}"
    );
    let sock = d.socket.to_str().unwrap().to_string();
    wait_until(Duration::from_secs(10), || {
        governor_tests::governor(&["status", "--socket", &sock])
            .1
            .contains("[pm2 max 500]")
    });
    let e = d.wait_entries_of("memory.restart", 1, Duration::from_secs(20));
    let e = of(&e, "young")[0].clone();
    let waited = unix_ms(e["ts"].as_str().unwrap()) - started;
    println!("young: restarted {waited} ms after its start (grace 4 s)");
    assert!(waited >= 4000, "restarted within the grace: {e}");
    assert_eq!(e["detail"]["ceiling_bytes"], 80u64 << 20, "{e}");
    let rss = e["detail"]["rss_bytes"].as_u64().unwrap();
    assert!(rss > 80 << 20 && rss < 120 << 20, "{e}");
    // It was over 80 MiB for seconds while young, and restarted soon after
    // the grace ended.
    let crossed = first_over(&dir, "young", 80 << 20).expect("the app saw itself over 80 MiB");
    let restarted = unix_ms(e["ts"].as_str().unwrap());
    assert!(
        restarted >= crossed + 2000,
        "over at {crossed}, restarted at {restarted}"
    );
    assert!(
        waited < 6000,
        "the grace ended at 4 s; restarted at {waited} ms"
    );
    d.stop();
}

/// The kernel tracker on this kernel (host and 6.1 guest, no node needed):
/// a process growing past its ceiling is seen through `kmem/rss_stat`.
#[test]
fn the_kernel_tracker_sees_a_crossing() {
    let fx = governor_tests::fixture_bin();
    let mut d = DaemonProc::start(&format!(
        "[[service]]\nname = \"grower\"\nexe = \"{}\"\nmemory_ceiling = \"64MiB\"\ncritical = true\n",
        fx.display()
    ));
    let t0 = Instant::now();
    let mut child = std::process::Command::new(&fx)
        .args(["grow", "100", "128"])
        .spawn()
        .expect("spawn the fixture");
    let over = d.wait_entries_of("memory.over_ceiling", 1, Duration::from_secs(60));
    let lag = t0.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    let e = of(&over, "grower");
    assert_eq!(e.len(), 1, "{over:#?}\n{}", d.log());
    assert!(
        e[0]["detail"]["rss_bytes"].as_u64().unwrap() > 64 << 20,
        "{}",
        e[0]
    );
    let m = d.status()["memory"].clone();
    println!(
        "grower: over its 64 MiB ceiling, alerted {} ms after its start (100 MiB/s); tracker {}",
        lag.as_millis(),
        m["tracker"]
    );
    assert_eq!(m["tracker"]["kind"], "kernel (kmem/rss_stat)", "{m:#}");
    assert!(
        m["tracker"]["crossings"].as_u64().unwrap_or(0) >= 1,
        "{m:#}"
    );
    d.stop();
}
