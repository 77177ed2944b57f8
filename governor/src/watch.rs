//! `governor watch`: live exec and exit events, like bcc's execsnoop and
//! exitsnoop together, without a running daemon.

use std::io::Write;

use anyhow::Result;
use serde_json::json;

use crate::{
    events::{rfc3339, Clock, Event},
    probes::{ProbeOptions, Probes},
    proctable::{Matcher, ProcFs, ProcTable},
};

/// One event as `governor watch --json` prints it.
pub fn event_json(
    ev: &Event,
    table: &ProcTable,
    service: &str,
    clock: &Clock,
) -> Option<serde_json::Value> {
    let ts = rfc3339(clock.wall(ev.ts_ns()));
    match ev {
        Event::Exec(e) => Some(json!({
            "type": "exec",
            "ts": ts,
            "pid": e.pid,
            "ppid": e.ppid,
            "comm": e.comm,
            "exe": e.filename,
            "argv": e.argv,
            "argv_truncated": e.argv_truncated,
            "service": service,
            "pm2": table.get(e.pid).and_then(|p| p.pm2.as_ref()).map(|a| &a.name),
            "unit": table.get(e.pid).and_then(|p| p.unit.as_ref()).map(|u| u.to_string()),
        })),
        Event::Exit(e) => Some(json!({
            "type": "exit",
            "ts": ts,
            "pid": e.pid,
            "ppid": e.ppid,
            "comm": e.comm,
            "exit_code": e.code,
            "signal": e.signal,
            "core_dumped": e.core_dumped,
            "uptime_ms": e.uptime().as_millis() as u64,
            "service": service,
        })),
        Event::Fork(_) => None,
    }
}

/// Human-readable one-liner for an event.
pub fn event_line(ev: &Event, service: &str, clock: &Clock) -> Option<String> {
    let ts = rfc3339(clock.wall(ev.ts_ns()));
    match ev {
        Event::Exec(e) => Some(format!(
            "{ts} EXEC {:>7} {:>7} {:<16} {:<28} {}",
            e.pid,
            e.ppid,
            e.comm,
            service,
            e.argv.join(" ")
        )),
        Event::Exit(e) => {
            let how = match (e.code, e.signal) {
                (Some(c), _) => format!("code {c}"),
                (None, Some(s)) => {
                    format!("signal {s}{}", if e.core_dumped { " (core)" } else { "" })
                }
                _ => "?".into(),
            };
            Some(format!(
                "{ts} EXIT {:>7} {:>7} {:<16} {:<28} {how}, up {} ms",
                e.pid,
                e.ppid,
                e.comm,
                service,
                e.uptime().as_millis()
            ))
        }
        Event::Fork(_) => None,
    }
}

/// Applies `ev` to the table and prints its line (or JSON object), if it
/// has one: the same for events that woke us and those the timer drained.
fn print_event(
    out: &mut impl Write,
    table: &mut ProcTable,
    ev: &Event,
    json_out: bool,
    clock: &Clock,
) -> std::io::Result<()> {
    let service = track(table, ev);
    let line = if json_out {
        event_json(ev, table, &service, clock).map(|v| v.to_string())
    } else {
        event_line(ev, &service, clock)
    };
    match line {
        Some(line) => writeln!(out, "{line}"),
        None => Ok(()),
    }
}

/// Applies an event to the table and returns the service it concerns.
pub fn track(table: &mut ProcTable, ev: &Event) -> String {
    match ev {
        Event::Exec(e) => table.on_exec(e).service.clone(),
        Event::Fork(f) => {
            table.on_fork(f);
            table
                .get(f.pid)
                .map(|p| p.service.clone())
                .unwrap_or_default()
        }
        Event::Exit(e) => match table.on_exit(e) {
            Some(p) => p.service,
            None => table.resolve_unknown(e.uid, &e.comm),
        },
    }
}

pub async fn run(json_out: bool, matcher: Matcher) -> Result<()> {
    let mut probes = Probes::load(&ProbeOptions::default())?;
    let mut table = crate::proctable::table(matcher);
    table.seed_from_proc()?;
    probes.sync_supervisors(&mut table);
    let clock = Clock::new();
    eprintln!(
        "governor watch: tracing exec/exit ({} processes known); Ctrl-C to stop",
        table.len()
    );
    if !json_out {
        println!(
            "{:<24} TYPE {:>7} {:>7} {:<16} {:<28} DETAIL",
            "TIME", "PID", "PPID", "COMM", "SERVICE"
        );
    }
    let stdout = std::io::stdout();
    let mut last_drops = 0;
    let mut logs = probes.take_log_forwarder();
    let mut drain = tokio::time::interval(std::time::Duration::from_millis(100));
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let mut out = stdout.lock();
        let mut write_err = None;
        tokio::select! {
            r = probes.next_batch(|ev| {
                if let Err(e) = print_event(&mut out, &mut table, &ev, json_out, &clock) {
                    write_err = Some(e);
                }
            }, |e| eprintln!("governor watch: bad event record: {e:#}")) => {
                r?;
                probes.sync_supervisors(&mut table);
            }
            _ = logs.forward() => {}
            // Exec records are queued without a wakeup (see governor-ebpf).
            _ = drain.tick() => {
                probes.drain(|ev| {
                    if let Err(e) = print_event(&mut out, &mut table, &ev, json_out, &clock) {
                        write_err = Some(e);
                    }
                });
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
        }
        if let Some(e) = write_err {
            // A closed pipe (`governor watch | head`) ends the watch quietly.
            if e.kind() == std::io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(e.into());
        }
        out.flush().ok();
        let drops = probes.dropped()?;
        if drops > last_drops {
            eprintln!(
                "governor watch: {} events lost (ring full), {drops} in all",
                drops - last_drops
            );
            last_drops = drops;
        }
    }
    Ok(())
}
