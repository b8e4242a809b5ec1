//! TC-ingress classifier that does what `iptables -t mangle ... -j TPROXY` does, and the
//! `sk_lookup` program that completes the TIME_WAIT + SYN case ([`time_wait_handoff`]),
//! (`--relay sockmap`) the sk_skb program that relays established connections inside the
//! kernel ([`sockmap_verdict`]), and (`--local`) the cgroup programs that send the host's
//! own connections to `lo` ([`local_connect`]).
//!
//! Two entry points share one body: [`tproxy_ingress`] for interfaces with an Ethernet
//! header and [`tproxy_ingress_l3`] for those without (T10).
//!
//! Packet path: [`parse`] the headers (a packet whose ports cannot be read is dropped when
//! a rule covers its destination, and so are the later fragments of a dropped first
//! fragment: T11), [`rules`] find the first matching rule, [`laddr`]
//! picks the listener address, [`socket_search`] finds the socket (established, TIME_WAIT
//! SYN, listener), then the packet is assigned and marked here.
#![no_std]
#![no_main]

mod laddr;
mod local_connect;
mod maps;
mod parse;
mod rules;
mod socket_search;
mod sockmap_verdict;
mod time_wait_handoff;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::warn;
use proxy_common::{
    ACTION_FAIL_OPEN, ACTION_HAS_LISTENER_SLOT, Counter, GlobalConfig, LOOPBACK_IFINDEX,
    RuleAction, tproxy_mark,
};

use crate::{
    maps::{CONFIG, DROPPED_FRAGMENTS, count, count_rule},
    parse::{Fragment, Parsed, Shape},
    socket_search::Found,
};

/// `TC_ACT_OK`: accept, ending the TC chain, for packets we assigned.
const TC_ACT_OK: i32 = 0;

/// For interfaces whose frames start with an Ethernet header at TC ingress.
#[classifier]
pub fn tproxy_ingress(ctx: TcContext) -> i32 {
    try_tproxy_ingress::<{ parse::ETH_HDR_LEN }>(&ctx)
}

/// For interfaces without a link-layer header (tun, WireGuard, ipip): the agent attaches
/// this one instead, decided once per interface from its link type (T10).
#[classifier]
pub fn tproxy_ingress_l3(ctx: TcContext) -> i32 {
    try_tproxy_ingress::<0>(&ctx)
}

/// Outcome for a packet that matched a rule: what the kernel does after `-j TPROXY`.
enum RuleVerdict {
    Assigned,
    /// No usable socket (T7), or one the kernel would refuse.
    NoSocket(Counter),
    /// A socket is there but the packet cannot be given to it (a first fragment): always
    /// dropped, never passed by fail-open.
    Unassignable,
}

#[inline(always)]
fn try_tproxy_ingress<const L2_LEN: usize>(ctx: &TcContext) -> i32 {
    count(Counter::Seen);
    let config = CONFIG.get(0).copied().unwrap_or_default();
    // The proxy's own outbound traffic (SO_MARK) is never intercepted: no loops.
    let bypass = config.bypass_mark;
    if bypass != 0 && unsafe { (*ctx.skb.skb).mark } & bypass == bypass {
        count(Counter::Bypassed);
        return TC_ACT_UNSPEC;
    }
    // `--local`: on `lo` only the local connections the connect program marked are
    // candidates. The host's own loopback traffic and the replies to local clients carry
    // no mark and are left alone before any parsing or socket lookup.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let on_loopback = ifindex == LOOPBACK_IFINDEX;
    let mark = unsafe { (*ctx.skb.skb).mark };
    if on_loopback && mark == 0 {
        count(Counter::LoopbackUnmarked);
        return TC_ACT_UNSPEC;
    }
    let Parsed { shape, packet } = parse::parse::<L2_LEN>(ctx);
    match shape {
        Shape::Transport => {}
        Shape::Other => {
            count(Counter::NotMatched);
            return TC_ACT_UNSPEC;
        }
        Shape::LaterFragment => {
            // A later fragment has no ports, so no rule can be checked; it follows its
            // first fragment (T11): dropped if that was dropped, else left alone. It is
            // never assigned (T9).
            if unsafe { DROPPED_FRAGMENTS.get(packet.fragment_key()) }.is_some() {
                count(Counter::DroppedLaterFragment);
                return TC_ACT_SHOT;
            }
            count(Counter::NotMatched);
            return TC_ACT_UNSPEC;
        }
        Shape::Unclassifiable => {
            // The kernel's TPROXY decides on reassembled packets (nf_defrag_ipv4/6), so no
            // fragment shape gets past it; ip6tables hotdrops a packet whose transport
            // header it cannot find. Here a packet whose ports cannot be read is dropped
            // whenever its destination falls under a rule, whatever the port (T9, T11).
            if rules::destination_has_rule(packet.family, &packet.daddr) {
                count(Counter::DroppedUnclassifiable);
                drop_later_fragments(&packet);
                return TC_ACT_SHOT;
            }
            count(Counter::Malformed);
            return TC_ACT_UNSPEC;
        }
        Shape::Malformed => {
            // A broken IP header: the stack drops it itself before routing (ip_rcv_core).
            count(Counter::Malformed);
            return TC_ACT_UNSPEC;
        }
        Shape::BadLinkHeader => {
            // Not laid out as the agent decided for this interface: nothing here can be
            // classified, so nothing passes (T10).
            count(Counter::DroppedBadLinkHeader);
            return TC_ACT_SHOT;
        }
    }
    let Some(action) = rules::match_rule(&packet) else {
        if on_loopback {
            // The return path (T8) is for replies arriving from outside; on `lo` the
            // proxy's own sockets are found by the stack itself.
            count(Counter::NotMatched);
            return TC_ACT_UNSPEC;
        }
        return divert(ctx, &packet, &config);
    };
    // On `lo`, only a connection marked for this very rule (its socket carries the
    // rule's mark) is the rule's: anything else there is the host's own business.
    if on_loopback && mark & action.mark_mask != action.mark_value {
        count(Counter::LoopbackUnmarked);
        return TC_ACT_UNSPEC;
    }
    count(Counter::Matched);
    let len = ctx.len();

    let laddr = laddr::listener_addr(&action, ifindex, packet.family, &packet.daddr);
    let lport_be = action.listener_port_be(packet.dport_be);
    let verdict = match socket_search::find_socket(ctx, &packet, &laddr, lport_be) {
        None => RuleVerdict::NoSocket(Counter::DroppedNoSocket),
        // T5: only a transparent socket may receive the packet.
        Some((sk, _)) if !sk.is_transparent() => {
            RuleVerdict::NoSocket(Counter::DroppedNotTransparent)
        }
        // The kernel drops a socket assigned to a fragment when it queues it for
        // reassembly, so a first fragment is never assigned (T9). But a socket is there:
        // the kernel's TPROXY would reassemble and deliver, so the fragment must not pass
        // either, fail-open or not (T11). Only with no socket at all does fail-open apply.
        Some(_) if packet.fragment == Fragment::First => RuleVerdict::Unassignable,
        Some((sk, found)) => {
            if found == Found::TimeWaitSyn && action.flags & ACTION_HAS_LISTENER_SLOT != 0 {
                time_wait_handoff::expect_listener_lookup(&packet, action.listener_slot);
            }
            assigned(ctx, &sk, found, &action)
        }
    };

    match verdict {
        RuleVerdict::Assigned => {
            count_rule(action.counter_slot, len, true);
            TC_ACT_OK
        }
        RuleVerdict::Unassignable => {
            count(Counter::Fragment);
            count_rule(action.counter_slot, len, false);
            drop_later_fragments(&packet);
            TC_ACT_SHOT
        }
        RuleVerdict::NoSocket(reason) => {
            count(reason);
            count_rule(action.counter_slot, len, false);
            if action.flags & ACTION_FAIL_OPEN != 0 {
                count(Counter::PassedFailOpen);
                TC_ACT_UNSPEC
            } else {
                drop_later_fragments(&packet);
                TC_ACT_SHOT
            }
        }
    }
}

