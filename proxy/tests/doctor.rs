//! `proxy doctor` on the kernel: a clean testbed router passes with the flags of a normal
//! run, and each planted problem, in a router namespace of its own, makes it exit non-zero
//! and name that problem. Sysctls are set only inside the test's namespaces.

mod common;

use std::{net::TcpListener, process::Output};

use common::{AGENT_ARGS, require_root};
use proxy_testbed::{Gateway, Netns};

/// `proxy doctor` with the rule flags of `AGENT_ARGS` (`run` dropped), in `ns`.
fn doctor(ns: &Netns) -> Output {
    ns.command(env!("CARGO_BIN_EXE_proxy"))
        .arg("doctor")
        .args(&AGENT_ARGS[1..])
        .output()
        .expect("running proxy doctor")
}

fn stdout(out: &Output) -> String {
    format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts that the doctor exits non-zero with a `problem` line of check `check` whose text
/// contains `word`.
fn assert_problem(ns: &Netns, check: &str, word: &str) {
    let out = doctor(ns);
    let text = stdout(&out);
    assert!(!out.status.success(), "doctor passed:\n{text}");
    assert!(
        String::from_utf8_lossy(&out.stdout).lines().any(|l| {
            l.starts_with("problem") && l.contains(&format!(" {check}: ")) && l.contains(word)
        }),
        "no problem line for {check} ({word}):\n{text}"
    );
}

#[test]
fn doctor_passes_on_a_clean_router() {
    require_root();
    let gw = Gateway::new("doc-clean").expect("topology");
    let out = doctor(&gw.router);
    let text = stdout(&out);
    assert!(out.status.success(), "doctor failed:\n{text}");
    assert!(text.contains("0 problem(s)"), "{text}");
    for check in ["forwarding", "table", "on-port", "tc", "btf"] {
        assert!(
            text.lines()
                .any(|l| l.starts_with("OK") && l.contains(&format!(" {check}: "))),
            "no OK line for {check}:\n{text}"
        );
    }
}

#[test]
fn doctor_names_forwarding_off() {
    require_root();
    let gw = Gateway::new("doc-fwd").expect("topology");
    gw.router
        .sysctl("net.ipv4.ip_forward", "0")
        .expect("sysctl");
    assert_problem(&gw.router, "forwarding", "net.ipv4.ip_forward=0");
}

#[test]
fn doctor_names_src_valid_mark() {
    require_root();
    let gw = Gateway::new("doc-svm").expect("topology");
    gw.router
        .sysctl("net.ipv4.conf.all.src_valid_mark", "1")
        .expect("sysctl");
    assert_problem(&gw.router, "src_valid_mark", "accept_local=1");
}

#[test]
fn doctor_names_a_foreign_route_in_the_table() {
    require_root();
    let gw = Gateway::new("doc-table").expect("topology");
    gw.router
        .ip(&[
            "route",
            "add",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            "100",
        ])
        .expect("route");
    assert_problem(&gw.router, "table", "table 100");
}

#[test]
fn doctor_names_the_on_port_taken() {
    require_root();
    let gw = Gateway::new("doc-port").expect("topology");
    // A plain listener: it lives in the router namespace as long as the value is held.
    let _listener = gw
        .router
        .run(|| TcpListener::bind("0.0.0.0:50080"))
        .expect("entering the namespace")
        .expect("binding the on-port");
    assert_problem(&gw.router, "on-port", "0.0.0.0:50080");
}
