//! TC-ingress classifier that does what `iptables -t mangle ... -j TPROXY` does, and the
//! `sk_lookup` program that completes the TIME_WAIT + SYN case, and (`--relay sockmap`) the
//! sk_skb program that relays established connections inside the kernel ([`relay`]).
//!
//! Packet path: [`parse`] the headers, [`rules`] find the first matching rule, [`laddr`]
//! picks the listener address, [`lookup`] finds the socket (established, TIME_WAIT SYN,
//! listener), then the packet is assigned and marked here.
#![no_std]
#![no_main]

mod laddr;
mod lookup;
mod maps;
mod parse;
mod relay;
mod rules;
mod sk_lookup;

use aya_ebpf::{
    bindings::{TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::classifier,
    programs::TcContext,
};
use aya_log_ebpf::warn;
use proxy_common::{
    ACTION_FAIL_OPEN, ACTION_HAS_LISTENER_SLOT, Counter, FlowKey, GlobalConfig, RuleAction,
    tproxy_mark,
};

use crate::{
    lookup::Found,
    maps::{CONFIG, TIME_WAIT_SYNS, count, count_rule},
    parse::{Fragment, Parsed},
    rules::Matched,
};

/// `TC_ACT_OK`: accept, ending the TC chain, for packets we assigned.
const TC_ACT_OK: i32 = 0;

#[classifier]
pub fn tproxy_ingress(ctx: TcContext) -> i32 {
    try_tproxy_ingress(&ctx)
}

/// Outcome for a packet that matched a rule: what the kernel does after `-j TPROXY`.
enum RuleVerdict {
    Assigned,
    /// No usable socket (T7), or one the kernel would refuse.
    NoSocket(Counter),
}

#[inline(always)]
fn try_tproxy_ingress(ctx: &TcContext) -> i32 {
    count(Counter::Seen);
    let config = CONFIG.get(0).copied().unwrap_or_default();
    // The proxy's own outbound traffic (SO_MARK) is never intercepted: no loops.
    let bypass = config.bypass_mark;
    if bypass != 0 && unsafe { (*ctx.skb.skb).mark } & bypass == bypass {
        count(Counter::Bypassed);
        return TC_ACT_UNSPEC;
    }
    let packet = match parse::parse(ctx) {
        Ok(Parsed::Transport(packet)) => packet,
        Ok(Parsed::Other) => {
            count(Counter::NotMatched);
            return TC_ACT_UNSPEC;
        }
        Ok(Parsed::Ipv6NoTransport(daddr)) => {
            // T9: ip6tables drops a packet whose transport header it cannot find when it
            // is checked against a rule with a protocol.
            if rules::ipv6_prefix_has_rule(&daddr) {
                count(Counter::Malformed);
                return TC_ACT_SHOT;
            }
            count(Counter::NotMatched);
            return TC_ACT_UNSPEC;
        }
        Err(parse::ParseError::Malformed) => {
            // Not ours to judge: the stack drops what it cannot parse itself.
            count(Counter::Malformed);
            return TC_ACT_UNSPEC;
        }
    };
    // A later fragment has no ports, so it cannot match a port rule; it is left alone and
    // never assigned (T9). See the README on fragmented UDP.
    if packet.fragment == Fragment::Later {
        count(Counter::NotMatched);
        return TC_ACT_UNSPEC;
    }
    let Some(Matched { index, action }) = rules::match_rule(&packet) else {
        return divert(ctx, &packet, &config);
    };
    count(Counter::Matched);
    let len = ctx.len();

    let verdict = if packet.fragment == Fragment::First {
        // The kernel drops a socket assigned to a fragment when it queues it for
        // reassembly, so a first fragment is never assigned (T9).
        RuleVerdict::NoSocket(Counter::Fragment)
    } else {
        let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
        let laddr = laddr::listener_addr(&action, ifindex, &packet);
        let lport_be = if action.on_port == 0 {
            packet.dport_be
        } else {
            action.on_port.to_be()
        };
        match lookup::find_socket(ctx, &packet, &laddr, lport_be) {
            None => RuleVerdict::NoSocket(Counter::DroppedNoSocket),
            // T5: only a transparent socket may receive the packet.
            Some((sk, _)) if !sk.is_transparent() => {
                RuleVerdict::NoSocket(Counter::DroppedNotTransparent)
            }
            Some((sk, found)) => {
                if found == Found::TimeWaitSyn && action.flags & ACTION_HAS_LISTENER_SLOT != 0 {
                    // Tell the sk_lookup program that the kernel's coming listener lookup
                    // for this tuple is ours to answer (and no other lookup is), and with
                    // which of the agent's listeners.
                    let _ = TIME_WAIT_SYNS.insert(&flow_key(&packet), &action.listener_slot, 0);
                }
                assigned(ctx, &sk, found, &action)
            }
        }
    };

    match verdict {
        RuleVerdict::Assigned => {
            count_rule(index, len, true);
            TC_ACT_OK
        }
        RuleVerdict::NoSocket(reason) => {
            count(reason);
            count_rule(index, len, false);
            if action.flags & ACTION_FAIL_OPEN != 0 {
                count(Counter::PassedFailOpen);
                TC_ACT_UNSPEC
            } else {
                TC_ACT_SHOT
            }
        }
    }
}

/// Assigns the socket and, only once that worked, marks the packet (T6: every assigned
/// packet carries the mark, established or not: without the policy route the forwarding
/// path drops a packet that holds a socket; on failure the mark is left alone).
#[inline(always)]
fn assigned(
    ctx: &TcContext,
    sk: &lookup::SockRef,
    found: Found,
    action: &RuleAction,
) -> RuleVerdict {
    if let Err(err) = lookup::assign(ctx, sk) {
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

/// The packet's tuple, remote (source) first, as the sk_lookup program will see it.
#[inline(always)]
fn flow_key(packet: &parse::Packet) -> FlowKey {
    FlowKey {
        remote: packet.saddr,
        local: packet.daddr,
        remote_port_be: packet.sport_be,
        local_port_be: packet.dport_be,
    }
}

/// A packet no rule matched: left alone, unless it belongs to one of the transparent
/// sockets with its own tuple (a proxy's upstream socket bound to the client's address, or
/// a connection accepted under a rule that a reload removed). Those are assigned and marked
/// like the recipe's `-m socket --transparent -j DIVERT` (T8).
#[inline(always)]
fn divert(ctx: &TcContext, packet: &parse::Packet, config: &GlobalConfig) -> i32 {
    if let Some(sk) = lookup::find_divert_socket(ctx, packet)
        && lookup::assign(ctx, &sk).is_ok()
    {
        let mark = unsafe { (*ctx.skb.skb).mark };
        ctx.set_mark(tproxy_mark(
            mark,
            config.divert_mark_value,
            config.divert_mark_mask,
        ));
        count(Counter::Diverted);
        return TC_ACT_OK;
    }
    count(Counter::NotMatched);
    TC_ACT_UNSPEC
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
