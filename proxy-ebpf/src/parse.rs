//! Bounds-checked header parsing: Ethernet, IPv4 (with options), IPv6 (past extension
//! headers), TCP and UDP ports.
//!
//! Everything the classifier needs is read here, before the first socket lookup, because
//! the verifier rejects any path that returns while a socket reference is held.

use aya_ebpf::programs::TcContext;
use proxy_common::{IPPROTO_TCP, IPPROTO_UDP};

const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;

const IPV6_HDR_LEN: usize = 40;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_NONE: u8 = 59;
const NEXTHDR_DEST: u8 = 60;
/// Extension headers walked before giving up (`ipv6_find_hdr` has no fixed bound, but a
/// BPF loop must; real traffic rarely carries more than two or three).
const MAX_IPV6_EXT_HEADERS: usize = 8;

pub const TCP_FLAG_FIN: u8 = 0x01;
pub const TCP_FLAG_SYN: u8 = 0x02;
pub const TCP_FLAG_RST: u8 = 0x04;
pub const TCP_FLAG_ACK: u8 = 0x10;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

/// Where the packet sits in a fragmented datagram. At TC ingress nothing is reassembled yet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Fragment {
    /// Not fragmented.
    None,
    /// First fragment: the transport header (ports) is present.
    First,
    /// A later fragment: no transport header, ports unknown.
    Later,
}

/// The parts of a packet the classifier looks at. Addresses are in network order; IPv4
/// uses the first 4 bytes of `saddr` / `daddr`.
pub struct Packet {
    pub family: Family,
    pub protocol: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    /// Network order, as they are on the wire and in `bpf_sock_tuple`.
    pub sport_be: u16,
    pub dport_be: u16,
    /// TCP flags byte (0 for UDP).
    pub tcp_flags: u8,
    pub fragment: Fragment,
}

impl Packet {
    /// SYN set and ACK, RST, FIN clear: the condition of `nf_tproxy_handle_time_wait4`.
    #[inline(always)]
    pub fn is_pure_syn(&self) -> bool {
        self.protocol == IPPROTO_TCP
            && self.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST | TCP_FLAG_FIN)
                == TCP_FLAG_SYN
    }

    pub fn dport(&self) -> u16 {
        u16::from_be(self.dport_be)
    }
}

/// Result of parsing, before any rule is consulted.
pub enum Parsed {
    /// A TCP or UDP packet with its ports (or a later fragment of one).
    Transport(Packet),
    /// Not IPv4/IPv6, or another transport protocol: never touched.
    Other,
    /// An IPv6 packet whose transport header could not be found (T9), with its destination.
    Ipv6NoTransport([u8; 16]),
}

pub enum ParseError {
    /// Headers cut short or inconsistent.
    Malformed,
}

#[inline(always)]
fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, ParseError> {
    ctx.load::<T>(offset).map_err(|_| ParseError::Malformed)
}

#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Parsed, ParseError> {
    let ethertype = u16::from_be(load::<u16>(ctx, 12)?);
    match ethertype {
        ETH_P_IP => parse_ipv4(ctx),
        ETH_P_IPV6 => parse_ipv6(ctx),
        _ => Ok(Parsed::Other),
    }
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext) -> Result<Parsed, ParseError> {
    let l3 = ETH_HDR_LEN;
    let version_ihl = load::<u8>(ctx, l3)?;
    if version_ihl >> 4 != 4 {
        return Err(ParseError::Malformed);
    }
    // IPv4 options are legal: the transport header is at ihl * 4, not at 20 (T1).
    let ihl = (version_ihl & 0x0f) as usize;
    if ihl < 5 {
        return Err(ParseError::Malformed);
    }
    let protocol = load::<u8>(ctx, l3 + 9)?;
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return Ok(Parsed::Other);
    }
    let frag = u16::from_be(load::<u16>(ctx, l3 + 6)?);
    let fragment = if frag & 0x1fff != 0 {
        Fragment::Later
    } else if frag & 0x2000 != 0 {
        Fragment::First
    } else {
        Fragment::None
    };
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    let s: [u8; 4] = load(ctx, l3 + 12)?;
    let d: [u8; 4] = load(ctx, l3 + 16)?;
    saddr[..4].copy_from_slice(&s);
    daddr[..4].copy_from_slice(&d);
    let mut packet = Packet {
        family: Family::V4,
        protocol,
        saddr,
        daddr,
        sport_be: 0,
        dport_be: 0,
        tcp_flags: 0,
        fragment,
    };
    if fragment != Fragment::Later {
        read_ports(ctx, l3 + ihl * 4, &mut packet)?;
    }
    Ok(Parsed::Transport(packet))
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext) -> Result<Parsed, ParseError> {
    let l3 = ETH_HDR_LEN;
    let saddr: [u8; 16] = load(ctx, l3 + 8)?;
    let daddr: [u8; 16] = load(ctx, l3 + 24)?;
    let mut next = load::<u8>(ctx, l3 + 6)?;
    let mut offset = l3 + IPV6_HDR_LEN;
    let mut fragment = Fragment::None;
    // Walk the extension headers like `ipv6_find_hdr`.
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next {
            IPPROTO_TCP | IPPROTO_UDP => {
                let mut packet = Packet {
                    family: Family::V6,
                    protocol: next,
                    saddr,
                    daddr,
                    sport_be: 0,
                    dport_be: 0,
                    tcp_flags: 0,
                    fragment,
                };
                read_ports(ctx, offset, &mut packet)?;
                return Ok(Parsed::Transport(packet));
            }
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let hdr: [u8; 2] = load(ctx, offset)?;
                next = hdr[0];
                offset += (hdr[1] as usize + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let hdr: [u8; 2] = load(ctx, offset)?;
                next = hdr[0];
                offset += (hdr[1] as usize + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let hdr: [u8; 4] = load(ctx, offset)?;
                next = hdr[0];
                let frag = u16::from_be_bytes([hdr[2], hdr[3]]);
                if frag & 0xfff8 != 0 {
                    // A later fragment: no transport header here. Only the protocol is
                    // known; the ports are not.
                    if next != IPPROTO_TCP && next != IPPROTO_UDP {
                        return Ok(Parsed::Other);
                    }
                    return Ok(Parsed::Transport(Packet {
                        family: Family::V6,
                        protocol: next,
                        saddr,
                        daddr,
                        sport_be: 0,
                        dport_be: 0,
                        tcp_flags: 0,
                        fragment: Fragment::Later,
                    }));
                }
                if frag & 1 != 0 {
                    fragment = Fragment::First;
                }
                offset += 8;
            }
            NEXTHDR_NONE => return Ok(Parsed::Ipv6NoTransport(daddr)),
            // ICMPv6, ESP, and everything else: not ours.
            _ => return Ok(Parsed::Other),
        }
    }
    Ok(Parsed::Ipv6NoTransport(daddr))
}

#[inline(always)]
fn read_ports(ctx: &TcContext, l4: usize, packet: &mut Packet) -> Result<(), ParseError> {
    // Both TCP and UDP start with the source and destination ports.
    let ports: [u16; 2] = load(ctx, l4)?;
    packet.sport_be = ports[0];
    packet.dport_be = ports[1];
    if packet.protocol == IPPROTO_TCP {
        packet.tcp_flags = load::<u8>(ctx, l4 + 13)?;
    }
    Ok(())
}
