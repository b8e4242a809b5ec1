//! `--local`: the host's own connections, the `iptables -t mangle -A OUTPUT ... -j MARK`
//! half of the classic recipe for local traffic, done once per connect instead of per
//! packet.
//!
//! `cgroup/connect4` and `cgroup/connect6` run before the kernel routes a connecting
//! socket (`tcp_v4_pre_connect`, `udp_pre_connect`; IPv6 alike). For a socket of the
//! agent's network namespace, unmarked (the agent's own sockets carry the outbound mark),
//! whose destination is not loopback and whose (protocol, destination, port) the first
//! matching rule covers, they set `SO_MARK` to that rule's mark: the fwmark rule then routes
//! the connection to `lo` (`local 0/0 dev lo` in the rule's table), where the classifier
//! hands it to the proxy exactly as it does forwarded traffic. The IPv4 source address is
//! chosen in the main table (`from 0.0.0.0/32 fwmark M lookup main`, see
//! `proxy::routing`).
//!
//! `cgroup/sendmsg4` and `cgroup/sendmsg6` run for unconnected UDP datagrams only, and the
//! mark of the datagram they run for was read before them (`udp_sendmsg`:
//! `ipcm_init_sk` precedes the hook), so such a datagram can never be routed to the
//! proxy, and marking its socket would misroute its later datagrams to other
//! destinations. A datagram a rule covers gets that rule's no-socket behaviour instead:
//! refused (the sender gets EPERM) by default, sent on untouched with fail-open; counted
//! either way.
//!
//! A destination that is one of the namespace's own addresses (`OWN_ADDRS`, which the agent
//! keeps in step with the addresses, as it keeps the proxy's own list of destinations it
//! refuses) is left alone like loopback: such a connection never leaves the host, and the
//! proxy would refuse it as a local destination (a reset).
//!
//! The programs run for every process of the cgroups they are attached to, whatever its
//! network namespace: the namespace is checked first (`bpf_get_netns_cookie`). They always
//! allow the connect.

