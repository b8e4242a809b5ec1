//! The harness of the differential conformance suite (`tests/conformance.rs`): one case, run
//! once against the kernel's own TPROXY (iptables / ip6tables in the router namespace) and
//! once against the agent (`proxy run --listener external`), each in a fresh [`Gateway`].
//!
//! In both runs the test itself owns every receiving socket: the sockets a case asks for in
//! the router namespace (transparent or not), and a server in the server namespace on the
//! client's destination, so that a forwarded packet is seen there. The client sends one TCP
//! connection with a few bytes (or one UDP datagram) and the run records who received it,
//! with the local address (TCP) or the original destination (UDP, `IP_ORIGDSTADDR`) that
//! socket saw. Every wait is bounded.

use std::{
    fmt,
    io::{self, Read as _, Write as _},
    mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream},
    os::fd::AsRawFd as _,
    process::Command,
    time::{Duration, Instant},
};

use proxy_testbed::{self as testbed, ClientLink, Gateway};
use socket2::{Domain, Protocol, Socket, Type};

use crate::common::{Agent, Mounts};

/// The intercepted destination port of most cases.
pub const DPORT: u16 = 80;
/// A port no rule matches.
pub const OTHER_PORT: u16 = 8080;
/// The transparent listener's port (`--on-port`).
pub const ON_PORT: u16 = 50080;
/// The client's source port, fixed so that both runs see the same peer address (and so that
/// the TIME_WAIT case can reconnect from it).
pub const CLIENT_PORT: u16 = 40123;
/// The TPROXY mark and routing table of both runs.
const MARK: &str = "0x1/0x1";
const TABLE: &str = "100";

/// How long a TCP client waits for its connection; a drop shows up as a timeout.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// The TIME_WAIT case allows the 1 s SYN retransmission (timing is not compared).
const TCP_RECONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a UDP run waits for the datagram anywhere.
const UDP_WINDOW: Duration = Duration::from_millis(400);
/// Once something received the datagram, how long to keep looking for a second copy.
const UDP_SETTLE: Duration = Duration::from_millis(50);
/// After a TCP connect succeeded, how long to wait for a socket to accept it.
const TCP_ACCEPT_WINDOW: Duration = Duration::from_secs(2);
/// After a TCP connect failed, how long to look for a connection in an accept queue anyway.
const TCP_FAILED_WINDOW: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn name(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fam {
    V4,
    V6,
}

/// An address of the testbed, resolved per family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum At {
    /// 0.0.0.0 / ::
    Any,
    /// The router's client-side address (r0), the first primary one.
    R0,
    /// A second address the case adds to r0 (IPv4: a secondary one).
    R0Extra,
    /// 127.0.0.1 / ::1
    Loopback,
    /// The server: the client's destination, non-local on the router.
    Server,
}

impl At {
    pub fn ip(self, fam: Fam) -> IpAddr {
        match (self, fam) {
            (At::Any, Fam::V4) => Ipv4Addr::UNSPECIFIED.into(),
            (At::Any, Fam::V6) => Ipv6Addr::UNSPECIFIED.into(),
            (At::R0, Fam::V4) => testbed::ROUTER_CLIENT_SIDE_V4.into(),
            (At::R0, Fam::V6) => testbed::ROUTER_CLIENT_SIDE_V6.into(),
            // Inside the router's client-side prefixes, on the router's own veth.
            (At::R0Extra, Fam::V4) => Ipv4Addr::new(192, 0, 2, 100).into(),
            (At::R0Extra, Fam::V6) => Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x100).into(),
            (At::Loopback, Fam::V4) => Ipv4Addr::LOCALHOST.into(),
            (At::Loopback, Fam::V6) => Ipv6Addr::LOCALHOST.into(),
            (At::Server, _) => testbed::server_addr(fam == Fam::V6),
        }
    }
}

/// A destination prefix of the testbed, for `--dst` / `-d`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Net {
    /// The server's /24 (/64): covers the client's destination.
    ServerSubnet,
    /// The server alone, /32 (/128).
    ServerHost,
    /// The client's /24 (/64): does not cover the client's destination.
    ClientSubnet,
}

