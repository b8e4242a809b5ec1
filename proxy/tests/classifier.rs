//! The classifier alone, without namespaces or links: each crafted frame goes through the
//! TC program once with `BPF_PROG_TEST_RUN`, and the test checks the verdict and that
//! exactly the expected counter moved. The frames cover the shapes a parser gets wrong:
//! IPv4 options, IPv6 extension chains, every fragment shape (T9, T11), truncated headers.
//!
//! No socket exists in the test's fresh network namespace, so a matched, classifiable
//! packet meets "no socket" (T7, dropped); what matters here is which path it took.

mod common;

use clap::Parser as _;
use proxy::{config::Cli, ebpf::Classifier, rules};
use proxy_common::{Counter, PROG_TC_INGRESS, PROG_TC_INGRESS_L3};
use proxy_testbed::Netns;

use common::require_root;

const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;

const CLIENT4: [u8; 4] = [192, 0, 2, 2];
/// Under the rule's prefix.
const SERVER4: [u8; 4] = [198, 51, 100, 2];
/// Under no rule.
const ELSEWHERE4: [u8; 4] = [203, 0, 113, 5];
const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const SERVER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const ELSEWHERE6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5];

const TCP: u8 = 6;
const UDP: u8 = 17;
const SYN: u8 = 0x02;

/// One rule: TCP and UDP port 80 to the server's prefixes, like `-d PREFIX --dport 80`.
const RULE: &[&str] = &[
    "proxy",
    "run",
    "--iface",
    "lo",
    "--dst",
    "198.51.100.0/24",
    "--dst",
    "2001:db8:2::/64",
    "--dport",
    "80",
    "--protocol",
    "tcp,udp",
    "--on-port",
    "50080",
];

