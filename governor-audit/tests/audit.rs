//! End-to-end tests on real files in temporary directories (ext4 /tmp on CI,
//! run as root so the append-only attribute can be exercised).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use governor_audit::flags::{is_append_only, set_append_only};
use governor_audit::{
    follow_with_interval, for_each_entry, read_head_file, spawn_writer, tail, verify,
    AppendOnlyState, AuditLog, Detail, Entry, Head, Options, VerifyError, VerifyReason,
    KIND_FOREIGN_BYTES, KIND_TORN_TAIL, KIND_TRUNCATION,
};
use serde_json::{json, Value};

/// A temp dir whose files get their append-only flag cleared before removal
/// (otherwise not even root could delete them).
struct Dir(tempfile::TempDir);

impl Dir {
    fn new() -> Dir {
        Dir(tempfile::tempdir().expect("tempdir"))
    }
    fn path(&self) -> &Path {
        self.0.path()
    }
    fn log(&self) -> PathBuf {
        self.path().join("audit.jsonl")
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        clear_flags(self.path());
    }
}

fn clear_flags(dir: &Path) {
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        if let Ok(f) = File::open(e.path()) {
            let _ = set_append_only(&f, false);
        }
    }
}

fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (CAP_LINUX_IMMUTABLE) to exercise FS_APPEND_FL; run the tests as root"
    );
}

fn opts(rotate_bytes: Option<u64>, append_only: bool) -> Options {
    Options {
        rotate_bytes,
        append_only,
    }
}

fn obj(v: Value) -> Detail {
    match v {
        Value::Object(m) => m,
        other => panic!("not an object: {other}"),
    }
}

/// Writes `n` entries with detail {"n": i, "msg": "hello", "z": .., "a": ..}.
fn write_entries(dir: &Path, o: Options, n: u64) -> Vec<Head> {
    let (mut log, _) = AuditLog::open(dir, o).expect("open");
    (1..=n)
        .map(|i| {
            log.append(
                "test.entry",
                if i % 2 == 0 { Some("bot") } else { None },
                obj(json!({"n": i, "msg": "hello", "z": [1, {"b": 2, "a": 1}], "a": true})),
            )
            .expect("append")
        })
        .collect()
}

