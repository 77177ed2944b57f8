//! Loads the protect programs: layer 2 (attempt logging at syscall exit)
//! and, where the kernel allows it, layer 3 (BPF LSM).
//!
//! Layer 2 prefers one fexit program per watched syscall: a trampoline on
//! that syscall's entry point alone, so `stat`, `read`, `write` and every
//! other syscall run exactly as without governor. Kernels that refuse
//! trampolines (like the 6.18 host this was built on, which refuses fentry,
//! fexit and BPF LSM with EPERM) get the `syscalls/sys_exit_*` tracepoints
//! instead: the same body, but any syscall tracepoint puts every syscall of
//! every task on the kernel's slow path (~50 ns each, measured). Which one
//! runs is reported at start, in the startup audit entry and by `doctor`.
//!
//! The object is governor's one eBPF object, loaded a second time (as
//! `LsmGuard` does) so the lifecycle programs and their ring are untouched.

use std::{collections::BTreeMap, os::fd::AsRawFd, path::Path};

use anyhow::{bail, ensure, Context, Result};
use aya::{
    maps::{
        Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap, ProgramArray, RingBuf,
    },
    programs::{FExit, Lsm, TracePoint},
    Ebpf,
};
use governor_common::{
    protect::{
        AttemptBudget, AttemptEvent, BudgetClass, Op, SyscallDesc, ARG_NONE, ATTEMPT_BUDGET_MAP,
        FEXIT_SLOTS, FEXIT_WORKER_MAP, KIND_FD, KIND_IOCTL, KIND_OPEN, KIND_PATH,
        PROTECTED_INODES_MAP, PROTECTED_NAMES_MAP, PROTECT_DROPS_MAP, PROTECT_EVENTS_MAP,
        SYSCALL_DESCS_MAP, SYSCALL_TABLE_SIZE, WINDOW_SESSIONS_MAP,
    },
    InodeKey, KernelConfig, EVENTS_MAP,
};
use tokio::io::unix::AsyncFd;

use crate::tracefs;

/// One syscall governor watches: how to read its arguments (by tracefs
/// field name) and what it does.
#[derive(Debug, Clone, Copy)]
pub struct SyscallSpec {
    pub name: &'static str,
    pub nr: i64,
    pub kind: u8,
    pub op: Op,
    pub path0: Option<&'static str>,
    pub dirfd0: Option<&'static str>,
    pub path1: Option<&'static str>,
    pub dirfd1: Option<&'static str>,
    pub fd: Option<&'static str>,
    pub flags: Option<&'static str>,
    pub how: Option<&'static str>,
    pub cmd: Option<&'static str>,
    pub arg: Option<&'static str>,
    pub implied_flags: u32,
    /// The call acts on a symlink itself rather than its target (unless
    /// `AT_SYMLINK_FOLLOW`); `AT_SYMLINK_NOFOLLOW` in `flags` also means so.
    pub nofollow: bool,
}

const fn spec(name: &'static str, nr: i64, kind: u8, op: Op) -> SyscallSpec {
    SyscallSpec {
        name,
        nr,
        kind,
        op,
        path0: None,
        dirfd0: None,
        path1: None,
        dirfd1: None,
        fd: None,
        flags: None,
        how: None,
        cmd: None,
        arg: None,
        implied_flags: 0,
        nofollow: false,
    }
}

impl SyscallSpec {
    const fn p(mut self, path: &'static str) -> Self {
        self.path0 = Some(path);
        self
    }
    const fn pd(mut self, dirfd: &'static str, path: &'static str) -> Self {
        self.dirfd0 = Some(dirfd);
        self.path0 = Some(path);
        self
    }
    const fn p1(mut self, path: &'static str) -> Self {
        self.path1 = Some(path);
        self
    }
    const fn pd1(mut self, dirfd: &'static str, path: &'static str) -> Self {
        self.dirfd1 = Some(dirfd);
        self.path1 = Some(path);
        self
    }
    const fn fd(mut self, fd: &'static str) -> Self {
        self.fd = Some(fd);
        self
    }
    const fn flags(mut self, f: &'static str) -> Self {
        self.flags = Some(f);
        self
    }
    const fn nofollow(mut self) -> Self {
        self.nofollow = true;
        self
    }
}

// x86_64 numbers the libc crate doesn't have yet (syscall numbers are ABI).
const SYS_SETXATTRAT: i64 = 463;
const SYS_REMOVEXATTRAT: i64 = 466;
const SYS_FILE_SETATTR: i64 = 469;

