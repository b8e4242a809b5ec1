//! Connections to where intercepted traffic was going.

use std::{io, net::SocketAddr, time::Duration};

use tokio::net::TcpStream;

/// Connects to the original destination itself, from one of the router's own addresses.
pub async fn connect_direct(orig_dst: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    match tokio::time::timeout(timeout, TcpStream::connect(orig_dst)).await {
        Ok(result) => {
            let stream = result?;
            stream.set_nodelay(true)?;
            Ok(stream)
        }
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("no answer within {:.1} s", timeout.as_secs_f64()),
        )),
    }
}
