//! What the proxy does with the traffic it is handed: upstream modes (direct, spoofed
//! source, SOCKS5), UDP sessions, bulk data across a half-close, resets, loop safety and the
//! drain on SIGINT. Real kernel, namespaces of their own, removed on drop.

mod common;

use std::{
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    process::{Child, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use common::{
    AGENT_ARGS, Agent, Dante, Server, ServerMode, UDP_AGENT_ARGS, ask, ask_line, connect_kept,
    exchange, exchange_from_client, open_fds, require_root, server,
};
use proxy_testbed::{self as testbed, Gateway, Netns};

/// Runs `f` on a thread inside `ns` and hands back its join handle.
fn spawn_in<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let handle = ns.spawn(f);
    std::thread::spawn(move || {
        handle
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
            .expect("entering the namespace")
    })
}

#[test]
fn spoof_source_makes_the_server_see_the_client() {
    require_root();
    let gw = Gateway::new("spoof").expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::Reply);
    // The replies go to the client's address: the classifier on r1 hands them back to the
    // proxy's upstream socket (the return path).
    let agent = Agent::start(
        &gw.router,
        &[
            "run",
            "--iface",
            "r0",
            "--iface",
            "r1",
            "--dport",
            "80",
            "--on-port",
            "50080",
            "--spoof-source",
        ],
    );
    let reply = exchange_from_client(&gw, server(80), b"hello");
    assert!(
        reply.starts_with(&format!("peer={}:", testbed::CLIENT_V4)),
        "{reply}"
    );
    assert!(reply.ends_with("got=5"), "{reply}");
    agent
        .wait_for_line(
            &["192.0.2.2:", "-> 198.51.100.2:80:", "5 bytes up"],
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("not proxied:\n{}", agent.log_text()));
    let log = agent.stop_ok();
    assert!(
        common::counter(&log, "diverted") >= 2,
        "replies did not take the return path:\n{log}"
    );
}

#[test]
fn udp_replies_come_from_the_original_destination() {
    require_root();
    let gw = Gateway::new("udp").expect("topology");
    let echo = spawn_in(&gw.server, || {
        let socket = UdpSocket::bind("0.0.0.0:53").expect("bind :53");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 2048];
        for _ in 0..3 {
            let Ok((n, peer)) = socket.recv_from(&mut buf) else {
                return;
            };
            let reply = format!("from={peer} got={}", String::from_utf8_lossy(&buf[..n]));
            let _ = socket.send_to(reply.as_bytes(), peer);
        }
    });
    let agent = Agent::start(
        &gw.router,
        &[UDP_AGENT_ARGS, &["--udp-idle-timeout", "2"]].concat(),
    );
    let replies = gw
        .client
        .run(|| -> std::io::Result<Vec<String>> {
            // Connected: the kernel accepts only datagrams whose source is 198.51.100.2:53.
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(server(53))?;
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut out = Vec::new();
            for q in ["one", "two", "three"] {
                socket.send(q.as_bytes())?;
                let mut buf = [0u8; 2048];
                let n = socket.recv(&mut buf)?;
                out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
            Ok(out)
        })
        .expect("netns")
        .expect("udp exchange");
    let router = format!("from={}:", testbed::ROUTER_SERVER_SIDE_V4);
    assert_eq!(replies.len(), 3);
    for (reply, q) in replies.iter().zip(["one", "two", "three"]) {
        assert!(
            reply.starts_with(&router) && reply.ends_with(&format!("got={q}")),
            "{reply}"
        );
    }
    // One session for the three datagrams; it ends after the idle timeout and says so.
    let line = agent
        .wait_for_line(
            &[
                "udp 192.0.2.2:",
                "-> 198.51.100.2:53: 3 datagrams up, 3 down",
            ],
            Duration::from_secs(6),
        )
        .unwrap_or_else(|| panic!("no session line:\n{}", agent.log_text()));
    assert!(line.contains("udp"), "{line}");
    let _ = echo.join();
    let log = agent.stop_ok();
    // The first datagram went to the listener, the next two to the session's own socket.
    assert_eq!(common::counter(&log, "assigned_listener"), 1, "{log}");
    assert_eq!(common::counter(&log, "assigned_established"), 2, "{log}");
}

