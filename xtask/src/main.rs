//! `cargo xtask`: set up a host, build, run, test, benchmark.
//!
//! Every command that needs the toolchain runs `setup` first (it only checks
//! when everything is in place), so a new user needs exactly two commands:
//! `cargo xtask run` and `cargo xtask test`.

mod setup;
mod vm;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "governor's build, setup and test tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install everything a fresh Debian 12 / Ubuntu host needs (root):
    /// apt packages, the pinned nightly with rust-src, bpf-linker 0.13.0
    /// against LLVM 22, pinned pm2 for the tests, and the kernel filesystem
    /// mounts. Idempotent: skips what is done.
    Setup,
    /// Set up if needed, build, and run the daemon in the foreground on the
    /// example config (examples/governor.toml). Ctrl-C stops it.
    Run {
        /// Use this config instead of the example.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Set up if needed and run every test: unit tests, the root integration
    /// tests on this kernel, a one-minute smoke of each fuzz target
    /// (GOVERNOR_FUZZ_SECS=N to change, 0 to skip; skipped with a filter),
    /// then the integration tests inside a qemu guest running a stock Debian
    /// 6.1 kernel with BPF LSM.
    Test {
        /// Guest kernels to also test on: 6.1, 6.12, all, or none.
        #[arg(long, default_value = "6.1")]
        kernel: String,
        /// Only run tests whose names contain these strings.
        filter: Vec<String>,
    },
    /// Build the integration tests and run them in qemu guests.
    VmTest {
        /// 6.1, 6.12 or all.
        #[arg(long, default_value = "6.1")]
        kernel: String,
        /// Per-guest timeout in seconds.
        #[arg(long, default_value_t = 900)]
        timeout: u64,
        /// Test name filter, passed to the test binaries.
        #[arg(last = true)]
        filter: Vec<String>,
    },
    /// Run the benchmarks (root); figures are ratios against a baseline
    /// measured in the same run.
    Bench {
        /// Run them inside a qemu guest with this stock kernel (6.1 or
        /// 6.12) instead of on the host: how governor fares on a kernel that
        /// allows fexit and BPF LSM. The guest is emulated, so its ratios
        /// are indicative.
        #[arg(long)]
        guest: Option<String>,
        /// Another build of `governor` (e.g. an earlier commit's release
        /// binary) whose start-up the daemon benchmark measures in the same
        /// run, for a ratio.
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// Only these benchmarks (lifecycle, daemon, audit, velocity, memory, killswitch, drift, protect, ops).
        only: Vec<String>,
    },
    /// Run the fuzz targets in fuzz/ (cargo-fuzz, libFuzzer) one after
    /// another, for long runs; `cargo xtask test` runs each for a minute.
    Fuzz {
        /// Seconds per target (0: only build them).
        #[arg(long, default_value_t = 600)]
        secs: u64,
        /// Targets run at once (one core each).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Only these targets (config, control_request, audit_line, proc_parsers, event_decode).
        targets: Vec<String>,
    },
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The cargo target directory (honours CARGO_TARGET_DIR).
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(d) => PathBuf::from(d),
        None => workspace_root().join("target"),
    }
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c.env("PATH", setup::path_with_cargo_bin());
    c
}

pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.cmd {
        Cmd::Setup => setup::setup(&setup::Needs::all()),
        Cmd::Run { config } => {
            setup::setup(&setup::Needs::build())?;
            run_cmd(cargo().args(["build", "--release", "-p", "governor"]))?;
            let config = match config {
                Some(c) => c,
                None => install_example_config(&root)?,
            };
            println!(
                "xtask: starting governor on {} (Ctrl-C stops it)",
                config.display()
            );
            let bin = target_dir().join("release/governor");
            run_cmd(Command::new(bin).arg("run").arg("--config").arg(&config))
        }
        Cmd::Test { kernel, filter } => {
            let started = std::time::Instant::now();
            let mut phases: Vec<(&str, f64)> = Vec::new();
            let mut phase = |name, since: std::time::Instant| {
                phases.push((name, since.elapsed().as_secs_f64()));
                std::time::Instant::now()
            };
            setup::setup(&setup::Needs::all())?;
            let mut t = phase("setup", started);
            let mut c = cargo();
            c.args(["build"]);
            run_cmd(&mut c)?;
            let mut c = cargo();
            c.args(["test", "--no-fail-fast", "--", "--test-threads=1"]);
            c.args(&filter);
            run_timed_tests(&mut c)?;
            t = phase("build + host tests", t);
            // A fuzz find is reported after the guest has run too: one
            // failure must not hide the other's results.
            let fuzzed = if filter.is_empty() {
                let r = fuzz_smoke(&root);
                t = phase("fuzz smoke", t);
                r
            } else {
                println!("xtask: fuzz smoke skipped (a test filter was given)");
                Ok(())
            };
            if kernel != "none" {
                let guest = vm_test(&root, &kernel, Duration::from_secs(900), &filter);
                phase("guest", t);
                if let (Err(f), Err(_)) = (&fuzzed, &guest) {
                    eprintln!("xtask: the fuzz smoke failed too: {f:#}");
                }
                guest?;
            }
            fuzzed?;
            let each: Vec<String> = phases
                .iter()
                .map(|(n, s)| format!("{n} {s:.0} s"))
                .collect();
            println!(
                "xtask: all tests passed in {:.0} s ({})",
                started.elapsed().as_secs_f64(),
                each.join(", ")
            );
            Ok(())
        }
        Cmd::VmTest {
            kernel,
            timeout,
            filter,
        } => {
            setup::setup(&setup::Needs::all())?;
            vm_test(&root, &kernel, Duration::from_secs(timeout), &filter)
        }
        Cmd::Bench {
            guest,
            baseline,
            only,
        } => {
            if let Some(b) = &baseline {
                if !b.is_file() {
                    bail!("--baseline {}: no such file", b.display());
                }
            }
            setup::setup(&setup::Needs::all())?;
            run_cmd(cargo().args([
                "build",
                "--release",
                "-p",
                "governor",
                "-p",
                "governor-tests",
                "--bins",
            ]))?;
            let bench = target_dir().join("release/governor-bench");
            if let Some(kernel) = guest {
                let mut argv = vec![bench.display().to_string()];
                argv.extend(only);
                let mut extra = vec![bench, target_dir().join("release/governor")];
                if let Some(b) = &baseline {
                    // Shipped as /bin/governor-baseline, where the bench looks.
                    let dst = target_dir().join("vm/governor-baseline");
                    std::fs::create_dir_all(target_dir().join("vm"))?;
                    std::fs::copy(b, &dst)
                        .with_context(|| format!("copying {} to {}", b.display(), dst.display()))?;
                    extra.push(dst);
                }
                let opts = vm::VmOptions {
                    kernels: vm::parse_kernel_arg(&kernel)?,
                    test_binaries: Vec::new(),
                    extra_binaries: extra,
                    pre_commands: vec![argv],
                    filter: Vec::new(),
                    timeout: Duration::from_secs(3600),
                    target_dir: target_dir(),
                };
                return vm::vm_test(&opts);
            }
            let mut c = Command::new(bench);
            c.args(&only);
            if let Some(b) = &baseline {
                c.env("GOVERNOR_BASELINE_BIN", b);
            }
            run_cmd(&mut c)
        }
        Cmd::Fuzz {
            secs,
            jobs,
            targets,
        } => {
            setup::setup(&setup::Needs::all())?;
            let targets = if targets.is_empty() {
                FUZZ_TARGETS.iter().map(|t| t.to_string()).collect()
            } else {
                targets
            };
            fuzz_run(&root, &targets, secs, jobs)
        }
    }
}

