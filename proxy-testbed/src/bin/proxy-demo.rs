//! `proxy-demo --agent PATH` (run by `cargo xtask demo`): the whole path on a throwaway
//! topology (see `proxy_testbed`).
//!
//! A server in its own namespace answers on ports 80 and 8080 with the address it sees the
//! connection from. The agent runs on the router and intercepts port 80 only. The client
//! connects to both: the port-80 replies come through the proxy (the server sees the
//! router), the port-8080 reply is routed untouched (the server sees the client). Then a
//! second agent, started beside the first, takes over from it (the listener and an open
//! connection move; the connection goes on), gets SIGINT (stop for good), prints its
//! counters and cleans up, and the namespaces are removed.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::PathBuf,
    process::ExitCode,
    sync::mpsc,
    time::{Duration, Instant},
};

use clap::Parser as _;
use proxy_testbed::{self as testbed, AgentError, AgentProcess, Gateway, TestbedError, exchange};

#[derive(clap::Parser)]
#[command(
    name = "proxy-demo",
    about = "Build a throwaway client / router / server topology in network namespaces, run \
             the agent on the router, send a few connections through it and remove everything"
)]
struct DemoArgs {
    /// The agent binary (target/release/proxy).
    #[arg(long, value_name = "PATH")]
    agent: PathBuf,
    /// Number of connections the demo client makes through the proxy.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    connections: u32,
}

