//! The socket search of `tproxy_tg4` / `tproxy_tg6` (net/netfilter/xt_TPROXY.c):
//! established first with the packet's real tuple, then the TIME_WAIT + SYN case (whose
//! handoff to the listener is in `time_wait_handoff.rs`), then the listener at
//! (laddr, lport); and the transparency check of `nf_tproxy_sk_is_transparent`.
//!
//! Every socket reference taken here is held by a [`SockRef`], which releases it when it
//! goes out of scope: the verifier rejects any path that returns while holding one.

use core::ptr;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{bpf_sock, bpf_sock_tuple},
    helpers::{
        bpf_probe_read_kernel, bpf_sk_assign, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp,
    },
    programs::TcContext,
};
use proxy_common::{IPPROTO_TCP, SockOffsets};

use crate::parse::{Family, Packet};

const BPF_TCP_TIME_WAIT: u32 = 6;
const BPF_TCP_LISTEN: u32 = 10;
const BPF_TCP_NEW_SYN_RECV: u32 = 12;
/// State recorded for UDP sockets, which have no TCP state worth reading here.
const UDP_SOCKET: u32 = 0;

/// `BPF_F_CURRENT_NETNS`: the helpers read the netns id as s32 and -1 means "the packet's"
/// (the socket's, in the cgroup programs).
pub(crate) const CURRENT_NETNS: u64 = u64::MAX;

const TUPLE_V4_LEN: u32 = 12;
const TUPLE_V6_LEN: u32 = 36;

/// Where the transparent flag lives in each kind of socket, computed by the agent from the
/// kernel's BTF (`proxy::btf`) and set before load. `u32::MAX` offsets: unknown.
#[unsafe(no_mangle)]
static SOCK_OFFSETS: SockOffsets = SockOffsets::UNKNOWN;

/// A socket reference from `bpf_skc_lookup_tcp` / `bpf_sk_lookup_udp`, released on drop.
///
/// The two helpers return different pointer types (sock_common and sock), and the verifier
/// rejects a load instruction used with both ("same insn cannot be used with different
/// pointers"). So every field is read right after the lookup, in the branch of its
/// protocol, and kept here as plain values.
pub struct SockRef {
    sk: *mut bpf_sock,
    /// TCP state (`BPF_TCP_*`), or [`UDP_SOCKET`].
    state: u32,
    /// UDP only: connected and bound to a specific address, the only kind
    /// `nf_tproxy_get_sock_v4(..., NF_TPROXY_LOOKUP_ESTABLISHED)` accepts (T2).
    connected_specific: bool,
    /// Bound to a specific local address (always true for TCP sockets other than
    /// listeners, which have their peer's tuple).
    bound_specific: bool,
}

impl SockRef {
    /// `inet_sk_transparent()`: the socket was set up with IP_TRANSPARENT (T5). The
    /// kernel's TPROXY refuses any other socket, and `bpf_sk_assign` does not check.
    #[inline(always)]
    pub fn is_transparent(&self) -> bool {
        let offsets = unsafe { ptr::read_volatile(&SOCK_OFFSETS) };
        let (off, bit) = match self.state {
            BPF_TCP_TIME_WAIT => (offsets.tw_off, offsets.tw_bit),
            BPF_TCP_NEW_SYN_RECV => (offsets.req_off, offsets.req_bit),
            _ => (offsets.full_off, offsets.full_bit),
        };
        if off == u32::MAX {
            // The agent could not find the flag in this kernel's BTF and said so.
            return true;
        }
        // The verifier forbids arithmetic on a socket pointer, so read the pointer's value
        // as plain bytes first, then the flag's byte through bpf_probe_read_kernel.
        let sk: *mut bpf_sock = self.sk;
        let Ok(addr) = (unsafe { bpf_probe_read_kernel((&raw const sk).cast::<u64>()) }) else {
            return false;
        };
        let Ok(byte) = (unsafe { bpf_probe_read_kernel((addr + u64::from(off)) as *const u8) })
        else {
            return false;
        };
        byte & (1 << (bit & 7)) != 0
    }
}

