//! The transparent TCP listener and what happens to each accepted connection: the
//! original destination is the accepted socket's local address (the classifier never
//! rewrites a packet), the proxy connects there and relays both ways.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use log::{debug, info, warn};
use socket2::{Protocol, Type};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};

use crate::{
    access_log,
    metrics::{self, EndReason},
    relay::{
        self, Ending, RelayMode, Relayed,
        park::ParkedRelay,
        sockmap::{self, KernelRelay},
    },
    tproxy::{
        ListenError, bind_listener, canonical,
        destination::Destinations,
        is_own_listener,
        live::Live,
        return_path::ReturnPath,
        sockopt::{set_keepalive, transparent_socket},
    },
    upstream::{self, Outbound, Upstream},
};

/// Opens the transparent listener at `on_ip:on_port`, or, without on-ip, at the wildcard
/// address (dual stack where the namespace has IPv6), where the kernel's lookup at the
/// ingress interface's address finds it: one socket per worker, `count` in all. More than
/// one form a SO_REUSEPORT group.
pub fn listen(
    on_ip: Option<IpAddr>,
    on_port: u16,
    count: usize,
) -> Result<Vec<std::net::TcpListener>, ListenError> {
    bind_listener(on_ip, on_port, |addr| {
        let fail = |source| ListenError::from_io(addr, source);
        if count > 1 {
            // SO_REUSEPORT would let this group join the group of another agent still
            // running as root on the same port. A bind without it first fails if anything
            // listens there.
            let probe = transparent_socket(&addr, Type::STREAM, Protocol::TCP).map_err(fail)?;
            probe.bind(&addr.into()).map_err(fail)?;
        }
        (0..count)
            .map(|_| {
                let socket =
                    transparent_socket(&addr, Type::STREAM, Protocol::TCP).map_err(fail)?;
                if count > 1 {
                    socket.set_reuse_port(true).map_err(fail)?;
                }
                // Accepted sockets inherit both (`sk_clone_lock` copies the listener's
                // settings): no setsockopt per connection. Relayed bytes go out as they
                // come: no Nagle delay on the client side.
                set_keepalive(socket2::SockRef::from(&socket)).map_err(fail)?;
                socket.set_tcp_nodelay(true).map_err(fail)?;
                socket.bind(&addr.into()).map_err(fail)?;
                socket.listen(1024).map_err(fail)?;
                socket.set_nonblocking(true).map_err(fail)?;
                Ok(socket.into())
            })
            .collect()
    })
}

/// What the accept loop needs to know for each connection.
pub struct ProxyOptions {
    pub upstream: Upstream,
    pub outbound: Outbound,
    pub relay: RelayMode,
    /// A connection that carries no byte either way for this long is reset on both sides
    /// (`--tcp-idle-timeout`); zero: never.
    pub idle_timeout: Duration,
    /// Bounds the number of connections being proxied at once (`--max-connections`).
    pub limit: Arc<Semaphore>,
    /// Counts live connections, for the drain on shutdown.
    pub live: Arc<LiveConnections>,
    /// The in-kernel relay's maps (`--relay sockmap`); without them the proxy copies the
    /// bytes itself (`relay`).
    pub kernel_relay: Option<KernelRelay>,
    /// Original destinations never connected to.
    pub destinations: Arc<Destinations>,
    /// Counts each connection by the rules it was accepted under (the return path).
    pub return_path: Arc<ReturnPath>,
}

/// The TCP connections being proxied (see [`Live`]).
pub type LiveConnections = Live<ParkedConnection>;

/// A connection stopped at a safe point, for the next agent to resume.
pub struct ParkedConnection {
    pub peer: SocketAddr,
    pub orig_dst: SocketAddr,
    /// The listener that accepted it (the loop check).
    pub listen_addr: Option<SocketAddr>,
    /// How long it has been proxied.
    pub age: Duration,
    pub stage: ParkedStage,
}

/// How far a parked connection had got.
pub enum ParkedStage {
    /// Accepted, its upstream connection not made yet: nothing was read from the client,
    /// and the next agent connects upstream itself (the half-made connection is dropped).
    Accepted(TcpStream),
    /// Relaying.
    Relaying(Box<ParkedRelay>),
}

