//! Running the agent: rules from a file, SIGHUP reloads, `proxy stats`, and interface
//! addresses that change under it. Real kernel, namespaces of their own, removed on drop.

mod common;

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{
    AGENT_ARGS, Agent, Mounts, Server, ServerMode, ask, exchange, exchange_from_client, ip_stdout,
    proxy_cleanup, require_root, server, tc_stdout, unused_prefix_rules,
};
use nix::{sys::signal, unistd::Pid};
use proxy_testbed::{self as testbed, Gateway, Netns};

fn write_rules(path: &Path, text: &str) {
    std::fs::write(path, text).expect("writing the rules file");
}

fn hangup(agent: &Agent) {
    let _ = signal::kill(Pid::from_raw(agent.pid() as i32), signal::Signal::SIGHUP);
}

#[test]
fn config_file_rules_reload_on_sighup_and_live_connections_survive() {
    require_root();
    let gw = Gateway::new("reload").expect("topology");
    let _s80 = Server::start(&gw.server, server(80), ServerMode::Echo);
    let _s8080 = Server::start(&gw.server, server(8080), ServerMode::Reply);
    let dir = common::TempDir::new("proxy-reload");
    let rules = dir.join("rules.toml");
    write_rules(&rules, "[[rule]]\ndport = \"80\"\non_port = 50080\n");
    let config = rules.to_str().expect("utf-8 path");
    let agent = Agent::start(&gw.router, &["run", "--iface", "r0", "--config", config]);
    let router = format!("peer={}:", testbed::ROUTER_SERVER_SIDE_V4);
    let client = format!("peer={}:", testbed::CLIENT_V4);

    // A long-lived connection under rule 1, and port 8080 not intercepted yet.
    let mut live = gw
        .client
        .run(|| TcpStream::connect_timeout(&server(80), Duration::from_secs(3)))
        .expect("netns")
        .expect("connect :80");
    live.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    assert!(ask(&mut live, "one").starts_with(&router));
    let direct = exchange_from_client(&gw, server(8080), b"x");
    assert!(direct.starts_with(&client), "{direct}");

    // The new file drops port 80 and intercepts 8080 on another port.
    write_rules(&rules, "[[rule]]\ndport = \"8080\"\non_port = 50081\n");
    hangup(&agent);
    agent
        .wait_for_line(&["reloaded: 1 rule(s) in force"], Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no reload:\n{}", agent.log_text()));
    let proxied = exchange_from_client(&gw, server(8080), b"x");
    assert!(proxied.starts_with(&router), "{proxied}");
    // The live connection's rule is gone; its packets still reach the proxy's socket
    // (return path) and the connection goes on.
    assert!(ask(&mut live, "two").starts_with(&router));
    // New connections to port 80 are no longer intercepted.
    let mut fresh = gw
        .client
        .run(|| TcpStream::connect_timeout(&server(80), Duration::from_secs(3)))
        .expect("netns")
        .expect("connect :80");
    fresh
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    assert!(ask(&mut fresh, "three").starts_with(&client));
    drop(fresh);

    // A bad file is refused and the rules in force stay.
    write_rules(&rules, "[[rule]]\ndport = \"80-\"\non_port = 50080\n");
    hangup(&agent);
    let refused = agent
        .wait_for_line(&["reload refused"], Duration::from_secs(10))
        .unwrap_or_else(|| panic!("bad file not refused:\n{}", agent.log_text()));
    assert!(refused.contains("rule 1: dport"), "{refused}");
    let still = exchange_from_client(&gw, server(8080), b"x");
    assert!(still.starts_with(&router), "{still}");
    assert!(ask(&mut live, "four").starts_with(&router));
    drop(live);

    let log = agent.stop_ok();
    assert!(common::counter(&log, "diverted") >= 2, "{log}");
}

#[test]
fn stats_prints_global_and_per_rule_counters_of_the_running_agent() {
    require_root();
    let gw = Gateway::new("stats").expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::Reply);
    let agent = Agent::start(&gw.router, &[AGENT_ARGS, &["--table", "123"]].concat());
    for _ in 0..3 {
        gw.client
            .run(|| exchange(server(80), b"hello"))
            .expect("netns")
            .expect("exchange");
    }
    let out = gw
        .router
        .command(env!("CARGO_BIN_EXE_proxy"))
        .args(["stats", "--table", "123"])
        .output()
        .expect("proxy stats");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value = |name: &str| -> u64 {
        report
            .lines()
            .find_map(|l| {
                let mut words = l.split_whitespace();
                (words.next() == Some(name)).then(|| words.next().and_then(|v| v.parse().ok()))?
            })
            .unwrap_or_else(|| panic!("no {name} in\n{report}"))
    };
    // Three connections: three SYNs to the listener, the rest to established sockets.
    assert_eq!(value("assigned_listener"), 3, "{report}");
    assert!(value("assigned_established") >= 6, "{report}");
    let rule = report
        .lines()
        .find(|l| l.contains("dport 80 -> on-port 50080"))
        .unwrap_or_else(|| panic!("no rule line in\n{report}"));
    let pkts: u64 = rule
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("pkts");
    assert!(pkts >= 9, "{rule}");

    // Another table in the same namespace has no agent: a clear error.
    let out = gw
        .router
        .command(env!("CARGO_BIN_EXE_proxy"))
        .args(["stats", "--table", "124"])
        .output()
        .expect("proxy stats");
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "proxy: error: no agent with routing table 124 is running in this network namespace"
    );
    let (status, _) = agent.stop();
    assert!(status.success());
}

