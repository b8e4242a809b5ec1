//! The agent binary as a child process in a namespace, for the kernel tests, the benchmark
//! and the demo: started, waited for until it is ready, stopped, its log (stderr) collected,
//! killed if it is still running when dropped.
//!
//! Ready is asked of the agent, not read from its log: the agent binds its stats socket
//! ([`proxy_common::stats_socket_name`]) early in its setup but accepts on it only in its
//! serve loop, once the classifier is attached and the routes are in place (when it logs
//! "ready:"). So the agent is ready once a connection to that socket, made from inside its
//! network namespace, is answered with a report.

use std::{
    collections::VecDeque,
    io::{self, BufRead as _, BufReader, Read as _},
    os::{
        linux::net::SocketAddrExt as _,
        unix::net::{SocketAddr, UnixStream},
    },
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, MutexGuard},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use nix::{
    sys::{signal, socket::sockopt::PeerCredentials},
    unistd::Pid,
};
use proxy_common::{DEFAULT_TABLE, stats_socket_name};

use crate::TestbedError;

/// The most log lines kept; older ones are dropped first.
const MAX_LOG_LINES: usize = 100_000;
/// How often the helper looks again (the socket, the process, the log).
const POLL: Duration = Duration::from_millis(20);

/// Starting, asking or stopping the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The process could not be started.
    #[error("starting {command}")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    /// The agent's network namespace could not be entered to ask it.
    #[error(transparent)]
    Testbed(#[from] TestbedError),
    /// The agent exited before it answered on its stats socket.
    #[error("the agent exited with {0} before it was ready")]
    Exited(ExitStatus),
    /// No answer on the stats socket in time.
    #[error("the agent did not answer on its stats socket @{socket} within {waited:?}")]
    NotReady { socket: String, waited: Duration },
    /// The caller called the wait off.
    #[error("stopped waiting for the agent to be ready")]
    GaveUp,
    /// The agent was still running at the end of a bounded wait for its exit.
    #[error("the agent was still running after {0:?}")]
    StillRunning(Duration),
    /// Waiting for the process failed.
    #[error("waiting for the agent")]
    Wait(#[source] io::Error),
}

/// The agent binary running as a child process, its stderr collected line by line.
pub struct AgentProcess {
    child: Child,
    status: Option<ExitStatus>,
    log: Arc<Mutex<VecDeque<String>>>,
    reader: Option<JoinHandle<()>>,
    netns: String,
    table: u32,
}

impl AgentProcess {
    /// Starts `command`, the agent binary with its `run ...` arguments, wrapped to run in the
    /// network namespace named `netns` ([`crate::Netns::command`] does this), and returns at
    /// once. The wrapper must exec the agent, not fork it (`ip netns exec` and `nsenter`
    /// without `--pid` exec): the child's pid is then the agent's. The routing table the
    /// stats socket is named after is the command's `--table`, else the agent's default.
    pub fn spawn(command: Command, netns: &str) -> Result<AgentProcess, AgentError> {
        AgentProcess::start_process(command, netns, None)
    }

    /// [`AgentProcess::spawn`], also printing each log line to stdout, after `prefix`, as it
    /// comes.
    pub fn spawn_echoing(
        command: Command,
        netns: &str,
        prefix: &str,
    ) -> Result<AgentProcess, AgentError> {
        AgentProcess::start_process(command, netns, Some(prefix.to_owned()))
    }

    fn start_process(
        mut command: Command,
        netns: &str,
        echo: Option<String>,
    ) -> Result<AgentProcess, AgentError> {
        let table = table_of(&command);
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| AgentError::Spawn {
                command: format!("{command:?}"),
                source,
            })?;
        let log = Arc::new(Mutex::new(VecDeque::new()));
        let reader = child.stderr.take().map(|stderr| {
            let sink = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if let Some(prefix) = &echo {
                        println!("{prefix}{line}");
                    }
                    let mut log = lock(&sink);
                    if log.len() >= MAX_LOG_LINES {
                        log.pop_front();
                    }
                    log.push_back(line);
                }
            })
        });
        Ok(AgentProcess {
            child,
            status: None,
            log,
            reader,
            netns: netns.to_owned(),
            table,
        })
    }

    /// The routing table the agent was started with.
    pub fn table(&self) -> u32 {
        self.table
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.status.is_none().then(|| self.child.id())
    }

    /// The exit status, if the agent has exited; once it has, its log is complete.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none()
            && let Ok(Some(status)) = self.child.try_wait()
        {
            self.exited(status);
        }
        self.status
    }

    fn exited(&mut self, status: ExitStatus) {
        self.status = Some(status);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }

    /// Waits up to `timeout` until the agent answers on its stats socket.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), AgentError> {
        self.wait_ready_or(timeout, || false)
    }

    /// [`AgentProcess::wait_ready`], called off when `give_up` returns true.
    pub fn wait_ready_or(
        &mut self,
        timeout: Duration,
        give_up: impl Fn() -> bool,
    ) -> Result<(), AgentError> {
        let name = stats_socket_name(self.table);
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).map_err(AgentError::Wait)?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Err(AgentError::Exited(status));
            }
            if give_up() {
                return Err(AgentError::GaveUp);
            }
            if Instant::now() >= deadline {
                return Err(AgentError::NotReady {
                    socket: name,
                    waited: timeout,
                });
            }
            // Abstract sockets belong to a network namespace: connect from inside the
            // agent's. Refused (nothing bound yet) means not yet.
            if let Ok(stream) = crate::run_in(&self.netns, || UnixStream::connect_addr(&addr))? {
                let listened_here = self.is_ours(&stream);
                if let Some(answer) = self.answered(stream, deadline, &give_up)
                    && (listened_here || self.signed(&answer))
                {
                    return Ok(());
                }
            }
            std::thread::sleep(POLL);
        }
    }

    /// Whether the report names this agent's process as the one answering: an agent that
    /// took the socket over from another (a handover) answers on a socket the other one
    /// listened on.
    fn signed(&self, answer: &[u8]) -> bool {
        self.pid().is_some_and(|pid| {
            String::from_utf8_lossy(answer).starts_with(&format!("agent: pid {pid},"))
        })
    }

    /// Whether `stream` is connected to this agent's socket, not to that of another agent
    /// using the same table in the namespace (which this one may be about to collide with):
    /// the socket's credentials are those of the process that listened on it.
    fn is_ours(&self, stream: &UnixStream) -> bool {
        nix::sys::socket::getsockopt(stream, PeerCredentials)
            .is_ok_and(|cred| u32::try_from(cred.pid()).ok() == self.pid())
    }

    /// Reads the agent's answer to its end: a report (or a refusal, which is an answer too).
    /// The connection is accepted as soon as the socket is bound, but answered only from the
    /// serve loop; meanwhile the agent may exit, which ends the connection with nothing read.
    fn answered(
        &mut self,
        mut stream: UnixStream,
        deadline: Instant,
        give_up: &impl Fn() -> bool,
    ) -> Option<Vec<u8>> {
        if stream.set_read_timeout(Some(POLL)).is_err() {
            return None;
        }
        let mut answer = Vec::new();
        let mut buf = [0u8; 16 * 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return (!answer.is_empty()).then_some(answer),
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.try_status().is_some() || give_up() || Instant::now() >= deadline {
                        return None;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
        }
    }

    fn lines(&self) -> MutexGuard<'_, VecDeque<String>> {
        lock(&self.log)
    }

    /// The log so far, one line per line.
    pub fn log_text(&self) -> String {
        self.lines().iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// The last `n` lines of the log.
    pub fn log_tail(&self, n: usize) -> String {
        let lines = self.lines();
        let skip = lines.len().saturating_sub(n);
        lines
            .iter()
            .skip(skip)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The first `n` lines of the log for which `matches` holds.
    pub fn log_lines_matching(&self, matches: impl Fn(&str) -> bool, n: usize) -> Vec<String> {
        self.lines()
            .iter()
            .filter(|l| matches(l))
            .take(n)
            .cloned()
            .collect()
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.lines().iter().any(|l| l.contains(needle))
    }

    /// Waits up to `timeout` for a log line containing every needle.
    pub fn wait_for_line(&self, needles: &[&str], timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self
                .lines()
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
            {
                return Some(line.clone());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `timeout` for the agent to exit on its own; its log is then complete.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, AgentError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(AgentError::StillRunning(timeout));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGINT, the stop for good: the agent drains its live connections (up to its
    /// `--drain-timeout`), then undoes its set-up and exits. After `grace` a second SIGINT
    /// makes it exit at once; after twice `grace` it is killed. Returns the exit status;
    /// the log is then complete. (SIGTERM would stop it to be replaced, leaving its
    /// classifier and routes for the next agent.)
    pub fn stop(&mut self, grace: Duration) -> Result<ExitStatus, AgentError> {
        if let Some(status) = self.try_status() {
            return Ok(status);
        }
        self.signal(signal::Signal::SIGINT);
        match self.wait_exit(grace) {
            Err(AgentError::StillRunning(_)) => {}
            done => return done,
        }
        self.signal(signal::Signal::SIGINT);
        match self.wait_exit(grace) {
            Err(AgentError::StillRunning(_)) => {}
            done => return done,
        }
        let _ = self.child.kill();
        let status = self.child.wait().map_err(AgentError::Wait)?;
        self.exited(status);
        Ok(status)
    }

    fn signal(&self, signal: signal::Signal) {
        if let Some(pid) = self.pid().and_then(|p| i32::try_from(p).ok()) {
            let _ = signal::kill(Pid::from_raw(pid), signal);
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            if let Ok(status) = self.child.wait() {
                self.exited(status);
            }
        }
    }
}

fn lock(log: &Mutex<VecDeque<String>>) -> MutexGuard<'_, VecDeque<String>> {
    log.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The `--table N` (or `--table=N`) among the command's arguments, else the default table.
fn table_of(command: &Command) -> u32 {
    let mut table = DEFAULT_TABLE;
    let mut args = command.get_args().map(|a| a.to_string_lossy().into_owned());
    while let Some(arg) = args.next() {
        let value = if arg == "--table" {
            args.next()
        } else {
            arg.strip_prefix("--table=").map(str::to_owned)
        };
        if let Some(n) = value.and_then(|v| v.parse().ok()) {
            table = n;
        }
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_comes_from_the_arguments_or_the_default() {
        let table = |args: &[&str]| {
            let mut command = Command::new("proxy");
            command.args(args);
            table_of(&command)
        };
        assert_eq!(table(&["run", "--iface", "r0"]), DEFAULT_TABLE);
        assert_eq!(table(&["run", "--table", "101", "--iface", "lo"]), 101);
        assert_eq!(table(&["run", "--table=7"]), 7);
    }
}
