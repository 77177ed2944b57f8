//! The kill switch: which services an engaged switch holds down, who may
//! pull or release it, and what release brings back.
//!
//! Pure: the daemon's edge stops and kills processes and persists
//! [`KillSwitch`]; this module says which, and refuses what a caller may
//! not do.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::velocity::Supervisor;

/// What an engaged switch holds down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "services", rename_all = "kebab-case")]
pub enum Scope {
    /// Every supervised service (pm2 apps, service units) and every
    /// configured one — never governor, PID 1, sshd, a login session or a
    /// pm2 God (see [`never_held`]).
    All,
    /// The same without `critical = true` services.
    NonCritical,
    /// These services only.
    Services(BTreeSet<String>),
}

impl Scope {
    /// Whether `self` holds everything `other` holds and more: all ⊃
    /// non-critical ⊃ any list of services (a list may name a critical
    /// service, which non-critical wouldn't hold: still wider by intent,
    /// and the list's services stay stopped).
    pub fn wider_than(&self, other: &Scope) -> bool {
        matches!(
            (self, other),
            (Scope::All, Scope::NonCritical | Scope::Services(_))
                | (Scope::NonCritical, Scope::Services(_))
        )
    }

    /// `all`, `non-critical`, or service names (validated by the caller
    /// against the config and the table).
    pub fn parse(words: &[String]) -> Result<Scope, String> {
        match words {
            [] => Err("a scope is required: all, non-critical, or service names".into()),
            [w] if w == "all" => Ok(Scope::All),
            [w] if w == "non-critical" => Ok(Scope::NonCritical),
            names => {
                if let Some(bad) = names.iter().find(|n| *n == "all" || *n == "non-critical") {
                    return Err(format!(
                        "{bad:?} is a scope of its own: it can't be combined with service names"
                    ));
                }
                if let Some(bad) = names.iter().find(|n| n.is_empty() || n.len() > 128) {
                    return Err(format!("{bad:?} is not a service name"));
                }
                Ok(Scope::Services(names.iter().cloned().collect()))
            }
        }
    }

    /// Whether the scope holds `service` (`critical` from the config).
    pub fn covers(&self, service: &str, critical: bool) -> bool {
        match self {
            Scope::All => true,
            Scope::NonCritical => !critical,
            Scope::Services(s) => s.contains(service),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Scope::All => "all".into(),
            Scope::NonCritical => "non-critical".into(),
            Scope::Services(s) => s.iter().cloned().collect::<Vec<_>>().join(" "),
        }
    }
}

/// Where OpenSSH's daemon and its per-session processes live (Debian,
/// Ubuntu, Fedora).
const SSHD: [&str; 6] = [
    "/usr/sbin/sshd",
    "/usr/bin/sshd",
    "/usr/lib/openssh/sshd-session",
    "/usr/lib/openssh/sshd-auth",
    "/usr/libexec/openssh/sshd-session",
    "/usr/libexec/openssh/sshd-auth",
];

/// Why a process is never stopped or blocked by the switch, whatever the
/// scope (`None`: it may be).
pub fn never_held(pid: u32, exe: &str, daemon_pid: u32, is_god: bool) -> Option<&'static str> {
    if pid == 1 {
        Some("PID 1")
    } else if pid == daemon_pid {
        Some("governor itself")
    } else if is_god {
        Some("a pm2 God daemon (its apps are stopped through it)")
    } else if SSHD.contains(&exe) {
        // By the kernel's path of a root-owned binary, never by name: an
        // agent's own `/tmp/x/sshd` is held like the rest of its service.
        Some("sshd")
    } else {
        None
    }
}

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    /// Root at a login terminal (the core's ancestry check).
    Human,
    /// A root process under a supervisor (a pm2 app, a service unit, cron):
    /// an agent that sees itself misbehave may pull the brake.
    Supervised(String),
    /// Anyone else.
    Other(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Engage,
    Release,
}

/// Whether `who` may do `action`: engaging needs root (a human or a
/// supervised process), releasing a human at a login terminal.
pub fn may(who: &Who, action: Action) -> Result<(), String> {
    match (who, action) {
        (Who::Human, _) => Ok(()),
        (Who::Supervised(_), Action::Engage) => Ok(()),
        (Who::Supervised(why), Action::Release) => Err(format!(
            "releasing the kill switch takes a person at a login terminal; this caller is {why}"
        )),
        (Who::Other(why), _) => Err(format!("the kill switch is root's only: {why}")),
    }
}

