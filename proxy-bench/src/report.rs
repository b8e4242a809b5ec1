//! The measurements, the targets they are judged against, and the markdown report.

use std::{fmt::Write as _, time::Duration};

use crate::{
    Plan,
    cpu::ConnCpu,
    haproxy,
    local::{Case, LocalResults},
    setup::{self, Kind, SynRule},
    udp::{self, UdpSample},
};

/// One figure's runs, per set-up; `None` is a run that failed.
#[derive(Default, Clone)]
pub struct Series {
    runs: [Vec<Option<f64>>; Kind::COUNT],
}

impl Series {
    pub fn push(&mut self, kind: Kind, value: Option<f64>) {
        self.runs[kind.index()].push(value);
    }

    pub fn runs(&self, kind: Kind) -> &[Option<f64>] {
        &self.runs[kind.index()]
    }

    pub fn median(&self, kind: Kind) -> Option<f64> {
        median(self.runs[kind.index()].iter().flatten().copied().collect())
    }

    /// The median of the per-run ratios `num` / `den`, runs paired in order: for set-ups
    /// measured one right after the other in each run, so that a drift of the machine's
    /// load between runs cancels out.
    pub fn paired_ratio(&self, num: Kind, den: Kind) -> Option<f64> {
        median(
            self.runs(num)
                .iter()
                .zip(self.runs(den))
                .filter_map(|(n, d)| ratio(*n, *d))
                .collect(),
        )
    }
}

/// The median of `values` (the mean of the middle two for an even count); `None` if empty.
pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let n = values.len();
    Some(if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    })
}

/// One measurement of the agent's memory with idle connections open through it.
pub struct RssSample {
    /// What the plan asked for; `opened` can be fewer when descriptors run short.
    pub wanted: usize,
    pub opened: usize,
    pub failed: usize,
    pub before_kib: u64,
    pub after_kib: u64,
    pub open_secs: f64,
    /// Descriptors the agent holds per idle connection (measured on probe connections).
    pub fds_per_conn: f64,
    /// The same, by kind ("2.0 sockets, 4.0 pipes, 0.0 other").
    pub fd_kinds: String,
    pub agent_nofile: usize,
}

impl RssSample {
    pub fn per_conn_kib(&self) -> f64 {
        (self.after_kib as f64 - self.before_kib as f64) / self.opened as f64
    }
}

pub struct Results {
    /// 1 stream, 4 streams; Gbit/s.
    pub bulk: [Series; 2],
    /// New connections per second.
    pub conn: Series,
    pub conn_errors: [u64; Kind::COUNT],
    /// CPU time spent during the connection-rate runs.
    pub conn_cpu: [ConnCpu; Kind::COUNT],
    /// Microseconds.
    pub p50: Series,
    pub p99: Series,
    /// KiB per idle proxied connection.
    pub rss: Series,
    pub rss_samples: [Vec<RssSample>; Kind::COUNT],
    pub rule_counts: [usize; 3],
    /// New connections per second with `rule_counts[i]` rules.
    pub rules: [Series; 3],
    pub rule_conn_errors: [u64; Kind::COUNT],
    /// Traffic no rule matches, (a) and (c): TCP bulk, Gbit/s; UDP, datagrams/s.
    pub passthrough_tcp: Series,
    pub passthrough_udp: Series,
    /// UDP throughput, (a) and (c), for each of `udp_flows`: datagrams/s received, and the
    /// loss (percent).
    pub udp_flows: [usize; 2],
    pub udp_rate: [Series; 2],
    pub udp_loss: [Series; 2],
    /// The agent's memory through a UDP flood, on (c).
    pub udp: Option<UdpSample>,
    /// What `--local`'s connect programs cost.
    pub local: Option<LocalResults>,
    /// Upgrades under load, (c) and (d).
    pub upgrade: [Option<crate::upgrade::UpgradeSample>; Kind::COUNT],
    pub notes: Vec<String>,
    pub agent_warnings: Vec<(Kind, String)>,
}

impl Results {
    pub fn new(plan: &Plan) -> Results {
        Results {
            bulk: Default::default(),
            conn: Series::default(),
            conn_errors: [0; Kind::COUNT],
            conn_cpu: [ConnCpu::default(); Kind::COUNT],
            p50: Series::default(),
            p99: Series::default(),
            rss: Series::default(),
            rss_samples: Default::default(),
            rule_counts: plan.rule_counts,
            rules: Default::default(),
            rule_conn_errors: [0; Kind::COUNT],
            passthrough_tcp: Series::default(),
            passthrough_udp: Series::default(),
            udp_flows: plan.udp_flows,
            udp_rate: Default::default(),
            udp_loss: Default::default(),
            udp: None,
            local: None,
            upgrade: Default::default(),
            notes: Vec::new(),
            agent_warnings: Vec::new(),
        }
    }

    pub fn note(&mut self, text: String) {
        if !self.notes.contains(&text) && self.notes.len() < 50 {
            self.notes.push(text);
        }
    }

