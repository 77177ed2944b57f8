//! Process lifecycle from the real kernel: exit codes, signals, threads,
//! exec argv, and a lossless storm. Runs on the host and in the qemu guests
//! (the check that no struct offset is compiled in).

use std::{
    process::Command,
    time::{Duration, Instant},
};

use governor::{events::Event, probes::ProbeOptions};
use governor_tests::{execs_of, exits_of, Collector};

const CHILD_MODE: &str = "GOVERNOR_TEST_CHILD_MODE";

/// Runs `sh -c script`, returning its pid and how long it lived as seen
/// from here (an upper bound on the truth: spawn to reap).
fn run_sh(script: &str) -> (u32, Duration) {
    let t0 = Instant::now();
    let mut child = Command::new("/bin/sh")
        .arg("-c")
        .arg(script)
        .spawn()
        .expect("spawn sh");
    let pid = child.id();
    child.wait().expect("wait");
    (pid, t0.elapsed())
}

fn one_exit(c: &Collector, pid: u32) -> governor::events::Exit {
    c.wait_for(
        &format!("exit of pid {pid}"),
        Duration::from_secs(10),
        |evs| !exits_of(evs, pid).is_empty(),
    );
    // Give a duplicate (which would be a bug) the chance to show up.
    std::thread::sleep(Duration::from_millis(50));
    let exits = exits_of(&c.events(), pid);
    assert_eq!(
        exits.len(),
        1,
        "exactly one exit event for pid {pid}: {exits:?}"
    );
    exits[0].clone()
}

fn assert_uptime(exit: &governor::events::Exit, observed: Duration) {
    let up = exit.uptime();
    // The kernel's figure is fork→exit; ours is spawn→reap, a little longer.
    assert!(
        up <= observed + Duration::from_millis(2),
        "kernel uptime {up:?} longer than observed {observed:?}"
    );
    // Our observation adds the reaping latency on top of the kernel's
    // figure. Under qemu's software emulation (the vm-test guests) that
    // latency alone is tens of ms, so the bound there is looser.
    let slack = if governor_tests::in_vm() { 150 } else { 20 };
    assert!(
        observed.saturating_sub(up) <= Duration::from_millis(slack),
        "kernel uptime {up:?} more than {slack} ms off the observed {observed:?}"
    );
}

#[test]
fn exit_codes_and_signals() {
    let c = Collector::start();
    let cases: &[(&str, Option<i32>, Option<i32>)] = &[
        ("sleep 0.2; exit 0", Some(0), None),
        ("sleep 0.2; exit 3", Some(3), None),
        ("sleep 0.2; kill -KILL $$", None, Some(9)),
        ("sleep 0.2; kill -SEGV $$", None, Some(11)),
    ];
    for (script, code, signal) in cases {
        let (pid, observed) = run_sh(script);
        let exit = one_exit(&c, pid);
        assert_eq!(
            (exit.code, exit.signal),
            (*code, *signal),
            "{script}: {exit:?}"
        );
        assert_uptime(&exit, observed);
        println!(
            "{script:<28} → code {:?} signal {:?} uptime {:?} (observed {observed:?})",
            exit.code,
            exit.signal,
            exit.uptime()
        );
    }
    c.stop();
}

/// The child half of `multithreaded_process_dies_once`: threads that exit
/// before the main thread does.
fn threads_child() -> ! {
    let handles: Vec<_> = (0..4)
        .map(|i| std::thread::spawn(move || std::thread::sleep(Duration::from_millis(20 * i))))
        .collect();
    for h in handles {
        h.join().ok();
    }
    // One more thread still running when the process exits.
    std::thread::spawn(|| std::thread::sleep(Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(50));
    std::process::exit(7);
}

#[test]
fn multithreaded_process_dies_once() {
    if std::env::var(CHILD_MODE).as_deref() == Ok("threads") {
        threads_child();
    }
    let c = Collector::start();
    let t0 = Instant::now();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["multithreaded_process_dies_once", "--exact", "--nocapture"])
        .env(CHILD_MODE, "threads")
        .spawn()
        .unwrap();
    let pid = child.id();
    let status = child.wait().unwrap();
    let observed = t0.elapsed();
    assert_eq!(status.code(), Some(7));
    let exit = one_exit(&c, pid);
    assert_eq!((exit.code, exit.signal), (Some(7), None));
    assert_uptime(&exit, observed);
    c.stop();
}

#[test]
fn exec_twice_reports_both_images() {
    let c = Collector::start();
    let mut child = Command::new("/bin/sh")
        .args(["-c", "exec /bin/sleep 0.1"])
        .spawn()
        .unwrap();
    let pid = child.id();
    child.wait().unwrap();
    c.wait_for("two execs and an exit", Duration::from_secs(10), |evs| {
        execs_of(evs, pid).len() >= 2 && !exits_of(evs, pid).is_empty()
    });
    let execs = execs_of(&c.events(), pid);
    assert_eq!(execs.len(), 2, "{execs:?}");
    assert_eq!(execs[0].filename, "/bin/sh");
    assert_eq!(execs[0].argv, vec!["/bin/sh", "-c", "exec /bin/sleep 0.1"]);
    assert_eq!(execs[1].filename, "/bin/sleep");
    assert_eq!(execs[1].argv, vec!["/bin/sleep", "0.1"]);
    assert_eq!(
        execs[1].start_ns, execs[0].start_ns,
        "exec keeps the process start time"
    );
    c.stop();
}

