//! The next agent's side of the handover: it finds the running agent, takes its listeners
//! before it sets itself up, and its connections once it serves.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::OwnedFd,
    time::{Duration, Instant},
};

use log::{info, warn};

use super::{
    HandoverError, Message, Moved, Portable, PortableSession, SETUP_TIMEOUT, STEP_TIMEOUT, VERSION,
    wire::{Channel, Record},
};
use crate::agent::ListenerKey;

/// What the previous agent handed over before the next one set itself up: its listeners
/// and its own sockets (stats, handover, metrics), each taken where the new settings use
/// the same address, and closed otherwise.
#[derive(Default)]
pub struct Inherited {
    pub tcp: HashMap<ListenerKey, Vec<std::net::TcpListener>>,
    pub udp: HashMap<ListenerKey, std::net::UdpSocket>,
    pub stats: Option<std::os::unix::net::UnixListener>,
    pub handover: Option<OwnedFd>,
    pub metrics: Option<(SocketAddr, std::net::TcpListener)>,
}

/// The running agent, as the next one sees it.
pub struct Predecessor {
    channel: Channel,
    pub pid: Option<i32>,
    /// Its version, as it says.
    pub agent: String,
    /// The arguments it was started with.
    pub args: Vec<String>,
}

impl Predecessor {
    /// Connects to the agent of `table`, says hello and reads its answer. `Ok(None)`: no
    /// agent listens there (one that died uncleanly, whose pins are taken over instead).
    /// `take_over: false` only asks what runs (`proxy upgrade`).
    pub async fn connect(table: u32, take_over: bool) -> Result<Option<Self>, HandoverError> {
        let Some(channel) = Channel::connect(table)? else {
            return Ok(None);
        };
        channel
            .send(Record::new(Message::Hello {
                version: VERSION,
                agent: env!("CARGO_PKG_VERSION").to_owned(),
                take_over,
            }))
            .await?;
        match channel.recv(STEP_TIMEOUT).await?.message {
            Message::Welcome {
                version: VERSION,
                agent,
                pid,
                args,
            } => Ok(Some(Predecessor {
                channel,
                pid: i32::try_from(pid).ok(),
                agent,
                args,
            })),
            Message::Welcome { version, agent, .. } => Err(HandoverError::Refused(format!(
                "it (proxy {agent}) speaks handover version {version}, this one (proxy {}) \
                 version {VERSION}",
                env!("CARGO_PKG_VERSION")
            ))),
            Message::Refused { reason } => Err(HandoverError::Refused(reason)),
            other => Err(unexpected(&other)),
        }
    }

    /// Asks for the listeners: the running agent sends copies and goes on accepting on
    /// them until this one serves (its setup may take seconds on a busy host).
    pub async fn take_listeners(&self) -> Result<Inherited, HandoverError> {
        self.channel
            .send(Record::new(Message::SendListeners))
            .await?;
        let record = self.channel.recv(STEP_TIMEOUT).await?;
        let Message::Listeners { tcp, udp, metrics } = record.message else {
            return Err(unexpected(&record.message));
        };
        let mut fds = record.fds.into_iter();
        let mut next = |what: &str| {
            fds.next()
                .ok_or_else(|| HandoverError::Malformed(format!("no descriptor for {what}")))
        };
        let mut inherited = Inherited::default();
        for group in tcp {
            let sockets = (0..group.sockets)
                .map(|_| next("a TCP listener").map(std::net::TcpListener::from))
                .collect::<Result<Vec<_>, _>>()?;
            inherited.tcp.insert((group.on_ip, group.on_port), sockets);
        }
        for listener in udp {
            let socket = std::net::UdpSocket::from(next("a UDP listener")?);
            inherited
                .udp
                .insert((listener.on_ip, listener.on_port), socket);
        }
        inherited.stats = Some(next("the stats socket")?.into());
        inherited.handover = Some(next("the handover socket")?);
        if let Some(addr) = metrics {
            inherited.metrics = Some((addr, next("the metrics listener")?.into()));
        }
        info!(
            "handover: took {} TCP and {} UDP listener(s) from the running agent (pid {}, \
             proxy {})",
            inherited.tcp.len(),
            inherited.udp.len(),
            self.pid.unwrap_or(0),
            self.agent
        );
        Ok(inherited)
    }

    /// Says this agent serves, and takes the running agent's connections, each resumed by
    /// `resume` as it comes (so none waits for the last). Returns how many moved, and how
    /// many stay with the running agent until they end.
    pub async fn take_connections(
        self,
        mut resume: impl FnMut(Moved) -> bool,
    ) -> Result<(usize, usize), HandoverError> {
        let started = Instant::now();
        self.channel.send(Record::new(Message::Ready)).await?;
        let mut resumed = 0;
        let (moved, staying) = loop {
            let record = self.channel.recv(SETUP_TIMEOUT).await?;
            match record.message {
                Message::Connection(state) => {
                    let mut fds = record.fds.into_iter();
                    let Some(client) = fds.next() else {
                        return Err(HandoverError::Malformed(
                            "a connection without its socket".into(),
                        ));
                    };
                    let portable = Portable {
                        state,
                        held: record.payload,
                        client,
                        upstream: fds.next(),
                    };
                    if resume(Moved::Tcp(portable)) {
                        resumed += 1;
                    }
                }
                Message::UdpSession(state) => {
                    let mut fds = record.fds.into_iter();
                    let (Some(reply), Some(upstream)) = (fds.next(), fds.next()) else {
                        return Err(HandoverError::Malformed(
                            "a UDP session without its sockets".into(),
                        ));
                    };
                    let session = PortableSession {
                        state,
                        header: record.payload,
                        reply,
                        upstream,
                        control: fds.next(),
                    };
                    if resume(Moved::Udp(session)) {
                        resumed += 1;
                    }
                }
                Message::Done { moved, staying } => break (moved, staying),
                other => return Err(unexpected(&other)),
            }
        };
        if resumed != moved {
            warn!("handover: {moved} connection(s) sent, {resumed} resumed");
        }
        self.channel
            .send(Record::new(Message::Resumed { count: resumed }))
            .await?;
        info!(
            "handover: {resumed} live connection(s) and UDP session(s) moved in {:.1} ms{}",
            started.elapsed().as_secs_f64() * 1e3,
            if staying > 0 {
                format!("; {staying} stay with the previous agent until they end (in-kernel relay)")
            } else {
                String::new()
            }
        );
        Ok((resumed, staying))
    }

    /// Waits for the previous agent to exit: for `proxy upgrade`, which is done then.
    pub fn wait_exit(&self, timeout: Duration) -> bool {
        let Some(pid) = self.pid else { return false };
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if !is_running(pid) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

/// Whether process `pid` runs: it exists and is not a zombie (exited, not yet reaped by its
/// parent, which may be whoever started it).
pub fn is_running(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            // The state follows the command name, which is in parentheses and may hold
            // spaces.
            stat.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
}

fn unexpected(message: &Message) -> HandoverError {
    HandoverError::Malformed(format!("{message:?}"))
}