/// microsocks from Debian's packages, in the router namespace, with a password.
fn start_microsocks(ns: &Netns) -> (Child, mpsc::Receiver<String>) {
    let mut child = ns
        .command("microsocks")
        .args([
            "-i",
            "127.0.0.1",
            "-p",
            "1080",
            "-u",
            "alice",
            "-P",
            "s3cret",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("microsocks (apt-get install microsocks; cargo xtask test installs it)");
    let (tx, rx) = mpsc::channel();
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
    }
    // Wait (bounded) until it accepts connections.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if ns
            .run(|| TcpStream::connect("127.0.0.1:1080").is_ok())
            .unwrap_or(false)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    (child, rx)
}

#[test]
fn socks5_upstream_asks_for_the_original_destination() {
    require_root();
    socks5_upstream("splice");
}

/// The handshake bytes the agent itself exchanged with the SOCKS server are not relayed
/// bytes: the in-kernel relay starts after them.
#[test]
fn socks5_upstream_with_sockmap() {
    require_root();
    if common::kernel::kernel_lacks(common::kernel::Feature::SockmapRelay) {
        return;
    }
    socks5_upstream("sockmap");
}

fn socks5_upstream(relay: &str) {
    let gw = Gateway::new(&format!("socks{relay}")).expect("topology");
    // Line by line: microsocks closes both sides when one half-closes, so the exchange
    // does not rely on a half-close (the bulk tests cover that for direct upstreams).
    let _server = Server::start(&gw.server, server(80), ServerMode::Echo);
    let (mut socks, socks_log) = start_microsocks(&gw.router);
    let agent = Agent::start(
        &gw.router,
        &[
            AGENT_ARGS,
            &[
                "--upstream",
                "socks5://alice:s3cret@127.0.0.1:1080",
                "--relay",
                relay,
            ],
        ]
        .concat(),
    );
    let reply = gw
        .client
        .run(|| ask_line(server(80), "via socks"))
        .expect("netns")
        .expect("exchange");
    // microsocks connected from the router's address, for the original destination.
    assert!(
        reply.starts_with(&format!("peer={}:", testbed::ROUTER_SERVER_SIDE_V4)),
        "{reply}\n{}",
        agent.log_text()
    );
    assert!(reply.ends_with("echo=via socks"), "{reply}");
    let asked = socks_log
        .recv_timeout(Duration::from_secs(5))
        .expect("microsocks logged nothing");
    assert!(
        asked.contains("connected to 198.51.100.2:80"),
        "microsocks: {asked}"
    );
    let (status, log) = agent.stop();
    let _ = socks.kill();
    let _ = socks.wait();
    assert!(status.success(), "{log}");
    assert!(!log.contains("password"), "{log}");
}

/// Deterministic bytes for the bulk test (xorshift), and their FNV-1a hash.
struct Stream(u64);

impl Stream {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

fn fnv(hash: &mut u64, data: &[u8]) {
    for &b in data {
        *hash ^= u64::from(b);
        *hash = hash.wrapping_mul(0x100_0000_01b3);
    }
}

const BULK: usize = 64 * 1024 * 1024;
const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

/// The client sends 64 MiB and half-closes; the server reads to EOF, then sends 64 MiB of
/// its own and the hash of what it got. Both ends check every byte.
fn bulk_both_ways(relay: &str) {
    let gw = Gateway::new(&format!("bulk{relay}")).expect("topology");
    let srv = spawn_in(&gw.server, || -> std::io::Result<u64> {
        let listener = TcpListener::bind("0.0.0.0:80")?;
        listener.set_nonblocking(false)?;
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut hash = FNV_START;
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0usize;
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            fnv(&mut hash, &buf[..n]);
            got += n;
        }
        stream.write_all(&hash.to_le_bytes())?;
        let mut data = Stream(0x5eed);
        let mut sent = 0;
        while sent < BULK {
            let n = (BULK - sent).min(buf.len());
            data.fill(&mut buf[..n]);
            stream.write_all(&buf[..n])?;
            sent += n;
        }
        Ok(got as u64)
    });
    std::thread::sleep(Duration::from_millis(100));
    let agent = Agent::start(&gw.router, &[AGENT_ARGS, &["--relay", relay]].concat());
    let (sent_hash, reply_hash, reply_ok, got) = gw
        .client
        .run(|| -> std::io::Result<(u64, u64, bool, usize)> {
            let mut stream = TcpStream::connect_timeout(&server(80), Duration::from_secs(3))?;
            stream.set_read_timeout(Some(Duration::from_secs(60)))?;
            let mut data = Stream(0xc0ffee);
            let mut hash = FNV_START;
            let mut buf = vec![0u8; 256 * 1024];
            let mut sent = 0;
            while sent < BULK {
                let n = (BULK - sent).min(buf.len());
                data.fill(&mut buf[..n]);
                fnv(&mut hash, &buf[..n]);
                stream.write_all(&buf[..n])?;
                sent += n;
            }
            stream.shutdown(Shutdown::Write)?;
            let mut reply_hash = [0u8; 8];
            stream.read_exact(&mut reply_hash)?;
            let mut expected = Stream(0x5eed);
            let mut want = vec![0u8; buf.len()];
            let mut got = 0usize;
            let mut ok = true;
            loop {
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                expected.fill(&mut want[..n]);
                ok &= buf[..n] == want[..n];
                got += n;
            }
            Ok((hash, u64::from_le_bytes(reply_hash), ok, got))
        })
        .expect("netns")
        .expect("bulk exchange");
    let server_got = srv.join().expect("server thread").expect("server io");
    assert_eq!(server_got, BULK as u64, "client to server");
    assert_eq!(
        sent_hash, reply_hash,
        "bytes changed on the way to the server"
    );
    assert_eq!(got, BULK, "server to client");
    assert!(reply_ok, "bytes changed on the way to the client");
    let line = agent
        .wait_for_line(
            &[
                "-> 198.51.100.2:80:",
                "67108864 bytes up",
                "67108872 bytes down",
            ],
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("no connection line:\n{}", agent.log_text()));
    assert!(!line.contains("ended by"), "{line}");
    let (status, _) = agent.stop();
    assert!(status.success());
}

#[test]
fn sixty_four_mib_each_way_arrive_intact_across_a_half_close_with_splice() {
    require_root();
    bulk_both_ways("splice");
}

#[test]
fn sixty_four_mib_each_way_arrive_intact_across_a_half_close_with_copy() {
    require_root();
    bulk_both_ways("copy");
}

#[test]
fn sixty_four_mib_each_way_arrive_intact_across_a_half_close_with_sockmap() {
    require_root();
    if common::kernel::kernel_lacks(common::kernel::Feature::SockmapRelay) {
        return;
    }
    bulk_both_ways("sockmap");
}

#[test]
fn direct_connection_to_the_proxy_port_is_closed_without_a_loop() {
    require_root();
    let gw = Gateway::new("loop").expect("topology");
    let agent = Agent::start(&gw.router, AGENT_ARGS);
    let proxy_port = SocketAddr::from((testbed::ROUTER_CLIENT_SIDE_V4, 50080));
    let (reply, took) = gw
        .client
        .run(|| {
            let started = Instant::now();
            let reply = exchange(proxy_port, b"hello");
            (reply, started.elapsed())
        })
        .expect("netns");
    // Accepted, then closed at once with nothing relayed (or reset): no loop.
    match reply {
        Ok(text) => assert_eq!(text, "", "the proxy answered something"),
        Err(e) => assert!(
            matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::NotConnected | ErrorKind::BrokenPipe
            ),
            "{e}"
        ),
    }
    assert!(took < Duration::from_secs(2), "took {took:?}");
    agent
        .wait_for_line(
            &["-> 192.0.2.1:50080: connection straight to the proxy port refused"],
            Duration::from_secs(3),
        )
        .unwrap_or_else(|| panic!("not refused:\n{}", agent.log_text()));
    let (status, log) = agent.stop();
    assert!(status.success());
    assert!(
        !log.contains("upstream connect"),
        "the proxy tried to connect somewhere:\n{log}"
    );
    assert_eq!(log.matches("-> 192.0.2.1:50080").count(), 1, "{log}");
}

