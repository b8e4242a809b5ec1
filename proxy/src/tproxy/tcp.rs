//! The transparent TCP listener and what happens to each accepted connection: the
//! original destination is the accepted socket's local address (the classifier never
//! rewrites a packet), the proxy connects there and relays both ways.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use log::{debug, info, warn};
use socket2::{Protocol, Type};
use tokio::net::{TcpListener, TcpStream};

use crate::{relay, tproxy::sockopt::transparent_socket, upstream};

/// The listener could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// Another socket holds the address and port.
    #[error("{0} is already in use (another proxy or an earlier agent still running?)")]
    InUse(SocketAddr),
    /// IP_TRANSPARENT was refused.
    #[error("setting IP_TRANSPARENT on the listener for {0} needs CAP_NET_ADMIN")]
    NotPermitted(SocketAddr),
    /// Any other failure.
    #[error("opening the transparent listener on {addr}")]
    Other {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Opens the transparent listener at `on_ip:on_port`, or, without on-ip, at the wildcard
/// address (dual stack where the namespace has IPv6), where the kernel's lookup at the
/// ingress interface's address finds it.
pub fn listen(on_ip: Option<IpAddr>, on_port: u16) -> Result<std::net::TcpListener, ListenError> {
    match on_ip {
        Some(ip) => bind(SocketAddr::new(ip, on_port)),
        None => match bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), on_port)) {
            Err(ListenError::Other { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
                ) =>
            {
                bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), on_port))
            }
            other => other,
        },
    }
}

fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, ListenError> {
    let classify = |source: io::Error| match source.raw_os_error() {
        Some(libc::EADDRINUSE) => ListenError::InUse(addr),
        Some(libc::EPERM) => ListenError::NotPermitted(addr),
        _ => ListenError::Other { addr, source },
    };
    let socket = transparent_socket(&addr, Type::STREAM, Protocol::TCP).map_err(classify)?;
    socket.bind(&addr.into()).map_err(classify)?;
    socket.listen(1024).map_err(classify)?;
    socket.set_nonblocking(true).map_err(classify)?;
    Ok(socket.into())
}

/// What the accept loop needs to know for each connection.
pub struct ProxyOptions {
    pub connect_timeout: Duration,
}

/// Accepts until the task is dropped, one task per connection.
pub async fn serve(listener: TcpListener, options: Arc<ProxyOptions>) {
    let listen_addr = listener.local_addr().ok();
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                let options = Arc::clone(&options);
                tokio::spawn(async move { handle(client, peer, listen_addr, &options).await });
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Undoes the IPv4-mapped form a dual-stack socket reports (`::ffff:192.0.2.1`).
fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// True when `orig_dst` is the proxy's own listener: a client that connected straight to
/// the proxy port. Relaying it would connect the proxy to itself, forever.
fn is_own_listener(orig_dst: SocketAddr, listen_addr: Option<SocketAddr>) -> bool {
    let Some(listen) = listen_addr else {
        return false;
    };
    if orig_dst.port() != listen.port() {
        return false;
    }
    if !listen.ip().is_unspecified() {
        return listen.ip().to_canonical() == orig_dst.ip();
    }
    // A wildcard listener: the destination is ours if it is a local address, which is
    // when a plain (non-transparent) bind to it succeeds.
    std::net::UdpSocket::bind(SocketAddr::new(orig_dst.ip(), 0)).is_ok()
}

async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    listen_addr: Option<SocketAddr>,
    options: &ProxyOptions,
) {
    let peer = canonical(peer);
    let orig_dst = match client.local_addr() {
        Ok(addr) => canonical(addr),
        Err(e) => {
            debug!("{peer}: no local address: {e}");
            return;
        }
    };
    if is_own_listener(orig_dst, listen_addr) {
        warn!(
            "{peer} -> {orig_dst}: connection straight to the proxy port refused (it would loop)"
        );
        return;
    }
    let started = Instant::now();
    let upstream = match upstream::connect_direct(orig_dst, options.connect_timeout).await {
        Ok(stream) => stream,
        Err(e) => {
            info!("{peer} -> {orig_dst}: upstream connect failed: {e}");
            relay::reset(client);
            return;
        }
    };
    let outcome = relay::copy_both_ways(client, upstream).await;
    let elapsed = started.elapsed();
    match outcome.error {
        None => info!(
            "{peer} -> {orig_dst}: {} bytes up, {} bytes down, {:.1} ms",
            outcome.up,
            outcome.down,
            elapsed.as_secs_f64() * 1e3
        ),
        Some(e) => info!(
            "{peer} -> {orig_dst}: {} bytes up, {} bytes down, {:.1} ms, ended by {e}",
            outcome.up,
            outcome.down,
            elapsed.as_secs_f64() * 1e3
        ),
    }
}
