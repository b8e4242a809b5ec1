//! UDP through the built-in proxy.
//!
//! The classifier hands a new flow's datagrams to the transparent UDP listener; each
//! datagram's original destination comes from `IP_RECVORIGDSTADDR` /
//! `IPV6_RECVORIGDSTADDR`. One session per (client, original destination):
//!
//! * an upstream socket connected to the original destination (with the outbound mark,
//!   and bound to the client's address with `--spoof-source`);
//! * a *reply socket*: transparent, bound to the original destination and connected to the
//!   client, so replies leave with the server's address as their source and the client
//!   (whose socket may be connected) accepts them. Being connected and bound to a specific
//!   address, it is also what the classifier's established lookup finds for the client's
//!   next datagrams (T2), so they reach the session directly.
//!
//! Sessions end after `--udp-idle-timeout` without traffic; at most `--udp-max-sessions`
//! exist at once, and datagrams that would open more are dropped.
//!
//! A session holds no datagram buffer of its own: it waits for readiness, then receives a
//! batch into its thread's scratch and sends it on before it awaits anything else
//! ([`udp_batch`]: recvmmsg/sendmmsg, UDP GRO and GSO). Only a datagram whose send would
//! block, or one queued for a session still being set up, is kept, in a copy of its own
//! size. With two 64 KiB buffers per session, a flood of 1,000 sessions cost 52 MiB that
//! glibc's allocator never gave back; now it costs about 4 KiB a session, returned once
//! they end ([`give_back`]). In the kernel, each of a session's sockets may queue up to
//! 2 MiB of datagrams that wait for the agent: a limit charged only while they wait
//! ([`udp_batch::prepare`]).