#[test]
fn upstream_refusal_and_reset_reach_the_client_as_resets() {
    require_root();
    refusal_and_reset_reach_the_client("splice");
}

#[test]
fn upstream_refusal_and_reset_reach_the_client_as_resets_with_sockmap() {
    require_root();
    if common::kernel::kernel_lacks(common::kernel::Feature::SockmapRelay) {
        return;
    }
    refusal_and_reset_reach_the_client("sockmap");
}

fn refusal_and_reset_reach_the_client(relay: &str) {
    let gw = Gateway::new(&format!("rst{relay}")).expect("topology");
    // Port 81 has nobody (the server's kernel refuses); port 80 accepts and resets.
    let resetter = spawn_in(&gw.server, || -> std::io::Result<()> {
        let listener = TcpListener::bind("0.0.0.0:80")?;
        let (stream, _) = listener.accept()?;
        socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO))?;
        std::thread::sleep(Duration::from_millis(100));
        drop(stream);
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(100));
    let agent = Agent::start(
        &gw.router,
        &[
            "run",
            "--iface",
            "r0",
            "--dport",
            "80-81",
            "--on-port",
            "50080",
            "--relay",
            relay,
        ],
    );
    let read_result = |port: u16| {
        gw.client
            .run(move || -> std::io::Result<usize> {
                let mut stream = TcpStream::connect_timeout(&server(port), Duration::from_secs(3))?;
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut buf = [0u8; 16];
                stream.read(&mut buf)
            })
            .expect("netns")
    };
    let refused = read_result(81);
    assert_eq!(
        refused.map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionReset),
        "refusal"
    );
    let reset = read_result(80);
    assert_eq!(
        reset.map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionReset),
        "reset"
    );
    resetter.join().expect("thread").expect("server");
    let log = agent.stop_ok();
    // Each connection's closing line says why it ended.
    let closing = |port: &str| {
        log.lines()
            .find(|l| l.contains(&format!("-> 198.51.100.2:{port}:")) && l.contains(" ms, "))
            .unwrap_or_else(|| panic!("no closing line for port {port}:\n{log}"))
    };
    assert!(
        closing("81").contains("refused, upstream connect failed"),
        "{log}"
    );
    assert!(closing("80").contains("reset, ended by"), "{log}");
}

#[test]
fn sigint_drains_a_live_connection_then_removes_everything() {
    require_root();
    let gw = Gateway::new("drain").expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::Echo);
    let agent = Agent::start(&gw.router, AGENT_ARGS);
    let mut live = connect_kept(&gw, 80, &|| agent.log_text());
    assert!(ask(&mut live, "before").contains("echo=before"));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    agent
        .wait_for_line(&["draining 1 live connection(s)"], Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no drain:\n{}", agent.log_text()));
    // Still proxied while draining; new connections are no longer accepted.
    assert!(ask(&mut live, "during").contains("echo=during"));
    let refused = gw
        .client
        .run(|| TcpStream::connect_timeout(&server(80), Duration::from_millis(500)))
        .expect("netns");
    assert!(
        refused.is_err(),
        "a new connection was accepted while draining"
    );
    drop(live);
    let (status, log) = agent.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{log}");
    assert!(log.contains("drained: all connections closed"), "{log}");
    assert!(log.contains("policy routing (IPv4) removed"), "{log}");
}

