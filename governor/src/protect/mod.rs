//! Protected files (issue 6): UNTOUCHABLE and PROTECTED tiers, enforced in
//! three layers.
//!
//! 1. **VFS flags** (always): every protected file carries
//!    `FS_IMMUTABLE_FL`, so the kernel itself refuses every modification —
//!    for root too, with no daemon in the path, across a crash or a reboot.
//! 2. **Attempt logging** (always): the syscall tracepoint programs of
//!    [`kernel`] report each attempt on a protected inode with its result;
//!    each becomes exactly one audit entry. Clearing the flag is tampering:
//!    the flag is put back at once, the file re-hashed, a critical alert sent.
//! 3. **BPF LSM** (where the kernel allows it): the same operations,
//!    including flag changes, are refused before the VFS for every process
//!    but the daemon.
//!
//! Approval windows lift the flag (and the LSM refusal) for one file; at the
//! end the flag returns and the new SHA-256 becomes the declared state,
//! persisted in `<state_dir>/protect.json` (see [`state`]).
//!
//! The event loop polls [`Protector::wait`], which is cancel-safe (it only
//! awaits the kernel ring, timers, approval answers and hashes computed off
//! the loop), and hands what it returns to [`Protector::handle`] in code a
//! `select!` can't drop. Audit entries, alerts and acts (a flag lifted for a
//! window) go through the daemon's one effect pipeline
//! ([`crate::effects`]), so they keep their order with everything else the
//! daemon does, and a window's flag is lifted only once its entry is
//! durable. Hashing runs on the blocking pool, the state file on a thread
//! of its own.

pub mod attempt;
pub mod config;
pub mod glob;
pub mod kernel;
mod newfiles;
pub mod state;

use std::{
    collections::{BTreeMap, HashMap},
    fs::File,
    io::Read,
    path::{Path, PathBuf},
    sync::{atomic::AtomicBool, Arc},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{bail, Context, Result};
use governor_alerts::{
    approval::{request_approval, ApprovalOutcome, ApprovalRequest},
    Alert, Severity, ValidatedTelegram,
};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::Digest;
use tokio::sync::{mpsc, oneshot};

pub use self::config::{check, check_all, ApproveVia, ProtectConfig, Target, Tier};
use self::{
    attempt::{key_of, key_string, Attempt},
    kernel::KernelLayer,
    state::{Declared, State, WindowRecord, STATE_FILE},
};
use crate::{
    effects::{Effect, Effects},
    fsflags::{self, FS_IMMUTABLE_FL},
    statefile::StateFile,
};
use governor_common::protect::{
    name_hash, Op, INODE_DENY, INODE_DIR_GUARD, INODE_PROTECTED, INODE_SESSION,
};
/// The kernel ABI types (shared with the eBPF programs).
pub use governor_common::{protect as abi, InodeKey};

/// Attempt entries queued for the audit log beyond which further attempts
/// are counted instead (each entry is an fsync; a flood must not grow the
/// daemon's memory without bound).
const MAX_AUDIT_BACKLOG: usize = 4096;

/// What the daemon protects without being told.
#[derive(Debug, Clone, Default)]
pub struct Implicit {
    /// The daemon's config file (UNTOUCHABLE).
    pub config_path: Option<PathBuf>,
    /// The daemon's binary (UNTOUCHABLE). Leave `None` for a binary cargo
    /// rebuilds in place: an immutable file can't be replaced.
    pub binary_path: Option<PathBuf>,
    /// The state directory: guarded by layers 2 and 3 (its files change
    /// all the time, so it can't be immutable).
    pub state_dir: PathBuf,
    /// The audit log (append-only, set by the audit writer; recorded here).
    pub audit_log: Option<PathBuf>,
    /// `[alerts.telegram]`, for `approve_via = "telegram"`.
    pub telegram: Option<governor_alerts::TelegramConfig>,
}

/// Who asks for a window, as the daemon found out.
#[derive(Debug, Clone)]
pub struct Caller {
    pub uid: u32,
    /// Its session id: an UNTOUCHABLE window admits this session only.
    pub session: Option<u32>,
    /// `Ok(how)` when it is a human at a login terminal, else why not.
    pub human: std::result::Result<String, String>,
}

/// What start or reload did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StartReport {
    pub files: usize,
    pub untouchable: usize,
    pub protected: usize,
    /// `[drift] watch` files (not flagged).
    pub watched: usize,
    /// Files that carry the immutable flag now.
    pub flagged: usize,
    /// Enforcement layers running.
    pub layers: Vec<String>,
    /// Layer → why it is not running.
    pub layer_errors: BTreeMap<String, String>,
    /// How attempt logging sees syscalls (`None` when it is off).
    pub attempt_backend: Option<kernel::AttemptBackend>,
    /// Config problems (missing path, directory, empty glob, bad list line).
    pub problems: Vec<String>,
    /// Files on filesystems that can't hold the flag (layers 2/3 only).
    pub unflaggable: Vec<String>,
    pub missing: Vec<String>,
    /// Content differs from the declared SHA-256 (changed while the daemon
    /// was down, or by reload time).
    pub changed: Vec<String>,
    /// Windows closed at start because the daemon died while they were open.
    pub windows_closed: Vec<String>,
    pub added: Vec<String>,
    pub removed: Vec<String>,
    /// Time until every file carried its flag.
    pub flags_ms: f64,
    pub total_ms: f64,
    /// Where loading the eBPF layers spent its time (ms, by phase).
    pub kernel_ms: Vec<(&'static str, f64)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum FlagState {
    Set,
    /// Lifted for an approval window.
    Lifted,
    Unsupported(String),
    Missing,
    Failed(String),
    /// The watched tier: never flagged.
    Watched,
}

impl FlagState {
    fn name(&self) -> String {
        match self {
            FlagState::Set => "immutable".into(),
            FlagState::Lifted => "lifted (window open)".into(),
            FlagState::Unsupported(e) => format!("unsupported: {e}"),
            FlagState::Missing => "file missing".into(),
            FlagState::Failed(e) => format!("failed: {e}"),
            FlagState::Watched => "none (watched: changes allowed, checked)".into(),
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    /// As configured (absolute).
    path: PathBuf,
    /// The file itself (symlinks resolved).
    real: PathBuf,
    tier: Tier,
    origin: String,
    key: Option<InodeKey>,
    flag: FlagState,
    declared: Option<String>,
    /// Last content change reported (so it is reported once).
    reported: Option<String>,
    /// Watched files: the last process that modified it since its
    /// declared content (pid, comm, exe, uid, service, op).
    writer: Option<Value>,
    /// An O_PATH descriptor of the file itself: where the kernel says it
    /// is now, after a parent was renamed or a mount laid over one.
    pin: Option<Arc<std::os::fd::OwnedFd>>,
}

/// Whether a path from the kernel side was cut at its copy's size.
fn truncated(given: &str) -> bool {
    given.len() + 1 >= abi::ATTEMPT_PATH_MAX
}

/// An absolute path with no `.`/`..`/empty components and no bytes that
/// were not UTF-8 (the string is then the kernel's bytes as they were).
fn literal(given: &str) -> bool {
    given.starts_with('/')
        && !given.contains('\u{fffd}')
        && given
            .split('/')
            .skip(1)
            .enumerate()
            .all(|(i, c)| !(c == "." || c == ".." || (c.is_empty() && i > 0)))
}

/// An O_PATH descriptor of `real` if it still is the inode `key`.
fn pin_of(real: &Path, key: Option<InodeKey>) -> Option<Arc<std::os::fd::OwnedFd>> {
    use rustix::fs::{Mode, OFlags};
    let key = key?;
    let fd = rustix::fs::open(
        real,
        OFlags::PATH | OFlags::CLOEXEC | OFlags::NOFOLLOW,
        Mode::empty(),
    )
    .ok()?;
    let st = rustix::fs::fstat(&fd).ok()?;
    let (major, minor) = (rustix::fs::major(st.st_dev), rustix::fs::minor(st.st_dev));
    let same = st.st_ino == key.ino && (major << 20 | minor) == key.dev;
    same.then(|| Arc::new(fd))
}

/// Where the kernel says a pinned file is now (`/proc/self/fd/N`).
fn now_at(pin: &std::os::fd::OwnedFd) -> Option<String> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", pin.as_raw_fd()))
        .ok()
        .map(|p| p.display().to_string())
}

/// What a watched file's reported content is when it was removed.
const REMOVED: &str = "(removed)";

/// An open drift item on a watched file.
#[derive(Debug, Clone, Serialize)]
pub struct DriftItem {
    pub path: PathBuf,
    pub since: String,
    pub declared_sha256: Option<String>,
    pub sha256: Option<String>,
    pub why: String,
    pub writer: Option<Value>,
}

#[derive(Debug, Clone)]
struct Window {
    until: Instant,
    until_wall: SystemTime,
    opened_at: SystemTime,
    reason: String,
    by_uid: u32,
    via: String,
    writes: u64,
    /// UNTOUCHABLE files: the one session (the approving login's) whose
    /// processes may write while the window is open, where BPF LSM runs.
    session: Option<u32>,
}

struct PendingApproval {
    path: PathBuf,
    dur: Duration,
    reason: String,
    uid: u32,
    session: Option<u32>,
    cancel: Arc<AtomicBool>,
}

struct ApprovalAnswer {
    id: String,
    outcome: ApprovalOutcome,
}

/// Why a file is being hashed off the loop.
enum HashFor {
    /// A scheduled re-check (after an unrefused write).
    Check(&'static str),
    /// The flag was cleared outside a window and put back: the tamper
    /// entry waits for the content's hash.
    Tamper(Box<TamperReport>),
}

struct TamperReport {
    path: PathBuf,
    detail: Value,
    alert: Alert,
    service: Option<String>,
}

struct Hashed {
    path: PathBuf,
    why: HashFor,
    sha256: Option<String>,
}

/// What [`Protector::wait`] woke up for; hand it to [`Protector::handle`].
pub struct Wake(WakeKind);

enum WakeKind {
    Events(Result<Vec<abi::AttemptEvent>>),
    Approval(ApprovalAnswer),
    Hashed(Hashed),
    Timer,
    /// Names created in a directory a protected glob covers.
    NewFiles(Vec<PathBuf>),
}

/// The protected-files engine the daemon owns.
pub struct Protector {
    cfg: ProtectConfig,
    implicit: Implicit,
    /// Configured path → entry.
    files: BTreeMap<PathBuf, Entry>,
    /// Inode → configured path.
    by_key: HashMap<InodeKey, PathBuf>,
    /// Real path → configured path.
    by_real: HashMap<PathBuf, PathBuf>,
    state_dir_key: Option<InodeKey>,
    /// Directories on the way to protected files, to resolve relative paths
    /// of processes that are already gone.
    dirs: HashMap<InodeKey, PathBuf>,
    kernel: Option<KernelLayer>,
    kernel_error: Option<String>,
    windows: BTreeMap<PathBuf, Window>,
    rehash: Vec<(Instant, PathBuf)>,
    pending: HashMap<String, PendingApproval>,
    approvals_tx: mpsc::UnboundedSender<ApprovalAnswer>,
    approvals_rx: mpsc::UnboundedReceiver<ApprovalAnswer>,
    telegram: Option<ValidatedTelegram>,
    /// The daemon's effect pipeline: audit entries, alerts, acts.
    effects: Effects,
    /// Off-loop hashes coming back.
    hashed_tx: mpsc::UnboundedSender<Hashed>,
    hashed_rx: mpsc::UnboundedReceiver<Hashed>,
    state_file: StateFile,
    /// Attempt entries not written because the backlog was full (a process
    /// hammering a protected file must not exhaust memory or disk); reported
    /// as one summary entry once the backlog drains.
    suppressed: u64,
    services: Arc<dyn Fn(u32) -> Option<String> + Send + Sync>,
    next_drop_check: Instant,
    last_drops: u64,
    syscall_names: BTreeMap<u32, &'static str>,
    /// Attempts reported (for tests and status).
    pub attempts_seen: u64,
    /// Attempts by (tier, result), for `/metrics`.
    pub attempt_counts: BTreeMap<(&'static str, &'static str), u64>,
    /// Attempt events read from the kernel ring (matched or not).
    pub attempt_events: u64,
    /// `[export] events`: attempts go there too.
    pub export: Option<crate::export::Exporter>,
    /// Per uid and budget class: the kernel's count of its unreported
    /// records, as far as audited.
    counted: HashMap<(u32, abi::BudgetClass), u64>,
    /// inotify on the directories of protected globs.
    new_files: Option<newfiles::NewFiles>,
    /// Open drift items of watched files, by configured path.
    drift: BTreeMap<PathBuf, DriftItem>,
}

/// SHA-256 of a file's content, lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = sha2::Sha256::new();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn now_rfc3339() -> String {
    crate::events::rfc3339(SystemTime::now())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn is_unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTTY) | Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS)
    )
}