fn ethernet(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2];
    frame.extend_from_slice(&ethertype.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A TCP header (20 bytes) or a UDP one (8 bytes), then `data`.
fn transport(protocol: u8, dport: u16, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&40_123u16.to_be_bytes());
    out.extend_from_slice(&dport.to_be_bytes());
    if protocol == TCP {
        out.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]); // seq, ack
        out.extend_from_slice(&[0x50, SYN, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        out.extend_from_slice(&((8 + data.len()) as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
    }
    out.extend_from_slice(data);
    out
}

/// An IPv4 packet in a frame: `options` (a multiple of 4 bytes) after the fixed header,
/// fragment offset in 8-byte units, MF flag.
fn ipv4(
    dst: [u8; 4],
    protocol: u8,
    options: &[u8],
    fragment: (u16, bool),
    payload: &[u8],
) -> Vec<u8> {
    ethernet(
        0x0800,
        &ipv4_packet(CLIENT4, dst, protocol, options, fragment, payload),
    )
}

/// The IPv4 packet alone, as an interface without a link-layer header delivers it.
fn ipv4_packet(
    src: [u8; 4],
    dst: [u8; 4],
    protocol: u8,
    options: &[u8],
    (offset, more): (u16, bool),
    payload: &[u8],
) -> Vec<u8> {
    let ihl = 5 + options.len() / 4;
    let total = (ihl * 4 + payload.len()) as u16;
    let flags = offset | if more { 0x2000 } else { 0 };
    let mut ip = vec![0x40 | ihl as u8, 0];
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&0x1234u16.to_be_bytes()); // identification
    ip.extend_from_slice(&flags.to_be_bytes());
    ip.extend_from_slice(&[64, protocol, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    ip.extend_from_slice(options);
    ip.extend_from_slice(payload);
    ip
}

/// An IPv6 packet in a frame; `chain` holds the extension headers, already linked, and
/// `next` is the first one's type.
fn ipv6(dst: [u8; 16], next: u8, chain_and_payload: &[u8]) -> Vec<u8> {
    ethernet(0x86dd, &ipv6_packet(CLIENT6, dst, next, chain_and_payload))
}

/// The IPv6 packet alone.
fn ipv6_packet(src: [u8; 16], dst: [u8; 16], next: u8, chain_and_payload: &[u8]) -> Vec<u8> {
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(chain_and_payload.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[next, 64]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    ip.extend_from_slice(chain_and_payload);
    ip
}

/// An 8-byte IPv6 option header (hop-by-hop or destination options) with PadN.
fn options6(next: u8) -> Vec<u8> {
    vec![next, 0, 1, 4, 0, 0, 0, 0]
}

/// An IPv6 fragment header.
fn fragment6(next: u8, offset: u16, more: bool) -> Vec<u8> {
    let field = (offset << 3) | u16::from(more);
    let mut out = vec![next, 0];
    out.extend_from_slice(&field.to_be_bytes());
    out.extend_from_slice(&0xabcd_0001u32.to_be_bytes());
    out
}

struct Case {
    name: &'static str,
    /// The classifier program: the Ethernet one, or the one for interfaces without a
    /// link-layer header.
    program: &'static str,
    frame: Vec<u8>,
    verdict: i32,
    /// The counters (besides `seen`) this frame must move, each by one.
    counters: Vec<Counter>,
    /// Whether the agent has told the classifier to look up the return path (T8) for
    /// packets no rule matches; it does unless told otherwise.
    return_path_lookup: bool,
}

/// A case that moves `counter`, and `matched` too when `counter` is one of a matched
/// packet's outcomes.
fn case(name: &'static str, frame: Vec<u8>, verdict: i32, counter: Counter) -> Case {
    let matched = matches!(
        counter,
        Counter::DroppedNoSocket
            | Counter::Fragment
            | Counter::AssignedListener
            | Counter::AssignedEstablished
            | Counter::DroppedNotTransparent
    );
    let counters = if matched {
        vec![Counter::Matched, counter]
    } else {
        vec![counter]
    };
    case_counting(name, frame, verdict, &counters)
}

/// A case that moves exactly `counters` (in `Counter` order).
fn case_counting(name: &'static str, frame: Vec<u8>, verdict: i32, counters: &[Counter]) -> Case {
    Case {
        name,
        program: PROG_TC_INGRESS,
        frame,
        verdict,
        counters: counters.to_vec(),
        return_path_lookup: true,
    }
}

/// A case for [`PROG_TC_INGRESS_L3`], whose frame is a bare IP packet.
///
/// `BPF_PROG_TEST_RUN` always treats the first 14 bytes as an Ethernet header for
/// `skb->protocol` (`eth_type_trans`) but leaves the data from byte 0 in front of the
/// program, as an L3 interface does. So the packets' source addresses are picked to put the
/// right ethertype at bytes 12-13: 8.0.0.1 (0x0800) and 2001:db8:86dd::2 (0x86dd).
fn l3_case(name: &'static str, packet: Vec<u8>, verdict: i32, counter: Counter) -> Case {
    Case {
        program: PROG_TC_INGRESS_L3,
        ..case(name, packet, verdict, counter)
    }
}

/// Sources that make `BPF_PROG_TEST_RUN` set `skb->protocol` right for a bare packet.
const L3_SOURCE4: [u8; 4] = [8, 0, 0, 1];
const L3_SOURCE6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0x86, 0xdd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2,
];

/// In order: a later fragment's verdict depends on the first fragments before it.
fn cases() -> Vec<Case> {
    let syn80 = transport(TCP, 80, &[]);
    let syn81 = transport(TCP, 81, &[]);
    let nop_options = [1, 1, 1, 1, 1, 1, 1, 0]; // NOPs, end of options
    let mut chain_to_tcp = options6(60); // hop-by-hop, then destination options
    chain_to_tcp.extend(options6(TCP));
    chain_to_tcp.extend(&syn80);
    let mut first6_without_tcp = fragment6(60, 0, true);
    // A destination options header that claims 24 bytes, cut after 8: its TCP header
    // would be in the next fragment.
    first6_without_tcp.extend([TCP, 2, 1, 4, 0, 0, 0, 0]);
    let mut later6 = fragment6(60, 3, false);
    later6.extend(&syn80);
    let mut first6_whole_tcp = fragment6(TCP, 0, true);
    first6_whole_tcp.extend(&syn80);
    vec![
        case(
            "tcp4 to the rule",
            ipv4(SERVER4, TCP, &[], (0, false), &syn80),
            TC_ACT_SHOT,
            Counter::DroppedNoSocket,
        ),
        case(
            "tcp4 with IP options, ports at ihl*4",
            ipv4(SERVER4, TCP, &nop_options, (0, false), &syn80),
            TC_ACT_SHOT,
            Counter::DroppedNoSocket,
        ),
        case(
            "tcp4 with IP options to another port",
            ipv4(SERVER4, TCP, &nop_options, (0, false), &syn81),
            TC_ACT_UNSPEC,
            Counter::NotMatched,
        ),
        case(
            "udp4 to the rule",
            ipv4(SERVER4, UDP, &[], (0, false), &transport(UDP, 80, b"x")),
            TC_ACT_SHOT,
            Counter::DroppedNoSocket,
        ),
        case(
            "tcp4 to another prefix",
            ipv4(ELSEWHERE4, TCP, &[], (0, false), &syn80),
            TC_ACT_UNSPEC,
            Counter::NotMatched,
        ),
        case(
            "tcp4 first fragment with 8 bytes of TCP (ports, no flags), matched, no socket",
            ipv4(SERVER4, TCP, &[], (0, true), &syn80[..8]),
            TC_ACT_SHOT,
            Counter::DroppedNoSocket,
        ),
        case(
            "tcp4 later fragment of that one",
            ipv4(SERVER4, TCP, &[], (1, false), &syn80[8..]),
            TC_ACT_SHOT,
            Counter::DroppedLaterFragment,
        ),
        case(
            "tcp4 tiny first fragment to another port",
            ipv4(SERVER4, TCP, &[], (0, true), &syn81[..8]),
            TC_ACT_UNSPEC,
            Counter::NotMatched,
        ),
        case(
            "tcp4 tiny first fragment to another prefix",
            ipv4(ELSEWHERE4, TCP, &[], (0, true), &syn80[..8]),
            TC_ACT_UNSPEC,
            Counter::NotMatched,
        ),
        case(
            "tcp4 first fragment with 2 bytes of TCP (no ports)",
            ipv4(SERVER4, TCP, &[], (0, true), &syn80[..2]),
            TC_ACT_SHOT,
            Counter::DroppedUnclassifiable,
        ),
        case(
            "tcp4 later fragment of that one",
            ipv4(SERVER4, TCP, &[], (1, false), &syn80[8..]),
            TC_ACT_SHOT,
            Counter::DroppedLaterFragment,
        ),
        case(
            "tcp4 truncated segment (2 bytes of TCP) to another prefix",
            ipv4(ELSEWHERE4, TCP, &[], (0, false), &syn80[..2]),
            TC_ACT_UNSPEC,
            Counter::Malformed,
        ),
        case(
            "tcp4 truncated segment (8 bytes of TCP, no flags), not fragmented",
            ipv4(SERVER4, TCP, &[], (0, false), &syn80[..8]),
            TC_ACT_SHOT,
            Counter::DroppedUnclassifiable,
        ),
        case(
            "tcp4 later fragment to another prefix",
            ipv4(ELSEWHERE4, TCP, &[], (1, false), &syn80[8..]),
            TC_ACT_UNSPEC,
            Counter::NotMatched,
        ),
        case(
            "tcp4 truncated segment (2 bytes of TCP), not fragmented",
            ipv4(SERVER4, TCP, &[], (0, false), &syn80[..2]),
            TC_ACT_SHOT,
            Counter::DroppedUnclassifiable,
        ),
        // (A frame cut inside its IPv4 header never reaches the program: BPF_PROG_TEST_RUN
        // refuses it with EINVAL, as the stack drops it in ip_rcv_core.)
        case(
            "ipv4 ethertype with a version-6 header",
            ipv4(SERVER4, TCP, &[], (0, false), &syn80)
                .into_iter()
                .enumerate()
                .map(|(i, b)| if i == 14 { 0x65 } else { b })
                .collect(),
            TC_ACT_UNSPEC,
            Counter::Malformed,
        ),
        case(
            "ipv4 with ihl < 5",
            ipv4(SERVER4, TCP, &[], (0, false), &syn80)
                .into_iter()
                .enumerate()
                .map(|(i, b)| if i == 14 { 0x44 } else { b })
                .collect(),
            TC_ACT_UNSPEC,
            Counter::Malformed,
        ),
        case(
            "tcp6 past hop-by-hop and destination options",
            ipv6(SERVER6, 0, &chain_to_tcp),
            TC_ACT_SHOT,
            Counter::DroppedNoSocket,
        ),
        case(
            "tcp6 first fragment whose TCP header is in the next fragment",
            ipv6(SERVER6, 44, &first6_without_tcp),
            TC_ACT_SHOT,
            Counter::DroppedUnclassifiable,
        ),
        case(
            "tcp6 later fragment of that one",
            ipv6(SERVER6, 44, &later6),
            TC_ACT_SHOT,
            Counter::DroppedLaterFragment,
        ),
        case(
            "tcp6 first fragment with its whole TCP header, matched, no socket",
            ipv6(SERVER6, 44, &first6_whole_tcp),
            TC_ACT_SHOT,
            Counter::DroppedNoSocket,
        ),
        case(
            "ipv6 no next header, under the rule",
            ipv6(SERVER6, 59, &[]),
            TC_ACT_SHOT,
            Counter::DroppedUnclassifiable,
        ),
        case(
            "ipv6 no next header, elsewhere",
            ipv6(ELSEWHERE6, 59, &[]),
            TC_ACT_UNSPEC,
            Counter::Malformed,
        ),
        case(
            "icmpv6 to the rule's prefix",
            ipv6(SERVER6, 58, &[128, 0, 0, 0, 0, 1, 0, 1]),
            TC_ACT_UNSPEC,
            Counter::NotMatched,
        ),
        case(
            "arp",
            ethernet(0x0806, &[0; 28]),
            TC_ACT_UNSPEC,
            Counter::NotMatched,
        ),
        // No link-layer header (T10).
        l3_case(
            "l3: tcp4 to the rule",
            ipv4_packet(L3_SOURCE4, SERVER4, TCP, &[], (0, false), &syn80),
            TC_ACT_SHOT,
            Counter::DroppedNoSocket,
        ),
        case(
            "the same bare packet through the Ethernet program: misparsed, never matched",
            ipv4_packet(L3_SOURCE4, SERVER4, TCP, &[], (0, false), &syn80),
            TC_ACT_UNSPEC,
            Counter::Malformed,
        ),
        l3_case(
            "l3: the IP version disagrees with skb->protocol",
            ipv4_packet(L3_SOURCE4, SERVER4, TCP, &[], (0, false), &syn80)
                .into_iter()
                .enumerate()
                .map(|(i, b)| if i == 0 { 0x65 } else { b })
                .collect(),
            TC_ACT_SHOT,
            Counter::DroppedBadLinkHeader,
        ),
        l3_case(
            "l3: tcp4 with IP options to another port",
            ipv4_packet(L3_SOURCE4, SERVER4, TCP, &nop_options, (0, false), &syn81),
            TC_ACT_UNSPEC,
            Counter::NotMatched,
        ),
        l3_case(
            "l3: tcp6 past hop-by-hop and destination options",
            ipv6_packet(L3_SOURCE6, SERVER6, 0, &chain_to_tcp),
            TC_ACT_SHOT,
            Counter::DroppedNoSocket,
        ),
        // IP options make these two long enough for BPF_PROG_TEST_RUN, which wants a whole
        // IPv4 header behind the 14 bytes it takes for Ethernet.
        l3_case(
            "l3: tcp4 tiny first fragment with IP options, matched, no socket",
            ipv4_packet(
                L3_SOURCE4,
                SERVER4,
                TCP,
                &nop_options,
                (0, true),
                &syn80[..8],
            ),
            TC_ACT_SHOT,
            Counter::DroppedNoSocket,
        ),
        l3_case(
            "l3: tcp4 later fragment of that one",
            ipv4_packet(
                L3_SOURCE4,
                SERVER4,
                TCP,
                &nop_options,
                (1, false),
                &syn80[8..],
            ),
            TC_ACT_SHOT,
            Counter::DroppedLaterFragment,
        ),
    ]
}

fn counters(classifier: &Classifier) -> Vec<(Counter, u64)> {
    classifier.counters().expect("reading the counters")
}

/// Loads the classifier with the rule `rule_args` describe, installs it `installs` times
/// (each install a new generation: 0, 1, 0, ...) and after each install runs `cases` (made
/// fresh each time) through it, in a fresh network namespace where `setup` ran first.
/// Returns what went wrong, one line per case.
fn run_cases(
    tag: &str,
    rule_args: &[&str],
    installs: usize,
    setup: impl FnOnce() -> Vec<std::net::TcpListener> + Send,
    cases: impl Fn() -> Vec<Case> + Send + Sync,
) -> Vec<String> {
    require_root();
    let ns = Netns::create(format!("tp-{tag}-{}", std::process::id())).expect("namespace");
    ns.run(|| {
        let _sockets = setup();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let _guard = runtime.enter();
        let Cli {
            command: proxy::config::Command::Run(args),
        } = Cli::parse_from(rule_args)
        else {
            panic!("not a run command");
        };
        let rules = args.rules().expect("rules");
        let compiled = rules::compile(&rules).expect("compiles");
        let mut classifier = Classifier::load(0, false, 100).expect("loading the classifier");
        let mut failures = Vec::new();
        for install in 0..installs {
            classifier
                .install_rules(&rules, &compiled)
                .expect("installing rules");
            for case in cases() {
                classifier
                    .set_return_path_lookup(case.return_path_lookup)
                    .expect("configuring the return path");
                let before = counters(&classifier);
                let verdict = match classifier.run_on_frame(case.program, &case.frame) {
                    Ok(verdict) => verdict,
                    Err(e) => {
                        failures.push(format!(
                            "install {install}: {}: BPF_PROG_TEST_RUN failed: {}",
                            case.name,
                            proxy::error_chain(&e)
                        ));
                        continue;
                    }
                };
                let after = counters(&classifier);
                let moved: Vec<(Counter, u64)> = before
                    .iter()
                    .zip(&after)
                    .filter(|((c, _), _)| *c != Counter::Seen)
                    .filter(|((_, b), (_, a))| a != b)
                    .map(|((c, b), (_, a))| (*c, a - b))
                    .collect();
                let want: Vec<(Counter, u64)> = case.counters.iter().map(|c| (*c, 1)).collect();
                if verdict != case.verdict || moved != want {
                    failures.push(format!(
                        "install {install}: {}: verdict {verdict} (want {}), counters moved \
                         {moved:?} (want {want:?})",
                        case.name, case.verdict
                    ));
                }
            }
        }
        failures
    })
    .expect("entering the namespace")
}

#[test]
fn crafted_frames_take_the_expected_path() {
    // Three installs: generation 0, then 1 (the other half of every table, the generation
    // bit in every key), then 0 again after it was cleared.
    let failures = run_cases("classify", RULE, 3, Vec::new, cases);
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn a_first_fragment_under_fail_open_passes_only_when_no_socket_is_there() {
    let rule: Vec<&str> = [RULE, &["--fail-open"]].concat();
    let first = || ipv4(SERVER4, TCP, &[], (0, true), &transport(TCP, 80, &[])[..8]);
    // No listener: what fail-open is for.
    let failures = run_cases("failopen-none", &rule, 1, Vec::new, || {
        vec![case_counting(
            "tcp4 first fragment, fail-open, no socket",
            first(),
            TC_ACT_UNSPEC,
            &[
                Counter::Matched,
                Counter::DroppedNoSocket,
                Counter::PassedFailOpen,
            ],
        )]
    });
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
    // A transparent listener on the on-port: the proxy is there, the fragment must not go
    // past it, fail-open or not.
    let listener = || {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.set_ip_transparent_v4(true).expect("IP_TRANSPARENT");
        socket
            .bind(&std::net::SocketAddr::from(([0, 0, 0, 0], 50_080)).into())
            .expect("bind");
        socket.listen(8).expect("listen");
        vec![socket.into()]
    };
    let failures = run_cases("failopen-listener", &rule, 1, listener, || {
        vec![case_counting(
            "tcp4 first fragment, fail-open, listener there",
            first(),
            TC_ACT_SHOT,
            &[Counter::Matched, Counter::Fragment],
        )]
    });
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn the_return_path_finds_a_transparent_socket_unless_the_agent_said_none_can_exist() {
    // A transparent socket bound to an address no rule covers, with the packet's own
    // tuple: the proxy's upstream socket under --spoof-source, or a connection accepted
    // under a rule that a reload removed.
    let foreign = || {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.set_ip_transparent_v4(true).expect("IP_TRANSPARENT");
        socket
            .bind(&std::net::SocketAddr::from((ELSEWHERE4, 81)).into())
            .expect("bind");
        socket.listen(8).expect("listen");
        vec![socket.into()]
    };
    let to_it = || ipv4(ELSEWHERE4, TCP, &[], (0, false), &transport(TCP, 81, &[]));
    let failures = run_cases("return-path", RULE, 1, foreign, || {
        vec![
            // The lookup finds the socket. BPF_PROG_TEST_RUN's packet is not at TC
            // ingress, so `bpf_sk_assign` refuses it (`skb_at_tc_ingress` in
            // net/core/filter.c): the assignment's failure is what shows the lookup ran.
            case_counting(
                "tcp4 to a transparent socket, no rule, return path looked up",
                to_it(),
                TC_ACT_UNSPEC,
                &[Counter::DivertAssignFailed],
            ),
            Case {
                return_path_lookup: false,
                ..case_counting(
                    "tcp4 to a transparent socket, no rule, return path skipped",
                    to_it(),
                    TC_ACT_UNSPEC,
                    &[Counter::NotMatched, Counter::ReturnPathSkipped],
                )
            },
        ]
    });
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
