//! A node app under real pm2 (the pinned version from npm) resolves to its
//! pm2 app name, from kernel events and /proc alone.

use std::time::Duration;

use governor::{config::Config, proctable::Matcher, watch::track};
use governor_tests::{execs_of, pm2_runs_here, Collector, Pm2};

#[test]
fn pm2_app_resolves_to_its_name() {
    if !pm2_runs_here() {
        return;
    }
    let c = Collector::start();
    let pm2 = Pm2::isolated();
    let app = pm2.home.path().join("steady.js");
    std::fs::write(&app, "setInterval(() => {}, 1000);\n").unwrap();
    pm2.run(&["start", app.to_str().unwrap(), "--name", "govtest-steady"]);
    let mut pid = 0;
    for _ in 0..100 {
        pid = pm2.jlist()[0]["pid"].as_u64().unwrap_or(0) as u32;
        if pid != 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_ne!(pid, 0, "pm2 never reported a pid");
    c.wait_for("exec of the pm2 app", Duration::from_secs(10), |evs| {
        !execs_of(evs, pid).is_empty()
    });
    let cfg = Config::parse(
        std::path::Path::new("t.toml"),
        "[[service]]\nname = \"steady\"\npm2 = \"govtest-steady\"\n",
    )
    .unwrap();
    // Replay what the kernel reported through the process table, as the
    // daemon does (seeded first, like at start).
    let mut plain = governor::proctable::table(Matcher::default());
    let mut configured = governor::proctable::table(governor::proctable::matcher(&cfg));
    for ev in c.events() {
        track(&mut plain, &ev);
        track(&mut configured, &ev);
    }
    let p = plain.get(pid).expect("app in the process table");
    assert_eq!(
        p.pm2.as_ref().map(|a| a.name.as_str()),
        Some("govtest-steady"),
        "{p:?}"
    );
    assert_eq!(p.service, "pm2:govtest-steady");
    assert_eq!(configured.get(pid).unwrap().service, "steady");
    assert!(configured.get(pid).unwrap().configured);
    // pm2's God daemon is the app's parent.
    let god = plain
        .get(p.ppid)
        .map(|g| g.argv.join(" "))
        .unwrap_or_default();
    assert!(
        god.contains("pm2/lib/Daemon.js") || god.contains("God Daemon"),
        "parent of the app: {god:?}"
    );
    c.stop();
}
