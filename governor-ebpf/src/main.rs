//! governor's kernel programs.
//!
//! Lifecycle: `sched_process_exec` and `sched_process_exit` tracepoints and
//! the `sched_process_fork` raw tracepoint feed one ring buffer. Every struct
//! offset comes from [`GOVERNOR_KERNEL_CONFIG`], which user space fills in at
//! load time from the running kernel's BTF: nothing about kernel layout is
//! compiled in, so the same object is right on 6.1, 6.12 and 6.18.
//!
//! Optional LSM layer: `file_open` refuses write opens of inodes listed in
//! [`DENY_WRITE_INODES`], where the kernel allows BPF LSM.
#![no_std]
#![no_main]

/// Memory budgets: the `kmem/rss_stat` program (issue 11).
mod memory;
/// Protected files: attempt logging and the LSM layer (issue 6).
mod protect;

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_current_uid_gid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_kernel_str_bytes, generated::bpf_probe_read_user,
    },
    macros::{lsm, map, raw_tracepoint, tracepoint},
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{LsmContext, RawTracePointContext, TracePointContext},
    EbpfContext,
};
use aya_log_ebpf::warn;
use governor_common::{
    protect::LsmArgs, EventHeader, EventKind, ExecEvent, ExitEvent, ForkEvent, InodeKey,
    KernelConfig, ARGV_MAX, COMM_LEN, NO_FIELD,
};

/// Filled in by user space before load (see the crate docs). `no_mangle` so
/// the loader finds it by name; read with `read_volatile` so the compiler
/// cannot fold the zero initialiser into the code.
#[no_mangle]
static GOVERNOR_KERNEL_CONFIG: KernelConfig = KernelConfig {
    configured: 0,
    task_exit_code: 0,
    task_start_time: 0,
    task_real_parent: 0,
    task_tgid: 0,
    task_pid: 0,
    task_mm: 0,
    mm_arg_start: 0,
    mm_arg_end: 0,
    tp_exec_filename: 0,
    file_f_mode: 0,
    file_f_inode: 0,
    inode_i_ino: 0,
    inode_i_sb: 0,
    sb_s_dev: 0,
    _pad: 0,
    task_files: 0,
    files_fdt: 0,
    fdtable_fd: 0,
    fdtable_max_fds: 0,
    task_fs: 0,
    fs_pwd: 0,
    path_dentry: 0,
    dentry_d_inode: 0,
    dentry_d_parent: 0,
    dentry_d_name_ptr: 0,
    mm_exe_file: 0,
    file_f_path: 0,
    tp_sys_nr: 0,
    tp_sys_args: 0,
    tp_sys_ret: 0,
    lsm: LsmArgs {
        setattr_dentry: 0xff,
        setattr_nargs: 0,
        setxattr_dentry: 0xff,
        setxattr_nargs: 0,
        removexattr_dentry: 0xff,
        removexattr_nargs: 0,
        set_acl_dentry: 0xff,
        set_acl_nargs: 0,
        remove_acl_dentry: 0xff,
        remove_acl_nargs: 0,
        file_setattr_dentry: 0xff,
        file_setattr_nargs: 0,
    },
    regs_window: 0,
    regs_arg0: 0,
    regs_arg1: 0,
    regs_arg2: 0,
    regs_arg3: 0,
    regs_arg4: 0,
    regs_arg5: 0,
    regs_nr: 0,
    regs_ok: 0,
    tp_exit_group_dead: NO_FIELD,
    task_signal: 0,
    signal_live: 0,
    task_group_leader: 0,
    signal_pids: 0,
    pid_numbers: 0,
    upid_nr: 0,
    tp_rss_curr: NO_FIELD,
    tp_rss_member: NO_FIELD,
    tp_rss_size: NO_FIELD,
    _pad2: 0,
    path_mnt: 0,
    vfsmount_mnt_root: 0,
    mount_mnt: 0,
    mount_mnt_parent: 0,
    mount_mnt_mountpoint: 0,
    _pad3: 0,
};

/// Lifecycle events. The size is a default: the loader sets the real one.
///
/// Wakeups: each consumer notification is an irq_work (an IPI, a VM exit on
/// a virtualised host), measured here at ~10 µs — with one per event the
/// programs cost ~30 µs per process lifecycle. So exec and fork records are
/// queued without a wakeup and every exit forces one: a death is delivered
/// at once together with whatever was queued before it, and user space
/// drains the ring on a short timer for the rest (an exec with no exit after
/// it). The kernel's adaptive mode can't be mixed with quiet records: once a
/// quiet record is pending it never wakes again.
#[map(name = "EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Events lost because the ring was full, per CPU; user space sums them.
#[map(name = "DROPPED")]
static DROPPED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// Inodes the LSM layer refuses write opens of.
#[map(name = "DENY_WRITE_INODES")]
static DENY_WRITE_INODES: HashMap<InodeKey, u8> = HashMap::with_max_entries(4096, 0);