    pub fn agent_warning(&mut self, kind: Kind, line: String) {
        let entry = (kind, line);
        if !self.agent_warnings.contains(&entry) && self.agent_warnings.len() < 40 {
            self.agent_warnings.push(entry);
        }
    }
}

/// What a figure of (c) is judged against.
#[derive(Clone, Copy)]
pub enum Target {
    /// (c) / reference >= x.
    RatioAtLeast(f64),
    /// (c) / reference <= x.
    RatioAtMost(f64),
    /// (c) <= x, absolute.
    AtMost(f64),
}

impl Target {
    pub fn describe(self, reference: &str, unit: &str) -> String {
        match self {
            Target::RatioAtLeast(x) => format!(">= {x} x {reference}"),
            Target::RatioAtMost(x) => format!("<= {x} x {reference}"),
            Target::AtMost(x) => format!("<= {x} {unit}"),
        }
    }

    /// PASS/MISS for `value` given the reference value, or why there is no verdict.
    pub fn verdict(self, value: Option<f64>, reference: Option<f64>) -> &'static str {
        let pass = match (self, value, reference) {
            (Target::AtMost(x), Some(v), _) => v <= x,
            (Target::RatioAtLeast(x), Some(v), Some(r)) if r > 0.0 => v / r >= x,
            (Target::RatioAtMost(x), Some(v), Some(r)) if r > 0.0 => v / r <= x,
            _ => return "n/a",
        };
        if pass { "PASS" } else { "MISS" }
    }
}

/// A row of the main table.
pub struct Row<'a> {
    pub name: &'static str,
    pub short: &'static str,
    pub unit: &'static str,
    pub series: &'a Series,
    pub target: Target,
    /// What a ratio target compares (c) with.
    pub reference: Kind,
    pub decimals: usize,
}

impl Row<'_> {
    /// The target as text, and the verdict for (c).
    pub fn judge(&self) -> (String, &'static str) {
        let c = self.series.median(Kind::Ebpf);
        match self.target {
            Target::AtMost(_) => (
                self.target.describe("", self.unit),
                self.target.verdict(c, None),
            ),
            t => (
                t.describe(&format!("({})", self.reference.letter()), self.unit),
                t.verdict(c, self.series.median(self.reference)),
            ),
        }
    }
}

/// The peer the targets of issue 14 are set against.
pub const PEER: Kind = Kind::Haproxy;

pub fn rows(r: &Results) -> Vec<Row<'_>> {
    vec![
        Row {
            name: "Bulk TCP, 1 stream",
            short: "Bulk, 1 stream",
            unit: "Gbit/s",
            series: &r.bulk[0],
            target: Target::RatioAtLeast(1.3),
            reference: PEER,
            decimals: 2,
        },
        Row {
            name: "Bulk TCP, 4 streams",
            short: "Bulk, 4 streams",
            unit: "Gbit/s",
            series: &r.bulk[1],
            target: Target::RatioAtLeast(1.2),
            reference: PEER,
            decimals: 2,
        },
        Row {
            name: "New connections (request/response, close)",
            short: "New connections",
            unit: "conn/s",
            series: &r.conn,
            target: Target::RatioAtLeast(1.2),
            reference: PEER,
            decimals: 0,
        },
        Row {
            name: "Latency p50, 64 B request/response, kept connection",
            short: "Latency p50",
            unit: "us",
            series: &r.p50,
            target: Target::RatioAtMost(0.8),
            reference: PEER,
            decimals: 1,
        },
        Row {
            name: "Latency p99, 64 B request/response, kept connection",
            short: "Latency p99",
            unit: "us",
            series: &r.p99,
            target: Target::RatioAtMost(1.0),
            reference: PEER,
            decimals: 1,
        },
        Row {
            name: "Proxy RSS per idle proxied connection",
            short: "RSS per idle conn",
            unit: "KiB",
            series: &r.rss,
            target: Target::AtMost(16.0),
            reference: PEER,
            decimals: 1,
        },
    ]
}

/// The classifier-cost target: (c) at the most rules within 5% of (c) at one rule.
pub const RULES_TARGET: Target = Target::RatioAtLeast(0.95);

pub struct Meta {
    pub quick: bool,
    pub runs: usize,
    pub cores: usize,
    pub cpu: String,
    pub kernel: String,
    pub iptables: String,
    pub haproxy: String,
    pub load_before: String,
    pub load_after: String,
    pub started_unix: u64,
    pub elapsed: Duration,
    pub plan: String,
    pub nofile: u64,
    pub agent_nofile: Option<String>,
    pub haproxy_nofile: Option<String>,
}

/// The first line a program prints for `args`, or why there is none.
fn version_line(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|e| format!("{program}: {e}"))
}

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

