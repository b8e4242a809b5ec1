//! The sysctls that decide whether intercepted packets get through: forwarding on a
//! gateway, `src_valid_mark` with `accept_local` and `rp_filter` (see
//! [`crate::src_valid_mark`] for why), and `bridge-nf-call-iptables` on a bridge. All are
//! per network namespace; they are read from `/proc/sys/net` as this process sees it.

use std::path::Path;

use super::{Finding, Mode, Settings};

/// The IPv4 settings of one `conf` directory (`all` or an interface) that matter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Conf {
    pub src_valid_mark: u32,
    pub accept_local: u32,
    pub rp_filter: u32,
}

/// IP forwarding, needed on a gateway for everything the rules do not intercept (the
/// intercepted flows themselves are delivered locally). `None`: the sysctl is absent (IPv6
/// disabled).
pub fn forwarding(gateway: bool, v4: (bool, Option<u32>), v6: (bool, Option<u32>)) -> Vec<Finding> {
    if !gateway {
        return vec![Finding::info(
            "forwarding",
            "no --iface but lo: not a gateway, forwarding not needed",
        )];
    }
    let mut findings = Vec::new();
    for ((used, value), name, family) in [
        (v4, "net.ipv4.ip_forward", "IPv4"),
        (v6, "net.ipv6.conf.all.forwarding", "IPv6"),
    ] {
        match value {
            Some(0) if used => findings.push(Finding::problem(
                "forwarding",
                format!(
                    "{name}=0: this host does not forward {family}, so as a gateway it drops \
                     what the rules do not intercept"
                ),
                format!("sysctl -w {name}=1"),
            )),
            Some(0) => findings.push(Finding::info(
                "forwarding",
                format!("{name}=0 (no rule covers {family})"),
            )),
            Some(_) => findings.push(Finding::ok("forwarding", format!("{name}=1"))),
            None => findings.push(Finding::info("forwarding", format!("{name} absent"))),
        }
    }
    findings
}

/// `src_valid_mark` in effect on an interface (`conf.all` OR the interface) makes the
/// reverse-path check of a marked IPv4 packet look the client up in the tproxy table, where
/// it is local: dropped unless `accept_local` (all OR interface) is on and `rp_filter` (the
/// larger of all and interface) is not strict (1). `proxy run` sets what is missing while it
/// runs; at start (`mode` [`Mode::Start`]) that is only said.
pub fn src_valid_mark(all: Conf, ifaces: &[(String, Conf)], mode: Mode) -> Vec<Finding> {
    let mut findings = Vec::new();
    for (iface, conf) in ifaces {
        if iface == "lo" {
            continue;
        }
        let source = if all.src_valid_mark != 0 {
            "conf.all"
        } else if conf.src_valid_mark != 0 {
            "the interface"
        } else {
            continue;
        };
        let dev = iface.replace('.', "/");
        let mut needed = Vec::new();
        if all.accept_local == 0 && conf.accept_local == 0 {
            needed.push(format!("net.ipv4.conf.{dev}.accept_local=1"));
        }
        if all.rp_filter.max(conf.rp_filter) == 1 {
            needed.push(format!("net.ipv4.conf.{dev}.rp_filter=2"));
        }
        let what = format!("src_valid_mark=1 ({source}) on {iface}");
        if needed.is_empty() {
            findings.push(Finding::ok(
                "src_valid_mark",
                format!("{what}, with accept_local on and rp_filter not strict"),
            ));
            continue;
        }
        let fix = needed.join(" and ");
        findings.push(match mode {
            Mode::Doctor => Finding::problem(
                "src_valid_mark",
                format!(
                    "{what}{}: intercepted IPv4 fails the reverse-path check (the client looks \
                     local under the tproxy mark) and is dropped",
                    if all.rp_filter.max(conf.rp_filter) == 1 {
                        " and strict rp_filter"
                    } else {
                        ""
                    }
                ),
                format!(
                    "proxy run sets {fix} itself while it runs (restored on exit); for \
                     another tproxy setup, sysctl -w {}",
                    needed.join(" ")
                ),
            ),
            Mode::Start => Finding::info(
                "src_valid_mark",
                format!("{what}: the agent sets {fix} while it runs"),
            ),
        });
    }
    if findings.is_empty() {
        findings.push(Finding::ok("src_valid_mark", "src_valid_mark is off"));
    }
    findings
}

/// A bridge given as `--iface` with `bridge-nf-call-iptables=1` (br_netfilter loaded): the
/// bridged IPv4 goes through iptables and a route lookup of br_netfilter before the stack
/// sees it. `call` is `None` when br_netfilter is not loaded (no sysctl): no problem.
pub fn bridge_nf(bridges: &[String], call: Option<u32>) -> Vec<Finding> {
    if bridges.is_empty() {
        return Vec::new();
    }
    let list = bridges.join(", ");
    vec![match call {
        None => Finding::ok(
            "bridge-nf",
            format!("bridge {list}: br_netfilter not loaded"),
        ),
        Some(0) => Finding::ok(
            "bridge-nf",
            format!("bridge {list}: net.bridge.bridge-nf-call-iptables=0"),
        ),
        Some(_) => Finding::problem(
            "bridge-nf",
            format!(
                "bridge {list} with net.bridge.bridge-nf-call-iptables=1: bridged IPv4 passes \
                 through iptables and br_netfilter's own routing, which can drop or reroute \
                 intercepted packets"
            ),
            "sysctl -w net.bridge.bridge-nf-call-iptables=0 (or unload br_netfilter)",
        ),
    }]
}

