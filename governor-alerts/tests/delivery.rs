//! Delivery against a real HTTP server on 127.0.0.1 standing in for the Bot
//! API: rate limit, retries, grouping, escaping, queue bounds, shutdown.

mod support;

use std::time::{Duration, Instant};

use governor_alerts::{Alert, AlertSink, Enqueued, Severity, Tuning, MAX_MESSAGE_CHARS};
use support::{assert_valid_telegram_html, fast, BotServer, Harness, Reply, TOKEN};

/// Scheduling noise on a loaded 2-core machine.
const TOLERANCE: Duration = Duration::from_millis(10);
const MINUTE: Duration = Duration::from_secs(60);

fn alert(kind: &str, title: &str) -> Alert {
    Alert::new(Severity::Warning, kind, title)
        .with_service("lily")
        .with_audit_head("7:0badc0de")
}

fn assert_gap(later: Instant, earlier: Instant, min: Duration) {
    let gap = later.duration_since(earlier);
    assert!(
        gap + TOLERANCE >= min,
        "requests only {gap:?} apart, want >= {min:?}"
    );
}

#[test]
fn real_rate_limit_order_token_path_and_body() {
    let server = BotServer::start(vec![]);
    let h = Harness::new(&server.url(), Tuning::default(), MINUTE, 16);
    for n in 0..3 {
        h.sender
            .send(alert(&format!("kind-{n}"), &format!("alert #{n}")));
    }
    let outcomes = h.outcomes(3, Duration::from_secs(10));
    assert!(outcomes.iter().all(|o| o.delivered && o.attempts == 1));
    let reqs = server.requests();
    assert_eq!(reqs.len(), 3, "each alert exactly once");
    for (n, r) in reqs.iter().enumerate() {
        assert_eq!(r.path, format!("/bot{TOKEN}/sendMessage"));
        assert_eq!(r.body["chat_id"], serde_json::json!(-1001234567890i64));
        assert_eq!(r.body["parse_mode"], "HTML");
        assert_eq!(r.body["disable_web_page_preview"], true);
        assert!(
            r.text()
                .starts_with(&format!("<b>[warning] alert #{n}</b>")),
            "out of order or malformed: {}",
            r.text()
        );
        assert!(r.text().ends_with("\naudit 7:0badc0de"));
    }
    for w in reqs.windows(2) {
        assert_gap(w[1].at, w[0].at, Duration::from_secs(1));
    }
    assert_eq!(h.sender.stats().sent, 3);
}

#[test]
fn retry_after_from_429_is_honoured() {
    let server = BotServer::start(vec![Reply::TooMany(2)]);
    let h = Harness::new(&server.url(), Tuning::default(), MINUTE, 16);
    h.sender.send(alert("a", "first"));
    h.sender.send(alert("b", "second"));
    let outcomes = h.outcomes(2, Duration::from_secs(10));
    assert!(
        outcomes[0].delivered && outcomes[0].attempts == 2,
        "{outcomes:?}"
    );
    assert!(outcomes[1].delivered && outcomes[1].attempts == 1);
    let reqs = server.requests();
    assert_eq!(reqs.len(), 3);
    assert_eq!(reqs[0].reply, Reply::TooMany(2));
    assert_eq!(
        reqs[0].text(),
        reqs[1].text(),
        "the retry is the same message"
    );
    assert!(reqs[1].text().contains("first") && reqs[2].text().contains("second"));
    assert_gap(reqs[1].at, reqs[0].at, Duration::from_secs(2));
    assert_gap(reqs[2].at, reqs[1].at, Duration::from_secs(1));
}

#[test]
fn server_errors_and_hangups_back_off_then_deliver() {
    let server = BotServer::start(vec![Reply::ServerError, Reply::Hangup, Reply::ServerError]);
    let h = Harness::new(&server.url(), fast(), MINUTE, 16);
    h.sender.send(alert("a", "persistent"));
    let o = h.outcomes(1, Duration::from_secs(10)).remove(0);
    assert!(o.delivered, "{o:?}");
    assert_eq!(o.attempts, 4);
    let reqs = server.requests();
    assert_eq!(reqs.len(), 4);
    // Backoff 100ms, 200ms, 400ms (capped).
    assert_gap(reqs[1].at, reqs[0].at, Duration::from_millis(100));
    assert_gap(reqs[2].at, reqs[1].at, Duration::from_millis(200));
    assert_gap(reqs[3].at, reqs[2].at, Duration::from_millis(400));
}