/// A first fragment is being dropped: remember its datagram so that the later fragments
/// go too, instead of reaching the destination without it (T11). Reassembly could not
/// finish there anyway; dropping them says so in the counters and spares the link.
#[inline(always)]
fn drop_later_fragments(packet: &parse::Packet) {
    if packet.fragment == Fragment::First {
        let _ = DROPPED_FRAGMENTS.insert(packet.fragment_key(), 1, 0);
    }
}

/// Assigns the socket and, only once that worked, marks the packet (T6: every assigned
/// packet carries the mark, established or not: without the policy route the forwarding
/// path drops a packet that holds a socket; on failure the mark is left alone).
#[inline(always)]
fn assigned(
    ctx: &TcContext,
    sk: &socket_search::SockRef,
    found: Found,
    action: &RuleAction,
) -> RuleVerdict {
    if let Err(err) = socket_search::assign(ctx, sk) {
        warn!(ctx, "bpf_sk_assign failed: {}", err);
        return RuleVerdict::NoSocket(Counter::AssignFailed);
    }
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(action.apply_mark(mark));
    count(match found {
        Found::Established => Counter::AssignedEstablished,
        Found::TimeWaitSyn => Counter::TimeWaitSyn,
        Found::Listener => Counter::AssignedListener,
    });
    RuleVerdict::Assigned
}

/// A packet no rule matched: left alone, unless it belongs to one of the transparent
/// sockets with its own tuple (a proxy's upstream socket bound to the client's address, or
/// a connection accepted under a rule that a reload removed). Those are assigned and marked
/// like the recipe's `-m socket --transparent -j DIVERT` (T8).
///
/// The lookup is skipped while the agent says no such socket can exist (its own listener,
/// no `--spoof-source`, no connection from before a reload): traffic no rule covers then
/// costs the parse and the rule match only.
#[inline(always)]
fn divert(ctx: &TcContext, packet: &parse::Packet, config: &GlobalConfig) -> i32 {
    if config.skip_return_path != 0 {
        count(Counter::NotMatched);
        count(Counter::ReturnPathSkipped);
        return TC_ACT_UNSPEC;
    }
    let Some(sk) = socket_search::find_divert_socket(ctx, packet) else {
        count(Counter::NotMatched);
        return TC_ACT_UNSPEC;
    };
    if let Err(err) = socket_search::assign(ctx, &sk) {
        // Not silent: the packet goes on unassigned, and this says so.
        warn!(ctx, "bpf_sk_assign failed on the return path: {}", err);
        count(Counter::DivertAssignFailed);
        return TC_ACT_UNSPEC;
    }
    let mark = unsafe { (*ctx.skb.skb).mark };
    ctx.set_mark(tproxy_mark(
        mark,
        config.divert_mark_value,
        config.divert_mark_mask,
    ));
    count(Counter::Diverted);
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