/// A service the switch stopped, with how to bring it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stopped {
    pub supervisor: Supervisor,
    /// The pids it had when stopped.
    pub pids: Vec<u32>,
}

/// An engaged switch (persisted in the state dir).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Engaged {
    pub scope: Scope,
    pub reason: String,
    /// Who engaged it, as audited.
    pub by: String,
    /// Wall clock (unix ms).
    pub since_ms: i64,
    /// What the switch stopped, by service: release restarts these only.
    pub stopped: BTreeMap<String, Stopped>,
    /// Services released from an `all` / `non-critical` scope by a
    /// partial release: no longer held.
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub released: BTreeSet<String>,
    /// Services named before a widening to `non-critical`: a critical one
    /// named explicitly stays held (the wider scope doesn't cover it).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub named: BTreeSet<String>,
}

/// The switch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KillSwitch {
    pub engaged: Option<Engaged>,
}

/// A running service as the daemon sees it, for [`KillSwitch::engage`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub service: String,
    pub critical: bool,
    pub supervisor: Supervisor,
    pub pids: Vec<u32>,
}

fn check_reason(reason: &str) -> Result<(), String> {
    let r = reason.trim();
    if r.is_empty() {
        return Err("a reason is required (--reason TEXT): it goes into the audit chain".into());
    }
    if r.len() > 1000 {
        return Err(format!("the reason is {} bytes; 1000 at most", r.len()));
    }
    Ok(())
}

impl KillSwitch {
    /// Engages the switch: the services of `running` that `scope` covers
    /// are returned, to be stopped. Engaging an engaged switch widens it:
    /// more services of a `Services` scope, or a wider scope
    /// ([`Scope::wider_than`]); a narrower one is refused (release first).
    pub fn engage(
        &mut self,
        scope: Scope,
        reason: &str,
        by: &str,
        now_ms: i64,
        running: &[Candidate],
    ) -> Result<Vec<Candidate>, String> {
        check_reason(reason)?;
        let to_stop: Vec<Candidate> = running
            .iter()
            .filter(|c| scope.covers(&c.service, c.critical))
            .cloned()
            .collect();
        match &mut self.engaged {
            None => {
                self.engaged = Some(Engaged {
                    scope,
                    reason: reason.trim().to_string(),
                    by: by.to_string(),
                    since_ms: now_ms,
                    stopped: to_stop
                        .iter()
                        .map(|c| {
                            (
                                c.service.clone(),
                                Stopped {
                                    supervisor: c.supervisor.clone(),
                                    pids: c.pids.clone(),
                                },
                            )
                        })
                        .collect(),
                    released: BTreeSet::new(),
                    named: BTreeSet::new(),
                });
                Ok(to_stop)
            }
            Some(e) => match (&mut e.scope, scope) {
                (Scope::Services(have), Scope::Services(more)) => {
                    for m in &more {
                        e.released.remove(m);
                    }
                    have.extend(more);
                    for c in &to_stop {
                        e.stopped.entry(c.service.clone()).or_insert(Stopped {
                            supervisor: c.supervisor.clone(),
                            pids: c.pids.clone(),
                        });
                    }
                    Ok(to_stop)
                }
                // Widening to a broader scope is always allowed: an agent
                // that stopped itself must never keep the operator from
                // pulling the whole brake. What was stopped stays stopped.
                (have, wider @ (Scope::All | Scope::NonCritical))
                    if wider.wider_than(have) =>
                {
                    if let Scope::Services(names) = have {
                        // Still held: non-critical doesn't cover a
                        // critical service the operator named.
                        e.named.extend(names.iter().cloned());
                    }
                    *have = wider;
                    e.released.clear();
                    for c in &to_stop {
                        e.stopped.entry(c.service.clone()).or_insert(Stopped {
                            supervisor: c.supervisor.clone(),
                            pids: c.pids.clone(),
                        });
                    }
                    Ok(to_stop)
                }
                (have, _) => Err(format!(
                    "the kill switch is already engaged (scope {}, by {}): release it first, or engage a wider scope",
                    have.describe(),
                    e.by
                )),
            },
        }
    }

    /// Whether a new process of `service` must be killed at its exec.
    pub fn holds(&self, service: &str, critical: bool) -> bool {
        self.engaged.as_ref().is_some_and(|e| {
            (e.scope.covers(service, critical) || e.named.contains(service))
                && !e.released.contains(service)
        })
    }

