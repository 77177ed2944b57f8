//! Shared helpers for governor's integration tests: they load the real eBPF
//! programs into the running kernel (root), spawn real processes and check
//! what the kernel reported.
//!
//! The same test binaries run on the host and inside the qemu guests
//! (`cargo xtask vm-test`); `GOVERNOR_IN_VM=1` tells them they are in a guest.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use governor::{
    events::Event,
    probes::{ProbeOptions, Probes},
};

/// Whether we run inside the qemu guest of `cargo xtask vm-test`.
pub fn in_vm() -> bool {
    std::env::var_os("GOVERNOR_IN_VM").is_some()
}

/// How long to wait for something that takes `host` here: the guest runs
/// under TCG emulation, many times slower. Only for upper bounds (waits
/// that return as soon as the thing happens), never for latency claims.
pub fn patience(host: Duration) -> Duration {
    if in_vm() {
        host * 6
    } else {
        host
    }
}

/// Polls `cond` every 50 ms until it holds (true) or [`patience`] of
/// `timeout` runs out (false), for the caller's assertion to explain.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + patience(timeout);
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Fails loudly when not root: these tests exist to load real programs, so
/// skipping them silently would be a lie.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "integration tests load eBPF programs and must run as root (cargo xtask test does)"
    );
}

/// The `governor` binary next to the test executables
/// (`target/<profile>/governor`).
pub fn governor_bin() -> PathBuf {
    sibling_bin("governor")
}

/// The test fixture binary (`src/bin/fixture.rs`): processes that behave
/// in ways a shell can't (a leader thread that exits before its group).
pub fn fixture_bin() -> PathBuf {
    sibling_bin("governor-fixture")
}

fn sibling_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // Test executables live in target/<profile>/deps, binaries (the bench)
    // in target/<profile>.
    let here = exe.parent().expect("exe dir");
    let mut bin = here.join(name);
    if !bin.exists() {
        bin = here.parent().expect("target dir").join(name);
    }
    if !bin.exists() && in_vm() {
        // The guest's initramfs carries it in /bin.
        bin = PathBuf::from("/bin").join(name);
    }
    assert!(
        bin.exists(),
        "{} missing: build it first (cargo xtask test does)",
        bin.display()
    );
    bin
}

/// Workspace root (where `target/pm2` lives).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Loads the lifecycle programs on a background thread and collects every
/// event they deliver until stopped.
pub struct Collector {
    events: Arc<Mutex<Vec<Event>>>,
    stop: Arc<AtomicBool>,
    /// Whether the collector drains the ring (false = let it fill up).
    draining: Arc<AtomicBool>,
    thread: Option<JoinHandle<anyhow::Result<u64>>>,
    stats: Arc<Mutex<Vec<(String, u64, u64)>>>,
}

impl Collector {
    pub fn start() -> Self {
        Self::start_with(ProbeOptions::default(), true)
    }

    /// Starts with the given ring size; `drain = false` leaves the ring
    /// undrained until [`Collector::resume`].
    pub fn start_with(opts: ProbeOptions, drain: bool) -> Self {
        require_root();
        let events = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let draining = Arc::new(AtomicBool::new(drain));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stats = Arc::new(Mutex::new(Vec::new()));
        let (ev, st, dr, sts) = (
            events.clone(),
            stop.clone(),
            draining.clone(),
            stats.clone(),
        );
        let thread = std::thread::spawn(move || -> anyhow::Result<u64> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let mut probes = match Probes::load(&opts) {
                    Ok(p) => p,
                    Err(e) => {
                        let msg = format!("{e:#}");
                        ready_tx.send(Err(msg.clone())).ok();
                        anyhow::bail!(msg);
                    }
                };
                ready_tx.send(Ok(())).ok();
                loop {
                    if dr.load(Ordering::SeqCst) {
                        let mut batch = Vec::new();
                        let _ = tokio::time::timeout(
                            Duration::from_millis(20),
                            probes.next_batch(|e| batch.push(e), |e| panic!("bad record: {e:#}")),
                        )
                        .await;
                        ev.lock().unwrap().extend(batch);
                    } else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    if st.load(Ordering::SeqCst) {
                        let mut batch = Vec::new();
                        while probes.drain(|e| batch.push(e)) > 0 {}
                        ev.lock().unwrap().extend(batch);
                        *sts.lock().unwrap() = probes.program_stats();
                        return probes.dropped();
                    }
                }
            })
        });
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("loading the eBPF programs failed: {e}"),
            Err(_) => panic!("collector thread died before loading"),
        }
        Collector {
            events,
            stop,
            draining,
            thread: Some(thread),
            stats,
        }
    }

    pub fn resume(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// A snapshot of the events so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// Waits until `pred` holds over the collected events, or panics.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&[Event]) -> bool) {
        let timeout = patience(timeout);
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if pred(&self.events.lock().unwrap()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("timed out after {timeout:?} waiting for {what}");
    }

    /// Kernel run statistics of the programs, (name, runs, ns), as of stop.
    pub fn program_stats(&self) -> Vec<(String, u64, u64)> {
        self.stats.lock().unwrap().clone()
    }

    /// Stops, returning every event and the kernel's drop counter.
    pub fn stop(self) -> (Vec<Event>, u64) {
        let (events, dropped, _) = self.stop_with_stats();
        (events, dropped)
    }

    /// Stops, also returning the programs' kernel run statistics.
    pub fn stop_with_stats(mut self) -> (Vec<Event>, u64, Vec<(String, u64, u64)>) {
        self.stop.store(true, Ordering::SeqCst);
        let dropped = self
            .thread
            .take()
            .expect("thread")
            .join()
            .expect("collector panicked")
            .expect("collector failed");
        let events = std::mem::take(&mut *self.events.lock().unwrap());
        let stats = self.stats.lock().unwrap().clone();
        (events, dropped, stats)
    }
}

