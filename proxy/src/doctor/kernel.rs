//! The kernel features the agent needs: BTF with the transparent flag's place (T5),
//! TCX links (6.6+, else the netlink fallback), `bpf_sk_assign` at TC (5.7+) and `sk_lookup`
//! programs (5.9+), and cgroup v2 for `--local`. `proxy doctor` loads the programs as the
//! agent does: the verifier then says whether this kernel has every helper they call.

use aya::util::KernelVersion;

use crate::kernel_features::Feature;

use super::{Finding, Mode, Settings};
use crate::{
    cgroup,
    config::RunArgs,
    ebpf::TcAttach,
    pins::{self, PinLifetime},
};

/// Why the programs did not load.
#[derive(Debug)]
pub struct LoadRefusal {
    /// The error, one line.
    pub error: String,
    /// A verifier refusal: the program and the log's last lines.
    pub verifier: Option<(&'static str, Vec<String>)>,
}

/// What was learnt of the kernel.
pub struct Facts {
    pub version: Option<KernelVersion>,
    /// The BTF check: `Err` with why the transparent flag cannot be found.
    pub btf: Result<(), String>,
    /// The programs loaded: `None` when not tried.
    pub load: Option<Result<(), LoadRefusal>>,
    /// `--local` only: where cgroup v2 is mounted, or why not.
    pub cgroup2: Option<Result<String, String>>,
    /// How long the agent's pins would live here: `None` at the agent's start, whose
    /// attach says it itself ([`crate::ebpf::AttachChoice::note`]).
    pub pins: Option<PinLifetime>,
}

fn at_least(version: Option<KernelVersion>, major: u8, minor: u8) -> Option<bool> {
    version.map(|v| v >= KernelVersion::new(major, minor, 0))
}

/// The findings for `facts` under `args`' flags.
pub fn features(facts: &Facts, args: &RunArgs) -> Vec<Finding> {
    let mut findings = Vec::new();
    findings.push(match &facts.btf {
        Ok(()) => Finding::ok(
            "btf",
            "/sys/kernel/btf/vmlinux says where sockets keep their transparent flag",
        ),
        Err(e) if args.allow_unchecked_transparency => Finding::warning(
            "btf",
            format!(
                "{e}: with --allow-unchecked-transparency a plain socket at a rule's on-ip and \
                 on-port would receive intercepted traffic"
            ),
            "a kernel built with CONFIG_DEBUG_INFO_BTF",
        ),
        Err(e) => Finding::problem(
            "btf",
            format!("{e}: proxy run refuses to start"),
            "a kernel built with CONFIG_DEBUG_INFO_BTF (or --allow-unchecked-transparency, \
             accepting that plain sockets are not refused)",
        ),
    });
    let version = facts
        .version
        .map_or_else(|| "unknown".to_owned(), |v| v.to_string());
    let tcx = Feature::Tcx;
    findings.push(
        match (facts.version.map(|v| tcx.on(Some(v))), args.tc_attach) {
            (Some(true), TcAttach::Netlink) => Finding::ok(
                "tcx",
                format!("kernel {version} has TCX; --tc-attach netlink uses clsact + cls_bpf"),
            ),
            (Some(true), _) => Finding::ok("tcx", format!("kernel {version} has TCX links")),
            (Some(false) | None, TcAttach::Tcx) => Finding::problem(
                "tcx",
                format!(
                    "kernel {version}: {} need {} or later",
                    tcx.what(),
                    tcx.min_kernel()
                ),
                "--tc-attach auto (clsact + cls_bpf on this kernel)",
            ),
            (_, _) => Finding::info(
                "tcx",
                format!("kernel {version} without TCX: the agent {}", tcx.without()),
            ),
        },
    );
    if let Some(lifetime) = facts.pins
        && let Some(why) = lifetime.why_not()
    {
        let choice = args.tc_attach.choose(facts.version, lifetime);
        let left = "a kill -9 takes the sk_lookup link (the handoff of ports in TIME_WAIT)";
        findings.push(if choice.tcx {
            Finding::warning(
                "bpffs",
                format!(
                    "{why}: with --tc-attach tcx a kill -9 takes the TCX links with it, and \
                     traffic of every rule goes past the proxy until the next agent starts"
                ),
                "--tc-attach auto (cls_bpf here, which outlives the agent), or run the agent \
                 where bpffs outlives it (nsenter --net, not ip netns exec)",
            )
        } else if args.local {
            Finding::warning(
                "bpffs",
                format!(
                    "{why}: the cls_bpf classifier outlives the agent, but {left} and \
                     --local's cgroup links: local connections then go direct until the next \
                     agent starts"
                ),
                "run the agent where bpffs outlives it (nsenter --net, not ip netns exec)",
            )
        } else {
            Finding::info(
                "bpffs",
                format!(
                    "{why}: the classifier is attached with cls_bpf, which outlives it{}; {left}",
                    if args.tc_attach == TcAttach::Auto {
                        " (--tc-attach auto)"
                    } else {
                        ""
                    }
                ),
            )
        });
    }
    match &facts.load {
        Some(Ok(())) => findings.push(Finding::ok(
            "programs",
            "the classifier (bpf_skc_lookup_tcp, bpf_sk_assign) and the sk_lookup program \
             load",
        )),
        Some(Err(refusal)) => findings.push(refused_finding(refusal, facts.version)),
        None => {
            for (check, major, minor, what) in BASELINE {
                findings.push(match at_least(facts.version, major, minor) {
                    Some(true) => Finding::ok(check, format!("kernel {version} has {what}")),
                    Some(false) => Finding::problem(
                        check,
                        format!("kernel {version}: {what} needs {major}.{minor} or later"),
                        format!("a {major}.{minor} or later kernel"),
                    ),
                    None => Finding::info(check, "kernel version unknown"),
                });
            }
        }
    }
    if let Some(cgroup2) = &facts.cgroup2 {
        findings.push(match cgroup2 {
            Ok(at) => Finding::ok("cgroup2", format!("cgroup v2 at {at}")),
            Err(e) => Finding::problem(
                "cgroup2",
                format!("--local needs cgroup v2: {e}"),
                "mount cgroup2 (mount -t cgroup2 none /sys/fs/cgroup)",
            ),
        });
    }
    findings
}

/// The programs did not load: which one, the verifier's last words, and a hint about the
/// kernel only where the version says it lacks something.
fn refused_finding(refusal: &LoadRefusal, version: Option<KernelVersion>) -> Finding {
    let mut what = format!("the programs do not load: {}", refusal.error);
    if let Some((program, tail)) = &refusal.verifier {
        what.push_str(&format!(
            "\n          the verifier's last lines for {program}:"
        ));
        for line in tail {
            what.push_str(&format!("\n            {line}"));
        }
    }
    let lacking: Vec<String> = BASELINE
        .iter()
        .filter(|(_, major, minor, _)| at_least(version, *major, *minor) == Some(false))
        .map(|(_, major, minor, what)| format!("{what} ({major}.{minor}+)"))
        .collect();
    let fix = match version {
        _ if !lacking.is_empty() => format!("a kernel with {}", lacking.join(" and ")),
        Some(v) => format!(
            "kernel {v} has what the programs call: a refusal here is a bug of this build on \
             this kernel; please report it with the verifier log (RUST_LOG=debug proxy doctor)"
        ),
        None => "RUST_LOG=debug shows the verifier log (the kernel's version is unknown)".into(),
    };
    Finding::problem("programs", what, fix)
}

/// What every mode needs, and since which version: (check, major, minor, what).
const BASELINE: [(&str, u8, u8, &str); 2] = [
    ("sk_assign", 5, 7, "bpf_sk_assign at TC"),
    ("sk_lookup", 5, 9, "sk_lookup programs"),
];

pub(super) fn check(settings: &Settings<'_>, mode: Mode, root: bool) -> Vec<Finding> {
    let args = settings.args;
    let probe_load = mode == Mode::Doctor && root;
    let facts = Facts {
        version: KernelVersion::current().ok(),
        btf: crate::btf::Btf::from_sys_fs()
            .and_then(|btf| btf.sock_offsets())
            .map(drop)
            .map_err(|e| crate::error_chain(&e)),
        load: probe_load.then(|| {
            crate::ebpf::Classifier::load(0, true, args.table)
                .map(drop)
                .map_err(|e| LoadRefusal {
                    error: crate::error_chain(&e),
                    verifier: e
                        .verifier_tail()
                        .map(|(program, tail)| (program, tail.to_vec())),
                })
        }),
        cgroup2: args.local.then(|| {
            cgroup::mount()
                .map(|p| p.display().to_string())
                .map_err(|e| crate::error_chain(&e))
        }),
        pins: (mode == Mode::Doctor).then(pins::pin_lifetime),
    };
    features(&facts, args)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::{
        config::{Cli, Command},
        doctor::Severity,
    };

    fn args(extra: &[&str]) -> RunArgs {
        let base = [
            "proxy",
            "run",
            "--iface",
            "r0",
            "--dport",
            "80",
            "--on-port",
            "1",
        ];
        let cli = Cli::try_parse_from(base.iter().chain(extra)).expect("valid");
        let Command::Run(args) = cli.command else {
            panic!("not run");
        };
        *args
    }

    fn find(findings: &[Finding], check: &str) -> Severity {
        findings
            .iter()
            .find(|f| f.check == check)
            .unwrap_or_else(|| panic!("no {check} finding"))
            .severity
    }

    #[test]
    fn missing_features_are_problems_where_the_agent_needs_them() {
        let good = Facts {
            version: Some(KernelVersion::new(6, 18, 0)),
            btf: Ok(()),
            load: None,
            cgroup2: None,
            pins: Some(PinLifetime::Outlives),
        };
        let f = features(&good, &args(&[]));
        assert!(f.iter().all(|f| f.severity == Severity::Ok), "{f:?}");
        let old = Facts {
            version: Some(KernelVersion::new(5, 8, 0)),
            btf: Err("no BTF".into()),
            load: None,
            cgroup2: Some(Err("not mounted".into())),
            pins: None,
        };
        let f = features(&old, &args(&["--tc-attach", "tcx"]));
        assert_eq!(find(&f, "btf"), Severity::Problem);
        assert_eq!(find(&f, "tcx"), Severity::Problem);
        assert_eq!(find(&f, "sk_assign"), Severity::Ok);
        assert_eq!(find(&f, "sk_lookup"), Severity::Problem);
        assert_eq!(find(&f, "cgroup2"), Severity::Problem);
        let f = features(&old, &args(&["--allow-unchecked-transparency"]));
        assert_eq!(find(&f, "btf"), Severity::Warning);
        assert_eq!(find(&f, "tcx"), Severity::Info);
        let refusal = || LoadRefusal {
            error: "the kernel refused to load program tproxy_ingress_l3".into(),
            verifier: Some((
                "tproxy_ingress_l3",
                vec!["invalid read from stack R10 off=-200 size=8".into()],
            )),
        };
        let refused = Facts {
            load: Some(Err(refusal())),
            ..good
        };
        let f = features(&refused, &args(&[]));
        assert_eq!(find(&f, "programs"), Severity::Problem);
        assert!(f.iter().all(|f| f.check != "sk_lookup"));
        let programs = f.iter().find(|f| f.check == "programs").expect("programs");
        // The program and the verifier's words are named; 6.18 lacks nothing, so no
        // kernel version is suggested.
        assert!(
            programs.what.contains("tproxy_ingress_l3"),
            "{}",
            programs.what
        );
        assert!(
            programs.what.contains("invalid read from stack"),
            "{}",
            programs.what
        );
        let fix = &programs.fix;
        assert!(fix.contains("bug of this build"), "{fix}");
        assert!(!fix.contains("5.7"), "{fix}");
        // On 5.4 the missing helpers are named.
        let old = Facts {
            version: Some(KernelVersion::new(5, 4, 0)),
            load: Some(Err(refusal())),
            btf: Ok(()),
            cgroup2: None,
            pins: None,
        };
        let f = features(&old, &args(&[]));
        let fix = f
            .iter()
            .find(|f| f.check == "programs")
            .map(|f| f.fix.clone());
        assert!(
            fix.as_deref()
                .is_some_and(|f| f.contains("5.7") && f.contains("5.9")),
            "{fix:?}"
        );
    }

    #[test]
    fn pins_that_die_with_the_agent_are_said_and_a_hole_is_a_warning() {
        let facts = |pins| Facts {
            version: Some(KernelVersion::new(6, 18, 0)),
            btf: Ok(()),
            load: None,
            cgroup2: None,
            pins,
        };
        let dies = facts(Some(PinLifetime::DiesWithAgent));
        let f = features(&dies, &args(&[]));
        assert_eq!(find(&f, "bpffs"), Severity::Info);
        let text = &f.iter().find(|f| f.check == "bpffs").expect("bpffs").what;
        assert!(text.contains("cls_bpf"), "{text}");
        assert_eq!(
            find(&features(&dies, &args(&["--tc-attach", "tcx"])), "bpffs"),
            Severity::Warning
        );
        assert_eq!(
            find(&features(&dies, &args(&["--local"])), "bpffs"),
            Severity::Warning
        );
        // Where they outlive it, or at the agent's start (its attach says it): nothing.
        for pins in [Some(PinLifetime::Outlives), None] {
            let f = features(&facts(pins), &args(&["--tc-attach", "tcx"]));
            assert!(f.iter().all(|f| f.check != "bpffs"), "{f:?}");
        }
    }
}