fn read_lines(p: &Path) -> Vec<String> {
    fs::read_to_string(p)
        .expect("read")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Rewrites a log file (clearing FS_APPEND_FL if set), the way an attacker with
/// root would.
fn rewrite(p: &Path, f: impl FnOnce(&mut Vec<String>)) {
    if let Ok(file) = File::open(p) {
        let _ = set_append_only(&file, false);
    }
    let mut lines = read_lines(p);
    f(&mut lines);
    let mut text = lines.join("\n");
    if !lines.is_empty() {
        text.push('\n');
    }
    fs::write(p, text).expect("rewrite");
}

fn expect_err(log: &Path, head: Option<&Head>) -> VerifyError {
    match verify(log, head) {
        Ok(ok) => panic!("tampering not detected: {ok}"),
        Err(e) => e,
    }
}

// ---------------------------------------------------------------- format ---

#[test]
fn lines_have_the_documented_shape() {
    let d = Dir::new();
    let heads = write_entries(d.path(), opts(None, false), 3);
    let lines = read_lines(&d.log());
    assert_eq!(lines.len(), 3);
    let first = &lines[0];
    let keys = [
        "\"seq\":1,",
        "\"ts\":\"",
        "\"kind\":\"test.entry\",",
        "\"service\":null,",
        "\"detail\":{",
        "\"prev\":\"",
        "\"hash\":\"",
    ];
    let mut pos = 0;
    for k in keys {
        let at = first[pos..]
            .find(k)
            .unwrap_or_else(|| panic!("{k} not after {pos} in {first}"));
        pos += at + k.len();
    }
    assert!(first.starts_with("{\"seq\":1,\"ts\":\""), "{first}");
    assert!(first.contains(&format!("\"prev\":\"{}\"", "0".repeat(64))));
    assert!(lines[1].contains("\"service\":\"bot\""));
    let e = Entry::parse_line(lines[2].as_bytes()).unwrap();
    assert_eq!(e.seq, 3);
    assert_eq!(e.prev, heads[1].hash);
    assert!(
        governor_audit::time::parse_rfc3339(&e.ts).is_some(),
        "{}",
        e.ts
    );
    assert!(e.ts.ends_with('Z'));
    let ok = verify(&d.log(), Some(&heads[2])).unwrap();
    assert_eq!(ok.entries, 3);
    assert_eq!(
        ok.to_string(),
        format!("ok: 3 entries, head 3:{}", heads[2].hash)
    );
    assert_eq!(read_head_file(d.path()).unwrap(), Some(heads[2].clone()));
    assert_eq!(
        format!("{e}"),
        format!(
            "#3 {} test.entry - {}",
            e.ts, r#"{"a":true,"msg":"hello","n":3,"z":[1,{"a":1,"b":2}]}"#
        )
    );
}

#[test]
fn bad_kind_and_detail_are_rejected_without_writing() {
    let d = Dir::new();
    let (mut log, _) = AuditLog::open(d.path(), opts(None, false)).unwrap();
    for kind in ["", "Upper", "has space", "slash/x"] {
        let err = log.append(kind, None, Detail::new()).unwrap_err();
        assert!(err.to_string().contains("kind"), "{err}");
    }
    assert!(log.append("ok", Some(""), Detail::new()).is_err());
    let big = obj(json!({"blob": "x".repeat(2 << 20)}));
    assert!(log
        .append("big", None, big)
        .unwrap_err()
        .to_string()
        .contains("at most"));
    assert_eq!(log.head(), None);
    assert_eq!(fs::metadata(d.log()).unwrap().len(), 0);
    assert_eq!(log.append("ok", None, Detail::new()).unwrap().seq, 1);
}

#[test]
fn second_writer_is_refused() {
    let d = Dir::new();
    let (_log, _) = AuditLog::open(d.path(), opts(None, false)).unwrap();
    let err = AuditLog::open(d.path(), opts(None, false)).unwrap_err();
    assert!(
        format!("{err:#}").contains("another audit writer"),
        "{err:#}"
    );
}

// ------------------------------------------------------------- tampering ---

#[test]
fn edited_byte_in_a_middle_entry_is_a_hash_mismatch() {
    let d = Dir::new();
    write_entries(d.path(), opts(None, false), 20);
    rewrite(&d.log(), |l| {
        assert!(l[9].contains("\"hello\""));
        l[9] = l[9].replacen("\"hello\"", "\"hellp\"", 1);
    });
    let e = expect_err(&d.log(), None);
    assert_eq!((e.line, e.seq), (10, Some(10)), "{e}");
    assert!(matches!(e.reason, VerifyReason::HashMismatch { .. }), "{e}");
    let s = e.to_string();
    assert!(
        s.starts_with("audit.jsonl:10: entry seq 10: hash mismatch (stored "),
        "{s}"
    );
    assert!(s.contains(", computed "), "{s}");
}

#[test]
fn deleted_middle_line_is_a_seq_gap() {
    let d = Dir::new();
    write_entries(d.path(), opts(None, false), 20);
    rewrite(&d.log(), |l| {
        l.remove(9);
    });
    let e = expect_err(&d.log(), None);
    assert_eq!((e.line, e.seq), (10, Some(11)), "{e}");
    assert_eq!(
        e.reason,
        VerifyReason::SeqGap {
            expected: 10,
            got: 11
        }
    );
    assert_eq!(
        e.to_string(),
        "audit.jsonl:10: entry seq 11: seq gap (expected 10, got 11)"
    );
}

#[test]
fn swapped_lines_are_caught_at_the_first() {
    let d = Dir::new();
    write_entries(d.path(), opts(None, false), 20);
    rewrite(&d.log(), |l| l.swap(9, 10));
    let e = expect_err(&d.log(), None);
    assert_eq!((e.line, e.seq), (10, Some(11)), "{e}");
    assert_eq!(
        e.reason,
        VerifyReason::SeqGap {
            expected: 10,
            got: 11
        }
    );
}

#[test]
fn forged_entry_with_valid_hash_but_wrong_prev_is_a_broken_link() {
    let d = Dir::new();
    write_entries(d.path(), opts(None, false), 20);
    let forged = Entry::chained(
        &Head {
            seq: 20,
            hash: "ab".repeat(32),
        },
        "2026-01-01T00:00:00.000Z".into(),
        "kill-switch.release",
        None,
        Detail::new(),
    )
    .unwrap();
    assert_eq!(forged.compute_hash(), forged.hash);
    let mut f = OpenOptions::new().append(true).open(d.log()).unwrap();
    writeln!(f, "{}", forged.to_line()).unwrap();
    let e = expect_err(&d.log(), None);
    assert_eq!((e.line, e.seq), (21, Some(21)), "{e}");
    assert!(matches!(e.reason, VerifyReason::BrokenLink { .. }), "{e}");
    assert!(
        e.to_string()
            .starts_with("audit.jsonl:21: entry seq 21: broken link"),
        "{e}"
    );
}

#[test]
fn truncated_tail_is_caught_only_with_the_expected_head() {
    let d = Dir::new();
    let heads = write_entries(d.path(), opts(None, false), 20);
    rewrite(&d.log(), |l| l.truncate(17));
    let ok = verify(&d.log(), None).expect("a shorter chain is still a chain");
    assert_eq!(ok.entries, 17);
    let e = expect_err(&d.log(), Some(&heads[19]));
    assert_eq!((e.line, e.seq), (18, Some(18)), "{e}");
    assert!(
        matches!(e.reason, VerifyReason::HeadNotReached { .. }),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("head not reached: log ends at seq 17"),
        "{e}"
    );
    // Passing an older head is fine.
    assert!(verify(&d.log(), Some(&heads[10])).is_ok());
}

#[test]
fn rewritten_end_is_caught_with_the_expected_head() {
    let d = Dir::new();
    let heads = write_entries(d.path(), opts(None, false), 20);
    rewrite(&d.log(), |l| l.truncate(17));
    // Re-extend the chain with correctly chained forgeries.
    let mut prev = heads[16].clone();
    let mut f = OpenOptions::new().append(true).open(d.log()).unwrap();
    for _ in 0..3 {
        let e = Entry::chained(
            &prev,
            "2026-01-01T00:00:00.000Z".into(),
            "forged",
            None,
            Detail::new(),
        )
        .unwrap();
        writeln!(f, "{}", e.to_line()).unwrap();
        prev = e.head();
    }
    assert_eq!(verify(&d.log(), None).unwrap().entries, 20);
    let e = expect_err(&d.log(), Some(&heads[19]));
    assert_eq!((e.line, e.seq), (20, Some(20)), "{e}");
    assert!(matches!(e.reason, VerifyReason::HeadMismatch { .. }), "{e}");
}

#[test]
fn bad_json_and_missing_fields_are_named() {
    let d = Dir::new();
    write_entries(d.path(), opts(None, false), 10);
    let good = read_lines(&d.log());

    rewrite(&d.log(), |l| l[4] = "{\"seq\":5,\"ts\":".into());
    let e = expect_err(&d.log(), None);
    assert_eq!((e.line, e.seq), (5, None), "{e}");
    assert!(matches!(e.reason, VerifyReason::BadJson(_)), "{e}");
    assert!(
        e.to_string()
            .starts_with("audit.jsonl:5: bad JSON: EOF while parsing"),
        "{e}"
    );

    let ts_field = |l: &str| {
        let e = Entry::parse_line(l.as_bytes()).unwrap();
        format!("\"ts\":\"{}\",", e.ts)
    };
    rewrite(&d.log(), |l| {
        *l = good.clone();
        let f = ts_field(&l[6]);
        l[6] = l[6].replace(&f, "");
    });
    let e = expect_err(&d.log(), None);
    assert_eq!((e.line, e.seq), (7, Some(7)), "{e}");
    assert_eq!(e.reason, VerifyReason::MissingField("ts".into()));
    assert_eq!(
        e.to_string(),
        "audit.jsonl:7: entry seq 7: missing field `ts`"
    );

    rewrite(&d.log(), |l| {
        *l = good.clone();
        l[2] = l[2].replacen('{', "{\"note\":\"hi\",", 1);
    });
    let e = expect_err(&d.log(), None);
    assert_eq!((e.line, e.seq), (3, Some(3)), "{e}");
    assert_eq!(e.reason, VerifyReason::UnexpectedField("note".into()));

    rewrite(&d.log(), |l| {
        *l = good.clone();
        l.insert(3, String::new());
    });
    let e = expect_err(&d.log(), None);
    assert_eq!(e.line, 4, "{e}");
    assert!(matches!(e.reason, VerifyReason::BadJson(_)), "{e}");
}

#[test]
fn detail_key_order_does_not_matter() {
    let d = Dir::new();
    write_entries(d.path(), opts(None, false), 5);
    rewrite(&d.log(), |l| {
        let old = "{\"a\":true,\"msg\":\"hello\",\"n\":4,\"z\":[1,{\"a\":1,\"b\":2}]}";
        assert!(l[3].contains(old), "{}", l[3]);
        l[3] = l[3].replace(
            old,
            "{ \"z\" : [1, {\"b\":2,\"a\":1}], \"n\":4, \"msg\":\"hello\", \"a\":true }",
        );
    });
    assert_eq!(verify(&d.log(), None).unwrap().entries, 5);
}

#[test]
fn missing_log_is_an_error() {
    let d = Dir::new();
    let e = expect_err(&d.log(), None);
    assert!(matches!(e.reason, VerifyReason::Io(_)), "{e}");
    assert!(e.to_string().starts_with("audit.jsonl: "), "{e}");
}

// -------------------------------------------------------------- torn tail ---

#[test]
fn torn_tail_is_set_aside_and_recorded() {
    require_root();
    let d = Dir::new();
    write_entries(d.path(), opts(None, true), 5);
    let partial = b"{\"seq\":6,\"ts\":\"2026-01-0";
    {
        // O_APPEND writes are what the append-only flag still allows.
        let mut f = OpenOptions::new().append(true).open(d.log()).unwrap();
        f.write_all(partial).unwrap();
    }
    let ok = verify(&d.log(), None).unwrap();
    assert_eq!(
        (ok.entries, ok.torn_tail_bytes),
        (5, Some(partial.len() as u64))
    );

    let (mut log, report) = AuditLog::open(d.path(), opts(None, true)).unwrap();
    let torn = report.torn_tail.clone().expect("torn tail reported");
    assert_eq!(torn.bytes, partial.len() as u64);
    assert!(
        torn.reason.contains("no trailing newline"),
        "{}",
        torn.reason
    );
    assert_eq!(fs::read(&torn.saved_to).unwrap(), partial);
    assert!(torn
        .saved_to
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("audit.jsonl.torn-"));
    assert_eq!(report.entries, 6);
    assert_eq!(report.truncation, None);
    assert_eq!(report.append_only, AppendOnlyState::Set);
    assert!(report.to_string().contains("TORN TAIL"), "{report}");

    let last = tail(&d.log(), 1).unwrap().pop().unwrap();
    assert_eq!((last.seq, last.kind.as_str()), (6, KIND_TORN_TAIL));
    assert_eq!(last.detail["bytes"], json!(partial.len()));
    assert_eq!(
        last.detail["saved_to"],
        json!(torn.saved_to.display().to_string())
    );
    assert_eq!(
        log.append("after.torn", None, Detail::new()).unwrap().seq,
        7
    );
    let ok = verify(&d.log(), Some(&log.head().unwrap())).unwrap();
    assert_eq!((ok.entries, ok.torn_tail_bytes), (7, None));
    drop(log);

    // An unparsable last line *with* a newline is set aside too.
    {
        let mut f = OpenOptions::new().append(true).open(d.log()).unwrap();
        f.write_all(b"garbage\n").unwrap();
    }
    let (_log, report) = AuditLog::open(d.path(), opts(None, true)).unwrap();
    let torn = report.torn_tail.expect("unparsable last line reported");
    assert_eq!(torn.bytes, 8);
    assert!(
        torn.reason.contains("unparsable last line"),
        "{}",
        torn.reason
    );
    assert_eq!(fs::read(&torn.saved_to).unwrap(), b"garbage\n");
    assert_eq!(verify(&d.log(), None).unwrap().entries, 8);
}

#[test]
fn set_asides_interrupted_by_a_crash_are_finished_at_open() {
    let d = Dir::new();
    write_entries(d.path(), opts(None, false), 3);
    // 1. Bytes already cut from the log, copy left pending, no entry yet.
    let pending = d.path().join("audit.jsonl.torn-100.pending");
    fs::write(&pending, b"{\"seq\":4,").unwrap();
    let (log, report) = AuditLog::open(d.path(), opts(None, false)).unwrap();
    assert_eq!(report.torn_tail, None);
    assert_eq!(report.interrupted_set_asides.len(), 1, "{report}");
    let saved = d.path().join("audit.jsonl.torn-100");
    assert_eq!(report.interrupted_set_asides[0].saved_to, saved);
    assert_eq!(fs::read(&saved).unwrap(), b"{\"seq\":4,");
    assert!(!pending.exists());
    assert_eq!(report.entries, 4);
    let last = tail(&d.log(), 1).unwrap().pop().unwrap();
    assert_eq!(last.kind, KIND_TORN_TAIL);
    assert_eq!(last.detail["saved_to"], json!(saved.display().to_string()));
    drop(log);

    // 2. Entry written but the rename did not happen: only the rename is redone.
    fs::rename(&saved, &pending).unwrap();
    let (log, report) = AuditLog::open(d.path(), opts(None, false)).unwrap();
    assert_eq!(report.interrupted_set_asides.len(), 1);
    assert_eq!(report.entries, 4, "no second record");
    assert!(saved.exists() && !pending.exists());
    drop(log);

    // 3. Copy made but the log not cut yet: the copy is dropped and the
    //    ordinary torn-tail repair does the job once.
    OpenOptions::new()
        .append(true)
        .open(d.log())
        .unwrap()
        .write_all(b"{\"half")
        .unwrap();
    let pending2 = d.path().join("audit.jsonl.torn-200.pending");
    fs::write(&pending2, b"{\"half").unwrap();
    let (_log, report) = AuditLog::open(d.path(), opts(None, false)).unwrap();
    assert!(report.interrupted_set_asides.is_empty());
    let torn = report.torn_tail.expect("torn tail");
    assert_eq!(fs::read(&torn.saved_to).unwrap(), b"{\"half");
    assert!(!pending2.exists() && !d.path().join("audit.jsonl.torn-200").exists());
    assert_eq!(report.entries, 5);
    assert_eq!(verify(&d.log(), None).unwrap().entries, 5);
}

// ------------------------------------------------------------- truncation ---

#[test]
fn truncation_is_detected_at_open_and_recorded() {
    let d = Dir::new();
    let heads = write_entries(d.path(), opts(None, false), 10);
    rewrite(&d.log(), |l| l.truncate(7));
    let (log, report) = AuditLog::open(d.path(), opts(None, false)).unwrap();
    let t = report.truncation.clone().expect("truncation reported");
    assert!(t.contains("ends at seq 7") && t.contains("8..=10"), "{t}");
    assert!(
        report.to_string().contains("TRUNCATION DETECTED"),
        "{report}"
    );
    assert_eq!(report.entries, 8);
    let last = tail(&d.log(), 1).unwrap().pop().unwrap();
    assert_eq!((last.seq, last.kind.as_str()), (8, KIND_TRUNCATION));
    assert_eq!(last.detail["expected_head"], json!(heads[9].to_string()));
    assert_eq!(last.detail["found_head"], json!(heads[6].to_string()));
    assert!(verify(&d.log(), None).is_ok());
    assert!(verify(&d.log(), Some(&heads[9])).is_err());
    drop(log);
    // Reported once: the head file now matches the log.
    let (_log, report) = AuditLog::open(d.path(), opts(None, false)).unwrap();
    assert_eq!((report.truncation, report.head_file_problem), (None, None));
}

#[test]
fn head_file_lag_is_tolerated_but_disagreement_is_not() {
    let d = Dir::new();
    let heads = write_entries(d.path(), opts(None, false), 6);
    let head_file = d.path().join("audit.head");
    // A crash between the log fsync and the head-file rename leaves it behind.
    fs::write(&head_file, format!("{}\n", heads[4])).unwrap();
    let (log, report) = AuditLog::open(d.path(), opts(None, false)).unwrap();
    assert_eq!((report.truncation, report.head_file_problem), (None, None));
    assert_eq!(report.entries, 6);
    drop(log);
    assert_eq!(read_head_file(d.path()).unwrap(), Some(heads[5].clone()));

    fs::write(&head_file, format!("3:{}\n", "cd".repeat(32))).unwrap();
    let (log, report) = AuditLog::open(d.path(), opts(None, false)).unwrap();
    let t = report.truncation.expect("disagreement reported");
    assert!(t.contains("entry seq 3") && t.contains("rewritten"), "{t}");
    assert_eq!(report.entries, 7);
    drop(log);

    fs::remove_file(&head_file).unwrap();
    let (log, report) = AuditLog::open(d.path(), opts(None, false)).unwrap();
    assert!(report
        .head_file_problem
        .expect("missing head file reported")
        .contains("missing"));
    drop(log);
    assert!(read_head_file(d.path()).unwrap().is_some());

    fs::write(&head_file, "nonsense").unwrap();
    assert!(read_head_file(d.path()).is_err());
    let (_log, report) = AuditLog::open(d.path(), opts(None, false)).unwrap();
    assert!(report
        .head_file_problem
        .expect("bad head file reported")
        .contains("unreadable"));
}

#[test]
fn deleted_log_is_detected_through_the_head_file() {
    let d = Dir::new();
    write_entries(d.path(), opts(None, false), 4);
    fs::remove_file(d.log()).unwrap();
    let (_log, report) = AuditLog::open(d.path(), opts(None, false)).unwrap();
    assert!(report
        .truncation
        .expect("reported")
        .contains("ends at seq 0"));
    let first = tail(&d.log(), 5).unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!((first[0].seq, first[0].kind.as_str()), (1, KIND_TRUNCATION));
}

#[test]
fn bytes_written_behind_the_writers_back_are_set_aside() {
    let d = Dir::new();
    let (mut log, _) = AuditLog::open(d.path(), opts(None, false)).unwrap();
    let h2 = {
        log.append("one", None, Detail::new()).unwrap();
        log.append("two", None, Detail::new()).unwrap()
    };
    // Another process appends a (well-formed, correctly chained) forgery and
    // a partial line.
    let forged = Entry::chained(
        &h2,
        "2026-01-01T00:00:00.000Z".into(),
        "forged",
        None,
        Detail::new(),
    )
    .unwrap();
    let foreign = format!("{}\n{{\"seq\":", forged.to_line());
    OpenOptions::new()
        .append(true)
        .open(d.log())
        .unwrap()
        .write_all(foreign.as_bytes())
        .unwrap();
    let h = log.append("three", None, Detail::new()).unwrap();
    assert_eq!(h.seq, 4, "the foreign-bytes record comes first");
    let entries = tail(&d.log(), 10).unwrap();
    let kinds: Vec<_> = entries.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(kinds, ["one", "two", KIND_FOREIGN_BYTES, "three"]);
    let saved = PathBuf::from(entries[2].detail["saved_to"].as_str().unwrap());
    assert_eq!(fs::read_to_string(saved).unwrap(), foreign);
    assert_eq!(verify(&d.log(), Some(&h)).unwrap().entries, 4);
}

#[test]
fn log_cut_while_open_leaves_a_visible_break() {
    let d = Dir::new();
    let (mut log, _) = AuditLog::open(d.path(), opts(None, false)).unwrap();
    for i in 0..6 {
        log.append("e", None, obj(json!({"i": i}))).unwrap();
    }
    rewrite(&d.log(), |l| l.truncate(4));
    let h = log.append("after.cut", None, Detail::new()).unwrap();
    assert_eq!(h.seq, 8);
    let entries = tail(&d.log(), 2).unwrap();
    assert_eq!(
        (entries[0].seq, entries[0].kind.as_str()),
        (7, KIND_TRUNCATION)
    );
    let e = expect_err(&d.log(), None);
    assert_eq!((e.line, e.seq), (5, Some(7)), "{e}");
    assert_eq!(
        e.reason,
        VerifyReason::SeqGap {
            expected: 5,
            got: 7
        }
    );
}

// --------------------------------------------------------------- rotation ---

#[test]
fn rotation_keeps_one_chain_across_files() {
    require_root();
    let d = Dir::new();
    let limit = 2000;
    let heads = write_entries(d.path(), opts(Some(limit), true), 50);
    let mut rotated: Vec<(u64, PathBuf)> = fs::read_dir(d.path())
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n = name.strip_prefix("audit.jsonl.")?.parse().ok()?;
            Some((n, e.path()))
        })
        .collect();
    rotated.sort();
    assert!(
        rotated.len() >= 3,
        "expected several rotated files, got {rotated:?}"
    );
    assert_eq!(rotated[0].0, 1);
    let mut files: Vec<PathBuf> = rotated.iter().map(|(_, p)| p.clone()).collect();
    files.push(d.log());
    for w in files.windows(2) {
        let last = Entry::parse_line(read_lines(&w[0]).last().unwrap().as_bytes()).unwrap();
        let first = Entry::parse_line(read_lines(&w[1])[0].as_bytes()).unwrap();
        assert_eq!(first.prev, last.hash, "{:?} -> {:?}", w[0], w[1]);
        assert_eq!(first.seq, last.seq + 1);
    }
    for f in &files {
        assert!(
            fs::metadata(f).unwrap().len() <= limit,
            "{f:?} over the limit"
        );
        assert!(
            is_append_only(&File::open(f).unwrap()).unwrap(),
            "{f:?} lost +a"
        );
    }
    let ok = verify(&d.log(), Some(&heads[49])).unwrap();
    assert_eq!((ok.entries, ok.files), (50, files.len()));

    // Reopen and continue the chain.
    let (mut log, report) = AuditLog::open(d.path(), opts(Some(limit), true)).unwrap();
    assert_eq!(report.entries, 50);
    assert_eq!(log.append("more", None, Detail::new()).unwrap().seq, 51);
    drop(log);
    assert_eq!(verify(&d.log(), None).unwrap().entries, 51);
    let t = tail(&d.log(), 30).unwrap();
    assert_eq!(
        t.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (22..=51).collect::<Vec<_>>()
    );
    let mut seen = Vec::new();
    for_each_entry(&d.log(), |e| seen.push(e.seq)).unwrap();
    assert_eq!(seen, (1..=51).collect::<Vec<_>>());

    // Tampering in the oldest file names that file.
    rewrite(&rotated[0].1, |l| l[2] = l[2].replacen("hello", "HELLO", 1));
    let e = expect_err(&d.log(), None);
    assert_eq!(e.file, rotated[0].1);
    assert_eq!((e.line, e.seq), (3, Some(3)), "{e}");
    assert!(
        e.to_string()
            .starts_with("audit.jsonl.1:3: entry seq 3: hash mismatch"),
        "{e}"
    );
}

