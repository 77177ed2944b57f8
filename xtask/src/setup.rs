//! `cargo xtask setup`: everything a fresh Debian 12 / Ubuntu host needs,
//! installed idempotently. Each step says what it does, and skips itself when
//! its result is already in place.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{bail, Context, Result};

use crate::{run_cmd, workspace_root};

/// The nightly the eBPF crate builds with; it must use LLVM 22 like
/// bpf-linker (see governor/build.rs, which names the same toolchain).
pub const PINNED_NIGHTLY: &str = "nightly-2026-05-20";
pub const BPF_LINKER_VERSION: &str = "0.13.0";
/// pm2 version the tests drive (from npm).
pub const PM2_VERSION: &str = "7.0.4";
/// The official MCP Python SDK the tests drive `governor mcp` with (PyPI).
pub const MCP_PY_VERSION: &str = "2.3.0";
/// cargo-fuzz for the fuzz targets in fuzz/ (run with `PINNED_NIGHTLY`).
pub const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Which parts of the setup a command needs.
pub struct Needs {
    vm: bool,
    pm2: bool,
}

impl Needs {
    pub fn build() -> Self {
        Needs {
            vm: false,
            pm2: false,
        }
    }
    pub fn all() -> Self {
        Needs {
            vm: true,
            pm2: true,
        }
    }
}

fn home_cargo_bin() -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"));
    home.join("bin")
}

/// PATH with ~/.cargo/bin in front, so a just-installed bpf-linker is found.
pub fn path_with_cargo_bin() -> std::ffi::OsString {
    let mut paths = vec![home_cargo_bin()];
    if let Some(p) = std::env::var_os("PATH") {
        paths.extend(std::env::split_paths(&p));
    }
    std::env::join_paths(paths).unwrap_or_default()
}

fn step(what: &str) {
    println!("setup: {what}");
}

fn quiet_ok(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn output(cmd: &mut Command) -> Option<String> {
    let o = cmd.stderr(Stdio::null()).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn check_system() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "cargo xtask setup must run as root: it installs packages, mounts tracefs/bpffs \
             and the tests load eBPF programs. Re-run with sudo (keeping your rustup: \
             `sudo -E env PATH=$PATH cargo xtask ...`)."
        );
    }
    let os = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let field = |k: &str| {
        os.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_default()
    };
    let (id, like) = (field("ID"), field("ID_LIKE"));
    if id != "debian" && id != "ubuntu" && !like.split(' ').any(|l| l == "debian") {
        bail!(
            "unsupported system \"{}\": cargo xtask setup knows Debian 12 and Ubuntu (apt). \
             On other systems install by hand: LLVM 22 dev files, {PINNED_NIGHTLY} with rust-src, \
             bpf-linker {BPF_LINKER_VERSION} (LLVM_PREFIX=<llvm-22> --features llvm-22), qemu-system-x86, \
             busybox-static, cpio, zstd, node + npm.",
            field("PRETTY_NAME")
        );
    }
    if std::env::consts::ARCH != "x86_64" {
        bail!(
            "unsupported architecture {}: governor is built and tested on x86_64",
            std::env::consts::ARCH
        );
    }
    Ok(())
}

