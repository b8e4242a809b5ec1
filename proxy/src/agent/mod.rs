//! `proxy run`: sets everything up in an order that never blackholes traffic, serves until
//! SIGINT/SIGTERM, and undoes everything on the way out, whatever failed.
//!
//! Order: check what can be checked without touching the system (root, interfaces, rules,
//! the listeners' ports); load the programs and fill the maps; install the policy route;
//! attach the sk_lookup program and the classifier last, so that no packet is marked before
//! its route exists. Teardown runs in reverse. While running, the agent also answers
//! SIGHUP (reload `--config`), `proxy stats`, and interface address changes.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use log::{debug, error, info, warn};
use proxy_common::{Counter, GlobalConfig, IfaceAddrs, RuleCounters};
use tokio::{sync::Semaphore, task::JoinHandle};

use crate::{
    config::{ListenerMode, RunArgs},
    ebpf::{Classifier, EbpfError, TcAttach},
    error_chain, generation,
    ifaddrs::{self, IfaddrsError, InterfaceEvent},
    link_header::{self, LinkHeaderError},
    relay::RelayMode,
    routing::{PolicyRouting, RoutingError},
    rules::{self, Mark, Rule, RuleError},
    rules_file::RulesFileError,
    src_valid_mark::{self, SrcValidMark, SysctlError},
    stats,
    tproxy::{
        ListenError,
        destination::{Destinations, OwnAddressesError},
        tcp::{self, LiveConnections, ProxyOptions},
        udp::{self, UdpOptions},
        workers::{self, Workers},
    },
    upstream::{Outbound, Upstream},
};