fn main() -> ExitCode {
    match run(&DemoArgs::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proxy-demo: error: {}", proxy_common::error_chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// The demo failed.
#[derive(Debug, thiserror::Error)]
enum DemoError {
    #[error(transparent)]
    Testbed(#[from] TestbedError),
    /// Starting, waiting for or stopping the agent failed; its log was printed as it came.
    #[error("the agent (its log is above)")]
    Agent(#[from] AgentError),
    #[error("the agent exited with {0}")]
    AgentFailed(std::process::ExitStatus),
    /// The kept connection could not be made.
    #[error("the client's kept connection")]
    Client(#[source] std::io::Error),
}

/// One line over the kept connection, and the server's answer, printed.
fn ask(stream: &mut TcpStream, line: &str) {
    let answer = writeln!(stream, "{line}").and_then(|()| {
        let mut answer = String::new();
        BufReader::new(&*stream).read_line(&mut answer)?;
        Ok(answer)
    });
    match answer {
        Ok(reply) if !reply.is_empty() => println!("   client | reply: {}", reply.trim()),
        Ok(_) => println!("   client | the connection was closed"),
        Err(e) => println!("   client | the connection failed: {e}"),
    }
}

const INTERCEPTED_PORT: u16 = 80;
const DIRECT_PORT: u16 = 8080;
const ON_PORT: u16 = 50080;

fn run(args: &DemoArgs) -> Result<(), DemoError> {
    println!(
        "== building namespaces: client {} -- router -- server {}",
        testbed::CLIENT_V4,
        testbed::SERVER_V4
    );
    let gw = Gateway::new("demo")?;

    let server_ready = mpsc::channel();
    // The intercepted ones, the direct one, and the one kept open across the handover.
    let expected = args.connections as usize + 2;
    let ready_tx = server_ready.0;
    let server = gw.server.spawn(move || serve(expected, ready_tx));
    let _ = server_ready.1.recv_timeout(Duration::from_secs(5));

    let (dport, on_port) = (INTERCEPTED_PORT.to_string(), ON_PORT.to_string());
    let command = [
        "run",
        "--iface",
        testbed::ROUTER_CLIENT_IFACE,
        "--dport",
        &dport,
        "--on-port",
        &on_port,
    ];
    println!(
        "== starting the agent in the router namespace: proxy {}",
        command.join(" ")
    );
    let mut agent_command = gw.router.command(&args.agent);
    agent_command.args(command).env(
        "RUST_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
    );
    let mut agent = AgentProcess::spawn_echoing(agent_command, &gw.router.name, "    agent | ")?;
    agent.wait_ready(Duration::from_secs(20))?;
    let server_addr = SocketAddr::from((testbed::SERVER_V4, INTERCEPTED_PORT));
    let mut kept = gw
        .client
        .run(move || TcpStream::connect_timeout(&server_addr, Duration::from_secs(3)))?
        .map_err(DemoError::Client)?;
    let _ = kept.set_read_timeout(Some(Duration::from_secs(5)));

    println!(
        "== client: {} connections to {}:{INTERCEPTED_PORT} (intercepted)",
        args.connections,
        testbed::SERVER_V4
    );
    let server_v4 = testbed::SERVER_V4;
    let connections = args.connections;
    gw.client.run(move || {
        for i in 0..connections {
            let started = Instant::now();
            match exchange(
                SocketAddr::from((server_v4, INTERCEPTED_PORT)),
                format!("request {i}\n").as_bytes(),
            ) {
                Ok(reply) => println!(
                    "   client | reply in {:.1} ms: {}",
                    started.elapsed().as_secs_f64() * 1e3,
                    reply.trim()
                ),
                Err(e) => println!("   client | connection failed: {e}"),
            }
        }
        println!("== client: one connection to {server_v4}:{DIRECT_PORT} (not intercepted)");
        match exchange(SocketAddr::from((server_v4, DIRECT_PORT)), b"direct\n") {
            Ok(reply) => println!("   client | reply: {}", reply.trim()),
            Err(e) => println!("   client | connection failed: {e}"),
        }
    })?;

    println!("== client: a connection kept open to {server_addr} (intercepted)");
    ask(&mut kept, "before the upgrade");
    // Let the proxy finish logging the connections before the next step.
    std::thread::sleep(Duration::from_millis(200));
    println!(
        "== upgrading: a second agent, started beside the first, takes its listener and the \
         open connection over; the first exits without removing anything"
    );
    let mut next_command = gw.router.command(&args.agent);
    next_command.args(command).env(
        "RUST_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
    );
    let mut next = AgentProcess::spawn_echoing(next_command, &gw.router.name, "next agent | ")?;
    next.wait_ready(Duration::from_secs(20))?;
    let first = agent.wait_exit(Duration::from_secs(10))?;
    if !first.success() {
        return Err(DemoError::AgentFailed(first));
    }
    println!("== client: the same connection, now through the second agent");
    ask(&mut kept, "after the upgrade");
    drop(kept);
    std::thread::sleep(Duration::from_millis(200));
    println!(
        "== stopping the agent for good (SIGINT): it detaches, removes its rule and route, prints its counters"
    );
    let status = next.stop(Duration::from_secs(10))?;
    let _ = server.join();

    println!("== after the agent: policy rules left in the router namespace:");
    match gw.router.ip(&["rule", "show"]) {
        Ok(out) => print!("{}", indent(&String::from_utf8_lossy(&out.stdout))),
        Err(e) => println!("   {e}"),
    }
    drop(gw);
    println!("== namespaces removed");
    if !status.success() {
        return Err(DemoError::AgentFailed(status));
    }
    Ok(())
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("   {l}\n")).collect()
}

/// Answers each line of a connection (at most 10, each within 5 s) with the addresses.
fn answer_lines(stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let local = stream
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    for request in BufReader::new(stream)
        .lines()
        .take(10)
        .map_while(Result::ok)
    {
        if writeln!(
            writer,
            "server {local} answered '{}' from {peer}",
            request.trim()
        )
        .is_err()
        {
            return;
        }
    }
}

/// The demo server: accepts `expected` connections over ports 80 and 8080, or stops after
/// 30 s, whichever comes first.
fn serve(expected: usize, ready: mpsc::Sender<()>) {
    let listeners: Vec<TcpListener> = [INTERCEPTED_PORT, DIRECT_PORT]
        .iter()
        .filter_map(|&port| TcpListener::bind(("0.0.0.0", port)).ok())
        .collect();
    for l in &listeners {
        let _ = l.set_nonblocking(true);
    }
    let _ = ready.send(());
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut served = 0;
    while served < expected && Instant::now() < deadline {
        let mut idle = true;
        for l in &listeners {
            if let Ok((stream, peer)) = l.accept() {
                idle = false;
                served += 1;
                std::thread::spawn(move || answer_lines(stream, peer));
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