/// Every syscall that can modify a file. Tracepoints missing on a kernel
/// (e.g. `fchmodat2` before 6.6) are skipped and listed.
pub fn syscall_specs() -> Vec<SyscallSpec> {
    use libc::*;
    use Op::*;
    let mut v = vec![
        spec("openat", SYS_openat, KIND_OPEN, Open)
            .pd("dfd", "filename")
            .flags("flags"),
        {
            let mut s = spec("openat2", SYS_openat2, KIND_OPEN, Open).pd("dfd", "filename");
            s.how = Some("how");
            s
        },
        spec("truncate", SYS_truncate, KIND_PATH, Truncate).p("path"),
        spec("ftruncate", SYS_ftruncate, KIND_FD, Truncate).fd("fd"),
        spec("renameat", SYS_renameat, KIND_PATH, Rename)
            .pd("olddfd", "oldname")
            .pd1("newdfd", "newname")
            .nofollow(),
        spec("renameat2", SYS_renameat2, KIND_PATH, Rename)
            .pd("olddfd", "oldname")
            .pd1("newdfd", "newname")
            .nofollow(),
        spec("unlinkat", SYS_unlinkat, KIND_PATH, Unlink)
            .pd("dfd", "pathname")
            .flags("flag")
            .nofollow(),
        spec("linkat", SYS_linkat, KIND_PATH, Link)
            .pd("olddfd", "oldname")
            .pd1("newdfd", "newname")
            .flags("flags")
            .nofollow(),
        spec("fchmod", SYS_fchmod, KIND_FD, Chmod).fd("fd"),
        spec("fchmodat", SYS_fchmodat, KIND_PATH, Chmod).pd("dfd", "filename"),
        spec("fchmodat2", SYS_fchmodat2, KIND_PATH, Chmod)
            .pd("dfd", "filename")
            .flags("flags"),
        spec("fchown", SYS_fchown, KIND_FD, Chown).fd("fd"),
        spec("fchownat", SYS_fchownat, KIND_PATH, Chown)
            .pd("dfd", "filename")
            .flags("flag"),
        spec("setxattr", SYS_setxattr, KIND_PATH, SetXattr).p("pathname"),
        spec("lsetxattr", SYS_lsetxattr, KIND_PATH, SetXattr)
            .p("pathname")
            .nofollow(),
        spec("fsetxattr", SYS_fsetxattr, KIND_FD, SetXattr).fd("fd"),
        spec("setxattrat", SYS_SETXATTRAT, KIND_PATH, SetXattr)
            .pd("dfd", "pathname")
            .flags("at_flags"),
        spec("removexattr", SYS_removexattr, KIND_PATH, RemoveXattr).p("pathname"),
        spec("lremovexattr", SYS_lremovexattr, KIND_PATH, RemoveXattr)
            .p("pathname")
            .nofollow(),
        spec("fremovexattr", SYS_fremovexattr, KIND_FD, RemoveXattr).fd("fd"),
        spec("removexattrat", SYS_REMOVEXATTRAT, KIND_PATH, RemoveXattr)
            .pd("dfd", "pathname")
            .flags("at_flags"),
        // 6.17+: sets the fsxattr flags (immutable among them) by path.
        spec("file_setattr", SYS_FILE_SETATTR, KIND_PATH, SetFlags)
            .pd("dfd", "filename")
            .flags("at_flags"),
        spec("utimensat", SYS_utimensat, KIND_PATH, Utimes)
            .pd("dfd", "filename")
            .flags("flags"),
        spec("futimesat", SYS_futimesat, KIND_PATH, Utimes).pd("dfd", "filename"),
        {
            let mut s = spec("ioctl", SYS_ioctl, KIND_IOCTL, SetFlags).fd("fd");
            s.cmd = Some("cmd");
            s.arg = Some("arg");
            s
        },
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        spec("open", SYS_open, KIND_OPEN, Open)
            .p("filename")
            .flags("flags"),
        {
            let mut s = spec("creat", SYS_creat, KIND_OPEN, Open).p("pathname");
            s.implied_flags = (O_CREAT | O_WRONLY | O_TRUNC) as u32;
            s
        },
        spec("rename", SYS_rename, KIND_PATH, Rename)
            .p("oldname")
            .p1("newname")
            .nofollow(),
        spec("unlink", SYS_unlink, KIND_PATH, Unlink)
            .p("pathname")
            .nofollow(),
        spec("link", SYS_link, KIND_PATH, Link)
            .p("oldname")
            .p1("newname")
            .nofollow(),
        spec("chmod", SYS_chmod, KIND_PATH, Chmod).p("filename"),
        spec("chown", SYS_chown, KIND_PATH, Chown).p("filename"),
        spec("lchown", SYS_lchown, KIND_PATH, Chown)
            .p("filename")
            .nofollow(),
        spec("utimes", SYS_utimes, KIND_PATH, Utimes).p("filename"),
        spec("utime", SYS_utime, KIND_PATH, Utimes).p("filename"),
    ]);
    v
}

