//! `auto` mode picks what works and says why.

use std::process::Command;

use kiln_sandbox::{Capabilities, Mode, Sandbox};

use crate::common::{Fixture, require_root, run, sh};

#[test]
fn auto_as_root_picks_rootless_here_and_runs() {
    require_root!();
    let caps = Capabilities::probe();
    // this machine allows user namespaces, and root can mount
    assert!(caps.user_namespaces.is_ok(), "{:?}", caps.user_namespaces);
    assert!(caps.mount_rights.is_ok(), "{:?}", caps.mount_rights);
    let (sandbox, choice) = Sandbox::auto().unwrap();
    assert_eq!(choice.mode, Mode::Rootless);
    assert!(choice.reason.contains("namespaces"), "{}", choice.reason);
    let f = Fixture::new();
    assert_eq!(run(&sandbox, &sh(&f.root(), "echo ok")).stdout, "ok\n");
}

#[test]
fn auto_as_unprivileged_user_picks_rootless() {
    require_root!();
    let f = Fixture::new();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(f.driver())
        .args(["--mode", "auto", "--report", &f.root().to_string_lossy(), "--", "true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("kiln-sandbox: mode rootless (user, mount and pid namespaces are allowed)"),
        "{err}"
    );
}