/// Accepts until the task is dropped, one task per connection.
pub async fn serve(listener: TcpListener, options: Arc<ProxyOptions>) {
    let listen_addr = listener.local_addr().ok();
    let mut last_refusal_log: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((client, peer)) => {
                let mut connection = metrics::Connection::accepted();
                let Ok(permit) = Arc::clone(&options.limit).try_acquire_owned() else {
                    connection.ends(EndReason::MaxConnections);
                    if last_refusal_log.is_none_or(|t| t.elapsed() > Duration::from_secs(1)) {
                        warn!("{peer}: refused, --max-connections reached");
                        last_refusal_log = Some(Instant::now());
                    }
                    relay::reset(client);
                    continue;
                };
                let options = Arc::clone(&options);
                let guard = Live::enter(&options.live);
                let accepted = options.return_path.accepted();
                // Boxed: tokio's spawn passes a future by value through several calls
                // before it reaches the task's heap cell, a copy of the whole state at each
                // (some 3.5 KB here, five times per connection); boxed, the state is copied
                // once and the rest move a pointer.
                tokio::spawn(Box::pin(async move {
                    handle(client, peer, listen_addr, &options, &mut connection).await;
                    drop(connection);
                    drop(permit);
                    drop(guard);
                    drop(accepted);
                }));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning or dying.
                warn!("accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn handle(
    client: TcpStream,
    peer: SocketAddr,
    listen_addr: Option<SocketAddr>,
    options: &ProxyOptions,
    connection: &mut metrics::Connection,
) {
    let peer = canonical(peer);
    let orig_dst = match client.local_addr() {
        Ok(addr) => canonical(addr),
        Err(e) => {
            debug!("{peer}: no local address: {e}");
            return connection.ends(EndReason::Error);
        }
    };
    if is_own_listener(orig_dst, listen_addr) {
        warn!(
            "{peer} -> {orig_dst}: connection straight to the proxy port refused (it would loop)"
        );
        return connection.ends(EndReason::Loop);
    }
    if let Some(why) = options.destinations.refuse(orig_dst.ip()) {
        debug!("{peer} -> {orig_dst}: reset, the destination is {why}");
        relay::reset(client);
        return connection.ends(EndReason::RefusedDestination);
    }
    let flow = Flow {
        peer,
        orig_dst,
        listen_addr,
        started: Instant::now(),
    };
    connect_and_relay(client, flow, options, connection).await;
}

/// Who a connection is between, and since when: what its closing line and a parked
/// connection carry.
#[derive(Clone, Copy)]
struct Flow {
    peer: SocketAddr,
    orig_dst: SocketAddr,
    listen_addr: Option<SocketAddr>,
    started: Instant,
}

impl Flow {
    fn park(
        self,
        stage: ParkedStage,
        options: &ProxyOptions,
        connection: &mut metrics::Connection,
    ) {
        options.live.park_one(ParkedConnection {
            peer: self.peer,
            orig_dst: self.orig_dst,
            listen_addr: self.listen_addr,
            age: self.started.elapsed(),
            stage,
        });
        connection.ends(EndReason::HandedOver);
    }

    /// The closing line (or JSON record) and the metrics of a connection that ended.
    fn closing(
        self,
        options: &ProxyOptions,
        connection: &mut metrics::Connection,
        up: u64,
        down: u64,
        ending: Ending,
    ) {
        let Flow {
            peer,
            orig_dst,
            started,
            ..
        } = self;
        connection.relayed(up, down);
        connection.ends(EndReason::of(&ending));
        if access_log::json() {
            access_log::Record {
                udp: false,
                client: peer,
                orig_dst,
                upstream: &options.upstream,
                bytes_up: up,
                bytes_down: down,
                datagrams: None,
                duration: started.elapsed(),
                end: EndReason::of(&ending).name(),
                detail: ending.to_string(),
            }
            .write();
            return;
        }
        info!(
            "{peer} -> {orig_dst}: {up} bytes up, {down} bytes down, {:.1} ms, {ending}",
            started.elapsed().as_secs_f64() * 1e3
        );
    }
}

/// Connects upstream, then relays. Parked while connecting, the client is handed over as
/// accepted: nothing was read from it yet.
async fn connect_and_relay(
    client: TcpStream,
    flow: Flow,
    options: &ProxyOptions,
    connection: &mut metrics::Connection,
) {
    let connect = upstream::connect(
        &options.upstream,
        flow.peer,
        flow.orig_dst,
        options.outbound,
    );
    let upstream = tokio::select! {
        connected = connect => match connected {
            Ok(stream) => {
                connection.connected(flow.started.elapsed());
                stream
            }
            Err(e) => {
                connection.connect_failed(&e);
                relay::reset(client);
                return flow.closing(options, connection, 0, 0, Ending::Refused(e));
            }
        },
        () = options.live.cut_off() => {
            relay::reset(client);
            return flow.closing(options, connection, 0, 0, Ending::Drain);
        }
        () = options.live.park_flag().raised() => {
            return flow.park(ParkedStage::Accepted(client), options, connection);
        }
    };
    let relay = ParkedRelay::new(client, upstream);
    relay_until_end(relay, flow, options, connection).await;
}

/// Relays (a new relay or a resumed one) until the connection ends or is parked.
async fn relay_until_end(
    relay: ParkedRelay,
    flow: Flow,
    options: &ProxyOptions,
    connection: &mut metrics::Connection,
) {
    let (idle, drain) = (options.idle_timeout, options.live.cut_off());
    let outcome = match options.kernel_relay.as_ref() {
        // A relay that has bytes to pass on first (resumed) is copied.
        Some(kernel) if relay.is_fresh() => {
            let _staying = options.live.staying();
            // Boxed: its state (which holds a whole userspace relay for its fallback) would
            // otherwise set the size of every connection's task, which tokio's spawn copies
            // several times over.
            Box::pin(sockmap::relay(
                kernel,
                relay.client,
                relay.upstream,
                idle,
                drain,
            ))
            .await
        }
        _ => match relay::resume(relay, options.relay, idle, drain, options.live.park_flag()).await
        {
            Relayed::Ended(outcome) => outcome,
            Relayed::Parked(relay) => {
                return flow.park(ParkedStage::Relaying(relay), options, connection);
            }
        },
    };
    flow.closing(
        options,
        connection,
        outcome.up,
        outcome.down,
        outcome.ending,
    );
}

/// Resumes a connection the previous agent parked (`crate::handover`), on the calling
/// worker, counted like an accepted one. Its sockets must already be registered with this
/// worker's runtime.
pub async fn resume(parked: ParkedConnection, options: Arc<ProxyOptions>) {
    let mut connection = metrics::Connection::resumed();
    // Over the limit or not, a live connection is not dropped: the permit is taken if
    // there is one.
    let permit = Arc::clone(&options.limit).try_acquire_owned().ok();
    let guard = Live::enter(&options.live);
    let accepted = options.return_path.accepted();
    let flow = Flow {
        peer: parked.peer,
        orig_dst: parked.orig_dst,
        listen_addr: parked.listen_addr,
        started: Instant::now()
            .checked_sub(parked.age)
            .unwrap_or_else(Instant::now),
    };
    match parked.stage {
        ParkedStage::Accepted(client) => {
            connect_and_relay(client, flow, &options, &mut connection).await;
        }
        ParkedStage::Relaying(relay) => {
            relay_until_end(*relay, flow, &options, &mut connection).await;
        }
    }
    drop(connection);
    drop(permit);
    drop(guard);
    drop(accepted);
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr, TcpStream};

    use socket2::{Domain, Protocol, SockRef, Socket, Type};

    use super::*;

    /// What `listen` counts on to set no option per connection: an accepted socket
    /// inherits TCP_NODELAY and the keepalive settings of its listener.
    #[test]
    fn accepted_sockets_inherit_nodelay_and_keepalive_from_the_listener() {
        let listener =
            Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
        set_keepalive(SockRef::from(&listener)).expect("keepalive");
        listener.set_tcp_nodelay(true).expect("nodelay");
        listener
            .bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
            .expect("bind");
        listener.listen(1).expect("listen");
        let addr = listener
            .local_addr()
            .expect("address")
            .as_socket()
            .expect("an IP address");
        let client = TcpStream::connect(addr).expect("connect");
        let (accepted, _) = listener.accept().expect("accept");
        assert!(accepted.tcp_nodelay().expect("TCP_NODELAY"));
        assert!(accepted.keepalive().expect("SO_KEEPALIVE"));
        let listener_idle = listener.tcp_keepalive_time().expect("TCP_KEEPIDLE");
        assert_eq!(
            accepted.tcp_keepalive_time().expect("TCP_KEEPIDLE"),
            listener_idle
        );
        // The connecting side keeps the defaults: the options were the listener's.
        assert!(!client.nodelay().expect("TCP_NODELAY"));
    }
}
