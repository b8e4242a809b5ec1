//! The socket search of `tproxy_tg4` / `tproxy_tg6` (net/netfilter/xt_TPROXY.c):
//! established first with the packet's real tuple, then the TIME_WAIT + SYN case, then the
//! listener at (laddr, lport).
//!
//! Every socket reference taken here is held by a [`SockRef`], which releases it when it
//! goes out of scope: the verifier rejects any path that returns while holding one.

use core::ptr;

use aya_ebpf::{
    EbpfContext as _,
    bindings::{bpf_sock, bpf_sock_tuple},
    helpers::{bpf_sk_assign, bpf_sk_lookup_udp, bpf_sk_release, bpf_skc_lookup_tcp},
    programs::TcContext,
};
use proxy_common::IPPROTO_TCP;

use crate::parse::{Family, Packet};

const BPF_TCP_ESTABLISHED: u32 = 1;
const BPF_TCP_TIME_WAIT: u32 = 6;
const BPF_TCP_LISTEN: u32 = 10;

/// `BPF_F_CURRENT_NETNS`: the helpers read the netns id as s32 and -1 means "the packet's".
const CURRENT_NETNS: u64 = u64::MAX;

const TUPLE_V4_LEN: u32 = 12;
const TUPLE_V6_LEN: u32 = 36;

/// A socket reference from `bpf_skc_lookup_tcp` / `bpf_sk_lookup_udp`, released on drop.
pub struct SockRef(*mut bpf_sock);

impl SockRef {
    #[inline(always)]
    fn state(&self) -> u32 {
        unsafe { (*self.0).state }
    }

    /// For UDP: connected (`TCP_ESTABLISHED`) and bound to a specific address, the only
    /// kind `nf_tproxy_get_sock_v4(..., NF_TPROXY_LOOKUP_ESTABLISHED)` accepts (T2).
    #[inline(always)]
    fn is_connected_specific(&self, family: Family) -> bool {
        let sk = self.0;
        let bound = unsafe {
            match family {
                Family::V4 => (*sk).src_ip4 != 0,
                Family::V6 => {
                    let a = (*sk).src_ip6;
                    (a[0] | a[1] | a[2] | a[3]) != 0
                }
            }
        };
        bound && self.state() == BPF_TCP_ESTABLISHED
    }
}

impl Drop for SockRef {
    #[inline(always)]
    fn drop(&mut self) {
        unsafe { bpf_sk_release(self.0.cast()) };
    }
}

/// Which socket a packet was given to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// An established, request or TIME_WAIT socket with the packet's own tuple.
    Established,
    /// A pure SYN that met a TIME_WAIT socket while a listener exists at (laddr, lport).
    /// See [`find_socket`] for why it goes to the TIME_WAIT socket.
    TimeWaitSyn,
    /// The listener at (laddr, lport).
    Listener,
}

#[inline(always)]
fn tuple(
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

#[inline(always)]
fn lookup(
    ctx: &TcContext,
    protocol: u8,
    family: Family,
    saddr: &[u8; 16],
    sport_be: u16,
    daddr: &[u8; 16],
    dport_be: u16,
) -> Option<SockRef> {
    let (mut t, len) = tuple(family, saddr, sport_be, daddr, dport_be);
    // TCP: `bpf_skc_lookup_tcp`, not `bpf_sk_lookup_tcp`, which hides TIME_WAIT sockets
    // and turns a request socket into its listener (T2).
    let sk = unsafe {
        if protocol == IPPROTO_TCP {
            bpf_skc_lookup_tcp(ctx.as_ptr(), &mut t, len, CURRENT_NETNS, 0)
        } else {
            bpf_sk_lookup_udp(ctx.as_ptr(), &mut t, len, CURRENT_NETNS, 0)
        }
    };
    if sk.is_null() {
        None
    } else {
        Some(SockRef(sk))
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
    let sk = lookup(
        ctx,
        packet.protocol,
        packet.family,
        &packet.saddr,
        packet.sport_be,
        laddr,
        lport_be,
    )?;
    if packet.protocol == IPPROTO_TCP && sk.state() != BPF_TCP_LISTEN {
        return None;
    }
    Some(sk)
}

/// Finds the socket `-j TPROXY` would give the packet to, or `None` (T2-T4).
#[inline(always)]
pub fn find_socket(
    ctx: &TcContext,
    packet: &Packet,
    laddr: &[u8; 16],
    lport_be: u16,
) -> Option<(SockRef, Found)> {
    // T2: established first, with the packet's real tuple.
    if let Some(sk) = lookup(
        ctx,
        packet.protocol,
        packet.family,
        &packet.saddr,
        packet.sport_be,
        &packet.daddr,
        packet.dport_be,
    ) {
        if packet.protocol == IPPROTO_TCP {
            let state = sk.state();
            if state == BPF_TCP_TIME_WAIT {
                // T3. The kernel (`nf_tproxy_handle_time_wait4`) kills the TIME_WAIT socket
                // and hands a pure SYN to the listener. At TC we cannot kill it, and a SYN
                // given to the listener while it is hashed collides with it and is dropped.
                // So the SYN goes to the TIME_WAIT socket: `tcp_timewait_state_process`
                // answers TCP_TW_SYN, `tcp_v4_rcv` looks up a listener for (daddr, dport),
                // our sk_lookup program answers with the agent's listener, and the kernel
                // retires the TIME_WAIT socket itself.
                if packet.is_pure_syn() && lookup_listener(ctx, packet, laddr, lport_be).is_some() {
                    return Some((sk, Found::TimeWaitSyn));
                }
                return Some((sk, Found::Established));
            }
            // A LISTEN result is the lookup's fallback, not an established socket.
            if state != BPF_TCP_LISTEN {
                return Some((sk, Found::Established));
            }
        } else if sk.is_connected_specific(packet.family) {
            return Some((sk, Found::Established));
        }
    }
    // T4: the listener at (laddr, lport).
    lookup_listener(ctx, packet, laddr, lport_be).map(|sk| (sk, Found::Listener))
}

/// `bpf_sk_assign`: the socket the stack will deliver this packet to.
#[inline(always)]
pub fn assign(ctx: &TcContext, sk: &SockRef) -> Result<(), i64> {
    let ret = unsafe { bpf_sk_assign(ctx.as_ptr(), sk.0.cast(), 0) };
    if ret == 0 { Ok(()) } else { Err(ret) }
}
