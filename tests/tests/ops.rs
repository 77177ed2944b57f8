//! Operations (issue 13) end to end, each interface through a real client
//! nobody here wrote: the unit through `systemd-analyze verify`, the daemon
//! under exactly the unit's capabilities (`setpriv`), sd_notify through a
//! real datagram socket, `/metrics` through `promtool`, MCP through the
//! official Python SDK, `status --watch` through tmux.
//!
//! Host only: the tools (systemd-analyze, promtool, Python, tmux, node)
//! aren't in the guest's initramfs.

use std::{
    io::Write,
    os::unix::net::UnixDatagram,
    path::Path,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use governor_tests::{
    botapi::BotServer, free_port, governor, governor_bin, http_get, row, wait_until,
    workspace_root, DaemonProc, ShellLoop,
};
use serde_json::{json, Value};

/// `governor install --dry-run --prefix P`: the unit it would write.
fn dry_run_unit(prefix: &Path) -> String {
    let (code, out, err) =
        governor(&["install", "--dry-run", "--prefix", prefix.to_str().unwrap()]);
    assert_eq!(code, 0, "install --dry-run: {out}{err}");
    let start = out
        .find("# write /etc/systemd/system/governor.service (mode 0644)\n")
        .unwrap_or_else(|| panic!("no unit in the dry run:\n{out}"));
    let unit = &out[start..];
    let unit = &unit[unit.find('\n').unwrap() + 1..];
    let end = unit.find("\n# run: ").unwrap_or(unit.len());
    unit[..end].to_string()
}

fn unit_capabilities(unit: &str) -> Vec<String> {
    unit.lines()
        .find_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .expect("CapabilityBoundingSet")
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

#[test]
fn install_dry_run_unit_passes_systemd_analyze_verify() {
    governor_tests::require_root();
    let dir = tempfile::tempdir().unwrap();
    // The unit names PREFIX/sbin/governor; verify checks it is executable.
    std::fs::create_dir_all(dir.path().join("sbin")).unwrap();
    std::fs::copy(governor_bin(), dir.path().join("sbin/governor")).unwrap();
    let unit = dry_run_unit(dir.path());
    let exec = format!(
        "ExecStart={}/sbin/governor run --config /etc/governor/governor.toml",
        dir.path().display()
    );
    assert!(unit.lines().any(|l| l == exec), "{unit}");
    for want in ["Type=notify", "WatchdogSec=30s", "OOMScoreAdjust=-1000"] {
        assert!(unit.lines().any(|l| l == want), "{want} missing:\n{unit}");
    }
    let path = dir.path().join("governor.service");
    std::fs::write(&path, &unit).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian's systemd package; cargo xtask setup installs it)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "systemd-analyze verify: {err}\n{unit}"
    );
    // A warning (an unknown key, a bad value) is printed, not fatal: none.
    assert!(
        !err.contains("governor.service"),
        "systemd-analyze warns: {err}\n{unit}"
    );
    // Every capability is one the kernel knows.
    let caps = unit_capabilities(&unit);
    assert!(caps.len() >= 8, "{caps:?}");
}

/// The capability mask setpriv gives, as /proc/PID/status prints CapEff.
fn cap_number(name: &str) -> u32 {
    match name {
        "CAP_CHOWN" => 0,
        "CAP_DAC_READ_SEARCH" => 2,
        "CAP_FOWNER" => 3,
        "CAP_KILL" => 5,
        "CAP_SETGID" => 6,
        "CAP_SETUID" => 7,
        "CAP_LINUX_IMMUTABLE" => 9,
        "CAP_SYS_PTRACE" => 19,
        "CAP_SYS_ADMIN" => 21,
        "CAP_SYS_RESOURCE" => 24,
        "CAP_PERFMON" => 38,
        "CAP_BPF" => 39,
        other => panic!("unknown capability {other}"),
    }
}

/// The daemon started with only the unit's capabilities still loads its
/// programs, detects a crash loop, keeps a protected file unwritable and
/// logs the attempt, reads memory, and exports events.
#[test]
fn daemon_runs_with_only_the_units_capabilities() {
    governor_tests::require_root();
    let scratch = tempfile::tempdir().unwrap();
    let unit = dry_run_unit(scratch.path());
    let caps = unit_capabilities(&unit);
    let bounding: Vec<String> = caps
        .iter()
        .map(|c| format!("+{}", c.trim_start_matches("CAP_").to_lowercase()))
        .collect();
    let files = tempfile::tempdir_in("/tmp").unwrap();
    let guarded = files.path().join("core.py");
    std::fs::write(&guarded, "print('core')\n").unwrap();
    let mut d = DaemonProc::configured(&format!(
        "[defaults]\nmax_restarts = 2\n[protect]\nuntouchable = [\"{}\"]\n[export]\nevents = \"{}\"\n",
        guarded.display(),
        files.path().join("events.jsonl").display()
    ));
    d.wrapper = vec![
        "setpriv".into(),
        format!("--bounding-set=-all,{}", bounding.join(",")),
        "--inh-caps=-all".into(),
        "--".into(),
    ];
    d.spawn();
    // The daemon really runs with exactly those.
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    // What the unit allows, within what this host lets us have at all
    // (a sandbox's own bounding set may lack some, e.g. CAP_SYS_RESOURCE).
    let own = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|h| u64::from_str_radix(h.trim(), 16).unwrap())
        .unwrap();
    let want = caps.iter().fold(0u64, |m, c| m | 1 << cap_number(c)) & own;
    assert_eq!(eff, want, "CapEff {eff:#x} vs the unit's {want:#x}\n{unit}");

    // Velocity: a script that keeps failing is a crash loop.
    let (_loop, _) = ShellLoop::start(files.path(), "capfail.sh", "sleep 0.2\nexit 4");
    let s = d.wait_status("a crash loop", Duration::from_secs(30), |s| {
        s["services"].as_array().is_some_and(|a| {
            a.iter().any(|r| {
                r["name"]
                    .as_str()
                    .is_some_and(|n| n.starts_with("fp:capfail.sh-"))
                    && r["state"] == "crash-loop"
            })
        })
    });
    assert!(!d.entries_of("crash_loop.entered").is_empty(), "{s:#}");

    // Protect: the flag is set, the write refused and logged with who.
    let write = Command::new("sh")
        .arg("-c")
        .arg(format!("echo evil >> {}", guarded.display()))
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!write.success(), "an UNTOUCHABLE file must refuse a write");
    let attempts = d.wait_entries_of("protect.attempt", 1, Duration::from_secs(10));
    assert!(
        attempts
            .iter()
            .any(|e| e["detail"]["result"] == "denied" && e["detail"]["comm"] == "sh"),
        "{attempts:#?}"
    );
    assert_eq!(
        std::fs::read_to_string(&guarded).unwrap(),
        "print('core')\n"
    );
    // The export has the loop's exec/exit and the attempt.
    let events = files.path().join("events.jsonl");
    assert!(
        wait_until(Duration::from_secs(10), || {
            let t = std::fs::read_to_string(&events).unwrap_or_default();
            t.contains("\"type\":\"attempt\"")
                && t.contains("capfail.sh")
                && t.contains("\"type\":\"exit\"")
        }),
        "export: {}",
        std::fs::read_to_string(&events).unwrap_or_default()
    );
    for line in std::fs::read_to_string(&events).unwrap().lines() {
        let v: Value = serde_json::from_str(line).expect("each export line is JSON");
        assert!(v["type"].is_string(), "{line}");
    }
    d.stop();
    governor_tests::clear_immutable(&guarded);
}

