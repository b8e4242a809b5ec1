//! Bounds-checked header parsing: Ethernet or no link-layer header, IPv4 (with options),
//! IPv6 (past extension headers), fragments, TCP and UDP ports.
//!
//! Everything the classifier needs is read here, before the first socket lookup, because
//! the verifier rejects any path that returns while a socket reference is held.

use aya_ebpf::programs::TcContext;
use proxy_common::{FragmentKey, IPPROTO_TCP, IPPROTO_UDP};

/// Bytes before the IP header on an Ethernet-type interface at TC ingress.
pub const ETH_HDR_LEN: usize = 14;
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
    /// The datagram's identification when it is fragmented (IPv4 header or IPv6 fragment
    /// header).
    pub fragment_id: u32,
}

impl Packet {
    const NOTHING_READ: Packet = Packet {
        family: Family::V4,
        protocol: 0,
        saddr: [0; 16],
        daddr: [0; 16],
        sport_be: 0,
        dport_be: 0,
        tcp_flags: 0,
        fragment: Fragment::None,
        fragment_id: 0,
    };

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

    /// The datagram this fragment belongs to, as the receiver's reassembly tells it.
    #[inline(always)]
    pub fn fragment_key(&self) -> FragmentKey {
        FragmentKey {
            saddr: self.saddr,
            daddr: self.daddr,
            id: self.fragment_id,
            protocol: match self.family {
                Family::V4 => self.protocol,
                Family::V6 => 0,
            },
            _pad: [0; 3],
        }
    }
}

/// Result of parsing, before any rule is consulted: what kind of packet it is, and its
/// fields as far as they could be read.
///
/// Every outcome carries a whole [`Packet`], zeroed where nothing was read. An enum whose
/// variants carry a packet or nothing let LLVM read the packet's stack slots on paths that
/// never wrote them, and the 5.10 verifier refuses that (`invalid read from stack`; later
/// kernels allow uninitialised stack reads to privileged programs).
pub struct Parsed {
    pub shape: Shape,
    pub packet: Packet,
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A TCP or UDP packet with its ports: whole, or the first fragment of a datagram.
    Transport,
    /// A later fragment: no transport header, so no ports (they read as 0).
    LaterFragment,
    /// The IP header was read but the transport header could not be (cut short, or an IPv6
    /// chain that never reaches it): the destination is known, the ports are not (0).
    Unclassifiable,
    /// Not IPv4/IPv6, or another transport protocol: never touched.
    Other,
    /// The IP header itself is cut short or inconsistent: the stack drops such a packet
    /// (`ip_rcv_core`, `ipv6_rcv`) before routing it anywhere.
    Malformed,
    /// No link-layer header was expected, but the IP version at offset 0 is not the one
    /// `skb->protocol` names: the headers are elsewhere, and the stack (which reads from
    /// the network header) may well accept the packet.
    BadLinkHeader,
}

impl Parsed {
    #[inline(always)]
    fn new(shape: Shape, packet: Packet) -> Parsed {
        Parsed { shape, packet }
    }

    /// An outcome with no packet fields read.
    #[inline(always)]
    fn bare(shape: Shape) -> Parsed {
        Parsed::new(shape, Packet::NOTHING_READ)
    }
}

/// A header that could not be read; [`parse`] turns it into [`Shape::Malformed`].
struct CutShort;

#[inline(always)]
fn load<T>(ctx: &TcContext, offset: usize) -> Result<T, CutShort> {
    read(ctx, offset).ok_or(CutShort)
}

/// `size_of::<T>()` bytes at `offset` into the frame: straight from the packet's linear
/// data where they lie in it (the headers, nearly always), else through
/// `bpf_skb_load_bytes`, which also reaches the paged part. The same bytes either way; a
/// helper call per read was most of what a packet no rule matches cost. (Only for reads of
/// more than one byte: LLVM turns a one-byte bound into a `pkt_end > pkt` test, from which
/// the verifier grants no range.)
#[inline(always)]
fn read<T>(ctx: &TcContext, offset: usize) -> Option<T> {
    let at = ctx.data() + offset;
    if at + core::mem::size_of::<T>() <= ctx.data_end() {
        // SAFETY: the bytes lie between data and data_end, which the verifier checks too.
        Some(unsafe { core::ptr::read_unaligned(at as *const T) })
    } else {
        ctx.load::<T>(offset).ok()
    }
}

