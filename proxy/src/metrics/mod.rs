//! `--metrics ADDR:PORT`: the agent's counters in the Prometheus exposition format at
//! `/metrics`.
//!
//! Two sources, read so that a scrape never holds anything the data path needs:
//! * The proxy's own counters ([`DataPath`], one static): plain atomics that the accept
//!   loops, connection tasks and UDP sessions add to, and that the scraper only loads.
//!   Nothing in the data path waits for a scrape, and a connection pays a few relaxed
//!   atomic additions.
//! * The classifier's counters, per-CPU BPF maps held by the agent's serve loop (as for
//!   `proxy stats`): the scrape task asks the loop for a [`ClassifierSnapshot`] over a
//!   bounded channel and waits at most [`server::SNAPSHOT_TIMEOUT`]; the loop reads the
//!   maps and sends the snapshot back without waiting for anyone. A scraper that is slow
//!   to read its answer holds only its own connection task. While the loop is busy (a
//!   reload), a scrape answers without the classifier's families and says so
//!   (`proxy_classifier_snapshot_ok 0`).
//!
//! [`exposition`] turns both into text with `prometheus-client`; [`server`] is the HTTP
//! side (hyper 1 on the agent's runtime).

pub mod exposition;
pub mod server;

use std::{
    io,
    sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
    time::Duration,
};

use proxy_common::{Counter, RuleCounters};

pub use self::server::{MetricsError, Requests, SnapshotReply};

/// What the serve loop reads from the classifier's maps for one scrape.
#[derive(Debug, Clone, Default)]
pub struct ClassifierSnapshot {
    /// The global counters, summed over CPUs.
    pub counters: Vec<(Counter, u64)>,
    /// Each rule in force, in order: its `proxy stats` description and its counters.
    pub rules: Vec<(String, RuleCounters)>,
    /// Original destinations the proxy refused (`refused_destination`).
    pub refused_destinations: u64,
    /// Which rules are in force, and the reloads so far.
    pub rules_in_force: RulesSnapshot,
}

/// The rules in force and the reloads so far (`agent::rules_status`).
#[derive(Debug, Clone, Default)]
pub struct RulesSnapshot {
    /// A short hash of the rules in force: equal on two nodes with the same rules.
    pub hash: String,
    /// When they were put in force (seconds since the epoch).
    pub applied_unix: u64,
    pub reloads_applied: u64,
    pub reloads_refused: u64,
    /// How the last reload went; none before the first.
    pub last_reload_ok: Option<bool>,
}

/// Why a TCP connection ended, as the `reason` label of
/// `proxy_connections_ended_total`: the closing log line's first word for a relayed
/// connection ([`crate::relay::Ending`]), and the early ends that have no such line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// Both sides closed.
    Done,
    /// No byte either way for `--tcp-idle-timeout`.
    Idle,
    /// A side reset or failed.
    Reset,
    /// The upstream connect failed.
    Refused,
    /// Still open when the drain on shutdown ran out.
    Drain,
    /// Reset at once: `--max-connections` reached.
    MaxConnections,
    /// Straight to the proxy's own port (it would loop).
    Loop,
    /// The original destination is one the proxy does not relay to.
    RefusedDestination,
    /// The accepted socket had no local address.
    Error,
    /// Moved, live, to the next agent (an upgrade or a handover): it goes on there.
    HandedOver,
}

impl EndReason {
    pub const ALL: [EndReason; 10] = [
        EndReason::Done,
        EndReason::Idle,
        EndReason::Reset,
        EndReason::Refused,
        EndReason::Drain,
        EndReason::MaxConnections,
        EndReason::Loop,
        EndReason::RefusedDestination,
        EndReason::Error,
        EndReason::HandedOver,
    ];

    pub fn name(self) -> &'static str {
        match self {
            EndReason::Done => "done",
            EndReason::Idle => "idle",
            EndReason::Reset => "reset",
            EndReason::Refused => "refused",
            EndReason::Drain => "drain",
            EndReason::MaxConnections => "max_connections",
            EndReason::Loop => "loop",
            EndReason::RefusedDestination => "refused_destination",
            EndReason::Error => "error",
            EndReason::HandedOver => "handed_over",
        }
    }

    /// The reason of a relayed connection's [`Ending`](crate::relay::Ending).
    pub fn of(ending: &crate::relay::Ending) -> Self {
        use crate::relay::Ending;
        match ending {
            Ending::Done => EndReason::Done,
            Ending::Idle(_) => EndReason::Idle,
            Ending::Reset(_) => EndReason::Reset,
            Ending::Refused(_) => EndReason::Refused,
            Ending::Drain => EndReason::Drain,
        }
    }
}

