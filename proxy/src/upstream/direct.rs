//! Direct connections to the original destination, from the router's address or, with
//! `--spoof-source`, from the client's.

use std::{io, net::SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

/// Connects to `dst`, bound to `source`'s address when given (IP_TRANSPARENT lets a socket
/// bind an address that is not local; the port is left to the kernel).
pub async fn connect(
    dst: SocketAddr,
    source: Option<SocketAddr>,
    mark: u32,
) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_mark(mark)?;
    if let Some(source) = source {
        // The client's family must be the destination's; a dual-stack listener reports
        // IPv4 clients as such already (canonical addresses).
        crate::tproxy::sockopt::set_transparent(&socket, &dst)?;
        socket.bind(&SocketAddr::new(source.ip(), 0).into())?;
    }
    socket.set_nonblocking(true)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    socket.connect(dst).await
}