/// Why the agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The agent needs root (CAP_NET_ADMIN, CAP_BPF).
    #[error(
        "must run as root: attaching eBPF programs and changing routing need CAP_BPF and CAP_NET_ADMIN"
    )]
    NotRoot,
    /// An `--iface` that does not exist in this network namespace.
    #[error("interface '{0}' not found")]
    NoSuchInterface(String),
    /// A rule that cannot be compiled.
    #[error("invalid rules")]
    Rule(#[from] RuleError),
    /// The rules file cannot be used.
    #[error(transparent)]
    RulesFile(#[from] RulesFileError),
    /// A transparent listener could not be opened.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// Loading or attaching the eBPF programs failed.
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    /// Installing the policy route failed.
    #[error("policy routing")]
    Routing(#[from] RoutingError),
    /// An interface whose link type the classifier cannot parse.
    #[error(transparent)]
    LinkHeader(#[from] LinkHeaderError),
    /// Listing this namespace's own addresses failed.
    #[error(transparent)]
    OwnAddresses(#[from] OwnAddressesError),
    /// Reading an interface's addresses failed.
    #[error(transparent)]
    Ifaddrs(#[from] IfaddrsError),
    /// The signal handlers could not be installed.
    #[error("installing signal handlers")]
    Signals(#[source] std::io::Error),
    /// A combination of settings this version cannot serve.
    #[error("{0}")]
    Unsupported(String),
    /// Another agent already uses this routing table in this namespace.
    #[error("another agent with routing table {0} is running in this network namespace")]
    TableInUse(u32),
    /// A socket or runtime operation failed.
    #[error("{0}")]
    Io(&'static str, #[source] std::io::Error),
    /// The sysctls that keep intercepted IPv4 deliverable under `src_valid_mark=1` could
    /// not be read or set.
    #[error(
        "src_valid_mark check (with src_valid_mark=1, intercepted IPv4 needs accept_local=1 and rp_filter other than 1 on the --iface interfaces)"
    )]
    Sysctl(#[from] SysctlError),
}

/// SIGINT and SIGTERM: the first starts the drain, a second one ends it at once.
pub struct ShutdownSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Installs the handlers. Must be called from a tokio runtime.
    pub fn install() -> Result<Self, AgentError> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(ShutdownSignals {
            int: signal(SignalKind::interrupt()).map_err(AgentError::Signals)?,
            term: signal(SignalKind::terminate()).map_err(AgentError::Signals)?,
        })
    }

    /// Waits for the next SIGINT or SIGTERM and names it.
    pub async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
        }
    }
}

/// How long [`Listeners::close`] waits for a listener's sockets to be closed.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Key of a built-in listener: the rules that share on-ip and on-port share a listener.
type ListenerKey = (Option<IpAddr>, u16);

/// The agent's own transparent listeners: TCP ones with their sockmap slot and an accept
/// task on each worker, UDP ones with their receive task.
struct Listeners {
    options: Arc<ProxyOptions>,
    udp_options: Arc<UdpOptions>,
    workers: Workers,
    running: HashMap<ListenerKey, (u32, SocketAddr, Vec<JoinHandle<()>>)>,
    udp_running: HashMap<ListenerKey, (SocketAddr, JoinHandle<()>)>,
}

/// Listeners to close.
#[derive(Default)]
struct Obsolete {
    tcp: Vec<ListenerKey>,
    udp: Vec<ListenerKey>,
}

/// Listeners opened for a (re)load, not serving yet.
#[derive(Default)]
struct Pending {
    /// The sockmap slot, and a listener socket per worker.
    tcp: Vec<(ListenerKey, u32, Vec<std::net::TcpListener>)>,
    udp: Vec<(ListenerKey, std::net::UdpSocket)>,
}

impl Pending {
    /// The listeners this holds, to close them again if a reload fails after starting them.
    fn keys(&self) -> Obsolete {
        Obsolete {
            tcp: self.tcp.iter().map(|(key, _, _)| *key).collect(),
            udp: self.udp.iter().map(|(key, _)| *key).collect(),
        }
    }
}

impl Listeners {
    /// Opens the listeners `rules` need that are not open yet, gives each rule its slot,
    /// and returns the keys no rule needs any more (still open; see [`Self::close`]).
    fn prepare(
        &mut self,
        rules: &mut [Rule],
        pending: &mut Pending,
    ) -> Result<Obsolete, AgentError> {
        let mut used_slots: Vec<u32> = self.running.values().map(|(slot, _, _)| *slot).collect();
        let mut wanted: HashMap<ListenerKey, u32> = HashMap::new();
        let mut wanted_udp: Vec<ListenerKey> = Vec::new();
        for rule in rules.iter_mut() {
            let key = (rule.on_ip, rule.on_port);
            if rule.protocols.udp && !wanted_udp.contains(&key) {
                wanted_udp.push(key);
                if !self.udp_running.contains_key(&key) {
                    pending
                        .udp
                        .push((key, udp::listen(rule.on_ip, rule.on_port)?));
                }
            }
            if !rule.protocols.tcp {
                continue;
            }
            let slot = if let Some((slot, _, _)) = self.running.get(&key) {
                *slot
            } else if let Some(slot) = wanted.get(&key) {
                *slot
            } else {
                let slot = (0..proxy_common::MAX_LISTENERS)
                    .find(|s| !used_slots.contains(s))
                    .ok_or_else(|| {
                        AgentError::Unsupported(format!(
                            "more than {} distinct on-ip/on-port pairs",
                            proxy_common::MAX_LISTENERS
                        ))
                    })?;
                used_slots.push(slot);
                pending.tcp.push((
                    key,
                    slot,
                    tcp::listen(rule.on_ip, rule.on_port, self.workers.len())?,
                ));
                slot
            };
            wanted.insert(key, slot);
            rule.listener_slot = Some(slot);
        }
        Ok(Obsolete {
            tcp: self
                .running
                .keys()
                .filter(|k| !wanted.contains_key(k))
                .copied()
                .collect(),
            udp: self
                .udp_running
                .keys()
                .filter(|k| !wanted_udp.contains(k))
                .copied()
                .collect(),
        })
    }

    /// Registers freshly opened listeners in the sockmap and starts accepting on them.
    fn start(&mut self, classifier: &mut Classifier, pending: Pending) -> Result<(), AgentError> {
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
    async fn close(&mut self, which: &Obsolete) {
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

    fn all(&self) -> Obsolete {
        Obsolete {
            tcp: self.running.keys().copied().collect(),
            udp: self.udp_running.keys().copied().collect(),
        }
    }
}

/// Checks that this version can serve `rules` with the chosen listener mode.
fn check_supported(rules: &[Rule], mode: ListenerMode) -> Result<(), AgentError> {
    if mode == ListenerMode::External {
        return Ok(());
    }
    for (i, rule) in rules.iter().enumerate() {
        if rule.on_port == 0 {
            return Err(AgentError::Unsupported(format!(
                "rule {}: on-port 0 (the packet's own port) needs --listener external",
                i + 1
            )));
        }
    }
    Ok(())
}

fn marks(rules: &[Rule]) -> Vec<Mark> {
    rules.iter().map(|r| r.mark).collect()
}

/// The mark for the return path (`-m socket --transparent -j DIVERT`): the first rule's.
fn global_config(rules: &[Rule], outbound_mark: u32) -> GlobalConfig {
    let mark = rules.first().map_or(Mark::default(), |r| r.mark);
    GlobalConfig {
        divert_mark_value: mark.value,
        divert_mark_mask: mark.mask,
        bypass_mark: outbound_mark,
    }
}

/// The outbound mark must not look like a tproxy mark: the fwmark rule would route the
/// proxy's own connections to the local table, back to itself.
fn check_outbound_mark(rules: &[Rule], outbound_mark: u32) -> Result<(), AgentError> {
    if outbound_mark == 0 {
        return Err(AgentError::Unsupported(
            "--outbound-mark must not be 0".into(),
        ));
    }
    for (i, rule) in rules.iter().enumerate() {
        if outbound_mark & rule.mark.mask == rule.mark.value {
            return Err(AgentError::Unsupported(format!(
                "--outbound-mark {outbound_mark:#x} matches rule {}'s tproxy mark {}: the proxy's own traffic would be routed back to it",
                i + 1,
                rule.mark
            )));
        }
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard limit: every proxied connection holds
/// two sockets and, while data flows, two pipes.
fn raise_nofile_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!("open files limit raised from {soft} to {hard}"),
            Err(e) => warn!("raising the open files limit from {soft}: {e}"),
        },
        Ok(_) => {}
        Err(e) => warn!("reading the open files limit: {e}"),
    }
}

/// Runs the agent until SIGINT or SIGTERM, then drains and tears down.
pub async fn run(args: RunArgs, mut signals: ShutdownSignals) -> Result<(), AgentError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(AgentError::NotRoot);
    }
    let mut ifaces = Vec::new();
    for name in &args.ifaces {
        let index =
            ifaddrs::ifindex(name).ok_or_else(|| AgentError::NoSuchInterface(name.clone()))?;
        ifaces.push((name.clone(), index));
    }
    let mut rules = args.rules()?;
    check_supported(&rules, args.listener)?;
    check_outbound_mark(&rules, args.outbound_mark)?;
    if args.spoof_source && args.ifaces.len() < 2 {
        warn!(
            "--spoof-source: the server's replies go to the client's address; unless the \
             upstream interface is also given with --iface, they bypass the proxy"
        );
    }
    raise_nofile_limit();
    let stats_listener = stats::listen(args.table).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            AgentError::TableInUse(args.table)
        } else {
            AgentError::Io("binding the stats socket", e)
        }
    })?;
    let upstream = match (&args.upstream, args.spoof_source) {
        (Some(server), _) => Upstream::Socks5(server.clone()),
        (None, true) => Upstream::SpoofSource,
        (None, false) => Upstream::Direct,
    };
    let outbound = Outbound {
        connect_timeout: args.connect_timeout,
        mark: args.outbound_mark,
    };
    // An external listener needs no workers.
    let worker_count = if args.listener == ListenerMode::Builtin {
        workers::count(args.workers).map_err(AgentError::Unsupported)?
    } else {
        0
    };
    let live = Arc::new(LiveConnections::default());
    let destinations = Arc::new(Destinations::new(args.allow_local_destinations));
    let stats_access = stats::Access {
        group: args.stats_group,
    };
    let mut listeners = Listeners {
        workers: Workers::start(worker_count)
            .map_err(|e| AgentError::Io("starting the TCP worker threads", e))?,
        options: Arc::new(ProxyOptions {
            upstream: upstream.clone(),
            outbound,
            relay: args.relay,
            idle_timeout: args.tcp_idle_timeout,
            limit: Arc::new(Semaphore::new(args.max_connections as usize)),
            live: Arc::clone(&live),
            kernel_relay: std::sync::OnceLock::new(),
            destinations: Arc::clone(&destinations),
        }),
        udp_options: Arc::new(UdpOptions {
            idle_timeout: args.udp_idle_timeout,
            max_sessions: args.udp_max_sessions as usize,
            outbound,
            upstream,
            destinations: Arc::clone(&destinations),
        }),
        running: HashMap::new(),
        udp_running: HashMap::new(),
    };
    let mut pending = Pending::default();
    if args.listener == ListenerMode::Builtin {
        listeners.prepare(&mut rules, &mut pending)?;
    }
    let compiled = rules::compile(&rules)?;

    let kernel_relay = args.relay == RelayMode::Sockmap && args.listener == ListenerMode::Builtin;
    // Two sockets per connection, up to the connection limit.
    let relayed_sockets = if kernel_relay {
        args.max_connections
            .saturating_mul(2)
            .min(proxy_common::MAX_RELAYED_SOCKETS)
    } else {
        0
    };
    let mut classifier = Classifier::load(
        relayed_sockets,
        args.allow_unchecked_transparency,
        args.table,
    )?;
    if kernel_relay {
        let relay = classifier.kernel_relay()?;
        let _ = listeners.options.kernel_relay.set(relay);
        info!("relay: in the kernel (sockmap), up to {relayed_sockets} sockets");
    }
    classifier.install_rules(&rules, &compiled)?;
    classifier.set_config(global_config(&rules, args.outbound_mark))?;

    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| AgentError::Routing(RoutingError::Connect(e)))?;
    tokio::spawn(connection);
    let mut addr_changes =
        ifaddrs::watch().map_err(|e| AgentError::Io("watching interface addresses", e))?;
    // Before any listener serves: the proxy's own addresses are refused as destinations.
    destinations.refresh(&handle).await?;
    let mut link_headers = Vec::new();
    for (name, index) in &ifaces {
        refresh_laddr(&handle, &mut classifier, name, *index, false).await?;
        link_headers.push(link_header::of_interface(&handle, name, *index).await?);
    }

    // Before the first packet can be marked; restored in the teardown (or on drop).
    let mut svm =
        SrcValidMark::new(args.ifaces.iter().cloned()).with_pins(classifier.pins().clone());
    svm.start()?;
    let mut svm_poll = tokio::time::interval(src_valid_mark::POLL_INTERVAL);
    svm_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut routing = PolicyRouting::new(handle.clone(), args.table);
    let serving = async {
        routing.install(&marks(&rules)).await?;
        listeners.start(&mut classifier, pending)?;
        classifier.attach_sk_lookup()?;
        for ((name, _), header) in ifaces.iter().zip(&link_headers) {
            classifier.attach(name, *header, args.tc_attach)?;
        }
        classifier.remove_leftovers();
        log_rules(&rules);
        info!(
            "ready: {} rule(s) on {}, {} listener (table {})",
            rules.len(),
            args.ifaces.join(","),
            match args.listener {
                ListenerMode::Builtin => "built-in",
                ListenerMode::External => "external",
            },
            args.table
        );
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(AgentError::Signals)?;
        loop {
            tokio::select! {
                signal = signals.recv() => {
                    info!("{signal}: shutting down");
                    break;
                }
                _ = hangup.recv() => {
                    match reload(&args, &mut classifier, &mut routing, &mut listeners, &rules).await {
                        Ok(new_rules) => rules = new_rules,
                        Err(e) => error!("reload refused, the rules in force stay: {}", error_chain(&e)),
                    }
                }
                Some(event) = addr_changes.recv() => match event {
                    InterfaceEvent::Addresses(index) => {
                        if let Err(e) = destinations.refresh(&handle).await {
                            error!("{}", error_chain(&e));
                        }
                        if let Some((name, _)) = ifaces.iter().find(|(_, i)| *i == index)
                            && let Err(e) =
                                refresh_laddr(&handle, &mut classifier, name, index, true).await
                        {
                            error!("{name}: {}", error_chain(&e));
                        }
                    }
                    InterfaceEvent::Gone(index) => {
                        if let Some((name, index)) = ifaces.iter_mut().find(|(_, i)| *i == index) {
                            error!(
                                "{name} was deleted, and its classifier with it: nothing arriving \
                                 on a new {name} is intercepted until it exists again, when the \
                                 classifier is attached again"
                            );
                            *index = 0;
                        }
                    }
                    InterfaceEvent::Link { index, name } => {
                        if let Some(entry) = ifaces.iter_mut().find(|(n, i)| *n == name && *i != index) {
                            entry.1 = index;
                            match reattach(&handle, &mut classifier, &name, index, args.tc_attach).await {
                                Ok(()) => warn!(
                                    "{name} exists again (index {index}): classifier attached again"
                                ),
                                Err(e) => error!(
                                    "{name} exists again but the classifier could not be attached: \
                                     its traffic is not intercepted: {}",
                                    error_chain(&e)
                                ),
                            }
                        }
                    }
                },
                Ok((stream, _)) = stats_listener.accept() => {
                    let text = match stream.peer_cred() {
                        Ok(cred) if stats_access.permits(&cred) => {
                            report(&classifier, &rules, &destinations)
                        }
                        Ok(cred) => {
                            debug!("stats: uid {} gid {} refused", cred.uid(), cred.gid());
                            stats_access.refusal()
                        }
                        Err(e) => stats::refusal(&format!("no peer credentials: {e}")),
                    };
                    stats::reply(stream, text);
                }
                _ = svm_poll.tick() => svm.recheck(),
            }
        }
        Ok::<(), AgentError>(())
    };
    let result = serving.await;

    // Drain: no new connections (closing a listener also takes it out of the sockmap),
    // but the classifier and the routes stay until the live ones are done.
    let all = listeners.all();
    listeners.close(&all).await;
    if result.is_ok() && live.count() > 0 {
        info!(
            "draining {} live connection(s) for up to {:.0} s; signal again to exit now",
            live.count(),
            args.drain_timeout.as_secs_f64()
        );
        tokio::select! {
            () = live.all_closed() => info!("drained: all connections closed"),
            () = tokio::time::sleep(args.drain_timeout) => {
                warn!("drain timeout: {} connection(s) cut", live.count());
                cut(&live).await;
            }
            signal = signals.recv() => {
                warn!("{signal} again: {} connection(s) cut", live.count());
                cut(&live).await;
            }
        }
    }

    // Connections still open after the drain end here, before the routes they use go:
    // stopping the workers drops their tasks and closes their sockets.
    drop(listeners);

    // A start that failed after taking over what a crashed run left: detaching now would
    // leave no classifier where the crash had left one (T12). Leave it all as the crash
    // did: the classifier (now with this run's program and the same rules), the routing,
    // the sysctls.
    if result.is_err() && classifier.took_over() {
        error!(
            "the start failed after taking over the classifier a previous run left: it stays \
             attached, with the policy routing, as after a crash, so the rules keep applying \
             (no socket: dropped, or passed with fail-open); fix the cause and start again, or \
             remove it all with `proxy cleanup --table {}`",
            args.table
        );
        svm.leave_as_is();
        return result;
    }

    // Teardown, in reverse, whatever happened above. The sysctls first: with the
    // listeners closed no intercepted packet is delivered any more, and their records
    // must leave the pin directory before it goes.
    svm.restore();
    classifier.detach_all();
    classifier.remove_pin_dir();
    for name in classifier.take_clsact_added() {
        if let Some((_, index)) = ifaces.iter().find(|(n, _)| *n == name) {
            match crate::tc_filter::remove_clsact(&handle, *index).await {
                Ok(crate::tc_filter::ClsactRemoval::Removed) => {
                    info!("clsact qdisc removed from {name}")
                }
                Ok(crate::tc_filter::ClsactRemoval::KeptInUse(n)) => {
                    info!("clsact qdisc of {name} kept: {n} other filter(s) under it");
                }
                Err(e) => warn!("removing the clsact qdisc from {name}: {e}"),
            }
        }
    }
    if let Err(e) = routing.remove().await {
        error!("removing policy routing: {}", error_chain(&e));
    }
    log_counters(&classifier, &rules, &destinations);
    // Give in-flight log records a moment to be forwarded.
    tokio::time::sleep(Duration::from_millis(20)).await;
    result
}

