//! Fixtures the core's unit tests share: exec records and a process
//! table with one service of each kind.

use crate::{
    events::Exec,
    identity::{Match, Matcher, Rule},
    table::ProcTable,
};

pub const DAEMON_JS: &str = "/usr/lib/node_modules/pm2/lib/Daemon.js";

pub fn exec(pid: u32, ppid: u32, uid: u32, exe: &str, argv: &[&str]) -> Exec {
    Exec {
        pid,
        ppid,
        uid,
        ts_ns: 1,
        start_ns: pid as u64,
        comm: "x".into(),
        filename: exe.into(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        argv_truncated: false,
    }
}

pub fn table() -> ProcTable {
    ProcTable::new(
        Matcher::new(vec![
            Rule {
                name: "lily".into(),
                matcher: Match::Pm2 {
                    app: "lily".into(),
                    owner: Some(0),
                },
            },
            Rule {
                name: "ssh".into(),
                matcher: Match::Unit("ssh.service".into()),
            },
            Rule {
                name: "worker".into(),
                matcher: Match::Exe {
                    path: "/usr/local/bin/worker".into(),
                    uid: Some(0),
                    args: None,
                },
            },
        ]),
        |u| format!("u{u}"),
    )
}
