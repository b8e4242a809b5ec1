//! Least privilege: what the running agent keeps of its capabilities, and the agent run as
//! a user without root, given only capabilities (what `AmbientCapabilities=` does in
//! `dist/systemd/proxy.service`). Real kernel, namespaces of their own, removed on drop.

mod common;

use std::time::Duration;

use common::{
    AGENT_ARGS, Agent, Mounts, Server, ServerMode, exchange_from_client, require_root, server,
};
use nix::{sys::signal, unistd::Pid};
use proxy_testbed::{self as testbed, Gateway};

/// The most a running agent may hold: CAP_NET_BIND_SERVICE (10), CAP_NET_ADMIN (12),
/// CAP_NET_RAW (13), CAP_PERFMON (38), CAP_BPF (39).
const ALLOWED: u64 = (1 << 10) | (1 << 12) | (1 << 13) | (1 << 38) | (1 << 39);

/// What `setpriv` gives the agent run as nobody (uid 65534, which has no passwd entry
/// needs), as the unit's `AmbientCapabilities=` does.
const AS_NOBODY: &[&str] = &[
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all,+bpf,+net_admin,+perfmon,+net_bind_service",
    "--ambient-caps=-all,+bpf,+net_admin,+perfmon,+net_bind_service",
    "--",
];

/// A `/proc/PID/task/TID/status` field, hexadecimal (`CapEff`) or not (`Uid`), of every
/// thread of `pid`.
fn thread_fields(pid: u32, field: &str) -> Vec<String> {
    let tasks =
        std::fs::read_dir(format!("/proc/{pid}/task")).expect("listing the agent's threads");
    let mut values = Vec::new();
    for task in tasks {
        let path = task.expect("a task").path().join("status");
        let Ok(status) = std::fs::read_to_string(&path) else {
            continue;
        };
        let value = status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:")))
            .unwrap_or_else(|| panic!("no {field} in {}", path.display()));
        values.push(value.trim().to_owned());
    }
    assert!(!values.is_empty());
    values
}

/// Asserts that every thread of the agent holds nothing outside [`ALLOWED`] in its
/// effective, permitted and ambient sets, and has `no_new_privs` set; returns the threads'
/// effective sets.
/// What the agent says it kept: CAP_BPF too where the kernel asks it of every `bpf()` call
/// (before 6.5, with `kernel.unprivileged_bpf_disabled` set), decided here from the version
/// and the sysctl, apart from the agent's own measurement.
fn kept_line() -> &'static str {
    use aya::util::KernelVersion;
    let gated = KernelVersion::current().is_ok_and(|v| v < KernelVersion::new(6, 5, 0))
        && std::fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
            .is_ok_and(|v| v.trim() != "0");
    if gated {
        "capabilities: kept cap_net_admin,cap_net_bind_service,cap_bpf"
    } else {
        "capabilities: kept cap_net_admin,cap_net_bind_service ("
    }
}

fn assert_least_privilege(agent: &Agent) -> Vec<u64> {
    let pid = agent.pid();
    let mut effective = Vec::new();
    for field in ["CapEff", "CapPrm", "CapAmb"] {
        for value in thread_fields(pid, field) {
            let mask = u64::from_str_radix(&value, 16).expect("a hexadecimal mask");
            assert_eq!(
                mask & !ALLOWED,
                0,
                "{field} {mask:016x} of a thread of the agent holds more than {ALLOWED:016x}\n{}",
                agent.log_text()
            );
            if field == "CapEff" {
                effective.push(mask);
            }
        }
    }
    for value in thread_fields(pid, "NoNewPrivs") {
        assert_eq!(value, "1", "a thread without no_new_privs");
    }
    effective
}

fn hangup(agent: &Agent) {
    let _ = signal::kill(Pid::from_raw(agent.pid() as i32), signal::Signal::SIGHUP);
}