pub(super) fn check(settings: &Settings<'_>, mode: Mode) -> Vec<Finding> {
    let (v4, v6) = settings.families();
    let mut findings = forwarding(
        settings.gateway(),
        (v4, read("/proc/sys/net/ipv4/ip_forward")),
        (v6, read("/proc/sys/net/ipv6/conf/all/forwarding")),
    );
    let conf = |dir: &str| Conf {
        src_valid_mark: read(&format!("/proc/sys/net/ipv4/conf/{dir}/src_valid_mark")).unwrap_or(0),
        accept_local: read(&format!("/proc/sys/net/ipv4/conf/{dir}/accept_local")).unwrap_or(0),
        rp_filter: read(&format!("/proc/sys/net/ipv4/conf/{dir}/rp_filter")).unwrap_or(0),
    };
    let ifaces: Vec<(String, Conf)> = settings
        .ifaces
        .iter()
        .map(|i| (i.clone(), conf(&i.replace('.', "/"))))
        .collect();
    findings.extend(src_valid_mark(conf("all"), &ifaces, mode));
    let bridges: Vec<String> = settings
        .ifaces
        .iter()
        .filter(|i| Path::new(&format!("/sys/class/net/{i}/bridge")).exists())
        .cloned()
        .collect();
    findings.extend(bridge_nf(
        &bridges,
        read("/proc/sys/net/bridge/bridge-nf-call-iptables"),
    ));
    findings
}

/// An integer sysctl, `None` when absent or unreadable.
fn read(path: &str) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Severity;

    fn severities(findings: &[Finding]) -> Vec<Severity> {
        findings.iter().map(|f| f.severity).collect()
    }

    #[test]
    fn forwarding_off_is_a_problem_only_on_a_gateway_for_a_covered_family() {
        let on = forwarding(true, (true, Some(1)), (true, Some(1)));
        assert_eq!(severities(&on), [Severity::Ok, Severity::Ok]);
        let off = forwarding(true, (true, Some(0)), (false, Some(0)));
        assert_eq!(severities(&off), [Severity::Problem, Severity::Info]);
        assert!(off[0].what.contains("net.ipv4.ip_forward=0"));
        assert!(off[0].fix.contains("sysctl -w net.ipv4.ip_forward=1"));
        let local = forwarding(false, (true, Some(0)), (true, Some(0)));
        assert_eq!(severities(&local), [Severity::Info]);
        let no_v6 = forwarding(true, (true, Some(1)), (true, None));
        assert_eq!(severities(&no_v6), [Severity::Ok, Severity::Info]);
    }

    fn conf(src_valid_mark: u32, accept_local: u32, rp_filter: u32) -> Conf {
        Conf {
            src_valid_mark,
            accept_local,
            rp_filter,
        }
    }

    #[test]
    fn src_valid_mark_needs_accept_local_and_no_strict_rp_filter() {
        let r0 = |c: Conf| vec![("r0".to_owned(), c)];
        // Off everywhere.
        let off = src_valid_mark(conf(0, 0, 1), &r0(conf(0, 0, 1)), Mode::Doctor);
        assert_eq!(severities(&off), [Severity::Ok]);
        // conf.all on, nothing else: accept_local is missing.
        let bad = src_valid_mark(conf(1, 0, 0), &r0(conf(0, 0, 0)), Mode::Doctor);
        assert_eq!(severities(&bad), [Severity::Problem]);
        assert!(bad[0].fix.contains("net.ipv4.conf.r0.accept_local=1"));
        assert!(!bad[0].fix.contains("rp_filter"));
        // On the interface only, with strict rp_filter in conf.all: both are needed.
        let strict = src_valid_mark(conf(0, 1, 1), &r0(conf(1, 0, 0)), Mode::Doctor);
        assert_eq!(severities(&strict), [Severity::Problem]);
        assert!(strict[0].what.contains("strict rp_filter"));
        assert!(strict[0].fix.contains("rp_filter=2"));
        assert!(!strict[0].fix.contains("accept_local"));
        // Everything in place: loose rp_filter on the interface wins over strict all.
        let fine = src_valid_mark(conf(1, 0, 1), &r0(conf(0, 1, 2)), Mode::Doctor);
        assert_eq!(severities(&fine), [Severity::Ok]);
        // At the agent's start the agent fixes it itself: only said.
        let start = src_valid_mark(conf(1, 0, 0), &r0(conf(0, 0, 0)), Mode::Start);
        assert_eq!(severities(&start), [Severity::Info]);
        // lo is never checked.
        let lo = vec![("lo".to_owned(), conf(0, 0, 0))];
        assert_eq!(
            severities(&src_valid_mark(conf(1, 0, 0), &lo, Mode::Doctor)),
            [Severity::Ok]
        );
    }

    #[test]
    fn bridge_nf_call_iptables_bites_only_on_a_bridge_with_br_netfilter() {
        let br = ["br0".to_owned()];
        assert!(bridge_nf(&[], Some(1)).is_empty());
        assert_eq!(severities(&bridge_nf(&br, None)), [Severity::Ok]);
        assert_eq!(severities(&bridge_nf(&br, Some(0))), [Severity::Ok]);
        let on = bridge_nf(&br, Some(1));
        assert_eq!(severities(&on), [Severity::Problem]);
        assert!(on[0].fix.contains("bridge-nf-call-iptables=0"));
    }
}
