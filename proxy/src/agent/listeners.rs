//! The agent's own transparent listeners, as sockets: opened for a plan of
//! [`slots`](super::slots), registered in the classifier's sockmap and served, and closed.
//! Opening binds (a port in use fails here, before anything a packet can see changes);
//! starting is what makes them reachable.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use log::{info, warn};
use tokio::task::JoinHandle;

use super::{
    AgentError,
    slots::{Keys, ListenerKey, Open, SlotPlan},
};
use crate::{
    ebpf::Classifier,
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
/// worker, UDP ones with their receive task.
pub struct Listeners {
    options: Arc<ProxyOptions>,
    udp_options: Arc<UdpOptions>,
    workers: Workers,
    running: HashMap<ListenerKey, (u32, SocketAddr, Vec<JoinHandle<()>>)>,
    udp_running: HashMap<ListenerKey, (SocketAddr, JoinHandle<()>)>,
}

/// Listeners opened for a (re)load, not serving yet.
#[derive(Default)]
pub struct Pending {
    /// The sockmap slot, and a listener socket per worker.
    tcp: Vec<(ListenerKey, u32, Vec<std::net::TcpListener>)>,
    udp: Vec<(ListenerKey, std::net::UdpSocket)>,
}

impl Pending {
    /// Opens the listeners `plan` says to, `workers` sockets for each TCP one.
    pub fn open(plan: &SlotPlan, workers: usize) -> Result<Self, ListenError> {
        let mut pending = Pending::default();
        for open in &plan.open {
            match *open {
                Open::Udp(key @ (on_ip, on_port)) => {
                    pending.udp.push((key, udp::listen(on_ip, on_port)?));
                }
                Open::Tcp {
                    key: key @ (on_ip, on_port),
                    slot,
                } => {
                    let group = tcp::listen(on_ip, on_port, workers)?;
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
                .map(|(key, (slot, _, _))| (*key, *slot))
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
            let socket = tokio::net::UdpSocket::from_std(socket)
                .map_err(|e| AgentError::Io("registering a UDP listener with the runtime", e))?;
            let addr = socket
                .local_addr()
                .map_err(|e| AgentError::Io("reading a listener's address", e))?;
            let task = tokio::spawn(udp::serve(socket, Arc::clone(&self.udp_options)));
            info!("built-in transparent UDP listener on {addr}");
            self.udp_running.insert(key, (addr, task));
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
            let tasks = self
                .workers
                .serve(group, &self.options)
                .map_err(|e| AgentError::Io("registering a listener with a worker", e))?;
            info!(
                "built-in transparent listener on {addr} (slot {slot}, {} socket(s))",
                tasks.len()
            );
            self.running.insert(key, (slot, addr, tasks));
        }
        Ok(())
    }

    /// Closes listeners (the ones no rule needs after a reload, or all of them), and
    /// returns once their sockets are closed: a reload right after may bind the same port
    /// again. Connections they accepted go on.
    pub async fn close(&mut self, which: &Keys) {
        let mut closing = Vec::new();
        for key in &which.tcp {
            if let Some((_, addr, tasks)) = self.running.remove(key) {
                tasks.iter().for_each(JoinHandle::abort);
                closing.push((format!("listener on {addr}"), tasks));
            }
        }
        for key in &which.udp {
            if let Some((addr, task)) = self.udp_running.remove(key) {
                task.abort();
                closing.push((format!("UDP listener on {addr}"), vec![task]));
            }
        }
        for (what, tasks) in closing {
            // An aborted task ends at its next poll; its worker may be busy for a moment.
            let closed = tokio::time::timeout(CLOSE_WAIT, futures::future::join_all(tasks)).await;
            match closed {
                Ok(_) => info!("{what} closed"),
                Err(_) => warn!("{what}: still closing after {} ms", CLOSE_WAIT.as_millis()),
            }
        }
    }

    /// Closes every listener: the start of the drain.
    pub async fn close_all(&mut self) {
        let all = Keys {
            tcp: self.running.keys().copied().collect(),
            udp: self.udp_running.keys().copied().collect(),
        };
        self.close(&all).await;
    }
}
