//! The running kernel's layout, computed once per process: every struct
//! offset and tracepoint field the eBPF programs need (Rust eBPF objects
//! carry no CO-RE relocations, so nothing about layout is compiled in), and
//! the object they are loaded from. Shared by every loader — lifecycle,
//! attempt logging, LSM and doctor's probes — so the kernel's BTF is parsed
//! here once for the layout, and once by aya (one loader for the whole
//! process, which fexit and LSM attachment share: aya's `EbpfLoader::new`
//! parses BTF itself, so a loader per layer meant a parse per layer).

use anyhow::{Context, Result};
use governor_common::{protect::LsmArgs, protect::ARG_NONE, KernelConfig};

use crate::{btf::Btf, tracefs};

/// The compiled eBPF object, embedded so the binary is self-contained (the
/// test binaries that run inside the qemu guest carry it too).
pub(crate) static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/governor-ebpf"));

/// Drops the resident pages of [`EBPF_OBJECT`] once the programs are
/// loaded: the loader reads all ~770 KB of it, and those file-backed pages
/// would otherwise stay in the daemon's RSS for ever. A later load (a
/// reload of `[protect]`) faults them back in from the executable.
pub fn release_object_pages() {
    let page = rustix::param::page_size();
    let start = EBPF_OBJECT.as_ptr() as usize;
    let end = start + EBPF_OBJECT.len();
    // Whole pages inside the object only: its neighbours stay untouched.
    let first = start.div_ceil(page) * page;
    let last = end / page * page;
    if last <= first {
        return;
    }
    // SAFETY: [first, last) lies inside EBPF_OBJECT, a read-only static in
    // the executable's private file mapping that nothing writes; dropping
    // its pages only means the next read faults them in again from the file.
    let r = unsafe {
        rustix::mm::madvise(
            first as *mut std::ffi::c_void,
            last - first,
            rustix::mm::Advice::LinuxDontNeed,
        )
    };
    if let Err(e) = r {
        log::debug!("madvise(DONTNEED) on the eBPF object: {e}");
    }
}

/// Drops the resident pages of the process's code (every private
/// read+execute file mapping: governor's own text and its libraries')
/// once start-up is done. Start-up runs code the daemon never runs again
/// (config parsing, BTF, the loader, the first walk of /proc: measured,
/// 3.2 MB of governor's text was resident after start-up); the pages the
/// event loop uses fault back in from the page cache (a minor fault, no
/// I/O), the rest stay out of the daemon's RSS. Code is never written,
/// so nothing is lost; writable and RELRO mappings are never touched.
pub fn release_code_pages() {
    use procfs::process::{MMPermissions, MMapPath};
    let maps = match procfs::process::Process::myself().and_then(|p| p.maps()) {
        Ok(m) => m,
        Err(e) => {
            log::debug!("reading /proc/self/maps: {e}");
            return;
        }
    };
    let code = MMPermissions::READ | MMPermissions::EXECUTE | MMPermissions::PRIVATE;
    for m in maps {
        if m.perms != code || !matches!(m.pathname, MMapPath::Path(_)) {
            continue;
        }
        let (start, end) = m.address;
        // SAFETY: [start, end) is a whole private, read+execute, never
        // written file mapping (its perms say so: no WRITE, so no COW copy
        // of it exists); dropping its pages only means the next fetch
        // faults them in again from the same file.
        let r = unsafe {
            rustix::mm::madvise(
                start as *mut std::ffi::c_void,
                (end - start) as usize,
                rustix::mm::Advice::LinuxDontNeed,
            )
        };
        if let Err(e) = r {
            log::debug!("madvise(DONTNEED) on code at {start:#x}: {e}");
        }
    }
}

/// The programs' [`KernelConfig`] for the running kernel: computed once per
/// process (the kernel's BTF is parsed once, however many loaders need the
/// layout: lifecycle, attempt logging, LSM, doctor's probes).
pub fn kernel_config() -> Result<KernelConfig> {
    kernel_config_ref().copied()
}

