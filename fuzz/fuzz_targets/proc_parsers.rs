//! The parsers of what the kernel (and other users' processes) put in
//! /proc, tracefs and /sys: the first byte picks the parser, the rest is
//! the file's content. Any content gives a value or `None`/an error.
//!
//! | byte % 11 | file | parser |
//! |---|---|---|
//! | 0 | /proc/PID/cgroup | `identity::parse_cgroup`, `unit_from_cgroup`, `cgroup_within` |
//! | 1 | /proc/PID/environ | `identity::parse_pm2_env` |
//! | 2 | /proc/meminfo, smaps_rollup | `memsample::parse_meminfo` (MemTotal, MemAvailable, Pss) |
//! | 3 | /proc/PID/statm | `memsample::parse_statm` |
//! | 4 | /proc/pressure/memory | `psi::parse_some_avg10` |
//! | 5 | tracefs `events/*/*/format` | `tracefs::parse_format`, `Field::name` |
//! | 6 | /sys/kernel/btf/vmlinux | `btf::Btf::parse` and the look-ups the loader makes |
//! | 7 | /proc/PID/stat | `procfs` `Stat`, on the kernel's line around a fuzzed comm |
//! | 8 | /proc/PID/status | `procfs` `Status`, on the kernel's text around a fuzzed comm |
//! | 9 | /proc/PID/cmdline | argv → `god_from_exec`, `fingerprint`, `is_node` |
//! | 10 | config values | `units::parse_size`, `parse_duration` |
//!
//! Text files the daemon reads with `read_to_string` (or `from_utf8`) skip
//! non-UTF-8 input as it does; environ, cmdline and BTF are bytes.
//!
//! stat and status are the kernel's own formatting, and procfs (not ours)
//! trusts it: `Stat` panics on a line whose last `)` comes before its first
//! `(`, which no kernel writes. What another user controls there is the
//! comm (`prctl(PR_SET_NAME)`: up to 15 bytes, anything but NUL), so those
//! two cases build the file as the kernel does around fuzzed comm bytes
//! (raw in stat; in status with only newline and backslash escaped) and
//! fuzzed numbers.
#![no_main]

use governor::{btf::Btf, layout, memsample, psi, tracefs, units};
use governor_core::identity;
use libfuzzer_sys::fuzz_target;
use procfs::FromRead;

fn text(b: &[u8]) -> Option<&str> {
    std::str::from_utf8(b).ok()
}

fn no_names(uid: u32) -> String {
    format!("u{uid}")
}

/// What `layout::compute_kernel_config` asks the kernel's BTF.
const MEMBERS: &[(&str, &str)] = &[
    ("task_struct", "exit_code"),
    ("task_struct", "start_time"),
    ("task_struct", "real_parent"),
    ("task_struct", "tgid"),
    ("mm_struct", "arg_start"),
    ("file", "f_inode"),
    ("dentry", "d_name"),
    ("qstr", "name"),
    ("signal_struct", "live"),
];

/// The comm a process gave itself (before the first NUL, at most 15
/// bytes, as the kernel keeps it) and the bytes after it.
fn comm_and_rest(body: &[u8]) -> (&[u8], &[u8]) {
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    let rest = body.get(end + 1..).unwrap_or_default();
    (&body[..end.min(15)], rest)
}

/// Numbers for the kernel-written fields, from the fuzzer's bytes.
struct Numbers<'a>(&'a [u8]);