/// Runs `cargo test`, passing its output through, and prints how long each
/// test binary took (libtest's own `finished in`), longest first, so what
/// grows is seen. Cargo names each binary on stderr (`Running …`,
/// `Doc-tests …`) and libtest reports on stdout, both in run order: the
/// k-th result belongs to the k-th name.
fn run_timed_tests(cmd: &mut Command) -> Result<()> {
    use std::io::{BufRead, BufReader};
    let t0 = std::time::Instant::now();
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start {cmd:?}"))?;
    let out = child.stdout.take().context("cargo test stdout")?;
    let err = child.stderr.take().context("cargo test stderr")?;
    let names = std::thread::spawn(move || {
        let mut names = Vec::new();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("{line}");
            let t = line.trim();
            if let Some(rest) = t.strip_prefix("Running ") {
                // `Running tests/x.rs (target/debug/deps/x-hash)`
                let bin = rest
                    .rsplit_once("/deps/")
                    .map(|(_, b)| b.trim_end_matches(')'))
                    .and_then(|b| b.rsplit_once('-').map(|(n, _)| n))
                    .unwrap_or("");
                let src = rest.split(" (").next().unwrap_or(rest);
                names.push(format!("{bin} ({src})"));
            } else if let Some(rest) = t.strip_prefix("Doc-tests ") {
                names.push(format!("doc-tests {rest}"));
            }
        }
        names
    });
    let mut results: Vec<(f64, bool)> = Vec::new();
    for line in BufReader::new(out).lines() {
        let line = line.context("reading cargo test output")?;
        println!("{line}");
        if let Some(rest) = line.trim().strip_prefix("test result: ") {
            let secs = rest
                .rsplit_once("finished in ")
                .and_then(|(_, s)| s.trim_end_matches('s').parse::<f64>().ok())
                .unwrap_or(0.0);
            results.push((secs, rest.starts_with("ok")));
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    let names = names.join().unwrap_or_default();
    let mut table: Vec<(String, f64, bool)> = results
        .into_iter()
        .enumerate()
        .map(|(i, (secs, ok))| {
            (
                names.get(i).cloned().unwrap_or_else(|| "?".into()),
                secs,
                ok,
            )
        })
        .collect();
    table.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!("xtask: host test binaries, longest first");
    for (name, secs, ok) in table.iter().filter(|r| r.1 >= 0.05) {
        println!(
            "  {name:<52} {secs:>7.1} s{}",
            if *ok { "" } else { "  FAILED" }
        );
    }
    println!(
        "  {:<52} {:>7.1} s (build and doctests included)",
        "cargo test",
        t0.elapsed().as_secs_f64()
    );
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

/// The daemon's default config path. `cargo xtask run` installs the example
/// there when there is none, so `governor status` finds the daemon without
/// flags. An existing file is the user's and is left alone. (The daemon
/// keeps its config immutable while protecting it, which is why the
/// example isn't run in place from the repository.)
const SYSTEM_CONFIG: &str = "/etc/governor/governor.toml";

fn install_example_config(root: &Path) -> Result<PathBuf> {
    let dest = PathBuf::from(SYSTEM_CONFIG);
    if dest.exists() {
        let same =
            std::fs::read(&dest).ok() == std::fs::read(root.join("examples/governor.toml")).ok();
        if !same {
            println!("xtask: {SYSTEM_CONFIG} exists and differs from the example: running on it as it is");
        }
        return Ok(dest);
    }
    std::fs::create_dir_all("/etc/governor").context("creating /etc/governor")?;
    std::fs::copy(root.join("examples/governor.toml"), &dest)
        .with_context(|| format!("installing the example config as {SYSTEM_CONFIG}"))?;
    println!("xtask: installed the example config as {SYSTEM_CONFIG}");
    Ok(dest)
}

/// What of each integration-test binary runs in the guests, and its time
/// budget there (TCG seconds). The guest is for what the kernel can change:
/// lifecycle events, protection (flags, attempt logging, LSM), doctor, and
/// the daemon end to end once (a crash loop from real exits, identity from
/// real uids). Policy tests (audit chain, reloads, Telegram, pm2, restart
/// history) depend on no kernel feature and run on the host only.
fn guest_plan(binary: &str) -> Option<(&'static [&'static str], u64)> {
    match binary {
        "lifecycle" => Some((&[], 150)),
        "protect" => Some((&[], 330)),
        "lsm" => Some((&[], 60)),
        // The per-uid attempt budget on 6.1's verifier and ring; the ways in
        // (io_uring, int 0x80, long paths, other mounts) on 6.1's hooks.
        "hostile" => Some((&[], 240)),
        // The memory tracker on 6.1's verifier (no node: pm2 is host-only).
        "memory" => Some((&["--exact", "the_kernel_tracker_sees_a_crossing"], 90)),
        "cli" => Some((&[], 90)),
        "velocity" => Some((&["--exact", "unmanaged_shell_loop_and_signal_deaths"], 120)),
        // Identity from the kernel's uids and the guest's cgroup v2.
        "trust" => Some((
            &["--exact", "forged_identities_are_not_configured_services"],
            150,
        )),
        _ => None,
    }
}

/// Builds the integration tests and the governor binary, and runs them in
/// the chosen guest kernels (with `governor doctor` first).
fn vm_test(root: &Path, kernel: &str, timeout: Duration, filter: &[String]) -> Result<()> {
    let kernels = vm::parse_kernel_arg(kernel)?;
    // Build the default members (not just -p governor) so cargo unifies
    // features exactly as `cargo test` does and the eBPF object is built once.
    // (Never --workspace: that would build the eBPF crate for the host.)
    run_cmd(cargo().arg("build"))?;
    let built = vm::build_test_binaries(root, &["-p".into(), "governor-tests".into()])?;
    let mut tests = Vec::new();
    for p in built {
        let name = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.rsplit_once('-'))
            .map(|(n, _)| n.to_string())
            .unwrap_or_default();
        match guest_plan(&name) {
            Some((args, budget)) => tests.push(vm::TestBinary {
                path: p,
                args: args.iter().map(|s| s.to_string()).collect(),
                budget: Duration::from_secs(budget),
            }),
            None => println!("xtask: {name}: host only (nothing in it depends on the kernel)"),
        }
    }
    let governor = target_dir().join("debug/governor");
    let fixture = target_dir().join("debug/governor-fixture");
    let opts = vm::VmOptions {
        kernels,
        test_binaries: tests,
        extra_binaries: vec![governor.clone(), fixture],
        pre_commands: vec![vec![governor.display().to_string(), "doctor".into()]],
        filter: filter.to_vec(),
        timeout,
        target_dir: target_dir(),
    };
    vm::vm_test(&opts)
}