#[test]
fn slow_response_is_waited_for_not_duplicated() {
    let server = BotServer::start(vec![Reply::Slow(Duration::from_secs(3))]);
    let h = Harness::new(&server.url(), Tuning::default(), MINUTE, 16);
    let t0 = Instant::now();
    h.sender.send(alert("a", "slow one"));
    h.sender.send(alert("b", "next one"));
    assert!(t0.elapsed() < Duration::from_millis(100), "send blocked");
    let outcomes = h.outcomes(2, Duration::from_secs(10));
    assert!(outcomes.iter().all(|o| o.delivered && o.attempts == 1));
    let reqs = server.requests();
    assert_eq!(reqs.len(), 2, "slow reply must not cause a duplicate");
    // The second waits for the first to finish, then the 1 s spacing.
    assert_gap(reqs[1].at, reqs[0].at, Duration::from_secs(4));
}

#[test]
fn client_error_is_final_and_does_not_block_the_next() {
    let server = BotServer::start(vec![Reply::BadRequest]);
    let h = Harness::new(&server.url(), fast(), MINUTE, 16);
    h.sender.send(alert("a", "rejected"));
    h.sender.send(alert("b", "accepted"));
    let o = h.outcomes(2, Duration::from_secs(10));
    assert!(!o[0].delivered && o[0].attempts == 1);
    assert!(
        o[0].error.as_deref().unwrap().contains("chat not found"),
        "{o:?}"
    );
    assert!(o[1].delivered);
    let s = h.sender.stats();
    assert_eq!((s.sent, s.failed), (1, 1));
}

#[test]
fn unreachable_api_gives_up_after_max_attempts_without_leaking_token() {
    // A port nobody listens on: connection refused.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let h = Harness::new(&format!("http://127.0.0.1:{port}"), fast(), MINUTE, 16);
    h.sender.send(alert("a", "lost"));
    let o = h.outcomes(1, Duration::from_secs(10)).remove(0);
    assert!(!o.delivered);
    assert_eq!(o.attempts, 4);
    let err = o.error.unwrap();
    assert!(err.contains("gave up after 4 attempts"), "{err}");
    assert!(!err.contains(TOKEN) && !err.contains("TEST-token"), "{err}");
    assert!(!format!("{:?}", h.sender).contains(TOKEN));
    assert_eq!(h.sender.stats().failed, 1);
}

