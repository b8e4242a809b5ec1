//! Copying both ways between the client and the upstream connection.
//!
//! * Half-close: when one side finishes sending, the other side's write half is shut down
//!   and the opposite direction goes on until it finishes too.
//! * Reset: if either side resets or fails, both are closed with RST, so an upstream reset
//!   reaches the client as a reset.
//! * Zero-copy for bulk: each direction starts by copying through a per-thread scratch
//!   buffer (small request/response exchanges cost no pipe and no per-connection buffer);
//!   once a read fills the buffer, splice mode moves the rest with splice(2) through a pipe,
//!   socket to pipe to socket, without copying it into userspace. An idle connection holds
//!   no pipe and no buffer. Where splice is refused the direction goes on copying, without
//!   losing the bytes already in the pipe: a refusal from socket to pipe leaves it empty,
//!   and after a refusal from pipe to socket its bytes are read back and written out.
//! * Idle timeout: a connection that carries no byte either way for `--tcp-idle-timeout`
//!   is reset on both sides ([`watchdog`]), and so is each one still open when the drain on
//!   shutdown runs out.

use std::{
    fmt, io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
    time::Duration,
};

use log::debug;
use nix::fcntl::{SpliceFFlags, splice};
use tokio::{io::Interest, net::TcpStream, time::Instant};

use crate::tcp_info::{self, Counters};

/// How bytes are moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RelayMode {
    /// splice(2) through a pipe per direction; buffered copy where splice is refused.
    Splice,
    /// read(2)/write(2) through a userspace buffer.
    Copy,
    /// Inside the kernel: both sockets in a sockmap whose sk_skb program redirects each
    /// one's bytes to the other (`kernel_relay`). Where a connection cannot be linked, it
    /// is relayed as with `Splice`.
    Sockmap,
}

/// Why a connection ended: the last words of its closing log line.
#[derive(Debug)]
pub enum Ending {
    /// Both directions finished cleanly, each EOF passed on.
    Done,
    /// No byte either way for the idle timeout: both sides were reset.
    Idle(Duration),
    /// A side reset or failed (keepalive finding a dead peer included): both sides were
    /// reset.
    Reset(io::Error),
    /// The upstream connection could not be made: the client was reset.
    Refused(io::Error),
    /// Still open when the drain on shutdown ran out (or a second signal came): both sides
    /// were reset.
    Drain,
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ending::Done => f.write_str("done"),
            Ending::Idle(timeout) => write!(
                f,
                "idle, no byte either way for {} s",
                timeout.as_secs_f64()
            ),
            Ending::Reset(e) => write!(f, "reset, ended by {e}"),
            Ending::Refused(e) => write!(f, "refused, upstream connect failed: {e}"),
            Ending::Drain => f.write_str("drain, cut when the drain on shutdown ended"),
        }
    }
}

/// Bytes relayed each way, and what ended the relay.
pub struct RelayOutcome {
    /// Client to upstream.
    pub up: u64,
    /// Upstream to client.
    pub down: u64,
    pub ending: Ending,
}

/// Bytes moved per splice or read: one pipe's default capacity (16 pages).
const CHUNK: usize = 64 * 1024;

/// Relays until both directions are closed, or until one fails, the connection is idle
/// for `idle_timeout` (zero: never) or `drain` resolves; then both are reset.
pub async fn copy_both_ways(
    client: TcpStream,
    upstream: TcpStream,
    mode: RelayMode,
    idle_timeout: Duration,
    drain: impl Future<Output = ()>,
) -> RelayOutcome {
    let (mut up, mut down) = (0u64, 0u64);
    let ended = both_directions(
        pump(&client, &upstream, &mut up, mode),
        pump(&upstream, &client, &mut down, mode),
        watchdog(&client, &upstream, idle_timeout, drain),
    )
    .await;
    finish(client, upstream, up, down, ended.ending)
}

/// The end of a relay: unless it was done, both connections are reset, so an upstream
/// reset reaches the client as one, and an idle or cut connection is not mistaken for a
/// complete one (a FIN would look like the end of a close-delimited response).
pub(crate) fn finish(
    client: TcpStream,
    upstream: TcpStream,
    up: u64,
    down: u64,
    ending: Ending,
) -> RelayOutcome {
    if !matches!(ending, Ending::Done) {
        reset(client);
        reset(upstream);
    }
    RelayOutcome { up, down, ending }
}

