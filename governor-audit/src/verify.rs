//! Streaming verification of the whole chain, across rotated files.
//!
//! Reads line by line with a bounded buffer, so memory does not grow with the
//! size of the log (a line longer than [`MAX_LINE_BYTES`] is an error, not an
//! allocation).

use std::fmt;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::entry::{Entry, Head, ParseError, MAX_LINE_BYTES};
use crate::files::{chain_files, read_line_bounded, LineRead};

/// A chain that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyOk {
    /// Entries verified (seq 1 through `head.seq`).
    pub entries: u64,
    /// The newest entry; [`Head::genesis`] if there are none.
    pub head: Head,
    /// Files walked, rotated ones included.
    pub files: usize,
    /// Bytes after the last newline of the newest file, if any. An entry is
    /// committed only once its newline is written, so these bytes (a write cut
    /// short by a crash) are not part of the chain; the writer sets them aside
    /// and records an `audit.torn_tail` entry at its next open.
    pub torn_tail_bytes: Option<u64>,
}

/// CLI form: `ok: N entries, head SEQ:HASH`.
impl fmt::Display for VerifyOk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ok: {} entries, head {}", self.entries, self.head)?;
        if let Some(b) = self.torn_tail_bytes {
            write!(
                f,
                " (plus an incomplete last line of {b} bytes, not part of the chain)"
            )?;
        }
        Ok(())
    }
}

/// The first bad entry of a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyError {
    /// The file holding it.
    pub file: PathBuf,
    /// 1-based line within `file`; 0 when the problem is the file itself.
    pub line: u64,
    /// Seq of the entry when known (for "head not reached": the first missing seq).
    pub seq: Option<u64>,
    pub reason: VerifyReason,
}

/// What is wrong with the entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyReason {
    /// The entry's contents do not match its `hash`: it was edited.
    HashMismatch {
        stored: String,
        computed: String,
    },
    /// `prev` is not the previous entry's hash: an entry was replaced or forged.
    BrokenLink {
        prev: String,
        expected: String,
    },
    /// Seq does not follow the previous entry: lines were deleted, reordered or inserted.
    SeqGap {
        expected: u64,
        got: u64,
    },
    /// Not JSON or not an object (serde's message).
    BadJson(String),
    MissingField(String),
    /// A field of the wrong type.
    BadField(String),
    /// A key that is not part of the entry format (and not covered by the hash).
    UnexpectedField(String),
    LineTooLong {
        limit: usize,
    },
    /// A rotated file whose last line has no newline. Rotation closes only
    /// complete, fsynced files, so this is damage (bytes cut off or glued
    /// on), never a crash; only the live file may end torn.
    UnterminatedRotated,
    /// The log ends before the expected head: entries were cut off the end.
    HeadNotReached {
        expected: Head,
        last: Head,
    },
    /// The entry at the expected head's seq has another hash: the end was rewritten.
    HeadMismatch {
        expected: Head,
        found: String,
    },
    /// The file could not be read.
    Io(String),
}

fn short(h: &str) -> String {
    match h.get(..12) {
        Some(p) if h.len() > 12 => format!("{p}…"),
        _ => h.to_owned(),
    }
}

impl fmt::Display for VerifyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifyReason::HashMismatch { stored, computed } => write!(
                f,
                "hash mismatch (stored {}, computed {})",
                short(stored),
                short(computed)
            ),
            VerifyReason::BrokenLink { prev, expected } => write!(
                f,
                "broken link (prev {} but the previous entry's hash is {})",
                short(prev),
                short(expected)
            ),
            VerifyReason::SeqGap { expected, got } => {
                write!(f, "seq gap (expected {expected}, got {got})")
            }
            VerifyReason::BadJson(m) => write!(f, "bad JSON: {m}"),
            VerifyReason::MissingField(n) => write!(f, "missing field `{n}`"),
            VerifyReason::BadField(m) => write!(f, "bad field: {m}"),
            VerifyReason::UnexpectedField(n) => {
                write!(f, "unexpected field `{n}` (not covered by the hash)")
            }
            VerifyReason::LineTooLong { limit } => {
                write!(f, "line longer than {limit} bytes")
            }
            VerifyReason::UnterminatedRotated => write!(
                f,
                "last line of a rotated file has no newline (rotated files are closed \
                 complete; only the live file may end torn)"
            ),
            VerifyReason::HeadNotReached { expected, last } => write!(
                f,
                "head not reached: log ends at seq {}, expected head {}:{}",
                last.seq,
                expected.seq,
                short(&expected.hash)
            ),
            VerifyReason::HeadMismatch { expected, found } => write!(
                f,
                "hash differs from the expected head (expected {}, found {})",
                short(&expected.hash),
                short(found)
            ),
            VerifyReason::Io(m) => write!(f, "{m}"),
        }
    }
}

/// `audit.jsonl:17: entry seq 17: hash mismatch (stored ab12…, computed cd34…)`.
impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self.file.file_name().map_or_else(
            || self.file.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        write!(f, "{name}")?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        write!(f, ": ")?;
        if let Some(seq) = self.seq {
            write!(f, "entry seq {seq}: ")?;
        }
        write!(f, "{}", self.reason)
    }
}

impl std::error::Error for VerifyError {}

