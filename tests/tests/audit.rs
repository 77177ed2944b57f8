//! The audit chain as the daemon writes it, and the CLI that checks it:
//! start/reload/stop entries, tampering caught by `governor audit verify`,
//! kill -9 mid-write, the append-only attribute, and Telegram alerts through
//! a real HTTP stand-in of the Bot API.

use std::{fs, io::Write, os::unix::fs::PermissionsExt, process::Command, time::Duration};

use governor_tests::{botapi::BotServer, governor, patience, wait_until, DaemonProc};

fn verify(log: &std::path::Path, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["audit", "verify", "--log", log.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (code, out, err) = governor(&args);
    (code, format!("{out}{err}"))
}

#[test]
fn daemon_records_start_reload_reject_and_stop() {
    let mut d = DaemonProc::start("[defaults]\nmax_restarts = 2\n");
    let started = d.entries_of("daemon.started");
    assert_eq!(started.len(), 1);
    let det = &started[0]["detail"];
    assert_eq!(det["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(det["config_hash"].as_str().unwrap().len(), 64);
    assert!(
        det["layers"].as_array().is_some_and(|l| !l.is_empty()),
        "{det}"
    );

    // A bad config on SIGHUP is rejected and the old one kept.
    let good = fs::read_to_string(&d.config).unwrap();
    d.edit_config(&good.replace("max_restarts = 2", "max_restarts = 2\nwindow = \"soon\""));
    d.signal(libc::SIGHUP);
    let rejected = d.wait_entries_of("config.rejected", 1, Duration::from_secs(10));
    assert_eq!(rejected.len(), 1, "{}", d.log());
    assert!(rejected[0]["detail"]["error"]
        .as_str()
        .unwrap()
        .contains("defaults.window"));
    // Still serving, on the old config.
    assert!(d.status()["services"].is_array());
    d.edit_config(&good.replace("max_restarts = 2", "max_restarts = 4"));
    d.signal(libc::SIGHUP);
    let reloaded = d.wait_entries_of("config.reloaded", 1, Duration::from_secs(10));
    assert_eq!(reloaded.len(), 1, "{}", d.log());
    assert!(d.stop().success());
    assert_eq!(d.entries_of("daemon.stopped").len(), 1);
    let (code, out) = verify(&d.audit_log(), &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.starts_with("ok: "), "{out}");
    // Approvals of the config edits are in the chain too.
    assert_eq!(d.entries_of("protect.window_open").len(), 2, "{}", d.log());
}

/// Tampering with the daemon's log is caught by the CLI, naming the entry.
#[test]
fn verify_cli_names_the_tampered_entry() {
    let mut d = DaemonProc::start("");
    // One reload at a time: signals sent while one is handled would merge.
    for i in 1..=4 {
        d.signal(libc::SIGHUP);
        let n = d
            .wait_entries_of("config.reloaded", i, Duration::from_secs(10))
            .len();
        assert_eq!(n, i, "{}", d.log());
    }
    d.stop();
    let log = d.audit_log();
    governor_tests::clear_append_only(&log);
    let pristine = fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = pristine.lines().collect();
    assert!(lines.len() >= 6, "{pristine}");
    let head = fs::read_to_string(d.state.join("audit.head")).unwrap();
    let head = head.trim();

    // One byte of a middle entry.
    let mut bad = lines.clone();
    let edited = bad[2].replacen("config.reloaded", "config.reloadex", 1);
    bad[2] = &edited;
    fs::write(&log, bad.join("\n") + "\n").unwrap();
    let (code, out) = verify(&log, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(":3:") && out.contains("seq 3") && out.contains("hash mismatch"),
        "{out}"
    );

    // A deleted line: seq gap at the next one.
    let mut bad = lines.clone();
    bad.remove(2);
    fs::write(&log, bad.join("\n") + "\n").unwrap();
    let (code, out) = verify(&log, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(":3:") && out.contains("seq"), "{out}");

    // Truncated tail: a valid shorter chain, caught only against the head.
    fs::write(&log, lines[..3].join("\n") + "\n").unwrap();
    let (code, out) = verify(&log, &[]);
    assert_eq!(code, 0, "a prefix is a valid chain on its own: {out}");
    let (code, out) = verify(&log, &["--expect-head", head]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("head"), "{out}");

    fs::write(&log, &pristine).unwrap();
    let (code, out) = verify(&log, &["--expect-head", head]);
    assert_eq!(code, 0, "{out}");
}

/// kill -9 while the daemon writes many entries: the chain verifies, and a
/// torn last line is set aside and recorded at the next start.
#[test]
fn kill9_mid_write_then_torn_tail_is_recovered() {
    let mut d = DaemonProc::start("");
    let pid = d.pid();
    // SIGHUPs keep coming until the daemon is killed (pending ones merge,
    // so a fixed number of signals is no fixed number of entries).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sending = stop.clone();
    let t = std::thread::spawn(move || {
        while !sending.load(std::sync::atomic::Ordering::SeqCst) {
            // SAFETY: kill(2) on the daemon's pid; it may already be dead.
            if unsafe { libc::kill(pid as i32, libc::SIGHUP) } != 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    });
    // Kill it mid-stream, once it is well into writing.
    d.wait_entries_of("config.reloaded", 20, Duration::from_secs(30));
    d.kill9();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    t.join().unwrap();
    let n = d.entries_of("config.reloaded").len();
    assert!(
        n > 10,
        "the daemon should have been writing many entries, wrote {n}"
    );
    let (code, out) = verify(&d.audit_log(), &[]);
    assert_eq!(code, 0, "after kill -9: {out}");

    // A crash mid-line leaves a torn tail (O_APPEND works through +a).
    let torn = "{\"seq\":99999,\"ts\":\"2026-";
    fs::OpenOptions::new()
        .append(true)
        .open(d.audit_log())
        .unwrap()
        .write_all(torn.as_bytes())
        .unwrap();
    d.spawn();
    let torn_entries = d.entries_of("audit.torn_tail");
    assert_eq!(torn_entries.len(), 1, "{}", d.log());
    let saved = torn_entries[0]["detail"]["saved_to"]
        .as_str()
        .unwrap()
        .to_string();
    let saved_path = if saved.starts_with('/') {
        std::path::PathBuf::from(&saved)
    } else {
        d.state.join(&saved)
    };
    assert_eq!(
        fs::read_to_string(&saved_path).unwrap(),
        torn,
        "torn bytes set aside in {saved}"
    );
    d.stop();
    let (code, out) = verify(&d.audit_log(), &[]);
    assert_eq!(code, 0, "{out}");
}

#[test]
fn append_only_log_refuses_rewrites_from_other_processes() {
    let d = DaemonProc::start("");
    let log = d.audit_log().display().to_string();
    let out = Command::new("/bin/sh")
        .args(["-c", &format!("echo forged > {log}")])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not permitted"),
        "{out:?}"
    );
    let out = Command::new("/bin/sh")
        .args(["-c", &format!("mv {log} {log}.moved")])
        .output()
        .unwrap();
    assert!(!out.status.success(), "rename of the log must be refused");
    // The daemon itself still appends.
    d.signal(libc::SIGHUP);
    let reloaded = d.wait_entries_of("config.reloaded", 1, Duration::from_secs(10));
    assert_eq!(reloaded.len(), 1, "{}", d.log());
}

fn telegram_section(api: &str, token: &std::path::Path) -> String {
    format!(
        "[alerts.telegram]\nbot_token_file = \"{}\"\nchat_id = \"-1001234567890\"\napi_url = \"{api}\"\nmin_severity = \"warning\"\n",
        token.display()
    )
}

/// Startup notice and alert deliveries reach the Bot API stand-in, and each
/// delivery is recorded in the chain with the head in the message.
#[test]
fn telegram_startup_notice_and_delivery_audit() {
    let bot = BotServer::start(vec![]);
    let (_tdir, token) = governor_tests::botapi::token_file();
    let d = DaemonProc::start(&telegram_section(&bot.url(), &token));
    let reqs = bot.wait_for(1, patience(Duration::from_secs(10)));
    assert_eq!(reqs.len(), 1, "startup notice expected");
    assert!(
        reqs[0].path.ends_with("/sendMessage") && reqs[0].path.contains("/bot"),
        "{}",
        reqs[0].path
    );
    let text = reqs[0].text();
    assert!(text.contains("governor started on"), "{text}");
    // The chain head (seq:hash prefix) the daemon had when it alerted.
    let head = text
        .split("head ")
        .nth(1)
        .and_then(|h| h.split_whitespace().next())
        .unwrap_or_default();
    let (seq, hash) = head.split_once(':').unwrap_or_default();
    assert!(
        seq.parse::<u64>().is_ok_and(|s| s >= 1)
            && hash.len() >= 8
            && hash.chars().all(|c| c.is_ascii_hexdigit()),
        "head in the message: {text}"
    );
    let delivered = d.wait_entries_of("alert.delivered", 1, Duration::from_secs(10));
    assert_eq!(delivered.len(), 1, "{}", d.log());
}

/// Bad Telegram settings are config errors naming the key.
#[test]
fn telegram_config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    let check = |body: &str| -> (i32, String) {
        let cfg = dir.path().join("g.toml");
        fs::write(&cfg, body).unwrap();
        let (code, out, err) = governor(&["check-config", cfg.to_str().unwrap()]);
        (code, format!("{out}{err}"))
    };
    let section = |tok: &str, chat: Option<&str>, api: &str| {
        let mut s = format!("[alerts.telegram]\nbot_token_file = \"{tok}\"\n");
        if let Some(c) = chat {
            s.push_str(&format!("chat_id = \"{c}\"\n"));
        }
        s.push_str(&format!("api_url = \"{api}\"\n"));
        s
    };
    let tok = token.to_str().unwrap();
    // Missing file.
    let (code, out) = check(&section(tok, Some("42"), "https://api.telegram.org"));
    assert_eq!(code, 1);
    assert!(out.contains("bot_token_file"), "{out}");
    // World-readable.
    fs::write(&token, "123456:ABCdef\n").unwrap();
    fs::set_permissions(&token, fs::Permissions::from_mode(0o644)).unwrap();
    let (code, out) = check(&section(tok, Some("42"), "https://api.telegram.org"));
    assert_eq!(code, 1);
    assert!(
        out.contains("bot_token_file") && out.contains("chmod 600"),
        "{out}"
    );
    // Empty.
    fs::write(&token, "\n").unwrap();
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).unwrap();
    let (code, out) = check(&section(tok, Some("42"), "https://api.telegram.org"));
    assert_eq!(code, 1);
    assert!(
        out.contains("bot_token_file") && out.contains("empty"),
        "{out}"
    );
    fs::write(&token, "123456:ABCdef\n").unwrap();
    // chat_id absent.
    let (code, out) = check(&section(tok, None, "https://api.telegram.org"));
    assert_eq!(code, 1);
    assert!(out.contains("chat_id"), "{out}");
    // api_url not a URL.
    let (code, out) = check(&section(tok, Some("42"), "not a url"));
    assert_eq!(code, 1);
    assert!(out.contains("api_url"), "{out}");
    // And the good one passes.
    let (code, out) = check(&section(tok, Some("42"), "https://api.telegram.org"));
    assert_eq!(code, 0, "{out}");
}

/// `approve_via = "telegram"`, end to end through the daemon: `governor
/// approve` at a terminal only asks; a tap by someone not in
/// `telegram_approvers` is answered and changes nothing; the approver's tap
/// opens the window, the write goes through and is logged as allowed, and
/// `approve --end` puts the flag back.
#[test]
fn telegram_approval_opens_a_window_only_on_an_authorised_tap() {
    let bot = BotServer::start(vec![]);
    let (_tdir, token) = governor_tests::botapi::token_file();
    let files = tempfile::tempdir_in("/tmp").unwrap();
    let target = files.path().join("bot.json");
    fs::write(&target, "{\"v\":1}\n").unwrap();
    let d = DaemonProc::start(&format!(
        "{}\n[protect]\nprotected = [\"{}\"]\napprove_via = \"telegram\"\ntelegram_approvers = [42]\napproval_timeout = \"5m\"\n",
        telegram_section(&bot.url(), &token),
        target.display()
    ));
    let writable = || fs::OpenOptions::new().append(true).open(&target).is_ok();
    assert!(!writable(), "a protected file must refuse writes");
    let (p, sock) = (
        target.to_str().unwrap(),
        d.socket.to_str().unwrap().to_string(),
    );

    // Someone else taps Approve first.
    bot.tap(7, true);
    let (code, out) = governor_tests::governor_on_tty(
        &[
            "approve", p, "--for", "2m", "--reason", "tg e2e", "--socket", &sock,
        ],
        "",
    );
    assert_eq!(code, 0, "approve: {out}\n{}", d.log());
    assert!(out.contains("Telegram"), "the CLI says it asked: {out}");
    let wait = Duration::from_secs(20);
    let answered = |needle: &str| {
        bot.requests().iter().any(|r| {
            r.path.ends_with("/answerCallbackQuery")
                && r.body["text"].as_str().unwrap_or("").contains(needle)
        })
    };
    assert!(
        wait_until(wait, || answered("not an authorised")),
        "{}",
        d.log()
    );
    let req = bot
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/sendMessage") && !r.body["reply_markup"].is_null())
        .expect("the approval request was sent with buttons");
    assert!(
        req.text().contains(p) && req.text().contains("tg e2e"),
        "{}",
        req.text()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(!writable(), "an unauthorised tap must not open the window");
    assert!(d.entries_of("protect.window_open").is_empty());

    // The approver taps Approve.
    bot.tap(42, true);
    assert!(
        wait_until(wait, writable),
        "the approver's tap opens the window: {}",
        d.log()
    );
    // The flag is lifted a moment before the entry is durable; wait for it.
    let opened = d.wait_entries_of("protect.window_open", 1, Duration::from_secs(20));
    assert!(answered("Approved"));
    assert_eq!(opened.len(), 1, "{opened:?}");
    assert_eq!(
        opened[0]["detail"]["via"].as_str(),
        Some("telegram:42:user42"),
        "{opened:?}"
    );
    // A write inside the window is logged as allowed.
    let mut f = fs::OpenOptions::new().append(true).open(&target).unwrap();
    std::io::Write::write_all(&mut f, b"{\"v\":2}\n").unwrap();
    drop(f);
    let allowed = || {
        d.entries_of("protect.attempt")
            .iter()
            .any(|e| e["detail"]["result"].as_str() == Some("allowed"))
    };
    assert!(
        wait_until(wait, allowed),
        "{:?}",
        d.entries_of("protect.attempt")
    );

    let (code, out, err) = governor(&["approve", "--end", p, "--socket", &sock]);
    assert_eq!(code, 0, "approve --end: {out}{err}");
    assert!(!writable(), "the flag is back after the window");
    assert_eq!(d.entries_of("protect.window_close").len(), 1);
}
