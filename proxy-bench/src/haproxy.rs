//! Set-up (d)'s proxy: HAProxy (Debian's 2.6), the proxy a user would pick instead of this
//! project, run in the router namespace in the foreground (`haproxy -db`) and killed when
//! dropped. It gets its connections from the iptables TPROXY recipe with the SYN-first rule
//! (`setup::iptables_rules`), and connects to each one's original destination
//! (`server s 0.0.0.0`, no port).

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Child, Stdio},
    sync::{Arc, Mutex},
    time::Duration,
};

use proxy_testbed::Netns;

use crate::{process::ProxyProcess, setup::ON_PORT};

/// The program, found on PATH (root's has /usr/sbin).
pub const PROGRAM: &str = "haproxy";
/// Its connection limit: room for the idle-connections figure's 10,000 (each holds two
/// descriptors), like the agent, which has no limit of its own.
pub const MAXCONN: usize = 20_000;
/// How many of its stderr lines are kept, for errors and the report's notes (and the
/// reloads' "Loading success" lines).
const KEPT_LINES: usize = 200;

/// The configuration: TCP mode, a transparent listener on the port TPROXY delivers to, the
/// original destination as the server, the agent's timeouts (connect 10 s, idle 300 s), no
/// log, one thread per CPU of this machine (the agent's `--workers` default). `no
/// strict-limits`: HAProxy wants 2 x maxconn descriptors and refuses to start when it cannot
/// raise its limit that far; here it gets the same limit as the agent, which the report shows.
pub fn config() -> String {
    config_with("")
}

/// [`config`] with more global settings.
fn config_with(global: &str) -> String {
    format!(
        "global\n    nbthread 2\n    maxconn {MAXCONN}\n    no strict-limits\n{global}\
         defaults\n    mode tcp\n    maxconn {MAXCONN}\n    timeout connect 10s\n    \
         timeout client 300s\n    timeout server 300s\n\
         frontend intercept\n    bind 0.0.0.0:{ON_PORT} transparent\n    \
         default_backend original_destination\n\
         backend original_destination\n    server s 0.0.0.0\n"
    )
}

/// Lines in which the master says a worker loaded ("Loading success.").
fn count_loaded(log: &[String]) -> usize {
    log.iter().filter(|l| l.contains("Loading success")).count()
}

/// HAProxy in the foreground in a namespace; SIGKILL and reaped when dropped (it holds no
/// state outside its process: the iptables rules belong to the namespace).
pub struct Haproxy {
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Haproxy {
    /// Writes [`config`] to `config_path` and starts HAProxy on it in `router`. Ready when
    /// the caller's end-to-end check passes: HAProxy prints nothing when it listens.
    pub fn start(router: &Netns, config_path: &Path) -> Result<Haproxy, String> {
        std::fs::write(config_path, config())
            .map_err(|e| format!("writing {}: {e}", config_path.display()))?;
        Haproxy::spawn(router, config_path, &[])
    }

    /// HAProxy set up for seamless reloads, as its documentation has it: master-worker mode
    /// (`-W`), and a stats socket that exposes the listeners (`expose-fd listeners`), from
    /// which each new worker takes them (the master adds `-x` on reload). The child is the
    /// master; [`Haproxy::reload`] reloads.
    pub fn start_master_worker(router: &Netns, config_path: &Path) -> Result<Haproxy, String> {
        let socket = config_path.with_extension("sock");
        let global = format!(
            "    stats socket {} mode 600 level admin expose-fd listeners\n",
            socket.display()
        );
        std::fs::write(config_path, config_with(&global))
            .map_err(|e| format!("writing {}: {e}", config_path.display()))?;
        Haproxy::spawn(router, config_path, &["-W"])
    }

    /// The seamless reload: SIGUSR2 to the master, which starts a new worker with the
    /// listeners of the old one; the old one finishes its connections. Returns once the
    /// master says the new worker loaded, or after `timeout`.
    pub fn reload(&self, timeout: Duration) -> Result<(), String> {
        let loaded = || self.log.lock().map(|l| count_loaded(&l)).unwrap_or(0);
        let before = loaded();
        let pid = self.child.as_ref().ok_or("HAProxy is not running")?.id();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGUSR2,
        )
        .map_err(|e| format!("SIGUSR2 to HAProxy's master: {e}"))?;
        let deadline = std::time::Instant::now() + timeout;
        while std::time::Instant::now() < deadline {
            if loaded() > before {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(format!(
            "HAProxy did not report a reload within {timeout:?}:\n{}",
            self.log_text()
        ))
    }

    fn spawn(router: &Netns, config_path: &Path, extra: &[&str]) -> Result<Haproxy, String> {
        let mut child = router
            .command(PROGRAM)
            .args(extra)
            .arg("-db")
            .arg("-f")
            .arg(config_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("starting {PROGRAM} (package haproxy): {e}"))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let sink = Arc::clone(&log);
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    match sink.lock() {
                        Ok(mut log) if log.len() < KEPT_LINES => log.push(line),
                        _ => {}
                    }
                }
            });
        }
        let mut haproxy = Haproxy {
            child: Some(child),
            log,
        };
        // A bad configuration or a busy port ends it at once: say so rather than time out.
        std::thread::sleep(Duration::from_millis(200));
        if let Some(status) = haproxy.child.as_mut().and_then(|c| c.try_wait().ok()?) {
            std::thread::sleep(Duration::from_millis(100));
            return Err(format!(
                "{PROGRAM} exited at once ({status}):\n{}",
                haproxy.log_text()
            ));
        }
        Ok(haproxy)
    }

    /// `ip netns exec` execs HAProxy, so the child's pid is HAProxy's.
    pub fn process(&self) -> Option<ProxyProcess> {
        Some(ProxyProcess {
            pid: self.child.as_ref()?.id(),
            name: PROGRAM,
        })
    }

    /// What HAProxy printed (notices, warnings, alerts).
    pub fn log_text(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// Its warnings and alerts.
    pub fn notable(&self) -> Vec<String> {
        self.log
            .lock()
            .map(|l| {
                l.iter()
                    .filter(|l| l.contains("WARNING") || l.contains("ALERT"))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        self.stop();
    }
}