#[test]
fn the_drain_timeout_resets_what_is_left_and_logs_it_as_drain() {
    require_root();
    let gw = Gateway::new("draincut").expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::Echo);
    let agent = Agent::start(
        &gw.router,
        &[AGENT_ARGS, &["--drain-timeout", "1"]].concat(),
    );
    let mut live = connect_kept(&gw, 80, &|| agent.log_text());
    assert!(ask(&mut live, "before").contains("echo=before"));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let (status, log) = agent.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{log}");
    assert!(log.contains("drain timeout: 1 connection(s) cut"), "{log}");
    assert!(
        log.lines()
            .any(|l| l.contains("-> 198.51.100.2:80:") && l.contains(" ms, drain")),
        "{log}"
    );
    let mut buf = [0u8; 16];
    assert_eq!(
        live.read(&mut buf).map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionReset),
        "the cut connection was not reset"
    );
}

/// The client side of a second client namespace, `ghost`, joined to the router by `r2`:
/// 203.0.113.2/24 (RFC 5737), router 203.0.113.1.
fn ghost_client(gw: &Gateway) -> Netns {
    let ghost = Netns::create(format!("{}-gst", gw.router.name)).expect("ghost namespace");
    gw.router
        .ip(&[
            "link",
            "add",
            "r2",
            "type",
            "veth",
            "peer",
            "name",
            "g0",
            "netns",
            &ghost.name,
        ])
        .expect("veth r2/g0");
    for (ns, dev, addr) in [
        (&gw.router, "r2", "203.0.113.1/24"),
        (&ghost, "g0", "203.0.113.2/24"),
    ] {
        ns.ip(&["addr", "add", addr, "dev", dev]).expect("address");
        ns.ip(&["link", "set", dev, "up"]).expect("link up");
    }
    ghost
        .ip(&["route", "add", "default", "via", "203.0.113.1"])
        .expect("ghost route");
    ghost
}