#[test]
fn crash_between_rotation_steps_is_handled() {
    let d = Dir::new();
    write_entries(d.path(), opts(None, false), 5);
    // As if the writer died right after renaming the live file away.
    fs::rename(d.log(), d.path().join("audit.jsonl.1")).unwrap();
    assert_eq!(verify(&d.log(), None).unwrap().entries, 5);
    let (mut log, report) = AuditLog::open(d.path(), opts(Some(4096), false)).unwrap();
    assert_eq!((report.entries, report.truncation), (5, None));
    assert_eq!(log.append("next", None, Detail::new()).unwrap().seq, 6);
    let ok = verify(&d.log(), None).unwrap();
    assert_eq!((ok.entries, ok.files), (6, 2));
}

/// Found by the audit_line fuzz target (fuzz/regressions/audit_line/
/// rotated-file-without-final-newline): a rotated file whose last line had
/// lost its newline verified, while open took the line before it as the
/// head, so the next append broke the chain. Rotation closes files complete,
/// so both now refuse it as damage and name the file.
#[test]
fn rotated_file_without_final_newline_is_damage_for_verify_and_open() {
    for entries in [1u64, 3] {
        let d = Dir::new();
        write_entries(d.path(), opts(None, false), entries);
        let rotated = d.path().join("audit.jsonl.1");
        fs::rename(d.log(), &rotated).unwrap();
        let mut text = fs::read(&rotated).unwrap();
        assert_eq!(text.pop(), Some(b'\n'));
        fs::write(&rotated, &text).unwrap();
        fs::write(d.log(), b"").unwrap();
        let e = expect_err(&d.log(), None);
        assert_eq!(e.file, rotated);
        assert_eq!(e.line, entries);
        assert_eq!(e.reason, VerifyReason::UnterminatedRotated, "{e}");
        assert!(e.to_string().contains("audit.jsonl.1:"), "{e}");
        let Err(err) = AuditLog::open(d.path(), opts(None, false)) else {
            panic!("open accepted a chain whose head is unknown");
        };
        let msg = format!("{err:#}");
        assert!(
            msg.contains("audit.jsonl.1") && msg.contains("governor audit verify"),
            "{msg}"
        );
        // Nothing was appended behind the damage.
        assert_eq!(fs::read(d.log()).unwrap(), b"");
    }
}

