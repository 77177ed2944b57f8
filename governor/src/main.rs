//! The `governor` command line. See `governor --help`.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use governor::{
    config::{Config, DEFAULT_CONFIG_PATH},
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
            let state_dir = match config {
                Some(p) => match load_config(&p) {
                    Ok(c) => c.daemon.state_dir,
                    Err(code) => return code,
                },
                None => PathBuf::from("/var/lib/governor"),
            };
            let report = doctor::run_checks(&state_dir);
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
                    Ok(c) => Matcher::new(&c),
                    Err(code) => return code,
                },
                None => Matcher::default(),
            };
            block_on(watch::run(json, matcher))
        }
        Cmd::Run { config, log_format } => {
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