/// Resets the connections still live at the end of the drain, giving each a moment to log
/// its closing line (`drain`); the workers' shutdown then drops whatever is left.
async fn cut(live: &LiveConnections) {
    live.cut();
    let _ = tokio::time::timeout(Duration::from_secs(1), live.all_closed()).await;
}

/// An `--iface` deleted and made again (a VPN interface torn down and set up): its laddr,
/// its link type (it may be another kind now) and the classifier, attached again.
async fn reattach(
    handle: &rtnetlink::Handle,
    classifier: &mut Classifier,
    name: &str,
    index: u32,
    how: TcAttach,
) -> Result<(), AgentError> {
    refresh_laddr(handle, classifier, name, index, false).await?;
    let header = link_header::of_interface(handle, name, index).await?;
    classifier.attach(name, header, how)?;
    Ok(())
}

/// SIGHUP: re-reads `--config`, and only if everything about it is usable, switches the
/// classifier, the routing and the listeners over without detaching. Connections already
/// accepted live on: their packets find their sockets through the established lookup,
/// under the new rules or the return path.
///
/// Plan, then apply in an order that never lets a packet meet a half-made rule: the new
/// rules' listeners and routes first, then the classifier's generation switch (atomic, see
/// [`crate::generation`]), and only after it the old generation's tables, routes and
/// listeners. A failure before the switch undoes what was added and leaves the rules in
/// force as they were.
async fn reload(
    args: &RunArgs,
    classifier: &mut Classifier,
    routing: &mut PolicyRouting,
    listeners: &mut Listeners,
    in_force: &[Rule],
) -> Result<Vec<Rule>, AgentError> {
    let Some(path) = &args.config else {
        return Err(AgentError::Unsupported(
            "SIGHUP: nothing to reload (the rules come from flags, not --config)".into(),
        ));
    };
    info!("SIGHUP: reloading {}", path.display());
    // Plan: nothing a packet can see changes here.
    let mut rules = args.rules()?;
    check_supported(&rules, args.listener)?;
    let mut pending = Pending::default();
    let obsolete = if args.listener == ListenerMode::Builtin {
        listeners.prepare(&mut rules, &mut pending)?
    } else {
        Obsolete::default()
    };
    let compiled = rules::compile(&rules)?;

    // Apply: what the new rules need, then the switch.
    let added = pending.keys();
    let switched = async {
        routing.add(&marks(&rules)).await?;
        listeners.start(classifier, pending)?;
        classifier.install_rules(&rules, &compiled)?;
        Ok::<(), AgentError>(())
    }
    .await;
    if let Err(e) = switched {
        listeners.close(&added).await;
        if let Err(undo) = routing.install(&marks(in_force)).await {
            warn!(
                "reload: removing the new rules' routes: {}",
                error_chain(&undo)
            );
        }
        return Err(e);
    }
    // The new rules are in force from here on: what fails now is reported, not undone.
    if let Err(e) = classifier.set_config(global_config(&rules, args.outbound_mark)) {
        error!(
            "reload: the new rules are in force but the return-path mark was not updated: {}",
            error_chain(&e)
        );
    }

    // Retire the old generation once every classifier run that read its number is over.
    if let Err(e) = tokio::task::spawn_blocking(generation::wait_for_readers).await {
        warn!("reload: waiting for the classifier's readers: {e}");
        tokio::time::sleep(generation::FALLBACK_WAIT).await;
    }
    if let Err(e) = classifier.retire_previous() {
        warn!(
            "reload: clearing the old rule tables (retried on the next reload): {}",
            error_chain(&e)
        );
    }
    if let Err(e) = routing.install(&marks(&rules)).await {
        warn!(
            "reload: removing the old rules' routes: {}",
            error_chain(&e)
        );
    }
    listeners.close(&obsolete).await;
    log_rules(&rules);
    info!("reloaded: {} rule(s) in force", rules.len());
    Ok(rules)
}