impl Drop for SockRef {
    #[inline(always)]
    fn drop(&mut self) {
        unsafe { bpf_sk_release(self.sk.cast()) };
    }
}

/// Which socket a packet was given to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// An established, request or TIME_WAIT socket with the packet's own tuple.
    Established,
    /// A pure SYN that met a TIME_WAIT socket while a listener exists at (laddr, lport).
    /// It goes to the TIME_WAIT socket, which the kernel then retires for the listener
    /// (`time_wait_handoff.rs`).
    TimeWaitSyn,
    /// The listener at (laddr, lport).
    Listener,
}

/// The lookup helpers' tuple and its length for the family.
#[inline(always)]
pub(crate) fn tuple(
    family: Family,
    saddr: &[u8; 16],
    sport_be: u16,
    daddr: &[u8; 16],
    dport_be: u16,
) -> (bpf_sock_tuple, u32) {
    let mut t: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    match family {
        Family::V4 => {
            let v4 = unsafe { &mut t.__bindgen_anon_1.ipv4 };
            v4.saddr = u32::from_ne_bytes([saddr[0], saddr[1], saddr[2], saddr[3]]);
            v4.daddr = u32::from_ne_bytes([daddr[0], daddr[1], daddr[2], daddr[3]]);
            v4.sport = sport_be;
            v4.dport = dport_be;
            (t, TUPLE_V4_LEN)
        }
        Family::V6 => {
            let v6 = unsafe { &mut t.__bindgen_anon_1.ipv6 };
            v6.saddr = unsafe { ptr::read_unaligned(saddr.as_ptr().cast()) };
            v6.daddr = unsafe { ptr::read_unaligned(daddr.as_ptr().cast()) };
            v6.sport = sport_be;
            v6.dport = dport_be;
            (t, TUPLE_V6_LEN)
        }
    }
}

/// One socket lookup with the given tuple, as the packet's own protocol.
#[inline(always)]
fn lookup(ctx: &TcContext, packet: &Packet, daddr: &[u8; 16], dport_be: u16) -> Option<SockRef> {
    let (mut t, len) = tuple(
        packet.family,
        &packet.saddr,
        packet.sport_be,
        daddr,
        dport_be,
    );
    if packet.protocol == IPPROTO_TCP {
        // `bpf_skc_lookup_tcp`, not `bpf_sk_lookup_tcp`, which hides TIME_WAIT sockets and
        // turns a request socket into its listener (T2).
        let sk = unsafe { bpf_skc_lookup_tcp(ctx.as_ptr(), &mut t, len, CURRENT_NETNS, 0) };
        if sk.is_null() {
            return None;
        }
        let state = unsafe { ptr::read_volatile(&raw const (*sk).state) };
        // Only a listener can be bound to the wildcard address; the others carry a tuple.
        let bound_specific = state != BPF_TCP_LISTEN || bound_to_address(sk, packet.family);
        Some(SockRef {
            sk,
            state,
            connected_specific: false,
            bound_specific,
        })
    } else {
        let sk = unsafe { bpf_sk_lookup_udp(ctx.as_ptr(), &mut t, len, CURRENT_NETNS, 0) };
        if sk.is_null() {
            return None;
        }
        // Connected: a remote port is set (`inet_dport`). Specific: a local address is.
        let remote_port = unsafe { ptr::read_volatile(&raw const (*sk).dst_port) };
        let bound = bound_to_address(sk, packet.family);
        Some(SockRef {
            sk,
            state: UDP_SOCKET,
            connected_specific: remote_port != 0 && bound,
            bound_specific: bound,
        })
    }
}

/// Is the socket bound to a specific local address (not the wildcard)?
#[inline(always)]
fn bound_to_address(sk: *mut bpf_sock, family: Family) -> bool {
    // SAFETY: `sk` is a non-null socket the lookup returned; the fields are context reads.
    unsafe {
        match family {
            Family::V4 => ptr::read_volatile(&raw const (*sk).src_ip4) != 0,
            Family::V6 => {
                let a = ptr::read_volatile(&raw const (*sk).src_ip6);
                (a[0] | a[1] | a[2] | a[3]) != 0
            }
        }
    }
}

