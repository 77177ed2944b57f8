//! `cargo xtask vm-test`: run our integration-test binaries inside stock Debian
//! kernels under qemu.
//!
//! The guest is initramfs-only (the stock kernels have no 9p): a newc cpio that
//! holds busybox-static, every binary we run (under `/bin/<name>`), the shared
//! libraries `ldd` lists for them (at the same absolute paths) and a generated
//! `/init` script. The init mounts the pseudo filesystems, prints the kernel
//! release and the active LSMs, runs the optional pre-commands and then each
//! test binary (`--test-threads=1` plus the filter), printing one
//! `GOVERNOR-VM-RESULT <label> <exit code>` marker per step, then
//! `GOVERNOR-VM-DONE`, and powers off.
//!
//! The harness streams the serial console live (prefixed `[6.1] `), and passes
//! only when it saw every step's marker with code 0 and the DONE marker. A
//! hang (timeout), a kernel panic, qemu dying early or a missing marker fail.
//!
//! Kernels are `apt-get download`ed once and cached under
//! `<target>/vm/kernels/<6.1|6.12>/` (delete that directory to refresh).
//! Acceleration: TCG unless a probe boot with `-accel kvm` proved that KVM works
//! for that kernel on this host (verdict cached in `<target>/vm/kvm-probe-*.json`);
//! `GOVERNOR_VM_ACCEL=tcg|kvm` overrides.

use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Per-guest timeout used by `VmOptions::default()`: TCG is slow.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15 * 60);

const MARK_KERNEL: &str = "GOVERNOR-VM-KERNEL ";
const MARK_LSM: &str = "GOVERNOR-VM-LSM ";
const MARK_RESULT: &str = "GOVERNOR-VM-RESULT ";
const MARK_DONE: &str = "GOVERNOR-VM-DONE";
const MARK_STEP: &str = "==> ";
const TAIL_LINES: usize = 50;
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long qemu may take to exit after the guest printed DONE (poweroff -f).
const POWEROFF_GRACE: Duration = Duration::from_secs(30);
/// How long we keep reading after a kernel panic (qemu exits by itself: panic=-1, -no-reboot).
const PANIC_GRACE: Duration = Duration::from_secs(10);
const KERNEL_CMDLINE: &str =
    "console=ttyS0 quiet panic=-1 lsm=lockdown,capability,landlock,yama,bpf";

/// A stock Debian (bookworm) cloud kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum KernelChoice {
    /// `linux-image-cloud-amd64` (bookworm, 6.1.x).
    V6_1,
    /// `linux-image-6.12-cloud-amd64` (bookworm-security, 6.12.x).
    V6_12,
}

impl KernelChoice {
    pub const ALL: [KernelChoice; 2] = [KernelChoice::V6_1, KernelChoice::V6_12];

    pub fn label(self) -> &'static str {
        match self {
            KernelChoice::V6_1 => "6.1",
            KernelChoice::V6_12 => "6.12",
        }
    }

    /// The Debian metapackage that tracks this kernel line.
    fn meta_package(self) -> &'static str {
        match self {
            KernelChoice::V6_1 => "linux-image-cloud-amd64",
            KernelChoice::V6_12 => "linux-image-6.12-cloud-amd64",
        }
    }
}

impl fmt::Display for KernelChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// Parses `--kernel`: "6.1", "6.12", "all", or a comma list ("6.1,6.12").
pub fn parse_kernel_arg(s: &str) -> Result<Vec<KernelChoice>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim) {
        let choices: &[KernelChoice] = match part {
            "6.1" => &[KernelChoice::V6_1],
            "6.12" => &[KernelChoice::V6_12],
            "all" => &KernelChoice::ALL,
            other => bail!("unknown kernel {other:?}: expected 6.1, 6.12 or all"),
        };
        for c in choices {
            if !out.contains(c) {
                out.push(*c);
            }
        }
    }
    Ok(out)
}

/// One libtest binary to run in the guest, with what to run of it and how
/// long it may take.
#[derive(Clone, Debug)]
pub struct TestBinary {
    pub path: PathBuf,
    /// libtest arguments after `--test-threads=1` (test names, `--exact`);
    /// replaced by [`VmOptions::filter`] when that is set.
    pub args: Vec<String>,
    /// Its own time budget: a hang fails naming this binary and the test
    /// that was running, instead of eating the whole guest's timeout.
    pub budget: Duration,
}

#[derive(Clone, Debug)]
pub struct VmOptions {
    /// Kernels to boot, one guest each, in order.
    pub kernels: Vec<KernelChoice>,
    /// libtest binaries; each runs as `/bin/<file name> --test-threads=1 <args...>`.
    pub test_binaries: Vec<TestBinary>,
    /// Other binaries to include (e.g. the `governor` binary). Each lands in
    /// `/bin/<file name>` and also at its own absolute host path, so
    /// `env!("CARGO_BIN_EXE_...")` paths compiled into tests resolve in the guest.
    pub extra_binaries: Vec<PathBuf>,
    /// Commands run before the tests (argv; argv[0] is looked up in PATH=/bin:...).
    /// Each gets its own result marker and must exit 0.
    pub pre_commands: Vec<Vec<String>>,
    /// Passed to every test binary after `--test-threads=1` (libtest filters or flags
    /// such as `--exact`, `--nocapture`).
    pub filter: Vec<String>,
    /// Per guest: from qemu start to the DONE marker.
    pub timeout: Duration,
    /// Cargo's target directory; state lives under `<target_dir>/vm/`.
    pub target_dir: PathBuf,
}

impl Default for VmOptions {
    fn default() -> Self {
        VmOptions {
            kernels: KernelChoice::ALL.to_vec(),
            test_binaries: Vec::new(),
            extra_binaries: Vec::new(),
            pre_commands: Vec::new(),
            filter: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            target_dir: PathBuf::from("target"),
        }
    }
}