/// Argument index of `field` in a syscall tracepoint format, checking that
/// the arguments sit at `args_base + 8 * i` as the programs assume.
fn arg_index(fields: &[tracefs::Field], args_base: u32, field: &str) -> Result<u8> {
    // Arguments are the fields after `__syscall_nr`.
    let args: Vec<&tracefs::Field> = fields
        .iter()
        .skip_while(|f| f.name() != "__syscall_nr")
        .skip(1)
        .collect();
    for (i, f) in args.iter().enumerate() {
        ensure!(
            f.offset == args_base + 8 * i as u32,
            "argument {} (`{}`) at offset {}, expected {}",
            i,
            f.name(),
            f.offset,
            args_base + 8 * i as u32
        );
    }
    args.iter()
        .position(|f| f.name() == field)
        .map(|i| i as u8)
        .with_context(|| format!("no argument `{field}`"))
}

/// Builds the descriptor of one syscall from its tracefs format.
fn describe(root: &Path, s: &SyscallSpec, args_base: u32) -> Result<SyscallDesc> {
    let path = root
        .join("events/syscalls")
        .join(format!("sys_enter_{}", s.name))
        .join("format");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading tracepoint format {}", path.display()))?;
    let fields = tracefs::parse_format(&text);
    let idx = |f: Option<&str>| -> Result<u8> {
        match f {
            Some(f) => arg_index(&fields, args_base, f)
                .with_context(|| format!("syscalls/sys_enter_{}", s.name)),
            None => Ok(ARG_NONE),
        }
    };
    Ok(SyscallDesc {
        kind: s.kind,
        op: s.op as u8,
        path0: idx(s.path0)?,
        dirfd0: idx(s.dirfd0)?,
        path1: idx(s.path1)?,
        dirfd1: idx(s.dirfd1)?,
        fd: idx(s.fd)?,
        flags: idx(s.flags)?,
        how: idx(s.how)?,
        cmd: idx(s.cmd)?,
        arg: idx(s.arg)?,
        _pad: 0,
        implied_flags: s.implied_flags,
    })
}

/// The LSM programs with a fixed signature: (program, hook).
const LSM_PROGRAMS: &[(&str, &str)] = &[
    ("protect_file_open", "file_open"),
    ("protect_file_ioctl", "file_ioctl"),
    ("protect_inode_unlink", "inode_unlink"),
    ("protect_inode_link", "inode_link"),
    ("protect_inode_rename", "inode_rename"),
    ("protect_inode_create", "inode_create"),
];

/// Hooks whose dentry argument moved between kernels: (hook, whether it
/// must exist). The program is `protect_<hook>_d<index>_n<count>`.
const LSM_DENTRY_HOOKS: &[(&str, bool)] = &[
    ("inode_setattr", true),
    ("inode_setxattr", true),
    ("inode_removexattr", true),
    ("inode_set_acl", false),
    ("inode_remove_acl", false),
    ("inode_file_setattr", false),
];

/// The entry-point prefix of a syscall's BTF-visible wrapper function.
#[cfg(target_arch = "x86_64")]
const SYSCALL_WRAPPER_PREFIX: &str = "__x64_sys_";
#[cfg(target_arch = "aarch64")]
const SYSCALL_WRAPPER_PREFIX: &str = "__arm64_sys_";
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const SYSCALL_WRAPPER_PREFIX: &str = "__sys_";

/// How layer 2 sees syscall exits.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AttemptBackend {
    /// One fexit program per watched syscall; other syscalls pay nothing.
    Fexit,
    /// The `syscalls/sys_exit_*` tracepoints, because fexit could not be
    /// used (`why`); every syscall takes the kernel's slow path.
    Tracepoints { why: String },
}

impl AttemptBackend {
    /// Short name for logs, `doctor` and the startup audit entry.
    pub fn label(&self) -> &'static str {
        match self {
            AttemptBackend::Fexit => "fexit",
            AttemptBackend::Tracepoints { .. } => "syscall-tracepoints",
        }
    }

    /// One line: the backend, and for the fallback what it costs and why.
    pub fn describe(&self) -> String {
        match self {
            AttemptBackend::Fexit => {
                "fexit on each watched syscall (other syscalls untouched)".to_string()
            }
            AttemptBackend::Tracepoints { why } => format!(
                "syscall-exit tracepoints (every syscall takes the kernel's slow path); \
                 fexit unavailable: {why}"
            ),
        }
    }
}