/// READY=1 only once the control socket answers; WATCHDOG=1 from the
/// event loop at half WATCHDOG_USEC, stopping while the loop is wedged.
#[test]
fn sd_notify_ready_and_watchdog_from_the_loop() {
    governor_tests::require_root();
    let mut d = DaemonProc::configured("");
    let sock_path = d.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    d.env = vec![
        ("NOTIFY_SOCKET".into(), sock_path.display().to_string()),
        ("WATCHDOG_USEC".into(), "400000".into()),
        ("GOVERNOR_TEST_HOOKS".into(), "1".into()),
    ];
    let got: Arc<Mutex<Vec<(Instant, String)>>> = Arc::default();
    let control = d.socket.clone();
    let (g, stop) = (
        got.clone(),
        Arc::new(std::sync::atomic::AtomicBool::new(false)),
    );
    let stop2 = stop.clone();
    let reader = std::thread::spawn(move || {
        let mut answered_at_ready = None;
        let mut buf = [0u8; 4096];
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) {
            let Ok(n) = sock.recv(&mut buf) else { continue };
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            if msg.contains("READY=1") && answered_at_ready.is_none() {
                // At the moment READY arrives the socket must answer.
                answered_at_ready = Some(
                    governor::control::request(
                        &control,
                        &governor::control::Request::Status { all: false },
                        false,
                    )
                    .is_ok(),
                );
            }
            g.lock().unwrap().push((Instant::now(), msg));
        }
        answered_at_ready
    });
    d.spawn();
    let pings = |since: Instant| {
        got.lock()
            .unwrap()
            .iter()
            .filter(|(t, m)| *t >= since && m.contains("WATCHDOG=1"))
            .count()
    };
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || pings(t0) >= 5),
        "watchdog pings: {:?}",
        got.lock().unwrap()
    );
    // Wedge the loop for 5 s (test hook): the pings stop, then resume.
    let wedged = Instant::now();
    d.signal(libc::SIGUSR1);
    assert!(
        wait_until(Duration::from_secs(15), || {
            got.lock()
                .unwrap()
                .iter()
                .any(|(t, m)| *t > wedged + Duration::from_secs(4) && m.contains("WATCHDOG=1"))
        }),
        "pings resume after the wedge"
    );
    let times: Vec<Instant> = got
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, m)| *t >= wedged && m.contains("WATCHDOG=1"))
        .map(|(t, _)| *t)
        .collect();
    let mut gap = times
        .first()
        .map(|t| t.duration_since(wedged))
        .unwrap_or_default();
    for w in times.windows(2) {
        gap = gap.max(w[1].duration_since(w[0]));
    }
    assert!(
        gap >= Duration::from_millis(4000),
        "a wedged loop must stop the pings (largest gap {gap:?})"
    );
    d.stop();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let ready_answered = reader.join().unwrap();
    assert_eq!(
        ready_answered,
        Some(true),
        "READY=1 came, and the control socket answered at that moment"
    );
    let msgs = got.lock().unwrap();
    let ready = msgs
        .iter()
        .position(|(_, m)| m.contains("READY=1"))
        .unwrap();
    let first_ping = msgs
        .iter()
        .position(|(_, m)| m.contains("WATCHDOG=1"))
        .unwrap();
    assert!(ready < first_ping, "READY before the first ping: {msgs:?}");
    assert!(
        msgs.iter().any(|(_, m)| m.contains("STOPPING=1")),
        "{msgs:?}"
    );
}

