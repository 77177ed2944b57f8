//! `[protect]`: which files are UNTOUCHABLE or PROTECTED, and how approvals
//! work. Bad entries — a missing path, a directory, a glob matching nothing,
//! a list file with a bad line — are errors that name the file and line
//! (the config's, or the list file's).
//!
//! ```toml
//! [protect]
//! untouchable = ["/srv/bots/core/*.py", "/etc/governor/rules.toml"]
//! protected = ["/srv/bots/*/config.json"]
//! untouchable_lists = ["/etc/governor/UNTOUCHABLE_FILES.txt"]   # one path per line, # comments
//! protected_lists = []
//! approve_via = "terminal"        # or "telegram": an approver taps Approve
//! telegram_approvers = [123456789] # Telegram user ids allowed to approve
//! max_window = "1h"               # longest approval window
//! lsm = true                      # use BPF LSM where the kernel allows it
//! attempt_logging = true          # layer 2; its cost depends on the kernel (see below)
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::glob;
use crate::units::{ByteSize, ConfigError, HumanDuration};

/// How a human approves a write window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ApproveVia {
    /// `governor approve` from a terminal (stdin must be a tty).
    #[default]
    Terminal,
    /// The window opens only when an authorised Telegram user taps Approve
    /// on the request the bot sends.
    Telegram,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProtectConfig {
    /// Files no process may modify (paths or globs).
    #[serde(default)]
    pub untouchable: Vec<Spanned<String>>,
    /// Files that change only inside an approved window.
    #[serde(default)]
    pub protected: Vec<Spanned<String>>,
    /// Files listing UNTOUCHABLE paths, one per line, `#` comments.
    #[serde(default)]
    pub untouchable_lists: Vec<Spanned<String>>,
    #[serde(default)]
    pub protected_lists: Vec<Spanned<String>>,
    #[serde(default)]
    pub approve_via: ApproveVia,
    /// Telegram user ids allowed to approve (with `approve_via = "telegram"`).
    #[serde(default)]
    pub telegram_approvers: Vec<i64>,
    /// Longest window `governor approve --for` may open.
    #[serde(default = "default_max_window")]
    pub max_window: HumanDuration,
    /// How long a Telegram approval request waits for a tap.
    #[serde(default = "default_approval_timeout")]
    pub approval_timeout: HumanDuration,
    /// Use the BPF LSM layer where the kernel allows it.
    #[serde(default = "default_true")]
    pub lsm: bool,
    /// Layer 2 (logging every attempt with who and what). Where the kernel
    /// allows fexit (stock Debian/Ubuntu kernels) only the watched syscalls
    /// pay, a trampoline each. Where it doesn't, syscall tracepoints put
    /// every syscall of every process on the kernel's slow path: measured on
    /// a retpoline VM, ~50–65 ns per syscall. `false` keeps the flags (and
    /// BPF LSM) without that cost, and without the attempt log and tamper
    /// restore.
    #[serde(default = "default_true")]
    pub attempt_logging: bool,
    /// Size of the attempt ring.
    #[serde(default = "default_ring")]
    pub ring_size: ByteSize,
    /// `[drift] watch`, copied here by the config loader (the watched tier
    /// rides on the same inode maps and programs).
    #[serde(skip)]
    pub watch: Vec<Spanned<String>>,
}

fn default_max_window() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(24 * 3600))
}
fn default_approval_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(600))
}
fn default_true() -> bool {
    true
}
fn default_ring() -> ByteSize {
    ByteSize(super::kernel::DEFAULT_PROTECT_RING_BYTES as u64)
}

impl Default for ProtectConfig {
    fn default() -> Self {
        ProtectConfig {
            untouchable: Vec::new(),
            protected: Vec::new(),
            untouchable_lists: Vec::new(),
            protected_lists: Vec::new(),
            approve_via: ApproveVia::default(),
            telegram_approvers: Vec::new(),
            max_window: default_max_window(),
            approval_timeout: default_approval_timeout(),
            lsm: true,
            attempt_logging: true,
            ring_size: default_ring(),
            watch: Vec::new(),
        }
    }
}

impl ProtectConfig {
    /// A config with plain (span-less) paths, for tests and programmatic use.
    pub fn with_paths(untouchable: &[&Path], protected: &[&Path]) -> Self {
        let sp = |p: &&Path| Spanned::new(0..0, p.display().to_string());
        ProtectConfig {
            untouchable: untouchable.iter().map(sp).collect(),
            protected: protected.iter().map(sp).collect(),
            ..Default::default()
        }
    }

