//! Disk full on the state directory (issue 14): a 4 MiB tmpfs under the
//! daemon's state dir, filled while it works. It says so (status, metrics,
//! doctor, an alert in its log), keeps enforcing (the kill switch's holds,
//! the flags), holds entries in memory up to `audit.memory_buffer` and
//! counts the rest; once space returns the held entries are written, marked
//! late, followed by `audit.backlog_written` with the count dropped, and
//! the chain verifies. Host only (tmpfs and ENOSPC are the same on 6.1;
//! the guest's budget goes to what differs there).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use governor_tests::{
    free_port, governor, http_get, require_root, row, wait_until, DaemonProc, ShellLoop,
};
use serde_json::Value;

/// Unmounts the test's tmpfs whatever happens.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(-1.0)
}

/// Fills the filesystem of `dir` with `dir/filler`; returns its size.
fn fill(dir: &Path) -> u64 {
    let mut f = std::fs::File::create(dir.join("filler")).expect("filler");
    let chunk = vec![0u8; 16 << 10];
    let mut n = 0u64;
    while f.write_all(&chunk).is_ok() {
        n += chunk.len() as u64;
    }
    // What still fits, byte-sized.
    while f.write_all(&chunk[..64]).is_ok() {
        n += 64;
    }
    n
}

#[test]
fn a_full_state_directory_holds_entries_keeps_enforcing_and_records_the_gap() {
    require_root();
    let files = tempfile::tempdir_in("/tmp").unwrap();
    let guarded = files.path().join("core.py");
    std::fs::write(&guarded, "x = 1\n").unwrap();
    let port = free_port();
    let mut d = DaemonProc::configured(&format!(
        "[defaults]\nmax_restarts = 2\n[audit]\nmemory_buffer = 20\n\
         [metrics]\nlisten = \"127.0.0.1:{port}\"\n[protect]\nuntouchable = [\"{}\"]\n\
         [[service]]\nname = \"looper\"\nexe = \"{}\"\n\
         [[service]]\nname = \"held\"\nexe = \"{}\"\n",
        guarded.display(),
        files.path().join("looper.sh").display(),
        files.path().join("held.sh").display(),
    ));
    std::fs::create_dir_all(&d.state).unwrap();
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=4m,mode=0700", "governor-full"])
        .arg(&d.state)
        .status()
        .expect("mount");
    assert!(ok.success(), "mounting a tmpfs on {}", d.state.display());
    let _mount = Mount(d.state.clone());
    d.spawn();
    let (code, out, err) = governor(&[
        "kill-switch",
        "engage",
        "--scope",
        "held",
        "--reason",
        "disk full test",
        "--socket",
        d.socket.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "engage: {out}{err}");
    let durable_before = d.audit_entries().len();

    // Full.
    let filler = fill(&d.state);
    let full_at = Instant::now();
    let (_held, _) = ShellLoop::start(files.path(), "held.sh", "sleep 0.05");
    let (_looper, _) = ShellLoop::start(files.path(), "looper.sh", "sleep 0.05\nexit 1");
    // It says so, and holds then drops beyond the buffer.
    let s = d.wait_status("entries held and dropped", Duration::from_secs(30), |s| {
        s["audit_held"]["dropped"].as_u64().unwrap_or(0) >= 1
    });
    let h = &s["audit_held"];
    assert_eq!(h["held"], 20, "{h:#}");
    assert!(
        h["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left")),
        "{h:#}"
    );
    let (_, text, _) = governor(&["status", "--socket", d.socket.to_str().unwrap()]);
    assert!(text.contains("AUDIT LOG NOT WRITABLE"), "{text}");
    let (_, m) = http_get(port, "/metrics");
    assert_eq!(metric(&m, "governor_audit_held_entries"), 20.0, "{m}");
    assert!(
        d.log().contains("the state directory is full"),
        "{}",
        d.log()
    );
    let (_, doc, doc_err) = governor(&["doctor", "--config", d.config.to_str().unwrap()]);
    assert!(
        format!("{doc}{doc_err}").contains("state space"),
        "{doc}{doc_err}"
    );
    // It keeps enforcing: the held service's starts are still killed, the
    // crash loop is still seen, the flag still refuses.
    let blocked_at = |m: &str| metric(m, "governor_killswitch_blocked_starts_total");
    let b0 = blocked_at(&m);
    assert!(
        wait_until(Duration::from_secs(10), || {
            blocked_at(&http_get(port, "/metrics").1) > b0
        }),
        "no held start blocked while the disk was full"
    );
    assert_eq!(row(&d.status(), "looper")["state"], "crash-loop");
    let refused = std::fs::OpenOptions::new().write(true).open(&guarded);
    assert!(refused.is_err(), "the flag no longer refuses");

    // Space again: the held entries are written, then the gap's record.
    std::fs::remove_file(d.state.join("filler")).unwrap();
    let freed = Instant::now();
    let s = d.wait_status("held entries written", Duration::from_secs(15), |s| {
        s["audit_held"].is_null()
    });
    let wrote_in = freed.elapsed();
    drop(s);
    let entries = d.audit_entries();
    assert!(entries.len() > durable_before, "entries lost");
    let late: Vec<&Value> = entries
        .iter()
        .filter(|e| e["detail"]["written_late"] == true)
        .collect();
    assert_eq!(late.len(), 20, "held entries written late");
    assert!(late.iter().all(|e| e["detail"]["decided_at"].is_string()));
    let gap = d.entries_of("audit.backlog_written");
    assert_eq!(gap.len(), 1, "{gap:#?}");
    let g = &gap[0]["detail"];
    assert_eq!(g["written_late"], 20, "{g:#}");
    let dropped = g["dropped"].as_u64().unwrap_or(0);
    assert!(dropped >= 1, "{g:#}");
    let by_kind: u64 = g["dropped_kinds"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_u64).sum())
        .unwrap_or(0);
    assert_eq!(
        by_kind, dropped,
        "every dropped entry counted by kind: {g:#}"
    );
    // The held service's killed starts are the switch's doing, not a
    // crash loop (a shell loop is no supervisor, and was counted before).
    let loops: Vec<Value> = d
        .entries_of("crash_loop.entered")
        .into_iter()
        .filter(|e| e["service"] == "held")
        .collect();
    assert!(loops.is_empty(), "{loops:#?}");
    let held_row = d.status();
    assert_ne!(
        row(&held_row, "held")["state"],
        "crash-loop",
        "{held_row:#}"
    );
    // A group whose write hit the full disk was cut back whole: nothing
    // torn, and nothing in the log twice (it is written once, late).
    assert!(d.entries_of("audit.torn_tail").is_empty(), "{}", d.log());
    let ok = governor_audit::verify(&d.audit_log(), None).expect("the chain verifies");
    println!(
        "disk full: {filler} bytes of filler; full for {:.1} s: 20 entries held, {dropped} \
         dropped and counted by kind ({}); enforcement went on (held starts killed, flag \
         refused); written {} ms after space returned; chain verifies ({} entries, {} torn tails)",
        full_at.elapsed().as_secs_f64() - wrote_in.as_secs_f64(),
        g["dropped_kinds"],
        wrote_in.as_millis(),
        ok.entries,
        d.entries_of("audit.torn_tail").len()
    );
    d.stop();
}