use std::{
    collections::HashMap,
    io::{self, IoSliceMut},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    ops::Range,
    os::fd::AsRawFd as _,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use log::{debug, info, warn};
use nix::sys::socket::{self, ControlMessageOwned, MsgFlags, SockaddrStorage, sockopt};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{io::Interest, net::UdpSocket, sync::mpsc};

use crate::{
    access_log,
    metrics::{self, UdpTally},
    tproxy::{
        ListenError, bind_listener, canonical,
        destination::Destinations,
        is_own_listener,
        live::Live,
        return_path::ReturnPath,
        sockopt::transparent_socket,
        udp_batch::{self, Framing, Gso},
    },
    upstream::{Outbound, Upstream, socks5},
};

/// The largest datagram relayed.
const MAX_DATAGRAM: usize = 65_535;
/// Datagrams queued for a session that is still being set up (each a copy of its own
/// size).
const SESSION_QUEUE: usize = 64;

/// The UDP sessions being relayed (see [`Live`]).
pub type LiveSessions = Live<ParkedSession>;

/// A session stopped between two batches (it holds no datagram then), for the next agent
/// to resume: its sockets keep their addresses, so the client and the server see nothing.
pub struct ParkedSession {
    pub client: SocketAddr,
    pub orig_dst: SocketAddr,
    /// How long it has lived.
    pub age: Duration,
    /// What it relayed so far.
    pub tally: UdpTally,
    pub reply: UdpSocket,
    pub upstream: UdpUpstream,
}

/// Settings of the UDP relay.
pub struct UdpOptions {
    pub idle_timeout: Duration,
    pub max_sessions: usize,
    pub outbound: Outbound,
    /// Direct (from the router's or, spoofed, the client's address) or SOCKS5.
    pub upstream: Upstream,
    /// Original destinations never relayed to.
    pub destinations: Arc<Destinations>,
    /// Counts each session by the rules it was accepted under (the return path).
    pub return_path: Arc<ReturnPath>,
    /// The sessions of every UDP listener, by (client, original destination): also the
    /// ones resumed from the previous agent.
    pub sessions: Sessions,
    /// Counted, and parked for a handover.
    pub live: Arc<LiveSessions>,
}

/// Where a session's datagrams go: the original destination itself, or a SOCKS5 relay
/// (UDP ASSOCIATE) with the destination in a header in front of each datagram.
pub enum UdpUpstream {
    Direct(UdpSocket),
    Socks5 {
        /// The association lives as long as this connection.
        control: tokio::net::TcpStream,
        relay: UdpSocket,
        header: Vec<u8>,
    },
}

impl UdpUpstream {
    async fn open(
        client: SocketAddr,
        orig_dst: SocketAddr,
        options: &UdpOptions,
    ) -> io::Result<Self> {
        let mark = Some(options.outbound.mark);
        match &options.upstream {
            Upstream::Direct => Ok(UdpUpstream::Direct(connected_socket(None, orig_dst, mark)?)),
            Upstream::SpoofSource => Ok(UdpUpstream::Direct(connected_socket(
                Some(SocketAddr::new(client.ip(), 0)),
                orig_dst,
                mark,
            )?)),
            Upstream::Socks5(server) => {
                let (control, relay_addr) = tokio::time::timeout(
                    options.outbound.connect_timeout,
                    socks5::udp_associate(server, options.outbound.mark),
                )
                .await
                .map_err(|_| {
                    io::Error::new(io::ErrorKind::TimedOut, "SOCKS5 UDP ASSOCIATE timed out")
                })??;
                let relay = connected_socket(None, relay_addr, mark)?;
                Ok(UdpUpstream::Socks5 {
                    control,
                    relay,
                    header: socks5::udp_header(orig_dst),
                })
            }
        }
    }

    /// What goes in front of each datagram sent upstream: nothing, or the SOCKS5 header.
    fn framing(&self) -> Framing<'_> {
        match self {
            UdpUpstream::Direct(_) => Framing::Plain,
            UdpUpstream::Socks5 { header, .. } => Framing::Prefixed(header),
        }
    }

    fn socket(&self) -> &UdpSocket {
        match self {
            UdpUpstream::Direct(socket) | UdpUpstream::Socks5 { relay: socket, .. } => socket,
        }
    }

    /// Sends one datagram, framed, waiting for room.
    async fn send(&self, payload: &[u8]) -> io::Result<()> {
        match self {
            UdpUpstream::Direct(socket) => socket.send(payload).await.map(drop),
            UdpUpstream::Socks5 { relay, header, .. } => relay
                .send(&[header.as_slice(), payload].concat())
                .await
                .map(drop),
        }
    }

    /// Waits until a reply may be there (a batch receive tells). Fails when the
    /// SOCKS5 server ends the association.
    async fn readable(&self) -> io::Result<()> {
        match self {
            UdpUpstream::Direct(socket) => socket.readable().await,
            UdpUpstream::Socks5 { control, relay, .. } => loop {
                tokio::select! {
                    r = relay.readable() => return r,
                    r = control.readable() => {
                        r?;
                        let mut probe = [0u8; 1];
                        if let Ok(0) = control.try_read(&mut probe) {
                            return Err(io::Error::new(
                                io::ErrorKind::ConnectionAborted,
                                "SOCKS5 server closed the UDP association",
                            ));
                        }
                    }
                }
            },
        }
    }

    /// The part of a datagram from upstream that is the reply: all of it, or what follows
    /// the SOCKS5 header (`None`: a malformed relay datagram, skipped).
    fn reply_payload(&self, datagram: &[u8]) -> Option<Range<usize>> {
        match self {
            UdpUpstream::Direct(_) => Some(0..datagram.len()),
            UdpUpstream::Socks5 { .. } => {
                socks5::udp_payload_offset(datagram).map(|offset| offset..datagram.len())
            }
        }
    }
}

/// Opens the transparent UDP listener at `on_ip:on_port`, or at the wildcard address
/// (dual stack where the namespace has IPv6), with original-destination reporting on.
pub fn listen(on_ip: Option<IpAddr>, on_port: u16) -> Result<std::net::UdpSocket, ListenError> {
    bind_listener(on_ip, on_port, |addr| {
        let fail = |source| ListenError::from_io(addr, source);
        let socket = transparent_socket(&addr, Type::DGRAM, Protocol::UDP).map_err(fail)?;
        // Each datagram's original destination arrives as a control message. A dual-stack
        // socket reports IPv4 datagrams with the IPv4 option, so set both.
        let fd = socket.as_raw_fd();
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        if addr.is_ipv4() || addr.ip().is_unspecified() {
            socket::setsockopt(&fd, sockopt::Ipv4OrigDstAddr, &true).map_err(|e| fail(e.into()))?;
        }
        if addr.is_ipv6() {
            socket::setsockopt(&fd, sockopt::Ipv6OrigDstAddr, &true).map_err(|e| fail(e.into()))?;
        }
        socket.bind(&addr.into()).map_err(fail)?;
        socket.set_nonblocking(true).map_err(fail)?;
        Ok(socket.into())
    })
}

