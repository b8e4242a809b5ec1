//! The four set-ups compared, each in a client / router / server topology of its own:
//!
//! * (a) plain routing through the router, no proxy;
//! * (b) the kernel's iptables TPROXY recipe delivering to this project's proxy;
//! * (c) this project's eBPF classifier delivering to the same proxy;
//! * (d) the iptables TPROXY recipe with a SYN-first rule delivering to HAProxy, the peer.
//!
//! Everything a scenario starts is stopped when it is dropped: the agent (SIGTERM, then
//! SIGKILL) or HAProxy (SIGKILL), the load threads, and last the namespaces (by the
//! [`Gateway`]), which take their iptables rules and policy routing with them.

use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use proxy_testbed::{self as testbed, AgentProcess, Gateway, Netns};

use crate::{
    haproxy::Haproxy,
    load::{self, NsRuntime, Server},
    process::ProxyProcess,
};

/// The built-in listener's port, as in the recipe.
pub const ON_PORT: &str = "50080";
/// Per-connection log lines (`proxy::tproxy::tcp`, info) are off while measuring; the rest of
/// the agent's log stays at info so that its warnings are seen.
pub const AGENT_LOG: &str = "info,proxy::tproxy::tcp=warn";
/// How much of the agent's log an error shows.
const TAIL_LINES: usize = 200;
/// How (b) runs the agent: its classifier is attached to `lo`, which no benchmark packet
/// crosses, with a rule for port 1, its own mark and table: only its listener on 50080 serves.
pub const IPTABLES_AGENT_ARGS: &[&str] = &[
    "run",
    "--iface",
    "lo",
    "--dport",
    "1",
    "--on-port",
    ON_PORT,
    "--tproxy-mark",
    "0x100/0x100",
    "--table",
    "101",
];
/// How (c) runs the agent: TCP and UDP to port 80, so that the UDP figures proxy their
/// port-80 datagrams and the pass-through figure's port-81 ones cross a classifier that has
/// UDP rules to check (the case where unmatched UDP could cost something).
pub const EBPF_AGENT_ARGS: &[&str] = &[
    "run",
    "--iface",
    testbed::ROUTER_CLIENT_IFACE,
    "--dport",
    "80",
    "--protocol",
    "tcp,udp",
    "--on-port",
    ON_PORT,
];
/// The kernel's policy routing for (b) and (d), added by the bench.
pub const IPTABLES_POLICY_ROUTING: &[&[&str]] = &[
    &["rule", "add", "fwmark", "0x1/0x1", "lookup", "100"],
    &[
        "route",
        "add",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        "100",
    ],
];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    Routing,
    Iptables,
    Ebpf,
    Haproxy,
}

impl Kind {
    pub const COUNT: usize = 4;
    pub const ALL: [Kind; Kind::COUNT] = [Kind::Routing, Kind::Iptables, Kind::Ebpf, Kind::Haproxy];

    pub fn letter(self) -> &'static str {
        match self {
            Kind::Routing => "a",
            Kind::Iptables => "b",
            Kind::Ebpf => "c",
            Kind::Haproxy => "d",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::Routing => "(a) routing, no proxy",
            Kind::Iptables => "(b) iptables TPROXY -> proxy",
            Kind::Ebpf => "(c) eBPF classifier -> proxy",
            Kind::Haproxy => "(d) iptables TPROXY + SYN rule -> HAProxy",
        }
    }

    /// The label's short form, for the chart's bar groups.
    pub fn short(self) -> &'static str {
        match self {
            Kind::Routing => "(a) routing",
            Kind::Iptables => "(b) iptables",
            Kind::Ebpf => "(c) eBPF",
            Kind::Haproxy => "(d) HAProxy",
        }
    }

    /// Set-ups where the kernel's TPROXY target delivers the connections.
    fn uses_iptables(self) -> bool {
        matches!(self, Kind::Iptables | Kind::Haproxy)
    }

    pub fn index(self) -> usize {
        self as usize
    }
}

/// Whether the iptables recipe sends SYNs to the listener before its `-m socket` rule.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum SynRule {
    /// The recipe as usually written, (b): a SYN whose 4-tuple matches a TIME_WAIT socket of
    /// the proxy's goes to that socket, not to the listener, and the connection stalls.
    Absent,
    /// (d): a TPROXY rule for SYNs first, so that every new connection reaches the listener.
    First,
}

