//! The on-port taken: with the built-in listener the agent binds a transparent listener at
//! each rule's on-ip (or the wildcard address) and on-port, and a socket already bound there
//! (a plain listener, another proxy) makes the bind fail, or, bound to a specific address
//! under a wildcard one of ours, would take the traffic. Read from `/proc/net/{tcp,udp}{,6}`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{Finding, Settings};

/// `TCP_LISTEN` in `/proc/net/tcp`.
const LISTEN: u8 = 0x0a;
/// `TCP_CLOSE`, the state of a UDP socket that is not connected.
const CLOSE: u8 = 0x07;

/// A socket bound and waiting: a TCP listener, or a UDP socket without a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bound {
    pub udp: bool,
    pub addr: IpAddr,
    pub port: u16,
}

/// The waiting sockets of one `/proc/net/{tcp,tcp6,udp,udp6}` listing.
pub fn parse(text: &str, udp: bool) -> Vec<Bound> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace().skip(1);
            let (local, remote, state) = (fields.next()?, fields.next()?, fields.next()?);
            let state = u8::from_str_radix(state, 16).ok()?;
            let (_, remote_port) = remote.split_once(':')?;
            let waiting = if udp {
                state == CLOSE && remote_port == "0000"
            } else {
                state == LISTEN
            };
            if !waiting {
                return None;
            }
            let (addr, port) = local.split_once(':')?;
            Some(Bound {
                udp,
                addr: parse_addr(addr)?,
                port: u16::from_str_radix(port, 16).ok()?,
            })
        })
        .collect()
}

/// The kernel prints an address as 32-bit words in host byte order.
fn parse_addr(hex: &str) -> Option<IpAddr> {
    let word = |i: usize| -> Option<[u8; 4]> {
        let w = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        Some(w.to_ne_bytes())
    };
    match hex.len() {
        8 => Some(IpAddr::V4(Ipv4Addr::from(word(0)?))),
        32 => {
            let mut bytes = [0u8; 16];
            for i in 0..4 {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
            }
            Some(IpAddr::V6(Ipv6Addr::from(bytes)))
        }
        _ => None,
    }
}

/// Whether a socket at `addr` collides with ours at `on_ip` (`None`: the wildcard).
fn collides(addr: IpAddr, on_ip: Option<IpAddr>) -> bool {
    match on_ip {
        None => true,
        Some(on_ip) => addr == on_ip || addr.is_unspecified(),
    }
}

/// What the listeners the rules need find already bound. `wanted`: (udp, on-ip, on-port) of
/// each listener; `agent_runs`: an agent of this table answers (its own listeners are there).
pub fn taken(
    wanted: &[(bool, Option<IpAddr>, u16)],
    bound: &[Bound],
    agent_runs: bool,
) -> Vec<Finding> {
    let mut findings = Vec::new();
    for &(udp, on_ip, port) in wanted {
        let proto = if udp { "udp" } else { "tcp" };
        let at = match on_ip {
            Some(ip) => format!("{proto} {}", std::net::SocketAddr::new(ip, port)),
            None => format!("{proto} port {port}"),
        };
        let holders: Vec<String> = bound
            .iter()
            .filter(|b| b.udp == udp && b.port == port && collides(b.addr, on_ip))
            .map(|b| std::net::SocketAddr::new(b.addr, b.port).to_string())
            .collect();
        findings.push(if holders.is_empty() {
            Finding::ok("on-port", format!("{at} is free"))
        } else if agent_runs {
            Finding::info(
                "on-port",
                format!(
                    "{at} is bound ({}), by the agent that runs with this table",
                    holders.join(", ")
                ),
            )
        } else {
            Finding::problem(
                "on-port",
                format!(
                    "{at} is taken: a socket that is not the agent's transparent listener is \
                     bound at {}",
                    holders.join(", ")
                ),
                "stop what holds it (ss -lntup), or pick another --on-port",
            )
        });
    }
    findings
}

pub(super) fn check(settings: &Settings<'_>, agent_runs: bool) -> Vec<Finding> {
    let mut wanted: Vec<(bool, Option<IpAddr>, u16)> = Vec::new();
    for rule in settings.rules {
        for (on, udp) in [(rule.protocols.tcp, false), (rule.protocols.udp, true)] {
            let key = (udp, rule.on_ip, rule.on_port);
            if on && rule.on_port != 0 && !wanted.contains(&key) {
                wanted.push(key);
            }
        }
    }
    let mut bound = Vec::new();
    for (file, udp) in [
        ("/proc/net/tcp", false),
        ("/proc/net/tcp6", false),
        ("/proc/net/udp", true),
        ("/proc/net/udp6", true),
    ] {
        if let Ok(text) = std::fs::read_to_string(file) {
            bound.extend(parse(&text, udp));
        }
    }
    taken(&wanted, &bound, agent_runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::doctor::Severity;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:C3A0 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0
   2: 0100007F:C3A0 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0
";
    const TCP6: &str =
        "  sl  local_address                         remote_address                        st
   0: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 0
";
    const UDP: &str = "   sl  local_address rem_address   st
  1: 00000000:0035 00000000:0000 07 0
  2: 0100007F:0036 0100007F:0035 01 0
";

    #[test]
    fn listeners_and_unconnected_udp_are_parsed_with_their_addresses() {
        assert_eq!(
            parse(TCP, false),
            [
                Bound {
                    udp: false,
                    addr: Ipv4Addr::UNSPECIFIED.into(),
                    port: 50080
                },
                Bound {
                    udp: false,
                    addr: Ipv4Addr::LOCALHOST.into(),
                    port: 80
                },
            ]
        );
        assert_eq!(
            parse(TCP6, false),
            [Bound {
                udp: false,
                addr: Ipv6Addr::LOCALHOST.into(),
                port: 8080
            }]
        );
        assert_eq!(
            parse(UDP, true),
            [Bound {
                udp: true,
                addr: Ipv4Addr::UNSPECIFIED.into(),
                port: 53
            }]
        );
    }

    #[test]
    fn a_bound_on_port_is_a_problem_unless_the_agent_holds_it() {
        let bound = parse(TCP, false);
        let lo: IpAddr = Ipv4Addr::LOCALHOST.into();
        let other: IpAddr = Ipv4Addr::new(10, 0, 0, 1).into();
        let severity = |wanted: (bool, Option<IpAddr>, u16), runs: bool| {
            taken(&[wanted], &bound, runs)[0].severity
        };
        assert_eq!(severity((false, None, 50080), false), Severity::Problem);
        assert_eq!(severity((false, None, 50080), true), Severity::Info);
        // A wildcard listener collides with any on-ip; one on 127.0.0.1 only with itself.
        assert_eq!(
            severity((false, Some(other), 50080), false),
            Severity::Problem
        );
        assert_eq!(severity((false, Some(lo), 80), false), Severity::Problem);
        assert_eq!(severity((false, Some(other), 80), false), Severity::Ok);
        assert_eq!(severity((false, None, 80), false), Severity::Problem);
        assert_eq!(severity((true, None, 50080), false), Severity::Ok);
        assert_eq!(severity((false, None, 50081), false), Severity::Ok);
    }
}
