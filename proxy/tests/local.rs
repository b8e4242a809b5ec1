//! `proxy run --local`: the connections of the router's own processes, scoped by cgroup.
//!
//! The agent runs in the router namespace with `--local --cgroup <test cgroup>` and
//! `--iface r0`. Client processes (this test binary re-executed in a helper mode, see
//! [`helper_client_process`]) join a cgroup the test creates under the cgroup2 mount,
//! then enter a namespace and connect. The server answers with the peer address it sees:
//! a source port other than the client socket's own means the connection went through the
//! proxy. Each client also reports its socket's mark after connect (`SO_MARK`), which only
//! the connect program sets.

mod common;

use std::{
    ffi::CString,
    io::{Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream, UdpSocket},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use common::{Agent, Mounts, Server, ServerMode, counter, proxy_cleanup, require_root};
use nix::{sys::signal, unistd::Pid};
use proxy_testbed::{
    Gateway, Netns, ROUTER_SERVER_SIDE_V4, ROUTER_SERVER_SIDE_V6, SERVER_V4, SERVER_V6,
};

/// The environment variable that makes this binary a client process.
const CLIENT_ENV: &str = "PROXY_LOCAL_TEST_CLIENT";
/// The prefix of the client's result lines.
const CLIENT_LINE: &str = "CLIENT ";

/// Not a test: the client process the tests start (`PROXY_LOCAL_TEST_CLIENT="OP ADDR N"`),
/// already in its cgroup and namespace. Without the variable it does nothing. OP is `tcp`
/// (N request/response exchanges), `udp` (N connected sockets, one datagram each) or
/// `unconnected` (one `sendto`). One line per exchange:
/// `CLIENT local=ADDR mark=N reply=TEXT`, or `CLIENT error=ERRNO`. Ignored, so that it
/// never counts as a test that passed: the tests run it with `--include-ignored`.
#[test]
#[ignore = "the client process of the other tests, run by them"]
fn helper_client_process() {
    let Ok(spec) = std::env::var(CLIENT_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split_whitespace().collect();
    let (op, addr, n): (&str, SocketAddr, usize) = (
        parts[0],
        parts[1].parse().expect("client address"),
        parts.get(2).map_or(1, |n| n.parse().expect("count")),
    );
    for _ in 0..n {
        let line = match op {
            "tcp" => tcp_client(addr),
            "udp" => udp_client(addr),
            "unconnected" => unconnected_client(addr),
            other => panic!("unknown client op {other}"),
        };
        println!("{CLIENT_LINE}{line}");
    }
}

/// `proxy run --local --cgroup CGROUP`, also on the router's client side, intercepting port
/// 80 (`protocols`: `tcp` or `tcp,udp`) for the built-in listener on port 50080.
fn local_agent_args<'a>(cgroup: &'a str, protocols: &'a str) -> [&'a str; 12] {
    [
        "run",
        "--local",
        "--cgroup",
        cgroup,
        "--iface",
        "r0",
        "--dport",
        "80",
        "--on-port",
        "50080",
        "--protocol",
        protocols,
    ]
}

fn mark_of(fd: &impl std::os::fd::AsFd) -> u32 {
    socket2::SockRef::from(fd).mark().unwrap_or(u32::MAX)
}

fn tcp_client(addr: SocketAddr) -> String {
    let result = (|| -> std::io::Result<String> {
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        let local = stream.local_addr()?;
        let mark = mark_of(&stream);
        stream.write_all(b"x")?;
        stream.shutdown(Shutdown::Write)?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply)?;
        Ok(format!("local={local} mark={mark} reply={reply}"))
    })();
    result.unwrap_or_else(|e| format!("error={}", e.raw_os_error().unwrap_or(-1)))
}

fn udp_client(addr: SocketAddr) -> String {
    let result = (|| -> std::io::Result<String> {
        let bind: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0".parse().expect("v4")
        } else {
            "[::]:0".parse().expect("v6")
        };
        let socket = UdpSocket::bind(bind)?;
        socket.connect(addr)?;
        socket.set_read_timeout(Some(Duration::from_secs(3)))?;
        let local = socket.local_addr()?;
        let mark = mark_of(&socket);
        socket.send(b"x")?;
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf)?;
        let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
        Ok(format!("local={local} mark={mark} reply={reply}"))
    })();
    result.unwrap_or_else(|e| format!("error={}", e.raw_os_error().unwrap_or(-1)))
}

