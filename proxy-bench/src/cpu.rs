//! CPU time, from /proc: what each new connection costs the machine and the proxy (the
//! agent or HAProxy), so the report can say where the time goes rather than guess.

/// Clock ticks of /proc/stat and /proc/PID/stat per second.
pub fn ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 { hz as f64 } else { 100.0 }
}

/// The machine's CPU ticks (all CPUs): busy, and in all.
#[derive(Clone, Copy, Default)]
pub struct MachineTicks {
    pub busy: u64,
    pub total: u64,
}

/// The first line of /proc/stat: user nice system idle iowait irq softirq steal ...
pub fn machine() -> Option<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .strip_prefix("cpu ")?
        .split_whitespace()
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let total: u64 = fields.iter().sum();
    let idle = fields.get(3)? + fields.get(4)?;
    Some(MachineTicks {
        busy: total - idle,
        total,
    })
}

/// A process's CPU ticks, all its threads: in its own code (user) and in the kernel on its
/// behalf (system, which includes the network stack work its syscalls do inline).
#[derive(Clone, Copy, Default)]
pub struct ProcessTicks {
    pub user: u64,
    pub system: u64,
}

/// Fields 14 and 15 of /proc/PID/stat, counted after the command name's closing paren
/// (the name may hold spaces).
pub fn process(pid: u32) -> Option<ProcessTicks> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    Some(ProcessTicks {
        user: fields.get(11)?.parse().ok()?,
        system: fields.get(12)?.parse().ok()?,
    })
}

/// Sums over the connection-rate runs of one set-up.
#[derive(Clone, Copy, Default)]
pub struct ConnCpu {
    pub connections: u64,
    pub machine: MachineTicks,
    pub proxy: ProcessTicks,
    pub has_proxy: bool,
}

impl ConnCpu {
    pub fn add(
        &mut self,
        connections: u64,
        machine: (MachineTicks, MachineTicks),
        proxy: Option<(ProcessTicks, ProcessTicks)>,
    ) {
        self.connections += connections;
        self.machine.busy += machine.1.busy.saturating_sub(machine.0.busy);
        self.machine.total += machine.1.total.saturating_sub(machine.0.total);
        if let Some((before, after)) = proxy {
            self.has_proxy = true;
            self.proxy.user += after.user.saturating_sub(before.user);
            self.proxy.system += after.system.saturating_sub(before.system);
        }
    }

    fn per_conn_us(&self, ticks: u64) -> Option<f64> {
        (self.connections > 0)
            .then(|| ticks as f64 / ticks_per_sec() * 1e6 / self.connections as f64)
    }

    /// Busy CPU time of the whole machine per connection.
    pub fn machine_us(&self) -> Option<f64> {
        self.per_conn_us(self.machine.busy)
    }

    /// The share of the machine's CPUs that was busy.
    pub fn busy_share(&self) -> Option<f64> {
        (self.machine.total > 0).then(|| self.machine.busy as f64 / self.machine.total as f64)
    }

    /// The proxy's user and system time per connection.
    pub fn proxy_us(&self) -> Option<(f64, f64)> {
        if !self.has_proxy {
            return None;
        }
        Some((
            self.per_conn_us(self.proxy.user)?,
            self.per_conn_us(self.proxy.system)?,
        ))
    }
}
