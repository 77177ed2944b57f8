//! Client-side commands: they talk to the daemon over the control socket or
//! read the audit log directly, and render for people or for machines.

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::{
    config::{Config, DEFAULT_CONFIG_PATH},
    control::{self, Request},
};

/// Where the CLI finds the daemon and its files: `--socket`/`--log`, else the
/// config (`--config`, default /etc/governor/governor.toml), else defaults.
pub struct Target {
    pub config: Option<PathBuf>,
    pub socket: Option<PathBuf>,
}

impl Target {
    fn load_config(&self) -> Result<Option<Config>> {
        let path = self
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH));
        if self.config.is_none() && !path.exists() {
            return Ok(None);
        }
        Config::load(&path)
            .map(Some)
            .map_err(|e| anyhow::anyhow!("invalid config: {e}"))
    }

    pub fn socket(&self) -> Result<PathBuf> {
        if let Some(s) = &self.socket {
            return Ok(s.clone());
        }
        Ok(self
            .load_config()?
            .map(|c| c.daemon.socket)
            .unwrap_or_else(|| crate::config::Daemon::default().socket))
    }

    pub fn audit_log(&self, log: Option<PathBuf>) -> Result<PathBuf> {
        if let Some(l) = log {
            return Ok(l);
        }
        Ok(self
            .load_config()?
            .map(|c| c.daemon.state_dir)
            .unwrap_or_else(|| crate::config::Daemon::default().state_dir)
            .join("audit.jsonl"))
    }
}

/// The socket `governor mcp` talks to: `--socket`; else, for root, the
/// control socket; for anyone else the config's `[mcp] socket`, or
/// `/run/governor/mcp.sock` when the config can't be read (it is root's).
pub fn mcp_socket(target: &Target) -> Result<PathBuf> {
    if let Some(s) = &target.socket {
        return Ok(s.clone());
    }
    let root = rustix::process::geteuid().is_root();
    match target.load_config() {
        Ok(Some(c)) if root => Ok(c.daemon.socket),
        Ok(Some(c)) => c
            .mcp
            .socket
            .context("the config has no [mcp] socket: non-root agents need one (or pass --socket)"),
        Ok(None) if root => Ok(crate::config::Daemon::default().socket),
        Ok(None) => Ok(PathBuf::from(DEFAULT_MCP_SOCKET)),
        Err(_) if !root => Ok(PathBuf::from(DEFAULT_MCP_SOCKET)),
        Err(e) => Err(e),
    }
}

/// Where non-root agents find the MCP socket when the config says nothing
/// they can read.
pub const DEFAULT_MCP_SOCKET: &str = "/run/governor/mcp.sock";

/// `governor mcp`'s way to the daemon: one control-socket request per
/// tool call.
pub struct SocketBackend {
    pub socket: PathBuf,
}

impl governor_mcp::Backend for SocketBackend {
    fn call(&self, call: Value) -> std::result::Result<Value, String> {
        let call: control::McpCall =
            serde_json::from_value(call).map_err(|e| format!("bad arguments: {e}"))?;
        let resp = control::request(&self.socket, &Request::Mcp { call }, false)
            .map_err(|e| format!("{e:#}"))?;
        if resp.ok {
            Ok(resp.data)
        } else {
            Err(resp.error.unwrap_or_else(|| "the daemon refused".into()))
        }
    }
}

/// Sends a request; prints the daemon's refusal (or our failure) clearly.
fn ask(target: &Target, req: &Request, pass_stdin: bool) -> Result<Value> {
    let socket = target.socket()?;
    let resp = control::request(&socket, req, pass_stdin)?;
    if !resp.ok {
        anyhow::bail!(
            "{}",
            resp.error.unwrap_or_else(|| "the daemon refused".into())
        );
    }
    Ok(resp.data)
}

fn ms_human(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0 => format!("{ms}ms"),
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86_400),
    }
}