/// The keepalive timers of the router's established TCP sockets (`ss -o`), waiting for
/// `count` of them: right after an exchange a socket may still wait for an ACK.
fn keepalive_timers(gw: &Gateway, count: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let out = gw
            .router
            .command("ss")
            .args(["-tnoH", "state", "established"])
            .output()
            .expect("ss");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let timers: Vec<String> = text
            .lines()
            .filter_map(|l| l.split("timer:(keepalive,").nth(1))
            .map(|t| t.split(',').next().unwrap_or("").to_owned())
            .collect();
        if timers.len() >= count || Instant::now() >= deadline {
            assert_eq!(timers.len(), count, "keepalive timers in:\n{text}");
            return timers;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_vanished_client_is_reaped_after_the_idle_timeout_and_its_slot_comes_back() {
    require_root();
    vanished_client_is_reaped("splice");
}

#[test]
fn a_vanished_client_is_reaped_after_the_idle_timeout_and_its_slot_comes_back_with_sockmap() {
    require_root();
    if common::kernel::kernel_lacks(common::kernel::Feature::SockmapRelay) {
        return;
    }
    vanished_client_is_reaped("sockmap");
}

/// A client that vanishes (its link deleted: no FIN, no RST) holds its connection until
/// the idle timeout resets it; then its --max-connections slot serves another client.
fn vanished_client_is_reaped(relay: &str) {
    let gw = Gateway::new(&format!("idle{relay}")).expect("topology");
    let ghost = ghost_client(&gw);
    let _server = Server::start(&gw.server, server(80), ServerMode::Echo);
    let agent = Agent::start(
        &gw.router,
        &[
            AGENT_ARGS,
            &[
                "--iface",
                "r2",
                "--relay",
                relay,
                "--tcp-idle-timeout",
                "2",
                "--max-connections",
                "1",
            ],
        ]
        .concat(),
    );
    let mut vanishing = ghost
        .run(|| TcpStream::connect_timeout(&server(80), Duration::from_secs(3)))
        .expect("entering the ghost namespace")
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", agent.log_text()));
    vanishing
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    assert!(ask(&mut vanishing, "hello").contains("echo=hello"));
    let last_byte = Instant::now();
    // Both legs probe their peer within a minute of silence (the kernel's default is two
    // hours): the client's socket (accepted, inheriting the listener's settings) and the
    // upstream one (set after a second of relaying, within the wait of keepalive_timers).
    for timer in keepalive_timers(&gw, 2) {
        assert!(
            timer.ends_with("sec") || timer == "1min",
            "keepalive timer {timer}, not within a minute"
        );
    }
    // Its slot is taken: another client is reset.
    assert_eq!(try_ask(&gw, "refused"), None, "{}", agent.log_text());

    ghost
        .ip(&["link", "del", "g0"])
        .expect("deleting the ghost's link");
    let vanished = Instant::now();
    let line = agent
        .wait_for_line(
            &["203.0.113.2:", "-> 198.51.100.2:80:", " ms, idle"],
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("the vanished client was not reaped:\n{}", agent.log_text()));
    let waited = vanished.elapsed();
    assert!(
        last_byte.elapsed() >= Duration::from_secs(2),
        "reaped {:?} after its last byte, before the idle timeout: {line}",
        last_byte.elapsed()
    );
    assert!(line.contains("6 bytes up"), "{line}");
    // Reaped between one and 1.25 timeouts after its last byte; the log line is read on a
    // thread, so allow some slack above.
    assert!(
        waited < Duration::from_secs(4),
        "reaped {waited:?} after the link went: {line}"
    );

    // The slot is free again.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut answer = None;
    while answer.is_none() && Instant::now() < deadline {
        answer = try_ask(&gw, "after");
        if answer.is_none() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let answer = answer.unwrap_or_else(|| panic!("no slot came back:\n{}", agent.log_text()));
    assert!(answer.contains("echo=after"), "{answer}");
    drop(vanishing);
    agent.stop_ok();
}

#[test]
fn udp_through_a_socks5_upstream_uses_udp_associate() {
    require_root();
    let gw = Gateway::new("socksudp").expect("topology");
    let echo = spawn_in(&gw.server, || {
        let socket = UdpSocket::bind("0.0.0.0:53").expect("bind :53");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut buf = [0u8; 2048];
        if let Ok((n, peer)) = socket.recv_from(&mut buf) {
            let reply = format!("from={peer} got={}", String::from_utf8_lossy(&buf[..n]));
            let _ = socket.send_to(reply.as_bytes(), peer);
        }
    });
    // Dante from Debian's packages, in the router namespace, relaying out of r1.
    let dante = Dante::start(&gw.router, "socksudp");
    let agent = Agent::start(
        &gw.router,
        &[
            UDP_AGENT_ARGS,
            &[
                "--upstream",
                "socks5://127.0.0.1:1081",
                "--udp-idle-timeout",
                "1",
            ],
        ]
        .concat(),
    );
    let reply = gw
        .client
        .run(|| -> std::io::Result<String> {
            let socket = UdpSocket::bind("0.0.0.0:0")?;
            socket.connect(server(53))?;
            socket.set_read_timeout(Some(Duration::from_secs(3)))?;
            socket.send(b"ping")?;
            let mut buf = [0u8; 2048];
            let n = socket.recv(&mut buf)?;
            Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        })
        .expect("netns")
        .expect("udp exchange");
    assert!(
        reply.starts_with(&format!("from={}:", testbed::ROUTER_SERVER_SIDE_V4))
            && reply.ends_with("got=ping"),
        "{reply}\n{}",
        agent.log_text()
    );
    // Dante logs the association when it ends (after the session's idle timeout), with the
    // destination it relayed to.
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut relayed_to_destination = false;
    while Instant::now() < deadline && !relayed_to_destination {
        if let Ok(line) = dante.log.recv_timeout(Duration::from_millis(200)) {
            relayed_to_destination =
                line.contains("udpassociate") && line.contains("198.51.100.2.53");
        }
    }
    let _ = echo.join();
    let (status, log) = agent.stop();
    drop(dante);
    assert!(
        relayed_to_destination,
        "dante never relayed to 198.51.100.2:53"
    );
    assert!(status.success(), "{log}");
}

/// A process's resident memory (`VmRSS` in /proc/PID/status), in KiB.
fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// Waits up to `timeout` for `done` to hold, polling every 20 ms; tells whether it did.
fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    done()
}

/// One flood from the client namespace: a datagram to the server's port 53 from each of
/// `count` source ports, 100 every 10 ms (paced so that the agent's listener keeps up,
/// quick enough that no session idles out before the cap is reached). The sockets stay
/// open, so that the echoes do not come back as port unreachables, which end sessions.
fn udp_flood(gw: &Gateway, first_port: u16, count: u16) -> Vec<UdpSocket> {
    gw.client
        .run(|| -> std::io::Result<Vec<UdpSocket>> {
            let mut sockets = Vec::with_capacity(usize::from(count));
            for i in 0..count {
                let socket = UdpSocket::bind(("0.0.0.0", first_port + i))?;
                socket.send_to(format!("flood {i}").as_bytes(), server(53))?;
                sockets.push(socket);
                if i % 100 == 99 {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            Ok(sockets)
        })
        .expect("netns")
        .expect("flood")
}

/// Floods of 5,000 client source ports, one datagram each, at a cap of 1,000 sessions:
/// each live session costs at most 64 KiB of the agent's resident memory, and once the
/// sessions have idled out the agent is back within 32 MiB of where it started, flood
/// after flood. (With two 64 KiB buffers per session, the first flood left 52 MiB behind.)
#[test]
fn udp_flood_costs_what_the_sessions_hold_and_gives_it_back() {
    require_root();
    const FLOODS: usize = 2;
    const FLOOD: u16 = 5_000;
    const CAP: usize = 1_000;
    const FIRST_PORT: u16 = 20_000;
    // The flood's sockets stay open: this process needs a descriptor for each.
    let (_, hard) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .expect("getrlimit");
    let want = hard.max(u64::from(FLOOD) + 1_024);
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, want, want)
        .expect("raising RLIMIT_NOFILE for the flood's sockets");

    let gw = Gateway::new("udpmem").expect("topology");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let echo_stop = std::sync::Arc::clone(&stop);
    let echo = spawn_in(&gw.server, move || {
        let socket = UdpSocket::bind("0.0.0.0:53").expect("bind :53");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(120);
        while !echo_stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            if let Ok((n, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], peer);
            }
        }
    });
    // The flood must end well within the idle timeout, or its first sessions end before
    // its last begin: 2 s, stretched where everything runs slower (emulation).
    let idle_timeout = common::kernel::patience(Duration::from_secs(2));
    let agent = Agent::start(
        &gw.router,
        &[
            UDP_AGENT_ARGS,
            &[
                "--udp-max-sessions",
                &CAP.to_string(),
                "--udp-idle-timeout",
                &idle_timeout.as_secs().to_string(),
            ],
        ]
        .concat(),
    );
    let pid = agent.pid();
    // `ip netns exec` execs the agent in place: the child's pid is the agent's own.
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).expect("comm");
    assert_eq!(comm.trim(), "proxy", "pid {pid} is not the agent");
    std::thread::sleep(Duration::from_millis(300));
    let (fds_before, rss_before) = (open_fds(pid), vm_rss_kib(pid));

    for round in 1..=FLOODS {
        // Per session, against what the agent held just before this flood (the memory the
        // agent gives back can take it below its first baseline).
        let rss_start = vm_rss_kib(pid);
        let flood_started = Instant::now();
        let clients = udp_flood(&gw, FIRST_PORT, FLOOD);
        let flood_secs = flood_started.elapsed().as_secs_f64();
        // Live: two sockets per session (upstream and reply) once the cap is reached; then
        // a moment for the echoes to come back through the sessions.
        let reached = wait_until(common::kernel::patience(Duration::from_secs(5)), || {
            open_fds(pid) >= fds_before + 2 * CAP
        });
        std::thread::sleep(Duration::from_millis(300));
        let fds_live = open_fds(pid);
        let rss_live = vm_rss_kib(pid);
        let sessions = fds_live.saturating_sub(fds_before) / 2;
        // Ended: every session idles out after the timeout; then the agent has time to free.
        let ended = wait_until(common::kernel::patience(Duration::from_secs(15)), || {
            open_fds(pid) <= fds_before
        });
        std::thread::sleep(Duration::from_millis(1_500));
        let rss_after = vm_rss_kib(pid);
        drop(clients);

        let per_session = rss_live.saturating_sub(rss_start) as f64 / sessions.max(1) as f64;
        eprintln!(
            "udp memory, flood {round}/{FLOODS}: {FLOOD} source ports in {flood_secs:.2} s, \
             {sessions} sessions live (cap {CAP}); agent VmRSS {rss_start} KiB before, \
             {rss_live} KiB live ({per_session:.1} KiB per session), {rss_after} KiB after the \
             sessions ended ({:+} KiB from the first baseline, {rss_before} KiB)",
            rss_after as i64 - rss_before as i64
        );
        assert!(
            reached && sessions <= CAP,
            "flood {round}: {sessions} sessions ({fds_before} -> {fds_live} descriptors), \
             expected the cap of {CAP}:\n{}",
            agent.settled_log()
        );
        assert!(
            ended,
            "flood {round}: sessions still open after 15 s ({} descriptors, {fds_before} before)",
            open_fds(pid)
        );
        assert!(
            per_session <= 64.0,
            "flood {round}: {per_session:.1} KiB per live session ({rss_start} -> {rss_live} \
             KiB for {sessions})"
        );
        assert!(
            rss_after <= rss_before + 32 * 1024,
            "flood {round}: {rss_after} KiB after the flood, {rss_before} KiB before: not given \
             back"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = echo.join();
    agent.stop_ok();
}

#[test]
fn the_proxys_own_marked_traffic_is_never_intercepted() {
    require_root();
    let gw = Gateway::new("bypass").expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::Echo);
    let (mut socks, _socks_log) = start_microsocks(&gw.router);
    // The classifier also sits on lo with a rule for the SOCKS port: without the outbound
    // mark the proxy's own connection to 127.0.0.1:1080 would be handed back to its
    // listener, and again, forever.
    let agent = Agent::start(
        &gw.router,
        &[
            "run",
            "--iface",
            "r0",
            "--iface",
            "lo",
            "--dport",
            "80,1080",
            "--on-port",
            "50080",
            "--upstream",
            "socks5://alice:s3cret@127.0.0.1:1080",
        ],
    );
    let reply = gw
        .client
        .run(|| ask_line(server(80), "marked"))
        .expect("netns")
        .unwrap_or_else(|e| panic!("exchange: {e}\n{}", agent.log_text()));
    assert!(
        reply.ends_with("echo=marked"),
        "{reply}\n{}",
        agent.log_text()
    );
    let (status, log) = agent.stop();
    let _ = socks.kill();
    let _ = socks.wait();
    assert!(status.success(), "{log}");
    assert!(common::counter(&log, "bypassed") >= 3, "{log}");
    assert!(
        !log.contains("-> 127.0.0.1:1080"),
        "the proxy intercepted its own connection:\n{log}"
    );
}

/// Connects through the proxy and asks one line; `None` when the proxy resets or closes.
fn try_ask(gw: &Gateway, line: &'static str) -> Option<String> {
    gw.client
        .run(move || -> std::io::Result<String> {
            let mut stream = TcpStream::connect_timeout(&server(80), Duration::from_secs(3))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            writeln!(stream, "{line}")?;
            let mut answer = String::new();
            BufReader::new(stream).read_line(&mut answer)?;
            Ok(answer.trim().to_owned())
        })
        .expect("netns")
        .ok()
        .filter(|answer| !answer.is_empty())
}

#[test]
fn connections_beyond_max_connections_are_reset_until_a_slot_frees() {
    require_root();
    let gw = Gateway::new("maxconn").expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::Echo);
    let agent = Agent::start(
        &gw.router,
        &[AGENT_ARGS, &["--max-connections", "1"]].concat(),
    );
    let mut first = connect_kept(&gw, 80, &|| agent.log_text());
    assert!(ask(&mut first, "one").contains("echo=one"));

    // The kernel completes the handshake; the proxy then resets the connection.
    let second = gw
        .client
        .run(|| -> std::io::Result<usize> {
            let mut stream = TcpStream::connect_timeout(&server(80), Duration::from_secs(3))?;
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            stream.read(&mut [0u8; 16])
        })
        .expect("netns");
    assert_eq!(
        second.map_err(|e| e.kind()),
        Err(ErrorKind::ConnectionReset),
        "a second connection at --max-connections 1"
    );
    agent
        .wait_for_line(
            &["refused, --max-connections reached"],
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("no refusal logged:\n{}", agent.log_text()));
    // The first one is untouched.
    assert!(ask(&mut first, "still").contains("echo=still"));

    // Its slot comes back once it ends.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut answer = None;
    while answer.is_none() && Instant::now() < deadline {
        answer = try_ask(&gw, "three");
        if answer.is_none() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let answer = answer.unwrap_or_else(|| panic!("no slot came back:\n{}", agent.log_text()));
    assert!(answer.contains("echo=three"), "{answer}");
    agent.stop_ok();
}

#[test]
fn out_of_descriptors_the_agent_backs_off_and_serves_once_some_free_up() {
    require_root();
    let gw = Gateway::new("emfile").expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::Echo);
    let agent = Agent::start(&gw.router, &[AGENT_ARGS, &["--workers", "1"]].concat());
    // Room for two proxied connections (two descriptors each), and no more.
    limit_descriptors(agent.pid(), 4);
    let connect = || connect_kept(&gw, 80, &|| agent.settled_log());
    let mut first = connect();
    assert!(ask(&mut first, "one").contains("echo=one"));
    let mut second = connect();
    assert!(ask(&mut second, "two").contains("echo=two"));

    // The third waits in the kernel's accept queue while accept(2) fails with EMFILE.
    let mut third = connect();
    writeln!(third, "three").expect("write");
    agent
        .wait_for_line(&["accept: Too many open files"], Duration::from_secs(5))
        .unwrap_or_else(|| panic!("no EMFILE warning:\n{}", agent.log_text()));
    std::thread::sleep(Duration::from_secs(1));
    let retries = agent
        .log_text()
        .matches("accept: Too many open files")
        .count();
    // 50 ms apart: about 20 in that second. A loop without the pause logs thousands.
    assert!(
        retries <= 40,
        "{retries} accept failures in about a second: the accept loop does not back off"
    );

    // One connection ends, its descriptors free up, and the waiting one is served.
    drop(first);
    assert_waiting_one_is_served(&third, &agent);
    assert!(ask(&mut second, "two again").contains("echo=two again"));
    // Closed before the stop, which would otherwise wait for them (the drain).
    drop((second, third));
    agent.stop_ok();
}