// ----------------------------------------------------------- append-only ---

#[test]
fn append_only_flag_blocks_rewrites_but_not_appends() {
    require_root();
    let d = Dir::new();
    let (mut log, report) = AuditLog::open(d.path(), opts(None, true)).unwrap();
    assert_eq!(report.append_only, AppendOnlyState::Set);
    log.append("one", None, Detail::new()).unwrap();
    assert!(is_append_only(&File::open(d.log()).unwrap()).unwrap());

    let e = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(d.log())
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "truncating open: {e}");
    let e = OpenOptions::new().write(true).open(d.log()).unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::EPERM),
        "non-append write open: {e}"
    );
    let e = fs::rename(d.log(), d.path().join("moved")).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "rename: {e}");
    let e = fs::remove_file(d.log()).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "unlink: {e}");

    log.append("two", Some("svc"), obj(json!({"k": 1})))
        .unwrap();
    let h = log.append("three", None, Detail::new()).unwrap();
    drop(log);
    // The flag stays after the writer closes.
    assert!(is_append_only(&File::open(d.log()).unwrap()).unwrap());
    assert_eq!(verify(&d.log(), Some(&h)).unwrap().entries, 3);

    // Disabled: reported as such.
    let d2 = Dir::new();
    let (_l, r) = AuditLog::open(d2.path(), opts(None, false)).unwrap();
    assert_eq!(r.append_only, AppendOnlyState::Disabled);
    assert!(!is_append_only(&File::open(d2.log()).unwrap()).unwrap());
}