/// Parses a packet whose IP header starts `L2_LEN` bytes into the frame: 14 behind an
/// Ethernet header, 0 on an interface without a link-layer header (T10), where the
/// ethertype comes from `skb->protocol` instead.
#[inline(always)]
pub fn parse<const L2_LEN: usize>(ctx: &TcContext) -> Parsed {
    let ethertype = if L2_LEN == 0 {
        // `__sk_buff.protocol` holds the __be16 `skb->protocol`, zero-extended.
        u16::from_be(unsafe { (*ctx.skb.skb).protocol } as u16)
    } else {
        match load::<u16>(ctx, L2_LEN - 2) {
            Ok(ethertype) => u16::from_be(ethertype),
            Err(CutShort) => return Parsed::bare(Shape::Malformed),
        }
    };
    let version = match ethertype {
        ETH_P_IP => 4,
        ETH_P_IPV6 => 6,
        _ => return Parsed::bare(Shape::Other),
    };
    if L2_LEN == 0 {
        match ctx.load::<u8>(0) {
            Ok(first) if first >> 4 == version => {}
            Ok(_) => return Parsed::bare(Shape::BadLinkHeader),
            Err(_) => return Parsed::bare(Shape::Malformed),
        }
    }
    let parsed = if version == 4 {
        parse_ipv4(ctx, L2_LEN)
    } else {
        parse_ipv6(ctx, L2_LEN)
    };
    parsed.unwrap_or_else(|CutShort| Parsed::bare(Shape::Malformed))
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, l3: usize) -> Result<Parsed, CutShort> {
    // The fixed header in one read: each `bpf_skb_load_bytes` is a helper call, and a
    // call per field was most of what a packet no rule matches costs.
    let header: [u8; 20] = load(ctx, l3)?;
    let version_ihl = header[0];
    if version_ihl >> 4 != 4 {
        return Err(CutShort);
    }
    // IPv4 options are legal: the transport header is at ihl * 4, not at 20 (T1).
    let ihl = (version_ihl & 0x0f) as usize;
    if ihl < 5 {
        return Err(CutShort);
    }
    let protocol = header[9];
    if protocol != IPPROTO_TCP && protocol != IPPROTO_UDP {
        return Ok(Parsed::bare(Shape::Other));
    }
    let id = u16::from_be_bytes([header[4], header[5]]);
    let frag = u16::from_be_bytes([header[6], header[7]]);
    let fragment = if frag & 0x1fff != 0 {
        Fragment::Later
    } else if frag & 0x2000 != 0 {
        Fragment::First
    } else {
        Fragment::None
    };
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    saddr[..4].copy_from_slice(&header[12..16]);
    daddr[..4].copy_from_slice(&header[16..20]);
    let packet = Packet {
        family: Family::V4,
        protocol,
        saddr,
        daddr,
        sport_be: 0,
        dport_be: 0,
        tcp_flags: 0,
        fragment,
        fragment_id: u32::from(id),
    };
    if fragment == Fragment::Later {
        return Ok(Parsed::new(Shape::LaterFragment, packet));
    }
    Ok(with_ports(ctx, l3 + ihl * 4, packet))
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, l3: usize) -> Result<Parsed, CutShort> {
    // The fixed header in one read (see `parse_ipv4`).
    let header: [u8; 40] = load(ctx, l3)?;
    let next = header[6];
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    saddr.copy_from_slice(&header[8..24]);
    daddr.copy_from_slice(&header[24..40]);
    let mut packet = Packet {
        family: Family::V6,
        protocol: next,
        saddr,
        daddr,
        sport_be: 0,
        dport_be: 0,
        tcp_flags: 0,
        fragment: Fragment::None,
        fragment_id: 0,
    };
    // From here on the destination is known: a header that cannot be read makes the
    // packet unclassifiable, not malformed (T9, T11).
    match walk_ipv6_chain(ctx, l3 + IPV6_HDR_LEN, &mut packet) {
        Ok(Chain::Transport(l4)) => Ok(with_ports(ctx, l4, packet)),
        Ok(Chain::LaterFragment) => Ok(Parsed::new(Shape::LaterFragment, packet)),
        // ICMPv6, ESP, and everything else: not ours.
        Ok(Chain::OtherProtocol) => Ok(Parsed::bare(Shape::Other)),
        Ok(Chain::NoTransport) | Err(CutShort) => Ok(Parsed::new(Shape::Unclassifiable, packet)),
    }
}

