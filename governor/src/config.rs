//! The TOML configuration: schema, parsing, and errors that name the file,
//! line and key.
//!
//! Unknown keys are errors (a typo must not silently disable a limit), and
//! every value is validated while parsing so the error points at it.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;

pub use governor_core::limits::{CrashLoopAction, Limits};
use toml::Spanned;

/// The config governor runs on when none is given (`cargo xtask run`).
pub const EXAMPLE_CONFIG: &str = include_str!("../../examples/governor.toml");
/// Where `governor run` looks by default.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/governor/governor.toml";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub daemon: Daemon,
    #[serde(default)]
    pub defaults: Defaults,
    #[serde(default)]
    pub tiers: BTreeMap<String, Tier>,
    #[serde(default)]
    pub system: System,
    #[serde(default, rename = "service")]
    pub services: Vec<Service>,
    #[serde(default)]
    pub alerts: Alerts,
    #[serde(default)]
    pub audit: Audit,
    /// `[protect]`: UNTOUCHABLE / PROTECTED files (issue 6; see
    /// `crate::protect`). Filesystem checks (missing path, directory, empty
    /// glob, bad list line) are `crate::protect::check_all`, for
    /// check-config and the start report — not here, so a file deleted
    /// while the daemon was down doesn't stop it from starting.
    #[serde(default)]
    pub protect: crate::protect::ProtectConfig,
    /// `[drift]`: files that may change only through a logged governance
    /// action (issue 12).
    #[serde(default)]
    pub drift: Drift,
    /// `[metrics]`: Prometheus `/metrics` on loopback (off by default).
    #[serde(default)]
    pub metrics: Metrics,
    /// `[mcp]`: the socket non-root agents' `governor mcp` reaches.
    #[serde(default)]
    pub mcp: Mcp,
    /// `[dispatch]`: the `may_start_job` gate agents ask before a job.
    #[serde(default)]
    pub dispatch: Dispatch,
    /// `[export]`: kernel events as JSON lines for a log stack.
    #[serde(default)]
    pub export: Export,
}

/// `[metrics]`.
///
/// ```toml
/// [metrics]
/// listen = "127.0.0.1:9464"   # loopback only; absent: no listener
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub listen: Option<Spanned<String>>,
}

impl Metrics {
    /// The validated listen address (checked at parse time).
    pub fn addr(&self) -> Option<std::net::SocketAddr> {
        self.listen.as_ref().and_then(|l| l.get_ref().parse().ok())
    }
}

/// `[mcp]`.
///
/// ```toml
/// [mcp]
/// socket = "/run/governor/mcp.sock"   # absent: root's agents only (control socket)
/// group = "agents"                     # who may connect (mode 0660); absent: root only
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mcp {
    pub socket: Option<PathBuf>,
    pub group: Option<Spanned<String>>,
}

/// `[dispatch]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dispatch {
    /// Jobs (helper processes) a service may run at once before
    /// `may_start_job` says no.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: u32,
    /// MemAvailable must stay this far above `system.memory_floor` after
    /// the job's expected bytes.
    #[serde(default = "default_dispatch_margin")]
    pub margin: ByteSize,
}

fn default_max_concurrent() -> u32 {
    4
}
fn default_dispatch_margin() -> ByteSize {
    ByteSize(100 << 20)
}

impl Default for Dispatch {
    fn default() -> Self {
        Dispatch {
            max_concurrent: default_max_concurrent(),
            margin: default_dispatch_margin(),
        }
    }
}

/// `[export]`.
///
/// ```toml
/// [export]
/// events = "/var/log/governor/events.jsonl"   # absent: no export
/// rotate_size = "64MiB"                         # then events.jsonl.1 … .keep
/// keep = 5
/// ```
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Export {
    pub events: Option<PathBuf>,
    #[serde(default = "default_export_rotate")]
    pub rotate_size: ByteSize,
    #[serde(default = "default_export_keep")]
    pub keep: u32,
}

