//! pm2 itself wedged or killed mid-restart (issue 14): the supervisor
//! command times out (`[system] supervisor_timeout`) and the action is
//! audited as failed at once, after its decision was; the old instance is
//! still SIGKILLed once it outlives `kill_timeout` (the budget holds while
//! pm2 is wedged, and pm2 brings the app back when it resumes); only then
//! may the memory policy try again, at the next confirmed breach — with the
//! God gone for good, each try is refused and audited until memory-loop.
//! The daemon carries on answering. Host only: the guest has no node.

use std::time::{Duration, Instant};

use governor_tests::{host_pm2, row, DaemonProc};
use serde_json::Value;

fn of<'a>(entries: &'a [Value], service: &str, state: &str) -> Vec<&'a Value> {
    entries
        .iter()
        .filter(|e| e["service"] == service && e["detail"]["state"] == state)
        .collect()
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) on a pid this test read from pm2's own pid file.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

#[test]
fn a_wedged_or_killed_pm2_times_out_is_audited_and_retried() {
    let Some(pm2) = host_pm2() else { return };
    let dir = pm2.home.path().to_path_buf();
    let (ran, go, go2) = (dir.join("w.ran"), dir.join("w.go"), dir.join("w.go2"));
    // 100 MiB over a 64 MiB ceiling when told: the first run on `go`, a
    // later run on `go2`.
    let js = dir.join("w.js");
    std::fs::write(
        &js,
        format!(
            "const fs = require('fs'); const held = [];\n\
             const first = !fs.existsSync({ran:?}); fs.writeFileSync({ran:?}, '1');\n\
             setInterval(() => {{ if (!held.length && fs.existsSync(first ? {go:?} : {go2:?})) \
             held.push(Buffer.alloc(100 << 20, 1)); }}, 50);\n",
            ran = ran.display().to_string(),
            go = go.display().to_string(),
            go2 = go2.display().to_string(),
        ),
    )
    .unwrap();
    pm2.run(&["start", js.to_str().unwrap(), "--name", "govtest-wedged"]);
    let mut d = DaemonProc::start(
        "[system]\nsupervisor_timeout = \"2s\"\n\
         [defaults]\nmemory_max_restarts = 6\nkill_timeout = \"3s\"\n\
         [[service]]\nname = \"w\"\npm2 = \"govtest-wedged\"\nmemory_ceiling = \"64MiB\"\n",
    );
    d.wait_status("w running", Duration::from_secs(20), |s| {
        row(s, "w")["pids"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    });
    let god: i32 = std::fs::read_to_string(dir.join("pm2.pid"))
        .expect("pm2.pid")
        .trim()
        .parse()
        .expect("pm2.pid holds a pid");

    // Wedged: pm2's God daemon stopped, so `pm2 restart` never answers.
    // (Resumed on the way out whatever happens: pm2's own `kill` at the
    // end would wait for it forever.)
    struct Resume(i32);
    impl Drop for Resume {
        fn drop(&mut self) {
            // SAFETY: kill(2) with SIGCONT on pm2's God; harmless if gone.
            unsafe { libc::kill(self.0, libc::SIGCONT) };
        }
    }
    let resume = Resume(god);
    signal(god, libc::SIGSTOP);
    let wedged_at = Instant::now();
    std::fs::write(&go, "1").unwrap();
    let failed = d.wait_entries_of("memory.restart_result", 1, Duration::from_secs(30));
    let failed = of(&failed, "w", "failed");
    assert_eq!(failed.len(), 1, "{failed:#?}\n{}", d.log());
    let took = wedged_at.elapsed();
    let out = failed[0]["detail"]["output"].as_str().unwrap_or_default();
    assert!(out.contains("no answer within 2s"), "{:#}", failed[0]);
    // The daemon carries on: status answers while pm2 is wedged, without
    // waiting for pm2's own view.
    let asked = Instant::now();
    let s = d.status();
    let answered = asked.elapsed();
    assert!(
        s["supervisor_views"]
            .as_str()
            .is_some_and(|n| n.contains("last views shown")),
        "{s:#}"
    );
    let old_pid = row(&s, "w")["pids"][0].as_i64();
    // The budget holds: the old instance is SIGKILLed at kill_timeout.
    let killed = d.wait_entries_of("memory.killed", 1, Duration::from_secs(20));
    assert_eq!(killed.len(), 1, "{}", d.log());
    assert_eq!(killed[0]["service"], "w");
    if let Some(p) = old_pid {
        assert_eq!(
            killed[0]["detail"]["killed"],
            serde_json::json!([p]),
            "{:#}",
            killed[0]
        );
    }
    // No retry piled on the wedged pm2 before the reaper was done.
    assert_eq!(
        of(&d.entries_of("memory.restart"), "w", "requested").len(),
        1,
        "{}",
        d.log()
    );
    // Each attempt's decision was durable before the attempt: a
    // `memory.restart` entry precedes each failed result.
    let all = d.audit_entries();
    let mut open = 0;
    for e in &all {
        if e["service"] != "w" {
            continue;
        }
        match e["kind"].as_str() {
            Some("memory.restart") => open += 1,
            Some("memory.restart_result") => {
                assert!(open > 0, "a result without its decision first: {e:#}");
                open -= 1;
            }
            _ => {}
        }
    }

    // pm2 resumes and brings the killed app back: w is back under its
    // ceiling as a new instance.
    drop(resume);
    let s = d.wait_status("w back under its ceiling", Duration::from_secs(30), |s| {
        let r = row(s, "w");
        r["memory_state"] == "ok" && r["pids"][0].as_i64().is_some_and(|p| Some(p) != old_pid)
    });
    let pid = row(&s, "w")["pids"][0].as_i64().expect("w's pid") as i32;
    // Its own killed pm2 commands are not a crash loop of anything.
    let loops = d.entries_of("crash_loop.entered");
    assert!(loops.is_empty(), "{loops:#?}");
    println!(
        "pm2 wedged: the restart timed out at 2 s and was audited as failed {:.1} s after the \
         breach; status answered in {} ms meanwhile; the old instance SIGKILLed at kill_timeout \
         (3 s); back under its ceiling once pm2 resumed",
        took.as_secs_f64(),
        answered.as_millis()
    );

    // Killed: pm2's God gone for good, the app left running and over its
    // ceiling. The restart fails at once, is audited, retried up to the
    // policy's bound (memory_max_restarts), then memory-loop.
    let killed_at = d
        .audit_entries()
        .last()
        .and_then(|e| e["seq"].as_u64())
        .unwrap_or(0);
    signal(god, libc::SIGKILL);
    std::fs::write(&go2, "1").unwrap();
    let s = d.wait_status("w in memory-loop", Duration::from_secs(30), |s| {
        row(s, "w")["memory_state"] == "memory-loop"
    });
    // Refused at decision time: with its God gone the app has no
    // supervisor (the kernel saw the God exit and the app reparented), or
    // failed in the act if that was not in yet: either way audited.
    let after = |e: &&Value| e["seq"].as_u64() > Some(killed_at);
    let refused = d.entries_of("memory.restart");
    let refused: Vec<&Value> = of(&refused, "w", "refused")
        .into_iter()
        .filter(after)
        .collect();
    let results = d.entries_of("memory.restart_result");
    let failed_now = of(&results, "w", "failed")
        .into_iter()
        .filter(after)
        .count();
    let gone = refused.len() + failed_now;
    assert!(gone >= 1, "{refused:#?}\n{results:#?}\n{s:#}");
    if let Some(r) = refused.first() {
        println!("refused: {}", r["detail"]["why"]);
    }
    // The orphaned app is this test's to end (its God is gone).
    signal(pid, libc::SIGKILL);
    let verified = governor_audit::verify(&d.audit_log(), None).expect("the chain verifies");
    println!(
        "pm2 killed: {gone} restarts refused or failed at once (God pid {god} gone), each audited; \
         memory-loop after the policy's bound; chain verifies ({} entries)",
        verified.entries
    );
    d.stop();
}
