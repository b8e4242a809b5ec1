//! UDP in trains: datagrams that a sender coalesced with `UDP_SEGMENT` (as QUIC stacks
//! send) go through the proxy and back, each datagram intact and in order, the last of each
//! train shorter than the others; directly, over an L3 (tun) client link, over an upstream
//! path whose MTU is below the datagrams' size (where the kernel refuses to send a train),
//! and through a SOCKS5 upstream, where each datagram needs a header of its own. Directly,
//! a train stays one packet all the way: the proxy takes it whole (`UDP_GRO`) and sends it
//! on whole (`UDP_SEGMENT`), both ways. Real kernel, namespaces of their own, removed on
//! drop.

mod common;

use std::{
    io::{self, IoSlice, IoSliceMut},
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Agent, Dante, UDP_AGENT_ARGS, require_root, server};
use nix::sys::socket::{
    self, ControlMessage, ControlMessageOwned, MsgFlags, SockaddrStorage, sockopt,
};
use proxy_testbed::{ClientLink, Gateway};

/// Size of the datagrams of a train, but the last.
const SEGMENT: usize = 1200;
/// Full-size datagrams in a train, then one of [`TAIL`] bytes.
const FULL: usize = 10;
const TAIL: usize = 500;
const TRAIN_BYTES: usize = FULL * SEGMENT + TAIL;
const TRAINS: u16 = 20;

/// One received message: its length, and the size of its datagrams when the kernel
/// handed over a train (`UDP_GRO`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Message {
    len: usize,
    segment: Option<usize>,
}

/// Datagram `index` of train `train`: numbered, and filled with a pattern of both.
fn datagram(train: u16, index: usize) -> Vec<u8> {
    let len = if index < FULL { SEGMENT } else { TAIL };
    let [hi, lo] = train.to_be_bytes();
    let seed = usize::from(train) * 131 + index * 17;
    (0..len)
        .map(|i| match i {
            0 => hi,
            1 => lo,
            2 => index as u8,
            _ => (i.wrapping_mul(31).wrapping_add(seed) % 251) as u8,
        })
        .collect()
}

fn train(train: u16) -> Vec<u8> {
    (0..=FULL).flat_map(|i| datagram(train, i)).collect()
}

/// Asks for GRO trains on `socket`.
fn enable_gro(socket: &UdpSocket) {
    socket::setsockopt(socket, sockopt::UdpGroSegment, &true).expect("UDP_GRO");
}

/// Sends `payload` as datagrams of `segment` bytes (the last shorter): in one call, or
/// one datagram at a time where the kernel refuses the train on this path (`EIO`: no
/// checksum offload; `EMSGSIZE`: a segment larger than the path MTU).
fn send_train(
    socket: &UdpSocket,
    payload: &[u8],
    segment: usize,
    to: Option<SocketAddr>,
) -> io::Result<()> {
    let size = u16::try_from(segment).expect("segment size");
    let dest = to.map(SockaddrStorage::from);
    let train = socket::sendmsg(
        socket.as_raw_fd(),
        &[IoSlice::new(payload)],
        &[ControlMessage::UdpGsoSegments(&size)],
        MsgFlags::empty(),
        dest.as_ref(),
    );
    match train {
        Ok(_) => Ok(()),
        Err(nix::errno::Errno::EIO | nix::errno::Errno::EMSGSIZE) => {
            payload.chunks(segment).try_for_each(|datagram| match to {
                Some(to) => socket.send_to(datagram, to).map(drop),
                None => socket.send(datagram).map(drop),
            })
        }
        Err(e) => Err(e.into()),
    }
}

/// One message (a datagram, or a train of them) and its sender.
fn recv_message(socket: &UdpSocket, buf: &mut [u8]) -> io::Result<(Message, SocketAddr)> {
    let mut cmsg = nix::cmsg_space!(libc::c_int);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<SockaddrStorage>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )?;
    let mut segment = None;
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::UdpGroSegments(size) = c {
            segment = usize::try_from(size).ok();
        }
    }
    let peer = msg
        .address
        .and_then(|a| a.as_sockaddr_in().map(|v4| SocketAddr::from(*v4)))
        .ok_or_else(|| io::Error::other("no IPv4 sender"))?;
    Ok((
        Message {
            len: msg.bytes,
            segment,
        },
        peer,
    ))
}

/// The server: echoes each message as it came, a train as a train, until `stop`; returns
/// the messages it got.
fn echo_trains(stop: &AtomicBool) -> Vec<Message> {
    let socket = UdpSocket::bind("0.0.0.0:53").expect("bind :53");
    enable_gro(&socket);
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let mut buf = vec![0u8; 65_536];
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let Ok((message, peer)) = recv_message(&socket, &mut buf) else {
            continue;
        };
        got.push(message);
        let payload = &buf[..message.len];
        let _ = match message.segment {
            Some(segment) if message.len > segment => {
                send_train(&socket, payload, segment, Some(peer))
            }
            _ => socket.send_to(payload, peer).map(drop),
        };
    }
    got
}