/// The same, one descriptor further: the connection is accepted with the last free
/// descriptor, and its upstream socket finds none. The agent waits for one (within the
/// connect timeout) instead of resetting a connection it can serve a moment later.
#[test]
fn a_connection_accepted_with_the_last_descriptor_waits_for_its_upstream_socket() {
    require_root();
    let gw = Gateway::new("emfile2").expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::Echo);
    let agent = Agent::start(&gw.router, &[AGENT_ARGS, &["--workers", "1"]].concat());
    // Two proxied connections (two descriptors each) and one more descriptor.
    limit_descriptors(agent.pid(), 5);
    let connect = || connect_kept(&gw, 80, &|| agent.settled_log());
    let mut first = connect();
    assert!(ask(&mut first, "one").contains("echo=one"));
    let mut second = connect();
    assert!(ask(&mut second, "two").contains("echo=two"));
    let mut third = connect();
    writeln!(third, "three").expect("write");
    agent
        .wait_for_line(
            &["upstream socket: Too many open files"],
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("no upstream EMFILE line:\n{}", agent.log_text()));
    drop(first);
    assert_waiting_one_is_served(&third, &agent);
    drop((second, third));
    agent.stop_ok();
}

/// The third connection of the descriptor tests, which sent `three` while the agent had no
/// descriptor for it, gets its echo once the first one has closed.
fn assert_waiting_one_is_served(third: &TcpStream, agent: &Agent) {
    let mut answer = String::new();
    BufReader::new(third.try_clone().expect("clone"))
        .read_line(&mut answer)
        .unwrap_or_else(|e| panic!("the waiting connection: {e}\n{}", agent.settled_log()));
    assert!(answer.contains("echo=three"), "{answer}");
}