// ------------------------------------------------------------ the handle ---

#[test]
fn handle_appends_from_async_and_blocking_callers() {
    let d = Dir::new();
    let (log, _) = AuditLog::open(d.path(), opts(Some(8192), false)).unwrap();
    let h = spawn_writer(log).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let mut seqs = rt.block_on(async {
        let tasks: Vec<_> = (0..50)
            .map(|i| tokio::spawn(h.append("async.append", Some("svc"), obj(json!({"i": i})))))
            .collect();
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap().unwrap().seq);
        }
        let err = h.append("Bad Kind", None, Detail::new()).await.unwrap_err();
        assert!(err.to_string().contains("kind"), "{err}");
        let batch: Vec<_> = (0..100)
            .map(|i| ("batch.item".to_owned(), None, obj(json!({"i": i}))))
            .collect();
        let heads = h.append_batch(batch).await.unwrap();
        seqs.extend(heads.iter().map(|h| h.seq));
        seqs
    });
    let h2 = h.clone();
    let blocking = std::thread::spawn(move || {
        h2.append_blocking("blocking.append", None, Detail::new())
            .unwrap()
    })
    .join()
    .unwrap();
    seqs.push(blocking.seq);
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=151).collect::<Vec<_>>());
    assert_eq!(h.head(), Some(blocking.clone()));
    h.shutdown_blocking();
    assert!(h.append_blocking("late", None, Detail::new()).is_err());
    // The lock is released: a new writer can open.
    let (_log, report) = AuditLog::open(d.path(), opts(Some(8192), false)).unwrap();
    assert_eq!(report.entries, 151);
    assert_eq!(verify(&d.log(), Some(&blocking)).unwrap().entries, 151);
}