fn apt_packages(needs: &Needs) -> Result<()> {
    // python3: the tests write files the way agents do (open('w'), a
    // temp file renamed over).
    let mut pkgs = vec![
        "llvm-22-dev",
        "bpftool",
        "libc6-dev",
        "pkg-config",
        "time",
        "python3",
    ];
    if needs.vm {
        pkgs.extend(["qemu-system-x86", "busybox-static", "cpio", "zstd"]);
    }
    if needs.pm2 {
        // The real clients of governor's interfaces: promtool (metrics),
        // systemd-analyze (the unit), tmux (status --watch), a venv for
        // the MCP Python SDK.
        pkgs.extend(["prometheus", "systemd", "tmux", "python3-venv"]);
        // libFuzzer (C++), built by the fuzz targets' libfuzzer-sys.
        pkgs.push("g++");
    }
    let missing: Vec<&str> = pkgs
        .into_iter()
        .filter(|p| {
            let st = output(Command::new("dpkg-query").args(["-W", "-f=${Status}", p]));
            !st.is_some_and(|s| s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        step("apt packages: all present, skipping");
        return Ok(());
    }
    step(&format!("apt packages: installing {}", missing.join(" ")));
    run_cmd(Command::new("apt-get").arg("update").arg("-qq"))?;
    let mut c = Command::new("apt-get");
    c.env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing);
    run_cmd(&mut c).with_context(|| {
        "apt-get install failed. LLVM 22 (llvm-22-dev) comes from Debian 12's bookworm-security \
         or apt.llvm.org on Ubuntu; add that source if apt can't find it"
    })
}

fn nightly() -> Result<()> {
    let has =
        output(Command::new("rustup").args(["run", PINNED_NIGHTLY, "rustc", "--print", "sysroot"]));
    let src_ok = has
        .as_deref()
        .map(|s| {
            Path::new(s.trim())
                .join("lib/rustlib/src/rust/library/core")
                .is_dir()
        })
        .unwrap_or(false);
    if src_ok {
        step(&format!(
            "rust toolchain {PINNED_NIGHTLY} with rust-src: present, skipping"
        ));
        return Ok(());
    }
    step(&format!(
        "rust toolchain: installing {PINNED_NIGHTLY} (LLVM 22) with rust-src"
    ));
    run_cmd(Command::new("rustup").args([
        "toolchain",
        "install",
        PINNED_NIGHTLY,
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

fn bpf_linker() -> Result<()> {
    let bin = home_cargo_bin().join("bpf-linker");
    let v = output(Command::new(&bin).arg("--version")).unwrap_or_default();
    if v.contains(BPF_LINKER_VERSION) {
        step(&format!(
            "bpf-linker {BPF_LINKER_VERSION}: present, skipping"
        ));
        return Ok(());
    }
    step(&format!(
        "bpf-linker: building {BPF_LINKER_VERSION} against LLVM 22 (about 1.5 min)"
    ));
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.env("LLVM_PREFIX", "/usr/lib/llvm-22").args([
        "install",
        "bpf-linker",
        "--version",
        BPF_LINKER_VERSION,
        "--locked",
        "--no-default-features",
        "--features",
        "llvm-22",
    ]);
    run_cmd(&mut c)
}

/// tracefs, securityfs and bpffs, where the programs and doctor look.
fn mounts() -> Result<()> {
    let mounted = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    for (fs, dir) in [
        ("tracefs", "/sys/kernel/tracing"),
        ("securityfs", "/sys/kernel/security"),
        ("bpf", "/sys/fs/bpf"),
    ] {
        let present = mounted.lines().any(|l| {
            l.split_whitespace().nth(1) == Some(dir) && l.split_whitespace().nth(2) == Some(fs)
        });
        if present {
            step(&format!("mount {fs} on {dir}: present, skipping"));
            continue;
        }
        step(&format!("mount {fs} on {dir}"));
        std::fs::create_dir_all(dir).ok();
        run_cmd(Command::new("mount").args(["-t", fs, fs, dir]))?;
    }
    Ok(())
}

/// Where the tests find the pinned pm2.
pub fn pm2_prefix() -> PathBuf {
    workspace_root().join("target/pm2")
}

fn pm2() -> Result<()> {
    let node_ok = output(Command::new("node").arg("--version"))
        .and_then(|v| {
            v.trim()
                .trim_start_matches('v')
                .split('.')
                .next()?
                .parse::<u32>()
                .ok()
        })
        .is_some_and(|major| major >= 18);
    if !node_ok || !quiet_ok(Command::new("npm").arg("--version")) {
        step("node/npm: installing nodejs and npm from apt");
        let mut c = Command::new("apt-get");
        c.env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "nodejs", "npm"]);
        run_cmd(&mut c)?;
    }
    let prefix = pm2_prefix();
    let pkg = prefix.join("node_modules/pm2/package.json");
    let have = std::fs::read_to_string(&pkg)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["version"].as_str().map(str::to_string));
    if have.as_deref() == Some(PM2_VERSION) {
        step(&format!(
            "pm2 {PM2_VERSION}: present in {}, skipping",
            prefix.display()
        ));
        return Ok(());
    }
    step(&format!(
        "pm2: installing {PM2_VERSION} from npm into {}",
        prefix.display()
    ));
    std::fs::create_dir_all(&prefix)?;
    run_cmd(
        Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--prefix"])
            .arg(&prefix)
            .arg(format!("pm2@{PM2_VERSION}")),
    )
}

pub fn setup(needs: &Needs) -> Result<()> {
    check_system()?;
    apt_packages(needs)?;
    nightly()?;
    bpf_linker()?;
    mounts()?;
    if needs.pm2 {
        pm2()?;
        mcp_sdk()?;
        // The fuzz smoke of `cargo xtask test`.
        cargo_fuzz()?;
    }
    Ok(())
}

/// cargo-fuzz, for `cargo xtask fuzz`.
pub fn cargo_fuzz() -> Result<()> {
    let bin = home_cargo_bin().join("cargo-fuzz");
    let v = output(Command::new(&bin).arg("--version")).unwrap_or_default();
    if v.split_whitespace().any(|w| w == CARGO_FUZZ_VERSION) {
        step(&format!(
            "cargo-fuzz {CARGO_FUZZ_VERSION}: present, skipping"
        ));
        return Ok(());
    }
    step(&format!(
        "cargo-fuzz: installing {CARGO_FUZZ_VERSION} (about 1 min)"
    ));
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args([
        "install",
        "cargo-fuzz",
        "--version",
        CARGO_FUZZ_VERSION,
        "--locked",
    ]);
    run_cmd(&mut c)
}

/// Where the tests find the MCP Python SDK's interpreter.
pub fn mcp_venv() -> PathBuf {
    workspace_root().join("target/mcp-venv")
}

fn mcp_sdk() -> Result<()> {
    let venv = mcp_venv();
    let py = venv.join("bin/python3");
    let have = output(Command::new(&py).args([
        "-c",
        "import importlib.metadata as m; print(m.version('mcp'))",
    ]));
    if have.as_deref().map(str::trim) == Some(MCP_PY_VERSION) {
        step(&format!(
            "mcp (Python SDK) {MCP_PY_VERSION}: present in {}, skipping",
            venv.display()
        ));
        return Ok(());
    }
    step(&format!(
        "mcp (Python SDK): installing {MCP_PY_VERSION} from PyPI into {}",
        venv.display()
    ));
    // Debian's interpreter (python3-venv), not whatever python3 is first
    // on PATH: the same on every fresh host.
    run_cmd(
        Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(&venv),
    )?;
    run_cmd(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .arg(format!("mcp=={MCP_PY_VERSION}")),
    )
}
