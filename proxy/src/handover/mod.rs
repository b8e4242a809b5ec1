//! Handing the agent over to the next one (issue 19): an upgrade or a restart that loses
//! nothing. The running agent passes its listening sockets, then its live connections,
//! each stopped at a safe point with the bytes it held (`relay/park.rs`), to the next agent
//! of the same table over a Unix socket (SCM_RIGHTS), and exits without its teardown: the
//! classifier, the routes and the listeners were never down. `docs/handover.md` tells the
//! whole story; this is the protocol.
//!
//! ```text
//! next agent (incoming.rs)                      running agent (outgoing.rs)
//!   bind @proxy-stats-<table>: in use
//!   connect @proxy-handover-<table>  ───────►  accept (root or its own user only)
//!   Hello { version }                ───────►
//!                                    ◄───────  Welcome { version, args } | Refused
//!   SendListeners                    ───────►  sends copies; goes on accepting on them
//!                                    ◄───────  Listeners + fds
//!   loads its programs and tables, takes the listeners, replaces the classifier in place,
//!   accepts on them too
//!   Ready                            ───────►  stops accepting (the sockets stay open),
//!                                              parks every relay at a safe point
//!                                    ◄───────  Connection + fds + held bytes, one each
//!                                    ◄───────  Done { moved, staying }
//!   resumes them; Resumed            ───────►  exits without teardown (after draining the
//!                                              relays that cannot move: --relay sockmap)
//! ```
//!
//! Until `Resumed`, the running agent keeps a copy of everything it sent: if the next one
//! fails or goes away first, it takes its listeners (and, if they were sent, its
//! connections) back, puts its own classifier back in place, and serves on.

mod incoming;
mod outgoing;
mod wire;

use std::{
    io,
    net::{IpAddr, SocketAddr},
    os::fd::OwnedFd,
    time::Duration,
};

use serde::{Deserialize, Serialize};

pub use self::{
    incoming::{Inherited, Predecessor, is_running},
    outgoing::{Greeting, Successor},
    wire::{Channel, Listener},
};
use crate::{
    metrics::UdpTally,
    relay::park::{DirectionState, ParkedRelay},
    tproxy::{
        tcp::{ParkedConnection, ParkedStage},
        udp::{ParkedSession, UdpUpstream},
    },
};

/// The protocol's version: two agents hand over only if they speak the same one.
pub const VERSION: u32 = 1;

/// How long one side waits for the other's next message in the exchange, but for the
/// next agent's set-up (loading its programs), which [`SETUP_TIMEOUT`] bounds.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the running agent waits for its relays to reach a safe point: each stops at
/// its next await, so this is only ever reached by a relay stuck in the kernel.
pub const PARK_TIMEOUT: Duration = Duration::from_secs(2);

/// The handover failed; the running agent keeps serving.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// A socket operation failed.
    #[error("{0}")]
    Io(&'static str, #[source] io::Error),
    /// The peer is neither root nor the agent's own user.
    #[error("the peer (pid {pid}, uid {uid}) is neither root nor this agent's user")]
    Peer { pid: i32, uid: u32 },
    /// The other side closed the channel.
    #[error("the other agent closed the handover channel")]
    Closed,
    /// No message in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// A message that does not follow the protocol.
    #[error("unexpected message: {0}")]
    Malformed(String),
    /// The running agent refused.
    #[error("the running agent refused: {0}")]
    Refused(String),
}

/// What the agents say to each other. Descriptors and held bytes travel beside a message
/// (`wire.rs`), in the order its fields say.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// The next agent, or `proxy upgrade` asking what runs (`take_over: false`).
    Hello {
        version: u32,
        agent: String,
        take_over: bool,
    },
    /// The running agent: its version, its process id (the socket's credentials name the
    /// process that listened on it, which may have handed it over since), and the arguments
    /// it was started with (what `proxy upgrade` starts the next agent with).
    Welcome {
        version: u32,
        agent: String,
        pid: u32,
        args: Vec<String>,
    },
    Refused {
        reason: String,
    },
    SendListeners,
    /// Descriptors: each TCP group's sockets in order, then each UDP listener, then the
    /// stats socket, the handover socket and the metrics listener where present.
    Listeners {
        tcp: Vec<TcpGroup>,
        udp: Vec<ListenerAddr>,
        metrics: Option<SocketAddr>,
    },
    /// The next agent serves: send the connections.
    Ready,
    /// Descriptors: the client's socket, then the upstream one if relaying. Payload: the
    /// bytes held up, then down.
    Connection(ConnectionState),
    /// Descriptors: the reply socket, the upstream (or SOCKS5 relay) socket, then the SOCKS5
    /// control connection if any. Payload: the SOCKS5 header.
    UdpSession(SessionState),
    Done {
        moved: usize,
        staying: usize,
    },
    Resumed {
        count: usize,
    },
}

