//! Differential conformance: the kernel's own TPROXY is the oracle.
//!
//! Each case runs twice, each time in fresh namespaces (client -- router -- server): once
//! with the classic recipe in the router namespace (`iptables -t mangle ... -m socket
//! --transparent -j MARK` + `-j ACCEPT`, `... -j TPROXY --on-port P [--on-ip A]
//! --tproxy-mark 0x1/0x1`, `ip rule add fwmark 0x1/0x1 lookup 100`, `ip route add local
//! 0/0 dev lo table 100`, or the ip6tables / `-6` twins), and once with the agent
//! (`proxy run --listener external` with the same flags). The test owns every receiving
//! socket in both runs. The outcomes (who received the connection or datagram, with which
//! local address / original destination, from which peer, how many bytes) must be equal,
//! except where a case declares a documented difference, which is then asserted exactly.
//!
//! The kernel's outcome is also checked against what the case expects of it, so that two
//! runs that saw nothing (a broken harness) cannot pass as equal.
//!
//! `cargo test -p proxy --test conformance -- --nocapture` prints one line per case.

mod common;
mod conformance_support;

use conformance_support::{
    At, Case, ClientOpts, DPORT, ExtraAddr, Fam, Flow, Kind, Mode, Net, ON_PORT, OTHER_PORT, Proto,
    Recv, check_kind, run,
};

/// NOP, NOP, NOP, EOL: a 24-byte IPv4 header that means nothing.
const IPV4_NOP_OPTIONS: &[u8] = &[1, 1, 1, 0];
/// Record route with room for one address (filled in by the client), then EOL.
const IPV4_RECORD_ROUTE: &[u8] = &[7, 7, 4, 0, 0, 0, 0, 0];
/// An 8-byte options header holding one PadN option (next header and length are filled in
/// by the kernel from the socket's data).
const IPV6_PADN_OPTIONS: &[u8] = &[0, 0, 1, 4, 0, 0, 0, 0];
/// Larger than the veth MTU (1500): the client fragments the datagram.
const FRAGMENTED_PAYLOAD: usize = 3000;

const FRAGMENTS_WHY: &str = "README, fragments: TC sees the first fragment before reassembly and drops it; \
     the kernel's TPROXY reassembles first (nf_defrag) and delivers";

fn p(proto: Proto) -> &'static str {
    proto.name()
}

fn f(fam: Fam) -> &'static str {
    match fam {
        Fam::V4 => "4",
        Fam::V6 => "6",
    }
}

