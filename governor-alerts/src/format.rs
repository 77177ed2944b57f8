//! Turning alerts into Telegram HTML messages.
//!
//! Telegram parses `parse_mode: "HTML"` strictly: one stray `<` or a cut
//! `&am` makes it reject the whole message with HTTP 400, and an alert lost
//! that way is exactly the one that contained something odd. So every piece
//! of data is escaped, only our own `<b>` tag is markup, and cutting to the
//! length limit happens after escaping and never inside an entity.

use std::time::Duration;

use crate::group::FollowUp;
use crate::Alert;

/// Telegram's limit for one message's text. Measured here in UTF-16 code
/// units (the unit Telegram counts in), which is never less than the number
/// of characters, so a message within this limit is within it either way.
pub const MAX_MESSAGE_CHARS: usize = 4096;

/// Caps for the parts that must survive truncation of a long body, so that a
/// huge title cannot push the audit footer out.
const MAX_HEADER: usize = 512;
const MAX_FOOTER_LINE: usize = 256;

/// Escapes the four characters Telegram's HTML parser cares about.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}

fn units(s: &str) -> usize {
    s.chars().map(char::len_utf16).sum()
}

/// Cuts already-escaped text to at most `max` units (see
/// [`MAX_MESSAGE_CHARS`]), appending `…` when it cuts. Cuts only at char
/// boundaries and never inside an `&…;` entity, so the result is still
/// valid for Telegram's HTML parser.
pub fn truncate_escaped(s: &str, max: usize) -> String {
    if units(s) <= max {
        return s.to_owned();
    }
    if max == 0 {
        return String::new();
    }
    let budget = max - 1; // room for the ellipsis
    let mut used = 0;
    let mut cut = 0;
    let mut entity_start = None;
    for (i, c) in s.char_indices() {
        if used + c.len_utf16() > budget {
            break;
        }
        used += c.len_utf16();
        match c {
            '&' => entity_start = Some(i),
            ';' => entity_start = None,
            _ => {}
        }
        cut = i + c.len_utf8();
    }
    if let Some(start) = entity_start {
        cut = start;
    }
    let mut out = String::with_capacity(cut + 3);
    out.push_str(&s[..cut]);
    out.push('…');
    out
}

/// Assembles header (bold), body and footer lines from plain text, cutting
/// the body so the whole message fits and the footer (the audit head) is
/// always present.
fn compose(header: &str, body: &str, footer: &[String]) -> String {
    let header = truncate_escaped(&escape_html(header), MAX_HEADER);
    let footer: Vec<String> = footer
        .iter()
        .map(|l| truncate_escaped(&escape_html(l), MAX_FOOTER_LINE))
        .collect();
    let mut fixed = format!("<b>{header}</b>");
    let footer_text = footer.join("\n");
    // "\n" before the body and before the footer block.
    let overhead = units(&fixed) + units(&footer_text) + 2;
    let body_budget = MAX_MESSAGE_CHARS.saturating_sub(overhead);
    let body = truncate_escaped(&escape_html(body.trim_end()), body_budget);
    if !body.is_empty() {
        fixed.push('\n');
        fixed.push_str(&body);
    }
    if !footer_text.is_empty() {
        fixed.push('\n');
        fixed.push_str(&footer_text);
    }
    fixed
}

fn dropped_line(dropped_before: u64) -> Option<String> {
    (dropped_before > 0).then(|| {
        format!(
            "⚠ {dropped_before} alert{} dropped before this one (queue full)",
            if dropped_before == 1 { "" } else { "s" }
        )
    })
}

fn audit_line(head: Option<&str>) -> Option<String> {
    head.map(|h| format!("audit {h}"))
}

fn subject(kind: &str, service: Option<&str>) -> String {
    match service {
        Some(s) => format!("{kind}: {s}"),
        None => kind.to_owned(),
    }
}

/// The message for the first alert of a group (or an ungrouped one).
pub(crate) fn render_alert(alert: &Alert, dropped_before: u64) -> String {
    let header = format!("[{}] {}", alert.severity, alert.title);
    let footer: Vec<String> = [
        Some(subject(&alert.kind, alert.service.as_deref())),
        dropped_line(dropped_before),
        audit_line(alert.audit_head.as_deref()),
    ]
    .into_iter()
    .flatten()
    .collect();
    compose(&header, &alert.body, &footer)
}