/// Exit events of `pid`.
pub fn exits_of(events: &[Event], pid: u32) -> Vec<governor::events::Exit> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Exit(x) if x.pid == pid => Some(x.clone()),
            _ => None,
        })
        .collect()
}

/// Exec events of `pid`.
pub fn execs_of(events: &[Event], pid: u32) -> Vec<governor::events::Exec> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Exec(x) if x.pid == pid => Some(x.clone()),
            _ => None,
        })
        .collect()
}

/// pm2 CLI in its own PM2_HOME, so tests never touch a user's pm2.
pub struct Pm2 {
    pub home: tempfile::TempDir,
    bin: PathBuf,
}

impl Pm2 {
    pub fn isolated() -> Self {
        let bin = workspace_root().join("target/pm2/node_modules/.bin/pm2");
        assert!(
            bin.exists(),
            "pinned pm2 missing at {}: run cargo xtask setup",
            bin.display()
        );
        Pm2 {
            home: tempfile::tempdir().unwrap(),
            bin,
        }
    }

    pub fn run(&self, args: &[&str]) -> String {
        // With pm2 on PATH, as a shell user has it: the God inherits it.
        let path = format!(
            "{}:{}",
            self.bin
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            std::env::var("PATH").unwrap_or_default()
        );
        let out = Command::new(&self.bin)
            .args(args)
            .env("PM2_HOME", self.home.path())
            .env("PATH", path)
            .output()
            .expect("run pm2");
        assert!(
            out.status.success(),
            "pm2 {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn jlist(&self) -> serde_json::Value {
        let out = self.run(&["jlist"]);
        // pm2 may print warnings before the JSON.
        let start = out.find('[').expect("jlist JSON");
        serde_json::from_str(&out[start..]).expect("jlist parses")
    }
}

/// pm2 for a test that needs node, which only the host has: `None` in the
/// guest (and the test says it skipped).
pub fn host_pm2() -> Option<Pm2> {
    require_root();
    if in_vm() {
        println!("skipped in the guest: no node there");
        return None;
    }
    Some(Pm2::isolated())
}

impl Drop for Pm2 {
    fn drop(&mut self) {
        Command::new(&self.bin)
            .arg("kill")
            .env("PM2_HOME", self.home.path())
            .output()
            .ok();
    }
}

/// A stand-in for the Telegram Bot API: a real HTTP server on 127.0.0.1
/// (shared with governor-alerts' own tests).
#[path = "../../governor-alerts/tests/support/mod.rs"]
pub mod botapi;

/// Protected files: a Protector on a thread, attempts as root or nobody.
pub mod protect;

/// The protected-files benchmark (issue 6), run by `governor-bench`.
pub mod bench_protect;

/// A running `governor run` with its own state dir, socket and config.
pub struct DaemonProc {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub state: PathBuf,
    child: Option<std::process::Child>,
    /// Runs the daemon under this command (e.g. `setpriv …`), argv first.
    pub wrapper: Vec<String>,
    /// Extra environment for the daemon (NOTIFY_SOCKET, …).
    pub env: Vec<(String, String)>,
}

impl DaemonProc {
    /// Writes a config (daemon section filled in, `extra` appended) and
    /// starts the daemon, waiting until its control socket answers.
    pub fn start(extra: &str) -> Self {
        Self::start_with("", extra, true)
    }

