//! `proxy-bench`: the benchmark behind `cargo xtask bench`. Builds four client / router /
//! server topologies in network namespaces, (a) plain routing, (b) the kernel's iptables
//! TPROXY delivering to this project's proxy, (c) this project's eBPF classifier delivering
//! to the same proxy, (d) the iptables recipe with a SYN-first rule delivering to HAProxy,
//! the peer to beat, and measures them side by side (runs interleaved, each figure the median
//! of several runs). On (a) against (c) it also measures what the agent costs traffic no
//! rule matches (`passthrough.rs`) and UDP throughput, routed against proxied
//! (`udp_throughput.rs`); on (c) alone, what UDP sessions cost the agent's memory; and what
//! `--local`'s connect programs cost the host's own connections (`local.rs`). It writes a
//! markdown table and a PNG chart under `bench/results/`.
//!
//! All traffic stays between the namespaces it creates (the addresses of
//! `proxy-testbed`); every loop is bounded in count and time, and a watchdog stops the whole
//! run if it overruns. Needs root. Not a test: run it with `cargo xtask bench [--quick]`.

mod chart;
mod cpu;
mod haproxy;
mod load;
mod local;
mod passthrough;
mod process;
mod report;
mod setup;
mod udp;
mod udp_rate;
mod udp_throughput;
mod upgrade;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use clap::Parser;
use nix::sys::{
    resource::{Resource, getrlimit, setrlimit},
    signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction},
};
use report::{Meta, Results, RssSample};
use setup::{Kind, Scenario};

#[derive(Parser)]
#[command(
    name = "proxy-bench",
    about = "Benchmark: routing vs iptables TPROXY + proxy vs eBPF classifier + proxy vs iptables + HAProxy, in namespaces"
)]
struct Cli {
    /// The agent binary (release build: target/release/proxy).
    #[arg(long, value_name = "PATH", required_unless_present_any = ["serve", "local_client"])]
    agent: Option<PathBuf>,
    /// Internal: be the load server for SECONDS at most (started by the bench itself, in
    /// the server namespace).
    #[arg(long, value_name = "SECONDS", hide = true)]
    serve: Option<u64>,
    /// Internal: be a `--local` client process, "NS ADDR CONCURRENCY MILLIS" (started by
    /// the bench itself, in its cgroup and namespace).
    #[arg(long, value_name = "SPEC", hide = true)]
    local_client: Option<String>,
    /// Fewer and shorter runs (under 2 minutes instead of under 10).
    #[arg(long)]
    quick: bool,
    /// Where to write latest.md, latest.png and their timestamped copies.
    #[arg(long, value_name = "DIR", default_value = "bench/results")]
    out: PathBuf,
    /// The agent's `--relay` mode for (b) and (c): splice (its default) or copy, to compare
    /// the two.
    #[arg(long, value_name = "MODE", default_value = "splice", value_parser = ["splice", "copy", "sockmap"])]
    relay: String,
    /// One more flag for the agent of (b) and (c), for comparing its settings (repeat it for
    /// several: --agent-arg=--workers=1).
    #[arg(long, value_name = "FLAG", allow_hyphen_values = true)]
    agent_arg: Vec<String>,
    /// Measure only these figures (comma-separated: bulk, conn, latency, rss, udp, rules,
    /// passthrough, udprate, local, upgrade), for working on one of them; the others show as n/a in
    /// the report.
    #[arg(long, value_name = "FIGURES", value_delimiter = ',', value_parser = FIGURES)]
    only: Vec<String>,
}

/// The figures `--only` can pick.
const FIGURES: [&str; 10] = [
    "bulk",
    "conn",
    "latency",
    "rss",
    "udp",
    "rules",
    "passthrough",
    "udprate",
    "local",
    "upgrade",
];

/// The set-ups a figure measures (`local` makes its own).
fn kinds_for(figure: &str) -> &'static [Kind] {
    match figure {
        "bulk" | "conn" | "latency" => &Kind::ALL,
        "rss" => &[Kind::Iptables, Kind::Ebpf, Kind::Haproxy],
        "udp" => &[Kind::Ebpf],
        "rules" => &[Kind::Iptables, Kind::Ebpf],
        "passthrough" | "udprate" => &[Kind::Routing, Kind::Ebpf],
        "upgrade" => &[Kind::Ebpf, Kind::Haproxy],
        _ => &[],
    }
}