/// One sample's value: `name{labels} value`, labels given as they print.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn metrics_pass_promtool_and_match_status() {
    governor_tests::require_root();
    let port = free_port();
    let files = tempfile::tempdir().unwrap();
    let d = DaemonProc::start(&format!(
        "[defaults]\nmax_restarts = 2\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n[[service]]\nname = \"flaky\"\nexe = \"{}\"\n",
        files.path().join("flaky.sh").display()
    ));
    {
        let (_l, _) = ShellLoop::start(files.path(), "flaky.sh", "sleep 0.1\nexit 3");
        d.wait_status("flaky in a crash loop", Duration::from_secs(30), |s| {
            row(s, "flaky")["state"] == "crash-loop"
        });
    }
    // The loop is gone: the numbers hold still for the comparison.
    let s = d.wait_status("flaky down", Duration::from_secs(10), |s| {
        row(s, "flaky")["pids"]
            .as_array()
            .is_some_and(|p| p.is_empty())
    });
    let (code, body) = http_get(port, "/metrics");
    assert_eq!(code, 200, "{body}");
    let flaky = row(&s, "flaky");
    let svc = |m: &str| sample(&body, &format!("{m}{{service=\"flaky\"}}"));
    assert_eq!(
        svc("governor_service_restarts_in_window"),
        flaky["restarts_in_window"].as_f64(),
        "{body}"
    );
    assert_eq!(
        svc("governor_service_restarts_total"),
        flaky["restarts_total"].as_f64(),
        "{body}"
    );
    assert!(svc("governor_service_restarts_total").unwrap_or(0.0) >= 3.0);
    assert_eq!(
        svc("governor_service_memory_ceiling_bytes"),
        flaky["ceiling_bytes"].as_f64()
    );
    assert_eq!(
        sample(
            &body,
            "governor_service_state{service=\"flaky\",state=\"crash-loop\"}"
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        sample(
            &body,
            "governor_service_state{service=\"flaky\",state=\"stable\"}"
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(&body, "governor_memory_floor_bytes"),
        s["memory"]["floor_bytes"].as_f64()
    );
    assert!(sample(&body, "governor_events_total{ring=\"lifecycle\"}").unwrap_or(0.0) > 0.0);
    assert!(sample(&body, "governor_audit_head_seq").unwrap_or(-1.0) >= 1.0);
    // promtool, the Prometheus project's own linter, accepts the scrape.
    let mut p = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package; cargo xtask setup installs it)");
    p.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = p.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(http_get(port, "/nothing").0, 404);
    // Anything but loopback is refused in the config, naming the key.
    let bad = files.path().join("bad.toml");
    std::fs::write(&bad, "[metrics]\nlisten = \"0.0.0.0:9464\"\n").unwrap();
    let (code, out, err) = governor(&["check-config", bad.to_str().unwrap()]);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("metrics.listen") && err.contains(":2:"),
        "the error names the key and line: {err}"
    );
}

