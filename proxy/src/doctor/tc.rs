//! Programs of others at an interface's TC ingress that decide before ours. TCX programs
//! run before every cls_bpf filter (`sch_handle_ingress` runs the legacy chain only on
//! `TCX_NEXT`), and ours is attached after the TCX programs already there
//! (`LinkOrder::default()`, `BPF_F_AFTER`): each of them decides first, and one that returns
//! anything but `TCX_NEXT` (`TC_ACT_UNSPEC`) for a packet ends the chain before ours sees it.
//! A cls_bpf filter of ours is added without a priority, which puts it before the filters
//! already there, so those run after it.

use aya::programs::{SchedClassifier, TcAttachType};

use super::{Finding, Settings};
use crate::{
    ebpf::TC_PROGRAMS,
    tc_filter::{self, BpfFilter},
};

/// The kernel keeps program names up to 15 bytes (`BPF_OBJ_NAME_LEN`).
const NAME_LEN: usize = 15;

/// Whether a program name (as the kernel keeps it) is one of our classifiers.
fn is_classifier(name: &str) -> bool {
    TC_PROGRAMS
        .iter()
        .any(|p| name == &p[..p.len().min(NAME_LEN)])
}

/// One interface: `tcx` the names of the TCX programs at its ingress in order (`Err` when
/// they could not be listed), `filters` the cls_bpf filters at its ingress, `ours_tcx`
/// whether ours would be a TCX link.
pub fn ingress(
    iface: &str,
    tcx: Result<Vec<String>, String>,
    filters: &[BpfFilter],
    ours_tcx: bool,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    match tcx {
        Ok(names) => {
            let (agents, others): (Vec<String>, Vec<String>) =
                names.into_iter().partition(|n| is_classifier(n));
            if !agents.is_empty() {
                findings.push(Finding::info(
                    "tc",
                    format!(
                        "{iface} ingress: a classifier of this proxy is attached (another \
                         agent's, or one a crash left: proxy run takes its own over); it \
                         passes on what its rules do not match"
                    ),
                ));
            }
            if !others.is_empty() {
                findings.push(Finding::problem(
                    "tc",
                    format!(
                        "{iface} ingress: TCX program(s) {} run before ours; any verdict but \
                         TCX_NEXT ends the chain before the classifier sees the packet",
                        others.join(", ")
                    ),
                    "detach them (bpftool net show dev IF; bpftool link detach id N), or have \
                     them return TCX_NEXT for the traffic to intercept",
                ));
            }
        }
        Err(e) if ours_tcx => findings.push(Finding::info(
            "tc",
            format!("{iface} ingress: TCX programs not listed ({e})"),
        )),
        Err(_) => {}
    }
    let foreign: Vec<String> = filters
        .iter()
        .filter(|f| !is_classifier(&f.name))
        .map(|f| {
            format!(
                "{} (pref {})",
                if f.name.is_empty() {
                    "unnamed"
                } else {
                    &f.name
                },
                f.priority
            )
        })
        .collect();
    if !foreign.is_empty() {
        findings.push(Finding::info(
            "tc",
            format!(
                "{iface} ingress: cls_bpf filter(s) {} run after ours ({})",
                foreign.join(", "),
                if ours_tcx {
                    "TCX programs run first"
                } else {
                    "ours is added before them"
                }
            ),
        ));
    }
    if findings.is_empty() {
        findings.push(Finding::ok(
            "tc",
            format!("{iface} ingress: no other program decides first"),
        ));
    }
    findings
}

pub(super) fn check(settings: &Settings<'_>) -> Vec<Finding> {
    let ours_tcx = settings.args.tc_attach.uses_tcx();
    let mut findings = Vec::new();
    for iface in &settings.ifaces {
        let Some(ifindex) = crate::ifaddrs::ifindex(iface) else {
            continue;
        };
        let tcx = SchedClassifier::query_tcx(iface, TcAttachType::Ingress)
            .map(|(_, programs)| {
                programs
                    .iter()
                    .map(|p| p.name_as_str().unwrap_or("?").to_owned())
                    .collect()
            })
            .map_err(|e| crate::error_chain(&e));
        let filters = tc_filter::ingress_bpf_filters(ifindex).unwrap_or_default();
        findings.extend(ingress(iface, tcx, &filters, ours_tcx));
    }
    findings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Severity;

    fn filter(name: &str) -> BpfFilter {
        BpfFilter {
            priority: 1,
            handle: 1,
            name: name.to_owned(),
        }
    }

    #[test]
    fn a_foreign_tcx_program_is_a_problem_and_our_own_or_filters_are_not() {
        let clean = ingress("r0", Ok(vec![]), &[], true);
        assert_eq!(clean[0].severity, Severity::Ok);
        let foreign = ingress("r0", Ok(vec!["cil_from_netdev".into()]), &[], true);
        assert_eq!(foreign[0].severity, Severity::Problem);
        assert!(foreign[0].what.contains("cil_from_netdev"));
        // Our classifiers, the L3 one's name cut to 15 bytes as the kernel keeps it.
        let agents = ingress(
            "r0",
            Ok(vec!["tproxy_ingress".into(), "tproxy_ingress_".into()]),
            &[],
            true,
        );
        assert_eq!(agents.len(), 1);
        assert_eq!(agents[0].severity, Severity::Info);
        let filters = ingress("r0", Err("no TCX".into()), &[filter("other")], false);
        assert_eq!(filters.len(), 1);
        assert_eq!(filters[0].severity, Severity::Info);
        assert!(filters[0].what.contains("other (pref 1)"));
        let ours = ingress("r0", Ok(vec![]), &[filter("tproxy_ingress")], false);
        assert_eq!(ours[0].severity, Severity::Ok);
    }
}
