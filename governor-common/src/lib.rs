//! Types shared by the kernel programs (`governor-ebpf`) and user space
//! (`governor`). Everything here is `#[repr(C)]` and plain old data: the
//! kernel writes these bytes into the ring buffer and user space reads them
//! back, so both sides must agree on every offset.
#![no_std]

/// Longest executable path the exec event carries (bytes, NUL-terminated).
pub const FILENAME_MAX: usize = 256;
/// Longest argv block the exec event carries (NUL-separated arguments).
/// A power of two so the kernel side can bound the copy with a mask.
pub const ARGV_MAX: usize = 512;
/// Default lifecycle ring size. 256 KiB holds ~300 exec records (the
/// largest) of backlog, which the lossless storm test and benchmark (5,000+
/// fork+exec+exit at this machine's top rate) never fill while the daemon
/// drains it. User space maps the ring twice (for wrap-around), so every
/// KiB here costs two of the daemon's RSS.
pub const DEFAULT_RING_BYTES: u32 = 1 << 18;

/// `TASK_COMM_LEN` in the kernel.
pub const COMM_LEN: usize = 16;

/// Discriminates the events in the ring buffer; the first field of every event.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Exec = 1,
    Exit = 2,
    Fork = 3,
}

impl EventKind {
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Exec),
            2 => Some(Self::Exit),
            3 => Some(Self::Fork),
            _ => None,
        }
    }
}

/// Common prefix of every event.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// An [`EventKind`] as u32.
    pub kind: u32,
    /// Thread-group id (the process id user space knows) the event is about.
    pub pid: u32,
    /// Thread-group id of the real parent.
    pub ppid: u32,
    /// Real uid of the task (`bpf_get_current_uid_gid`, init user
    /// namespace): who runs it, as only the kernel can say.
    pub uid: u32,
    /// `bpf_ktime_get_ns()` when the event fired (CLOCK_MONOTONIC).
    pub ts_ns: u64,
    /// The process's `task_struct.start_time` (CLOCK_MONOTONIC, ns).
    pub start_ns: u64,
}

/// A successful `execve`: the process now runs `filename`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecEvent {
    pub hdr: EventHeader,
    pub comm: [u8; COMM_LEN],
    /// Bytes of `filename` used, without the NUL.
    pub filename_len: u32,
    /// Bytes of `argv` copied (may be cut at [`ARGV_MAX`]).
    pub argv_len: u32,
    /// Set when the argv block was longer than [`ARGV_MAX`].
    pub argv_truncated: u32,
    pub _pad: u32,
    pub filename: [u8; FILENAME_MAX],
    pub argv: [u8; ARGV_MAX],
}

/// The death of a process (its thread-group leader exiting).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExitEvent {
    pub hdr: EventHeader,
    /// `task_struct.exit_code`: status in bits 8..16, terminating signal in
    /// bits 0..7, core-dump flag in bit 7 (the `wait(2)` encoding).
    pub exit_code: u32,
    pub _pad: u32,
    pub comm: [u8; COMM_LEN],
}

/// A new process (not a thread) was forked.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ForkEvent {
    pub hdr: EventHeader,
    pub comm: [u8; COMM_LEN],
}

