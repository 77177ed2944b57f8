//! The single writer: open (with crash repair and truncation detection),
//! append (O_APPEND + fdatasync), rotation.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::entry::{validate_kind, Detail, Entry, Head, MAX_LINE_BYTES};
use crate::files::{
    chain_files, last_line, read_line_bounded, rfind_newline, rotated_files, sync_dir, LineRead,
    HEAD_NAME, LOCK_NAME, LOG_NAME,
};
use crate::flags::{is_unsupported, set_append_only, with_append_cleared};
use crate::time::format_rfc3339_millis;

/// Kind of the entry recorded when open set a torn tail aside.
pub const KIND_TORN_TAIL: &str = "audit.torn_tail";
/// Kind of the entry recorded when the log is found shorter than the head
/// file (at open) or than the writer left it (while open).
pub const KIND_TRUNCATION: &str = "audit.truncation_detected";
const TORN_PREFIX: &str = "torn-";
const FOREIGN_PREFIX: &str = "foreign-";
const PENDING_SUFFIX: &str = ".pending";

/// Kind of the entry recorded when bytes that the writer did not write were
/// found at the end of the live file (and set aside).
pub const KIND_FOREIGN_BYTES: &str = "audit.foreign_bytes";

/// How the writer manages its files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Start a new file when appending would make the live one larger than
    /// this many bytes (a single entry larger than the limit still gets a file
    /// of its own). `None`: never rotate.
    pub rotate_bytes: Option<u64>,
    /// Keep FS_APPEND_FL (`chattr +a`) on the log files, so that not even root
    /// can rewrite them without first clearing the flag. Needs
    /// CAP_LINUX_IMMUTABLE; where it cannot be set, open reports why instead
    /// of failing.
    pub append_only: bool,
}

impl Default for Options {
    /// Append-only on, rotation at 64 MiB.
    fn default() -> Options {
        Options {
            rotate_bytes: Some(64 << 20),
            append_only: true,
        }
    }
}

/// Whether the live log file carries FS_APPEND_FL after open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendOnlyState {
    Set,
    /// Requested but not set; the reason says why (no privilege, or a
    /// filesystem without inode flags).
    Unsupported(String),
    /// Not requested (`Options::append_only == false`).
    Disabled,
}

/// Bytes that open found after the last complete entry and set aside.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    /// How many bytes were moved out of the log.
    pub bytes: u64,
    /// Where they started in the live file (the file's length after repair).
    pub offset: u64,
    /// The file now holding exactly those bytes.
    pub saved_to: PathBuf,
    /// "no trailing newline" and/or the parse error of an unparsable last line.
    pub reason: String,
}

impl TornTail {
    fn detail(&self) -> Detail {
        let mut d = Detail::new();
        d.insert("bytes".into(), Value::from(self.bytes));
        d.insert("offset".into(), Value::from(self.offset));
        d.insert(
            "saved_to".into(),
            Value::from(self.saved_to.display().to_string()),
        );
        d.insert("reason".into(), Value::from(self.reason.clone()));
        d
    }
}

/// What [`AuditLog::open`] found and did. Anything `Some` here deserves an
/// alert: it means a crash, tampering, or a misconfigured host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// A torn last line was set aside and an `audit.torn_tail` entry recorded.
    pub torn_tail: Option<TornTail>,
    /// Bytes an earlier writer cut off and saved but crashed before recording
    /// (`.pending` files); recorded now (offset 0: unknown).
    pub interrupted_set_asides: Vec<TornTail>,
    /// The log ends before the head recorded in `audit.head` (or differs at
    /// that seq); an `audit.truncation_detected` entry was recorded.
    pub truncation: Option<String>,
    /// `audit.head` was missing or unreadable, so truncation could not be
    /// checked; it has been rewritten from the log.
    pub head_file_problem: Option<String>,
    pub append_only: AppendOnlyState,
    /// Entries in the chain after open (= head seq), including any entries
    /// open itself recorded. Open reads only the tail; use
    /// [`crate::verify`] to check the whole chain.
    pub entries: u64,
    /// Newest entry after open, `None` for an empty chain.
    pub head: Option<Head>,
}

