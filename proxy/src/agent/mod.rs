//! `proxy run`: sets everything up in an order that never blackholes traffic, serves until
//! SIGINT/SIGTERM, and undoes everything on the way out, whatever failed.
//!
//! Order: check what can be checked without touching the system (root, interfaces, rules,
//! the listeners' slots and ports); load the programs and fill the maps; then change the
//! system, in an order in which no packet is marked before its route exists (see
//! `start`): the sysctls, the policy route, the listeners, and last the sk_lookup program
//! and the classifier. The teardown runs in reverse (`teardown`).
//!
//! One job per module: `checks` of the settings, `slots` (which listeners the rules
//! need, as a pure function), `listeners` (their sockets), `interfaces` (what the
//! classifier is told about each `--iface`, and its events), `serve` (the loop:
//! `reload` on SIGHUP, the `report` for `proxy stats`), `drain`, `teardown`.

mod checks;
mod config_watch;
mod drain;
mod error;
mod handover;
mod interfaces;
mod listeners;
mod reload;
mod report;
mod rules_status;
mod serve;
mod signals;
mod slots;
mod teardown;

use std::{sync::Arc, time::Duration};

use log::{info, warn};
use proxy_common::GlobalConfig;
use tokio::sync::Semaphore;

use self::{
    config_watch::ConfigWatch,
    interfaces::Interfaces,
    listeners::{Listeners, Pending},
    rules_status::RulesStatus,
    serve::{Exit, Inputs},
    teardown::Installed,
};
pub use self::{
    error::AgentError,
    listeners::Paused,
    signals::{ShutdownSignals, Stop},
    slots::ListenerKey,
};
use crate::{
    cgroup::{self, Cgroup},
    config::{ListenerMode, RunArgs},
    ebpf::Classifier,
    ifaddrs,
    link_header::LinkHeader,
    privileges,
    relay::RelayMode,
    routing::RoutingError,
    rules::{self, Mark, Rule},
    src_valid_mark, stats,
    tproxy::{
        destination::Destinations,
        return_path::{self, ReturnPath},
        tcp::{LiveConnections, ProxyOptions},
        udp::{LiveSessions, UdpOptions},
        workers::{self, Workers},
    },
    upstream::{Outbound, Upstream},
};

/// The running agent: what the serve loop acts on, drained and torn down at the end.
struct Agent {
    args: RunArgs,
    rules: Vec<Rule>,
    destinations: Arc<Destinations>,
    interfaces: Interfaces,
    listeners: Listeners,
    installed: Installed,
    /// `--local`: where the cgroup programs are attached, for the agent's whole run.
    local: Option<LocalScope>,
    /// Which sockets may need the return path, and whether the classifier looks it up.
    return_path: Arc<ReturnPath>,
    return_path_lookup: bool,
    /// The connections being proxied: drained, cut, or parked for a handover.
    live: Arc<LiveConnections>,
    /// The UDP sessions being relayed: parked for a handover.
    udp_live: Arc<LiveSessions>,
    /// Each `--iface`'s link header, in order, as attached.
    headers: Vec<LinkHeader>,
    /// The agent this one took over from still serves (until its connections are here):
    /// a failed start must leave everything to it.
    predecessor_serves: bool,
    /// Which rules are in force, and how reloading them went.
    rules_status: RulesStatus,
}

