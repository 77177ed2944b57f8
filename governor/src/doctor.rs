//! `governor doctor`: what this kernel offers and which enforcement layers
//! `governor run` would use. Every probe is real: program types are probed
//! by loading a tiny program of each, and BPF LSM by attaching governor's own
//! LSM program.

use std::path::Path;

use aya::programs::{LsmAttachType, ProgramType};
use serde::Serialize;

use crate::{btf::Btf, probes, tracefs};

#[derive(Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub checks: Vec<Check>,
    /// Enforcement layers `governor run` would use, in order.
    pub layers: Vec<String>,
    pub bpf_lsm: bool,
}

fn check(name: &str, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        ok,
        detail: detail.into(),
    }
}

pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Whether `path` is a mount of the filesystem with magic `magic`.
fn is_fs(path: &str, magic: i64) -> bool {
    rustix::fs::statfs(path).is_ok_and(|s| s.f_type == magic)
}

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// Whether the filesystem holding `dir` accepts the immutable flag (the
/// always-on enforcement layer), tested on a scratch file.
pub fn immutable_flag_supported(dir: &Path) -> Result<(), String> {
    let probe = dir.join(format!(".governor-flag-probe-{}", std::process::id()));
    let f =
        std::fs::File::create(&probe).map_err(|e| format!("create {}: {e}", probe.display()))?;
    let r = crate::fsflags::set_flag(&f, crate::fsflags::FS_IMMUTABLE_FL, true)
        .and_then(|_| crate::fsflags::set_flag(&f, crate::fsflags::FS_IMMUTABLE_FL, false));
    drop(f);
    std::fs::remove_file(&probe).ok();
    r.map_err(|e| e.to_string())
}