    /// Records that the switch stopped `service` again (a blocked start):
    /// release brings it back too.
    pub fn stopped_again(&mut self, service: &str, supervisor: &Supervisor) {
        if let Some(e) = &mut self.engaged {
            if !matches!(supervisor, Supervisor::None) {
                e.stopped
                    .entry(service.to_string())
                    .or_insert_with(|| Stopped {
                        supervisor: supervisor.clone(),
                        pids: Vec::new(),
                    });
            }
        }
    }

    /// Releases some services only (`release --scope SERVICE…`): they are
    /// no longer held, and those the switch stopped are returned, to be
    /// restarted. The switch stays engaged for the rest; releasing the
    /// last service of a `Services` scope releases it all.
    pub fn release_some(
        &mut self,
        services: &BTreeSet<String>,
        reason: &str,
    ) -> Result<BTreeMap<String, Stopped>, String> {
        check_reason(reason)?;
        let e = self
            .engaged
            .as_mut()
            .ok_or_else(|| "the kill switch is not engaged".to_string())?;
        if let Some(bad) = services.iter().find(|s| {
            !e.stopped.contains_key(*s)
                && match &e.scope {
                    Scope::Services(have) => !have.contains(*s),
                    _ => false,
                }
        }) {
            return Err(format!(
                "{bad:?} is not held by the switch (scope {})",
                e.scope.describe()
            ));
        }
        let mut back = BTreeMap::new();
        for s in services {
            if let Some(st) = e.stopped.remove(s) {
                back.insert(s.clone(), st);
            }
            e.named.remove(s);
            match &mut e.scope {
                Scope::Services(have) => {
                    have.remove(s);
                }
                _ => {
                    e.released.insert(s.clone());
                }
            }
        }
        if matches!(&e.scope, Scope::Services(have) if have.is_empty()) {
            self.engaged = None;
        }
        Ok(back)
    }