impl Cli {
    fn wants(&self, figure: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|f| f == figure)
    }

    /// The set-ups the wanted figures need, in the order of [`Kind::ALL`].
    fn kinds(&self) -> Vec<Kind> {
        Kind::ALL
            .into_iter()
            .filter(|k| {
                FIGURES
                    .iter()
                    .any(|f| self.wants(f) && kinds_for(f).contains(k))
            })
            .collect()
    }
}

/// How much to measure.
pub struct Plan {
    pub runs: usize,
    pub bulk: Duration,
    pub conn: Duration,
    pub conn_concurrency: usize,
    pub latency_warmup: usize,
    pub latency_samples: usize,
    pub idle_conns: usize,
    pub rss_runs: usize,
    pub rule_counts: [usize; 3],
    /// The `--local` figure: rounds of its four cases (a multiple of 4: the order rotates,
    /// so each case takes each place equally often), and each client's load.
    pub local_runs: usize,
    pub local_duration: Duration,
    pub local_concurrency: usize,
    /// The pass-through figure: runs of each of (a) and (c), each protocol, and how long
    /// each sends. More runs than the others: its target (0.98) is within this machine's
    /// run-to-run noise, so the median needs them.
    pub passthrough_runs: usize,
    pub passthrough_duration: Duration,
    /// The UDP throughput figure: runs, how long each sends, and the flow counts.
    pub udp_rate_runs: usize,
    pub udp_rate_duration: Duration,
    pub udp_flows: [usize; 2],
    /// The upgrade figure: upgrades in a row under load, per proxy.
    pub upgrades: usize,
    /// The watchdog stops the run past this.
    pub hard_limit: Duration,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                runs: 3,
                bulk: Duration::from_secs(1),
                conn: Duration::from_secs(1),
                conn_concurrency: 16,
                latency_warmup: 200,
                latency_samples: 2_000,
                idle_conns: 10_000,
                rss_runs: 1,
                rule_counts: [1, 1_000, 10_000],
                local_runs: 4,
                local_duration: Duration::from_millis(400),
                local_concurrency: 1,
                passthrough_runs: 3,
                passthrough_duration: Duration::from_secs(1),
                udp_rate_runs: 3,
                udp_rate_duration: Duration::from_secs(1),
                udp_flows: [1, 16],
                upgrades: 3,
                hard_limit: Duration::from_secs(240),
            }
        } else {
            Plan {
                runs: 5,
                bulk: Duration::from_secs(3),
                conn: Duration::from_secs(3),
                conn_concurrency: 16,
                latency_warmup: 500,
                latency_samples: 10_000,
                idle_conns: 10_000,
                rss_runs: 3,
                rule_counts: [1, 1_000, 10_000],
                local_runs: 8,
                local_duration: Duration::from_millis(600),
                local_concurrency: 1,
                passthrough_runs: 9,
                passthrough_duration: Duration::from_secs(2),
                udp_rate_runs: 5,
                udp_rate_duration: Duration::from_secs(2),
                udp_flows: [1, 16],
                upgrades: 5,
                hard_limit: Duration::from_secs(900),
            }
        }
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

/// True once SIGINT/SIGTERM arrived or the watchdog fired: every load loop checks it.
pub fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn install_signal_handlers() -> Result<(), String> {
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(sig, &action) }.map_err(|e| format!("sigaction {sig}: {e}"))?;
    }
    Ok(())
}

/// 10,000 idle connections take 10,000 descriptors here (the server is a process of its
/// own) and 20,000 in the agent, which inherits this limit. Raises the soft limit to the
/// hard one, and the hard one too where the bench may (CAP_SYS_RESOURCE).
fn raise_nofile() -> Result<u64, String> {
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(|e| e.to_string())?;
    let want = hard.max(262_144.min(nr_open));
    if setrlimit(Resource::RLIMIT_NOFILE, want, want).is_ok() {
        return Ok(want);
    }
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
        .map_err(|e| format!("raising RLIMIT_NOFILE to {hard}: {e}"))?;
    Ok(hard)
}

/// Removes the bench's scratch directory (rules files) however the run ends.
struct Workdir(PathBuf);

impl Drop for Workdir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn check(what: &str) -> Result<(), String> {
    if stopped() {
        Err(format!("stopped (signal or time limit) during {what}"))
    } else {
        Ok(())
    }
}