impl Numbers<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut b = [0u8; N];
        let n = self.0.len().min(N);
        b[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        b
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }
    fn state(&mut self) -> char {
        let [b] = self.take();
        b"RSDZTtXIPW"[usize::from(b) % 10] as char
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 11 {
        0 => {
            if let Some(cg) = text(body).and_then(identity::parse_cgroup) {
                let _ = identity::unit_from_cgroup(&cg).map(|u| u.to_string());
                let _ = identity::cgroup_within(&cg, "/system.slice/");
            }
        }
        1 => {
            if let Some(env) = identity::parse_pm2_env(body) {
                assert!(!env.name.is_empty(), "a pm2 app without a name");
                let _ = env.app(1, 0);
            }
        }
        2 => {
            if let Some(s) = text(body) {
                for key in ["MemTotal:", "MemAvailable:", "Pss:"] {
                    let _ = memsample::parse_meminfo(s, key);
                }
            }
        }
        3 => {
            let _ = text(body).map(memsample::parse_statm);
        }
        4 => {
            let _ = text(body).map(psi::parse_some_avg10);
        }
        5 => {
            if let Some(s) = text(body) {
                for f in tracefs::parse_format(s) {
                    let _ = f.name();
                }
            }
        }
        6 => {
            if let Ok(btf) = Btf::parse(body) {
                for (s, m) in MEMBERS {
                    let _ = btf.member_offset(s, m);
                }
                let _ = btf.func_params("bpf_lsm_inode_setattr");
                let _ = btf.struct_size("pt_regs");
                let _ = btf.has_struct("task_struct");
                let _ = layout::lsm_args(&btf);
                let _ = layout::regs_layout(&btf);
            }
        }
        7 => {
            let (comm, rest) = comm_and_rest(body);
            let mut n = Numbers(rest);
            let mut line = b"4242 (".to_vec();
            line.extend_from_slice(comm);
            line.extend_from_slice(
                format!(
                    ") {} 1 4242 4242 {} -1 4194560 120 0 0 0 3 1 0 0 20 0 1 0 {} 9437184 \
                     400 18446744073709551615 1 1 0 0 0 0 0 0 65536 0 0 0 17 1 0 0 0 0 0 \
                     0 0 0 0 0 0 0 {}\n",
                    n.state(),
                    n.u32() as i32,
                    n.u64(),
                    n.u32() as i32,
                )
                .as_bytes(),
            );
            let stat = procfs::process::Stat::from_read(&line[..])
                .unwrap_or_else(|e| panic!("the kernel's stat line does not parse: {e}"));
            assert_eq!(stat.pid, 4242, "pid");
            assert_eq!(stat.ppid, 1, "ppid (comm {comm:?})");
            // What the daemon takes from it.
            let _ = stat.starttime.saturating_mul(1_000_000_000);
            let _ = stat.tty_nr();
        }
        8 => {
            let (comm, rest) = comm_and_rest(body);
            let mut n = Numbers(rest);
            let mut text = b"Name:\t".to_vec();
            for &c in comm {
                // The kernel's escaping of the name: `seq_escape_str(…,
                // ESCAPE_SPACE | ESCAPE_SPECIAL, "\n\\")`, where the last
                // argument limits it to newline and backslash.
                match c {
                    b'\n' => text.extend_from_slice(b"\\n"),
                    b'\\' => text.extend_from_slice(b"\\\\"),
                    c => text.push(c),
                }
            }
            let uid = n.u32();
            text.extend_from_slice(
                format!(
                    "\nUmask:\t0022\nState:\t{} (sleeping)\nTgid:\t4242\nNgid:\t0\nPid:\t4242\n\
                     PPid:\t1\nTracerPid:\t0\nUid:\t{uid}\t{uid}\t{uid}\t{uid}\n\
                     Gid:\t{g}\t{g}\t{g}\t{g}\nFDSize:\t64\nGroups:\t{g} \nNStgid:\t4242\n\
                     NSpid:\t4242\nNSpgid:\t4242\nNSsid:\t4242\nVmPeak:\t    3060 kB\n\
                     VmSize:\t    3060 kB\nVmRSS:\t    {} kB\nThreads:\t1\nSigQ:\t0/96369\n\
                     SigPnd:\t0000000000000000\nShdPnd:\t0000000000000000\n\
                     SigBlk:\t0000000000000000\nSigIgn:\t0000000000001000\n\
                     SigCgt:\t0000000000004a02\nCapInh:\t0000000000000000\n\
                     CapPrm:\t000001fffeffffff\nCapEff:\t000001fffeffffff\n\
                     NoNewPrivs:\t0\nSeccomp:\t0\n\
                     Cpus_allowed_list:\t0-1\nvoluntary_ctxt_switches:\t{}\n",
                    n.state(),
                    n.u64(),
                    n.u64(),
                    g = n.u32(),
                )
                .as_bytes(),
            );
            match procfs::process::Status::from_read(&text[..]) {
                Ok(status) => assert_eq!(status.ruid, uid, "real uid (comm {comm:?})"),
                // procfs reads status as UTF-8 lines: a comm that isn't
                // UTF-8 (the kernel writes its bytes raw) fails the read.
                Err(e) => assert!(
                    std::str::from_utf8(comm).is_err(),
                    "the kernel's status text does not parse (comm {comm:?}): {e}"
                ),
            }
        }
        9 => {
            // cmdline: NUL-separated, usually NUL-terminated.
            let body = body.strip_suffix(b"\0").unwrap_or(body);
            let argv: Vec<String> = body
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            let exe = argv.first().cloned().unwrap_or_default();
            let _ = identity::is_node(&exe);
            let _ = identity::god_from_exec(1000, &exe, &argv);
            let fp = identity::fingerprint(1000, &exe, &argv, no_names);
            assert!(fp.starts_with("fp:"), "fingerprint {fp:?}");
        }
        _ => {
            if let Some(s) = text(body) {
                let _ = units::parse_size(s);
                let _ = units::parse_duration(s);
            }
        }
    }
});