impl fmt::Display for OpenReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "audit log: {} entries", self.entries)?;
        if let Some(h) = &self.head {
            write!(f, ", head {h}")?;
        }
        match &self.append_only {
            AppendOnlyState::Set => write!(f, "; append-only set")?,
            AppendOnlyState::Unsupported(r) => write!(f, "; append-only NOT set: {r}")?,
            AppendOnlyState::Disabled => write!(f, "; append-only disabled")?,
        }
        if let Some(t) = &self.torn_tail {
            write!(
                f,
                "; TORN TAIL of {} bytes ({}) saved to {}",
                t.bytes,
                t.reason,
                t.saved_to.display()
            )?;
        }
        if let Some(t) = &self.truncation {
            write!(f, "; TRUNCATION DETECTED: {t}")?;
        }
        for t in &self.interrupted_set_asides {
            write!(
                f,
                "; recorded {} bytes set aside before a crash in {}",
                t.bytes,
                t.saved_to.display()
            )?;
        }
        if let Some(p) = &self.head_file_problem {
            write!(f, "; head file: {p}")?;
        }
        Ok(())
    }
}

/// The one writer of an audit log directory (enforced with an flock on
/// `audit.lock`, so a second daemon cannot interleave a second chain).
///
/// Every [`append`](AuditLog::append) is a single O_APPEND write of a whole
/// line followed by fdatasync, so after a crash the file holds complete
/// entries plus at most one torn line, which the next open repairs.
#[derive(Debug)]
pub struct AuditLog {
    dir: PathBuf,
    log_path: PathBuf,
    head_path: PathBuf,
    file: File,
    /// Length of the live file as far as complete entries go.
    len: u64,
    /// Newest entry (genesis for an empty chain).
    head: Head,
    opts: Options,
    /// Set when a write, sync or rotation failed part-way: the next append
    /// first reopens the live file and repairs its tail, so a half-written
    /// line is never followed by another entry.
    needs_recovery: bool,
    /// While open records its findings, `audit.head` keeps the old head, so a
    /// crash half-way through still shows the truncation at the next open.
    defer_head_file: bool,
    /// Set-asides whose record could not be appended yet (e.g. disk full).
    unrecorded: Vec<(&'static str, SetAside)>,
    head_file_errors: u64,
    _lock: File,
}

/// Bytes cut off the live file whose record is not yet in the log. They sit
/// in `pending` (the final name plus `.pending`) until the entry naming
/// `tail.saved_to` is appended, then are renamed there; a crash in between
/// leaves a `.pending` file that the next open finishes, so no cut goes
/// unrecorded.
#[derive(Debug)]
struct SetAside {
    pending: PathBuf,
    tail: TornTail,
}

/// The chained entry after `prev` as one JSON line, and the head it makes.
fn line_of(
    prev: &Head,
    ts: String,
    kind: &str,
    service: Option<&str>,
    detail: Detail,
) -> Result<(Vec<u8>, Head)> {
    let entry = Entry::chained(prev, ts, kind, service, detail)?;
    let mut line = entry.to_line().into_bytes();
    line.push(b'\n');
    if line.len() > MAX_LINE_BYTES {
        bail!(
            "audit entry {kind:?} is {} bytes, at most {MAX_LINE_BYTES} allowed",
            line.len()
        );
    }
    Ok((line, entry.head()))
}

impl AuditLog {
    /// Opens (creating if needed) the log in `state_dir`: takes the writer
    /// lock, sets a torn tail aside, sets FS_APPEND_FL if asked, and compares
    /// the log with `audit.head`. Fails only for what it cannot work around
    /// (no directory, lock held, I/O errors, a last entry that cannot be read
    /// even after removing a torn line).
    pub fn open(state_dir: &Path, opts: Options) -> Result<(AuditLog, OpenReport)> {
        fs::create_dir_all(state_dir)
            .with_context(|| format!("creating audit directory {}", state_dir.display()))?;
        let lock = take_lock(&state_dir.join(LOCK_NAME))?;
        let log_path = state_dir.join(LOG_NAME);
        let file = open_log_file(&log_path)?;
        let mut log = AuditLog {
            dir: state_dir.to_path_buf(),
            head_path: state_dir.join(HEAD_NAME),
            log_path,
            file,
            len: 0,
            head: Head::genesis(),
            opts,
            needs_recovery: false,
            defer_head_file: true,
            unrecorded: Vec::new(),
            head_file_errors: 0,
            _lock: lock,
        };
        let orphans = log.sort_out_pending()?;
        let torn = log.repair_tail()?;
        let append_only = log.apply_append_only();
        let (stored, mut head_file_problem) = match read_head_file(state_dir) {
            Ok(h) => (h, None),
            Err(e) => (
                None,
                Some(format!("unreadable ({e:#}); rewritten from the log")),
            ),
        };
        if stored.is_none() && head_file_problem.is_none() && log.head.seq > 0 {
            head_file_problem = Some(format!(
                "{} is missing although the log has {} entries; truncation could not be \
                 checked; rewritten from the log",
                log.head_path.display(),
                log.head.seq
            ));
        }
        let truncation = match &stored {
            Some(s) => log.check_against(s)?,
            None => None,
        };
        let found_head = log.head.clone();
        let mut interrupted_set_asides = Vec::new();
        for p in orphans {
            interrupted_set_asides.push(log.finish_orphan(&p)?);
        }
        let torn_tail = match torn {
            Some(t) => Some(log.record_set_aside(KIND_TORN_TAIL, t)?),
            None => None,
        };
        if let (Some(msg), Some(s)) = (&truncation, &stored) {
            let mut d = Detail::new();
            d.insert("expected_head".into(), Value::from(s.to_string()));
            d.insert("found_head".into(), Value::from(found_head.to_string()));
            d.insert("problem".into(), Value::from(msg.clone()));
            log.append(KIND_TRUNCATION, None, d)
                .context("recording the detected truncation in the audit log")?;
        }
        log.defer_head_file = false;
        if log.head.seq > 0 && stored.as_ref() != Some(&log.head) {
            if let Err(e) = log.write_head_file() {
                let p = head_file_problem.get_or_insert_with(String::new);
                if !p.is_empty() {
                    p.push_str("; ");
                }
                p.push_str(&format!("cannot write it: {e:#}"));
            }
        }
        let report = OpenReport {
            torn_tail,
            interrupted_set_asides,
            truncation,
            head_file_problem,
            append_only,
            entries: log.head.seq,
            head: log.head(),
        };
        Ok((log, report))
    }

