//! Command line. The flags of `proxy run` are named after the iptables TPROXY target so the
//! classic recipe maps one to one:
//!
//! ```text
//! iptables -t mangle -A PREROUTING -i eth0 -p tcp -d 10.0.0.0/8 --dport 80,443 \
//!     -j TPROXY --on-port 50080 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1
//! ip rule add fwmark 0x1/0x1 lookup 100
//! ip route add local 0.0.0.0/0 dev lo table 100
//!
//! proxy run --iface eth0 --dst 10.0.0.0/8 --dport 80,443 \
//!     --on-port 50080 --on-ip 127.0.0.1 --tproxy-mark 0x1/0x1 --table 100
//! ```

use std::{net::IpAddr, time::Duration};

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;

use crate::{
    access_log::AccessLog,
    ebpf::TcAttach,
    relay::RelayMode,
    rules::{self, Mark, PortSet, Protocols, Rule},
    rules_file::{self, RulesFileError},
    upstream::socks5::Socks5Server,
};

#[derive(Debug, Parser)]
#[command(
    name = "proxy",
    version,
    about = "eBPF transparent proxy: the iptables TPROXY recipe, done at TC ingress with bpf_sk_assign"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Attach the classifier, install the policy route and proxy intercepted connections.
    /// SIGINT stops for good (everything is undone); SIGTERM stops to be replaced (the
    /// classifier and the routes stay for the next agent). Started while an agent runs on
    /// the same table, it takes over from it: listeners and live connections included.
    Run(Box<RunArgs>),
    /// Upgrade the running agent in place: start this binary with the running agent's
    /// arguments; it takes the listeners and the live connections over, and the old agent
    /// exits. No connection is lost, none goes past the proxy. `systemctl reload` runs it.
    Upgrade(UpgradeArgs),
    /// Print the counters of the agent running in this network namespace, globally and per
    /// rule, like `iptables -vL`.
    Stats(StatsArgs),
    /// Remove what an agent that died uncleanly left in this network namespace (its pinned
    /// links, its cls_bpf filters and the clsact qdiscs it added, its fwmark rules and
    /// routes), for when it will not be restarted. A restarted agent takes it over instead.
    Cleanup(CleanupArgs),
    /// Inspect this network namespace for what would stop interception under these flags
    /// (the same as `run`): one line per check, OK, warning or problem with its fix. Exits
    /// non-zero when a problem blocks. Changes nothing.
    Doctor(Box<RunArgs>),
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Interface whose ingress traffic is classified (`iptables -i`). Repeat for several.
    /// Required unless --local.
    #[arg(long = "iface", value_name = "IF", required_unless_present = "local")]
    pub ifaces: Vec<String>,

    /// Intercept the connections (TCP, and connected UDP) that processes of this network
    /// namespace make, too, under the same rules: the `-t mangle -A OUTPUT ... -j MARK`
    /// recipe. The agent's own sockets, loopback destinations and traffic no rule covers are
    /// untouched. An unconnected UDP datagram to a destination a rule covers cannot be
    /// routed to the proxy: it is refused (EPERM), or sent on with fail-open.
    #[arg(long)]
    pub local: bool,

    /// With --local: only processes in this cgroup (v2; absolute under the cgroup2 mount or
    /// relative to it, like `-m cgroup --path`) and its descendants. Repeat for several.
    /// Without it every process of the namespace but the agent's own cgroup.
    #[arg(long = "cgroup", value_name = "PATH", requires = "local")]
    pub cgroups: Vec<String>,

    /// Destination prefix to intercept (`-d`), IPv4 or IPv6; repeat for several. Without
    /// it every destination of both families matches.
    #[arg(long = "dst", value_name = "CIDR", value_parser = rules::parse_prefix)]
    pub dst: Vec<IpNet>,

    /// Destination ports to intercept (`--dport`): a comma list of ports and ranges, such
    /// as 80,443,8000-8100.
    #[arg(long, value_name = "PORTS", required_unless_present = "config")]
    pub dport: Option<PortSet>,

    /// Transport protocols the rule applies to (`-p`).
    #[arg(long, value_name = "tcp|udp|tcp,udp", default_value = "tcp")]
    pub protocol: Protocols,

    /// Port of the transparent listener (`--on-port`). 0 means the packet's own destination
    /// port, as in iptables; only with `--listener external`.
    #[arg(long, value_name = "PORT", required_unless_present = "config")]
    pub on_port: Option<u16>,

    /// Rules from a TOML file instead of the rule flags above, many rules with their own
    /// protocols, prefixes, ports, on-ip, on-port and mark (see the README). SIGHUP
    /// reloads it; a bad file is refused and the rules in force stay.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["dst", "dport", "protocol", "on_port", "on_ip", "tproxy_mark", "fail_open"])]
    pub config: Option<std::path::PathBuf>,

    /// Who holds the transparent listener at on-ip:on-port: the agent's own proxy
    /// (`builtin`), or another program (`external`: Envoy, HAProxy, Squid, ...), in which case
    /// the agent only classifies and routes, a drop-in replacement for the iptables rules.
    #[arg(long, value_enum, default_value_t = ListenerMode::Builtin)]
    pub listener: ListenerMode,

    /// Address of the transparent listener (`--on-ip`). Without it the listener is looked
    /// up at the ingress interface's first primary address, as the kernel does, and the
    /// agent's listener binds the wildcard address.
    #[arg(long, value_name = "ADDR")]
    pub on_ip: Option<IpAddr>,

    /// Mark set on every packet handed to a socket (`--tproxy-mark`): the packet's mark
    /// becomes (mark & ~MASK) ^ VALUE. The fwmark rule matches VALUE/MASK.
    #[arg(long, value_name = "VALUE[/MASK]", default_value = "0x1/0x1")]
    pub tproxy_mark: Mark,

    /// Routing table for the local route (`ip route add local 0/0 dev lo table N`).
    #[arg(long, value_name = "N", default_value_t = proxy_common::DEFAULT_TABLE, value_parser = clap::value_parser!(u32).range(1..=0xffff_fffe))]
    pub table: u32,

    /// When no usable socket is found, pass the packet on untouched instead of dropping it
    /// as the kernel does.
    #[arg(long)]
    pub fail_open: bool,

    /// How long to wait for the original destination (or the SOCKS5 server) to accept a
    /// connection.
    #[arg(long, value_name = "SECONDS", default_value = "10", value_parser = parse_seconds)]
    pub connect_timeout: Duration,

    /// Connect upstream from the client's own address (a transparent socket bound to it),
    /// so the server sees the client. The replies come back to the router: list the
    /// upstream interface in --iface too, so the classifier's return path hands them to
    /// the proxy.
    #[arg(long, conflicts_with = "upstream")]
    pub spoof_source: bool,

    /// Reach the original destination through a SOCKS5 proxy instead of directly:
    /// `socks5://[user:pass@]host:port` (RFC 1928 CONNECT for TCP, UDP ASSOCIATE for UDP;
    /// RFC 1929 authentication).
    #[arg(long, value_name = "URL")]
    pub upstream: Option<Socks5Server>,

    /// How the proxy moves bytes: splice (zero-copy through a pipe, falling back to a
    /// buffer where the kernel refuses), copy (a userspace buffer), or sockmap (inside the
    /// kernel: an sk_skb program redirects each socket's bytes to its peer, and the agent
    /// is not woken per message).
    #[arg(long, value_enum, default_value_t = RelayMode::Splice)]
    pub relay: RelayMode,

    /// Threads that accept and relay TCP connections, each with its own event loop and its
    /// own listener socket in a SO_REUSEPORT group, so a connection's wake-ups stay on one
    /// thread. 0: one per CPU (one on kernels before 6.5, where bpf_sk_assign refuses
    /// SO_REUSEPORT listeners).
    #[arg(long, value_name = "N", default_value_t = 0, value_parser = clap::value_parser!(u16).range(0..=1024))]
    pub workers: u16,

    /// Connections proxied at once; more are reset as they arrive.
    #[arg(long, value_name = "N", default_value_t = 65_536, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: u32,

    /// A TCP connection that carries no byte either way for this long is reset on both
    /// sides and its slot freed (like HAProxy's client/server timeouts, or a cloud NAT
    /// gateway's idle timeout); 0: never. Keepalive probes carry no byte: a connection kept
    /// open silently needs application keepalives or a longer timeout. Both relays honour
    /// it (sockmap through the kernel's byte counters). Dead peers are found sooner by TCP
    /// keepalive on both legs (first probe after 60 s, dead after 6 more 10 s apart).
    #[arg(long, value_name = "SECONDS", default_value = "300", value_parser = parse_idle)]
    pub tcp_idle_timeout: Duration,

    /// On SIGTERM/SIGINT, stop accepting and let live connections finish for at most this
    /// long before exiting; a second signal exits at once.
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = parse_drain)]
    pub drain_timeout: Duration,

    /// How the classifier is attached: auto (TCX links on 6.6+ kernels, else clsact +
    /// cls_bpf), tcx, or netlink (clsact + cls_bpf, the qdisc removed on exit if the agent
    /// added it).
    #[arg(long, value_enum, default_value_t = TcAttach::Auto)]
    pub tc_attach: TcAttach,

    /// A UDP session (client, original destination) ends after this long without a
    /// datagram either way.
    #[arg(long, value_name = "SECONDS", default_value = "60", value_parser = parse_seconds)]
    pub udp_idle_timeout: Duration,

    /// UDP sessions at once; datagrams that would open more are dropped.
    #[arg(long, value_name = "N", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..))]
    pub udp_max_sessions: u32,

    /// SO_MARK of the proxy's own outbound sockets. The classifier never touches packets
    /// that carry it, and it must not match any --tproxy-mark, or the proxy's traffic
    /// would be routed back to itself.
    #[arg(long, value_name = "MARK", default_value = "0x40000000", value_parser = parse_u32)]
    pub outbound_mark: u32,

    /// Start even when this kernel's BTF does not say where sockets keep their transparent
    /// flag. Without the check (T5), a plain socket on a rule's on-ip/on-port would receive
    /// intercepted traffic; by default the agent refuses to start instead.
    #[arg(long)]
    pub allow_unchecked_transparency: bool,

    /// Relay to original destinations that are this host's own addresses, loopback,
    /// unspecified, multicast or broadcast. By default such connections are reset and such
    /// datagrams dropped: a client on the LAN must not reach the router's own services
    /// through the proxy.
    #[arg(long)]
    pub allow_local_destinations: bool,

    /// Besides root, the members of this group (a name or a number) may read the counters
    /// with `proxy stats`.
    #[arg(long, value_name = "GROUP", value_parser = parse_group)]
    pub stats_group: Option<u32>,

    /// Serve the counters in the Prometheus exposition format at
    /// http://ADDR:PORT/metrics (classifier, per rule, connections, UDP sessions).
    #[arg(long, value_name = "ADDR:PORT")]
    pub metrics: Option<std::net::SocketAddr>,

    /// How each ended connection and UDP session is logged: `text`, a line in the log
    /// (stderr), or `json`, one JSON object per line on stdout.
    #[arg(long, value_enum, value_name = "FORMAT", default_value_t = AccessLog::Text)]
    pub access_log: AccessLog,
}