    /// Parses a standalone `[protect]` table (tests, tools).
    pub fn parse(file: &Path, src: &str) -> Result<ProtectConfig, ConfigError> {
        #[derive(Deserialize)]
        struct Wrap {
            #[serde(default)]
            protect: ProtectConfig,
        }
        let w: Wrap = toml::from_str(src).map_err(|e| {
            let off = e.span().map(|s| s.start).unwrap_or(0);
            err_at(file, src, off, "protect", e.message().trim().to_string())
        })?;
        Ok(w.protect)
    }
}

/// The two tiers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Untouchable,
    Protected,
    /// `[drift] watch`: may change, but only through a governance action
    /// (`governor deploy`, `governor drift accept`); any other change is
    /// drift. Not flagged; attempts are logged, content re-hashed.
    Watched,
}

impl Tier {
    pub fn name(self) -> &'static str {
        match self {
            Tier::Untouchable => "untouchable",
            Tier::Protected => "protected",
            Tier::Watched => "watched",
        }
    }
}

/// One file to protect and where it was declared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub path: PathBuf,
    pub tier: Tier,
    /// `config:LINE`, `LISTFILE:LINE` or `implicit: …`.
    pub origin: String,
}

/// Everything a `[protect]` section expands to.
#[derive(Debug, Clone, Default)]
pub struct Expanded {
    pub targets: Vec<Target>,
    pub problems: Vec<ConfigError>,
}

fn line_col(src: &str, offset: usize) -> (usize, usize) {
    if src.is_empty() {
        return (0, 0);
    }
    let offset = offset.min(src.len());
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let col = before.rfind('\n').map(|i| offset - i).unwrap_or(offset + 1);
    (line, col)
}

fn err_at(file: &Path, src: &str, offset: usize, key: &str, reason: String) -> ConfigError {
    let (line, column) = line_col(src, offset);
    ConfigError {
        file: file.to_path_buf(),
        line,
        column,
        key: Some(key.to_string()),
        reason,
    }
}

/// Checks one entry (a path or glob) and returns the files it names.
fn entry_files(entry: &str) -> Result<Vec<PathBuf>, String> {
    if !entry.starts_with('/') {
        return Err(format!("\"{entry}\" is not an absolute path"));
    }
    if glob::is_glob(entry) {
        let all = glob::expand(entry)?;
        if all.is_empty() {
            return Err(format!("glob \"{entry}\" matches nothing"));
        }
        let mut files = Vec::new();
        for p in all {
            match std::fs::metadata(&p) {
                Ok(m) if m.is_file() => files.push(p),
                // Directories (and other non-files) a glob happens to match
                // are skipped; only they matching *nothing else* is an error.
                _ => {}
            }
        }
        if files.is_empty() {
            return Err(format!(
                "glob \"{entry}\" matches no regular file (only directories or special files)"
            ));
        }
        return Ok(files);
    }
    let p = PathBuf::from(entry);
    match std::fs::metadata(&p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(format!("\"{entry}\" does not exist"))
        }
        Err(e) => Err(format!("\"{entry}\": {e}")),
        Ok(m) if m.is_dir() => Err(format!(
            "\"{entry}\" is a directory; list its files, or use a glob such as \"{}/*\"",
            entry.trim_end_matches('/')
        )),
        Ok(m) if !m.is_file() => Err(format!("\"{entry}\" is not a regular file")),
        Ok(_) => Ok(vec![p]),
    }
}

/// Strips a `#` comment (at the start, or after whitespace) and blanks.
fn list_line(line: &str) -> &str {
    let line = line.trim();
    if line.starts_with('#') {
        return "";
    }
    let mut cut = line.len();
    let b = line.as_bytes();
    for i in 1..b.len() {
        if b[i] == b'#' && b[i - 1].is_ascii_whitespace() {
            cut = i;
            break;
        }
    }
    line[..cut].trim()
}