    /// Releases the switch: what it stopped, to be restarted.
    pub fn release(&mut self, reason: &str) -> Result<Engaged, String> {
        check_reason(reason)?;
        self.engaged
            .take()
            .ok_or_else(|| "the kill switch is not engaged".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm2(name: &str, id: u32) -> Supervisor {
        Supervisor::Pm2 {
            name: name.into(),
            pm_id: Some(id),
            god_pid: 10,
            god_uid: 0,
            daemon_js: None,
        }
    }

    fn running() -> Vec<Candidate> {
        vec![
            Candidate {
                service: "bot".into(),
                critical: false,
                supervisor: pm2("bot", 0),
                pids: vec![20],
            },
            Candidate {
                service: "db".into(),
                critical: true,
                supervisor: pm2("db", 1),
                pids: vec![21],
            },
        ]
    }

    #[test]
    fn scopes_parse_and_cover() {
        let w = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(Scope::parse(&w(&["all"])), Ok(Scope::All));
        assert_eq!(Scope::parse(&w(&["non-critical"])), Ok(Scope::NonCritical));
        assert!(Scope::parse(&w(&[])).is_err());
        assert!(Scope::parse(&w(&["bot", "all"]))
            .unwrap_err()
            .contains("of its own"));
        let s = Scope::parse(&w(&["bot"])).unwrap();
        assert!(s.covers("bot", false) && !s.covers("db", false));
        assert!(!Scope::NonCritical.covers("db", true));
        assert!(Scope::All.covers("db", true));
    }

    #[test]
    fn engage_hold_release() {
        let mut k = KillSwitch::default();
        assert!(k
            .engage(Scope::NonCritical, " ", "root", 1, &running())
            .unwrap_err()
            .contains("reason"));
        let stop = k
            .engage(Scope::NonCritical, "runaway", "root", 1, &running())
            .unwrap();
        assert_eq!(stop.len(), 1);
        assert_eq!(stop[0].service, "bot");
        assert!(k.holds("bot", false));
        assert!(!k.holds("db", true));
        // Engaged already: a narrower scope is refused...
        let only_bot = Scope::Services(["bot".to_string()].into());
        assert!(k
            .engage(only_bot.clone(), "less", "root", 2, &running())
            .unwrap_err()
            .contains("already engaged"));
        // ...a wider one widens it (an agent's own brake never blocks the
        // operator's), keeping what was stopped.
        let stop = k.engage(Scope::All, "more", "root", 2, &running()).unwrap();
        assert!(stop.iter().any(|c| c.service == "db"));
        assert!(k.holds("db", true) && k.holds("bot", false));
        // A blocked start of a service it didn't stop is brought back too.
        k.stopped_again("late", &pm2("late", 5));
        let e = k.release("fixed").unwrap();
        assert_eq!(
            e.stopped.keys().cloned().collect::<Vec<_>>(),
            vec!["bot".to_string(), "db".to_string(), "late".to_string()]
        );
        assert!(!k.holds("bot", false));
        assert!(k.release("again").unwrap_err().contains("not engaged"));
    }

    #[test]
    fn only_a_person_releases() {
        let agent = Who::Supervised("pm2 app bot".into());
        assert!(may(&agent, Action::Engage).is_ok());
        assert!(may(&agent, Action::Release)
            .unwrap_err()
            .contains("login terminal"));
        assert!(may(&Who::Other("uid 1000".into()), Action::Engage).is_err());
        assert!(may(&Who::Human, Action::Release).is_ok());
    }

    #[test]
    fn never_held_processes() {
        assert_eq!(never_held(1, "/sbin/init", 99, false), Some("PID 1"));
        assert_eq!(
            never_held(99, "/usr/sbin/governor", 99, false),
            Some("governor itself")
        );
        assert!(never_held(5, "/usr/bin/node", 99, true).is_some());
        assert_eq!(never_held(6, "/usr/sbin/sshd", 99, false), Some("sshd"));
        assert_eq!(
            never_held(6, "/tmp/x/sshd", 99, false),
            None,
            "by path, not name"
        );
        assert_eq!(never_held(7, "/usr/bin/node", 99, false), None);
    }

    #[test]
    fn the_state_round_trips() {
        let mut k = KillSwitch::default();
        k.engage(
            Scope::Services(["bot".to_string()].into()),
            "r",
            "root",
            1,
            &running(),
        )
        .unwrap();
        let j = serde_json::to_string(&k).unwrap();
        let back: KillSwitch = serde_json::from_str(&j).unwrap();
        assert_eq!(back, k);
    }

    #[test]
    fn partial_release_brings_back_only_what_it_names() {
        let mut k = KillSwitch::default();
        let stop = k
            .engage(Scope::NonCritical, "runaway", "op", 1, &running())
            .unwrap();
        assert!(stop.iter().any(|c| c.service == "bot"));
        let names: BTreeSet<String> = ["bot".to_string()].into();
        let back = k.release_some(&names, "bot is fixed").unwrap();
        assert!(back.contains_key("bot"));
        assert!(!k.holds("bot", false), "released");
        assert!(k.engaged.is_some(), "still engaged for the rest");
        assert!(k.holds("other", false));
        // Not held: refused, naming why.
        let nope: BTreeSet<String> = ["nobody".to_string()].into();
        assert!(
            k.release_some(&nope, "x").is_ok(),
            "non-critical scope: any name"
        );
        // A Services scope: releasing its last name releases the switch.
        let mut k = KillSwitch::default();
        k.engage(Scope::Services(names.clone()), "r", "op", 1, &running())
            .unwrap();
        assert!(k.release_some(&nope, "x").unwrap_err().contains("not held"));
        k.release_some(&names, "done").unwrap();
        assert!(k.engaged.is_none());
        // Re-engaging a released name holds it again.
        let mut k = KillSwitch::default();
        let two: BTreeSet<String> = ["bot".to_string(), "db".to_string()].into();
        k.engage(Scope::Services(two), "r", "op", 1, &running())
            .unwrap();
        k.release_some(&names, "bot ok").unwrap();
        assert!(!k.holds("bot", false) && k.holds("db", true));
        k.engage(Scope::Services(names.clone()), "again", "op", 2, &running())
            .unwrap();
        assert!(k.holds("bot", false));
    }

    /// Found in review: widening `Services([a critical one])` to
    /// `non-critical` left the critical service stopped but no longer held
    /// (the wider scope doesn't cover critical services).
    #[test]
    fn widening_keeps_a_named_critical_service_held() {
        let mut k = KillSwitch::default();
        let cand = |s: &str, critical: bool| Candidate {
            service: s.into(),
            critical,
            supervisor: Supervisor::None,
            pids: vec![1],
        };
        let running = [cand("db", true), cand("bot", false)];
        let named: BTreeSet<String> = ["db".to_string()].into();
        k.engage(Scope::Services(named.clone()), "db first", "t", 0, &running)
            .unwrap();
        assert!(k.holds("db", true) && !k.holds("bot", false));
        k.engage(Scope::NonCritical, "everything", "t", 1, &running)
            .unwrap();
        assert!(k.holds("db", true), "the named critical one is still held");
        assert!(k.holds("bot", false));
        assert!(!k.holds("other-critical", true), "not named: not held");
        k.release_some(&named, "db back").unwrap();
        assert!(!k.holds("db", true));
        assert!(k.holds("bot", false));
    }
}
