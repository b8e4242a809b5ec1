//! The listener address, as `nf_tproxy_laddr4` / `nf_tproxy_laddr6` choose it (T4):
//! `--on-ip` when given, else the ingress interface's address (first primary IPv4 address;
//! first IPv6 address neither tentative nor deprecated), else the packet's destination.
//! The agent keeps [`IFACE_ADDRS`] in step with the interfaces over netlink.

use proxy_common::{
    ACTION_HAS_ON_IP4, ACTION_HAS_ON_IP6, IFACE_HAS_IP4, IFACE_HAS_IP6, RuleAction,
};

use crate::{maps::IFACE_ADDRS, parse::Family};

/// The listener address for a packet (or a local socket's destination) of `family` to
/// `daddr` arriving on `ifindex` under `action`.
#[inline(always)]
pub fn listener_addr(
    action: &RuleAction,
    ifindex: u32,
    family: Family,
    daddr: &[u8; 16],
) -> [u8; 16] {
    let mut laddr = [0u8; 16];
    match family {
        Family::V4 => {
            let ip4_be = if action.flags & ACTION_HAS_ON_IP4 != 0 {
                Some(action.on_ip4_be)
            } else {
                match unsafe { IFACE_ADDRS.get(ifindex) } {
                    Some(iface) if iface.flags & IFACE_HAS_IP4 != 0 => Some(iface.ip4_be),
                    _ => None,
                }
            };
            match ip4_be {
                Some(ip) => laddr[..4].copy_from_slice(&ip.to_ne_bytes()),
                None => laddr[..4].copy_from_slice(&daddr[..4]),
            }
        }
        Family::V6 => {
            laddr = if action.flags & ACTION_HAS_ON_IP6 != 0 {
                action.on_ip6
            } else {
                match unsafe { IFACE_ADDRS.get(ifindex) } {
                    Some(iface) if iface.flags & IFACE_HAS_IP6 != 0 => iface.ip6,
                    _ => *daddr,
                }
            };
        }
    }
    laddr
}