/// Supervisors (pm2 God daemons, systemd) whose children's execs wake user
/// space at once: it reads their identity (pm2's app name in the
/// environment, the systemd unit in the cgroup) from /proc, which only
/// works while they live — a fast crash loop would otherwise be gone first.
#[map(name = "WAKE_PARENTS")]
static WAKE_PARENTS: HashMap<u32, u8> = HashMap::with_max_entries(1024, 0);

/// Deaths already reported, by (tgid, leader start time): where the exit
/// tracepoint has no `group_dead`, two threads finishing at once on two
/// CPUs can both see the group's live count at 0; the first reports.
#[map(name = "EXITED")]
static EXITED: LruHashMap<[u64; 2], u8> = LruHashMap::with_max_entries(4096, 0);

/// `BPF_NOEXIST`: insert only if the key is absent.
const BPF_NOEXIST: u64 = 1;

#[inline(always)]
fn config() -> KernelConfig {
    // SAFETY: the static is always initialised; a volatile read of it is a
    // plain load from the read-only global section.
    unsafe { core::ptr::read_volatile(&GOVERNOR_KERNEL_CONFIG) }
}

#[inline(always)]
fn count_drop() {
    if let Some(slot) = DROPPED.get_ptr_mut(0) {
        // SAFETY: the pointer comes from the per-CPU array lookup and is valid
        // for this CPU for the program's duration; no other CPU shares it.
        unsafe { *slot += 1 };
    }
}

/// Reads a kernel value at `base + off`; 0-initialised on failure.
#[inline(always)]
fn read_at<T: Default>(base: u64, off: u32) -> T {
    if base == 0 {
        return T::default();
    }
    // SAFETY: bpf_probe_read_kernel copes with any address; a bad one just
    // returns an error, which we map to the default value.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }.unwrap_or_default()
}

#[inline(always)]
fn parent_tgid(cfg: &KernelConfig, task: u64) -> u32 {
    let parent: u64 = read_at(task, cfg.task_real_parent);
    read_at::<i32>(parent, cfg.task_tgid) as u32
}

#[inline(always)]
fn header(kind: EventKind, pid: u32, ppid: u32, start_ns: u64) -> EventHeader {
    EventHeader {
        kind: kind as u32,
        pid,
        ppid,
        // Low 32 bits: the real uid (init namespace).
        uid: bpf_get_current_uid_gid() as u32,
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        ts_ns: unsafe { bpf_ktime_get_ns() },
        start_ns,
    }
}

#[inline(always)]
fn current_comm() -> [u8; COMM_LEN] {
    bpf_get_current_comm().unwrap_or([0; COMM_LEN])
}

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let cfg = config();
    if cfg.configured == 0 {
        return 0;
    }
    let Some(mut entry) = EVENTS.reserve::<ExecEvent>(0) else {
        count_drop();
        return 0;
    };
    let ev = entry.as_mut_ptr();
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: bpf_get_current_task has no preconditions.
    let task = unsafe { bpf_get_current_task() };
    let ppid = parent_tgid(&cfg, task);
    // SAFETY: `ev` points to the reserved, exclusively owned ring entry of
    // size_of::<ExecEvent>(); every field is written through raw pointers
    // before submit, so no uninitialised data reaches user space.
    unsafe {
        (*ev).hdr = header(
            EventKind::Exec,
            tgid,
            ppid,
            read_at(task, cfg.task_start_time),
        );
        (*ev).comm = current_comm();
        (*ev).filename_len = 0;
        (*ev).argv_len = 0;
        (*ev).argv_truncated = 0;
        (*ev)._pad = 0;
        (*ev).filename[0] = 0;
        // __data_loc: low 16 bits are the offset of the string in the
        // record, high 16 its length.
        let loc: u32 = ctx.read_at(cfg.tp_exec_filename as usize).unwrap_or(0);
        let src = (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize);
        if let Ok(s) = bpf_probe_read_kernel_str_bytes(src, &mut (*ev).filename) {
            (*ev).filename_len = s.len() as u32;
        }
        let mm: u64 = read_at(task, cfg.task_mm);
        let start: u64 = read_at(mm, cfg.mm_arg_start);
        let end: u64 = read_at(mm, cfg.mm_arg_end);
        if end > start {
            let total = end - start;
            if total > ARGV_MAX as u64 {
                (*ev).argv_truncated = 1;
            }
            let len = if total > ARGV_MAX as u64 {
                ARGV_MAX as u64
            } else {
                total
            };
            // The mask keeps the verifier sure of the bound.
            let len = (len as u32) & (ARGV_MAX as u32 * 2 - 1);
            let len = if len > ARGV_MAX as u32 {
                ARGV_MAX as u32
            } else {
                len
            };
            let dst = (*ev).argv.as_mut_ptr() as *mut core::ffi::c_void;
            if bpf_probe_read_user(dst, len, start as *const core::ffi::c_void) == 0 {
                (*ev).argv_len = len;
            }
        }
    }
    // Children of supervisors wake user space; the rest are queued quietly
    // and the next exit (or user space's timer) delivers them.
    // SAFETY: the value is only tested for presence.
    let supervised = unsafe { WAKE_PARENTS.get(&ppid) }.is_some();
    entry.submit(if supervised {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    });
    0
}

