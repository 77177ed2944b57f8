//! Protected files (issue 6): layer 2 (attempt logging at syscall exit)
//! and layer 3 (BPF LSM refusals).
//!
//! Layer 2 is one generic body, [`attempt`], run at the exit of every
//! syscall that can modify a file: from one fexit stub per syscall where
//! the kernel allows trampolines (`protect_fexit_N`, each a tail call into
//! `protect_fexit_worker`; other syscalls pay nothing), else from the
//! `syscalls/sys_exit_*` tracepoints (`protect_sys_exit`; every syscall
//! then takes the kernel's slow path). Exit only: the entry side is not
//! hooked at all — the arguments are read back from the task's saved user
//! registers (register offsets from BTF), which still hold them at exit.
//! User space describes each syscall in [`SYSCALL_DESCS`] (which argument
//! is the path, the dirfd, the fd, the flags — derived from the tracefs
//! formats), so the program holds no per-syscall layout.
//!
//! One [`AttemptEvent`] per attempt, with the result:
//!
//! * open family: with write intent or `O_TRUNC` only (read opens cost one
//!   flags test) — when it succeeded on a protected inode (resolved from the
//!   new fd: task → files → fdtable → file → inode, offsets from BTF), or
//!   was refused (EPERM/EACCES, which is how the kernel and the LSM layer
//!   refuse) whatever the name, for user space to resolve by inode;
//! * fd-based calls and flag-changing ioctls on a protected inode;
//! * path-based calls refused (EPERM/EACCES) whatever the name, or
//!   successful on a protected basename ([`PROTECTED_NAMES`]).
//!
//! Layer 3 refuses, with EPERM, every modification of an inode marked
//! `INODE_DENY`, for every process but the daemon.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_current_uid_gid, bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes,
        bpf_probe_read_user, bpf_probe_read_user_str_bytes,
        generated::{bpf_get_current_task_btf, bpf_task_pt_regs},
    },
    macros::{fexit, lsm, map, tracepoint},
    maps::{Array, HashMap, LruPerCpuHashMap, PerCpuArray, ProgramArray, RingBuf},
    programs::{FExitContext, LsmContext, TracePointContext},
    EbpfContext,
};
use governor_common::{
    protect::{
        AttemptBudget, AttemptEvent, BudgetClass, ProtectRuntime, SyscallDesc, ARG_NONE,
        ATTEMPT_BUDGET_ENTRIES, ATTEMPT_BURST, ATTEMPT_PATH_MAX, EXE_DEPTH, FNV_OFFSET, FNV_PRIME,
        FS_IOC32_SETFLAGS, FS_IOC_FSSETXATTR, FS_IOC_SETFLAGS, INODE_DENY, INODE_DIR_GUARD,
        INODE_SESSION, KIND_FD, KIND_IOCTL, KIND_OPEN, KIND_PATH, SYSCALL_TABLE_SIZE, VALID_BASE0,
        VALID_BASE1, VALID_EXE_WHOLE, VALID_KEY, VALID_PATH0, VALID_PATH1,
    },
    InodeKey, NO_FIELD, PIDTYPE_SID,
};

use crate::{read_at, GOVERNOR_KERNEL_CONFIG};

/// Mounts the executable walk crosses at most (a binary on a mount on a
/// mount…); each crossing records no name.
const EXE_MOUNT_HOPS: u32 = 8;

/// Filled in by the protect loader before load (see `ProtectRuntime`).
#[no_mangle]
static GOVERNOR_PROTECT_RUNTIME: ProtectRuntime = ProtectRuntime {
    enabled: 0,
    daemon_tgid: 0,
};

/// Attempt events. The size is a default: the loader may set another.
#[map(name = "PROTECT_EVENTS")]
static PROTECT_EVENTS: RingBuf = RingBuf::with_byte_size(256 << 10, 0);

#[map(name = "PROTECT_DROPS")]
static PROTECT_DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "PROTECTED_INODES")]
static PROTECTED_INODES: HashMap<InodeKey, u32> = HashMap::with_max_entries(16384, 0);

/// Windows that admit one session only: inode → session id.
#[map(name = "WINDOW_SESSIONS")]
static WINDOW_SESSIONS: HashMap<InodeKey, u32> = HashMap::with_max_entries(1024, 0);

#[map(name = "PROTECTED_NAMES")]
static PROTECTED_NAMES: HashMap<u64, u32> = HashMap::with_max_entries(16384, 0);

#[map(name = "SYSCALL_DESCS")]
static SYSCALL_DESCS: Array<SyscallDesc> = Array::with_max_entries(SYSCALL_TABLE_SIZE, 0);

/// Scratch space to test a path's basename before reserving ring space.
#[map(name = "PROTECT_SCRATCH")]
static PROTECT_SCRATCH: PerCpuArray<[u8; ATTEMPT_PATH_MAX]> = PerCpuArray::with_max_entries(1, 0);