/// The iptables-restore input with `rules` TPROXY rules of which only the last matches the
/// benchmark's traffic, behind the recipe's `-m socket` DIVERT rule (and, for
/// [`SynRule::First`], behind a SYN rule for the same traffic).
pub fn iptables_rules(rules: usize, syn: SynRule) -> String {
    let tproxy = format!("-j TPROXY --on-port {ON_PORT} --tproxy-mark 0x1/0x1");
    let mut text = String::from(
        "*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n\
         :OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:DIVERT - [0:0]\n",
    );
    if syn == SynRule::First {
        text.push_str(&format!(
            "-A PREROUTING -i {} -p tcp --dport 80 --syn {tproxy}\n",
            testbed::ROUTER_CLIENT_IFACE
        ));
    }
    text.push_str("-A PREROUTING -p tcp -m socket --transparent -j DIVERT\n");
    for i in 0..rules.saturating_sub(1) {
        text.push_str(&format!(
            "-A PREROUTING -i {} -p tcp -d {}/32 --dport 80 {tproxy}\n",
            testbed::ROUTER_CLIENT_IFACE,
            decoy(i)
        ));
    }
    text.push_str(&format!(
        "-A PREROUTING -i {} -p tcp --dport 80 {tproxy}\n",
        testbed::ROUTER_CLIENT_IFACE
    ));
    text.push_str("-A DIVERT -j MARK --set-mark 0x1/0x1\n-A DIVERT -j ACCEPT\nCOMMIT\n");
    text
}

/// The `--config` file for (c) with `rules` rules, the same shape as (b)'s.
pub fn rules_file(rules: usize) -> String {
    let mut text = format!("[defaults]\non_port = {ON_PORT}\n");
    for i in 0..rules.saturating_sub(1) {
        text.push_str(&format!(
            "[[rule]]\ndst = [\"{}/32\"]\ndport = \"80\"\n",
            decoy(i)
        ));
    }
    text.push_str("[[rule]]\ndport = \"80\"\n");
    text
}

/// Destinations for the rules that never match: addresses of 198.18.0.0/15, the range set
/// aside for benchmarks (RFC 2544). They only appear in rules; nothing is sent to them.
fn decoy(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + 1 + i as u32)
}

/// Flags every agent of this run gets (`--relay MODE` and the bench's `--agent-arg`s), set
/// once from the command line.
static AGENT_FLAGS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();

pub fn set_agent_flags(flags: Vec<String>) {
    let _ = AGENT_FLAGS.set(flags);
}

/// The flags every agent of this run gets.
pub fn agent_flags() -> &'static [String] {
    AGENT_FLAGS.get().map_or(&[], Vec::as_slice)
}

/// The agent binary running in the router namespace (the testbed's [`AgentProcess`]), with
/// what the bench reads of it; stopped (SIGTERM) when dropped.
pub struct Agent {
    process: AgentProcess,
}

impl Agent {
    pub fn start(router: &Netns, binary: &Path, args: &[String]) -> Result<Agent, String> {
        let mut command = router.command(binary);
        command
            .args(args)
            .args(agent_flags())
            .env("RUST_LOG", AGENT_LOG);
        let mut process = AgentProcess::spawn(command, &router.name)
            .map_err(|e| proxy_common::error_chain(&e))?;
        process
            .wait_ready_or(Duration::from_secs(90), crate::stopped)
            .map_err(|e| {
                format!(
                    "{}:\n{}",
                    proxy_common::error_chain(&e),
                    process.log_tail(TAIL_LINES)
                )
            })?;
        Ok(Agent { process })
    }

    pub fn tail(&self) -> String {
        self.process.log_tail(TAIL_LINES)
    }

    /// Warnings and errors the agent logged (the first 20).
    pub fn notable(&self) -> Vec<String> {
        self.process
            .log_lines_matching(|l| l.contains("WARN") || l.contains("ERROR"), 20)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// What the figures read of it in /proc. `ip netns exec` execs the agent, so the
    /// child's pid is the agent's.
    pub fn process(&self) -> Option<ProxyProcess> {
        Some(ProxyProcess {
            pid: self.pid()?,
            name: "proxy",
        })
    }

    /// Waits up to `timeout` for the agent to exit on its own (after a handover).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<(), String> {
        self.process
            .wait_exit(timeout)
            .map(drop)
            .map_err(|e| format!("{}:\n{}", proxy_common::error_chain(&e), self.tail()))
    }

