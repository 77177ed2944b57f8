//! Helpers for the protected-files tests (`tests/tests/protect.rs`) and the
//! protect benchmark: a [`Protector`] driven on its own thread like the
//! daemon drives it, with a real audit log in a temporary state dir, and
//! ways to attempt modifications as root or as an unprivileged user — with
//! the real tool where the machine has it, else with the same syscalls from
//! a forked child (the qemu guest only has busybox).

use std::{
    ffi::CString,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use governor::protect::{Implicit, ProtectConfig, Protector, StartReport};
use governor_alerts::MemorySink;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

/// The unprivileged user the tests act as (`nobody`; the guest has no
/// passwd entry for it, which setuid doesn't need).
pub const NOBODY: u32 = 65534;

type Reply<T> = oneshot::Sender<T>;

enum Cmd {
    Approve {
        path: PathBuf,
        dur: Duration,
        reason: String,
        tty: bool,
        confirm: Option<String>,
        session: Option<u32>,
        reply: Reply<Result<Value, String>>,
    },
    End {
        path: PathBuf,
        reply: Reply<Result<Value, String>>,
    },
    List(Reply<Value>),
    Reload(Box<ProtectConfig>, Reply<StartReport>),
    Flush(Reply<()>),
    Stop(Reply<()>),
}

/// A [`Protector`] running on a background thread.
pub struct Running {
    tx: mpsc::UnboundedSender<Cmd>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub report: StartReport,
    pub alerts: Arc<MemorySink>,
    pub state_dir: PathBuf,
    pub layers: Vec<String>,
}

impl Running {
    /// Opens an audit log in `state_dir` and starts a protector on `cfg`.
    pub fn start(cfg: ProtectConfig, state_dir: &Path, config_path: Option<PathBuf>) -> Running {
        crate::require_root();
        std::fs::create_dir_all(state_dir).expect("state dir");
        let alerts = Arc::new(MemorySink::new());
        let (tx, mut rx) = mpsc::unbounded_channel::<Cmd>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let sd = state_dir.to_path_buf();
        let al = alerts.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let (log, _) = governor_audit::AuditLog::open(
                    &sd,
                    governor_audit::Options {
                        rotate_bytes: None,
                        append_only: true,
                    },
                )
                .expect("audit log");
                let audit = governor_audit::spawn_writer(log).expect("audit writer");
                let implicit = Implicit {
                    config_path,
                    binary_path: None,
                    state_dir: sd.clone(),
                    audit_log: Some(sd.join("audit.jsonl")),
                    telegram: None,
                };
                let services: Arc<dyn Fn(u32) -> Option<String> + Send + Sync> =
                    Arc::new(|_| None);
                let effects = match governor::effects::Effects::spawn(audit.clone(), al, 10_000) {
                    Ok(fx) => fx,
                    Err(e) => {
                        ready_tx.send(Err(format!("{e:#}"))).ok();
                        return;
                    }
                };
                let (mut p, report) =
                    match Protector::start(&cfg, implicit, effects, services).await {
                        Ok(x) => x,
                        Err(e) => {
                            ready_tx.send(Err(format!("{e:#}"))).ok();
                            return;
                        }
                    };
                // Start's entries and alerts carried out, as the daemon's
                // own daemon.started entry waits for them.
                p.flush().await;
                ready_tx.send(Ok((report, p.layers()))).ok();
                loop {
                    tokio::select! {
                        w = p.wait() => p.handle(w).await,
                        cmd = rx.recv() => match cmd {
                            Some(Cmd::Approve { path, dur, reason, tty, confirm, session, reply }) => {
                                // The daemon's caller check (login ancestry and
                                // controlling terminal) is tested end to end in
                                // tests/velocity.rs; here, its verdict.
                                let human = if tty {
                                    Ok("harness: a human".to_string())
                                } else {
                                    Err("its stdin is not a terminal".to_string())
                                };
                                let r = p.approve(&path, dur, &reason, governor::protect::Caller { uid: 0, session, human }, confirm).await
                                    .map_err(|e| format!("{e:#}"));
                                reply.send(r).ok();
                            }
                            Some(Cmd::End { path, reply }) => {
                                reply.send(p.approve_end(&path).await.map_err(|e| format!("{e:#}"))).ok();
                            }
                            Some(Cmd::List(reply)) => { reply.send(p.list()).ok(); }
                            Some(Cmd::Reload(cfg, reply)) => { reply.send(p.reload(&cfg).await).ok(); }
                            Some(Cmd::Flush(reply)) => {
                                p.flush().await;
                                reply.send(()).ok();
                            }
                            Some(Cmd::Stop(reply)) => {
                                p.flush().await;
                                drop(p);
                                audit.shutdown().await;
                                reply.send(()).ok();
                                return;
                            }
                            None => return,
                        }
                    }
                }
            });
        });
        let (report, layers) = match ready_rx.recv() {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => panic!("Protector::start failed: {e}"),
            Err(_) => panic!("protector thread died"),
        };
        Running {
            tx,
            thread: Some(thread),
            report,
            alerts,
            state_dir: state_dir.to_path_buf(),
            layers,
        }
    }

    fn call<T>(&self, f: impl FnOnce(Reply<T>) -> Cmd) -> T {
        let (tx, rx) = oneshot::channel();
        self.tx.send(f(tx)).expect("protector thread gone");
        rx.blocking_recv().expect("protector thread gone")
    }

    pub fn approve(
        &self,
        path: &Path,
        dur: Duration,
        reason: &str,
        tty: bool,
        confirm: Option<&str>,
    ) -> Result<Value, String> {
        self.call(|reply| Cmd::Approve {
            path: path.to_path_buf(),
            dur,
            reason: reason.into(),
            tty,
            confirm: confirm.map(str::to_string),
            session: None,
            reply,
        })
    }

    /// An approval by a human whose login session is `sid` (the daemon
    /// reads it from the caller): an UNTOUCHABLE window then admits that
    /// session's writes only, where BPF LSM runs.
    pub fn approve_in_session(
        &self,
        path: &Path,
        dur: Duration,
        confirm: &str,
        sid: u32,
    ) -> Result<Value, String> {
        self.call(|reply| Cmd::Approve {
            path: path.to_path_buf(),
            dur,
            reason: "session test".into(),
            tty: true,
            confirm: Some(confirm.to_string()),
            session: Some(sid),
            reply,
        })
    }

    pub fn end(&self, path: &Path) -> Result<Value, String> {
        self.call(|reply| Cmd::End {
            path: path.to_path_buf(),
            reply,
        })
    }

    pub fn list(&self) -> Value {
        self.call(Cmd::List)
    }

    /// `Protector::reload` (SIGHUP).
    pub fn reload(&self, cfg: ProtectConfig) -> StartReport {
        self.call(|reply| Cmd::Reload(Box::new(cfg), reply))
    }

    /// Every audit entry so far (after the queued ones are durable).
    pub fn entries(&self) -> Vec<Value> {
        self.call(Cmd::Flush);
        read_audit(&self.state_dir)
    }

    /// Waits until `pred` holds over the audit entries.
    pub fn wait_entries(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let timeout = crate::patience(timeout);
        let end = Instant::now() + timeout;
        loop {
            let e = self.entries();
            if pred(&e) {
                return e;
            }
            if Instant::now() > end {
                panic!(
                    "timed out after {timeout:?} waiting for {what}; entries:\n{}",
                    e.iter()
                        .map(|v| v.to_string())
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(mut self) {
        self.call(Cmd::Stop);
        if let Some(t) = self.thread.take() {
            t.join().ok();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            let (tx, rx) = oneshot::channel();
            if self.tx.send(Cmd::Stop(tx)).is_ok() {
                rx.blocking_recv().ok();
            }
            t.join().ok();
        }
    }
}

/// The audit entries in `state_dir/audit.jsonl`.
pub fn read_audit(state_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(state_dir.join("audit.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// `protect.attempt` / `protect.tamper` entries of one pid.
pub fn attempts_of(entries: &[Value], pid: u32) -> Vec<Value> {
    entries
        .iter()
        .filter(|e| {
            matches!(
                e["kind"].as_str(),
                Some("protect.attempt") | Some("protect.tamper")
            ) && e["detail"]["pid"].as_u64() == Some(pid as u64)
        })
        .cloned()
        .collect()
}

pub fn sha256(path: &Path) -> String {
    governor::protect::sha256_file(path).expect("hash")
}

/// Whether the immutable flag is set; false where the file can't be read
/// or its filesystem has no flags (for polling and flagless filesystems).
pub fn flag_is_set(path: &Path) -> bool {
    std::fs::File::open(path)
        .and_then(|f| governor::fsflags::get_flags(&f))
        .is_ok_and(|fl| fl & governor::fsflags::FS_IMMUTABLE_FL != 0)
}

/// Whether `path` carries FS_IMMUTABLE_FL (panics if it can't tell).
pub fn immutable(path: &Path) -> bool {
    let f = std::fs::File::open(path).expect("open");
    governor::fsflags::get_flags(&f).expect("flags") & governor::fsflags::FS_IMMUTABLE_FL != 0
}

/// Clears or sets the flag directly (test setup / cleanup).
pub fn set_immutable(path: &Path, on: bool) {
    if let Ok(f) = std::fs::File::open(path) {
        let _ = governor::fsflags::set_flag(&f, governor::fsflags::FS_IMMUTABLE_FL, on);
    }
}

/// Clears the immutable flag of everything under `dir` so it can be removed.
pub fn unflag_tree(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                unflag_tree(&p);
            } else if p.is_file() && !p.is_symlink() {
                set_immutable(&p, false);
            }
        }
    }
}

/// Who performs an attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Actor {
    Root,
    Nobody,
}

impl Actor {
    pub fn uid(self) -> u32 {
        match self {
            Actor::Root => 0,
            Actor::Nobody => NOBODY,
        }
    }
}

/// What one attempt came to.
#[derive(Debug)]
pub struct Outcome {
    pub pid: u32,
    /// Exit status (a tool's, or the errno of the forked child's failing
    /// call; 0 = it succeeded).
    pub status: i32,
    pub stderr: String,
    /// The comm the audit entry must name.
    pub comm: String,
}

impl Outcome {
    /// Whether the attempt was refused with EPERM.
    pub fn eperm(&self) -> bool {
        self.status != 0
            && (self.stderr.contains("Operation not permitted") || self.stderr == "errno 1")
    }
}

/// Runs a tool (`argv[0]` from PATH) as `actor`.
pub fn tool(actor: Actor, argv: &[&str], cwd: &Path) -> Outcome {
    let mut c = Command::new(argv[0]);
    c.args(&argv[1..])
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if actor == Actor::Nobody {
        // std drops supplementary groups itself when root sets a uid.
        c.uid(NOBODY).gid(NOBODY);
    }
    let child = c.spawn().unwrap_or_else(|e| panic!("spawn {argv:?}: {e}"));
    let pid = child.id();
    let out = child.wait_with_output().expect("wait");
    let comm = Path::new(argv[0])
        .file_name()
        .map(|n| n.to_string_lossy().chars().take(15).collect())
        .unwrap_or_default();
    Outcome {
        pid,
        status: out.status.code().unwrap_or(-1),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        comm,
    }
}

/// A shell command (`sh -c`) as `actor`; the attempt is made by the shell.
pub fn shell(actor: Actor, script: &str, cwd: &Path) -> Outcome {
    tool(actor, &["sh", "-c", script], cwd)
}

/// Syscalls a forked child makes, prepared before the fork (the child only
/// makes async-signal-safe calls: no allocation).
pub enum Sys {
    Open {
        path: CString,
        flags: i32,
    },
    /// Read `path`, write a temp file beside it, rename the temp over it
    /// (perl -pi, vim's default write): returns rename's errno.
    ReplaceViaTemp {
        path: CString,
        tmp: CString,
    },
    SetXattr {
        path: CString,
    },
    /// `chattr -i`: GETFLAGS, clear FS_IMMUTABLE_FL, SETFLAGS.
    ClearImmutable {
        path: CString,
    },
}

pub fn cs(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).expect("no NUL in path")
}

/// Runs `sys` in a forked child named `comm` as `actor`; the status is the
/// errno of the call that failed, or 0.
pub fn forked(actor: Actor, comm: &str, sys: &Sys) -> Outcome {
    let name = CString::new(comm).expect("comm");
    let xname = CString::new("user.governor").expect("name");
    // SAFETY: fork in a multithreaded process; the child only makes
    // async-signal-safe system calls on data prepared above, then _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: raw system calls on valid, NUL-terminated buffers and
        // stack variables; no allocation, no locks.
        unsafe {
            libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0);
            if actor == Actor::Nobody {
                let g = NOBODY as libc::gid_t;
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(g) != 0
                    || libc::setuid(NOBODY) != 0
                {
                    libc::_exit(100);
                }
            }
            let err = || *libc::__errno_location();
            let code = match sys {
                Sys::Open { path, flags } => {
                    let fd = libc::open(path.as_ptr(), *flags, 0o666);
                    if fd < 0 {
                        err()
                    } else {
                        let w = libc::write(fd, b"x\n".as_ptr() as *const libc::c_void, 2);
                        libc::close(fd);
                        if w < 0 {
                            err()
                        } else {
                            0
                        }
                    }
                }
                Sys::ReplaceViaTemp { path, tmp } => {
                    let mut buf = [0u8; 4096];
                    let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
                    let n = if fd >= 0 {
                        let n = libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len());
                        libc::close(fd);
                        n.max(0) as usize
                    } else {
                        0
                    };
                    let t = libc::open(
                        tmp.as_ptr(),
                        libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL,
                        0o666,
                    );
                    if t < 0 {
                        libc::_exit(101);
                    }
                    libc::write(t, buf.as_ptr() as *const libc::c_void, n);
                    libc::write(t, b"edited\n".as_ptr() as *const libc::c_void, 7);
                    libc::fsync(t);
                    libc::close(t);
                    if libc::rename(tmp.as_ptr(), path.as_ptr()) != 0 {
                        let e = err();
                        libc::unlink(tmp.as_ptr());
                        e
                    } else {
                        0
                    }
                }
                Sys::SetXattr { path } => {
                    if libc::setxattr(
                        path.as_ptr(),
                        xname.as_ptr(),
                        b"x".as_ptr() as *const libc::c_void,
                        1,
                        0,
                    ) != 0
                    {
                        err()
                    } else {
                        0
                    }
                }
                Sys::ClearImmutable { path } => {
                    let fd = libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK);
                    if fd < 0 {
                        err()
                    } else {
                        let mut flags: libc::c_int = 0;
                        let r = libc::ioctl(fd, libc::FS_IOC_GETFLAGS, &mut flags);
                        let code = if r != 0 {
                            err()
                        } else {
                            flags &= !(governor::fsflags::FS_IMMUTABLE_FL as libc::c_int);
                            if libc::ioctl(fd, libc::FS_IOC_SETFLAGS, &flags) != 0 {
                                err()
                            } else {
                                0
                            }
                        };
                        libc::close(fd);
                        code
                    }
                }
            };
            libc::_exit(code);
        }
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let code = libc::WEXITSTATUS(status);
    Outcome {
        pid: pid as u32,
        status: code,
        stderr: format!("errno {code}"),
        comm: comm.chars().take(15).collect(),
    }
}

/// A scratch directory every user can write in (so a refusal comes from
/// the protection, not from directory permissions).
pub fn open_dir(parent: &Path) -> tempfile::TempDir {
    let d = tempfile::tempdir_in(parent).expect("tempdir");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
    d
}

/// Writes `content` to `path`, owned by `uid`, mode 0666.
pub fn file_for(path: &Path, content: &str, uid: u32) {
    std::fs::write(path, content).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    let c = cs(path);
    // SAFETY: chown on a valid path.
    unsafe { libc::chown(c.as_ptr(), uid, uid) };
}

/// The executable of `name` on PATH, if any.
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(name))
            .find(|f| f.is_file())
    })
}
