//! The whole path on the real kernel: client ns -- router ns (agent) -- server ns, over
//! veth pairs, each test in namespaces of its own that are removed pass or fail.

mod common;

use std::{
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use aya::programs::{SchedClassifier, TcAttachType};
use common::{
    AGENT_ARGS, Agent, Server, ServerMode, counter, exchange, exchange_from_client, ip_stdout,
    require_root, server, tc_stdout,
};
use proxy_testbed::{self as testbed, Gateway};

/// Programs attached at TCX ingress of the router's client-side interface.
fn tcx_programs(gw: &Gateway) -> Vec<String> {
    gw.router
        .run(|| {
            SchedClassifier::query_tcx(testbed::ROUTER_CLIENT_IFACE, TcAttachType::Ingress)
                .map(|(_, progs)| {
                    progs
                        .iter()
                        .map(|p| p.name_as_str().unwrap_or("?").to_owned())
                        .collect()
                })
                .unwrap_or_default()
        })
        .expect("entering the router namespace")
}

fn router_rules(gw: &Gateway) -> String {
    ip_stdout(&gw.router, &["rule", "show"])
}

fn router_table(gw: &Gateway, table: &str) -> String {
    ip_stdout(&gw.router, &["route", "show", "table", table])
}

#[test]
fn intercepted_connection_reaches_server_and_agent_logs_original_destination() {
    require_root();
    let gw = Gateway::new("icpt").expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::Reply);
    let agent = Agent::start(&gw.router, AGENT_ARGS);

    let reply = exchange_from_client(&gw, server(80), b"hello");
    // The server sees the proxy's connection (from the router), with all 5 bytes.
    assert!(
        reply.starts_with(&format!("peer={}:", testbed::ROUTER_SERVER_SIDE_V4)),
        "reply: {reply}"
    );
    assert!(
        reply.ends_with("local=198.51.100.2:80 got=5"),
        "reply: {reply}"
    );
    let line = agent
        .wait_for_line(
            &["192.0.2.2:", "-> 198.51.100.2:80:", "5 bytes up"],
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("no connection line in the agent log:\n{}", agent.log_text()));
    assert!(line.contains("bytes down"), "{line}");

    let log = agent.stop_ok();
    assert!(counter(&log, "assigned_listener") >= 1, "{log}");
    assert!(counter(&log, "assigned_established") >= 1, "{log}");
    assert_eq!(counter(&log, "dropped_no_socket"), 0, "{log}");
}

#[test]
fn non_matching_port_is_untouched() {
    require_root();
    let gw = Gateway::new("nomatch").expect("topology");
    let _server = Server::start(&gw.server, server(8080), ServerMode::Reply);
    let agent = Agent::start(&gw.router, AGENT_ARGS);

    let reply = exchange_from_client(&gw, server(8080), b"hi");
    // Routed, not proxied: the server sees the client itself.
    assert!(
        reply.starts_with(&format!("peer={}:", testbed::CLIENT_V4)),
        "reply: {reply}"
    );

    let log = agent.stop_ok();
    assert!(
        !log.contains("-> 198.51.100.2:8080"),
        "port 8080 was proxied:\n{log}"
    );
    assert_eq!(counter(&log, "matched"), 0, "{log}");
    assert!(counter(&log, "not_matched") >= 3, "{log}");
}

#[test]
fn reconnect_from_same_client_port_while_proxy_side_is_in_time_wait_is_immediate() {
    require_root();
    let gw = Gateway::new("tw").expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::CloseFirst);
    let agent = Agent::start(&gw.router, AGENT_ARGS);
    let client_addr = SocketAddr::from((testbed::CLIENT_V4, 40_080));

    let connect_once = || -> std::io::Result<(Duration, Vec<u8>)> {
        use std::io::Read as _;
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.bind(&client_addr.into())?;
        let started = Instant::now();
        socket.connect_timeout(&server(80).into(), Duration::from_secs(5))?;
        let took = started.elapsed();
        let mut stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut data = Vec::new();
        stream.read_to_end(&mut data)?;
        Ok((took, data))
    };
    let (first, second, time_wait_seen) = gw
        .client
        .run(|| {
            let first = connect_once().expect("first connection");
            // The server closed first, the proxy passed the FIN on and the client closed:
            // the proxy's accepted socket (client port 40080) is now in TIME_WAIT.
            std::thread::sleep(Duration::from_millis(100));
            let tw = gw
                .router
                .command("ss")
                .args(["-Htan", "state", "time-wait", "sport", "= :80"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).contains("192.0.2.2]:40080"))
                .unwrap_or(false);
            let second = connect_once().expect("second connection from the same port");
            (first, second, tw)
        })
        .expect("netns");
    assert_eq!(first.1, b"bye");
    assert_eq!(second.1, b"bye");
    assert!(
        time_wait_seen,
        "the proxy side was not in TIME_WAIT; the test proves nothing"
    );
    // Without the TIME_WAIT handling the SYN is dropped or challenge-ACKed and the client
    // retries after a second or more.
    assert!(
        second.0 < Duration::from_millis(500),
        "reconnect took {:?} (first connect {:?})",
        second.0,
        first.0
    );
    let log = agent.stop_ok();
    // The reconnecting SYN went to the TIME_WAIT socket and from there (sk_lookup) to the
    // listener: the listener was never looked up at TC for it. Without the sk_lookup half,
    // the TIME_WAIT socket answers with an ACK, the client resets it and retransmits its
    // SYN, which then reaches the listener through TC: a second `assigned_listener`.
    assert_eq!(counter(&log, "time_wait_syn"), 1, "{log}");
    assert_eq!(counter(&log, "assigned_listener"), 1, "{log}");
}

