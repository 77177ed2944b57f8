//! `governor install` / `uninstall`: governor as the root daemon the host
//! runs at boot, under systemd.
//!
//! Install copies the binary to `PREFIX/sbin/governor`, installs the config
//! (never overwriting one that is there), writes
//! `/etc/systemd/system/governor.service` and enables it. The unit is
//! generated from the config, because its hardening has to leave writable
//! exactly what governor must write: its state directory, the pm2 homes
//! whose CLI it runs, and protected files under the trees
//! `ProtectSystem`/`ProtectHome` make read-only (setting a file's
//! immutable flag is a write to its filesystem). `--dry-run` prints every
//! file and command and touches nothing.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::config::{Config, DEFAULT_CONFIG_PATH, EXAMPLE_CONFIG};

pub const UNIT_PATH: &str = "/etc/systemd/system/governor.service";
pub const DEFAULT_PREFIX: &str = "/usr/local";

/// The capabilities governor uses, each with why: the unit's
/// `CapabilityBoundingSet`, and what the capability test runs the daemon
/// with.
pub const CAPABILITIES: &[(&str, &str)] = &[
    ("CAP_BPF", "load the eBPF programs and create their maps"),
    (
        "CAP_PERFMON",
        "attach tracepoints and read kernel memory from them",
    ),
    (
        "CAP_SYS_ADMIN",
        "BPF LSM and kernels before 5.8 (no CAP_BPF); mount tracefs, securityfs, bpffs when missing",
    ),
    (
        "CAP_LINUX_IMMUTABLE",
        "set and lift the immutable (UNTOUCHABLE/PROTECTED) and append-only (audit log) flags",
    ),
    (
        "CAP_FOWNER",
        "change the flags of protected files root doesn't own",
    ),
    (
        "CAP_DAC_READ_SEARCH",
        "hash protected and watched files whatever their mode",
    ),
    (
        "CAP_KILL",
        "SIGKILL instances past kill_timeout, held starts, flush victims",
    ),
    (
        "CAP_SYS_PTRACE",
        "/proc/PID/exe, environ (PM2_HOME), statm, smaps_rollup of other users' processes",
    ),
    (
        "CAP_SYS_RESOURCE",
        "the PSI memory-pressure trigger on 6.1 kernels; lift RLIMIT_MEMLOCK for eBPF maps on old kernels",
    ),
    (
        "CAP_SETUID",
        "run pm2's CLI as the pm2 God's owner, never as root for another user",
    ),
    ("CAP_SETGID", "... with that owner's groups"),
    ("CAP_CHOWN", "give the MCP socket to [mcp] group"),
];

/// What install writes and runs.
#[derive(Debug)]
pub struct Plan {
    pub binary: PathBuf,
    pub config: PathBuf,
    /// `None`: a config is there already and is kept.
    pub config_text: Option<String>,
    pub unit: PathBuf,
    pub unit_text: String,
    pub commands: Vec<Vec<String>>,
}

pub struct Options {
    /// The config to install (default: the example) and to read for the
    /// unit's writable paths.
    pub config: Option<PathBuf>,
    pub prefix: PathBuf,
    pub dry_run: bool,
}

/// What the unit's mount hardening must leave alone, from the config.
#[derive(Debug, Default)]
struct Sandbox {
    /// `ReadWritePaths=`: directories under /usr, /boot, /efi that hold
    /// protected files (a directory, never the file itself: a file bind
    /// mount is detached when an editor renames a new file over it, and
    /// the flag could no longer be set), the pm2 homes, the binary.
    writable: BTreeSet<String>,
    /// A protected, watched or daemon path under /home, /root or
    /// /run/user: `ProtectHome=read-only` would make its flag unsettable.
    home: Option<String>,
    /// One under /tmp or /var/tmp: `PrivateTmp=true` would hide it.
    tmp: Option<String>,
}

