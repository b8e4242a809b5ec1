//! The `--local` figure: what the cgroup connect programs cost the host's own connections.
//!
//! Two router / server topologies (`proxy-testbed`; their client namespaces stay unused):
//! in the first the agent runs `--local --cgroup <app>` for port 80; the second has no
//! agent. The bench makes two cgroups under the cgroup2 mount of `/proc/mounts`, `app` (the
//! programs attached) and `sibling` (none), and starts each client as a child process (this
//! binary, `--local-client`) that joins one of them before it executes, then runs the
//! bench's own connection load ([`load::conn_rate_with`]) from inside the router namespace.
//! Four cases, their order rotated run by run, each client closing with a reset so that no
//! TIME_WAIT socket of one run weighs on the next:
//!
//! 1. sibling cgroup, port 81 (no rule): no program runs, the baseline;
//! 2. app cgroup, port 81: the connect program runs and matches nothing, its own cost;
//! 3. app cgroup, port 80: marked, intercepted and proxied;
//! 4. sibling cgroup, port 80, in the topology without an agent: the same destination direct.
//!
//! Each client first checks where it is (`/proc/self/cgroup`) and what the program did to
//! one probe connection (`SO_MARK`: the rule's mark only when intercepted). Everything is
//! removed when [`measure`] returns, pass or fail: agent, servers, cgroups, namespaces.

use std::{
    ffi::CString,
    io,
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use nix::sys::socket::{getsockopt, sockopt};
use proxy_testbed::{Gateway, Netns, SERVER_V4};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};

use crate::{
    Plan,
    load::{self, ConnLoad, NsRuntime, OTHER_PORT, PORT, REQUEST, RESPONSE, Server},
    report,
    setup::{Agent, ON_PORT},
};

/// The mark of the agent's default rule (`--tproxy-mark 0x1/0x1`), which the connect program
/// sets on the sockets it sends to the proxy.
const RULE_MARK: u32 = 1;
/// The prefix of the client process's result line.
const CLIENT_LINE: &str = "LOCAL-CLIENT ";

/// The four cases, in the order of the report.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Case {
    Baseline,
    Hook,
    Proxied,
    Direct,
}

impl Case {
    pub const ALL: [Case; 4] = [Case::Baseline, Case::Hook, Case::Proxied, Case::Direct];

    pub fn label(self) -> &'static str {
        match self {
            Case::Baseline => "(1) sibling cgroup, no program; port 81, no rule",
            Case::Hook => "(2) the agent's cgroup, program runs; port 81, no rule",
            Case::Proxied => "(3) the agent's cgroup; port 80, intercepted and proxied",
            Case::Direct => "(4) port 80 direct, no agent in the namespace",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Case::Baseline => "(1)",
            Case::Hook => "(2)",
            Case::Proxied => "(3)",
            Case::Direct => "(4)",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    fn port(self) -> u16 {
        match self {
            Case::Baseline | Case::Hook => OTHER_PORT,
            Case::Proxied | Case::Direct => PORT,
        }
    }

    fn expected_mark(self) -> u32 {
        if self == Case::Proxied { RULE_MARK } else { 0 }
    }
}

/// One client process's run.
#[derive(Clone, Copy, Debug)]
pub struct LocalRun {
    pub per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub errors: u64,
}

/// The figure's runs, per case; `None` is a run that failed.
#[derive(Default)]
pub struct LocalResults {
    pub runs: [Vec<Option<LocalRun>>; 4],
    /// How it was measured, for the report.
    pub concurrency: usize,
    pub duration: Duration,
    pub agent_args: Vec<String>,
    /// Warnings and errors the agent logged.
    pub agent_warnings: Vec<String>,
}

impl LocalResults {
    /// The median over a case's runs of one value of each run.
    pub fn median(&self, case: Case, value: impl Fn(&LocalRun) -> f64) -> Option<f64> {
        report::median(
            self.runs[case.index()]
                .iter()
                .flatten()
                .map(value)
                .filter(|v| v.is_finite())
                .collect(),
        )
    }