    /// As [`DaemonProc::start`], with more keys in the `[daemon]` section.
    pub fn start_with_daemon_keys(daemon: &str, extra: &str) -> Self {
        Self::start_with(daemon, extra, true)
    }

    fn start_with(daemon: &str, extra: &str, spawn: bool) -> Self {
        require_root();
        let dir = tempfile::tempdir().expect("tempdir");
        // Traversable by others, so a non-root client reaches the socket and
        // hears the daemon's own refusal.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .ok();
        let state = dir.path().join("state");
        let socket = dir.path().join("governor.sock");
        let config = dir.path().join("governor.toml");
        std::fs::write(
            &config,
            format!(
                "[daemon]\nstate_dir = \"{}\"\nsocket = \"{}\"\n{daemon}\n{extra}",
                state.display(),
                socket.display()
            ),
        )
        .expect("write config");
        let mut d = DaemonProc {
            dir,
            config,
            socket,
            state,
            child: None,
            wrapper: Vec::new(),
            env: Vec::new(),
        };
        if spawn {
            d.spawn();
        }
        d
    }

    /// Writes the config and starts the daemon without waiting for it: for
    /// timing its start from outside. Follow with [`DaemonProc::wait_ready`].
    pub fn launch(extra: &str) -> Self {
        let mut d = Self::start_with("", extra, false);
        d.launch_child();
        d
    }

    /// (Re)starts the daemon process on the same config and state.
    pub fn spawn(&mut self) {
        self.launch_child();
        self.wait_ready();
    }

    /// A daemon on the default test config, not started yet.
    pub fn configured(extra: &str) -> Self {
        Self::start_with("", extra, false)
    }

    /// Starts `bin` (another build of governor: a baseline) on this config
    /// and state, and returns how long it took until the socket answered.
    pub fn time_start(&mut self, bin: &Path) -> Duration {
        let t0 = Instant::now();
        self.launch_bin(bin);
        self.wait_ready();
        t0.elapsed()
    }

    fn launch_child(&mut self) {
        self.launch_bin(&governor_bin());
    }

