//! `governor run`: the daemon's event loop. I/O (ring, signals, timers)
//! lives here; decisions live in the policy modules.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    config::Config,
    events::Event,
    probes::{ProbeOptions, Probes},
    proctable::{Matcher, ProcTable},
    watch,
};

/// Logs go to stderr, human-readable or one JSON object per line.
pub fn init_logging(json: bool) {
    let env = env_logger::Env::default().default_filter_or("info");
    let mut b = env_logger::Builder::from_env(env);
    if json {
        b.format(|buf, rec| {
            use std::io::Write;
            let line = serde_json::json!({
                "ts": crate::events::rfc3339(std::time::SystemTime::now()),
                "level": rec.level().to_string().to_lowercase(),
                "target": rec.target(),
                "msg": rec.args().to_string(),
            });
            writeln!(buf, "{line}")
        });
    }
    b.init();
}

/// Daemon state the event loop owns.
pub struct Daemon {
    pub config_path: PathBuf,
    pub config: Config,
    pub table: ProcTable,
}

impl Daemon {
    fn reload(&mut self) {
        match Config::load(&self.config_path) {
            Ok(cfg) => {
                self.table.set_matcher(Matcher::new(&cfg));
                self.config = cfg;
                log::info!("config reloaded from {}", self.config_path.display());
            }
            Err(e) => log::error!("config reload rejected, keeping the old config: {e}"),
        }
    }

    fn on_event(&mut self, ev: Event) {
        let service = watch::track(&mut self.table, &ev);
        if let Event::Exit(e) = &ev {
            log::debug!(
                "exit pid {} ({service}) code {:?} signal {:?}",
                e.pid,
                e.code,
                e.signal
            );
        }
    }
}

fn ensure_dir(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).with_context(|| format!("creating {}", p.display()))
}

pub async fn run(config_path: PathBuf) -> Result<()> {
    let config = Config::load(&config_path).map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    ensure_dir(&config.daemon.state_dir)?;
    let mut probes = Probes::load(&ProbeOptions {
        ring_bytes: config.daemon.ring_size.0 as u32,
    })?;
    let mut table = ProcTable::new(Matcher::new(&config));
    let seeded = table
        .seed_from_proc()
        .context("seeding the process table from /proc")?;
    log::info!(
        "governor {} started: {seeded} processes, {} services configured",
        env!("CARGO_PKG_VERSION"),
        config.services.len()
    );
    let mut d = Daemon {
        config_path,
        config,
        table,
    };
    let mut logs = probes.take_log_forwarder();
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
    let mut last_drops = 0;
    loop {
        tokio::select! {
            r = probes.next_batch(|ev| d.on_event(ev), |e| log::warn!("bad event record: {e:#}")) => { r?; }
            _ = logs.forward() => {}
            _ = hup.recv() => d.reload(),
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = tick.tick() => {
                let drops = probes.dropped()?;
                if drops > last_drops {
                    log::warn!("{} lifecycle events lost (ring full), {drops} in all", drops - last_drops);
                    last_drops = drops;
                }
            }
        }
    }
    log::info!("governor stopping");
    Ok(())
}