/// Why an upstream connect failed, as the `reason` label of
/// `proxy_upstream_connect_failures_total`, from the error's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    /// Refused (a TCP reset, or the SOCKS5 server's "connection refused").
    Refused,
    /// No answer within `--connect-timeout`.
    Timeout,
    /// No route to the host or network.
    Unreachable,
    /// Not allowed (SOCKS5 authentication or ruleset, a local firewall).
    Denied,
    /// Anything else.
    Other,
}

impl ConnectFailure {
    pub const ALL: [ConnectFailure; 5] = [
        ConnectFailure::Refused,
        ConnectFailure::Timeout,
        ConnectFailure::Unreachable,
        ConnectFailure::Denied,
        ConnectFailure::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ConnectFailure::Refused => "refused",
            ConnectFailure::Timeout => "timeout",
            ConnectFailure::Unreachable => "unreachable",
            ConnectFailure::Denied => "denied",
            ConnectFailure::Other => "other",
        }
    }

    pub fn of(error: &io::Error) -> Self {
        match error.kind() {
            io::ErrorKind::ConnectionRefused => ConnectFailure::Refused,
            io::ErrorKind::TimedOut => ConnectFailure::Timeout,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                ConnectFailure::Unreachable
            }
            io::ErrorKind::PermissionDenied => ConnectFailure::Denied,
            _ => ConnectFailure::Other,
        }
    }
}

/// Upper bounds of the upstream connect time histogram, in seconds (`+Inf` follows).
pub const CONNECT_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram of atomics: each observation adds to one bucket and to the sum; the
/// scraper loads them (the count is the sum of the buckets it loaded, so the two agree).
pub struct AtomicHistogram {
    /// One per [`CONNECT_BUCKETS`] bound, then `+Inf`; not cumulative.
    buckets: [AtomicU64; CONNECT_BUCKETS.len() + 1],
    sum_micros: AtomicU64,
}

