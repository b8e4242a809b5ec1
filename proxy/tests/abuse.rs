//! The agent under abuse from the LAN or from local users: original destinations it must
//! not relay to, and the stats socket.

mod common;

use std::{
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket},
    os::{
        fd::AsRawFd as _,
        linux::net::SocketAddrExt as _,
        unix::net::{SocketAddr as UnixAddr, UnixStream},
    },
    process::Output,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use proxy_testbed::{self as testbed, Gateway};
use socket2::{Domain, Protocol, Socket, Type};

use common::{
    Agent, Server, ServerMode, counter, exchange_from_client, open_fds, require_root, server,
};

const TCP_AND_UDP_80: &[&str] = &[
    "run",
    "--iface",
    "r0",
    "--dport",
    "80",
    "--protocol",
    "tcp,udp",
    "--on-port",
    "50080",
];

/// Sockets on port 80 of every router address (plain, dual-stack wildcard): whatever the
/// proxy would open towards a local destination lands here and is counted.
struct Trap {
    stop: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<Result<(), testbed::TestbedError>>>,
}

impl Trap {
    fn start(gw: &Gateway) -> Trap {
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicUsize::new(0));
        let (tcp, udp) = gw
            .router
            .run(|| {
                let any = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), 80);
                let tcp = Socket::new(Domain::IPV6, Type::STREAM, None)?;
                tcp.set_only_v6(false)?;
                tcp.bind(&any.into())?;
                tcp.listen(16)?;
                tcp.set_nonblocking(true)?;
                let udp = Socket::new(Domain::IPV6, Type::DGRAM, None)?;
                udp.set_only_v6(false)?;
                udp.bind(&any.into())?;
                udp.set_nonblocking(true)?;
                Ok::<_, std::io::Error>((tcp, udp))
            })
            .expect("router namespace")
            .expect("trap sockets");
        let spawn = |name: &'static str, socket: Socket| {
            let (stop, hits) = (Arc::clone(&stop), Arc::clone(&hits));
            gw.router.spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(60);
                let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 2048];
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let got = if name == "tcp" {
                        socket.accept().map(|_| ())
                    } else {
                        socket.recv(&mut buf).map(|_| ())
                    };
                    match got {
                        Ok(()) => {
                            hits.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        let threads = vec![spawn("tcp", tcp), spawn("udp", udp)];
        Trap {
            stop,
            hits,
            threads,
        }
    }

    fn hits(self) -> usize {
        std::thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.hits.load(Ordering::Relaxed)
    }
}

/// The internet checksum of `parts` laid end to end.
fn checksum(parts: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = parts.concat();
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv6 UDP datagram from the client to `dst` port 80, with a valid checksum.
fn udp6_packet(dst: Ipv6Addr) -> Vec<u8> {
    let src = testbed::CLIENT_V6.octets();
    let payload = b"to a local destination";
    let len = (8 + payload.len()) as u16;
    let mut udp = Vec::new();
    udp.extend_from_slice(&40_000u16.to_be_bytes());
    udp.extend_from_slice(&80u16.to_be_bytes());
    udp.extend_from_slice(&len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let pseudo_len = u32::from(len).to_be_bytes();
    let sum = checksum(&[&src, &dst.octets(), &pseudo_len, &[0, 0, 0, 17], &udp]);
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&len.to_be_bytes());
    ip.extend_from_slice(&[17, 64]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(&udp);
    ip
}

/// An IPv4 UDP datagram from the client to `dst` port 80 (header checksum included).
fn udp4_packet(dst: Ipv4Addr) -> Vec<u8> {
    let payload = b"to a local destination";
    let len = (8 + payload.len()) as u16;
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(20 + len).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&testbed::CLIENT_V4.octets());
    ip.extend_from_slice(&dst.octets());
    let sum = checksum(&[&ip]);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&40_000u16.to_be_bytes());
    ip.extend_from_slice(&80u16.to_be_bytes());
    ip.extend_from_slice(&len.to_be_bytes());
    ip.extend_from_slice(&[0, 0]); // no UDP checksum: allowed over IPv4
    ip.extend_from_slice(payload);
    ip
}