/// The table. Every name is also a `#[test]` below.
fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for proto in [Proto::Tcp, Proto::Udp] {
        for fam in [Fam::V4, Fam::V6] {
            let n = |what: &str| format!("{}{}_{what}", p(proto), f(fam));
            // T4, T6: a transparent wildcard listener on on-port, no --on-ip: delivered,
            // the local address (original destination) untouched.
            cases.push(Case::new(n("wildcard_listener"), proto, fam));
            // --on-ip: the listener bound to the router's own r0 address.
            cases.push(
                Case::new(n("on_ip_router_address"), proto, fam)
                    .on_ip(At::R0)
                    .receivers(vec![Recv::transparent("listener", At::R0, ON_PORT)]),
            );
            // --on-port 0: the listener on the packet's own destination port.
            cases.push(
                Case::new(n("on_port_0"), proto, fam)
                    .on_port(0)
                    .receivers(vec![Recv::transparent("listener", At::Any, DPORT)]),
            );
            // T7: no socket at all.
            cases.push(
                Case::new(n("no_socket"), proto, fam)
                    .receivers(vec![])
                    .expect(Kind::Dropped),
            );
            // T5: a listener without IP_TRANSPARENT never receives intercepted traffic.
            cases.push(
                Case::new(n("non_transparent_listener"), proto, fam)
                    .receivers(vec![Recv::plain("listener", At::Any, ON_PORT)])
                    .expect(Kind::Dropped),
            );
            // T4: without --on-ip the lookup is at the interface's address, so a listener
            // bound only to the loopback address is not found.
            cases.push(
                Case::new(n("loopback_listener_without_on_ip"), proto, fam)
                    .receivers(vec![Recv::transparent("listener", At::Loopback, ON_PORT)])
                    .expect(Kind::Dropped),
            );
            // T1: another port is not touched.
            cases.push(
                Case::new(n("non_matching_port"), proto, fam)
                    .send_port(OTHER_PORT)
                    .expect(Kind::Forwarded),
            );
            // T1: another destination prefix is not touched.
            cases.push(
                Case::new(n("non_matching_dst_prefix"), proto, fam)
                    .dst(Net::ClientSubnet)
                    .expect(Kind::Forwarded),
            );
        }
    }

    // --on-ip at a non-local address (the original destination's address, on on-port),
    // bound with IP_TRANSPARENT.
    for (proto, fam) in [
        (Proto::Tcp, Fam::V4),
        (Proto::Udp, Fam::V4),
        (Proto::Tcp, Fam::V6),
    ] {
        cases.push(
            Case::new(
                format!("{}{}_on_ip_non_local", p(proto), f(fam)),
                proto,
                fam,
            )
            .on_ip(At::Server)
            .receivers(vec![Recv::transparent("listener", At::Server, ON_PORT)]),
        );
    }
    // --on-ip at the loopback address, with the listener there.
    for (proto, fam) in [
        (Proto::Tcp, Fam::V4),
        (Proto::Udp, Fam::V4),
        (Proto::Tcp, Fam::V6),
    ] {
        cases.push(
            Case::new(format!("{}{}_on_ip_loopback", p(proto), f(fam)), proto, fam)
                .on_ip(At::Loopback)
                .receivers(vec![Recv::transparent("listener", At::Loopback, ON_PORT)]),
        );
    }

    // T1: destination prefixes and port sets that do match.
    cases.push(Case::new("tcp4_matching_dst_prefix", Proto::Tcp, Fam::V4).dst(Net::ServerSubnet));
    cases.push(Case::new("udp6_matching_dst_host", Proto::Udp, Fam::V6).dst(Net::ServerHost));
    cases.push(
        Case::new("tcp4_port_range", Proto::Tcp, Fam::V4)
            .dports("80-81")
            .send_port(81),
    );
    cases.push(
        Case::new("udp4_port_list", Proto::Udp, Fam::V4)
            .dports("80,8443")
            .send_port(8443),
    );

    // T2, UDP: a connected transparent socket bound to (original destination, port) and
    // connected to the client is the established socket: it gets the datagram, not the
    // listener.
    for fam in [Fam::V4, Fam::V6] {
        cases.push(
            Case::new(
                format!("udp{}_established_connected_socket", f(fam)),
                Proto::Udp,
                fam,
            )
            .receivers(vec![
                Recv::transparent("listener", At::Any, ON_PORT),
                Recv::connected("connected", At::Server, DPORT),
            ])
            .expect(Kind::Delivered("connected")),
        );
    }
    // T2, UDP: a (non-transparent) local service on 0.0.0.0:dport is not an established
    // socket and must not swallow intercepted traffic.
    for fam in [Fam::V4, Fam::V6] {
        cases.push(
            Case::new(
                format!("udp{}_local_service_on_dport_not_established", f(fam)),
                Proto::Udp,
                fam,
            )
            .receivers(vec![
                Recv::plain("local_service", At::Any, DPORT),
                Recv::transparent("listener", At::Any, ON_PORT),
            ]),
        );
    }
    cases.push(
        Case::new(
            "udp4_local_service_on_dport_without_listener",
            Proto::Udp,
            Fam::V4,
        )
        .receivers(vec![Recv::plain("local_service", At::Any, DPORT)])
        .expect(Kind::Dropped),
    );
    // T2, TCP: a listener on 0.0.0.0:dport is a LISTEN socket, not an established one.
    cases.push(
        Case::new("tcp4_local_service_on_dport", Proto::Tcp, Fam::V4).receivers(vec![
            Recv::plain("local_service", At::Any, DPORT),
            Recv::transparent("listener", At::Any, ON_PORT),
        ]),
    );

    // T3: the receiver closes first (TIME_WAIT on the router), the client reconnects from
    // the same port. Both connections reach the listener; timing is not compared.
    for fam in [Fam::V4, Fam::V6] {
        cases.push(
            Case::new(
                format!("tcp{}_time_wait_reconnect", f(fam)),
                Proto::Tcp,
                fam,
            )
            .reconnect(),
        );
    }

    // T4: IPv4 laddr is the first primary address; a secondary one is never used.
    cases.push(
        Case::new(
            "tcp4_secondary_address_listener_on_secondary",
            Proto::Tcp,
            Fam::V4,
        )
        .extra_addr(ExtraAddr::BeforeStart)
        .receivers(vec![Recv::transparent("listener", At::R0Extra, ON_PORT)])
        .expect(Kind::Dropped),
    );
    cases.push(
        Case::new(
            "tcp4_secondary_address_listener_on_primary",
            Proto::Tcp,
            Fam::V4,
        )
        .extra_addr(ExtraAddr::BeforeStart)
        .receivers(vec![Recv::transparent("listener", At::R0, ON_PORT)]),
    );
    cases.push(
        Case::new(
            "udp4_secondary_address_listener_on_secondary",
            Proto::Udp,
            Fam::V4,
        )
        .extra_addr(ExtraAddr::BeforeStart)
        .receivers(vec![Recv::transparent("listener", At::R0Extra, ON_PORT)])
        .expect(Kind::Dropped),
    );
    // T4, IPv6: laddr is the first address in the interface's list; the kernel puts a new
    // global address before the older ones of the same scope.
    cases.push(
        Case::new(
            "tcp6_second_address_listener_on_newest",
            Proto::Tcp,
            Fam::V6,
        )
        .extra_addr(ExtraAddr::BeforeStart)
        .receivers(vec![Recv::transparent("listener", At::R0Extra, ON_PORT)]),
    );
    cases.push(
        Case::new(
            "tcp6_second_address_listener_on_oldest",
            Proto::Tcp,
            Fam::V6,
        )
        .extra_addr(ExtraAddr::BeforeStart)
        .receivers(vec![Recv::transparent("listener", At::R0, ON_PORT)])
        .expect(Kind::Dropped),
    );
    cases.push(
        Case::new(
            "tcp6_second_address_added_while_running",
            Proto::Tcp,
            Fam::V6,
        )
        .extra_addr(ExtraAddr::WhileRunning)
        .receivers(vec![Recv::transparent("listener", At::R0Extra, ON_PORT)]),
    );

    // T1: IPv4 options make the header longer than 20 bytes.
    for proto in [Proto::Tcp, Proto::Udp] {
        for (what, options) in [
            ("nop", IPV4_NOP_OPTIONS),
            ("record_route", IPV4_RECORD_ROUTE),
        ] {
            cases.push(
                Case::new(format!("{}4_ip_options_{what}", p(proto)), proto, Fam::V4).client(
                    ClientOpts {
                        ip_options: Some(options),
                        ..ClientOpts::default()
                    },
                ),
            );
        }
    }
    // T9: IPv6 extension headers before the transport header.
    for proto in [Proto::Tcp, Proto::Udp] {
        cases.push(
            Case::new(format!("{}6_destination_options", p(proto)), proto, Fam::V6).client(
                ClientOpts {
                    ipv6_dstopts: Some(IPV6_PADN_OPTIONS),
                    ..ClientOpts::default()
                },
            ),
        );
        cases.push(
            Case::new(format!("{}6_hop_by_hop_options", p(proto)), proto, Fam::V6).client(
                ClientOpts {
                    ipv6_hopopts: Some(IPV6_PADN_OPTIONS),
                    ..ClientOpts::default()
                },
            ),
        );
    }

    // T10: a client behind an interface without a link-layer header (a tun pair, as a
    // WireGuard or ipip ingress would be): the same outcomes as over Ethernet.
    // T12: the agent killed (SIGKILL) before the client sends: its rules stay, like the
    // kernel recipe's, so a listener that is still there gets the packet and no socket
    // means a drop, never a pass.
    for proto in [Proto::Tcp, Proto::Udp] {
        for fam in [Fam::V4, Fam::V6] {
            let n = |what: &str| format!("{}{}_{what}", p(proto), f(fam));
            cases.push(Case::new(n("tun_ingress_wildcard_listener"), proto, fam).over_tun());
            cases.push(
                Case::new(n("tun_ingress_no_socket"), proto, fam)
                    .over_tun()
                    .receivers(vec![])
                    .expect(Kind::Dropped),
            );
            cases.push(
                Case::new(n("tun_ingress_non_matching_port"), proto, fam)
                    .over_tun()
                    .send_port(OTHER_PORT)
                    .expect(Kind::Forwarded),
            );
            cases.push(Case::new(n("agent_killed_listener_stays"), proto, fam).agent_killed());
            cases.push(
                Case::new(n("agent_killed_no_socket"), proto, fam)
                    .agent_killed()
                    .receivers(vec![])
                    .expect(Kind::Dropped),
            );
        }
    }

    // T9: a datagram larger than the MTU, fragmented by the client. Declared difference.
    for fam in [Fam::V4, Fam::V6] {
        cases.push(
            Case::new(format!("udp{}_fragmented", f(fam)), Proto::Udp, fam)
                .payload(FRAGMENTED_PAYLOAD)
                .client(ClientOpts {
                    pmtudisc_dont: fam == Fam::V4,
                    ..ClientOpts::default()
                })
                .differs(Kind::Dropped, FRAGMENTS_WHY),
        );
    }

    // The recipe's `-m socket --transparent` rule comes first: a transparent socket bound
    // to the original destination itself (address and port) takes the packet, whether or
    // not its port is intercepted (T8 and section 1 of the design).
    for proto in [Proto::Tcp, Proto::Udp] {
        cases.push(
            Case::new(
                format!(
                    "{}4_socket_match_bound_to_destination_unmatched_port",
                    p(proto)
                ),
                proto,
                Fam::V4,
            )
            .send_port(OTHER_PORT)
            .receivers(vec![Recv::transparent(
                "bound_to_dst",
                At::Server,
                OTHER_PORT,
            )])
            .expect(Kind::Delivered("bound_to_dst")),
        );
        cases.push(
            Case::new(
                format!(
                    "{}4_socket_match_bound_to_destination_matched_port",
                    p(proto)
                ),
                proto,
                Fam::V4,
            )
            .receivers(vec![
                Recv::transparent("listener", At::Any, ON_PORT),
                Recv::transparent("bound_to_dst", At::Server, DPORT),
            ])
            .expect(Kind::Delivered("bound_to_dst")),
        );
    }
    cases
}

