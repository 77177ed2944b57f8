//! Protected files (issue 6): types shared by the attempt-logging and LSM
//! programs (`governor-ebpf/src/protect.rs`) and the daemon
//! (`governor/src/protect/`).
//!
//! Matching is by inode ([`crate::InodeKey`]: the kernel's `s_dev` and
//! `i_ino`), never by path alone, so hard links, bind mounts, symlinks and
//! rename-over can't get around it.

/// Name of the read-only global [`ProtectRuntime`].
pub const PROTECT_RUNTIME_SYMBOL: &str = "GOVERNOR_PROTECT_RUNTIME";
/// Ring buffer of [`AttemptEvent`]s.
pub const PROTECT_EVENTS_MAP: &str = "PROTECT_EVENTS";
/// Per-CPU counter of attempt events lost to a full ring.
pub const PROTECT_DROPS_MAP: &str = "PROTECT_DROPS";
pub const ATTEMPT_BUDGET_MAP: &str = "ATTEMPT_BUDGET";
/// `InodeKey` → `u32` of `INODE_*` bits.
pub const PROTECTED_INODES_MAP: &str = "PROTECTED_INODES";
/// FNV-1a 64 of a protected file's basename → 1. Lets a *successful*
/// path-based operation on a protected name be reported (refused ones are
/// reported by their errno, whatever the name).
pub const PROTECTED_NAMES_MAP: &str = "PROTECTED_NAMES";
/// Syscall number → [`SyscallDesc`].
pub const SYSCALL_DESCS_MAP: &str = "SYSCALL_DESCS";
/// Entries of [`SYSCALL_DESCS_MAP`] (syscall numbers must be below this).
pub const SYSCALL_TABLE_SIZE: u32 = 512;
/// Program array whose entry 0 is `protect_fexit_worker`, the tail-call
/// target of every `protect_fexit_N` stub.
pub const FEXIT_WORKER_MAP: &str = "FEXIT_WORKER";
/// How many `protect_fexit_N` stubs the eBPF object has (one per watched
/// syscall; N counts from 0).
pub const FEXIT_SLOTS: u32 = 40;

/// The inode is protected: modifying syscalls on it are reported.
pub const INODE_PROTECTED: u32 = 1;
/// The BPF LSM layer refuses modifications (cleared during an approved
/// window).
pub const INODE_DENY: u32 = 2;
/// A guarded directory (the state directory): creating, removing, renaming
/// or linking entries in it is refused by the LSM layer and reported.
pub const INODE_DIR_GUARD: u32 = 4;
/// A window admits writes from one session only: the one
/// [`WINDOW_SESSIONS_MAP`] names for the inode (UNTOUCHABLE files, where
/// BPF LSM runs).
pub const INODE_SESSION: u32 = 8;
/// `InodeKey` → `u32` session id (initial pid namespace).
pub const WINDOW_SESSIONS_MAP: &str = "WINDOW_SESSIONS";

/// Runtime settings, set by the loader before load (read-only global).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProtectRuntime {
    /// 1 once filled in.
    pub enabled: u32,
    /// The daemon's own process: exempt from the LSM layer and not reported
    /// (it applies and lifts the flags).
    pub daemon_tgid: u32,
}

/// How a syscall is handled (`SyscallDesc::kind`).
pub const KIND_OPEN: u8 = 1;
/// Path-based (`unlink`, `rename`, `chmod`, …).
pub const KIND_PATH: u8 = 2;
/// fd-based (`ftruncate`, `fchmod`, …): the inode is resolved in the kernel.
pub const KIND_FD: u8 = 3;
/// `ioctl`: only the flag-changing commands.
pub const KIND_IOCTL: u8 = 4;

/// No such argument.
pub const ARG_NONE: u8 = 0xff;

