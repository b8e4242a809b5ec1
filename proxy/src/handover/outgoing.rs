//! The running agent's side of the handover: it answers the next agent, hands its
//! listeners over, then its connections, and keeps copies of everything until the next
//! one has resumed them.

use std::{net::SocketAddr, os::fd::OwnedFd};

use log::info;

use super::{
    HandoverError, ListenerAddr, Message, Moved, SETUP_TIMEOUT, STEP_TIMEOUT, TcpGroup, VERSION,
    wire::{Channel, MAX_FDS, Record},
};
use crate::agent::Paused;

/// The next agent, as the running one sees it.
pub struct Successor {
    channel: Channel,
    pub pid: Option<i32>,
    pub agent: String,
}

/// Whether the peer wants to take over, or only asked what runs.
pub enum Greeting {
    TakeOver(Successor),
    Answered,
}

impl Successor {
    /// Reads the peer's hello and answers it with `args`, or refuses a version this agent
    /// does not speak.
    pub async fn greet(channel: Channel, args: Vec<String>) -> Result<Greeting, HandoverError> {
        let pid = channel.peer_pid();
        let hello = channel.recv(STEP_TIMEOUT).await;
        let (version, agent, take_over) = match hello.map(|r| r.message) {
            Ok(Message::Hello {
                version,
                agent,
                take_over,
            }) => (version, agent, take_over),
            Ok(other) => return Err(HandoverError::Malformed(format!("{other:?}"))),
            Err(HandoverError::Malformed(why)) => {
                let reason = format!(
                    "its hello cannot be read by this agent (proxy {}, handover version \
                     {VERSION}): {why}",
                    env!("CARGO_PKG_VERSION")
                );
                let _ = channel
                    .send(Record::new(Message::Refused {
                        reason: reason.clone(),
                    }))
                    .await;
                return Err(HandoverError::Refused(reason));
            }
            Err(e) => return Err(e),
        };
        channel
            .send(Record::new(Message::Welcome {
                version: VERSION,
                agent: env!("CARGO_PKG_VERSION").to_owned(),
                pid: std::process::id(),
                args,
            }))
            .await?;
        if version != VERSION {
            return Err(HandoverError::Refused(format!(
                "the next agent (pid {}, proxy {agent}) speaks handover version {version}, this \
                 one version {VERSION}",
                pid.unwrap_or(0)
            )));
        }
        if !take_over {
            return Ok(Greeting::Answered);
        }
        let request = channel.recv(STEP_TIMEOUT).await?;
        if !matches!(request.message, Message::SendListeners) {
            return Err(HandoverError::Malformed(format!("{:?}", request.message)));
        }
        Ok(Greeting::TakeOver(Successor {
            channel,
            pid,
            agent,
        }))
    }

    /// Sends copies of the paused listeners and of the agent's own sockets.
    pub async fn send_listeners(
        &self,
        paused: &Paused,
        stats: OwnedFd,
        handover: OwnedFd,
        metrics: Option<(SocketAddr, OwnedFd)>,
    ) -> Result<(), HandoverError> {
        let copy = |fd: &OwnedFd| {
            fd.try_clone()
                .map_err(|e| HandoverError::Io("copying a listener's descriptor", e))
        };
        let mut fds = Vec::new();
        let mut tcp = Vec::new();
        for ((on_ip, on_port), _, group) in &paused.tcp {
            for fd in group {
                fds.push(copy(fd)?);
            }
            tcp.push(TcpGroup {
                on_ip: *on_ip,
                on_port: *on_port,
                sockets: group.len(),
            });
        }
        let mut udp = Vec::new();
        for ((on_ip, on_port), fd) in &paused.udp {
            fds.push(copy(fd)?);
            udp.push(ListenerAddr {
                on_ip: *on_ip,
                on_port: *on_port,
            });
        }
        fds.push(stats);
        fds.push(handover);
        let metrics = metrics.map(|(addr, fd)| {
            fds.push(fd);
            addr
        });
        if fds.len() > MAX_FDS {
            return Err(HandoverError::Io(
                "sending the listeners",
                std::io::Error::other(format!(
                    "{} sockets, more than one message carries ({MAX_FDS})",
                    fds.len()
                )),
            ));
        }
        self.channel
            .send(Record {
                message: Message::Listeners { tcp, udp, metrics },
                payload: Vec::new(),
                fds,
            })
            .await
    }

    /// Waits until the next agent serves (it loads its programs meanwhile).
    pub async fn wait_ready(&self) -> Result<(), HandoverError> {
        let record = self.channel.recv(SETUP_TIMEOUT).await?;
        match record.message {
            Message::Ready => Ok(()),
            other => Err(HandoverError::Malformed(format!("{other:?}"))),
        }
    }

    /// Sends copies of the parked connections, then waits until the next agent says it
    /// resumed them. Until then `connections` keep their sockets here.
    pub async fn send_connections(
        &self,
        connections: &[Moved],
        staying: usize,
    ) -> Result<usize, HandoverError> {
        for connection in connections {
            let record = connection
                .record()
                .map_err(|e| HandoverError::Io("copying a connection's descriptors", e))?;
            self.channel.send(record).await?;
        }
        self.channel
            .send(Record::new(Message::Done {
                moved: connections.len(),
                staying,
            }))
            .await?;
        let record = self.channel.recv(STEP_TIMEOUT).await?;
        match record.message {
            Message::Resumed { count } => {
                info!(
                    "handover: the next agent (pid {}, proxy {}) resumed {count} of {} \
                     connection(s) and UDP session(s)",
                    self.pid.unwrap_or(0),
                    self.agent,
                    connections.len()
                );
                Ok(count)
            }
            other => Err(HandoverError::Malformed(format!("{other:?}"))),
        }
    }
}
