//! The `[alerts.telegram]` config section and its validation.
//!
//! Deserialization (serde) only checks shapes; [`TelegramConfig::validate`]
//! checks meaning — the token file's existence, contents and permissions, the
//! chat id's syntax, the API URL — and names the offending key so the daemon
//! can print `file:line: key: reason` and keep running on its last good
//! config.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::Severity;

/// Telegram's public Bot API endpoint.
pub const DEFAULT_API_URL: &str = "https://api.telegram.org";
const DEFAULT_GROUP_WINDOW: Duration = Duration::from_secs(60);
const DEFAULT_QUEUE_CAPACITY: usize = 256;
/// Upper bound on `queue_capacity`: the queue lives in the daemon's memory
/// and messages are sent at 1/s, so more than this is never drained anyway.
const MAX_QUEUE_CAPACITY: usize = 65_536;

/// `[alerts.telegram]` as written in the daemon's TOML config.
///
/// ```toml
/// [alerts.telegram]
/// bot_token_file = "/etc/governor/telegram.token"   # chmod 600
/// chat_id = -1001234567890                          # or "@channelname"
/// # api_url = "https://api.telegram.org"
/// # min_severity = "warning"                        # info | warning | critical
/// # group_window = "60s"
/// # queue_capacity = 256
/// ```
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelegramConfig {
    /// File holding the bot token (the token itself never sits in the main
    /// config, which is world-readable on many hosts).
    pub bot_token_file: PathBuf,
    /// Numeric chat id (`-100…` for channels and supergroups) or
    /// `@channelname`. TOML integers and strings are both accepted.
    #[serde(deserialize_with = "de_chat_id")]
    pub chat_id: String,
    /// Base URL of the Bot API; a local Bot API server or a test stand-in may
    /// be used instead of Telegram's.
    #[serde(default = "default_api_url")]
    pub api_url: String,
    /// Alerts below this severity are not sent to Telegram.
    #[serde(default)]
    pub min_severity: Severity,
    /// Alerts with the same (kind, service) inside this window are grouped.
    /// Written like `60s`, `10m`, `1m30s`, or an integer number of seconds.
    #[serde(default = "default_group_window", deserialize_with = "de_duration")]
    pub group_window: Duration,
    /// How many messages may wait for delivery before new alerts are dropped
    /// (and counted).
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
}

fn default_api_url() -> String {
    DEFAULT_API_URL.to_owned()
}

fn default_group_window() -> Duration {
    DEFAULT_GROUP_WINDOW
}

fn default_queue_capacity() -> usize {
    DEFAULT_QUEUE_CAPACITY
}

impl fmt::Debug for TelegramConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Holds only the token's *path*, but spelled out so that adding a
        // secret field later does not silently start printing it.
        f.debug_struct("TelegramConfig")
            .field("bot_token_file", &self.bot_token_file)
            .field("chat_id", &self.chat_id)
            .field("api_url", &self.api_url)
            .field("min_severity", &self.min_severity)
            .field("group_window", &self.group_window)
            .field("queue_capacity", &self.queue_capacity)
            .finish()
    }
}

/// A config value that is syntactically fine but unusable. `key` is the
/// field name inside `[alerts.telegram]` so the daemon can point at the
/// line; `reason` says what is wrong and, where there is one, the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The offending key, e.g. `bot_token_file`.
    pub key: &'static str,
    /// Human-readable reason; never contains the token.
    pub reason: String,
}

impl ConfigProblem {
    fn new(key: &'static str, reason: impl Into<String>) -> Self {
        ConfigProblem {
            key,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.reason)
    }
}

impl std::error::Error for ConfigProblem {}

/// The bot token. Its own type so that no `Debug`, `Display` or log line can
/// print it by accident.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct BotToken(String);

impl BotToken {
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BotToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A config that passed [`TelegramConfig::validate`]: the token is loaded,
/// and every value is known to be usable. The only way to build a
/// [`crate::TelegramSender`].
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct ValidatedTelegram {
    pub(crate) token: BotToken,
    pub(crate) token_file: PathBuf,
    pub(crate) chat_id: String,
    pub(crate) api_url: String,
    pub(crate) min_severity: Severity,
    pub(crate) group_window: Duration,
    pub(crate) queue_capacity: usize,
}

impl ValidatedTelegram {
    /// The chat alerts go to.
    pub fn chat_id(&self) -> &str {
        &self.chat_id
    }
    /// The Bot API base URL, without a trailing slash.
    pub fn api_url(&self) -> &str {
        &self.api_url
    }
    /// Where the token was read from.
    pub fn bot_token_file(&self) -> &Path {
        &self.token_file
    }
    /// Alerts below this are not sent.
    pub fn min_severity(&self) -> Severity {
        self.min_severity
    }
    /// The grouping window.
    pub fn group_window(&self) -> Duration {
        self.group_window
    }
    /// Bound of the message queue.
    pub fn queue_capacity(&self) -> usize {
        self.queue_capacity
    }
}

impl TelegramConfig {
    /// A config with defaults for everything but the token file and chat.
    pub fn new(bot_token_file: impl Into<PathBuf>, chat_id: impl Into<String>) -> Self {
        TelegramConfig {
            bot_token_file: bot_token_file.into(),
            chat_id: chat_id.into(),
            api_url: default_api_url(),
            min_severity: Severity::default(),
            group_window: DEFAULT_GROUP_WINDOW,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
        }
    }