#[test]
fn a_stop_for_good_removes_link_rule_and_route_and_traffic_flows_as_before() {
    require_root();
    let gw = Gateway::new("term").expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::Reply);
    let before_rules = router_rules(&gw);

    // A TCX link, as on a host: under `ip netns exec` (whose bpffs dies with the agent)
    // `auto` would attach with cls_bpf. Before 6.6, cls_bpf is what a host gets.
    let attach = if common::kernel::Feature::Tcx.here() {
        "tcx"
    } else {
        "netlink"
    };
    let agent = Agent::start(&gw.router, &[AGENT_ARGS, &["--tc-attach", attach]].concat());
    assert!(
        router_rules(&gw).contains("fwmark 0x1/0x1 lookup 100 proto 211"),
        "{}",
        router_rules(&gw)
    );
    assert!(
        router_table(&gw, "100").contains("local default dev lo"),
        "{}",
        router_table(&gw, "100")
    );
    assert_eq!(tcx_programs(&gw), vec!["tproxy_ingress".to_owned()]);
    let proxied = exchange_from_client(&gw, server(80), b"x");
    assert!(
        proxied.starts_with(&format!("peer={}:", testbed::ROUTER_SERVER_SIDE_V4)),
        "{proxied}"
    );

    let (status, log) = agent.stop();
    assert!(status.success(), "exit {status}:\n{log}");
    assert_eq!(router_rules(&gw), before_rules, "rules left behind");
    assert_eq!(router_table(&gw, "100"), "", "route left behind");
    assert!(tcx_programs(&gw).is_empty(), "classifier still attached");
    let direct = exchange_from_client(&gw, server(80), b"x");
    assert!(
        direct.starts_with(&format!("peer={}:", testbed::CLIENT_V4)),
        "{direct}"
    );
}

#[test]
fn missing_interface_is_one_clear_error_and_leaves_nothing() {
    require_root();
    let gw = Gateway::new("badif").expect("topology");
    let before = router_rules(&gw);
    let agent = Agent::spawn(
        &gw.router,
        &[
            "run",
            "--iface",
            "nope0",
            "--dport",
            "80",
            "--on-port",
            "50080",
        ],
    );
    let (status, log) = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{log}");
    assert_eq!(log.trim(), "proxy: error: interface 'nope0' not found");
    assert_eq!(router_rules(&gw), before);
    assert!(tcx_programs(&gw).is_empty());
}

#[test]
fn port_in_use_is_one_clear_error_and_leaves_nothing() {
    require_root();
    let gw = Gateway::new("inuse").expect("topology");
    let before = router_rules(&gw);
    let holder = gw
        .router
        .run(|| std::net::TcpListener::bind("0.0.0.0:50080"))
        .expect("netns")
        .expect("binding the port first");
    let agent = Agent::spawn(&gw.router, AGENT_ARGS);
    let (status, log) = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("proxy: error:") && log.contains(":50080 is already in use"),
        "{log}"
    );
    assert_eq!(router_rules(&gw), before);
    assert!(tcx_programs(&gw).is_empty());
    let _ = holder.as_raw_fd();
}

