//! Load generators: one server in the server namespace (a child process), clients in the
//! client namespace (threads of the bench).
//!
//! Every connection goes to `SERVER_V4:80` (the port the proxy intercepts), except those of
//! the `--local` figure to a port no rule covers, `SERVER_V4:81`. The first byte a client
//! sends says what it wants:
//! * `S` (sink): the server reads to EOF and answers with the byte count (8 bytes, LE);
//! * `P` (probe): the server answers with the peer address it sees, and closes;
//! * `R` (request/response): the server answers each `REQUEST` bytes with `RESPONSE` bytes
//!   until EOF;
//! * `U` (UDP count): the server answers with the number of datagrams its UDP sinks counted
//!   (8 bytes, LE).
//!
//! The server also takes UDP datagrams on ports 80 and 81: it counts those of the UDP rate
//! figures and echoes the others (`udp_rate`).
//!
//! Every loop is bounded in count and in time, and stops early when [`crate::stopped`].

use std::{
    future::Future,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, SocketAddr},
    process::{Child, Stdio},
    sync::{
        Arc, Barrier,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, unshare};
use proxy_testbed::{Netns, SERVER_V4};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, TcpStream},
    runtime::Runtime,
    sync::Semaphore,
};

use crate::{stopped, udp_rate};

/// The intercepted port.
pub const PORT: u16 = 80;
/// A port the server also listens on (TCP and UDP) and no rule of the bench covers: the
/// `--local` figure's connections that the connect program sees and leaves alone, and the
/// pass-through figure's traffic.
pub const OTHER_PORT: u16 = 81;
pub const REQUEST: usize = 64;
pub const RESPONSE: usize = 64;
/// No server connection lives longer than this, whatever the client does.
const SERVER_CONN_LIFETIME: Duration = Duration::from_secs(180);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const IO_TIMEOUT: Duration = Duration::from_secs(5);

pub fn server_addr() -> SocketAddr {
    SocketAddr::from((SERVER_V4, PORT))
}

/// Moves the calling thread into the named network namespace.
pub fn enter_ns(name: &str) -> io::Result<()> {
    proxy_testbed::enter(name).map_err(io::Error::other)
}

/// A tokio runtime whose every thread lives in one network namespace.
pub struct NsRuntime {
    rt: Option<Runtime>,
}

impl NsRuntime {
    pub fn new(ns: &str, workers: usize) -> io::Result<Self> {
        let name = ns.to_owned();
        let failed = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&failed);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .thread_name("bench-load")
            .on_thread_start(move || {
                if enter_ns(&name).is_err() {
                    flag.store(true, Ordering::SeqCst);
                    // Never leave a load thread in the host's namespace: isolate it in an
                    // empty one of its own, where it cannot reach anything.
                    if unshare(CloneFlags::CLONE_NEWNET).is_err() {
                        std::process::abort();
                    }
                }
            })
            .build()?;
        if failed.load(Ordering::SeqCst) {
            return Err(io::Error::other(format!(
                "load threads could not enter namespace {ns}"
            )));
        }
        Ok(NsRuntime { rt: Some(rt) })
    }

    fn rt(&self) -> &Runtime {
        self.rt.as_ref().expect("runtime present until drop")
    }

    /// Runs `f` as a task on the namespace's threads and waits for it.
    pub fn run<F>(&self, f: F) -> F::Output
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let handle = self.rt().spawn(f);
        match self.rt().block_on(handle) {
            Ok(v) => v,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("load task cancelled: {e}"),
        }
    }
}

impl Drop for NsRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// The server: a child process (this binary, `--serve`) in the server namespace, so that
/// its descriptors do not count against the bench's own open-files limit (10,000 idle
/// connections take 10,000 on each side). It exits when its stdin closes (the bench ended,
/// however) or after `lifetime`.
pub struct Server {
    child: Option<Child>,
}

impl Server {
    pub fn start(ns: &Netns, lifetime: Duration) -> Result<Server, String> {
        let exe = std::env::current_exe().map_err(|e| format!("finding this binary: {e}"))?;
        let mut child = ns
            .command(exe)
            .args(["--serve", &lifetime.as_secs().to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("starting the server: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let mut server = Server { child: Some(child) };
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(line) if line.starts_with("listening") => Ok(server),
            Ok(line) => {
                server.stop();
                Err(format!("the server did not start: {}", line.trim()))
            }
            Err(_) => {
                server.stop();
                Err("the server did not start within 10 s".into())
            }
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The server process's main (`proxy-bench --serve SECONDS`), already inside the server
/// namespace (`ip netns exec`).
pub fn serve_main(lifetime_secs: u64) -> Result<(), String> {
    // Ends with the bench: stdin closes when the bench exits, whatever the cause.
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().read_to_end(&mut sink);
        std::process::exit(0);
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("server runtime: {e}"))?;
    rt.block_on(async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(lifetime_secs);
        for port in [PORT, OTHER_PORT] {
            let addr = SocketAddr::from((SERVER_V4, port));
            let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
            socket.set_reuseaddr(true).map_err(|e| e.to_string())?;
            socket
                .bind(addr)
                .map_err(|e| format!("binding {addr}: {e}"))?;
            let listener = socket.listen(4096).map_err(|e| e.to_string())?;
            tokio::spawn(accept_loop(listener, deadline));
            udp_rate::start_sink(port, deadline.into_std())?;
        }
        println!("listening on {SERVER_V4}, ports {PORT} and {OTHER_PORT} (tcp and udp)");
        let _ = std::io::stdout().flush();
        tokio::time::sleep_until(deadline).await;
        Err("server lifetime reached".to_owned())
    })
}

/// Serves each connection `listener` accepts, until `deadline` (the server's lifetime).
async fn accept_loop(listener: tokio::net::TcpListener, deadline: tokio::time::Instant) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(SERVER_CONN_LIFETIME, serve(stream, peer)).await;
                    });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
            },
            () = tokio::time::sleep_until(deadline) => return,
        }
    }
}