    /// Appends one entry and returns the new head once the entry is on disk
    /// (written with O_APPEND, then fdatasync). `kind` must match
    /// `[a-z0-9._-]+`; `service` is `None` for host-wide actions.
    ///
    /// On `Err` the entry may or may not have reached the file (e.g. fsync
    /// failed after the write); the chain is never left corrupt: the next
    /// append first repairs the tail, setting any partial line aside.
    pub fn append(&mut self, kind: &str, service: Option<&str>, detail: Detail) -> Result<Head> {
        validate_kind(kind)?;
        self.prepare()?;
        self.append_checked(kind, service, detail)
    }

    /// Appends entries in order with one write and one fdatasync for the
    /// lot (group commit), and the head file once; returns each head. All
    /// are durable when this returns `Ok`. A rotation due inside the group
    /// commits what came before it first. On `Err` none is known durable
    /// (some may have reached the file); as with [`append`](Self::append),
    /// the next append repairs the tail.
    pub fn append_group(
        &mut self,
        items: Vec<(String, Option<String>, Detail)>,
    ) -> Result<Vec<Head>> {
        for (k, _, _) in &items {
            validate_kind(k)?;
        }
        self.prepare()?;
        let mut heads = Vec::with_capacity(items.len());
        let mut buf: Vec<u8> = Vec::new();
        let mut head = self.head.clone();
        let now = format_rfc3339_millis(SystemTime::now());
        for (kind, service, detail) in items {
            let (line, next) = line_of(&head, now.clone(), &kind, service.as_deref(), detail)?;
            if self.rotation_due(buf.len(), line.len()) {
                self.commit(&buf, head.clone())?;
                buf.clear();
                self.rotate_now()?;
            }
            buf.extend_from_slice(&line);
            head = next;
            heads.push(head.clone());
        }
        self.commit(&buf, head)?;
        Ok(heads)
    }

    /// Before any append: repair a tail an earlier failure left, check the
    /// file, and record what was set aside.
    fn prepare(&mut self) -> Result<()> {
        if self.needs_recovery {
            self.recover()
                .context("recovering the audit log after an earlier failed append")?;
        }
        self.check_file_size()?;
        while !self.unrecorded.is_empty() {
            let (k, s) = self.unrecorded.remove(0);
            self.record_set_aside(k, s)?;
        }
        Ok(())
    }

