//! Reloads are atomic: under load, a packet sees the old rule set or the new one, never a
//! mix, and no connection is dropped or handed to another rule's listener while the
//! classifier switches over.

mod common;

use std::{
    io::ErrorKind,
    net::{SocketAddr, TcpStream},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use nix::{sys::signal, unistd::Pid};
use proxy_testbed::Gateway;
use socket2::{Domain, Socket, Type};

use common::{Agent, require_root, server};

const RELOADS: usize = 80;
const FILLER_RULES: u32 = 300;
/// A connect slower than this lost its SYN and waited for the retransmission (1 s).
const SLOW_CONNECT: Duration = Duration::from_millis(700);

/// Two rules, P (port 80 to listener 50080) and Q (port 81 to 50081), with filler rules
/// between them that never match the client's destination; `p_first` picks the order.
fn rules_file(p_first: bool) -> String {
    let p = "[[rule]]\ndport = \"80\"\non_port = 50080\n";
    let q = "[[rule]]\ndport = \"81\"\non_port = 50081\n";
    // The fillers' on-port comes from the defaults; P and Q say their own.
    let mut out = String::from("[defaults]\non_port = 50080\n");
    out.push_str(if p_first { p } else { q });
    out.push_str(&common::unused_prefix_rules(FILLER_RULES, |_| {
        "80-81".into()
    }));
    out.push_str(if p_first { q } else { p });
    out
}

/// What the test's transparent listeners saw: (listener port, original destination port)
/// per accepted connection.
type Accepted = Arc<Mutex<Vec<(u16, u16)>>>;

/// A transparent listener on 0.0.0.0:`port` in the router namespace (what
/// `--listener external` expects), recording each accepted connection until `stop`.
fn transparent_listener(
    gw: &Gateway,
    port: u16,
    accepted: &Accepted,
    stop: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<(), proxy_testbed::TestbedError>> {
    let socket = gw
        .router
        .run(|| {
            let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.set_ip_transparent_v4(true)?;
            socket.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
            socket.listen(1024)?;
            socket.set_nonblocking(true)?;
            Ok::<_, std::io::Error>(socket)
        })
        .expect("router namespace")
        .expect("transparent listener");
    let accepted = Arc::clone(accepted);
    let stop = Arc::clone(stop);
    gw.router.spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(300);
        while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
            match socket.accept() {
                Ok((conn, _)) => {
                    let original = conn
                        .local_addr()
                        .ok()
                        .and_then(|a| a.as_socket())
                        .map_or(0, |a| a.port());
                    accepted.lock().expect("lock").push((port, original));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    })
}

#[derive(Default, Debug)]
struct Load {
    connected: u64,
    failed: Vec<String>,
    slow: u64,
}

impl Load {
    /// Enough load to mean something, and none of it lost: no failure, no connection that
    /// waited for a SYN retransmission.
    fn assert_nothing_lost(&self) {
        assert!(
            self.connected >= 2 * RELOADS as u64,
            "too little load to test anything: {self:?}"
        );
        assert!(
            self.failed.is_empty() && self.slow == 0,
            "lost during reloads: {} failed, {} slow (a SYN lost), of {}: {:?}",
            self.failed.len(),
            self.slow,
            self.connected,
            &self.failed[..self.failed.len().min(10)]
        );
    }
}

#[test]
fn reloads_under_load_alternating_rule_orders_misroute_and_drop_nothing() {
    require_root();
    let gw = Gateway::new("reload-atomic").expect("topology");
    let dir = common::TempDir::new("proxy-atomic-reload");
    let path = dir.join("rules.toml");
    std::fs::write(&path, rules_file(true)).expect("rules file");
    let config = path.to_str().expect("utf-8 path").to_owned();

    let accepted: Accepted = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let listeners = [
        transparent_listener(&gw, 50080, &accepted, &stop),
        transparent_listener(&gw, 50081, &accepted, &stop),
    ];
    let agent = Agent::start(
        &gw.router,
        &[
            "run",
            "--iface",
            "r0",
            "--config",
            &config,
            "--listener",
            "external",
        ],
    );

    let load_stop = Arc::new(AtomicBool::new(false));
    let load = start_load(&gw, &load_stop, false);

    let reloaded = reload(&agent, &path, |i| rules_file(i.is_multiple_of(2)));
    load_stop.store(true, Ordering::Relaxed);
    let load = load.join().expect("load thread").expect("client namespace");
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    for l in listeners {
        let _ = l.join();
    }
    let log = agent.stop_ok();

    let done = reloaded.unwrap_or_else(|i| panic!("reload {i} did not finish:\n{log}"));
    let accepted = accepted.lock().expect("lock").clone();
    let misrouted: Vec<&(u16, u16)> = accepted
        .iter()
        .filter(|(listener, original)| *listener != 50000 + original)
        .collect();
    eprintln!(
        "{done} reloads; {} connections made, {} accepted, {} misrouted, {} failed, {} slow",
        load.connected,
        accepted.len(),
        misrouted.len(),
        load.failed.len(),
        load.slow
    );
    load.assert_nothing_lost();
    assert!(
        misrouted.is_empty(),
        "{} of {} connections went to the other rule's listener (listener, original port): {:?}",
        misrouted.len(),
        accepted.len(),
        &misrouted[..misrouted.len().min(10)]
    );
}

/// A client in the client namespace that connects to the server's ports 80 and 81 in
/// turn until `stop`, each connection with a 3 s limit; with `exchange`, each also sends a
/// line and waits for the answer (through the built-in proxy, to the test servers).
fn start_load(
    gw: &Gateway,
    stop: &Arc<AtomicBool>,
    exchange: bool,
) -> std::thread::JoinHandle<Result<Load, proxy_testbed::TestbedError>> {
    let flag = Arc::clone(stop);
    gw.client.spawn(move || {
        let mut load = Load::default();
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut port = 80;
        while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
            let started = Instant::now();
            let result = if exchange {
                common::ask_line(server(port), "x").map(drop)
            } else {
                TcpStream::connect_timeout(&server(port), Duration::from_secs(3)).map(drop)
            };
            match result {
                Ok(()) => {
                    load.connected += 1;
                    if started.elapsed() > SLOW_CONNECT {
                        load.slow += 1;
                    }
                }
                Err(e) => load.failed.push(format!("port {port}: {e}")),
            }
            port = if port == 80 { 81 } else { 80 };
        }
        load
    })
}

/// [`RELOADS`] reloads of `path`, each with the text `rules(i)` (i from 1), each awaited in
/// the agent's log. The number done, or the one that did not finish.
fn reload(
    agent: &Agent,
    path: &std::path::Path,
    rules: impl Fn(usize) -> String,
) -> Result<usize, usize> {
    for i in 1..=RELOADS {
        std::fs::write(path, rules(i)).expect("rules file");
        let _ = signal::kill(Pid::from_raw(agent.pid() as i32), signal::Signal::SIGHUP);
        let deadline = Instant::now() + Duration::from_secs(10);
        while agent.log_text().matches("reloaded: ").count() < i && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if agent.log_text().matches("reloaded: ").count() < i {
            return Err(i);
        }
    }
    Ok(RELOADS)
}

#[test]
fn reloads_under_load_that_move_a_rule_to_another_built_in_listener_drop_nothing() {
    // The built-in listeners: rule P's on-port alternates between 50080 and 50082, so every
    // reload opens one listener before the switch and closes the other after it. A listener
    // closed too early, or opened too late, shows as failed or slow connections.
    require_root();
    let gw = Gateway::new("reload-builtin").expect("topology");
    let _s80 = common::Server::start(&gw.server, server(80), common::ServerMode::Echo);
    let _s81 = common::Server::start(&gw.server, server(81), common::ServerMode::Echo);
    let dir = common::TempDir::new("proxy-builtin-reload");
    let path = dir.join("rules.toml");
    let rules = |i: usize| {
        let p_port = if i.is_multiple_of(2) { 50080 } else { 50082 };
        format!(
            "[[rule]]\ndport = \"80\"\non_port = {p_port}\n[[rule]]\ndport = \"81\"\non_port = 50081\n"
        )
    };
    std::fs::write(&path, rules(0)).expect("rules file");
    let config = path.to_str().expect("utf-8 path").to_owned();
    let agent = Agent::start(&gw.router, &["run", "--iface", "r0", "--config", &config]);
    let load_stop = Arc::new(AtomicBool::new(false));
    let load = start_load(&gw, &load_stop, true);
    let reloaded = reload(&agent, &path, rules);
    load_stop.store(true, Ordering::Relaxed);
    let load = load.join().expect("load thread").expect("client namespace");
    let log = agent.stop_ok();
    let done = reloaded.unwrap_or_else(|i| panic!("reload {i} did not finish:\n{log}"));
    eprintln!(
        "{done} reloads (built-in listeners); {} exchanges, {} failed, {} slow",
        load.connected,
        load.failed.len(),
        load.slow
    );
    load.assert_nothing_lost();
}

#[test]
fn a_connection_whose_rule_a_reload_removed_keeps_its_return_path_until_it_ends() {
    // Traffic no rule matches skips the return path's socket lookup while no socket can
    // need it. A reload that removes the rule of a live connection must turn it on first:
    // that connection's packets then match no rule, and only the return path finds its
    // socket. Once it has ended, the lookup goes off again.
    require_root();
    let gw = Gateway::new("reload-return-path").expect("topology");
    let _s80 = common::Server::start(&gw.server, server(80), common::ServerMode::Echo);
    let _s81 = common::Server::start(&gw.server, server(81), common::ServerMode::Echo);
    let dir = common::TempDir::new("proxy-return-path");
    let path = dir.join("rules.toml");
    std::fs::write(&path, "[[rule]]\ndport = \"80\"\non_port = 50080\n").expect("rules file");
    let config = path.to_str().expect("utf-8 path").to_owned();
    // With early demux (`tcp_v4_early_demux`) the stack would find the connection's socket
    // by itself, before routing, and hide a missing return path; not every host has it on.
    gw.router
        .run(|| std::fs::write("/proc/sys/net/ipv4/tcp_early_demux", "0"))
        .expect("router namespace")
        .expect("net.ipv4.tcp_early_demux=0 in the router namespace");
    let agent = Agent::start(&gw.router, &["run", "--iface", "r0", "--config", &config]);
    const OFF: &str = "return path: not looked up";
    assert!(agent.log_contains(OFF), "{}", agent.log_text());

    let mut kept = common::connect_kept(&gw, 80, &|| agent.log_text());
    assert!(common::ask(&mut kept, "before").ends_with("echo=before"));
    // Port 81 matches no rule: routed, and no lookup.
    let direct = gw
        .client
        .run(|| common::ask_line(server(81), "direct"))
        .expect("client namespace")
        .expect("port 81, routed");
    assert!(direct.ends_with("echo=direct"), "{direct}");

    // The rule for port 80 goes: the kept connection's packets match nothing now.
    std::fs::write(&path, "[[rule]]\ndport = \"8080\"\non_port = 50080\n").expect("rules file");
    let _ = signal::kill(Pid::from_raw(agent.pid() as i32), signal::Signal::SIGHUP);
    agent
        .wait_for_line(&["reloaded: "], Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no reload:\n{}", agent.log_text()));
    for i in 0..3 {
        let line = format!("after-{i}");
        assert!(
            common::ask(&mut kept, &line).ends_with(&format!("echo={line}")),
            "the connection accepted under the removed rule broke:\n{}",
            agent.log_text()
        );
    }
    drop(kept);
    // The grace period after the switch, then the next check.
    let deadline = Instant::now() + return_path_grace() + Duration::from_secs(5);
    while agent.log_text().matches(OFF).count() < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        agent.log_text().matches(OFF).count(),
        2,
        "the lookup did not go off once the old connection ended:\n{}",
        agent.log_text()
    );
    let log = agent.stop_ok();
    assert!(common::counter(&log, "diverted") > 0, "{log}");
    assert!(common::counter(&log, "return_path_skipped") > 0, "{log}");
}

/// `proxy::tproxy::return_path::GRACE`, which the test cannot name (the module is the
/// agent's own).
fn return_path_grace() -> Duration {
    Duration::from_secs(5)
}