/// Runs the agent until SIGINT or SIGTERM, then drains and tears down.
pub async fn run(mut args: RunArgs, mut signals: ShutdownSignals) -> Result<(), AgentError> {
    // Checks, before anything outside the agent changes.
    privileges::check_required()?;
    // `--local`: marked local connections arrive on `lo`, where the classifier takes them.
    if args.local && !args.ifaces.iter().any(|i| i == "lo") {
        args.ifaces.push("lo".to_owned());
    }
    let local = if args.local {
        Some(LocalScope::resolve(&args.cgroups)?)
    } else {
        None
    };
    let ifaces = Interfaces::resolve(&args.ifaces)?;
    let mut rules = args.rules()?;
    // Watched from the bytes these rules were read from: a change reloads them.
    let config_watch = args.config.as_deref().and_then(|path| {
        ConfigWatch::new(path)
            .inspect_err(|e| {
                warn!(
                    "--config {}: not watched ({e}); SIGHUP reloads it",
                    path.display()
                );
            })
            .ok()
    });
    checks::check_supported(&rules, args.listener)?;
    checks::check_outbound_mark(&rules, args.outbound_mark)?;
    checks::check_local_scope(&rules, local.as_ref())?;
    // What would stop interception, logged; the refusals stay the ones below.
    crate::doctor::log_at_start(&args).await;
    if args.spoof_source && args.ifaces.len() < 2 {
        warn!(
            "--spoof-source: the server's replies go to the client's address; unless the \
             upstream interface is also given with --iface, they bypass the proxy"
        );
    }
    raise_nofile_limit();
    // The table, claimed: from the agent running on it, if there is one, which hands its
    // listeners over here (they stop accepting there; SYNs wait in their backlogs).
    let handover::Claim {
        stats: stats_listener,
        predecessor,
        mut inherited,
    } = handover::claim_table(args.table).await?;
    let handover_listener = match inherited.handover.take() {
        Some(fd) => crate::handover::Listener::inherit(fd),
        None => crate::handover::Listener::bind(args.table),
    }
    .map_err(|e| AgentError::Io("binding the handover socket", e))?;
    let metrics = crate::metrics::server::start(args.metrics, inherited.metrics.take())?;
    crate::access_log::set_format(args.access_log);

    // The listeners: numbered, and bound (a port in use fails here), not serving yet. An
    // external listener needs no workers.
    let builtin = args.listener == ListenerMode::Builtin;
    let worker_count = if builtin {
        workers::count(args.workers).map_err(AgentError::Unsupported)?
    } else {
        0
    };
    let pending = if builtin {
        let plan = slots::plan(&rules, &[], &[])?;
        plan.assign(&mut rules);
        Pending::open(&plan, worker_count, &mut inherited)?
    } else {
        Pending::default()
    };
    // Listeners the previous agent had and these rules do not need: closed here (it keeps
    // its copies until the handover ends).
    drop(inherited);
    let compiled = rules::compile(&rules)?;

    // The programs, loaded and filled but attached nowhere. The kernel relay's maps come
    // with them, before any connection can be accepted.
    let kernel_relay = args.relay == RelayMode::Sockmap && builtin;
    if kernel_relay {
        let version = aya::util::KernelVersion::current().ok();
        warn!("{}", checks::check_sockmap_relay(version)?);
    }
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
    let kernel_relay = if kernel_relay {
        let relay = classifier.kernel_relay()?;
        info!("relay: in the kernel (sockmap), up to {relayed_sockets} sockets");
        Some(relay)
    } else {
        None
    };
    if local.is_some() {
        classifier.load_local()?;
    }
    classifier.install_rules(&rules, &compiled)?;
    let return_path = Arc::new(ReturnPath::new(return_path_always(&args)));
    if predecessor.is_some() {
        // The connections the running agent hands over were accepted under its rules, which
        // may not be these: as after a reload, their packets are looked up whatever the
        // rules say, until they have ended.
        return_path.rules_changing();
    }
    let return_path_lookup = return_path.needed();
    report::log_return_path(return_path_lookup);
    classifier.set_config(global_config(
        &rules,
        args.outbound_mark,
        local.as_ref(),
        return_path_lookup.is_some(),
    ))?;

    let live = Arc::new(LiveConnections::default());
    let udp_live = Arc::new(LiveSessions::default());
    let destinations = Arc::new(Destinations::new(args.allow_local_destinations));
    let upstream = match (&args.upstream, args.spoof_source) {
        (Some(server), _) => Upstream::Socks5(server.clone()),
        (None, true) => Upstream::SpoofSource,
        (None, false) => Upstream::Direct,
    };
    let outbound = Outbound {
        connect_timeout: args.connect_timeout,
        mark: args.outbound_mark,
    };
    let listeners = Listeners::new(
        Workers::start(worker_count)
            .map_err(|e| AgentError::Io("starting the TCP worker threads", e))?,
        ProxyOptions {
            upstream: upstream.clone(),
            outbound,
            relay: args.relay,
            idle_timeout: args.tcp_idle_timeout,
            limit: Arc::new(Semaphore::new(args.max_connections as usize)),
            live: Arc::clone(&live),
            kernel_relay,
            destinations: Arc::clone(&destinations),
            return_path: Arc::clone(&return_path),
        },
        UdpOptions {
            idle_timeout: args.udp_idle_timeout,
            max_sessions: args.udp_max_sessions as usize,
            outbound,
            upstream,
            destinations: Arc::clone(&destinations),
            return_path: Arc::clone(&return_path),
            sessions: Default::default(),
            live: Arc::clone(&udp_live),
        },
    );

    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| AgentError::Routing(RoutingError::Connect(e)))?;
    tokio::spawn(connection);
    let addr_changes =
        ifaddrs::watch().map_err(|e| AgentError::Io("watching interface addresses", e))?;
    // Before any listener serves: the proxy's own addresses are refused as destinations.
    // Before the cgroup programs are attached: they leave local connections to them alone.
    destinations.refresh(&handle).await?;
    classifier.set_own_addresses(&destinations.own())?;
    let interfaces = Interfaces::new(handle.clone(), ifaces);
    let headers = interfaces.prepare(&mut classifier).await?;

    let sysctl_poll = serve::poll(src_valid_mark::POLL_INTERVAL);
    let mut inputs = Inputs {
        addr_changes,
        stats: stats_listener,
        handover: handover_listener,
        stats_access: stats::Access {
            group: args.stats_group,
        },
        sysctl_poll,
        return_path_poll: serve::poll(return_path::POLL_INTERVAL),
        metrics,
        config_watch,
    };

    // From here on the system changes: whatever fails, the teardown undoes what was done.
    let installed = Installed::new(
        classifier,
        &args.ifaces,
        handle,
        args.table,
        local.is_some(),
    );
    let rules_status = RulesStatus::new(&rules);
    let mut agent = Agent {
        args,
        rules,
        destinations,
        interfaces,
        listeners,
        installed,
        local,
        return_path,
        return_path_lookup: return_path_lookup.is_some(),
        live,
        udp_live,
        headers,
        predecessor_serves: predecessor.is_some(),
        rules_status,
    };
    let result = async {
        start(&mut agent, pending).await?;
        if let Some(predecessor) = predecessor {
            agent.take_connections(predecessor).await?;
        }
        notify_ready();
        agent.serve(&mut signals, &mut inputs).await
    }
    .await;
    stop(agent, result, &mut signals).await
}