    /// Whether a `line` more, after `buffered` bytes not yet written, would
    /// take the live file past the rotation size (a file never rotates
    /// empty: a line longer than the limit still gets a file).
    fn rotation_due(&self, buffered: usize, line: usize) -> bool {
        let before = self.len + buffered as u64;
        self.opts
            .rotate_bytes
            .is_some_and(|limit| before > 0 && before + line as u64 > limit)
    }

    fn rotate_now(&mut self) -> Result<()> {
        self.rotate().inspect_err(|_| self.needs_recovery = true)
    }

    /// Writes `buf` (whole lines) and fdatasyncs; `head` is the chain's head
    /// after them.
    fn commit(&mut self, buf: &[u8], head: Head) -> Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.file.write_all(buf) {
            self.undo_partial();
            return Err(e).with_context(|| format!("appending to {}", self.log_path.display()));
        }
        if let Err(e) = self.file.sync_data() {
            self.undo_partial();
            return Err(e).with_context(|| format!("fsync of {}", self.log_path.display()));
        }
        self.len += buf.len() as u64;
        self.head = head;
        // The entries are durable; a stale head file only weakens
        // truncation detection (open tolerates a head file that lags), so
        // this is counted rather than reported as a failed append that a
        // caller might retry into a duplicate.
        if !self.defer_head_file && self.write_head_file().is_err() {
            self.head_file_errors += 1;
        }
        Ok(())
    }

    /// A write that failed part-way (a full disk) leaves some of its lines
    /// in the file, none of them known durable: they are cut off again, so
    /// a failed group is all-or-nothing and its caller can write it again
    /// without duplicates (a truncate needs no space). If even that fails,
    /// the next append repairs the tail as after a crash.
    fn undo_partial(&mut self) {
        let len = self.len;
        let cut = with_append_cleared(&self.file, || {
            self.file
                .set_len(len)
                .with_context(|| format!("cutting {} back to {len} bytes", self.log_path.display()))
        });
        match cut {
            Ok(()) => {
                let _ = self.file.sync_data();
            }
            Err(_) => self.needs_recovery = true,
        }
    }

    /// [`append`](Self::append) after the recovery and size checks.
    fn append_checked(
        &mut self,
        kind: &str,
        service: Option<&str>,
        detail: Detail,
    ) -> Result<Head> {
        let (line, head) = line_of(
            &self.head,
            format_rfc3339_millis(SystemTime::now()),
            kind,
            service,
            detail,
        )?;
        if self.rotation_due(0, line.len()) {
            self.rotate_now()?;
        }
        self.commit(&line, head)?;
        Ok(self.head.clone())
    }

    /// Newest entry, `None` for an empty chain.
    pub fn head(&self) -> Option<Head> {
        (self.head.seq > 0).then(|| self.head.clone())
    }

    /// The live file, `<state_dir>/audit.jsonl` (what [`crate::verify`] takes).
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// How many times updating `audit.head` failed since open.
    pub fn head_file_errors(&self) -> u64 {
        self.head_file_errors
    }

    /// Reopens the live file (a rotation may have stopped half-way) and
    /// repairs its tail, recording any torn bytes like open does.
    fn recover(&mut self) -> Result<()> {
        self.file = open_log_file(&self.log_path)?;
        self.apply_append_only();
        let torn = self.repair_tail()?;
        self.needs_recovery = false;
        if let Some(t) = torn {
            self.record_set_aside(KIND_TORN_TAIL, t)?;
        }
        Ok(())
    }

    /// Guards the chain against writes by anyone else while this writer has
    /// the file open (one fstat per append). Bytes appended behind our back
    /// are set aside like a torn tail and recorded as `audit.foreign_bytes`,
    /// so our next line cannot be glued onto them. A file that shrank was cut
    /// by someone who could clear the append-only flag: that is recorded as
    /// `audit.truncation_detected`, chained from the head we remember, so the
    /// cut stays visible to `verify` at exactly that point.
    fn check_file_size(&mut self) -> Result<()> {
        let size = self
            .file
            .metadata()
            .with_context(|| format!("stat {}", self.log_path.display()))?
            .len();
        if size > self.len {
            let cut = self.cut_tail(
                self.len,
                size,
                FOREIGN_PREFIX,
                "bytes not written by this writer".to_owned(),
            )?;
            self.record_set_aside(KIND_FOREIGN_BYTES, cut)?;
        } else if size < self.len {
            let remembered = self.head.clone();
            let expected_len = self.len;
            let torn = self.repair_tail()?;
            let found = self.head.clone();
            self.head = remembered.clone();
            if let Some(t) = torn {
                self.record_set_aside(KIND_TORN_TAIL, t)?;
            }
            let mut d = Detail::new();
            d.insert("expected_head".into(), Value::from(remembered.to_string()));
            d.insert("found_head".into(), Value::from(found.to_string()));
            d.insert(
                "problem".into(),
                Value::from(format!(
                    "{} shrank from {expected_len} to {size} bytes while the writer had it open",
                    self.log_path.display()
                )),
            );
            self.append_checked(KIND_TRUNCATION, None, d)
                .context("recording the detected truncation in the audit log")?;
        }
        Ok(())
    }

