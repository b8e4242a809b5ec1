//! Which classifier an interface needs, from its link type (T10): the kernel's TPROXY works
//! on every interface, and so must the classifier, but at TC ingress the IP header starts
//! 14 bytes in on an Ethernet-type device and at offset 0 on one without a link-layer
//! header. `__netif_receive_skb_core` pushes the MAC header back only when the device has
//! `header_ops` (`dev_has_header`), so the offset is a property of the device, decided once
//! here, never guessed per packet. A link type whose layout is not known is refused at
//! start: attaching to it would pass everything unclassified.

use futures::TryStreamExt as _;
use rtnetlink::{Handle, packet_route::link::LinkLayerType};

/// How packets start at TC ingress on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkHeader {
    /// A 14-byte Ethernet header (Ethernet, veth, bridge, vxlan, loopback).
    Ethernet,
    /// No link-layer header: the IP header first, `skb->protocol` for the family (tun,
    /// WireGuard, ipip, ip6tnl, sit).
    None,
}

/// The interface's link type could not be read, or the classifier cannot parse it.
#[derive(Debug, thiserror::Error)]
pub enum LinkHeaderError {
    #[error("reading the link type of {iface}")]
    Netlink {
        iface: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("interface {0} vanished while its link type was read")]
    Vanished(String),
    #[error(
        "interface {iface} has link type {kind:?}, whose header layout the classifier does not \
         know; refusing to attach rather than pass its traffic unclassified (supported: \
         Ethernet-type devices, loopback, and devices without a link-layer header such as \
         tun, WireGuard, ipip, ip6tnl, sit)"
    )]
    Unsupported { iface: String, kind: LinkLayerType },
}

/// The layout for a link type, or `None` for one the classifier cannot parse.
pub fn for_link_type(kind: LinkLayerType) -> Option<LinkHeader> {
    match kind {
        LinkLayerType::Ether | LinkLayerType::Loopback => Some(LinkHeader::Ethernet),
        // tun (IFF_TUN) and WireGuard are ARPHRD_NONE; ipip, ip6tnl and sit have no
        // header_ops. Only tun is tested here (the others' modules are absent on the
        // project's machines); they share the code path.
        LinkLayerType::None
        | LinkLayerType::Tunnel
        | LinkLayerType::Tunnel6
        | LinkLayerType::Sit => Some(LinkHeader::None),
        // GRE devices carry header_ops in some configurations (ipgre_header_ops), PPP and
        // the rest are unknown: refused.
        _ => None,
    }
}

/// Reads `iface`'s link type over netlink and maps it to its layout.
pub async fn of_interface(
    handle: &Handle,
    iface: &str,
    ifindex: u32,
) -> Result<LinkHeader, LinkHeaderError> {
    let message = handle
        .link()
        .get()
        .match_index(ifindex)
        .execute()
        .try_next()
        .await
        .map_err(|source| LinkHeaderError::Netlink {
            iface: iface.to_owned(),
            source,
        })?
        .ok_or_else(|| LinkHeaderError::Vanished(iface.to_owned()))?;
    let kind = message.header.link_layer_type;
    for_link_type(kind).ok_or_else(|| LinkHeaderError::Unsupported {
        iface: iface.to_owned(),
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ethernet_and_l3_types_are_known_and_gre_is_refused() {
        assert_eq!(
            for_link_type(LinkLayerType::Ether),
            Some(LinkHeader::Ethernet)
        );
        assert_eq!(
            for_link_type(LinkLayerType::Loopback),
            Some(LinkHeader::Ethernet)
        );
        assert_eq!(for_link_type(LinkLayerType::None), Some(LinkHeader::None));
        assert_eq!(for_link_type(LinkLayerType::Tunnel), Some(LinkHeader::None));
        assert_eq!(for_link_type(LinkLayerType::Ipgre), None);
        assert_eq!(for_link_type(LinkLayerType::Ppp), None);
    }
}