/// Sets or clears the immutable flag on `path`.
fn set_immutable(path: &Path, on: bool) -> std::io::Result<()> {
    let f = File::open(path)?;
    fsflags::set_flag(&f, FS_IMMUTABLE_FL, on)
}

fn is_immutable(path: &Path) -> std::io::Result<bool> {
    let f = File::open(path)?;
    Ok(fsflags::get_flags(&f)? & FS_IMMUTABLE_FL != 0)
}

/// Directories from `p`'s parent up to `/`.
fn ancestors(p: &Path) -> impl Iterator<Item = &Path> {
    p.ancestors().skip(1)
}

impl Protector {
    /// Applies the flags, loads the kernel layers, reconciles with the
    /// declared state and reports. Files are flagged before anything else,
    /// so protection does not wait for the eBPF load.
    pub async fn start(
        cfg: &ProtectConfig,
        implicit: Implicit,
        effects: Effects,
        services: Arc<dyn Fn(u32) -> Option<String> + Send + Sync>,
    ) -> Result<(Protector, StartReport)> {
        let t0 = Instant::now();
        let (approvals_tx, approvals_rx) = mpsc::unbounded_channel();
        let (hashed_tx, hashed_rx) = mpsc::unbounded_channel();
        let fx = effects.clone();
        let state_file = StateFile::spawn(implicit.state_dir.join(STATE_FILE), move |p, e| {
            fx.submit(Effect::alert_only(Alert::new(
                Severity::Critical,
                "protected files",
                format!("cannot save the declared state to {}: {e:#}", p.display()),
            )));
        })?;
        let telegram = implicit.telegram.as_ref().and_then(|t| t.validate().ok());
        let mut p = Protector {
            cfg: cfg.clone(),
            implicit,
            files: BTreeMap::new(),
            by_key: HashMap::new(),
            by_real: HashMap::new(),
            state_dir_key: None,
            dirs: HashMap::new(),
            kernel: None,
            kernel_error: None,
            windows: BTreeMap::new(),
            rehash: Vec::new(),
            pending: HashMap::new(),
            approvals_tx,
            approvals_rx,
            telegram,
            effects,
            hashed_tx,
            hashed_rx,
            state_file,
            suppressed: 0,
            services,
            next_drop_check: Instant::now() + Duration::from_secs(1),
            last_drops: 0,
            syscall_names: kernel::syscall_names(),
            attempts_seen: 0,
            attempt_counts: BTreeMap::new(),
            attempt_events: 0,
            export: None,
            counted: HashMap::new(),
            new_files: None,
            drift: BTreeMap::new(),
        };
        let mut report = StartReport::default();

        // Layer 1 first.
        let targets = p.targets(&mut report);
        for t in &targets {
            p.add_entry(t, &mut report);
        }
        report.flags_ms = t0.elapsed().as_secs_f64() * 1e3;

        // Layers 2 and 3.
        match KernelLayer::load(cfg.ring_size.0 as u32, cfg.attempt_logging, cfg.lsm) {
            Ok(k) => {
                if let Err(e) = &k.lsm {
                    report.layer_errors.insert("bpf-lsm".into(), e.clone());
                }
                report.kernel_ms = k.timings.clone();
                report.attempt_backend = k.backend.clone();
                if !cfg.attempt_logging {
                    report.layer_errors.insert(
                        "ebpf-attempt-logging".into(),
                        "disabled by [protect] attempt_logging = false".into(),
                    );
                }
                p.kernel = Some(k);
            }
            Err(e) => {
                let msg = format!("{e:#}");
                report
                    .layer_errors
                    .insert("ebpf-attempt-logging".into(), msg.clone());
                report.layer_errors.insert("bpf-lsm".into(), msg.clone());
                p.kernel_error = Some(msg);
            }
        }
        p.index_state_dir();
        let keys: Vec<PathBuf> = p.files.keys().cloned().collect();
        for path in &keys {
            p.register(path);
        }

        // Reconcile with the declared state.
        let state_path = p.state_path();
        let state = match State::load(&state_path) {
            Ok(s) => s,
            Err(e) => {
                report
                    .problems
                    .push(format!("{e:#}; declared hashes start afresh"));
                State::default()
            }
        };
        for w in &state.windows {
            let path = PathBuf::from(&w.path);
            if let Some(e) = p.files.get_mut(&path) {
                // The flag is already back (applied above): the content the
                // window left becomes the declared state.
                let new = sha256_file(&e.real).ok();
                let old = state.files.get(&w.path).map(|d| d.sha256.clone());
                e.declared = new.clone();
                report.windows_closed.push(w.path.clone());
                p.audit(
                    "protect.window_close",
                    None,
                    json!({
                        "path": w.path, "why": "the daemon stopped while the window was open; closed at start",
                        "opened_at": w.opened_at, "reason": w.reason, "by_uid": w.by_uid,
                        "old_sha256": old, "new_sha256": new, "changed": old != new,
                    }),
                );
            }
        }
        for (path, e) in p.files.iter_mut() {
            if e.flag == FlagState::Missing && e.tier != Tier::Watched {
                continue;
            }
            if report.windows_closed.iter().any(|w| Path::new(w) == path) {
                continue;
            }
            let current = sha256_file(&e.real).ok();
            let declared = state
                .files
                .get(&path.display().to_string())
                .map(|d| d.sha256.clone());
            let reported = state
                .files
                .get(&path.display().to_string())
                .and_then(|d| d.drift_sha256.clone());
            if e.tier == Tier::Watched {
                match (declared, current) {
                    (Some(d), c) if Some(&d) != c.as_ref() => {
                        e.declared = Some(d.clone());
                        let marker = c.clone().unwrap_or_else(|| REMOVED.to_string());
                        e.reported = Some(marker.clone());
                        let seen = reported.as_deref() == Some(marker.as_str());
                        let why = if seen {
                            "reported earlier, not yet accepted".to_string()
                        } else {
                            report.changed.push(path.display().to_string());
                            "changed while unobserved (governor was not running)".to_string()
                        };
                        let item = DriftItem {
                            path: path.clone(),
                            since: now_rfc3339(),
                            declared_sha256: Some(d.clone()),
                            sha256: c.clone(),
                            why: why.clone(),
                            writer: None,
                        };
                        if !seen {
                            p.effects.submit(
                                Effect::audit("drift.config", None, json!(item)).with_alert(
                                    Alert::new(
                                        Severity::Warning,
                                        "drift",
                                        format!(
                                            "{} changed while governor was down",
                                            path.display()
                                        ),
                                    )
                                    .with_body(format!(
                                        "declared sha256 {d}\nactual   sha256 {}",
                                        c.as_deref().unwrap_or("(removed)")
                                    )),
                                ),
                            );
                        }
                        p.drift.insert(path.clone(), item);
                    }
                    (Some(d), _) => e.declared = Some(d),
                    (None, c) => e.declared = c,
                }
                continue;
            }
            match (declared, current) {
                (Some(d), Some(c)) if d != c => {
                    report.changed.push(path.display().to_string());
                    e.declared = Some(d.clone());
                    e.reported = Some(c.clone());
                    p.effects.submit(
                        Effect::audit(
                            "protect.changed_while_down",
                            None,
                            json!({
                                "path": path, "tier": e.tier.name(),
                                "declared_sha256": d, "actual_sha256": c,
                            }),
                        )
                        .with_alert(
                            Alert::new(
                                Severity::Critical,
                                "protected file changed",
                                format!("{} changed while governor was down", path.display()),
                            )
                            .with_body(format!("declared sha256 {d}\nactual   sha256 {c}")),
                        ),
                    );
                }
                (Some(d), _) => e.declared = Some(d),
                (None, c) => e.declared = c,
            }
        }
        p.save_state();
        p.rewatch(&mut report);
        p.finish_report(&mut report);
        report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
        p.audit(
            "protect.start",
            None,
            json!({
                "files": report.files, "untouchable": report.untouchable,
                "protected": report.protected, "flagged": report.flagged,
                "layers": report.layers, "layer_errors": report.layer_errors,
                "attempt_backend": report.attempt_backend.as_ref().map(|b| b.label()),
                "attempt_backend_detail": report.attempt_backend.as_ref().map(|b| b.describe()),
                "problems": report.problems, "unflaggable": report.unflaggable,
                "missing": report.missing, "changed_while_down": report.changed,
                "windows_closed": report.windows_closed,
                "flags_ms": report.flags_ms, "total_ms": report.total_ms,
                "kernel_ms": report.kernel_ms,
            }),
        );
        p.alert_report(&report);
        Ok((p, report))
    }

    fn state_path(&self) -> PathBuf {
        self.implicit.state_dir.join(STATE_FILE)
    }

    /// Configured plus implicit targets.
    fn targets(&self, report: &mut StartReport) -> Vec<Target> {
        let cfg_file = self
            .implicit
            .config_path
            .clone()
            .unwrap_or_else(|| PathBuf::from("config"));
        let ex = config::expand(&self.cfg, &cfg_file, "");
        for e in ex.problems {
            let place = if e.line > 0 {
                format!("{}:{}: ", e.file.display(), e.line)
            } else {
                String::new()
            };
            let key = e.key.map(|k| format!("key `{k}`: ")).unwrap_or_default();
            report.problems.push(format!("{place}{key}{}", e.reason));
        }
        let mut targets = ex.targets;
        for (p, what) in [
            (&self.implicit.config_path, "the daemon's config"),
            (&self.implicit.binary_path, "the daemon's binary"),
        ] {
            if let Some(p) = p {
                // UNTOUCHABLE whatever a glob in [protect] or [drift] says.
                if let Some(t) = targets.iter_mut().find(|t| &t.path == p) {
                    t.tier = Tier::Untouchable;
                } else {
                    targets.push(Target {
                        path: p.clone(),
                        tier: Tier::Untouchable,
                        origin: format!("implicit: {what}"),
                    });
                }
            }
        }
        targets
    }