fn unconnected_client(addr: SocketAddr) -> String {
    let bind = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let result = UdpSocket::bind(bind).and_then(|s| s.send_to(b"x", addr));
    match result {
        Ok(_) => "sent".to_owned(),
        Err(e) => format!("error={}", e.raw_os_error().unwrap_or(-1)),
    }
}

/// One client's result.
#[derive(Debug)]
struct Exchange {
    local: SocketAddr,
    mark: u32,
    /// The address the server saw (its `peer=` answer).
    peer: SocketAddr,
}

impl Exchange {
    fn parse(line: &str) -> Exchange {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in client line {line}"))
        };
        Exchange {
            local: field("local=").parse().expect("local address"),
            mark: field("mark=").parse().expect("mark"),
            // Inside the server's answer: `reply=peer=ADDR ...`.
            peer: line
                .split("peer=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .unwrap_or_else(|| panic!("no peer= in client line {line}"))
                .parse()
                .expect("peer address"),
        }
    }

    /// Through the proxy: the server's peer is another socket than the client's.
    fn proxied(&self) -> bool {
        self.peer.port() != self.local.port()
    }
}

/// A cgroup made for one test under the cgroup2 mount, removed on drop (once its
/// processes, which exit on their own, are gone).
struct TestCgroup {
    dir: PathBuf,
}

static NEXT_CGROUP: AtomicU32 = AtomicU32::new(0);

