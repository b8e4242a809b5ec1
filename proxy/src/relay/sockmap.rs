//! `--relay sockmap`: an established connection's bytes move between its two sockets inside
//! the kernel (the sk_skb program in `proxy-ebpf/src/sockmap_verdict.rs`), and the agent only watches
//! for the end of each direction.
//!
//! Order of the bytes, which is the whole difficulty:
//! * The agent never reads a byte itself. Bytes that arrived before the sockets joined the
//!   sockmap wait in the receive queue; setting SO_RCVLOWAT runs the socket's data-ready
//!   callback (`tcp_set_rcvlowat` -> `tcp_data_ready`), now the psock's, which hands the
//!   whole queue to the program in order (`tcp_read_skb`). Where the agent did read (a
//!   SOCKS5 handshake) and bytes are still queued, the connection is copied instead: the
//!   program is handed whole skbs, the part already read included.
//! * A FIN is passed on only once every byte the socket received is in the peer's send
//!   queue: redirected bytes go out from a kernel worker, later than the FIN would if the
//!   agent shut the peer down at once. The agent compares the bytes received on one side
//!   (`tcpi_bytes_received`) with the bytes written to the other (`tcpi_bytes_acked` plus
//!   SIOCOUTQ).

use std::{
    io,
    os::fd::{AsRawFd, RawFd},
    sync::{Mutex, PoisonError},
    time::Duration,
};

use aya::maps::{MapData, SockHash};
use log::info;
use tokio::net::TcpStream;

use crate::{
    relay::{
        self, Ending, RelayMode, RelayOutcome, Relayed,
        park::{Flag, Halt},
    },
    tcp_info::{counters, os_result},
};

/// The relay's maps, shared by the workers.
pub struct KernelRelay {
    maps: Mutex<Maps>,
}

struct Maps {
    /// Sockets whose received bytes go through the verdict program.
    socks: SockHash<MapData, u64>,
    /// Under each socket's cookie, its peer: where the program redirects its bytes.
    targets: SockHash<MapData, u64>,
}

/// How far linking a pair got.
enum Linked {
    /// Both sockets hand their bytes to the program.
    Both,
    /// Only the first does: the second left ESTABLISHED (its peer sent a FIN or a RST)
    /// between the inserts, and the sockmap refuses such sockets. Its bytes were never
    /// seen by the program, so copying them in userspace keeps them in order.
    FirstOnly,
}

fn map_io(e: aya::maps::MapError) -> io::Error {
    io::Error::other(e)
}

impl KernelRelay {
    pub(crate) fn new(socks: SockHash<MapData, u64>, targets: SockHash<MapData, u64>) -> Self {
        KernelRelay {
            maps: Mutex::new(Maps { socks, targets }),
        }
    }

    /// Makes `a` and `b` each other's relay peer. The targets go in first, so that the
    /// first byte the program sees already has somewhere to go. An error means no
    /// socket was linked (and nothing is left in the maps).
    fn link(&self, a: (u64, RawFd), b: (u64, RawFd)) -> io::Result<Linked> {
        let mut maps = self.maps.lock().unwrap_or_else(PoisonError::into_inner);
        let prepare = |maps: &mut Maps| -> Result<(), aya::maps::MapError> {
            maps.targets.insert(a.0, b.1, 0)?;
            maps.targets.insert(b.0, a.1, 0)?;
            maps.socks.insert(a.0, a.1, 0)
        };
        if let Err(e) = prepare(&mut maps) {
            maps.forget(a.0, b.0);
            return Err(map_io(e));
        }
        Ok(match maps.socks.insert(b.0, b.1, 0) {
            Ok(()) => Linked::Both,
            Err(_) => Linked::FirstOnly,
        })
    }

    /// Drops the pair's entries. Closing a socket also takes it out of the sockmaps.
    fn unlink(&self, a: u64, b: u64) {
        self.maps
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .forget(a, b);
    }
}

impl Maps {
    fn forget(&mut self, a: u64, b: u64) {
        for cookie in [a, b] {
            let _ = self.socks.remove(&cookie);
            let _ = self.targets.remove(&cookie);
        }
    }
}

