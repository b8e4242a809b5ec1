//! The agent's part in a handover (the protocol is `crate::handover`): the next agent
//! claims the table from the running one ([`claim_table`]), the running one hands over
//! ([`Agent::hand_over`]) or, if anything fails on the way, takes it all back and serves on.

use std::os::fd::{AsFd as _, OwnedFd};

use log::{error, info, warn};
use tokio::net::UnixListener;

use super::{Agent, AgentError, listeners::Paused, serve::Inputs};
use crate::{
    error_chain,
    handover::{
        Channel, Greeting, HandoverError, Inherited, Moved, Portable, PortableSession, Predecessor,
        Successor,
    },
    stats,
};

/// The routing table, claimed: its stats socket (which only one agent can hold), and, if
/// an agent was running on it, that agent with what it handed over already.
pub struct Claim {
    pub stats: UnixListener,
    pub predecessor: Option<Predecessor>,
    pub inherited: Inherited,
}

/// Claims `table`: binds its stats socket, or, if an agent holds it, asks that agent to hand
/// over and takes its listeners. It keeps serving if this fails.
pub async fn claim_table(table: u32) -> Result<Claim, AgentError> {
    match stats::listen(table) {
        Ok(stats) => {
            return Ok(Claim {
                stats,
                predecessor: None,
                inherited: Inherited::default(),
            });
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {}
        Err(e) => return Err(AgentError::Io("binding the stats socket", e)),
    }
    let failed = |e| AgentError::Handover(table, e);
    let Some(predecessor) = Predecessor::connect(table, true).await.map_err(failed)? else {
        return Err(AgentError::TableInUse(table));
    };
    info!(
        "an agent runs on table {table} (pid {}, proxy {}): taking over from it",
        predecessor.pid.unwrap_or(0),
        predecessor.agent
    );
    let mut inherited = predecessor.take_listeners().await.map_err(failed)?;
    let stats = inherited
        .stats
        .take()
        .ok_or(HandoverError::Malformed("no stats socket".into()))
        .and_then(|l| {
            l.set_nonblocking(true)
                .and_then(|()| UnixListener::from_std(l))
                .map_err(|e| HandoverError::Io("taking the stats socket", e))
        })
        .map_err(failed)?;
    Ok(Claim {
        stats,
        predecessor: Some(predecessor),
        inherited,
    })
}

/// How a handover request ended, for the serve loop.
pub enum HandedOver {
    /// Everything moved (but `staying` connections, which drain here): exit now.
    Yes { staying: usize },
    /// Refused, only a question, or failed and taken back: serve on.
    No,
}

impl Agent {
    /// Answers a connection on the handover socket: hands everything over to the next
    /// agent, or, if anything fails on the way, takes it back and serves on.
    pub(super) async fn hand_over(&mut self, channel: Channel, inputs: &Inputs) -> HandedOver {
        let args: Vec<String> = std::env::args().skip(1).collect();
        let successor = match Successor::greet(channel, args).await {
            Ok(Greeting::TakeOver(successor)) => successor,
            Ok(Greeting::Answered) => return HandedOver::No,
            Err(e) => {
                warn!("handover refused, serving on: {}", error_chain(&e));
                return HandedOver::No;
            }
        };
        info!(
            "handover: the next agent (pid {}, proxy {}) takes over; it gets the listeners, \
             which this agent accepts on until it serves",
            successor.pid.unwrap_or(0),
            successor.agent
        );
        // Copies: this agent goes on accepting while the next one sets up (loading its
        // programs can take seconds on a busy host), so that no connection waits in a
        // backlog that nobody serves; what it accepts meanwhile is moved with the rest.
        let own_sockets = || -> std::io::Result<(Paused, OwnedFd, OwnedFd)> {
            Ok((
                self.listeners.copies()?,
                inputs.stats.as_fd().try_clone_to_owned()?,
                inputs.handover.dup()?,
            ))
        };
        let sent = match own_sockets() {
            Ok((listeners, stats, handover)) => {
                successor
                    .send_listeners(&listeners, stats, handover, inputs.metrics.listener())
                    .await
            }
            Err(e) => Err(HandoverError::Io("copying the agent's sockets", e)),
        };
        let ready = match sent {
            Ok(()) => successor.wait_ready().await,
            Err(e) => Err(e),
        };
        if let Err(e) = ready {
            self.take_back(None, Vec::new(), &e);
            return HandedOver::No;
        }
        // The next agent's classifier is in place and it accepts: this one stops accepting
        // (the sockets stay open, the next agent serves them), and parks every relay.
        let paused = self.listeners.pause().await;
        let (parked, sessions) = tokio::join!(
            self.live.park_all(crate::handover::PARK_TIMEOUT),
            self.udp_live.park_all(crate::handover::PARK_TIMEOUT),
        );
        // What is live still did not park: the in-kernel relay (or one stuck past the
        // timeout). It drains here.
        let staying = self.live.count() + self.udp_live.count();
        let mut portable = Vec::with_capacity(parked.len() + sessions.len());
        for connection in parked {
            match Portable::from_parked(connection) {
                Ok(p) => portable.push(Moved::Tcp(p)),
                Err(e) => warn!("a parked connection cannot be handed over, it is lost: {e}"),
            }
        }
        for session in sessions {
            match PortableSession::from_parked(session) {
                Ok(p) => portable.push(Moved::Udp(p)),
                Err(e) => warn!("a parked UDP session cannot be handed over, it is lost: {e}"),
            }
        }
        match successor.send_connections(&portable, staying).await {
            Ok(_) => HandedOver::Yes { staying },
            Err(e) => {
                self.take_back(Some(&paused), portable, &e);
                HandedOver::No
            }
        }
    }

    /// The next agent's last step: it serves, so it takes the running agent's connections
    /// and resumes them. If that fails while the running agent lives, that agent takes
    /// everything back (`take_back`) and this one must leave: the error says so.
    pub(super) async fn take_connections(
        &mut self,
        predecessor: Predecessor,
    ) -> Result<(), AgentError> {
        let pid = predecessor.pid;
        let listeners = &mut self.listeners;
        let taken = predecessor
            .take_connections(|moved| listeners.resume(vec![moved]) == 1)
            .await;
        match taken {
            Ok(_) => {
                self.predecessor_serves = false;
                Ok(())
            }
            Err(e) if pid.is_some_and(crate::handover::is_running) => {
                Err(AgentError::Handover(self.args.table, e))
            }
            Err(e) => {
                warn!(
                    "handover: the previous agent went away during it ({}): this one serves; \
                     the connections it had not sent are lost",
                    error_chain(&e)
                );
                self.predecessor_serves = false;
                Ok(())
            }
        }
    }

    /// The handover failed: the listeners serve here again, the connections parked for it
    /// resume here, and this agent's own classifier is put back in place (the next agent
    /// may have replaced it before it failed).
    fn take_back(&mut self, paused: Option<&Paused>, parked: Vec<Moved>, why: &HandoverError) {
        error!(
            "handover failed, this agent serves on: {}",
            error_chain(why)
        );
        self.live.unpark();
        self.udp_live.unpark();
        if let Err(e) = self.reassert_classifier() {
            error!("putting this agent's classifier back: {}", error_chain(&e));
        }
        if let Some(paused) = paused
            && let Err(e) = self
                .listeners
                .unpause(&mut self.installed.classifier, paused)
        {
            error!("taking the listeners back: {}", error_chain(&e));
        }
        let count = parked.len();
        let resumed = self.listeners.resume(parked);
        if count > 0 {
            info!(
                "handover: {resumed} of {count} parked connection(s) and UDP session(s) resumed \
                 here"
            );
        }
    }

    /// Attaches this agent's programs again where they are attached (in place of the
    /// next agent's, if it put its own there).
    fn reassert_classifier(&mut self) -> Result<(), AgentError> {
        let classifier = &mut self.installed.classifier;
        classifier.attach_sk_lookup()?;
        for (name, header) in self.interfaces.names().zip(&self.headers) {
            classifier.attach(name, *header, self.args.tc_attach)?;
        }
        if let Some(local) = &self.local {
            classifier.attach_local(&local.attach_to)?;
        }
        Ok(())
    }
}
