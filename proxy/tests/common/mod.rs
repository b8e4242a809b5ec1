//! Helpers shared by the kernel tests: the agent as a child process in the router
//! namespace, a small TCP server, and a client exchange. Every wait is bounded.

#![allow(
    dead_code,
    unused_imports,
    reason = "each test binary uses a different subset"
)]

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use proxy_testbed::{AgentProcess, Netns};

/// Kernel tests need root; without it they fail, loudly, instead of passing by skipping.
pub fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test creates network namespaces and loads eBPF programs: run it as root (cargo xtask test)"
    );
}

/// The agent binary, running in a namespace, with its log collected: the testbed's
/// [`AgentProcess`], failing the test (with the agent's log) where it returns an error.
pub struct Agent(AgentProcess);

impl Agent {
    /// Starts `proxy ARGS` in `ns` and returns once it is ready (it answers on its stats
    /// socket), or panics with its log.
    pub fn start(ns: &Netns, args: &[&str]) -> Agent {
        Agent::spawn(ns, args).ready()
    }

    fn ready(mut self) -> Agent {
        if let Err(e) = self.0.wait_ready(kernel::patience(Duration::from_secs(20))) {
            panic!("{e}:\n{}", self.0.log_text());
        }
        self
    }

    /// Starts `proxy ARGS` in `ns` without waiting for anything.
    pub fn spawn(ns: &Netns, args: &[&str]) -> Agent {
        Agent::spawn_command(ns.command(env!("CARGO_BIN_EXE_proxy")), &ns.name, args)
    }

    /// [`Agent::start`] in the mount namespace `mounts` keeps, where the bpffs the agent
    /// mounts (and its pins) outlive it.
    pub fn start_in(mounts: &Mounts, args: &[&str]) -> Agent {
        Agent::spawn_command(
            mounts.command(env!("CARGO_BIN_EXE_proxy")),
            &mounts.netns,
            args,
        )
        .ready()
    }

    /// [`Agent::start_in`] with more environment variables.
    pub fn start_in_with_env(mounts: &Mounts, args: &[&str], env: &[(&str, String)]) -> Agent {
        let mut command = mounts.command(env!("CARGO_BIN_EXE_proxy"));
        command.envs(env.iter().map(|(k, v)| (k, v)));
        Agent::spawn_command(command, &mounts.netns, args).ready()
    }

    /// [`Agent::start_in`] without waiting for anything.
    pub fn spawn_in(mounts: &Mounts, args: &[&str]) -> Agent {
        Agent::spawn_command(
            mounts.command(env!("CARGO_BIN_EXE_proxy")),
            &mounts.netns,
            args,
        )
    }

    /// [`Agent::start_in`], the agent binary run by `wrapper` (a program and its
    /// arguments, which must exec it: `setpriv ... --`), for another user or capabilities.
    pub fn start_in_wrapped(mounts: &Mounts, wrapper: &[&str], args: &[&str]) -> Agent {
        let (program, wrapper_args) = wrapper.split_first().expect("a wrapper program");
        let mut command = mounts.command(program);
        command.args(wrapper_args).arg(env!("CARGO_BIN_EXE_proxy"));
        Agent::spawn_command(command, &mounts.netns, args).ready()
    }

    /// [`Agent::start`] with the agent's stdout (where `--access-log json` writes) sent
    /// to the file `stdout`.
    pub fn start_with_stdout(ns: &Netns, args: &[&str], stdout: &std::path::Path) -> Agent {
        let mut command = ns.command("sh");
        // The shell execs the agent: the child's pid stays the agent's.
        command
            .arg("-c")
            .arg(format!("exec \"$0\" \"$@\" > '{}'", stdout.display()))
            .arg(env!("CARGO_BIN_EXE_proxy"));
        Agent::spawn_command(command, &ns.name, args).ready()
    }

    /// Starts `command ARGS` (the agent binary, wrapped to enter the network namespace
    /// `netns`).
    fn spawn_command(mut command: Command, netns: &str, args: &[&str]) -> Agent {
        command
            .args(args)
            // AGENT_LOG=debug in the test's environment, to see more when a test fails.
            .env(
                "RUST_LOG",
                std::env::var("AGENT_LOG").unwrap_or_else(|_| "info".into()),
            );
        Agent(AgentProcess::spawn(command, netns).expect("spawning the agent"))
    }