/// Builds the workspace's test binaries without running them and returns their
/// paths: `cargo test --no-run --message-format=json-render-diagnostics <args>`
/// run in `workspace_root` (e.g. args = ["--workspace"] or ["-p", "tests"]).
pub fn build_test_binaries(workspace_root: &Path, cargo_args: &[String]) -> Result<Vec<PathBuf>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(&cargo)
        .current_dir(workspace_root)
        .args([
            "test",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .args(cargo_args)
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed ({})", out.status);
    }
    let mut bins = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        if let Some(exe) = msg["executable"].as_str() {
            let p = PathBuf::from(exe);
            if !bins.contains(&p) {
                bins.push(p);
            }
        }
    }
    Ok(bins)
}

/// Boots each chosen kernel and runs the binaries inside; Err unless every
/// guest reported every step with exit code 0.
pub fn vm_test(opts: &VmOptions) -> Result<()> {
    if opts.kernels.is_empty() {
        bail!("vm-test: no kernel chosen");
    }
    if opts.test_binaries.is_empty() && opts.pre_commands.is_empty() {
        bail!("vm-test: nothing to run (no test binaries and no commands)");
    }
    check_tools()?;
    let target = std::path::absolute(&opts.target_dir)
        .with_context(|| format!("resolving {}", opts.target_dir.display()))?;
    let vm_dir = target.join("vm");
    fs::create_dir_all(&vm_dir).with_context(|| format!("creating {}", vm_dir.display()))?;

    let t0 = Instant::now();
    let spec = InitSpec::from_options(opts)?;
    let initramfs = build_initramfs(&vm_dir.join("initramfs"), &spec)?;
    println!(
        "vm-test: initramfs {} ({} MiB, {} binaries, {} steps) built in {:.1} s",
        initramfs.path.display(),
        initramfs.size / (1 << 20),
        spec.binaries.len(),
        spec.steps.len(),
        t0.elapsed().as_secs_f64()
    );

    let mut kernels = opts.kernels.clone();
    kernels.dedup();
    let mut failures = Vec::new();
    for choice in kernels {
        let res = ensure_kernel(&vm_dir, choice)
            .and_then(|k| {
                let accel = choose_accel(&vm_dir, choice, &k)?;
                run_on_kernel(choice, &k, accel, &initramfs, &spec, opts.timeout)
            })
            .with_context(|| format!("vm-test {choice}"));
        match res {
            Ok(summary) => println!("{summary}"),
            Err(e) => {
                println!("vm-test {choice}: FAILED");
                failures.push(e);
            }
        }
    }
    match failures.len() {
        0 => Ok(()),
        1 => Err(failures.pop().unwrap()),
        n => {
            let all: Vec<String> = failures.iter().map(|e| format!("{e:#}")).collect();
            Err(anyhow!(
                "vm-test failed on {n} kernels:\n\n{}",
                all.join("\n\n")
            ))
        }
    }
}

// ---------------------------------------------------------------------------
// Host tools

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn check_tools() -> Result<()> {
    let needed = [
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("busybox", "busybox-static"),
        ("cpio", "cpio"),
        ("zstd", "zstd"),
        ("ldd", "libc-bin"),
        ("apt-get", "apt"),
        ("apt-cache", "apt"),
        ("dpkg-deb", "dpkg"),
    ];
    let missing: Vec<String> = needed
        .iter()
        .filter(|(tool, _)| find_in_path(tool).is_none())
        .map(|(tool, pkg)| format!("{tool} (package {pkg})"))
        .collect();
    if !missing.is_empty() {
        bail!(
            "vm-test needs {}: run `cargo xtask setup`",
            missing.join(", ")
        );
    }
    Ok(())
}

fn busybox_path() -> Result<PathBuf> {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| find_in_path("busybox"))
        .ok_or_else(|| {
            anyhow!("busybox not found (package busybox-static): run `cargo xtask setup`")
        })
}

fn run_checked(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status})");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Kernels

struct KernelImage {
    vmlinuz: PathBuf,
    /// From the file name, e.g. "6.1.0-56-cloud-amd64".
    release: String,
    /// e.g. "linux-image-6.1.0-56-cloud-amd64 6.1.192-2" (from the cached .deb name).
    package: String,
}

fn find_prefixed(dir: &Path, prefix: &str, suffix: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(suffix) && p.is_file())
        })
        .collect();
    found.sort();
    found.pop()
}

fn ensure_kernel(vm_dir: &Path, choice: KernelChoice) -> Result<KernelImage> {
    let dir = vm_dir.join("kernels").join(choice.label());
    if find_prefixed(&dir, "vmlinuz-", "").is_none() {
        download_kernel(&dir, choice)?;
    }
    let vmlinuz = find_prefixed(&dir, "vmlinuz-", "")
        .ok_or_else(|| anyhow!("no vmlinuz-* in {} after download", dir.display()))?;
    let release = vmlinuz.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_string();
    let package = find_prefixed(&dir, "linux-image-", ".deb")
        .and_then(|deb| {
            let name = deb.file_name()?.to_str()?.to_string();
            let mut parts = name.trim_end_matches(".deb").split('_');
            let pkg = parts.next()?.to_string();
            let ver = parts.next()?.replace("%3a", ":");
            Some(format!("{pkg} {ver}"))
        })
        .unwrap_or_else(|| "unknown package".into());
    Ok(KernelImage {
        vmlinuz,
        release,
        package,
    })
}