/// The cargo-fuzz targets in fuzz/ (fuzz/README.md says what each feeds).
const FUZZ_TARGETS: &[&str] = &[
    "config",
    "control_request",
    "audit_line",
    "proc_parsers",
    "event_decode",
];

/// Seconds each target runs in `cargo xtask test`, unless GOVERNOR_FUZZ_SECS
/// says otherwise (0 skips).
const FUZZ_SMOKE_SECS: u64 = 60;

/// The fuzz step of `cargo xtask test`: every target for a minute, the
/// crashes found before (fuzz/regressions) replayed first, one target per
/// core. The build is the one `cargo xtask fuzz` uses (AddressSanitizer,
/// target/fuzz), so a long run afterwards starts from it.
fn fuzz_smoke(root: &Path) -> Result<()> {
    let secs = match std::env::var("GOVERNOR_FUZZ_SECS") {
        Ok(v) => v
            .trim()
            .parse::<u64>()
            .with_context(|| format!("GOVERNOR_FUZZ_SECS={v:?} is not a number of seconds"))?,
        Err(_) => FUZZ_SMOKE_SECS,
    };
    if secs == 0 {
        println!("xtask: fuzz smoke skipped (GOVERNOR_FUZZ_SECS=0)");
        return Ok(());
    }
    let targets: Vec<String> = FUZZ_TARGETS.iter().map(|t| t.to_string()).collect();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    fuzz_run(root, &targets, secs, cores)
}

/// `cargo fuzz` with the pinned nightly, its build under target/fuzz.
fn cargo_fuzz(root: &Path, sub: &str) -> Command {
    let mut c = Command::new("rustup");
    c.args(["run", setup::PINNED_NIGHTLY, "cargo", "fuzz", sub])
        .arg("--fuzz-dir")
        .arg(root.join("fuzz"))
        .arg("--target-dir")
        .arg(target_dir().join("fuzz"))
        .current_dir(root)
        .env("PATH", setup::path_with_cargo_bin());
    // What the outer (stable) cargo exported must neither pick the compiler
    // nor differ from a `cargo fuzz` typed by hand: build scripts that track
    // e.g. CARGO_MANIFEST_DIR would otherwise rebuild half the tree each time.
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        let outer = [
            "RUSTC",
            "RUSTC_WRAPPER",
            "RUSTC_WORKSPACE_WRAPPER",
            "RUSTDOC",
            "RUSTUP_TOOLCHAIN",
            "RUSTFLAGS",
            "CARGO",
            "CARGO_ENCODED_RUSTFLAGS",
            "CARGO_MANIFEST_DIR",
            "CARGO_MANIFEST_PATH",
            "CARGO_BIN_NAME",
            "CARGO_CRATE_NAME",
            "CARGO_PRIMARY_PACKAGE",
            "CARGO_RUSTC_CURRENT_DIR",
        ]
        .contains(&k.as_ref())
            || k.starts_with("CARGO_PKG_");
        if outer {
            c.env_remove(k.as_ref());
        }
    }
    c
}

