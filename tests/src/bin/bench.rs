//! governor's benchmarks: `cargo xtask bench [NAME...]` (root).
//!
//! Every figure is reported against a baseline measured in the same run —
//! the machines are shared and noisy — and checked against the issue's
//! target. Names: lifecycle, daemon, audit, velocity, memory, killswitch,
//! drift, protect, ops.
//! `--protect-rounds=N` / `--protect-iters=N` shorten the protect benchmark
//! (12 rounds of 100,000 by default), e.g. in an emulated guest.

use std::{
    io::Write,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use governor::{events::Event, probes::ProbeOptions};
use governor_tests::{Collector, DaemonProc};

struct Report {
    rows: Vec<(String, String, String, bool)>,
}

impl Report {
    fn add(&mut self, name: &str, figure: String, target: &str, ok: bool) {
        println!(
            "  {name}: {figure}  [target {target}: {}]",
            if ok { "met" } else { "MISSED" }
        );
        self.rows.push((name.into(), figure, target.into(), ok));
    }
}

/// Spawns and reaps `n` /bin/true from two threads; returns processes/s.
fn storm(n: usize) -> f64 {
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| {
                for _ in 0..n / 2 {
                    Command::new("/bin/true").status().expect("spawn /bin/true");
                }
            });
        }
    });
    n as f64 / t0.elapsed().as_secs_f64()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn lifecycle(r: &mut Report) {
    println!(
        "lifecycle: fork+exec+exit throughput, programs attached over not, interleaved rounds"
    );
    const N: usize = 2000;
    // Kernel-side run time of each program, counted while this fd lives.
    let stats_fd = aya::sys::enable_stats(aya::sys::Stats::RunTime).ok();
    storm(200); // warm up
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let (mut lost, mut seen, mut expected) = (0u64, 0usize, 0usize);
    let (mut prog_ns, mut prog_runs) = (0u64, 0u64);
    for round in 0..5 {
        without.push(storm(N));
        let c = Collector::start_with(ProbeOptions::default(), true);
        let rate = storm(N);
        std::thread::sleep(Duration::from_millis(300));
        let (events, dropped, stats) = c.stop_with_stats();
        with.push(rate);
        lost += dropped;
        expected += N;
        seen += events
            .iter()
            .filter(|e| matches!(e, Event::Exec(x) if x.filename == "/bin/true"))
            .count();
        for (name, runs, ns) in &stats {
            prog_runs += runs;
            prog_ns += ns;
            if round == 0 && *runs > 0 {
                println!(
                    "    {name}: {runs} runs, {:.0} ns each",
                    *ns as f64 / *runs as f64
                );
            }
        }
        println!(
            "    round {round}: without {:.0}/s, with {:.0}/s",
            without[round], rate
        );
    }
    let (mw, mo) = (median(with.clone()), median(without.clone()));
    let ratio = mw / mo;
    r.add(
        "throughput with/without (wall clock)",
        format!("{ratio:.3} ({mw:.0}/s vs {mo:.0}/s, medians of 5)"),
        "≥ 0.98",
        ratio >= 0.98,
    );
    if stats_fd.is_some() && prog_runs > 0 {
        // The programs' own CPU per process lifecycle (fork + exec + exit
        // + every thread exit), against the time one lifecycle takes.
        let per_proc_ns = prog_ns as f64 / expected as f64;
        let lifecycle_ns = 1e9 / mo * 2.0; // two spawning threads
        let cost_ratio = 1.0 - per_proc_ns / lifecycle_ns;
        r.add(
            "throughput from programs' kernel run time",
            format!(
                "{cost_ratio:.4} ({per_proc_ns:.0} ns of BPF per process over {:.0} ns per fork+exec+exit; {prog_runs} runs, {:.0} ns each)",
                lifecycle_ns,
                prog_ns as f64 / prog_runs as f64
            ),
            "≥ 0.98",
            cost_ratio >= 0.98,
        );
    }
    r.add(
        "events lost at max rate",
        format!("{lost} lost; {seen} of {expected} execs seen"),
        "0",
        lost == 0 && seen >= expected,
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
}

/// Nanoseconds on CPU of each live thread of `pid` (name, ns), from
/// `/proc/PID/task/*/schedstat`: exact, where `stat`'s ticks are 10 ms.
fn thread_cpu_ns(pid: u32) -> Vec<(String, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let p = e.ok()?.path();
        let ns = std::fs::read_to_string(p.join("schedstat"))
            .ok()?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        let comm = std::fs::read_to_string(p.join("comm")).ok()?;
        Some((
            format!("{}:{}", comm.trim(), p.file_name()?.to_string_lossy()),
            ns,
        ))
    })
    .collect()
}

fn sleepers(n: usize) -> Vec<Child> {
    (0..n)
        .map(|_| {
            Command::new("/bin/sleep")
                .arg("600")
                .spawn()
                .expect("spawn sleep")
        })
        .collect()
}