/// One datagram with its sender and original destination.
fn recv_with_orig_dst(fd: i32, buf: &mut [u8]) -> io::Result<(usize, SocketAddr, SocketAddr)> {
    let mut cmsg = nix::cmsg_space!(libc::sockaddr_in6);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = socket::recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())
        .map_err(io::Error::from)?;
    let peer = msg
        .address
        .and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| SocketAddr::V4(SocketAddrV4::from(*v4)))
                .or_else(|| {
                    a.as_sockaddr_in6()
                        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
                })
        })
        .ok_or_else(|| io::Error::other("datagram without a sender address"))?;
    let mut orig_dst = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        match c {
            ControlMessageOwned::Ipv4OrigDstAddr(a) => {
                orig_dst = Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                )));
            }
            ControlMessageOwned::Ipv6OrigDstAddr(a) => {
                orig_dst = Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                    0,
                    a.sin6_scope_id,
                )));
            }
            _ => {}
        }
    }
    let orig_dst =
        orig_dst.ok_or_else(|| io::Error::other("datagram without its original destination"))?;
    Ok((msg.bytes, canonical(peer), canonical(orig_dst)))
}

/// Each session's queue, for the datagrams the listener takes for it.
pub type Sessions = Arc<Mutex<HashMap<(SocketAddr, SocketAddr), mpsc::Sender<Vec<u8>>>>>;

/// Receives on the listener until the task is dropped.
pub async fn serve(listener: UdpSocket, options: Arc<UdpOptions>) {
    let sessions = Arc::clone(&options.sessions);
    let listen_addr = listener.local_addr().ok();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut last_full_log: Option<Instant> = None;
    loop {
        if listener.readable().await.is_err() {
            return;
        }
        let received = listener.try_io(Interest::READABLE, || {
            recv_with_orig_dst(listener.as_raw_fd(), &mut buf)
        });
        let (n, client, orig_dst) = match received {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                debug!("udp receive: {e}");
                continue;
            }
        };
        if is_own_listener(orig_dst, listen_addr) {
            debug!(
                "udp {client} -> {orig_dst}: straight to the proxy port, dropped (it would loop)"
            );
            continue;
        }
        if let Some(why) = options.destinations.refuse(orig_dst.ip()) {
            debug!("udp {client} -> {orig_dst}: dropped, the destination is {why}");
            continue;
        }
        let datagram = buf[..n].to_vec();
        let key = (client, orig_dst);
        let existing = sessions
            .lock()
            .map(|s| s.get(&key).cloned())
            .unwrap_or(None);
        if let Some(tx) = existing {
            // A full queue means the session cannot keep up: drop, as UDP may.
            let _ = tx.try_send(datagram);
            continue;
        }
        let count = sessions.lock().map(|s| s.len()).unwrap_or(usize::MAX);
        if count >= options.max_sessions {
            if last_full_log.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                warn!(
                    "udp {client} -> {orig_dst}: dropped, --udp-max-sessions ({}) reached",
                    options.max_sessions
                );
                last_full_log = Some(Instant::now());
            }
            continue;
        }
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let _ = tx.try_send(datagram);
        if let Ok(mut s) = sessions.lock() {
            s.insert(key, tx);
        }
        let options = Arc::clone(&options);
        let counted = metrics::UdpSession::created();
        let accepted = options.return_path.accepted();
        let guard = Live::enter(&options.live);
        tokio::spawn(async move {
            let started = Instant::now();
            let mut tally = UdpTally::default();
            let result = match open(client, orig_dst, &options).await {
                Ok((upstream, reply)) => {
                    relay(client, orig_dst, upstream, reply, rx, &options, &mut tally).await
                }
                Err(e) => Err(e),
            };
            counted.relayed(&tally);
            drop(counted);
            ended(client, orig_dst, &options, started, tally, result);
            drop(accepted);
            drop(guard);
        });
    }
}

/// The end of a session's task: its closing line, or, parked, its hand-over.
fn ended(
    client: SocketAddr,
    orig_dst: SocketAddr,
    options: &UdpOptions,
    started: Instant,
    tally: UdpTally,
    result: io::Result<SessionEnd>,
) {
    if let Ok(mut s) = options.sessions.lock() {
        s.remove(&(client, orig_dst));
    }
    let result = match result {
        Ok(SessionEnd::Parked { reply, upstream }) => {
            options.live.park_one(ParkedSession {
                client,
                orig_dst,
                age: started.elapsed(),
                tally,
                reply,
                upstream,
            });
            return;
        }
        Ok(SessionEnd::Idle) => Ok(()),
        Err(e) => Err(e),
    };
    closing(client, orig_dst, options, started, &tally, result);
    give_back::session_ended();
}