    /// Finds the last complete entry of the live file; bytes after it (no
    /// newline, or an unparsable last line) are copied to a `.torn-<ts>` file
    /// and cut off. Sets `len` and `head`.
    fn repair_tail(&mut self) -> Result<Option<SetAside>> {
        let path = &self.log_path;
        let len = self
            .file
            .metadata()
            .with_context(|| format!("stat {}", path.display()))?
            .len();
        let complete_end = rfind_newline(&self.file, len)
            .with_context(|| format!("reading {}", path.display()))?
            .map_or(0, |p| p + 1);
        let mut torn_start = complete_end;
        let mut reasons = Vec::new();
        if complete_end < len {
            reasons.push("no trailing newline".to_owned());
        }
        let mut last: Option<Entry> = None;
        if complete_end > 0 {
            let (start, bytes) = last_line(&self.file, complete_end)
                .with_context(|| format!("reading {}", path.display()))?;
            match parse_opt(bytes.as_deref()) {
                Ok(e) => last = Some(e),
                Err(why) => {
                    torn_start = start;
                    reasons.insert(0, format!("unparsable last line: {why}"));
                    if start > 0 {
                        let (s2, b2) = last_line(&self.file, start)
                            .with_context(|| format!("reading {}", path.display()))?;
                        let e = parse_opt(b2.as_deref()).map_err(|why2| {
                            anyhow!(
                                "{}: the last line is unparsable ({why}) and so is the one \
                                 before it at byte {s2} ({why2}); this is damage, not a crash: \
                                 run `governor audit verify`",
                                path.display()
                            )
                        })?;
                        last = Some(e);
                    }
                }
            }
        }
        let torn = if torn_start < len {
            Some(self.cut_tail(torn_start, len, TORN_PREFIX, reasons.join("; "))?)
        } else {
            None
        };
        self.len = torn_start;
        self.head = match last {
            Some(e) => e.head(),
            None => self.head_from_rotated()?,
        };
        Ok(torn)
    }

    /// Head of the newest non-empty rotated file (the live file is empty).
    fn head_from_rotated(&self) -> Result<Head> {
        let rotated = rotated_files(&self.log_path)
            .with_context(|| format!("listing {}", self.dir.display()))?;
        for (_, p) in rotated.iter().rev() {
            let f = File::open(p).with_context(|| format!("opening {}", p.display()))?;
            let len = f
                .metadata()
                .with_context(|| format!("stat {}", p.display()))?
                .len();
            let Some(nl) =
                rfind_newline(&f, len).with_context(|| format!("reading {}", p.display()))?
            else {
                if len == 0 {
                    continue;
                }
                bail!(
                    "{}: it holds {len} bytes and no complete line, so the chain cannot be \
                     continued; run `governor audit verify`",
                    p.display()
                );
            };
            if nl + 1 != len {
                // Rotation closes files complete: bytes after the last
                // newline are damage, and the chain's head is not known.
                bail!(
                    "{}: its last line has no newline ({} bytes after the last complete \
                     line), so the chain cannot be continued; run `governor audit verify`",
                    p.display(),
                    len - nl - 1
                );
            }
            let (_, bytes) =
                last_line(&f, nl + 1).with_context(|| format!("reading {}", p.display()))?;
            let e = parse_opt(bytes.as_deref()).map_err(|why| {
                anyhow!(
                    "{}: its last line is not an entry ({why}), so the chain cannot be \
                     continued; run `governor audit verify`",
                    p.display()
                )
            })?;
            return Ok(e.head());
        }
        Ok(Head::genesis())
    }