    /// Checks every value and loads the token. Returns the first problem,
    /// naming its key. Reads the token file, so call it again on reload: a
    /// rotated token is picked up, a broken one keeps the old config.
    pub fn validate(&self) -> Result<ValidatedTelegram, ConfigProblem> {
        let token = read_token(&self.bot_token_file)?;
        let chat_id = check_chat_id(&self.chat_id)?;
        let api_url = check_api_url(&self.api_url)?;
        if self.group_window.is_zero() {
            return Err(ConfigProblem::new(
                "group_window",
                "must be longer than 0s; grouping is what keeps a crash loop from flooding the chat",
            ));
        }
        if self.queue_capacity == 0 || self.queue_capacity > MAX_QUEUE_CAPACITY {
            return Err(ConfigProblem::new(
                "queue_capacity",
                format!(
                    "must be between 1 and {MAX_QUEUE_CAPACITY}, got {}",
                    self.queue_capacity
                ),
            ));
        }
        Ok(ValidatedTelegram {
            token,
            token_file: self.bot_token_file.clone(),
            chat_id,
            api_url,
            min_severity: self.min_severity,
            group_window: self.group_window,
            queue_capacity: self.queue_capacity,
        })
    }
}

const TOKEN_KEY: &str = "bot_token_file";

/// Loads the token, refusing files others can read: the token lets anyone
/// impersonate the bot, and the daemon runs as root on shared hosts.
fn read_token(path: &Path) -> Result<BotToken, ConfigProblem> {
    let shown = path.display();
    if path.as_os_str().is_empty() {
        return Err(ConfigProblem::new(
            TOKEN_KEY,
            "is empty; give the path of the file holding the bot token",
        ));
    }
    let meta = std::fs::metadata(path).map_err(|e| {
        let why = if e.kind() == std::io::ErrorKind::NotFound {
            "does not exist".to_owned()
        } else {
            format!("cannot be read: {e}")
        };
        ConfigProblem::new(TOKEN_KEY, format!("{shown} {why}"))
    })?;
    if !meta.is_file() {
        return Err(ConfigProblem::new(
            TOKEN_KEY,
            format!("{shown} is not a regular file"),
        ));
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ConfigProblem::new(
            TOKEN_KEY,
            format!(
                "{shown} is accessible by group or others (mode {mode:04o}); \
                 the bot token is a secret: run `chmod 600 {shown}`"
            ),
        ));
    }
    let raw = std::fs::read(path)
        .map_err(|e| ConfigProblem::new(TOKEN_KEY, format!("{shown} cannot be read: {e}")))?;
    let text = String::from_utf8(raw)
        .map_err(|_| ConfigProblem::new(TOKEN_KEY, format!("{shown} is not valid UTF-8")))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(ConfigProblem::new(
            TOKEN_KEY,
            format!("{shown} is empty; put the bot token from @BotFather in it"),
        ));
    }
    if token.chars().any(char::is_whitespace) {
        return Err(ConfigProblem::new(
            TOKEN_KEY,
            format!(
                "{shown} contains whitespace or several lines; it must hold only the bot token"
            ),
        ));
    }
    // The token goes into the URL path, so anything beyond Telegram's token
    // alphabet (digits, ':', letters, '_', '-') could change the request.
    // The message deliberately does not echo the offending character.
    if !token
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, ':' | '_' | '-'))
    {
        return Err(ConfigProblem::new(
            TOKEN_KEY,
            format!(
                "{shown} contains characters that cannot be in a bot token \
                 (expected something like 123456:ABC-DEF_ghi)"
            ),
        ));
    }
    Ok(BotToken(token.to_owned()))
}

/// Telegram chat ids are integers (negative for groups and channels) or
/// `@username` of a public channel (5–32 of `[A-Za-z0-9_]`, letter first).
fn check_chat_id(raw: &str) -> Result<String, ConfigProblem> {
    let id = raw.trim();
    if id.is_empty() {
        return Err(ConfigProblem::new(
            "chat_id",
            "is empty; give a numeric chat id (e.g. -1001234567890) or @channelname",
        ));
    }
    if let Some(name) = id.strip_prefix('@') {
        let ok_len = (5..=32).contains(&name.len());
        let ok_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        let ok_first = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
        if ok_len && ok_chars && ok_first {
            return Ok(id.to_owned());
        }
        return Err(ConfigProblem::new(
            "chat_id",
            format!(
                "{id:?} is not a valid channel username: expected @ followed by 5-32 letters, \
                 digits or underscores, starting with a letter"
            ),
        ));
    }
    if id.parse::<i64>().is_ok_and(|n| n != 0) {
        return Ok(id.to_owned());
    }
    Err(ConfigProblem::new(
        "chat_id",
        format!("{id:?} is neither a numeric chat id (e.g. -1001234567890) nor @channelname"),
    ))
}

