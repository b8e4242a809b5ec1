//! A case: what a row of the table (`tests/conformance.rs`) can say. [`Case::new`] is the
//! default case; each builder method changes one thing (the rule, the receiving sockets,
//! the client, the flow) or declares what the kernel does and where the agent differs.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use proxy_testbed::{self as testbed, ClientLink};

/// The intercepted destination port of most cases.
pub const DPORT: u16 = 80;
/// A port no rule matches.
pub const OTHER_PORT: u16 = 8080;
/// The transparent listener's port (`--on-port`).
pub const ON_PORT: u16 = 50080;
/// The client's source port, fixed so that both runs see the same peer address (and so that
/// the TIME_WAIT case can reconnect from it).
pub const CLIENT_PORT: u16 = 40123;

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
    /// Its `#[test]`'s name, which starts with the protocol and family: `tcp4_`, `udp6_`...
    pub name: &'static str,
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
    /// The protocol and family are the name's first word.
    pub fn new(name: &'static str) -> Case {
        let (proto, fam) = match name.split('_').next() {
            Some("tcp4") => (Proto::Tcp, Fam::V4),
            Some("tcp6") => (Proto::Tcp, Fam::V6),
            Some("udp4") => (Proto::Udp, Fam::V4),
            Some("udp6") => (Proto::Udp, Fam::V6),
            _ => panic!("{name}: a case's name starts with tcp4_, tcp6_, udp4_ or udp6_"),
        };
        Case {
            name,
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

    /// Where the client sends: the server's address, on the case's port.
    pub fn dst_addr(&self) -> SocketAddr {
        SocketAddr::new(At::Server.ip(self.fam), self.send_port)
    }

    /// The client's fixed address, the peer every receiver should see.
    pub fn client_addr(&self) -> SocketAddr {
        let ip: IpAddr = match self.fam {
            Fam::V4 => testbed::CLIENT_V4.into(),
            Fam::V6 => testbed::CLIENT_V6.into(),
        };
        SocketAddr::new(ip, CLIENT_PORT)
    }
}