    /// Moves `file[start..end)` out of the live file: copies it to a new
    /// `audit.jsonl.<prefix>-<unix secs>[-k].pending` (fsynced), then cuts the
    /// live file back to `start`. The caller records it with
    /// [`record_set_aside`](Self::record_set_aside).
    fn cut_tail(&mut self, start: u64, end: u64, prefix: &str, reason: String) -> Result<SetAside> {
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut k = 0u32;
        let (mut out, saved_to, pending) = loop {
            let name = if k == 0 {
                format!("{LOG_NAME}.{prefix}{secs}")
            } else {
                format!("{LOG_NAME}.{prefix}{secs}-{k}")
            };
            let saved_to = self.dir.join(&name);
            let pending = self.dir.join(format!("{name}{PENDING_SUFFIX}"));
            let taken = fs::symlink_metadata(&saved_to).is_ok();
            let created = if taken {
                Err(io::Error::from(io::ErrorKind::AlreadyExists))
            } else {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&pending)
            };
            match created {
                Ok(f) => break (f, saved_to, pending),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && k < 10_000 => k += 1,
                Err(e) => return Err(e).with_context(|| format!("creating {}", pending.display())),
            }
        };
        let cut = (|| -> Result<()> {
            let mut src = &self.file;
            src.seek(SeekFrom::Start(start))
                .with_context(|| format!("seeking in {}", self.log_path.display()))?;
            let copied = io::copy(&mut src.take(end - start), &mut out)
                .with_context(|| format!("copying the tail to {}", pending.display()))?;
            if copied != end - start {
                bail!(
                    "copying the tail to {}: copied {copied} of {} bytes",
                    pending.display(),
                    end - start
                );
            }
            out.sync_all()
                .with_context(|| format!("fsync of {}", pending.display()))?;
            sync_dir(&self.dir).with_context(|| format!("fsync of {}", self.dir.display()))?;
            let file = &self.file;
            with_append_cleared(file, || {
                file.set_len(start)?;
                file.sync_all()?;
                Ok(())
            })
            .with_context(|| {
                format!(
                    "cutting {} bytes off {} (saved in {})",
                    end - start,
                    self.log_path.display(),
                    pending.display()
                )
            })
        })();
        if let Err(e) = cut {
            // Drop the copy only while the live file still holds the bytes.
            if self.file.metadata().is_ok_and(|m| m.len() >= end) {
                let _ = fs::remove_file(&pending);
            }
            return Err(e);
        }
        self.len = start;
        Ok(SetAside {
            pending,
            tail: TornTail {
                bytes: end - start,
                offset: start,
                saved_to,
                reason,
            },
        })
    }

    /// Appends the entry describing a set-aside, then gives its file the
    /// final name the entry names.
    /// If the append fails the set-aside is kept and retried by the next append.
    fn record_set_aside(&mut self, kind: &'static str, s: SetAside) -> Result<TornTail> {
        if let Err(e) = self.append_checked(kind, None, s.tail.detail()) {
            let msg = format!("recording {} in the audit log", s.tail.saved_to.display());
            self.unrecorded.push((kind, s));
            return Err(e.context(msg));
        }
        fs::rename(&s.pending, &s.tail.saved_to).with_context(|| {
            format!(
                "renaming {} to {}",
                s.pending.display(),
                s.tail.saved_to.display()
            )
        })?;
        sync_dir(&self.dir).with_context(|| format!("fsync of {}", self.dir.display()))?;
        Ok(s.tail)
    }

    /// Deals with `.pending` files left by a writer that crashed while setting
    /// bytes aside. If the live file still ends with those bytes, the cut never
    /// happened: the pending copy is dropped and the tail repair redoes it.
    /// Otherwise the bytes are only in the pending file: returned, to be
    /// recorded once the head is known.
    fn sort_out_pending(&mut self) -> Result<Vec<PathBuf>> {
        let mut orphans = Vec::new();
        let entries =
            fs::read_dir(&self.dir).with_context(|| format!("listing {}", self.dir.display()))?;
        for ent in entries {
            let ent = ent.with_context(|| format!("listing {}", self.dir.display()))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            let is_ours = [TORN_PREFIX, FOREIGN_PREFIX]
                .iter()
                .any(|p| name.starts_with(&format!("{LOG_NAME}.{p}")));
            if is_ours && name.ends_with(PENDING_SUFFIX) {
                orphans.push(ent.path());
            }
        }
        orphans.sort();
        let mut keep = Vec::new();
        for p in orphans {
            let f = File::open(&p).with_context(|| format!("opening {}", p.display()))?;
            let still_in_log = ends_with_file(&self.file, &f)
                .with_context(|| format!("comparing {} with the log", p.display()))?;
            if still_in_log {
                fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
            } else {
                keep.push(p);
            }
        }
        Ok(keep)
    }

    /// Records (unless the newest entry already does) and renames a pending
    /// set-aside found by [`sort_out_pending`](Self::sort_out_pending).
    fn finish_orphan(&mut self, pending: &Path) -> Result<TornTail> {
        let bytes = fs::metadata(pending)
            .with_context(|| format!("stat {}", pending.display()))?
            .len();
        let saved_to = pending.with_extension("");
        let saved_str = saved_to.display().to_string();
        let name = saved_to
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let kind = if name.starts_with(&format!("{LOG_NAME}.{FOREIGN_PREFIX}")) {
            KIND_FOREIGN_BYTES
        } else {
            KIND_TORN_TAIL
        };
        let tail = TornTail {
            bytes,
            offset: 0,
            saved_to: saved_to.clone(),
            reason: "set aside by a writer that crashed before recording it".to_owned(),
        };
        let newest = crate::tail::tail(&self.log_path, 1).unwrap_or_default();
        let recorded = newest.last().is_some_and(|e| {
            e.kind == kind && e.detail.get("saved_to").and_then(Value::as_str) == Some(&saved_str)
        });
        if recorded {
            fs::rename(pending, &saved_to).with_context(|| {
                format!("renaming {} to {}", pending.display(), saved_to.display())
            })?;
            sync_dir(&self.dir).with_context(|| format!("fsync of {}", self.dir.display()))?;
            Ok(tail)
        } else {
            self.record_set_aside(
                kind,
                SetAside {
                    pending: pending.to_path_buf(),
                    tail,
                },
            )
        }
    }

    fn apply_append_only(&self) -> AppendOnlyState {
        if !self.opts.append_only {
            return AppendOnlyState::Disabled;
        }
        match set_append_only(&self.file, true) {
            Ok(_) => AppendOnlyState::Set,
            Err(e) if is_unsupported(&e) => AppendOnlyState::Unsupported(format!(
                "the filesystem of {} has no append-only attribute: {e}",
                self.log_path.display()
            )),
            Err(e) => AppendOnlyState::Unsupported(format!(
                "cannot set the append-only attribute on {} (needs root / \
                 CAP_LINUX_IMMUTABLE): {e}",
                self.log_path.display()
            )),
        }
    }

    /// Compares the log's head with the one stored in `audit.head`. The head
    /// file may lag the log (a crash between the log fsync and the head-file
    /// rename), but the log must never be behind it or disagree with it.
    fn check_against(&self, stored: &Head) -> Result<Option<String>> {
        let cur = &self.head;
        let hp = self.head_path.display();
        if cur.seq < stored.seq {
            return Ok(Some(format!(
                "the log ends at seq {} but {hp} records head {stored}: entries {}..={} are \
                 missing (log truncated, deleted or replaced)",
                cur.seq,
                cur.seq + 1,
                stored.seq
            )));
        }
        let found = if cur.seq == stored.seq {
            Some(cur.hash.clone())
        } else {
            find_entry(&self.log_path, stored.seq)?.map(|e| e.hash)
        };
        Ok(match found {
            Some(h) if h == stored.hash => None,
            Some(h) => Some(format!(
                "entry seq {} has hash {h} but {hp} records {}: the log was rewritten",
                stored.seq, stored.hash
            )),
            None => Some(format!(
                "{hp} records head {stored} but the log has no entry with seq {} (log replaced)",
                stored.seq
            )),
        })
    }

    /// Writes `audit.head` atomically: temp file, fsync, rename.
    fn write_head_file(&self) -> Result<()> {
        let tmp = self.dir.join(format!("{HEAD_NAME}.tmp"));
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(format!("{}\n", self.head).as_bytes())
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("fsync of {}", tmp.display()))?;
        fs::rename(&tmp, &self.head_path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), self.head_path.display()))
    }

    /// Renames the live file to the next `audit.jsonl.N` (clearing
    /// FS_APPEND_FL for the rename, which the kernel otherwise refuses, and
    /// setting it back on the rotated file) and starts an empty live file.
    /// The next entry's `prev` is the rotated file's last hash, so the chain
    /// continues across files. A crash at any step leaves either the old live
    /// file or the rotated file plus no/empty live file; open handles both.
    fn rotate(&mut self) -> Result<()> {
        let mut n = rotated_files(&self.log_path)
            .with_context(|| format!("listing {}", self.dir.display()))?
            .last()
            .map_or(1, |(n, _)| n + 1);
        let target = loop {
            let p = self.dir.join(format!("{LOG_NAME}.{n}"));
            if fs::symlink_metadata(&p).is_err() {
                break p;
            }
            n += 1;
        };
        self.file
            .sync_all()
            .with_context(|| format!("fsync of {}", self.log_path.display()))?;
        let (from, to) = (&self.log_path, &target);
        with_append_cleared(&self.file, || {
            fs::rename(from, to)
                .with_context(|| format!("renaming {} to {}", from.display(), to.display()))
        })?;
        self.file = open_log_file(&self.log_path)?;
        self.len = 0;
        self.apply_append_only();
        sync_dir(&self.dir).with_context(|| format!("fsync of {}", self.dir.display()))?;
        Ok(())
    }
}