impl Net {
    pub fn cidr(self, fam: Fam) -> &'static str {
        match (self, fam) {
            (Net::ServerSubnet, Fam::V4) => "198.51.100.0/24",
            (Net::ServerSubnet, Fam::V6) => "2001:db8:2::/64",
            (Net::ServerHost, Fam::V4) => "198.51.100.2/32",
            (Net::ServerHost, Fam::V6) => "2001:db8:2::2/128",
            (Net::ClientSubnet, Fam::V4) => "192.0.2.0/24",
            (Net::ClientSubnet, Fam::V6) => "2001:db8:1::/64",
        }
    }
}

/// A receiving socket the case opens in the router namespace.
#[derive(Clone, Debug)]
pub struct Recv {
    pub label: &'static str,
    pub at: At,
    pub port: u16,
    /// IP_TRANSPARENT / IPV6_TRANSPARENT before bind.
    pub transparent: bool,
    /// UDP only: connect it to the client's address and port (an established UDP socket).
    pub connected_to_client: bool,
}

impl Recv {
    pub fn transparent(label: &'static str, at: At, port: u16) -> Recv {
        Recv {
            label,
            at,
            port,
            transparent: true,
            connected_to_client: false,
        }
    }

    pub fn plain(label: &'static str, at: At, port: u16) -> Recv {
        Recv {
            transparent: false,
            ..Recv::transparent(label, at, port)
        }
    }

    pub fn connected(label: &'static str, at: At, port: u16) -> Recv {
        Recv {
            connected_to_client: true,
            ..Recv::transparent(label, at, port)
        }
    }
}

/// The interception rule, as iptables arguments and as agent flags.
#[derive(Clone, Debug)]
pub struct Rule {
    /// Agent syntax: `80`, `80-81`, `80,8443`.
    pub dports: &'static str,
    pub on_port: u16,
    pub on_ip: Option<At>,
    pub dst: Option<Net>,
}

/// What the client does to its socket before sending.
#[derive(Clone, Debug, Default)]
pub struct ClientOpts {
    /// IP_OPTIONS (IPv4), so that the header is longer than 20 bytes.
    pub ip_options: Option<&'static [u8]>,
    /// IPV6_DSTOPTS: a sticky destination options header.
    pub ipv6_dstopts: Option<&'static [u8]>,
    /// IPV6_HOPOPTS: a sticky hop-by-hop options header.
    pub ipv6_hopopts: Option<&'static [u8]>,
    /// IP_MTU_DISCOVER = IP_PMTUDISC_DONT (IPv4): let the client fragment a large datagram.
    pub pmtudisc_dont: bool,
}

/// What the client does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// One TCP connection carrying the payload in two writes (the second one after the
    /// connection is up, so it takes the established path), or one UDP datagram.
    Once,
    /// TCP: a first connection that the receiver closes first (its side ends in TIME_WAIT),
    /// then a second connection from the same client port.
    TcpReconnect,
}

/// A second address on r0, added before or while the interceptor runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtraAddr {
    None,
    BeforeStart,
    WhileRunning,
}

/// The outcome a case expects from the kernel: checked so that two runs that both saw
/// nothing (a broken harness) cannot pass as "equal".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The socket with this label got it, with the original destination as its local
    /// address, the client as its peer, and every byte.
    Delivered(&'static str),
    /// The server got it from the client, untouched.
    Forwarded,
    /// Nobody got it (and a TCP client timed out).
    Dropped,
}

/// An intended difference between the agent and the kernel, documented in the README.
#[derive(Clone, Debug)]
pub struct Difference {
    /// What the agent does instead of the kernel's outcome, for every step.
    pub agent: Kind,
    pub why: &'static str,
}

#[derive(Clone, Debug)]
pub struct Case {
    pub name: String,
    pub proto: Proto,
    pub fam: Fam,
    pub rule: Rule,
    pub receivers: Vec<Recv>,
    /// The destination port the client sends to (on the server's address).
    pub send_port: u16,
    pub client: ClientOpts,
    pub payload: usize,
    pub flow: Flow,
    pub extra_addr: ExtraAddr,
    /// The kernel's outcome, per step.
    pub kernel: Vec<Kind>,
    pub difference: Option<Difference>,
    /// How the client reaches the router: veth (Ethernet) or a tun pair (no link-layer
    /// header, T10).
    pub link: ClientLink,
    /// The agent run only: the agent is killed (SIGKILL) once ready, before the client
    /// sends, as the kernel run's rules outlive any proxy (T12).
    pub agent_killed: bool,
}