fn sandbox(cfg: &Config, binary: &Path) -> Sandbox {
    let under = |p: &Path, roots: &[&str]| roots.iter().any(|r| p.starts_with(r));
    const SYSTEM: &[&str] = &["/usr", "/boot", "/efi"];
    const HOME: &[&str] = &["/home", "/root", "/run/user"];
    const TMP: &[&str] = &["/tmp", "/var/tmp"];
    let mut sb = Sandbox::default();
    if under(binary, SYSTEM) || under(binary, HOME) {
        // governor keeps its own binary immutable while installed (only
        // `install` replaces it, with the daemon stopped).
        sb.writable.insert(binary.display().to_string());
    }
    // Every path governor writes or flags: the daemon's own, then each
    // protected and watched path as configured, as the globs and lists
    // expand on this host, and where symlinks lead.
    let mut paths: Vec<(PathBuf, bool)> = vec![
        (cfg.daemon.state_dir.clone(), true),
        (
            cfg.daemon
                .socket
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_default(),
            true,
        ),
    ];
    paths.extend(
        cfg.mcp
            .socket
            .as_ref()
            .and_then(|s| s.parent())
            .map(|d| (d.to_path_buf(), true)),
    );
    paths.extend(
        cfg.export
            .events
            .as_ref()
            .and_then(|e| e.parent())
            .map(|d| (d.to_path_buf(), true)),
    );
    let p = &cfg.protect;
    for pat in p
        .untouchable
        .iter()
        .chain(&p.protected)
        .chain(&p.watch)
        .chain(&p.untouchable_lists)
        .chain(&p.protected_lists)
    {
        let literal: PathBuf = Path::new(pat.get_ref())
            .components()
            .take_while(|c| !crate::protect::glob::is_glob(&c.as_os_str().to_string_lossy()))
            .collect();
        paths.push((literal, false));
    }
    let expanded = crate::protect::config::expand(p, Path::new("governor.toml"), "");
    for t in expanded.targets {
        if let Ok(real) = std::fs::canonicalize(&t.path) {
            paths.push((real, false));
        }
        paths.push((t.path, false));
    }
    for (path, is_dir) in paths {
        if path.as_os_str().is_empty() {
            continue;
        }
        if under(&path, HOME) && sb.home.is_none() {
            sb.home = Some(path.display().to_string());
        }
        if under(&path, TMP) && sb.tmp.is_none() {
            sb.tmp = Some(path.display().to_string());
        }
        if under(&path, SYSTEM) {
            let dir = if is_dir || path.is_dir() {
                path
            } else {
                path.parent().map(Path::to_path_buf).unwrap_or(path)
            };
            sb.writable.insert(dir.display().to_string());
        }
    }
    if cfg.daemon.state_dir != Path::new("/var/lib/governor")
        && !under(&cfg.daemon.state_dir, SYSTEM)
    {
        // Outside StateDirectory=: nothing makes it read-only, but say it.
        sb.writable
            .insert(cfg.daemon.state_dir.display().to_string());
    }
    // The pm2 homes whose CLI governor runs (as their owner).
    for u in pm2_users(cfg) {
        if let Some(home) = home_of(&u) {
            sb.writable.insert(format!("{}/.pm2", home.display()));
        }
    }
    sb
}

fn pm2_users(cfg: &Config) -> BTreeSet<String> {
    cfg.services
        .iter()
        .filter(|s| s.pm2.is_some())
        .map(|s| {
            s.pm2_user
                .clone()
                .unwrap_or_else(|| cfg.defaults.pm2_user.clone())
        })
        .collect()
}

fn home_of(user: &str) -> Option<PathBuf> {
    let uid = crate::users::uid_of(user)?;
    std::fs::read_to_string("/etc/passwd")
        .ok()?
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.len() >= 6 && f[2].parse::<u32>().ok() == Some(uid)).then(|| PathBuf::from(f[5]))
        })
}

