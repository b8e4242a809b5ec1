//! `--relay sockmap`: the relay of an established proxied connection, inside the kernel.
//!
//! The agent puts both sockets of a connection (client side and upstream) in
//! `RELAY_SOCKS`, which this program is attached to, and in `RELAY_TARGETS`, which has no
//! program. Every segment a socket in `RELAY_SOCKS` receives comes here
//! (`sk_psock_verdict_recv`) and is redirected to the egress of its peer, which
//! `RELAY_TARGETS` holds under the socket's own cookie. The bytes then go out on the peer from the
//! kernel's psock worker (`sk_psock_backlog`): no wake-up of the agent, no copy to
//! userspace. The agent only watches for the end of each direction.
//!
//! Why two maps: a socket's received data reaches this program from the moment the socket
//! is in `RELAY_SOCKS`. Its peer must be a valid target by then, and being in
//! `RELAY_TARGETS` makes it one without attaching the program to the peer yet.

use aya_ebpf::{
    bindings::sk_action::SK_DROP, helpers::bpf_get_socket_cookie, macros::stream_verdict,
    programs::SkBuffContext,
};

use crate::maps::RELAY_TARGETS;

#[stream_verdict]
pub fn relay_verdict(ctx: SkBuffContext) -> u32 {
    // A segment with no payload (a bare FIN) has nothing to relay, and redirected it would
    // break the peer: `sk_psock_backlog` takes a send of 0 bytes for a broken pipe and sets
    // EPIPE on the peer. The FIN itself is already recorded (`tcp_fin`); the agent passes
    // it on.
    if ctx.len() == 0 {
        return SK_DROP;
    }
    // SAFETY: the helper only reads the socket the skb belongs to.
    let mut cookie = unsafe { bpf_get_socket_cookie(ctx.skb.skb as *mut _) };
    // SK_PASS when the skb was queued for the peer; SK_DROP when there is no peer under
    // this cookie (its connection is being torn down): nothing can take the bytes.
    RELAY_TARGETS.redirect_skb(&ctx, &mut cookie, 0) as u32
}