impl TestCgroup {
    fn create(tag: &str) -> TestCgroup {
        let mount = proxy::cgroup::mount().expect("a cgroup2 mount");
        let dir = mount.join(format!(
            "proxy-test-{tag}-{}-{}",
            std::process::id(),
            NEXT_CGROUP.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        TestCgroup { dir }
    }

    /// The path relative to the mount, as `--cgroup` takes it.
    fn name(&self) -> String {
        self.dir
            .file_name()
            .expect("name")
            .to_string_lossy()
            .into_owned()
    }

    /// Runs this binary as a client (`spec`, see [`helper_client_process`]) in this cgroup
    /// and `ns`; returns its result lines.
    fn client(&self, ns: &Netns, spec: &str) -> Vec<String> {
        let procs =
            CString::new(self.dir.join("cgroup.procs").to_string_lossy().as_bytes()).expect("path");
        let exe = std::env::current_exe().expect("test binary");
        let mut cmd = ns.command(exe);
        cmd.args([
            "--exact",
            "helper_client_process",
            "--include-ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CLIENT_ENV, spec)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
        join_cgroup_before_exec(&mut cmd, procs);
        run_client(cmd)
    }
}

/// Moves the child into the cgroup whose `cgroup.procs` is `procs` before it executes:
/// writing "0" moves the writer itself. Only async-signal-safe calls after fork.
fn join_cgroup_before_exec(cmd: &mut Command, procs: CString) {
    // SAFETY: open, write and close are async-signal-safe; nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Runs a client command (bounded: each exchange has its own timeouts) and returns its
/// result lines.
fn run_client(mut cmd: Command) -> Vec<String> {
    let out = cmd.output().expect("running the client process");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "client failed: {}\n{stdout}",
        out.status
    );
    stdout
        .lines()
        // libtest may print "test helper_client_process ... " on the same line first.
        .filter_map(|l| l.split_once(CLIENT_LINE).map(|(_, result)| result))
        .map(str::to_owned)
        .collect()
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::remove_dir(&self.dir).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A UDP server on both families' server addresses at `port`, answering each datagram
/// with `peer=ADDR` from the address it was sent to; stops when dropped.
struct UdpServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Result<(), proxy_testbed::TestbedError>>>,
}

impl UdpServer {
    fn start(ns: &Netns, port: u16) -> UdpServer {
        UdpServer::start_on(ns, &[IpAddr::V4(SERVER_V4), IpAddr::V6(SERVER_V6)], port)
    }

    /// The same on each of `ips`.
    fn start_on(ns: &Netns, ips: &[IpAddr], port: u16) -> UdpServer {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for &ip in ips {
            let flag = Arc::clone(&stop);
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            threads.push(ns.spawn(move || {
                let socket = UdpSocket::bind((ip, port)).expect("binding the UDP server");
                socket
                    .set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("timeout");
                ready_tx.send(()).expect("ready");
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut buf = [0u8; 512];
                while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                        let _ = socket.send_to(format!("peer={peer}").as_bytes(), peer);
                    }
                }
            }));
            ready_rx
                .recv_timeout(Duration::from_secs(5))
                .expect("UDP server did not start");
        }
        UdpServer { stop, threads }
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn exchanges(lines: &[String], what: &str) -> Vec<Exchange> {
    lines
        .iter()
        .map(|l| {
            assert!(!l.starts_with("error="), "{what}: {l}");
            Exchange::parse(l)
        })
        .collect()
}

/// How many of each of the four cgroup programs are attached at `dir` (`bpftool cgroup
/// show`: one line per program, with its name).
fn local_programs_at(dir: &std::path::Path) -> [usize; 4] {
    let text = bpftool_cgroup_show(dir);
    proxy_common::LOCAL_PROGRAMS.map(|name| text.lines().filter(|l| l.contains(name)).count())
}

fn kill9(agent: Agent) -> String {
    let _ = signal::kill(Pid::from_raw(agent.pid() as i32), signal::Signal::SIGKILL);
    let (status, log) = agent.wait_exit(Duration::from_secs(5));
    assert!(!status.success(), "{log}");
    log
}

fn bpftool_cgroup_show(dir: &std::path::Path) -> String {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(dir)
        .output()
        .expect("bpftool");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn local_connections_in_the_cgroup_are_proxied_and_nothing_else_is() {
    require_root();
    let gw = Gateway::new("local").expect("topology");
    let app = TestCgroup::create("local-app");
    let sibling = TestCgroup::create("local-sibling");
    let _tcp4 = Server::start(
        &gw.server,
        SocketAddr::from((SERVER_V4, 80)),
        ServerMode::Reply,
    );
    let _tcp6 = Server::start(
        &gw.server,
        SocketAddr::from((SERVER_V6, 80)),
        ServerMode::Reply,
    );
    let _tcp4_other = Server::start(
        &gw.server,
        SocketAddr::from((SERVER_V4, 81)),
        ServerMode::Reply,
    );
    let _udp = UdpServer::start(&gw.server, 80);
    let agent = Agent::start(&gw.router, &local_agent_args(&app.name(), "tcp,udp"));
    // The agent itself joins the cgroup: the programs then run for its own upstream
    // sockets too, which carry the outbound mark before connect and must be left alone.
    std::fs::write(app.dir.join("cgroup.procs"), agent.pid().to_string())
        .expect("moving the agent into the cgroup");
    let rules = common::ip_stdout(&gw.router, &["rule"]);
    assert!(
        rules.contains("from 0.0.0.0 fwmark 0x1/0x1 lookup main"),
        "no IPv4 source rule:\n{rules}"
    );
    assert!(
        !common::ip_stdout(&gw.router, &["-6", "rule"]).contains("from ::"),
        "IPv6 must not get a source rule"
    );
    assert!(bpftool_cgroup_show(&app.dir).contains("local_connect4"));

    // In the cgroup and the agent's namespace: proxied, TCP over both families and
    // connected UDP, the socket marked with the rule's mark.
    let v4 = SocketAddr::from((SERVER_V4, 80));
    let v6 = SocketAddr::from((SERVER_V6, 80));
    for (addr, op, n) in [(v4, "tcp", 10), (v6, "tcp", 10), (v4, "udp", 5)] {
        let got = exchanges(&app.client(&gw.router, &format!("{op} {addr} {n}")), op);
        assert_eq!(got.len(), n, "{op} {addr}: {got:?}");
        for e in &got {
            assert!(
                e.proxied(),
                "{op} {addr} not proxied: {e:?}\n{}",
                agent.log_text()
            );
            assert_eq!(e.mark, 1, "{op} {addr}: {e:?}");
            // The source is the one the host picks without the proxy (the IPv4 source
            // rule: the main table's), and the server sees the router's address.
            let router = if addr.is_ipv4() {
                IpAddr::V4(ROUTER_SERVER_SIDE_V4)
            } else {
                IpAddr::V6(ROUTER_SERVER_SIDE_V6)
            };
            assert_eq!(e.peer.ip(), router, "{op} {addr}: {e:?}");
            if addr.is_ipv4() {
                assert_eq!(e.local.ip(), router, "{op} {addr}: {e:?}");
            }
        }
    }

    // A sibling cgroup, and a port no rule covers: direct, unmarked.
    let sibling_got = exchanges(
        &sibling.client(&gw.router, &format!("tcp {v4} 1")),
        "sibling",
    );
    let other_port = SocketAddr::from((SERVER_V4, 81));
    let other_got = exchanges(
        &app.client(&gw.router, &format!("tcp {other_port} 1")),
        "port 81",
    );
    for e in sibling_got.iter().chain(&other_got) {
        assert!(!e.proxied() && e.mark == 0, "went through the proxy: {e:?}");
    }

    // The same cgroup in another namespace (the client's): the programs run for it, and
    // leave it alone (its connection is then forwarded through the router, as always).
    let elsewhere = exchanges(&app.client(&gw.client, &format!("tcp {v4} 1")), "client ns");
    assert_eq!(elsewhere[0].mark, 0, "{elsewhere:?}");

    // Forwarded clients are still proxied: the server sees the router, not 192.0.2.2.
    let reply = common::exchange_from_client(&gw, v4, b"x");
    assert!(
        reply.contains(&format!("peer={ROUTER_SERVER_SIDE_V4}:")),
        "forwarded client not proxied: {reply}"
    );

    // An unconnected datagram to a destination the (fail-closed) rule covers cannot be
    // routed to the proxy: refused, EPERM, never sent around it.
    let unconnected = app.client(&gw.router, &format!("unconnected {v4}"));
    assert_eq!(unconnected, [format!("error={}", libc::EPERM)]);

    let log = agent.stop_ok();
    // Exactly the clients' own connections were marked: never the proxy's upstream ones,
    // the sibling's, the other port's or the other namespace's.
    assert_eq!(counter(&log, "local_marked"), 25, "{log}");
    assert_eq!(counter(&log, "local_unconnected_refused"), 1, "{log}");
    assert!(
        !bpftool_cgroup_show(&app.dir).contains("local_"),
        "a cgroup program stays attached after SIGTERM"
    );
    let rules = common::ip_stdout(&gw.router, &["rule"]);
    assert!(
        !rules.contains("proto 211"),
        "rules stay after SIGTERM:\n{rules}"
    );
}

/// A local connection to one of the host's own addresses never leaves the host: the
/// connect program leaves it alone, whatever the rules say (the proxy would refuse it as a
/// local destination and reset it). Addresses added while the agent runs are followed.
#[test]
fn connections_to_the_hosts_own_addresses_go_direct() {
    require_root();
    let gw = Gateway::new("own").expect("topology");
    let app = TestCgroup::create("own-app");
    // Servers on the router's own (non-loopback) addresses, at the rule's port.
    let own_v4 = SocketAddr::from((ROUTER_SERVER_SIDE_V4, 80));
    let own_v6 = SocketAddr::from((ROUTER_SERVER_SIDE_V6, 80));
    let _tcp4 = Server::start(&gw.router, own_v4, ServerMode::Reply);
    let _tcp6 = Server::start(&gw.router, own_v6, ServerMode::Reply);
    let _udp = UdpServer::start_on(&gw.router, &[own_v4.ip()], 80);
    // And the origin, still proxied.
    let _origin = Server::start(
        &gw.server,
        SocketAddr::from((SERVER_V4, 80)),
        ServerMode::Reply,
    );
    let agent = Agent::start(&gw.router, &local_agent_args(&app.name(), "tcp,udp"));

    let direct = |addr: SocketAddr, op: &str, what: &str| {
        let got = exchanges(&app.client(&gw.router, &format!("{op} {addr} 2")), what);
        assert_eq!(got.len(), 2, "{what}: {got:?}");
        for e in &got {
            assert!(
                !e.proxied() && e.mark == 0,
                "{what} went through the proxy: {e:?}\n{}",
                agent.log_text()
            );
            // The server sees the client socket itself (an IPv4-mapped one as IPv4).
            assert_eq!(
                (e.peer.ip().to_canonical(), e.peer.port()),
                (e.local.ip().to_canonical(), e.local.port()),
                "{what}: {e:?}"
            );
        }
    };
    direct(own_v4, "tcp", "tcp to the router's own IPv4 address");
    direct(own_v6, "tcp", "tcp to the router's own IPv6 address");
    direct(own_v4, "udp", "udp to the router's own IPv4 address");
    // IPv4-mapped over an IPv6 socket is the same address.
    let mapped = SocketAddr::from((ROUTER_SERVER_SIDE_V4.to_ipv6_mapped(), 80));
    direct(
        mapped,
        "tcp",
        "tcp to the router's own address, IPv4-mapped",
    );
    // An unconnected datagram to it is not refused (as one to the origin is, fail-closed).
    let unconnected = app.client(&gw.router, &format!("unconnected {own_v4}"));
    assert_eq!(unconnected, ["sent"]);

    // An address added while the agent runs: followed (the agent's address events).
    let added = std::net::Ipv4Addr::new(203, 0, 113, 9);
    common::ip_stdout(&gw.router, &["addr", "add", "203.0.113.9/32", "dev", "r1"]);
    let added_addr = SocketAddr::from((added, 80));
    let _tcp_added = Server::start(&gw.router, added_addr, ServerMode::Reply);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut intercepted_before_the_event = 0;
    loop {
        let line = app.client(&gw.router, &format!("tcp {added_addr} 1"));
        let ok = line.len() == 1 && !line[0].starts_with("error=") && {
            let e = Exchange::parse(&line[0]);
            !e.proxied() && e.mark == 0
        };
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "an address added while the agent runs is intercepted: {line:?}\n{}",
            agent.log_text()
        );
        intercepted_before_the_event += 1;
        std::thread::sleep(Duration::from_millis(100));
    }

    // Elsewhere, the rule still applies.
    let proxied = exchanges(
        &app.client(
            &gw.router,
            &format!("tcp {} 1", SocketAddr::from((SERVER_V4, 80))),
        ),
        "origin",
    );
    assert!(proxied[0].proxied(), "{proxied:?}");

    let log = agent.stop_ok();
    // 2 x (tcp4, tcp6, udp4, mapped), the unconnected datagram, the added address.
    assert_eq!(counter(&log, "local_own_address"), 10, "{log}");
    assert_eq!(
        counter(&log, "local_marked"),
        1 + intercepted_before_the_event,
        "{log}"
    );
}

/// T12 with `--local`: after `kill -9` the pinned cgroup links, the classifier on `lo` and
/// the routing stay, so a fail-closed rule's local connection is marked and dropped on `lo`
/// and never reaches the origin; a restart takes the links over (one program of each kind
/// at the cgroup, not two) and proxies again; `proxy cleanup` after a second crash leaves
/// nothing: no program at the cgroup, no pin, no rule, no route.
#[test]
fn a_crash_with_local_keeps_it_fail_closed_a_restart_takes_over_and_cleanup_removes_it() {
    require_root();
    let gw = Gateway::new("lcrash").expect("topology");
    let mounts = Mounts::new(&gw.router);
    let app = TestCgroup::create("crash-app");
    let s80 = Server::start(
        &gw.server,
        SocketAddr::from((SERVER_V4, 80)),
        ServerMode::Reply,
    );
    let name = app.name();
    let args = local_agent_args(&name, "tcp");
    let v4 = SocketAddr::from((SERVER_V4, 80));
    let rules_before = common::ip_stdout(&gw.router, &["rule", "show"]);
    let proxied = |what: &str, agent: &Agent| {
        let got = exchanges(&app.client(&gw.router, &format!("tcp {v4} 1")), what);
        assert!(got[0].proxied(), "{what}: {got:?}\n{}", agent.log_text());
    };

    let agent = Agent::start_in(&mounts, &args);
    assert_eq!(
        local_programs_at(&app.dir),
        [1; 4],
        "{}",
        bpftool_cgroup_show(&app.dir)
    );
    proxied("before the crash", &agent);
    let log = kill9(agent);

    // No agent: the connection is marked, routed to `lo` and dropped there; the origin sees
    // nothing.
    assert_eq!(local_programs_at(&app.dir), [1; 4], "{log}");
    let accepted = s80.accepted();
    let got = app.client(&gw.router, &format!("tcp {v4} 2"));
    assert!(
        got.iter().all(|l| l.starts_with("error=")),
        "a local connection went somewhere with the agent dead: {got:?}"
    );
    assert_eq!(
        s80.accepted(),
        accepted,
        "a local connection reached the origin"
    );

    // A restart takes over: one program of each kind, proxied again.
    let agent = Agent::start_in(&mounts, &args);
    assert_eq!(
        local_programs_at(&app.dir),
        [1; 4],
        "{}\n{}",
        bpftool_cgroup_show(&app.dir),
        agent.log_text()
    );
    proxied("after the restart", &agent);
    assert!(
        agent.log_contains("4 link(s) a previous run left replaced"),
        "{}",
        agent.log_text()
    );
    let rules = common::ip_stdout(&gw.router, &["rule", "show"]);
    assert_eq!(
        rules.matches("fwmark 0x1/0x1 lookup 100").count(),
        1,
        "{rules}"
    );
    assert_eq!(rules.matches("from 0.0.0.0 fwmark").count(), 1, "{rules}");

    // Crash again; `proxy cleanup` removes the cgroup links with the rest.
    kill9(agent);
    assert_eq!(local_programs_at(&app.dir), [1; 4]);
    let report = proxy_cleanup(&mounts, &["--table", "100"]);
    assert!(report.contains("cgroup-local_connect4"), "{report}");
    assert_eq!(
        local_programs_at(&app.dir),
        [0; 4],
        "{}\n{report}",
        bpftool_cgroup_show(&app.dir)
    );
    assert_eq!(mounts.pins(), Vec::<String>::new(), "pins left:\n{report}");
    assert_eq!(
        common::ip_stdout(&gw.router, &["rule", "show"]),
        rules_before,
        "{report}"
    );
    for family in ["-4", "-6"] {
        assert_eq!(
            common::ip_stdout(&gw.router, &[family, "route", "show", "table", "100"]),
            "",
            "{report}"
        );
    }
    // And the connection goes direct, unmarked.
    let got = exchanges(
        &app.client(&gw.router, &format!("tcp {v4} 1")),
        "after cleanup",
    );
    assert!(!got[0].proxied() && got[0].mark == 0, "{got:?}");
}

/// A rules file for the two rules: port 80 for processes of `first`, port 81 for those of
/// `second`.
fn per_cgroup_rules(first: &TestCgroup, second: &TestCgroup) -> String {
    format!(
        "[[rule]]\ndport = \"80\"\non_port = 50080\ncgroup = [\"{}\"]\n\n\
         [[rule]]\ndport = \"81\"\non_port = 50081\ncgroup = [\"{}\"]\n",
        first.name(),
        second.name()
    )
}

/// Rules from a file, each scoped to its own cgroup: a process of A is intercepted on the
/// first rule's port and not on the second's, a process of B the other way round; a SIGHUP
/// reload that swaps the scopes applies to the next connections.
#[test]
fn per_rule_cgroups_from_a_rules_file_and_a_reload_that_swaps_them() {
    require_root();
    let gw = Gateway::new("lrules").expect("topology");
    let a = TestCgroup::create("rules-a");
    let b = TestCgroup::create("rules-b");
    let port80 = SocketAddr::from((SERVER_V4, 80));
    let port81 = SocketAddr::from((SERVER_V4, 81));
    let _s80 = Server::start(&gw.server, port80, ServerMode::Reply);
    let _s81 = Server::start(&gw.server, port81, ServerMode::Reply);
    let dir = common::TempDir::new("proxy-local-rules");
    let file = dir.join("rules.toml");
    std::fs::write(&file, per_cgroup_rules(&a, &b)).expect("writing the rules file");
    let (a_name, b_name) = (a.name(), b.name());
    let agent = Agent::start(
        &gw.router,
        &[
            "run",
            "--local",
            "--cgroup",
            &a_name,
            "--cgroup",
            &b_name,
            "--iface",
            "r0",
            "--config",
            file.to_str().expect("utf-8 path"),
        ],
    );
    let check = |cgroup: &TestCgroup, addr: SocketAddr, want_proxied: bool, when: &str| {
        let what = format!("{} to {addr} {when}", cgroup.name());
        let got = exchanges(&cgroup.client(&gw.router, &format!("tcp {addr} 1")), &what);
        assert_eq!(
            got[0].proxied(),
            want_proxied,
            "{what}: {got:?}\n{}",
            agent.log_text()
        );
        assert_eq!(got[0].mark, u32::from(want_proxied), "{what}: {got:?}");
    };
    check(&a, port80, true, "(rule 1 is A's)");
    check(&a, port81, false, "(rule 2 is B's)");
    check(&b, port80, false, "(rule 1 is A's)");
    check(&b, port81, true, "(rule 2 is B's)");

    std::fs::write(&file, per_cgroup_rules(&b, &a)).expect("writing the rules file");
    let _ = signal::kill(Pid::from_raw(agent.pid() as i32), signal::Signal::SIGHUP);
    agent
        .wait_for_line(&["reloaded: 2 rule(s) in force"], Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no reload:\n{}", agent.log_text()));
    check(&a, port80, false, "after the swap");
    check(&a, port81, true, "after the swap");
    check(&b, port80, true, "after the swap");
    check(&b, port81, false, "after the swap");

    let log = agent.stop_ok();
    assert_eq!(counter(&log, "local_marked"), 4, "{log}");
    assert_eq!(counter(&log, "local_out_of_scope"), 4, "{log}");
}

/// A rule scoped to a cgroup outside the `--cgroup` paths would never apply (the programs do
/// not run there) and its traffic would pass unseen: refused at start, and a reload that
/// brings one in is refused with the rules in force kept.
#[test]
fn a_rule_cgroup_outside_the_cgroup_paths_is_refused() {
    require_root();
    let gw = Gateway::new("lscope").expect("topology");
    let inside = TestCgroup::create("scope-in");
    let outside = TestCgroup::create("scope-out");
    let dir = common::TempDir::new("proxy-local-scope");
    let file = dir.join("rules.toml");
    let rules_for = |cgroup: &TestCgroup| {
        format!(
            "[[rule]]\ndport = \"80\"\non_port = 50080\ncgroup = [\"{}\"]\n",
            cgroup.name()
        )
    };
    let inside_name = inside.name();
    let args = [
        "run",
        "--local",
        "--cgroup",
        &inside_name,
        "--config",
        file.to_str().expect("utf-8 path"),
    ];

    std::fs::write(&file, rules_for(&outside)).expect("writing the rules file");
    let (status, log) = Agent::spawn(&gw.router, &args).wait_exit(Duration::from_secs(20));
    assert!(
        !status.success(),
        "started with a rule it cannot apply:\n{log}"
    );
    assert!(
        log.contains(&format!(
            "rule 1: cgroup {} lies outside the --cgroup paths",
            outside.name()
        )),
        "{log}"
    );

    std::fs::write(&file, rules_for(&inside)).expect("writing the rules file");
    let agent = Agent::start(&gw.router, &args);
    std::fs::write(&file, rules_for(&outside)).expect("writing the rules file");
    let _ = signal::kill(Pid::from_raw(agent.pid() as i32), signal::Signal::SIGHUP);
    agent
        .wait_for_line(&["reload refused"], Duration::from_secs(10))
        .unwrap_or_else(|| panic!("the reload was not refused:\n{}", agent.log_text()));
    let port80 = SocketAddr::from((SERVER_V4, 80));
    let _s80 = Server::start(&gw.server, port80, ServerMode::Reply);
    let got = exchanges(
        &inside.client(&gw.router, &format!("tcp {port80} 1")),
        "in force",
    );
    assert!(got[0].proxied(), "the rules in force went: {got:?}");
    agent.stop_ok();
}
