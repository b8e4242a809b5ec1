//! What the bench reads of a proxy process (the agent, or HAProxy) in /proc: its memory, its
//! descriptors and its open-files limit. The figures that use them do not care which proxy
//! it is.

/// A running proxy process, by pid, with the name its /proc/PID/status must show (so that a
/// pid reused by something else is not measured).
#[derive(Clone, Copy)]
pub struct ProxyProcess {
    pub pid: u32,
    pub name: &'static str,
}

impl ProxyProcess {
    /// The resident set size, KiB (`VmRSS` in /proc/PID/status).
    pub fn vm_rss_kib(&self) -> Result<u64, String> {
        let pid = self.pid;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|e| format!("reading /proc/{pid}/status: {e}"))?;
        let name = status
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .map(str::trim);
        if name != Some(self.name) {
            return Err(format!(
                "/proc/{pid} is {}, not {}",
                name.unwrap_or("?"),
                self.name
            ));
        }
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| format!("no VmRSS in /proc/{pid}/status"))
    }

    /// How many descriptors the process has open.
    pub fn open_fds(&self) -> usize {
        open_fds(&self.pid.to_string())
    }

    /// The process's descriptors by kind: sockets, pipes, anything else.
    pub fn fd_kinds(&self) -> [usize; 3] {
        let mut kinds = [0; 3];
        let Ok(dir) = std::fs::read_dir(format!("/proc/{}/fd", self.pid)) else {
            return kinds;
        };
        for entry in dir.flatten() {
            let target = std::fs::read_link(entry.path()).unwrap_or_default();
            let target = target.to_string_lossy();
            let slot = if target.starts_with("socket:") {
                0
            } else if target.starts_with("pipe:") {
                1
            } else {
                2
            };
            kinds[slot] += 1;
        }
        kinds
    }

    /// "Max open files" (soft limit) from /proc/PID/limits.
    pub fn nofile_limit(&self) -> Option<String> {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.pid)).ok()?;
        limits
            .lines()
            .find_map(|l| l.strip_prefix("Max open files"))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
    }
}

/// How many descriptors process `pid` (or `self`, the bench) has open.
pub fn open_fds(pid: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}
