//! Throwaway network namespaces for the demo, the kernel tests and the benchmarks:
//!
//! ```text
//! client ns                 router ns (the agent)                 server ns
//! c0 192.0.2.2/24  ──veth── r0 192.0.2.1/24 | r1 198.51.100.1/24 ──veth── s0 198.51.100.2/24
//!    2001:db8:1::2/64          2001:db8:1::1/64 | 2001:db8:2::1/64          2001:db8:2::2/64
//! ```
//!
//! The addresses are documentation ranges (RFC 5737, RFC 3849) that exist only on these
//! veths: traffic never leaves the namespaces. Each [`Gateway`] has unique namespace names and
//! removes them when dropped, pass or fail. Building the topology shells out to `ip`
//! (iproute2): that is test scaffolding; the agent itself only speaks netlink.
//!
//! [`AgentProcess`] runs the agent binary in one of these namespaces and knows when it is
//! ready; `proxy-demo` (src/bin) shows the whole path on a topology of its own.

use std::{
    fs::File,
    io::{self, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream},
    process::{Command, Output},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use nix::sched::{CloneFlags, setns};

mod agent;
mod tun_pump;
pub use agent::{AgentError, AgentProcess};
pub use tun_pump::TunPump;

pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const ROUTER_CLIENT_SIDE_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
pub const ROUTER_SERVER_SIDE_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
pub const SERVER_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
pub const ROUTER_CLIENT_SIDE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
pub const ROUTER_SERVER_SIDE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 1);
pub const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
/// The router's interface towards the client, where the classifier is attached.
pub const ROUTER_CLIENT_IFACE: &str = "r0";
pub const ROUTER_SERVER_IFACE: &str = "r1";

/// A testbed command failed.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// `ip` could not be run at all (iproute2 missing?).
    #[error("running `ip {args}` (is iproute2 installed?)")]
    Spawn {
        args: String,
        #[source]
        source: io::Error,
    },
    /// `ip` ran and failed.
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
    /// Entering a namespace failed.
    #[error("entering network namespace {name}")]
    Setns {
        name: String,
        #[source]
        source: io::Error,
    },
    /// A tun device could not be made, or its pump started.
    #[error("setting up tun device {name}")]
    Tun {
        name: String,
        #[source]
        source: io::Error,
    },
    /// Not root.
    #[error(
        "the testbed needs root to create network namespaces; run as root (for example with sudo)"
    )]
    NotRoot,
}