    /// The median of the per-run ratios `value(a) / value(b)`: each ratio is of two
    /// clients that ran one after the other, so a drift of the machine's load over the
    /// figure cancels out.
    pub fn ratio(&self, a: Case, b: Case, value: impl Fn(&LocalRun) -> f64) -> Option<f64> {
        let ratios = self.runs[a.index()]
            .iter()
            .zip(&self.runs[b.index()])
            .filter_map(|(x, y)| match (x, y) {
                (Some(x), Some(y)) if value(y) > 0.0 => Some(value(x) / value(y)),
                _ => None,
            })
            .filter(|r: &f64| r.is_finite())
            .collect();
        report::median(ratios)
    }
}

/// The cgroup2 mount, from `/proc/mounts`.
fn cgroup2_mount() -> Result<PathBuf, String> {
    let mounts = std::fs::read_to_string("/proc/mounts")
        .map_err(|e| format!("reading /proc/mounts: {e}"))?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| PathBuf::from(f[1]))
        .ok_or_else(|| "no cgroup2 mount in /proc/mounts (the --local programs need one)".into())
}

/// The bench's two cgroups, `proxy-bench-PID/{app,sibling}` under the cgroup2 mount;
/// removed on drop (their clients have all exited by then).
struct Cgroups {
    parent: PathBuf,
    app: PathBuf,
    sibling: PathBuf,
}

impl Cgroups {
    fn create() -> Result<Cgroups, String> {
        let parent = cgroup2_mount()?.join(format!("proxy-bench-{}", std::process::id()));
        let cgroups = Cgroups {
            app: parent.join("app"),
            sibling: parent.join("sibling"),
            parent,
        };
        for dir in [&cgroups.parent, &cgroups.app, &cgroups.sibling] {
            std::fs::create_dir(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        }
        Ok(cgroups)
    }

    /// `app`'s path relative to the mount, as `--cgroup` takes it.
    fn app_name(&self) -> String {
        format!(
            "{}/app",
            self.parent
                .file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        )
    }

    /// Removes the cgroups; the directories still there after 5 s.
    fn remove(&self) -> Vec<PathBuf> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut left = Vec::new();
        for dir in [&self.app, &self.sibling, &self.parent] {
            while dir.exists() && std::fs::remove_dir(dir).is_err() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if dir.exists() {
                left.push(dir.clone());
            }
        }
        left
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        let _ = self.remove();
    }
}

/// A router / server topology: its namespaces, its server, and maybe an agent. Fields drop
/// in order: the agent, the server, then the namespaces.
struct Side {
    agent: Option<Agent>,
    _server: Server,
    gw: Gateway,
}

impl Side {
    fn new(tag: &str, lifetime: Duration) -> Result<Side, String> {
        let gw = Gateway::new(tag).map_err(|e| proxy_common::error_chain(&e))?;
        // The clients run in the router namespace; as in the other figures, let them reuse
        // ports from a wide range (the agent connects upstream from there too).
        gw.router
            .sysctl("net.ipv4.tcp_tw_reuse", "1")
            .and_then(|()| {
                gw.router
                    .sysctl("net.ipv4.ip_local_port_range", "10000 60999")
            })
            .map_err(|e| proxy_common::error_chain(&e))?;
        let server = Server::start(&gw.server, lifetime)?;
        Ok(Side {
            agent: None,
            _server: server,
            gw,
        })
    }
}

