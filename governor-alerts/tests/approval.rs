//! Telegram approvals (`approve_via = "telegram"`): the request goes out with
//! Approve / Deny buttons and only an authorised user's tap, read back with
//! getUpdates, decides. Against a Bot API stand-in on 127.0.0.1 that
//! answers getUpdates with scripted callback queries.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor_alerts::approval::{request_approval, ApprovalOutcome, ApprovalRequest};
use governor_alerts::TelegramConfig;
use serde_json::{json, Value};

#[derive(Default)]
struct Bot {
    /// (method, body) of every request.
    calls: Vec<(String, Value)>,
    /// Callback taps to hand out once the request message was sent:
    /// (user id, approve?).
    taps: VecDeque<(i64, bool)>,
    next_update: i64,
}

fn serve(bot: Arc<Mutex<Bot>>) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { continue };
            let bot = bot.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(conn.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
                let mut len = 0;
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    if h.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                }
                let mut body = vec![0; len];
                r.read_exact(&mut body).unwrap();
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let method = path.rsplit('/').next().unwrap_or("").to_string();
                let result = {
                    let mut b = bot.lock().unwrap();
                    b.calls.push((method.clone(), body.clone()));
                    match method.as_str() {
                        "getUpdates" if body["offset"] == -1 => json!([]),
                        "getUpdates" => {
                            let sent = b
                                .calls
                                .iter()
                                .find(|(m, _)| m == "sendMessage")
                                .map(|(_, v)| v.clone());
                            match (sent, b.taps.pop_front()) {
                                (Some(msg), Some((user, approve))) => {
                                    let kb = &msg["reply_markup"]["inline_keyboard"][0];
                                    let data =
                                        kb[if approve { 0 } else { 1 }]["callback_data"].clone();
                                    b.next_update += 1;
                                    json!([{
                                        "update_id": 1000 + b.next_update,
                                        "callback_query": {
                                            "id": format!("cb{}", b.next_update),
                                            "from": {"id": user, "username": format!("user{user}")},
                                            "data": data,
                                        }
                                    }])
                                }
                                _ => json!([]),
                            }
                        }
                        _ => json!({"message_id": 1}),
                    }
                };
                if method == "getUpdates" && result == json!([]) {
                    // A short long-poll.
                    std::thread::sleep(Duration::from_millis(200));
                }
                let text = json!({"ok": true, "result": result}).to_string();
                let _ = write!(
                    conn,
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                    text.len()
                );
            });
        }
    });
    format!("http://{addr}")
}

fn config(url: &str) -> (tempfile::TempDir, governor_alerts::ValidatedTelegram) {
    let dir = tempfile::tempdir().unwrap();
    let tok = dir.path().join("telegram.token");
    std::fs::write(&tok, "123456:TEST-token_abc\n").unwrap();
    std::fs::set_permissions(&tok, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut c = TelegramConfig::new(&tok, "-1001234567890");
    c.api_url = url.to_string();
    (dir, c.validate().unwrap())
}

fn request(timeout: Duration) -> ApprovalRequest {
    ApprovalRequest {
        id: "r1".into(),
        text: "approve a write window on /srv/bot/config.json?".into(),
        approvers: vec![42],
        timeout,
    }
}

#[test]
fn only_an_authorised_tap_approves() {
    let bot = Arc::new(Mutex::new(Bot::default()));
    bot.lock().unwrap().taps.extend([(7, true), (42, true)]);
    let url = serve(bot.clone());
    let (_d, cfg) = config(&url);
    let out = request_approval(
        &cfg,
        &request(Duration::from_secs(20)),
        &AtomicBool::new(false),
    );
    assert_eq!(
        out,
        ApprovalOutcome::Approved {
            by: 42,
            name: "user42".into()
        }
    );
    let b = bot.lock().unwrap();
    let sent = b.calls.iter().find(|(m, _)| m == "sendMessage").unwrap();
    assert_eq!(sent.1["chat_id"], "-1001234567890");
    assert!(sent.1["text"].as_str().unwrap().contains("config.json"));
    let answers: Vec<&Value> = b
        .calls
        .iter()
        .filter(|(m, _)| m == "answerCallbackQuery")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(answers.len(), 2, "both taps are answered");
    assert!(answers[0]["text"]
        .as_str()
        .unwrap()
        .contains("not an authorised"));
    // The token never shows up in request bodies.
    assert!(!b
        .calls
        .iter()
        .any(|(_, v)| v.to_string().contains("TEST-token")));
}

#[test]
fn deny_and_timeout() {
    let bot = Arc::new(Mutex::new(Bot::default()));
    bot.lock().unwrap().taps.push_back((42, false));
    let url = serve(bot);
    let (_d, cfg) = config(&url);
    let out = request_approval(
        &cfg,
        &request(Duration::from_secs(20)),
        &AtomicBool::new(false),
    );
    assert_eq!(
        out,
        ApprovalOutcome::Denied {
            by: 42,
            name: "user42".into()
        }
    );

    let bot = Arc::new(Mutex::new(Bot::default()));
    let url = serve(bot);
    let (_d, cfg) = config(&url);
    let t = Instant::now();
    let out = request_approval(
        &cfg,
        &request(Duration::from_secs(2)),
        &AtomicBool::new(false),
    );
    assert_eq!(out, ApprovalOutcome::TimedOut);
    assert!(t.elapsed() < Duration::from_secs(10));
}