    fn launch_bin(&mut self, bin: &Path) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))
            .expect("daemon log");
        let mut cmd = match self.wrapper.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("spawn governor run");
        self.child = Some(child);
    }

    /// Waits until the daemon's control socket answers (start-up done).
    pub fn wait_ready(&mut self) {
        // Start-up verifies and attaches the protection programs too; under
        // the guests' software emulation that alone takes tens of seconds.
        let end = Instant::now() + Duration::from_secs(if in_vm() { 240 } else { 30 });
        while Instant::now() < end {
            if governor::control::request(
                &self.socket,
                &governor::control::Request::Status { all: false },
                false,
            )
            .is_ok()
            {
                return;
            }
            if let Some(Ok(Some(st))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("governor run exited early with {st}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "governor run did not open its socket in time:\n{}",
            self.log()
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Changes the config the way an operator must: the daemon keeps its own
    /// config immutable (UNTOUCHABLE), so open an approval window from a
    /// terminal, type the path back, write, and end the window.
    pub fn edit_config(&self, text: &str) {
        let path = std::fs::canonicalize(&self.config).expect("config path");
        let p = path.to_str().expect("utf-8 path");
        let sock = self.socket.to_str().expect("utf-8 socket");
        let (code, out) = governor_in_login(
            &[
                "approve",
                p,
                "--for",
                "1m",
                "--reason",
                "test edit",
                "--socket",
                sock,
            ],
            p,
        );
        assert_eq!(code, 0, "approve failed: {out}\n{}", self.log());
        std::fs::write(&self.config, text).expect("write config inside the window");
        let (code, out, err) = governor(&["approve", "--end", p, "--socket", sock]);
        assert_eq!(code, 0, "approve --end failed: {out}{err}");
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    pub fn audit_log(&self) -> PathBuf {
        self.state.join("audit.jsonl")
    }

    /// Every audit entry so far (all rotated files), parsed.
    pub fn audit_entries(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for f in governor_audit_files(&self.audit_log()) {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            out.extend(text.lines().filter_map(|l| serde_json::from_str(l).ok()));
        }
        out
    }

    pub fn entries_of(&self, kind: &str) -> Vec<serde_json::Value> {
        self.audit_entries()
            .into_iter()
            .filter(|e| e["kind"] == kind)
            .collect()
    }

    /// Waits (with [`patience`]) until at least `n` entries of `kind` are
    /// in the log and returns them all; on timeout returns what is there, so
    /// the caller's assertion says what was missing.
    pub fn wait_entries_of(
        &self,
        kind: &str,
        n: usize,
        timeout: Duration,
    ) -> Vec<serde_json::Value> {
        wait_until(timeout, || self.entries_of(kind).len() >= n);
        self.entries_of(kind)
    }

    /// `governor status --json` through the CLI.
    pub fn status(&self) -> serde_json::Value {
        self.status_with(&[])
    }

    /// `governor status --json --all`: every service with a live instance.
    pub fn status_all(&self) -> serde_json::Value {
        self.status_with(&["--all"])
    }

    fn status_with(&self, extra: &[&str]) -> serde_json::Value {
        let out = Command::new(governor_bin())
            .args(["status", "--json"])
            .args(extra)
            .arg("--socket")
            .arg(&self.socket)
            .output()
            .expect("governor status");
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// The status row of one service, if listed.
    pub fn service(&self, name: &str) -> Option<serde_json::Value> {
        self.status()["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
    }

    /// Waits until `pred` holds for the status, returning that status.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let end = Instant::now() + patience(timeout);
        loop {
            let s = self.status();
            if pred(&s) {
                return s;
            }
            if Instant::now() > end {
                panic!(
                    "timed out waiting for {what}; last status: {s:#}\nlog:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on the daemon child we spawned.
        unsafe { libc::kill(self.pid() as i32, sig) };
    }

    /// SIGTERM and wait: a clean stop.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        self.signal(libc::SIGTERM);
        self.child.take().expect("running").wait().expect("wait")
    }

    /// SIGKILL and reap: a crash.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        if let Some(mut c) = self.child.take() {
            c.wait().ok();
        }
    }
}

impl Drop for DaemonProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, libc::SIGKILL) };
            c.wait().ok();
        }
        // The log keeps the append-only flag and the config (protected
        // implicitly) the immutable one; clear them so the tempdir can go.
        for f in governor_audit_files(&self.audit_log()) {
            clear_append_only(&f);
        }
        clear_immutable(&self.config);
    }
}

/// A service's row in `status --json` (Null when absent).
pub fn row<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
        .unwrap_or(&serde_json::Value::Null)
}

/// Runs `sh -c 'while true; do <app>; done'` in the background: a script
/// that keeps dying, restarted by a shell loop.
pub struct ShellLoop(std::process::Child);

impl ShellLoop {
    /// Writes `body` as the script `dir/name` and starts the loop; returns
    /// it and the script's path.
    pub fn start(dir: &std::path::Path, name: &str, body: &str) -> (Self, String) {
        use std::os::unix::process::CommandExt;
        let app = dir.join(name);
        std::fs::write(&app, format!("#!/bin/sh\n{body}\n")).expect("write script");
        std::fs::set_permissions(&app, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod script");
        let child = Command::new("/bin/sh")
            .arg("-c")
            .arg("while true; do \"$0\"; done")
            .arg(&app)
            .stderr(std::process::Stdio::null())
            // Its own group, so dropping it kills the running script too
            // (an orphan dying later would be counted as one more crash).
            .process_group(0)
            .spawn()
            .expect("spawn shell loop");
        (ShellLoop(child), app.display().to_string())
    }
}

impl Drop for ShellLoop {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group we created at spawn.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        self.0.wait().ok();
    }
}