#[test]
fn ipv6_connection_is_intercepted_and_proxied_over_ipv6() {
    require_root();
    let gw = Gateway::new("v6").expect("topology");
    let server6 = SocketAddr::from((testbed::SERVER_V6, 80));
    let _server = Server::start(
        &gw.server,
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 80)),
        ServerMode::Reply,
    );
    let agent = Agent::start(&gw.router, AGENT_ARGS);
    let reply = exchange_from_client(&gw, server6, b"hello6");
    assert!(
        reply.starts_with(&format!("peer=[{}]:", testbed::ROUTER_SERVER_SIDE_V6)),
        "{reply}"
    );
    assert!(reply.ends_with("got=6"), "{reply}");
    agent
        .wait_for_line(
            &["[2001:db8:1::2]:", "-> [2001:db8:2::2]:80:", "6 bytes up"],
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("no IPv6 connection line:\n{}", agent.log_text()));
    agent.stop_ok();
}

#[test]
fn clsact_netlink_fallback_works_and_leaves_no_qdisc() {
    require_root();
    let gw = Gateway::new("nl").expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::Reply);
    let qdiscs = || tc_stdout(&gw.router, &["qdisc", "show", "dev", "r0"]);
    let filters = || tc_stdout(&gw.router, &["filter", "show", "dev", "r0", "ingress"]);
    assert!(!qdiscs().contains("clsact"));
    let agent = Agent::start(
        &gw.router,
        &[AGENT_ARGS, &["--tc-attach", "netlink"]].concat(),
    );
    assert!(agent.log_contains(
        "classifier tproxy_ingress attached to r0 ingress (clsact + cls_bpf over netlink)"
    ));
    assert!(qdiscs().contains("clsact"), "{}", qdiscs());
    assert!(filters().contains("tproxy_ingress"), "{}", filters());
    assert!(tcx_programs(&gw).is_empty(), "a TCX link as well");
    let reply = exchange_from_client(&gw, server(80), b"nl");
    assert!(
        reply.starts_with(&format!("peer={}:", testbed::ROUTER_SERVER_SIDE_V4)),
        "{reply}"
    );
    let log = agent.stop_ok();
    assert!(log.contains("clsact qdisc removed from r0"), "{log}");
    assert!(!qdiscs().contains("clsact"), "{}", qdiscs());
    assert_eq!(filters().trim(), "");
}

/// Listening sockets on the router at `port` (`ss -Hltn`).
fn router_listeners(gw: &Gateway, port: u16) -> usize {
    let out = gw
        .router
        .command("ss")
        .args(["-Hltn", &format!("sport = :{port}")])
        .output()
        .expect("ss");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

#[test]
fn every_worker_serves_its_listener_and_a_second_agent_on_the_port_is_refused() {
    require_root();
    if common::kernel::kernel_lacks(common::kernel::Feature::ReuseportAssign) {
        return;
    }
    let gw = Gateway::new("workers").expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::Reply);
    let agent = Agent::start(&gw.router, &[AGENT_ARGS, &["--workers", "3"]].concat());
    assert_eq!(router_listeners(&gw, 50080), 3, "{}", agent.log_text());

    // The kernel spreads connections over the group by the 4-tuple's hash: with 20 client
    // ports, a worker that did not serve its socket would leave some of them hanging.
    for i in 0..20 {
        let reply = gw
            .client
            .run(|| exchange(server(80), b"spread"))
            .expect("netns")
            .unwrap_or_else(|e| panic!("connection {i}: {e}\n{}", agent.log_text()));
        assert!(reply.ends_with("got=6"), "connection {i}: {reply}");
    }

    // A second agent (its own table and mark) must not join the first one's SO_REUSEPORT
    // group on the same port.
    let second = Agent::spawn(
        &gw.router,
        &[
            AGENT_ARGS,
            &[
                "--table",
                "101",
                "--tproxy-mark",
                "0x2/0x2",
                "--workers",
                "2",
            ],
        ]
        .concat(),
    );
    let (status, log) = second.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(log.contains(":50080 is already in use"), "{log}");
    assert_eq!(router_listeners(&gw, 50080), 3);

    let log = agent.stop_ok();
    assert!(counter(&log, "assigned_listener") >= 20, "{log}");
    assert_eq!(counter(&log, "dropped_no_socket"), 0, "{log}");
}

#[test]
fn one_worker_needs_no_reuseport_group() {
    require_root();
    let gw = Gateway::new("oneworker").expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::Reply);
    let agent = Agent::start(&gw.router, &[AGENT_ARGS, &["--workers", "1"]].concat());
    assert_eq!(router_listeners(&gw, 50080), 1, "{}", agent.log_text());
    let reply = exchange_from_client(&gw, server(80), b"one");
    assert!(reply.ends_with("got=3"), "{reply}");
    agent.stop_ok();
}