/// One attempt being examined. It lives in a per-CPU map rather than on
/// the stack: values loaded back from map memory are unknown to the
/// verifier, so the paths through the per-kind checks converge before the
/// (loop-heavy) reporting code instead of multiplying its verification.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Work {
    /// The saved user-register window the arguments are read from.
    win: [u64; 16],
    /// Six arguments; two zero slots so a masked index stays in bounds.
    args: [u64; 8],
    key: InodeKey,
    flags: u64,
    value: u64,
    ret: i64,
    nr: u32,
    valid: u32,
    desc: SyscallDesc,
    /// The budget the record is paid from (a `BudgetClass` as u32).
    class: u32,
    _pad: u32,
}

#[map(name = "PROTECT_WORK")]
static PROTECT_WORK: PerCpuArray<Work> = PerCpuArray::with_max_entries(1, 0);

const EPERM: i64 = 1;
const EACCES: i64 = 13;
const O_ACCMODE: u64 = 3;
const O_TRUNC: u64 = 0o1000;
const AT_FDCWD: i32 = -100;
const AT_EMPTY_PATH: u64 = 0x1000;
const FMODE_WRITE: u32 = 0x2;

/// Reads one field of the kernel config. A volatile load from the frozen
/// read-only global, so the verifier sees it as a constant (and prunes
/// branches that depend on it, which the LSM argument selection needs).
macro_rules! kc {
    ($f:ident) => {{
        #[allow(unused_unsafe)]
        // SAFETY: a volatile read of a field of an always-initialised static.
        let v = unsafe { core::ptr::read_volatile(&GOVERNOR_KERNEL_CONFIG.$f) };
        v
    }};
}

macro_rules! rt {
    ($f:ident) => {{
        #[allow(unused_unsafe)]
        // SAFETY: as for `kc!`.
        let v = unsafe { core::ptr::read_volatile(&GOVERNOR_PROTECT_RUNTIME.$f) };
        v
    }};
}

#[inline(always)]
fn active() -> bool {
    kc!(configured) != 0 && rt!(enabled) != 0
}

#[inline(always)]
fn is_daemon() -> bool {
    (bpf_get_current_pid_tgid() >> 32) as u32 == rt!(daemon_tgid)
}

/// Per-uid attempt budgets, two per uid (see `ATTEMPT_BURST`, `BudgetClass`).
#[map]
static ATTEMPT_BUDGET: LruPerCpuHashMap<u64, AttemptBudget> =
    LruPerCpuHashMap::with_max_entries(ATTEMPT_BUDGET_ENTRIES, 0);

/// Takes one ring record from budget `key` (a uid's budget of one class,
/// `BudgetClass::key`) for this second on this CPU: `false` when it is
/// spent, and this attempt was counted instead.
#[inline(always)]
fn take_budget(key: u64) -> bool {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    match ATTEMPT_BUDGET.get_ptr_mut(&key) {
        Some(b) => {
            // SAFETY: this CPU's copy of the map value, from the lookup,
            // valid for this program run (no other program touches it
            // while this one runs on this CPU).
            unsafe {
                if now.wrapping_sub((*b).window_ns) >= 1_000_000_000 {
                    (*b).window_ns = now;
                    (*b).emitted = 0;
                }
                if (*b).emitted >= ATTEMPT_BURST {
                    (*b).suppressed_total += 1;
                    return false;
                }
                (*b).emitted += 1;
                true
            }
        }
        None => {
            let fresh = AttemptBudget {
                window_ns: now,
                suppressed_total: 0,
                emitted: 1,
                _pad: 0,
            };
            let _ = ATTEMPT_BUDGET.insert(&key, &fresh, 0);
            true
        }
    }
}

#[inline(always)]
fn count_drop() {
    if let Some(slot) = PROTECT_DROPS.get_ptr_mut(0) {
        // SAFETY: per-CPU slot from the lookup, valid for this program run.
        unsafe { *slot += 1 };
    }
}

/// The identity of an inode: (`i_sb->s_dev`, `i_ino`).
#[inline(always)]
fn inode_key(inode: u64) -> InodeKey {
    if inode == 0 {
        return InodeKey {
            dev: 0,
            _pad: 0,
            ino: 0,
        };
    }
    let sb: u64 = read_at(inode, kc!(inode_i_sb));
    InodeKey {
        dev: read_at(sb, kc!(sb_s_dev)),
        _pad: 0,
        ino: read_at(inode, kc!(inode_i_ino)),
    }
}

#[inline(always)]
fn dentry_key(dentry: u64) -> InodeKey {
    inode_key(read_at(dentry, kc!(dentry_d_inode)))
}