/// The follow-up that closes a group window, e.g.
/// `crash loop: lily — 37 more in 60s (last: …)`.
pub(crate) fn render_follow_up(f: &FollowUp, dropped_before: u64) -> String {
    let header = format!(
        "[{}] {} — {} more in {}",
        f.severity,
        subject(&f.last.kind, f.last.service.as_deref()),
        f.count,
        human_duration(f.window),
    );
    let body = if f.last.body.trim().is_empty() {
        format!("(last: {})", f.last.title)
    } else {
        format!("(last: {}: {})", f.last.title, f.last.body.trim_end())
    };
    let footer: Vec<String> = [
        dropped_line(dropped_before),
        audit_line(f.last.audit_head.as_deref()),
    ]
    .into_iter()
    .flatten()
    .collect();
    compose(&header, &body, &footer)
}

/// `60s`, `5m`, `1h30m`, `500ms`: the config's own notation (seconds up to
/// two minutes, because "60s" reads better than "1m" for a group window).
pub(crate) fn human_duration(d: Duration) -> String {
    let total = d.as_secs();
    if total == 0 {
        return format!("{}ms", d.as_millis());
    }
    if total < 120 {
        return format!("{total}s");
    }
    let (h, m, s) = (total / 3600, (total % 3600) / 60, total % 60);
    let mut out = String::new();
    if h > 0 {
        out.push_str(&format!("{h}h"));
    }
    if m > 0 {
        out.push_str(&format!("{m}m"));
    }
    if s > 0 || out.is_empty() {
        out.push_str(&format!("{s}s"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Severity;

    /// Every `&` starts one of our entities, and `<` only opens our tags.
    pub(crate) fn assert_valid_html(s: &str) {
        for (i, _) in s.match_indices('&') {
            let rest = &s[i..];
            assert!(
                ["&amp;", "&lt;", "&gt;", "&quot;"]
                    .iter()
                    .any(|e| rest.starts_with(e)),
                "broken entity at {i}: {:?}",
                &rest[..rest.len().min(8)]
            );
        }
        let stripped = s.replace("<b>", "").replace("</b>", "");
        assert!(!stripped.contains('<') && !stripped.contains('>'));
    }

    #[test]
    fn escapes_all_four() {
        assert_eq!(
            escape_html(r#"<a href="x">&</a>"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&lt;/a&gt;"
        );
    }

    #[test]
    fn truncation_never_splits_entities_or_chars() {
        let s = escape_html(&"a&".repeat(100));
        for max in 1..60 {
            let t = truncate_escaped(&s, max);
            assert!(units(&t) <= max, "{max}: {t}");
            assert!(t.ends_with('…'));
            assert_valid_html(t.trim_end_matches('…'));
        }
        assert_eq!(truncate_escaped("abc", 3), "abc");
        assert_eq!(truncate_escaped("abcd", 3), "ab…");
        assert_eq!(truncate_escaped("abcd", 0), "");
        // Multibyte and astral characters: cut at boundaries.
        let t = truncate_escaped("ééé😀😀", 5);
        assert_eq!(t, "ééé…");
    }

    #[test]
    fn long_alert_keeps_footer_and_fits() {
        let body: String = "x<y & z ".repeat(1250); // 10,000 chars
        let a = Alert::new(Severity::Critical, "memory", "big <one>")
            .with_service("lily")
            .with_body(body)
            .with_audit_head("42:abcdef01");
        let m = render_alert(&a, 3);
        assert!(units(&m) <= MAX_MESSAGE_CHARS);
        assert!(m.starts_with("<b>[critical] big &lt;one&gt;</b>\n"));
        assert!(m.ends_with("\naudit 42:abcdef01"), "{}", &m[m.len() - 80..]);
        assert!(m.contains("…\nmemory: lily\n⚠ 3 alerts dropped"));
        assert_valid_html(&m);
        // A huge title is capped too and the footer still survives.
        let a = Alert::new(Severity::Info, "k", "t".repeat(9000)).with_audit_head("1:ff");
        let m = render_alert(&a, 0);
        assert!(units(&m) <= MAX_MESSAGE_CHARS && m.ends_with("audit 1:ff"));
    }

    #[test]
    fn follow_up_text() {
        let last = Alert::new(Severity::Warning, "crash loop", "restarted")
            .with_service("lily")
            .with_body("exit 1");
        let f = FollowUp {
            severity: Severity::Warning,
            count: 37,
            window: Duration::from_secs(60),
            last,
        };
        assert_eq!(
            render_follow_up(&f, 0),
            "<b>[warning] crash loop: lily — 37 more in 60s</b>\n(last: restarted: exit 1)"
        );
    }

    #[test]
    fn durations_read_like_config() {
        assert_eq!(human_duration(Duration::from_secs(60)), "60s");
        assert_eq!(human_duration(Duration::from_secs(90)), "90s");
        assert_eq!(human_duration(Duration::from_secs(150)), "2m30s");
        assert_eq!(human_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(human_duration(Duration::from_secs(3600)), "1h");
    }
}