/// Sends `packet` out of the client's c0 straight to r0's MAC address, bypassing the
/// client's own routing (which keeps loopback destinations at home).
fn send_on_wire(gw: &Gateway, ethertype: u16, packet: &[u8]) {
    let out = gw
        .router
        .command("cat")
        .arg("/sys/class/net/r0/address")
        .output()
        .expect("reading r0's address");
    let mac: Vec<u8> = String::from_utf8_lossy(&out.stdout)
        .trim()
        .split(':')
        .map(|h| u8::from_str_radix(h, 16).expect("mac"))
        .collect();
    gw.client
        .run(|| {
            let socket = Socket::new(
                Domain::PACKET,
                Type::DGRAM,
                Some(Protocol::from(i32::from(ethertype.to_be()))),
            )
            .expect("packet socket");
            let ifindex = nix::net::if_::if_nametoindex("c0").expect("c0");
            // SAFETY: sockaddr_ll is plain data; every field that matters is set below.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = ethertype.to_be();
            addr.sll_ifindex = ifindex as i32;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&mac);
            // SAFETY: a valid socket, buffer and address of the stated sizes.
            let sent = unsafe {
                libc::sendto(
                    socket.as_raw_fd(),
                    packet.as_ptr().cast(),
                    packet.len(),
                    0,
                    (&raw const addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(sent, packet.len() as isize, "sending on c0");
        })
        .expect("client namespace");
}

#[test]
fn local_destinations_never_get_a_socket_towards_them() {
    require_root();
    let gw = Gateway::new("localdst").expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::Reply);
    let trap = Trap::start(&gw);
    let agent = Agent::start(&gw.router, TCP_AND_UDP_80);

    // The control: the server is proxied, so the setup intercepts.
    let reply = exchange_from_client(&gw, server(80), b"x");
    assert!(
        reply.starts_with(&format!("peer={}:", testbed::ROUTER_SERVER_SIDE_V4)),
        "{reply}"
    );

    // TCP to the router's own addresses, on both of its interfaces.
    let own: [IpAddr; 3] = [
        testbed::ROUTER_CLIENT_SIDE_V4.into(),
        testbed::ROUTER_SERVER_SIDE_V4.into(),
        testbed::ROUTER_CLIENT_SIDE_V6.into(),
    ];
    for ip in own {
        let result = gw
            .client
            .run(move || {
                TcpStream::connect_timeout(&SocketAddr::new(ip, 80), Duration::from_secs(2))
                    .and_then(|mut s| {
                        use std::io::Read as _;
                        s.set_read_timeout(Some(Duration::from_secs(2)))?;
                        s.read(&mut [0; 16])
                    })
            })
            .expect("client namespace");
        assert!(
            result.is_err() || result.as_ref().is_ok_and(|n| *n == 0),
            "{ip}:80 answered: {result:?}"
        );
    }
    // UDP to the router's own addresses.
    gw.client
        .run(|| {
            let v4 = UdpSocket::bind("0.0.0.0:0").expect("udp");
            v4.send_to(b"x", (testbed::ROUTER_CLIENT_SIDE_V4, 80))
                .expect("send");
            let v6 = UdpSocket::bind("[::]:0").expect("udp6");
            v6.send_to(b"x", (testbed::ROUTER_CLIENT_SIDE_V6, 80))
                .expect("send");
        })
        .expect("client namespace");
    // Loopback, on the wire: IPv4-mapped (which reaches the dual-stack listener), 127.0.0.1
    // and ::1 (which the router's stack drops as martians, whatever the classifier did).
    send_on_wire(
        &gw,
        0x86dd,
        &udp6_packet(Ipv4Addr::LOCALHOST.to_ipv6_mapped()),
    );
    send_on_wire(&gw, 0x86dd, &udp6_packet(Ipv6Addr::LOCALHOST));
    send_on_wire(&gw, 0x0800, &udp4_packet(Ipv4Addr::LOCALHOST));

    let hits = trap.hits();
    let log = agent.stop_ok();
    assert_eq!(
        hits, 0,
        "the proxy opened {hits} socket(s) towards the router's own services:\n{log}"
    );
    // Three TCP connections, two UDP datagrams to own addresses, one to ::ffff:127.0.0.1.
    assert_eq!(counter(&log, "refused_destination"), 6, "{log}");
}

/// `proxy stats` run in the router namespace as `uid`/`gid` (root: 0/0).
fn stats_as(gw: &Gateway, uid: u32, gid: u32) -> Output {
    gw.router
        .command("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
        ])
        .arg(env!("CARGO_BIN_EXE_proxy"))
        .args(["stats", "--table", "100"])
        .output()
        .expect("running proxy stats")
}