/// The unit, for `binary` running on `config_path`.
pub fn unit_text(cfg: &Config, binary: &Path, config_path: &Path) -> String {
    let sb = sandbox(cfg, binary);
    let mut u = String::new();
    let caps: Vec<&str> = CAPABILITIES.iter().map(|(c, _)| *c).collect();
    let before: Vec<String> = pm2_users(cfg)
        .iter()
        .map(|u| format!(" pm2-{u}.service"))
        .collect();
    let _ = writeln!(
        u,
        "# Written by `governor install`; `governor uninstall` removes it.
# Regenerate (governor install) after changing [protect], [drift],
# [export] or pm2 users: the sandbox below is computed from the config.
[Unit]
Description=governor: eBPF governance of restarts, memory, protected files
Documentation=man:governor(8)
After=local-fs.target
# Up before the supervisors it governs (pm2's startup units), so it sees
# their first start.
Before=multi-user.target{before}

[Service]
# READY=1 once the programs are loaded, the flags applied and the control
# socket answers; WATCHDOG=1 from the event loop (a wedged loop is killed
# and restarted).
Type=notify
NotifyAccess=main
ExecStart={bin} run --config {cfg}
ExecReload=/bin/kill -HUP $MAINPID
Restart=always
RestartSec=1s
WatchdogSec=30s
# Start-up parses the kernel's BTF and verifies every program.
TimeoutStartSec=120s
TimeoutStopSec=30s
# The last process the OOM killer may take: it is what restarts the others.
# (pm2's CLI, and a God it starts, get 0 back: see supervisor.rs.)
OOMScoreAdjust=-1000
# eBPF maps on kernels before 5.11 count against RLIMIT_MEMLOCK.
LimitMEMLOCK=infinity
StateDirectory=governor
StateDirectoryMode=0700
RuntimeDirectory=governor
RuntimeDirectoryMode=0755
RuntimeDirectoryPreserve=restart

# Hardening that leaves governor working:
# /usr, /boot read-only; writable below only where governor must write.
ProtectSystem=true",
        bin = binary.display(),
        cfg = config_path.display(),
        before = before.concat(),
    );
    match &sb.home {
        None => {
            let _ = writeln!(
                u,
                "# Homes read-only: pm2 homes (its CLI runs as their owner) stay writable.\nProtectHome=read-only"
            );
        }
        Some(p) => {
            let _ = writeln!(
                u,
                "# Not ProtectHome: {p} is governed, and its flag is set in place.\nProtectHome=no"
            );
        }
    }
    match &sb.tmp {
        None => {
            let _ = writeln!(u, "PrivateTmp=true");
        }
        Some(p) => {
            let _ = writeln!(
                u,
                "# Not PrivateTmp: {p} is governed, and a private /tmp would hide it.\nPrivateTmp=false"
            );
        }
    }
    let _ = writeln!(
        u,
        "# governor runs pm2 and systemctl, never a setuid binary.\nNoNewPrivileges=true"
    );
    for p in &sb.writable {
        // `-`: a path that doesn't exist yet is not an error.
        let _ = writeln!(u, "ReadWritePaths=-{p}");
    }
    let _ = writeln!(u, "# Exactly the capabilities governor uses:");
    for (c, why) in CAPABILITIES {
        let _ = writeln!(u, "#   {c}: {why}");
    }
    let _ = writeln!(u, "CapabilityBoundingSet={}", caps.join(" "));
    let _ = writeln!(u, "\n[Install]\nWantedBy=multi-user.target");
    u
}

fn systemd_booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// What `governor install` would do, computed without touching anything.
pub fn plan(opts: &Options) -> Result<Plan> {
    let prefix = std::path::absolute(&opts.prefix)
        .with_context(|| format!("--prefix {}", opts.prefix.display()))?;
    let binary = prefix.join("sbin/governor");
    let config = PathBuf::from(DEFAULT_CONFIG_PATH);
    let (text, cfg) = match &opts.config {
        Some(src) => {
            let text = std::fs::read_to_string(src)
                .with_context(|| format!("reading {}", src.display()))?;
            let cfg =
                Config::parse(src, &text).map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
            (text, cfg)
        }
        None if config.exists() => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let cfg = Config::parse(&config, &text)
                .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
            (text, cfg)
        }
        None => {
            let cfg = Config::parse(Path::new("examples/governor.toml"), EXAMPLE_CONFIG)
                .map_err(|e| anyhow::anyhow!("the example config: {e}"))?;
            (EXAMPLE_CONFIG.to_string(), cfg)
        }
    };
    // An existing config is never overwritten; the unit is built from the
    // one that will be in place.
    let (config_text, cfg) = if config.exists() {
        let kept = std::fs::read_to_string(&config)
            .with_context(|| format!("reading {}", config.display()))?;
        let cfg = Config::parse(&config, &kept).map_err(|e| {
            anyhow::anyhow!("the installed config {} is invalid: {e}", config.display())
        })?;
        (None, cfg)
    } else {
        (Some(text), cfg)
    };
    let unit = PathBuf::from(UNIT_PATH);
    let unit_text = unit_text(&cfg, &binary, &config);
    let mut commands = Vec::new();
    if systemd_booted() {
        commands.push(vec!["systemctl".into(), "daemon-reload".into()]);
    }
    commands.push(vec![
        "systemctl".into(),
        "enable".into(),
        "governor.service".into(),
    ]);
    Ok(Plan {
        binary,
        config,
        config_text,
        unit,
        unit_text,
        commands,
    })
}

