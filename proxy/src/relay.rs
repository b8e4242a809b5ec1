//! Copying both ways between the client and the upstream connection.
//!
//! * Half-close: when one side finishes sending, the other side's write half is shut down
//!   and the opposite direction goes on until it finishes too.
//! * Reset: if either side resets or fails, both are closed with RST, so an upstream reset
//!   reaches the client as a reset.
//! * Zero-copy: by default each direction moves data with splice(2) through a pipe, socket
//!   to pipe to socket, without copying it into userspace. The pipe is made on the first
//!   data, so an idle connection holds no pipe and no buffer. Where splice is refused the
//!   direction falls back to a bounded buffered copy.

use std::{
    io,
    os::fd::{AsFd as _, OwnedFd},
};

use nix::fcntl::{SpliceFFlags, splice};
use tokio::{io::Interest, net::TcpStream};

/// How bytes are moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RelayMode {
    /// splice(2) through a pipe per direction; buffered copy where splice is refused.
    Splice,
    /// read(2)/write(2) through a userspace buffer.
    Copy,
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
    let mut error = None;
    {
        let up_half = pump(&client, &upstream, &mut up, mode);
        let down_half = pump(&upstream, &client, &mut down, mode);
        tokio::pin!(up_half, down_half);
        let (mut up_done, mut down_done) = (false, false);
        while !(up_done && down_done) {
            let result = tokio::select! {
                r = &mut up_half, if !up_done => { up_done = true; r }
                r = &mut down_half, if !down_done => { down_done = true; r }
            };
            if let Err(e) = result {
                // One side failed: the other direction would wait forever for a peer that
                // is gone. Stop both.
                error = Some(e);
                break;
            }
        }
    }
    if error.is_some() {
        reset(client);
        reset(upstream);
    }
    RelayOutcome { up, down, error }
}

/// One direction, until EOF (then the write side is shut down) or an error.
async fn pump(
    from: &TcpStream,
    to: &TcpStream,
    total: &mut u64,
    mode: RelayMode,
) -> io::Result<()> {
    if mode == RelayMode::Splice {
        match splice_pump(from, to, total).await {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && *total == 0 => {
                // This pair of sockets does not splice: copy instead.
            }
            other => return other,
        }
    }
    copy_pump(from, to, total).await
}

/// Passes a FIN on. A failure here means the peer is already gone, which the other
/// direction reports.
fn half_close(to: &TcpStream) {
    let _ = socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write);
}

async fn splice_pump(from: &TcpStream, to: &TcpStream, total: &mut u64) -> io::Result<()> {
    // (read end, write end), made on the first data.
    let mut pipe: Option<(OwnedFd, OwnedFd)> = None;
    loop {
        from.readable().await?;
        if pipe.is_none() {
            pipe = Some(nix::unistd::pipe2(
                nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK,
            )?);
        }
        let Some((pipe_r, pipe_w)) = &pipe else {
            continue;
        };
        let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
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

async fn copy_pump(from: &TcpStream, to: &TcpStream, total: &mut u64) -> io::Result<()> {
    // Made on the first data: an idle connection holds no buffer.
    let mut buf: Vec<u8> = Vec::new();
    loop {
        from.readable().await?;
        if buf.is_empty() {
            buf = vec![0u8; CHUNK];
        }
        let n = match from.try_read(&mut buf) {
            Ok(0) => {
                half_close(to);
                return Ok(());
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        let mut sent = 0;
        while sent < n {
            to.writable().await?;
            match to.try_write(&buf[sent..n]) {
                Ok(m) => {
                    sent += m;
                    *total += m as u64;
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