/// A TCP listener's address and how many sockets its SO_REUSEPORT group has.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct TcpGroup {
    pub on_ip: Option<IpAddr>,
    pub on_port: u16,
    pub sockets: usize,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListenerAddr {
    pub on_ip: Option<IpAddr>,
    pub on_port: u16,
}

/// A parked connection, but for its sockets and held bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnectionState {
    pub peer: SocketAddr,
    pub orig_dst: SocketAddr,
    pub listen_addr: Option<SocketAddr>,
    pub age_ms: u64,
    /// None: accepted, not connected upstream yet.
    pub relay: Option<RelayState>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RelayState {
    pub up: DirectionWire,
    pub down: DirectionWire,
    pub first_fin_passed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DirectionWire {
    pub total: u64,
    pub finished: bool,
    /// How many bytes of the payload are this direction's.
    pub held: usize,
}

/// A parked UDP session, but for its sockets.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionState {
    pub client: SocketAddr,
    pub orig_dst: SocketAddr,
    pub age_ms: u64,
    pub datagrams_up: u64,
    pub datagrams_down: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Through a SOCKS5 relay (UDP ASSOCIATE): its header is the payload.
    pub socks5: bool,
}

/// A parked UDP session as descriptors.
pub struct PortableSession {
    pub state: SessionState,
    pub header: Vec<u8>,
    pub reply: OwnedFd,
    pub upstream: OwnedFd,
    pub control: Option<OwnedFd>,
}

impl PortableSession {
    /// Takes a parked session's sockets out of this runtime.
    pub fn from_parked(parked: ParkedSession) -> io::Result<Self> {
        let udp = |s: tokio::net::UdpSocket| s.into_std().map(OwnedFd::from);
        let (upstream, control, header) = match parked.upstream {
            UdpUpstream::Direct(socket) => (udp(socket)?, None, Vec::new()),
            UdpUpstream::Socks5 {
                control,
                relay,
                header,
            } => (
                udp(relay)?,
                Some(control.into_std().map(OwnedFd::from)?),
                header,
            ),
        };
        let tally = parked.tally;
        Ok(PortableSession {
            state: SessionState {
                client: parked.client,
                orig_dst: parked.orig_dst,
                age_ms: u64::try_from(parked.age.as_millis()).unwrap_or(u64::MAX),
                datagrams_up: tally.datagrams_up,
                datagrams_down: tally.datagrams_down,
                bytes_up: tally.bytes_up,
                bytes_down: tally.bytes_down,
                socks5: control.is_some(),
            },
            header,
            reply: udp(parked.reply)?,
            upstream,
            control,
        })
    }

    /// Makes it a parked session of this runtime again (its sockets register with the
    /// calling runtime).
    pub fn into_parked(self) -> io::Result<ParkedSession> {
        let udp = |fd: OwnedFd| tokio::net::UdpSocket::from_std(std::net::UdpSocket::from(fd));
        let PortableSession {
            state,
            header,
            reply,
            upstream,
            control,
        } = self;
        let upstream = match (state.socks5, control) {
            (false, _) => UdpUpstream::Direct(udp(upstream)?),
            (true, Some(control)) => UdpUpstream::Socks5 {
                control: tokio::net::TcpStream::from_std(std::net::TcpStream::from(control))?,
                relay: udp(upstream)?,
                header,
            },
            (true, None) => return Err(io::Error::other("a SOCKS5 session without its control")),
        };
        Ok(ParkedSession {
            client: state.client,
            orig_dst: state.orig_dst,
            age: Duration::from_millis(state.age_ms),
            tally: UdpTally {
                datagrams_up: state.datagrams_up,
                datagrams_down: state.datagrams_down,
                bytes_up: state.bytes_up,
                bytes_down: state.bytes_down,
            },
            reply: udp(reply)?,
            upstream,
        })
    }