/// Median start-up (spawn → control socket answering) of `bin` over `n`
/// starts on one config and state, stopped cleanly between.
fn startup_ms(bin: &std::path::Path, n: usize) -> f64 {
    let mut d = DaemonProc::configured("");
    let mut t: Vec<f64> = (0..n)
        .map(|_| {
            let ms = d.time_start(bin).as_secs_f64() * 1e3;
            d.stop();
            ms
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

/// A baseline build to compare start-up with: `GOVERNOR_BASELINE_BIN`, or
/// `/bin/governor-baseline` in a guest (`cargo xtask bench --baseline`).
fn baseline_bin() -> Option<std::path::PathBuf> {
    std::env::var_os("GOVERNOR_BASELINE_BIN")
        .map(std::path::PathBuf::from)
        .or_else(|| Some(std::path::PathBuf::from("/bin/governor-baseline")))
        .filter(|p| p.exists())
}

fn daemon(r: &mut Report) {
    println!("daemon: start-up time, RSS with 30 live processes, CPU while they are quiet");
    let n = if governor_tests::in_vm() { 3 } else { 7 };
    let ours = startup_ms(&governor_tests::governor_bin(), n);
    match baseline_bin() {
        Some(b) => {
            let base = startup_ms(&b, n);
            r.add(
                "daemon start-up (spawn to socket)",
                format!(
                    "{ours:.0} ms = {:.2}× the baseline build's {base:.0} ms ({}), median of {n}",
                    ours / base,
                    b.display()
                ),
                "≤ 1.0× the baseline",
                ours <= base,
            );
        }
        None => r.add(
            "daemon start-up (spawn to socket)",
            format!("{ours:.0} ms, median of {n} (no baseline build given)"),
            "a ratio needs a baseline build: cargo xtask bench --baseline PATH",
            true,
        ),
    }
    let d = DaemonProc::start("");
    std::thread::sleep(Duration::from_secs(1));
    let base = rss_kib(d.pid());
    let mut kids = sleepers(30);
    std::thread::sleep(Duration::from_secs(2));
    let rss = rss_kib(d.pid());
    r.add(
        "daemon RSS, 30 live processes",
        format!(
            "{:.2} MiB ({:.2}× the {:.2} MiB before they started)",
            rss as f64 / 1024.0,
            rss as f64 / base.max(1) as f64,
            base as f64 / 1024.0
        ),
        "≤ 8 MiB",
        rss <= 8 * 1024,
    );
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let t0 = cpu_ticks(d.pid());
    let w0 = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    let used = (cpu_ticks(d.pid()) - t0) as f64 / hz;
    let pct = 100.0 * used / w0.elapsed().as_secs_f64();
    r.add(
        "daemon CPU while quiet",
        format!("{pct:.3}% of a core over 20 s ({used:.2} s CPU)"),
        "≤ 0.1%",
        pct <= 0.1,
    );
    for k in kids.iter_mut() {
        k.kill().ok();
        k.wait().ok();
    }
}

fn audit(r: &mut Report) {
    println!("audit: fsynced appends per second on this disk, and memory with a 10,000-entry log");
    let dir = tempfile::tempdir_in("/var/tmp").expect("tempdir");
    // Baseline: the disk's own write+fdatasync rate for lines of that size.
    let raw_path = dir.path().join("raw");
    let mut raw = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&raw_path)
        .unwrap();
    let line = vec![b'x'; 300];
    let n = 300;
    let t0 = Instant::now();
    for _ in 0..n {
        raw.write_all(&line).unwrap();
        raw.sync_data().unwrap();
    }
    let raw_rate = n as f64 / t0.elapsed().as_secs_f64();
    let state = dir.path().join("state");
    let (mut log, _) = governor_audit::AuditLog::open(
        &state,
        governor_audit::Options {
            rotate_bytes: None,
            append_only: false,
        },
    )
    .unwrap();
    let t0 = Instant::now();
    for i in 0..n {
        let mut d = serde_json::Map::new();
        d.insert("i".into(), i.into());
        d.insert("pad".into(), "y".repeat(150).into());
        log.append("bench.append", Some("svc"), d).unwrap();
    }
    let rate = n as f64 / t0.elapsed().as_secs_f64();
    r.add(
        "audit appends/s with fsync",
        format!(
            "{rate:.0}/s = {:.2}× raw write+fdatasync ({raw_rate:.0}/s)",
            rate / raw_rate
        ),
        "report",
        true,
    );
    drop(log);

    // A 10,000-entry log: daemon RSS and verify's peak RSS against a tiny log.
    let big = tempfile::tempdir().unwrap();
    let small = tempfile::tempdir().unwrap();
    let huge = tempfile::tempdir().unwrap();
    for (dirp, n) in [
        (small.path().join("state"), 1_000),
        (big.path().join("state"), 10_000),
        (huge.path().join("state"), 100_000),
    ] {
        std::fs::create_dir_all(&dirp).unwrap();
        let mut head = governor_audit::Head::genesis();
        let mut text = String::new();
        for i in 0..n {
            let mut d = serde_json::Map::new();
            d.insert("i".into(), serde_json::Value::from(i));
            let e = governor_audit::Entry::chained(
                &head,
                "2026-11-28T00:00:00.000Z".into(),
                "bench.fill",
                Some("svc"),
                d,
            )
            .unwrap();
            head = e.head();
            text.push_str(&e.to_line());
        }
        std::fs::write(dirp.join("audit.jsonl"), text).unwrap();
    }
    let peak = |log: &std::path::Path| -> u64 {
        let out = Command::new("/usr/bin/time")
            .arg("-f")
            .arg("%M")
            .arg(governor_tests::governor_bin())
            .args(["audit", "verify", "--log"])
            .arg(log)
            .stdout(Stdio::null())
            .output();
        match out {
            Ok(o) => String::from_utf8_lossy(&o.stderr)
                .trim()
                .lines()
                .last()
                .and_then(|l| l.parse().ok())
                .unwrap_or(0),
            Err(_) => 0,
        }
    };
    let (ps, pb, ph) = (
        peak(&small.path().join("state/audit.jsonl")),
        peak(&big.path().join("state/audit.jsonl")),
        peak(&huge.path().join("state/audit.jsonl")),
    );
    if pb > 0 {
        r.add(
            "verify peak RSS, 1k / 10k / 100k entries",
            format!(
                "{:.2} / {:.2} / {:.2} MiB: 100k over 10k = {:.2}× (memory doesn't grow with the log)",
                ps as f64 / 1024.0,
                pb as f64 / 1024.0,
                ph as f64 / 1024.0,
                ph as f64 / pb.max(1) as f64
            ),
            "streams: 100k/10k ≤ 1.1×",
            ph as f64 <= pb as f64 * 1.1,
        );
    } else {
        println!("  (install GNU time, /usr/bin/time, for the verify peak-RSS figure)");
    }
    let rss_on = |state_parent: &std::path::Path| -> u64 {
        let cfg = state_parent.join("g.toml");
        std::fs::write(
            &cfg,
            format!(
                "[daemon]\nstate_dir = \"{}\"\nsocket = \"{}\"\n",
                state_parent.join("state").display(),
                state_parent.join("s.sock").display()
            ),
        )
        .unwrap();
        let mut child = Command::new(governor_tests::governor_bin())
            .args(["run", "--config"])
            .arg(&cfg)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs(3));
        let rss = rss_kib(child.id());
        // SAFETY: kill(2) on our child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().ok();
        for f in governor_tests::governor_audit_files(&state_parent.join("state/audit.jsonl")) {
            governor_tests::clear_append_only(&f);
        }
        rss
    };
    let (rb, rs) = (rss_on(big.path()), rss_on(small.path()));
    r.add(
        "daemon RSS with 10,000-entry log",
        format!(
            "{:.2} MiB vs {:.2} MiB with 1,000 entries: {:+} KiB",
            rb as f64 / 1024.0,
            rs as f64 / 1024.0,
            rb as i64 - rs as i64
        ),
        "report",
        true,
    );
}

fn velocity(r: &mut Report) {
    println!(
        "velocity: detection latency, kernel exit → crash-loop audit entry durable, 250 episodes"
    );
    let d = DaemonProc::start("[defaults]\nmax_restarts = 0\n");
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..250 {
        // A distinct command line per episode: each is its own service.
        Command::new("/bin/sh")
            .arg("-c")
            .arg(format!("exit 1 # episode {i}"))
            .status()
            .unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let s = d.wait_status("250 episodes", Duration::from_secs(60), |s| {
        s["detection_latency"]["count"].as_u64().unwrap_or(0) >= 250
    });
    let l = &s["detection_latency"];
    let (p50, p99) = (
        l["p50_us"].as_u64().unwrap_or(0),
        l["p99_us"].as_u64().unwrap_or(0),
    );
    let entered = d.entries_of("crash_loop.entered").len();
    r.add(
        "detection latency",
        format!(
            "median {:.2} ms, p99 {:.2} ms, max {:.2} ms over {} episodes ({entered} audited); p99 = {:.3}× the 50 ms budget",
            p50 as f64 / 1000.0,
            p99 as f64 / 1000.0,
            l["max_us"].as_u64().unwrap_or(0) as f64 / 1000.0,
            l["count"],
            p99 as f64 / 50_000.0
        ),
        "p99 ≤ 50 ms",
        p99 <= 50_000 && entered >= 250,
    );
}

/// A node app for pm2 that leaks `rate` MiB/s from its start and logs
/// `<unix ms> <pid> <rss>` every 5 ms to `log`.
fn leaker_js(
    dir: &std::path::Path,
    name: &str,
    rate: u64,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let log = dir.join(format!("{name}.rss"));
    let js = dir.join(format!("{name}.js"));
    std::fs::write(
        &js,
        format!(
            "const fs = require('fs'); const held = [];\n\
             setInterval(() => held.push(Buffer.alloc(({rate} / 20) << 20, 1)), 50);\n\
             setInterval(() => fs.appendFileSync({log:?}, Date.now() + ' ' + process.pid + ' ' + process.memoryUsage.rss() + '\\n'), 5);\n",
            log = log.display().to_string()
        ),
    )
    .expect("write the leaker");
    (js, log)
}

/// Per run (pid) of a leaker: its first own reading over `ceiling` and its
/// last reading (≈ its death), unix ms.
fn crossings(log: &std::path::Path, ceiling: u64) -> Vec<(u32, u64, u64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut runs: Vec<(u32, Option<u64>, u64)> = Vec::new();
    for l in text.lines() {
        let mut f = l.split(' ');
        let (Some(t), Some(pid), Some(rss)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let (Ok(t), Ok(pid), Ok(rss)) = (t.parse::<u64>(), pid.parse::<u32>(), rss.parse::<u64>())
        else {
            continue;
        };
        match runs.iter_mut().find(|r| r.0 == pid) {
            Some(r) => {
                r.2 = t;
                if r.1.is_none() && rss > ceiling {
                    r.1 = Some(t);
                }
            }
            None => runs.push((pid, (rss > ceiling).then_some(t), t)),
        }
    }
    runs.into_iter()
        .filter_map(|(p, c, last)| c.map(|c| (p, c, last)))
        .collect()
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn memory(r: &mut Report) {
    println!(
        "memory: ceiling crossing → restart (governor and pm2's max_memory_restart), CPU, RSS"
    );
    let pm2 = governor_tests::Pm2::isolated();
    let dir = pm2.home.path().to_path_buf();
    const CEIL: u64 = 150 << 20;
    // 30 idle services and 89 protected files, as the user runs.
    let files = dir.join("protected");
    std::fs::create_dir_all(&files).expect("mkdir");
    let list: Vec<String> = (0..89)
        .map(|i| {
            let p = files.join(format!("f{i}.conf"));
            std::fs::write(&p, format!("{i}\n")).expect("write");
            format!("\"{}\"", p.display())
        })
        .collect();
    let idle = dir.join("idle.js");
    std::fs::write(&idle, "setInterval(() => {}, 1000);\n").expect("write");
    let mut cfg = format!(
        "[defaults]\nmemory_max_restarts = 1000\n[protect]\nprotected = [{}]\n\
         [[service]]\nname = \"leaker\"\npm2 = \"bench-leaker\"\nmemory_ceiling = \"150MiB\"\n",
        list.join(", ")
    );
    for i in 0..29 {
        cfg.push_str(&format!(
            "[[service]]\nname = \"idle{i}\"\npm2 = \"bench-idle{i}\"\n"
        ));
    }
    for i in 0..29 {
        pm2.run(&[
            "start",
            idle.to_str().unwrap(),
            "--name",
            &format!("bench-idle{i}"),
        ]);
    }
    let d = DaemonProc::start(&cfg);
    std::thread::sleep(Duration::from_secs(2));
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // Idle: exact per-thread CPU time (no thread starts or ends while
    // nothing happens), and which threads spent it.
    let before = thread_cpu_ns(d.pid());
    let w0 = Instant::now();
    std::thread::sleep(Duration::from_secs(30));
    let after = thread_cpu_ns(d.pid());
    let secs = w0.elapsed().as_secs_f64();
    let mut per: Vec<(String, u64)> = after
        .iter()
        .map(|(n, a)| {
            let b = before.iter().find(|(m, _)| m == n).map_or(0, |x| x.1);
            (n.clone(), a.saturating_sub(b))
        })
        .filter(|(_, ns)| *ns > 0)
        .collect();
    per.sort_by_key(|x| std::cmp::Reverse(x.1));
    let total: u64 = per.iter().map(|x| x.1).sum();
    let idle_pct = 100.0 * total as f64 / 1e9 / secs;
    println!(
        "  memory: idle CPU by thread over {secs:.0} s: {}",
        per.iter()
            .map(|(n, ns)| format!("{n} {:.2} ms", *ns as f64 / 1e6))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let rss = rss_kib(d.pid());
    r.add(
        "memory: daemon CPU, 30 services nobody near a limit",
        format!("{idle_pct:.3}% of a core over 30 s"),
        "≤ 0.1%",
        idle_pct <= 0.1,
    );
    r.add(
        "memory: daemon RSS, 30 services and 89 protected files",
        format!("{:.2} MiB", rss as f64 / 1024.0),
        "≤ 8 MiB",
        rss <= 8 * 1024,
    );

    // governor: a 50 MiB/s leak, ≥ 20 crossings.
    let (js, log) = leaker_js(&dir, "leaker", 50);
    let t0 = cpu_ticks(d.pid());
    let w0 = Instant::now();
    pm2.run(&["start", js.to_str().unwrap(), "--name", "bench-leaker"]);
    let enough = governor_tests::wait_until(Duration::from_secs(240), || {
        d.entries_of("memory.restart").len() >= 21
    });
    let leak_pct = 100.0 * (cpu_ticks(d.pid()) - t0) as f64 / hz / w0.elapsed().as_secs_f64();
    pm2.run(&["delete", "bench-leaker"]);
    let entries = d.entries_of("memory.restart");
    let decided: Vec<u64> = entries
        .iter()
        .filter_map(|e| {
            let ts: jiff::Timestamp = e["ts"].as_str()?.parse().ok()?;
            Some(ts.as_millisecond() as u64)
        })
        .collect();
    let runs = crossings(&log, CEIL);
    // Each run's crossing → the first restart entry after it, and → its
    // last own reading (its death).
    let mut to_restart = Vec::new();
    let mut to_dead = Vec::new();
    for (_, crossed, last) in &runs {
        if let Some(t) = decided.iter().find(|&&t| t + 50 >= *crossed) {
            if *t < crossed + 10_000 {
                to_restart.push(t.saturating_sub(*crossed) as f64);
                to_dead.push(last.saturating_sub(*crossed) as f64);
            }
        }
    }
    let n = to_restart.len();
    let (g50, g99) = (
        pct(&mut to_restart.clone(), 0.5),
        pct(&mut to_restart, 0.99),
    );
    let (d50, d99) = (pct(&mut to_dead.clone(), 0.5), pct(&mut to_dead, 0.99));
    r.add(
        "memory: crossing → governor's restart entry",
        format!("p50 {g50:.0} ms, p99 {g99:.0} ms over {n} crossings (→ old instance's last reading: p50 {d50:.0} ms, p99 {d99:.0} ms)"),
        "p99 ≤ 250 ms over ≥ 20",
        enough && n >= 20 && g99 <= 250.0,
    );
    r.add(
        "memory: daemon CPU while one service leaks 50 MiB/s",
        format!(
            "{leak_pct:.3}% of a core over {:.0} s",
            w0.elapsed().as_secs_f64()
        ),
        "reported",
        true,
    );

    // pm2's own max_memory_restart on the same app (no governor ceiling).
    let (js, log) = leaker_js(&dir, "pm2leaker", 50);
    pm2.run(&[
        "start",
        js.to_str().unwrap(),
        "--name",
        "bench-pm2leaker",
        "--max-memory-restart",
        "150M",
    ]);
    governor_tests::wait_until(Duration::from_secs(200), || {
        crossings(&log, CEIL).len() >= 4
    });
    pm2.run(&["delete", "bench-pm2leaker"]);
    let mut pm2_dead: Vec<f64> = crossings(&log, CEIL)
        .iter()
        .rev()
        .skip(1)
        .map(|(_, c, last)| last.saturating_sub(*c) as f64)
        .collect();
    let m = pm2_dead.len();
    let p50 = pct(&mut pm2_dead, 0.5);
    r.add(
        "memory: crossing → old instance gone, governor vs pm2 max_memory_restart",
        format!(
            "governor p50 {d50:.0} ms, pm2 p50 {p50:.0} ms over {m} crossings: {:.3}× pm2's",
            d50 / p50
        ),
        "< 1.0× pm2's",
        m >= 2 && d50 < p50,
    );
    drop(d);
}

fn gone(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.contains(") Z "))
        .unwrap_or(true)
}

/// Waits until every pid is gone (or a zombie); ms since `t0`.
fn all_gone(pids: &[u64], t0: Instant) -> f64 {
    let limit = t0 + Duration::from_secs(30);
    while !pids.iter().all(|p| gone(*p)) && Instant::now() < limit {
        std::thread::sleep(Duration::from_millis(1));
    }
    t0.elapsed().as_secs_f64() * 1e3
}

fn app_pids(pm2: &governor_tests::Pm2, prefix: &str) -> Vec<u64> {
    pm2.jlist()
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["name"].as_str().is_some_and(|n| n.starts_with(prefix)))
        .filter(|a| a["pm2_env"]["status"] == "online")
        .filter_map(|a| a["pid"].as_u64())
        .filter(|p| *p > 0)
        .collect()
}

/// The kill switch: engage → all of a 20-app scope dead, against
/// `pm2 stop` of the same apps (which leaves children, and keeps nothing
/// down); exec → kill of a held start (kernel timestamps).
fn killswitch(r: &mut Report) {
    println!("killswitch: 20 pm2 apps; engage → all dead vs pm2 stop; held start exec → kill");
    let Some(pm2) = governor_tests::host_pm2() else {
        r.add(
            "kill switch",
            "pm2 not available here".into(),
            "runs",
            false,
        );
        return;
    };
    let dir = pm2.home.path().to_path_buf();
    let idle = dir.join("idle.js");
    std::fs::write(&idle, "setInterval(() => {}, 1000);\n").expect("write");
    let names: Vec<String> = (0..20).map(|i| format!("ksb-{i}")).collect();
    let apps: Vec<String> = names
        .iter()
        .map(|n| format!("{{\"name\": \"{n}\", \"script\": \"{}\"}}", idle.display()))
        .collect();
    let eco = dir.join("apps.json");
    std::fs::write(&eco, format!("{{\"apps\": [{}]}}", apps.join(", "))).expect("write");
    let eco_s = eco.to_str().unwrap_or_default().to_string();
    let cfg: String = names
        .iter()
        .map(|n| format!("[[service]]\nname = \"{n}\"\npm2 = \"{n}\"\n"))
        .collect();
    pm2.run(&["start", &eco_s]);
    let d = DaemonProc::start(&cfg);
    let sock = d.socket.to_str().unwrap_or_default().to_string();
    let online = |what: &str| {
        let ok = governor_tests::wait_until(Duration::from_secs(60), || {
            app_pids(&pm2, "ksb-").len() == 20
        });
        assert!(ok, "{what}: 20 apps online");
        // And the daemon sees them.
        d.wait_status(what, Duration::from_secs(30), |s| {
            s["services"].as_array().is_some_and(|a| {
                a.iter()
                    .filter(|x| x["pids"].as_array().is_some_and(|p| !p.is_empty()))
                    .count()
                    >= 20
            })
        });
    };
    online("start");
    let (mut engage_ms, mut pm2_ms) = (Vec::new(), Vec::new());
    let mut scope = vec!["kill-switch".to_string(), "engage".into(), "--scope".into()];
    scope.extend(names.iter().cloned());
    scope.extend([
        "--reason".into(),
        "bench".into(),
        "--socket".into(),
        sock.clone(),
    ]);
    let scope: Vec<&str> = scope.iter().map(String::as_str).collect();
    for round in 0..3 {
        // Baseline: pm2 stop of the same 20.
        let pids = app_pids(&pm2, "ksb-");
        let t0 = Instant::now();
        pm2.run(&["stop", &eco_s]);
        pm2_ms.push(all_gone(&pids, t0));
        pm2.run(&["start", &eco_s]);
        online("after pm2 stop");
        // The switch.
        let pids = app_pids(&pm2, "ksb-");
        let t0 = Instant::now();
        let (code, out, err) = governor_tests::governor(&scope);
        assert_eq!(code, 0, "engage: {out}{err}");
        engage_ms.push(all_gone(&pids, t0));
        if round == 2 {
            // Held starts: someone starts 5 of them again.
            for n in names.iter().take(5) {
                pm2.run(&["start", n]);
            }
            governor_tests::wait_until(Duration::from_secs(20), || {
                d.entries_of("killswitch.blocked_start").len() >= 5
            });
        }
        let (code, out) = governor_tests::governor_in_login(
            &[
                "kill-switch",
                "release",
                "--reason",
                "bench",
                "--socket",
                &sock,
            ],
            "",
        );
        assert_eq!(code, 0, "release: {out}");
        online("after release");
    }
    let (_, out, _) =
        governor_tests::governor(&["kill-switch", "status", "--json", "--socket", &sock]);
    let st: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let mut held: Vec<f64> = st["held_starts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["exec_to_exit_us"].as_u64())
        .map(|us| us as f64 / 1000.0)
        .collect();
    pm2.run(&["delete", &eco_s]);
    drop(d);
    let (e50, e99) = (pct(&mut engage_ms, 0.5), pct(&mut engage_ms, 0.99));
    let p50 = pct(&mut pm2_ms, 0.5);
    r.add(
        "kill switch: engage → 20 apps dead",
        format!(
            "p50 {e50:.0} ms, p99 {e99:.0} ms over {} rounds; pm2 stop of the same 20: p50 {p50:.0} ms = {:.2}×",
            engage_ms.len(),
            e50 / p50
        ),
        "≤ grace (5 s) + 1 s",
        e99 <= 6000.0,
    );
    let n = held.len();
    let (h50, h99) = (pct(&mut held, 0.5), pct(&mut held, 0.99));
    r.add(
        "kill switch: held start exec → kill",
        format!("p50 {h50:.1} ms, p99 {h99:.1} ms over {n} held starts (kernel timestamps)"),
        "p99 ≤ 50 ms",
        n >= 5 && h99 <= 50.0,
    );
}

/// ns per op of `ops` rounds of an unrelated file workload (open for
/// write + truncate, write, close; rename back and forth).
fn file_ops(dir: &std::path::Path, iters: usize) -> f64 {
    use std::io::Write as _;
    let (a, b) = (dir.join("unrelated-a"), dir.join("unrelated-b"));
    let t0 = Instant::now();
    for i in 0..iters {
        let mut f = std::fs::File::create(&a).expect("create");
        let _ = f.write_all(b"0123456789abcdef");
        drop(f);
        if i % 2 == 0 {
            let _ = std::fs::rename(&a, &b);
        }
    }
    t0.elapsed().as_nanos() as f64 / iters as f64
}

/// The watched tier's cost on unrelated file operations: the daemon with
/// 89 watched files against the daemon with none (same layers), rounds
/// alternating, fastest round each.
fn drift(r: &mut Report) {
    println!("drift: unrelated file operations, 89 watched files vs none (same run)");
    let dir = tempfile::tempdir().expect("tempdir");
    let list: Vec<String> = (0..89)
        .map(|i| {
            let p = dir.path().join(format!("w{i}.json"));
            std::fs::write(&p, format!("{i}\n")).expect("write");
            format!("\"{}\"", p.display())
        })
        .collect();
    let work = tempfile::tempdir().expect("tempdir");
    let with_cfg = format!("[drift]\nwatch = [{}]\n", list.join(", "));
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let d = DaemonProc::start(&with_cfg);
        file_ops(work.path(), 5_000);
        with.push(file_ops(work.path(), 50_000));
        drop(d);
        let d = DaemonProc::start("");
        file_ops(work.path(), 5_000);
        without.push(file_ops(work.path(), 50_000));
        drop(d);
    }
    let w = with.iter().cloned().fold(f64::MAX, f64::min);
    let wo = without.iter().cloned().fold(f64::MAX, f64::min);
    let ratio = wo / w;
    r.add(
        "drift: unrelated file ops, watched/none",
        format!("{ratio:.3} ({w:.0} ns vs {wo:.0} ns per op, fastest of 3 rounds of 50,000)"),
        "≥ 0.95",
        ratio >= 0.95,
    );
}

/// One HTTP GET of /metrics on 127.0.0.1:`port`; the body's length.
fn scrape(port: u16) -> usize {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect /metrics");
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut body = Vec::new();
    s.read_to_end(&mut body).expect("read /metrics");
    assert!(body.starts_with(b"HTTP/1.1 200"), "scrape failed");
    body.len()
}

/// Median wall time of `n` runs of `f`, in µs.
fn median_us(n: usize, mut f: impl FnMut()) -> f64 {
    median(
        (0..n)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect(),
    )
}

/// Daemon CPU (ns, all threads) over `secs` while `during` runs every
/// `every`.
fn cpu_over(pid: u32, secs: u64, every: Duration, mut during: impl FnMut()) -> u64 {
    let sum = |v: Vec<(String, u64)>| v.iter().map(|x| x.1).sum::<u64>();
    let c0 = sum(thread_cpu_ns(pid));
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        during();
        std::thread::sleep(every);
    }
    sum(thread_cpu_ns(pid)).saturating_sub(c0)
}

/// Operations (issue 13): what /metrics and MCP cost the daemon, against
/// the control socket's own `status` and the daemon left alone.
fn ops(r: &mut Report) {
    use governor::control::{request, McpCall, Request};
    println!("ops: /metrics scrape and MCP call vs a status request; CPU and RSS while scraped");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let mcp = tempfile::tempdir().expect("tempdir");
    let mcp_sock = mcp.path().join("mcp.sock");
    let d = DaemonProc::start(&format!(
        "[metrics]\nlisten = \"127.0.0.1:{port}\"\n[mcp]\nsocket = \"{}\"\n{}",
        mcp_sock.display(),
        (0..30)
            .map(|i| format!("[[service]]\nname = \"svc{i}\"\nexe = \"/opt/none/svc{i}\"\n"))
            .collect::<String>()
    ));
    let mut kids = sleepers(30);
    std::thread::sleep(Duration::from_secs(1));
    let n = 200;
    let status = median_us(n, || {
        request(&d.socket, &Request::Status { all: false }, false).expect("status");
    });
    let metrics = median_us(n, || {
        scrape(port);
    });
    let call = Request::Mcp {
        call: McpCall::MemoryHeadroom {},
    };
    // 60 calls per 10 s per uid: stay under the rate limit.
    let mcp_us = median(
        (0..50)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(170));
                let t = Instant::now();
                let resp = request(&mcp_sock, &call, false).expect("mcp call");
                assert!(resp.ok, "{:?}", resp.error);
                t.elapsed().as_secs_f64() * 1e6
            })
            .collect(),
    );
    r.add(
        "ops: /metrics scrape (30 services) vs status request",
        format!(
            "{:.2}× ({metrics:.0} µs vs {status:.0} µs, medians of {n}, {} bytes)",
            metrics / status,
            scrape(port)
        ),
        "≤ 2.0×",
        metrics <= 2.0 * status,
    );
    r.add(
        "ops: MCP call (memory_headroom, audited) vs status request",
        format!(
            "{:.2}× ({mcp_us:.0} µs vs {status:.0} µs; the mcp.call entry is fsynced first)",
            mcp_us / status
        ),
        "≤ 20× (one fsync)",
        mcp_us <= 20.0 * status,
    );
    let rss0 = rss_kib(d.pid());
    let quiet = cpu_over(d.pid(), 15, Duration::from_secs(1), || {});
    let scraped = cpu_over(d.pid(), 15, Duration::from_secs(1), || {
        scrape(port);
    });
    for _ in 0..500 {
        scrape(port);
    }
    let rss1 = rss_kib(d.pid());
    let pct = |ns: u64| 100.0 * ns as f64 / 15e9;
    // Scraped every second for a signal above the noise; what an operator
    // pays is per scrape, at their interval (15 s is common).
    let per_scrape_ms = scraped.saturating_sub(quiet) as f64 / 15.0 / 1e6;
    r.add(
        "ops: daemon CPU per /metrics scrape (30 services)",
        format!(
            "{per_scrape_ms:.2} ms ({:.3}% of a core scraped every 1 s vs {:.3}% left alone, 15 s each) = {:.4}% of a core at a 15 s interval",
            pct(scraped),
            pct(quiet),
            per_scrape_ms / 15_000.0 * 100.0
        ),
        "≤ 5 ms a scrape (≤ 0.033% of a core at 15 s)",
        per_scrape_ms <= 5.0,
    );
    r.add(
        "ops: daemon RSS after 515 scrapes",
        format!(
            "{:.3}× ({:.2} MiB vs {:.2} MiB before)",
            rss1 as f64 / rss0.max(1) as f64,
            rss1 as f64 / 1024.0,
            rss0 as f64 / 1024.0
        ),
        "≤ 1.10×",
        rss1 as f64 <= 1.10 * rss0 as f64,
    );
    for k in kids.iter_mut() {
        k.kill().ok();
        k.wait().ok();
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let number = |flag: &str, default: usize| {
        args.iter()
            .find_map(|a| a.strip_prefix(flag))
            .map(|v| {
                v.parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .unwrap_or_else(|| panic!("{flag}{v}: expected a positive number"))
            })
            .unwrap_or(default)
    };
    let (protect_rounds, protect_iters) = (
        number("--protect-rounds=", 12),
        number("--protect-iters=", 100_000),
    );
    let only: Vec<String> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .cloned()
        .collect();
    let want = |n: &str| only.is_empty() || only.iter().any(|o| o == n);
    let mut r = Report { rows: Vec::new() };
    if want("lifecycle") {
        lifecycle(&mut r);
    }
    if want("daemon") {
        daemon(&mut r);
    }
    if want("audit") {
        audit(&mut r);
    }
    if want("velocity") {
        velocity(&mut r);
    }
    if want("memory") {
        memory(&mut r);
    }
    if want("killswitch") {
        killswitch(&mut r);
    }
    if want("drift") {
        drift(&mut r);
    }
    if want("ops") {
        ops(&mut r);
    }
    if want("protect") {
        println!("protect: 89 protected files, `governor run` running over not");
        match governor_tests::bench_protect::bench_protect(protect_rounds, protect_iters) {
            Ok(b) => {
                for x in &b.ratios {
                    r.add(
                        &format!("protect: {} with/without", x.name),
                        format!(
                            "{:.3} ({:.0} ns vs {:.0} ns per op, fastest rounds)",
                            x.ratio, x.with_ns, x.without_ns
                        ),
                        &format!("≥ {}", x.target),
                        x.ratio >= x.target,
                    );
                }
                let mut f = b.flags_ms.clone();
                f.sort_by(|a, b| a.total_cmp(b));
                let mut st = b.start_ms.clone();
                st.sort_by(|a, b| a.total_cmp(b));
                let (fm, sm) = (f[f.len() / 2], st[st.len() / 2]);
                r.add(
                    &format!("protect: `governor run` to all {} files flagged", b.files),
                    format!("{fm:.1} ms (daemon fully up in {sm:.0} ms, medians) = {:.4}× the 1 s budget", fm / 1000.0),
                    "≤ 1 s",
                    fm <= 1000.0,
                );
            }
            Err(e) => r.add("protected files", format!("failed: {e:#}"), "runs", false),
        }
    }
    println!("\nsummary:");
    for (name, fig, target, ok) in &r.rows {
        println!(
            "  {:<40} {:<8} {fig} (target {target})",
            name,
            if *ok { "ok" } else { "MISSED" }
        );
    }
    if r.rows.iter().any(|x| !x.3) {
        std::process::exit(1);
    }
}
