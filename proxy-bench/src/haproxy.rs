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
/// How many of its stderr lines are kept, for errors and the report's notes.
const KEPT_LINES: usize = 50;

/// The configuration: TCP mode, a transparent listener on the port TPROXY delivers to, the
/// original destination as the server, the agent's timeouts (connect 10 s, idle 300 s), no
/// log, one thread per CPU of this machine (the agent's `--workers` default). `no
/// strict-limits`: HAProxy wants 2 x maxconn descriptors and refuses to start when it cannot
/// raise its limit that far; here it gets the same limit as the agent, which the report shows.
pub fn config() -> String {
    format!(
        "global\n    nbthread 2\n    maxconn {MAXCONN}\n    no strict-limits\n\
         defaults\n    mode tcp\n    maxconn {MAXCONN}\n    timeout connect 10s\n    \
         timeout client 300s\n    timeout server 300s\n\
         frontend intercept\n    bind 0.0.0.0:{ON_PORT} transparent\n    \
         default_backend original_destination\n\
         backend original_destination\n    server s 0.0.0.0\n"
    )
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
        let mut child = router
            .command(PROGRAM)
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
