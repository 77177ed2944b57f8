//! The `governor` command line. See `governor --help`.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use governor::{
    cli::{self, Target},
    config::{parse_duration, Config, DEFAULT_CONFIG_PATH},
    control::KillAction,
    daemon, doctor,
    proctable::Matcher,
    watch,
};

#[derive(Parser)]
#[command(
    name = "governor",
    version,
    about = "An eBPF-powered root daemon that keeps a small Linux host honest",
    long_about = "governor sees every exec and every process death in the kernel, flags crash \
loops while pm2 still says \"online\", keeps protected files unwritable, records every \
governance action in a hash-chained audit log, and alerts to Telegram."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the daemon in the foreground (root). SIGHUP reloads the config,
    /// SIGTERM/SIGINT stop it cleanly.
    Run {
        /// Config file.
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Log format on stderr.
        #[arg(long, value_enum, default_value = "human")]
        log_format: LogFormat,
    },
    /// Stream live exec and exit events from the kernel (root; no daemon
    /// needed). Events go to stdout, diagnostics to stderr.
    Watch {
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Resolve services with this config's matchers.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Validate a config file: exit 0 when valid, else 1 with file:line, key
    /// and reason.
    CheckConfig {
        /// The config file to check.
        path: PathBuf,
    },
    /// Services as the daemon sees them: state (stable, restarting,
    /// crash-loop, down), restarts in window, rate, last exit, pids, and what
    /// the supervisor (pm2/systemd) says. Root only.
    Status {
        /// A JSON object with a `services` array.
        #[arg(long)]
        json: bool,
        /// Also list every unmanaged process group the daemon tracks.
        #[arg(long)]
        all: bool,
        /// Redraw in place every D (default 2s) until Ctrl-C.
        #[arg(long, value_parser = dur, num_args = 0..=1, default_missing_value = "2s")]
        watch: Option<std::time::Duration>,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Record a deploy of SERVICE: its restarts during the grace period are
    /// planned and don't count toward a crash loop (still shown). Root only.
    Deploy {
        service: String,
        /// How long restarts count as the deploy's own.
        #[arg(long, default_value = "2m", value_parser = dur)]
        grace: std::time::Duration,
        /// Why (recorded in the audit chain).
        #[arg(long, default_value = "")]
        reason: String,
        /// Watched files (`[drift] watch`) the deploy changes: changes to
        /// them during the deploy are its own, not drift; their new
        /// content is declared when COMMAND exits (or the grace ends).
        #[arg(long, num_args = 1..)]
        files: Vec<PathBuf>,
        /// Declare the files' content now (a deploy without a COMMAND).
        #[arg(long, requires = "files")]
        finish: bool,
        #[command(flatten)]
        target: TargetArgs,
        /// The deploy itself, run as you (argv, no shell), after `--`.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Drift: what should be happening against what the kernel shows —
    /// watched files changed without a governance action (with who),
    /// instances governor never saw start, crash loops, memory over budget.
    Drift {
        #[command(subcommand)]
        cmd: Option<DriftCmd>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Protected files: `governor protect list [--json]`.
    Protect {
        #[command(subcommand)]
        cmd: ProtectCmd,
    },
    /// Open a write window on one protected file (a human at a terminal
    /// only; UNTOUCHABLE files also need the path typed back and alert at
    /// once). At the end the flag returns and the new SHA-256 is declared.
    Approve {
        /// The file.
        path: PathBuf,
        /// How long the window stays open (e.g. 10m).
        #[arg(long = "for", value_parser = dur, required_unless_present = "end")]
        for_: Option<std::time::Duration>,
        /// Why it must change (audited).
        #[arg(long, required_unless_present = "end")]
        reason: Option<String>,
        /// Close the window on PATH now.
        #[arg(long, conflicts_with_all = ["for_", "reason"])]
        end: bool,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// The kill switch: stop a scope of services through their supervisors
    /// and hold it down (any new process of it is killed at its exec) until
    /// a person releases it. Root only; an agent under pm2 or a unit may
    /// engage, never release.
    KillSwitch {
        #[command(subcommand)]
        cmd: KillCmd,
    },
    /// The audit chain: verify it, or show its latest entries.
    Audit {
        #[command(subcommand)]
        cmd: AuditCmd,
    },
    /// Install governor as the host's root daemon under systemd: the
    /// binary to PREFIX/sbin/governor, the config to
    /// /etc/governor/governor.toml (never overwriting one), and
    /// /etc/systemd/system/governor.service (Type=notify, watchdog,
    /// hardening, exactly the capabilities it uses), enabled. Root only.
    Install {
        /// The config to install (default: the example config); an
        /// installed one is kept.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where the binary goes (PREFIX/sbin/governor).
        #[arg(long, default_value = governor::install::DEFAULT_PREFIX)]
        prefix: PathBuf,
        /// Print every file it would write and every command it would run;
        /// change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Disable and remove the systemd service and the binary; the config
    /// and the state directory (the audit chain) are kept.
    Uninstall {
        #[arg(long, default_value = governor::install::DEFAULT_PREFIX)]
        prefix: PathBuf,
        /// Say what it would do; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// The MCP server (Model Context Protocol over stdio) for agents: an
    /// agent's MCP client spawns `governor mcp`, which asks the daemon.
    /// Tools: status, protect_check, request_approval, memory_headroom,
    /// may_start_job, audit_tail, kill_switch_engage. Root reaches the
    /// control socket; other users the [mcp] socket (default
    /// /run/governor/mcp.sock when the config isn't readable).
    Mcp {
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Report kernel features and which enforcement layers `governor run`
    /// would use.
    Doctor {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Config whose state_dir is probed for file-flag support.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum DriftCmd {
    /// Resolve one drift item: a watched file's current content becomes
    /// its declared content, or a service's running instance becomes the
    /// expected one. A person at a login terminal only; audited.
    Accept {
        /// A watched file's path, or a service name.
        target: String,
        /// Why (required, audited).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        conn: TargetArgs,
    },
}

#[derive(clap::Args)]
struct TargetArgs {
    /// Config to find the daemon's socket in.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The daemon's control socket (overrides the config).
    #[arg(long)]
    socket: Option<PathBuf>,
}

impl TargetArgs {
    fn target(self) -> Target {
        Target {
            config: self.config,
            socket: self.socket,
        }
    }
}

#[derive(Subcommand)]
enum KillCmd {
    /// Stop SCOPE and hold it: `all` (every supervised service; never
    /// governor, PID 1, sshd, pm2's God or a login session), `non-critical`
    /// (all but `critical = true` services), or service names.
    Engage {
        #[arg(long, num_args = 1.., required = true)]
        scope: Vec<String>,
        /// Why (required, audited).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Release the switch and restart what it stopped (a person at a login
    /// terminal only).
    Release {
        /// Release only these services (the rest stays held); what the
        /// switch stopped of them is restarted.
        #[arg(long, num_args = 1..)]
        scope: Vec<String>,
        /// Why (required, audited).
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        target: TargetArgs,
    },
    /// Whether it is engaged, its scope, who engaged it and what it stopped.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: TargetArgs,
    },
}

#[derive(Subcommand)]
enum ProtectCmd {
    /// Every protected file: tier, device:inode, flag state, declared
    /// SHA-256, open window.
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: TargetArgs,
    },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Walk the whole chain (every rotated file): exit 0 with
    /// `ok: N entries, head SEQ:HASH`, else 1 naming the first bad entry.
    Verify {
        /// The log (default: audit.jsonl in the config's state_dir).
        #[arg(long)]
        log: Option<PathBuf>,
        /// Fail when the chain ends before this head (detects truncation).
        #[arg(long, value_name = "SEQ:HASH")]
        expect_head: Option<String>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print the last entries.
    Tail {
        #[arg(short = 'n', default_value_t = 20)]
        n: usize,
        /// Keep printing new entries as they are appended.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Raw JSON lines.
        #[arg(long)]
        json: bool,
        #[arg(long)]
        log: Option<PathBuf>,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn dur(s: &str) -> Result<std::time::Duration, String> {
    parse_duration(s)
}

fn report(r: anyhow::Result<()>, what: &str) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("governor {what}: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("governor: invalid config: {e}");
        ExitCode::from(1)
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::CheckConfig { path } => match Config::load(&path) {
            Ok(cfg) => {
                // Protected paths are checked against the filesystem here
                // (and reported at start): a missing path, a directory, a
                // glob matching nothing or a bad list line.
                let src = std::fs::read_to_string(&path).unwrap_or_default();
                let problems = governor::protect::check_all(&cfg.protect, &path, &src);
                if !problems.is_empty() {
                    for p in &problems {
                        eprintln!("{p}");
                    }
                    return ExitCode::from(1);
                }
                println!(
                    "{}: ok ({} services, {} tiers)",
                    path.display(),
                    cfg.services.len(),
                    cfg.tiers.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        },
        Cmd::Doctor { json, config } => {
            let cfg = match &config {
                Some(p) => match load_config(p) {
                    Ok(c) => Some(c),
                    Err(code) => return code,
                },
                None => None,
            };
            let state_dir = cfg
                .as_ref()
                .map(|c| c.daemon.state_dir.clone())
                .unwrap_or_else(|| PathBuf::from("/var/lib/governor"));
            let protect = cfg
                .as_ref()
                .zip(config.as_deref())
                .map(|(c, p)| (&c.protect, p));
            let report = doctor::run_checks(&state_dir, protect);
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => {
                        eprintln!("governor doctor: {e}");
                        return ExitCode::from(1);
                    }
                }
            } else {
                report.print_human();
            }
            ExitCode::SUCCESS
        }
        Cmd::Watch { json, config } => {
            let matcher = match config {
                Some(p) => match load_config(&p) {
                    Ok(c) => governor::proctable::matcher(&c),
                    Err(code) => return code,
                },
                None => Matcher::default(),
            };
            block_on(watch::run(json, matcher))
        }
        Cmd::Status {
            json,
            all,
            watch,
            target,
        } => report(cli::status(&target.target(), json, all, watch), "status"),
        Cmd::Deploy {
            service,
            grace,
            reason,
            files,
            finish,
            target,
            command,
        } => report(
            cli::deploy(
                &target.target(),
                &service,
                grace.as_secs(),
                &reason,
                &files,
                finish,
                &command,
            ),
            "deploy",
        ),
        Cmd::Drift { cmd, json, target } => match cmd {
            None => report(cli::drift(&target.target(), None, "", json), "drift"),
            Some(DriftCmd::Accept {
                target: what,
                reason,
                conn,
            }) => report(
                cli::drift(&conn.target(), Some(&what), &reason, false),
                "drift accept",
            ),
        },
        Cmd::Protect {
            cmd: ProtectCmd::List { json, target },
        } => report(cli::protect_list(&target.target(), json), "protect list"),
        Cmd::Approve {
            path,
            for_,
            reason,
            end,
            target,
        } => {
            let t = target.target();
            if end {
                report(cli::approve_end(&t, &path), "approve --end")
            } else {
                report(
                    cli::approve(
                        &t,
                        &path,
                        for_.map(|d| d.as_secs()).unwrap_or(0),
                        reason.as_deref().unwrap_or(""),
                    ),
                    "approve",
                )
            }
        }
        Cmd::KillSwitch { cmd } => match cmd {
            KillCmd::Engage {
                scope,
                reason,
                target,
            } => report(
                cli::kill_switch(&target.target(), KillAction::Engage, scope, &reason, false),
                "kill-switch engage",
            ),
            KillCmd::Release {
                scope,
                reason,
                target,
            } => report(
                cli::kill_switch(&target.target(), KillAction::Release, scope, &reason, false),
                "kill-switch release",
            ),
            KillCmd::Status { json, target } => report(
                cli::kill_switch(&target.target(), KillAction::Status, vec![], "", json),
                "kill-switch status",
            ),
        },
        Cmd::Audit { cmd } => match cmd {
            AuditCmd::Verify {
                log,
                expect_head,
                config,
            } => match (Target {
                config,
                socket: None,
            })
            .audit_log(log)
            {
                Ok(log) => cli::audit_verify(&log, expect_head.as_deref()),
                Err(e) => report(Err(e), "audit verify"),
            },
            AuditCmd::Tail {
                n,
                follow,
                json,
                log,
                config,
            } => report(
                (Target {
                    config,
                    socket: None,
                })
                .audit_log(log)
                .and_then(|l| cli::audit_tail(&l, n, follow, json)),
                "audit tail",
            ),
        },
        Cmd::Install {
            config,
            prefix,
            dry_run,
        } => report(
            governor::install::install(&governor::install::Options {
                config,
                prefix,
                dry_run,
            }),
            "install",
        ),
        Cmd::Uninstall { prefix, dry_run } => {
            report(governor::install::uninstall(&prefix, dry_run), "uninstall")
        }
        Cmd::Mcp { target } => {
            let socket = match cli::mcp_socket(&target.target()) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("governor mcp: {e:#}");
                    return ExitCode::from(1);
                }
            };
            block_on(governor_mcp::serve_stdio(std::sync::Arc::new(
                cli::SocketBackend { socket },
            )))
        }
        Cmd::Run { config, log_format } => {
            daemon::tune_allocator();
            daemon::init_logging(matches!(log_format, LogFormat::Json));
            block_on(daemon::run(config))
        }
    }
}

/// Runs a command's future on a single-threaded runtime: the daemon's work
/// is event-driven and small, and one thread keeps its footprint small.
fn block_on(fut: impl std::future::Future<Output = anyhow::Result<()>>) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("governor: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("governor: {e:#}");
            ExitCode::from(1)
        }
    }
}