/// Writes `bytes` to `path` through a temporary file and a rename, with
/// `mode`: a reader never sees half a file.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().context("no parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut name = path.file_name().context("no file name")?.to_os_string();
    name.push(format!(".governor-install-{}", std::process::id()));
    let tmp = dir.join(name);
    let written = (|| -> std::io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()
    })();
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
            " (governor keeps its binary and config immutable while it runs: `systemctl stop governor` first)"
        } else {
            ""
        };
        bail!("replacing {}: {e}{hint}", path.display());
    }
    Ok(())
}

/// Whether a daemon answers on the socket the config at `config` names
/// (the default socket when it can't be read).
fn daemon_answers(config: &Path) -> bool {
    let socket = Config::load(config)
        .map(|c| c.daemon.socket)
        .unwrap_or_else(|_| crate::config::Daemon::default().socket);
    std::os::unix::net::UnixStream::connect(socket).is_ok()
}

fn run(cmd: &[String]) -> Result<()> {
    let st = Command::new(&cmd[0])
        .args(&cmd[1..])
        .status()
        .with_context(|| format!("running {}", cmd.join(" ")))?;
    if !st.success() {
        bail!("{} failed with {st}", cmd.join(" "));
    }
    Ok(())
}

fn require_root() -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("install and uninstall change /etc and /usr/local: run them as root (sudo), or see what they would do with --dry-run");
    }
    Ok(())
}

pub fn install(opts: &Options) -> Result<()> {
    let plan = plan(opts)?;
    let me = std::env::current_exe().context("finding this binary")?;
    if opts.dry_run {
        println!("# governor install --dry-run: nothing is written");
        println!(
            "\n# copy {} -> {} (mode 0755)",
            me.display(),
            plan.binary.display()
        );
        match &plan.config_text {
            Some(t) => println!("\n# write {} (mode 0600)\n{t}", plan.config.display()),
            None => println!(
                "\n# keep {} (it exists; never overwritten)",
                plan.config.display()
            ),
        }
        println!(
            "\n# write {} (mode 0644)\n{}",
            plan.unit.display(),
            plan.unit_text
        );
        for c in &plan.commands {
            println!("# run: {}", c.join(" "));
        }
        return Ok(());
    }
    require_root()?;
    if std::fs::canonicalize(&me).ok() != std::fs::canonicalize(&plan.binary).ok() {
        let bytes = std::fs::read(&me).with_context(|| format!("reading {}", me.display()))?;
        if plan.binary.exists() {
            // An upgrade. The daemon keeps its installed binary immutable
            // and would put a lifted flag straight back (as tampering):
            // it must be stopped; then the person running install, as
            // root, is who lifts it.
            if daemon_answers(&plan.config) {
                bail!(
                    "governor is running and keeps {} immutable: stop it first (systemctl stop governor), then install again",
                    plan.binary.display()
                );
            }
            if let Ok(f) = std::fs::File::open(&plan.binary) {
                let _ = crate::fsflags::set_flag(&f, crate::fsflags::FS_IMMUTABLE_FL, false);
            }
        }
        write_atomic(&plan.binary, &bytes, 0o755)?;
        println!("installed {}", plan.binary.display());
    }
    match &plan.config_text {
        Some(t) => {
            write_atomic(&plan.config, t.as_bytes(), 0o600)?;
            println!("installed {}", plan.config.display());
        }
        None => println!("kept {} (never overwritten)", plan.config.display()),
    }
    write_atomic(&plan.unit, plan.unit_text.as_bytes(), 0o644)?;
    println!("wrote {}", plan.unit.display());
    for c in &plan.commands {
        run(c)?;
    }
    if systemd_booted() {
        println!("enabled; start it now with: systemctl start governor");
    } else {
        println!("enabled for the next boot (systemd is not running here, so nothing was started)");
    }
    Ok(())
}

