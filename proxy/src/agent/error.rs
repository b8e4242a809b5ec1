//! Why the agent could not start, or stopped with an error.

use super::slots::TooManyListeners;
use crate::{
    cgroup::CgroupError,
    ebpf::EbpfError,
    ifaddrs::IfaddrsError,
    link_header::LinkHeaderError,
    privileges::PrivilegeError,
    routing::RoutingError,
    rules::RuleError,
    rules_file::RulesFileError,
    src_valid_mark::SysctlError,
    tproxy::{ListenError, destination::OwnAddressesError},
};

/// Why the agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Capabilities the agent needs are missing, or the others could not be dropped.
    #[error(transparent)]
    Privileges(#[from] PrivilegeError),
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
    /// Another agent already uses this routing table in this network namespace, and does
    /// not answer on the handover socket (one from before handovers, or a stuck one).
    #[error(
        "another agent with routing table {0} is running in this network namespace and does \
         not answer on its handover socket @proxy-handover-{0}"
    )]
    TableInUse(u32),
    /// Taking over from the agent that runs on this table failed; it keeps serving.
    #[error(
        "taking over from the agent running with routing table {0} in this network namespace \
         (it keeps serving)"
    )]
    Handover(u32, #[source] crate::handover::HandoverError),
    /// A `--cgroup` path (or the cgroup2 mount) that cannot be used.
    #[error("--local")]
    Cgroup(#[from] CgroupError),
    /// `--metrics` cannot listen.
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
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

impl From<TooManyListeners> for AgentError {
    fn from(e: TooManyListeners) -> Self {
        AgentError::Unsupported(e.to_string())
    }
}