impl RunArgs {
    /// The rules in force: from `--config`, or the single rule the flags describe.
    /// Listener slots are assigned later, by the agent.
    pub fn rules(&self) -> Result<Vec<Rule>, RulesFileError> {
        if let Some(path) = &self.config {
            return rules_file::load(path, self.local);
        }
        Ok(vec![Rule {
            protocols: self.protocol,
            dst: self.dst.clone(),
            // clap requires both when --config is absent.
            dport: self.dport.clone().unwrap_or(PortSet(Vec::new())),
            on_ip: self.on_ip,
            on_port: self.on_port.unwrap_or(0),
            mark: self.tproxy_mark,
            fail_open: self.fail_open,
            listener_slot: None,
            // The flags' rule applies to every process --cgroup attaches the programs to.
            local: self.local.then(Vec::new),
        }])
    }
}

#[derive(Debug, Clone, Args)]
pub struct StatsArgs {
    /// The routing table of the agent to ask (agents in one namespace differ by table).
    #[arg(long, value_name = "N", default_value_t = proxy_common::DEFAULT_TABLE)]
    pub table: u32,
}

#[derive(Debug, Clone, Args)]
pub struct UpgradeArgs {
    /// The routing table of the agent to upgrade.
    #[arg(long, value_name = "N", default_value_t = proxy_common::DEFAULT_TABLE)]
    pub table: u32,
    /// How long to wait for the old agent to exit (it exits once its connections have
    /// moved; connections in the in-kernel relay stay with it until they end).
    #[arg(long, value_name = "SECONDS", default_value = "60", value_parser = parse_seconds)]
    pub timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct CleanupArgs {
    /// Only what the agent with this routing table left; without it, every table's (an
    /// agent still running is left alone either way).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=0xffff_fffe))]
    pub table: Option<u32>,
}

/// `--listener`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ListenerMode {
    Builtin,
    External,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    crate::rules::parse_u32(s)
        .ok_or_else(|| format!("'{s}' is not a 32-bit number (decimal or 0x-hex)"))
}

