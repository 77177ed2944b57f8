//! A Bot API stand-in on 127.0.0.1: minimal HTTP/1.1, one request per
//! connection, scripted replies, and a record of every request with its
//! arrival time.

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use governor_alerts::{DeliveryOutcome, Severity, TelegramConfig, TelegramSender, Tuning};

pub const TOKEN: &str = "123456:TEST-token_abc";
pub const CHAT: &str = "-1001234567890";

/// How the stand-in answers one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// 200 `{"ok":true,"result":{...}}`
    Ok,
    /// 429 with `parameters.retry_after` = n seconds.
    TooMany(u64),
    /// 500.
    ServerError,
    /// 400 "Bad Request: chat not found".
    BadRequest,
    /// Waits, then 200.
    Slow(Duration),
    /// Reads the request, then closes without answering.
    Hangup,
}

#[derive(Debug, Clone)]
pub struct Recorded {
    pub path: String,
    pub body: serde_json::Value,
    pub at: Instant,
    pub reply: Reply,
}

impl Recorded {
    pub fn text(&self) -> &str {
        self.body["text"].as_str().unwrap_or_default()
    }
}

pub struct BotServer {
    addr: SocketAddr,
    records: Arc<Mutex<Vec<Recorded>>>,
    mode: Arc<Mutex<Reply>>,
    taps: Arc<Mutex<VecDeque<(i64, bool)>>>,
    stop: Arc<AtomicBool>,
}

impl BotServer {
    /// Starts the server; replies are taken from `script` in order, then
    /// from the mode (200 until [`set_mode`](Self::set_mode)).
    pub fn start(script: Vec<Reply>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind stand-in");
        let addr = listener.local_addr().expect("local addr");
        let records = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let taps = Arc::new(Mutex::new(VecDeque::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let mode = Arc::new(Mutex::new(Reply::Ok));
        let (r, s, t, st, m) = (
            records.clone(),
            script.clone(),
            taps.clone(),
            stop.clone(),
            mode.clone(),
        );
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (r, s, t, m) = (r.clone(), s.clone(), t.clone(), m.clone());
                std::thread::spawn(move || handle(conn, &r, &s, &t, &m));
            }
        });
        BotServer {
            addr,
            records,
            mode,
            taps,
            stop,
        }
    }

    /// Queues a tap on the latest message with buttons: `user` presses
    /// Approve (`true`) or Deny. The next `getUpdates` (other than the
    /// `offset = -1` flush) hands it out as a `callback_query`.
    pub fn tap(&self, user: i64, approve: bool) {
        self.taps.lock().unwrap().push_back((user, approve));
    }

    /// How every request after the script is answered from now on (a
    /// Bot API that is down, slow or rate-limiting for a while).
    pub fn set_mode(&self, reply: Reply) {
        *self.mode.lock().unwrap() = reply;
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.records.lock().unwrap().clone()
    }

    /// Waits until at least `n` requests arrived (or `timeout`).
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Recorded> {
        let end = Instant::now() + timeout;
        loop {
            let r = self.requests();
            if r.len() >= n || Instant::now() >= end {
                return r;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for BotServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr); // unblock accept
    }
}

fn handle(
    conn: TcpStream,
    records: &Mutex<Vec<Recorded>>,
    script: &Mutex<VecDeque<Reply>>,
    taps: &Mutex<VecDeque<(i64, bool)>>,
    mode: &Mutex<Reply>,
) {
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok();
    let mut reader = BufReader::new(conn.try_clone().expect("clone stream"));
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return; // the Drop wake-up connection, or a client that gave up
    }
    let path = request_line
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                content_length = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; content_length];
    if reader.read_exact(&mut body).is_err() {
        return;
    }
    let at = Instant::now();
    let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null);
    let updates = path.ends_with("/getUpdates");
    // getUpdates is answered from the taps, not the script.
    let reply = if updates {
        Reply::Ok
    } else {
        let next = script.lock().unwrap().pop_front();
        next.unwrap_or_else(|| mode.lock().unwrap().clone())
    };
    let result = {
        let mut recs = records.lock().unwrap();
        recs.push(Recorded {
            path: path.clone(),
            body: body.clone(),
            at,
            reply: reply.clone(),
        });
        if updates && body["offset"] != -1 {
            let buttons = recs
                .iter()
                .rev()
                .find(|r| r.path.ends_with("/sendMessage") && !r.body["reply_markup"].is_null())
                .map(|r| r.body["reply_markup"]["inline_keyboard"][0].clone());
            match buttons {
                Some(kb) => taps
                    .lock()
                    .unwrap()
                    .pop_front()
                    .map(|(user, approve)| (kb, user, approve, recs.len())),
                None => None,
            }
        } else {
            None
        }
    };
    if updates {
        let list = match result {
            Some((kb, user, approve, n)) => serde_json::json!([{
                "update_id": 5000 + n,
                "callback_query": {
                    "id": format!("cb{n}"),
                    "from": {"id": user, "is_bot": false, "first_name": "T", "username": format!("user{user}")},
                    "data": kb[if approve { 0 } else { 1 }]["callback_data"].clone(),
                }
            }]),
            None => {
                if body["offset"] != -1 {
                    // A short long-poll.
                    std::thread::sleep(Duration::from_millis(200));
                }
                serde_json::json!([])
            }
        };
        let json = serde_json::json!({"ok": true, "result": list}).to_string();
        respond(conn, "200 OK", &json);
        return;
    }
    let (status, json) = match reply {
        Reply::Ok => ("200 OK", ok_json()),
        Reply::Slow(d) => {
            std::thread::sleep(d);
            ("200 OK", ok_json())
        }
        Reply::TooMany(n) => (
            "429 Too Many Requests",
            format!(
                r#"{{"ok":false,"error_code":429,"description":"Too Many Requests: retry after {n}","parameters":{{"retry_after":{n}}}}}"#
            ),
        ),
        Reply::ServerError => (
            "500 Internal Server Error",
            r#"{"ok":false,"error_code":500,"description":"Internal Server Error"}"#.to_owned(),
        ),
        Reply::BadRequest => (
            "400 Bad Request",
            r#"{"ok":false,"error_code":400,"description":"Bad Request: chat not found"}"#
                .to_owned(),
        ),
        Reply::Hangup => return,
    };
    respond(conn, status, &json);
}

