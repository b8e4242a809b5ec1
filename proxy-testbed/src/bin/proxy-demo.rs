//! `proxy-demo --agent PATH` (run by `cargo xtask demo`): the whole path on a throwaway
//! topology (see `proxy_testbed`).
//!
//! A server in its own namespace answers on ports 80 and 8080 with the address it sees the
//! connection from. The agent runs on the router and intercepts port 80 only. The client
//! connects to both: the port-80 replies come through the proxy (the server sees the
//! router), the port-8080 reply is routed untouched (the server sees the client). Then the
//! agent gets SIGTERM, prints its counters and cleans up, and the namespaces are removed.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener},
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
    let expected = args.connections as usize + 1;
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

    // Let the proxy finish logging the connections before it is stopped.
    std::thread::sleep(Duration::from_millis(200));
    println!(
        "== stopping the agent for good (SIGINT): it detaches, removes its rule and route, prints its counters"
    );
    let status = agent.stop(Duration::from_secs(10))?;
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

/// The demo server: answers `expected` connections over ports 80 and 8080, or stops after
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
            if let Ok((mut stream, peer)) = l.accept() {
                idle = false;
                served += 1;
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let local = stream
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                let mut request = String::new();
                let _ = BufReader::new(&stream).read_line(&mut request);
                let _ = writeln!(
                    stream,
                    "server {local} answered '{}' from {peer}",
                    request.trim()
                );
            }
        }
        if idle {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
