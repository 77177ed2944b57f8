//! The audit chain's readers and its crash recovery, on damaged logs.
//!
//! The whole input is first one line for `Entry::parse_line` (and `SEQ:HASH`
//! for `Head`); a line that parses must round-trip through `to_line` with
//! the same hash. Then the input becomes a log directory:
//!
//! ```text
//! <audit.jsonl.1> \0ROT\0 <audit.jsonl.2> … \0ROT\0 <audit.jsonl> [\0HEAD\0 <audit.head>]
//! ```
//!
//! and goes through `verify`, `tail`, `AuditLog::open` (torn-tail repair,
//! truncation check against the head file), one append, and `verify` again.
//! Errors are fine; panics are not, and neither is a chain that verified
//! before open but not after it (open must only ever set bytes aside and
//! append).
#![no_main]

use std::{fs, path::Path, str::FromStr};

use governor_audit::{AuditLog, Detail, Entry, Head, Options};
use libfuzzer_sys::fuzz_target;

const ROT: &[u8] = b"\0ROT\0";
const HEAD: &[u8] = b"\0HEAD\0";
/// Rotated files at most (more adds nothing but time).
const MAX_ROTATED: usize = 4;

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn split_all<'a>(mut s: &'a [u8], sep: &[u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    while let Some(i) = find(s, sep) {
        out.push(&s[..i]);
        s = &s[i + sep.len()..];
    }
    out.push(s);
    out
}

fn one_line(data: &[u8]) {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(h) = Head::from_str(s) {
            let again = Head::from_str(&h.to_string()).expect("a parsed head's text parses");
            assert_eq!(again, h, "head changed in a round trip");
        }
    }
    let Ok(e) = Entry::parse_line(data) else {
        return;
    };
    let hash = e.compute_hash();
    let line = e.to_line();
    let back = Entry::parse_line(line.as_bytes())
        .unwrap_or_else(|err| panic!("to_line of a parsed entry does not parse ({err}): {line}"));
    assert_eq!(back, e, "entry changed in a round trip through to_line");
    assert_eq!(back.compute_hash(), hash, "hash changed in a round trip");
    let _ = e.to_string();
    let _ = governor_audit::time::parse_rfc3339(&e.ts);
    let _ = governor_audit::validate_kind(&e.kind);
}

fn scratch_dir() -> tempfile::TempDir {
    // tmpfs where there is one: open and append fsync.
    let shm = Path::new("/dev/shm");
    let b = tempfile::Builder::new()
        .prefix("governor-fuzz-audit-")
        .tempdir_in(shm);
    b.or_else(|_| tempfile::tempdir())
        .expect("a scratch directory for the log")
}

fn log_dir(data: &[u8]) {
    let (files, head) = match find(data, HEAD) {
        Some(i) => (&data[..i], Some(&data[i + HEAD.len()..])),
        None => (data, None),
    };
    let mut parts = split_all(files, ROT);
    if parts.len() > MAX_ROTATED + 1 {
        return;
    }
    let live = parts.pop().unwrap_or_default();
    let dir = scratch_dir();
    let state = dir.path();
    let log = state.join("audit.jsonl");
    for (i, p) in parts.iter().enumerate() {
        fs::write(state.join(format!("audit.jsonl.{}", i + 1)), p).expect("writing a rotated file");
    }
    fs::write(&log, live).expect("writing the live file");
    if let Some(h) = head {
        fs::write(state.join("audit.head"), h).expect("writing the head file");
    }

    let before = governor_audit::verify(&log, None);
    if let Ok(ok) = &before {
        // The head verify reports is one verify accepts as expected.
        governor_audit::verify(&log, Some(&ok.head))
            .unwrap_or_else(|e| panic!("chain fails against its own head {}: {e}", ok.head));
        let _ = ok.to_string();
    } else if let Err(e) = &before {
        let _ = e.to_string();
    }
    let mut seen = 0u64;
    let walked = governor_audit::for_each_entry(&log, |_| seen += 1);
    if let Ok(ok) = &before {
        assert_eq!(
            walked.as_ref().ok(),
            Some(ok),
            "for_each_entry and verify disagree"
        );
        assert_eq!(seen, ok.entries, "for_each_entry skipped entries");
    }
    let _ = governor_audit::tail(&log, 3);
    let _ = governor_audit::end_offset(&log);
    let _ = governor_audit::read_head_file(state);

    let opts = Options {
        rotate_bytes: None,
        append_only: false,
    };
    let opened = AuditLog::open(state, opts);
    let (mut writer, report) = match opened {
        Ok(x) => x,
        Err(e) => {
            if let Ok(ok) = &before {
                panic!("a chain that verifies ({ok}) does not open: {e:#}");
            }
            return;
        }
    };
    let _ = report.to_string();
    assert_eq!(
        report.head,
        writer.head(),
        "open's report and writer disagree"
    );
    let Ok(ok) = before else {
        // A damaged chain may open (open reads only the tail); appending
        // to it must not panic either.
        let _ = writer.append("fuzz.check", None, Detail::new());
        return;
    };
    let after = governor_audit::verify(&log, None).unwrap_or_else(|e| {
        panic!("a chain that verified ({ok}) no longer does after open ({report}): {e}")
    });
    assert!(
        after.entries >= ok.entries,
        "open lost entries: {} before, {} after ({report})",
        ok.entries,
        after.entries
    );
    assert_eq!(
        after.torn_tail_bytes, None,
        "open left a torn tail ({report})"
    );
    assert_eq!(
        Some(after.head.clone()),
        writer.head().or(Some(Head::genesis())),
        "verify's head is not the writer's"
    );
    if writer
        .append("fuzz.check", Some("svc"), Detail::new())
        .is_ok()
    {
        let again = governor_audit::verify(&log, None)
            .unwrap_or_else(|e| panic!("the chain breaks at the first append after open: {e}"));
        assert_eq!(
            again.entries,
            after.entries + 1,
            "the append is not in the chain"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    one_line(data);
    log_dir(data);
});