/// Tells systemd (`Type=notify`) that the agent serves, and that it is the service's main
/// process now: after a handover (`proxy upgrade`) it is not the process systemd started.
fn notify_ready() {
    let pid = std::process::id();
    if let Err(e) = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::MainPid(pid),
            sd_notify::NotifyState::Ready,
        ],
    ) {
        warn!("telling the service manager the agent is ready: {e}");
    }
}

/// Changes the system, in an order in which no packet is marked before its route exists
/// (without it the forwarding path drops a packet that carries a socket, T6) and nothing
/// blackholes: the sysctls that keep marked IPv4 deliverable under `src_valid_mark=1`,
/// the policy routes, the listeners in the sockmap, and only then the sk_lookup program
/// and the classifier, the first things that mark a packet, and (`--local`) last the cgroup
/// programs, which mark local sockets: by then their route (the fwmark rule and the IPv4
/// source rule) and the classifier on `lo` that takes them are there. Then what a crashed
/// run left and this one did not take over goes.
async fn start(agent: &mut Agent, pending: Pending) -> Result<(), AgentError> {
    let Agent {
        args,
        rules,
        interfaces,
        listeners,
        installed,
        local,
        headers,
        ..
    } = agent;
    installed.sysctls.start()?;
    installed.routing.install(&marks(rules)).await?;
    listeners.start(&mut installed.classifier, pending)?;
    installed.classifier.attach_sk_lookup()?;
    for (name, header) in interfaces.names().zip(headers.iter()) {
        installed.classifier.attach(name, *header, args.tc_attach)?;
    }
    if let Some(local) = local {
        installed.classifier.attach_local(&local.attach_to)?;
    }
    installed.classifier.remove_leftovers();
    // Set up: from here on only what reloads, interface events and the teardown need.
    let mut kept = privileges::KEPT.to_vec();
    if privileges::bpf_calls_need_cap_bpf(|| installed.classifier.probe_bpf_call()) {
        info!(
            "this kernel refuses every bpf() call without CAP_BPF (before Linux 6.5, with \
             kernel.unprivileged_bpf_disabled set): keeping it to read counters and apply reloads"
        );
        kept.push(privileges::KEPT_FOR_BPF_CALLS);
    }
    info!("{}", privileges::drop_to_kept(&kept)?);
    report::log_rules(rules);
    info!("rules hash {}", rules_status::rules_hash(rules));
    crate::access_log::rules_in_force(rules);
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
    Ok(())
}

