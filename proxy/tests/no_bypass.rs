//! The interception guarantee, end to end: traffic a rule matches goes through the proxy or
//! is dropped, whatever its shape (fragments) or the ingress interface's kind (no
//! link-layer header).

mod common;

use std::{
    mem::MaybeUninit,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use proxy_testbed::{self as testbed, ClientLink, Gateway};
use socket2::{Domain, Protocol, Socket, Type};

use common::{
    AGENT_ARGS, Agent, Server, ServerMode, counter, exchange_from_client, require_root, server,
};

/// `ETH_P_ALL`, for a packet socket that sees every frame.
const ETH_P_ALL: u16 = 0x0003;
const IPPROTO_RAW: i32 = 255;
/// Identifications of the two fragmented datagrams: one to the intercepted port, one (the
/// control that shows the capture works) to a port no rule covers.
const ID_INTERCEPTED: u16 = 0x4101;
const ID_CONTROL: u16 = 0x4102;
/// IPv6 only: a datagram whose first fragment ends inside an extension header, so that its
/// TCP header (ports included) is in the second fragment.
const ID_CHAIN: u16 = 0x4103;

/// A TCP segment (20-byte header, SYN|ACK|PSH so that no flag logic is involved) to `dport`
/// with `data`. The checksum is left 0: what matters is which frames reach the server's
/// link, not whether its TCP accepts them.
fn segment(dport: u16, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&40_321u16.to_be_bytes());
    out.extend_from_slice(&dport.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0]);
    out.extend_from_slice(data);
    out
}

/// The two IPv4 fragments of `segment`: the first carries only its first 8 bytes (ports and
/// sequence number, no flags: RFC 1858's tiny fragment), the second the rest.
fn fragments_v4(id: u16, dport: u16) -> [Vec<u8>; 2] {
    let tcp = segment(dport, b"must not reach the origin");
    let header = |offset_units: u16, more: bool, payload: &[u8]| {
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        ip.extend_from_slice(&id.to_be_bytes());
        ip.extend_from_slice(&(offset_units | if more { 0x2000 } else { 0 }).to_be_bytes());
        ip.extend_from_slice(&[64, 6, 0, 0]);
        ip.extend_from_slice(&testbed::CLIENT_V4.octets());
        ip.extend_from_slice(&testbed::SERVER_V4.octets());
        ip.extend_from_slice(payload);
        ip
    };
    [header(0, true, &tcp[..8]), header(1, false, &tcp[8..])]
}

/// An IPv6 packet from the client to the server holding a fragment header (identification
/// `id`, offset in 8-byte units, M flag, upper header `next`) and `payload`.
fn fragment_v6(id: u16, next: u8, (offset_units, more): (u16, bool), payload: &[u8]) -> Vec<u8> {
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[44, 64]);
    ip.extend_from_slice(&testbed::CLIENT_V6.octets());
    ip.extend_from_slice(&testbed::SERVER_V6.octets());
    ip.extend_from_slice(&[next, 0]);
    ip.extend_from_slice(&((offset_units << 3) | u16::from(more)).to_be_bytes());
    ip.extend_from_slice(&u32::from(id).to_be_bytes());
    ip.extend_from_slice(payload);
    ip
}

/// The two IPv6 fragments of `segment`, split the same way.
fn fragments_v6(id: u16, dport: u16) -> [Vec<u8>; 2] {
    let tcp = segment(dport, b"must not reach the origin");
    [
        fragment_v6(id, 6, (0, true), &tcp[..8]),
        fragment_v6(id, 6, (1, false), &tcp[8..]),
    ]
}