async fn serve(mut stream: TcpStream, peer: SocketAddr) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    stream.read_exact(&mut mode).await?;
    match mode[0] {
        b'P' => stream.write_all(peer.ip().to_string().as_bytes()).await?,
        udp_rate::COUNT_REQUEST => {
            stream
                .write_all(&udp_rate::received().to_le_bytes())
                .await?;
        }
        b'S' => {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            stream.write_all(&total.to_le_bytes()).await?;
        }
        b'R' => {
            let mut request = [0u8; REQUEST];
            let response = [b'r'; RESPONSE];
            loop {
                match stream.read_exact(&mut request).await {
                    Ok(_) => stream.write_all(&response).await?,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
            }
        }
        _ => {}
    }
    Ok(())
}

/// Bulk TCP to the intercepted port: see [`bulk_to`].
pub fn bulk(client_ns: &str, streams: usize, duration: Duration) -> io::Result<f64> {
    bulk_to(client_ns, server_addr(), streams, duration)
}

/// Bulk TCP: `streams` connections to `addr` each send for `duration`; returns bits per
/// second received by the server (counted by the server, so nothing still in flight is
/// counted).
pub fn bulk_to(
    client_ns: &str,
    addr: SocketAddr,
    streams: usize,
    duration: Duration,
) -> io::Result<f64> {
    let barrier = Arc::new(Barrier::new(streams + 1));
    let handles: Vec<_> = (0..streams)
        .map(|_| {
            let ns = client_ns.to_owned();
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || -> io::Result<(u64, Instant)> {
                let entered = enter_ns(&ns);
                // The barrier is always reached, so the others never wait forever.
                let stream = entered.and_then(|()| {
                    let s = std::net::TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
                    s.set_write_timeout(Some(IO_TIMEOUT))?;
                    s.set_read_timeout(Some(Duration::from_secs(15)))?;
                    Ok(s)
                });
                barrier.wait();
                let mut stream = stream?;
                let deadline = Instant::now() + duration;
                let buf = vec![b'x'; 128 * 1024];
                stream.write_all(b"S")?;
                let mut chunks = 0u64;
                // Bounded by time, and by count as a backstop (1 TiB).
                while Instant::now() < deadline && !stopped() && chunks < 8 * 1024 * 1024 {
                    stream.write_all(&buf)?;
                    chunks += 1;
                }
                stream.shutdown(Shutdown::Write)?;
                let mut count = [0u8; 8];
                stream.read_exact(&mut count)?;
                Ok((u64::from_le_bytes(count), Instant::now()))
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut end = start;
    for h in handles {
        let (n, done) = h
            .join()
            .map_err(|_| io::Error::other("bulk thread panicked"))??;
        bytes += n;
        end = end.max(done);
    }
    let secs = end.duration_since(start).as_secs_f64();
    Ok(bytes as f64 * 8.0 / secs)
}

/// One outcome of [`conn_rate`].
pub struct ConnRate {
    pub per_sec: f64,
    /// Connections completed.
    pub completed: u64,
    pub errors: u64,
    /// Time from connect to the response of each completed connection, microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
}

/// What [`conn_rate_with`] does.
pub struct ConnLoad {
    pub addr: SocketAddr,
    pub concurrency: usize,
    pub duration: Duration,
    /// Close with a reset (`SO_LINGER` 0) instead of a FIN: the client leaves no TIME_WAIT
    /// socket behind to weigh on the runs that follow.
    pub reset_close: bool,
}

/// New connections per second: `concurrency` loops each connect, send one request, read
/// the response and close, for `duration`.
pub fn conn_rate(client: &NsRuntime, concurrency: usize, duration: Duration) -> ConnRate {
    conn_rate_with(
        client,
        ConnLoad {
            addr: server_addr(),
            concurrency,
            duration,
            reset_close: false,
        },
    )
}

/// [`conn_rate`] to any address of the server, closing either way.
pub fn conn_rate_with(client: &NsRuntime, load: ConnLoad) -> ConnRate {
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let (ok2, errors2) = (Arc::clone(&ok), Arc::clone(&errors));
    let ConnLoad {
        addr,
        concurrency,
        duration,
        reset_close,
    } = load;
    let (elapsed, mut times) = client.run(async move {
        let start = Instant::now();
        let deadline = start + duration;
        let tasks: Vec<_> = (0..concurrency)
            .map(|_| {
                let (ok, errors) = (Arc::clone(&ok2), Arc::clone(&errors2));
                tokio::spawn(async move {
                    let mut request = [b'q'; REQUEST + 1];
                    request[0] = b'R';
                    let mut times = Vec::new();
                    // Bounded by time, and by count as a backstop.
                    for _ in 0..10_000_000u32 {
                        let t = Instant::now();
                        if t >= deadline || stopped() {
                            break;
                        }
                        let once = exchange_once(addr, &request, reset_close);
                        match tokio::time::timeout(IO_TIMEOUT, once).await {
                            Ok(Ok(())) => {
                                times.push(t.elapsed().as_secs_f64() * 1e6);
                                ok.fetch_add(1, Ordering::Relaxed)
                            }
                            _ => {
                                tokio::time::sleep(Duration::from_millis(5)).await;
                                errors.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                    times
                })
            })
            .collect();
        let mut times = Vec::new();
        for t in tasks {
            times.extend(t.await.unwrap_or_default());
        }
        (start.elapsed(), times)
    });
    times.sort_by(f64::total_cmp);
    ConnRate {
        per_sec: ok.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64(),
        completed: ok.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        p50_us: percentile(&times, 0.50),
        p99_us: percentile(&times, 0.99),
    }
}

async fn exchange_once(addr: SocketAddr, request: &[u8], reset_close: bool) -> io::Result<()> {
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    stream.write_all(request).await?;
    let mut response = [0u8; RESPONSE];
    stream.read_exact(&mut response).await?;
    if reset_close {
        stream.set_zero_linger()?;
    }
    Ok(())
}

/// The address the server sees a connection come from (the client itself when routed, the
/// router when proxied).
pub fn probe(client_ns: &str) -> io::Result<String> {
    let ns = client_ns.to_owned();
    std::thread::spawn(move || -> io::Result<String> {
        enter_ns(&ns)?;
        let mut stream = std::net::TcpStream::connect_timeout(&server_addr(), CONNECT_TIMEOUT)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.write_all(b"P")?;
        let mut peer = String::new();
        stream.read_to_string(&mut peer)?;
        Ok(peer)
    })
    .join()
    .map_err(|_| io::Error::other("probe thread panicked"))?
}

/// Round-trip times in microseconds of `samples` request/response exchanges on one kept
/// connection, after `warmup` unrecorded ones. Returns (p50, p99).
pub fn latency(client_ns: &str, warmup: usize, samples: usize) -> io::Result<(f64, f64)> {
    let ns = client_ns.to_owned();
    let handle = std::thread::spawn(move || -> io::Result<(f64, f64)> {
        enter_ns(&ns)?;
        let mut stream = std::net::TcpStream::connect_timeout(&server_addr(), CONNECT_TIMEOUT)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.write_all(b"R")?;
        let request = [b'q'; REQUEST];
        let mut response = [0u8; RESPONSE];
        let mut rtts = Vec::with_capacity(samples);
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in 0..warmup + samples {
            if stopped() || Instant::now() > deadline {
                return Err(io::Error::other("latency run stopped before the end"));
            }
            let t = Instant::now();
            stream.write_all(&request)?;
            stream.read_exact(&mut response)?;
            if i >= warmup {
                rtts.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        rtts.sort_by(f64::total_cmp);
        Ok((percentile(&rtts, 0.50), percentile(&rtts, 0.99)))
    });
    handle
        .join()
        .map_err(|_| io::Error::other("latency thread panicked"))?
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Opens `count` connections, each after one request/response exchange (so the proxy has
/// connected upstream and is relaying), and keeps them open, idle. Returns the streams and
/// the number of failures.
pub fn open_idle(
    client: &NsRuntime,
    count: usize,
    concurrency: usize,
) -> (Vec<std::net::TcpStream>, usize) {
    client.run(async move {
        let permits = Arc::new(Semaphore::new(concurrency));
        let deadline = Instant::now() + Duration::from_secs(120);
        let tasks: Vec<_> = (0..count)
            .map(|_| {
                let permits = Arc::clone(&permits);
                tokio::spawn(async move {
                    let _permit = permits.acquire_owned().await.ok()?;
                    if stopped() || Instant::now() > deadline {
                        return None;
                    }
                    let mut request = [b'q'; REQUEST + 1];
                    request[0] = b'R';
                    let opened = tokio::time::timeout(IO_TIMEOUT, async {
                        let mut stream = TcpStream::connect(server_addr()).await?;
                        stream.write_all(&request).await?;
                        let mut response = [0u8; RESPONSE];
                        stream.read_exact(&mut response).await?;
                        stream.into_std()
                    })
                    .await;
                    opened.ok()?.ok()
                })
            })
            .collect();
        let mut streams = Vec::with_capacity(count);
        let mut failed = 0;
        for t in tasks {
            match t.await {
                Ok(Some(s)) => streams.push(s),
                _ => failed += 1,
            }
        }
        (streams, failed)
    })
}