/// ≥ 5,000 fork+exec+exit while the programs run: every one seen, no drops.
#[test]
fn lossless_storm() {
    const N: usize = 5_000;
    let c = Collector::start();
    let t0 = Instant::now();
    let pids: Vec<u32> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| {
                    (0..N / 2)
                        .map(|_| {
                            let mut ch = Command::new("/bin/true").spawn().expect("spawn");
                            let pid = ch.id();
                            ch.wait().expect("wait");
                            pid
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let spawn_time = t0.elapsed();
    let want: std::collections::HashSet<u32> = pids.iter().copied().collect();
    c.wait_for("every exit of the storm", Duration::from_secs(60), |evs| {
        evs.iter()
            .filter(|e| matches!(e, Event::Exit(x) if want.contains(&x.pid)))
            .count()
            >= N
    });
    let (events, dropped) = c.stop();
    let execs = events
        .iter()
        .filter(
            |e| matches!(e, Event::Exec(x) if want.contains(&x.pid) && x.filename == "/bin/true"),
        )
        .count();
    let exits = events
        .iter()
        .filter(|e| matches!(e, Event::Exit(x) if want.contains(&x.pid)))
        .count();
    let forks = events
        .iter()
        .filter(|e| matches!(e, Event::Fork(x) if want.contains(&x.pid)))
        .count();
    println!("storm: {N} processes in {spawn_time:?}: {forks} forks, {execs} execs, {exits} exits seen, {dropped} dropped");
    assert_eq!(dropped, 0, "events were dropped");
    assert_eq!(execs, N, "every exec seen");
    assert_eq!(exits, N, "every exit seen");
    assert_eq!(forks, N, "every fork seen");
}

/// With a deliberately tiny ring that nobody drains, events are lost — and
/// the loss is counted, never silent.
#[test]
fn tiny_ring_counts_drops() {
    let c = Collector::start_with(ProbeOptions { ring_bytes: 4096 }, false);
    for _ in 0..50 {
        Command::new("/bin/true").status().unwrap();
    }
    c.resume();
    std::thread::sleep(Duration::from_millis(200));
    let (events, dropped) = c.stop();
    println!(
        "tiny ring: {} events delivered, {dropped} dropped",
        events.len()
    );
    assert!(
        dropped > 0,
        "a 4 KiB ring can't hold 50 exec events, yet no drop was counted"
    );
    // 50 × (fork + exec + exit) happened; what was delivered plus what was
    // counted as lost accounts for at least all of ours.
    assert!(events.len() as u64 + dropped >= 150);
}

/// A leader thread that ends (as `pthread_exit` does) while a worker runs
/// on is not a death: the process dies once, when the worker exits it with
/// code 5 a second later, and its uptime is the whole second.
#[test]
fn leader_thread_exit_is_not_a_death() {
    let c = Collector::start();
    let t0 = Instant::now();
    let mut child = Command::new(governor_tests::fixture_bin())
        .args(["leader-exits", "1000", "5"])
        .spawn()
        .expect("spawn the fixture");
    let pid = child.id();
    let status = child.wait().unwrap();
    let observed = t0.elapsed();
    assert_eq!(status.code(), Some(5), "the fixture's own exit status");
    let exit = one_exit(&c, pid);
    assert_eq!(
        (exit.code, exit.signal),
        (Some(5), None),
        "the group's exit, not the leader's: {exit:?}"
    );
    let up = exit.uptime();
    assert!(
        up >= Duration::from_millis(1000) && up <= observed + Duration::from_millis(2),
        "uptime is the group's (≈ 1 s, at most the observed {observed:?}): {up:?}"
    );
    c.stop();
}

/// A multi-threaded process killed by a signal dies once, by that signal:
/// every thread exits, only the last one's exit is the process's.
#[test]
fn multithreaded_process_killed_by_signal_dies_once() {
    let c = Collector::start();
    let mut child = Command::new(governor_tests::fixture_bin())
        .args(["threads", "8"])
        .spawn()
        .expect("spawn the fixture");
    let pid = child.id();
    // All eight threads exist before the kill.
    assert!(
        governor_tests::wait_until(Duration::from_secs(10), || {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|d| d.count() >= 8)
                .unwrap_or(false)
        }),
        "the fixture started its 8 threads"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let exit = one_exit(&c, pid);
    assert_eq!((exit.code, exit.signal), (None, Some(9)), "{exit:?}");
    c.stop();
}