/// Default attempt ring size: ~60 events of backlog. Attempts are rare; a
/// flood beyond it is counted and summarised, and each KiB here costs two
/// of the daemon's RSS (user space maps the ring twice).
pub const DEFAULT_PROTECT_RING_BYTES: u32 = 64 << 10;

/// The loaded protect programs and their maps.
pub struct KernelLayer {
    _ebpf: Ebpf,
    ring: AsyncFd<RingBuf<MapData>>,
    drops: PerCpuArray<MapData, u64>,
    budgets: PerCpuHashMap<MapData, u64, AttemptBudget>,
    inodes: BpfHashMap<MapData, InodeKey, u32>,
    names: BpfHashMap<MapData, u64, u32>,
    sessions: BpfHashMap<MapData, InodeKey, u32>,
    /// Syscalls whose exits are watched.
    pub attached: Vec<String>,
    /// How they are watched (`None` when attempt logging is off).
    pub backend: Option<AttemptBackend>,
    /// Syscalls this kernel has no tracepoint for.
    pub missing: Vec<String>,
    /// `Ok(hooks)` when the LSM layer is active, else why not.
    pub lsm: std::result::Result<Vec<String>, String>,
    pub config: KernelConfig,
    /// Where the load's time went (ms): `object`, `btf`, `logging`, `lsm`.
    pub timings: Vec<(&'static str, f64)>,
}

/// A map removal of a key that isn't there is done, not an error (the
/// kernel answers ENOENT, which aya passes on as a syscall error).
fn absent_ok(
    r: std::result::Result<(), aya::maps::MapError>,
) -> std::result::Result<(), aya::maps::MapError> {
    match r {
        Err(aya::maps::MapError::KeyNotFound) => Ok(()),
        Err(aya::maps::MapError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
        {
            Ok(())
        }
        other => other,
    }
}

fn register<T: std::os::fd::AsFd + AsRawFd>(inner: T) -> Result<AsyncFd<T>> {
    // SAFETY: `inner` owns its file descriptor and moves into the AsyncFd,
    // so the fd stays open for as long as it is registered.
    unsafe { AsyncFd::register(inner) }
        .map_err(|e| anyhow::anyhow!("registering a BPF map fd with tokio: {e}"))
}

/// Keeps the head and tail of a long error (verifier logs run to pages),
/// and drops aya's empty "Verifier output:" trailer.
fn short(s: String) -> String {
    const KEEP: usize = 600;
    let trimmed = s.trim_end();
    let s = match trimmed.strip_suffix("Verifier output:") {
        Some(head) => head.trim_end().trim_end_matches('.').to_string(),
        None => s,
    };
    if s.len() <= 2 * KEEP {
        return s;
    }
    let head = s
        .char_indices()
        .take_while(|(i, _)| *i < KEEP)
        .map(|(_, c)| c);
    let tail_start = s.len() - KEEP;
    let tail = s
        .char_indices()
        .skip_while(|(i, _)| *i < tail_start)
        .map(|(_, c)| c);
    format!(
        "{} … {}",
        head.collect::<String>(),
        tail.collect::<String>()
    )
}

/// Why BPF LSM can't be used here, if it can't (cheap checks first).
fn lsm_precheck() -> std::result::Result<(), String> {
    let lsms = std::fs::read_to_string("/sys/kernel/security/lsm").unwrap_or_default();
    if !lsms.split(',').any(|l| l.trim() == "bpf") {
        return Err(format!(
            "BPF LSM is not in the kernel's active LSM list ({}); boot with lsm=...,bpf",
            if lsms.is_empty() {
                "securityfs not readable"
            } else {
                lsms.trim()
            }
        ));
    }
    Ok(())
}

impl KernelLayer {
    /// Loads and attaches layer 2, and layer 3 when `want_lsm` and the
    /// kernel allows it. Must run inside a tokio runtime.
    pub fn load(ring_bytes: u32, want_logging: bool, want_lsm: bool) -> Result<Self> {
        ensure!(
            ring_bytes >= 4096 && ring_bytes.is_power_of_two(),
            "protect ring size {ring_bytes} must be a power of two of at least 4096 bytes"
        );
        let mut timings = Vec::new();
        let mut lap = std::time::Instant::now();
        let mut mark = |what: &'static str| {
            timings.push((what, lap.elapsed().as_secs_f64() * 1e3));
            lap = std::time::Instant::now();
        };
        let config = crate::layout::kernel_config()?;
        ensure!(
            config.regs_ok == 1,
            "the saved user registers (struct pt_regs) don't have the layout attempt logging \
             reads syscall arguments from (x86_64 only)"
        );
        ensure!(
            config.tp_sys_args != 0 && config.tp_sys_ret != 0 && config.tp_sys_nr != 0,
            "the kernel has no syscalls/sys_enter_openat tracepoint (CONFIG_FTRACE_SYSCALLS): \
             attempt logging can't run"
        );
        let root = tracefs::tracefs_root().context("tracefs is not mounted")?;
        let mut ebpf = load_object(&config, ring_bytes)?;

        // Describe the syscalls before attaching anything.
        let mut descs: Array<MapData, SyscallDesc> = Array::try_from(
            ebpf.take_map(SYSCALL_DESCS_MAP)
                .context("SYSCALL_DESCS map missing")?,
        )?;
        let mut present: Vec<&'static str> = Vec::new();
        let mut missing = Vec::new();
        for s in syscall_specs() {
            let dir = root.join(format!("events/syscalls/sys_enter_{}", s.name));
            if !dir.is_dir()
                || !root
                    .join(format!("events/syscalls/sys_exit_{}", s.name))
                    .is_dir()
            {
                missing.push(s.name.to_string());
                continue;
            }
            ensure!(
                (0..SYSCALL_TABLE_SIZE as i64).contains(&s.nr),
                "syscall {} has number {} beyond the table",
                s.name,
                s.nr
            );
            let d = describe(&root, &s, config.tp_sys_args)?;
            descs
                .set(s.nr as u32, d, 0)
                .with_context(|| format!("describing syscall {}", s.name))?;
            present.push(s.name);
        }

        mark("object");
        // One parse of the kernel's BTF (tens of MB of heap, dropped after
        // start) serves fexit and LSM here and the lifecycle's checks.
        let btf = if want_logging || want_lsm {
            crate::layout::aya_btf()
        } else {
            Err("not needed".to_string())
        };
        mark("btf");
        let (attached, backend) = if want_logging {
            let backend = Self::attach_logging(&mut ebpf, &present, btf.as_deref())?;
            (
                present.iter().map(|n| n.to_string()).collect(),
                Some(backend),
            )
        } else {
            (Vec::new(), None)
        };
        mark("logging");

        let lsm = match (&btf, want_lsm) {
            (_, false) => Err("not requested".to_string()),
            (Err(e), true) => Err(e.clone()),
            (Ok(btf), true) => Self::attach_lsm(&mut ebpf, &config, btf.as_ref()),
        };
        drop(btf);
        mark("lsm");

        let ring = RingBuf::try_from(
            ebpf.take_map(PROTECT_EVENTS_MAP)
                .context("PROTECT_EVENTS map missing")?,
        )?;
        let ring = register(ring)?;
        let drops = PerCpuArray::try_from(
            ebpf.take_map(PROTECT_DROPS_MAP)
                .context("PROTECT_DROPS map missing")?,
        )?;
        let budgets = PerCpuHashMap::try_from(
            ebpf.take_map(ATTEMPT_BUDGET_MAP)
                .context("ATTEMPT_BUDGET map missing")?,
        )?;
        let inodes = BpfHashMap::try_from(
            ebpf.take_map(PROTECTED_INODES_MAP)
                .context("PROTECTED_INODES map missing")?,
        )?;
        let names = BpfHashMap::try_from(
            ebpf.take_map(PROTECTED_NAMES_MAP)
                .context("PROTECTED_NAMES map missing")?,
        )?;
        let sessions = BpfHashMap::try_from(
            ebpf.take_map(WINDOW_SESSIONS_MAP)
                .context("WINDOW_SESSIONS map missing")?,
        )?;
        Ok(KernelLayer {
            _ebpf: ebpf,
            ring,
            drops,
            budgets,
            inodes,
            names,
            sessions,
            attached,
            backend,
            missing,
            lsm,
            config,
            timings,
        })
    }

    /// Attaches layer 2 to the exits of the syscalls named in `present`: fexit
    /// where the kernel allows it, else the syscall-exit tracepoints.
    fn attach_logging(
        ebpf: &mut Ebpf,
        present: &[&'static str],
        btf: std::result::Result<&aya::Btf, &String>,
    ) -> Result<AttemptBackend> {
        let why = match btf {
            Ok(btf) => match Self::attach_fexit(ebpf, present, btf) {
                Ok(()) => return Ok(AttemptBackend::Fexit),
                Err(e) => e,
            },
            Err(e) => e.clone(),
        };
        let p: &mut TracePoint = ebpf
            .program_mut("protect_sys_exit")
            .context("program protect_sys_exit missing from the eBPF object")?
            .try_into()?;
        p.load().context("loading protect_sys_exit")?;
        for name in present {
            let tp = format!("sys_exit_{name}");
            p.attach("syscalls", &tp)
                .with_context(|| format!("attaching protect_sys_exit to syscalls/{tp}"))?;
        }
        Ok(AttemptBackend::Tracepoints { why })
    }

    /// Binds stub `protect_fexit_N` to the Nth syscall of `present`, each
    /// a tail call into `protect_fexit_worker` (verified once, not once per
    /// syscall). All or nothing: on any refusal the programs loaded so far
    /// are unloaded and the reason returned, so the caller can fall back.
    fn attach_fexit(
        ebpf: &mut Ebpf,
        present: &[&'static str],
        btf: &aya::Btf,
    ) -> std::result::Result<(), String> {
        if present.len() > FEXIT_SLOTS as usize {
            return Err(format!(
                "{} syscalls to watch but only {FEXIT_SLOTS} fexit programs",
                present.len()
            ));
        }
        let Some(first) = present.first() else {
            return Err("no syscall to watch".into());
        };
        let mut loaded: Vec<String> = Vec::new();
        let result = Self::bind_fexit(ebpf, present, first, btf, &mut loaded);
        if result.is_err() {
            for prog in &loaded {
                if let Some(p) = ebpf.program_mut(prog) {
                    let p: std::result::Result<&mut FExit, _> = p.try_into();
                    if let Ok(p) = p {
                        let _ = p.unload();
                    }
                }
            }
        }
        result
    }

    fn bind_fexit(
        ebpf: &mut Ebpf,
        present: &[&'static str],
        first: &str,
        btf: &aya::Btf,
        loaded: &mut Vec<String>,
    ) -> std::result::Result<(), String> {
        fn fexit<'a>(ebpf: &'a mut Ebpf, prog: &str) -> std::result::Result<&'a mut FExit, String> {
            ebpf.program_mut(prog)
                .ok_or_else(|| format!("program {prog} missing from the eBPF object"))?
                .try_into()
                .map_err(|e| format!("{prog}: {e}"))
        }
        // The worker is loaded for one wrapper (any: they share one
        // prototype) and never attached itself.
        let worker = "protect_fexit_worker";
        let func = format!("{SYSCALL_WRAPPER_PREFIX}{first}");
        let w = fexit(ebpf, worker)?;
        w.load(&func, btf)
            .map_err(|e| short(format!("loading fexit on {func}: {e}")))?;
        loaded.push(worker.to_string());
        let fd = w
            .fd()
            .map_err(|e| format!("{worker}: {e}"))?
            .try_clone()
            .map_err(|e| format!("{worker}: {e}"))?;
        {
            // Kept inside `ebpf` (not taken): the kernel empties a program
            // array when user space closes its last fd to it.
            let map = ebpf
                .map_mut(FEXIT_WORKER_MAP)
                .ok_or("FEXIT_WORKER map missing from the eBPF object")?;
            let mut array: ProgramArray<&mut MapData> =
                ProgramArray::try_from(map).map_err(|e| e.to_string())?;
            array
                .set(0, &fd, 0)
                .map_err(|e| format!("installing the fexit worker: {e}"))?;
        }
        for (slot, name) in present.iter().enumerate() {
            let prog = format!("protect_fexit_{slot}");
            let func = format!("{SYSCALL_WRAPPER_PREFIX}{name}");
            let p = fexit(ebpf, &prog)?;
            p.load(&func, btf)
                .map_err(|e| short(format!("loading fexit on {func}: {e}")))?;
            loaded.push(prog.clone());
            p.attach()
                .map_err(|e| format!("attaching fexit to {func}: {e}"))?;
        }
        Ok(())
    }

    fn attach_lsm(
        ebpf: &mut Ebpf,
        config: &KernelConfig,
        btf: &aya::Btf,
    ) -> std::result::Result<Vec<String>, String> {
        lsm_precheck()?;
        let mut hooks = Vec::new();
        let mut progs: Vec<(String, &str)> = LSM_PROGRAMS
            .iter()
            .map(|&(p, h)| (p.to_string(), h))
            .collect();
        for &(hook, required) in LSM_DENTRY_HOOKS {
            let (d, n) = match hook {
                "inode_setattr" => (config.lsm.setattr_dentry, config.lsm.setattr_nargs),
                "inode_setxattr" => (config.lsm.setxattr_dentry, config.lsm.setxattr_nargs),
                "inode_removexattr" => {
                    (config.lsm.removexattr_dentry, config.lsm.removexattr_nargs)
                }
                "inode_set_acl" => (config.lsm.set_acl_dentry, config.lsm.set_acl_nargs),
                "inode_file_setattr" => (
                    config.lsm.file_setattr_dentry,
                    config.lsm.file_setattr_nargs,
                ),
                _ => (config.lsm.remove_acl_dentry, config.lsm.remove_acl_nargs),
            };
            if d == ARG_NONE {
                if required {
                    return Err(format!("the kernel has no LSM hook {hook} (BTF)"));
                }
                continue;
            }
            let prog = format!("protect_{hook}_d{d}_n{n}");
            if ebpf.program(&prog).is_none() {
                return Err(format!(
                    "LSM hook {hook} has a signature governor has no program for \
                     (dentry at argument {d} of {n})"
                ));
            }
            progs.push((prog, hook));
        }
        for (prog, hook) in progs {
            let p: &mut Lsm = ebpf
                .program_mut(&prog)
                .ok_or_else(|| format!("program {prog} missing from the eBPF object"))?
                .try_into()
                .map_err(|e| format!("{prog}: {e}"))?;
            p.load(hook, btf)
                .map_err(|e| short(format!("loading the BPF LSM program for {hook}: {e}")))?;
            p.attach().map_err(|e| {
                format!(
                    "attaching the BPF LSM program for {hook} (the kernel refused BPF LSM): {e}"
                )
            })?;
            hooks.push(hook.to_string());
        }
        Ok(hooks)
    }

    /// Marks `key` with `flags` (`INODE_*` bits).
    pub fn set_inode(&mut self, key: InodeKey, flags: u32) -> Result<()> {
        self.inodes
            .insert(key, flags, 0)
            .with_context(|| format!("updating the protected-inode map for {key:?}"))
    }

    pub fn remove_inode(&mut self, key: &InodeKey) -> Result<()> {
        self.set_session(*key, None)?;
        absent_ok(self.inodes.remove(key))
            .with_context(|| format!("removing {key:?} from the protected-inode map"))
    }

    /// Lets only session `sid` write `key` while its window is open (with
    /// `INODE_SESSION` in its flags); `None` removes the restriction.
    pub fn set_session(&mut self, key: InodeKey, sid: Option<u32>) -> Result<()> {
        match sid {
            Some(s) => self
                .sessions
                .insert(key, s, 0)
                .with_context(|| format!("updating the window-session map for {key:?}")),
            None => absent_ok(self.sessions.remove(&key))
                .with_context(|| format!("removing {key:?} from the window-session map")),
        }
    }

    pub fn add_name(&mut self, hash: u64) -> Result<()> {
        self.names
            .insert(hash, 1, 0)
            .context("updating the protected-name map")
    }

    pub fn remove_name(&mut self, hash: u64) -> Result<()> {
        absent_ok(self.names.remove(&hash)).context("removing from the protected-name map")
    }

    /// Attempt events lost because the ring was full.
    pub fn dropped(&self) -> Result<u64> {
        let per_cpu = self
            .drops
            .get(&0, 0)
            .context("reading the protect drop counter")?;
        Ok(per_cpu.iter().sum())
    }

    /// Each uid's running count, per budget class, of records the kernel
    /// counted instead of reporting (that per-second budget spent: a flood).
    pub fn suppressed(&self) -> Vec<(u32, BudgetClass, u64)> {
        self.budgets
            .iter()
            .filter_map(|r| r.ok())
            .filter_map(|(key, per_cpu)| {
                let (uid, class) = BudgetClass::split(key)?;
                Some((uid, class, per_cpu.iter().map(|b| b.suppressed_total).sum()))
            })
            .filter(|(_, _, n)| *n > 0)
            .collect()
    }

    /// Waits for attempt events and returns them decoded (raw records).
    pub async fn next_batch(&mut self) -> Result<Vec<AttemptEvent>> {
        let mut guard = self.ring.readable_mut().await?;
        let ring = guard.get_inner_mut();
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            if let Some(ev) = decode(&item) {
                out.push(ev);
            }
        }
        guard.clear_ready();
        Ok(out)
    }

    /// Takes the events already in the ring without waiting.
    pub fn drain(&mut self) -> Vec<AttemptEvent> {
        let ring = self.ring.get_mut();
        let mut out = Vec::new();
        while let Some(item) = ring.next() {
            if let Some(ev) = decode(&item) {
                out.push(ev);
            }
        }
        out
    }
}

fn decode(bytes: &[u8]) -> Option<AttemptEvent> {
    if bytes.len() < std::mem::size_of::<AttemptEvent>() {
        return None;
    }
    // SAFETY: AttemptEvent is plain old data (#[repr(C)] integers and byte
    // arrays, no padding), the length was checked, and read_unaligned copes
    // with the ring's 8-byte alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const AttemptEvent) })
}

/// The syscall names by number, for reports.
pub fn syscall_names() -> BTreeMap<u32, &'static str> {
    syscall_specs()
        .into_iter()
        .map(|s| (s.nr as u32, s.name))
        .collect()
}