/// `apt-cache depends <meta>` → the real `linux-image-<release>` package.
fn resolve_kernel_package(meta: &str) -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["depends", meta])
        .output()
        .context("running apt-cache depends")?;
    if !out.status.success() {
        bail!(
            "apt-cache depends {meta} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let dep = text
        .lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(|d| d.trim().trim_start_matches('<').trim_end_matches('>'))
        .find(|d| d.starts_with("linux-image-"))
        .ok_or_else(|| anyhow!("apt-cache depends {meta}: no linux-image-* dependency"))?;
    Ok(dep.to_string())
}

fn apt_get_update() -> Result<()> {
    println!("vm-test: refreshing apt lists (apt-get update)");
    run_checked(Command::new("apt-get").args(["update", "-qq"]))
}

fn download_kernel(dir: &Path, choice: KernelChoice) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let meta = choice.meta_package();
    let attempt = |dir: &Path| -> Result<String> {
        let pkg = resolve_kernel_package(meta)?;
        println!(
            "vm-test {choice}: downloading {pkg} (via {meta}) into {}",
            dir.display()
        );
        run_checked(
            Command::new("apt-get")
                .args(["download", "-q", &pkg])
                .current_dir(dir),
        )?;
        Ok(pkg)
    };
    // Stale apt lists are the usual cause of failure: refresh once and retry.
    let pkg = match attempt(dir) {
        Ok(p) => p,
        Err(first) => {
            println!("vm-test {choice}: {first:#}; retrying after apt-get update");
            apt_get_update().context("apt-get update (try `cargo xtask setup`)")?;
            attempt(dir).with_context(|| format!("downloading the {choice} kernel ({meta})"))?
        }
    };
    let deb = find_prefixed(dir, &format!("{pkg}_"), ".deb").ok_or_else(|| {
        anyhow!(
            "apt-get download {pkg} left no {pkg}_*.deb in {}",
            dir.display()
        )
    })?;
    // Drop older downloads of other versions.
    for entry in fs::read_dir(dir)?.flatten() {
        let p = entry.path();
        if p != deb && p.extension().is_some_and(|e| e == "deb") {
            let _ = fs::remove_file(&p);
        }
    }
    let extract = dir.join("extract.tmp");
    let _ = fs::remove_dir_all(&extract);
    run_checked(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extract))?;
    let boot = extract.join("boot");
    let src = find_prefixed(&boot, "vmlinuz-", "")
        .ok_or_else(|| anyhow!("{} holds no boot/vmlinuz-*", deb.display()))?;
    let name = src.file_name().unwrap().to_string_lossy().into_owned();
    let release = &name["vmlinuz-".len()..];
    let want = format!("{}.", choice.label());
    if !release.starts_with(&want) {
        let _ = fs::remove_dir_all(&extract);
        bail!(
            "{meta} now resolves to kernel {release}, not {}.x; update KernelChoice",
            choice.label()
        );
    }
    if let Some(config) = find_prefixed(&boot, "config-", "") {
        fs::copy(&config, dir.join(config.file_name().unwrap()))?;
    }
    // Copy under a temporary name, then rename: a half-written vmlinuz must never
    // count as cached.
    let tmp = dir.join(".vmlinuz.tmp");
    fs::copy(&src, &tmp).with_context(|| format!("copying {}", src.display()))?;
    fs::rename(&tmp, dir.join(&name))?;
    fs::remove_dir_all(&extract)?;
    println!("vm-test {choice}: cached {}", dir.join(&name).display());
    Ok(())
}

/// The per-binary time table of one guest, printed whatever the outcome.
fn print_timings(
    choice: KernelChoice,
    spec: &InitSpec,
    timings: &HashMap<String, (f64, Option<String>)>,
    current: Option<&str>,
    current_started: Instant,
    total: Duration,
) {
    println!("vm-test {choice}: time per step (budget)");
    let mut sum = 0.0;
    for step in &spec.steps {
        // Test binaries without cargo's hash suffix.
        let shown = match step.label.rsplit_once('-') {
            Some((name, hash))
                if step.kind == StepKind::Test && hash.chars().all(|c| c.is_ascii_hexdigit()) =>
            {
                name
            }
            _ => step.label.as_str(),
        };
        match timings.get(&step.label) {
            Some((secs, _)) => {
                sum += secs;
                println!(
                    "  {shown:<24} {secs:>7.1} s  ({:>4} s, {:>3.0}%)",
                    step.budget.as_secs(),
                    100.0 * secs / step.budget.as_secs_f64()
                );
            }
            None if current == Some(step.label.as_str()) => println!(
                "  {shown:<24} {:>7.1} s  ({:>4} s) still running",
                current_started.elapsed().as_secs_f64(),
                step.budget.as_secs()
            ),
            None => println!(
                "  {shown:<24}       —  ({:>4} s) not reached",
                step.budget.as_secs()
            ),
        }
    }
    println!(
        "  {:<24} {sum:>7.1} s  of {:.1} s in the guest (boot and poweroff included)",
        "steps",
        total.as_secs_f64()
    );
}

// ---------------------------------------------------------------------------
// Initramfs

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum StepKind {
    Command,
    Test,
}

struct Step {
    /// Unique, no whitespace: appears in the marker line.
    label: String,
    argv: Vec<String>,
    kind: StepKind,
    /// Killed (SIGKILL, exit 137) when it runs longer.
    budget: Duration,
}

struct InitSpec {
    /// (host path, also mirror at its absolute host path)
    binaries: Vec<(PathBuf, bool)>,
    steps: Vec<Step>,
}

