//! Protected files (issue 6) against the real kernel, as root and as an
//! unprivileged user, on the host (6.18: VFS flags + attempt logging) and in
//! the qemu guest (`cargo xtask vm-test --kernel 6.1 -- protect`: plus BPF
//! LSM). Each attempt must fail with EPERM, leave the SHA-256 unchanged and
//! produce exactly the audit entries of the syscalls the tool makes — with
//! the right pid, comm, operation and result — while reads keep working.
//!
//! The guest has only busybox: python, perl, setfattr and chattr are done
//! there with the same syscalls from a forked child; busybox's touch makes
//! one syscall (utimensat) where coreutils' makes two (open, utimensat).

use std::{
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use governor::protect::ProtectConfig;
use governor_tests::{
    in_vm,
    protect::{
        attempts_of, cs, file_for, flag_is_set, forked, immutable, open_dir, read_audit,
        set_immutable, sha256, shell, tool, unflag_tree, which, Actor, Outcome, Running, Sys,
    },
    require_root,
};

/// One protector at a time: they share the machine's flags and syscalls.
static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

struct Ctx {
    dir: PathBuf,
    p: PathBuf,
    other: PathBuf,
    symlink: PathBuf,
    bind: PathBuf,
    python: Option<PathBuf>,
    perl: bool,
}

/// A python every user can run (not one under /root).
fn python() -> Option<PathBuf> {
    ["/usr/bin/python3", "/usr/local/bin/python3"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
}

type Run = fn(&Ctx, Actor) -> Outcome;

struct Case {
    name: &'static str,
    /// The operations (one audit entry each) the attempt makes.
    ops: fn() -> Vec<&'static str>,
    run: Run,
}

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn py(c: &Ctx, a: Actor, mode: &str, flags: i32, comm: &str) -> Outcome {
    match &c.python {
        Some(py) => {
            let code = format!("open({:?}, {mode:?}).write('x')", s(&c.p));
            tool(a, &[&s(py), "-c", &code], &c.dir)
        }
        None => forked(
            a,
            comm,
            &Sys::Open {
                path: cs(&c.p),
                flags,
            },
        ),
    }
}

fn cases() -> Vec<Case> {
    use libc::{O_APPEND, O_CREAT, O_RDWR, O_TRUNC, O_WRONLY};
    vec![
        Case {
            name: "echo >>",
            ops: || vec!["open"],
            run: |c, a| shell(a, &format!("echo x >> {}", s(&c.p)), &c.dir),
        },
        Case {
            name: "> (truncating redirect, relative path)",
            ops: || vec!["open"],
            run: |c, a| shell(a, "echo x > protected.conf", &c.dir),
        },
        Case {
            name: "truncate -s0",
            ops: || vec!["open"],
            run: |c, a| tool(a, &["truncate", "-s0", &s(&c.p)], &c.dir),
        },
        Case {
            name: "python open('a')",
            ops: || vec!["open"],
            run: |c, a| py(c, a, "a", O_WRONLY | O_CREAT | O_APPEND, "python3"),
        },
        Case {
            name: "python open('w')",
            ops: || vec!["open"],
            run: |c, a| py(c, a, "w", O_WRONLY | O_CREAT | O_TRUNC, "python3"),
        },
        Case {
            name: "python open('r+')",
            ops: || vec!["open"],
            run: |c, a| py(c, a, "r+", O_RDWR, "python3"),
        },
        Case {
            name: "dd conv=notrunc",
            ops: || vec!["open"],
            run: |c, a| {
                tool(
                    a,
                    &[
                        "dd",
                        &format!("if={}", s(&c.other)),
                        &format!("of={}", s(&c.p)),
                        "conv=notrunc",
                    ],
                    &c.dir,
                )
            },
        },
        Case {
            name: "mv other protected",
            ops: || vec!["rename"],
            run: |c, a| tool(a, &["mv", &s(&c.other), &s(&c.p)], &c.dir),
        },
        Case {
            name: "mv protected away",
            ops: || vec!["rename"],
            run: |c, a| tool(a, &["mv", &s(&c.p), &s(&c.dir.join("away"))], &c.dir),
        },
        Case {
            name: "rm",
            ops: || vec!["unlink"],
            run: |c, a| tool(a, &["rm", &s(&c.p)], &c.dir),
        },
        Case {
            name: "ln protected link",
            ops: || vec!["link"],
            run: |c, a| tool(a, &["ln", &s(&c.p), &s(&c.dir.join("hardlink"))], &c.dir),
        },
        Case {
            name: "cp other protected",
            ops: || vec!["open"],
            run: |c, a| tool(a, &["cp", &s(&c.other), &s(&c.p)], &c.dir),
        },
        Case {
            name: "sed -i",
            ops: || vec!["rename"],
            run: |c, a| tool(a, &["sed", "-i", "s/original/changed/", &s(&c.p)], &c.dir),
        },
        Case {
            name: "perl -pi",
            ops: || vec!["rename"],
            run: |c, a| {
                if c.perl {
                    tool(
                        a,
                        &["perl", "-pi", "-e", "s/original/changed/", &s(&c.p)],
                        &c.dir,
                    )
                } else {
                    forked(
                        a,
                        "perl",
                        &Sys::ReplaceViaTemp {
                            path: cs(&c.p),
                            tmp: cs(&c.dir.join("perlXXtmp")),
                        },
                    )
                }
            },
        },
        Case {
            name: "vim-style temp file and rename",
            ops: || vec!["rename"],
            run: |c, a| {
                forked(
                    a,
                    "vim",
                    &Sys::ReplaceViaTemp {
                        path: cs(&c.p),
                        tmp: cs(&c.dir.join("4913")),
                    },
                )
            },
        },
        Case {
            name: "chmod",
            ops: || vec!["chmod"],
            run: |c, a| tool(a, &["chmod", "600", &s(&c.p)], &c.dir),
        },
        Case {
            name: "chown",
            ops: || vec!["chown"],
            run: |c, a| {
                let who = if a == Actor::Root {
                    "1:1"
                } else {
                    "65534:65534"
                };
                tool(a, &["chown", who, &s(&c.p)], &c.dir)
            },
        },
        Case {
            name: "touch",
            // coreutils opens for writing, then utimensat; busybox only utimensat.
            ops: || {
                if in_vm() {
                    vec!["utimes"]
                } else {
                    vec!["open", "utimes"]
                }
            },
            run: |c, a| tool(a, &["touch", &s(&c.p)], &c.dir),
        },
        Case {
            name: "set an xattr",
            ops: || vec!["setxattr"],
            run: |c, a| {
                if which("setfattr").is_some() {
                    tool(
                        a,
                        &["setfattr", "-n", "user.governor", "-v", "x", &s(&c.p)],
                        &c.dir,
                    )
                } else {
                    forked(a, "setfattr", &Sys::SetXattr { path: cs(&c.p) })
                }
            },
        },
        Case {
            name: "write through a symlink",
            ops: || vec!["open"],
            run: |c, a| shell(a, &format!("echo x >> {}", s(&c.symlink)), &c.dir),
        },
        Case {
            name: "write through a bind mount",
            ops: || vec!["open"],
            run: |c, a| shell(a, &format!("echo x >> {}", s(&c.bind)), &c.dir),
        },
    ]
}

struct Bind(PathBuf);

impl Drop for Bind {
    fn drop(&mut self) {
        let c = cs(&self.0);
        // SAFETY: unmounting our own bind mount.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

fn bind_mount(src: &Path, dst: &Path) -> Bind {
    std::fs::create_dir_all(dst).unwrap();
    let (s_, d_) = (cs(src), cs(dst));
    // SAFETY: valid NUL-terminated paths; a plain bind mount.
    let r = unsafe {
        libc::mount(
            s_.as_ptr(),
            d_.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "bind mount: {}", std::io::Error::last_os_error());
    Bind(dst.to_path_buf())
}

fn expect_layers(r: &Running) {
    expect_layers_flagless(r, false);
}

fn expect_layers_flagless(r: &Running, flagless: bool) {
    // With only a flagless file there is no file the VFS layer protects.
    assert_eq!(
        r.layers.iter().any(|l| l == "vfs-flags"),
        !flagless,
        "{:?}",
        r.layers
    );
    assert!(
        r.layers.iter().any(|l| l == "ebpf-attempt-logging"),
        "{:?} {:?}",
        r.layers,
        r.report.layer_errors
    );
    if in_vm() {
        assert!(
            r.layers.iter().any(|l| l == "bpf-lsm"),
            "the guest allows BPF LSM: {:?}",
            r.report.layer_errors
        );
    }
    // fexit must be chosen exactly when the kernel loads tracing programs
    // (aya's own minimal probe is the independent witness); the fallback
    // puts every syscall on the slow path, so falling back needlessly is a
    // bug, and claiming fexit where it can't load would be a lie.
    let trampolines =
        aya::sys::is_program_supported(aya::programs::ProgramType::Tracing).unwrap_or(false);
    let want = if trampolines {
        "fexit"
    } else {
        "syscall-tracepoints"
    };
    assert_eq!(
        r.report.attempt_backend.as_ref().map(|b| b.label()),
        Some(want),
        "{:?}",
        r.report.attempt_backend
    );
}

struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let c = cs(&self.0);
        // SAFETY: unmounting our own mount.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// A ramfs: a filesystem that can't hold inode flags.
fn ramfs(at: &Path) -> Mount {
    std::fs::create_dir_all(at).unwrap();
    let (src, dst, ty, opts) = (
        cs(Path::new("ramfs")),
        cs(at),
        cs(Path::new("ramfs")),
        cs(Path::new("mode=0777")),
    );
    // SAFETY: valid NUL-terminated strings.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            ty.as_ptr(),
            0,
            opts.as_ptr() as *const libc::c_void,
        )
    };
    assert_eq!(r, 0, "mount ramfs: {}", std::io::Error::last_os_error());
    Mount(at.to_path_buf())
}

/// Every operation of the issue, as `actor`. `flagless`: the file lives on
/// a ramfs, which can't hold the immutable flag, so only the BPF LSM layer
/// stands in the way (guest only).
fn attempts_as(actor: Actor, flagless: bool) {
    require_root();
    let _g = lock();
    let base = tempfile::tempdir_in("/tmp").unwrap();
    std::fs::set_permissions(
        base.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (_ramfs, work) = if flagless {
        let m = ramfs(&base.path().join("ramfs"));
        let w = open_dir(&m.0);
        (Some(m), w)
    } else {
        (None, open_dir(base.path()))
    };
    let dir = work.path().to_path_buf();
    let p = dir.join("protected.conf");
    let other = dir.join("other.conf");
    file_for(&p, "original content\n", actor.uid());
    file_for(&other, "other content\n", actor.uid());
    let symlink = dir.join("via-symlink");
    std::os::unix::fs::symlink(&p, &symlink).unwrap();
    let bind_dir = base.path().join("bind");
    let _bind = bind_mount(&dir, &bind_dir);
    let ctx = Ctx {
        dir: dir.clone(),
        p: p.clone(),
        other: other.clone(),
        symlink,
        bind: bind_dir.join("protected.conf"),
        python: python(),
        perl: which("perl").is_some(),
    };
    let state = base.path().join("state");
    let r = Running::start(ProtectConfig::with_paths(&[&p], &[]), &state, None);
    expect_layers_flagless(&r, flagless);
    if flagless {
        assert!(!flag_is_set(&p));
        assert_eq!(r.report.unflaggable.len(), 1, "{:?}", r.report);
        assert!(r.report.unflaggable[0].contains("protected.conf"));
        assert!(r
            .alerts
            .take()
            .iter()
            .any(|a| a.severity == governor_alerts::Severity::Critical
                && a.title.contains("can't hold the immutable flag")));
    } else {
        assert!(
            immutable(&p),
            "the protected file carries the immutable flag"
        );
    }
    let sha0 = sha256(&p);
    let mut summary = Vec::new();
    for case in cases() {
        let t = Instant::now();
        let out = (case.run)(&ctx, actor);
        assert!(
            out.eperm(),
            "{} as {actor:?}: expected EPERM, got {out:?}",
            case.name
        );
        assert_eq!(sha256(&p), sha0, "{}: content changed", case.name);
        // Reads keep working, for this user too.
        let cat = tool(actor, &["cat", &s(&p)], &dir);
        assert_eq!(cat.status, 0, "{}: read failed: {cat:?}", case.name);
        let want = (case.ops)();
        r.wait_entries(case.name, Duration::from_secs(10), |e| {
            attempts_of(e, out.pid).len() >= want.len()
        });
        // Nothing more comes for this attempt.
        std::thread::sleep(Duration::from_millis(100));
        let got = attempts_of(&r.entries(), out.pid);
        let ops: Vec<&str> = got
            .iter()
            .map(|e| e["detail"]["op"].as_str().unwrap_or("?"))
            .collect();
        assert_eq!(
            ops, want,
            "{} as {actor:?}: audit entries {got:#?}",
            case.name
        );
        for e in &got {
            let d = &e["detail"];
            assert_eq!(e["kind"], "protect.attempt", "{}: {e}", case.name);
            assert_eq!(d["comm"], out.comm.as_str(), "{}: {e}", case.name);
            assert_eq!(d["result"], "denied", "{}: {e}", case.name);
            assert_eq!(d["errno"], "EPERM", "{}: {e}", case.name);
            assert_eq!(d["uid"], actor.uid(), "{}: {e}", case.name);
            assert_eq!(d["file"], s(&p), "{}: {e}", case.name);
            assert_eq!(d["tier"], "untouchable", "{}: {e}", case.name);
            assert!(
                d["exe"].as_str().is_some_and(|x| !x.is_empty()),
                "{}: {e}",
                case.name
            );
        }
        summary.push(format!(
            "{:<40} {:?} pid {} comm {} ({} ms)",
            case.name,
            ops,
            out.pid,
            out.comm,
            t.elapsed().as_millis()
        ));
        // Restore `other` if a tool consumed it (none should have).
        if !other.exists() {
            file_for(&other, "other content\n", actor.uid());
        }
    }
    println!(
        "{} attempts as {actor:?} on {} refused and logged on {} (layers {:?}):\n  {}",
        summary.len(),
        if flagless {
            "ramfs (no flags: BPF LSM alone)"
        } else {
            "a flag-holding fs"
        },
        governor::doctor::kernel_release(),
        r.layers,
        summary.join("\n  ")
    );
    r.stop();
    unflag_tree(base.path());
}

#[test]
fn protect_attempts_as_root_are_refused_and_logged() {
    attempts_as(Actor::Root, false);
}

#[test]
fn protect_attempts_as_unprivileged_user_are_refused_and_logged() {
    attempts_as(Actor::Nobody, false);
}

/// A file on a filesystem that can't hold the flag falls back to the other
/// layers: with BPF LSM (the guest) every operation is still refused; without
/// it (the host) writes go through but are logged as allowed, alerted as
/// critical, and the content change reported with both hashes.
#[test]
fn protect_unflaggable_filesystem_falls_back_to_other_layers() {
    require_root();
    let lsm = {
        let _g = lock();
        governor::protect::kernel::probe_lsm().is_ok()
    };
    if lsm {
        attempts_as(Actor::Root, true);
        attempts_as(Actor::Nobody, true);
        return;
    }
    assert!(!in_vm(), "the guest must have BPF LSM");
    let _g = lock();
    let base = tempfile::tempdir_in("/tmp").unwrap();
    let m = ramfs(&base.path().join("ramfs"));
    let p = m.0.join("x.conf");
    file_for(&p, "v1\n", 0);
    let sha0 = sha256(&p);
    let r = Running::start(
        ProtectConfig::with_paths(&[&p], &[]),
        &base.path().join("state"),
        None,
    );
    assert_eq!(r.report.unflaggable.len(), 1, "{:?}", r.report);
    assert!(!r.layers.iter().any(|l| l == "bpf-lsm"));
    assert!(r
        .alerts
        .take()
        .iter()
        .any(|a| a.severity == governor_alerts::Severity::Critical
            && a.title.contains("can't hold the immutable flag")));
    let out = shell(Actor::Root, &format!("echo v2 >> {}", s(&p)), &m.0);
    assert_eq!(out.status, 0, "nothing refuses the write here: {out:?}");
    let sha1 = sha256(&p);
    let e = r.wait_entries(
        "allowed write + content change",
        Duration::from_secs(10),
        |e| {
            attempts_of(e, out.pid).len() == 1
                && e.iter().any(|x| x["kind"] == "protect.content_changed")
        },
    );
    let a = &attempts_of(&e, out.pid)[0]["detail"];
    assert_eq!(
        (a["op"].as_str(), a["result"].as_str()),
        (Some("open"), Some("allowed")),
        "{a}"
    );
    assert_eq!(a["window"], false, "{a}");
    let c = e
        .iter()
        .find(|x| x["kind"] == "protect.content_changed")
        .unwrap();
    assert_eq!(c["detail"]["declared_sha256"], sha0.as_str(), "{c}");
    assert_eq!(c["detail"]["sha256"], sha1.as_str(), "{c}");
    let alerts = r.alerts.take();
    assert!(
        alerts.iter().any(|x| x.kind == "protected file modified"),
        "{alerts:#?}"
    );
    assert!(
        alerts.iter().any(|x| x.kind == "protected file changed"),
        "{alerts:#?}"
    );
    println!(
        "ramfs without BPF LSM: write allowed, logged as allowed, alerted, change reported \
         ({sha0} -> {sha1})"
    );
    r.stop();
    drop(m);
}

/// `chattr -i` by root: on a kernel without BPF LSM it succeeds, and the
/// daemon must put the flag back within 100 ms, alert and audit; with BPF
/// LSM (the guest) it is refused.
#[test]
fn protect_chattr_minus_i_is_tamper_or_refused() {
    require_root();
    let _g = lock();
    let base = tempfile::tempdir_in("/tmp").unwrap();
    let dir = open_dir(base.path());
    let p = dir.path().join("rules.toml");
    file_for(&p, "rule = 1\n", 0);
    let r = Running::start(
        ProtectConfig::with_paths(&[&p], &[]),
        &base.path().join("state"),
        None,
    );
    expect_layers(&r);
    let sha0 = sha256(&p);
    let lsm = r.layers.iter().any(|l| l == "bpf-lsm");
    let mut worst = Duration::ZERO;
    for round in 0..5 {
        let out = if which("chattr").is_some() {
            tool(Actor::Root, &["chattr", "-i", &s(&p)], dir.path())
        } else {
            forked(Actor::Root, "chattr", &Sys::ClearImmutable { path: cs(&p) })
        };
        let exited = Instant::now();
        if lsm {
            assert!(
                out.eperm(),
                "round {round}: the LSM layer refuses chattr -i: {out:?}"
            );
            assert!(immutable(&p));
            let e = r.wait_entries("setflags attempt", Duration::from_secs(10), |e| {
                !attempts_of(e, out.pid).is_empty()
            });
            let a = attempts_of(&e, out.pid);
            assert_eq!(a.len(), 1, "{a:#?}");
            assert_eq!(a[0]["detail"]["op"], "setflags");
            assert_eq!(a[0]["detail"]["result"], "denied");
            assert_eq!(a[0]["detail"]["errno"], "EPERM");
            continue;
        }
        assert_eq!(
            out.status, 0,
            "round {round}: chattr -i succeeds without BPF LSM: {out:?}"
        );
        while !immutable(&p) {
            assert!(
                exited.elapsed() < Duration::from_secs(2),
                "round {round}: the flag never came back"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        let back = exited.elapsed();
        worst = worst.max(back);
        assert!(
            back <= Duration::from_millis(100),
            "round {round}: flag back after {back:?} (> 100 ms)"
        );
        let e = r.wait_entries("tamper entry", Duration::from_secs(10), |e| {
            !attempts_of(e, out.pid).is_empty()
        });
        let a = attempts_of(&e, out.pid);
        assert_eq!(a.len(), 1, "exactly one entry: {a:#?}");
        let d = &a[0]["detail"];
        assert_eq!(a[0]["kind"], "protect.tamper", "{d}");
        assert_eq!(d["op"], "setflags");
        assert_eq!(d["result"], "allowed");
        assert_eq!(d["flag_restored"], true, "{d}");
        assert_eq!(d["content_changed"], false, "{d}");
        assert_eq!(d["comm"], out.comm.as_str());
        println!(
            "round {round}: flag back {back:?} after chattr exited; daemon restored it {} µs after the ioctl",
            d["restored_after_us"]
        );
    }
    if !lsm {
        let alerts = r.alerts.take();
        let tamper: Vec<_> = alerts
            .iter()
            .filter(|a| a.kind == "protected file tampering")
            .collect();
        assert_eq!(tamper.len(), 5, "{alerts:#?}");
        assert!(tamper
            .iter()
            .all(|a| a.severity == governor_alerts::Severity::Critical));
        println!("worst time to flag back: {worst:?}");

        // Clearing the flag and writing at once: either the write loses the
        // race (EPERM) or the change is caught and reported with both hashes.
        let out = shell(
            Actor::Root,
            &format!("chattr -i {0} && echo evil >> {0}", s(&p)),
            dir.path(),
        );
        while !immutable(&p) {
            std::thread::sleep(Duration::from_millis(1));
        }
        if sha256(&p) != sha0 {
            let e = r.wait_entries("content change report", Duration::from_secs(10), |e| {
                e.iter().any(|x| {
                    (x["kind"] == "protect.content_changed"
                        || (x["kind"] == "protect.tamper"
                            && x["detail"]["content_changed"] == true))
                        && x["detail"]["sha256"] == sha256(&p).as_str()
                })
            });
            let x = e
                .iter()
                .rev()
                .find(|x| x["detail"]["sha256"] == sha256(&p).as_str())
                .unwrap();
            assert_eq!(x["detail"]["declared_sha256"], sha0.as_str(), "{x}");
            println!("write raced the restore and was reported: {}", x["kind"]);
        } else {
            println!("write after chattr -i lost the race: {}", out.stderr.trim());
        }
    } else {
        assert_eq!(sha256(&p), sha0);
    }
    r.stop();
    unflag_tree(base.path());
}

#[test]
fn protect_approval_window_admits_writes_and_closes_on_time() {
    require_root();
    let _g = lock();
    let base = tempfile::tempdir_in("/tmp").unwrap();
    let dir = open_dir(base.path());
    let prot = dir.path().join("bot.json");
    let unt = dir.path().join("core.py");
    file_for(&prot, "{\"v\": 1}\n", 0);
    file_for(&unt, "print(1)\n", 0);
    let r = Running::start(
        ProtectConfig::with_paths(&[&unt], &[&prot]),
        &base.path().join("state"),
        None,
    );
    expect_layers(&r);
    let sha0 = sha256(&prot);

    // No terminal: refused, and audited.
    let e = r
        .approve(&prot, Duration::from_secs(2), "update v", false, None)
        .unwrap_err();
    assert!(e.contains("terminal"), "{e}");
    let out = shell(Actor::Root, &format!("echo x >> {}", s(&prot)), dir.path());
    assert!(out.eperm(), "{out:?}");

    // UNTOUCHABLE needs the path typed back.
    let e = r
        .approve(&unt, Duration::from_secs(2), "hotfix", true, Some("/wrong"))
        .unwrap_err();
    assert!(e.contains("UNTOUCHABLE"), "{e}");

    // A window on the PROTECTED file: writes go through and are logged as
    // allowed; an editor's rename-over too.
    // Long enough for the writes below to happen inside it, under TCG too.
    let len = if in_vm() { 10 } else { 3 };
    let asked = Instant::now();
    let w = r
        .approve(&prot, Duration::from_secs(len), "update v", true, None)
        .unwrap();
    assert_eq!(w["status"], "open", "{w}");
    assert!(!immutable(&prot));
    let out = shell(
        Actor::Root,
        &format!("echo '{{\"v\": 2}}' >> {}", s(&prot)),
        dir.path(),
    );
    assert_eq!(out.status, 0, "write inside the window: {out:?}");
    let vim = forked(
        Actor::Root,
        "vim",
        &Sys::ReplaceViaTemp {
            path: cs(&prot),
            tmp: cs(&dir.path().join("bot.json.tmp")),
        },
    );
    assert_eq!(vim.status, 0, "rename-over inside the window: {vim:?}");
    let e = r.wait_entries("allowed writes", Duration::from_secs(10), |e| {
        attempts_of(e, out.pid).len() == 1 && attempts_of(e, vim.pid).len() == 1
    });
    let a = &attempts_of(&e, out.pid)[0]["detail"];
    assert_eq!(a["result"], "allowed", "{a}");
    assert_eq!(a["window"], true, "{a}");
    assert_eq!(a["tier"], "protected", "{a}");
    let v = &attempts_of(&e, vim.pid)[0]["detail"];
    assert_eq!(
        (v["op"].as_str(), v["result"].as_str()),
        (Some("rename"), Some("allowed"))
    );
    let during = sha256(&prot);
    assert_ne!(during, sha0);

    // It closes on time: flag back on the (new) inode, new hash declared.
    while !immutable(&prot) {
        assert!(
            asked.elapsed() < Duration::from_secs(2 * len),
            "window did not close"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The window's end is fixed after `asked`, so this is a true bound.
    let closed_after = asked.elapsed();
    assert!(
        closed_after >= Duration::from_secs(len),
        "closed early: {closed_after:?}"
    );
    let e = r.wait_entries("window close", Duration::from_secs(5), |e| {
        e.iter().any(|x| x["kind"] == "protect.window_close")
    });
    let c = e
        .iter()
        .find(|x| x["kind"] == "protect.window_close")
        .unwrap();
    assert_eq!(c["detail"]["new_sha256"], during.as_str(), "{c}");
    assert_eq!(c["detail"]["old_sha256"], sha0.as_str(), "{c}");
    assert_eq!(c["detail"]["writes_allowed"], 2, "{c}");
    let list = r.list();
    let f = list["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == s(&prot))
        .unwrap()
        .clone();
    assert_eq!(f["declared_sha256"], during.as_str(), "{f}");
    assert!(f["window"].is_null(), "{f}");
    // Closed means closed, for the new inode too.
    let out = shell(Actor::Root, &format!("echo x >> {}", s(&prot)), dir.path());
    assert!(out.eperm(), "{out:?}");
    assert_eq!(sha256(&prot), during);

    // UNTOUCHABLE with the path typed back, ended early.
    let w = r
        .approve(
            &unt,
            Duration::from_secs(60),
            "hotfix",
            true,
            Some(&s(&unt)),
        )
        .unwrap();
    assert_eq!(w["tier"], "untouchable");
    assert!(r
        .alerts
        .take()
        .iter()
        .any(|a| a.severity == governor_alerts::Severity::Critical
            && a.kind == "protected file window"));
    r.end(&unt).unwrap();
    assert!(immutable(&unt));
    let out = shell(Actor::Root, &format!("echo x >> {}", s(&unt)), dir.path());
    assert!(out.eperm(), "{out:?}");
    println!(
        "window opened, admitted 2 writes (logged allowed), closed after {closed_after:?}; \
         approve without a terminal refused"
    );
    r.stop();
    unflag_tree(base.path());
}

/// An UNTOUCHABLE window admits the approving login session only, where
/// BPF LSM runs (the guest): a process of another session — an agent under
/// pm2, a cron job, a root shell elsewhere — is refused while the human's
/// own session writes. Without BPF LSM (this host) the window says so, and
/// the flag alone can't tell sessions apart.
#[test]
fn protect_untouchable_window_admits_the_approving_session_only() {
    use std::io::Write;
    use std::os::unix::process::CommandExt;
    require_root();
    let _g = lock();
    let base = tempfile::tempdir_in("/tmp").unwrap();
    let dir = open_dir(base.path());
    let unt = dir.path().join("core.py");
    file_for(&unt, "print(1)\n", 0);
    let r = Running::start(
        ProtectConfig::with_paths(&[&unt], &[]),
        &base.path().join("state"),
        None,
    );
    let lsm = r.layers.iter().any(|l| l == "bpf-lsm");
    assert_eq!(lsm, in_vm(), "the guest has BPF LSM, this host doesn't");
    // The "login session": a session leader that writes when told to.
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", &format!("read go; echo human >> {}", s(&unt))])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: setsid is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut human = cmd.spawn().expect("spawn the session leader");
    let sid = human.id();
    let w = r
        .approve_in_session(&unt, Duration::from_secs(120), &s(&unt), sid)
        .unwrap();
    assert_eq!(w["status"], "open", "{w}");
    assert_eq!(w["session"], sid, "{w}");
    let list = r.list();
    let win = &list["files"][0]["window"];
    assert_eq!(win["session"], sid, "{list}");
    assert_eq!(win["session_enforced"], lsm, "{list}");
    // Another session (this test's, as an agent's would be).
    let agent = shell(
        Actor::Root,
        &format!("echo agent >> {}", s(&unt)),
        dir.path(),
    );
    // The human's session.
    human.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = human.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the approving session's write: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let content = std::fs::read_to_string(&unt).unwrap();
    assert!(content.contains("human"), "{content}");
    if lsm {
        assert!(
            agent.eperm(),
            "another session inside the window: {agent:?}"
        );
        assert!(!content.contains("agent"), "{content}");
        let e = r.wait_entries("the refused write", Duration::from_secs(10), |e| {
            attempts_of(e, agent.pid).len() == 1
        });
        let a = &attempts_of(&e, agent.pid)[0]["detail"];
        assert_eq!(
            (a["result"].as_str(), a["window"].as_bool()),
            (Some("denied"), Some(true)),
            "{a}"
        );
    } else {
        assert_eq!(
            agent.status, 0,
            "without BPF LSM the window admits any writer: {agent:?}"
        );
        assert!(
            w["writers"]
                .as_str()
                .unwrap_or("")
                .contains("can't be enforced"),
            "{w}"
        );
    }
    r.end(&unt).unwrap();
    assert!(immutable(&unt));
    let out = shell(Actor::Root, &format!("echo x >> {}", s(&unt)), dir.path());
    assert!(out.eperm(), "{out:?}");
    println!(
        "UNTOUCHABLE window for session {sid}: the session's write went in; another session's was {}",
        if lsm { "refused (BPF LSM)" } else { "admitted (no BPF LSM here, reported)" }
    );
    r.stop();
    unflag_tree(base.path());
}

/// Bad input is reported at start, never ignored.
#[test]
fn protect_bad_input_is_reported_at_start() {
    require_root();
    let _g = lock();
    let base = tempfile::tempdir_in("/tmp").unwrap();
    let dir = base.path();
    std::fs::write(dir.join("ok.txt"), "ok\n").unwrap();
    std::fs::create_dir(dir.join("adir")).unwrap();
    let list = dir.join("UNTOUCHABLE_FILES.txt");
    std::fs::write(
        &list,
        format!("# ours\n{}/ok.txt\nnot/absolute\n", dir.display()),
    )
    .unwrap();
    let d = dir.display();
    let src = format!(
        "[protect]\nuntouchable = [\"{d}/missing.txt\", \"{d}/adir\", \"{d}/*.nothing\"]\n\
         untouchable_lists = [\"{}\"]\n",
        list.display()
    );
    let cfg = ProtectConfig::parse(Path::new("/etc/governor/governor.toml"), &src).unwrap();
    let r = Running::start(cfg, &dir.join("state"), None);
    let probs = r.report.problems.clone();
    assert_eq!(probs.len(), 4, "{probs:#?}");
    assert!(probs[0].contains("missing.txt") && probs[0].contains("does not exist"));
    assert!(probs[1].contains("is a directory"));
    assert!(probs[2].contains("matches nothing"));
    assert!(probs[3].contains(&format!("{}:3", list.display())) && probs[3].contains("absolute"));
    assert_eq!(r.report.files, 1, "the good entry is still protected");
    assert!(immutable(&dir.join("ok.txt")));
    let e = r.entries();
    let start = e.iter().find(|x| x["kind"] == "protect.start").unwrap();
    assert_eq!(start["detail"]["problems"].as_array().unwrap().len(), 4);
    assert!(r
        .alerts
        .take()
        .iter()
        .any(|a| a.title.contains("4 problem")));
    r.stop();
    unflag_tree(dir);
}

/// What the helper process protects (paths passed in the environment).
const CHILD_ENV: &str = "GOVERNOR_PROTECT_CHILD";

/// Not a test on its own: the "daemon" the kill -9 test starts and kills.
#[test]
#[ignore]
fn protect_child_helper() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split('\n').collect();
    let (state, a, b) = (
        Path::new(parts[0]),
        Path::new(parts[1]),
        Path::new(parts[2]),
    );
    let r = Running::start(ProtectConfig::with_paths(&[], &[a, b]), state, None);
    r.approve(b, Duration::from_secs(600), "edit b", true, None)
        .expect("window");
    println!("READY");
    use std::io::Write;
    std::io::stdout().flush().ok();
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn protect_kill9_leaves_files_protected_and_restart_reconciles() {
    require_root();
    let _g = lock();
    let base = tempfile::tempdir_in("/tmp").unwrap();
    let dir = open_dir(base.path());
    let a = dir.path().join("a.conf");
    let b = dir.path().join("b.conf");
    file_for(&a, "a1\n", 0);
    file_for(&b, "b1\n", 0);
    let state = base.path().join("state");
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "protect_child_helper",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, format!("{}\n{}\n{}", s(&state), s(&a), s(&b)))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::BufRead;
        let out = child.stdout.take().unwrap();
        let mut lines = std::io::BufReader::new(out).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("READY") => break,
                Some(Ok(_)) => continue,
                _ => panic!("helper died before READY"),
            }
        }
    }
    assert!(immutable(&a));
    assert!(!immutable(&b), "b's window is open");
    // kill -9 the "daemon".
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
    // Still protected with no daemon at all.
    assert!(immutable(&a));
    let out = shell(Actor::Root, &format!("echo x >> {}", s(&a)), dir.path());
    assert!(out.eperm(), "{out:?}");
    let out = shell(Actor::Nobody, &format!("echo x >> {}", s(&a)), dir.path());
    assert!(out.eperm(), "{out:?}");
    // While it is down: b (window interrupted) is edited; someone clears
    // a's flag and edits it.
    std::fs::write(&b, "b2\n").unwrap();
    set_immutable(&a, false);
    std::fs::write(&a, "a-tampered\n").unwrap();
    let (sha_a, sha_b) = (sha256(&a), sha256(&b));

    let r = Running::start(ProtectConfig::with_paths(&[], &[&a, &b]), &state, None);
    assert!(
        immutable(&a) && immutable(&b),
        "both flagged again at start"
    );
    assert_eq!(r.report.windows_closed, vec![s(&b)], "{:?}", r.report);
    assert_eq!(r.report.changed, vec![s(&a)], "{:?}", r.report);
    let e = r.entries();
    let wc = e
        .iter()
        .find(|x| x["kind"] == "protect.window_close")
        .expect("window closed at start");
    assert_eq!(wc["detail"]["new_sha256"], sha_b.as_str(), "{wc}");
    assert!(wc["detail"]["why"]
        .as_str()
        .unwrap()
        .contains("daemon stopped"));
    let cd = e
        .iter()
        .find(|x| x["kind"] == "protect.changed_while_down")
        .expect("change reported");
    assert_eq!(cd["detail"]["actual_sha256"], sha_a.as_str(), "{cd}");
    let list = r.list();
    let fb = list["files"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["path"] == s(&b))
        .unwrap()
        .clone();
    assert_eq!(fb["declared_sha256"], sha_b.as_str());
    println!(
        "kill -9: files stayed immutable; restart closed the interrupted window and reported {:?}",
        r.report.changed
    );
    // The audit chain of both runs verifies.
    let entries = read_audit(&state);
    assert!(entries.len() >= 4);
    r.stop();
    unflag_tree(base.path());
}

/// The benchmark, on demand (`cargo xtask bench` runs it through
/// governor-bench): `cargo test --release -p governor-tests --test protect
/// -- --ignored protect_benchmark --nocapture`.
#[test]
#[ignore]
fn protect_benchmark() {
    let _g = lock();
    let b = governor_tests::bench_protect::bench_protect(12, 100_000).unwrap();
    assert!(b.passed(), "{b:#?}");
}

/// The state directory is protected implicitly: the audit log is
/// append-only everywhere (truncating it is refused and logged); removing or
/// creating entries is refused by BPF LSM where it runs, and logged anyway.
#[test]
fn protect_state_dir_is_guarded() {
    require_root();
    let _g = lock();
    let base = tempfile::tempdir_in("/tmp").unwrap();
    let dir = open_dir(base.path());
    let p = dir.path().join("x.conf");
    file_for(&p, "x\n", 0);
    let state = base.path().join("state");
    let r = Running::start(ProtectConfig::with_paths(&[&p], &[]), &state, None);
    let lsm = r.layers.iter().any(|l| l == "bpf-lsm");
    let log = state.join("audit.jsonl");
    let before = std::fs::read(&log).unwrap();
    let out = shell(
        Actor::Root,
        &format!("echo forged > {}", s(&log)),
        dir.path(),
    );
    assert!(out.eperm(), "truncating the audit log: {out:?}");
    assert!(std::fs::read(&log).unwrap().starts_with(&before));
    let e = r.wait_entries("audit log attempt", Duration::from_secs(10), |e| {
        !attempts_of(e, out.pid).is_empty()
    });
    let a = &attempts_of(&e, out.pid)[0]["detail"];
    assert_eq!(a["file"], s(&state), "{a}");
    assert_eq!(a["resolved"], s(&log), "{a}");
    assert_eq!(a["result"], "denied", "{a}");

    let victim = state.join("protect.json");
    let out = tool(Actor::Root, &["rm", &s(&victim)], dir.path());
    let e = r.wait_entries("state file removal", Duration::from_secs(10), |e| {
        !attempts_of(e, out.pid).is_empty()
    });
    let a = &attempts_of(&e, out.pid)[0]["detail"];
    assert_eq!(a["op"], "unlink", "{a}");
    if lsm {
        assert!(out.eperm(), "BPF LSM guards the state dir: {out:?}");
        assert!(victim.exists());
        assert_eq!(a["result"], "denied", "{a}");
        let out = shell(
            Actor::Root,
            &format!("echo x > {}", s(&state.join("new"))),
            dir.path(),
        );
        assert!(out.eperm(), "creating in the state dir: {out:?}");
    } else {
        // Without BPF LSM nothing refuses it, but it is on the record.
        assert_eq!(a["result"], "allowed", "{a}");
    }
    println!(
        "state dir: audit log truncation refused; removal of protect.json {} and logged",
        if lsm {
            "refused"
        } else {
            "allowed (no BPF LSM)"
        }
    );
    r.stop();
    unflag_tree(base.path());
}

/// SIGHUP: files added to [protect] are protected, removed ones released,
/// a flag cleared behind the daemon's back is put back and the change
/// reported.
#[test]
fn protect_reload_adds_and_releases_files() {
    require_root();
    let _g = lock();
    let base = tempfile::tempdir_in("/tmp").unwrap();
    let dir = open_dir(base.path());
    let (a, b) = (dir.path().join("a.conf"), dir.path().join("b.conf"));
    file_for(&a, "a\n", 0);
    file_for(&b, "b\n", 0);
    let r = Running::start(
        ProtectConfig::with_paths(&[&a], &[]),
        &base.path().join("state"),
        None,
    );
    assert!(immutable(&a) && !immutable(&b));
    let rep = r.reload(ProtectConfig::with_paths(&[&a], &[&b]));
    assert_eq!(rep.added, vec![s(&b)], "{rep:?}");
    assert!(immutable(&b));
    let out = shell(Actor::Root, &format!("echo x >> {}", s(&b)), dir.path());
    assert!(out.eperm(), "{out:?}");
    // Someone (the daemon's own process is exempt, so: directly) clears a's
    // flag and edits it; the reload puts the flag back and reports it.
    set_immutable(&a, false);
    std::fs::write(&a, "a2\n").unwrap();
    let rep = r.reload(ProtectConfig::with_paths(&[&a], &[&b]));
    assert!(immutable(&a));
    assert_eq!(rep.changed, vec![s(&a)], "{rep:?}");
    let rep = r.reload(ProtectConfig::with_paths(&[], &[&b]));
    assert_eq!(rep.removed, vec![s(&a)], "{rep:?}");
    assert!(!immutable(&a), "released files lose the flag");
    std::fs::write(&a, "a3\n").unwrap();
    let e = r.entries();
    assert_eq!(
        e.iter().filter(|x| x["kind"] == "protect.reload").count(),
        3
    );
    assert!(e.iter().any(|x| x["kind"] == "protect.content_changed"));
    r.stop();
    unflag_tree(base.path());
}