fn progress(started: Instant, text: &str) {
    eprintln!("[{:>4.0}s] {text}", started.elapsed().as_secs_f64());
}

pub fn fmt_runs(kinds: &[Kind], values: &[Option<f64>], unit: &str) -> String {
    kinds
        .iter()
        .zip(values)
        .map(|(k, v)| match v {
            Some(v) => format!("{} {v:.1}", k.letter()),
            None => format!("{} failed", k.letter()),
        })
        .collect::<Vec<_>>()
        .join(", ")
        + " "
        + unit
}

/// Records a measurement, or a note saying why there is none.
pub fn record<E: std::fmt::Display>(
    results: &mut Results,
    what: &str,
    kind: Kind,
    value: Result<f64, E>,
) -> Option<f64> {
    match value {
        Ok(v) if v.is_finite() => Some(v),
        Ok(v) => {
            results.note(format!("{}: {what}: not a number ({v})", kind.label()));
            None
        }
        Err(e) => {
            results.note(format!("{}: {what}: {e}", kind.label()));
            None
        }
    }
}

/// Probe connections opened first: they tell how many descriptors the agent spends per
/// idle connection, and keep one-time allocations out of the per-connection figure.
pub const PROBE_CONNS: usize = 100;

fn measure_rss(s: &Scenario, plan: &Plan, nofile: u64) -> Result<RssSample, String> {
    let agent = s.proxy_process().ok_or("no proxy running")?;
    let agent_limit: usize = agent
        .nofile_limit()
        .and_then(|l| l.parse().ok())
        .ok_or("cannot read the proxy's open-files limit")?;
    let fds_before = agent.open_fds();
    let kinds_before = agent.fd_kinds();
    let (probe, _) = load::open_idle(&s.client, PROBE_CONNS, 16);
    std::thread::sleep(Duration::from_millis(200));
    let kinds_after = agent.fd_kinds();
    let per = |i: usize| {
        kinds_after[i].saturating_sub(kinds_before[i]) as f64 / probe.len().max(1) as f64
    };
    let fd_kinds = format!(
        "{:.1} sockets, {:.1} pipes, {:.1} other",
        per(0),
        per(1),
        per(2)
    );
    let fds_per_conn = if probe.is_empty() {
        2.0
    } else {
        (agent.open_fds().saturating_sub(fds_before) as f64 / probe.len() as f64).max(1.0)
    };
    drop(probe);
    std::thread::sleep(Duration::from_millis(500));
    // What fits: in the agent, its limit at the descriptors it spends per connection; here,
    // one per connection.
    let agent_room =
        (agent_limit.saturating_sub(agent.open_fds() + 64) as f64 / fds_per_conn) as usize;
    let own_room = (nofile as usize).saturating_sub(process::open_fds("self") + 64);
    let count = plan.idle_conns.min(agent_room).min(own_room);
    let before = agent.vm_rss_kib()?;
    let opened_at = Instant::now();
    let (streams, failed) = load::open_idle(&s.client, count, 64);
    let open_secs = opened_at.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    let after = agent.vm_rss_kib();
    let opened = streams.len();
    drop(streams);
    let after = after?;
    // Let the agent see the closes before the next step.
    std::thread::sleep(Duration::from_millis(500));
    if opened == 0 {
        return Err(format!(
            "no idle connection could be opened ({failed} failed)"
        ));
    }
    Ok(RssSample {
        wanted: plan.idle_conns,
        opened,
        failed,
        before_kib: before,
        after_kib: after,
        open_secs,
        fds_per_conn,
        fd_kinds,
        agent_nofile: agent_limit,
    })
}