fn sanitize_label(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._+-:".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl InitSpec {
    fn from_options(opts: &VmOptions) -> Result<InitSpec> {
        let mut binaries = Vec::new();
        let mut names = BTreeSet::new();
        let mut add = |p: &Path, mirror: bool| -> Result<String> {
            let abs = std::path::absolute(p)?;
            if !abs.is_file() {
                bail!("binary {} not found", abs.display());
            }
            let name = abs
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| anyhow!("bad binary name {}", abs.display()))?
                .to_string();
            if name == "busybox" || name == "init" || name.contains(char::is_whitespace) {
                bail!("binary name {name:?} is reserved or unusable in the guest");
            }
            if !names.insert(name.clone()) {
                bail!("two binaries named {name:?}: the guest keeps them all in /bin");
            }
            binaries.push((abs, mirror));
            Ok(name)
        };
        for p in &opts.extra_binaries {
            add(p, true)?;
        }
        let mut steps = Vec::new();
        for (i, argv) in opts.pre_commands.iter().enumerate() {
            let first = argv
                .first()
                .ok_or_else(|| anyhow!("empty pre-command #{}", i + 1))?;
            let base = Path::new(first)
                .file_name()
                .map(|s| s.to_string_lossy().into_owned());
            let mut label = format!("cmd{}", i + 1);
            for a in base.iter().chain(argv.get(1)) {
                label.push('-');
                label.push_str(&sanitize_label(a));
            }
            steps.push(Step {
                label,
                argv: argv.clone(),
                kind: StepKind::Command,
                // Commands (doctor, the benchmarks) are bounded by the
                // guest's own timeout, which fires first.
                budget: opts.timeout + Duration::from_secs(60),
            });
        }
        for t in &opts.test_binaries {
            let name = add(&t.path, false)?;
            let mut argv = vec![format!("/bin/{name}"), "--test-threads=1".to_string()];
            if opts.filter.is_empty() {
                argv.extend(t.args.iter().cloned());
            } else {
                argv.extend(opts.filter.iter().cloned());
            }
            steps.push(Step {
                label: sanitize_label(&name),
                argv,
                kind: StepKind::Test,
                budget: t.budget,
            });
        }
        Ok(InitSpec { binaries, steps })
    }
}

struct Initramfs {
    path: PathBuf,
    size: u64,
}

fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn init_script(steps: &[Step]) -> String {
    let mut s = String::from(
        r#"#!/bin/busybox sh
# Generated by xtask vm-test.
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s
m() { mkdir -p "$3" && mount -t "$1" "$2" "$3" || echo "GOVERNOR-VM-WARN cannot mount $1 on $3"; }
m sysfs sysfs /sys
m devpts devpts /dev/pts
# Keep initramfs content (binaries mirrored at their host paths) visible.
t() { if [ -n "$(ls -A "$1" 2>/dev/null)" ]; then echo "GOVERNOR-VM-NOTE $1 holds initramfs files: no tmpfs over it"; else m tmpfs tmpfs "$1"; fi; }
t /tmp
t /run
m securityfs securityfs /sys/kernel/security
m tracefs tracefs /sys/kernel/tracing
m debugfs debugfs /sys/kernel/debug
m bpf bpf /sys/fs/bpf
m cgroup2 cgroup2 /sys/fs/cgroup
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root GOVERNOR_IN_VM=1 RUST_BACKTRACE=1
cd /root
hostname governor-vm
# Loopback only (-nic none): tests talk to local stand-ins, e.g. the Bot API.
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up || echo "GOVERNOR-VM-WARN no loopback"
echo "GOVERNOR-VM-KERNEL $(uname -r)"
echo "GOVERNOR-VM-LSM $(cat /sys/kernel/security/lsm)"
"#,
    );
    for step in steps {
        let argv: Vec<String> = step.argv.iter().map(|a| sh_quote(a)).collect();
        s.push_str(&format!("echo \"{MARK_STEP}{}\"\n", step.label));
        s.push_str(&format!(
            "timeout -s KILL {} ",
            step.budget.as_secs().max(1)
        ));
        s.push_str(&argv.join(" "));
        s.push('\n');
        s.push_str(&format!("echo \"{MARK_RESULT}{} $?\"\n", step.label));
    }
    s.push_str(&format!(
        "echo {MARK_DONE}\npoweroff -f\necho o > /proc/sysrq-trigger\nsleep 10\n"
    ));
    s
}

