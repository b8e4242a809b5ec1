//! Kernel tests of restarts and upgrades (issue 19): an agent started while another runs
//! on the same table takes its listeners and live connections over, under load, and no
//! stop followed by a start lets a connection past the proxy.
//!
//! The load ([`common::load`]) runs from the client namespace through the router to the
//! server. The agents run in one mount namespace ([`Mounts`]), as on a host, where the
//! pinned classifier is found by the next agent.

mod common;

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{TcpListener, TcpStream},
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use common::{
    Agent, Mounts,
    load::{Load, OriginServer, one_at_a_time, tally_report},
    require_root, server,
};
use proxy_testbed::Gateway;

/// `proxy run` intercepting TCP port 80 and UDP port 53, for the built-in listeners on
/// port 50080.
const AGENT_ARGS: &[&str] = &[
    "run",
    "--iface",
    "r0",
    "--protocol",
    "tcp,udp",
    "--dport",
    "80,53",
    "--on-port",
    "50080",
];

/// A kept connection from the client namespace in the server's `echo` mode.
struct Echo {
    writer: TcpStream,
    reader: BufReader<TcpStream>,
}

impl Echo {
    fn open(gw: &Gateway, port: u16) -> Echo {
        let stream = gw
            .client
            .run(move || TcpStream::connect_timeout(&server(port), Duration::from_secs(3)))
            .expect("netns")
            .unwrap_or_else(|e| panic!("connect to port {port}: {e}"));
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let mut writer = stream.try_clone().expect("clone");
        writer.write_all(b"echo\n").expect("the echo request");
        Echo {
            writer,
            reader: BufReader::new(stream),
        }
    }

    /// Sends a line and reads the one that comes back.
    fn ask(&mut self, line: &str) -> std::io::Result<String> {
        writeln!(self.writer, "{line}")?;
        let mut answer = String::new();
        self.reader.read_line(&mut answer)?;
        Ok(answer.trim().to_owned())
    }
}

