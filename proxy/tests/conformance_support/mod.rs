//! The harness of the differential conformance suite (`tests/conformance.rs`, where the
//! table of cases is): one case, run once against the kernel's own TPROXY and once against
//! the agent (`proxy run --listener external`), each in a fresh [`Gateway`], and the two
//! outcomes compared ([`check`]). Every wait is bounded.
//!
//! * `case.rs`: what a case can say (the rule, the receiving sockets, the client, the
//!   expected outcome).
//! * `recipe.rs`: the case's rule, as the kernel's iptables recipe and as the agent's flags.
//! * `exchange.rs`: the client's side: what it sends, step by step.
//! * `observe.rs`: the receiving sockets, what a run captures, and how two runs compare.
//! * This file: one run in its namespaces, and the two runs of a case.

mod case;
mod exchange;
mod observe;
mod recipe;

use std::{
    io,
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

pub use case::{
    At, Case, ClientOpts, DPORT, ExtraAddr, Fam, Kind, Net, ON_PORT, OTHER_PORT, Proto, Recv,
};
use observe::Outcome;
use proxy_testbed::{self as testbed, Gateway};
use socket2::{Domain, Socket};

use crate::common::{Agent, Mounts};

/// Runs `case` against the kernel and against the agent, in parallel (each in its own
/// namespaces), prints both outcomes, and panics with every difference the case does not
/// declare.
pub fn check(case: &Case) {
    crate::common::require_root();
    let (kernel, agent) = std::thread::scope(|scope| {
        let kernel = scope.spawn(|| run(case, Mode::Kernel));
        let agent = scope.spawn(|| run(case, Mode::Agent));
        (
            kernel
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            agent
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
        )
    });
    let name = case.name;
    println!(
        "{name}: kernel: {} | agent: {}",
        kernel.outcome, agent.outcome
    );
    println!(
        "{name}: notes: kernel{} | agent{}",
        kernel.notes, agent.notes
    );
    let problems = observe::compare(case, &kernel.outcome, &agent.outcome);
    assert!(
        problems.is_empty(),
        "{name}:\n{}\n(kernel: {}; agent: {})",
        problems.join("\n"),
        kernel.outcome,
        agent.outcome
    );
}

/// Who runs the interception.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Kernel,
    Agent,
}

/// The result of one run, with notes that are printed but not compared (timings, the
/// agent's counters).
struct Run {
    outcome: Outcome,
    notes: String,
}

/// Runs `case` once under `mode` in a fresh gateway, removed when this returns or panics.
fn run(case: &Case, mode: Mode) -> Run {
    let tag = match mode {
        Mode::Kernel => "cfk",
        Mode::Agent => "cfa",
    };
    let gw = Gateway::with_client_link(tag, case.link).expect("building the testbed");
    if case.fam == Fam::V6 {
        wait_for_ipv6_dad(&gw, case.name);
    }
    if case.extra_addr == ExtraAddr::BeforeStart {
        add_extra_addr(&gw, case.fam);
    }
    // Kept until the exchange is over: the pins of a killed agent live in its bpffs mount.
    let mut mounts = None;
    let agent = match mode {
        Mode::Kernel => {
            recipe::install_kernel_tproxy(&gw, case);
            None
        }
        Mode::Agent if case.agent_killed => {
            let args = recipe::agent_args(case);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let held = mounts.insert(Mounts::new(&gw.router));
            let agent = Agent::start_in(held, &args);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(agent.pid() as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
            let (status, _) = agent.wait_exit(Duration::from_secs(5));
            assert!(
                !status.success(),
                "{}: the agent survived SIGKILL",
                case.name
            );
            None
        }
        Mode::Agent => {
            let args = recipe::agent_args(case);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Some(Agent::start(&gw.router, &args))
        }
    };
    if case.extra_addr == ExtraAddr::WhileRunning {
        add_extra_addr(&gw, case.fam);
        // Time for the agent to see the netlink event; the kernel run waits as long.
        std::thread::sleep(Duration::from_millis(300));
    }
    let mut notes = String::new();
    let outcome = exchange::exchange(&gw, case, &mut notes);
    if let Some(agent) = agent {
        let (status, log) = agent.stop();
        assert!(
            status.success(),
            "{}: the agent exited with {status}:\n{log}",
            case.name
        );
        if let Some(line) = log.lines().find(|l| l.contains(" counters: ")) {
            let counters = line.split(" counters: ").nth(1).unwrap_or(line);
            // Only the counters that moved, to keep the summary short.
            let moved: Vec<&str> = counters
                .split_whitespace()
                .filter(|kv| !kv.ends_with("=0"))
                .collect();
            notes.push_str(&format!(" counters: {}", moved.join(" ")));
        }
    }
    drop(mounts);
    Run { outcome, notes }
}

/// Waits (bounded) until no address in the three namespaces is tentative.
///
/// The testbed adds its global addresses with `nodad`, but the link-local ones go through
/// duplicate address detection (about 2 s). Until the router's link-local address on a
/// veth is usable, it cannot send a neighbour solicitation for a packet whose source is not
/// one of its own addresses: forwarded packets and the replies of transparent sockets
/// (source = the original destination) wait in the neighbour queue. Without this wait every
/// IPv6 case would see its first 2 s of traffic held back, in both runs alike.
fn wait_for_ipv6_dad(gw: &Gateway, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let tentative: Vec<String> = [&gw.client, &gw.router, &gw.server]
            .iter()
            .filter_map(|ns| {
                let out = ns
                    .ip(&["-6", "addr", "show", "tentative"])
                    .expect("ip -6 addr show tentative");
                let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                (!text.is_empty()).then(|| format!("{}: {text}", ns.name))
            })
            .collect();
        if tentative.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: IPv6 addresses still tentative after 5 s:\n{}",
            tentative.join("\n")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Adds [`At::R0Extra`] to r0.
fn add_extra_addr(gw: &Gateway, fam: Fam) {
    let result = match fam {
        Fam::V4 => gw.router.ip(&[
            "addr",
            "add",
            &format!("{}/24", At::R0Extra.ip(fam)),
            "dev",
            testbed::ROUTER_CLIENT_IFACE,
        ]),
        Fam::V6 => gw.router.ip(&[
            "-6",
            "addr",
            "add",
            &format!("{}/64", At::R0Extra.ip(fam)),
            "dev",
            testbed::ROUTER_CLIENT_IFACE,
            "nodad",
        ]),
    };
    result.expect("adding the extra address to r0");
}

fn domain(fam: Fam) -> Domain {
    match fam {
        Fam::V4 => Domain::IPV4,
        Fam::V6 => Domain::IPV6,
    }
}

fn setsockopt_int(socket: &Socket, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    setsockopt_bytes(socket, level, name, &value.to_ne_bytes())
        .unwrap_or_else(|e| panic!("setsockopt({level}, {name}, {value}): {e}"));
}

fn setsockopt_bytes(
    socket: &Socket,
    level: libc::c_int,
    name: libc::c_int,
    value: &[u8],
) -> io::Result<()> {
    let len = libc::socklen_t::try_from(value.len()).expect("option length");
    // SAFETY: `value` is a valid buffer of `len` bytes for the duration of the call.
    let rc =
        unsafe { libc::setsockopt(socket.as_raw_fd(), level, name, value.as_ptr().cast(), len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