/// The audit log files, oldest first (rotated `.N` files, then the live one).
pub fn governor_audit_files(log: &std::path::Path) -> Vec<PathBuf> {
    let mut rotated: Vec<(u64, PathBuf)> = std::fs::read_dir(log.parent().expect("dir"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let n = name.strip_prefix("audit.jsonl.")?.parse().ok()?;
                    Some((n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    rotated.sort();
    let mut v: Vec<PathBuf> = rotated.into_iter().map(|(_, p)| p).collect();
    v.push(log.to_path_buf());
    v
}

/// Runs `governor ARGS`, returning (exit code, stdout, stderr).
pub fn governor(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(governor_bin())
        .args(args)
        .output()
        .expect("run governor");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `enable` switch of a tracefs event (`"syscalls/sys_exit_futimesat"`),
/// if tracefs and the event exist.
pub fn tracefs_event_enable(event: &str) -> Option<std::path::PathBuf> {
    governor::tracefs::tracefs_root()
        .map(|root| root.join("events").join(event).join("enable"))
        .filter(|p| p.exists())
}

/// Whether pm2 runs here. The guest has no node or pm2, so pm2 tests cover
/// the host only; in the guest this says so (test output) and is false.
pub fn pm2_runs_here() -> bool {
    if in_vm() {
        println!("pm2 is not in the guest; this test covers the host");
        return false;
    }
    true
}

/// `chattr -i`, without needing chattr.
pub fn clear_immutable(path: &std::path::Path) {
    if let Ok(f) = std::fs::File::open(path) {
        let _ = governor::fsflags::set_flag(&f, governor::fsflags::FS_IMMUTABLE_FL, false);
    }
}

/// Runs `governor ARGS` typed into a real login session: login(1) in its
/// pre-authenticated mode (`login -f root`, what a getty runs after it
/// authenticated someone) on a fresh pty from script(1), the way a person
/// at a console would, then `answer` typed at its prompt. Returns its exit
/// code and everything the terminal showed.
pub fn governor_in_login(args: &[&str], answer: &str) -> (i32, String) {
    use std::io::{Read, Write};
    let quote = |a: &str| format!("'{}'", a.replace('\'', r"'\''"));
    let mut cmd = vec![quote(&governor_bin().display().to_string())];
    cmd.extend(args.iter().map(|a| quote(a)));
    let typed = format!("{}; echo GOVERNOR-RC=$?; exit\n{answer}\n", cmd.join(" "));
    let mut child = Command::new("script")
        .args(["-qfc", "login -f root", "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn script(1) running login(1)");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(typed.as_bytes())
        .expect("type into the login");
    let mut out = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .ok();
    child.wait().ok();
    drop(stdin);
    // The typed line echoes `GOVERNOR-RC=$?`; the shell's answer has digits.
    let code = out
        .match_indices("GOVERNOR-RC=")
        .filter_map(|(i, m)| {
            let rest = &out[i + m.len()..];
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse::<i32>().ok()
        })
        .last()
        .unwrap_or(-1);
    (code, out)
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on a hybrid host).
pub fn cgroup2_root() -> Option<PathBuf> {
    std::fs::read_to_string("/proc/mounts")
        .ok()?
        .lines()
        .find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, at, ty) = (f.next()?, f.next()?, f.next()?);
            (ty == "cgroup2").then(|| PathBuf::from(at))
        })
}

/// The uid tests use for an unprivileged local user.
pub const NOBODY: u32 = 65534;

/// Runs `governor ARGS` with a pseudo-terminal on stdin, answering its
/// prompt with `answer` — what a human at a terminal does.
pub fn governor_on_tty(args: &[&str], answer: &str) -> (i32, String) {
    use std::{
        io::{Read, Write},
        os::fd::{FromRawFd, OwnedFd},
    };
    let (mut master, mut slave) = (-1, -1);
    // SAFETY: openpty writes two fds into our ints; null name/termios/winsize
    // are allowed.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just returned by openpty and are ours alone.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let child = Command::new(governor_bin())
        .args(args)
        .stdin(std::process::Stdio::from(slave))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn governor");
    let mut m = std::fs::File::from(master);
    m.write_all(format!("{answer}\n").as_bytes())
        .expect("type into the tty");
    let out = child.wait_with_output().expect("wait governor");
    let mut _echo = Vec::new();
    let _ = m.read(&mut _echo);
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `chattr -a`, without needing chattr (the guest's busybox lacks it).
pub fn clear_append_only(path: &std::path::Path) {
    if let Ok(f) = std::fs::File::open(path) {
        let _ = governor::fsflags::set_flag(&f, governor::fsflags::FS_APPEND_FL, false);
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.1 GET to 127.0.0.1; (status code, body).
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    // Chunked: governor-metrics sends a full body; undo chunking if any.
    let body = if resp
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (code, body)
}

fn dechunk(mut b: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = b.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        b = &rest[n + 2..];
    }
    out
}