/// Verifies the whole chain ending in `log` (normally `<state_dir>/audit.jsonl`):
/// its rotated files oldest first, then `log`. Checks, per entry in order:
/// shape, seq = previous + 1 (starting at 1), prev = previous hash (64 zeros
/// first), and the recomputed hash. Stops at the first bad entry.
///
/// A hash chain alone cannot show that entries were cut off the end; pass the
/// head recorded elsewhere (the head file, an alert, a remote copy) as
/// `expect_head` to catch that: the log must reach that seq with that hash.
pub fn verify(log: &Path, expect_head: Option<&Head>) -> Result<VerifyOk, VerifyError> {
    walk(log, expect_head, &mut |_| {})
}

/// Walks and verifies the chain like [`verify`], calling `f` with every entry
/// that verified, oldest first. On a bad entry `f` has seen every entry
/// before it, and the error names the bad one. The daemon uses this to
/// rebuild its history at start.
pub fn for_each_entry(log: &Path, mut f: impl FnMut(&Entry)) -> Result<VerifyOk, VerifyError> {
    walk(log, None, &mut f)
}

fn walk(
    log: &Path,
    expect: Option<&Head>,
    f: &mut dyn FnMut(&Entry),
) -> Result<VerifyOk, VerifyError> {
    let io_err = |file: &Path, line: u64, msg: String| VerifyError {
        file: file.to_path_buf(),
        line,
        seq: None,
        reason: VerifyReason::Io(msg),
    };
    let files = chain_files(log)
        .map_err(|e| io_err(log, 0, format!("listing the files of the chain: {e}")))?;
    if files.is_empty() {
        return Err(io_err(log, 0, "no audit log here".to_owned()));
    }
    let mut head = Head::genesis();
    let mut entries = 0u64;
    let mut torn_tail_bytes = None;
    let mut lines_in_last = 0u64;
    let last_index = files.len() - 1;
    let mut buf = Vec::with_capacity(4096);
    for (i, path) in files.iter().enumerate() {
        let file = File::open(path).map_err(|e| io_err(path, 0, format!("cannot open: {e}")))?;
        let mut reader = BufReader::with_capacity(64 * 1024, file);
        let mut lineno = 0u64;
        loop {
            let read = read_line_bounded(&mut reader, &mut buf)
                .map_err(|e| io_err(path, lineno + 1, format!("read error: {e}")))?;
            if read == LineRead::Eof {
                break;
            }
            lineno += 1;
            let at = |seq: Option<u64>, reason: VerifyReason| VerifyError {
                file: path.clone(),
                line: lineno,
                seq,
                reason,
            };
            match read {
                LineRead::TooLong => {
                    return Err(at(
                        None,
                        VerifyReason::LineTooLong {
                            limit: MAX_LINE_BYTES,
                        },
                    ))
                }
                LineRead::Unterminated if i == last_index => {
                    torn_tail_bytes = Some(buf.len() as u64);
                    lineno -= 1;
                    break;
                }
                LineRead::Unterminated => {
                    let seq = seq_of_broken_line(&buf);
                    return Err(at(seq, VerifyReason::UnterminatedRotated));
                }
                _ => {}
            }
            let e = Entry::parse_line(&buf).map_err(|pe| {
                let seq = seq_of_broken_line(&buf);
                at(seq, parse_reason(pe))
            })?;
            let expected_seq = head.seq + 1;
            if e.seq != expected_seq {
                return Err(at(
                    Some(e.seq),
                    VerifyReason::SeqGap {
                        expected: expected_seq,
                        got: e.seq,
                    },
                ));
            }
            if e.prev != head.hash {
                return Err(at(
                    Some(e.seq),
                    VerifyReason::BrokenLink {
                        prev: e.prev,
                        expected: head.hash,
                    },
                ));
            }
            let computed = e.compute_hash();
            if computed != e.hash {
                return Err(at(
                    Some(e.seq),
                    VerifyReason::HashMismatch {
                        stored: e.hash,
                        computed,
                    },
                ));
            }
            if let Some(x) = expect {
                if x.seq == e.seq && x.hash != e.hash {
                    return Err(at(
                        Some(e.seq),
                        VerifyReason::HeadMismatch {
                            expected: x.clone(),
                            found: e.hash,
                        },
                    ));
                }
            }
            f(&e);
            head = e.head();
            entries += 1;
        }
        lines_in_last = lineno;
    }
    if let Some(x) = expect {
        if x.seq > head.seq {
            return Err(VerifyError {
                file: files[last_index].clone(),
                line: lines_in_last + 1,
                seq: Some(head.seq + 1),
                reason: VerifyReason::HeadNotReached {
                    expected: x.clone(),
                    last: head,
                },
            });
        }
    }
    Ok(VerifyOk {
        entries,
        head,
        files: files.len(),
        torn_tail_bytes,
    })
}

fn parse_reason(pe: ParseError) -> VerifyReason {
    match pe {
        ParseError::BadJson(m) => VerifyReason::BadJson(m),
        ParseError::MissingField(n) => VerifyReason::MissingField(n.to_owned()),
        e @ ParseError::BadField { .. } => VerifyReason::BadField(e.to_string()),
        ParseError::UnexpectedField(n) => VerifyReason::UnexpectedField(n),
    }
}

/// Best-effort seq of a line that is not a valid entry, to name it in the error.
fn seq_of_broken_line(line: &[u8]) -> Option<u64> {
    match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(m)) => m.get("seq").and_then(Value::as_u64),
        _ => None,
    }
}
