//! The agent's own transparent listeners, as sockets: opened for a plan of
//! [`slots`](super::slots), registered in the classifier's sockmap and served, and closed.
//! Opening binds (a port in use fails here, before anything a packet can see changes);
//! starting is what makes them reachable.

use std::{collections::HashMap, io, net::SocketAddr, os::fd::OwnedFd, sync::Arc, time::Duration};

use log::{info, warn};
use tokio::task::JoinHandle;

use super::{
    AgentError,
    slots::{Keys, ListenerKey, Open, SlotPlan},
};
use crate::{
    ebpf::Classifier,
    handover::{Inherited, Moved},
    tproxy::{
        ListenError,
        tcp::{self, ProxyOptions},
        udp::{self, UdpOptions},
        workers::Workers,
    },
};

/// How long [`Listeners::close`] waits for a listener's sockets to be closed.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The running listeners: TCP ones with their sockmap slot and an accept task on each
/// worker, UDP ones with their receive task; each with a copy of its descriptors, kept to
/// hand it over ([`Listeners::pause`]).
pub struct Listeners {
    options: Arc<ProxyOptions>,
    udp_options: Arc<UdpOptions>,
    workers: Workers,
    running: HashMap<ListenerKey, Running>,
    udp_running: HashMap<ListenerKey, (SocketAddr, JoinHandle<()>, OwnedFd)>,
    /// Whose turn it is to take the next resumed connection.
    next_worker: usize,
}

/// A running TCP listener.
struct Running {
    slot: u32,
    addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
    /// Copies of its group's sockets.
    fds: Vec<OwnedFd>,
}

/// Listeners that stopped accepting to be handed over, their sockets open: connections wait
/// in their backlogs. Given back with [`Listeners::unpause`] if the handover fails.
#[derive(Default)]
pub struct Paused {
    pub tcp: Vec<(ListenerKey, u32, Vec<OwnedFd>)>,
    pub udp: Vec<(ListenerKey, OwnedFd)>,
}

impl Paused {
    /// The same sockets again, as listeners to start.
    fn to_pending(&self) -> io::Result<Pending> {
        let mut pending = Pending::default();
        for (key, slot, fds) in &self.tcp {
            let group = fds
                .iter()
                .map(|fd| fd.try_clone().map(std::net::TcpListener::from))
                .collect::<io::Result<_>>()?;
            pending.tcp.push((*key, *slot, group));
        }
        for (key, fd) in &self.udp {
            pending
                .udp
                .push((*key, std::net::UdpSocket::from(fd.try_clone()?)));
        }
        Ok(pending)
    }
}

/// Listeners opened for a (re)load, not serving yet.
#[derive(Default)]
pub struct Pending {
    /// The sockmap slot, and a listener socket per worker.
    tcp: Vec<(ListenerKey, u32, Vec<std::net::TcpListener>)>,
    udp: Vec<(ListenerKey, std::net::UdpSocket)>,
}

impl Pending {
    /// Opens the listeners `plan` says to, `workers` sockets for each TCP one, or takes
    /// the ones the previous agent handed over at the same address.
    pub fn open(
        plan: &SlotPlan,
        workers: usize,
        inherited: &mut Inherited,
    ) -> Result<Self, ListenError> {
        let mut pending = Pending::default();
        for open in &plan.open {
            match *open {
                Open::Udp(key @ (on_ip, on_port)) => {
                    let socket = match inherited.udp.remove(&key) {
                        Some(socket) => socket,
                        None => udp::listen(on_ip, on_port)?,
                    };
                    pending.udp.push((key, socket));
                }
                Open::Tcp {
                    key: key @ (on_ip, on_port),
                    slot,
                } => {
                    let group = match inherited.tcp.remove(&key) {
                        Some(group) => {
                            if group.len() != workers {
                                info!(
                                    "the listener on port {on_port} came with {} socket(s) for \
                                     {workers} worker(s): they are shared out in turn",
                                    group.len()
                                );
                            }
                            group
                        }
                        None => tcp::listen(on_ip, on_port, workers)?,
                    };
                    pending.tcp.push((key, slot, group));
                }
            }
        }
        Ok(pending)
    }

    /// The listeners this holds, to close them again if a reload fails after starting them.
    pub fn keys(&self) -> Keys {
        Keys {
            tcp: self.tcp.iter().map(|(key, _, _)| *key).collect(),
            udp: self.udp.iter().map(|(key, _)| *key).collect(),
        }
    }
}

impl Listeners {
    /// No listener yet; TCP ones will be served on `workers`.
    pub fn new(workers: Workers, options: ProxyOptions, udp_options: UdpOptions) -> Self {
        Listeners {
            options: Arc::new(options),
            udp_options: Arc::new(udp_options),
            workers,
            running: HashMap::new(),
            udp_running: HashMap::new(),
            next_worker: 0,
        }
    }

    /// How many sockets each TCP listener needs: one per worker.
    pub fn workers(&self) -> usize {
        self.workers.len()
    }

    /// The running TCP listeners with their slots, and the UDP ones: what a reload plans
    /// from.
    pub fn running(&self) -> (Vec<(ListenerKey, u32)>, Vec<ListenerKey>) {
        (
            self.running
                .iter()
                .map(|(key, running)| (*key, running.slot))
                .collect(),
            self.udp_running.keys().copied().collect(),
        )
    }

