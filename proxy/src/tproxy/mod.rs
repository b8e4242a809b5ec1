//! The agent's transparent sockets: listeners that receive what the classifier assigns,
//! and the socket options that make them transparent.

pub mod destination;
pub mod live;
pub mod return_path;
pub mod sockopt;
pub mod tcp;
pub mod udp;
mod udp_batch;
pub mod workers;

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
};

/// A listener could not be opened.
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

impl ListenError {
    /// Names the common causes: the port taken, IP_TRANSPARENT refused.
    pub fn from_io(addr: SocketAddr, source: io::Error) -> Self {
        match source.raw_os_error() {
            Some(libc::EADDRINUSE) => ListenError::InUse(addr),
            Some(libc::EPERM) => ListenError::NotPermitted(addr),
            _ => ListenError::Other { addr, source },
        }
    }
}

/// Binds with `bind` at `on_ip:on_port`, or, without on-ip, at the IPv6 wildcard address
/// (dual stack: one socket for both families), falling back to the IPv4 wildcard where the
/// namespace has no IPv6.
pub fn bind_listener<T>(
    on_ip: Option<IpAddr>,
    on_port: u16,
    bind: impl Fn(SocketAddr) -> Result<T, ListenError>,
) -> Result<T, ListenError> {
    if let Some(ip) = on_ip {
        return bind(SocketAddr::new(ip, on_port));
    }
    match bind(SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), on_port)) {
        Err(ListenError::Other { source, .. })
            if matches!(
                source.raw_os_error(),
                Some(libc::EAFNOSUPPORT | libc::EADDRNOTAVAIL)
            ) =>
        {
            bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), on_port))
        }
        other => other,
    }
}

/// Undoes the IPv4-mapped form a dual-stack socket reports (`::ffff:192.0.2.1`).
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Is `ip` one of this namespace's own addresses? A plain (non-transparent) bind to it
/// succeeds only then. Used to refuse traffic aimed straight at the proxy's port (a loop).
fn is_local(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// True when `orig_dst` is the proxy's own listener: a client that connected straight to
/// the proxy port. Relaying it would connect the proxy to itself, forever.
pub fn is_own_listener(orig_dst: SocketAddr, listen_addr: Option<SocketAddr>) -> bool {
    let Some(listen) = listen_addr else {
        return false;
    };
    if orig_dst.port() != listen.port() {
        return false;
    }
    if !listen.ip().is_unspecified() {
        return listen.ip().to_canonical() == orig_dst.ip();
    }
    // A wildcard listener: the destination is ours if it is a local address.
    is_local(orig_dst.ip())
}