impl Case {
    /// The default case: rule `--dport 80 --on-port 50080`, a transparent wildcard
    /// listener "listener" on 50080, the client sends to the server's port 80; delivered.
    pub fn new(name: impl Into<String>, proto: Proto, fam: Fam) -> Case {
        Case {
            name: name.into(),
            proto,
            fam,
            rule: Rule {
                dports: "80",
                on_port: ON_PORT,
                on_ip: None,
                dst: None,
            },
            receivers: vec![Recv::transparent("listener", At::Any, ON_PORT)],
            send_port: DPORT,
            client: ClientOpts::default(),
            payload: match proto {
                Proto::Tcp => 5,
                Proto::Udp => 32,
            },
            flow: Flow::Once,
            extra_addr: ExtraAddr::None,
            kernel: vec![Kind::Delivered("listener")],
            difference: None,
            link: ClientLink::Veth,
            agent_killed: false,
        }
    }

    pub fn over_tun(mut self) -> Case {
        self.link = ClientLink::Tun;
        self
    }

    pub fn agent_killed(mut self) -> Case {
        self.agent_killed = true;
        self
    }

    pub fn receivers(mut self, receivers: Vec<Recv>) -> Case {
        self.receivers = receivers;
        self
    }

    pub fn expect(mut self, kind: Kind) -> Case {
        self.kernel = vec![kind];
        self
    }

    pub fn on_ip(mut self, at: At) -> Case {
        self.rule.on_ip = Some(at);
        self
    }

    pub fn on_port(mut self, port: u16) -> Case {
        self.rule.on_port = port;
        self
    }

    pub fn dports(mut self, dports: &'static str) -> Case {
        self.rule.dports = dports;
        self
    }

    pub fn dst(mut self, net: Net) -> Case {
        self.rule.dst = Some(net);
        self
    }

    pub fn send_port(mut self, port: u16) -> Case {
        self.send_port = port;
        self
    }

    pub fn client(mut self, client: ClientOpts) -> Case {
        self.client = client;
        self
    }

    pub fn payload(mut self, bytes: usize) -> Case {
        self.payload = bytes;
        self
    }

    pub fn extra_addr(mut self, when: ExtraAddr) -> Case {
        self.extra_addr = when;
        self
    }

    pub fn reconnect(mut self) -> Case {
        self.flow = Flow::TcpReconnect;
        self.kernel = vec![Kind::Delivered("listener"), Kind::Delivered("listener")];
        self
    }

    pub fn differs(mut self, agent: Kind, why: &'static str) -> Case {
        self.difference = Some(Difference { agent, why });
        self
    }

    fn dst_addr(&self) -> SocketAddr {
        SocketAddr::new(At::Server.ip(self.fam), self.send_port)
    }

    fn client_addr(&self) -> SocketAddr {
        let ip: IpAddr = match self.fam {
            Fam::V4 => testbed::CLIENT_V4.into(),
            Fam::V6 => testbed::CLIENT_V6.into(),
        };
        SocketAddr::new(ip, CLIENT_PORT)
    }
}

/// Who runs the interception.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Kernel,
    Agent,
}

/// One socket receiving one connection or datagram.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Reception {
    /// The receiver's label, or "server".
    pub who: String,
    /// TCP: the accepted socket's local address; UDP: the original destination.
    pub local: SocketAddr,
    pub peer: SocketAddr,
    pub bytes: usize,
}

/// What one client action led to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// "connected", "timed out", "refused", ... (TCP) or "sent" (UDP).
    pub client: String,
    pub got: Vec<Reception>,
    /// TcpReconnect, first step: whether the receiver's side was in TIME_WAIT afterwards.
    pub time_wait: Option<bool>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub steps: Vec<Step>,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client {}; ", self.client)?;
        if self.got.is_empty() {
            write!(f, "nobody got it")?;
        }
        for (i, r) in self.got.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            write!(
                f,
                "{} got {}B local={} peer={}",
                r.who, r.bytes, r.local, r.peer
            )?;
        }
        if let Some(tw) = self.time_wait {
            write!(f, "; time-wait={tw}")?;
        }
        Ok(())
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.steps.iter().enumerate() {
            if i > 0 {
                write!(f, " | ")?;
            }
            write!(f, "{s}")?;
        }
        Ok(())
    }
}

/// The result of one run, with notes that are printed but not compared (timings, the
/// agent's counters).
pub struct Run {
    pub outcome: Outcome,
    pub notes: String,
}