    /// Flags one file and records it (not yet in the kernel maps).
    fn add_entry(&mut self, t: &Target, report: &mut StartReport) {
        let real = std::fs::canonicalize(&t.path).unwrap_or_else(|_| t.path.clone());
        let (key, flag) = match std::fs::metadata(&real) {
            Err(_) => {
                report.missing.push(t.path.display().to_string());
                (None, FlagState::Missing)
            }
            Ok(md) => {
                let key = attempt::key_from_md(&md);
                let flag = if t.tier == Tier::Watched {
                    FlagState::Watched
                } else if self.windows.contains_key(&t.path) {
                    FlagState::Lifted
                } else {
                    match set_immutable(&real, true) {
                        Ok(()) => FlagState::Set,
                        Err(e) if is_unsupported(&e) => {
                            report
                                .unflaggable
                                .push(format!("{}: {e}", t.path.display()));
                            FlagState::Unsupported(e.to_string())
                        }
                        Err(e) => {
                            report
                                .unflaggable
                                .push(format!("{}: {e}", t.path.display()));
                            FlagState::Failed(e.to_string())
                        }
                    }
                };
                (Some(key), flag)
            }
        };
        for d in ancestors(&t.path).chain(ancestors(&real)) {
            if let Some(k) = key_of(d, true) {
                self.dirs.entry(k).or_insert_with(|| d.to_path_buf());
            }
        }
        if let Some(k) = key {
            self.by_key.insert(k, t.path.clone());
        }
        self.by_real.insert(real.clone(), t.path.clone());
        let pin = pin_of(&real, key);
        self.files.insert(
            t.path.clone(),
            Entry {
                path: t.path.clone(),
                real,
                tier: t.tier,
                origin: t.origin.clone(),
                key,
                flag,
                declared: None,
                reported: None,
                writer: None,
                pin,
            },
        );
    }

    fn index_state_dir(&mut self) {
        let dir = self.implicit.state_dir.clone();
        self.state_dir_key = key_of(&dir, true);
        for d in dir.ancestors() {
            if let Some(k) = key_of(d, true) {
                self.dirs.entry(k).or_insert_with(|| d.to_path_buf());
            }
        }
        if let (Some(k), Some(kernel)) = (self.state_dir_key, self.kernel.as_mut()) {
            if let Err(e) = kernel.set_inode(k, INODE_PROTECTED | INODE_DENY | INODE_DIR_GUARD) {
                log::warn!("protect: guarding the state directory: {e:#}");
            }
            for n in [STATE_FILE, "audit.jsonl", "audit.head"] {
                let _ = kernel.add_name(name_hash(n.as_bytes()));
            }
        }
    }

    /// Puts one entry's inode and names into the kernel maps.
    fn register(&mut self, path: &Path) {
        let Some(e) = self.files.get(path) else {
            return;
        };
        let Some(kernel) = self.kernel.as_mut() else {
            return;
        };
        if let Some(k) = e.key {
            let (flags, session) = match self.windows.get(path) {
                Some(Window {
                    session: Some(s), ..
                }) => (INODE_PROTECTED | INODE_SESSION, Some(*s)),
                Some(_) => (INODE_PROTECTED, None),
                None if e.tier == Tier::Watched => (INODE_PROTECTED, None),
                None => (INODE_PROTECTED | INODE_DENY, None),
            };
            // The session first: a flag naming a session not yet in the
            // map refuses everyone, never admits anyone.
            if let Err(err) = kernel.set_session(k, session) {
                log::error!("protect: {}: {err:#}", path.display());
            }
            if let Err(err) = kernel.set_inode(k, flags) {
                log::error!("protect: {}: {err:#}", path.display());
            }
        }
        for p in [&e.path, &e.real] {
            if let Some(n) = p.file_name() {
                let _ = kernel.add_name(name_hash(n.as_encoded_bytes()));
            }
        }
    }

    fn finish_report(&self, report: &mut StartReport) {
        report.files = self.files.len();
        report.untouchable = self
            .files
            .values()
            .filter(|e| e.tier == Tier::Untouchable)
            .count();
        report.watched = self
            .files
            .values()
            .filter(|e| e.tier == Tier::Watched)
            .count();
        report.protected = report.files - report.untouchable - report.watched;
        if report.watched > 0 && (self.kernel.is_none() || !self.cfg.attempt_logging) {
            report.problems.push(format!(
                "drift.watch: {} watched files, but attempt logging is not running: their changes \
                 are found at start only (see governor doctor)",
                report.watched
            ));
        }
        report.flagged = self
            .files
            .values()
            .filter(|e| e.flag == FlagState::Set)
            .count();
        report.layers = self.layers();
        if !report.layers.iter().any(|l| l == "vfs-flags") {
            report
                .layer_errors
                .entry("vfs-flags".into())
                .or_insert_with(|| "no protected file could take the immutable flag".into());
        }
    }

    fn alert_report(&self, report: &StartReport) {
        if !report.unflaggable.is_empty() {
            self.alert(
                Alert::new(
                    Severity::Critical,
                    "protected files",
                    format!(
                        "{} protected file(s) can't hold the immutable flag",
                        report.unflaggable.len()
                    ),
                )
                .with_body(format!(
                    "{}\nThey rely on attempt logging{}.",
                    report.unflaggable.join("\n"),
                    if self.layers().iter().any(|l| l == "bpf-lsm") {
                        " and BPF LSM"
                    } else {
                        " only: the kernel does not refuse writes to them"
                    }
                )),
            );
        }
        if !report.problems.is_empty() || !report.missing.is_empty() {
            self.alert(
                Alert::new(
                    Severity::Warning,
                    "protected files",
                    format!(
                        "protect config: {} problem(s), {} missing file(s)",
                        report.problems.len(),
                        report.missing.len()
                    ),
                )
                .with_body(
                    report
                        .problems
                        .iter()
                        .chain(&report.missing)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("\n"),
                ),
            );
        }
    }

    /// Queues an audit entry on the effect pipeline.
    fn audit(&self, kind: &str, service: Option<String>, d: Value) {
        self.effects
            .submit(Effect::audit(kind, service.as_deref(), d));
    }

    /// Queues an alert on the effect pipeline (after the entries queued
    /// before it).
    fn alert(&self, a: Alert) {
        self.effects.submit(Effect::alert_only(a));
    }

    fn backlog(&self) -> usize {
        self.effects.backlog()
    }

    /// Waits until everything queued so far is carried out.
    pub async fn flush(&self) {
        self.effects.flush().await;
    }

    /// Reports attempts suppressed under a full backlog, once it drained.
    fn report_suppressed(&mut self) {
        if self.suppressed > 0 && self.backlog() < MAX_AUDIT_BACKLOG / 2 {
            let n = std::mem::take(&mut self.suppressed);
            self.audit(
                "protect.attempts_suppressed",
                None,
                json!({"count": n, "why": "audit backlog full: a flood of attempts"}),
            );
            self.alert(Alert::new(
                Severity::Critical,
                "protected files",
                format!("{n} protected-file attempts were not audited one by one (flood)"),
            ));
        }
    }

    fn save_state(&self) {
        let mut st = State::default();
        for (p, e) in &self.files {
            // A watched file that is gone keeps its declared content (its
            // removal is drift until accepted), under no inode.
            let key = e.key.or_else(|| {
                (e.tier == Tier::Watched).then_some(InodeKey {
                    dev: 0,
                    _pad: 0,
                    ino: 0,
                })
            });
            if let (Some(sha), Some(k)) = (&e.declared, key) {
                st.files.insert(
                    p.display().to_string(),
                    Declared {
                        sha256: sha.clone(),
                        tier: e.tier.name().into(),
                        dev: k.dev,
                        ino: k.ino,
                        declared_at: now_rfc3339(),
                        drift_sha256: if e.tier == Tier::Watched {
                            e.reported.clone()
                        } else {
                            None
                        },
                    },
                );
            }
        }
        for (p, w) in &self.windows {
            st.windows.push(WindowRecord {
                path: p.display().to_string(),
                opened_at: crate::events::rfc3339(w.opened_at),
                until_unix_ms: unix_ms(w.until_wall),
                reason: w.reason.clone(),
                by_uid: w.by_uid,
                via: w.via.clone(),
            });
        }
        match st.to_bytes() {
            Ok(b) => self.state_file.save(b),
            Err(e) => log::error!("protect: serialising the declared state: {e:#}"),
        }
    }

    fn lsm_active(&self) -> bool {
        self.kernel.as_ref().is_some_and(|k| k.lsm.is_ok())
    }

    /// Enforcement layers running now.
    pub fn layers(&self) -> Vec<String> {
        let mut l = Vec::new();
        if self.files.is_empty() || self.files.values().any(|e| e.flag == FlagState::Set) {
            l.push("vfs-flags".to_string());
        }
        if let Some(k) = &self.kernel {
            if !k.attached.is_empty() {
                l.push("ebpf-attempt-logging".to_string());
            }
            if k.lsm.is_ok() {
                l.push("bpf-lsm".to_string());
            }
        }
        l
    }

    /// `governor protect list --json`.
    pub fn list(&self) -> Value {
        let files: Vec<Value> = self
            .files
            .values()
            .map(|e| {
                let w = self.windows.get(&e.path);
                // Protection follows the inode: after a parent's rename or
                // a mount laid over one, say where the file is now.
                let now = e.pin.as_deref().and_then(now_at);
                let configured = match (e.key, key_of(&e.path, true)) {
                    (None, _) => "missing",
                    (Some(_), None) => "names nothing now",
                    (Some(k), Some(h)) if k != h => "names another file now",
                    _ => "this file",
                };
                json!({
                    "path": e.path,
                    "real_path": e.real,
                    "now_at": now,
                    "configured_path": configured,
                    "tier": e.tier.name(),
                    "origin": e.origin,
                    "dev_ino": e.key.map(|k| key_string(&k)),
                    "flag": e.flag.name(),
                    "flag_set": e.flag == FlagState::Set,
                    "declared_sha256": e.declared,
                    "drift": self.drift.get(&e.path),
                    "window": w.map(|w| json!({
                        "until": crate::events::rfc3339(w.until_wall),
                        "remaining_s": w.until.saturating_duration_since(Instant::now()).as_secs(),
                        "reason": w.reason, "by_uid": w.by_uid, "via": w.via,
                        "writes": w.writes, "session": w.session,
                        "session_enforced": w.session.is_some() && self.lsm_active(),
                    })),
                })
            })
            .collect();
        json!({
            "layers": self.layers(),
            "state_dir": self.implicit.state_dir,
            "files": files,
        })
    }

