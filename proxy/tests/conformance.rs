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
//! The cases are the table below: a row names its cases, each also a `#[test]`, and says how
//! they differ from the default case; adding a case means adding a name to a row, or a row.
//! The harness is in `conformance_support/`.
//!
//! `cargo test -p proxy --test conformance -- --nocapture` prints one line per case.

mod common;
mod conformance_support;

use conformance_support::{
    At, Case, ClientOpts, DPORT, ExtraAddr, Fam, Kind, Net, ON_PORT, OTHER_PORT, Proto, Recv,
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

/// Declares the table. Each row is `name, name... => change;`: one case and one `#[test]`
/// per name, each the default case ([`Case::new`]: rule `--dport 80 --on-port 50080`, a
/// transparent wildcard listener "listener" on 50080, delivered) with `change` applied. A
/// name starts with the case's protocol and family: `tcp4_`, `tcp6_`, `udp4_`, `udp6_`.
macro_rules! cases {
    ($($($name:ident),+ => $change:expr;)*) => {
        /// Every case of the table.
        fn table() -> Vec<Case> {
            vec![$($(row(stringify!($name), $change)),+),*]
        }

        $($(
            #[test]
            fn $name() {
                conformance_support::check(&row(stringify!($name), $change));
            }
        )+)*
    };
}

/// The case `name`: the default case, changed by its row.
fn row(name: &'static str, change: fn(Case) -> Case) -> Case {
    change(Case::new(name))
}

cases! {
    // T4, T6: a transparent wildcard listener on on-port, no --on-ip: delivered, the local
    // address (original destination) untouched.
    tcp4_wildcard_listener, tcp6_wildcard_listener, udp4_wildcard_listener,
    udp6_wildcard_listener => |c| c;
    // --on-ip: the listener bound to the router's own r0 address.
    tcp4_on_ip_router_address, tcp6_on_ip_router_address, udp4_on_ip_router_address,
    udp6_on_ip_router_address => |c| {
        c.on_ip(At::R0)
            .receivers(vec![Recv::transparent("listener", At::R0, ON_PORT)])
    };
    // --on-port 0: the listener on the packet's own destination port.
    tcp4_on_port_0, tcp6_on_port_0, udp4_on_port_0, udp6_on_port_0 => |c| {
        c.on_port(0)
            .receivers(vec![Recv::transparent("listener", At::Any, DPORT)])
    };
    // T7: no socket at all.
    tcp4_no_socket, tcp6_no_socket, udp4_no_socket, udp6_no_socket => |c| {
        c.receivers(vec![]).expect(Kind::Dropped)
    };
    // T5: a listener without IP_TRANSPARENT never receives intercepted traffic.
    tcp4_non_transparent_listener, tcp6_non_transparent_listener,
    udp4_non_transparent_listener, udp6_non_transparent_listener => |c| {
        c.receivers(vec![Recv::plain("listener", At::Any, ON_PORT)])
            .expect(Kind::Dropped)
    };
    // T4: without --on-ip the lookup is at the interface's address, so a listener bound
    // only to the loopback address is not found.
    tcp4_loopback_listener_without_on_ip, tcp6_loopback_listener_without_on_ip,
    udp4_loopback_listener_without_on_ip, udp6_loopback_listener_without_on_ip => |c| {
        c.receivers(vec![Recv::transparent("listener", At::Loopback, ON_PORT)])
            .expect(Kind::Dropped)
    };
    // T1: another port is not touched.
    tcp4_non_matching_port, tcp6_non_matching_port, udp4_non_matching_port,
    udp6_non_matching_port => |c| c.send_port(OTHER_PORT).expect(Kind::Forwarded);
    // T1: another destination prefix is not touched.
    tcp4_non_matching_dst_prefix, tcp6_non_matching_dst_prefix, udp4_non_matching_dst_prefix,
    udp6_non_matching_dst_prefix => |c| c.dst(Net::ClientSubnet).expect(Kind::Forwarded);

    // --on-ip at a non-local address (the original destination's address, on on-port),
    // bound with IP_TRANSPARENT.
    tcp4_on_ip_non_local, udp4_on_ip_non_local, tcp6_on_ip_non_local => |c| {
        c.on_ip(At::Server)
            .receivers(vec![Recv::transparent("listener", At::Server, ON_PORT)])
    };
    // --on-ip at the loopback address, with the listener there.
    tcp4_on_ip_loopback, udp4_on_ip_loopback, tcp6_on_ip_loopback => |c| {
        c.on_ip(At::Loopback)
            .receivers(vec![Recv::transparent("listener", At::Loopback, ON_PORT)])
    };

    // T1: destination prefixes and port sets that do match.
    tcp4_matching_dst_prefix => |c| c.dst(Net::ServerSubnet);
    udp6_matching_dst_host => |c| c.dst(Net::ServerHost);
    tcp4_port_range => |c| c.dports("80-81").send_port(81);
    udp4_port_list => |c| c.dports("80,8443").send_port(8443);

    // T2, UDP: a connected transparent socket bound to (original destination, port) and
    // connected to the client is the established socket: it gets the datagram, not the
    // listener.
    udp4_established_connected_socket, udp6_established_connected_socket => |c| {
        c.receivers(vec![
            Recv::transparent("listener", At::Any, ON_PORT),
            Recv::connected("connected", At::Server, DPORT),
        ])
        .expect(Kind::Delivered("connected"))
    };
    // T2, UDP: a (non-transparent) local service on 0.0.0.0:dport is not an established
    // socket and must not swallow intercepted traffic.
    udp4_local_service_on_dport_not_established,
    udp6_local_service_on_dport_not_established => |c| {
        c.receivers(vec![
            Recv::plain("local_service", At::Any, DPORT),
            Recv::transparent("listener", At::Any, ON_PORT),
        ])
    };
    udp4_local_service_on_dport_without_listener => |c| {
        c.receivers(vec![Recv::plain("local_service", At::Any, DPORT)])
            .expect(Kind::Dropped)
    };
    // T2, TCP: a listener on 0.0.0.0:dport is a LISTEN socket, not an established one.
    tcp4_local_service_on_dport => |c| {
        c.receivers(vec![
            Recv::plain("local_service", At::Any, DPORT),
            Recv::transparent("listener", At::Any, ON_PORT),
        ])
    };

    // T3: the receiver closes first (TIME_WAIT on the router), the client reconnects from
    // the same port. Both connections reach the listener; timing is not compared.
    tcp4_time_wait_reconnect, tcp6_time_wait_reconnect => |c| c.reconnect();

    // T4: IPv4 laddr is the first primary address; a secondary one is never used.
    tcp4_secondary_address_listener_on_secondary,
    udp4_secondary_address_listener_on_secondary => |c| {
        c.extra_addr(ExtraAddr::BeforeStart)
            .receivers(vec![Recv::transparent("listener", At::R0Extra, ON_PORT)])
            .expect(Kind::Dropped)
    };
    tcp4_secondary_address_listener_on_primary => |c| {
        c.extra_addr(ExtraAddr::BeforeStart)
            .receivers(vec![Recv::transparent("listener", At::R0, ON_PORT)])
    };
    // T4, IPv6: laddr is the first address in the interface's list; the kernel puts a new
    // global address before the older ones of the same scope.
    tcp6_second_address_listener_on_newest => |c| {
        c.extra_addr(ExtraAddr::BeforeStart)
            .receivers(vec![Recv::transparent("listener", At::R0Extra, ON_PORT)])
    };
    tcp6_second_address_listener_on_oldest => |c| {
        c.extra_addr(ExtraAddr::BeforeStart)
            .receivers(vec![Recv::transparent("listener", At::R0, ON_PORT)])
            .expect(Kind::Dropped)
    };
    tcp6_second_address_added_while_running => |c| {
        c.extra_addr(ExtraAddr::WhileRunning)
            .receivers(vec![Recv::transparent("listener", At::R0Extra, ON_PORT)])
    };

    // T1: IPv4 options make the header longer than 20 bytes.
    tcp4_ip_options_nop, udp4_ip_options_nop => |c| {
        c.client(ClientOpts {
            ip_options: Some(IPV4_NOP_OPTIONS),
            ..ClientOpts::default()
        })
    };
    tcp4_ip_options_record_route, udp4_ip_options_record_route => |c| {
        c.client(ClientOpts {
            ip_options: Some(IPV4_RECORD_ROUTE),
            ..ClientOpts::default()
        })
    };
    // T9: IPv6 extension headers before the transport header.
    tcp6_destination_options, udp6_destination_options => |c| {
        c.client(ClientOpts {
            ipv6_dstopts: Some(IPV6_PADN_OPTIONS),
            ..ClientOpts::default()
        })
    };
    tcp6_hop_by_hop_options, udp6_hop_by_hop_options => |c| {
        c.client(ClientOpts {
            ipv6_hopopts: Some(IPV6_PADN_OPTIONS),
            ..ClientOpts::default()
        })
    };

    // T10: a client behind an interface without a link-layer header (a tun pair, as a
    // WireGuard or ipip ingress would be): the same outcomes as over Ethernet.
    tcp4_tun_ingress_wildcard_listener, tcp6_tun_ingress_wildcard_listener,
    udp4_tun_ingress_wildcard_listener, udp6_tun_ingress_wildcard_listener => |c| c.over_tun();
    tcp4_tun_ingress_no_socket, tcp6_tun_ingress_no_socket, udp4_tun_ingress_no_socket,
    udp6_tun_ingress_no_socket => |c| c.over_tun().receivers(vec![]).expect(Kind::Dropped);
    tcp4_tun_ingress_non_matching_port, tcp6_tun_ingress_non_matching_port,
    udp4_tun_ingress_non_matching_port, udp6_tun_ingress_non_matching_port => |c| {
        c.over_tun().send_port(OTHER_PORT).expect(Kind::Forwarded)
    };
    // T12: the agent killed (SIGKILL) before the client sends: its rules stay, like the
    // kernel recipe's, so a listener that is still there gets the packet and no socket
    // means a drop, never a pass.
    tcp4_agent_killed_listener_stays, tcp6_agent_killed_listener_stays,
    udp4_agent_killed_listener_stays, udp6_agent_killed_listener_stays => |c| c.agent_killed();
    tcp4_agent_killed_no_socket, tcp6_agent_killed_no_socket, udp4_agent_killed_no_socket,
    udp6_agent_killed_no_socket => |c| c.agent_killed().receivers(vec![]).expect(Kind::Dropped);

    // T9: a datagram larger than the MTU, fragmented by the client. Declared difference.
    udp4_fragmented, udp6_fragmented => |c| {
        let pmtudisc_dont = c.fam == Fam::V4;
        c.payload(FRAGMENTED_PAYLOAD)
            .client(ClientOpts {
                pmtudisc_dont,
                ..ClientOpts::default()
            })
            .differs(Kind::Dropped, FRAGMENTS_WHY)
    };

    // The recipe's `-m socket --transparent` rule comes first: a transparent socket bound
    // to the original destination itself (address and port) takes the packet, whether or
    // not its port is intercepted (T8 and section 1 of the design).
    tcp4_socket_match_bound_to_destination_unmatched_port,
    udp4_socket_match_bound_to_destination_unmatched_port => |c| {
        c.send_port(OTHER_PORT)
            .receivers(vec![Recv::transparent("bound_to_dst", At::Server, OTHER_PORT)])
            .expect(Kind::Delivered("bound_to_dst"))
    };
    tcp4_socket_match_bound_to_destination_matched_port,
    udp4_socket_match_bound_to_destination_matched_port => |c| {
        c.receivers(vec![
            Recv::transparent("listener", At::Any, ON_PORT),
            Recv::transparent("bound_to_dst", At::Server, DPORT),
        ])
        .expect(Kind::Delivered("bound_to_dst"))
    };
}

#[test]
fn the_table_covers_both_protocols_and_families_and_expects_something_of_each_case() {
    let table = table();
    assert!(table.len() >= 40, "only {} cases", table.len());
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
