//! The exposition contract (names, labels, values, escaping), promtool's
//! verdict on it, and the HTTP behaviour of `serve`.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::Duration;

use governor_metrics::{check_listen, render, serve, CONTENT_TYPE, METRIC_NAMES};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const NASTY: &str = "we\"ird\\svc\nname";

fn sample() -> Value {
    json!({
        "services": [
            {"name": "lily", "configured": true, "critical": false,
             "state": "crash-loop", "restarts_total": 3, "restarts_in_window": 2,
             "memory_state": "over-ceiling", "rss_bytes": 262_144_000_u64,
             "ceiling_bytes": 209_715_200_u64, "baseline_bytes": 104_857_600_u64,
             "killswitch_held": true, "drift": ["restart", "memory"]},
            {"name": "rose", "configured": true, "critical": true,
             "state": "stable", "restarts_total": 0, "restarts_in_window": 0,
             "memory_state": "ok", "rss_bytes": 1000, "ceiling_bytes": 2000,
             "baseline_bytes": 900, "killswitch_held": false, "drift": []},
            // Same name again: ignored (duplicate series break a scrape).
            {"name": "rose", "restarts_total": 99},
            // Everything optional missing or null; an unknown memory state.
            {"name": NASTY, "configured": false, "critical": null,
             "state": "down", "memory_state": "levitating", "rss_bytes": null,
             "drift": null},
            // No name: no label to hang samples on.
            {"state": "stable", "restarts_total": 7},
            {"name": "", "restarts_total": 8},
            // Wrong types and a negative counter.
            {"name": "odd", "restarts_total": -1, "restarts_in_window": "2",
             "critical": 1, "state": 3, "drift": "config"}
        ],
        "memory": {"available_bytes": 1_073_741_824_u64, "floor_bytes": 268_435_456_u64,
                   "psi_some_avg10": 0.5, "flush_active": false},
        "rings": [
            {"ring": "lifecycle", "events": 10, "lost": 0},
            {"ring": "attempts", "events": 3, "lost": 2},
            {"ring": "memory", "events": 1, "lost": null},
            {"events": 5}
        ],
        "audit": {"entries_total": 12, "head_seq": 11, "held": 5, "dropped_total": 13},
        "alerts": {"sent": 1, "dropped": 0, "queued": 4, "failed": 2},
        "protect_attempts": [
            {"tier": "untouchable", "result": "refused", "count": 4},
            {"tier": "protected", "result": "allowed", "count": 1},
            {"tier": "protected", "count": 9}
        ],
        "kill_switch": {"engaged": true, "held_services": 1, "blocked_starts_total": 6},
        "bounds": {"unconfigured_services": 5, "max_unconfigured_services": 1024,
                   "unconfigured_evicted": 0, "processes": 120}
    })
}

/// The sample lines (not comments) of an exposition.
fn samples(text: &str) -> Vec<&str> {
    text.lines().filter(|l| !l.starts_with('#')).collect()
}

fn has(text: &str, line: &str) -> bool {
    text.lines().any(|l| l == line)
}

#[test]
fn exact_values() {
    let text = render(&sample());
    for line in [
        r#"governor_service_restarts_total{service="lily"} 3"#,
        r#"governor_service_restarts_in_window{service="lily"} 2"#,
        r#"governor_service_memory_rss_bytes{service="lily"} 262144000"#,
        r#"governor_service_memory_ceiling_bytes{service="lily"} 209715200"#,
        r#"governor_service_critical{service="rose"} 1"#,
        r#"governor_service_configured{service="lily"} 1"#,
        r#"governor_service_killswitch_held{service="lily"} 1"#,
        "governor_memory_available_bytes 1073741824",
        "governor_memory_psi_some_avg10 0.5",
        "governor_memory_flush_active 0",
        r#"governor_events_total{ring="attempts"} 3"#,
        r#"governor_events_lost_total{ring="attempts"} 2"#,
        "governor_audit_entries_total 12",
        "governor_audit_head_seq 11",
        "governor_audit_held_entries 5",
        "governor_audit_dropped_total 13",
        "governor_alerts_queued 4",
        "governor_alerts_failed_total 2",
        r#"governor_protect_attempts_total{tier="untouchable",result="refused"} 4"#,
        "governor_killswitch_engaged 1",
        "governor_killswitch_blocked_starts_total 6",
        "governor_unconfigured_services_max 1024",
        "governor_processes 120",
    ] {
        assert!(has(&text, line), "missing {line:?} in\n{text}");
    }
    // HELP and TYPE for each family, counters typed as such.
    assert!(has(&text, "# TYPE governor_service_restarts_total counter"));
    assert!(has(&text, "# TYPE governor_service_state gauge"));
    assert!(text.contains("# HELP governor_memory_psi_some_avg10 Host memory pressure"));
}