fn loadavg() -> String {
    read_trimmed("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

impl Meta {
    pub fn collect(quick: bool, plan: &Plan, nofile: u64) -> Meta {
        let runs = plan.runs;
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
            })
            .unwrap_or_else(|| "?".into());
        let iptables = version_line("iptables", &["-V"]);
        let haproxy = version_line(haproxy::PROGRAM, &["-v"]);
        let plan = format!(
            "{} runs per figure, set-ups interleaved run by run; bulk {:.1} s per run; \
             new connections {:.1} s per run with {} concurrent clients; latency {} round trips \
             after {} warm-up; {} idle connections, {} run(s) per set-up, each on a fresh agent; \
             rule counts {:?}, also interleaved run by run (rules replaced before each \
             measurement: iptables-restore for (b), a fresh agent with the rules file for (c)); \
             pass-through {} runs of {:.1} s per set-up and protocol; UDP throughput {} runs of \
             {:.1} s per set-up and flow count",
            plan.runs,
            plan.bulk.as_secs_f64(),
            plan.conn.as_secs_f64(),
            plan.conn_concurrency,
            plan.latency_samples,
            plan.latency_warmup,
            plan.idle_conns,
            plan.rss_runs,
            plan.rule_counts,
            plan.passthrough_runs,
            plan.passthrough_duration.as_secs_f64(),
            plan.udp_rate_runs,
            plan.udp_rate_duration.as_secs_f64(),
        );
        Meta {
            quick,
            runs,
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu,
            kernel: read_trimmed("/proc/sys/kernel/osrelease"),
            iptables,
            haproxy,
            load_before: loadavg(),
            load_after: String::new(),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            elapsed: Duration::ZERO,
            plan,
            nofile,
            agent_nofile: None,
            haproxy_nofile: None,
        }
    }

    pub fn finish(&mut self, elapsed: Duration) {
        self.elapsed = elapsed;
        self.load_after = loadavg();
    }

    /// `YYYY-MM-DDTHH-MM-SSZ`, for file names.
    pub fn file_stamp(&self) -> String {
        let (y, mo, d, h, mi, s) = civil(self.started_unix);
        format!("{y:04}-{mo:02}-{d:02}T{h:02}-{mi:02}-{s:02}Z")
    }

    pub fn date(&self) -> String {
        let (y, mo, d, h, mi, s) = civil(self.started_unix);
        format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02} UTC")
    }

    pub fn mode(&self) -> &'static str {
        if self.quick { "quick" } else { "full" }
    }
}

/// Unix seconds to (year, month, day, hour, minute, second), UTC (Howard Hinnant's
/// days-to-civil).
fn civil(unix: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (unix / 86_400) as i64;
    let rem = unix % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

pub fn fmt_value(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) => {
            let s = format!("{v:.decimals$}");
            if decimals == 0 { thousands(&s) } else { s }
        }
        None => "n/a".into(),
    }
}

