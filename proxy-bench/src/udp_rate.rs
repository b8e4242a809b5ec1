//! UDP datagram rate: a client that sends 1,200-byte datagrams as fast as it can for a
//! bounded time, from one or more connected sockets (`sendmmsg`, so that the sender is not
//! what limits the rate), and the server's sink that counts what arrives (`recvmmsg`).
//! Received / sent gives the loss.
//!
//! The sink counts datagrams whose first byte is [`COUNTED`] and echoes every other one (the
//! UDP sessions figure needs its echoes). The client reads the count before and after a run
//! over TCP, from the server's port 81, which no set-up proxies.

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    os::fd::AsRawFd as _,
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use nix::sys::socket::{setsockopt, sockopt};
use proxy_testbed::SERVER_V4;

use crate::{
    load::{self, OTHER_PORT},
    stopped,
};

/// The first byte of a datagram the sink counts rather than echoes.
pub const COUNTED: u8 = b'C';
/// The TCP request (first byte) that the server answers with its count (8 bytes, LE).
pub const COUNT_REQUEST: u8 = b'U';
/// UDP payload of each datagram: a typical QUIC packet, under any tunnel's MTU.
pub const PAYLOAD: usize = 1_200;
/// Datagrams per `sendmmsg` and `recvmmsg` call.
const BATCH: usize = 64;
/// The sink's receive buffer: the same on every set-up, large enough that a short stall of
/// the sink's thread does not by itself make the loss.
const SINK_RCVBUF: usize = 8 << 20;
/// How long the client waits after sending for the datagrams still in flight to arrive.
const DRAIN: Duration = Duration::from_millis(300);

/// Datagrams the server's sinks have counted, all ports together.
static RECEIVED: AtomicU64 = AtomicU64::new(0);

/// The server's count, for [`COUNT_REQUEST`].
pub fn received() -> u64 {
    RECEIVED.load(Ordering::Relaxed)
}

/// Server side: binds `SERVER_V4:port` and counts (or echoes) what arrives there on a
/// thread of its own, until `deadline`.
pub fn start_sink(port: u16, deadline: Instant) -> Result<(), String> {
    let addr = SocketAddrV4::new(SERVER_V4, port);
    let socket = UdpSocket::bind(addr).map_err(|e| format!("binding udp {addr}: {e}"))?;
    // As root the sink may go past net.core.rmem_max; the plain option is the fallback.
    if setsockopt(&socket, sockopt::RcvBufForce, &SINK_RCVBUF).is_err() {
        let _ = setsockopt(&socket, sockopt::RcvBuf, &SINK_RCVBUF);
    }
    // Wakes the loop up to see the deadline when nothing arrives.
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| format!("udp {addr}: {e}"))?;
    std::thread::spawn(move || sink(&socket, deadline));
    Ok(())
}

fn sink(socket: &UdpSocket, deadline: Instant) {
    let mut bufs = vec![[0u8; 2048]; BATCH];
    // SAFETY: sockaddr_in is plain data; all zeroes is a valid value.
    let mut names: Vec<libc::sockaddr_in> = vec![unsafe { std::mem::zeroed() }; BATCH];
    let mut iovecs: Vec<libc::iovec> = bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: mmsghdr is plain data; all zeroes is a valid value.
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    while Instant::now() < deadline {
        for ((msg, iov), name) in msgs.iter_mut().zip(&mut iovecs).zip(&mut names) {
            msg.msg_hdr.msg_iov = iov;
            msg.msg_hdr.msg_iovlen = 1;
            msg.msg_hdr.msg_name = (name as *mut libc::sockaddr_in).cast();
            msg.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
            msg.msg_len = 0;
        }
        // SAFETY: every header points to a live buffer and address of this function, with
        // their lengths; BATCH headers are there.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        let Ok(n) = usize::try_from(n) else {
            // Timed out (nothing arrived) or interrupted: look at the deadline again.
            continue;
        };
        let mut counted = 0;
        for i in 0..n {
            let len = msgs[i].msg_len as usize;
            if len > 0 && bufs[i][0] == COUNTED {
                counted += 1;
            } else {
                let peer = SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(names[i].sin_addr.s_addr)),
                    u16::from_be(names[i].sin_port),
                );
                let _ = socket.send_to(&bufs[i][..len], peer);
            }
        }
        RECEIVED.fetch_add(counted, Ordering::Relaxed);
    }
}

