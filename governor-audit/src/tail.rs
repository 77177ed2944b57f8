//! Reading the newest entries (`governor audit tail [-n N] [--follow]`).
//!
//! These readers show entries; they do not check hashes (that is
//! [`crate::verify`]'s job) but do refuse lines that are not entries.

use std::fs::File;
use std::io::{self, BufReader, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::entry::{Entry, MAX_LINE_BYTES};
use crate::files::{
    chain_files, last_line, read_line_bounded, rfind_newline, rotated_files, LineRead,
};

/// Default poll interval of [`follow`].
pub const FOLLOW_POLL: Duration = Duration::from_millis(200);

/// The last `n` entries of the chain ending in `log`, oldest first. Reads
/// backwards from the end (into older rotated files if the live one has
/// fewer than `n`), so the cost is proportional to `n`, not to the log. An
/// incomplete last line (a torn write) is skipped.
pub fn tail(log: &Path, n: usize) -> Result<Vec<Entry>> {
    let mut out = Vec::with_capacity(n.min(4096));
    let files =
        chain_files(log).with_context(|| format!("listing the files of {}", log.display()))?;
    if files.is_empty() {
        bail!("no audit log at {}", log.display());
    }
    for path in files.iter().rev() {
        if out.len() >= n {
            break;
        }
        let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let len = f
            .metadata()
            .with_context(|| format!("stat {}", path.display()))?
            .len();
        let mut end = rfind_newline(&f, len)
            .with_context(|| format!("reading {}", path.display()))?
            .map_or(0, |p| p + 1);
        while end > 0 && out.len() < n {
            let (start, bytes) =
                last_line(&f, end).with_context(|| format!("reading {}", path.display()))?;
            let bytes = bytes.ok_or_else(|| {
                anyhow!(
                    "{}: line at byte {start} is longer than {MAX_LINE_BYTES} bytes",
                    path.display()
                )
            })?;
            let e = Entry::parse_line(&bytes)
                .with_context(|| format!("{}: line at byte {start}", path.display()))?;
            out.push(e);
            end = start;
        }
    }
    out.reverse();
    Ok(out)
}

/// Offset just past the last complete line of the live file (0 if it does not
/// exist): where [`follow`] should start after a [`tail`].
pub fn end_offset(log: &Path) -> Result<u64> {
    let f = match File::open(log) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e).with_context(|| format!("opening {}", log.display())),
    };
    let len = f
        .metadata()
        .with_context(|| format!("stat {}", log.display()))?
        .len();
    Ok(rfind_newline(&f, len)
        .with_context(|| format!("reading {}", log.display()))?
        .map_or(0, |p| p + 1))
}

/// Calls `f` with every complete entry appended to the live file `log` from
/// byte `from_offset` on (normally [`end_offset`]), polling every
/// [`FOLLOW_POLL`], until `f` returns `false`. Follows rotation (finishes the
/// old file, then continues at the start of the new one) and a torn tail being
/// cut off. Waits for the file to appear if it does not exist.
pub fn follow(log: &Path, from_offset: u64, f: impl FnMut(&Entry) -> bool) -> Result<()> {
    follow_with_interval(log, from_offset, FOLLOW_POLL, f)
}

/// [`follow`] with a chosen poll interval.
pub fn follow_with_interval(
    log: &Path,
    from_offset: u64,
    poll: Duration,
    mut f: impl FnMut(&Entry) -> bool,
) -> Result<()> {
    let (mut reader, mut ino) = open_at(log, from_offset, poll)?;
    let mut offset = from_offset;
    let mut line = Vec::new();
    loop {
        // Read every complete line available now.
        loop {
            let pos = offset;
            match read_line_bounded(&mut reader, &mut line)
                .with_context(|| format!("reading {}", log.display()))?
            {
                LineRead::Line => {
                    offset += line.len() as u64;
                    let e = Entry::parse_line(&line)
                        .with_context(|| format!("{}: line at byte {pos}", log.display()))?;
                    if !f(&e) {
                        return Ok(());
                    }
                }
                LineRead::TooLong => bail!(
                    "{}: line at byte {pos} is longer than {MAX_LINE_BYTES} bytes",
                    log.display()
                ),
                // A line still being written (or torn): re-read it next time.
                LineRead::Unterminated | LineRead::Eof => {
                    reader
                        .seek(SeekFrom::Start(offset))
                        .with_context(|| format!("seeking in {}", log.display()))?;
                    break;
                }
            }
        }
        std::thread::sleep(poll);
        match std::fs::metadata(log) {
            Ok(m) if m.ino() != ino => {
                // Rotated. Open the new live file first, then finish the old
                // one and any files rotated in between (several rotations may
                // happen between two polls), stopping at the new live inode.
                let (new_reader, new_ino) = open_at(log, 0, poll)?;
                let old = std::mem::replace(&mut reader, new_reader);
                if !drain(old, offset, log, &mut f)? {
                    return Ok(());
                }
                let rotated = rotated_files(log)
                    .with_context(|| format!("listing the files of {}", log.display()))?;
                let inode = |p: &Path| std::fs::metadata(p).map(|m| m.ino()).ok();
                if let Some(i) = rotated.iter().position(|(_, p)| inode(p) == Some(ino)) {
                    for (_, p) in &rotated[i + 1..] {
                        if inode(p) == Some(new_ino) {
                            break;
                        }
                        let file =
                            File::open(p).with_context(|| format!("opening {}", p.display()))?;
                        if !drain(BufReader::new(file), 0, p, &mut f)? {
                            return Ok(());
                        }
                    }
                }
                offset = 0;
                ino = new_ino;
            }
            Ok(m) if m.len() < offset => {
                // Cut back below what was read (only a torn tail is ever cut,
                // and it is never consumed; this is a safety net).
                offset = m.len();
                reader
                    .seek(SeekFrom::Start(offset))
                    .with_context(|| format!("seeking in {}", log.display()))?;
            }
            _ => {}
        }
    }
}

/// Reads the remaining complete lines of a rotated-away file from `pos`.
/// Returns `false` if `f` asked to stop.
fn drain(
    mut reader: BufReader<File>,
    mut pos: u64,
    path: &Path,
    f: &mut impl FnMut(&Entry) -> bool,
) -> Result<bool> {
    let mut line = Vec::new();
    while read_line_bounded(&mut reader, &mut line)
        .with_context(|| format!("reading {}", path.display()))?
        == LineRead::Line
    {
        let e = Entry::parse_line(&line)
            .with_context(|| format!("{}: line at byte {pos}", path.display()))?;
        pos += line.len() as u64;
        if !f(&e) {
            return Ok(false);
        }
    }
    Ok(true)
}

fn open_at(log: &Path, offset: u64, poll: Duration) -> Result<(BufReader<File>, u64)> {
    loop {
        match File::open(log) {
            Ok(file) => {
                let ino = file
                    .metadata()
                    .with_context(|| format!("stat {}", log.display()))?
                    .ino();
                let mut r = BufReader::new(file);
                r.seek(SeekFrom::Start(offset))
                    .with_context(|| format!("seeking in {}", log.display()))?;
                return Ok((r, ino));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => std::thread::sleep(poll),
            Err(e) => return Err(e).with_context(|| format!("opening {}", log.display())),
        }
    }
}
