//! File layout and low-level file helpers shared by the writer and readers.
//!
//! Layout inside the state directory:
//! - `audit.jsonl` — the live file, the newest part of the chain;
//! - `audit.jsonl.1`, `audit.jsonl.2`, … — rotated files, **higher number =
//!   newer**. Rotation renames the live file to the next free number, so no
//!   existing (append-only) file is ever renamed twice;
//! - `audit.jsonl.torn-<unix secs>[-k]` — torn tails set aside at open;
//! - `audit.head` — `SEQ:HASH` of the newest entry, for truncation detection;
//! - `audit.lock` — flock'd by the single writer.

use std::fs::File;
use std::io::{self, BufRead, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::entry::MAX_LINE_BYTES;

pub const LOG_NAME: &str = "audit.jsonl";
pub const HEAD_NAME: &str = "audit.head";
pub const LOCK_NAME: &str = "audit.lock";

/// The directory holding `log` ("." for a bare file name).
pub fn dir_of(log: &Path) -> &Path {
    match log.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Rotated files of `log` (`<name>.<N>`), oldest (lowest N) first.
pub fn rotated_files(log: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let Some(name) = log.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{name}.");
    let mut out = Vec::new();
    for ent in std::fs::read_dir(dir_of(log))? {
        let ent = ent?;
        let fname = ent.file_name();
        let Some(fname) = fname.to_str() else {
            continue;
        };
        let Some(num) = fname.strip_prefix(&prefix) else {
            continue;
        };
        if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(n) = num.parse::<u64>() {
            out.push((n, ent.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Every file of the chain, oldest first: rotated files, then `log` itself if
/// it exists (it may be missing after a crash in the middle of a rotation).
pub fn chain_files(log: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = rotated_files(log)?.into_iter().map(|(_, p)| p).collect();
    if log.exists() {
        files.push(log.to_path_buf());
    }
    Ok(files)
}

/// fsyncs a directory so renames and creations in it are durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Position of the last `\n` in `file[0..end)`, scanning backwards in chunks
/// (constant memory, however long the damaged region).
pub fn rfind_newline(file: &File, end: u64) -> io::Result<Option<u64>> {
    // Start small (entries are a few hundred bytes) and grow, so walking back
    // line by line stays cheap while a huge damaged region is still crossed
    // in large reads.
    const MAX_CHUNK: u64 = 64 * 1024;
    let mut chunk: u64 = 1024;
    let mut buf = vec![0u8; MAX_CHUNK as usize];
    let mut hi = end;
    while hi > 0 {
        let lo = hi.saturating_sub(chunk);
        let n = (hi - lo) as usize;
        file.read_exact_at(&mut buf[..n], lo)?;
        if let Some(i) = buf[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(Some(lo + i as u64));
        }
        hi = lo;
        chunk = (chunk * 4).min(MAX_CHUNK);
    }
    Ok(None)
}

/// The last line of `file[0..end)`, where `end` is just past a `\n`: its
/// start offset and its bytes (including the newline), or `None` as bytes if
/// it is longer than [`MAX_LINE_BYTES`] (no entry can be that long).
pub fn last_line(file: &File, end: u64) -> io::Result<(u64, Option<Vec<u8>>)> {
    let start = match end.checked_sub(1) {
        Some(before_nl) => rfind_newline(file, before_nl)?.map_or(0, |p| p + 1),
        None => 0,
    };
    let len = end - start;
    if len > MAX_LINE_BYTES as u64 {
        return Ok((start, None));
    }
    let mut bytes = vec![0u8; len as usize];
    file.read_exact_at(&mut bytes, start)?;
    Ok((start, Some(bytes)))
}

/// Result of reading one line with a bounded buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum LineRead {
    /// End of file, nothing read.
    Eof,
    /// A complete line (ending in `\n`) is in the buffer.
    Line,
    /// Bytes up to end of file without a newline are in the buffer.
    Unterminated,
    /// More than [`MAX_LINE_BYTES`] without a newline; the buffer holds the
    /// first `MAX_LINE_BYTES`.
    TooLong,
}

/// Reads the next line into `buf` (cleared first), never buffering more than
/// [`MAX_LINE_BYTES`], so a damaged file cannot make a reader allocate without
/// bound.
pub fn read_line_bounded(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<LineRead> {
    buf.clear();
    let n = reader
        .by_ref()
        .take(MAX_LINE_BYTES as u64)
        .read_until(b'\n', buf)?;
    if n == 0 {
        return Ok(LineRead::Eof);
    }
    if buf.last() == Some(&b'\n') {
        return Ok(LineRead::Line);
    }
    if n >= MAX_LINE_BYTES && !reader.fill_buf()?.is_empty() {
        return Ok(LineRead::TooLong);
    }
    Ok(LineRead::Unterminated)
}