/// The inode behind `fd` of the current task.
#[inline(always)]
fn fd_key(task: u64, fd: u64) -> InodeKey {
    let files: u64 = read_at(task, kc!(task_files));
    let fdt: u64 = read_at(files, kc!(files_fdt));
    let max: u32 = read_at(fdt, kc!(fdtable_max_fds));
    if fd >= max as u64 {
        return inode_key(0);
    }
    let arr: u64 = read_at(fdt, kc!(fdtable_fd));
    if arr == 0 {
        return inode_key(0);
    }
    let file: u64 = read_at(arr + fd * 8, 0);
    inode_key(read_at(file, kc!(file_f_inode)))
}

/// The inode of the current working directory.
#[inline(always)]
fn cwd_key(task: u64) -> InodeKey {
    let fs: u64 = read_at(task, kc!(task_fs));
    if fs == 0 {
        return inode_key(0);
    }
    let dentry: u64 = read_at(fs, kc!(fs_pwd) + kc!(path_dentry));
    dentry_key(dentry)
}

#[inline(always)]
fn flags_of(key: &InodeKey) -> u32 {
    if key.ino == 0 {
        return 0;
    }
    // SAFETY: the value is copied out right away.
    unsafe { PROTECTED_INODES.get(key) }.copied().unwrap_or(0)
}

#[inline(always)]
fn is_protected(key: &InodeKey) -> bool {
    flags_of(key) != 0
}

#[inline(always)]
fn arg_of(p: &Work, i: u8) -> u64 {
    // A mask, not a match or a range check: the verifier (6.1 too) must see
    // the bound on the very register used for the access, and the compiler
    // must not prove the mask redundant. Slots 6 and 7 stay zero, so
    // ARG_NONE (0xff → 7) reads 0.
    p.args[(i & 7) as usize]
}

/// Reads the current syscall's arguments from the saved user registers
/// into `w.args`.
#[inline(always)]
fn syscall_args(w: &mut Work) -> bool {
    // SAFETY: both helpers are valid in tracing programs; the task pointer
    // is the current task's.
    let regs = unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) } as u64;
    if regs == 0 {
        return false;
    }
    // One read of the register window, then each argument by its offset
    // (from BTF) into it.
    let src = (regs + kc!(regs_window) as u64) as *const u8;
    // SAFETY: a kernel read through the helper into map memory we own.
    let dst = unsafe { core::slice::from_raw_parts_mut(w.win.as_mut_ptr() as *mut u8, 128) };
    // SAFETY: as above.
    if unsafe { aya_ebpf::helpers::bpf_probe_read_kernel_buf(src, dst) }.is_err() {
        return false;
    }
    let at = |w: &Work, off: u32| w.win[(off / 8) as usize & 15];
    w.args = [
        at(w, kc!(regs_arg0)),
        at(w, kc!(regs_arg1)),
        at(w, kc!(regs_arg2)),
        at(w, kc!(regs_arg3)),
        at(w, kc!(regs_arg4)),
        at(w, kc!(regs_arg5)),
        0,
        0,
    ];
    true
}

/// One saved user register: `regs` is a BTF-typed `struct pt_regs *`
/// (from `bpf_task_pt_regs` or the fexit argument), so this is a direct,
/// fault-safe load at a constant offset, not a helper call.
#[inline(always)]
fn reg_at(regs: u64, window_off: u32) -> u64 {
    if regs == 0 {
        return 0;
    }
    // SAFETY: the verifier checks the load against pt_regs' BTF layout;
    // the offset is a constant from the frozen kernel config.
    unsafe {
        core::ptr::read_volatile((regs + (kc!(regs_window) + window_off) as u64) as *const u64)
    }
}

/// Syscall argument `i` (0–5) straight from the saved user registers.
#[inline(always)]
fn arg_reg(regs: u64, i: u8) -> u64 {
    match i {
        0 => reg_at(regs, kc!(regs_arg0)),
        1 => reg_at(regs, kc!(regs_arg1)),
        2 => reg_at(regs, kc!(regs_arg2)),
        3 => reg_at(regs, kc!(regs_arg3)),
        4 => reg_at(regs, kc!(regs_arg4)),
        5 => reg_at(regs, kc!(regs_arg5)),
        _ => 0,
    }
}

/// FNV-1a 64 of the last component of the NUL-terminated path in `buf`.
#[inline(always)]
fn basename_hash(buf: &[u8; ATTEMPT_PATH_MAX]) -> u64 {
    let mut h = FNV_OFFSET;
    let mut i = 0;
    while i < ATTEMPT_PATH_MAX {
        let c = buf[i & (ATTEMPT_PATH_MAX - 1)];
        if c == 0 {
            break;
        }
        if c == b'/' {
            h = FNV_OFFSET;
        } else {
            h = (h ^ c as u64).wrapping_mul(FNV_PRIME);
        }
        i += 1;
    }
    h
}

