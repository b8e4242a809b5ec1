//! `proxy doctor`: what in this network namespace would stop interception, one line per
//! finding with its fix. `proxy run` runs the same checks at start and logs what they find.
//!
//! Each group of checks has its own module: a pure function from what was read (sysctl
//! values, rule and route lists, tc listings, socket tables, netfilter listings) to
//! [`Finding`]s, unit-tested, and the reading of the system next to it.
//!
//! * [`sysctls`]: IP forwarding, `src_valid_mark` with `accept_local`/`rp_filter`,
//!   `bridge-nf-call-iptables` on a bridge;
//! * [`tc`]: programs of others at an interface's TC ingress that decide before ours;
//! * [`routing`]: policy rules and routes of others on our fwmark or table;
//! * [`ports`]: the on-port already taken (built-in listener);
//! * [`kernel`]: BTF, TCX, sk_lookup and sk_assign (the programs loaded), cgroup v2;
//! * [`netfilter`]: iptables/nftables rules that touch the mark.

mod kernel;
mod netfilter;
mod ports;
mod routing;
mod sysctls;
mod tc;

use std::fmt;

use log::{error, info, warn};

use crate::{
    config::{ListenerMode, RunArgs},
    rules::{Mark, Rule},
};

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Checked, and fine.
    Ok,
    /// Not checked, or nothing to act on (a tool is absent, a feature falls back).
    Info,
    /// Might get in the way; interception can work.
    Warning,
    /// Stops interception (or the agent's start) as the host stands.
    Problem,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(match self {
            Severity::Ok => "OK",
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Problem => "problem",
        })
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// A stable word naming the check (`forwarding`, `src_valid_mark`, `table`, ...).
    pub check: &'static str,
    /// What was found.
    pub what: String,
    /// What to do about it; empty when there is nothing to do.
    pub fix: String,
}

impl Finding {
    pub fn ok(check: &'static str, what: impl Into<String>) -> Self {
        Self::new(Severity::Ok, check, what, "")
    }

    pub fn info(check: &'static str, what: impl Into<String>) -> Self {
        Self::new(Severity::Info, check, what, "")
    }

    pub fn warning(check: &'static str, what: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(Severity::Warning, check, what, fix)
    }

    pub fn problem(check: &'static str, what: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::new(Severity::Problem, check, what, fix)
    }

    fn new(
        severity: Severity,
        check: &'static str,
        what: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Finding {
            severity,
            check,
            what: what.into(),
            fix: fix.into(),
        }
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<7} {}: {}", self.severity, self.check, self.what)?;
        if !self.fix.is_empty() {
            write!(f, "; fix: {}", self.fix)?;
        }
        Ok(())
    }
}

/// Everything the checks found.
#[derive(Debug, Default)]
pub struct Report {
    pub findings: Vec<Finding>,
}

impl Report {
    /// Whether anything stops interception.
    pub fn blocked(&self) -> bool {
        self.findings
            .iter()
            .any(|f| f.severity == Severity::Problem)
    }

    fn count(&self, severity: Severity) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == severity)
            .count()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for finding in &self.findings {
            writeln!(f, "{finding}")?;
        }
        writeln!(
            f,
            "{} problem(s), {} warning(s)",
            self.count(Severity::Problem),
            self.count(Severity::Warning)
        )
    }
}

/// What the checks need to know of the settings: the rule flags of `proxy run`.
struct Settings<'a> {
    /// The `--iface`s, `lo` included with `--local`.
    ifaces: Vec<String>,
    rules: &'a [Rule],
    args: &'a RunArgs,
}

impl Settings<'_> {
    /// The distinct marks of the rules.
    fn marks(&self) -> Vec<Mark> {
        let mut marks: Vec<Mark> = Vec::new();
        for rule in self.rules {
            if !marks.contains(&rule.mark) {
                marks.push(rule.mark);
            }
        }
        marks
    }

    /// Whether a rule may match IPv4 (and IPv6): a rule without `--dst` matches both.
    fn families(&self) -> (bool, bool) {
        let v4 = self
            .rules
            .iter()
            .any(|r| r.dst.is_empty() || r.dst.iter().any(|p| p.addr().is_ipv4()));
        let v6 = self
            .rules
            .iter()
            .any(|r| r.dst.is_empty() || r.dst.iter().any(|p| p.addr().is_ipv6()));
        (v4, v6)
    }

    /// A gateway: an interface other than `lo` is classified.
    fn gateway(&self) -> bool {
        self.ifaces.iter().any(|i| i != "lo")
    }
}

/// Where the checks run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `proxy doctor`: everything, the programs loaded as a probe.
    Doctor,
    /// `proxy run` at start: the agent loads the programs itself right after, so no probe
    /// load here.
    Start,
}

/// Runs every check against this network namespace.
pub async fn inspect(args: &RunArgs, mode: Mode) -> Report {
    let mut findings = Vec::new();
    let rules = match args.rules() {
        Ok(rules) => rules,
        Err(e) => {
            findings.push(Finding::problem(
                "rules",
                crate::error_chain(&e),
                "fix the rules file",
            ));
            Vec::new()
        }
    };
    let mut ifaces = args.ifaces.clone();
    if args.local && !ifaces.iter().any(|i| i == "lo") {
        ifaces.push("lo".to_owned());
    }
    let settings = Settings {
        ifaces,
        rules: &rules,
        args,
    };
    let root = nix::unistd::geteuid().is_root();
    if !root {
        findings.push(Finding::problem(
            "root",
            "not running as root: proxy run refuses to start, and the checks that need \
             privileges (programs, listings) may say less",
            "run as root",
        ));
    }
    findings.extend(interfaces(&settings.ifaces));
    findings.extend(sysctls::check(&settings, mode));
    findings.extend(kernel::check(&settings, mode, root));
    findings.extend(tc::check(&settings));
    findings.extend(routing::check(&settings).await);
    let agent_runs = matches!(
        crate::stats::query(args.table),
        Ok(_) | Err(crate::stats::StatsError::Refused(_))
    );
    if agent_runs && mode == Mode::Doctor {
        findings.push(Finding::problem(
            "agent",
            format!(
                "an agent with table {} already runs in this namespace: proxy run refuses to \
                 start beside it",
                args.table
            ),
            "stop it, or give this one another --table",
        ));
    }
    if args.listener == ListenerMode::Builtin {
        findings.extend(ports::check(&settings, agent_runs));
    }
    findings.extend(netfilter::check(&settings));
    Report { findings }
}

/// The `--iface`s must exist (the agent refuses to start otherwise).
fn interfaces(ifaces: &[String]) -> Vec<Finding> {
    ifaces
        .iter()
        .filter(|i| crate::ifaddrs::ifindex(i).is_none())
        .map(|i| {
            Finding::problem(
                "interface",
                format!("{i} does not exist in this network namespace"),
                "name an interface of this namespace with --iface (ip link)",
            )
        })
        .collect()
}

/// `proxy doctor`: prints the report; true when nothing blocks.
pub async fn run(args: &RunArgs) -> bool {
    let report = inspect(args, Mode::Doctor).await;
    print!("{report}");
    !report.blocked()
}

/// `proxy run` at start: logs what is not OK, problems as errors. Changes nothing: the
/// agent refuses to start only where it did before.
pub async fn log_at_start(args: &RunArgs) {
    let report = inspect(args, Mode::Start).await;
    for finding in &report.findings {
        match finding.severity {
            Severity::Ok => {}
            Severity::Info => info!("doctor: {finding}"),
            Severity::Warning => warn!("doctor: {finding}"),
            Severity::Problem => error!("doctor: {finding}"),
        }
    }
}
