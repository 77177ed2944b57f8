//! `[alerts.telegram]` parsing and validation: every problem names its key.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use governor_alerts::{ConfigProblem, Severity, TelegramConfig};
use support::{token_file, CHAT, TOKEN};

fn problem(cfg: &TelegramConfig) -> ConfigProblem {
    cfg.validate().expect_err("config should be refused")
}

#[test]
fn good_config_validates_and_hides_the_token() {
    let (_d, path) = token_file();
    let v = TelegramConfig::new(&path, CHAT).validate().unwrap();
    assert_eq!(v.chat_id(), CHAT);
    assert_eq!(v.api_url(), "https://api.telegram.org");
    assert_eq!(v.min_severity(), Severity::Warning);
    assert_eq!(v.group_window(), Duration::from_secs(60));
    assert_eq!(v.queue_capacity(), 256);
    let shown = format!("{v:?}");
    assert!(
        !shown.contains(TOKEN) && shown.contains("<redacted>"),
        "{shown}"
    );
}

#[test]
fn token_file_missing() {
    let dir = tempfile::tempdir().unwrap();
    let p = problem(&TelegramConfig::new(dir.path().join("nope"), CHAT));
    assert_eq!(p.key, "bot_token_file");
    assert!(p.reason.contains("does not exist"), "{p}");
}

#[test]
fn token_file_world_readable() {
    let (_d, path) = token_file();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let p = problem(&TelegramConfig::new(&path, CHAT));
    assert_eq!(p.key, "bot_token_file");
    assert!(
        p.reason.contains(&format!("chmod 600 {}", path.display())),
        "{p}"
    );
    assert!(p.reason.contains("0644"), "{p}");
    // Group-readable is refused too.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    assert_eq!(
        problem(&TelegramConfig::new(&path, CHAT)).key,
        "bot_token_file"
    );
}

#[test]
fn token_file_empty_or_malformed() {
    let (_d, path) = token_file();
    for (content, expect) in [
        ("", "empty"),
        ("  \n\n", "empty"),
        ("123:abc\n456:def\n", "whitespace"),
        ("123:a bc", "whitespace"),
        ("123:abc/../x", "characters"),
    ] {
        std::fs::write(&path, content).unwrap();
        let p = problem(&TelegramConfig::new(&path, CHAT));
        assert_eq!(p.key, "bot_token_file");
        assert!(p.reason.contains(expect), "{content:?}: {p}");
        assert!(!p.reason.contains("abc"), "token text leaked: {p}");
    }
    // Surrounding whitespace (a trailing newline from `echo`) is fine.
    std::fs::write(&path, format!("  {TOKEN}\n")).unwrap();
    assert!(TelegramConfig::new(&path, CHAT).validate().is_ok());
}

#[test]
fn chat_id_problems() {
    let (_d, path) = token_file();
    for bad in ["", "   ", "my chat", "@x"] {
        let p = problem(&TelegramConfig::new(&path, bad));
        assert_eq!(p.key, "chat_id", "{bad:?}: {p}");
    }
    assert!(TelegramConfig::new(&path, "@governor_alerts")
        .validate()
        .is_ok());
}

#[test]
fn api_url_problems() {
    let (_d, path) = token_file();
    for bad in ["not a url", "ftp://x", "", "http://api.telegram.org"] {
        let mut cfg = TelegramConfig::new(&path, CHAT);
        cfg.api_url = bad.into();
        let p = problem(&cfg);
        assert_eq!(p.key, "api_url", "{bad:?}: {p}");
        assert_eq!(p.to_string(), format!("api_url: {}", p.reason));
    }
    let mut cfg = TelegramConfig::new(&path, CHAT);
    cfg.api_url = "ftp://x".into();
    assert!(problem(&cfg).reason.contains("ftp"));
}

#[test]
fn window_and_capacity_problems() {
    let (_d, path) = token_file();
    let mut cfg = TelegramConfig::new(&path, CHAT);
    cfg.group_window = Duration::ZERO;
    assert_eq!(problem(&cfg).key, "group_window");
    let mut cfg = TelegramConfig::new(&path, CHAT);
    cfg.queue_capacity = 0;
    assert_eq!(problem(&cfg).key, "queue_capacity");
}

#[derive(serde::Deserialize)]
struct DaemonConfig {
    alerts: Alerts,
}

#[derive(serde::Deserialize)]
struct Alerts {
    telegram: TelegramConfig,
}

#[test]
fn embeds_in_daemon_toml() {
    let cfg: DaemonConfig = toml::from_str(
        r#"
        [alerts.telegram]
        bot_token_file = "/etc/governor/telegram.token"
        chat_id = -1001234567890
        min_severity = "critical"
        group_window = "1m30s"
        "#,
    )
    .unwrap();
    let t = cfg.alerts.telegram;
    assert_eq!(t.chat_id, "-1001234567890");
    assert_eq!(t.min_severity, Severity::Critical);
    assert_eq!(t.group_window, Duration::from_secs(90));
    assert_eq!(t.api_url, "https://api.telegram.org");
    assert_eq!(t.queue_capacity, 256);

    let t: TelegramConfig =
        toml::from_str("bot_token_file = \"/t\"\nchat_id = \"@chan_nel\"\ngroup_window = 30\n")
            .unwrap();
    assert_eq!(
        (t.chat_id.as_str(), t.group_window.as_secs()),
        ("@chan_nel", 30)
    );

    let err =
        toml::from_str::<TelegramConfig>("bot_token_file = \"/t\"\nchat_id = 1\ntoken = \"x\"\n")
            .map(|_| ())
            .unwrap_err();
    assert!(err.to_string().contains("unknown field `token`"), "{err}");
    let err = toml::from_str::<TelegramConfig>(
        "bot_token_file = \"/t\"\nchat_id = 1\ngroup_window = \"5 minutes\"\n",
    )
    .map(|_| ())
    .unwrap_err();
    assert!(err.to_string().contains("group_window"), "{err}");
    let err = toml::from_str::<TelegramConfig>(
        "bot_token_file = \"/t\"\nchat_id = 1\nmin_severity = \"fatal\"\n",
    )
    .map(|_| ())
    .unwrap_err();
    assert!(err.to_string().contains("min_severity"), "{err}");
}