#[tracepoint(category = "sched", name = "sched_process_exit")]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let cfg = config();
    if cfg.configured == 0 {
        return 0;
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // SAFETY: bpf_get_current_task has no preconditions.
    let task = unsafe { bpf_get_current_task() };
    // One death per process, when its last thread exits: a leader that
    // calls pthread_exit while workers run on is not a death. The
    // tracepoint says so itself where it has `group_dead`; elsewhere the
    // group's live count, decremented before the tracepoint fires, is 0.
    let group_dead = if cfg.tp_exit_group_dead != NO_FIELD {
        // SAFETY: the offset is the tracepoint format's own, inside the record.
        unsafe { ctx.read_at::<u8>(cfg.tp_exit_group_dead as usize) }.unwrap_or(0) != 0
    } else {
        let signal: u64 = read_at(task, cfg.task_signal);
        signal != 0 && read_at::<i32>(signal, cfg.signal_live) == 0
    };
    if !group_dead {
        return 0;
    }
    let leader: u64 = read_at(task, cfg.task_group_leader);
    let start: u64 = read_at(if leader != 0 { leader } else { task }, cfg.task_start_time);
    if cfg.tp_exit_group_dead == NO_FIELD
        && EXITED
            .insert([tgid as u64, start], 1u8, BPF_NOEXIST)
            .is_err()
    {
        return 0;
    }
    let ev = ExitEvent {
        hdr: header(EventKind::Exit, tgid, parent_tgid(&cfg, task), start),
        // The last thread's code: exit_group() sets it on every thread, a
        // fatal signal likewise.
        exit_code: read_at::<i32>(task, cfg.task_exit_code) as u32,
        _pad: 0,
        comm: current_comm(),
    };
    // Deaths drive crash-loop detection: always wake the consumer, which
    // also delivers any exec/fork records queued before this one.
    if EVENTS
        .output::<ExitEvent>(&ev, BPF_RB_FORCE_WAKEUP)
        .is_err()
    {
        count_drop();
    }
    0
}

/// Raw tracepoint rather than the classic one: its arguments are the parent
/// and child `task_struct`s, so a new thread (child pid != child tgid) can be
/// told from a new process in the kernel instead of flooding user space.
#[raw_tracepoint(tracepoint = "sched_process_fork")]
pub fn sched_process_fork(ctx: RawTracePointContext) -> u32 {
    let cfg = config();
    if cfg.configured == 0 {
        return 0;
    }
    let parent: u64 = ctx.arg(0);
    let child: u64 = ctx.arg(1);
    let child_pid: i32 = read_at(child, cfg.task_pid);
    let child_tgid: i32 = read_at(child, cfg.task_tgid);
    if child_pid != child_tgid {
        return 0;
    }
    let ev = ForkEvent {
        hdr: header(
            EventKind::Fork,
            child_tgid as u32,
            read_at::<i32>(parent, cfg.task_tgid) as u32,
            read_at(child, cfg.task_start_time),
        ),
        comm: current_comm(),
    };
    // Queued quietly, like exec: see the note on wakeups at EVENTS.
    if EVENTS.output::<ForkEvent>(&ev, BPF_RB_NO_WAKEUP).is_err() {
        count_drop();
    }
    0
}

/// `BPF_RB_NO_WAKEUP`: queue the record without notifying the consumer.
const BPF_RB_NO_WAKEUP: u64 = 1;
/// `BPF_RB_FORCE_WAKEUP`: notify the consumer whatever the ring holds.
const BPF_RB_FORCE_WAKEUP: u64 = 2;

const FMODE_WRITE: u32 = 0x2;
const EPERM: i32 = 1;

/// Refuses opening a listed inode for writing, for every process.
#[lsm(hook = "file_open")]
pub fn file_open(ctx: LsmContext) -> i32 {
    // An earlier LSM program's verdict stands.
    let prev: i32 = ctx.arg(1);
    if prev != 0 {
        return prev;
    }
    let cfg = config();
    if cfg.configured == 0 {
        return 0;
    }
    let file: u64 = ctx.arg(0);
    let mode: u32 = read_at(file, cfg.file_f_mode);
    if mode & FMODE_WRITE == 0 {
        return 0;
    }
    let inode: u64 = read_at(file, cfg.file_f_inode);
    let sb: u64 = read_at(inode, cfg.inode_i_sb);
    let key = InodeKey {
        dev: read_at(sb, cfg.sb_s_dev),
        _pad: 0,
        ino: read_at(inode, cfg.inode_i_ino),
    };
    // SAFETY: the value is only tested for presence, never dereferenced
    // beyond the lookup.
    if unsafe { DENY_WRITE_INODES.get(key) }.is_some() {
        warn!(&ctx, "governor: denied write open of inode {}", key.ino);
        return -EPERM;
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