/// Ten handovers in a row under load: each new agent takes the listeners, every live
/// connection and every UDP session from the running one, which exits within 5 s. Nothing
/// fails, nothing is slow, nothing goes past the proxy, no long-lived connection is cut,
/// every byte of every bulk transfer comes back once, in order, and every UDP flow keeps
/// its upstream port and loses no datagram.
#[test]
fn ten_overlapped_handovers_under_load_lose_nothing() {
    require_root();
    let _serial = one_at_a_time();
    let gw = Gateway::new("handover").expect("topology");
    let mounts = Mounts::new(&gw.router);
    let origin = OriginServer::start(&gw.server, server(80));
    let mut agent = Agent::start_in(&mounts, AGENT_ARGS);
    let load = Load::start_with_udp(&gw.client, 50, 50, 20);
    std::thread::sleep(Duration::from_secs(1));
    let mut logs = Vec::new();
    for round in 0..10 {
        let next = Agent::start_in(&mounts, AGENT_ARGS);
        let (status, log) = agent.wait_exit(Duration::from_secs(5));
        assert!(
            status.success(),
            "round {round}: the old agent: {status}\n{log}"
        );
        assert!(
            log.contains("handover done: exiting without teardown"),
            "round {round}: the old agent did not hand over:\n{log}"
        );
        assert!(
            !log.contains("removed"),
            "round {round}: the old agent tore something down:\n{log}"
        );
        logs.push(log);
        agent = next;
        std::thread::sleep(Duration::from_millis(700));
    }
    let tally = load.finish();
    let report = tally_report(&tally);
    let last = agent.stop_ok();
    let moved: usize = logs
        .iter()
        .chain(std::iter::once(&last))
        .flat_map(|log| log.lines())
        .filter(|l| l.contains("UDP session(s) moved in"))
        .filter_map(|l| {
            l.split("handover: ")
                .nth(1)?
                .split(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum();
    println!("{report}; {moved} connection moves logged");
    assert!(tally.new_failed.is_empty(), "{report}");
    assert_eq!(tally.new_direct, 0, "{report}");
    assert_eq!(origin.direct.load(Ordering::Relaxed), 0, "{report}");
    assert!(tally.new_slow.is_empty(), "{report}");
    assert!(tally.long_failed.is_empty(), "{report}");
    assert_eq!(tally.long_ok, 100, "{report}");
    assert!(tally.udp_failed.is_empty(), "{report}");
    assert_eq!(tally.udp_ok, 20, "{report}");
    assert!(tally.udp_lost_at_most_one_percent(), "{report}");
    assert!(tally.new_ok > 1000, "too little load: {report}");
    assert!(
        last.contains("UDP session(s) moved in"),
        "the last agent resumed nothing:\n{last}"
    );
}

/// A SIGTERM stops the agent to be replaced: it exits leaving its classifier and routes,
/// and until the next agent takes over, new connections of a rule that does not fail open
/// wait (their SYNs are dropped and resent), never go past the proxy.
#[test]
fn sigterm_then_a_start_lets_nothing_past_the_proxy() {
    require_root();
    let _serial = one_at_a_time();
    let gw = Gateway::new("sigterm").expect("topology");
    let mounts = Mounts::new(&gw.router);
    let origin = OriginServer::start(&gw.server, server(80));
    let agent = Agent::start_in(&mounts, &[AGENT_ARGS, &["--drain-timeout", "2"]].concat());
    let load = Load::start(&gw.client, 0, 0);
    std::thread::sleep(Duration::from_millis(500));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let (status, log) = agent.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{log}");
    // The gap: no agent runs, the classifier stays.
    std::thread::sleep(Duration::from_millis(1500));
    let next = Agent::start_in(&mounts, AGENT_ARGS);
    std::thread::sleep(Duration::from_secs(2));
    let tally = load.finish();
    let report = tally_report(&tally);
    let last = next.stop_ok();
    println!("{report}");
    assert_eq!(tally.new_direct, 0, "{report}");
    assert_eq!(origin.direct.load(Ordering::Relaxed), 0, "{report}");
    assert!(tally.new_ok > 200, "{report}");
    assert!(log.contains("stopping to be replaced"), "{log}");
    assert!(log.contains("left in place for the next agent"), "{log}");
    assert!(
        last.contains("taken over") || last.contains("replaced"),
        "the next agent did not take the classifier over:\n{last}"
    );
}

/// A successor that fails after taking the listeners (here: its `--metrics` port is
/// taken) leaves the running agent serving: it takes its listeners back.
#[test]
fn a_failed_successor_leaves_the_running_agent_serving() {
    require_root();
    let _serial = one_at_a_time();
    let gw = Gateway::new("hofail").expect("topology");
    let mounts = Mounts::new(&gw.router);
    let _origin = OriginServer::start(&gw.server, server(80));
    let agent = Agent::start_in(&mounts, AGENT_ARGS);
    let load = Load::start(&gw.client, 0, 2);
    // Something else holds the port the successor's --metrics wants.
    let blocker = gw
        .router
        .run(|| TcpListener::bind("127.0.0.1:9464"))
        .expect("netns")
        .expect("binding the blocker");
    let failed = Agent::spawn_in(
        &mounts,
        &[AGENT_ARGS, &["--metrics", "127.0.0.1:9464"]].concat(),
    );
    let (status, failed_log) = failed.wait_exit(Duration::from_secs(20));
    assert!(!status.success(), "{failed_log}");
    assert!(failed_log.contains("taking over from it"), "{failed_log}");
    agent
        .wait_for_line(
            &["handover failed, this agent serves on"],
            Duration::from_secs(10),
        )
        .unwrap_or_else(|| panic!("{}", agent.log_text()));
    std::thread::sleep(Duration::from_secs(1));
    drop(blocker);
    let tally = load.finish();
    let report = tally_report(&tally);
    println!("{report}");
    assert!(tally.new_failed.is_empty(), "{report}");
    assert!(tally.long_failed.is_empty(), "{report}");
    assert_eq!(tally.new_direct, 0, "{report}");
    let log = agent.stop_ok();
    assert!(log.contains("policy routing (IPv4) removed"), "{log}");
}

/// The running agent refuses a successor that speaks another handover version, with one
/// line, and serves on.
#[test]
fn a_successor_of_another_handover_version_is_refused() {
    require_root();
    let _serial = one_at_a_time();
    let gw = Gateway::new("hover").expect("topology");
    let mounts = Mounts::new(&gw.router);
    let _origin = OriginServer::start(&gw.server, server(80));
    let agent = Agent::start_in(&mounts, AGENT_ARGS);
    let answer = gw
        .router
        .run(|| {
            speak_handover(
                proxy_common::DEFAULT_TABLE,
                br#"{"type":"hello","version":999,"agent":"9.9.9","take_over":true}"#,
            )
        })
        .expect("netns");
    assert!(answer.contains("\"version\":1"), "{answer}");
    let line = agent
        .wait_for_line(&["handover refused", "version 999"], Duration::from_secs(5))
        .unwrap_or_else(|| panic!("{}", agent.log_text()));
    assert!(line.contains("this one version 1"), "{line}");
    let load = Load::start(&gw.client, 0, 0);
    std::thread::sleep(Duration::from_millis(500));
    let tally = load.finish();
    assert!(
        tally.new_ok > 20 && tally.new_failed.is_empty(),
        "{}",
        tally_report(&tally)
    );
    agent.stop_ok();
}

/// Sends `hello` as one record on the handover socket of `table`'s agent and returns the
/// JSON of its answer.
fn speak_handover(table: u32, hello: &[u8]) -> String {
    use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::empty(),
        None,
    )
    .expect("socket");
    let name = proxy_common::handover_socket_name(table);
    let addr = UnixAddr::new_abstract(name.as_bytes()).expect("address");
    socket::connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).expect("connect");
    let mut record = (hello.len() as u32).to_le_bytes().to_vec();
    record.extend_from_slice(hello);
    nix::unistd::write(&fd, &record).expect("send");
    let mut buf = vec![0u8; 4096];
    let n = nix::unistd::read(&fd, &mut buf).expect("receive");
    String::from_utf8_lossy(buf.get(4..n).unwrap_or_default()).into_owned()
}

/// Ten in-place upgrades in a row under load, as `systemctl reload` runs them: `proxy
/// upgrade` starts the binary with the running agent's arguments, the new agent takes
/// everything over and tells the service manager (here a datagram socket the test reads,
/// in systemd's notify protocol) that it is the main process now; the old agent exits.
/// Nothing is lost.
#[test]
fn ten_in_place_upgrades_under_load_lose_nothing() {
    require_root();
    let _serial = one_at_a_time();
    let gw = Gateway::new("upgrade").expect("topology");
    let mounts = Mounts::new(&gw.router);
    let _origin = OriginServer::start(&gw.server, server(80));
    let dir = common::TempDir::new("proxy-upgrade");
    let notify_path = dir.join("notify");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).expect("notify socket");
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let notify_env = (
        "NOTIFY_SOCKET",
        notify_path.to_str().expect("utf-8").to_owned(),
    );
    let first = Agent::start_in_with_env(&mounts, AGENT_ARGS, std::slice::from_ref(&notify_env));
    let _reaper = Reaper(gw.router.name.clone());
    let mut serving = first.pid();
    assert_eq!(
        notified(&notify),
        vec![format!("MAINPID={serving}"), "READY=1".into()]
    );
    let load = Load::start_with_udp(&gw.client, 50, 50, 20);
    std::thread::sleep(Duration::from_secs(1));
    let mut first = Some(first);
    for round in 0..10 {
        // Files, not pipes: the new agent inherits them and outlives `proxy upgrade`.
        let (log, out) = (
            dir.join(format!("agent-{round}.log")),
            dir.join(format!("upgrade-{round}.out")),
        );
        let status = mounts
            .command(env!("CARGO_BIN_EXE_proxy"))
            .arg("upgrade")
            .env(notify_env.0, &notify_env.1)
            .stdin(std::process::Stdio::null())
            .stdout(std::fs::File::create(&out).expect("output file"))
            .stderr(std::fs::File::create(&log).expect("log file"))
            .status()
            .expect("proxy upgrade");
        let said = std::fs::read_to_string(&out).unwrap_or_default();
        let agent_log = || std::fs::read_to_string(&log).unwrap_or_default();
        assert!(status.success(), "round {round}: {said}\n{}", agent_log());
        assert!(
            said.contains(&format!("took over from pid {serving}")),
            "round {round}: {said}"
        );
        let new: u32 = said
            .split("agent pid ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|pid| pid.parse().ok())
            .unwrap_or_else(|| panic!("round {round}: no pid in {said:?}"));
        assert_eq!(
            notified(&notify),
            vec![format!("MAINPID={new}"), "READY=1".into()],
            "round {round}"
        );
        if let Some(first) = first.take() {
            let (status, log) = first.wait_exit(Duration::from_secs(5));
            assert!(status.success(), "{log}");
        }
        assert!(
            !alive(serving),
            "round {round}: the old agent {serving} still runs"
        );
        serving = new;
        std::thread::sleep(Duration::from_millis(700));
    }
    let tally = load.finish();
    let report = tally_report(&tally);
    println!("{report}");
    // The last agent is nobody's child here: stopped for good by its pid.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serving as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(serving) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(serving), "the last agent did not stop");
    assert!(tally.new_failed.is_empty(), "{report}");
    assert_eq!(tally.new_direct, 0, "{report}");
    assert!(tally.new_slow.is_empty(), "{report}");
    assert!(tally.long_failed.is_empty(), "{report}");
    assert_eq!(tally.long_ok, 100, "{report}");
    assert!(tally.udp_failed.is_empty(), "{report}");
    assert_eq!(tally.udp_ok, 20, "{report}");
    assert!(tally.udp_lost_at_most_one_percent(), "{report}");
    let rules = common::ip_stdout(&gw.router, &["rule"]);
    assert!(
        !rules.contains("proto 211"),
        "the stop for good left rules:\n{rules}"
    );
}

/// The messages on the notify socket, one datagram (newline-separated assignments).
fn notified(socket: &std::os::unix::net::UnixDatagram) -> Vec<String> {
    let mut buf = [0u8; 1024];
    let n = socket.recv(&mut buf).expect("a notify message");
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .map(str::to_owned)
        .collect()
}

fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.split(' ').nth(2) == Some("Z"))
}