/// Whether the basename of path argument `idx` is a protected name.
#[inline(never)]
fn path_name_protected(p: &Work, idx: u8) -> bool {
    if idx == ARG_NONE {
        return false;
    }
    let ptr = arg_of(p, idx);
    if ptr == 0 {
        return false;
    }
    let Some(buf) = PROTECT_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: the per-CPU scratch buffer is ours for this program run.
    let buf = unsafe { &mut *buf };
    buf[0] = 0;
    // SAFETY: a user pointer read through the helper, bounded by `buf`.
    if unsafe { bpf_probe_read_user_str_bytes(ptr as *const u8, buf) }.is_err() {
        return false;
    }
    let h = basename_hash(buf);
    // SAFETY: presence test only.
    unsafe { PROTECTED_NAMES.get(&h) }.is_some()
}

/// Reads the path argument `idx` into `dst`; returns whether it was read.
/// `base` receives the directory it is relative to when it is relative.
#[inline(always)]
fn read_path(
    task: u64,
    p: &Work,
    path_idx: u8,
    dirfd_idx: u8,
    dst: &mut [u8; ATTEMPT_PATH_MAX],
    base: &mut InodeKey,
    dirfd: &mut i32,
) -> (bool, bool) {
    *dirfd = AT_FDCWD;
    if path_idx == ARG_NONE {
        return (false, false);
    }
    let ptr = arg_of(p, path_idx);
    if ptr == 0 {
        return (false, false);
    }
    // SAFETY: a user pointer read through the helper, bounded by `dst`.
    let ok = unsafe { bpf_probe_read_user_str_bytes(ptr as *const u8, dst) }.is_ok();
    if !ok {
        return (false, false);
    }
    if dst[0] == b'/' {
        return (true, false);
    }
    if dirfd_idx != ARG_NONE {
        *dirfd = arg_of(p, dirfd_idx) as i32;
    }
    *base = if *dirfd == AT_FDCWD {
        cwd_key(task)
    } else {
        fd_key(task, *dirfd as u32 as u64)
    };
    (true, base.ino != 0)
}

/// Layer 2 where the kernel refuses trampolines (fentry/fexit): one program
/// on the `syscalls/sys_exit_*` tracepoint of every watched syscall. Any
/// syscall tracepoint puts every task's every syscall on the kernel's slow
/// path, so this is the fallback, not the first choice.
#[tracepoint]
pub fn protect_sys_exit(ctx: TracePointContext) -> u32 {
    if !active() {
        return 0;
    }
    // Every watched syscall passes here. The record's layout comes from its
    // tracefs format; where it is the usual one (`__syscall_nr` at 8, `ret`
    // at 16) the fields are loaded directly — the verifier only allows
    // context loads at offsets written into the instruction, and prunes the
    // branch not taken since the config is constant — else by helper.
    let rec = ctx.as_ptr() as *const u8;
    let nr: i32 = if kc!(tp_sys_nr) == 8 {
        // SAFETY: `__syscall_nr` (int) at offset 8 of the sys_exit record.
        unsafe { core::ptr::read_volatile(rec.add(8) as *const i32) }
    } else {
        // SAFETY: a read inside the record at the offset from its format.
        unsafe { ctx.read_at(kc!(tp_sys_nr) as usize) }.unwrap_or(-1)
    };
    let ret: i64 = if kc!(tp_sys_ret) == 16 {
        // SAFETY: `ret` (long) at offset 16 of the sys_exit record.
        unsafe { core::ptr::read_volatile(rec.add(16) as *const i64) }
    } else {
        // SAFETY: as above.
        unsafe { ctx.read_at(kc!(tp_sys_ret) as usize) }.unwrap_or(0)
    };
    // The registers cost two helper calls: fetched only past the cheap
    // filters (failed opens, e.g. ENOENT from library searches, never are).
    attempt(nr, ret, || {
        // SAFETY: both helpers are valid in tracing programs; the task
        // pointer is the current task's.
        unsafe { bpf_task_pt_regs(bpf_get_current_task_btf()) as u64 }
    });
    0
}

/// The one program that does the work behind every fexit stub: the kernel
/// binds a tracing program to a single function, so each watched syscall
/// needs its own program, but verifying the full body once per syscall cost
/// 0.8 s each under emulation. Each stub is a tail call into this.
#[map(name = "FEXIT_WORKER")]
static FEXIT_WORKER: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Layer 2 where the kernel allows trampolines: stubs on the watched
/// syscalls' entry points tail-call this, so every other syscall runs
/// exactly as without governor. Loaded for (not attached to) one syscall
/// wrapper; every `__x64_sys_*` wrapper has the same prototype, which is
/// what lets the stubs share it.
#[fexit]
pub fn protect_fexit_worker(ctx: FExitContext) -> i32 {
    if !active() {
        return 0;
    }
    // The wrapper's one argument is the task's saved user registers (a
    // BTF-typed pointer: fields load directly) and its return value follows.
    let regs: u64 = ctx.arg(0);
    let ret: i64 = ctx.arg(1);
    // The number the task entered the syscall with.
    let nr = reg_at(regs, kc!(regs_nr)) as i64;
    attempt(nr as i32, ret, || regs);
    0
}