/// `protect`: the config's `[protect]` and its file, to check that every
/// protected file's filesystem can hold the immutable flag.
pub fn run_checks(
    state_dir: &Path,
    protect: Option<(&crate::protect::ProtectConfig, &Path)>,
) -> Report {
    let mut checks = Vec::new();
    let kernel = kernel_release();
    checks.push(check("kernel", true, &kernel));
    let root = rustix::process::geteuid().is_root();
    checks.push(check(
        "root",
        root,
        if root {
            "running as root"
        } else {
            "not root: loading eBPF needs root"
        },
    ));

    // Measured by tests/hostile.rs: these writes are refused by the flags
    // like any other, but the attempt layer hooks the 64-bit open/write
    // syscalls (fexit or syscall tracepoints), which they never enter.
    checks.push(check(
        "attempt blind spots",
        true,
        "io_uring opens (IORING_OP_OPENAT) and 32-bit int 0x80 syscalls on protected files \
         are refused by the flags but not logged as attempts: the attempt layer hooks the \
         64-bit syscalls, which they don't enter (known blind spots)",
    ));
    // A full state directory stops the audit log (entries are then held in
    // memory, up to audit.memory_buffer, until space returns).
    const SPACE_MIN: u64 = 16 << 20;
    let probe = std::iter::successors(Some(state_dir), |p| p.parent()).find(|p| p.exists());
    match probe.map(|p| (p, rustix::fs::statvfs(p))) {
        Some((p, Ok(v))) => {
            let free = v.f_bavail.saturating_mul(v.f_frsize);
            checks.push(check(
                "state space",
                free >= SPACE_MIN,
                if free >= SPACE_MIN {
                    format!("{} MiB free for {}", free >> 20, p.display())
                } else {
                    format!(
                        "only {} KiB free for {}: the audit log can't grow; governor holds \
                         entries in memory (audit.memory_buffer) and writes them once there is \
                         space — free some",
                        free >> 10,
                        p.display()
                    )
                },
            ));
        }
        Some((p, Err(e))) => checks.push(check(
            "state space",
            false,
            format!("statvfs {}: {e}", p.display()),
        )),
        None => {}
    }
    match Btf::from_sys_fs() {
        Ok(btf) => {
            let ok = btf.has_struct("task_struct");
            checks.push(check("btf", ok, "/sys/kernel/btf/vmlinux readable"));
        }
        Err(e) => checks.push(check("btf", false, format!("{e:#}"))),
    }
    match tracefs::tracefs_root() {
        Some(p) => checks.push(check("tracefs", true, p.display().to_string())),
        None => checks.push(check(
            "tracefs",
            false,
            "not mounted at /sys/kernel/tracing (cargo xtask setup mounts it)",
        )),
    }
    let bpffs = is_fs("/sys/fs/bpf", BPF_FS_MAGIC);
    checks.push(check(
        "bpffs",
        bpffs,
        if bpffs {
            "/sys/fs/bpf"
        } else {
            "not mounted at /sys/fs/bpf"
        },
    ));
    match probes::kernel_config() {
        Ok(c) => checks.push(check(
            "offsets",
            true,
            format!(
                "from running kernel: task_struct.exit_code={} start_time={} file.f_mode={} file.f_inode={}",
                c.task_exit_code, c.task_start_time, c.file_f_mode, c.file_f_inode
            ),
        )),
        Err(e) => checks.push(check("offsets", false, format!("{e:#}"))),
    }
    if let Ok(c) = probes::kernel_config() {
        checks.push(check("exit detection", true, exit_detection(&c)));
    }
    let via = protect.map(|(p, _)| p.approve_via).unwrap_or_default();
    checks.push(check("approvals", true, approval_paths(via)));
    checks.push(check(
        "bounds",
        true,
        "unconfigured services with history capped by daemon.max_unconfigured_services \
         (default 1024; least recently seen evicted and counted in `status --json`); the \
         process table mirrors the kernel and is re-read from /proc after any lost event; \
         re-hash checks are deduped per protected file",
    ));
    for (name, ty) in [
        ("prog:tracepoint", ProgramType::TracePoint),
        ("prog:raw_tracepoint", ProgramType::RawTracePoint),
        ("prog:tracing(fentry)", ProgramType::Tracing),
        ("prog:lsm", ProgramType::Lsm(LsmAttachType::Mac)),
    ] {
        match aya::sys::is_program_supported(ty) {
            Ok(true) => checks.push(check(name, true, "loads")),
            Ok(false) => checks.push(check(name, false, "refused by the kernel")),
            Err(e) => checks.push(check(name, false, format!("probe failed: {e}"))),
        }
    }
    // Memory budgets (issue 11): both optional; without them the daemon
    // reads /proc more often and checks the floor on its 1 s tick.
    match crate::memwatch::probe() {
        Ok(()) => checks.push(check(
            "memory tracker",
            true,
            "kmem/rss_stat program loads: a crossing is seen in the kernel, /proc is read every 5 s",
        )),
        Err(e) => checks.push(check(
            "memory tracker",
            false,
            format!("{e:#}; memory is read from /proc only (100 ms to 1 s apart)"),
        )),
    }
    match crate::psi::PsiTrigger::probe() {
        Ok(()) => checks.push(check(
            "pressure trigger",
            true,
            format!(
                "PSI memory trigger arms ({} ms stalls in {} s): pressure wakes the floor check",
                crate::psi::STALL_US / 1000,
                crate::psi::WINDOW_US / 1_000_000
            ),
        )),
        Err(e) => checks.push(check(
            "pressure trigger",
            false,
            format!("{e:#}; the floor is checked every second"),
        )),
    }
    let lsms = std::fs::read_to_string("/sys/kernel/security/lsm")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unreadable (securityfs not mounted?)".into());
    checks.push(check("lsm list", true, &lsms));
    let bpf_lsm = match probes::LsmGuard::load() {
        Ok(_) => {
            checks.push(check(
                "bpf lsm",
                true,
                "governor's file_open program attached (and detached)",
            ));
            true
        }
        Err(e) => {
            checks.push(check("bpf lsm", false, format!("{e:#}")));
            false
        }
    };
    // Protected files (issue 6): the real attempt-logging and LSM programs.
    let protect = crate::protect::doctor_checks(protect);
    let protect_ok = |n: &str| protect.iter().any(|(name, ok, _)| name == n && *ok);
    let (protect_logging, protect_lsm) = (
        protect_ok("protect: attempt logging"),
        protect_ok("protect: bpf lsm"),
    );
    for (name, ok, detail) in protect {
        checks.push(check(&name, ok, detail));
    }
    let lifecycle = checks
        .iter()
        .filter(|c| c.name == "prog:tracepoint" || c.name == "offsets")
        .all(|c| c.ok)
        && protect_logging;
    let dir = if state_dir.is_dir() {
        state_dir
    } else {
        Path::new("/var/lib")
    };
    let mut layers = Vec::new();
    match immutable_flag_supported(dir) {
        Ok(()) => {
            checks.push(check(
                "vfs flags",
                true,
                format!("immutable/append-only flags work on {}", dir.display()),
            ));
            layers.push("vfs-flags".to_string());
        }
        Err(e) => checks.push(check("vfs flags", false, format!("{}: {e}", dir.display()))),
    }
    if lifecycle {
        layers.push("ebpf-attempt-logging".to_string());
    }
    if bpf_lsm && protect_lsm {
        layers.push("bpf-lsm".to_string());
    }
    Report {
        kernel,
        checks,
        layers,
        bpf_lsm,
    }
}