/// How to read one syscall's arguments. Indices count the syscall's
/// arguments (0 = first); the loader derives them from the tracefs format by
/// field name.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallDesc {
    /// 0 = not handled.
    pub kind: u8,
    /// An `Op` as u8.
    pub op: u8,
    /// First path and the dirfd it is relative to.
    pub path0: u8,
    pub dirfd0: u8,
    /// Second path (rename / link target).
    pub path1: u8,
    pub dirfd1: u8,
    /// fd argument (fd-based syscalls, ioctl).
    pub fd: u8,
    /// Open flags (`open`, `openat`) or the `AT_*` flags argument.
    pub flags: u8,
    /// `struct open_how *` (`openat2`).
    pub how: u8,
    /// ioctl command and argument.
    pub cmd: u8,
    pub arg: u8,
    pub _pad: u8,
    /// Open flags implied by the syscall (`creat`).
    pub implied_flags: u32,
}

/// Operations, as reported.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Open = 1,
    Truncate = 2,
    Rename = 3,
    Unlink = 4,
    Link = 5,
    Chmod = 6,
    Chown = 7,
    SetXattr = 8,
    RemoveXattr = 9,
    Utimes = 10,
    SetFlags = 11,
}

impl Op {
    pub fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Open,
            2 => Op::Truncate,
            3 => Op::Rename,
            4 => Op::Unlink,
            5 => Op::Link,
            6 => Op::Chmod,
            7 => Op::Chown,
            8 => Op::SetXattr,
            9 => Op::RemoveXattr,
            10 => Op::Utimes,
            11 => Op::SetFlags,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Op::Open => "open",
            Op::Truncate => "truncate",
            Op::Rename => "rename",
            Op::Unlink => "unlink",
            Op::Link => "link",
            Op::Chmod => "chmod",
            Op::Chown => "chown",
            Op::SetXattr => "setxattr",
            Op::RemoveXattr => "removexattr",
            Op::Utimes => "utimes",
            Op::SetFlags => "setflags",
        }
    }
}

/// Longest path an attempt event carries (bytes, NUL included). A power
/// of two so the programs can bound accesses with a mask.
pub const ATTEMPT_PATH_MAX: usize = 256;
/// Components of the executable's path carried (leaf first).
pub const EXE_DEPTH: usize = 8;
/// Bytes per executable path component.
pub const EXE_NAME_MAX: usize = 48;

/// `AttemptEvent::valid` bits.
pub const VALID_KEY: u32 = 1;
pub const VALID_PATH0: u32 = 2;
pub const VALID_PATH1: u32 = 4;
pub const VALID_BASE0: u32 = 8;
pub const VALID_BASE1: u32 = 16;
/// The executable's path reached the namespace's root across mounts: the
/// names in `exe` are the whole path.
pub const VALID_EXE_WHOLE: u32 = 32;

/// Attempt records one uid may put on the ring per second per CPU; beyond, its
/// attempts are counted in its [`AttemptBudget`] instead. A flood costs
/// the flooder, not the record: another uid's attempt in the middle of
/// it still has room on the ring.
pub const ATTEMPT_BURST: u32 = 16;
/// Budgets kept (an LRU map: the least recently active goes); two per uid
/// at most, one per [`BudgetClass`].
pub const ATTEMPT_BUDGET_ENTRIES: u32 = 4096;

/// Which budget a record is paid from. Each uid has two, so that one kind
/// of traffic cannot starve the other: a root process renaming its own
/// `audit.jsonl` thousands of times a second (a name a protected file also
/// has) must not turn root's real attempts into a mere count.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BudgetClass {
    /// Attempts: refused calls, and calls on an inode known protected.
    Attempts = 0,
    /// Successful path-based calls reported only because a basename is a
    /// protected one: user space resolves the path to learn whether the
    /// file is protected (mostly it is not).
    NameMatches = 1,
}

impl BudgetClass {
    /// The `ATTEMPT_BUDGET` key of `uid`'s budget of this class.
    pub const fn key(self, uid: u32) -> u64 {
        ((self as u64) << 32) | uid as u64
    }

    /// The (uid, class) of an `ATTEMPT_BUDGET` key; `None` for a class
    /// this build doesn't know.
    pub const fn split(key: u64) -> Option<(u32, BudgetClass)> {
        let uid = key as u32;
        match key >> 32 {
            0 => Some((uid, BudgetClass::Attempts)),
            1 => Some((uid, BudgetClass::NameMatches)),
            _ => None,
        }
    }
}