    // -----------------------------------------------------------------
    // The event loop side.

    fn next_deadline(&self) -> Instant {
        let mut d = self.next_drop_check;
        for w in self.windows.values() {
            d = d.min(w.until);
        }
        for (t, _) in &self.rehash {
            d = d.min(*t);
        }
        d
    }

    /// Waits for attempt events, timers (window ends, re-hashes), approval
    /// answers and hashes computed off the loop. Cancel-safe: it only
    /// waits; [`handle`](Self::handle) does the work.
    pub async fn wait(&mut self) -> Wake {
        let deadline = tokio::time::Instant::from_std(self.next_deadline());
        let ring = self.kernel.as_mut();
        let rx = &mut self.approvals_rx;
        let hashed = &mut self.hashed_rx;
        let created = self.new_files.as_mut();
        Wake(tokio::select! {
            n = async move {
                match created {
                    Some(w) => w.next().await,
                    None => std::future::pending().await,
                }
            } => WakeKind::NewFiles(n),
            r = async move {
                match ring {
                    Some(k) => k.next_batch().await,
                    None => std::future::pending().await,
                }
            } => WakeKind::Events(r),
            Some(a) = rx.recv() => WakeKind::Approval(a),
            Some(h) = hashed.recv() => WakeKind::Hashed(h),
            _ = tokio::time::sleep_until(deadline) => WakeKind::Timer,
        })
    }