fn thousands(digits: &str) -> String {
    let (sign, digits) = digits.strip_prefix('-').map_or(("", digits), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map_or_else(|| "n/a".into(), |r| format!("{r:.2}"))
}

fn fmt_ratio3(r: Option<f64>) -> String {
    r.map_or_else(|| "n/a".into(), |r| format!("{r:.3}"))
}

fn runs_text(runs: &[Option<f64>], decimals: usize) -> String {
    runs.iter()
        .map(|v| v.map_or_else(|| "failed".into(), |v| format!("{v:.decimals$}")))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn markdown(meta: &Meta, r: &Results, png: &str) -> String {
    let mut md = String::new();
    let (a, b, c, d) = (Kind::Routing, Kind::Iptables, Kind::Ebpf, Kind::Haproxy);
    let _ = writeln!(
        md,
        "# Benchmark: eBPF classifier vs iptables TPROXY vs HAProxy vs plain routing\n"
    );
    let _ = writeln!(
        md,
        "- **{} cores** ({}), **kernel {}**",
        meta.cores, meta.cpu, meta.kernel
    );
    let _ = writeln!(
        md,
        "- {} ({} run), took {:.0} s; load average {} at the start, {} at the end",
        meta.date(),
        meta.mode(),
        meta.elapsed.as_secs_f64(),
        meta.load_before,
        meta.load_after
    );
    let _ = writeln!(md, "- {}; {}", meta.iptables, meta.haproxy);
    let _ = writeln!(
        md,
        "- Each figure is the median of its runs. Targets apply to (c), this project's \
         classifier with its proxy, and are set against (d), HAProxy behind the iptables \
         recipe: the proxy a user would pick instead. The chart: [{png}]({png}).\n"
    );

    let _ = writeln!(md, "## Results\n");
    let _ = writeln!(
        md,
        "| figure | {} | {} | {} | {} | (b)/(a) | (c)/(a) | (c)/(b) | (c)/(d) | target for (c) | (c) |",
        a.label(),
        b.label(),
        c.label(),
        d.label()
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|");
    let rss_opened: Vec<usize> = r.rss_samples.iter().flatten().map(|s| s.opened).collect();
    for row in rows(r) {
        let [va, vb, vc, vd] = Kind::ALL.map(|k| row.series.median(k));
        let name = match (std::ptr::eq(row.series, &r.rss), rss_opened.iter().max()) {
            (true, Some(max)) => format!(
                "{}, at {} connections",
                row.name,
                thousands(&max.to_string())
            ),
            _ => row.name.to_owned(),
        };
        let (target, verdict) = row.judge();
        let _ = writeln!(
            md,
            "| {} ({}) | {} | {} | {} | {} | {} | {} | {} | {} | {} | **{}** |",
            name,
            row.unit,
            fmt_value(va, row.decimals),
            fmt_value(vb, row.decimals),
            fmt_value(vc, row.decimals),
            fmt_value(vd, row.decimals),
            fmt_ratio(ratio(vb, va)),
            fmt_ratio(ratio(vc, va)),
            fmt_ratio(ratio(vc, vb)),
            fmt_ratio(ratio(vc, vd)),
            target,
            verdict
        );
    }
    let _ = writeln!(
        md,
        "\n(a) has no proxy, so no proxy memory: its RSS is n/a; (d)'s is HAProxy's. Ratios \
         are plain quotients: for latency and memory, lower is better."
    );
    let short: Vec<&RssSample> = r
        .rss_samples
        .iter()
        .flatten()
        .filter(|s| s.opened < s.wanted)
        .collect();
    if let Some(fewest) = short.iter().map(|s| s.opened).min() {
        let most = short.iter().map(|s| s.opened).max().unwrap_or(fewest);
        let range = if most == fewest {
            thousands(&fewest.to_string())
        } else {
            format!(
                "{} to {}",
                thousands(&fewest.to_string()),
                thousands(&most.to_string())
            )
        };
        let _ = writeln!(
            md,
            "\n**Idle connections: measured at {} connections, not {}.** The proxy's \
             open-files limit is {} (the hard limit on this machine: the bench runs without \
             CAP_SYS_RESOURCE, so it cannot raise it for the proxy to inherit), and the proxy \
             holds {:.1} descriptors per idle proxied connection after one exchange ({}; \
             measured on {} probe connections): more connections would fail with EMFILE.",
            range,
            thousands(&short[0].wanted.to_string()),
            short[0].agent_nofile,
            short[0].fds_per_conn,
            short[0].fd_kinds,
            crate::PROBE_CONNS,
        );
    }
    let _ = writeln!(md);
    conn_cpu_section(&mut md, r);
    passthrough_section(&mut md, r);
    udp_throughput_section(&mut md, r);
    udp_section(&mut md, r);
    local_section(&mut md, r);
    upgrade_section(&mut md, r);

    let _ = writeln!(
        md,
        "## Classifier cost: new connections per second, traffic matching the last rule\n"
    );
    let _ = writeln!(
        md,
        "| rules | (b) iptables TPROXY conn/s | (b) vs 1 rule | (c) eBPF conn/s | (c) vs 1 rule | (c)/(b) | target for (c) | (c) |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---|---|");
    let first = [b, c].map(|k| r.rules[0].median(k));
    for (i, count) in r.rule_counts.iter().enumerate() {
        let [vb, vc] = [b, c].map(|k| r.rules[i].median(k));
        let last = i + 1 == r.rule_counts.len();
        let (target, verdict) = if last {
            (
                format!(
                    "within 5% of 1 rule ({})",
                    RULES_TARGET.describe("1 rule", "")
                ),
                RULES_TARGET.verdict(vc, first[1]),
            )
        } else {
            ("".into(), "")
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            thousands(&count.to_string()),
            fmt_value(vb, 0),
            fmt_ratio(ratio(vb, first[0])),
            fmt_value(vc, 0),
            fmt_ratio(ratio(vc, first[1])),
            fmt_ratio(ratio(vc, vb)),
            target,
            if verdict.is_empty() {
                String::new()
            } else {
                format!("**{verdict}**")
            }
        );
    }

    let _ = writeln!(md, "\n## How each set-up is made\n");
    let _ = writeln!(
        md,
        "Four client / router / server topologies in network namespaces (`proxy-testbed`: \
         client 192.0.2.2 - r0 192.0.2.1 | router | r1 198.51.100.1 - server 198.51.100.2), \
         all present at once; the runs of the four are interleaved. The client connects to \
         198.51.100.2:80. In the client and router namespaces `net.ipv4.tcp_tw_reuse = 1` and \
         `ip_local_port_range = 10000 60999`, for the many short connections.\n"
    );
    let _ = writeln!(
        md,
        "- **(a)** the router only forwards: the limit.\n\
         - **(b)** the kernel's TPROXY delivers port-80 traffic to this project's proxy. In \
         the router namespace, through `iptables-restore`:\n\n```\n{}```\n\n  with `ip {}` and \
         `ip {}`. The proxy is the agent, run as `proxy {}`: there is no flag yet for \
         \"listener only, no classifier\", so its classifier is attached to `lo`, which no \
         benchmark packet crosses, with a rule for port 1 and its own mark and table; what \
         serves is its built-in transparent listener on port {}, to which iptables' TPROXY \
         hands the connections. For N rules, N-1 rules for destinations in 198.18.0.0/15 \
         (never matching, nothing is sent there) come before the one above.\n\
         - **(c)** this project's classifier: `proxy {}` (UDP too, for the UDP figures; the \
         TCP figures send no UDP); for N rules, `proxy run --iface r0 --config FILE` with the \
         same N-1 never-matching rules before `dport = \"80\"`.\n\
         - **(d)** the peer: HAProxy behind the kernel's TPROXY, with a rule that sends SYNs \
         to the listener before the `-m socket` rule (without it, a SYN that reuses the port \
         of a connection in TIME_WAIT goes to that TIME_WAIT socket, and the recipe loses \
         3.4x on new connections). In the router namespace, through `iptables-restore`:\
         \n\n```\n{}```\n\n  with the same `ip rule` and `ip route` as (b). HAProxy runs \
         in the router namespace as `{} -db -f FILE` (foreground, killed at the end), FILE \
         being:\n\n```\n{}```\n\n  It connects to each connection's original destination \
         (`server s 0.0.0.0`, no port) from the router's address, as the agent does. Its \
         open-files limit: {} (it asks for 2 x maxconn + a few and, with `no strict-limits`, \
         starts with what it gets, as the agent does).\n\
         - The agent runs with `RUST_LOG={}`: its per-connection log line (info) is off, the \
         rest of its log (set-up, warnings) on. Its open-files limit: {} (inherited from the \
         bench, which raised its own to {}; the agent raises its soft limit to the hard one, which \
         nothing here may raise further).\n\
         - Both (b) and (c) run the agent with `{}`.\n",
        setup::iptables_rules(1, SynRule::Absent),
        setup::IPTABLES_POLICY_ROUTING[0].join(" "),
        setup::IPTABLES_POLICY_ROUTING[1].join(" "),
        setup::IPTABLES_AGENT_ARGS.join(" "),
        setup::ON_PORT,
        setup::EBPF_AGENT_ARGS.join(" "),
        setup::iptables_rules(1, SynRule::First),
        haproxy::PROGRAM,
        haproxy::config(),
        meta.haproxy_nofile.as_deref().unwrap_or("?"),
        setup::AGENT_LOG,
        meta.agent_nofile.as_deref().unwrap_or("?"),
        meta.nofile,
        setup::agent_flags().join(" "),
    );

    let _ = writeln!(md, "## Method\n");
    let _ = writeln!(md, "- {}.", meta.plan);
    let _ = writeln!(
        md,
        "- Load generators are in the bench process, with threads inside the client and \
         server namespaces (so they share the machine's cores with the router and the agent). \
         Server: tokio, 2 threads. Bulk: blocking writes of 128 KiB for the run's duration; \
         the server counts the bytes it received. New connections: tokio, 2 threads; each \
         client connects, sends 64 B, reads 64 B and closes. Latency: one kept connection, \
         blocking, TCP_NODELAY, one 64 B exchange at a time. Idle connections: each does one \
         64 B exchange (so the proxy has its upstream connection and relay running), then \
         stays open; the proxy's VmRSS (/proc/PID/status) is read before and after; \
         per connection = difference / connections. UDP: 1,200-byte datagrams sent as fast as \
         one thread can (`sendmmsg`, 64 per call) from connected sockets, round-robin over the \
         flows, for the run's duration; the server counts them with `recvmmsg` on one thread \
         (8 MiB receive buffer) and the client reads the count over TCP before and after \
         (300 ms after the last send); rate = received / sending time, loss = 1 - received / \
         sent.\n"
    );

    let _ = writeln!(md, "## All runs\n");
    let _ = writeln!(md, "| figure | set-up | runs |");
    let _ = writeln!(md, "|---|---|---|");
    for row in rows(r) {
        for k in Kind::ALL {
            if row.series.runs(k).is_empty() {
                continue;
            }
            let _ = writeln!(
                md,
                "| {} ({}) | {} | {} |",
                row.short,
                row.unit,
                k.label(),
                runs_text(row.series.runs(k), row.decimals.max(1))
            );
        }
    }
    for (i, count) in r.rule_counts.iter().enumerate() {
        for k in [b, c] {
            let _ = writeln!(
                md,
                "| New connections, {count} rule(s) (conn/s) | {} | {} |",
                k.label(),
                runs_text(r.rules[i].runs(k), 0)
            );
        }
    }
    let traffic = [
        ("Pass-through, TCP to port 81 (Gbit/s)", &r.passthrough_tcp),
        (
            "Pass-through, UDP to port 81 (datagrams/s)",
            &r.passthrough_udp,
        ),
    ];
    let udp_rows = r.udp_flows.iter().enumerate().flat_map(|(i, flows)| {
        [
            (
                format!("UDP, {flows} flow(s) (datagrams/s)"),
                &r.udp_rate[i],
            ),
            (format!("UDP, {flows} flow(s), loss (%)"), &r.udp_loss[i]),
        ]
    });
    for (name, series) in traffic
        .map(|(name, series)| (name.to_owned(), series))
        .into_iter()
        .chain(udp_rows)
    {
        for k in [a, c].into_iter().filter(|k| !series.runs(*k).is_empty()) {
            let _ = writeln!(
                md,
                "| {name} | {} | {} |",
                k.label(),
                runs_text(series.runs(k), 1)
            );
        }
    }
    let _ = writeln!(md);
    for k in [b, c, d] {
        for s in &r.rss_samples[k.index()] {
            let _ = writeln!(
                md,
                "- {}: {} idle connections opened (of {} wanted; {} failed) in {:.1} s; proxy \
                 VmRSS {} KiB before, {} KiB after: {:.1} KiB per connection; {:.1} descriptors \
                 per connection in the proxy ({}; limit {})",
                k.label(),
                s.opened,
                s.wanted,
                s.failed,
                s.open_secs,
                s.before_kib,
                s.after_kib,
                s.per_conn_kib(),
                s.fds_per_conn,
                s.fd_kinds,
                s.agent_nofile
            );
        }
    }
    for k in Kind::ALL {
        let (e1, e2) = (r.conn_errors[k.index()], r.rule_conn_errors[k.index()]);
        if e1 + e2 > 0 {
            let _ = writeln!(
                md,
                "- {}: {e1} failed connection attempts in the connection-rate runs, {e2} in the \
                 rule runs (not counted in the rates)",
                k.label()
            );
        }
    }
    let local_warnings = r.local.as_ref().map_or(&[][..], |l| &l.agent_warnings[..]);
    if !r.notes.is_empty() || !r.agent_warnings.is_empty() || !local_warnings.is_empty() {
        let _ = writeln!(md, "\n## Notes\n");
        for n in &r.notes {
            let _ = writeln!(md, "- {n}");
        }
        for (k, line) in &r.agent_warnings {
            let _ = writeln!(md, "- proxy of {}: `{line}`", k.label());
        }
        for line in local_warnings {
            let _ = writeln!(md, "- agent of the `--local` figure: `{line}`");
        }
    }
    let _ = writeln!(md, "\n![chart]({png})");
    md
}

/// Traffic no rule matches keeps this share of its rate when the agent is attached.
pub const PASSTHROUGH_TARGET: Target = Target::RatioAtLeast(0.98);
/// Proxied UDP, one flow, against routed.
pub const UDP_RATE_TARGET: Target = Target::RatioAtLeast(0.6);

fn passthrough_section(md: &mut String, r: &Results) {
    let (a, c) = (Kind::Routing, Kind::Ebpf);
    if r.passthrough_tcp.runs(a).is_empty() {
        return;
    }
    let _ = writeln!(md, "## Pass-through: traffic no rule matches\n");
    let _ = writeln!(
        md,
        "The same traffic to the server's port 81, which no rule covers, without an agent ({}) \
         and with the agent attached ({}: its classifier on r0 sees every packet, and its rule \
         is for port 80, TCP and UDP): TCP bulk, one stream; UDP, one flow of 1,200-byte \
         datagrams sent as fast as the sender can. The runs alternate which set-up goes first; \
         the verdict is on the median of the per-run ratios (each a pair measured seconds \
         apart), the ratio of the medians beside it.\n",
        a.label(),
        c.label()
    );
    let _ = writeln!(
        md,
        "| traffic | (a) no agent | (c) agent attached | (c)/(a), medians | (c)/(a), median of per-run ratios | runs | target | (c) |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---|---|");
    for (name, series, decimals) in [
        ("TCP bulk, 1 stream (Gbit/s)", &r.passthrough_tcp, 2),
        ("UDP, 1 flow (datagrams/s)", &r.passthrough_udp, 0),
    ] {
        let (va, vc) = (series.median(a), series.median(c));
        let paired = series.paired_ratio(c, a);
        let verdict = match paired {
            Some(p) => PASSTHROUGH_TARGET.verdict(Some(p), Some(1.0)),
            None => "n/a",
        };
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} | {} | {} | {} | **{verdict}** |",
            fmt_value(va, decimals),
            fmt_value(vc, decimals),
            fmt_ratio3(ratio(vc, va)),
            fmt_ratio3(paired),
            series.runs(c).len(),
            PASSTHROUGH_TARGET.describe("(a)", ""),
        );
    }
    let _ = writeln!(md);
}

fn upgrade_section(md: &mut String, r: &Results) {
    let (c, d) = (Kind::Ebpf, Kind::Haproxy);
    if r.upgrade[c.index()].is_none() && r.upgrade[d.index()].is_none() {
        return;
    }
    let _ = writeln!(md, "## Upgrade under load\n");
    let _ = writeln!(
        md,
        "Upgrades of the running proxy in a row, {} s apart, while new connections arrive at \
         200/s (each asks the server which address it came from) and {} long-lived \
         connections exchange a request and its response every 100 ms. {}: a new agent started \
         beside the running one takes its listeners and live connections over \
         (docs/handover.md). {}: HAProxy's seamless reload (master-worker, SIGUSR2, listeners \
         passed through a stats socket with `expose-fd listeners`); its old worker keeps its \
         connections until they end. Per upgrade:\n",
        2,
        crate::upgrade::LONG_LIVED,
        c.label(),
        d.label()
    );
    let _ = writeln!(
        md,
        "| proxy | upgrades | new connections failed | slower than 200 ms | past the proxy | slowest connect | long-lived cut | old process gone after |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---|");
    for kind in [c, d] {
        let Some(u) = &r.upgrade[kind.index()] else {
            let _ = writeln!(md, "| {} | n/a | | | | | | |", kind.label());
            continue;
        };
        let per = |n: usize| {
            if u.upgrades == 0 {
                "n/a".to_owned()
            } else {
                format!("{:.1} ({n} in all)", n as f64 / u.upgrades as f64)
            }
        };
        let exit = if u.old_exit_ms.is_empty() {
            "stays until its connections end".to_owned()
        } else {
            let max = u.old_exit_ms.iter().copied().fold(0.0, f64::max);
            format!("at most {max:.0} ms")
        };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {:.1} ms | {} | {exit} |",
            kind.label(),
            u.upgrades,
            per(u.new_failed),
            per(u.new_slow),
            per(u.new_direct),
            u.max_connect_ms,
            per(u.long_cut),
        );
    }
    let _ = writeln!(md);
}