/// Lowers the agent's descriptor limit so that exactly `free` descriptors are left: a new
/// descriptor takes the lowest free number, and the limit bounds the number.
fn limit_descriptors(pid: u32, free: usize) {
    let used: Vec<libc::rlim_t> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("the agent's descriptors")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let (mut bound, mut found) = (0, 0);
    while found < free {
        if !used.contains(&bound) {
            found += 1;
        }
        bound += 1;
    }
    let limit = libc::rlimit {
        rlim_cur: bound,
        rlim_max: bound,
    };
    // SAFETY: a live pid, a valid rlimit, and no old-limit pointer.
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &limit,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
}

#[test]
fn sockmap_relay_carries_a_request_and_its_answer() {
    require_root();
    if common::kernel::kernel_lacks(common::kernel::Feature::SockmapRelay) {
        return;
    }
    let gw = Gateway::new("skmsg").expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::Echo);
    let agent = Agent::start(&gw.router, &[AGENT_ARGS, &["--relay", "sockmap"]].concat());
    let mut stream = connect_kept(&gw, 80, &|| agent.log_text());
    for line in ["one", "two", "three"] {
        let answer = ask(&mut stream, line);
        assert!(answer.contains(&format!("echo={line}")), "{answer}");
    }
    drop(stream);
    let log = agent.stop_ok();
    assert!(log.contains("relay: in the kernel (sockmap)"), "{log}");
    // The connection went through the kernel relay, not the userspace fallback.
    assert!(!log.contains("copying this connection"), "{log}");
    assert!(log.contains("14 bytes up"), "{log}");
}

