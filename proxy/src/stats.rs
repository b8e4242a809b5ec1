//! `proxy stats`: the counters of a running agent, like `iptables -vL`.
//!
//! The agent answers on an abstract Unix socket, `@proxy-stats-<table>`. Abstract sockets
//! belong to a network namespace, so `proxy stats` sees the agent of its own namespace,
//! exactly as `iptables -vL` shows that namespace's rules, with no file to clean up after a
//! crash.

use std::{
    io::{self, Read as _},
    os::{linux::net::SocketAddrExt as _, unix::net::SocketAddr},
    time::Duration,
};

use proxy_common::{Counter, RuleCounters};

use crate::rules::Rule;

/// How long the agent waits for a stats client to take its report; one that does not read
/// is dropped then, so it holds no task or descriptor for longer.
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// The first word of the agent's answer to a client it refuses.
const REFUSED: &str = "refused:";

/// The proxy's counter of original destinations it would not relay to.
pub(crate) const REFUSED_DESTINATION: &str = "refused_destination";

/// The agent could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// No agent with that table in this network namespace.
    #[error("no agent with routing table {0} is running in this network namespace")]
    NoAgent(u32),
    /// The agent answers only root and its `--stats-group`.
    #[error("the agent refused: {0}")]
    Refused(String),
    /// The socket failed.
    #[error("talking to the agent")]
    Io(#[source] io::Error),
}

/// The abstract socket address of the agent using `table`.
pub(crate) fn socket_addr(table: u32) -> io::Result<SocketAddr> {
    SocketAddr::from_abstract_name(proxy_common::stats_socket_name(table).as_bytes())
}

/// Binds the agent's stats socket.
pub(crate) fn listen(table: u32) -> io::Result<tokio::net::UnixListener> {
    let listener = std::os::unix::net::UnixListener::bind_addr(&socket_addr(table)?)?;
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

/// `proxy stats`: asks the agent and returns its report.
pub fn query(table: u32) -> Result<String, StatsError> {
    let addr = socket_addr(table).map_err(StatsError::Io)?;
    let mut stream =
        std::os::unix::net::UnixStream::connect_addr(&addr).map_err(|e| match e.kind() {
            io::ErrorKind::ConnectionRefused | io::ErrorKind::NotFound => {
                StatsError::NoAgent(table)
            }
            _ => StatsError::Io(e),
        })?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(StatsError::Io)?;
    let mut report = String::new();
    stream.read_to_string(&mut report).map_err(StatsError::Io)?;
    if let Some(why) = report.strip_prefix(REFUSED) {
        return Err(StatsError::Refused(why.trim().to_owned()));
    }
    Ok(report)
}

/// Who may read the counters: root, and the members of `--stats-group`. The socket is an
/// abstract one, which any process of the network namespace can connect to, so the agent
/// checks the peer's credentials (`SO_PEERCRED`) on every connection.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Access {
    pub group: Option<u32>,
}

impl Access {
    /// Root, or a process whose primary or supplementary groups include the group.
    pub(crate) fn permits(&self, cred: &tokio::net::unix::UCred) -> bool {
        if cred.uid() == 0 {
            return true;
        }
        let Some(group) = self.group else {
            return false;
        };
        cred.gid() == group
            || cred
                .pid()
                .is_some_and(|pid| supplementary_groups(pid).contains(&group))
    }

    /// What a refused client reads.
    pub(crate) fn refusal(&self) -> String {
        refusal(&match self.group {
            Some(gid) => format!("only root and group {gid} may read the counters"),
            None => "only root may read the counters (the agent's --stats-group names a group \
                     that may)"
                .to_owned(),
        })
    }
}

/// The answer to a client that is refused, for `why`; `query` tells it from a report.
pub(crate) fn refusal(why: &str) -> String {
    format!("{REFUSED} {why}\n")
}