fn log_rules(rules: &[Rule]) {
    const SHOWN: usize = 20;
    for (i, rule) in rules.iter().take(SHOWN).enumerate() {
        info!("rule {}: {}", i + 1, stats::describe_rule(rule));
    }
    if rules.len() > SHOWN {
        info!(
            "... and {} more rules (proxy stats lists them all)",
            rules.len() - SHOWN
        );
    }
}

/// Reads an interface's laddr candidates over netlink and hands them to the classifier.
async fn refresh_laddr(
    handle: &rtnetlink::Handle,
    classifier: &mut Classifier,
    name: &str,
    index: u32,
    changed: bool,
) -> Result<(), AgentError> {
    let addrs = ifaddrs::laddr_candidates(handle, index).await?;
    let why = if changed { "addresses changed, " } else { "" };
    info!("{name}: {why}laddr candidates {}", describe_addrs(&addrs));
    classifier.set_iface_addrs(index, addrs)?;
    Ok(())
}

fn describe_addrs(addrs: &IfaceAddrs) -> String {
    let mut parts = Vec::new();
    if addrs.flags & proxy_common::IFACE_HAS_IP4 != 0 {
        parts.push(std::net::Ipv4Addr::from(addrs.ip4_be.to_ne_bytes()).to_string());
    }
    if addrs.flags & proxy_common::IFACE_HAS_IP6 != 0 {
        parts.push(std::net::Ipv6Addr::from(addrs.ip6).to_string());
    }
    if parts.is_empty() {
        "none (the packet's destination is used)".to_owned()
    } else {
        parts.join(", ")
    }
}