/// Resumes a session the previous agent parked (`crate::handover`); its sockets must
/// already be registered with this runtime.
pub fn resume(parked: ParkedSession, options: Arc<UdpOptions>) {
    let ParkedSession {
        client,
        orig_dst,
        age,
        tally: so_far,
        reply,
        upstream,
    } = parked;
    let (tx, rx) = mpsc::channel(SESSION_QUEUE);
    if let Ok(mut s) = options.sessions.lock() {
        s.insert((client, orig_dst), tx);
    }
    let counted = metrics::UdpSession::resumed();
    let accepted = options.return_path.accepted();
    let guard = Live::enter(&options.live);
    tokio::spawn(async move {
        let started = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
        let mut tally = so_far;
        let result = relay(client, orig_dst, upstream, reply, rx, &options, &mut tally).await;
        // This agent's metrics count what it relayed itself.
        counted.relayed(&UdpTally {
            datagrams_up: tally.datagrams_up - so_far.datagrams_up,
            datagrams_down: tally.datagrams_down - so_far.datagrams_down,
            bytes_up: tally.bytes_up - so_far.bytes_up,
            bytes_down: tally.bytes_down - so_far.bytes_down,
        });
        drop(counted);
        ended(client, orig_dst, &options, started, tally, result);
        drop(accepted);
        drop(guard);
    });
}

/// Gives the memory of ended sessions back to the system. glibc's allocator keeps what
/// was freed in its per-thread arenas for reuse: after a flood of sessions, memory held for
/// traffic that is gone (4 MiB for 1,000 sessions, measured). A `malloc_trim` runs a second
/// after [`give_back::BURST`] sessions have ended, at most one at a time, so that a steady
/// trickle of short sessions seldom pays for it.
mod give_back {
    use std::{
        sync::atomic::{AtomicBool, AtomicUsize, Ordering},
        time::Duration,
    };

    /// Sessions that must have ended before a trim is worth it.
    pub const BURST: usize = 256;
    /// How long a pending trim waits for more sessions to end.
    const DELAY: Duration = Duration::from_secs(1);

    static ENDED: AtomicUsize = AtomicUsize::new(0);
    static PENDING: AtomicBool = AtomicBool::new(false);

    pub fn session_ended() {
        if ENDED.fetch_add(1, Ordering::Relaxed) + 1 < BURST || PENDING.swap(true, Ordering::AcqRel)
        {
            return;
        }
        tokio::spawn(async {
            tokio::time::sleep(DELAY).await;
            ENDED.store(0, Ordering::Relaxed);
            // Walks every arena: off the runtime's threads.
            let _ = tokio::task::spawn_blocking(trim).await;
            PENDING.store(false, Ordering::Release);
        });
    }

    #[cfg(target_env = "gnu")]
    fn trim() {
        // SAFETY: malloc_trim only returns free memory to the system; it has no
        // preconditions.
        unsafe { libc::malloc_trim(0) };
    }

    #[cfg(not(target_env = "gnu"))]
    fn trim() {}
}

/// A socket connected to `peer`, bound to `local` when given (then transparent: `local` is
/// not one of our addresses).
fn connected_socket(
    local: Option<SocketAddr>,
    peer: SocketAddr,
    mark: Option<u32>,
) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(peer), Type::DGRAM, Some(Protocol::UDP))?;
    if let Some(mark) = mark {
        socket.set_mark(mark)?;
    }
    // Bound to an address that is not ours (the client's, an original destination).
    if local.is_some() {
        super::sockopt::set_transparent(&socket, &peer)?;
    }
    // Several sessions (clients) share an original destination: each has its own reply
    // socket bound to it.
    socket.set_reuse_address(true)?;
    if let Some(local) = local {
        socket.bind(&local.into())?;
    }
    socket.connect(&peer.into())?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket.into())
}

/// The session's closing line, or its access log record.
fn closing(
    client: SocketAddr,
    orig_dst: SocketAddr,
    options: &UdpOptions,
    started: Instant,
    tally: &UdpTally,
    result: io::Result<()>,
) {
    if access_log::json() {
        let (end, detail) = match &result {
            Ok(()) => ("idle", "idle".to_owned()),
            Err(e) => ("error", e.to_string()),
        };
        access_log::Record {
            udp: true,
            client,
            orig_dst,
            upstream: &options.upstream,
            bytes_up: tally.bytes_up,
            bytes_down: tally.bytes_down,
            datagrams: Some((tally.datagrams_up, tally.datagrams_down)),
            duration: started.elapsed(),
            end,
            detail,
        }
        .write();
        return;
    }
    match result {
        Ok(()) => info!(
            "udp {client} -> {orig_dst}: {} datagrams up, {} down, {:.1} s",
            tally.datagrams_up,
            tally.datagrams_down,
            started.elapsed().as_secs_f64()
        ),
        Err(e) => info!("udp {client} -> {orig_dst}: {e}"),
    }
}

