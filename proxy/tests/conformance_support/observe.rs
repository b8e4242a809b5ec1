//! What a run captures and how two runs are compared.
//!
//! The test owns every receiving socket: the ones a case asks for in the router namespace
//! (transparent or not), and a server in the server namespace on the client's destination,
//! so that a forwarded packet is seen there. Each records who received the connection or
//! datagram, with the local address (TCP) or the original destination (UDP,
//! `IP_ORIGDSTADDR`) that socket saw, the peer, and the bytes: a [`Reception`]. The
//! receptions of a client action make a [`Step`], the steps of a run an [`Outcome`], and
//! [`compare`] says how the agent's outcome differs from the kernel's.

use std::{
    fmt,
    io::{self, Read as _},
    mem,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use proxy_testbed::Gateway;
use socket2::{Protocol, Socket, Type};

use super::{
    case::{Case, Fam, Flow, Kind, Proto},
    domain, setsockopt_int,
};

/// How long a UDP run waits for the datagram anywhere.
const UDP_WINDOW: Duration = Duration::from_millis(400);
/// Once something received the datagram, how long to keep looking for a second copy.
const UDP_SETTLE: Duration = Duration::from_millis(50);
/// After a TCP connect succeeded, how long to wait for a socket to accept it.
const TCP_ACCEPT_WINDOW: Duration = Duration::from_secs(2);
/// After a TCP connect failed, how long to look for a connection in an accept queue anyway.
const TCP_FAILED_WINDOW: Duration = Duration::from_millis(100);

/// One socket receiving one connection or datagram.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Reception {
    /// The receiver's label, or "server".
    pub who: String,
    /// TCP: the accepted socket's local address; UDP: the original destination.
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub bytes: usize,
}

