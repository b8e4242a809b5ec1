//! Socket options of a transparent proxy, each with the reason it is needed.

use std::{io, net::SocketAddr, time::Duration};

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

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

/// Silence after which a proxied connection's socket sends its first keepalive probe.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
/// Time between unanswered probes.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
/// Unanswered probes after which the peer is taken for dead.
const KEEPALIVE_PROBES: u32 = 6;

/// TCP keepalive (SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT) on a proxied
/// connection's socket, client or upstream leg: a peer that vanished (powered off, its link
/// gone, forgotten by a NAT) sends neither FIN nor RST, and without probes its connection
/// would hold two descriptors and a `--max-connections` slot for as long as the idle timeout
/// allows, forever with `--tcp-idle-timeout 0`. With these values a dead peer is found two
/// minutes after it went silent (60 s + 6 x 10 s): the socket fails with ETIMEDOUT and the
/// relay resets both legs. On a listener, accepted sockets inherit it (`sk_clone_lock`
/// copies the settings, `tcp_create_openreq_child` arms the timer); the upstream leg gets it
/// once the connection has been relayed for a second (`relay::keepalive_later`).
pub fn set_keepalive(socket: SockRef<'_>) -> io::Result<()> {
    socket.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES),
    )
}