/// One fuzz target running under `cargo fuzz run`. It stays in xtask's
/// process group, so Ctrl-C at the terminal reaches cargo and libFuzzer
/// too; dropped before it ended (xtask failing on the way), its whole tree
/// — cargo and the libFuzzer process under it — is killed and reaped.
struct FuzzRun {
    target: String,
    child: std::process::Child,
    log_path: PathBuf,
    regressions: PathBuf,
    started: std::time::Instant,
}

impl Drop for FuzzRun {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            // The tree is read while the child (unreaped, so its pid is
            // still its own) holds it together, then killed all at once.
            for pid in descendants(self.child.id()) {
                // SAFETY: kill(2) of a live descendant of our own child.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Every live descendant of `root` (children, grandchildren…), from the
/// parent pid in each /proc/PID/stat.
fn descendants(root: u32) -> Vec<u32> {
    let mut parent_of: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid …`: comm may hold spaces and parens.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if let Some(ppid) = ppid {
                parent_of.push((pid, ppid));
            }
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parent_of.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

/// Starts target `t` for `secs` seconds, its libFuzzer output to a log.
fn fuzz_start(root: &Path, work: &Path, t: &str, secs: u64) -> Result<FuzzRun> {
    let corpus = work.join("corpus").join(t);
    std::fs::create_dir_all(&corpus)?;
    let log_path = work.join("logs").join(format!("{t}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut c = cargo_fuzz(root, "run");
    // New inputs go to the first directory: the committed seeds stay as they are.
    c.arg(t).arg(&corpus).arg(root.join("fuzz/corpus").join(t));
    let regressions = root.join("fuzz/regressions").join(t);
    if regressions.is_dir() {
        c.arg(&regressions);
    }
    c.arg("--")
        .arg(format!("-max_total_time={secs}"))
        .args(["-timeout=30", "-print_final_stats=1"]);
    println!(
        "xtask: fuzz {t}: {secs} s (libFuzzer output in {})",
        log_path.display()
    );
    let child = c
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("failed to start cargo fuzz run {t}"))?;
    Ok(FuzzRun {
        target: t.to_string(),
        child,
        log_path,
        regressions,
        started: std::time::Instant::now(),
    })
}

/// Reports how target run `r` ended: its execs, or the crash (what it
/// said, the input libFuzzer saved, how to reproduce it) as the error.
fn fuzz_report(r: &FuzzRun, status: std::process::ExitStatus, work: &Path) -> Result<()> {
    let t = &r.target;
    let out = std::fs::read_to_string(&r.log_path).unwrap_or_default();
    let stat = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    if !status.success() {
        // The panic (or sanitizer report) and libFuzzer's summary; the
        // rest is in the log.
        let lines: Vec<&str> = out.lines().collect();
        let mut shown = 0;
        for (i, l) in lines.iter().enumerate() {
            if l.contains("panicked at") || l.contains("ERROR: ") || l.starts_with("SUMMARY:") {
                eprintln!("  {l}");
                if l.contains("panicked at") {
                    if let Some(msg) = lines.get(i + 1) {
                        eprintln!("  {msg}");
                    }
                }
                shown += 1;
            }
        }
        if shown == 0 {
            for l in &lines[lines.len().saturating_sub(20)..] {
                eprintln!("  {l}");
            }
        }
        let artifact = out
            .lines()
            .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()))
            .unwrap_or("(none written: see the log)");
        // An input that crashed before and is kept as a regression.
        let known = std::fs::read(artifact).ok().and_then(|a| {
            std::fs::read_dir(&r.regressions)
                .ok()?
                .flatten()
                .find(|e| std::fs::read(e.path()).ok().as_ref() == Some(&a))
                .map(|e| e.path())
        });
        if let Some(k) = known {
            eprintln!("xtask: that input is the regression {}", k.display());
        }
        bail!(
            "fuzz target {t} failed ({status}) after {:.0} s; input: {artifact}; log: {}\n\
             reproduce: cargo +{n} fuzz run --fuzz-dir fuzz --target-dir {w} {t} {artifact}\n\
             minimise:  cargo +{n} fuzz tmin --fuzz-dir fuzz --target-dir {w} {t} {artifact}",
            r.started.elapsed().as_secs_f64(),
            r.log_path.display(),
            n = setup::PINNED_NIGHTLY,
            w = work.display(),
        );
    }
    match (
        stat("stat::number_of_executed_units:"),
        stat("stat::average_exec_per_sec:"),
    ) {
        (Some(n), Some(rate)) => println!(
            "xtask: fuzz {t}: ok, {n} execs in {:.0} s ({rate}/s), {} new corpus inputs, peak RSS {} MiB",
            r.started.elapsed().as_secs_f64(),
            stat("stat::new_units_added:").unwrap_or(0),
            stat("stat::peak_rss_mb:").unwrap_or(0),
        ),
        _ => println!(
            "xtask: fuzz {t}: ok in {:.0} s (no libFuzzer stats in {})",
            r.started.elapsed().as_secs_f64(),
            r.log_path.display()
        ),
    }
    Ok(())
}

/// Builds the fuzz targets once, then runs each for `secs` seconds on its
/// grown corpus (target/fuzz/corpus/T), the committed seeds (fuzz/corpus/T)
/// and the regressions (fuzz/regressions/T), `jobs` targets at a time
/// (each libFuzzer process uses one core). Prints each target's execs; a
/// crash, leak, timeout or out-of-memory fails the run, naming the target
/// and the input libFuzzer saved (the targets already running finish).
fn fuzz_run(root: &Path, targets: &[String], secs: u64, jobs: usize) -> Result<()> {
    for t in targets {
        if !FUZZ_TARGETS.contains(&t.as_str()) {
            bail!("no fuzz target {t:?}; they are {}", FUZZ_TARGETS.join(", "));
        }
    }
    let t0 = std::time::Instant::now();
    println!(
        "xtask: building the fuzz targets (cargo fuzz build, {})",
        setup::PINNED_NIGHTLY
    );
    run_cmd(&mut cargo_fuzz(root, "build"))?;
    let built = t0.elapsed().as_secs_f64();
    if secs == 0 {
        println!("xtask: fuzz targets built in {built:.0} s (--secs 0: not running them)");
        return Ok(());
    }
    let work = target_dir().join("fuzz");
    std::fs::create_dir_all(work.join("logs"))?;
    let mut queue: std::collections::VecDeque<&String> = targets.iter().collect();
    let mut running: Vec<FuzzRun> = Vec::new();
    let mut failures: Vec<anyhow::Error> = Vec::new();
    while !queue.is_empty() || !running.is_empty() {
        while running.len() < jobs.max(1) && failures.is_empty() {
            let Some(t) = queue.pop_front() else { break };
            match fuzz_start(root, &work, t, secs) {
                Ok(r) => running.push(r),
                Err(e) => failures.push(e.context(format!("fuzz target {t} did not start"))),
            }
        }
        if running.is_empty() {
            break;
        }
        // Wait for one to end: each ends by itself after `secs` (or at a
        // crash), so this polls the children's state, not the clock.
        let mut ended = None;
        while ended.is_none() {
            for (i, r) in running.iter_mut().enumerate() {
                if let Some(status) = r.child.try_wait()? {
                    ended = Some((i, status));
                    break;
                }
            }
            if ended.is_none() {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let Some((i, status)) = ended else { continue };
        let r = running.swap_remove(i);
        if let Err(e) = fuzz_report(&r, status, &work) {
            failures.push(e);
        }
    }
    if !failures.is_empty() {
        let mut all: Vec<String> = failures.iter().map(|e| format!("{e:#}")).collect();
        if !queue.is_empty() {
            let rest: Vec<&str> = queue.iter().map(|t| t.as_str()).collect();
            all.push(format!("not run after that: {}", rest.join(", ")));
        }
        bail!("{}", all.join("\n"));
    }
    println!(
        "xtask: fuzzing done in {:.0} s ({built:.0} s of it building)",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