#[test]
fn laddr_follows_interface_address_changes() {
    require_root();
    let gw = Gateway::new("addrs").expect("topology");
    let agent = Agent::start(&gw.router, AGENT_ARGS);
    assert!(
        agent.log_contains("r0: laddr candidates 192.0.2.1, 2001:db8:1::1"),
        "{}",
        agent.log_text()
    );
    // An address in another subnet is a primary one too, but the first primary stays
    // first; once that one is deleted, the other becomes laddr.
    gw.router
        .ip(&["addr", "add", "203.0.113.1/24", "dev", "r0"])
        .expect("add address");
    let line = agent
        .wait_for_line(&["r0: addresses changed"], Duration::from_secs(5))
        .unwrap_or_else(|| panic!("address change not seen:\n{}", agent.log_text()));
    assert!(line.contains("laddr candidates 192.0.2.1,"), "{line}");
    gw.router
        .ip(&["addr", "del", "192.0.2.1/24", "dev", "r0"])
        .expect("del primary");
    let line = agent
        .wait_for_line(
            &["r0: addresses changed, laddr candidates 203.0.113.1"],
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("address change not followed:\n{}", agent.log_text()));
    assert!(line.contains("2001:db8:1::1"), "{line}");
    let (status, _) = agent.stop();
    assert!(status.success());
}

#[test]
fn ten_thousand_rules_load_and_the_last_one_matches() {
    require_root();
    let gw = Gateway::new("10k").expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::Reply);
    let dir = common::TempDir::new("proxy-10k");
    let rules = dir.join("rules.toml");
    // 9,999 rules for prefixes nobody uses, then the server's: the packet must find the
    // last rule, with the same two lookups as the first.
    let mut text = String::from("[defaults]\non_port = 50080\n");
    text.push_str(&unused_prefix_rules(9_999, |i| (80 + i % 3).to_string()));
    text.push_str("[[rule]]\ndst = [\"198.51.100.0/24\"]\ndport = \"80\"\n");
    write_rules(&rules, &text);
    let started = std::time::Instant::now();
    let agent = Agent::start(
        &gw.router,
        &[
            "run",
            "--iface",
            "r0",
            "--config",
            rules.to_str().expect("utf-8"),
        ],
    );
    eprintln!("10,000 rules: agent ready in {:?}", started.elapsed());
    assert!(
        agent.log_contains("ready: 10000 rule(s)"),
        "{}",
        agent.log_text()
    );
    let reply = exchange_from_client(&gw, server(80), b"x");
    assert!(
        reply.starts_with(&format!("peer={}:", testbed::ROUTER_SERVER_SIDE_V4)),
        "{reply}"
    );
    let (status, log) = agent.stop();
    assert!(status.success());
    assert!(
        log.contains("rule 10000: packets="),
        "per-rule counters missing"
    );
    let last = log
        .lines()
        .find(|l| l.contains("rule 10000: packets="))
        .expect("line");
    assert!(!last.contains("packets=0 "), "{last}");
}

/// Rules for the crash tests: port 80 with the default no-socket behaviour (drop, as the
/// kernel does), port 8080 with `fail_open`.
const CRASH_RULES: &str = "[defaults]\non_port = 50080\n\n\
    [[rule]]\ndport = \"80\"\n\n\
    [[rule]]\ndport = \"8080\"\nfail_open = true\n";

