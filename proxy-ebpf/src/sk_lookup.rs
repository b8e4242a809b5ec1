//! `sk_lookup` program: the second half of the TIME_WAIT + pure SYN case (T3).
//!
//! The classifier hands such a SYN to the TIME_WAIT socket. `tcp_v4_rcv` /
//! `tcp_v6_rcv` then see TCP_TW_SYN and look up a listener for the packet's own
//! (daddr, dport), which is the original destination, where nothing listens. This program
//! answers that lookup with the agent's listener for the matching rule, so the kernel
//! retires the TIME_WAIT socket and the new connection reaches the proxy at once.
//!
//! It only answers the lookup that follows a SYN the classifier handed to a TIME_WAIT socket:
//! the classifier records the tuple in `TIME_WAIT_SYNS` just before, with the listener slot
//! of the rule it matched, so no other traffic is ever steered and no rule is matched twice.

use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use proxy_common::{FlowKey, IPPROTO_TCP};

use crate::maps::{LISTENERS, TIME_WAIT_SYNS};

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
    let mut remote = [0u8; 16];
    let mut local = [0u8; 16];
    match field(unsafe { &raw const (*l).family }) {
        AF_INET => {
            let r = field(unsafe { &raw const (*l).remote_ip4 });
            remote[..4].copy_from_slice(&r.to_ne_bytes());
            let ip = field(unsafe { &raw const (*l).local_ip4 });
            local[..4].copy_from_slice(&ip.to_ne_bytes());
        }
        AF_INET6 => {
            for i in 0..4 {
                let r = field(unsafe { &raw const (*l).remote_ip6[i] });
                remote[i * 4..i * 4 + 4].copy_from_slice(&r.to_ne_bytes());
                let w = field(unsafe { &raw const (*l).local_ip6[i] });
                local[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
        }
        _ => return SK_PASS,
    };
    // `remote_port` is network order, `local_port` host order in `struct bpf_sk_lookup`.
    let remote_port_be: u16 =
        unsafe { core::ptr::read_volatile((&raw const (*l).remote_port).cast::<u16>()) };
    let local_port = field(unsafe { &raw const (*l).local_port }) as u16;
    // Only the lookup that follows a SYN the classifier handed to a TIME_WAIT socket is
    // ours: any other (the proxy's own marked traffic, a fail-open packet, local traffic)
    // goes on as if we were not here.
    let key = FlowKey {
        remote,
        local,
        remote_port_be,
        local_port_be: local_port.to_be(),
    };
    // SAFETY: a plain hash-map read of a u32.
    let Some(&slot) = (unsafe { TIME_WAIT_SYNS.get(&key) }) else {
        return SK_PASS;
    };
    let _ = TIME_WAIT_SYNS.remove(&key);
    // No listener in the slot (none yet, or closed by a reload): the kernel's own lookup
    // goes on as if we were not here.
    let _ = LISTENERS.redirect_sk_lookup(&ctx, slot, 0);
    SK_PASS
}