const NOBODY: u32 = 65_534;

#[test]
fn stats_answer_root_and_the_stats_group_only() {
    require_root();
    let gw = Gateway::new("statsacl").expect("topology");
    let agent = Agent::start(&gw.router, common::AGENT_ARGS);
    let root = stats_as(&gw, 0, 0);
    assert!(
        root.status.success() && String::from_utf8_lossy(&root.stdout).contains("counters:"),
        "{root:?}"
    );
    let nobody = stats_as(&gw, NOBODY, NOBODY);
    assert!(!nobody.status.success(), "{nobody:?}");
    let stderr = String::from_utf8_lossy(&nobody.stderr);
    assert!(stderr.contains("refused"), "{stderr}");
    assert!(!String::from_utf8_lossy(&nobody.stdout).contains("counters:"));
    agent.stop_ok();

    let agent = Agent::start(
        &gw.router,
        &[common::AGENT_ARGS, &["--stats-group", &NOBODY.to_string()]].concat(),
    );
    let member = stats_as(&gw, NOBODY, NOBODY);
    assert!(
        member.status.success() && String::from_utf8_lossy(&member.stdout).contains("counters:"),
        "{member:?}"
    );
    agent.stop_ok();
}

#[test]
fn a_stats_client_that_never_reads_is_dropped_and_blocks_no_one() {
    require_root();
    let gw = Gateway::new("statsslow").expect("topology");
    // Enough rules for a report larger than a Unix socket's buffer (about 200 KiB), so a
    // client that does not read leaves the agent's write pending.
    let dir = common::TempDir::new("proxy-stats-slow");
    let path = dir.join("rules.toml");
    let mut text = String::from("[defaults]\non_port = 50080\n");
    text.push_str(&common::unused_prefix_rules(4_000, |_| "80".into()));
    std::fs::write(&path, text).expect("rules file");
    let config = path.to_str().expect("utf-8").to_owned();
    let agent = Agent::start(&gw.router, &["run", "--iface", "r0", "--config", &config]);
    // `ip netns exec` runs the agent as its child's image: the pid is the agent's.
    let pid = agent.pid();
    let before = open_fds(pid);
    let silent = gw
        .router
        .run(|| {
            let name = proxy_common::stats_socket_name(proxy_common::DEFAULT_TABLE);
            let addr = UnixAddr::from_abstract_name(name.as_bytes()).expect("address");
            UnixStream::connect_addr(&addr)
        })
        .expect("router namespace")
        .expect("connecting to the stats socket");
    std::thread::sleep(Duration::from_millis(200));
    let held = open_fds(pid);

    let started = Instant::now();
    let second = stats_as(&gw, 0, 0);
    let second_took = started.elapsed();
    let report = String::from_utf8_lossy(&second.stdout);
    assert!(
        second.status.success() && report.contains(" 4000 "),
        "the second client did not get the whole report: {:?}",
        second.status
    );
    assert!(second_took < Duration::from_secs(3), "{second_took:?}");

    // Past the write timeout, the silent client's socket is closed by the agent.
    let deadline = Instant::now() + Duration::from_secs(5);
    while open_fds(pid) > before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = open_fds(pid);
    drop(silent);
    agent.stop_ok();
    assert!(
        held > before,
        "the silent client was not accepted ({before} -> {held})"
    );
    assert_eq!(
        after, before,
        "the agent still holds the silent client's socket after the write timeout"
    );
}
