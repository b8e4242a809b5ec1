//! `proxy run`: sets everything up in an order that never blackholes traffic, serves until
//! SIGINT/SIGTERM, and undoes everything on the way out, whatever failed.
//!
//! Order: check what can be checked without touching the system (root, interfaces, rules,
//! the listener's port); load the programs and fill the maps; install the policy route;
//! attach the sk_lookup program and the classifier last, so that no packet is marked
//! before its route exists. Teardown runs in reverse.

use std::{future::Future, sync::Arc, time::Duration};

use log::{error, info};
use proxy_common::{CONFIG_DIVERT, Counter, GlobalConfig};
use tokio::net::TcpListener;

use crate::{
    config::{ListenerMode, RunArgs},
    ebpf::{Classifier, EbpfError},
    ifaddrs::{self, IfaddrsError},
    routing::{PolicyRouting, RoutingError},
    rules::{self, RuleError},
    tproxy::tcp::{self, ListenError, ProxyOptions},
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
    #[error("invalid rule")]
    Rule(#[from] RuleError),
    /// The transparent listener could not be opened.
    #[error(transparent)]
    Listen(#[from] ListenError),
    /// Loading or attaching the eBPF programs failed.
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    /// Installing the policy route failed.
    #[error("policy routing")]
    Routing(#[from] RoutingError),
    /// Reading an interface's addresses failed.
    #[error(transparent)]
    Ifaddrs(#[from] IfaddrsError),
    /// The signal handlers could not be installed.
    #[error("installing signal handlers")]
    Signals(#[source] std::io::Error),
    /// A combination of flags this version cannot serve.
    #[error("{0}")]
    Unsupported(&'static str),
    /// The listener could not be handed to tokio.
    #[error("registering the listener with the runtime")]
    Runtime(#[source] std::io::Error),
}

/// Waits for SIGINT or SIGTERM.
pub fn shutdown_signal() -> Result<impl Future<Output = &'static str>, AgentError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut int = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;
    let mut term = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
    Ok(async move {
        tokio::select! {
            _ = int.recv() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        }
    })
}

/// Runs the agent until `shutdown` completes.
pub async fn run(
    args: RunArgs,
    shutdown: impl Future<Output = &'static str>,
) -> Result<(), AgentError> {
    if !nix::unistd::geteuid().is_root() {
        return Err(AgentError::NotRoot);
    }
    let mut ifaces = Vec::new();
    for name in &args.ifaces {
        let index =
            ifaddrs::ifindex(name).ok_or_else(|| AgentError::NoSuchInterface(name.clone()))?;
        ifaces.push((name.clone(), index));
    }
    let rule = args.rule();
    let compiled = rules::compile(std::slice::from_ref(&rule))?;
    let builtin = args.listener == ListenerMode::Builtin;
    if builtin && args.on_port == 0 {
        return Err(AgentError::Unsupported(
            "--on-port 0 (the packet's own port) needs --listener external",
        ));
    }
    if builtin && rule.protocols.udp {
        return Err(AgentError::Unsupported(
            "UDP through the built-in proxy is not implemented yet; use --listener external",
        ));
    }
    let listener = if builtin {
        Some(tcp::listen(args.on_ip, args.on_port)?)
    } else {
        None
    };

    let mut classifier = Classifier::load()?;
    classifier.install_rules(&compiled)?;
    classifier.set_config(GlobalConfig {
        divert_mark_value: rule.mark.value,
        divert_mark_mask: rule.mark.mask,
        flags: CONFIG_DIVERT,
    })?;
    if let Some(listener) = &listener {
        classifier.set_listener(0, listener)?;
    }

    let (connection, handle, _) =
        rtnetlink::new_connection().map_err(|e| AgentError::Routing(RoutingError::Connect(e)))?;
    tokio::spawn(connection);
    for (name, index) in &ifaces {
        let addrs = ifaddrs::laddr_candidates(&handle, *index).await?;
        info!("{name}: laddr candidates {}", describe_addrs(&addrs));
        classifier.set_iface_addrs(*index, addrs)?;
    }

    let mut routing = PolicyRouting::new(rule.mark, args.table)?;
    let serving = async {
        routing.install().await?;
        classifier.attach_sk_lookup()?;
        for (name, _) in &ifaces {
            classifier.attach(name)?;
        }
        let listener = match listener {
            Some(l) => Some(TcpListener::from_std(l).map_err(AgentError::Runtime)?),
            None => None,
        };
        let target = match &listener {
            Some(l) => format!(
                "built-in transparent listener {}",
                l.local_addr().map_err(AgentError::Runtime)?
            ),
            None => format!(
                "external listener at {}:{}",
                args.on_ip
                    .map_or("<ingress address>".to_owned(), |ip| ip.to_string()),
                if args.on_port == 0 {
                    "<destination port>".to_owned()
                } else {
                    args.on_port.to_string()
                }
            ),
        };
        info!(
            "ready: {} to {} port {} on {} -> {target} (mark {}, table {}{})",
            rule.protocols,
            if rule.dst.is_empty() {
                "any destination".to_owned()
            } else {
                rule.dst
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            },
            rule.dport,
            args.ifaces.join(","),
            rule.mark,
            args.table,
            if rule.fail_open { ", fail-open" } else { "" }
        );
        let options = Arc::new(ProxyOptions {
            connect_timeout: args.connect_timeout,
        });
        let serve = async {
            match listener {
                Some(listener) => tcp::serve(listener, options).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = serve => {}
            signal = shutdown => info!("{signal}: shutting down"),
        }
        Ok::<(), AgentError>(())
    };
    let result = serving.await;

    // Teardown, in reverse, whatever happened above.
    classifier.detach_all();
    if let Err(e) = routing.remove().await {
        error!("removing policy routing: {}", crate::error_chain(&e));
    }
    log_counters(&classifier);
    // Give in-flight log records a moment to be forwarded.
    tokio::time::sleep(Duration::from_millis(20)).await;
    result
}

fn describe_addrs(addrs: &proxy_common::IfaceAddrs) -> String {
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

fn log_counters(classifier: &Classifier) {
    match classifier.counters() {
        Ok(counters) => info!(
            "counters: {}",
            counters
                .iter()
                .map(|(c, v)| format!("{}={v}", Counter::name(*c)))
                .collect::<Vec<_>>()
                .join(" ")
        ),
        Err(e) => error!("reading counters: {}", crate::error_chain(&e)),
    }
    if let Ok(rule) = classifier.rule_counters(0) {
        info!(
            "rule 0: packets={} bytes={} assigned={} dropped={}",
            rule.packets, rule.bytes, rule.assigned, rule.dropped
        );
    }
}