/// Expands `[protect]` into files, collecting every problem with its place.
/// `file`/`src` are the config file and its text (spans point into it).
pub fn expand(cfg: &ProtectConfig, file: &Path, src: &str) -> Expanded {
    let mut out = Expanded::default();
    let add = |out: &mut Expanded, paths: Vec<PathBuf>, tier: Tier, origin: String| {
        for p in paths {
            out.targets.push(Target {
                path: p,
                tier,
                origin: origin.clone(),
            });
        }
    };
    for (key, list, tier) in [
        ("protect.untouchable", &cfg.untouchable, Tier::Untouchable),
        ("protect.protected", &cfg.protected, Tier::Protected),
        ("drift.watch", &cfg.watch, Tier::Watched),
    ] {
        for e in list {
            let (line, _) = line_col(src, e.span().start);
            match entry_files(e.get_ref()) {
                Ok(paths) => add(&mut out, paths, tier, format!("{}:{line}", file.display())),
                Err(reason) => {
                    // A watched file that is gone stays an entry: its
                    // removal is drift until it is back or accepted.
                    let p = PathBuf::from(e.get_ref());
                    if tier == Tier::Watched
                        && p.is_absolute()
                        && !e.get_ref().contains(['*', '?', '['])
                        && !p.exists()
                    {
                        add(
                            &mut out,
                            vec![p],
                            tier,
                            format!("{}:{line}", file.display()),
                        );
                    }
                    out.problems
                        .push(err_at(file, src, e.span().start, key, reason))
                }
            }
        }
    }
    for (key, lists, tier) in [
        (
            "protect.untouchable_lists",
            &cfg.untouchable_lists,
            Tier::Untouchable,
        ),
        (
            "protect.protected_lists",
            &cfg.protected_lists,
            Tier::Protected,
        ),
    ] {
        for l in lists {
            let list_path = PathBuf::from(l.get_ref());
            if !list_path.is_absolute() {
                out.problems.push(err_at(
                    file,
                    src,
                    l.span().start,
                    key,
                    format!("list file \"{}\" is not an absolute path", l.get_ref()),
                ));
                continue;
            }
            let text = match std::fs::read(&list_path) {
                Ok(t) => t,
                Err(e) => {
                    out.problems.push(err_at(
                        file,
                        src,
                        l.span().start,
                        key,
                        format!("cannot read list file \"{}\": {e}", l.get_ref()),
                    ));
                    continue;
                }
            };
            for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
                let lineno = i + 1;
                let bad = |reason: String| ConfigError {
                    file: list_path.clone(),
                    line: lineno,
                    column: 1,
                    key: None,
                    reason: format!("{reason} (list named by `{key}`)"),
                };
                let Ok(line) = std::str::from_utf8(raw) else {
                    out.problems.push(bad("the line is not valid UTF-8".into()));
                    continue;
                };
                let entry = list_line(line);
                if entry.is_empty() {
                    continue;
                }
                match entry_files(entry) {
                    Ok(paths) => add(
                        &mut out,
                        paths,
                        tier,
                        format!("{}:{lineno}", list_path.display()),
                    ),
                    Err(reason) => out.problems.push(bad(reason)),
                }
            }
        }
    }
    // Other settings.
    if cfg.approve_via == ApproveVia::Telegram && cfg.telegram_approvers.is_empty() {
        let off = src.find("approve_via").unwrap_or(0);
        out.problems.push(err_at(
            file,
            src,
            off,
            "protect.approve_via",
            "approve_via = \"telegram\" needs telegram_approvers (the user ids allowed to \
             approve) and [alerts.telegram]"
                .into(),
        ));
    }
    if cfg.max_window.0.is_zero() {
        let off = src.find("max_window").unwrap_or(0);
        out.problems.push(err_at(
            file,
            src,
            off,
            "protect.max_window",
            "max_window must be longer than zero".into(),
        ));
    }
    let ring = cfg.ring_size.0;
    if ring < 4096 || !ring.is_power_of_two() || ring > (1 << 30) {
        let off = src.find("ring_size").unwrap_or(0);
        out.problems.push(err_at(
            file,
            src,
            off,
            "protect.ring_size",
            format!("ring_size {ring} must be a power of two between 4KiB and 1GiB"),
        ));
    }
    // The stronger tier wins when a file is listed twice.
    out.targets
        .sort_by(|a, b| a.path.cmp(&b.path).then(a.tier.cmp(&b.tier)));
    out.targets.dedup_by(|b, a| a.path == b.path);
    out
}