/// Shared libraries (and the dynamic loader) that `ldd` lists for `bin`.
fn ldd_libs(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stdout.contains("not a dynamic executable")
            || stderr.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        bail!("ldd {} failed: {}", bin.display(), stderr.trim());
    }
    let mut libs = Vec::new();
    for line in stdout.lines().map(str::trim) {
        let path = match line.split_once("=>") {
            Some((name, rhs)) => {
                let rhs = rhs.trim();
                if rhs.starts_with("not found") {
                    bail!(
                        "{}: shared library {} not found on the host",
                        bin.display(),
                        name.trim()
                    );
                }
                rhs.split_whitespace().next().unwrap_or("")
            }
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}

fn copy_into(root: &Path, host: &Path, guest: &Path, mode: u32) -> Result<()> {
    let dest = root.join(guest.strip_prefix("/").unwrap_or(guest));
    if dest.exists() {
        return Ok(());
    }
    if let Some(parent) = dest.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(host, &dest)
        .with_context(|| format!("copying {} into the initramfs", host.display()))?;
    fs::set_permissions(&dest, fs::Permissions::from_mode(mode))?;
    // Debug builds are mostly DWARF: dropping it (symbols stay, so guest
    // backtraces still name functions) shrinks the initramfs ~5× and the
    // guest's boot with it. Best effort: an unstripped copy works too.
    if mode & 0o111 != 0 {
        let _ = Command::new("strip")
            .arg("--strip-debug")
            .arg(&dest)
            .stderr(Stdio::null())
            .status();
    }
    Ok(())
}

fn build_initramfs(dir: &Path, spec: &InitSpec) -> Result<Initramfs> {
    let root = dir.join("root");
    if root.exists() {
        fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
    }
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "run", "root", "etc",
    ] {
        fs::create_dir_all(root.join(d))?;
    }
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    fs::write(root.join("etc/group"), "root:x:0:\n")?;

    let busybox = busybox_path()?;
    let mut bins = vec![(busybox, PathBuf::from("/bin/busybox"), false)];
    for (host, mirror) in &spec.binaries {
        let name = host.file_name().unwrap();
        bins.push((host.clone(), Path::new("/bin").join(name), *mirror));
    }
    let mut libs = BTreeSet::new();
    for (host, guest, mirror) in &bins {
        copy_into(&root, host, guest, 0o755)?;
        if *mirror && host.starts_with("/") && !host.starts_with("/bin") {
            let mirrored = root.join(host.strip_prefix("/").unwrap());
            if !mirrored.exists() {
                fs::create_dir_all(mirrored.parent().unwrap())?;
                fs::hard_link(root.join(guest.strip_prefix("/").unwrap()), &mirrored)?;
            }
        }
        libs.extend(ldd_libs(host)?);
    }
    for lib in &libs {
        copy_into(&root, lib, lib, 0o755)?;
    }
    let init = root.join("init");
    fs::write(&init, init_script(&spec.steps))?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;

    // File list for cpio: every path under root, parents before children.
    let mut list = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let mut entries: Vec<_> = fs::read_dir(root.join(&rel))?.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries.into_iter().rev() {
            let child = rel.join(e.file_name());
            if e.file_type()?.is_dir() {
                stack.push(child.clone());
            }
            list.push(child);
        }
    }
    let mut names = Vec::new();
    for p in &list {
        names.extend_from_slice(p.as_os_str().as_encoded_bytes());
        names.push(b'\n');
    }
    let out_path = dir.join("initramfs.cpio");
    let out =
        fs::File::create(&out_path).with_context(|| format!("creating {}", out_path.display()))?;
    let mut cpio = Command::new("cpio")
        .args(["-o", "-H", "newc", "-R", "0:0", "--quiet"])
        .current_dir(&root)
        .stdin(Stdio::piped())
        .stdout(out)
        .spawn()
        .context("running cpio")?;
    cpio.stdin.take().unwrap().write_all(&names)?;
    let status = cpio.wait()?;
    if !status.success() {
        bail!("cpio failed ({status})");
    }
    let size = fs::metadata(&out_path)?.len();
    Ok(Initramfs {
        path: out_path,
        size,
    })
}

// ---------------------------------------------------------------------------
// Acceleration

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Accel {
    Tcg,
    Kvm,
}

impl Accel {
    fn args(self) -> [&'static str; 4] {
        match self {
            Accel::Tcg => ["-accel", "tcg,thread=multi", "-cpu", "max"],
            Accel::Kvm => ["-accel", "kvm", "-cpu", "host"],
        }
    }
    fn name(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }
}

fn kvm_usable() -> bool {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn choose_accel(vm_dir: &Path, choice: KernelChoice, kernel: &KernelImage) -> Result<Accel> {
    match std::env::var("GOVERNOR_VM_ACCEL").ok().as_deref() {
        Some("tcg") => return Ok(Accel::Tcg),
        Some("kvm") => return Ok(Accel::Kvm),
        None | Some("") => {}
        Some(other) => bail!("GOVERNOR_VM_ACCEL={other:?}: expected tcg or kvm"),
    }
    if !kvm_usable() {
        return Ok(Accel::Tcg);
    }
    let host = fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string();
    let cache = vm_dir.join(format!("kvm-probe-{}.json", choice.label()));
    if let Ok(text) = fs::read_to_string(&cache) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            if v["host_kernel"] == host.as_str() && v["guest_kernel"] == kernel.release.as_str() {
                if let Some(works) = v["kvm_works"].as_bool() {
                    return Ok(if works { Accel::Kvm } else { Accel::Tcg });
                }
            }
        }
    }
    let t0 = Instant::now();
    let (works, why) = probe_kvm(vm_dir, kernel)?;
    println!(
        "vm-test {choice}: KVM probe {} in {:.1} s ({why}); verdict cached in {}",
        if works { "passed" } else { "failed" },
        t0.elapsed().as_secs_f64(),
        cache.display()
    );
    let verdict = serde_json::json!({
        "host_kernel": host,
        "guest_kernel": kernel.release,
        "kvm_works": works,
        "detail": why,
    });
    fs::write(&cache, serde_json::to_string_pretty(&verdict)?)?;
    Ok(if works { Accel::Kvm } else { Accel::Tcg })
}

/// Boots `kernel` with -accel kvm and a trivial init; true when the init's DONE
/// marker appears before the timeout.
fn probe_kvm(vm_dir: &Path, kernel: &KernelImage) -> Result<(bool, String)> {
    let initramfs = build_initramfs(
        &vm_dir.join("probe"),
        &InitSpec {
            binaries: Vec::new(),
            steps: Vec::new(),
        },
    )?;
    let cmd = qemu_command(Accel::Kvm, kernel, &initramfs);
    let mut done = false;
    let mut error = None;
    let outcome = run_qemu(cmd, "", false, KVM_PROBE_TIMEOUT, |line, _is_err| {
        if line.contains(MARK_DONE) {
            done = true;
            return Control::Finish(Duration::from_secs(5));
        }
        if line.contains("KVM internal error")
            || line.contains("Kernel panic")
            || line.contains("failed to initialize kvm")
        {
            error = Some(line.trim().to_string());
            return Control::Kill;
        }
        Control::Continue
    })?;
    let why = if done {
        "guest booted".to_string()
    } else if let Some(e) = error {
        e
    } else if outcome.timed_out {
        format!("no marker within {} s", KVM_PROBE_TIMEOUT.as_secs())
    } else {
        format!(
            "qemu exited ({}) without the marker",
            describe_status(outcome.status)
        )
    };
    Ok((done, why))
}

