//! Direct connections to the original destination, from the router's address or, with
//! `--spoof-source`, from the client's.

use std::{io, net::SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::{io::Interest, net::TcpStream};

/// Connects to `dst`, bound to `source`'s address when given (IP_TRANSPARENT lets a socket
/// bind an address that is not local; the port is left to the kernel).
pub async fn connect(
    dst: SocketAddr,
    source: Option<SocketAddr>,
    mark: u32,
) -> io::Result<TcpStream> {
    // Non-blocking from the start (SOCK_NONBLOCK): no fcntl pair per connection.
    let socket = Socket::new(
        Domain::for_address(dst),
        Type::STREAM.nonblocking(),
        Some(Protocol::TCP),
    )?;
    socket.set_mark(mark)?;
    if let Some(source) = source {
        // The client's family must be the destination's; a dual-stack listener reports
        // IPv4 clients as such already (canonical addresses).
        crate::tproxy::sockopt::set_transparent(&socket, &dst)?;
        socket.bind(&SocketAddr::new(source.ip(), 0).into())?;
    }
    match socket.connect(&dst.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    let stream = TcpStream::from_std(socket.into())?;
    established(&stream).await?;
    Ok(stream)
}

/// Waits for a non-blocking connect to end. Writable without an error or a hang-up means
/// established (`tcp_poll` reports no EPOLLOUT in SYN_SENT); a failed handshake ends in
/// TCP_CLOSE with `sk_err` set (EPOLLERR, EPOLLHUP), and only then is SO_ERROR read for the
/// reason. Tokio's own connect reads SO_ERROR every time: a getsockopt per connection.
async fn established(stream: &TcpStream) -> io::Result<()> {
    let ready = stream.ready(Interest::WRITABLE | Interest::ERROR).await?;
    if !(ready.is_error() || ready.is_write_closed()) {
        return Ok(());
    }
    Err(stream.take_error()?.unwrap_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotConnected,
            "the connection closed during its handshake",
        )
    }))
}