/// How a syscall treats a final symlink (see `SyscallSpec::nofollow`).
pub fn spec_of(nr: u32) -> Option<SyscallSpec> {
    syscall_specs().into_iter().find(|s| s.nr == nr as i64)
}

/// Loads governor's eBPF object for the protect programs, live: the runtime
/// is enabled with this process as the daemon. The probes load it the same
/// way, because a disabled runtime lets the verifier prune everything and
/// pass code the daemon would then fail to load; with empty maps a probe
/// denies nothing and reports nothing, and it detaches at once.
fn load_object(_config: &KernelConfig, ring_bytes: u32) -> Result<Ebpf> {
    // The lifecycle ring of this copy is never read: the smallest.
    crate::layout::load_object(&crate::layout::LoadSpec {
        max_entries: vec![(EVENTS_MAP, 4096), (PROTECT_EVENTS_MAP, ring_bytes)],
        protect: true,
    })
    .context("loading governor's eBPF object for the protect layer")
}

/// Whether the BPF LSM layer can run here: loads and attaches every LSM
/// program (live, but with nothing marked, so it refuses nothing) and
/// detaches them again. For `governor doctor` and tests; `Ok` lists the hooks.
pub fn probe_lsm() -> std::result::Result<Vec<String>, String> {
    lsm_precheck()?;
    let config = crate::layout::kernel_config().map_err(|e| format!("{e:#}"))?;
    let mut ebpf = load_object(&config, 4096).map_err(|e| format!("{e:#}"))?;
    let btf = crate::layout::aya_btf()?;
    KernelLayer::attach_lsm(&mut ebpf, &config, &btf)
}