    /// Registers freshly opened listeners in the sockmap and starts accepting on them.
    pub fn start(
        &mut self,
        classifier: &mut Classifier,
        pending: Pending,
    ) -> Result<(), AgentError> {
        for (key, socket) in pending.udp {
            let kept = OwnedFd::from(
                socket
                    .try_clone()
                    .map_err(|e| AgentError::Io("keeping a copy of a UDP listener", e))?,
            );
            let socket = tokio::net::UdpSocket::from_std(socket)
                .map_err(|e| AgentError::Io("registering a UDP listener with the runtime", e))?;
            let addr = socket
                .local_addr()
                .map_err(|e| AgentError::Io("reading a listener's address", e))?;
            let task = tokio::spawn(udp::serve(socket, Arc::clone(&self.udp_options)));
            info!("built-in transparent UDP listener on {addr}");
            self.udp_running.insert(key, (addr, task, kept));
        }
        for (key, slot, group) in pending.tcp {
            let Some(first) = group.first() else {
                continue;
            };
            // One socket of the group is enough for sk_lookup: the kernel picks among the
            // group after the program (`inet_lookup_run_sk_lookup`).
            classifier.set_listener(slot, first)?;
            let addr = first
                .local_addr()
                .map_err(|e| AgentError::Io("reading a listener's address", e))?;
            let fds = group
                .iter()
                .map(|socket| socket.try_clone().map(OwnedFd::from))
                .collect::<io::Result<_>>()
                .map_err(|e| AgentError::Io("keeping a copy of a listener", e))?;
            let tasks = self
                .workers
                .serve(group, &self.options)
                .map_err(|e| AgentError::Io("registering a listener with a worker", e))?;
            info!(
                "built-in transparent listener on {addr} (slot {slot}, {} socket(s))",
                tasks.len()
            );
            self.running.insert(
                key,
                Running {
                    slot,
                    addr,
                    tasks,
                    fds,
                },
            );
        }
        Ok(())
    }

    /// Closes listeners (the ones no rule needs after a reload, or all of them), and
    /// returns once their sockets are closed: a reload right after may bind the same port
    /// again. Connections they accepted go on.
    pub async fn close(&mut self, which: &Keys) {
        self.stop(which, "closed").await;
    }

    /// Stops serving listeners, and returns the copies of their sockets: once these are
    /// dropped too, the sockets are closed.
    async fn stop(&mut self, which: &Keys, done: &str) -> Paused {
        let mut closing = Vec::new();
        let mut stopped = Paused::default();
        for key in &which.tcp {
            if let Some(Running {
                slot,
                addr,
                tasks,
                fds,
            }) = self.running.remove(key)
            {
                tasks.iter().for_each(JoinHandle::abort);
                closing.push((format!("listener on {addr}"), tasks));
                stopped.tcp.push((*key, slot, fds));
            }
        }
        for key in &which.udp {
            if let Some((addr, task, fd)) = self.udp_running.remove(key) {
                task.abort();
                closing.push((format!("UDP listener on {addr}"), vec![task]));
                stopped.udp.push((*key, fd));
            }
        }
        for (what, tasks) in closing {
            // An aborted task ends at its next poll; its worker may be busy for a moment.
            let closed = tokio::time::timeout(CLOSE_WAIT, futures::future::join_all(tasks)).await;
            match closed {
                Ok(_) => info!("{what} {done}"),
                Err(_) => warn!("{what}: still stopping after {} ms", CLOSE_WAIT.as_millis()),
            }
        }
        stopped
    }

    fn all(&self) -> Keys {
        Keys {
            tcp: self.running.keys().copied().collect(),
            udp: self.udp_running.keys().copied().collect(),
        }
    }

    /// Closes every listener: the start of the drain.
    pub async fn close_all(&mut self) {
        let all = self.all();
        self.close(&all).await;
    }

    /// Stops accepting on every listener, keeping its sockets open, to hand them over:
    /// connections wait in their backlogs meanwhile.
    pub async fn pause(&mut self) -> Paused {
        let all = self.all();
        self.stop(&all, "paused for the handover (its socket stays open)")
            .await
    }

    /// Copies of every listener's sockets, which keep serving here: what a handover sends.
    pub fn copies(&self) -> io::Result<Paused> {
        let mut copies = Paused::default();
        for (key, running) in &self.running {
            let fds = running
                .fds
                .iter()
                .map(OwnedFd::try_clone)
                .collect::<io::Result<_>>()?;
            copies.tcp.push((*key, running.slot, fds));
        }
        for (key, (_, _, fd)) in &self.udp_running {
            copies.udp.push((*key, fd.try_clone()?));
        }
        Ok(copies)
    }

    /// Serves paused listeners again (the handover failed).
    pub fn unpause(
        &mut self,
        classifier: &mut Classifier,
        paused: &Paused,
    ) -> Result<(), AgentError> {
        let pending = paused
            .to_pending()
            .map_err(|e| AgentError::Io("taking the listeners back", e))?;
        self.start(classifier, pending)
    }

    /// Resumes connections and UDP sessions handed over by the previous agent (or taken
    /// back from a failed successor): connections spread over the workers, sessions on
    /// this runtime, as the listeners start them.
    pub fn resume(&mut self, moved: Vec<Moved>) -> usize {
        let mut resumed = 0;
        for one in moved {
            match one {
                Moved::Tcp(portable) => {
                    let options = Arc::clone(&self.options);
                    let task = async move {
                        match portable.into_parked() {
                            Ok(parked) => tcp::resume(parked, options).await,
                            Err(e) => warn!("a connection handed over could not be resumed: {e}"),
                        }
                    };
                    if self
                        .workers
                        .spawn_on_next(&mut self.next_worker, task)
                        .is_some()
                    {
                        resumed += 1;
                    }
                }
                Moved::Udp(portable) => match portable.into_parked() {
                    Ok(parked) => {
                        udp::resume(parked, Arc::clone(&self.udp_options));
                        resumed += 1;
                    }
                    Err(e) => warn!("a UDP session handed over could not be resumed: {e}"),
                },
            }
        }
        resumed
    }
}