fn default_export_rotate() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_export_keep() -> u32 {
    5
}

impl Default for Export {
    fn default() -> Self {
        Export {
            events: None,
            rotate_size: default_export_rotate(),
            keep: default_export_keep(),
        }
    }
}

/// `[drift]`.
///
/// ```toml
/// [drift]
/// watch = ["/srv/bots/*/config.json"]   # paths or globs; a change without
///                                       # `governor deploy` / `drift accept`
///                                       # is drift.config, with the writer
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drift {
    #[serde(default)]
    pub watch: Vec<toml::Spanned<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Daemon {
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Size of the kernel→daemon event ring.
    #[serde(default = "default_ring")]
    pub ring_size: ByteSize,
    /// Most unconfigured services (fingerprints, other users' pm2 apps and
    /// units) whose restart history is kept; beyond it the least recently
    /// seen is forgotten, and counted. Any local user can make new ones.
    #[serde(default = "default_max_unconfigured")]
    pub max_unconfigured_services: usize,
}

fn default_max_unconfigured() -> usize {
    1024
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/governor")
}
fn default_socket() -> PathBuf {
    PathBuf::from("/run/governor/governor.sock")
}
fn default_ring() -> ByteSize {
    ByteSize(governor_common::DEFAULT_RING_BYTES as u64)
}

impl Default for Daemon {
    fn default() -> Self {
        Daemon {
            state_dir: default_state_dir(),
            socket: default_socket(),
            ring_size: default_ring(),
            max_unconfigured_services: default_max_unconfigured(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// Restart-velocity window.
    #[serde(default = "default_window")]
    pub window: HumanDuration,
    /// Restarts tolerated in the window; one more is a crash loop.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: u32,
    #[serde(default = "default_ceiling")]
    pub memory_ceiling: ByteSize,
    /// Clean uptime that ends a crash loop (and resets "restarting").
    #[serde(default = "default_stable_after")]
    pub stable_after: HumanDuration,
    #[serde(default)]
    pub crash_loop_action: CrashLoopAction,
    /// With `crash_loop_action = "stop"`: crashes tolerated after entering
    /// the loop before the service is stopped.
    #[serde(default = "default_stop_after")]
    pub stop_after: u32,
    /// Owner of the pm2 God daemon whose apps `pm2 = "…"` services are:
    /// apps of anyone else's pm2 are never a configured service.
    #[serde(default = "default_pm2_user")]
    pub pm2_user: String,
    /// Longest `governor deploy --grace`: a deploy switches crash-loop
    /// counting off for its service, so it can't be for ever.
    #[serde(default = "default_max_grace")]
    pub max_grace: HumanDuration,
    /// Memory restarts tolerated in `window`; after them a service over its
    /// ceiling is alerted (`memory-loop`), not restarted again.
    #[serde(default = "default_memory_max_restarts")]
    pub memory_max_restarts: u32,
    /// How long an instance restarted for its memory may take to die
    /// before it gets SIGKILL (through a pidfd).
    #[serde(default = "default_kill_timeout")]
    pub kill_timeout: HumanDuration,
    /// A run's RSS this long after it started is its settled RSS; the
    /// median of the last runs' is the service's baseline.
    #[serde(default = "default_memory_settle")]
    pub memory_settle: HumanDuration,
    /// Drift: RSS above max(drift_ratio × baseline, baseline + drift_min)
    /// for drift_after warns once per episode.
    #[serde(default = "default_drift_ratio")]
    pub drift_ratio: f64,
    #[serde(default = "default_drift_min")]
    pub drift_min: ByteSize,
    #[serde(default = "default_drift_after")]
    pub drift_after: HumanDuration,
    /// The start-up allowance: for `memory_startup_grace` after an
    /// instance starts, its ceiling is this many times the ceiling (a bot
    /// that loads its model before it settles). 1.0, the default, is off:
    /// any service over its ceiling is restarted.
    #[serde(default = "default_startup_allowance")]
    pub memory_startup_allowance: f64,
    #[serde(default = "default_startup_grace")]
    pub memory_startup_grace: HumanDuration,
}

fn default_startup_allowance() -> f64 {
    1.0
}
fn default_startup_grace() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}

fn default_memory_max_restarts() -> u32 {
    3
}
fn default_kill_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_memory_settle() -> HumanDuration {
    HumanDuration(Duration::from_secs(60))
}
fn default_drift_ratio() -> f64 {
    1.5
}
fn default_drift_min() -> ByteSize {
    ByteSize(32 << 20)
}
fn default_drift_after() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}

fn default_pm2_user() -> String {
    "root".into()
}
fn default_max_grace() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}

fn default_window() -> HumanDuration {
    HumanDuration(Duration::from_secs(600))
}
fn default_max_restarts() -> u32 {
    2
}
fn default_ceiling() -> ByteSize {
    ByteSize(200 << 20)
}
fn default_stable_after() -> HumanDuration {
    HumanDuration(Duration::from_secs(600))
}
fn default_stop_after() -> u32 {
    3
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            window: default_window(),
            max_restarts: default_max_restarts(),
            memory_ceiling: default_ceiling(),
            stable_after: default_stable_after(),
            crash_loop_action: CrashLoopAction::default(),
            stop_after: default_stop_after(),
            pm2_user: default_pm2_user(),
            max_grace: default_max_grace(),
            memory_max_restarts: default_memory_max_restarts(),
            kill_timeout: default_kill_timeout(),
            memory_settle: default_memory_settle(),
            drift_ratio: default_drift_ratio(),
            drift_min: default_drift_min(),
            drift_after: default_drift_after(),
            memory_startup_allowance: default_startup_allowance(),
            memory_startup_grace: default_startup_grace(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    pub memory_ceiling: Option<ByteSize>,
    pub max_restarts: Option<u32>,
    pub window: Option<HumanDuration>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct System {
    /// MemAvailable below this starts a flush cycle: the non-critical
    /// service that frees the most is restarted, one at a time.
    #[serde(default = "default_floor")]
    pub memory_floor: ByteSize,
    /// The cycle ends above memory_floor + floor_hysteresis.
    #[serde(default = "default_hysteresis")]
    pub floor_hysteresis: ByteSize,
    /// Below this (default: half the floor) the victim is killed, not
    /// restarted; its supervisor brings it back.
    pub emergency_floor: Option<ByteSize>,
    /// Restarts per flush cycle at most.
    #[serde(default = "default_flush_max")]
    pub flush_max: u32,
    /// Wait after each flush restart before reading MemAvailable again.
    #[serde(default = "default_flush_cooldown")]
    pub flush_cooldown: HumanDuration,
    /// How long a supervisor command (`pm2 restart`, `pm2 jlist`,
    /// `systemctl …`) may take before it is killed and its action audited
    /// as failed: a pm2 God daemon that is stopped or wedged never answers.
    /// The action is retried by its policy (a memory restart at the next
    /// confirmed breach, a crash-loop stop at the next crash).
    #[serde(default = "default_supervisor_timeout")]
    pub supervisor_timeout: HumanDuration,
}

fn default_floor() -> ByteSize {
    ByteSize(500 << 20)
}
fn default_hysteresis() -> ByteSize {
    ByteSize(100 << 20)
}
fn default_flush_max() -> u32 {
    3
}
fn default_flush_cooldown() -> HumanDuration {
    HumanDuration(Duration::from_secs(5))
}
fn default_supervisor_timeout() -> HumanDuration {
    HumanDuration(Duration::from_secs(20))
}

impl Default for System {
    fn default() -> Self {
        System {
            memory_floor: default_floor(),
            floor_hysteresis: default_hysteresis(),
            emergency_floor: None,
            flush_max: default_flush_max(),
            flush_cooldown: default_flush_cooldown(),
            supervisor_timeout: default_supervisor_timeout(),
        }
    }
}

impl System {
    pub fn floor_limits(&self) -> governor_core::memory::FloorLimits {
        governor_core::memory::FloorLimits {
            floor: self.memory_floor.0,
            hysteresis: self.floor_hysteresis.0,
            emergency: self
                .emergency_floor
                .map(|b| b.0)
                .unwrap_or(self.memory_floor.0 / 2),
            flush_max: self.flush_max,
            cooldown_ns: self.flush_cooldown.0.as_nanos() as u64,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: Spanned<String>,
    /// pm2 app name (pm2 sets `name` in each app's environment), of a God
    /// daemon run by `pm2_user`.
    pub pm2: Option<String>,
    /// Owner of this service's pm2 (default: `defaults.pm2_user`).
    pub pm2_user: Option<String>,
    /// systemd unit, e.g. `lily.service`.
    pub unit: Option<String>,
    /// A cgroup path prefix, e.g. `/system.slice/lily.service`.
    pub cgroup: Option<String>,
    /// Absolute executable path, as the kernel reports it at exec.
    pub exe: Option<String>,
    /// With `exe`: the user the process runs as (default root). Anyone can
    /// run a binary; only this user's runs are the service.
    pub user: Option<String>,
    /// Regex over the space-joined argv, with `exe`.
    pub args: Option<ArgsRegex>,
    pub tier: Option<Spanned<String>>,
    #[serde(default)]
    pub critical: bool,
    pub max_restarts: Option<u32>,
    pub window: Option<HumanDuration>,
    pub memory_ceiling: Option<ByteSize>,
    pub crash_loop_action: Option<CrashLoopAction>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Alerts {
    pub telegram: Option<governor_alerts::TelegramConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Audit {
    /// Rotate `audit.jsonl` when it grows past this size; one chain spans
    /// the files.
    #[serde(default = "default_rotate")]
    pub rotate_size: ByteSize,
    /// Entries held in memory while the state directory is full (each
    /// written late once it has space); beyond this they are dropped and
    /// counted in `audit.backlog_written`.
    #[serde(default = "default_memory_buffer")]
    pub memory_buffer: usize,
}

fn default_rotate() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_memory_buffer() -> usize {
    10_000
}

impl Default for Audit {
    fn default() -> Self {
        Audit {
            rotate_size: default_rotate(),
            memory_buffer: default_memory_buffer(),
        }
    }
}

pub use crate::units::{
    parse_duration, parse_size, ArgsRegex, ByteSize, ConfigError, HumanDuration,
};

impl Config {
    /// Reads and validates the config at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let src = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            key: None,
            reason: format!("cannot read the config: {e}"),
        })?;
        Self::parse(path, &src)
    }

    /// Parses `src` (named `file` in errors) and checks cross-field rules.
    pub fn parse(file: &Path, src: &str) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(src).map_err(|e| {
            let offset = e.span().map(|s| s.start).unwrap_or(0);
            ConfigError::at(file, src, offset, e.message().trim().to_string())
        })?;
        cfg.protect.watch = cfg.drift.watch.clone();
        cfg.validate(file, src)?;
        Ok(cfg)
    }

    fn validate(&self, file: &Path, src: &str) -> Result<(), ConfigError> {
        let err = |offset: usize, reason: String| Err(ConfigError::at(file, src, offset, reason));
        if self.defaults.window.0.is_zero() {
            let off = src.find("window").unwrap_or(0);
            return err(off, "the restart window must be longer than zero".into());
        }
        // Memory ceilings: a limit this host can reach, and not zero.
        let total = crate::memsample::mem_total();
        let ceiling = |what: &str, b: u64, off: usize| -> Result<(), ConfigError> {
            if b == 0 {
                return err(
                    off,
                    format!("{what} = 0 would restart the service at once; leave it out for the default"),
                );
            }
            if let Some(t) = total.filter(|&t| b > t) {
                return err(
                    off,
                    format!(
                        "{what} ({} MiB) is above this host's total RAM ({} MiB): it could never be reached",
                        b >> 20,
                        t >> 20
                    ),
                );
            }
            Ok(())
        };
        ceiling(
            "defaults.memory_ceiling",
            self.defaults.memory_ceiling.0,
            key_offset(src, "[defaults]", "memory_ceiling"),
        )?;
        for (name, t) in &self.tiers {
            if let Some(c) = t.memory_ceiling {
                ceiling(
                    &format!("tiers.{name}.memory_ceiling"),
                    c.0,
                    key_offset(src, &format!("[tiers.{name}]"), "memory_ceiling"),
                )?;
            }
        }
        if let Some(t) = total.filter(|&t| self.system.memory_floor.0 >= t) {
            return err(
                key_offset(src, "[system]", "memory_floor"),
                format!(
                    "system.memory_floor ({} MiB) is not below this host's total RAM ({} MiB): every reading would be below it",
                    self.system.memory_floor.0 >> 20,
                    t >> 20
                ),
            );
        }
        if let Some(e) = self.system.emergency_floor {
            if e.0 > self.system.memory_floor.0 {
                return err(
                    key_offset(src, "[system]", "emergency_floor"),
                    format!(
                        "system.emergency_floor ({} MiB) is above system.memory_floor ({} MiB): it must be the lower of the two",
                        e.0 >> 20,
                        self.system.memory_floor.0 >> 20
                    ),
                );
            }
        }
        if !(1..=1_000_000).contains(&self.audit.memory_buffer) {
            return err(
                key_offset(src, "[audit]", "memory_buffer"),
                format!(
                    "audit.memory_buffer = {} must be from 1 to 1000000 entries (about 1 KiB \
                     each; 10000 is the default)",
                    self.audit.memory_buffer
                ),
            );
        }
        let t = self.system.supervisor_timeout.0;
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&t) {
            return err(
                key_offset(src, "[system]", "supervisor_timeout"),
                format!(
                    "system.supervisor_timeout = {t:?} must be from 1s to 10m (pm2 answers in \
                     about a second; 20s is the default)"
                ),
            );
        }
        if !(self.defaults.drift_ratio.is_finite() && self.defaults.drift_ratio >= 1.0) {
            return err(
                key_offset(src, "[defaults]", "drift_ratio"),
                format!(
                    "defaults.drift_ratio = {} must be a number of at least 1.0 (1.5: half again its baseline)",
                    self.defaults.drift_ratio
                ),
            );
        }
        let a = self.defaults.memory_startup_allowance;
        if !(a.is_finite() && (1.0..=10.0).contains(&a)) {
            return err(
                key_offset(src, "[defaults]", "memory_startup_allowance"),
                format!(
                    "defaults.memory_startup_allowance = {a} must be a number from 1.0 (off) to 10.0 (1.5: half again the ceiling while an instance starts)"
                ),
            );
        }
        if let Some(l) = &self.metrics.listen {
            let at = l.span().start;
            let addr: std::net::SocketAddr = l.get_ref().parse().map_err(|e| {
                ConfigError::at(
                    file,
                    src,
                    at,
                    format!(
                        "metrics.listen = \"{}\" is not an address:port ({e}); e.g. \"127.0.0.1:9464\"",
                        l.get_ref()
                    ),
                )
            })?;
            if let Err(why) = governor_metrics::check_listen(&addr) {
                return err(at, format!("metrics.listen: {why}"));
            }
            if addr.port() < 1024 {
                return err(
                    at,
                    format!(
                        "metrics.listen: port {} is privileged, and the service unit grants no CAP_NET_BIND_SERVICE; use 9464",
                        addr.port()
                    ),
                );
            }
        }
        if let Some(g) = &self.mcp.group {
            if self.mcp.socket.is_none() {
                return err(g.span().start, "mcp.group goes with mcp.socket".into());
            }
            if crate::users::gid_of(g.get_ref()).is_none() {
                return err(
                    g.span().start,
                    format!(
                        "mcp.group: no group \"{}\" on this host (create it with groupadd)",
                        g.get_ref()
                    ),
                );
            }
        }
        if let Some(s) = &self.mcp.socket {
            if !s.is_absolute() || *s == self.daemon.socket {
                return err(
                    key_offset(src, "[mcp]", "socket"),
                    "mcp.socket must be an absolute path other than daemon.socket".into(),
                );
            }
        }
        if self.dispatch.max_concurrent == 0 {
            return err(
                key_offset(src, "[dispatch]", "max_concurrent"),
                "dispatch.max_concurrent = 0 would refuse every job; at least 1".into(),
            );
        }
        if let Some(e) = &self.export.events {
            if !e.is_absolute() {
                return err(
                    key_offset(src, "[export]", "events"),
                    "export.events must be an absolute path".into(),
                );
            }
            if self.export.rotate_size.0 < 4096 || self.export.keep == 0 {
                return err(
                    key_offset(src, "[export]", "rotate_size"),
                    "export.rotate_size must be at least 4KiB and export.keep at least 1".into(),
                );
            }
        }
        let mut seen = BTreeMap::new();
        for svc in &self.services {
            let name = svc.name.get_ref();
            let at = svc.name.span().start;
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
            {
                return err(
                    at,
                    format!("service name \"{name}\" must be non-empty and use only letters, digits, - _ . @"),
                );
            }
            if seen.insert(name.clone(), at).is_some() {
                return err(at, format!("duplicate service name \"{name}\""));
            }
            if svc.pm2.is_none() && svc.unit.is_none() && svc.cgroup.is_none() && svc.exe.is_none()
            {
                return err(
                    at,
                    format!(
                        "service \"{name}\" has no matcher: set one of pm2, unit, cgroup or exe"
                    ),
                );
            }
            if svc.args.is_some() && svc.exe.is_none() {
                return err(at, format!("service \"{name}\": `args` needs `exe`"));
            }
            if let Some(exe) = &svc.exe {
                if !exe.starts_with('/') {
                    return err(
                        at,
                        format!(
                            "service \"{name}\": exe \"{exe}\" must be an absolute path (a bare name \
                             would match any copy of the binary, anywhere, run by anyone)"
                        ),
                    );
                }
            }
            if svc.user.is_some() && svc.exe.is_none() {
                return err(at, format!("service \"{name}\": `user` goes with `exe`"));
            }
            if svc.pm2_user.is_some() && svc.pm2.is_none() {
                return err(
                    at,
                    format!("service \"{name}\": `pm2_user` goes with `pm2`"),
                );
            }
            if let Some(u) = self.owner_of(svc) {
                if crate::users::uid_of(&u).is_none() {
                    return err(
                        at,
                        format!("service \"{name}\": unknown user \"{u}\" (not in /etc/passwd)"),
                    );
                }
            }
            if let Some(t) = &svc.tier {
                if !self.tiers.contains_key(t.get_ref()) {
                    let known: Vec<_> = self.tiers.keys().cloned().collect();
                    return err(
                        t.span().start,
                        format!(
                            "unknown tier \"{}\" (defined tiers: {})",
                            t.get_ref(),
                            known.join(", ")
                        ),
                    );
                }
            }
            if let Some(c) = svc.memory_ceiling {
                let off = src[at..]
                    .find("\nmemory_ceiling")
                    .map(|i| at + i + 1)
                    .unwrap_or(at);
                ceiling(&format!("service \"{name}\": memory_ceiling"), c.0, off)?;
            }
            if let Some(w) = &svc.window {
                if w.0.is_zero() {
                    return err(
                        at,
                        format!("service \"{name}\": window must be longer than zero"),
                    );
                }
            }
        }
        if let Some(t) = &self.alerts.telegram {
            if let Err(p) = t.validate() {
                let off = src.find("[alerts.telegram]").unwrap_or(0);
                let key_off = src[off..]
                    .find(&format!("\n{} ", p.key))
                    .map(|i| off + i + 1)
                    .unwrap_or(off);
                let mut e = ConfigError::at(file, src, key_off, p.reason.clone());
                e.key = Some(format!("alerts.telegram.{}", p.key));
                return Err(e);
            }
        }
        Ok(())
    }

    /// The user a service's identity is bound to: the pm2 God's owner for
    /// `pm2`, the process's uid for `exe`; `None` for unit and cgroup
    /// matches (only root places processes in those cgroups).
    pub fn owner_of(&self, svc: &Service) -> Option<String> {
        if svc.pm2.is_some() {
            return Some(
                svc.pm2_user
                    .clone()
                    .unwrap_or_else(|| self.defaults.pm2_user.clone()),
            );
        }
        if svc.exe.is_some() {
            return Some(svc.user.clone().unwrap_or_else(|| "root".into()));
        }
        None
    }

    /// Memory limits for one service, after tier and per-service overrides.
    pub fn mem_limits_for(&self, svc: Option<&Service>) -> governor_core::memory::MemLimits {
        let l = self.limits_for(svc);
        let d = &self.defaults;
        governor_core::memory::MemLimits {
            ceiling: l.memory_ceiling,
            max_restarts: d.memory_max_restarts,
            window_ns: l.window.as_nanos() as u64,
            critical: l.critical,
            settle_ns: d.memory_settle.0.as_nanos() as u64,
            drift_ratio: d.drift_ratio,
            drift_min_bytes: d.drift_min.0,
            drift_sustain_ns: d.drift_after.0.as_nanos() as u64,
            startup_allowance: d.memory_startup_allowance,
            startup_grace_ns: d.memory_startup_grace.0.as_nanos() as u64,
        }
    }

    /// Limits for one service, after tier and per-service overrides.
    pub fn limits_for(&self, svc: Option<&Service>) -> Limits {
        let d = &self.defaults;
        let tier = svc
            .and_then(|s| s.tier.as_ref())
            .and_then(|t| self.tiers.get(t.get_ref()));
        Limits {
            window: svc
                .and_then(|s| s.window)
                .or(tier.and_then(|t| t.window))
                .unwrap_or(d.window)
                .0,
            max_restarts: svc
                .and_then(|s| s.max_restarts)
                .or(tier.and_then(|t| t.max_restarts))
                .unwrap_or(d.max_restarts),
            memory_ceiling: svc
                .and_then(|s| s.memory_ceiling)
                .or(tier.and_then(|t| t.memory_ceiling))
                .unwrap_or(d.memory_ceiling)
                .0,
            stable_after: d.stable_after.0,
            action: svc
                .and_then(|s| s.crash_loop_action)
                .unwrap_or(d.crash_loop_action),
            stop_after: d.stop_after,
            critical: svc.map(|s| s.critical).unwrap_or(false),
        }
    }
}

/// Where `key` is set in the `header` table of `src` (for error
/// positions); the table's start, or 0, when it isn't found.
fn key_offset(src: &str, header: &str, key: &str) -> usize {
    let Some(h) = src.find(header) else { return 0 };
    let body = &src[h..];
    let end = body[1..].find("\n[").map(|i| i + 1).unwrap_or(body.len());
    body[..end]
        .find(&format!("\n{key}"))
        .map(|i| h + i + 1)
        .unwrap_or(h)
}

/// SHA-256 of the config text, for the audit chain.
pub fn config_hash(src: &str) -> String {
    use sha2::Digest;
    let d = sha2::Sha256::digest(src.as_bytes());
    d.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(src: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("g.toml"), src)
    }

    #[test]
    fn example_config_is_valid() {
        let cfg = parse(EXAMPLE_CONFIG).unwrap();
        assert!(!cfg.services.is_empty());
    }

    #[test]
    fn durations_and_sizes() {
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("10").is_err());
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("m").is_err());
        assert_eq!(parse_size("200MiB").unwrap(), 200 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12 parsecs").is_err());
    }

    #[test]
    fn tier_and_service_overrides() {
        let cfg = parse(
            "[defaults]\nmax_restarts = 2\n[tiers.thin]\nmemory_ceiling = \"65MiB\"\n\
             [[service]]\nname = \"a\"\npm2 = \"a\"\ntier = \"thin\"\nmax_restarts = 5\n",
        )
        .unwrap();
        let l = cfg.limits_for(cfg.services.first());
        assert_eq!(l.memory_ceiling, 65 << 20);
        assert_eq!(l.max_restarts, 5);
        assert_eq!(l.window, Duration::from_secs(600));
    }

    /// Each malformed config names the right line and key.
    #[test]
    fn malformed_configs_name_line_and_key() {
        let cases: &[(&str, usize, &str, &str)] = &[
            ("[defaults]\nwindow = \"10x\"\n", 2, "defaults.window", "unknown unit"),
            ("[daemon]\nstate_dir = \"/x\"\nsokcet = \"/y\"\n", 3, "daemon.sokcet", "unknown field"),
            ("[defaults]\nmax_restarts = \"two\"\n", 2, "defaults.max_restarts", "invalid type"),
            ("[system]\nmemory_floor = \"lots\"\n", 2, "system.memory_floor", "invalid size"),
            (
                "[[service]]\nname = \"lily\"\npm2 = \"lily\"\ntier = \"huge\"\n",
                4,
                "service.tier",
                "unknown tier",
            ),
            ("[[service]]\nname = \"x\"\ncritical = true\n", 2, "service.name", "no matcher"),
            (
                "[[service]]\nname = \"x\"\nexe = \"/bin/x\"\nargs = \"([\"\n",
                4,
                "service.args",
                "invalid regex",
            ),
            (
                "[[service]]\nname = \"a\"\npm2 = \"a\"\n\n[[service]]\nname = \"a\"\npm2 = \"b\"\n",
                6,
                "service.name",
                "duplicate",
            ),
            ("[defaults\nwindow = \"1m\"\n", 1, "", ""),
            ("[defaults]\nmemory_ceiling = \"0MiB\"\n", 2, "defaults.memory_ceiling", "= 0"),
            (
                "[tiers.thin]\nmemory_ceiling = \"100000GiB\"\n",
                2,
                "tiers.thin.memory_ceiling",
                "above this host's total RAM",
            ),
            (
                "[[service]]\nname = \"a\"\npm2 = \"a\"\nmemory_ceiling = \"0MiB\"\n",
                4,
                "service.memory_ceiling",
                "= 0",
            ),
            ("[defaults]\ndrift_ratio = 0.5\n", 2, "defaults.drift_ratio", "at least 1.0"),
            (
                "[defaults]\nmemory_startup_allowance = 0.5\n",
                2,
                "defaults.memory_startup_allowance",
                "from 1.0 (off)",
            ),
            (
                "[system]\nmemory_floor = \"100000GiB\"\n",
                2,
                "system.memory_floor",
                "not below this host's total RAM",
            ),
            (
                "[system]\nmemory_floor = \"100MiB\"\nemergency_floor = \"200MiB\"\n",
                3,
                "system.emergency_floor",
                "above system.memory_floor",
            ),
        ];
        for (src, line, key, reason) in cases {
            let e = parse(src).expect_err(src);
            assert_eq!(e.line, *line, "line for {src:?}: {e}");
            if !key.is_empty() {
                assert_eq!(e.key.as_deref(), Some(*key), "key for {src:?}: {e}");
            }
            assert!(e.reason.contains(reason), "reason for {src:?}: {e}");
            assert!(e.to_string().starts_with(&format!("g.toml:{line}:")), "{e}");
        }
    }
}
