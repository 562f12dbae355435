//! SIGTERM to the driver kills the whole tree; orphans are reaped by the namespace's pid 1.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_sandbox::{Cancel, ExitStatus, Mode, Sandbox};

use crate::common::{Fixture, mounts_under, processes_with, require_root, run, sh};

fn sigterm_kills_tree(mode: &str) {
    let f = Fixture::new();
    // a unique duration marks this test's sleeps
    let token = format!(
        "{}",
        100_000 + std::process::id() % 100_000 + if mode == "chroot" { 7 } else { 0 }
    );
    let script = format!("sleep {token} & (sleep {token} &); sleep {token} & echo started; wait");
    let mut child = Command::new(f.driver())
        .args(["--mode", mode, &f.root().to_string_lossy(), "--", "sh", "-c", &script])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // whatever happens below, the driver is terminated (and so cleans up) at the end
    let mut child = TermOnDrop(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).unwrap();
    assert_eq!(line, "started\n");
    // the `( sleep & )` subshell may still be starting
    let deadline = Instant::now() + Duration::from_secs(5);
    while processes_with(&token).len() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(processes_with(&token).len(), 3, "{:?}", processes_with(&token));
    child.term();
    let start = Instant::now();
    let status = child.0.wait().unwrap();
    assert!(start.elapsed() < Duration::from_secs(5));
    assert_eq!(status.code(), Some(125), "cancelled runs end with the driver's error code");
    let deadline = Instant::now() + Duration::from_secs(2);
    while !processes_with(&token).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(processes_with(&token).is_empty(), "left behind: {:?}", processes_with(&token));
    assert!(mounts_under(&f.root()).is_empty(), "mounts left behind");
}

/// Sends SIGTERM to the driver when dropped (a failed assertion must not leave it running).
struct TermOnDrop(std::process::Child);

impl TermOnDrop {
    fn term(&self) {
        let st = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status().unwrap();
        assert!(st.success());
    }
}

impl Drop for TermOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn sigterm_kills_the_tree_rootless() {
    require_root!();
    sigterm_kills_tree("rootless");
}

#[test]
fn sigterm_kills_the_tree_chroot() {
    require_root!();
    sigterm_kills_tree("chroot");
}

#[test]
fn orphans_are_reaped_in_the_pid_namespace() {
    require_root!();
    let f = Fixture::new();
    // the inner shell exits at once, orphaning its sleep to pid 1, which must reap it
    let c = run(
        &Sandbox::new(Mode::Rootless),
        &sh(&f.root(), "sh -c 'sleep 0.1 &'; sleep 0.5; ps -o stat,comm | grep -c '^Z' || true"),
    );
    assert_eq!(c.stdout, "0\n", "{}", c.stderr);
}

#[test]
fn background_processes_die_with_the_main_process() {
    require_root!();
    let f = Fixture::new();
    for mode in [Mode::Rootless, Mode::Chroot] {
        let token = format!(
            "{}",
            200_000 + std::process::id() % 100_000 + if mode == Mode::Chroot { 3 } else { 0 }
        );
        let c = run(
            &Sandbox::new(mode),
            &sh(&f.root(), &format!("sleep {token} >/dev/null 2>&1 & exit 0")),
        );
        assert_eq!(c.outcome.status, ExitStatus::Code(0));
        assert!(processes_with(&token).is_empty(), "{mode}: {:?}", processes_with(&token));
    }
}

#[test]
fn cancel_handle_kills_the_run() {
    require_root!();
    let f = Fixture::new();
    let cancel = Cancel::new();
    let sandbox = Sandbox::new(Mode::Rootless).with_cancel(cancel.clone());
    let c2 = cancel.clone();
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        c2.cancel();
    });
    let start = Instant::now();
    let r = crate::common::try_run(&sandbox, &sh(&f.root(), "sleep 30"));
    t.join().unwrap();
    assert!(matches!(r, Err(kiln_sandbox::Error::Cancelled)), "{:?}", r.err());
    assert!(start.elapsed() < Duration::from_secs(5));
}
