//! Socket options of a transparent proxy, each with the reason it is needed.

use std::{io, net::SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// IP_TRANSPARENT or IPV6_TRANSPARENT, for a socket of `addr`'s family: what lets it bind
/// an address that is not local (a client's, an original destination).
pub fn set_transparent(socket: &Socket, addr: &SocketAddr) -> io::Result<()> {
    match addr {
        SocketAddr::V4(_) => socket.set_ip_transparent_v4(true),
        SocketAddr::V6(_) => socket.set_ip_transparent_v6(true),
    }
}

/// A socket of `ty` for `addr`'s family with `IP_TRANSPARENT` (`IPV6_TRANSPARENT`) set
/// before bind: the kernel only hands a TPROXY-assigned packet to a transparent socket
/// (`nf_tproxy_sk_is_transparent`), the flag lets it bind a non-local address (`--on-ip`
/// that is not configured, or an original destination), and accepted sockets inherit it.
/// Needs CAP_NET_ADMIN (or CAP_NET_RAW).
pub fn transparent_socket(addr: &SocketAddr, ty: Type, protocol: Protocol) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(*addr), ty, Some(protocol))?;
    set_transparent(&socket, addr)?;
    // A wildcard IPv6 listener also takes IPv4 (dual stack), so one socket serves both
    // families of a rule without --on-ip.
    if addr.is_ipv6() && addr.ip().is_unspecified() {
        socket.set_only_v6(false)?;
    }
    // A restarted agent must be able to bind while connections of the previous one sit
    // in TIME_WAIT.
    socket.set_reuse_address(true)?;
    Ok(socket)
}