/// Whether `log` ends with exactly the contents of `other` (compared in
/// chunks, so a large set-aside costs no memory).
fn ends_with_file(log: &File, other: &File) -> io::Result<bool> {
    let (n, m) = (log.metadata()?.len(), other.metadata()?.len());
    if m > n {
        return Ok(false);
    }
    const CHUNK: u64 = 64 * 1024;
    let (mut a, mut b) = (vec![0u8; CHUNK as usize], vec![0u8; CHUNK as usize]);
    let mut off = 0u64;
    while off < m {
        let len = (m - off).min(CHUNK) as usize;
        log.read_exact_at(&mut a[..len], n - m + off)?;
        other.read_exact_at(&mut b[..len], off)?;
        if a[..len] != b[..len] {
            return Ok(false);
        }
        off += len as u64;
    }
    Ok(true)
}

fn parse_opt(bytes: Option<&[u8]>) -> std::result::Result<Entry, String> {
    match bytes {
        Some(b) => Entry::parse_line(b).map_err(|e| e.to_string()),
        None => Err(format!("line longer than {MAX_LINE_BYTES} bytes")),
    }
}

/// Finds the entry with `seq` without verifying anything, scanning only the
/// newest file whose entries start at or before `seq`.
fn find_entry(log: &Path, seq: u64) -> Result<Option<Entry>> {
    let files =
        chain_files(log).with_context(|| format!("listing the files of {}", log.display()))?;
    let mut buf = Vec::new();
    for path in files.iter().rev() {
        let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut r = io::BufReader::new(f);
        let mut first_seq = None;
        loop {
            match read_line_bounded(&mut r, &mut buf)
                .with_context(|| format!("reading {}", path.display()))?
            {
                LineRead::Eof => break,
                LineRead::Line => {}
                _ => continue,
            }
            let Ok(e) = Entry::parse_line(&buf) else {
                continue;
            };
            first_seq.get_or_insert(e.seq);
            if e.seq == seq {
                return Ok(Some(e));
            }
        }
        if first_seq.is_some_and(|s| s <= seq) {
            return Ok(None);
        }
    }
    Ok(None)
}