    fn record(&self) -> io::Result<wire::Record> {
        let mut fds = vec![self.reply.try_clone()?, self.upstream.try_clone()?];
        if let Some(control) = &self.control {
            fds.push(control.try_clone()?);
        }
        Ok(wire::Record {
            message: Message::UdpSession(self.state.clone()),
            payload: self.header.clone(),
            fds,
        })
    }
}

/// What moves between agents: connections and sessions.
pub enum Moved {
    Tcp(Portable),
    Udp(PortableSession),
}

impl Moved {
    fn record(&self) -> io::Result<wire::Record> {
        match self {
            Moved::Tcp(connection) => connection.record(),
            Moved::Udp(session) => session.record(),
        }
    }
}

/// A parked connection as descriptors: what crosses to the next agent, and what the
/// running agent keeps until the next one has resumed it.
pub struct Portable {
    pub state: ConnectionState,
    pub held: Vec<u8>,
    pub client: OwnedFd,
    pub upstream: Option<OwnedFd>,
}

impl Portable {
    /// Takes a parked connection's sockets out of this runtime.
    pub fn from_parked(parked: ParkedConnection) -> io::Result<Self> {
        let mut state = ConnectionState {
            peer: parked.peer,
            orig_dst: parked.orig_dst,
            listen_addr: parked.listen_addr,
            age_ms: u64::try_from(parked.age.as_millis()).unwrap_or(u64::MAX),
            relay: None,
        };
        let (client, upstream, held) = match parked.stage {
            ParkedStage::Accepted(client) => (client, None, Vec::new()),
            ParkedStage::Relaying(relay) => {
                let ParkedRelay {
                    client,
                    upstream,
                    up,
                    down,
                    first_fin_passed,
                } = *relay;
                let wire = |d: &DirectionState| DirectionWire {
                    total: d.total,
                    finished: d.finished,
                    held: d.pending.len(),
                };
                state.relay = Some(RelayState {
                    up: wire(&up),
                    down: wire(&down),
                    first_fin_passed,
                });
                (client, Some(upstream), [up.pending, down.pending].concat())
            }
        };
        let fd = |s: tokio::net::TcpStream| s.into_std().map(OwnedFd::from);
        Ok(Portable {
            state,
            held,
            client: fd(client)?,
            upstream: upstream.map(fd).transpose()?,
        })
    }

    /// Makes it a parked connection of this runtime again (in the task that resumes it:
    /// its sockets register with the calling runtime).
    pub fn into_parked(self) -> io::Result<ParkedConnection> {
        let stream = |fd: OwnedFd| tokio::net::TcpStream::from_std(std::net::TcpStream::from(fd));
        let Portable {
            state,
            mut held,
            client,
            upstream,
        } = self;
        let stage = match (state.relay, upstream) {
            (None, _) => ParkedStage::Accepted(stream(client)?),
            (Some(relay), Some(upstream)) => {
                if relay.up.held + relay.down.held != held.len() {
                    return Err(io::Error::other("held bytes do not add up"));
                }
                let down_pending = held.split_off(relay.up.held);
                let direction = |d: &DirectionWire, pending| DirectionState {
                    total: d.total,
                    finished: d.finished,
                    pending,
                };
                ParkedStage::Relaying(Box::new(ParkedRelay {
                    client: stream(client)?,
                    upstream: stream(upstream)?,
                    up: direction(&relay.up, held),
                    down: direction(&relay.down, down_pending),
                    first_fin_passed: relay.first_fin_passed,
                }))
            }
            (Some(_), None) => return Err(io::Error::other("a relay without its upstream socket")),
        };
        Ok(ParkedConnection {
            peer: state.peer,
            orig_dst: state.orig_dst,
            listen_addr: state.listen_addr,
            age: Duration::from_millis(state.age_ms),
            stage,
        })
    }

    /// Copies of its descriptors and bytes, as a record to send.
    fn record(&self) -> io::Result<wire::Record> {
        let mut fds = vec![self.client.try_clone()?];
        if let Some(upstream) = &self.upstream {
            fds.push(upstream.try_clone()?);
        }
        Ok(wire::Record {
            message: Message::Connection(self.state.clone()),
            payload: self.held.clone(),
            fds,
        })
    }
}