fn udp_throughput_section(md: &mut String, r: &Results) {
    let (a, c) = (Kind::Routing, Kind::Ebpf);
    if r.udp_rate[0].runs(a).is_empty() {
        return;
    }
    let _ = writeln!(md, "## UDP throughput: routed against proxied\n");
    let _ = writeln!(
        md,
        "1,200-byte datagrams to 198.51.100.2:80 sent as fast as one thread can for the run's \
         duration, from one connected socket and from {} (round-robin), routed ({}) and through \
         the agent's UDP sessions ({}); datagrams per second the server received, and the \
         share of those sent that it did not.\n",
        r.udp_flows[1],
        a.label(),
        c.label()
    );
    let _ = writeln!(
        md,
        "| flows | (a) routed datagrams/s | (a) loss | (c) proxied datagrams/s | (c) loss | (c)/(a) | target for (c) | (c) |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---|---|");
    for (i, flows) in r.udp_flows.iter().enumerate() {
        let (va, vc) = (r.udp_rate[i].median(a), r.udp_rate[i].median(c));
        let loss = |k| {
            r.udp_loss[i]
                .median(k)
                .map_or("n/a".into(), |l| format!("{l:.1}%"))
        };
        let (target, verdict) = if i == 0 {
            (
                UDP_RATE_TARGET.describe("(a)", ""),
                format!("**{}**", UDP_RATE_TARGET.verdict(vc, va)),
            )
        } else {
            (String::new(), String::new())
        };
        let _ = writeln!(
            md,
            "| {flows} | {} | {} | {} | {} | {} | {target} | {verdict} |",
            fmt_value(va, 0),
            loss(a),
            fmt_value(vc, 0),
            loss(c),
            fmt_ratio(ratio(vc, va)),
        );
    }
    let routed_loss = r
        .udp_loss
        .iter()
        .filter_map(|l| l.median(a))
        .fold(0.0, f64::max);
    if routed_loss < 0.5 {
        let _ = writeln!(
            md,
            "\n(a) lost (almost) nothing: what limits it is the one sending thread, which on a \
             veth path carries each datagram through the router to the server's socket in its \
             own system calls. Its rate is the ceiling of this measurement, not of the kernel."
        );
    }
    let _ = writeln!(md);
}

