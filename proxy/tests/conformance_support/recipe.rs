//! The case's rule, installed two ways: the kernel's classic TPROXY recipe (iptables or
//! ip6tables, the fwmark rule and the local route) in the router namespace, and the same rule
//! as `proxy run` flags.

use std::process::Command;

use proxy_testbed::{self as testbed, Gateway};

use super::case::{Case, Fam};

/// The TPROXY mark and routing table of both runs.
const MARK: &str = "0x1/0x1";
const TABLE: &str = "100";

/// Agent syntax to iptables syntax: `80-81` -> `--dport 80:81`, lists through multiport.
fn iptables_ports(dports: &str) -> Vec<String> {
    let ports = dports.replace('-', ":");
    if ports.contains(',') {
        vec!["-m".into(), "multiport".into(), "--dports".into(), ports]
    } else {
        vec!["--dport".into(), ports]
    }
}

/// The classic recipe in the router namespace, for the case's family only.
pub(super) fn install_kernel_tproxy(gw: &Gateway, case: &Case) {
    let (iptables, family_flag, everything) = match case.fam {
        Fam::V4 => ("iptables", "-4", "0.0.0.0/0"),
        Fam::V6 => ("ip6tables", "-6", "::/0"),
    };
    let proto = case.proto.name();
    let head = [
        "-w",
        "-t",
        "mangle",
        "-A",
        "PREROUTING",
        "-i",
        testbed::ROUTER_CLIENT_IFACE,
        "-p",
        proto,
    ];
    let socket_match = ["-m", "socket", "--transparent"];
    let mut rules: Vec<Vec<String>> = vec![
        head.iter()
            .chain(&socket_match)
            .chain(&["-j", "MARK", "--set-mark", MARK])
            .map(|s| (*s).to_owned())
            .collect(),
        head.iter()
            .chain(&socket_match)
            .chain(&["-j", "ACCEPT"])
            .map(|s| (*s).to_owned())
            .collect(),
    ];
    let mut tproxy: Vec<String> = head.iter().map(|s| (*s).to_owned()).collect();
    if let Some(net) = case.rule.dst {
        tproxy.extend(["-d".to_owned(), net.cidr(case.fam).to_owned()]);
    }
    tproxy.extend(iptables_ports(case.rule.dports));
    tproxy.extend([
        "-j".to_owned(),
        "TPROXY".to_owned(),
        "--on-port".to_owned(),
        case.rule.on_port.to_string(),
        "--tproxy-mark".to_owned(),
        MARK.to_owned(),
    ]);
    if let Some(at) = case.rule.on_ip {
        tproxy.extend(["--on-ip".to_owned(), at.ip(case.fam).to_string()]);
    }
    rules.push(tproxy);
    for args in &rules {
        run_command(gw.router.command(iptables).args(args));
    }
    gw.router
        .ip(&[family_flag, "rule", "add", "fwmark", MARK, "lookup", TABLE])
        .expect("ip rule add fwmark");
    gw.router
        .ip(&[
            family_flag,
            "route",
            "add",
            "local",
            everything,
            "dev",
            "lo",
            "table",
            TABLE,
        ])
        .expect("ip route add local");
}

fn run_command(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `proxy run` flags mirroring the iptables rule.
pub(super) fn agent_args(case: &Case) -> Vec<String> {
    let mut args: Vec<String> = [
        "run",
        "--iface",
        testbed::ROUTER_CLIENT_IFACE,
        "--listener",
        "external",
        "--protocol",
        case.proto.name(),
        "--dport",
        case.rule.dports,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.extend(["--on-port".to_owned(), case.rule.on_port.to_string()]);
    if let Some(at) = case.rule.on_ip {
        args.extend(["--on-ip".to_owned(), at.ip(case.fam).to_string()]);
    }
    if let Some(net) = case.rule.dst {
        args.extend(["--dst".to_owned(), net.cidr(case.fam).to_owned()]);
    }
    args
}
