//! Interface addresses over netlink: the address `nf_tproxy_laddr4` / `nf_tproxy_laddr6`
//! would pick as laddr when a rule has no on-ip (T4).
//!
//! * IPv4: the first address of the interface that is not `IFA_F_SECONDARY`
//!   (`in_dev_for_each_ifa_rcu` order, which is the order netlink dumps them in).
//! * IPv6: the first address that is neither `IFA_F_TENTATIVE` nor `IFA_F_DEPRECATED`
//!   (`idev->addr_list` order), link-local included, as in the kernel.

use std::net::IpAddr;

use futures::TryStreamExt as _;
use proxy_common::{IFACE_HAS_IP4, IFACE_HAS_IP6, IfaceAddrs};
use rtnetlink::{
    Handle,
    packet_route::address::{AddressAttribute, AddressFlags, AddressMessage},
};

/// Listing an interface's addresses failed.
#[derive(Debug, thiserror::Error)]
#[error("listing the addresses of interface index {ifindex}")]
pub struct IfaddrsError {
    ifindex: u32,
    #[source]
    source: rtnetlink::Error,
}

/// Resolves an interface name to its index in the current namespace.
pub fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok()
}

/// Reads the laddr candidates of `ifindex`.
pub async fn laddr_candidates(handle: &Handle, ifindex: u32) -> Result<IfaceAddrs, IfaddrsError> {
    let messages: Vec<AddressMessage> = handle
        .address()
        .get()
        .set_link_index_filter(ifindex)
        .execute()
        .try_collect()
        .await
        .map_err(|source| IfaddrsError { ifindex, source })?;
    Ok(pick(&messages))
}

/// The interface's own address in an address message: IFA_LOCAL (IFA_ADDRESS is the peer
/// on a point-to-point link), or IFA_ADDRESS where there is no IFA_LOCAL (IPv6).
pub fn own_address(msg: &AddressMessage) -> Option<IpAddr> {
    let local = msg.attributes.iter().find_map(|a| match a {
        AddressAttribute::Local(ip) => Some(*ip),
        _ => None,
    });
    local.or_else(|| {
        msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        })
    })
}

/// Picks the addresses from a dump, in dump order.
pub fn pick(messages: &[AddressMessage]) -> IfaceAddrs {
    let mut out = IfaceAddrs::default();
    for msg in messages {
        // IFA_FLAGS carries all 32 bits; the header only the low 8.
        let flags = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                AddressAttribute::Flags(f) => Some(*f),
                _ => None,
            })
            .unwrap_or_else(|| {
                AddressFlags::from_bits_truncate(u32::from(msg.header.flags.bits()))
            });
        match own_address(msg) {
            Some(IpAddr::V4(ip))
                if out.flags & IFACE_HAS_IP4 == 0 && !flags.contains(AddressFlags::Secondary) =>
            {
                out.ip4_be = u32::from_ne_bytes(ip.octets());
                out.flags |= IFACE_HAS_IP4;
            }
            Some(IpAddr::V6(ip))
                if out.flags & IFACE_HAS_IP6 == 0
                    && !flags.intersects(AddressFlags::Tentative | AddressFlags::Deprecated) =>
            {
                out.ip6 = ip.octets();
                out.flags |= IFACE_HAS_IP6;
            }
            _ => {}
        }
    }
    out
}

/// A change to the namespace's interfaces the agent follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InterfaceEvent {
    /// The addresses of interface `index` changed (RTM_NEWADDR / RTM_DELADDR, IPv4 and
    /// IPv6): a new primary address, a deleted one, the end of IPv6 duplicate address
    /// detection.
    Addresses(u32),
    /// An interface exists or changed (RTM_NEWLINK): among other things, one that was
    /// deleted and made again under the same name, with a new index.
    Link { index: u32, name: String },
    /// Interface `index` was deleted (RTM_DELLINK), and whatever was attached to it.
    Gone(u32),
}

/// Follows address and link changes, so that the classifier's view of the interfaces
/// (their laddr, whether it is attached at all) stays right while the agent runs.
pub fn watch() -> std::io::Result<tokio::sync::mpsc::UnboundedReceiver<InterfaceEvent>> {
    use futures::StreamExt as _;
    use rtnetlink::{
        MulticastGroup,
        packet_core::NetlinkPayload,
        packet_route::{RouteNetlinkMessage, link::LinkAttribute},
    };

    let (connection, _handle, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
        MulticastGroup::Link,
    ])?;
    tokio::spawn(connection);
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((message, _)) = messages.next().await {
            let event = match message.payload {
                NetlinkPayload::InnerMessage(
                    RouteNetlinkMessage::NewAddress(m) | RouteNetlinkMessage::DelAddress(m),
                ) => InterfaceEvent::Addresses(m.header.index),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(m)) => {
                    let Some(name) = m.attributes.iter().find_map(|a| match a {
                        LinkAttribute::IfName(name) => Some(name.clone()),
                        _ => None,
                    }) else {
                        continue;
                    };
                    InterfaceEvent::Link {
                        index: m.header.index,
                        name,
                    }
                }
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(m)) => {
                    InterfaceEvent::Gone(m.header.index)
                }
                _ => continue,
            };
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}