    /// The agent's process id (for signals), 0 once it has exited.
    pub fn pid(&self) -> u32 {
        self.0.pid().unwrap_or(0)
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.0.log_contains(needle)
    }

    pub fn log_text(&self) -> String {
        self.0.log_text()
    }

    /// The log after a pause that lets the agent's last lines through (its stderr is read
    /// on a thread): for a failure message written right after the failure.
    pub fn settled_log(&self) -> String {
        std::thread::sleep(Duration::from_millis(300));
        self.log_text()
    }

    /// Waits up to `timeout` for a log line containing every needle.
    pub fn wait_for_line(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        self.0.wait_for_line(needles, timeout)
    }

    /// Waits for the process to exit on its own (bounded), returning its status and log.
    pub fn wait_exit(mut self, timeout: Duration) -> (ExitStatus, String) {
        match self.0.wait_exit(timeout) {
            Ok(status) => (status, self.log_text()),
            Err(e) => panic!("{e}:\n{}", self.log_text()),
        }
    }

    /// Stops the agent, checks that it exited cleanly, and returns its log.
    pub fn stop_ok(self) -> String {
        let (status, log) = self.stop();
        assert!(status.success(), "agent exit: {status}\n{log}");
        log
    }

    /// SIGINT, the stop for good (a second one after 5 s, SIGKILL after 10 s), then the exit status and the
    /// full log.
    pub fn stop(mut self) -> (ExitStatus, String) {
        match self.0.stop(Duration::from_secs(5)) {
            Ok(status) => (status, self.log_text()),
            Err(e) => panic!("stopping the agent: {e}:\n{}", self.log_text()),
        }
    }
}

/// Parses the `counters: name=value ...` line the agent logs on exit.
pub fn counter(log: &str, name: &str) -> u64 {
    let line = log
        .lines()
        .find(|l| l.contains(" counters: "))
        .unwrap_or_else(|| panic!("no counters line in the agent log:\n{log}"));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no counter {name} in {line}"))
}

/// How the test server treats each connection.
#[derive(Clone, Copy)]
pub enum ServerMode {
    /// Reads the request to EOF, answers `peer=<addr> local=<addr>` and closes.
    Reply,
    /// Sends `bye` and closes at once: the server closes first, so the proxy's side of
    /// the client connection is the one that ends in TIME_WAIT.
    CloseFirst,
    /// Answers each line with `peer=<addr> echo=<line>` until EOF, for long-lived
    /// connections.
    Echo,
}

/// `proxy run` intercepting TCP port 80 arriving on the router's client side, for the
/// built-in listener on port 50080: the set-up most kernel tests start from.
pub const AGENT_ARGS: &[&str] = &[
    "run",
    "--iface",
    "r0",
    "--dport",
    "80",
    "--on-port",
    "50080",
];

/// `proxy run` intercepting UDP port 53 for the built-in UDP listener on port 5353.
pub const UDP_AGENT_ARGS: &[&str] = &[
    "run",
    "--iface",
    "r0",
    "--protocol",
    "udp",
    "--dport",
    "53",
    "--on-port",
    "5353",
];

/// A TCP server on a thread inside a namespace; stops when dropped.
pub struct Server {
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    thread: Option<JoinHandle<Result<(), proxy_testbed::TestbedError>>>,
}