#[test]
fn ten_thousand_entries_verify_with_correct_counts() {
    // Built with the public entry API and written in one buffered pass: the
    // point is verify at scale, and 10,000 fsynced appends would make this
    // test slow on a loaded machine (the writer path is covered above).
    let d = Dir::new();
    let mut out = std::io::BufWriter::new(File::create(d.log()).unwrap());
    let mut head = Head::genesis();
    for i in 0..10_000u64 {
        let svc = format!("svc{}", i % 7);
        let e = Entry::chained(
            &head,
            "2026-01-01T00:00:00.000Z".into(),
            "bulk.entry",
            Some(&svc),
            obj(json!({"i": i, "pid": 1000 + i, "reason": "restart velocity"})),
        )
        .unwrap();
        writeln!(out, "{}", e.to_line()).unwrap();
        head = e.head();
    }
    out.into_inner().unwrap().sync_all().unwrap();
    assert_eq!(head.seq, 10_000);
    let ok = verify(&d.log(), Some(&head)).unwrap();
    assert_eq!(
        (ok.entries, ok.head.clone(), ok.files),
        (10_000, head.clone(), 1)
    );
    let mut n = 0u64;
    let ok2 = for_each_entry(&d.log(), |e| {
        n += 1;
        assert_eq!(e.seq, n);
    })
    .unwrap();
    assert_eq!((n, ok2.entries), (10_000, 10_000));
    let t = tail(&d.log(), 5).unwrap();
    assert_eq!(
        t.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![9996, 9997, 9998, 9999, 10_000]
    );

    // The writer continues this chain through the handle, in a batch.
    let (log, report) = AuditLog::open(d.path(), opts(None, false)).unwrap();
    assert_eq!(report.entries, 10_000);
    let h = spawn_writer(log).unwrap();
    let batch: Vec<_> = (0..200)
        .map(|i| ("batch.entry".to_owned(), None, obj(json!({"i": i}))))
        .collect();
    let last = h.append_batch_blocking(batch).unwrap().pop().unwrap();
    h.shutdown_blocking();
    assert_eq!(last.seq, 10_200);
    assert_eq!(verify(&d.log(), Some(&last)).unwrap().entries, 10_200);
}