/// The client: opens the session with one datagram, then sends the trains one at a time,
/// each once the previous one is back. Checks every datagram that comes back against the
/// one sent; returns the messages the trains came back in.
fn send_trains() -> Result<Vec<Message>, String> {
    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    socket.connect(server(53)).map_err(|e| e.to_string())?;
    enable_gro(&socket);
    socket
        .set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; 65_536];
    // The first datagram goes to the agent's listener, which opens the session; the
    // trains then reach the session's reply socket directly.
    socket.send(b"hello").map_err(|e| e.to_string())?;
    let (hello, _) = recv_message(&socket, &mut buf).map_err(|e| format!("no hello: {e}"))?;
    if &buf[..hello.len] != b"hello" {
        return Err(format!("hello came back as {:?}", &buf[..hello.len]));
    }
    let mut messages = Vec::new();
    for t in 0..TRAINS {
        send_train(&socket, &train(t), SEGMENT, None)
            .or_else(|e| match e.raw_os_error() {
                // A device without checksum offload (the tun link) takes no GSO packet
                // (udp_send_skb): one datagram at a time there.
                Some(libc::EIO) => {
                    (0..=FULL).try_for_each(|i| socket.send(&datagram(t, i)).map(drop))
                }
                _ => Err(e),
            })
            .map_err(|e| format!("train {t}: {e}"))?;
        let mut index = 0;
        while index <= FULL {
            let (message, _) = recv_message(&socket, &mut buf)
                .map_err(|e| format!("train {t}: {index} datagrams back, then {e}"))?;
            messages.push(message);
            let step = message.segment.unwrap_or(message.len).max(1);
            for chunk in buf[..message.len].chunks(step) {
                if chunk != datagram(t, index).as_slice() {
                    return Err(format!(
                        "train {t}: datagram {index} came back as {} bytes starting {:?}",
                        chunk.len(),
                        &chunk[..chunk.len().min(3)]
                    ));
                }
                index += 1;
            }
        }
    }
    Ok(messages)
}

/// How the trains travel.
struct Path {
    /// Names the namespaces.
    tag: &'static str,
    link: ClientLink,
    /// Through Dante instead of directly.
    socks5: bool,
    /// The MTU of the router-server link, when not the default 1,500.
    upstream_mtu: Option<&'static str>,
}

/// Runs the trains along `path`; returns the messages the server got and those the client
/// got back.
fn trains_through(path: Path) -> (Vec<Message>, Vec<Message>) {
    require_root();
    let gw = Gateway::with_client_link(path.tag, path.link).expect("topology");
    if let Some(mtu) = path.upstream_mtu {
        gw.router
            .ip(&["link", "set", "r1", "mtu", mtu])
            .expect("router mtu");
        gw.server
            .ip(&["link", "set", "s0", "mtu", mtu])
            .expect("server mtu");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let echo_stop = Arc::clone(&stop);
    let echo = gw.server.spawn(move || echo_trains(&echo_stop));
    let dante = path.socks5.then(|| Dante::start(&gw.router, path.tag));
    let mut args = UDP_AGENT_ARGS.to_vec();
    if path.socks5 {
        args.extend(["--upstream", "socks5://127.0.0.1:1081"]);
    }
    let agent = Agent::start(&gw.router, &args);
    let client = gw.client.run(send_trains).expect("netns");
    stop.store(true, Ordering::Relaxed);
    let at_server = echo
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
        .expect("entering the namespace");
    let log = agent.stop_ok();
    drop(dante);
    let at_client = client.unwrap_or_else(|e| panic!("{e}\nserver got {at_server:?}\n{log}"));
    (at_server, at_client)
}

/// Each train, as the other side gets it when it stays one packet.
const WHOLE: Message = Message {
    len: TRAIN_BYTES,
    segment: Some(SEGMENT),
};

/// Datagrams in `messages`, trains counted by their segments.
fn datagrams(messages: &[Message]) -> usize {
    messages
        .iter()
        .map(|m| m.segment.map_or(1, |s| m.len.div_ceil(s)))
        .sum()
}

#[test]
fn udp_trains_pass_through_whole_and_in_order() {
    let (at_server, at_client) = trains_through(Path {
        tag: "udptrain",
        link: ClientLink::Veth,
        socks5: false,
        upstream_mtu: None,
    });
    // The hello, then each train as one message: the proxy sent it on as one.
    assert_eq!(at_server.len(), 1 + usize::from(TRAINS), "{at_server:?}");
    assert!(at_server[1..].iter().all(|m| *m == WHOLE), "{at_server:?}");
    // And the echoes came back the same way.
    assert!(at_client.iter().all(|m| *m == WHOLE), "{at_client:?}");
}

#[test]
fn udp_trains_pass_through_intact_over_an_l3_client_link() {
    // Two tun devices and a packet pump: the trains cross as whatever the tun devices
    // make of them, and every datagram still arrives, in order.
    trains_through(Path {
        tag: "udptraintun",
        link: ClientLink::Tun,
        socks5: false,
        upstream_mtu: None,
    });
}

#[test]
fn udp_trains_go_one_datagram_at_a_time_where_the_path_mtu_is_smaller() {
    // 1,200-byte segments on a 1,000-byte path: udp_send_skb refuses the proxy's trains
    // (EMSGSIZE), so it sends the same datagrams one by one (fragmented on the way).
    let (at_server, _) = trains_through(Path {
        tag: "udptrainmtu",
        link: ClientLink::Veth,
        socks5: false,
        upstream_mtu: Some("1000"),
    });
    assert_eq!(
        datagrams(&at_server),
        1 + usize::from(TRAINS) * (FULL + 1),
        "{at_server:?}"
    );
    assert!(
        at_server.iter().all(|m| m.segment.is_none()),
        "{at_server:?}"
    );
}

#[test]
fn udp_trains_through_a_socks5_upstream_keep_one_header_per_datagram() {
    let (at_server, _) = trains_through(Path {
        tag: "udptrainsocks",
        link: ClientLink::Veth,
        socks5: true,
        upstream_mtu: None,
    });
    // Dante relays each datagram on its own: each one reached it with its own header.
    assert_eq!(
        datagrams(&at_server),
        1 + usize::from(TRAINS) * (FULL + 1),
        "{at_server:?}"
    );
}