/// The two IPv6 fragments of a segment to port 80 behind a 16-byte destination options
/// header: the first fragment holds only its first 8 bytes, so no port can be read.
fn fragments_v6_chain(id: u16) -> [Vec<u8>; 2] {
    let mut chain = vec![6, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    chain.extend(segment(80, b"must not reach the origin"));
    [
        fragment_v6(id, 60, (0, true), &chain[..8]),
        fragment_v6(id, 60, (1, false), &chain[8..]),
    ]
}

/// Sends ready-made IP packets (headers included) from the client namespace.
fn send_raw(gw: &Gateway, v6: bool, packets: &[Vec<u8>]) {
    gw.client
        .run(|| {
            let (domain, dst) = if v6 {
                (Domain::IPV6, SocketAddr::new(testbed::SERVER_V6.into(), 0))
            } else {
                (Domain::IPV4, SocketAddr::new(testbed::SERVER_V4.into(), 0))
            };
            // IPPROTO_RAW implies IP_HDRINCL / IPV6_HDRINCL: the packet is sent as built.
            let socket = Socket::new(domain, Type::RAW, Some(Protocol::from(IPPROTO_RAW)))
                .expect("raw socket (root?)");
            for packet in packets {
                socket
                    .send_to(packet, &dst.into())
                    .expect("sending a fragment");
            }
        })
        .expect("entering the client namespace");
}

/// Records, per fragment identification, the frames from the client to the server that
/// reach the server namespace's link (before any reassembly), until dropped.
struct Capture {
    stop: Arc<AtomicBool>,
    ids: Arc<Mutex<Vec<u32>>>,
    thread: Option<std::thread::JoinHandle<Result<(), testbed::TestbedError>>>,
}

impl Capture {
    fn start(gw: &Gateway) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        let ids = Arc::new(Mutex::new(Vec::new()));
        let (flag, seen) = (Arc::clone(&stop), Arc::clone(&ids));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = gw.server.spawn(move || {
            let socket = Socket::new(
                Domain::PACKET,
                Type::RAW,
                Some(Protocol::from(i32::from(ETH_P_ALL.to_be()))),
            )
            .expect("packet socket");
            socket
                .set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
            ready_tx.send(()).expect("ready");
            let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
            let deadline = Instant::now() + Duration::from_secs(30);
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                let Ok(len) = socket.recv(&mut buf) else {
                    continue;
                };
                // SAFETY: recv initialised the first `len` bytes.
                let frame: Vec<u8> = buf[..len]
                    .iter()
                    .map(|b| unsafe { b.assume_init() })
                    .collect();
                if let Some(id) = fragment_id(&frame) {
                    seen.lock().expect("lock").push(id);
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("capture did not start");
        Capture {
            stop,
            ids,
            thread: Some(thread),
        }
    }

    /// Waits (up to 5 s) until `last` has been seen `count` times, as the last datagram
    /// sent; then a moment more for anything behind it, and returns the identifications.
    fn finish(mut self, last: u16, count: usize) -> Vec<u32> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let seen = self.ids.lock().expect("lock");
            if seen.iter().filter(|&&i| i == u32::from(last)).count() >= count {
                break;
            }
            drop(seen);
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(300));
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .take()
            .expect("running")
            .join()
            .expect("capture thread")
            .expect("entering the server namespace");
        self.ids.lock().expect("lock").clone()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The identification of a client-to-server frame (Ethernet, then IPv4 or IPv6 with a
/// fragment header first), or `None` for any other frame.
fn fragment_id(frame: &[u8]) -> Option<u32> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    match ethertype {
        0x0800 if ip.len() >= 20 => (ip[12..16] == testbed::CLIENT_V4.octets()
            && ip[16..20] == testbed::SERVER_V4.octets())
        .then(|| u32::from(u16::from_be_bytes([ip[4], ip[5]]))),
        0x86dd if ip.len() >= 48 && ip[6] == 44 => (ip[8..24] == testbed::CLIENT_V6.octets()
            && ip[24..40] == testbed::SERVER_V6.octets())
        .then(|| u32::from_be_bytes([ip[44], ip[45], ip[46], ip[47]])),
        _ => None,
    }
}

#[test]
fn a_fragmenting_client_gets_no_byte_to_the_origin_on_an_intercepted_port() {
    require_root();
    let gw = Gateway::new("frag").expect("topology");
    let agent = Agent::start(&gw.router, AGENT_ARGS);
    let mut seen = Vec::new();
    for v6 in [false, true] {
        let fragments = |id, port| {
            if v6 {
                fragments_v6(id, port)
            } else {
                fragments_v4(id, port)
            }
        };
        let capture = Capture::start(&gw);
        send_raw(&gw, v6, &fragments(ID_INTERCEPTED, 80));
        if v6 {
            send_raw(&gw, v6, &fragments_v6_chain(ID_CHAIN));
        }
        // The control goes last: once its two fragments are in, whatever was sent before
        // them on the same path has had its chance.
        send_raw(&gw, v6, &fragments(ID_CONTROL, 8080));
        let ids = capture.finish(ID_CONTROL, 2);
        let count = |id: u16| ids.iter().filter(|&&i| i == u32::from(id)).count();
        seen.push((
            v6,
            count(ID_INTERCEPTED) + count(ID_CHAIN),
            count(ID_CONTROL),
        ));
    }
    let log = agent.stop_ok();
    for (v6, intercepted, control) in &seen {
        let family = if *v6 { "IPv6" } else { "IPv4" };
        assert_eq!(
            *control, 2,
            "{family}: both fragments to port 8080 (no rule) must reach the server: the \
             capture sees nothing otherwise"
        );
        assert_eq!(
            *intercepted, 0,
            "{family}: {intercepted} fragment(s) to port 80 went past the proxy to the origin"
        );
    }
    // The tiny first fragments (IPv4, IPv6) matched by their ports, the IPv6 one without
    // ports dropped as unclassifiable, and the three later fragments after them.
    assert_eq!(counter(&log, "fragment"), 2, "{log}");
    assert_eq!(counter(&log, "dropped_unclassifiable"), 1, "{log}");
    assert_eq!(counter(&log, "dropped_later_fragment"), 3, "{log}");
}

/// TCP over IPv4 and IPv6, and a port no rule covers, through a gateway whose client side
/// is `link`: what the server saw as the peer of each exchange.
fn peers_through(link: ClientLink) -> Vec<String> {
    let gw = Gateway::with_client_link("l3", link).expect("topology");
    let _server80 = Server::start(&gw.server, server(80), ServerMode::Reply);
    let _server80v6 = Server::start(
        &gw.server,
        SocketAddr::new(IpAddr::V6(testbed::SERVER_V6), 80),
        ServerMode::Reply,
    );
    let _server81 = Server::start(&gw.server, server(81), ServerMode::Reply);
    let agent = Agent::start(&gw.router, AGENT_ARGS);
    let peer = |addr: SocketAddr| {
        let reply = exchange_from_client(&gw, addr, b"hello");
        reply
            .split_whitespace()
            .next()
            .and_then(|p| p.strip_prefix("peer="))
            .and_then(|p| p.parse::<SocketAddr>().ok())
            .map(|p| p.ip().to_string())
            .unwrap_or_else(|| panic!("unexpected reply {reply:?}"))
    };
    let peers = vec![
        peer(server(80)),
        peer(SocketAddr::new(IpAddr::V6(testbed::SERVER_V6), 80)),
        peer(server(81)),
    ];
    let log = agent.stop_ok();
    assert!(
        log.contains(match link {
            ClientLink::Veth => "classifier tproxy_ingress attached to r0",
            ClientLink::Tun => "classifier tproxy_ingress_l3 attached to r0",
        }),
        "{log}"
    );
    peers
}

#[test]
fn interception_over_a_tun_link_equals_interception_over_veth() {
    require_root();
    let expected = vec![
        // Proxied: the server sees the router's address.
        testbed::ROUTER_SERVER_SIDE_V4.to_string(),
        testbed::ROUTER_SERVER_SIDE_V6.to_string(),
        // Not intercepted: the client's own address.
        testbed::CLIENT_V4.to_string(),
    ];
    assert_eq!(peers_through(ClientLink::Veth), expected, "over veth");
    assert_eq!(peers_through(ClientLink::Tun), expected, "over tun");
}

/// A VPN interface torn down and set up again (`wg-quick down/up`, a tailscaled restart)
/// is a new interface under the old name: the classifier of the old one went with it.
fn interface_made_again_is_intercepted_again(attach: &str) {
    require_root();
    let gw = Gateway::new(&format!("relink-{attach}")).expect("topology");
    let _server = Server::start(&gw.server, server(80), ServerMode::Reply);
    let agent = Agent::start(&gw.router, &[AGENT_ARGS, &["--tc-attach", attach]].concat());
    let proxied = format!("peer={}:", testbed::ROUTER_SERVER_SIDE_V4);
    let reply = exchange_from_client(&gw, server(80), b"before");
    assert!(reply.starts_with(&proxied), "{reply}");

    gw.relink_client().expect("making r0 and c0 again");
    let line = agent.wait_for_line(&["r0 exists again"], Duration::from_secs(5));
    assert!(
        line.as_ref().is_some_and(|l| l.contains("attached again")),
        "no re-attach: {line:?}\n{}",
        agent.log_text()
    );
    assert!(agent.log_contains("r0 was deleted"), "{}", agent.log_text());
    let reply = exchange_from_client(&gw, server(80), b"after");
    assert!(
        reply.starts_with(&proxied),
        "after r0 was made again the connection went past the proxy: {reply}"
    );
    agent.stop_ok();
}

#[test]
fn an_interface_deleted_and_made_again_is_intercepted_again_tcx() {
    if common::kernel::kernel_lacks(common::kernel::Feature::Tcx) {
        return;
    }
    interface_made_again_is_intercepted_again("tcx");
}

#[test]
fn an_interface_deleted_and_made_again_is_intercepted_again_netlink() {
    interface_made_again_is_intercepted_again("netlink");
}