#[test]
fn one_hot_states_and_drift() {
    let text = render(&sample());
    for (state, v) in [
        ("stable", 0),
        ("restarting", 0),
        ("crash-loop", 1),
        ("down", 0),
    ] {
        let line = format!(r#"governor_service_state{{service="lily",state="{state}"}} {v}"#);
        assert!(has(&text, &line), "missing {line:?}");
    }
    for (state, v) in [
        ("ok", 0),
        ("drift", 0),
        ("over-ceiling", 1),
        ("memory-loop", 0),
    ] {
        let line =
            format!(r#"governor_service_memory_state{{service="lily",state="{state}"}} {v}"#);
        assert!(has(&text, &line), "missing {line:?}");
    }
    for (kind, v) in [("uptime", 0), ("restart", 1), ("memory", 1), ("config", 0)] {
        let line = format!(r#"governor_service_drift{{service="lily",kind="{kind}"}} {v}"#);
        assert!(has(&text, &line), "missing {line:?}");
    }
    // Exactly one hot state per service.
    let hot = |service: &str| {
        samples(&text)
            .into_iter()
            .filter(|l| l.starts_with(&format!("governor_service_state{{service=\"{service}\",")))
            .map(|l| l.ends_with(" 1") as u32)
            .collect::<Vec<_>>()
    };
    assert_eq!(hot("lily").iter().sum::<u32>(), 1);
    assert_eq!(hot("lily").len(), 4);
    assert_eq!(hot("rose").iter().sum::<u32>(), 1);
    // Empty drift list: all four kinds at 0.
    assert!(has(
        &text,
        r#"governor_service_drift{service="rose",kind="config"} 0"#
    ));
}

#[test]
fn label_values_are_escaped() {
    let text = render(&sample());
    let escaped = r#"we\"ird\\svc\nname"#;
    for line in [
        format!(r#"governor_service_state{{service="{escaped}",state="down"}} 1"#),
        format!(r#"governor_service_configured{{service="{escaped}"}} 0"#),
    ] {
        assert!(has(&text, &line), "missing {line:?} in\n{text}");
    }
    // No raw newline split a sample line.
    assert!(!text.lines().any(|l| l.starts_with("name\"")));
}

#[test]
fn missing_null_and_mistyped_fields_are_skipped() {
    let text = render(&sample());
    let nasty = r#"service="we\"ird\\svc\nname""#;
    // null / missing / unknown: no sample at all.
    for absent in [
        format!("governor_service_critical{{{nasty}}}"),
        format!("governor_service_memory_rss_bytes{{{nasty}}}"),
        format!("governor_service_restarts_total{{{nasty}}}"),
        format!("governor_service_memory_state{{{nasty},"),
        format!("governor_service_drift{{{nasty},"),
        r#"governor_events_lost_total{ring="memory"}"#.to_owned(),
        r#"{service="odd"}"#.to_owned(),
        r#"service="odd","#.to_owned(),
        r#"{service=""}"#.to_owned(),
        r#"result="" "#.to_owned(),
    ] {
        assert!(!text.contains(&absent), "unexpected {absent:?} in\n{text}");
    }
    // The first `rose` wins, the repeat is ignored.
    assert!(has(
        &text,
        r#"governor_service_restarts_total{service="rose"} 0"#
    ));
    assert!(!text.contains(r#"{service="rose"} 99"#));
    // Nameless entries contribute nothing.
    assert!(!text.contains(" 7\n") && !text.contains(" 8\n"));
    // A ring without a name and an attempt without a result are skipped.
    assert_eq!(
        samples(&text)
            .iter()
            .filter(|l| l.starts_with("governor_events_total"))
            .count(),
        3
    );
    assert_eq!(
        samples(&text)
            .iter()
            .filter(|l| l.starts_with("governor_protect_attempts_total"))
            .count(),
        2
    );
}

#[test]
fn empty_and_partial_snapshots() {
    for snapshot in [
        json!({}),
        Value::Null,
        json!([]),
        json!("nope"),
        json!({"services": null, "memory": null, "rings": {}, "audit": 3,
               "alerts": [], "protect_attempts": "x", "kill_switch": null, "bounds": null}),
        json!({"services": [null, 1, "s", [], {}]}),
    ] {
        assert_eq!(render(&snapshot), "", "for {snapshot}");
    }
    // A partial snapshot: only what is there, and no empty families.
    let text = render(&json!({"memory": {"available_bytes": 5}}));
    assert_eq!(
        text,
        "# HELP governor_memory_available_bytes Host MemAvailable, from /proc/meminfo (bytes).\n\
         # TYPE governor_memory_available_bytes gauge\n\
         governor_memory_available_bytes 5\n"
    );
}

#[test]
fn every_family_is_a_documented_name() {
    let text = render(&sample());
    let mut families: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    families.sort_unstable();
    let mut names = METRIC_NAMES.to_vec();
    names.sort_unstable();
    // The sample fills every family.
    assert_eq!(families, names);
    for line in samples(&text) {
        let name = line.split(['{', ' ']).next().unwrap_or_default();
        assert!(METRIC_NAMES.contains(&name), "undocumented {name}");
    }
}

fn promtool_check(text: &str) -> (bool, String) {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => panic!(
            "cannot run `promtool` ({e}): it is needed to validate the exposition; \
             install Debian's `prometheus` package (`apt-get install prometheus`)"
        ),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), report)
}

#[test]
fn promtool_accepts_the_exposition() {
    let text = render(&sample());
    let (ok, report) = promtool_check(&text);
    assert!(ok, "promtool check metrics failed:\n{report}\non:\n{text}");
    // promtool's linter only warns (exit 0) on style problems; we want none.
    assert!(report.trim().is_empty(), "promtool complained:\n{report}");

    let (ok, report) = promtool_check(&render(&json!({})));
    assert!(ok, "promtool on the empty exposition:\n{report}");
}

#[test]
fn promtool_is_not_fooled() {
    // The check above would be worthless if promtool accepted anything.
    let (ok, _) = promtool_check("governor_x{service=\"a\nb\"} 1\n");
    assert!(!ok, "promtool accepted an unescaped newline");
}

#[test]
fn listen_addresses() {
    for ok in ["127.0.0.1:9464", "[::1]:9464", "127.0.0.53:9464"] {
        let addr: SocketAddr = ok.parse().expect("addr");
        assert_eq!(check_listen(&addr), Ok(()), "{ok}");
    }
    for refused in [
        "0.0.0.0:9464",
        "10.0.0.1:9464",
        "[::]:9464",
        "[::ffff:10.0.0.1]:9464",
    ] {
        let addr: SocketAddr = refused.parse().expect("addr");
        let err = check_listen(&addr).expect_err(refused);
        assert!(err.contains(refused), "{err}");
        assert!(err.contains("loopback"), "{err}");
        assert!(err.contains("127.0.0.1:9464"), "{err}");
    }
}

/// One HTTP/1.1 exchange over a raw socket: (status, headers, body).
async fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        stream.read_to_string(&mut response),
    )
    .await
    .expect("response in time")
    .expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("head/body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (status, head.to_ascii_lowercase(), body.to_owned())
}

async fn start<F, Fut>(fetch: F) -> (SocketAddr, tokio::task::JoinHandle<anyhow::Result<()>>)
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<Value, String>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    (addr, tokio::spawn(serve(listener, fetch)))
}

#[tokio::test]
async fn serves_metrics_404_405() {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = calls.clone();
    let (addr, server) = start(move || {
        let n = counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move { Ok(json!({"audit": {"head_seq": n}})) }
    })
    .await;

    let (status, head, body) = http(addr, "GET", "/metrics").await;
    assert_eq!(status, 200, "{head}");
    assert!(
        head.contains(&format!("content-type: {CONTENT_TYPE}")),
        "{head}"
    );
    assert!(has(&body, "governor_audit_head_seq 0"), "{body}");
    // A fresh snapshot per scrape.
    let (_, _, body) = http(addr, "GET", "/metrics?x=1").await;
    assert!(has(&body, "governor_audit_head_seq 1"), "{body}");

    let (status, _, body) = http(addr, "GET", "/other").await;
    assert_eq!(status, 404);
    assert!(body.contains("/metrics"), "{body}");
    let (status, head, _) = http(addr, "POST", "/metrics").await;
    assert_eq!(status, 405);
    assert!(head.contains("allow: get, head"), "{head}");
    let (status, head, body) = http(addr, "HEAD", "/metrics").await;
    assert_eq!(status, 200);
    assert!(head.contains("content-length:"), "{head}");
    assert!(body.is_empty());

    server.abort();
    assert!(server.await.expect_err("aborted").is_cancelled());
    // The listener went with the task.
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn fetch_error_is_503_with_the_message() {
    let (addr, server) =
        start(|| async { Err("daemon event loop is not answering".to_owned()) }).await;
    let (status, _, body) = http(addr, "GET", "/metrics").await;
    assert_eq!(status, 503);
    assert_eq!(body, "daemon event loop is not answering\n");
    server.abort();
}

#[tokio::test]
async fn a_silent_client_does_not_block_others() {
    let (addr, server) = start(|| async { Ok(json!({"bounds": {"processes": 3}})) }).await;
    // Connected, half a request, then nothing.
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    silent.write_all(b"GET /metr").await.expect("send");
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(addr).await.expect("connect"));
    }
    let (status, _, body) =
        tokio::time::timeout(Duration::from_secs(5), http(addr, "GET", "/metrics"))
            .await
            .expect("served while another client stalls");
    assert_eq!(status, 200);
    assert!(has(&body, "governor_processes 3"));
    server.abort();
}

#[tokio::test]
async fn refuses_a_non_loopback_listener() {
    let listener = TcpListener::bind("0.0.0.0:0").await.expect("bind");
    let err = serve(listener, || async { Ok(json!({})) })
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("loopback"), "{err}");
}
