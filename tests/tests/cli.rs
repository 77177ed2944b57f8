//! The `governor` binary as a user runs it: check-config, doctor, watch.

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use governor_tests::{governor_bin, in_vm, require_root};

fn check_config(src: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("governor.toml");
    std::fs::write(&path, src).unwrap();
    let out = Command::new(governor_bin())
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).replace(&path.display().to_string(), "FILE");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        stderr,
    )
}

#[test]
fn check_config_accepts_the_example() {
    let (code, out, err) = check_config(governor::config::EXAMPLE_CONFIG);
    assert_eq!(code, 0, "stdout {out} stderr {err}");
    assert!(out.contains("ok"), "{out}");
}

/// Each malformed config: exit 1, `file:line`, the key and the reason.
#[test]
fn check_config_names_file_line_and_key() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "[defaults]\nwindow = \"ten minutes\"\n",
            "FILE:2:",
            "key `defaults.window`",
        ),
        (
            "[daemon]\nsocket = \"/run/g.sock\"\nstate_dri = \"/x\"\n",
            "FILE:3:",
            "key `daemon.state_dri`",
        ),
        (
            "[defaults]\nmax_restarts = -1\n",
            "FILE:2:",
            "key `defaults.max_restarts`",
        ),
        (
            "[tiers.thin]\nmemory_ceiling = \"65 potatoes\"\n",
            "FILE:2:",
            "key `tiers.thin.memory_ceiling`",
        ),
        (
            "[[service]]\nname = \"lily\"\npm2 = \"lily\"\ntier = \"gigantic\"\n",
            "FILE:4:",
            "key `service.tier`",
        ),
        (
            "[[service]]\nname = \"lily\"\ncritical = true\n",
            "FILE:2:",
            "key `service.name`",
        ),
        (
            "[[service]]\nname = \"x\"\nexe = \"/bin/x\"\nargs = \"(\"\n",
            "FILE:4:",
            "key `service.args`",
        ),
        (
            "[system]\nmemory_floor = 12.5\n",
            "FILE:2:",
            "key `system.memory_floor`",
        ),
    ];
    for (src, loc, key) in cases {
        let (code, _, err) = check_config(src);
        assert_eq!(code, 1, "{src:?} should be rejected; stderr: {err}");
        assert!(err.starts_with(loc), "{src:?}: expected {loc} in: {err}");
        assert!(err.contains(key), "{src:?}: expected {key} in: {err}");
    }
    let (code, _, err) = check_config("");
    assert_eq!(code, 0, "an empty config means all defaults: {err}");
    let out = Command::new(governor_bin())
        .args(["check-config", "/nonexistent/governor.toml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

#[test]
fn doctor_reports_layers_and_bpf_lsm() {
    require_root();
    let out = Command::new(governor_bin())
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let layers: Vec<&str> = v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|l| l.as_str())
        .collect();
    assert!(layers.contains(&"ebpf-attempt-logging"), "{v}");
    let check = |name: &str| {
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(check("offsets")["ok"], true, "{v}");
    assert_eq!(check("prog:tracepoint")["ok"], true, "{v}");
    println!(
        "kernel {}: bpf_lsm = {}, layers {layers:?}",
        v["kernel"], v["bpf_lsm"]
    );
    if in_vm() {
        assert_eq!(v["bpf_lsm"], true, "the guest kernel has BPF LSM: {v}");
        assert!(layers.contains(&"bpf-lsm"));
    } else {
        // Our host kernel refuses BPF LSM (EPERM); doctor must say so.
        assert_eq!(v["bpf_lsm"], false, "{v}");
        assert!(check("bpf lsm")["detail"].as_str().unwrap().contains("LSM"));
    }
}

/// `governor watch --json`: one object per line, with the documented fields.
#[test]
fn watch_json_streams_exec_and_exit() {
    require_root();
    let mut watch = Command::new(governor_bin())
        .args(["watch", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(watch.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    assert!(line.contains("tracing"), "watch did not start: {line}");
    let mut child = Command::new("/bin/sh")
        .args(["-c", "sleep 0.1; exit 5"])
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = BufReader::new(watch.stdout.take().unwrap());
    let (mut exec, mut exit) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(20);
    for l in out.lines() {
        let l = l.unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}"));
        if v["pid"] == pid && v["type"] == "exec" && exec.is_none() {
            exec = Some(v);
        } else if v["pid"] == pid && v["type"] == "exit" {
            exit = Some(v);
            break;
        }
        assert!(Instant::now() < deadline, "no exit event for {pid}");
    }
    child.wait().unwrap();
    // SAFETY: plain kill(2) of the child we spawned.
    unsafe { libc::kill(watch.id() as i32, libc::SIGINT) };
    let status = watch.wait().unwrap();
    assert!(status.success(), "watch should exit 0 on SIGINT: {status}");
    let exec = exec.expect("exec event");
    let exit = exit.expect("exit event");
    for k in ["ts", "pid", "ppid", "comm", "exe", "argv", "service"] {
        assert!(!exec[k].is_null(), "exec lacks {k}: {exec}");
    }
    assert_eq!(
        exec["argv"],
        serde_json::json!(["/bin/sh", "-c", "sleep 0.1; exit 5"])
    );
    assert_eq!(exit["exit_code"], 5);
    assert!(exit["signal"].is_null());
    assert!(exit["uptime_ms"].as_u64().unwrap() >= 100, "{exit}");
    assert_eq!(exit["service"], exec["service"]);
    assert!(exit["service"].as_str().unwrap().starts_with("fp:sh-"));
}