/// Agents started by `proxy upgrade` are nobody's children here: every agent left in the
/// namespace is killed on the way out, pass or fail.
struct Reaper(String);

impl Drop for Reaper {
    fn drop(&mut self) {
        use std::os::unix::fs::MetadataExt as _;
        let Ok(netns) = std::fs::metadata(format!("/run/netns/{}", self.0)) else {
            return;
        };
        let wanted = format!("net:[{}]", netns.ino());
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|p| p.parse::<i32>().ok())
            else {
                continue;
            };
            let in_it = std::fs::read_link(entry.path().join("ns/net"))
                .is_ok_and(|link| link.to_string_lossy() == wanted)
                && std::fs::read_to_string(entry.path().join("comm"))
                    .is_ok_and(|comm| comm.trim() == "proxy");
            if in_it && pid != std::process::id() as i32 {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// A successor whose rules no longer cover a live connection (here port 8080) still keeps it
/// going: like a reload, it looks the connections it took over up whatever its rules say,
/// until they end. (With TCP early demux on, the kernel finds the established socket before
/// routing anyway; routers often turn it off, and then only the classifier's lookup
/// delivers such a packet.)
#[test]
fn a_handover_to_new_rules_keeps_the_connections_they_leave_out() {
    require_root();
    let _serial = one_at_a_time();
    let gw = Gateway::new("horules").expect("topology");
    gw.router
        .sysctl("net.ipv4.tcp_early_demux", "0")
        .expect("sysctl");
    let mounts = Mounts::new(&gw.router);
    let _origin = OriginServer::start(&gw.server, server(80));
    let _other = OriginServer::start(&gw.server, server(8080));
    let both = [
        "run",
        "--iface",
        "r0",
        "--dport",
        "80,8080",
        "--on-port",
        "50080",
    ];
    let agent = Agent::start_in(&mounts, &both);
    let mut echo = Echo::open(&gw, 8080);
    assert_eq!(echo.ask("before").expect("before the handover"), "before");
    let next = Agent::start_in(
        &mounts,
        &[
            "run",
            "--iface",
            "r0",
            "--dport",
            "80",
            "--on-port",
            "50080",
        ],
    );
    let (status, log) = agent.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{log}");
    let after = echo.ask("after");
    let next_log = next.stop_ok();
    assert_eq!(
        after.as_deref().map_err(|e| e.kind()),
        Ok("after"),
        "the connection to port 8080 did not survive the handover:\n{next_log}"
    );
}

/// Handovers with a SOCKS5 upstream (Dante): the relays' upstream sockets are connections
/// to the SOCKS5 server, and each UDP session's association (its control connection, its
/// relay socket and the header) moves along, so each UDP flow keeps the relay's port.
#[test]
fn handovers_through_a_socks5_upstream_lose_nothing() {
    require_root();
    let _serial = one_at_a_time();
    let gw = Gateway::new("hosocks").expect("topology");
    let mounts = Mounts::new(&gw.router);
    let _origin = OriginServer::start(&gw.server, server(80));
    let _dante = common::Dante::start(&gw.router, "hosocks");
    let args = [AGENT_ARGS, &["--upstream", "socks5://127.0.0.1:1081"]].concat();
    let mut agent = Agent::start_in(&mounts, &args);
    let load = Load::start_with_udp(&gw.client, 5, 10, 5);
    std::thread::sleep(Duration::from_secs(1));
    for round in 0..3 {
        let next = Agent::start_in(&mounts, &args);
        let (status, log) = agent.wait_exit(Duration::from_secs(5));
        assert!(status.success(), "round {round}: {log}");
        agent = next;
        std::thread::sleep(Duration::from_millis(700));
    }
    let tally = load.finish();
    let report = tally_report(&tally);
    println!("{report}");
    agent.stop_ok();
    assert!(tally.new_failed.is_empty(), "{report}");
    assert_eq!(tally.new_direct, 0, "{report}");
    assert!(tally.long_failed.is_empty(), "{report}");
    assert_eq!(tally.long_ok, 15, "{report}");
    assert!(tally.udp_failed.is_empty(), "{report}");
    assert_eq!(tally.udp_ok, 5, "{report}");
    assert!(tally.udp_lost_at_most_one_percent(), "{report}");
}

/// Connections in the in-kernel relay (`--relay sockmap`) cannot move: their bytes are
/// moved by a program whose maps are the old agent's. They stay with it, which says how
/// many, keeps them going, and exits once they end (or its drain timeout passes).
#[test]
fn kernel_relays_stay_with_the_old_agent_until_they_end() {
    require_root();
    if common::kernel::kernel_lacks(common::kernel::Feature::SockmapRelay) {
        return;
    }
    let _serial = one_at_a_time();
    let gw = Gateway::new("hosockmap").expect("topology");
    let mounts = Mounts::new(&gw.router);
    let _origin = OriginServer::start(&gw.server, server(80));
    let args = [AGENT_ARGS, &["--relay", "sockmap", "--drain-timeout", "20"]].concat();
    let agent = Agent::start_in(&mounts, &args);
    let mut echo = Echo::open(&gw, 80);
    assert_eq!(echo.ask("before").expect("before the handover"), "before");
    let next = Agent::start_in(&mounts, &args);
    agent
        .wait_for_line(
            &["handover done", "in the in-kernel relay end"],
            Duration::from_secs(5),
        )
        .unwrap_or_else(|| panic!("{}", agent.log_text()));
    assert!(
        next.log_contains("1 stay with the previous agent"),
        "{}",
        next.log_text()
    );
    assert_eq!(echo.ask("during").expect("after the handover"), "during");
    // New connections go to the new agent meanwhile.
    let load = Load::start(&gw.client, 0, 0);
    std::thread::sleep(Duration::from_millis(500));
    let tally = load.finish();
    assert!(
        tally.new_ok > 50 && tally.new_failed.is_empty(),
        "{}",
        tally_report(&tally)
    );
    // The client closes: the relay ends, and with it the old agent.
    drop(echo);
    let started = Instant::now();
    let (status, log) = agent.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{log}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the old agent waited {:?} after its last connection ended",
        started.elapsed()
    );
    assert!(log.contains("drained: all connections closed"), "{log}");
    next.stop_ok();
}