/// Offsets the programs need, computed by user space at load time from the
/// running kernel's BTF (`/sys/kernel/btf/vmlinux`) and the tracepoint
/// formats in tracefs. Rust eBPF objects carry no CO-RE relocations, so
/// nothing about kernel struct layout may be compiled in: an object built with
/// one kernel's offsets reads garbage on another.
///
/// Handed to the programs as the read-only global [`KERNEL_CONFIG_SYMBOL`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelConfig {
    /// 1 once user space filled this in; the programs do nothing while 0.
    pub configured: u32,
    pub task_exit_code: u32,
    pub task_start_time: u32,
    pub task_real_parent: u32,
    pub task_tgid: u32,
    pub task_pid: u32,
    pub task_mm: u32,
    pub mm_arg_start: u32,
    pub mm_arg_end: u32,
    /// Offset of the `__data_loc char[] filename` field in the
    /// `sched_process_exec` tracepoint record.
    pub tp_exec_filename: u32,
    pub file_f_mode: u32,
    pub file_f_inode: u32,
    pub inode_i_ino: u32,
    pub inode_i_sb: u32,
    pub sb_s_dev: u32,
    pub _pad: u32,
    // --- Protected files (issue 6); see [`protect`]. ---
    /// `task_struct.files` → `files_struct.fdt` → `fdtable.{fd,max_fds}`:
    /// fd → `struct file *` without CO-RE.
    pub task_files: u32,
    pub files_fdt: u32,
    pub fdtable_fd: u32,
    pub fdtable_max_fds: u32,
    /// `task_struct.fs` → `fs_struct.pwd` (a `struct path`) → `path.dentry`.
    pub task_fs: u32,
    pub fs_pwd: u32,
    pub path_dentry: u32,
    pub dentry_d_inode: u32,
    pub dentry_d_parent: u32,
    /// `dentry.d_name` plus `qstr.name`: the name pointer of a dentry.
    pub dentry_d_name_ptr: u32,
    pub mm_exe_file: u32,
    pub file_f_path: u32,
    /// Offsets in the `syscalls/sys_enter_*` / `sys_exit_*` records (from
    /// the tracefs formats): `__syscall_nr`, the first argument (the others
    /// follow at 8-byte steps, checked per syscall by the loader) and `ret`.
    pub tp_sys_nr: u32,
    pub tp_sys_args: u32,
    pub tp_sys_ret: u32,
    /// Argument positions of the BPF LSM hooks whose signatures changed
    /// across kernels (e.g. `inode_setattr` gained an idmap argument), from
    /// the BTF of `bpf_lsm_<hook>`; see [`protect::LsmArgs`].
    pub lsm: protect::LsmArgs,
    /// Saved user registers (`struct pt_regs`, from BTF): the offset of a
    /// 128-byte window read at syscall exit, and each syscall argument's
    /// offset inside it (x86_64: di, si, dx, r10, r8, r9), and that of the
    /// syscall number the task entered with (x86_64: orig_ax).
    pub regs_window: u32,
    pub regs_nr: u32,
    pub regs_arg0: u32,
    pub regs_arg1: u32,
    pub regs_arg2: u32,
    pub regs_arg3: u32,
    pub regs_arg4: u32,
    pub regs_arg5: u32,
    /// 1 when the register layout above was found.
    pub regs_ok: u32,
    // --- Exits: a death is the thread group's death. ---
    /// Offset of `bool group_dead` in the `sched_process_exit` record where
    /// the kernel has it (6.18), else [`NO_FIELD`].
    pub tp_exit_group_dead: u32,
    /// `task_struct.signal` → `signal_struct.live` (an `atomic_t`, already
    /// decremented when the tracepoint fires): the fallback for kernels
    /// whose tracepoint has no `group_dead` (6.1, 6.12).
    pub task_signal: u32,
    pub signal_live: u32,
    /// `task_struct.group_leader`: a group's start time is its leader's,
    /// even when a worker thread is the last to exit.
    pub task_group_leader: u32,
    /// `signal_struct.pids[]` (`struct pid *`, indexed by `enum pid_type`),
    /// `pid.numbers[]` and `upid.nr`: the session id of a task, as the
    /// initial pid namespace numbers it, for windows that admit writes
    /// from one login session only.
    pub signal_pids: u32,
    pub pid_numbers: u32,
    pub upid_nr: u32,
    // --- Memory budgets (issue 11); see [`memory`]. ---
    /// Offsets of `curr`, `member` and `size` in the `kmem/rss_stat`
    /// record (from the tracefs format), or [`NO_FIELD`] where the kernel
    /// has no such tracepoint: then the memory tracker isn't loaded and the
    /// daemon reads `/proc` more often instead.
    pub tp_rss_curr: u32,
    pub tp_rss_member: u32,
    pub tp_rss_size: u32,
    pub _pad2: u32,
    // --- Executable paths across mounts (issue 14). ---
    /// `path.mnt`, `vfsmount.mnt_root`, and in `struct mount` (which
    /// embeds the `vfsmount` at `mount_mnt`) `mnt_parent` and
    /// `mnt_mountpoint`: at the root of a mount, the walk from an
    /// executable's dentry up to `/` steps to where that mount is mounted,
    /// so a binary on another mount gets its whole path.
    pub path_mnt: u32,
    pub vfsmount_mnt_root: u32,
    pub mount_mnt: u32,
    pub mount_mnt_parent: u32,
    pub mount_mnt_mountpoint: u32,
    pub _pad3: u32,
}

/// `PIDTYPE_SID` of the kernel's `enum pid_type` (stable since 4.19).
pub const PIDTYPE_SID: u32 = 3;

/// An offset that the running kernel doesn't have.
pub const NO_FIELD: u32 = u32::MAX;

/// Name of the global holding the [`KernelConfig`].
pub const KERNEL_CONFIG_SYMBOL: &str = "GOVERNOR_KERNEL_CONFIG";
/// Name of the lifecycle ring buffer map.
pub const EVENTS_MAP: &str = "EVENTS";
/// Name of the per-CPU counter of events lost because the ring was full.
pub const DROPS_MAP: &str = "DROPPED";
/// Name of the hash map of inodes the LSM layer refuses writes to.
pub const DENY_INODES_MAP: &str = "DENY_WRITE_INODES";
/// Name of the hash map of supervisor tgids (pm2 God daemons, systemd)
/// whose children's execs wake user space at once.
pub const WAKE_PARENTS_MAP: &str = "WAKE_PARENTS";

/// Key of [`DENY_INODES_MAP`]: a file identified by device and inode number,
/// not by path, so hard links and renames can't get around it. `dev` uses the
/// kernel's encoding (`major << 20 | minor`), not glibc's `st_dev`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InodeKey {
    pub dev: u32,
    pub _pad: u32,
    pub ino: u64,
}

pub mod memory;
pub mod protect;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] structs of integers and byte arrays
    // with explicit padding fields, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::KernelConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::InodeKey {}
}
