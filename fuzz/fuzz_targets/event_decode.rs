//! Kernel ring-buffer records, decoded as the daemon decodes them: the
//! input is one record's bytes.
//!
//! - Lifecycle (`EVENTS` ring): `governor::events::decode`, then what the
//!   daemon and `governor watch` do with an event (the process table, the
//!   human and JSON lines).
//! - Protected-file attempts (`PROTECT_EVENTS` ring): when the input is at
//!   least `size_of::<AttemptEvent>()` bytes it is read into one with
//!   `read_unaligned`, exactly as `protect::kernel` does, and decoded with
//!   `protect::attempt::decode` plus the fields the audit entry shows.
//!
//! A record may be anything (a kernel bug, a future layout): an error or
//! `None` is fine, a panic is not.
#![no_main]

use std::{collections::HashMap, path::PathBuf};

use governor::{
    events::{self, Clock, Event},
    protect::{
        abi::AttemptEvent,
        attempt::{self, key_string},
        kernel, InodeKey,
    },
    watch,
};
use governor_core::table::ProcTable;
use libfuzzer_sys::fuzz_target;

fn lifecycle(data: &[u8]) {
    let Ok(ev) = events::decode(data) else {
        return;
    };
    let clock = Clock::new();
    let mut table = ProcTable::default();
    let _ = watch::event_line(&ev, "svc", &clock);
    let _ = watch::event_json(&ev, &table, "svc", &clock).map(|v| v.to_string());
    match &ev {
        Event::Exec(e) => {
            assert!(
                e.argv.iter().all(|a| !a.contains('\0')),
                "NUL inside an argv item"
            );
            let _ = table.apply_exec(e, None, &mut |_| None);
            let _ = table.resolve_unknown(e.uid, &e.comm);
        }
        Event::Fork(f) => table.on_fork(f),
        Event::Exit(e) => {
            let _ = e.uptime();
            let _ = e.is_clean();
            let _ = table.on_exit(e);
            let _ = table.resolve_unknown(e.uid, &e.comm);
        }
    }
    let _ = table.take_supervisor_changes();
}

/// `protect::kernel`'s own (private) decode: the record's bytes as an
/// `AttemptEvent` when there are enough of them.
fn read_attempt(bytes: &[u8]) -> Option<AttemptEvent> {
    if bytes.len() < std::mem::size_of::<AttemptEvent>() {
        return None;
    }
    // SAFETY: AttemptEvent is #[repr(C)] integers and byte arrays (any bit
    // pattern is a value), the length was checked, and read_unaligned needs
    // no alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<AttemptEvent>()) })
}

fn protect_attempt(data: &[u8]) {
    let Some(ev) = read_attempt(data) else {
        return;
    };
    // As `Protector::on_event`: the syscall's spec and name by number.
    let spec = kernel::spec_of(ev.nr);
    let names = kernel::syscall_names();
    let name = names.get(&ev.nr).copied().unwrap_or("?");
    // The index of directories on the way to protected files.
    let mut dirs: HashMap<InodeKey, PathBuf> = HashMap::new();
    dirs.insert(ev.base0, PathBuf::from("/etc"));
    let Some(a) = attempt::decode(
        &ev,
        name,
        spec.map(|s| s.kind).unwrap_or(0),
        spec.map(|s| s.nofollow).unwrap_or(false),
        &dirs,
    ) else {
        return;
    };
    // What the audit entry and the alert show.
    let _ = a.op.name();
    let _ = a.allowed();
    let _ = a.errno_name();
    let _ = a.key.map(|k| key_string(&k));
    let _ = format!("{:#o} {:#x} {:#x}", a.flags, a.flags, a.arg);
    for p in &a.paths {
        if let Some(abs) = &p.absolute {
            assert!(
                abs.is_absolute(),
                "a resolved path that is not absolute: {abs:?}"
            );
            let _ = attempt::normalize(abs);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    lifecycle(data);
    protect_attempt(data);
});