/// What one client action led to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// "connected", "timed out", "refused", ... (TCP) or "sent" (UDP).
    pub client: String,
    pub got: Vec<Reception>,
    /// TcpReconnect, first step: whether the receiver's side was in TIME_WAIT afterwards.
    pub time_wait: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub steps: Vec<Step>,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client {}; ", self.client)?;
        if self.got.is_empty() {
            write!(f, "nobody got it")?;
        }
        for (i, r) in self.got.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(
                f,
                "{} got {}B local={} peer={}",
                r.who, r.bytes, r.local, r.peer
            )?;
        }
        if let Some(tw) = self.time_wait {
            write!(f, "; time-wait={tw}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.steps.iter().enumerate() {
            if i > 0 {
                write!(f, " | ")?;
            }
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

/// Everything wrong with a case's two outcomes: the kernel's (the oracle) must be what the
/// case expects of it, and the agent's must equal it, or differ exactly as the case
/// declares.
pub(super) fn compare(case: &Case, kernel: &Outcome, agent: &Outcome) -> Vec<String> {
    let mut problems = Vec::new();
    // The oracle first: the kernel must do what the case is about.
    if kernel.steps.len() != case.kernel.len() {
        problems.push(format!(
            "the kernel run had {} steps, the case expects {}",
            kernel.steps.len(),
            case.kernel.len()
        ));
    }
    for (step, kind) in kernel.steps.iter().zip(&case.kernel) {
        if let Err(e) = check_kind(case, step, *kind) {
            problems.push(format!("kernel (the oracle) is not {kind:?}: {e}"));
        }
    }
    if case.flow == Flow::TcpReconnect
        && kernel.steps.first().and_then(|s| s.time_wait) != Some(true)
    {
        problems.push(
            "no TIME_WAIT socket on the router after the first connection: the case proves nothing"
                .to_owned(),
        );
    }
    match &case.difference {
        None => {
            if agent != kernel {
                problems.push(format!(
                    "the agent differs from the kernel:\n  kernel: {kernel}\n  agent:  {agent}"
                ));
            }
        }
        Some(diff) => {
            if agent.steps.len() != case.kernel.len() {
                problems.push(format!("the agent run had {} steps", agent.steps.len()));
            }
            for step in &agent.steps {
                if let Err(e) = check_kind(case, step, diff.agent) {
                    problems.push(format!(
                        "declared difference ({}) not seen, agent is not {:?}: {e}",
                        diff.why, diff.agent
                    ));
                }
            }
        }
    }
    problems
}

/// Checks `step` against an expected kind; `Err` says how it differs.
fn check_kind(case: &Case, step: &Step, kind: Kind) -> Result<(), String> {
    let dst = case.dst_addr();
    let client = case.client_addr();
    let single = |who: &str| -> Result<(), String> {
        match step.got.as_slice() {
            [r] if r.who == who
                && r.local == dst
                && r.peer == client
                && r.bytes == case.payload =>
            {
                Ok(())
            }
            _ => Err(format!(
                "expected only {who} to get {}B with local={dst} peer={client}; got: {step}",
                case.payload
            )),
        }
    };
    match kind {
        Kind::Delivered(label) => single(label),
        Kind::Forwarded => single("server"),
        Kind::Dropped => {
            if !step.got.is_empty() {
                return Err(format!("expected nobody to get it; got: {step}"));
            }
            if case.proto == Proto::Tcp && step.client != "timed out" {
                return Err(format!("expected the TCP client to time out; got: {step}"));
            }
            Ok(())
        }
    }
}

/// A receiving socket (router receivers and the server), created inside its namespace.
pub(super) struct Receiver {
    who: String,
    socket: Socket,
}

/// Opens a receiving socket; must run on a thread inside the wanted namespace.
fn open_receiver(
    proto: Proto,
    fam: Fam,
    addr: SocketAddr,
    transparent: bool,
    connect_to: Option<SocketAddr>,
) -> io::Result<Socket> {
    let (ty, protocol) = match proto {
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
        Proto::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let socket = Socket::new(domain(fam), ty, Some(protocol))?;
    if transparent {
        match fam {
            Fam::V4 => socket.set_ip_transparent_v4(true)?,
            Fam::V6 => socket.set_ip_transparent_v6(true)?,
        }
    }
    if fam == Fam::V6 {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    if proto == Proto::Udp {
        match fam {
            Fam::V4 => setsockopt_int(&socket, libc::SOL_IP, libc::IP_RECVORIGDSTADDR, 1),
            Fam::V6 => setsockopt_int(&socket, libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR, 1),
        }
    }
    socket.bind(&addr.into())?;
    match proto {
        Proto::Tcp => socket.listen(16)?,
        Proto::Udp => {
            if let Some(peer) = connect_to {
                socket.connect(&peer.into())?;
            }
        }
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

pub(super) fn open_router_receivers(gw: &Gateway, case: &Case) -> Vec<Receiver> {
    let client = case.client_addr();
    gw.router
        .run(|| {
            case.receivers
                .iter()
                .map(|r| {
                    let addr = SocketAddr::new(r.at.ip(case.fam), r.port);
                    let connect_to = r.connected_to_client.then_some(client);
                    let socket =
                        open_receiver(case.proto, case.fam, addr, r.transparent, connect_to)
                            .unwrap_or_else(|e| {
                                panic!("{}: opening receiver {} on {addr}: {e}", case.name, r.label)
                            });
                    Receiver {
                        who: r.label.to_owned(),
                        socket,
                    }
                })
                .collect()
        })
        .expect("entering the router namespace")
}

pub(super) fn open_server(gw: &Gateway, case: &Case) -> Receiver {
    let addr = case.dst_addr();
    let socket = gw
        .server
        .run(|| open_receiver(case.proto, case.fam, addr, false, None))
        .expect("entering the server namespace")
        .unwrap_or_else(|e| panic!("{}: opening the server on {addr}: {e}", case.name));
    Receiver {
        who: "server".to_owned(),
        socket,
    }
}

/// Reads one UDP datagram with its original destination (`IP_ORIGDSTADDR` /
/// `IPV6_ORIGDSTADDR`), without blocking.
fn recv_udp(socket: &Socket) -> io::Result<Option<(usize, SocketAddr, Option<SocketAddr>)>> {
    let mut buf = vec![0u8; 65536];
    // SAFETY: all-zero sockaddr_storage and msghdr are valid values.
    let mut name: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut control = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: see above.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = (&raw mut name).cast();
    msg.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(&control) as _;
    // SAFETY: every pointer in `msg` refers to a live buffer of the stated length.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(e);
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(io::Error::other("datagram truncated"));
    }
    // SAFETY: the kernel filled `name` with a socket address of its family.
    let peer = unsafe { sockaddr_to_std((&raw const name).cast()) }
        .ok_or_else(|| io::Error::other("datagram without a source address"))?;
    let mut orig = None;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled in.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            let (level, ty) = ((*cmsg).cmsg_level, (*cmsg).cmsg_type);
            if (level == libc::SOL_IP && ty == libc::IP_ORIGDSTADDR)
                || (level == libc::SOL_IPV6 && ty == libc::IPV6_ORIGDSTADDR)
            {
                orig = sockaddr_to_std(libc::CMSG_DATA(cmsg).cast());
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Ok(Some((n as usize, peer, orig)))
}

/// Converts a `sockaddr_in` / `sockaddr_in6` (possibly unaligned) to a `SocketAddr`.
///
/// # Safety
/// `ptr` must point to a socket address whose length fits its family.
unsafe fn sockaddr_to_std(ptr: *const libc::sockaddr) -> Option<SocketAddr> {
    // SAFETY: the caller guarantees the address is readable for its family's length.
    unsafe {
        let family = std::ptr::read_unaligned(&raw const (*ptr).sa_family);
        match i32::from(family) {
            libc::AF_INET => {
                let sin: libc::sockaddr_in = std::ptr::read_unaligned(ptr.cast());
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                let sin6: libc::sockaddr_in6 = std::ptr::read_unaligned(ptr.cast());
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// Reads from an accepted connection until `want` bytes came or the deadline passed.
fn read_payload(stream: &mut TcpStream, want: usize, deadline: Instant) -> usize {
    let mut got = 0;
    let mut buf = [0u8; 1024];
    while got < want {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got
}

/// Watches every receiver until the step's outcome is known (bounded). Returns what each
/// socket got and, for TCP, the accepted connections (still open).
pub(super) fn observe(
    case: &Case,
    receivers: &[Receiver],
    client_connected: bool,
) -> (Vec<Reception>, Vec<TcpStream>) {
    let mut got = Vec::new();
    let mut streams = Vec::new();
    let window = match (case.proto, client_connected) {
        (Proto::Tcp, true) => TCP_ACCEPT_WINDOW,
        (Proto::Tcp, false) => TCP_FAILED_WINDOW,
        (Proto::Udp, _) => UDP_WINDOW,
    };
    let mut deadline = Instant::now() + window;
    while Instant::now() < deadline {
        for r in receivers {
            match case.proto {
                Proto::Tcp => {
                    if let Ok((socket, _)) = r.socket.accept() {
                        let mut stream: TcpStream = socket.into();
                        let _ = stream.set_nonblocking(false);
                        let bytes = read_payload(
                            &mut stream,
                            case.payload,
                            Instant::now() + Duration::from_secs(2),
                        );
                        let local = stream.local_addr().expect("accepted socket's address");
                        let peer = stream.peer_addr().expect("accepted socket's peer");
                        got.push(Reception {
                            who: r.who.clone(),
                            local,
                            peer,
                            bytes,
                        });
                        streams.push(stream);
                    }
                }
                Proto::Udp => match recv_udp(&r.socket) {
                    Ok(Some((bytes, peer, orig))) => {
                        let local = orig
                            .or_else(|| r.socket.local_addr().ok().and_then(|a| a.as_socket()))
                            .expect("receiver address");
                        got.push(Reception {
                            who: r.who.clone(),
                            local,
                            peer,
                            bytes,
                        });
                        deadline = deadline.min(Instant::now() + UDP_SETTLE);
                    }
                    Ok(None) => {}
                    Err(e) => panic!("{}: receiving on {}: {e}", case.name, r.who),
                },
            }
        }
        // A TCP connection lands in one place only: once it did, the step is known.
        if case.proto == Proto::Tcp && !got.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    got.sort();
    (got, streams)
}
