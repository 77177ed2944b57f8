//! uid ↔ user name, from `/etc/passwd` (a root-owned file, so names are as
//! trustworthy as uids). Cached: the table names every process of another
//! user, and the file changes only when an administrator adds a user.

use std::{
    collections::HashMap,
    sync::{Mutex, OnceLock},
};

fn entries() -> Vec<(String, u32)> {
    std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let uid = f.nth(1)?.parse().ok()?;
            Some((name.to_string(), uid))
        })
        .collect()
}

fn cache() -> &'static Mutex<HashMap<u32, String>> {
    static C: OnceLock<Mutex<HashMap<u32, String>>> = OnceLock::new();
    C.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The user name of `uid`, or the number when `/etc/passwd` has none.
pub fn name_of(uid: u32) -> String {
    if let Ok(c) = cache().lock() {
        if let Some(n) = c.get(&uid) {
            return n.clone();
        }
    }
    let name = entries()
        .into_iter()
        .find(|(_, u)| *u == uid)
        .map(|(n, _)| n)
        .unwrap_or_else(|| uid.to_string());
    // Bounded: one entry per distinct uid seen; a uid space flood is
    // capped so nobody grows the daemon through it.
    if let Ok(mut c) = cache().lock() {
        if c.len() < 4096 {
            c.insert(uid, name.clone());
        }
    }
    name
}

/// The uid of a user given by name or number; `None` when unknown.
pub fn uid_of(user: &str) -> Option<u32> {
    if let Ok(n) = user.parse::<u32>() {
        return Some(n);
    }
    entries()
        .into_iter()
        .find(|(n, _)| n == user)
        .map(|(_, u)| u)
}

/// The gid of a group given by name or number (`/etc/group`, root-owned);
/// `None` when unknown.
pub fn gid_of(group: &str) -> Option<u32> {
    if let Ok(n) = group.parse::<u32>() {
        return Some(n);
    }
    std::fs::read_to_string("/etc/group")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let mut f = l.split(':');
            (f.next()? == group).then(|| f.nth(1)?.parse().ok())?
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_both_ways() {
        assert_eq!(uid_of("root"), Some(0));
        assert_eq!(name_of(0), "root");
        assert_eq!(uid_of("4242"), Some(4242));
        assert_eq!(uid_of("no-such-user-here"), None);
        assert_eq!(gid_of("root"), Some(0));
        assert_eq!(gid_of("no-such-group-here"), None);
    }
}