#[test]
fn burst_of_100_becomes_one_message_plus_follow_ups() {
    let server = BotServer::start(vec![]);
    let h = Harness::new(&server.url(), fast(), Duration::from_secs(1), 16);
    let t0 = Instant::now();
    for n in 0..100 {
        h.sender.send(
            Alert::new(Severity::Critical, "crash loop", format!("restart #{n}"))
                .with_service("lily")
                .with_body("exit 1 <after 0.4s>"),
        );
    }
    assert!(t0.elapsed() < Duration::from_millis(100), "send blocked");
    let first = server.wait_for(1, Duration::from_secs(2));
    assert!(
        first[0].at.duration_since(t0) < Duration::from_millis(500),
        "first alert must go out immediately"
    );
    let mut outcomes = Vec::new();
    while outcomes
        .iter()
        .map(|o: &governor_alerts::DeliveryOutcome| o.grouped_count)
        .sum::<u64>()
        < 100
    {
        outcomes.extend(h.outcomes(1, Duration::from_secs(5)));
    }
    let reqs = server.requests();
    assert!(reqs.len() <= 4, "{} messages for one burst", reqs.len());
    assert!(reqs[0].text().contains("restart #0"));
    // Counts in the texts add up to the burst.
    let mut total = 1;
    for r in &reqs[1..] {
        let t = r.text();
        let n: u64 = t
            .split(" more in ")
            .next()
            .and_then(|h| h.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no count in follow-up {t:?}"));
        assert!(t.starts_with("<b>[critical] crash loop: lily — "), "{t}");
        assert!(
            t.contains("(last: restart #99: exit 1 &lt;after 0.4s&gt;)"),
            "{t}"
        );
        total += n;
    }
    assert_eq!(total, 100);
    assert!(outcomes.iter().all(|o| o.delivered));
    assert_eq!(h.sender.stats().grouped, 99);
}

#[test]
fn html_is_escaped_and_cut_to_4096() {
    let server = BotServer::start(vec![]);
    let h = Harness::new(&server.url(), fast(), MINUTE, 16);
    let body: String = "<script>&x\"é ".repeat(1000); // 13,000 chars
    h.sender.send(
        Alert::new(
            Severity::Critical,
            "tamper",
            "chattr -i on <b>/etc/x</b> & more",
        )
        .with_service("svc<1>")
        .with_body(body)
        .with_audit_head("1234:ffee0011"),
    );
    let o = h.outcomes(1, Duration::from_secs(5)).remove(0);
    assert!(o.delivered, "{o:?}");
    let text = server.requests()[0].text().to_owned();
    assert!(text.chars().count() <= MAX_MESSAGE_CHARS);
    assert!(text.encode_utf16().count() <= MAX_MESSAGE_CHARS);
    assert!(text.chars().count() > 4000, "cut far too much");
    assert!(
        text.starts_with("<b>[critical] chattr -i on &lt;b&gt;/etc/x&lt;/b&gt; &amp; more</b>\n")
    );
    assert!(
        text.contains("…\ntamper: svc&lt;1&gt;\n"),
        "cut marker and meta line"
    );
    assert!(text.ends_with("\naudit 1234:ffee0011"));
    assert_valid_telegram_html(&text);
}

#[test]
fn full_queue_drops_and_counts_without_blocking() {
    let server = BotServer::start(vec![Reply::Slow(Duration::from_millis(1500))]);
    let h = Harness::new(&server.url(), fast(), MINUTE, 2);
    h.sender.send(alert("k-first", "in flight"));
    server.wait_for(1, Duration::from_secs(2));
    let t0 = Instant::now();
    let results: Vec<Enqueued> = (0..50)
        .map(|n| h.sender.enqueue(alert(&format!("k{n}"), "x")))
        .collect();
    assert!(
        t0.elapsed() < Duration::from_millis(50),
        "enqueue blocked: {:?}",
        t0.elapsed()
    );
    assert_eq!(
        results.iter().filter(|r| **r == Enqueued::Queued).count(),
        2
    );
    let s = h.sender.stats();
    assert_eq!((s.dropped, s.queued), (48, 3));
    let report = h.sender.shutdown(Duration::from_secs(10));
    assert!(report.complete);
    assert_eq!(report.stats.sent, 3);
    let reqs = server.requests();
    assert_eq!(reqs.len(), 3);
    // The chat learns about the drops in the next message.
    assert!(
        reqs[1].text().contains("⚠ 48 alerts dropped"),
        "{}",
        reqs[1].text()
    );
}

#[test]
fn shutdown_flushes_queue_and_open_groups() {
    let server = BotServer::start(vec![]);
    let h = Harness::new(&server.url(), fast(), MINUTE, 16);
    for _ in 0..6 {
        h.sender.send(alert("crash loop", "restart"));
    }
    h.sender.send(alert("memory", "over budget"));
    let report = h.sender.shutdown(Duration::from_secs(5));
    assert!(report.complete, "{report:?}");
    let o = h.outcomes(3, Duration::from_secs(1));
    assert_eq!(
        o.iter()
            .map(|o| (o.kind.as_str(), o.grouped_count))
            .collect::<Vec<_>>(),
        [("crash loop", 1), ("memory", 1), ("crash loop", 5)]
    );
    assert!(server.requests()[2]
        .text()
        .contains("crash loop: lily — 5 more in 60s"));
    // After shutdown, alerts are counted as dropped, not queued.
    assert_eq!(h.sender.enqueue(alert("late", "x")), Enqueued::Dropped);
}

#[test]
fn shutdown_deadline_is_kept_and_abandoned_messages_reported() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tuning = Tuning {
        backoff_base: Duration::from_secs(5),
        ..fast()
    };
    let h = Harness::new(&format!("http://127.0.0.1:{port}"), tuning, MINUTE, 16);
    h.sender.send(alert("a", "one"));
    h.sender.send(alert("b", "two"));
    std::thread::sleep(Duration::from_millis(100));
    let t0 = Instant::now();
    let report = h.sender.shutdown(Duration::from_millis(300));
    assert!(
        t0.elapsed() < Duration::from_millis(800),
        "{:?}",
        t0.elapsed()
    );
    assert!(!report.complete);
    let o = h.outcomes(2, Duration::from_secs(1));
    assert!(o.iter().all(|o| !o.delivered), "{o:?}");
    assert!(
        o[0].error.as_deref().unwrap().contains("shut down"),
        "{o:?}"
    );
    assert_eq!(report.stats.failed, 2);
}

#[test]
fn alerts_below_min_severity_are_not_sent() {
    let server = BotServer::start(vec![]);
    let (_dir, path) = support::token_file();
    let mut cfg = governor_alerts::TelegramConfig::new(path, "@governor_alerts");
    cfg.api_url = server.url();
    let (tx, rx) = std::sync::mpsc::channel();
    let sender =
        governor_alerts::TelegramSender::with_tuning(cfg.validate().unwrap(), fast(), tx).unwrap();
    assert_eq!(
        sender.enqueue(Alert::new(Severity::Info, "drift", "minor")),
        Enqueued::BelowMinSeverity
    );
    assert_eq!(
        sender.enqueue(Alert::new(Severity::Warning, "drift", "real")),
        Enqueued::Queued
    );
    assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap().delivered);
    let reqs = server.requests();
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].body["chat_id"], "@governor_alerts");
    assert_eq!(sender.stats().filtered, 1);
}

#[test]
fn dropping_the_sender_does_not_block() {
    let server = BotServer::start(vec![Reply::Slow(Duration::from_secs(2))]);
    let h = Harness::new(&server.url(), fast(), MINUTE, 16);
    h.sender.send(alert("a", "x"));
    server.wait_for(1, Duration::from_secs(2));
    let t0 = Instant::now();
    drop(h);
    assert!(t0.elapsed() < Duration::from_millis(100));
}
