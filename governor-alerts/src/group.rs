//! Grouping alerts by (kind, service), like Alertmanager's `group_interval`.
//!
//! The first alert of a group goes out at once — a human should hear about a
//! crash loop within seconds. Alerts of the same group arriving inside the
//! window are only counted; when the window closes, one follow-up carries the
//! count and the last alert. If more arrived, a new window opens, so a
//! continuous storm costs one message per window instead of one per event.
//!
//! Pure: time is passed in, so this is tested without sleeping.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::{Alert, Severity};

type Key = (String, Option<String>);

#[derive(Debug)]
struct Group {
    window_end: Instant,
    suppressed: u64,
    severity: Severity,
    last: Option<Alert>,
}

/// A closed window that had alerts folded into it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FollowUp {
    /// The highest severity among the folded alerts.
    pub severity: Severity,
    /// How many alerts were folded.
    pub count: u64,
    /// The window length, for the message text.
    pub window: Duration,
    /// The most recent folded alert.
    pub last: Alert,
}

#[derive(Debug)]
pub(crate) struct Grouper {
    window: Duration,
    max_groups: usize,
    groups: HashMap<Key, Group>,
}

fn key_of(alert: &Alert) -> Key {
    (alert.kind.clone(), alert.service.clone())
}

impl Grouper {
    /// `max_groups` bounds memory when kinds or service names vary wildly.
    pub(crate) fn new(window: Duration, max_groups: usize) -> Self {
        Grouper {
            window,
            max_groups,
            groups: HashMap::new(),
        }
    }

    /// Folds `alert` into its open group if there is one (returns true);
    /// otherwise the caller should send it and then call [`Self::open`].
    /// Call [`Self::close_expired`] first so an expired window is not reused.
    pub(crate) fn try_fold(&mut self, alert: &Alert, now: Instant) -> bool {
        match self.groups.get_mut(&key_of(alert)) {
            Some(g) if now < g.window_end => {
                g.suppressed += 1;
                g.severity = g.severity.max(alert.severity);
                g.last = Some(alert.clone());
                true
            }
            _ => false,
        }
    }

    /// Opens a window for an alert that is being sent now. Returns false
    /// (and opens nothing) if too many groups are open.
    pub(crate) fn open(&mut self, alert: &Alert, now: Instant) -> bool {
        if self.groups.len() >= self.max_groups && !self.groups.contains_key(&key_of(alert)) {
            return false;
        }
        self.groups.insert(
            key_of(alert),
            Group {
                window_end: now + self.window,
                suppressed: 0,
                severity: alert.severity,
                last: None,
            },
        );
        true
    }

    /// Closes every window that ended by `now` (all of them if `all`, for
    /// shutdown) and returns follow-ups for those that folded alerts, in the
    /// order their windows ended. A window that folded alerts is reopened so
    /// the storm stays grouped; an empty one is forgotten.
    pub(crate) fn close_expired(&mut self, now: Instant, all: bool) -> Vec<FollowUp> {
        let mut out: Vec<(Instant, FollowUp)> = Vec::new();
        let window = self.window;
        self.groups.retain(|_, g| {
            if !all && now < g.window_end {
                return true;
            }
            match g.last.take() {
                Some(last) if g.suppressed > 0 => {
                    out.push((
                        g.window_end,
                        FollowUp {
                            severity: g.severity,
                            count: g.suppressed,
                            window,
                            last,
                        },
                    ));
                    g.window_end = now + window;
                    g.suppressed = 0;
                    g.severity = Severity::Info;
                    !all
                }
                _ => false,
            }
        });
        out.sort_by_key(|(end, _)| *end);
        out.into_iter().map(|(_, f)| f).collect()
    }

    /// When the next window with folded alerts closes: the worker sleeps
    /// until then at most.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.groups
            .values()
            .filter(|g| g.suppressed > 0)
            .map(|g| g.window_end)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(kind: &str, svc: &str, n: u32) -> Alert {
        Alert::new(Severity::Warning, kind, format!("#{n}")).with_service(svc)
    }

    #[test]
    fn burst_becomes_one_plus_follow_up() {
        let t0 = Instant::now();
        let w = Duration::from_secs(60);
        let mut g = Grouper::new(w, 16);
        let first = alert("crash loop", "lily", 0);
        assert!(!g.try_fold(&first, t0));
        assert!(g.open(&first, t0));
        for n in 1..100 {
            assert!(g.try_fold(
                &alert("crash loop", "lily", n),
                t0 + Duration::from_millis(n.into())
            ));
        }
        // Another service is its own group.
        assert!(!g.try_fold(&alert("crash loop", "rose", 0), t0));
        assert_eq!(g.next_deadline(), Some(t0 + w));
        assert!(g
            .close_expired(t0 + Duration::from_secs(59), false)
            .is_empty());
        let f = g.close_expired(t0 + w, false);
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].count, 99);
        assert_eq!(f[0].last.title, "#99");
        // Window reopened: still grouping, then forgotten after a quiet window.
        assert!(g.try_fold(&alert("crash loop", "lily", 100), t0 + w));
        let f = g.close_expired(t0 + w * 2, false);
        assert_eq!(f[0].count, 1);
        assert!(g.close_expired(t0 + w * 3, false).is_empty());
        assert!(!g.try_fold(&alert("crash loop", "lily", 101), t0 + w * 3));
    }

    #[test]
    fn shutdown_flushes_everything_and_max_groups_bounds() {
        let t0 = Instant::now();
        let mut g = Grouper::new(Duration::from_secs(60), 1);
        let a = alert("k", "a", 0);
        assert!(g.open(&a, t0));
        assert!(!g.open(&alert("k", "b", 0), t0));
        assert!(g.try_fold(&a, t0));
        let f = g.close_expired(t0, true);
        assert_eq!(f.len(), 1);
        assert!(g.groups.is_empty());
    }
}