#[test]
fn sockmap_relay_passes_a_half_close_on() {
    require_root();
    if common::kernel::kernel_lacks(common::kernel::Feature::SockmapRelay) {
        return;
    }
    let gw = Gateway::new("skhalf").expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::Reply);
    let agent = Agent::start(&gw.router, &[AGENT_ARGS, &["--relay", "sockmap"]].concat());
    let reply = gw
        .client
        .run(|| exchange(server(80), b"hello"))
        .expect("netns")
        .unwrap_or_else(|e| panic!("exchange: {e}\n{}", agent.settled_log()));
    assert!(reply.ends_with("got=5"), "{reply}");
    agent.stop_ok();
}

#[test]
fn sockmap_relay_server_answers_and_closes_first() {
    require_root();
    if common::kernel::kernel_lacks(common::kernel::Feature::SockmapRelay) {
        return;
    }
    let gw = Gateway::new("skfirst").expect("topology");
    let server_thread = spawn_in(&gw.server, || -> std::io::Result<()> {
        let listener = TcpListener::bind("0.0.0.0:80")?;
        for _ in 0..3 {
            let (mut stream, peer) = listener.accept()?;
            let mut one = [0u8; 1];
            stream.read_exact(&mut one)?;
            stream.write_all(peer.ip().to_string().as_bytes())?;
        }
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(100));
    let agent = Agent::start(&gw.router, &[AGENT_ARGS, &["--relay", "sockmap"]].concat());
    for i in 0..3 {
        let got = gw
            .client
            .run(|| -> std::io::Result<String> {
                let mut stream = TcpStream::connect_timeout(&server(80), Duration::from_secs(3))?;
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                stream.write_all(b"P")?;
                let mut peer = String::new();
                stream.read_to_string(&mut peer)?;
                Ok(peer)
            })
            .expect("netns")
            .unwrap_or_else(|e| panic!("probe {i}: {e}\n{}", agent.settled_log()));
        assert_eq!(got, testbed::ROUTER_SERVER_SIDE_V4.to_string());
    }
    server_thread.join().expect("thread").expect("server");
    agent.stop_ok();
}

/// A server that speaks first and closes at once: its FIN can reach the upstream socket
/// before or while the pair is linked (the sockmap refuses sockets past ESTABLISHED), and
/// every way that goes must still deliver the banner and a clean EOF.
#[test]
fn sockmap_relay_server_that_speaks_and_closes_at_once() {
    require_root();
    if common::kernel::kernel_lacks(common::kernel::Feature::SockmapRelay) {
        return;
    }
    let gw = Gateway::new("skbanner").expect("topology");
    const ROUNDS: usize = 20;
    let server_thread = spawn_in(&gw.server, || -> std::io::Result<()> {
        let listener = TcpListener::bind("0.0.0.0:80")?;
        for _ in 0..ROUNDS {
            let (mut stream, _) = listener.accept()?;
            stream.write_all(b"220 banner\r\n")?;
        }
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(100));
    let agent = Agent::start(&gw.router, &[AGENT_ARGS, &["--relay", "sockmap"]].concat());
    for i in 0..ROUNDS {
        let got = gw
            .client
            .run(|| -> std::io::Result<String> {
                let mut stream = TcpStream::connect_timeout(&server(80), Duration::from_secs(3))?;
                stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                let mut banner = String::new();
                stream.read_to_string(&mut banner)?;
                Ok(banner)
            })
            .expect("netns")
            .unwrap_or_else(|e| panic!("round {i}: {e}\n{}", agent.settled_log()));
        assert_eq!(got, "220 banner\r\n", "round {i}");
    }
    server_thread.join().expect("thread").expect("server");
    let log = agent.stop_ok();
    assert!(!log.contains("ended by"), "{log}");
    eprintln!(
        "{} of {ROUNDS} connections copied in userspace (the server's FIN came first)",
        log.matches("copying this connection").count()
    );
}