fn rule_counters(classifier: &Classifier, rules: &[Rule]) -> Vec<(Rule, RuleCounters)> {
    rules
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let c = classifier.rule_counters(i as u32).unwrap_or_default();
            (r.clone(), c)
        })
        .collect()
}

fn report(classifier: &Classifier, rules: &[Rule], destinations: &Destinations) -> String {
    match classifier.counters() {
        Ok(counters) => stats::format_report(
            &counters,
            &[(stats::REFUSED_DESTINATION, destinations.refused())],
            &rule_counters(classifier, rules),
        ),
        Err(e) => format!("error: {}\n", error_chain(&e)),
    }
}

fn log_counters(classifier: &Classifier, rules: &[Rule], destinations: &Destinations) {
    match classifier.counters() {
        Ok(counters) => info!(
            "counters: {} {}={}",
            counters
                .iter()
                .map(|(c, v)| format!("{}={v}", Counter::name(*c)))
                .collect::<Vec<_>>()
                .join(" "),
            stats::REFUSED_DESTINATION,
            destinations.refused()
        ),
        Err(e) => error!("reading counters: {}", error_chain(&e)),
    }
    for (i, (_, c)) in rule_counters(classifier, rules).iter().enumerate() {
        info!(
            "rule {}: packets={} bytes={} assigned={} dropped={}",
            i + 1,
            c.packets,
            c.bytes,
            c.assigned,
            c.dropped
        );
    }
}
