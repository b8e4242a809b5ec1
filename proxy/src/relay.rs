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
//!   no pipe and no buffer. Where splice is refused the direction goes on copying.

use std::{io, os::fd::AsFd as _};

use nix::fcntl::{SpliceFFlags, splice};
use tokio::{io::Interest, net::TcpStream};

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

/// Bytes relayed each way, and what ended the relay if it was not a clean close.
pub struct RelayOutcome {
    /// Client to upstream.
    pub up: u64,
    /// Upstream to client.
    pub down: u64,
    pub error: Option<io::Error>,
}

/// Bytes moved per splice or read: one pipe's default capacity (16 pages).
const CHUNK: usize = 64 * 1024;

/// Relays until both directions are closed, or until one fails (then both are reset).
pub async fn copy_both_ways(
    client: TcpStream,
    upstream: TcpStream,
    mode: RelayMode,
) -> RelayOutcome {
    let (mut up, mut down) = (0u64, 0u64);
    let ended = both_directions(
        pump(&client, &upstream, &mut up, mode),
        pump(&upstream, &client, &mut down, mode),
    )
    .await;
    finish(client, upstream, up, down, ended.error)
}

/// The end of a relay: after a failure both connections are reset, so an upstream reset
/// reaches the client as one.
pub(crate) fn finish(
    client: TcpStream,
    upstream: TcpStream,
    up: u64,
    down: u64,
    error: Option<io::Error>,
) -> RelayOutcome {
    if error.is_some() {
        reset(client);
        reset(upstream);
    }
    RelayOutcome { up, down, error }
}

/// How the two directions of a relay ended.
#[derive(Default)]
pub(crate) struct Ended {
    /// The direction finished cleanly (its EOF passed on).
    pub up: bool,
    pub down: bool,
    /// What stopped the relay, if a direction failed.
    pub error: Option<io::Error>,
}

/// Runs both directions until both finish, or until one fails: then the other would wait
/// forever for a peer that is gone, so it is stopped too.
pub(crate) async fn both_directions(
    up_half: impl Future<Output = io::Result<()>>,
    down_half: impl Future<Output = io::Result<()>>,
) -> Ended {
    let mut ended = Ended::default();
    tokio::pin!(up_half, down_half);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        let result = tokio::select! {
            r = &mut up_half, if !up_done => { up_done = true; ended.up = r.is_ok(); r }
            r = &mut down_half, if !down_done => { down_done = true; ended.down = r.is_ok(); r }
        };
        if let Err(e) = result {
            ended.error = Some(e);
            break;
        }
    }
    ended
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
            Step::Full if mode != RelayMode::Copy => {
                match splice_pump(from, to, total).await {
                    // This pair of sockets does not splice: copy the rest.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => mode = RelayMode::Copy,
                    other => return other,
                }
            }
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
    /// Scratch space for copies, shared by the connections of a runtime thread: the read
    /// and the first write happen without an await in between, so no connection holds it.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; CHUNK]);
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
        let Some((step, mut left)) = attempt else {
            continue;
        };
        while !left.is_empty() {
            to.writable().await?;
            match to.try_write(&left) {
                Ok(m) => {
                    left.drain(..m);
                    *total += m as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        return Ok(step);
    }
}

async fn splice_pump(from: &TcpStream, to: &TcpStream, total: &mut u64) -> io::Result<()> {
    // (read end, write end), made once the direction turned out to be bulk.
    let (pipe_r, pipe_w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        from.readable().await?;
        let read = from.try_io(Interest::READABLE, || {
            splice(from.as_fd(), None, pipe_w.as_fd(), None, CHUNK, flags).map_err(io::Error::from)
        });
        let mut left = match read {
            Ok(0) => {
                half_close(to);
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        while left > 0 {
            to.writable().await?;
            let written = to.try_io(Interest::WRITABLE, || {
                splice(pipe_r.as_fd(), None, to.as_fd(), None, left, flags).map_err(io::Error::from)
            });
            match written {
                Ok(n) => {
                    left -= n;
                    *total += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Closes a connection with RST instead of FIN (SO_LINGER with a zero timeout).
pub fn reset(stream: TcpStream) {
    let socket = socket2::SockRef::from(&stream);
    let _ = socket.set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}