/// The API URL must be absolute http(s) with a host. Plain http is allowed
/// only to loopback (a local Bot API server or test stand-in), because the
/// token travels in the URL path.
fn check_api_url(raw: &str) -> Result<String, ConfigProblem> {
    const KEY: &str = "api_url";
    let trimmed = raw.trim();
    let url = url::Url::parse(trimmed).map_err(|e| {
        ConfigProblem::new(
            KEY,
            format!("{trimmed:?} is not a URL ({e}); expected e.g. {DEFAULT_API_URL}"),
        )
    })?;
    match url.scheme() {
        "https" => {}
        "http" => {
            let loopback = match url.host() {
                Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                None => false,
            };
            if !loopback {
                return Err(ConfigProblem::new(
                    KEY,
                    format!(
                        "{trimmed:?} uses plain http to a non-loopback host, which would send \
                         the bot token in clear text; use https://"
                    ),
                ));
            }
        }
        other => {
            return Err(ConfigProblem::new(
                KEY,
                format!("{trimmed:?} has scheme {other:?}; only https:// (or http:// to loopback) is supported"),
            ))
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(ConfigProblem::new(KEY, format!("{trimmed:?} has no host")));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(ConfigProblem::new(
            KEY,
            format!("{trimmed:?} must not contain credentials"),
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(ConfigProblem::new(
            KEY,
            format!("{trimmed:?} must not have a query or fragment; give the base URL only"),
        ));
    }
    Ok(trimmed.trim_end_matches('/').to_owned())
}

fn de_chat_id<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum IntOrString {
        Int(i64),
        Str(String),
    }
    Ok(match IntOrString::deserialize(d)? {
        IntOrString::Int(n) => n.to_string(),
        IntOrString::Str(s) => s,
    })
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum SecsOrString {
        Secs(u64),
        Str(String),
    }
    match SecsOrString::deserialize(d)? {
        SecsOrString::Secs(n) => Ok(Duration::from_secs(n)),
        SecsOrString::Str(s) => parse_duration(&s).map_err(serde::de::Error::custom),
    }
}

/// Parses durations the way the rest of the config writes them: `500ms`,
/// `60s`, `10m`, `2h`, `1d`, and concatenations like `1m30s`. The daemon's
/// config uses this same parser for all its durations.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration; write e.g. 60s or 10m".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "invalid duration {s:?}; write e.g. 60s, 10m or 1m30s"
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("number too large in duration {s:?}"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let part = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "d" => Duration::from_secs(n.saturating_mul(86_400)),
            "" => return Err(format!("duration {s:?} lacks a unit (ms, s, m, h, d)")),
            u => {
                return Err(format!(
                    "unknown unit {u:?} in duration {s:?}; use ms, s, m, h or d"
                ))
            }
        };
        total = total.saturating_add(part);
        rest = &rest[unit_len..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert!(parse_duration("60").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn chat_ids() {
        assert!(check_chat_id("-1001234567890").is_ok());
        assert!(check_chat_id("42").is_ok());
        assert!(check_chat_id("@my_channel").is_ok());
        assert!(check_chat_id("@ab").is_err());
        assert!(check_chat_id("@1abcde").is_err());
        assert!(check_chat_id("my channel").is_err());
        assert!(check_chat_id("0").is_err());
        assert_eq!(check_chat_id("  ").unwrap_err().key, "chat_id");
    }

    #[test]
    fn api_urls() {
        assert_eq!(
            check_api_url("https://api.telegram.org/").as_deref(),
            Ok("https://api.telegram.org")
        );
        assert!(check_api_url("http://127.0.0.1:8081").is_ok());
        assert!(check_api_url("http://localhost:8081/prefix").is_ok());
        assert!(check_api_url("http://[::1]:8081").is_ok());
        for bad in [
            "not a url",
            "ftp://x",
            "http://api.telegram.org",
            "https://u:p@api.telegram.org",
            "https://api.telegram.org/?x=1",
            "",
        ] {
            assert_eq!(check_api_url(bad).unwrap_err().key, "api_url", "{bad}");
        }
    }

    #[test]
    fn token_debug_is_redacted() {
        let t = BotToken("123:secret".into());
        assert_eq!(format!("{t:?}"), "<redacted>");
    }
}