/// How deaths are told from thread exits on this kernel.
pub fn exit_detection(c: &governor_common::KernelConfig) -> String {
    if c.tp_exit_group_dead != governor_common::NO_FIELD {
        format!(
            "a death is the thread group's: sched_process_exit's own group_dead field (offset {})",
            c.tp_exit_group_dead
        )
    } else {
        format!(
            "a death is the thread group's: signal_struct.live == 0 at sched_process_exit \
             (BTF offsets task_struct.signal={} signal_struct.live={}; the tracepoint has no group_dead)",
            c.task_signal, c.signal_live
        )
    }
}

/// Which approval paths open a write window, what each proves and what it
/// doesn't (doctor and the `daemon.started` entry).
pub fn approval_paths(via: crate::protect::ApproveVia) -> String {
    match via {
        crate::protect::ApproveVia::Terminal => "terminal: `governor approve` typed under a login \
            session — the caller's kernel-seen ancestry holds sshd/login/getty and no pm2 God or app, \
            cron, or systemd service other than the login's, and the descriptor it passes is its own \
            controlling terminal. Proves a human's session asked, not a supervised process (a pty \
            from script(1) under pm2 or from a root process without a login fails); does not prove \
            who typed it (root can start a `login -f` session of its own; a person's automation \
            inside their ssh session looks the same). UNTOUCHABLE files also need the path typed back."
            .into(),
        crate::protect::ApproveVia::Telegram => "telegram: a window opens only on an Approve tap by an \
            authorised approver (telegram_approvers), checked by Telegram user id from the Bot API; \
            anyone root may ask. Proves that approver's Telegram account tapped; does not prove the \
            account isn't compromised."
            .into(),
    }
}

impl Report {
    pub fn print_human(&self) {
        println!("governor doctor — kernel {}", self.kernel);
        for c in &self.checks {
            println!(
                "  [{}] {:<22} {}",
                if c.ok { " ok " } else { "FAIL" },
                c.name,
                c.detail
            );
        }
        println!(
            "BPF LSM: {}",
            if self.bpf_lsm {
                "active"
            } else {
                "not available"
            }
        );
        println!(
            "enforcement layers `governor run` would use: {}",
            if self.layers.is_empty() {
                "none".to_string()
            } else {
                self.layers.join(", ")
            }
        );
    }
}