/// Per-session targets: each live session within 64 KiB of the baseline,
/// and back within 32 MiB of it once the sessions have ended.
const UDP_PER_SESSION_TARGET: Target = Target::AtMost(64.0);
const UDP_ENDED_TARGET: Target = Target::AtMost(32.0 * 1024.0);

fn udp_section(md: &mut String, r: &Results) {
    let Some(u) = &r.udp else {
        return;
    };
    let _ = writeln!(md, "## UDP sessions: agent memory\n");
    let _ = writeln!(
        md,
        "{}, run as `proxy {}`: one datagram to 198.51.100.2:80 from each of {} client \
         source ports (100 every 10 ms, the sockets kept open; the server echoes), then \
         nothing until every session has idled out. Agent VmRSS on a fresh agent, with the \
         sessions live, and 1.5 s after they ended. (c) only: this is the agent's own \
         memory, and HAProxy does not proxy UDP, so there is nothing to compare it with.\n",
        Kind::Ebpf.label(),
        udp::agent_args().join(" "),
        thousands(&udp::FLOOD.to_string()),
    );
    let ended_over = u.ended_kib as i64 - u.baseline_kib as i64;
    let _ = writeln!(
        md,
        "| flood (source ports) | cap | sessions live | baseline (KiB) | live (KiB) | per live session (KiB) | target | after they ended (KiB) | vs baseline (KiB) | target |"
    );
    let _ = writeln!(md, "|---:|---:|---:|---:|---:|---:|---|---:|---:|---|");
    let _ = writeln!(
        md,
        "| {} | {} | {} | {} | {} | {:.1} | {} **{}** | {}{} | {}{} | {} **{}** |",
        thousands(&u.sent.to_string()),
        thousands(&udp::CAP.to_string()),
        thousands(&u.live.to_string()),
        thousands(&u.baseline_kib.to_string()),
        thousands(&u.live_kib.to_string()),
        u.per_session_kib(),
        UDP_PER_SESSION_TARGET.describe("", "KiB"),
        UDP_PER_SESSION_TARGET.verdict(Some(u.per_session_kib()), None),
        thousands(&u.ended_kib.to_string()),
        if u.ended {
            ""
        } else {
            " (sessions still open)"
        },
        if ended_over > 0 { "+" } else { "" },
        thousands(&ended_over.to_string()),
        UDP_ENDED_TARGET.describe("", "KiB"),
        UDP_ENDED_TARGET.verdict(Some(ended_over as f64), None),
    );
    let _ = writeln!(md);
}