/// Relays until both directions are closed, or until one fails, the connection is idle
/// for `idle_timeout` (zero: never) or `drain` resolves; then both are reset. The idle
/// timeout reads the kernel's byte counters, which see the bytes this relay moves without
/// the agent (`relay::watchdog`). Falls back to the userspace relay where the pair cannot be
/// handed to the kernel.
pub async fn relay(
    kernel: &KernelRelay,
    client: TcpStream,
    upstream: TcpStream,
    idle_timeout: Duration,
    drain: impl Future<Output = ()>,
) -> RelayOutcome {
    let prepared = (|| -> io::Result<_> {
        let cookies = (cookie(&client)?, cookie(&upstream)?);
        // What the agent itself read and wrote before (the SOCKS5 handshake on the
        // upstream socket): not relayed bytes.
        let bases = (
            Baseline::measure(&client, &upstream)?,
            Baseline::measure(&upstream, &client)?,
        );
        // The program is handed whole skbs (`tcp_read_skb` ignores how much of the first
        // one was read): after a partial read, such as a SOCKS5 reply that shared a
        // segment with the server's first bytes, it would send the read part again.
        for (stream, base) in [(&client, bases.0), (&upstream, bases.1)] {
            if base.consumed > 0 && queued(stream.as_raw_fd(), libc::FIONREAD)? > 0 {
                return Err(io::Error::other(
                    "bytes left over from the agent's own reads",
                ));
            }
        }
        Ok((cookies, bases))
    })();
    let ((client_cookie, upstream_cookie), (up_base, down_base)) = match prepared {
        Ok(prepared) => prepared,
        Err(e) => return copy_instead(e, client, upstream, idle_timeout, drain).await,
    };
    let linked = match kernel.link(
        (client_cookie, client.as_raw_fd()),
        (upstream_cookie, upstream.as_raw_fd()),
    ) {
        Ok(linked) => linked,
        Err(e) => return copy_instead(e, client, upstream, idle_timeout, drain).await,
    };
    // However this ends (even cancelled), the pair's map entries go.
    let _unlink = Unlink {
        kernel,
        cookies: (client_cookie, upstream_cookie),
    };
    // Bytes that arrived before the link are still queued: run them through the program.
    let mut kicked = kick(&client);
    if matches!(linked, Linked::Both) {
        kicked = kicked.and(kick(&upstream));
    }

    // Bytes the agent copied itself (the down direction of a half-linked pair).
    let mut copied_down = 0;
    let ended = if let Err(e) = kicked {
        relay::Ended {
            up: None,
            down: None,
            ending: Ending::Reset(e),
        }
    } else {
        let down_half = async {
            match linked {
                Linked::Both => watch(&upstream, &client, down_base).await,
                Linked::FirstOnly => {
                    // Alone in passing a FIN on through `Fins` (`watch` does its own):
                    // it always half-closes.
                    let fins = relay::Fins::default();
                    relay::pump(
                        &upstream,
                        &client,
                        &mut copied_down,
                        RelayMode::Copy,
                        &fins,
                        &NEVER_PARKED,
                    )
                    .await
                }
            }
        };
        relay::both_directions(
            std::pin::pin!(watch(&client, &upstream, up_base)),
            std::pin::pin!(down_half),
            std::pin::pin!(relay::watchdog(&client, &upstream, idle_timeout, drain)),
        )
        .await
    };
    let (up_eof, down_eof) = (ended.up == Some(Halt::Eof), ended.down == Some(Halt::Eof));
    let up = relayed(&client, up_base, up_eof);
    let down = match linked {
        Linked::Both => relayed(&upstream, down_base, down_eof),
        Linked::FirstOnly => copied_down,
    };
    relay::finish(client, upstream, up, down, ended.ending)
}

async fn copy_instead(
    why: io::Error,
    client: TcpStream,
    upstream: TcpStream,
    idle_timeout: Duration,
    drain: impl Future<Output = ()>,
) -> RelayOutcome {
    info!("in-kernel relay unavailable ({why}): copying this connection");
    let relayed = relay::copy_both_ways(
        client,
        upstream,
        RelayMode::Splice,
        idle_timeout,
        drain,
        &NEVER_PARKED,
    )
    .await;
    match relayed {
        Relayed::Ended(outcome) => outcome,
        // Not raised, so never here; were it, the relay ends as a cut one.
        Relayed::Parked(p) => relay::finish(
            p.client,
            p.upstream,
            p.up.total,
            p.down.total,
            Ending::Drain,
        ),
    }
}

/// Kernel relays are not parked: they stay with the agent that linked them and drain
/// (issue 19). Neither is the copy that stands in for one.
static NEVER_PARKED: Flag = Flag::never();