/// The listener at (laddr, lport) as `nf_tproxy_get_sock_v4(..., NF_TPROXY_LOOKUP_LISTENER)`
/// finds it. For TCP only a socket in LISTEN counts; for UDP any socket the lookup returns
/// (an unconnected one, in practice, since the tuple is not the packet's).
#[inline(always)]
fn lookup_listener(
    ctx: &TcContext,
    packet: &Packet,
    laddr: &[u8; 16],
    lport_be: u16,
) -> Option<SockRef> {
    let sk = lookup(ctx, packet, laddr, lport_be)?;
    if packet.protocol == IPPROTO_TCP && sk.state != BPF_TCP_LISTEN {
        return None;
    }
    Some(sk)
}

/// Finds the socket the recipe would give the packet to, or `None`.
///
/// The recipe puts `-m socket --transparent -j DIVERT` before `-j TPROXY`, so a transparent
/// socket found with the packet's own tuple and bound to a specific address takes the
/// packet first, even a listener (a transparent listener bound to the original destination
/// itself). Then `-j TPROXY` (T2-T4): established first, the TIME_WAIT + SYN case, the
/// listener at (laddr, lport).
#[inline(always)]
pub fn find_socket(
    ctx: &TcContext,
    packet: &Packet,
    laddr: &[u8; 16],
    lport_be: u16,
) -> Option<(SockRef, Found)> {
    // T2: established first, with the packet's real tuple.
    if let Some(sk) = lookup(ctx, packet, &packet.daddr, packet.dport_be) {
        if packet.protocol == IPPROTO_TCP {
            if sk.state == BPF_TCP_TIME_WAIT {
                // T3. The kernel (`nf_tproxy_handle_time_wait4`) kills the TIME_WAIT socket
                // and hands a pure SYN to the listener. Here the SYN goes to the TIME_WAIT
                // socket, and the kernel's TIME_WAIT path hands it on to the listener
                // (`time_wait_handoff.rs`).
                if packet.is_pure_syn() && lookup_listener(ctx, packet, laddr, lport_be).is_some() {
                    return Some((sk, Found::TimeWaitSyn));
                }
                return Some((sk, Found::Established));
            }
            if sk.state != BPF_TCP_LISTEN {
                return Some((sk, Found::Established));
            }
            // A LISTEN result is the lookup's fallback, not an established socket: only
            // `-m socket --transparent` takes it, when it is bound to a specific address.
            if sk.bound_specific && sk.is_transparent() {
                return Some((sk, Found::Established));
            }
        } else if sk.connected_specific || (sk.bound_specific && sk.is_transparent()) {
            // UDP: a connected socket bound to a specific address is TPROXY's established
            // one; a transparent one bound to a specific address is `-m socket`'s.
            return Some((sk, Found::Established));
        }
    }
    // T4: the listener at (laddr, lport).
    lookup_listener(ctx, packet, laddr, lport_be).map(|sk| (sk, Found::Listener))
}

/// The return path (T8), `-m socket --transparent`: a socket with the packet's own tuple,
/// bound to a specific address (xt_socket ignores wildcard-bound ones) and transparent.
#[inline(always)]
pub fn find_divert_socket(ctx: &TcContext, packet: &Packet) -> Option<SockRef> {
    let sk = lookup(ctx, packet, &packet.daddr, packet.dport_be)?;
    if sk.bound_specific && sk.is_transparent() {
        Some(sk)
    } else {
        None
    }
}

/// `bpf_sk_assign`: the socket the stack will deliver this packet to.
#[inline(always)]
pub fn assign(ctx: &TcContext, sk: &SockRef) -> Result<(), i64> {
    let ret = unsafe { bpf_sk_assign(ctx.as_ptr(), sk.sk.cast(), 0) };
    if ret == 0 { Ok(()) } else { Err(ret) }
}