    /// SIGINT, the stop for good (the agent drains, then undoes its set-up), a second one
    /// after 5 s (exit at once), SIGKILL after 10 s.
    pub fn stop(&mut self) {
        let _ = self.process.stop(Duration::from_secs(5));
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One set-up with its own namespaces, server, client threads and its proxy: the agent for
/// (b) and (c), HAProxy for (d). Fields drop in order: the proxy, the load threads, then the
/// namespaces.
pub struct Scenario {
    pub kind: Kind,
    agent: Option<Agent>,
    haproxy: Option<Haproxy>,
    pub client: NsRuntime,
    _server: Server,
    binary: PathBuf,
    workdir: PathBuf,
    agent_args: Vec<String>,
    pub gw: Gateway,
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

impl Scenario {
    pub fn new(
        kind: Kind,
        binary: &Path,
        workdir: &Path,
        server_lifetime: Duration,
    ) -> Result<Scenario, String> {
        let gw = Gateway::new(&format!("bench{}", kind.letter()))
            .map_err(|e| proxy_common::error_chain(&e))?;
        // Many short connections: let the clients (the client, and the proxy towards the
        // server) reuse ports in TIME_WAIT, from a wide range.
        for ns in [&gw.client, &gw.router] {
            ns.sysctl("net.ipv4.tcp_tw_reuse", "1")
                .and_then(|()| ns.sysctl("net.ipv4.ip_local_port_range", "10000 60999"))
                .map_err(|e| proxy_common::error_chain(&e))?;
        }
        let server = Server::start(&gw.server, server_lifetime)?;
        let client = NsRuntime::new(&gw.client.name, 2).map_err(|e| format!("client: {e}"))?;
        let agent_args = match kind {
            Kind::Routing | Kind::Haproxy => Vec::new(),
            Kind::Iptables => args(IPTABLES_AGENT_ARGS),
            Kind::Ebpf => args(EBPF_AGENT_ARGS),
        };
        let mut scenario = Scenario {
            kind,
            agent: None,
            haproxy: None,
            client,
            _server: server,
            binary: binary.to_owned(),
            workdir: workdir.to_owned(),
            agent_args,
            gw,
        };
        if kind.uses_iptables() {
            scenario.install_iptables(1)?;
            for cmd in IPTABLES_POLICY_ROUTING {
                scenario
                    .gw
                    .router
                    .ip(cmd)
                    .map_err(|e| proxy_common::error_chain(&e))?;
            }
        }
        scenario.restart_proxy()?;
        Ok(scenario)
    }

    /// (b) and (c): this project's agent is the proxy.
    pub fn has_agent(&self) -> bool {
        matches!(self.kind, Kind::Iptables | Kind::Ebpf)
    }

    /// Every set-up but (a) has a proxy.
    pub fn has_proxy(&self) -> bool {
        self.kind != Kind::Routing
    }

    pub fn agent(&self) -> Option<&Agent> {
        self.agent.as_ref()
    }

    /// The proxy's process, whichever proxy it is.
    pub fn proxy_process(&self) -> Option<ProxyProcess> {
        match (&self.agent, &self.haproxy) {
            (Some(agent), _) => agent.process(),
            (None, Some(haproxy)) => haproxy.process(),
            (None, None) => None,
        }
    }

    /// What the proxy warned about, for the report's notes.
    pub fn proxy_warnings(&self) -> Vec<String> {
        match (&self.agent, &self.haproxy) {
            (Some(agent), _) => agent.notable(),
            (None, Some(haproxy)) => haproxy.notable(),
            (None, None) => Vec::new(),
        }
    }

    /// Replaces the agent's arguments for the next [`Scenario::restart_proxy`], and returns
    /// the ones it had.
    pub fn replace_agent_args(&mut self, args: Vec<String>) -> Vec<String> {
        std::mem::replace(&mut self.agent_args, args)
    }

    /// Stops the proxy (if any) and starts a fresh one, then checks the path end to end.
    pub fn restart_proxy(&mut self) -> Result<(), String> {
        if let Some(mut old) = self.agent.take() {
            old.stop();
        }
        if let Some(mut old) = self.haproxy.take() {
            old.stop();
        }
        match self.kind {
            Kind::Routing => {}
            Kind::Iptables | Kind::Ebpf => {
                self.agent = Some(Agent::start(
                    &self.gw.router,
                    &self.binary,
                    &self.agent_args,
                )?);
            }
            Kind::Haproxy => {
                let config = self
                    .workdir
                    .join(format!("haproxy-{}.cfg", self.gw.router.name));
                self.haproxy = Some(Haproxy::start(&self.gw.router, &config)?);
            }
        }
        self.check_path()
    }

    /// Sets the proxy up for [`Scenario::upgrade_proxy`]: HAProxy restarted in master-worker
    /// mode with its listeners exposed for the seamless reload; the agent as it is.
    pub fn prepare_upgrades(&mut self) -> Result<(), String> {
        if self.kind != Kind::Haproxy {
            return Ok(());
        }
        if let Some(mut old) = self.haproxy.take() {
            old.stop();
        }
        let config = self
            .workdir
            .join(format!("haproxy-mw-{}.cfg", self.gw.router.name));
        self.haproxy = Some(Haproxy::start_master_worker(&self.gw.router, &config)?);
        self.check_path()
    }

    /// One upgrade of the proxy under whatever load runs: the agent, a new agent started
    /// beside it, which takes over (returns how long the old one took to exit once the
    /// new one was ready); HAProxy, its seamless reload.
    pub fn upgrade_proxy(&mut self) -> Result<Option<Duration>, String> {
        match (&mut self.agent, &self.haproxy) {
            (Some(_), _) => {
                let next = Agent::start(&self.gw.router, &self.binary, &self.agent_args)?;
                let ready = std::time::Instant::now();
                let mut old = self.agent.replace(next).ok_or("no agent")?;
                old.wait_exit(Duration::from_secs(10))?;
                Ok(Some(ready.elapsed()))
            }
            (None, Some(haproxy)) => haproxy.reload(Duration::from_secs(10)).map(|()| None),
            (None, None) => Err(format!("{}: no proxy to upgrade", self.kind.label())),
        }
    }

    /// One exchange end to end, and the server saw it from the right peer: the client
    /// itself when routed, the router when proxied.
    pub fn check_path(&self) -> Result<(), String> {
        let expect = if self.has_proxy() {
            testbed::ROUTER_SERVER_SIDE_V4
        } else {
            testbed::CLIENT_V4
        };
        let mut last = String::new();
        for _ in 0..20 {
            match load::probe(&self.gw.client.name) {
                Ok(peer) if peer == expect.to_string() => return Ok(()),
                Ok(peer) => last = format!("the server saw {peer}, expected {expect}"),
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let proxy_log = match (&self.agent, &self.haproxy) {
            (Some(agent), _) => agent.tail(),
            (None, Some(haproxy)) => haproxy.log_text(),
            (None, None) => String::new(),
        };
        Err(format!(
            "{}: no working path: {last}\n{proxy_log}",
            self.kind.label(),
        ))
    }

    /// Replaces (b)'s or (d)'s iptables rules with `rules` TPROXY rules, the last one
    /// matching.
    fn install_iptables(&self, rules: usize) -> Result<(), String> {
        let mut child = self
            .gw
            .router
            .command("iptables-restore")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("running iptables-restore: {e}"))?;
        let syn = if self.kind == Kind::Haproxy {
            SynRule::First
        } else {
            SynRule::Absent
        };
        let text = iptables_rules(rules, syn);
        let written = child
            .stdin
            .take()
            .ok_or("no stdin pipe")
            .and_then(|mut stdin| {
                stdin
                    .write_all(text.as_bytes())
                    .map_err(|_| "writing to iptables-restore")
            });
        let out = child
            .wait_with_output()
            .map_err(|e| format!("iptables-restore: {e}"))?;
        if written.is_err() || !out.status.success() {
            return Err(format!(
                "iptables-restore failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(())
    }

    /// Sets the number of rules, the last one matching the benchmark's traffic: iptables
    /// rules for (b), a `--config` file and a fresh agent for (c).
    pub fn set_rules(&mut self, rules: usize) -> Result<(), String> {
        match self.kind {
            // (d) is not in the rules figure: HAProxy's rules are iptables', as (b)'s.
            Kind::Routing | Kind::Haproxy => Ok(()),
            Kind::Iptables => {
                self.install_iptables(rules)?;
                self.check_path()
            }
            Kind::Ebpf => {
                let path = self.workdir.join(format!("rules-{rules}.toml"));
                std::fs::write(&path, rules_file(rules))
                    .map_err(|e| format!("writing {}: {e}", path.display()))?;
                self.agent_args = args(&[
                    "run",
                    "--iface",
                    testbed::ROUTER_CLIENT_IFACE,
                    "--config",
                    &path.to_string_lossy(),
                ]);
                self.restart_proxy()
            }
        }
    }
}