/// Generates the stubs, one per watched syscall (user space binds stub N
/// to the Nth): a tail call into [`protect_fexit_worker`], nothing else.
macro_rules! fexit_stubs {
    ($($name:ident),* $(,)?) => {
        $(
            #[fexit]
            pub fn $name(ctx: FExitContext) -> i32 {
                // SAFETY: index 0 of our own program array holds the
                // worker; if it is empty the call falls through.
                let _ = unsafe { FEXIT_WORKER.tail_call(&ctx, 0) };
                0
            }
        )*
    };
}

fexit_stubs!(
    protect_fexit_0,
    protect_fexit_1,
    protect_fexit_2,
    protect_fexit_3,
    protect_fexit_4,
    protect_fexit_5,
    protect_fexit_6,
    protect_fexit_7,
    protect_fexit_8,
    protect_fexit_9,
    protect_fexit_10,
    protect_fexit_11,
    protect_fexit_12,
    protect_fexit_13,
    protect_fexit_14,
    protect_fexit_15,
    protect_fexit_16,
    protect_fexit_17,
    protect_fexit_18,
    protect_fexit_19,
    protect_fexit_20,
    protect_fexit_21,
    protect_fexit_22,
    protect_fexit_23,
    protect_fexit_24,
    protect_fexit_25,
    protect_fexit_26,
    protect_fexit_27,
    protect_fexit_28,
    protect_fexit_29,
    protect_fexit_30,
    protect_fexit_31,
    protect_fexit_32,
    protect_fexit_33,
    protect_fexit_34,
    protect_fexit_35,
    protect_fexit_36,
    protect_fexit_37,
    protect_fexit_38,
    protect_fexit_39,
);

/// One syscall exit: `nr` returned `ret`. Reports it when it touched (or
/// tried to touch) a protected file.
#[inline(always)]
fn attempt(nr: i32, ret: i64, regs: impl Fn() -> u64) {
    if nr < 0 || nr as u32 >= SYSCALL_TABLE_SIZE {
        return;
    }
    let Some(d) = SYSCALL_DESCS.get(nr as u32) else {
        return;
    };
    let d = *d;
    if d.kind == 0 {
        return;
    }
    let refused = ret == -EPERM || ret == -EACCES;
    // Opens that failed for another reason (ENOENT…) are never ours.
    if d.kind == KIND_OPEN && ret < 0 && !refused {
        return;
    }
    // Read-only opens are most of what passes here: settle them with one
    // 8-byte read of the flags register, before anything costlier.
    if d.kind == KIND_OPEN && d.how == ARG_NONE && d.flags != ARG_NONE {
        let flags = arg_reg(regs(), d.flags) | d.implied_flags as u64;
        if flags & O_ACCMODE == 0 && flags & O_TRUNC == 0 {
            return;
        }
    }
    if is_daemon() {
        return;
    }
    let Some(w) = PROTECT_WORK.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the per-CPU work slot is ours for this program run.
    let p = unsafe { &mut *w };
    if !syscall_args(p) {
        return;
    }
    // SAFETY: bpf_get_current_task has no preconditions.
    let task = unsafe { bpf_get_current_task() };
    let mut key = inode_key(0);
    let mut valid = 0;
    let mut flags = 0u64;
    let mut value = 0u64;
    let mut class = BudgetClass::Attempts;
    match d.kind {
        KIND_OPEN => {
            flags = d.implied_flags as u64;
            if d.how != ARG_NONE {
                let how = arg_of(&p, d.how);
                // `struct open_how` starts with `__u64 flags` (uapi).
                // SAFETY: a user pointer read through the helper.
                flags |= unsafe { bpf_probe_read_user(how as *const u64) }.unwrap_or(0);
            } else if d.flags != ARG_NONE {
                flags |= arg_of(&p, d.flags);
            }
            if flags & O_ACCMODE == 0 && flags & O_TRUNC == 0 {
                return;
            }
            if ret >= 0 {
                key = fd_key(task, ret as u64);
                if !is_protected(&key) {
                    return;
                }
                valid |= VALID_KEY;
            }
        }
        KIND_FD => {
            key = fd_key(task, arg_of(&p, d.fd));
            if !is_protected(&key) {
                return;
            }
            valid |= VALID_KEY;
            if d.flags != ARG_NONE {
                flags = arg_of(&p, d.flags);
            }
        }
        KIND_IOCTL => {
            let cmd = arg_of(&p, d.cmd) as u32;
            if cmd != FS_IOC_SETFLAGS && cmd != FS_IOC32_SETFLAGS && cmd != FS_IOC_FSSETXATTR {
                return;
            }
            key = fd_key(task, arg_of(&p, d.fd));
            if !is_protected(&key) {
                return;
            }
            valid |= VALID_KEY;
            flags = cmd as u64;
            // Both FS_IOC_SETFLAGS and struct fsxattr start with a 32-bit
            // flags word.
            let ptr = arg_of(&p, d.arg);
            // SAFETY: a user pointer read through the helper.
            value = unsafe { bpf_probe_read_user(ptr as *const u32) }.unwrap_or(0) as u64;
        }
        KIND_PATH => {
            if d.flags != ARG_NONE {
                flags = arg_of(&p, d.flags);
            }
            // A NULL or (with AT_EMPTY_PATH) empty path means "the dirfd
            // itself": an fd-based call in disguise (futimens, fchownat).
            if d.dirfd0 != ARG_NONE && d.path0 != ARG_NONE {
                let ptr = arg_of(&p, d.path0);
                let empty = if ptr == 0 {
                    true
                } else if flags & AT_EMPTY_PATH != 0 {
                    // SAFETY: a user pointer read through the helper.
                    unsafe { bpf_probe_read_user(ptr as *const u8) }.unwrap_or(1) == 0
                } else {
                    false
                };
                if empty {
                    key = fd_key(task, arg_of(&p, d.dirfd0));
                    if !is_protected(&key) {
                        return;
                    }
                    valid |= VALID_KEY;
                }
            }
            if valid & VALID_KEY == 0 && !refused {
                // A successful path-based call: report it only when a
                // basename is protected, tested before taking ring space.
                if ret != 0 || !(path_name_protected(p, d.path0) || path_name_protected(p, d.path1))
                {
                    return;
                }
                class = BudgetClass::NameMatches;
            }
        }
        _ => return,
    }

    p.key = key;
    p.valid = valid;
    p.flags = flags;
    p.value = value;
    p.ret = ret;
    p.nr = nr as u32;
    p.desc = d;
    p.class = class as u32;
    emit(p, task);
}