fn last_exit_str(v: &Value) -> String {
    if v.is_null() {
        return "-".into();
    }
    let how = match (v["code"].as_i64(), v["signal"].as_i64()) {
        (Some(c), _) => format!("code {c}"),
        (_, Some(s)) => format!("sig {s}"),
        _ => "?".into(),
    };
    format!(
        "{how} after {}, {} ago{}",
        ms_human(v["uptime_ms"].as_u64().unwrap_or(0)),
        ms_human(v["ago_ms"].as_u64().unwrap_or(0)),
        if v["planned"] == true {
            " (planned)"
        } else {
            ""
        }
    )
}

/// Left-aligned columns, two spaces apart, sized to their widest cell.
fn render_table<const N: usize>(rows: &[[String; N]]) -> String {
    let widths: Vec<usize> = (0..N)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// "73/200 MiB ok", "212/200 MiB OVER-CEILING (base 70)", "-".
fn memory_str(s: &Value) -> String {
    let mib = |v: &Value| v.as_u64().map(|b| (b + (1 << 19)) >> 20);
    let Some(rss) = mib(&s["rss_bytes"]) else {
        return "-".into();
    };
    let mut out = match mib(&s["ceiling_bytes"]) {
        Some(c) => format!("{rss}/{c} MiB"),
        None => format!("{rss} MiB"),
    };
    match s["memory_state"].as_str() {
        Some("ok") | None => {}
        Some(st) => out.push_str(&format!(" {}", st.to_uppercase())),
    }
    if let Some(b) = mib(&s["baseline_bytes"]) {
        out.push_str(&format!(" (base {b})"));
    }
    if let Some(p) = mib(&s["pm2_max_memory_restart_bytes"]) {
        out.push_str(&format!(" [pm2 max {p}]"));
    }
    out
}

/// `governor status` as a table a person reads at a glance. `colour`: states in colour (only when
/// stdout is a terminal and NO_COLOR is unset; see [`status`]).
pub fn render_status(data: &Value, colour: bool) -> String {
    use comfy_table::{presets::NOTHING, Cell, Color, ContentArrangement, Table};
    let mut t = Table::new();
    t.load_style(NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled);
    if colour {
        t.enforce_styling();
    } else {
        t.force_no_tty();
    }
    t.set_header(vec![
        "SERVICE",
        "STATE",
        "RESTARTS",
        "RATE/MIN",
        "UPTIME",
        "MEMORY",
        "PIDS",
        "LAST EXIT",
        "SUPERVISOR SAYS",
    ]);
    for s in data["services"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let pids: Vec<String> = s["pids"]
            .as_array()
            .map(|a| a.iter().map(|p| p.to_string()).collect())
            .unwrap_or_default();
        let raw = s["state"].as_str().unwrap_or("?");
        let mut state = if raw == "crash-loop" {
            "CRASH-LOOP".to_string()
        } else {
            raw.to_string()
        };
        if s["killswitch_held"] == true {
            state.push_str(" [HELD]");
        }
        // Restart and memory drift show in the state and MEMORY columns.
        let drift: Vec<&str> = s["drift"]
            .as_array()
            .map(|d| {
                d.iter()
                    .filter_map(Value::as_str)
                    .filter(|k| !matches!(*k, "restart" | "memory"))
                    .collect()
            })
            .unwrap_or_default();
        if !drift.is_empty() {
            state.push_str(&format!(" [drift: {}]", drift.join(",")));
        }
        let state_colour = match raw {
            "crash-loop" | "down" => Color::Red,
            "restarting" => Color::Yellow,
            _ => Color::Green,
        };
        let mem_colour = match s["memory_state"].as_str() {
            Some("over-ceiling") | Some("memory-loop") => Color::Red,
            Some("drift") => Color::Yellow,
            _ => Color::Reset,
        };
        // Names come from other users' processes: no control characters
        // reach root's terminal.
        let mut name: String = s["name"]
            .as_str()
            .unwrap_or("?")
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        if s["critical"] == true {
            name.push_str(" *");
        }
        t.add_row(vec![
            Cell::new(name),
            Cell::new(state).fg(state_colour),
            Cell::new(format!(
                "{}/{} in {}{}",
                s["restarts_in_window"],
                s["max_restarts"],
                ms_human(s["window_s"].as_u64().unwrap_or(0) * 1000),
                match s["planned_in_window"].as_u64() {
                    Some(n) if n > 0 => format!(" (+{n} planned)"),
                    _ => String::new(),
                }
            )),
            Cell::new(format!("{:.1}", s["rate_per_min"].as_f64().unwrap_or(0.0))),
            Cell::new(
                s["uptime_ms"]
                    .as_u64()
                    .map(ms_human)
                    .unwrap_or_else(|| "-".into()),
            ),
            Cell::new(memory_str(s)).fg(mem_colour),
            Cell::new(if pids.is_empty() {
                "-".into()
            } else {
                pids.join(",")
            }),
            Cell::new(last_exit_str(&s["last_exit"])),
            Cell::new(s["supervisor_view"].as_str().unwrap_or("-")),
        ]);
    }
    let mut out = String::new();
    let m = &data["memory"];
    if let Some(a) = m["available_bytes"].as_u64() {
        out.push_str(&format!("memory available {} MiB", a >> 20));
        if let Some(f) = m["floor_bytes"].as_u64().filter(|&f| f > 0) {
            out.push_str(&format!(", floor {} MiB", f >> 20));
        }
        if let Some(p) = m["psi_some_avg10"].as_f64() {
            out.push_str(&format!(", pressure {p:.2}% (avg10)"));
        }
        if m["flush_active"].as_bool() == Some(true) {
            out.push_str(", FLUSH CYCLE RUNNING");
        }
        out.push('\n');
    }
    let ks = &data["kill_switch"];
    if ks["engaged"] == true {
        out.push_str(&format!(
            "KILL SWITCH ENGAGED (scope {}): held services are marked [HELD]\n",
            ks["scope"]
        ));
    }
    if let Some(n) = data["drift_files"].as_u64().filter(|&n| n > 0) {
        out.push_str(&format!(
            "{n} watched file(s) drifted: see `governor drift`\n"
        ));
    }
    let held = &data["audit_held"];
    if !held.is_null() {
        out.push_str(&format!(
            "AUDIT LOG NOT WRITABLE since {} ({}): {} entries held in memory, {} dropped — \
             enforcement continues; free space in the state directory\n",
            held["since"].as_str().unwrap_or("?"),
            held["error"].as_str().unwrap_or("?"),
            held["held"],
            held["dropped"]
        ));
    }
    if let Some(note) = data["supervisor_views"].as_str() {
        out.push_str(&format!("supervisors: {note}\n"));
    }
    for line in t.lines() {
        out.push_str(line.trim_end());
        out.push('\n');
    }
    if let Some(h) = data["audit_head"].as_str() {
        out.push_str(&format!(
            "audit head {h}   (* critical: never restarted for memory)\n"
        ));
    }
    out
}

/// `governor status [--json] [--all] [--watch D]`.
pub fn status(
    target: &Target,
    json: bool,
    all: bool,
    watch: Option<std::time::Duration>,
) -> Result<()> {
    use std::io::{IsTerminal, Write};
    let tty = std::io::stdout().is_terminal();
    let colour = tty && std::env::var_os("NO_COLOR").is_none();
    // Each redraw asks pm2 for its view: not more than once a second.
    let watch = watch.map(|w| w.max(std::time::Duration::from_secs(1)));
    loop {
        let data = ask(target, &Request::Status { all }, false)?;
        let text = if json {
            format!("{}\n", serde_json::to_string_pretty(&data)?)
        } else {
            render_status(&data, colour)
        };
        let Some(every) = watch else {
            print!("{text}");
            return Ok(());
        };
        let mut out = std::io::stdout().lock();
        if tty {
            // Home, draw over the last frame line by line, clear what it
            // left below: in place, without a blank flash.
            write!(out, "\x1b[H{}", text.replace('\n', "\x1b[K\n"))?;
            write!(
                out,
                "\x1b[J(every {} s; Ctrl-C stops) {}\x1b[K",
                every.as_secs_f64(),
                crate::events::rfc3339(std::time::SystemTime::now())
            )?;
        } else {
            writeln!(out, "{text}")?;
        }
        out.flush()?;
        drop(out);
        std::thread::sleep(every);
    }
}

/// `governor deploy SERVICE [--files F…] [-- COMMAND…]`: records the
/// deploy (its restarts during the grace are planned); with `--files`,
/// changes to those watched files during the deploy are its own, not
/// drift, and with a COMMAND (run here, as the caller, argv as given: no
/// shell) their new content is declared as soon as it exits.
pub fn deploy(
    target: &Target,
    service: &str,
    grace_s: u64,
    reason: &str,
    files: &[PathBuf],
    finish: bool,
    command: &[String],
) -> Result<()> {
    let abs: Vec<String> = files
        .iter()
        .map(|f| {
            std::path::absolute(f)
                .map(|p| p.display().to_string())
                .with_context(|| format!("--files {}", f.display()))
        })
        .collect::<Result<_>>()?;
    let req = |finish: bool| Request::Deploy {
        service: service.into(),
        grace_s,
        reason: reason.into(),
        files: abs.clone(),
        finish,
    };
    if finish {
        let data = ask(target, &req(true), false)?;
        print_declared(&data);
        return Ok(());
    }
    let data = ask(target, &req(false), false)?;
    println!(
        "deploy of {service} recorded (audit {}); restarts in the next {grace_s} s are planned",
        data["audit"].as_str().unwrap_or("?")
    );
    if command.is_empty() {
        if !abs.is_empty() {
            println!(
                "changes to {} are the deploy's until the grace ends (or `governor deploy {service} --finish --files …`)",
                abs.join(", ")
            );
        }
        return Ok(());
    }
    let status = std::process::Command::new(&command[0])
        .args(&command[1..])
        .status()
        .with_context(|| format!("running {:?}", command[0]));
    // The files' content is declared whatever the command did: what is on
    // disk now is what the deploy left.
    if !abs.is_empty() {
        let data = ask(target, &req(true), false)?;
        print_declared(&data);
    }
    let status = status?;
    if !status.success() {
        anyhow::bail!("the deploy command {:?} failed: {status}", command[0]);
    }
    Ok(())
}

fn print_declared(data: &Value) {
    for f in data["files"].as_array().into_iter().flatten() {
        println!(
            "  {}: {} (sha256 {})",
            f["path"].as_str().unwrap_or("?"),
            if f["changed"] == true {
                "changed, declared"
            } else {
                "unchanged"
            },
            f["new_sha256"].as_str().unwrap_or("-")
        );
    }
}

/// `governor drift [--json]`, `governor drift accept TARGET --reason`.
pub fn drift(target: &Target, accept: Option<&str>, reason: &str, json: bool) -> Result<()> {
    // A path (anything with a slash, or an existing file) is made
    // absolute here: the daemon's working directory is not the caller's.
    let accept = accept.map(|t| {
        if t.contains('/') || Path::new(t).is_file() {
            std::path::absolute(t)
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| t.to_string())
        } else {
            t.to_string()
        }
    });
    let data = ask(
        target,
        &Request::Drift {
            accept: accept.clone(),
            reason: reason.into(),
        },
        accept.is_some(),
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&data)?);
        return Ok(());
    }
    if let Some(t) = &accept {
        println!("drift on {t} accepted (audited)");
        return Ok(());
    }
    let items = data["items"].as_array().cloned().unwrap_or_default();
    if items.is_empty() {
        println!("no drift: everything matches its declared state");
    }
    for i in items {
        let what = i["path"].as_str().or(i["service"].as_str()).unwrap_or("?");
        let who = match &i["who"] {
            Value::Null => String::new(),
            w => format!(
                " — by pid {} ({}) {} uid {}{}",
                w["pid"],
                w["comm"].as_str().unwrap_or("?"),
                w["exe"].as_str().unwrap_or("?"),
                w["uid"],
                w["service"]
                    .as_str()
                    .map(|s| format!(", service {s}"))
                    .unwrap_or_default()
            ),
        };
        println!(
            "{:<7} {what}: {}{who}{}",
            i["kind"].as_str().unwrap_or("?"),
            i["detail"].as_str().unwrap_or(""),
            i["since"]
                .as_str()
                .map(|s| format!(" (since {s})"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

/// `governor kill-switch engage|release|status`. The client's stdin goes
/// with the request: releasing takes a person at a terminal.
pub fn kill_switch(
    target: &Target,
    action: crate::control::KillAction,
    scope: Vec<String>,
    reason: &str,
    json: bool,
) -> Result<()> {
    use crate::control::KillAction;
    let data = ask(
        target,
        &Request::KillSwitch {
            action,
            scope,
            reason: reason.into(),
        },
        matches!(action, KillAction::Release),
    )?;
    if json {
        println!("{}", serde_json::to_string_pretty(&data)?);
        return Ok(());
    }
    match action {
        KillAction::Status => match data["engaged"].as_object() {
            None => println!("kill switch: released"),
            Some(e) => {
                println!(
                    "kill switch: ENGAGED (scope {}) by {}: {}",
                    e["scope"]["kind"].as_str().unwrap_or("?"),
                    e["by"].as_str().unwrap_or("?"),
                    e["reason"].as_str().unwrap_or("")
                );
                if let Some(s) = e["stopped"].as_object() {
                    let names: Vec<&str> = s.keys().map(String::as_str).collect();
                    println!("stopped, restarted on release: {}", names.join(", "));
                }
            }
        },
        _ => {
            println!(
                "kill switch {} (audit {})",
                match (action, data["engaged"] == true) {
                    (KillAction::Release, true) => "partly released; still ENGAGED for the rest",
                    (_, true) => "ENGAGED",
                    (_, false) => "released",
                },
                data["audit_head"].as_str().unwrap_or("?")
            );
            for s in data["services"].as_array().into_iter().flatten() {
                let ended: Vec<String> = s["ended"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| format!("{} {}", e["pid"], e["how"].as_str().unwrap_or("?")))
                    .collect();
                println!(
                    "  {}: {}, {} says {}{}",
                    s["service"].as_str().unwrap_or("?"),
                    s["state"].as_str().unwrap_or("?"),
                    s["supervisor"]["kind"].as_str().unwrap_or("supervisor"),
                    s["supervisor_says"].as_str().unwrap_or("?"),
                    if ended.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", ended.join(", "))
                    }
                );
            }
        }
    }
    Ok(())
}

pub fn audit_verify(log: &Path, expect_head: Option<&str>) -> ExitCode {
    let expect = match expect_head.map(str::parse::<governor_audit::Head>) {
        None => None,
        Some(Ok(h)) => Some(h),
        Some(Err(e)) => {
            eprintln!("governor audit verify: --expect-head: {e}");
            return ExitCode::from(2);
        }
    };
    match governor_audit::verify(log, expect.as_ref()) {
        Ok(ok) => {
            println!("{ok}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("FAIL: {e}");
            ExitCode::from(1)
        }
    }
}

fn print_entry(e: &governor_audit::Entry, json: bool) {
    if json {
        println!("{}", e.to_line().trim_end());
    } else {
        println!("{e}");
    }
}

pub fn audit_tail(log: &Path, n: usize, follow: bool, json: bool) -> Result<()> {
    let entries =
        governor_audit::tail(log, n).with_context(|| format!("reading {}", log.display()))?;
    for e in &entries {
        print_entry(e, json);
    }
    if follow {
        let from = governor_audit::end_offset(log)?;
        governor_audit::follow(log, from, |e| {
            print_entry(e, json);
            use std::io::Write;
            std::io::stdout().flush().is_ok()
        })?;
    }
    Ok(())
}

/// `governor protect list`: every protected file, its tier, identity, flag
/// state, declared SHA-256 and any open window.
pub fn protect_list(target: &Target, json: bool) -> Result<()> {
    let data = ask(target, &Request::ProtectList, false)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&data)?);
        return Ok(());
    }
    let layers: Vec<&str> = data["layers"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    println!("layers: {}", layers.join(", "));
    let mut rows = vec![[
        "PATH".to_string(),
        "TIER".into(),
        "DEV:INO".into(),
        "FLAG".into(),
        "SHA-256".into(),
        "WINDOW".into(),
    ]];
    for f in data["files"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let window = if f["window"].is_null() {
            "-".to_string()
        } else {
            format!(
                "open {} s more ({})",
                f["window"]["remaining_s"],
                f["window"]["reason"].as_str().unwrap_or("")
            )
        };
        rows.push([
            f["path"].as_str().unwrap_or("?").to_string(),
            f["tier"].as_str().unwrap_or("?").to_string(),
            f["dev_ino"].as_str().unwrap_or("-").to_string(),
            f["flag"].as_str().unwrap_or("?").to_string(),
            f["declared_sha256"]
                .as_str()
                .map(|h| h.chars().take(16).collect::<String>())
                .unwrap_or_else(|| "-".into()),
            window,
        ]);
    }
    print!("{}", render_table(&rows));
    // Protection follows the inode, not the name.
    for f in data["files"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        let path = f["path"].as_str().unwrap_or("?");
        let real = f["real_path"].as_str().unwrap_or(path);
        let now = f["now_at"].as_str();
        let configured = f["configured_path"].as_str().unwrap_or("this file");
        if configured != "this file" && configured != "missing" {
            println!(
                "{path}: the path {configured} (a parent renamed, or a mount laid over one); \
                 the file is still protected, at {}",
                now.unwrap_or("an unknown place (no descriptor held)")
            );
        } else if let Some(now) = now.filter(|n| *n != real) {
            println!("{path}: now at {now}");
        }
    }
    Ok(())
}

/// `governor approve`: opens a write window on one protected file. The
/// daemon checks for itself that a terminal is on our stdin (we pass the
/// descriptor); for UNTOUCHABLE files the path must be typed back.
pub fn approve(target: &Target, path: &Path, for_s: u64, reason: &str) -> Result<()> {
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdin());
    if !tty {
        anyhow::bail!(
            "approve needs a human at a terminal: stdin is not a tty (a script or an agent can't approve its own writes)"
        );
    }
    let abs = std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    let list = ask(target, &Request::ProtectList, false)?;
    let tier = list["files"]
        .as_array()
        .and_then(|fs| {
            fs.iter().find(|f| {
                f["path"].as_str() == abs.to_str() || f["real_path"].as_str() == abs.to_str()
            })
        })
        .and_then(|f| f["tier"].as_str().map(str::to_string));
    let mut confirm = None;
    if tier.as_deref() == Some("untouchable") {
        eprintln!(
            "{} is UNTOUCHABLE. Opening it for writing sends an alert.\nType the full path to confirm:",
            abs.display()
        );
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        confirm = Some(line.trim().to_string());
    }
    let data = ask(
        target,
        &Request::Approve {
            path: abs.display().to_string(),
            for_s,
            reason: reason.to_string(),
            confirm,
        },
        true,
    )?;
    if data["status"].as_str() == Some("pending") {
        // approve_via = "telegram": nothing is open yet.
        println!(
            "{}: approval requested on Telegram (request {}); the {for_s} s window opens when an \
             authorised approver taps Approve. `governor protect list` shows it once open.",
            abs.display(),
            data["request"].as_str().unwrap_or("?")
        );
        return Ok(());
    }
    println!(
        "write window open on {} for {for_s} s{}",
        abs.display(),
        data["until"]
            .as_str()
            .map(|u| format!(" (until {u})"))
            .unwrap_or_default()
    );
    Ok(())
}

pub fn approve_end(target: &Target, path: &Path) -> Result<()> {
    let abs = std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    let data = ask(
        target,
        &Request::ApproveEnd {
            path: abs.display().to_string(),
        },
        false,
    )?;
    println!(
        "window on {} closed; declared SHA-256 now {}",
        abs.display(),
        data["sha256"]
            .as_str()
            .or(data["declared_sha256"].as_str())
            .unwrap_or("?")
    );
    Ok(())
}