/// Writes one JSON response and lets the connection close.
fn respond(mut conn: TcpStream, status: &str, json: &str) {
    let _ = write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
        json.len()
    );
    let _ = conn.flush();
}

fn ok_json() -> String {
    r#"{"ok":true,"result":{"message_id":1,"chat":{"id":-1001234567890,"type":"channel"},"date":1700000000,"text":"ok"}}"#.to_owned()
}

/// Writes the token to a `chmod 600` file in a fresh temp dir.
pub fn token_file() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("telegram.token");
    std::fs::write(&path, format!("{TOKEN}\n")).expect("write token");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    (dir, path)
}

/// Timings short enough for tests, except where a test means the real ones.
pub fn fast() -> Tuning {
    Tuning {
        min_interval: Duration::from_millis(20),
        backoff_base: Duration::from_millis(100),
        backoff_max: Duration::from_millis(400),
        max_attempts: 4,
        max_age: Duration::from_secs(30),
        request_timeout: Duration::from_secs(10),
        connect_timeout: Duration::from_secs(2),
    }
}

pub struct Harness {
    pub sender: TelegramSender,
    pub outcomes: mpsc::Receiver<DeliveryOutcome>,
    _dir: tempfile::TempDir,
}

impl Harness {
    pub fn new(api_url: &str, tuning: Tuning, window: Duration, capacity: usize) -> Self {
        let (dir, path) = token_file();
        let mut cfg = TelegramConfig::new(path, CHAT);
        cfg.api_url = api_url.to_owned();
        cfg.min_severity = Severity::Info;
        cfg.group_window = window;
        cfg.queue_capacity = capacity;
        let valid = cfg.validate().expect("valid config");
        let (tx, rx) = mpsc::channel();
        let sender = TelegramSender::with_tuning(valid, tuning, tx).expect("start sender");
        Harness {
            sender,
            outcomes: rx,
            _dir: dir,
        }
    }

    /// Collects `n` outcomes, panicking after `timeout`.
    pub fn outcomes(&self, n: usize, timeout: Duration) -> Vec<DeliveryOutcome> {
        let end = Instant::now() + timeout;
        let mut out = Vec::new();
        while out.len() < n {
            let left = end.saturating_duration_since(Instant::now());
            match self.outcomes.recv_timeout(left) {
                Ok(o) => out.push(o),
                Err(_) => panic!(
                    "only {} of {n} outcomes after {timeout:?}: {out:#?}",
                    out.len()
                ),
            }
        }
        out
    }
}

/// Checks that every `&` starts an entity we produce and that `<`/`>` only
/// appear in our `<b>` tags: what Telegram's HTML parser needs.
pub fn assert_valid_telegram_html(s: &str) {
    for (i, _) in s.match_indices('&') {
        let rest = &s[i..];
        assert!(
            ["&amp;", "&lt;", "&gt;", "&quot;"]
                .iter()
                .any(|e| rest.starts_with(e)),
            "broken entity at byte {i}: {:?}",
            rest.chars().take(8).collect::<String>()
        );
    }
    let stripped = s.replacen("<b>", "", 1).replacen("</b>", "", 1);
    assert!(
        !stripped.contains('<') && !stripped.contains('>'),
        "raw markup in {s:?}"
    );
}