/// Reports the attempt in `p` (values re-read from map memory, see [`Work`]).
#[inline(never)]
fn emit(p: &Work, task: u64) {
    let id = bpf_get_current_pid_tgid();
    let d = p.desc;
    let mut valid = p.valid;
    let uid = bpf_get_current_uid_gid() as u32;
    let class = if p.class == BudgetClass::NameMatches as u32 {
        BudgetClass::NameMatches
    } else {
        BudgetClass::Attempts
    };
    if !take_budget(class.key(uid)) {
        return;
    }
    let Some(mut entry) = PROTECT_EVENTS.reserve::<AttemptEvent>(0) else {
        count_drop();
        return;
    };
    let ev = entry.as_mut_ptr();
    // SAFETY: `ev` is the reserved, exclusively owned ring entry; every
    // field is written before submit.
    unsafe {
        (*ev).nr = p.nr;
        (*ev).op = d.op as u32;
        (*ev).pid = (id >> 32) as u32;
        (*ev).tid = id as u32;
        let parent: u64 = read_at(task, kc!(task_real_parent));
        (*ev).ppid = read_at::<i32>(parent, kc!(task_tgid)) as u32;
        (*ev).uid = uid;
        (*ev).ret = p.ret;
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).key = p.key;
        (*ev).base0 = inode_key(0);
        (*ev).base1 = inode_key(0);
        (*ev).flags = p.flags;
        (*ev).arg = p.value;
        (*ev).comm = bpf_get_current_comm().unwrap_or([0; 16]);
        (*ev).path0[0] = 0;
        (*ev).path1[0] = 0;
        let (r0, b0) = read_path(
            task,
            p,
            d.path0,
            d.dirfd0,
            &mut (*ev).path0,
            &mut (*ev).base0,
            &mut (*ev).dirfd0,
        );
        let (r1, b1) = read_path(
            task,
            p,
            d.path1,
            d.dirfd1,
            &mut (*ev).path1,
            &mut (*ev).base1,
            &mut (*ev).dirfd1,
        );
        if r0 {
            valid |= VALID_PATH0;
        }
        if b0 {
            valid |= VALID_BASE0;
        }
        if r1 {
            valid |= VALID_PATH1;
        }
        if b1 {
            valid |= VALID_BASE1;
        }
        (*ev).valid = valid;
        // The executable's path, leaf first, from its dentries; at the
        // root of a mount, on from the dentry it is mounted on.
        let mm: u64 = read_at(task, kc!(task_mm));
        let exe_file: u64 = read_at(mm, kc!(mm_exe_file));
        let mut dentry: u64 = read_at(exe_file, kc!(file_f_path) + kc!(path_dentry));
        let mounts = kc!(path_mnt) != NO_FIELD
            && kc!(vfsmount_mnt_root) != NO_FIELD
            && kc!(mount_mnt) != NO_FIELD
            && kc!(mount_mnt_parent) != NO_FIELD
            && kc!(mount_mnt_mountpoint) != NO_FIELD;
        let mut vfsmnt: u64 = if mounts {
            read_at(exe_file, kc!(file_f_path) + kc!(path_mnt))
        } else {
            0
        };
        let mut depth = 0u32;
        let mut i = 0;
        let mut hops = 0;
        while i < EXE_DEPTH {
            if dentry == 0 {
                break;
            }
            if vfsmnt != 0 {
                let root: u64 = read_at(vfsmnt, kc!(vfsmount_mnt_root));
                if dentry == root {
                    // The root of a mount: never walk above it (a bind
                    // mount's root has parents the path doesn't go through).
                    if hops >= EXE_MOUNT_HOPS {
                        // Incomplete (no "/"): user space asks /proc.
                        break;
                    }
                    // `struct mount` embeds the vfsmount at `mount_mnt`.
                    let mount = vfsmnt.wrapping_sub(kc!(mount_mnt) as u64);
                    let parent: u64 = read_at(mount, kc!(mount_mnt_parent));
                    if parent == 0 || parent == mount {
                        // The namespace's root (or a detached mount): "/".
                        if let Some(slot) = (*ev).exe.get_mut(i) {
                            slot[0] = b'/';
                            slot[1] = 0;
                            depth += 1;
                            (*ev).valid |= VALID_EXE_WHOLE;
                        }
                        break;
                    }
                    dentry = read_at(mount, kc!(mount_mnt_mountpoint));
                    vfsmnt = parent + kc!(mount_mnt) as u64;
                    hops += 1;
                    continue;
                }
            }
            let name: u64 = read_at(dentry, kc!(dentry_d_name_ptr));
            let Some(slot) = (*ev).exe.get_mut(i) else {
                break;
            };
            slot[0] = 0;
            if name != 0 {
                let _ = bpf_probe_read_kernel_str_bytes(name as *const u8, slot);
            }
            depth += 1;
            let parent: u64 = read_at(dentry, kc!(dentry_d_parent));
            if parent == dentry {
                break;
            }
            dentry = parent;
            i += 1;
        }
        (*ev).exe_depth = depth;
    }
    entry.submit(0);
}