/// What one run sends.
#[derive(Clone, Copy)]
pub struct UdpLoad {
    pub port: u16,
    /// Connected client sockets, each its own source port: one proxy session each.
    pub flows: usize,
    pub duration: Duration,
}

/// What one run measured.
#[derive(Clone, Copy)]
pub struct UdpRate {
    pub sent: u64,
    pub received: u64,
    pub secs: f64,
}

impl UdpRate {
    /// Datagrams received per second of sending.
    pub fn received_per_sec(&self) -> f64 {
        self.received as f64 / self.secs
    }

    /// The share of what was sent that did not arrive, percent.
    pub fn loss_percent(&self) -> f64 {
        if self.sent == 0 {
            return 0.0;
        }
        (1.0 - self.received as f64 / self.sent as f64).max(0.0) * 100.0
    }
}

/// Sends from the client namespace for `load.duration`, round-robin over the flows' sockets,
/// `BATCH` datagrams per call; returns what was sent and what the server counted.
pub fn run(client_ns: &str, load: UdpLoad) -> io::Result<UdpRate> {
    let ns = client_ns.to_owned();
    std::thread::spawn(move || -> io::Result<UdpRate> {
        load::enter_ns(&ns)?;
        let target = SocketAddr::from((SERVER_V4, load.port));
        let sockets = (0..load.flows.max(1))
            .map(|_| {
                let socket = UdpSocket::bind("0.0.0.0:0")?;
                socket.connect(target)?;
                Ok(socket)
            })
            .collect::<io::Result<Vec<_>>>()?;
        let before = query_received()?;
        let started = Instant::now();
        let sent = send_until(&sockets, started + load.duration)?;
        let secs = started.elapsed().as_secs_f64();
        std::thread::sleep(DRAIN);
        let received = query_received()?.saturating_sub(before);
        Ok(UdpRate {
            sent,
            received,
            secs,
        })
    })
    .join()
    .map_err(|_| io::Error::other("udp sender thread panicked"))?
}

fn send_until(sockets: &[UdpSocket], deadline: Instant) -> io::Result<u64> {
    let mut payload = [b'u'; PAYLOAD];
    payload[0] = COUNTED;
    let mut iov = libc::iovec {
        iov_base: payload.as_mut_ptr().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: mmsghdr is plain data; all zeroes is a valid value.
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
    for msg in &mut msgs {
        // Every datagram is the same payload; the sockets are connected, so no address.
        msg.msg_hdr.msg_iov = &mut iov;
        msg.msg_hdr.msg_iovlen = 1;
    }
    let mut sent = 0u64;
    // Bounded by time, and by count as a backstop (about 100 s at 10 M datagrams/s).
    for call in 0..(1u64 << 24) {
        if Instant::now() >= deadline || stopped() {
            break;
        }
        let socket = &sockets[call as usize % sockets.len()];
        // SAFETY: BATCH headers, each pointing to `iov`, which points to `payload`; all
        // live for the call.
        let n = unsafe { libc::sendmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
        match usize::try_from(n) {
            Ok(n) => sent += n as u64,
            Err(_) => {
                let error = io::Error::last_os_error();
                match error.raw_os_error() {
                    // A port unreachable that came back, a full queue: keep sending.
                    Some(libc::ECONNREFUSED | libc::ENOBUFS | libc::EAGAIN | libc::EINTR) => {}
                    _ => return Err(error),
                }
            }
        }
    }
    Ok(sent)
}

/// The server's count, over TCP to its port 81.
fn query_received() -> io::Result<u64> {
    let addr = SocketAddr::from((SERVER_V4, OTHER_PORT));
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(&[COUNT_REQUEST])?;
    let mut count = [0u8; 8];
    stream.read_exact(&mut count)?;
    Ok(u64::from_le_bytes(count))
}
