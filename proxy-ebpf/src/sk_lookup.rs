//! `sk_lookup` program: the second half of the TIME_WAIT + pure SYN case (T3).
//!
//! The classifier hands such a SYN to the TIME_WAIT socket. `tcp_v4_rcv` /
//! `tcp_v6_rcv` then see TCP_TW_SYN and look up a listener for the packet's own
//! (daddr, dport), which is the original destination, where nothing listens. This program
//! answers that lookup with the agent's listener for the matching rule, so the kernel
//! retires the TIME_WAIT socket and the new connection reaches the proxy at once.
//!
//! It only acts on lookups for packets that arrived on an interface the classifier is
//! attached to (the agent keeps those in `IFACE_ADDRS`) and that match a rule, so local
//! traffic is never steered.

use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use proxy_common::{ACTION_HAS_LISTENER_SLOT, IPPROTO_TCP};

use crate::{
    maps::{IFACE_ADDRS, LISTENERS},
    parse::{Family, Fragment, Packet},
    rules,
};

const SK_PASS: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[sk_lookup]
pub fn tproxy_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // Context fields are read one by one with volatile loads: the verifier only accepts
    // `ctx + constant` loads, and the compiler would otherwise merge the address arithmetic.
    let field = |f: *const u32| unsafe { core::ptr::read_volatile(f) };
    if field(unsafe { &raw const (*l).protocol }) != IPPROTO_TCP as u32 {
        return SK_PASS;
    }
    // Map keys must live on the stack, not in the context.
    let ifindex: u32 = field(unsafe { &raw const (*l).ingress_ifindex });
    if unsafe { IFACE_ADDRS.get(&ifindex) }.is_none() {
        return SK_PASS;
    }
    let mut daddr = [0u8; 16];
    let family = match field(unsafe { &raw const (*l).family }) {
        AF_INET => {
            let ip = field(unsafe { &raw const (*l).local_ip4 });
            daddr[..4].copy_from_slice(&ip.to_ne_bytes());
            Family::V4
        }
        AF_INET6 => {
            let w0 = field(unsafe { &raw const (*l).local_ip6[0] });
            let w1 = field(unsafe { &raw const (*l).local_ip6[1] });
            let w2 = field(unsafe { &raw const (*l).local_ip6[2] });
            let w3 = field(unsafe { &raw const (*l).local_ip6[3] });
            daddr[0..4].copy_from_slice(&w0.to_ne_bytes());
            daddr[4..8].copy_from_slice(&w1.to_ne_bytes());
            daddr[8..12].copy_from_slice(&w2.to_ne_bytes());
            daddr[12..16].copy_from_slice(&w3.to_ne_bytes());
            Family::V6
        }
        _ => return SK_PASS,
    };
    let local_port = field(unsafe { &raw const (*l).local_port });
    let packet = Packet {
        family,
        protocol: IPPROTO_TCP,
        saddr: [0; 16],
        daddr,
        sport_be: 0,
        // `local_port` is in host order in `struct bpf_sk_lookup`.
        dport_be: (local_port as u16).to_be(),
        tcp_flags: 0,
        fragment: Fragment::None,
    };
    if let Some(matched) = rules::match_rule(&packet)
        && matched.action.flags & ACTION_HAS_LISTENER_SLOT != 0
    {
        // No listener in the slot (an external listener, or none yet): the kernel's own
        // lookup goes on as if we were not here.
        let _ = LISTENERS.redirect_sk_lookup(&ctx, matched.action.listener_slot, 0);
    }
    SK_PASS
}