fn run(cli: &Cli) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err(
            "the benchmark creates network namespaces and loads eBPF programs: run it as root \
             (cargo xtask bench)"
                .into(),
        );
    }
    let agent = cli.agent.as_deref().ok_or("--agent is required")?;
    let agent_binary = std::fs::canonicalize(agent)
        .map_err(|e| format!("agent binary {}: {e}", agent.display()))?;
    let plan = Plan::new(cli.quick);
    let mut agent_flags = vec!["--relay".to_owned(), cli.relay.clone()];
    agent_flags.extend(cli.agent_arg.iter().cloned());
    setup::set_agent_flags(agent_flags);
    install_signal_handlers()?;
    let nofile = raise_nofile()?;
    let started = Instant::now();
    let hard_limit = plan.hard_limit;
    std::thread::spawn(move || {
        std::thread::sleep(hard_limit);
        eprintln!("proxy-bench: time limit of {hard_limit:?} reached, stopping");
        STOP.store(true, Ordering::Relaxed);
    });
    let workdir = Workdir(std::env::temp_dir().join(format!("proxy-bench-{}", std::process::id())));
    std::fs::create_dir_all(&workdir.0).map_err(|e| format!("{}: {e}", workdir.0.display()))?;

    let mut meta = Meta::collect(cli.quick, &plan, nofile);
    let mut results = Results::new(&plan);
    progress(
        started,
        &format!(
            "{} run: {} cores, kernel {}, load average {}",
            if cli.quick { "quick" } else { "full" },
            meta.cores,
            meta.kernel,
            meta.load_before
        ),
    );

    let mut scenarios = Vec::new();
    // The set-ups serve every figure but the `--local` one, which makes its own.
    for kind in cli.kinds() {
        progress(started, &format!("setting up {}", kind.label()));
        scenarios.push(Scenario::new(
            kind,
            &agent_binary,
            &workdir.0,
            plan.hard_limit + Duration::from_secs(60),
        )?);
    }
    let of_kind = |kind: Kind| scenarios.iter().position(|s| s.kind == kind);
    let (routing, ebpf) = (of_kind(Kind::Routing), of_kind(Kind::Ebpf));
    if let Some(process) = ebpf.and_then(|i| scenarios[i].proxy_process()) {
        meta.agent_nofile = process.nofile_limit();
    }
    if let Some(process) = of_kind(Kind::Haproxy).and_then(|i| scenarios[i].proxy_process()) {
        meta.haproxy_nofile = process.nofile_limit();
    }
    // The set-ups of the figures every set-up takes part in.
    let kinds: Vec<Kind> = scenarios.iter().map(|s| s.kind).collect();
    let all_kinds = kinds.len() == Kind::COUNT;

    for run in (1..=plan.runs).filter(|_| all_kinds) {
        let tag = format!("run {run}/{}", plan.runs);
        for (streams, series) in [(1usize, 0usize), (4, 1)] {
            if !cli.wants("bulk") {
                break;
            }
            let mut shown = Vec::new();
            for s in &scenarios {
                let v = load::bulk(&s.gw.client.name, streams, plan.bulk).map(|bps| bps / 1e9);
                let v = record(
                    &mut results,
                    &format!("bulk, {streams} stream(s)"),
                    s.kind,
                    v,
                );
                results.bulk[series].push(s.kind, v);
                shown.push(v);
            }
            progress(
                started,
                &format!(
                    "{tag}: bulk {streams} stream(s): {}",
                    fmt_runs(&kinds, &shown, "Gbit/s")
                ),
            );
            check("bulk")?;
        }
        let mut shown = Vec::new();
        for s in scenarios.iter().filter(|_| cli.wants("conn")) {
            let proxy_pid = s.proxy_process().map(|p| p.pid);
            let proxy_cpu = || proxy_pid.and_then(cpu::process);
            let (machine_before, proxy_before) = (cpu::machine(), proxy_cpu());
            let r = load::conn_rate(&s.client, plan.conn_concurrency, plan.conn);
            if let (Some(m0), Some(m1)) = (machine_before, cpu::machine()) {
                let proxy = proxy_before.zip(proxy_cpu());
                results.conn_cpu[s.kind.index()].add(r.completed, (m0, m1), proxy);
            }
            results.conn_errors[s.kind.index()] += r.errors;
            results.conn.push(s.kind, Some(r.per_sec));
            shown.push(Some(r.per_sec));
        }
        if cli.wants("conn") {
            progress(
                started,
                &format!("{tag}: new connections: {}", fmt_runs(&kinds, &shown, "/s")),
            );
        }
        check("connection rate")?;
        let (mut p50s, mut p99s) = (Vec::new(), Vec::new());
        for s in scenarios.iter().filter(|_| cli.wants("latency")) {
            let lat = load::latency(&s.gw.client.name, plan.latency_warmup, plan.latency_samples);
            let (p50, p99) = match lat {
                Ok((a, b)) => (Some(a), Some(b)),
                Err(e) => {
                    results.note(format!("{}: latency: {e}", s.kind.label()));
                    (None, None)
                }
            };
            results.p50.push(s.kind, p50);
            results.p99.push(s.kind, p99);
            p50s.push(p50);
            p99s.push(p99);
        }
        if cli.wants("latency") {
            progress(
                started,
                &format!(
                    "{tag}: latency p50: {}; p99: {}",
                    fmt_runs(&kinds, &p50s, "us"),
                    fmt_runs(&kinds, &p99s, "us")
                ),
            );
        }
        check("latency")?;
    }

    if let (Some(a), Some(c)) = (routing, ebpf) {
        let progress = |text: &str| progress(started, text);
        if cli.wants("passthrough") {
            passthrough::measure(&scenarios[a], &scenarios[c], &plan, &mut results, &progress)?;
        }
        if cli.wants("udprate") {
            udp_throughput::measure(&scenarios[a], &scenarios[c], &plan, &mut results, &progress)?;
        }
    }

    for s in scenarios
        .iter_mut()
        .filter(|s| s.has_proxy() && cli.wants("rss"))
    {
        for run in 1..=plan.rss_runs {
            // A fresh proxy each time: memory freed by earlier connections would otherwise
            // be reused and hide the cost.
            s.restart_proxy()?;
            match measure_rss(s, &plan, nofile) {
                Ok(sample) => {
                    progress(
                        started,
                        &format!(
                            "{}: idle connections, run {run}/{}: {} open ({} failed) in {:.1} s, proxy VmRSS {} -> {} KiB, {:.1} KiB and {:.1} descriptors each",
                            s.kind.label(),
                            plan.rss_runs,
                            sample.opened,
                            sample.failed,
                            sample.open_secs,
                            sample.before_kib,
                            sample.after_kib,
                            sample.per_conn_kib(),
                            sample.fds_per_conn
                        ),
                    );
                    results.rss.push(s.kind, Some(sample.per_conn_kib()));
                    results.rss_samples[s.kind.index()].push(sample);
                }
                Err(e) => {
                    progress(
                        started,
                        &format!("{}: idle connections: {e}", s.kind.label()),
                    );
                    results.note(format!("{}: idle connections: {e}", s.kind.label()));
                    results.rss.push(s.kind, None);
                }
            }
            for line in s.proxy_warnings() {
                results.agent_warning(s.kind, line);
            }
            check("idle connections")?;
        }
    }

    if let Some(s) = ebpf
        .and_then(|i| scenarios.get_mut(i))
        .filter(|_| cli.wants("udp"))
    {
        match udp::measure(s, nofile) {
            Ok(sample) => {
                progress(
                    started,
                    &format!(
                        "{}: udp flood of {} source ports at a cap of {}: {} sessions live, agent VmRSS {} -> {} KiB ({:.1} KiB per session), {} KiB after they ended",
                        s.kind.label(),
                        sample.sent,
                        udp::CAP,
                        sample.live,
                        sample.baseline_kib,
                        sample.live_kib,
                        sample.per_session_kib(),
                        sample.ended_kib
                    ),
                );
                for line in &sample.warnings {
                    results.agent_warning(s.kind, line.clone());
                }
                results.udp = Some(sample);
            }
            Err(e) => {
                progress(started, &format!("{}: udp sessions: {e}", s.kind.label()));
                results.note(format!("{}: udp sessions: {e}", s.kind.label()));
            }
        }
        check("udp sessions")?;
    }

    for kind in [Kind::Ebpf, Kind::Haproxy]
        .into_iter()
        .filter(|_| cli.wants("upgrade"))
    {
        let Some(s) = scenarios.iter_mut().find(|s| s.kind == kind) else {
            continue;
        };
        match upgrade::measure(s, plan.upgrades) {
            Ok(sample) => {
                progress(
                    started,
                    &format!(
                        "{}: {} upgrades under load: new connections {} ok, {} failed, {} slower than 200 ms (slowest {:.1} ms), {} past the proxy; long-lived {} of {} cut{}",
                        kind.label(),
                        sample.upgrades,
                        sample.new_ok,
                        sample.new_failed,
                        sample.new_slow,
                        sample.max_connect_ms,
                        sample.new_direct,
                        sample.long_cut,
                        sample.long,
                        if sample.errors.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", sample.errors.join("; "))
                        }
                    ),
                );
                results.upgrade[kind.index()] = Some(sample);
            }
            Err(e) => {
                progress(started, &format!("{}: upgrades: {e}", kind.label()));
                results.note(format!("{}: upgrades: {e}", kind.label()));
            }
        }
        check("upgrades")?;
    }

    // Rule counts interleaved run by run too, so that a drift of the machine's load over
    // the minutes does not masquerade as a cost of the rules.
    for run in (1..=plan.runs).filter(|_| cli.wants("rules")) {
        for (i, &count) in plan.rule_counts.iter().enumerate() {
            let t = Instant::now();
            for s in scenarios.iter_mut().filter(|s| s.has_agent()) {
                // (c) restarts its agent here: keep what the old one warned about.
                if let Some(agent) = s.agent() {
                    for line in agent.notable() {
                        results.agent_warning(s.kind, line);
                    }
                }
                s.set_rules(count)?;
            }
            let setup_secs = t.elapsed().as_secs_f64();
            let mut shown = Vec::new();
            let mut shown_kinds = Vec::new();
            for s in scenarios.iter().filter(|s| s.has_agent()) {
                let r = load::conn_rate(&s.client, plan.conn_concurrency, plan.conn);
                results.rule_conn_errors[s.kind.index()] += r.errors;
                results.rules[i].push(s.kind, Some(r.per_sec));
                shown.push(Some(r.per_sec));
                shown_kinds.push(s.kind);
            }
            progress(
                started,
                &format!(
                    "run {run}/{}, {count} rule(s) (set up in {setup_secs:.1} s): new connections: {}",
                    plan.runs,
                    fmt_runs(&shown_kinds, &shown, "/s")
                ),
            );
            check("rules")?;
        }
    }
    for s in &scenarios {
        for line in s.proxy_warnings() {
            results.agent_warning(s.kind, line);
        }
    }

    if !scenarios.is_empty() {
        progress(started, "tearing down");
    }
    let mut names: Vec<String> = scenarios
        .iter()
        .flat_map(|s| [&s.gw.client.name, &s.gw.router.name, &s.gw.server.name])
        .cloned()
        .collect();
    drop(scenarios);

    // After the other figures' set-ups are gone: the `--local` figure's clients have the
    // machine to themselves, as the other figures' have.
    if cli.wants("local") {
        progress(
            started,
            "--local: setting up (cgroups, two topologies, the agent)",
        );
        let (local_names, local) = local::measure(
            &agent_binary,
            &plan,
            plan.hard_limit + Duration::from_secs(60),
            &|text| progress(started, text),
        );
        names.extend(local_names);
        match local {
            Ok(r) => results.local = Some(r),
            Err(e) => {
                progress(started, &format!("--local: {e}"));
                results.note(format!("--local: {e}"));
            }
        }
    }
    let leaked = leaked_namespaces(&names);
    if !leaked.is_empty() {
        results.note(format!("namespaces left behind: {}", leaked.join(", ")));
    }
    meta.finish(started.elapsed());
    write_outputs(&cli.out, &meta, &results)?;
    if !leaked.is_empty() {
        return Err(format!("namespaces left behind: {}", leaked.join(", ")));
    }
    progress(started, "done");
    Ok(())
}