fn kernel_config_ref() -> Result<&'static KernelConfig> {
    static LAYOUT: std::sync::OnceLock<KernelConfig> = std::sync::OnceLock::new();
    if let Some(c) = LAYOUT.get() {
        return Ok(c);
    }
    let c = compute_kernel_config()?;
    Ok(LAYOUT.get_or_init(|| c))
}

/// The eBPF loader shared by every load of start-up, with the kernel
/// layout set (see the module docs for why there is one), until
/// [`release_setup`].
static LOADER: std::sync::Mutex<Option<aya::EbpfLoader<'static>>> = std::sync::Mutex::new(None);
/// aya's parse of the kernel's BTF, for attaching fexit and LSM programs,
/// until [`release_setup`].
static ATTACH_BTF: std::sync::Mutex<Option<std::sync::Arc<aya::Btf>>> = std::sync::Mutex::new(None);

/// Drops the loader and aya's BTF once start-up has loaded everything:
/// they hold tens of MB of parsed BTF that a resident daemon must not keep.
/// A later load (a test, `doctor`) parses again.
pub fn release_setup() {
    let l = LOADER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    let b = ATTACH_BTF
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    drop((l, b));
}

/// Map sizes and runtime settings of one load of [`EBPF_OBJECT`].
pub struct LoadSpec {
    /// `(map name, max_entries)`: ring and map sizes (the rest get the
    /// smallest).
    pub max_entries: Vec<(&'static str, u32)>,
    /// The protect programs' runtime settings, for the protect layer.
    pub protect: bool,
}

/// Loads [`EBPF_OBJECT`] through the process's one loader, with `spec`'s
/// map sizes (every load sets all of them: the loader keeps settings).
pub fn load_object(spec: &LoadSpec) -> Result<aya::Ebpf> {
    static RUNTIME: std::sync::OnceLock<governor_common::protect::ProtectRuntime> =
        std::sync::OnceLock::new();
    let runtime = RUNTIME.get_or_init(|| governor_common::protect::ProtectRuntime {
        enabled: 1,
        daemon_tgid: std::process::id(),
    });
    static DISABLED: governor_common::protect::ProtectRuntime =
        governor_common::protect::ProtectRuntime {
            enabled: 0,
            daemon_tgid: 0,
        };
    let cfg = kernel_config_ref()?;
    let mut guard = LOADER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let l = guard.get_or_insert_with(|| {
        let mut l = aya::EbpfLoader::new();
        l.override_global(governor_common::KERNEL_CONFIG_SYMBOL, cfg, true);
        l
    });
    l.override_global(
        governor_common::protect::PROTECT_RUNTIME_SYMBOL,
        if spec.protect { runtime } else { &DISABLED },
        true,
    );
    // What a load doesn't name gets the smallest size: a copy that never
    // reads a ring or watches memory shouldn't hold their kernel memory.
    use governor_common::memory::{MEM_BUDGET_MAP, MEM_EVENTS_MAP, MEM_WATCH_MAP};
    let smallest = [
        (governor_common::EVENTS_MAP, 4096),
        (governor_common::protect::PROTECT_EVENTS_MAP, 4096),
        (MEM_EVENTS_MAP, 4096),
        (MEM_WATCH_MAP, 1),
        (MEM_BUDGET_MAP, 1),
        // aya-log's ring (128 KiB by default, mapped twice: 260 KB of the
        // daemon's RSS). Only the lifecycle copy's is read, and its
        // programs never log; the LSM layer's one warning is a courtesy,
        // its attempts are audited by the attempt-logging layer.
        ("AYA_LOGS", 4096),
    ];
    for (map, n) in smallest.into_iter().chain(spec.max_entries.iter().copied()) {
        l.map_max_entries(map, n);
    }
    l.load(EBPF_OBJECT)
        .context("loading governor's eBPF object into the kernel (needs root / CAP_BPF)")
}

/// The kernel's BTF as aya reads it, parsed once for every attachment of
/// start-up (until [`release_setup`]).
pub fn aya_btf() -> std::result::Result<std::sync::Arc<aya::Btf>, String> {
    let mut b = ATTACH_BTF
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some(btf) = b.as_ref() {
        return Ok(btf.clone());
    }
    let btf = std::sync::Arc::new(
        aya::Btf::from_sys_fs().map_err(|e| format!("reading kernel BTF: {e}"))?,
    );
    *b = Some(btf.clone());
    Ok(btf)
}

fn compute_kernel_config() -> Result<KernelConfig> {
    let btf = Btf::from_sys_fs()?;
    let tracefs = tracefs::tracefs_root().context(
        "tracefs is not mounted (tried /sys/kernel/tracing and /sys/kernel/debug/tracing); \
         mount it with `mount -t tracefs tracefs /sys/kernel/tracing` or run `cargo xtask setup`",
    )?;
    let off = |s: &str, m: &str| btf.member_offset(s, m);
    Ok(KernelConfig {
        configured: 1,
        task_exit_code: off("task_struct", "exit_code")?,
        task_start_time: off("task_struct", "start_time")?,
        task_real_parent: off("task_struct", "real_parent")?,
        task_tgid: off("task_struct", "tgid")?,
        task_pid: off("task_struct", "pid")?,
        task_mm: off("task_struct", "mm")?,
        mm_arg_start: off("mm_struct", "arg_start")?,
        mm_arg_end: off("mm_struct", "arg_end")?,
        tp_exec_filename: tracefs::field_offset(
            &tracefs,
            "sched",
            "sched_process_exec",
            "filename",
        )?,
        file_f_mode: off("file", "f_mode")?,
        file_f_inode: off("file", "f_inode")?,
        inode_i_ino: off("inode", "i_ino")?,
        inode_i_sb: off("inode", "i_sb")?,
        sb_s_dev: off("super_block", "s_dev")?,
        _pad: 0,
        // Protected files (issue 6).
        task_files: off("task_struct", "files")?,
        files_fdt: off("files_struct", "fdt")?,
        fdtable_fd: off("fdtable", "fd")?,
        fdtable_max_fds: off("fdtable", "max_fds")?,
        task_fs: off("task_struct", "fs")?,
        fs_pwd: off("fs_struct", "pwd")?,
        path_dentry: off("path", "dentry")?,
        dentry_d_inode: off("dentry", "d_inode")?,
        dentry_d_parent: off("dentry", "d_parent")?,
        dentry_d_name_ptr: off("dentry", "d_name")? + off("qstr", "name")?,
        mm_exe_file: off("mm_struct", "exe_file")?,
        file_f_path: off("file", "f_path")?,
        // Soft: a kernel without syscall tracepoints still runs lifecycle;
        // the protect loader refuses zeros with the reason.
        tp_sys_nr: tracefs::field_offset(&tracefs, "syscalls", "sys_enter_openat", "__syscall_nr")
            .unwrap_or(0),
        tp_sys_args: tracefs::field_offset(&tracefs, "syscalls", "sys_enter_openat", "dfd")
            .unwrap_or(0),
        tp_sys_ret: tracefs::field_offset(&tracefs, "syscalls", "sys_exit_openat", "ret")
            .unwrap_or(0),
        tp_exit_group_dead: tracefs::field_offset(
            &tracefs,
            "sched",
            "sched_process_exit",
            "group_dead",
        )
        .unwrap_or(governor_common::NO_FIELD),
        task_signal: off("task_struct", "signal")?,
        signal_live: off("signal_struct", "live")?,
        task_group_leader: off("task_struct", "group_leader")?,
        signal_pids: off("signal_struct", "pids")?,
        pid_numbers: off("pid", "numbers")?,
        upid_nr: off("upid", "nr")?,
        // Soft: without the tracepoint the memory tracker isn't loaded.
        tp_rss_curr: tracefs::field_offset(&tracefs, "kmem", "rss_stat", "curr")
            .unwrap_or(governor_common::NO_FIELD),
        tp_rss_member: tracefs::field_offset(&tracefs, "kmem", "rss_stat", "member")
            .unwrap_or(governor_common::NO_FIELD),
        tp_rss_size: tracefs::field_offset(&tracefs, "kmem", "rss_stat", "size")
            .unwrap_or(governor_common::NO_FIELD),
        _pad2: 0,
        // Soft: without them a binary on another mount is named relative
        // to that mount (user space then asks /proc/PID/exe).
        path_mnt: off("path", "mnt").unwrap_or(governor_common::NO_FIELD),
        vfsmount_mnt_root: off("vfsmount", "mnt_root").unwrap_or(governor_common::NO_FIELD),
        mount_mnt: off("mount", "mnt").unwrap_or(governor_common::NO_FIELD),
        mount_mnt_parent: off("mount", "mnt_parent").unwrap_or(governor_common::NO_FIELD),
        mount_mnt_mountpoint: off("mount", "mnt_mountpoint").unwrap_or(governor_common::NO_FIELD),
        _pad3: 0,
        lsm: lsm_args(&btf),
        ..regs_layout(&btf)
    })
}

/// Positions of the LSM hook arguments that moved between kernels, from
/// the BTF of `bpf_lsm_<hook>`. Missing hooks get `ARG_NONE`.
pub fn lsm_args(btf: &Btf) -> LsmArgs {
    let find = |hook: &str, param: &str| -> (u8, u8) {
        match btf.func_params(&format!("bpf_lsm_{hook}")) {
            Some(params) => match params.iter().position(|p| p == param) {
                Some(i) => (i as u8, params.len() as u8),
                None => (ARG_NONE, 0),
            },
            None => (ARG_NONE, 0),
        }
    };
    let (setattr_dentry, setattr_nargs) = find("inode_setattr", "dentry");
    let (setxattr_dentry, setxattr_nargs) = find("inode_setxattr", "dentry");
    let (removexattr_dentry, removexattr_nargs) = find("inode_removexattr", "dentry");
    let (set_acl_dentry, set_acl_nargs) = find("inode_set_acl", "dentry");
    let (remove_acl_dentry, remove_acl_nargs) = find("inode_remove_acl", "dentry");
    let (file_setattr_dentry, file_setattr_nargs) = find("inode_file_setattr", "dentry");
    LsmArgs {
        setattr_dentry,
        setattr_nargs,
        setxattr_dentry,
        setxattr_nargs,
        removexattr_dentry,
        removexattr_nargs,
        set_acl_dentry,
        set_acl_nargs,
        remove_acl_dentry,
        remove_acl_nargs,
        file_setattr_dentry,
        file_setattr_nargs,
    }
}

/// The syscall argument registers of the saved user `struct pt_regs`, from
/// BTF: a `KernelConfig` with only the `regs_*` fields set (`regs_ok` = 0
/// when this architecture or kernel doesn't fit).
pub fn regs_layout(btf: &Btf) -> KernelConfig {
    // The syscall calling convention (an ABI); the offsets come from BTF.
    // The last entry is the syscall number as entered.
    #[cfg(target_arch = "x86_64")]
    const ARG_REGS: [&str; 7] = ["di", "si", "dx", "r10", "r8", "r9", "orig_ax"];
    #[cfg(not(target_arch = "x86_64"))]
    const ARG_REGS: [&str; 7] = ["", "", "", "", "", "", ""];
    let offs: Option<Vec<u32>> = ARG_REGS
        .iter()
        .map(|r| btf.member_offset("pt_regs", r).ok())
        .collect();
    let mut c = KernelConfig::default();
    let Some(offs) = offs else {
        return c;
    };
    // The program reads 128 bytes from `window`; they must stay inside
    // pt_regs (it sits at the very top of the kernel stack: a read past its
    // end faults) and cover every argument register and the number.
    let size = btf.struct_size("pt_regs").unwrap_or(0);
    let (min, max) = match (offs.iter().min(), offs.iter().max()) {
        (Some(a), Some(b)) => (*a, *b),
        _ => return c,
    };
    let window = (max + 8).saturating_sub(128) / 8 * 8;
    if size < window + 128 || min < window {
        return c;
    }
    let rel: Vec<u32> = offs.iter().map(|o| o - window).collect();
    if rel.iter().any(|r| *r >= 128 || r % 8 != 0) {
        return c;
    }
    c.regs_window = window;
    c.regs_arg0 = rel[0];
    c.regs_arg1 = rel[1];
    c.regs_arg2 = rel[2];
    c.regs_arg3 = rel[3];
    c.regs_arg4 = rel[4];
    c.regs_arg5 = rel[5];
    c.regs_nr = rel[6];
    c.regs_ok = 1;
    c
}