    /// Handles what [`wait`](Self::wait) returned. Await it in a `select!`
    /// branch body, never in a branch future: an approved window is opened
    /// (its entry durable, then its flag lifted) before it returns.
    pub async fn handle(&mut self, w: Wake) {
        match w.0 {
            WakeKind::Events(Ok(evs)) => {
                for ev in evs {
                    self.on_event(&ev);
                }
                self.report_suppressed();
            }
            WakeKind::Events(Err(e)) => {
                log::error!("protect: reading the attempt ring: {e:#}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            WakeKind::Approval(a) => self.on_approval(a).await,
            WakeKind::Hashed(h) => self.on_hashed(h),
            WakeKind::Timer => self.on_timers().await,
            WakeKind::NewFiles(paths) => self.on_new_files(paths).await,
        }
    }

    /// (Re)watches the directories of the protected globs.
    fn rewatch(&mut self, report: &mut StartReport) {
        let patterns: Vec<String> = self
            .cfg
            .untouchable
            .iter()
            .chain(&self.cfg.protected)
            .chain(&self.cfg.watch)
            .map(|p| p.get_ref().clone())
            .collect();
        let (w, problems) = newfiles::NewFiles::watch(&newfiles::dirs_for(&patterns));
        self.new_files = w;
        report.problems.extend(problems);
    }

    /// Names appeared in a protected glob's directory: if `[protect]` now
    /// covers a file it didn't, it is flagged (through a reload of the
    /// same config) and audited with how long that took.
    async fn on_new_files(&mut self, created: Vec<PathBuf>) {
        let t0 = Instant::now();
        let mut report = StartReport::default();
        let wanted = self.targets(&mut report);
        let new: Vec<&Target> = wanted
            .iter()
            .filter(|t| !self.files.contains_key(&t.path))
            .collect();
        log::debug!(
            "protect: {} name(s) appeared in watched directories, {} newly protected",
            created.len(),
            new.len()
        );
        if new.is_empty() {
            return;
        }
        let paths: Vec<String> = new.iter().map(|t| t.path.display().to_string()).collect();
        let tiers: Vec<&str> = new.iter().map(|t| t.tier.name()).collect();
        let new: Vec<Target> = new.into_iter().cloned().collect();
        // Only the new files: flagged first, then hashed (a full reload
        // would re-hash every protected file, the daemon's binary too).
        let mut flagged = Vec::new();
        for t in &new {
            self.add_entry(t, &mut report);
            self.register(&t.path);
            if let Some(e) = self.files.get_mut(&t.path) {
                if e.tier != Tier::Watched && e.key.is_some() && e.flag != FlagState::Set {
                    match set_immutable(&e.real, true) {
                        Ok(()) => e.flag = FlagState::Set,
                        Err(err) => e.flag = FlagState::Failed(err.to_string()),
                    }
                }
                flagged.push(json!({"path": e.path, "flag": e.flag.name()}));
            }
        }
        let flagged_ms = t0.elapsed().as_secs_f64() * 1e3;
        for t in &new {
            if let Some(e) = self.files.get_mut(&t.path) {
                e.declared = sha256_file(&e.real).ok();
            }
        }
        self.save_state();
        self.audit(
            "protect.new_file",
            None,
            json!({"paths": paths, "tiers": tiers, "seen": created.len(),
                   "flagged_ms": flagged_ms, "flags": flagged, "problems": report.problems,
                   "why": "created after start in a directory a protected glob covers"}),
        );
    }

    /// Hashes `path` on the blocking pool; the result comes back through
    /// [`wait`](Self::wait).
    fn hash_off_loop(&self, path: PathBuf, real: PathBuf, why: HashFor) {
        let tx = self.hashed_tx.clone();
        tokio::task::spawn_blocking(move || {
            let sha256 = sha256_file(&real).ok();
            let _ = tx.send(Hashed { path, why, sha256 });
        });
    }

    async fn on_timers(&mut self) {
        self.report_suppressed();
        let now = Instant::now();
        let due: Vec<PathBuf> = self
            .windows
            .iter()
            .filter(|(_, w)| w.until <= now)
            .map(|(p, _)| p.clone())
            .collect();
        for p in due {
            if let Err(e) = self.close_window(&p, "expired").await {
                log::error!("protect: closing the window on {}: {e:#}", p.display());
            }
        }
        let (due, later): (Vec<_>, Vec<_>) = self.rehash.drain(..).partition(|(t, _)| *t <= now);
        self.rehash = later;
        for (_, p) in due {
            if self.windows.contains_key(&p) {
                continue;
            }
            if let Some(e) = self.files.get(&p) {
                // Make sure the flag is on (it may have been cleared).
                if e.flag == FlagState::Set && !is_immutable(&e.real).unwrap_or(true) {
                    let _ = set_immutable(&e.real, true);
                }
                let real = e.real.clone();
                self.hash_off_loop(p, real, HashFor::Check("re-hash after an unrefused write"));
            }
        }
        if now >= self.next_drop_check {
            // Every second: the ring's losses, and the uids whose attempts
            // the kernel counted instead of reporting (a flood that ended
            // reports its tail here).
            self.next_drop_check = now + Duration::from_secs(1);
            let counted = self
                .kernel
                .as_ref()
                .map(|k| k.suppressed())
                .unwrap_or_default();
            for (uid, class, total) in counted {
                self.counted_in_kernel(uid, class, total);
            }
            if let Some(k) = &self.kernel {
                if let Ok(d) = k.dropped() {
                    if d > self.last_drops {
                        let lost = d - self.last_drops;
                        self.last_drops = d;
                        log::warn!("protect: {lost} attempt events lost (ring full)");
                        self.audit(
                            "protect.events_lost",
                            None,
                            json!({"lost": lost, "total": d}),
                        );
                        self.alert(Alert::new(
                            Severity::Critical,
                            "protected files",
                            format!("{lost} protected-file attempt events lost (ring full)"),
                        ));
                    }
                }
            }
        }
    }

    /// `uid`'s running count of records of one class the kernel counted
    /// instead of reporting (over `ATTEMPT_BURST` a second): what is new
    /// since the last report becomes one entry, "uid N tried M more times"
    /// (`protect.attempts_counted`) or, for successful calls on a
    /// protected basename that went unexamined, "uid N renamed/unlinked/…
    /// M more files named like protected ones"
    /// (`protect.name_matches_counted`).
    fn counted_in_kernel(&mut self, uid: u32, class: abi::BudgetClass, total: u64) {
        let last = self.counted.entry((uid, class)).or_insert(0);
        if total <= *last {
            return;
        }
        let n = total - *last;
        *last = total;
        let (metric, kind) = match class {
            abi::BudgetClass::Attempts => ("counted-in-kernel", "protect.attempts_counted"),
            abi::BudgetClass::NameMatches => (
                "name-matches-counted-in-kernel",
                "protect.name_matches_counted",
            ),
        };
        *self.attempt_counts.entry(("any", metric)).or_default() += n;
        // Counted attempts may include changes to watched files (allowed,
        // so nothing refused them): re-hash those, or drift could hide in a
        // flood.
        let watched: Vec<PathBuf> = self
            .files
            .values()
            .filter(|e| e.tier == Tier::Watched)
            .map(|e| e.path.clone())
            .collect();
        for w in watched {
            self.schedule_rehash(&w);
        }
        let user = crate::users::name_of(uid);
        if class == abi::BudgetClass::NameMatches {
            // Successful calls: nothing refused them, so none touched an
            // UNTOUCHABLE file (its flag refuses) or a PROTECTED one outside
            // its window; a watched file among them is re-hashed above. A
            // record, not an alarm: the usual cause is a program renaming
            // its own files that share a name with protected ones.
            self.audit(
                kind,
                None,
                json!({"uid": uid, "user": user, "count": n, "total": total,
                       "why": format!("more than {} successful calls a second from this uid on paths whose name a protected file also has: the kernel counted these instead of reporting each; its refused attempts have a budget of their own", abi::ATTEMPT_BURST)}),
            );
            return;
        }
        self.audit(
            kind,
            None,
            json!({"uid": uid, "user": user, "count": n, "total": total,
                   "why": format!("more than {} attempt records a second from this uid: the kernel counted these instead of reporting each (refused or on watched files)", abi::ATTEMPT_BURST)}),
        );
        self.alert(
            Alert::new(
                Severity::Warning,
                "protected files",
                format!("uid {uid} ({user}) is hammering: {n} more attempts counted"),
            )
            .with_body(format!("{total} in all since governor started; its first {} a second are audited one by one", abi::ATTEMPT_BURST)),
        );
    }

    /// Which protected thing an attempt concerns.
    fn match_attempt(&self, a: &Attempt) -> Option<(Option<PathBuf>, Option<PathBuf>)> {
        // (configured path of the file, resolved path) — file None = the
        // state directory.
        if let Some(k) = a.key {
            if let Some(p) = self.by_key.get(&k) {
                return Some((Some(p.clone()), self.files.get(p).map(|e| e.real.clone())));
            }
            if Some(k) == self.state_dir_key {
                return Some((None, Some(self.implicit.state_dir.clone())));
            }
        }
        for pa in &a.paths {
            let Some(abs) = &pa.absolute else {
                continue;
            };
            if let Some(k) = key_of(abs, pa.follow) {
                if let Some(p) = self.by_key.get(&k) {
                    let resolved = if pa.follow {
                        std::fs::canonicalize(abs).unwrap_or_else(|_| abs.clone())
                    } else {
                        abs.clone()
                    };
                    return Some((Some(p.clone()), Some(resolved)));
                }
            }
            if let Some(p) = self
                .files
                .get(abs)
                .map(|e| e.path.clone())
                .or_else(|| self.by_real.get(abs).cloned())
            {
                return Some((Some(p), Some(abs.clone())));
            }
        }
        // A path longer than the kernel side copies (ATTEMPT_PATH_MAX)
        // arrives cut short: a refused call on it is the protected file
        // whose path it begins, when exactly one does.
        if !a.allowed() {
            // Only a literal absolute path: `.`, `..` or `//` in it would
            // be collapsed before the match and let a caller aim the prefix
            // at a protected file its call never reached.
            for pa in a
                .paths
                .iter()
                .filter(|p| truncated(&p.given) && literal(&p.given))
            {
                let prefix = pa.given.as_bytes();
                let mut hits = self.files.values().filter(|e| {
                    [&e.path, &e.real]
                        .iter()
                        .any(|p| p.as_os_str().as_encoded_bytes().starts_with(prefix))
                });
                if let (Some(e), None) = (hits.next(), hits.next()) {
                    return Some((Some(e.path.clone()), Some(e.real.clone())));
                }
            }
        }
        // Entries of the guarded state directory.
        for pa in &a.paths {
            let Some(abs) = &pa.absolute else {
                continue;
            };
            let parent_is_state = abs
                .parent()
                .map(|d| key_of(d, true).is_some() && key_of(d, true) == self.state_dir_key)
                .unwrap_or(false);
            if parent_is_state || Some(abs.as_path()) == Some(self.implicit.state_dir.as_path()) {
                return Some((None, Some(abs.clone())));
            }
        }
        None
    }

    fn on_event(&mut self, ev: &abi::AttemptEvent) {
        self.attempt_events += 1;
        let spec = kernel::spec_of(ev.nr);
        let name = self.syscall_names.get(&ev.nr).copied().unwrap_or("?");
        let Some(a) = attempt::decode(
            ev,
            name,
            spec.map(|s| s.kind).unwrap_or(0),
            spec.map(|s| s.nofollow).unwrap_or(false),
            &self.dirs,
        ) else {
            return;
        };
        let Some((file, resolved)) = self.match_attempt(&a) else {
            return;
        };
        self.attempts_seen += 1;
        let service = (self.services)(a.pid);
        let entry = file.as_ref().and_then(|p| self.files.get(p)).cloned();
        let in_window = file
            .as_ref()
            .map(|p| self.windows.contains_key(p))
            .unwrap_or(false);
        let result = if a.allowed() { "allowed" } else { "denied" };
        let tier = entry
            .as_ref()
            .map(|e| e.tier.name())
            .unwrap_or("untouchable");
        *self.attempt_counts.entry((tier, result)).or_default() += 1;
        let mut d = json!({
            "op": a.op.name(),
            "syscall": a.syscall,
            "path": a.paths.first().map(|p| p.given.clone()),
            "path_truncated": a.paths.first().is_some_and(|p| truncated(&p.given)),
            "resolved": resolved,
            "file": file.clone().unwrap_or_else(|| self.implicit.state_dir.clone()),
            "tier": entry.as_ref().map(|e| e.tier.name()).unwrap_or("untouchable"),
            "dev_ino": entry.as_ref().and_then(|e| e.key).map(|k| key_string(&k))
                .or_else(|| self.state_dir_key.filter(|_| file.is_none()).map(|k| key_string(&k))),
            "pid": a.pid, "tid": a.tid, "ppid": a.ppid,
            "comm": a.comm, "exe": a.exe, "uid": a.uid,
            "service": service,
            "result": result,
            "errno": a.errno_name(),
            "window": in_window,
            "layers": self.layers(),
        });
        if let Some(obj) = d.as_object_mut() {
            if a.paths.len() > 1 {
                obj.insert("path2".into(), json!(a.paths[1].given));
            }
            match a.op {
                Op::Open => {
                    obj.insert("open_flags".into(), json!(format!("{:#o}", a.flags)));
                }
                Op::SetFlags => {
                    obj.insert("ioctl".into(), json!(format!("{:#x}", a.flags)));
                    obj.insert("new_flags".into(), json!(format!("{:#x}", a.arg)));
                }
                _ => {}
            }
        }
        if let Some(x) = &self.export {
            let mut line = json!({"type": "attempt",
                "ts": crate::events::rfc3339(std::time::SystemTime::now())});
            if let (Some(l), Some(o)) = (line.as_object_mut(), d.as_object()) {
                l.extend(o.iter().map(|(k, v)| (k.clone(), v.clone())));
            }
            x.send(line.to_string());
        }
        // Tampering: the flag came off outside a window.
        let watched = entry.as_ref().map(|e| e.tier) == Some(Tier::Watched);
        if a.op == Op::SetFlags && a.allowed() && !in_window && !watched {
            if let Some(e) = &entry {
                if self.on_tamper(&a, e, &mut d, service.clone()) {
                    return;
                }
            }
        }
        if let Some(p) = &file {
            if a.allowed() {
                if in_window {
                    if let Some(w) = self.windows.get_mut(p) {
                        w.writes += 1;
                    }
                    // An editor may have renamed a new file over it.
                    if a.op == Op::Rename || a.op == Op::Link {
                        self.refresh_key(p);
                    }
                } else if watched {
                    // Allowed: who did it is kept for the drift entry the
                    // re-hash may bring (a rename over it is a new inode).
                    // A rename over it, an unlink, a re-creation: the
                    // inode behind the path may have changed.
                    self.refresh_key(p);
                    if let Some(e) = self.files.get_mut(p) {
                        e.writer = Some(json!({
                            "pid": a.pid, "ppid": a.ppid, "comm": a.comm, "exe": a.exe,
                            "uid": a.uid, "service": service, "op": a.op.name(),
                            "syscall": a.syscall,
                        }));
                    }
                    self.schedule_rehash(p);
                } else {
                    // Not refused and not approved: the flag is missing.
                    self.schedule_rehash(p);
                    self.alert(
                        Alert::new(
                            Severity::Critical,
                            "protected file modified",
                            format!(
                                "{} on {} was allowed outside any approval window",
                                a.op.name(),
                                p.display()
                            ),
                        )
                        .with_body(format!(
                            "pid {} ({}) {} uid {}; flag: {}",
                            a.pid,
                            a.comm,
                            a.exe,
                            a.uid,
                            entry.as_ref().map(|e| e.flag.name()).unwrap_or_default()
                        )),
                    );
                }
            } else if entry.as_ref().map(|e| e.tier) == Some(Tier::Untouchable) {
                let mut alert = Alert::new(
                    Severity::Warning,
                    "protected file attempt",
                    format!("{} on UNTOUCHABLE {} denied", a.op.name(), p.display()),
                )
                .with_body(format!(
                    "pid {} ({}) {} uid {}",
                    a.pid, a.comm, a.exe, a.uid
                ));
                if let Some(s) = &service {
                    alert = alert.with_service(s.clone());
                }
                self.alert(alert);
            }
        }
        if self.backlog() >= MAX_AUDIT_BACKLOG {
            self.suppressed += 1;
            return;
        }
        self.audit("protect.attempt", service, d);
    }

    /// A successful flag change on a protected file outside a window. Puts
    /// the flag back if it is gone; returns whether it was tampering (and
    /// was audited as such).
    fn on_tamper(
        &mut self,
        a: &Attempt,
        e: &Entry,
        d: &mut Value,
        service: Option<String>,
    ) -> bool {
        match is_immutable(&e.real) {
            Ok(true) => return false,
            Ok(false) => {}
            Err(err) => {
                log::warn!("protect: reading flags of {}: {err}", e.real.display());
                return false;
            }
        }
        // Protection first: the flag goes back now, on the loop (one
        // ioctl); the content is hashed off it, and the entry and alert
        // follow with the hash (see on_hashed).
        let restore = set_immutable(&e.real, true);
        let latency_us = crate::events::monotonic_ns().saturating_sub(a.ts_ns) / 1000;
        if let Some(obj) = d.as_object_mut() {
            obj.insert("flag_restored".into(), json!(restore.is_ok()));
            if let Err(err) = &restore {
                obj.insert("restore_error".into(), json!(err.to_string()));
            }
            obj.insert("restored_after_us".into(), json!(latency_us));
            obj.insert("declared_sha256".into(), json!(e.declared));
        }
        // Writes that slipped in before the restore show up later.
        self.schedule_rehash(&e.path.clone());
        let alert = Alert::new(
            Severity::Critical,
            "protected file tampering",
            format!(
                "immutable flag cleared on {} {} — {}",
                e.tier.name().to_uppercase(),
                e.path.display(),
                if restore.is_ok() {
                    format!("put back after {latency_us} µs")
                } else {
                    "COULD NOT PUT IT BACK".to_string()
                }
            ),
        )
        .with_body(format!(
            "pid {} ppid {} ({}) {} uid {}",
            a.pid, a.ppid, a.comm, a.exe, a.uid,
        ));
        self.hash_off_loop(
            e.path.clone(),
            e.real.clone(),
            HashFor::Tamper(Box::new(TamperReport {
                path: e.path.clone(),
                detail: d.clone(),
                alert,
                service,
            })),
        );
        true
    }

    /// A hash computed off the loop is back.
    fn on_hashed(&mut self, h: Hashed) {
        match h.why {
            HashFor::Check(why) => match h.sha256 {
                Some(sha) => self.content_is(&h.path, sha, why),
                None => {
                    let gone = self
                        .files
                        .get(&h.path)
                        .is_some_and(|e| e.tier == Tier::Watched && !e.real.exists());
                    if gone {
                        self.watched_changed(&h.path, None, "removed");
                    }
                }
            },
            HashFor::Tamper(t) => {
                let TamperReport {
                    path,
                    mut detail,
                    mut alert,
                    service,
                } = *t;
                let declared = self.files.get(&path).and_then(|e| e.declared.clone());
                let changed = h.sha256.is_some() && h.sha256 != declared;
                if let Some(obj) = detail.as_object_mut() {
                    obj.insert("sha256".into(), json!(h.sha256));
                    obj.insert("content_changed".into(), json!(changed));
                }
                if changed {
                    if let Some(x) = self.files.get_mut(&path) {
                        x.reported = h.sha256.clone();
                    }
                    let body = std::mem::take(&mut alert.body);
                    alert = alert.with_body(format!(
                        "{body}\ncontent changed: declared {} now {}",
                        declared.as_deref().unwrap_or("?"),
                        h.sha256.as_deref().unwrap_or("?")
                    ));
                }
                if let Some(s) = &service {
                    alert = alert.with_service(s.clone());
                }
                self.effects.submit(
                    Effect::audit("protect.tamper", service.as_deref(), detail).with_alert(alert),
                );
            }
        }
    }

    /// Re-hashes a file and reports a content change once.
    /// Re-hashes a file (on the blocking pool) and reports a content
    /// change once.
    async fn check_content(&mut self, path: &Path, why: &str) {
        if self.windows.contains_key(path) {
            return;
        }
        let Some(e) = self.files.get(path) else {
            return;
        };
        // Make sure the flag is on (it may have been cleared).
        if e.flag == FlagState::Set && !is_immutable(&e.real).unwrap_or(true) {
            let _ = set_immutable(&e.real, true);
        }
        let real = e.real.clone();
        let Ok(Ok(now)) = tokio::task::spawn_blocking(move || sha256_file(&real)).await else {
            return;
        };
        self.content_is(path, now, why);
    }

    /// Reports, once, that `path` now hashes to `now` when that is not its
    /// declared content.
    fn content_is(&mut self, path: &Path, now: String, why: &str) {
        if self.windows.contains_key(path) {
            return;
        }
        let Some(e) = self.files.get_mut(path) else {
            return;
        };
        if e.tier == Tier::Watched {
            self.watched_changed(path, Some(now), why);
            return;
        }
        if Some(&now) == e.declared.as_ref() || Some(&now) == e.reported.as_ref() {
            return;
        }
        e.reported = Some(now.clone());
        let (tier, declared) = (e.tier, e.declared.clone());
        self.audit(
            "protect.content_changed",
            None,
            json!({
                "path": path, "tier": tier.name(), "why": why,
                "declared_sha256": declared, "sha256": now,
            }),
        );
        self.alert(
            Alert::new(
                Severity::Critical,
                "protected file changed",
                format!("{} no longer matches its declared SHA-256", path.display()),
            )
            .with_body(format!(
                "declared {}\nnow      {now}",
                declared.as_deref().unwrap_or("?")
            )),
        );
    }

    /// A watched file's content is `now` (None: removed). Back to its
    /// declared content closes its drift item; a new content is reported
    /// once, as `drift.config` with the writer.
    fn watched_changed(&mut self, path: &Path, now: Option<String>, why: &str) {
        let Some(e) = self.files.get_mut(path) else {
            return;
        };
        if now.is_some() && now == e.declared {
            e.reported = None;
            e.writer = None;
            if self.drift.remove(path).is_some() {
                self.save_state();
            }
            return;
        }
        if now.is_some() && now == e.reported {
            return;
        }
        if now.is_none() && self.drift.get(path).is_some_and(|d| d.sha256.is_none()) {
            return;
        }
        e.reported = Some(now.clone().unwrap_or_else(|| REMOVED.to_string()));
        let item = DriftItem {
            path: path.to_path_buf(),
            since: now_rfc3339(),
            declared_sha256: e.declared.clone(),
            sha256: now.clone(),
            why: format!("changed without a governance action ({why})"),
            writer: e.writer.clone(),
        };
        let who = item
            .writer
            .as_ref()
            .map(|w| {
                format!(
                    "by pid {} ({}) {} uid {}",
                    w["pid"],
                    w["comm"].as_str().unwrap_or("?"),
                    w["exe"].as_str().unwrap_or("?"),
                    w["uid"]
                )
            })
            .unwrap_or_else(|| "by an unseen writer".into());
        let service = item
            .writer
            .as_ref()
            .and_then(|w| w["service"].as_str().map(String::from));
        let mut alert = Alert::new(
            Severity::Warning,
            "drift",
            format!(
                "{} changed without a logged governance action",
                path.display()
            ),
        )
        .with_body(format!(
            "{who}\ndeclared {}\nnow      {}",
            item.declared_sha256.as_deref().unwrap_or("?"),
            now.as_deref().unwrap_or("(removed)")
        ));
        if let Some(s) = &service {
            alert = alert.with_service(s.clone());
        }
        self.effects.submit(
            Effect::audit("drift.config", service.as_deref(), json!(item)).with_alert(alert),
        );
        self.drift.insert(path.to_path_buf(), item);
        self.save_state();
    }

    /// Open drift items of watched files.
    pub fn drift_items(&self) -> Vec<DriftItem> {
        self.drift.values().cloned().collect()
    }

    /// `governor drift accept PATH --reason`: the current content becomes
    /// the declared one. Audited (durable before the reply).
    pub async fn drift_accept(&mut self, path: &Path, reason: &str, by: Value) -> Result<Value> {
        let key = self
            .find(path)
            .filter(|k| self.files.get(k).is_some_and(|e| e.tier == Tier::Watched))
            .with_context(|| format!("{} is not a watched file ([drift] watch)", path.display()))?;
        let e = self.files.get(&key).cloned().context("gone")?;
        let real = e.real.clone();
        let now = tokio::task::spawn_blocking(move || sha256_file(&real).ok())
            .await
            .ok()
            .flatten();
        let item = self.drift.remove(&key);
        let d = json!({
            "path": key, "reason": reason, "by": by, "old_sha256": e.declared,
            "new_sha256": now, "had_drift": item.is_some(),
        });
        let head = self
            .effects
            .audit_durable("drift.accept", None, d.clone())
            .await;
        if head.is_none() {
            if let Some(i) = item {
                self.drift.insert(key.clone(), i);
            }
            bail!("not accepted: the audit entry could not be written");
        }
        self.refresh_key(&key);
        if let Some(x) = self.files.get_mut(&key) {
            x.declared = now;
            x.reported = None;
            x.writer = None;
        }
        self.save_state();
        self.state_file.synced().await;
        Ok(d)
    }

    /// `governor deploy`: watched files the deploy may change. Opens a
    /// window on each (no flag to lift), so changes inside it are the
    /// deploy's, not drift. Every path must be watched (or PROTECTED ones
    /// would open without approval).
    pub fn deploy_open(
        &mut self,
        paths: &[PathBuf],
        service: &str,
        reason: &str,
        uid: u32,
        dur: Duration,
    ) -> Result<Vec<PathBuf>> {
        let mut keys = Vec::new();
        for p in paths {
            let key = self
                .find(p)
                .filter(|k| self.files.get(k).is_some_and(|e| e.tier == Tier::Watched))
                .with_context(|| {
                    format!(
                        "{} is not a watched file: deploy changes only [drift] watch files                          (PROTECTED ones need `governor approve`)",
                        p.display()
                    )
                })?;
            if self.windows.contains_key(&key) {
                bail!("{} is already being deployed", key.display());
            }
            keys.push(key);
        }
        let opened_at = SystemTime::now();
        for k in &keys {
            self.windows.insert(
                k.clone(),
                Window {
                    until: Instant::now() + dur,
                    until_wall: opened_at + dur,
                    opened_at,
                    reason: reason.to_string(),
                    by_uid: uid,
                    via: format!("deploy {service}"),
                    writes: 0,
                    session: None,
                },
            );
        }
        self.save_state();
        Ok(keys)
    }

    /// The end of a deploy: each file's new content is declared; its
    /// drift item (if any) closes. Returns each file's old and new SHA-256.
    pub async fn deploy_close(&mut self, paths: &[PathBuf], service: &str) -> Result<Vec<Value>> {
        let via = format!("deploy {service}");
        let mut keys = Vec::new();
        for p in paths {
            let k = self
                .find(p)
                .filter(|k| self.windows.get(k).is_some_and(|w| w.via == via))
                .with_context(|| {
                    format!(
                        "{} has no open deploy of {service} (it ended, or never began)",
                        p.display()
                    )
                })?;
            keys.push(k);
        }
        let mut out = Vec::new();
        for k in &keys {
            if let Ok(d) = self.close_window(k, "deployed").await {
                self.drift.remove(k);
                if let Some(x) = self.files.get_mut(k) {
                    x.writer = None;
                }
                out.push(d);
            }
        }
        self.save_state();
        self.state_file.synced().await;
        Ok(out)
    }

    /// Re-reads the inode behind a protected path (after a rename over it).
    fn refresh_key(&mut self, path: &Path) {
        let Some(e) = self.files.get_mut(path) else {
            return;
        };
        let new = key_of(&e.real, true);
        if new == e.key {
            return;
        }
        let old = e.key;
        e.key = new;
        e.pin = pin_of(&e.real, new);
        if let Some(o) = old {
            self.by_key.remove(&o);
            if let Some(k) = self.kernel.as_mut() {
                let _ = k.remove_inode(&o);
            }
        }
        if let Some(n) = new {
            self.by_key.insert(n, path.to_path_buf());
        }
        self.register(path);
    }

    // -----------------------------------------------------------------
    // Approval windows.

    fn find(&self, path: &Path) -> Option<PathBuf> {
        if self.files.contains_key(path) {
            return Some(path.to_path_buf());
        }
        let real = std::fs::canonicalize(path).ok()?;
        self.by_real
            .get(&real)
            .cloned()
            .or_else(|| key_of(&real, true).and_then(|k| self.by_key.get(&k).cloned()))
    }

    /// Re-hashes `p` soon (250 ms) and once more later (2 s), for writes
    /// that slipped in before a flag was back. Deduped per path: a flood of
    /// writes keeps at most two pending checks per file, not one per write.
    fn schedule_rehash(&mut self, p: &Path) {
        let now = Instant::now();
        for at in [
            now + Duration::from_millis(250),
            now + Duration::from_secs(2),
        ] {
            let near = self.rehash.iter().any(|(t, q)| {
                q == p
                    && t.saturating_duration_since(at) < Duration::from_millis(200)
                    && at.saturating_duration_since(*t) < Duration::from_millis(200)
            });
            if !near {
                self.rehash.push((at, p.to_path_buf()));
            }
        }
        // Bounded whatever happens: one pending pair per protected file.
        let cap = 2 * self.files.len().max(1);
        if self.rehash.len() > cap {
            self.rehash.sort_by_key(|(t, _)| *t);
            self.rehash
                .dedup_by(|a, b| a.1 == b.1 && a.0 <= b.0 + Duration::from_secs(1));
            self.rehash.truncate(cap);
        }
    }

    /// `governor approve PATH --for DUR --reason TEXT`. The daemon passes
    /// whether the caller is a human at a login terminal (`Ok(how)`, or
    /// `Err(why not)`: the daemon's caller check) and, for
    /// UNTOUCHABLE files, the path the human typed back.
    pub async fn approve(
        &mut self,
        path: &Path,
        dur: Duration,
        reason: &str,
        caller: Caller,
        confirm: Option<String>,
    ) -> Result<Value> {
        let Caller {
            uid: peer_uid,
            session,
            human,
        } = caller;
        let refuse = |this: &Self, why: &str| {
            this.audit(
                "protect.approve_refused",
                None,
                json!({"path": path, "reason": reason, "by_uid": peer_uid, "why": why}),
            );
        };
        let Some(key) = self.find(path) else {
            refuse(self, "not a protected file");
            bail!(
                "{} is not a protected file (see `governor protect list`)",
                path.display()
            );
        };
        let Some(e) = self.files.get(&key).cloned() else {
            bail!("{} is not a protected file", path.display());
        };
        if reason.trim().is_empty() {
            bail!("--reason must say why the file needs to change");
        }
        if dur.is_zero() || dur > self.cfg.max_window.0 {
            bail!(
                "--for must be between 1s and max_window ({}s)",
                self.cfg.max_window.0.as_secs()
            );
        }
        if e.tier == Tier::Untouchable {
            let typed = confirm.unwrap_or_default();
            let ok = Path::new(typed.trim()) == e.path || Path::new(typed.trim()) == e.real;
            if !ok {
                refuse(self, "UNTOUCHABLE confirmation did not match");
                bail!(
                    "{} is UNTOUCHABLE: type its full path back to confirm",
                    e.path.display()
                );
            }
        }
        if let Some(w) = self.windows.get(&key) {
            bail!(
                "a window on {} is already open until {}; end it with `governor approve --end`",
                key.display(),
                crate::events::rfc3339(w.until_wall)
            );
        }
        let r = if self.cfg.approve_via == ApproveVia::Telegram {
            // The authorised approver's tap is the human; anyone root may ask.
            self.request_telegram(&key, &e, dur, reason, peer_uid, session)
        } else {
            let how = match human {
                Ok(how) => how,
                Err(why) => {
                    refuse(self, &why);
                    bail!(
                        "approve needs a human at a login terminal (ssh, console): {why}; \
                         processes can't approve writes, not even through a pseudo-terminal"
                    );
                }
            };
            self.open_window(
                &key,
                dur,
                reason,
                peer_uid,
                session,
                &format!("terminal via {how}"),
            )
            .await
        };
        // The client hears back once its entries are durable.
        self.effects.flush().await;
        r
    }

    /// `protect_check` (MCP): the file's tier and whether a write would
    /// be refused right now, and why — what an agent asks before it
    /// touches a file.
    ///
    /// `restricted` (a non-root agent on the MCP socket): the answer
    /// leaves out who opened a window, why, and where the file really is.
    pub fn check(&self, path: &Path, restricted: bool) -> Value {
        let Some(key) = self.find(path) else {
            let in_state = path.starts_with(&self.implicit.state_dir)
                || std::fs::canonicalize(path)
                    .ok()
                    .is_some_and(|r| r.starts_with(&self.implicit.state_dir));
            if in_state {
                return json!({"path": path, "tier": "untouchable", "origin": "governor's state directory",
                    "write_refused": true,
                    "why": "governor's own state (audit chain, declared state); only the daemon writes it"});
            }
            return json!({"path": path, "tier": "none", "write_refused": false,
                "why": "not protected or watched by governor; ordinary permissions apply"});
        };
        let Some(e) = self.files.get(&key) else {
            return json!({"path": path, "tier": "none", "write_refused": false});
        };
        let window = self.windows.get(&key).map(|w| {
            let mut v = json!({
                "until": crate::events::rfc3339(w.until_wall),
                "remaining_s": w.until.saturating_duration_since(Instant::now()).as_secs(),
                "session_enforced": w.session.is_some() && self.lsm_active(),
            });
            if !restricted {
                v["reason"] = json!(w.reason);
                v["by_uid"] = json!(w.by_uid);
                v["via"] = json!(w.via);
                v["session"] = json!(w.session);
            }
            v
        });
        let pending = self.pending.values().any(|p| p.path == key);
        let (refused, why) = match (&e.tier, &e.flag, &window) {
            (Tier::Watched, _, _) => (
                false,
                "watched: the write is allowed but logged; new content outside `governor deploy --files` or `drift accept` is drift".to_string(),
            ),
            (_, FlagState::Lifted, Some(_)) => (
                false,
                "an approved window is open: writes are allowed (and counted) until it ends".to_string(),
            ),
            (_, FlagState::Set, _) => (
                true,
                format!(
                    "{}: the kernel refuses writes (immutable flag{}); {}",
                    e.tier.name().to_uppercase(),
                    if self.lsm_active() { ", BPF LSM" } else { "" },
                    if e.tier == Tier::Untouchable {
                        "no automated process may modify it; a person approves at a terminal"
                    } else {
                        "ask for a window with request_approval"
                    }
                ),
            ),
            (_, f, _) => (
                false,
                format!(
                    "{}, but its flag is not in place ({}): the write would go through and be reported",
                    e.tier.name().to_uppercase(),
                    f.name()
                ),
            ),
        };
        let mut v = json!({
            "path": path, "protected_path": e.path,
            "tier": e.tier.name(), "flag": e.flag.name(),
            "write_refused": refused, "why": why, "window": window,
            "approval_pending": pending, "layers": self.layers(),
        });
        if !restricted {
            v["real_path"] = json!(e.real);
            v["origin"] = json!(e.origin);
        }
        v
    }

    /// `request_approval` (MCP): an agent asks a person for a window on a
    /// PROTECTED file. Only Telegram approvals can answer an agent (an
    /// approver's tap opens the window, never this call); UNTOUCHABLE files
    /// are refused outright: no automated process may modify them.
    pub async fn request_for_agent(
        &mut self,
        path: &Path,
        dur: Duration,
        reason: &str,
        uid: u32,
        agent: &str,
    ) -> Result<Value> {
        let refuse = |this: &Self, why: &str| {
            this.audit(
                "protect.approve_refused",
                None,
                json!({"path": path, "reason": reason, "by_uid": uid, "agent": agent, "why": why}),
            );
        };
        let Some(key) = self.find(path) else {
            refuse(self, "not a protected file");
            bail!(
                "{} is not a protected file: no approval needed",
                path.display()
            );
        };
        let Some(e) = self.files.get(&key).cloned() else {
            bail!("{} is not a protected file", path.display());
        };
        if reason.trim().is_empty() {
            bail!("the reason must say why the file needs to change");
        }
        match e.tier {
            Tier::Untouchable => {
                refuse(self, "UNTOUCHABLE: agents may not ask");
                self.effects.flush().await;
                bail!(
                    "{} is UNTOUCHABLE: no automated process may modify it, and agents can't ask; a person at a login terminal uses `governor approve`",
                    e.path.display()
                );
            }
            Tier::Watched => bail!(
                "{} is watched, not protected: writes are allowed; declare them with `governor deploy --files`",
                e.path.display()
            ),
            Tier::Protected => {}
        }
        if dur.is_zero() || dur > self.cfg.max_window.0 {
            bail!(
                "the duration must be between 1s and max_window ({}s)",
                self.cfg.max_window.0.as_secs()
            );
        }
        if self.windows.contains_key(&key) {
            bail!("a window on {} is already open", key.display());
        }
        if self.pending.values().any(|p| p.path == key) {
            bail!(
                "an approval for {} is already waiting for an answer",
                key.display()
            );
        }
        // One open request per user: an agent can't hold every file's
        // request slot or flood the approvers.
        if uid != 0 && self.pending.values().any(|p| p.uid == uid) {
            bail!("uid {uid} already has an approval request waiting for an answer");
        }
        if self.cfg.approve_via != ApproveVia::Telegram {
            refuse(self, "approvals are by terminal (protect.approve_via)");
            self.effects.flush().await;
            bail!(
                "approvals on this host are given at a login terminal (protect.approve_via = \"terminal\"): ask an operator to run `governor approve {} --for ... --reason ...`",
                e.path.display()
            );
        }
        let r = self.request_telegram(
            &key,
            &e,
            dur,
            &format!("[asked by {agent}] {reason}"),
            uid,
            None,
        );
        self.effects.flush().await;
        r
    }

    fn request_telegram(
        &mut self,
        key: &Path,
        e: &Entry,
        dur: Duration,
        reason: &str,
        uid: u32,
        session: Option<u32>,
    ) -> Result<Value> {
        let Some(tg) = self.telegram.clone() else {
            bail!("approve_via = \"telegram\" but [alerts.telegram] is missing or invalid");
        };
        let id = format!(
            "{:x}",
            crate::events::monotonic_ns() ^ u64::from(std::process::id())
        );
        let cancel = Arc::new(AtomicBool::new(false));
        let req = ApprovalRequest {
            id: id.clone(),
            text: format!(
                "governor: approve a write window?\n{} ({})\nfor {}s by uid {uid}\nreason: {reason}",
                e.path.display(),
                e.tier.name().to_uppercase(),
                dur.as_secs()
            ),
            approvers: self.cfg.telegram_approvers.clone(),
            timeout: self.cfg.approval_timeout.0,
        };
        // The request's entry is durable before the message goes out.
        let tx = self.approvals_tx.clone();
        let c = cancel.clone();
        self.effects.submit(
            Effect::audit(
                "protect.approve_requested",
                None,
                json!({"path": key, "reason": reason, "by_uid": uid, "via": "telegram", "request": id,
                       "duration_s": dur.as_secs()}),
            )
            .then(move |_| {
                let spawned = std::thread::Builder::new()
                    .name("tg-approval".into())
                    .spawn(move || {
                        let outcome = request_approval(&tg, &req, &c);
                        let _ = tx.send(ApprovalAnswer {
                            id: req.id.clone(),
                            outcome,
                        });
                    });
                if let Err(e) = spawned {
                    log::error!("spawning the Telegram approval thread: {e}");
                }
            }),
        );
        self.pending.insert(
            id.clone(),
            PendingApproval {
                path: key.to_path_buf(),
                dur,
                reason: reason.to_string(),
                uid,
                session,
                cancel,
            },
        );
        Ok(json!({"status": "pending", "request": id, "path": key,
                  "message": "approval requested on Telegram; the window opens when an approver taps Approve"}))
    }

    async fn on_approval(&mut self, a: ApprovalAnswer) {
        let Some(p) = self.pending.remove(&a.id) else {
            return;
        };
        match a.outcome {
            ApprovalOutcome::Approved { by, name } => {
                let via = format!("telegram:{by}:{name}");
                if let Err(e) = self
                    .open_window(&p.path, p.dur, &p.reason, p.uid, p.session, &via)
                    .await
                {
                    log::error!("protect: opening the approved window: {e:#}");
                }
            }
            other => {
                self.audit(
                    "protect.approve_refused",
                    None,
                    json!({"path": p.path, "reason": p.reason, "by_uid": p.uid,
                           "why": format!("telegram: {other:?}"), "request": a.id}),
                );
            }
        }
    }

    /// Opens a write window: its entry durable first, then the alert,
    /// then the flag lifted — the act runs on the effect pipeline, which
    /// never runs it without the entry.
    async fn open_window(
        &mut self,
        key: &Path,
        dur: Duration,
        reason: &str,
        uid: u32,
        session: Option<u32>,
        via: &str,
    ) -> Result<Value> {
        let e = self
            .files
            .get(key)
            .cloned()
            .with_context(|| format!("{} is not protected", key.display()))?;
        // An UNTOUCHABLE file's window admits its approver's session only
        // (where BPF LSM can tell sessions apart); PROTECTED files' windows
        // admit any writer.
        let session = session.filter(|_| e.tier == Tier::Untouchable);
        let writers = match (session, self.lsm_active()) {
            (Some(s), true) => format!("session {s} only (BPF LSM)"),
            (Some(_), false) => {
                "any process: without BPF LSM the approver's session can't be enforced".to_string()
            }
            (None, _) => "any process".to_string(),
        };
        let opened_at = SystemTime::now();
        let w = Window {
            until: Instant::now() + dur,
            until_wall: opened_at + dur,
            opened_at,
            reason: reason.to_string(),
            by_uid: uid,
            via: via.to_string(),
            writes: 0,
            session,
        };
        let until = crate::events::rfc3339(w.until_wall);
        let alert = Alert::new(
            if e.tier == Tier::Untouchable {
                Severity::Critical
            } else {
                Severity::Warning
            },
            "protected file window",
            format!(
                "write window opened on {} {} for {}s",
                e.tier.name().to_uppercase(),
                key.display(),
                dur.as_secs()
            ),
        )
        .with_body(format!(
            "by uid {uid} via {via}: {reason}; writes from {writers}"
        ));
        // 1. The entry, durable (and the alert).
        let out = self
            .effects
            .commit(
                Effect::audit(
                    "protect.window_open",
                    None,
                    json!({"path": key, "tier": e.tier.name(), "until": until, "duration_s": dur.as_secs(),
                           "reason": reason, "by_uid": uid, "via": via, "sha256": e.declared,
                           "session": session, "writers": writers}),
                )
                .with_alert(alert)
                .durable_only(),
            )
            .await;
        let head = match out.head {
            Ok(Some(h)) => h,
            Ok(None) => bail!("the window was not opened: no audit entry came back"),
            Err(err) => {
                bail!("the window was not opened: its audit entry could not be written ({err})")
            }
        };
        // 2. The window on disk, so a daemon killed from here on closes it
        //    (re-flags the file, records what changed) when it starts.
        self.windows.insert(key.to_path_buf(), w);
        self.save_state();
        self.state_file.synced().await;
        // 3. The flag lifted, by the pipeline.
        let (lifted_tx, lifted_rx) = oneshot::channel();
        let (lift, real) = (e.flag == FlagState::Set, e.real.clone());
        self.effects.submit(Effect::after(head, move |_| {
            let r = if lift {
                set_immutable(&real, false).map_err(|err| {
                    format!("lifting the immutable flag of {}: {err}", real.display())
                })
            } else {
                Ok(())
            };
            let _ = lifted_tx.send(r);
        }));
        let lifted = lifted_rx
            .await
            .unwrap_or_else(|_| Err("the act was not run".into()));
        if let Err(err) = lifted {
            self.windows.remove(key);
            self.save_state();
            self.audit(
                "protect.window_failed",
                None,
                json!({"path": key, "tier": e.tier.name(), "error": err, "by_uid": uid, "via": via}),
            );
            self.alert(Alert::new(
                Severity::Critical,
                "protected file window",
                format!("window on {} not opened: {err}", key.display()),
            ));
            bail!("{err}");
        }
        if let Some(x) = self.files.get_mut(key) {
            if x.flag == FlagState::Set {
                x.flag = FlagState::Lifted;
            }
        }
        self.register(key);
        Ok(
            json!({"status": "open", "path": key, "tier": e.tier.name(), "until": until,
                  "duration_s": dur.as_secs(), "session": session, "writers": writers}),
        )
    }

    /// `governor approve --end PATH`.
    pub async fn approve_end(&mut self, path: &Path) -> Result<Value> {
        let key = self
            .find(path)
            .with_context(|| format!("{} is not a protected file", path.display()))?;
        if !self.windows.contains_key(&key) {
            bail!("no window is open on {}", key.display());
        }
        let r = self.close_window(&key, "ended").await;
        // The client hears back once the entry is durable.
        self.effects.flush().await;
        r
    }

    /// Handles the attempts already in the ring. Called before a window
    /// closes, so a write made inside it is counted and logged as in the
    /// window even when the loop was behind (a busy or slow host).
    fn catch_up(&mut self) {
        let Some(k) = self.kernel.as_mut() else {
            return;
        };
        for ev in k.drain() {
            self.on_event(&ev);
        }
    }

    async fn close_window(&mut self, key: &Path, why: &str) -> Result<Value> {
        self.catch_up();
        let w = self
            .windows
            .remove(key)
            .with_context(|| format!("no window is open on {}", key.display()))?;
        self.refresh_key(key);
        let Some(e) = self.files.get_mut(key) else {
            bail!("{} is no longer protected", key.display());
        };
        let mut flag_err = None;
        if e.key.is_none() {
            e.flag = FlagState::Missing;
        } else if matches!(e.flag, FlagState::Lifted | FlagState::Set) {
            match set_immutable(&e.real, true) {
                Ok(()) => e.flag = FlagState::Set,
                Err(err) => {
                    flag_err = Some(err.to_string());
                    e.flag = FlagState::Failed(err.to_string());
                }
            }
        }
        // Hashed once the flag is back (nothing can slip in after), on the
        // blocking pool.
        let real = e.real.clone();
        let new = tokio::task::spawn_blocking(move || sha256_file(&real).ok())
            .await
            .ok()
            .flatten();
        let Some(e) = self.files.get_mut(key) else {
            bail!("{} is no longer protected", key.display());
        };
        let old = e.declared.clone();
        e.declared = new.clone();
        e.reported = None;
        let tier = e.tier;
        self.register(key);
        self.save_state();
        self.state_file.synced().await;
        let d = json!({
            "path": key, "tier": tier.name(), "why": why,
            "opened_at": crate::events::rfc3339(w.opened_at), "reason": w.reason,
            "by_uid": w.by_uid, "via": w.via, "writes_allowed": w.writes,
            "old_sha256": old, "new_sha256": new, "changed": old != new,
            "flag_error": flag_err,
        });
        self.audit("protect.window_close", None, d.clone());
        Ok(d)
    }

    /// Applies a new `[protect]` (SIGHUP): protects added files, releases
    /// removed ones, keeps windows of files still listed.
    pub async fn reload(&mut self, cfg: &ProtectConfig) -> StartReport {
        let t0 = Instant::now();
        let mut report = StartReport::default();
        self.cfg = cfg.clone();
        let targets = self.targets(&mut report);
        let wanted: BTreeMap<PathBuf, Target> =
            targets.into_iter().map(|t| (t.path.clone(), t)).collect();
        let current: Vec<PathBuf> = self.files.keys().cloned().collect();
        for p in current {
            if wanted.contains_key(&p) {
                continue;
            }
            if self.windows.contains_key(&p) {
                let _ = self.close_window(&p, "file removed from [protect]").await;
            }
            if let Some(e) = self.files.remove(&p) {
                if e.flag == FlagState::Set {
                    let _ = set_immutable(&e.real, false);
                }
                if let Some(k) = e.key {
                    self.by_key.remove(&k);
                    if let Some(kl) = self.kernel.as_mut() {
                        let _ = kl.remove_inode(&k);
                    }
                }
                self.by_real.remove(&e.real);
                report.removed.push(p.display().to_string());
            }
        }
        for (p, t) in &wanted {
            match self.files.get_mut(p) {
                Some(e) if e.tier != t.tier => {
                    // Watched files are never flagged; the others are,
                    // below. The kernel maps follow the new tier.
                    if t.tier == Tier::Watched {
                        if e.flag == FlagState::Set {
                            let _ = set_immutable(&e.real, false);
                        }
                        e.flag = FlagState::Watched;
                    } else if e.flag == FlagState::Watched {
                        e.flag = FlagState::Failed("not flagged yet".into());
                    }
                    e.tier = t.tier;
                    self.register(p);
                }
                Some(_) => {}
                None => {
                    self.add_entry(t, &mut report);
                    if let Some(e) = self.files.get_mut(p) {
                        e.declared = sha256_file(&e.real).ok();
                    }
                    self.register(p);
                    report.added.push(p.display().to_string());
                }
            }
        }
        // Re-apply flags that went missing and report content changes.
        let paths: Vec<PathBuf> = self.files.keys().cloned().collect();
        for p in paths {
            if self.windows.contains_key(&p) {
                continue;
            }
            self.refresh_key(&p);
            if let Some(e) = self.files.get_mut(&p) {
                if e.tier == Tier::Watched {
                    if e.key.is_none() {
                        report.missing.push(p.display().to_string());
                    }
                } else if e.key.is_some() && !matches!(e.flag, FlagState::Unsupported(_)) {
                    match set_immutable(&e.real, true) {
                        Ok(()) => e.flag = FlagState::Set,
                        Err(err) => e.flag = FlagState::Failed(err.to_string()),
                    }
                } else if e.key.is_none() {
                    e.flag = FlagState::Missing;
                    report.missing.push(p.display().to_string());
                }
            }
            let before = self.files.get(&p).and_then(|e| e.reported.clone());
            self.check_content(&p, "reload").await;
            if self.files.get(&p).and_then(|e| e.reported.clone()) != before {
                report.changed.push(p.display().to_string());
            }
        }
        self.save_state();
        self.rewatch(&mut report);
        self.finish_report(&mut report);
        report.flags_ms = t0.elapsed().as_secs_f64() * 1e3;
        report.total_ms = report.flags_ms;
        self.audit(
            "protect.reload",
            None,
            json!({"files": report.files, "added": report.added, "removed": report.removed,
                   "problems": report.problems, "missing": report.missing,
                   "changed": report.changed, "layers": report.layers}),
        );
        self.alert_report(&report);
        report
    }

    /// Attempt events lost to a full ring so far.
    pub fn dropped(&self) -> u64 {
        self.kernel
            .as_ref()
            .and_then(|k| k.dropped().ok())
            .unwrap_or(0)
    }

    /// Why layers 2/3 are not running, if they aren't.
    pub fn kernel_error(&self) -> Option<&str> {
        self.kernel_error.as_deref()
    }
}

/// Checks for `governor doctor`: (name, ok, detail). With the config, also
/// whether each filesystem holding protected files takes the immutable flag
/// (tested with FS_IOC_GETFLAGS, which changes nothing).
pub fn doctor_checks(cfg: Option<(&ProtectConfig, &Path)>) -> Vec<(String, bool, String)> {
    let mut out = Vec::new();
    match kernel::probe_logging() {
        Ok(d) => out.push(("protect: attempt logging".into(), true, d)),
        Err(e) => out.push(("protect: attempt logging".into(), false, e)),
    }
    match kernel::probe_lsm() {
        Ok(hooks) => out.push((
            "protect: bpf lsm".into(),
            true,
            format!("refuses writes before the VFS ({})", hooks.join(", ")),
        )),
        Err(e) => out.push(("protect: bpf lsm".into(), false, e)),
    }
    if let Some((cfg, file)) = cfg {
        let ex = config::expand(cfg, file, "");
        if !ex.problems.is_empty() {
            out.push((
                "protect: config".into(),
                false,
                ex.problems
                    .iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; "),
            ));
        }
        // One probe per filesystem.
        let mut by_dev: BTreeMap<u64, (PathBuf, usize)> = BTreeMap::new();
        for t in &ex.targets {
            if let Ok(md) = std::fs::metadata(&t.path) {
                use std::os::unix::fs::MetadataExt;
                by_dev
                    .entry(md.dev())
                    .or_insert_with(|| (t.path.clone(), 0))
                    .1 += 1;
            }
        }
        for (_, (sample, n)) in by_dev {
            let r = File::open(&sample).and_then(|f| fsflags::get_flags(&f));
            let name = format!("protect: vfs flags ({n} file(s) like {})", sample.display());
            match r {
                Ok(_) => out.push((name, true, "the filesystem takes the immutable flag".into())),
                Err(e) => out.push((
                    name,
                    false,
                    format!("{e}: these files rely on attempt logging and BPF LSM only"),
                )),
            }
        }
    }
    out
}

impl Drop for Protector {
    fn drop(&mut self) {
        for p in self.pending.values() {
            p.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }
}