fn parse_drain(s: &str) -> Result<Duration, String> {
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    parse_seconds(s)
}

/// A group name or number, as its gid.
fn parse_group(s: &str) -> Result<u32, String> {
    if let Ok(gid) = s.parse::<u32>() {
        return Ok(gid);
    }
    match nix::unistd::Group::from_name(s) {
        Ok(Some(group)) => Ok(group.gid.as_raw()),
        Ok(None) => Err(format!("no group named '{s}'")),
        Err(e) => Err(format!("looking up group '{s}': {e}")),
    }
}

/// 0 (off), or up to a day.
/// A number of seconds, not yet range-checked.
fn seconds(s: &str) -> Result<f64, String> {
    s.parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))
}

fn parse_idle(s: &str) -> Result<Duration, String> {
    let secs = seconds(s)?;
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("'{s}' is out of range (0 to 86400 seconds)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs = seconds(s)?;
    if !(secs > 0.0 && secs <= 3600.0) {
        return Err(format!("'{s}' is out of range (0 < seconds <= 3600)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("proxy").chain(args.iter().copied()))
    }

    #[test]
    fn run_defaults_follow_the_recipe() {
        let cli = parse(&[
            "run",
            "--iface",
            "eth0",
            "--dport",
            "80",
            "--on-port",
            "50080",
        ])
        .expect("valid");
        let Command::Run(args) = cli.command else {
            panic!("not run");
        };
        assert_eq!(args.tproxy_mark, Mark { value: 1, mask: 1 });
        assert_eq!(args.listener, ListenerMode::Builtin);
        assert_eq!(args.table, 100);
        assert!(!args.fail_open);
        assert!(args.dst.is_empty());
        assert_eq!(args.protocol, Protocols::TCP);
        assert_eq!(args.tcp_idle_timeout, Duration::from_secs(300));
    }

    #[test]
    fn tcp_idle_timeout_zero_turns_it_off() {
        let base = ["run", "--iface", "eth0", "--dport", "80", "--on-port", "1"];
        let idle = |value: &str| {
            let cli = parse(&[&base[..], &["--tcp-idle-timeout", value]].concat())?;
            let Command::Run(args) = cli.command else {
                panic!("not run");
            };
            Ok::<_, clap::Error>(args.tcp_idle_timeout)
        };
        assert_eq!(idle("0").expect("0"), Duration::ZERO);
        assert_eq!(idle("2.5").expect("2.5"), Duration::from_millis(2500));
        assert!(idle("-1").is_err());
        assert!(idle("x").is_err());
    }

    #[test]
    fn local_needs_no_iface_and_cgroup_needs_local() {
        let cli = parse(&["run", "--local", "--dport", "80", "--on-port", "1"]).expect("valid");
        let Command::Run(args) = cli.command else {
            panic!("not run");
        };
        assert!(args.local && args.ifaces.is_empty());
        assert!(
            parse(&[
                "run",
                "--iface",
                "lo",
                "--cgroup",
                "a",
                "--dport",
                "80",
                "--on-port",
                "1"
            ])
            .is_err()
        );
    }

    #[test]
    fn bad_flags_are_refused() {
        for bad in [
            "run --dport 80 --on-port 50080",
            "run --iface eth0 --dport 80,x --on-port 50080",
            "run --iface eth0 --dport 80 --on-port 70000",
            "run --iface eth0 --dport 80 --on-port 1 --dst 10/x",
            "run --iface eth0 --dport 80 --on-port 1 --tproxy-mark 0",
            "run --iface eth0 --dport 80 --on-port 1 --table 0",
        ] {
            let args: Vec<&str> = bad.split_whitespace().collect();
            assert!(parse(&args).is_err(), "`{bad}` was accepted");
        }
    }
}