// ---------------------------------------------------------------------------
// Running qemu

fn qemu_command(accel: Accel, kernel: &KernelImage, initramfs: &Initramfs) -> Command {
    // The initramfs is unpacked into RAM next to its own buffer: leave room.
    let mem_mb = 1024u64.max(768 + 3 * initramfs.size / (1 << 20));
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(accel.args())
        .args(["-smp", "2", "-m", &mem_mb.to_string()])
        // Not -nographic: with it SeaBIOS writes terminal resets (ESC c) to the serial port.
        .args([
            "-display", "none", "-vga", "none", "-serial", "stdio", "-monitor", "none",
        ])
        .args(["-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&initramfs.path)
        .args(["-append", KERNEL_CMDLINE]);
    cmd
}

enum Control {
    Continue,
    /// The guest is finishing: give qemu this long to exit on its own, then kill it.
    Finish(Duration),
    /// Kill qemu now.
    Kill,
}

struct Outcome {
    status: Option<ExitStatus>,
    /// The overall timeout expired (not a Finish grace period).
    timed_out: bool,
    tail: VecDeque<String>,
}

fn describe_status(s: Option<ExitStatus>) -> String {
    s.map(|s| s.to_string()).unwrap_or_else(|| "killed".into())
}

/// Kills and reaps qemu if we leave early.
struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

enum Chunk {
    Out(Vec<u8>),
    Err(Vec<u8>),
}

fn spawn_reader(mut r: impl Read + Send + 'static, tx: mpsc::Sender<Chunk>, is_err: bool) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let data = buf[..n].to_vec();
                    let msg = if is_err {
                        Chunk::Err(data)
                    } else {
                        Chunk::Out(data)
                    };
                    if tx.send(msg).is_err() {
                        break;
                    }
                }
            }
        }
    });
}

/// Runs qemu, echoing its console (when `echo`) with `prefix` at each line start,
/// live (partial lines included: a hung test shows its `test foo ... ` line).
/// Every complete line (stdout and stderr, '\r' removed) goes to `on_line`.
fn run_qemu(
    mut cmd: Command,
    prefix: &str,
    echo: bool,
    timeout: Duration,
    mut on_line: impl FnMut(&str, bool) -> Control,
) -> Result<Outcome> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel();
    spawn_reader(child.stdout.take().unwrap(), tx.clone(), false);
    spawn_reader(child.stderr.take().unwrap(), tx, true);
    let mut guard = ChildGuard(Some(child));

    let start = Instant::now();
    let mut deadline = start + timeout;
    let mut finishing = false;
    let mut timed_out = false;
    let mut killed = false;
    let mut tail = VecDeque::with_capacity(TAIL_LINES + 1);
    let mut out_line = Vec::new();
    let mut err_line = Vec::new();
    let mut at_line_start = true;
    let stdout = std::io::stdout();

    let mut handle_line = |bytes: &[u8], is_err: bool, tail: &mut VecDeque<String>| -> Control {
        let line = String::from_utf8_lossy(bytes).into_owned();
        let ctl = on_line(&line, is_err);
        tail.push_back(if is_err {
            format!("qemu: {line}")
        } else {
            line
        });
        if tail.len() > TAIL_LINES {
            tail.pop_front();
        }
        ctl
    };

    loop {
        let now = Instant::now();
        let wait = deadline.saturating_duration_since(now);
        let chunk = match rx.recv_timeout(wait) {
            Ok(c) => c,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if killed {
                    break; // qemu killed but its pipes are still open: give up reading
                }
                if !finishing {
                    timed_out = true;
                }
                if let Some(c) = guard.0.as_mut() {
                    let _ = c.kill();
                }
                killed = true;
                deadline = Instant::now() + Duration::from_secs(2);
                continue;
            }
        };
        let mut controls = Vec::new();
        match chunk {
            Chunk::Out(data) => {
                let data: Vec<u8> = data.into_iter().filter(|&b| b != b'\r').collect();
                if echo {
                    let mut o = stdout.lock();
                    for seg in data.split_inclusive(|&b| b == b'\n') {
                        if at_line_start {
                            let _ = o.write_all(prefix.as_bytes());
                        }
                        let _ = o.write_all(seg);
                        at_line_start = seg.ends_with(b"\n");
                    }
                    let _ = o.flush();
                }
                for &b in &data {
                    if b == b'\n' {
                        controls.push(handle_line(&out_line, false, &mut tail));
                        out_line.clear();
                    } else {
                        out_line.push(b);
                    }
                }
            }
            Chunk::Err(data) => {
                for b in data.into_iter().filter(|&b| b != b'\r') {
                    if b != b'\n' {
                        err_line.push(b);
                        continue;
                    }
                    if echo {
                        let mut o = stdout.lock();
                        if !at_line_start {
                            let _ = o.write_all(b"\n");
                            at_line_start = true;
                        }
                        let _ = writeln!(o, "{prefix}qemu: {}", String::from_utf8_lossy(&err_line));
                        let _ = o.flush();
                    }
                    controls.push(handle_line(&err_line, true, &mut tail));
                    err_line.clear();
                }
            }
        }
        for ctl in controls {
            match ctl {
                Control::Continue => {}
                Control::Finish(grace) => {
                    if !finishing {
                        finishing = true;
                        deadline = deadline.min(Instant::now() + grace);
                    }
                }
                Control::Kill => {
                    if !killed {
                        finishing = true;
                        if let Some(c) = guard.0.as_mut() {
                            let _ = c.kill();
                        }
                        killed = true;
                        deadline = Instant::now() + Duration::from_secs(2);
                    }
                }
            }
        }
    }
    if !out_line.is_empty() {
        handle_line(&out_line, false, &mut tail);
    }
    if !err_line.is_empty() {
        handle_line(&err_line, true, &mut tail);
    }
    if echo && !at_line_start {
        println!();
    }
    let mut child = guard.0.take().unwrap();
    if !killed {
        // Pipes closed: qemu is exiting. Don't wait forever on a wedged process.
        let until = Instant::now() + Duration::from_secs(5);
        while child.try_wait()?.is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(50));
        }
        if child.try_wait()?.is_none() {
            let _ = child.kill();
            killed = true;
        }
    }
    let status = child.wait()?;
    Ok(Outcome {
        status: if killed { None } else { Some(status) },
        timed_out,
        tail,
    })
}