// ------------------------------------------------------------ tail/follow ---

#[test]
fn follow_sees_new_entries_across_rotations() {
    let d = Dir::new();
    let (mut log, _) = AuditLog::open(d.path(), opts(Some(1500), false)).unwrap();
    log.append("before", None, Detail::new()).unwrap();
    let start = governor_audit::end_offset(&d.log()).unwrap();
    let logp = d.log();
    let (tx, rx) = std::sync::mpsc::channel();
    let follower = std::thread::spawn(move || {
        follow_with_interval(&logp, start, Duration::from_millis(5), |e| {
            tx.send(e.seq).is_ok() && e.seq < 41
        })
    });
    for i in 0..40 {
        log.append(
            "during",
            Some("svc"),
            obj(json!({"i": i, "pad": "x".repeat(100)})),
        )
        .unwrap();
        if i % 7 == 0 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while got.len() < 40 {
        let left = deadline.saturating_duration_since(Instant::now());
        got.push(
            rx.recv_timeout(left)
                .unwrap_or_else(|_| panic!("follow stalled after {got:?}")),
        );
    }
    follower.join().unwrap().unwrap();
    assert_eq!(got, (2..=41).collect::<Vec<_>>());
    assert!(
        d.path().join("audit.jsonl.3").exists(),
        "the test should rotate several times"
    );
}

// ------------------------------------------------------------- kill -9 ---

const CHILD_ENV: &str = "GOVERNOR_AUDIT_CHILD";
const CHILD_DIR_ENV: &str = "GOVERNOR_AUDIT_CHILD_DIR";

/// Not a test on its own: the crash test runs this test binary again with
/// only this test selected and the env vars set, and kills it mid-append.
#[test]
#[ignore = "helper process for crash_with_sigkill_leaves_a_verifiable_chain"]
fn crash_child_writer() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let dir = PathBuf::from(std::env::var_os(CHILD_DIR_ENV).expect("child dir"));
    let (mut log, _) = AuditLog::open(&dir, opts(Some(4096), true)).expect("child open");
    for i in 0u64.. {
        let pad = "p".repeat((i % 300) as usize);
        log.append(
            "crash.test",
            Some("hammer"),
            obj(json!({"i": i, "pad": pad})),
        )
        .expect("child append");
    }
}

