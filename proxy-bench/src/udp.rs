//! What UDP sessions cost the agent: one datagram from each of `FLOOD` client
//! source ports at a cap of `CAP` sessions; the agent's VmRSS before, with the cap's
//! sessions live, and after they have idled out. Run on (c) only: the figure is the
//! agent's own memory, and HAProxy, the usual comparison for a TCP proxy, does not proxy UDP.

use std::{
    io,
    net::UdpSocket,
    time::{Duration, Instant},
};

use crate::{
    load,
    setup::{self, Scenario},
};

/// Client source ports in the flood: five times the cap, as in the kernel test.
pub const FLOOD: usize = 5_000;
/// `--udp-max-sessions`.
pub const CAP: usize = 1_000;
/// `--udp-idle-timeout`, seconds: a session ends this long after its last datagram.
pub const IDLE_TIMEOUT_SECS: u64 = 2;

pub struct UdpSample {
    /// Source ports that sent their datagram (fewer than `FLOOD` when descriptors run short).
    pub sent: usize,
    /// Sessions live at the peak: the agent holds two sockets for each.
    pub live: usize,
    pub baseline_kib: u64,
    pub live_kib: u64,
    pub ended_kib: u64,
    /// Every session idled out in time.
    pub ended: bool,
    /// What the agent warned about, but for the cap being reached (the flood's purpose).
    pub warnings: Vec<String>,
}

impl UdpSample {
    pub fn per_session_kib(&self) -> f64 {
        (self.live_kib as f64 - self.baseline_kib as f64) / self.live.max(1) as f64
    }
}

/// (c)'s agent (which proxies UDP on port 80 too), with the cap.
pub fn agent_args() -> Vec<String> {
    let udp = format!("--udp-max-sessions {CAP} --udp-idle-timeout {IDLE_TIMEOUT_SECS}");
    let udp = udp.split(' ');
    setup::EBPF_AGENT_ARGS
        .iter()
        .copied()
        .chain(udp)
        .map(str::to_owned)
        .collect()
}

/// Measures on a fresh agent run with [`agent_args`], then gives `s` a fresh agent with its
/// own arguments back, whether the measurement worked or not.
pub fn measure(s: &mut Scenario, nofile: u64) -> Result<UdpSample, String> {
    let own = s.replace_agent_args(agent_args());
    let sample = s.restart_proxy().and_then(|()| flood_and_read(s, nofile));
    s.replace_agent_args(own);
    let restored = s.restart_proxy();
    let sample = sample?;
    restored.map(|()| sample)
}

fn flood_and_read(s: &Scenario, nofile: u64) -> Result<UdpSample, String> {
    let agent = s.proxy_process().ok_or("no agent")?;
    std::thread::sleep(Duration::from_millis(300));
    let (fds_before, baseline_kib) = (agent.open_fds(), agent.vm_rss_kib()?);
    // The flood's sockets stay open here, one descriptor each.
    let room = (nofile as usize).saturating_sub(crate::process::open_fds("self") + 64);
    let sockets =
        s.gw.client
            .run(|| flood(FLOOD.min(room)))
            .map_err(|e| proxy_common::error_chain(&e))?
            .map_err(|e| format!("flood: {e}"))?;
    // Live: two sockets per session once the cap is reached; then a moment for the echoes
    // to come back through the sessions.
    wait_until(Duration::from_secs(5), || {
        agent.open_fds() >= fds_before + 2 * CAP
    });
    std::thread::sleep(Duration::from_millis(300));
    let live = agent.open_fds().saturating_sub(fds_before) / 2;
    let live_kib = agent.vm_rss_kib()?;
    // Ended: every session idles out; then the agent has a moment to free.
    let ended = wait_until(Duration::from_secs(IDLE_TIMEOUT_SECS + 13), || {
        agent.open_fds() <= fds_before
    });
    std::thread::sleep(Duration::from_millis(1_500));
    let ended_kib = agent.vm_rss_kib()?;
    let sent = sockets.len();
    drop(sockets);
    if live == 0 {
        return Err(format!(
            "no UDP session through the agent ({sent} datagrams sent)"
        ));
    }
    let warnings = s
        .proxy_warnings()
        .into_iter()
        .filter(|l| !l.contains("--udp-max-sessions"))
        .collect();
    Ok(UdpSample {
        sent,
        live,
        baseline_kib,
        live_kib,
        ended_kib,
        ended,
        warnings,
    })
}

/// From the client namespace: one datagram to the server from each of `count` source
/// ports, 100 every 10 ms (so that the agent's listener keeps up, and no session idles out
/// before the cap is reached). The sockets are kept, so that the echoes do not come back as
/// port unreachables, which end sessions.
fn flood(count: usize) -> io::Result<Vec<UdpSocket>> {
    let mut sockets = Vec::with_capacity(count);
    for i in 0..count {
        if crate::stopped() {
            break;
        }
        let socket = UdpSocket::bind("0.0.0.0:0")?;
        socket.send_to(format!("flood {i}").as_bytes(), load::server_addr())?;
        sockets.push(socket);
        if i % 100 == 99 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(sockets)
}

fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline && !crate::stopped() {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    done()
}