/// Checks `step` against an expected kind; `Err` says how it differs.
pub fn check_kind(case: &Case, step: &Step, kind: Kind) -> Result<(), String> {
    let dst = case.dst_addr();
    let client = case.client_addr();
    let single = |who: &str| -> Result<(), String> {
        match step.got.as_slice() {
            [r] if r.who == who
                && r.local == dst
                && r.peer == client
                && r.bytes == case.payload =>
            {
                Ok(())
            }
            _ => Err(format!(
                "expected only {who} to get {}B with local={dst} peer={client}; got: {step}",
                case.payload
            )),
        }
    };
    match kind {
        Kind::Delivered(label) => single(label),
        Kind::Forwarded => single("server"),
        Kind::Dropped => {
            if !step.got.is_empty() {
                return Err(format!("expected nobody to get it; got: {step}"));
            }
            if case.proto == Proto::Tcp && step.client != "timed out" {
                return Err(format!("expected the TCP client to time out; got: {step}"));
            }
            Ok(())
        }
    }
}

/// Runs `case` once under `mode` in a fresh gateway, removed when this returns or panics.
pub fn run(case: &Case, mode: Mode) -> Run {
    let tag = match mode {
        Mode::Kernel => "cfk",
        Mode::Agent => "cfa",
    };
    let gw = Gateway::with_client_link(tag, case.link).expect("building the testbed");
    if case.fam == Fam::V6 {
        wait_for_ipv6_dad(&gw, &case.name);
    }
    if case.extra_addr == ExtraAddr::BeforeStart {
        add_extra_addr(&gw, case.fam);
    }
    // Kept until the exchange is over: the pins of a killed agent live in its bpffs mount.
    let mut mounts = None;
    let agent = match mode {
        Mode::Kernel => {
            install_kernel_tproxy(&gw, case);
            None
        }
        Mode::Agent if case.agent_killed => {
            let args = agent_args(case);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let held = mounts.insert(Mounts::new(&gw.router));
            let agent = Agent::start_in(held, &args);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(agent.pid() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let (status, _) = agent.wait_exit(Duration::from_secs(5));
            assert!(
                !status.success(),
                "{}: the agent survived SIGKILL",
                case.name
            );
            None
        }
        Mode::Agent => {
            let args = agent_args(case);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Some(Agent::start(&gw.router, &args))
        }
    };
    if case.extra_addr == ExtraAddr::WhileRunning {
        add_extra_addr(&gw, case.fam);
        // Time for the agent to see the netlink event; the kernel run waits as long.
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut notes = String::new();
    let outcome = exchange(&gw, case, &mut notes);
    if let Some(agent) = agent {
        let (status, log) = agent.stop();
        assert!(
            status.success(),
            "{}: the agent exited with {status}:\n{log}",
            case.name
        );
        if let Some(line) = log.lines().find(|l| l.contains(" counters: ")) {
            let counters = line.split(" counters: ").nth(1).unwrap_or(line);
            // Only the counters that moved, to keep the summary short.
            let moved: Vec<&str> = counters
                .split_whitespace()
                .filter(|kv| !kv.ends_with("=0"))
                .collect();
            notes.push_str(&format!(" counters: {}", moved.join(" ")));
        }
    }
    drop(mounts);
    Run { outcome, notes }
}

/// Waits (bounded) until no address in the three namespaces is tentative.
///
/// The testbed adds its global addresses with `nodad`, but the link-local ones go through
/// duplicate address detection (about 2 s). Until the router's link-local address on a
/// veth is usable, it cannot send a neighbour solicitation for a packet whose source is not
/// one of its own addresses: forwarded packets and the replies of transparent sockets
/// (source = the original destination) wait in the neighbour queue. Without this wait every
/// IPv6 case would see its first 2 s of traffic held back, in both runs alike.
fn wait_for_ipv6_dad(gw: &Gateway, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let tentative: Vec<String> = [&gw.client, &gw.router, &gw.server]
            .iter()
            .filter_map(|ns| {
                let out = ns
                    .ip(&["-6", "addr", "show", "tentative"])
                    .expect("ip -6 addr show tentative");
                let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                (!text.is_empty()).then(|| format!("{}: {text}", ns.name))
            })
            .collect();
        if tentative.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: IPv6 addresses still tentative after 5 s:\n{}",
            tentative.join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn add_extra_addr(gw: &Gateway, fam: Fam) {
    let result = match fam {
        Fam::V4 => gw.router.ip(&[
            "addr",
            "add",
            &format!("{}/24", At::R0Extra.ip(fam)),
            "dev",
            testbed::ROUTER_CLIENT_IFACE,
        ]),
        Fam::V6 => gw.router.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", At::R0Extra.ip(fam)),
            "dev",
            testbed::ROUTER_CLIENT_IFACE,
            "nodad",
        ]),
    };
    result.expect("adding the extra address to r0");
}

/// Agent syntax to iptables syntax: `80-81` -> `--dport 80:81`, lists through multiport.
fn iptables_ports(dports: &str) -> Vec<String> {
    let ports = dports.replace('-', ":");
    if ports.contains(',') {
        vec!["-m".into(), "multiport".into(), "--dports".into(), ports]
    } else {
        vec!["--dport".into(), ports]
    }
}

/// The classic recipe in the router namespace, for the case's family only.
fn install_kernel_tproxy(gw: &Gateway, case: &Case) {
    let (iptables, family_flag, everything) = match case.fam {
        Fam::V4 => ("iptables", "-4", "0.0.0.0/0"),
        Fam::V6 => ("ip6tables", "-6", "::/0"),
    };
    let proto = case.proto.name();
    let head = [
        "-w",
        "-t",
        "mangle",
        "-A",
        "PREROUTING",
        "-i",
        testbed::ROUTER_CLIENT_IFACE,
        "-p",
        proto,
    ];
    let socket_match = ["-m", "socket", "--transparent"];
    let mut rules: Vec<Vec<String>> = vec![
        head.iter()
            .chain(&socket_match)
            .chain(&["-j", "MARK", "--set-mark", MARK])
            .map(|s| (*s).to_owned())
            .collect(),
        head.iter()
            .chain(&socket_match)
            .chain(&["-j", "ACCEPT"])
            .map(|s| (*s).to_owned())
            .collect(),
    ];
    let mut tproxy: Vec<String> = head.iter().map(|s| (*s).to_owned()).collect();
    if let Some(net) = case.rule.dst {
        tproxy.extend(["-d".to_owned(), net.cidr(case.fam).to_owned()]);
    }
    tproxy.extend(iptables_ports(case.rule.dports));
    tproxy.extend([
        "-j".to_owned(),
        "TPROXY".to_owned(),
        "--on-port".to_owned(),
        case.rule.on_port.to_string(),
        "--tproxy-mark".to_owned(),
        MARK.to_owned(),
    ]);
    if let Some(at) = case.rule.on_ip {
        tproxy.extend(["--on-ip".to_owned(), at.ip(case.fam).to_string()]);
    }
    rules.push(tproxy);
    for args in &rules {
        run_command(gw.router.command(iptables).args(args));
    }
    gw.router
        .ip(&[family_flag, "rule", "add", "fwmark", MARK, "lookup", TABLE])
        .expect("ip rule add fwmark");
    gw.router
        .ip(&[
            family_flag,
            "route",
            "add",
            "local",
            everything,
            "dev",
            "lo",
            "table",
            TABLE,
        ])
        .expect("ip route add local");
}

fn run_command(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `proxy run` flags mirroring the iptables rule.
pub fn agent_args(case: &Case) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--iface",
        testbed::ROUTER_CLIENT_IFACE,
        "--listener",
        "external",
        "--protocol",
        case.proto.name(),
        "--dport",
        case.rule.dports,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(["--on-port".to_owned(), case.rule.on_port.to_string()]);
    if let Some(at) = case.rule.on_ip {
        args.extend(["--on-ip".to_owned(), at.ip(case.fam).to_string()]);
    }
    if let Some(net) = case.rule.dst {
        args.extend(["--dst".to_owned(), net.cidr(case.fam).to_owned()]);
    }
    args
}

/// A receiving socket (router receivers and the server), created inside its namespace.
struct Receiver {
    who: String,
    socket: Socket,
}

fn domain(fam: Fam) -> Domain {
    match fam {
        Fam::V4 => Domain::IPV4,
        Fam::V6 => Domain::IPV6,
    }
}

fn setsockopt_int(socket: &Socket, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    setsockopt_bytes(socket, level, name, &value.to_ne_bytes())
        .unwrap_or_else(|e| panic!("setsockopt({level}, {name}, {value}): {e}"));
}

fn setsockopt_bytes(
    socket: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: &[u8],
) -> io::Result<()> {
    let len = libc::socklen_t::try_from(value.len()).expect("option length");
    // SAFETY: `value` is a valid buffer of `len` bytes for the duration of the call.
    let rc =
        unsafe { libc::setsockopt(socket.as_raw_fd(), level, name, value.as_ptr().cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Opens a receiving socket; must run on a thread inside the wanted namespace.
fn open_receiver(
    proto: Proto,
    fam: Fam,
    addr: SocketAddr,
    transparent: bool,
    connect_to: Option<SocketAddr>,
) -> io::Result<Socket> {
    let (ty, protocol) = match proto {
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
        Proto::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let socket = Socket::new(domain(fam), ty, Some(protocol))?;
    if transparent {
        match fam {
            Fam::V4 => socket.set_ip_transparent_v4(true)?,
            Fam::V6 => socket.set_ip_transparent_v6(true)?,
        }
    }
    if fam == Fam::V6 {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    if proto == Proto::Udp {
        match fam {
            Fam::V4 => setsockopt_int(&socket, libc::SOL_IP, libc::IP_RECVORIGDSTADDR, 1),
            Fam::V6 => setsockopt_int(&socket, libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR, 1),
        }
    }
    socket.bind(&addr.into())?;
    match proto {
        Proto::Tcp => socket.listen(16)?,
        Proto::Udp => {
            if let Some(peer) = connect_to {
                socket.connect(&peer.into())?;
            }
        }
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

fn open_router_receivers(gw: &Gateway, case: &Case) -> Vec<Receiver> {
    let client = case.client_addr();
    gw.router
        .run(|| {
            case.receivers
                .iter()
                .map(|r| {
                    let addr = SocketAddr::new(r.at.ip(case.fam), r.port);
                    let connect_to = r.connected_to_client.then_some(client);
                    let socket =
                        open_receiver(case.proto, case.fam, addr, r.transparent, connect_to)
                            .unwrap_or_else(|e| {
                                panic!("{}: opening receiver {} on {addr}: {e}", case.name, r.label)
                            });
                    Receiver {
                        who: r.label.to_owned(),
                        socket,
                    }
                })
                .collect()
        })
        .expect("entering the router namespace")
}

fn open_server(gw: &Gateway, case: &Case) -> Receiver {
    let addr = case.dst_addr();
    let socket = gw
        .server
        .run(|| open_receiver(case.proto, case.fam, addr, false, None))
        .expect("entering the server namespace")
        .unwrap_or_else(|e| panic!("{}: opening the server on {addr}: {e}", case.name));
    Receiver {
        who: "server".to_owned(),
        socket,
    }
}

/// The client's socket with the case's options, bound to the fixed client address.
fn client_socket(case: &Case) -> io::Result<Socket> {
    let (ty, protocol) = match case.proto {
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
        Proto::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let socket = Socket::new(domain(case.fam), ty, Some(protocol))?;
    if case.fam == Fam::V6 {
        socket.set_only_v6(true)?;
    }
    // The TIME_WAIT case binds the same port twice.
    socket.set_reuse_address(true)?;
    let opts = &case.client;
    if let Some(options) = opts.ip_options {
        setsockopt_bytes(&socket, libc::IPPROTO_IP, libc::IP_OPTIONS, options)?;
    }
    if let Some(dstopts) = opts.ipv6_dstopts {
        setsockopt_bytes(&socket, libc::IPPROTO_IPV6, libc::IPV6_DSTOPTS, dstopts)?;
    }
    if let Some(hopopts) = opts.ipv6_hopopts {
        setsockopt_bytes(&socket, libc::IPPROTO_IPV6, libc::IPV6_HOPOPTS, hopopts)?;
    }
    if opts.pmtudisc_dont {
        setsockopt_int(
            &socket,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DONT,
        );
    }
    socket.bind(&case.client_addr().into())?;
    Ok(socket)
}

fn describe_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timed out".to_owned(),
        io::ErrorKind::ConnectionRefused => "refused".to_owned(),
        io::ErrorKind::ConnectionReset => "reset".to_owned(),
        _ => format!("error: {e}"),
    }
}

/// Client side of one step, on a thread in the client namespace: connects and writes the
/// first part of the payload (TCP), or sends the datagram (UDP).
fn client_send(gw: &Gateway, case: &Case, timeout: Duration) -> (String, Option<TcpStream>) {
    let payload = vec![b'x'; case.payload];
    let dst = case.dst_addr();
    gw.client
        .run(|| {
            let socket = match client_socket(case) {
                Ok(s) => s,
                Err(e) => panic!("{}: client socket: {e}", case.name),
            };
            match case.proto {
                Proto::Tcp => match socket.connect_timeout(&dst.into(), timeout) {
                    Ok(()) => {
                        let mut stream: TcpStream = socket.into();
                        let first = payload.len().min(3);
                        let written = stream.write_all(&payload[..first]);
                        (
                            match written {
                                Ok(()) => "connected".to_owned(),
                                Err(e) => describe_error(&e),
                            },
                            Some(stream),
                        )
                    }
                    Err(e) => (describe_error(&e), None),
                },
                Proto::Udp => match socket.send_to(&payload, &dst.into()) {
                    Ok(n) if n == payload.len() => ("sent".to_owned(), None),
                    Ok(n) => (format!("sent {n} of {}", payload.len()), None),
                    Err(e) => (describe_error(&e), None),
                },
            }
        })
        .expect("entering the client namespace")
}

/// Reads one UDP datagram with its original destination (`IP_ORIGDSTADDR` /
/// `IPV6_ORIGDSTADDR`), without blocking.
fn recv_udp(socket: &Socket) -> io::Result<Option<(usize, SocketAddr, Option<SocketAddr>)>> {
    let mut buf = vec![0u8; 65536];
    // SAFETY: all-zero sockaddr_storage and msghdr are valid values.
    let mut name: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut control = [0u64; 64];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: see above.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = (&raw mut name).cast();
    msg.msg_namelen = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = mem::size_of_val(&control) as _;
    // SAFETY: every pointer in `msg` refers to a live buffer of the stated length.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &raw mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(e);
    }
    if msg.msg_flags & libc::MSG_TRUNC != 0 {
        return Err(io::Error::other("datagram truncated"));
    }
    // SAFETY: the kernel filled `name` with a socket address of its family.
    let peer = unsafe { sockaddr_to_std((&raw const name).cast()) }
        .ok_or_else(|| io::Error::other("datagram without a source address"))?;
    let mut orig = None;
    // SAFETY: the CMSG_* macros walk the control buffer the kernel filled in.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&raw const msg);
        while !cmsg.is_null() {
            let (level, ty) = ((*cmsg).cmsg_level, (*cmsg).cmsg_type);
            if (level == libc::SOL_IP && ty == libc::IP_ORIGDSTADDR)
                || (level == libc::SOL_IPV6 && ty == libc::IPV6_ORIGDSTADDR)
            {
                orig = sockaddr_to_std(libc::CMSG_DATA(cmsg).cast());
            }
            cmsg = libc::CMSG_NXTHDR(&raw const msg, cmsg);
        }
    }
    Ok(Some((n as usize, peer, orig)))
}

/// Converts a `sockaddr_in` / `sockaddr_in6` (possibly unaligned) to a `SocketAddr`.
///
/// # Safety
/// `ptr` must point to a socket address whose length fits its family.
unsafe fn sockaddr_to_std(ptr: *const libc::sockaddr) -> Option<SocketAddr> {
    // SAFETY: the caller guarantees the address is readable for its family's length.
    unsafe {
        let family = std::ptr::read_unaligned(&raw const (*ptr).sa_family);
        match i32::from(family) {
            libc::AF_INET => {
                let sin: libc::sockaddr_in = std::ptr::read_unaligned(ptr.cast());
                Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                    u16::from_be(sin.sin_port),
                )))
            }
            libc::AF_INET6 => {
                let sin6: libc::sockaddr_in6 = std::ptr::read_unaligned(ptr.cast());
                Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                    u16::from_be(sin6.sin6_port),
                    sin6.sin6_flowinfo,
                    sin6.sin6_scope_id,
                )))
            }
            _ => None,
        }
    }
}