pub fn uninstall(prefix: &Path, dry_run: bool) -> Result<()> {
    let binary = prefix.join("sbin/governor");
    let mut commands: Vec<Vec<String>> = Vec::new();
    if systemd_booted() {
        commands.push(vec![
            "systemctl".into(),
            "disable".into(),
            "--now".into(),
            "governor.service".into(),
        ]);
    } else {
        commands.push(vec![
            "systemctl".into(),
            "disable".into(),
            "governor.service".into(),
        ]);
    }
    if dry_run {
        for c in &commands {
            println!("# run: {}", c.join(" "));
        }
        println!("# remove {UNIT_PATH}");
        println!(
            "# remove {} (its immutable flag lifted first)",
            binary.display()
        );
        println!("# keep {DEFAULT_CONFIG_PATH} and the state directory (the audit chain): remove them yourself");
        return Ok(());
    }
    require_root()?;
    for c in &commands {
        if let Err(e) = run(c) {
            eprintln!("warning: {e:#}");
        }
    }
    if Path::new(UNIT_PATH).exists() {
        std::fs::remove_file(UNIT_PATH).with_context(|| format!("removing {UNIT_PATH}"))?;
        println!("removed {UNIT_PATH}");
    }
    if systemd_booted() {
        let _ = run(&["systemctl".into(), "daemon-reload".into()]);
    }
    if binary.exists() {
        if daemon_answers(Path::new(DEFAULT_CONFIG_PATH)) {
            bail!(
                "a governor daemon still answers (not started by systemd?): stop it first, then uninstall again; the unit is already removed"
            );
        }
        // The daemon leaves its binary immutable (across a stop, a crash);
        // with the daemon stopped, uninstall is the person lifting it.
        if let Ok(f) = std::fs::File::open(&binary) {
            let _ = crate::fsflags::set_flag(&f, crate::fsflags::FS_IMMUTABLE_FL, false);
        }
        std::fs::remove_file(&binary).with_context(|| format!("removing {}", binary.display()))?;
        println!("removed {}", binary.display());
    }
    println!(
        "kept {DEFAULT_CONFIG_PATH} and the state directory (the audit chain); protected files keep their immutable flag (chattr -i to release one)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(src: &str) -> Config {
        Config::parse(Path::new("t.toml"), src).unwrap()
    }

    #[test]
    fn unit_has_the_contract() {
        let u = unit_text(
            &cfg(""),
            Path::new("/usr/local/sbin/governor"),
            Path::new("/etc/governor/governor.toml"),
        );
        for line in [
            "Type=notify",
            "ExecStart=/usr/local/sbin/governor run --config /etc/governor/governor.toml",
            "WatchdogSec=30s",
            "Restart=always",
            "OOMScoreAdjust=-1000",
            "StateDirectory=governor",
            "ProtectSystem=true",
            "ProtectHome=read-only",
            "PrivateTmp=true",
            "Before=multi-user.target",
            "NoNewPrivileges=true",
            "ReadWritePaths=-/usr/local/sbin/governor",
        ] {
            assert!(u.lines().any(|l| l == line), "missing {line}:\n{u}");
        }
        let caps = u
            .lines()
            .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
            .unwrap();
        assert_eq!(caps.split(' ').count(), CAPABILITIES.len());
        assert!(caps.contains("CAP_BPF") && caps.contains("CAP_LINUX_IMMUTABLE"));
    }

    #[test]
    fn writable_paths_follow_the_config() {
        let c = cfg(
            "[daemon]\nstate_dir = \"/srv/gov\"\n[protect]\nuntouchable = [\"/root/bots/*/core.py\"]\nprotected = [\"/srv/x.json\"]\n[[service]]\nname = \"a\"\npm2 = \"a\"\n",
        );
        let sb = sandbox(&c, Path::new("/opt/governor/sbin/governor"));
        let w = &sb.writable;
        assert!(w.contains("/srv/gov"), "{w:?}");
        assert!(w.contains("/root/.pm2"), "{w:?}");
        // A protected file in a home: ProtectHome would make it unflaggable.
        assert_eq!(sb.home.as_deref(), Some("/root/bots"), "{sb:?}");
        assert!(sb.tmp.is_none());
        // Outside the read-only trees: nothing to add.
        assert!(!w.contains("/srv/x.json") && !w.iter().any(|p| p.starts_with("/opt")));
        let u = unit_text(
            &c,
            Path::new("/usr/local/sbin/governor"),
            Path::new("/etc/g.toml"),
        );
        assert!(u.lines().any(|l| l == "ProtectHome=no"), "{u}");
        assert!(
            u.contains("Before=multi-user.target pm2-root.service"),
            "{u}"
        );
        // Under /usr: its directory, never the file (a rename over it
        // would detach a file bind mount).
        let c = cfg("[protect]\nprotected = [\"/usr/local/etc/bot.json\"]\n[drift]\nwatch = [\"/tmp/w/*.json\"]\n");
        let sb = sandbox(&c, Path::new("/usr/local/sbin/governor"));
        assert!(sb.writable.contains("/usr/local/etc"), "{sb:?}");
        assert!(!sb.writable.contains("/usr/local/etc/bot.json"), "{sb:?}");
        assert_eq!(sb.tmp.as_deref(), Some("/tmp/w"), "{sb:?}");
    }
}