#[test]
fn a_root_agent_keeps_only_what_it_needs_and_still_reloads_and_follows_addresses() {
    require_root();
    let gw = Gateway::new("caps").expect("topology");
    let _s80 = Server::start(&gw.server, server(80), ServerMode::Reply);
    let _s8080 = Server::start(&gw.server, server(8080), ServerMode::Reply);
    let dir = common::TempDir::new("proxy-caps");
    let rules = dir.join("rules.toml");
    std::fs::write(&rules, "[[rule]]\ndport = \"80\"\non_port = 50080\n").expect("rules");
    let config = rules.to_str().expect("utf-8 path");
    let agent = Agent::start(&gw.router, &["run", "--iface", "r0", "--config", config]);
    assert!(agent.log_contains(kept_line()), "{}", agent.log_text());
    assert!(
        agent.log_contains("(effective and permitted), dropped the rest (bounding set too)"),
        "{}",
        agent.log_text()
    );
    for effective in assert_least_privilege(&agent) {
        // Root started it with everything: what is left is exactly CAP_NET_BIND_SERVICE and
        // CAP_NET_ADMIN.
        assert_eq!(effective, (1 << 10) | (1 << 12));
    }
    for bounding in thread_fields(agent.pid(), "CapBnd") {
        let mask = u64::from_str_radix(&bounding, 16).expect("hex");
        assert_eq!(mask & !ALLOWED, 0, "CapBnd {mask:016x}");
    }
    let proxied = format!("peer={}:", testbed::ROUTER_SERVER_SIDE_V4);
    let reply = exchange_from_client(&gw, server(80), b"x");
    assert!(reply.starts_with(&proxied), "{reply}");

    // A reload that needs a new listener, on a port below 1024 (CAP_NET_BIND_SERVICE,
    // IP_TRANSPARENT), new routes and map updates, after the drop.
    std::fs::write(&rules, "[[rule]]\ndport = \"8080\"\non_port = 808\n").expect("rules");
    hangup(&agent);
    agent
        .wait_for_line(&["reloaded: 1 rule(s) in force"], Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no reload:\n{}", agent.log_text()));
    let reply = exchange_from_client(&gw, server(8080), b"x");
    assert!(reply.starts_with(&proxied), "{reply}");

    // An address change: the laddr map is updated.
    gw.router
        .ip(&["addr", "add", "203.0.113.1/24", "dev", "r0"])
        .expect("add address");
    agent
        .wait_for_line(
            &["r0: addresses changed, laddr candidates 192.0.2.1"],
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("address change not seen:\n{}", agent.log_text()));
    assert_least_privilege(&agent);

    // The teardown works with what is left, and leaves no rule behind.
    let log = agent.stop_ok();
    // (Only the warning about the bpffs `ip netns exec` gives it, which is not about privileges.)
    assert!(
        !log.lines()
            .any(|l| l.contains(" ERROR ") || (l.contains(" WARN ") && !l.contains("proxy::pins"))),
        "{log}"
    );
    let rules_left = common::ip_stdout(&gw.router, &["rule", "show"]);
    assert!(!rules_left.contains("proto 211"), "{rules_left}");
}

/// bpffs as systemd mounts it (root's, mode 0700), then what the unit's `ExecStartPre=+`
/// does: search permission for others on it (a user must reach its own directory; it still
/// may not list bpffs, and each pin keeps its own mode), and the agents' directory made the
/// user's.
fn bpffs_for_nobody(mounts: &Mounts) {
    let out = mounts.sh(concat!(
        "mount -t bpf -o mode=0700 bpf /sys/fs/bpf && chmod o+x /sys/fs/bpf && ",
        "install -d -o 65534 -g 65534 -m 0700 /sys/fs/bpf/proxy"
    ));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_user_with_the_capabilities_and_no_root_runs_the_agent() {
    require_root();
    let gw = Gateway::new("nobody").expect("topology");
    let _s80 = Server::start(&gw.server, server(80), ServerMode::Reply);
    let mounts = Mounts::new(&gw.router);
    bpffs_for_nobody(&mounts);
    let agent = Agent::start_in_wrapped(&mounts, AS_NOBODY, AGENT_ARGS);
    for uid in thread_fields(agent.pid(), "Uid") {
        assert_eq!(uid.split_whitespace().collect::<Vec<_>>(), ["65534"; 4]);
    }
    assert!(agent.log_contains(kept_line()), "{}", agent.log_text());
    assert_least_privilege(&agent);
    let proxied = format!("peer={}:", testbed::ROUTER_SERVER_SIDE_V4);
    let reply = exchange_from_client(&gw, server(80), b"x");
    assert!(reply.starts_with(&proxied), "{reply}");
    assert!(
        mounts.pins().iter().any(|p| p.ends_with("/tcx-r0")),
        "{:?}",
        mounts.pins()
    );

    // A sysctl written after the drop, by a user that is not root: CAP_NET_ADMIN in the
    // namespace is what the kernel asks for (no CAP_DAC_OVERRIDE).
    gw.router
        .sysctl("net.ipv4.conf.all.src_valid_mark", "1")
        .expect("sysctl in the router namespace");
    agent
        .wait_for_line(
            &["src_valid_mark=1 (conf.all): set net.ipv4.conf.r0.accept_local=1 "],
            proxy::src_valid_mark::POLL_INTERVAL + Duration::from_secs(2),
        )
        .unwrap_or_else(|| panic!("not set:\n{}", agent.log_text()));
    let reply = exchange_from_client(&gw, server(80), b"y");
    assert!(reply.starts_with(&proxied), "{reply}");

    let log = agent.stop_ok();
    assert!(
        log.contains("restored net.ipv4.conf.r0.accept_local=0"),
        "{log}"
    );
    // Its pins and directories went with it (the agents' directory is the unit's).
    assert_eq!(mounts.pins(), ["/sys/fs/bpf/proxy"]);
}

/// The agent run as nobody with `caps` (`setpriv --inh-caps` syntax): exit code and
/// stderr.
fn run_as_nobody_with(gw: &Gateway, caps: &str) -> (Option<i32>, String) {
    let out = gw
        .router
        .command("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            &format!("--inh-caps={caps}"),
            &format!("--ambient-caps={caps}"),
        ])
        .arg(env!("CARGO_BIN_EXE_proxy"))
        .args(AGENT_ARGS)
        .output()
        .expect("setpriv (util-linux)");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

#[test]
fn without_the_capabilities_the_agent_names_them_and_changes_nothing() {
    require_root();
    let gw = Gateway::new("nocaps").expect("topology");
    let before = common::ip_stdout(&gw.router, &["rule", "show"]);
    let advice = "run as root, or give the user cap_bpf,cap_net_admin,cap_perfmon (systemd: \
                  AmbientCapabilities=; setpriv --inh-caps/--ambient-caps)";
    assert_eq!(
        run_as_nobody_with(&gw, "-all"),
        (
            Some(1),
            format!(
                "proxy: error: missing capabilities cap_bpf,cap_net_admin,cap_perfmon: {advice}"
            )
        )
    );
    assert_eq!(
        run_as_nobody_with(&gw, "-all,+net_admin"),
        (
            Some(1),
            format!("proxy: error: missing capabilities cap_bpf,cap_perfmon: {advice}")
        )
    );
    // Refused before anything changed: no rule, no route, no classifier.
    assert_eq!(common::ip_stdout(&gw.router, &["rule", "show"]), before);
    let filters = common::tc_stdout(&gw.router, &["filter", "show", "dev", "r0", "ingress"]);
    assert!(filters.trim().is_empty(), "{filters}");
}