// ---------------------------------------------------------------------------
// Layer 3: BPF LSM.

#[inline(always)]
fn lsm_exempt() -> bool {
    !active() || is_daemon()
}

/// The current task's session id, numbered in the initial pid namespace
/// (0 when it can't be read: never a session a window names).
#[inline(always)]
fn current_session() -> u32 {
    // SAFETY: bpf_get_current_task has no preconditions.
    let task = unsafe { bpf_get_current_task() };
    let signal: u64 = read_at(task, kc!(task_signal));
    let pid: u64 = read_at(signal, kc!(signal_pids) + PIDTYPE_SID * 8);
    read_at::<i32>(pid, kc!(pid_numbers) + kc!(upid_nr)) as u32
}

/// Refused: outside any window, or inside one that admits another
/// session only.
#[inline(always)]
fn denied(key: &InodeKey) -> bool {
    let f = flags_of(key);
    if f & INODE_DENY != 0 {
        return true;
    }
    if f & INODE_SESSION != 0 {
        // SAFETY: the value is copied out right away.
        let allowed = unsafe { WINDOW_SESSIONS.get(key) }.copied().unwrap_or(0);
        return allowed == 0 || current_session() != allowed;
    }
    false
}

#[inline(always)]
fn dir_guarded(dir_inode: u64) -> bool {
    let f = flags_of(&inode_key(dir_inode));
    f & INODE_DIR_GUARD != 0 && f & INODE_DENY != 0
}

const DENY: i32 = -(EPERM as i32);

#[lsm(hook = "file_open")]
pub fn protect_file_open(ctx: LsmContext) -> i32 {
    let prev: i32 = ctx.arg(1);
    if prev != 0 {
        return prev;
    }
    // Every open on the host passes here: settle read-only opens first,
    // with a direct load through the BTF-typed `struct file *` (no helper).
    let file: u64 = ctx.arg(0);
    if file == 0 {
        return 0;
    }
    // SAFETY: the verifier checks the load against `struct file`'s BTF
    // layout; the offset is a constant from the frozen kernel config.
    let mode: u32 =
        unsafe { core::ptr::read_volatile((file + kc!(file_f_mode) as u64) as *const u32) };
    if mode & FMODE_WRITE == 0 {
        return 0;
    }
    if lsm_exempt() {
        return 0;
    }
    if denied(&inode_key(read_at(file, kc!(file_f_inode)))) {
        return DENY;
    }
    0
}