/// Takes a pair out of the maps when dropped.
struct Unlink<'a> {
    kernel: &'a KernelRelay,
    cookies: (u64, u64),
}

impl Drop for Unlink<'_> {
    fn drop(&mut self) {
        self.kernel.unlink(self.cookies.0, self.cookies.1);
    }
}

/// The bytes the agent itself had read from one socket and written to the other before the
/// link.
#[derive(Clone, Copy)]
struct Baseline {
    consumed: u64,
    written: u64,
}

impl Baseline {
    fn measure(from: &TcpStream, to: &TcpStream) -> io::Result<Baseline> {
        Ok(Baseline {
            consumed: consumed(from.as_raw_fd())?,
            written: written(to.as_raw_fd())?,
        })
    }
}

/// Bytes relayed from `from` (for the connection's log line): what it received after the
/// link, less the FIN's sequence number once its EOF was seen.
fn relayed(from: &TcpStream, base: Baseline, eof: bool) -> u64 {
    counters(from.as_raw_fd())
        .map(|c| c.received.saturating_sub(base.consumed + u64::from(eof)))
        .unwrap_or(0)
}

/// A direction waits here for its EOF, passes it on once the bytes before it are in the
/// peer's send queue, and ends.
async fn watch(from: &TcpStream, to: &TcpStream, base: Baseline) -> io::Result<Halt> {
    loop {
        from.readable().await?;
        let mut probe = [0u8; 1];
        match from.try_read(&mut probe) {
            Ok(0) => break,
            // The program redirects every byte; one reaching the agent would be out of
            // order with the rest, so the connection cannot go on.
            Ok(_) => {
                return Err(io::Error::other(
                    "a byte reached the agent past the in-kernel relay",
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    // `tcpi_bytes_received` follows rcv_nxt, which the FIN moved on by one.
    let target = counters(from.as_raw_fd())?
        .received
        .saturating_sub(base.consumed + 1);
    wait_written(to, base.written + target).await?;
    relay::half_close(to);
    Ok(Halt::Eof)
}

/// Waits until `bytes` have been written into `to` (by the kernel relay), polling with a
/// growing pause: this runs once per direction, at its end, and is usually true at once.
/// It can take as long as `to`'s reader takes to open its window (a paused download): no
/// time limit of its own, as with the userspace relay; a socket error ends it, and so does
/// the idle timeout once no byte moves for that long.
async fn wait_written(to: &TcpStream, bytes: u64) -> io::Result<()> {
    let mut pause = Duration::from_micros(200);
    loop {
        if written(to.as_raw_fd())? >= bytes {
            return Ok(());
        }
        if let Some(e) = to.take_error()? {
            return Err(e);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// The socket's cookie (SO_COOKIE), its key in the relay maps.
fn cookie(stream: &TcpStream) -> io::Result<u64> {
    socket2::SockRef::from(stream).cookie()
}

/// SO_RCVLOWAT = 1 (the default): setting it runs the data-ready callback when bytes are
/// queued.
fn kick(stream: &TcpStream) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid descriptor and an int option value.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    os_result(rc)
}

/// Bytes queued with `request` (SIOCINQ: received, not read; SIOCOUTQ: written, not acked).
fn queued(fd: RawFd, request: libc::Ioctl) -> io::Result<u64> {
    let mut value: libc::c_int = 0;
    // SAFETY: both ioctls write one int.
    let rc = unsafe { libc::ioctl(fd, request, &mut value) };
    os_result(rc)?;
    Ok(value.max(0) as u64)
}

/// Bytes written into the socket so far: acked + still queued. Read in that order, an ACK
/// between the two reads makes the sum smaller, never larger: a wait on it never ends early.
fn written(fd: RawFd) -> io::Result<u64> {
    let acked = counters(fd)?.acked;
    Ok(acked + queued(fd, libc::TIOCOUTQ)?)
}

/// Bytes read from the socket so far: received - still queued. Retried until two readings
/// agree, since bytes may arrive between them. (A FIN already received would count in the
/// first and not the second; such a socket has left ESTABLISHED, the sockmap refuses it,
/// and its direction is copied instead, so the figure is never used for it.)
fn consumed(fd: RawFd) -> io::Result<u64> {
    for _ in 0..16 {
        let before = counters(fd)?.received;
        let unread = queued(fd, libc::FIONREAD)?;
        if counters(fd)?.received == before {
            return Ok(before.saturating_sub(unread));
        }
    }
    Err(io::Error::other("bytes kept arriving while measuring"))
}
