//! Copying both ways between the client and the upstream connection, with half-close:
//! when one side finishes sending, the other side's write half is shut down and the
//! opposite direction goes on until it finishes too.

use std::io;

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

/// Bytes relayed each way, and what ended the relay if it was not a clean close.
pub struct RelayOutcome {
    /// Client to upstream.
    pub up: u64,
    /// Upstream to client.
    pub down: u64,
    pub error: Option<io::Error>,
}

const BUFFER: usize = 64 * 1024;

/// Relays until both directions are closed. If either side resets or fails, the other is
/// reset too, so an upstream refusal or reset reaches the client as a reset.
pub async fn copy_both_ways(client: TcpStream, upstream: TcpStream) -> RelayOutcome {
    let (mut client_read, mut client_write) = client.into_split();
    let (mut upstream_read, mut upstream_write) = upstream.into_split();
    let (mut up, mut down) = (0u64, 0u64);
    let mut error = None;
    {
        let up_half = copy_half(&mut client_read, &mut upstream_write, &mut up);
        let down_half = copy_half(&mut upstream_read, &mut client_write, &mut down);
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
        // Abort both: reunite the halves and close with RST.
        if let Ok(client) = client_read.reunite(client_write) {
            reset(client);
        }
        if let Ok(upstream) = upstream_read.reunite(upstream_write) {
            reset(upstream);
        }
    }
    RelayOutcome { up, down, error }
}

async fn copy_half(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    total: &mut u64,
) -> io::Result<()> {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // Half-close: pass the FIN on, keep the other direction open. A failure here
            // means the peer is already gone, which the other direction will report.
            let _ = to.shutdown().await;
            return Ok(());
        }
        to.write_all(&buf[..n]).await?;
        *total += n as u64;
    }
}

/// Closes a connection with RST instead of FIN (SO_LINGER with a zero timeout).
pub fn reset(stream: TcpStream) {
    let socket = socket2::SockRef::from(&stream);
    let _ = socket.set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}