/// Where the time of a new connection goes: the whole machine's busy CPU per connection,
/// and the agent's share of it, from /proc during the connection-rate runs.
fn conn_cpu_section(md: &mut String, r: &Results) {
    let Some(routing_us) = r.conn_cpu[Kind::Routing.index()].machine_us() else {
        return;
    };
    let _ = writeln!(md, "## CPU per new connection\n");
    let _ = writeln!(
        md,
        "Measured over the same runs as the connection rate: busy CPU time of the whole \
         machine (both cores: load generators, kernel, proxy; /proc/stat) and of the proxy, the agent or HAProxy \
         (/proc/PID/stat; its system time includes the network stack work its syscalls do \
         inline, such as delivering a segment across the veth pair to the server's socket), \
         divided by the connections completed.\n"
    );
    let _ = writeln!(
        md,
        "| set-up | machine busy | machine CPU per connection (us) | vs (a) | proxy user (us) | proxy system (us) |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    for kind in Kind::ALL {
        let c = &r.conn_cpu[kind.index()];
        let Some(machine) = c.machine_us() else {
            continue;
        };
        let (user, system) = c.proxy_us().map_or(("n/a".into(), "n/a".into()), |(u, s)| {
            (format!("{u:.1}"), format!("{s:.1}"))
        });
        let _ = writeln!(
            md,
            "| {} | {} | {machine:.1} | {:.2} | {user} | {system} |",
            kind.label(),
            c.busy_share()
                .map_or("n/a".into(), |b| format!("{:.0}%", b * 100.0)),
            machine / routing_us,
        );
    }
    let _ = writeln!(md);
}