/// How a session's relay stopped.
enum SessionEnd {
    /// Idle for `--udp-idle-timeout`.
    Idle,
    /// Parked for the next agent, its sockets handed back.
    Parked {
        reply: UdpSocket,
        upstream: UdpUpstream,
    },
}

/// A new session's sockets: its upstream, and its reply socket.
async fn open(
    client: SocketAddr,
    orig_dst: SocketAddr,
    options: &UdpOptions,
) -> io::Result<(UdpUpstream, UdpSocket)> {
    let upstream = UdpUpstream::open(client, orig_dst, options).await?;
    // The outbound mark on the reply socket too: with `--local` its connect to a local
    // client must not be taken for a local connection to intercept.
    let reply = connected_socket(Some(orig_dst), client, Some(options.outbound.mark))?;
    udp_batch::prepare(&reply);
    udp_batch::prepare(upstream.socket());
    Ok((upstream, reply))
}

/// Relays a session until it is idle for `--udp-idle-timeout`, fails, or is parked (then
/// between two batches: the datagrams the listener queued for it are sent on first).
async fn relay(
    client: SocketAddr,
    orig_dst: SocketAddr,
    upstream: UdpUpstream,
    reply: UdpSocket,
    mut queued: mpsc::Receiver<Vec<u8>>,
    options: &UdpOptions,
    tally: &mut UdpTally,
) -> io::Result<SessionEnd> {
    let (mut gso_up, mut gso_down) = (Gso::new(), Gso::new());
    let up = |tally: &mut UdpTally, n: usize| {
        tally.datagrams_up += 1;
        tally.bytes_up += n as u64;
    };
    let down = |tally: &mut UdpTally, n: usize| {
        tally.datagrams_down += 1;
        tally.bytes_down += n as u64;
    };
    // The idle timer is re-armed lazily: traffic only notes the time, and when the timer
    // fires it either ends the session or moves to the end of the new quiet period (a
    // timer reset per batch would cost a trip through the timer wheel each).
    let mut last_traffic = tokio::time::Instant::now();
    let idle = tokio::time::sleep(options.idle_timeout);
    tokio::pin!(idle);
    loop {
        // Datagrams the listener took before the reply socket existed came first.
        while let Ok(datagram) = queued.try_recv() {
            upstream.send(&datagram).await?;
            up(tally, datagram.len());
        }
        tokio::select! {
            Some(datagram) = queued.recv() => {
                upstream.send(&datagram).await?;
                up(tally, datagram.len());
            }
            r = reply.readable() => {
                r?;
                let blocked = udp_batch::relay(
                    &reply,
                    |datagram| Some(0..datagram.len()),
                    upstream.socket(),
                    upstream.framing(),
                    &mut gso_up,
                    |n| up(tally, n),
                )?;
                for datagram in blocked {
                    upstream.send(&datagram).await?;
                    up(tally, datagram.len());
                }
            }
            r = upstream.readable() => {
                r?;
                let relayed = udp_batch::relay(
                    upstream.socket(),
                    |datagram| upstream.reply_payload(datagram),
                    &reply,
                    Framing::Plain,
                    &mut gso_down,
                    |n| down(tally, n),
                );
                match relayed {
                    Ok(blocked) => {
                        for datagram in blocked {
                            reply.send(&datagram).await?;
                            down(tally, datagram.len());
                        }
                    }
                    // ICMP port unreachable from the server: nothing listens there.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        debug!("udp {client} -> {orig_dst}: refused by the destination");
                    }
                    Err(e) => return Err(e),
                }
            }
            () = options.live.park_flag().raised() => {
                while let Ok(datagram) = queued.try_recv() {
                    upstream.send(&datagram).await?;
                    up(tally, datagram.len());
                }
                return Ok(SessionEnd::Parked { reply, upstream });
            }
            () = &mut idle => {
                let quiet_until = last_traffic + options.idle_timeout;
                if tokio::time::Instant::now() >= quiet_until {
                    return Ok(SessionEnd::Idle);
                }
                idle.as_mut().reset(quiet_until);
                continue;
            }
        }
        last_traffic = tokio::time::Instant::now();
    }
}
