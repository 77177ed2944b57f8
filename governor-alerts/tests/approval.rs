//! Telegram approvals (`approve_via = "telegram"`): the request goes out with
//! Approve / Deny buttons and only an authorised user's tap, read back with
//! getUpdates, decides. Against a Bot API stand-in on 127.0.0.1 that
//! answers getUpdates with scripted callback queries.

mod support;

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use governor_alerts::approval::{request_approval, ApprovalOutcome, ApprovalRequest};
use governor_alerts::TelegramConfig;
use support::BotServer;

fn config(url: &str) -> (tempfile::TempDir, governor_alerts::ValidatedTelegram) {
    let (dir, tok) = support::token_file();
    let mut c = TelegramConfig::new(&tok, support::CHAT);
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
    let bot = BotServer::start(vec![]);
    bot.tap(7, true);
    bot.tap(42, true);
    let (_d, cfg) = config(&bot.url());
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
    let calls = bot.requests();
    let sent = calls
        .iter()
        .find(|r| r.path.ends_with("/sendMessage"))
        .unwrap();
    assert_eq!(sent.body["chat_id"], support::CHAT);
    assert!(sent.text().contains("config.json"));
    let answers: Vec<&support::Recorded> = calls
        .iter()
        .filter(|r| r.path.ends_with("/answerCallbackQuery"))
        .collect();
    assert_eq!(answers.len(), 2, "both taps are answered");
    assert!(answers[0].body["text"]
        .as_str()
        .unwrap()
        .contains("not an authorised"));
    // The token never shows up in request bodies.
    assert!(!calls
        .iter()
        .any(|r| r.body.to_string().contains("TEST-token")));
}

#[test]
fn deny_and_timeout() {
    let bot = BotServer::start(vec![]);
    bot.tap(42, false);
    let (_d, cfg) = config(&bot.url());
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

    let bot = BotServer::start(vec![]);
    let (_d, cfg) = config(&bot.url());
    let t = Instant::now();
    let out = request_approval(
        &cfg,
        &request(Duration::from_secs(2)),
        &AtomicBool::new(false),
    );
    assert_eq!(out, ApprovalOutcome::TimedOut);
    assert!(t.elapsed() < Duration::from_secs(10));
}