/// How the two directions of a relay ended.
pub(crate) struct Ended {
    /// The direction finished cleanly (its EOF passed on).
    pub up: bool,
    pub down: bool,
    pub ending: Ending,
}

/// Runs both directions until both finish, or until one fails (then the other would wait
/// forever for a peer that is gone, so it is stopped too), or until `watchdog` ends the
/// relay.
pub(crate) async fn both_directions(
    up_half: impl Future<Output = io::Result<()>>,
    down_half: impl Future<Output = io::Result<()>>,
    watchdog: impl Future<Output = Ending>,
) -> Ended {
    tokio::pin!(up_half, down_half, watchdog);
    let (mut up_done, mut down_done) = (false, false);
    let (mut up, mut down) = (false, false);
    while !(up_done && down_done) {
        let result = tokio::select! {
            r = &mut up_half, if !up_done => { up_done = true; up = r.is_ok(); r }
            r = &mut down_half, if !down_done => { down_done = true; down = r.is_ok(); r }
            ending = &mut watchdog => return Ended { up, down, ending },
        };
        if let Err(e) = result {
            return Ended {
                up,
                down,
                ending: Ending::Reset(e),
            };
        }
    }
    Ended {
        up,
        down,
        ending: Ending::Done,
    }
}

/// Ends a relay once `drain` resolves, or once its connection has been idle for
/// `idle_timeout` (zero: never).
pub(crate) async fn watchdog(
    client: &TcpStream,
    upstream: &TcpStream,
    idle_timeout: Duration,
    drain: impl Future<Output = ()>,
) -> Ending {
    tokio::select! {
        () = drain => Ending::Drain,
        () = idle(client, upstream, idle_timeout) => Ending::Idle(idle_timeout),
    }
}

/// Checks of the counters per idle timeout: an idle connection is reaped between one and
/// 1.25 timeouts after its last byte.
const IDLE_CHECKS: u32 = 4;

/// Resolves once neither socket has received a byte or had one acknowledged for
/// `timeout`; never if `timeout` is zero. The kernel's counters (TCP_INFO) see every byte,
/// whether the agent or the in-kernel relay moved it, so this costs nothing per byte: two
/// getsockopt calls a quarter of a timeout apart. Keepalive probes and bare ACKs carry no
/// byte and do not count; a peer that stops reading (zero window) stops the counters too.
async fn idle(client: &TcpStream, upstream: &TcpStream, timeout: Duration) {
    let activity = || -> io::Result<[Counters; 2]> {
        Ok([
            tcp_info::counters(client.as_raw_fd())?,
            tcp_info::counters(upstream.as_raw_fd())?,
        ])
    };
    if timeout.is_zero() {
        return std::future::pending().await;
    }
    let mut last = None;
    let mut since = Instant::now();
    loop {
        match activity() {
            Ok(now) if last == Some(now) => {
                if since.elapsed() >= timeout {
                    return;
                }
            }
            Ok(now) => {
                last = Some(now);
                since = Instant::now();
            }
            Err(e) => {
                debug!("no idle timeout for this connection: TCP_INFO: {e}");
                return std::future::pending().await;
            }
        }
        tokio::time::sleep(timeout / IDLE_CHECKS).await;
    }
}

/// One direction, until EOF (then the write side is shut down) or an error.
///
/// Both modes start by copying through a per-thread scratch buffer: small exchanges cost no
/// pipe and no per-connection buffer. In splice mode a read that fills the whole buffer
/// marks the direction as bulk, and it moves on to splice(2) for the rest.
pub(crate) async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    total: &mut u64,
    mut mode: RelayMode,
) -> io::Result<()> {
    loop {
        match copy_step(from, to, total).await? {
            Step::Eof => {
                half_close(to);
                return Ok(());
            }
            Step::Full if mode != RelayMode::Copy => match splice_pump(from, to, total).await? {
                Spliced::Eof => return Ok(()),
                // This pair of sockets does not splice, and the pipe is empty: copy the rest.
                Spliced::Refused => mode = RelayMode::Copy,
            },
            Step::Full | Step::Partial => {}
        }
    }
}

