//! governor's audit chain: an append-only, SHA-256 hash-chained JSON-lines log
//! of every governance action.
//!
//! Each line of `<state_dir>/audit.jsonl` is one entry:
//!
//! ```text
//! {"seq":1,"ts":"2026-05-01T12:00:00.000Z","kind":"svc.restart","service":"bot","detail":{...},"prev":"000…0","hash":"ab12…"}
//! ```
//!
//! `hash` covers every other field (see [`Entry::compute_hash`]) and `prev` is
//! the previous entry's hash, so editing, deleting, reordering or inserting a
//! line breaks the chain at that line ([`verify`] names it). Cutting entries
//! off the end leaves a valid shorter chain, which is why the writer also
//! keeps the newest head in `audit.head` and [`verify`] takes an expected head.
//!
//! Why the log can be trusted after a crash: each append is one O_APPEND write
//! of a whole line then fdatasync, and a line counts only once its newline is
//! written. A torn last line is set aside at the next open (never dropped
//! silently) and recorded as an `audit.torn_tail` entry.
//!
//! Files: see [`files`] — rotated files are `audit.jsonl.1`,
//! `audit.jsonl.2`, … with **higher numbers newer**; the chain runs through
//! them in that order and then through `audit.jsonl`.
//!
//! Entry points: [`AuditLog::open`] / [`AuditLog::append`] (one writer),
//! [`spawn_writer`] / [`AuditHandle`] (the same from async code),
//! [`verify`], [`for_each_entry`], [`tail`], [`follow`], [`read_head_file`].

mod entry;
pub mod files;
pub mod flags;
mod handle;
mod tail;
pub mod time;
mod verify;
mod writer;

pub use entry::{
    canonical_detail, validate_kind, Detail, Entry, Head, HeadParseError, ParseError, GENESIS_HASH,
    HASH_DOMAIN, MAX_LINE_BYTES,
};
pub use handle::{spawn_writer, AuditHandle, BatchItem, CHANNEL_CAPACITY};
pub use tail::{end_offset, follow, follow_with_interval, tail, FOLLOW_POLL};
pub use verify::{for_each_entry, verify, VerifyError, VerifyOk, VerifyReason};
pub use writer::{
    read_head_file, AppendOnlyState, AuditLog, OpenReport, Options, TornTail, KIND_FOREIGN_BYTES,
    KIND_TORN_TAIL, KIND_TRUNCATION,
};