/// The `--local` figure: the four cases, and the two ratios that say what the connect
/// program costs.
fn local_section(md: &mut String, r: &Results) {
    let Some(l) = &r.local else {
        return;
    };
    let _ = writeln!(md, "## `--local`: the host's own connections\n");
    let _ = writeln!(
        md,
        "Clients in the router namespace, each a process of its own that joined its cgroup \
         before it executed: {} connection(s) at a time for {:.1} s, each connect, 64 B \
         request, 64 B response, close with a reset (`SO_LINGER` 0, so no run leaves TIME_WAIT \
         sockets to the next); the four cases in an order rotated run by run. The agent runs \
         as `proxy {}`; case (4) is in a second, identical topology with no agent. Per-run \
         ratios are of clients that ran one after the other; the table gives their median.\n",
        l.concurrency,
        l.duration.as_secs_f64(),
        l.agent_args.join(" "),
    );
    let _ = writeln!(
        md,
        "| case | conn/s | us per connection | p50 (us) | p99 (us) | failed |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    for case in Case::ALL {
        let failed: u64 = l.runs[case.index()]
            .iter()
            .flatten()
            .map(|x| x.errors)
            .sum();
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {failed} |",
            case.label(),
            fmt_value(l.median(case, |x| x.per_sec), 0),
            fmt_value(l.median(case, |x| 1e6 / x.per_sec), 1),
            fmt_value(l.median(case, |x| x.p50_us), 1),
            fmt_value(l.median(case, |x| x.p99_us), 1),
        );
    }
    let _ = writeln!(
        md,
        "\n| ratio (median of per-run ratios) | conn/s | p50 | p99 |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|");
    for (name, a, b) in [
        (
            "(2)/(1): the connect program's own cost",
            Case::Hook,
            Case::Baseline,
        ),
        (
            "(3)/(4): proxied against direct",
            Case::Proxied,
            Case::Direct,
        ),
    ] {
        let _ = writeln!(
            md,
            "| {name} | {} | {} | {} |",
            fmt_ratio3(l.ratio(a, b, |x| x.per_sec)),
            fmt_ratio3(l.ratio(a, b, |x| x.p50_us)),
            fmt_ratio3(l.ratio(a, b, |x| x.p99_us)),
        );
    }
    let _ = writeln!(md, "\nAll runs (conn/s; p50 us):\n");
    for case in Case::ALL {
        let runs = l.runs[case.index()]
            .iter()
            .map(|x| {
                x.map_or_else(
                    || "failed".into(),
                    |x| format!("{:.0}; {:.1}", x.per_sec, x.p50_us),
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(md, "- {}: {runs}", case.short());
    }
    let _ = writeln!(md);
}