/// Passes a FIN on. A failure here means the peer is already gone, which the other
/// direction reports.
pub(crate) fn half_close(to: &TcpStream) {
    let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
}

/// What one read brought.
enum Step {
    Eof,
    /// The read filled the scratch buffer: more is likely waiting (bulk).
    Full,
    Partial,
}

thread_local! {
    /// Scratch space for copies, shared by the connections (and the UDP sessions) of a
    /// runtime thread: the read and the first write happen without an await in between,
    /// so none holds it.
    pub(crate) static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; CHUNK]);
}

/// Reads once and writes what it can at once; whatever the peer cannot take yet is kept in
/// a buffer of its own and written as the socket drains.
async fn copy_step(from: &TcpStream, to: &TcpStream, total: &mut u64) -> io::Result<Step> {
    loop {
        from.readable().await?;
        let attempt = SCRATCH.with(|scratch| -> io::Result<Option<(Step, Vec<u8>)>> {
            let mut buf = scratch.borrow_mut();
            let n = match from.try_read(&mut buf) {
                Ok(0) => return Ok(Some((Step::Eof, Vec::new()))),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            };
            let step = if n == buf.len() {
                Step::Full
            } else {
                Step::Partial
            };
            let mut sent = 0;
            while sent < n {
                match to.try_write(&buf[sent..n]) {
                    Ok(m) => sent += m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            *total += sent as u64;
            Ok(Some((step, buf[sent..n].to_vec())))
        })?;
        let Some((step, left)) = attempt else {
            continue;
        };
        write_all(to, &left, total).await?;
        return Ok(step);
    }
}

/// Writes all of `buf` as the socket takes it, counting what went out in `total`.
async fn write_all(to: &TcpStream, mut buf: &[u8], total: &mut u64) -> io::Result<()> {
    while !buf.is_empty() {
        to.writable().await?;
        match to.try_write(buf) {
            Ok(m) => {
                buf = &buf[m..];
                *total += m as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// How a run of splice(2) ended.
enum Spliced {
    /// EOF, passed on.
    Eof,
    /// splice(2) was refused, and every byte that went into the pipe has been written out:
    /// copying can take over.
    Refused,
}

async fn splice_pump(from: &TcpStream, to: &TcpStream, total: &mut u64) -> io::Result<Spliced> {
    // (read end, write end), made once the direction turned out to be bulk. Without one
    // (out of descriptors), copying needs none.
    let Ok((pipe_r, pipe_w)) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
    else {
        return Ok(Spliced::Refused);
    };
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    let splice_out = |pipe: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize| {
        splice(pipe, None, to, None, len, flags).map_err(io::Error::from)
    };
    loop {
        from.readable().await?;
        let read = from.try_io(Interest::READABLE, || {
            splice(from.as_fd(), None, pipe_w.as_fd(), None, CHUNK, flags).map_err(io::Error::from)
        });
        let left = match read {
            Ok(0) => {
                half_close(to);
                return Ok(Spliced::Eof);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            // The pipe is empty between rounds: refused here, nothing is lost by copying.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Spliced::Refused),
            Err(e) => return Err(e),
        };
        match empty_pipe(pipe_r.as_fd(), to, left, total, splice_out).await? {
            Emptied::Spliced => {}
            Emptied::Copied => return Ok(Spliced::Refused),
        }
    }
}

/// How the pipe was emptied.
#[derive(Debug, PartialEq, Eq)]
enum Emptied {
    /// All by splice(2).
    Spliced,
    /// splice(2) to the socket was refused; what was left was read back and written.
    Copied,
}

/// Moves the `left` bytes in the pipe to `to` with `splice_out` (splice(2), or a stand-in
/// in tests). Where it is refused (EINVAL), those bytes are read back from the pipe and
/// written with write(2): they are part of the stream, and dropping the pipe with them in it
/// would lose them silently. Any other failure ends the connection, which the caller resets.
async fn empty_pipe(
    pipe_r: BorrowedFd<'_>,
    to: &TcpStream,
    mut left: usize,
    total: &mut u64,
    splice_out: impl Fn(BorrowedFd<'_>, BorrowedFd<'_>, usize) -> io::Result<usize>,
) -> io::Result<Emptied> {
    while left > 0 {
        to.writable().await?;
        match to.try_io(Interest::WRITABLE, || splice_out(pipe_r, to.as_fd(), left)) {
            Ok(n) => {
                left -= n;
                *total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                write_out_pipe(pipe_r, to, left, total).await?;
                return Ok(Emptied::Copied);
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Emptied::Spliced)
}

/// Reads the `left` bytes queued in the pipe and writes them to `to`.
async fn write_out_pipe(
    pipe_r: BorrowedFd<'_>,
    to: &TcpStream,
    left: usize,
    total: &mut u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; left];
    let mut filled = 0;
    while filled < left {
        // The bytes are in the pipe already: this never waits (and would fail with EAGAIN,
        // ending the connection with a reset, rather than lose them).
        match nix::unistd::read(pipe_r, &mut buf[filled..]) {
            Ok(0) => return Err(io::Error::other("the pipe held fewer bytes than it took")),
            Ok(n) => filled += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    write_all(to, &buf, total).await
}

/// Closes a connection with RST instead of FIN (SO_LINGER with a zero timeout).
pub fn reset(stream: TcpStream) {
    let socket = socket2::SockRef::from(&stream);
    let _ = socket.set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}

#[cfg(test)]
mod tests {
    use std::{cell::Cell, os::fd::AsFd as _};

    use tokio::{
        io::AsyncReadExt as _,
        net::{TcpListener, TcpStream},
    };

    use super::*;

    /// A connected pair over loopback: (the relay's side, the receiver).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (connected, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (connected.expect("connect"), accepted.expect("accept").0)
    }

    /// When splice(2) from the pipe to the socket is refused after part of the pipe went
    /// out, the rest still reaches the peer, in order, and counts as relayed.
    #[tokio::test]
    async fn a_refused_splice_out_writes_the_pipe_out_by_hand() {
        let (to, mut receiver) = pair().await;
        let (pipe_r, pipe_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .expect("pipe");
        let sent: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let mut queued = 0;
        while queued < sent.len() {
            queued += nix::unistd::write(&pipe_w, &sent[queued..]).expect("fill the pipe");
        }
        // The first call splices 1,000 bytes for real, every later one is refused.
        let calls = Cell::new(0);
        let splice_out = |pipe: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize| {
            calls.set(calls.get() + 1);
            if calls.get() == 1 {
                splice(pipe, None, to, None, len.min(1000), SpliceFFlags::empty())
                    .map_err(io::Error::from)
            } else {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            }
        };
        let mut total = 0;
        let emptied = empty_pipe(pipe_r.as_fd(), &to, sent.len(), &mut total, splice_out)
            .await
            .expect("emptying the pipe");
        assert_eq!(emptied, Emptied::Copied);
        assert_eq!(calls.get(), 2, "splice was tried again after its refusal");
        assert_eq!(total, sent.len() as u64);
        drop(to);
        let mut received = Vec::new();
        receiver
            .read_to_end(&mut received)
            .await
            .expect("reading what was relayed");
        assert_eq!(received.len(), sent.len(), "bytes lost from the pipe");
        assert!(received == sent, "bytes out of order");
    }

    /// Any other failure of splice(2) out is the connection's, and is reported (the relay
    /// then resets both sides) instead of being taken for a refusal.
    #[tokio::test]
    async fn a_failed_splice_out_ends_the_relay_with_its_error() {
        let (to, _receiver) = pair().await;
        let (pipe_r, pipe_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)
                .expect("pipe");
        nix::unistd::write(&pipe_w, b"queued").expect("fill the pipe");
        let mut total = 0;
        let failed = empty_pipe(pipe_r.as_fd(), &to, 6, &mut total, |_, _, _| {
            Err(io::Error::from_raw_os_error(libc::EPIPE))
        })
        .await;
        assert_eq!(failed.map_err(|e| e.raw_os_error()), Err(Some(libc::EPIPE)));
        assert_eq!(total, 0);
    }
}