#[test]
fn crash_with_sigkill_leaves_a_verifiable_chain() {
    const CUT: &[u8] = b"{\"seq\":999999,\"ts\":\"2026-";
    require_root();
    let d = Dir::new();
    let exe = std::env::current_exe().unwrap();
    let mut total_before = 0;
    // Different delays hit different points of the append/rotate cycle.
    for (round, delay_ms) in [200u64, 37, 113, 251, 5].into_iter().enumerate() {
        let mut child = Command::new(&exe)
            .args([
                "crash_child_writer",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .env(CHILD_DIR_ENV, d.path())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Let it get going (open may be repairing the previous round's tail).
        let t0 = Instant::now();
        while read_head_file(d.path()).ok().flatten().map_or(0, |h| h.seq) <= total_before {
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "child never appended"
            );
            assert!(child.try_wait().unwrap().is_none(), "child exited early");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();

        if round == 1 {
            // Simulate the write being cut mid-line as well.
            let mut f = OpenOptions::new().append(true).open(d.log()).unwrap();
            f.write_all(CUT).unwrap();
        }
        let head_file = read_head_file(d.path()).unwrap().unwrap();
        let before = verify(&d.log(), None).unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert!(
            before.entries >= head_file.seq,
            "round {round}: log behind its head file"
        );
        assert!(
            before.entries <= head_file.seq + 1,
            "round {round}: head file lags by more than one"
        );

        let (log, report) = AuditLog::open(d.path(), opts(Some(4096), true)).unwrap();
        assert_eq!(report.truncation, None, "round {round}: {report}");
        assert_eq!(report.append_only, AppendOnlyState::Set);
        if round == 1 {
            let torn = report
                .torn_tail
                .as_ref()
                .expect("torn tail after the simulated cut");
            assert!(torn.bytes >= CUT.len() as u64, "{torn:?}");
            assert!(fs::read(&torn.saved_to).unwrap().ends_with(CUT));
        }
        let expected = before.entries + u64::from(report.torn_tail.is_some());
        assert_eq!(report.entries, expected, "round {round}: {report}");
        let head = log.head().unwrap();
        drop(log);
        let after = verify(&d.log(), Some(&head)).unwrap_or_else(|e| panic!("round {round}: {e}"));
        assert_eq!(after.entries, expected);
        assert!(after.files > 1, "the crash test should rotate");
        total_before = after.entries;
    }
}

/// Details carry floats (timings); a float must hash the same after the
/// line is parsed back, or verify would flag honest entries. (serde_json
/// without `float_roundtrip` parses some decimals to a neighbouring f64.)
#[test]
fn float_details_verify_after_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = governor_audit::AuditLog::open(
        dir.path(),
        governor_audit::Options {
            rotate_bytes: None,
            append_only: false,
        },
    )
    .unwrap();
    let mut x = 0.1f64;
    for i in 0..2000 {
        x = x * 1.000_123_7 + 0.000_031_3 * i as f64;
        let mut d = serde_json::Map::new();
        d.insert("ms".into(), serde_json::json!(x));
        d.insert("ratio".into(), serde_json::json!(x / 3.0));
        log.append("bench.float", None, d).unwrap();
    }
    drop(log);
    let ok = governor_audit::verify(&dir.path().join("audit.jsonl"), None).unwrap();
    assert_eq!(ok.entries, 2000);
}

/// Group commit: many entries with one write and one fdatasync, across
/// rotations, form the same verifiable chain as one append at a time.
#[test]
fn group_commit_chains_across_rotations() {
    require_root();
    let d = Dir::new();
    let limit = 2000;
    let (mut log, _) = AuditLog::open(d.path(), opts(Some(limit), true)).expect("open");
    log.append("first", None, Detail::new()).unwrap();
    let items: Vec<(String, Option<String>, Detail)> = (0..40)
        .map(|i| {
            (
                "test.group".to_string(),
                (i % 3 == 0).then(|| "bot".to_string()),
                obj(json!({"i": i, "pad": "x".repeat(40)})),
            )
        })
        .collect();
    let heads = log.append_group(items).expect("group");
    assert_eq!(
        heads.iter().map(|h| h.seq).collect::<Vec<_>>(),
        (2..=41).collect::<Vec<_>>()
    );
    assert_eq!(log.head().unwrap(), heads[39]);
    drop(log);
    let ok = verify(&d.log(), Some(&heads[39])).unwrap();
    assert_eq!(ok.entries, 41);
    assert!(
        ok.files >= 3,
        "the group crossed rotations: {} files",
        ok.files
    );
    for e in fs::read_dir(d.path()).unwrap().flatten() {
        let name = e.file_name().into_string().unwrap();
        if name.starts_with("audit.jsonl") && !name.ends_with(".pending") {
            assert!(
                fs::metadata(e.path()).unwrap().len() <= limit,
                "{name} over the limit"
            );
        }
    }
}