/// The classifiers attached at r0 ingress, as TCX links and as cls_bpf filters (the
/// filters' lines from `tc filter show`).
fn classifiers(gw: &Gateway) -> (usize, Vec<String>) {
    let tcx = gw
        .router
        .run(|| {
            aya::programs::SchedClassifier::query_tcx(
                testbed::ROUTER_CLIENT_IFACE,
                aya::programs::TcAttachType::Ingress,
            )
            .map(|(_, progs)| progs.len())
            .unwrap_or(0)
        })
        .expect("entering the router namespace");
    let filters = tc_stdout(&gw.router, &["filter", "show", "dev", "r0", "ingress"])
        .lines()
        .filter(|l| l.contains(" bpf ") && l.contains("handle"))
        .map(str::to_owned)
        .collect();
    (tcx, filters)
}

/// The sk_lookup programs attached to the router's network namespace (`BPF_PROG_QUERY` on
/// the namespace, as `bpftool net` does).
fn sk_lookup_programs(gw: &Gateway) -> u32 {
    /// The `query` member of `union bpf_attr`.
    #[repr(C)]
    #[derive(Default)]
    struct Query {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
        prog_attach_flags: u64,
        link_ids: u64,
        link_attach_flags: u64,
        revision: u64,
    }
    const BPF_PROG_QUERY: libc::c_long = 16;
    const BPF_SK_LOOKUP: u32 = 36;
    gw.router
        .run(|| {
            use std::os::fd::AsRawFd as _;
            let ns = std::fs::File::open("/proc/thread-self/ns/net").expect("netns");
            let mut query = Query {
                target_fd: ns.as_raw_fd() as u32,
                attach_type: BPF_SK_LOOKUP,
                ..Query::default()
            };
            // SAFETY: `query` is a valid `bpf_attr` prefix of the size passed; with no
            // prog_ids buffer the kernel only writes the count.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_PROG_QUERY,
                    &mut query as *mut Query,
                    std::mem::size_of::<Query>(),
                )
            };
            assert_eq!(rc, 0, "BPF_PROG_QUERY: {}", std::io::Error::last_os_error());
            query.prog_cnt
        })
        .expect("entering the router namespace")
}

fn qdiscs(gw: &Gateway) -> String {
    tc_stdout(&gw.router, &["qdisc", "show", "dev", "r0"])
}

/// A connection from the client to the test server's `port` that is expected to fail: the
/// SYN is dropped (timeout) or refused. Panics if it connects.
fn connect_fails(gw: &Gateway, port: u16) -> std::io::Error {
    gw.client
        .run(move || TcpStream::connect_timeout(&server(port), Duration::from_secs(2)))
        .expect("entering the client namespace")
        .err()
        .unwrap_or_else(|| panic!("a connection to port {port} went through"))
}

/// Asserts that the router has none of the agent's state left: no pin, no classifier, no
/// qdisc, the rules as they were, an empty table 100.
fn assert_nothing_left(gw: &Gateway, mounts: &Mounts, rules_before: &str) {
    assert_eq!(mounts.pins(), Vec::<String>::new(), "pins left");
    assert_eq!(classifiers(gw), (0, Vec::new()), "classifiers left");
    assert_eq!(sk_lookup_programs(gw), 0, "sk_lookup program left");
    assert!(!qdiscs(gw).contains("clsact"), "{}", qdiscs(gw));
    assert_eq!(ip_stdout(&gw.router, &["rule", "show"]), rules_before);
    assert_eq!(
        ip_stdout(&gw.router, &["route", "show", "table", "100"]),
        ""
    );
    assert_eq!(
        ip_stdout(&gw.router, &["-6", "route", "show", "table", "100"]),
        ""
    );
}