/// Validation for `governor check-config`: the first problem, if any.
pub fn check(cfg: &ProtectConfig, file: &Path, src: &str) -> Result<(), ConfigError> {
    match expand(cfg, file, src).problems.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Every problem (check-config may print them all).
pub fn check_all(cfg: &ProtectConfig, file: &Path, src: &str) -> Vec<ConfigError> {
    expand(cfg, file, src).problems
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> ProtectConfig {
        ProtectConfig::parse(Path::new("g.toml"), src).unwrap()
    }

    #[test]
    fn bad_entries_name_file_line_and_key() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path();
        std::fs::write(dir.join("ok.txt"), "x").unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        let list = dir.join("LIST.txt");
        std::fs::write(
            &list,
            format!(
                "# comment\n{}/ok.txt   # trailing\n\nrelative/path\n{}/gone\n",
                dir.display(),
                dir.display()
            ),
        )
        .unwrap();
        let d_ = dir.display();
        let src = format!(
            "[protect]\nuntouchable = [\n  \"{d_}/ok.txt\",\n  \"{d_}/missing.txt\",\n  \"{d_}/sub\",\n  \"{d_}/*.nope\",\n]\nuntouchable_lists = [\"{}\"]\n",
            list.display()
        );
        let cfg = parse(&src);
        let ex = expand(&cfg, Path::new("g.toml"), &src);
        assert_eq!(ex.targets.len(), 1, "{:?}", ex.targets);
        let msgs: Vec<String> = ex.problems.iter().map(|e| e.to_string()).collect();
        assert_eq!(msgs.len(), 5, "{msgs:#?}");
        assert!(
            msgs[0].starts_with("g.toml:4:") && msgs[0].contains("does not exist"),
            "{}",
            msgs[0]
        );
        assert!(msgs[0].contains("key `protect.untouchable`"), "{}", msgs[0]);
        assert!(
            msgs[1].starts_with("g.toml:5:") && msgs[1].contains("is a directory"),
            "{}",
            msgs[1]
        );
        assert!(
            msgs[2].starts_with("g.toml:6:") && msgs[2].contains("matches nothing"),
            "{}",
            msgs[2]
        );
        let l = list.display().to_string();
        assert!(
            msgs[3].starts_with(&format!("{l}:4:")) && msgs[3].contains("not an absolute"),
            "{}",
            msgs[3]
        );
        assert!(
            msgs[4].starts_with(&format!("{l}:5:")) && msgs[4].contains("does not exist"),
            "{}",
            msgs[4]
        );
        assert!(check(&cfg, Path::new("g.toml"), &src).is_err());
    }

    #[test]
    fn unknown_keys_and_defaults() {
        let e =
            ProtectConfig::parse(Path::new("g.toml"), "[protect]\nuntuchable = []\n").unwrap_err();
        assert_eq!(e.line, 2, "{e}");
        assert!(e.reason.contains("unknown field"), "{e}");
        let c = parse("[protect]\n");
        assert_eq!(c.approve_via, ApproveVia::Terminal);
        assert!(c.lsm);
        let src = "[protect]\napprove_via = \"telegram\"\n";
        let e = check(&parse(src), Path::new("g.toml"), src).unwrap_err();
        assert_eq!(e.line, 2, "{e}");
    }

    /// Inside the daemon's whole config, errors point into that file.
    #[test]
    fn spans_point_into_the_daemon_config() {
        let src = "[daemon]\nstate_dir = \"/tmp/x\"\n\n[protect]\nprotected = [\n  \"/etc/hostname\",\n  \"/nonexistent/governor-test\",\n]\n";
        let cfg = crate::config::Config::parse(Path::new("/etc/governor/governor.toml"), src)
            .expect("parses: filesystem checks are separate");
        let errs = check_all(&cfg.protect, Path::new("/etc/governor/governor.toml"), src);
        assert_eq!(errs.len(), 1, "{errs:?}");
        let e = errs[0].to_string();
        assert!(
            e.starts_with("/etc/governor/governor.toml:7:") && e.contains("protect.protected"),
            "{e}"
        );
    }

    #[test]
    fn untouchable_wins_over_protected() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("a.json");
        std::fs::write(&f, "{}").unwrap();
        let cfg = ProtectConfig::with_paths(&[&f], &[&d.path().join("*.json")]);
        let ex = expand(&cfg, Path::new("g.toml"), "");
        assert!(ex.problems.is_empty(), "{:?}", ex.problems);
        assert_eq!(ex.targets.len(), 1);
        assert_eq!(ex.targets[0].tier, Tier::Untouchable);
    }
}
