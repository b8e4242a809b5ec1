//! The client's side of a run: its socket (bound to the fixed client address, with the
//! case's options), what it sends, and the steps of the case's flow, each observed.

use std::{
    io::{self, Read as _, Write as _},
    net::TcpStream,
    time::{Duration, Instant},
};

use proxy_testbed::Gateway;
use socket2::{Protocol, Socket, Type};

use super::{
    case::{CLIENT_PORT, Case, Fam, Flow, Proto},
    domain,
    observe::{self, Outcome, Receiver, Step},
    setsockopt_bytes, setsockopt_int,
};

/// How long a TCP client waits for its connection; a drop shows up as a timeout.
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// The TIME_WAIT case allows the 1 s SYN retransmission (timing is not compared).
const TCP_RECONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The client's socket with the case's options, bound to the fixed client address.
fn client_socket(case: &Case) -> io::Result<Socket> {
    let (ty, protocol) = match case.proto {
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
        Proto::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let socket = Socket::new(domain(case.fam), ty, Some(protocol))?;
    if case.fam == Fam::V6 {
        socket.set_only_v6(true)?;
    }
    // The TIME_WAIT case binds the same port twice.
    socket.set_reuse_address(true)?;
    let opts = &case.client;
    if let Some(options) = opts.ip_options {
        setsockopt_bytes(&socket, libc::IPPROTO_IP, libc::IP_OPTIONS, options)?;
    }
    if let Some(dstopts) = opts.ipv6_dstopts {
        setsockopt_bytes(&socket, libc::IPPROTO_IPV6, libc::IPV6_DSTOPTS, dstopts)?;
    }
    if let Some(hopopts) = opts.ipv6_hopopts {
        setsockopt_bytes(&socket, libc::IPPROTO_IPV6, libc::IPV6_HOPOPTS, hopopts)?;
    }
    if opts.pmtudisc_dont {
        setsockopt_int(
            &socket,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DONT,
        );
    }
    socket.bind(&case.client_addr().into())?;
    Ok(socket)
}

fn describe_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "timed out".to_owned(),
        io::ErrorKind::ConnectionRefused => "refused".to_owned(),
        io::ErrorKind::ConnectionReset => "reset".to_owned(),
        _ => format!("error: {e}"),
    }
}

/// Client side of one step, on a thread in the client namespace: connects and writes the
/// first part of the payload (TCP), or sends the datagram (UDP).
fn client_send(gw: &Gateway, case: &Case, timeout: Duration) -> (String, Option<TcpStream>) {
    let payload = vec![b'x'; case.payload];
    let dst = case.dst_addr();
    gw.client
        .run(|| {
            let socket = match client_socket(case) {
                Ok(s) => s,
                Err(e) => panic!("{}: client socket: {e}", case.name),
            };
            match case.proto {
                Proto::Tcp => match socket.connect_timeout(&dst.into(), timeout) {
                    Ok(()) => {
                        let mut stream: TcpStream = socket.into();
                        let first = payload.len().min(3);
                        let written = stream.write_all(&payload[..first]);
                        (
                            match written {
                                Ok(()) => "connected".to_owned(),
                                Err(e) => describe_error(&e),
                            },
                            Some(stream),
                        )
                    }
                    Err(e) => (describe_error(&e), None),
                },
                Proto::Udp => match socket.send_to(&payload, &dst.into()) {
                    Ok(n) if n == payload.len() => ("sent".to_owned(), None),
                    Ok(n) => (format!("sent {n} of {}", payload.len()), None),
                    Err(e) => (describe_error(&e), None),
                },
            }
        })
        .expect("entering the client namespace")
}

/// One client action and what it led to.
fn step(
    gw: &Gateway,
    case: &Case,
    receivers: &[Receiver],
    timeout: Duration,
    notes: &mut String,
) -> (Step, Option<TcpStream>, Vec<TcpStream>) {
    let started = Instant::now();
    let (client, mut stream) = client_send(gw, case, timeout);
    let took = started.elapsed();
    if case.proto == Proto::Tcp {
        notes.push_str(&format!(" connect {}ms", took.as_millis()));
    }
    // The rest of the payload once the connection is up: the established path.
    if let Some(s) = stream.as_mut()
        && case.payload > 3
    {
        std::thread::sleep(Duration::from_millis(20));
        let _ = s.write_all(&vec![b'y'; case.payload - 3]);
    }
    let (got, accepted) = observe::observe(case, receivers, stream.is_some());
    (
        Step {
            client,
            got,
            time_wait: None,
        },
        stream,
        accepted,
    )
}

/// Whether a TCP socket with the client's port as its peer is in TIME_WAIT on the router.
fn router_time_wait(gw: &Gateway) -> bool {
    let out = gw
        .router
        .command("ss")
        .args(["-Htan", "state", "time-wait"])
        .output()
        .expect("running ss in the router namespace");
    String::from_utf8_lossy(&out.stdout).contains(&format!(":{CLIENT_PORT}"))
}

/// The traffic of one run: opens the receivers, then runs the case's flow, each step
/// observed. Timings go to `notes`, which are printed, not compared.
pub(super) fn exchange(gw: &Gateway, case: &Case, notes: &mut String) -> Outcome {
    let mut receivers = observe::open_router_receivers(gw, case);
    receivers.push(observe::open_server(gw, case));
    match case.flow {
        Flow::Once => {
            let (first, _client, _accepted) =
                step(gw, case, &receivers, TCP_CONNECT_TIMEOUT, notes);
            Outcome { steps: vec![first] }
        }
        Flow::TcpReconnect => {
            assert_eq!(
                case.proto,
                Proto::Tcp,
                "{}: reconnect is TCP only",
                case.name
            );
            let (mut first, client, accepted) =
                step(gw, case, &receivers, TCP_RECONNECT_TIMEOUT, notes);
            // The receiving side closes first, so it is the one that ends in TIME_WAIT.
            for mut stream in accepted {
                let _ = stream.write_all(b"bye");
            }
            if let Some(mut stream) = client {
                let mut reply = Vec::new();
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = stream.read_to_end(&mut reply);
                notes.push_str(&format!(" reply={:?}", String::from_utf8_lossy(&reply)));
            }
            std::thread::sleep(Duration::from_millis(100));
            first.time_wait = Some(router_time_wait(gw));
            let (second, _client, _accepted) =
                step(gw, case, &receivers, TCP_RECONNECT_TIMEOUT, notes);
            Outcome {
                steps: vec![first, second],
            }
        }
    }
}