/// T12: after `kill -9` the classifier and the routing stay, so the drop rule drops and the
/// fail-open rule passes; a restart takes over with one classifier; SIGTERM leaves nothing.
fn a_crash_keeps_the_rules(attach: &str) {
    require_root();
    let gw = Gateway::new(&format!("crash-{attach}")).expect("topology");
    let mounts = Mounts::new(&gw.router);
    let s80 = Server::start(&gw.server, server(80), ServerMode::Reply);
    let s8080 = Server::start(&gw.server, server(8080), ServerMode::Reply);
    let dir = common::TempDir::new(&format!("proxy-crash-{attach}"));
    let config = dir.join("rules.toml");
    write_rules(&config, CRASH_RULES);
    let args = [
        "run",
        "--iface",
        "r0",
        "--tc-attach",
        attach,
        "--config",
        config.to_str().expect("utf-8 path"),
    ];
    let router = format!("peer={}:", testbed::ROUTER_SERVER_SIDE_V4);
    let client = format!("peer={}:", testbed::CLIENT_V4);
    let rules_before = ip_stdout(&gw.router, &["rule", "show"]);
    let one = |(tcx, filters): (usize, Vec<String>)| match attach {
        "tcx" => tcx == 1 && filters.is_empty(),
        _ => tcx == 0 && filters.len() == 1,
    };

    let agent = Agent::start_in(&mounts, &args);
    assert!(one(classifiers(&gw)), "{:?}", classifiers(&gw));
    assert_eq!(sk_lookup_programs(&gw), 1);
    let reply = exchange_from_client(&gw, server(80), b"before");
    assert!(reply.starts_with(&router), "{reply}");
    let _ = signal::kill(Pid::from_raw(agent.pid() as i32), signal::Signal::SIGKILL);
    let (status, log) = agent.wait_exit(Duration::from_secs(5));
    assert!(!status.success());

    // The agent is gone, its rules are not: a drop rule's new connections fail, none
    // reaches the origin; a fail-open rule's go to the origin untouched.
    assert!(one(classifiers(&gw)), "{:?}\n{log}", classifiers(&gw));
    let rules_left = ip_stdout(&gw.router, &["rule", "show"]);
    assert!(
        rules_left.contains("fwmark 0x1/0x1 lookup 100 proto 211"),
        "{rules_left}"
    );
    let accepted = s80.accepted();
    for _ in 0..3 {
        let e = connect_fails(&gw, 80);
        eprintln!("port 80 with the agent dead: {e}");
    }
    assert_eq!(
        s80.accepted(),
        accepted,
        "a drop rule's connection reached the origin"
    );
    let direct = exchange_from_client(&gw, server(8080), b"open");
    assert!(direct.starts_with(&client), "{direct}");
    assert_eq!(s8080.accepted(), 1);

    // A restart takes over what it finds: still one classifier, one rule, serving again,
    // and at no moment in between does a connection go past to the origin: a prober
    // connects all through the restart.
    let probing = Arc::new(AtomicBool::new(true));
    let prober = {
        let probing = Arc::clone(&probing);
        gw.client.spawn(move || {
            let (mut probes, mut direct) = (0, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(30);
            while probing.load(Ordering::Relaxed) && Instant::now() < deadline {
                probes += 1;
                let Ok(mut stream) =
                    TcpStream::connect_timeout(&server(80), Duration::from_millis(300))
                else {
                    continue;
                };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = stream.write_all(b"probe");
                let _ = stream.shutdown(std::net::Shutdown::Write);
                let mut reply = String::new();
                let _ = stream.read_to_string(&mut reply);
                if reply.starts_with(&format!("peer={}:", testbed::CLIENT_V4)) {
                    direct.push(reply);
                }
            }
            (probes, direct)
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let agent = Agent::start_in(&mounts, &args);
    std::thread::sleep(Duration::from_millis(300));
    probing.store(false, Ordering::Relaxed);
    let (probes, direct) = prober.join().expect("prober").expect("client namespace");
    assert!(probes >= 2, "the prober did not run across the restart");
    assert!(
        direct.is_empty(),
        "{} of {probes} probes reached the origin past the proxy during the restart",
        direct.len()
    );
    assert!(
        one(classifiers(&gw)),
        "{:?}\n{}",
        classifiers(&gw),
        agent.log_text()
    );
    assert!(
        agent.log_contains("a previous run left"),
        "nothing taken over:\n{}",
        agent.log_text()
    );
    assert_eq!(sk_lookup_programs(&gw), 1, "{}", agent.log_text());
    for port in [80, 8080] {
        let reply = exchange_from_client(&gw, server(port), b"again");
        assert!(reply.starts_with(&router), "{port}: {reply}");
    }
    let rules_now = ip_stdout(&gw.router, &["rule", "show"]);
    assert_eq!(
        rules_now.matches("fwmark 0x1/0x1").count(),
        1,
        "a second rule was added:\n{rules_now}"
    );
    assert!(!mounts.pins().is_empty(), "no pins");

    // A clean stop removes everything.
    agent.stop_ok();
    assert_nothing_left(&gw, &mounts, &rules_before);
    let direct = exchange_from_client(&gw, server(80), b"after");
    assert!(direct.starts_with(&client), "{direct}");
}

#[test]
fn a_crash_keeps_the_rules_and_a_restart_takes_over_tcx() {
    if common::kernel::kernel_lacks(common::kernel::Feature::Tcx) {
        return;
    }
    a_crash_keeps_the_rules("tcx");
}

#[test]
fn a_crash_keeps_the_rules_and_a_restart_takes_over_netlink() {
    a_crash_keeps_the_rules("netlink");
}

/// `proxy cleanup` removes what a crashed agent left, and says so; with nothing left it
/// says that and succeeds.
fn cleanup_after_a_crash(attach: &str) {
    require_root();
    let gw = Gateway::new(&format!("cleanup-{attach}")).expect("topology");
    let mounts = Mounts::new(&gw.router);
    let _server = Server::start(&gw.server, server(80), ServerMode::Reply);
    let rules_before = ip_stdout(&gw.router, &["rule", "show"]);
    let agent = Agent::start_in(&mounts, &[AGENT_ARGS, &["--tc-attach", attach]].concat());
    let _ = signal::kill(Pid::from_raw(agent.pid() as i32), signal::Signal::SIGKILL);
    let (status, _) = agent.wait_exit(Duration::from_secs(5));
    assert!(!status.success());
    connect_fails(&gw, 80);

    let report = proxy_cleanup(&mounts, &["--table", "100"]);
    eprintln!("{report}");
    assert!(report.contains("r0"), "{report}");
    assert!(report.contains("fwmark 0x1/0x1"), "{report}");
    assert_nothing_left(&gw, &mounts, &rules_before);
    let direct = exchange_from_client(&gw, server(80), b"x");
    assert!(
        direct.starts_with(&format!("peer={}:", testbed::CLIENT_V4)),
        "{direct}"
    );
    let again = proxy_cleanup(&mounts, &[]);
    assert!(again.contains("nothing to clean up"), "{again}");
}

#[test]
fn cleanup_after_a_crash_removes_what_was_left_tcx() {
    if common::kernel::kernel_lacks(common::kernel::Feature::Tcx) {
        return;
    }
    cleanup_after_a_crash("tcx");
}

#[test]
fn cleanup_after_a_crash_removes_what_was_left_netlink() {
    cleanup_after_a_crash("netlink");
}

/// Every readable sysctl under net.ipv4.conf (all, default, lo, r0, r1) in `ns`, as
/// `conf/DIR/KEY=VALUE` lines: what the agent may touch and what it must leave alone.
fn ipv4_conf(ns: &Netns) -> Vec<String> {
    ns.run(|| {
        let mut lines = Vec::new();
        let conf = Path::new("/proc/sys/net/ipv4/conf");
        for dir in std::fs::read_dir(conf).expect("listing net.ipv4.conf") {
            let dir = dir.expect("a conf entry").path();
            for file in std::fs::read_dir(&dir).expect("listing a conf dir") {
                let path = file.expect("a conf file").path();
                if let Ok(value) = std::fs::read_to_string(&path) {
                    let name = path.strip_prefix(conf).expect("under conf").display();
                    lines.push(format!("conf/{name}={}", value.trim()));
                }
            }
        }
        lines.sort();
        lines
    })
    .expect("entering the router namespace")
}

/// `lines` with `conf/KEY` set to `value`, for the sysctls the test itself writes.
fn with(mut lines: Vec<String>, key: &str, value: &str) -> Vec<String> {
    let prefix = format!("conf/{key}=");
    let line = lines
        .iter_mut()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {key}"));
    *line = format!("{prefix}{value}");
    lines
}

#[test]
fn src_valid_mark_set_before_start_or_while_running_keeps_ipv4_proxied() {
    // net.ipv4.conf sysctls belong to the network namespace: only the router's are written.
    require_root();
    let gw = Gateway::new("svm").expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::Reply);
    let proxied = format!("peer={}:", testbed::ROUTER_SERVER_SIDE_V4);
    let sysctl = |key: &str, value: &str| {
        gw.router
            .sysctl(&format!("net.ipv4.conf.{key}"), value)
            .expect("sysctl in the router namespace");
    };

    // As Tailscale leaves it, before the agent starts.
    sysctl("all.src_valid_mark", "1");
    let before = ipv4_conf(&gw.router);
    let agent = Agent::start(&gw.router, AGENT_ARGS);
    assert!(
        agent.log_contains("src_valid_mark=1 (conf.all): set net.ipv4.conf.r0.accept_local=1 "),
        "{}",
        agent.log_text()
    );
    let reply = exchange_from_client(&gw, server(80), b"set before start");
    assert!(reply.starts_with(&proxied), "{reply}");
    let log = agent.stop_ok();
    assert!(
        log.contains("restored net.ipv4.conf.r0.accept_local=0"),
        "{log}"
    );
    assert_eq!(ipv4_conf(&gw.router), before);

    // Set while the agent runs (Tailscale restarting): fixed within the poll interval.
    sysctl("all.src_valid_mark", "0");
    let before = ipv4_conf(&gw.router);
    let agent = Agent::start(&gw.router, AGENT_ARGS);
    assert!(
        !agent.log_contains("src_valid_mark"),
        "{}",
        agent.log_text()
    );
    sysctl("all.src_valid_mark", "1");
    agent
        .wait_for_line(
            &["src_valid_mark=1 (conf.all): set net.ipv4.conf.r0.accept_local=1 "],
            proxy::src_valid_mark::POLL_INTERVAL + Duration::from_secs(2),
        )
        .unwrap_or_else(|| panic!("not noticed:\n{}", agent.log_text()));
    let reply = exchange_from_client(&gw, server(80), b"set while running");
    assert!(reply.starts_with(&proxied), "{reply}");
    agent.stop_ok();
    assert_eq!(
        ipv4_conf(&gw.router),
        with(before, "all/src_valid_mark", "1")
    );

    // The interface's own setting counts as well (the kernel ORs it with conf.all); with
    // strict rp_filter, accept_local is not enough: r0 goes loose (conf.all stays strict).
    sysctl("all.src_valid_mark", "0");
    sysctl("r0.src_valid_mark", "1");
    sysctl("all.rp_filter", "1");
    let before = ipv4_conf(&gw.router);
    let agent = Agent::start(&gw.router, AGENT_ARGS);
    assert!(
        agent.log_contains(
            "src_valid_mark=1 (conf.r0): set net.ipv4.conf.r0.accept_local=1, \
             net.ipv4.conf.r0.rp_filter=2 "
        ),
        "{}",
        agent.log_text()
    );
    let reply = exchange_from_client(&gw, server(80), b"set on r0");
    assert!(reply.starts_with(&proxied), "{reply}");
    agent.stop_ok();
    assert_eq!(ipv4_conf(&gw.router), before);
}

#[test]
fn sysctls_a_crashed_agent_set_are_put_back_by_the_next_agent_or_by_cleanup() {
    require_root();
    let gw = Gateway::new("svm-crash").expect("topology");
    let mounts = Mounts::new(&gw.router);
    let _server = Server::start(&gw.server, server(80), ServerMode::Reply);
    gw.router
        .sysctl("net.ipv4.conf.all.src_valid_mark", "1")
        .expect("sysctl in the router namespace");
    let before = ipv4_conf(&gw.router);
    let rules_before = ip_stdout(&gw.router, &["rule", "show"]);
    let proxied = format!("peer={}:", testbed::ROUTER_SERVER_SIDE_V4);
    let crash = || {
        let agent = Agent::start_in(&mounts, AGENT_ARGS);
        let reply = exchange_from_client(&gw, server(80), b"x");
        assert!(reply.starts_with(&proxied), "{reply}");
        let _ = signal::kill(Pid::from_raw(agent.pid() as i32), signal::Signal::SIGKILL);
        let (status, _) = agent.wait_exit(Duration::from_secs(5));
        assert!(!status.success());
        // Left as set: the classifier the crash left needs it.
        assert_eq!(
            ipv4_conf(&gw.router),
            with(before.clone(), "r0/accept_local", "1")
        );
    };

    // A restarted agent takes the change over and puts it back on its clean exit.
    crash();
    let agent = Agent::start_in(&mounts, AGENT_ARGS);
    let reply = exchange_from_client(&gw, server(80), b"x");
    assert!(reply.starts_with(&proxied), "{reply}");
    let log = agent.stop_ok();
    assert!(log.contains("did not stop cleanly"), "{log}");
    assert_eq!(
        ipv4_conf(&gw.router),
        before,
        "after the restarted agent:\n{log}"
    );

    // `proxy cleanup` puts it back too.
    crash();
    let report = proxy_cleanup(&mounts, &["--table", "100"]);
    assert!(
        report.contains("net.ipv4.conf.r0.accept_local=0"),
        "{report}"
    );
    assert_eq!(
        ipv4_conf(&gw.router),
        before,
        "after proxy cleanup:\n{report}"
    );
    assert_nothing_left(&gw, &mounts, &rules_before);
}

#[test]
fn cleanup_keeps_a_clsact_qdisc_another_agent_still_uses() {
    require_root();
    let gw = Gateway::new("cleanup-shared").expect("topology");
    // One mount namespace for both agents and the cleanup: the pins (and A's note that it
    // added the qdisc) outlive A there.
    let mounts = Mounts::new(&gw.router);
    let _s80 = Server::start(&gw.server, server(80), ServerMode::Reply);
    let _s81 = Server::start(&gw.server, server(81), ServerMode::Reply);
    // Agent A adds the clsact qdisc; agent B (another table) puts its filter under it.
    let a = Agent::start_in(&mounts, &[AGENT_ARGS, &["--tc-attach", "netlink"]].concat());
    let b = Agent::start_in(
        &mounts,
        &[
            "run",
            "--iface",
            "r0",
            "--dport",
            "81",
            "--on-port",
            "50081",
            "--table",
            "101",
            "--tproxy-mark",
            "0x2/0x2",
            "--tc-attach",
            "netlink",
        ],
    );
    let proxied = format!("peer={}:", testbed::ROUTER_SERVER_SIDE_V4);
    let reply = exchange_from_client(&gw, server(81), b"x");
    assert!(reply.starts_with(&proxied), "{reply}");

    let _ = signal::kill(Pid::from_raw(a.pid() as i32), signal::Signal::SIGKILL);
    let (status, _) = a.wait_exit(Duration::from_secs(5));
    assert!(!status.success());
    let report = proxy_cleanup(&mounts, &["--table", "100"]);
    assert!(report.contains("kept the clsact qdisc of r0"), "{report}");
    // B's classifier is still there: port 81 is still intercepted.
    let reply = exchange_from_client(&gw, server(81), b"x");
    assert!(
        reply.starts_with(&proxied),
        "after cleaning up A, B's traffic went past it: {reply}\n{report}"
    );
    b.stop_ok();
}

/// A stop for good: SIGINT, then the exit (bounded). Returns the log.
fn stop_for_good(agent: Agent) -> String {
    let _ = signal::kill(Pid::from_raw(agent.pid() as i32), signal::Signal::SIGINT);
    let (status, log) = agent.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "agent exit: {status}\n{log}");
    log
}

/// `kill -9`, then the exit. Returns the log.
fn crash(agent: Agent) -> String {
    let _ = signal::kill(Pid::from_raw(agent.pid() as i32), signal::Signal::SIGKILL);
    let (status, log) = agent.wait_exit(Duration::from_secs(5));
    assert!(!status.success(), "{log}");
    log
}

/// Of `n` connections from the client to the test server's `port`, how many connect.
fn connections_made(gw: &Gateway, port: u16, n: usize) -> usize {
    gw.client
        .run(move || {
            (0..n)
                .filter(|_| {
                    TcpStream::connect_timeout(&server(port), Duration::from_millis(500)).is_ok()
                })
                .count()
        })
        .expect("entering the client namespace")
}

/// Under `ip netns exec` the agent mounts bpffs in a mount namespace of its own, which dies
/// with it, pins included: `--tc-attach auto` attaches with cls_bpf there, whose qdisc holds
/// it, so a `kill -9` still leaves the classifier, and nothing goes past the proxy.
#[test]
fn under_ip_netns_exec_auto_attaches_with_cls_bpf_and_a_crash_lets_nothing_past() {
    require_root();
    let gw = Gateway::new("nsexec-crash").expect("topology");
    let s80 = Server::start(&gw.server, server(80), ServerMode::Reply);
    let s8080 = Server::start(&gw.server, server(8080), ServerMode::Reply);
    let dir = common::TempDir::new("proxy-nsexec-crash");
    let config = dir.join("rules.toml");
    write_rules(&config, CRASH_RULES);
    let args = [
        "run",
        "--iface",
        "r0",
        "--config",
        config.to_str().expect("utf-8 path"),
    ];
    let router = format!("peer={}:", testbed::ROUTER_SERVER_SIDE_V4);
    let client = format!("peer={}:", testbed::CLIENT_V4);
    let rules_before = ip_stdout(&gw.router, &["rule", "show"]);

    // Agent::start runs it under `ip netns exec`.
    let agent = Agent::start(&gw.router, &args);
    let reply = exchange_from_client(&gw, server(80), b"before");
    assert!(reply.starts_with(&router), "{reply}");
    let log = crash(agent);

    // No connection of the drop rule reaches the origin; the fail-open rule's do.
    let accepted = s80.accepted();
    let made = connections_made(&gw, 80, 10);
    // The server counts on its own thread: let it see what got through.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        (made, s80.accepted() - accepted),
        (0, 0),
        "connections made, and reaching the origin past the proxy, after kill -9:\n{log}"
    );
    let direct = exchange_from_client(&gw, server(8080), b"open");
    assert!(direct.starts_with(&client), "{direct}");
    assert_eq!(s8080.accepted(), 1);
    // "bpffs here dies with the agent (private mount namespace)", or "may die" where
    // /proc/1 is out of reach and init's mount namespace cannot be told.
    assert!(
        log.lines().any(|l| l.contains("bpffs here")
            && l.contains("die")
            && l.contains(": attaching with cls_bpf, which outlives it")),
        "{log}"
    );
    assert_eq!(classifiers(&gw).0, 0, "a TCX link:\n{log}");
    assert_eq!(classifiers(&gw).1.len(), 1, "{:?}", classifiers(&gw));

    // A restart (a mount namespace and a bpffs of its own again) takes the filter over.
    let agent = Agent::start(&gw.router, &args);
    assert!(
        agent.log_contains("the filter a previous run left replaced"),
        "nothing taken over:\n{}",
        agent.log_text()
    );
    assert_eq!(classifiers(&gw).1.len(), 1, "{:?}", classifiers(&gw));
    for port in [80, 8080] {
        let reply = exchange_from_client(&gw, server(port), b"again");
        assert!(reply.starts_with(&router), "{port}: {reply}");
    }

    // A stop for good removes it all, the clsact qdisc the first agent added included.
    let log = stop_for_good(agent);
    assert_eq!(
        classifiers(&gw),
        (0, Vec::new()),
        "classifiers left:\n{log}"
    );
    assert!(!qdiscs(&gw).contains("clsact"), "{}\n{log}", qdiscs(&gw));
    assert_eq!(ip_stdout(&gw.router, &["rule", "show"]), rules_before);
    let direct = exchange_from_client(&gw, server(80), b"after");
    assert!(direct.starts_with(&client), "{direct}");
}

/// `--tc-attach netlink` under `ip netns exec`: the record that the first agent added the
/// clsact qdisc dies with its bpffs; the agent after its crash still takes the qdisc over
/// and removes it on a stop for good. Where the record survives (a mount namespace that
/// outlives the agents), a qdisc someone else added stays.
#[test]
fn netlink_a_restart_after_a_crash_inherits_the_clsact_qdisc_and_a_stop_for_good_removes_it() {
    require_root();
    let gw = Gateway::new("nl-inherit").expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::Reply);
    let args = [AGENT_ARGS, &["--tc-attach", "netlink"]].concat();
    let router = format!("peer={}:", testbed::ROUTER_SERVER_SIDE_V4);

    assert!(!qdiscs(&gw).contains("clsact"), "{}", qdiscs(&gw));
    let agent = Agent::start(&gw.router, &args);
    assert!(qdiscs(&gw).contains("clsact"), "{}", qdiscs(&gw));
    crash(agent);
    assert!(qdiscs(&gw).contains("clsact"), "{}", qdiscs(&gw));
    let agent = Agent::start(&gw.router, &args);
    let reply = exchange_from_client(&gw, server(80), b"x");
    assert!(reply.starts_with(&router), "{reply}");
    let log = stop_for_good(agent);
    assert!(log.contains("clsact qdisc removed from r0"), "{log}");
    assert!(!qdiscs(&gw).contains("clsact"), "{}\n{log}", qdiscs(&gw));

    // Someone else's qdisc, with the pins (and the record of who added it) kept.
    let mounts = Mounts::new(&gw.router);
    let tc = |args: &[&str]| {
        let out = gw.router.command("tc").args(args).output().expect("tc");
        assert!(out.status.success(), "tc {args:?}: {out:?}");
    };
    tc(&["qdisc", "add", "dev", "r0", "clsact"]);
    let agent = Agent::start_in(&mounts, &args);
    crash(agent);
    let agent = Agent::start_in(&mounts, &args);
    let log = stop_for_good(agent);
    assert!(qdiscs(&gw).contains("clsact"), "{}\n{log}", qdiscs(&gw));
    assert_eq!(
        classifiers(&gw),
        (0, Vec::new()),
        "classifiers left:\n{log}"
    );
    tc(&["qdisc", "del", "dev", "r0", "clsact"]);
}