/// The way out, whatever `result` says:
/// * handed over: the connections that could not move drain here, and everything
///   installed stays, now the next agent's;
/// * stopped for good (SIGINT): the drain, then the teardown, then the counters;
/// * stopped to be replaced (SIGTERM, or a start that failed after taking over what a
///   crashed run left, see [`Installed::leave_attached`], or while the agent it took over
///   from still serves): everything installed stays for the next agent.
async fn stop(
    agent: Agent,
    result: Result<Exit, AgentError>,
    signals: &mut ShutdownSignals,
) -> Result<(), AgentError> {
    let Agent {
        args,
        rules,
        destinations,
        interfaces,
        mut listeners,
        mut installed,
        live,
        predecessor_serves,
        ..
    } = agent;
    let failed = result.is_err();
    let (exit, result) = match result {
        Ok(exit) => (Some(exit), Ok(())),
        Err(e) => (None, Err(e)),
    };
    // After SIGTERM the serve loop waited already; the rest are cut now.
    let drain_timeout = if exit == Some(Exit::Stopped(Stop::ToBeReplaced)) {
        Duration::ZERO
    } else {
        args.drain_timeout
    };
    drain::drain(&mut listeners, &live, drain_timeout, signals, failed).await;
    // Connections still open after the drain end here, before the routes they use go:
    // stopping the workers drops their tasks and closes their sockets.
    drop(listeners);

    match exit {
        Some(Exit::Stopped(Stop::ForGood)) => {}
        Some(Exit::Stopped(Stop::ToBeReplaced)) | Some(Exit::HandedOver) => {
            installed.leave_for_successor(exit == Some(Exit::HandedOver));
            report::log_counters(&installed.classifier, &rules, &destinations);
            return result;
        }
        None if predecessor_serves => {
            installed.leave_to_predecessor();
            return result;
        }
        None if installed.classifier.took_over() => {
            installed.leave_attached();
            return result;
        }
        None => {}
    }
    installed.teardown(&interfaces).await;
    report::log_counters(&installed.classifier, &rules, &destinations);
    // Give in-flight log records a moment to be forwarded.
    tokio::time::sleep(Duration::from_millis(20)).await;
    result
}

/// Why every packet no rule matches needs the return path's lookup for the whole run:
/// sockets with foreign tuples that the agent does not account for.
fn return_path_always(args: &RunArgs) -> Option<&'static str> {
    if args.listener == ListenerMode::External {
        Some("--listener external: the external proxy's own transparent sockets")
    } else if args.spoof_source {
        Some("--spoof-source: the upstream sockets bound to the clients' addresses")
    } else {
        None
    }
}

fn marks(rules: &[Rule]) -> Vec<Mark> {
    rules.iter().map(|r| r.mark).collect()
}

/// The mark for the return path (`-m socket --transparent -j DIVERT`): the first rule's,
/// and whether to look it up at all (`return_path_lookup`). With `--local`, what the cgroup
/// programs need to know of the agent.
fn global_config(
    rules: &[Rule],
    outbound_mark: u32,
    local: Option<&LocalScope>,
    return_path_lookup: bool,
) -> GlobalConfig {
    let mark = rules.first().map_or(Mark::default(), |r| r.mark);
    GlobalConfig {
        divert_mark_value: mark.value,
        divert_mark_mask: mark.mask,
        bypass_mark: outbound_mark,
        skip_return_path: u32::from(!return_path_lookup),
        netns_cookie: local.map_or(0, |l| l.netns_cookie),
        agent_cgroup_id: local.map_or(0, |l| l.agent_cgroup_id),
    }
}

/// `--local`: where the cgroup programs are attached, and what tells the agent's own
/// sockets and other namespaces' apart.
pub struct LocalScope {
    /// The outermost `--cgroup` paths, or the cgroup2 root.
    attach_to: Vec<Cgroup>,
    /// This network namespace's cookie.
    netns_cookie: u64,
    /// Attached at the root: the agent's own cgroup, left alone; else 0.
    agent_cgroup_id: u64,
}

impl LocalScope {
    fn resolve(paths: &[String]) -> Result<Self, AgentError> {
        let netns_cookie = cgroup::netns_cookie()
            .map_err(|e| AgentError::Io("reading this network namespace's cookie", e))?;
        let (attach_to, agent_cgroup_id) = if paths.is_empty() {
            (vec![Cgroup::root()?], Cgroup::own()?.id)
        } else {
            let cgroups = paths
                .iter()
                .map(|p| Cgroup::resolve(p))
                .collect::<Result<Vec<_>, _>>()?;
            (cgroup::outermost(&cgroups), 0)
        };
        Ok(LocalScope {
            attach_to,
            netns_cookie,
            agent_cgroup_id,
        })
    }
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