/// Where an IPv6 extension header chain leads.
enum Chain {
    /// TCP or UDP, whose header starts at this offset.
    Transport(usize),
    /// A later fragment: what follows the fragment header is payload, not headers.
    LaterFragment,
    /// An upper protocol other than TCP and UDP.
    OtherProtocol,
    /// No upper header (`NEXTHDR_NONE`), or more headers than a BPF loop may walk:
    /// ip6tables hotdrops such a packet when a rule with a protocol checks it (T9).
    NoTransport,
}

/// Walks the extension headers like `ipv6_find_hdr`, keeping `packet.protocol` and its
/// fragment fields up to date.
#[inline(always)]
fn walk_ipv6_chain(
    ctx: &TcContext,
    mut offset: usize,
    packet: &mut Packet,
) -> Result<Chain, CutShort> {
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match packet.protocol {
            IPPROTO_TCP | IPPROTO_UDP => return Ok(Chain::Transport(offset)),
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => {
                let hdr: [u8; 2] = load(ctx, offset)?;
                packet.protocol = hdr[0];
                offset += (hdr[1] as usize + 1) * 8;
            }
            NEXTHDR_AUTH => {
                let hdr: [u8; 2] = load(ctx, offset)?;
                packet.protocol = hdr[0];
                offset += (hdr[1] as usize + 2) * 4;
            }
            NEXTHDR_FRAGMENT => {
                let hdr: [u8; 8] = load(ctx, offset)?;
                packet.protocol = hdr[0];
                packet.fragment_id = u32::from_be_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
                let frag = u16::from_be_bytes([hdr[2], hdr[3]]);
                if frag & 0xfff8 != 0 {
                    packet.fragment = Fragment::Later;
                    return Ok(Chain::LaterFragment);
                }
                if frag & 1 != 0 {
                    packet.fragment = Fragment::First;
                }
                offset += 8;
            }
            NEXTHDR_NONE => return Ok(Chain::NoTransport),
            _ => return Ok(Chain::OtherProtocol),
        }
    }
    Ok(Chain::NoTransport)
}

/// The packet with its ports read from the transport header at `l4`, or unclassifiable
/// when they cannot be read.
///
/// A first fragment may carry only the first 8 bytes of the TCP header (RFC 1858's tiny
/// fragment): its ports are there, its flags are not. The ports decide the rule, and no
/// later fragment can change them (offsets are multiples of 8 bytes, and Linux discards
/// overlapping fragments), so the packet is classified by them; the flags only matter for
/// the TIME_WAIT case, and a fragment is never assigned. A segment that is not a fragment
/// and is too short for its flags is cut short: unclassifiable.
#[inline(always)]
fn with_ports(ctx: &TcContext, l4: usize, mut packet: Packet) -> Parsed {
    // Both TCP and UDP start with the source and destination ports; a TCP header's flags
    // are its 14th byte. One read for all of it where the segment holds it.
    if packet.protocol == IPPROTO_TCP
        && let Some(start) = read::<[u8; 14]>(ctx, l4)
    {
        packet.sport_be = u16::from_ne_bytes([start[0], start[1]]);
        packet.dport_be = u16::from_ne_bytes([start[2], start[3]]);
        packet.tcp_flags = start[13];
        return Parsed::new(Shape::Transport, packet);
    }
    let Some(ports) = read::<[u16; 2]>(ctx, l4) else {
        return Parsed::new(Shape::Unclassifiable, packet);
    };
    if packet.protocol == IPPROTO_TCP && packet.fragment != Fragment::First {
        // Not even the flags: cut short.
        return Parsed::new(Shape::Unclassifiable, packet);
    }
    packet.sport_be = ports[0];
    packet.dport_be = ports[1];
    Parsed::new(Shape::Transport, packet)
}