/// Measures the four cases `plan.local_runs` times; the namespaces it made are returned
/// with the outcome, for the caller's check that none is left behind.
pub fn measure(
    agent_binary: &Path,
    plan: &Plan,
    lifetime: Duration,
    progress: &dyn Fn(&str),
) -> (Vec<String>, Result<LocalResults, String>) {
    let mut names = Vec::new();
    let result = (|| {
        let cgroups = Cgroups::create()?;
        let result = measure_in(&cgroups, agent_binary, plan, lifetime, progress, &mut names);
        let left = cgroups.remove();
        match (result, left.is_empty()) {
            (Ok(r), true) => Ok(r),
            (Ok(_), false) => Err(format!("cgroups left behind: {left:?}")),
            (Err(e), _) => Err(e),
        }
    })();
    (names, result)
}

fn measure_in(
    cgroups: &Cgroups,
    agent_binary: &Path,
    plan: &Plan,
    lifetime: Duration,
    progress: &dyn Fn(&str),
    names: &mut Vec<String>,
) -> Result<LocalResults, String> {
    let mut with_agent = Side::new("benchla", lifetime)?;
    names.extend(ns_names(&with_agent.gw));
    let without_agent = Side::new("benchlb", lifetime)?;
    names.extend(ns_names(&without_agent.gw));
    let agent_args: Vec<String> = [
        "run",
        "--local",
        "--cgroup",
        &cgroups.app_name(),
        "--dport",
        "80",
        "--on-port",
        ON_PORT,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    with_agent.agent = Some(Agent::start(
        &with_agent.gw.router,
        agent_binary,
        &agent_args,
    )?);
    let mut results = LocalResults {
        concurrency: plan.local_concurrency,
        duration: plan.local_duration,
        agent_args,
        ..LocalResults::default()
    };
    for run in 0..plan.local_runs {
        // Rotate the order run by run: each case goes first (and last) as often as the
        // others.
        let mut order = Case::ALL;
        order.rotate_left(run % Case::ALL.len());
        let mut shown = [None; 4];
        for case in order {
            let (side, cgroup) = match case {
                Case::Baseline => (&with_agent, &cgroups.sibling),
                Case::Hook | Case::Proxied => (&with_agent, &cgroups.app),
                Case::Direct => (&without_agent, &cgroups.sibling),
            };
            let r = client(&side.gw.router, cgroup, case, plan).map_err(|e| {
                let log = side.agent.as_ref().map(Agent::tail).unwrap_or_default();
                format!("{}: {e}\n{log}", case.label())
            })?;
            shown[case.index()] = Some(r);
            results.runs[case.index()].push(Some(r));
            crate::check("the --local figure")?;
        }
        progress(&format!(
            "--local, run {}/{}: {}",
            run + 1,
            plan.local_runs,
            Case::ALL
                .iter()
                .map(|c| match shown[c.index()] {
                    Some(r) => format!("{} {:.0}/s p50 {:.0} us", c.short(), r.per_sec, r.p50_us),
                    None => format!("{} failed", c.short()),
                })
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if let Some(agent) = &with_agent.agent {
        results.agent_warnings = agent.notable();
    }
    Ok(results)
}

fn ns_names(gw: &Gateway) -> [String; 3] {
    [&gw.client, &gw.router, &gw.server].map(|ns| ns.name.clone())
}

/// Runs one client process for `case` in `cgroup` and the namespace `ns`.
fn client(ns: &Netns, cgroup: &Path, case: Case, plan: &Plan) -> Result<LocalRun, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding this binary: {e}"))?;
    let procs = CString::new(cgroup.join("cgroup.procs").to_string_lossy().as_bytes())
        .map_err(|e| e.to_string())?;
    let spec = format!(
        "{} {} {} {}",
        ns.name,
        SocketAddr::from((SERVER_V4, case.port())),
        plan.local_concurrency,
        plan.local_duration.as_millis()
    );
    let mut cmd = ns.command(exe);
    cmd.arg("--local-client")
        .arg(&spec)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    join_cgroup_before_exec(&mut cmd, procs);
    // Bounded: the client's load stops after its duration, each connection after its
    // timeouts.
    let out = cmd
        .output()
        .map_err(|e| format!("running the client process: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix(CLIENT_LINE))
        .ok_or_else(|| format!("the client failed ({}): {}", out.status, stdout.trim()))?;
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
            .ok_or_else(|| format!("no {name} in the client's line: {line}"))
    };
    let number = |name: &str| -> Result<f64, String> {
        field(name)?
            .parse()
            .map_err(|e| format!("{name} in the client's line {line}: {e}"))
    };
    let in_cgroup = field("cgroup")?;
    let wanted = cgroup
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !in_cgroup.ends_with(&format!("/{wanted}")) {
        return Err(format!(
            "the client ran in cgroup {in_cgroup}, not {wanted}"
        ));
    }
    let mark = number("mark")? as u32;
    if mark != case.expected_mark() {
        return Err(format!(
            "the probe connection's mark is {mark}, expected {}: the connect program did not do what this case measures",
            case.expected_mark()
        ));
    }
    let completed = number("completed")?;
    if completed < 1.0 {
        return Err(format!("no connection completed: {line}"));
    }
    Ok(LocalRun {
        per_sec: number("per_sec")?,
        p50_us: number("p50_us")?,
        p99_us: number("p99_us")?,
        errors: number("errors")? as u64,
    })
}

/// Moves the child into the cgroup whose `cgroup.procs` is `procs` before it executes
/// (writing "0" moves the writer itself), so that every socket it makes is the cgroup's.
/// Only async-signal-safe calls after fork.
fn join_cgroup_before_exec(cmd: &mut Command, procs: CString) {
    // SAFETY: open, write and close are async-signal-safe; nothing is allocated.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            let error = io::Error::last_os_error();
            libc::close(fd);
            if written != 1 {
                return Err(error);
            }
            Ok(())
        });
    }
}

/// The client process's main (`proxy-bench --local-client "NS ADDR CONCURRENCY MILLIS"`),
/// already in its cgroup and namespace: one probe connection (its `SO_MARK` after
/// connect), then the load; one result line on stdout.
pub fn client_main(spec: &str) -> Result<(), String> {
    let parts: Vec<&str> = spec.split_whitespace().collect();
    let [ns, addr, concurrency, millis] = parts[..] else {
        return Err(format!("bad --local-client spec {spec:?}"));
    };
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
    let concurrency: usize = concurrency
        .parse()
        .map_err(|e| format!("{concurrency}: {e}"))?;
    let millis: u64 = millis.parse().map_err(|e| format!("{millis}: {e}"))?;
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
    let cgroup = cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("no cgroup2 line in /proc/self/cgroup")?
        .to_owned();
    let rt = NsRuntime::new(ns, concurrency.clamp(1, 2)).map_err(|e| e.to_string())?;
    let mark = rt
        .run(probe_mark(addr))
        .map_err(|e| format!("probe: {e}"))?;
    let r = load::conn_rate_with(
        &rt,
        ConnLoad {
            addr,
            concurrency,
            duration: Duration::from_millis(millis),
            reset_close: true,
        },
    );
    println!(
        "{CLIENT_LINE}cgroup={cgroup} mark={mark} completed={} errors={} per_sec={} p50_us={} p99_us={}",
        r.completed, r.errors, r.per_sec, r.p50_us, r.p99_us
    );
    Ok(())
}

/// One exchange; returns the socket's mark after connect.
async fn probe_mark(addr: SocketAddr) -> io::Result<u32> {
    let mut stream = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::other("connect timed out"))??;
    let mark = getsockopt(&stream, sockopt::Mark).map_err(io::Error::from)?;
    let mut request = [b'q'; REQUEST + 1];
    request[0] = b'R';
    let mut response = [0u8; RESPONSE];
    tokio::time::timeout(Duration::from_secs(5), async {
        stream.write_all(&request).await?;
        stream.read_exact(&mut response).await
    })
    .await
    .map_err(|_| io::Error::other("exchange timed out"))??;
    stream.set_zero_linger()?;
    Ok(mark)
}