/// The `Groups:` of `/proc/PID/status` (empty if it cannot be read: the process is gone).
fn supplementary_groups(pid: i32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|l| {
                l.strip_prefix("Groups:").map(|g| {
                    g.split_whitespace()
                        .filter_map(|n| n.parse().ok())
                        .collect()
                })
            })
        })
        .unwrap_or_default()
}

/// Sends `text` to a stats client on a task of its own, giving up after [`WRITE_TIMEOUT`].
pub(crate) fn reply(mut stream: tokio::net::UnixStream, text: String) {
    use tokio::io::AsyncWriteExt as _;
    tokio::spawn(async move {
        let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(text.as_bytes())).await;
    });
}

/// One line describing a rule, in the words of its flags.
pub(crate) fn describe_rule(rule: &Rule) -> String {
    let dst = if rule.dst.is_empty() {
        "any".to_owned()
    } else {
        rule.dst
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let on_ip = rule
        .on_ip
        .map(|ip| format!(" on-ip {ip}"))
        .unwrap_or_default();
    format!(
        "{} dst {dst} dport {} -> on-port {}{on_ip} mark {}{}",
        rule.protocols,
        rule.dport,
        rule.on_port,
        rule.mark,
        if rule.fail_open { " fail-open" } else { "" }
    )
}

/// The report: the agent's process and version, which rules are in force and how the
/// last reload went (`rules_status`, its own lines), the global counters (the classifier's,
/// then the proxy's own), then one line per rule.
pub(crate) fn format_report(
    counters: &[(Counter, u64)],
    proxy: &[(&str, u64)],
    rules: &[(Rule, RuleCounters)],
    rules_status: &str,
) -> String {
    // Which process answers: after an upgrade or a handover, not the one first started.
    let mut out = format!(
        "agent: pid {}, proxy {}\n{rules_status}counters:\n",
        std::process::id(),
        env!("CARGO_PKG_VERSION")
    );
    for (c, v) in counters {
        out.push_str(&format!("  {:<26}{v:>14}\n", c.name()));
    }
    for (name, v) in proxy {
        out.push_str(&format!("  {name:<26}{v:>14}\n"));
    }
    out.push_str(&format!(
        "rules:\n  {:>4} {:>12} {:>14} {:>12} {:>12}  rule\n",
        "#", "pkts", "bytes", "assigned", "dropped"
    ));
    for (i, (rule, c)) in rules.iter().enumerate() {
        out.push_str(&format!(
            "  {:>4} {:>12} {:>14} {:>12} {:>12}  {}\n",
            i + 1,
            c.packets,
            c.bytes,
            c.assigned,
            c.dropped,
            describe_rule(rule)
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::{Mark, Protocols};

    #[test]
    fn report_lists_counters_and_rules() {
        let rule = Rule {
            protocols: Protocols::TCP,
            dst: vec![],
            dport: "80,443".parse().expect("ports"),
            on_ip: Some("127.0.0.1".parse().expect("ip")),
            on_port: 50080,
            mark: Mark::default(),
            fail_open: false,
            listener_slot: None,
            local: None,
        };
        let counters = RuleCounters {
            packets: 10,
            bytes: 1000,
            assigned: 9,
            dropped: 1,
        };
        let report = format_report(
            &[(Counter::Seen, 42)],
            &[(REFUSED_DESTINATION, 3)],
            &[(rule, counters)],
            "",
        );
        assert!(report.contains("refused_destination") && report.contains(" 3\n"));
        assert!(report.contains("seen") && report.contains("42"), "{report}");
        assert!(
            report
                .contains("tcp dst any dport 80,443 -> on-port 50080 on-ip 127.0.0.1 mark 0x1/0x1"),
            "{report}"
        );
        let line = report
            .lines()
            .find(|l| l.contains("dport"))
            .expect("rule line");
        let numbers: Vec<&str> = line.split_whitespace().take(5).collect();
        assert_eq!(numbers, ["1", "10", "1000", "9", "1"]);
    }
}
