//! The TIME_WAIT + pure SYN case (T3): a client reconnects from the same port while the
//! proxy's side of its previous connection is in TIME_WAIT, and a listener exists at
//! (laddr, lport).
//!
//! The kernel's TPROXY (`nf_tproxy_handle_time_wait4/6`) kills the TIME_WAIT socket and
//! hands the SYN to the listener. At TC the classifier cannot kill it, and a SYN given to
//! the listener while the TIME_WAIT socket is hashed collides with it and is dropped. So the
//! handoff goes through the kernel's own TIME_WAIT path, in three steps:
//! 1. The socket search (`socket_search.rs`) finds the TIME_WAIT socket and the classifier
//!    gives it the SYN, after recording the tuple in `TIME_WAIT_SYNS` with the listener
//!    slot of the rule it matched ([`expect_listener_lookup`]).
//! 2. `tcp_timewait_state_process` answers TCP_TW_SYN, and `tcp_v4_rcv` / `tcp_v6_rcv`
//!    look up a listener for the packet's own (daddr, dport): the original destination,
//!    where nothing listens.
//! 3. The `sk_lookup` program here ([`tproxy_sk_lookup`]) answers that lookup with the
//!    agent's listener, so the kernel retires the TIME_WAIT socket itself and the new
//!    connection reaches the proxy at once.
//!
//! Only the lookup that follows a SYN recorded in step 1 is answered: no other traffic is
//! ever steered and no rule is matched twice.

use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use proxy_common::{FlowKey, IPPROTO_TCP};

use crate::{
    maps::{LISTENERS, TIME_WAIT_SYNS},
    parse::Packet,
};

const SK_PASS: u32 = 1;
const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// Step 1, in the classifier: tells [`tproxy_sk_lookup`] that the kernel's coming listener
/// lookup for this packet's tuple is ours to answer (and no other lookup is), and with
/// which of the agent's listeners.
#[inline(always)]
pub fn expect_listener_lookup(packet: &Packet, listener_slot: u32) {
    let _ = TIME_WAIT_SYNS.insert(flow_key(packet), listener_slot, 0);
}

/// The packet's tuple, remote (source) first, as the sk_lookup program will see it.
#[inline(always)]
fn flow_key(packet: &Packet) -> FlowKey {
    FlowKey {
        remote: packet.saddr,
        local: packet.daddr,
        remote_port_be: packet.sport_be,
        local_port_be: packet.dport_be,
    }
}

/// Step 3: answers the kernel's listener lookup for a tuple recorded in step 1.
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
    let Some(&slot) = (unsafe { TIME_WAIT_SYNS.get(key) }) else {
        return SK_PASS;
    };
    let _ = TIME_WAIT_SYNS.remove(key);
    // No listener in the slot (none yet, or closed by a reload): the kernel's own lookup
    // goes on as if we were not here.
    let _ = LISTENERS.redirect_sk_lookup(&ctx, slot, 0);
    SK_PASS
}
