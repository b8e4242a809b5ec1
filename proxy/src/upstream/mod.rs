//! Connections to where intercepted traffic was going: straight to the original
//! destination ([`direct`], optionally from the client's own address), or through a SOCKS5
//! proxy ([`socks5`]). Every outbound socket carries the agent's outbound mark, so that
//! neither the classifier nor the fwmark rule ever takes the proxy's own traffic back.

pub mod direct;
pub mod socks5;

use std::{io, net::SocketAddr, time::Duration};

use log::warn;
use tokio::net::TcpStream;

/// How the proxy reaches the original destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Upstream {
    /// Connect from one of the router's own addresses.
    Direct,
    /// Connect from the client's own address (a transparent socket bound to it), so the
    /// server sees the client. Replies come back through the classifier's return path.
    SpoofSource,
    /// Ask a SOCKS5 proxy to connect (RFC 1928 CONNECT, RFC 1929 authentication).
    Socks5(socks5::Socks5Server),
}

/// Settings shared by every outbound connection.
#[derive(Clone, Copy, Debug)]
pub struct Outbound {
    pub connect_timeout: Duration,
    /// SO_MARK of every outbound socket.
    pub mark: u32,
}

/// Connects to `orig_dst` for `client` the way `upstream` says.
/// How often an upstream connect that ran out of descriptors tries again.
const DESCRIPTOR_RETRY: Duration = Duration::from_millis(50);

/// EMFILE (this process's limit) or ENFILE (the system's).
fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

pub async fn connect(
    upstream: &Upstream,
    client: SocketAddr,
    orig_dst: SocketAddr,
    outbound: Outbound,
) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(outbound.connect_timeout, async {
        let mut waited = false;
        loop {
            let attempt = match upstream {
                Upstream::Direct => direct::connect(orig_dst, None, outbound.mark).await,
                Upstream::SpoofSource => {
                    direct::connect(orig_dst, Some(client), outbound.mark).await
                }
                Upstream::Socks5(server) => socks5::connect(server, orig_dst, outbound.mark).await,
            };
            match attempt {
                // The client was accepted with the last descriptor: wait for one to free up
                // (as the accept loop does), within the connect timeout, instead of resetting
                // a connection that a moment later could be served.
                Err(e) if out_of_descriptors(&e) => {
                    if !waited {
                        warn!(
                            "{client} -> {orig_dst}: upstream socket: {e}; waiting for a descriptor"
                        );
                        waited = true;
                    }
                    tokio::time::sleep(DESCRIPTOR_RETRY).await;
                }
                other => break other,
            }
        }
    })
    .await
    .map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no answer within {:.1} s",
                outbound.connect_timeout.as_secs_f64()
            ),
        )
    })??;
    stream.set_nodelay(true)?;
    // Keepalive comes later, once the relay has run a while (`relay::watchdog`).
    Ok(stream)
}