/// Reads from an accepted connection until `want` bytes came or the deadline passed.
fn read_payload(stream: &mut TcpStream, want: usize, deadline: Instant) -> usize {
    let mut got = 0;
    let mut buf = [0u8; 1024];
    while got < want {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    got
}

/// Watches every receiver until the step's outcome is known (bounded). Returns what each
/// socket got and, for TCP, the accepted connections (still open).
fn observe(
    case: &Case,
    receivers: &[Receiver],
    client_connected: bool,
) -> (Vec<Reception>, Vec<TcpStream>) {
    let mut got = Vec::new();
    let mut streams = Vec::new();
    let window = match (case.proto, client_connected) {
        (Proto::Tcp, true) => TCP_ACCEPT_WINDOW,
        (Proto::Tcp, false) => TCP_FAILED_WINDOW,
        (Proto::Udp, _) => UDP_WINDOW,
    };
    let mut deadline = Instant::now() + window;
    while Instant::now() < deadline {
        for r in receivers {
            match case.proto {
                Proto::Tcp => {
                    if let Ok((socket, _)) = r.socket.accept() {
                        let mut stream: TcpStream = socket.into();
                        let _ = stream.set_nonblocking(false);
                        let bytes = read_payload(
                            &mut stream,
                            case.payload,
                            Instant::now() + Duration::from_secs(2),
                        );
                        let local = stream.local_addr().expect("accepted socket's address");
                        let peer = stream.peer_addr().expect("accepted socket's peer");
                        got.push(Reception {
                            who: r.who.clone(),
                            local,
                            peer,
                            bytes,
                        });
                        streams.push(stream);
                    }
                }
                Proto::Udp => match recv_udp(&r.socket) {
                    Ok(Some((bytes, peer, orig))) => {
                        let local = orig
                            .or_else(|| r.socket.local_addr().ok().and_then(|a| a.as_socket()))
                            .expect("receiver address");
                        got.push(Reception {
                            who: r.who.clone(),
                            local,
                            peer,
                            bytes,
                        });
                        deadline = deadline.min(Instant::now() + UDP_SETTLE);
                    }
                    Ok(None) => {}
                    Err(e) => panic!("{}: receiving on {}: {e}", case.name, r.who),
                },
            }
        }
        // A TCP connection lands in one place only: once it did, the step is known.
        if case.proto == Proto::Tcp && !got.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    got.sort();
    (got, streams)
}

/// One client action and what it led to.
fn step(
    gw: &Gateway,
    case: &Case,
    receivers: &[Receiver],
    timeout: Duration,
    notes: &mut String,
) -> (Step, Option<TcpStream>, Vec<TcpStream>) {
    let started = Instant::now();
    let (client, mut stream) = client_send(gw, case, timeout);
    let took = started.elapsed();
    if case.proto == Proto::Tcp {
        notes.push_str(&format!(" connect {}ms", took.as_millis()));
    }
    // The rest of the payload once the connection is up: the established path.
    if let Some(s) = stream.as_mut()
        && case.payload > 3
    {
        std::thread::sleep(Duration::from_millis(20));
        let _ = s.write_all(&vec![b'y'; case.payload - 3]);
    }
    let (got, accepted) = observe(case, receivers, stream.is_some());
    (
        Step {
            client,
            got,
            time_wait: None,
        },
        stream,
        accepted,
    )
}

/// Whether a TCP socket with the client's port as its peer is in TIME_WAIT on the router.
fn router_time_wait(gw: &Gateway) -> bool {
    let out = gw
        .router
        .command("ss")
        .args(["-Htan", "state", "time-wait"])
        .output()
        .expect("running ss in the router namespace");
    String::from_utf8_lossy(&out.stdout).contains(&format!(":{CLIENT_PORT}"))
}

fn exchange(gw: &Gateway, case: &Case, notes: &mut String) -> Outcome {
    let mut receivers = open_router_receivers(gw, case);
    receivers.push(open_server(gw, case));
    match case.flow {
        Flow::Once => {
            let (first, _client, _accepted) =
                step(gw, case, &receivers, TCP_CONNECT_TIMEOUT, notes);
            Outcome { steps: vec![first] }
        }
        Flow::TcpReconnect => {
            assert_eq!(
                case.proto,
                Proto::Tcp,
                "{}: reconnect is TCP only",
                case.name
            );
            let (mut first, client, accepted) =
                step(gw, case, &receivers, TCP_RECONNECT_TIMEOUT, notes);
            // The receiving side closes first, so it is the one that ends in TIME_WAIT.
            for mut stream in accepted {
                let _ = stream.write_all(b"bye");
            }
            if let Some(mut stream) = client {
                let mut reply = Vec::new();
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = stream.read_to_end(&mut reply);
                notes.push_str(&format!(" reply={:?}", String::from_utf8_lossy(&reply)));
            }
            std::thread::sleep(Duration::from_millis(100));
            first.time_wait = Some(router_time_wait(gw));
            let (second, _client, _accepted) =
                step(gw, case, &receivers, TCP_RECONNECT_TIMEOUT, notes);
            Outcome {
                steps: vec![first, second],
            }
        }
    }
}