use aya_ebpf::{
    EbpfContext as _,
    bindings::bpf_sock,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_netns_cookie,
        bpf_setsockopt, bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use proxy_common::{
    ACTION_FAIL_OPEN, ACTION_LOCAL, Counter, GlobalConfig, IPPROTO_TCP, IPPROTO_UDP,
    LOOPBACK_IFINDEX, MAX_RULE_CGROUPS, OWN_ADDR_V4, OWN_ADDR_V6, OwnAddr, RuleAction,
};

use crate::{
    laddr,
    maps::{CONFIG, OWN_ADDRS, count},
    parse::Family,
    rules,
    socket_search::{self, CURRENT_NETNS},
};

/// A cgroup sock_addr program's verdict: go on with the connect or send.
const ALLOW: i32 = 1;
/// Refuse it: the caller gets EPERM.
const REFUSE: i32 = 0;

const SOL_SOCKET: i32 = 1;
const SO_MARK: i32 = 36;

#[cgroup_sock_addr(connect4)]
pub fn local_connect4(ctx: SockAddrContext) -> i32 {
    connect(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn local_connect6(ctx: SockAddrContext) -> i32 {
    connect(&ctx, true);
    ALLOW
}

#[cgroup_sock_addr(sendmsg4)]
pub fn local_sendmsg4(ctx: SockAddrContext) -> i32 {
    sendmsg(&ctx, false)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn local_sendmsg6(ctx: SockAddrContext) -> i32 {
    sendmsg(&ctx, true)
}

/// Where a local socket connects or sends to. IPv4-mapped IPv6 destinations are IPv4:
/// the kernel routes them as such, under the IPv4 rules.
struct Destination {
    family: Family,
    protocol: u8,
    daddr: [u8; 16],
    dport_be: u16,
}

/// Context fields are read one by one with volatile loads: the verifier only accepts
/// `ctx + constant` loads of the sizes it knows.
#[inline(always)]
fn field(f: *const u32) -> u32 {
    unsafe { core::ptr::read_volatile(f) }
}

/// An IPv4 address (network order, as read) that stays on the host: 127/8 or 0.0.0.0.
#[inline(always)]
fn ip4_is_loopback(ip: u32) -> bool {
    ip == 0 || ip.to_ne_bytes()[0] == 127
}

/// Where the socket connects or sends to, unless that is loopback or unspecified: those
/// stay on the host and are never intercepted (DNS to 127.0.0.53 keeps working whatever the
/// rules say).
#[inline(always)]
fn destination(ctx: &SockAddrContext, v6: bool) -> Option<Destination> {
    let a = ctx.sock_addr;
    let protocol = match field(unsafe { &raw const (*a).protocol }) {
        p if p == IPPROTO_TCP as u32 => IPPROTO_TCP,
        p if p == IPPROTO_UDP as u32 => IPPROTO_UDP,
        _ => return None,
    };
    // `user_port` holds the port in network order in its low 16 bits.
    let dport_be = field(unsafe { &raw const (*a).user_port }) as u16;
    let mut daddr = [0u8; 16];
    let (family, loopback) = if v6 {
        let w0 = field(unsafe { &raw const (*a).user_ip6[0] });
        let w1 = field(unsafe { &raw const (*a).user_ip6[1] });
        let w2 = field(unsafe { &raw const (*a).user_ip6[2] });
        let w3 = field(unsafe { &raw const (*a).user_ip6[3] });
        if w0 == 0 && w1 == 0 && w2 == u32::from_ne_bytes([0, 0, 0xff, 0xff]) {
            // ::ffff:a.b.c.d
            daddr[..4].copy_from_slice(&w3.to_ne_bytes());
            (Family::V4, ip4_is_loopback(w3))
        } else {
            daddr[..4].copy_from_slice(&w0.to_ne_bytes());
            daddr[4..8].copy_from_slice(&w1.to_ne_bytes());
            daddr[8..12].copy_from_slice(&w2.to_ne_bytes());
            daddr[12..].copy_from_slice(&w3.to_ne_bytes());
            // ::1 and ::
            let loopback = w0 == 0
                && w1 == 0
                && w2 == 0
                && (w3 == 0 || w3 == u32::from_ne_bytes([0, 0, 0, 1]));
            (Family::V6, loopback)
        }
    } else {
        let ip = field(unsafe { &raw const (*a).user_ip4 });
        daddr[..4].copy_from_slice(&ip.to_ne_bytes());
        (Family::V4, ip4_is_loopback(ip))
    };
    if loopback {
        return None;
    }
    Some(Destination {
        family,
        protocol,
        daddr,
        dport_be,
    })
}

/// The socket is one local interception is about: of the agent's network namespace,
/// unmarked (the agent's own sockets carry the outbound mark, and a socket its owner
/// marked is routed as its owner says), not of the agent's own cgroup.
#[inline(always)]
fn in_scope(ctx: &SockAddrContext, config: &GlobalConfig) -> bool {
    if config.netns_cookie == 0
        || unsafe { bpf_get_netns_cookie(ctx.as_ptr()) } != config.netns_cookie
    {
        return false;
    }
    let sk: *mut bpf_sock = unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk };
    if sk.is_null() || unsafe { core::ptr::read_volatile(&raw const (*sk).mark) } != 0 {
        return false;
    }
    config.agent_cgroup_id == 0 || unsafe { bpf_get_current_cgroup_id() } != config.agent_cgroup_id
}

/// The first rule that covers the destination, if it applies to this process: a rule for
/// local traffic, whose cgroups (if it names any) hold the calling process. The first match
/// decides, as for packets: a rule that does not apply leaves the connection alone.
#[inline(always)]
fn local_rule(dst: &Destination) -> Option<RuleAction> {
    let action = rules::match_destination(
        dst.family,
        dst.protocol,
        u16::from_be(dst.dport_be),
        &dst.daddr,
    )?;
    if action.flags & ACTION_LOCAL == 0 || !in_rule_cgroups(&action) {
        count(Counter::LocalOutOfScope);
        return None;
    }
    Some(action)
}

/// Whether the calling process is in one of the rule's cgroups or below (every process
/// when it names none). The process's cgroup, not the socket's: they differ only for a
/// socket made before its process moved, which the programs of the old cgroup still see.
#[inline(always)]
fn in_rule_cgroups(action: &RuleAction) -> bool {
    if action.local_cgroup_ids[0] == 0 {
        return true;
    }
    for i in 0..MAX_RULE_CGROUPS {
        let id = action.local_cgroup_ids[i];
        if id == 0 {
            return false;
        }
        let level = action.local_cgroup_levels[i] as i32;
        if unsafe { bpf_get_current_ancestor_cgroup_id(level) } == id {
            return true;
        }
    }
    false
}

/// Whether a destination a rule covers is one of the namespace's own addresses (counted):
/// checked after the rule, so that the counter tells what would have been intercepted.
#[inline(always)]
fn own_address(dst: &Destination) -> bool {
    let key = OwnAddr {
        family: match dst.family {
            Family::V4 => OWN_ADDR_V4,
            Family::V6 => OWN_ADDR_V6,
        },
        addr: dst.daddr,
    };
    if unsafe { OWN_ADDRS.get(key) }.is_some() {
        count(Counter::LocalOwnAddress);
        return true;
    }
    false
}

/// The destination of a socket in scope and the rule that covers it for this process, if
/// it is one local interception is for: not loopback, not one of the host's own addresses.
#[inline(always)]
fn covered(ctx: &SockAddrContext, v6: bool) -> Option<(Destination, RuleAction)> {
    let config = CONFIG.get(0).copied().unwrap_or_default();
    if !in_scope(ctx, &config) {
        return None;
    }
    let dst = destination(ctx, v6)?;
    let action = local_rule(&dst)?;
    if own_address(&dst) {
        return None;
    }
    Some((dst, action))
}

#[inline(always)]
fn connect(ctx: &SockAddrContext, v6: bool) {
    let Some((dst, action)) = covered(ctx, v6) else {
        return;
    };
    // A connection to the proxy's own listener port is the proxy's, not one to intercept.
    if action.on_port != 0 && action.on_port == u16::from_be(dst.dport_be) {
        return;
    }
    // Fail-open: with no listener (the agent is gone, T12) the marked connection would be
    // refused on `lo` instead of reaching its destination, as fail-open traffic does when
    // forwarded. So it is not marked. Fail-closed rules need no check: no listener means
    // the classifier drops it, as it drops forwarded traffic (T7).
    if action.flags & ACTION_FAIL_OPEN != 0 && !listener_exists(ctx, &action, &dst) {
        count(Counter::LocalNoListener);
        return;
    }
    let mut mark = action.mark_value;
    let set = unsafe {
        bpf_setsockopt(
            ctx.as_ptr(),
            SOL_SOCKET,
            SO_MARK,
            (&raw mut mark).cast(),
            size_of::<u32>() as i32,
        )
    };
    count(if set == 0 {
        Counter::LocalMarked
    } else {
        Counter::LocalMarkFailed
    });
}

#[inline(always)]
fn sendmsg(ctx: &SockAddrContext, v6: bool) -> i32 {
    let Some((_, action)) = covered(ctx, v6) else {
        return ALLOW;
    };
    if action.flags & ACTION_FAIL_OPEN != 0 {
        count(Counter::LocalUnconnectedPassed);
        ALLOW
    } else {
        count(Counter::LocalUnconnectedRefused);
        REFUSE
    }
}

/// Whether a listener is at (laddr, lport), as the classifier on `lo` will look for it
/// (T4: on-ip, else lo's address, else the destination; on-port, else the port).
#[inline(always)]
fn listener_exists(ctx: &SockAddrContext, action: &RuleAction, dst: &Destination) -> bool {
    let laddr = laddr::listener_addr(action, LOOPBACK_IFINDEX, dst.family, &dst.daddr);
    let (mut t, len) = socket_search::tuple(
        dst.family,
        &[0; 16],
        0,
        &laddr,
        action.listener_port_be(dst.dport_be),
    );
    let sk = if dst.protocol == IPPROTO_TCP {
        unsafe { bpf_sk_lookup_tcp(ctx.as_ptr(), &mut t, len, CURRENT_NETNS, 0) }
    } else {
        unsafe { bpf_sk_lookup_udp(ctx.as_ptr(), &mut t, len, CURRENT_NETNS, 0) }
    };
    if sk.is_null() {
        return false;
    }
    unsafe { bpf_sk_release(sk.cast()) };
    true
}