fn tail_text(tail: &VecDeque<String>) -> String {
    let mut s = format!("--- last {} console lines ---\n", tail.len());
    for l in tail {
        s.push_str(l);
        s.push('\n');
    }
    s.push_str("--- end of console ---");
    s
}

fn run_on_kernel(
    choice: KernelChoice,
    kernel: &KernelImage,
    accel: Accel,
    initramfs: &Initramfs,
    spec: &InitSpec,
    timeout: Duration,
) -> Result<String> {
    let prefix = format!("[{choice}] ");
    println!(
        "vm-test {choice}: booting {} ({}) with {}, timeout {} s",
        kernel.vmlinuz.display(),
        kernel.package,
        accel.name(),
        timeout.as_secs()
    );
    let cmd = qemu_command(accel, kernel, initramfs);
    let start = Instant::now();
    let mut results: HashMap<String, i32> = HashMap::new();
    let mut done = false;
    let mut panic_line = None;
    let mut current_step: Option<String> = None;
    let mut step_started = Instant::now();
    // label -> (seconds, the test that was running when the result came)
    let mut timings: HashMap<String, (f64, Option<String>)> = HashMap::new();
    let mut running_test: Option<String> = None;
    let mut qemu_error = None;
    let mut guest_release = None;
    let mut guest_lsm = None;
    let mut boot_time = None;
    let outcome = run_qemu(cmd, &prefix, true, timeout, |line, is_err| {
        if is_err {
            if line.contains("KVM internal error") {
                qemu_error = Some(line.trim().to_string());
                return Control::Kill;
            }
            return Control::Continue;
        }
        if let Some(label) = line.strip_prefix(MARK_STEP) {
            current_step = Some(label.trim().to_string());
            step_started = Instant::now();
            running_test = None;
        } else if let Some(i) = line.find(MARK_RESULT) {
            // A test killed mid-line leaves `test NAME ... ` before the marker.
            let before = line[..i].trim();
            if let Some(t) = before.strip_prefix("test ") {
                running_test = Some(t.trim_end_matches(" ...").trim().to_string());
            }
            let mut it = line[i + MARK_RESULT.len()..].split_whitespace();
            if let (Some(label), Some(code), None) = (it.next(), it.next(), it.next()) {
                if let Ok(code) = code.parse::<i32>() {
                    results.entry(label.to_string()).or_insert(code);
                    timings.entry(label.to_string()).or_insert((
                        step_started.elapsed().as_secs_f64(),
                        if code == 0 { None } else { running_test.take() },
                    ));
                }
            }
        } else if let Some(t) = line.trim().strip_prefix("test ") {
            // `test NAME ... ok` ends one; `test NAME ...` (or `... Killed`,
            // the shell's word for the budget's SIGKILL) is still running.
            let (name, rest) = t.split_once(" ...").unwrap_or((t, ""));
            let rest = rest.trim();
            running_test = if name.starts_with("result:")
                || rest == "ok"
                || rest == "FAILED"
                || rest.starts_with("ignored")
            {
                None
            } else {
                Some(name.trim().to_string())
            };
        } else if line.contains(MARK_DONE) {
            if !done {
                done = true;
                return Control::Finish(POWEROFF_GRACE);
            }
        } else if let Some(i) = line.find(MARK_KERNEL) {
            if guest_release.is_none() {
                guest_release = Some(line[i + MARK_KERNEL.len()..].trim().to_string());
                boot_time = Some(start.elapsed());
            }
        } else if let Some(i) = line.find(MARK_LSM) {
            guest_lsm.get_or_insert_with(|| line[i + MARK_LSM.len()..].trim().to_string());
        } else if line.contains("Kernel panic") && !done && panic_line.is_none() {
            panic_line = Some(line.trim().to_string());
            return Control::Finish(PANIC_GRACE);
        }
        Control::Continue
    })?;
    let elapsed = start.elapsed();
    let tail = tail_text(&outcome.tail);

    // What the guest got through before it stopped, for the early-exit errors.
    let progress = {
        let mut parts = Vec::new();
        for step in &spec.steps {
            match results.get(&step.label) {
                Some(code) => parts.push(format!("{}={code}", step.label)),
                None if current_step.as_deref() == Some(step.label.as_str()) => {
                    parts.push(format!("{}=<running>", step.label))
                }
                None => {}
            }
        }
        if parts.is_empty() {
            "no step finished".to_string()
        } else {
            format!("exit codes so far: {}", parts.join(", "))
        }
    };
    print_timings(
        choice,
        spec,
        &timings,
        current_step.as_deref(),
        step_started,
        elapsed,
    );
    if outcome.timed_out {
        bail!(
            "guest timed out after {} s (no {MARK_DONE}); qemu killed; {progress}\n{tail}",
            timeout.as_secs()
        );
    }
    if let Some(e) = qemu_error {
        bail!("qemu failed: {e} (try GOVERNOR_VM_ACCEL=tcg)\n{tail}");
    }
    if let Some(p) = panic_line {
        bail!("kernel panic in the guest: {p}; {progress}\n{tail}");
    }
    if !done {
        bail!(
            "qemu exited ({}) before the guest printed {MARK_DONE}; {progress}\n{tail}",
            describe_status(outcome.status),
        );
    }
    let mut missing = Vec::new();
    let mut failed = Vec::new();
    for step in &spec.steps {
        let (secs, test) = timings.get(&step.label).cloned().unwrap_or((0.0, None));
        let during = test.map(|t| format!(", in test {t}")).unwrap_or_default();
        match results.get(&step.label) {
            None => missing.push(step.label.clone()),
            Some(0) => {}
            Some(137) if secs + 1.0 >= step.budget.as_secs_f64() => failed.push(format!(
                "{} (ran out of its {} s budget{during})",
                step.label,
                step.budget.as_secs()
            )),
            Some(code) => failed.push(format!("{} (exit {code}{during})", step.label)),
        }
    }
    if !missing.is_empty() || !failed.is_empty() {
        let mut msg = String::new();
        if !failed.is_empty() {
            msg.push_str(&format!(
                "{} of {} failed: {}",
                failed.len(),
                spec.steps.len(),
                failed.join(", ")
            ));
        }
        if !missing.is_empty() {
            if !msg.is_empty() {
                msg.push_str("; ");
            }
            msg.push_str(&format!("no result marker for: {}", missing.join(", ")));
        }
        bail!("{msg}\n{tail}");
    }
    if outcome.status.is_none() {
        println!("vm-test {choice}: warning: qemu did not exit after poweroff; killed it");
    }
    let tests = spec
        .steps
        .iter()
        .filter(|s| s.kind == StepKind::Test)
        .count();
    let cmds = spec.steps.len() - tests;
    let mut summary = format!(
        "vm-test {choice} ({}): {tests} binar{} passed",
        guest_release.as_deref().unwrap_or(&kernel.release),
        if tests == 1 { "y" } else { "ies" }
    );
    if cmds > 0 {
        summary.push_str(&format!(
            " (+{cmds} command{})",
            if cmds == 1 { "" } else { "s" }
        ));
    }
    summary.push_str(&format!(" in {:.0} s", elapsed.as_secs_f64()));
    if let Some(b) = boot_time {
        summary.push_str(&format!(
            " (init reached after {:.1} s, {})",
            b.as_secs_f64(),
            accel.name()
        ));
    }
    if let Some(lsm) = guest_lsm {
        summary.push_str(&format!("; lsm={lsm}"));
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("xtask-vm-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn run_guest(name: &str, cmd: &[&str], timeout: Duration) -> Result<()> {
        let dir = scratch(name);
        let opts = VmOptions {
            kernels: vec![KernelChoice::V6_1],
            test_binaries: vec![],
            extra_binaries: vec![],
            pre_commands: vec![cmd.iter().map(|s| s.to_string()).collect()],
            filter: vec![],
            timeout,
            target_dir: dir.clone(),
        };
        let r = vm_test(&opts);
        let _ = fs::remove_dir_all(&dir);
        r
    }

    /// The harness itself, against the real 6.1 kernel: a guest that
    /// finishes passes; one that hangs or panics fails within its timeout,
    /// with the console in the error — never a pass.
    #[test]
    fn hung_or_panicked_guest_is_a_failure() {
        run_guest("ok", &["true"], Duration::from_secs(120)).expect("a clean guest passes");
        let t0 = Instant::now();
        let e = run_guest("hang", &["sleep", "100000"], Duration::from_secs(45))
            .expect_err("a hung guest must fail");
        let msg = format!("{e:#}");
        assert!(msg.contains("timed out"), "{msg}");
        assert!(
            t0.elapsed() < Duration::from_secs(100),
            "reported within its timeout"
        );
        let e = run_guest(
            "panic",
            &["sh", "-c", "echo c > /proc/sysrq-trigger"],
            Duration::from_secs(120),
        )
        .expect_err("a panicked guest must fail");
        let msg = format!("{e:#}");
        assert!(msg.contains("panic"), "{msg}");
        assert!(
            msg.contains("sysrq"),
            "the console tail is in the error: {msg}"
        );
        let e = run_guest("fail", &["sh", "-c", "exit 3"], Duration::from_secs(120))
            .expect_err("a failing step must fail");
        assert!(format!("{e:#}").contains('3'));
    }

    #[test]
    fn kernel_arg() {
        assert_eq!(parse_kernel_arg("6.1").unwrap(), vec![KernelChoice::V6_1]);
        assert_eq!(parse_kernel_arg("6.12").unwrap(), vec![KernelChoice::V6_12]);
        assert_eq!(parse_kernel_arg("all").unwrap(), KernelChoice::ALL.to_vec());
        assert_eq!(
            parse_kernel_arg("6.12,6.1,6.12").unwrap(),
            vec![KernelChoice::V6_12, KernelChoice::V6_1]
        );
        assert!(parse_kernel_arg("5.10").is_err());
        assert!(parse_kernel_arg("").is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
        assert_eq!(sanitize_label("a b/c"), "a_b_c");
    }

    #[test]
    fn init_has_markers() {
        let steps = vec![Step {
            label: "t1".into(),
            argv: vec!["/bin/t1".into(), "x'y".into()],
            kind: StepKind::Test,
            budget: Duration::from_secs(30),
        }];
        let s = init_script(&steps);
        assert!(s.contains("timeout -s KILL 30 '/bin/t1' 'x'\\''y'\n"));
        assert!(s.contains("echo \"GOVERNOR-VM-RESULT t1 $?\""));
        assert!(s.contains("echo GOVERNOR-VM-DONE\npoweroff -f"));
    }
}