/// Whether attempt logging can run here, and how: loads the programs
/// (live, with nothing protected), attaches them to `openat` only, then
/// unloads. For `doctor`.
pub fn probe_logging() -> std::result::Result<String, String> {
    let config = crate::layout::kernel_config().map_err(|e| format!("{e:#}"))?;
    if config.regs_ok != 1 {
        return Err("no usable struct pt_regs layout (x86_64 only)".into());
    }
    if config.tp_sys_nr == 0 || config.tp_sys_ret == 0 {
        return Err("no syscalls/sys_{enter,exit}_openat tracepoints".into());
    }
    let mut ebpf = load_object(&config, 4096).map_err(|e| format!("{e:#}"))?;
    let btf = crate::layout::aya_btf();
    let backend = KernelLayer::attach_logging(&mut ebpf, &["openat"], btf.as_deref())
        .map_err(|e| short(format!("{e:#}")))?;
    let n = syscall_specs().len();
    Ok(format!(
        "{}; {n} syscalls known, those this kernel has are watched",
        backend.describe()
    ))
}

/// Fails when the LSM layer was required but is not active.
pub fn require(layer: &KernelLayer) -> Result<()> {
    if let Err(e) = &layer.lsm {
        bail!("BPF LSM layer unavailable: {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::BudgetClass;

    #[test]
    fn budget_keys_keep_uid_and_class_apart() {
        for uid in [0, 1, 65534, u32::MAX - 1, u32::MAX] {
            for class in [BudgetClass::Attempts, BudgetClass::NameMatches] {
                assert_eq!(BudgetClass::split(class.key(uid)), Some((uid, class)));
            }
            assert_ne!(
                BudgetClass::Attempts.key(uid),
                BudgetClass::NameMatches.key(uid)
            );
        }
        // A class a newer kernel side might add is skipped, not misread.
        assert_eq!(BudgetClass::split((7 << 32) | 5), None);
    }
}