fn leaked_namespaces(names: &[String]) -> Vec<String> {
    let listed = proxy_testbed::ip(&["netns", "list"])
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    listed
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| names.iter().any(|ours| ours == n))
        .map(str::to_owned)
        .collect()
}

fn write_outputs(dir: &Path, meta: &Meta, results: &Results) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let stamp = meta.file_stamp();
    let png_name = format!("{stamp}.png");
    let markdown = report::markdown(meta, results, &png_name);
    let md_path = dir.join(format!("{stamp}.md"));
    std::fs::write(&md_path, &markdown).map_err(|e| format!("{}: {e}", md_path.display()))?;
    let latest_md = dir.join("latest.md");
    std::fs::write(
        &latest_md,
        report::markdown(meta, results, "latest.png").as_bytes(),
    )
    .map_err(|e| format!("{}: {e}", latest_md.display()))?;
    let png_path = dir.join(&png_name);
    chart::draw(&png_path, meta, results)?;
    std::fs::copy(&png_path, dir.join("latest.png"))
        .map_err(|e| format!("copying the chart to latest.png: {e}"))?;
    println!("{markdown}");
    eprintln!(
        "proxy-bench: wrote {}, {} (and latest.md, latest.png)",
        md_path.display(),
        png_path.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match (cli.serve, &cli.local_client) {
        (Some(secs), _) => load::serve_main(secs),
        (None, Some(spec)) => local::client_main(spec),
        (None, None) => run(&cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("proxy-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}