/// Runs one case in both modes, in parallel (each in its own namespaces), and compares.
fn run_case(name: &str) {
    common::require_root();
    let case = cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no case named {name}"));
    let (kernel, agent) = std::thread::scope(|scope| {
        let kernel = scope.spawn(|| run(&case, Mode::Kernel));
        let agent = scope.spawn(|| run(&case, Mode::Agent));
        (
            kernel
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
            agent
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
        )
    });
    println!(
        "{name}: kernel: {} | agent: {}",
        kernel.outcome, agent.outcome
    );
    println!(
        "{name}: notes: kernel{} | agent{}",
        kernel.notes, agent.notes
    );

    let mut problems = Vec::new();
    // The oracle first: the kernel must do what the case is about.
    if kernel.outcome.steps.len() != case.kernel.len() {
        problems.push(format!(
            "the kernel run had {} steps, the case expects {}",
            kernel.outcome.steps.len(),
            case.kernel.len()
        ));
    }
    for (step, kind) in kernel.outcome.steps.iter().zip(&case.kernel) {
        if let Err(e) = check_kind(&case, step, *kind) {
            problems.push(format!("kernel (the oracle) is not {kind:?}: {e}"));
        }
    }
    if case.flow == Flow::TcpReconnect
        && kernel.outcome.steps.first().and_then(|s| s.time_wait) != Some(true)
    {
        problems.push(
            "no TIME_WAIT socket on the router after the first connection: the case proves nothing"
                .to_owned(),
        );
    }
    match &case.difference {
        None => {
            if agent.outcome != kernel.outcome {
                problems.push(format!(
                    "the agent differs from the kernel:\n  kernel: {}\n  agent:  {}",
                    kernel.outcome, agent.outcome
                ));
            }
        }
        Some(diff) => {
            if agent.outcome.steps.len() != case.kernel.len() {
                problems.push(format!(
                    "the agent run had {} steps",
                    agent.outcome.steps.len()
                ));
            }
            for step in &agent.outcome.steps {
                if let Err(e) = check_kind(&case, step, diff.agent) {
                    problems.push(format!(
                        "declared difference ({}) not seen, agent is not {:?}: {e}",
                        diff.why, diff.agent
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{name}:\n{}\n(kernel: {}; agent: {})",
        problems.join("\n"),
        kernel.outcome,
        agent.outcome
    );
}

/// One `#[test]` per case, so that the harness runs them on its threads; the list must
/// match the table (checked below).
macro_rules! conformance_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run_case(stringify!($name));
            }
        )*
        const TESTED: &[&str] = &[$(stringify!($name)),*];
    };
}

conformance_tests! {
    tcp4_wildcard_listener,
    tcp4_on_ip_router_address,
    tcp4_on_port_0,
    tcp4_no_socket,
    tcp4_non_transparent_listener,
    tcp4_loopback_listener_without_on_ip,
    tcp4_non_matching_port,
    tcp4_non_matching_dst_prefix,
    tcp6_wildcard_listener,
    tcp6_on_ip_router_address,
    tcp6_on_port_0,
    tcp6_no_socket,
    tcp6_non_transparent_listener,
    tcp6_loopback_listener_without_on_ip,
    tcp6_non_matching_port,
    tcp6_non_matching_dst_prefix,
    udp4_wildcard_listener,
    udp4_on_ip_router_address,
    udp4_on_port_0,
    udp4_no_socket,
    udp4_non_transparent_listener,
    udp4_loopback_listener_without_on_ip,
    udp4_non_matching_port,
    udp4_non_matching_dst_prefix,
    udp6_wildcard_listener,
    udp6_on_ip_router_address,
    udp6_on_port_0,
    udp6_no_socket,
    udp6_non_transparent_listener,
    udp6_loopback_listener_without_on_ip,
    udp6_non_matching_port,
    udp6_non_matching_dst_prefix,
    tcp4_on_ip_non_local,
    udp4_on_ip_non_local,
    tcp6_on_ip_non_local,
    tcp4_on_ip_loopback,
    udp4_on_ip_loopback,
    tcp6_on_ip_loopback,
    tcp4_matching_dst_prefix,
    udp6_matching_dst_host,
    tcp4_port_range,
    udp4_port_list,
    udp4_established_connected_socket,
    udp6_established_connected_socket,
    udp4_local_service_on_dport_not_established,
    udp6_local_service_on_dport_not_established,
    udp4_local_service_on_dport_without_listener,
    tcp4_local_service_on_dport,
    tcp4_time_wait_reconnect,
    tcp6_time_wait_reconnect,
    tcp4_secondary_address_listener_on_secondary,
    tcp4_secondary_address_listener_on_primary,
    udp4_secondary_address_listener_on_secondary,
    tcp6_second_address_listener_on_newest,
    tcp6_second_address_listener_on_oldest,
    tcp6_second_address_added_while_running,
    tcp4_ip_options_nop,
    tcp4_ip_options_record_route,
    udp4_ip_options_nop,
    udp4_ip_options_record_route,
    tcp6_destination_options,
    tcp6_hop_by_hop_options,
    udp6_destination_options,
    udp6_hop_by_hop_options,
    tcp4_tun_ingress_wildcard_listener,
    tcp4_tun_ingress_no_socket,
    tcp4_tun_ingress_non_matching_port,
    tcp4_agent_killed_listener_stays,
    tcp4_agent_killed_no_socket,
    tcp6_tun_ingress_wildcard_listener,
    tcp6_tun_ingress_no_socket,
    tcp6_tun_ingress_non_matching_port,
    tcp6_agent_killed_listener_stays,
    tcp6_agent_killed_no_socket,
    udp4_tun_ingress_wildcard_listener,
    udp4_tun_ingress_no_socket,
    udp4_tun_ingress_non_matching_port,
    udp4_agent_killed_listener_stays,
    udp4_agent_killed_no_socket,
    udp6_tun_ingress_wildcard_listener,
    udp6_tun_ingress_no_socket,
    udp6_tun_ingress_non_matching_port,
    udp6_agent_killed_listener_stays,
    udp6_agent_killed_no_socket,
    udp4_fragmented,
    udp6_fragmented,
    tcp4_socket_match_bound_to_destination_unmatched_port,
    tcp4_socket_match_bound_to_destination_matched_port,
    udp4_socket_match_bound_to_destination_unmatched_port,
    udp4_socket_match_bound_to_destination_matched_port,
}

#[test]
fn table_has_at_least_40_unique_cases_each_with_a_test() {
    let table = cases();
    assert!(table.len() >= 40, "only {} cases", table.len());
    let mut names: Vec<&str> = table.iter().map(|c| c.name.as_str()).collect();
    names.sort_unstable();
    let before = names.len();
    names.dedup();
    assert_eq!(names.len(), before, "duplicate case names");
    let mut tested: Vec<&str> = TESTED.to_vec();
    tested.sort_unstable();
    assert_eq!(names, tested, "the table and the #[test] list differ");
    // Both families and both protocols, and every case compares something.
    for proto in [Proto::Tcp, Proto::Udp] {
        for fam in [Fam::V4, Fam::V6] {
            assert!(
                table
                    .iter()
                    .filter(|c| c.proto == proto && c.fam == fam)
                    .count()
                    >= 8,
                "too few {proto:?}/{fam:?} cases"
            );
        }
    }
    for case in &table {
        assert!(
            !case.kernel.is_empty(),
            "{}: no expected outcome",
            case.name
        );
    }
}
