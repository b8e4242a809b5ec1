//! Which original destinations the proxy refuses to connect or send to.
//!
//! The agent sits on a gateway that anyone on the LAN can send to. A client that sends to
//! the router's own address, to loopback (IPv4-mapped `::ffff:127.0.0.1` over IPv6 reaches a
//! dual-stack listener), to the unspecified address, or to multicast or broadcast would
//! otherwise make the proxy open a socket towards the router's own services or fan out
//! on its behalf. These are refused (a TCP reset, a UDP datagram dropped), counted and
//! logged at debug, unless `--allow-local-destinations` says a rule means to reach them.
//!
//! The router's own addresses (and their directed broadcasts) come from a netlink dump,
//! refreshed on every address change the agent already follows.

use std::{
    collections::HashSet,
    fmt,
    net::{IpAddr, Ipv4Addr},
    sync::{
        RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use futures::TryStreamExt as _;
use rtnetlink::{Handle, packet_route::address::AddressAttribute};

/// Why a destination is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Unspecified,
    Loopback,
    Multicast,
    Broadcast,
    /// One of this network namespace's own addresses.
    Local,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::Unspecified => "the unspecified address",
            Refusal::Loopback => "a loopback address",
            Refusal::Multicast => "a multicast address",
            Refusal::Broadcast => "a broadcast address",
            Refusal::Local => "one of this host's own addresses",
        })
    }
}

/// The destinations the proxy will not relay to, and how many it refused.
#[derive(Default)]
pub struct Destinations {
    /// `--allow-local-destinations`: refuse nothing.
    allow_local: bool,
    /// This namespace's addresses and directed broadcast addresses.
    own: RwLock<HashSet<IpAddr>>,
    refused: AtomicU64,
}

impl Destinations {
    pub fn new(allow_local: bool) -> Self {
        Destinations {
            allow_local,
            ..Destinations::default()
        }
    }

    /// Why `ip` (canonical: IPv4-mapped addresses as IPv4) may not be relayed to, counted
    /// as a refusal; `None` when it may.
    pub fn refuse(&self, ip: IpAddr) -> Option<Refusal> {
        if self.allow_local {
            return None;
        }
        let own = self.own.read().unwrap_or_else(|e| e.into_inner());
        let refusal = classify(ip.to_canonical(), &own)?;
        self.refused.fetch_add(1, Ordering::Relaxed);
        Some(refusal)
    }

    /// Destinations refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// This namespace's addresses and directed broadcasts, as last read.
    pub fn own(&self) -> Vec<IpAddr> {
        let own = self.own.read().unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<IpAddr> = own.iter().copied().collect();
        list.sort_unstable();
        list
    }

    /// Re-reads this namespace's addresses (and directed broadcasts) over netlink.
    pub async fn refresh(&self, handle: &Handle) -> Result<(), OwnAddressesError> {
        let messages: Vec<_> = handle
            .address()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(OwnAddressesError)?;
        let mut own = HashSet::new();
        for message in &messages {
            own.extend(crate::ifaddrs::own_address(message));
            own.extend(message.attributes.iter().find_map(|a| match a {
                AddressAttribute::Broadcast(ip) => Some(IpAddr::V4(*ip)),
                _ => None,
            }));
        }
        *self.own.write().unwrap_or_else(|e| e.into_inner()) = own;
        Ok(())
    }
}

/// This namespace's addresses could not be listed.
#[derive(Debug, thiserror::Error)]
#[error("listing this network namespace's addresses")]
pub struct OwnAddressesError(#[source] rtnetlink::Error);

/// The refusal for `ip` given the namespace's own addresses.
fn classify(ip: IpAddr, own: &HashSet<IpAddr>) -> Option<Refusal> {
    if ip.is_unspecified() {
        return Some(Refusal::Unspecified);
    }
    if ip.is_loopback() {
        return Some(Refusal::Loopback);
    }
    if ip.is_multicast() {
        return Some(Refusal::Multicast);
    }
    if ip == IpAddr::V4(Ipv4Addr::BROADCAST) {
        return Some(Refusal::Broadcast);
    }
    if own.contains(&ip) {
        return Some(Refusal::Local);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_and_own_addresses_are_refused_and_counted() {
        let d = Destinations::new(false);
        d.own.write().expect("lock").extend(
            ["192.0.2.1", "192.0.2.255", "2001:db8:1::1"]
                .map(|a| a.parse::<IpAddr>().expect("address")),
        );
        let refused = |a: &str| d.refuse(a.parse().expect("address"));
        assert_eq!(refused("127.0.0.1"), Some(Refusal::Loopback));
        assert_eq!(refused("127.3.2.1"), Some(Refusal::Loopback));
        assert_eq!(refused("::1"), Some(Refusal::Loopback));
        assert_eq!(refused("::ffff:127.0.0.1"), Some(Refusal::Loopback));
        assert_eq!(refused("0.0.0.0"), Some(Refusal::Unspecified));
        assert_eq!(refused("::"), Some(Refusal::Unspecified));
        assert_eq!(refused("224.0.0.1"), Some(Refusal::Multicast));
        assert_eq!(refused("ff02::1"), Some(Refusal::Multicast));
        assert_eq!(refused("255.255.255.255"), Some(Refusal::Broadcast));
        assert_eq!(refused("192.0.2.1"), Some(Refusal::Local));
        assert_eq!(refused("::ffff:192.0.2.1"), Some(Refusal::Local));
        assert_eq!(refused("192.0.2.255"), Some(Refusal::Local));
        assert_eq!(refused("2001:db8:1::1"), Some(Refusal::Local));
        assert_eq!(refused("198.51.100.2"), None);
        assert_eq!(refused("2001:db8:2::2"), None);
        assert_eq!(d.refused(), 13);
    }

    #[test]
    fn allow_local_refuses_nothing() {
        let d = Destinations::new(true);
        assert_eq!(d.refuse("127.0.0.1".parse().expect("address")), None);
        assert_eq!(d.refused(), 0);
    }
}