impl Server {
    pub fn start(ns: &Netns, addr: SocketAddr, mode: ServerMode) -> Server {
        let stop = Arc::new(AtomicBool::new(false));
        let (ready_tx, ready_rx) = mpsc::channel();
        let flag = Arc::clone(&stop);
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&accepted);
        let thread = ns.spawn(move || {
            let listener = TcpListener::bind(addr).expect("binding the test server");
            listener.set_nonblocking(true).expect("nonblocking");
            ready_tx.send(()).expect("ready");
            let deadline = Instant::now() + Duration::from_secs(120);
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        count.fetch_add(1, Ordering::Relaxed);
                        std::thread::spawn(move || answer(stream, peer, mode));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("test server did not start");
        Server {
            stop,
            accepted,
            thread: Some(thread),
        }
    }

    /// Connections accepted so far: what reached the origin, proxied or not.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

fn answer(mut stream: TcpStream, peer: SocketAddr, mode: ServerMode) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
    match mode {
        ServerMode::Reply => {
            let mut request = Vec::new();
            let _ = stream.read_to_end(&mut request);
            let local = stream
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            let _ = write!(stream, "peer={peer} local={local} got={}", request.len());
        }
        ServerMode::CloseFirst => {
            let _ = stream.write_all(b"bye");
        }
        ServerMode::Echo => {
            let Ok(reader) = stream.try_clone() else {
                return;
            };
            for line in BufReader::new(reader)
                .lines()
                .take(1000)
                .map_while(Result::ok)
            {
                if writeln!(stream, "peer={peer} echo={line}").is_err() {
                    return;
                }
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub use proxy_testbed::exchange;

/// The test server's IPv4 address and `port`.
pub fn server(port: u16) -> SocketAddr {
    SocketAddr::from((proxy_testbed::SERVER_V4, port))
}

/// `ip -n NS ARGS`' output, for comparing rules and routes before and after.
pub fn ip_stdout(ns: &Netns, args: &[&str]) -> String {
    let out = ns.ip(args).unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `n` rules-file entries for /24 prefixes under 10.0.0.0/8 that no test traffic goes to,
/// rule `i` with destination ports `dport(i)`: rules that shift the index of the ones that
/// matter, or fill a report.
pub fn unused_prefix_rules(n: u32, dport: impl Fn(u32) -> String) -> String {
    (0..n)
        .map(|i| {
            format!(
                "[[rule]]\ndst = [\"10.{}.{}.0/24\"]\ndport = \"{}\"\n",
                i / 256,
                i % 256,
                dport(i)
            )
        })
        .collect()
}

/// How many descriptors process `pid` holds.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// `tc ARGS`' output in `ns` (qdiscs and filters, before and after).
pub fn tc_stdout(ns: &Netns, args: &[&str]) -> String {
    let out = ns
        .command("tc")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("tc {args:?}: {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One exchange (`testbed::exchange`) from the client namespace to `addr`; panics if it
/// fails.
pub fn exchange_from_client(
    gw: &proxy_testbed::Gateway,
    addr: SocketAddr,
    payload: &[u8],
) -> String {
    gw.client
        .run(|| exchange(addr, payload))
        .expect("entering the client namespace")
        .unwrap_or_else(|e| panic!("exchange with {addr}: {e}"))
}

/// A kept connection from the client namespace to the test server's `port` (through the
/// proxy when a rule covers it), with a 5 s read timeout; panics with `context` if the
/// connect fails.
pub fn connect_kept(
    gw: &proxy_testbed::Gateway,
    port: u16,
    context: &dyn Fn() -> String,
) -> TcpStream {
    let stream = gw
        .client
        .run(move || TcpStream::connect_timeout(&server(port), Duration::from_secs(3)))
        .expect("entering the client namespace")
        .unwrap_or_else(|e| panic!("connect: {e}\n{}", context()));
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("read timeout");
    stream
}

/// One line over a kept connection: send `line`, read the (trimmed) answer line.
pub fn ask(stream: &mut TcpStream, line: &str) -> String {
    writeln!(stream, "{line}").expect("write");
    let mut answer = String::new();
    BufReader::new(stream.try_clone().expect("clone"))
        .read_line(&mut answer)
        .expect("read");
    answer.trim().to_owned()
}

/// Connects, sends one line and reads one line back (for servers that answer per line and
/// SOCKS servers that do not pass half-closes on).
pub fn ask_line(addr: SocketAddr, line: &str) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    writeln!(stream, "{line}")?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    Ok(answer.trim().to_owned())
}

/// A mount namespace for the agents of a test, in the namespace `ns`, kept by a holder
/// process that mounts bpffs at /sys/fs/bpf there, as systemd does on a host: it (and the
/// pins in it) outlives the agent, as the host's /sys/fs/bpf does, and the agent attaches
/// as on a host (TCX links with `--tc-attach auto`). (`ip netns exec` gives each process tree a mount
/// namespace of its own, which dies with the agent and takes its pins along.) /sys in it is
/// a sysfs of `ns`, as under `ip netns exec`. Dropping it removes every pin in it and ends the
/// holder: the namespace and its bpffs go with the last process in it, pass or fail.
pub struct Mounts {
    holder: Child,
    /// The network namespace's name.
    netns: String,
}

impl Mounts {
    pub fn new(ns: &Netns) -> Mounts {
        let mut holder = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", ns.name))
            .args(["unshare", "--mount", "--propagation", "private", "sh", "-c"])
            .arg(
                "umount -l /sys && mount -t sysfs sysfs /sys && mount -t bpf bpf /sys/fs/bpf \
                 && echo ready && exec sleep 600",
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawning the mount namespace holder (nsenter, unshare)");
        let mut line = String::new();
        let stdout = holder.stdout.take().expect("piped stdout");
        let _ = BufReader::new(stdout).read_line(&mut line);
        let mounts = Mounts {
            holder,
            netns: ns.name.clone(),
        };
        assert_eq!(line.trim(), "ready", "the mount namespace holder failed");
        mounts
    }

    /// `program`, run inside the namespace's network and mount namespaces.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args([
            "--target",
            &self.holder.id().to_string(),
            "--mount",
            "--net",
            "--",
        ])
        .arg(program);
        cmd
    }

    /// A shell script's output, run inside the namespaces.
    pub fn sh(&self, script: &str) -> Output {
        self.command("sh")
            .args(["-c", script])
            .output()
            .expect("nsenter sh")
    }

    /// Every file and directory under the agents' pin root (`/sys/fs/bpf/proxy`).
    pub fn pins(&self) -> Vec<String> {
        let out = self.sh("find /sys/fs/bpf/proxy 2>/dev/null");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// `proxy cleanup ARGS` in the agents' namespaces; its output (stdout and stderr), after
/// checking that it succeeded.
pub fn proxy_cleanup(mounts: &Mounts, args: &[&str]) -> String {
    let out = mounts
        .command(env!("CARGO_BIN_EXE_proxy"))
        .arg("cleanup")
        .args(args)
        .output()
        .expect("proxy cleanup");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

impl Drop for Mounts {
    fn drop(&mut self) {
        // Unpinning detaches what the pins held; the bpffs itself goes with the namespace.
        let _ = self.sh("rm -rf /sys/fs/bpf/proxy");
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// A directory of one test's files (rules files, logs) under the system's temp dir, named
/// `TAG-PID`, removed when it is dropped, pass or fail.
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        TempDir(dir)
    }
}

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;

    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Dante (Debian's `danted`) in the router namespace `ns`: a SOCKS5 server on
/// 127.0.0.1:1081 without authentication that relays out of r1 (CONNECT and UDP ASSOCIATE).
/// Its log lines arrive on `log`; it is stopped when dropped.
pub struct Dante {
    child: Child,
    conf: std::path::PathBuf,
    pub log: mpsc::Receiver<String>,
}

impl Dante {
    /// Starts it and waits (bounded) until it accepts connections. `tag` keeps the config
    /// file of each test apart.
    pub fn start(ns: &Netns, tag: &str) -> Dante {
        let conf = std::env::temp_dir().join(format!("danted-{tag}-{}.conf", std::process::id()));
        std::fs::write(
            &conf,
            "logoutput: stderr\ninternal: 127.0.0.1 port = 1081\nexternal: 198.51.100.1\n\
             socksmethod: none\nclientmethod: none\nuser.privileged: root\nuser.unprivileged: nobody\n\
             client pass {\n from: 127.0.0.0/8 to: 0.0.0.0/0\n}\n\
             socks pass {\n from: 0.0.0.0/0 to: 0.0.0.0/0\n command: connect udpassociate udpreply\n log: connect disconnect\n}\n",
        )
        .expect("dante config");
        let mut child = ns
            .command("danted")
            .arg("-f")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("danted (apt-get install dante-server; cargo xtask test installs it)");
        let (tx, log) = mpsc::channel();
        let stderr = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline
            && !ns
                .run(|| TcpStream::connect("127.0.0.1:1081").is_ok())
                .unwrap_or(false)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        Dante { child, conf, log }
    }
}

impl Drop for Dante {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.conf);
    }
}
pub mod kernel;
pub mod load;
