//! Human approval through Telegram: the bot posts a request with Approve /
//! Deny buttons, and the answer is the `callback_query` of an authorised
//! user's tap, read with `getUpdates`. A process on the host that can fake a
//! terminal still cannot tap a button in someone's Telegram.
//!
//! Blocking (ureq), meant for a dedicated thread; `cancel` stops the wait.

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::config::ValidatedTelegram;

/// One approval request.
#[derive(Debug, Clone)]
pub struct ApprovalRequest {
    /// Unique per request; carried in the buttons' callback data.
    pub id: String,
    /// The message shown above the buttons (plain text).
    pub text: String,
    /// Telegram user ids whose tap counts.
    pub approvers: Vec<i64>,
    /// How long to wait for a tap.
    pub timeout: Duration,
}

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApprovalOutcome {
    Approved {
        by: i64,
        name: String,
    },
    Denied {
        by: i64,
        name: String,
    },
    TimedOut,
    Cancelled,
    /// The request could not be posted or the updates read (final error).
    Failed(String),
}

const MAX_BODY: u64 = 1 << 20;

struct Api<'a> {
    agent: ureq::Agent,
    cfg: &'a ValidatedTelegram,
}

impl Api<'_> {
    fn call(&self, method: &str, body: &Value, timeout: Duration) -> Result<Value, String> {
        let url = format!(
            "{}/bot{}/{method}",
            self.cfg.api_url,
            self.cfg.token.expose()
        );
        let redact = |s: String| s.replace(self.cfg.token.expose(), "<token>");
        let resp = self
            .agent
            .post(&url)
            .timeout(timeout)
            .set("Content-Type", "application/json")
            .send_string(&body.to_string());
        let resp = match resp {
            Ok(r) => r,
            Err(ureq::Error::Status(code, r)) => {
                let mut buf = Vec::new();
                let _ = r.into_reader().take(MAX_BODY).read_to_end(&mut buf);
                return Err(redact(format!(
                    "{method}: HTTP {code}: {}",
                    String::from_utf8_lossy(&buf)
                )));
            }
            Err(ureq::Error::Transport(t)) => {
                return Err(redact(format!(
                    "{method}: network error: {}{}",
                    t.kind(),
                    t.message().map(|m| format!(": {m}")).unwrap_or_default()
                )))
            }
        };
        let mut buf = Vec::new();
        resp.into_reader()
            .take(MAX_BODY)
            .read_to_end(&mut buf)
            .map_err(|e| format!("{method}: reading the reply: {e}"))?;
        let v: Value =
            serde_json::from_slice(&buf).map_err(|e| format!("{method}: bad reply: {e}"))?;
        if v.get("ok") != Some(&Value::Bool(true)) {
            return Err(redact(format!("{method}: ok=false: {v}")));
        }
        Ok(v.get("result").cloned().unwrap_or(Value::Null))
    }
}

/// Posts `req` to the configured chat and waits for an authorised tap.
pub fn request_approval(
    cfg: &ValidatedTelegram,
    req: &ApprovalRequest,
    cancel: &AtomicBool,
) -> ApprovalOutcome {
    let api = Api {
        agent: ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .redirects(0)
            .build(),
        cfg,
    };
    let deadline = Instant::now() + req.timeout;
    let approve = format!("gov:approve:{}", req.id);
    let deny = format!("gov:deny:{}", req.id);
    let body = json!({
        "chat_id": cfg.chat_id,
        "text": req.text,
        "reply_markup": {"inline_keyboard": [[
            {"text": "Approve", "callback_data": approve},
            {"text": "Deny", "callback_data": deny},
        ]]},
    });
    // Skip updates older than the request: start from the newest one.
    let mut offset: i64 = match api.call(
        "getUpdates",
        &json!({"offset": -1, "timeout": 0, "allowed_updates": ["callback_query"]}),
        Duration::from_secs(15),
    ) {
        Ok(Value::Array(us)) => us
            .iter()
            .filter_map(|u| u.get("update_id").and_then(Value::as_i64))
            .max()
            // A hostile or broken API answering i64::MAX must not panic
            // (debug) or wrap to a negative offset (release).
            .map(|m| m.saturating_add(1))
            .unwrap_or(0),
        _ => 0,
    };
    if let Err(e) = api.call("sendMessage", &body, Duration::from_secs(15)) {
        return ApprovalOutcome::Failed(e);
    }
    let mut failures = 0u32;
    loop {
        if cancel.load(Ordering::SeqCst) {
            return ApprovalOutcome::Cancelled;
        }
        let now = Instant::now();
        if now >= deadline {
            return ApprovalOutcome::TimedOut;
        }
        let poll = (deadline - now).as_secs().clamp(0, 20);
        let updates = api.call(
            "getUpdates",
            &json!({"offset": offset, "timeout": poll, "allowed_updates": ["callback_query"]}),
            Duration::from_secs(poll + 15),
        );
        let updates = match updates {
            Ok(Value::Array(us)) => {
                failures = 0;
                us
            }
            Ok(_) => Vec::new(),
            Err(e) => {
                failures += 1;
                log::warn!(target: "governor_alerts", "approval polling: {e}");
                std::thread::sleep(Duration::from_secs(u64::from(failures.min(5))));
                continue;
            }
        };
        for u in updates {
            if let Some(id) = u.get("update_id").and_then(Value::as_i64) {
                offset = offset.max(id.saturating_add(1));
            }
            let Some(cb) = u.get("callback_query") else {
                continue;
            };
            let data = cb.get("data").and_then(Value::as_str).unwrap_or("");
            if data != approve && data != deny {
                continue;
            }
            let from = cb.get("from").cloned().unwrap_or(Value::Null);
            let by = from.get("id").and_then(Value::as_i64).unwrap_or(0);
            let name = from
                .get("username")
                .or_else(|| from.get("first_name"))
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string();
            let cb_id = cb.get("id").and_then(Value::as_str).unwrap_or("");
            let authorised = req.approvers.contains(&by);
            let answer = if !authorised {
                "You are not an authorised approver."
            } else if data == approve {
                "Approved."
            } else {
                "Denied."
            };
            let _ = api.call(
                "answerCallbackQuery",
                &json!({"callback_query_id": cb_id, "text": answer}),
                Duration::from_secs(10),
            );
            if !authorised {
                log::warn!(
                    target: "governor_alerts",
                    "approval {}: tap by unauthorised Telegram user {by} ignored",
                    req.id
                );
                continue;
            }
            return if data == approve {
                ApprovalOutcome::Approved { by, name }
            } else {
                ApprovalOutcome::Denied { by, name }
            };
        }
    }
}