/// Opens (creating) the live file for appending and reading. O_APPEND is the
/// only write mode FS_APPEND_FL allows, and it makes every write land at the
/// current end even if the offset was moved for reading.
fn open_log_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening audit log {}", path.display()))
}

/// Takes an exclusive, non-blocking flock on `path`, held for the writer's life.
fn take_lock(path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("opening lock file {}", path.display()))?;
    // A just-closed writer's lock can linger for a moment in a process that
    // is between fork and exec (it holds a copy of the fd until exec closes
    // it), so retry briefly before calling it a second writer.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        // SAFETY: flock takes a valid fd (owned by `f`, alive across the call)
        // and an operation constant; it has no memory-safety preconditions.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e).with_context(|| format!("locking {}", path.display()));
        }
        if std::time::Instant::now() >= deadline {
            bail!(
                "another audit writer holds {} (only one writer per log)",
                path.display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    Ok(f)
}

/// Reads `<state_dir>/audit.head` (`SEQ:HASH`); `Ok(None)` if it does not exist.
pub fn read_head_file(state_dir: &Path) -> Result<Option<Head>> {
    let path = state_dir.join(HEAD_NAME);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let head = text
        .parse::<Head>()
        .with_context(|| format!("parsing {}", path.display()))?;
    Ok(Some(head))
}