/// Runs the official MCP Python SDK's client (tests/mcp/client.py) against
/// `server` (argv), making `calls`; its JSON transcript.
fn mcp_client(run_as: Option<u32>, server: &[String], calls: &Value) -> Value {
    let py = workspace_root().join("target/mcp-venv/bin/python3");
    assert!(
        py.exists(),
        "{} missing: cargo xtask setup installs the MCP Python SDK",
        py.display()
    );
    let script = workspace_root().join("tests/mcp/client.py");
    let mut c = match run_as {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
                "--".into(),
            ])
            .arg(&py);
            c
        }
        None => Command::new(&py),
    };
    let out = c
        .arg(&script)
        .arg("--server-cmd")
        .arg(serde_json::to_string(server).unwrap())
        .arg("--calls")
        .arg(calls.to_string())
        .output()
        .expect("run client.py");
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "client.py: {e}: {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn result(t: &Value, i: usize) -> &Value {
    &t["results"][i]
}

#[test]
fn mcp_through_the_python_sdk() {
    governor_tests::require_root();
    let bot = BotServer::start(vec![]);
    let (_tdir, token) = governor_tests::botapi::token_file();
    let files = tempfile::tempdir_in("/tmp").unwrap();
    // Traversable, so uid 65534 reaches the MCP socket in it.
    std::fs::set_permissions(
        files.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let core = files.path().join("core.py");
    let cfg = files.path().join("config.json");
    let mcp_sock = files.path().join("mcp.sock");
    std::fs::write(&core, "x = 1\n").unwrap();
    std::fs::write(&cfg, "{}\n").unwrap();
    let d = DaemonProc::start(&format!(
        "[alerts.telegram]\nbot_token_file = \"{}\"\nchat_id = \"-100\"\napi_url = \"{}\"\nmin_severity = \"critical\"\n\
         [protect]\nuntouchable = [\"{}\"]\nprotected = [\"{}\"]\napprove_via = \"telegram\"\ntelegram_approvers = [42]\n\
         [mcp]\nsocket = \"{}\"\ngroup = \"nogroup\"\n\
         [[service]]\nname = \"agent\"\nexe = \"{}\"\n\
         [[service]]\nname = \"nbagent\"\nexe = \"{}\"\nuser = \"nobody\"\n",
        token.display(),
        bot.url(),
        core.display(),
        cfg.display(),
        mcp_sock.display(),
        files.path().join("agent.sh").display(),
        files.path().join("nbagent.sh").display(),
    ));
    let bin = governor_bin().display().to_string();
    let server = vec![
        bin.clone(),
        "mcp".into(),
        "--socket".into(),
        d.socket.display().to_string(),
    ];
    let huge = 64u64 << 40;
    let calls = json!([
        {"tool": "protect_check", "args": {"path": core}},
        {"tool": "status", "args": {}},
        {"tool": "may_start_job", "args": {"expected_bytes": huge}},
        {"tool": "may_start_job", "args": {"expected_bytes": 1}},
        {"tool": "request_approval", "args": {"path": cfg, "reason": "rotate the key", "duration": "10m"}},
        {"tool": "request_approval", "args": {"path": core, "reason": "just once", "duration": "10m"}},
        {"tool": "memory_headroom", "args": {}},
        {"tool": "audit_tail", "args": {"n": 50}},
    ]);
    let t = mcp_client(None, &server, &calls);
    let mut tools: Vec<&str> = t["tools"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    tools.sort();
    assert_eq!(
        tools,
        [
            "audit_tail",
            "kill_switch_engage",
            "may_start_job",
            "memory_headroom",
            "protect_check",
            "request_approval",
            "status"
        ],
        "{t:#}"
    );
    assert_eq!(t["server"]["name"], "governor");
    // protect_check: UNTOUCHABLE, refused now, and why.
    let pc = &result(&t, 0)["data"];
    assert_eq!(pc["tier"], "untouchable", "{t:#}");
    assert_eq!(pc["write_refused"], true);
    assert!(pc["why"].as_str().unwrap().contains("UNTOUCHABLE"), "{pc}");
    // status: root's client, no service of its own: every configured one.
    let st = &result(&t, 1)["data"];
    assert!(
        st["services"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "agent"),
        "{st:#}"
    );
    // may_start_job: 64 TiB would cross the floor; 1 byte would not.
    let no = &result(&t, 2)["data"];
    assert_eq!(no["allowed"], false, "{no:#}");
    assert!(no["reasons"][0].as_str().unwrap().contains("floor"), "{no}");
    assert_eq!(result(&t, 3)["data"]["allowed"], true, "{t:#}");
    // request_approval: the Telegram stand-in gets the request; no window.
    assert_eq!(result(&t, 4)["is_error"], false, "{t:#}");
    assert_eq!(result(&t, 4)["data"]["status"], "pending");
    let asked = bot.wait_for(1, Duration::from_secs(20));
    assert!(
        wait_until(Duration::from_secs(20), || bot.requests().iter().any(|r| {
            r.path.ends_with("/sendMessage")
                && !r.body["reply_markup"].is_null()
                && r.text().contains(cfg.to_str().unwrap())
                && r.text().contains("rotate the key")
        })),
        "the approval request reached the stand-in: {asked:?}"
    );
    assert!(
        std::fs::OpenOptions::new().append(true).open(&cfg).is_err(),
        "asking opens no window"
    );
    assert!(d.entries_of("protect.window_open").is_empty());
    // UNTOUCHABLE: an agent can't even ask.
    assert_eq!(result(&t, 5)["is_error"], true, "{t:#}");
    assert!(result(&t, 5)["text"]
        .as_str()
        .unwrap()
        .contains("UNTOUCHABLE"));
    assert!(
        result(&t, 6)["data"]["floor_bytes"].as_u64().is_some(),
        "{t:#}"
    );
    // Every call is audited with its caller, before it is answered.
    let tail = result(&t, 7)["data"]["entries"].as_array().unwrap().clone();
    assert!(
        tail.iter()
            .any(|e| e["kind"] == "mcp.call" && e["detail"]["tool"] == "protect_check"),
        "{tail:#?}"
    );
    let audited = d.entries_of("mcp.call");
    assert_eq!(audited.len(), 8, "{audited:#?}");
    assert!(audited
        .iter()
        .all(|e| e["detail"]["caller"]["pid"].as_i64() > Some(0)));

    // Another user, through the MCP socket: its own service only, nothing
    // of root's socket.
    let server = vec![
        bin.clone(),
        "mcp".into(),
        "--socket".into(),
        mcp_sock.display().to_string(),
    ];
    let calls = json!([
        {"tool": "protect_check", "args": {"path": core}},
        {"tool": "status", "args": {}},
        {"tool": "kill_switch_engage", "args": {"scope": ["all"], "reason": "x"}},
        {"tool": "audit_tail", "args": {"n": 5}},
    ]);
    let t = mcp_client(Some(65534), &server, &calls);
    assert_eq!(result(&t, 0)["data"]["tier"], "untouchable", "{t:#}");
    assert_eq!(result(&t, 1)["is_error"], true, "{t:#}");
    assert!(result(&t, 1)["text"]
        .as_str()
        .unwrap()
        .contains("no service"));
    assert_eq!(result(&t, 2)["is_error"], true, "{t:#}");
    assert_eq!(d.entries_of("killswitch.engage").len(), 0);
    assert_eq!(result(&t, 3)["data"]["entries"], json!([]), "{t:#}");
    // The MCP socket takes MCP calls only; the control socket not nobody.
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(&bin)
        .args(["status", "--socket", mcp_sock.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("MCP tool calls only"),
        "{out:?}"
    );

    // An unprivileged agent of a configured service (uid 65534 running
    // nbagent.sh): its own service, and a kill switch for itself only.
    let outs = files.path().join("out");
    std::fs::create_dir(&outs).unwrap();
    std::fs::set_permissions(&outs, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let py = workspace_root().join("target/mcp-venv/bin/python3");
    let script = workspace_root().join("tests/mcp/client.py");
    let srv = serde_json::to_string(&server).unwrap();
    let first = json!([
        {"tool": "status", "args": {}},
        {"tool": "status", "args": {"service": "agent"}},
        {"tool": "kill_switch_engage", "args": {"scope": ["all"], "reason": "everything"}},
        {"tool": "audit_tail", "args": {"n": 10}},
    ]);
    let second =
        json!([{"tool": "kill_switch_engage", "args": {"scope": ["nbagent"], "reason": "I loop"}}]);
    let agent = files.path().join("nbagent.sh");
    std::fs::write(
        &agent,
        format!(
            "#!/bin/sh\n'{py}' '{script}' --server-cmd '{srv}' --calls '{first}' > '{o1}'\n\
             '{py}' '{script}' --server-cmd '{srv}' --calls '{second}' > '{o2}'\nsleep 600\n",
            py = py.display(),
            script = script.display(),
            o1 = outs.join("1.json").display(),
            o2 = outs.join("2.json").display(),
        ),
    )
    .unwrap();
    std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    /// Kills the agent's process group however the test ends.
    struct Group(std::process::Child);
    impl Drop for Group {
        fn drop(&mut self) {
            // SAFETY: kill(2) on the process group we created.
            unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
            let _ = self.0.wait();
        }
    }
    let _child = Group({
        use std::os::unix::process::CommandExt;
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&agent)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap()
    });
    let o1 = outs.join("1.json");
    assert!(
        wait_until(Duration::from_secs(60), || std::fs::metadata(&o1)
            .is_ok_and(|m| m.len() > 0)),
        "the agent's first client wrote nothing:\n{}",
        d.log()
    );
    let t: Value = serde_json::from_str(&std::fs::read_to_string(&o1).unwrap()).unwrap();
    let st = &result(&t, 0)["data"];
    assert_eq!(st["caller_service"], "nbagent", "{t:#}");
    let names: Vec<&str> = st["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["nbagent"], "{t:#}");
    assert_eq!(
        result(&t, 1)["is_error"],
        true,
        "another service's status: {t:#}"
    );
    assert!(
        result(&t, 2)["text"]
            .as_str()
            .unwrap()
            .contains("own service only"),
        "{t:#}"
    );
    let tail = result(&t, 3)["data"]["entries"].as_array().unwrap().clone();
    assert!(!tail.is_empty(), "{t:#}");
    assert!(tail.iter().all(|e| e["service"] == "nbagent"), "{tail:#?}");
    // Its own brake: engaged for nbagent alone, by an agent, and it holds.
    // (nbagent has no supervisor to stop it through: held, its next
    // start killed at exec, like any unsupervised service in a scope.)
    let engaged = d.wait_entries_of("killswitch.engage", 1, Duration::from_secs(30));
    let e = &engaged[0]["detail"];
    assert!(e.to_string().contains("nbagent"), "{e}");
    assert!(!e.to_string().contains("\"all\""), "{e}");
    let s = d.status();
    assert_eq!(row(&s, "nbagent")["killswitch_held"], true, "{s:#}");
    assert_eq!(row(&s, "agent")["killswitch_held"], false, "{s:#}");
}

/// A pm2 app that asks through the MCP socket sees its own service.
#[test]
fn a_pm2_app_sees_its_own_service() {
    let Some(pm2) = governor_tests::host_pm2() else {
        return;
    };
    let files = tempfile::tempdir_in("/tmp").unwrap();
    let mcp_sock = files.path().join("mcp.sock");
    let out = files.path().join("out.json");
    let d = DaemonProc::start(&format!(
        "[mcp]\nsocket = \"{}\"\n[[service]]\nname = \"asker\"\npm2 = \"asker\"\n[[service]]\nname = \"other\"\npm2 = \"other\"\n",
        mcp_sock.display()
    ));
    let py = workspace_root().join("target/mcp-venv/bin/python3");
    let script = workspace_root().join("tests/mcp/client.py");
    let server = json!([governor_bin(), "mcp", "--socket", mcp_sock]).to_string();
    let calls =
        json!([{"tool": "status", "args": {}}, {"tool": "status", "args": {"service": "other"}}])
            .to_string();
    // The app is a shell that runs the SDK client (which spawns
    // `governor mcp`) and keeps running: all of it is the app's.
    let cmd = format!(
        "'{}' '{}' --server-cmd '{}' --calls '{}' > '{}'; exec sleep 600",
        py.display(),
        script.display(),
        server,
        calls,
        out.display()
    );
    pm2.run(&[
        "start",
        "/bin/sh",
        "--name",
        "asker",
        "--no-autorestart",
        "--",
        "-c",
        &cmd,
    ]);
    assert!(
        wait_until(Duration::from_secs(60), || std::fs::metadata(&out)
            .is_ok_and(|m| m.len() > 0)),
        "the app's MCP client wrote nothing:\n{}",
        d.log()
    );
    let t: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let mine = &result(&t, 0)["data"];
    assert_eq!(mine["caller_service"], "asker", "{t:#}");
    let names: Vec<&str> = mine["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["asker"], "{t:#}");
    // Another service's status: not through the MCP socket.
    assert_eq!(result(&t, 1)["is_error"], true, "{t:#}");
    let calls = d.entries_of("mcp.call");
    assert_eq!(calls.len(), 2, "{calls:#?}");
    assert!(calls.iter().all(|e| e["service"] == "asker"), "{calls:#?}");
}

/// `status --watch` in a real terminal (tmux): the table, redrawn.
#[test]
fn status_watch_redraws_in_tmux() {
    governor_tests::require_root();
    let d = DaemonProc::start(
        "[[service]]\nname = \"watched-svc\"\nexe = \"/usr/sbin/no-such-daemon\"\ncritical = true\n",
    );
    let session = format!("gov-watch-{}", std::process::id());
    let st = Command::new("tmux")
        .args(["new-session", "-d", "-s", &session, "-x", "220", "-y", "40"])
        .arg(format!(
            "{} status --watch 1s --socket {}",
            governor_bin().display(),
            d.socket.display()
        ))
        .status()
        .expect("tmux (cargo xtask setup installs it)");
    assert!(st.success());
    struct Kill(String);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = Command::new("tmux")
                .args(["kill-session", "-t", &self.0])
                .status();
        }
    }
    let _kill = Kill(session.clone());
    let capture = || {
        let o = Command::new("tmux")
            .args(["capture-pane", "-p", "-t", &session])
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let footer = |s: &str| {
        s.lines()
            .find(|l| l.contains("Ctrl-C stops"))
            .map(str::to_string)
    };
    let mut first = String::new();
    assert!(
        wait_until(Duration::from_secs(15), || {
            first = capture();
            first.contains("SERVICE") && first.contains("watched-svc *") && footer(&first).is_some()
        }),
        "the table on screen:\n{first}"
    );
    assert!(first.contains("memory available"), "{first}");
    let mut later = String::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            later = capture();
            footer(&later).is_some() && footer(&later) != footer(&first)
        }),
        "redrawn in place:\n{first}\n---\n{later}"
    );
    // In place: one header on the screen, not a scroll of frames.
    assert_eq!(later.matches("SERVICE").count(), 1, "{later}");
    println!("status --watch screen:\n{later}");
}