/// Per uid, class and CPU (`ATTEMPT_BUDGET`, keyed by
/// [`BudgetClass::key`]; an LRU per-CPU hash the kernel
/// writes without atomics): the current one-second window and the running
/// count of attempts it didn't report one by one (user space sums the
/// CPUs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AttemptBudget {
    /// `bpf_ktime_get_ns()` when the window began.
    pub window_ns: u64,
    /// Attempts counted and not reported, since the map entry was made
    /// (only ever grows; user space keeps what it has reported).
    pub suppressed_total: u64,
    /// Records put on the ring in this window.
    pub emitted: u32,
    pub _pad: u32,
}

/// One attempt to modify a file, reported at syscall exit with its result.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct AttemptEvent {
    /// Syscall number.
    pub nr: u32,
    /// An [`Op`] as u32.
    pub op: u32,
    pub pid: u32,
    pub tid: u32,
    pub ppid: u32,
    pub uid: u32,
    /// The syscall's return value (negative errno when refused).
    pub ret: i64,
    /// `bpf_ktime_get_ns()` at exit.
    pub ts_ns: u64,
    /// `VALID_*` bits.
    pub valid: u32,
    /// Exe path components found (leaf first).
    pub exe_depth: u32,
    /// The inode, when the kernel resolved it (fd-based ops, successful
    /// opens).
    pub key: crate::InodeKey,
    /// The directory `path0` / `path1` are relative to (cwd or dirfd), for
    /// relative paths.
    pub base0: crate::InodeKey,
    pub base1: crate::InodeKey,
    /// The raw dirfd arguments (`AT_FDCWD` = -100 when none).
    pub dirfd0: i32,
    pub dirfd1: i32,
    /// Open flags, `AT_*` flags, or the ioctl command.
    pub flags: u64,
    /// ioctl: the flags value being set.
    pub arg: u64,
    pub comm: [u8; crate::COMM_LEN],
    pub path0: [u8; ATTEMPT_PATH_MAX],
    pub path1: [u8; ATTEMPT_PATH_MAX],
    pub exe: [[u8; EXE_NAME_MAX]; EXE_DEPTH],
}

/// Argument positions (0-based) of BPF LSM hooks whose signatures differ
/// between kernels, and each hook's argument count (the previous
/// program's verdict sits right after the last argument). 0xff: the hook
/// does not exist on this kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LsmArgs {
    pub setattr_dentry: u8,
    pub setattr_nargs: u8,
    pub setxattr_dentry: u8,
    pub setxattr_nargs: u8,
    pub removexattr_dentry: u8,
    pub removexattr_nargs: u8,
    pub set_acl_dentry: u8,
    pub set_acl_nargs: u8,
    pub remove_acl_dentry: u8,
    pub remove_acl_nargs: u8,
    /// `inode_file_setattr` (6.17+, `file_setattr(2)` and FS_IOC_FSSETXATTR).
    pub file_setattr_dentry: u8,
    pub file_setattr_nargs: u8,
}

/// FNV-1a 64, the basename hash of [`PROTECTED_NAMES_MAP`].
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
pub const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64 of `name` (user space side; the programs inline the same).
pub fn name_hash(name: &[u8]) -> u64 {
    let mut h = FNV_OFFSET;
    for &c in name {
        h = (h ^ c as u64).wrapping_mul(FNV_PRIME);
    }
    h
}

// ioctl commands that change inode flags (x86_64/generic encodings).
/// `FS_IOC_SETFLAGS` (`_IOW('f', 2, long)`).
pub const FS_IOC_SETFLAGS: u32 = 0x4008_6602;
/// `FS_IOC32_SETFLAGS` (`_IOW('f', 2, int)`).
pub const FS_IOC32_SETFLAGS: u32 = 0x4004_6602;
/// `FS_IOC_FSSETXATTR` (`_IOW('X', 32, struct fsxattr)`).
pub const FS_IOC_FSSETXATTR: u32 = 0x401c_5820;

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)] structs of integers and byte arrays whose sizes
    // leave no implicit padding, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::ProtectRuntime {}
    // SAFETY: as above (12 u8 fields + one u32: no padding).
    unsafe impl aya::Pod for super::SyscallDesc {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LsmArgs {}
    // SAFETY: as above (two u64, two u32).
    unsafe impl aya::Pod for super::AttemptBudget {}
}