#[lsm(hook = "file_ioctl")]
pub fn protect_file_ioctl(ctx: LsmContext) -> i32 {
    let prev: i32 = ctx.arg(3);
    if prev != 0 {
        return prev;
    }
    let cmd: u32 = ctx.arg(1);
    if cmd != FS_IOC_SETFLAGS && cmd != FS_IOC32_SETFLAGS && cmd != FS_IOC_FSSETXATTR {
        return 0;
    }
    if lsm_exempt() {
        return 0;
    }
    let file: u64 = ctx.arg(0);
    if denied(&inode_key(read_at(file, kc!(file_f_inode)))) {
        return DENY;
    }
    0
}

#[lsm(hook = "inode_unlink")]
pub fn protect_inode_unlink(ctx: LsmContext) -> i32 {
    let prev: i32 = ctx.arg(2);
    if prev != 0 {
        return prev;
    }
    if lsm_exempt() {
        return 0;
    }
    let dir: u64 = ctx.arg(0);
    let dentry: u64 = ctx.arg(1);
    if denied(&dentry_key(dentry)) || dir_guarded(dir) {
        return DENY;
    }
    0
}

#[lsm(hook = "inode_link")]
pub fn protect_inode_link(ctx: LsmContext) -> i32 {
    let prev: i32 = ctx.arg(3);
    if prev != 0 {
        return prev;
    }
    if lsm_exempt() {
        return 0;
    }
    let old: u64 = ctx.arg(0);
    let dir: u64 = ctx.arg(1);
    if denied(&dentry_key(old)) || dir_guarded(dir) {
        return DENY;
    }
    0
}

#[lsm(hook = "inode_rename")]
pub fn protect_inode_rename(ctx: LsmContext) -> i32 {
    let prev: i32 = ctx.arg(4);
    if prev != 0 {
        return prev;
    }
    if lsm_exempt() {
        return 0;
    }
    let old_dir: u64 = ctx.arg(0);
    let old: u64 = ctx.arg(1);
    let new_dir: u64 = ctx.arg(2);
    let new: u64 = ctx.arg(3);
    if denied(&dentry_key(old))
        || denied(&dentry_key(new))
        || dir_guarded(old_dir)
        || dir_guarded(new_dir)
    {
        return DENY;
    }
    0
}

#[lsm(hook = "inode_create")]
pub fn protect_inode_create(ctx: LsmContext) -> i32 {
    let prev: i32 = ctx.arg(3);
    if prev != 0 {
        return prev;
    }
    if lsm_exempt() {
        return 0;
    }
    let dir: u64 = ctx.arg(0);
    if dir_guarded(dir) {
        return DENY;
    }
    0
}

/// A hook whose only interesting argument is a dentry. Its position `D`
/// and the argument count `N` (the previous verdict sits at `N`) changed
/// between kernels (`inode_setattr` gained an idmap in 6.3), and an LSM
/// program may only read its context at constant offsets — so each
/// signature is its own program, and the loader attaches the variant that
/// matches the running kernel's BTF.
#[inline(always)]
fn dentry_hook<const D: usize, const N: usize>(ctx: &LsmContext) -> i32 {
    let prev: i32 = ctx.arg(N);
    if prev != 0 {
        return prev;
    }
    if lsm_exempt() {
        return 0;
    }
    let dentry: u64 = ctx.arg(D);
    if denied(&dentry_key(dentry)) {
        return DENY;
    }
    0
}

macro_rules! dentry_hooks {
    ($($name:ident = $hook:literal, $d:literal, $n:literal;)*) => {$(
        #[lsm(hook = $hook)]
        pub fn $name(ctx: LsmContext) -> i32 {
            dentry_hook::<$d, $n>(&ctx)
        }
    )*};
}

// Program names: protect_<hook>_d<dentry index>_n<argument count>.
// inode_setattr: chmod, chown, utimes, truncate (also O_TRUNC, ftruncate).
dentry_hooks! {
    protect_inode_setattr_d0_n2 = "inode_setattr", 0, 2;
    protect_inode_setattr_d1_n3 = "inode_setattr", 1, 3;
    protect_inode_setxattr_d0_n5 = "inode_setxattr", 0, 5;
    protect_inode_setxattr_d1_n6 = "inode_setxattr", 1, 6;
    protect_inode_removexattr_d0_n2 = "inode_removexattr", 0, 2;
    protect_inode_removexattr_d1_n3 = "inode_removexattr", 1, 3;
    protect_inode_set_acl_d1_n4 = "inode_set_acl", 1, 4;
    protect_inode_remove_acl_d1_n3 = "inode_remove_acl", 1, 3;
    protect_inode_file_setattr_d0_n2 = "inode_file_setattr", 0, 2;
}