/// Runs `ip ARGS`, turning a failure into an error with its stderr.
pub fn ip(args: &[&str]) -> Result<Output, TestbedError> {
    let joined = args.join(" ");
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| TestbedError::Spawn {
            args: joined.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(TestbedError::Failed {
            args: joined,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out)
}

/// A named network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn create(name: String) -> Result<Self, TestbedError> {
        // A leftover from a killed run with the same name would make `add` fail.
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Runs `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<Output, TestbedError> {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        ip(&full)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }

    /// Runs `f` on a thread that has entered the namespace: sockets it creates live there.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, TestbedError> {
        run_in(&self.name, f)
    }

    /// Moves the calling thread into the namespace, for threads that live on.
    pub fn enter(&self) -> Result<(), TestbedError> {
        enter(&self.name)
    }

    /// Runs `f` on a new thread inside the namespace and returns at once with its handle
    /// (for servers that run while the test goes on).
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<Result<T, TestbedError>> {
        let name = self.name.clone();
        std::thread::spawn(move || {
            enter(&name)?;
            Ok(f())
        })
    }

    /// Writes a sysctl under /proc/sys/net as seen from inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), TestbedError> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run(|| std::fs::write(&path, value))?
            .map_err(|source| TestbedError::Setns {
                name: format!("{} (writing {path})", self.name),
                source,
            })
    }
}

/// Runs `f` on a thread that has entered the namespace named `name`.
fn run_in<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T, TestbedError> {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                enter(name)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// Moves the calling thread into the named namespace.
pub fn enter(name: &str) -> Result<(), TestbedError> {
    let setns_err = |source: io::Error| TestbedError::Setns {
        name: name.to_owned(),
        source,
    };
    let file = File::open(format!("/run/netns/{name}")).map_err(setns_err)?;
    setns(&file, CloneFlags::CLONE_NEWNET).map_err(|e| setns_err(io::Error::from(e)))
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// How the client namespace is joined to the router.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientLink {
    /// A veth pair: Ethernet frames.
    Veth,
    /// Two tun devices joined by a packet pump ([`TunPump`]): IP packets with no link-layer
    /// header, as on a WireGuard, tun or ipip ingress (T10).
    Tun,
}

/// Client, router and server namespaces joined by veth pairs (or a tun pair on the client
/// side); the router forwards.
pub struct Gateway {
    /// Declared first, so dropped first: the pump stops before its namespaces go.
    pump: Option<TunPump>,
    pub client: Netns,
    pub router: Netns,
    pub server: Netns,
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

impl Gateway {
    /// Builds the topology with namespace names unique to this process and call.
    pub fn new(tag: &str) -> Result<Self, TestbedError> {
        Self::with_client_link(tag, ClientLink::Veth)
    }

    /// [`Gateway::new`], with the client side joined by `link`.
    pub fn with_client_link(tag: &str, link: ClientLink) -> Result<Self, TestbedError> {
        if !nix::unistd::geteuid().is_root() {
            return Err(TestbedError::NotRoot);
        }
        let id = format!(
            "tp-{tag}-{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let mut gw = Gateway {
            pump: None,
            client: Netns::create(format!("{id}-cli"))?,
            router: Netns::create(format!("{id}-rtr"))?,
            server: Netns::create(format!("{id}-srv"))?,
        };
        match link {
            ClientLink::Veth => gw.router.ip(&veth_args("r0", "c0", &gw.client)).map(drop)?,
            ClientLink::Tun => {
                gw.pump = Some(TunPump::start((&gw.client, "c0"), (&gw.router, "r0"))?);
            }
        }
        gw.router.ip(&veth_args("r1", "s0", &gw.server))?;
        gw.address_client_side()?;
        address(
            &gw.router,
            "r1",
            ROUTER_SERVER_SIDE_V4,
            ROUTER_SERVER_SIDE_V6,
        )?;
        address(&gw.server, "s0", SERVER_V4, SERVER_V6)?;
        default_routes(&gw.server, ROUTER_SERVER_SIDE_V4, ROUTER_SERVER_SIDE_V6)?;
        gw.router.sysctl("net.ipv4.ip_forward", "1")?;
        gw.router.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        Ok(gw)
    }
}

impl Gateway {
    /// Deletes the client-side veth pair (r0 and c0 go together) and makes it again with
    /// the same names, addresses and routes, as a VPN interface that is torn down and set
    /// up again (`wg-quick down/up`) would be: the same name, a new interface index.
    pub fn relink_client(&self) -> Result<(), TestbedError> {
        self.router.ip(&["link", "del", "r0"])?;
        self.router.ip(&veth_args("r0", "c0", &self.client))?;
        self.address_client_side()
    }

    /// Addresses on c0 and r0, and the client's default routes through the router.
    fn address_client_side(&self) -> Result<(), TestbedError> {
        address(&self.client, "c0", CLIENT_V4, CLIENT_V6)?;
        address(
            &self.router,
            "r0",
            ROUTER_CLIENT_SIDE_V4,
            ROUTER_CLIENT_SIDE_V6,
        )?;
        default_routes(&self.client, ROUTER_CLIENT_SIDE_V4, ROUTER_CLIENT_SIDE_V6)
    }
}

/// `ip link add NAME type veth peer name PEER netns NS`.
fn veth_args<'a>(name: &'a str, peer: &'a str, peer_ns: &'a Netns) -> [&'a str; 10] {
    [
        "link",
        "add",
        name,
        "type",
        "veth",
        "peer",
        "name",
        peer,
        "netns",
        &peer_ns.name,
    ]
}

/// Gives `dev` in `ns` its /24 and /64 and brings it up.
fn address(ns: &Netns, dev: &str, v4: Ipv4Addr, v6: Ipv6Addr) -> Result<(), TestbedError> {
    ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", dev])?;
    // nodad: usable at once, no duplicate address detection to wait for.
    ns.ip(&[
        "-6",
        "addr",
        "add",
        &format!("{v6}/64"),
        "dev",
        dev,
        "nodad",
    ])?;
    ns.ip(&["link", "set", dev, "up"])?;
    Ok(())
}

/// Default routes of both families via the router.
fn default_routes(ns: &Netns, via4: Ipv4Addr, via6: Ipv6Addr) -> Result<(), TestbedError> {
    ns.ip(&["route", "add", "default", "via", &via4.to_string()])?;
    ns.ip(&["-6", "route", "add", "default", "via", &via6.to_string()])?;
    Ok(())
}

/// The server address of a family, for tests that loop over both.
pub fn server_addr(v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(SERVER_V6)
    } else {
        IpAddr::V4(SERVER_V4)
    }
}

/// One request/response, as the demo and the tests make it: connect, send `request`,
/// half-close, read the reply to EOF. Bounded: 3 s to connect, 5 s per read.
pub fn exchange(addr: SocketAddr, request: &[u8]) -> io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(request)?;
    stream.shutdown(Shutdown::Write)?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply)
}