impl AtomicHistogram {
    const fn new() -> Self {
        AtomicHistogram {
            buckets: [const { AtomicU64::new(0) }; CONNECT_BUCKETS.len() + 1],
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: Duration) {
        let secs = value.as_secs_f64();
        let i = CONNECT_BUCKETS
            .iter()
            .position(|bound| secs <= *bound)
            .unwrap_or(CONNECT_BUCKETS.len());
        self.buckets[i].fetch_add(1, Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(value.as_micros()).unwrap_or(u64::MAX),
            Relaxed,
        );
    }

    /// (sum in seconds, count, per-bucket counts with their upper bounds, `+Inf` last).
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let buckets: Vec<(f64, u64)> = CONNECT_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(&self.buckets)
            .map(|(bound, n)| (bound, n.load(Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = self.sum_micros.load(Relaxed) as f64 / 1e6;
        (sum, count, buckets)
    }
}

/// The proxy's own counters, added to by the data path and only loaded by the scraper.
pub struct DataPath {
    pub accepted: AtomicU64,
    pub active: AtomicI64,
    /// By [`EndReason`], in [`EndReason::ALL`] order.
    pub ended: [AtomicU64; EndReason::ALL.len()],
    /// By [`ConnectFailure`], in [`ConnectFailure::ALL`] order.
    pub connect_failures: [AtomicU64; ConnectFailure::ALL.len()],
    /// Bytes relayed client to upstream, added when each connection ends.
    pub bytes_up: AtomicU64,
    /// Bytes relayed upstream to client, added when each connection ends.
    pub bytes_down: AtomicU64,
    /// Successful upstream connects, in seconds.
    pub connect_time: AtomicHistogram,
    pub udp_created: AtomicU64,
    pub udp_active: AtomicI64,
    /// Datagrams and bytes relayed each way, added when each session ends.
    pub udp_datagrams_up: AtomicU64,
    pub udp_datagrams_down: AtomicU64,
    pub udp_bytes_up: AtomicU64,
    pub udp_bytes_down: AtomicU64,
}

/// The one instance: the data path runs on several threads and runtimes (the TCP workers,
/// the UDP listeners), and a static needs no handle passed to each.
pub static DATA_PATH: DataPath = DataPath {
    accepted: AtomicU64::new(0),
    active: AtomicI64::new(0),
    ended: [const { AtomicU64::new(0) }; EndReason::ALL.len()],
    connect_failures: [const { AtomicU64::new(0) }; ConnectFailure::ALL.len()],
    bytes_up: AtomicU64::new(0),
    bytes_down: AtomicU64::new(0),
    connect_time: AtomicHistogram::new(),
    udp_created: AtomicU64::new(0),
    udp_active: AtomicI64::new(0),
    udp_datagrams_up: AtomicU64::new(0),
    udp_datagrams_down: AtomicU64::new(0),
    udp_bytes_up: AtomicU64::new(0),
    udp_bytes_down: AtomicU64::new(0),
};

/// One accepted TCP connection, counted in when accepted and out (with its reason, and
/// active down by one) when dropped, however its task ends.
pub struct Connection {
    reason: EndReason,
}

impl Connection {
    pub fn accepted() -> Self {
        DATA_PATH.accepted.fetch_add(1, Relaxed);
        DATA_PATH.active.fetch_add(1, Relaxed);
        // Until told otherwise: a task dropped before an ending (the agent stopping the
        // workers after the drain) counts as cut by the drain.
        Connection {
            reason: EndReason::Drain,
        }
    }

    /// One the previous agent accepted and handed over: active again, not accepted twice.
    pub fn resumed() -> Self {
        DATA_PATH.active.fetch_add(1, Relaxed);
        Connection {
            reason: EndReason::Drain,
        }
    }

    /// How it ended; counted when dropped.
    pub fn ends(&mut self, reason: EndReason) {
        self.reason = reason;
    }

    /// A successful upstream connect that took `elapsed`.
    pub fn connected(&self, elapsed: Duration) {
        DATA_PATH.connect_time.observe(elapsed);
    }

    /// A failed upstream connect.
    pub fn connect_failed(&self, error: &io::Error) {
        let i = ConnectFailure::ALL
            .iter()
            .position(|f| *f == ConnectFailure::of(error))
            .unwrap_or(ConnectFailure::ALL.len() - 1);
        DATA_PATH.connect_failures[i].fetch_add(1, Relaxed);
    }

    /// The bytes it relayed each way.
    pub fn relayed(&self, up: u64, down: u64) {
        DATA_PATH.bytes_up.fetch_add(up, Relaxed);
        DATA_PATH.bytes_down.fetch_add(down, Relaxed);
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let i = EndReason::ALL
            .iter()
            .position(|r| *r == self.reason)
            .unwrap_or(EndReason::ALL.len() - 1);
        DATA_PATH.ended[i].fetch_add(1, Relaxed);
        DATA_PATH.active.fetch_sub(1, Relaxed);
    }
}

/// What a UDP session relayed, kept by the session as it goes.
#[derive(Debug, Default, Clone, Copy)]
pub struct UdpTally {
    pub datagrams_up: u64,
    pub datagrams_down: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
}

/// One UDP session, counted in when created and out when dropped.
pub struct UdpSession;

impl UdpSession {
    pub fn created() -> Self {
        DATA_PATH.udp_created.fetch_add(1, Relaxed);
        DATA_PATH.udp_active.fetch_add(1, Relaxed);
        UdpSession
    }

    /// One the previous agent created and handed over: active again, not created twice.
    pub fn resumed() -> Self {
        DATA_PATH.udp_active.fetch_add(1, Relaxed);
        UdpSession
    }

    /// What the session relayed, once it has ended.
    pub fn relayed(&self, tally: &UdpTally) {
        DATA_PATH
            .udp_datagrams_up
            .fetch_add(tally.datagrams_up, Relaxed);
        DATA_PATH
            .udp_datagrams_down
            .fetch_add(tally.datagrams_down, Relaxed);
        DATA_PATH.udp_bytes_up.fetch_add(tally.bytes_up, Relaxed);
        DATA_PATH
            .udp_bytes_down
            .fetch_add(tally.bytes_down, Relaxed);
    }
}

impl Drop for UdpSession {
    fn drop(&mut self) {
        DATA_PATH.udp_active.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_puts_each_observation_in_its_bucket() {
        let h = AtomicHistogram::new();
        h.observe(Duration::from_micros(400));
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_secs(60));
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 3);
        assert!((sum - 60.0034).abs() < 1e-9, "{sum}");
        assert_eq!(buckets[0], (0.0005, 1));
        assert_eq!(buckets[3], (0.005, 1));
        assert_eq!(buckets.last(), Some(&(f64::INFINITY, 1)));
    }

    #[test]
    fn connect_errors_are_classified_by_kind() {
        let e = |kind| io::Error::new(kind, "x");
        assert_eq!(
            ConnectFailure::of(&e(io::ErrorKind::ConnectionRefused)),
            ConnectFailure::Refused
        );
        assert_eq!(
            ConnectFailure::of(&io::Error::from_raw_os_error(libc::EHOSTUNREACH)),
            ConnectFailure::Unreachable
        );
        assert_eq!(
            ConnectFailure::of(&e(io::ErrorKind::TimedOut)),
            ConnectFailure::Timeout
        );
        assert_eq!(
            ConnectFailure::of(&e(io::ErrorKind::InvalidData)),
            ConnectFailure::Other
        );
    }
}
