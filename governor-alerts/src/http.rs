//! One `sendMessage` request, classified into what the worker should do next.
//!
//! Blocking `ureq` on the sender's own thread: the daemon's tokio runtime
//! never waits on Telegram, and a blocking client is far lighter than an
//! async HTTP stack for one request per second.

use std::io::Read;
use std::time::Duration;

use serde::Deserialize;

use crate::config::BotToken;

/// Only this much of an error body is read: Telegram's are tiny, and a
/// misbehaving proxy must not make us buffer megabytes.
const MAX_RESPONSE_BODY: u64 = 64 * 1024;

/// What a single attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Attempt {
    /// Telegram accepted the message.
    Delivered,
    /// Try again later: after `after` if the server said so (429
    /// `retry_after`), else after the worker's exponential backoff.
    Retry {
        after: Option<Duration>,
        error: String,
    },
    /// Retrying cannot help (4xx other than 429, bad URL, `ok: false`).
    Final { error: String },
}

/// Telegram's error envelope: `{"ok":false,"error_code":429,
/// "description":"…","parameters":{"retry_after":2}}`.
#[derive(Debug, Default, Deserialize)]
struct ApiReply {
    #[serde(default)]
    ok: Option<bool>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<ApiParameters>,
}

#[derive(Debug, Default, Deserialize)]
struct ApiParameters {
    #[serde(default)]
    retry_after: Option<u64>,
}

pub(crate) struct Transport {
    agent: ureq::Agent,
    /// The full sendMessage URL; contains the token, so it is never printed.
    url: String,
    token: BotToken,
}

impl Transport {
    pub(crate) fn new(api_url: &str, token: BotToken, connect_timeout: Duration) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(connect_timeout)
            // A redirect would turn the POST into a GET elsewhere; Telegram
            // never redirects, so treat one as an error instead.
            .redirects(0)
            .user_agent(concat!("governor-alerts/", env!("CARGO_PKG_VERSION")))
            .build();
        Transport {
            agent,
            url: format!("{api_url}/bot{}/sendMessage", token.expose()),
            token,
        }
    }

    /// Strips the token from any text that might have picked it up (error
    /// messages of the HTTP stack mention URLs).
    fn redact(&self, s: &str) -> String {
        s.replace(self.token.expose(), "<token>")
    }

    /// Posts one message. `timeout` bounds the whole request, so shutdown
    /// can put a deadline on it.
    pub(crate) fn send(&self, json_body: &str, timeout: Duration) -> Attempt {
        let result = self
            .agent
            .post(&self.url)
            .timeout(timeout)
            .set("Content-Type", "application/json")
            .send_string(json_body);
        match result {
            Ok(resp) => {
                let status = resp.status();
                let reply = read_reply(resp);
                if !(200..300).contains(&status) {
                    return Attempt::Final {
                        error: format!("unexpected HTTP {status} (redirects are not followed)"),
                    };
                }
                if reply.ok == Some(false) {
                    return Attempt::Final {
                        error: self.redact(&format!(
                            "HTTP {status} but ok=false: {}",
                            reply.description.as_deref().unwrap_or("no description")
                        )),
                    };
                }
                Attempt::Delivered
            }
            Err(ureq::Error::Status(status, resp)) => {
                let header_retry = resp
                    .header("Retry-After")
                    .and_then(|v| v.trim().parse::<u64>().ok());
                let reply = read_reply(resp);
                let error = self.redact(&format!(
                    "HTTP {status}: {}",
                    reply.description.as_deref().unwrap_or("no description")
                ));
                match status {
                    429 => Attempt::Retry {
                        after: reply
                            .parameters
                            .and_then(|p| p.retry_after)
                            .or(header_retry)
                            .map(Duration::from_secs),
                        error,
                    },
                    500..=599 => Attempt::Retry { after: None, error },
                    _ => Attempt::Final { error },
                }
            }
            Err(ureq::Error::Transport(t)) => {
                // Not `t.to_string()`: ureq's Display starts with the URL,
                // which holds the token.
                let mut error = format!("network error: {}", t.kind());
                if let Some(m) = t.message() {
                    error.push_str(": ");
                    error.push_str(m);
                }
                if let Some(src) = std::error::Error::source(&t) {
                    error.push_str(": ");
                    error.push_str(&src.to_string());
                }
                let error = self.redact(&error);
                match t.kind() {
                    ureq::ErrorKind::InvalidUrl
                    | ureq::ErrorKind::UnknownScheme
                    | ureq::ErrorKind::InvalidProxyUrl => Attempt::Final { error },
                    _ => Attempt::Retry { after: None, error },
                }
            }
        }
    }
}

fn read_reply(resp: ureq::Response) -> ApiReply {
    let mut buf = Vec::new();
    // A body we cannot read or parse just means "no details".
    if resp
        .into_reader()
        .take(MAX_RESPONSE_BODY)
        .read_to_end(&mut buf)
        .is_err()
    {
        return ApiReply::default();
    }
    serde_json::from_slice(&buf).unwrap_or_default()
}
